//! The MindBus envelope reader on arbitrary bodies and routing keys.
//!
//! Input: the first byte picks the routing key (below 0x80: one of
//! `ROUTING_KEYS`; otherwise the next `first & 0x1f` bytes, lossy UTF-8),
//! the rest is the body. Checks: no panic; the kind and format rules; every
//! accessor of views over the body and over other bytes; and, where
//! `serde_json::Value` parses the body without repeated keys, exactly the
//! fields of the `Value` reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mindbus_otel::{BodyFormat, Envelope, MessageKind};
use mindbus_otel_fuzz::reference::{read, reference};
use std::borrow::Cow;

const ROUTING_KEYS: [&str; 8] = [
    "cmd.writer.any",
    "evt.task.completed",
    "ctl.all.stop",
    "orchestrator.results",
    "",
    "cmd",
    "amq.gen-JzTY20BRgKO",
    "evt.",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (rk, body): (Cow<'_, str>, &[u8]) = if first < 0x80 {
        (
            ROUTING_KEYS[first as usize % ROUTING_KEYS.len()].into(),
            rest,
        )
    } else {
        let n = usize::from(first & 0x1f).min(rest.len());
        (String::from_utf8_lossy(&rest[..n]), &rest[n..])
    };
    let env = Envelope::read(&rk, body);
    let facts = read(&env);
    assert_eq!(facts.kind, env.kind());
    assert_eq!(facts.format, env.format());
    let expected_kind = facts.strings[1]
        .as_deref()
        .and_then(MessageKind::from_event_type)
        .unwrap_or_else(|| MessageKind::from_routing_key(&rk));
    assert_eq!(facts.kind, expected_kind);
    assert_eq!(facts.is_cloudevent, facts.format == BodyFormat::CloudEvent);
    match facts.format {
        BodyFormat::CloudEvent | BodyFormat::JsonObject => {
            assert_eq!(
                facts.format == BodyFormat::CloudEvent,
                facts.strings[0].is_some() && facts.strings[1].is_some()
            );
        }
        _ => {
            assert!(facts.strings.iter().all(Option::is_none));
            assert!(facts.numbers.iter().all(Option::is_none));
            assert!(!facts.has_metrics);
        }
    }
    for n in &facts.numbers {
        assert!(n.is_none_or(f64::is_finite));
    }
    if let Some(expected) = reference(&rk, body) {
        assert_eq!(facts, expected);
    }
});
