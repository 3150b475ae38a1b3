//! The guard returns within its timeout when the collector is down or blackholed,
//! also inside a current-thread runtime. Nothing global is installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::time::{Duration, Instant};
use tokio::net::TcpSocket;

use mindbus_telemetry::opentelemetry::trace::{Tracer as _, TracerProvider as _};
use mindbus_telemetry::{BatchSettings, Config, OtlpProtocol, TraceViewMode};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Slack for thread scheduling on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A 127.0.0.1 port where nothing listens: bound and never listened on,
/// so connections are refused, and held while the value lives so that no
/// parallel test's server is given it.
struct DeadPort {
    _socket: TcpSocket,
    url: String,
}

fn dead_port() -> DeadPort {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    DeadPort {
        _socket: socket,
        url: format!("http://127.0.0.1:{port}"),
    }
}

fn config(endpoint: &str, protocol: OtlpProtocol) -> Config {
    Config::new()
        .service_name("guard-test")
        .otlp_protocol(protocol)
        .otlp_endpoint(endpoint)
        .metrics(false)
        .trace_view(TraceViewMode::Off)
        .install_subscriber(false)
        .install_tracer_provider(false)
        .shutdown_timeout(TIMEOUT)
}

fn record_spans(telemetry: &mindbus_telemetry::Telemetry, n: usize) {
    let tracer = telemetry.tracer_provider().unwrap().tracer("guard");
    let agent = telemetry.tracer_provider_for("agent").tracer("guard");
    for _ in 0..n {
        tracer.in_span("task", |_| {});
        agent.in_span("step", |_| {});
    }
}

fn assert_drop_in_time(telemetry: mindbus_telemetry::Telemetry) {
    let started = Instant::now();
    drop(telemetry);
    let elapsed = started.elapsed();
    assert!(elapsed < TIMEOUT + SLACK, "drop took {elapsed:?}");
}

#[test]
fn dead_grpc_endpoint() {
    let dead = dead_port();
    let telemetry = mindbus_telemetry::init(config(&dead.url, OtlpProtocol::Grpc)).unwrap();
    record_spans(&telemetry, 1000);
    let started = Instant::now();
    let result = telemetry.shutdown();
    assert!(
        started.elapsed() < TIMEOUT + SLACK,
        "{:?}",
        started.elapsed()
    );
    // The spans could not be delivered; the failure is reported, not hidden.
    assert!(
        result.is_err() || telemetry.span_stats().failed > 0,
        "{result:?}"
    );
    assert_eq!(telemetry.span_stats().exported, 0);
    assert_drop_in_time(telemetry);
}

#[test]
fn dead_http_endpoint() {
    let dead = dead_port();
    let telemetry = mindbus_telemetry::init(config(&dead.url, OtlpProtocol::HttpProtobuf)).unwrap();
    record_spans(&telemetry, 1000);
    assert_drop_in_time(telemetry);
}

/// A collector that accepts connections and never answers.
#[test]
fn blackholed_collector() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let telemetry = mindbus_telemetry::init(config(&endpoint, protocol)).unwrap();
        record_spans(&telemetry, 100);
        assert_drop_in_time(telemetry);
    }
    drop(listener);
}

#[tokio::test(flavor = "current_thread")]
async fn drop_inside_a_current_thread_runtime() {
    let dead = dead_port();
    let telemetry = mindbus_telemetry::init(config(&dead.url, OtlpProtocol::Grpc)).unwrap();
    record_spans(&telemetry, 100);
    tokio::task::yield_now().await;
    assert_drop_in_time(telemetry);
}

#[test]
fn init_and_drop_inside_block_on_of_a_current_thread_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dead = dead_port();
        // No scheduled export before the flush: it must find the spans queued.
        let config = config(&dead.url, OtlpProtocol::HttpProtobuf)
            .batch(BatchSettings::default().with_scheduled_delay(Duration::from_secs(3600)));
        let telemetry = mindbus_telemetry::init(config).unwrap();
        record_spans(&telemetry, 10);
        assert!(
            !telemetry.force_flush(),
            "flushing to a dead collector fails"
        );
        assert_drop_in_time(telemetry);
    });
}

#[test]
fn shutdown_is_idempotent() {
    let dead = dead_port();
    let telemetry = mindbus_telemetry::init(config(&dead.url, OtlpProtocol::Grpc)).unwrap();
    let _ = telemetry.shutdown();
    let started = Instant::now();
    assert!(telemetry.shutdown().is_ok());
    // A flag swap: bounded generously, this guards behaviour, not speed.
    assert!(started.elapsed() < Duration::from_secs(1));
    // Spans after shutdown are discarded quietly.
    telemetry
        .tracer_provider()
        .unwrap()
        .tracer("late")
        .in_span("late", |_| {});
}
