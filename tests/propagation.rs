//! W3C trace context across the real broker: publish -> consume (both
//! styles) and publish -> basic_get; header types written by other clients;
//! the CloudEvents fallback; precedence of headers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, ByteArray, FieldTable};
use mindbus_otel::opentelemetry::baggage::BaggageExt;
use mindbus_otel::opentelemetry::context::FutureExt as _;
use mindbus_otel::opentelemetry::trace::{SpanContext, TraceContextExt};
use mindbus_otel::opentelemetry::{Context, KeyValue};
use mindbus_otel::{TraceContext, TracedChannel};
use std::time::Duration;
use tokio::sync::mpsc;

fn producer_context(sc: &SpanContext) -> Context {
    Context::new()
        .with_remote_span_context(sc.clone())
        .with_baggage([
            KeyValue::new("user.id", "alice"),
            KeyValue::new("task", "t 555"),
        ])
}

fn assert_child_of(cx: &Context, sc: &SpanContext) {
    let span = cx.span();
    let got = span.span_context();
    assert!(got.is_valid(), "no parent extracted");
    assert!(got.is_remote(), "parent must be marked remote");
    assert_eq!(got.trace_id(), sc.trace_id());
    assert_eq!(got.span_id(), sc.span_id());
    assert!(got.is_sampled());
    assert_eq!(got.trace_state().get("mindbus"), Some("t1"));
    assert_eq!(
        cx.baggage().get("user.id").map(|v| v.as_str().to_owned()),
        Some("alice".to_owned())
    );
    assert_eq!(
        cx.baggage().get("task").map(|v| v.as_str().to_owned()),
        Some("t 555".to_owned())
    );
}

async fn publish_in(ch: &TracedChannel, queue: &str, cx: Context, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .with_context(cx)
    .await
    .expect("publish")
    .await
    .expect("confirm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_consumer_gets_producer_as_remote_parent() {
    let conn = connect().await;
    let ch = TracedChannel::new(conn.create_channel().await.unwrap());
    let queue = declare_queue(&ch, &unique("prop.stream"), FieldTable::default()).await;
    let sc = span_context();
    publish_in(&ch, queue.as_str(), producer_context(&sc), b"{}").await;

    let mut consumer = consume_stream(&ch, queue.as_str()).await;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("delivery in time")
        .expect("stream open")
        .expect("delivery");
    assert_child_of(delivery.context(), &sc);
    // The headers on the wire are W3C LongStrings.
    let headers = delivery.properties.headers().clone().expect("headers");
    let tp = headers
        .inner()
        .get("traceparent")
        .expect("traceparent header");
    assert!(matches!(tp, AMQPValue::LongString(_)), "{tp:?}");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    delete_queue(&ch, queue.as_str()).await;
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_runs_inside_the_extracted_context_across_awaits() {
    let conn = connect().await;
    let ch = TracedChannel::new(conn.create_channel().await.unwrap());
    let queue = declare_queue(&ch, &unique("prop.handler"), FieldTable::default()).await;
    let sc = span_context();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = ch
        .consume_with(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |_delivery| {
                let tx = tx.clone();
                let sync_part = Context::current();
                async move {
                    assert_eq!(
                        sync_part.span().span_context(),
                        Context::current().span().span_context()
                    );
                    let before = Context::current();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    tokio::task::yield_now().await;
                    let after = Context::current();
                    tx.send((before, after)).unwrap();
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();
    publish_in(
        &ch,
        queue.as_str(),
        producer_context(&sc),
        b"not json at all",
    )
    .await;
    let (before, after) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("handled in time")
        .unwrap();
    assert_child_of(&before, &sc);
    assert_child_of(&after, &sc);
    assert!(eventually(Duration::from_secs(5), || handle.stats().acked() == 1).await);
    handle.cancel().await.unwrap();
    delete_queue(&ch, queue.as_str()).await;
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_extracts_too() {
    let conn = connect().await;
    let ch = TracedChannel::new(conn.create_channel().await.unwrap());
    let queue = declare_queue(&ch, &unique("prop.get"), FieldTable::default()).await;
    let sc = span_context();
    publish_in(&ch, queue.as_str(), producer_context(&sc), b"{}").await;
    let mut got = None;
    for _ in 0..100 {
        got = ch
            .basic_get(queue.clone(), BasicGetOptions::default())
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msg = got.expect("message");
    assert_eq!(msg.message_count, 0);
    assert_child_of(msg.context(), &sc);
    msg.ack(BasicAckOptions::default()).await.unwrap();
    delete_queue(&ch, queue.as_str()).await;
    close(&conn).await;
}

/// Publishes with raw lapin (as another client would) and returns the
/// context the traced consumer extracted, plus the interceptor's stats.
async fn extract_raw(headers: Option<FieldTable>, body: &[u8]) -> (Context, TraceContext) {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let tc = TraceContext::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(tc.clone())
        .build();
    let queue = declare_queue(&raw, &unique("prop.raw"), FieldTable::default()).await;
    let mut props = BasicProperties::default();
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    raw.basic_publish(
        "".into(),
        queue.clone(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut consumer = consume_stream(&ch, queue.as_str()).await;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("in time")
        .unwrap()
        .unwrap();
    let cx = delivery.context().clone();
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
    (cx, tc)
}

fn tp(sc: &SpanContext) -> String {
    format!("00-{}-{}-01", sc.trace_id(), sc.span_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_string_and_byte_array_headers_from_other_clients() {
    // ShortString ('s') cannot travel through RabbitMQ (it closes the
    // connection); it is covered on a FieldTable in the unit tests.
    for as_bytes in [false, true] {
        let sc = span_context();
        let mut h = FieldTable::default();
        let v = tp(&sc);
        h.insert(
            "traceparent".into(),
            if as_bytes {
                AMQPValue::ByteArray(ByteArray::from(v.into_bytes()))
            } else {
                long(v)
            },
        );
        let (cx, tc) = extract_raw(Some(h), b"").await;
        assert_eq!(
            cx.span().span_context().trace_id(),
            sc.trace_id(),
            "bytes={as_bytes}"
        );
        assert_eq!(cx.span().span_context().span_id(), sc.span_id());
        assert_eq!(tc.stats().extracted_from_headers(), 1);
        assert_eq!(tc.stats().rejected_total(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_level2_flags_are_accepted() {
    let sc = span_context();
    let mut h = FieldTable::default();
    h.insert(
        "traceparent".into(),
        long(format!("00-{}-{}-03", sc.trace_id(), sc.span_id())),
    );
    let (cx, _) = extract_raw(Some(h), b"").await;
    assert!(cx.span().span_context().is_sampled());
    assert_eq!(cx.span().span_context().span_id(), sc.span_id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_body_fallback_and_header_precedence() {
    // Only in the body, as existing Python agents send it.
    let body_sc = span_context();
    let body = format!(
        r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"1",
            "traceparent":"{}","tracestate":"mindbus=t1","data":{{"action":"generate_article"}}}}"#,
        tp(&body_sc)
    );
    let (cx, tc) = extract_raw(None, body.as_bytes()).await;
    let span = cx.span();
    assert_eq!(span.span_context().trace_id(), body_sc.trace_id());
    assert_eq!(span.span_context().span_id(), body_sc.span_id());
    assert!(span.span_context().is_remote());
    assert_eq!(span.span_context().trace_state().get("mindbus"), Some("t1"));
    assert_eq!(tc.stats().extracted_from_body(), 1);
    assert_eq!(tc.stats().extracted_from_headers(), 0);

    // Both present: the headers win.
    let header_sc = span_context();
    let mut h = FieldTable::default();
    h.insert("traceparent".into(), long(tp(&header_sc)));
    let (cx, tc) = extract_raw(Some(h), body.as_bytes()).await;
    assert_eq!(cx.span().span_context().trace_id(), header_sc.trace_id());
    assert_eq!(tc.stats().extracted_from_headers(), 1);
    assert_eq!(tc.stats().extracted_from_body(), 0);

    // A malformed header falls back to the body, and is counted.
    let mut h = FieldTable::default();
    h.insert("traceparent".into(), long("00-garbage"));
    let (cx, tc) = extract_raw(Some(h), body.as_bytes()).await;
    assert_eq!(cx.span().span_context().trace_id(), body_sc.trace_id());
    assert_eq!(
        tc.stats().rejected(mindbus_otel::RejectReason::Malformed),
        1
    );
    assert_eq!(tc.stats().extracted_from_body(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_global_propagator_is_needed_and_user_headers_survive() {
    // Nothing global is installed in this test binary: injection still works.
    let conn = connect().await;
    let ch = TracedChannel::new(conn.create_channel().await.unwrap());
    let queue = declare_queue(&ch, &unique("prop.headers"), FieldTable::default()).await;
    let mut user = FieldTable::default();
    user.insert("x-user".into(), long("kept"));
    user.insert("x-number".into(), AMQPValue::LongLongInt(42));
    user.insert("x-bool".into(), AMQPValue::Boolean(true));
    let props = BasicProperties::default()
        .with_headers(user.clone())
        .with_content_type("application/json".into())
        .with_priority(20)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_message_id("msg-1".into())
        .with_delivery_mode(2)
        .with_expiration("300000".into());
    let sc = span_context();
    ch.basic_publish(
        "".into(),
        queue.clone(),
        BasicPublishOptions::default(),
        b"{}",
        props.clone(),
    )
    .with_context(producer_context(&sc))
    .await
    .unwrap()
    .await
    .unwrap();
    let raw = conn.create_channel().await.unwrap();
    let mut got = None;
    for _ in 0..100 {
        got = raw
            .basic_get(queue.clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let msg = got.expect("message");
    let p = &msg.delivery.properties;
    assert_eq!(p.content_type(), props.content_type());
    assert_eq!(p.priority(), props.priority());
    assert_eq!(p.correlation_id(), props.correlation_id());
    assert_eq!(p.reply_to(), props.reply_to());
    assert_eq!(p.message_id(), props.message_id());
    assert_eq!(p.delivery_mode(), props.delivery_mode());
    assert_eq!(p.expiration(), props.expiration());
    let h = p.headers().clone().unwrap();
    for (k, v) in user.inner() {
        assert_eq!(h.inner().get(k), Some(v), "user header {k}");
    }
    assert_eq!(
        h.inner().get("traceparent"),
        Some(&long(tp(&sc))),
        "traceparent injected"
    );
    assert_eq!(h.inner().get("tracestate"), Some(&long("mindbus=t1")));
    assert!(h.inner().contains_key("baggage"));
    assert_eq!(h.inner().len(), user.inner().len() + 3);
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_empty_tracestate_or_baggage_headers() {
    let conn = connect().await;
    let ch = TracedChannel::new(conn.create_channel().await.unwrap());
    let queue = declare_queue(&ch, &unique("prop.empty"), FieldTable::default()).await;
    // A span context with no trace state and no baggage.
    let sc = span_context();
    let bare = mindbus_otel::opentelemetry::trace::SpanContext::new(
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags(),
        false,
        Default::default(),
    );
    publish_in(
        &ch,
        queue.as_str(),
        Context::new().with_remote_span_context(bare),
        b"",
    )
    .await;
    // And a publish outside any span: no trace headers at all.
    publish_in(&ch, queue.as_str(), Context::new(), b"").await;
    let raw = conn.create_channel().await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let Some(m) = raw
            .basic_get(queue.clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            seen.push(m.delivery.properties.headers().clone());
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let first = seen[0].clone().expect("headers on the traced publish");
    assert!(first.contains_key("traceparent"));
    assert!(!first.contains_key("tracestate"));
    assert!(!first.contains_key("baggage"));
    assert!(seen[1].is_none(), "no headers invented: {:?}", seen[1]);
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
}
