//! End-to-end tests: real `opentelemetry-otlp` exporters (gRPC and HTTP/protobuf)
//! sending to the in-process receiver.

// Test helpers outside #[test] functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime};

use mindbus_otel_testkit::{AttrValue, Mode, OtlpReceiver, SpanSet, StatusCode};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter as _};

const WAIT: Duration = Duration::from_secs(10);

fn grpc_exporter(
    receiver: &OtlpReceiver,
    timeout: Duration,
    retry: RetryPolicy,
) -> opentelemetry_otlp::SpanExporter {
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(receiver.grpc_endpoint())
        .with_timeout(timeout)
        .with_retry_policy(retry)
        .build()
        .expect("gRPC exporter")
}

fn http_exporter(
    receiver: &OtlpReceiver,
    timeout: Duration,
    retry: RetryPolicy,
) -> opentelemetry_otlp::SpanExporter {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(receiver.http_traces_endpoint())
        .with_timeout(timeout)
        .with_retry_policy(retry)
        .build()
        .expect("HTTP exporter")
}

fn resource() -> Resource {
    Resource::builder()
        .with_service_name("orchestrator")
        .with_attribute(KeyValue::new("deployment.environment.name", "test"))
        .build()
}

/// `force_flush` blocks the calling thread until the export is done.
async fn flush(provider: &SdkTracerProvider) {
    let provider = provider.clone();
    tokio::task::spawn_blocking(move || provider.force_flush())
        .await
        .expect("flush task")
        .expect("force_flush");
}

async fn shutdown(provider: SdkTracerProvider) {
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .expect("shutdown task")
        .expect("shutdown");
}

fn at(base: SystemTime, micros: u64) -> SystemTime {
    base + Duration::from_micros(micros)
}

/// The contexts of the spans created by [`emit_tree`].
struct Emitted {
    root: SpanContext,
    publish: SpanContext,
    process: SpanContext,
    llm: SpanContext,
}

/// Emits the reference tree, with fixed timestamps:
///
/// ```text
/// execute_task (orchestrator) 10.5ms [server]
///   publish mindbus.main (orchestrator) 1.2ms [producer]
///     process agent.writer (orchestrator) 7.2ms [consumer]   (links to publish)
///       llm_call (orchestrator) 6.8ms [client] !error: rate limited
/// ```
fn emit_tree(provider: &SdkTracerProvider) -> Emitted {
    let tracer = provider.tracer("mindbus-testkit-tests");
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);

    let mut root = tracer
        .span_builder("execute_task")
        .with_kind(SpanKind::Server)
        .with_start_time(at(base, 0))
        .with_attributes(vec![
            KeyValue::new("task.name", "write-report"),
            KeyValue::new("task.attempt", 3_i64),
            KeyValue::new("task.budget", 0.25_f64),
            KeyValue::new("task.urgent", true),
            KeyValue::new(
                "task.tags",
                Value::Array(Array::from(vec![
                    StringValue::from("alpha"),
                    StringValue::from("beta"),
                ])),
            ),
            KeyValue::new("task.shards", Value::Array(Array::from(vec![1_i64, 2, 3]))),
        ])
        .start(&tracer);
    let root_ctx = root.span_context().clone();
    let root_cx = Context::new().with_remote_span_context(root_ctx.clone());

    let mut publish = tracer
        .span_builder("publish mindbus.main")
        .with_kind(SpanKind::Producer)
        .with_start_time(at(base, 500))
        .with_attributes(vec![KeyValue::new("messaging.system", "rabbitmq")])
        .start_with_context(&tracer, &root_cx);
    publish.add_event_with_timestamp(
        "message.sent",
        at(base, 600),
        vec![KeyValue::new("messaging.message.id", "m-1")],
    );
    let publish_ctx = publish.span_context().clone();
    publish.end_with_timestamp(at(base, 1_700));
    let publish_cx = Context::new().with_remote_span_context(publish_ctx.clone());

    let mut process = tracer
        .span_builder("process agent.writer")
        .with_kind(SpanKind::Consumer)
        .with_start_time(at(base, 2_000))
        .with_links(vec![Link::new(
            publish_ctx.clone(),
            vec![KeyValue::new("link.reason", "delivery")],
            0,
        )])
        .start_with_context(&tracer, &publish_cx);
    let process_ctx = process.span_context().clone();
    let process_cx = Context::new().with_remote_span_context(process_ctx.clone());

    let mut llm = tracer
        .span_builder("llm_call")
        .with_kind(SpanKind::Client)
        .with_start_time(at(base, 2_200))
        .start_with_context(&tracer, &process_cx);
    llm.set_status(Status::error("rate limited"));
    let llm_ctx = llm.span_context().clone();
    llm.end_with_timestamp(at(base, 9_000));

    process.end_with_timestamp(at(base, 9_200));
    root.end_with_timestamp(at(base, 10_500));

    Emitted {
        root: root_ctx,
        publish: publish_ctx,
        process: process_ctx,
        llm: llm_ctx,
    }
}

/// Checks that the receiver got exactly the reference tree.
fn check_tree(spans: &SpanSet, emitted: &Emitted) {
    spans.assert_len(4);
    let trace_id = spans.assert_single_trace();
    assert_eq!(trace_id, emitted.root.trace_id());

    let root = spans.one("execute_task");
    let publish = spans.one("publish mindbus.main");
    let process = spans.one("process agent.writer");
    let llm = spans.one("llm_call");

    // Ids and parents.
    assert_eq!(root.span_id, emitted.root.span_id());
    assert_eq!(publish.span_id, emitted.publish.span_id());
    assert_eq!(process.span_id, emitted.process.span_id());
    assert_eq!(llm.span_id, emitted.llm.span_id());
    assert_eq!(root.parent_span_id, None);
    assert_eq!(publish.parent_span_id, Some(root.span_id));
    spans.assert_parent("publish mindbus.main", "execute_task");
    spans.assert_parent("process agent.writer", "publish mindbus.main");
    spans.assert_parent("llm_call", "process agent.writer");
    assert_eq!(spans.roots(), vec![root]);
    assert_eq!(spans.children_of(root), vec![publish]);
    assert_eq!(spans.ancestors(llm), vec![process, publish, root]);
    assert!(spans.is_parent_of(process, llm));
    assert!(!spans.is_parent_of(llm, process));

    // Kinds.
    assert_eq!(root.kind, SpanKind::Server);
    assert_eq!(publish.kind, SpanKind::Producer);
    assert_eq!(process.kind, SpanKind::Consumer);
    assert_eq!(llm.kind, SpanKind::Client);
    assert_eq!(spans.by_kind(SpanKind::Consumer).len(), 1);

    // Resource and scope.
    for span in spans {
        assert_eq!(span.service_name.as_deref(), Some("orchestrator"));
        assert_eq!(span.scope_name, "mindbus-testkit-tests");
        assert_eq!(
            span.resource_attr("deployment.environment.name"),
            Some(&AttrValue::from("test"))
        );
    }
    assert_eq!(spans.by_service("orchestrator").len(), 4);
    assert!(spans.by_service("writer").is_empty());

    // Attributes of each type.
    assert_eq!(root.attr_str("task.name"), Some("write-report"));
    assert_eq!(root.attr_i64("task.attempt"), Some(3));
    assert_eq!(root.attr_f64("task.budget"), Some(0.25));
    assert_eq!(root.attr_bool("task.urgent"), Some(true));
    assert_eq!(
        root.attr("task.tags"),
        Some(&AttrValue::Array(vec!["alpha".into(), "beta".into()]))
    );
    assert_eq!(
        root.attr("task.shards").map(ToString::to_string).as_deref(),
        Some("[1, 2, 3]")
    );
    assert_eq!(root.attr_i64("task.name"), None, "wrong type gives None");
    assert_eq!(root.attr("missing"), None);

    // Event.
    assert!(publish.has_event("message.sent"));
    let event = publish.event("message.sent").expect("event");
    assert_eq!(
        event.attr("messaging.message.id"),
        Some(&AttrValue::from("m-1"))
    );
    assert_eq!(
        event.time_unix_nanos,
        publish.start_unix_nanos + 100_000,
        "event timestamp"
    );

    // Link.
    assert!(spans.is_linked_to(process, publish));
    assert!(!spans.is_linked_to(publish, process));
    spans.assert_linked("process agent.writer", "publish mindbus.main");
    assert_eq!(process.links.len(), 1);
    assert_eq!(
        process.links[0].attr("link.reason"),
        Some(&AttrValue::from("delivery"))
    );

    // Status.
    assert!(llm.is_error());
    assert_eq!(llm.status.code, StatusCode::Error);
    assert_eq!(llm.status.message, "rate limited");
    assert_eq!(root.status.code, StatusCode::Unset);

    // Durations and rendering.
    assert_eq!(root.duration(), Duration::from_micros(10_500));
    assert_eq!(llm.duration(), Duration::from_micros(6_800));
    assert_eq!(
        spans.render(trace_id),
        "execute_task (orchestrator) 10.5ms [server]\n\
         \x20 publish mindbus.main (orchestrator) 1.2ms [producer]\n\
         \x20   process agent.writer (orchestrator) 7.2ms [consumer]\n\
         \x20     llm_call (orchestrator) 6.8ms [client] !error: rate limited\n"
    );
    assert!(
        spans
            .render_all()
            .starts_with(&format!("trace {trace_id} (4 spans)\n"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batch_exporter_delivers_the_tree() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let exporter = grpc_exporter(&receiver, WAIT, RetryPolicy::disabled());
    let provider = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_batch_exporter(exporter)
        .build();

    let emitted = emit_tree(&provider);
    flush(&provider).await;
    let spans = receiver.wait_for_spans(4, WAIT).await;
    check_tree(&spans, &emitted);
    assert_eq!(receiver.grpc_requests(), 1, "one batch");
    assert_eq!(receiver.http_requests(), 0);
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_simple_exporter_delivers_the_tree() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let exporter = http_exporter(&receiver, WAIT, RetryPolicy::disabled());
    // The simple processor exports each span as it ends, on the thread ending it
    // (a Tokio worker here, which the async hyper client needs).
    let provider = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_simple_exporter(exporter)
        .build();

    let emitted = emit_tree(&provider);
    let spans = receiver.wait_for_spans(4, WAIT).await;
    check_tree(&spans, &emitted);
    // One request per span, over the client's kept-alive connection.
    assert_eq!(receiver.http_requests(), 4);
    assert_eq!(receiver.grpc_requests(), 0);
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_async_batch_processor_delivers_the_tree() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let exporter = http_exporter(&receiver, WAIT, RetryPolicy::disabled());
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource())
        .with_span_processor(processor)
        .build();

    let emitted = emit_tree(&provider);
    flush(&provider).await;
    let spans = receiver.wait_for_spans(4, WAIT).await;
    check_tree(&spans, &emitted);
    assert_eq!(receiver.http_requests(), 1, "one batch");

    // clear() forgets the spans; the next export is seen alone.
    receiver.clear();
    assert_eq!(receiver.span_count(), 0);
    provider.tracer("again").in_span("second", |_| {});
    flush(&provider).await;
    let spans = receiver
        .wait_until(WAIT, |s| s.find("second").is_some())
        .await;
    spans.assert_len(1);
    assert_eq!(receiver.http_requests(), 2);
    shutdown(provider).await;
}

/// A hand-made span, to call `SpanExporter::export` directly and see its result.
fn span_data(name: &'static str) -> opentelemetry_sdk::trace::SpanData {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    let now = SystemTime::now();
    opentelemetry_sdk::trace::SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([7; 8]),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: name.into(),
        start_time: now,
        end_time: now,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status: Status::Unset,
        instrumentation_scope: opentelemetry::InstrumentationScope::builder("direct").build(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_mode_makes_exports_fail() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_mode(Mode::Unavailable);
    assert_eq!(receiver.mode(), Mode::Unavailable);

    let grpc = grpc_exporter(&receiver, WAIT, RetryPolicy::disabled());
    let http = http_exporter(&receiver, WAIT, RetryPolicy::disabled());
    let grpc_result = grpc.export(vec![span_data("refused")]).await;
    let http_result = http.export(vec![span_data("refused")]).await;
    assert!(
        grpc_result.is_err(),
        "gRPC export should fail: {grpc_result:?}"
    );
    assert!(
        http_result.is_err(),
        "HTTP export should fail: {http_result:?}"
    );
    assert_eq!(receiver.grpc_requests(), 1);
    assert_eq!(receiver.http_requests(), 1);
    assert_eq!(receiver.span_count(), 0, "refused spans are dropped");

    // Back to normal: the same exporters now succeed.
    receiver.set_mode(Mode::Accept);
    grpc.export(vec![span_data("accepted")])
        .await
        .expect("gRPC export");
    http.export(vec![span_data("accepted")])
        .await
        .expect("HTTP export");
    let spans = receiver.wait_for_spans(2, WAIT).await;
    assert_eq!(spans.find_all("accepted").len(), 2);
    assert!(spans.find("refused").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_retried_by_the_default_policy() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_mode(Mode::Unavailable);
    let grpc = grpc_exporter(&receiver, WAIT, RetryPolicy::default());
    let result = grpc.export(vec![span_data("refused")]).await;
    assert!(result.is_err());
    assert!(
        receiver.grpc_requests() > 1,
        "UNAVAILABLE is retryable: {} attempt(s)",
        receiver.grpc_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_mode_is_cut_by_the_exporter_timeout() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let timeout = Duration::from_secs(1);
    let grpc = grpc_exporter(&receiver, timeout, RetryPolicy::disabled());
    let http = http_exporter(&receiver, timeout, RetryPolicy::disabled());
    // Connect first (both exporters connect lazily), so that the held
    // requests below surely reach the receiver within the timeout.
    grpc.export(vec![span_data("warm-up")])
        .await
        .expect("gRPC export");
    http.export(vec![span_data("warm-up")])
        .await
        .expect("HTTP export");
    receiver.wait_for_spans(2, WAIT).await.assert_len(2);
    receiver.clear();
    let (grpc_before, http_before) = (receiver.grpc_requests(), receiver.http_requests());
    receiver.set_mode(Mode::Hang);

    let started = Instant::now();
    let (grpc_result, http_result) = tokio::join!(
        grpc.export(vec![span_data("held")]),
        http.export(vec![span_data("held")]),
    );
    let elapsed = started.elapsed();
    assert!(
        grpc_result.is_err(),
        "gRPC export should time out: {grpc_result:?}"
    );
    assert!(
        http_result.is_err(),
        "HTTP export should time out: {http_result:?}"
    );
    assert!(
        elapsed >= timeout,
        "returned before the timeout: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(receiver.grpc_requests(), grpc_before + 1);
    assert_eq!(receiver.http_requests(), http_before + 1);

    // Releasing the held requests does not store their spans; new exports succeed.
    receiver.set_mode(Mode::Accept);
    grpc.export(vec![span_data("later")])
        .await
        .expect("gRPC export");
    http.export(vec![span_data("later")])
        .await
        .expect("HTTP export");
    let spans = receiver.wait_for_spans(2, WAIT).await;
    spans.assert_len(2);
    assert!(spans.find("held").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_both_ports() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let grpc_addr = receiver.grpc_addr();
    let http_addr = receiver.http_addr();
    assert_eq!(receiver.grpc_endpoint(), format!("http://{grpc_addr}"));
    assert_eq!(receiver.http_endpoint(), format!("http://{http_addr}"));
    assert_eq!(
        receiver.http_traces_endpoint(),
        format!("http://{http_addr}/v1/traces")
    );
    assert!(grpc_addr.ip().is_loopback() && http_addr.ip().is_loopback());
    assert_ne!(grpc_addr.port(), http_addr.port());
    tokio::net::TcpStream::connect(http_addr)
        .await
        .expect("open before");

    receiver.shutdown().await;
    assert!(tokio::net::TcpStream::connect(http_addr).await.is_err());
    assert!(tokio::net::TcpStream::connect(grpc_addr).await.is_err());
}
