//! Consuming in both styles against the real broker: settlement outcomes,
//! dead-lettering, panics, `no_ack`, user interceptors, and lapin errors
//! coming back unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::{BasicProperties, Channel, ExchangeKind};
use mindbus_otel::{
    Interceptor, MessageKind, MessageState, Outcome, PublishResult, Settlement, TraceContext,
    TracedChannel, on_publish, on_publish_result,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn raw_publish(ch: &Channel, queue: &str, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn drain(ch: &Channel, queue: &str, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < deadline {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => out.push(m.delivery.data.clone()),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    out
}

/// A queue dead-lettering into its own fanout exchange and dead queue.
struct Dlx {
    queue: String,
    exchange: String,
    dead: String,
}

impl Dlx {
    async fn declare(ch: &Channel, tag: &str) -> Dlx {
        let exchange = unique(&format!("{tag}.dlx"));
        let dead = unique(&format!("{tag}.dead"));
        declare_exchange(ch, &exchange, ExchangeKind::Fanout).await;
        declare_queue(ch, &dead, FieldTable::default()).await;
        bind(ch, &dead, &exchange, "").await;
        let mut args = FieldTable::default();
        args.insert("x-dead-letter-exchange".into(), long(exchange.clone()));
        let queue = unique(tag);
        declare_queue(ch, &queue, args).await;
        Dlx {
            queue,
            exchange,
            dead,
        }
    }

    async fn delete(&self, ch: &Channel) {
        delete_queue(ch, &self.queue).await;
        delete_queue(ch, &self.dead).await;
        delete_exchange(ch, &self.exchange).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_ok_acks_err_and_panic_dead_letter_and_consumer_goes_on() {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let dlx = Dlx::declare(&raw, "consume.handler").await;
    let recorder = Recorder::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(TraceContext::default())
        .with(recorder.clone())
        .build();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handle = ch
        .consume_with(
            dlx.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |delivery| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    match &delivery.data[..] {
                        b"fail" => Err("the handler said no"),
                        b"panic" => panic!("handler exploded"),
                        _ => Ok(()),
                    }
                }
            },
        )
        .await
        .unwrap();
    for body in [&b"ok-1"[..], b"fail", b"panic", b"ok-2"] {
        raw_publish(&raw, &dlx.queue, body).await;
    }
    assert!(eventually(Duration::from_secs(10), || recorder.outcomes().len() == 4).await);
    let stats = handle.stats().clone();
    assert_eq!(stats.delivered(), 4);
    assert_eq!(stats.acked(), 2);
    assert_eq!(stats.nacked(), 2);
    assert_eq!(stats.handler_errors(), 1);
    assert_eq!(stats.panics(), 1);
    assert!(!handle.is_finished(), "the consumer survived the panic");

    let outcomes = recorder.outcomes();
    assert_eq!(outcomes[0].outcome, Outcome::Acked);
    assert_eq!(outcomes[1].outcome, Outcome::Nacked { requeue: false });
    assert_eq!(
        outcomes[1].failure.as_deref(),
        Some("Error(\"the handler said no\")")
    );
    assert_eq!(outcomes[2].outcome, Outcome::Nacked { requeue: false });
    assert_eq!(
        outcomes[2].failure.as_deref(),
        Some("Panic(\"handler exploded\")")
    );
    assert_eq!(outcomes[3].outcome, Outcome::Acked);
    assert!(outcomes.iter().all(|o| o.applied));

    let mut dead = drain(&raw, &dlx.dead, 2).await;
    dead.sort();
    assert_eq!(dead, vec![b"fail".to_vec(), b"panic".to_vec()]);
    handle.cancel().await.unwrap();
    assert_eq!(
        message_count(&raw, &dlx.queue).await,
        0,
        "nothing left behind"
    );
    dlx.delete(&raw).await;
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_outcomes_ack_nack_reject_drop_and_raw_acker() {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let dlx = Dlx::declare(&raw, "consume.stream").await;
    let recorder = Recorder::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(TraceContext::default())
        .with(recorder.clone())
        .build();
    let bodies = [
        br#"{"specversion":"1.0","type":"ai.team.command"}"#.to_vec(),
        br#"{"specversion":"1.0","type":"ai.team.result"}"#.to_vec(),
        br#"{"specversion":"1.0","type":"ai.team.error"}"#.to_vec(),
        b"drop me".to_vec(),
        b"raw acker".to_vec(),
    ];
    for b in &bodies {
        raw_publish(&raw, &dlx.queue, b).await;
    }
    let mut consumer = consume_stream(&ch, dlx.queue.as_str()).await;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    assert!(next().await.ack(BasicAckOptions::default()).await.unwrap());
    let nack = BasicNackOptions {
        requeue: false,
        ..Default::default()
    };
    assert!(next().await.nack(nack).await.unwrap());
    assert!(
        next()
            .await
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap()
    );
    let dropped = next().await;
    let dropped_tag = dropped.delivery_tag;
    drop(dropped);
    let elsewhere = next().await;
    elsewhere
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    drop(elsewhere);

    let outcomes = recorder.outcomes();
    let got: Vec<(MessageKind, Outcome)> = outcomes.iter().map(|o| (o.kind, o.outcome)).collect();
    assert_eq!(
        got,
        vec![
            (MessageKind::Command, Outcome::Acked),
            (MessageKind::Result, Outcome::Nacked { requeue: false }),
            (MessageKind::Error, Outcome::Rejected { requeue: false }),
            (MessageKind::Unknown, Outcome::Unsettled),
            (MessageKind::Unknown, Outcome::SettledElsewhere),
        ]
    );
    // The unsettled one is still ours: settle it through lapin to clean up.
    ch.basic_ack(dropped_tag, BasicAckOptions::default())
        .await
        .unwrap();
    let dead = drain(&raw, &dlx.dead, 2).await;
    assert_eq!(dead.len(), 2, "nack and reject dead-lettered");
    dlx.delete(&raw).await;
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumers_report_auto_ack() {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let q1 = declare_queue(&raw, &unique("consume.noack.h"), FieldTable::default()).await;
    let q2 = declare_queue(&raw, &unique("consume.noack.s"), FieldTable::default()).await;
    let recorder = Recorder::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(recorder.clone())
        .build();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let handle = ch
        .consume_with(
            q1.clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
            |_d| async { Ok::<(), String>(()) },
        )
        .await
        .unwrap();
    raw_publish(&raw, q1.as_str(), b"h").await;
    assert!(eventually(Duration::from_secs(10), || recorder.outcomes().len() == 1).await);
    let mut consumer = ch
        .basic_consume(q2.clone(), "".into(), no_ack, FieldTable::default())
        .await
        .unwrap();
    raw_publish(&raw, q2.as_str(), b"s").await;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(d);
    let outcomes = recorder.outcomes();
    assert_eq!(outcomes.len(), 2);
    assert!(
        outcomes
            .iter()
            .all(|o| o.outcome == Outcome::AutoAck && o.applied)
    );
    assert_eq!(handle.stats().acked(), 0, "nothing sent for no_ack");
    handle.cancel().await.unwrap();
    delete_queue(&raw, q1.as_str()).await;
    delete_queue(&raw, q2.as_str()).await;
    close(&conn).await;
}

/// A user-written interceptor keeping per-message state in extensions.
#[derive(Clone, Default)]
struct Timing {
    durations: Arc<Mutex<Vec<Duration>>>,
}

struct Started(Instant);

impl Interceptor for Timing {
    fn on_delivery(&self, msg: &mut mindbus_otel::IncomingMessage<'_>) {
        msg.state_mut().extensions.insert(Started(Instant::now()));
    }
    fn on_settle(&self, state: &mut MessageState, _: &Settlement<'_>) {
        if let Some(Started(t)) = state.extensions.remove::<Started>() {
            self.durations.lock().unwrap().push(t.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_interceptors_closures_and_structs() {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let queue = declare_queue(&raw, &unique("consume.user"), FieldTable::default()).await;
    let results = Arc::new(Mutex::new(Vec::new()));
    let r = results.clone();
    let timing = Timing::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .agent("agent.test.001")
        .with(on_publish(|msg| {
            let agent = msg.state().agent().unwrap_or("?").to_owned();
            msg.set_header("x-sent-by".into(), long(agent));
        }))
        .with(on_publish_result(move |_state, result| {
            r.lock()
                .unwrap()
                .push(matches!(result, PublishResult::Sent));
        }))
        .with(timing.clone())
        .build();
    ch.basic_publish(
        "".into(),
        queue.clone(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(*results.lock().unwrap(), vec![true]);
    let mut consumer = consume_stream(&ch, queue.as_str()).await;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let headers = d.properties.headers().clone().unwrap();
    assert_eq!(
        headers.inner().get("x-sent-by"),
        Some(&long("agent.test.001"))
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    let durations = timing.durations.lock().unwrap().clone();
    assert_eq!(durations.len(), 1);
    assert!(durations[0] >= Duration::from_millis(20));
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
}

/// Panics in every hook: messages must still flow, in both directions.
struct Exploding;

impl Interceptor for Exploding {
    fn on_publish(&self, _: &mut mindbus_otel::OutgoingMessage<'_>) {
        panic!("on_publish");
    }
    fn on_publish_result(&self, _: &mut MessageState, _: &PublishResult<'_>) {
        panic!("on_publish_result");
    }
    fn on_delivery(&self, _: &mut mindbus_otel::IncomingMessage<'_>) {
        panic!("on_delivery");
    }
    fn on_settle(&self, _: &mut MessageState, _: &Settlement<'_>) {
        panic!("on_settle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_interceptor_never_breaks_messaging() {
    let conn = connect().await;
    let recorder = Recorder::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(TraceContext::default())
        .with(Exploding)
        .with(recorder.clone())
        .build();
    let queue = declare_queue(&ch, &unique("consume.explode"), FieldTable::default()).await;
    let before = mindbus_otel::hook_panics();
    let handle = consume_acking(&ch, queue.as_str()).await;
    for _ in 0..3 {
        ch.basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert!(eventually(Duration::from_secs(10), || handle.stats().acked() == 3).await);
    assert!(eventually(Duration::from_secs(5), || recorder.outcomes().len() == 3).await);
    // 3 publishes x 2 hooks + 3 deliveries x 2 hooks, at least (other tests
    // in this binary may add their own).
    assert!(mindbus_otel::hook_panics() - before >= 12);
    handle.cancel().await.unwrap();
    delete_queue(&ch, queue.as_str()).await;
    close(&conn).await;
}

/// The error's kind; a channel caught closing or already closed is the same
/// error (which one depends on timing, for raw lapin as for us).
fn kind_of(e: &mindbus_otel::lapin::Error) -> String {
    format!("{:?}", e.kind()).replace("InvalidChannelState(Closing", "InvalidChannelState(Closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_errors_come_back_unchanged() {
    let conn = connect().await;
    let missing = unique("missing.exchange");
    let failures = Arc::new(Mutex::new(Vec::new()));
    let f = failures.clone();
    let watch = on_publish_result(move |_s: &mut MessageState, r: &PublishResult<'_>| {
        f.lock().unwrap().push(match r {
            PublishResult::Failed(e) => format!("failed {:?}", e.kind()),
            PublishResult::Confirmed(c) => format!("confirmed ack={}", c.is_ack()),
            other => format!("{other:?}"),
        });
    });

    // Publishing to a missing exchange with confirms: the channel is closed
    // by the broker; lapin reports it on the confirm. Same for raw and traced.
    let mut errors = Vec::new();
    for traced in [false, true] {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let res = if traced {
            let t = TracedChannel::builder(ch.clone())
                .with(TraceContext::default())
                .with(watch.clone())
                .build();
            match t
                .basic_publish(
                    missing.as_str().into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(|_| ()),
                Err(e) => Err(e),
            }
        } else {
            match ch
                .basic_publish(
                    missing.as_str().into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(|_| ()),
                Err(e) => Err(e),
            }
        };
        errors.push(kind_of(&res.expect_err("missing exchange must fail")));

        // The channel is now closed: the next publish fails at once.
        let res = if traced {
            TracedChannel::builder(ch.clone())
                .with(watch.clone())
                .build()
                .basic_publish(
                    "".into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    b"x",
                    BasicProperties::default(),
                )
                .await
                .map(|_| ())
        } else {
            ch.basic_publish(
                "".into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .map(|_| ())
        };
        errors.push(kind_of(&res.expect_err("closed channel must fail")));
    }
    assert_eq!(errors[0], errors[2], "confirm error differs: {errors:?}");
    assert_eq!(
        errors[1], errors[3],
        "closed-channel error differs: {errors:?}"
    );
    assert!(
        errors[0].contains("404")
            || errors[0].contains("NOT_FOUND")
            || errors[0].contains("NotFound"),
        "{errors:?}"
    );
    let seen = failures.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.starts_with("failed ")), "{seen:?}");

    // A confirmed publish reports the broker's ack.
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queue = declare_queue(&ch, &unique("consume.confirm"), FieldTable::default()).await;
    let t = TracedChannel::builder(ch.clone())
        .with(watch.clone())
        .build();
    let c = t
        .basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        failures.lock().unwrap().len(),
        2,
        "not reported before the confirm"
    );
    assert!(c.await.unwrap().is_ack());
    assert_eq!(
        failures.lock().unwrap().last().unwrap(),
        "confirmed ack=true"
    );
    // An unawaited confirm is reported as abandoned, and lapin still tracks it.
    drop(
        t.basic_publish(
            "".into(),
            queue.clone(),
            BasicPublishOptions::default(),
            b"y",
            BasicProperties::default(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(failures.lock().unwrap().last().unwrap(), "Abandoned");
    ch.wait_for_confirms().await.unwrap();
    delete_queue(&ch, queue.as_str()).await;
    close(&conn).await;
}

/// A settle hook that takes its time, then counts.
struct SlowSettle(Arc<AtomicUsize>);

impl Interceptor for SlowSettle {
    fn on_settle(&self, _: &mut MessageState, _: &Settlement<'_>) {
        std::thread::sleep(Duration::from_millis(50));
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// `acked()` counts a message only once its settle hooks have run, so a
/// caller that waits for `acked() == n` then reads spans or metrics sees
/// all n messages in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_counts_after_the_settle_hooks() {
    const N: usize = 3;
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let queue = declare_queue(&raw, &unique("consume.order"), FieldTable::default()).await;
    let hooks = Arc::new(AtomicUsize::new(0));
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(SlowSettle(hooks.clone()))
        .build();
    for _ in 0..N {
        raw_publish(&raw, queue.as_str(), b"x").await;
    }
    let handle = consume_acking(&ch, queue.as_str()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    while seen < N as u64 && Instant::now() < deadline {
        seen = handle.stats().acked();
        let done = hooks.load(Ordering::SeqCst) as u64;
        assert!(
            done >= seen,
            "acked() reads {seen} while {done} settle hooks have run"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(seen, N as u64);
    handle.cancel().await.unwrap();
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
}

// ------------------------------------------------------- every way to settle

/// One settlement test's world: a dead-lettering queue holding `bodies`, a
/// traced channel with prefetch 10 whose settlements `recorder` sees.
struct Settling {
    conn: mindbus_otel::lapin::Connection,
    raw: Channel,
    dlx: Dlx,
    recorder: Recorder,
    ch: TracedChannel,
}

impl Settling {
    async fn start(tag: &str, bodies: &[&str]) -> Settling {
        Settling::start_on(None, tag, bodies).await
    }

    /// As [`start`](Self::start), the traced channel on `consuming` if given.
    async fn start_on(
        consuming: Option<&mindbus_otel::lapin::Connection>,
        tag: &str,
        bodies: &[&str],
    ) -> Settling {
        let conn = connect().await;
        let raw = conn.create_channel().await.unwrap();
        let dlx = Dlx::declare(&raw, tag).await;
        let recorder = Recorder::default();
        let traced = consuming.unwrap_or(&conn).create_channel().await.unwrap();
        let ch = TracedChannel::builder(traced)
            .with(TraceContext::default())
            .with(recorder.clone())
            .build();
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        for body in bodies {
            raw_publish(&raw, &dlx.queue, body.as_bytes()).await;
        }
        Settling {
            conn,
            raw,
            dlx,
            recorder,
            ch,
        }
    }

    /// A stream consumer and its first `n` deliveries, held unsettled.
    async fn hold(
        &self,
        n: usize,
    ) -> (
        mindbus_otel::TracedConsumer,
        Vec<mindbus_otel::TracedDelivery>,
    ) {
        let mut consumer = consume_stream(&self.ch, self.dlx.queue.as_str()).await;
        let mut held = Vec::new();
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery")
                .unwrap()
                .unwrap();
            held.push(d);
        }
        (consumer, held)
    }

    /// Each settled message by body: its outcome, and whether the
    /// settlement reached the broker without an error.
    fn by_body(&self) -> Vec<(String, Outcome, bool)> {
        let mut v: Vec<_> = self
            .recorder
            .outcomes()
            .into_iter()
            .map(|s| {
                (
                    String::from_utf8_lossy(&s.body).into_owned(),
                    s.outcome,
                    s.applied && !s.error,
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Messages ready in the queue once `settle` is given time to reach
    /// the broker (up to a second for `want`).
    async fn ready(&self, want: u32) -> u32 {
        let mut n = 0;
        for _ in 0..50 {
            n = message_count(&self.raw, &self.dlx.queue).await;
            if n == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }

    /// Closes the consuming channel (what it left unacked is requeued),
    /// checks what the broker holds, and deletes the queues.
    async fn finish(self, ready: u32, dead: usize) {
        self.ch.close(200, "bye".into()).await.ok();
        assert_eq!(
            self.ready(ready).await,
            ready,
            "ready in the queue after the close"
        );
        assert_eq!(
            drain(&self.raw, &self.dlx.dead, dead).await.len(),
            dead,
            "dead-lettered"
        );
        self.dlx.delete(&self.raw).await;
        close(&self.conn).await;
    }
}

fn outcomes(list: &[(&str, Outcome, bool)]) -> Vec<(String, Outcome, bool)> {
    list.iter()
        .map(|(b, o, ok)| ((*b).to_owned(), *o, *ok))
        .collect()
}

const NACKED: Outcome = Outcome::Nacked { requeue: false };
const REJECTED: Outcome = Outcome::Rejected { requeue: false };

/// `ack`/`nack` with `multiple: true` settle every earlier unsettled
/// delivery at the broker; each of those ends once, with that outcome, at
/// that time, whenever its `TracedDelivery` is dropped or settled later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_ack_and_nack_end_every_earlier_delivery_once() {
    let t = Settling::start("consume.multiple", &["m1", "m2", "m3", "m4", "m5", "m6"]).await;
    let (_consumer, mut held) = t.hold(6).await;
    let (d6, d5, d4) = (
        held.pop().unwrap(),
        held.pop().unwrap(),
        held.pop().unwrap(),
    );
    let (d3, d2, d1) = (
        held.pop().unwrap(),
        held.pop().unwrap(),
        held.pop().unwrap(),
    );

    assert!(d3.ack(BasicAckOptions { multiple: true }).await.unwrap());
    let acked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop((d1, d2));
    let nack_all = BasicNackOptions {
        multiple: true,
        requeue: false,
    };
    assert!(d6.nack(nack_all).await.unwrap());
    let nacked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop((d4, d5));

    let ok = Outcome::Acked;
    assert_eq!(
        t.by_body(),
        outcomes(&[
            ("m1", ok, true),
            ("m2", ok, true),
            ("m3", ok, true),
            ("m4", NACKED, true),
            ("m5", NACKED, true),
            ("m6", NACKED, true),
        ]),
        "each delivery ended once, with its multiple's outcome"
    );
    for s in t.recorder.outcomes() {
        let by = if s.outcome == ok { acked_at } else { nacked_at };
        assert!(
            s.ended <= by,
            "ended at the multiple settlement, not when dropped"
        );
    }
    t.finish(0, 3).await;
}

/// `basic_ack`/`basic_nack`/`basic_reject` by tag on the traced channel (a
/// lapin method name, so `channel.basic_ack(..)` code keeps its meaning)
/// end the deliveries they settle with that outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_by_tag_on_the_traced_channel_is_seen() {
    let t = Settling::start("consume.bytag", &["m1", "m2", "m3", "m4"]).await;
    let (_consumer, held) = t.hold(4).await;
    let tags: Vec<u64> = held.iter().map(|d| d.delivery_tag).collect();
    t.ch.basic_ack(tags[0], BasicAckOptions::default())
        .await
        .unwrap();
    t.ch.basic_reject(tags[1], BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let nack_all = BasicNackOptions {
        multiple: true,
        requeue: false,
    };
    t.ch.basic_nack(tags[3], nack_all).await.unwrap();
    drop(held);
    assert_eq!(
        t.by_body(),
        outcomes(&[
            ("m1", Outcome::Acked, true),
            ("m2", REJECTED, true),
            ("m3", NACKED, true),
            ("m4", NACKED, true),
        ])
    );
    t.finish(0, 3).await;
}

/// A `consume_with` handler that settles its message itself (by tag on the
/// traced channel, or through lapin's acker) is not settled a second time
/// (that would close the channel), and no settlement error is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_settles_its_message_itself() {
    let bodies = ["by-tag-ack", "by-tag-reject", "acker", "plugin"];
    let t = Settling::start("consume.self", &bodies).await;
    let c = t.ch.clone();
    let handle =
        t.ch.consume_with(
            t.dlx.queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let c = c.clone();
                async move {
                    let tag = d.delivery_tag;
                    match &d.data[..] {
                        b"by-tag-ack" => c.basic_ack(tag, BasicAckOptions::default()).await,
                        b"by-tag-reject" => {
                            c.basic_reject(tag, BasicRejectOptions { requeue: false })
                                .await
                        }
                        b"acker" => d.acker.ack(BasicAckOptions::default()).await.map(|_| ()),
                        _ => Ok(()),
                    }
                    .map_err(|e| e.to_string())
                }
            },
        )
        .await
        .unwrap();
    let stats = handle.stats().clone();
    let all_settled = || stats.acked() + stats.nacked() + stats.settled_by_handler() == 4;
    assert!(eventually(Duration::from_secs(10), all_settled).await);
    assert_eq!(
        t.by_body(),
        outcomes(&[
            ("acker", Outcome::SettledElsewhere, true),
            ("by-tag-ack", Outcome::Acked, true),
            ("by-tag-reject", REJECTED, true),
            ("plugin", Outcome::Acked, true),
        ])
    );
    let counts = (stats.acked(), stats.nacked(), stats.settled_by_handler());
    assert_eq!((counts, stats.settle_errors()), ((2, 1, 1), 0));
    assert!(t.ch.status().connected(), "no delivery was settled twice");
    handle.cancel().await.unwrap();
    t.finish(0, 1).await;
}

/// After `basic_cancel`, deliveries in hand can still be settled (the
/// broker keeps them unacked on the channel); one dropped unsettled is
/// requeued when the channel closes. Each ends once, with what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_hand_at_cancel_end_with_what_happens_to_them() {
    let t = Settling::start("consume.cancel", &["m1", "m2", "m3"]).await;
    let (consumer, mut held) = t.hold(3).await;
    t.ch.basic_cancel(consumer.tag(), Default::default())
        .await
        .unwrap();
    let (d3, d2, d1) = (
        held.pop().unwrap(),
        held.pop().unwrap(),
        held.pop().unwrap(),
    );
    assert!(d1.ack(BasicAckOptions::default()).await.unwrap());
    let nack = BasicNackOptions {
        requeue: false,
        ..Default::default()
    };
    assert!(d2.nack(nack).await.unwrap());
    drop(d3);
    assert_eq!(
        t.by_body(),
        outcomes(&[
            ("m1", Outcome::Acked, true),
            ("m2", NACKED, true),
            ("m3", Outcome::Unsettled, false),
        ])
    );
    t.finish(1, 1).await;
}

/// Deliveries in hand when their channel, or their connection, closes:
/// the broker requeues them; each ends once as unsettled, and a settlement
/// tried after the close is reported as not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_in_hand_when_the_channel_or_connection_closes() {
    for close_connection in [false, true] {
        let consuming = connect().await;
        let t = Settling::start_on(Some(&consuming), "consume.closed", &["m1", "m2", "m3"]).await;
        let (_consumer, mut held) = t.hold(3).await;
        if close_connection {
            consuming.close(200, "bye".into()).await.unwrap();
        } else {
            t.ch.close(200, "bye".into()).await.unwrap();
        }
        let (d3, d2, d1) = (
            held.pop().unwrap(),
            held.pop().unwrap(),
            held.pop().unwrap(),
        );
        let late = d1.ack(BasicAckOptions::default()).await;
        assert!(
            !matches!(late, Ok(true)),
            "nothing to ack on a closed channel: {late:?}"
        );
        drop((d2, d3));
        assert_eq!(
            t.by_body(),
            outcomes(&[
                ("m1", Outcome::Acked, false),
                ("m2", Outcome::Unsettled, false),
                ("m3", Outcome::Unsettled, false),
            ]),
            "connection closed: {close_connection}"
        );
        t.finish(3, 0).await;
    }
}

/// `cancel_within` ends within its bound whatever the handler does: a
/// handler that finishes in time is settled (`Clean`); one that does not is
/// stopped (`TimedOut`) and its message, unsettled, goes back to the queue
/// when the channel closes, for another consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_cancel_settles_in_time_or_leaves_the_message_to_the_broker() {
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let dlx = Dlx::declare(&raw, "consume.bounded").await;
    let started = Arc::new(AtomicUsize::new(0));
    let consume = |ch: &TracedChannel| {
        let started = started.clone();
        let ch = ch.clone();
        let queue = dlx.queue.clone();
        async move {
            ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
            ch.consume_with(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
                move |delivery| {
                    let started = started.clone();
                    async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        let pause = if &delivery.data[..] == b"slow" {
                            30_000
                        } else {
                            100
                        };
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        Ok::<(), String>(())
                    }
                },
            )
            .await
            .unwrap()
        }
    };

    // In time: settled.
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap()).build();
    let handle = consume(&ch).await;
    raw_publish(&raw, &dlx.queue, b"quick").await;
    assert!(
        eventually(Duration::from_secs(10), || started.load(Ordering::SeqCst)
            == 1)
        .await
    );
    let outcome = handle.cancel_within(Duration::from_secs(5)).await;
    assert!(outcome.is_clean(), "{outcome}");
    assert_eq!(message_count(&raw, &dlx.queue).await, 0);

    // Not in time: stopped at the bound, the message left to the broker.
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap()).build();
    let handle = consume(&ch).await;
    raw_publish(&raw, &dlx.queue, b"slow").await;
    assert!(
        eventually(Duration::from_secs(10), || started.load(Ordering::SeqCst)
            == 2)
        .await
    );
    let t0 = Instant::now();
    let outcome = handle.cancel_within(Duration::from_millis(300)).await;
    let took = t0.elapsed();
    assert!(
        matches!(outcome, mindbus_otel::CancelOutcome::TimedOut(_)),
        "{outcome}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    ch.close(200, "bye".into()).await.ok();
    assert_eq!(
        drain(&raw, &dlx.queue, 1).await,
        vec![b"slow".to_vec()],
        "redelivered to the next consumer"
    );
    assert_eq!(message_count(&raw, &dlx.dead).await, 0, "not dead-lettered");
    dlx.delete(&raw).await;
    close(&conn).await;
}
