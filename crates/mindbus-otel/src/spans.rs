//! [`MessagingSpans`]: PRODUCER and CONSUMER spans following the
//! OpenTelemetry messaging semantic conventions, with MindBus and
//! CloudEvents attributes and RPC-aware parenting.
//!
//! # The span model
//! | operation | kind | name | starts | ends |
//! |---|---|---|---|---|
//! | `basic_publish` | PRODUCER | `publish {destination}` | publish hook | broker confirm (confirms on), hand-off to lapin (off), or the error |
//! | push delivery | CONSUMER | `process {destination}` | delivery hook | settlement: ack, nack, reject, auto-ack or drop |
//! | `basic_get` call | CLIENT | `receive {destination}` | the call | its return (also when it fetched nothing, or failed) |
//! | a message it fetched | CONSUMER | `process {destination}` | the call's return | settlement |
//! | ack, nack or reject call ([`MessagingSpans::settle_spans`]) | CLIENT | `ack {destination}`, ... | the call | its return |
//!
//! `messaging.destination.name` is the conventions' RabbitMQ name:
//! `{exchange}:{routing key}` when sent (`mindbus.main:cmd.writer.any`),
//! `{exchange}:{routing key}:{queue}` when received
//! (`mindbus.main:cmd.writer.any:agent.writer`). Routing keys hold agent ids,
//! so `{destination}` in span names is the low-cardinality
//! `messaging.destination.template` (`mindbus.main:cmd.writer.*`,
//! `mindbus.main:cmd.writer.*:agent.writer`; see [`crate::destination`]).
//! Server-named and direct reply-to queues (`amq.gen-*`,
//! `amq.rabbitmq.reply-to*`) never appear in names or templates: a reply to
//! one has no template, and, as the conventions ask for anonymous
//! destinations, its span name is the operation alone (`publish`,
//! `process`); such spans carry `messaging.destination.temporary` (and
//! `.anonymous`).
//!
//! **Parents.** A PRODUCER span is a child of the caller's current span.
//! When there is none and the message is a RESULT or ERROR whose
//! `correlation_id` and routing key match a COMMAND this process is
//! handling (received with that `correlation_id` and `reply_to`), it is a
//! child of that COMMAND's CONSUMER span: so RPC replies join the task's
//! trace in the stream style as in the handler style, where the CONSUMER
//! span is simply current. The in-flight table is bounded
//! ([`MessagingSpans::max_in_flight`]) and entries leave it at settlement.
//!
//! A `process` span's parent is the producer's context (from headers or
//! the CloudEvents body), so one task is one trace; it also carries a link
//! to it. [`MessagingSpans::link_only`] makes chosen kinds (say EVENT
//! fan-out) start a new trace with only the link. Whatever span is current
//! where deliveries are polled is ignored: a push consumer's processing
//! belongs to the message, not to the consumer loop. A pull (`basic_get`)
//! follows the semantic conventions: its `receive` span covers the call,
//! is a child of the caller's current span (when there is none, of the
//! producer, as a push), and links to the producer; a pull that fetched
//! nothing has one too, with `messaging.batch.message_count` 0 (or the
//! call's `error.type`). What it fetched is processed in a `process` span,
//! the receive's child, linked to the producer, until settlement.
//! ([`MessagingSpans::legacy_shapes`]: one CONSUMER `receive` span from the
//! pull's return to settlement, none for an empty pull.)
//!
//! **Status.** Ack and auto-ack leave the status unset; nack and reject set
//! error (`error.type` = `nack` / `reject`, requeue recorded); a delivery
//! dropped unsettled sets error `unsettled`. A handler error or panic adds
//! an `exception` event and sets `error.type` to `handler_error` /
//! `panic`. An `ai.team.error` message, sent or received, sets the error
//! status (a failed task is red in Jaeger) but not `error.type`, which the
//! conventions keep for a failed operation: its code is in
//! `mindbus.error.code`. A publish nacked by the broker
//! ends with `nack`, one returned as unroutable with `unroutable`, one lapin
//! rejected with the lapin error class (`amqp_404`, `channel_closed`, ...).
//!
//! Payloads are never recorded unless [`MessagingSpans::record_payload`]
//! opts in (with a byte cap). `messaging.message.body.size` is opt-in too
//! ([`MessagingSpans::record_body_size`]), as in the semantic conventions,
//! and `cloudevents.event_spec_version` is recorded only when it is not the
//! `1.0` every MindBus message carries: default spans of COMMAND, RESULT,
//! EVENT and CONTROL messages keep to 17 attributes, which keeps each
//! span's attribute vector out of glibc's slower large-allocation path
//! (BENCHMARKS.md).
//!
//! **Times.** A span starts when the chain's start hooks began and ends
//! when its end hooks began, from the chain's two monotonic clock readings
//! ([`MessageState::started`], [`MessageState::ended`]) mapped to wall-clock
//! time: its duration is the one the metrics record.

use crate::clock;
use crate::destination::{Destination, with_scratch};
use crate::envelope::{EnvelopeRef, MessageKind};
pub use crate::in_flight::DEFAULT_MAX_IN_FLIGHT;
use crate::in_flight::{InFlight, awaited_reply};
use crate::interceptor::Interceptor;
use crate::labels::ReadMostly;
use crate::message::{
    Direction, EmptyPull, HandlerFailure, IncomingMessage, MessageState, Outcome, OutgoingMessage,
    PublishResult, Settlement,
};
use crate::semconv::*;
use lapin::Confirmation;
use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::global::{self, BoxedSpan, BoxedTracer};
use opentelemetry::trace::SpanBuilder;
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer, TracerProvider,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("mindbus-otel")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Where spans go.
#[derive(Clone)]
enum TracerSource {
    /// The global provider, looked up per span (so installing the provider
    /// after building the channel still works).
    Global,
    /// A tracer from a given provider (shared by the copies that
    /// configuring a shared instance makes).
    Fixed(Arc<BoxedTracer>),
}

/// Counters of a [`MessagingSpans`] interceptor.
#[derive(Debug, Default)]
pub struct SpanStats {
    started: AtomicU64,
    ended: AtomicU64,
    rpc_parented: AtomicU64,
    in_flight_full: AtomicU64,
}

impl SpanStats {
    /// Spans started.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
    /// Spans ended.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }
    /// RESULT/ERROR publishes parented through the in-flight COMMAND table.
    pub fn rpc_parented(&self) -> u64 {
        self.rpc_parented.load(Ordering::Relaxed)
    }
    /// COMMANDs not tracked because the in-flight table was full.
    pub fn in_flight_full(&self) -> u64 {
        self.in_flight_full.load(Ordering::Relaxed)
    }
}

/// Per-message state of this interceptor.
pub(crate) struct SpanState {
    cx: Context,
    /// The span's start time (its end is this plus the message's elapsed
    /// monotonic time: see [`crate::clock`]).
    start: SystemTime,
    in_flight: Option<u64>,
    /// With [`MessagingSpans::legacy_shapes`], the `data.error.code` of an
    /// ERROR message: its `error.type` unless the operation itself fails (a
    /// span gets one `error.type`, at its end).
    error_code: Option<String>,
    /// With [`MessagingSpans::settle_spans`], what a settle span needs.
    settle: Option<Box<SettleTarget>>,
}

/// The destination and delivery tag of a delivery, for its settle span.
struct SettleTarget {
    name: Value,
    template: Option<Value>,
    temporary: bool,
    tag: u64,
}

/// The spans interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct MessagingSpans {
    inner: Arc<Inner>,
}

struct Inner {
    tracer: TracerSource,
    link_only: [bool; 6],
    payload_cap: Option<usize>,
    body_size: bool,
    server: Option<(Arc<str>, u16)>,
    /// The 0.1 shapes ([`MessagingSpans::legacy_shapes`]).
    legacy: bool,
    /// [`MessagingSpans::settle_spans`].
    settle_spans: bool,
    /// The CONSUMER span context of each COMMAND being handled.
    in_flight: InFlight<Context>,
    /// The process-wide cache ([`interned_names`]).
    names: &'static NameCache,
    /// Shared with the copies that configuring a shared instance makes, so
    /// the instance a user kept sees their spans.
    stats: Arc<SpanStats>,
}

impl Default for MessagingSpans {
    fn default() -> Self {
        MessagingSpans::new()
    }
}

impl fmt::Debug for MessagingSpans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessagingSpans")
            .field("link_only", &self.inner.link_only)
            .field("payload_cap", &self.inner.payload_cap)
            .field("body_size", &self.inner.body_size)
            .field("server", &self.inner.server)
            .field("stats", &self.inner.stats)
            .finish_non_exhaustive()
    }
}

impl MessagingSpans {
    /// Spans through the global tracer provider.
    pub fn new() -> Self {
        MessagingSpans {
            inner: Arc::new(Inner {
                tracer: TracerSource::Global,
                link_only: [false; 6],
                payload_cap: None,
                body_size: false,
                server: None,
                legacy: false,
                settle_spans: false,
                in_flight: InFlight::new(DEFAULT_MAX_IN_FLIGHT),
                names: name_cache(),
                stats: Arc::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => f(inner),
            None => {
                // Shared already: configure a fresh copy.
                let mut fresh = MessagingSpans::new();
                if let Some(inner) = Arc::get_mut(&mut fresh.inner) {
                    inner.tracer = self.inner.tracer.clone();
                    inner.stats = self.inner.stats.clone();
                    inner.link_only = self.inner.link_only;
                    inner.payload_cap = self.inner.payload_cap;
                    inner.body_size = self.inner.body_size;
                    inner.server = self.inner.server.clone();
                    inner.legacy = self.inner.legacy;
                    inner.settle_spans = self.inner.settle_spans;
                    inner.in_flight.max = self.inner.in_flight.max;
                    f(inner);
                }
                self = fresh;
            }
        }
        self
    }

    /// Spans through `provider` instead of the global one (e.g. one
    /// provider per agent, each with its own `service.name`).
    pub fn with_tracer_provider<P>(self, provider: &P) -> Self
    where
        P: TracerProvider,
        P::Tracer: Tracer + Send + Sync + 'static,
        <P::Tracer as Tracer>::Span: Send + Sync + 'static,
    {
        let tracer = BoxedTracer::new(Box::new(provider.tracer_with_scope(scope())));
        self.edit(|i| i.tracer = TracerSource::Fixed(Arc::new(tracer)))
    }

    /// CONSUMER spans of this kind start a new trace, linked to the
    /// producer, instead of being its child (e.g. for chatty EVENT fan-out).
    pub fn link_only(self, kind: MessageKind) -> Self {
        self.edit(|i| i.link_only[kind.index()] = true)
    }

    /// Records up to `max_bytes` of each payload as `mindbus.message.body`
    /// (lossy UTF-8). Off by default: payloads may hold private data.
    pub fn record_payload(self, max_bytes: usize) -> Self {
        self.edit(|i| i.payload_cap = Some(max_bytes))
    }

    /// Records `messaging.message.body.size` (payload bytes). Off by
    /// default, as the semantic conventions make it opt-in: every attribute
    /// past 17 moves a span's attribute vector into a slower allocation
    /// class (see BENCHMARKS.md, "Attributes per span").
    pub fn record_body_size(self, enabled: bool) -> Self {
        self.edit(|i| i.body_size = enabled)
    }

    /// The broker address for `server.address` / `server.port`.
    pub fn server(self, address: impl Into<String>, port: u16) -> Self {
        let address: Arc<str> = Arc::from(address.into());
        self.edit(|i| i.server = Some((address, port)))
    }

    /// The span shapes of mindbus-otel 0.1, for one release, for users whose
    /// queries or dashboards rely on them: the exchange (sent; the queue
    /// for the default exchange) or the exchange and queue (received) as
    /// `messaging.destination.name`, with the queue as
    /// `messaging.destination.subscription.name` and no template, and span
    /// names `publish {exchange}` / `process {queue}` (the conventions:
    /// `{exchange}:{routing key}[:{queue}]`, names from the template);
    /// server-named and reply queues in span names as `publish (temporary)`
    /// / `process (temporary)` (the conventions omit the destination:
    /// `publish`, `process`); a pull (`basic_get`) as one CONSUMER
    /// `receive` span from its return to settlement, and none for an empty
    /// pull (the conventions: a CLIENT `receive` over the call, then a
    /// `process` span); `error.type` = the `data.error.code` of a
    /// MindBus ERROR message sent or received successfully (the
    /// conventions keep `error.type` for a failed operation; the code is
    /// always in `mindbus.error.code`); and the agent as `mindbus.agent`
    /// (now `messaging.client.id`). Off by default; will be removed in 0.3.
    pub fn legacy_shapes(self, enabled: bool) -> Self {
        self.edit(|i| i.legacy = enabled)
    }

    /// A CLIENT `settle` span for each ack, nack or reject call this
    /// process makes for a delivery (`ack {destination}`, ...;
    /// `messaging.operation.type` `settle`), a child of the delivery's
    /// `process` span, as the conventions describe settlement. Off by
    /// default: the outcome is on the `process` span (`mindbus.settlement`),
    /// and the calls' durations are in
    /// `messaging_client_operation_duration_seconds` either way. Settlements
    /// made by a `multiple` ack of a later delivery or by tag on the
    /// channel get none of their own.
    pub fn settle_spans(self, enabled: bool) -> Self {
        self.edit(|i| i.settle_spans = enabled)
    }

    /// Bound of the in-flight COMMAND table used for RPC parenting in the
    /// stream style (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(self, max: usize) -> Self {
        self.edit(|i| i.in_flight.max = max)
    }

    /// Counters.
    pub fn stats(&self) -> &SpanStats {
        &self.inner.stats
    }

    /// COMMANDs currently tracked for RPC parenting.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.len()
    }

    /// Starts a span, still owned (so attributes are added without the
    /// lock a span in a `Context` takes per call).
    fn start(&self, builder: SpanBuilder, parent: &Context) -> BoxedSpan {
        self.inner.stats.started.fetch_add(1, Ordering::Relaxed);
        match &self.inner.tracer {
            TracerSource::Fixed(t) => t.build_with_context(builder, parent),
            TracerSource::Global => global::tracer_provider()
                .tracer_with_scope(scope())
                .build_with_context(builder, parent),
        }
    }

    fn end(&self, cx: &Context, at: SystemTime) {
        cx.span().end_with_timestamp(at);
        self.inner.stats.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// The attributes a span starts with, what samplers see: system,
    /// operation name and type, destination name and template, the message
    /// kind (when there is a message), the broker (`server.address` /
    /// `.port`) and this process's agent (`messaging.client.id`;
    /// `mindbus.agent` with the 0.1 shapes); in a vector of `capacity`.
    fn opening_attributes(
        &self,
        capacity: usize,
        (operation, operation_type): (&'static str, &'static str),
        (name, template): (Value, Option<Value>),
        kind: Option<MessageKind>,
        agent: Option<&Arc<str>>,
    ) -> Vec<KeyValue> {
        let mut attrs = Vec::with_capacity(capacity);
        attrs.extend([
            KeyValue::new(MESSAGING_SYSTEM, RABBITMQ),
            KeyValue::new(MESSAGING_OPERATION_NAME, operation),
            KeyValue::new(MESSAGING_OPERATION_TYPE, operation_type),
            KeyValue::new(MESSAGING_DESTINATION_NAME, name),
        ]);
        if let Some(kind) = kind {
            attrs.push(KeyValue::new(MINDBUS_MESSAGE_KIND, kind.as_str()));
        }
        if let Some(template) = template {
            attrs.push(KeyValue::new(MESSAGING_DESTINATION_TEMPLATE, template));
        }
        if let Some((host, port)) = &self.inner.server {
            attrs.push(KeyValue::new(SERVER_ADDRESS, Arc::clone(host)));
            attrs.push(KeyValue::new(SERVER_PORT, i64::from(*port)));
        }
        if let Some(agent) = agent {
            let key = if self.inner.legacy {
                MINDBUS_AGENT
            } else {
                MESSAGING_CLIENT_ID
            };
            attrs.push(KeyValue::new(key, Arc::clone(agent)));
        }
        attrs
    }

    /// The attributes both directions record about the message itself and
    /// its MindBus envelope (only for spans that record).
    #[allow(clippy::too_many_arguments)]
    fn message_attributes(
        &self,
        push: &mut dyn FnMut(KeyValue),
        temporary: bool,
        routing_key: &str,
        props: &lapin::BasicProperties,
        payload: &[u8],
        env: &EnvelopeRef<'_>,
    ) {
        if temporary {
            push(KeyValue::new(MESSAGING_DESTINATION_TEMPORARY, true));
            push(KeyValue::new(MESSAGING_DESTINATION_ANONYMOUS, true));
        }
        if !routing_key.is_empty() {
            // MindBus routing keys name a role, topic or target
            // (`cmd.writer.any`, `evt.task.completed`): a few, shared like
            // the other names. A reply to a server-named queue is the
            // exception, and gets its own copy.
            let value = if is_temporary_queue(routing_key) {
                Value::from(routing_key.to_owned())
            } else {
                self.inner.names.value(routing_key)
            };
            push(KeyValue::new(MESSAGING_RABBITMQ_ROUTING_KEY, value));
        }
        // MindBus gives a COMMAND the same id as AMQP message id, AMQP
        // correlation id and CloudEvents id: one shared copy for all three.
        let mut ids = SharedIds::default();
        if let Some(id) = props.message_id() {
            push(KeyValue::new(MESSAGING_MESSAGE_ID, ids.value(id.as_str())));
        }
        if let Some(c) = props.correlation_id() {
            push(KeyValue::new(
                MESSAGING_MESSAGE_CONVERSATION_ID,
                ids.value(c.as_str()),
            ));
        }
        if self.inner.body_size {
            push(KeyValue::new(
                MESSAGING_MESSAGE_BODY_SIZE,
                payload.len() as i64,
            ));
        }
        self.payload_attribute(push, payload);

        let names = &self.inner.names;
        for (k, v) in [
            (MINDBUS_ACTION, env.action()),
            (MINDBUS_ERROR_CODE, env.error_code()),
            (CLOUDEVENTS_EVENT_SOURCE, env.source()),
        ] {
            if let Some(v) = v {
                push(KeyValue::new(k, names.value(cap(v))));
            }
        }
        // MindBus's own types and spec version are static strings.
        if let Some(t) = env.event_type() {
            let known = MessageKind::from_event_type(t).and_then(MessageKind::event_type);
            push(KeyValue::new(
                CLOUDEVENTS_EVENT_TYPE,
                known.map_or_else(|| names.value(cap(t)), Value::from),
            ));
        }
        // Every MindBus message is CloudEvents 1.0 (the protocol requires
        // it): the version is recorded only when it says something.
        if let Some(v) = env.spec_version().filter(|v| *v != "1.0") {
            push(KeyValue::new(
                CLOUDEVENTS_EVENT_SPEC_VERSION,
                names.value(cap(v)),
            ));
        }
        if let Some(v) = env.id() {
            push(KeyValue::new(CLOUDEVENTS_EVENT_ID, ids.value(cap(v))));
        }
        if let Some(v) = env.subject() {
            push(KeyValue::new(CLOUDEVENTS_EVENT_SUBJECT, cap(v).to_owned()));
        }
    }

    fn payload_attribute(&self, push: &mut dyn FnMut(KeyValue), payload: &[u8]) {
        if let Some(cap) = self.inner.payload_cap {
            let shown = &payload[..payload.len().min(cap)];
            push(KeyValue::new(
                MINDBUS_MESSAGE_BODY,
                String::from_utf8_lossy(shown).into_owned(),
            ));
        }
    }

    /// How many attributes a recording span of this message ends with:
    /// the creation ones, `extra` (the direction's own, including those
    /// added at its end) and what [`Self::message_attributes`] pushes. The
    /// vector is allocated at that size once: not growing it saves a copy,
    /// and the size class matters (see `ATTRIBUTES_CAPACITY`).
    fn attribute_count(
        &self,
        extra: usize,
        agent: bool,
        temporary: bool,
        routing_key: &str,
        props: &lapin::BasicProperties,
        env: &EnvelopeRef<'_>,
    ) -> usize {
        let inner = &self.inner;
        let flag = usize::from;
        let body = [
            env.action(),
            env.error_code(),
            env.source(),
            env.event_type(),
            env.id(),
            env.subject(),
        ];
        CREATION_ATTRIBUTES
            + extra
            + 2 * flag(inner.server.is_some())
            + flag(agent)
            + 2 * flag(temporary)
            + flag(!routing_key.is_empty())
            + flag(props.message_id().is_some())
            + flag(props.correlation_id().is_some())
            + flag(inner.body_size)
            + flag(inner.payload_cap.is_some())
            + body.iter().filter(|v| v.is_some()).count()
            + flag(env.spec_version().is_some_and(|v| v != "1.0"))
    }

    /// The RPC parent of a reply published outside any span.
    fn rpc_parent(&self, routing_key: &str, correlation_id: &str) -> Option<Context> {
        let table = &self.inner.in_flight;
        table.get(table.key(routing_key, correlation_id))
    }

    fn track_command(&self, reply_to: &str, correlation_id: &str, cx: &Context) -> Option<u64> {
        let table = &self.inner.in_flight;
        let tracked = table.insert(table.key(reply_to, correlation_id), cx.clone());
        if tracked.is_none() {
            self.inner
                .stats
                .in_flight_full
                .fetch_add(1, Ordering::Relaxed);
        }
        tracked
    }

    fn untrack(&self, key: u64) {
        self.inner.in_flight.remove(key);
    }
}

/// Longest attribute value taken from a message body: producers are not
/// trusted to keep ids and names short.
pub const MAX_BODY_ATTRIBUTE_LEN: usize = 256;

/// Attributes every span gets at creation (what samplers see).
const CREATION_ATTRIBUTES: usize = 5;

/// Most attributes whose vector (56 bytes each) stays under 1 KiB, glibc's
/// small-bin limit. A span's attribute vector is allocated on the
/// messaging thread and freed on the span processor's; past this size
/// every allocation takes glibc's large-bin path (with a consolidation of
/// the fast bins the other thread's frees filled), which measured 0.8 µs
/// per span (BENCHMARKS.md, "Attributes per span"). Default spans of
/// COMMAND, RESULT, EVENT and CONTROL messages stay within it (`server`
/// adds two attributes; ERROR messages, rare, carry one more).
/// (Checked by the tests; the code sizes each vector exactly.)
#[cfg(test)]
const ATTRIBUTES_CAPACITY: usize = 17;

/// A span builder that keeps the capacity of `attributes` (the builder's
/// `with_attributes` would collect them into a new, exactly-sized vector),
/// starting at `start` (so the SDK does not read the clock again).
fn builder(
    name: Cow<'static, str>,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
    start: SystemTime,
) -> SpanBuilder {
    let mut builder = SpanBuilder::from_name(name)
        .with_kind(kind)
        .with_start_time(start);
    builder.attributes = Some(attributes);
    builder
}

/// Attribute values for a message's ids, sharing one reference-counted
/// copy between equal ids.
#[derive(Default)]
struct SharedIds {
    last: Option<Arc<str>>,
}

impl SharedIds {
    fn value(&mut self, id: &str) -> Value {
        match &self.last {
            Some(last) if **last == *id => Value::from(Arc::clone(last)),
            _ => {
                let shared: Arc<str> = Arc::from(id);
                self.last = Some(Arc::clone(&shared));
                Value::from(shared)
            }
        }
    }
}

fn flag(b: bool) -> usize {
    usize::from(b)
}

/// The attributes a PRODUCER span gets besides the message's: the RPC
/// parent marker, and at its end `mindbus.publish.confirm` (and, with the
/// 0.1 shapes, `error.type` for an ERROR message).
fn publish_extra(rpc: bool, kind: MessageKind, legacy: bool) -> usize {
    flag(rpc) + 1 + flag(legacy && kind == MessageKind::Error)
}

/// The attributes a CONSUMER span gets besides the message's: the
/// delivery tag, and at its end `mindbus.settlement` (and, with the 0.1
/// shapes, the queue as subscription and `error.type` for an ERROR
/// message).
fn delivery_extra(kind: MessageKind, legacy: bool) -> usize {
    2 + flag(legacy) + flag(legacy && kind == MessageKind::Error)
}

/// `value` cut to [`MAX_BODY_ATTRIBUTE_LEN`] bytes at a character boundary.
fn cap(value: &str) -> &str {
    crate::labels::truncate_at(value, MAX_BODY_ATTRIBUTE_LEN)
}

/// `to`, with the baggage of `from` (baggage travels with the message even
/// when the span parent comes from elsewhere).
fn with_baggage_of(from: &Context, to: Context) -> Context {
    let baggage = from.baggage();
    if baggage.is_empty() {
        return to;
    }
    to.with_baggage(
        baggage
            .iter()
            .map(|(k, (v, m))| KeyValueMetadata::new(k.clone(), v.clone(), m.clone())),
    )
}

/// The three span-producing operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Publish,
    Process,
    Receive,
}

impl Op {
    const fn as_str(self) -> &'static str {
        match self {
            Op::Publish => "publish",
            Op::Process => "process",
            Op::Receive => "receive",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }

    /// The 0.1 name for a temporary destination
    /// ([`MessagingSpans::legacy_shapes`]).
    const fn legacy_temporary_name(self) -> &'static str {
        match self {
            Op::Publish => "publish (temporary)",
            Op::Process => "process (temporary)",
            Op::Receive => "receive (temporary)",
        }
    }

    const fn default_name(self) -> &'static str {
        match self {
            Op::Publish => "publish (default)",
            Op::Process => "process (default)",
            Op::Receive => "receive (default)",
        }
    }
}

/// What a span records about its destination.
struct Dest {
    /// `{operation} {template}`, or the operation alone.
    span_name: Cow<'static, str>,
    /// `messaging.destination.name`.
    name: Value,
    /// `messaging.destination.template`, if there is one.
    template: Option<Value>,
    /// A server-named or direct reply-to queue.
    temporary: bool,
}

/// A cached span name and template.
struct Named {
    span: &'static str,
    template: Option<&'static str>,
}

/// Span names and attribute values, built once per distinct value.
///
/// Destination names ([`crate::destination`]) are cached with their span
/// name and template, except those holding a server-named queue (each one
/// new, and short-lived): their templates and span names are cached as
/// values. Other cached values (exchanges, routing keys, actions, sources)
/// are few. Each is leaked once as a `&'static str` and reused. A static
/// value costs a span nothing to hold and nothing to drop, where a shared
/// `Arc<str>` would be incremented here and decremented on the span
/// processor's thread, bouncing its cache line between the two. Past
/// [`MAX_CACHED_NAMES`] entries (all kinds together, at most 256 bytes of
/// value each: a misuse) values are built per span instead of growing the
/// cache.
///
/// Lookups of cached entries take no lock (see `ReadMostly`): each map's
/// table has [`NAME_SLOTS`] slots, of which half are filled before entries
/// spill into its locked overflow map.
struct NameCache {
    /// Per operation, by destination name.
    names: [ReadMostly<&'static str, Named>; 3],
    /// Per operation, by the 0.1 destination
    /// ([`MessagingSpans::legacy_shapes`]): the span name.
    legacy: [ReadMostly<&'static str, &'static str>; 3],
    values: ReadMostly<&'static str, ()>,
    cached: AtomicUsize,
}

/// The process-wide span-name cache. Every [`MessagingSpans`] shares it:
/// a chain is built per channel, so per reconnect, and what the cache
/// interns is never freed, so one cache per instance would leak again with
/// each new chain. Shared, the whole process interns at most
/// [`MAX_CACHED_NAMES`] strings.
fn name_cache() -> &'static NameCache {
    static CACHE: OnceLock<NameCache> = OnceLock::new();
    CACHE.get_or_init(NameCache::new)
}

/// How many strings (span names and attribute values) the process-wide
/// span-name cache holds: at most [`MAX_CACHED_NAMES`], however many
/// channels and chains the process builds.
pub fn interned_names() -> usize {
    name_cache().cached.load(Ordering::Relaxed)
}

fn leak(s: &str) -> &'static str {
    Box::leak(Box::from(s))
}

/// Bound of the span-name cache (all operations together).
pub const MAX_CACHED_NAMES: usize = 1024;

/// Table slots of each of the span-name cache's maps (48 bytes a slot for
/// names, 32 for values on 64-bit targets; each is allocated at its first
/// entry).
pub const NAME_SLOTS: usize = 256;

impl NameCache {
    fn new() -> Self {
        NameCache {
            names: std::array::from_fn(|_| ReadMostly::with_slots(NAME_SLOTS)),
            legacy: std::array::from_fn(|_| ReadMostly::with_slots(NAME_SLOTS)),
            values: ReadMostly::with_slots(NAME_SLOTS),
            cached: AtomicUsize::new(0),
        }
    }

    /// The span name, destination name and template for `op` on
    /// `destination`, as the conventions give them.
    #[inline]
    fn get(&self, op: Op, destination: Destination<'_>) -> Dest {
        let temporary = destination.is_temporary();
        with_scratch(|name| {
            destination.write_name(name);
            if !temporary && let Some((name, named)) = self.names[op.index()].get(name.as_str()) {
                return Dest {
                    span_name: Cow::Borrowed(named.span),
                    name: Value::from(*name),
                    template: named.template.map(Value::from),
                    temporary,
                };
            }
            self.get_slow(op, destination, name, temporary)
        })
    }

    /// [`Self::get`] past a miss in the lock-free table, or for a
    /// temporary destination.
    #[cold]
    #[inline(never)]
    fn get_slow(&self, op: Op, destination: Destination<'_>, name: &str, temporary: bool) -> Dest {
        let mut template = String::new();
        let has_template = destination.write_template(&mut template);
        let span_name = if has_template {
            format!("{} {template}", op.as_str())
        } else {
            op.as_str().to_owned()
        };
        if temporary {
            // The name holds a generated queue name: built per span. The
            // template and span name leave it out, and are shared.
            return Dest {
                span_name: self
                    .interned(&span_name)
                    .map_or(Cow::Owned(span_name), Cow::Borrowed),
                name: Value::from(name.to_owned()),
                template: has_template.then(|| self.value(&template)),
                temporary,
            };
        }
        let map = &self.names[op.index()];
        let cached = |name: &&'static str, named: &Named| Dest {
            span_name: Cow::Borrowed(named.span),
            name: Value::from(*name),
            template: named.template.map(Value::from),
            temporary,
        };
        if let Some(hit) = map.get_spilled(name, cached) {
            return hit;
        }
        if self.cached.load(Ordering::Relaxed) >= MAX_CACHED_NAMES {
            return Dest {
                span_name: Cow::Owned(span_name),
                name: Value::from(name.to_owned()),
                template: has_template.then(|| Value::from(template)),
                temporary,
            };
        }
        let make = || {
            self.cached.fetch_add(1, Ordering::Relaxed);
            let named = Named {
                span: leak(&span_name),
                template: has_template.then(|| leak(&template)),
            };
            Ok::<_, Infallible>((leak(name), named))
        };
        match map.get_or_insert_with(name, make, cached) {
            Ok(hit) => hit,
            Err(never) => match never {},
        }
    }

    /// The 0.1 shapes ([`MessagingSpans::legacy_shapes`]): the span name
    /// `{operation} {destination}` for the exchange or queue `destination`,
    /// the destination as the attribute value, and no template.
    fn legacy(&self, op: Op, destination: &str) -> Dest {
        let dest = |span_name, name, temporary| Dest {
            span_name,
            name,
            template: None,
            temporary,
        };
        if is_temporary_queue(destination) {
            return dest(
                Cow::Borrowed(op.legacy_temporary_name()),
                Value::from(destination.to_owned()),
                true,
            );
        }
        if destination.is_empty() {
            return dest(Cow::Borrowed(op.default_name()), Value::from(""), false);
        }
        let map = &self.legacy[op.index()];
        let cached = |value: &&'static str, name: &&'static str| {
            dest(Cow::Borrowed(*name), Value::from(*value), false)
        };
        if let Some((value, name)) = map.get(destination) {
            return cached(value, name);
        }
        if let Some(hit) = map.get_spilled(destination, cached) {
            return hit;
        }
        let name = format!("{} {destination}", op.as_str());
        if self.cached.load(Ordering::Relaxed) >= MAX_CACHED_NAMES {
            return dest(Cow::Owned(name), Value::from(destination.to_owned()), false);
        }
        let make = || {
            self.cached.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Infallible>((leak(destination), &*Box::leak(name.into_boxed_str())))
        };
        match map.get_or_insert_with(destination, make, cached) {
            Ok(hit) => hit,
            Err(never) => match never {},
        }
    }

    /// `s` as a static attribute value (exchanges, routing keys, actions,
    /// sources).
    #[inline]
    fn value(&self, s: &str) -> Value {
        match self.values.get(s) {
            Some((v, ())) => Value::from(*v),
            None => self
                .interned(s)
                .map_or_else(|| Value::from(s.to_owned()), Value::from),
        }
    }

    /// `s` interned, unless the cache is full.
    #[cold]
    #[inline(never)]
    fn interned(&self, s: &str) -> Option<&'static str> {
        let cached = |v: &&'static str, (): &()| *v;
        if let Some((v, ())) = self.values.get(s) {
            return Some(*v);
        }
        if let Some(hit) = self.values.get_spilled(s, cached) {
            return Some(hit);
        }
        if self.cached.load(Ordering::Relaxed) >= MAX_CACHED_NAMES {
            return None;
        }
        let make = || {
            self.cached.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Infallible>((leak(s), ()))
        };
        match self.values.get_or_insert_with(s, make, cached) {
            Ok(hit) => Some(hit),
            Err(never) => match never {},
        }
    }
}

impl MessagingSpans {
    /// The CLIENT span of a settle call begun at `call` (see
    /// [`MessagingSpans::settle_spans`]), a child of `parent`.
    fn settle_span(
        &self,
        parent: &Context,
        target: &SettleTarget,
        operation: &'static str,
        settlement: &Settlement<'_>,
        state: &MessageState,
        call: Instant,
    ) {
        let names = &self.inner.names;
        let span_name: Cow<'static, str> = match &target.template {
            Some(template) => with_scratch(|name| {
                name.push_str(operation);
                name.push(' ');
                name.push_str(&template.as_str());
                names
                    .interned(name)
                    .map_or_else(|| Cow::Owned(name.clone()), Cow::Borrowed)
            }),
            None => Cow::Borrowed(operation),
        };
        let mut attrs = self.opening_attributes(
            12,
            (operation, "settle"),
            (target.name.clone(), target.template.clone()),
            None,
            state.agent_shared(),
        );
        if target.temporary {
            attrs.push(KeyValue::new(MESSAGING_DESTINATION_TEMPORARY, true));
            attrs.push(KeyValue::new(MESSAGING_DESTINATION_ANONYMOUS, true));
        }
        attrs.push(KeyValue::new(
            MESSAGING_RABBITMQ_DELIVERY_TAG,
            target.tag as i64,
        ));
        let start = clock::system_time(call);
        let mut span = self.start(builder(span_name, SpanKind::Client, attrs, start), parent);
        if let Some(e) = settlement.error {
            span.set_attribute(KeyValue::new(ERROR_TYPE, lapin_error_type(e)));
            span.set_status(Status::error(e.to_string()));
        } else if !settlement.applied {
            span.set_attribute(KeyValue::new(ERROR_TYPE, "not_applied"));
            span.set_status(Status::error("settlement not sent: the channel was closed"));
        }
        span.end_with_timestamp(start + state.ended().saturating_duration_since(call));
        self.inner.stats.ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts the span of operation `op` on a delivery, a child of
    /// `parent`, linked to the producer (the link marked `child_of` when
    /// the producer is `parent`'s span too); for the CONSUMER span, with
    /// [`MessagingSpans::settle_spans`], what its settle span needs.
    fn delivery_span(
        &self,
        msg: &mut IncomingMessage<'_>,
        op: Op,
        kind: SpanKind,
        parent: &Context,
        (producer, producer_parents): (SpanContext, bool),
        start: SystemTime,
    ) -> (BoxedSpan, Option<Box<SettleTarget>>) {
        let delivery = msg.delivery();
        let queue = msg.queue();
        let exchange = delivery.exchange.as_str();
        let routing_key = delivery.routing_key.as_str();
        let legacy = self.inner.legacy;
        let dest = if legacy {
            // 0.1: span names by queue; the destination is the exchange
            // (the queue for the default exchange), the queue the
            // subscription.
            let mut dest = self.inner.names.legacy(op, queue);
            if !exchange.is_empty() {
                dest.name = self.inner.names.value(exchange);
            }
            dest
        } else {
            self.inner
                .names
                .get(op, Destination::receive(exchange, routing_key, queue))
        };
        let temporary = dest.temporary;
        let settle = (self.inner.settle_spans && kind == SpanKind::Consumer).then(|| {
            // Settle spans have the conventions' names, also with the 0.1
            // shapes.
            let (name, template) = if legacy {
                let d = self.inner.names.get(
                    Op::Process,
                    Destination::receive(exchange, routing_key, queue),
                );
                (d.name, d.template)
            } else {
                (dest.name.clone(), dest.template.clone())
            };
            Box::new(SettleTarget {
                name,
                template,
                temporary,
                tag: delivery.delivery_tag,
            })
        });
        let props = &delivery.properties;
        let message_kind = msg.envelope().kind();
        let extra = delivery_extra(message_kind, legacy) + flag(dest.template.is_some());
        let agent = msg.state().agent_shared().is_some();
        let capacity =
            self.attribute_count(extra, agent, temporary, routing_key, props, &msg.envelope());
        let attrs = self.opening_attributes(
            capacity,
            (op.as_str(), op.as_str()),
            (dest.name, dest.template),
            Some(message_kind),
            msg.state().agent_shared(),
        );
        let mut builder = builder(dest.span_name, kind, attrs, start);
        if producer.is_valid() {
            // The conventions' link to the creation context. When the
            // producer is the parent too, the link says so: backends of the
            // OpenTracing model (Jaeger) turn a parent that is also linked
            // into the link's reference type, FOLLOWS_FROM by default, and
            // leave FOLLOWS_FROM spans off the critical path.
            let attributes = if producer_parents {
                vec![KeyValue::new(OPENTRACING_REF_TYPE, CHILD_OF)]
            } else {
                Vec::new()
            };
            builder = builder.with_links(vec![Link::new(producer, attributes, 0)]);
        }
        let mut span = self.start(builder, parent);
        if span.is_recording() {
            let push = &mut |kv| span.set_attribute(kv);
            if legacy {
                let queue = if temporary {
                    Value::from(queue.to_owned())
                } else {
                    self.inner.names.value(queue)
                };
                push(KeyValue::new(
                    MESSAGING_DESTINATION_SUBSCRIPTION_NAME,
                    queue,
                ));
            }
            push(KeyValue::new(
                MESSAGING_RABBITMQ_DELIVERY_TAG,
                delivery.delivery_tag as i64,
            ));
            self.message_attributes(
                push,
                temporary,
                routing_key,
                props,
                &delivery.data,
                &msg.envelope(),
            );
            if message_kind == MessageKind::Error {
                span.set_status(Status::error("ai.team.error"));
            }
        }
        (span, settle)
    }
}

/// The `error.type` of a lapin error.
pub fn lapin_error_type(error: &lapin::Error) -> String {
    use lapin::ErrorKind as K;
    match error.kind() {
        K::ProtocolError(e) => format!("amqp_{}", e.get_id()),
        K::InvalidChannelState(..) | K::InvalidChannel(_) => "channel_closed".to_owned(),
        K::InvalidConnectionState(_) => "connection_closed".to_owned(),
        K::IOError(_) => "io_error".to_owned(),
        K::MissingHeartbeatError => "missing_heartbeat".to_owned(),
        _ => "lapin_error".to_owned(),
    }
}

fn set_error(
    cx: &Context,
    error_type: impl Into<String>,
    description: impl Into<Cow<'static, str>>,
) {
    let span = cx.span();
    span.set_attribute(KeyValue::new(ERROR_TYPE, error_type.into()));
    span.set_status(Status::error(description));
}

impl Interceptor for MessagingSpans {
    fn builtin_slot(&self) -> Option<&'static str> {
        Some("MessagingSpans")
    }

    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        let exchange = msg.exchange();
        let routing_key = msg.routing_key();
        let dest = if self.inner.legacy {
            // 0.1: the exchange; for the default exchange the queue named
            // by the routing key.
            let destination = if exchange.is_empty() {
                routing_key
            } else {
                exchange
            };
            self.inner.names.legacy(Op::Publish, destination)
        } else {
            self.inner
                .names
                .get(Op::Publish, Destination::send(exchange, routing_key))
        };
        let temporary = dest.temporary;
        let env = msg.envelope();
        let kind = env.kind();
        let props = msg.properties();
        let correlation_id = props.correlation_id().as_ref().map(|c| c.as_str());

        // Parent: the caller's span, else the COMMAND being answered.
        let mut parent = msg.state().context().clone();
        let mut rpc = false;
        if !parent.span().span_context().is_valid()
            && matches!(kind, MessageKind::Result | MessageKind::Error)
            && let Some(c) = correlation_id
            && let Some(cx) = self.rpc_parent(routing_key, c)
        {
            self.inner
                .stats
                .rpc_parented
                .fetch_add(1, Ordering::Relaxed);
            rpc = true;
            // Keep the caller's baggage, take the COMMAND's span.
            parent = with_baggage_of(&parent, cx);
        }

        // What samplers may look at is given at creation; the details only
        // when the span records (nothing is computed for unsampled spans).
        let extra = publish_extra(rpc, kind, self.inner.legacy) + flag(dest.template.is_some());
        let agent = msg.state().agent_shared().is_some();
        let capacity =
            self.attribute_count(extra, agent, temporary, routing_key, props, &msg.envelope());
        let attrs = self.opening_attributes(
            capacity,
            ("publish", "send"),
            (dest.name, dest.template),
            Some(kind),
            msg.state().agent_shared(),
        );
        let error_code = (self.inner.legacy && kind == MessageKind::Error)
            .then(|| cap(msg.envelope().error_code().unwrap_or("error")).to_owned());
        let start = clock::system_time(msg.state().started());
        let mut span = self.start(
            builder(dest.span_name, SpanKind::Producer, attrs, start),
            &parent,
        );
        if span.is_recording() {
            let push = &mut |kv| span.set_attribute(kv);
            if rpc {
                push(KeyValue::new(MINDBUS_RPC_PARENT, "in_flight"));
            }
            let (payload, props) = (msg.payload(), msg.properties());
            self.message_attributes(
                push,
                temporary,
                routing_key,
                props,
                payload,
                &msg.envelope(),
            );
            if kind == MessageKind::Error {
                span.set_status(Status::error("ai.team.error"));
            }
        }
        let cx = parent.with_span(span);
        msg.state_mut().set_context(cx.clone());
        msg.state_mut().builtin.spans = Some(SpanState {
            cx,
            start,
            in_flight: None,
            error_code,
            settle: None,
        });
    }

    fn on_publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        let Some(SpanState {
            cx,
            start,
            error_code,
            ..
        }) = state.builtin.spans.take()
        else {
            return;
        };
        let span = cx.span();
        let failed = matches!(
            result,
            PublishResult::Failed(_)
                | PublishResult::Confirmed(Confirmation::Nack(_))
                | PublishResult::Confirmed(Confirmation::Ack(Some(_)))
        );
        match result {
            PublishResult::Sent => {
                span.set_attribute(KeyValue::new(MINDBUS_PUBLISH_CONFIRM, "not_requested"));
            }
            PublishResult::Confirmed(Confirmation::Ack(returned)) => {
                span.set_attribute(KeyValue::new(MINDBUS_PUBLISH_CONFIRM, "ack"));
                if returned.is_some() {
                    set_error(&cx, "unroutable", "returned by the broker as unroutable");
                }
            }
            PublishResult::Confirmed(Confirmation::Nack(_)) => {
                span.set_attribute(KeyValue::new(MINDBUS_PUBLISH_CONFIRM, "nack"));
                set_error(&cx, "nack", "nacked by the broker");
            }
            PublishResult::Confirmed(Confirmation::NotRequested) => {
                span.set_attribute(KeyValue::new(MINDBUS_PUBLISH_CONFIRM, "not_requested"));
            }
            PublishResult::Failed(error) => {
                set_error(&cx, lapin_error_type(error), error.to_string());
            }
            PublishResult::Abandoned => {
                span.set_attribute(KeyValue::new(MINDBUS_PUBLISH_CONFIRM, "abandoned"));
            }
        }
        // One `error.type` per span: the publish's failure, else the code
        // of the ERROR message it carries.
        if !failed && let Some(code) = error_code {
            span.set_attribute(KeyValue::new(ERROR_TYPE, code));
        }
        self.end(&cx, start + state.elapsed());
    }

    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        let pull = msg.state().pull_started();
        let legacy = self.inner.legacy;
        let props = &msg.delivery().properties;
        let kind = msg.envelope().kind();

        // The producer's context, as extracted by the propagation
        // interceptor (or empty).
        let remote = msg.state().context().clone();
        let producer: SpanContext = remote.span().span_context().clone();
        // The caller's span matters only for a pull (`basic_get`).
        let ambient = pull
            .is_some()
            .then(Context::current)
            .filter(|cx| cx.span().span_context().is_valid());
        // Whether the producer is the parent as well as the link.
        let producer_parents = ambient.is_none() && !self.inner.link_only[kind.index()];
        let parent = if let Some(ambient) = ambient {
            with_baggage_of(&remote, ambient)
        } else if !producer_parents {
            with_baggage_of(&remote, Context::new())
        } else {
            remote
        };
        let start = clock::system_time(msg.state().started());
        let (parent, op, producer_parents) = match pull {
            // The conventions' pull: a CLIENT `receive` span over the
            // `basic_get` call, and the processing in a CONSUMER `process`
            // span, its child, linked to the producer too.
            Some(call) if !legacy => {
                let began = clock::system_time(call);
                let (mut receive, _) = self.delivery_span(
                    msg,
                    Op::Receive,
                    SpanKind::Client,
                    &parent,
                    (producer.clone(), producer_parents),
                    began,
                );
                receive.end_with_timestamp(
                    began + msg.state().started().saturating_duration_since(call),
                );
                self.inner.stats.ended.fetch_add(1, Ordering::Relaxed);
                (parent.with_span(receive), Op::Process, false)
            }
            // 0.1: one CONSUMER `receive` span from the pull to settlement.
            Some(_) => (parent, Op::Receive, producer_parents),
            None => (parent, Op::Process, producer_parents),
        };
        let error_code = (legacy && kind == MessageKind::Error)
            .then(|| cap(msg.envelope().error_code().unwrap_or("error")).to_owned());
        let (span, settle) = self.delivery_span(
            msg,
            op,
            SpanKind::Consumer,
            &parent,
            (producer, producer_parents),
            start,
        );
        let cx = parent.with_span(span);
        // Track COMMANDs awaiting a reply, for stream-style RPC parenting.
        let in_flight = awaited_reply(kind, props, msg.envelope().id())
            .and_then(|(reply_to, corr)| self.track_command(reply_to, corr, &cx));
        msg.state_mut().set_context(cx.clone());
        msg.state_mut().builtin.spans = Some(SpanState {
            cx,
            start,
            in_flight,
            error_code,
            settle,
        });
    }

    fn on_empty_pull(&self, pull: &EmptyPull<'_>) {
        // 0.1 had no span for a pull that fetched nothing.
        if self.inner.legacy {
            return;
        }
        let dest = self
            .inner
            .names
            .get(Op::Receive, Destination::receive("", "", pull.queue));
        let receive = Op::Receive.as_str();
        let mut attrs = self.opening_attributes(
            12,
            (receive, receive),
            (dest.name, dest.template),
            None,
            pull.agent,
        );
        if dest.temporary {
            attrs.push(KeyValue::new(MESSAGING_DESTINATION_TEMPORARY, true));
            attrs.push(KeyValue::new(MESSAGING_DESTINATION_ANONYMOUS, true));
        }
        if pull.error.is_none() {
            attrs.push(KeyValue::new(MESSAGING_BATCH_MESSAGE_COUNT, 0_i64));
        }
        let start = clock::system_time(pull.started);
        let builder = builder(dest.span_name, SpanKind::Client, attrs, start);
        let mut span = self.start(builder, &Context::current());
        if let Some(e) = pull.error {
            span.set_attribute(KeyValue::new(ERROR_TYPE, lapin_error_type(e)));
            span.set_status(Status::error(e.to_string()));
        }
        span.end_with_timestamp(start + pull.ended.saturating_duration_since(pull.started));
        self.inner.stats.ended.fetch_add(1, Ordering::Relaxed);
    }

    fn on_settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        if state.direction() != Direction::Received {
            return;
        }
        let Some(SpanState {
            cx,
            start,
            in_flight,
            error_code,
            settle,
        }) = state.builtin.spans.take()
        else {
            return;
        };
        if let Some(key) = in_flight {
            self.untrack(key);
        }
        if let (Some(target), Some(operation), Some(call)) =
            (settle, settlement.operation(), settlement.call_started)
        {
            self.settle_span(&cx, &target, operation, settlement, state, call);
        }
        let span = cx.span();
        span.set_attribute(KeyValue::new(
            MINDBUS_SETTLEMENT,
            settlement.outcome.as_str(),
        ));
        if let Some(failure) = settlement.failure {
            let (kind, text) = match failure {
                HandlerFailure::Error(text) => ("handler_error", text),
                HandlerFailure::Panic(text) => ("panic", text),
            };
            span.add_event(
                EXCEPTION_EVENT,
                vec![
                    KeyValue::new(EXCEPTION_TYPE, kind),
                    KeyValue::new(EXCEPTION_MESSAGE, text.to_owned()),
                ],
            );
        }
        if let Outcome::Nacked { requeue } | Outcome::Rejected { requeue } = settlement.outcome {
            span.set_attribute(KeyValue::new(MINDBUS_SETTLEMENT_REQUEUE, requeue));
        }
        // One `error.type` per span (the SDK appends attributes, it does not
        // replace them): the settlement's own failure first, then a
        // settlement lapin did not send, then the handler's failure, then
        // the outcome, then the code of the ERROR message received.
        let explicit = matches!(
            settlement.outcome,
            Outcome::Acked | Outcome::Nacked { .. } | Outcome::Rejected { .. }
        );
        let error: Option<(String, Cow<'static, str>)> = if let Some(e) = settlement.error {
            Some((lapin_error_type(e), e.to_string().into()))
        } else if !settlement.applied && explicit {
            Some((
                "not_applied".to_owned(),
                "settlement not sent: the channel was closed".into(),
            ))
        } else if let Some(failure) = settlement.failure {
            Some(match failure {
                HandlerFailure::Error(text) => ("handler_error".to_owned(), text.to_owned().into()),
                HandlerFailure::Panic(text) => ("panic".to_owned(), text.to_owned().into()),
            })
        } else {
            match settlement.outcome {
                Outcome::Nacked { .. } => Some(("nack".to_owned(), "nacked".into())),
                Outcome::Rejected { .. } => Some(("reject".to_owned(), "rejected".into())),
                Outcome::Unsettled => Some(("unsettled".to_owned(), "dropped unsettled".into())),
                _ => None,
            }
        };
        match (error, error_code) {
            (Some((error_type, description)), _) => set_error(&cx, error_type, description),
            (None, Some(code)) => span.set_attribute(KeyValue::new(ERROR_TYPE, code)),
            (None, None) => {}
        }
        self.end(&cx, start + state.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_values_are_capped_on_a_char_boundary() {
        assert_eq!(cap("short"), "short");
        let long = "é".repeat(300);
        let c = cap(&long);
        assert!(c.len() <= MAX_BODY_ATTRIBUTE_LEN && c.len() >= MAX_BODY_ATTRIBUTE_LEN - 1);
        assert!(long.starts_with(c));
    }

    #[test]
    fn names_are_low_cardinality_and_bounded() {
        let names = NameCache::new();
        let reply = names.get(
            Op::Process,
            Destination::receive("", "amq.gen-abc1", "amq.gen-abc1"),
        );
        assert_eq!(
            (reply.span_name.as_ref(), reply.temporary),
            ("process", true)
        );
        assert!(reply.template.is_none());
        let fan_out = Destination::receive("mindbus.main", "evt.task.completed", "amq.gen-abc2");
        let d = names.get(Op::Process, fan_out);
        assert_eq!(d.span_name.as_ref(), "process mindbus.main:evt.task.*");
        assert_eq!(
            d.name.as_str(),
            "mindbus.main:evt.task.completed:amq.gen-abc2"
        );
        let d = names.get(Op::Publish, Destination::send("", ""));
        assert_eq!(d.span_name.as_ref(), "publish amq.default");
        let command = Destination::send("mindbus.main", "cmd.writer.any");
        let (a, b) = (
            names.get(Op::Publish, command),
            names.get(Op::Publish, command),
        );
        assert_eq!(a.span_name.as_ref(), "publish mindbus.main:cmd.writer.*");
        assert_eq!(a.name.as_str(), "mindbus.main:cmd.writer.any");
        assert!(
            matches!((&a.span_name, &b.span_name), (Cow::Borrowed(x), Cow::Borrowed(y)) if std::ptr::eq(*x, *y))
        );
        let interned = names.cached.load(Ordering::Relaxed);
        for i in 0..3 {
            let q = format!("amq.gen-{i}");
            let _ = names.get(Op::Process, Destination::receive("", &q, &q));
        }
        assert_eq!(
            names.cached.load(Ordering::Relaxed),
            interned,
            "generated queue names are not interned"
        );
        for i in 0..(MAX_CACHED_NAMES + 10) {
            let q = format!("q{i}");
            let _ = names.get(Op::Process, Destination::receive("", &q, &q));
        }
        assert!(names.cached.load(Ordering::Relaxed) <= MAX_CACHED_NAMES);
        let d = names.get(
            Op::Process,
            Destination::receive("", "one-more", "one-more"),
        );
        assert_eq!(d.span_name.as_ref(), "process one-more");

        let legacy = NameCache::new();
        assert_eq!(
            legacy.legacy(Op::Publish, "").span_name.as_ref(),
            "publish (default)"
        );
        let d = legacy.legacy(Op::Process, "amq.gen-abc1");
        assert_eq!(
            (d.span_name.as_ref(), d.temporary),
            ("process (temporary)", true)
        );
        let d = legacy.legacy(Op::Publish, "mindbus.main");
        assert_eq!(
            (d.span_name.as_ref(), d.name.as_str().as_ref()),
            ("publish mindbus.main", "mindbus.main")
        );
    }
}

#[cfg(test)]
pub(crate) mod attribute_tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::interceptor::InterceptorChain;
    use crate::message::{Outcome, PublishResult, Settlement};
    use crate::test_fixtures::{Fixture, NAMES, fixture};
    use lapin::message::Delivery;
    use lapin::options::BasicPublishOptions;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use std::sync::Mutex;

    #[derive(Debug, Clone, Default)]
    pub(crate) struct Collect(pub(crate) Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut spans) = self.0.lock() {
                spans.extend(batch);
            }
            Ok(())
        }
    }

    /// A provider exporting every span, as it ends, into the returned
    /// collector.
    pub(crate) fn collecting() -> (SdkTracerProvider, Collect) {
        let collect = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collect.clone())
            .build();
        (provider, collect)
    }

    /// Runs the publish hooks for fixture `f`.
    fn publish(chain: &InterceptorChain, f: &Fixture) -> MessageState {
        let (_, state) = chain.start_publish(
            &f.exchange,
            &f.routing_key,
            BasicPublishOptions::default(),
            &f.body,
            f.properties.clone(),
        );
        state
    }

    /// Runs the delivery hooks for fixture `f` from `queue`, acked.
    fn deliver_acked(chain: &InterceptorChain, f: &Fixture, queue: &str) {
        let mut delivery = Delivery::mock(
            7,
            f.exchange.as_str().into(),
            f.routing_key.as_str().into(),
            false,
            f.body.clone(),
        );
        delivery.properties = f.properties.clone();
        let mut state = chain.start_delivery(&delivery, queue, false);
        chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
    }

    /// Publishes and consumes every fixture through `spans` and returns
    /// each span with the vector size predicted for it.
    fn run(configure: impl Fn(MessagingSpans) -> MessagingSpans) -> Vec<(SpanData, usize)> {
        let (provider, collect) = collecting();
        let spans = configure(MessagingSpans::new().with_tracer_provider(&provider));
        let agent: Option<Arc<str>> = Some(Arc::from("agent.writer.001"));
        let chain = InterceptorChain::new(vec![Arc::new(spans.clone())], agent);
        let mut predicted = Vec::new();
        for name in NAMES {
            let f = fixture(name);
            let env = Envelope::read(&f.routing_key, &f.body);
            let env = env.view();
            let legacy = spans.inner.legacy;
            let sent = Destination::send(&f.exchange, &f.routing_key);
            let template = |d: Destination<'_>| flag(!legacy && d.template().is_some());
            let mut state = publish(&chain, &f);
            chain.end_publish(&mut state, &PublishResult::Sent);
            predicted.push(spans.attribute_count(
                publish_extra(false, env.kind(), legacy) + template(sent),
                true,
                sent.is_temporary(),
                &f.routing_key,
                &f.properties,
                &env,
            ));

            let queue = "mindbus.test.queue";
            deliver_acked(&chain, &f, queue);
            let received = Destination::receive(&f.exchange, &f.routing_key, queue);
            predicted.push(spans.attribute_count(
                delivery_extra(env.kind(), legacy) + template(received),
                true,
                false,
                &f.routing_key,
                &f.properties,
                &env,
            ));
        }
        let _ = provider.force_flush();
        let exported = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(exported.len(), predicted.len(), "one span per operation");
        exported.into_iter().zip(predicted).collect()
    }

    /// Configuring an instance that is shared already (a clone was kept)
    /// makes a configured copy: it keeps the tracer provider, and the kept
    /// instance's stats see the copy's spans.
    #[test]
    fn configuring_a_shared_instance_keeps_its_provider_and_stats() {
        let (provider, collect) = collecting();
        let spans = MessagingSpans::new().with_tracer_provider(&provider);
        let edited = spans.clone().server("127.0.0.1", 5672);
        let chain = InterceptorChain::new(vec![Arc::new(edited)], None);
        let mut state = publish(&chain, &fixture("command"));
        chain.end_publish(&mut state, &PublishResult::Sent);
        let _ = provider.force_flush();
        let exported = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(
            exported.len(),
            1,
            "the span went to the configured provider"
        );
        let server = exported[0]
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == SERVER_ADDRESS);
        assert!(server.is_some(), "{}", describe(&exported[0]));
        assert_eq!((spans.stats().started(), spans.stats().ended()), (1, 1));
    }

    fn describe(span: &SpanData) -> String {
        let keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        format!("{} ({} attributes: {keys:?})", span.name, keys.len())
    }

    /// messaging-spans.md: the attributes a sampler needs are given at span
    /// creation (destination, operation, system, `server.address` /
    /// `.port`), and the recommended `messaging.client.id`.
    #[test]
    fn samplers_see_the_destination_server_and_client_at_start() {
        use opentelemetry::trace::{Link, TraceState};
        use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult, ShouldSample};

        #[derive(Debug, Clone, Default)]
        struct Seen(Arc<Mutex<Vec<Vec<String>>>>);
        impl ShouldSample for Seen {
            fn should_sample(
                &self,
                _: Option<&Context>,
                _: opentelemetry::trace::TraceId,
                _: &str,
                _: &SpanKind,
                attributes: &[KeyValue],
                _: &[Link],
            ) -> SamplingResult {
                if let Ok(mut seen) = self.0.lock() {
                    seen.push(attributes.iter().map(|kv| kv.key.to_string()).collect());
                }
                SamplingResult {
                    decision: SamplingDecision::RecordAndSample,
                    attributes: Vec::new(),
                    trace_state: TraceState::default(),
                }
            }
        }
        let seen = Seen::default();
        let provider = SdkTracerProvider::builder()
            .with_sampler(seen.clone())
            .build();
        let spans = MessagingSpans::new()
            .with_tracer_provider(&provider)
            .server("127.0.0.1", 5672);
        let agent: Option<Arc<str>> = Some(Arc::from("agent.writer.001"));
        let chain = InterceptorChain::new(vec![Arc::new(spans)], agent);
        let f = fixture("command");
        let mut state = publish(&chain, &f);
        chain.end_publish(&mut state, &PublishResult::Sent);
        deliver_acked(&chain, &f, "agent.writer");
        let seen = seen.0.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for keys in seen {
            for key in [
                MESSAGING_SYSTEM,
                MESSAGING_OPERATION_NAME,
                MESSAGING_OPERATION_TYPE,
                MESSAGING_DESTINATION_NAME,
                SERVER_ADDRESS,
                SERVER_PORT,
                MESSAGING_CLIENT_ID,
            ] {
                assert!(
                    keys.iter().any(|k| k == key),
                    "{key} not at start: {keys:?}"
                );
            }
        }
    }

    /// The vector is allocated at its final size: the prediction is exact
    /// for every MindBus kind, each direction and each option.
    #[test]
    fn the_attribute_vector_is_sized_exactly() {
        type Configure = fn(MessagingSpans) -> MessagingSpans;
        let configs: [(&str, Configure); 4] = [
            ("default", |s| s),
            ("legacy", |s| s.legacy_shapes(true)),
            ("server", |s| s.server("127.0.0.1", 5672)),
            ("everything", |s| {
                s.server("127.0.0.1", 5672)
                    .record_body_size(true)
                    .record_payload(64)
            }),
        ];
        for (config, configure) in configs {
            for (span, predicted) in run(configure) {
                assert_eq!(
                    span.attributes.len(),
                    predicted,
                    "{config}: {}",
                    describe(&span)
                );
            }
        }
    }

    /// The default spans of the hot MindBus kinds fit the small vector
    /// (see [`ATTRIBUTES_CAPACITY`]): a new default attribute must be
    /// weighed against the allocation class it would push spans into.
    /// ERROR messages (rare) carry their code twice and may exceed it.
    #[test]
    fn default_spans_fit_the_small_vector() {
        let mut checked = 0;
        for (span, _) in run(|s| s) {
            let kind = span
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == MINDBUS_MESSAGE_KIND)
                .map(|kv| kv.value.as_str().into_owned());
            if kind.as_deref() == Some("error") {
                continue;
            }
            checked += 1;
            assert!(
                span.attributes.len() <= ATTRIBUTES_CAPACITY,
                "{}",
                describe(&span)
            );
        }
        assert_eq!(checked, 8, "four kinds, both directions");
    }

    /// Every span records its message's routing key: the shared copy for
    /// MindBus's names, an own copy for a reply to a server-named queue.
    #[test]
    fn routing_keys_are_recorded_shared_or_copied() {
        let routing_key = |span: &SpanData| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == MESSAGING_RABBITMQ_ROUTING_KEY)
                .map(|kv| kv.value.to_string())
        };
        let expected: Vec<Option<String>> = NAMES
            .iter()
            .flat_map(|n| {
                let k = fixture(n).routing_key;
                [Some(k.clone()), Some(k)]
            })
            .collect();
        let got: Vec<Option<String>> = run(|s| s).iter().map(|(s, _)| routing_key(s)).collect();
        assert_eq!(got, expected);

        // Twice to the same server-named queue, then to another one.
        let (provider, collect) = collecting();
        let spans = MessagingSpans::new().with_tracer_provider(&provider);
        let chain = InterceptorChain::new(vec![Arc::new(spans)], None);
        let mut f = fixture("result");
        f.exchange = String::new();
        for queue in ["amq.gen-A1", "amq.gen-A1", "amq.gen-B2"] {
            f.routing_key = queue.to_owned();
            let mut state = publish(&chain, &f);
            chain.end_publish(&mut state, &PublishResult::Sent);
        }
        let _ = provider.force_flush();
        let exported = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
        let got: Vec<Option<String>> = exported.iter().map(routing_key).collect();
        let want = ["amq.gen-A1", "amq.gen-A1", "amq.gen-B2"].map(|q| Some(q.to_owned()));
        assert_eq!(got, want);
    }

    /// Span times come from the chain's two clock readings: the start when
    /// the start hooks ran, the end when the end hooks ran, in wall-clock
    /// time.
    #[test]
    fn span_times_are_the_hooks_times() {
        let (provider, collect) = collecting();
        let spans = MessagingSpans::new().with_tracer_provider(&provider);
        let chain = InterceptorChain::new(vec![Arc::new(spans)], None);
        let f = fixture("command");
        let t0 = SystemTime::now();
        let mut state = publish(&chain, &f);
        let t1 = SystemTime::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t2 = SystemTime::now();
        chain.end_publish(&mut state, &PublishResult::Sent);
        let t3 = SystemTime::now();
        let _ = provider.force_flush();
        let exported = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
        let [span] = &exported[..] else {
            panic!("one span, got {}", exported.len());
        };
        // The anchor maps instants to within a few µs of the wall clock.
        let slack = std::time::Duration::from_millis(2);
        assert!(
            span.start_time + slack >= t0 && span.start_time <= t1 + slack,
            "start"
        );
        assert!(
            span.end_time + slack >= t2 && span.end_time <= t3 + slack,
            "end"
        );
        let took = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or_default();
        assert!(took >= std::time::Duration::from_millis(20), "{took:?}");
    }

    /// `messaging.message.body.size` is opt-in (as in the semantic
    /// conventions); `cloudevents.event_spec_version` is recorded only when
    /// it is not MindBus's `1.0`.
    #[test]
    fn opt_in_and_protocol_fixed_attributes() {
        let has =
            |span: &SpanData, key: &str| span.attributes.iter().any(|kv| kv.key.as_str() == key);
        for (span, _) in run(|s| s) {
            assert!(
                !has(&span, MESSAGING_MESSAGE_BODY_SIZE),
                "{}",
                describe(&span)
            );
            assert!(
                !has(&span, CLOUDEVENTS_EVENT_SPEC_VERSION),
                "{}",
                describe(&span)
            );
        }
        for (span, _) in run(|s| s.record_body_size(true)) {
            assert!(
                has(&span, MESSAGING_MESSAGE_BODY_SIZE),
                "{}",
                describe(&span)
            );
        }
        // Another version is recorded, and counted in the vector's size.
        let spans = MessagingSpans::new();
        for (body, expected) in [
            (
                &br#"{"specversion":"0.3","type":"x","id":"1"}"#[..],
                Some("0.3"),
            ),
            (&br#"{"specversion":"1.0","type":"x","id":"1"}"#[..], None),
        ] {
            let env = Envelope::read("evt.x", body);
            let props = lapin::BasicProperties::default();
            let mut pushed = Vec::new();
            spans.message_attributes(
                &mut |kv| pushed.push(kv),
                false,
                "evt.x",
                &props,
                body,
                &env.view(),
            );
            let version = pushed
                .iter()
                .find(|kv| kv.key.as_str() == CLOUDEVENTS_EVENT_SPEC_VERSION)
                .map(|kv| kv.value.as_str().into_owned());
            assert_eq!(version.as_deref(), expected);
            let count = spans.attribute_count(0, false, false, "evt.x", &props, &env.view());
            assert_eq!(count, CREATION_ATTRIBUTES + pushed.len());
        }
    }
}
