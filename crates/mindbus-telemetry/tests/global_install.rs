//! `init` with the global subscriber and tracer provider: `tracing` spans become
//! OpenTelemetry spans of the main provider; a second `init` degrades with
//! warnings. Installs global state: one test in this file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_telemetry::opentelemetry::global;
use mindbus_telemetry::opentelemetry::trace::{Tracer as _, TracerProvider as _};
use mindbus_telemetry::{Config, TraceViewMode, TraceViewOutput};

#[test]
fn tracing_spans_join_traces() {
    let telemetry = mindbus_telemetry::init(
        Config::new()
            .service_name("orchestrator")
            .log_filter("info")
            .metrics(false)
            .trace_view(TraceViewMode::On)
            .trace_view_output(TraceViewOutput::Capture),
    )
    .unwrap();
    assert!(telemetry.subscriber_installed());
    assert!(
        telemetry.warnings().is_empty(),
        "{:?}",
        telemetry.warnings()
    );

    // A `tracing` span with an OpenTelemetry span (global provider) inside it.
    {
        let span = tracing::info_span!("handle_request");
        let _entered = span.enter();
        tracing::info!(answer = 42, "inside the request");
        global::tracer("plugin").in_span("publish mindbus.main", |_| {});
    }
    let traces = telemetry.take_rendered_traces();
    assert_eq!(traces.len(), 1, "{traces:#?}");
    let lines: Vec<&str> = traces[0].lines().collect();
    assert!(
        lines[0].starts_with("handle_request (orchestrator) "),
        "{}",
        traces[0]
    );
    assert!(
        lines[1].starts_with("  publish mindbus.main (orchestrator) "),
        "{}",
        traces[0]
    );

    // Filtered out by the `info` filter: no span.
    tracing::debug_span!("noise").in_scope(|| {});
    assert!(telemetry.take_rendered_traces().is_empty());

    // A second init in the same process: warnings, no panic.
    let second = mindbus_telemetry::init(
        Config::new()
            .service_name("second")
            .metrics(false)
            .trace_view(TraceViewMode::Off),
    )
    .unwrap();
    assert!(!second.subscriber_installed());
    assert!(
        second
            .warnings()
            .iter()
            .any(|w| w.contains("subscriber is already installed")),
        "{:?}",
        second.warnings()
    );
    // Its provider replaced the global one; spans still work.
    second
        .tracer_provider()
        .unwrap()
        .tracer("x")
        .in_span("ok", |_| {});
    second.shutdown().unwrap();
    telemetry.shutdown().unwrap();
}
