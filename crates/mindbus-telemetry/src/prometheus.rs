//! The Prometheus recorder (via the `metrics` facade) and its HTTP listener.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;

/// Histogram buckets (seconds) of every metric whose name ends in `_seconds`.
pub const SECONDS_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Histogram buckets of `ai_team_quality_score`.
pub const QUALITY_SCORE_BUCKETS: [f64; 6] = [0.0, 2.0, 4.0, 6.0, 8.0, 10.0];

/// Name of the quality score histogram that gets [`QUALITY_SCORE_BUCKETS`].
pub const QUALITY_SCORE_METRIC: &str = "ai_team_quality_score";

/// The messaging conventions' advisory buckets (seconds) for
/// `messaging.client.operation.duration` and `messaging.process.duration`
/// (v1.44.0, `messaging-metrics.md`).
pub const MESSAGING_DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The GenAI conventions' advisory buckets for `gen_ai.client.token.usage`
/// (v1.41.1, `gen-ai-metrics.md`).
pub const GENAI_TOKEN_USAGE_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// The GenAI conventions' advisory buckets (seconds) for
/// `gen_ai.client.operation.duration`.
pub const GENAI_DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Histograms with buckets of their own, by name (the metrics facade's
/// names); every other `…_seconds` histogram gets [`SECONDS_BUCKETS`].
const NAMED_BUCKETS: [(&str, &[f64]); 5] = [
    (QUALITY_SCORE_METRIC, &QUALITY_SCORE_BUCKETS),
    (
        "messaging_client_operation_duration_seconds",
        &MESSAGING_DURATION_BUCKETS,
    ),
    (
        "messaging_process_duration_seconds",
        &MESSAGING_DURATION_BUCKETS,
    ),
    ("gen_ai_client_token_usage", &GENAI_TOKEN_USAGE_BUCKETS),
    (
        "gen_ai_client_operation_duration_seconds",
        &GENAI_DURATION_BUCKETS,
    ),
];

/// The bucket boundaries of histogram `name`, on the Prometheus endpoint
/// and over OTLP alike: the conventions' advisory ones for the messaging
/// and GenAI durations and token usage, [`QUALITY_SCORE_BUCKETS`] for the
/// quality score, [`SECONDS_BUCKETS`] for any other `…_seconds` (task and
/// LLM durations run to minutes); `None` for the rest (the exporter's
/// defaults).
pub fn histogram_buckets(name: &str) -> Option<&'static [f64]> {
    NAMED_BUCKETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .or_else(|| name.ends_with("_seconds").then_some(&SECONDS_BUCKETS[..]))
}

/// How often histogram and idle-metric maintenance runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Most bytes read of a scrape request's head.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

pub(crate) struct Metrics {
    pub(crate) handle: Option<PrometheusHandle>,
    pub(crate) addr: Option<SocketAddr>,
}

/// The recorder's builder, with the histogram buckets of
/// [`histogram_buckets`]. Never fails: problems are warnings.
fn builder(warnings: &mut Vec<String>) -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    // The exporter tries full-name matchers before suffix ones.
    let named = NAMED_BUCKETS
        .iter()
        .map(|(name, buckets)| (Matcher::Full((*name).to_owned()), *buckets));
    let suffix = (Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS[..]);
    for (matcher, buckets) in named.chain([suffix]) {
        // Only empty bucket lists are refused, and these are constants.
        builder = match builder.set_buckets_for_metric(matcher, buckets) {
            Ok(builder) => builder,
            Err(error) => {
                warnings.push(format!("cannot set histogram buckets: {error}"));
                PrometheusBuilder::new()
            }
        };
    }
    builder
}

/// Builds the recorder, installs it globally and starts the listener on `runtime`.
/// Never fails: problems are returned as warnings.
pub(crate) fn install(
    listen: Option<SocketAddr>,
    runtime: Option<&Handle>,
    warnings: &mut Vec<String>,
) -> Metrics {
    let recorder = builder(warnings).build_recorder();
    let handle = recorder.handle();
    if let Err(error) = metrics::set_global_recorder(recorder) {
        warnings.push(format!(
            "a global metrics recorder is already installed ({error}); metrics go to it, not to this Prometheus endpoint"
        ));
        return Metrics {
            handle: None,
            addr: None,
        };
    }

    let mut addr = None;
    if let Some(runtime) = runtime {
        let upkeep = handle.clone();
        runtime.spawn(async move {
            let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                interval.tick().await;
                upkeep.run_upkeep();
            }
        });
        if let Some(listen) = listen {
            match bind(listen) {
                Ok(listener) => {
                    addr = listener.local_addr().ok();
                    runtime.spawn(serve(listener, handle.clone()));
                }
                Err(error) => warnings.push(format!(
                    "cannot listen for Prometheus scrapes on {listen}: {error}; metrics stay available in-process only"
                )),
            }
        }
    }
    Metrics {
        handle: Some(handle),
        addr,
    }
}

fn bind(listen: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn serve(listener: std::net::TcpListener, handle: PrometheusHandle) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "Prometheus listener failed");
            return;
        }
    };
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), respond(stream, handle)).await;
        });
    }
}

async fn respond(
    mut stream: tokio::net::TcpStream,
    handle: PrometheusHandle,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
        if head.len() > MAX_REQUEST_HEAD {
            break;
        }
    }
    let request_line = head
        .split(|&byte| byte == b'\n')
        .next()
        .map(|line| String::from_utf8_lossy(line).trim().to_owned())
        .unwrap_or_default();
    let response = response_for(&request_line, || handle.render());
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// The full HTTP response to a request line; `render` gives the exposition text.
pub(crate) fn response_for(request_line: &str, render: impl FnOnce() -> String) -> Vec<u8> {
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let (status, content_type, body, with_body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
            method == "GET",
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: scrape /metrics\n".to_owned(),
            method == "GET",
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
            true,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conventions' buckets for the messaging and GenAI histograms,
    /// ours for the other durations, on the recorder itself.
    #[test]
    fn histograms_get_their_buckets() {
        assert_eq!(
            histogram_buckets("messaging_process_duration_seconds"),
            Some(&MESSAGING_DURATION_BUCKETS[..])
        );
        assert_eq!(
            histogram_buckets("gen_ai_client_token_usage"),
            Some(&GENAI_TOKEN_USAGE_BUCKETS[..])
        );
        assert_eq!(
            histogram_buckets("ai_team_task_duration_seconds"),
            Some(&SECONDS_BUCKETS[..])
        );
        assert_eq!(histogram_buckets("something_else"), None);
        let mut warnings = Vec::new();
        let recorder = builder(&mut warnings).build_recorder();
        assert!(warnings.is_empty(), "{warnings:?}");
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for name in [
                "messaging_client_operation_duration_seconds",
                "messaging_process_duration_seconds",
                "gen_ai_client_operation_duration_seconds",
                "gen_ai_client_token_usage",
                "mindbus_processing_duration_seconds",
                QUALITY_SCORE_METRIC,
            ] {
                metrics::histogram!(name).record(1.0);
            }
        });
        let text = handle.render();
        let top = |name: &str| -> Option<String> {
            text.lines()
                .rfind(|l| l.starts_with(&format!("{name}_bucket{{le=")) && !l.contains("+Inf"))
                .and_then(|l| l.split('"').nth(1))
                .map(str::to_owned)
        };
        assert_eq!(
            top("messaging_client_operation_duration_seconds").as_deref(),
            Some("10"),
            "{text}"
        );
        assert_eq!(
            top("messaging_process_duration_seconds").as_deref(),
            Some("10")
        );
        assert_eq!(
            top("gen_ai_client_operation_duration_seconds").as_deref(),
            Some("81.92")
        );
        assert_eq!(
            top("gen_ai_client_token_usage").as_deref(),
            Some("67108864")
        );
        assert_eq!(
            top("mindbus_processing_duration_seconds").as_deref(),
            Some("300")
        );
        assert_eq!(top(QUALITY_SCORE_METRIC).as_deref(), Some("10"));
    }

    #[test]
    fn responses() {
        let ok =
            String::from_utf8(response_for("GET /metrics HTTP/1.1", || "a 1\n".into())).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(ok.contains("Content-Length: 4\r\n"));
        assert!(ok.ends_with("\r\n\r\na 1\n"));
        let head = String::from_utf8(response_for("HEAD / HTTP/1.1", || "a 1\n".into())).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
        let missing = String::from_utf8(response_for("GET /nope HTTP/1.1", String::new)).unwrap();
        assert!(missing.starts_with("HTTP/1.1 404"));
        let post = String::from_utf8(response_for("POST /metrics HTTP/1.1", String::new)).unwrap();
        assert!(post.starts_with("HTTP/1.1 405"));
        let query =
            String::from_utf8(response_for("GET /metrics?x=1 HTTP/1.0", || "b\n".into())).unwrap();
        assert!(query.starts_with("HTTP/1.1 200"));
    }
}
