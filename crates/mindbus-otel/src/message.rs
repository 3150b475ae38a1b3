//! What interceptors see: the message on its way out or in, and the state
//! that follows it until it is confirmed or settled.
//!
//! A message's life has two moments for an interceptor:
//! - the **start** hook sees the whole message, borrowed:
//!   [`OutgoingMessage`] in [`Interceptor::on_publish`], [`IncomingMessage`]
//!   in [`Interceptor::on_delivery`];
//! - the **end** hook sees only the [`MessageState`] that outlives the
//!   payload: [`Interceptor::on_publish_result`] with a [`PublishResult`],
//!   [`Interceptor::on_settle`] with a [`Settlement`].
//!
//! Whatever an interceptor needs at the end (its span, a start time, a
//! label) it stores in the state's [`Extensions`] at the start.
//!
//! [`Interceptor::on_publish`]: crate::Interceptor::on_publish
//! [`Interceptor::on_delivery`]: crate::Interceptor::on_delivery
//! [`Interceptor::on_publish_result`]: crate::Interceptor::on_publish_result
//! [`Interceptor::on_settle`]: crate::Interceptor::on_settle

use crate::envelope::{Envelope, EnvelopeRef, MessageKind};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, message::Delivery};
use opentelemetry::Context;
use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A small type map where each interceptor keeps its per-message state.
///
/// Keyed by type: use a private newtype per interceptor. Empty until the
/// first insert (no allocation for chains that keep nothing).
#[derive(Default)]
pub struct Extensions {
    entries: Vec<(TypeId, Box<dyn Any + Send>)>,
}

impl Extensions {
    /// Stores `value`, returning the previous value of that type.
    pub fn insert<T: Send + 'static>(&mut self, value: T) -> Option<T> {
        let id = TypeId::of::<T>();
        for (k, v) in &mut self.entries {
            if *k == id {
                let old = std::mem::replace(v, Box::new(value));
                return old.downcast::<T>().ok().map(|b| *b);
            }
        }
        self.entries.push((id, Box::new(value)));
        None
    }

    /// The stored value of type `T`.
    pub fn get<T: Send + 'static>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.entries
            .iter()
            .find(|(k, _)| *k == id)
            .and_then(|(_, v)| v.downcast_ref::<T>())
    }

    /// The stored value of type `T`, mutably.
    pub fn get_mut<T: Send + 'static>(&mut self) -> Option<&mut T> {
        let id = TypeId::of::<T>();
        self.entries
            .iter_mut()
            .find(|(k, _)| *k == id)
            .and_then(|(_, v)| v.downcast_mut::<T>())
    }

    /// Removes and returns the stored value of type `T`.
    pub fn remove<T: Send + 'static>(&mut self) -> Option<T> {
        let id = TypeId::of::<T>();
        let at = self.entries.iter().position(|(k, _)| *k == id)?;
        self.entries
            .swap_remove(at)
            .1
            .downcast::<T>()
            .ok()
            .map(|b| *b)
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.entries.len())
            .finish()
    }
}

/// Which way a message is going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Published by this process.
    Sent,
    /// Delivered to this process.
    Received,
}

impl Direction {
    /// `sent` or `received`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

/// The built-in interceptors' per-message state, kept inline: unlike a
/// value in [`Extensions`] (a box each, and a vector), it costs no
/// allocation per message.
#[derive(Default)]
pub(crate) struct Builtin {
    pub(crate) spans: Option<crate::spans::SpanState>,
    pub(crate) agent: Option<crate::agent_metrics::Meta>,
    pub(crate) task: Option<crate::task_metrics::CommandOut>,
}

impl fmt::Debug for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builtin")
            .field("spans", &self.spans.is_some())
            .field("agent", &self.agent.is_some())
            .field("task", &self.task.is_some())
            .finish()
    }
}

/// State that follows one message from its start hook to its end hook.
#[derive(Debug)]
pub struct MessageState {
    direction: Direction,
    context: Context,
    envelope: Option<Envelope>,
    kind: MessageKind,
    started: Instant,
    ended: Option<Instant>,
    agent: Option<Arc<str>>,
    /// When the `basic_get` call that fetched it began.
    pull: Option<Instant>,
    pub(crate) builtin: Builtin,
    /// Per-interceptor state.
    pub extensions: Extensions,
}

impl MessageState {
    pub(crate) fn new(direction: Direction, context: Context, agent: Option<Arc<str>>) -> Self {
        MessageState {
            direction,
            context,
            envelope: None,
            kind: MessageKind::Unknown,
            started: Instant::now(),
            ended: None,
            agent,
            pull: None,
            builtin: Builtin::default(),
            extensions: Extensions::default(),
        }
    }

    /// A message fetched by a `basic_get` call that began at `call`.
    pub(crate) fn pulled(mut self, call: Instant) -> Self {
        self.pull = Some(call.min(self.started));
        self
    }

    /// True for a message fetched with `basic_get` (a pull), false for a
    /// consumer push or a publish.
    pub fn is_pull(&self) -> bool {
        self.pull.is_some()
    }

    /// For a pulled message, when the `basic_get` call that fetched it
    /// began; it returned at [`started`](Self::started).
    pub fn pull_started(&self) -> Option<Instant> {
        self.pull
    }

    /// Whether the message is being sent or was received.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The OpenTelemetry context of this message.
    ///
    /// Publishing: starts as the caller's current context; a span
    /// interceptor replaces it with one holding the PRODUCER span, and the
    /// propagation interceptor injects it. Consuming: starts empty; the
    /// propagation interceptor sets the extracted remote parent, a span
    /// interceptor replaces it with one holding the CONSUMER span; the
    /// handler runs in it.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Replaces the message's OpenTelemetry context.
    pub fn set_context(&mut self, cx: Context) {
        self.context = cx;
    }

    /// The message kind, once the envelope was read (else from the routing
    /// key, or `Unknown` before the start hooks ran).
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// When the start hooks began (publish call or delivery received).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the end hooks began (publish result or settlement): one clock
    /// reading shared by every interceptor. Before the end hooks, now.
    pub fn ended(&self) -> Instant {
        self.ended.unwrap_or_else(Instant::now)
    }

    /// From [`started`](Self::started) to [`ended`](Self::ended).
    pub fn elapsed(&self) -> Duration {
        self.ended().saturating_duration_since(self.started)
    }

    /// Reads the clock for the end hooks (once: a second call keeps the
    /// first reading).
    pub(crate) fn mark_ended(&mut self) {
        if self.ended.is_none() {
            self.ended = Some(Instant::now());
        }
    }

    /// Sets the end time to `at` (a settlement made earlier, for this
    /// message among others), unless the end hooks have read the clock.
    pub(crate) fn mark_ended_at(&mut self, at: Instant) {
        if self.ended.is_none() {
            self.ended = Some(at.max(self.started));
        }
    }

    /// This process's agent identity, as configured on the channel builder.
    pub fn agent(&self) -> Option<&str> {
        self.agent.as_deref()
    }

    pub(crate) fn agent_shared(&self) -> Option<&Arc<str>> {
        self.agent.as_ref()
    }

    fn envelope_for(&mut self, routing_key: &str, payload: &[u8]) -> &Envelope {
        let env = self
            .envelope
            .get_or_insert_with(|| Envelope::read(routing_key, payload));
        self.kind = env.kind();
        env
    }
}

/// A message being published, as the publish hooks see it.
pub struct OutgoingMessage<'a> {
    pub(crate) exchange: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) options: BasicPublishOptions,
    pub(crate) payload: &'a [u8],
    pub(crate) properties: &'a BasicProperties,
    pub(crate) headers: &'a mut Option<FieldTable>,
    pub(crate) state: &'a mut MessageState,
}

impl<'a> OutgoingMessage<'a> {
    /// The exchange (`""` is the default exchange).
    pub fn exchange(&self) -> &'a str {
        self.exchange
    }

    /// The routing key.
    pub fn routing_key(&self) -> &'a str {
        self.routing_key
    }

    /// The publish options (`mandatory`, `immediate`).
    pub fn options(&self) -> BasicPublishOptions {
        self.options
    }

    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The AMQP properties as the caller gave them (headers set by hooks
    /// are in [`OutgoingMessage::header`]).
    pub fn properties(&self) -> &'a BasicProperties {
        self.properties
    }

    /// A header as it will be sent: set by an earlier hook, else the caller's.
    pub fn header(&self, key: &str) -> Option<&AMQPValue> {
        match &*self.headers {
            Some(h) => h.inner().get(key),
            None => self.properties.headers().as_ref()?.inner().get(key),
        }
    }

    /// The header table that will be sent, for writing. The caller's headers
    /// are kept; the table is copied once, on first use.
    pub fn headers_mut(&mut self) -> &mut FieldTable {
        let props = self.properties;
        self.headers
            .get_or_insert_with(|| props.headers().clone().unwrap_or_default())
    }

    /// Sets one header (the caller's other headers are kept).
    pub fn set_header(&mut self, key: ShortString, value: AMQPValue) {
        self.headers_mut().insert(key, value);
    }

    /// The MindBus envelope, read on first use and shared by all hooks.
    pub fn envelope(&mut self) -> EnvelopeRef<'_> {
        let payload = self.payload;
        self.state.envelope_for(self.routing_key, payload).view()
    }

    /// The state that follows this message to its publish result.
    pub fn state(&self) -> &MessageState {
        self.state
    }

    /// The state, mutably (context, extensions).
    pub fn state_mut(&mut self) -> &mut MessageState {
        self.state
    }
}

impl fmt::Debug for OutgoingMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// A delivered message, as the delivery hooks see it.
pub struct IncomingMessage<'a> {
    pub(crate) delivery: &'a Delivery,
    pub(crate) queue: &'a str,
    pub(crate) state: &'a mut MessageState,
}

impl<'a> IncomingMessage<'a> {
    /// The lapin delivery (exchange, routing key, properties, data...).
    pub fn delivery(&self) -> &'a Delivery {
        self.delivery
    }

    /// The queue it was consumed from (or fetched with `basic_get`).
    pub fn queue(&self) -> &'a str {
        self.queue
    }

    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        &self.delivery.data
    }

    /// The header table, if any.
    pub fn headers(&self) -> Option<&'a FieldTable> {
        self.delivery.properties.headers().as_ref()
    }

    /// The MindBus envelope, read on first use and shared by all hooks.
    pub fn envelope(&mut self) -> EnvelopeRef<'_> {
        let d = self.delivery;
        self.state
            .envelope_for(d.routing_key.as_str(), &d.data)
            .view()
    }

    /// The state that follows this message to its settlement.
    pub fn state(&self) -> &MessageState {
        self.state
    }

    /// The state, mutably (context, extensions).
    pub fn state_mut(&mut self) -> &mut MessageState {
        self.state
    }
}

impl fmt::Debug for IncomingMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingMessage")
            .field("queue", &self.queue)
            .field("routing_key", &self.delivery.routing_key)
            .field("delivery_tag", &self.delivery.delivery_tag)
            .finish_non_exhaustive()
    }
}

/// How a publish ended, as the publish-result hooks see it.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishResult<'a> {
    /// Publisher confirms are off: the frame was handed to lapin.
    Sent,
    /// The broker confirmed (ack or nack; a returned message is inside).
    Confirmed(&'a Confirmation),
    /// lapin rejected the publish, or waiting for the confirm failed.
    Failed(&'a lapin::Error),
    /// The confirm was never awaited (dropped, or taken with
    /// `into_inner`), or the publish call itself was cancelled.
    Abandoned,
}

/// How a delivery was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// `basic.ack`.
    Acked,
    /// `basic.nack`.
    Nacked {
        /// Whether the broker was asked to requeue it.
        requeue: bool,
    },
    /// `basic.reject`.
    Rejected {
        /// Whether the broker was asked to requeue it.
        requeue: bool,
    },
    /// Consumed with `no_ack`: the broker considered it settled on delivery;
    /// this fires when the handler returned or the item was dropped.
    AutoAck,
    /// Dropped without being settled (it stays unacked until the channel
    /// closes, then the broker requeues it).
    Unsettled,
    /// Settled through lapin's `Acker` directly, bypassing the wrapper: the
    /// outcome is unknown to the hooks. Also a delivery covered by a
    /// `multiple` settlement the channel no longer remembers (past its
    /// last 1,024 by-tag or multiple settlements).
    SettledElsewhere,
}

impl Outcome {
    /// The label used in metrics (`acked`, `nacked`, `rejected`,
    /// `auto_ack`, `unsettled`, `settled_elsewhere`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Nacked { .. } => "nacked",
            Outcome::Rejected { .. } => "rejected",
            Outcome::AutoAck => "auto_ack",
            Outcome::Unsettled => "unsettled",
            Outcome::SettledElsewhere => "settled_elsewhere",
        }
    }

    /// True for ack and auto-ack.
    pub const fn is_success(self) -> bool {
        matches!(self, Outcome::Acked | Outcome::AutoAck)
    }
}

/// Why a handler failed (handler style only).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum HandlerFailure<'a> {
    /// The handler returned `Err`; its `Display` text.
    Error(&'a str),
    /// The handler panicked; the panic message when it was a string.
    Panic(&'a str),
}

/// A settlement, as the settle hooks see it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Settlement<'a> {
    /// What was done with the message.
    pub outcome: Outcome,
    /// The handler's failure, when the handler style settled it.
    pub failure: Option<HandlerFailure<'a>>,
    /// The error of the ack/nack/reject call itself, if it failed.
    pub error: Option<&'a lapin::Error>,
    /// False when lapin did not send the settlement because the delivery
    /// was already settled elsewhere or its channel had closed.
    pub applied: bool,
    /// When this process's ack, nack or reject call for the message began
    /// (it returned when the settle hooks began); `None` for a drop, an
    /// auto-ack, or a settlement made by an earlier call (`multiple`, by
    /// tag) or elsewhere.
    pub call_started: Option<Instant>,
}

impl<'a> Settlement<'a> {
    /// A settlement with no failure and no error.
    pub fn new(outcome: Outcome) -> Self {
        Settlement {
            outcome,
            failure: None,
            error: None,
            applied: true,
            call_started: None,
        }
    }

    /// The conventions' `messaging.operation.name` of the settle call, if
    /// this process made one: `ack`, `nack` or `reject`.
    pub fn operation(&self) -> Option<&'static str> {
        self.call_started?;
        match self.outcome {
            Outcome::Acked => Some("ack"),
            Outcome::Nacked { .. } => Some("nack"),
            Outcome::Rejected { .. } => Some("reject"),
            _ => None,
        }
    }
}

/// A `basic_get` that fetched nothing: the queue was empty, or the call
/// failed.
#[derive(Debug, Clone, Copy)]
pub struct EmptyPull<'a> {
    /// The queue pulled from.
    pub queue: &'a str,
    /// When the call began.
    pub started: Instant,
    /// When it returned.
    pub ended: Instant,
    /// The call's error, if it failed.
    pub error: Option<&'a lapin::Error>,
    /// This process's agent identity, as configured on the channel builder.
    pub agent: Option<&'a Arc<str>>,
}
