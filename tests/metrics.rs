//! Metrics from real MindBus traffic, read back from a real Prometheus
//! exposition: exact counters, histogram counts, gauges back to 0, and
//! label folding past the cap. One test in this binary: the recorder is
//! global and the values are exact.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use mindbus_otel::lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::{BasicProperties, Channel, ExchangeKind};
use mindbus_otel::{AgentMetrics, TaskMetrics, TraceContext, TracedChannel};
use std::collections::BTreeMap;
use std::time::Duration;

fn install() -> PrometheusHandle {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("ai_team_quality_score".into()),
            &[0.0, 2.0, 4.0, 6.0, 8.0, 10.0],
        )
        .unwrap()
        .set_buckets(&[0.001, 0.01, 0.1, 1.0, 10.0])
        .unwrap()
        .install_recorder()
        .unwrap()
}

/// The samples of an exposition: (name, sorted labels) -> value.
fn parse(text: &str) -> BTreeMap<(String, Vec<(String, String)>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut ls: Vec<(String, String)> = Vec::new();
        // Label values here never contain '",' so a simple split is enough.
        for part in labels.split("\",") {
            if part.is_empty() {
                continue;
            }
            let (k, v) = part.split_once("=\"").unwrap();
            ls.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
        }
        ls.sort();
        out.insert((name.to_owned(), ls), value.parse::<f64>().unwrap());
    }
    out
}

struct Scrape(BTreeMap<(String, Vec<(String, String)>), f64>, String);

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut ls: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ls.sort();
        *self
            .0
            .get(&(name.to_owned(), ls.clone()))
            .unwrap_or_else(|| panic!("no sample {name}{ls:?} in\n{}", self.1))
    }

    /// Sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|((n, ls), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| *v)
            .sum()
    }
}

fn command(id: &str, action: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"{id}",
            "subject":"task-1","data":{{"action":"{action}","params":{{}}}}}}"#
    )
    .into_bytes()
}

async fn publish(
    ch: &TracedChannel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn raw_publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_from_real_traffic() {
    let prom = install();
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let exchange = unique("metrics.bus");
    declare_exchange(&raw, &exchange, ExchangeKind::Topic).await;
    let writer_q = unique("metrics.writer");
    let replies_q = unique("metrics.replies");
    let events_q = unique("metrics.events");
    declare_queue(&raw, &writer_q, FieldTable::default()).await;
    declare_queue(&raw, &replies_q, FieldTable::default()).await;
    declare_queue(&raw, &events_q, FieldTable::default()).await;
    bind(&raw, &writer_q, &exchange, "cmd.writer.*").await;
    bind(&raw, &events_q, &exchange, "evt.#").await;

    let task_metrics = TaskMetrics::new();
    let orchestrator = TracedChannel::builder(conn.create_channel().await.unwrap())
        .agent("orchestrator-core")
        .with(TraceContext::default())
        .with(AgentMetrics::default())
        .with(task_metrics.clone())
        .build();
    let writer = TracedChannel::builder(conn.create_channel().await.unwrap())
        .agent("agent.writer.001")
        .with(TraceContext::default())
        .with(AgentMetrics::default())
        .build();
    writer
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();

    // The writer answers COMMANDs: RESULT for generate_article, ERROR for
    // review_article; a body it cannot read is an error (dead-lettered).
    let w = writer.clone();
    let writer_handle = writer
        .consume_with(writer_q.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default(), move |d| {
            let w = w.clone();
            async move {
                let v: serde_json::Value = serde_json::from_slice(&d.data).map_err(|e| e.to_string())?;
                let reply_to = d.properties.reply_to().clone().unwrap();
                let corr = d.properties.correlation_id().clone().unwrap();
                let body = if v["data"]["action"] == "generate_article" {
                    r#"{"specversion":"1.0","type":"ai.team.result","source":"agent.writer.001","id":"r1",
                        "data":{"status":"SUCCESS","output":{"quality_score":8.5},"execution_time_ms":1500,
                        "metrics":{"model":"gpt-4","tokens_used":3500,"estimated_cost_usd":0.105,"latency_ms":1200}}}"#
                } else {
                    r#"{"specversion":"1.0","type":"ai.team.error","source":"agent.writer.001","id":"e1",
                        "data":{"error":{"code":"DEADLINE_EXCEEDED","message":"slow","retryable":true}}}"#
                };
                w.basic_publish("".into(), reply_to, BasicPublishOptions::default(), body.as_bytes(),
                        BasicProperties::default().with_correlation_id(corr))
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let events_handle = consume_acking(&writer, events_q.as_str()).await;
    let replies_handle = consume_acking(&orchestrator, replies_q.as_str()).await;

    for (id, action) in [("c1", "generate_article"), ("c2", "review_article")] {
        let props = BasicProperties::default()
            .with_reply_to(replies_q.as_str().into())
            .with_correlation_id(id.into())
            .with_message_id(id.into())
            .with_expiration("60000".into());
        publish(
            &orchestrator,
            &exchange,
            "cmd.writer.any",
            &command(id, action),
            props,
        )
        .await;
    }
    let event =
        br#"{"specversion":"1.0","type":"ai.team.event","source":"orchestrator-core","id":"ev1",
        "subject":"task-1","data":{"event_type":"task.completed","event_data":{"task_id":"task-1"}}}"#;
    publish(
        &orchestrator,
        &exchange,
        "evt.task.completed",
        event,
        BasicProperties::default(),
    )
    .await;
    // Hostile: not JSON, from a raw client.
    raw_publish(&raw, &exchange, "cmd.writer.any", b"\xff\xfe not json").await;

    assert!(
        eventually(Duration::from_secs(15), || {
            writer_handle.stats().acked() + writer_handle.stats().nacked() == 3
                && replies_handle.stats().acked() == 2
                && events_handle.stats().acked() == 1
        })
        .await
    );
    // No pause: once `acked()` counts a message, its settle hooks have run.
    assert_eq!(task_metrics.pending(), 0);

    let text = prom.render();
    let s = Scrape(parse(&text), text.clone());

    // AI_TEAM task metrics: one task (subject task-1, two COMMANDs, ended
    // by its EVENT), and the per-COMMAND view.
    let tasks = |status: &str| s.get("ai_team_tasks_total", &[("status", status)]);
    assert_eq!(tasks("pending"), 1.0);
    assert_eq!(tasks("completed"), 1.0);
    assert_eq!((tasks("failed"), tasks("expired")), (0.0, 0.0));
    assert_eq!(s.get("ai_team_tasks_in_progress", &[]), 0.0);
    assert_eq!(
        s.get(
            "ai_team_task_duration_seconds_count",
            &[("task_type", "unknown")]
        ),
        1.0
    );
    let commands = |status: &str| s.get("ai_team_commands_total", &[("status", status)]);
    assert_eq!(commands("pending"), 2.0);
    assert_eq!((commands("completed"), commands("failed")), (1.0, 1.0));
    assert_eq!(commands("expired"), 0.0);
    assert_eq!(s.get("ai_team_commands_in_progress", &[]), 0.0);
    for action in ["generate_article", "review_article"] {
        assert_eq!(
            s.get(
                "ai_team_command_duration_seconds_count",
                &[("action", action)]
            ),
            1.0
        );
    }
    let llm = [("model", "gpt-4"), ("agent", "agent.writer.001")];
    assert_eq!(s.get("ai_team_llm_calls_total", &llm), 1.0);
    assert_eq!(s.get("ai_team_llm_tokens_total", &llm), 3500.0);
    assert!((s.get("ai_team_llm_cost_dollars_total", &[("model", "gpt-4")]) - 0.105).abs() < 1e-9);
    assert_eq!(
        s.get("ai_team_llm_latency_seconds_count", &[("model", "gpt-4")]),
        1.0
    );
    assert!((s.get("ai_team_llm_latency_seconds_sum", &[("model", "gpt-4")]) - 1.2).abs() < 1e-9);
    assert_eq!(
        s.get("ai_team_quality_score_count", &[("agent", "unknown")]),
        1.0
    );
    assert_eq!(
        s.get(
            "ai_team_quality_score_bucket",
            &[("agent", "unknown"), ("le", "8")]
        ),
        0.0
    );
    assert_eq!(
        s.get(
            "ai_team_quality_score_bucket",
            &[("agent", "unknown"), ("le", "10")]
        ),
        1.0
    );
    assert_eq!(
        s.get(
            "ai_team_agent_errors_total",
            &[("agent", "agent.writer.001"), ("code", "DEADLINE_EXCEEDED")]
        ),
        1.0
    );

    // Per-agent messages: `agent` is always the counting process's agent,
    // `peer` the other side (the addressed role, the COMMAND's sender for a
    // reply, the CloudEvents source of what is received).
    let m = "mindbus_messages_total";
    let count = |agent: &str, peer: &str, kind: &str, direction: &str, outcome: &str| {
        let labels = [
            ("agent", agent),
            ("peer", peer),
            ("kind", kind),
            ("direction", direction),
            ("outcome", outcome),
        ];
        s.get(m, &labels)
    };
    let (orch, writer_id) = ("orchestrator-core", "agent.writer.001");
    assert_eq!(count(orch, "writer", "command", "sent", "ok"), 2.0);
    assert_eq!(count(orch, "unknown", "event", "sent", "ok"), 1.0);
    assert_eq!(count(orch, writer_id, "result", "received", "acked"), 1.0);
    assert_eq!(count(orch, writer_id, "error", "received", "acked"), 1.0);
    // The writer's settlements of COMMANDs are the writer's, not the sender's.
    assert_eq!(count(writer_id, orch, "command", "received", "acked"), 2.0);
    assert_eq!(
        count(writer_id, "unknown", "command", "received", "nacked"),
        1.0
    );
    assert_eq!(count(writer_id, orch, "event", "received", "acked"), 1.0);
    assert_eq!(count(writer_id, orch, "result", "sent", "ok"), 1.0);
    assert_eq!(count(writer_id, orch, "error", "sent", "ok"), 1.0);
    assert_eq!(s.sum(m, &[("agent", orch)]), 5.0);
    assert_eq!(s.sum(m, &[("agent", writer_id)]), 6.0);
    assert_eq!(s.sum(m, &[]), 11.0, "every message counted once per side");
    assert_eq!(
        s.get(
            "mindbus_messages_in_flight",
            &[("agent", "agent.writer.001")]
        ),
        0.0
    );
    assert_eq!(
        s.get(
            "mindbus_messages_in_flight",
            &[("agent", "orchestrator-core")]
        ),
        0.0
    );
    assert_eq!(
        s.get(
            "mindbus_processing_duration_seconds_count",
            &[("agent", "agent.writer.001"), ("kind", "command")]
        ),
        3.0
    );

    // OpenTelemetry messaging metrics: destinations by their template,
    // routing keys cut to `type.topic.*`; the name only where it is the
    // template (a named queue on the default exchange).
    let (to_writers, to_events) = (
        format!("{exchange}:cmd.writer.*"),
        format!("{exchange}:evt.task.*"),
    );
    let sent_to = |template| {
        [
            ("messaging_system", "rabbitmq"),
            ("messaging_operation_name", "publish"),
            ("messaging_operation_type", "send"),
            ("messaging_destination_template", template),
        ]
    };
    let commands = sent_to(to_writers.as_str());
    assert_eq!(
        s.get("messaging_client_sent_messages_total", &commands),
        2.0
    );
    assert_eq!(
        s.get(
            "messaging_client_operation_duration_seconds_count",
            &commands
        ),
        2.0
    );
    let events = sent_to(to_events.as_str());
    assert_eq!(s.get("messaging_client_sent_messages_total", &events), 1.0);
    let replies = [
        ("messaging_system", "rabbitmq"),
        ("messaging_operation_name", "publish"),
        ("messaging_operation_type", "send"),
        ("messaging_destination_template", replies_q.as_str()),
        ("messaging_destination_name", replies_q.as_str()),
    ];
    assert_eq!(s.get("messaging_client_sent_messages_total", &replies), 2.0);
    let from_writers = format!("{to_writers}:{writer_q}");
    let consumed = [
        ("messaging_system", "rabbitmq"),
        ("messaging_operation_name", "process"),
        ("messaging_operation_type", "process"),
        ("messaging_destination_template", from_writers.as_str()),
    ];
    assert_eq!(
        s.get("messaging_client_consumed_messages_total", &consumed),
        3.0
    );
    assert_eq!(
        s.get("messaging_process_duration_seconds_count", &consumed),
        2.0
    );
    let mut failed = consumed.to_vec();
    failed.push(("error_type", "handler_error"));
    assert_eq!(
        s.get("messaging_process_duration_seconds_count", &failed),
        1.0
    );
    // The writer's settle calls: two acks, one nack (the handler error).
    for (operation, n) in [("ack", 2.0), ("nack", 1.0)] {
        let settled = [
            ("messaging_system", "rabbitmq"),
            ("messaging_operation_name", operation),
            ("messaging_operation_type", "settle"),
            ("messaging_destination_template", from_writers.as_str()),
        ];
        assert_eq!(
            s.get(
                "messaging_client_operation_duration_seconds_count",
                &settled
            ),
            n,
            "{operation}"
        );
    }
    assert_eq!(s.sum("mindbus_otel_rejected_contexts_total", &[]), 0.0);

    // Folding: a channel whose metrics admit 2 peers sees 4 senders.
    let fold_q = unique("metrics.fold");
    declare_queue(&raw, &fold_q, FieldTable::default()).await;
    let folded = AgentMetrics::with_max_label_values(2);
    let fold_ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(folded.clone())
        .build();
    let fold_handle = consume_acking(&fold_ch, fold_q.as_str()).await;
    for source in ["fold.a", "fold.b", "fold.c", "fold.d", "fold.c"] {
        let body = format!(
            r#"{{"specversion":"1.0","type":"ai.team.event","source":"{source}","id":"x"}}"#
        );
        raw_publish(&raw, "", &fold_q, body.as_bytes()).await;
    }
    assert!(eventually(Duration::from_secs(10), || fold_handle.stats().acked() == 5).await);
    let text = prom.render();
    let s = Scrape(parse(&text), text.clone());
    let ev = |peer| {
        [
            ("agent", "unknown"),
            ("peer", peer),
            ("kind", "event"),
            ("direction", "received"),
            ("outcome", "acked"),
        ]
    };
    // The first two senders are admitted, the rest fold into "other"; the
    // own agent (none set: "unknown") has a guard of its own.
    assert_eq!(s.get(m, &ev("fold.a")), 1.0);
    assert_eq!(s.get(m, &ev("fold.b")), 1.0);
    assert_eq!(s.get(m, &ev("other")), 3.0);
    assert_eq!(folded.peers().folded(), 3);
    assert_eq!(folded.agents().folded(), 0);
    assert!(s.get("mindbus_otel_label_overflow_total", &[("label", "peer")]) >= 3.0);

    for h in [writer_handle, events_handle, replies_handle, fold_handle] {
        h.cancel().await.unwrap();
    }
    for q in [&writer_q, &replies_q, &events_q, &fold_q] {
        delete_queue(&raw, q).await;
    }
    delete_exchange(&raw, &exchange).await;
    close(&conn).await;
}
