//! Per-message cost of each built-in interceptor and of the full default
//! chain, publish side and consume side, without a broker, against an
//! empty chain: `cargo bench -p mindbus-otel --bench chain`.
//!
//! Spans go through a real SDK provider with the stock batch processor and
//! an exporter that discards (AlwaysOn for "sampled", AlwaysOff for
//! "unsampled"); metrics go to a real Prometheus recorder.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{BenchmarkId, Criterion, criterion_group};
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::message::Delivery;
use mindbus_otel::lapin::options::BasicPublishOptions;
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, LongString};
use mindbus_otel::{
    AgentMetrics, Envelope, Interceptor, InterceptorChain, MessagingSpans, Outcome, PublishResult,
    Settlement, TaskMetrics, TraceContext,
};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
struct Discard;

/// Spans the discarding exporter received (the rest of those ended were
/// dropped by the batch processor's full queue).
static EXPORTED: AtomicU64 = AtomicU64::new(0);

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        EXPORTED.fetch_add(batch.len() as u64, Ordering::Relaxed);
        drop(black_box(batch));
        Ok(())
    }
}

/// The stock batch processor (queue of `queue` spans; the SDK default is
/// 2,048) with the discarding exporter.
fn provider(sampled: bool, queue: usize) -> SdkTracerProvider {
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(queue)
        .build();
    SdkTracerProvider::builder()
        .with_sampler(if sampled {
            Sampler::AlwaysOn
        } else {
            Sampler::AlwaysOff
        })
        .with_span_processor(
            BatchSpanProcessor::builder(Discard)
                .with_batch_config(config)
                .build(),
        )
        .build()
}

/// The SDK's default queue size.
const STOCK_QUEUE: usize = 2048;

const COMMAND: &[u8] = br#"{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01","time":"2026-11-27T12:00:00Z","datacontenttype":"application/json","subject":"task-article-555","data":{"action":"generate_article","params":{"topic":"AI trends","length":2000},"context":{"process_id":"blog-001","step":"draft"},"timeout_seconds":300}}"#;

/// A RESULT as a writer agent sends it: the protocol's fixture with a
/// 2,047-word article in `data.output`, the size of a real LLM output, with
/// paragraph breaks and quotes. Only a few short fields of it are read; the
/// article is skipped.
///
/// `english`: 12,958 bytes, its few non-ASCII characters as UTF-8 (as
/// serde_json and most JSON writers put them). Otherwise a Russian article
/// as the reference Python client sends it: `json.dumps` escapes every
/// non-ASCII character (`\u0430`), so the body is 65,925 bytes, mostly
/// escapes.
fn result_article(english: bool) -> Vec<u8> {
    let words: &[&str] = if english {
        &[
            "the",
            "landscape",
            "of",
            "AI",
            "is",
            "changing",
            "fast;",
            "models",
            "now",
            "write",
            "\"draft\"",
            "articles",
            "\u{2014}",
            "and",
            "critics",
            "review",
            "them,",
            "café",
            "agents",
        ]
    } else {
        &[
            "ландшафт",
            "ИИ",
            "быстро",
            "меняется;",
            "модели",
            "теперь",
            "пишут",
            "\"черновики\"",
            "статей",
            "\u{2014}",
            "а",
            "критики",
            "их",
            "проверяют,",
            "агенты",
            "и",
            "люди",
        ]
    };
    let mut article = String::new();
    for i in 0..2047 {
        if i > 0 {
            article.push_str(if i % 120 == 0 { "\n\n" } else { " " });
        }
        article.push_str(words[(i * 7 + i / 13) % words.len()]);
    }
    let json = serde_json::to_string(&serde_json::json!({
        "specversion": "1.0",
        "type": "ai.team.result",
        "source": "agent.writer.001",
        "id": "c2a4d3f0-11aa-4b7e-8d2c-6e5f4a3b2c10",
        "time": "2026-11-27T12:00:12Z",
        "datacontenttype": "application/json",
        "subject": "task-article-555",
        "data": {
            "status": "SUCCESS",
            "output": {"article": article, "word_count": 2047, "quality_score": 8.5},
            "execution_time_ms": 12450,
            "metrics": {"model": "gpt-4", "tokens_used": 3500, "estimated_cost_usd": 0.105}
        }
    }))
    .unwrap();
    if english {
        return json.into_bytes();
    }
    // Python's `ensure_ascii`: every other character as `\uXXXX` (all of
    // these are in the Basic Multilingual Plane).
    let mut escaped = String::with_capacity(json.len() * 3);
    for c in json.chars() {
        if c.is_ascii() {
            escaped.push(c);
        } else {
            escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
        }
    }
    escaped.into_bytes()
}

fn non_json() -> Vec<u8> {
    (0..256u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn command_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(20)
        .with_expiration("300000".into())
        .with_reply_to("orchestrator.results".into())
        .with_correlation_id("5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01".into())
        .with_message_id("5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01".into())
}

/// A delivery as a traced producer sends it: W3C header and `body`.
fn traced_delivery(body: &[u8]) -> Delivery {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )),
    );
    let mut delivery = Delivery::mock(
        1,
        "mindbus.main".into(),
        "cmd.writer.any".into(),
        false,
        body.to_vec(),
    );
    delivery.properties = command_props().with_headers(headers);
    delivery
}

fn chains(
    sampled: &SdkTracerProvider,
    unsampled: &SdkTracerProvider,
) -> Vec<(&'static str, InterceptorChain)> {
    let agent: Option<Arc<str>> = Some(Arc::from("orchestrator-core"));
    let chain = |list: Vec<Arc<dyn Interceptor>>| InterceptorChain::new(list, agent.clone());
    let spans = |p: &SdkTracerProvider| -> Arc<dyn Interceptor> {
        Arc::new(MessagingSpans::default().with_tracer_provider(p))
    };
    vec![
        ("empty", chain(vec![])),
        (
            "trace_context",
            chain(vec![Arc::new(TraceContext::default())]),
        ),
        ("spans_sampled", chain(vec![spans(sampled)])),
        (
            "agent_metrics",
            chain(vec![Arc::new(AgentMetrics::default())]),
        ),
        (
            "task_metrics",
            chain(vec![Arc::new(TaskMetrics::default())]),
        ),
        (
            "full_sampled",
            chain(vec![
                Arc::new(TraceContext::default()),
                spans(sampled),
                Arc::new(AgentMetrics::default()),
                Arc::new(TaskMetrics::default()),
            ]),
        ),
        (
            "full_unsampled",
            chain(vec![
                Arc::new(TraceContext::default()),
                spans(unsampled),
                Arc::new(AgentMetrics::default()),
                Arc::new(TaskMetrics::default()),
            ]),
        ),
    ]
}

/// The floor: what a user writing the instrumentation by hand with the same
/// SDK pays per message (the issue's "hand-written span + inject + counter"):
/// a span with the attributes the AMQP properties give (no body parsing, no
/// MindBus or CloudEvents attributes, no agent or task metrics), the W3C
/// header through the SDK's own propagator, and one counter. Plain
/// injector and extractor over the AMQP headers, tolerating nothing.
struct Headers<'a>(&'a mut FieldTable);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

struct ReadHeaders<'a>(&'a FieldTable);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

fn handwritten_attributes(props: &BasicProperties, body: &[u8], op: &'static str) -> Vec<KeyValue> {
    let text = |v: Option<&mindbus_otel::lapin::types::ShortString>| {
        v.map(|s| s.as_str().to_owned()).unwrap_or_default()
    };
    vec![
        KeyValue::new("messaging.system", "rabbitmq"),
        KeyValue::new("messaging.operation.name", op),
        KeyValue::new("messaging.operation.type", op),
        KeyValue::new("messaging.destination.name", "mindbus.main"),
        KeyValue::new(
            "messaging.rabbitmq.destination.routing_key",
            "cmd.writer.any".to_owned(),
        ),
        KeyValue::new("messaging.message.id", text(props.message_id().as_ref())),
        KeyValue::new(
            "messaging.message.conversation_id",
            text(props.correlation_id().as_ref()),
        ),
        KeyValue::new("messaging.message.body.size", body.len() as i64),
    ]
}

/// Hand-written publish instrumentation; returns the properties to publish.
fn handwritten_publish(tracer: &SdkTracer, body: &[u8]) -> BasicProperties {
    let props = command_props();
    let span = tracer
        .span_builder("publish mindbus.main")
        .with_kind(SpanKind::Producer)
        .with_attributes(handwritten_attributes(&props, body, "publish"))
        .start(tracer);
    let cx = Context::current_with_span(span);
    let mut headers = FieldTable::default();
    TraceContextPropagator::new().inject_context(&cx, &mut Headers(&mut headers));
    metrics::counter!("handwritten_sent_total", "agent" => "orchestrator-core").increment(1);
    cx.span().end();
    props.with_headers(headers)
}

/// Hand-written consume instrumentation, around a handler that does nothing.
fn handwritten_consume(tracer: &SdkTracer, delivery: &Delivery) {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let parent = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    let mut span = tracer
        .span_builder("process mindbus.main")
        .with_kind(SpanKind::Consumer)
        .with_attributes(handwritten_attributes(
            &delivery.properties,
            &delivery.data,
            "process",
        ))
        .start_with_context(tracer, &parent);
    metrics::counter!("handwritten_consumed_total", "agent" => "agent.writer").increment(1);
    span.end();
}

/// Installs the Prometheus recorder with its upkeep running as
/// `mindbus-telemetry` runs it: histogram samples pile up in the recorder
/// until upkeep drains them, so without it every histogram record of a
/// long run lands in fresh memory (page faults charged to the chain), which
/// no application sees. `MINDBUS_BENCH_UPKEEP_MS` sets the period (default
/// the bootstrap's 5 s; 0 = no upkeep, to see the difference).
fn install_recorder() {
    let Ok(handle) = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()
    else {
        return;
    };
    let period: u64 = std::env::var("MINDBUS_BENCH_UPKEEP_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    if period == 0 {
        return;
    }
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(period));
            handle.run_upkeep();
        }
    });
}

fn bench(c: &mut Criterion) {
    install_recorder();
    let sampled = provider(true, STOCK_QUEUE);
    let unsampled = provider(false, STOCK_QUEUE);
    let chains = chains(&sampled, &unsampled);
    let bodies: [(&str, Vec<u8>); 4] = [
        ("cloudevent", COMMAND.to_vec()),
        ("non_json", non_json()),
        ("result_article", result_article(true)),
        ("result_article_ru", result_article(false)),
    ];
    // The long RESULTs only through the empty and the full chains.
    let with_body = |chain: &str, body: &str| {
        !body.starts_with("result_article")
            || matches!(chain, "empty" | "full_sampled" | "full_unsampled")
    };

    // A caller span to publish in, as an orchestrator task would.
    let task = sampled.tracer("bench").start("execute_task");
    let task_cx = Context::new().with_span(task);

    // The envelope read alone: every interceptor that needs the envelope
    // shares one read per message.
    let mut envelope = c.benchmark_group("envelope");
    for (body_name, body) in &bodies {
        envelope.bench_with_input(BenchmarkId::new("read", body_name), body, |b, body| {
            b.iter(|| black_box(Envelope::read("cmd.writer.any", black_box(body))));
        });
    }
    // For scale: what reading the same body with serde_json costs (what
    // hand-written instrumentation would do for CloudEvents attributes).
    envelope.bench_function("serde_json_value/cloudevent", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(COMMAND)).ok()));
    });
    envelope.finish();

    let mut publish = c.benchmark_group("publish");
    for (body_name, body) in &bodies {
        for (name, chain) in chains.iter().filter(|(n, _)| with_body(n, body_name)) {
            publish.bench_with_input(BenchmarkId::new(*name, body_name), body, |b, body| {
                let _guard = task_cx.clone().attach();
                b.iter(|| {
                    let (props, mut state) = chain.start_publish(
                        "mindbus.main",
                        "cmd.writer.any",
                        BasicPublishOptions::default(),
                        body,
                        command_props(),
                    );
                    chain.end_publish(&mut state, &PublishResult::Sent);
                    black_box(props);
                });
            });
        }
    }
    publish.finish();

    let mut consume = c.benchmark_group("consume");
    for (body_name, body) in &bodies {
        let delivery = traced_delivery(body);
        for (name, chain) in chains.iter().filter(|(n, _)| with_body(n, body_name)) {
            consume.bench_function(BenchmarkId::new(*name, body_name), |b| {
                b.iter(|| {
                    let mut state = chain.start_delivery(&delivery, "agent.writer", false);
                    chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
                    black_box(state);
                });
            });
        }
    }
    consume.finish();

    // The floor (see `handwritten_publish`): compare `instrumented` with
    // `raw` (the properties alone), and with the chains' cost over `empty`.
    let tracer = sampled.tracer("handwritten");
    let mut hand = c.benchmark_group("handwritten");
    hand.bench_function("publish/raw", |b| {
        b.iter(|| black_box(command_props()));
    });
    hand.bench_function("publish/instrumented", |b| {
        let _guard = task_cx.clone().attach();
        b.iter(|| black_box(handwritten_publish(&tracer, black_box(COMMAND))));
    });
    let delivery = traced_delivery(COMMAND);
    hand.bench_function("consume/instrumented", |b| {
        b.iter(|| handwritten_consume(&tracer, black_box(&delivery)));
    });
    // The same with sampling off: the floor of the unsampled goal.
    let off = unsampled.tracer("handwritten");
    hand.bench_function("publish_unsampled/instrumented", |b| {
        let _guard = task_cx.clone().attach();
        b.iter(|| black_box(handwritten_publish(&off, black_box(COMMAND))));
    });
    hand.bench_function("consume_unsampled/instrumented", |b| {
        b.iter(|| handwritten_consume(&off, black_box(&delivery)));
    });
    hand.finish();
    drop(task_cx);
    let _ = sampled.shutdown();
    let _ = unsampled.shutdown();
}

criterion_group!(benches, bench);

/// `MINDBUS_PROFILE=publish|consume/<chain>/<body> [MINDBUS_PROFILE_N=100000]`
/// (or `envelope/read/<body>` for the envelope read alone,
/// `envelope/serde_json_value/<body>` for serde_json reading the same body, or
/// `handwritten/publish|consume[_unsampled]/cloudevent` for the hand-written
/// floor)
/// runs one case in a plain loop, for `valgrind --tool=callgrind` (whose
/// instruction counts do not depend on what else the machine is doing);
/// `MINDBUS_PROFILE_THREADS=T` runs it on T threads at once.
fn profile(case: &str) {
    let n: usize = std::env::var("MINDBUS_PROFILE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let parts: Vec<&str> = case.split('/').collect();
    let [side, chain_name, body_name] = parts[..] else {
        panic!("MINDBUS_PROFILE=side/chain/body, e.g. consume/full_sampled/cloudevent");
    };
    let body = match body_name {
        "cloudevent" => COMMAND.to_vec(),
        "result_article" => result_article(true),
        "result_article_ru" => result_article(false),
        _ => non_json(),
    };
    if side == "envelope" {
        for _ in 0..n {
            if chain_name == "serde_json_value" {
                black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).ok());
            } else {
                black_box(Envelope::read("cmd.writer.any", black_box(&body)));
            }
        }
        return;
    }
    install_recorder();
    // Room for every span: under valgrind the batch thread barely runs, and
    // with the stock queue most spans would be dropped on this thread
    // instead of queued, which is not what is being profiled.
    let threads: usize = std::env::var("MINDBUS_PROFILE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let sampled = provider(true, STOCK_QUEUE.max(n * threads.max(1) + 1024));
    let unsampled = provider(false, STOCK_QUEUE);
    if side == "handwritten" {
        let tracer = if chain_name.ends_with("_unsampled") {
            unsampled.tracer("handwritten")
        } else {
            sampled.tracer("handwritten")
        };
        let task = sampled.tracer("bench").start("execute_task");
        let _guard = Context::new().with_span(task).attach();
        let delivery = traced_delivery(&body);
        for _ in 0..n {
            match chain_name {
                "publish" | "publish_unsampled" => {
                    black_box(handwritten_publish(&tracer, &body));
                }
                _ => handwritten_consume(&tracer, black_box(&delivery)),
            }
        }
        let _ = sampled.shutdown();
        eprintln!(
            "{n} iterations; the discarding exporter received {} spans",
            EXPORTED.load(Ordering::Relaxed)
        );
        return;
    }
    let chains = chains(&sampled, &unsampled);
    let (_, chain) = chains
        .iter()
        .find(|(n, _)| *n == chain_name)
        .expect("chain name");
    let task = sampled.tracer("bench").start("execute_task");
    let task_cx = Context::new().with_span(task);
    let delivery = traced_delivery(&body);
    let run = || {
        if side == "publish" {
            let _guard = task_cx.clone().attach();
            for _ in 0..n {
                let (props, mut state) = chain.start_publish(
                    "mindbus.main",
                    "cmd.writer.any",
                    BasicPublishOptions::default(),
                    &body,
                    command_props(),
                );
                chain.end_publish(&mut state, &PublishResult::Sent);
                black_box(props);
            }
        } else {
            for _ in 0..n {
                let mut state = chain.start_delivery(&delivery, "agent.writer", false);
                chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
                black_box(state);
            }
        }
    };
    // MINDBUS_PROFILE_THREADS=T runs the loop on T threads at once through
    // the one chain, as the channels of a multi-threaded runtime share it,
    // and prints the wall time per message: what the chain's shared state
    // (caches, tables, metric handles) costs when threads contend for it.
    let started = std::time::Instant::now();
    if threads <= 1 {
        run();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(run);
            }
        });
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{threads} thread(s) x {n} messages in {:.3} s: {:.0} ns per message per thread",
        elapsed.as_secs_f64(),
        elapsed.as_nanos() as f64 / n as f64
    );
    let _ = sampled.shutdown();
    let _ = unsampled.shutdown();
    eprintln!(
        "{n} iterations; the discarding exporter received {} spans (a sampled chain ends one per iteration, plus the caller's on publish)",
        EXPORTED.load(Ordering::Relaxed)
    );
}

fn main() {
    if let Ok(case) = std::env::var("MINDBUS_PROFILE") {
        profile(&case);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
