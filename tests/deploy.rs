//! Static checks of the observability stack: `docker-compose.yml`,
//! `deploy/env.example`, the OpenTelemetry Collector, Prometheus and Grafana
//! configuration and the provisioned dashboards. Nothing here needs Docker or
//! the network: every file is parsed and cross-checked against the others and
//! against the metric names the plugin's source declares.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/dashboards.rs"]
mod dashboards;
#[path = "common/tools.rs"]
mod tools;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

// ------------------------------------------------------------------ helpers

const SERVICES: [&str; 7] = [
    "rabbitmq",
    "otel-collector",
    "jaeger",
    "loki",
    "prometheus",
    "alertmanager",
    "grafana",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_yaml(text: &str, what: &str) -> Yaml {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    parse_yaml(&read(rel), rel)
}

fn compose() -> Yaml {
    yaml("docker-compose.yml")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(s.is_mapping(), "docker-compose.yml has no service `{name}`");
    s
}

fn str_of(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|seq| seq.iter().map(str_of).collect())
        .unwrap_or_default()
}

/// A service's environment as a map, from either the mapping or the
/// `KEY=VALUE` list syntax.
fn environment(svc: &Yaml) -> BTreeMap<String, String> {
    let env = &svc["environment"];
    let mut out = BTreeMap::new();
    if let Some(map) = env.as_mapping() {
        for (k, v) in map {
            out.insert(str_of(k), str_of(v));
        }
    } else if let Some(seq) = env.as_sequence() {
        for item in seq {
            let item = str_of(item);
            let (k, v) = item.split_once('=').unwrap_or((&item, ""));
            out.insert(k.to_owned(), v.to_owned());
        }
    }
    out
}

/// A published port: (host ip, host port, container port), from the short
/// (`"127.0.0.1:80:8080"`) or the long syntax.
fn published_ports(svc: &Yaml) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for port in svc["ports"].as_sequence().into_iter().flatten() {
        if port.is_mapping() {
            out.push((
                str_of(&port["host_ip"]),
                str_of(&port["published"]),
                str_of(&port["target"]),
            ));
        } else {
            let spec = str_of(port);
            let spec = spec.split('/').next().unwrap_or_default().to_owned();
            let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
            let (ip, host, container) = match parts.as_slice() {
                [container] => ("", "", *container),
                [container, host] => ("", *host, *container),
                [container, host, ip] => (*ip, *host, *container),
                _ => unreachable!(),
            };
            out.push((ip.to_owned(), host.to_owned(), container.to_owned()));
        }
    }
    out
}

#[derive(Debug)]
struct Mount {
    service: String,
    /// `./...` for a bind mount, a name for a volume.
    source: String,
    target: String,
    bind: bool,
}

fn mounts(compose: &Yaml) -> Vec<Mount> {
    let mut out = Vec::new();
    for name in SERVICES {
        let svc = service(compose, name);
        for vol in svc["volumes"].as_sequence().into_iter().flatten() {
            let (source, target, bind) = if vol.is_mapping() {
                (
                    str_of(&vol["source"]),
                    str_of(&vol["target"]),
                    str_of(&vol["type"]) == "bind",
                )
            } else {
                let spec = str_of(vol);
                let mut parts = spec.splitn(3, ':');
                let source = parts.next().unwrap_or_default().to_owned();
                let target = parts.next().unwrap_or_default().to_owned();
                let bind = source.starts_with('.') || source.starts_with('/');
                (source, target, bind)
            };
            out.push(Mount {
                service: name.to_owned(),
                source,
                target,
                bind,
            });
        }
    }
    out
}

/// The container path where `service` bind-mounts the repository path `source`.
fn mount_target(compose: &Yaml, service: &str, source: &str) -> String {
    let norm = |s: &str| s.trim_start_matches("./").trim_end_matches('/').to_owned();
    mounts(compose)
        .into_iter()
        .find(|m| m.service == service && m.bind && norm(&m.source) == norm(source))
        .unwrap_or_else(|| panic!("service `{service}` does not bind-mount ./{}", norm(source)))
        .target
}

/// Every string in a YAML document, keys included.
fn all_strings(v: &Yaml, out: &mut Vec<String>) {
    match v {
        Yaml::String(s) => out.push(s.clone()),
        Yaml::Sequence(seq) => seq.iter().for_each(|x| all_strings(x, out)),
        Yaml::Mapping(map) => map.iter().for_each(|(k, x)| {
            all_strings(k, out);
            all_strings(x, out);
        }),
        Yaml::Tagged(t) => all_strings(&t.value, out),
        _ => {}
    }
}

/// The variables a Compose string interpolates: `$VAR`, `${VAR}`,
/// `${VAR:-x}`, `${VAR:?x}`…; `$$` is a literal dollar.
fn interpolated_vars(s: &str) -> BTreeSet<String> {
    let b = s.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'$') => i += 2,
            Some(b'{') => {
                let start = i + 2;
                let mut end = start;
                while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                    end += 1;
                }
                out.insert(s[start..end].to_owned());
                i = end;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = i + 1;
                let mut end = start;
                while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                    end += 1;
                }
                out.insert(s[start..end].to_owned());
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

/// `Some(VAR)` when `value` is exactly `${VAR:?message}` (required, no default).
fn required_substitution(value: &str) -> Option<&str> {
    let inner = value.strip_prefix("${")?.strip_suffix('}')?;
    let (var, message) = inner.split_once(":?")?;
    let valid = !var.is_empty()
        && var
            .bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
        && !message.trim().is_empty()
        && !message.contains('}');
    valid.then_some(var)
}

fn env_example() -> BTreeMap<String, String> {
    read("deploy/env.example")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("deploy/env.example: `{l}` is not KEY=VALUE"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// A variable holding a credential: one of its `_`-separated words is
/// USER, PASS, PASSWORD, SECRET, TOKEN or KEY (`GF_USERS_ALLOW_SIGN_UP` is not).
fn is_credential(key: &str) -> bool {
    key.to_ascii_uppercase()
        .split('_')
        .any(|w| ["USER", "PASS", "PASSWORD", "SECRET", "TOKEN", "KEY"].contains(&w))
}

/// `host:port` with a non-empty host and a port in 1..=65535.
fn host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0 && !host.contains('/')).then_some((host, port))
}

fn prometheus_targets(prom: &Yaml) -> BTreeMap<String, Vec<String>> {
    let mut jobs = BTreeMap::new();
    for sc in prom["scrape_configs"].as_sequence().into_iter().flatten() {
        let job = str_of(&sc["job_name"]);
        let targets = sc["static_configs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|c| strings(&c["targets"]))
            .collect();
        assert!(
            jobs.insert(job.clone(), targets).is_none(),
            "prometheus.yml: duplicate job_name `{job}`"
        );
    }
    jobs
}

// ------------------------------------------------------------------ compose

#[test]
fn compose_has_exactly_the_stack_services() {
    let c = compose();
    assert!(
        c.get("version").is_none(),
        "docker-compose.yml: the Compose spec has no `version:` key"
    );
    let names: BTreeSet<String> = c["services"]
        .as_mapping()
        .expect("docker-compose.yml has a `services` mapping")
        .keys()
        .map(str_of)
        .collect();
    let expected: BTreeSet<String> = SERVICES.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(names, expected, "docker-compose.yml services");
}

#[test]
fn compose_images_are_pinned() {
    let c = compose();
    for name in SERVICES {
        let image = str_of(&service(&c, name)["image"]);
        let last = image.rsplit('/').next().unwrap_or_default();
        let tag = last
            .split_once(':')
            .map(|(_, tag)| tag.split('@').next().unwrap_or_default())
            .unwrap_or_else(|| panic!("service `{name}`: image `{image}` has no tag"));
        assert!(
            !tag.is_empty() && tag != "latest" && tag.bytes().any(|b| b.is_ascii_digit()),
            "service `{name}`: image `{image}` is not pinned to a version"
        );
    }
    let text = read("docker-compose.yml");
    assert!(
        !text.contains(":latest"),
        "docker-compose.yml mentions a :latest tag"
    );
}

#[test]
fn compose_publishes_ports_on_loopback_only() {
    let c = compose();
    let mut published = 0;
    for name in SERVICES {
        let svc = service(&c, name);
        assert!(
            svc.get("network_mode").is_none(),
            "service `{name}`: network_mode bypasses the loopback-only port bindings"
        );
        for (ip, host, container) in published_ports(svc) {
            assert_eq!(
                ip, "127.0.0.1",
                "service `{name}`: port {host}:{container} must be published as 127.0.0.1:{host}:{container}"
            );
            assert!(
                host.parse::<u16>().is_ok() && container.parse::<u16>().is_ok(),
                "service `{name}`: port `{ip}:{host}:{container}` is not host:container"
            );
            published += 1;
        }
    }
    // The raw short syntax too: every entry starts with the loopback address.
    for name in SERVICES {
        for port in service(&c, name)["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            if let Yaml::String(s) = port {
                assert!(s.starts_with("127.0.0.1:"), "service `{name}`: port `{s}`");
            }
        }
    }
    assert!(
        published >= 8,
        "only {published} published ports: the UIs are missing"
    );
    let expect = [
        ("rabbitmq", "5672"),
        ("rabbitmq", "15672"),
        ("otel-collector", "4317"),
        ("otel-collector", "4318"),
        ("jaeger", "16686"),
        ("prometheus", "9090"),
        ("grafana", "3000"),
    ];
    for (name, port) in expect {
        assert!(
            published_ports(service(&c, name))
                .iter()
                .any(|(_, host, container)| host == port && container == port),
            "service `{name}` does not publish port {port}"
        );
    }
}

#[test]
fn compose_bind_mounts_exist_and_volumes_are_declared() {
    let c = compose();
    let declared: BTreeSet<String> = c["volumes"]
        .as_mapping()
        .map(|m| m.keys().map(str_of).collect())
        .unwrap_or_default();
    let all = mounts(&c);
    assert!(all.iter().any(|m| m.bind), "no bind mount at all");
    for m in all {
        assert!(
            m.target.starts_with('/'),
            "service `{}`: mount target `{}` is not an absolute container path",
            m.service,
            m.target
        );
        if m.bind {
            assert!(
                m.source.starts_with("./"),
                "service `{}`: bind mount `{}` must be relative to the repository (./...)",
                m.service,
                m.source
            );
            let path = root().join(&m.source);
            assert!(
                path.exists(),
                "service `{}`: bind-mounted `{}` does not exist",
                m.service,
                m.source
            );
        } else {
            assert!(
                declared.contains(&m.source),
                "service `{}`: volume `{}` is not declared under top-level `volumes`",
                m.service,
                m.source
            );
        }
    }
}

#[test]
fn compose_has_no_default_credentials() {
    let text = read("docker-compose.yml");
    let lower = text.to_ascii_lowercase();
    for bad in ["guest", "admin/admin", "admin:admin"] {
        assert!(!lower.contains(bad), "docker-compose.yml mentions `{bad}`");
    }
    let c = compose();
    let mut credentials = BTreeSet::new();
    for name in SERVICES {
        for (key, value) in environment(service(&c, name)) {
            let lowered = value.to_ascii_lowercase();
            assert!(
                !["admin", "guest", "password", "secret"].contains(&lowered.as_str()),
                "service `{name}`: {key}: {value} is a default credential"
            );
            if is_credential(&key) {
                assert!(
                    required_substitution(&value).is_some(),
                    "service `{name}`: {key} must be a required substitution `${{VAR:?message}}`, not `{value}`"
                );
                credentials.insert(key);
            }
        }
    }
    // Without these the images fall back to guest/guest and admin/admin.
    for key in [
        "RABBITMQ_DEFAULT_USER",
        "RABBITMQ_DEFAULT_PASS",
        "GF_SECURITY_ADMIN_USER",
        "GF_SECURITY_ADMIN_PASSWORD",
    ] {
        assert!(
            credentials.contains(key),
            "docker-compose.yml does not set {key}"
        );
    }
    let grafana = environment(service(&c, "grafana"));
    assert_eq!(
        grafana
            .get("GF_AUTH_ANONYMOUS_ENABLED")
            .map(|v| v.to_ascii_lowercase()),
        Some("false".to_owned()),
        "grafana: anonymous access must be explicitly off"
    );
}

#[test]
fn env_example_defines_every_compose_variable() {
    let mut texts = Vec::new();
    all_strings(&compose(), &mut texts);
    let used: BTreeSet<String> = texts.iter().flat_map(|s| interpolated_vars(s)).collect();
    assert!(
        !used.is_empty(),
        "docker-compose.yml interpolates no variable"
    );
    let example = env_example();
    for var in &used {
        assert!(
            example.contains_key(var),
            "deploy/env.example does not define {var}, used by docker-compose.yml"
        );
    }
    for (key, value) in &example {
        assert!(!value.is_empty(), "deploy/env.example: {key} is empty");
        let lowered = value.to_ascii_lowercase();
        assert!(
            !["admin", "guest", "password"].contains(&lowered.as_str()),
            "deploy/env.example: {key}={value} is a default credential"
        );
        if key.contains("PASS") {
            assert!(
                value.starts_with("change-me"),
                "deploy/env.example: {key} must be a `change-me-...` placeholder"
            );
        }
    }
    let text = read("deploy/env.example");
    assert!(
        text.contains("cp deploy/env.example .env"),
        "deploy/env.example must say to copy it to .env"
    );
}

// ------------------------------------------------------------------ collector

/// A config value as compose runs it: `${env:NAME:-default}` (the form the
/// collector and Jaeger configs use so that tests can move their ports)
/// reads its default, since compose sets none of those variables.
fn compose_value(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find("${env:") {
        out.push_str(&rest[..at]);
        let inner = &rest[at + 6..];
        let end = inner.find('}').expect("a closing brace");
        let (_, default) = inner[..end]
            .split_once(":-")
            .unwrap_or_else(|| panic!("{value}: no default for compose"));
        out.push_str(default);
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn collector_pipelines_reference_defined_components() {
    let cfg = yaml("deploy/otel-collector/config.yaml");
    let defined = |section: &str| -> BTreeSet<String> {
        cfg[section]
            .as_mapping()
            .map(|m| m.keys().map(str_of).collect())
            .unwrap_or_default()
    };
    let (receivers, processors, exporters, extensions) = (
        defined("receivers"),
        defined("processors"),
        defined("exporters"),
        defined("extensions"),
    );
    for ext in strings(&cfg["service"]["extensions"]) {
        assert!(
            extensions.contains(&ext),
            "extension `{ext}` is not defined"
        );
    }
    let pipelines = cfg["service"]["pipelines"]
        .as_mapping()
        .expect("service.pipelines");
    let mut kinds = BTreeSet::new();
    for (name, p) in pipelines {
        let name = str_of(name);
        let kind = name.split('/').next().unwrap_or_default().to_owned();
        assert!(
            ["traces", "metrics", "logs"].contains(&kind.as_str()),
            "pipeline `{name}`: unknown signal"
        );
        kinds.insert(kind);
        for (field, known) in [
            ("receivers", &receivers),
            ("processors", &processors),
            ("exporters", &exporters),
        ] {
            let ids = strings(&p[field]);
            if field != "processors" {
                assert!(!ids.is_empty(), "pipeline `{name}` has no {field}");
            }
            for id in ids {
                assert!(
                    known.contains(&id),
                    "pipeline `{name}` uses {field} `{id}`, which is not defined"
                );
            }
        }
        let procs = strings(&p["processors"]);
        assert_eq!(
            procs.first().map(String::as_str),
            Some("memory_limiter"),
            "pipeline `{name}`: memory_limiter must come first"
        );
        assert!(
            procs.iter().any(|x| x == "batch"),
            "pipeline `{name}`: no batch processor"
        );
    }
    for kind in ["traces", "metrics", "logs"] {
        assert!(kinds.contains(kind), "no {kind} pipeline");
    }
    let traces = strings(&cfg["service"]["pipelines"]["traces"]["exporters"]);
    assert!(
        traces.iter().any(|e| e == "otlp_grpc/jaeger"),
        "traces are not exported to Jaeger"
    );
    let metrics = strings(&cfg["service"]["pipelines"]["metrics"]["exporters"]);
    assert!(
        metrics.iter().any(|e| e == "prometheus"),
        "metrics are not exported to Prometheus"
    );
    let jaeger = &cfg["exporters"]["otlp_grpc/jaeger"];
    assert_eq!(compose_value(&str_of(&jaeger["endpoint"])), "jaeger:4317");
    assert_eq!(jaeger["tls"]["insecure"].as_bool(), Some(true));
}

#[test]
fn collector_listens_where_compose_and_prometheus_expect() {
    let cfg = yaml("deploy/otel-collector/config.yaml");
    let otlp = &cfg["receivers"]["otlp"]["protocols"];
    assert_eq!(
        compose_value(&str_of(&otlp["grpc"]["endpoint"])),
        "0.0.0.0:4317",
        "OTLP gRPC"
    );
    assert_eq!(
        compose_value(&str_of(&otlp["http"]["endpoint"])),
        "0.0.0.0:4318",
        "OTLP HTTP"
    );
    let exporter = compose_value(&str_of(&cfg["exporters"]["prometheus"]["endpoint"]));
    assert_eq!(
        host_port(&exporter).map(|(_, p)| p),
        Some(8889),
        "prometheus exporter"
    );
    let reader = &cfg["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"];
    let own = format!(
        "{}:{}",
        compose_value(&str_of(&reader["prometheus"]["host"])),
        compose_value(&str_of(&reader["prometheus"]["port"]))
    );
    assert_eq!(
        host_port(&own),
        Some(("0.0.0.0", 8888)),
        "collector's own telemetry"
    );

    let c = compose();
    let collector = service(&c, "otel-collector");
    let config_path = mount_target(&c, "otel-collector", "deploy/otel-collector/config.yaml");
    assert!(
        strings(&collector["command"]).contains(&format!("--config={config_path}")),
        "otel-collector: --config does not point at the mounted {config_path}"
    );
    let jobs = prometheus_targets(&yaml("deploy/prometheus/prometheus.yml"));
    let scraped: BTreeSet<&String> = jobs.values().flatten().collect();
    for target in ["otel-collector:8888", "otel-collector:8889"] {
        assert!(
            scraped.contains(&target.to_owned()),
            "Prometheus does not scrape {target}"
        );
    }
}

// ------------------------------------------------------------------ prometheus

#[test]
fn prometheus_config_scrapes_collector_and_demo() {
    let text = read("deploy/prometheus/prometheus.yml");
    let jobs = prometheus_targets(&parse_yaml(&text, "prometheus.yml"));
    for job in ["ai_team", "otel-collector"] {
        assert!(jobs.contains_key(job), "prometheus.yml has no job `{job}`");
    }
    for (job, targets) in &jobs {
        assert!(!targets.is_empty(), "job `{job}` has no target");
        for t in targets {
            assert!(
                host_port(t).is_some(),
                "job `{job}`: target `{t}` is not host:port"
            );
        }
    }
    assert_eq!(jobs["ai_team"], ["host.docker.internal:9464"]);
    assert!(
        text.contains("METRICS_ADDR=0.0.0.0:9464"),
        "prometheus.yml must say how the demo opts in to being scraped"
    );

    let c = compose();
    let prom = service(&c, "prometheus");
    assert!(
        strings(&prom["extra_hosts"]).contains(&"host.docker.internal:host-gateway".to_owned()),
        "prometheus: host.docker.internal needs extra_hosts host-gateway"
    );
    let config_path = mount_target(&c, "prometheus", "deploy/prometheus/prometheus.yml");
    assert!(
        strings(&prom["command"]).contains(&format!("--config.file={config_path}")),
        "prometheus: --config.file does not point at the mounted {config_path}"
    );
}

/// The real collector (built from `builder.yaml`) and the real Jaeger v2
/// accept the configs compose mounts, as compose runs them.
#[test]
fn the_real_collector_and_jaeger_accept_their_configs() {
    for (tool, config) in [
        ("otelcol", "deploy/otel-collector/config.yaml"),
        ("jaeger", "deploy/jaeger/config.yaml"),
    ] {
        let out = std::process::Command::new(tools::tool(tool))
            .arg("validate")
            .arg(format!("--config={}", root().join(config).display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} validate {config}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let file = root().join("deploy/prometheus/prometheus.yml");
    // Debian's promtool (2.42, what the dashboards tests run) and the one of
    // the Prometheus 3 compose pins. Never skipped: a check that passes
    // without its tool proves nothing.
    let promtool2 = std::path::PathBuf::from("promtool");
    for promtool in [promtool2, tools::tool("promtool3")] {
        let out = std::process::Command::new(&promtool)
            .args(["check", "config"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}: run `bash .ci/deps.sh --all` (installs Debian's prometheus, builds Prometheus 3)",
                    promtool.display()
                )
            });
        assert!(
            out.status.success(),
            "{} check config failed:\n{}{}",
            promtool.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ------------------------------------------------------------------ grafana

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

#[test]
fn grafana_provisioning_matches_compose() {
    let dir = root().join("deploy/grafana/provisioning");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    assert!(!files.is_empty(), "no provisioning file");
    let mut datasources = Vec::new();
    let mut providers = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let doc = parse_yaml(&text, &file.display().to_string());
        assert_eq!(
            doc["apiVersion"].as_u64(),
            Some(1),
            "{}: apiVersion",
            file.display()
        );
        datasources.extend(
            doc["datasources"]
                .as_sequence()
                .cloned()
                .unwrap_or_default(),
        );
        providers.extend(doc["providers"].as_sequence().cloned().unwrap_or_default());
    }
    let by_uid: BTreeMap<String, &Yaml> =
        datasources.iter().map(|d| (str_of(&d["uid"]), d)).collect();
    assert_eq!(by_uid.len(), datasources.len(), "duplicate datasource uid");
    let prom = by_uid
        .get("prometheus")
        .expect("datasource uid `prometheus`");
    assert_eq!(str_of(&prom["type"]), "prometheus");
    assert_eq!(str_of(&prom["url"]), "http://prometheus:9090");
    let jaeger = by_uid.get("jaeger").expect("datasource uid `jaeger`");
    assert_eq!(str_of(&jaeger["type"]), "jaeger");
    assert_eq!(str_of(&jaeger["url"]), "http://jaeger:16686");
    let defaults: Vec<String> = datasources
        .iter()
        .filter(|d| d["isDefault"].as_bool() == Some(true))
        .map(|d| str_of(&d["uid"]))
        .collect();
    assert_eq!(
        defaults,
        ["prometheus"],
        "exactly Prometheus is the default datasource"
    );

    let c = compose();
    assert_eq!(
        mount_target(&c, "grafana", "deploy/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards_target = mount_target(&c, "grafana", "deploy/grafana/dashboards");
    assert!(!providers.is_empty(), "no dashboard provider");
    for p in &providers {
        assert_eq!(str_of(&p["type"]), "file", "dashboard provider type");
        assert_eq!(
            str_of(&p["options"]["path"]).trim_end_matches('/'),
            dashboards_target.trim_end_matches('/'),
            "the dashboard provider path is not where compose mounts deploy/grafana/dashboards"
        );
    }
    if let Some(home) =
        environment(service(&c, "grafana")).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    {
        let rel = home
            .strip_prefix(&format!("{}/", dashboards_target.trim_end_matches('/')))
            .unwrap_or_else(|| panic!("home dashboard {home} is not under {dashboards_target}"));
        assert!(
            root().join("deploy/grafana/dashboards").join(rel).is_file(),
            "home dashboard {home} does not exist"
        );
    }
}

const PANEL_TYPES: [&str; 4] = ["timeseries", "stat", "bargauge", "heatmap"];

fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut in_string: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                in_string = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => in_string = Some(c),
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = stack.pop();
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open != Some(want) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && in_string.is_none()
}

#[test]
fn dashboards_are_well_formed() {
    let files = dashboards::dashboard_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "agent-performance.json",
            "llm-metrics.json",
            "task-overview.json"
        ]
    );
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for file in &files {
        let f = file.display();
        let d = dashboards::load_dashboard(file);
        let uid = d["uid"].as_str().unwrap_or_default().to_owned();
        let title = d["title"].as_str().unwrap_or_default().to_owned();
        assert!(!uid.is_empty() && uid.len() <= 40, "{f}: uid `{uid}`");
        assert!(!title.is_empty(), "{f}: no title");
        assert!(uids.insert(uid.clone()), "{f}: duplicate uid `{uid}`");
        assert!(
            titles.insert(title.clone()),
            "{f}: duplicate title `{title}`"
        );
        assert_eq!(d["refresh"], "10s", "{f}: refresh");
        let schema = d["schemaVersion"].as_u64().unwrap_or_default();
        assert!((36..=41).contains(&schema), "{f}: schemaVersion {schema}");

        let panels = dashboards::all_panels(&d);
        let mut ids = BTreeSet::new();
        let mut queries = 0;
        for p in panels {
            let ptitle = p["title"].as_str().unwrap_or_default();
            assert!(!ptitle.is_empty(), "{f}: a panel has no title");
            assert!(
                ids.insert(p["id"].as_u64().expect("panel id")),
                "{f}: duplicate panel id"
            );
            let grid = &p["gridPos"];
            let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
            assert!(
                x + w <= 24 && grid["h"].as_u64().unwrap() > 0,
                "{f}: {ptitle}: gridPos"
            );
            let ptype = p["type"].as_str().unwrap_or_default();
            if ptype == "row" {
                assert!(p.get("targets").is_none(), "{f}: row {ptitle} has targets");
                continue;
            }
            assert!(
                PANEL_TYPES.contains(&ptype),
                "{f}: {ptitle}: panel type `{ptype}`"
            );
            assert_eq!(
                p["datasource"]["uid"], "prometheus",
                "{f}: {ptitle}: panel datasource"
            );
            let targets = p["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            assert!(!targets.is_empty(), "{f}: {ptitle}: no query");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "prometheus",
                    "{f}: {ptitle}: target datasource"
                );
                assert!(
                    refs.insert(t["refId"].as_str().unwrap_or_default()),
                    "{f}: {ptitle}: refId"
                );
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{f}: {ptitle}: empty expr");
                assert!(balanced(expr), "{f}: {ptitle}: unbalanced `{expr}`");
                assert!(
                    !dashboards::metric_names_in_expr(expr).is_empty(),
                    "{f}: {ptitle}: `{expr}` selects no metric"
                );
                queries += 1;
            }
        }
        assert!(queries >= 4, "{f}: only {queries} queries");
        for var in d["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "query" {
                assert_eq!(
                    var["datasource"]["uid"], "prometheus",
                    "{f}: variable datasource"
                );
            }
        }
    }
    let expected: BTreeSet<String> = [
        "mindbus-task-overview",
        "mindbus-llm-metrics",
        "mindbus-agent-performance",
    ]
    .map(String::from)
    .into();
    assert_eq!(uids, expected);
    let agent =
        dashboards::load_dashboard(&dashboards::dashboards_dir().join("agent-performance.json"));
    let vars: Vec<&Json> = agent["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        vars.iter().any(|v| v["name"] == "agent"
            && v["definition"] == "label_values(mindbus_messages_total, agent)"),
        "Agent Performance has no `agent` variable"
    );
}

// ------------------------------------------------------------------ metric names

/// `(NAME, value)` of every `pub const NAME: &str = "value";` of a source file.
fn str_consts(source: &str) -> BTreeMap<String, String> {
    source
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (name, rest) = rest.split_once(':')?;
            let value = rest.trim().strip_prefix("&str")?.trim().strip_prefix('=')?;
            let value = value.trim().strip_suffix(';')?.trim();
            let value = value.strip_prefix('"')?.strip_suffix('"')?;
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

/// Constant names passed first to a `histogram!(` or `describe_histogram!(`.
fn histogram_consts(source: &str) -> BTreeSet<String> {
    source
        .match_indices("histogram!(")
        .map(|(i, m)| {
            source[i + m.len()..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// Telemetry-health counters named by literals in the plugin.
const LITERAL_COUNTERS: [&str; 4] = [
    "mindbus_otel_rejected_contexts_total",
    "mindbus_otel_label_overflow_total",
    "mindbus_otel_interceptor_panics_total",
    "mindbus_otel_handler_panics_total",
];

/// Every series name the plugin exposes to Prometheus: counters and gauges as
/// named, histograms as `_bucket`, `_sum` and `_count`.
fn plugin_series() -> BTreeSet<String> {
    let sources = [
        include_str!("../crates/mindbus-otel/src/agent_metrics.rs"),
        include_str!("../crates/mindbus-otel/src/task_metrics.rs"),
    ];
    let mut out = BTreeSet::new();
    let mut histograms = 0;
    for src in sources {
        let consts = str_consts(src);
        let hist = histogram_consts(src);
        for h in &hist {
            assert!(
                consts.contains_key(h),
                "histogram!({h}) names no `pub const {h}: &str`"
            );
        }
        for (name, value) in consts {
            assert!(
                !value.is_empty()
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "`{name}` = `{value}` is not a metric name"
            );
            if hist.contains(&name) {
                histograms += 1;
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{value}{suffix}"));
                }
            } else {
                out.insert(value);
            }
        }
    }
    assert!(
        histograms >= 6,
        "found only {histograms} histograms in the plugin source"
    );
    let all_sources = [
        include_str!("../crates/mindbus-otel/src/propagation.rs"),
        include_str!("../crates/mindbus-otel/src/labels.rs"),
        include_str!("../crates/mindbus-otel/src/interceptor.rs"),
        include_str!("../crates/mindbus-otel/src/handler.rs"),
    ]
    .concat();
    for name in LITERAL_COUNTERS {
        assert!(
            all_sources.contains(&format!("counter!(\"{name}\"")),
            "the plugin no longer emits {name}"
        );
        out.insert(name.to_owned());
    }
    out
}

#[test]
fn plugin_metric_list_is_read_from_source() {
    let series = plugin_series();
    for name in [
        "ai_team_tasks_total",
        "ai_team_tasks_in_progress",
        "ai_team_task_duration_seconds_bucket",
        "ai_team_quality_score_count",
        "ai_team_llm_cost_dollars_total",
        "mindbus_messages_total",
        "mindbus_processing_duration_seconds_sum",
        "messaging_process_duration_seconds_bucket",
        "mindbus_otel_handler_panics_total",
    ] {
        assert!(series.contains(name), "{name} missing from {series:#?}");
    }
    // Counters and gauges have no histogram series.
    assert!(!series.contains("ai_team_tasks_total_bucket"));
    assert!(!series.contains("ai_team_task_duration_seconds"));
}

#[test]
fn dashboards_use_only_metrics_the_plugin_emits() {
    let emitted = plugin_series();
    let used = dashboards::metric_names_in_dashboards();
    assert!(
        used.len() >= 15,
        "only {} metric names found in the dashboards",
        used.len()
    );
    let unknown: Vec<&String> = used.difference(&emitted).collect();
    assert!(
        unknown.is_empty(),
        "the dashboards use metrics the plugin does not emit: {unknown:?}"
    );
    for (file, expr) in dashboards::dashboard_exprs() {
        for name in dashboards::metric_names_in_expr(&expr) {
            assert!(
                emitted.contains(&name),
                "{}: `{expr}` uses unknown metric {name}",
                file.display()
            );
        }
    }
}

#[test]
fn dashboards_cover_the_plugin_metrics() {
    let families = dashboards::metric_families_in_dashboards();
    for family in [
        "ai_team_tasks_total",
        "ai_team_tasks_in_progress",
        "ai_team_task_duration_seconds",
        "ai_team_commands_total",
        "ai_team_commands_in_progress",
        "ai_team_command_duration_seconds",
        "ai_team_quality_score",
        "ai_team_llm_calls_total",
        "ai_team_llm_latency_seconds",
        "ai_team_llm_cost_dollars_total",
        "ai_team_llm_tokens_total",
        "ai_team_agent_errors_total",
        "mindbus_messages_total",
        "mindbus_processing_duration_seconds",
        "mindbus_messages_in_flight",
        "messaging_client_sent_messages_total",
        "messaging_client_consumed_messages_total",
        "messaging_client_operation_duration_seconds",
        "messaging_process_duration_seconds",
        "mindbus_otel_rejected_contexts_total",
        "mindbus_otel_label_overflow_total",
    ] {
        assert!(families.contains(family), "no dashboard shows {family}");
    }
}

/// A panel about errors answers 0 when none happened, not "No data" (which
/// an operator cannot tell from a broken scrape): its query, or the
/// numerator of its ratio, ends with `or on() vector(0)`, which adds the 0
/// only when the left side has no series at all. That the real Prometheus
/// returns a value for each is checked with live traffic in
/// `tests/demo.rs`.
#[test]
fn error_panels_answer_zero_when_none_happened() {
    const ZERO: &str = " or on() vector(0)";
    let mut checked = 0;
    for q in dashboards::panel_queries() {
        let title = q.panel.to_lowercase();
        if !["error", "fail", "rejected", "overflow"]
            .iter()
            .any(|w| title.contains(w))
        {
            continue;
        }
        checked += 1;
        let numerator = match q.expr.split_once(" / ") {
            Some((num, _)) => num
                .strip_prefix('(')
                .and_then(|n| n.strip_suffix(')'))
                .unwrap_or(num)
                .to_owned(),
            None => q.expr.clone(),
        };
        assert!(
            numerator.ends_with(ZERO),
            "{} / {}: {} gives No data when nothing failed; end it (or its numerator) with `{}`",
            q.dashboard,
            q.panel,
            q.expr,
            ZERO.trim()
        );
    }
    assert!(checked >= 7, "only {checked} error panels found");
}

/// Logs land in Loki, next to the traces: the collector's logs pipeline
/// exports to Loki's OTLP endpoint (the compose service), Loki keeps OTLP
/// structured metadata (trace_id, span_id) with the schema that needs, and
/// Grafana links a span to its logs (Jaeger's tracesToLogsV2 -> Loki, by
/// trace id) and a log line to its trace (Loki's derived field on the
/// trace_id metadata -> Jaeger). Structure only: Loki and Grafana do not
/// run here (no Docker engine).
#[test]
fn logs_go_to_loki_and_link_to_their_traces() {
    // The collector side.
    let collector = yaml("deploy/otel-collector/config.yaml");
    let logs = &collector["service"]["pipelines"]["logs"];
    let exporters = strings(&logs["exporters"]);
    let loki_exporter = exporters
        .iter()
        .find(|e| e.starts_with("otlp_http/") || e.starts_with("otlphttp/"))
        .unwrap_or_else(|| {
            panic!("the logs pipeline exports to no OTLP/HTTP exporter: {exporters:?}")
        });
    let endpoint = compose_value(&str_of(
        &collector["exporters"][loki_exporter.as_str()]["endpoint"],
    ));
    assert_eq!(
        endpoint, "http://loki:3100/otlp",
        "Loki's OTLP endpoint in compose"
    );
    assert!(
        yaml("deploy/otel-collector/builder.yaml")["exporters"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| str_of(&e["gomod"]).contains("/exporter/otlphttpexporter ")),
        "builder.yaml has no otlphttpexporter (the CI collector could not export logs)"
    );

    // Loki itself.
    let c = compose();
    let loki = service(&c, "loki");
    let target = mount_target(&c, "loki", "deploy/loki/config.yaml");
    assert!(
        strings(&loki["command"]).contains(&format!("-config.file={target}")),
        "loki runs the mounted config"
    );
    let ports = published_ports(loki);
    assert!(
        ports.iter().any(|(_, _, container)| container == "3100"),
        "Loki's API is published: {ports:?}"
    );
    let config = yaml("deploy/loki/config.yaml");
    assert_eq!(config["server"]["http_listen_port"].as_u64(), Some(3100));
    assert_eq!(
        config["limits_config"]["allow_structured_metadata"].as_bool(),
        Some(true)
    );
    let schema = config["schema_config"]["configs"]
        .as_sequence()
        .unwrap()
        .last()
        .unwrap();
    assert_eq!(
        str_of(&schema["schema"]),
        "v13",
        "OTLP ingestion needs schema v13"
    );
    assert_eq!(str_of(&schema["store"]), "tsdb", "and the tsdb index");

    // Grafana's links.
    let sources = yaml("deploy/grafana/provisioning/datasources/datasources.yaml");
    let by_uid: BTreeMap<String, Yaml> = sources["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|d| (str_of(&d["uid"]), d.clone()))
        .collect();
    let loki_source = &by_uid["loki"];
    assert_eq!(str_of(&loki_source["type"]), "loki");
    assert_eq!(str_of(&loki_source["url"]), "http://loki:3100");
    let derived = loki_source["jsonData"]["derivedFields"]
        .as_sequence()
        .expect("Loki derivedFields");
    assert!(
        derived
            .iter()
            .any(|f| str_of(&f["datasourceUid"]) == "jaeger"
            && str_of(&f["matcherType"]) == "label"
            && str_of(&f["matcherRegex"]) == "trace_id"
            // `$$` is a literal `$` in provisioning files.
            && str_of(&f["url"]) == "$${__value.raw}"),
        "a Loki line's trace_id links to Jaeger: {derived:?}"
    );
    let to_logs = &by_uid["jaeger"]["jsonData"]["tracesToLogsV2"];
    assert_eq!(str_of(&to_logs["datasourceUid"]), "loki");
    let query = str_of(&to_logs["query"]);
    assert!(
        query.contains("trace_id=\"$${__trace.traceId}\""),
        "a span's logs are found by its trace id: {query}"
    );
}

/// The alert rules' unit tests (`deploy/prometheus/alerts_test.yml`: each
/// alert fires on its series with its annotations, and stays silent on
/// healthy ones), with Debian's promtool 2.42 and Prometheus 3.16's.
#[test]
fn alert_rules_pass_their_unit_tests_on_prometheus_2_and_3() {
    let tests = root().join("deploy/prometheus/alerts_test.yml");
    for promtool in [PathBuf::from("promtool"), tools::tool("promtool3")] {
        let out = std::process::Command::new(&promtool)
            .args(["test", "rules"])
            .arg(&tests)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}: run `bash .ci/deps.sh --all` (installs Debian's prometheus, builds Prometheus 3)",
                    promtool.display()
                )
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("SUCCESS"),
            "{} test rules:\n{text}",
            promtool.display()
        );
    }
}

/// Every alert the rules define has unit tests that make it fire and keep
/// it silent, and a runbook-style description.
#[test]
fn every_alert_is_tested_firing_and_silent() {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let tests = yaml("deploy/prometheus/alerts_test.yml");
    let mut fired = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for group in tests["tests"].as_sequence().unwrap() {
        for case in group["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = str_of(&case["alertname"]);
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected > 0 {
                fired.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule.get("alert").map(str_of) else {
                continue;
            };
            alerts += 1;
            assert!(fired.contains(&name), "no test makes {name} fire");
            assert!(silent.contains(&name), "no test keeps {name} silent");
            let description = str_of(&rule["annotations"]["description"]);
            assert!(
                description.contains("Runbook:"),
                "{name}: the description says what to do (Runbook: ...)"
            );
        }
    }
    assert!(alerts >= 10, "{alerts} alerts");
}

/// The rules query only what the plugin emits, Prometheus's own `up`, and
/// the recording rules they define.
#[test]
fn alert_rules_use_only_metrics_that_exist() {
    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut known = plugin_series();
    known.insert("up".to_owned());
    let all: Vec<&Yaml> = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .collect();
    for rule in &all {
        if let Some(record) = rule.get("record") {
            known.insert(str_of(record));
        }
    }
    let mut checked = 0;
    for rule in all {
        let expr = str_of(&rule["expr"]);
        for name in dashboards::metric_names_in_expr(&expr) {
            assert!(known.contains(&name), "unknown metric {name} in `{expr}`");
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} metric references found");
}

/// Alertmanager accepts its config (Debian's amtool).
#[test]
fn amtool_accepts_the_alertmanager_config() {
    let file = root().join("deploy/alertmanager/alertmanager.yml");
    let out = std::process::Command::new("amtool")
        .args(["check-config"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!("amtool: {e}: run `bash .ci/deps.sh --all` (installs Debian's prometheus-alertmanager)")
        });
    assert!(
        out.status.success(),
        "amtool check-config failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------ extractor

fn names(expr: &str) -> Vec<String> {
    dashboards::metric_names_in_expr(expr).into_iter().collect()
}

#[test]
fn extractor_handles_tricky_promql() {
    assert_eq!(names("up"), ["up"]);
    assert_eq!(
        names("ai_team_tasks_in_progress"),
        ["ai_team_tasks_in_progress"]
    );
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, task_type) (rate(ai_team_task_duration_seconds_bucket{task_type=~"write|review"}[$__rate_interval])))"#
        ),
        ["ai_team_task_duration_seconds_bucket"]
    );
    // Aggregation modifier after the operand, label names in by (...).
    assert_eq!(
        names("sum(rate(mindbus_messages_total[5m])) by (agent, kind, outcome)"),
        ["mindbus_messages_total"]
    );
    // Binary operators without spaces, two metrics, $__range.
    assert_eq!(
        names(
            "sum(increase(ai_team_quality_score_sum[$__range]))/sum(increase(ai_team_quality_score_count[$__range]))"
        ),
        ["ai_team_quality_score_count", "ai_team_quality_score_sum"]
    );
    // Label values that look like metrics or keywords, escaped quotes, ${var}.
    assert_eq!(
        names(
            r#"rate(mindbus_messages_total{agent=~"${agent:regex}", kind="sum", outcome!="rate(x)", note="a \"b\" {c}"}[1m])"#
        ),
        ["mindbus_messages_total"]
    );
    // Vector matching with on / group_left, without, offset, bool, numbers.
    assert_eq!(
        names("a_total / on (agent) group_left (model) b_info * 1e-3 > bool 0.5 offset 5m"),
        ["a_total", "b_info"]
    );
    assert_eq!(
        names("sum without (instance, job) (x_total) unless y"),
        ["x_total", "y"]
    );
    // Functions with string arguments, nested subquery with step.
    assert_eq!(
        names(
            r#"label_replace(max_over_time(rate(c_total[1m])[10m:30s]), "dst", "$1", "src", "(.*)")"#
        ),
        ["c_total"]
    );
    // __name__ matcher, recording-rule style names with colons, comments.
    assert_eq!(
        names(
            "{__name__=\"ai_team_tasks_total\", status=\"failed\"} + job:rate:sum # by (x) comment_word"
        ),
        ["ai_team_tasks_total", "job:rate:sum"]
    );
    // Regex __name__ matchers do not name one metric.
    assert!(names(r#"{__name__=~"ai_team_.*"}"#).is_empty());
    // Keywords are case-insensitive; whitespace before ( still makes a call.
    assert_eq!(names("SUM BY (le) (Rate (m_bucket [5m]))"), ["m_bucket"]);
    assert!(names("vector(1) + time()").is_empty());
    assert!(names("").is_empty());
}

#[test]
fn metric_family_strips_one_histogram_suffix() {
    assert_eq!(dashboards::metric_family("x_seconds_bucket"), "x_seconds");
    assert_eq!(dashboards::metric_family("x_seconds_sum"), "x_seconds");
    assert_eq!(dashboards::metric_family("x_seconds_count"), "x_seconds");
    assert_eq!(dashboards::metric_family("x_total"), "x_total");
    assert_eq!(dashboards::metric_family("x_bucket_count"), "x_bucket");
}

#[test]
fn compose_helpers_parse_both_syntaxes() {
    let svc = parse_yaml(
        r#"
ports:
  - "127.0.0.1:80:8080"
  - "9000"
  - "0.0.0.0:53:53/udp"
  - target: 3000
    published: "3001"
    host_ip: 127.0.0.1
environment:
  - A=1
  - B
"#,
        "inline",
    );
    assert_eq!(
        published_ports(&svc),
        [
            ("127.0.0.1".into(), "80".into(), "8080".into()),
            (String::new(), String::new(), "9000".into()),
            ("0.0.0.0".into(), "53".into(), "53".into()),
            ("127.0.0.1".into(), "3001".into(), "3000".into()),
        ]
    );
    let env = environment(&svc);
    assert_eq!(env["A"], "1");
    assert_eq!(env["B"], "");
    assert_eq!(
        interpolated_vars("${A:?x} $B $$C ${D:-d} ${E}"),
        ["A", "B", "D", "E"].map(String::from).into()
    );
    assert_eq!(required_substitution("${X_1:?set it}"), Some("X_1"));
    assert_eq!(required_substitution("${X:-admin}"), None);
    assert_eq!(required_substitution("${X}"), None);
    assert_eq!(required_substitution("${X:?}"), None);
    assert_eq!(required_substitution("admin"), None);
    assert_eq!(
        host_port("otel-collector:8888"),
        Some(("otel-collector", 8888))
    );
    assert_eq!(host_port("http://x:1"), None);
    assert_eq!(host_port("x"), None);
    assert_eq!(host_port("x:0"), None);
}

/// The Agent Performance dashboard answers "how is agent X doing" from the
/// agent's own side: `agent` on the `mindbus_*` metrics is the counting
/// process's agent, so every per-agent query filters on it, the handled
/// COMMANDs are the ones the agent received, and quality is by the agent
/// whose work was reviewed.
#[test]
fn agent_performance_answers_how_an_agent_is_doing() {
    let dashboard =
        dashboards::load_dashboard(&dashboards::dashboards_dir().join("agent-performance.json"));
    let exprs = dashboards::exprs_of(&dashboard);
    let per_agent = [
        "mindbus_messages_total",
        "mindbus_processing_duration_seconds_bucket",
        "mindbus_messages_in_flight",
        "ai_team_quality_score_sum",
        "ai_team_quality_score_count",
        "ai_team_agent_errors_total",
    ];
    for expr in &exprs {
        for metric in per_agent {
            for (at, _) in expr.match_indices(&format!("{metric}{{")) {
                let matchers = &expr[at + metric.len()..];
                let matchers = &matchers[..=matchers.find('}').unwrap()];
                assert!(
                    matchers.contains(r#"agent=~"$agent""#),
                    "{metric} not filtered by the selected agent in: {expr}"
                );
            }
            assert!(
                !expr.contains(&format!("{metric}[")),
                "{metric} without the agent filter in: {expr}"
            );
        }
    }
    let answers = |what: &str, parts: &[&str]| {
        assert!(
            exprs.iter().any(|e| parts.iter().all(|p| e.contains(p))),
            "no panel shows {what} (a query with {parts:?})"
        );
    };
    answers(
        "the agent's handled COMMANDs by outcome",
        &[
            "by (agent, outcome)",
            "mindbus_messages_total{",
            r#"kind="command", direction="received""#,
        ],
    );
    answers(
        "the agent's processing time",
        &[
            "by (le, agent, kind)",
            "mindbus_processing_duration_seconds_bucket{",
        ],
    );
    answers(
        "the agent's errors by code",
        &["by (agent, code)", "ai_team_agent_errors_total{"],
    );
    answers(
        "the agent's quality",
        &[
            "sum by (agent) (increase(ai_team_quality_score_sum{",
            "sum by (agent) (increase(ai_team_quality_score_count{",
        ],
    );
}
