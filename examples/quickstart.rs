//! The smallest end-to-end use of mindbus-otel: an "orchestrator" publishes a
//! MindBus COMMAND inside a trace, a "writer" consumes it with a handler, and
//! both print the trace id they see: the same one, carried in AMQP headers.
//!
//! Run with `cargo run --example quickstart` (RabbitMQ on 127.0.0.1:5672, or
//! set `MINDBUS_URL`).

use mindbus_otel::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::lapin::{BasicProperties, Connection, ConnectionProperties};
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::context::FutureExt as _;
use mindbus_otel::opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use mindbus_otel::{TraceContext, TracedChannel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("MINDBUS_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;

    // Wrap each channel once; the rest is lapin's API.
    let orchestrator = TracedChannel::builder(conn.create_channel().await?)
        .agent("orchestrator-core")
        .with(TraceContext::default())
        .build();
    let writer = TracedChannel::builder(conn.create_channel().await?)
        .agent("agent.writer.001")
        .with(TraceContext::default())
        .build();

    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let queue = format!("quickstart.writer.{nanos:x}");
    writer
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    let (tx, rx) = oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let handle = writer
        .consume_with(
            queue.as_str().into(),
            "writer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |delivery| {
                // Runs inside the COMMAND's trace context.
                let trace_id = Context::current().span().span_context().trace_id();
                let sender = tx.lock().ok().and_then(|mut t| t.take());
                async move {
                    println!(
                        "writer:       got {} bytes in trace {trace_id}",
                        delivery.data.len()
                    );
                    if let Some(sender) = sender {
                        let _ = sender.send(());
                    }
                    Ok::<(), std::io::Error>(())
                }
            },
        )
        .await?;

    // In a real agent this is the span of the current task (for instance
    // from `tracing` or an OpenTelemetry tracer); here a fixed one.
    let task = SpanContext::new(
        TraceId::from(nanos | 1),
        SpanId::from(0x00f0_67aa_0ba9_02b7),
        TraceFlags::SAMPLED,
        false,
        TraceState::NONE,
    );
    let cx = Context::new().with_remote_span_context(task.clone());
    println!(
        "orchestrator: publishing COMMAND in trace {}",
        task.trace_id()
    );
    let command = br#"{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core",
        "id":"5b0f6c1e-7c35-4c1d-9f0e-3f1d2b6a9a01","subject":"task-article-555",
        "data":{"action":"generate_article","params":{"topic":"AI trends"}}}"#;
    orchestrator
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            command,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .with_context(cx)
        .await?
        .await?;

    tokio::time::timeout(Duration::from_secs(10), rx).await??;
    handle.cancel().await?;
    writer
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "done".into()).await?;
    println!("done: one trace id on both sides of the bus");
    Ok(())
}
