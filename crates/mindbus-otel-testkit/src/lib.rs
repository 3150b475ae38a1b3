//! Test OpenTelemetry instrumentation end to end, through the real OTLP protocol.
//!
//! `mindbus-otel-testkit` runs an in-process OTLP receiver ([`OtlpReceiver`]) that
//! speaks OTLP/gRPC and OTLP/HTTP (binary protobuf) on `127.0.0.1` for traces, logs
//! and metrics, decodes what it receives into owned [`ReceivedSpan`]s,
//! [`ReceivedLog`]s (with the trace and span they were written in:
//! [`ReceivedLog::in_span`]) and [`ReceivedMetricPoint`]s, and offers assertions on
//! the resulting trace trees ([`SpanSet`]). Failed assertions print every received trace as a text tree:
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736 (4 spans)
//! execute_task (orchestrator) 10.5ms [server]
//!   publish mindbus.main (orchestrator) 1.2ms [producer]
//!     process agent.writer (writer) 7.2ms [consumer]
//!       llm_call (writer) 6.8ms [client] !error: rate limited
//! ```
//!
//! Because spans go through a real exporter, the test covers what unit tests with an
//! in-memory exporter miss: resource attributes, batching, the wire encoding of ids,
//! links and attribute types, and the exporter configuration itself.
//!
//! # How to use it
//!
//! 1. Start the receiver in a Tokio test: [`OtlpReceiver::start`].
//! 2. Point an [`opentelemetry-otlp`](https://docs.rs/opentelemetry-otlp) span exporter at
//!    it: [`OtlpReceiver::grpc_endpoint`] for `.with_tonic()`, or
//!    [`OtlpReceiver::http_traces_endpoint`] for `.with_http()` (the HTTP exporter uses
//!    the endpoint as given, so it must end with `/v1/traces`).
//! 3. Build an `SdkTracerProvider` with that exporter (and a `Resource` with your
//!    `service.name`) and run the code under test with it. Use the provider directly
//!    (`provider.tracer(..)`) rather than installing it globally, so that tests can run
//!    in parallel.
//! 4. Flush: `provider.force_flush()` (or `shutdown()`). These calls block the current
//!    thread until the exporter is done, so call them from
//!    [`tokio::task::spawn_blocking`](https://docs.rs/tokio/latest/tokio/task/fn.spawn_blocking.html).
//! 5. Wait for the spans and assert: [`OtlpReceiver::wait_for_spans`] returns a
//!    [`SpanSet`] once enough spans arrived (or at the timeout, with what is there).
//!
//! In a test, the function below would be an
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn`:
//!
//! ```
//! use std::time::Duration;
//!
//! use mindbus_otel_testkit::OtlpReceiver;
//! use opentelemetry::trace::{Tracer, TracerProvider as _};
//! use opentelemetry_otlp::WithExportConfig;
//! use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
//!
//! #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! async fn main() {
//!     let receiver = OtlpReceiver::start().await.unwrap();
//!     let exporter = opentelemetry_otlp::SpanExporter::builder()
//!         .with_tonic()
//!         .with_endpoint(receiver.grpc_endpoint())
//!         .with_timeout(Duration::from_secs(5))
//!         .build()
//!         .unwrap();
//!     let provider = SdkTracerProvider::builder()
//!         .with_resource(Resource::builder().with_service_name("orchestrator").build())
//!         .with_batch_exporter(exporter)
//!         .build();
//!
//!     // The code under test, given the provider (or a tracer made from it).
//!     let tracer = provider.tracer("my-agent");
//!     tracer.in_span("execute_task", |_cx| {
//!         tracer.in_span("publish mindbus.main", |_cx| {});
//!     });
//!
//!     // force_flush blocks until the export is done: keep it off the async threads.
//!     let flushing = provider.clone();
//!     tokio::task::spawn_blocking(move || flushing.force_flush())
//!         .await
//!         .unwrap()
//!         .unwrap();
//!
//!     let spans = receiver.wait_for_spans(2, Duration::from_secs(5)).await;
//!     spans.assert_len(2);
//!     spans.assert_single_trace();
//!     spans.assert_parent("publish mindbus.main", "execute_task");
//!     let root = spans.one("execute_task");
//!     assert_eq!(root.service_name.as_deref(), Some("orchestrator"));
//!     assert!(spans.render(root.trace_id).contains("  publish mindbus.main (orchestrator)"));
//!
//!     let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
//! }
//! ```
//!
//! # Choosing the exporter set-up
//!
//! What works with `opentelemetry-otlp` 0.33 and `opentelemetry_sdk` 0.33 (this crate's
//! own tests exercise the first three):
//!
//! | transport | span processor | works? |
//! | --- | --- | --- |
//! | gRPC (`grpc-tonic`) | `with_batch_exporter` (the SDK's batch thread) | yes; build the exporter inside the runtime |
//! | gRPC or HTTP with an async client | `with_simple_exporter` | on a `multi_thread` runtime only |
//! | gRPC or HTTP with an async client | `span_processor_with_async_runtime::BatchSpanProcessor` with `runtime::Tokio` | yes (SDK features `rt-tokio` and `experimental_trace_batch_span_processor_with_async_runtime`) |
//! | HTTP, async client (`hyper-client`, `reqwest-client`) | `with_batch_exporter` | **no**: the batch thread has no Tokio reactor, the export panics and the spans are lost |
//! | HTTP, `reqwest-blocking-client` (the crate's default) | `with_batch_exporter` | yes (the usual production set-up) |
//!
//! The HTTP exporter with an async client, as used in this crate's tests:
//!
//! ```no_run
//! # async fn demo(receiver: &mindbus_otel_testkit::OtlpReceiver) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use opentelemetry_otlp::{Protocol, WithExportConfig};
//! use opentelemetry_sdk::{runtime, trace::SdkTracerProvider};
//! use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
//!
//! // opentelemetry-otlp features: "trace", "http-proto", "hyper-client"
//! let exporter = opentelemetry_otlp::SpanExporter::builder()
//!     .with_http()
//!     .with_protocol(Protocol::HttpBinary)
//!     .with_endpoint(receiver.http_traces_endpoint())
//!     .with_timeout(Duration::from_secs(5))
//!     .build()?;
//! let provider = SdkTracerProvider::builder()
//!     .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
//!     .build();
//! # let _ = provider;
//! # Ok(())
//! # }
//! ```
//!
//! Whatever the set-up, prefer `#[tokio::test(flavor = "multi_thread")]`: on a
//! current-thread runtime a blocking `force_flush` or a simple processor stalls the
//! very runtime the exporter needs.
//!
//! # Asserting
//!
//! [`SpanSet`] answers questions about the trees: [`SpanSet::one`] (exactly one span with
//! a name), [`SpanSet::parent_of`], [`SpanSet::children_of`], [`SpanSet::ancestors`],
//! [`SpanSet::is_linked_to`], [`SpanSet::trace`], [`SpanSet::by_service`] … and asserts:
//! [`SpanSet::assert_single_trace`], [`SpanSet::assert_parent`],
//! [`SpanSet::assert_linked`], [`SpanSet::assert_len`], [`SpanSet::assert_no_errors`].
//! Attributes are read with [`ReceivedSpan::attr_str`], [`ReceivedSpan::attr_i64`] and
//! friends. [`render_tree`] renders any slice of spans, received or built by hand.
//!
//! # Fault injection
//!
//! [`OtlpReceiver::set_mode`] makes the receiver refuse exports ([`Mode::Unavailable`]:
//! gRPC `UNAVAILABLE`, HTTP `503`) or hold them without answering ([`Mode::Hang`]), to
//! test how instrumented code behaves when the collector is down or stuck. Set a short
//! exporter timeout (`.with_timeout(..)`) and, to keep tests fast, disable retries with
//! `.with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())`.
//!
//! # Scope
//!
//! Traces only; the receiver binds `127.0.0.1` only, on random ports, so any number of
//! receivers can run in parallel tests. Compressed requests (gzip, zstd) and OTLP/JSON
//! are refused with HTTP `415` (gRPC compression is not enabled either).

mod http;
mod model;
mod receiver;
mod render;
mod signals;
mod spanset;

pub use model::{
    AttrValue, ReceivedEvent, ReceivedLink, ReceivedSpan, ReceivedStatus, StatusCode,
    decode_attributes, spans_from_request,
};
pub use receiver::{Mode, OtlpReceiver};
pub use render::{format_duration, kind_name, render_span_line, render_trace, render_tree};
pub use signals::{
    MetricKind, PointValue, ReceivedLog, ReceivedMetricPoint, logs_from_request,
    metric_points_from_request,
};
pub use spanset::SpanSet;
