//! The Prometheus listener on port 0 serves counters incremented through the
//! `metrics` macros. Installs the global metrics recorder: one test in this file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use mindbus_telemetry::{Config, TraceViewMode};

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn serves_the_exposition_on_port_zero() {
    let telemetry = mindbus_telemetry::init(
        Config::new()
            .service_name("metrics-test")
            .metrics_addr(Some(([127, 0, 0, 1], 0).into()))
            .trace_view(TraceViewMode::Off)
            .install_subscriber(false)
            .install_tracer_provider(false),
    )
    .unwrap();
    assert!(
        telemetry.warnings().is_empty(),
        "{:?}",
        telemetry.warnings()
    );
    let addr = telemetry.metrics_addr().unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0, "the real port is reported");

    metrics::counter!("mindbus_test_messages_total", "queue" => "agent.writer").increment(3);
    metrics::histogram!("mindbus_test_latency_seconds").record(0.003);
    metrics::histogram!("ai_team_quality_score").record(7.0);

    let response = get(addr, "/metrics");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain"), "{head}");
    assert!(
        body.contains("mindbus_test_messages_total{queue=\"agent.writer\"} 3"),
        "{body}"
    );
    // Seconds buckets, from 0.5 ms to 5 min.
    assert!(
        body.contains("mindbus_test_latency_seconds_bucket{le=\"0.0005\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("mindbus_test_latency_seconds_bucket{le=\"0.005\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("mindbus_test_latency_seconds_bucket{le=\"300\"} 1"),
        "{body}"
    );
    // Quality score buckets, 0 to 10.
    assert!(
        body.contains("ai_team_quality_score_bucket{le=\"6\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("ai_team_quality_score_bucket{le=\"8\"} 1"),
        "{body}"
    );

    let rendered = telemetry.prometheus_render().unwrap();
    assert!(
        rendered.contains("mindbus_test_messages_total"),
        "{rendered}"
    );

    assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));

    telemetry.shutdown().unwrap();
}
