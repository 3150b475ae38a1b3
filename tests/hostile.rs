//! Hostile input through the real broker: every message is delivered exactly
//! once with an empty parent (or the valid part of its context), the
//! consumer never stops, and every rejection is counted exactly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use mindbus_otel::lapin::types::{AMQPValue, FieldTable, LongString};
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::trace::{TraceContextExt, TraceId};
use mindbus_otel::{RejectReason, TraceContext, TracedChannel};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One kind of message, valid or hostile, and what it must produce.
struct Case {
    name: &'static str,
    headers: fn(u64) -> Option<FieldTable>,
    body: fn(u64) -> Vec<u8>,
    /// Whether a parent with the message's own trace id must be extracted.
    parent: bool,
    rejects: &'static [RejectReason],
}

fn trace_id(seq: u64) -> TraceId {
    TraceId::from(0xabcd_0000_0000_0000_0000_0000_0000_0000u128 | u128::from(seq + 1))
}

fn traceparent(seq: u64) -> String {
    format!("00-{}-00f067aa0ba902b7-01", trace_id(seq))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> Option<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    Some(t)
}

fn cloudevent(seq: u64, traceparent: &str) -> Vec<u8> {
    format!(
        r#"{{"specversion":"1.0","type":"ai.team.command","source":"py-agent","id":"{seq}","traceparent":"{traceparent}","data":{{"action":"x"}}}}"#
    )
    .into_bytes()
}

fn cases() -> Vec<Case> {
    use RejectReason::*;
    vec![
        Case {
            name: "valid header",
            headers: |s| table(vec![("traceparent", long(traceparent(s)))]),
            body: |_| b"{}".to_vec(),
            parent: true,
            rejects: &[],
        },
        Case {
            name: "valid CloudEvents body only",
            headers: |_| None,
            body: |s| cloudevent(s, &traceparent(s)),
            parent: true,
            rejects: &[],
        },
        Case {
            name: "malformed traceparent",
            headers: |_| table(vec![("traceparent", long("00-not-a-trace-context-01"))]),
            body: |_| b"{}".to_vec(),
            parent: false,
            rejects: &[Malformed],
        },
        Case {
            name: "64 KiB traceparent",
            headers: |_| table(vec![("traceparent", long("0".repeat(64 * 1024)))]),
            body: |_| b"plain text".to_vec(),
            parent: false,
            rejects: &[Oversized],
        },
        Case {
            name: "traceparent of a number type",
            headers: |_| table(vec![("traceparent", AMQPValue::LongLongInt(42))]),
            body: |_| b"".to_vec(),
            parent: false,
            rejects: &[WrongType],
        },
        Case {
            name: "traceparent as a nested table",
            headers: |_| {
                table(vec![(
                    "traceparent",
                    AMQPValue::FieldTable(FieldTable::default()),
                )])
            },
            body: |_| b"[1,2,3]".to_vec(),
            parent: false,
            rejects: &[WrongType],
        },
        Case {
            name: "traceparent not UTF-8",
            headers: |_| {
                table(vec![(
                    "traceparent",
                    AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, 0x00, 0x80])),
                )])
            },
            body: |_| vec![0xff, 0x00, 0xc3],
            parent: false,
            rejects: &[NotUtf8],
        },
        Case {
            name: "valid traceparent with a 64 KiB tracestate",
            headers: |s| {
                table(vec![
                    ("traceparent", long(traceparent(s))),
                    ("tracestate", long(format!("k={}", "v".repeat(64 * 1024)))),
                ])
            },
            body: |_| b"{}".to_vec(),
            parent: true,
            rejects: &[TracestateOversized],
        },
        Case {
            name: "malformed CloudEvents traceparent",
            headers: |_| None,
            body: |s| cloudevent(s, "00-zz-zz-zz"),
            parent: false,
            rejects: &[Malformed],
        },
        Case {
            name: "JSON that is not an object",
            headers: |_| None,
            body: |_| br#""traceparent""#.to_vec(),
            parent: false,
            rejects: &[],
        },
        Case {
            name: "truncated JSON",
            headers: |_| None,
            body: |_| br#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f0"#.to_vec(),
            parent: false,
            rejects: &[],
        },
        Case {
            name: "bad baggage and many headers",
            headers: |s| {
                let mut t = FieldTable::default();
                for i in 0..500 {
                    t.insert(format!("x-h{i}").into(), AMQPValue::LongInt(i));
                }
                t.insert("traceparent".into(), long(traceparent(s)));
                t.insert("baggage".into(), long("=novalue,,;"));
                Some(t)
            },
            body: |_| b"{}".to_vec(),
            parent: true,
            rejects: &[BaggageMalformed],
        },
    ]
}

/// Message sequence number -> (times handled, parent trace id seen).
type Seen = HashMap<u64, (u32, Option<TraceId>)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_messages_exactly_once_with_exact_counts() {
    const N: u64 = 10_000;
    let cases = cases();
    let conn = connect().await;
    let raw = conn.create_channel().await.unwrap();
    let queue = declare_queue(&raw, &unique("hostile.mixed"), FieldTable::default()).await;
    let tc = TraceContext::default();
    let ch = TracedChannel::builder(conn.create_channel().await.unwrap())
        .with(tc.clone())
        .build();
    ch.basic_qos(200, BasicQosOptions::default()).await.unwrap();

    // seq -> (times seen, parent trace id seen)
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let handle = ch
        .consume_with(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
            move |delivery| {
                let s = s.clone();
                async move {
                    let seq = delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| id.as_str().parse::<u64>().ok())
                        .expect("every test message has a numeric message_id");
                    let cx = Context::current();
                    let sc = cx.span().span_context().clone();
                    let mut map = s.lock().unwrap();
                    let entry = map.entry(seq).or_insert((0, None));
                    entry.0 += 1;
                    entry.1 = sc.is_valid().then(|| sc.trace_id());
                    Ok::<(), String>(())
                }
            },
        )
        .await
        .unwrap();

    let mut expected_rejects: HashMap<RejectReason, u64> = HashMap::new();
    let mut pending = Vec::with_capacity(256);
    for seq in 0..N {
        let case = &cases[(seq % cases.len() as u64) as usize];
        for r in case.rejects {
            *expected_rejects.entry(*r).or_default() += 1;
        }
        let mut props = BasicProperties::default().with_message_id(seq.to_string().into());
        if let Some(h) = (case.headers)(seq) {
            props = props.with_headers(h);
        }
        let confirm = raw
            .basic_publish(
                "".into(),
                queue.clone(),
                BasicPublishOptions::default(),
                &(case.body)(seq),
                props,
            )
            .await
            .unwrap();
        pending.push(confirm);
        if pending.len() == 256 {
            for c in pending.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in pending.drain(..) {
        c.await.unwrap();
    }

    let done = eventually(Duration::from_secs(120), || {
        seen.lock().unwrap().len() as u64 == N && handle.stats().acked() == N
    })
    .await;
    assert!(done, "only {} of {N} handled", seen.lock().unwrap().len());
    assert!(!handle.is_finished(), "the consumer is still running");
    // Nothing more arrives (no duplicates in flight).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let map = seen.lock().unwrap().clone();
    for seq in 0..N {
        let case = &cases[(seq % cases.len() as u64) as usize];
        let (times, parent) = map.get(&seq).copied().unwrap_or((0, None));
        assert_eq!(times, 1, "message {seq} ({}) seen {times} times", case.name);
        if case.parent {
            assert_eq!(parent, Some(trace_id(seq)), "message {seq} ({})", case.name);
        } else {
            assert_eq!(parent, None, "message {seq} ({})", case.name);
        }
    }
    let stats = tc.stats();
    for reason in RejectReason::ALL {
        assert_eq!(
            stats.rejected(reason),
            expected_rejects.get(&reason).copied().unwrap_or(0),
            "{reason:?}"
        );
    }
    let with_parent: u64 = (0..N)
        .filter(|s| cases[(s % cases.len() as u64) as usize].parent)
        .count() as u64;
    assert_eq!(
        stats.extracted_from_headers() + stats.extracted_from_body(),
        with_parent
    );
    assert_eq!(stats.missing(), N - with_parent);
    assert_eq!(handle.stats().nacked(), 0);
    assert_eq!(handle.stats().panics(), 0);
    handle.cancel().await.unwrap();
    assert_eq!(message_count(&raw, queue.as_str()).await, 0);
    delete_queue(&raw, queue.as_str()).await;
    close(&conn).await;
}
