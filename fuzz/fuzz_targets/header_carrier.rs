//! Trace-context extraction from arbitrary AMQP header tables (every
//! `AMQPValue` type, nested, huge, non-UTF-8; format in `src/lib.rs`) and
//! bodies, through `InterceptorChain::start_delivery` as a channel runs it,
//! with the built-in W3C parser, with policies, and with the SDK's
//! propagators; plus every `HeaderExtractor` lookup.
//!
//! Checks: no panic (a hook panic is caught by the chain, so the count of
//! caught panics must stay 0); one source per delivery; what is extracted
//! stays within the W3C limits; and what is extracted, published again,
//! is extracted again with nothing rejected and the same parent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mindbus_otel::carrier::{HeaderExtractor, HeaderValue, MAX_HEADER_VALUE_LEN};
use mindbus_otel::lapin::BasicProperties;
use mindbus_otel::lapin::message::Delivery;
use mindbus_otel::lapin::options::BasicPublishOptions;
use mindbus_otel::lapin::types::FieldTable;
use mindbus_otel::opentelemetry::Context;
use mindbus_otel::opentelemetry::baggage::BaggageExt;
use mindbus_otel::opentelemetry::propagation::{Extractor, TextMapCompositePropagator};
use mindbus_otel::opentelemetry::trace::TraceContextExt;
use mindbus_otel::w3c::{self, MAX_BAGGAGE_KEPT_MEMBERS};
use mindbus_otel::{InterceptorChain, RejectReason, TraceContext, hook_panics};
use mindbus_otel_fuzz::decode;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use std::sync::Arc;

fn deliver(tc: &TraceContext, headers: Option<&FieldTable>, body: &[u8]) -> Context {
    let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
    let mut d = Delivery::mock(1, "".into(), "q".into(), false, body.to_vec());
    if let Some(h) = headers {
        d.properties = BasicProperties::default().with_headers(h.clone());
    }
    chain.start_delivery(&d, "q", false).context().clone()
}

fn publish(tc: &TraceContext, cx: Context) -> FieldTable {
    let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
    let _guard = cx.attach();
    let (props, _state) = chain.start_publish(
        "mindbus.main",
        "cmd.x",
        BasicPublishOptions::default(),
        b"",
        BasicProperties::default(),
    );
    props.headers().clone().unwrap_or_default()
}

fn sources(tc: &TraceContext) -> u64 {
    let s = tc.stats();
    s.extracted_from_headers() + s.extracted_from_body() + s.missing()
}

fuzz_target!(|data: &[u8]| {
    let (headers, body) = decode(data);

    // The carrier: every key, and a case variant of it.
    let x = HeaderExtractor::new(headers.as_ref());
    let keys: Vec<String> = x.keys().iter().map(|k| (*k).to_owned()).collect();
    for k in keys
        .iter()
        .flat_map(|k| [k.clone(), k.to_ascii_uppercase()])
    {
        let full = x.lookup(&k);
        assert_ne!(full, HeaderValue::Missing);
        let capped = x.lookup_capped(&k, MAX_HEADER_VALUE_LEN, RejectReason::Oversized);
        if let HeaderValue::Text(s) = capped {
            assert_eq!(full, capped);
            assert!(s.len() <= MAX_HEADER_VALUE_LEN);
        }
        assert_eq!(x.get(&k).is_some(), matches!(capped, HeaderValue::Text(_)));
        assert!(x.contains(&k));
    }

    // The built-in W3C propagator.
    let tc = TraceContext::default();
    let cx = deliver(&tc, headers.as_ref(), &body);
    assert_eq!(sources(&tc), 1);
    let span = cx.span();
    let sc = span.span_context();
    let ts = sc.trace_state().header();
    assert!(ts.len() <= w3c::MAX_TRACESTATE_LEN);
    assert!(cx.baggage().len() <= MAX_BAGGAGE_KEPT_MEMBERS);

    // What we extracted, sent on, is read back whole by a peer.
    let out = TraceContext::default();
    let sent = publish(&out, cx.clone());
    let peer = TraceContext::default();
    let again = deliver(&peer, Some(&sent), b"");
    assert_eq!(peer.stats().rejected_total(), 0, "{sent:?}");
    let again_span = again.span();
    let again_sc = again_span.span_context();
    assert_eq!(again_sc.is_valid(), sc.is_valid());
    if sc.is_valid() {
        assert_eq!(again_sc.trace_id(), sc.trace_id());
        assert_eq!(again_sc.span_id(), sc.span_id());
        assert_eq!(again_sc.is_sampled(), sc.is_sampled());
        assert_eq!(again_sc.trace_state().header(), ts);
    }
    // Re-encoding can grow a value (an invalid escape decodes to U+FFFD,
    // sent as 9 bytes): what no longer fits is left out, and counted.
    assert_eq!(
        again.baggage().len() as u64 + out.stats().outbound_members_dropped(),
        cx.baggage().len() as u64
    );

    // Policies: no inbound baggage, no body fallback.
    let strict = TraceContext::default()
        .accept_inbound_baggage(false)
        .cloudevents_fallback(false);
    let cx = deliver(&strict, headers.as_ref(), &body);
    assert!(cx.baggage().is_empty());
    assert_eq!(strict.stats().extracted_from_body(), 0);

    // The SDK's propagators, through the capped carrier.
    let sdk = TraceContext::default().with_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let _ = deliver(&sdk, headers.as_ref(), &body);
    assert_eq!(sources(&sdk), 1);

    assert_eq!(hook_panics(), 0, "an interceptor hook panicked");
});
