//! [`TaskMetrics`]: AI_TEAM task, COMMAND and LLM metrics derived from
//! MindBus traffic itself, with the names the AI_TEAM dashboards use.
//!
//! Put it on the orchestrator's channels (the side that sends COMMANDs,
//! receives RESULT/ERROR and announces `evt.task.*` EVENTs). Everything is
//! counted on that side only, so an agent and an orchestrator sharing one
//! metrics registry never count a task twice.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `ai_team_tasks_total` | counter | `status` = `pending`, `completed`, `failed`, `cancelled`, `expired` | pending when a task starts (the first COMMAND of a new `subject` is sent); completed / failed / cancelled when the orchestrator publishes its `task.completed` / `task.failed` / `task.cancelled` EVENT; expired when no EVENT came within the longest TTL of its COMMANDs |
//! | `ai_team_tasks_in_progress` | gauge | | tasks started and not yet ended |
//! | `ai_team_task_duration_seconds` | histogram | `task_type` | the EVENT's `event_data.duration_seconds`, else first COMMAND sent to EVENT published |
//! | `ai_team_commands_total` | counter | `status` = `pending`, `completed`, `failed`, `expired` | pending when a COMMAND is sent; completed / failed when its RESULT / ERROR is received; expired when its `expiration` passes with no reply |
//! | `ai_team_commands_in_progress` | gauge | | COMMANDs awaiting a reply |
//! | `ai_team_command_duration_seconds` | histogram | `action` (= `data.action`) | COMMAND sent to RESULT/ERROR received |
//! | `ai_team_llm_calls_total` | counter | `model`, `agent` | RESULTs with `data.metrics` |
//! | `ai_team_llm_tokens_total` | counter | `model`, `agent` | `data.metrics.tokens_used` |
//! | `ai_team_llm_cost_dollars_total` | gauge, only increasing (the facade's counters are integers) | `model` | `data.metrics.cost_usd` or `estimated_cost_usd`, in dollars |
//! | `ai_team_llm_latency_seconds` | histogram | `model` | `data.metrics.latency_ms`, else `data.execution_time_ms` |
//! | `ai_team_quality_score` | histogram | `agent` | `data.output.quality_score` (buckets 0,2,4,6,8,10 in the exporter), by the agent whose work was reviewed |
//! | `ai_team_agent_errors_total` | counter | `agent`, `code` | ERROR messages received, by sender and `data.error.code` |
//! | `mindbus_otel_task_fields_missing_total` | counter | `field` | fields that were absent or malformed (skipped) |
//!
//! # Tasks
//!
//! A task is what the orchestrator works on: one CloudEvents `subject` (the
//! business task id), several COMMANDs, ended by the orchestrator's own
//! EVENT `task.completed`, `task.failed` or `task.cancelled` (its
//! `data.event_type`, else its routing key `evt.task.*`; the task is the
//! EVENT's `subject`, else its `event_data.task_id`). Its `task_type` is
//! the EVENT's `event_data.task_type`, else the first COMMAND's
//! `data.context.task_type`, else its `data.context.process_id`, else
//! `unknown`; never the COMMAND's action (that is the per-COMMAND view).
//!
//! The open tasks are kept in a bounded table ([`TaskMetrics::max_pending`]
//! entries); a task leaves it with its EVENT, or expires (counted
//! `expired`, no duration) once the longest TTL of its COMMANDs has passed
//! since it was sent, or is evicted as the one closest to expiry when the
//! table is full (also `expired`). An EVENT for a task not in the table
//! (started before a restart, or by another process) still counts its
//! status, with the EVENT's own duration if it gives one.
//!
//! **An orchestrator that publishes no task EVENTs** sees its tasks start
//! (`pending`, in progress) and then expire after their COMMANDs' TTL: the
//! per-COMMAND metrics are then the meaningful ones. Such an orchestrator
//! can say where a task ends with [`TaskMetrics::task`], a guard that ends
//! the task as completed, failed or cancelled (failed when dropped without
//! an outcome).
//!
//! # COMMANDs
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

use crate::envelope::{EnvelopeRef, MessageKind};
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
/// `ai_team_commands_total`.
pub const COMMANDS: &str = "ai_team_commands_total";
/// `ai_team_commands_in_progress`.
pub const COMMANDS_IN_PROGRESS: &str = "ai_team_commands_in_progress";
/// `ai_team_command_duration_seconds`.
pub const COMMAND_DURATION: &str = "ai_team_command_duration_seconds";
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

/// Default bound of the pending-COMMAND table and of the open-task table.
pub const DEFAULT_MAX_PENDING: usize = 10_000;
/// The protocol's default COMMAND TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The protocol's longest COMMAND TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

const COMMAND_STATUSES: [&str; 4] = ["pending", "completed", "failed", "expired"];
const TASK_STATUSES: [&str; 5] = ["pending", "completed", "failed", "cancelled", "expired"];

/// Indexes into the status arrays.
const PENDING: usize = 0;
const COMPLETED: usize = 1;
const FAILED: usize = 2;
const COMMAND_EXPIRED: usize = 3;
const CANCELLED: usize = 3;
const TASK_EXPIRED: usize = 4;

/// Entries with a deadline, by a keyed hash of their name; bounded by the
/// caller's `max`.
struct Expiring<T> {
    hasher: RandomState,
    entries: PreHashedMap<(Instant, T)>,
    /// (deadline, key), earliest first; pairs whose entry is gone or has a
    /// later deadline now are skipped when popped, and the heap is rebuilt
    /// when they pile up.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl<T> Expiring<T> {
    fn new() -> Self {
        Expiring {
            hasher: RandomState::new(),
            entries: PreHashedMap::default(),
            deadlines: BinaryHeap::new(),
        }
    }

    fn key(&self, name: &str) -> u64 {
        self.hasher.hash_one(name)
    }

    fn is_live(&self, deadline: Instant, key: u64) -> bool {
        self.entries.get(&key).is_some_and(|e| e.0 == deadline)
    }

    /// Removes the entries past their deadline; how many of them `counts`.
    fn sweep(&mut self, now: Instant, max: usize, counts: impl Fn(&T) -> bool) -> u64 {
        let mut expired = 0;
        while let Some(&Reverse((deadline, key))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if self.is_live(deadline, key)
                && let Some((_, value)) = self.entries.remove(&key)
            {
                expired += u64::from(counts(&value));
            }
        }
        // Removals and extensions leave stale pairs: rebuild before they
        // pile up.
        if self.deadlines.len() > 2 * max.max(16) {
            self.deadlines = self
                .entries
                .iter()
                .map(|(k, e)| Reverse((e.0, *k)))
                .collect();
        }
        expired
    }

    /// Room for `key` under `max` entries: evicts the entries closest to
    /// expiry; how many of them `counts`.
    fn make_room(&mut self, key: u64, max: usize, counts: impl Fn(&T) -> bool) -> u64 {
        let mut evicted = 0;
        while self.entries.len() >= max && !self.entries.contains_key(&key) {
            let Some(Reverse((deadline, old))) = self.deadlines.pop() else {
                break;
            };
            if self.is_live(deadline, old)
                && let Some((_, value)) = self.entries.remove(&old)
            {
                evicted += u64::from(counts(&value));
            }
        }
        evicted
    }

    fn insert(&mut self, key: u64, deadline: Instant, value: T) {
        self.entries.insert(key, (deadline, value));
        self.deadlines.push(Reverse((deadline, key)));
    }

    /// Moves a live entry's deadline later (never earlier).
    fn extend(&mut self, key: u64, deadline: Instant) {
        if let Some(e) = self.entries.get_mut(&key)
            && deadline > e.0
        {
            e.0 = deadline;
            self.deadlines.push(Reverse((deadline, key)));
        }
    }
}

/// A COMMAND awaiting its reply.
struct Pending {
    sent: Instant,
    action: LabelId,
}

/// An open task.
struct Task {
    /// When its first COMMAND was sent (or [`TaskMetrics::task`] called):
    /// also what tells this task from a later one with the same subject.
    started: Instant,
    task_type: LabelId,
    /// Its COMMANDs whose publish has not returned yet.
    publishing: u32,
    /// Whether it counts as started (`pending`): one of its COMMANDs was
    /// sent, or it was opened explicitly.
    counted: bool,
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
    commands: [Counter; 4],
    commands_in_progress: Gauge,
    tasks: [Counter; 5],
    tasks_in_progress: Gauge,
}

/// The task-metrics interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct TaskMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    max_pending: usize,
    commands: Mutex<Expiring<Pending>>,
    tasks: Mutex<Expiring<Task>>,
    workers: Mutex<Workers>,
    actions: LabelGuard,
    task_types: LabelGuard,
    models: LabelGuard,
    agents: LabelGuard,
    codes: LabelGuard,
    handles: OnceLock<Handles>,
    command_durations: HandleCache<LabelId, Histogram>,
    task_durations: HandleCache<LabelId, Histogram>,
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
            .field("open_tasks", &self.open_tasks())
            .field("max_pending", &self.inner.max_pending)
            .finish_non_exhaustive()
    }
}

fn describe() {
    metrics::describe_counter!(
        TASKS,
        Unit::Count,
        "AI_TEAM tasks (one subject, ended by its evt.task.* EVENT) by status"
    );
    metrics::describe_gauge!(
        TASKS_IN_PROGRESS,
        Unit::Count,
        "AI_TEAM tasks started and not yet ended"
    );
    metrics::describe_histogram!(
        TASK_DURATION,
        Unit::Seconds,
        "First COMMAND of a task to its evt.task.* EVENT, by task type"
    );
    metrics::describe_counter!(
        COMMANDS,
        Unit::Count,
        "COMMANDs by status (from COMMAND/RESULT/ERROR traffic)"
    );
    metrics::describe_gauge!(
        COMMANDS_IN_PROGRESS,
        Unit::Count,
        "COMMANDs awaiting a RESULT or ERROR"
    );
    metrics::describe_histogram!(
        COMMAND_DURATION,
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
        "MindBus message fields absent or malformed, skipped"
    );
}

fn missing(field: &'static str) {
    metrics::counter!(FIELDS_MISSING, "field" => field).increment(1);
}

/// How a task ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TaskEnd {
    Completed,
    Failed,
    Cancelled,
}

impl TaskEnd {
    /// From an EVENT's `data.event_type` (`task.completed`, ...).
    fn from_event(name: &str) -> Option<TaskEnd> {
        match name {
            "task.completed" => Some(TaskEnd::Completed),
            "task.failed" => Some(TaskEnd::Failed),
            "task.cancelled" => Some(TaskEnd::Cancelled),
            _ => None,
        }
    }

    fn status(self) -> usize {
        match self {
            TaskEnd::Completed => COMPLETED,
            TaskEnd::Failed => FAILED,
            TaskEnd::Cancelled => CANCELLED,
        }
    }
}

impl TaskMetrics {
    /// With the default bounds.
    pub fn new() -> Self {
        TaskMetrics::with_limits(DEFAULT_MAX_PENDING, DEFAULT_MAX_LABEL_VALUES)
    }

    /// With a bound on the pending-COMMAND table and on the open-task table,
    /// and a per-label cap on distinct values (actions, task types, models,
    /// agents, codes).
    pub fn with_limits(max_pending: usize, max_label_values: usize) -> Self {
        TaskMetrics {
            inner: Arc::new(Inner {
                max_pending,
                commands: Mutex::new(Expiring::new()),
                tasks: Mutex::new(Expiring::new()),
                workers: Mutex::new(Workers {
                    hasher: RandomState::new(),
                    by_subject: PreHashedMap::default(),
                    order: VecDeque::new(),
                }),
                actions: LabelGuard::new("action", max_label_values),
                task_types: LabelGuard::new("task_type", max_label_values),
                models: LabelGuard::new("model", max_label_values),
                agents: LabelGuard::new("agent", max_label_values),
                codes: LabelGuard::new("code", max_label_values),
                handles: OnceLock::new(),
                command_durations: HandleCache::default(),
                task_durations: HandleCache::default(),
                llm: HandleCache::default(),
                per_model: HandleCache::default(),
                errors: HandleCache::default(),
                quality: HandleCache::default(),
            }),
        }
    }

    /// Opens the task `subject` explicitly, for an orchestrator that
    /// publishes no `evt.task.*` EVENTs: counted `pending` now (unless a
    /// COMMAND of it was sent already), and ended by the guard as
    /// completed, failed or cancelled (failed if dropped without an
    /// outcome), with its duration. An EVENT for the same task ends it
    /// first; the guard then counts nothing more.
    ///
    /// ```
    /// # use mindbus_otel::TaskMetrics;
    /// let metrics = TaskMetrics::default();
    /// let task = metrics.task("task-article-555", "article");
    /// // ... COMMANDs with subject "task-article-555", their replies ...
    /// task.completed();
    /// ```
    pub fn task(&self, subject: &str, task_type: &str) -> TaskGuard {
        let now = Instant::now();
        let started = self.open_task(subject, task_type, MAX_TTL, now, true);
        TaskGuard {
            metrics: self.clone(),
            key: started.map(|s| s.0),
            started: started.map_or(now, |s| s.1),
            ended: false,
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

    /// Bound of the pending-COMMAND table and of the open-task table (see
    /// [`TaskMetrics::with_limits`]).
    pub fn max_pending(&self) -> usize {
        self.inner.max_pending
    }

    /// COMMANDs awaiting a reply now (expired entries are swept first).
    pub fn pending(&self) -> usize {
        match self.inner.commands.lock() {
            Ok(mut t) => {
                self.sweep_commands(&mut t, Instant::now());
                t.entries.len()
            }
            Err(_) => 0,
        }
    }

    /// Tasks started and not ended now (expired ones are swept first).
    pub fn open_tasks(&self) -> usize {
        match self.inner.tasks.lock() {
            Ok(mut t) => {
                self.sweep_tasks(&mut t, Instant::now());
                t.entries.len()
            }
            Err(_) => 0,
        }
    }

    fn handles(&self) -> &Handles {
        self.inner.handles.get_or_init(|| {
            describe();
            Handles {
                commands: COMMAND_STATUSES.map(|s| metrics::counter!(COMMANDS, "status" => s)),
                commands_in_progress: metrics::gauge!(COMMANDS_IN_PROGRESS),
                tasks: TASK_STATUSES.map(|s| metrics::counter!(TASKS, "status" => s)),
                tasks_in_progress: metrics::gauge!(TASKS_IN_PROGRESS),
            }
        })
    }

    fn command_status(&self, i: usize, n: u64) {
        if n > 0 {
            self.handles().commands[i].increment(n);
        }
    }

    fn task_status(&self, i: usize, n: u64) {
        if n > 0 {
            self.handles().tasks[i].increment(n);
        }
    }

    /// Removes expired COMMANDs (counted `expired`); `now` is passed in so
    /// one clock read serves a whole hook.
    fn sweep_commands(&self, t: &mut Expiring<Pending>, now: Instant) {
        let expired = t.sweep(now, self.inner.max_pending, |_| true);
        self.command_status(COMMAND_EXPIRED, expired);
        self.handles()
            .commands_in_progress
            .set(t.entries.len() as f64);
    }

    /// Removes expired tasks (counted `expired` when they had started: the
    /// others never reached the bus).
    fn sweep_tasks(&self, t: &mut Expiring<Task>, now: Instant) {
        let expired = t.sweep(now, self.inner.max_pending, |task| task.counted);
        self.task_status(TASK_EXPIRED, expired);
        self.handles().tasks_in_progress.set(t.entries.len() as f64);
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
        let Ok(mut t) = self.inner.commands.lock() else {
            return None;
        };
        self.sweep_commands(&mut t, now);
        let key = t.key(correlation_id);
        // Full: evict the live entries closest to expiry (counted as expired).
        let evicted = t.make_room(key, self.inner.max_pending, |_| true);
        self.command_status(COMMAND_EXPIRED, evicted);
        if self.inner.max_pending == 0 {
            return None;
        }
        let deadline = now + ttl;
        t.insert(key, deadline, Pending { sent: now, action });
        self.handles()
            .commands_in_progress
            .set(t.entries.len() as f64);
        Some((key, deadline))
    }

    /// A registered COMMAND whose publish failed (or was nacked) leaves the
    /// table, unless it is gone already: then it did reach an agent (its
    /// reply came first) or it expired, and it counts as sent. Returns true
    /// when the COMMAND counts as sent.
    fn command_failed(&self, key: u64, deadline: Instant) -> bool {
        let Ok(mut t) = self.inner.commands.lock() else {
            return false;
        };
        if t.is_live(deadline, key) {
            t.entries.remove(&key);
            self.handles()
                .commands_in_progress
                .set(t.entries.len() as f64);
            return false;
        }
        true
    }

    /// `now`: when the reply was received.
    fn reply_received(&self, correlation_id: &str, now: Instant) -> Option<Pending> {
        let mut t = self.inner.commands.lock().ok()?;
        self.sweep_commands(&mut t, now);
        let key = t.key(correlation_id);
        let p = t.entries.remove(&key).map(|e| e.1);
        self.handles()
            .commands_in_progress
            .set(t.entries.len() as f64);
        p
    }

    /// Opens the task `subject`, or keeps an open one alive until at least
    /// `now + ttl`. `explicit`: opened by [`TaskMetrics::task`] (counted
    /// now), else by a COMMAND being published (counted when it is sent).
    /// `task_type` is looked up only when the task opens: a task's later
    /// COMMANDs do not pay for it. Returns the task's key and start.
    fn open_task(
        &self,
        subject: &str,
        task_type: &str,
        ttl: Duration,
        now: Instant,
        explicit: bool,
    ) -> Option<(u64, Instant)> {
        let mut t = self.inner.tasks.lock().ok()?;
        self.sweep_tasks(&mut t, now);
        let key = t.key(subject);
        let deadline = now + ttl;
        let started = match t.entries.get_mut(&key) {
            Some((_, task)) => {
                task.publishing += u32::from(!explicit);
                if explicit && !task.counted {
                    task.counted = true;
                    self.task_status(PENDING, 1);
                }
                let started = task.started;
                t.extend(key, deadline);
                started
            }
            None => {
                let evicted = t.make_room(key, self.inner.max_pending, |task| task.counted);
                self.task_status(TASK_EXPIRED, evicted);
                if self.inner.max_pending == 0 {
                    return None;
                }
                t.insert(
                    key,
                    deadline,
                    Task {
                        started: now,
                        task_type: self.inner.task_types.id(task_type),
                        publishing: u32::from(!explicit),
                        counted: explicit,
                    },
                );
                if explicit {
                    self.task_status(PENDING, 1);
                }
                now
            }
        };
        self.handles().tasks_in_progress.set(t.entries.len() as f64);
        Some((key, started))
    }

    /// The publish of a COMMAND of the task `(key, started)` returned: a
    /// task counts as started with its first COMMAND sent; one none of
    /// whose COMMANDs was sent leaves the table with the last failure.
    fn task_command_done(&self, key: u64, started: Instant, sent: bool) {
        let Ok(mut t) = self.inner.tasks.lock() else {
            return;
        };
        let Some((_, task)) = t.entries.get_mut(&key).filter(|e| e.1.started == started) else {
            return;
        };
        task.publishing = task.publishing.saturating_sub(1);
        if sent && !task.counted {
            task.counted = true;
            self.task_status(PENDING, 1);
        } else if !sent && !task.counted && task.publishing == 0 {
            t.entries.remove(&key);
        }
        self.handles().tasks_in_progress.set(t.entries.len() as f64);
    }

    /// Ends the task `which` names (a [`TaskRef::Key`] only if it is still
    /// the task that started then); `duration`: the task's own, when it
    /// gives one. A task that is not open counts only if `count_unknown`.
    fn end_task(
        &self,
        which: TaskRef<'_>,
        end: TaskEnd,
        task_type: Option<LabelId>,
        duration: Option<f64>,
        now: Instant,
        count_unknown: bool,
    ) {
        let Ok(mut t) = self.inner.tasks.lock() else {
            return;
        };
        self.sweep_tasks(&mut t, now);
        let key = match which {
            TaskRef::Subject(s) => t.key(s),
            TaskRef::Key(k, _) => k,
        };
        let open = match which {
            TaskRef::Key(_, started) => t.entries.get(&key).is_some_and(|e| e.1.started == started),
            TaskRef::Subject(_) => t.entries.contains_key(&key),
        };
        let task = if open {
            t.entries.remove(&key).map(|e| e.1)
        } else {
            None
        };
        self.handles().tasks_in_progress.set(t.entries.len() as f64);
        drop(t);
        let i = &self.inner;
        let (task_type, duration) = match &task {
            Some(task) => {
                if !task.counted {
                    // Ended before any of its COMMANDs' publishes returned.
                    self.task_status(PENDING, 1);
                }
                let took = now.saturating_duration_since(task.started).as_secs_f64();
                (task_type.unwrap_or(task.task_type), duration.or(Some(took)))
            }
            None if count_unknown => (
                task_type.unwrap_or_else(|| i.task_types.id("unknown")),
                duration,
            ),
            None => return,
        };
        self.task_status(end.status(), 1);
        if let Some(d) = duration {
            i.task_durations.with(
                task_type,
                || {
                    metrics::histogram!(
                        TASK_DURATION,
                        vec![Label::new("task_type", i.task_types.value(task_type))]
                    )
                },
                |h| h.record(d),
            );
        }
    }

    /// A task EVENT being published: ends its task.
    fn task_event(&self, env: EnvelopeRef<'_>, routing_key: &str, now: Instant) {
        let name = env
            .event_name()
            .or_else(|| routing_key.strip_prefix("evt."));
        let Some(end) = name.and_then(TaskEnd::from_event) else {
            return;
        };
        let Some(subject) = env.subject().or(env.task_id()) else {
            missing("subject");
            return;
        };
        let task_type = env.task_type().map(|t| self.inner.task_types.id(t));
        let duration = env
            .duration_seconds()
            .filter(|d| d.is_finite() && *d >= 0.0);
        self.end_task(
            TaskRef::Subject(subject),
            end,
            task_type,
            duration,
            now,
            true,
        );
    }
}

/// Which task to end.
#[derive(Clone, Copy)]
enum TaskRef<'a> {
    Subject(&'a str),
    /// The key and start of a task opened by a [`TaskGuard`].
    Key(u64, Instant),
}

/// A task opened with [`TaskMetrics::task`]; ends it when told how, or as
/// failed when dropped.
#[must_use = "a dropped guard ends its task as failed"]
pub struct TaskGuard {
    metrics: TaskMetrics,
    key: Option<u64>,
    started: Instant,
    ended: bool,
}

impl fmt::Debug for TaskGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskGuard")
            .field("started", &self.started)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl TaskGuard {
    /// The task succeeded.
    pub fn completed(mut self) {
        self.end(TaskEnd::Completed);
    }

    /// The task failed.
    pub fn failed(mut self) {
        self.end(TaskEnd::Failed);
    }

    /// The task was cancelled.
    pub fn cancelled(mut self) {
        self.end(TaskEnd::Cancelled);
    }

    fn end(&mut self, end: TaskEnd) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        if let Some(key) = self.key {
            self.metrics.end_task(
                TaskRef::Key(key, self.started),
                end,
                None,
                None,
                Instant::now(),
                false,
            );
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.end(TaskEnd::Failed);
    }
}

fn ttl_of(expiration: Option<&str>) -> Duration {
    expiration
        .and_then(|e| e.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TTL)
        .min(MAX_TTL)
}

/// A COMMAND being sent: registered in the tables before the publish (so a
/// reply that overtakes the publish result still finds it), and counted as
/// pending once the publish succeeds.
pub(crate) struct CommandOut {
    /// Its table key and deadline (`None` when the table holds nothing).
    registered: Option<(u64, Instant)>,
    /// Its task's key and start.
    task: Option<(u64, Instant)>,
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
        let routing_key = msg.routing_key();
        // The chain's clock reading for this publish (no second one).
        let now = msg.state().started();
        let env = msg.envelope();
        match env.kind() {
            MessageKind::Command => {}
            MessageKind::Event => return self.task_event(env, routing_key, now),
            _ => return,
        }
        let task = match env.subject() {
            Some(subject) => {
                let task_type = env.task_type().or(env.process_id()).unwrap_or("unknown");
                self.open_task(subject, task_type, ttl, now, false)
            }
            None => {
                missing("subject");
                None
            }
        };
        let registered = match correlation_id.or(env.id()) {
            Some(correlation_id) => {
                let action = self.inner.actions.id(env.action().unwrap_or("unknown"));
                // Registered now, not when the publish result comes: with
                // confirms awaited in batches (or a slow wake-up after the
                // write), the reply can be delivered before the result hook
                // runs.
                self.command_sent(correlation_id, action, ttl, now)
            }
            None => {
                missing("correlation_id");
                None
            }
        };
        msg.state_mut().builtin.task = Some(CommandOut { registered, task });
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
            self.command_status(PENDING, 1);
        }
        if let Some((key, started)) = out.task {
            self.task_command_done(key, started, sent);
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

        // The COMMAND this reply ends.
        let status = if kind == MessageKind::Result {
            COMPLETED
        } else {
            FAILED
        };
        match correlation_id.map(|c| self.reply_received(c, received)) {
            Some(Some(pending)) => {
                self.command_status(status, 1);
                let action = pending.action;
                let took = received.saturating_duration_since(pending.sent);
                i.command_durations.with(
                    action,
                    || {
                        metrics::histogram!(
                            COMMAND_DURATION,
                            vec![Label::new("action", i.actions.value(action))]
                        )
                    },
                    |h| h.record(took.as_secs_f64()),
                );
            }
            Some(None) if !redelivered => self.command_status(status, 1),
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

    /// `ai_team_commands_total{status}` in a rendering.
    fn commands(text: &str, status: &str) -> Option<f64> {
        sample(
            text,
            &format!("ai_team_commands_total{{status=\"{status}\"}}"),
        )
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
        let count = r#"ai_team_command_duration_seconds_count{action="generate_article"}"#;
        assert_eq!(sample(&text, count), Some(1.0), "{text}");
        assert_eq!(commands(&text, "pending"), Some(1.0));
        assert_eq!(commands(&text, "completed"), Some(1.0));
        assert_eq!(sample(&text, "ai_team_commands_in_progress"), Some(0.0));
    }

    #[test]
    fn a_failed_publish_leaves_no_task_behind() {
        let text = scenario(|tm, chain| {
            let mut state = start_command(chain);
            publish_fails(chain, &mut state);
            assert_eq!(tm.pending(), 0);
        });
        assert_eq!(commands(&text, "pending"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "ai_team_commands_in_progress"), Some(0.0));
    }

    #[test]
    fn a_failed_publish_whose_reply_came_first_still_counts_as_sent() {
        let text = scenario(|tm, chain| {
            let mut state = start_command(chain);
            deliver_result(chain);
            publish_fails(chain, &mut state);
            assert_eq!(tm.pending(), 0);
        });
        assert_eq!(commands(&text, "pending"), Some(1.0), "{text}");
        assert_eq!(commands(&text, "completed"), Some(1.0));
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

    // ---------------------------------------------------------------- tasks

    /// A message shaped like the protocol's fixture `name`, with `edit`
    /// applied to its JSON body.
    fn shaped(
        name: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> (String, BasicProperties, Vec<u8>) {
        let f = crate::test_fixtures::fixture(name);
        let mut body: serde_json::Value = serde_json::from_slice(&f.body).expect("fixture JSON");
        edit(&mut body);
        let body = serde_json::to_vec(&body).expect("JSON");
        (f.routing_key, f.properties, body)
    }

    /// The orchestrator sends a COMMAND of task `subject` (shape of
    /// `command.json`), correlation id `id`; returns its publish state.
    fn send_command(
        chain: &InterceptorChain,
        subject: &str,
        id: &str,
        ttl_ms: u64,
    ) -> MessageState {
        let (rk, props, body) = shaped("command", |b| {
            b["subject"] = subject.into();
            b["id"] = id.into();
        });
        let props = props
            .with_correlation_id(id.into())
            .with_message_id(id.into())
            .with_expiration(ttl_ms.to_string().into());
        chain
            .start_publish(
                "mindbus.main",
                &rk,
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .1
    }

    fn sent(chain: &InterceptorChain, mut state: MessageState) {
        chain.end_publish(&mut state, &PublishResult::Sent);
    }

    /// The reply to COMMAND `id`: `result.json` or `error.json` shaped.
    fn reply(chain: &InterceptorChain, kind: &str, subject: &str, id: &str) {
        let (_, _, body) = shaped(kind, |b| b["subject"] = subject.into());
        let mut d = Delivery::mock(1, "".into(), "orchestrator.results".into(), false, body);
        d.properties = BasicProperties::default().with_correlation_id(id.into());
        let mut m = chain.start_delivery(&d, "orchestrator.results", false);
        chain.end_delivery(&mut m, &Settlement::new(Outcome::Acked));
    }

    /// The orchestrator announces `task.<outcome>` for `subject` (shape of
    /// `event.json`, whose `event_data` gives `duration_seconds` 40 unless
    /// `own_duration` is false).
    fn announce(chain: &InterceptorChain, subject: &str, outcome: &str, own_duration: bool) {
        let (_, props, body) = shaped("event", |b| {
            b["subject"] = subject.into();
            b["data"]["event_type"] = format!("task.{outcome}").into();
            b["data"]["event_data"]["task_id"] = subject.into();
            if !own_duration {
                b["data"]["event_data"]
                    .as_object_mut()
                    .map(|o| o.remove("duration_seconds"));
            }
        });
        let rk = format!("evt.task.{outcome}");
        let (_, mut state) = chain.start_publish(
            "mindbus.main",
            &rk,
            BasicPublishOptions::default(),
            &body,
            props,
        );
        chain.end_publish(&mut state, &PublishResult::Sent);
    }

    fn task_durations(text: &str, task_type: &str) -> Option<f64> {
        sample(
            text,
            &format!("ai_team_task_duration_seconds_count{{task_type=\"{task_type}\"}}"),
        )
    }

    #[test]
    fn several_tasks_at_once_count_as_tasks_not_commands() {
        let text = scenario(|tm, chain| {
            // Three tasks interleaved, two COMMANDs each (writer, critic).
            for (n, subject) in ["task-a", "task-b", "task-c"].iter().enumerate() {
                sent(
                    chain,
                    send_command(chain, subject, &format!("w{n}"), 300_000),
                );
            }
            assert_eq!(tm.open_tasks(), 3);
            for (n, subject) in ["task-a", "task-b", "task-c"].iter().enumerate() {
                reply(chain, "result", subject, &format!("w{n}"));
            }
            for (n, subject) in ["task-a", "task-b", "task-c"].iter().enumerate() {
                sent(
                    chain,
                    send_command(chain, subject, &format!("c{n}"), 300_000),
                );
            }
            assert_eq!((tm.open_tasks(), tm.pending()), (3, 3));
            reply(chain, "result", "task-a", "c0");
            reply(chain, "result", "task-b", "c1");
            reply(chain, "error", "task-c", "c2");
            announce(chain, "task-a", "completed", false);
            announce(chain, "task-b", "completed", true);
            announce(chain, "task-c", "failed", false);
            assert_eq!((tm.open_tasks(), tm.pending()), (0, 0));
        });
        assert_eq!(tasks(&text, "pending"), Some(3.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(2.0), "{text}");
        assert_eq!(tasks(&text, "failed"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "expired"), Some(0.0), "{text}");
        assert_eq!(sample(&text, "ai_team_tasks_in_progress"), Some(0.0));
        assert_eq!(commands(&text, "pending"), Some(6.0), "{text}");
        assert_eq!(commands(&text, "completed"), Some(5.0), "{text}");
        assert_eq!(commands(&text, "failed"), Some(1.0), "{text}");
        // The task type is the first COMMAND's context.process_id.
        assert_eq!(task_durations(&text, "blog-001"), Some(3.0), "{text}");
        assert_eq!(
            sample(
                &text,
                "ai_team_task_duration_seconds_sum{task_type=\"blog-001\"}"
            )
            .map(|s| s >= 40.0),
            Some(true),
            "task-b's own 40 s: {text}"
        );
        let per_action = r#"ai_team_command_duration_seconds_count{action="generate_article"}"#;
        assert_eq!(sample(&text, per_action), Some(6.0), "{text}");
    }

    #[test]
    fn a_task_whose_first_command_fails_is_one_failed_task() {
        let text = scenario(|tm, chain| {
            // Its first COMMAND is answered with an ERROR; the orchestrator
            // gives up and says so.
            sent(chain, send_command(chain, "task-x", "x1", 300_000));
            reply(chain, "error", "task-x", "x1");
            announce(chain, "task-x", "failed", false);
            // Another whose first COMMAND never reaches the bus: no task.
            let mut state = send_command(chain, "task-y", "y1", 300_000);
            assert_eq!(tm.open_tasks(), 1);
            publish_fails(chain, &mut state);
            assert_eq!(tm.open_tasks(), 0);
        });
        assert_eq!(tasks(&text, "pending"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "failed"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(0.0), "{text}");
        assert_eq!(task_durations(&text, "blog-001"), Some(1.0), "{text}");
        assert_eq!(commands(&text, "failed"), Some(1.0), "{text}");
    }

    #[test]
    fn a_task_whose_event_never_comes_expires_after_its_longest_ttl() {
        let text = scenario(|tm, chain| {
            sent(chain, send_command(chain, "task-z", "z1", 20));
            sent(chain, send_command(chain, "task-z", "z2", 120));
            std::thread::sleep(Duration::from_millis(60));
            assert_eq!(tm.open_tasks(), 1, "its second COMMAND keeps it open");
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!((tm.open_tasks(), tm.pending()), (0, 0));
            // A late EVENT for it still counts (a task not in the table).
            announce(chain, "task-z", "completed", true);
        });
        assert_eq!(tasks(&text, "pending"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "expired"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(1.0), "{text}");
        assert_eq!(commands(&text, "expired"), Some(2.0), "{text}");
        // Only the late EVENT's own duration: an expired task has none.
        assert_eq!(task_durations(&text, "unknown"), Some(1.0), "{text}");
        assert_eq!(task_durations(&text, "blog-001"), None, "{text}");
    }

    #[test]
    fn an_event_names_the_task_type_and_unrelated_events_count_nothing() {
        let text = scenario(|_, chain| {
            sent(chain, send_command(chain, "task-t", "t1", 300_000));
            let (_, props, body) = shaped("event", |b| {
                b["subject"] = "task-t".into();
                b["data"]["event_data"]["task_type"] = "article".into();
            });
            let (_, mut state) = chain.start_publish(
                "mindbus.main",
                "evt.task.completed",
                BasicPublishOptions::default(),
                &body,
                props,
            );
            chain.end_publish(&mut state, &PublishResult::Sent);
            let (_, props, body) = shaped("event", |b| {
                b["data"]["event_type"] = "node.heartbeat".into();
            });
            let (_, mut state) = chain.start_publish(
                "mindbus.main",
                "evt.node.heartbeat",
                BasicPublishOptions::default(),
                &body,
                props,
            );
            chain.end_publish(&mut state, &PublishResult::Sent);
        });
        assert_eq!(task_durations(&text, "article"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(1.0), "{text}");
    }

    #[test]
    fn an_explicit_task_guard_counts_once() {
        let text = scenario(|tm, chain| {
            let done = tm.task("task-1", "article");
            sent(chain, send_command(chain, "task-1", "g1", 300_000));
            assert_eq!(tm.open_tasks(), 1);
            done.completed();
            {
                let _dropped = tm.task("task-2", "article");
            }
            tm.task("task-3", "article").cancelled();
            // An EVENT ends it first: the guard counts nothing more.
            let both = tm.task("task-4", "article");
            announce(chain, "task-4", "completed", false);
            both.failed();
            assert_eq!(tm.open_tasks(), 0);
        });
        assert_eq!(tasks(&text, "pending"), Some(4.0), "{text}");
        assert_eq!(tasks(&text, "completed"), Some(2.0), "{text}");
        assert_eq!(tasks(&text, "failed"), Some(1.0), "{text}");
        assert_eq!(tasks(&text, "cancelled"), Some(1.0), "{text}");
        assert_eq!(task_durations(&text, "article"), Some(4.0), "{text}");
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
                .commands
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
