//! [`TraceContext`]: W3C trace context and baggage in AMQP headers.
//!
//! **Publish**: the message's context (the PRODUCER span when spans are on,
//! else the caller's current span) is written as `traceparent`, plus
//! `tracestate` and `baggage` when not empty, as AMQP `LongString` headers.
//! Every header the caller set is kept.
//!
//! **Deliver**: the parent is read from the headers (`LongString`,
//! `ShortString` or `ByteArray` values). When the headers hold no valid
//! `traceparent`, the CloudEvents `traceparent`/`tracestate` attributes of a
//! JSON body are used instead: existing Python MindBus agents only write it
//! there. Headers win when both are present.
//!
//! Invalid input is never an error: a message with a malformed, oversized,
//! mistyped or non-UTF-8 trace context is delivered normally with an empty
//! parent, and the rejection is counted by reason in [`PropagationStats`]
//! (and in the `mindbus_otel_rejected_contexts_total{reason}` counter of the
//! `metrics` facade).
//!
//! Works with no global propagator installed. Another
//! [`TextMapPropagator`] can be configured with
//! [`TraceContext::with_propagator`]; it then does the reading and writing
//! (rejections are then only counted as `malformed` when a `traceparent`
//! header was present but the propagator yielded no valid parent).

use crate::carrier::{HeaderExtractor, HeaderInjector, HeaderValue};
use crate::interceptor::Interceptor;
use crate::message::{IncomingMessage, OutgoingMessage};
use crate::w3c::{self, BAGGAGE, RejectReason, TRACEPARENT, TRACESTATE};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::Context;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceState};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the parent context of a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContextSource {
    /// AMQP headers.
    Headers,
    /// CloudEvents attributes in the JSON body.
    CloudEvents,
    /// Nowhere: no valid trace context.
    None,
}

/// Counters of a [`TraceContext`] interceptor (shared by its clones).
#[derive(Debug, Default)]
pub struct PropagationStats {
    injected: AtomicU64,
    from_headers: AtomicU64,
    from_body: AtomicU64,
    missing: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl PropagationStats {
    /// Publishes whose trace context was written into headers.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
    /// Deliveries whose parent came from the headers.
    pub fn extracted_from_headers(&self) -> u64 {
        self.from_headers.load(Ordering::Relaxed)
    }
    /// Deliveries whose parent came from the CloudEvents body.
    pub fn extracted_from_body(&self) -> u64 {
        self.from_body.load(Ordering::Relaxed)
    }
    /// Deliveries with no usable parent (none sent, or all rejected).
    pub fn missing(&self) -> u64 {
        self.missing.load(Ordering::Relaxed)
    }
    /// Rejected values for one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }
    /// Rejected values, all reasons.
    pub fn rejected_total(&self) -> u64 {
        self.rejected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mindbus_otel_rejected_contexts_total", "reason" => reason.as_str())
            .increment(1);
    }

    fn source(&self, source: ContextSource) {
        let c = match source {
            ContextSource::Headers => &self.from_headers,
            ContextSource::CloudEvents => &self.from_body,
            ContextSource::None => &self.missing,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The propagation interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct TraceContext {
    propagator: Option<Arc<dyn TextMapPropagator + Send + Sync>>,
    baggage: bool,
    body_fallback: bool,
    stats: Arc<PropagationStats>,
}

impl Default for TraceContext {
    fn default() -> Self {
        TraceContext {
            propagator: None,
            baggage: true,
            body_fallback: true,
            stats: Arc::default(),
        }
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("propagator", &self.propagator)
            .field("baggage", &self.baggage)
            .field("body_fallback", &self.body_fallback)
            .finish()
    }
}

impl TraceContext {
    /// W3C Trace Context and Baggage, CloudEvents fallback on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `propagator` instead of the built-in W3C one (e.g. a composite
    /// with B3, or the global one).
    pub fn with_propagator(
        mut self,
        propagator: impl TextMapPropagator + Send + Sync + 'static,
    ) -> Self {
        self.propagator = Some(Arc::new(propagator));
        self
    }

    /// Whether W3C `baggage` is written and read (default: true). Turn it
    /// off for untrusted producers. Applies to the built-in propagator.
    pub fn baggage(mut self, enabled: bool) -> Self {
        self.baggage = enabled;
        self
    }

    /// Whether a delivery without a valid `traceparent` header falls back
    /// to the CloudEvents `traceparent` in a JSON body (default: true).
    pub fn cloudevents_fallback(mut self, enabled: bool) -> Self {
        self.body_fallback = enabled;
        self
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<PropagationStats> {
        &self.stats
    }

    fn inject_w3c(&self, msg: &mut OutgoingMessage<'_>) {
        let cx = msg.state().context();
        let span = cx.span();
        let sc = span.span_context();
        let mut entries: [Option<(&'static str, String)>; 3] = [None, None, None];
        if sc.is_valid() {
            entries[0] = Some((TRACEPARENT, w3c::format_traceparent(sc)));
            let ts = sc.trace_state().header();
            if !ts.is_empty() {
                entries[1] = Some((TRACESTATE, ts));
            }
        }
        if self.baggage {
            let b = cx.baggage();
            if !b.is_empty() {
                let v = w3c::format_baggage(b);
                if !v.is_empty() {
                    entries[2] = Some((BAGGAGE, v));
                }
            }
        }
        if entries[0].is_some() {
            self.stats.injected.fetch_add(1, Ordering::Relaxed);
        }
        for (k, v) in entries.into_iter().flatten() {
            msg.set_header(
                ShortString::from(k),
                AMQPValue::LongString(LongString::from(v)),
            );
        }
    }

    fn extract_w3c(&self, msg: &mut IncomingMessage<'_>) -> Context {
        let headers = HeaderExtractor::new(msg.headers());
        let mut parent: Option<(SpanContext, ContextSource)> = None;
        match headers.lookup(TRACEPARENT) {
            HeaderValue::Text(tp) => match w3c::parse_traceparent(tp) {
                Ok(sc) => {
                    let ts = self.read_tracestate(headers.lookup(TRACESTATE));
                    parent = Some((with_state(sc, ts), ContextSource::Headers));
                }
                Err(reason) => self.stats.reject(reason),
            },
            HeaderValue::Unreadable(reason) => self.stats.reject(reason),
            HeaderValue::Missing => {}
        }
        if parent.is_none() && self.body_fallback {
            let env = msg.envelope();
            if let Some(tp) = env.traceparent() {
                match w3c::parse_traceparent(tp) {
                    Ok(sc) => {
                        let ts = match env.tracestate() {
                            Some(ts) => self.read_tracestate(HeaderValue::Text(ts)),
                            None => TraceState::NONE,
                        };
                        parent = Some((with_state(sc, ts), ContextSource::CloudEvents));
                    }
                    Err(reason) => self.stats.reject(reason),
                }
            }
        }
        let mut cx = match parent {
            Some((sc, source)) => {
                self.stats.source(source);
                Context::new().with_remote_span_context(sc)
            }
            None => {
                self.stats.source(ContextSource::None);
                Context::new()
            }
        };
        if self.baggage {
            match headers.lookup(BAGGAGE) {
                HeaderValue::Text(b) => match w3c::parse_baggage(b) {
                    Ok(baggage) if !baggage.is_empty() => cx = cx.with_baggage(baggage),
                    Ok(_) => {}
                    Err(reason) => self.stats.reject(reason),
                },
                HeaderValue::Unreadable(_) => self.stats.reject(RejectReason::BaggageMalformed),
                HeaderValue::Missing => {}
            }
        }
        cx
    }

    fn read_tracestate(&self, value: HeaderValue<'_>) -> TraceState {
        match value {
            HeaderValue::Text(ts) => w3c::parse_tracestate(ts).unwrap_or_else(|reason| {
                self.stats.reject(reason);
                TraceState::NONE
            }),
            HeaderValue::Unreadable(_) => {
                self.stats.reject(RejectReason::TracestateMalformed);
                TraceState::NONE
            }
            HeaderValue::Missing => TraceState::NONE,
        }
    }

    fn extract_custom(
        &self,
        propagator: &(dyn TextMapPropagator + Send + Sync),
        msg: &mut IncomingMessage<'_>,
    ) -> Context {
        let headers = HeaderExtractor::new(msg.headers());
        let cx = propagator.extract_with_context(&Context::new(), &headers);
        if cx.span().span_context().is_valid() {
            self.stats.source(ContextSource::Headers);
            return cx;
        }
        if headers.lookup(TRACEPARENT) != HeaderValue::Missing {
            self.stats.reject(RejectReason::Malformed);
        }
        if self.body_fallback {
            let env = msg.envelope();
            let body = BodyExtractor {
                traceparent: env.traceparent(),
                tracestate: env.tracestate(),
            };
            if body.traceparent.is_some() {
                let from_body = propagator.extract_with_context(&cx, &body);
                if from_body.span().span_context().is_valid() {
                    self.stats.source(ContextSource::CloudEvents);
                    return from_body;
                }
                self.stats.reject(RejectReason::Malformed);
            }
        }
        self.stats.source(ContextSource::None);
        cx
    }
}

fn with_state(sc: SpanContext, ts: TraceState) -> SpanContext {
    if ts == TraceState::NONE {
        return sc;
    }
    SpanContext::new(sc.trace_id(), sc.span_id(), sc.trace_flags(), true, ts)
}

/// The CloudEvents distributed-tracing attributes, as a carrier.
struct BodyExtractor<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for BodyExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent,
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::with_capacity(2);
        if self.traceparent.is_some() {
            keys.push(TRACEPARENT);
        }
        if self.tracestate.is_some() {
            keys.push(TRACESTATE);
        }
        keys
    }
}

impl Interceptor for TraceContext {
    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        match &self.propagator {
            None => self.inject_w3c(msg),
            Some(p) => {
                let mut table = FieldTable::default();
                p.inject_context(msg.state().context(), &mut HeaderInjector(&mut table));
                if table.contains_key(TRACEPARENT) {
                    self.stats.injected.fetch_add(1, Ordering::Relaxed);
                }
                for (k, v) in table.inner() {
                    msg.set_header(k.clone(), v.clone());
                }
            }
        }
    }

    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        let cx = match &self.propagator {
            None => self.extract_w3c(msg),
            Some(p) => self.extract_custom(p.as_ref(), msg),
        };
        msg.state_mut().set_context(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interceptor::InterceptorChain;
    use lapin::BasicProperties;
    use lapin::message::Delivery;
    use opentelemetry::propagation::Injector;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn deliver(tc: &TraceContext, headers: Option<FieldTable>, body: &[u8]) -> Context {
        let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
        let mut d = Delivery::mock(1, "".into(), "q".into(), false, body.to_vec());
        if let Some(h) = headers {
            d.properties = BasicProperties::default().with_headers(h);
        }
        chain.start_delivery(&d, "q", false).context().clone()
    }

    fn one(key: &str, v: AMQPValue) -> Option<FieldTable> {
        let mut t = FieldTable::default();
        t.insert(key.into(), v);
        Some(t)
    }

    #[test]
    fn short_string_headers_are_read() {
        // RabbitMQ cannot carry 's' values, so this is only testable here.
        let tc = TraceContext::default();
        let cx = deliver(
            &tc,
            one("traceparent", AMQPValue::ShortString(TP.into())),
            b"",
        );
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(tc.stats().extracted_from_headers(), 1);
    }

    #[test]
    fn fallback_can_be_turned_off_and_baggage_dropped() {
        let tc = TraceContext::default()
            .cloudevents_fallback(false)
            .baggage(false);
        let body =
            format!(r#"{{"specversion":"1.0","type":"ai.team.event","traceparent":"{TP}"}}"#);
        let mut h = FieldTable::default();
        h.insert("baggage".into(), AMQPValue::LongString("k=v".into()));
        let cx = deliver(&tc, Some(h), body.as_bytes());
        assert!(!cx.span().span_context().is_valid());
        assert!(cx.baggage().is_empty());
        assert_eq!(tc.stats().missing(), 1);
    }

    /// A propagator that uses a single `x-trace-id` header.
    #[derive(Debug)]
    struct XTrace(Vec<String>);

    impl TextMapPropagator for XTrace {
        fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
            let span = cx.span();
            if span.span_context().is_valid() {
                injector.set("x-trace-id", w3c::format_traceparent(span.span_context()));
            }
        }
        fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
            let value = extractor
                .get("x-trace-id")
                .or_else(|| extractor.get("traceparent"));
            match value.map(w3c::parse_traceparent) {
                Some(Ok(sc)) => cx.with_remote_span_context(sc),
                _ => cx.clone(),
            }
        }
        fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
            opentelemetry::propagation::text_map_propagator::FieldIter::new(&self.0)
        }
    }

    #[test]
    fn a_configured_propagator_does_the_work() {
        let tc = TraceContext::default().with_propagator(XTrace(vec!["x-trace-id".into()]));
        let cx = deliver(
            &tc,
            one("x-trace-id", AMQPValue::LongString(TP.into())),
            b"",
        );
        assert!(cx.span().span_context().is_valid());
        assert_eq!(tc.stats().extracted_from_headers(), 1);
        // Body fallback through the same propagator.
        let body =
            format!(r#"{{"specversion":"1.0","type":"ai.team.event","traceparent":"{TP}"}}"#);
        let cx = deliver(&tc, None, body.as_bytes());
        assert!(cx.span().span_context().is_valid());
        assert_eq!(tc.stats().extracted_from_body(), 1);
        // A traceparent header it cannot read is counted.
        let cx = deliver(
            &tc,
            one("traceparent", AMQPValue::LongString("junk".into())),
            b"",
        );
        assert!(!cx.span().span_context().is_valid());
        assert_eq!(tc.stats().rejected(RejectReason::Malformed), 1);
    }
}
