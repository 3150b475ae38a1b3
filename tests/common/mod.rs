//! Helpers shared by the end-to-end tests: a real broker connection, unique
//! names, queues that clean themselves up, and a recording interceptor.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_otel::lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mindbus_otel::lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use mindbus_otel::opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use mindbus_otel::{
    ConsumerHandle, Interceptor, MessageKind, MessageState, Outcome, Settlement, TracedChannel,
    TracedConsumer,
};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The broker the tests talk to (only ever 127.0.0.1).
pub fn url() -> String {
    std::env::var("MINDBUS_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The one line a test fails with when the broker does not answer: what is
/// missing and the command that starts it (the same words as `.ci/deps.sh`),
/// instead of a stack of lapin errors. The URL is shown without credentials.
pub fn broker_down(url: &str, err: &dyn std::fmt::Display) -> String {
    let host = url.split_once("://").map_or(url, |(_, rest)| {
        rest.rsplit_once('@').map_or(rest, |(_, h)| h)
    });
    let host = host.split('/').next().unwrap_or(host);
    format!("RabbitMQ does not answer on {host} ({err}): start it with `bash .ci/deps.sh`")
}

#[path = "../../examples/support/broker.rs"]
mod broker;
pub use broker::connect_bounded;

/// A connection to the test broker; fails the test with [`broker_down`]'s
/// line when the broker is down.
pub async fn connect() -> Connection {
    let url = url();
    match connect_bounded(&url, ConnectionProperties::default()).await {
        Ok(conn) => conn,
        Err(e) => panic!("{}", broker_down(&url, &e)),
    }
}

/// Closes a test's connection, waiting at most 5 s: lapin 4.12 can leave
/// a close unfinished (seen once: a test waited 20 minutes in
/// `Connection::close`, its I/O loop idle, the broker still showing the
/// connection running). The broker drops the connection when the test
/// process exits anyway.
pub async fn close(conn: &Connection) {
    let bye = conn.close(200, "bye".into());
    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
}

pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A unique name for a test queue or exchange.
pub fn unique(prefix: &str) -> String {
    format!("test.{prefix}.{:016x}", random_u64())
}

/// A fresh, valid, sampled span context with a trace state.
pub fn span_context() -> SpanContext {
    let trace_id = TraceId::from((u128::from(random_u64()) << 64) | u128::from(random_u64() | 1));
    let span_id = SpanId::from(random_u64() | 1);
    SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        false,
        TraceState::from_key_value([("mindbus", "t1")]).unwrap(),
    )
}

/// Queue arguments that make an abandoned test queue disappear by itself.
pub fn queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    args
}

/// Declares a non-exclusive queue with a safety expiry.
pub async fn declare_queue(ch: &Channel, name: &str, mut extra: FieldTable) -> ShortString {
    let mut args = queue_args();
    for (k, v) in extra.inner().clone() {
        args.insert(k, v);
    }
    let _ = &mut extra;
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("queue_declare");
    name.into()
}

/// A private, server-named reply queue (`amq.gen-*`), as an orchestrator
/// declares one.
pub async fn reply_queue(ch: &Channel) -> ShortString {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue_declare");
    q.name().clone()
}

/// Messages ready in a queue (passive declare).
pub async fn message_count(ch: &Channel, name: &str) -> u32 {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

pub async fn delete_queue(ch: &Channel, name: &str) {
    let _ = ch
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
}

pub async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange_declare");
}

pub async fn delete_exchange(ch: &Channel, name: &str) {
    let _ = ch
        .exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await;
}

pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue_bind");
}

pub fn long(s: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.into()))
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One recorded settlement.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    pub kind: MessageKind,
    pub outcome: Outcome,
    pub failure: Option<String>,
    pub applied: bool,
    /// The settlement call's own error, if it failed.
    pub error: bool,
    /// When the message's end hooks say it ended.
    pub ended: std::time::Instant,
    /// The payload, to tell messages apart.
    pub body: Vec<u8>,
}

/// Records every settlement (an example of a user-written interceptor).
#[derive(Clone, Default)]
pub struct Recorder {
    pub settled: Arc<Mutex<Vec<Settled>>>,
}

impl Recorder {
    pub fn outcomes(&self) -> Vec<Settled> {
        self.settled.lock().unwrap().clone()
    }
}

impl Interceptor for Recorder {
    fn on_delivery(&self, msg: &mut mindbus_otel::IncomingMessage<'_>) {
        // Reading the envelope fixes the kind for the settle hook.
        let _ = msg.envelope();
        let body = msg.payload().to_vec();
        msg.state_mut().extensions.insert(RecordedBody(body));
    }

    fn on_settle(&self, state: &mut MessageState, s: &Settlement<'_>) {
        let failure = s.failure.map(|f| format!("{f:?}"));
        self.settled.lock().unwrap().push(Settled {
            kind: state.kind(),
            outcome: s.outcome,
            failure,
            applied: s.applied,
            error: s.error.is_some(),
            ended: state.ended(),
            body: state
                .extensions
                .get::<RecordedBody>()
                .map(|b| b.0.clone())
                .unwrap_or_default(),
        });
    }
}

struct RecordedBody(Vec<u8>);

/// A handler-style consumer on `queue` whose handler acks every message.
pub async fn consume_acking(ch: &TracedChannel, queue: &str) -> ConsumerHandle {
    ch.consume_with(
        queue.into(),
        "".into(),
        mindbus_otel::lapin::options::BasicConsumeOptions::default(),
        FieldTable::default(),
        |_d| async { Ok::<(), String>(()) },
    )
    .await
    .unwrap()
}

/// A stream-style consumer on `queue` with default options.
pub async fn consume_stream(ch: &TracedChannel, queue: &str) -> TracedConsumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        mindbus_otel::lapin::options::BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}
