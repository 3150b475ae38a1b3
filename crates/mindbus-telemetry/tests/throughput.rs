//! 30,000 spans/s sustained for three seconds, over gRPC and HTTP: no span dropped.
//!
//! Ignored by default (it loads both cores for several seconds); run it with
//! `cargo test -p mindbus-telemetry --test throughput -- --ignored --nocapture`.
//! Nothing global is installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use mindbus_otel_testkit::OtlpReceiver;
use mindbus_telemetry::opentelemetry::trace::{Tracer as _, TracerProvider as _};
use mindbus_telemetry::{Config, OtlpProtocol, TraceViewMode};

const RATE_PER_MS: u64 = 30;
const LOAD: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test: several seconds of both cores"]
async fn thirty_thousand_spans_per_second_without_drops() {
    for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
        let receiver = OtlpReceiver::start().await.unwrap();
        let endpoint = match protocol {
            OtlpProtocol::Grpc => receiver.grpc_endpoint(),
            _ => receiver.http_endpoint(),
        };
        let telemetry = mindbus_telemetry::init(
            Config::new()
                .service_name("load")
                .otlp_protocol(protocol)
                .otlp_endpoint(endpoint)
                .metrics(false)
                .trace_view(TraceViewMode::Off)
                .install_subscriber(false)
                .install_tracer_provider(false),
        )
        .unwrap();
        let provider = telemetry.tracer_provider().unwrap().clone();
        let started = tokio::task::spawn_blocking(move || {
            let tracer = provider.tracer("load");
            let start = Instant::now();
            let mut started = 0u64;
            while start.elapsed() < LOAD {
                let due = start.elapsed().as_millis() as u64 * RATE_PER_MS;
                while started < due {
                    tracer.in_span("op", |_| {});
                    started += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            started
        })
        .await
        .unwrap();
        let received = receiver
            .wait_for_spans(started as usize, Duration::from_secs(30))
            .await;
        let stats = telemetry.span_stats();
        eprintln!(
            "{protocol}: started {started}, received {}, {stats:?}",
            received.len()
        );
        assert_eq!(received.len() as u64, started);
        assert_eq!(
            (stats.ended, stats.exported, stats.failed),
            (started, started, 0)
        );
        telemetry.shutdown().unwrap();
        receiver.shutdown().await;
    }
}
