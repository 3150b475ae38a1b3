//! The in-process OTLP receiver: shared state, gRPC service and lifecycle.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
use crate::spanset::SpanSet;

/// Largest accepted export request (gRPC message or HTTP body), in bytes.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

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
    spans: Mutex<Vec<ReceivedSpan>>,
    count: watch::Sender<usize>,
    mode: watch::Sender<Mode>,
    shutdown: watch::Sender<bool>,
    grpc_requests: AtomicUsize,
    http_requests: AtomicUsize,
}

impl Shared {
    fn new() -> Self {
        Shared {
            spans: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            mode: watch::Sender::new(Mode::Accept),
            shutdown: watch::Sender::new(false),
            grpc_requests: AtomicUsize::new(0),
            http_requests: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ReceivedSpan>> {
        // A panic while holding the lock cannot leave the Vec half-updated: keep going.
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Applies the current mode to an export request.
    pub(crate) async fn export(&self, request: &ExportTraceServiceRequest) -> Outcome {
        let mode = *self.mode.borrow();
        match mode {
            Mode::Accept => {
                let spans = spans_from_request(request);
                let total = {
                    let mut stored = self.lock();
                    stored.extend(spans);
                    stored.len()
                };
                self.count.send_replace(total);
                Outcome::Accepted
            }
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

/// An in-process OTLP trace receiver listening on `127.0.0.1`.
///
/// It runs two servers as Tokio tasks, on random ports:
/// - OTLP/gRPC (the `opentelemetry.proto.collector.trace.v1.TraceService/Export`
///   method), at [`grpc_endpoint`](OtlpReceiver::grpc_endpoint);
/// - OTLP/HTTP with binary protobuf bodies (`POST /v1/traces`,
///   `Content-Type: application/x-protobuf`), at
///   [`http_traces_endpoint`](OtlpReceiver::http_traces_endpoint). JSON bodies are
///   refused with `415`, compressed bodies too.
///
/// Every span received is decoded into a [`ReceivedSpan`] and kept until
/// [`clear`](OtlpReceiver::clear). The servers stop when the receiver is dropped or
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
        let grpc_shared = Arc::clone(&shared);
        let grpc_task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            let signal_shared = Arc::clone(&grpc_shared);
            let result = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(service, incoming, async move {
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

    /// The socket address of the HTTP server.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// A snapshot of every span received so far, in arrival order.
    pub fn spans(&self) -> SpanSet {
        SpanSet::new(self.shared.lock().clone())
    }

    /// The number of spans received so far.
    pub fn span_count(&self) -> usize {
        self.shared.lock().len()
    }

    /// Forgets every span received so far (the request counters are kept).
    pub fn clear(&self) {
        self.shared.lock().clear();
        self.shared.count.send_replace(0);
    }

    /// The number of gRPC export calls received, whatever their outcome.
    pub fn grpc_requests(&self) -> usize {
        self.shared.grpc_requests.load(Ordering::SeqCst)
    }

    /// The number of `POST /v1/traces` HTTP requests received, whatever their outcome.
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
        let mut rx = self.shared.count.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await;
        self.spans()
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
        let mut rx = self.shared.count.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if condition(&self.spans()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.spans()
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
