//! Throughput and client-CPU overhead of mindbus-otel against plain lapin, on
//! a real RabbitMQ (default `amqp://guest:guest@127.0.0.1:5672/%2f`,
//! `MINDBUS_URL` or `--url` override).
//!
//! ```text
//! cargo run --release --example bench                       # the matrix: 4 modes x 5 variants, 5 rounds, medians
//! cargo run --release --example bench -- --messages 2000 --rounds 2
//! cargo run --release --example bench -- --soak             # 1,000,000 messages through the full chain, RSS
//! cargo run --release --example bench -- --rate 30000       # 5 s at 30k msg/s, spans ended/exported/dropped
//! cargo run --release --example bench -- --help
//! ```
//!
//! Variants (interleaved within each round, order rotated every round):
//! `raw` (plain lapin), `raw+headers` (plain lapin plus the W3C
//! `traceparent` header the plugin adds), `traced` (TracedChannel with
//! TraceContext, MessagingSpans, AgentMetrics, TaskMetrics; AlwaysOn sampler,
//! the SDK's stock batch span processor, an exporter that discards),
//! `traced-unsampled` (the same, AlwaysOff) and `traced-collector-down` (the
//! same chain, spans through mindbus-telemetry's OTLP/gRPC exporter and batch
//! settings to a 127.0.0.1 port where nothing listens). Metrics go to a real
//! Prometheus recorder in every variant.
//!
//! Every queue is exclusive (the broker drops it when the connection closes,
//! even after a crash), uniquely named and deleted at the end.

use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mindbus_otel::lapin::{
    self, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use mindbus_otel::{AgentMetrics, MessagingSpans, TaskMetrics, TraceContext, TracedChannel};
use mindbus_telemetry::{Config, Telemetry, TraceViewMode};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const USAGE: &str = "\
usage: cargo run --release --example bench -- [options]

  --url URL               broker (default $MINDBUS_URL, else amqp://guest:guest@127.0.0.1:5672/%2f)
  --messages N            messages per variant per round (default 20000)
  --rounds R              measured rounds (default 5); medians are reported
  --warmup-messages N     one unreported warm-up round of N messages per mode and variant (default 2000, 0 = none)
  --modes a,b,...         publish-pipelined, publish-serial, publish-confirms, consume (default: all four)
  --variants a,b,...      raw, raw+headers, traced, traced-unsampled, traced-collector-down (default: all five)
  --window N              in-flight publishes / outstanding confirms (default 64)
  --prefetch N            consumer prefetch (default 256)
  --timeout SECS          limit for one measurement, prefill and checks included (default 300)
  --verbose               also print every round's values

  --soak                  instead of the matrix: publish pipelined and consume concurrently through the full chain
  --soak-messages N       messages in the soak (default 1000000); RSS is printed every N/10 (at most 100000)
  --soak-variant V        variant for the soak (default traced)
  --soak-ahead N          most messages published but not yet consumed (default 10000)

  --rate N                instead of the matrix: publish N msg/s through the full chain with mindbus-telemetry's
                          default batch settings, and report spans ended/exported/dropped
  --rate-seconds S        how long (default 5)
  --rate-collector C      testkit (an in-process OTLP/gRPC receiver on 127.0.0.1, default) or down (closed port)
  --rate-consume          also consume (and ack) through the full chain, concurrently: two spans per message
";

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("bench: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench: error: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run(opts) => result,
            () = interrupted() => Err(BoxError::from(
                "interrupted; the broker drops this run's exclusive queues with the connection",
            )),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ---------------------------------------------------------------- options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    PublishPipelined,
    PublishSerial,
    PublishConfirms,
    Consume,
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::PublishPipelined,
        Mode::PublishSerial,
        Mode::PublishConfirms,
        Mode::Consume,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::PublishPipelined => "publish-pipelined",
            Mode::PublishSerial => "publish-serial",
            Mode::PublishConfirms => "publish-confirms",
            Mode::Consume => "consume",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Raw,
    RawHeaders,
    Traced,
    TracedUnsampled,
    TracedCollectorDown,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Raw,
        Kind::RawHeaders,
        Kind::Traced,
        Kind::TracedUnsampled,
        Kind::TracedCollectorDown,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::RawHeaders => "raw+headers",
            Kind::Traced => "traced",
            Kind::TracedUnsampled => "traced-unsampled",
            Kind::TracedCollectorDown => "traced-collector-down",
        }
    }

    /// The traceparent flags its messages carry, `None` for no header.
    fn expected_flags(self) -> Option<&'static str> {
        match self {
            Kind::Raw => None,
            Kind::TracedUnsampled => Some("00"),
            _ => Some("01"),
        }
    }
}

fn parse_list<T: Copy>(value: &str, all: &[T], name: fn(T) -> &'static str) -> Res<Vec<T>> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found = all
            .iter()
            .copied()
            .find(|t| name(*t) == item)
            .ok_or_else(|| {
                let names: Vec<&str> = all.iter().map(|t| name(*t)).collect();
                format!("unknown value {item:?} (one of {})", names.join(", "))
            })?;
        out.push(found);
    }
    if out.is_empty() {
        return Err("empty list".into());
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Collector {
    Testkit,
    Down,
}

#[derive(Clone, Debug)]
struct Options {
    url: String,
    messages: u64,
    rounds: usize,
    warmup: u64,
    modes: Vec<Mode>,
    variants: Vec<Kind>,
    window: usize,
    prefetch: u16,
    timeout: Duration,
    verbose: bool,
    soak: bool,
    soak_messages: u64,
    soak_variant: Kind,
    soak_ahead: usize,
    rate: Option<f64>,
    rate_seconds: f64,
    rate_collector: Collector,
    rate_consume: bool,
}

impl Options {
    /// `Ok(None)` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> Res<Option<Options>> {
        let mut o = Options {
            url: std::env::var("MINDBUS_URL")
                .ok()
                .filter(|u| !u.trim().is_empty())
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            messages: 20_000,
            rounds: 5,
            warmup: 2_000,
            modes: Mode::ALL.to_vec(),
            variants: Kind::ALL.to_vec(),
            window: 64,
            prefetch: 256,
            timeout: Duration::from_secs(300),
            verbose: false,
            soak: false,
            soak_messages: 1_000_000,
            soak_variant: Kind::Traced,
            soak_ahead: 10_000,
            rate: None,
            rate_seconds: 5.0,
            rate_collector: Collector::Testkit,
            rate_consume: false,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                _ => (arg.clone(), None),
            };
            let mut value = |what: &str| -> Res<String> {
                match inline.clone().or_else(|| args.next()) {
                    Some(v) => Ok(v),
                    None => Err(format!("{flag} needs {what}").into()),
                }
            };
            fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Res<T> {
                v.trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| format!("{flag}: not a valid number: {v:?}").into())
            }
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--url" => o.url = value("a URL")?,
                "--messages" => o.messages = num(&flag, &value("a count")?)?,
                "--rounds" => o.rounds = num(&flag, &value("a count")?)?,
                "--warmup-messages" => o.warmup = num(&flag, &value("a count")?)?,
                "--modes" => o.modes = parse_list(&value("a list")?, &Mode::ALL, Mode::name)?,
                "--variants" => o.variants = parse_list(&value("a list")?, &Kind::ALL, Kind::name)?,
                "--window" => o.window = num(&flag, &value("a count")?)?,
                "--prefetch" => o.prefetch = num(&flag, &value("a count")?)?,
                "--timeout" => o.timeout = Duration::from_secs_f64(num(&flag, &value("seconds")?)?),
                "--verbose" | "-v" => o.verbose = true,
                "--soak" => o.soak = true,
                "--soak-messages" => {
                    o.soak = true;
                    o.soak_messages = num(&flag, &value("a count")?)?;
                }
                "--soak-variant" => {
                    let list = parse_list(&value("a variant")?, &Kind::ALL, Kind::name)?;
                    o.soak_variant = list[0];
                }
                "--soak-ahead" => o.soak_ahead = num(&flag, &value("a count")?)?,
                "--rate" => o.rate = Some(num(&flag, &value("msg/s")?)?),
                "--rate-seconds" => o.rate_seconds = num(&flag, &value("seconds")?)?,
                "--rate-collector" => {
                    o.rate_collector = match value("testkit or down")?.as_str() {
                        "testkit" => Collector::Testkit,
                        "down" => Collector::Down,
                        other => {
                            return Err(
                                format!("--rate-collector: {other:?} (testkit or down)").into()
                            );
                        }
                    }
                }
                "--rate-consume" => o.rate_consume = true,
                other => return Err(format!("unknown option {other:?}").into()),
            }
        }
        if o.messages == 0 || o.rounds == 0 || o.window == 0 || o.prefetch == 0 {
            return Err("--messages, --rounds, --window and --prefetch must be at least 1".into());
        }
        if o.soak && (o.soak_messages == 0 || o.soak_ahead == 0) {
            return Err("--soak-messages and --soak-ahead must be at least 1".into());
        }
        if let Some(rate) = o.rate
            && !(rate >= 1.0 && rate.is_finite() && o.rate_seconds > 0.0)
        {
            return Err("--rate must be at least 1 and --rate-seconds positive".into());
        }
        if o.soak && o.rate.is_some() {
            return Err("--soak and --rate are separate runs: pick one".into());
        }
        if o.timeout.is_zero() {
            return Err("--timeout must be positive".into());
        }
        Ok(Some(o))
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

// ------------------------------------------------------ CPU, RSS, stats

/// CPU time of the process: per-thread run time from
/// `/proc/self/task/*/schedstat` (ns), and user+sys from `/proc/self/stat`
/// (clock ticks, includes threads that already exited).
struct Cpu {
    threads: HashMap<u32, u64>,
    stat_ticks: u64,
}

impl Cpu {
    fn take() -> Res<Cpu> {
        let mut threads = HashMap::new();
        for entry in std::fs::read_dir("/proc/self/task")? {
            let entry = entry?;
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // A thread may exit between the listing and the read.
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = text.split_whitespace().next().and_then(|f| f.parse().ok()) {
                threads.insert(tid, ns);
            }
        }
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After "pid (comm)": state is field 3, utime 14, stime 15.
        let field = |i: usize| -> Res<u64> {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| BoxError::from("cannot parse /proc/self/stat"))
        };
        Ok(Cpu {
            threads,
            stat_ticks: field(11)? + field(12)?,
        })
    }

    /// Run time since `earlier`, all threads, in ns. Threads born since
    /// count in full; threads that exited since are missed (their last
    /// share is lost; the benchmark keeps its threads alive).
    fn schedstat_ns_since(&self, earlier: &Cpu) -> u64 {
        self.threads
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

#[derive(Clone, Copy)]
struct CpuMethod {
    schedstat: bool,
    ns_per_tick: f64,
}

impl CpuMethod {
    fn detect() -> Res<CpuMethod> {
        let ticks = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100);
        // Does schedstat move? Burn a little CPU and look.
        let before = Cpu::take()?;
        let start = Instant::now();
        let mut x = 1u64;
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(splitmix64(x));
        }
        let after = Cpu::take()?;
        Ok(CpuMethod {
            schedstat: after.schedstat_ns_since(&before) > 0,
            ns_per_tick: 1e9 / ticks as f64,
        })
    }

    fn describe(&self) -> String {
        if self.schedstat {
            "sum over every thread of /proc/self/task/*/schedstat run time (ns)".to_owned()
        } else {
            format!(
                "/proc/self/stat utime+stime ({:.0} ms ticks; schedstat unavailable)",
                self.ns_per_tick / 1e6
            )
        }
    }

    /// (chosen ns, /proc/self/stat ns)
    fn delta(&self, a: &Cpu, b: &Cpu) -> (f64, f64) {
        let stat = b.stat_ticks.saturating_sub(a.stat_ticks) as f64 * self.ns_per_tick;
        let chosen = if self.schedstat {
            b.schedstat_ns_since(a) as f64
        } else {
            stat
        };
        (chosen, stat)
    }
}

fn rss_kib() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median, smallest and largest of a set of values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        let median = median(&mut sorted);
        Spread {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// A variant against a baseline, round by round. The variants of one round
/// run back to back, so the machine's drift between rounds (the broker's
/// state, other load on the two cores) cancels out of each pair; what is
/// left in the spread of the pairs is the noise of one measurement.
#[derive(Debug, PartialEq)]
struct Paired {
    /// msg/s of the variant / msg/s of the baseline, per round.
    ratio: Spread,
    /// Client CPU µs per message of the variant minus the baseline's.
    added_cpu: Spread,
    rounds: usize,
}

fn paired(variant: &[Sample], base: &[Sample]) -> Option<Paired> {
    let rounds = variant.len().min(base.len());
    if rounds == 0 {
        return None;
    }
    let pairs = variant.iter().zip(base);
    let ratios: Vec<f64> = pairs.clone().map(|(v, b)| v.rate / b.rate).collect();
    let added: Vec<f64> = pairs.map(|(v, b)| v.cpu_us - b.cpu_us).collect();
    Some(Paired {
        ratio: Spread::of(&ratios),
        added_cpu: Spread::of(&added),
        rounds,
    })
}

/// Where a goal stands against the per-round values. With n rounds the
/// true median of a pair lies between the smallest and the largest pair
/// with probability 1 - 2 * 0.5^n (94% for 5 rounds), so a goal on one side
/// of every round is decided, and one inside the range is not.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    NotMet,
    WithinNoise,
}

impl Verdict {
    /// `at_least`: the goal is a lower bound (a ratio), else an upper bound
    /// (added CPU).
    fn of(spread: Spread, goal: f64, at_least: bool) -> Verdict {
        let (worst, best) = if at_least {
            (spread.min, spread.max)
        } else {
            (-spread.max, -spread.min)
        };
        let goal = if at_least { goal } else { -goal };
        if worst >= goal {
            Verdict::Met
        } else if best < goal {
            Verdict::NotMet
        } else {
            Verdict::WithinNoise
        }
    }

    fn as_str(&self) -> &'static str {
        match self {
            Verdict::Met => "met in every round",
            Verdict::NotMet => "NOT met in any round",
            Verdict::WithinNoise => "undecided (the goal lies within the rounds' spread)",
        }
    }
}

/// Issue 6's goals for a variant: (throughput ratio to raw+headers at
/// least, added client CPU µs per message at most).
fn goals(kind: Kind) -> (Option<f64>, Option<f64>) {
    match kind {
        Kind::Traced => (Some(0.97), Some(1.5)),
        Kind::TracedUnsampled => (None, Some(0.3)),
        Kind::TracedCollectorDown => (Some(0.95), None),
        Kind::Raw | Kind::RawHeaders => (None, None),
    }
}

/// The per-round comparison of a traced variant with raw+headers (else
/// raw), with its goals' verdicts.
fn paired_line(
    kind: Kind,
    mode_results: &[Vec<Sample>],
    vi: usize,
    raw: Option<usize>,
    raw_headers: Option<usize>,
) -> Option<String> {
    let (ratio_goal, cpu_goal) = goals(kind);
    if ratio_goal.is_none() && cpu_goal.is_none() {
        return None;
    }
    let (b, name) = match (raw_headers, raw) {
        (Some(b), _) => (b, "raw+headers"),
        (None, Some(b)) => (b, "raw"),
        (None, None) => return None,
    };
    let p = paired(&mode_results[vi], &mode_results[b])?;
    let mut line = format!(
        "    per round vs {name} ({} rounds, median [min, max]): x{:.2} [{:.2}, {:.2}], {:+.2} [{:+.2}, {:+.2}] us/msg",
        p.rounds,
        p.ratio.median,
        p.ratio.min,
        p.ratio.max,
        p.added_cpu.median,
        p.added_cpu.min,
        p.added_cpu.max
    );
    if let Some(goal) = ratio_goal {
        let verdict = Verdict::of(p.ratio, goal, true);
        let _ = write!(line, "; goal >= x{goal:.2}: {}", verdict.as_str());
    }
    if let Some(goal) = cpu_goal {
        let verdict = Verdict::of(p.added_cpu, goal, false);
        let _ = write!(line, "; goal <= +{goal} us/msg: {}", verdict.as_str());
    }
    Some(line)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ------------------------------------------------------------ messages

/// A MindBus COMMAND (CloudEvents 1.0, JSON) of exactly 256 bytes.
fn command_body() -> Res<Vec<u8>> {
    const TARGET: usize = 256;
    let json = |topic: &str| {
        format!(
            r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01","subject":"task-article-555","data":{{"action":"generate_article","params":{{"topic":"{topic}","length":2000}},"timeout_seconds":300}}}}"#
        )
    };
    let base = json("").len();
    let filler = "AI trends in multi-agent orchestration: planning, delegation, critique";
    let need = TARGET
        .checked_sub(base)
        .filter(|n| *n <= filler.len())
        .ok_or("the COMMAND template does not fit 256 bytes")?;
    let body = json(&filler[..need]).into_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body)?;
    if body.len() != TARGET || value["type"] != "ai.team.command" {
        return Err("COMMAND body is not 256 bytes of valid JSON".into());
    }
    Ok(body)
}

struct Messages {
    body: Vec<u8>,
    run: u32,
    seq: AtomicU64,
}

impl Messages {
    fn props(&self, kind: Kind) -> BasicProperties {
        command_props(self.run, self.seq.fetch_add(1, Ordering::Relaxed), kind)
    }
}

/// Properties of a MindBus COMMAND with a unique correlation/message id;
/// `raw+headers` adds a traceparent as TraceContext would.
fn command_props(run: u32, seq: u64, kind: Kind) -> BasicProperties {
    let id = format!("{run:08x}-0000-4000-8000-{seq:012x}");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(20)
        .with_expiration("300000".into())
        .with_reply_to("orchestrator.results".into())
        .with_correlation_id(id.as_str().into())
        .with_message_id(id.into());
    if kind != Kind::RawHeaders {
        return props;
    }
    let a = splitmix64(seq ^ (u64::from(run) << 32));
    let b = splitmix64(a);
    let c = splitmix64(b) | 1;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(format!("00-{a:016x}{b:016x}-{c:016x}-01"))),
    );
    props.with_headers(headers)
}

/// Checks one message of `kind`: the body, and the W3C headers.
fn check_message(
    kind: Kind,
    body: &[u8],
    props: &BasicProperties,
    expected_body: &[u8],
) -> Res<()> {
    if body != expected_body {
        return Err(format!("{}: a message body differs from the one sent", kind.name()).into());
    }
    let header = |name: &str| -> Res<Option<String>> {
        match props.headers().as_ref().and_then(|h| h.inner().get(name)) {
            None => Ok(None),
            Some(AMQPValue::LongString(s)) => {
                Ok(Some(String::from_utf8_lossy(s.as_bytes()).into_owned()))
            }
            Some(other) => Err(format!(
                "{}: header {name} is not a LongString: {other:?}",
                kind.name()
            )
            .into()),
        }
    };
    for extra in ["tracestate", "baggage"] {
        if let Some(value) = header(extra)? {
            return Err(format!(
                "{}: unexpected {extra} header {value:?}; raw+headers must add the same headers",
                kind.name()
            )
            .into());
        }
    }
    match (kind.expected_flags(), header("traceparent")?) {
        (None, None) => Ok(()),
        (None, Some(tp)) => Err(format!("{}: unexpected traceparent {tp}", kind.name()).into()),
        (Some(_), None) => Err(format!("{}: no traceparent header", kind.name()).into()),
        (Some(flags), Some(tp)) => {
            let ok = tp.len() == 55 && tp.starts_with("00-") && tp.ends_with(&format!("-{flags}"));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{}: traceparent {tp:?}, expected flags {flags}",
                    kind.name()
                )
                .into())
            }
        }
    }
}

// ------------------------------------------------------------- variants

/// An exporter that counts and drops.
#[derive(Debug)]
struct Discard {
    exported: Arc<AtomicU64>,
}

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.exported
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        drop(std::hint::black_box(batch));
        Ok(())
    }
}

enum Sink {
    Discard(Arc<AtomicU64>),
    Telemetry(Arc<Telemetry>),
}

/// The full chain of one traced variant, shared by its channels.
struct Chain {
    trace_context: TraceContext,
    spans: MessagingSpans,
    agent_metrics: AgentMetrics,
    task_metrics: TaskMetrics,
    provider: SdkTracerProvider,
    sink: Sink,
    /// Spans found dropped by a full queue at the last flush.
    settled_drops: AtomicU64,
}

impl Chain {
    fn new(provider: SdkTracerProvider, sink: Sink) -> Chain {
        Chain {
            trace_context: TraceContext::default(),
            spans: MessagingSpans::default().with_tracer_provider(&provider),
            agent_metrics: AgentMetrics::default(),
            task_metrics: TaskMetrics::default(),
            provider,
            sink,
            settled_drops: AtomicU64::new(0),
        }
    }

    fn discarding(sampler: Sampler) -> Chain {
        let exported = Arc::new(AtomicU64::new(0));
        let provider = SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name("bench").build())
            .with_sampler(sampler)
            .with_batch_exporter(Discard {
                exported: Arc::clone(&exported),
            })
            .build();
        Chain::new(provider, Sink::Discard(exported))
    }

    fn wrap(&self, channel: Channel, agent: &str) -> TracedChannel {
        TracedChannel::builder(channel)
            .agent(agent)
            .with(self.trace_context.clone())
            .with(self.spans.clone())
            .with(self.agent_metrics.clone())
            .with(self.task_metrics.clone())
            .build()
    }

    /// Exports every ended span (`force_flush`, blocking, off the async
    /// threads). With mindbus-telemetry, repeats it until every span handed
    /// to the batch processor is exported or failed (a down collector drains
    /// about one batch per retry cycle, and one `force_flush` gives up after
    /// 5 s), or until a flush makes no progress: the rest were dropped by a
    /// full queue.
    async fn flush(&self) -> Res<()> {
        let Sink::Telemetry(telemetry) = &self.sink else {
            return self
                .force_flush()
                .await?
                .map_err(|e| format!("force_flush failed: {e}").into());
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let settled = self.settled_drops.load(Ordering::Relaxed);
        loop {
            let before = telemetry.span_stats().pending_or_dropped();
            if before <= settled {
                return Ok(());
            }
            // Export failures are counted in span_stats, not errors here.
            let _ = self.force_flush().await?;
            let after = telemetry.span_stats().pending_or_dropped();
            if after >= before {
                self.settled_drops.store(after, Ordering::Relaxed);
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{after} spans still queued after flushing for 300 s (collector down: about one batch per retry cycle)"
                )
                .into());
            }
        }
    }

    async fn force_flush(&self) -> Res<OTelSdkResult> {
        let provider = self.provider.clone();
        Ok(tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .map_err(|e| format!("span flush task failed: {e}"))?)
    }

    /// After a flush: a one-line account, and the spans dropped by a full
    /// batch queue.
    fn account(&self, kind: Kind) -> (String, u64) {
        let started = self.spans.stats().started();
        let ended = self.spans.stats().ended();
        match &self.sink {
            Sink::Discard(exported) if kind == Kind::TracedUnsampled => {
                let exported = exported.load(Ordering::Relaxed);
                (
                    format!(
                        "started {started}, ended {ended}, sampled none (AlwaysOff), exported {exported}"
                    ),
                    0,
                )
            }
            Sink::Discard(exported) => {
                let exported = exported.load(Ordering::Relaxed);
                let dropped = ended.saturating_sub(exported);
                (
                    format!(
                        "started {started}, ended {ended}, exported {exported} (discarding exporter), dropped {dropped}"
                    ),
                    dropped,
                )
            }
            Sink::Telemetry(telemetry) => {
                let s = telemetry.span_stats();
                let dropped = s.pending_or_dropped();
                (
                    format!(
                        "started {started}, ended {ended}; mindbus-telemetry: handed to the batch processor {}, exported {}, failed {} ({} shed while backing off), dropped (queue full) {dropped}",
                        s.ended, s.exported, s.failed, s.shed
                    ),
                    dropped,
                )
            }
        }
    }

    async fn shutdown(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Sink::Telemetry(telemetry) = &self.sink {
            let telemetry = Arc::clone(telemetry);
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
    }
}

/// A 127.0.0.1 port where nothing listens.
fn closed_port() -> Res<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(_) => Err(format!("something listens on 127.0.0.1:{port}").into()),
        Err(_) => Ok(port),
    }
}

/// mindbus-telemetry exporting by OTLP/gRPC to `endpoint` with its default
/// batch settings (`OTEL_BSP_*` from the environment still apply), nothing
/// global installed.
async fn telemetry_chain(endpoint: String) -> Res<(Chain, mindbus_telemetry::BatchSettings)> {
    let config = Config::from_lookup(|key| match key {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
        "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("grpc".to_owned()),
        "OTEL_SERVICE_NAME" => Some("bench".to_owned()),
        "METRICS_ADDR" => Some("off".to_owned()),
        "MINDBUS_TRACE_VIEW" => Some("off".to_owned()),
        k if k.starts_with("OTEL_BSP_") => std::env::var(k).ok(),
        _ => None,
    })
    .install_subscriber(false)
    .install_tracer_provider(false)
    .metrics(false)
    .trace_view(TraceViewMode::Off);
    let batch = config.batch_settings();
    let telemetry = tokio::task::spawn_blocking(move || mindbus_telemetry::init(config))
        .await
        .map_err(|e| format!("telemetry init task failed: {e}"))?
        .map_err(|e| format!("mindbus_telemetry::init: {e}"))?;
    for warning in telemetry.warnings() {
        eprintln!("bench: mindbus-telemetry warning: {warning}");
    }
    if telemetry.traces_target().is_none() {
        return Err("mindbus-telemetry has no traces target; check the endpoint".into());
    }
    let provider = telemetry.tracer_provider_for("bench");
    Ok((
        Chain::new(provider, Sink::Telemetry(Arc::new(telemetry))),
        batch,
    ))
}

struct Variant {
    kind: Kind,
    chain: Option<Chain>,
    note: String,
}

impl Variant {
    async fn build(kind: Kind) -> Res<Variant> {
        Ok(match kind {
            Kind::Raw => Variant {
                kind,
                chain: None,
                note: "plain lapin".to_owned(),
            },
            Kind::RawHeaders => Variant {
                kind,
                chain: None,
                note: "plain lapin + a traceparent LongString header per message (what TraceContext adds here: no tracestate or baggage in these contexts)".to_owned(),
            },
            Kind::Traced | Kind::TracedUnsampled => {
                let sampler = if kind == Kind::Traced {
                    Sampler::AlwaysOn
                } else {
                    Sampler::AlwaysOff
                };
                let bsp = if std::env::vars().any(|(k, _)| k.starts_with("OTEL_BSP_")) {
                    "SDK stock BatchSpanProcessor (OTEL_BSP_* from the environment)"
                } else {
                    "SDK stock BatchSpanProcessor (queue 2048, batch 512, delay 5 s)"
                };
                Variant {
                    kind,
                    chain: Some(Chain::discarding(sampler)),
                    note: format!(
                        "TracedChannel [TraceContext, MessagingSpans, AgentMetrics, TaskMetrics], {}, {bsp}, discarding exporter",
                        if kind == Kind::Traced { "AlwaysOn" } else { "AlwaysOff" }
                    ),
                }
            }
            Kind::TracedCollectorDown => {
                let port = closed_port()?;
                let (chain, batch) = telemetry_chain(format!("http://127.0.0.1:{port}")).await?;
                Variant {
                    kind,
                    chain: Some(chain),
                    note: format!(
                        "same chain, parentbased_always_on, spans by mindbus-telemetry OTLP/gRPC to http://127.0.0.1:{port} (nothing listens), batch queue {}, batch {}, delay {} ms, export timeout {} ms",
                        batch.max_queue_size,
                        batch.max_export_batch_size,
                        batch.scheduled_delay.as_millis(),
                        batch.export_timeout.as_millis()
                    ),
                }
            }
        })
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn publisher(&self, channel: Channel) -> Publisher {
        match &self.chain {
            Some(chain) => Publisher::Traced(chain.wrap(channel, "orchestrator-core")),
            None => Publisher::Raw(channel),
        }
    }

    async fn flush(&self) -> Res<()> {
        match &self.chain {
            Some(chain) => chain.flush().await,
            None => Ok(()),
        }
    }
}

enum Publisher {
    Raw(Channel),
    Traced(TracedChannel),
}

impl Publisher {
    /// Publishes and waits for the confirm (immediate `NotRequested`
    /// without confirms), as in `basic_publish(..).await?.await?`.
    async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        let exchange = ShortString::from("");
        let routing_key = ShortString::from(routing_key);
        let options = BasicPublishOptions::default();
        match self {
            Publisher::Raw(ch) => {
                ch.basic_publish(exchange, routing_key, options, body, props)
                    .await?
                    .await
            }
            Publisher::Traced(ch) => {
                ch.basic_publish(exchange, routing_key, options, body, props)
                    .await?
                    .await
            }
        }
    }
}

fn check_confirmation(confirmation: Confirmation, confirms: bool) -> Res<()> {
    match confirmation {
        Confirmation::Ack(None) if confirms => Ok(()),
        Confirmation::NotRequested if !confirms => Ok(()),
        Confirmation::Nack(_) => Err("the broker nacked a publish".into()),
        Confirmation::Ack(Some(_)) => Err("the broker returned a publish as unroutable".into()),
        other => Err(format!("unexpected confirmation {other:?}").into()),
    }
}

// ------------------------------------------------------------ the broker

struct Ctx {
    conn: Connection,
    control: Channel,
    opts: Options,
    msgs: Messages,
    run: u32,
    cpu: CpuMethod,
    queues: Mutex<Vec<String>>,
}

impl Ctx {
    /// Declares an exclusive queue once; remembered for deletion.
    async fn queue(&self, name: String, arguments: FieldTable) -> Res<String> {
        let known = self
            .queues
            .lock()
            .map(|q| q.contains(&name))
            .unwrap_or(false);
        if !known {
            self.control
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    arguments,
                )
                .await
                .map_err(|e| format!("cannot declare queue {name}: {e}"))?;
            if let Ok(mut queues) = self.queues.lock() {
                queues.push(name.clone());
            }
        }
        Ok(name)
    }

    async fn count(&self, channel: &Channel, queue: &str) -> Res<u32> {
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }

    /// Waits until the broker holds exactly `n` ready messages in `queue`.
    async fn wait_for_count(&self, queue: &str, n: u64) -> Res<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let count = u64::from(self.count(&self.control, queue).await?);
            if count == n {
                return Ok(());
            }
            if count > n || Instant::now() > deadline {
                return Err(format!("queue {queue} holds {count} messages, expected {n}").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Checks one of the `n` messages in `queue` and purges the rest.
    async fn check_and_purge(&self, queue: &str, kind: Kind, n: u64) -> Res<()> {
        let got = self
            .control
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await?
            .ok_or_else(|| format!("queue {queue} is empty, expected {n} messages"))?;
        check_message(
            kind,
            &got.delivery.data,
            &got.delivery.properties,
            &self.msgs.body,
        )?;
        let purged = u64::from(
            self.control
                .queue_purge(queue.into(), QueuePurgeOptions::default())
                .await?,
        );
        if purged + 1 != n {
            return Err(
                format!("purged {purged} messages from {queue}, expected {}", n - 1).into(),
            );
        }
        Ok(())
    }

    async fn delete_queues(&self) -> Res<()> {
        let names = self
            .queues
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        let mut failures = Vec::new();
        for name in names {
            if let Err(error) = self
                .control
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
            {
                failures.push(format!("{name}: {error}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "cannot delete queues ({}); they are exclusive and go with the connection",
                failures.join("; ")
            )
            .into())
        }
    }
}

/// Publishes `n` messages with up to `window` in flight.
async fn publish_window(
    ctx: &Ctx,
    publisher: &Publisher,
    kind: Kind,
    queue: &str,
    n: u64,
    confirms: bool,
) -> Res<()> {
    let body = ctx.msgs.body.as_slice();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    loop {
        while next < n && inflight.len() < ctx.opts.window {
            inflight.push(publisher.publish(queue, body, ctx.msgs.props(kind)));
            next += 1;
        }
        match inflight.next().await {
            Some(result) => check_confirmation(result?, confirms)?,
            None => return Ok(()),
        }
    }
}

async fn next_delivery<S, T>(stream: &mut S, idle: Duration) -> Res<T>
where
    S: Stream<Item = lapin::Result<T>> + Unpin,
{
    match tokio::time::timeout(idle, stream.next()).await {
        Err(_) => Err(format!("no delivery for {} s", idle.as_secs()).into()),
        Ok(None) => Err("the consumer stream ended (channel closed?)".into()),
        Ok(Some(item)) => Ok(item?),
    }
}

const IDLE: Duration = Duration::from_secs(30);

/// Consumes and acks `n` messages from `queue` on `channel`.
async fn consume_n(ctx: &Ctx, v: &Variant, channel: &Channel, queue: &str, n: u64) -> Res<()> {
    let options = BasicConsumeOptions::default();
    let body = &ctx.msgs.body;
    match &v.chain {
        None => {
            let mut consumer = channel
                .basic_consume(queue.into(), "bench".into(), options, FieldTable::default())
                .await?;
            for i in 0..n {
                let delivery = next_delivery(&mut consumer, IDLE).await?;
                if i == 0 {
                    check_message(v.kind, &delivery.data, &delivery.properties, body)?;
                }
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        Some(chain) => {
            let traced = chain.wrap(channel.clone(), "agent.writer.001");
            let mut consumer = traced
                .basic_consume(queue.into(), "bench".into(), options, FieldTable::default())
                .await?;
            for i in 0..n {
                let delivery = next_delivery(&mut consumer, IDLE).await?;
                if i == 0 {
                    check_message(v.kind, &delivery.data, &delivery.properties, body)?;
                }
                delivery.ack(BasicAckOptions::default()).await?;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    rate: f64,
    cpu_us: f64,
    stat_us: f64,
    cpu_ns_total: f64,
    stat_ns_total: f64,
}

/// One measurement: `n` messages of `v` in `mode`.
async fn measure(ctx: &Ctx, mode: Mode, v: &Variant, queue: &str, n: u64) -> Res<Sample> {
    let stale = ctx.count(&ctx.control, queue).await?;
    if stale != 0 {
        ctx.control
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
    }
    if mode == Mode::Consume {
        // Prefill, with the headers of the variant: traced variants publish
        // through their own chain, so deliveries carry real trace context.
        let ch = ctx.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let publisher = v.publisher(ch.clone());
        publish_window(ctx, &publisher, v.kind, queue, n, true).await?;
        drop(publisher);
        ch.close(200, "prefilled".into()).await?;
        ctx.wait_for_count(queue, n).await?;
    }
    let ch = ctx.conn.create_channel().await?;
    match mode {
        Mode::PublishConfirms => ch.confirm_select(ConfirmSelectOptions::default()).await?,
        Mode::Consume => {
            ch.basic_qos(ctx.opts.prefetch, BasicQosOptions::default())
                .await?
        }
        Mode::PublishPipelined | Mode::PublishSerial => {}
    }
    let publisher = v.publisher(ch.clone());
    // Spans from the prefill (or anything earlier) are out of the window.
    v.flush().await?;

    let cpu0 = Cpu::take()?;
    let t0 = Instant::now();
    match mode {
        Mode::PublishPipelined => publish_window(ctx, &publisher, v.kind, queue, n, false).await?,
        Mode::PublishConfirms => publish_window(ctx, &publisher, v.kind, queue, n, true).await?,
        Mode::PublishSerial => {
            for _ in 0..n {
                let confirmation = publisher
                    .publish(queue, &ctx.msgs.body, ctx.msgs.props(v.kind))
                    .await?;
                check_confirmation(confirmation, false)?;
            }
        }
        Mode::Consume => consume_n(ctx, v, &ch, queue, n).await?,
    }
    // Barrier: the broker answers on this channel only after reading every
    // publish (or ack) sent on it before.
    let left = ctx.count(&ch, queue).await?;
    let wall = t0.elapsed();
    v.flush().await?;
    let cpu1 = Cpu::take()?;

    drop(publisher);
    ch.close(200, "measured".into()).await?;
    if mode == Mode::Consume {
        if left != 0 {
            return Err(format!("{left} messages left in {queue} after consuming {n}").into());
        }
    } else {
        ctx.wait_for_count(queue, n).await?;
        ctx.check_and_purge(queue, v.kind, n).await?;
    }
    let (cpu_ns, stat_ns) = ctx.cpu.delta(&cpu0, &cpu1);
    Ok(Sample {
        rate: n as f64 / wall.as_secs_f64(),
        cpu_us: cpu_ns / n as f64 / 1e3,
        stat_us: stat_ns / n as f64 / 1e3,
        cpu_ns_total: cpu_ns,
        stat_ns_total: stat_ns,
    })
}

// ----------------------------------------------------------------- runs

async fn run(opts: Options) -> Res<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    // What the exporter's own listener would do: drain histogram samples.
    let upkeep = prometheus.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });

    let cpu = CpuMethod::detect()?;
    let body = command_body()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let run = (splitmix64(now.as_nanos() as u64 ^ u64::from(std::process::id())) >> 32) as u32;

    let conn = tokio::time::timeout(
        Duration::from_secs(15),
        Connection::connect(&opts.url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| format!("no connection to {} within 15 s", redact(&opts.url)))?
    .map_err(|e| format!("cannot connect to {}: {e}", redact(&opts.url)))?;
    let control = conn.create_channel().await?;
    let ctx = Ctx {
        conn,
        control,
        msgs: Messages {
            body,
            run,
            seq: AtomicU64::new(0),
        },
        run,
        cpu,
        queues: Mutex::new(Vec::new()),
        opts,
    };

    let result = if ctx.opts.soak {
        soak(&ctx).await
    } else if let Some(rate) = ctx.opts.rate {
        rate_test(&ctx, rate).await
    } else {
        matrix(&ctx, &prometheus).await
    };
    let deleted = ctx.delete_queues().await;
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        ctx.conn.close(200, "bench done".into()),
    )
    .await;
    upkeep_task.abort();
    result?;
    deleted?;
    match closed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("closing the connection: {e}").into()),
        Err(_) => Err("closing the connection timed out".into()),
    }
}

fn header(ctx: &Ctx, what: &str) {
    println!(
        "# mindbus-otel bench ({what}): {} | {} CPUs | pid {} | run {:08x}",
        redact(&ctx.opts.url),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::process::id(),
        ctx.run
    );
    println!(
        "# body: {}-byte MindBus COMMAND (CloudEvents JSON), the same bytes in every variant; properties: json, persistent, priority 20, expiration 300 s, reply_to, unique correlation_id/message_id",
        ctx.msgs.body.len()
    );
    println!(
        "# client CPU = user+sys of every thread of this process: {}",
        ctx.cpu.describe()
    );
}

async fn matrix(ctx: &Ctx, prometheus: &metrics_exporter_prometheus::PrometheusHandle) -> Res<()> {
    let o = &ctx.opts;
    let mut variants = Vec::new();
    for kind in &o.variants {
        variants.push(Variant::build(*kind).await?);
    }
    header(ctx, "matrix");
    println!(
        "# {} messages per variant per round, {} rounds{}; variants interleaved (A B A B ...) within each mode and round, order rotated every round",
        o.messages,
        o.rounds,
        if o.warmup > 0 {
            format!(
                " after one unreported warm-up round of {} messages",
                o.warmup
            )
        } else {
            String::new()
        }
    );
    println!(
        "# publish-pipelined: up to {w} basic_publish futures in flight (each resolves when lapin hands the frames to its I/O loop), no confirms; publish-serial: one at a time; publish-confirms: confirm_select, up to {w} outstanding confirms; consume: queue prefilled with the variant's headers (traced variants through their chain), basic_consume, prefetch {p}, one ack per message (TracedDelivery::ack for traced variants)",
        w = o.window,
        p = o.prefetch
    );
    println!(
        "# msg/s = N / wall clock of the measured phase, which ends when the broker answers a passive queue.declare sent on the same channel after the last publish/ack (so it has read them all)"
    );
    println!(
        "# us/msg = client CPU during the phase plus flushing the variant's spans right after it (traced-collector-down: until every span is exported, failed or dropped), / N; values are medians over rounds; xA = ratio of median msg/s; +B us/msg = difference of median CPU per message"
    );
    println!(
        "# per round: each traced variant against raw+headers within each round (median [min, max] of the pairs); a goal is met (or not) in every round, or undecided; with {} rounds the range holds the pairs' true median with probability {:.0}%",
        o.rounds,
        100.0 * (1.0 - 2.0 * 0.5f64.powi(i32::try_from(o.rounds).unwrap_or(i32::MAX)))
    );
    for v in &variants {
        println!("# {}: {}", v.name(), v.note);
    }
    println!(
        "# metrics: metrics-exporter-prometheus recorder (PrometheusBuilder::new().install_recorder(), upkeep every 5 s)"
    );

    let mut results: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); variants.len()]; o.modes.len()];
    let mut rounds: Vec<(Option<usize>, u64)> = Vec::new();
    if o.warmup > 0 {
        rounds.push((None, o.warmup));
    }
    rounds.extend((0..o.rounds).map(|r| (Some(r), o.messages)));
    for (ri, (round, n)) in rounds.iter().enumerate() {
        let label = match round {
            Some(r) => format!("round {}/{}", r + 1, o.rounds),
            None => "warm-up".to_owned(),
        };
        for (mi, mode) in o.modes.iter().enumerate() {
            for k in 0..variants.len() {
                let vi = (k + ri) % variants.len();
                let v = &variants[vi];
                let queue = ctx
                    .queue(
                        format!("mindbus.bench.{:08x}.{}.{}", ctx.run, mode.name(), v.name()),
                        FieldTable::default(),
                    )
                    .await?;
                let sample = tokio::time::timeout(o.timeout, measure(ctx, *mode, v, &queue, *n))
                    .await
                    .map_err(|_| {
                        format!(
                            "{} {}: no result within {} s (--timeout)",
                            mode.name(),
                            v.name(),
                            o.timeout.as_secs()
                        )
                    })?
                    .map_err(|e| format!("{} {} ({label}): {e}", mode.name(), v.name()))?;
                eprintln!(
                    "[{label}] {} {}: {:.0} msg/s, {:.2} us/msg",
                    mode.name(),
                    v.name(),
                    sample.rate,
                    sample.cpu_us
                );
                if round.is_some() {
                    results[mi][vi].push(sample);
                }
            }
        }
    }

    println!();
    let index = |kind: Kind| variants.iter().position(|v| v.kind == kind);
    let (raw, raw_headers) = (index(Kind::Raw), index(Kind::RawHeaders));
    let mut cpu_total = (0.0, 0.0);
    for (mi, mode) in o.modes.iter().enumerate() {
        let medians: Vec<(f64, f64)> = results[mi]
            .iter()
            .map(|samples| {
                let mut rates: Vec<f64> = samples.iter().map(|s| s.rate).collect();
                let mut cpus: Vec<f64> = samples.iter().map(|s| s.cpu_us).collect();
                (median(&mut rates), median(&mut cpus))
            })
            .collect();
        for (vi, v) in variants.iter().enumerate() {
            let (rate, cpu) = medians[vi];
            let mut line = format!(
                "{} {}: {rate:.0} msg/s, {cpu:.1} us/msg",
                mode.name(),
                v.name()
            );
            let mut vs = |base: Option<usize>, name: &str, with_cpu: bool| {
                if let Some(b) = base.filter(|b| *b != vi) {
                    let _ = write!(line, ", x{:.2} vs {name}", rate / medians[b].0);
                    if with_cpu {
                        let _ = write!(line, ", {:+.1} us/msg vs {name}", cpu - medians[b].1);
                    }
                }
            };
            match v.kind {
                Kind::Raw => {}
                Kind::RawHeaders => vs(raw, "raw", true),
                _ => {
                    vs(raw_headers, "raw+headers", false);
                    vs(raw, "raw", false);
                    if let Some(b) = raw_headers {
                        let _ = write!(line, ", {:+.1} us/msg vs raw+headers", cpu - medians[b].1);
                    } else if let Some(b) = raw {
                        let _ = write!(line, ", {:+.1} us/msg vs raw", cpu - medians[b].1);
                    }
                }
            }
            println!("{line}");
            if let Some(text) = paired_line(v.kind, &results[mi], vi, raw, raw_headers) {
                println!("{text}");
            }
            if o.verbose {
                let samples = &results[mi][vi];
                let rates: Vec<String> = samples.iter().map(|s| format!("{:.0}", s.rate)).collect();
                let cpus: Vec<String> =
                    samples.iter().map(|s| format!("{:.2}", s.cpu_us)).collect();
                let stats: Vec<String> = samples
                    .iter()
                    .map(|s| format!("{:.1}", s.stat_us))
                    .collect();
                println!(
                    "    rounds: msg/s [{}], us/msg [{}], us/msg from /proc/self/stat [{}]",
                    rates.join(", "),
                    cpus.join(", "),
                    stats.join(", ")
                );
            }
            for s in &results[mi][vi] {
                cpu_total.0 += s.cpu_ns_total;
                cpu_total.1 += s.stat_ns_total;
            }
        }
    }

    println!();
    let mut dropped_total = 0;
    let mut any_traced = false;
    for v in &variants {
        if let Some(chain) = &v.chain {
            any_traced = true;
            chain.flush().await?;
            let (text, dropped) = chain.account(v.kind);
            dropped_total += dropped;
            println!("spans {}: {text}", v.name());
        }
    }
    if any_traced {
        if dropped_total == 0 {
            println!("spans: no span was dropped by a batch queue at the default settings");
        } else {
            println!(
                "spans: {dropped_total} spans were DROPPED by a full batch queue at the default settings"
            );
        }
    }
    println!(
        "cpu check (all measured phases): {:.3} s by the chosen method, {:.3} s by /proc/self/stat utime+stime (tick resolution)",
        cpu_total.0 / 1e9,
        cpu_total.1 / 1e9
    );
    let rendered = prometheus.render();
    println!(
        "metrics check: {} series lines in the Prometheus exposition, mindbus_messages_total {}",
        rendered
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count(),
        if rendered.contains("mindbus_messages_total") {
            "present"
        } else if any_traced {
            "MISSING"
        } else {
            "absent (no traced variant)"
        }
    );
    for v in &variants {
        if let Some(chain) = &v.chain {
            chain.shutdown().await;
        }
    }
    Ok(())
}

/// Publishes `total` messages pipelined through `publisher`, never more
/// than the semaphore allows ahead of the consumer.
async fn soak_publish(
    ctx: Arc<SoakShared>,
    publisher: Publisher,
    queue: String,
    total: u64,
    window: usize,
) -> Res<()> {
    let body = ctx.body.as_slice();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    while next < total || !inflight.is_empty() {
        if next < total && inflight.len() < window {
            let permit = match ctx.ahead.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) if inflight.is_empty() => Some(ctx.ahead.acquire().await?),
                Err(_) => None,
            };
            if let Some(permit) = permit {
                permit.forget();
                inflight.push(publisher.publish(&queue, body, ctx.props()));
                next += 1;
                continue;
            }
        }
        if let Some(result) = inflight.next().await {
            check_confirmation(result?, false)?;
        }
    }
    Ok(())
}

/// What the soak's publisher task shares.
struct SoakShared {
    body: Vec<u8>,
    kind: Kind,
    run: u32,
    seq: AtomicU64,
    ahead: tokio::sync::Semaphore,
}

impl SoakShared {
    fn props(&self) -> BasicProperties {
        command_props(
            self.run,
            self.seq.fetch_add(1, Ordering::Relaxed),
            self.kind,
        )
    }
}

async fn soak(ctx: &Ctx) -> Res<()> {
    let o = &ctx.opts;
    let total = o.soak_messages;
    let v = Variant::build(o.soak_variant).await?;
    header(ctx, "soak");
    println!(
        "# soak {}: {total} messages published pipelined (window {}) and consumed concurrently on another channel (prefetch {}, ack each), at most {} unconsumed",
        v.name(),
        o.window,
        o.prefetch,
        o.soak_ahead
    );
    println!("# {}: {}", v.name(), v.note);
    let queue = ctx
        .queue(
            format!("mindbus.bench.{:08x}.soak", ctx.run),
            FieldTable::default(),
        )
        .await?;
    let shared = Arc::new(SoakShared {
        body: ctx.msgs.body.clone(),
        kind: v.kind,
        run: ctx.run,
        seq: AtomicU64::new(0),
        ahead: tokio::sync::Semaphore::new(o.soak_ahead),
    });
    let pub_channel = ctx.conn.create_channel().await?;
    let con_channel = ctx.conn.create_channel().await?;
    con_channel
        .basic_qos(o.prefetch, BasicQosOptions::default())
        .await?;
    let step = (total / 10).clamp(1, 100_000);
    let rss_start = rss_kib()?;
    println!("soak: start, RSS {:.1} MiB", mib(rss_start));
    let start = Instant::now();
    let publisher = tokio::spawn(soak_publish(
        Arc::clone(&shared),
        v.publisher(pub_channel.clone()),
        queue.clone(),
        total,
        o.window,
    ));

    // Growth is measured from 100k messages (or the first checkpoint of a
    // shorter soak) to the end.
    let reference = if total >= 200_000 { 100_000 } else { step };
    let mut first: Option<(u64, u64)> = None;
    let mut last = (0u64, rss_start);
    let mut last_t = start;
    let mut checkpoint = |done: u64| -> Res<()> {
        if !done.is_multiple_of(step) && done != total {
            return Ok(());
        }
        let rss = rss_kib()?;
        let now = Instant::now();
        println!(
            "soak: {done:>9} msgs, RSS {:7.1} MiB, {:6.0} msg/s (last {} msgs)",
            mib(rss),
            (done - last.0) as f64 / now.duration_since(last_t).as_secs_f64(),
            done - last.0
        );
        if done == reference {
            first = Some((done, rss));
        }
        last = (done, rss);
        last_t = now;
        Ok(())
    };
    let consumed: Res<()> = async {
        let options = BasicConsumeOptions::default();
        match &v.chain {
            None => {
                let mut consumer = con_channel
                    .basic_consume(
                        queue.as_str().into(),
                        "soak".into(),
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                for done in 1..=total {
                    let d = next_delivery(&mut consumer, IDLE).await?;
                    if done == 1 {
                        check_message(v.kind, &d.data, &d.properties, &shared.body)?;
                    }
                    d.acker.ack(BasicAckOptions::default()).await?;
                    shared.ahead.add_permits(1);
                    checkpoint(done)?;
                }
            }
            Some(chain) => {
                let traced = chain.wrap(con_channel.clone(), "agent.writer.001");
                let mut consumer = traced
                    .basic_consume(
                        queue.as_str().into(),
                        "soak".into(),
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                for done in 1..=total {
                    let d = next_delivery(&mut consumer, IDLE).await?;
                    if done == 1 {
                        check_message(v.kind, &d.data, &d.properties, &shared.body)?;
                    }
                    d.ack(BasicAckOptions::default()).await?;
                    shared.ahead.add_permits(1);
                    checkpoint(done)?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = consumed {
        publisher.abort();
        return Err(format!("soak consumer: {error}").into());
    }
    publisher
        .await
        .map_err(|e| format!("soak publisher task: {e}"))?
        .map_err(|e| format!("soak publisher: {e}"))?;
    let elapsed = start.elapsed();
    let left = ctx.count(&con_channel, &queue).await?;
    if left != 0 {
        return Err(format!("{left} messages left in the soak queue").into());
    }
    let _ = pub_channel.close(200, "soak done".into()).await;
    let _ = con_channel.close(200, "soak done".into()).await;
    let (first_done, first_rss) = first.unwrap_or((0, rss_start));
    let (last_done, last_rss) = last;
    println!(
        "soak RSS: {:.1} MiB at {first_done} msgs, {:.1} MiB at {last_done} msgs: growth {:+.1} MiB ({:+.1}%); {:.1} MiB at start; {:.0} msg/s overall",
        mib(first_rss),
        mib(last_rss),
        (last_rss as f64 - first_rss as f64) / 1024.0,
        (last_rss as f64 / first_rss.max(1) as f64 - 1.0) * 100.0,
        mib(rss_start),
        total as f64 / elapsed.as_secs_f64()
    );
    if let Some(chain) = &v.chain {
        chain.flush().await?;
        let (text, dropped) = chain.account(v.kind);
        println!("soak spans: {text}");
        println!(
            "soak spans: {}",
            if dropped == 0 {
                "none dropped by the batch queue".to_owned()
            } else {
                format!("{dropped} DROPPED by a full batch queue")
            }
        );
        chain.shutdown().await;
    }
    Ok(())
}

async fn rate_test(ctx: &Ctx, rate: f64) -> Res<()> {
    let o = &ctx.opts;
    let total = (rate * o.rate_seconds).round().max(1.0) as u64;
    let receiver = match o.rate_collector {
        Collector::Testkit => Some(
            mindbus_otel_testkit::OtlpReceiver::start()
                .await
                .map_err(|e| format!("cannot start the OTLP receiver: {e}"))?,
        ),
        Collector::Down => None,
    };
    let endpoint = match &receiver {
        Some(r) => r.grpc_endpoint(),
        None => format!("http://127.0.0.1:{}", closed_port()?),
    };
    let (chain, batch) = telemetry_chain(endpoint.clone()).await?;
    header(ctx, "rate");
    println!(
        "# {rate:.0} msg/s for {} s ({total} messages) published pipelined (window {}) through TracedChannel [TraceContext, MessagingSpans, AgentMetrics, TaskMetrics]{}",
        o.rate_seconds,
        o.window,
        if o.rate_consume {
            ", consumed concurrently through the same chain (two spans per message)"
        } else {
            " (one PRODUCER span per message); queue capped at 100000 messages (x-max-length)"
        }
    );
    println!(
        "# spans: mindbus-telemetry, parentbased_always_on, OTLP/gRPC to {endpoint} ({}), batch queue {}, batch {}, delay {} ms, export timeout {} ms",
        match o.rate_collector {
            Collector::Testkit => "mindbus-otel-testkit in-process receiver",
            Collector::Down => "nothing listens",
        },
        batch.max_queue_size,
        batch.max_export_batch_size,
        batch.scheduled_delay.as_millis(),
        batch.export_timeout.as_millis()
    );
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(100_000));
    let queue = ctx
        .queue(format!("mindbus.bench.{:08x}.rate", ctx.run), args)
        .await?;
    let channel = ctx.conn.create_channel().await?;
    let publisher = Publisher::Traced(chain.wrap(channel.clone(), "orchestrator-core"));

    let stop = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicU64::new(0));
    let consumer_task = if o.rate_consume {
        let con_channel = ctx.conn.create_channel().await?;
        con_channel
            .basic_qos(o.prefetch, BasicQosOptions::default())
            .await?;
        let traced = chain.wrap(con_channel.clone(), "agent.writer.001");
        let mut consumer = traced
            .basic_consume(
                queue.as_str().into(),
                "rate".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (stop, consumed) = (Arc::clone(&stop), Arc::clone(&consumed));
        Some(tokio::spawn(async move {
            loop {
                match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                    Ok(Some(Ok(d))) => {
                        d.ack(BasicAckOptions::default()).await?;
                        consumed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(Err(e))) => return Err(BoxError::from(e)),
                    Ok(None) => return Err(BoxError::from("the consumer stream ended")),
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            let _ = con_channel.close(200, "rate done".into()).await;
            Ok::<(), BoxError>(())
        }))
    } else {
        None
    };

    let sent = Arc::new(AtomicU64::new(0));
    let telemetry = match &chain.sink {
        Sink::Telemetry(t) => Arc::clone(t),
        Sink::Discard(_) => return Err("the rate test needs mindbus-telemetry".into()),
    };
    let reporter = {
        let (sent, consumed, telemetry) = (
            Arc::clone(&sent),
            Arc::clone(&consumed),
            Arc::clone(&telemetry),
        );
        let consume = o.rate_consume;
        tokio::spawn(async move {
            let start = Instant::now();
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            interval.tick().await;
            loop {
                interval.tick().await;
                let s = telemetry.span_stats();
                println!(
                    "rate: t={:4.1}s published {:>8}{}, spans ended {:>8}, exported {:>8}, failed {:>6}, queued or dropped {:>6}",
                    start.elapsed().as_secs_f64(),
                    sent.load(Ordering::Relaxed),
                    if consume {
                        format!(" consumed {:>8}", consumed.load(Ordering::Relaxed))
                    } else {
                        String::new()
                    },
                    s.ended,
                    s.exported,
                    s.failed,
                    s.pending_or_dropped()
                );
            }
        })
    };

    let body = ctx.msgs.body.as_slice();
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    let mut max_behind = 0u64;
    let published: Res<()> = async {
        loop {
            let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
            while next < due && inflight.len() < o.window {
                inflight.push(publisher.publish(&queue, body, ctx.msgs.props(Kind::Traced)));
                next += 1;
            }
            max_behind = max_behind.max(due - next);
            if next >= total && inflight.is_empty() {
                return Ok(());
            }
            if inflight.is_empty() {
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            if next < due {
                if let Some(result) = inflight.next().await {
                    check_confirmation(result?, false)?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                tokio::select! {
                    result = inflight.next() => if let Some(result) = result {
                        check_confirmation(result?, false)?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    },
                    () = tokio::time::sleep(Duration::from_micros(500)) => {}
                }
            }
        }
    }
    .await;
    let elapsed = start.elapsed();
    drop(inflight);
    published?;
    // Barrier: the broker has read every publish once this is answered.
    ctx.count(&channel, &queue).await?;
    let broker_read = start.elapsed();
    if let Some(task) = consumer_task {
        let deadline = Instant::now() + o.timeout;
        while consumed.load(Ordering::Relaxed) < total && Instant::now() < deadline {
            if task.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        task.await
            .map_err(|e| format!("rate consumer task: {e}"))?
            .map_err(|e| format!("rate consumer: {e}"))?;
    }
    let before_flush = telemetry.span_stats();
    let flush_start = Instant::now();
    chain.flush().await?;
    let flush_took = flush_start.elapsed();
    reporter.abort();
    drop(publisher);
    let _ = channel.close(200, "rate done".into()).await;
    let achieved = total as f64 / elapsed.as_secs_f64();
    let sustained = achieved >= rate * 0.97;
    let s = telemetry.span_stats();
    println!(
        "rate: published {total} (handed to lapin) in {:.2} s = {achieved:.0} msg/s (target {rate:.0}){}; most behind schedule: {max_behind} messages; the broker had read them all after {:.2} s",
        elapsed.as_secs_f64(),
        if !sustained {
            " -- the target rate was NOT sustained"
        } else {
            ""
        },
        broker_read.as_secs_f64()
    );
    if o.rate_consume {
        println!("rate: consumed {}", consumed.load(Ordering::Relaxed));
    }
    println!(
        "rate: when publishing ended: spans ended {}, exported {}, failed {}, queued or dropped {}; the final force_flush took {:.2} s",
        before_flush.ended,
        before_flush.exported,
        before_flush.failed,
        before_flush.pending_or_dropped(),
        flush_took.as_secs_f64()
    );
    let (text, dropped) = chain.account(Kind::Traced);
    println!("rate spans: {text}");
    if let Some(receiver) = &receiver {
        println!(
            "rate spans: the receiver holds {} spans",
            receiver.span_count()
        );
    }
    println!(
        "rate verdict: {}",
        match (dropped, s.failed) {
            (0, 0) => format!(
                "no span dropped: {total} messages at {achieved:.0} msg/s over {:.1} s{}, mindbus-telemetry batch settings as above",
                elapsed.as_secs_f64(),
                if sustained {
                    String::new()
                } else {
                    format!(" (target {rate:.0} msg/s NOT reached: rerun on a quieter machine)")
                }
            ),
            (0, failed) => format!(
                "no span dropped by the batch queue; {failed} failed to export (collector down)"
            ),
            (dropped, failed) =>
                format!("{dropped} spans DROPPED by a full batch queue, {failed} failed to export"),
        }
    );
    chain.shutdown().await;
    if let Some(receiver) = receiver {
        receiver.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rate: f64, cpu_us: f64) -> Sample {
        Sample {
            rate,
            cpu_us,
            stat_us: cpu_us,
            cpu_ns_total: 0.0,
            stat_ns_total: 0.0,
        }
    }

    #[test]
    fn rounds_are_paired_not_pooled() {
        // The machine slows down from round to round; the variant is 10%
        // slower than the baseline in each round. Medians of each side
        // would give 90/100 = 0.9 here too, but the pairs' spread is what
        // shows the difference is real: every round says 0.9.
        let base = [100.0, 80.0, 60.0].map(|r| sample(r, 10.0));
        let variant = [90.0, 72.0, 54.0].map(|r| sample(r, 12.0));
        let p = paired(&variant, &base).expect("rounds");
        assert_eq!(p.rounds, 3);
        assert!((p.ratio.median - 0.9).abs() < 1e-9);
        assert!((p.ratio.min - 0.9).abs() < 1e-9 && (p.ratio.max - 0.9).abs() < 1e-9);
        assert!((p.added_cpu.median - 2.0).abs() < 1e-9);
        assert_eq!(Verdict::of(p.ratio, 0.97, true), Verdict::NotMet);
        assert_eq!(Verdict::of(p.ratio, 0.85, true), Verdict::Met);
        assert_eq!(Verdict::of(p.added_cpu, 1.5, false), Verdict::NotMet);
        assert_eq!(Verdict::of(p.added_cpu, 2.5, false), Verdict::Met);
    }

    #[test]
    fn a_goal_inside_the_spread_is_undecided() {
        let base = [100.0, 100.0, 100.0, 100.0].map(|r| sample(r, 10.0));
        let variant = [
            sample(92.0, 11.0),
            sample(99.0, 10.2),
            sample(101.0, 9.9),
            sample(95.0, 10.5),
        ];
        let p = paired(&variant, &base).expect("rounds");
        assert!((p.ratio.median - 0.97).abs() < 1e-9);
        assert_eq!((p.ratio.min, p.ratio.max), (0.92, 1.01));
        assert_eq!(Verdict::of(p.ratio, 0.97, true), Verdict::WithinNoise);
        assert_eq!(Verdict::of(p.added_cpu, 0.3, false), Verdict::WithinNoise);
        assert_eq!(Verdict::of(p.added_cpu, 1.0, false), Verdict::Met);
        assert_eq!(Verdict::of(p.added_cpu, -0.2, false), Verdict::NotMet);
    }

    #[test]
    fn no_rounds_no_comparison() {
        assert_eq!(paired(&[], &[sample(1.0, 1.0)]), None);
        let results = vec![vec![sample(100.0, 1.0)], vec![sample(90.0, 2.0)]];
        // raw and raw+headers have no goals of their own.
        assert_eq!(
            paired_line(Kind::RawHeaders, &results, 1, Some(0), None),
            None
        );
        let line = paired_line(Kind::Traced, &results, 1, Some(0), None).expect("a line");
        assert!(line.contains("vs raw (1 rounds"), "{line}");
        assert!(line.contains("x0.90 [0.90, 0.90]"), "{line}");
        assert!(
            line.contains("goal >= x0.97: NOT met in any round"),
            "{line}"
        );
    }
}
