//! The MindBus envelope reader: what kind of message this is and the few
//! CloudEvents fields that telemetry needs, read once per message.
//!
//! MindBus bodies are CloudEvents 1.0 in structured JSON mode. The reader
//! walks the JSON once with a small purpose-built scanner and copies the
//! few string fields it wants, validated (and decoded, for the rare string
//! that carries JSON escapes), into one small buffer owned by the
//! [`Envelope`]: reading a field afterwards is a slice of that buffer, with
//! no second validation. Everything else in the body is skipped
//! structurally (brackets, strings, literals) without being materialised or
//! UTF-8-validated; a long string (the article in a writer's RESULT, many
//! KiB) is searched for its end with vector instructions (`memchr2`), so
//! its cost per byte is a fraction of the word-at-a-time search that suits
//! short keys and ids. A body that is not JSON, JSON that is not an object,
//! or fields of unexpected types never make the reader fail: the fields it
//! could not read are simply absent, and the kind falls back to the routing
//! key prefix (`cmd.`, `evt.`, `ctl.`).
//!
//! [`Envelope`] is the cached result, independent of the payload's lifetime;
//! [`EnvelopeRef`] (from [`Envelope::view`]) hands out its `&str` fields.

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

    /// The CloudEvents `type` of this kind (`ai.team.command`, ...), `None`
    /// for [`MessageKind::Unknown`]. The inverse of [`MessageKind::from_event_type`].
    pub const fn event_type(self) -> Option<&'static str> {
        match self {
            MessageKind::Command => Some("ai.team.command"),
            MessageKind::Result => Some("ai.team.result"),
            MessageKind::Error => Some("ai.team.error"),
            MessageKind::Event => Some("ai.team.event"),
            MessageKind::Control => Some("ai.team.control"),
            MessageKind::Unknown => None,
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

/// A string field: a range of the envelope's own text buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Text {
    start: u32,
    len: u32,
}

impl Text {
    fn resolve(self, text: &str) -> Option<&str> {
        let start = self.start as usize;
        text.get(start..start + self.len as usize)
    }
}

/// The MindBus/CloudEvents facts about one message, computed once.
///
/// Use [`Envelope::read`] to compute it and [`Envelope::view`] (or the
/// `envelope()` accessor of a message) to read its fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Envelope {
    kind: MessageKind,
    format: BodyFormat,
    /// The kept string fields, validated and decoded, back to back.
    text: String,
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
    event_name: Option<Text>,
    task_id: Option<Text>,
    task_type: Option<Text>,
    process_id: Option<Text>,
    tokens_used: Option<f64>,
    cost_usd: Option<f64>,
    latency_ms: Option<f64>,
    execution_time_ms: Option<f64>,
    quality_score: Option<f64>,
    duration_seconds: Option<f64>,
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
        if env.format == BodyFormat::JsonObject {
            let mut fields = Fields::default();
            let mut scanner = Scanner::new(payload);
            if scanner.document(&mut fields).is_some() {
                env.text = scanner.text;
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
            .and_then(|t| t.resolve(&env.text))
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
        self.event_name = f.data.event_name;
        self.task_id = f.data.task_id;
        self.task_type = f.data.task_type;
        self.process_id = f.data.process_id;
        self.duration_seconds = f.data.duration_seconds;
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

    /// A view that hands out the fields (string fields as `&str`).
    pub fn view(&self) -> EnvelopeRef<'_> {
        EnvelopeRef { env: self }
    }
}

/// A view of an [`Envelope`]: its fields, string fields as `&str`.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeRef<'a> {
    env: &'a Envelope,
}

macro_rules! text_accessors {
    ($($(#[$doc:meta])* $name:ident;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(&self) -> Option<&'a str> {
                self.env.$name.and_then(|t| t.resolve(&self.env.text))
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
        /// `data.event_type` of an EVENT, e.g. `task.completed`.
        event_name;
        /// `data.event_data.task_id` of an EVENT.
        task_id;
        /// `data.event_data.task_type` of an EVENT, or
        /// `data.context.task_type` of a COMMAND.
        task_type;
        /// `data.context.process_id` of a COMMAND.
        process_id;
    }

    /// `data.event_data.duration_seconds` of an EVENT.
    pub fn duration_seconds(&self) -> Option<f64> {
        self.env.duration_seconds
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
    event_name: Option<Text>,
    task_id: Option<Text>,
    task_type: Option<Text>,
    process_id: Option<Text>,
    duration_seconds: Option<f64>,
    tokens_used: Option<f64>,
    cost_usd: Option<f64>,
    estimated_cost_usd: Option<f64>,
    latency_ms: Option<f64>,
    execution_time_ms: Option<f64>,
    quality_score: Option<f64>,
    has_metrics: bool,
}

/// What a wanted key's value is read as.
#[derive(Clone, Copy)]
enum Slot {
    SpecVersion,
    Type,
    Id,
    Source,
    Subject,
    Traceparent,
    Tracestate,
    Data,
    Action,
    Status,
    Error,
    Metrics,
    Output,
    ExecutionTimeMs,
    Code,
    Model,
    TokensUsed,
    CostUsd,
    EstimatedCostUsd,
    LatencyMs,
    QualityScore,
    EventName,
    EventData,
    Context,
    TaskId,
    TaskType,
    ProcessId,
    DurationSeconds,
}

/// Which object the scanner is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Top,
    Data,
    Error,
    Metrics,
    Output,
    EventData,
    Context,
}

fn slot(level: Level, key: &[u8]) -> Option<Slot> {
    Some(match (level, key) {
        (Level::Top, b"specversion") => Slot::SpecVersion,
        (Level::Top, b"type") => Slot::Type,
        (Level::Top, b"id") => Slot::Id,
        (Level::Top, b"source") => Slot::Source,
        (Level::Top, b"subject") => Slot::Subject,
        (Level::Top, b"traceparent") => Slot::Traceparent,
        (Level::Top, b"tracestate") => Slot::Tracestate,
        (Level::Top, b"data") => Slot::Data,
        (Level::Data, b"action") => Slot::Action,
        (Level::Data, b"status") => Slot::Status,
        (Level::Data, b"error") => Slot::Error,
        (Level::Data, b"metrics") => Slot::Metrics,
        (Level::Data, b"output") => Slot::Output,
        (Level::Data, b"execution_time_ms") => Slot::ExecutionTimeMs,
        (Level::Data, b"event_type") => Slot::EventName,
        (Level::Data, b"event_data") => Slot::EventData,
        (Level::Data, b"context") => Slot::Context,
        (Level::EventData, b"task_id") => Slot::TaskId,
        (Level::EventData | Level::Context, b"task_type") => Slot::TaskType,
        (Level::EventData, b"duration_seconds") => Slot::DurationSeconds,
        (Level::Context, b"process_id") => Slot::ProcessId,
        (Level::Error, b"code") => Slot::Code,
        (Level::Metrics, b"model") => Slot::Model,
        (Level::Metrics, b"tokens_used") => Slot::TokensUsed,
        (Level::Metrics, b"cost_usd") => Slot::CostUsd,
        (Level::Metrics, b"estimated_cost_usd") => Slot::EstimatedCostUsd,
        (Level::Metrics, b"latency_ms") => Slot::LatencyMs,
        (Level::Output, b"quality_score") => Slot::QualityScore,
        _ => return None,
    })
}

/// Forgets what an earlier occurrence of a nested object's key set.
fn reset(level: Level, out: &mut Fields) {
    let d = &mut out.data;
    match level {
        Level::Top => {}
        Level::Data => *d = DataFields::default(),
        Level::Error => d.error_code = None,
        Level::Metrics => {
            d.model = None;
            d.tokens_used = None;
            d.cost_usd = None;
            d.estimated_cost_usd = None;
            d.latency_ms = None;
            d.has_metrics = false;
        }
        Level::Output => d.quality_score = None,
        Level::EventData => {
            d.task_id = None;
            d.task_type = None;
            d.duration_seconds = None;
        }
        Level::Context => {
            d.task_type = None;
            d.process_id = None;
        }
    }
}

fn text_slot(slot: Slot, out: &mut Fields) -> Option<&mut Option<Text>> {
    Some(match slot {
        Slot::SpecVersion => &mut out.spec_version,
        Slot::Type => &mut out.event_type,
        Slot::Id => &mut out.id,
        Slot::Source => &mut out.source,
        Slot::Subject => &mut out.subject,
        Slot::Traceparent => &mut out.traceparent,
        Slot::Tracestate => &mut out.tracestate,
        Slot::Action => &mut out.data.action,
        Slot::Status => &mut out.data.status,
        Slot::Code => &mut out.data.error_code,
        Slot::Model => &mut out.data.model,
        Slot::EventName => &mut out.data.event_name,
        Slot::TaskId => &mut out.data.task_id,
        Slot::TaskType => &mut out.data.task_type,
        Slot::ProcessId => &mut out.data.process_id,
        _ => return None,
    })
}

fn num_slot(slot: Slot, out: &mut Fields) -> Option<&mut Option<f64>> {
    Some(match slot {
        Slot::ExecutionTimeMs => &mut out.data.execution_time_ms,
        Slot::TokensUsed => &mut out.data.tokens_used,
        Slot::CostUsd => &mut out.data.cost_usd,
        Slot::EstimatedCostUsd => &mut out.data.estimated_cost_usd,
        Slot::LatencyMs => &mut out.data.latency_ms,
        Slot::QualityScore => &mut out.data.quality_score,
        Slot::DurationSeconds => &mut out.data.duration_seconds,
        _ => return None,
    })
}

/// A JSON string as found: the byte range of its content, and whether it
/// holds escapes (then it must be decoded before use).
#[derive(Clone, Copy)]
struct RawStr {
    start: usize,
    end: usize,
    escaped: bool,
}

/// Payloads up to this size are validated as UTF-8 in one pass (cheaper
/// than validating their kept strings one by one); longer ones only in
/// their kept strings, whatever their size.
const VALIDATED_WHOLE: usize = 1024;

/// How many eight-byte words of a string are searched word by word before
/// it counts as long (see [`Scanner::string`]): ids and names (a UUID is 36
/// bytes) stay on the word path, whose start costs less than a `memchr2`
/// call.
const LONG_STRING_WORDS: u32 = 6;

/// A single-pass JSON scanner over the payload. Every method returns `None`
/// on malformed input; nothing here can panic or recurse without bound
/// (skipped containers are tracked on an explicit stack, and the wanted
/// objects are at most three levels deep).
struct Scanner<'a> {
    b: &'a [u8],
    /// The whole payload as text, when it is short and valid UTF-8 (the
    /// common case): kept strings are then sliced from it, not validated
    /// one by one. A long payload (an LLM output, say) is not validated
    /// whole: only its few kept strings are.
    utf8: Option<&'a str>,
    i: usize,
    /// The kept strings, back to back (becomes [`Envelope::text`]).
    text: String,
}

/// Room for the kept fields of a typical MindBus message in one allocation
/// (ids, source, subject, traceparent, action: about 170 bytes).
const TEXT_CAPACITY: usize = 256;

impl<'a> Scanner<'a> {
    fn new(b: &'a [u8]) -> Self {
        Scanner {
            b,
            utf8: if b.len() <= VALIDATED_WHOLE {
                std::str::from_utf8(b).ok()
            } else {
                None
            },
            i: 0,
            text: String::new(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// The whole document: one object and nothing after it.
    fn document(&mut self, out: &mut Fields) -> Option<()> {
        self.eat(b'{')?;
        self.members(Level::Top, out)?;
        self.ws();
        (self.i == self.b.len()).then_some(())
    }

    /// The members of an object whose `{` was consumed, through its `}`.
    fn members(&mut self, level: Level, out: &mut Fields) -> Option<()> {
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.eat(b':')?;
            self.ws();
            // Keys with escapes are never ours.
            let wanted = if key.escaped {
                None
            } else {
                slot(level, &self.b[key.start..key.end])
            };
            match wanted {
                None => self.skip_value()?,
                Some(slot) => self.wanted(slot, out)?,
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn wanted(&mut self, slot: Slot, out: &mut Fields) -> Option<()> {
        let nested = match slot {
            Slot::Data => Some(Level::Data),
            Slot::Error => Some(Level::Error),
            Slot::Metrics => Some(Level::Metrics),
            Slot::Output => Some(Level::Output),
            Slot::EventData => Some(Level::EventData),
            Slot::Context => Some(Level::Context),
            _ => None,
        };
        if let Some(level) = nested {
            // Duplicate keys: the last one wins, also for objects.
            reset(level, out);
            if self.peek()? == b'{' {
                self.i += 1;
                if level == Level::Metrics {
                    out.data.has_metrics = true;
                }
                return self.members(level, out);
            }
            return self.skip_value();
        }
        let is_num = num_slot(slot, out).is_some();
        match (self.peek()?, is_num) {
            (b'"', false) => {
                let raw = self.string()?;
                let value = self.keep(raw);
                if let Some(t) = text_slot(slot, out) {
                    *t = value;
                }
            }
            (b'"', true) => {
                let raw = self.string()?;
                let bytes = &self.b[raw.start..raw.end];
                let value = if raw.escaped {
                    unescape(bytes).and_then(|s| s.trim().parse::<f64>().ok())
                } else {
                    std::str::from_utf8(bytes)
                        .ok()
                        .and_then(|s| s.trim().parse::<f64>().ok())
                }
                .filter(|n| n.is_finite());
                if let Some(n) = num_slot(slot, out) {
                    *n = value;
                }
            }
            (b'-' | b'0'..=b'9', true) => {
                let (start, end) = self.number()?;
                let value = std::str::from_utf8(&self.b[start..end])
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .filter(|n| n.is_finite());
                if let Some(n) = num_slot(slot, out) {
                    *n = value;
                }
            }
            _ => {
                // Any other value: skipped, and the field reads as absent.
                self.skip_value()?;
                if let Some(n) = num_slot(slot, out) {
                    *n = None;
                }
                if let Some(t) = text_slot(slot, out) {
                    *t = None;
                }
            }
        }
        Some(())
    }

    /// A kept string, validated (and decoded if escaped) into the text
    /// buffer; `None` when it is not UTF-8 (the field then reads as absent,
    /// as a field of another type does).
    #[inline(always)]
    fn keep(&mut self, raw: RawStr) -> Option<Text> {
        let bytes = &self.b[raw.start..raw.end];
        let start = u32::try_from(self.text.len()).ok()?;
        if self.text.capacity() == 0 {
            self.text.reserve(TEXT_CAPACITY.min(self.b.len()));
        }
        // Both ends of a JSON string's content sit next to a quote, so in a
        // valid UTF-8 payload they are always char boundaries.
        let plain = match self.utf8 {
            _ if raw.escaped => None,
            Some(all) => all.get(raw.start..raw.end),
            None => std::str::from_utf8(bytes).ok(),
        };
        match plain {
            Some(s) => self.text.push_str(s),
            None if raw.escaped => self.text.push_str(&unescape(bytes)?),
            None => return None,
        }
        let len = u32::try_from(self.text.len()).ok()? - start;
        Some(Text { start, len })
    }

    /// A string starting at `"`; checks escapes and control characters.
    #[inline(always)]
    fn string(&mut self) -> Option<RawStr> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            // The next special byte. Short runs (keys, ids, names, the text
            // between two close escapes): eight bytes at a time, the kind of
            // byte read from the word already loaded. Past
            // `LONG_STRING_WORDS` words the run is long (an LLM output, say):
            // `memchr2` finds the next quote or backslash with the CPU's
            // vector instructions, and one more vectorised pass proves the
            // bytes before it hold no control character.
            let mut words = 0;
            let c = loop {
                if words == LONG_STRING_WORDS {
                    let rest = b.get(i..)?;
                    let at = memchr::memchr2(b'"', b'\\', rest)?;
                    if has_control(&rest[..at]) {
                        return None;
                    }
                    i += at;
                    break rest[at];
                }
                if let Some(w) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
                    let v = u64::from_le_bytes(*w);
                    let hits = special_bytes(v);
                    if hits != 0 {
                        let bit = hits.trailing_zeros();
                        i += (bit / 8) as usize;
                        break (v >> (bit & !7)) as u8;
                    }
                    i += 8;
                    words += 1;
                } else {
                    let c = *b.get(i)?;
                    if is_special(c) {
                        break c;
                    }
                    i += 1;
                }
            };
            match c {
                b'"' => {
                    self.i = i + 1;
                    return Some(RawStr {
                        start,
                        end: i,
                        escaped,
                    });
                }
                b'\\' => {
                    escaped = true;
                    // A run of escapes is walked here, with no search
                    // between them: text in a non-Latin script from a writer
                    // that escapes every non-ASCII character (Python's
                    // `json.dumps` does by default) is mostly `\uXXXX`.
                    loop {
                        // `\uXXXX` and whether another escape follows, from
                        // one eight-byte word.
                        if let Some(w) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
                            let v = u64::from_le_bytes(*w);
                            if v & 0xffff == u64::from(u16::from_le_bytes(*b"\\u")) {
                                if !is_hex4((v >> 16) as u32) {
                                    return None;
                                }
                                i += 6;
                                if (v >> 48) as u8 == b'\\' {
                                    continue;
                                }
                                break;
                            }
                        }
                        match b.get(i + 1)? {
                            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                            b'u' => {
                                let hex = b.get(i + 2..i + 6)?.first_chunk::<4>()?;
                                if !is_hex4(u32::from_le_bytes(*hex)) {
                                    return None;
                                }
                                i += 6;
                            }
                            _ => return None,
                        }
                        if b.get(i) != Some(&b'\\') {
                            break;
                        }
                    }
                }
                _ => return None, // raw control character
            }
        }
    }

    /// A number, by the JSON grammar; returns its byte range.
    fn number(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let digits = |s: &mut Self| {
            let from = s.i;
            while let Some(b'0'..=b'9') = s.peek() {
                s.i += 1;
            }
            s.i > from
        };
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else if !digits(self) {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !digits(self) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        Some((start, self.i))
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// Skips any value, however deeply nested, without recursion.
    fn skip_value(&mut self) -> Option<()> {
        let mut open = Containers::default();
        loop {
            self.ws();
            // A value.
            match self.peek()? {
                c @ (b'{' | b'[') => {
                    let object = c == b'{';
                    self.i += 1;
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.i += 1;
                    } else {
                        open.push(object);
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => {
                    self.number()?;
                }
                _ => return None,
            }
            // After a value: close containers or move to the next element.
            loop {
                let Some(object) = open.last() else {
                    return Some(());
                };
                self.ws();
                match (self.peek()?, object) {
                    (b',', _) => {
                        self.i += 1;
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    (b'}', true) | (b']', false) => {
                        self.i += 1;
                        open.pop();
                    }
                    _ => return None,
                }
            }
        }
    }

    /// `"key":` inside a skipped object.
    fn key(&mut self) -> Option<()> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        self.string()?;
        self.eat(b':')
    }
}

/// The containers open while a value is skipped: true for an object,
/// false for an array. The first 64 levels live in a bit set, so skipping
/// allocates nothing unless the nesting is deeper than that.
#[derive(Default)]
struct Containers {
    depth: usize,
    bits: u64,
    deeper: Vec<bool>,
}

impl Containers {
    fn push(&mut self, object: bool) {
        if self.depth < 64 {
            self.bits = (self.bits & !(1 << self.depth)) | (u64::from(object) << self.depth);
        } else {
            self.deeper.push(object);
        }
        self.depth += 1;
    }

    fn last(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d if d <= 64 => Some(self.bits >> (d - 1) & 1 == 1),
            _ => self.deeper.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.deeper.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// True for the bytes that end or interrupt a JSON string: `"`, `\\` and
/// control characters.
fn is_special(c: u8) -> bool {
    c == b'"' || c == b'\\' || c < 0x20
}

/// True when the four bytes of `x` (little-endian) are hexadecimal digits
/// (of a `\uXXXX` escape), tested together: each byte is ASCII, and either within
/// `0`..=`9` or, with its case bit set, within `a`..=`f`. For ASCII bytes
/// the sums below stay within each byte (no carry into the next), and the
/// high bit of `x + (0x80 - n)` says `x >= n`.
fn is_hex4(x: u32) -> bool {
    const ONES: u32 = 0x0101_0101;
    const HIGH: u32 = 0x8080_8080;
    if x & HIGH != 0 {
        return false;
    }
    let at_least = |x: u32, n: u32| x + ONES * (0x80 - n);
    let digit = at_least(x, 0x30) & !at_least(x, 0x3a);
    let lower = x | (ONES * 0x20);
    let letter = at_least(lower, 0x61) & !at_least(lower, 0x67);
    (digit | letter) & HIGH == HIGH
}

/// True when `bytes` hold a control character (below 0x20), which a JSON
/// string may not hold raw. A minimum over all bytes, without an early
/// exit, so that it compiles to vector instructions.
fn has_control(bytes: &[u8]) -> bool {
    bytes.iter().fold(u8::MAX, |m, &c| m.min(c)) < 0x20
}

/// The special bytes of eight (little-endian) as flags (the high bit of
/// each byte): the lowest flagged byte is the first special one.
fn special_bytes(v: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // (x - n * ONES) & !x & HIGH flags the bytes of x below n (n <= 0x80).
    // Flipping bit 1 maps the quote (0x22) to 0x20 and keeps the control
    // characters below 0x20 (the space, 0x20, becomes 0x22): one test for
    // both. The backslash is the zero byte of v ^ its pattern. Borrows only
    // run upwards, so the lowest flag is always a true hit.
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    below(v ^ (ONES * 0x02), 0x21) | below(v ^ (ONES * u64::from(b'\\')), 1)
}

/// The offset of the first special byte (see [`is_special`]), if any.
#[cfg(test)]
fn special_at(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(w) = bytes.get(at..).and_then(<[u8]>::first_chunk::<8>) {
        let hits = special_bytes(u64::from_le_bytes(*w));
        if hits != 0 {
            return Some(at + (hits.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&c| is_special(c))
        .map(|p| at + p)
}

/// Decodes the content of an escaped JSON string (already checked by
/// [`Scanner::string`]). `None` for invalid UTF-8 or a lone surrogate.
fn unescape(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex4 = |at: usize| -> Option<u32> {
        let s = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
        u32::from_str_radix(s, 16).ok()
    };
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = *raw.get(i + 1)?;
        i += 2;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(i)?;
                i += 4;
                if (0xD800..0xDC00).contains(&hi) {
                    if raw.get(i..i + 2)? != b"\\u" {
                        return None;
                    }
                    let lo = hex4(i + 2)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return None;
                    }
                    i += 6;
                    char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?
                } else {
                    char::from_u32(hi)?
                }
            }
            _ => return None,
        };
        let mut buf = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture's routing key and body.
    fn fixture(name: &str) -> (String, Vec<u8>) {
        let f = crate::test_fixtures::fixture(name);
        (f.routing_key, f.body)
    }

    #[test]
    fn command_fixture() {
        let (rk, body) = fixture("command");
        let env = Envelope::read(&rk, &body);
        let v = env.view();
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
        assert_eq!(v.process_id(), Some("blog-001"));
        assert_eq!(
            (v.task_type(), v.event_name(), v.task_id()),
            (None, None, None)
        );
        // One allocation of the planned size holds every kept field.
        assert!(env.text.len() <= TEXT_CAPACITY, "{}", env.text.len());
    }

    #[test]
    fn result_fixture_has_llm_metrics() {
        let (rk, body) = fixture("result");
        let env = Envelope::read(&rk, &body);
        let v = env.view();
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
        assert_eq!(env.view().error_code(), Some("DEADLINE_EXCEEDED"));
        assert_eq!(env.view().execution_time_ms(), Some(30500.0));
        let (rk, body) = fixture("event");
        let env = Envelope::read(&rk, &body);
        assert_eq!(env.kind(), MessageKind::Event);
        let v = env.view();
        assert_eq!(v.event_name(), Some("task.completed"));
        assert_eq!(v.task_id(), Some("task-article-555"));
        assert_eq!(v.duration_seconds(), Some(40.0));
        assert_eq!(v.task_type(), None);
        let (rk, body) = fixture("control");
        let env = Envelope::read(&rk, &body);
        assert_eq!(env.kind(), MessageKind::Control);
        assert_eq!(env.view().source(), Some("human-operator"));
    }

    #[test]
    fn task_fields_at_their_own_levels_only() {
        let body = br#"{"specversion":"1.0","type":"ai.team.event","task_type":"top",
            "data":{"event_type":"task.failed","task_id":"wrong-level",
                    "event_data":{"task_id":"t-1","task_type":"article","duration_seconds":"2.5",
                                  "process_id":"wrong-level"},
                    "context":{"task_type":"blog","process_id":"p-1"}}}"#;
        let env = Envelope::read("evt.task.failed", body);
        let v = env.view();
        assert_eq!(v.event_name(), Some("task.failed"));
        assert_eq!(v.task_id(), Some("t-1"));
        assert_eq!(v.duration_seconds(), Some(2.5));
        // Both levels name a task type: the later one wins.
        assert_eq!(v.task_type(), Some("blog"));
        assert_eq!(v.process_id(), Some("p-1"));
        // A repeated event_data forgets the first one's fields.
        let body =
            br#"{"data":{"event_data":{"task_id":"a","duration_seconds":1},"event_data":{}}}"#;
        let env = Envelope::read("evt.task.failed", body);
        assert_eq!(
            (env.view().task_id(), env.view().duration_seconds()),
            (None, None)
        );
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
        let v = env.view();
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
        assert_eq!(Envelope::read("", body).view().action(), None);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = br#"{"specversion":"1.0","type":"ai.team.command","source":"agent.\"w\"\u00e9","data":{"action":"gen"}}"#;
        let env = Envelope::read("", body);
        assert_eq!(env.view().source(), Some("agent.\"w\"\u{e9}"));
        assert_eq!(env.view().action(), Some("gen"));
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

    /// Strings short and long (the word path and the `memchr2` path, and
    /// the switch between them), with an escape, a raw control character or
    /// a bad escape at every offset, kept (`subject`) and skipped, in
    /// payloads validated whole and in longer ones (whose kept strings are
    /// validated one by one): the reader agrees with `serde_json` on
    /// validity and on the value.
    #[test]
    fn strings_of_every_length_agree_with_serde_json() {
        let specials: [&str; 14] = [
            "\\\"",
            "\\n",
            "\\u00e9",
            "\\\\",
            "\u{1}",
            "\n",
            "\\x",
            "\u{e9}",
            // Runs of escapes, and bad `\u` escapes.
            "\\u00e9\\u00E8\\u0430",
            "\\u00e9\\n\\u00e9",
            "\\n\\u00e9",
            "\\u00g9",
            "\\u00e\\u00e9",
            "\\u\u{e9}00",
        ];
        let filler = |n: usize| -> String {
            (0..n)
                .map(|i| if i % 11 == 10 { ' ' } else { 'a' })
                .collect()
        };
        let long = filler(VALIDATED_WHOLE);
        // Every short length, then around each word boundary and the switch
        // to `memchr2` (after `LONG_STRING_WORDS` words), and one long.
        let switch = LONG_STRING_WORDS as usize * 8;
        let lengths = (0..=24).chain(
            [31, 32, 33, 39, 40, 41]
                .into_iter()
                .chain([switch - 1, switch, switch + 1, switch + 7, switch + 8])
                .chain([2 * switch + 1, 3 * switch]),
        );
        for len in lengths {
            for at in 0..=len {
                for (special, pad) in specials.iter().flat_map(|s| [(s, ""), (s, &*long)]) {
                    let content = format!("{}{special}{}", filler(at), filler(len - at));
                    for body in [
                        format!(
                            r#"{{"specversion":"1.0","type":"ai.team.event","subject":"{content}","pad":"{pad}","data":{{"action":"a"}}}}"#
                        ),
                        format!(
                            r#"{{"specversion":"1.0","type":"ai.team.event","skipped":"{content}","pad":"{pad}","data":{{"action":"a"}}}}"#
                        ),
                        // Last in the body: escapes within its last eight bytes.
                        format!(
                            r#"{{"specversion":"1.0","type":"ai.team.event","pad":"{pad}","data":{{"action":"a"}},"subject":"{content}"}}"#
                        ),
                    ] {
                        let env = Envelope::read("evt.a", body.as_bytes());
                        let v = env.view();
                        match serde_json::from_str::<serde_json::Value>(&body) {
                            Ok(doc) => {
                                assert_eq!(v.format(), BodyFormat::CloudEvent, "{body}");
                                assert_eq!(v.subject(), doc["subject"].as_str(), "{body}");
                                assert_eq!(v.action(), Some("a"), "{body}");
                            }
                            Err(_) => assert_eq!(v.format(), BodyFormat::NotJson, "{body}"),
                        }
                    }
                }
            }
        }
    }

    /// In a payload too long to be validated whole, a kept string that is
    /// not UTF-8 reads as absent and one elsewhere in the body is skipped,
    /// as in a short payload.
    #[test]
    fn long_payloads_validate_only_their_kept_strings() {
        let long = "x".repeat(VALIDATED_WHOLE);
        for (subject, skipped, expected) in [
            (&b"task-\xff"[..], &b"ok"[..], None),
            (b"task-1", b"bad-\xff", Some("task-1")),
        ] {
            for pad in ["", &long] {
                let mut body =
                    br#"{"specversion":"1.0","type":"ai.team.event","subject":""#.to_vec();
                body.extend_from_slice(subject);
                body.extend_from_slice(br#"","other":""#);
                body.extend_from_slice(skipped);
                body.extend_from_slice(format!(r#"","pad":"{pad}","source":"a.1"}}"#).as_bytes());
                assert_eq!(body.len() > VALIDATED_WHOLE, !pad.is_empty());
                let env = Envelope::read("evt.a", &body);
                let v = env.view();
                assert_eq!(v.format(), BodyFormat::CloudEvent);
                assert_eq!(v.source(), Some("a.1"));
                assert_eq!(v.subject(), expected);
            }
        }
    }

    #[test]
    fn hex4_matches_a_bytewise_test() {
        for at in 0..4 {
            for c in 0..=255u8 {
                for filler in [b'0', b'9', b'a', b'F'] {
                    let mut h = [filler; 4];
                    h[at] = c;
                    let expected = h.iter().all(u8::is_ascii_hexdigit);
                    assert_eq!(is_hex4(u32::from_le_bytes(h)), expected, "{h:?}");
                }
            }
        }
    }

    #[test]
    fn special_byte_search_matches_a_plain_scan() {
        let naive = |b: &[u8]| b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    // Fill with bytes around the boundaries of the tests.
                    let mut v: Vec<u8> = (0..len)
                        .map(|i| [b'a', 0x20, 0x7f, 0x80, 0xff, b'!', b'#'][i % 7])
                        .collect();
                    if at < len {
                        v[at] = special;
                    }
                    assert_eq!(special_at(&v), naive(&v), "{v:?}");
                }
            }
        }
    }

    #[test]
    fn the_envelope_outlives_its_payload() {
        let body = br#"{"specversion":"1.0","type":"ai.team.command","id":"ab\u00e9"}"#.to_vec();
        let env = Envelope::read("", &body);
        drop(body);
        assert_eq!(env.view().id(), Some("ab\u{e9}"));
        assert_eq!(env.view().event_type(), Some("ai.team.command"));
    }

    #[test]
    fn event_type_names_round_trip() {
        for kind in MessageKind::ALL {
            match kind.event_type() {
                Some(t) => assert_eq!(MessageKind::from_event_type(t), Some(kind)),
                None => assert_eq!(kind, MessageKind::Unknown),
            }
        }
    }

    #[test]
    fn containers_deeper_than_the_bit_set() {
        for depth in [1usize, 63, 64, 65, 200] {
            let mut open = Containers::default();
            let shape: Vec<bool> = (0..depth).map(|i| i % 3 == 0).collect();
            for &o in &shape {
                open.push(o);
            }
            for &o in shape.iter().rev() {
                assert_eq!(open.last(), Some(o), "depth {depth}");
                open.pop();
            }
            assert_eq!(open.last(), None);
        }
    }
}
