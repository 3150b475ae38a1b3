//! The AI_TEAM scenario over the MindBus protocol: an orchestrator hands a
//! task to a writer, then to a critic, and announces the outcome; every
//! message is traced and counted by mindbus-otel, without any telemetry code
//! in the agents' message handling beyond wrapping the channel.
//!
//! ```text
//! cargo run --example ai_team                      # all roles in one process, 3 tasks
//! cargo run --example ai_team -- --tasks 5
//! cargo run --example ai_team -- --role writer     # one long-lived role
//! cargo run --example ai_team -- --role writer --max-messages 2
//! cargo run --example ai_team -- --serve           # live traffic until Ctrl-C
//! cargo run --example ai_team -- --serve --rate 5  # five tasks a second
//! ```
//!
//! Environment: `MINDBUS_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! `MINDBUS_EXCHANGE` (default `mindbus.main`), the `OTEL_*` variables and
//! `METRICS_ADDR` of `mindbus-telemetry`, `MINDBUS_QUEUE_PREFIX` and
//! `MINDBUS_MANAGEMENT_PORT` (see the README). With no OTLP endpoint, each task's
//! trace is printed as a tree; with one, it also goes to the collector.
//!
//! The last task fails on purpose (the writer answers `DEADLINE_EXCEEDED`)
//! so errors show up in traces and metrics too. With `--serve`, about one
//! task in five fails, in turn: the writer answers `DEADLINE_EXCEEDED`, the
//! critic answers `RESOURCE_EXHAUSTED`, or the writer answers too late and
//! the orchestrator gives up waiting.

use futures_util::StreamExt;
use mindbus_otel::genai::LlmCall;
use mindbus_otel::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, ShortString};
use mindbus_otel::lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use mindbus_otel::opentelemetry::context::FutureExt as _;
use mindbus_otel::opentelemetry::trace::{
    Span as _, Status, TraceContextExt, Tracer, TracerProvider as _,
};
use mindbus_otel::opentelemetry::{Context, KeyValue};
use mindbus_otel::{
    AgentMetrics, MessagingSpans, TaskMetrics, TraceContext, TracedChannel, TracedDelivery,
};
use mindbus_telemetry::opentelemetry_sdk::trace::SdkTracerProvider;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, oneshot};

#[path = "support/broker.rs"]
mod broker;
#[path = "support/management.rs"]
mod management;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Queue and dead-letter names; `MINDBUS_QUEUE_PREFIX` prefixes them (for
/// side-by-side runs and tests).
struct Names {
    prefix: String,
    dlx: String,
    dead_letters: String,
    writer: String,
    critic: String,
}

impl Names {
    fn from_env() -> Names {
        let p = std::env::var("MINDBUS_QUEUE_PREFIX").unwrap_or_default();
        Names {
            dlx: format!("{p}mindbus.dlx"),
            dead_letters: format!("{p}mindbus.dead-letters"),
            writer: format!("{p}agent.writer"),
            critic: format!("{p}agent.critic"),
            prefix: p,
        }
    }
}
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
struct Args {
    tasks: u64,
    role: Option<String>,
    max_messages: Option<u64>,
    linger: Duration,
    /// `--serve`: all roles in one process, tasks at `rate` a second until
    /// stopped.
    serve: bool,
    rate: f64,
    /// How long stopping may take, whatever the broker and the collector do.
    shutdown_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        tasks: 3,
        role: None,
        max_messages: None,
        linger: Duration::ZERO,
        serve: false,
        rate: 1.0,
        shutdown_timeout: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--tasks" => {
                args.tasks = value("--tasks")?
                    .parse()
                    .map_err(|e| format!("--tasks: {e}"))?
            }
            "--role" => {
                let r = value("--role")?;
                if !["orchestrator", "writer", "critic"].contains(&r.as_str()) {
                    return Err(format!(
                        "--role must be orchestrator, writer or critic, not {r}"
                    ));
                }
                args.role = Some(r);
            }
            "--max-messages" => {
                args.max_messages = Some(
                    value("--max-messages")?
                        .parse()
                        .map_err(|e| format!("--max-messages: {e}"))?,
                )
            }
            "--linger" => {
                let secs: u64 = value("--linger")?
                    .parse()
                    .map_err(|e| format!("--linger: {e}"))?;
                args.linger = Duration::from_secs(secs);
            }
            "--serve" => args.serve = true,
            "--shutdown-timeout" => {
                let secs: f64 = value("--shutdown-timeout")?
                    .parse()
                    .map_err(|e| format!("--shutdown-timeout: {e}"))?;
                if !(secs.is_finite() && (0.5..=3600.0).contains(&secs)) {
                    return Err(format!(
                        "--shutdown-timeout is seconds, between 0.5 and 3600, not {secs}"
                    ));
                }
                args.shutdown_timeout = Duration::from_secs_f64(secs);
            }
            "--rate" => {
                let rate: f64 = value("--rate")?
                    .parse()
                    .map_err(|e| format!("--rate: {e}"))?;
                if !(rate.is_finite() && (0.01..=1000.0).contains(&rate)) {
                    return Err(format!(
                        "--rate is tasks per second, between 0.01 and 1000, not {rate}"
                    ));
                }
                args.rate = rate;
            }
            "-h" | "--help" => {
                println!(
                    "usage: ai_team [--tasks N | --serve [--rate PER_SEC]] [--role orchestrator|writer|critic] [--max-messages N] [--linger SECS]\n\
                     --serve: all roles in one process, a task every second (or --rate a second), about 1 in 5 failing, until Ctrl-C;\n\
                     \x20        with --role, that role until Ctrl-C (the orchestrator at --rate)\n\
                     --linger SECS: keep serving /metrics that long after the tasks, so a scraper sees the final values\n\
                     --shutdown-timeout SECS: stopping (Ctrl-C, SIGTERM, the end of the work) takes at most this long (default 10);\n\
                     \x20        the exit code is 3 when it was not clean (a message left to the broker, spans not exported)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// How a task is meant to end: the demo fails some on purpose, so that
/// errors show up in traces, metrics and dashboards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planned {
    Success,
    /// The writer answers an ERROR `DEADLINE_EXCEEDED`.
    WriterDeadline,
    /// The critic answers an ERROR `RESOURCE_EXHAUSTED`.
    CriticExhausted,
    /// The writer answers after the COMMAND's `timeout_seconds`: the
    /// orchestrator has given up, and drops the late reply.
    ReplyTimeout,
}

impl Planned {
    /// Live traffic: every fifth task fails, the three ways in turn.
    fn served(n: u64) -> Planned {
        match (n % 5, n / 5 % 3) {
            (0, 1) => Planned::WriterDeadline,
            (0, 2) => Planned::CriticExhausted,
            (0, _) => Planned::ReplyTimeout,
            _ => Planned::Success,
        }
    }
}

/// The COMMAND deadline (`timeout_seconds`) of a task meant to time out.
const SHORT_DEADLINE: Duration = Duration::from_secs(1);

/// A random UUID (v4 layout) for CloudEvents ids.
fn new_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let s = RandomState::new();
    let a = s.hash_one(N.fetch_add(1, Ordering::Relaxed));
    let b = s.hash_one(a ^ 0x9e37_79b9_7f4a_7c15);
    let v = (u128::from(a) << 64 | u128::from(b)) & !(0xf000u128 << 64) | (0x4000u128 << 64);
    let v = v & !(0xc000u128 << 48) | (0x8000u128 << 48);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn cloudevent(kind: &str, source: &str, id: &str, subject: &str, data: Value) -> Vec<u8> {
    let ev = json!({
        "specversion": "1.0",
        "type": format!("ai.team.{kind}"),
        "source": source,
        "id": id,
        "time": now_rfc3339(),
        "datacontenttype": "application/json",
        "subject": subject,
        "data": data,
    });
    serde_json::to_vec(&ev).unwrap_or_default()
}

fn priority_for(kind: &str) -> u8 {
    match kind {
        "event" => 5,
        "control" => 255,
        _ => 20,
    }
}

fn props(kind: &str, id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(priority_for(kind))
        .with_message_id(id.into())
}

/// One exchange or queue of the MindBus topology, as the protocol (and its
/// reference Python client) declares it.
struct Decl {
    name: String,
    /// `Some` for an exchange (its type), `None` for a queue.
    exchange: Option<ExchangeKind>,
    args: FieldTable,
    /// The declaration in words, for the refusal line.
    expected: &'static str,
}

/// The topology, in declaration order: the agent queues exactly as the
/// protocol declares them (durable, `x-max-priority: 255`, nothing else),
/// so agents written against either client share one queue per role; the
/// bus and dead-letter exchanges; the dead-letter queue.
fn topology(exchange: &str, names: &Names) -> Vec<Decl> {
    let mut agent_args = FieldTable::default();
    agent_args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(255));
    let mut out: Vec<Decl> = [&names.writer, &names.critic]
        .into_iter()
        .map(|queue| Decl {
            name: queue.clone(),
            exchange: None,
            args: agent_args.clone(),
            expected: "durable, x-max-priority 255",
        })
        .collect();
    out.extend([
        Decl {
            name: exchange.to_owned(),
            exchange: Some(ExchangeKind::Topic),
            args: FieldTable::default(),
            expected: "durable topic",
        },
        Decl {
            name: names.dlx.clone(),
            exchange: Some(ExchangeKind::Fanout),
            args: FieldTable::default(),
            expected: "durable fanout",
        },
        Decl {
            name: names.dead_letters.clone(),
            exchange: None,
            args: FieldTable::default(),
            expected: "durable, no arguments",
        },
    ]);
    out
}

async fn declare(ch: &TracedChannel, d: &Decl) -> Result<(), BoxError> {
    let outcome = match &d.exchange {
        Some(kind) => {
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.exchange_declare(
                d.name.as_str().into(),
                kind.clone(),
                durable,
                d.args.clone(),
            )
            .await
        }
        None => {
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(d.name.as_str().into(), durable, d.args.clone())
                .await
                .map(|_| ())
        }
    };
    outcome.map_err(|e| match e.kind() {
        mindbus_otel::lapin::ErrorKind::ProtocolError(amqp) => {
            let (what, delete) = match d.exchange {
                Some(_) => (
                    "exchange",
                    format!("rabbitmqadmin delete exchange name={}", d.name),
                ),
                None => ("queue", format!("rabbitmqctl delete_queue {}", d.name)),
            };
            format!(
                "{what} {} exists with other arguments than the protocol's ({}): {}; \
                 delete it ({delete}) or declare it as MindBus does",
                d.name,
                d.expected,
                amqp.get_message()
            )
            .into()
        }
        _ => e.into(),
    })
}

/// Whether `d` exists, asked of the management API (a passive declare of
/// a missing object would close its channel, which lapin logs as an
/// error). `false` when the API does not answer.
async fn exists(api: Option<&management::Management>, d: &Decl) -> bool {
    let Some(api) = api else {
        return false;
    };
    let kind = if d.exchange.is_some() {
        "exchanges"
    } else {
        "queues"
    };
    api.exists(kind, &d.name).await.unwrap_or(false)
}

/// Declares the MindBus topology; declaring twice is harmless. What exists
/// already (as the management API says) is checked first, by declaring it
/// as the protocol does, which creates nothing: a refusal (an object
/// declared otherwise) stops the start before anything was created, so a
/// refused start leaves nothing behind. Without the management API the
/// agent queues, the likeliest to be refused (they are shared with agents
/// on other clients), are declared first. The refusal is one line naming
/// the object and the argument.
async fn declare_topology(
    url: &str,
    ch: &TracedChannel,
    exchange: &str,
    names: &Names,
) -> Result<(), BoxError> {
    let decls = topology(exchange, names);
    let api = management::Management::for_broker(url).ok();
    for d in &decls {
        if exists(api.as_ref(), d).await {
            declare(ch, d).await?;
        }
    }
    for d in &decls {
        declare(ch, d).await?;
    }
    ch.queue_bind(
        names.dead_letters.as_str().into(),
        names.dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    for (queue, key) in [
        (names.writer.as_str(), "cmd.writer.*"),
        (names.critic.as_str(), "cmd.critic.*"),
    ] {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// The policy that dead-letters nacked COMMANDs of this deployment's agent
/// queues (`{prefix}agent.*`) to its dead-letter exchange.
fn dead_letter_policy(names: &Names) -> (String, String) {
    (
        format!("{}mindbus-dead-letters", names.prefix),
        format!("^{}agent\\.", management::regex_escape(&names.prefix)),
    )
}

/// Dead-lettering for the agent queues as RabbitMQ recommends it: a policy,
/// which can change without redeclaring the queues (queue arguments would
/// make them inequivalent to the protocol's declaration). Set through the
/// management API when it answers; a policy already in effect on the queue
/// that dead-letters is kept. Otherwise says, in one line, that nacked
/// COMMANDs will be dropped and how to set the policy by hand.
async fn ensure_dead_letter_policy(url: &str, names: &Names) {
    let (policy, pattern) = dead_letter_policy(names);
    let definition = json!({ "dead-letter-exchange": names.dlx });
    let outcome = async {
        let api = management::Management::for_broker(url)?;
        if let Some((name, def)) = api.queue_policy(&names.writer).await?
            && def.get("dead-letter-exchange").is_some()
            && name != policy
        {
            return Ok(api);
        }
        api.put_policy(&policy, &pattern, definition.clone())
            .await
            .map(|()| api)
    }
    .await;
    if let Err(why) = outcome {
        eprintln!(
            "ai_team: no dead-letter policy ({why}): nacked COMMANDs will be dropped; \
             to keep them: rabbitmqctl set_policy {policy} '{pattern}' '{definition}' --apply-to queues"
        );
    }
}

/// A channel wrapped with the standard chain, its spans going to `provider`.
async fn traced(
    conn: &Connection,
    agent: &str,
    provider: &SdkTracerProvider,
    task_metrics: Option<&TaskMetrics>,
) -> Result<TracedChannel, BoxError> {
    // The broker, for server.address / server.port on spans and metrics.
    let (host, port) = broker_host_port();
    let mut b = TracedChannel::builder(conn.create_channel().await?)
        .agent(agent)
        .with(TraceContext::default())
        .with(
            MessagingSpans::default()
                .with_tracer_provider(provider)
                .server(host.clone(), port),
        )
        .with(AgentMetrics::default().server(host, port));
    if let Some(tm) = task_metrics {
        b = b.with(tm.clone());
    }
    Ok(b.build())
}

/// Simulated work: tens of milliseconds, so the demo finishes fast.
async fn work(base_ms: u64, seed: &str) {
    let jitter = RandomState::new().hash_one(seed) % 20;
    tokio::time::sleep(Duration::from_millis(base_ms + jitter)).await;
}

/// A reply to a COMMAND: exchange "", routing key = its `reply_to`.
async fn reply(
    ch: &TracedChannel,
    delivery: &mindbus_otel::lapin::message::Delivery,
    body: Vec<u8>,
    id: &str,
) -> Result<(), BoxError> {
    let Some(reply_to) = delivery.properties.reply_to().clone() else {
        return Ok(());
    };
    let mut p = props("result", id);
    if let Some(c) = delivery.properties.correlation_id().clone() {
        p = p.with_correlation_id(c);
    }
    ch.basic_publish(
        "".into(),
        reply_to,
        BasicPublishOptions::default(),
        &body,
        p,
    )
    .await?
    .await?;
    Ok(())
}

fn error_body(
    source: &str,
    subject: &str,
    code: &str,
    message: &str,
    started: Instant,
) -> (String, Vec<u8>) {
    let id = new_id();
    let body = cloudevent(
        "error",
        source,
        &id,
        subject,
        json!({
            "error": {"code": code, "message": message, "retryable": code != "INVALID_ARGUMENT"},
            "execution_time_ms": started.elapsed().as_millis() as u64,
        }),
    );
    (id, body)
}

/// The writer: answers `generate_article` COMMANDs.
async fn writer_handler(
    ch: TracedChannel,
    provider: SdkTracerProvider,
    delivery: mindbus_otel::lapin::message::Delivery,
) -> Result<(), String> {
    const ME: &str = "agent.writer.001";
    let started = Instant::now();
    let event: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let action = event
        .as_ref()
        .and_then(|e| e["data"]["action"].as_str())
        .map(str::to_owned);
    let subject = event
        .as_ref()
        .and_then(|e| e["subject"].as_str())
        .unwrap_or("")
        .to_owned();
    let Some(action) = action.filter(|_| event.as_ref().is_some_and(|e| e["specversion"] == "1.0"))
    else {
        // Not JSON, not a CloudEvent, or no action: INVALID_ARGUMENT, and
        // the COMMAND is dead-lettered.
        let (id, body) = error_body(
            ME,
            &subject,
            "INVALID_ARGUMENT",
            "not a MindBus COMMAND",
            started,
        );
        reply(&ch, &delivery, body, &id)
            .await
            .map_err(|e| e.to_string())?;
        return Err("unreadable COMMAND".to_owned());
    };
    tracing::info!(target: "ai_team", %action, %subject, "writer: COMMAND received");
    let params = event
        .as_ref()
        .map(|e| e["data"]["params"].clone())
        .unwrap_or(Value::Null);
    let tracer = provider.tracer("ai_team.writer");

    // The LLM call: a GenAI CLIENT span (`chat gpt-4`) and the GenAI
    // metrics, under the COMMAND's CONSUMER span.
    let model = "gpt-4";
    let (input_tokens, output_tokens) = (1200_u64, 2300_u64);
    let mut llm = LlmCall::start("chat", "openai", model, &provider);
    let llm_started = Instant::now();
    work(30, &subject).await;
    if let Some(ms) = params["simulate_delay_ms"].as_u64() {
        // A slow model: the answer comes after the orchestrator gave up.
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let latency_ms = llm_started.elapsed().as_millis() as u64;

    if let Some(code) = params["simulate_error"].as_str() {
        llm.fail("timeout");
        llm.end();
        tracing::info!(target: "ai_team", model, latency_ms, "writer: LLM call timed out");
        let (id, body) = error_body(
            ME,
            &subject,
            code,
            "LLM request exceeded its timeout",
            started,
        );
        reply(&ch, &delivery, body, &id)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(target: "ai_team", code, %subject, "writer: ERROR sent");
        // The error was reported to the orchestrator: the COMMAND is done.
        return Ok(());
    }
    llm.usage(input_tokens, output_tokens)
        .response_model(model)
        .finish_reasons(&["stop"]);
    llm.end();
    tracing::info!(
        target: "ai_team", model, input_tokens, output_tokens, latency_ms,
        "writer: LLM call done"
    );

    let mut save = tracer.start("save_artifact");
    work(5, &action).await;
    save.end();

    let topic = params["topic"].as_str().unwrap_or("AI");
    let article = format!("An article about {topic}: ...");
    let id = new_id();
    let body = cloudevent(
        "result",
        ME,
        &id,
        &subject,
        json!({
            "status": "SUCCESS",
            "output": {"article": article, "word_count": 2047},
            "execution_time_ms": started.elapsed().as_millis() as u64,
            "metrics": {"model": model, "tokens_used": input_tokens + output_tokens,
                        "estimated_cost_usd": 0.105, "latency_ms": latency_ms},
        }),
    );
    reply(&ch, &delivery, body, &id)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(target: "ai_team", %subject, word_count = 2047, "writer: RESULT sent");
    Ok(())
}

/// The critic: answers `review_article` COMMANDs with a quality score.
async fn critic_handler(
    ch: TracedChannel,
    provider: SdkTracerProvider,
    delivery: mindbus_otel::lapin::message::Delivery,
) -> Result<(), String> {
    const ME: &str = "agent.critic.001";
    let started = Instant::now();
    let event: Value = serde_json::from_slice(&delivery.data).map_err(|e| e.to_string())?;
    let subject = event["subject"].as_str().unwrap_or("").to_owned();
    tracing::info!(
        target: "ai_team",
        action = event["data"]["action"].as_str().unwrap_or("unknown"),
        %subject,
        "critic: COMMAND received"
    );
    let mut llm = LlmCall::start("chat", "openai", "gpt-4o-mini", &provider);
    work(15, &subject).await;
    if let Some(code) = event["data"]["params"]["simulate_error"].as_str() {
        // The provider's answer to a used-up quota: HTTP 429.
        llm.fail("429");
        llm.end();
        tracing::info!(target: "ai_team", model = "gpt-4o-mini", "critic: LLM call refused (quota)");
        let (id, body) = error_body(ME, &subject, code, "LLM quota exhausted", started);
        reply(&ch, &delivery, body, &id)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(target: "ai_team", code, %subject, "critic: ERROR sent");
        return Ok(());
    }
    llm.usage(2400, 200)
        .response_model("gpt-4o-mini")
        .finish_reasons(&["stop"]);
    llm.end();
    tracing::info!(
        target: "ai_team", model = "gpt-4o-mini", input_tokens = 2400, output_tokens = 200,
        "critic: LLM call done"
    );
    let score = 6.0 + (RandomState::new().hash_one(&subject) % 40) as f64 / 10.0;
    let id = new_id();
    let body = cloudevent(
        "result",
        ME,
        &id,
        &subject,
        json!({
            "status": "SUCCESS",
            "output": {"quality_score": score, "comments": ["clear structure"]},
            "execution_time_ms": started.elapsed().as_millis() as u64,
            "metrics": {"model": "gpt-4o-mini", "tokens_used": 2600, "estimated_cost_usd": 0.0012},
        }),
    );
    reply(&ch, &delivery, body, &id)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(target: "ai_team", %subject, quality_score = score, "critic: RESULT sent");
    Ok(())
}

/// Replies the orchestrator waits for, by correlation id.
#[derive(Default)]
struct Pending(Mutex<HashMap<String, oneshot::Sender<Value>>>);

/// The orchestrator's reply consumer (stream style).
async fn route_replies(mut consumer: mindbus_otel::TracedConsumer, pending: Arc<Pending>) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let delivery: TracedDelivery = delivery;
        let corr = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string());
        let body: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
        let waiter = corr.and_then(|c| pending.0.lock().ok()?.remove(&c));
        let _ = delivery.ack(BasicAckOptions::default()).await;
        if let Some(w) = waiter {
            let _ = w.send(body);
        }
    }
}

struct Orchestrator {
    ch: TracedChannel,
    exchange: String,
    reply_to: ShortString,
    pending: Arc<Pending>,
    provider: SdkTracerProvider,
}

impl Orchestrator {
    /// Sends a COMMAND with `deadline` as its `timeout_seconds` and waits
    /// for its RESULT or ERROR (at most [`REPLY_TIMEOUT`]).
    async fn call(
        &self,
        role: &str,
        action: &str,
        subject: &str,
        params: Value,
        deadline: Duration,
    ) -> Result<Value, BoxError> {
        let id = new_id();
        let body = cloudevent(
            "command",
            "orchestrator-core",
            &id,
            subject,
            json!({"action": action, "params": params, "timeout_seconds": deadline.as_secs(),
                   "context": {"process_id": "blog-001", "step": action}}),
        );
        let wait = deadline.min(REPLY_TIMEOUT);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.0.lock() {
            p.insert(id.clone(), tx);
        }
        let p = props("command", &id)
            .with_reply_to(self.reply_to.clone())
            .with_correlation_id(id.as_str().into())
            .with_expiration("300000".into());
        let key = format!("cmd.{role}.any");
        tracing::info!(target: "ai_team", role, action, subject, "orchestrator: COMMAND sent");
        self.ch
            .basic_publish(
                self.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                &body,
                p,
            )
            .await?
            .await?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(v)) => Ok(v),
            _ => {
                if let Ok(mut p) = self.pending.0.lock() {
                    p.remove(&id);
                }
                Err(format!("no reply from {role} to {action} within {wait:?}").into())
            }
        }
    }

    async fn event(&self, name: &str, subject: &str, data: Value) -> Result<(), BoxError> {
        let id = new_id();
        let body = cloudevent(
            "event",
            "orchestrator-core",
            &id,
            subject,
            json!({
            "event_type": name, "event_data": data, "severity": "INFO", "tags": ["task"]}),
        );
        self.ch
            .basic_publish(
                self.exchange.as_str().into(),
                format!("evt.{name}").into(),
                BasicPublishOptions::default(),
                &body,
                props("event", &id),
            )
            .await?
            .await?;
        Ok(())
    }

    /// One task: writer, then critic, then the announcement.
    async fn execute_task(&self, n: u64, plan: Planned) -> Result<f64, BoxError> {
        let subject = format!("task-article-{n}");
        let tracer = self.provider.tracer("ai_team.orchestrator");
        let mut span = tracer.start("execute_task");
        span.set_attribute(KeyValue::new("mindbus.task.subject", subject.clone()));
        let cx = Context::current_with_span(span);
        let outcome: Result<f64, BoxError> = async {
            let normal = Duration::from_secs(300);
            let mut params = json!({"topic": "AI trends", "length": 2000});
            let mut deadline = normal;
            match plan {
                Planned::WriterDeadline => params["simulate_error"] = json!("DEADLINE_EXCEEDED"),
                Planned::ReplyTimeout => {
                    deadline = SHORT_DEADLINE;
                    params["simulate_delay_ms"] = json!(SHORT_DEADLINE.as_millis() as u64 + 500);
                }
                Planned::Success | Planned::CriticExhausted => {}
            }
            let article = self
                .call("writer", "generate_article", &subject, params, deadline)
                .await?;
            if article["type"] != "ai.team.result" {
                let code = article["data"]["error"]["code"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_owned();
                return Err(format!("writer failed: {code}").into());
            }
            let mut params = json!({"article": article["data"]["output"]["article"]});
            if plan == Planned::CriticExhausted {
                params["simulate_error"] = json!("RESOURCE_EXHAUSTED");
            }
            let review = self
                .call("critic", "review_article", &subject, params, normal)
                .await?;
            if review["type"] != "ai.team.result" {
                let code = review["data"]["error"]["code"]
                    .as_str()
                    .unwrap_or("UNKNOWN")
                    .to_owned();
                return Err(format!("critic failed: {code}").into());
            }
            let score = review["data"]["output"]["quality_score"]
                .as_f64()
                .unwrap_or(0.0);
            self.event(
                "task.completed",
                &subject,
                json!({"task_id": subject, "quality_score": score}),
            )
            .await?;
            tracing::info!(target: "ai_team", %subject, quality_score = score, "orchestrator: task completed");
            Ok(score)
        }
        .with_context(cx.clone())
        .await;
        if let Err(e) = &outcome {
            let _ = self
                .event(
                    "task.failed",
                    &subject,
                    json!({"task_id": subject, "reason": e.to_string()}),
                )
                .with_context(cx.clone())
                .await;
            let _in_task = cx.clone().attach();
            tracing::info!(target: "ai_team", %subject, reason = %e, "orchestrator: task failed");
            cx.span().set_status(Status::error(e.to_string()));
        }
        cx.span().end();
        outcome
    }
}

/// The host and port of `MINDBUS_URL` (5672 when it names none).
fn broker_host_port() -> (String, u16) {
    match broker_url().parse::<mindbus_otel::lapin::uri::AMQPUri>() {
        Ok(uri) => (uri.authority.host, uri.authority.port),
        Err(_) => ("127.0.0.1".to_owned(), 5672),
    }
}

/// Connects to the broker, or exits with one line that says what is missing
/// and how to start it (the URL without its credentials).
fn broker_url() -> String {
    std::env::var("MINDBUS_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// Connects as `name` (what the management UI lists the connection as),
/// each attempt bounded ([`broker::connect_bounded`]).
async fn connect(name: &str) -> Connection {
    let url = broker_url();
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let outcome = broker::connect_bounded(&url, props).await;
    match outcome {
        Ok(conn) => conn,
        Err(e) => {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = host.split('/').next().unwrap_or_default();
            eprintln!(
                "ai_team: RabbitMQ does not answer on {host} ({e}): start it with `bash .ci/deps.sh`"
            );
            std::process::exit(1);
        }
    }
}

/// Counts handled messages and signals when `max` is reached.
#[derive(Clone)]
struct Budget {
    max: Option<u64>,
    seen: Arc<AtomicU64>,
    done: Arc<Notify>,
}

impl Budget {
    fn new(max: Option<u64>) -> Self {
        Budget {
            max,
            seen: Arc::default(),
            done: Arc::new(Notify::new()),
        }
    }
    fn tick(&self) {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if self.max.is_some_and(|m| n >= m) {
            self.done.notify_one();
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Ctrl-C or SIGTERM, listened for once for the whole process: every wait
/// on it, before or after the signal, sees it.
#[derive(Clone)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    fn listen() -> Stop {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        Stop(rx)
    }

    fn requested(&self) -> bool {
        *self.0.borrow()
    }

    async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// The shutdown path, bounded by `--shutdown-timeout`: the first half for
/// the broker side (the message in hand, the connection; every await gets
/// what is left of it), the second for the telemetry's last exports
/// (`mindbus-telemetry`'s own shutdown timeout). What was not clean is said
/// in one line each and makes the exit code 3.
#[derive(Default)]
struct Shutdown {
    deadline: Option<tokio::time::Instant>,
    problems: Vec<String>,
}

impl Shutdown {
    /// Starts the broker side's clock (once): `half` from now.
    fn start(&mut self, half: Duration) {
        self.deadline
            .get_or_insert_with(|| tokio::time::Instant::now() + half);
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.deadline.unwrap_or_else(tokio::time::Instant::now)
    }

    /// Stops a consumer after its message in hand, or leaves that message
    /// to the broker when the time is up.
    async fn cancel(&mut self, role: &str, handle: mindbus_otel::ConsumerHandle) {
        let left = self
            .deadline()
            .saturating_duration_since(tokio::time::Instant::now());
        let outcome = handle.cancel_within(left).await;
        if !outcome.is_clean() {
            self.problems.push(format!("{role}: {outcome}"));
        }
    }

    async fn close(&mut self, conn: &Connection) {
        match tokio::time::timeout_at(self.deadline(), conn.close(200, "done".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self
                .problems
                .push(format!("the broker connection was lost: {e}")),
            Err(_) => self
                .problems
                .push("the broker did not close the connection in time".to_owned()),
        }
    }

    /// The last exports, within the telemetry's shutdown timeout; then the
    /// exit: 0, or 3 with one line per problem.
    fn finish(mut self, telemetry: mindbus_telemetry::Telemetry) {
        if let Err(e) = telemetry.shutdown() {
            self.problems.push(format!("telemetry: {e}"));
        }
        drop(telemetry);
        if !self.problems.is_empty() {
            for p in &self.problems {
                eprintln!("ai_team: unclean shutdown: {p}");
            }
            std::process::exit(3);
        }
    }
}

/// After the work: says where the metrics are served and, with `--linger`,
/// keeps serving them that long (or until stopped), so that a scraper sees
/// the final values.
async fn linger(args: &Args, telemetry: &mindbus_telemetry::Telemetry, stop: &Stop) {
    if let Some(addr) = telemetry.metrics_addr() {
        println!("\nmetrics are served on http://{addr}/metrics");
    }
    if args.linger.is_zero() || stop.requested() {
        return;
    }
    println!(
        "lingering {}s so the final metrics can be scraped",
        args.linger.as_secs()
    );
    tokio::select! {
        _ = tokio::time::sleep(args.linger) => {}
        _ = stop.wait() => {}
    }
}

/// A role's consumer and its channel. Keep the channel until the
/// connection is closed: lapin closes a channel when its last handle is
/// dropped, and closing the connection while a channel is closing fails
/// (lapin 4.12 then logs `invalid channel state: Closing`, and the close
/// may never complete).
async fn start_agent(
    conn: &Connection,
    role: &str,
    names: &Names,
    provider: &SdkTracerProvider,
    budget: Budget,
) -> Result<(mindbus_otel::ConsumerHandle, TracedChannel), BoxError> {
    let (agent, queue) = match role {
        "writer" => ("agent.writer.001", names.writer.as_str()),
        _ => ("agent.critic.001", names.critic.as_str()),
    };
    let ch = traced(conn, agent, provider, None).await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let (c, p, r) = (ch.clone(), provider.clone(), role.to_owned());
    let handle = ch
        .consume_with(
            queue.into(),
            agent.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |d| {
                let (c, p, r, budget) = (c.clone(), p.clone(), r.clone(), budget.clone());
                async move {
                    let res = if r == "writer" {
                        writer_handler(c, p, d).await
                    } else {
                        critic_handler(c, p, d).await
                    };
                    budget.tick();
                    res
                }
            },
        )
        .await?;
    Ok((handle, ch))
}

async fn start_orchestrator(
    conn: &Connection,
    exchange: &str,
    provider: &SdkTracerProvider,
) -> Result<Orchestrator, BoxError> {
    let ch = traced(
        conn,
        "orchestrator-core",
        provider,
        Some(&TaskMetrics::default()),
    )
    .await?;
    // A private, server-named reply queue (`amq.gen-*`).
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let reply_to = q.name().clone();
    let consumer = ch
        .basic_consume(
            reply_to.clone(),
            "orchestrator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let pending = Arc::new(Pending::default());
    tokio::spawn(route_replies(consumer, pending.clone()));
    Ok(Orchestrator {
        ch,
        exchange: exchange.to_owned(),
        reply_to,
        pending,
        provider: provider.clone(),
    })
}

/// Task outcomes, one line per task.
#[derive(Default)]
struct Tally {
    completed: u64,
    planned_failures: u64,
    unexpected: u64,
}

impl Tally {
    fn report(&mut self, n: u64, plan: Planned, outcome: Result<f64, BoxError>) {
        match outcome {
            Ok(score) => {
                self.completed += 1;
                println!("task {n}: completed, quality score {score:.1}");
            }
            Err(e) if plan != Planned::Success => {
                self.planned_failures += 1;
                println!("task {n}: failed as planned ({e})");
            }
            Err(e) => {
                self.unexpected += 1;
                println!("task {n}: FAILED ({e})");
            }
        }
    }
}

/// `--serve`: a task every `1/rate` seconds, each running on its own, until
/// Ctrl-C or SIGTERM; then the tasks in hand finish (each within its
/// COMMANDs' reply timeout) before the roles stop.
async fn serve(
    orch: &Arc<Orchestrator>,
    rate: f64,
    telemetry: &mindbus_telemetry::Telemetry,
    stop: &Stop,
    shutdown: &mut Shutdown,
    half: Duration,
    tally: &mut Tally,
) {
    let period = Duration::from_secs_f64(1.0 / rate);
    println!("serving a task every {period:?}; Ctrl-C to stop");
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0;
    let report = |done: Result<(u64, Planned, Result<f64, BoxError>), _>, tally: &mut Tally| {
        match done {
            Ok((n, plan, outcome)) => tally.report(n, plan, outcome),
            Err(e) => {
                tally.unexpected += 1;
                println!("a task panicked: {e}");
            }
        }
        for tree in telemetry.take_rendered_traces() {
            println!("{tree}");
        }
    };
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            _ = ticks.tick() => {
                n += 1;
                let (orch, plan) = (orch.clone(), Planned::served(n));
                tasks.spawn(async move { (n, plan, orch.execute_task(n, plan).await) });
            }
            Some(done) = tasks.join_next() => report(done, tally),
        }
    }
    println!("stopping: {} task(s) in hand", tasks.len());
    // The tasks in hand get the broker side's share of the shutdown bound.
    shutdown.start(half);
    while let Ok(Some(done)) = tokio::time::timeout_at(shutdown.deadline(), tasks.join_next()).await
    {
        report(done, tally);
    }
    if !tasks.is_empty() {
        shutdown
            .problems
            .push(format!("{} task(s) abandoned unfinished", tasks.len()));
    }
    tasks.abort_all();
    println!(
        "served {n} task(s): {} completed, {} failed as planned, {} failed unexpectedly",
        tally.completed, tally.planned_failures, tally.unexpected
    );
}

fn print_metrics_summary(exposition: &str) {
    const SHOWN: [&str; 9] = [
        "ai_team_tasks_total",
        "ai_team_tasks_in_progress",
        "ai_team_commands_total",
        "ai_team_llm_calls_total",
        "ai_team_llm_tokens_total",
        "ai_team_llm_cost_dollars_total",
        "ai_team_agent_errors_total",
        "ai_team_quality_score_count",
        "mindbus_messages_total",
    ];
    println!("\nmetrics summary (Prometheus exposition, selected series):");
    for line in exposition.lines() {
        if !line.starts_with('#') && SHOWN.iter().any(|m| line.starts_with(m)) {
            println!("  {line}");
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ai_team: {e}");
            std::process::exit(2);
        }
    };
    let exchange = std::env::var("MINDBUS_EXCHANGE").unwrap_or_else(|_| "mindbus.main".to_owned());
    let service = args.role.clone().unwrap_or_else(|| "ai_team".to_owned());
    // Each task's trace tree is captured and printed after the task (also
    // when spans go to a collector); MINDBUS_TRACE_VIEW=off turns it off.
    // With --serve it would flood the terminal: off unless asked.
    // Half the shutdown bound for the broker (the message in hand, the
    // connection), half for the telemetry (the last exports).
    let half = args.shutdown_timeout / 2;
    let mut config = mindbus_telemetry::Config::from_env()
        .default_service_name(&service)
        .service_version(env!("CARGO_PKG_VERSION"))
        .shutdown_timeout(half);
    if std::env::var("MINDBUS_TRACE_VIEW").is_err() {
        config = config.trace_view(if args.serve {
            mindbus_telemetry::TraceViewMode::Off
        } else {
            mindbus_telemetry::TraceViewMode::On
        });
    }
    let telemetry = mindbus_telemetry::init(
        config.trace_view_output(mindbus_telemetry::TraceViewOutput::Capture),
    )?;
    let stop = Stop::listen();
    let conn = connect(&format!("ai_team {service} pid {}", std::process::id())).await;
    let mut shutdown = Shutdown::default();
    let names = Names::from_env();
    let setup = TracedChannel::builder(conn.create_channel().await?).build();
    if let Err(e) = declare_topology(&broker_url(), &setup, &exchange, &names).await {
        eprintln!("ai_team: {e}");
        std::process::exit(1);
    }
    ensure_dead_letter_policy(&broker_url(), &names).await;

    match args.role.as_deref() {
        None => {
            // All roles in one process, each with its own channel and
            // service.name.
            let orch_p = telemetry.tracer_provider_for("orchestrator");
            let writer_p = telemetry.tracer_provider_for("writer");
            let critic_p = telemetry.tracer_provider_for("critic");
            let (writer, _writer_ch) =
                start_agent(&conn, "writer", &names, &writer_p, Budget::new(None)).await?;
            let (critic, _critic_ch) =
                start_agent(&conn, "critic", &names, &critic_p, Budget::new(None)).await?;
            let orch = Arc::new(start_orchestrator(&conn, &exchange, &orch_p).await?);
            let mut tally = Tally::default();
            if args.serve {
                if let Some(addr) = telemetry.metrics_addr() {
                    println!("metrics are served on http://{addr}/metrics");
                }
                serve(
                    &orch,
                    args.rate,
                    &telemetry,
                    &stop,
                    &mut shutdown,
                    half,
                    &mut tally,
                )
                .await;
            } else {
                for n in 1..=args.tasks {
                    let plan = if n == args.tasks {
                        Planned::WriterDeadline
                    } else {
                        Planned::Success
                    };
                    let outcome = orch.execute_task(n, plan).await;
                    tally.report(n, plan, outcome);
                    for tree in telemetry.take_rendered_traces() {
                        println!("{tree}");
                    }
                }
            }
            shutdown.start(half);
            shutdown.cancel("writer", writer).await;
            shutdown.cancel("critic", critic).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            for tree in telemetry.take_rendered_traces() {
                println!("{tree}");
            }
            if let Some(text) = telemetry.prometheus_render() {
                print_metrics_summary(&text);
            }
            shutdown.close(&conn).await;
            linger(&args, &telemetry, &stop).await;
            if tally.unexpected > 0 {
                return Err(format!("{} task(s) failed unexpectedly", tally.unexpected).into());
            }
        }
        Some("orchestrator") => {
            // One task a second (or --rate a second) until stopped (or
            // --max-messages tasks), failing as --serve does.
            let p = telemetry.tracer_provider_for("orchestrator");
            let orch = start_orchestrator(&conn, &exchange, &p).await?;
            let pause = Duration::from_secs_f64(1.0 / args.rate);
            let mut tally = Tally::default();
            let mut n = 0;
            loop {
                n += 1;
                let plan = Planned::served(n);
                let task = orch.execute_task(n, plan);
                tokio::pin!(task);
                let res = tokio::select! {
                    r = &mut task => r,
                    _ = stop.wait() => {
                        // The task in hand may finish within the bound.
                        shutdown.start(half);
                        match tokio::time::timeout_at(shutdown.deadline(), &mut task).await {
                            Ok(r) => tally.report(n, plan, r),
                            Err(_) => shutdown.problems.push(format!("task {n} abandoned unfinished")),
                        }
                        break;
                    }
                };
                tally.report(n, plan, res);
                if args.max_messages.is_some_and(|m| n >= m) {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait() => break,
                }
            }
            shutdown.start(half);
            shutdown.close(&conn).await;
            linger(&args, &telemetry, &stop).await;
        }
        Some(role) => {
            let p = telemetry.tracer_provider_for(role);
            let budget = Budget::new(args.max_messages);
            let (handle, _channel) = start_agent(&conn, role, &names, &p, budget.clone()).await?;
            println!("{role}: consuming; Ctrl-C to stop");
            tokio::select! {
                _ = budget.done.notified() => {}
                _ = stop.wait() => {}
            }
            // Graceful: the message in hand is finished and settled first,
            // if that fits in the bound; else the broker redelivers it.
            shutdown.start(half);
            shutdown.cancel(role, handle).await;
            println!(
                "{role}: handled {} message(s)",
                budget.seen.load(Ordering::SeqCst)
            );
            shutdown.close(&conn).await;
            linger(&args, &telemetry, &stop).await;
        }
    }
    shutdown.finish(telemetry);
    Ok(())
}
