//! The interceptor chain.
//!
//! An [`Interceptor`] has four synchronous, infallible hooks, each a no-op
//! by default:
//!
//! | hook | when | sees |
//! |---|---|---|
//! | [`on_publish`](Interceptor::on_publish) | `basic_publish`, before lapin sends | [`OutgoingMessage`] |
//! | [`on_publish_result`](Interceptor::on_publish_result) | sent (no confirms), confirmed, failed, or abandoned | [`MessageState`], [`PublishResult`] |
//! | [`on_delivery`](Interceptor::on_delivery) | a delivery arrives (consume or `basic_get`) | [`IncomingMessage`] |
//! | [`on_settle`](Interceptor::on_settle) | ack / nack / reject / auto-ack / dropped unsettled | [`MessageState`], [`Settlement`] |
//!
//! ## Order
//! The chain is an onion whose first interceptor is the one nearest the
//! wire: hooks on the way **in** from the broker (`on_delivery`,
//! `on_publish_result`) run in chain order, hooks on the way **out** to the
//! broker (`on_publish`, `on_settle`) run in reverse chain order. With the
//! standard chain `[TraceContext, MessagingSpans, AgentMetrics]`, a delivery
//! is extracted before its CONSUMER span starts, and a publish gets its
//! PRODUCER span before that span's context is injected into the headers.
//!
//! ## Guarantees
//! Every start hook is followed by exactly one end hook, also when the
//! caller drops a future or a delivery. A hook that panics is caught,
//! counted and logged; the message goes on and later hooks still run.

use crate::message::{
    Direction, EmptyPull, IncomingMessage, MessageState, OutgoingMessage, PublishResult, Settlement,
};
use crate::settles::Settles;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, message::Delivery};
use opentelemetry::Context;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Observes and decorates messages. Hooks must be cheap and must not block.
pub trait Interceptor: Send + Sync + 'static {
    /// A message is about to be published: read it, add headers, change
    /// its context, keep state in its extensions.
    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        let _ = msg;
    }

    /// A publish ended (see [`PublishResult`]).
    fn on_publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        let _ = (state, result);
    }

    /// A message was delivered (push consumer or `basic_get`).
    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        let _ = msg;
    }

    /// A delivered message was settled (or dropped unsettled).
    fn on_settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        let _ = (state, settlement);
    }

    /// A `basic_get` fetched nothing (the queue was empty, or the call
    /// failed). A pull that fetched a message is an
    /// [`on_delivery`](Interceptor::on_delivery) with
    /// [`MessageState::pull_started`] set.
    fn on_empty_pull(&self, pull: &EmptyPull<'_>) {
        let _ = pull;
    }

    /// For the built-in interceptors whose per-message state the chain
    /// keeps inline, one slot per type: their type's name. A chain may hold
    /// each at most once ([`InterceptorChain::check`]). Not for other
    /// interceptors, which keep their state in the message's extensions.
    #[doc(hidden)]
    fn builtin_slot(&self) -> Option<&'static str> {
        None
    }
}

impl<T: Interceptor + ?Sized> Interceptor for Arc<T> {
    fn on_publish(&self, msg: &mut OutgoingMessage<'_>) {
        (**self).on_publish(msg);
    }
    fn on_publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        (**self).on_publish_result(state, result);
    }
    fn on_delivery(&self, msg: &mut IncomingMessage<'_>) {
        (**self).on_delivery(msg);
    }
    fn on_settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        (**self).on_settle(state, settlement);
    }
    fn on_empty_pull(&self, pull: &EmptyPull<'_>) {
        (**self).on_empty_pull(pull);
    }
    fn builtin_slot(&self) -> Option<&'static str> {
        (**self).builtin_slot()
    }
}

macro_rules! closure_interceptor {
    ($(#[$doc:meta])* $ty:ident, $ctor:ident, $hook:ident, ($($arg:ident: $argty:ty),*)) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $ty<F>(F);

        impl<F> fmt::Debug for $ty<F> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(stringify!($ty))
            }
        }

        $(#[$doc])*
        pub fn $ctor<F>(f: F) -> $ty<F>
        where
            F: Fn($($argty),*) + Send + Sync + 'static,
        {
            $ty(f)
        }

        impl<F> Interceptor for $ty<F>
        where
            F: Fn($($argty),*) + Send + Sync + 'static,
        {
            fn $hook(&self, $($arg: $argty),*) {
                (self.0)($($arg),*)
            }
        }
    };
}

closure_interceptor!(
    /// An interceptor made of one closure run on every publish.
    OnPublish, on_publish, on_publish, (msg: &mut OutgoingMessage<'_>)
);
closure_interceptor!(
    /// An interceptor made of one closure run on every publish result.
    OnPublishResult, on_publish_result, on_publish_result,
    (state: &mut MessageState, result: &PublishResult<'_>)
);
closure_interceptor!(
    /// An interceptor made of one closure run on every delivery.
    OnDelivery, on_delivery, on_delivery, (msg: &mut IncomingMessage<'_>)
);
closure_interceptor!(
    /// An interceptor made of one closure run on every settlement.
    OnSettle, on_settle, on_settle, (state: &mut MessageState, settlement: &Settlement<'_>)
);

/// Counts of hooks that panicked (caught; the message went on).
static HOOK_PANICS: AtomicU64 = AtomicU64::new(0);

/// How many interceptor hooks have panicked in this process (each was
/// caught and logged; the message went on).
pub fn hook_panics() -> u64 {
    HOOK_PANICS.load(Ordering::Relaxed)
}

/// An ordered list of interceptors plus the agent identity: what a
/// [`TracedChannel`](crate::TracedChannel) runs. Public so interceptors can be
/// driven without a broker (unit tests, benchmarks): the `start_*`/`end_*`
/// methods run the hooks exactly as the channel does.
pub struct InterceptorChain {
    interceptors: Box<[Arc<dyn Interceptor>]>,
    agent: Option<Arc<str>>,
    /// Settlements of this channel's deliveries by tag range.
    pub(crate) settles: Settles,
}

impl fmt::Debug for InterceptorChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptorChain")
            .field("interceptors", &self.interceptors.len())
            .field("agent", &self.agent)
            .finish()
    }
}

fn guarded(hook: &'static str, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        HOOK_PANICS.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mindbus_otel_interceptor_panics_total", "hook" => hook).increment(1);
        tracing::error!(
            hook,
            "mindbus-otel: an interceptor hook panicked; the message goes on"
        );
    }
}

/// Why a chain cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainError {
    /// The chain holds two interceptors of one built-in type
    /// ([`MessagingSpans`](crate::MessagingSpans),
    /// [`AgentMetrics`](crate::AgentMetrics) or
    /// [`TaskMetrics`](crate::TaskMetrics)): each keeps its per-message state
    /// in one inline slot, which the second would overwrite.
    Duplicate {
        /// The type's name.
        interceptor: &'static str,
        /// Positions in the chain (0 = nearest the wire) of the two.
        positions: (usize, usize),
    },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Duplicate {
                interceptor,
                positions: (a, b),
            } => write!(
                f,
                "mindbus-otel: the chain holds {interceptor} twice (interceptors {a} and {b}); \
                 each built-in interceptor may appear once: configure one instance, or share \
                 it between channels with `with_shared`"
            ),
        }
    }
}

impl std::error::Error for ChainError {}

impl InterceptorChain {
    /// Checks that a list of interceptors makes a sound chain: each
    /// built-in interceptor at most once.
    pub fn check(interceptors: &[Arc<dyn Interceptor>]) -> Result<(), ChainError> {
        for (b, later) in interceptors.iter().enumerate() {
            let Some(slot) = later.builtin_slot() else {
                continue;
            };
            if let Some(a) = interceptors[..b]
                .iter()
                .position(|i| i.builtin_slot() == Some(slot))
            {
                return Err(ChainError::Duplicate {
                    interceptor: slot,
                    positions: (a, b),
                });
            }
        }
        Ok(())
    }

    /// A chain of `interceptors` (nearest the wire first) for `agent`. It
    /// does not [`check`](Self::check) them: a chain with a built-in
    /// interceptor twice records wrong times and outcomes.
    pub fn new(interceptors: Vec<Arc<dyn Interceptor>>, agent: Option<Arc<str>>) -> Self {
        InterceptorChain {
            interceptors: interceptors.into_boxed_slice(),
            agent,
            settles: Settles::default(),
        }
    }

    /// True when there is no interceptor (the channel is a pass-through).
    pub fn is_empty(&self) -> bool {
        self.interceptors.is_empty()
    }

    /// The agent identity.
    pub fn agent(&self) -> Option<&Arc<str>> {
        self.agent.as_ref()
    }

    /// Runs the publish hooks for a message, as `basic_publish` does before
    /// handing it to lapin: returns the properties to send (with the
    /// headers the hooks set) and the state to pass to
    /// [`end_publish`](Self::end_publish). The caller's current
    /// OpenTelemetry context is the message's starting context.
    pub fn start_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> (BasicProperties, MessageState) {
        let mut state = MessageState::new(Direction::Sent, Context::current(), self.agent.clone());
        let mut headers = None;
        {
            let mut msg = OutgoingMessage {
                exchange,
                routing_key,
                options,
                payload,
                properties: &properties,
                headers: &mut headers,
                state: &mut state,
            };
            self.publish(&mut msg);
        }
        let properties = match headers {
            Some(h) => properties.with_headers(h),
            None => properties,
        };
        (properties, state)
    }

    /// Runs the publish-result hooks.
    pub fn end_publish(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        self.publish_result(state, result);
    }

    /// Runs the delivery hooks for a delivery from `queue` (`pull`: fetched
    /// with `basic_get`) and returns its state, for
    /// [`end_delivery`](Self::end_delivery).
    pub fn start_delivery(&self, delivery: &Delivery, queue: &str, pull: bool) -> MessageState {
        self.start_delivery_pulled_at(delivery, queue, pull.then(Instant::now))
    }

    /// Runs the delivery hooks for a message a `basic_get` call begun at
    /// `call` fetched (its `receive` covers the call).
    pub fn start_pulled_delivery(
        &self,
        delivery: &Delivery,
        queue: &str,
        call: Instant,
    ) -> MessageState {
        self.start_delivery_pulled_at(delivery, queue, Some(call))
    }

    fn start_delivery_pulled_at(
        &self,
        delivery: &Delivery,
        queue: &str,
        pull: Option<Instant>,
    ) -> MessageState {
        let mut state = MessageState::new(Direction::Received, Context::new(), self.agent.clone());
        if let Some(call) = pull {
            state = state.pulled(call);
        }
        if !self.is_empty() {
            let mut msg = IncomingMessage {
                delivery,
                queue,
                state: &mut state,
            };
            self.delivery(&mut msg);
        }
        state
    }

    /// Runs the empty-pull hooks for a `basic_get` on `queue`, begun at
    /// `call`, that fetched nothing (`error`: it failed).
    pub fn empty_pull(&self, queue: &str, call: Instant, error: Option<&lapin::Error>) {
        if self.is_empty() {
            return;
        }
        let pull = EmptyPull {
            queue,
            started: call,
            ended: Instant::now(),
            error,
            agent: self.agent.as_ref(),
        };
        for i in self.interceptors.iter() {
            guarded("on_empty_pull", || i.on_empty_pull(&pull));
        }
    }

    /// Runs the settle hooks.
    pub fn end_delivery(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        self.settle(state, settlement);
    }

    pub(crate) fn publish(&self, msg: &mut OutgoingMessage<'_>) {
        for i in self.interceptors.iter().rev() {
            guarded("on_publish", || i.on_publish(msg));
        }
    }

    pub(crate) fn publish_result(&self, state: &mut MessageState, result: &PublishResult<'_>) {
        if self.interceptors.is_empty() {
            return;
        }
        state.mark_ended();
        for i in self.interceptors.iter() {
            guarded("on_publish_result", || i.on_publish_result(state, result));
        }
    }

    pub(crate) fn delivery(&self, msg: &mut IncomingMessage<'_>) {
        for i in self.interceptors.iter() {
            guarded("on_delivery", || i.on_delivery(msg));
        }
    }

    pub(crate) fn settle(&self, state: &mut MessageState, settlement: &Settlement<'_>) {
        if self.interceptors.is_empty() {
            return;
        }
        state.mark_ended();
        for i in self.interceptors.iter().rev() {
            guarded("on_settle", || i.on_settle(state, settlement));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMetrics, MessagingSpans, TaskMetrics, TraceContext};

    fn arcs(list: Vec<Arc<dyn Interceptor>>) -> Vec<Arc<dyn Interceptor>> {
        list
    }

    #[test]
    fn a_built_in_interceptor_may_appear_once() {
        let spans = MessagingSpans::new();
        let standard = arcs(vec![
            Arc::new(TraceContext::default()),
            Arc::new(spans.clone()),
            Arc::new(AgentMetrics::new()),
            Arc::new(TaskMetrics::new()),
            Arc::new(on_publish(|_| {})),
            Arc::new(on_publish(|_| {})),
        ]);
        assert_eq!(InterceptorChain::check(&standard), Ok(()));
        // Two TraceContexts keep no inline state: allowed.
        let two_contexts = arcs(vec![
            Arc::new(TraceContext::default()),
            Arc::new(TraceContext::default()),
        ]);
        assert_eq!(InterceptorChain::check(&two_contexts), Ok(()));

        let twice = arcs(vec![
            Arc::new(TraceContext::default()),
            Arc::new(spans.clone()),
            Arc::new(AgentMetrics::new()),
            // The same type behind an Arc, as `with(Arc::new(..))` adds it.
            Arc::new(Arc::new(MessagingSpans::new())),
        ]);
        let err = InterceptorChain::check(&twice).unwrap_err();
        assert_eq!(
            err,
            ChainError::Duplicate {
                interceptor: "MessagingSpans",
                positions: (1, 3)
            }
        );
        assert!(
            err.to_string().contains("holds MessagingSpans twice"),
            "{err}"
        );
        for dup in [
            arcs(vec![
                Arc::new(AgentMetrics::new()),
                Arc::new(AgentMetrics::new()),
            ]),
            arcs(vec![
                Arc::new(TaskMetrics::new()),
                Arc::new(TaskMetrics::new()),
            ]),
        ] {
            assert!(InterceptorChain::check(&dup).is_err());
        }
    }
}
