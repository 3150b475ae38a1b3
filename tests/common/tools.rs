//! The real components the end-to-end tests run, built by
//! `bash .ci/deps.sh --all` into `$MINDBUS_TOOLS/bin` (default
//! `~/.cache/mindbus-otel/bin`).
//!
//! Include it from a test file with `#[path = "common/tools.rs"] mod tools;`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

/// Where `.ci/deps.sh --all` links the tools.
pub fn tools_bin() -> PathBuf {
    match std::env::var_os("MINDBUS_TOOLS") {
        Some(dir) => PathBuf::from(dir).join("bin"),
        None => {
            let home = std::env::var_os("HOME").expect("HOME");
            PathBuf::from(home).join(".cache/mindbus-otel/bin")
        }
    }
}

/// A tool's path; a missing tool fails the test with one line saying how
/// to get it (never a skip: a test that passes without its tool proves
/// nothing).
pub fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash .ci/deps.sh --all` (builds Jaeger and the OpenTelemetry Collector once, about 10 minutes)",
        path.display()
    );
    path
}
