//! The semantic conventions, checked row by row: each row names the
//! convention's document and section (messaging v1.44.0, GenAI v1.41.1)
//! and checks what the plugin exports for the protocol's fixture messages,
//! through the real interceptors, with no broker. Deliberate differences
//! are rows too, checked as the README's "Where we differ" table states
//! them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use mindbus_otel::genai::LlmCall;
use mindbus_otel::{
    AgentMetrics, InterceptorChain, MessagingSpans, Outcome, PublishResult, Settlement,
};
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collect {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// What the plugin exported for: the COMMAND fixture published and
/// processed (acked), an ERROR reply published to and processed from a
/// server-named queue, and one LLM call.
struct Exported {
    spans: Vec<SpanData>,
    metrics: String,
}

fn export() -> Exported {
    let collect = Collect::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collect.clone())
        .build();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let spans = MessagingSpans::default()
            .with_tracer_provider(&provider)
            .server("rabbit.internal", 5672);
        let metrics = AgentMetrics::default().server("rabbit.internal", 5672);
        let agent: Option<Arc<str>> = Some(Arc::from("agent.writer.001"));
        let chain = InterceptorChain::new(vec![Arc::new(spans), Arc::new(metrics)], agent);
        for (name, exchange, routing_key, queue) in [
            ("command", "mindbus.main", "cmd.writer.any", "agent.writer"),
            ("error", "", "amq.gen-reply", "amq.gen-reply"),
        ] {
            let f = fixtures::fixture(name);
            let (_, mut state) = chain.start_publish(
                exchange,
                routing_key,
                BasicPublishOptions::default(),
                &f.body,
                f.properties.clone(),
            );
            chain.end_publish(&mut state, &PublishResult::Sent);
            let mut d = Delivery::mock(
                1,
                exchange.into(),
                routing_key.into(),
                false,
                f.body.clone(),
            );
            d.properties = f.properties.clone();
            let mut state = chain.start_delivery(&d, queue, false);
            chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
        }
        // A pull of the COMMAND (a `basic_get` begun 2 ms before it
        // returned), and one of the then empty queue.
        let f = fixtures::fixture("command");
        let mut d = Delivery::mock(
            2,
            "mindbus.main".into(),
            "cmd.writer.any".into(),
            false,
            f.body.clone(),
        );
        d.properties = f.properties.clone();
        let call = std::time::Instant::now() - std::time::Duration::from_millis(2);
        let mut state = chain.start_pulled_delivery(&d, "agent.writer", call);
        chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
        chain.empty_pull("agent.writer", std::time::Instant::now(), None);

        // With settle spans: the COMMAND delivered from another queue and
        // acked by a call of this process.
        let settling = MessagingSpans::default()
            .with_tracer_provider(&provider)
            .server("rabbit.internal", 5672)
            .settle_spans(true);
        let agent: Option<Arc<str>> = Some(Arc::from("agent.writer.001"));
        let chain = InterceptorChain::new(vec![Arc::new(settling)], agent);
        let mut state = chain.start_delivery(&d, "agent.settle", false);
        let mut acked = Settlement::new(Outcome::Acked);
        acked.call_started = Some(std::time::Instant::now());
        chain.end_delivery(&mut state, &acked);

        let mut call = LlmCall::start("chat", "openai", "gpt-4", &provider);
        call.usage(10, 20);
        call.end();
    });
    let spans = collect.0.lock().unwrap().clone();
    Exported {
        spans,
        metrics: handle.render(),
    }
}

fn span<'a>(e: &'a Exported, name: &str) -> &'a SpanData {
    e.spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name:?}: {:?}", names(e)))
}

fn names(e: &Exported) -> Vec<&str> {
    e.spans.iter().map(|s| s.name.as_ref()).collect()
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn str_attr(s: &SpanData, key: &str) -> Option<String> {
    attr(s, key).map(|v| v.as_str().into_owned())
}

/// The label names of the first sample of `metric` in the exposition
/// (histograms render as summaries here: no buckets are configured).
fn label_names(text: &str, metric: &str) -> Vec<String> {
    label_names_where(text, metric, "")
}

/// The label names of the first sample of `metric` whose line contains
/// `containing` (the exposition's order of series is not fixed).
fn label_names_where(text: &str, metric: &str, containing: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(containing))
        .unwrap_or_else(|| panic!("no {metric} with {containing:?}: {text}"));
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    inner
        .split(',')
        .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
        .filter(|k| k != "le" && k != "quantile")
        .collect()
}

/// Every value of `label` in the exposition.
fn label_values(text: &str, label: &str) -> Vec<String> {
    let key = format!("{label}=\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let from = l.find(&key)? + key.len();
            let len = l[from..].find('"')?;
            Some(l[from..from + len].to_owned())
        })
        .collect()
}

/// The COMMAND's spans, named from the destination template.
const SEND: &str = "publish mindbus.main:cmd.writer.*";
const PROCESS: &str = "process mindbus.main:cmd.writer.*:agent.writer";
const SEND_TEMPLATE: &str = "mindbus.main:cmd.writer.*";
const PROCESS_TEMPLATE: &str = "mindbus.main:cmd.writer.*:agent.writer";

type Check = fn(&Exported) -> Result<(), String>;

fn check(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.into()) }
}

/// (convention, section, what, check).
const TABLE: &[(&str, &str, &str, Check)] = &[
    (
        "messaging/messaging-spans.md",
        "Span kind",
        "publish is PRODUCER, process is CONSUMER",
        |e| {
            check(
                span(e, SEND).span_kind == SpanKind::Producer
                    && span(e, PROCESS).span_kind == SpanKind::Consumer,
                "kinds",
            )
        },
    ),
    (
        "messaging/messaging-spans.md",
        "Span name",
        "`{operation name} {destination}`, the destination from messaging.destination.template; an anonymous destination is left out",
        |e| {
            for name in [SEND, PROCESS, "publish", "process"] {
                span(e, name);
            }
            check(
                !names(e).iter().any(|n| n.contains("amq.gen")),
                format!("{:?}", names(e)),
            )
        },
    ),
    (
        "messaging/rabbitmq.md",
        "Send span (producer): attributes",
        "system rabbitmq, operation name publish and type send, destination, routing key",
        |e| {
            let s = span(e, SEND);
            check(
                str_attr(s, "messaging.system").as_deref() == Some("rabbitmq")
                    && str_attr(s, "messaging.operation.name").as_deref() == Some("publish")
                    && str_attr(s, "messaging.operation.type").as_deref() == Some("send")
                    && str_attr(s, "messaging.rabbitmq.destination.routing_key").as_deref()
                        == Some("cmd.writer.any"),
                format!("{:?}", s.attributes),
            )
        },
    ),
    (
        "messaging/rabbitmq.md",
        "Process span (consumer): attributes",
        "operation process, the delivery tag",
        |e| {
            let s = span(e, PROCESS);
            check(
                str_attr(s, "messaging.operation.type").as_deref() == Some("process")
                    && attr(s, "messaging.rabbitmq.message.delivery_tag").is_some(),
                format!("{:?}", s.attributes),
            )
        },
    ),
    (
        "messaging/rabbitmq.md",
        "messaging.destination.name [1], all four spans",
        "send `{exchange}:{routing key}`, receive `{exchange}:{routing key}:{queue}` (a routing key equal to the queue once); templates low-cardinality, none for a server-named queue",
        |e| {
            for (name, destination, template) in [
                (SEND, "mindbus.main:cmd.writer.any", Some(SEND_TEMPLATE)),
                (
                    PROCESS,
                    "mindbus.main:cmd.writer.any:agent.writer",
                    Some(PROCESS_TEMPLATE),
                ),
                ("publish", "amq.gen-reply", None),
                ("process", "amq.gen-reply", None),
            ] {
                let s = span(e, name);
                check(
                    str_attr(s, "messaging.destination.name").as_deref() == Some(destination)
                        && str_attr(s, "messaging.destination.template").as_deref() == template,
                    format!("{name}: {:?}", s.attributes),
                )?;
            }
            Ok(())
        },
    ),
    (
        "messaging/messaging-spans.md",
        "Messaging attributes: server.address, server.port, messaging.client.id",
        "the broker and the agent, on every messaging span",
        |e| {
            for s in e.spans.iter().filter(|s| s.span_kind != SpanKind::Client) {
                check(
                    str_attr(s, "server.address").as_deref() == Some("rabbit.internal")
                        && attr(s, "server.port") == Some(&Value::I64(5672))
                        && str_attr(s, "messaging.client.id").as_deref()
                            == Some("agent.writer.001"),
                    format!("{}: {:?}", s.name, s.attributes),
                )?;
            }
            Ok(())
        },
    ),
    (
        "messaging/messaging-spans.md",
        "Temporary and anonymous destinations",
        "marked messaging.destination.temporary and .anonymous",
        |e| {
            let s = span(e, "publish");
            check(
                attr(s, "messaging.destination.temporary") == Some(&Value::Bool(true))
                    && attr(s, "messaging.destination.anonymous") == Some(&Value::Bool(true)),
                format!("{:?}", s.attributes),
            )
        },
    ),
    (
        "general/recording-errors.md",
        "error.type only for a failed operation (README: the status differs on purpose)",
        "an ERROR reply sent and processed successfully: no error.type, status Error, the code in mindbus.error.code",
        |e| {
            for name in ["publish", "process"] {
                let s = span(e, name);
                check(
                    attr(s, "error.type").is_none()
                        && matches!(s.status, Status::Error { .. })
                        && str_attr(s, "mindbus.error.code").as_deref()
                            == Some("DEADLINE_EXCEEDED"),
                    format!("{name}: {:?} {:?}", s.status, s.attributes),
                )?;
            }
            Ok(())
        },
    ),
    (
        "messaging/messaging-metrics.md",
        "messaging.client.sent.messages / consumed.messages / operation.duration / process.duration",
        "the four metrics, each with system, operation, destination template and server",
        |e| {
            for metric in [
                "messaging_client_sent_messages_total",
                "messaging_client_consumed_messages_total",
                "messaging_client_operation_duration_seconds",
                "messaging_process_duration_seconds",
            ] {
                // The COMMAND's series (the reply's, to a server-named
                // queue, has no destination label).
                let labels = label_names_where(&e.metrics, metric, "cmd.writer");
                for want in [
                    "messaging_system",
                    "messaging_operation_name",
                    "messaging_destination_template",
                    "server_address",
                    "server_port",
                ] {
                    check(
                        labels.iter().any(|l| l == want),
                        format!("{metric} lacks {want}: {labels:?}"),
                    )?;
                }
            }
            Ok(())
        },
    ),
    (
        "messaging/rabbitmq.md",
        "Receive span; messaging-spans.md: Consumer spans",
        "a pull is a CLIENT `receive` over the call (an empty one too, batch count 0), its processing a CONSUMER `process` child (their links to the producer: tests/spans.rs, with a broker)",
        |e| {
            let receive = span(e, &format!("receive {PROCESS_TEMPLATE}"));
            let empty = span(e, "receive agent.writer");
            let processed: Vec<&SpanData> = e
                .spans
                .iter()
                .filter(|s| s.name == PROCESS && s.parent_span_id == receive.span_context.span_id())
                .collect();
            check(
                receive.span_kind == SpanKind::Client
                    && empty.span_kind == SpanKind::Client
                    && attr(empty, "messaging.batch.message_count") == Some(&Value::I64(0))
                    && attr(receive, "messaging.batch.message_count").is_none()
                    && receive.end_time
                        <= processed.first().map_or(receive.end_time, |p| p.start_time)
                    && processed.len() == 1
                    && processed[0].span_kind == SpanKind::Consumer,
                format!("{receive:?}\n{empty:?}\n{processed:?}"),
            )
        },
    ),
    (
        "messaging/rabbitmq.md",
        "Settle span (opt-in: MessagingSpans::settle_spans, README table)",
        "an ack call is a CLIENT `ack {destination}` span, operation type settle, a child of the process span",
        |e| {
            let settle = span(e, "ack mindbus.main:cmd.writer.*:agent.settle");
            let process = span(e, "process mindbus.main:cmd.writer.*:agent.settle");
            check(
                settle.span_kind == SpanKind::Client
                    && str_attr(settle, "messaging.operation.type").as_deref() == Some("settle")
                    && str_attr(settle, "messaging.operation.name").as_deref() == Some("ack")
                    && str_attr(settle, "messaging.destination.name").as_deref()
                        == Some("mindbus.main:cmd.writer.any:agent.settle")
                    && settle.parent_span_id == process.span_context.span_id(),
                format!("{settle:?}"),
            )
        },
    ),
    (
        "messaging/messaging-metrics.md",
        "messaging.client.operation.duration: send and receive; messaging.process.duration: process",
        "publish and receive (the pull call, also when empty) in the operation duration, process only in the process duration",
        |e| {
            let ops = label_values(
                &e.metrics
                    .lines()
                    .filter(|l| l.starts_with("messaging_client_operation_duration_seconds"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                "messaging_operation_name",
            );
            let processed = label_values(
                &e.metrics
                    .lines()
                    .filter(|l| l.starts_with("messaging_process_duration_seconds"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                "messaging_operation_name",
            );
            check(
                ops.iter().any(|o| o == "publish")
                    && ops.iter().any(|o| o == "receive")
                    && processed.iter().all(|o| o == "process")
                    && !processed.is_empty(),
                format!("{ops:?} {processed:?}"),
            )
        },
    ),
    (
        "messaging/messaging-metrics.md",
        "messaging.destination.name [4] and messaging.destination.template",
        "the template on every metric with a destination; the name only where it is low-cardinality (the empty pull's queue); never a whole routing key or a generated queue",
        |e| {
            let mut templates = label_values(&e.metrics, "messaging_destination_template");
            templates.sort();
            templates.dedup();
            let mut names = label_values(&e.metrics, "messaging_destination_name");
            names.dedup();
            check(
                templates == ["agent.writer", SEND_TEMPLATE, PROCESS_TEMPLATE]
                    && names == ["agent.writer"]
                    && !e.metrics.contains("amq.gen")
                    && !e.metrics.contains("cmd.writer.any"),
                format!("{templates:?} {names:?}"),
            )
        },
    ),
    (
        "gen-ai/gen-ai-spans.md",
        "Inference: span name, kind and required attributes",
        "`chat gpt-4`, CLIENT, gen_ai.operation.name and gen_ai.provider.name, no deprecated gen_ai.system",
        |e| {
            let s = span(e, "chat gpt-4");
            check(
                s.span_kind == SpanKind::Client
                    && str_attr(s, "gen_ai.operation.name").as_deref() == Some("chat")
                    && str_attr(s, "gen_ai.provider.name").as_deref() == Some("openai")
                    && str_attr(s, "gen_ai.request.model").as_deref() == Some("gpt-4")
                    && attr(s, "gen_ai.system").is_none(),
                format!("{:?}", s.attributes),
            )
        },
    ),
    (
        "gen-ai/gen-ai-metrics.md",
        "gen_ai.client.token.usage and gen_ai.client.operation.duration",
        "token usage by gen_ai.token.type; duration; both with operation, provider, model",
        |e| {
            let usage = label_names(&e.metrics, "gen_ai_client_token_usage");
            let duration = label_names(&e.metrics, "gen_ai_client_operation_duration_seconds");
            check(
                usage.iter().any(|l| l == "gen_ai_token_type")
                    && [
                        "gen_ai_operation_name",
                        "gen_ai_provider_name",
                        "gen_ai_request_model",
                    ]
                    .iter()
                    .all(|w| usage.iter().any(|l| l == w) && duration.iter().any(|l| l == w)),
                format!("{usage:?} {duration:?}"),
            )
        },
    ),
];

#[test]
fn the_conventions_row_by_row() {
    let exported = export();
    let mut failed = Vec::new();
    for (doc, section, what, check) in TABLE {
        if let Err(why) = check(&exported) {
            failed.push(format!("{doc} § {section}: {what}: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} rows differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
