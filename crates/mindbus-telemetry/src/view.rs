//! The terminal trace view: a span processor that prints each finished trace as a tree.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use opentelemetry::Context;
use opentelemetry::trace::{Span as _, SpanId, SpanKind, Status, TraceId};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

use crate::config::TraceViewOutput;

/// Most finished spans the view keeps while their traces are in progress.
pub const MAX_VIEW_SPANS: usize = 10_000;
/// Most traces in progress the view keeps.
pub const MAX_VIEW_TRACES: usize = 1_000;
/// Most rendered traces kept for [`TraceViewOutput::Capture`].
pub const MAX_CAPTURED_TRACES: usize = 1_000;

/// One finished span, as the trace view renders it.
///
/// Build it from the SDK's [`SpanData`] with [`RenderSpan::from_span_data`], or from
/// any other source (spans received by a test collector, for instance) by filling
/// the fields.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderSpan {
    /// The trace the span belongs to.
    pub trace_id: TraceId,
    /// The span's id.
    pub span_id: SpanId,
    /// The parent span's id, `None` for a root span.
    pub parent_span_id: Option<SpanId>,
    /// Span name.
    pub name: String,
    /// `service.name` of the provider that recorded the span.
    pub service_name: String,
    /// Span kind; shown as `[producer]`, `[consumer]`, … unless internal.
    pub kind: SpanKind,
    /// Start time.
    pub start_time: SystemTime,
    /// End time.
    pub end_time: SystemTime,
    /// `Some(description)` when the span's status is error (the description may be
    /// empty).
    pub error: Option<String>,
}

impl RenderSpan {
    /// Converts a finished SDK span recorded by a provider whose `service.name` is
    /// `service_name`.
    pub fn from_span_data(span: &SpanData, service_name: &str) -> RenderSpan {
        RenderSpan {
            trace_id: span.span_context.trace_id(),
            span_id: span.span_context.span_id(),
            parent_span_id: (span.parent_span_id != SpanId::INVALID).then_some(span.parent_span_id),
            name: span.name.to_string(),
            service_name: service_name.to_owned(),
            kind: span.span_kind.clone(),
            start_time: span.start_time,
            end_time: span.end_time,
            error: match &span.status {
                Status::Error { description } => Some(description.to_string()),
                _ => None,
            },
        }
    }

    /// How long the span lasted (zero if it ended before it started).
    pub fn duration(&self) -> Duration {
        self.end_time
            .duration_since(self.start_time)
            .unwrap_or_default()
    }
}

/// Formats a duration for humans with at most one decimal: `420ns`, `850µs`,
/// `7.2ms`, `10.5s`, and `2m05s` from one minute on.
///
/// ```
/// use std::time::Duration;
/// use mindbus_telemetry::format_duration;
///
/// assert_eq!(format_duration(Duration::from_micros(850)), "850µs");
/// assert_eq!(format_duration(Duration::from_micros(7_200)), "7.2ms");
/// assert_eq!(format_duration(Duration::from_millis(10_500)), "10.5s");
/// ```
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", nanos / 1_000);
    }
    let tenths_of_ms = (nanos + 50_000) / 100_000;
    if tenths_of_ms < 10_000 {
        return format!("{}.{}ms", tenths_of_ms / 10, tenths_of_ms % 10);
    }
    let tenths_of_s = (nanos + 50_000_000) / 100_000_000;
    if tenths_of_s < 600 {
        return format!("{}.{}s", tenths_of_s / 10, tenths_of_s % 10);
    }
    let secs = (nanos + 500_000_000) / 1_000_000_000;
    format!("{}m{:02}s", secs / 60, secs % 60)
}

fn kind_label(kind: &SpanKind) -> Option<&'static str> {
    match kind {
        SpanKind::Internal => None,
        SpanKind::Client => Some("client"),
        SpanKind::Server => Some("server"),
        SpanKind::Producer => Some("producer"),
        SpanKind::Consumer => Some("consumer"),
    }
}

/// Renders one span line without indentation: `name (service) duration`, then
/// ` [kind]` unless internal, then ` !error` (with `: description` when there is
/// one) for failed spans.
pub fn render_span_line(span: &RenderSpan) -> String {
    let mut line = format!(
        "{} ({}) {}",
        span.name,
        span.service_name,
        format_duration(span.duration())
    );
    if let Some(kind) = kind_label(&span.kind) {
        let _ = write!(line, " [{kind}]");
    }
    if let Some(description) = &span.error {
        line.push_str(" !error");
        if !description.is_empty() {
            let _ = write!(line, ": {description}");
        }
    }
    line
}

/// Renders spans as text trees, one line per span, children indented two spaces
/// under their parent and sorted by start time.
///
/// Spans whose parent is not among `spans` (roots, spans with a remote parent, and
/// orphans whose parent was lost) start trees of their own, sorted by start time.
/// Every span appears exactly once. Usually all spans belong to one trace, but
/// nothing requires it.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use mindbus_telemetry::opentelemetry::trace::{SpanId, SpanKind, TraceId};
/// use mindbus_telemetry::{render_trace, RenderSpan};
///
/// let at = |micros: u64| UNIX_EPOCH + Duration::from_micros(micros);
/// let span = |id: u8, parent: Option<u8>, name: &str, service: &str, start, end| RenderSpan {
///     trace_id: TraceId::from_bytes([1; 16]),
///     span_id: SpanId::from_bytes([id; 8]),
///     parent_span_id: parent.map(|p| SpanId::from_bytes([p; 8])),
///     name: name.into(),
///     service_name: service.into(),
///     kind: SpanKind::Internal,
///     start_time: at(start),
///     end_time: at(end),
///     error: None,
/// };
/// let text = render_trace(&[
///     span(2, Some(1), "llm_call", "writer", 1_000, 7_800),
///     span(1, None, "execute_task", "orchestrator", 0, 10_500),
/// ]);
/// assert_eq!(text, "execute_task (orchestrator) 10.5ms\n  llm_call (writer) 6.8ms\n");
/// ```
pub fn render_trace(spans: &[RenderSpan]) -> String {
    let ids: HashSet<SpanId> = spans.iter().map(|span| span.span_id).collect();
    let mut children: HashMap<SpanId, Vec<usize>> = HashMap::new();
    let mut roots: Vec<usize> = Vec::new();
    for (index, span) in spans.iter().enumerate() {
        match span.parent_span_id {
            Some(parent) if parent != span.span_id && ids.contains(&parent) => {
                children.entry(parent).or_default().push(index);
            }
            _ => roots.push(index),
        }
    }
    let order = |indexes: &mut Vec<usize>| {
        indexes.sort_by(|&a, &b| {
            spans[a]
                .start_time
                .cmp(&spans[b].start_time)
                .then_with(|| spans[a].name.cmp(&spans[b].name))
                .then(a.cmp(&b))
        });
    };
    order(&mut roots);
    for list in children.values_mut() {
        order(list);
    }

    let mut out = String::new();
    let mut printed = vec![false; spans.len()];
    // Depth-first with an explicit stack; `printed` guards against parent cycles.
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&index| (index, 0)).collect();
    let emit = |stack: &mut Vec<(usize, usize)>, out: &mut String, printed: &mut Vec<bool>| {
        while let Some((index, depth)) = stack.pop() {
            if printed[index] {
                continue;
            }
            printed[index] = true;
            for _ in 0..depth {
                out.push_str("  ");
            }
            out.push_str(&render_span_line(&spans[index]));
            out.push('\n');
            if let Some(kids) = children.get(&spans[index].span_id) {
                stack.extend(kids.iter().rev().map(|&kid| (kid, depth + 1)));
            }
        }
    };
    emit(&mut stack, &mut out, &mut printed);
    // Spans caught in a parent cycle were reachable from no root: print them too.
    for index in 0..spans.len() {
        if !printed[index] {
            stack.push((index, 0));
            emit(&mut stack, &mut out, &mut printed);
        }
    }
    out
}

#[derive(Debug, Default)]
struct TraceEntry {
    sequence: u64,
    open: HashSet<SpanId>,
    finished: Vec<RenderSpan>,
}

#[derive(Debug, Default)]
struct ViewState {
    traces: HashMap<TraceId, TraceEntry>,
    /// Traces by age (sequence of their first span), for eviction.
    by_age: BTreeMap<u64, TraceId>,
    next_sequence: u64,
    finished_spans: usize,
    captured: VecDeque<String>,
    dropped_spans: u64,
}

impl ViewState {
    fn entry(&mut self, trace_id: TraceId) -> &mut TraceEntry {
        if !self.traces.contains_key(&trace_id) {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.by_age.insert(sequence, trace_id);
            self.traces.insert(
                trace_id,
                TraceEntry {
                    sequence,
                    ..TraceEntry::default()
                },
            );
        }
        // Just inserted if it was missing.
        self.traces.entry(trace_id).or_default()
    }

    fn remove(&mut self, trace_id: &TraceId) -> Option<TraceEntry> {
        let entry = self.traces.remove(trace_id)?;
        self.by_age.remove(&entry.sequence);
        self.finished_spans -= entry.finished.len();
        Some(entry)
    }

    /// Drops the oldest traces (never `keep`) until within the limits.
    fn evict(&mut self, keep: TraceId, max_spans: usize, max_traces: usize) {
        while self.traces.len() > max_traces || self.finished_spans > max_spans {
            let oldest = self
                .by_age
                .values()
                .find(|trace_id| **trace_id != keep)
                .copied();
            let Some(oldest) = oldest else { break };
            if let Some(entry) = self.remove(&oldest) {
                self.dropped_spans += entry.finished.len() as u64;
            }
        }
    }
}

/// State shared by every provider's view processor.
#[derive(Debug)]
pub(crate) struct TraceView {
    state: Mutex<ViewState>,
    output: TraceViewOutput,
    max_spans: usize,
    max_traces: usize,
}

impl TraceView {
    pub(crate) fn new(output: TraceViewOutput) -> Arc<TraceView> {
        Arc::new(TraceView::with_limits(
            output,
            MAX_VIEW_SPANS,
            MAX_VIEW_TRACES,
        ))
    }

    pub(crate) fn with_limits(
        output: TraceViewOutput,
        max_spans: usize,
        max_traces: usize,
    ) -> TraceView {
        TraceView {
            state: Mutex::new(ViewState::default()),
            output,
            max_spans: max_spans.max(1),
            max_traces: max_traces.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ViewState> {
        // A panic while holding the lock leaves consistent-enough state for a view.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn processor(self: &Arc<Self>, service_name: &str) -> TraceViewProcessor {
        TraceViewProcessor {
            view: Arc::clone(self),
            service_name: service_name.to_owned(),
        }
    }

    fn started(&self, trace_id: TraceId, span_id: SpanId) {
        let mut state = self.lock();
        state.entry(trace_id).open.insert(span_id);
        state.evict(trace_id, self.max_spans, self.max_traces);
    }

    /// Records a finished span; returns the rendered trace when it was the trace's
    /// last open span here.
    pub(crate) fn ended(&self, span: RenderSpan) -> Option<String> {
        let trace_id = span.trace_id;
        let finished = {
            let mut state = self.lock();
            let entry = state.entry(trace_id);
            entry.open.remove(&span.span_id);
            entry.finished.push(span);
            let done = entry.open.is_empty();
            state.finished_spans += 1;
            if done {
                state.remove(&trace_id).map(|entry| entry.finished)
            } else {
                state.evict(trace_id, self.max_spans, self.max_traces);
                // A single huge trace: keep its newest spans within the limit.
                if state.finished_spans > self.max_spans
                    && let Some(entry) = state.traces.get_mut(&trace_id)
                    && !entry.finished.is_empty()
                {
                    entry.finished.remove(0);
                    state.finished_spans -= 1;
                    state.dropped_spans += 1;
                }
                None
            }
        }?;
        let text = render_trace(&finished);
        self.emit(&text);
        Some(text)
    }

    fn emit(&self, text: &str) {
        match self.output {
            TraceViewOutput::Stdout => {
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
            }
            TraceViewOutput::Stderr => {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
            TraceViewOutput::Capture => {
                let mut state = self.lock();
                if state.captured.len() >= MAX_CAPTURED_TRACES {
                    state.captured.pop_front();
                }
                state.captured.push_back(text.to_owned());
            }
        }
    }

    pub(crate) fn take_rendered(&self) -> Vec<String> {
        self.lock().captured.drain(..).collect()
    }

    pub(crate) fn dropped_spans(&self) -> u64 {
        self.lock().dropped_spans
    }

    #[cfg(test)]
    fn pending(&self) -> (usize, usize) {
        let state = self.lock();
        (state.traces.len(), state.finished_spans)
    }
}

/// The per-provider span processor of the trace view: knows its provider's
/// `service.name`, shares the trace store with the other providers.
#[derive(Debug)]
pub(crate) struct TraceViewProcessor {
    view: Arc<TraceView>,
    service_name: String,
}

impl SpanProcessor for TraceViewProcessor {
    fn on_start(&self, span: &mut Span, _cx: &Context) {
        let span_context = span.span_context();
        self.view
            .started(span_context.trace_id(), span_context.span_id());
    }

    fn on_end(&self, span: SpanData) {
        self.view
            .ended(RenderSpan::from_span_data(&span, &self.service_name));
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(name) = resource.get(&opentelemetry::Key::from_static_str("service.name")) {
            self.service_name = name.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const TRACE: TraceId = TraceId::from_bytes([7; 16]);

    fn span(id: u8, parent: Option<u8>, name: &str, start_us: u64, end_us: u64) -> RenderSpan {
        RenderSpan {
            trace_id: TRACE,
            span_id: SpanId::from_bytes([id; 8]),
            parent_span_id: parent.map(|p| SpanId::from_bytes([p; 8])),
            name: name.to_owned(),
            service_name: "svc".to_owned(),
            kind: SpanKind::Internal,
            start_time: UNIX_EPOCH + Duration::from_micros(start_us),
            end_time: UNIX_EPOCH + Duration::from_micros(end_us),
            error: None,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_nanos(420)), "420ns");
        assert_eq!(format_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(format_duration(Duration::from_nanos(999_999)), "999µs");
        assert_eq!(format_duration(Duration::from_micros(1_000)), "1.0ms");
        assert_eq!(format_duration(Duration::from_micros(7_200)), "7.2ms");
        assert_eq!(format_duration(Duration::from_micros(10_500)), "10.5ms");
        assert_eq!(format_duration(Duration::from_micros(999_960)), "1.0s");
        assert_eq!(format_duration(Duration::from_millis(10_500)), "10.5s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(format_duration(Duration::ZERO), "0ns");
    }

    #[test]
    fn the_documented_example_tree() {
        let mut publish = span(2, Some(1), "publish mindbus.main", 100, 1_300);
        publish.service_name = "orchestrator".into();
        publish.kind = SpanKind::Producer;
        let mut process = span(3, Some(2), "process agent.writer", 1_500, 8_700);
        process.service_name = "writer".into();
        process.kind = SpanKind::Consumer;
        let mut llm = span(4, Some(3), "llm_call", 1_800, 8_600);
        llm.service_name = "writer".into();
        let mut root = span(1, None, "execute_task", 0, 10_500);
        root.service_name = "orchestrator".into();
        let text = render_trace(&[llm, process, root, publish]);
        assert_eq!(
            text,
            "execute_task (orchestrator) 10.5ms\n\
             \x20 publish mindbus.main (orchestrator) 1.2ms [producer]\n\
             \x20   process agent.writer (writer) 7.2ms [consumer]\n\
             \x20     llm_call (writer) 6.8ms\n"
        );
    }

    #[test]
    fn children_are_sorted_by_start_time() {
        let text = render_trace(&[
            span(1, None, "root", 0, 1_000),
            span(4, Some(1), "third", 600, 700),
            span(2, Some(1), "first", 100, 200),
            span(3, Some(1), "second", 300, 400),
            span(5, Some(2), "nested", 150, 160),
        ]);
        assert_eq!(
            text,
            "root (svc) 1.0ms\n  first (svc) 100µs\n    nested (svc) 10µs\n  second (svc) 100µs\n  third (svc) 100µs\n"
        );
    }

    #[test]
    fn error_marker_and_kinds() {
        let mut failed = span(1, None, "llm_call", 0, 2_000);
        failed.error = Some(String::new());
        assert_eq!(render_span_line(&failed), "llm_call (svc) 2.0ms !error");
        failed.error = Some("rate limited".into());
        failed.kind = SpanKind::Client;
        assert_eq!(
            render_span_line(&failed),
            "llm_call (svc) 2.0ms [client] !error: rate limited"
        );
    }

    #[test]
    fn orphans_and_remote_parents_become_roots() {
        // Span 9's parent is not in the set (remote or lost): it roots its own tree,
        // ordered with the other roots by start time.
        let text = render_trace(&[
            span(3, Some(9), "orphan", 50, 80),
            span(4, Some(3), "orphan child", 60, 70),
            span(1, None, "root", 0, 100),
            span(2, Some(1), "child", 10, 20),
        ]);
        assert_eq!(
            text,
            "root (svc) 100µs\n  child (svc) 10µs\norphan (svc) 30µs\n  orphan child (svc) 10µs\n"
        );
        assert_eq!(render_trace(&[]), "");
    }

    #[test]
    fn parent_cycles_do_not_hang() {
        let text = render_trace(&[span(1, Some(2), "a", 0, 1), span(2, Some(1), "b", 0, 1)]);
        assert_eq!(text.lines().count(), 2);
        let text = render_trace(&[span(1, Some(1), "self", 0, 1)]);
        assert_eq!(text, "self (svc) 1µs\n");
    }

    #[test]
    fn view_renders_when_the_last_open_span_ends() {
        let view = TraceView::with_limits(TraceViewOutput::Capture, 100, 10);
        let id = |n: u8| SpanId::from_bytes([n; 8]);
        view.started(TRACE, id(1));
        view.started(TRACE, id(2));
        assert_eq!(view.ended(span(2, Some(1), "child", 10, 20)), None);
        // A late child (fire and forget) keeps the trace open past its root's end.
        view.started(TRACE, id(3));
        assert_eq!(view.ended(span(1, None, "root", 0, 100)), None);
        let text = view.ended(span(3, Some(1), "late", 50, 200)).unwrap();
        assert_eq!(
            text,
            "root (svc) 100µs\n  child (svc) 10µs\n  late (svc) 150µs\n"
        );
        assert_eq!(view.take_rendered(), vec![text]);
        assert!(view.take_rendered().is_empty());
        assert_eq!(view.pending(), (0, 0));
    }

    #[test]
    fn view_is_bounded() {
        let view = TraceView::with_limits(TraceViewOutput::Capture, 5, 3);
        // Ten traces whose roots never end: only the newest three are kept.
        for n in 0..10u8 {
            let trace = TraceId::from_bytes([n; 16]);
            view.started(trace, SpanId::from_bytes([100; 8]));
            let mut child = span(n + 1, Some(100), "child", 0, 1);
            child.trace_id = trace;
            view.started(trace, child.span_id);
            assert_eq!(view.ended(child), None);
        }
        let (traces, spans) = view.pending();
        assert_eq!(traces, 3);
        assert!(spans <= 5);
        assert!(view.dropped_spans() >= 7);

        // One huge trace stays within the span limit too.
        let view = TraceView::with_limits(TraceViewOutput::Capture, 5, 3);
        view.started(TRACE, SpanId::from_bytes([200; 8]));
        for n in 1..=20u8 {
            view.started(TRACE, SpanId::from_bytes([n; 8]));
            assert_eq!(view.ended(span(n, Some(200), "child", 0, 1)), None);
        }
        assert_eq!(view.pending(), (1, 5));
    }
}
