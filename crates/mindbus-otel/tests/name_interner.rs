//! The span-name cache is process-wide: a process that builds a chain per
//! channel (so one per reconnect) interns each name once, not once per
//! chain. Its own test binary: it reads a process-wide count.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use mindbus_otel::interceptor::{Interceptor, InterceptorChain};
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::message::Delivery;
use mindbus_otel::lapin::options::BasicPublishOptions;
use mindbus_otel::spans::{MAX_CACHED_NAMES, interned_names};
use mindbus_otel::{MessagingSpans, Outcome, PublishResult, Settlement};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::Arc;

/// One reconnect's worth of traffic: a new chain, a COMMAND published and
/// one consumed.
fn one_chain(provider: &SdkTracerProvider, queue: &str) {
    let spans: Arc<dyn Interceptor> =
        Arc::new(MessagingSpans::new().with_tracer_provider(provider));
    let chain = InterceptorChain::new(vec![spans], Some(Arc::from("agent.writer.001")));
    let body = br#"{"specversion":"1.0","type":"ai.team.command","source":"orchestrator-core","id":"c1","data":{"action":"generate_article"}}"#;
    let (_, mut state) = chain.start_publish(
        "mindbus.main",
        "cmd.writer.any",
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    );
    chain.end_publish(&mut state, &PublishResult::Sent);
    let delivery = Delivery::mock(
        1,
        "mindbus.main".into(),
        "cmd.writer.any".into(),
        false,
        body.to_vec(),
    );
    let mut state = chain.start_delivery(&delivery, queue, false);
    chain.end_delivery(&mut state, &Settlement::new(Outcome::Acked));
}

#[test]
fn a_thousand_chains_intern_each_name_once() {
    let provider = SdkTracerProvider::builder().build();
    one_chain(&provider, "agent.writer");
    let after_one = interned_names();
    assert!(after_one > 0, "the first chain interned its names");
    for _ in 0..1_000 {
        one_chain(&provider, "agent.writer");
    }
    assert_eq!(
        interned_names(),
        after_one,
        "1,000 more chains over the same names interned nothing more"
    );

    // Misuse (a name per queue, unbounded) stays within the bound.
    for i in 0..(2 * MAX_CACHED_NAMES) {
        one_chain(&provider, &format!("queue-{i}"));
    }
    assert!(interned_names() <= MAX_CACHED_NAMES, "{}", interned_names());
}
