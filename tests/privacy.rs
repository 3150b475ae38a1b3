//! Privacy: a secret planted in message payloads (a plain field, the
//! CloudEvents `data.params`, an ERROR's free-text message, a RESULT's
//! output), in non-trace headers (`x-api-key`, a nested table) and in a
//! malformed `traceparent` never shows up in what the plugin emits: every
//! exported span (names, attributes, events, links, status, trace state,
//! resource), the whole Prometheus exposition, and every log event. The
//! opt-in `MessagingSpans::record_payload` does record it (so the search is
//! not vacuous).
//!
//! By design some message metadata IS recorded and must not hold secrets:
//! the routing key (`messaging.rabbitmq.destination.routing_key`), exchange
//! and queue names, `message_id` and `correlation_id`, the CloudEvents `id`,
//! `source`, `type` and `subject`, `data.action` and `data.error.code`, the
//! model name of `data.metrics` (a metrics label), the text of a handler's
//! `Err` or panic (`exception.message`), and W3C `tracestate` / `baggage`
//! (propagated as they are). The secret is put in none of those here.
//!
//! Also checked: the telemetry crate's metrics listener binds 127.0.0.1 by
//! default. (`docker-compose.yml` has no default credentials:
//! `tests/deploy.rs`, `compose_has_no_default_credentials`.)
//!
//! Its own test binary: it installs the global metrics recorder, tracer
//! provider and `tracing` subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/otel.rs"]
mod otel;

use common::*;
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable};
use mindbus_otel::lapin::{BasicProperties, Channel};
use mindbus_otel::{AgentMetrics, MessagingSpans, TaskMetrics, TraceContext, TracedChannel};
use mindbus_otel_testkit::{AttrValue, OtlpReceiver, ReceivedSpan};
use otel::{Proto, flush, provider, shutdown};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt as _};

/// Every `tracing` event, rendered with all its fields.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<String>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Logs {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: LayerContext<'_, S>) {
        let mut line = format!(
            "{} {}:",
            event.metadata().level(),
            event.metadata().target()
        );
        event.record(&mut Fields(&mut line));
        let mut all = self.0.lock().unwrap();
        all.push_str(&line);
        all.push('\n');
    }
}

/// Everything a span carries, as text (bytes decoded lossily).
fn render_value(v: &AttrValue, out: &mut String) {
    match v {
        AttrValue::Str(s) => out.push_str(s),
        AttrValue::Bytes(b) => out.push_str(&String::from_utf8_lossy(b)),
        AttrValue::Array(items) => items.iter().for_each(|i| {
            render_value(i, out);
            out.push(' ');
        }),
        AttrValue::KvList(kvs) => kvs.iter().for_each(|(k, v)| {
            out.push_str(k);
            out.push('=');
            render_value(v, out);
            out.push(' ');
        }),
        other => {
            let _ = write!(out, "{other:?}");
        }
    }
}

fn render_attrs(attrs: &[(String, AttrValue)], out: &mut String) {
    for (k, v) in attrs {
        out.push_str(k);
        out.push('=');
        render_value(v, out);
        out.push('\n');
    }
}

fn render_span(s: &ReceivedSpan) -> String {
    let mut out = format!(
        "{} {:?} scope={} {} status={:?} {} trace_state={}\n",
        s.name,
        s.kind,
        s.scope_name,
        s.scope_version,
        s.status.code,
        s.status.message,
        s.trace_state
    );
    render_attrs(&s.attributes, &mut out);
    render_attrs(&s.resource, &mut out);
    for e in &s.events {
        out.push_str(&e.name);
        out.push('\n');
        render_attrs(&e.attributes, &mut out);
    }
    for l in &s.links {
        let _ = writeln!(out, "link {} {}", l.trace_id, l.span_id);
        render_attrs(&l.attributes, &mut out);
    }
    // And the Debug form, for anything not listed above.
    let _ = writeln!(out, "{s:?}");
    out
}

fn chain(ch: Channel, agent: &str, spans: MessagingSpans) -> TracedChannel {
    TracedChannel::builder(ch)
        .agent(agent)
        .with(TraceContext::default())
        .with(spans)
        .with(AgentMetrics::default())
        .with(TaskMetrics::default())
        .build()
}

fn secret_headers(secret: &str) -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("token".into(), long(secret));
    let mut h = FieldTable::default();
    h.insert("x-api-key".into(), long(secret));
    h.insert("x-auth".into(), AMQPValue::FieldTable(nested));
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_secret_appears_in_no_span_metric_or_log() {
    let secret = format!("sk-SECRET-{:016x}{:016x}", random_u64(), random_u64());
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    let logs = Logs::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(logs.clone()))
        .unwrap();
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("privacy", &rx, Proto::Grpc);
    // The default chain takes spans from the global provider.
    mindbus_otel::opentelemetry::global::set_tracer_provider(p.clone());

    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let commands = declare_queue(&raw, &unique("privacy.cmd"), FieldTable::default()).await;
    let replies = declare_queue(&raw, &unique("privacy.replies"), FieldTable::default()).await;
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let orchestrator = chain(pub_ch, "orchestrator", MessagingSpans::default());
    let agent = chain(
        conn.create_channel().await.unwrap(),
        "agent.writer.001",
        MessagingSpans::default(),
    );

    // The agent (handler style) answers each COMMAND with a RESULT whose
    // output holds the secret, then an ERROR whose message holds it; the
    // third COMMAND makes the handler panic (with a text of its own).
    let (a, s) = (agent.clone(), secret.clone());
    let handle = agent
        .consume_with(
            commands.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let (a, s) = (a.clone(), s.clone());
                async move {
                    let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                    let n = body["data"]["params"]["n"].as_u64().unwrap();
                    if n == 2 {
                        panic!("the writer gave up on task {n}");
                    }
                    let reply = if n == 0 {
                        serde_json::json!({"specversion": "1.0", "type": "ai.team.result",
                            "source": "agent.writer.001", "id": "r-0", "subject": "task-1",
                            "data": {"status": "SUCCESS", "output": {"article": format!("key {s}")},
                                     "metrics": {"model": "gpt-4o", "tokens_used": 10, "cost_usd": 0.01, "latency_ms": 100}}})
                    } else {
                        serde_json::json!({"specversion": "1.0", "type": "ai.team.error",
                            "source": "agent.writer.001", "id": "e-1", "subject": "task-1",
                            "data": {"error": {"code": "PERMISSION_DENIED", "message": format!("bad key {s}")}}})
                    };
                    a.basic_publish(
                        "".into(),
                        d.properties.reply_to().clone().unwrap(),
                        BasicPublishOptions::default(),
                        &serde_json::to_vec(&reply).unwrap(),
                        BasicProperties::default()
                            .with_correlation_id(d.properties.correlation_id().clone().unwrap())
                            .with_headers(secret_headers(&s)),
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();

    // The orchestrator sends three COMMANDs carrying the secret.
    for n in 0..3u64 {
        let body = serde_json::json!({"specversion": "1.0", "type": "ai.team.command",
            "source": "orchestrator", "id": format!("c-{n}"), "subject": "task-1",
            "data": {"action": "generate_article", "params": {"n": n, "api_key": secret},
                     "input": {"text": format!("please use {secret}")}}});
        let mut headers = secret_headers(&secret);
        // A malformed trace context made of the secret: rejected, counted,
        // never recorded.
        headers.insert("traceparent".into(), long(secret.as_str()));
        let conf = orchestrator
            .basic_publish(
                "".into(),
                commands.clone(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap(),
                BasicProperties::default()
                    .with_correlation_id(format!("corr-{n}").into())
                    .with_message_id(format!("c-{n}").into())
                    .with_reply_to(replies.clone())
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(conf.is_ack());
    }
    // An EVENT through the standard chain, `TracedChannel::new`.
    let events = TracedChannel::new(conn.create_channel().await.unwrap());
    events
        .basic_publish(
            "".into(),
            replies.clone(),
            BasicPublishOptions::default(),
            format!(r#"{{"specversion":"1.0","type":"ai.team.event","source":"orchestrator","id":"ev","data":{{"note":"{secret}"}}}}"#).as_bytes(),
            BasicProperties::default().with_headers(secret_headers(&secret)),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The orchestrator reads the replies and the event (stream style).
    let mut consumer = consume_stream(&orchestrator, replies.as_str()).await;
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("hang guard: replies")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Settled, not just delivered: the counters are final only then.
    assert!(
        eventually(Duration::from_secs(10), || {
            let st = handle.stats();
            st.delivered() == 3 && st.acked() + st.nacked() + st.settle_errors() == 3
        })
        .await
    );
    assert_eq!(handle.stats().acked(), 2);
    assert_eq!(handle.stats().panics(), 1);
    handle.cancel().await.unwrap();

    flush(&[&p]).await;
    // 3 COMMANDs + 2 replies + 1 EVENT published, 3 + 3 consumed.
    let spans = rx.wait_for_spans(12, Duration::from_secs(10)).await;
    spans.assert_len(12);
    let everything: String = spans.iter().map(render_span).collect();
    // Not vacuous: the spans did read the messages.
    for expected in [
        "c-0",
        "corr-1",
        "generate_article",
        "PERMISSION_DENIED",
        "panic",
    ] {
        assert!(
            everything.contains(expected),
            "{expected} missing from the spans"
        );
    }
    assert!(
        !everything.contains(&secret),
        "the secret leaked into a span:\n{}",
        everything
            .lines()
            .filter(|l| l.contains(&secret))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let exposition = prometheus.render();
    assert!(exposition.contains("mindbus_messages_total"));
    assert!(exposition.contains("ai_team_tasks_total"));
    assert!(
        !exposition.contains(&secret),
        "the secret leaked into the metrics:\n{exposition}"
    );

    let logged = logs.0.lock().unwrap().clone();
    assert!(
        logged.contains("the writer gave up on task 2"),
        "the handler's panic was logged:\n{logged}"
    );
    assert!(
        !logged.contains(&secret),
        "the secret leaked into a log event:\n{logged}"
    );

    // The opt-in payload recording does record it.
    let rx2 = OtlpReceiver::start().await.unwrap();
    let p2 = provider("opt-in", &rx2, Proto::Grpc);
    let opt_in = chain(
        conn.create_channel().await.unwrap(),
        "orchestrator",
        MessagingSpans::default()
            .with_tracer_provider(&p2)
            .record_payload(4096),
    );
    opt_in
        .basic_publish(
            "".into(),
            commands.clone(),
            BasicPublishOptions::default(),
            format!(r#"{{"data":{{"params":{{"api_key":"{secret}"}}}}}}"#).as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    flush(&[&p2]).await;
    let recorded = rx2.wait_for_spans(1, Duration::from_secs(10)).await;
    recorded.assert_len(1);
    let body = recorded.as_slice()[0]
        .attr_str("mindbus.message.body")
        .unwrap_or_default();
    assert!(
        body.contains(&secret),
        "record_payload records the body: {body:?}"
    );

    for q in [&commands, &replies] {
        delete_queue(&raw, q.as_str()).await;
    }
    close(&conn).await;
    shutdown(vec![p, p2]).await;
}

/// The Prometheus listener binds loopback unless told otherwise.
#[test]
fn the_metrics_listener_binds_loopback_by_default() {
    let config = mindbus_telemetry::Config::from_lookup(|_| None);
    let addr = config.metrics_listen_addr().unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    assert_eq!(addr.to_string(), mindbus_telemetry::DEFAULT_METRICS_ADDR);
    // A bare port stays on loopback too.
    let config = mindbus_telemetry::Config::from_lookup(|name| {
        (name == "METRICS_ADDR").then(|| "9100".to_owned())
    });
    assert_eq!(
        config.metrics_listen_addr().unwrap().to_string(),
        "127.0.0.1:9100"
    );
}
