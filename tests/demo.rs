//! The AI_TEAM demo as a user runs it: the real example binary, against the
//! real broker, exporting by OTLP into the testkit receiver.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/dashboards.rs"]
mod dashboards;
#[path = "../examples/support/management.rs"]
mod management;
#[path = "common/tools.rs"]
mod tools;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::{BasicProperties, Connection, ConnectionProperties};
use mindbus_otel_testkit::{OtlpReceiver, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// `target/<profile>/examples/ai_team`, built by `cargo test` (which builds
/// the examples) next to this test's own binary.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("ai_team");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --example ai_team` (plain `cargo test` builds it)",
        bin.display()
    );
    bin
}

/// The port of the demo's `metrics are served on http://127.0.0.1:PORT/metrics` line.
fn served_port(line: &str) -> Option<u16> {
    let rest = line.split("http://127.0.0.1:").nth(1)?;
    rest.split('/').next()?.parse().ok()
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The HTTP status of `GET path`, `None` when nothing answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// Metric series names in a Prometheus exposition.
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Waits until someone consumes `queue` (the demo's role has started).
async fn wait_consuming(conn: &Connection, queue: &str) {
    wait_queue(conn, queue, "nobody started consuming", |q| {
        q.consumer_count() > 0
    })
    .await;
}

/// Waits until `queue` exists and `ready` holds for it; panics with `what`
/// after 15 s.
async fn wait_queue(
    conn: &Connection,
    queue: &str,
    what: &str,
    ready: impl Fn(&mindbus_otel::lapin::Queue) -> bool,
) {
    for _ in 0..300 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        // A passive declare of a missing queue closes the channel: one each.
        let probe = conn.create_channel().await.unwrap();
        if let Ok(q) = probe
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            && ready(&q)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} {queue}");
}

/// Environment isolating one demo run: its own exchange and queues.
fn isolated(cmd: &mut Command, prefix: &str, exchange: &str) {
    cmd.env("MINDBUS_URL", url())
        .env("MINDBUS_EXCHANGE", exchange)
        .env("MINDBUS_QUEUE_PREFIX", prefix)
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
}

/// Deletes what the demo declared (durable, as MindBus requires, so nothing
/// expires on its own), when the test ends or, if it fails midway, when
/// the guard is dropped during the unwinding.
struct Cleanup {
    prefix: String,
    exchange: String,
    done: bool,
}

impl Cleanup {
    fn new(prefix: &str, exchange: &str) -> Cleanup {
        Cleanup {
            prefix: prefix.to_owned(),
            exchange: exchange.to_owned(),
            done: false,
        }
    }

    async fn delete(prefix: &str, exchange: &str) {
        // Best effort: a failing test must not panic again here.
        let Ok(conn) = connect_bounded(&url(), ConnectionProperties::default()).await else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            for q in ["agent.writer", "agent.critic", "mindbus.dead-letters"] {
                delete_queue(&ch, &format!("{prefix}{q}")).await;
            }
            delete_exchange(&ch, exchange).await;
            delete_exchange(&ch, &format!("{prefix}mindbus.dlx")).await;
        }
        close(&conn).await;
        if let Ok(api) = management::Management::for_broker(&url()) {
            let _ = api
                .delete_policy(&format!("{prefix}mindbus-dead-letters"))
                .await;
        }
    }

    async fn run(mut self) {
        self.done = true;
        Cleanup::delete(&self.prefix, &self.exchange).await;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The test's runtime may be unwinding: clean up on a thread of our own.
        let (prefix, exchange) = (self.prefix.clone(), self.exchange.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        Cleanup::delete(&prefix, &exchange),
                    )
                    .await;
                });
            }
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_three_tasks_one_trace_each_and_dashboards_match_its_metrics() {
    let rx = OtlpReceiver::start().await.unwrap();
    let prefix = format!("{}.", unique("demo"));
    let exchange = unique("demo.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "3", "--linger", "3"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.grpc_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        // Port 0: the demo binds a free port and prints it.
        .env("METRICS_ADDR", "127.0.0.1:0");
    isolated(&mut cmd, &prefix, &exchange);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let mut scrape = None;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("metrics are served on") {
                // The tasks are done and the process lingers: scrape now.
                let port = served_port(&line).expect("the metrics line names a port");
                scrape = Some(http_get(port, "/metrics").await);
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("demo finished in time");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "demo exit status {status}\n{stdout}");

    // Its stdout: each task's tree, the failure, the metrics summary.
    assert_eq!(
        stdout.matches("execute_task (orchestrator)").count(),
        3,
        "{stdout}"
    );
    assert!(stdout.contains("task 1: completed"), "{stdout}");
    assert!(stdout.contains("task 3: failed as planned"), "{stdout}");
    // The writer's LLM call, a GenAI CLIENT span under its CONSUMER span.
    assert!(stdout.contains("      chat gpt-4 (writer)"), "{stdout}");
    // Three tasks (two completed, one failed), five COMMANDs.
    for line in [
        "ai_team_tasks_total{status=\"pending\"} 3",
        "ai_team_tasks_total{status=\"completed\"} 2",
        "ai_team_tasks_total{status=\"failed\"} 1",
        "ai_team_commands_total{status=\"pending\"} 5",
        "ai_team_commands_total{status=\"completed\"} 4",
        "ai_team_commands_total{status=\"failed\"} 1",
    ] {
        assert!(stdout.contains(line), "{line}\n{stdout}");
    }

    // OTLP: one trace per task.
    let spans = rx
        .wait_until(Duration::from_secs(15), |s| {
            s.find_all("execute_task").len() == 3 && s.trace_ids().len() == 3 && s.len() >= 3 * 8
        })
        .await;
    let roots = spans.find_all("execute_task");
    assert_eq!(roots.len(), 3, "{}", spans.render_all());
    assert_eq!(
        spans.trace_ids().len(),
        3,
        "one trace per task:\n{}",
        spans.render_all()
    );
    let mut failed = 0;
    for root in roots {
        let trace = spans.trace(root.trace_id);
        let services: BTreeSet<String> = trace
            .iter()
            .filter_map(|s| s.service_name.clone())
            .collect();
        if root.status.code == StatusCode::Error {
            failed += 1;
            assert_eq!(
                services,
                ["orchestrator", "writer"].map(String::from).into(),
                "{}",
                trace.render_all()
            );
            let err = trace.one_where(
                |s| {
                    s.attr_str("mindbus.error.code") == Some("DEADLINE_EXCEEDED")
                        && s.service_name.as_deref() == Some("writer")
                },
                "the writer's ERROR reply",
            );
            assert_eq!(err.status.code, StatusCode::Error);
        } else {
            assert_eq!(
                services,
                ["critic", "orchestrator", "writer"]
                    .map(String::from)
                    .into(),
                "{}",
                trace.render_all()
            );
        }
    }
    assert_eq!(failed, 1);

    // Dashboards reference only what the demo exposes.
    let exposition = scrape.expect("scraped /metrics while the demo lingered");
    let exposed = exposed_names(&exposition);
    assert!(exposed.contains("ai_team_tasks_total"), "{exposition}");
    // The critic's scores count for the writer whose article it reviewed.
    assert!(
        exposition.contains("ai_team_quality_score_count{agent=\"agent.writer.001\"} 2"),
        "{exposition}"
    );
    let wanted = dashboards::metric_names_in_dashboards();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exposed.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "dashboards use metrics the demo does not expose: {missing:?}\nexposed: {exposed:?}"
    );
    cleanup.run().await;
}

/// The demo's writer alone, answering `max_messages` COMMANDs on its own
/// names, exporting to `rx` over gRPC, without a metrics listener.
fn spawn_writer(
    rx: &OtlpReceiver,
    prefix: &str,
    exchange: &str,
    max_messages: u32,
) -> tokio::process::Child {
    let mut cmd = Command::new(demo_binary());
    cmd.args([
        "--role",
        "writer",
        "--max-messages",
        &max_messages.to_string(),
    ])
    .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.grpc_endpoint())
    .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    .env("METRICS_ADDR", "off");
    isolated(&mut cmd, prefix, exchange);
    cmd.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_role_answers_two_commands_including_a_python_style_one() {
    let rx = OtlpReceiver::start().await.unwrap();
    let prefix = format!("{}.", unique("role"));
    let exchange = unique("role.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut child = spawn_writer(&rx, &prefix, &exchange, 2);

    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    wait_consuming(&conn, &format!("{prefix}agent.writer")).await;
    let replies = reply_queue(&ch).await;

    let header_sc = span_context();
    let body_sc = span_context();
    for (i, sc) in [(1, &header_sc), (2, &body_sc)] {
        let mut ev = json!({
            "specversion": "1.0", "type": "ai.team.command", "source": "test-orchestrator",
            "id": format!("cmd-{i}"), "subject": format!("task-{i}"),
            "data": {"action": "generate_article", "params": {"topic": "tests"}},
        });
        let tp = format!("00-{}-{}-01", sc.trace_id(), sc.span_id());
        let mut props = BasicProperties::default()
            .with_reply_to(replies.clone())
            .with_correlation_id(format!("cmd-{i}").into())
            .with_content_type("application/json".into());
        if i == 1 {
            let mut h = FieldTable::default();
            h.insert("traceparent".into(), long(tp));
            props = props.with_headers(h);
        } else {
            // As existing Python agents send it: only in the CloudEvent.
            ev["traceparent"] = json!(tp);
        }
        ch.basic_publish(
            exchange.as_str().into(),
            "cmd.writer.any".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&ev).unwrap(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut consumer = ch
        .basic_consume(
            replies.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut answered = BTreeSet::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(v["type"], "ai.team.result", "{v}");
        assert_eq!(v["source"], "agent.writer.001");
        answered.insert(d.properties.correlation_id().clone().unwrap().to_string());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(answered, ["cmd-1", "cmd-2"].map(String::from).into());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the writer exits after 2 messages")
        .unwrap();
    assert!(status.success(), "{status}");

    let spans = rx
        .wait_until(Duration::from_secs(10), |s| {
            s.by_kind(opentelemetry::trace::SpanKind::Consumer).len() >= 2
        })
        .await;
    for sc in [&header_sc, &body_sc] {
        let process = spans.one_where(
            |s| s.kind == opentelemetry::trace::SpanKind::Consumer && s.trace_id == sc.trace_id(),
            "the writer's CONSUMER span in the producer's trace",
        );
        assert_eq!(process.parent_span_id, Some(sc.span_id()));
        assert_eq!(process.service_name.as_deref(), Some("writer"));
    }
    close(&conn).await;
    cleanup.run().await;
}

/// An orchestrator written against pika (the reference Python client's
/// AMQP library, run from `tests/peers/pika_orchestrator.py`) sends the
/// demo's writer a COMMAND with the trace context only in the CloudEvents
/// body: the writer's spans join the Python side's trace, and the RESULT
/// that pika receives carries W3C `traceparent` headers in that trace, the
/// RESULT's PRODUCER span as parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_orchestrator_and_the_writer_form_one_trace() {
    let python = tools::tool("python-pika");
    let rx = OtlpReceiver::start().await.unwrap();
    let prefix = format!("{}.", unique("pika"));
    let exchange = unique("pika.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut child = spawn_writer(&rx, &prefix, &exchange, 1);
    let conn = connect().await;
    let writer_q = format!("{prefix}agent.writer");
    wait_consuming(&conn, &writer_q).await;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/pika_orchestrator.py");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(&python)
            .arg(&script)
            .args([url().as_str(), exchange.as_str(), "cmd.writer.any"])
            .output(),
    )
    .await
    .expect("the pika orchestrator finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pika orchestrator: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Value = serde_json::from_str(stdout.trim()).unwrap();
    let traceparent = sent["traceparent"].as_str().unwrap();
    let (trace_id, span_id) = (&traceparent[3..35], &traceparent[36..52]);
    let reply = &sent["reply"];
    assert_eq!(reply["type"], "ai.team.result", "{sent}");
    assert_eq!(reply["correlation_id"], sent["command_id"], "{sent}");
    let reply_tp = reply["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the RESULT has a traceparent header: {sent}"));
    assert_eq!(
        &reply_tp[3..35],
        trace_id,
        "the RESULT is in the pika trace"
    );

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the writer exits after 1 message")
        .unwrap();
    assert!(status.success(), "{status}");
    let spans = rx
        .wait_until(Duration::from_secs(10), |s| {
            !s.by_kind(opentelemetry::trace::SpanKind::Producer)
                .is_empty()
        })
        .await;
    let process = spans.one(&format!("process {exchange}:cmd.writer.*:{writer_q}"));
    assert_eq!(
        process.trace_id.to_string(),
        trace_id,
        "\n{}",
        spans.render_all()
    );
    assert_eq!(
        process.parent_span_id.map(|s| s.to_string()).as_deref(),
        Some(span_id),
        "the writer's processing is a child of the pika orchestrator's span"
    );
    let result = spans.one_where(
        |s| s.kind == opentelemetry::trace::SpanKind::Producer && s.name == "publish",
        "the RESULT to pika's server-named reply queue",
    );
    assert!(
        spans.is_parent_of(process, result),
        "\n{}",
        spans.render_all()
    );
    assert_eq!(
        &reply_tp[36..52],
        result.span_id.to_string(),
        "pika receives the RESULT's PRODUCER span as its parent"
    );
    assert_eq!(
        result.attr_str("messaging.destination.name"),
        sent["reply_queue"].as_str()
    );
    close(&conn).await;
    cleanup.run().await;
}

/// An agent queue as the reference Python client declares it: durable,
/// `x-max-priority: 255` encoded as pika encodes a Python int (`I`), nothing
/// else.
async fn declare_as_reference_client(ch: &mindbus_otel::lapin::Channel, queue: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        mindbus_otel::lapin::types::AMQPValue::LongInt(255),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args)
        .await
        .unwrap_or_else(|e| panic!("the reference declaration of {queue}: {e}"));
}

/// A COMMAND to the writer role, replied to on `reply_to`: a CloudEvent
/// with these params, or (`None`) a body the writer cannot read, which it
/// answers with INVALID_ARGUMENT and nacks.
async fn command_writer(
    ch: &mindbus_otel::lapin::Channel,
    exchange: &str,
    reply_to: &str,
    id: &str,
    params: Option<Value>,
) {
    let body = match params {
        Some(params) => serde_json::to_vec(&json!({
            "specversion": "1.0", "type": "ai.team.command", "source": "test-orchestrator",
            "id": id, "subject": format!("task-{id}"),
            "data": {"action": "generate_article", "params": params},
        }))
        .unwrap(),
        None => b"not a CloudEvent".to_vec(),
    };
    let props = BasicProperties::default()
        .with_reply_to(reply_to.into())
        .with_correlation_id(id.into())
        .with_priority(20)
        .with_content_type("application/json".into());
    ch.basic_publish(
        exchange.into(),
        "cmd.writer.any".into(),
        BasicPublishOptions::default(),
        &body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Agents written against the reference client and our writer share one
/// queue per role, whoever declares it first; a nacked COMMAND reaches the
/// dead-letter queue through the policy the demo sets, not through queue
/// arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_and_demo_share_a_role_queue_in_either_order() {
    for reference_first in [true, false] {
        let prefix = format!("{}.", unique("shared"));
        let exchange = unique("shared.bus");
        let cleanup = Cleanup::new(&prefix, &exchange);
        let writer_q = format!("{prefix}agent.writer");
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        if reference_first {
            declare_as_reference_client(&ch, &writer_q).await;
        }
        let mut cmd = Command::new(demo_binary());
        cmd.args(["--role", "writer", "--max-messages", "2"])
            .env("METRICS_ADDR", "off");
        isolated(&mut cmd, &prefix, &exchange);
        cmd.stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        wait_consuming(&conn, &writer_q).await;
        if !reference_first {
            declare_as_reference_client(&ch, &writer_q).await;
        }

        let replies = reply_queue(&ch).await;
        let reply_to = replies.as_str();
        command_writer(
            &ch,
            &exchange,
            reply_to,
            "ok-1",
            Some(json!({"topic": "t"})),
        )
        .await;
        command_writer(&ch, &exchange, reply_to, "unreadable-2", None).await;

        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the writer exits after 2 messages")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", out.status);
        assert!(!stderr.contains("no dead-letter policy"), "{stderr}");
        assert_eq!(
            message_count(&ch, reply_to).await,
            2,
            "a RESULT and an ERROR"
        );

        // The nacked COMMAND, dead-lettered by the policy alone.
        let dead_letters = format!("{prefix}mindbus.dead-letters");
        let mut dead = 0;
        for _ in 0..100 {
            dead = message_count(&ch, &dead_letters).await;
            if dead > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dead, 1, "reference first: {reference_first}");
        let api = management::Management::for_broker(&url()).unwrap();
        assert!(
            api.has_policy(&format!("{prefix}mindbus-dead-letters"))
                .await
                .unwrap()
        );
        close(&conn).await;
        cleanup.run().await;
    }
}

/// A role queue that exists with other arguments than the protocol's (here
/// the dead-letter argument older versions of the demo set) stops the demo
/// with one line naming the argument, not a stack of lapin errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_otherwise_is_one_line_naming_the_argument() {
    let prefix = format!("{}.", unique("inequivalent"));
    let exchange = unique("inequivalent.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        mindbus_otel::lapin::types::AMQPValue::LongInt(255),
    );
    args.insert("x-dead-letter-exchange".into(), long("elsewhere"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        format!("{prefix}agent.writer").as_str().into(),
        durable,
        args,
    )
    .await
    .unwrap();

    let stderr = refused_start("writer", &prefix, &exchange).await;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    // lapin logs the broker's closing of the channel itself (one line, at
    // ERROR); everything else is the demo's one line.
    let (ours, lapin): (Vec<&str>, Vec<&str>) = lines.iter().partition(|l| !l.contains(" lapin::"));
    assert!(lapin.len() <= 1, "{stderr}");
    assert_eq!(ours.len(), 1, "{stderr}");
    assert!(
        ours[0].starts_with(&format!(
            "ai_team: queue {prefix}agent.writer exists with other"
        )) && ours[0].contains("'x-dead-letter-exchange'"),
        "{stderr}"
    );
    // A refused start leaves nothing behind: only the queue that was there.
    assert_eq!(
        left_behind(&conn, &prefix, &exchange).await,
        [format!("queue {prefix}agent.writer")],
        "{stderr}"
    );
    close(&conn).await;
    cleanup.run().await;
}

/// Starts `role`, which must refuse to start (exit code 1); its stderr.
async fn refused_start(role: &str, prefix: &str, exchange: &str) -> String {
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--role", role, "--max-messages", "1"])
        .env("METRICS_ADDR", "off");
    isolated(&mut cmd, prefix, exchange);
    cmd.stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the demo stops at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// The demo's exchanges, queues and dead-letter policy that exist now.
async fn left_behind(conn: &Connection, prefix: &str, exchange: &str) -> Vec<String> {
    let mut found = Vec::new();
    for q in ["agent.writer", "agent.critic", "mindbus.dead-letters"] {
        let name = format!("{prefix}{q}");
        let probe = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if probe
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
            .is_ok()
        {
            found.push(format!("queue {name}"));
        }
    }
    for name in [exchange.to_owned(), format!("{prefix}mindbus.dlx")] {
        let probe = conn.create_channel().await.unwrap();
        let passive = mindbus_otel::lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        if probe
            .exchange_declare(
                name.as_str().into(),
                mindbus_otel::lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok()
        {
            found.push(format!("exchange {name}"));
        }
    }
    let api = management::Management::for_broker(&url()).unwrap();
    if api
        .queue_policy(&format!("{prefix}agent.writer"))
        .await
        .ok()
        .flatten()
        .is_some()
    {
        found.push("policy".to_owned());
    }
    found
}

/// An exchange of the topology declared otherwise (the bus as `direct`):
/// one line naming it, and nothing else created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_declared_otherwise_stops_the_start_with_nothing_created() {
    let prefix = format!("{}.", unique("inequivalent-x"));
    let exchange = unique("inequivalent-x.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        mindbus_otel::lapin::ExchangeKind::Direct,
        mindbus_otel::lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let stderr = refused_start("orchestrator", &prefix, &exchange).await;
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(" lapin::"))
        .collect();
    assert_eq!(ours.len(), 1, "{stderr}");
    assert!(
        ours[0].starts_with(&format!("ai_team: exchange {exchange} exists with other"))
            && ours[0].contains("'type'"),
        "{stderr}"
    );
    assert_eq!(
        left_behind(&conn, &prefix, &exchange).await,
        [format!("exchange {exchange}")],
        "{stderr}"
    );
    close(&conn).await;
    cleanup.run().await;
}

/// With the broker down, the demo and the tests fail with one line that
/// names what is missing and the command that starts it, without the URL's
/// password and without a stack of lapin errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_is_one_line_naming_the_fix() {
    // Port 1 on the loopback: nothing listens there.
    let down = "amqp://guest:s3cret@127.0.0.1:1/%2f";

    let err = connect_bounded(down, ConnectionProperties::default())
        .await
        .expect_err("nothing listens on 127.0.0.1:1");
    let line = broker_down(down, &err);
    assert!(!line.contains('\n') && !line.contains("s3cret"), "{line}");
    assert!(
        line.starts_with("RabbitMQ does not answer on 127.0.0.1:1 (")
            && line.ends_with("): start it with `bash .ci/deps.sh`"),
        "{line}"
    );

    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "1"])
        .env("MINDBUS_URL", down)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the demo exits when the broker is down")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(lines.len(), 1, "stderr: {stderr}");
    assert!(
        lines[0].starts_with("ai_team: RabbitMQ does not answer on 127.0.0.1:1 (")
            && lines[0].ends_with("): start it with `bash .ci/deps.sh`"),
        "{stderr}"
    );
}

/// The guard also cleans up when a test fails midway (it is dropped
/// without `run`): durable leftovers would otherwise stay on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_guard_deletes_on_drop() {
    let prefix = format!("{}.", unique("guard"));
    let exchange = unique("guard.bus");
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = format!("{prefix}agent.writer");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_exchange(&ch, &exchange, mindbus_otel::lapin::ExchangeKind::Topic).await;
    let api = management::Management::for_broker(&url()).unwrap();
    let policy = format!("{prefix}mindbus-dead-letters");
    let pattern = format!("^{}agent\\.", management::regex_escape(&prefix));
    let definition = json!({"dead-letter-exchange": format!("{prefix}mindbus.dlx")});
    api.put_policy(&policy, &pattern, definition).await.unwrap();

    drop(Cleanup::new(&prefix, &exchange));
    assert!(
        !api.has_policy(&policy).await.unwrap(),
        "the policy was deleted"
    );

    let passive = |name: &str| {
        let conn = &conn;
        let name = name.to_owned();
        async move {
            let probe = conn.create_channel().await.unwrap();
            probe
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok()
        }
    };
    assert!(!passive(&queue).await, "the queue was deleted");
    let probe = conn.create_channel().await.unwrap();
    let exchange_left = probe
        .exchange_declare(
            exchange.as_str().into(),
            mindbus_otel::lapin::ExchangeKind::Topic,
            mindbus_otel::lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    assert!(!exchange_left, "the exchange was deleted");
    close(&conn).await;
}

// ------------------------------------------- the real Collector and Jaeger

/// A free port on the loopback (bound, then released for the component).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Jaeger v2 and the collector, from the configs compose mounts, on free
/// loopback ports; killed when dropped.
struct Stack {
    _jaeger: tokio::process::Child,
    _collector: tokio::process::Child,
    query: u16,
    otlp_grpc: u16,
    otlp_http: u16,
    /// The collector's Prometheus exporter (what it received by OTLP).
    prometheus: u16,
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with_logs_to(None).await
    }

    /// With the collector's Loki exporter pointed at `logs` (an OTLP/HTTP
    /// base URL) instead of the compose default.
    async fn start_with_logs_to(logs: Option<String>) -> Stack {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let log = |name: &str| {
            let path = std::env::temp_dir().join(format!("mindbus-{name}-{}.log", random_u64()));
            std::fs::File::create(path).unwrap()
        };
        let (jaeger, (query, jaeger_otlp)) = spawn_healthy("jaeger", "/status", || {
            let (query, jaeger_otlp, jaeger_health) = (free_port(), free_port(), free_port());
            let mut jaeger = Command::new(tools::tool("jaeger"));
            jaeger
                .arg(format!(
                    "--config={}",
                    root.join("deploy/jaeger/config.yaml").display()
                ))
                .env("JAEGER_QUERY_HTTP_ENDPOINT", format!("127.0.0.1:{query}"))
                .env(
                    "JAEGER_QUERY_GRPC_ENDPOINT",
                    format!("127.0.0.1:{}", free_port()),
                )
                .env(
                    "JAEGER_OTLP_GRPC_ENDPOINT",
                    format!("127.0.0.1:{jaeger_otlp}"),
                )
                .env(
                    "JAEGER_OTLP_HTTP_ENDPOINT",
                    format!("127.0.0.1:{}", free_port()),
                )
                .env(
                    "JAEGER_HEALTH_ENDPOINT",
                    format!("127.0.0.1:{jaeger_health}"),
                )
                .stdout(log("jaeger"))
                .stderr(log("jaeger-err"))
                .kill_on_drop(true);
            (jaeger, jaeger_health, (query, jaeger_otlp))
        })
        .await;

        let (collector, (otlp_grpc, otlp_http, prometheus)) =
            spawn_healthy("the collector", "/", || {
                let (otlp_grpc, otlp_http, health) = (free_port(), free_port(), free_port());
                let prometheus = free_port();
                let mut collector = Command::new(tools::tool("otelcol"));
                collector
                    .arg(format!(
                        "--config={}",
                        root.join("deploy/otel-collector/config.yaml").display()
                    ))
                    .env(
                        "OTELCOL_OTLP_GRPC_ENDPOINT",
                        format!("127.0.0.1:{otlp_grpc}"),
                    )
                    .env(
                        "OTELCOL_OTLP_HTTP_ENDPOINT",
                        format!("127.0.0.1:{otlp_http}"),
                    )
                    .env(
                        "OTELCOL_JAEGER_ENDPOINT",
                        format!("127.0.0.1:{jaeger_otlp}"),
                    )
                    .env(
                        "OTELCOL_PROMETHEUS_ENDPOINT",
                        format!("127.0.0.1:{prometheus}"),
                    )
                    .env("OTELCOL_HEALTH_ENDPOINT", format!("127.0.0.1:{health}"))
                    .env(
                        "OTELCOL_LOKI_ENDPOINT",
                        logs.clone()
                            .unwrap_or_else(|| "http://127.0.0.1:1".to_owned()),
                    )
                    .env("OTELCOL_LOKI_COMPRESSION", "none")
                    .env("OTELCOL_METRICS_HOST", "127.0.0.1")
                    .env("OTELCOL_METRICS_PORT", free_port().to_string())
                    .stdout(log("otelcol"))
                    .stderr(log("otelcol-err"))
                    .kill_on_drop(true);
                (collector, health, (otlp_grpc, otlp_http, prometheus))
            })
            .await;
        Stack {
            _jaeger: jaeger,
            _collector: collector,
            query,
            otlp_grpc,
            otlp_http,
            prometheus,
        }
    }

    /// A GET on Jaeger's query API, as JSON.
    async fn api(&self, path: &str) -> Value {
        let body = http_get(self.query, path).await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }
}

/// Spawns what `command` builds, with fresh ports each attempt, until it
/// answers on its health port (`command` returns the command, that port and
/// what the caller keeps). An attempt whose process exits is retried, three
/// in all: a port picked free can be taken by another test's process
/// before this one binds it.
async fn spawn_healthy<T>(
    what: &str,
    path: &str,
    mut command: impl FnMut() -> (Command, u16, T),
) -> (tokio::process::Child, T) {
    for _ in 0..3 {
        let (mut cmd, health, kept) = command();
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("{what}: {e}: run `bash .ci/deps.sh --all` (installs and builds the tools)")
        });
        for _ in 0..300 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if http_status(health, path).await == Some(200) && child.try_wait().unwrap().is_none() {
                return (child, kept);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("{what} did not start in 3 attempts (see its log under the temp dir)");
}

/// One demo run exporting to the collector; waits for it to finish.
async fn run_demo(stack: &Stack, protocol: &str, args: &[&str], prefix: &str, exchange: &str) {
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{}", stack.otlp_grpc),
        _ => format!("http://127.0.0.1:{}", stack.otlp_http),
    };
    let mut cmd = Command::new(demo_binary());
    cmd.args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("MINDBUS_TRACE_VIEW", "off")
        .env("METRICS_ADDR", "off");
    isolated(&mut cmd, prefix, exchange);
    // The default log level, at which lapin opens its io_loop span (an
    // orphan trace, were it exported).
    cmd.env_remove("RUST_LOG").stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo finished in time")
        .unwrap();
    assert!(
        out.status.success(),
        "demo {args:?} over {protocol}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every trace id Jaeger holds for these services.
async fn trace_ids(stack: &Stack, services: &[&str]) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for service in services {
        let found = stack
            .api(&format!(
                "/api/traces?service={service}&limit=1000&lookback=1h"
            ))
            .await;
        for t in found["data"].as_array().into_iter().flatten() {
            ids.insert(t["traceID"].as_str().unwrap().to_owned());
        }
    }
    ids
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

/// The demo, as a user runs it against the stack compose describes: the
/// real OpenTelemetry Collector (the binary built from builder.yaml) in
/// front of the real Jaeger v2, both on the very configs compose mounts.
/// All roles in one process over gRPC and over HTTP, then each role in its
/// own process; then what Jaeger's query API shows, trace by trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_through_the_real_collector_into_the_real_jaeger() {
    let stack = Stack::start().await;
    let mut expected = 0;
    let mut cleanups = Vec::new();
    // Several all-in-one runs: an orphan trace (a dependency's span) shows
    // up in some runs only.
    for protocol in ["grpc", "http/protobuf", "grpc", "http/protobuf"] {
        let prefix = format!("{}.", unique("jaeger"));
        let exchange = unique("jaeger.bus");
        cleanups.push(Cleanup::new(&prefix, &exchange));
        run_demo(&stack, protocol, &["--tasks", "3"], &prefix, &exchange).await;
        expected += 3;
    }
    // Each role in its own process, as deployed: two tasks.
    let prefix = format!("{}.", unique("jaeger.roles"));
    let exchange = unique("jaeger.roles.bus");
    cleanups.push(Cleanup::new(&prefix, &exchange));
    let agents = ["writer", "critic"].map(|role| {
        let (stack, prefix, exchange) = (&stack, prefix.clone(), exchange.clone());
        async move {
            run_demo(
                stack,
                "grpc",
                &["--role", role, "--max-messages", "2"],
                &prefix,
                &exchange,
            )
            .await
        }
    });
    let orchestrator = async {
        let conn = connect().await;
        for q in ["agent.writer", "agent.critic"] {
            wait_consuming(&conn, &format!("{prefix}{q}")).await;
        }
        close(&conn).await;
        run_demo(
            &stack,
            "grpc",
            &["--role", "orchestrator", "--max-messages", "2"],
            &prefix,
            &exchange,
        )
        .await;
    };
    let [writer, critic] = agents;
    tokio::join!(writer, critic, orchestrator);
    expected += 2;

    // Jaeger: exactly the demo's services and one trace per task, nothing else.
    let services = ["orchestrator", "writer", "critic"];
    for _ in 0..100 {
        if trace_ids(&stack, &services).await.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // late stragglers
    let ids = trace_ids(&stack, &services).await;
    let listed: BTreeSet<String> = stack.api("/api/services").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        services.map(String::from).into(),
        "services in Jaeger"
    );
    assert_eq!(ids.len(), expected, "one trace per task and no other trace");

    let mut failed = 0;
    let mut subject = None;
    for id in &ids {
        let trace = &stack.api(&format!("/api/traces/{id}")).await["data"][0];
        let spans = trace["spans"].as_array().unwrap();
        let service = |s: &Value| {
            let process = s["processID"].as_str().unwrap();
            trace["processes"][process]["serviceName"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let by_id = |span_id: &str| spans.iter().find(|s| s["spanID"] == span_id);
        let context = format!(
            "trace {id}:\n{}",
            serde_json::to_string_pretty(trace).unwrap()
        );
        // What Jaeger shows is clean: no trace or span warnings.
        assert!(trace["warnings"].is_null(), "{context}");
        for s in spans {
            assert!(
                s["warnings"].is_null(),
                "span {} warns: {context}",
                s["operationName"]
            );
        }
        // One root, the orchestrator's task.
        let roots: Vec<&Value> = spans
            .iter()
            .filter(|s| s["references"].as_array().is_none_or(|r| r.is_empty()))
            .collect();
        assert_eq!(roots.len(), 1, "{context}");
        assert_eq!(roots[0]["operationName"], "execute_task", "{context}");
        assert_eq!(service(roots[0]), "orchestrator", "{context}");
        let root_failed = tag(roots[0], "error") == Some(&json!(true));
        // Every CONSUMER span: first reference CHILD_OF its producer.
        for s in spans
            .iter()
            .filter(|s| tag(s, "span.kind") == Some(&json!("consumer")))
        {
            let first = &s["references"][0];
            assert_eq!(
                first["refType"], "CHILD_OF",
                "{} in {context}",
                s["operationName"]
            );
            let producer =
                by_id(first["spanID"].as_str().unwrap()).expect("the producer is in the trace");
            assert_eq!(
                tag(producer, "span.kind"),
                Some(&json!("producer")),
                "{context}"
            );
        }
        // The tree the README shows: the writer's LLM call under its
        // CONSUMER span, every reply processed by the orchestrator.
        let named = |name: &'static str| {
            spans.iter().filter(move |s| {
                s["operationName"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name))
            })
        };
        // Each agent's LLM call sits under that agent's CONSUMER span.
        let mut llm_calls = 0;
        for llm in spans.iter().filter(|s| {
            s["operationName"]
                .as_str()
                .is_some_and(|n| n.starts_with("chat "))
        }) {
            llm_calls += 1;
            let parent = by_id(llm["references"][0]["spanID"].as_str().unwrap()).unwrap();
            let agent = service(llm);
            let name = parent["operationName"].as_str().unwrap();
            assert!(
                name.ends_with(&format!("agent.{agent}")),
                "llm_call under {name}: {context}"
            );
            assert_eq!(service(parent), agent, "{context}");
        }
        assert!(llm_calls > 0, "{context}");
        for reply in named("process") {
            assert_eq!(service(reply), "orchestrator", "{context}");
        }
        let in_trace: BTreeSet<String> = spans.iter().map(&service).collect();
        if root_failed {
            failed += 1;
            assert_eq!(
                in_trace,
                ["orchestrator", "writer"].map(String::from).into(),
                "{context}"
            );
        } else {
            assert_eq!(in_trace, services.map(String::from).into(), "{context}");
        }
        subject = subject.or_else(|| {
            spans
                .iter()
                .find_map(|s| tag(s, "cloudevents.event_subject"))
                .map(|v| (id.clone(), v.as_str().unwrap().to_owned()))
        });
    }
    assert_eq!(
        failed, 4,
        "the last task of each all-in-one run fails on purpose"
    );

    // A task found by its business id.
    let (id, subject) = subject.expect("a span with cloudevents.event_subject");
    let tags = format!(r#"{{"cloudevents.event_subject":"{subject}"}}"#);
    let found = stack
        .api(&format!(
            "/api/traces?service=orchestrator&lookback=1h&limit=100&tags={}",
            management::encode(&tags)
        ))
        .await;
    let found: BTreeSet<&str> = found["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["traceID"].as_str().unwrap())
        .collect();
    assert!(found.contains(id.as_str()), "{subject}: {found:?}");
    for c in cleanups {
        c.run().await;
    }
}

/// Each series name of a Prometheus exposition with its label names, less
/// the ones an OTLP-to-Prometheus exporter adds for the source (`job`,
/// `instance`, `otel_scope_*`) and the `target_info` series it adds.
fn series_shapes(exposition: &str) -> BTreeSet<(String, Vec<String>)> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, rest) = match l.split_once('{') {
                Some((name, rest)) => (name, rest),
                None => (l.split(' ').next()?, ""),
            };
            if name == "target_info" {
                return None;
            }
            let mut labels: Vec<String> = rest
                .split("\",")
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_owned()))
                .filter(|k| {
                    !["job", "instance"].contains(&k.as_str()) && !k.starts_with("otel_scope_")
                })
                .collect();
            labels.sort();
            Some((name.to_owned(), labels))
        })
        .collect()
}

/// Metrics pushed by OTLP (`OTEL_METRICS_EXPORTER=otlp`) through the real
/// collector's Prometheus exporter carry the same series names and labels
/// as the demo's own pull endpoint, so one set of dashboards serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_through_the_real_collector_match_the_pull_endpoint() {
    let stack = Stack::start().await;

    // Pushed: the demo's three tasks, exported every 200 ms and at exit.
    let prefix = format!("{}.", unique("otlpmetrics"));
    let exchange = unique("otlpmetrics.bus");
    let pushed_cleanup = Cleanup::new(&prefix, &exchange);
    let endpoint = format!("http://127.0.0.1:{}", stack.otlp_grpc);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "3"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_METRICS_EXPORTER", "otlp")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("MINDBUS_TRACE_VIEW", "off");
    isolated(&mut cmd, &prefix, &exchange);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo finished in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        !stdout.contains("metrics are served"),
        "no pull endpoint when pushing: {stdout}"
    );
    // The collector batches for up to a second: wait until what it shows
    // holds still (the demo's last export was at its exit).
    let mut pushed = String::new();
    let mut previous = BTreeSet::new();
    for _ in 0..20 {
        pushed = http_get(stack.prometheus, "/metrics").await;
        let shapes = series_shapes(&pushed);
        if pushed.contains("ai_team_tasks_total") && shapes == previous {
            break;
        }
        previous = shapes;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert!(
        pushed.contains("ai_team_tasks_total"),
        "the collector re-exposes the pushed metrics:\n{pushed}"
    );

    // Pulled: the same run, scraped from the demo's own endpoint.
    let prefix = format!("{}.", unique("pullmetrics"));
    let exchange = unique("pullmetrics.bus");
    let pulled_cleanup = Cleanup::new(&prefix, &exchange);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "3", "--linger", "3"])
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("MINDBUS_TRACE_VIEW", "off")
        .env("OTEL_TRACES_EXPORTER", "none");
    isolated(&mut cmd, &prefix, &exchange);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pulled = None;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        if line.contains("metrics are served on")
            && let Some(port) = served_port(&line)
        {
            pulled = Some(http_get(port, "/metrics").await);
        }
    }
    child.wait().await.unwrap();
    let pulled = pulled.expect("scraped the pull endpoint");

    let (pushed, pulled) = (series_shapes(&pushed), series_shapes(&pulled));
    let only_pushed: Vec<_> = pushed.difference(&pulled).collect();
    let only_pulled: Vec<_> = pulled.difference(&pushed).collect();
    assert!(
        only_pushed.is_empty() && only_pulled.is_empty(),
        "series names and labels differ\nonly through the collector: {only_pushed:#?}\nonly on the pull endpoint: {only_pulled:#?}"
    );
    pushed_cleanup.run().await;
    pulled_cleanup.run().await;
}

// ------------------------------------------- the dashboards on a real Prometheus

/// `query` percent-encoded for a URL's query string.
fn url_encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on a free loopback port, scraping `target` every
/// second into temporary storage; killed when dropped.
struct Prometheus {
    name: &'static str,
    port: u16,
    _child: tokio::process::Child,
    _dir: TempDir,
}

/// A temporary folder, deleted when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("mindbus-{what}-{}", random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    async fn start(name: &'static str, binary: PathBuf, target: u16) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: ai_team\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let (child, port) = spawn_healthy(name, "/-/ready", || {
            let port = free_port();
            let log = std::fs::File::create(dir.0.join(format!("prometheus-{port}.log"))).unwrap();
            let mut cmd = Command::new(&binary);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.0.join(format!("data-{port}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true);
            (cmd, port, port)
        })
        .await;
        Prometheus {
            name,
            port,
            _child: child,
            _dir: dir,
        }
    }

    /// The server's version, from its build-info API.
    async fn version(&self) -> String {
        let info: Value =
            serde_json::from_str(&http_get(self.port, "/api/v1/status/buildinfo").await).unwrap();
        info["data"]["version"].as_str().unwrap_or("?").to_owned()
    }

    /// An instant query: the values it returns (one per series; a scalar is
    /// one value), or the error Prometheus gives.
    async fn query(&self, promql: &str) -> Result<Vec<f64>, String> {
        let body = http_get(
            self.port,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )
        .await;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        let value = |pair: &Value| -> f64 {
            pair[1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(match v["data"]["resultType"].as_str() {
            Some("vector") => v["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| value(&s["value"]))
                .collect(),
            Some("scalar") => vec![value(&v["data"]["result"])],
            other => return Err(format!("unexpected result type {other:?}")),
        })
    }

    /// The values of `label` on the series of `metric` (Grafana's
    /// `label_values(metric, label)`).
    async fn label_values(&self, metric: &str, label: &str) -> Vec<String> {
        let body = http_get(
            self.port,
            &format!(
                "/api/v1/label/{label}/values?match[]={}",
                url_encode(metric)
            ),
        )
        .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }
}

/// What the closing check found for one query on one server.
fn verdict(result: &Result<Vec<f64>, String>) -> Result<f64, String> {
    match result {
        Err(e) => Err(format!("error {e}")),
        Ok(values) if values.is_empty() => Err("no data".to_owned()),
        Ok(values) => values
            .iter()
            .copied()
            .find(|v| v.is_finite())
            .ok_or_else(|| format!("no finite value in {values:?}")),
    }
}

/// What an error panel adds so that "none happened" is 0, not No data.
const ZERO_FALLBACK: &str = " or on() vector(0)";

/// Panels about what the demo never does (publish failures, handler
/// failures, hostile trace contexts, label overflow): their 0 is all there
/// is to see. Every other panel's query must find series of its own.
const NOT_IN_THE_DEMO: &[&str] = &[
    "Messaging errors by error_type",
    "Rejected trace contexts by reason",
    "Label overflow by label",
];

/// Every query of the three dashboards, as Grafana sends it (with the "All"
/// value of each variable, Grafana's `$__rate_interval` for a 1 s scrape
/// and `$__range` the time the traffic has run), evaluated by Debian's
/// Prometheus 2.42 and by Prometheus 3.16 while both scrape the live demo
/// (`--serve`): each returns at least one finite value on both, and each
/// variable lists values. Polls until all do, so it ends as soon as the
/// traffic has covered every panel (the failure kinds come every 15 tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_on_prometheus_2_and_3_scraping_the_live_demo() {
    let queries = dashboards::panel_queries();
    assert!(queries.len() >= 40, "{} queries", queries.len());
    let prefix = format!("{}.", unique("serve"));
    let exchange = unique("serve.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--serve", "--rate", "5"])
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("MINDBUS_TRACE_VIEW", "off")
        .env("OTEL_TRACES_EXPORTER", "none");
    isolated(&mut cmd, &prefix, &exchange);
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the demo said where it serves its metrics")
            .unwrap()
            .expect("the demo is running");
        if let Some(port) = served_port(&line) {
            break port;
        }
    };
    // The rest of stdout, one line per task, read while it runs.
    let stdout = tokio::spawn(async move {
        let mut out = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    let servers = [
        Prometheus::start("prometheus", PathBuf::from("prometheus"), port).await,
        Prometheus::start("prometheus3", tools::tool("prometheus3"), port).await,
    ];
    let versions = [servers[0].version().await, servers[1].version().await];
    assert!(versions[0].starts_with("2."), "{versions:?}");
    assert!(versions[1].starts_with("3."), "{versions:?}");
    let started = std::time::Instant::now();

    // Grafana: $__rate_interval = max($__interval + scrape, 4 * scrape).
    let (rate_interval, interval) = ("4s", "1s");
    let mut report = Vec::new();
    let mut all_good = false;
    while !all_good && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let range = format!("{}s", started.elapsed().as_secs().max(1));
        report.clear();
        all_good = true;
        for q in &queries {
            let promql = q.instantiate(&range, rate_interval, interval);
            // `or on() vector(0)` answers 0 when nothing happened; what
            // happens in the demo must also show without it, or the 0
            // would hide a query that matches nothing.
            let bare = promql.replace(ZERO_FALLBACK, "");
            let produced = !NOT_IN_THE_DEMO.contains(&q.panel.as_str());
            let mut row = Vec::new();
            for server in &servers {
                let mut v = verdict(&server.query(&promql).await);
                if v.is_ok()
                    && bare != promql
                    && produced
                    && let Err(e) = verdict(&server.query(&bare).await)
                {
                    v = Err(format!("only the 0 fallback; without it: {e}"));
                }
                all_good &= v.is_ok();
                row.push(v);
            }
            report.push((q, promql, row));
        }
        for (metric, label) in dashboards::label_values_queries() {
            for server in &servers {
                all_good &= !server.label_values(&metric, &label).await.is_empty();
            }
        }
    }
    let table: String = report
        .iter()
        .map(|(q, promql, row)| {
            format!(
                "{} | {} | {promql} | {:?} | {:?}\n",
                q.dashboard, q.panel, row[0], row[1]
            )
        })
        .collect();
    println!(
        "after {:?} of traffic; Prometheus {} and {}:\n{table}",
        started.elapsed(),
        versions[0],
        versions[1]
    );
    for (metric, label) in dashboards::label_values_queries() {
        for server in &servers {
            let values = server.label_values(&metric, &label).await;
            assert!(
                !values.is_empty(),
                "{}: label_values({metric}, {label}) is empty",
                server.name
            );
        }
    }
    let bad: Vec<&str> = table.lines().filter(|l| l.contains("Err(")).collect();
    assert!(
        bad.is_empty(),
        "{} of {} dashboard queries do not return a finite value:\n{}",
        bad.len(),
        report.len(),
        bad.join("\n")
    );

    // The demo stops on SIGTERM, finishing the tasks in hand.
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .expect("the demo stopped within 40 s of SIGTERM")
        .unwrap();
    let stdout = stdout.await.unwrap();
    assert!(status.success(), "demo exit status {status}\n{stdout}");
    for planned in [
        "failed as planned (writer failed: DEADLINE_EXCEEDED)",
        "failed as planned (critic failed: RESOURCE_EXHAUSTED)",
        "failed as planned (no reply from writer to generate_article within 1s)",
        ": completed, quality score",
    ] {
        assert!(stdout.contains(planned), "{planned}\n{stdout}");
    }
    assert!(
        stdout.contains(" failed as planned, 0 failed unexpectedly"),
        "{stdout}"
    );
    cleanup.run().await;
}

// ------------------------------------------------------------ every role lingers

/// Reads `child`'s stdout until the `metrics are served on` line; the port
/// it names, and what came before.
async fn until_metrics_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    within: Duration,
) -> (u16, String) {
    let mut seen = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("metrics are served on") {
                return served_port(&line);
            }
        }
        None
    };
    match tokio::time::timeout(within, read).await {
        Ok(Some(port)) => (port, seen),
        other => panic!("no metrics line ({other:?}):\n{seen}"),
    }
}

/// `--linger` in every role: each role, run on its own, serves its final
/// metrics after its work (the orchestrator after its last task, the
/// writer and critic after their last COMMAND) for as long as asked, and
/// stops lingering at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_lingers_so_its_final_metrics_are_scraped() {
    let prefix = format!("{}.", unique("linger"));
    let exchange = unique("linger.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let spawn = |role: &str, prefix: &str, exchange: &str| {
        let mut cmd = Command::new(demo_binary());
        cmd.args(["--role", role, "--max-messages", "2", "--linger", "60"])
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("OTEL_TRACES_EXPORTER", "none")
            .env("MINDBUS_TRACE_VIEW", "off");
        isolated(&mut cmd, prefix, exchange);
        cmd.spawn().unwrap()
    };
    let mut roles = Vec::new();
    for role in ["writer", "critic"] {
        roles.push((role, spawn(role, &prefix, &exchange)));
        let conn = connect().await;
        wait_consuming(&conn, &format!("{prefix}agent.{role}")).await;
        close(&conn).await;
    }
    roles.push(("orchestrator", spawn("orchestrator", &prefix, &exchange)));

    // Each role's final counts, scraped after its work, while it lingers.
    let want = [
        (
            "orchestrator",
            "ai_team_tasks_total{status=\"completed\"} 2",
        ),
        (
            "orchestrator",
            "ai_team_commands_total{status=\"completed\"} 4",
        ),
        (
            "writer",
            "mindbus_messages_total{agent=\"agent.writer.001\",peer=\"orchestrator-core\",kind=\"command\",direction=\"received\",outcome=\"acked\"} 2",
        ),
        (
            "critic",
            "mindbus_messages_total{agent=\"agent.critic.001\",peer=\"orchestrator-core\",kind=\"command\",direction=\"received\",outcome=\"acked\"} 2",
        ),
    ];
    for (role, child) in roles.iter_mut().rev() {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (port, seen) = until_metrics_line(&mut lines, Duration::from_secs(60)).await;
        let scrape = http_get(port, "/metrics").await;
        for (_, line) in want.iter().filter(|(r, _)| r == role) {
            assert!(scrape.contains(line), "{role}: {line}\n{seen}\n{scrape}");
        }
        let next = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("the lingering line")
            .unwrap()
            .unwrap_or_default();
        assert!(next.starts_with("lingering 60s"), "{role}: {next}");
        // Still serving: it lingers, it has not exited.
        assert!(child.try_wait().unwrap().is_none(), "{role} exited");
    }
    // SIGTERM ends the lingering at once.
    for (role, child) in &mut roles {
        let pid = child.id().unwrap().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{role} still lingers 15 s after SIGTERM"))
            .unwrap();
        assert!(status.success(), "{role}: {status}");
    }
    cleanup.run().await;
}

// ------------------------------------------------- every role stops within a bound

/// What else happens at the moment of the SIGTERM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AlsoAtStop {
    Nothing,
    /// The role's broker connection is closed (from the management API).
    BrokerConnectionClosed,
    /// The OTLP endpoint the role exports to stops.
    CollectorStopped,
}

/// The bound the roles get in these rounds (`--shutdown-timeout`), and the
/// slack allowed over it (process exit, the test's own polling).
const STOP_BOUND: Duration = Duration::from_secs(4);
const STOP_SLACK: Duration = Duration::from_millis(1500);

/// Sends SIGTERM to `child` (and does `also`); waits for its exit, which
/// must come within [`STOP_BOUND`] (plus slack). Its exit code.
async fn stop_within_bound(
    child: &mut tokio::process::Child,
    also: AlsoAtStop,
    connection_name: &str,
    collector: &mut Option<OtlpReceiver>,
    what: &str,
) -> i32 {
    let pid = child.id().unwrap().to_string();
    let t0 = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    match also {
        AlsoAtStop::Nothing => {}
        AlsoAtStop::BrokerConnectionClosed => {
            let api = management::Management::for_broker(&url()).unwrap();
            api.close_connections_named(connection_name).await.unwrap();
        }
        AlsoAtStop::CollectorStopped => drop(collector.take()),
    }
    let status = tokio::time::timeout(STOP_BOUND + STOP_SLACK, child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: still running {:?} after SIGTERM",
                STOP_BOUND + STOP_SLACK
            )
        })
        .unwrap();
    let took = t0.elapsed();
    assert!(took <= STOP_BOUND + STOP_SLACK, "{what}: took {took:?}");
    status.code().unwrap_or(-1)
}

/// `role`, bounded by [`STOP_BOUND`], exporting to `collector`; its stderr
/// piped, to be read once it has stopped.
fn spawn_to_stop(
    role: &str,
    collector: &OtlpReceiver,
    prefix: &str,
    exchange: &str,
) -> tokio::process::Child {
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--role", role, "--shutdown-timeout"])
        .arg(STOP_BOUND.as_secs().to_string())
        .env("METRICS_ADDR", "off")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.grpc_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("MINDBUS_TRACE_VIEW", "off");
    isolated(&mut cmd, prefix, exchange);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// What a stopped child wrote on its piped stderr.
async fn stderr_of(child: &mut tokio::process::Child) -> String {
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).await.ok();
    }
    stderr
}

/// The correlation ids of what is in `queue` now (taken off it).
async fn correlation_ids_in(ch: &mindbus_otel::lapin::Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(
            queue.into(),
            mindbus_otel::lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
    {
        let corr = m.delivery.properties.correlation_id().as_ref();
        out.push(corr.map(|c| c.to_string()).unwrap_or_default());
    }
    out
}

/// Every role stops within its bound, at random moments under traffic,
/// also when its broker connection is closed or its collector stops at the
/// same moment; and no COMMAND is lost or answered twice: each is either
/// answered once or still in its queue. (When the broker connection is
/// closed between a reply's publish and its ack, AMQP can only redeliver:
/// that COMMAND may then be both answered and back in its queue. It is
/// allowed in those rounds only, and counted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_stops_within_its_bound_and_loses_no_command() {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let variants = [
        AlsoAtStop::Nothing,
        AlsoAtStop::BrokerConnectionClosed,
        AlsoAtStop::CollectorStopped,
    ];
    let mut rounds = 0;
    let mut redelivered_after_broker_loss = 0;
    for round in 0..12 {
        let role = if round % 2 == 0 { "writer" } else { "critic" };
        let also = variants[round / 2 % 3];
        let what = format!("round {round}: {role}, {also:?}");
        let prefix = format!("{}.", unique("stop"));
        let exchange = unique("stop.bus");
        let cleanup = Cleanup::new(&prefix, &exchange);
        let mut collector = Some(OtlpReceiver::start().await.unwrap());
        let mut child = spawn_to_stop(role, collector.as_ref().unwrap(), &prefix, &exchange);
        let queue = format!("{prefix}agent.{role}");
        wait_consuming(&conn, &queue).await;
        // The connection the role opened, by the name it gives it.
        let connection_name = format!("ai_team {role} pid {}", child.id().unwrap());
        let replies = reply_queue(&ch).await;

        // 30 COMMANDs, one every 20 ms; SIGTERM at a random moment among them.
        let total = 30;
        let stop_after = 3 + (random_u64() % 20) as usize;
        let mut code = None;
        for i in 0..total {
            let body = json!({
                "specversion": "1.0", "type": "ai.team.command", "source": "test-orchestrator",
                "id": format!("c{i}"), "subject": format!("task-{i}"),
                "data": {"action": "generate_article", "params": {"topic": "stops"}},
            });
            let props = BasicProperties::default()
                .with_reply_to(replies.as_str().into())
                .with_correlation_id(format!("c{i}").into())
                .with_message_id(format!("c{i}").into())
                .with_delivery_mode(2);
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
            if i == stop_after {
                code = Some(
                    stop_within_bound(&mut child, also, &connection_name, &mut collector, &what)
                        .await,
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let code = code.unwrap();
        let stderr = stderr_of(&mut child).await;
        match also {
            AlsoAtStop::Nothing => {
                assert_eq!(code, 0, "{what}: {stderr}");
                // Not even lapin's `invalid channel state: Closing`, the
                // sign of the connection-close race that could hang it.
                assert!(stderr.trim().is_empty(), "{what}: {stderr}");
            }
            // Not clean, or clean if the stop won the race: never another code.
            _ => assert!(code == 0 || code == 3, "{what}: exit {code}: {stderr}"),
        }
        if code == 3 {
            assert!(
                stderr.contains("ai_team: unclean shutdown: "),
                "{what}: {stderr}"
            );
        }

        // Every COMMAND answered once or still in its queue.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answered = correlation_ids_in(&ch, replies.as_str()).await;
        let queued = correlation_ids_in(&ch, &queue).await;
        let dead = correlation_ids_in(&ch, &format!("{prefix}mindbus.dead-letters")).await;
        assert!(dead.is_empty(), "{what}: dead-lettered {dead:?}");
        for i in 0..total {
            let id = format!("c{i}");
            let a = answered.iter().filter(|c| **c == id).count();
            let q = queued.iter().filter(|c| **c == id).count();
            assert!(a + q >= 1, "{what}: {id} lost\n{stderr}");
            assert!(a <= 1 && q <= 1, "{what}: {id} answered {a}, queued {q}");
            if a + q == 2 {
                assert_eq!(
                    also,
                    AlsoAtStop::BrokerConnectionClosed,
                    "{what}: {id} answered and redelivered\n{stderr}"
                );
                redelivered_after_broker_loss += 1;
            }
        }
        assert!(
            !answered.is_empty() || stop_after < 1,
            "{what}: nothing answered"
        );
        ch.queue_delete(replies.as_str().into(), Default::default())
            .await
            .ok();
        cleanup.run().await;
        rounds += 1;
    }
    println!(
        "{rounds} rounds; COMMANDs answered and redelivered after a broker connection loss: \
         {redelivered_after_broker_loss}"
    );

    // The orchestrator, its task in hand never answered (no writer runs):
    // it gives the task up within the bound.
    for also in variants {
        let what = format!("orchestrator, {also:?}");
        let prefix = format!("{}.", unique("stop-orch"));
        let exchange = unique("stop-orch.bus");
        let cleanup = Cleanup::new(&prefix, &exchange);
        let mut collector = Some(OtlpReceiver::start().await.unwrap());
        let mut child = spawn_to_stop(
            "orchestrator",
            collector.as_ref().unwrap(),
            &prefix,
            &exchange,
        );
        let writer_q = format!("{prefix}agent.writer");
        // Its first COMMAND is in the writer's queue: the task is in hand.
        wait_queue(&conn, &writer_q, "no COMMAND sent to", |q| {
            q.message_count() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(random_u64() % 500)).await;
        let connection_name = format!("ai_team orchestrator pid {}", child.id().unwrap());
        let code =
            stop_within_bound(&mut child, also, &connection_name, &mut collector, &what).await;
        let stderr = stderr_of(&mut child).await;
        assert_eq!(code, 3, "{what}: the task was abandoned: {stderr}");
        assert!(
            stderr.contains("task 1 abandoned unfinished"),
            "{what}: {stderr}"
        );
        assert_eq!(
            correlation_ids_in(&ch, &writer_q).await.len(),
            1,
            "{what}: its COMMAND is still in its queue"
        );
        cleanup.run().await;
    }
    close(&conn).await;
}

// ------------------------------------------------------ every log line in its trace

/// Every log line the roles write while they work is in its task's trace:
/// each OTLP log record (and each JSON line on stderr) of the demo carries
/// the trace and span it was written in, and that span is the role's own
/// (the writer's and critic's CONSUMER spans, the orchestrator's task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_task_is_in_its_trace() {
    let rx = OtlpReceiver::start().await.unwrap();
    let prefix = format!("{}.", unique("logs"));
    let exchange = unique("logs.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "3"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", rx.grpc_endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_LOGS_EXPORTER", "otlp")
        .env("LOG_FORMAT", "json")
        .env("MINDBUS_TRACE_VIEW", "off")
        .env("METRICS_ADDR", "off");
    isolated(&mut cmd, &prefix, &exchange);
    cmd.env("RUST_LOG", "info").stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo finished in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}\n{stderr}", out.status);

    let spans = rx
        .wait_until(Duration::from_secs(15), |s| {
            s.find_all("execute_task").len() == 3
        })
        .await;
    // What each role says while it works, and the span it says it in.
    let expected: [(&str, &str, &[&str]); 3] = [
        (
            "orchestrator",
            "execute_task",
            &[
                "orchestrator: COMMAND sent",
                "orchestrator: task completed",
                "orchestrator: task failed",
            ],
        ),
        (
            "writer",
            "process",
            &[
                "writer: COMMAND received",
                "writer: LLM call done",
                "writer: LLM call timed out",
                "writer: RESULT sent",
                "writer: ERROR sent",
            ],
        ),
        (
            "critic",
            "process",
            &[
                "critic: COMMAND received",
                "critic: LLM call done",
                "critic: RESULT sent",
            ],
        ),
    ];
    // Three tasks, the last failing at the writer: the orchestrator sends 5
    // COMMANDs and ends 3 tasks (8 lines); the writer handles 3 COMMANDs and
    // the critic 2, 3 lines each (received, LLM call, reply).
    let wanted: usize = 8 + 3 * 3 + 2 * 3;
    let logs = rx
        .wait_logs_until(Duration::from_secs(15), |logs| {
            logs.iter()
                .filter(|l| l.body_str().is_some_and(|b| b.contains(": ")))
                .count()
                >= wanted
        })
        .await;
    let ours: Vec<_> = logs
        .iter()
        .filter(|l| {
            l.body_str()
                .is_some_and(|b| expected.iter().any(|(_, _, m)| m.contains(&b)))
        })
        .collect();
    for (role, span_prefix, messages) in expected {
        for message in messages {
            let records: Vec<_> = ours
                .iter()
                .filter(|l| l.body_str() == Some(message))
                .collect();
            assert!(!records.is_empty(), "no OTLP record {message:?}");
            for record in records {
                let span = spans.iter().find(|s| record.in_span(s)).unwrap_or_else(|| {
                    panic!(
                        "{message:?} ({:?}/{:?}) is in no received span:\n{}",
                        record.trace_id,
                        record.span_id,
                        spans.render_all()
                    )
                });
                assert_eq!(
                    span.service_name.as_deref(),
                    Some(role),
                    "{message:?} written in {}",
                    span.name
                );
                assert!(
                    span.name.starts_with(span_prefix),
                    "{message:?} in {}",
                    span.name
                );
            }
        }
    }
    let count = |m: &str| ours.iter().filter(|l| l.body_str() == Some(m)).count();
    assert_eq!(count("orchestrator: COMMAND sent"), 5);
    assert_eq!(count("orchestrator: task completed"), 2);
    assert_eq!(count("orchestrator: task failed"), 1);
    assert_eq!(count("writer: COMMAND received"), 3);
    assert_eq!(count("critic: RESULT sent"), 2);
    assert_eq!(ours.len(), wanted, "no line twice, none missing");

    // The same lines on stderr, as JSON with the same ids.
    let mut json_lines = 0;
    for line in stderr
        .lines()
        .filter(|l| l.contains("\"target\":\"ai_team\""))
    {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let (trace_id, span_id) = (
            v["trace_id"].as_str().unwrap_or_else(|| panic!("{line}")),
            v["span_id"].as_str().unwrap_or_else(|| panic!("{line}")),
        );
        assert!(
            spans
                .iter()
                .any(|s| s.trace_id.to_string() == trace_id && s.span_id.to_string() == span_id),
            "{line}"
        );
        json_lines += 1;
    }
    assert_eq!(json_lines, wanted, "{stderr}");
    cleanup.run().await;
}

/// The demo's log records through the real collector, as compose sends them
/// on to Loki (here the testkit stands in for Loki's OTLP endpoint): each
/// keeps the trace and span it was written in, and those traces are the
/// ones Jaeger shows, so Grafana's trace <-> logs links find each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_through_the_real_collector_keep_their_trace_for_loki() {
    let loki = OtlpReceiver::start().await.unwrap();
    let stack = Stack::start_with_logs_to(Some(loki.http_endpoint())).await;
    let prefix = format!("{}.", unique("loki"));
    let exchange = unique("loki.bus");
    let cleanup = Cleanup::new(&prefix, &exchange);
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--tasks", "2"])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", stack.otlp_grpc),
        )
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_LOGS_EXPORTER", "otlp")
        .env("MINDBUS_TRACE_VIEW", "off")
        .env("METRICS_ADDR", "off");
    isolated(&mut cmd, &prefix, &exchange);
    cmd.env("RUST_LOG", "info");
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the demo finished in time")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two tasks, the second failing at the writer: 5 + 6 + 3 lines.
    let ours = |logs: &[mindbus_otel_testkit::ReceivedLog]| {
        logs.iter()
            .filter(|l| {
                l.body_str().is_some_and(|b| {
                    ["orchestrator: ", "writer: ", "critic: "]
                        .iter()
                        .any(|p| b.starts_with(p))
                })
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let logs = loki
        .wait_logs_until(Duration::from_secs(20), |logs| ours(logs).len() >= 14)
        .await;
    let logs = ours(&logs);
    assert_eq!(logs.len(), 14, "{logs:#?}");
    let mut traces = BTreeSet::new();
    for log in &logs {
        let (Some(trace_id), Some(_)) = (log.trace_id, log.span_id) else {
            panic!("no trace context: {log:?}");
        };
        traces.insert(trace_id.to_string());
    }
    assert_eq!(traces.len(), 2, "one trace per task");
    for _ in 0..100 {
        if trace_ids(&stack, &["orchestrator"])
            .await
            .is_superset(&traces)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_jaeger = trace_ids(&stack, &["orchestrator"]).await;
    assert!(
        in_jaeger.is_superset(&traces),
        "the logs' traces {traces:?} are in Jaeger: {in_jaeger:?}"
    );
    cleanup.run().await;
}
