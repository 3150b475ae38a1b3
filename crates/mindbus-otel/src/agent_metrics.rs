//! [`AgentMetrics`]: OpenTelemetry messaging metrics and per-agent message
//! counters, through the [`metrics`] facade (the application installs the
//! recorder, e.g. Prometheus; install it before the first message, since
//! handles are cached).
//!
//! | name | type | unit | labels | meaning |
//! |---|---|---|---|---|
//! | `messaging_client_sent_messages_total` | counter | messages | `messaging_system`, `messaging_operation_name`, `messaging_operation_type` (`send`, `receive`, `process`, `settle`), `messaging_destination_template`, `messaging_destination_name`*, `error_type`* | publishes, counted when they end |
//! | `messaging_client_consumed_messages_total` | counter | messages | `messaging_system`, `messaging_operation_name` (`process`/`receive`), `messaging_destination_template`, `messaging_destination_name`* | deliveries received |
//! | `messaging_client_operation_duration_seconds` | histogram | s | as sent, `messaging_operation_name` `publish`, `receive`, `ack`, `nack` or `reject` | `publish`: the call to hand-off (confirms off) or broker confirm (on); `receive`: a `basic_get` call, also when it fetched nothing or failed; `ack`/`nack`/`reject`: each settle call this process makes (with `error_type` when it failed or was not sent) |
//! | `messaging_process_duration_seconds` | histogram | s | as consumed, `messaging_operation_name` `process`, `error_type`* | delivery (or the pull's return) to settlement |
//! | `mindbus_messages_total` | counter | messages | `agent`, `peer`, `kind`, `direction`, `outcome` | every message this process's agent sent or received, by the other side, kind, direction and outcome |
//! | `mindbus_processing_duration_seconds` | histogram | s | `agent`, `kind` | delivery to settlement, by this process's agent and the message kind |
//! | `mindbus_messages_in_flight` | gauge | messages | `agent` | deliveries received and not yet settled |
//!
//! `agent` is always this process's agent, the one
//! [`TracedChannelBuilder::agent`](crate::TracedChannelBuilder::agent) names
//! (`unknown` without one), whichever way the message goes: a writer's acks
//! and nacks of COMMANDs count under the writer. `peer` is the other side:
//! for a received message its CloudEvents `source`; for a sent COMMAND the
//! role of its routing key (`cmd.{role}.*`), for a CONTROL its target
//! (`ctl.{target}.*`), for a RESULT or ERROR the `source` of the COMMAND it
//! answers (matched by `reply_to` and correlation id while that COMMAND is
//! in hand); `unknown` otherwise (EVENTs are broadcast).
//!
//! `error_type`* is present only on failures. As the conventions ask of
//! metrics, the destination is given by its low-cardinality template, the
//! one span names use ([`crate::destination`]):
//! `messaging_destination_template` is `mindbus.main:cmd.writer.*` for
//! COMMANDs sent to writers, `mindbus.main:cmd.writer.*:agent.writer` for
//! those the writers' queue delivers. `messaging_destination_name`* is given
//! only where the name is its template, so known to be low-cardinality
//! (`orchestrator.replies`, a queue on the default exchange); a reply to a
//! server-named queue has neither. Routing keys, which hold agent ids, are
//! never labels whole. ([`AgentMetrics::legacy_destinations`] keeps the 0.1
//! labels for a release.) `outcome` is one of `ok`,
//! `publish_error` (sent) or `acked`, `nacked`, `rejected`, `unsettled`,
//! `auto_ack`, `settled_elsewhere` (received); a settlement that never
//! reached the broker (its channel closed) counts as `unsettled`, with
//! `error_type="not_applied"` on the process duration. Every label fed from content
//! is capped ([`crate::labels`]).
//!
//! Telemetry-health counters emitted by the plugin itself:
//! `mindbus_otel_rejected_contexts_total{reason}`,
//! `mindbus_otel_dropped_context_members_total{header,direction}`,
//! `mindbus_otel_injection_skipped_total`,
//! `mindbus_otel_inbound_baggage_ignored_total`,
//! `mindbus_otel_label_overflow_total{label}`,
//! `mindbus_otel_interceptor_panics_total{hook}`,
//! `mindbus_otel_handler_panics_total`.

use crate::destination::{Destination, with_scratch};
use crate::envelope::MessageKind;
use crate::in_flight::{DEFAULT_MAX_IN_FLIGHT, InFlight, awaited_reply};
use crate::interceptor::Interceptor;
use crate::labels::ReadMostly;
use crate::labels::{DEFAULT_MAX_LABEL_VALUES, HandleCache, LabelGuard, LabelId};
use crate::message::{
    Direction, EmptyPull, IncomingMessage, MessageState, Outcome, OutgoingMessage, PublishResult,
    Settlement,
};
use crate::semconv::{TEMPORARY_DESTINATION, is_temporary_queue};
use crate::spans::lapin_error_type;
use lapin::Confirmation;
use metrics::{Counter, Gauge, Histogram, Label, Unit};
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};

/// `messaging_client_sent_messages_total`.
pub const SENT_MESSAGES: &str = "messaging_client_sent_messages_total";
/// `messaging_client_consumed_messages_total`.
pub const CONSUMED_MESSAGES: &str = "messaging_client_consumed_messages_total";
/// `messaging_client_operation_duration_seconds`.
pub const OPERATION_DURATION: &str = "messaging_client_operation_duration_seconds";
/// `messaging_process_duration_seconds`.
pub const PROCESS_DURATION: &str = "messaging_process_duration_seconds";
/// `mindbus_messages_total`.
pub const MESSAGES: &str = "mindbus_messages_total";
/// `mindbus_processing_duration_seconds`.
pub const PROCESSING_DURATION: &str = "mindbus_processing_duration_seconds";
/// `mindbus_messages_in_flight`.
pub const IN_FLIGHT: &str = "mindbus_messages_in_flight";

const UNKNOWN_AGENT: &str = "unknown";

/// Per-message state: the label ids computed at the start hook.
pub(crate) struct Meta {
    destination: DestLabels,
    kind: MessageKind,
    /// This process's agent.
    own: LabelId,
    /// The other side.
    peer: LabelId,
    /// A received COMMAND's key in the in-flight table.
    command: Option<u64>,
}

/// The destination labels of a message: its template (none for a reply to
/// a server-named queue), and whether its name is the template (then known
/// to be low-cardinality, and given too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DestLabels {
    template: Option<LabelId>,
    named: bool,
}

/// How many destinations (exchange, routing key, queue) an [`AgentMetrics`]
/// keeps the labels of; others are computed per message.
const DEST_CACHE: usize = 256;

/// A cached destination: its parts (to tell hash collisions apart) and
/// labels.
struct DestEntry {
    exchange: Box<str>,
    routing_key: Box<str>,
    queue: Option<Box<str>>,
    labels: DestLabels,
}

impl DestEntry {
    fn is(&self, d: &Destination<'_>) -> bool {
        let (exchange, routing_key, queue) = d.parts();
        *self.exchange == *exchange
            && *self.routing_key == *routing_key
            && self.queue.as_deref() == queue
    }
}

/// The metrics interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
    /// `server_address` / `server_port` of the messaging metrics
    /// ([`AgentMetrics::server`]).
    server: Option<(Arc<str>, Arc<str>)>,
    /// The 0.1 `messaging_destination_name` ([`AgentMetrics::legacy_destinations`]).
    legacy: bool,
}

struct Inner {
    agents: LabelGuard,
    peers: LabelGuard,
    /// The sender (`peer`) of each COMMAND being handled, for its reply.
    commands: InFlight<LabelId>,
    destinations: LabelGuard,
    /// The destination labels by the parts that decide them, so that a
    /// destination seen before builds no template ([`DEST_CACHE`] at most).
    dests: ReadMostly<u64, DestEntry>,
    dests_cached: AtomicUsize,
    errors: LabelGuard,
    sent: HandleCache<(DestLabels, Option<LabelId>), (Counter, Histogram)>,
    consumed: HandleCache<(DestLabels, bool), Counter>,
    processed: HandleCache<(DestLabels, Option<LabelId>), Histogram>,
    /// `receive` (`basic_get`) durations.
    pulls: HandleCache<(DestLabels, Option<LabelId>), Histogram>,
    /// Settle (`ack`, `nack`, `reject`) call durations.
    settles: HandleCache<(DestLabels, &'static str, Option<LabelId>), Histogram>,
    messages: HandleCache<(LabelId, LabelId, MessageKind, Direction, &'static str), Counter>,
    processing: HandleCache<(LabelId, MessageKind), Histogram>,
    in_flight: HandleCache<LabelId, Gauge>,
    described: Once,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentMetrics")
            .field("agents", &self.inner.agents.admitted())
            .field("peers", &self.inner.peers.admitted())
            .field("destinations", &self.inner.destinations.admitted())
            .finish_non_exhaustive()
    }
}

fn describe() {
    metrics::describe_counter!(
        SENT_MESSAGES,
        Unit::Count,
        "Messages published (semconv messaging.client.sent.messages)"
    );
    metrics::describe_counter!(
        CONSUMED_MESSAGES,
        Unit::Count,
        "Messages delivered (semconv messaging.client.consumed.messages)"
    );
    metrics::describe_histogram!(
        OPERATION_DURATION,
        Unit::Seconds,
        "Publish duration, including the broker confirm when confirms are on (semconv messaging.client.operation.duration)"
    );
    metrics::describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Delivery to settlement (semconv messaging.process.duration)"
    );
    metrics::describe_counter!(
        MESSAGES,
        Unit::Count,
        "MindBus messages by this process's agent, the other side (peer), kind, direction and outcome"
    );
    metrics::describe_histogram!(
        PROCESSING_DURATION,
        Unit::Seconds,
        "Delivery to settlement by processing agent and message kind"
    );
    metrics::describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Deliveries received and not yet settled"
    );
    // Telemetry health: registered at zero so dashboards and alerts see the
    // series before the first problem.
    metrics::describe_counter!(
        "mindbus_otel_rejected_contexts_total",
        Unit::Count,
        "Inbound trace-context values rejected, by reason (the message was delivered normally)"
    );
    for reason in crate::RejectReason::ALL {
        metrics::counter!("mindbus_otel_rejected_contexts_total", "reason" => reason.as_str())
            .increment(0);
    }
    metrics::describe_counter!(
        "mindbus_otel_label_overflow_total",
        Unit::Count,
        "Label values folded into `other` past the cardinality cap, by label"
    );
    for label in [
        "agent",
        "peer",
        "messaging_destination_template",
        "error_type",
    ] {
        metrics::counter!("mindbus_otel_label_overflow_total", "label" => label).increment(0);
    }
}

impl AgentMetrics {
    /// With [`DEFAULT_MAX_LABEL_VALUES`] distinct values per label.
    pub fn new() -> Self {
        AgentMetrics::with_max_label_values(DEFAULT_MAX_LABEL_VALUES)
    }

    /// With `cap` distinct values per content-fed label (agents, peers,
    /// destinations, error types) before folding into `other`; at most
    /// [`DEFAULT_MAX_IN_FLIGHT`] COMMANDs are held for matching replies.
    pub fn with_max_label_values(cap: usize) -> Self {
        AgentMetrics {
            inner: Arc::new(Inner {
                agents: LabelGuard::new("agent", cap),
                peers: LabelGuard::new("peer", cap),
                commands: InFlight::new(DEFAULT_MAX_IN_FLIGHT),
                destinations: LabelGuard::new("messaging_destination_template", cap),
                dests: ReadMostly::with_slots(2 * DEST_CACHE),
                dests_cached: AtomicUsize::new(0),
                errors: LabelGuard::new("error_type", cap),
                sent: HandleCache::default(),
                consumed: HandleCache::default(),
                processed: HandleCache::default(),
                pulls: HandleCache::default(),
                settles: HandleCache::default(),
                messages: HandleCache::default(),
                processing: HandleCache::default(),
                in_flight: HandleCache::default(),
                described: Once::new(),
            }),
            server: None,
            legacy: false,
        }
    }

    /// The broker address for the `server_address` / `server_port` labels
    /// of the four `messaging_*` metrics (conditionally required by the
    /// conventions). Set it before the instance is used.
    pub fn server(mut self, address: impl Into<String>, port: u16) -> Self {
        self.server = Some((Arc::from(address.into()), Arc::from(port.to_string())));
        self
    }

    /// The destination label of mindbus-otel 0.1, for one release, for
    /// users whose queries rely on it: `messaging_destination_name` = the
    /// exchange for publishes (the queue for the default exchange) and the
    /// queue for deliveries (`(temporary)` for server-named queues), where
    /// it is now `messaging_destination_template` (see the [module
    /// docs](self)). Off by default; will be removed in 0.3.
    pub fn legacy_destinations(mut self, enabled: bool) -> Self {
        self.legacy = enabled;
        self
    }

    /// The labels every `messaging_*` metric of an operation on
    /// `destination` carries.
    fn messaging_labels(&self, operation: &'static str, destination: DestLabels) -> Vec<Label> {
        let operation_type = match operation {
            "publish" => "send",
            "ack" | "nack" | "reject" => "settle",
            other => other,
        };
        let mut labels = vec![
            Label::new("messaging_system", "rabbitmq"),
            Label::new("messaging_operation_name", operation),
            Label::new("messaging_operation_type", operation_type),
        ];
        if let Some(template) = destination.template {
            let value = self.inner.destinations.value(template);
            if self.legacy {
                labels.push(Label::new("messaging_destination_name", value));
            } else {
                if destination.named {
                    labels.push(Label::new("messaging_destination_name", Arc::clone(&value)));
                }
                labels.push(Label::new("messaging_destination_template", value));
            }
        }
        if let Some((address, port)) = &self.server {
            labels.push(Label::new("server_address", Arc::clone(address)));
            labels.push(Label::new("server_port", Arc::clone(port)));
        }
        labels
    }

    /// The `agent` label guard (to inspect folding).
    pub fn agents(&self) -> &LabelGuard {
        &self.inner.agents
    }

    /// The `peer` label guard (to inspect folding).
    pub fn peers(&self) -> &LabelGuard {
        &self.inner.peers
    }

    /// COMMANDs in hand, held to name the `peer` of their replies.
    pub fn commands_in_flight(&self) -> usize {
        self.inner.commands.len()
    }

    /// The destination labels: the template, and the name when it is the
    /// template; with the 0.1 labels, the exchange or queue `legacy`
    /// (`(temporary)` for a server-named queue).
    fn destination(&self, destination: Destination<'_>, legacy: &str) -> DestLabels {
        let guard = &self.inner.destinations;
        if self.legacy {
            let value = if is_temporary_queue(legacy) {
                TEMPORARY_DESTINATION
            } else {
                legacy
            };
            return DestLabels {
                template: Some(guard.id(value)),
                named: true,
            };
        }
        let i = &self.inner;
        let hash = destination.hash();
        if let Some((_, entry)) = i.dests.get(&hash)
            && entry.is(&destination)
        {
            return entry.labels;
        }
        let labels = with_scratch(|buf| {
            if !destination.write_template(buf) {
                return DestLabels {
                    template: None,
                    named: false,
                };
            }
            DestLabels {
                template: Some(guard.id(buf)),
                named: destination.template_is_name(),
            }
        });
        // Generated queue names are not kept: each is new.
        if !destination.is_temporary() && i.dests_cached.load(Ordering::Relaxed) < DEST_CACHE {
            let make = || {
                i.dests_cached.fetch_add(1, Ordering::Relaxed);
                let (exchange, routing_key, queue) = destination.parts();
                Ok::<_, Infallible>((
                    hash,
                    DestEntry {
                        exchange: exchange.into(),
                        routing_key: routing_key.into(),
                        queue: queue.map(Into::into),
                        labels,
                    },
                ))
            };
            let _ = i.dests.get_or_insert_with(&hash, make, |_, _| ());
        }
        labels
    }

    /// Records a `basic_get` call's duration as
    /// `messaging_client_operation_duration_seconds{messaging_operation_name="receive"}`.
    fn record_pull(&self, destination: DestLabels, error: Option<LabelId>, seconds: f64) {
        let i = &self.inner;
        let make = || {
            let mut labels = self.messaging_labels("receive", destination);
            if let Some(e) = error {
                labels.push(Label::new("error_type", i.errors.value(e)));
            }
            metrics::histogram!(OPERATION_DURATION, labels)
        };
        i.pulls
            .with((destination, error), make, |h| h.record(seconds));
    }

    fn own_agent(&self, state: &MessageState) -> LabelId {
        self.inner.agents.id(state.agent().unwrap_or(UNKNOWN_AGENT))
    }

    /// The `peer` of a sent message: see the [module docs](self).
    fn sent_peer(&self, msg: &OutgoingMessage<'_>, kind: MessageKind) -> LabelId {
        let i = &self.inner;
        let second = |prefix: &str| {
            let rest = msg.routing_key().strip_prefix(prefix)?;
            rest.split('.').next().filter(|s| !s.is_empty())
        };
        let named = match kind {
            MessageKind::Command => second("cmd."),
            MessageKind::Control => second("ctl."),
            MessageKind::Result | MessageKind::Error => {
                let corr = msg.properties().correlation_id().as_ref();
                let key = corr.map(|c| i.commands.key(msg.routing_key(), c.as_str()));
                if let Some(peer) = key.and_then(|k| i.commands.get(k)) {
                    return peer;
                }
                None
            }
            _ => None,
        };
        i.peers.id(named.unwrap_or(UNKNOWN_AGENT))
    }

    /// Counts one message in `mindbus_messages_total`.
    fn count_message(&self, meta: &Meta, dir: Direction, outcome: &'static str) {
        let i = &self.inner;
        let (own, peer, kind) = (meta.own, meta.peer, meta.kind);
        i.messages.with(
            (own, peer, kind, dir, outcome),
            || {
                metrics::counter!(
                    MESSAGES,
                    vec![
                        Label::new("agent", i.agents.value(own)),
                        Label::new("peer", i.peers.value(peer)),
                        Label::new("kind", kind.as_str()),
                        Label::new("direction", dir.as_str()),
                        Label::new("outcome", outcome),
                    ]
                )
            },
            |c| c.increment(1),
        );
    }

    /// Moves the agent's in-flight gauge by `delta`.
    fn in_flight(&self, agent: LabelId, delta: f64) {
        let i = &self.inner;
        i.in_flight.with(
            agent,
            || metrics::gauge!(IN_FLIGHT, vec![Label::new("agent", i.agents.value(agent))]),
            |g| g.increment(delta),
        );
    }
}

fn operation(pull: bool) -> &'static str {
    if pull { "receive" } else { "process" }
}

impl Interceptor for AgentMetrics {
    fn builtin_slot(&self) -> Option<&'static str> {
        Some("AgentMetrics")
    }

    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        self.inner.described.call_once(describe);
        let (exchange, routing_key) = (msg.exchange(), msg.routing_key());
        let destination = self.destination(
            Destination::send(exchange, routing_key),
            if exchange.is_empty() {
                routing_key
            } else {
                exchange
            },
        );
        let kind = msg.envelope().kind();
        let own = self.own_agent(msg.state());
        let peer = self.sent_peer(msg, kind);
        msg.state_mut().builtin.agent = Some(Meta {
            destination,
            kind,
            own,
            peer,
            command: None,
        });
    }

    fn on_publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        let Some(meta) = state.builtin.agent.take() else {
            return;
        };
        let error: Option<String> = match result {
            PublishResult::Failed(e) => Some(lapin_error_type(e)),
            PublishResult::Confirmed(Confirmation::Nack(_)) => Some("nack".to_owned()),
            PublishResult::Confirmed(Confirmation::Ack(Some(_))) => Some("unroutable".to_owned()),
            _ => None,
        };
        let i = &self.inner;
        let error_id = error.as_deref().map(|e| i.errors.id(e));
        let make = || {
            let mut labels = self.messaging_labels("publish", meta.destination);
            if let Some(e) = error_id {
                labels.push(Label::new("error_type", i.errors.value(e)));
            }
            (
                metrics::counter!(SENT_MESSAGES, labels.clone()),
                metrics::histogram!(OPERATION_DURATION, labels),
            )
        };
        let elapsed = state.elapsed().as_secs_f64();
        i.sent
            .with((meta.destination, error_id), make, |(sent, duration)| {
                sent.increment(1);
                duration.record(elapsed);
            });
        let outcome = if error.is_some() {
            "publish_error"
        } else {
            "ok"
        };
        self.count_message(&meta, Direction::Sent, outcome);
    }

    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        self.inner.described.call_once(describe);
        let delivery = msg.delivery();
        let destination = self.destination(
            Destination::receive(
                delivery.exchange.as_str(),
                delivery.routing_key.as_str(),
                msg.queue(),
            ),
            msg.queue(),
        );
        let pull = msg.state().is_pull();
        let props = &msg.delivery().properties;
        let env = msg.envelope();
        let kind = env.kind();
        let source = env.source().unwrap_or(UNKNOWN_AGENT);
        let i = &self.inner;
        let peer = i.peers.id(source);
        // A COMMAND awaiting a reply: remember its sender for the reply's peer.
        let command = awaited_reply(kind, props, env.id())
            .and_then(|(reply_to, corr)| i.commands.insert(i.commands.key(reply_to, corr), peer));
        i.consumed.with(
            (destination, pull),
            || {
                metrics::counter!(
                    CONSUMED_MESSAGES,
                    self.messaging_labels(operation(pull), destination)
                )
            },
            |c| c.increment(1),
        );
        if let Some(call) = msg.state().pull_started() {
            let took = msg.state().started().saturating_duration_since(call);
            self.record_pull(destination, None, took.as_secs_f64());
        }
        let own = self.own_agent(msg.state());
        self.in_flight(own, 1.0);
        msg.state_mut().builtin.agent = Some(Meta {
            destination,
            kind,
            own,
            peer,
            command,
        });
    }

    fn on_empty_pull(&self, pull: &EmptyPull<'_>) {
        self.inner.described.call_once(describe);
        let destination = self.destination(Destination::receive("", "", pull.queue), pull.queue);
        let error = pull
            .error
            .map(|e| self.inner.errors.id(&lapin_error_type(e)));
        let took = pull.ended.saturating_duration_since(pull.started);
        self.record_pull(destination, error, took.as_secs_f64());
    }

    fn on_settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        let Some(meta) = state.builtin.agent.take() else {
            return;
        };
        let i = &self.inner;
        if let Some(key) = meta.command {
            i.commands.remove(key);
        }
        let elapsed = state.elapsed().as_secs_f64();
        // An ack/nack/reject that never reached the broker (its channel
        // closed) leaves the message to be redelivered: not a success.
        let not_applied = !settlement.applied
            && matches!(
                settlement.outcome,
                Outcome::Acked | Outcome::Nacked { .. } | Outcome::Rejected { .. }
            );
        let error: Option<&str> = match (settlement.failure, settlement.outcome) {
            _ if settlement.error.is_some() || not_applied => Some("not_applied"),
            (Some(crate::HandlerFailure::Error(_)), _) => Some("handler_error"),
            (Some(crate::HandlerFailure::Panic(_)), _) => Some("panic"),
            (None, Outcome::Nacked { .. }) => Some("nack"),
            (None, Outcome::Rejected { .. }) => Some("reject"),
            (None, Outcome::Unsettled) => Some("unsettled"),
            _ => None,
        };
        let error_id = error.map(|e| i.errors.id(e));
        i.processed.with(
            (meta.destination, error_id),
            || {
                // A pulled message too: its `receive` is the pull call.
                let mut labels = self.messaging_labels("process", meta.destination);
                if let Some(e) = error_id {
                    labels.push(Label::new("error_type", i.errors.value(e)));
                }
                metrics::histogram!(PROCESS_DURATION, labels)
            },
            |h| h.record(elapsed),
        );
        if let (Some(operation), Some(call)) = (settlement.operation(), settlement.call_started) {
            // The settle call: from its start to the settle hooks.
            let error = match settlement.error {
                Some(e) => Some(i.errors.id(&lapin_error_type(e))),
                None if not_applied => Some(i.errors.id("not_applied")),
                None => None,
            };
            let make = || {
                let mut labels = self.messaging_labels(operation, meta.destination);
                if let Some(e) = error {
                    labels.push(Label::new("error_type", i.errors.value(e)));
                }
                metrics::histogram!(OPERATION_DURATION, labels)
            };
            let took = state.ended().saturating_duration_since(call).as_secs_f64();
            i.settles
                .with((meta.destination, operation, error), make, |h| {
                    h.record(took)
                });
        }
        let outcome = if not_applied || settlement.error.is_some() {
            Outcome::Unsettled.as_str()
        } else {
            settlement.outcome.as_str()
        };
        self.count_message(&meta, Direction::Received, outcome);
        let own = meta.own;
        i.processing.with(
            (own, meta.kind),
            || {
                metrics::histogram!(
                    PROCESSING_DURATION,
                    vec![
                        Label::new("agent", i.agents.value(own)),
                        Label::new("kind", meta.kind.as_str()),
                    ]
                )
            },
            |h| h.record(elapsed),
        );
        self.in_flight(own, -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interceptor::InterceptorChain;
    use lapin::BasicProperties;
    use lapin::message::Delivery;
    use lapin::options::BasicPublishOptions;

    fn publish(
        chain: &InterceptorChain,
        exchange: &str,
        key: &str,
        body: &str,
        props: BasicProperties,
    ) {
        let opts = BasicPublishOptions::default();
        let (_, mut state) = chain.start_publish(exchange, key, opts, body.as_bytes(), props);
        chain.end_publish(&mut state, &PublishResult::Sent);
    }

    fn event(kind: &str, source: &str) -> String {
        format!(r#"{{"specversion":"1.0","type":"ai.team.{kind}","source":"{source}","id":"i1"}}"#)
    }

    /// `peer` of what an agent sends: the addressed role, the CONTROL
    /// target, the sender of the COMMAND a reply answers (only while that
    /// COMMAND is in hand), else `unknown`.
    #[test]
    fn the_peer_of_each_kind_of_message() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let am = AgentMetrics::new();
        metrics::with_local_recorder(&recorder, || {
            let agent: Option<Arc<str>> = Some(Arc::from("agent.writer.001"));
            let chain = InterceptorChain::new(vec![Arc::new(am.clone())], agent);
            let none = BasicProperties::default;
            publish(
                &chain,
                "mindbus.main",
                "cmd.critic.any",
                &event("command", "w"),
                none(),
            );
            publish(
                &chain,
                "mindbus.main",
                "ctl.all.stop",
                &event("control", "w"),
                none(),
            );
            publish(
                &chain,
                "mindbus.main",
                "evt.task.done",
                &event("event", "w"),
                none(),
            );

            // A COMMAND in hand: its reply's peer is the COMMAND's sender.
            let mut cmd = Delivery::mock(
                1,
                "mindbus.main".into(),
                "cmd.writer.any".into(),
                false,
                event("command", "orchestrator-core").into_bytes(),
            );
            cmd.properties = BasicProperties::default()
                .with_reply_to("amq.gen-1".into())
                .with_correlation_id("c1".into());
            let mut state = chain.start_delivery(&cmd, "agent.writer", false);
            assert_eq!(am.commands_in_flight(), 1);
            let reply = || BasicProperties::default().with_correlation_id("c1".into());
            publish(&chain, "", "amq.gen-1", &event("result", "w"), reply());
            chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
            assert_eq!(am.commands_in_flight(), 0, "forgotten at settlement");
            // Once settled, a late reply no longer knows its recipient.
            publish(&chain, "", "amq.gen-1", &event("error", "w"), reply());
        });
        let text = handle.render();
        let line = |peer: &str, kind: &str, direction: &str, outcome: &str| {
            format!(
                "mindbus_messages_total{{agent=\"agent.writer.001\",peer=\"{peer}\",kind=\"{kind}\",direction=\"{direction}\",outcome=\"{outcome}\"}} 1"
            )
        };
        for want in [
            line("critic", "command", "sent", "ok"),
            line("all", "control", "sent", "ok"),
            line("unknown", "event", "sent", "ok"),
            line("orchestrator-core", "command", "received", "acked"),
            line("orchestrator-core", "result", "sent", "ok"),
            line("unknown", "error", "sent", "ok"),
        ] {
            assert!(text.contains(&want), "no {want} in\n{text}");
        }
    }

    /// messaging-metrics.md: `server.address` (conditionally required) and
    /// `server.port` on the four messaging metrics, when the broker is
    /// known (`server(..)`); not invented when it is not.
    #[test]
    fn the_messaging_metrics_carry_the_server_when_known() {
        for server in [true, false] {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let mut am = AgentMetrics::new();
            if server {
                am = am.server("rabbit.internal", 5672);
            }
            metrics::with_local_recorder(&recorder, || {
                let chain = InterceptorChain::new(vec![Arc::new(am.clone())], None);
                publish(
                    &chain,
                    "mindbus.main",
                    "cmd.writer.any",
                    &event("command", "o"),
                    BasicProperties::default(),
                );
                let d = Delivery::mock(
                    1,
                    "mindbus.main".into(),
                    "cmd.writer.any".into(),
                    false,
                    event("command", "o").into_bytes(),
                );
                let mut state = chain.start_delivery(&d, "agent.writer", false);
                chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
            });
            let text = handle.render();
            for metric in [
                "messaging_client_sent_messages_total{",
                "messaging_client_operation_duration_seconds_count{",
                "messaging_client_consumed_messages_total{",
                "messaging_process_duration_seconds_count{",
            ] {
                let line = text
                    .lines()
                    .find(|l| l.starts_with(metric))
                    .unwrap_or_else(|| panic!("no {metric}: {text}"));
                let labelled = line.contains("server_address=\"rabbit.internal\"")
                    && line.contains("server_port=\"5672\"");
                let unlabelled = !line.contains("server_");
                assert!(if server { labelled } else { unlabelled }, "{line}");
            }
        }
    }

    /// The destination labels, as the conventions' metrics ask (template;
    /// name only when low-cardinality) and as 0.1 gave them.
    #[test]
    fn destination_labels_now_and_in_the_0_1_shape() {
        for legacy in [false, true] {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let am = AgentMetrics::new().legacy_destinations(legacy);
            metrics::with_local_recorder(&recorder, || {
                let chain = InterceptorChain::new(vec![Arc::new(am.clone())], None);
                let command = event("command", "o");
                for (exchange, key) in [
                    ("mindbus.main", "cmd.writer.001"),
                    ("", "orchestrator.replies"),
                    ("", "amq.gen-r1"),
                ] {
                    publish(&chain, exchange, key, &command, BasicProperties::default());
                }
                let d = Delivery::mock(
                    1,
                    "mindbus.main".into(),
                    "cmd.writer.001".into(),
                    false,
                    command.into_bytes(),
                );
                let mut state = chain.start_delivery(&d, "agent.writer", false);
                chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
            });
            let text = handle.render();
            let mut series: Vec<String> = text
                .lines()
                .filter(|l| {
                    l.starts_with("messaging_client_sent_messages_total")
                        || l.starts_with("messaging_client_consumed_messages_total")
                })
                .map(|l| {
                    let labels = &l[l.find('{').map_or(0, |i| i + 1)..l.rfind('}').unwrap_or(0)];
                    labels
                        .split(',')
                        .filter(|kv| kv.starts_with("messaging_destination"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect();
            series.sort();
            let want: &[&str] = if legacy {
                &[
                    "messaging_destination_name=\"(temporary)\"",
                    "messaging_destination_name=\"agent.writer\"",
                    "messaging_destination_name=\"mindbus.main\"",
                    "messaging_destination_name=\"orchestrator.replies\"",
                ]
            } else {
                &[
                    "",
                    "messaging_destination_name=\"orchestrator.replies\",messaging_destination_template=\"orchestrator.replies\"",
                    "messaging_destination_template=\"mindbus.main:cmd.writer.*\"",
                    "messaging_destination_template=\"mindbus.main:cmd.writer.*:agent.writer\"",
                ]
            };
            assert_eq!(series, want, "legacy {legacy}:\n{text}");
        }
    }

    /// A pull is a `receive` (the `basic_get` call, counted in the
    /// operation duration even when it fetched nothing or failed), then a
    /// `process` of what it fetched (messaging-metrics.md: the client
    /// operation duration covers receive; the process duration, process).
    #[test]
    fn a_pull_is_a_receive_then_a_process() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let am = AgentMetrics::new();
            let chain = InterceptorChain::new(vec![Arc::new(am)], None);
            let call = std::time::Instant::now();
            let d = Delivery::mock(
                1,
                "".into(),
                "jobs".into(),
                false,
                event("command", "o").into_bytes(),
            );
            let mut state = chain.start_pulled_delivery(&d, "jobs", call);
            chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
            chain.empty_pull("jobs", std::time::Instant::now(), None);
            let failed: lapin::Error = lapin::ErrorKind::FutureCompleted.into();
            chain.empty_pull("jobs", std::time::Instant::now(), Some(&failed));
        });
        let text = handle.render();
        let count = |metric: &str, must: &[&str], must_not: &[&str]| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(metric))
                .filter(|l| must.iter().all(|m| l.contains(m)))
                .filter(|l| !must_not.iter().any(|m| l.contains(m)))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let receive = "messaging_operation_name=\"receive\"";
        let process = "messaging_operation_name=\"process\"";
        let jobs = "messaging_destination_template=\"jobs\"";
        let duration = "messaging_client_operation_duration_seconds_count";
        assert_eq!(
            count(duration, &[receive, jobs], &["error_type"]),
            2.0,
            "{text}"
        );
        assert_eq!(
            count(
                duration,
                &[receive, jobs, "error_type=\"lapin_error\""],
                &[]
            ),
            1.0,
            "{text}"
        );
        let processed = "messaging_process_duration_seconds_count";
        assert_eq!(count(processed, &[process, jobs], &[]), 1.0, "{text}");
        assert_eq!(count(processed, &[receive], &[]), 0.0, "{text}");
        let consumed = "messaging_client_consumed_messages_total";
        assert_eq!(count(consumed, &[receive, jobs], &[]), 1.0, "{text}");
    }

    /// Each ack, nack or reject call this process makes is a settle
    /// operation in `messaging_client_operation_duration_seconds`
    /// (messaging-metrics.md: "send, receive, settle"); drops and
    /// settlements made elsewhere are not calls.
    #[test]
    fn settle_calls_have_their_operation_duration() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let chain = InterceptorChain::new(vec![Arc::new(AgentMetrics::new())], None);
            let closed: lapin::Error = lapin::ErrorKind::FutureCompleted.into();
            let settlements = [
                (Outcome::Acked, None, true),
                (Outcome::Nacked { requeue: false }, None, true),
                (Outcome::Rejected { requeue: true }, Some(&closed), true),
                (Outcome::Acked, None, false),
            ];
            for (tag, (outcome, error, applied)) in (1..).zip(settlements) {
                let d = Delivery::mock(
                    tag,
                    "".into(),
                    "jobs".into(),
                    false,
                    event("command", "o").into_bytes(),
                );
                let mut state = chain.start_delivery(&d, "jobs", false);
                let mut settlement = Settlement::new(outcome);
                settlement.error = error;
                settlement.applied = applied;
                settlement.call_started = Some(std::time::Instant::now());
                chain.end_delivery(&mut state, &settlement);
            }
            // Dropped: no call.
            let d = Delivery::mock(9, "".into(), "jobs".into(), false, Vec::new());
            let mut state = chain.start_delivery(&d, "jobs", false);
            chain.end_delivery(&mut state, &Settlement::new(Outcome::Unsettled));
        });
        let text = handle.render();
        let series = |operation: &str| -> Vec<String> {
            let op = format!("messaging_operation_name=\"{operation}\"");
            text.lines()
                .filter(|l| l.starts_with("messaging_client_operation_duration_seconds_count"))
                .filter(|l| l.contains(&op))
                .map(str::to_owned)
                .collect()
        };
        let (ack, nack, reject) = (series("ack"), series("nack"), series("reject"));
        assert_eq!((ack.len(), nack.len(), reject.len()), (2, 1, 1), "{text}");
        for line in ack.iter().chain(&nack).chain(&reject) {
            assert!(
                line.contains("messaging_operation_type=\"settle\""),
                "{line}"
            );
        }
        assert!(
            ack.iter()
                .any(|l| l.contains("error_type=\"not_applied\"") && l.ends_with(" 1"))
        );
        assert!(
            ack.iter()
                .any(|l| !l.contains("error_type") && l.ends_with(" 1"))
        );
        assert!(!nack[0].contains("error_type"), "{}", nack[0]);
        assert!(
            reject[0].contains("error_type=\"lapin_error\""),
            "{}",
            reject[0]
        );
        assert!(series("unsettled").is_empty());
    }

    /// Cached destination labels are the ones computed afresh, the cache
    /// stays bounded, and generated queues are not kept.
    #[test]
    fn cached_destination_labels_match_and_stay_bounded() {
        // Room for every template, so that none folds into `other`.
        let cached = AgentMetrics::with_max_label_values(1000);
        let names: Vec<(String, String, String)> = (0..DEST_CACHE + 40)
            .map(|i| {
                (
                    format!("x{}", i % 3),
                    format!("cmd.r{}.a{i}", i % 5),
                    format!("q{}", i % 7),
                )
            })
            .collect();
        for round in 0..2 {
            for (e, k, q) in &names {
                for d in [Destination::send(e, k), Destination::receive(e, k, q)] {
                    let fresh = AgentMetrics::new();
                    let want = fresh.destination(d, "");
                    let got = cached.destination(d, "");
                    let value = |m: &AgentMetrics, l: DestLabels| {
                        l.template
                            .map(|t| m.inner.destinations.value(t).to_string())
                    };
                    assert_eq!(
                        (value(&cached, got), got.named),
                        (value(&fresh, want), want.named),
                        "round {round}: {d:?}"
                    );
                }
            }
        }
        assert_eq!(
            cached.inner.dests_cached.load(Ordering::Relaxed),
            DEST_CACHE
        );
        let gen_q = AgentMetrics::new();
        let _ = gen_q.destination(Destination::receive("", "amq.gen-1", "amq.gen-1"), "");
        assert_eq!(gen_q.inner.dests_cached.load(Ordering::Relaxed), 0);
    }
}
