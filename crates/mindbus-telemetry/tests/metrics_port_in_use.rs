//! A busy metrics port is a warning: the recorder still works in-process. Installs
//! the global metrics recorder: one test in this file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;

use mindbus_telemetry::{Config, TraceViewMode};

#[test]
fn busy_port_degrades_to_in_process_metrics() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let telemetry = mindbus_telemetry::init(
        Config::new()
            .metrics_addr(Some(busy.local_addr().unwrap()))
            .trace_view(TraceViewMode::Off)
            .install_subscriber(false)
            .install_tracer_provider(false),
    )
    .unwrap();
    assert_eq!(telemetry.metrics_addr(), None);
    assert_eq!(telemetry.warnings().len(), 1, "{:?}", telemetry.warnings());
    assert!(telemetry.warnings()[0].contains("cannot listen"));
    metrics::counter!("mindbus_busy_total").increment(1);
    assert!(
        telemetry
            .prometheus_render()
            .unwrap()
            .contains("mindbus_busy_total 1")
    );

    // A second init finds the global recorder taken: a warning, no panic.
    let second = mindbus_telemetry::init(
        Config::new()
            .metrics_addr(None)
            .trace_view(TraceViewMode::Off)
            .install_subscriber(false)
            .install_tracer_provider(false),
    )
    .unwrap();
    assert_eq!(second.prometheus_render(), None);
    assert!(
        second
            .warnings()
            .iter()
            .any(|w| w.contains("already installed"))
    );
    drop(second);
    drop(telemetry);
    drop(busy);
}
