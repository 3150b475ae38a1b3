//! [`Config`]: what to set up, read from the environment and overridden by setters.
//!
//! Every environment variable is parsed by a pure function of a lookup closure, so the
//! parsing is testable without touching the process environment
//! ([`Config::from_lookup`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_sdk::trace::Sampler;

/// The service name used when nothing else names the service.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// Default Prometheus listen address (loopback only).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Default time the [`Telemetry`](crate::Telemetry) guard may spend flushing on shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Wire protocol of an OTLP exporter (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`grpc`), usually on port 4317. The endpoint is used as given.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), usually on port 4318. The
    /// default, as in the OpenTelemetry specification. A base endpoint gets the
    /// signal path (`/v1/traces`, `/v1/logs`) appended.
    #[default]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The specification's name of the protocol: `grpc` or `http/protobuf`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }

    /// Parses a protocol name, case-insensitively. `http/json` is not supported by
    /// this crate and yields `None`, like any unknown name.
    pub fn parse(value: &str) -> Option<OtlpProtocol> {
        let value = value.trim();
        if value.eq_ignore_ascii_case("grpc") {
            Some(OtlpProtocol::Grpc)
        } else if value.eq_ignore_ascii_case("http/protobuf") {
            Some(OtlpProtocol::HttpProtobuf)
        } else {
            None
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Head sampler of the tracer providers (`OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum SamplerConfig {
    /// `always_on`: record and sample every span.
    AlwaysOn,
    /// `always_off`: sample nothing.
    AlwaysOff,
    /// `traceidratio`: sample this fraction (0.0 to 1.0) of traces, by trace id.
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default): follow the parent's decision; sample
    /// every root.
    #[default]
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`: follow the parent's decision; sample no root.
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio`: follow the parent's decision; sample this fraction
    /// of roots.
    ParentBasedTraceIdRatio(f64),
}

impl SamplerConfig {
    /// The SDK sampler this configuration stands for.
    pub fn to_sampler(self) -> Sampler {
        match self {
            SamplerConfig::AlwaysOn => Sampler::AlwaysOn,
            SamplerConfig::AlwaysOff => Sampler::AlwaysOff,
            SamplerConfig::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
            SamplerConfig::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerConfig::ParentBasedAlwaysOff => {
                Sampler::ParentBased(Box::new(Sampler::AlwaysOff))
            }
            SamplerConfig::ParentBasedTraceIdRatio(ratio) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
        }
    }
}

/// Whether the terminal trace view prints finished traces (`MINDBUS_TRACE_VIEW`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum TraceViewMode {
    /// Always on.
    On,
    /// Always off.
    Off,
    /// On when no OTLP traces endpoint is configured (the default): users without a
    /// collector still see their traces.
    #[default]
    Auto,
}

impl TraceViewMode {
    /// Parses `on`/`off`/`auto` (also `true`/`false`/`1`/`0`), case-insensitively.
    pub fn parse(value: &str) -> Option<TraceViewMode> {
        match value.trim().to_ascii_lowercase().as_str() {
            "on" | "true" | "1" | "yes" => Some(TraceViewMode::On),
            "off" | "false" | "0" | "no" | "none" => Some(TraceViewMode::Off),
            "auto" => Some(TraceViewMode::Auto),
            _ => None,
        }
    }
}

/// Where the terminal trace view writes rendered traces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum TraceViewOutput {
    /// Print each rendered trace to standard output (the default).
    #[default]
    Stdout,
    /// Print each rendered trace to standard error.
    Stderr,
    /// Keep rendered traces in memory (at most 1,000, oldest dropped) until
    /// [`Telemetry::take_rendered_traces`](crate::Telemetry::take_rendered_traces)
    /// takes them, so a program can print them itself.
    Capture,
}

/// Format of the log lines (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LogTarget {
    /// Standard error (the default; standard output stays free for program output
    /// and the terminal trace view).
    #[default]
    Stderr,
    /// Standard output.
    Stdout,
}

/// Sizing of the batch span processor (`OTEL_BSP_*`).
///
/// The defaults are sized so that no span is dropped at 30,000 spans/s sustained
/// with a responsive collector: a 65,536-span queue (more than two seconds of
/// spans at that rate), 2,048-span batches and a one-second schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchSettings {
    /// Spans buffered before new ones are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`,
    /// default 65,536).
    pub max_queue_size: usize,
    /// Longest wait before a partial batch is exported (`OTEL_BSP_SCHEDULE_DELAY`,
    /// milliseconds, default 1,000).
    pub scheduled_delay: Duration,
    /// Most spans in one export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default
    /// 2,048; never more than the queue size).
    pub max_export_batch_size: usize,
    /// Longest time one export (retries included) may take before it is abandoned
    /// (`OTEL_BSP_EXPORT_TIMEOUT`, milliseconds, default 3,000). Also used as the
    /// OTLP exporter's own timeout.
    pub export_timeout: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_queue_size: 65_536,
            scheduled_delay: Duration::from_millis(1_000),
            max_export_batch_size: 2_048,
            export_timeout: Duration::from_millis(3_000),
        }
    }
}

impl BatchSettings {
    /// Sets [`max_queue_size`](Self::max_queue_size) (at least 1).
    pub fn with_max_queue_size(mut self, size: usize) -> Self {
        self.max_queue_size = size.max(1);
        self
    }

    /// Sets [`scheduled_delay`](Self::scheduled_delay).
    pub fn with_scheduled_delay(mut self, delay: Duration) -> Self {
        self.scheduled_delay = delay;
        self
    }

    /// Sets [`max_export_batch_size`](Self::max_export_batch_size) (at least 1).
    pub fn with_max_export_batch_size(mut self, size: usize) -> Self {
        self.max_export_batch_size = size.max(1);
        self
    }

    /// Sets [`export_timeout`](Self::export_timeout).
    pub fn with_export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = timeout;
        self
    }
}

/// The resolved destination of one OTLP signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpTarget {
    /// Full URL the exporter sends to (for HTTP, including the signal path).
    pub endpoint: String,
    /// Wire protocol.
    pub protocol: OtlpProtocol,
}

/// The specification's default interval between metric exports.
pub const DEFAULT_METRIC_EXPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Everything [`init`](crate::init) sets up.
///
/// Start from [`Config::from_env`] (or [`Config::new`] for the defaults without
/// looking at the environment), then override with the setters:
///
/// ```
/// use std::time::Duration;
/// use mindbus_telemetry::{Config, TraceViewMode};
///
/// let config = Config::new()
///     .service_name("orchestrator")
///     .metrics(false)
///     .trace_view(TraceViewMode::On)
///     .shutdown_timeout(Duration::from_secs(2));
/// assert_eq!(config.resolved_service_name(), "orchestrator");
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) service_name: Option<String>,
    pub(crate) env_service_name: Option<String>,
    pub(crate) default_service_name: Option<String>,
    pub(crate) resource_attributes: Vec<(String, String)>,
    pub(crate) traces: bool,
    pub(crate) traces_exporter_none: bool,
    pub(crate) otlp_endpoint: Option<String>,
    pub(crate) otlp_traces_endpoint: Option<String>,
    pub(crate) otlp_logs_endpoint: Option<String>,
    pub(crate) otlp_protocol: Option<OtlpProtocol>,
    pub(crate) otlp_traces_protocol: Option<OtlpProtocol>,
    pub(crate) otlp_logs_protocol: Option<OtlpProtocol>,
    pub(crate) sampler: SamplerConfig,
    pub(crate) batch: BatchSettings,
    pub(crate) metrics: bool,
    pub(crate) metrics_addr: Option<SocketAddr>,
    pub(crate) logs: bool,
    pub(crate) log_filter: String,
    pub(crate) log_format: LogFormat,
    pub(crate) log_target: LogTarget,
    pub(crate) otlp_logs: bool,
    pub(crate) trace_view: TraceViewMode,
    pub(crate) trace_view_output: TraceViewOutput,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) install_subscriber: bool,
    pub(crate) dependency_spans: bool,
    pub(crate) service_version: Option<String>,
    pub(crate) otlp_metrics: bool,
    pub(crate) otlp_metrics_endpoint: Option<String>,
    pub(crate) otlp_metrics_protocol: Option<OtlpProtocol>,
    pub(crate) metric_export_interval: Duration,
    pub(crate) install_tracer_provider: bool,
    pub(crate) warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// The defaults, without reading the environment: traces on (no export, since
    /// no endpoint), trace view `auto`, metrics on `127.0.0.1:9464`, text logs at
    /// `info`, no OTLP logs, 5 s shutdown timeout, global subscriber and tracer
    /// provider installed.
    pub fn new() -> Config {
        Config {
            service_name: None,
            env_service_name: None,
            default_service_name: None,
            resource_attributes: Vec::new(),
            traces: true,
            traces_exporter_none: false,
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_logs_endpoint: None,
            otlp_protocol: None,
            otlp_traces_protocol: None,
            otlp_logs_protocol: None,
            sampler: SamplerConfig::default(),
            batch: BatchSettings::default(),
            metrics: true,
            metrics_addr: parse_socket_addr(DEFAULT_METRICS_ADDR),
            logs: true,
            log_filter: "info".to_owned(),
            log_format: LogFormat::Text,
            log_target: LogTarget::Stderr,
            otlp_logs: false,
            trace_view: TraceViewMode::Auto,
            trace_view_output: TraceViewOutput::Stdout,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            install_subscriber: true,
            dependency_spans: false,
            service_version: None,
            otlp_metrics: false,
            otlp_metrics_endpoint: None,
            otlp_metrics_protocol: None,
            metric_export_interval: DEFAULT_METRIC_EXPORT_INTERVAL,
            install_tracer_provider: true,
            warnings: Vec::new(),
        }
    }

    /// The defaults overridden by the process environment (see the
    /// [crate documentation](crate#environment-variables) for the variables).
    /// Invalid values are ignored with a warning, logged by [`init`](crate::init).
    pub fn from_env() -> Config {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env), reading variables through `lookup` instead
    /// of the process environment (for tests, or configuration from another source).
    ///
    /// ```
    /// use mindbus_telemetry::{Config, OtlpProtocol};
    ///
    /// let config = Config::from_lookup(|name| match name {
    ///     "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4318".to_owned()),
    ///     "METRICS_ADDR" => Some("off".to_owned()),
    ///     _ => None,
    /// });
    /// let target = config.traces_target().unwrap();
    /// assert_eq!(target.endpoint, "http://127.0.0.1:4318/v1/traces");
    /// assert_eq!(target.protocol, OtlpProtocol::HttpProtobuf);
    /// assert_eq!(config.metrics_listen_addr(), None);
    /// ```
    pub fn from_lookup<F>(lookup: F) -> Config
    where
        F: Fn(&str) -> Option<String>,
    {
        // Empty values count as unset, as the specification asks.
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let mut config = Config::new();
        let mut warnings = Vec::new();

        config.env_service_name = get("OTEL_SERVICE_NAME").map(|s| s.trim().to_owned());
        if let Some(attributes) = get("OTEL_RESOURCE_ATTRIBUTES") {
            config.resource_attributes = parse_resource_attributes(&attributes);
        }

        config.otlp_endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT").map(|s| s.trim().to_owned());
        config.otlp_traces_endpoint =
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").map(|s| s.trim().to_owned());
        config.otlp_logs_endpoint =
            get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT").map(|s| s.trim().to_owned());
        config.otlp_protocol =
            parse_protocol_var(&get, "OTEL_EXPORTER_OTLP_PROTOCOL", &mut warnings);
        config.otlp_traces_protocol =
            parse_protocol_var(&get, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", &mut warnings);
        config.otlp_logs_protocol =
            parse_protocol_var(&get, "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", &mut warnings);
        config.otlp_metrics_endpoint =
            get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").map(|s| s.trim().to_owned());
        config.otlp_metrics_protocol =
            parse_protocol_var(&get, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", &mut warnings);
        if let Some(value) = get("OTEL_METRICS_EXPORTER") {
            match value.trim().to_ascii_lowercase().as_str() {
                "prometheus" => config.otlp_metrics = false,
                "otlp" => config.otlp_metrics = true,
                "none" => config.metrics = false,
                _ => warnings.push(format!(
                    "OTEL_METRICS_EXPORTER={value:?} is not supported (use prometheus, otlp or none); using prometheus"
                )),
            }
        }
        if let Some(value) = get("OTEL_METRIC_EXPORT_INTERVAL") {
            match value.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => config.metric_export_interval = Duration::from_millis(ms),
                _ => warnings.push(format!(
                    "OTEL_METRIC_EXPORT_INTERVAL={value:?} is not a positive number of milliseconds; using 60000"
                )),
            }
        }

        if let Some(value) = get("OTEL_TRACES_EXPORTER") {
            match parse_exporter_list(&value) {
                Some(enabled) => config.traces_exporter_none = !enabled,
                None => warnings.push(format!(
                    "OTEL_TRACES_EXPORTER={value:?} is not supported (use `otlp` or `none`); using `otlp`"
                )),
            }
        }
        if let Some(value) = get("OTEL_LOGS_EXPORTER") {
            match parse_exporter_list(&value) {
                Some(enabled) => config.otlp_logs = enabled,
                None => warnings.push(format!(
                    "OTEL_LOGS_EXPORTER={value:?} is not supported (use `otlp` or `none`); logs are not exported"
                )),
            }
        }

        let (sampler, warning) = parse_sampler(
            get("OTEL_TRACES_SAMPLER").as_deref(),
            get("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        );
        config.sampler = sampler;
        warnings.extend(warning);

        let (batch, batch_warnings) = parse_batch_settings(&get);
        config.batch = batch;
        warnings.extend(batch_warnings);

        if let Some(value) = get("METRICS_ADDR") {
            match parse_metrics_addr(&value) {
                Ok(addr) => config.metrics_addr = addr,
                Err(warning) => warnings.push(warning),
            }
        }

        if let Some(value) = get("RUST_LOG") {
            config.log_filter = value.trim().to_owned();
        }
        if let Some(value) = get("LOG_FORMAT") {
            match value.trim().to_ascii_lowercase().as_str() {
                "json" => config.log_format = LogFormat::Json,
                "text" | "pretty" | "full" | "compact" => config.log_format = LogFormat::Text,
                _ => warnings.push(format!(
                    "LOG_FORMAT={value:?} is not supported (use `text` or `json`); using text"
                )),
            }
        }

        if let Some(value) = get("MINDBUS_DEPENDENCY_SPANS") {
            match value.trim().to_ascii_lowercase().as_str() {
                "on" | "true" | "1" => config.dependency_spans = true,
                "off" | "false" | "0" => config.dependency_spans = false,
                _ => warnings.push(format!(
                    "MINDBUS_DEPENDENCY_SPANS={value:?} is not supported (use on or off); using off"
                )),
            }
        }

        if let Some(value) = get("MINDBUS_TRACE_VIEW") {
            match TraceViewMode::parse(&value) {
                Some(mode) => config.trace_view = mode,
                None => warnings.push(format!(
                    "MINDBUS_TRACE_VIEW={value:?} is not supported (use on, off or auto); using auto"
                )),
            }
        }

        config.warnings = warnings;
        config
    }

    /// Sets the service name (`service.name` of the main tracer provider), overriding
    /// `OTEL_SERVICE_NAME`.
    pub fn service_name(mut self, name: impl Into<String>) -> Config {
        self.service_name = Some(name.into());
        self
    }

    /// Sets the service name used when neither [`service_name`](Self::service_name),
    /// `OTEL_SERVICE_NAME` nor a `service.name` in `OTEL_RESOURCE_ATTRIBUTES` gives
    /// one (instead of `unknown_service`).
    pub fn default_service_name(mut self, name: impl Into<String>) -> Config {
        self.default_service_name = Some(name.into());
        self
    }

    /// Sets `service.version` on every tracer and logger provider (e.g.
    /// `env!("CARGO_PKG_VERSION")` of the application);
    /// `OTEL_RESOURCE_ATTRIBUTES` can still override it.
    pub fn service_version(mut self, version: impl Into<String>) -> Config {
        self.service_version = Some(version.into());
        self
    }

    /// Adds a resource attribute to every tracer and logger provider (after the ones
    /// from `OTEL_RESOURCE_ATTRIBUTES`; `service.name` is ignored here).
    pub fn resource_attribute(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Config {
        self.resource_attributes.push((key.into(), value.into()));
        self
    }

    /// Turns tracing on or off as a whole (default on). Off: no tracer provider is
    /// installed, no span is recorded, no trace view.
    pub fn traces(mut self, enabled: bool) -> Config {
        self.traces = enabled;
        self
    }

    /// Sets the OTLP base endpoint, like `OTEL_EXPORTER_OTLP_ENDPOINT`: for
    /// `http/protobuf` the signal path (`/v1/traces`) is appended, for `grpc` it is
    /// used as given. Also re-enables trace export if `OTEL_TRACES_EXPORTER=none`.
    pub fn otlp_endpoint(mut self, endpoint: impl Into<String>) -> Config {
        self.otlp_endpoint = Some(endpoint.into());
        self.otlp_traces_endpoint = None;
        self.traces_exporter_none = false;
        self
    }

    /// Sets the full OTLP traces URL, used as given, like
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`. Also re-enables trace export.
    pub fn otlp_traces_endpoint(mut self, endpoint: impl Into<String>) -> Config {
        self.otlp_traces_endpoint = Some(endpoint.into());
        self.traces_exporter_none = false;
        self
    }

    /// Sets the OTLP protocol of every signal, overriding the `*_PROTOCOL` variables.
    pub fn otlp_protocol(mut self, protocol: OtlpProtocol) -> Config {
        self.otlp_protocol = Some(protocol);
        self.otlp_traces_protocol = None;
        self.otlp_logs_protocol = None;
        self
    }

    /// Turns OTLP trace export off even when an endpoint is configured (like
    /// `OTEL_TRACES_EXPORTER=none`), or back on.
    pub fn export_traces(mut self, enabled: bool) -> Config {
        self.traces_exporter_none = !enabled;
        self
    }

    /// Sets the sampler, overriding `OTEL_TRACES_SAMPLER`.
    pub fn sampler(mut self, sampler: SamplerConfig) -> Config {
        self.sampler = sampler;
        self
    }

    /// Sets the batch span processor sizing, overriding `OTEL_BSP_*`.
    pub fn batch(mut self, batch: BatchSettings) -> Config {
        self.batch = batch;
        self
    }

    /// Turns the Prometheus recorder and listener on or off (default on).
    pub fn metrics(mut self, enabled: bool) -> Config {
        self.metrics = enabled;
        self
    }

    /// Sets the Prometheus listen address (port 0 picks a free port, see
    /// [`Telemetry::metrics_addr`](crate::Telemetry::metrics_addr)); `None` keeps
    /// the recorder but opens no listener. Overrides `METRICS_ADDR`.
    pub fn metrics_addr(mut self, addr: Option<SocketAddr>) -> Config {
        self.metrics_addr = addr;
        self
    }

    /// Turns the log output (the fmt layer) on or off (default on).
    pub fn logs(mut self, enabled: bool) -> Config {
        self.logs = enabled;
        self
    }

    /// Sets the log filter directives (`EnvFilter` syntax), overriding `RUST_LOG`.
    pub fn log_filter(mut self, directives: impl Into<String>) -> Config {
        self.log_filter = directives.into();
        self
    }

    /// Sets the log format, overriding `LOG_FORMAT`.
    pub fn log_format(mut self, format: LogFormat) -> Config {
        self.log_format = format;
        self
    }

    /// Sets where log lines go (default standard error).
    pub fn log_target(mut self, target: LogTarget) -> Config {
        self.log_target = target;
        self
    }

    /// Turns OTLP log export on or off (default off; `OTEL_LOGS_EXPORTER=otlp` turns
    /// it on).
    pub fn otlp_logs(mut self, enabled: bool) -> Config {
        self.otlp_logs = enabled;
        self
    }

    /// Sets the terminal trace view mode, overriding `MINDBUS_TRACE_VIEW`.
    pub fn trace_view(mut self, mode: TraceViewMode) -> Config {
        self.trace_view = mode;
        self
    }

    /// Sets where the terminal trace view writes (default standard output).
    pub fn trace_view_output(mut self, output: TraceViewOutput) -> Config {
        self.trace_view_output = output;
        self
    }

    /// Sets how long the guard may spend flushing and shutting down (default 5 s).
    /// The export timeout is capped to it.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Config {
        self.shutdown_timeout = timeout;
        self
    }

    /// Whether the `tracing` spans of the crates in
    /// [`DEPENDENCY_SPAN_TARGETS`](crate::DEPENDENCY_SPAN_TARGETS) (lapin's
    /// `io_loop`, h2, tonic, hyper, ...) become OpenTelemetry spans too
    /// (default no: they would show up as traces of their own, under the
    /// process's service, beside the ones the user cares about). Also
    /// `MINDBUS_DEPENDENCY_SPANS=on`. Their log events are not affected.
    pub fn dependency_spans(mut self, bridged: bool) -> Config {
        self.dependency_spans = bridged;
        self
    }

    /// Whether [`init`](crate::init) installs the global `tracing` subscriber
    /// (default yes).
    pub fn install_subscriber(mut self, install: bool) -> Config {
        self.install_subscriber = install;
        self
    }

    /// Whether [`init`](crate::init) installs the main tracer provider as the global
    /// OpenTelemetry tracer provider, with the W3C trace-context propagator (default
    /// yes).
    pub fn install_tracer_provider(mut self, install: bool) -> Config {
        self.install_tracer_provider = install;
        self
    }

    /// The service name the main tracer provider will have: the
    /// [`service_name`](Self::service_name) setter, else `OTEL_SERVICE_NAME`, else
    /// `service.name` from `OTEL_RESOURCE_ATTRIBUTES`, else
    /// [`default_service_name`](Self::default_service_name), else `unknown_service`.
    pub fn resolved_service_name(&self) -> &str {
        self.service_name
            .as_deref()
            .or(self.env_service_name.as_deref())
            .or_else(|| {
                self.resource_attributes
                    .iter()
                    .find(|(key, _)| key == "service.name")
                    .map(|(_, value)| value.as_str())
            })
            .or(self.default_service_name.as_deref())
            .unwrap_or(UNKNOWN_SERVICE)
    }

    /// Where traces will be exported, or `None` when they will not be (tracing off,
    /// `OTEL_TRACES_EXPORTER=none`, or no endpoint configured).
    pub fn traces_target(&self) -> Option<OtlpTarget> {
        if !self.traces || self.traces_exporter_none {
            return None;
        }
        resolve_target(
            self.otlp_traces_endpoint.as_deref(),
            self.otlp_endpoint.as_deref(),
            self.otlp_traces_protocol.or(self.otlp_protocol),
            "/v1/traces",
        )
    }

    /// Where metrics will be pushed, or `None` when they are pulled from the
    /// Prometheus endpoint instead (the default), off, or no endpoint is
    /// configured.
    pub fn metrics_target(&self) -> Option<OtlpTarget> {
        if !self.metrics || !self.otlp_metrics {
            return None;
        }
        resolve_target(
            self.otlp_metrics_endpoint.as_deref(),
            self.otlp_endpoint.as_deref(),
            self.otlp_metrics_protocol.or(self.otlp_protocol),
            "/v1/metrics",
        )
    }

    /// Pushes metrics by OTLP instead of serving them for Prometheus
    /// (default no; also `OTEL_METRICS_EXPORTER=otlp`), to the endpoint of
    /// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`, else the base endpoint. The
    /// names stay those of the Prometheus endpoint: a collector's
    /// Prometheus exporter shows the same series.
    pub fn otlp_metrics(mut self, enabled: bool) -> Config {
        self.otlp_metrics = enabled;
        self
    }

    /// How often pushed metrics are exported (default 60 s; also
    /// `OTEL_METRIC_EXPORT_INTERVAL`, in milliseconds).
    pub fn metric_export_interval(mut self, interval: Duration) -> Config {
        self.metric_export_interval = interval;
        self
    }

    /// Where logs will be exported, or `None` when they will not be (OTLP logs off
    /// or no endpoint configured).
    pub fn logs_target(&self) -> Option<OtlpTarget> {
        if !self.otlp_logs {
            return None;
        }
        resolve_target(
            self.otlp_logs_endpoint.as_deref(),
            self.otlp_endpoint.as_deref(),
            self.otlp_logs_protocol.or(self.otlp_protocol),
            "/v1/logs",
        )
    }

    /// Whether the terminal trace view will be on (mode `auto`: when traces are on
    /// and not exported).
    pub fn trace_view_enabled(&self) -> bool {
        if !self.traces {
            return false;
        }
        match self.trace_view {
            TraceViewMode::On => true,
            TraceViewMode::Off => false,
            TraceViewMode::Auto => self.traces_target().is_none(),
        }
    }

    /// The Prometheus listen address, or `None` when metrics are off or no listener
    /// is wanted.
    pub fn metrics_listen_addr(&self) -> Option<SocketAddr> {
        if self.metrics && !self.otlp_metrics {
            self.metrics_addr
        } else {
            None
        }
    }

    /// The sampler that will be used.
    pub fn sampler_config(&self) -> SamplerConfig {
        self.sampler
    }

    /// The batch span processor sizing that will be used (export timeout capped to
    /// the shutdown timeout).
    pub fn batch_settings(&self) -> BatchSettings {
        let mut batch = self.batch;
        batch.max_export_batch_size = batch.max_export_batch_size.min(batch.max_queue_size);
        if !self.shutdown_timeout.is_zero() {
            batch.export_timeout = batch.export_timeout.min(self.shutdown_timeout);
        }
        batch
    }

    /// The log format that will be used.
    pub fn log_format_config(&self) -> LogFormat {
        self.log_format
    }

    /// The log filter directives that will be used.
    pub fn log_filter_directives(&self) -> &str {
        &self.log_filter
    }

    /// Problems found while reading the environment (invalid values that were
    /// ignored). [`init`](crate::init) logs each one as a warning.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The resource attributes other than `service.name`, in order.
    pub(crate) fn extra_resource_attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        // Later duplicates win when the resource is built.
        self.resource_attributes
            .iter()
            .filter(|(key, _)| key != "service.name")
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }
}

fn parse_protocol_var<G>(get: &G, name: &str, warnings: &mut Vec<String>) -> Option<OtlpProtocol>
where
    G: Fn(&str) -> Option<String>,
{
    let value = get(name)?;
    let protocol = OtlpProtocol::parse(&value);
    if protocol.is_none() {
        warnings.push(format!(
            "{name}={value:?} is not supported (use `grpc` or `http/protobuf`); ignored"
        ));
    }
    protocol
}

/// Parses `OTEL_*_EXPORTER`: `Some(true)` when the list names `otlp`, `Some(false)`
/// for `none`, `None` when it names only unsupported exporters.
pub(crate) fn parse_exporter_list(value: &str) -> Option<bool> {
    let mut any_none = false;
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item.eq_ignore_ascii_case("otlp") {
            return Some(true);
        }
        if item.eq_ignore_ascii_case("none") {
            any_none = true;
        }
    }
    if any_none { Some(false) } else { None }
}

/// Resolves a signal's OTLP target: the signal endpoint as given, else the base
/// endpoint (plus `signal_path` for HTTP), with the protocol (default
/// `http/protobuf`). `None` when no endpoint is configured.
pub(crate) fn resolve_target(
    signal_endpoint: Option<&str>,
    base_endpoint: Option<&str>,
    protocol: Option<OtlpProtocol>,
    signal_path: &str,
) -> Option<OtlpTarget> {
    let protocol = protocol.unwrap_or_default();
    let signal_endpoint = signal_endpoint.map(str::trim).filter(|s| !s.is_empty());
    let base_endpoint = base_endpoint.map(str::trim).filter(|s| !s.is_empty());
    let endpoint = match (signal_endpoint, base_endpoint) {
        (Some(endpoint), _) => endpoint.to_owned(),
        (None, Some(base)) => match protocol {
            OtlpProtocol::Grpc => base.to_owned(),
            OtlpProtocol::HttpProtobuf => {
                format!("{}{}", base.trim_end_matches('/'), signal_path)
            }
        },
        (None, None) => return None,
    };
    Some(OtlpTarget { endpoint, protocol })
}

/// Parses `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. Unknown samplers fall
/// back to `parentbased_always_on`, invalid ratios to 1.0; each with a warning.
pub(crate) fn parse_sampler(
    name: Option<&str>,
    arg: Option<&str>,
) -> (SamplerConfig, Option<String>) {
    let Some(name) = name.map(str::trim).filter(|s| !s.is_empty()) else {
        return (SamplerConfig::default(), None);
    };
    let ratio = || -> (f64, Option<String>) {
        match arg.map(str::trim).filter(|s| !s.is_empty()) {
            None => (1.0, None),
            Some(text) => match text.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => (ratio, None),
                _ => (
                    1.0,
                    Some(format!(
                        "OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio between 0 and 1; using 1.0"
                    )),
                ),
            },
        }
    };
    match name.to_ascii_lowercase().as_str() {
        "always_on" => (SamplerConfig::AlwaysOn, None),
        "always_off" => (SamplerConfig::AlwaysOff, None),
        "traceidratio" => {
            let (ratio, warning) = ratio();
            (SamplerConfig::TraceIdRatio(ratio), warning)
        }
        "parentbased_always_on" => (SamplerConfig::ParentBasedAlwaysOn, None),
        "parentbased_always_off" => (SamplerConfig::ParentBasedAlwaysOff, None),
        "parentbased_traceidratio" => {
            let (ratio, warning) = ratio();
            (SamplerConfig::ParentBasedTraceIdRatio(ratio), warning)
        }
        _ => (
            SamplerConfig::default(),
            Some(format!(
                "OTEL_TRACES_SAMPLER={name:?} is not supported; using parentbased_always_on"
            )),
        ),
    }
}

/// Parses the `OTEL_BSP_*` variables over [`BatchSettings::default`].
pub(crate) fn parse_batch_settings<G>(get: &G) -> (BatchSettings, Vec<String>)
where
    G: Fn(&str) -> Option<String>,
{
    let mut batch = BatchSettings::default();
    let mut warnings = Vec::new();
    let mut number = |name: &str| -> Option<u64> {
        let value = get(name)?;
        match value.trim().parse::<u64>() {
            Ok(number) if number > 0 => Some(number),
            _ => {
                warnings.push(format!(
                    "{name}={value:?} is not a positive integer; ignored"
                ));
                None
            }
        }
    };
    if let Some(size) = number("OTEL_BSP_MAX_QUEUE_SIZE") {
        batch.max_queue_size = usize::try_from(size).unwrap_or(usize::MAX);
    }
    if let Some(millis) = number("OTEL_BSP_SCHEDULE_DELAY") {
        batch.scheduled_delay = Duration::from_millis(millis);
    }
    if let Some(size) = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        batch.max_export_batch_size = usize::try_from(size).unwrap_or(usize::MAX);
    }
    if let Some(millis) = number("OTEL_BSP_EXPORT_TIMEOUT") {
        batch.export_timeout = Duration::from_millis(millis);
    }
    batch.max_export_batch_size = batch.max_export_batch_size.min(batch.max_queue_size);
    (batch, warnings)
}

fn parse_socket_addr(value: &str) -> Option<SocketAddr> {
    value.parse().ok()
}

/// Parses `METRICS_ADDR`: `off`/`none`/`false`/`0` disable the listener (`Ok(None)`);
/// `host:port` or `[v6]:port` listen there; a bare `:port` or port number listens
/// on `127.0.0.1` (never on all interfaces unless `0.0.0.0` is written out).
pub(crate) fn parse_metrics_addr(value: &str) -> Result<Option<SocketAddr>, String> {
    let text = value.trim();
    let lower = text.to_ascii_lowercase();
    if matches!(lower.as_str(), "off" | "none" | "false" | "disabled" | "no") {
        return Ok(None);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    let port_text = text.strip_prefix(':').unwrap_or(text);
    if let Ok(port) = port_text.parse::<u16>() {
        return Ok(Some(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    if let Some(port) = lower
        .strip_prefix("localhost:")
        .and_then(|port| port.parse::<u16>().ok())
    {
        return Ok(Some(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    Err(format!(
        "METRICS_ADDR={value:?} is not an address like 127.0.0.1:9464 (or `off`); using {DEFAULT_METRICS_ADDR}"
    ))
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`key=value,key2=value2`, values
/// percent-encoded). Malformed entries are skipped.
pub(crate) fn parse_resource_attributes(value: &str) -> Vec<(String, String)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in value.split(',') {
        let Some((key, val)) = entry.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() {
            continue;
        }
        let val = percent_decode(val.trim()).unwrap_or_else(|| val.trim().to_owned());
        match seen.get(key) {
            Some(&index) => out[index].1 = val,
            None => {
                seen.insert(key.to_owned(), out.len());
                out.push((key.to_owned(), val));
            }
        }
    }
    out
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn sampler_names_and_args() {
        assert_eq!(
            parse_sampler(None, None),
            (SamplerConfig::ParentBasedAlwaysOn, None)
        );
        assert_eq!(
            parse_sampler(Some("always_on"), None).0,
            SamplerConfig::AlwaysOn
        );
        assert_eq!(
            parse_sampler(Some("ALWAYS_OFF"), None).0,
            SamplerConfig::AlwaysOff
        );
        assert_eq!(
            parse_sampler(Some("traceidratio"), Some("0.25")),
            (SamplerConfig::TraceIdRatio(0.25), None)
        );
        assert_eq!(
            parse_sampler(Some("traceidratio"), None),
            (SamplerConfig::TraceIdRatio(1.0), None)
        );
        assert_eq!(
            parse_sampler(Some("parentbased_always_off"), None).0,
            SamplerConfig::ParentBasedAlwaysOff
        );
        assert_eq!(
            parse_sampler(Some("parentbased_traceidratio"), Some(" 0.5 ")).0,
            SamplerConfig::ParentBasedTraceIdRatio(0.5)
        );
        assert_eq!(
            parse_sampler(Some("parentbased_always_on"), None).0,
            SamplerConfig::ParentBasedAlwaysOn
        );
    }

    #[test]
    fn invalid_sampler_values_fall_back_with_a_warning() {
        let (sampler, warning) = parse_sampler(Some("sometimes"), None);
        assert_eq!(sampler, SamplerConfig::ParentBasedAlwaysOn);
        assert!(warning.unwrap().contains("sometimes"));

        for bad in ["abc", "1.5", "-0.1", "NaN"] {
            let (sampler, warning) = parse_sampler(Some("traceidratio"), Some(bad));
            assert_eq!(sampler, SamplerConfig::TraceIdRatio(1.0), "{bad}");
            assert!(warning.is_some(), "{bad}");
        }
        // Every configuration converts to an SDK sampler without panicking.
        for config in [
            SamplerConfig::AlwaysOn,
            SamplerConfig::AlwaysOff,
            SamplerConfig::TraceIdRatio(0.1),
            SamplerConfig::ParentBasedAlwaysOn,
            SamplerConfig::ParentBasedAlwaysOff,
            SamplerConfig::ParentBasedTraceIdRatio(0.3),
        ] {
            let _ = config.to_sampler();
        }
    }

    #[test]
    fn protocol_names() {
        assert_eq!(OtlpProtocol::parse("grpc"), Some(OtlpProtocol::Grpc));
        assert_eq!(OtlpProtocol::parse("GRPC"), Some(OtlpProtocol::Grpc));
        assert_eq!(
            OtlpProtocol::parse("http/protobuf"),
            Some(OtlpProtocol::HttpProtobuf)
        );
        assert_eq!(
            OtlpProtocol::parse("HTTP/PROTOBUF"),
            Some(OtlpProtocol::HttpProtobuf)
        );
        assert_eq!(OtlpProtocol::parse("http/json"), None);
        assert_eq!(OtlpProtocol::parse("tcp"), None);

        let config =
            Config::from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")]));
        assert_eq!(config.warnings().len(), 1);
        assert!(config.warnings()[0].contains("carrier-pigeon"));
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let config = Config::from_lookup(lookup(&[]));
        assert_eq!(config.traces_target(), None);
        assert!(
            config.trace_view_enabled(),
            "auto view is on without a collector"
        );
        assert!(config.warnings().is_empty());
    }

    #[test]
    fn endpoint_resolution() {
        // Base endpoint + HTTP (the default protocol): the signal path is appended.
        let config = Config::from_lookup(lookup(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318/",
        )]));
        let target = config.traces_target().unwrap();
        assert_eq!(target.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(target.protocol, OtlpProtocol::HttpProtobuf);
        assert!(
            !config.trace_view_enabled(),
            "auto view is off with a collector"
        );

        // Base endpoint + gRPC: used as given.
        let config = Config::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]));
        let target = config.traces_target().unwrap();
        assert_eq!(target.endpoint, "http://127.0.0.1:4317");
        assert_eq!(target.protocol, OtlpProtocol::Grpc);

        // The traces endpoint wins and is used as given; the traces protocol wins.
        let config = Config::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://127.0.0.1:9999/custom",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]));
        let target = config.traces_target().unwrap();
        assert_eq!(target.endpoint, "http://127.0.0.1:9999/custom");
        assert_eq!(target.protocol, OtlpProtocol::HttpProtobuf);

        // Empty values count as unset.
        let config = Config::from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]));
        assert_eq!(config.traces_target(), None);

        // OTEL_TRACES_EXPORTER=none disables export.
        let config = Config::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ]));
        assert_eq!(config.traces_target(), None);
        assert!(config.trace_view_enabled());
        // ... unless a setter asks for it again.
        assert!(config.export_traces(true).traces_target().is_some());

        // Logs: opt-in, own endpoint and path.
        let config = Config::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_LOGS_EXPORTER", "otlp"),
        ]));
        assert_eq!(
            config.logs_target().unwrap().endpoint,
            "http://127.0.0.1:4318/v1/logs"
        );
        let config = Config::from_lookup(lookup(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318",
        )]));
        assert_eq!(config.logs_target(), None);
    }

    #[test]
    fn setters_override_the_environment() {
        let config = Config::from_lookup(lookup(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("MINDBUS_TRACE_VIEW", "off"),
        ]))
        .otlp_protocol(OtlpProtocol::Grpc)
        .otlp_endpoint("http://127.0.0.1:4317")
        .service_name("orchestrator")
        .trace_view(TraceViewMode::On);
        assert_eq!(
            config.traces_target().unwrap().endpoint,
            "http://127.0.0.1:4317"
        );
        assert_eq!(config.resolved_service_name(), "orchestrator");
        assert!(config.trace_view_enabled());
        assert!(!config.traces(false).trace_view_enabled());
    }

    #[test]
    fn service_name_precedence() {
        let config = Config::from_lookup(lookup(&[]));
        assert_eq!(config.resolved_service_name(), "unknown_service");
        let config = config.default_service_name("fallback");
        assert_eq!(config.resolved_service_name(), "fallback");
        let config = Config::from_lookup(lookup(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=from-attrs,deployment.environment=dev",
        )]))
        .default_service_name("fallback");
        assert_eq!(config.resolved_service_name(), "from-attrs");
        let config = Config::from_lookup(lookup(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "from-env"),
        ]));
        assert_eq!(config.resolved_service_name(), "from-env");
        assert_eq!(config.service_name("set").resolved_service_name(), "set");
    }

    #[test]
    fn metrics_exporter_choices() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            Config::from_lookup(move |name| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        let pull = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]);
        assert_eq!(pull.metrics_target(), None, "pulled by default");
        assert!(pull.metrics_listen_addr().is_some());

        let push = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_METRICS_EXPORTER", "otlp"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ]);
        let target = push.metrics_target().unwrap();
        assert_eq!(target.endpoint, "http://127.0.0.1:4318/v1/metrics");
        assert_eq!(
            push.metrics_listen_addr(),
            None,
            "no pull endpoint when pushing"
        );
        assert_eq!(push.metric_export_interval, Duration::from_millis(500));

        let grpc = env(&[
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://127.0.0.1:4317",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc"),
            ("OTEL_METRICS_EXPORTER", "otlp"),
        ]);
        assert_eq!(grpc.metrics_target().unwrap().protocol, OtlpProtocol::Grpc);

        let off = env(&[("OTEL_METRICS_EXPORTER", "none")]);
        assert!(off.metrics_target().is_none() && off.metrics_listen_addr().is_none());

        let odd = env(&[
            ("OTEL_METRICS_EXPORTER", "statsd"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ]);
        assert_eq!(odd.warnings.len(), 2, "{:?}", odd.warnings);
        assert!(odd.metrics_listen_addr().is_some(), "falls back to pull");
    }

    #[test]
    fn resource_attributes_are_parsed_and_decoded() {
        let attrs = parse_resource_attributes("a=1, b = two%20words ,bad,=x,a=3,c=%ZZ");
        assert_eq!(
            attrs,
            vec![
                ("a".to_owned(), "3".to_owned()),
                ("b".to_owned(), "two words".to_owned()),
                ("c".to_owned(), "%ZZ".to_owned()),
            ]
        );
    }

    #[test]
    fn metrics_addr_values() {
        assert_eq!(parse_metrics_addr("off"), Ok(None));
        assert_eq!(parse_metrics_addr("NONE"), Ok(None));
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9000"),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9000))))
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9464"),
            Ok(Some(SocketAddr::from(([0, 0, 0, 0], 9464))))
        );
        assert_eq!(
            parse_metrics_addr(":9100"),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9100))))
        );
        assert_eq!(
            parse_metrics_addr("9100"),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 9100))))
        );
        assert_eq!(
            parse_metrics_addr("localhost:0"),
            Ok(Some(SocketAddr::from(([127, 0, 0, 1], 0))))
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9464"),
            Ok(Some("[::1]:9464".parse().unwrap()))
        );
        assert!(parse_metrics_addr("not an address").is_err());

        // The default never binds all interfaces.
        let config = Config::from_lookup(lookup(&[]));
        let addr = config.metrics_listen_addr().unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 9464);

        // Invalid: warning, default kept.
        let config = Config::from_lookup(lookup(&[("METRICS_ADDR", "nope")]));
        assert_eq!(config.metrics_listen_addr(), Some(addr));
        assert_eq!(config.warnings().len(), 1);
        let config = Config::from_lookup(lookup(&[("METRICS_ADDR", "off")]));
        assert_eq!(config.metrics_listen_addr(), None);
    }

    #[test]
    fn batch_settings_from_env() {
        let (batch, warnings) = parse_batch_settings(&lookup(&[]));
        assert_eq!(batch, BatchSettings::default());
        assert_eq!(batch.max_queue_size, 65_536);
        assert!(warnings.is_empty());

        let (batch, warnings) = parse_batch_settings(&lookup(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "1000"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5000"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "1500"),
        ]));
        assert!(warnings.is_empty());
        assert_eq!(batch.max_queue_size, 1000);
        assert_eq!(batch.scheduled_delay, Duration::from_millis(250));
        assert_eq!(
            batch.max_export_batch_size, 1000,
            "capped to the queue size"
        );
        assert_eq!(batch.export_timeout, Duration::from_millis(1500));

        let (batch, warnings) = parse_batch_settings(&lookup(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
            ("OTEL_BSP_EXPORT_TIMEOUT", "0"),
        ]));
        assert_eq!(batch, BatchSettings::default());
        assert_eq!(warnings.len(), 2);

        // The export timeout never exceeds the shutdown timeout.
        let config = Config::new().shutdown_timeout(Duration::from_secs(1));
        assert_eq!(
            config.batch_settings().export_timeout,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn exporter_lists_and_misc() {
        assert_eq!(parse_exporter_list("otlp"), Some(true));
        assert_eq!(parse_exporter_list("none"), Some(false));
        assert_eq!(parse_exporter_list("console,otlp"), Some(true));
        assert_eq!(parse_exporter_list("zipkin"), None);

        let config = Config::from_lookup(lookup(&[
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "debug,hyper=off"),
            ("MINDBUS_TRACE_VIEW", "maybe"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ]));
        assert_eq!(config.log_format_config(), LogFormat::Json);
        assert_eq!(config.log_filter_directives(), "debug,hyper=off");
        assert_eq!(config.warnings().len(), 2);
        assert_eq!(TraceViewMode::parse("AUTO"), Some(TraceViewMode::Auto));
    }
}
