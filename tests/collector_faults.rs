//! Collector faults: with the telemetry set up by `mindbus_telemetry::init`
//! exporting to a collector that refuses exports, never answers, or is not
//! there at all, messages keep flowing through a `TracedChannel` (5,000
//! round trips, all confirmed and acked), no publish waits for an export,
//! the spans that cannot be delivered are counted as such, export resumes
//! when the collector comes back, and dropping the guard returns within its
//! shutdown timeout.
//!
//! The guard is built with `install_tracer_provider(false)`,
//! `install_subscriber(false)` and `metrics(false)`: nothing global is
//! installed, so these tests share one binary and run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use mindbus_otel::lapin::options::{BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::{BasicProperties, Channel};
use mindbus_otel::{AgentMetrics, ConsumerHandle, MessagingSpans, TraceContext, TracedChannel};
use mindbus_otel_testkit::{Mode, OtlpReceiver};
use mindbus_telemetry::{BatchSettings, Config, OtlpProtocol, SpanStats, Telemetry, TraceViewMode};
use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Messages per round-trip phase.
const MESSAGES: u64 = 5_000;
/// The guard's configured shutdown timeout.
const SHUTDOWN: Duration = Duration::from_secs(2);
/// Slack over it for thread scheduling on a loaded 2-core machine (bounded
/// shutdown is the property; this is not a performance threshold).
const SLACK: Duration = Duration::from_secs(2);
/// Hang guard for a phase that must finish whatever the collector does.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// A hang guard that holds even when the runtime's threads are blocked (a
/// publish blocking on a synchronous export would block them, and no
/// `tokio::time::timeout` would fire): a plain thread that ends the test
/// process if `what` has not finished in time.
async fn guard<T>(what: &'static str, f: impl Future<Output = T>) -> T {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + HANG_GUARD;
        while Instant::now() < deadline {
            if d.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Straight to stderr: the test harness's capture dies with us.
        let _ = writeln!(
            std::io::stderr(),
            "hang guard: {what} did not finish within {HANG_GUARD:?}"
        );
        std::process::exit(101);
    });
    let out = f.await;
    done.store(true, Ordering::Relaxed);
    out
}

/// Where the spans go.
#[derive(Clone, Copy, Debug)]
enum Collector {
    /// The testkit receiver in this mode.
    Receiver(Mode, OtlpProtocol),
    /// A 127.0.0.1 port where nothing listens.
    DeadPort(OtlpProtocol),
}

/// A 127.0.0.1 port where nothing listens: bound and never listened on,
/// so connections are refused, and held while the value lives so that no
/// parallel test's receiver is given it.
struct DeadPort {
    _socket: tokio::net::TcpSocket,
    url: String,
}

fn dead_port() -> DeadPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    DeadPort {
        _socket: socket,
        url: format!("http://127.0.0.1:{port}"),
    }
}

fn config(endpoint: String, protocol: OtlpProtocol) -> Config {
    Config::new()
        .service_name("collector-faults")
        .otlp_protocol(protocol)
        .otlp_endpoint(endpoint)
        // A small queue, so that a stuck collector makes it overflow.
        .batch(
            BatchSettings::default()
                .with_max_queue_size(2_048)
                .with_max_export_batch_size(512)
                .with_scheduled_delay(Duration::from_millis(100))
                .with_export_timeout(Duration::from_secs(1)),
        )
        .metrics(false)
        .trace_view(TraceViewMode::Off)
        .install_subscriber(false)
        .install_tracer_provider(false)
        .shutdown_timeout(SHUTDOWN)
}

/// `n` messages published with confirms (pipelined, awaited in batches)
/// and consumed by the handler, which acks them. Returns once all are
/// acked; the publish loop itself runs under the hang guard.
async fn round_trip(publisher: &TracedChannel, queue: &str, handle: &ConsumerHandle, n: u64) {
    let target = handle.stats().acked() + n;
    guard("the round trip", async {
        let mut pending = Vec::with_capacity(256);
        for i in 0..n {
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    br#"{"specversion":"1.0","type":"ai.team.event","source":"orchestrator","id":"e"}"#,
                    BasicProperties::default().with_message_id(i.to_string().into()),
                )
                .await
                .expect("publishing does not depend on the collector");
            pending.push(confirm);
            if pending.len() == 256 {
                for c in pending.drain(..) {
                    assert!(c.await.unwrap().is_ack());
                }
            }
        }
        for c in pending.drain(..) {
            assert!(c.await.unwrap().is_ack());
        }
        assert!(
            eventually(HANG_GUARD, || handle.stats().acked() >= target).await,
            "consumed {} of {target}",
            handle.stats().acked()
        );
    })
    .await;
}

/// Drops the guard off the async threads (shutting it down first, to read
/// its final counts) and returns how long that took.
async fn timed_drop(telemetry: Telemetry) -> (Duration, SpanStats) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let _ = telemetry.shutdown();
        let stats = telemetry.span_stats();
        drop(telemetry);
        (started.elapsed(), stats)
    })
    .await
    .unwrap()
}

async fn messaging_goes_on(collector: Collector) {
    let receiver = OtlpReceiver::start().await.unwrap();
    let dead = dead_port();
    let (endpoint, protocol) = match collector {
        Collector::Receiver(mode, protocol) => {
            receiver.set_mode(mode);
            let endpoint = match protocol {
                OtlpProtocol::Grpc => receiver.grpc_endpoint(),
                _ => receiver.http_endpoint(),
            };
            (endpoint, protocol)
        }
        Collector::DeadPort(protocol) => (dead.url.clone(), protocol),
    };
    let telemetry = mindbus_telemetry::init(config(endpoint, protocol)).unwrap();
    let spans =
        MessagingSpans::default().with_tracer_provider(telemetry.tracer_provider().unwrap());
    let traced = |ch: Channel| {
        TracedChannel::builder(ch)
            .with(TraceContext::default())
            .with(spans.clone())
            .with(AgentMetrics::default())
            .build()
    };

    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let queue = declare_queue(&raw, &unique("collector.faults"), FieldTable::default()).await;
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publisher = traced(pub_ch);
    let consumer = traced(conn.create_channel().await.unwrap());
    consumer
        .basic_qos(200, BasicQosOptions::default())
        .await
        .unwrap();
    let handle = consume_acking(&consumer, queue.as_str()).await;

    // The collector is faulty: messaging goes on.
    round_trip(&publisher, queue.as_str(), &handle, MESSAGES).await;
    assert_eq!(handle.stats().acked(), MESSAGES);
    assert_eq!(handle.stats().nacked(), 0);
    assert!(!handle.is_finished());
    assert_eq!(spans.stats().started(), 2 * MESSAGES);
    assert_eq!(spans.stats().ended(), 2 * MESSAGES);

    // Every span was handed to the exporter; none reached the collector,
    // and the failures are counted.
    let stats = telemetry.span_stats();
    assert_eq!(stats.ended, 2 * MESSAGES, "{stats:?}");
    assert_eq!(stats.exported, 0, "{stats:?}");
    assert_eq!(receiver.span_count(), 0);
    assert!(
        eventually(HANG_GUARD, || telemetry.span_stats().failed > 0).await,
        "failed exports are counted: {:?}",
        telemetry.span_stats()
    );

    // The collector comes back: export resumes, at the latest when the
    // exporter's back-off pause (at most 5 s) is over. The first spans to
    // arrive may be the tail of the outage phase (the OTLP exporter retries
    // a refused batch, and the retry can land after the collector is back),
    // and that tail is mostly consumer spans: wait for both kinds.
    if let Collector::Receiver(mode, _) = collector {
        receiver.set_mode(Mode::Accept);
        let publish = format!("publish {queue}");
        let process = format!("process {queue}");
        let resumed = eventually(HANG_GUARD, || {
            if receiver.span_count() < 400 || telemetry.span_stats().exported < 400 {
                return false;
            }
            let received = receiver.spans();
            received.find(&publish).is_some() && received.find(&process).is_some()
        });
        let keep_publishing = async {
            loop {
                round_trip(&publisher, queue.as_str(), &handle, 200).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let exported = tokio::select! {
            exported = resumed => exported,
            () = keep_publishing => unreachable!("publishing goes on until export resumes"),
        };
        let received = receiver.spans();
        assert!(
            exported,
            "after the collector is back: {:?}, {} received ({} publish, {} process)",
            telemetry.span_stats(),
            received.len(),
            received.find_all(&publish).len(),
            received.find_all(&process).len()
        );
        // ... and fails again, with spans queued when the guard drops.
        receiver.set_mode(mode);
        round_trip(&publisher, queue.as_str(), &handle, 500).await;
    }

    handle.cancel().await.unwrap();
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;

    // Bounded shutdown, the collector still faulty.
    let (took, stats) = timed_drop(telemetry).await;
    assert!(
        took < SHUTDOWN + SLACK,
        "dropping the guard took {took:?} (shutdown timeout {SHUTDOWN:?})"
    );
    assert_eq!(stats.ended, spans.stats().ended());
    // Thousands of spans in batches of 512 failed: after the first failure
    // the exporter backed off and dropped batches unsent.
    assert!(stats.shed > 0 && stats.shed <= stats.failed, "{stats:?}");
    eprintln!(
        "{collector:?}: {} spans ended, {} exported, {} failed ({} shed while backing off), {} dropped; guard dropped in {took:?}",
        stats.ended,
        stats.exported,
        stats.failed,
        stats.shed,
        stats.pending_or_dropped()
    );
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_unavailable_over_grpc() {
    messaging_goes_on(Collector::Receiver(Mode::Unavailable, OtlpProtocol::Grpc)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_hangs_over_grpc() {
    messaging_goes_on(Collector::Receiver(Mode::Hang, OtlpProtocol::Grpc)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_hangs_over_http() {
    messaging_goes_on(Collector::Receiver(Mode::Hang, OtlpProtocol::HttpProtobuf)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listens_on_the_collector_port() {
    messaging_goes_on(Collector::DeadPort(OtlpProtocol::Grpc)).await;
}
