//! Text rendering of span trees.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};

use crate::model::ReceivedSpan;

/// Formats a duration for humans with at most one decimal: `420ns`, `850µs`, `7.2ms`,
/// `10.5s`; durations of a minute or more as `2m05s`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}µs", nanos / 1_000);
    }
    // Tenths of a millisecond, rounded; switch unit when rounding reaches 1000.0ms.
    let tenth_ms = (nanos + 50_000) / 100_000;
    if tenth_ms < 10_000 {
        return format!("{}.{}ms", tenth_ms / 10, tenth_ms % 10);
    }
    let tenth_s = (nanos + 50_000_000) / 100_000_000;
    if tenth_s < 600 {
        return format!("{}.{}s", tenth_s / 10, tenth_s % 10);
    }
    let secs = (nanos + 500_000_000) / 1_000_000_000;
    format!("{}m{:02}s", secs / 60, secs % 60)
}

/// The lowercase name of a span kind, as used in rendered trees (`[producer]`).
pub fn kind_name(kind: &SpanKind) -> &'static str {
    match kind {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

/// Renders the line describing one span, without indentation or newline:
/// `name (service) duration`, then ` [kind]` unless the kind is internal, then
/// ` !error` (with `: message` when the status has one) for failed spans.
///
/// A span without a `service.name` shows `(?)`.
pub fn render_span_line(span: &ReceivedSpan) -> String {
    let mut line = format!(
        "{} ({}) {}",
        span.name,
        span.service_name.as_deref().unwrap_or("?"),
        format_duration(span.duration())
    );
    if span.kind != SpanKind::Internal {
        let _ = write!(line, " [{}]", kind_name(&span.kind));
    }
    if span.is_error() {
        line.push_str(" !error");
        if !span.status.message.is_empty() {
            let _ = write!(line, ": {}", span.status.message);
        }
    }
    line
}

/// Renders every trace found in `spans` as a text tree.
///
/// Traces are ordered by their earliest start time. Each trace starts with a header
/// line `trace <32 hex digits> (<n> spans)` followed by its tree as rendered by
/// [`render_trace`]; traces are separated by an empty line. An empty slice renders as
/// `(no spans)\n`.
///
/// ```
/// use mindbus_otel_testkit::{ReceivedSpan, render_tree};
/// use opentelemetry::trace::{SpanId, TraceId};
///
/// let trace_id = TraceId::from_bytes([1; 16]);
/// let root = ReceivedSpan {
///     trace_id,
///     span_id: SpanId::from_bytes([1; 8]),
///     name: "execute_task".into(),
///     service_name: Some("orchestrator".into()),
///     start_unix_nanos: 1_000_000,
///     end_unix_nanos: 11_500_000,
///     ..Default::default()
/// };
/// let child = ReceivedSpan {
///     span_id: SpanId::from_bytes([2; 8]),
///     parent_span_id: Some(root.span_id),
///     name: "llm_call".into(),
///     start_unix_nanos: 2_000_000,
///     end_unix_nanos: 2_850_000,
///     ..root.clone()
/// };
/// let text = render_tree(&[child, root]);
/// assert_eq!(
///     text,
///     "trace 01010101010101010101010101010101 (2 spans)\n\
///      execute_task (orchestrator) 10.5ms\n  llm_call (orchestrator) 850µs\n"
/// );
/// ```
pub fn render_tree(spans: &[ReceivedSpan]) -> String {
    if spans.is_empty() {
        return "(no spans)\n".to_owned();
    }
    // Group by trace, keeping the earliest start of each.
    let mut order: Vec<(TraceId, u64)> = Vec::new();
    for span in spans {
        match order.iter_mut().find(|(id, _)| *id == span.trace_id) {
            Some((_, start)) => *start = (*start).min(span.start_unix_nanos),
            None => order.push((span.trace_id, span.start_unix_nanos)),
        }
    }
    order.sort_by_key(|(id, start)| (*start, id.to_bytes()));
    let mut out = String::new();
    for (i, (trace_id, _)) in order.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let trace_spans: Vec<&ReceivedSpan> =
            spans.iter().filter(|s| s.trace_id == *trace_id).collect();
        let _ = writeln!(out, "trace {trace_id} ({} spans)", trace_spans.len());
        out.push_str(&render_refs(&trace_spans));
    }
    out
}

/// Renders the spans of one trace as a tree, without a header line.
///
/// Children are indented two spaces below their parent and siblings are sorted by
/// start time. A span whose parent is not in `spans` is rendered as a root with the note
/// ` (parent <16 hex digits> not received)`. Spans of other traces are ignored; an
/// empty result renders as `(no spans in trace <id>)\n`.
pub fn render_trace(spans: &[ReceivedSpan], trace_id: TraceId) -> String {
    let trace_spans: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    if trace_spans.is_empty() {
        return format!("(no spans in trace {trace_id})\n");
    }
    render_refs(&trace_spans)
}

/// Renders spans assumed to belong to one trace.
fn render_refs(spans: &[&ReceivedSpan]) -> String {
    let present: HashMap<SpanId, usize> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id, i))
        .collect();
    let mut children: HashMap<SpanId, Vec<usize>> = HashMap::new();
    let mut roots: Vec<usize> = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span.parent_span_id {
            Some(parent) if present.contains_key(&parent) && parent != span.span_id => {
                children.entry(parent).or_default().push(i);
            }
            _ => roots.push(i),
        }
    }
    let sort_key = |i: &usize| {
        let s = spans[*i];
        (s.start_unix_nanos, s.name.clone(), s.span_id.to_bytes())
    };
    roots.sort_by_key(sort_key);
    for list in children.values_mut() {
        list.sort_by_key(sort_key);
    }

    let mut visited = vec![false; spans.len()];
    let mut out = String::new();
    let emit = |roots: &[usize], note: &str, out: &mut String, visited: &mut Vec<bool>| {
        let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|&i| (i, 0)).collect();
        while let Some((i, depth)) = stack.pop() {
            if visited[i] {
                continue;
            }
            visited[i] = true;
            let span = spans[i];
            for _ in 0..depth {
                out.push_str("  ");
            }
            out.push_str(&render_span_line(span));
            if depth == 0 {
                match span.parent_span_id {
                    Some(parent) if parent == span.span_id => {
                        out.push_str(" (parent is itself)");
                    }
                    Some(parent) if !present.contains_key(&parent) => {
                        let _ = write!(out, " (parent {parent} not received)");
                    }
                    _ => out.push_str(note),
                }
            }
            out.push('\n');
            if let Some(kids) = children.get(&span.span_id) {
                stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
            }
        }
    };
    emit(&roots, "", &mut out, &mut visited);
    // Whatever is left is part of a parent cycle: render it anyway.
    let mut rest: Vec<usize> = (0..spans.len()).filter(|i| !visited[*i]).collect();
    rest.sort_by_key(sort_key);
    for i in rest {
        emit(&[i], " (parent cycle)", &mut out, &mut visited);
    }
    out
}
