//! The MindBus envelope reader: what kind of message this is and the few
//! CloudEvents fields that telemetry needs, read once per message.
//!
//! MindBus bodies are CloudEvents 1.0 in structured JSON mode. The reader
//! walks the JSON once with `serde_json` and keeps, for every field it wants,
//! either the byte range of the string inside the payload (the common case:
//! no copy) or, for the rare string that carries JSON escapes, a small owned
//! copy of the decoded text. Everything else in the body is skipped without
//! being materialised. A body that is not JSON, JSON that is not an object,
//! or fields of unexpected types never make the reader fail: the fields it
//! could not read are simply absent, and the kind falls back to the routing
//! key prefix (`cmd.`, `evt.`, `ctl.`).
//!
//! [`Envelope`] is the cached result, independent of the payload's lifetime;
//! [`EnvelopeRef`] pairs it with the payload to hand out `&str` fields.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Bodies larger than this are not parsed: the kind then comes from the
/// routing key alone. MindBus messages are a few KiB; 4 MiB is generous.
pub const MAX_PARSED_BODY: usize = 4 * 1024 * 1024;

/// The MindBus message kinds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// `ai.team.command`, routing key `cmd.*`: work handed to an agent.
    Command,
    /// `ai.team.result`: the successful answer to a COMMAND.
    Result,
    /// `ai.team.error`: the failed answer to a COMMAND (or a proactive error).
    Error,
    /// `ai.team.event`, routing key `evt.*`: something that happened.
    Event,
    /// `ai.team.control`, routing key `ctl.*`: stop, pause, resume, ...
    Control,
    /// Anything else: not a CloudEvent of a known type and no known prefix.
    #[default]
    Unknown,
}

impl MessageKind {
    /// All kinds, in a stable order (useful to pre-register metric handles).
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Command,
        MessageKind::Result,
        MessageKind::Error,
        MessageKind::Event,
        MessageKind::Control,
        MessageKind::Unknown,
    ];

    /// The lowercase label used in span attributes and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Result => "result",
            MessageKind::Error => "error",
            MessageKind::Event => "event",
            MessageKind::Control => "control",
            MessageKind::Unknown => "unknown",
        }
    }

    /// A stable index in `0..6`, the position in [`MessageKind::ALL`].
    pub const fn index(self) -> usize {
        match self {
            MessageKind::Command => 0,
            MessageKind::Result => 1,
            MessageKind::Error => 2,
            MessageKind::Event => 3,
            MessageKind::Control => 4,
            MessageKind::Unknown => 5,
        }
    }

    /// The kind named by a CloudEvents `type`, if it is one of MindBus's.
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        Some(match event_type {
            "ai.team.command" => MessageKind::Command,
            "ai.team.result" => MessageKind::Result,
            "ai.team.error" => MessageKind::Error,
            "ai.team.event" => MessageKind::Event,
            "ai.team.control" => MessageKind::Control,
            _ => return None,
        })
    }

    /// The kind implied by a MindBus routing key (`cmd.`, `evt.`, `ctl.`).
    ///
    /// RESULT and ERROR travel to a `reply_to` queue, so their routing key
    /// says nothing: those are only recognised from the CloudEvents `type`.
    pub fn from_routing_key(routing_key: &str) -> Self {
        if routing_key.starts_with("cmd.") {
            MessageKind::Command
        } else if routing_key.starts_with("evt.") {
            MessageKind::Event
        } else if routing_key.starts_with("ctl.") {
            MessageKind::Control
        } else {
            MessageKind::Unknown
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the body was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyFormat {
    /// Empty body.
    #[default]
    Empty,
    /// A JSON object with CloudEvents `specversion` and `type`.
    CloudEvent,
    /// A JSON object that is not a CloudEvent.
    JsonObject,
    /// Not a JSON object: another JSON value, invalid JSON or binary data.
    NotJson,
    /// Larger than [`MAX_PARSED_BODY`]: not read.
    TooLarge,
}

impl BodyFormat {
    /// A short label (`cloudevent`, `json`, `not_json`, `empty`, `too_large`).
    pub const fn as_str(self) -> &'static str {
        match self {
            BodyFormat::Empty => "empty",
            BodyFormat::CloudEvent => "cloudevent",
            BodyFormat::JsonObject => "json",
            BodyFormat::NotJson => "not_json",
            BodyFormat::TooLarge => "too_large",
        }
    }
}

/// A string field: a range of the payload, or a decoded copy when the JSON
/// string carried escapes.
#[derive(Clone, Debug, PartialEq)]
enum Text {
    Span { start: u32, len: u32 },
    Owned(Box<str>),
}

impl Text {
    fn resolve<'a>(&'a self, payload: &'a [u8]) -> Option<&'a str> {
        match self {
            Text::Span { start, len } => {
                let start = *start as usize;
                let bytes = payload.get(start..start + *len as usize)?;
                std::str::from_utf8(bytes).ok()
            }
            Text::Owned(s) => Some(s),
        }
    }
}

/// The MindBus/CloudEvents facts about one message, computed once.
///
/// Use [`Envelope::read`] to compute it and [`Envelope::view`] (or the
/// `envelope()` accessor of a message) to read its string fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Envelope {
    kind: MessageKind,
    format: BodyFormat,
    spec_version: Option<Text>,
    event_type: Option<Text>,
    id: Option<Text>,
    source: Option<Text>,
    subject: Option<Text>,
    traceparent: Option<Text>,
    tracestate: Option<Text>,
    action: Option<Text>,
    status: Option<Text>,
    error_code: Option<Text>,
    model: Option<Text>,
    tokens_used: Option<f64>,
    cost_usd: Option<f64>,
    latency_ms: Option<f64>,
    execution_time_ms: Option<f64>,
    quality_score: Option<f64>,
    has_metrics: bool,
}

impl Envelope {
    /// Reads `payload` (and falls back to `routing_key` for the kind).
    /// Never fails and never panics, whatever the bytes.
    pub fn read(routing_key: &str, payload: &[u8]) -> Self {
        let mut env = Envelope {
            format: classify_and_parse(payload),
            ..Envelope::default()
        };
        if env.format == BodyFormat::JsonObject || env.format == BodyFormat::CloudEvent {
            let mut fields = Fields::default();
            let base = payload.as_ptr() as usize;
            let mut de = serde_json::Deserializer::from_slice(payload);
            let seed = TopSeed {
                base,
                len: payload.len(),
                out: &mut fields,
            };
            let ok = seed.deserialize(&mut de).is_ok() && de.end().is_ok();
            if ok {
                env.apply(fields);
                env.format = if env.spec_version.is_some() && env.event_type.is_some() {
                    BodyFormat::CloudEvent
                } else {
                    BodyFormat::JsonObject
                };
            } else {
                env.format = BodyFormat::NotJson;
            }
        }
        let from_type = env
            .event_type
            .as_ref()
            .and_then(|t| t.resolve(payload))
            .and_then(MessageKind::from_event_type);
        env.kind = from_type.unwrap_or_else(|| MessageKind::from_routing_key(routing_key));
        env
    }

    fn apply(&mut self, f: Fields) {
        self.spec_version = f.spec_version;
        self.event_type = f.event_type;
        self.id = f.id;
        self.source = f.source;
        self.subject = f.subject;
        self.traceparent = f.traceparent;
        self.tracestate = f.tracestate;
        self.action = f.data.action;
        self.status = f.data.status;
        self.error_code = f.data.error_code;
        self.model = f.data.model;
        self.tokens_used = f.data.tokens_used;
        self.cost_usd = f.data.cost_usd.or(f.data.estimated_cost_usd);
        self.latency_ms = f.data.latency_ms;
        self.execution_time_ms = f.data.execution_time_ms;
        self.quality_score = f.data.quality_score;
        self.has_metrics = f.data.has_metrics;
    }

    /// The message kind (from CloudEvents `type`, else the routing key).
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// How the body was read.
    pub fn format(&self) -> BodyFormat {
        self.format
    }

    /// Pairs the envelope with the payload it was read from.
    ///
    /// Passing another payload yields meaningless (but safe) results: a
    /// field whose range does not fit or is not UTF-8 reads as absent.
    pub fn view<'a>(&'a self, payload: &'a [u8]) -> EnvelopeRef<'a> {
        EnvelopeRef { env: self, payload }
    }
}

/// An [`Envelope`] together with its payload: string fields as `&str`.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeRef<'a> {
    env: &'a Envelope,
    payload: &'a [u8],
}

macro_rules! text_accessors {
    ($($(#[$doc:meta])* $name:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self) -> Option<&'a str> {
                self.env.$name.as_ref().and_then(|t| t.resolve(self.payload))
            }
        )*
    };
}

impl<'a> EnvelopeRef<'a> {
    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        self.env.kind
    }

    /// How the body was read.
    pub fn format(&self) -> BodyFormat {
        self.env.format
    }

    /// True when the body is a CloudEvent (`specversion` and `type` present).
    pub fn is_cloudevent(&self) -> bool {
        self.env.format == BodyFormat::CloudEvent
    }

    text_accessors! {
        /// CloudEvents `specversion`.
        spec_version;
        /// CloudEvents `type`, e.g. `ai.team.command`.
        event_type;
        /// CloudEvents `id` (one message).
        id;
        /// CloudEvents `source`: who sent it, e.g. `agent.writer.001`.
        source;
        /// CloudEvents `subject`: the business task id.
        subject;
        /// CloudEvents distributed-tracing extension `traceparent`.
        traceparent;
        /// CloudEvents distributed-tracing extension `tracestate`.
        tracestate;
        /// `data.action` of a COMMAND.
        action;
        /// `data.status` of a RESULT.
        status;
        /// `data.error.code` of an ERROR (a google.rpc code name).
        error_code;
        /// `data.metrics.model` of a RESULT.
        model;
    }

    /// True when the body has a `data.metrics` object.
    pub fn has_metrics(&self) -> bool {
        self.env.has_metrics
    }

    /// `data.metrics.tokens_used`.
    pub fn tokens_used(&self) -> Option<f64> {
        self.env.tokens_used
    }

    /// `data.metrics.cost_usd`, else `data.metrics.estimated_cost_usd`.
    pub fn cost_usd(&self) -> Option<f64> {
        self.env.cost_usd
    }

    /// `data.metrics.latency_ms`.
    pub fn latency_ms(&self) -> Option<f64> {
        self.env.latency_ms
    }

    /// `data.execution_time_ms`.
    pub fn execution_time_ms(&self) -> Option<f64> {
        self.env.execution_time_ms
    }

    /// `data.output.quality_score`.
    pub fn quality_score(&self) -> Option<f64> {
        self.env.quality_score
    }
}

/// Quick look at the first byte: only objects are parsed.
fn classify_and_parse(payload: &[u8]) -> BodyFormat {
    if payload.len() > MAX_PARSED_BODY {
        return BodyFormat::TooLarge;
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        None => BodyFormat::Empty,
        Some(b'{') => BodyFormat::JsonObject,
        Some(_) => BodyFormat::NotJson,
    }
}

#[derive(Default)]
struct Fields {
    spec_version: Option<Text>,
    event_type: Option<Text>,
    id: Option<Text>,
    source: Option<Text>,
    subject: Option<Text>,
    traceparent: Option<Text>,
    tracestate: Option<Text>,
    data: DataFields,
}

#[derive(Default)]
struct DataFields {
    action: Option<Text>,
    status: Option<Text>,
    error_code: Option<Text>,
    model: Option<Text>,
    tokens_used: Option<f64>,
    cost_usd: Option<f64>,
    estimated_cost_usd: Option<f64>,
    latency_ms: Option<f64>,
    execution_time_ms: Option<f64>,
    quality_score: Option<f64>,
    has_metrics: bool,
}

/// Identifies an object key among `names` without allocating.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| *n == v))
    }
}

/// Reads a string value as a payload range; any other value reads as `None`.
struct TextSeed {
    base: usize,
    len: usize,
}

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Option<Text>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TextSeed {
    type Value = Option<Text>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        let at = (v.as_ptr() as usize).wrapping_sub(self.base);
        match (u32::try_from(at), u32::try_from(v.len())) {
            (Ok(start), Ok(len)) if at + v.len() <= self.len => Ok(Some(Text::Span { start, len })),
            _ => Ok(Some(Text::Owned(v.into()))),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Text::Owned(v.into())))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }
}

/// Reads a number (or a string holding one); anything else reads as `None`.
struct NumSeed;

impl<'de> DeserializeSeed<'de> for NumSeed {
    type Value = Option<f64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NumSeed {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.trim().parse::<f64>().ok().filter(|n| n.is_finite()))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(v).filter(|n| n.is_finite()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }
}

/// The top-level CloudEvent object.
struct TopSeed<'o> {
    base: usize,
    len: usize,
    out: &'o mut Fields,
}

const TOP_KEYS: &[&str] = &[
    "specversion",
    "type",
    "id",
    "source",
    "subject",
    "traceparent",
    "tracestate",
    "data",
];
const DATA_KEYS: &[&str] = &[
    "action",
    "status",
    "error",
    "metrics",
    "output",
    "execution_time_ms",
];
const ERROR_KEYS: &[&str] = &["code"];
const METRICS_KEYS: &[&str] = &[
    "model",
    "tokens_used",
    "cost_usd",
    "estimated_cost_usd",
    "latency_ms",
];
const OUTPUT_KEYS: &[&str] = &["quality_score"];

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (base, len) = (self.base, self.len);
        let text = || TextSeed { base, len };
        while let Some(key) = map.next_key_seed(KeySeed(TOP_KEYS))? {
            let out = &mut *self.out;
            match key {
                Some(0) => out.spec_version = map.next_value_seed(text())?,
                Some(1) => out.event_type = map.next_value_seed(text())?,
                Some(2) => out.id = map.next_value_seed(text())?,
                Some(3) => out.source = map.next_value_seed(text())?,
                Some(4) => out.subject = map.next_value_seed(text())?,
                Some(5) => out.traceparent = map.next_value_seed(text())?,
                Some(6) => out.tracestate = map.next_value_seed(text())?,
                Some(7) => map.next_value_seed(DataSeed {
                    base,
                    len,
                    out: &mut out.data,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    // Any other top-level value is "not an object": reported by `read`.
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom("not an object"))
    }
}

/// A nested object of `data`, selected by `which`.
#[derive(Clone, Copy)]
enum DataPart {
    Root,
    Error,
    Metrics,
    Output,
}

struct DataSeed<'o> {
    base: usize,
    len: usize,
    out: &'o mut DataFields,
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(PartVisitor {
            base: self.base,
            len: self.len,
            out: self.out,
            part: DataPart::Root,
        })
    }
}

struct PartVisitor<'o> {
    base: usize,
    len: usize,
    out: &'o mut DataFields,
    part: DataPart,
}

impl<'de> DeserializeSeed<'de> for PartVisitor<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PartVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (base, len) = (self.base, self.len);
        let text = || TextSeed { base, len };
        let keys = match self.part {
            DataPart::Root => DATA_KEYS,
            DataPart::Error => ERROR_KEYS,
            DataPart::Metrics => {
                self.out.has_metrics = true;
                METRICS_KEYS
            }
            DataPart::Output => OUTPUT_KEYS,
        };
        while let Some(key) = map.next_key_seed(KeySeed(keys))? {
            let out = &mut *self.out;
            let nested = |part, out| PartVisitor {
                base,
                len,
                out,
                part,
            };
            match (self.part, key) {
                (DataPart::Root, Some(0)) => out.action = map.next_value_seed(text())?,
                (DataPart::Root, Some(1)) => out.status = map.next_value_seed(text())?,
                (DataPart::Root, Some(2)) => {
                    map.next_value_seed(nested(DataPart::Error, out))?;
                }
                (DataPart::Root, Some(3)) => {
                    map.next_value_seed(nested(DataPart::Metrics, out))?;
                }
                (DataPart::Root, Some(4)) => {
                    map.next_value_seed(nested(DataPart::Output, out))?;
                }
                (DataPart::Root, Some(5)) => {
                    out.execution_time_ms = map.next_value_seed(NumSeed)?
                }
                (DataPart::Error, Some(0)) => out.error_code = map.next_value_seed(text())?,
                (DataPart::Metrics, Some(0)) => out.model = map.next_value_seed(text())?,
                (DataPart::Metrics, Some(1)) => out.tokens_used = map.next_value_seed(NumSeed)?,
                (DataPart::Metrics, Some(2)) => out.cost_usd = map.next_value_seed(NumSeed)?,
                (DataPart::Metrics, Some(3)) => {
                    out.estimated_cost_usd = map.next_value_seed(NumSeed)?;
                }
                (DataPart::Metrics, Some(4)) => out.latency_ms = map.next_value_seed(NumSeed)?,
                (DataPart::Output, Some(0)) => out.quality_score = map.next_value_seed(NumSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| ())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture from `testdata/mindbus` (copied from the MindBus protocol
    /// notes): its routing key and its body as bytes.
    fn fixture(name: &str) -> (String, Vec<u8>) {
        let path = format!(
            "{}/../../testdata/mindbus/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let rk = v["routing_key"].as_str().expect("routing_key").to_owned();
        (rk, serde_json::to_vec(&v["body"]).expect("body"))
    }

    #[test]
    fn command_fixture() {
        let (rk, body) = fixture("command");
        let env = Envelope::read(&rk, &body);
        let v = env.view(&body);
        assert_eq!(v.kind(), MessageKind::Command);
        assert_eq!(v.format(), BodyFormat::CloudEvent);
        assert_eq!(v.spec_version(), Some("1.0"));
        assert_eq!(v.event_type(), Some("ai.team.command"));
        assert_eq!(v.id(), Some("5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01"));
        assert_eq!(v.source(), Some("orchestrator-core"));
        assert_eq!(v.subject(), Some("task-article-555"));
        assert_eq!(v.action(), Some("generate_article"));
        assert_eq!(
            v.traceparent(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(v.error_code(), None);
        assert!(!v.has_metrics());
        // No copy: every string is a range of the payload.
        assert!(matches!(env.id, Some(Text::Span { .. })));
    }

    #[test]
    fn result_fixture_has_llm_metrics() {
        let (rk, body) = fixture("result");
        let env = Envelope::read(&rk, &body);
        let v = env.view(&body);
        assert_eq!(v.kind(), MessageKind::Result);
        assert_eq!(v.status(), Some("SUCCESS"));
        assert_eq!(v.source(), Some("agent.writer.001"));
        assert!(v.has_metrics());
        assert_eq!(v.model(), Some("gpt-4"));
        assert_eq!(v.tokens_used(), Some(3500.0));
        assert_eq!(v.cost_usd(), Some(0.105));
        assert_eq!(v.execution_time_ms(), Some(12450.0));
        assert_eq!(v.quality_score(), Some(8.5));
        assert_eq!(v.latency_ms(), None);
    }

    #[test]
    fn error_event_control_fixtures() {
        let (rk, body) = fixture("error");
        let env = Envelope::read(&rk, &body);
        assert_eq!(env.kind(), MessageKind::Error);
        assert_eq!(env.view(&body).error_code(), Some("DEADLINE_EXCEEDED"));
        assert_eq!(env.view(&body).execution_time_ms(), Some(30500.0));
        let (rk, body) = fixture("event");
        assert_eq!(Envelope::read(&rk, &body).kind(), MessageKind::Event);
        let (rk, body) = fixture("control");
        let env = Envelope::read(&rk, &body);
        assert_eq!(env.kind(), MessageKind::Control);
        assert_eq!(env.view(&body).source(), Some("human-operator"));
    }

    #[test]
    fn kind_falls_back_to_routing_key() {
        for (rk, kind) in [
            ("cmd.writer.any", MessageKind::Command),
            ("evt.task.completed", MessageKind::Event),
            ("ctl.all.stop", MessageKind::Control),
            ("amq.gen-abc", MessageKind::Unknown),
            ("", MessageKind::Unknown),
        ] {
            for body in [
                &b"not json"[..],
                b"",
                b"[1,2]",
                b"{\"type\":\"other\"}",
                b"{\"type\":",
            ] {
                assert_eq!(Envelope::read(rk, body).kind(), kind, "{rk} {body:?}");
            }
        }
        // The CloudEvents type wins over the routing key.
        let body = br#"{"specversion":"1.0","type":"ai.team.result"}"#;
        assert_eq!(
            Envelope::read("cmd.writer.any", body).kind(),
            MessageKind::Result
        );
    }

    #[test]
    fn formats() {
        assert_eq!(Envelope::read("", b"").format(), BodyFormat::Empty);
        assert_eq!(Envelope::read("", b"  \n").format(), BodyFormat::Empty);
        assert_eq!(Envelope::read("", b"hello").format(), BodyFormat::NotJson);
        assert_eq!(Envelope::read("", b"\"str\"").format(), BodyFormat::NotJson);
        assert_eq!(
            Envelope::read("", b"{\"a\":1}").format(),
            BodyFormat::JsonObject
        );
        assert_eq!(
            Envelope::read("", b"{\"a\":1} trailing").format(),
            BodyFormat::NotJson
        );
        assert_eq!(Envelope::read("", b"{\"a\":").format(), BodyFormat::NotJson);
        assert_eq!(
            Envelope::read("", &[b'{', 0xff, 0xfe]).format(),
            BodyFormat::NotJson
        );
        let big = vec![b' '; MAX_PARSED_BODY + 1];
        assert_eq!(Envelope::read("cmd.x", &big).format(), BodyFormat::TooLarge);
        assert_eq!(Envelope::read("cmd.x", &big).kind(), MessageKind::Command);
    }

    #[test]
    fn wrong_types_are_skipped_not_fatal() {
        let body = br#"{"specversion":"1.0","type":"ai.team.result","id":42,"source":["x"],
            "subject":{"a":1},"data":{"status":null,"metrics":{"model":7,"tokens_used":"120",
            "cost_usd":"n/a","estimated_cost_usd":0.5},"output":"text","execution_time_ms":true}}"#;
        let env = Envelope::read("", body);
        let v = env.view(body);
        assert_eq!(v.kind(), MessageKind::Result);
        assert_eq!(v.id(), None);
        assert_eq!(v.source(), None);
        assert_eq!(v.subject(), None);
        assert_eq!(v.status(), None);
        assert_eq!(v.model(), None);
        assert_eq!(v.tokens_used(), Some(120.0));
        assert_eq!(v.cost_usd(), Some(0.5), "falls back to estimated_cost_usd");
        assert_eq!(v.execution_time_ms(), None);
        assert_eq!(v.quality_score(), None);
        // data that is not an object
        let body = br#"{"type":"ai.team.command","data":[1,{"action":"x"}]}"#;
        assert_eq!(Envelope::read("", body).view(body).action(), None);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = br#"{"specversion":"1.0","type":"ai.team.command","source":"agent.\"w\"\u00e9","data":{"action":"gen"}}"#;
        let env = Envelope::read("", body);
        assert_eq!(env.view(body).source(), Some("agent.\"w\"\u{e9}"));
        assert_eq!(env.view(body).action(), Some("gen"));
    }

    #[test]
    fn duplicate_keys_last_wins_and_deep_nesting_is_safe() {
        let body = br#"{"type":"ai.team.event","type":"ai.team.error"}"#;
        assert_eq!(Envelope::read("", body).kind(), MessageKind::Error);
        // Deeply nested values, skipped or read, neither overflow the stack
        // nor lose the fields around them.
        for field in ["x", "id", "data"] {
            let deep = format!(
                "{{\"type\":\"ai.team.event\",\"{field}\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            let env = Envelope::read("", deep.as_bytes());
            assert_eq!(env.kind(), MessageKind::Event, "{field}");
        }
        let unbalanced = format!("{{\"data\":{}", "{\"a\":".repeat(100_000));
        assert_eq!(
            Envelope::read("evt.a", unbalanced.as_bytes()).format(),
            BodyFormat::NotJson
        );
    }

    #[test]
    fn view_with_another_payload_is_safe() {
        let body = br#"{"specversion":"1.0","type":"ai.team.command","id":"abcdef"}"#;
        let env = Envelope::read("", body);
        assert_eq!(env.view(b"short").id(), None);
    }
}
