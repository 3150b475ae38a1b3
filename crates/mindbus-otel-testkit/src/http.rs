//! OTLP/HTTP (binary protobuf) for the three signals, served by hyper:
//! `POST /v1/traces`, `/v1/logs` and `/v1/metrics`.
//!
//! hyper does the HTTP/1.1 (persistent connections, pipelining, chunked
//! bodies, `Expect: 100-continue`, `Connection: close`, HTTP/1.0, `400` for
//! what does not parse); this module routes, checks the content type and
//! encoding, decodes the export request and applies the receiver's
//! [`Mode`](crate::Mode).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::net::TcpListener;

use crate::receiver::{MAX_MESSAGE_BYTES, Outcome, Shared};

const PROTOBUF: &str = "application/x-protobuf";
const TEXT: &str = "text/plain; charset=utf-8";

/// Accepts connections until the receiver stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = shared.stopped() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let handler = Arc::clone(&shared);
                        let service = service_fn(move |request| {
                            let shared = Arc::clone(&handler);
                            async move { Ok::<_, Infallible>(route(request, &shared).await) }
                        });
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = connection => {}
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

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT));
    response
}

fn protobuf(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
    response
}

/// The signal a path is for.
#[derive(Clone, Copy)]
enum Signal {
    Traces,
    Logs,
    Metrics,
}

/// Answers one request. The body is read first, whatever the answer, so
/// that the connection stays usable after an error status (hyper closes a
/// connection whose request body was left unread).
async fn route(request: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (request, body) = request.into_parts();
    let body = match Limited::new(body, MAX_MESSAGE_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "malformed body"),
    };
    let signal = match request.uri.path() {
        "/v1/traces" => Signal::Traces,
        "/v1/logs" => Signal::Logs,
        "/v1/metrics" => Signal::Metrics,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "not found: this receiver serves POST /v1/traces, /v1/logs and /v1/metrics",
            );
        }
    };
    if request.method != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    shared.count_http_request();
    let header = |name| {
        request
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .unwrap_or_default()
    };
    let encoding = header(CONTENT_ENCODING);
    if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content-encoding: send uncompressed bodies",
        );
    }
    let content_type = header(CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    if !content_type.eq_ignore_ascii_case(PROTOBUF) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content-type: this receiver accepts application/x-protobuf only",
        );
    }
    let decoded = match signal {
        Signal::Traces => match ExportTraceServiceRequest::decode(body) {
            Ok(export) => Ok(shared.export(&export).await),
            Err(_) => Err("body is not an ExportTraceServiceRequest"),
        },
        Signal::Logs => match ExportLogsServiceRequest::decode(body) {
            Ok(export) => Ok(shared.export_logs(&export).await),
            Err(_) => Err("body is not an ExportLogsServiceRequest"),
        },
        Signal::Metrics => match ExportMetricsServiceRequest::decode(body) {
            Ok(export) => Ok(shared.export_metrics(&export).await),
            Err(_) => Err("body is not an ExportMetricsServiceRequest"),
        },
    };
    match decoded {
        Err(message) => text(StatusCode::BAD_REQUEST, message),
        Ok(Outcome::Accepted) => protobuf(match signal {
            Signal::Traces => ExportTraceServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
            Signal::Logs => ExportLogsServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
            Signal::Metrics => ExportMetricsServiceResponse {
                partial_success: None,
            }
            .encode_to_vec(),
        }),
        Ok(Outcome::Unavailable) => {
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "receiver is set to refuse exports",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}
