//! Broker faults against the real broker: the connection dies while an
//! orchestrator publishes COMMANDs with confirms and agents consume them in
//! both styles and reply. Every span that was started ends, the interrupted
//! ones with an error status and an `error.type`; lapin's errors reach the
//! caller exactly as raw lapin returns them on the same connection; nothing
//! in the plugin's state keeps growing. With lapin's auto-recovery on,
//! consumption and spans resume after the broker closes the connection.
//!
//! Confirm nacks and `mandatory` returns on PRODUCER spans are covered by
//! `tests/spans.rs` (`confirms_nack_unroutable_and_basic_get_receive`).
//!
//! The broker-side close uses `rabbitmqctl close_connection` on this test's
//! own connection only (found by its unique `connection_name`); the network
//! cut goes through an in-test TCP proxy on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/otel.rs"]
mod otel;

use common::*;
use futures_util::StreamExt;
use mindbus_otel::lapin;
use mindbus_otel::lapin::message::Delivery;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::uri::AMQPUri;
use mindbus_otel::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
};
use mindbus_otel::opentelemetry::trace::SpanKind;
use mindbus_otel::{AgentMetrics, MessagingSpans, TaskMetrics, TraceContext, TracedChannel};
use mindbus_otel_testkit::{OtlpReceiver, ReceivedSpan, StatusCode};
use otel::{Proto, flush, provider, shutdown};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// Hang guard for anything that must finish once the connection is gone.
const HANG_GUARD: Duration = Duration::from_secs(30);
/// COMMANDs outstanding (published, not yet answered) per publisher.
const WINDOW: u64 = 200;
/// Replies to see before the fault, so that everything is busy.
const BUSY: u64 = 300;
/// Bound of the orchestrator's pending-task table.
const MAX_PENDING: usize = 1_000;
/// The COMMANDs' TTL (AMQP `expiration`), also TaskMetrics' expiry.
const COMMAND_TTL_MS: u64 = 2_000;

/// Hang guard of one ack in the stream style. lapin 4.12 can leave an ack
/// unresolved forever when its channel dies just as the ack is queued (its
/// internal RPC drops the command without completing the promise); raw
/// lapin does the same. Giving up and dropping the delivery is what an
/// application can do; the CONSUMER span then ends as `unsettled`.
const ACK_GUARD: Duration = Duration::from_secs(3);

async fn ack_guarded(
    ack: impl Future<Output = lapin::Result<bool>>,
) -> Option<lapin::Result<bool>> {
    tokio::time::timeout(ACK_GUARD, ack).await.ok()
}

async fn guard<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what} did not finish"))
}

// ------------------------------------------------------------- broker side

/// The broker's pid of the connection named `name` (its `connection_name`
/// client property), through `rabbitmqctl`.
fn broker_pid(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl (the broker-side tests need it, as root, on the broker's host)");
    assert!(
        out.status.success(),
        "rabbitmqctl list_connections: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

/// Closes this test's own connection from the broker side
/// (`connection.close` 320 CONNECTION_FORCED with `reason`).
async fn broker_close(name: &str, reason: &str) {
    let (name, reason) = (name.to_owned(), reason.to_owned());
    tokio::task::spawn_blocking(move || {
        let pid = broker_pid(&name).unwrap_or_else(|| panic!("no broker connection named {name}"));
        let out = std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", &pid, &reason])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl close_connection: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await
    .unwrap();
}

/// A TCP proxy on 127.0.0.1 in front of the broker whose connections can be
/// cut abruptly (RST both ways), as a network failure would.
struct Proxy {
    port: u16,
    pipes: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: (String, u16)) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pipes: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let p = pipes.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let pipe = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    for s in [&client, &server] {
                        s.set_nodelay(true).unwrap();
                        s.set_zero_linger().unwrap();
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                p.lock().unwrap().push(pipe.abort_handle());
            }
        });
        Proxy {
            port,
            pipes,
            accept,
        }
    }

    /// Resets every connection through the proxy; new ones still pass.
    fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

fn broker_uri() -> AMQPUri {
    url().parse().expect("a valid AMQP URL")
}

// ------------------------------------------------------------- the scenario

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The broker closes the connection (`rabbitmqctl close_connection`).
    BrokerClose,
    /// The TCP connection is reset (in-test proxy).
    NetworkCut,
}

fn command(i: u64) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","type":"ai.team.command","source":"orchestrator","id":"cmd-{i}","data":{{"action":"generate_article"}}}}"#
    )
    .into_bytes()
}

fn result(agent: &str, i: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","type":"ai.team.result","source":"{agent}","id":"res-{i}","data":{{"status":"SUCCESS"}}}}"#
    )
    .into_bytes()
}

/// What a publisher saw.
#[derive(Debug, Default)]
struct PubReport {
    published: u64,
    acked: u64,
    nacked: u64,
    confirm_errors: u64,
    publish_errors: u64,
    first_confirm_error: Option<lapin::Error>,
    first_publish_error: Option<lapin::Error>,
}

/// Publishes (pipelined, confirms awaited in batches) until lapin fails,
/// keeping at most [`WINDOW`] messages unanswered (`answered` is counted by
/// the consuming side).
async fn publish_until_error<F, Fut, C>(
    mut publish: F,
    answered: Arc<AtomicU64>,
    faulted: Arc<AtomicBool>,
) -> PubReport
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = lapin::Result<C>>,
    C: Future<Output = lapin::Result<Confirmation>>,
{
    let mut r = PubReport::default();
    let mut pending = Vec::new();
    let mut failed = false;
    for i in 0..1_000_000u64 {
        while r.published.saturating_sub(answered.load(Ordering::Relaxed)) >= WINDOW
            && !faulted.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match publish(i).await {
            Ok(c) => {
                r.published += 1;
                pending.push(c);
            }
            Err(e) => {
                r.publish_errors += 1;
                r.first_publish_error.get_or_insert(e);
                failed = true;
            }
        }
        if pending.len() >= 32 || failed {
            for c in pending.drain(..) {
                match c.await {
                    Ok(conf) if conf.is_ack() => r.acked += 1,
                    Ok(_) => r.nacked += 1,
                    Err(e) => {
                        r.confirm_errors += 1;
                        r.first_confirm_error.get_or_insert(e);
                        failed = true;
                    }
                }
            }
        }
        if failed {
            break;
        }
    }
    r
}

/// What a stream consumer saw.
#[derive(Debug, Default)]
struct ConsumeReport {
    delivered: u64,
    acked: u64,
    not_applied: u64,
    ack_hung: u64,
    ack_errors: u64,
    reply_errors: u64,
    first_stream_error: Option<lapin::Error>,
    first_ack_error: Option<lapin::Error>,
}

impl ConsumeReport {
    fn ack_result(&mut self, res: Option<lapin::Result<bool>>) {
        match res {
            None => self.ack_hung += 1,
            Some(Ok(true)) => self.acked += 1,
            Some(Ok(false)) => self.not_applied += 1,
            Some(Err(e)) => {
                self.ack_errors += 1;
                self.first_ack_error.get_or_insert(e);
            }
        }
    }
}

/// Same error: equal kinds (lapin's `PartialEq`), and for I/O errors (which
/// lapin never calls equal) the same I/O kind and text.
fn same_error(traced: &lapin::Error, raw: &lapin::Error) -> bool {
    match (traced.kind(), raw.kind()) {
        (ErrorKind::IOError(a), ErrorKind::IOError(b)) => {
            a.kind() == b.kind() && a.to_string() == b.to_string()
        }
        _ => traced == raw && traced.to_string() == raw.to_string(),
    }
}

fn assert_same(what: &str, traced: &Option<lapin::Error>, raw: &Option<lapin::Error>) {
    if let (Some(t), Some(r)) = (traced, raw) {
        assert!(
            same_error(t, r),
            "{what}: the plugin returned {t:?}, raw lapin {r:?}"
        );
    }
}

fn reply_props(d: &Delivery) -> BasicProperties {
    BasicProperties::default().with_correlation_id(d.properties.correlation_id().clone().unwrap())
}

async fn connection(name: &str, via: Option<u16>, recover: bool) -> Connection {
    let mut uri = broker_uri();
    if let Some(port) = via {
        uri.authority.host = "127.0.0.1".to_owned();
        uri.authority.port = port;
    }
    let mut props = ConnectionProperties::default().with_connection_name(name.into());
    if recover {
        props = props.enable_auto_recover();
    }
    match Connection::connect_uri(uri, props).await {
        Ok(conn) => conn,
        Err(e) => panic!("{}", broker_down(&url(), &e)),
    }
}

async fn connection_dies_under_load(fault: Fault) {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("faults", &rx, Proto::Grpc);
    let spans = MessagingSpans::default().with_tracer_provider(&p);
    let tasks = TaskMetrics::with_limits(MAX_PENDING, 100);

    let admin = connect().await;
    let ach = admin.create_channel().await.unwrap();
    let cmd_h = declare_queue(&ach, &unique("faults.cmd.handler"), FieldTable::default()).await;
    let cmd_s = declare_queue(&ach, &unique("faults.cmd.stream"), FieldTable::default()).await;
    let replies = declare_queue(&ach, &unique("faults.replies"), FieldTable::default()).await;
    let raw_q = declare_queue(&ach, &unique("faults.raw"), FieldTable::default()).await;

    let name = unique("faults.conn");
    let proxy = match fault {
        Fault::NetworkCut => {
            let u = broker_uri();
            Some(Proxy::start((u.authority.host, u.authority.port)).await)
        }
        Fault::BrokerClose => None,
    };
    let conn = connection(&name, proxy.as_ref().map(|p| p.port), false).await;

    let orch_chain = |ch: Channel| {
        TracedChannel::builder(ch)
            .agent("orchestrator")
            .with(TraceContext::default())
            .with(spans.clone())
            .with(AgentMetrics::default())
            .with(tasks.clone())
            .build()
    };
    let agent_chain = |ch: Channel, agent: &str| {
        TracedChannel::builder(ch)
            .agent(agent)
            .with(TraceContext::default())
            .with(spans.clone())
            .with(AgentMetrics::default())
            .build()
    };
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let orch = orch_chain(pub_ch);
    let orch_rx = orch_chain(conn.create_channel().await.unwrap());
    let writer = agent_chain(conn.create_channel().await.unwrap(), "agent.writer.001");
    let critic = agent_chain(conn.create_channel().await.unwrap(), "agent.critic.001");
    for ch in [&writer, &critic, &orch_rx] {
        ch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    }
    let raw_pub = conn.create_channel().await.unwrap();
    raw_pub
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let raw_sub = conn.create_channel().await.unwrap();
    raw_sub
        .basic_qos(20, BasicQosOptions::default())
        .await
        .unwrap();

    let answered = Arc::new(AtomicU64::new(0));
    let faulted = Arc::new(AtomicBool::new(false));
    let raw_answered = Arc::new(AtomicU64::new(0));
    let max_pending_seen = Arc::new(AtomicU64::new(0));

    // The writer, handler style: a little work, then the RESULT.
    let reply_errors_h = Arc::new(AtomicU64::new(0));
    let (w, re) = (writer.clone(), reply_errors_h.clone());
    let handler = writer
        .consume_with(
            cmd_h.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let (w, re) = (w.clone(), re.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let id = d.properties.correlation_id().clone().unwrap();
                    let sent = w
                        .basic_publish(
                            "".into(),
                            d.properties.reply_to().clone().unwrap(),
                            BasicPublishOptions::default(),
                            &result("agent.writer.001", id.as_str()),
                            reply_props(&d),
                        )
                        .await;
                    if let Err(e) = sent {
                        re.fetch_add(1, Ordering::Relaxed);
                        return Err(e.to_string());
                    }
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();

    // The critic, stream style: deliveries processed concurrently, replies
    // published outside any context (RPC-parented by the in-flight table).
    let mut consumer = consume_stream(&critic, cmd_s.as_str()).await;
    let c = critic.clone();
    let critic_task = tokio::spawn(async move {
        let mut r = ConsumeReport::default();
        let mut work = JoinSet::new();
        while let Some(item) = consumer.next().await {
            match item {
                Ok(d) => {
                    r.delivered += 1;
                    let c = c.clone();
                    work.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let id = d.properties.correlation_id().clone().unwrap();
                        let sent = c
                            .basic_publish(
                                "".into(),
                                d.properties.reply_to().clone().unwrap(),
                                BasicPublishOptions::default(),
                                &result("agent.critic.001", id.as_str()),
                                reply_props(&d),
                            )
                            .await;
                        (
                            sent.is_err(),
                            ack_guarded(d.ack(BasicAckOptions::default())).await,
                        )
                    });
                }
                Err(e) => {
                    r.first_stream_error.get_or_insert(e);
                }
            }
        }
        while let Some(done) = work.join_next().await {
            let (reply_failed, ack) = done.unwrap();
            r.reply_errors += u64::from(reply_failed);
            r.ack_result(ack);
        }
        r
    });

    // The orchestrator's reply consumer (stream style, TaskMetrics).
    let mut consumer = consume_stream(&orch_rx, replies.as_str()).await;
    let a = answered.clone();
    let replies_task = tokio::spawn(async move {
        let mut r = ConsumeReport::default();
        while let Some(item) = consumer.next().await {
            match item {
                Ok(d) => {
                    r.delivered += 1;
                    let res = ack_guarded(d.ack(BasicAckOptions::default())).await;
                    if matches!(res, Some(Ok(true))) {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    r.ack_result(res);
                }
                Err(e) => {
                    r.first_stream_error.get_or_insert(e);
                }
            }
        }
        r
    });

    // Raw lapin on the same connection, doing the same, for comparison.
    let mut raw_consumer = raw_sub
        .basic_consume(
            raw_q.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ra = raw_answered.clone();
    let raw_consumer_task = tokio::spawn(async move {
        let mut r = ConsumeReport::default();
        let mut work = JoinSet::new();
        while let Some(item) = raw_consumer.next().await {
            match item {
                Ok(d) => {
                    r.delivered += 1;
                    let ra = ra.clone();
                    work.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let res = ack_guarded(d.ack(BasicAckOptions::default())).await;
                        if matches!(res, Some(Ok(true))) {
                            ra.fetch_add(1, Ordering::Relaxed);
                        }
                        res
                    });
                }
                Err(e) => {
                    r.first_stream_error.get_or_insert(e);
                }
            }
        }
        while let Some(done) = work.join_next().await {
            r.ack_result(done.unwrap());
        }
        r
    });

    let run = unique("run");
    let (o, cmd_h2, cmd_s2, replies2, run2) = (
        orch.clone(),
        cmd_h.clone(),
        cmd_s.clone(),
        replies.clone(),
        run.clone(),
    );
    let publisher = tokio::spawn(publish_until_error(
        move |i| {
            let o = o.clone();
            let queue = if i.is_multiple_of(2) {
                &cmd_h2
            } else {
                &cmd_s2
            }
            .clone();
            let props = BasicProperties::default()
                .with_message_id(format!("m-{i}").into())
                .with_correlation_id(format!("{run2}-{i}").into())
                .with_reply_to(replies2.clone())
                .with_expiration(COMMAND_TTL_MS.to_string().into());
            async move {
                o.basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    &command(i),
                    props,
                )
                .await
            }
        },
        answered.clone(),
        faulted.clone(),
    ));
    let (rp, raw_q2) = (raw_pub.clone(), raw_q.clone());
    let raw_publisher = tokio::spawn(publish_until_error(
        move |i| {
            let rp = rp.clone();
            let queue = raw_q2.clone();
            async move {
                rp.basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    &command(i),
                    BasicProperties::default(),
                )
                .await
            }
        },
        raw_answered.clone(),
        faulted.clone(),
    ));

    // Busy on every side, then the fault.
    let busy = eventually(HANG_GUARD, || {
        max_pending_seen.fetch_max(tasks.pending() as u64, Ordering::Relaxed);
        answered.load(Ordering::Relaxed) >= BUSY
            && raw_answered.load(Ordering::Relaxed) >= BUSY
            && handler.stats().acked() >= BUSY / 4
    })
    .await;
    assert!(busy, "the scenario never got busy");
    let started_before = spans.stats().started();
    assert!(
        started_before > spans.stats().ended(),
        "spans in flight at the fault"
    );
    match fault {
        Fault::BrokerClose => broker_close(&name, "broker_faults test").await,
        Fault::NetworkCut => proxy.as_ref().unwrap().cut(),
    }
    // (Publishers waiting for answers that will never come go on, and fail.)
    faulted.store(true, Ordering::Relaxed);

    // Everything that was running ends, nothing hangs.
    let orch_report = guard("traced publisher", publisher).await.unwrap();
    let raw_report = guard("raw publisher", raw_publisher).await.unwrap();
    let critic_report = guard("stream consumer", critic_task).await.unwrap();
    let replies_report = guard("reply consumer", replies_task).await.unwrap();
    let raw_consumer_report = guard("raw consumer", raw_consumer_task).await.unwrap();
    guard("handler consumer", async {
        while !handler.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The fault as lapin reports it.
    let fault_error = critic_report
        .first_stream_error
        .clone()
        .expect("the traced consumer stream reports the connection error");
    match fault {
        Fault::BrokerClose => match fault_error.kind() {
            ErrorKind::ProtocolError(e) => {
                assert_eq!(e.get_id(), 320, "{fault_error}");
                assert!(
                    e.get_message().as_str().contains("broker_faults test"),
                    "{fault_error}"
                );
            }
            other => panic!("expected CONNECTION_FORCED, got {other:?}"),
        },
        Fault::NetworkCut => assert!(
            matches!(fault_error.kind(), ErrorKind::IOError(_)),
            "{fault_error:?}"
        ),
    }

    // lapin's errors reach the caller unchanged. The consumer streams get
    // the connection's error, the same on every channel: what the plugin
    // yielded is what raw lapin yielded.
    assert_same(
        "consumer stream",
        &critic_report.first_stream_error,
        &raw_consumer_report.first_stream_error,
    );
    assert_same(
        "consumer stream",
        &replies_report.first_stream_error,
        &raw_consumer_report.first_stream_error,
    );
    // Calls in flight at the fault fail with the fault itself or with the
    // dead channel's state, depending on their timing, through the plugin
    // as through raw lapin: never anything else (wrapped, invented).
    for (what, error) in [
        ("traced confirm", &orch_report.first_confirm_error),
        ("raw confirm", &raw_report.first_confirm_error),
        ("traced publish", &orch_report.first_publish_error),
        ("raw publish", &raw_report.first_publish_error),
        ("traced ack", &critic_report.first_ack_error),
        ("traced ack", &replies_report.first_ack_error),
        ("raw ack", &raw_consumer_report.first_ack_error),
    ] {
        if let Some(e) = error {
            assert!(
                same_error(e, &fault_error)
                    || matches!(
                        e.kind(),
                        ErrorKind::InvalidChannelState(
                            lapin::ChannelState::Closing
                                | lapin::ChannelState::Closed
                                | lapin::ChannelState::Error,
                            _
                        )
                    ),
                "{what}: {e:?} (the fault: {fault_error:?})"
            );
        }
    }
    // And, deterministically, on the dead channels afterwards.
    let traced = orch
        .basic_publish(
            "".into(),
            cmd_h.clone(),
            BasicPublishOptions::default(),
            &command(0),
            BasicProperties::default(),
        )
        .await
        .expect_err("publishing on a dead connection fails");
    let raw = raw_pub
        .basic_publish(
            "".into(),
            raw_q.clone(),
            BasicPublishOptions::default(),
            &command(0),
            BasicProperties::default(),
        )
        .await
        .expect_err("publishing on a dead connection fails");
    assert_same("publish after the fault", &Some(traced), &Some(raw));
    let traced = orch
        .basic_get(cmd_h.clone(), BasicGetOptions::default())
        .await
        .expect_err("basic_get on a dead connection fails");
    let raw = raw_pub
        .basic_get(raw_q.clone(), BasicGetOptions::default())
        .await
        .expect_err("basic_get on a dead connection fails");
    assert_same("basic_get after the fault", &Some(traced), &Some(raw));
    let traced = critic
        .basic_consume(
            cmd_s.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("basic_consume on a dead connection fails");
    let raw = raw_sub
        .basic_consume(
            raw_q.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("basic_consume on a dead connection fails");
    assert_same("basic_consume after the fault", &Some(traced), &Some(raw));

    // Every span started has ended and was exported.
    let started = spans.stats().started();
    assert_eq!(started, spans.stats().ended(), "spans left open");
    flush(&[&p]).await;
    let received = rx
        .wait_for_spans(started as usize, Duration::from_secs(20))
        .await;
    assert_eq!(received.len() as u64, started, "spans exported");
    assert!(started > started_before, "spans went on until the fault");

    // An error status always comes with an `error.type`.
    for s in received.iter() {
        if s.status.code == StatusCode::Error {
            assert!(
                s.attr_str("error.type").is_some_and(|t| !t.is_empty()),
                "error span without error.type: {s:?}"
            );
        }
    }
    let count = |f: &dyn Fn(&ReceivedSpan) -> bool| received.iter().filter(|s| f(s)).count() as u64;
    let is = |s: &ReceivedSpan, kind: SpanKind, name: &str| s.kind == kind && s.name == name;
    let failed = |s: &ReceivedSpan| s.status.code == StatusCode::Error;

    // PRODUCER spans of COMMANDs: one per publish call (the one that failed,
    // and the one after the fault, included); all but the acked ones are
    // errors.
    for (queue, calls) in [
        (&cmd_h, orch_report.published.div_ceil(2)),
        (&cmd_s, orch_report.published / 2),
    ] {
        let name = format!("publish {queue}");
        let total = count(&|s| is(s, SpanKind::Producer, &name));
        let errors = count(&|s| is(s, SpanKind::Producer, &name) && failed(s));
        let ok = count(&|s| {
            is(s, SpanKind::Producer, &name)
                && !failed(s)
                && s.attr_str("mindbus.publish.confirm") == Some("ack")
        });
        assert!(
            total >= calls,
            "{name}: {total} spans for {calls} publishes"
        );
        assert_eq!(ok + errors, total, "{name}: every span acked or failed");
    }
    let command_errors = count(&|s| {
        s.kind == SpanKind::Producer
            && (s.name == format!("publish {cmd_h}") || s.name == format!("publish {cmd_s}"))
            && failed(s)
    });
    assert_eq!(
        command_errors,
        orch_report.confirm_errors + orch_report.publish_errors + orch_report.nacked + 1,
        "failed COMMAND publishes ({orch_report:?})"
    );
    assert!(orch_report.confirm_errors + orch_report.publish_errors > 0);

    // CONSUMER spans: one per delivery; every delivery whose settlement did
    // not reach the broker ends with an error.
    let handler_name = format!("process {cmd_h}");
    let stats = handler.stats();
    assert_eq!(
        stats.delivered(),
        stats.acked() + stats.nacked() + stats.settle_errors(),
        "every delivery handed to the handler is accounted for ({stats:?})"
    );
    assert_eq!(
        count(&|s| is(s, SpanKind::Consumer, &handler_name)),
        stats.delivered()
    );
    assert_eq!(
        count(&|s| is(s, SpanKind::Consumer, &handler_name) && !failed(s)),
        stats.acked(),
        "handler style: only applied acks end without an error (stats {stats:?})"
    );
    for (queue, report) in [(&cmd_s, &critic_report), (&replies, &replies_report)] {
        let name = format!("process {queue}");
        assert_eq!(
            count(&|s| is(s, SpanKind::Consumer, &name)),
            report.delivered
        );
        assert_eq!(
            count(&|s| is(s, SpanKind::Consumer, &name) && !failed(s)),
            report.acked,
            "{name}: only applied acks end without an error ({report:?})"
        );
    }
    let interrupted = count(&|s| s.kind == SpanKind::Consumer && failed(s));
    assert!(interrupted > 0, "deliveries were in flight at the fault");
    // Replies: a PRODUCER span per publish call, errors for the failed ones.
    let reply_errors = count(&|s| {
        s.kind == SpanKind::Producer && s.name == format!("publish {replies}") && failed(s)
    });
    assert_eq!(
        reply_errors,
        reply_errors_h.load(Ordering::Relaxed) + critic_report.reply_errors
    );

    // Nothing keeps growing.
    assert_eq!(spans.in_flight(), 0, "in-flight COMMAND table");
    assert!(max_pending_seen.load(Ordering::Relaxed) <= MAX_PENDING as u64);
    assert!(tasks.pending() <= MAX_PENDING);
    assert!(
        eventually(Duration::from_millis(COMMAND_TTL_MS + 3_000), || tasks
            .pending()
            == 0)
        .await,
        "unanswered COMMANDs expire from the pending table ({} left)",
        tasks.pending()
    );

    for q in [&cmd_h, &cmd_s, &replies, &raw_q] {
        delete_queue(&ach, q.as_str()).await;
    }
    close(&admin).await;
    drop(proxy);
    shutdown(vec![p]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_closes_the_connection_under_load() {
    connection_dies_under_load(Fault::BrokerClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut_under_load() {
    connection_dies_under_load(Fault::NetworkCut).await;
}

// ------------------------------------------------------------- recovery

/// lapin 4.12's auto-recovery (`ConnectionProperties::enable_auto_recover`):
/// the broker closes the connection; lapin reconnects and replays the
/// channels, QoS, confirms and consumers; both consumer styles resume and
/// new CONSUMER and PRODUCER spans follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_and_spans_resume_after_lapin_recovery() {
    let rx = OtlpReceiver::start().await.unwrap();
    let p = provider("recovery", &rx, Proto::Grpc);
    let spans = MessagingSpans::default().with_tracer_provider(&p);
    let admin = connect().await;
    let ach = admin.create_channel().await.unwrap();
    let q_handler = declare_queue(&ach, &unique("faults.recover.h"), FieldTable::default()).await;
    let q_stream = declare_queue(&ach, &unique("faults.recover.s"), FieldTable::default()).await;

    let name = unique("faults.recover.conn");
    let conn = connection(&name, None, true).await;
    let traced = |ch: Channel| {
        TracedChannel::builder(ch)
            .with(TraceContext::default())
            .with(spans.clone())
            .build()
    };
    let pub_ch = conn.create_channel().await.unwrap();
    pub_ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publisher_ch = traced(pub_ch);
    let handler_ch = traced(conn.create_channel().await.unwrap());
    let stream_ch = traced(conn.create_channel().await.unwrap());
    for ch in [&handler_ch, &stream_ch] {
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    }

    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let handle = handler_ch
        .consume_with(
            q_handler.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |_d| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::Relaxed);
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();
    let mut consumer = consume_stream(&stream_ch, q_stream.as_str()).await;
    let stream_tag = consumer.tag();
    let streamed = Arc::new(AtomicU64::new(0));
    let stream_errors: Arc<Mutex<Vec<lapin::Error>>> = Arc::default();
    let (s, se, sch) = (streamed.clone(), stream_errors.clone(), stream_ch.clone());
    let stream_task = tokio::spawn(async move {
        while let Some(item) = consumer.next().await {
            match item {
                Ok(d) => {
                    if matches!(
                        ack_guarded(d.ack(BasicAckOptions::default())).await,
                        Some(Ok(true))
                    ) {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    se.lock().unwrap().push(e.clone());
                    // lapin's documented pattern: wait, then go on.
                    if sch.wait_for_recovery(e).await.is_err() {
                        break;
                    }
                }
            }
        }
    });

    // A traced publisher with confirms that waits for recovery on errors.
    let stop = Arc::new(AtomicBool::new(false));
    let publish_errors: Arc<Mutex<Vec<lapin::Error>>> = Arc::default();
    let (st, pe, pc, qh, qs) = (
        stop.clone(),
        publish_errors.clone(),
        publisher_ch.clone(),
        q_handler.clone(),
        q_stream.clone(),
    );
    let publisher = tokio::spawn(async move {
        let mut i = 0u64;
        while !st.load(Ordering::Relaxed) {
            let queue = if i.is_multiple_of(2) {
                qh.clone()
            } else {
                qs.clone()
            };
            i += 1;
            let res = match pc
                .basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                pe.lock().unwrap().push(e.clone());
                if pc.wait_for_recovery(e).await.is_err() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    assert!(
        eventually(HANG_GUARD, || handled.load(Ordering::Relaxed) >= 50
            && streamed.load(Ordering::Relaxed) >= 50)
        .await,
        "consuming before the fault"
    );
    broker_close(&name, "broker_faults recovery test").await;
    // The publisher sees the fault, then lapin recovers. (With recovery on, lapin does not report the fault on the
    // consumer streams: they pause and resume.)
    assert!(
        eventually(HANG_GUARD, || !publish_errors.lock().unwrap().is_empty()).await,
        "the publisher saw the connection error (connected: {})",
        conn.status().connected()
    );
    // The forced close itself (a pending confirm) or the channel being
    // recovered (a publish in the meantime), depending on timing.
    let fault = publish_errors.lock().unwrap()[0].clone();
    assert!(
        matches!(fault.kind(), ErrorKind::ProtocolError(e) if e.get_id() == 320)
            || matches!(
                fault.kind(),
                ErrorKind::InvalidChannelState(lapin::ChannelState::Reconnecting, _)
            ),
        "{fault:?}"
    );
    guard("recovery", publisher_ch.wait_for_recovery(fault))
        .await
        .expect("lapin recovers from CONNECTION_FORCED");
    let recovered_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (h0, s0) = (
        handled.load(Ordering::Relaxed),
        streamed.load(Ordering::Relaxed),
    );
    assert!(
        eventually(HANG_GUARD, || handled.load(Ordering::Relaxed) >= h0 + 50
            && streamed.load(Ordering::Relaxed) >= s0 + 50)
        .await,
        "consumption resumed after recovery (handler {} -> {}, stream {} -> {})",
        h0,
        handled.load(Ordering::Relaxed),
        s0,
        streamed.load(Ordering::Relaxed)
    );
    assert!(!handle.is_finished(), "the handler consumer survived");
    stop.store(true, Ordering::Relaxed);
    guard("publisher", publisher).await.unwrap();
    handle.cancel().await.unwrap();
    stream_ch
        .basic_cancel(stream_tag, Default::default())
        .await
        .unwrap();
    guard("stream consumer", stream_task).await.unwrap();

    let started = spans.stats().started();
    assert!(
        eventually(Duration::from_secs(5), || spans.stats().ended()
            == spans.stats().started())
        .await,
        "spans left open: {} started, {} ended",
        spans.stats().started(),
        spans.stats().ended()
    );
    flush(&[&p]).await;
    let received = rx
        .wait_for_spans(spans.stats().started() as usize, Duration::from_secs(20))
        .await;
    assert!(received.len() as u64 >= started);
    for (kind, name) in [
        (SpanKind::Consumer, format!("process {q_handler}")),
        (SpanKind::Consumer, format!("process {q_stream}")),
        (SpanKind::Producer, format!("publish {q_handler}")),
    ] {
        let n = received
            .iter()
            .filter(|s| s.kind == kind && s.name == name && s.start_unix_nanos > recovered_at)
            .count();
        assert!(n >= 10, "{name}: {n} spans after the recovery");
    }
    delete_queue(&ach, q_handler.as_str()).await;
    delete_queue(&ach, q_stream.as_str()).await;
    close(&conn).await;
    close(&admin).await;
    shutdown(vec![p]).await;
}

// ------------------------------------------------------------- process end

/// The runtime shuts down (the process is stopping) while a handler-style
/// consumer is inside a handler: the consumer task is dropped mid-handler,
/// and the CONSUMER span still ends (as `unsettled`), like every span the
/// plugin starts.
#[test]
fn a_handler_cut_short_by_runtime_shutdown_still_ends_its_span() {
    let spans = MessagingSpans::default();
    let (queue, name) = (unique("faults.shutdown"), unique("faults.shutdown.conn"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = spans.clone();
    let q = queue.clone();
    let entered = Arc::new(AtomicBool::new(false));
    let e = entered.clone();
    let (conn, handle) = runtime.block_on(async move {
        let conn = connection(&name, None, false).await;
        let ch = conn.create_channel().await.unwrap();
        declare_queue(&ch, &q, FieldTable::default()).await;
        let traced = TracedChannel::builder(conn.create_channel().await.unwrap())
            .with(TraceContext::default())
            .with(s.clone())
            .build();
        let handle = traced
            .consume_with(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
                move |_d| {
                    // Called once the delivery's span has started.
                    e.store(true, Ordering::SeqCst);
                    std::future::pending::<Result<(), String>>()
                },
            )
            .await
            .unwrap();
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        assert!(eventually(HANG_GUARD, || entered.load(Ordering::SeqCst)).await);
        (conn, handle)
    });
    assert_eq!((spans.stats().started(), spans.stats().ended()), (1, 0));
    drop(runtime);
    assert_eq!(
        (spans.stats().started(), spans.stats().ended()),
        (1, 1),
        "the span of the message in hand ended"
    );
    drop((handle, conn));

    let cleanup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    cleanup.block_on(async {
        let conn = connect().await;
        let ch = conn.create_channel().await.unwrap();
        delete_queue(&ch, &queue).await;
        close(&conn).await;
    });
}
