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

/// Everything the reader exposes, comparable.
#[derive(Debug)]
struct Facts {
    kind: MessageKind,
    format: BodyFormat,
    is_cloudevent: bool,
    strings: [Option<String>; 11],
    numbers: [Option<f64>; 5],
    has_metrics: bool,
}

/// Numbers are equal within 2 ULPs: `serde_json` (the reference) does not
/// round every decimal exactly (its `float_roundtrip` feature is off), while
/// the reader may.
impl PartialEq for Facts {
    fn eq(&self, other: &Self) -> bool {
        let close = |a: &Option<f64>, b: &Option<f64>| match (a, b) {
            (Some(a), Some(b)) => {
                a == b
                    || (a.is_sign_negative() == b.is_sign_negative()
                        && a.to_bits().abs_diff(b.to_bits()) <= 2)
            }
            (a, b) => a.is_none() && b.is_none(),
        };
        self.kind == other.kind
            && self.format == other.format
            && self.is_cloudevent == other.is_cloudevent
            && self.strings == other.strings
            && self.has_metrics == other.has_metrics
            && self
                .numbers
                .iter()
                .zip(&other.numbers)
                .all(|(a, b)| close(a, b))
    }
}

/// What the reader says about `body`.
fn read(routing_key: &str, body: &[u8]) -> Facts {
    facts(&Envelope::read(routing_key, body))
}

/// Every accessor of an envelope's view.
fn facts(env: &Envelope) -> Facts {
    let v = env.view();
    assert_eq!(env.kind(), v.kind());
    assert_eq!(env.format(), v.format());
    let s = |x: Option<&str>| x.map(str::to_owned);
    Facts {
        kind: v.kind(),
        format: v.format(),
        is_cloudevent: v.is_cloudevent(),
        strings: [
            s(v.spec_version()),
            s(v.event_type()),
            s(v.id()),
            s(v.source()),
            s(v.subject()),
            s(v.traceparent()),
            s(v.tracestate()),
            s(v.action()),
            s(v.status()),
            s(v.error_code()),
            s(v.model()),
        ],
        numbers: [
            v.tokens_used(),
            v.cost_usd(),
            v.latency_ms(),
            v.execution_time_ms(),
            v.quality_score(),
        ],
        has_metrics: v.has_metrics(),
    }
}

/// A number field: a finite JSON number, or a string holding one.
fn num(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|n| n.is_finite())
}

fn obj(v: Option<&Value>) -> Option<&Map<String, Value>> {
    v.and_then(Value::as_object)
}

/// The documented rules, on a parsed `serde_json::Value`.
fn reference(routing_key: &str, body: &[u8]) -> Facts {
    let mut f = Facts {
        kind: MessageKind::from_routing_key(routing_key),
        format: BodyFormat::NotJson,
        is_cloudevent: false,
        strings: Default::default(),
        numbers: [None; 5],
        has_metrics: false,
    };
    if body.len() > MAX_PARSED_BODY {
        f.format = BodyFormat::TooLarge;
        return f;
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        f.format = BodyFormat::Empty;
        return f;
    }
    let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
        return f;
    };
    let text = |m: Option<&Map<String, Value>>, k: &str| {
        m.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let data = obj(top.get("data"));
    let error = obj(data.and_then(|d| d.get("error")));
    let metrics = obj(data.and_then(|d| d.get("metrics")));
    let output = obj(data.and_then(|d| d.get("output")));
    let at = |m: Option<&Map<String, Value>>, k: &str| num(m.and_then(|m| m.get(k)));
    f.strings = [
        text(Some(&top), "specversion"),
        text(Some(&top), "type"),
        text(Some(&top), "id"),
        text(Some(&top), "source"),
        text(Some(&top), "subject"),
        text(Some(&top), "traceparent"),
        text(Some(&top), "tracestate"),
        text(data, "action"),
        text(data, "status"),
        text(error, "code"),
        text(metrics, "model"),
    ];
    f.numbers = [
        at(metrics, "tokens_used"),
        at(metrics, "cost_usd").or(at(metrics, "estimated_cost_usd")),
        at(metrics, "latency_ms"),
        at(data, "execution_time_ms"),
        at(output, "quality_score"),
    ];
    f.has_metrics = metrics.is_some();
    f.is_cloudevent = f.strings[0].is_some() && f.strings[1].is_some();
    f.format = if f.is_cloudevent {
        BodyFormat::CloudEvent
    } else {
        BodyFormat::JsonObject
    };
    if let Some(kind) = f.strings[1]
        .as_deref()
        .and_then(MessageKind::from_event_type)
    {
        f.kind = kind;
    }
    f
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

/// The real MindBus fixtures, as bodies.
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/mindbus");
    let mut out = Vec::new();
    for name in ["command", "result", "error", "event", "control"] {
        let text = std::fs::read_to_string(format!("{dir}/{name}.json")).expect("fixture");
        let v: Value = serde_json::from_str(&text).expect("fixture is JSON");
        let rk = v["routing_key"].as_str().expect("routing_key").to_owned();
        out.push((rk, serde_json::to_vec(&v["body"]).expect("body")));
    }
    out
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
        let comparable = serde_json::from_slice::<Value>(&body).is_ok() && !has_duplicate_keys(&body);
        if comparable || got.format == BodyFormat::Empty {
            prop_assert_eq!(got, reference(&rk, &body));
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
        prop_assume!(!v.is_object());
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

/// Whether any object in `body` (valid JSON) repeats a key. The properties
/// compare only bodies without repeated keys, which `serde_json::Value`
/// cannot represent; repeated keys are covered by
/// `duplicate_nested_objects_keep_the_last`.
fn has_duplicate_keys(body: &[u8]) -> bool {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    struct Dup(bool);
    struct DupVisitor;
    impl<'de> Deserialize<'de> for Dup {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(DupVisitor)
        }
    }
    impl<'de> Visitor<'de> for DupVisitor {
        type Value = Dup;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_str<E>(self, _: &str) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_unit<E>(self) -> Result<Dup, E> {
            Ok(Dup(false))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Dup, A::Error> {
            let mut dup = false;
            while let Some(Dup(d)) = seq.next_element()? {
                dup |= d;
            }
            Ok(Dup(dup))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Dup, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = false;
            while let Some(k) = map.next_key::<String>()? {
                dup |= !seen.insert(k);
                let Dup(d) = map.next_value()?;
                dup |= d;
            }
            Ok(Dup(dup))
        }
    }
    serde_json::from_slice::<Dup>(body).is_ok_and(|Dup(d)| d)
}

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
