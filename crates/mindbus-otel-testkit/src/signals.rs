//! Owned log records and metric points decoded from OTLP messages.

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};

use crate::model::{
    AttrValue, ReceivedSpan, decode_attributes, lookup, span_id_from_bytes, trace_id_from_bytes,
};

/// One log record, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedLog {
    /// The `service.name` resource attribute, when it is a string.
    pub service_name: Option<String>,
    /// Resource attributes, in the order they were sent.
    pub resource: Vec<(String, AttrValue)>,
    /// Name of the instrumentation scope (for a `tracing` bridge: the target).
    pub scope_name: String,
    /// Severity number (OTLP: 1-4 TRACE ... 17-20 ERROR; 0 unspecified).
    pub severity_number: i32,
    /// Severity text (`INFO`, `WARN`...), as sent.
    pub severity_text: String,
    /// The body (the message).
    pub body: Option<AttrValue>,
    /// Log attributes, in the order they were sent.
    pub attributes: Vec<(String, AttrValue)>,
    /// The trace the record was written in; `None` outside any span.
    pub trace_id: Option<TraceId>,
    /// The span the record was written in; `None` outside any span.
    pub span_id: Option<SpanId>,
    /// When the event happened, nanoseconds since the Unix epoch (0: not set).
    pub time_unix_nanos: u64,
}

impl ReceivedLog {
    /// The body as text, when it is a string.
    pub fn body_str(&self) -> Option<&str> {
        self.body.as_ref().and_then(AttrValue::as_str)
    }

    /// An attribute, by key.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.attributes, key)
    }

    /// A resource attribute, by key.
    pub fn resource_attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.resource, key)
    }

    /// True when the record was written inside `span` (same trace id and
    /// span id).
    pub fn in_span(&self, span: &ReceivedSpan) -> bool {
        self.trace_id == Some(span.trace_id) && self.span_id == Some(span.span_id)
    }
}

/// Decodes every log record of an OTLP export request, in order.
pub fn logs_from_request(request: &ExportLogsServiceRequest) -> Vec<ReceivedLog> {
    let mut out = Vec::new();
    for rl in &request.resource_logs {
        let resource = resource_of(rl.resource.as_ref().map(|r| r.attributes.as_slice()));
        let service_name = service_name(&resource);
        for sl in &rl.scope_logs {
            let scope_name = sl.scope.as_ref().map_or("", |s| s.name.as_str());
            for r in &sl.log_records {
                let trace_id =
                    Some(trace_id_from_bytes(&r.trace_id)).filter(|id| *id != TraceId::INVALID);
                let span_id =
                    Some(span_id_from_bytes(&r.span_id)).filter(|id| *id != SpanId::INVALID);
                out.push(ReceivedLog {
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                    scope_name: scope_name.to_owned(),
                    severity_number: r.severity_number,
                    severity_text: r.severity_text.clone(),
                    body: r.body.as_ref().map(AttrValue::from_proto),
                    attributes: decode_attributes(&r.attributes),
                    trace_id,
                    span_id,
                    time_unix_nanos: r.time_unix_nano,
                });
            }
        }
    }
    out
}

/// The kind of a metric, as OTLP sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// A sum; `monotonic` for a counter.
    Sum {
        /// Only ever increases.
        monotonic: bool,
    },
    /// A gauge.
    Gauge,
    /// An explicit-bucket histogram.
    Histogram,
    /// An exponential histogram.
    ExponentialHistogram,
    /// A summary.
    Summary,
}

/// The value of one data point.
#[derive(Clone, Debug, PartialEq)]
pub enum PointValue {
    /// An integer sum or gauge.
    I64(i64),
    /// A floating-point sum or gauge.
    F64(f64),
    /// A histogram (explicit or exponential) or summary: how many values,
    /// and their sum when sent.
    Distribution {
        /// How many values were recorded.
        count: u64,
        /// Their sum, when sent.
        sum: Option<f64>,
    },
}

impl PointValue {
    /// The value as a float: a sum or gauge, or a distribution's count.
    pub fn as_f64(&self) -> f64 {
        match self {
            PointValue::I64(v) => *v as f64,
            PointValue::F64(v) => *v,
            PointValue::Distribution { count, .. } => *count as f64,
        }
    }
}

/// One data point of one metric, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMetricPoint {
    /// The `service.name` resource attribute, when it is a string.
    pub service_name: Option<String>,
    /// Resource attributes, in the order they were sent.
    pub resource: Vec<(String, AttrValue)>,
    /// Name of the instrumentation scope (the meter).
    pub scope_name: String,
    /// The metric's name, as sent (OTLP names: `mindbus.messages`, not the
    /// Prometheus `mindbus_messages_total`).
    pub name: String,
    /// The metric's unit, as sent.
    pub unit: String,
    /// The metric's kind.
    pub kind: MetricKind,
    /// The point's attributes, in the order they were sent.
    pub attributes: Vec<(String, AttrValue)>,
    /// The point's value.
    pub value: PointValue,
}

impl ReceivedMetricPoint {
    /// An attribute, by key.
    pub fn attr(&self, key: &str) -> Option<&AttrValue> {
        lookup(&self.attributes, key)
    }

    /// An attribute's string value, by key.
    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(AttrValue::as_str)
    }
}

/// Decodes every data point of an OTLP metrics export request, in order.
pub fn metric_points_from_request(
    request: &ExportMetricsServiceRequest,
) -> Vec<ReceivedMetricPoint> {
    let mut out = Vec::new();
    for rm in &request.resource_metrics {
        let resource = resource_of(rm.resource.as_ref().map(|r| r.attributes.as_slice()));
        let service_name = service_name(&resource);
        for sm in &rm.scope_metrics {
            let scope_name = sm.scope.as_ref().map_or("", |s| s.name.as_str());
            for m in &sm.metrics {
                let mut push = |kind, attributes: &[KeyValue], value| {
                    out.push(ReceivedMetricPoint {
                        service_name: service_name.clone(),
                        resource: resource.clone(),
                        scope_name: scope_name.to_owned(),
                        name: m.name.clone(),
                        unit: m.unit.clone(),
                        kind,
                        attributes: decode_attributes(attributes),
                        value,
                    });
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsInt(i)) => PointValue::I64(*i),
                    Some(number_data_point::Value::AsDouble(f)) => PointValue::F64(*f),
                    None => PointValue::F64(f64::NAN),
                };
                match &m.data {
                    Some(metric::Data::Sum(sum)) => {
                        let kind = MetricKind::Sum {
                            monotonic: sum.is_monotonic,
                        };
                        for p in &sum.data_points {
                            push(kind, &p.attributes, number(&p.value));
                        }
                    }
                    Some(metric::Data::Gauge(gauge)) => {
                        for p in &gauge.data_points {
                            push(MetricKind::Gauge, &p.attributes, number(&p.value));
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            let value = PointValue::Distribution {
                                count: p.count,
                                sum: p.sum,
                            };
                            push(MetricKind::Histogram, &p.attributes, value);
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(h)) => {
                        for p in &h.data_points {
                            let value = PointValue::Distribution {
                                count: p.count,
                                sum: p.sum,
                            };
                            push(MetricKind::ExponentialHistogram, &p.attributes, value);
                        }
                    }
                    Some(metric::Data::Summary(s)) => {
                        for p in &s.data_points {
                            let value = PointValue::Distribution {
                                count: p.count,
                                sum: Some(p.sum),
                            };
                            push(MetricKind::Summary, &p.attributes, value);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    out
}

fn resource_of(attributes: Option<&[KeyValue]>) -> Vec<(String, AttrValue)> {
    attributes.map(decode_attributes).unwrap_or_default()
}

fn service_name(resource: &[(String, AttrValue)]) -> Option<String> {
    lookup(resource, "service.name")
        .and_then(AttrValue::as_str)
        .map(str::to_owned)
}
