//! The [`Error`] returned by [`init`](crate::init) for genuinely fatal problems.

use std::fmt;

/// Why [`init`](crate::init) refused to start.
///
/// Only configuration that cannot mean anything sensible is fatal (an endpoint URL
/// that does not parse, an `https` endpoint this build cannot serve). Everything
/// else — a busy metrics port, an already installed global subscriber or recorder,
/// an unknown sampler name — degrades with a warning instead.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An OTLP endpoint is not a usable `http://host:port[/path]` URL.
    InvalidEndpoint {
        /// The signal (`traces` or `logs`).
        signal: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The OTLP exporter could not be built.
    Exporter {
        /// The signal (`traces` or `logs`).
        signal: &'static str,
        /// The exporter's message.
        reason: String,
    },
    /// The background runtime that drives exports could not be started.
    Runtime(std::io::Error),
    /// [`Telemetry::shutdown`](crate::Telemetry::shutdown) could not flush
    /// everything in time (or an export failed); the shutdown is complete all the
    /// same.
    Shutdown(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidEndpoint {
                signal,
                endpoint,
                reason,
            } => write!(f, "invalid OTLP {signal} endpoint {endpoint:?}: {reason}"),
            Error::Exporter { signal, reason } => {
                write!(f, "cannot build the OTLP {signal} exporter: {reason}")
            }
            Error::Runtime(error) => write!(f, "cannot start the telemetry runtime: {error}"),
            Error::Shutdown(reason) => write!(f, "telemetry shutdown incomplete: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Runtime(error) => Some(error),
            _ => None,
        }
    }
}
