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
    Direction, IncomingMessage, MessageState, OutgoingMessage, PublishResult, Settlement,
};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, message::Delivery};
use opentelemetry::Context;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

impl InterceptorChain {
    /// A chain of `interceptors` (nearest the wire first) for `agent`.
    pub fn new(interceptors: Vec<Arc<dyn Interceptor>>, agent: Option<Arc<str>>) -> Self {
        InterceptorChain {
            interceptors: interceptors.into_boxed_slice(),
            agent,
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
        let mut state = MessageState::new(Direction::Received, Context::new(), self.agent.clone());
        if pull {
            state = state.pulled();
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
