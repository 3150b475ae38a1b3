//! Export over OTLP/gRPC and OTLP/HTTP to an in-test receiver on 127.0.0.1.
//!
//! These tests install nothing global (no subscriber, no global tracer provider,
//! no metrics recorder), so they can share one test binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use mindbus_otel_testkit::OtlpReceiver;
use mindbus_telemetry::opentelemetry::trace::{
    SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use mindbus_telemetry::opentelemetry::{Context, KeyValue};
use mindbus_telemetry::{BatchSettings, Config, OtlpProtocol, TraceViewMode};

fn config(endpoint: String, protocol: OtlpProtocol) -> Config {
    Config::new()
        .service_name("orchestrator")
        .otlp_protocol(protocol)
        .otlp_endpoint(endpoint)
        .batch(BatchSettings::default().with_scheduled_delay(Duration::from_millis(100)))
        .metrics(false)
        .trace_view(TraceViewMode::Off)
        .install_subscriber(false)
        .install_tracer_provider(false)
        .resource_attribute("deployment.environment", "test")
        .service_version("1.2.3")
        .resource_attribute("host.name", "overridden")
        .shutdown_timeout(Duration::from_secs(5))
}

/// Records `execute_task > publish` on the main provider and `process > llm_call`
/// on a second provider named `writer`, then shuts down and checks what arrived.
async fn round_trip(protocol: OtlpProtocol) {
    let receiver = OtlpReceiver::start().await.unwrap();
    let endpoint = match protocol {
        OtlpProtocol::Grpc => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    };
    let telemetry = mindbus_telemetry::init(config(endpoint, protocol)).unwrap();
    assert_eq!(telemetry.traces_target().unwrap().protocol, protocol);
    let writer = telemetry.tracer_provider_for("writer");
    let orchestrator = telemetry.tracer_provider().unwrap().tracer("test");
    let agent = writer.tracer("test");

    orchestrator.in_span("execute_task", |cx| {
        let publish = orchestrator
            .span_builder("publish mindbus.main")
            .with_kind(SpanKind::Producer)
            .start_with_context(&orchestrator, &cx);
        let publish_cx = Context::current_with_span(publish);
        let process = agent
            .span_builder("process agent.writer")
            .with_kind(SpanKind::Consumer)
            .with_attributes([KeyValue::new("messaging.system", "rabbitmq")])
            .start_with_context(&agent, &publish_cx);
        let process_cx = Context::current_with_span(process);
        agent.start_with_context("llm_call", &process_cx);
    });

    let spans = receiver.wait_for_spans(4, Duration::from_secs(10)).await;
    assert_eq!(spans.len(), 4, "{}", spans.render_all());
    spans.assert_single_trace();
    spans.assert_parent("publish mindbus.main", "execute_task");
    spans.assert_parent("process agent.writer", "publish mindbus.main");
    spans.assert_parent("llm_call", "process agent.writer");
    for (name, service) in [
        ("execute_task", "orchestrator"),
        ("publish mindbus.main", "orchestrator"),
        ("process agent.writer", "writer"),
        ("llm_call", "writer"),
    ] {
        let span = spans.one(name);
        assert_eq!(span.service_name.as_deref(), Some(service), "{name}");
        // What tells this process from another: Jaeger needs a host to
        // correct clock skew between two services of one process.
        let attr = |key: &str| span.resource_attr(key).cloned();
        let pid = i64::from(std::process::id());
        assert_eq!(attr("process.pid").and_then(|v| v.as_i64()), Some(pid));
        assert_eq!(
            attr("os.type")
                .and_then(|v| v.as_str().map(String::from))
                .as_deref(),
            Some("linux")
        );
        assert_eq!(
            attr("service.version")
                .and_then(|v| v.as_str().map(String::from))
                .as_deref(),
            Some("1.2.3")
        );
        assert_eq!(
            attr("host.name")
                .and_then(|v| v.as_str().map(String::from))
                .as_deref(),
            Some("overridden"),
            "a configured attribute overrides a detected one"
        );
        let instance = attr("service.instance.id").and_then(|v| v.as_str().map(String::from));
        assert_eq!(instance.as_deref().map(str::len), Some(36), "{instance:?}");
        assert!(
            attr("process.command_args").is_none(),
            "no command line: it may hold secrets"
        );
        // Jaeger's host key: the first of host.ip, when the host has one.
        let first_ip = match attr("host.ip") {
            Some(mindbus_otel_testkit::AttrValue::Array(ips)) => {
                ips.first().and_then(|v| v.as_str().map(String::from))
            }
            _ => None,
        };
        let ip = attr("ip").and_then(|v| v.as_str().map(String::from));
        assert_eq!(ip, first_ip, "{name}");
        assert!(
            span.resource
                .iter()
                .any(|(key, value)| key == "deployment.environment"
                    && value.as_str() == Some("test")),
            "{name}: {:?}",
            span.resource
        );
    }

    let started = Instant::now();
    telemetry.shutdown().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let stats = telemetry.span_stats();
    assert_eq!(stats.ended, 4);
    assert_eq!(stats.exported, 4);
    assert_eq!(stats.failed, 0);
    assert_eq!(telemetry.spans_exported(), 4);
    receiver.shutdown().await;
}

// Multi-thread: the receiver runs on this runtime while `shutdown` blocks a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_over_grpc() {
    round_trip(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_over_http_protobuf() {
    round_trip(OtlpProtocol::HttpProtobuf).await;
}

/// Many spans, all exported: none dropped with the default queue sizing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_a_burst_without_dropping() {
    const SPANS: u64 = 20_000;
    let receiver = OtlpReceiver::start().await.unwrap();
    let telemetry =
        mindbus_telemetry::init(config(receiver.grpc_endpoint(), OtlpProtocol::Grpc)).unwrap();
    let tracer = telemetry.tracer_provider().unwrap().tracer("burst");
    for _ in 0..SPANS {
        tracer.start("tick");
    }
    let spans = receiver
        .wait_for_spans(SPANS as usize, Duration::from_secs(30))
        .await;
    assert_eq!(spans.len() as u64, SPANS);
    telemetry.shutdown().unwrap();
    let stats = telemetry.span_stats();
    assert_eq!(
        (stats.ended, stats.exported, stats.failed),
        (SPANS, SPANS, 0)
    );
    receiver.shutdown().await;
}

/// Without an endpoint, nothing is exported and nothing is counted.
#[test]
fn no_endpoint_no_export() {
    let telemetry = mindbus_telemetry::init(
        Config::new()
            .service_name("quiet")
            .metrics(false)
            .trace_view(TraceViewMode::Off)
            .install_subscriber(false)
            .install_tracer_provider(false),
    )
    .unwrap();
    assert!(telemetry.traces_target().is_none());
    telemetry
        .tracer_provider()
        .unwrap()
        .tracer("t")
        .in_span("work", |_| {});
    telemetry.shutdown().unwrap();
    assert_eq!(telemetry.span_stats(), Default::default());
}

#[test]
fn invalid_endpoints_are_fatal() {
    for (endpoint, protocol) in [
        ("https://collector:4317", OtlpProtocol::Grpc),
        ("https://collector:4318", OtlpProtocol::HttpProtobuf),
        ("127.0.0.1:4317", OtlpProtocol::Grpc),
        ("http://[bad", OtlpProtocol::HttpProtobuf),
    ] {
        let error = mindbus_telemetry::init(config(endpoint.to_owned(), protocol)).unwrap_err();
        assert!(
            matches!(error, mindbus_telemetry::Error::InvalidEndpoint { .. }),
            "{endpoint}: {error:?}"
        );
        assert!(
            error
                .to_string()
                .contains(endpoint.split('/').next().unwrap())
        );
    }
}
