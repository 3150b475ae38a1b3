//! Rendering and span-set queries on hand-built spans (no network).

// Test helpers outside #[test] functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mindbus_otel_testkit::{
    AttrValue, ReceivedLink, ReceivedSpan, ReceivedStatus, SpanSet, StatusCode, format_duration,
    render_span_line, render_tree,
};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};

const T1: TraceId = TraceId::from_bytes([0x4b; 16]);
const T2: TraceId = TraceId::from_bytes([0x01; 16]);

fn span(
    trace_id: TraceId,
    id: u8,
    parent: Option<u8>,
    name: &str,
    service: &str,
    start_us: u64,
    end_us: u64,
) -> ReceivedSpan {
    ReceivedSpan {
        trace_id,
        span_id: SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, id]),
        parent_span_id: parent.map(|p| SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, p])),
        name: name.into(),
        service_name: Some(service.into()),
        start_unix_nanos: start_us * 1_000,
        end_unix_nanos: end_us * 1_000,
        ..Default::default()
    }
}

/// The example tree of the crate documentation, given in scrambled order.
fn agent_tree() -> SpanSet {
    let mut publish = span(
        T1,
        2,
        Some(1),
        "publish mindbus.main",
        "orchestrator",
        500,
        1_700,
    );
    publish.kind = SpanKind::Producer;
    let mut process = span(
        T1,
        3,
        Some(2),
        "process agent.writer",
        "writer",
        2_000,
        9_200,
    );
    process.kind = SpanKind::Consumer;
    process.links.push(ReceivedLink {
        trace_id: T1,
        span_id: publish.span_id,
        attributes: vec![],
    });
    let mut llm = span(T1, 4, Some(3), "llm_call", "writer", 2_200, 9_000);
    llm.status = ReceivedStatus {
        code: StatusCode::Error,
        message: "rate limited".into(),
    };
    llm.attributes = vec![
        ("gen_ai.request.model".into(), AttrValue::from("small")),
        ("gen_ai.usage.input_tokens".into(), AttrValue::I64(120)),
    ];
    let root = span(T1, 1, None, "execute_task", "orchestrator", 0, 10_500);
    // A sibling of llm_call starting earlier, to check ordering by start time.
    let lookup = span(T1, 5, Some(3), "memory_lookup", "writer", 2_100, 2_150);
    SpanSet::new(vec![llm, process, lookup, root, publish])
}

#[test]
fn durations_are_human_readable() {
    let cases = [
        (Duration::from_nanos(0), "0ns"),
        (Duration::from_nanos(420), "420ns"),
        (Duration::from_nanos(999), "999ns"),
        (Duration::from_micros(1), "1µs"),
        (Duration::from_micros(850), "850µs"),
        (Duration::from_nanos(999_999), "999µs"),
        (Duration::from_micros(1_000), "1.0ms"),
        (Duration::from_micros(7_240), "7.2ms"),
        (Duration::from_micros(7_250), "7.3ms"),
        (Duration::from_micros(10_500), "10.5ms"),
        (Duration::from_micros(999_940), "999.9ms"),
        (Duration::from_micros(999_960), "1.0s"),
        (Duration::from_millis(10_500), "10.5s"),
        (Duration::from_millis(59_960), "1m00s"),
        (Duration::from_secs(125), "2m05s"),
    ];
    for (d, expected) in cases {
        assert_eq!(format_duration(d), expected, "{d:?}");
    }
}

#[test]
fn renders_trees_sorted_by_start_time() {
    let set = agent_tree();
    assert_eq!(
        set.render(T1),
        "execute_task (orchestrator) 10.5ms\n\
         \x20 publish mindbus.main (orchestrator) 1.2ms [producer]\n\
         \x20   process agent.writer (writer) 7.2ms [consumer]\n\
         \x20     memory_lookup (writer) 50µs\n\
         \x20     llm_call (writer) 6.8ms !error: rate limited\n"
    );
    assert_eq!(
        set.render_all(),
        format!("trace {T1} (5 spans)\n{}", set.render(T1))
    );
    assert_eq!(set.to_string(), set.render_all());
}

#[test]
fn orphans_are_rendered_as_roots_with_a_note() {
    let set = SpanSet::new(vec![
        span(T2, 7, Some(0x99), "late child", "svc", 5, 10),
        span(T2, 8, Some(7), "grandchild", "svc", 6, 9),
        span(T2, 9, None, "true root", "svc", 1, 20),
    ]);
    assert_eq!(
        set.render(T2),
        "true root (svc) 19µs\n\
         late child (svc) 5µs (parent 0000000000000099 not received)\n\
         \x20 grandchild (svc) 3µs\n"
    );
    let roots: Vec<&str> = set.roots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(roots, ["true root", "late child"]);
    assert!(set.parent_of(set.one("late child")).is_none());
}

#[test]
fn several_traces_render_in_start_order_with_headers() {
    let mut spans = agent_tree().into_vec();
    let mut other = span(T2, 1, None, "heartbeat", "monitor", 0, 1);
    other.start_unix_nanos = 0; // earlier than the agent trace
    other.service_name = None;
    spans.push(other);
    let text = render_tree(&spans);
    let expected_start =
        format!("trace {T2} (1 spans)\nheartbeat (?) 1µs\n\ntrace {T1} (5 spans)\n");
    assert!(text.starts_with(&expected_start), "{text}");
    assert_eq!(render_tree(&[]), "(no spans)\n");
    assert_eq!(
        SpanSet::default().render(T1),
        format!("(no spans in trace {T1})\n")
    );
}

#[test]
fn parent_cycles_do_not_loop() {
    let set = SpanSet::new(vec![
        span(T2, 1, Some(2), "a", "svc", 1, 2),
        span(T2, 2, Some(1), "b", "svc", 3, 4),
        span(T2, 3, Some(3), "self", "svc", 5, 6),
    ]);
    let text = set.render(T2);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("(parent cycle)"), "{text}");
    assert!(text.contains("self (svc) 1µs (parent is itself)"), "{text}");
    assert_eq!(set.ancestors(set.one("a")).len(), 1);
}

#[test]
fn span_lines_show_kind_and_error() {
    let mut s = span(T1, 1, None, "op", "svc", 0, 1_200);
    assert_eq!(render_span_line(&s), "op (svc) 1.2ms");
    s.kind = SpanKind::Server;
    s.status.code = StatusCode::Error;
    assert_eq!(render_span_line(&s), "op (svc) 1.2ms [server] !error");
}

#[test]
fn queries_navigate_the_tree() {
    let set = agent_tree();
    assert_eq!(set.len(), 5);
    assert!(!set.is_empty());
    assert_eq!(set.trace_ids(), vec![T1]);
    assert_eq!(set.assert_single_trace(), T1);
    let root = set.one("execute_task");
    let process = set.one("process agent.writer");
    let llm = set.one("llm_call");
    let names = |v: Vec<&ReceivedSpan>| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(set.children_of(process)),
        ["memory_lookup", "llm_call"]
    );
    assert_eq!(
        names(set.ancestors(llm)),
        [
            "process agent.writer",
            "publish mindbus.main",
            "execute_task"
        ]
    );
    assert!(set.ancestors(root).is_empty());
    assert_eq!(set.parent_of(llm), Some(process));
    assert_eq!(names(set.roots()), ["execute_task"]);
    assert_eq!(set.by_service("writer").len(), 3);
    assert_eq!(set.by_kind(SpanKind::Producer).len(), 1);
    assert_eq!(set.filter(ReceivedSpan::is_error).len(), 1);
    assert_eq!(set.find("nope"), None);
    assert_eq!(set.find_all("llm_call"), vec![llm]);
    assert_eq!(set.trace(T2).len(), 0);
    assert!(set.is_linked_to(process, set.one("publish mindbus.main")));
    assert!(!set.is_linked_to(llm, process));
    set.assert_parent("llm_call", "process agent.writer");
    set.assert_linked("process agent.writer", "publish mindbus.main");
    assert_eq!(llm.attr_str("gen_ai.request.model"), Some("small"));
    assert_eq!(llm.attr_i64("gen_ai.usage.input_tokens"), Some(120));
    assert_eq!(llm.attr_f64("gen_ai.usage.input_tokens"), None);
    assert_eq!(
        set.one_where(
            |s| s.attr_i64("gen_ai.usage.input_tokens") == Some(120),
            "with 120 tokens"
        )
        .name,
        "llm_call"
    );
    assert_eq!((&set).into_iter().count(), 5);
}

#[test]
fn attr_values_display_and_convert() {
    let v = AttrValue::KvList(vec![
        (
            "a".into(),
            AttrValue::Array(vec![AttrValue::I64(1), AttrValue::F64(2.5)]),
        ),
        ("b".into(), AttrValue::Bytes(vec![0x0a, 0xff])),
        ("c".into(), AttrValue::Bool(false)),
        ("d".into(), AttrValue::Empty),
    ]);
    assert_eq!(
        v.to_string(),
        "{a: [1, 2.5], b: 0x0aff, c: false, d: <empty>}"
    );
    assert_eq!(AttrValue::from("x").as_str(), Some("x"));
    assert_eq!(AttrValue::from(3_i64).as_i64(), Some(3));
    assert_eq!(AttrValue::from(0.5).as_f64(), Some(0.5));
    assert_eq!(AttrValue::from(true).as_bool(), Some(true));
    assert_eq!(AttrValue::from(true).as_str(), None);
}

#[test]
#[should_panic(expected = "expected exactly one span named \"llm_call\", found 2")]
fn one_panics_on_duplicates_with_the_trees() {
    let mut spans = agent_tree().into_vec();
    spans.push(span(T1, 9, Some(3), "llm_call", "writer", 9_100, 9_150));
    SpanSet::new(spans).one("llm_call");
}

#[test]
fn failure_messages_include_the_rendered_trees() {
    let set = agent_tree();
    let message = |f: &(dyn Fn() + std::panic::RefUnwindSafe)| {
        let err = std::panic::catch_unwind(f).expect_err("should panic");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let m = message(&|| {
        set.one("missing");
    });
    assert!(
        m.starts_with("expected exactly one span named \"missing\", found none"),
        "{m}"
    );
    assert!(m.contains("--- received 5 span(s) ---"), "{m}");
    assert!(
        m.contains("\n      llm_call (writer) 6.8ms !error: rate limited\n"),
        "{m}"
    );

    let m = message(&|| set.assert_parent("llm_call", "execute_task"));
    assert!(
        m.starts_with("expected span \"llm_call\" to be a child of \"execute_task\", but its parent is \"process agent.writer\""),
        "{m}"
    );
    let m = message(&|| set.assert_no_errors());
    assert!(
        m.starts_with("expected no error span, found [\"llm_call\"]"),
        "{m}"
    );
    let m = message(&|| set.assert_len(2));
    assert!(m.starts_with("expected 2 span(s), got 5"), "{m}");
    let m = message(&|| set.assert_linked("llm_call", "execute_task"));
    assert!(
        m.starts_with("expected span \"llm_call\" to link to \"execute_task\""),
        "{m}"
    );
    let m = message(&|| {
        SpanSet::default().assert_single_trace();
    });
    assert!(
        m.starts_with("expected a single trace, but no span was received"),
        "{m}"
    );
}
