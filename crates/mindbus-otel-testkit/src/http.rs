//! A minimal HTTP/1.1 server for OTLP/HTTP (binary protobuf) trace exports.
//!
//! It handles what OTLP exporters send: `POST /v1/traces` with a `Content-Length` or
//! chunked body, persistent connections (several requests per connection) and
//! `Expect: 100-continue`. It is not a general purpose server.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};

use crate::receiver::{MAX_MESSAGE_BYTES, Outcome, Shared};

/// Longest accepted request line, header line or chunk-size line.
const MAX_LINE_BYTES: u64 = 16 * 1024;
/// Most header lines accepted in one request (trailers included).
const MAX_HEADERS: usize = 128;

const PROTOBUF: &str = "application/x-protobuf";
const TEXT: &str = "text/plain; charset=utf-8";

/// Accepts connections until the receiver stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.stopped() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = connection(stream, &shared) => {}
                            () = shared.stopped() => {}
                        }
                    });
                }
                // E.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    /// Header names are lowercased; values are trimmed.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response to write.
struct Response {
    status: u16,
    content_type: &'static str,
    extra_headers: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, message: &str) -> Response {
        Response {
            status,
            content_type: TEXT,
            extra_headers: "",
            body: format!("{message}\n").into_bytes(),
        }
    }
}

/// Why a request could not be read.
enum ReadError {
    /// The connection failed or closed mid-request: nothing to answer.
    Io(io::Error),
    /// The request is malformed or too large: answer with this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// Serves the requests of one connection, one after the other.
async fn connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    loop {
        let request = match read_request(&mut reader, &mut write_half).await {
            Ok(Some(request)) => request,
            Ok(None) => return Ok(()),
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Bad(status, message)) => {
                let response = Response::text(status, message);
                write_response(&mut write_half, &response, false).await?;
                return Ok(());
            }
        };
        let keep_alive = request.keep_alive;
        let response = route(request, shared).await;
        write_response(&mut write_half, &response, keep_alive).await?;
        if !keep_alive {
            write_half.shutdown().await?;
            return Ok(());
        }
    }
}

/// Answers one request.
async fn route(request: Request, shared: &Shared) -> Response {
    let path = request.path.split('?').next().unwrap_or_default();
    if path != "/v1/traces" {
        return Response::text(404, "not found: this receiver serves POST /v1/traces");
    }
    if request.method != "POST" {
        return Response {
            extra_headers: "Allow: POST\r\n",
            ..Response::text(405, "method not allowed: use POST")
        };
    }
    shared.count_http_request();
    if let Some(encoding) = request.header("content-encoding")
        && !encoding.eq_ignore_ascii_case("identity")
    {
        return Response::text(
            415,
            "unsupported content-encoding: send uncompressed bodies",
        );
    }
    let content_type = request
        .header("content-type")
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    if !content_type.eq_ignore_ascii_case(PROTOBUF) {
        return Response::text(
            415,
            "unsupported content-type: this receiver accepts application/x-protobuf only",
        );
    }
    let export = match ExportTraceServiceRequest::decode(request.body.as_slice()) {
        Ok(export) => export,
        Err(_) => return Response::text(400, "body is not an ExportTraceServiceRequest"),
    };
    match shared.export(&export).await {
        Outcome::Accepted => Response {
            status: 200,
            content_type: PROTOBUF,
            extra_headers: "",
            body: ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
        },
        Outcome::Unavailable => Response {
            extra_headers: "Retry-After: 1\r\n",
            ..Response::text(503, "receiver is set to refuse exports")
        },
    }
}

/// Reads one request; `Ok(None)` when the peer closed the connection between requests.
async fn read_request<R, W>(reader: &mut R, writer: &mut W) -> Result<Option<Request>, ReadError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Request line (RFC 9112 allows empty lines before it).
    let request_line = loop {
        match read_line(reader).await? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "malformed request line"));
    };
    let http_10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Bad(505, "HTTP version not supported")),
    };

    let headers = read_headers(reader).await?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let has_token = |name: &str, token: &str| {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = if http_10 {
        has_token("connection", "keep-alive")
    } else {
        !has_token("connection", "close")
    };
    let chunked = match find("transfer-encoding") {
        None => false,
        Some(te) => {
            // Only `chunked` (possibly listed alone) is supported as a transfer coding.
            if te
                .split(',')
                .all(|t| t.trim().eq_ignore_ascii_case("chunked"))
            {
                true
            } else {
                return Err(ReadError::Bad(501, "unsupported transfer-encoding"));
            }
        }
    };
    let content_length = match find("content-length") {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return Err(ReadError::Bad(400, "invalid content-length")),
        },
    };

    if find("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        && (chunked || content_length.unwrap_or(0) > 0)
    {
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        writer.flush().await?;
    }

    let body = if chunked {
        read_chunked_body(reader).await?
    } else if let Some(len) = content_length {
        if len > MAX_MESSAGE_BYTES {
            return Err(ReadError::Bad(413, "body too large"));
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await?;
        body
    } else {
        Vec::new()
    };

    Ok(Some(Request {
        method: method.to_owned(),
        path: target.to_owned(),
        headers,
        body,
        keep_alive,
    }))
}

/// Reads header lines up to the empty line.
async fn read_headers<R>(reader: &mut R) -> Result<Vec<(String, String)>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(reader).await? else {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        };
        if line.is_empty() {
            return Ok(headers);
        }
        if headers.len() == MAX_HEADERS {
            return Err(ReadError::Bad(431, "too many headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header line"));
        };
        if name.is_empty() || name.ends_with(char::is_whitespace) {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Reads a `Transfer-Encoding: chunked` body, trailers included.
async fn read_chunked_body<R>(reader: &mut R) -> Result<Vec<u8>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut body = Vec::new();
    loop {
        let Some(line) = read_line(reader).await? else {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        };
        // Chunk extensions (`;name=value`) are ignored.
        let size = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return Err(ReadError::Bad(400, "invalid chunk size"));
        };
        if size == 0 {
            read_headers(reader).await?; // trailers, discarded
            return Ok(body);
        }
        if body.len().saturating_add(size) > MAX_MESSAGE_BYTES {
            return Err(ReadError::Bad(413, "body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).await?;
        match read_line(reader).await? {
            Some(end) if end.is_empty() => {}
            _ => return Err(ReadError::Bad(400, "chunk not followed by CRLF")),
        }
    }
}

/// Reads one line, without its line ending (CRLF or a lone LF); `Ok(None)` at end of
/// stream before any byte.
async fn read_line<R>(reader: &mut R) -> Result<Option<String>, ReadError>
where
    R: AsyncBufRead + Unpin,
{
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return if n as u64 >= MAX_LINE_BYTES {
            Err(ReadError::Bad(431, "line too long"))
        } else {
            Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()))
        };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    match String::from_utf8(line) {
        Ok(line) => Ok(Some(line)),
        Err(_) => Err(ReadError::Bad(400, "request head is not valid UTF-8")),
    }
}

async fn write_response<W>(writer: &mut W, response: &Response, keep_alive: bool) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {connection}\r\n{}\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        response.extra_headers,
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&response.body);
    writer.write_all(&bytes).await?;
    writer.flush().await
}
