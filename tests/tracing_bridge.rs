//! With a `tracing-opentelemetry` layer installed, `tracing` spans and
//! events created inside a message handler join the CONSUMER span's trace.
//! Its own test binary: it installs the global `tracing` subscriber.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/otel.rs"]
mod otel;

use common::*;
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::opentelemetry::trace::TracerProvider as _;
use mindbus_otel::{MessagingSpans, TraceContext, TracedChannel};
use mindbus_otel_testkit::OtlpReceiver;
use opentelemetry::trace::SpanKind;
use otel::{Proto, flush, provider, shutdown};
use std::time::Duration;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_spans_and_events_in_a_handler_join_the_consumer_span() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("writer", &rx, Proto::Grpc);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(p.tracer("writer-app")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let q = declare_queue(&raw, &unique("tracing.bridge"), FieldTable::default()).await;
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(TraceContext::default())
        .with(MessagingSpans::default().with_tracer_provider(&p))
        .build();
    let handle = ch
        .consume_with(
            q.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            |_d| async {
                async {
                    tracing::info!(words = 2047, "article drafted");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    tracing::info_span!("save_artifact").in_scope(|| {
                        tracing::warn!("slow disk");
                    });
                }
                .instrument(tracing::info_span!("draft_article"))
                .await;
                Ok::<(), String>(())
            },
        )
        .await
        .unwrap();
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
        br#"{"specversion":"1.0","type":"ai.team.command","source":"o","id":"1","data":{"action":"a"}}"#,
        BasicProperties::default().with_headers(h),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || handle.stats().acked() == 1).await);
    handle.cancel().await.unwrap();
    flush(&[&p]).await;
    let spans = rx.wait_for_spans(3, Duration::from_secs(10)).await;
    spans.assert_len(3);
    assert_eq!(spans.assert_single_trace(), sc.trace_id());
    let consumer = spans.one(&format!("process {q}"));
    assert_eq!(consumer.kind, SpanKind::Consumer);
    let draft = spans.one("draft_article");
    assert!(
        spans.is_parent_of(consumer, draft),
        "\n{}",
        spans.render_all()
    );
    assert!(draft.has_event("article drafted"), "{:?}", draft.events);
    let save = spans.one("save_artifact");
    assert!(spans.is_parent_of(draft, save));
    assert!(save.has_event("slow disk"));
    println!("{}", spans.render_all());
    delete_queue(&raw, q.as_str()).await;
    close(&conn).await;
    shutdown(vec![p]).await;
}
