//! One-call telemetry bootstrap for MindBus applications.
//!
//! An orchestrator or agent process calls [`init`] once at start-up and keeps the
//! returned [`Telemetry`] guard alive until it exits:
//!
//! ```no_run
//! # fn main() -> Result<(), mindbus_telemetry::Error> {
//! let telemetry = mindbus_telemetry::init(
//!     mindbus_telemetry::Config::from_env().service_name("orchestrator"),
//! )?;
//! tracing::info!("orchestrator started"); // a log line, with trace ids inside spans
//! // ... run the application ...
//! drop(telemetry); // flushes spans and logs (at most 5 s by default)
//! # Ok(())
//! # }
//! ```
//!
//! That one call sets up:
//!
//! * **Traces** — an OpenTelemetry [`SdkTracerProvider`],
//!   installed as the global provider (the MindBus plugin picks it up from there),
//!   with an OTLP exporter (gRPC or HTTP/protobuf) chosen by the standard
//!   `OTEL_EXPORTER_OTLP_*` variables, the sampler from `OTEL_TRACES_SAMPLER`, and a
//!   batch span processor sized for 30,000 spans/s. Span-producing code never waits
//!   for the network: ended spans go to a bounded queue and are exported from
//!   background threads.
//! * **A terminal trace view** — when no collector is configured (or when asked),
//!   each finished trace is printed as a tree, across every agent of the process:
//!
//!   ```text
//!   execute_task (orchestrator) 10.5ms
//!     publish mindbus.main (orchestrator) 1.2ms [producer]
//!       process agent.writer (writer) 7.2ms [consumer]
//!         llm_call (writer) 6.8ms
//!   ```
//!
//! * **Metrics** — a Prometheus recorder installed behind the [`metrics`] facade
//!   (`metrics::counter!`, `histogram!`, …), served over HTTP on `127.0.0.1:9464`.
//! * **Logs** — a `tracing` subscriber writing one line per event (text or JSON),
//!   each carrying the `trace_id` and `span_id` of the OpenTelemetry context it was
//!   emitted in, with `tracing` spans turned into OpenTelemetry spans of the same
//!   traces; optionally, log records exported by OTLP too.
//!
//! # Several agents in one process
//!
//! Each agent should report under its own `service.name`. The main provider has the
//! name from the [`Config`]; [`Telemetry::tracer_provider_for`] makes one more per
//! agent, with the same exporter settings, sampler and sizing, flushed and shut down
//! by the same guard. All of them share one trace view, so a task that crosses
//! agents in one process prints as one tree.
//!
//! ```no_run
//! use mindbus_telemetry::opentelemetry::trace::{Tracer as _, TracerProvider as _};
//! # fn main() -> Result<(), mindbus_telemetry::Error> {
//! let telemetry = mindbus_telemetry::init(
//!     mindbus_telemetry::Config::from_env().service_name("orchestrator"),
//! )?;
//! let writer = telemetry.tracer_provider_for("writer");
//! let tracer = writer.tracer("writer-agent");
//! tracer.in_span("llm_call", |_cx| { /* ... */ });
//! # Ok(())
//! # }
//! ```
//!
//! # What happens without a collector
//!
//! With no `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (and
//! no endpoint set in the [`Config`]), nothing is sent over the network: spans are
//! recorded, rendered by the terminal trace view (mode `auto` turns it on exactly
//! then) and forgotten. Metrics are still served on the local Prometheus endpoint.
//! A collector that is configured but down costs failed exports in the background
//! (reported as log warnings and in [`Telemetry::span_stats`]), never a stalled
//! application, and shutdown still returns within its timeout. After a failed
//! export the exporter backs off: batches are dropped (counted as `shed`) without
//! being encoded or sent, for 1 s, then 2 s, 4 s and 5 s while the failures
//! go on; the first batch after the pause probes the collector, and one success
//! ends the back-off. A dead collector then costs almost nothing, instead of the
//! protobuf encoding and three retries of every batch.
//!
//! # Environment variables
//!
//! [`Config::from_env`] reads these; the [`Config`] setters override them. Empty
//! values count as unset; invalid values are ignored with a warning (logged by
//! [`init`]), except an unusable endpoint URL, which makes [`init`] fail.
//!
//! | Variable | Default | Meaning |
//! |---|---|---|
//! | `OTEL_SERVICE_NAME` | [`Config::default_service_name`], else `unknown_service` | `service.name` of the main tracer provider (a `service.name` in `OTEL_RESOURCE_ATTRIBUTES` comes next) |
//! | `OTEL_RESOURCE_ATTRIBUTES` | none | Extra resource attributes, `key=value,key2=value2` (values percent-decoded), on every provider; they override the detected `service.instance.id`, `service.version` ([`Config::service_version`]), `host.name`, `host.id`, `host.arch`, `host.ip`, `os.type`, `process.pid` and Jaeger's legacy `ip` |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | none | Full traces URL, used as given |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | none | Base URL for every signal; `/v1/traces` (`/v1/logs`) is appended for `http/protobuf` |
//! | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf`, for traces |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` | `grpc` or `http/protobuf` |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, `OTEL_EXPORTER_OTLP_COMPRESSION` … | none | Read by the OTLP exporter itself (compression other than none is not compiled in) |
//! | `OTEL_TRACES_EXPORTER` | `otlp` | `none` turns trace export off (the trace view then defaults to on) |
//! | `OTEL_TRACES_SAMPLER` | `parentbased_always_on` | `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`, `parentbased_always_off`, `parentbased_traceidratio` |
//! | `OTEL_TRACES_SAMPLER_ARG` | `1.0` | Ratio (0 to 1) of the ratio samplers |
//! | `OTEL_BSP_MAX_QUEUE_SIZE` | `65536` | Spans buffered per provider before new ones are dropped |
//! | `OTEL_BSP_SCHEDULE_DELAY` | `1000` (ms) | Longest wait before a partial batch is exported |
//! | `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` | `2048` | Most spans per export request |
//! | `OTEL_BSP_EXPORT_TIMEOUT` | `3000` (ms, capped to the shutdown timeout) | Longest time one export (retries included) may take |
//! | `MINDBUS_TRACE_VIEW` | `auto` | `on`, `off`, or `auto` (on when traces are not exported) |
//! | `MINDBUS_DEPENDENCY_SPANS` | `off` | `on` also turns the `tracing` spans of lapin, h2, tonic, hyper, ... ([`DEPENDENCY_SPAN_TARGETS`]) into OpenTelemetry spans |
//! | `OTEL_METRICS_EXPORTER` | `prometheus` | `prometheus`: served for scraping on `METRICS_ADDR`; `otlp`: pushed to the collector instead, same series names and labels (a collector's Prometheus exporter shows them as the endpoint would); `none`: off |
//! | `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` | the base endpoint (+ `/v1/metrics` for HTTP) | Full metrics URL, used as given |
//! | `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL` | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf`, for metrics |
//! | `OTEL_METRIC_EXPORT_INTERVAL` | `60000` (ms) | Time between pushes (and one more at shutdown) |
//! | `METRICS_ADDR` | `127.0.0.1:9464` | Prometheus listen address; `off`/`none` disables the listener; a bare port listens on `127.0.0.1` |
//! | `RUST_LOG` | `info` | Log and span filter, `EnvFilter` syntax |
//! | `LOG_FORMAT` | `text` | `text` or `json` |
//! | `OTEL_LOGS_EXPORTER` | `none` | `otlp` also exports log records by OTLP |
//! | `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` | none | Full logs URL, used as given (else the base endpoint + `/v1/logs`) |
//! | `OTEL_EXPORTER_OTLP_LOGS_PROTOCOL` | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf`, for logs |
//!
//! Only plain `http://` endpoints are supported: this crate builds without a TLS
//! stack, for a collector on the same host or network. An `https://` endpoint is an
//! [`Error::InvalidEndpoint`].
//!
//! # Metrics
//!
//! Histograms whose name ends in `_seconds` get the buckets [`SECONDS_BUCKETS`]
//! (0.5 ms to 5 min), except the messaging and GenAI durations and the GenAI
//! token usage, which get the semantic conventions' advisory buckets
//! ([`histogram_buckets`]); `ai_team_quality_score` gets [`QUALITY_SCORE_BUCKETS`]
//! (0 to 10). The listener answers `GET /metrics` (and `/`) with the Prometheus text
//! exposition; [`Telemetry::prometheus_render`] gives the same text in-process. A
//! busy port or an already installed global recorder is a warning, not an error.
//!
//! # Logs
//!
//! A text line looks like
//!
//! ```text
//! 2026-05-04T10:00:00.123456Z  INFO execute_task: orchestrator: task done task_id=7 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7
//! ```
//!
//! and a JSON line (`LOG_FORMAT=json`) has the keys `timestamp`, `level`,
//! `target`, `message`, `fields`, `spans`, `trace_id` and `span_id`. The ids come
//! from the event's `tracing` span (the tracing-opentelemetry layer gives each one
//! an OpenTelemetry span), or, outside any `tracing` span, from the current
//! OpenTelemetry context — which is where the MindBus plugin puts its message
//! handlers (`FutureExt::with_context`). Lines go to standard error, so standard
//! output stays free for the program and the trace view.
//!
//! # Shutdown
//!
//! Dropping the [`Telemetry`] guard (or calling [`Telemetry::shutdown`]) flushes and
//! shuts down every tracer and logger provider within
//! [`Config::shutdown_timeout`] (5 s by default), in parallel. Exports run on the
//! crate's own background runtime, so this works the same from a plain `main`, a
//! multi-thread runtime or `#[tokio::main(flavor = "current_thread")]`, and returns
//! in time even when the collector is down or does not answer.
//!
//! # Versions
//!
//! The OpenTelemetry crates this one is built against are re-exported
//! ([`opentelemetry`], [`opentelemetry_sdk`], [`tracing_opentelemetry`]): use them
//! through these paths to be sure the versions match.

pub use opentelemetry;
pub use opentelemetry_sdk;
pub use tracing_opentelemetry;

mod config;
mod error;
mod export;
mod logs;
mod otel_metrics;
mod prometheus;
mod runtime;
mod view;

pub use config::{
    BatchSettings, Config, DEFAULT_METRICS_ADDR, DEFAULT_SHUTDOWN_TIMEOUT, LogFormat, LogTarget,
    OtlpProtocol, OtlpTarget, SamplerConfig, TraceViewMode, TraceViewOutput, UNKNOWN_SERVICE,
};
pub use error::Error;
pub use export::SpanStats;
pub use prometheus::{
    GENAI_DURATION_BUCKETS, GENAI_TOKEN_USAGE_BUCKETS, MESSAGING_DURATION_BUCKETS,
    QUALITY_SCORE_BUCKETS, QUALITY_SCORE_METRIC, SECONDS_BUCKETS, histogram_buckets,
};
pub use view::{
    MAX_CAPTURED_TRACES, MAX_VIEW_SPANS, MAX_VIEW_TRACES, RenderSpan, format_duration,
    render_span_line, render_trace,
};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLoggerProvider};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context as LayerContext, Filter, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::export::{CountingProcessor, ExportStats, RuntimeLogExporter, RuntimeSpanExporter};
use crate::runtime::BackgroundRuntime;
use crate::view::TraceView;

/// Instrumentation scope of the `tracing` → OpenTelemetry bridge.
const TRACING_SCOPE: &str = "mindbus-telemetry";

/// Crates whose own `tracing` spans are not turned into OpenTelemetry spans
/// unless [`Config::dependency_spans`] says so: the broker client, the HTTP/2
/// and gRPC stacks the exporters use, the runtime and OpenTelemetry itself.
/// A target matches when it is the crate's name or starts with `name::`.
pub const DEPENDENCY_SPAN_TARGETS: &[&str] = &[
    "lapin",
    "amq_protocol",
    "async_rs",
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "tower_http",
    "reqwest",
    "rustls",
    "tokio",
    "tokio_util",
    "mio",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "opentelemetry_http",
    "tracing_opentelemetry",
];

/// The resource attributes that tell one process from another, found once
/// per process: `service.instance.id` (a UUIDv7), `host.name`, `host.id`,
/// `host.arch`, `host.ip` (and Jaeger's legacy `ip`, the first of them),
/// `os.type`, `process.pid`, and `service.version` when the
/// application gave one. Without a host, backends such as Jaeger take two
/// services of one process for two hosts (and refuse to correct clock skew
/// between them). `OTEL_RESOURCE_ATTRIBUTES` and
/// [`Config::resource_attribute`] override each. Not detected on purpose:
/// `process.command_args` (a command line may hold credentials).
fn detect_resource(service_version: Option<&str>) -> Vec<KeyValue> {
    use opentelemetry_resource_detectors::{
        HostResourceDetector, OsResourceDetector, ServiceInstanceIdResourceDetector,
    };
    use opentelemetry_sdk::resource::ResourceDetector as _;
    let mut attributes: Vec<KeyValue> = [
        ServiceInstanceIdResourceDetector.detect(),
        HostResourceDetector::default().detect(),
        OsResourceDetector.detect(),
    ]
    .iter()
    .flat_map(|r| r.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
    .collect();
    attributes.push(KeyValue::new("process.pid", i64::from(std::process::id())));
    let ips = host_ips();
    if let Some(first) = ips.first() {
        // Jaeger's query API, which its UI reads, tells hosts apart by the
        // legacy `ip` process tag only: without it every parent and child
        // count as two hosts, and a reply's CONSUMER span shorter than its
        // PRODUCER span gets a clock-skew warning. Same value on every
        // process of a host (the first address in a fixed order).
        attributes.push(KeyValue::new("ip", first.clone()));
        let ips: Vec<opentelemetry::StringValue> = ips.into_iter().map(Into::into).collect();
        attributes.push(KeyValue::new(
            "host.ip",
            opentelemetry::Value::Array(ips.into()),
        ));
    }
    if let Some(version) = service_version {
        attributes.push(KeyValue::new("service.version", version.to_owned()));
    }
    attributes
}

/// The host's addresses but loopback and link-local ones, IPv4 first, each
/// family sorted (so every process of a host lists them alike).
fn host_ips() -> Vec<String> {
    let mut ips: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback() && !i.is_link_local())
        .map(|i| i.ip())
        .collect();
    ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    ips.dedup();
    ips.iter().map(ToString::to_string).collect()
}

/// Whether `target` belongs to one of [`DEPENDENCY_SPAN_TARGETS`].
fn is_dependency(target: &str) -> bool {
    DEPENDENCY_SPAN_TARGETS.iter().any(|name| {
        target
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Extra time granted to an export over the OTLP exporter's own timeout, so that the
/// exporter reports its own (more precise) error first.
const EXPORT_TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

/// Sets up traces, the terminal trace view, metrics and logs as `config` says, and
/// returns the guard that shuts them down.
///
/// # Errors
///
/// Only for configuration that cannot work: an OTLP endpoint that is not a valid
/// `http://` URL ([`Error::InvalidEndpoint`]), an exporter that cannot be built, or
/// a background thread that cannot be started. Everything else (a busy metrics port,
/// a global subscriber or recorder already installed, invalid environment values)
/// is logged as a warning and listed in [`Telemetry::warnings`].
pub fn init(config: Config) -> Result<Telemetry, Error> {
    let mut warnings = config.warnings.clone();
    let service_name = config.resolved_service_name().to_owned();
    let batch = config.batch_settings();
    let traces_target = config.traces_target();
    let mut logs_target = config.logs_target();
    if config.otlp_logs && logs_target.is_none() {
        warnings.push(
            "OTLP log export is on but no logs endpoint is configured; logs are not exported"
                .to_owned(),
        );
    }
    if logs_target.is_some() && !config.install_subscriber {
        warnings.push(
            "OTLP log export needs the global subscriber, which is not installed; logs are not exported"
                .to_owned(),
        );
        logs_target = None;
    }

    let needs_runtime = traces_target.is_some() || logs_target.is_some() || config.metrics;
    let runtime = if needs_runtime {
        Some(Arc::new(
            BackgroundRuntime::start().map_err(Error::Runtime)?,
        ))
    } else {
        None
    };
    let view = config
        .trace_view_enabled()
        .then(|| TraceView::new(config.trace_view_output));

    let mut telemetry = Telemetry {
        service_name,
        traces: config.traces,
        traces_target,
        batch,
        sampler: config.sampler,
        detected: detect_resource(config.service_version.as_deref()),
        resource_attributes: config
            .extra_resource_attributes()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
        runtime,
        view,
        stats: Arc::new(ExportStats::default()),
        closed: Arc::new(AtomicBool::new(false)),
        tracer_provider: None,
        extra_providers: Mutex::new(Vec::new()),
        logger_provider: None,
        meter_provider: None,
        metrics: prometheus::Metrics {
            handle: None,
            addr: None,
        },
        warnings: Vec::new(),
        shutdown_timeout: config.shutdown_timeout,
        shut_down: AtomicBool::new(false),
        subscriber_installed: false,
    };

    if config.traces {
        let provider = telemetry.build_tracer_provider(&telemetry.service_name)?;
        if config.install_tracer_provider {
            opentelemetry::global::set_tracer_provider(provider.clone());
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
        }
        telemetry.tracer_provider = Some(provider);
    }

    if let (Some(target), Some(runtime)) = (&logs_target, &telemetry.runtime) {
        let exporter = export::build_log_exporter(target, batch.export_timeout, runtime.handle())?;
        let exporter = RuntimeLogExporter::new(
            exporter,
            runtime.handle().clone(),
            batch.export_timeout + EXPORT_TIMEOUT_MARGIN,
            Arc::clone(&telemetry.closed),
        );
        telemetry.logger_provider = Some(
            SdkLoggerProvider::builder()
                .with_resource(telemetry.resource(&telemetry.service_name))
                .with_log_processor(BatchLogProcessor::builder(exporter).build())
                .build(),
        );
    }

    if config.metrics {
        match (config.metrics_target(), &telemetry.runtime) {
            (Some(target), Some(runtime)) => {
                let exporter =
                    export::build_metric_exporter(&target, batch.export_timeout, runtime.handle())?;
                let exporter = export::RuntimeMetricExporter::new(
                    exporter,
                    runtime.handle().clone(),
                    batch.export_timeout + EXPORT_TIMEOUT_MARGIN,
                    Arc::clone(&telemetry.closed),
                );
                let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(config.metric_export_interval)
                    .build();
                let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
                    .with_resource(telemetry.resource(&telemetry.service_name))
                    .with_reader(reader)
                    .build();
                use opentelemetry::metrics::MeterProvider as _;
                let recorder = otel_metrics::OtelRecorder::new(provider.meter("mindbus-otel"));
                if let Err(error) = metrics::set_global_recorder(recorder) {
                    warnings.push(format!(
                        "a global metrics recorder is already installed ({error}); metrics go to it, not by OTLP"
                    ));
                }
                telemetry.meter_provider = Some(provider);
            }
            _ if config.otlp_metrics => warnings.push(
                "OTEL_METRICS_EXPORTER=otlp, but no OTLP endpoint is configured; metrics are not exported"
                    .to_owned(),
            ),
            _ => {
                telemetry.metrics = prometheus::install(
                    config.metrics_listen_addr(),
                    telemetry.runtime.as_ref().map(|runtime| runtime.handle()),
                    &mut warnings,
                );
            }
        }
    }

    if config.install_subscriber {
        let filter = match EnvFilter::try_new(&config.log_filter) {
            Ok(filter) => filter,
            Err(error) => {
                warnings.push(format!(
                    "invalid log filter {:?} ({error}); using `info`",
                    config.log_filter
                ));
                EnvFilter::new("info")
            }
        };
        let bridge_dependencies = config.dependency_spans;
        let otel_layer = telemetry.tracer_provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(TRACING_SCOPE))
                .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
                    bridge_dependencies || !(meta.is_span() && is_dependency(meta.target()))
                }))
        });
        let format = logs::TraceAwareFormat {
            format: config.log_format,
        };
        let fmt_layer = config.logs.then(|| {
            let layer = tracing_subscriber::fmt::layer().event_format(format);
            match config.log_target {
                LogTarget::Stdout => layer.with_writer(std::io::stdout).boxed(),
                _ => layer.with_writer(std::io::stderr).boxed(),
            }
        });
        let bridge = telemetry.logger_provider.as_ref().map(|provider| {
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(provider)
                .with_filter(ExportFilter {
                    closed: Arc::clone(&telemetry.closed),
                })
        });
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(otel_layer)
            .with(fmt_layer)
            .with(bridge);
        match tracing::subscriber::set_global_default(subscriber) {
            Ok(()) => telemetry.subscriber_installed = true,
            Err(_) => warnings.push(
                "a global tracing subscriber is already installed; keeping it (no log formatting or tracing-span bridge from mindbus-telemetry)"
                    .to_owned(),
            ),
        }
    }

    for warning in &warnings {
        tracing::warn!(target: "mindbus_telemetry", "{warning}");
    }
    telemetry.warnings = warnings;
    tracing::debug!(
        target: "mindbus_telemetry",
        service = %telemetry.service_name,
        traces = ?telemetry.traces_target,
        trace_view = telemetry.view.is_some(),
        metrics_addr = ?telemetry.metrics.addr,
        "telemetry initialised"
    );
    Ok(telemetry)
}

/// Lets through to the OTLP log exporter only application events, and nothing once
/// the exporter is shut down.
struct ExportFilter {
    closed: Arc<AtomicBool>,
}

impl<S> Filter<S> for ExportFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _cx: &LayerContext<'_, S>) -> bool {
        !self.closed.load(Ordering::Relaxed) && logs::exportable_target(metadata.target())
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if logs::exportable_target(metadata.target()) {
            // Decided per event: the exporter may shut down later.
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

/// The running telemetry: keep it alive for the life of the program.
///
/// Dropping it (or calling [`shutdown`](Self::shutdown)) flushes and shuts down
/// every provider within the configured timeout. The global `tracing` subscriber and
/// metrics recorder stay installed (they cannot be removed); spans ended after
/// shutdown are discarded.
#[must_use = "dropping the Telemetry guard shuts telemetry down: keep it alive until the program ends"]
pub struct Telemetry {
    service_name: String,
    traces: bool,
    traces_target: Option<OtlpTarget>,
    batch: BatchSettings,
    sampler: SamplerConfig,
    /// What [`detect_resource`] found, once per process.
    detected: Vec<KeyValue>,
    resource_attributes: Vec<(String, String)>,
    runtime: Option<Arc<BackgroundRuntime>>,
    view: Option<Arc<TraceView>>,
    stats: Arc<ExportStats>,
    closed: Arc<AtomicBool>,
    tracer_provider: Option<SdkTracerProvider>,
    extra_providers: Mutex<Vec<(String, SdkTracerProvider)>>,
    logger_provider: Option<SdkLoggerProvider>,
    /// Metrics pushed by OTLP (`OTEL_METRICS_EXPORTER=otlp`).
    meter_provider: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
    metrics: prometheus::Metrics,
    warnings: Vec<String>,
    shutdown_timeout: Duration,
    shut_down: AtomicBool,
    subscriber_installed: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("service_name", &self.service_name)
            .field("traces_target", &self.traces_target)
            .field("trace_view", &self.view.is_some())
            .field("metrics_addr", &self.metrics.addr)
            .field("subscriber_installed", &self.subscriber_installed)
            .field("shut_down", &self.shut_down.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    fn resource(&self, service_name: &str) -> Resource {
        Resource::builder_empty()
            .with_detector(Box::new(
                opentelemetry_sdk::resource::TelemetryResourceDetector,
            ))
            .with_attributes(self.detected.iter().cloned())
            .with_attributes(
                self.resource_attributes
                    .iter()
                    .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
            )
            .with_service_name(service_name.to_owned())
            .build()
    }

    fn build_tracer_provider(&self, service_name: &str) -> Result<SdkTracerProvider, Error> {
        let mut builder = SdkTracerProvider::builder()
            .with_resource(self.resource(service_name))
            .with_sampler(self.sampler.to_sampler());
        if let Some(view) = &self.view {
            builder = builder.with_span_processor(view.processor(service_name));
        }
        if let (Some(target), Some(runtime)) = (&self.traces_target, &self.runtime) {
            let exporter =
                export::build_span_exporter(target, self.batch.export_timeout, runtime.handle())?;
            let exporter = RuntimeSpanExporter::new(
                exporter,
                runtime.handle().clone(),
                self.batch.export_timeout + EXPORT_TIMEOUT_MARGIN,
                Arc::clone(&self.stats),
                Arc::clone(&self.closed),
            );
            let batch_config = BatchConfigBuilder::default()
                .with_max_queue_size(self.batch.max_queue_size)
                .with_scheduled_delay(self.batch.scheduled_delay)
                .with_max_export_batch_size(self.batch.max_export_batch_size)
                .build();
            let processor = BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch_config)
                .build();
            builder = builder
                .with_span_processor(CountingProcessor::new(processor, Arc::clone(&self.stats)));
        }
        Ok(builder.build())
    }

    /// The `service.name` of the main tracer provider.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The main tracer provider (`None` when traces are off). It is also the global
    /// provider unless [`Config::install_tracer_provider`] said otherwise.
    pub fn tracer_provider(&self) -> Option<&SdkTracerProvider> {
        self.tracer_provider.as_ref()
    }

    /// Builds another tracer provider with its own `service.name`, for one more
    /// agent of this process: same exporter settings, sampler, batch sizing and
    /// resource attributes, its own OTLP connection, and the shared trace view. The
    /// guard keeps it and flushes and shuts it down with the others.
    ///
    /// When traces are off, the provider samples nothing. A provider made after
    /// [`shutdown`](Self::shutdown) exports nothing.
    pub fn tracer_provider_for(&self, service_name: impl Into<String>) -> SdkTracerProvider {
        let service_name = service_name.into();
        if !self.traces {
            return SdkTracerProvider::builder()
                .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOff)
                .with_resource(self.resource(&service_name))
                .build();
        }
        let provider = match self.build_tracer_provider(&service_name) {
            Ok(provider) => provider,
            Err(error) => {
                // The endpoint was validated by `init`; should this still fail, the
                // agent's spans are at least recorded for the trace view.
                tracing::warn!(target: "mindbus_telemetry", %error, service = %service_name, "cannot build an exporting tracer provider");
                let mut builder = SdkTracerProvider::builder()
                    .with_resource(self.resource(&service_name))
                    .with_sampler(self.sampler.to_sampler());
                if let Some(view) = &self.view {
                    builder = builder.with_span_processor(view.processor(&service_name));
                }
                builder.build()
            }
        };
        if let Ok(mut providers) = self.extra_providers.lock() {
            providers.push((service_name, provider.clone()));
        }
        provider
    }

    /// Where traces are exported, `None` when they are not.
    pub fn traces_target(&self) -> Option<&OtlpTarget> {
        self.traces_target.as_ref()
    }

    /// Span counts of the exporting providers (all zero when traces are not
    /// exported): spans ended, exported, failed.
    pub fn span_stats(&self) -> SpanStats {
        self.stats.snapshot()
    }

    /// Spans the collector accepted so far, over every provider of this guard.
    pub fn spans_exported(&self) -> u64 {
        self.stats.snapshot().exported
    }

    /// Whether the terminal trace view is on.
    pub fn trace_view_enabled(&self) -> bool {
        self.view.is_some()
    }

    /// Takes the traces rendered so far by the trace view in
    /// [`TraceViewOutput::Capture`] mode, oldest first (empty in the other modes or
    /// with the view off).
    pub fn take_rendered_traces(&self) -> Vec<String> {
        self.view
            .as_ref()
            .map(|view| view.take_rendered())
            .unwrap_or_default()
    }

    /// Spans the trace view forgot before their trace finished, to stay within its
    /// memory bounds.
    pub fn trace_view_dropped_spans(&self) -> u64 {
        self.view.as_ref().map_or(0, |view| view.dropped_spans())
    }

    /// The current Prometheus exposition text, `None` when metrics are off or
    /// another global recorder was already installed.
    pub fn prometheus_render(&self) -> Option<String> {
        self.metrics.handle.as_ref().map(|handle| handle.render())
    }

    /// The address the Prometheus listener is bound to (with the real port when
    /// port 0 was asked for), `None` when there is no listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.addr
    }

    /// Whether the global `tracing` subscriber is this crate's.
    pub fn subscriber_installed(&self) -> bool {
        self.subscriber_installed
    }

    /// The problems [`init`] worked around (each was also logged as a warning).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Exports every span and log record ended so far, all providers in parallel,
    /// and returns whether everything was exported. Blocks until then, for at most
    /// the SDK's flush timeout (5 s) — call it from a blocking context, not from a
    /// task of a busy async runtime. Spans are exported continuously anyway; this is
    /// for a demo or test that wants them at the collector *now*.
    pub fn force_flush(&self) -> bool {
        let timeout = self.shutdown_timeout;
        let meters_ok = self
            .meter_provider
            .as_ref()
            .is_none_or(|meters| meters.force_flush().is_ok());
        self.each_provider_in_parallel(
            Instant::now() + timeout,
            |provider, _remaining| provider.force_flush(),
            |logger, _remaining| logger.force_flush(),
        )
        .is_empty()
            && meters_ok
    }

    /// Flushes and shuts down every provider within the shutdown timeout, then stops
    /// the background runtime (and with it the metrics listener). Idempotent; also
    /// done on drop.
    ///
    /// # Errors
    ///
    /// [`Error::Shutdown`] when some provider could not flush in time or its export
    /// failed; the shutdown is complete all the same.
    pub fn shutdown(&self) -> Result<(), Error> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        let mut failures = self.each_provider_in_parallel(
            deadline,
            |provider, remaining| provider.shutdown_with_timeout(remaining),
            |logger, remaining| logger.shutdown_with_timeout(remaining),
        );
        // The last metrics export, while the runtime still runs.
        if let Some(meters) = &self.meter_provider {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match meters.shutdown_with_timeout(remaining) {
                Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
                Err(error) => failures.push(format!("metrics: {error}")),
            }
        }
        // Exports still in flight are abandoned from here on.
        self.closed.store(true, Ordering::Release);
        if let Some(runtime) = &self.runtime {
            runtime.stop(deadline);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Shutdown(failures.join("; ")))
        }
    }

    /// Runs `traces` on every tracer provider and `logs` on the logger provider, in
    /// parallel, each with the time left until `deadline`; returns the failures.
    fn each_provider_in_parallel<T, L>(&self, deadline: Instant, traces: T, logs: L) -> Vec<String>
    where
        T: Fn(&SdkTracerProvider, Duration) -> Result<(), OTelSdkError> + Sync,
        L: Fn(&SdkLoggerProvider, Duration) -> Result<(), OTelSdkError> + Sync,
    {
        let mut providers: Vec<(String, SdkTracerProvider)> = Vec::new();
        if let Some(provider) = &self.tracer_provider {
            providers.push((self.service_name.clone(), provider.clone()));
        }
        if let Ok(extra) = self.extra_providers.lock() {
            providers.extend(extra.iter().cloned());
        }
        let failures = Mutex::new(Vec::new());
        let record = |what: &str, result: Result<(), OTelSdkError>| match result {
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
            Err(error) => {
                if let Ok(mut failures) = failures.lock() {
                    failures.push(format!("{what}: {error}"));
                }
            }
        };
        let remaining = || deadline.saturating_duration_since(Instant::now());
        std::thread::scope(|scope| {
            let (record, traces, remaining) = (&record, &traces, &remaining);
            for (name, provider) in &providers {
                let task =
                    move || record(&format!("traces ({name})"), traces(provider, remaining()));
                let spawned = std::thread::Builder::new()
                    .name("mindbus-telemetry-shutdown".to_owned())
                    .spawn_scoped(scope, task);
                if spawned.is_err() {
                    record(&format!("traces ({name})"), traces(provider, remaining()));
                }
            }
            if let Some(logger) = &self.logger_provider {
                record("logs", logs(logger, remaining()));
            }
        });
        failures.into_inner().unwrap_or_default()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::warn!(target: "mindbus_telemetry", %error, "telemetry shutdown incomplete");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn guard_and_config_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<super::Telemetry>();
        assert_send_sync::<super::Config>();
        assert_send_sync::<super::Error>();
    }
}

#[cfg(test)]
mod dependency_tests {
    use super::is_dependency;

    #[test]
    fn dependency_targets_match_whole_crate_names() {
        assert!(is_dependency("lapin"));
        assert!(is_dependency("lapin::io_loop"));
        assert!(is_dependency("h2::proto::streams"));
        assert!(
            !is_dependency("lapinous::x"),
            "a prefix of a name is not the crate"
        );
        assert!(!is_dependency("ai_team"));
        assert!(!is_dependency("mindbus_otel::spans"));
    }
}
