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
use opentelemetry::Context;
use opentelemetry::trace::{TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use std::hint::black_box;
use std::sync::Arc;

#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(black_box(batch));
        Ok(())
    }
}

fn provider(sampled: bool) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_sampler(if sampled {
            Sampler::AlwaysOn
        } else {
            Sampler::AlwaysOff
        })
        .with_batch_exporter(Discard)
        .build()
}

const COMMAND: &[u8] = br#"{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01","time":"2026-11-27T12:00:00Z","datacontenttype":"application/json","subject":"task-article-555","data":{"action":"generate_article","params":{"topic":"AI trends","length":2000},"context":{"process_id":"blog-001","step":"draft"},"timeout_seconds":300}}"#;

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

fn bench(c: &mut Criterion) {
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let sampled = provider(true);
    let unsampled = provider(false);
    let chains = chains(&sampled, &unsampled);
    let bodies: [(&str, Vec<u8>); 2] = [("cloudevent", COMMAND.to_vec()), ("non_json", non_json())];

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
    envelope.finish();

    let mut publish = c.benchmark_group("publish");
    for (body_name, body) in &bodies {
        for (name, chain) in &chains {
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

    // Deliveries as a traced producer sends them: W3C headers + body.
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )),
    );
    let props = command_props().with_headers(headers);
    let mut consume = c.benchmark_group("consume");
    for (body_name, body) in &bodies {
        let mut delivery = Delivery::mock(
            1,
            "mindbus.main".into(),
            "cmd.writer.any".into(),
            false,
            body.clone(),
        );
        delivery.properties = props.clone();
        for (name, chain) in &chains {
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
    drop(task_cx);
    let _ = sampled.shutdown();
    let _ = unsampled.shutdown();
}

criterion_group!(benches, bench);

/// `MINDBUS_PROFILE=publish|consume/<chain>/<body> [MINDBUS_PROFILE_N=100000]`
/// (or `envelope/read/<body>` for the envelope read alone)
/// runs one case in a plain loop, for `valgrind --tool=callgrind` (whose
/// instruction counts do not depend on what else the machine is doing).
fn profile(case: &str) {
    let n: usize = std::env::var("MINDBUS_PROFILE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let parts: Vec<&str> = case.split('/').collect();
    let [side, chain_name, body_name] = parts[..] else {
        panic!("MINDBUS_PROFILE=side/chain/body, e.g. consume/full_sampled/cloudevent");
    };
    let body = if body_name == "cloudevent" {
        COMMAND.to_vec()
    } else {
        non_json()
    };
    if side == "envelope" {
        for _ in 0..n {
            black_box(Envelope::read("cmd.writer.any", black_box(&body)));
        }
        return;
    }
    let _ = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder();
    let sampled = provider(true);
    let unsampled = provider(false);
    let chains = chains(&sampled, &unsampled);
    let (_, chain) = chains
        .iter()
        .find(|(n, _)| *n == chain_name)
        .expect("chain name");
    if side == "publish" {
        let task = sampled.tracer("bench").start("execute_task");
        let _guard = Context::new().with_span(task).attach();
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
            body,
        );
        delivery.properties = command_props().with_headers(headers);
        for _ in 0..n {
            let mut state = chain.start_delivery(&delivery, "agent.writer", false);
            chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
            black_box(state);
        }
    }
    let _ = sampled.shutdown();
    let _ = unsampled.shutdown();
}

fn main() {
    if let Ok(case) = std::env::var("MINDBUS_PROFILE") {
        profile(&case);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
