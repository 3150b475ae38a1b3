//! [`TraceContext`]: W3C trace context and baggage in AMQP headers.
//!
//! **Publish**: the message's context (the PRODUCER span when spans are on,
//! else the caller's current span) is written as `traceparent`, plus
//! `tracestate` and `baggage` when not empty, as AMQP `LongString` headers.
//! Every header the caller set is kept. What is written stays within the
//! W3C limits: `tracestate` and `baggage` members that do not fit or do not
//! follow the grammar are left out and counted
//! ([`PropagationStats::outbound_members_dropped`]).
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
//! `metrics` facade). Every header value is compared with its cap before
//! any other work (see [`w3c`] for the limits), so an oversized
//! value costs the same as a short one.
//!
//! # Policies for untrusted peers
//! - [`TraceContext::accept_inbound_baggage`]`(false)`: inbound `baggage`
//!   is ignored (not parsed), outbound baggage is still written. For
//!   consumers of queues that untrusted producers can publish to.
//! - [`TraceContext::no_inject_on_exchange`] /
//!   [`TraceContext::no_inject_when`]: no `traceparent`, `tracestate` or
//!   `baggage` header is written on publishes to the chosen exchanges
//!   (messages leaving the trust boundary).
//! - [`TraceContext::baggage`]`(false)`: no baggage in either direction.
//! - [`TraceContext::cloudevents_fallback`]`(false)`: the body is never
//!   read for a parent.
//!
//! Works with no global propagator installed. Another
//! [`TextMapPropagator`] can be configured with
//! [`TraceContext::with_propagator`]; it then does the reading and writing
//! (rejections are then only counted as `malformed` when a `traceparent`
//! header was present but the propagator yielded no valid parent, and as
//! `oversized` / `tracestate_oversized` / `baggage_oversized` for values of
//! the propagator's fields longer than
//! [`MAX_HEADER_VALUE_LEN`], which the propagator never sees).
//!
//! # Metrics
//! Through the `metrics` facade, besides the rejections:
//! `mindbus_otel_injection_skipped_total` (publishes left without trace
//! context by a no-inject policy), `mindbus_otel_inbound_baggage_ignored_total`
//! (deliveries whose `baggage` header was ignored by policy) and
//! `mindbus_otel_dropped_context_members_total{header, direction}`
//! (`tracestate`/`baggage` list members dropped to stay within the limits,
//! `direction` = `inbound` or `outbound`).

use crate::carrier::{HeaderExtractor, HeaderInjector, HeaderValue, MAX_HEADER_VALUE_LEN};
use crate::interceptor::Interceptor;
use crate::message::{IncomingMessage, OutgoingMessage};
use crate::w3c::{
    self, BAGGAGE, MAX_BAGGAGE_LEN, MAX_TRACEPARENT_LEN, MAX_TRACESTATE_HEADER_LEN, RejectReason,
    TRACEPARENT, TRACESTATE,
};
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
    inject_skipped: AtomicU64,
    from_headers: AtomicU64,
    from_body: AtomicU64,
    missing: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
    baggage_members_dropped: AtomicU64,
    inbound_baggage_ignored: AtomicU64,
    outbound_members_dropped: AtomicU64,
}

impl PropagationStats {
    /// Publishes whose trace context was written into headers.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
    /// Publishes to which no trace context was written because a no-inject
    /// policy ([`TraceContext::no_inject_on_exchange`],
    /// [`TraceContext::no_inject_when`]) matched their exchange.
    pub fn injection_skipped(&self) -> u64 {
        self.inject_skipped.load(Ordering::Relaxed)
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
    /// Inbound `baggage` list members dropped because the OpenTelemetry
    /// `Baggage` holds only [`w3c::MAX_BAGGAGE_KEPT_MEMBERS`] (64) entries
    /// (each such delivery is also counted once as
    /// [`RejectReason::BaggageTruncated`]).
    pub fn baggage_members_dropped(&self) -> u64 {
        self.baggage_members_dropped.load(Ordering::Relaxed)
    }
    /// Deliveries that carried a `baggage` header which was ignored because
    /// inbound baggage is off ([`TraceContext::accept_inbound_baggage`] or
    /// [`TraceContext::baggage`]).
    pub fn inbound_baggage_ignored(&self) -> u64 {
        self.inbound_baggage_ignored.load(Ordering::Relaxed)
    }
    /// Outbound `tracestate`/`baggage` list members (or whole values of a
    /// configured propagator) left out to stay within the W3C limits and
    /// grammar.
    pub fn outbound_members_dropped(&self) -> u64 {
        self.outbound_members_dropped.load(Ordering::Relaxed)
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

    fn members_dropped(&self, header: &'static str, inbound: bool, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u64;
        let (counter, direction) = if inbound {
            (&self.baggage_members_dropped, "inbound")
        } else {
            (&self.outbound_members_dropped, "outbound")
        };
        counter.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(
            "mindbus_otel_dropped_context_members_total",
            "header" => header,
            "direction" => direction
        )
        .increment(n);
    }

    fn skipped_injection(&self) {
        self.inject_skipped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mindbus_otel_injection_skipped_total").increment(1);
    }

    fn ignored_baggage(&self) {
        self.inbound_baggage_ignored.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mindbus_otel_inbound_baggage_ignored_total").increment(1);
    }
}

type ExchangePredicate = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Exchanges on which no trace context is written.
#[derive(Clone, Default)]
struct NoInject {
    exchanges: Vec<Box<str>>,
    predicates: Vec<ExchangePredicate>,
}

impl NoInject {
    fn matches(&self, exchange: &str) -> bool {
        self.exchanges.iter().any(|e| **e == *exchange)
            || self.predicates.iter().any(|p| p(exchange))
    }
}

/// The propagation interceptor: see the [module docs](self).
#[derive(Clone)]
pub struct TraceContext {
    propagator: Option<Arc<dyn TextMapPropagator + Send + Sync>>,
    baggage: bool,
    inbound_baggage: bool,
    body_fallback: bool,
    no_inject: Arc<NoInject>,
    stats: Arc<PropagationStats>,
}

impl Default for TraceContext {
    fn default() -> Self {
        TraceContext {
            propagator: None,
            baggage: true,
            inbound_baggage: true,
            body_fallback: true,
            no_inject: Arc::default(),
            stats: Arc::default(),
        }
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("propagator", &self.propagator)
            .field("baggage", &self.baggage)
            .field("inbound_baggage", &self.inbound_baggage)
            .field("body_fallback", &self.body_fallback)
            .field("no_inject_exchanges", &self.no_inject.exchanges)
            .field("no_inject_predicates", &self.no_inject.predicates.len())
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

    /// Whether W3C `baggage` is written and read (default: true). Applies
    /// to the built-in propagator. To keep sending baggage but stop
    /// trusting it from others, use
    /// [`accept_inbound_baggage(false)`](Self::accept_inbound_baggage).
    pub fn baggage(mut self, enabled: bool) -> Self {
        self.baggage = enabled;
        self
    }

    /// Whether inbound `baggage` is read (default: true). With `false` the
    /// `baggage` header of deliveries is ignored without being parsed
    /// (counted in [`PropagationStats::inbound_baggage_ignored`]) and the
    /// delivery's context carries no baggage; baggage is still written on
    /// publish. Use it where untrusted producers can publish: baggage is
    /// arbitrary key/value data that would otherwise flow into this
    /// process's context and on into everything it publishes.
    ///
    /// With a configured propagator, the `baggage` header is hidden from
    /// it and any baggage it extracts (from other headers) is cleared.
    pub fn accept_inbound_baggage(mut self, enabled: bool) -> Self {
        self.inbound_baggage = enabled;
        self
    }

    /// Writes no trace context on publishes to `exchange` (exact name;
    /// `""` is the default exchange; call again for more exchanges): no
    /// `traceparent`, `tracestate` or `baggage` header is added, for
    /// messages leaving the trust boundary (e.g. an exchange a partner
    /// consumes). Each skipped publish is counted in
    /// [`PropagationStats::injection_skipped`]. Headers the caller set
    /// itself are left as they are, and so is the body (a CloudEvents
    /// `traceparent` attribute written by the application is its own).
    pub fn no_inject_on_exchange(mut self, exchange: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.no_inject)
            .exchanges
            .push(exchange.into().into_boxed_str());
        self
    }

    /// Writes no trace context on publishes to any exchange for which
    /// `predicate` returns true (e.g. `|x| x.starts_with("partner.")`), as
    /// [`no_inject_on_exchange`](Self::no_inject_on_exchange) does for one
    /// name. Several predicates and names combine: any match skips. The
    /// predicate runs on every publish: keep it cheap.
    pub fn no_inject_when(
        mut self,
        predicate: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.no_inject)
            .predicates
            .push(Arc::new(predicate));
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
            // Inherited members the OpenTelemetry `TraceState` could not
            // hold, while this is still their trace.
            let inherited = cx
                .get::<InheritedTracestate>()
                .filter(|i| i.trace_id == sc.trace_id());
            if *sc.trace_state() != TraceState::NONE || inherited.is_some() {
                let (ts, dropped) = match inherited {
                    Some(i) => w3c::format_tracestate_inherited(sc.trace_state(), &i.members),
                    None => w3c::format_tracestate_limited(sc.trace_state()),
                };
                self.stats.members_dropped(TRACESTATE, false, dropped);
                if !ts.is_empty() {
                    entries[1] = Some((TRACESTATE, ts));
                }
            }
        }
        if self.baggage {
            let b = cx.baggage();
            if !b.is_empty() {
                let (v, dropped) = w3c::format_baggage_limited(b);
                self.stats.members_dropped(BAGGAGE, false, dropped);
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

    fn inject_custom(
        &self,
        propagator: &(dyn TextMapPropagator + Send + Sync),
        msg: &mut OutgoingMessage<'_>,
    ) {
        let mut table = FieldTable::default();
        propagator.inject_context(msg.state().context(), &mut HeaderInjector(&mut table));
        if table.contains_key(TRACEPARENT) {
            self.stats.injected.fetch_add(1, Ordering::Relaxed);
        }
        for (k, v) in table.inner() {
            // Never send a W3C value over its limit, whoever formatted it.
            let cap = match k.as_str() {
                TRACEPARENT => MAX_TRACEPARENT_LEN,
                TRACESTATE => w3c::MAX_TRACESTATE_LEN,
                BAGGAGE => MAX_BAGGAGE_LEN,
                _ => usize::MAX,
            };
            let len = match v {
                AMQPValue::LongString(s) => s.len(),
                _ => 0,
            };
            if len > cap {
                self.stats
                    .members_dropped(header_label(k.as_str()), false, 1);
                continue;
            }
            msg.set_header(k.clone(), v.clone());
        }
    }

    fn extract_w3c(&self, msg: &mut IncomingMessage<'_>) -> Context {
        // One pass over the table for the three names (most deliveries
        // lack `tracestate` and `baggage`, and each miss is a full scan).
        let [traceparent, tracestate, baggage] =
            HeaderExtractor::new(msg.headers()).find_all([TRACEPARENT, TRACESTATE, BAGGAGE]);
        let mut parent: Option<(SpanContext, ContextSource, Members)> = None;
        match traceparent.capped(MAX_TRACEPARENT_LEN, RejectReason::Oversized) {
            HeaderValue::Text(tp) => match w3c::parse_traceparent(tp) {
                Ok(sc) => {
                    let ts = self.read_tracestate(
                        tracestate
                            .capped(MAX_TRACESTATE_HEADER_LEN, RejectReason::TracestateOversized),
                    );
                    parent = Some((with_state(sc, ts.state), ContextSource::Headers, ts.members));
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
                            None => w3c::ParsedTracestate::default(),
                        };
                        parent = Some((
                            with_state(sc, ts.state),
                            ContextSource::CloudEvents,
                            ts.members,
                        ));
                    }
                    Err(reason) => self.stats.reject(reason),
                }
            }
        }
        let mut cx = match parent {
            Some((sc, source, members)) => {
                self.stats.source(source);
                let trace_id = sc.trace_id();
                let cx = Context::new().with_remote_span_context(sc);
                if members.is_empty() {
                    cx
                } else {
                    cx.with_value(InheritedTracestate {
                        trace_id,
                        members: members.into(),
                    })
                }
            }
            None => {
                self.stats.source(ContextSource::None);
                Context::new()
            }
        };
        if !(self.baggage && self.inbound_baggage) {
            if baggage.exists() {
                self.stats.ignored_baggage();
            }
            return cx;
        }
        match baggage.capped(MAX_BAGGAGE_LEN, RejectReason::BaggageOversized) {
            HeaderValue::Text(b) => match w3c::parse_baggage_counted(b) {
                Ok(parsed) => {
                    if parsed.dropped > 0 {
                        self.stats.reject(RejectReason::BaggageTruncated);
                        self.stats.members_dropped(BAGGAGE, true, parsed.dropped);
                    }
                    if !parsed.baggage.is_empty() {
                        cx = cx.with_baggage(parsed.baggage);
                    }
                }
                Err(reason) => self.stats.reject(reason),
            },
            HeaderValue::Unreadable(RejectReason::BaggageOversized) => {
                self.stats.reject(RejectReason::BaggageOversized)
            }
            HeaderValue::Unreadable(_) => self.stats.reject(RejectReason::BaggageMalformed),
            HeaderValue::Missing => {}
        }
        cx
    }

    fn read_tracestate(&self, value: HeaderValue<'_>) -> w3c::ParsedTracestate {
        match value {
            HeaderValue::Text(ts) => match w3c::parse_tracestate_counted(ts) {
                Ok(parsed) => {
                    self.stats
                        .members_dropped(TRACESTATE, true, parsed.duplicates);
                    parsed
                }
                Err(reason) => {
                    self.stats.reject(reason);
                    w3c::ParsedTracestate::default()
                }
            },
            HeaderValue::Unreadable(RejectReason::TracestateOversized) => {
                self.stats.reject(RejectReason::TracestateOversized);
                w3c::ParsedTracestate::default()
            }
            HeaderValue::Unreadable(_) => {
                self.stats.reject(RejectReason::TracestateMalformed);
                w3c::ParsedTracestate::default()
            }
            HeaderValue::Missing => w3c::ParsedTracestate::default(),
        }
    }

    fn extract_custom(
        &self,
        propagator: &(dyn TextMapPropagator + Send + Sync),
        msg: &mut IncomingMessage<'_>,
    ) -> Context {
        let headers = HeaderExtractor::new(msg.headers());
        let carrier = CustomCarrier {
            headers,
            hide_baggage: !self.inbound_baggage,
        };
        if !self.inbound_baggage && headers.contains(BAGGAGE) {
            self.stats.ignored_baggage();
        }
        // Values over the cap read as absent (the extractor never hands them
        // over); count them by field.
        let mut traceparent_oversized = false;
        for field in propagator.fields() {
            if carrier.hides(field) {
                continue;
            }
            let too_long = match field {
                TRACESTATE => RejectReason::TracestateOversized,
                BAGGAGE => RejectReason::BaggageOversized,
                _ => RejectReason::Oversized,
            };
            if let HeaderValue::Unreadable(r) =
                headers.lookup_capped(field, MAX_HEADER_VALUE_LEN, too_long)
                && r == too_long
            {
                self.stats.reject(r);
                traceparent_oversized |= field == TRACEPARENT;
            }
        }
        let mut cx = propagator.extract_with_context(&Context::new(), &carrier);
        if !self.inbound_baggage && !cx.baggage().is_empty() {
            cx = cx.with_cleared_baggage();
        }
        if cx.span().span_context().is_valid() {
            self.stats.source(ContextSource::Headers);
            return cx;
        }
        if !traceparent_oversized && headers.contains(TRACEPARENT) {
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

/// The `header` label of a W3C header name (anything else: `other`).
fn header_label(name: &str) -> &'static str {
    match name {
        TRACEPARENT => TRACEPARENT,
        TRACESTATE => TRACESTATE,
        BAGGAGE => BAGGAGE,
        _ => "other",
    }
}

/// `tracestate` members, in list order.
type Members = Vec<(String, String)>;

/// The inherited `tracestate` members of a trace when some of them do not
/// fit the OpenTelemetry `TraceState` (see
/// [`w3c::ParsedTracestate::members`]): kept in the context beside the
/// remote span context, written out again by [`TraceContext`]'s inject for
/// the same trace.
#[derive(Debug)]
struct InheritedTracestate {
    trace_id: opentelemetry::trace::TraceId,
    members: Arc<[(String, String)]>,
}

fn with_state(sc: SpanContext, ts: TraceState) -> SpanContext {
    if ts == TraceState::NONE {
        return sc;
    }
    SpanContext::new(sc.trace_id(), sc.span_id(), sc.trace_flags(), true, ts)
}

/// The headers as a configured propagator sees them: values capped at
/// [`MAX_HEADER_VALUE_LEN`], `baggage` hidden when inbound baggage is off.
struct CustomCarrier<'a> {
    headers: HeaderExtractor<'a>,
    hide_baggage: bool,
}

impl CustomCarrier<'_> {
    fn hides(&self, key: &str) -> bool {
        self.hide_baggage && key.eq_ignore_ascii_case(BAGGAGE)
    }
}

impl Extractor for CustomCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if self.hides(key) {
            return None;
        }
        self.headers.get(key)
    }
    fn keys(&self) -> Vec<&str> {
        let mut keys = self.headers.keys();
        keys.retain(|k| !self.hides(k));
        keys
    }
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
        if self.no_inject.matches(msg.exchange()) {
            self.stats.skipped_injection();
            return;
        }
        match &self.propagator {
            None => self.inject_w3c(msg),
            Some(p) => self.inject_custom(p.as_ref(), msg),
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
    use lapin::options::BasicPublishOptions;
    use lapin::types::ByteArray;
    use opentelemetry::KeyValue;
    use opentelemetry::propagation::Injector;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

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

    /// Runs the publish hooks in `cx` and returns the headers to be sent.
    fn publish(
        tc: &TraceContext,
        cx: Context,
        exchange: &str,
        headers: Option<FieldTable>,
    ) -> FieldTable {
        let chain = InterceptorChain::new(vec![Arc::new(tc.clone())], None);
        let _guard = cx.attach();
        let mut props = BasicProperties::default();
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        let (props, _state) =
            chain.start_publish(exchange, "rk", BasicPublishOptions::default(), b"{}", props);
        props.headers().clone().unwrap_or_default()
    }

    /// A sampled remote context with a trace state and two baggage entries.
    fn full_context() -> Context {
        let sc = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128),
            SpanId::from(0x00f0_67aa_0ba9_02b7u64),
            TraceFlags::SAMPLED,
            true,
            w3c::parse_tracestate("rojo=1,congo=2").expect("valid"),
        );
        Context::new()
            .with_remote_span_context(sc)
            .with_baggage([KeyValue::new("user", "u1"), KeyValue::new("tenant", "t1")])
    }

    fn header_keys(t: &FieldTable) -> Vec<&str> {
        t.inner().keys().map(ShortString::as_str).collect()
    }

    fn long(s: impl Into<Vec<u8>>) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.into()))
    }

    /// Headers, one entry each.
    fn headers(entries: Vec<(&str, AMQPValue)>) -> Option<FieldTable> {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k.into(), v);
        }
        Some(t)
    }

    /// Runs `f` with a Prometheus recorder and returns what it rendered.
    fn with_metrics(f: impl FnOnce()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn oversized_values_are_rejected_by_length_before_their_bytes_are_read() {
        // 10 MiB values that are not even UTF-8: the reason is the size,
        // which proves the length was checked first.
        let mut huge = vec![b'a'; 10 * 1024 * 1024];
        huge[1] = 0xff;
        let tc = TraceContext::default();
        let text = with_metrics(|| {
            let cx = deliver(
                &tc,
                headers(vec![
                    ("traceparent", long(TP)),
                    ("tracestate", long(huge.clone())),
                    (
                        "baggage",
                        AMQPValue::ByteArray(ByteArray::from(huge.clone())),
                    ),
                ]),
                b"",
            );
            assert!(
                cx.span().span_context().is_valid(),
                "traceparent still used"
            );
            assert_eq!(*cx.span().span_context().trace_state(), TraceState::NONE);
            assert!(cx.baggage().is_empty());
            let cx = deliver(&tc, headers(vec![("traceparent", long(huge.clone()))]), b"");
            assert!(!cx.span().span_context().is_valid());
        });
        let s = tc.stats();
        assert_eq!(s.rejected(RejectReason::TracestateOversized), 1);
        assert_eq!(s.rejected(RejectReason::BaggageOversized), 1);
        assert_eq!(s.rejected(RejectReason::Oversized), 1);
        assert_eq!(s.rejected(RejectReason::NotUtf8), 0);
        assert_eq!(s.rejected_total(), 3);
        for reason in ["tracestate_oversized", "baggage_oversized", "oversized"] {
            let line = format!("mindbus_otel_rejected_contexts_total{{reason=\"{reason}\"}} 1");
            assert!(text.contains(&line), "{line} not in {text}");
        }
    }

    #[test]
    fn values_at_the_caps_are_read() {
        let tc = TraceContext::default();
        let ts = (0..32).map(|i| format!("k{i}=v")).collect::<Vec<_>>();
        let bag = format!("k={}", "v".repeat(w3c::MAX_BAGGAGE_LEN - 2));
        let cx = deliver(
            &tc,
            headers(vec![
                ("traceparent", long(format!("{TP}{}", " ".repeat(200)))),
                ("tracestate", long(ts.join(" , "))),
                ("baggage", long(bag)),
            ]),
            b"",
        );
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(sc.trace_state().get("k31"), Some("v"));
        assert_eq!(cx.baggage().len(), 1);
        assert_eq!(tc.stats().rejected_total(), 0);
    }

    #[test]
    fn baggage_past_64_members_is_truncated_and_counted() {
        let tc = TraceContext::default();
        let bag = (0..100)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let text = with_metrics(|| {
            let cx = deliver(&tc, headers(vec![("baggage", long(bag))]), b"");
            assert_eq!(cx.baggage().len(), 64);
            assert!(cx.baggage().get("k0").is_some() && cx.baggage().get("k64").is_none());
        });
        assert_eq!(tc.stats().rejected(RejectReason::BaggageTruncated), 1);
        assert_eq!(tc.stats().baggage_members_dropped(), 36);
        assert!(
            text.contains("mindbus_otel_rejected_contexts_total{reason=\"baggage_truncated\"} 1")
        );
        assert!(text.contains(
            "mindbus_otel_dropped_context_members_total{header=\"baggage\",direction=\"inbound\"} 36"
        ), "{text}");
        // 181 members: the whole value is dropped.
        let bag = (0..181)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let cx = deliver(&tc, headers(vec![("baggage", long(bag))]), b"");
        assert!(cx.baggage().is_empty());
        assert_eq!(tc.stats().rejected(RejectReason::BaggageOversized), 1);
    }

    #[test]
    fn inbound_baggage_can_be_refused_while_outbound_is_kept() {
        let tc = TraceContext::default().accept_inbound_baggage(false);
        let text = with_metrics(|| {
            for bag in [long("k=v"), long("=malformed"), long(vec![0xff; 100_000])] {
                let cx = deliver(
                    &tc,
                    headers(vec![("traceparent", long(TP)), ("baggage", bag)]),
                    b"",
                );
                assert!(cx.span().span_context().is_valid());
                assert!(cx.baggage().is_empty());
            }
            deliver(&tc, headers(vec![("traceparent", long(TP))]), b"");
        });
        assert_eq!(tc.stats().inbound_baggage_ignored(), 3);
        assert_eq!(
            tc.stats().rejected_total(),
            0,
            "not parsed, so not rejected"
        );
        assert!(
            text.contains("mindbus_otel_inbound_baggage_ignored_total 3"),
            "{text}"
        );
        // Outbound baggage is still written.
        let sent = publish(&tc, full_context(), "mindbus.main", None);
        assert_eq!(
            sent.inner().get("baggage"),
            Some(&long("tenant=t1,user=u1"))
        );
        // baggage(false) turns off both directions (and counts ignored ones).
        let off = TraceContext::default().baggage(false);
        let cx = deliver(&off, headers(vec![("baggage", long("k=v"))]), b"");
        assert!(cx.baggage().is_empty());
        assert_eq!(off.stats().inbound_baggage_ignored(), 1);
        assert!(!publish(&off, full_context(), "x", None).contains_key("baggage"));
    }

    #[test]
    fn no_injection_on_exchanges_leaving_the_trust_boundary() {
        let tc = TraceContext::default()
            .no_inject_on_exchange("partner.out")
            .no_inject_on_exchange(String::from("audit"));
        let mut own = FieldTable::default();
        own.insert("x-app".into(), long("kept"));
        let text = with_metrics(|| {
            for exchange in ["partner.out", "audit"] {
                let sent = publish(&tc, full_context(), exchange, Some(own.clone()));
                assert_eq!(header_keys(&sent), vec!["x-app"], "{exchange}");
            }
            // Without caller headers, no header table at all is added.
            let sent = publish(&tc, full_context(), "partner.out", None);
            assert!(sent.inner().is_empty());
        });
        assert_eq!(tc.stats().injection_skipped(), 3);
        assert_eq!(tc.stats().injected(), 0);
        assert!(
            text.contains("mindbus_otel_injection_skipped_total 3"),
            "{text}"
        );
        // Exact names only; other exchanges get the full context.
        for exchange in ["partner.out.2", "partner", "", "mindbus.main"] {
            let sent = publish(&tc, full_context(), exchange, Some(own.clone()));
            assert_eq!(
                header_keys(&sent),
                vec!["baggage", "traceparent", "tracestate", "x-app"],
                "{exchange:?}"
            );
        }
        assert_eq!(tc.stats().injected(), 4);
        assert_eq!(tc.stats().injection_skipped(), 3);
    }

    #[test]
    fn no_injection_by_predicate_also_for_a_configured_propagator() {
        let tc = TraceContext::default()
            .with_propagator(XTrace(vec!["x-trace-id".into()]))
            .no_inject_when(|x| x.starts_with("partner."));
        assert!(
            publish(&tc, full_context(), "partner.eu", None)
                .inner()
                .is_empty()
        );
        let sent = publish(&tc, full_context(), "mindbus.main", None);
        assert_eq!(header_keys(&sent), vec!["x-trace-id"]);
        assert_eq!(tc.stats().injection_skipped(), 1);
        // The default exchange can be excluded by name.
        let tc = TraceContext::default().no_inject_on_exchange("");
        assert!(publish(&tc, full_context(), "", None).inner().is_empty());
        assert!(
            !publish(&tc, full_context(), "amq.direct", None)
                .inner()
                .is_empty()
        );
        assert!(format!("{tc:?}").contains("no_inject_exchanges: [\"\"]"));
    }

    /// #28: what the current W3C text has a receiver inherit goes on to the
    /// next hop: a repeated key once (the first), keys with `@` that the
    /// OpenTelemetry `TraceState` refuses (`foo@@bar`) too, in their place;
    /// a key starting with `@` still drops the value. Inside the message's
    /// trace only, and as the API changed it when it did.
    #[test]
    fn the_next_hop_inherits_what_the_current_w3c_text_says() {
        let tc = TraceContext::default();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let inherit = |ts: &str| {
            let cx = deliver(
                &tc,
                headers(vec![("traceparent", long(tp)), ("tracestate", long(ts))]),
                b"{}",
            );
            let sent = publish(&tc, cx, "mindbus.main", None);
            sent.inner().get("tracestate").cloned()
        };
        let text = with_metrics(|| {
            assert_eq!(inherit("foo=1,foo=2"), Some(long("foo=1")));
            assert_eq!(inherit("foo@=1,bar=2"), Some(long("foo@=1,bar=2")));
            assert_eq!(
                inherit("a=0,foo@@bar=1,bar=2"),
                Some(long("a=0,foo@@bar=1,bar=2"))
            );
            assert_eq!(inherit("foo@bar@baz=1"), Some(long("foo@bar@baz=1")));
            assert_eq!(inherit("@foo=1,bar=2"), None);
        });
        assert!(
            text.contains("mindbus_otel_dropped_context_members_total{header=\"tracestate\",direction=\"inbound\"} 1"),
            "{text}"
        );
        // Changed through the API: its members first, then the ones it
        // could not hold.
        let cx = deliver(
            &tc,
            headers(vec![
                ("traceparent", long(tp)),
                ("tracestate", long("a=0,foo@@bar=1")),
            ]),
            b"{}",
        );
        let sc = cx.span().span_context().clone();
        let changed = SpanContext::new(
            sc.trace_id(),
            SpanId::from(7u64),
            sc.trace_flags(),
            false,
            sc.trace_state().insert("me", "2").expect("valid"),
        );
        let sent = publish(&tc, cx.with_remote_span_context(changed), "x", None);
        assert_eq!(
            sent.inner().get("tracestate"),
            Some(&long("me=2,a=0,foo@@bar=1"))
        );
        // Another trace in the same context: none of it.
        let other = SpanContext::new(
            TraceId::from(9u128),
            SpanId::from(9u64),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        let cx = deliver(
            &tc,
            headers(vec![
                ("traceparent", long(tp)),
                ("tracestate", long("foo@@bar=1")),
            ]),
            b"{}",
        );
        let sent = publish(&tc, cx.with_remote_span_context(other), "x", None);
        assert_eq!(sent.inner().get("tracestate"), None);
    }

    #[test]
    fn outbound_values_stay_within_the_limits() {
        // A trace state the API accepts but the W3C grammar does not, and
        // baggage whose encoding would exceed 8192 bytes.
        let sc = SpanContext::new(
            TraceId::from(1u128),
            SpanId::from(1u64),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("ok", "1"), ("bad", "caf\u{e9}")]).expect("API-valid"),
        );
        let mut bag = opentelemetry::baggage::Baggage::new();
        for k in ["a", "b", "c", "d"] {
            bag.insert(k, " ".repeat(1000));
        }
        let cx = Context::new()
            .with_remote_span_context(sc)
            .with_baggage(bag);
        let tc = TraceContext::default();
        let text = with_metrics(|| {
            let sent = publish(&tc, cx, "x", None);
            assert_eq!(sent.inner().get("tracestate"), Some(&long("ok=1")));
            let Some(AMQPValue::LongString(b)) = sent.inner().get("baggage") else {
                panic!("baggage written");
            };
            assert!(b.len() <= w3c::MAX_BAGGAGE_LEN);
        });
        assert_eq!(tc.stats().outbound_members_dropped(), 3);
        assert!(text.contains(
            "mindbus_otel_dropped_context_members_total{header=\"tracestate\",direction=\"outbound\"} 1"
        ), "{text}");
    }

    /// A propagator that writes whatever it is given.
    #[derive(Debug)]
    struct Verbatim(Vec<String>);

    impl TextMapPropagator for Verbatim {
        fn inject_context(&self, _: &Context, injector: &mut dyn Injector) {
            injector.set("traceparent", "0".repeat(MAX_TRACEPARENT_LEN + 1));
            injector.set("x-other", "y".repeat(100_000));
        }
        fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
            // Reads its baggage from any header it can see.
            let mut cx = cx.clone();
            if let Some(v) = extractor.get("baggage") {
                cx = cx.with_baggage([KeyValue::new("from-baggage", v.to_owned())]);
            }
            if let Some(v) = extractor.get("x-bag") {
                cx = cx.with_baggage([KeyValue::new("from-x-bag", v.to_owned())]);
            }
            cx
        }
        fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
            opentelemetry::propagation::text_map_propagator::FieldIter::new(&self.0)
        }
    }

    #[test]
    fn a_configured_propagator_sees_capped_values_and_the_policies() {
        let fields = vec!["traceparent".into(), "baggage".into(), "x-bag".into()];
        let tc = TraceContext::default().with_propagator(Verbatim(fields.clone()));
        let over = "v".repeat(MAX_HEADER_VALUE_LEN + 1);
        let cx = deliver(
            &tc,
            headers(vec![
                ("traceparent", long(over.clone())),
                ("baggage", long(over.clone())),
                ("x-bag", long("ok")),
            ]),
            b"",
        );
        assert!(
            cx.baggage().get("from-baggage").is_none(),
            "never handed over"
        );
        assert!(cx.baggage().get("from-x-bag").is_some());
        assert_eq!(tc.stats().rejected(RejectReason::Oversized), 1);
        assert_eq!(tc.stats().rejected(RejectReason::BaggageOversized), 1);
        assert_eq!(
            tc.stats().rejected(RejectReason::Malformed),
            0,
            "counted once"
        );
        // Inbound baggage off: hidden from the propagator, and any baggage
        // it finds elsewhere is cleared.
        let tc = TraceContext::default()
            .with_propagator(Verbatim(fields))
            .accept_inbound_baggage(false);
        let cx = deliver(
            &tc,
            headers(vec![("baggage", long("k=v")), ("x-bag", long("ok"))]),
            b"",
        );
        assert!(cx.baggage().is_empty());
        assert_eq!(tc.stats().inbound_baggage_ignored(), 1);
        // What it writes over a W3C limit is not sent; other headers are.
        let sent = publish(&tc, full_context(), "x", None);
        assert_eq!(header_keys(&sent), vec!["x-other"]);
        assert_eq!(tc.stats().outbound_members_dropped(), 1);
    }
}
