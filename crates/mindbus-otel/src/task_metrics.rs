//! [`TaskMetrics`]: AI_TEAM task and LLM metrics derived from MindBus
//! traffic itself, with the names the AI_TEAM dashboards use.
//!
//! Put it on the orchestrator's channels (the side that sends COMMANDs and
//! receives RESULT/ERROR). Everything is counted on that side only, so an
//! agent and an orchestrator sharing one metrics registry never count a
//! task twice.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ai_team_tasks_total` | counter | `status` = `pending`, `completed`, `failed`, `expired` | pending when a COMMAND is sent; completed / failed when its RESULT / ERROR is received; expired when its `expiration` passes with no reply |
//! | `ai_team_tasks_in_progress` | gauge | | COMMANDs awaiting a reply |
//! | `ai_team_task_duration_seconds` | histogram | `task_type` (= `data.action`) | COMMAND sent to RESULT/ERROR received |
//! | `ai_team_llm_calls_total` | counter | `model`, `agent` | RESULTs with `data.metrics` |
//! | `ai_team_llm_tokens_total` | counter | `model`, `agent` | `data.metrics.tokens_used` |
//! | `ai_team_llm_cost_dollars_total` | gauge, only increasing (the facade's counters are integers) | `model` | `data.metrics.cost_usd` or `estimated_cost_usd`, in dollars |
//! | `ai_team_llm_latency_seconds` | histogram | `model` | `data.metrics.latency_ms`, else `data.execution_time_ms` |
//! | `ai_team_quality_score` | histogram | `agent` | `data.output.quality_score` (buckets 0,2,4,6,8,10 in the exporter), by the agent whose work was reviewed |
//! | `ai_team_agent_errors_total` | counter | `agent`, `code` | ERROR messages received, by sender and `data.error.code` |
//! | `mindbus_otel_task_fields_missing_total` | counter | `field` | RESULT/ERROR fields that were absent or malformed (skipped) |
//!
//! A RESULT or ERROR is matched to its COMMAND by `correlation_id` (the
//! reference client uses the COMMAND's CloudEvents `id`). A COMMAND enters
//! the table when its publish starts, so a reply that arrives before the
//! publish result (confirms awaited in batches, or a slow wake-up after the
//! write) still ends it with a duration; a publish that fails or is nacked
//! takes it out again and is not counted as pending. The pending table
//! is bounded ([`TaskMetrics::max_pending`]); entries leave it on reply, on
//! expiry (the COMMAND's `expiration`, default 300 s, at most one hour) or
//! when evicted as the oldest of a full table (counted as expired). A reply
//! with no pending COMMAND (sent before a restart, or by another process)
//! still counts as completed/failed, without a duration, unless it is a
//! redelivery.
//!
//! The quality score's `agent` is the agent whose work was reviewed, not the
//! reviewer: the sender of the task's latest RESULT without a score, found
//! by the CloudEvents `subject` (the business task id) that both RESULTs
//! carry. Those senders are kept in a bounded table (as many subjects as
//! [`TaskMetrics::max_pending`], each for at most [`MAX_TTL`]); a score
//! whose task is unknown (no subject, or its work RESULT was not seen here)
//! counts under `agent="unknown"`.

use crate::envelope::MessageKind;
use crate::interceptor::Interceptor;
use crate::labels::{DEFAULT_MAX_LABEL_VALUES, HandleCache, LabelGuard, LabelId, PreHashedMap};
use crate::message::{IncomingMessage, MessageState, OutgoingMessage, PublishResult};
use metrics::{Counter, Gauge, Histogram, Label, Unit};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `ai_team_tasks_total`.
pub const TASKS: &str = "ai_team_tasks_total";
/// `ai_team_tasks_in_progress`.
pub const TASKS_IN_PROGRESS: &str = "ai_team_tasks_in_progress";
/// `ai_team_task_duration_seconds`.
pub const TASK_DURATION: &str = "ai_team_task_duration_seconds";
/// `ai_team_llm_calls_total`.
pub const LLM_CALLS: &str = "ai_team_llm_calls_total";
/// `ai_team_llm_tokens_total`.
pub const LLM_TOKENS: &str = "ai_team_llm_tokens_total";
/// `ai_team_llm_cost_dollars_total`.
pub const LLM_COST: &str = "ai_team_llm_cost_dollars_total";
/// `ai_team_llm_latency_seconds`.
pub const LLM_LATENCY: &str = "ai_team_llm_latency_seconds";
/// `ai_team_quality_score`.
pub const QUALITY_SCORE: &str = "ai_team_quality_score";
/// `ai_team_agent_errors_total`.
pub const AGENT_ERRORS: &str = "ai_team_agent_errors_total";
/// `mindbus_otel_task_fields_missing_total`.
pub const FIELDS_MISSING: &str = "mindbus_otel_task_fields_missing_total";

/// Default bound of the pending-COMMAND table.
pub const DEFAULT_MAX_PENDING: usize = 10_000;
/// The protocol's default COMMAND TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The protocol's longest COMMAND TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

const STATUSES: [&str; 4] = ["pending", "completed", "failed", "expired"];

struct Pending {
    sent: Instant,
    deadline: Instant,
    action: LabelId,
}

struct Table {
    hasher: RandomState,
    entries: PreHashedMap<Pending>,
    /// (deadline, key), earliest first; pairs whose entry is gone are
    /// skipped when popped, and the heap is rebuilt when they pile up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
}

/// Who did the work of each recent task: the sender of its latest RESULT
/// without a quality score, by a keyed hash of its `subject`.
struct Workers {
    hasher: RandomState,
    /// Subject key -> (worker, when recorded).
    by_subject: PreHashedMap<(LabelId, Instant)>,
    /// (when recorded, key), oldest first; a pair whose entry was recorded
    /// again later is skipped when it comes out.
    order: VecDeque<(Instant, u64)>,
}

impl Workers {
    /// Drops entries older than [`MAX_TTL`] and, past `max`, the oldest.
    fn trim(&mut self, now: Instant, max: usize) {
        while let Some(&(at, key)) = self.order.front() {
            let live = self.by_subject.get(&key).is_some_and(|e| e.1 == at);
            let expired = now.saturating_duration_since(at) > MAX_TTL;
            if live && !expired && self.by_subject.len() <= max {
                break;
            }
            self.order.pop_front();
            if live {
                self.by_subject.remove(&key);
            }
        }
    }
}

/// Handles made on first use, so a recorder installed after construction
/// (but before traffic) is the one used.
struct Handles {
    tasks: [Counter; 4],
    in_progress: Gauge,
}

/// The task-metrics interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct TaskMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    max_pending: usize,
    table: Mutex<Table>,
    workers: Mutex<Workers>,
    actions: LabelGuard,
    models: LabelGuard,
    agents: LabelGuard,
    codes: LabelGuard,
    handles: OnceLock<Handles>,
    durations: HandleCache<LabelId, Histogram>,
    llm: HandleCache<(LabelId, LabelId), (Counter, Counter)>,
    per_model: HandleCache<LabelId, (Gauge, Histogram)>,
    errors: HandleCache<(LabelId, LabelId), Counter>,
    quality: HandleCache<LabelId, Histogram>,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        TaskMetrics::new()
    }
}

impl fmt::Debug for TaskMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskMetrics")
            .field("pending", &self.pending())
            .field("max_pending", &self.inner.max_pending)
            .finish_non_exhaustive()
    }
}

fn describe() {
    metrics::describe_counter!(
        TASKS,
        Unit::Count,
        "AI_TEAM tasks by status (from COMMAND/RESULT/ERROR traffic)"
    );
    metrics::describe_gauge!(
        TASKS_IN_PROGRESS,
        Unit::Count,
        "COMMANDs awaiting a RESULT or ERROR"
    );
    metrics::describe_histogram!(
        TASK_DURATION,
        Unit::Seconds,
        "COMMAND sent to RESULT/ERROR received, by action"
    );
    metrics::describe_counter!(
        LLM_CALLS,
        Unit::Count,
        "LLM calls reported in RESULT data.metrics"
    );
    metrics::describe_counter!(
        LLM_TOKENS,
        Unit::Count,
        "LLM tokens reported in RESULT data.metrics"
    );
    metrics::describe_gauge!(
        LLM_COST,
        "LLM cost in US dollars reported in RESULT data.metrics"
    );
    metrics::describe_histogram!(
        LLM_LATENCY,
        Unit::Seconds,
        "LLM latency from RESULT data.metrics.latency_ms or data.execution_time_ms"
    );
    metrics::describe_histogram!(
        QUALITY_SCORE,
        "Quality score (0-10) from RESULT data.output.quality_score"
    );
    metrics::describe_counter!(
        AGENT_ERRORS,
        Unit::Count,
        "ERROR messages by sending agent and google.rpc code"
    );
    metrics::describe_counter!(
        FIELDS_MISSING,
        Unit::Count,
        "RESULT/ERROR fields absent or malformed, skipped"
    );
}

fn missing(field: &'static str) {
    metrics::counter!(FIELDS_MISSING, "field" => field).increment(1);
}

impl TaskMetrics {
    /// With the default bounds.
    pub fn new() -> Self {
        TaskMetrics::with_limits(DEFAULT_MAX_PENDING, DEFAULT_MAX_LABEL_VALUES)
    }

    /// With a pending-table bound and a per-label cap on distinct values
    /// (actions, models, agents, codes).
    pub fn with_limits(max_pending: usize, max_label_values: usize) -> Self {
        TaskMetrics {
            inner: Arc::new(Inner {
                max_pending,
                table: Mutex::new(Table {
                    hasher: RandomState::new(),
                    entries: PreHashedMap::default(),
                    deadlines: BinaryHeap::new(),
                }),
                workers: Mutex::new(Workers {
                    hasher: RandomState::new(),
                    by_subject: PreHashedMap::default(),
                    order: VecDeque::new(),
                }),
                actions: LabelGuard::new("task_type", max_label_values),
                models: LabelGuard::new("model", max_label_values),
                agents: LabelGuard::new("agent", max_label_values),
                codes: LabelGuard::new("code", max_label_values),
                handles: OnceLock::new(),
                durations: HandleCache::default(),
                llm: HandleCache::default(),
                per_model: HandleCache::default(),
                errors: HandleCache::default(),
                quality: HandleCache::default(),
            }),
        }
    }

    /// Tasks whose worker is remembered now.
    pub fn subjects(&self) -> usize {
        self.inner
            .workers
            .lock()
            .map(|w| w.by_subject.len())
            .unwrap_or(0)
    }

    /// Records `agent` as the worker of `subject`'s task.
    fn work_done(&self, subject: &str, agent: LabelId, now: Instant) {
        let Ok(mut w) = self.inner.workers.lock() else {
            return;
        };
        let key = w.hasher.hash_one(subject);
        w.by_subject.insert(key, (agent, now));
        w.order.push_back((now, key));
        w.trim(now, self.inner.max_pending);
    }

    /// The worker of `subject`'s task, if remembered.
    fn worker_of(&self, subject: &str, now: Instant) -> Option<LabelId> {
        let mut w = self.inner.workers.lock().ok()?;
        w.trim(now, self.inner.max_pending);
        let key = w.hasher.hash_one(subject);
        w.by_subject.get(&key).map(|e| e.0)
    }

    /// Bound of the pending-COMMAND table (see [`TaskMetrics::with_limits`]).
    pub fn max_pending(&self) -> usize {
        self.inner.max_pending
    }

    /// COMMANDs awaiting a reply now (expired entries are swept first).
    pub fn pending(&self) -> usize {
        match self.inner.table.lock() {
            Ok(mut t) => {
                self.sweep(&mut t, Instant::now());
                t.entries.len()
            }
            Err(_) => 0,
        }
    }

    fn handles(&self) -> &Handles {
        self.inner.handles.get_or_init(|| {
            describe();
            Handles {
                tasks: STATUSES.map(|s| metrics::counter!(TASKS, "status" => s)),
                in_progress: metrics::gauge!(TASKS_IN_PROGRESS),
            }
        })
    }

    fn status(&self, i: usize) -> &Counter {
        &self.handles().tasks[i]
    }

    fn in_progress(&self, n: usize) {
        self.handles().in_progress.set(n as f64);
    }

    /// Removes expired entries (counted `expired`); `now` is passed in so
    /// one clock read serves a whole hook.
    fn sweep(&self, t: &mut Table, now: Instant) {
        while let Some(&Reverse((deadline, key))) = t.deadlines.peek() {
            if deadline > now {
                break;
            }
            t.deadlines.pop();
            if t.entries.get(&key).is_some_and(|p| p.deadline == deadline) {
                t.entries.remove(&key);
                self.status(3).increment(1);
            }
        }
        // Replies leave stale pairs behind: rebuild before they pile up.
        if t.deadlines.len() > 2 * self.inner.max_pending.max(16) {
            let live: BinaryHeap<_> = t
                .entries
                .iter()
                .map(|(k, p)| Reverse((p.deadline, *k)))
                .collect();
            t.deadlines = live;
        }
        self.in_progress(t.entries.len());
    }

    /// Registers a COMMAND about to be sent; returns its table key and
    /// deadline, which identify the entry (see [`TaskMetrics::command_failed`]).
    fn command_sent(
        &self,
        correlation_id: &str,
        action: LabelId,
        ttl: Duration,
        now: Instant,
    ) -> Option<(u64, Instant)> {
        let Ok(mut t) = self.inner.table.lock() else {
            return None;
        };
        self.sweep(&mut t, now);
        let key = t.hasher.hash_one(correlation_id);
        // Full: evict the live entry closest to expiry (counted as expired).
        while t.entries.len() >= self.inner.max_pending && !t.entries.contains_key(&key) {
            let Some(Reverse((deadline, old))) = t.deadlines.pop() else {
                break;
            };
            if t.entries.get(&old).is_some_and(|p| p.deadline == deadline) {
                t.entries.remove(&old);
                self.status(3).increment(1);
            }
        }
        if self.inner.max_pending == 0 {
            return None;
        }
        let deadline = now + ttl;
        t.entries.insert(
            key,
            Pending {
                sent: now,
                deadline,
                action,
            },
        );
        t.deadlines.push(Reverse((deadline, key)));
        self.in_progress(t.entries.len());
        Some((key, deadline))
    }

    /// A registered COMMAND whose publish failed (or was nacked) leaves the
    /// table, unless it is gone already: then it did reach an agent (its
    /// reply came first) or it expired, and it counts as sent. Returns true
    /// when the COMMAND counts as sent.
    fn command_failed(&self, key: u64, deadline: Instant) -> bool {
        let Ok(mut t) = self.inner.table.lock() else {
            return false;
        };
        if t.entries.get(&key).is_some_and(|p| p.deadline == deadline) {
            t.entries.remove(&key);
            self.in_progress(t.entries.len());
            return false;
        }
        true
    }

    /// `now`: when the reply was received.
    fn reply_received(&self, correlation_id: &str, now: Instant) -> Option<Pending> {
        let mut t = self.inner.table.lock().ok()?;
        self.sweep(&mut t, now);
        let key = t.hasher.hash_one(correlation_id);
        let p = t.entries.remove(&key);
        self.in_progress(t.entries.len());
        p
    }
}

fn ttl_of(expiration: Option<&str>) -> Duration {
    expiration
        .and_then(|e| e.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TTL)
        .min(MAX_TTL)
}

/// A COMMAND being sent: registered in the table before the publish (so a
/// reply that overtakes the publish result still finds it), and counted as
/// pending once the publish succeeds.
pub(crate) struct CommandOut {
    /// Its table key and deadline (`None` when the table holds nothing).
    registered: Option<(u64, Instant)>,
}

impl Interceptor for TaskMetrics {
    fn builtin_slot(&self) -> Option<&'static str> {
        Some("TaskMetrics")
    }

    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        let props = msg.properties();
        let correlation_id = props
            .correlation_id()
            .as_ref()
            .or(props.message_id().as_ref())
            .map(|c| c.as_str());
        let ttl = ttl_of(props.expiration().as_ref().map(|e| e.as_str()));
        // The chain's clock reading for this publish (no second one).
        let now = msg.state().started();
        let env = msg.envelope();
        if env.kind() != MessageKind::Command {
            return;
        }
        let Some(correlation_id) = correlation_id.or(env.id()) else {
            missing("correlation_id");
            return;
        };
        let action = self.inner.actions.id(env.action().unwrap_or("unknown"));
        // Registered now, not when the publish result comes: with confirms
        // awaited in batches (or a slow wake-up after the write), the reply
        // can be delivered before the result hook runs.
        let registered = self.command_sent(correlation_id, action, ttl, now);
        msg.state_mut().builtin.task = Some(CommandOut { registered });
    }

    fn on_publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        let Some(out) = state.builtin.task.take() else {
            return;
        };
        let ok = match result {
            PublishResult::Failed(_) => false,
            PublishResult::Confirmed(c) => !c.is_nack(),
            _ => true,
        };
        let sent = match (ok, out.registered) {
            (true, _) => true,
            (false, Some((key, deadline))) => self.command_failed(key, deadline),
            (false, None) => false,
        };
        if sent {
            self.status(0).increment(1);
        }
    }

    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        let delivery = msg.delivery();
        let redelivered = delivery.redelivered;
        let correlation_id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str());
        let received = msg.state().started();
        let env = msg.envelope();
        let kind = env.kind();
        if !matches!(kind, MessageKind::Result | MessageKind::Error) {
            return;
        }
        let i = &self.inner;
        let agent = i.agents.id(env.source().unwrap_or("unknown"));
        if kind == MessageKind::Error {
            let code = match env.error_code() {
                Some(c) => c,
                None => {
                    missing("error.code");
                    "UNKNOWN"
                }
            };
            let code = i.codes.id(code);
            i.errors.with(
                (agent, code),
                || {
                    metrics::counter!(
                        AGENT_ERRORS,
                        vec![
                            Label::new("agent", i.agents.value(agent)),
                            Label::new("code", i.codes.value(code)),
                        ]
                    )
                },
                |c| c.increment(1),
            );
        }

        // The task this reply ends.
        let status = if kind == MessageKind::Result { 1 } else { 2 };
        match correlation_id.map(|c| self.reply_received(c, received)) {
            Some(Some(pending)) => {
                self.status(status).increment(1);
                let action = pending.action;
                let took = received.saturating_duration_since(pending.sent);
                i.durations.with(
                    action,
                    || {
                        metrics::histogram!(
                            TASK_DURATION,
                            vec![Label::new("task_type", i.actions.value(action),)]
                        )
                    },
                    |h| h.record(took.as_secs_f64()),
                );
            }
            Some(None) if !redelivered => self.status(status).increment(1),
            Some(None) => {}
            None => {
                if kind == MessageKind::Result {
                    missing("correlation_id");
                }
            }
        }

        if kind != MessageKind::Result {
            return;
        }
        match (env.quality_score(), env.subject()) {
            (Some(score), subject) if (0.0..=10.0).contains(&score) => {
                let worker = subject
                    .and_then(|s| self.worker_of(s, received))
                    .unwrap_or_else(|| i.agents.id("unknown"));
                i.quality.with(
                    worker,
                    || {
                        metrics::histogram!(
                            QUALITY_SCORE,
                            vec![Label::new("agent", i.agents.value(worker))]
                        )
                    },
                    |h| h.record(score),
                );
            }
            (Some(_), _) => missing("output.quality_score"),
            (None, Some(subject)) => self.work_done(subject, agent, received),
            (None, None) => {}
        }
        if !env.has_metrics() {
            return;
        }
        let model = match env.model() {
            Some(m) => m,
            None => {
                missing("metrics.model");
                "unknown"
            }
        };
        let model = i.models.id(model);
        let tokens_used = env.tokens_used().filter(|t| *t >= 0.0);
        let make = || {
            let labels = vec![
                Label::new("model", i.models.value(model)),
                Label::new("agent", i.agents.value(agent)),
            ];
            (
                metrics::counter!(LLM_CALLS, labels.clone()),
                metrics::counter!(LLM_TOKENS, labels),
            )
        };
        i.llm.with((model, agent), make, |(calls, tokens)| {
            calls.increment(1);
            if let Some(t) = tokens_used {
                tokens.increment(t as u64);
            }
        });
        if tokens_used.is_none() {
            missing("metrics.tokens_used");
        }
        // The facade's counters are integers: dollars are fractional, so
        // cost is a gauge that only ever increases (rate()/increase() work
        // on it as on a counter).
        let cost_usd = env.cost_usd().filter(|c| *c >= 0.0);
        let latency_ms = env
            .latency_ms()
            .or(env.execution_time_ms())
            .filter(|ms| *ms >= 0.0);
        let make = || {
            let labels = vec![Label::new("model", i.models.value(model))];
            (
                metrics::gauge!(LLM_COST, labels.clone()),
                metrics::histogram!(LLM_LATENCY, labels),
            )
        };
        i.per_model.with(model, make, |(cost, latency)| {
            if let Some(c) = cost_usd {
                cost.increment(c);
            }
            if let Some(ms) = latency_ms {
                latency.record(ms / 1000.0);
            }
        });
        if cost_usd.is_none() {
            missing("metrics.cost_usd");
        }
        if latency_ms.is_none() {
            missing("metrics.latency_ms");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interceptor::InterceptorChain;
    use crate::message::{Outcome, Settlement};
    use lapin::BasicProperties;
    use lapin::message::Delivery;
    use lapin::options::BasicPublishOptions;

    const ID: &str = "5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01";

    fn command() -> Vec<u8> {
        format!(
            r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator","id":"{ID}","data":{{"action":"generate_article"}}}}"#
        )
        .into_bytes()
    }

    fn result() -> Delivery {
        let body = br#"{"specversion":"1.0","type":"ai.team.result","source":"agent.writer","id":"r-1","data":{"status":"SUCCESS"}}"#;
        let mut d = Delivery::mock(
            1,
            "".into(),
            "orchestrator.results".into(),
            false,
            body.to_vec(),
        );
        d.properties = BasicProperties::default().with_correlation_id(ID.into());
        d
    }

    /// Publishes a COMMAND through `chain` up to (not including) its
    /// publish result.
    fn start_command(chain: &InterceptorChain) -> MessageState {
        let props = BasicProperties::default().with_correlation_id(ID.into());
        let (_, state) = chain.start_publish(
            "mindbus.main",
            "cmd.writer.any",
            BasicPublishOptions::default(),
            &command(),
            props,
        );
        state
    }

    /// Runs `f` with a Prometheus recorder and returns what it rendered.
    fn with_metrics(f: impl FnOnce()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    fn sample(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// `ai_team_tasks_total{status}` in a rendering.
    fn tasks(text: &str, status: &str) -> Option<f64> {
        sample(text, &format!("ai_team_tasks_total{{status=\"{status}\"}}"))
    }

    fn deliver_result(chain: &InterceptorChain) {
        let mut reply = chain.start_delivery(&result(), "orchestrator.results", false);
        chain.end_delivery(&mut reply, &Settlement::new(Outcome::Acked));
    }

    fn publish_fails(chain: &InterceptorChain, state: &mut MessageState) {
        let error: lapin::Error = lapin::ErrorKind::FutureCompleted.into();
        chain.end_publish(state, &PublishResult::Failed(&error));
    }

    /// Runs `f` on a chain of one `TaskMetrics`; returns the rendering.
    fn scenario(f: impl FnOnce(&TaskMetrics, &InterceptorChain)) -> String {
        with_metrics(|| {
            let tm = TaskMetrics::new();
            let chain = InterceptorChain::new(vec![Arc::new(tm.clone())], None);
            f(&tm, &chain);
        })
    }

    #[test]
    fn a_reply_that_overtakes_the_publish_result_ends_its_task() {
        let text = scenario(|tm, chain| {
            let mut state = start_command(chain);
            assert_eq!(tm.pending(), 1, "registered before the publish returns");
            // The RESULT is delivered before the confirm is awaited.
            deliver_result(chain);
            assert_eq!(tm.pending(), 0);
            chain.end_publish(&mut state, &PublishResult::Sent);
            assert_eq!(tm.pending(), 0, "the late publish result adds nothing");
        });
        let count = r#"ai_team_task_duration_seconds_count{task_type="generate_article"}"#;
        assert_eq!(sample(&text, count), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "pending"), Some(1.0));
        assert_eq!(tasks(&text, "completed"), Some(1.0));
        assert_eq!(sample(&text, "ai_team_tasks_in_progress"), Some(0.0));
    }

    #[test]
    fn a_failed_publish_leaves_no_task_behind() {
        let text = scenario(|tm, chain| {
            let mut state = start_command(chain);
            publish_fails(chain, &mut state);
            assert_eq!(tm.pending(), 0);
        });
        assert_eq!(tasks(&text, "pending"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "ai_team_tasks_in_progress"), Some(0.0));
    }

    #[test]
    fn a_failed_publish_whose_reply_came_first_still_counts_as_sent() {
        let text = scenario(|tm, chain| {
            let mut state = start_command(chain);
            deliver_result(chain);
            publish_fails(chain, &mut state);
            assert_eq!(tm.pending(), 0);
        });
        assert_eq!(tasks(&text, "pending"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(1.0));
    }

    /// A RESULT from `source` about `subject`, with a quality score or not.
    fn deliver(chain: &InterceptorChain, source: &str, subject: Option<&str>, score: Option<f64>) {
        let subject = subject.map_or(String::new(), |s| format!(r#","subject":"{s}""#));
        let output = score.map_or(String::new(), |q| {
            format!(r#","output":{{"quality_score":{q}}}"#)
        });
        let body = format!(
            r#"{{"specversion":"1.0","type":"ai.team.result","source":"{source}","id":"r"{subject},"data":{{"status":"SUCCESS"{output}}}}}"#
        );
        let mut d = Delivery::mock(
            1,
            "".into(),
            "orchestrator.results".into(),
            false,
            body.into_bytes(),
        );
        d.properties = BasicProperties::default().with_correlation_id("other".into());
        let mut m = chain.start_delivery(&d, "orchestrator.results", false);
        chain.end_delivery(&mut m, &Settlement::new(Outcome::Acked));
    }

    fn quality(text: &str, agent: &str) -> Option<f64> {
        sample(
            text,
            &format!("ai_team_quality_score_count{{agent=\"{agent}\"}}"),
        )
    }

    #[test]
    fn a_quality_score_counts_for_the_agent_whose_work_was_reviewed() {
        let text = scenario(|tm, chain| {
            deliver(chain, "agent.writer.001", Some("task-1"), None);
            deliver(chain, "agent.writer.002", Some("task-2"), None);
            deliver(chain, "agent.critic.001", Some("task-1"), Some(8.0));
            deliver(chain, "agent.critic.001", Some("task-2"), Some(6.0));
            // Rewritten after review: the latest worker is scored.
            deliver(chain, "agent.writer.003", Some("task-1"), None);
            deliver(chain, "agent.critic.001", Some("task-1"), Some(9.0));
            // No subject, or a task whose work was not seen here.
            deliver(chain, "agent.critic.001", None, Some(4.0));
            deliver(chain, "agent.critic.001", Some("task-9"), Some(4.0));
            assert_eq!(tm.subjects(), 2);
        });
        assert_eq!(quality(&text, "agent.writer.001"), Some(1.0), "{text}");
        assert_eq!(quality(&text, "agent.writer.002"), Some(1.0), "{text}");
        assert_eq!(quality(&text, "agent.writer.003"), Some(1.0), "{text}");
        assert_eq!(quality(&text, "unknown"), Some(2.0), "{text}");
        assert_eq!(
            quality(&text, "agent.critic.001"),
            None,
            "the reviewer is not scored"
        );
    }

    #[test]
    fn workers_are_bounded_and_expire() {
        let tm = TaskMetrics::with_limits(100, 10);
        let start = Instant::now();
        for i in 0..1_000 {
            tm.work_done(&format!("task-{i}"), 1, start);
        }
        assert_eq!(tm.subjects(), 100);
        assert_eq!(tm.worker_of("task-999", start), Some(1));
        assert_eq!(tm.worker_of("task-0", start), None, "the oldest went first");
        let later = start + MAX_TTL + Duration::from_secs(1);
        assert_eq!(tm.worker_of("task-999", later), None, "expired");
        assert_eq!(tm.subjects(), 0);
        let order = tm.inner.workers.lock().map(|w| w.order.len()).unwrap_or(0);
        assert_eq!(order, 0, "no stale pairs left behind");
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(ttl_of(None), DEFAULT_TTL);
        assert_eq!(ttl_of(Some("1500")), Duration::from_millis(1500));
        assert_eq!(ttl_of(Some("junk")), DEFAULT_TTL);
        assert_eq!(ttl_of(Some("99999999")), MAX_TTL);
    }

    #[test]
    fn the_table_is_bounded_and_expires() {
        let tm = TaskMetrics::with_limits(100, 10);
        for i in 0..10_000 {
            tm.command_sent(&format!("c{i}"), 0, Duration::from_secs(60), Instant::now());
        }
        assert_eq!(tm.pending(), 100);
        assert!(
            tm.inner
                .table
                .lock()
                .map(|t| t.deadlines.len())
                .unwrap_or(0)
                <= 200
        );
        assert!(tm.reply_received("c9999", Instant::now()).is_some());
        assert!(tm.reply_received("c0", Instant::now()).is_none(), "evicted");
        for i in 0..50 {
            tm.command_sent(
                &format!("short{i}"),
                0,
                Duration::from_millis(1),
                Instant::now(),
            );
        }
        std::thread::sleep(Duration::from_millis(5));
        // 99 left + 50 short-lived ones, each past the first evicting the
        // entry closest to expiry: the short ones themselves.
        assert_eq!(tm.pending(), 99);
    }
}
