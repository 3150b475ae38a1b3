//! A snapshot of received spans, with trace-tree queries and assertions.

use std::fmt;

use opentelemetry::trace::{SpanKind, TraceId};

use crate::model::ReceivedSpan;
use crate::render::{render_span_line, render_trace, render_tree};

/// A snapshot of received spans (in arrival order) with queries over their trace trees
/// and assertions.
///
/// The `assert_*` methods, [`one`](SpanSet::one) and [`one_where`](SpanSet::one_where)
/// panic with a message that includes every received trace rendered as a tree, so a
/// failing test shows what was actually exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpanSet {
    spans: Vec<ReceivedSpan>,
}

impl SpanSet {
    /// Wraps spans into a set (kept in the given order).
    pub fn new(spans: Vec<ReceivedSpan>) -> Self {
        SpanSet { spans }
    }

    /// Number of spans.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there is no span.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Iterates over the spans in arrival order.
    pub fn iter(&self) -> std::slice::Iter<'_, ReceivedSpan> {
        self.spans.iter()
    }

    /// The spans, in arrival order.
    pub fn as_slice(&self) -> &[ReceivedSpan] {
        &self.spans
    }

    /// Takes the spans out of the set.
    pub fn into_vec(self) -> Vec<ReceivedSpan> {
        self.spans
    }

    /// The first span (in arrival order) with this name.
    pub fn find(&self, name: &str) -> Option<&ReceivedSpan> {
        self.spans.iter().find(|s| s.name == name)
    }

    /// All spans with this name, sorted by start time.
    pub fn find_all(&self, name: &str) -> Vec<&ReceivedSpan> {
        let mut found: Vec<&ReceivedSpan> = self.spans.iter().filter(|s| s.name == name).collect();
        found.sort_by_key(|s| s.start_unix_nanos);
        found
    }

    /// The spans matching a predicate, as a new set.
    pub fn filter(&self, pred: impl Fn(&ReceivedSpan) -> bool) -> SpanSet {
        SpanSet::new(self.spans.iter().filter(|s| pred(s)).cloned().collect())
    }

    /// The spans whose `service.name` is `service`.
    pub fn by_service(&self, service: &str) -> SpanSet {
        self.filter(|s| s.service_name.as_deref() == Some(service))
    }

    /// The spans of this kind.
    pub fn by_kind(&self, kind: SpanKind) -> SpanSet {
        self.filter(|s| s.kind == kind)
    }

    /// The distinct trace ids, sorted (by their bytes).
    pub fn trace_ids(&self) -> Vec<TraceId> {
        let mut ids: Vec<TraceId> = self.spans.iter().map(|s| s.trace_id).collect();
        ids.sort_by_key(|id| id.to_bytes());
        ids.dedup();
        ids
    }

    /// The spans of one trace, as a new set.
    pub fn trace(&self, trace_id: TraceId) -> SpanSet {
        self.filter(|s| s.trace_id == trace_id)
    }

    /// The spans without a parent in this set: true roots and spans whose parent was
    /// not received, sorted by start time.
    pub fn roots(&self) -> Vec<&ReceivedSpan> {
        let mut roots: Vec<&ReceivedSpan> = self
            .spans
            .iter()
            .filter(|s| self.parent_of(s).is_none())
            .collect();
        roots.sort_by_key(|s| s.start_unix_nanos);
        roots
    }

    /// The parent of `span`, when it is in this set.
    pub fn parent_of(&self, span: &ReceivedSpan) -> Option<&ReceivedSpan> {
        let parent = span.parent_span_id?;
        self.spans
            .iter()
            .find(|s| s.trace_id == span.trace_id && s.span_id == parent)
    }

    /// The direct children of `span` in this set, sorted by start time.
    pub fn children_of(&self, span: &ReceivedSpan) -> Vec<&ReceivedSpan> {
        let mut kids: Vec<&ReceivedSpan> = self
            .spans
            .iter()
            .filter(|s| self.is_parent_of(span, s))
            .collect();
        kids.sort_by_key(|s| s.start_unix_nanos);
        kids
    }

    /// The chain of ancestors of `span` present in this set, nearest first (parent,
    /// grandparent, ... up to the highest one received).
    pub fn ancestors(&self, span: &ReceivedSpan) -> Vec<&ReceivedSpan> {
        let mut chain: Vec<&ReceivedSpan> = Vec::new();
        let mut current = self.parent_of(span);
        while let Some(p) = current {
            // Guard against malformed data with parent cycles.
            let same = |c: &ReceivedSpan| c.span_id == p.span_id && c.trace_id == p.trace_id;
            if same(span) || chain.iter().any(|c| same(c)) {
                break;
            }
            chain.push(p);
            current = self.parent_of(p);
        }
        chain
    }

    /// Whether `parent` is the direct parent of `child` (same trace, and `child`'s
    /// parent span id is `parent`'s span id).
    pub fn is_parent_of(&self, parent: &ReceivedSpan, child: &ReceivedSpan) -> bool {
        parent.trace_id == child.trace_id && child.parent_span_id == Some(parent.span_id)
    }

    /// Whether `from` has a span link to `to`'s span context.
    pub fn is_linked_to(&self, from: &ReceivedSpan, to: &ReceivedSpan) -> bool {
        from.links_to(to)
    }

    /// Every trace rendered as a text tree (see [`render_tree`]).
    pub fn render_all(&self) -> String {
        render_tree(&self.spans)
    }

    /// One trace rendered as a text tree, without header (see [`render_trace`]).
    pub fn render(&self, trace_id: TraceId) -> String {
        render_trace(&self.spans, trace_id)
    }

    // ----- assertions -------------------------------------------------------------

    /// Panics with `message` followed by the rendered trees.
    #[allow(clippy::panic)] // Assertion helper: panicking is its purpose.
    #[track_caller]
    fn fail(&self, message: &str) -> ! {
        panic!(
            "{message}\n--- received {} span(s) ---\n{}",
            self.spans.len(),
            self.render_all()
        )
    }

    /// The only span with this name; panics (showing the trees) when there is none or
    /// more than one.
    #[track_caller]
    pub fn one(&self, name: &str) -> &ReceivedSpan {
        self.one_where(|s| s.name == name, &format!("named {name:?}"))
    }

    /// The only span matching `pred`; panics (showing the trees and `description`)
    /// when there is none or more than one.
    #[track_caller]
    pub fn one_where(
        &self,
        pred: impl Fn(&ReceivedSpan) -> bool,
        description: &str,
    ) -> &ReceivedSpan {
        let found: Vec<&ReceivedSpan> = self.spans.iter().filter(|s| pred(s)).collect();
        match found.as_slice() {
            [one] => one,
            [] => self.fail(&format!(
                "expected exactly one span {description}, found none"
            )),
            many => {
                let lines: Vec<String> = many
                    .iter()
                    .map(|s| format!("  {} span {}", render_span_line(s), s.span_id))
                    .collect();
                self.fail(&format!(
                    "expected exactly one span {description}, found {}:\n{}",
                    many.len(),
                    lines.join("\n")
                ))
            }
        }
    }

    /// Asserts that there is exactly `n` spans; panics (showing the trees) otherwise.
    #[track_caller]
    pub fn assert_len(&self, n: usize) {
        if self.spans.len() != n {
            self.fail(&format!("expected {n} span(s), got {}", self.spans.len()));
        }
    }

    /// Asserts that every span belongs to one and the same trace and returns its id;
    /// panics (showing the trees) when the set is empty or spans several traces.
    #[track_caller]
    pub fn assert_single_trace(&self) -> TraceId {
        let ids = self.trace_ids();
        match ids.as_slice() {
            [one] => *one,
            [] => self.fail("expected a single trace, but no span was received"),
            many => self.fail(&format!(
                "expected a single trace, found {} traces",
                many.len()
            )),
        }
    }

    /// Asserts that the only span named `child_name` is a direct child of the only span
    /// named `parent_name`; panics (showing the trees) otherwise.
    #[track_caller]
    pub fn assert_parent(&self, child_name: &str, parent_name: &str) {
        let child = self.one(child_name);
        let parent = self.one(parent_name);
        if !self.is_parent_of(parent, child) {
            let actual = match (child.parent_span_id, self.parent_of(child)) {
                (None, _) => "it is a root span".to_owned(),
                (Some(_), Some(p)) => format!("its parent is {:?}", p.name),
                (Some(id), None) => format!("its parent {id} was not received"),
            };
            self.fail(&format!(
                "expected span {child_name:?} to be a child of {parent_name:?}, but {actual}"
            ));
        }
    }

    /// Asserts that the only span named `from_name` has a span link to the only span
    /// named `to_name`; panics (showing the trees) otherwise.
    #[track_caller]
    pub fn assert_linked(&self, from_name: &str, to_name: &str) {
        let from = self.one(from_name);
        let to = self.one(to_name);
        if !from.links_to(to) {
            self.fail(&format!(
                "expected span {from_name:?} to link to {to_name:?} ({} {}), but its links are {:?}",
                to.trace_id,
                to.span_id,
                from.links
                    .iter()
                    .map(|l| format!("{} {}", l.trace_id, l.span_id))
                    .collect::<Vec<_>>()
            ));
        }
    }

    /// Asserts that no span has an error status; panics (showing the trees) otherwise.
    #[track_caller]
    pub fn assert_no_errors(&self) {
        let errors: Vec<&str> = self
            .spans
            .iter()
            .filter(|s| s.is_error())
            .map(|s| s.name.as_str())
            .collect();
        if !errors.is_empty() {
            self.fail(&format!("expected no error span, found {errors:?}"));
        }
    }
}

impl fmt::Display for SpanSet {
    /// Same text as [`SpanSet::render_all`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render_all())
    }
}

impl From<Vec<ReceivedSpan>> for SpanSet {
    fn from(spans: Vec<ReceivedSpan>) -> Self {
        SpanSet::new(spans)
    }
}

impl FromIterator<ReceivedSpan> for SpanSet {
    fn from_iter<I: IntoIterator<Item = ReceivedSpan>>(iter: I) -> Self {
        SpanSet::new(iter.into_iter().collect())
    }
}

impl IntoIterator for SpanSet {
    type Item = ReceivedSpan;
    type IntoIter = std::vec::IntoIter<ReceivedSpan>;
    fn into_iter(self) -> Self::IntoIter {
        self.spans.into_iter()
    }
}

impl<'a> IntoIterator for &'a SpanSet {
    type Item = &'a ReceivedSpan;
    type IntoIter = std::slice::Iter<'a, ReceivedSpan>;
    fn into_iter(self) -> Self::IntoIter {
        self.spans.iter()
    }
}
