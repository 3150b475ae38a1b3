//! Property tests of the MindBus envelope reader against a reference built
//! on `serde_json::Value`: any bytes are read without a panic; any JSON
//! object yields exactly the fields found at the known keys; the kind and
//! format follow the documented rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_otel::envelope::MAX_PARSED_BODY;
use mindbus_otel::{BodyFormat, Envelope, MessageKind};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Value};

// -------------------------------------------------------------- reference

#[path = "support/envelope_reference.rs"]
mod envelope_reference;

use envelope_reference::{Facts, reference_facts as reference};

/// What the reader says about `body`.
fn read(routing_key: &str, body: &[u8]) -> Facts {
    facts(&Envelope::read(routing_key, body))
}

/// Every accessor of an envelope's view (which agrees with the envelope).
fn facts(env: &Envelope) -> Facts {
    let v = env.view();
    assert_eq!(env.kind(), v.kind());
    assert_eq!(env.format(), v.format());
    envelope_reference::read(env)
}

// ------------------------------------------------------------- strategies

const KNOWN_KEYS: [&str; 21] = [
    "specversion",
    "type",
    "id",
    "source",
    "subject",
    "traceparent",
    "tracestate",
    "data",
    "action",
    "status",
    "error",
    "code",
    "metrics",
    "model",
    "tokens_used",
    "cost_usd",
    "estimated_cost_usd",
    "latency_ms",
    "output",
    "quality_score",
    "execution_time_ms",
];

fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "cmd.writer.any",
            "evt.task.completed",
            "ctl.all.stop",
            "cmd.",
            "cmd",
            "CMD.x",
            "amq.gen-1",
            "",
        ])
        .prop_map(str::to_owned),
        ".{0,20}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KNOWN_KEYS.to_vec()).prop_map(str::to_owned),
        1 => ".{0,12}",
        1 => prop::sample::select(KNOWN_KEYS.to_vec()).prop_map(|k| format!("{k} ")),
    ]
}

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "ai.team.command",
            "ai.team.result",
            "ai.team.error",
            "ai.team.event",
            "ai.team.control",
            "ai.team.other",
            "1.0",
            " 12.5 ",
            "1e3",
            "-0",
            "inf",
            "NaN",
            "1e400",
            "",
        ])
        .prop_map(str::to_owned),
        ".{0,24}",
        "[\"\\\\\\u{0}-\\u{1f}a\u{e9}\u{1F600}]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        3 => string().prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..8)
                .prop_map(|kvs| Value::Object(kvs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A JSON object whose top level and `data` often hold the known keys.
fn object() -> impl Strategy<Value = Map<String, Value>> {
    let data = vec((key(), value()), 0..8)
        .prop_map(|kvs| Value::Object(kvs.into_iter().collect::<Map<_, _>>()));
    (vec((key(), value()), 0..10), proptest::option::of(data)).prop_map(|(kvs, data)| {
        let mut m: Map<String, Value> = kvs.into_iter().collect();
        if let Some(d) = data {
            m.insert("data".to_owned(), d);
        }
        m
    })
}

/// The object serialised compactly or pretty, with white space around.
fn serialised(m: &Map<String, Value>, pretty: bool, pad: &str) -> Vec<u8> {
    let v = Value::Object(m.clone());
    let json = if pretty {
        serde_json::to_string_pretty(&v)
    } else {
        serde_json::to_string(&v)
    }
    .expect("serialisable");
    format!("{pad}{json}{pad}").into_bytes()
}

/// Bytes: arbitrary, or real-looking JSON with a few bytes changed or cut.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..256),
        (
            object(),
            vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            any::<prop::sample::Index>()
        )
            .prop_map(|(m, edits, cut)| {
                let mut b = serialised(&m, false, "");
                for (at, byte) in edits {
                    if !b.is_empty() {
                        let i = at.index(b.len());
                        b[i] = byte;
                    }
                }
                let keep = cut.index(b.len() + 1);
                if keep * 4 > b.len() {
                    b.truncate(keep.max(1));
                }
                b
            }),
        "[ \t\r\n\u{c}]{0,8}".prop_map(String::into_bytes),
        "[\\[\\]{}\":,0-9a-z ]{0,64}".prop_map(String::into_bytes),
    ]
}

#[path = "support/fixtures.rs"]
#[allow(dead_code)]
mod support_fixtures;

/// The real MindBus fixtures, as routing keys and bodies.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    support_fixtures::NAMES
        .iter()
        .map(|name| {
            let f = support_fixtures::fixture(name);
            (f.routing_key, f.body)
        })
        .collect()
}

// ------------------------------------------------------------------ tests

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Any bytes: no panic, accessors agree with the format, the kind rule
    /// holds, the envelope outlives its payload, and wherever
    /// `serde_json::Value` can parse the body the reader agrees with it.
    #[test]
    fn any_bytes_are_read_without_panic(rk in routing_key(), body in bytes()) {
        let got = read(&rk, &body);
        // The envelope reads the same after its payload is gone.
        let env = Envelope::read(&rk, &body.clone());
        prop_assert_eq!(facts(&env), read(&rk, &body));
        let expected_kind = got.strings[1]
            .as_deref()
            .and_then(MessageKind::from_event_type)
            .unwrap_or_else(|| MessageKind::from_routing_key(&rk));
        prop_assert_eq!(got.kind, expected_kind);
        prop_assert_eq!(got.is_cloudevent, got.format == BodyFormat::CloudEvent);
        match got.format {
            BodyFormat::Empty => prop_assert!(body.iter().all(u8::is_ascii_whitespace)),
            BodyFormat::CloudEvent | BodyFormat::JsonObject => {
                prop_assert_eq!(
                    body.iter().find(|b| !b.is_ascii_whitespace()),
                    Some(&b'{')
                );
                prop_assert_eq!(
                    got.format == BodyFormat::CloudEvent,
                    got.strings[0].is_some() && got.strings[1].is_some()
                );
            }
            _ => {
                prop_assert!(got.strings.iter().all(Option::is_none), "{:?}", got);
                prop_assert!(got.numbers.iter().all(Option::is_none));
                prop_assert!(!got.has_metrics);
            }
        }
        // Wherever `Value` compares fairly (see `envelope_reference::reference`).
        if let Some(expected) = envelope_reference::reference(&rk, &body) {
            prop_assert_eq!(got, expected);
        }
    }

    /// Any JSON object: exactly the string (and number) fields found at the
    /// known keys, compared with the `serde_json::Value` reference.
    #[test]
    fn any_object_yields_exactly_its_fields(
        rk in routing_key(),
        m in object(),
        pretty in any::<bool>(),
        pad in "[ \t\r\n]{0,3}",
    ) {
        let body = serialised(&m, pretty, &pad);
        let got = read(&rk, &body);
        prop_assert_ne!(got.format, BodyFormat::NotJson);
        prop_assert_eq!(got, reference(&rk, &body));
    }

    /// Any other JSON value at the top level is not an object: NotJson, no
    /// field, kind from the routing key.
    #[test]
    fn other_json_values_are_not_objects(rk in routing_key(), v in value()) {
        // An object (about half of the generated values) goes in an array:
        // rejecting it would abort long runs (`PROPTEST_CASES`) on
        // proptest's limit of rejects.
        let v = if v.is_object() { Value::Array(vec![v]) } else { v };
        let body = serde_json::to_vec(&v).expect("serialisable");
        let got = read(&rk, &body);
        prop_assert_eq!(got.format, BodyFormat::NotJson);
        prop_assert_eq!(got.kind, MessageKind::from_routing_key(&rk));
        prop_assert_eq!(got, reference(&rk, &body));
    }

    /// The real fixtures with one field replaced by any value still read
    /// like the reference.
    #[test]
    fn fixtures_with_a_field_replaced(
        which in 0usize..5,
        path in prop::sample::select(vec![
            "/type", "/specversion", "/id", "/data", "/data/action", "/data/status",
            "/data/error", "/data/error/code", "/data/metrics", "/data/metrics/model",
            "/data/metrics/tokens_used", "/data/metrics/cost_usd", "/data/output",
            "/data/execution_time_ms", "/traceparent",
        ]),
        v in value(),
    ) {
        let (rk, body) = &fixtures()[which];
        let mut doc: Value = serde_json::from_slice(body).expect("JSON");
        if let Some(slot) = doc.pointer_mut(path) {
            *slot = v;
        }
        let body = serde_json::to_vec(&doc).expect("serialisable");
        prop_assert_eq!(read(rk, &body), reference(rk, &body));
    }
}

// The properties compare only bodies without repeated keys, which
// `serde_json::Value` cannot represent; repeated keys are covered by
// `duplicate_nested_objects_keep_the_last`.

#[test]
fn fixtures_match_the_reference() {
    for (rk, body) in fixtures() {
        let got = read(&rk, &body);
        assert_eq!(got.format, BodyFormat::CloudEvent, "{rk}");
        assert_eq!(got, reference(&rk, &body), "{rk}");
    }
}

#[test]
fn oversized_bodies_are_not_parsed() {
    let mut body = br#"{"specversion":"1.0","type":"ai.team.result"}"#.to_vec();
    body.resize(MAX_PARSED_BODY + 1, b' ');
    let got = read("evt.x", &body);
    assert_eq!(got, reference("evt.x", &body));
    assert_eq!(got.format, BodyFormat::TooLarge);
    assert_eq!(got.kind, MessageKind::Event);
}

/// Duplicate keys: JSON parsers (and `serde_json::Value`) keep the last
/// value, also for nested objects (`data`, `data.error`, `data.metrics`,
/// `data.output`), which must be replaced, not merged.
#[test]
fn duplicate_nested_objects_keep_the_last() {
    for body in [
        &br#"{"data":{"action":"x"},"data":{"status":"y"}}"#[..],
        br#"{"data":{"action":"x"},"data":5}"#,
        br#"{"data":{"metrics":{"model":"m"},"metrics":7}}"#,
        br#"{"data":{"error":{"code":"A"},"error":{}}}"#,
        br#"{"data":{"output":{"quality_score":1},"output":{}}}"#,
    ] {
        assert_eq!(
            read("", body),
            reference("", body),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

/// A kept string field that is not UTF-8 (the body is then not strictly
/// JSON) reads as absent, and the format agrees with the accessors
/// (`is_cloudevent()` only when `specversion` and `type` read).
#[test]
fn non_utf8_kept_strings_read_as_absent() {
    for (body, field) in [
        (
            &b"{\"specversion\":\"\xe0\",\"type\":\"ai.team.event\"}"[..],
            0,
        ),
        (
            b"{\"specversion\":\"1.0\",\"type\":\"ai.team.event\xff\"}",
            1,
        ),
        (
            b"{\"specversion\":\"1.0\",\"type\":\"ai.team.event\",\"id\":\"\xc3\"}",
            2,
        ),
    ] {
        let got = read("ctl.x", body);
        let text = String::from_utf8_lossy(body);
        assert_eq!(got.strings[field], None, "{text}");
        assert_eq!(
            got.is_cloudevent,
            got.strings[0].is_some() && got.strings[1].is_some(),
            "{text}: {got:?}"
        );
        let kind = got.strings[1]
            .as_deref()
            .and_then(MessageKind::from_event_type)
            .unwrap_or(MessageKind::Control);
        assert_eq!(got.kind, kind, "{text}");
    }
}

/// A number given as a JSON string with escapes is decoded first, as the
/// reference (and the former serde_json reader) does.
#[test]
fn escaped_numeric_strings_are_decoded() {
    let body = br#"{"data":{"execution_time_ms":"1\u0032","metrics":{"tokens_used":"7\n"}}}"#;
    let got = read("", body);
    assert_eq!(got, reference("", body));
    assert_eq!(got.numbers[3], Some(12.0));
    assert_eq!(got.numbers[0], Some(7.0));
}
