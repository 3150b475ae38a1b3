//! Logs and metrics, end to end: real `opentelemetry-otlp` log and metric
//! exporters (gRPC and HTTP/protobuf) sending to the in-process receiver.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mindbus_otel_testkit::{MetricKind, OtlpReceiver, PointValue};
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::SdkTracerProvider;

const WAIT: Duration = Duration::from_secs(10);

fn resource() -> Resource {
    Resource::builder().with_service_name("writer").build()
}

/// Runs a blocking SDK call (flush, shutdown) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn logs_in_a_consumer_span(receiver: &OtlpReceiver, grpc: bool) {
    let builder = opentelemetry_otlp::LogExporter::builder();
    let exporter = if grpc {
        builder
            .with_tonic()
            .with_endpoint(receiver.grpc_endpoint())
            .build()
    } else {
        builder
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(receiver.http_logs_endpoint())
            .build()
    }
    .expect("log exporter");
    let loggers = SdkLoggerProvider::builder()
        .with_resource(resource())
        // The processor runs on this Tokio runtime, as the HTTP client needs.
        .with_log_processor(BatchLogProcessor::builder(exporter, Tokio).build())
        .build();
    let tracers = SdkTracerProvider::builder()
        .with_resource(resource())
        .build();
    let tracer = tracers.tracer("test");
    let span = tracer
        .span_builder("process agent.writer")
        .with_kind(SpanKind::Consumer)
        .start(&tracer);
    let cx = Context::current_with_span(span);
    let expected = cx.span().span_context().clone();
    let logger = loggers.logger("ai_team.writer");
    {
        let _in_span = cx.clone().attach();
        let mut record = logger.create_log_record();
        record.set_severity_number(Severity::Info);
        record.set_severity_text("INFO");
        record.set_body(AnyValue::from("COMMAND received: generate_article"));
        record.add_attribute("messaging.message.id", "c-1");
        logger.emit(record);
    }
    // Outside any span: no trace context.
    let mut record = logger.create_log_record();
    record.set_body(AnyValue::from("idle"));
    logger.emit(record);
    blocking(move || loggers.force_flush())
        .await
        .expect("flush");

    let logs = receiver.wait_logs_until(WAIT, |logs| logs.len() >= 2).await;
    let inside = logs
        .iter()
        .find(|l| l.body_str() == Some("COMMAND received: generate_article"))
        .unwrap_or_else(|| panic!("{logs:?}"));
    assert_eq!(inside.trace_id, Some(expected.trace_id()));
    assert_eq!(inside.span_id, Some(expected.span_id()));
    assert_eq!(inside.service_name.as_deref(), Some("writer"));
    assert_eq!(inside.scope_name, "ai_team.writer");
    assert_eq!(inside.severity_text, "INFO");
    assert_eq!(inside.severity_number, Severity::Info as i32);
    assert_eq!(
        inside.attr("messaging.message.id").and_then(|v| v.as_str()),
        Some("c-1")
    );
    let outside = logs.iter().find(|l| l.body_str() == Some("idle")).unwrap();
    assert_eq!((outside.trace_id, outside.span_id), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_records_carry_the_span_they_were_written_in_over_grpc() {
    let receiver = OtlpReceiver::start().await.unwrap();
    logs_in_a_consumer_span(&receiver, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_records_carry_the_span_they_were_written_in_over_http() {
    let receiver = OtlpReceiver::start().await.unwrap();
    logs_in_a_consumer_span(&receiver, false).await;
    assert!(receiver.http_requests() >= 1);
}

async fn metrics_with_attributes(receiver: &OtlpReceiver, grpc: bool) {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let exporter = if grpc {
        builder
            .with_tonic()
            .with_endpoint(receiver.grpc_endpoint())
            .build()
    } else {
        builder
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(receiver.http_metrics_endpoint())
            .build()
    }
    .expect("metric exporter");
    let meters = SdkMeterProvider::builder()
        .with_resource(resource())
        .with_reader(PeriodicReader::builder(exporter, Tokio).build())
        .build();
    let meter = meters.meter("mindbus-otel");
    let counter = meter.u64_counter("mindbus.messages").build();
    let attrs = [
        KeyValue::new("agent", "agent.writer.001"),
        KeyValue::new("kind", "command"),
    ];
    counter.add(2, &attrs);
    counter.add(1, &attrs);
    let histogram = meter
        .f64_histogram("ai_team.llm.latency")
        .with_unit("s")
        .build();
    histogram.record(1.5, &[KeyValue::new("model", "gpt-4")]);
    blocking(move || meters.force_flush()).await.expect("flush");

    let points = receiver
        .wait_metrics_until(WAIT, |points| points.len() >= 2)
        .await;
    let messages = points
        .iter()
        .rfind(|p| p.name == "mindbus.messages")
        .unwrap_or_else(|| panic!("{points:?}"));
    assert_eq!(messages.kind, MetricKind::Sum { monotonic: true });
    assert_eq!(messages.value, PointValue::I64(3));
    assert_eq!(messages.attr_str("agent"), Some("agent.writer.001"));
    assert_eq!(messages.attr_str("kind"), Some("command"));
    assert_eq!(messages.service_name.as_deref(), Some("writer"));
    let latency = points
        .iter()
        .rfind(|p| p.name == "ai_team.llm.latency")
        .unwrap();
    assert_eq!(latency.kind, MetricKind::Histogram);
    assert_eq!(latency.unit, "s");
    assert_eq!(
        latency.value,
        PointValue::Distribution {
            count: 1,
            sum: Some(1.5)
        }
    );
    assert_eq!(latency.attr_str("model"), Some("gpt-4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_points_arrive_with_their_attributes_over_grpc() {
    let receiver = OtlpReceiver::start().await.unwrap();
    metrics_with_attributes(&receiver, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_points_arrive_with_their_attributes_over_http() {
    let receiver = OtlpReceiver::start().await.unwrap();
    metrics_with_attributes(&receiver, false).await;
}
