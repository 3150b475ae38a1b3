//! [`AgentMetrics`]: OpenTelemetry messaging metrics and per-agent message
//! counters, through the [`metrics`] facade (the application installs the
//! recorder, e.g. Prometheus; install it before the first message, since
//! handles are cached).
//!
//! | name | type | unit | labels | meaning |
//! |---|---|---|---|---|
//! | `messaging_client_sent_messages_total` | counter | messages | `messaging_system`, `messaging_operation_name`, `messaging_destination_name`, `error_type`* | publishes, counted when they end |
//! | `messaging_client_consumed_messages_total` | counter | messages | `messaging_system`, `messaging_operation_name` (`process`/`receive`), `messaging_destination_name` | deliveries received |
//! | `messaging_client_operation_duration_seconds` | histogram | s | as sent | publish call to hand-off (confirms off) or broker confirm (on) |
//! | `messaging_process_duration_seconds` | histogram | s | as consumed, `error_type`* | delivery to settlement |
//! | `mindbus_messages_total` | counter | messages | `agent`, `kind`, `direction`, `outcome` | every message by agent (this process's for what it sends, the CloudEvents `source` for what it receives), kind, direction and outcome |
//! | `mindbus_processing_duration_seconds` | histogram | s | `agent`, `kind` | delivery to settlement, by this process's agent and the message kind |
//! | `mindbus_messages_in_flight` | gauge | messages | `agent` | deliveries received and not yet settled |
//!
//! `error_type`* is present only on failures. `messaging_destination_name`
//! is the exchange for publishes (the queue for the default exchange) and
//! the queue for deliveries; server-named queues read `(temporary)`. Routing
//! keys, which hold agent ids, are never labels. `outcome` is one of `ok`,
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

use crate::envelope::MessageKind;
use crate::interceptor::Interceptor;
use crate::labels::{DEFAULT_MAX_LABEL_VALUES, HandleCache, LabelGuard, LabelId};
use crate::message::{
    Direction, IncomingMessage, MessageState, Outcome, OutgoingMessage, PublishResult, Settlement,
};
use crate::semconv::{TEMPORARY_DESTINATION, is_temporary_queue};
use crate::spans::lapin_error_type;
use lapin::Confirmation;
use metrics::{Counter, Gauge, Histogram, Label, Unit};
use std::fmt;
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
    destination: LabelId,
    kind: MessageKind,
    /// Sent: this agent; received: the CloudEvents source.
    agent: LabelId,
    /// This process's agent.
    own: LabelId,
    pull: bool,
}

/// The metrics interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    agents: LabelGuard,
    destinations: LabelGuard,
    errors: LabelGuard,
    sent: HandleCache<(LabelId, Option<LabelId>), (Counter, Histogram)>,
    consumed: HandleCache<(LabelId, bool), Counter>,
    processed: HandleCache<(LabelId, bool, Option<LabelId>), Histogram>,
    messages: HandleCache<(LabelId, MessageKind, Direction, &'static str), Counter>,
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
        "MindBus messages by agent, kind, direction and outcome"
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
    for label in ["agent", "messaging_destination_name", "error_type"] {
        metrics::counter!("mindbus_otel_label_overflow_total", "label" => label).increment(0);
    }
}

impl AgentMetrics {
    /// With [`DEFAULT_MAX_LABEL_VALUES`] distinct values per label.
    pub fn new() -> Self {
        AgentMetrics::with_max_label_values(DEFAULT_MAX_LABEL_VALUES)
    }

    /// With `cap` distinct values per content-fed label (agents,
    /// destinations, error types) before folding into `other`.
    pub fn with_max_label_values(cap: usize) -> Self {
        AgentMetrics {
            inner: Arc::new(Inner {
                agents: LabelGuard::new("agent", cap),
                destinations: LabelGuard::new("messaging_destination_name", cap),
                errors: LabelGuard::new("error_type", cap),
                sent: HandleCache::default(),
                consumed: HandleCache::default(),
                processed: HandleCache::default(),
                messages: HandleCache::default(),
                processing: HandleCache::default(),
                in_flight: HandleCache::default(),
                described: Once::new(),
            }),
        }
    }

    /// The `agent` label guard (to inspect folding).
    pub fn agents(&self) -> &LabelGuard {
        &self.inner.agents
    }

    fn destination(&self, name: &str) -> LabelId {
        if is_temporary_queue(name) {
            self.inner.destinations.id(TEMPORARY_DESTINATION)
        } else {
            self.inner.destinations.id(name)
        }
    }

    fn own_agent(&self, state: &MessageState) -> LabelId {
        self.inner.agents.id(state.agent().unwrap_or(UNKNOWN_AGENT))
    }

    /// Counts one message in `mindbus_messages_total`.
    fn count_message(
        &self,
        agent: LabelId,
        kind: MessageKind,
        dir: Direction,
        outcome: &'static str,
    ) {
        let i = &self.inner;
        i.messages.with(
            (agent, kind, dir, outcome),
            || {
                metrics::counter!(
                    MESSAGES,
                    vec![
                        Label::new("agent", i.agents.value(agent)),
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
    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        self.inner.described.call_once(describe);
        let exchange = msg.exchange();
        let destination = self.destination(if exchange.is_empty() {
            msg.routing_key()
        } else {
            exchange
        });
        let kind = msg.envelope().kind();
        let agent = self.own_agent(msg.state());
        msg.state_mut().builtin.agent = Some(Meta {
            destination,
            kind,
            agent,
            own: agent,
            pull: false,
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
            let mut labels = vec![
                Label::new("messaging_system", "rabbitmq"),
                Label::new("messaging_operation_name", "publish"),
                Label::new(
                    "messaging_destination_name",
                    i.destinations.value(meta.destination),
                ),
            ];
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
        self.count_message(meta.agent, meta.kind, Direction::Sent, outcome);
    }

    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        self.inner.described.call_once(describe);
        let destination = self.destination(msg.queue());
        let pull = msg.state().is_pull();
        let env = msg.envelope();
        let kind = env.kind();
        let source = env.source().unwrap_or(UNKNOWN_AGENT);
        let i = &self.inner;
        let agent = i.agents.id(source);
        i.consumed.with(
            (destination, pull),
            || {
                metrics::counter!(
                    CONSUMED_MESSAGES,
                    vec![
                        Label::new("messaging_system", "rabbitmq"),
                        Label::new("messaging_operation_name", operation(pull)),
                        Label::new(
                            "messaging_destination_name",
                            i.destinations.value(destination)
                        ),
                    ]
                )
            },
            |c| c.increment(1),
        );
        let own = self.own_agent(msg.state());
        self.in_flight(own, 1.0);
        msg.state_mut().builtin.agent = Some(Meta {
            destination,
            kind,
            agent,
            own,
            pull,
        });
    }

    fn on_settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        let Some(meta) = state.builtin.agent.take() else {
            return;
        };
        let i = &self.inner;
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
            (meta.destination, meta.pull, error_id),
            || {
                let mut labels = vec![
                    Label::new("messaging_system", "rabbitmq"),
                    Label::new("messaging_operation_name", operation(meta.pull)),
                    Label::new(
                        "messaging_destination_name",
                        i.destinations.value(meta.destination),
                    ),
                ];
                if let Some(e) = error_id {
                    labels.push(Label::new("error_type", i.errors.value(e)));
                }
                metrics::histogram!(PROCESS_DURATION, labels)
            },
            |h| h.record(elapsed),
        );
        let outcome = if not_applied || settlement.error.is_some() {
            Outcome::Unsettled.as_str()
        } else {
            settlement.outcome.as_str()
        };
        self.count_message(meta.agent, meta.kind, Direction::Received, outcome);
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
