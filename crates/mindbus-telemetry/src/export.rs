//! OTLP exporters driven by the background runtime, with export counting.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::logs::{LogBatch, LogExporter, SdkLogRecord};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use tokio::runtime::Handle;

use crate::config::{OtlpProtocol, OtlpTarget};
use crate::error::Error;

/// Counters shared by every provider of one [`Telemetry`](crate::Telemetry).
#[derive(Debug, Default)]
pub(crate) struct ExportStats {
    pub(crate) ended: AtomicU64,
    pub(crate) exported: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) shed: AtomicU64,
}

/// Span counts of the exporting providers, for comparing spans started with spans
/// exported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpanStats {
    /// Sampled spans that ended and were handed to a batch processor.
    pub ended: u64,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans whose export failed (collector down, timeout, error answer).
    pub failed: u64,
    /// Of `failed`: spans dropped without an export attempt, while the
    /// exporter backed off from a collector that had just failed (see
    /// [`init`](crate::init)): they cost no encoding and no connection.
    pub shed: u64,
}

impl SpanStats {
    /// Spans handed to a batch processor but neither exported nor failed: still
    /// queued, or dropped because the queue was full.
    pub fn pending_or_dropped(&self) -> u64 {
        self.ended.saturating_sub(self.exported + self.failed)
    }
}

impl ExportStats {
    pub(crate) fn snapshot(&self) -> SpanStats {
        SpanStats {
            ended: self.ended.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
        }
    }
}

/// Checks that an OTLP endpoint is a plain `http://host[:port][/path]` URL.
pub(crate) fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err("missing scheme: write it as http://HOST:PORT".to_owned());
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(
            "https needs TLS, which this build does not include; send to a local collector over http://"
                .to_owned(),
        );
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("unsupported scheme {scheme:?}: use http://"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    if host_port.is_empty() {
        return Err("missing host".to_owned());
    }
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => return Err("unterminated IPv6 address".to_owned()),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("missing or malformed host".to_owned());
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("invalid port {port:?}"));
    }
    Ok(())
}

/// Builds an OTLP exporter of type `$exporter` for `target`, inside the
/// background runtime's context (tonic spawns its connection task there):
/// one body for every signal, with the signal's extra builder calls.
macro_rules! build_otlp_exporter {
    ($signal:literal, $exporter:ty, $target:expr, $timeout:expr, $handle:expr
        $(, $extra:ident($arg:expr))*) => {{
        let target: &OtlpTarget = $target;
        validate_endpoint(&target.endpoint).map_err(|reason| Error::InvalidEndpoint {
            signal: $signal,
            endpoint: target.endpoint.clone(),
            reason,
        })?;
        let _runtime = $handle.enter();
        let built = match target.protocol {
            OtlpProtocol::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_endpoint(target.endpoint.clone())
                .with_timeout($timeout)
                $(.$extra($arg))*
                .build(),
            OtlpProtocol::HttpProtobuf => <$exporter>::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(target.endpoint.clone())
                .with_timeout($timeout)
                $(.$extra($arg))*
                .build(),
        };
        built.map_err(|error| exporter_error($signal, &target.endpoint, error))
    }};
}

/// Builds the OTLP span exporter for `target`.
pub(crate) fn build_span_exporter(
    target: &OtlpTarget,
    timeout: Duration,
    handle: &Handle,
) -> Result<opentelemetry_otlp::SpanExporter, Error> {
    build_otlp_exporter!(
        "traces",
        opentelemetry_otlp::SpanExporter,
        target,
        timeout,
        handle
    )
}

/// Builds the OTLP log exporter for `target`.
pub(crate) fn build_log_exporter(
    target: &OtlpTarget,
    timeout: Duration,
    handle: &Handle,
) -> Result<opentelemetry_otlp::LogExporter, Error> {
    build_otlp_exporter!(
        "logs",
        opentelemetry_otlp::LogExporter,
        target,
        timeout,
        handle
    )
}

/// Builds the OTLP metric exporter for `target` (cumulative, as Prometheus
/// reads sums).
pub(crate) fn build_metric_exporter(
    target: &OtlpTarget,
    timeout: Duration,
    handle: &Handle,
) -> Result<opentelemetry_otlp::MetricExporter, Error> {
    let cumulative = opentelemetry_sdk::metrics::Temporality::Cumulative;
    build_otlp_exporter!(
        "metrics",
        opentelemetry_otlp::MetricExporter,
        target,
        timeout,
        handle,
        with_temporality(cumulative)
    )
}

/// A metric exporter that runs the wrapped OTLP exporter on the background
/// runtime. The periodic reader calls it from its own thread (never a
/// runtime's), which waits for the export, bounded by the timeout.
#[derive(Debug)]
pub(crate) struct RuntimeMetricExporter {
    inner: opentelemetry_otlp::MetricExporter,
    handle: Handle,
    timeout: Duration,
    closed: Arc<AtomicBool>,
}

impl RuntimeMetricExporter {
    pub(crate) fn new(
        inner: opentelemetry_otlp::MetricExporter,
        handle: Handle,
        timeout: Duration,
        closed: Arc<AtomicBool>,
    ) -> RuntimeMetricExporter {
        RuntimeMetricExporter {
            inner,
            handle,
            timeout,
            closed,
        }
    }
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for RuntimeMetricExporter {
    fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> impl Future<Output = OTelSdkResult> + Send {
        let result = if self.closed.load(Ordering::Acquire)
            || tokio::runtime::Handle::try_current().is_ok()
        {
            // Shut down, or (never from the reader's thread) inside a
            // runtime, where blocking on another runtime is not allowed.
            Err(OTelSdkError::AlreadyShutdown)
        } else {
            // The timer is the runtime's: the timeout is made inside it.
            let export =
                async { tokio::time::timeout(self.timeout, self.inner.export(metrics)).await };
            match self.handle.block_on(export) {
                Ok(result) => result,
                Err(_) => Err(OTelSdkError::Timeout(self.timeout)),
            }
        };
        std::future::ready(result)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

fn exporter_error(
    signal: &'static str,
    endpoint: &str,
    error: opentelemetry_otlp::ExporterBuildError,
) -> Error {
    match error {
        opentelemetry_otlp::ExporterBuildError::InvalidConfiguration(reason) => {
            Error::InvalidEndpoint {
                signal,
                endpoint: endpoint.to_owned(),
                reason,
            }
        }
        other => Error::Exporter {
            signal,
            reason: other.to_string(),
        },
    }
}

/// Outcome of a task run on the background runtime with a timeout.
fn settle(
    outcome: Result<Result<OTelSdkResult, tokio::time::error::Elapsed>, tokio::task::JoinError>,
    timeout: Duration,
) -> OTelSdkResult {
    match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(_elapsed)) => Err(OTelSdkError::Timeout(timeout)),
        Err(error) => Err(OTelSdkError::InternalFailure(format!(
            "export abandoned: {error}"
        ))),
    }
}

/// The first pause after a failed export.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause between two attempts at a failing collector.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Backs off from a collector that fails: after a failed export, batches are
/// dropped (and counted) without being encoded or sent until the pause is
/// over; the next batch then probes the collector. Each failure in a row
/// doubles the pause (1 s, 2 s, 4 s, then 5 s); one success ends it.
///
/// Without it a dead collector costs more CPU than a working one: the OTLP
/// exporter converts every batch to protobuf and retries it three times.
/// Either way the spans of a collector outage are lost (the queue overflows
/// while retries wait); with it they are lost cheaply, and at most one pause
/// of spans after the collector comes back.
#[derive(Debug)]
pub(crate) struct Breaker {
    origin: Instant,
    /// When the next attempt may go, in milliseconds since `origin`.
    next_attempt_ms: AtomicU64,
    failures: AtomicU32,
}

impl Breaker {
    pub(crate) fn new() -> Breaker {
        Breaker {
            origin: Instant::now(),
            next_attempt_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True when an export may be attempted at `now_ms`.
    fn allows(&self, now_ms: u64) -> bool {
        now_ms >= self.next_attempt_ms.load(Ordering::Acquire)
    }

    /// Records an attempt's outcome, finished at `now_ms`.
    fn record(&self, ok: bool, now_ms: u64) {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.next_attempt_ms.store(0, Ordering::Release);
            return;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let pause = FIRST_PAUSE
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(MAX_PAUSE);
        let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        self.next_attempt_ms
            .store(now_ms.saturating_add(pause_ms), Ordering::Release);
    }
}

/// A span exporter that runs the wrapped OTLP exporter on the background runtime,
/// bounds every export by a timeout, counts exported and failed spans, and
/// backs off from a failing collector ([`Breaker`]).
#[derive(Debug)]
pub(crate) struct RuntimeSpanExporter {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    handle: Handle,
    timeout: Duration,
    stats: Arc<ExportStats>,
    closed: Arc<AtomicBool>,
    breaker: Arc<Breaker>,
}

impl RuntimeSpanExporter {
    pub(crate) fn new(
        inner: opentelemetry_otlp::SpanExporter,
        handle: Handle,
        timeout: Duration,
        stats: Arc<ExportStats>,
        closed: Arc<AtomicBool>,
    ) -> RuntimeSpanExporter {
        RuntimeSpanExporter {
            inner: Arc::new(inner),
            handle,
            timeout,
            stats,
            closed,
            breaker: Arc::new(Breaker::new()),
        }
    }
}

impl SpanExporter for RuntimeSpanExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let count = batch.len() as u64;
        let stats = Arc::clone(&self.stats);
        let breaker = Arc::clone(&self.breaker);
        let timeout = self.timeout;
        let closed = self.closed.load(Ordering::Acquire);
        let attempt = !closed && breaker.allows(breaker.now_ms());
        // Spawned now, so the batch never waits for the caller's executor.
        let task = attempt.then(|| {
            let inner = Arc::clone(&self.inner);
            self.handle.spawn(async move {
                // The OTLP exporter's own timeout bounds its retries; this one
                // bounds everything else (a connection that never completes).
                tokio::time::timeout(timeout, inner.export(batch)).await
            })
        });
        async move {
            let result = match task {
                Some(task) => {
                    let result = settle(task.await, timeout);
                    breaker.record(result.is_ok(), breaker.now_ms());
                    result
                }
                None if closed => Err(OTelSdkError::AlreadyShutdown),
                None => {
                    stats.shed.fetch_add(count, Ordering::Relaxed);
                    Err(OTelSdkError::InternalFailure(
                        "collector failed recently: batch dropped while backing off".to_owned(),
                    ))
                }
            };
            let counter = if result.is_ok() {
                &stats.exported
            } else {
                &stats.failed
            };
            counter.fetch_add(count, Ordering::Relaxed);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while the provider is built, before any export holds a clone.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// A log exporter that runs the wrapped OTLP exporter on the background runtime.
#[derive(Debug)]
pub(crate) struct RuntimeLogExporter {
    inner: Arc<opentelemetry_otlp::LogExporter>,
    handle: Handle,
    timeout: Duration,
    closed: Arc<AtomicBool>,
}

impl RuntimeLogExporter {
    pub(crate) fn new(
        inner: opentelemetry_otlp::LogExporter,
        handle: Handle,
        timeout: Duration,
        closed: Arc<AtomicBool>,
    ) -> RuntimeLogExporter {
        RuntimeLogExporter {
            inner: Arc::new(inner),
            handle,
            timeout,
            closed,
        }
    }
}

impl LogExporter for RuntimeLogExporter {
    fn export(&self, batch: LogBatch<'_>) -> impl Future<Output = OTelSdkResult> + Send {
        let timeout = self.timeout;
        let task = (!self.closed.load(Ordering::Acquire)).then(|| {
            // The batch borrows the processor's buffer: copy it for the task.
            let owned: Vec<(SdkLogRecord, InstrumentationScope)> = batch
                .iter()
                .map(|(record, scope)| (record.clone(), scope.clone()))
                .collect();
            let inner = Arc::clone(&self.inner);
            self.handle.spawn(async move {
                let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> = owned
                    .iter()
                    .map(|(record, scope)| (record, scope))
                    .collect();
                tokio::time::timeout(timeout, inner.export(LogBatch::new(&refs))).await
            })
        });
        async move {
            match task {
                Some(task) => settle(task.await, timeout),
                None => Err(OTelSdkError::AlreadyShutdown),
            }
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Wraps a span processor (the batch processor) to count the spans it receives.
#[derive(Debug)]
pub(crate) struct CountingProcessor<P> {
    inner: P,
    stats: Arc<ExportStats>,
}

impl<P> CountingProcessor<P> {
    pub(crate) fn new(inner: P, stats: Arc<ExportStats>) -> CountingProcessor<P> {
        CountingProcessor { inner, stats }
    }
}

impl<P: SpanProcessor> SpanProcessor for CountingProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.stats.ended.fetch_add(1, Ordering::Relaxed);
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_backs_off_and_closes_on_success() {
        let b = Breaker::new();
        assert!(b.allows(0));
        b.record(true, 10);
        assert!(b.allows(10));
        // Failures in a row: 1 s, 2 s, 4 s, then 5 s.
        let mut at = 1_000;
        for pause in [1_000, 2_000, 4_000, 5_000, 5_000, 5_000] {
            b.record(false, at);
            assert!(!b.allows(at), "{pause}");
            assert!(!b.allows(at + pause - 1), "{pause}");
            assert!(b.allows(at + pause), "{pause}");
            at += pause;
        }
        // One success ends the pause and the escalation.
        b.record(true, at);
        assert!(b.allows(at));
        b.record(false, at);
        assert!(b.allows(at + 1_000) && !b.allows(at + 999));
    }

    #[test]
    fn endpoints() {
        for good in [
            "http://127.0.0.1:4317",
            "http://localhost:4318/v1/traces",
            "HTTP://collector",
            "http://[::1]:4317",
            "http://user@127.0.0.1:4318/",
        ] {
            assert_eq!(validate_endpoint(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1:4317",
            "https://collector:4317",
            "ftp://x",
            "http://",
            "http://:4317",
            "http://host:port",
            "http://host:99999",
            "http://[::1:4317",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
        assert!(validate_endpoint("https://x").unwrap_err().contains("TLS"));
    }

    #[test]
    fn stats() {
        let stats = SpanStats {
            ended: 10,
            exported: 6,
            failed: 1,
            shed: 1,
        };
        assert_eq!(stats.pending_or_dropped(), 3);
    }
}
