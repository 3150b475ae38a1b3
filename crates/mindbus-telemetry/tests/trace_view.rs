//! The terminal trace view renders one tree for a trace that crosses two providers
//! with different service names. Nothing global is installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::thread::sleep;
use std::time::Duration;

use mindbus_telemetry::opentelemetry::Context;
use mindbus_telemetry::opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use mindbus_telemetry::{Config, TraceViewMode, TraceViewOutput};

fn config() -> Config {
    Config::new()
        .service_name("orchestrator")
        .trace_view(TraceViewMode::On)
        .trace_view_output(TraceViewOutput::Capture)
        .metrics(false)
        .install_subscriber(false)
        .install_tracer_provider(false)
}

#[test]
fn captures_a_trace_across_two_providers() {
    let telemetry = mindbus_telemetry::init(config()).unwrap();
    assert!(telemetry.trace_view_enabled());
    let orchestrator = telemetry.tracer_provider().unwrap().tracer("demo");
    let writer_provider = telemetry.tracer_provider_for("writer");
    let writer = writer_provider.tracer("demo");

    orchestrator.in_span("execute_task", |cx| {
        let mut publish = orchestrator
            .span_builder("publish mindbus.main")
            .with_kind(SpanKind::Producer)
            .start_with_context(&orchestrator, &cx);
        let publish_cx = cx.with_remote_span_context(publish.span_context().clone());
        publish.end();
        // The writer agent consumes the message under the publish span, remote as
        // when it comes through message headers.
        let process = writer
            .span_builder("process agent.writer")
            .with_kind(SpanKind::Consumer)
            .start_with_context(&writer, &publish_cx);
        let process_cx = Context::current_with_span(process);
        sleep(Duration::from_millis(2));
        let mut llm = writer.start_with_context("llm_call", &process_cx);
        sleep(Duration::from_millis(3));
        llm.set_status(Status::error("rate limited"));
        llm.end();
        drop(process_cx);
        assert!(
            telemetry.take_rendered_traces().is_empty(),
            "printed too early"
        );
    });

    let traces = telemetry.take_rendered_traces();
    assert_eq!(traces.len(), 1, "{traces:#?}");
    let lines: Vec<&str> = traces[0].lines().collect();
    assert_eq!(lines.len(), 4, "{}", traces[0]);
    assert!(
        lines[0].starts_with("execute_task (orchestrator) "),
        "{}",
        traces[0]
    );
    assert!(
        lines[1].starts_with("  publish mindbus.main (orchestrator) "),
        "{}",
        traces[0]
    );
    assert!(lines[1].ends_with(" [producer]"), "{}", traces[0]);
    assert!(
        lines[2].starts_with("    process agent.writer (writer) "),
        "{}",
        traces[0]
    );
    assert!(lines[2].ends_with(" [consumer]"), "{}", traces[0]);
    assert!(
        lines[3].starts_with("      llm_call (writer) "),
        "{}",
        traces[0]
    );
    assert!(lines[3].ends_with(" !error: rate limited"), "{}", traces[0]);
    assert!(lines[3].contains("ms"), "{}", traces[0]);

    // A second, independent trace is rendered on its own.
    writer.in_span("heartbeat", |_| {});
    let traces = telemetry.take_rendered_traces();
    assert_eq!(traces.len(), 1, "{traces:#?}");
    assert!(
        traces[0].starts_with("heartbeat (writer) "),
        "{}",
        traces[0]
    );
    assert_eq!(traces[0].lines().count(), 1);
    telemetry.shutdown().unwrap();
}
