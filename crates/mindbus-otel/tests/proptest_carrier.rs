//! Property tests of the AMQP header carrier and of trace-context
//! extraction: any header table (every `AMQPValue` type, nested, huge or
//! non-UTF-8 values) is handled without a panic, oversized values are
//! judged by their first `cap + 1` bytes only, and valid contexts
//! round-trip through inject and extract.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_otel::carrier::{
    HeaderExtractor, HeaderValue, MAX_HEADER_VALUE_LEN, value_text, value_text_capped,
};
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::message::Delivery;
use mindbus_otel::lapin::options::BasicPublishOptions;
use mindbus_otel::lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldTable, LongString, ShortString,
};
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::baggage::{Baggage, BaggageExt};
use mindbus_otel::opentelemetry::propagation::Extractor;
use mindbus_otel::opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use mindbus_otel::w3c::{self, MAX_BAGGAGE_LEN, MAX_TRACEPARENT_LEN, MAX_TRACESTATE_HEADER_LEN};
use mindbus_otel::{InterceptorChain, RejectReason, TraceContext, hook_panics};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------- running

/// Everything an extraction produced, comparable.
#[derive(Debug, PartialEq)]
struct Outcome {
    parent: Option<(TraceId, SpanId, bool, String)>,
    baggage: Vec<(String, String, String)>,
    rejected: Vec<u64>,
    sources: [u64; 3],
    baggage_dropped: u64,
}

fn outcome(tc: &TraceContext, cx: &Context) -> Outcome {
    let span = cx.span();
    let sc = span.span_context();
    let parent = sc.is_valid().then(|| {
        (
            sc.trace_id(),
            sc.span_id(),
            sc.is_sampled(),
            sc.trace_state().header(),
        )
    });
    let mut baggage: Vec<(String, String, String)> = cx
        .baggage()
        .iter()
        .map(|(k, (v, m))| (k.to_string(), v.to_string(), m.as_str().to_owned()))
        .collect();
    baggage.sort();
    let s = tc.stats();
    Outcome {
        parent,
        baggage,
        rejected: RejectReason::ALL.iter().map(|r| s.rejected(*r)).collect(),
        sources: [
            s.extracted_from_headers(),
            s.extracted_from_body(),
            s.missing(),
        ],
        baggage_dropped: s.baggage_members_dropped(),
    }
}

/// Delivers one message through a fresh `TraceContext` and returns it with
/// the extracted context.
fn deliver_with(
    tc: TraceContext,
    headers: Option<FieldTable>,
    body: &[u8],
) -> (TraceContext, Context) {
    let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, body.to_vec());
    if let Some(h) = headers {
        d.properties = BasicProperties::default().with_headers(h);
    }
    let cx = chain.start_delivery(&d, "q", false).context().clone();
    (tc, cx)
}

fn extract(headers: Option<FieldTable>, body: &[u8]) -> Outcome {
    let (tc, cx) = deliver_with(TraceContext::default(), headers, body);
    outcome(&tc, &cx)
}

fn long(bytes: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(bytes.into()))
}

// ------------------------------------------------------------- strategies

/// Bytes: mostly small and arbitrary, sometimes text that looks like trace
/// context, sometimes up to 1 MiB.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => vec(any::<u8>(), 0..64),
        6 => context_text().prop_map(String::into_bytes),
        1 => (any::<u8>(), 0usize..(1 << 20)).prop_map(|(b, n)| vec![b; n]),
    ]
}

/// Text that is, or nearly is, a trace-context value.
fn context_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(TP.to_owned()),
        Just(TP.to_uppercase()),
        Just(TP.replace("-01", "-03")),
        Just(format!("cc{}-future", &TP[2..])),
        Just(format!("ff{}", &TP[2..])),
        "[0-9a-f-]{50,60}",
        "[a-z0-9@_*/=, \t-]{0,120}",
        "[a-zA-Z0-9=,;% \t!#$&'*+.^_`|~\"\\\\-]{0,200}",
        ".{0,40}",
    ]
}

fn short_string() -> impl Strategy<Value = ShortString> {
    ".{0,40}".prop_map(ShortString::from)
}

/// Header names: the W3C ones in any case, and anything else.
fn key() -> impl Strategy<Value = ShortString> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "traceparent", "Traceparent", "TRACEPARENT", "tracestate", "TraceState",
            "baggage", "Baggage", "x-trace-id",
        ])
        .prop_map(ShortString::from),
        2 => "[ -~]{0,20}".prop_map(ShortString::from),
        1 => short_string(),
    ]
}

/// Any AMQP value, of every type, nested up to 4 levels.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        1 => any::<bool>().prop_map(AMQPValue::Boolean),
        1 => any::<i8>().prop_map(AMQPValue::ShortShortInt),
        1 => any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        1 => any::<i16>().prop_map(AMQPValue::ShortInt),
        1 => any::<u16>().prop_map(AMQPValue::ShortUInt),
        1 => any::<i32>().prop_map(AMQPValue::LongInt),
        1 => any::<u32>().prop_map(AMQPValue::LongUInt),
        1 => any::<i64>().prop_map(AMQPValue::LongLongInt),
        1 => any::<f32>().prop_map(AMQPValue::Float),
        1 => any::<f64>().prop_map(AMQPValue::Double),
        1 => (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        1 => short_string().prop_map(AMQPValue::ShortString),
        1 => any::<u64>().prop_map(AMQPValue::Timestamp),
        1 => Just(AMQPValue::Void),
        4 => bytes().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        2 => bytes().prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| AMQPValue::FieldArray(v.into())),
            btree_map(key(), inner, 0..6).prop_map(|m| AMQPValue::FieldTable(m.into())),
        ]
    })
}

fn table() -> impl Strategy<Value = FieldTable> {
    btree_map(key(), amqp_value(), 0..10).prop_map(FieldTable::from)
}

/// Bodies: arbitrary bytes or CloudEvents carrying arbitrary trace context.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        bytes(),
        (context_text(), context_text()).prop_map(|(tp, ts)| {
            serde_json::json!({
                "specversion": "1.0", "type": "ai.team.event", "id": "1", "source": "p",
                "traceparent": tp, "tracestate": ts,
            })
            .to_string()
            .into_bytes()
        }),
    ]
}

/// A W3C `tracestate` key (simple or multi-tenant).
fn ts_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_*/-]{0,7}",
        "[a-z0-9][a-z0-9_*/-]{0,5}@[a-z][a-z0-9_*/-]{0,4}",
    ]
}

/// A W3C `tracestate` value.
fn ts_value() -> impl Strategy<Value = String> {
    "[ -+\\--<>-~]{0,8}[!-+\\--<>-~]"
}

/// A valid trace state: distinct keys, at most 32 members, at most 512
/// characters.
fn trace_state() -> impl Strategy<Value = TraceState> {
    vec((ts_key(), ts_value()), 0..=32).prop_filter_map("over 512 characters", |kvs| {
        let mut seen = std::collections::HashSet::new();
        let kvs: Vec<_> = kvs
            .into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        let len: usize = kvs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if len > 513 {
            return None;
        }
        TraceState::from_key_value(kvs).ok()
    })
}

/// An RFC 7230 token.
fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,8}"
}

/// Baggage properties (`;`-separated, as the API stores them).
fn properties() -> impl Strategy<Value = String> {
    vec(
        (token(), proptest::option::of("[!#-+\\--:<-\\[\\]-~]{0,6}")),
        0..3,
    )
    .prop_map(|ps| {
        ps.into_iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v}"),
                None => k,
            })
            .collect::<Vec<_>>()
            .join(";")
    })
}

/// Baggage small enough to be sent whole: any Unicode values.
fn small_baggage() -> impl Strategy<Value = Vec<(String, String, String)>> {
    vec((token(), ".{0,12}", properties()), 0..16)
}

// ------------------------------------------------------------------ tests

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any header table and body: no panic (the chain would catch and count
    /// it), exactly one source, and every extracted value within limits and
    /// equal to what a direct parse of the header gives.
    #[test]
    fn extraction_of_any_table_never_panics_and_stays_within_limits(
        headers in proptest::option::of(table()),
        body in body(),
    ) {
        let panics = hook_panics();
        let out = extract(headers.clone(), &body);
        prop_assert_eq!(hook_panics(), panics, "a hook panicked");
        prop_assert_eq!(out.sources.iter().sum::<u64>(), 1);
        prop_assert!(out.rejected.iter().sum::<u64>() <= 4, "{:?}", out.rejected);
        prop_assert!(out.baggage.len() <= w3c::MAX_BAGGAGE_KEPT_MEMBERS);
        let x = HeaderExtractor::new(headers.as_ref());
        let tp_header = x.lookup_capped("traceparent", MAX_TRACEPARENT_LEN, RejectReason::Oversized);
        let from_header = match tp_header {
            HeaderValue::Text(t) => w3c::parse_traceparent(t).ok(),
            _ => None,
        };
        if let Some((trace_id, span_id, _, ts)) = &out.parent {
            prop_assert!(ts.len() <= w3c::MAX_TRACESTATE_LEN);
            prop_assert!(ts.split(',').filter(|m| !m.is_empty()).count() <= w3c::MAX_TRACESTATE_MEMBERS);
            if let Some(sc) = from_header {
                prop_assert_eq!(out.sources, [1, 0, 0]);
                prop_assert_eq!((sc.trace_id(), sc.span_id()), (*trace_id, *span_id));
            } else {
                prop_assert_eq!(out.sources, [0, 1, 0]);
            }
        } else {
            prop_assert!(from_header.is_none());
            prop_assert_eq!(out.sources, [0, 0, 1]);
        }
    }

    /// The carrier against a reference: exact name first, then the first
    /// ASCII-case-insensitive match; capped lookups never look past the cap.
    #[test]
    fn header_lookups_match_the_reference(
        t in table(),
        probes in vec(key(), 0..6),
        cap in prop_oneof![0usize..64, Just(MAX_HEADER_VALUE_LEN)],
    ) {
        let x = HeaderExtractor::new(Some(&t));
        let mut keys = x.keys();
        keys.sort_unstable();
        let mut expected: Vec<&str> = t.inner().keys().map(ShortString::as_str).collect();
        expected.sort_unstable();
        prop_assert_eq!(keys, expected);
        let probes: Vec<String> = t
            .inner()
            .keys()
            .flat_map(|k| [k.as_str().to_owned(), k.as_str().to_ascii_uppercase()])
            .chain(probes.iter().map(|p| p.as_str().to_owned()))
            .collect();
        for probe in &probes {
            let raw = t.inner().get(probe.as_str()).or_else(|| {
                t.inner()
                    .iter()
                    .find(|(k, _)| k.as_str().eq_ignore_ascii_case(probe))
                    .map(|(_, v)| v)
            });
            let reason = RejectReason::TracestateOversized;
            match raw {
                None => {
                    prop_assert_eq!(x.lookup(probe), HeaderValue::Missing);
                    prop_assert_eq!(x.lookup_capped(probe, cap, reason), HeaderValue::Missing);
                    prop_assert!(!x.contains(probe));
                }
                Some(v) => {
                    prop_assert!(x.contains(probe));
                    let full = match value_text(v) {
                        Ok(s) => HeaderValue::Text(s),
                        Err(r) => HeaderValue::Unreadable(r),
                    };
                    prop_assert_eq!(x.lookup(probe), full);
                    let len = match v {
                        AMQPValue::LongString(s) => Some(s.len()),
                        AMQPValue::ShortString(s) => Some(s.as_str().len()),
                        AMQPValue::ByteArray(b) => Some(b.len()),
                        _ => None,
                    };
                    let capped = x.lookup_capped(probe, cap, reason);
                    match len {
                        Some(n) if n > cap => prop_assert_eq!(capped, HeaderValue::Unreadable(reason)),
                        _ => prop_assert_eq!(capped, full),
                    }
                    prop_assert_eq!(
                        value_text_capped(v, cap, reason).ok(),
                        match capped { HeaderValue::Text(s) => Some(s), _ => None }
                    );
                    // What a propagator reads: capped at MAX_HEADER_VALUE_LEN.
                    let got = Extractor::get(&x, probe);
                    match x.lookup_capped(probe, MAX_HEADER_VALUE_LEN, reason) {
                        HeaderValue::Text(s) => prop_assert_eq!(got, Some(s)),
                        _ => prop_assert_eq!(got, None),
                    }
                }
            }
        }
    }

    /// The W3C parsers never panic on any text, and what they accept is
    /// formatted back unchanged (no member lost) and parses to the same.
    #[test]
    fn parsers_accept_what_they_format(s in prop_oneof![context_text(), ".{0,300}"]) {
        let _ = w3c::parse_traceparent(&s);
        if let Ok(ts) = w3c::parse_tracestate(&s) {
            let (out, dropped) = w3c::format_tracestate_limited(&ts);
            prop_assert_eq!(dropped, 0);
            prop_assert_eq!(&out, &ts.header());
            prop_assert_eq!(w3c::parse_tracestate(&out).ok(), Some(ts));
        }
        if let Ok(parsed) = w3c::parse_baggage_counted(&s) {
            let (out, dropped) = w3c::format_baggage_limited(&parsed.baggage);
            prop_assert_eq!(dropped, 0);
            let again = w3c::parse_baggage_counted(&out).expect("what we format parses");
            prop_assert_eq!(again.dropped, 0);
            prop_assert_eq!(sorted(&again.baggage), sorted(&parsed.baggage));
        }
    }
}

fn sorted(b: &Baggage) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = b
        .iter()
        .map(|(k, (v, m))| (k.to_string(), v.to_string(), m.as_str().to_owned()))
        .collect();
    v.sort();
    v
}

/// The header value for `name` of a test message: `bytes` as a LongString
/// or a ByteArray, next to a valid traceparent (unless `name` is it).
fn message_with(name: &str, bytes: Vec<u8>, as_byte_array: bool) -> FieldTable {
    let mut t = FieldTable::default();
    if name != "traceparent" {
        t.insert("traceparent".into(), long(TP));
    }
    let v = if as_byte_array {
        AMQPValue::ByteArray(ByteArray::from(bytes))
    } else {
        long(bytes)
    };
    t.insert(name.into(), v);
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A value over its cap (up to 1 MiB over) gives exactly the result of
    /// the same value cut to `cap + 1` bytes: nothing past the cap is looked
    /// at, and it is rejected as oversized whatever it holds.
    #[test]
    fn oversized_values_are_judged_by_their_first_cap_plus_one_bytes(
        which in 0usize..3,
        prefix in context_text(),
        fill in any::<u8>(),
        over in 1usize..(1 << 20),
        as_byte_array in any::<bool>(),
    ) {
        let (name, cap, reason) = [
            ("traceparent", MAX_TRACEPARENT_LEN, RejectReason::Oversized),
            ("tracestate", MAX_TRACESTATE_HEADER_LEN, RejectReason::TracestateOversized),
            ("baggage", MAX_BAGGAGE_LEN, RejectReason::BaggageOversized),
        ][which];
        let mut value = prefix.into_bytes();
        value.truncate(cap);
        value.resize(cap + over, fill);
        let cut = value[..=cap].to_vec();
        let big = extract(Some(message_with(name, value, as_byte_array)), b"");
        let small = extract(Some(message_with(name, cut, as_byte_array)), b"");
        prop_assert_eq!(&big, &small);
        let mut expected = vec![0u64; RejectReason::ALL.len()];
        expected[RejectReason::ALL.iter().position(|r| *r == reason).unwrap()] = 1;
        prop_assert_eq!(&big.rejected, &expected);
        prop_assert_eq!(big.parent.is_some(), name != "traceparent");
    }

    /// A valid context (trace id, span id, sampled flag, trace state and
    /// baggage of any Unicode values with properties) round-trips through
    /// inject and extract, with nothing rejected.
    #[test]
    fn valid_contexts_round_trip(
        trace_id in 1u128..,
        span_id in 1u64..,
        sampled in any::<bool>(),
        ts in trace_state(),
        bag in small_baggage(),
    ) {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let sc = SpanContext::new(TraceId::from(trace_id), SpanId::from(span_id), flags, false, ts.clone());
        let mut baggage = Baggage::new();
        for (k, v, m) in &bag {
            baggage.insert_with_metadata(k.clone(), v.clone(), m.clone());
        }
        let expected_baggage = sorted(&baggage);
        let cx = Context::new().with_remote_span_context(sc).with_baggage(baggage);
        let tc = TraceContext::default();
        let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
        let headers = {
            let _guard = cx.attach();
            let (props, _state) = chain.start_publish(
                "mindbus.main", "cmd.x", BasicPublishOptions::default(), b"{}", BasicProperties::default(),
            );
            props.headers().clone().expect("headers written")
        };
        prop_assert_eq!(tc.stats().injected(), 1);
        prop_assert_eq!(tc.stats().outbound_members_dropped(), 0);
        let (rx, got) = deliver_with(TraceContext::default(), Some(headers), b"");
        let out = outcome(&rx, &got);
        prop_assert_eq!(out.parent, Some((TraceId::from(trace_id), SpanId::from(span_id), sampled, ts.header())));
        prop_assert_eq!(out.baggage, expected_baggage);
        prop_assert_eq!(out.rejected.iter().sum::<u64>(), 0);
        prop_assert_eq!(out.sources, [1, 0, 0]);
    }

    /// Baggage of any size is sent within the W3C limits; what is received
    /// is a subset of what was sent, and every member left out is counted.
    #[test]
    fn any_baggage_is_sent_within_limits_and_losses_are_counted(
        bag in vec((token(), ".{0,200}"), 0..80),
    ) {
        let mut baggage = Baggage::new();
        for (k, v) in &bag {
            baggage.insert(k.clone(), v.clone());
        }
        let sent = sorted(&baggage);
        let tc = TraceContext::default();
        let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
        let headers = {
            let _guard = Context::new().with_baggage(baggage).attach();
            let (props, _state) = chain.start_publish(
                "x", "y", BasicPublishOptions::default(), b"", BasicProperties::default(),
            );
            props.headers().clone().unwrap_or_default()
        };
        let header_len = match headers.inner().get("baggage") {
            Some(AMQPValue::LongString(s)) => s.len(),
            _ => 0,
        };
        prop_assert!(header_len <= MAX_BAGGAGE_LEN);
        let (rx, got) = deliver_with(TraceContext::default(), Some(headers), b"");
        let received = outcome(&rx, &got).baggage;
        let sent_map: BTreeMap<_, _> = sent.iter().map(|(k, v, m)| (k, (v, m))).collect();
        for (k, v, m) in &received {
            prop_assert_eq!(sent_map.get(k), Some(&(v, m)));
        }
        prop_assert_eq!(
            received.len() as u64 + tc.stats().outbound_members_dropped(),
            sent.len() as u64
        );
        prop_assert_eq!(rx.stats().rejected_total(), 0);
    }
}
