//! OpenTelemetry instrumentation for **MindBus**, the RabbitMQ (AMQP 0-9-1)
//! bus on which an AI orchestrator and its agents exchange CloudEvents.
//!
//! Wrap a [`lapin`] channel once; from then on every message carries W3C
//! trace context in its AMQP headers, and interceptors see every publish,
//! delivery and settlement, without changes to agent code.
//!
//! # Quick start
//! ```no_run
//! use mindbus_otel::{TracedChannel, TraceContext};
//! use mindbus_otel::lapin::{options::*, types::FieldTable, BasicProperties, Connection, ConnectionProperties};
//!
//! # async fn run() -> lapin::Result<()> {
//! let conn = Connection::connect("amqp://guest:guest@127.0.0.1:5672/%2f", ConnectionProperties::default()).await?;
//! let channel = TracedChannel::builder(conn.create_channel().await?)
//!     .agent("agent.writer.001")
//!     .with(TraceContext::default())
//!     .build();
//! // The same calls as lapin:
//! channel
//!     .basic_publish("mindbus.main".into(), "cmd.writer.any".into(), BasicPublishOptions::default(),
//!         br#"{"specversion":"1.0","type":"ai.team.command"}"#, BasicProperties::default())
//!     .await?
//!     .await?;
//! // Handler style: runs inside the message's trace context; Ok acks, Err dead-letters.
//! channel
//!     .consume_with("agent.writer".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default(),
//!         |delivery| async move {
//!             let _ = delivery.data.len();
//!             Ok::<(), std::io::Error>(())
//!         })
//!     .await?;
//! # Ok(()) }
//! ```
//! [`TracedChannel::new`] gives the standard chain in one line:
//! [`TraceContext`] and [`MessagingSpans`] (spans through the global tracer
//! provider). Add [`AgentMetrics`] and [`TaskMetrics`] with the builder.
//!
//! # The chain
//! A [`TracedChannel`] runs an ordered list of [`Interceptor`]s with
//! synchronous, infallible hooks; see [`interceptor`] for when each hook
//! runs and in which order. Each interceptor keeps per-message state in
//! [`MessageState::extensions`]. Your own interceptors are ordinary types
//! implementing the trait, or closures ([`on_publish`], [`on_delivery`],
//! [`on_settle`], [`on_publish_result`]).
//!
//! # Consuming
//! - **Stream style**: [`TracedChannel::basic_consume`] returns a
//!   [`TracedConsumer`] of [`TracedDelivery`] items (they deref to lapin's
//!   `Delivery`); settle them with `ack`/`nack`/`reject`; one dropped
//!   unsettled is reported as such. [`TracedDelivery::context`] is the
//!   context to process it in.
//! - **Handler style**: [`TracedChannel::consume_with`]: the handler runs
//!   inside the message's context and is settled for you; panics are caught
//!   (see [`handler`]).
//! - [`TracedChannel::basic_get`] for one-off pulls.
//!
//! # MindBus awareness
//! Every message's body is read at most once by the [`envelope`] reader
//! (kind COMMAND/RESULT/ERROR/EVENT/CONTROL, CloudEvents ids, action, error
//! code, LLM metrics), shared by all interceptors, without copying the
//! payload and without failing on non-JSON.
//!
//! # Propagation
//! [`TraceContext`]: W3C `traceparent`/`tracestate`/`baggage` as AMQP
//! `LongString` headers; reads `LongString`, `ShortString` and `ByteArray`,
//! falls back to the CloudEvents `traceparent` in the body, and counts every
//! rejected value by reason ([`PropagationStats`]).
//!
//! # Spans
//! [`MessagingSpans`]: a PRODUCER span per publish (ended by the broker's
//! confirm when confirms are on) and a CONSUMER span per delivery (ended by
//! its settlement), named and attributed by the OpenTelemetry messaging
//! conventions plus MindBus and CloudEvents attributes; a RESULT or ERROR
//! published while its COMMAND is in hand is that COMMAND's child in both
//! consume styles. See [`spans`] for the model and the statuses.
//!
//! # Metrics
//! [`AgentMetrics`] (the OpenTelemetry messaging metrics and per-agent
//! counters) and [`TaskMetrics`] (AI_TEAM task and LLM metrics derived from
//! COMMAND/RESULT/ERROR traffic), through the `metrics` facade with cached
//! handles and capped label values. See [`agent_metrics`] and
//! [`task_metrics`] for every metric's name, type and labels.
//!
//! # Telemetry never breaks messaging
//! Hooks cannot fail; a hook that panics is caught and counted
//! ([`hook_panics`]); lapin's results and errors are returned unchanged.
//!
//! # Cost
//! The full chain adds about 19k instructions per message and side (a few
//! µs); `BENCHMARKS.md` in the repository has the measurements. Sampled spans
//! are built on the publishing or consuming thread and freed on the batch
//! processor's thread; with glibc's allocator those cross-thread frees
//! contend for its arena lock and cost about 1.3-1.7 µs per message more
//! than with jemalloc or mimalloc as the application's global allocator.

pub use lapin;
pub use opentelemetry;

pub mod agent_metrics;
pub mod carrier;
mod channel;
mod clock;
mod confirm;
mod delivery;
pub mod destination;
pub mod envelope;
pub mod genai;
pub mod handler;
mod in_flight;
pub mod interceptor;
pub mod labels;
pub mod message;
pub mod propagation;
pub mod semconv;
mod settles;
pub mod spans;
pub mod task_metrics;
pub mod w3c;

#[cfg(test)]
#[path = "../tests/support/fixtures.rs"]
#[allow(clippy::expect_used, clippy::panic, dead_code)]
mod test_fixtures;

pub use agent_metrics::AgentMetrics;
pub use channel::{TracedChannel, TracedChannelBuilder};
pub use confirm::PublisherConfirm;
pub use delivery::{TracedConsumer, TracedDelivery, TracedGetMessage};
pub use envelope::{BodyFormat, Envelope, EnvelopeRef, MessageKind};
pub use handler::{CancelOutcome, ConsumeStats, ConsumerHandle};
pub use interceptor::{
    ChainError, Interceptor, InterceptorChain, hook_panics, on_delivery, on_publish,
    on_publish_result, on_settle,
};
pub use message::{
    Direction, EmptyPull, Extensions, HandlerFailure, IncomingMessage, MessageState, Outcome,
    OutgoingMessage, PublishResult, Settlement,
};
pub use propagation::{ContextSource, PropagationStats, TraceContext};
pub use spans::{MessagingSpans, SpanStats};
pub use task_metrics::TaskMetrics;
pub use w3c::RejectReason;
