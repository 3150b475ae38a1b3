//! The `tracing` subscriber: filter, trace-correlated log lines, OpenTelemetry
//! layer, and optional OTLP log export.

use std::fmt;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Targets whose events never go to the OTLP log exporter (they are emitted while
/// exporting, so exporting them would feed back).
const INTERNAL_TARGETS: [&str; 7] = [
    "opentelemetry",
    "hyper",
    "h2",
    "tonic",
    "tower",
    "mindbus_telemetry",
    "metrics_exporter_prometheus",
];

/// Whether an event of `target` may be exported as an OTLP log record.
pub(crate) fn exportable_target(target: &str) -> bool {
    !INTERNAL_TARGETS.iter().any(|internal| {
        target
            .strip_prefix(internal)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::") || rest.starts_with('_'))
    })
}

/// The trace and span id of the OpenTelemetry context an event belongs to.
///
/// Order: the event's explicit parent span (through the tracing-opentelemetry
/// layer), else the current OpenTelemetry context (set by an entered `tracing` span
/// — the layer activates contexts on entry — or by code running under
/// `FutureExt::with_context` / `Context::attach`), else the current `tracing` span.
pub(crate) fn event_ids<S, N>(
    ctx: &FmtContext<'_, S, N>,
    event: &Event<'_>,
) -> Option<(TraceId, SpanId)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    if let Some(parent) = event.parent()
        && let Some(ids) = ids_of_tracing_span(parent)
    {
        return Some(ids);
    }
    let current = opentelemetry::Context::current();
    let span = current.span();
    let span_context = span.span_context();
    if span_context.is_valid() {
        return Some((span_context.trace_id(), span_context.span_id()));
    }
    if event.is_contextual()
        && let Some(span) = ctx.lookup_current()
    {
        return ids_of_tracing_span(&span.id());
    }
    None
}

fn ids_of_tracing_span(id: &tracing::span::Id) -> Option<(TraceId, SpanId)> {
    // Works with the global subscriber; under a scoped (`with_default`) subscriber
    // the nested lookup sees no dispatcher and yields nothing.
    let cx = tracing::dispatcher::get_default(|dispatch| {
        tracing_opentelemetry::get_otel_context(id, dispatch)
    })?;
    let span = cx.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| (span_context.trace_id(), span_context.span_id()))
}

/// The event formatter: text or JSON, always with `trace_id` and `span_id` when the
/// event belongs to a trace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceAwareFormat {
    pub(crate) format: LogFormat,
}

impl<S, N> FormatEvent<S, N> for TraceAwareFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = event_ids(ctx, event);
        let metadata = event.metadata();
        let spans: Vec<String> = ctx
            .event_scope()
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| span.name().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        match self.format {
            LogFormat::Text => {
                SystemTime.format_time(&mut writer)?;
                write!(writer, " {:>5} ", metadata.level())?;
                for span in &spans {
                    write!(writer, "{span}:")?;
                }
                if !spans.is_empty() {
                    writer.write_char(' ')?;
                }
                write!(writer, "{}: ", metadata.target())?;
                ctx.field_format().format_fields(writer.by_ref(), event)?;
                if let Some((trace_id, span_id)) = ids {
                    write!(writer, " trace_id={trace_id} span_id={span_id}")?;
                }
                writeln!(writer)
            }
            LogFormat::Json => {
                let mut timestamp = String::new();
                SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
                let mut object = Map::new();
                object.insert("timestamp".into(), Value::String(timestamp));
                object.insert("level".into(), Value::String(metadata.level().to_string()));
                object.insert("target".into(), Value::String(metadata.target().to_owned()));
                let mut fields = JsonFields(Map::new());
                event.record(&mut fields);
                if let Some(message) = fields.0.remove("message") {
                    object.insert("message".into(), message);
                }
                if !fields.0.is_empty() {
                    object.insert("fields".into(), Value::Object(fields.0));
                }
                if !spans.is_empty() {
                    object.insert(
                        "spans".into(),
                        Value::Array(spans.into_iter().map(Value::String).collect()),
                    );
                }
                if let Some((trace_id, span_id)) = ids {
                    object.insert("trace_id".into(), Value::String(trace_id.to_string()));
                    object.insert("span_id".into(), Value::String(span_id.to_string()));
                }
                let line = serde_json::to_string(&Value::Object(object)).map_err(|_| fmt::Error)?;
                writeln!(writer, "{line}")
            }
        }
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(value.to_string()));
        self.0.insert(field.name().to_owned(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    /// Runs `f` under a scoped subscriber with the tracing-opentelemetry layer and
    /// the formatter; returns the log lines.
    fn capture(format: LogFormat, provider: &SdkTracerProvider, f: impl FnOnce()) -> Vec<String> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(TraceAwareFormat { format })
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, f);
        buffer.lines()
    }

    #[test]
    fn text_lines_without_and_with_an_otel_context() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("handler");
        let mut expected = String::new();
        let lines = capture(LogFormat::Text, &provider, || {
            tracing::info!(target: "app", n = 1, "outside");
            // As the MindBus plugin runs handlers: an OpenTelemetry context is
            // current, no tracing span is.
            tracer.in_span("process agent.writer", |cx| {
                let span = cx.span();
                let span_context = span.span_context();
                expected = format!(
                    " trace_id={} span_id={}",
                    span_context.trace_id(),
                    span_context.span_id()
                );
                tracing::warn!(target: "app", "inside the handler");
            });
        });
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].contains(" INFO app: outside n=1"), "{}", lines[0]);
        assert!(!lines[0].contains("trace_id"), "{}", lines[0]);
        assert!(
            lines[1].contains(" WARN app: inside the handler"),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with(&expected), "{} / {expected}", lines[1]);
    }

    #[test]
    fn tracing_spans_carry_ids_and_join_the_current_trace() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("handler");
        let mut trace_id = String::new();
        let lines = capture(LogFormat::Text, &provider, || {
            tracer.in_span("process", |cx| {
                trace_id = cx.span().span_context().trace_id().to_string();
                let span = tracing::info_span!("llm_call");
                let _entered = span.enter();
                tracing::info!(target: "app", "calling the model");
            });
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains(" llm_call: app: calling the model"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains(&format!(" trace_id={trace_id} span_id=")),
            "{} / {trace_id}",
            lines[0]
        );
    }

    #[test]
    fn json_lines() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("handler");
        let lines = capture(LogFormat::Json, &provider, || {
            tracing::info!(target: "app", count = 3u64, ok = true, ratio = 0.5, who = "writer", "plain");
            tracer.in_span("task", |_| {
                let span = tracing::info_span!("step");
                span.in_scope(|| tracing::error!(target: "app", error = %"boom", "failed"));
            });
        });
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], "app");
        assert_eq!(first["message"], "plain");
        assert_eq!(first["fields"]["count"], 3);
        assert_eq!(first["fields"]["ok"], true);
        assert_eq!(first["fields"]["ratio"], 0.5);
        assert_eq!(first["fields"]["who"], "writer");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(first.get("trace_id").is_none());
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["level"], "ERROR");
        assert_eq!(second["spans"], serde_json::json!(["step"]));
        assert_eq!(second["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(second["span_id"].as_str().unwrap().len(), 16);
        assert_eq!(second["fields"]["error"], "boom");
    }

    #[test]
    fn internal_targets_are_not_exported() {
        for internal in [
            "opentelemetry",
            "opentelemetry_sdk",
            "opentelemetry_otlp::exporter",
            "hyper_util::client",
            "h2::codec",
            "tonic::transport",
            "tower::buffer",
            "mindbus_telemetry",
        ] {
            assert!(!exportable_target(internal), "{internal}");
        }
        for app in [
            "orchestrator",
            "mindbus_otel",
            "hyperion",
            "towers",
            "app::h2o",
        ] {
            assert!(exportable_target(app), "{app}");
        }
    }
}
