//! Exactly-once under chaos: 50,000 messages, one in ten hostile, consumed
//! through the full chain (TraceContext, MessagingSpans, AgentMetrics,
//! TaskMetrics) by a handler that, by a seeded PRNG, returns errors (~5%)
//! and panics (~2%). The queue dead-letters into a DLX queue. Every
//! sequence number is handled exactly once and is either acked or
//! dead-lettered, exactly once; the counters match the PRNG's decisions
//! exactly; the consumer never dies; every CONSUMER span ends, once per
//! message, with the status its outcome calls for.
//!
//! One test in this binary: it silences the panic hook for its own
//! deliberate panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, LongString};
use mindbus_otel::lapin::{BasicProperties, Channel};
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::trace::{SpanKind, Status, TraceId};
use mindbus_otel::{AgentMetrics, MessagingSpans, TaskMetrics, TraceContext, TracedChannel};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, Span, SpanData, SpanProcessor};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages published (override for a quick local run: `CHAOS_MESSAGES`).
const MESSAGES: u64 = 50_000;
/// The PRNG seed of the handler's decisions (override: `CHAOS_SEED`).
const DEFAULT_SEED: u64 = 0x6d69_6e64_6275_7321;
/// Hang guard (not a performance threshold).
const HANG_GUARD: Duration = Duration::from_secs(120);

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Ack,
    Error,
    Panic,
}

/// The handler's fate for `seq`: ~2% panic, ~5% error, the rest ack.
fn decide(seed: u64, seq: u64) -> Decision {
    match splitmix64(seed ^ splitmix64(seq)) % 1000 {
        0..20 => Decision::Panic,
        20..70 => Decision::Error,
        _ => Decision::Ack,
    }
}

fn trace_id(seq: u64) -> TraceId {
    TraceId::from(0xc4a0_5000_0000_0000_0000_0000_0000_0000u128 | u128::from(seq + 1))
}

fn traceparent(seq: u64) -> String {
    format!("00-{}-00f067aa0ba902b7-01", trace_id(seq))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

/// What is published for `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Command,
    Result,
    Error,
    Event,
    /// One of the hostile variants.
    Hostile(u8),
}

const HOSTILE_VARIANTS: u64 = 10;

/// One message in ten is hostile; the others cycle through the kinds.
fn kind(seq: u64) -> Kind {
    if seq % 10 == 9 {
        Kind::Hostile(((seq / 10) % HOSTILE_VARIANTS) as u8)
    } else {
        [Kind::Command, Kind::Result, Kind::Error, Kind::Event][(seq % 4) as usize]
    }
}

fn message(seq: u64) -> (Vec<u8>, BasicProperties) {
    let props = BasicProperties::default().with_message_id(seq.to_string().into());
    let valid = table(vec![("traceparent", long(traceparent(seq)))]);
    match kind(seq) {
        Kind::Command => (
            format!(r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator","id":"cmd-{seq}","data":{{"action":"generate_article","params":{{"topic":"t{seq}"}}}}}}"#).into_bytes(),
            props
                .with_headers(valid)
                .with_correlation_id(format!("c-{seq}").into())
                .with_reply_to("orchestrator.replies".into()),
        ),
        Kind::Result => (
            format!(r#"{{"specversion":"1.0","type":"ai.team.result","source":"agent.writer.00{}","id":"res-{seq}","data":{{"status":"SUCCESS","metrics":{{"model":"gpt-4o","tokens_used":120,"cost_usd":0.002,"latency_ms":900}},"output":{{"quality_score":8.0}}}}}}"#, seq % 3).into_bytes(),
            props
                .with_headers(valid)
                .with_correlation_id(format!("c-{seq}").into()),
        ),
        Kind::Error => (
            format!(r#"{{"specversion":"1.0","type":"ai.team.error","source":"agent.critic.001","id":"err-{seq}","data":{{"error":{{"code":"DEADLINE_EXCEEDED","message":"slow"}}}}}}"#).into_bytes(),
            props
                .with_headers(valid)
                .with_correlation_id(format!("c-{seq}").into()),
        ),
        Kind::Event => (
            format!(r#"{{"specversion":"1.0","type":"ai.team.event","source":"orchestrator","id":"evt-{seq}","data":{{"event":"progress"}}}}"#).into_bytes(),
            props.with_headers(valid),
        ),
        Kind::Hostile(0) => (
            b"{}".to_vec(),
            props.with_headers(table(vec![(
                "traceparent",
                long("00-not-a-trace-context-01"),
            )])),
        ),
        Kind::Hostile(1) => (
            b"plain text".to_vec(),
            props.with_headers(table(vec![("traceparent", long("0".repeat(64 * 1024)))])),
        ),
        Kind::Hostile(2) => (
            Vec::new(),
            props.with_headers(table(vec![("traceparent", AMQPValue::LongLongInt(42))])),
        ),
        Kind::Hostile(3) => (
            b"[1,2,3]".to_vec(),
            props.with_headers(table(vec![(
                "traceparent",
                AMQPValue::FieldTable(FieldTable::default()),
            )])),
        ),
        Kind::Hostile(4) => (
            vec![0xff, 0x00, 0xc3, 0x28],
            props.with_headers(table(vec![(
                "traceparent",
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00, 0x80])),
            )])),
        ),
        Kind::Hostile(5) => (b"<xml>not json</xml>".to_vec(), props),
        Kind::Hostile(6) => (
            br#"{"specversion":"1.0","type":"ai.team.error","data":{"error":{"code":"#.to_vec(),
            props.with_correlation_id(format!("c-{seq}").into()),
        ),
        Kind::Hostile(7) => (
            br#"{"specversion":"1.0","type":"ai.team.result","source":{"not":"a string"},"id":7,"data":{"metrics":{"model":["x"],"tokens_used":"lots","cost_usd":-5},"output":{"quality_score":99}}}"#.to_vec(),
            props.with_correlation_id(format!("c-{seq}").into()),
        ),
        Kind::Hostile(8) => {
            let mut t = FieldTable::default();
            for i in 0..300 {
                t.insert(format!("x-h{i}").into(), AMQPValue::LongInt(i));
            }
            t.insert("baggage".into(), long("=novalue,,;"));
            t.insert("tracestate".into(), long(format!("k={}", "v".repeat(8 * 1024))));
            (b"{\"data\":".to_vec(), props.with_headers(t))
        }
        Kind::Hostile(_) => (
            br#"{"specversion":"1.0","type":"ai.team.command","source":"py","id":"x","traceparent":"00-zz-zz-zz","data":{"action":"a"}}"#.to_vec(),
            props.with_reply_to("orchestrator.replies".into()),
        ),
    }
}

/// What the spans say about one message.
#[derive(Clone, Debug)]
struct SpanRecord {
    trace_id: TraceId,
    /// Every `error.type` attribute the span carries (an attribute key
    /// must appear once).
    error_types: Vec<String>,
    is_error: bool,
    count: u32,
}

/// A span processor that keeps only what the test checks, per message id,
/// of CONSUMER spans (and discards the spans).
#[derive(Debug, Default)]
struct Spans {
    consumer: Mutex<HashMap<u64, SpanRecord>>,
    other: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Spans>);

impl SpanProcessor for Recorder {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_kind != SpanKind::Consumer {
            self.0.other.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let attr = |key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.as_str().into_owned())
        };
        let Some(seq) = attr("messaging.message.id").and_then(|id| id.parse::<u64>().ok()) else {
            self.0.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let record = SpanRecord {
            trace_id: span.span_context.trace_id(),
            error_types: span
                .attributes
                .iter()
                .filter(|kv| kv.key.as_str() == "error.type")
                .map(|kv| kv.value.as_str().into_owned())
                .collect(),
            is_error: matches!(span.status, Status::Error { .. }),
            count: 1,
        };
        let mut map = self.0.consumer.lock().unwrap();
        map.entry(seq)
            .and_modify(|r| r.count += 1)
            .or_insert(record);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Our own deliberate panics are not printed (thousands of them).
fn quiet_chaos_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !text.starts_with("chaos: ") {
            default(info);
        }
    }));
}

async fn publish_all(ch: Channel, queue: String, n: u64) {
    let mut pending = Vec::with_capacity(512);
    for seq in 0..n {
        let (body, props) = message(seq);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == 512 {
            for c in pending.drain(..) {
                assert!(c.await.unwrap().is_ack());
            }
        }
    }
    for c in pending.drain(..) {
        assert!(c.await.unwrap().is_ack());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_messages_exactly_once_under_chaos() {
    quiet_chaos_panics();
    let total: u64 = std::env::var("CHAOS_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MESSAGES);
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let decisions: Vec<Decision> = (0..total).map(|seq| decide(seed, seq)).collect();
    let count = |d: Decision| decisions.iter().filter(|x| **x == d).count() as u64;
    let (to_ack, to_fail, to_panic) = (
        count(Decision::Ack),
        count(Decision::Error),
        count(Decision::Panic),
    );

    let recorder = Recorder::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::AlwaysOn)
        .with_span_processor(recorder.clone())
        .build();
    let spans = MessagingSpans::default().with_tracer_provider(&provider);
    let tasks = TaskMetrics::default();
    let propagation = TraceContext::default();

    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let dlq = declare_queue(&raw, &unique("chaos.dead"), FieldTable::default()).await;
    let queue = declare_queue(
        &raw,
        &unique("chaos.work"),
        table(vec![
            ("x-dead-letter-exchange", long("")),
            ("x-dead-letter-routing-key", long(dlq.as_str())),
        ]),
    )
    .await;
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .agent("agent.chaos.001")
        .with(propagation.clone())
        .with(spans.clone())
        .with(AgentMetrics::default())
        .with(tasks.clone())
        .build();
    ch.basic_qos(200, BasicQosOptions::default()).await.unwrap();

    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Everything is published first (pipelined, confirms awaited by 512),
    // then consumed: on two cores that is faster than both at once.
    let started = Instant::now();
    tokio::time::timeout(HANG_GUARD, publish_all(pub_ch, queue.to_string(), total))
        .await
        .expect("hang guard: publishing");
    let published_in = started.elapsed();
    // Times each sequence number reached the handler.
    let handled: Arc<Vec<AtomicU8>> = Arc::new((0..total).map(|_| AtomicU8::new(0)).collect());
    let h = handled.clone();
    let handle = ch
        .consume_with(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let h = h.clone();
                async move {
                    let seq: u64 = d
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| id.as_str().parse().ok())
                        .expect("every message has its sequence number");
                    h[seq as usize].fetch_add(1, Ordering::Relaxed);
                    match decide(seed, seq) {
                        Decision::Ack => Ok(()),
                        Decision::Error => Err(format!("chaos error {seq}")),
                        Decision::Panic => panic!("chaos: {seq}"),
                    }
                }
            },
        )
        .await
        .unwrap();

    let stats = handle.stats().clone();
    let settled = eventually(HANG_GUARD, || {
        stats.acked() + stats.nacked() >= total || handle.is_finished()
    })
    .await;
    assert!(!handle.is_finished(), "the consumer died ({stats:?})");
    assert!(
        settled,
        "settled {} + {} of {total} ({stats:?})",
        stats.acked(),
        stats.nacked()
    );
    let consumed_in = started.elapsed() - published_in;

    // The dead letters: exactly the failed ones, each once.
    let expected_dead = to_fail + to_panic;
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            message_count(&raw, dlq.as_str()).await as u64 >= expected_dead
        })
        .await,
        "dead letters: {} of {expected_dead}",
        message_count(&raw, dlq.as_str()).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        message_count(&raw, dlq.as_str()).await as u64,
        expected_dead
    );
    let mut dead_consumer = raw
        .basic_consume(
            dlq.clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dead: HashSet<u64> = HashSet::new();
    while (dead.len() as u64) < expected_dead {
        let d = tokio::time::timeout(Duration::from_secs(30), dead_consumer.next())
            .await
            .expect("hang guard: reading the dead letters")
            .unwrap()
            .unwrap();
        let seq: u64 = d
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert!(dead.insert(seq), "message {seq} dead-lettered twice");
    }
    raw.basic_cancel(dead_consumer.tag(), Default::default())
        .await
        .unwrap();

    // Nothing lost, nothing duplicated, outcomes as decided.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.is_finished(), "the consumer is still running");
    assert_eq!(stats.delivered(), total);
    assert_eq!(stats.acked(), to_ack);
    assert_eq!(stats.nacked(), to_fail + to_panic);
    assert_eq!(stats.handler_errors(), to_fail);
    assert_eq!(stats.panics(), to_panic);
    assert_eq!(stats.settle_errors(), 0);
    for seq in 0..total {
        let times = handled[seq as usize].load(Ordering::Relaxed);
        assert_eq!(
            times,
            1,
            "message {seq} ({:?}) handled {times} times",
            kind(seq)
        );
        let decision = decisions[seq as usize];
        assert_eq!(
            dead.contains(&seq),
            decision != Decision::Ack,
            "message {seq}: {decision:?}"
        );
    }
    assert_eq!(message_count(&raw, queue.as_str()).await, 0);
    assert_eq!(message_count(&raw, dlq.as_str()).await, 0);

    // One CONSUMER span per message, with the status its outcome calls for.
    assert_eq!(spans.stats().started(), total);
    assert_eq!(spans.stats().ended(), total);
    assert_eq!(spans.in_flight(), 0, "in-flight COMMAND table");
    assert_eq!(tasks.pending(), 0);
    let recorded = recorder.0.consumer.lock().unwrap().clone();
    assert_eq!(recorded.len() as u64, total);
    for seq in 0..total {
        let r = &recorded[&seq];
        let k = kind(seq);
        assert_eq!(r.count, 1, "message {seq}: {} spans", r.count);
        let expected = match (decisions[seq as usize], k) {
            (Decision::Panic, _) => Some("panic"),
            (Decision::Error, _) => Some("handler_error"),
            // A MindBus ERROR processed successfully: error status, but no
            // error.type (the conventions keep it for failed operations;
            // the code is in mindbus.error.code).
            (Decision::Ack, Kind::Error) => None,
            (Decision::Ack, Kind::Hostile(_)) => None,
            (Decision::Ack, _) => None,
        };
        match (expected, k) {
            // A hostile message's own content may set a status: only the
            // handler's outcomes are checked on it.
            (None, Kind::Hostile(_)) => assert!(
                r.error_types.len() <= 1
                    && !r
                        .error_types
                        .iter()
                        .any(|t| t == "panic" || t == "handler_error"),
                "message {seq} ({k:?}): {r:?}"
            ),
            (None, Kind::Error) => assert!(
                r.is_error && r.error_types.is_empty(),
                "message {seq} ({k:?}): {r:?}"
            ),
            (None, _) => assert!(
                !r.is_error && r.error_types.is_empty(),
                "message {seq} ({k:?}): {r:?}"
            ),
            (Some(t), _) => {
                assert!(r.is_error, "message {seq} ({k:?}): {r:?}");
                assert_eq!(
                    r.error_types,
                    [t],
                    "message {seq} ({k:?}): one error.type, the outcome's"
                );
            }
        }
        if !matches!(k, Kind::Hostile(_)) {
            assert_eq!(r.trace_id, trace_id(seq), "message {seq} joined its trace");
        }
    }
    let hostile = (0..total)
        .filter(|s| matches!(kind(*s), Kind::Hostile(_)))
        .count() as u64;
    let valid_parents =
        propagation.stats().extracted_from_headers() + propagation.stats().extracted_from_body();
    assert!(
        valid_parents >= total - hostile,
        "{valid_parents} parents extracted"
    );
    assert!(propagation.stats().rejected_total() > 0);

    eprintln!(
        "chaos: seed {seed:#x}; {total} messages ({hostile} hostile); acked {to_ack}, errors {to_fail}, \
         panics {to_panic}, dead-lettered {}; published in {published_in:?}, consumed in {consumed_in:?}",
        dead.len()
    );
    handle.cancel().await.unwrap();
    delete_queue(&raw, queue.as_str()).await;
    delete_queue(&raw, dlq.as_str()).await;
    close(&conn).await;
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

/// Polls an async condition until it holds or `timeout` passes.
async fn eventually_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
