//! [`LlmCall`]: one LLM call as the OpenTelemetry GenAI semantic
//! conventions describe it (v1.41.1, `docs/gen-ai/gen-ai-spans.md` and
//! `gen-ai-metrics.md`), so agent authors never hand-type the attributes.
//!
//! ```
//! use mindbus_otel::genai::LlmCall;
//! # fn ask() -> Result<(u64, u64), String> { Ok((1200, 2300)) }
//! let mut call = LlmCall::chat("openai", "gpt-4");
//! match ask() {
//!     Ok((input, output)) => {
//!         call.usage(input, output).finish_reasons(&["stop"]);
//!     }
//!     Err(_) => {
//!         call.fail("timeout");
//!     }
//! }
//! // Ends here (or when dropped).
//! call.end();
//! ```
//!
//! **The span.** Kind CLIENT, named `{gen_ai.operation.name}
//! {gen_ai.request.model}` (`chat gpt-4`), a child of the current context
//! (inside a MindBus handler: the CONSUMER span of the COMMAND), with the
//! required `gen_ai.operation.name` and `gen_ai.provider.name`, and
//! `gen_ai.request.model`; `gen_ai.usage.input_tokens` /
//! `.output_tokens`, `gen_ai.response.model`, `gen_ai.response.finish_reasons`
//! when given; a failure sets `error.type` and the error status.
//!
//! **The metrics** (through the [`metrics`] facade, recorded when the call
//! ends), with the labels `gen_ai_operation_name`, `gen_ai_provider_name`,
//! `gen_ai_request_model` (capped: [`crate::labels`]):
//!
//! | name | type | more labels | the conventions' |
//! |---|---|---|---|
//! | `gen_ai_client_token_usage` | histogram, tokens | `gen_ai_token_type` = `input` / `output` | `gen_ai.client.token.usage` (`{token}`) |
//! | `gen_ai_client_operation_duration_seconds` | histogram, seconds | `error_type` on failure | `gen_ai.client.operation.duration` (`s`) |
//!
//! `mindbus-telemetry` gives them the conventions' advisory buckets
//! (`mindbus_telemetry::histogram_buckets`).
//!
//! **Content.** Prompts and completions are never recorded unless the
//! process opts in with [`capture_content`] (with a byte cap); then
//! [`LlmCall::messages`] records `gen_ai.input.messages` and
//! `gen_ai.output.messages`, each cut to the cap.

use crate::labels::{DEFAULT_MAX_LABEL_VALUES, LabelGuard};
use metrics::Label;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, global};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// `gen_ai_client_token_usage` (the facade's name of `gen_ai.client.token.usage`).
pub const TOKEN_USAGE: &str = "gen_ai_client_token_usage";
/// `gen_ai_client_operation_duration_seconds` (`gen_ai.client.operation.duration`).
pub const OPERATION_DURATION: &str = "gen_ai_client_operation_duration_seconds";

/// The instrumentation scope of the spans.
const SCOPE: &str = "mindbus-otel.genai";

static CONTENT_CAP: AtomicUsize = AtomicUsize::new(0);

/// Opts the process in to recording prompts and completions
/// ([`LlmCall::messages`]), each cut to `max_bytes`; `0` turns it off (the
/// default: they may hold private data).
pub fn capture_content(max_bytes: usize) {
    CONTENT_CAP.store(max_bytes, Ordering::Relaxed);
}

/// The capped label values: models, providers, error types.
type Guards = (LabelGuard, LabelGuard, LabelGuard);

fn guards() -> &'static Guards {
    static GUARDS: OnceLock<Guards> = OnceLock::new();
    GUARDS.get_or_init(|| {
        metrics::describe_histogram!(
            TOKEN_USAGE,
            "Tokens used by GenAI calls, by token type (gen_ai.client.token.usage)"
        );
        metrics::describe_histogram!(
            OPERATION_DURATION,
            metrics::Unit::Seconds,
            "GenAI call duration (gen_ai.client.operation.duration)"
        );
        (
            LabelGuard::new("gen_ai_request_model", DEFAULT_MAX_LABEL_VALUES),
            LabelGuard::new("gen_ai_provider_name", DEFAULT_MAX_LABEL_VALUES),
            LabelGuard::new("error_type", DEFAULT_MAX_LABEL_VALUES),
        )
    })
}

/// One LLM call: a CLIENT span and the GenAI metrics. See the
/// [module docs](self).
#[must_use = "an LlmCall ends (and records its metrics) when dropped"]
pub struct LlmCall {
    cx: Context,
    started: Instant,
    operation: &'static str,
    provider: String,
    model: String,
    usage: Option<(u64, u64)>,
    error: Option<String>,
    ended: bool,
}

impl std::fmt::Debug for LlmCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmCall")
            .field("operation", &self.operation)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("usage", &self.usage)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl LlmCall {
    /// A `chat` call to `model` of `provider` (a well-known
    /// `gen_ai.provider.name` such as `openai`, `anthropic`,
    /// `gcp.vertex_ai`), through the global tracer provider.
    pub fn chat(provider: &str, model: &str) -> LlmCall {
        LlmCall::start("chat", provider, model, &global::tracer_provider())
    }

    /// A call of `operation` (`chat`, `text_completion`, `embeddings`,
    /// `generate_content`...) through `tracer_provider` (e.g. one provider
    /// per agent, each with its own `service.name`).
    pub fn start<P>(
        operation: &'static str,
        provider: &str,
        model: &str,
        tracer_provider: &P,
    ) -> LlmCall
    where
        P: opentelemetry::trace::TracerProvider,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        let tracer = tracer_provider.tracer(SCOPE);
        let span = tracer
            .span_builder(format!("{operation} {model}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.provider.name", provider.to_owned()),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
            ])
            .start_with_context(&tracer, &Context::current());
        LlmCall {
            cx: Context::current_with_span(span),
            started: Instant::now(),
            operation,
            provider: provider.to_owned(),
            model: model.to_owned(),
            usage: None,
            error: None,
            ended: false,
        }
    }

    /// The call's context (its span current): attach it, or pass it to
    /// what the call does, to nest spans under the call.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Tokens used: `gen_ai.usage.input_tokens` / `.output_tokens`, and
    /// the token-usage histogram.
    pub fn usage(&mut self, input_tokens: u64, output_tokens: u64) -> &mut Self {
        self.usage = Some((input_tokens, output_tokens));
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "gen_ai.usage.input_tokens",
            i64::try_from(input_tokens).unwrap_or(i64::MAX),
        ));
        span.set_attribute(KeyValue::new(
            "gen_ai.usage.output_tokens",
            i64::try_from(output_tokens).unwrap_or(i64::MAX),
        ));
        self
    }

    /// The model that answered: `gen_ai.response.model`.
    pub fn response_model(&mut self, model: &str) -> &mut Self {
        self.cx
            .span()
            .set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
        self
    }

    /// Why generation stopped, per choice: `gen_ai.response.finish_reasons`.
    pub fn finish_reasons(&mut self, reasons: &[&str]) -> &mut Self {
        let values: Vec<opentelemetry::StringValue> =
            reasons.iter().map(|r| (*r).to_owned().into()).collect();
        self.cx.span().set_attribute(KeyValue::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(values.into()),
        ));
        self
    }

    /// The prompt and the completion, recorded only when the process opted
    /// in with [`capture_content`], each cut to its cap.
    pub fn messages(&mut self, input: &str, output: &str) -> &mut Self {
        let cap = CONTENT_CAP.load(Ordering::Relaxed);
        if cap > 0 {
            let span = self.cx.span();
            let cut = |s: &str| crate::labels::truncate_at(s, cap).to_owned();
            span.set_attribute(KeyValue::new("gen_ai.input.messages", cut(input)));
            span.set_attribute(KeyValue::new("gen_ai.output.messages", cut(output)));
        }
        self
    }

    /// The call failed: `error.type` (the provider's or client's error
    /// code, e.g. `timeout`, `rate_limit_exceeded`, `429`) and the error
    /// status.
    pub fn fail(&mut self, error_type: &str) -> &mut Self {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", error_type.to_owned()));
        span.set_status(Status::error(error_type.to_owned()));
        self.error = Some(error_type.to_owned());
        self
    }

    /// Ends the span and records the metrics (also done on drop).
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let took = self.started.elapsed().as_secs_f64();
        self.cx.span().end();
        let (models, providers, errors) = guards();
        let model = models.label(&self.model);
        let provider = providers.label(&self.provider);
        let base = [
            Label::new("gen_ai_operation_name", self.operation),
            Label::new("gen_ai_provider_name", provider),
            Label::new("gen_ai_request_model", model),
        ];
        if let Some((input, output)) = self.usage {
            for (kind, n) in [("input", input), ("output", output)] {
                let mut labels = base.to_vec();
                labels.push(Label::new("gen_ai_token_type", kind));
                metrics::histogram!(TOKEN_USAGE, labels).record(n as f64);
            }
        }
        let mut labels = base.to_vec();
        if let Some(error) = &self.error {
            labels.push(Label::new("error_type", errors.label(error)));
        }
        metrics::histogram!(OPERATION_DURATION, labels).record(took);
    }
}

impl Drop for LlmCall {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::attribute_tests::collecting;
    use opentelemetry::trace::{SpanKind, TracerProvider as _};
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData};
    use std::sync::Mutex;

    /// Serialises the tests that depend on [`capture_content`]'s global.
    static CONTENT: Mutex<()> = Mutex::new(());

    fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    /// Runs `f` with a span collector and a Prometheus recorder; the spans
    /// and the rendering.
    fn capture(f: impl FnOnce(&SdkTracerProvider)) -> (Vec<SpanData>, String) {
        let (provider, collect) = collecting();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || f(&provider));
        let spans = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
        (spans, handle.render())
    }

    /// gen-ai-spans.md, "Inference": name `{operation} {model}`, kind
    /// CLIENT, required operation and provider, request model, usage,
    /// response model and finish reasons; a child of the current context.
    #[test]
    fn a_chat_call_is_a_client_span_with_the_required_attributes() {
        let _content = CONTENT.lock();
        let (spans, text) = capture(|provider| {
            let parent = provider.tracer("agent").start("process agent.writer");
            let cx = Context::current_with_span(parent);
            let _in_handler = cx.clone().attach();
            let mut call = LlmCall::start("chat", "openai", "gpt-4", provider);
            call.usage(1200, 2300)
                .response_model("gpt-4-0613")
                .finish_reasons(&["stop"])
                .messages("the prompt", "the answer");
            call.end();
            cx.span().end();
        });
        let call = spans.iter().find(|s| s.name == "chat gpt-4");
        let Some(call) = call else {
            panic!("no `chat gpt-4` span: {spans:?}");
        };
        let parent = spans.iter().find(|s| s.name == "process agent.writer");
        assert_eq!(
            Some(call.parent_span_id),
            parent.map(|p| p.span_context.span_id())
        );
        assert_eq!(call.span_kind, SpanKind::Client);
        let s = |v: &str| Some(opentelemetry::Value::from(v.to_owned()));
        assert_eq!(
            attr(call, "gen_ai.operation.name").cloned(),
            Some("chat".into())
        );
        assert_eq!(attr(call, "gen_ai.provider.name").cloned(), s("openai"));
        assert_eq!(attr(call, "gen_ai.request.model").cloned(), s("gpt-4"));
        assert_eq!(
            attr(call, "gen_ai.response.model").cloned(),
            s("gpt-4-0613")
        );
        assert_eq!(
            attr(call, "gen_ai.usage.input_tokens").cloned(),
            Some(1200_i64.into())
        );
        assert_eq!(
            attr(call, "gen_ai.usage.output_tokens").cloned(),
            Some(2300_i64.into())
        );
        assert!(attr(call, "gen_ai.response.finish_reasons").is_some());
        assert!(
            attr(call, "gen_ai.system").is_none(),
            "deprecated since v1.37"
        );
        assert!(attr(call, "error.type").is_none());
        // Content is not recorded unless opted in.
        assert!(attr(call, "gen_ai.input.messages").is_none());
        // gen-ai-metrics.md: token usage by token type, duration.
        let usage = r#"gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4",gen_ai_token_type="input"} 1"#;
        assert!(text.contains(usage), "{text}");
        let sum = r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4",gen_ai_token_type="output"} 2300"#;
        assert!(text.contains(sum), "{text}");
        let duration = r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4"} 1"#;
        assert!(text.contains(duration), "{text}");
    }

    /// A failed call: `error.type` and the error status on the span, and
    /// `error_type` on the duration; dropped without `end`, it still ends.
    #[test]
    fn a_failed_call_has_its_error_type_and_ends_when_dropped() {
        let (spans, text) = capture(|provider| {
            let mut call = LlmCall::start("chat", "openai", "gpt-4o-mini", provider);
            call.fail("timeout");
        });
        let call = spans.iter().find(|s| s.name == "chat gpt-4o-mini");
        let Some(call) = call else {
            panic!("the dropped call did not end: {spans:?}");
        };
        assert_eq!(
            attr(call, "error.type").cloned(),
            Some(opentelemetry::Value::from("timeout".to_owned()))
        );
        assert!(matches!(
            call.status,
            opentelemetry::trace::Status::Error { .. }
        ));
        let duration = r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini",error_type="timeout"} 1"#;
        assert!(text.contains(duration), "{text}");
        assert!(
            !text.contains("gen_ai_client_token_usage"),
            "no usage given: {text}"
        );
    }

    /// Prompts and completions only when the process opted in, cut to the
    /// cap.
    #[test]
    fn content_is_recorded_only_when_opted_in_and_capped() {
        let _content = CONTENT.lock();
        capture_content(5);
        let (spans, _) = capture(|provider| {
            let mut call = LlmCall::start("chat", "openai", "gpt-4", provider);
            call.messages("the prompt", "the answer");
        });
        capture_content(0);
        let call = spans.iter().find(|s| s.name == "chat gpt-4");
        let Some(call) = call else {
            panic!("{spans:?}");
        };
        let s = |v: &str| Some(opentelemetry::Value::from(v.to_owned()));
        assert_eq!(attr(call, "gen_ai.input.messages").cloned(), s("the p"));
        assert_eq!(attr(call, "gen_ai.output.messages").cloned(), s("the a"));
    }
}
