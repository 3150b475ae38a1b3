//! Spans through the real broker, exported by real OTLP exporters into the
//! testkit receiver: one AI_TEAM task is one trace whose tree reads like the
//! task, in both consume styles, with the documented statuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/otel.rs"]
mod otel;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, ShortString};
use mindbus_otel::lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::context::FutureExt as _;
use mindbus_otel::opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use mindbus_otel::{MessageKind, MessagingSpans, TraceContext, TracedChannel};
use mindbus_otel_testkit::{OtlpReceiver, ReceivedSpan, SpanSet, StatusCode};
use otel::{Proto, flush, provider, shutdown};
use serde_json::{Value, json};
use std::time::Duration;

fn traced(ch: Channel, agent: &str, spans: &MessagingSpans) -> TracedChannel {
    TracedChannel::builder(ch)
        .agent(agent)
        .with(TraceContext::default())
        .with(spans.clone())
        .build()
}

fn event(kind: &str, source: &str, id: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "type": format!("ai.team.{kind}"), "source": source, "id": id,
        "subject": "task-article-555", "data": data,
    }))
    .unwrap()
}

fn reply_props(d: &mindbus_otel::lapin::message::Delivery, id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_correlation_id(d.properties.correlation_id().clone().unwrap())
        .with_message_id(id.into())
}

/// The topology of one scenario run, all names unique.
struct Bus {
    exchange: String,
    writer_q: String,
    critic_q: String,
    events_q: String,
}

impl Bus {
    async fn declare(ch: &Channel) -> Bus {
        let bus = Bus {
            exchange: unique("spans.bus"),
            writer_q: unique("spans.writer"),
            critic_q: unique("spans.critic"),
            events_q: unique("spans.events"),
        };
        declare_exchange(ch, &bus.exchange, ExchangeKind::Topic).await;
        for (q, key) in [
            (&bus.writer_q, "cmd.writer.*"),
            (&bus.critic_q, "cmd.critic.*"),
            (&bus.events_q, "evt.#"),
        ] {
            declare_queue(ch, q, FieldTable::default()).await;
            bind(ch, q, &bus.exchange, key).await;
        }
        bus
    }

    async fn delete(&self, ch: &Channel) {
        for q in [&self.writer_q, &self.critic_q, &self.events_q] {
            delete_queue(ch, q).await;
        }
        delete_exchange(ch, &self.exchange).await;
    }
}

/// Orchestrator -> writer (handler style, nested `llm_call`) -> critic
/// (stream style) -> EVENT. `writer_error` makes the writer answer ERROR;
/// `legacy` asks for the 0.1 span shapes.
async fn scenario(
    proto: Proto,
    writer_error: bool,
    legacy: bool,
) -> (SpanSet, Bus, [MessagingSpans; 3]) {
    let rx = OtlpReceiver::start().await.unwrap();
    let orch_p = provider("orchestrator", &rx, proto);
    let writer_p = provider("writer", &rx, proto);
    let critic_p = provider("critic", &rx, proto);
    let orch_s = MessagingSpans::default()
        .with_tracer_provider(&orch_p)
        .server("127.0.0.1", 5672)
        .record_body_size(true)
        .legacy_shapes(legacy);
    let writer_s = MessagingSpans::default()
        .with_tracer_provider(&writer_p)
        .legacy_shapes(legacy);
    let critic_s = MessagingSpans::default()
        .with_tracer_provider(&critic_p)
        .legacy_shapes(legacy);

    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let bus = Bus::declare(&raw).await;
    let orch = traced(
        conn.create_channel().await.unwrap(),
        "orchestrator-core",
        &orch_s,
    );
    let writer = traced(
        conn.create_channel().await.unwrap(),
        "agent.writer.001",
        &writer_s,
    );
    let critic = traced(
        conn.create_channel().await.unwrap(),
        "agent.critic.001",
        &critic_s,
    );

    // Writer, handler style: an `llm_call` span, then the reply.
    let (w, wp) = (writer.clone(), writer_p.clone());
    let writer_handle = writer
        .consume_with(
            bus.writer_q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let (w, wp) = (w.clone(), wp.clone());
                async move {
                    {
                        let tracer = wp.tracer("writer");
                        let _span = tracer.start("llm_call");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let body = if writer_error {
                        event(
                            "error",
                            "agent.writer.001",
                            "w-err",
                            json!({"error": {"code": "DEADLINE_EXCEEDED", "message": "slow"}}),
                        )
                    } else {
                        event(
                            "result",
                            "agent.writer.001",
                            "w-res",
                            json!({"status": "SUCCESS", "output": {"article": "..."}}),
                        )
                    };
                    let reply_to = d.properties.reply_to().clone().unwrap();
                    w.basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &body,
                        reply_props(&d, "w-reply"),
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

    // Critic, stream style: the reply is published outside any context;
    // the in-flight COMMAND table makes it the CONSUMER span's child.
    let mut critic_consumer = consume_stream(&critic, bus.critic_q.as_str()).await;
    let c = critic.clone();
    let critic_task = tokio::spawn(async move {
        let d = critic_consumer.next().await.unwrap().unwrap();
        let body = event(
            "result",
            "agent.critic.001",
            "c-res",
            json!({"status": "SUCCESS", "output": {"quality_score": 8.5}}),
        );
        let reply_to = d.properties.reply_to().clone().unwrap();
        c.basic_publish(
            "".into(),
            reply_to,
            BasicPublishOptions::default(),
            &body,
            reply_props(&d, "c-reply"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    });

    // Orchestrator: a server-named reply queue, read in stream style.
    let replies = reply_queue(&orch).await;
    let reply_to: ShortString = replies.clone();
    let mut reply_consumer = consume_stream(&orch, reply_to.as_str()).await;

    let task = orch_p.tracer("orchestrator").start("execute_task");
    let task_cx = Context::new().with_span(task);
    async {
        for (role, action, id) in [
            ("writer", "generate_article", "cmd-1"),
            ("critic", "review_article", "cmd-2"),
        ] {
            let body = event(
                "command",
                "orchestrator-core",
                id,
                json!({"action": action}),
            );
            let props = BasicProperties::default()
                .with_reply_to(reply_to.clone())
                .with_correlation_id(id.into())
                .with_message_id(id.into());
            orch.basic_publish(
                bus.exchange.as_str().into(),
                format!("cmd.{role}.any").into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), reply_consumer.next())
                .await
                .expect("reply in time")
                .unwrap()
                .unwrap();
            reply.ack(BasicAckOptions::default()).await.unwrap();
            if writer_error {
                break;
            }
        }
        let body = event(
            "event",
            "orchestrator-core",
            "ev-1",
            json!({"event_type": "task.completed"}),
        );
        orch.basic_publish(
            bus.exchange.as_str().into(),
            "evt.task.completed".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    .with_context(task_cx.clone())
    .await;
    task_cx.span().end();
    if !writer_error {
        critic_task.await.unwrap();
    } else {
        critic_task.abort();
    }
    writer_handle.cancel().await.unwrap();

    flush(&[&orch_p, &writer_p, &critic_p]).await;
    // execute_task and llm_call, plus every messaging span.
    let expected =
        2 + orch_s.stats().started() + writer_s.stats().started() + critic_s.stats().started();
    let spans = rx
        .wait_for_spans(expected as usize, Duration::from_secs(10))
        .await;
    assert_eq!(
        spans.len() as u64,
        expected,
        "every started span is exported:\n{}",
        spans.render_all()
    );
    for s in [&orch_s, &writer_s, &critic_s] {
        assert_eq!(s.stats().started(), s.stats().ended(), "no span left open");
        assert_eq!(
            s.in_flight(),
            0,
            "the in-flight table is empty after settlement"
        );
    }
    bus.delete(&raw).await;
    close(&conn).await;
    shutdown(vec![orch_p, writer_p, critic_p]).await;
    (spans, bus, [orch_s, writer_s, critic_s])
}

fn one<'a>(spans: &'a SpanSet, name: &str, service: &str) -> &'a ReceivedSpan {
    spans.one_where(
        |s| s.name == name && s.service_name.as_deref() == Some(service),
        &format!("{name} ({service})"),
    )
}

fn child<'a>(
    spans: &'a SpanSet,
    parent: &ReceivedSpan,
    name: &str,
    service: &str,
) -> &'a ReceivedSpan {
    let kids: Vec<&ReceivedSpan> = spans
        .children_of(parent)
        .into_iter()
        .filter(|s| s.name == name && s.service_name.as_deref() == Some(service))
        .collect();
    assert!(
        !kids.is_empty(),
        "no child {name} ({service}) under {}:\n{}",
        parent.name,
        spans.render_all()
    );
    kids[0]
}

fn assert_messaging(span: &ReceivedSpan, op: &str, kind: MessageKind) {
    assert_eq!(
        span.attr_str("messaging.system"),
        Some("rabbitmq"),
        "{}",
        span.name
    );
    assert_eq!(
        span.attr_str("messaging.operation.name"),
        Some(op),
        "{}",
        span.name
    );
    assert!(span.attr_str("messaging.operation.type").is_some());
    assert!(span.attr_str("messaging.destination.name").is_some());
    // Opt-in: only the orchestrator records it.
    let body_size = span.attr_i64("messaging.message.body.size");
    if span.service_name.as_deref() == Some("orchestrator") {
        assert!(body_size.unwrap_or(0) > 0, "{}", span.name);
    } else {
        assert_eq!(body_size, None, "{}", span.name);
    }
    assert_eq!(
        span.attr_str("mindbus.message.kind"),
        Some(kind.as_str()),
        "{}",
        span.name
    );
    // Every MindBus message is CloudEvents 1.0: not repeated per span.
    assert_eq!(span.attr_str("cloudevents.event_spec_version"), None);
    assert!(span.attr_str("cloudevents.event_id").is_some());
    assert!(span.attr_str("cloudevents.event_source").is_some());
    assert_eq!(
        span.attr_str("cloudevents.event_subject"),
        Some("task-article-555")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_trace_over_grpc() {
    let (spans, bus, _) = scenario(Proto::Grpc, false, false).await;
    spans.assert_single_trace();
    // Span names from the destination template: the routing key's agent
    // id left out.
    let x = &bus.exchange;
    let process_writer = format!("process {x}:cmd.writer.*:{}", bus.writer_q);
    let process_critic = format!("process {x}:cmd.critic.*:{}", bus.critic_q);

    let root = one(&spans, "execute_task", "orchestrator");
    let publishes: Vec<&ReceivedSpan> = spans.children_of(root);
    let names: Vec<&str> = publishes.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("publish {x}:cmd.writer.*"),
            format!("publish {x}:cmd.critic.*"),
            format!("publish {x}:evt.task.*"),
        ],
        "\n{}",
        spans.render_all()
    );

    // COMMAND -> writer (handler style).
    let cmd_w = publishes[0];
    assert_eq!(cmd_w.kind, SpanKind::Producer);
    assert_messaging(cmd_w, "publish", MessageKind::Command);
    assert_eq!(
        cmd_w.attr_str("messaging.rabbitmq.destination.routing_key"),
        Some("cmd.writer.any")
    );
    assert_eq!(
        cmd_w.attr_str("messaging.destination.name"),
        Some(format!("{x}:cmd.writer.any").as_str())
    );
    assert_eq!(
        cmd_w.attr_str("messaging.destination.template"),
        Some(format!("{x}:cmd.writer.*").as_str())
    );
    assert_eq!(cmd_w.attr_str("messaging.message.id"), Some("cmd-1"));
    assert_eq!(
        cmd_w.attr_str("messaging.message.conversation_id"),
        Some("cmd-1")
    );
    assert_eq!(cmd_w.attr_str("mindbus.action"), Some("generate_article"));
    assert_eq!(cmd_w.attr_str("server.address"), Some("127.0.0.1"));
    assert_eq!(cmd_w.attr_i64("server.port"), Some(5672));
    assert_eq!(
        cmd_w.attr_str("messaging.client.id"),
        Some("orchestrator-core")
    );
    let proc_w = child(&spans, cmd_w, &process_writer, "writer");
    assert_eq!(proc_w.kind, SpanKind::Consumer);
    assert_messaging(proc_w, "process", MessageKind::Command);
    assert!(
        proc_w
            .attr_i64("messaging.rabbitmq.message.delivery_tag")
            .is_some()
    );
    assert_eq!(
        proc_w.attr_str("messaging.destination.name"),
        Some(format!("{x}:cmd.writer.any:{}", bus.writer_q).as_str())
    );
    assert_eq!(
        proc_w.attr_str("messaging.destination.subscription.name"),
        None,
        "the queue is in the destination name"
    );
    assert_eq!(proc_w.attr_str("mindbus.settlement"), Some("acked"));
    assert!(
        spans.is_linked_to(proc_w, cmd_w),
        "CONSUMER links to its producer"
    );
    let llm = child(&spans, proc_w, "llm_call", "writer");
    assert_eq!(llm.kind, SpanKind::Internal);
    // A reply queue is anonymous: the conventions leave it out of the name.
    let res_w = child(&spans, proc_w, "publish", "writer");
    assert_eq!(
        res_w.attr_bool("messaging.destination.temporary"),
        Some(true)
    );
    assert_messaging(res_w, "publish", MessageKind::Result);
    let got_w = child(&spans, res_w, "process", "orchestrator");
    assert_messaging(got_w, "process", MessageKind::Result);

    // COMMAND -> critic (stream style): same shape, parented by the
    // in-flight table.
    let cmd_c = publishes[1];
    assert_eq!(cmd_c.attr_str("mindbus.action"), Some("review_article"));
    let proc_c = child(&spans, cmd_c, &process_critic, "critic");
    let res_c = child(&spans, proc_c, "publish", "critic");
    assert_eq!(res_c.attr_str("mindbus.rpc.parent"), Some("in_flight"));
    child(&spans, res_c, "process", "orchestrator");

    // EVENT.
    let ev = publishes[2];
    assert_messaging(ev, "publish", MessageKind::Event);
    assert_eq!(
        ev.attr_str("messaging.rabbitmq.destination.routing_key"),
        Some("evt.task.completed")
    );

    // No agent id or generated name in any span name; no errors.
    for s in spans.iter() {
        assert!(!s.name.contains("amq.gen"), "{}", s.name);
        assert!(!s.name.contains("agent."), "{}", s.name);
        assert_ne!(s.status.code, StatusCode::Error, "{}", s.name);
    }
    assert_eq!(spans.len(), 11, "\n{}", spans.render_all());
    println!("{}", spans.render_all());
}

/// A MindBus ERROR reply, published and processed successfully: the
/// conventions keep `error.type` for a failed operation (messaging-spans.md,
/// "Errors"), so it carries the code in `mindbus.error.code` only, and the
/// span status marks it (our deliberate difference: a failed task is red
/// in Jaeger). The 0.1 shapes (`legacy_shapes`) keep `error.type` = the
/// code and the `(temporary)` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_reply_over_http_protobuf() {
    for legacy in [false, true] {
        let (spans, bus, _) = scenario(Proto::Http, true, legacy).await;
        spans.assert_single_trace();
        let (publish, process) = if legacy {
            ("publish (temporary)", "process (temporary)")
        } else {
            ("publish", "process")
        };
        let error_type = legacy.then_some("DEADLINE_EXCEEDED");
        let err_pub = spans.one_where(
            |s| s.name == publish && s.service_name.as_deref() == Some("writer"),
            "the writer's ERROR publish",
        );
        assert_eq!(err_pub.status.code, StatusCode::Error);
        assert_eq!(
            err_pub.attr_str("error.type"),
            error_type,
            "legacy {legacy}"
        );
        assert_eq!(
            err_pub.attr_str("mindbus.error.code"),
            Some("DEADLINE_EXCEEDED")
        );
        let err_got = spans.one_where(
            |s| s.name == process && s.service_name.as_deref() == Some("orchestrator"),
            "the orchestrator's ERROR delivery",
        );
        assert_eq!(err_got.status.code, StatusCode::Error);
        assert_eq!(
            err_got.attr_str("error.type"),
            error_type,
            "legacy {legacy}"
        );
        assert_eq!(
            err_got.attr_str("mindbus.error.code"),
            Some("DEADLINE_EXCEEDED")
        );
        assert!(spans.is_parent_of(err_pub, err_got));

        // The COMMAND's destination: 0.1's exchange and queue, or the
        // conventions' `{exchange}:{routing key}[:{queue}]`.
        let x = &bus.exchange;
        let (sent, got, sent_dest, got_dest, subscription) = if legacy {
            (
                format!("publish {x}"),
                format!("process {}", bus.writer_q),
                x.clone(),
                x.clone(),
                Some(bus.writer_q.as_str()),
            )
        } else {
            (
                format!("publish {x}:cmd.writer.*"),
                format!("process {x}:cmd.writer.*:{}", bus.writer_q),
                format!("{x}:cmd.writer.any"),
                format!("{x}:cmd.writer.any:{}", bus.writer_q),
                None,
            )
        };
        let sent = spans.one_where(
            |s| {
                s.name == sent
                    && s.attr_str("messaging.rabbitmq.destination.routing_key")
                        == Some("cmd.writer.any")
            },
            "the COMMAND's publish",
        );
        let got = spans.one(&got);
        assert_eq!(
            (
                sent.attr_str("messaging.destination.name"),
                got.attr_str("messaging.destination.name"),
                got.attr_str("messaging.destination.subscription.name"),
            ),
            (
                Some(sent_dest.as_str()),
                Some(got_dest.as_str()),
                subscription
            ),
            "legacy {legacy}"
        );
        assert_eq!(
            sent.attr_str("messaging.destination.template").is_some(),
            !legacy
        );
    }
}

/// `settle_spans(true)`: each ack, nack or reject call is a CLIENT settle
/// span (messaging-spans.md, operation type `settle`; rabbitmq.md, Settle
/// span), a child of its delivery's `process` span and within it; a
/// dropped delivery, settled later by tag on the channel, has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_spans_when_asked() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("consumer", &rx, Proto::Grpc);
    let spans_i = MessagingSpans::default()
        .with_tracer_provider(&p)
        .settle_spans(true);
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let q = declare_queue(&raw, &unique("spans.settles"), FieldTable::default()).await;
    let q_handler = declare_queue(&raw, &unique("spans.settles.h"), FieldTable::default()).await;
    let ch = traced(conn.create_channel().await.unwrap(), "agent.test", &spans_i);
    for (queue, body) in [
        (&q, "ack"),
        (&q, "nack"),
        (&q, "reject"),
        (&q, "drop"),
        (&q_handler, "ok"),
    ] {
        raw.basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut consumer = consume_stream(&ch, q.as_str()).await;
    let mut next = async || consumer.next().await.unwrap().unwrap();
    next().await.ack(BasicAckOptions::default()).await.unwrap();
    let nack = BasicNackOptions {
        requeue: false,
        ..Default::default()
    };
    next().await.nack(nack).await.unwrap();
    let reject = BasicRejectOptions { requeue: false };
    next().await.reject(reject).await.unwrap();
    let dropped = next().await;
    let tag = dropped.delivery_tag;
    drop(dropped);
    ch.basic_ack(tag, BasicAckOptions::default()).await.unwrap();
    let handle = ch
        .consume_with(
            q_handler.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            |_| async { Ok::<(), &str>(()) },
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || handle.stats().acked() == 1).await);
    handle.cancel().await.unwrap();

    flush(&[&p]).await;
    let spans = rx.wait_for_spans(9, Duration::from_secs(10)).await;
    assert_eq!(
        spans.len(),
        9,
        "5 process + 4 settle\n{}",
        spans.render_all()
    );
    for (operation, queue, settlement) in [
        ("ack", &q, "acked"),
        ("nack", &q, "nacked"),
        ("reject", &q, "rejected"),
        ("ack", &q_handler, "acked"),
    ] {
        let process = spans.one_where(
            |s| {
                s.name == format!("process {queue}")
                    && s.attr_str("mindbus.settlement") == Some(settlement)
            },
            settlement,
        );
        let settle = spans.one_where(|s| s.name == format!("{operation} {queue}"), operation);
        assert_eq!(settle.kind, SpanKind::Client);
        assert_eq!(settle.attr_str("messaging.operation.type"), Some("settle"));
        assert_eq!(settle.attr_str("messaging.operation.name"), Some(operation));
        assert_eq!(
            settle.attr_str("messaging.destination.name"),
            Some(queue.as_str())
        );
        assert!(spans.is_parent_of(process, settle), "{operation} {queue}");
        assert!(
            process.start_unix_nanos <= settle.start_unix_nanos
                && settle.end_unix_nanos <= process.end_unix_nanos,
            "{operation} {queue}: the call is within the processing"
        );
    }
    // Dropped before the channel-level ack: it ended unsettled then.
    let unsettled = spans.one_where(
        |s| s.attr_str("mindbus.settlement") == Some("unsettled"),
        "the dropped delivery",
    );
    assert!(spans.children_of(unsettled).is_empty());

    for queue in [&q, &q_handler] {
        delete_queue(&raw, queue.as_str()).await;
    }
    close(&conn).await;
    shutdown(vec![p]).await;
}

/// Settlement statuses, each span counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_statuses_and_no_span_left_open() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("consumer", &rx, Proto::Grpc);
    let spans_i = MessagingSpans::default().with_tracer_provider(&p);
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let q_stream = declare_queue(&raw, &unique("spans.settle"), FieldTable::default()).await;
    let q_handler = declare_queue(&raw, &unique("spans.panic"), FieldTable::default()).await;
    let ch = traced(conn.create_channel().await.unwrap(), "agent.test", &spans_i);
    for (i, body) in ["ack", "nack", "reject", "drop"].iter().enumerate() {
        let b = event("event", "src", &format!("m{i}"), json!({"n": body}));
        raw.basic_publish(
            "".into(),
            q_stream.clone(),
            BasicPublishOptions::default(),
            &b,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut consumer = consume_stream(&ch, q_stream.as_str()).await;
    let mut next = async || consumer.next().await.unwrap().unwrap();
    next().await.ack(BasicAckOptions::default()).await.unwrap();
    next()
        .await
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // The requeued one comes back first or later: settle whatever arrives.
    let mut seen = 0;
    let mut dropped_tag = None;
    while seen < 3 {
        let d = next().await;
        let n = serde_json::from_slice::<Value>(&d.data).unwrap()["data"]["n"]
            .as_str()
            .unwrap()
            .to_owned();
        match n.as_str() {
            "nack" => d.ack(BasicAckOptions::default()).await.map(|_| ()).unwrap(),
            "reject" => d
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map(|_| ())
                .unwrap(),
            "drop" => {
                dropped_tag = Some(d.delivery_tag);
                drop(d);
            }
            other => panic!("unexpected {other}"),
        }
        seen += 1;
    }
    ch.basic_ack(dropped_tag.unwrap(), BasicAckOptions::default())
        .await
        .unwrap();

    let handle = ch
        .consume_with(
            q_handler.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            |d| async move {
                if d.data.starts_with(b"panic") {
                    panic!("boom");
                }
                Err::<(), _>("refused")
            },
        )
        .await
        .unwrap();
    for body in [&b"panic"[..], b"error"] {
        raw.basic_publish(
            "".into(),
            q_handler.clone(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || handle.stats().nacked() == 2).await);
    handle.cancel().await.unwrap();
    flush(&[&p]).await;
    let started = spans_i.stats().started();
    assert_eq!(started, spans_i.stats().ended());
    let spans = rx
        .wait_for_spans(started as usize, Duration::from_secs(10))
        .await;
    assert_eq!(spans.len() as u64, started, "{}", spans.render_all());
    assert_eq!(
        started, 7,
        "5 stream deliveries (one requeued) + 2 handler deliveries"
    );

    let by = |settlement: &str| -> Vec<&ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.attr_str("mindbus.settlement") == Some(settlement))
            .collect()
    };
    let acked = by("acked");
    assert_eq!(acked.len(), 2);
    assert!(acked.iter().all(|s| s.status.code != StatusCode::Error));
    let nacked = by("nacked");
    assert_eq!(
        nacked.len(),
        3,
        "one stream nack + handler error + handler panic"
    );
    let stream_nack = nacked
        .iter()
        .find(|s| s.attr_bool("mindbus.settlement.requeue") == Some(true))
        .unwrap();
    assert_eq!(stream_nack.attr_str("error.type"), Some("nack"));
    assert_eq!(stream_nack.status.code, StatusCode::Error);
    let handler_err = nacked
        .iter()
        .find(|s| s.attr_str("error.type") == Some("handler_error"))
        .unwrap();
    let ev = handler_err.event("exception").unwrap();
    assert_eq!(
        ev.attr("exception.message").and_then(|v| v.as_str()),
        Some("refused")
    );
    let panicked = nacked
        .iter()
        .find(|s| s.attr_str("error.type") == Some("panic"))
        .unwrap();
    assert_eq!(
        panicked
            .event("exception")
            .unwrap()
            .attr("exception.message")
            .and_then(|v| v.as_str()),
        Some("boom")
    );
    let rejected = by("rejected");
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].attr_str("error.type"), Some("reject"));
    assert_eq!(
        rejected[0].attr_bool("mindbus.settlement.requeue"),
        Some(false)
    );
    let unsettled = by("unsettled");
    assert_eq!(unsettled.len(), 1);
    assert_eq!(unsettled[0].attr_str("error.type"), Some("unsettled"));
    assert_eq!(unsettled[0].status.code, StatusCode::Error);

    delete_queue(&raw, q_stream.as_str()).await;
    delete_queue(&raw, q_handler.as_str()).await;
    close(&conn).await;
    shutdown(vec![p]).await;
}

async fn single_delivery(
    conn: &Connection,
    spans_i: &MessagingSpans,
    headers: Option<FieldTable>,
    body: &[u8],
) {
    let raw = conn.create_channel().await.unwrap();
    let q = declare_queue(&raw, &unique("spans.one"), FieldTable::default()).await;
    let mut props = BasicProperties::default();
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    raw.basic_publish(
        "".into(),
        q.clone(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let ch = traced(conn.create_channel().await.unwrap(), "agent.x", spans_i);
    let mut consumer = consume_stream(&ch, q.as_str()).await;
    let d = consumer.next().await.unwrap().unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    delete_queue(&raw, q.as_str()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_only_context_and_link_only_events() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("agent", &rx, Proto::Grpc);
    let spans_i = MessagingSpans::default()
        .with_tracer_provider(&p)
        .link_only(MessageKind::Event);
    let conn = connect().await;

    // A Python agent's COMMAND: trace context only in the CloudEvents body.
    let sc = span_context();
    let body = serde_json::to_vec(&json!({
        "specversion": "1.0", "type": "ai.team.command", "source": "py", "id": "p1",
        "traceparent": format!("00-{}-{}-01", sc.trace_id(), sc.span_id()),
        "data": {"action": "generate_article"}
    }))
    .unwrap();
    single_delivery(&conn, &spans_i, None, &body).await;

    // An EVENT with the context in headers, under the link-only policy.
    let ev_sc = span_context();
    let mut h = FieldTable::default();
    h.insert(
        "traceparent".into(),
        long(format!("00-{}-{}-01", ev_sc.trace_id(), ev_sc.span_id())),
    );
    let body = serde_json::to_vec(
        &json!({"specversion": "1.0", "type": "ai.team.event", "source": "o", "id": "e1"}),
    )
    .unwrap();
    single_delivery(&conn, &spans_i, Some(h), &body).await;

    flush(&[&p]).await;
    let spans = rx.wait_for_spans(2, Duration::from_secs(10)).await;
    spans.assert_len(2);
    let cmd = spans.one_where(
        |s| s.attr_str("mindbus.message.kind") == Some("command"),
        "command",
    );
    assert_eq!(cmd.trace_id, sc.trace_id());
    assert_eq!(cmd.parent_span_id, Some(sc.span_id()));
    assert_eq!(cmd.links.len(), 1);
    assert_eq!(cmd.links[0].span_id, sc.span_id());
    // Parent and link at once: the link says so, or Jaeger shows the
    // reference as FOLLOWS_FROM and leaves the agent off the critical path.
    let ref_type = cmd.links[0].attr("opentracing.ref_type");
    assert_eq!(ref_type.and_then(|v| v.as_str()), Some("child_of"));

    let ev = spans.one_where(
        |s| s.attr_str("mindbus.message.kind") == Some("event"),
        "event",
    );
    assert_ne!(ev.trace_id, ev_sc.trace_id(), "link-only: a new trace");
    assert_eq!(ev.parent_span_id, None);
    assert_eq!(ev.links.len(), 1);
    assert_eq!(ev.links[0].trace_id, ev_sc.trace_id());
    assert_eq!(ev.links[0].span_id, ev_sc.span_id());
    assert!(
        ev.links[0].attr("opentracing.ref_type").is_none(),
        "a link only"
    );
    close(&conn).await;
    shutdown(vec![p]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_nack_unroutable_and_basic_get_receive() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("publisher", &rx, Proto::Grpc);
    let spans_i = MessagingSpans::default().with_tracer_provider(&p);
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();

    // A queue that refuses publishes when full: the broker nacks.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert("x-overflow".into(), long("reject-publish"));
    let full = declare_queue(&raw, &unique("spans.full"), args).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let t = traced(ch, "agent.p", &spans_i);
    let conf = t
        .basic_publish(
            "".into(),
            full.clone(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(conf.is_nack());
    // Mandatory and unroutable: returned, then acked.
    let exchange = unique("spans.nowhere");
    declare_exchange(&raw, &exchange, ExchangeKind::Direct).await;
    let conf = t
        .basic_publish(
            exchange.as_str().into(),
            "nobody".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(conf.is_ack() && conf.take_message().is_some());

    // basic_get inside the caller's span (semconv: a pull is a CLIENT
    // `receive` span over the call, a child of the caller's span, even
    // when it fetches nothing; the processing is a CONSUMER `process`
    // span, a child of the receive): first on the empty queue, then once
    // the broker holds the message.
    let q = declare_queue(&raw, &unique("spans.get"), FieldTable::default()).await;
    let poll = p.tracer("publisher").start("poll");
    let poll_cx = Context::new().with_span(poll);
    let nothing = t
        .basic_get(q.clone(), Default::default())
        .with_context(poll_cx.clone())
        .await
        .unwrap();
    assert!(nothing.is_none());
    let sc = span_context();
    let mut h = FieldTable::default();
    h.insert(
        "traceparent".into(),
        long(format!("00-{}-{}-01", sc.trace_id(), sc.span_id())),
    );
    raw.basic_publish(
        "".into(),
        q.clone(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default().with_headers(h),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for _ in 0..250 {
        if message_count(&raw, q.as_str()).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = t
        .basic_get(q.clone(), Default::default())
        .with_context(poll_cx.clone())
        .await
        .unwrap()
        .expect("the message is ready");
    got.ack(BasicAckOptions::default()).await.unwrap();
    poll_cx.span().end();

    flush(&[&p]).await;
    let spans = rx.wait_for_spans(6, Duration::from_secs(10)).await;
    spans.assert_len(6);
    let nacked = spans.one(&format!("publish {full}"));
    assert_eq!(nacked.status.code, StatusCode::Error);
    assert_eq!(nacked.attr_str("error.type"), Some("nack"));
    assert_eq!(nacked.attr_str("mindbus.publish.confirm"), Some("nack"));
    let unroutable = spans.one(&format!("publish {exchange}"));
    assert_eq!(unroutable.attr_str("error.type"), Some("unroutable"));
    let poll = spans.one("poll");
    let receive_q = format!("receive {q}");
    let receives: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == receive_q).collect();
    assert_eq!(receives.len(), 2, "\n{}", spans.render_all());
    for receive in &receives {
        assert_eq!(receive.kind, SpanKind::Client);
        assert_eq!(
            receive.attr_str("messaging.operation.type"),
            Some("receive")
        );
        assert!(
            spans.is_parent_of(poll, receive),
            "receive is a child of the caller's span"
        );
    }
    let (empty, receive) = match receives[0].attr_i64("messaging.batch.message_count") {
        Some(_) => (receives[0], receives[1]),
        None => (receives[1], receives[0]),
    };
    assert_eq!(empty.attr_i64("messaging.batch.message_count"), Some(0));
    assert!(empty.links.is_empty());
    assert_eq!(receive.attr_i64("messaging.batch.message_count"), None);
    assert_eq!(
        receive.links[0].span_id,
        sc.span_id(),
        "the receive links to the producer"
    );
    let process = spans.one(&format!("process {q}"));
    assert_eq!(process.kind, SpanKind::Consumer);
    assert!(
        spans.is_parent_of(receive, process),
        "the processing is a child of the receive"
    );
    assert_eq!(
        process.links[0].span_id,
        sc.span_id(),
        "and links to it too"
    );
    assert_eq!(process.attr_str("mindbus.settlement"), Some("acked"));
    assert!(
        receive.end_unix_nanos <= process.start_unix_nanos,
        "the receive covers the call only"
    );

    for q in [&full, &q] {
        delete_queue(&raw, q.as_str()).await;
    }
    delete_exchange(&raw, &exchange).await;
    close(&conn).await;
    shutdown(vec![p]).await;
}

/// Two interceptors of one built-in type would overwrite each other's
/// per-message state: the builder refuses such a chain, `try_build` with an
/// error, `build` with a panic naming the type, before any message flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_with_a_built_in_interceptor_twice_is_refused() {
    let conn = connect().await;
    let builder = |ch| {
        TracedChannel::builder(ch)
            .with(TraceContext::default())
            .with(MessagingSpans::default())
            .with(MessagingSpans::default())
    };
    let Err(err) = builder(conn.create_channel().await.unwrap()).try_build() else {
        panic!("a chain with MessagingSpans twice was built");
    };
    assert!(
        err.to_string().contains("holds MessagingSpans twice"),
        "{err}"
    );
    let ch = conn.create_channel().await.unwrap();
    let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder(ch).build()))
    else {
        panic!("build() accepted MessagingSpans twice");
    };
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("holds MessagingSpans twice"), "{text}");
    close(&conn).await;
}
