//! Owned span data decoded from OTLP messages.

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1 as proto;

/// An attribute value, decoded from an OTLP `AnyValue`.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// A string value.
    Str(String),
    /// A boolean value.
    Bool(bool),
    /// A 64-bit signed integer value.
    I64(i64),
    /// A 64-bit floating point value.
    F64(f64),
    /// A byte array value.
    Bytes(Vec<u8>),
    /// A homogeneous or heterogeneous array of values.
    Array(Vec<AttrValue>),
    /// A list of key/value pairs (a nested map).
    KvList(Vec<(String, AttrValue)>),
    /// An `AnyValue` with no value set (OTLP allows it; OpenTelemetry SDKs do not send it).
    Empty,
}

impl AttrValue {
    /// The string, when this is [`AttrValue::Str`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            AttrValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when this is [`AttrValue::I64`].
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            AttrValue::I64(v) => Some(*v),
            _ => None,
        }
    }

    /// The float, when this is [`AttrValue::F64`] (integers are not converted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            AttrValue::F64(v) => Some(*v),
            _ => None,
        }
    }

    /// The boolean, when this is [`AttrValue::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            AttrValue::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// The bytes, when this is [`AttrValue::Bytes`].
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            AttrValue::Bytes(v) => Some(v),
            _ => None,
        }
    }

    /// The elements, when this is [`AttrValue::Array`].
    pub fn as_array(&self) -> Option<&[AttrValue]> {
        match self {
            AttrValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// Decodes an OTLP `AnyValue`.
    pub fn from_proto(value: &AnyValue) -> AttrValue {
        match &value.value {
            Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
            Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
            Some(any_value::Value::IntValue(i)) => AttrValue::I64(*i),
            Some(any_value::Value::DoubleValue(f)) => AttrValue::F64(*f),
            Some(any_value::Value::BytesValue(b)) => AttrValue::Bytes(b.clone()),
            Some(any_value::Value::ArrayValue(a)) => {
                AttrValue::Array(a.values.iter().map(AttrValue::from_proto).collect())
            }
            Some(any_value::Value::KvlistValue(l)) => {
                AttrValue::KvList(decode_attributes(&l.values))
            }
            Some(any_value::Value::StringValueStrindex(_)) | None => AttrValue::Empty,
        }
    }
}

impl fmt::Display for AttrValue {
    /// Strings are written as is (no quotes), bytes as `0x` + hex, arrays as `[a, b]`,
    /// key/value lists as `{k: v, ...}` and empty values as `<empty>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::I64(i) => write!(f, "{i}"),
            AttrValue::F64(v) => write!(f, "{v}"),
            AttrValue::Bytes(bytes) => {
                f.write_str("0x")?;
                for b in bytes {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            AttrValue::Array(values) => {
                f.write_str("[")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            AttrValue::KvList(pairs) => {
                f.write_str("{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
            AttrValue::Empty => f.write_str("<empty>"),
        }
    }
}

impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}

impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}

impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::I64(v)
    }
}

impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::F64(v)
    }
}

/// Decodes a list of OTLP `KeyValue`s, keeping their order.
pub fn decode_attributes(kvs: &[KeyValue]) -> Vec<(String, AttrValue)> {
    kvs.iter()
        .map(|kv| {
            let value = kv
                .value
                .as_ref()
                .map_or(AttrValue::Empty, AttrValue::from_proto);
            (kv.key.clone(), value)
        })
        .collect()
}

pub(crate) fn lookup<'a>(attrs: &'a [(String, AttrValue)], key: &str) -> Option<&'a AttrValue> {
    attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A span event.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    /// Event name.
    pub name: String,
    /// Event timestamp, nanoseconds since the Unix epoch.
    pub time_unix_nanos: u64,
    /// Event attributes, in the order they were sent.
    pub attributes: Vec<(String, AttrValue)>,
}

impl ReceivedEvent {
    /// The value of an event attribute.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.attributes, key)
    }
}

/// A link from a span to another span context.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedLink {
    /// Trace id of the linked span.
    pub trace_id: TraceId,
    /// Span id of the linked span.
    pub span_id: SpanId,
    /// Link attributes, in the order they were sent.
    pub attributes: Vec<(String, AttrValue)>,
}

impl ReceivedLink {
    /// The value of a link attribute.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.attributes, key)
    }
}

/// Span status code (OTLP `Status.StatusCode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum StatusCode {
    /// The status was not set.
    #[default]
    Unset,
    /// The operation was explicitly marked as successful.
    Ok,
    /// The operation failed.
    Error,
}

/// Span status: a code and a description (set for errors).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ReceivedStatus {
    /// Status code.
    pub code: StatusCode,
    /// Status message (only meaningful for [`StatusCode::Error`]).
    pub message: String,
}

/// A span as received by the [`OtlpReceiver`](crate::OtlpReceiver), decoded into owned data.
///
/// It can also be built by hand (it implements [`Default`]) to feed
/// [`render_tree`](crate::render_tree) or a [`SpanSet`](crate::SpanSet).
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// Trace id.
    pub trace_id: TraceId,
    /// Span id.
    pub span_id: SpanId,
    /// Parent span id; `None` for a root span (empty or all-zero on the wire).
    pub parent_span_id: Option<SpanId>,
    /// Span name.
    pub name: String,
    /// Span kind; OTLP's `SPAN_KIND_UNSPECIFIED` is mapped to [`SpanKind::Internal`].
    pub kind: SpanKind,
    /// The `service.name` resource attribute, when it is a string.
    pub service_name: Option<String>,
    /// Name of the instrumentation scope (the tracer name).
    pub scope_name: String,
    /// Version of the instrumentation scope (empty when not set).
    pub scope_version: String,
    /// Span attributes, in the order they were sent.
    pub attributes: Vec<(String, AttrValue)>,
    /// Resource attributes, in the order they were sent.
    pub resource: Vec<(String, AttrValue)>,
    /// Span events, in the order they were sent.
    pub events: Vec<ReceivedEvent>,
    /// Span links, in the order they were sent.
    pub links: Vec<ReceivedLink>,
    /// Span status.
    pub status: ReceivedStatus,
    /// Start time, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// End time, nanoseconds since the Unix epoch.
    pub end_unix_nanos: u64,
    /// W3C `tracestate` header value of the span context (usually empty).
    pub trace_state: String,
}

impl Default for ReceivedSpan {
    fn default() -> Self {
        ReceivedSpan {
            trace_id: TraceId::INVALID,
            span_id: SpanId::INVALID,
            parent_span_id: None,
            name: String::new(),
            kind: SpanKind::Internal,
            service_name: None,
            scope_name: String::new(),
            scope_version: String::new(),
            attributes: Vec::new(),
            resource: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
            status: ReceivedStatus::default(),
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            trace_state: String::new(),
        }
    }
}

impl ReceivedSpan {
    /// End time minus start time (zero when the end precedes the start).
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_unix_nanos.saturating_sub(self.start_unix_nanos))
    }

    /// The value of a span attribute (the first one, should the key be repeated).
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.attributes, key)
    }

    /// A string span attribute; `None` when absent or of another type.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }

    /// An integer span attribute; `None` when absent or of another type.
    pub fn attr_i64(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(AttrValue::as_i64)
    }

    /// A float span attribute; `None` when absent or of another type.
    pub fn attr_f64(&self, key: &str) -> Option<f64> {
        self.attr(key).and_then(AttrValue::as_f64)
    }

    /// A boolean span attribute; `None` when absent or of another type.
    pub fn attr_bool(&self, key: &str) -> Option<bool> {
        self.attr(key).and_then(AttrValue::as_bool)
    }

    /// The value of a resource attribute.
    pub fn resource_attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.resource, key)
    }

    /// The first event with this name.
    pub fn event(&self, name: &str) -> Option<&ReceivedEvent> {
        self.events.iter().find(|e| e.name == name)
    }

    /// Whether the span has an event with this name.
    pub fn has_event(&self, name: &str) -> bool {
        self.event(name).is_some()
    }

    /// Whether the span status is [`StatusCode::Error`].
    pub fn is_error(&self) -> bool {
        self.status.code == StatusCode::Error
    }

    /// Whether the span has no parent.
    pub fn is_root(&self) -> bool {
        self.parent_span_id.is_none()
    }

    /// Whether this span has a link to `other`'s span context.
    pub fn links_to(&self, other: &ReceivedSpan) -> bool {
        self.links
            .iter()
            .any(|l| l.trace_id == other.trace_id && l.span_id == other.span_id)
    }

    /// Decodes one OTLP span, given the resource and scope it was sent under.
    pub fn from_proto(
        span: &proto::Span,
        resource: &[(String, AttrValue)],
        scope_name: &str,
        scope_version: &str,
    ) -> ReceivedSpan {
        let service_name = lookup(resource, "service.name")
            .and_then(AttrValue::as_str)
            .map(str::to_owned);
        let status = span
            .status
            .as_ref()
            .map_or_else(ReceivedStatus::default, |s| {
                let code = match proto::status::StatusCode::try_from(s.code) {
                    Ok(proto::status::StatusCode::Ok) => StatusCode::Ok,
                    Ok(proto::status::StatusCode::Error) => StatusCode::Error,
                    _ => StatusCode::Unset,
                };
                ReceivedStatus {
                    code,
                    message: s.message.clone(),
                }
            });
        ReceivedSpan {
            trace_id: trace_id_from_bytes(&span.trace_id),
            span_id: span_id_from_bytes(&span.span_id),
            parent_span_id: Some(span_id_from_bytes(&span.parent_span_id))
                .filter(|id| *id != SpanId::INVALID),
            name: span.name.clone(),
            kind: kind_from_proto(span.kind),
            service_name,
            scope_name: scope_name.to_owned(),
            scope_version: scope_version.to_owned(),
            attributes: decode_attributes(&span.attributes),
            resource: resource.to_vec(),
            events: span
                .events
                .iter()
                .map(|e| ReceivedEvent {
                    name: e.name.clone(),
                    time_unix_nanos: e.time_unix_nano,
                    attributes: decode_attributes(&e.attributes),
                })
                .collect(),
            links: span
                .links
                .iter()
                .map(|l| ReceivedLink {
                    trace_id: trace_id_from_bytes(&l.trace_id),
                    span_id: span_id_from_bytes(&l.span_id),
                    attributes: decode_attributes(&l.attributes),
                })
                .collect(),
            status,
            start_unix_nanos: span.start_time_unix_nano,
            end_unix_nanos: span.end_time_unix_nano,
            trace_state: span.trace_state.clone(),
        }
    }
}

/// Decodes every span of an OTLP export request, in the order they appear in it.
pub fn spans_from_request(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| decode_attributes(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            let (scope_name, scope_version) = ss
                .scope
                .as_ref()
                .map_or(("", ""), |s| (s.name.as_str(), s.version.as_str()));
            out.extend(
                ss.spans
                    .iter()
                    .map(|s| ReceivedSpan::from_proto(s, &resource, scope_name, scope_version)),
            );
        }
    }
    out
}

/// A trace id from 16 bytes; [`TraceId::INVALID`] for any other length.
pub(crate) fn trace_id_from_bytes(bytes: &[u8]) -> TraceId {
    <[u8; 16]>::try_from(bytes).map_or(TraceId::INVALID, TraceId::from_bytes)
}

/// A span id from 8 bytes; [`SpanId::INVALID`] for any other length.
pub(crate) fn span_id_from_bytes(bytes: &[u8]) -> SpanId {
    <[u8; 8]>::try_from(bytes).map_or(SpanId::INVALID, SpanId::from_bytes)
}

fn kind_from_proto(kind: i32) -> SpanKind {
    match proto::span::SpanKind::try_from(kind) {
        Ok(proto::span::SpanKind::Server) => SpanKind::Server,
        Ok(proto::span::SpanKind::Client) => SpanKind::Client,
        Ok(proto::span::SpanKind::Producer) => SpanKind::Producer,
        Ok(proto::span::SpanKind::Consumer) => SpanKind::Consumer,
        _ => SpanKind::Internal,
    }
}
