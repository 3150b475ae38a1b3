//! A test service for the W3C Trace Context test suite
//! (w3c/trace-context, `test/test.py`), doing with the incoming
//! `traceparent` / `tracestate` exactly what a MindBus agent does with a
//! message's headers: [`w3c::parse_traceparent`] and
//! [`w3c::parse_tracestate_counted`], then, for each callback the harness
//! asks for, a new span id in the same trace and
//! [`w3c::format_tracestate_inherited`] /
//! [`w3c::format_tracestate_limited`] for the outgoing hop.
//!
//! ```sh
//! cargo run --example w3c_service -- 127.0.0.1:5000 &
//! cd trace-context/test && python test.py http://127.0.0.1:5000/test
//! ```
//!
//! HTTP/1.1 just far enough for the harness: one request per connection,
//! `Content-Length` bodies, several `tracestate` fields joined with commas
//! (RFC 9110, as the specification asks).

use mindbus_otel::opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use mindbus_otel::w3c;
use serde_json::Value;
use std::hash::{BuildHasher, RandomState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5000".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("w3c_service: listening on http://{addr}/test");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = serve(stream).await {
                eprintln!("w3c_service: {e}");
            }
        });
    }
}

/// One HTTP request: its header fields and body.
struct Request {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Request { headers, body })
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    let request = read_request(&mut stream).await?;
    // The incoming context, as an agent reads a message's headers.
    let field = |name: &str| -> Option<String> {
        let values: Vec<&str> = request
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    let parent = match request
        .headers
        .iter()
        .filter(|(k, _)| k == "traceparent")
        .count()
    {
        1 => field("traceparent").and_then(|tp| w3c::parse_traceparent(&tp).ok()),
        _ => None,
    };
    let inherited = match (&parent, field("tracestate")) {
        (Some(_), Some(ts)) => w3c::parse_tracestate_counted(&ts).unwrap_or_default(),
        _ => w3c::ParsedTracestate::default(),
    };
    let actions: Vec<Value> = serde_json::from_slice(&request.body).unwrap_or_default();
    for action in actions {
        let Some(url) = action["url"].as_str() else {
            continue;
        };
        // A new span in the same trace (or a new trace).
        let (trace_id, flags) = match &parent {
            Some(p) => (p.trace_id(), p.trace_flags() & TraceFlags::SAMPLED),
            None => (
                TraceId::from(random() as u128 | (random() as u128) << 64),
                TraceFlags::SAMPLED,
            ),
        };
        let state = match &parent {
            Some(_) => inherited.state.clone(),
            None => TraceState::NONE,
        };
        let sc = SpanContext::new(trace_id, SpanId::from(random() | 1), flags, false, state);
        let mut headers = vec![("traceparent".to_owned(), w3c::format_traceparent(&sc))];
        if parent.is_some() {
            let (ts, _) = if inherited.members.is_empty() {
                w3c::format_tracestate_limited(sc.trace_state())
            } else {
                w3c::format_tracestate_inherited(sc.trace_state(), &inherited.members)
            };
            if !ts.is_empty() {
                headers.push(("tracestate".to_owned(), ts));
            }
        }
        let body = serde_json::to_vec(&action["arguments"]).unwrap_or_default();
        if let Err(e) = post(url, &headers, &body).await {
            eprintln!("w3c_service: callback {url}: {e}");
        }
    }
    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    stream.write_all(reply).await?;
    stream.shutdown().await
}

/// POSTs `body` to an `http://host:port/path` URL and reads the answer.
async fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> std::io::Result<()> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).await?;
    let mut head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(())
}

fn random() -> u64 {
    RandomState::new().hash_one(std::time::SystemTime::now())
}
