//! The bootstrap's tracing bridge keeps dependencies' own spans (lapin's
//! `io_loop`, h2, tonic, ...) out of the user's traces: only the user's
//! spans become OpenTelemetry spans. Its own test binary: it installs the
//! global subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_telemetry::{Config, TraceViewMode, TraceViewOutput};

#[test]
fn dependency_spans_do_not_become_traces() {
    let telemetry = mindbus_telemetry::init(
        Config::new()
            .service_name("ai_team")
            .trace_view(TraceViewMode::On)
            .trace_view_output(TraceViewOutput::Capture)
            .metrics(false)
            .log_filter("trace")
            .logs(false),
    )
    .unwrap();
    for _ in 0..20 {
        // As lapin's I/O thread opens its span: a root of its own.
        let io_loop = tracing::info_span!(target: "lapin::io_loop", "io_loop");
        io_loop.in_scope(|| {
            let _h2 = tracing::debug_span!(target: "h2::proto", "poll").entered();
        });
        drop(io_loop);
        // A user's span, and a dependency span inside it.
        tracing::info_span!(target: "ai_team", "execute_task").in_scope(|| {
            let _send = tracing::info_span!(target: "tonic::transport", "send").entered();
            let _own = tracing::info_span!(target: "ai_team", "llm_call").entered();
        });
    }
    let traces = telemetry.take_rendered_traces();
    assert_eq!(
        traces.len(),
        20,
        "one trace per task, none of lapin's:\n{traces:#?}"
    );
    for tree in &traces {
        let names: Vec<&str> = tree
            .lines()
            .map(|l| l.trim_start().split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(names, ["execute_task", "llm_call"], "{tree}");
    }
}
