//! What the envelope reader must say, computed from a `serde_json::Value`.
//!
//! Shared by the property tests (`tests/proptest_envelope.rs`, which include
//! it with `#[path]`) and the `envelope` fuzz target (`fuzz/src/lib.rs`).

use mindbus_otel::envelope::MAX_PARSED_BODY;
use mindbus_otel::{BodyFormat, Envelope, MessageKind};
use serde_json::{Map, Value};

/// Everything the reader exposes, comparable.
#[derive(Debug)]
pub struct Facts {
    /// Kind.
    pub kind: MessageKind,
    /// Format.
    pub format: BodyFormat,
    /// `is_cloudevent()`.
    pub is_cloudevent: bool,
    /// The string fields, in accessor order.
    pub strings: [Option<String>; 11],
    /// The number fields, in accessor order.
    pub numbers: [Option<f64>; 5],
    /// `has_metrics()`.
    pub has_metrics: bool,
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

/// What the reader says about a body, through every accessor of its view.
pub fn read(env: &Envelope) -> Facts {
    let v = env.view();
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

/// The documented rules on a `serde_json::Value`; `None` when `Value`
/// cannot compare fairly: the body would be parsed but does not parse, or
/// it repeats a key.
pub fn reference(routing_key: &str, body: &[u8]) -> Option<Facts> {
    let parsed = body.len() <= MAX_PARSED_BODY && !body.iter().all(u8::is_ascii_whitespace);
    if parsed && (serde_json::from_slice::<Value>(body).is_err() || has_duplicate_keys(body)) {
        return None;
    }
    Some(reference_facts(routing_key, body))
}

/// The documented rules on a `serde_json::Value`, whatever the body: one
/// that does not parse reads as not JSON, and a repeated key reads as
/// `Value` reads it (the last one wins).
pub fn reference_facts(routing_key: &str, body: &[u8]) -> Facts {
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

/// Whether any object in `body` (valid JSON) repeats a key.
pub fn has_duplicate_keys(body: &[u8]) -> bool {
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
