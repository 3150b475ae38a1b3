//! Hosts the runnable examples (`examples/`) and the end-to-end tests
//! (`tests/`) of the mindbus-otel workspace.

/// The README's examples, compiled as doc tests (the README uses the
/// plugin and the telemetry bootstrap together).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
