//! The OTLP/HTTP server driven by a raw TCP client writing HTTP/1.1 by hand:
//! keep-alive, chunked bodies, error statuses and fault modes.

// Test helpers outside #[test] functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mindbus_otel_testkit::{Mode, OtlpReceiver};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// An encoded export request with one span named `name`.
fn payload(name: &str, span_byte: u8) -> Vec<u8> {
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("raw-client".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![1; 16],
                    span_id: vec![span_byte; 8],
                    parent_span_id: vec![0; 8],
                    name: name.into(),
                    start_time_unix_nano: 1_000,
                    end_time_unix_nano: 851_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    request.encode_to_vec()
}

struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    async fn connect(receiver: &OtlpReceiver) -> Client {
        let stream = TcpStream::connect(receiver.http_addr())
            .await
            .expect("connect");
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// A POST with a Content-Length body.
    async fn post(&mut self, path: &str, content_type: &str, body: &[u8], extra: &str) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        );
        self.send(head.as_bytes()).await;
        self.send(body).await;
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).await.expect("read line");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads one response (Content-Length framed, as the server always sends).
    async fn reply(&mut self) -> Reply {
        tokio::time::timeout(WAIT, self.reply_inner())
            .await
            .expect("response in time")
    }

    async fn reply_inner(&mut self) -> Reply {
        let status_line = self.line().await;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').expect("header");
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("length"))
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).await.expect("body");
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Whether the server closes the connection within the wait (any bytes still
    /// sent before the end of stream are skipped).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(WAIT, self.reader.read_to_end(&mut rest)).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut client = Client::connect(&receiver).await;
    for i in 0..3u8 {
        client
            .post(
                "/v1/traces",
                "application/x-protobuf",
                &payload("span", i + 1),
                "",
            )
            .await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/x-protobuf"));
        // HTTP/1.1 connections persist unless a side says `close`.
        assert_ne!(reply.header("connection"), Some("close"));
        assert!(reply.body.is_empty(), "empty ExportTraceServiceResponse");
    }
    assert_eq!(receiver.http_requests(), 3);
    let spans = receiver.wait_for_spans(3, WAIT).await;
    spans.assert_len(3);
    let span = &spans.as_slice()[0];
    assert_eq!(span.service_name.as_deref(), Some("raw-client"));
    assert_eq!(span.parent_span_id, None, "all-zero parent is no parent");
    assert_eq!(span.kind, opentelemetry::trace::SpanKind::Internal);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut client = Client::connect(&receiver).await;
    let body = payload("pipelined", 9);
    let mut bytes = Vec::new();
    for path in ["/v1/traces", "/nope", "/v1/traces"] {
        bytes.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        bytes.extend_from_slice(&body);
    }
    client.send(&bytes).await;
    assert_eq!(client.reply().await.status, 200);
    assert_eq!(client.reply().await.status, 404);
    assert_eq!(client.reply().await.status, 200);
    assert_eq!(receiver.span_count(), 2);
}

#[tokio::test]
async fn chunked_bodies_are_reassembled() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut client = Client::connect(&receiver).await;
    let body = payload("chunked", 5);
    let (a, rest) = body.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut bytes = b"POST /v1/traces HTTP/1.1\r\nHost: localhost\r\n\
        Content-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    bytes.extend_from_slice(format!("{:x}\r\n", a.len()).as_bytes());
    bytes.extend_from_slice(a);
    // Upper-case hex and a chunk extension.
    bytes.extend_from_slice(format!("\r\n{:X};note=x\r\n", b.len()).as_bytes());
    bytes.extend_from_slice(b);
    bytes.extend_from_slice(format!("\r\n{:x}\r\n", c.len()).as_bytes());
    bytes.extend_from_slice(c);
    bytes.extend_from_slice(b"\r\n0\r\nX-Trailer: yes\r\n\r\n");
    // Send in small pieces to exercise partial reads.
    for piece in bytes.chunks(7) {
        client.send(piece).await;
        tokio::task::yield_now().await;
    }
    let reply = client.reply().await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // The connection is still usable, now with a Content-Length body.
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &payload("after", 6),
            "",
        )
        .await;
    assert_eq!(client.reply().await.status, 200);
    let spans = receiver.wait_for_spans(2, WAIT).await;
    assert_eq!(spans.one("chunked").duration(), Duration::from_micros(850));
    spans.one("after");
}

#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut client = Client::connect(&receiver).await;
    let body = payload("continued", 4);
    client
        .send(
            format!(
                "POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(client.line().await, "HTTP/1.1 100 Continue");
    assert_eq!(client.line().await, "");
    client.send(&body).await;
    assert_eq!(client.reply().await.status, 200);
    receiver.wait_for_spans(1, WAIT).await.one("continued");
}

#[tokio::test]
async fn error_statuses_keep_the_connection_open() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut client = Client::connect(&receiver).await;
    let body = payload("x", 1);

    client
        .post("/v1/profiles", "application/x-protobuf", &body, "")
        .await;
    assert_eq!(client.reply().await.status, 404);

    // A trace request sent to the metrics path is not a metrics request.
    client
        .post(
            "/v1/metrics",
            "application/x-protobuf",
            &payload("x", 2),
            "",
        )
        .await;
    assert_eq!(client.reply().await.status, 400);

    client
        .send(b"GET /v1/traces HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));

    client
        .post("/v1/traces", "application/json", b"{}", "")
        .await;
    assert_eq!(client.reply().await.status, 415);

    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &body,
            "Content-Encoding: gzip\r\n",
        )
        .await;
    assert_eq!(client.reply().await.status, 415);

    client
        .post("/v1/traces", "application/x-protobuf", b"\xff\xff\xff", "")
        .await;
    assert_eq!(client.reply().await.status, 400);

    // Content-Type parameters and case are tolerated; the query string is ignored.
    client
        .post(
            "/v1/traces?x=1",
            "Application/X-Protobuf; charset=binary",
            &body,
            "",
        )
        .await;
    assert_eq!(client.reply().await.status, 200);
    assert_eq!(receiver.span_count(), 1);
    // 404 and 405 are not export requests.
    assert_eq!(receiver.http_requests(), 5);
}

#[tokio::test]
async fn connection_close_and_http_1_0_close_after_the_response() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let body = payload("closing", 2);

    let mut client = Client::connect(&receiver).await;
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &body,
            "Connection: close\r\n",
        )
        .await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closed().await);

    let mut client = Client::connect(&receiver).await;
    client
        .send(
            format!(
                "POST /v1/traces HTTP/1.0\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    client.send(&body).await;
    assert_eq!(client.reply().await.status, 200);
    assert!(client.closed().await);
}

#[tokio::test]
async fn malformed_requests_get_400_and_close() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    for request in [
        &b"NONSENSE\r\n\r\n"[..],
        b"POST /v1/traces HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/traces HTTP/1.1\r\nbad header\r\n\r\n",
    ] {
        let mut client = Client::connect(&receiver).await;
        client.send(request).await;
        let reply = client.reply().await;
        assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(request));
        assert!(client.closed().await);
    }
}

#[tokio::test]
async fn unavailable_mode_answers_503() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_mode(Mode::Unavailable);
    let mut client = Client::connect(&receiver).await;
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &payload("no", 1),
            "",
        )
        .await;
    let reply = client.reply().await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(receiver.span_count(), 0);
}

#[tokio::test]
async fn hang_mode_holds_the_request_until_the_mode_changes() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_mode(Mode::Hang);
    let mut client = Client::connect(&receiver).await;
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &payload("held", 1),
            "",
        )
        .await;
    // The request is being held once the server has read it (on this
    // current-thread runtime, possibly only after the test task yields).
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        while receiver.http_requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(arrived.is_ok(), "the request reached the receiver");
    let early = tokio::time::timeout(Duration::from_millis(300), client.reply_inner()).await;
    assert!(early.is_err(), "no answer while hanging");
    assert_eq!(receiver.http_requests(), 1);

    receiver.set_mode(Mode::Accept);
    let reply = client.reply().await;
    assert_eq!(
        reply.status, 503,
        "a held request is released as unavailable"
    );
    assert_eq!(receiver.span_count(), 0);

    // The connection goes on normally.
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &payload("ok", 2),
            "",
        )
        .await;
    assert_eq!(client.reply().await.status, 200);
    assert_eq!(receiver.span_count(), 1);
}

#[tokio::test]
async fn dropping_the_receiver_releases_held_requests() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    receiver.set_mode(Mode::Hang);
    let mut client = Client::connect(&receiver).await;
    client
        .post(
            "/v1/traces",
            "application/x-protobuf",
            &payload("held", 1),
            "",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(receiver);
    assert!(client.closed().await, "connection closed on drop");
}
