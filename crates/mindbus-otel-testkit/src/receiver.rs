//! The in-process OTLP receiver: shared state, gRPC service and lifecycle.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::model::{ReceivedSpan, spans_from_request};
use crate::signals::{
    ReceivedLog, ReceivedMetricPoint, logs_from_request, metric_points_from_request,
};
use crate::spanset::SpanSet;

/// Largest accepted export request (gRPC message or HTTP body), in bytes.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Received items of one signal, and their count (to wait on).
pub(crate) struct Store<T> {
    items: Mutex<Vec<T>>,
    count: watch::Sender<usize>,
}

impl<T: Clone> Store<T> {
    fn new() -> Self {
        Store {
            items: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        // A panic while holding the lock cannot leave the Vec half-updated.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, new: Vec<T>) {
        let total = {
            let mut items = self.lock();
            items.extend(new);
            items.len()
        };
        self.count.send_replace(total);
    }

    fn snapshot(&self) -> Vec<T> {
        self.lock().clone()
    }

    fn clear(&self) {
        self.lock().clear();
        self.count.send_replace(0);
    }

    /// Waits until `condition` holds for the items, or `timeout`; the items.
    async fn wait_until(&self, timeout: Duration, condition: impl Fn(&[T]) -> bool) -> Vec<T> {
        let mut rx = self.count.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if condition(&self.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.snapshot()
    }
}

/// How the receiver answers export requests; see [`OtlpReceiver::set_mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Store the spans and answer with success (the default).
    #[default]
    Accept,
    /// Drop the spans and answer gRPC status `UNAVAILABLE` / HTTP `503 Service
    /// Unavailable` (both retryable per the OTLP spec).
    Unavailable,
    /// Read the request, then never answer it, so that the exporter's timeout fires.
    ///
    /// A held request is released when the mode changes or the receiver stops; it is
    /// then answered as [`Mode::Unavailable`] and its spans are dropped.
    Hang,
}

/// The outcome of one export request.
pub(crate) enum Outcome {
    Accepted,
    Unavailable,
}

/// State shared by the receiver handle and its server tasks.
pub(crate) struct Shared {
    spans: Store<ReceivedSpan>,
    logs: Store<ReceivedLog>,
    metrics: Store<ReceivedMetricPoint>,
    mode: watch::Sender<Mode>,
    shutdown: watch::Sender<bool>,
    grpc_requests: AtomicUsize,
    http_requests: AtomicUsize,
}

impl Shared {
    fn new() -> Self {
        Shared {
            spans: Store::new(),
            logs: Store::new(),
            metrics: Store::new(),
            mode: watch::Sender::new(Mode::Accept),
            shutdown: watch::Sender::new(false),
            grpc_requests: AtomicUsize::new(0),
            http_requests: AtomicUsize::new(0),
        }
    }

    pub(crate) fn count_http_request(&self) {
        self.http_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Resolves once the receiver is stopping.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        // The sender lives as long as `self`, so this only returns when stopping.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// How the current mode answers an export request (a held one once
    /// released).
    async fn admit(&self) -> Outcome {
        let mode = *self.mode.borrow();
        match mode {
            Mode::Accept => Outcome::Accepted,
            Mode::Unavailable => Outcome::Unavailable,
            Mode::Hang => {
                let mut mode_rx = self.mode.subscribe();
                tokio::select! {
                    _ = mode_rx.wait_for(|m| *m != Mode::Hang) => {}
                    () = self.stopped() => {}
                }
                Outcome::Unavailable
            }
        }
    }

    /// Applies the current mode to a trace export request.
    pub(crate) async fn export(&self, request: &ExportTraceServiceRequest) -> Outcome {
        let outcome = self.admit().await;
        if let Outcome::Accepted = outcome {
            self.spans.add(spans_from_request(request));
        }
        outcome
    }

    /// Applies the current mode to a logs export request.
    pub(crate) async fn export_logs(&self, request: &ExportLogsServiceRequest) -> Outcome {
        let outcome = self.admit().await;
        if let Outcome::Accepted = outcome {
            self.logs.add(logs_from_request(request));
        }
        outcome
    }

    /// Applies the current mode to a metrics export request.
    pub(crate) async fn export_metrics(&self, request: &ExportMetricsServiceRequest) -> Outcome {
        let outcome = self.admit().await;
        if let Outcome::Accepted = outcome {
            self.metrics.add(metric_points_from_request(request));
        }
        outcome
    }
}

/// The gRPC `TraceService` implementation.
struct GrpcTraceService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for GrpcTraceService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.shared.grpc_requests.fetch_add(1, Ordering::SeqCst);
        match self.shared.export(request.get_ref()).await {
            Outcome::Accepted => Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            })),
            Outcome::Unavailable => Err(tonic::Status::unavailable(
                "mindbus-otel-testkit receiver is set to refuse exports",
            )),
        }
    }
}

fn refused() -> tonic::Status {
    tonic::Status::unavailable("mindbus-otel-testkit receiver is set to refuse exports")
}

/// The gRPC `LogsService` implementation.
struct GrpcLogsService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl LogsService for GrpcLogsService {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        match self.shared.export_logs(request.get_ref()).await {
            Outcome::Accepted => Ok(tonic::Response::new(ExportLogsServiceResponse {
                partial_success: None,
            })),
            Outcome::Unavailable => Err(refused()),
        }
    }
}

/// The gRPC `MetricsService` implementation.
struct GrpcMetricsService {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl MetricsService for GrpcMetricsService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        match self.shared.export_metrics(request.get_ref()).await {
            Outcome::Accepted => Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            })),
            Outcome::Unavailable => Err(refused()),
        }
    }
}

/// The three gRPC services on one port, dispatched by the request path
/// (`/<package>.<Service>/Export`), as a collector serves them.
#[derive(Clone)]
struct Dispatch {
    traces: TraceServiceServer<GrpcTraceService>,
    logs: LogsServiceServer<GrpcLogsService>,
    metrics: MetricsServiceServer<GrpcMetricsService>,
}

type GrpcFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Dispatch {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = GrpcFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        use tonic::server::NamedService;
        let path = request.uri().path();
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if service == <TraceServiceServer<GrpcTraceService> as NamedService>::NAME {
            let mut s = self.traces.clone();
            Box::pin(async move { s.call(request).await })
        } else if service == <LogsServiceServer<GrpcLogsService> as NamedService>::NAME {
            let mut s = self.logs.clone();
            Box::pin(async move { s.call(request).await })
        } else if service == <MetricsServiceServer<GrpcMetricsService> as NamedService>::NAME {
            let mut s = self.metrics.clone();
            Box::pin(async move { s.call(request).await })
        } else {
            let status = tonic::Status::unimplemented(format!("no such service: {service}"));
            Box::pin(async move { Ok(status.into_http()) })
        }
    }
}

/// An in-process OTLP receiver (traces, logs and metrics) listening on
/// `127.0.0.1`.
///
/// It runs two servers as Tokio tasks, on random ports:
/// - OTLP/gRPC (the trace, logs and metrics services' `Export` methods), at
///   [`grpc_endpoint`](OtlpReceiver::grpc_endpoint);
/// - OTLP/HTTP with binary protobuf bodies (`POST /v1/traces`, `/v1/logs`,
///   `/v1/metrics`, `Content-Type: application/x-protobuf`), served by
///   hyper, at [`http_endpoint`](OtlpReceiver::http_endpoint). JSON bodies
///   are refused with `415`, compressed bodies too.
///
/// Every span received is decoded into a [`ReceivedSpan`], every log record
/// into a [`ReceivedLog`], every metric data point into a
/// [`ReceivedMetricPoint`], and kept until [`clear`](OtlpReceiver::clear).
/// The [`Mode`] applies to the three signals alike. The servers stop when the receiver is dropped or
/// [`shutdown`](OtlpReceiver::shutdown).
///
/// See the [crate documentation](crate) for a complete example.
pub struct OtlpReceiver {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for OtlpReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpReceiver")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("mode", &self.mode())
            .field("span_count", &self.span_count())
            .finish()
    }
}

impl OtlpReceiver {
    /// Binds both servers on `127.0.0.1` (random ports) and starts them.
    ///
    /// Must be called within a Tokio runtime (with the time and I/O drivers enabled,
    /// as `#[tokio::test]` does); the servers run on that runtime. When this returns,
    /// both endpoints accept connections.
    pub async fn start() -> std::io::Result<OtlpReceiver> {
        let localhost = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let grpc_listener = TcpListener::bind(localhost).await?;
        let http_listener = TcpListener::bind(localhost).await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let shared = Arc::new(Shared::new());

        let service = TraceServiceServer::new(GrpcTraceService {
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let logs = LogsServiceServer::new(GrpcLogsService {
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let metrics = MetricsServiceServer::new(GrpcMetricsService {
            shared: Arc::clone(&shared),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let grpc_shared = Arc::clone(&shared);
        let grpc_task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            let signal_shared = Arc::clone(&grpc_shared);
            let dispatch = Dispatch {
                traces: service,
                logs,
                metrics,
            };
            let result = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(dispatch, incoming, async move {
                    signal_shared.stopped().await;
                })
                .await;
            if let Err(error) = result {
                report_server_error(&error);
            }
        });
        let http_task = tokio::spawn(crate::http::serve(http_listener, Arc::clone(&shared)));

        Ok(OtlpReceiver {
            shared,
            grpc_addr,
            http_addr,
            tasks: vec![grpc_task, http_task],
        })
    }

    /// The OTLP/gRPC endpoint, `http://127.0.0.1:PORT`, for
    /// `SpanExporter::builder().with_tonic().with_endpoint(..)`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The socket address of the gRPC server.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The OTLP/HTTP base endpoint, `http://127.0.0.1:PORT` (as in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, to which exporters append `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The OTLP/HTTP traces endpoint, `http://127.0.0.1:PORT/v1/traces`, for
    /// `SpanExporter::builder().with_http().with_endpoint(..)` (which uses the URL
    /// as given).
    pub fn http_traces_endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.http_addr)
    }

    /// The OTLP/HTTP logs endpoint, `http://127.0.0.1:PORT/v1/logs`.
    pub fn http_logs_endpoint(&self) -> String {
        format!("http://{}/v1/logs", self.http_addr)
    }

    /// The OTLP/HTTP metrics endpoint, `http://127.0.0.1:PORT/v1/metrics`.
    pub fn http_metrics_endpoint(&self) -> String {
        format!("http://{}/v1/metrics", self.http_addr)
    }

    /// The socket address of the HTTP server.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Every log record received so far, in arrival order.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.shared.logs.snapshot()
    }

    /// Every metric data point received so far, in arrival order (each
    /// periodic export sends every point again: filter by name and take the
    /// last).
    pub fn metric_points(&self) -> Vec<ReceivedMetricPoint> {
        self.shared.metrics.snapshot()
    }

    /// Waits until `condition` holds for the log records received so far,
    /// or `timeout` elapsed; returns them all.
    pub async fn wait_logs_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&[ReceivedLog]) -> bool,
    ) -> Vec<ReceivedLog> {
        self.shared.logs.wait_until(timeout, condition).await
    }

    /// Waits until `condition` holds for the metric points received so
    /// far, or `timeout` elapsed; returns them all.
    pub async fn wait_metrics_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&[ReceivedMetricPoint]) -> bool,
    ) -> Vec<ReceivedMetricPoint> {
        self.shared.metrics.wait_until(timeout, condition).await
    }

    /// A snapshot of every span received so far, in arrival order.
    pub fn spans(&self) -> SpanSet {
        SpanSet::new(self.shared.spans.snapshot())
    }

    /// The number of spans received so far.
    pub fn span_count(&self) -> usize {
        self.shared.spans.lock().len()
    }

    /// Forgets every span, log record and metric point received so far
    /// (the request counters are kept).
    pub fn clear(&self) {
        self.shared.spans.clear();
        self.shared.logs.clear();
        self.shared.metrics.clear();
    }

    /// The number of gRPC trace export calls received, whatever their outcome.
    pub fn grpc_requests(&self) -> usize {
        self.shared.grpc_requests.load(Ordering::SeqCst)
    }

    /// The number of HTTP export requests (`POST /v1/traces`, `/v1/logs`,
    /// `/v1/metrics`) received, whatever their outcome.
    pub fn http_requests(&self) -> usize {
        self.shared.http_requests.load(Ordering::SeqCst)
    }

    /// Changes how export requests are answered from now on (see [`Mode`]).
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// The current [`Mode`].
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Waits until at least `n` spans have been received, or `timeout` elapsed, and
    /// returns a snapshot of all spans received (so callers assert on the result).
    pub async fn wait_for_spans(&self, n: usize, timeout: Duration) -> SpanSet {
        let spans = self
            .shared
            .spans
            .wait_until(timeout, |s| s.len() >= n)
            .await;
        SpanSet::new(spans)
    }

    /// Waits until `condition` holds for the spans received so far, or `timeout`
    /// elapsed, and returns a snapshot of all spans received.
    ///
    /// The condition is checked now and after each export request that carried spans.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&SpanSet) -> bool,
    ) -> SpanSet {
        let spans = self
            .shared
            .spans
            .wait_until(timeout, |s| condition(&SpanSet::new(s.to_vec())))
            .await;
        SpanSet::new(spans)
    }

    /// Stops both servers and waits (up to a second) for their tasks to finish.
    ///
    /// Dropping the receiver also stops the servers, without waiting.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        // The HTTP accept loop and the gRPC server stop on the signal; the gRPC server
        // then lets open connections finish gracefully.
    }
}

/// Reports a gRPC server failure; there is no caller to return it to.
fn report_server_error(error: &tonic::transport::Error) {
    eprintln!("mindbus-otel-testkit: OTLP/gRPC server stopped with an error: {error}");
}
