//! Stream-style consuming: [`TracedConsumer`] yields [`TracedDelivery`]
//! items whose `ack`/`nack`/`reject` run the settle hooks.

use crate::interceptor::InterceptorChain;
use crate::message::{MessageState, Outcome, Settlement};
use futures_util::Stream;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{MessageCount, ShortString};
use lapin::{Consumer, message::Delivery};
use opentelemetry::Context;
use std::fmt;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Instant;

fn empty_context() -> &'static Context {
    static EMPTY: OnceLock<Context> = OnceLock::new();
    EMPTY.get_or_init(Context::new)
}

/// A delivery with telemetry. Derefs to lapin's [`Delivery`].
///
/// Settle it with [`ack`](TracedDelivery::ack), [`nack`](TracedDelivery::nack)
/// or [`reject`](TracedDelivery::reject): they call lapin, then run the
/// settle hooks with the outcome (a CONSUMER span ends there). Dropping it
/// unsettled runs them with [`Outcome::Unsettled`] (or
/// [`Outcome::AutoAck`] for a `no_ack` consumer).
///
/// Settling it otherwise is seen too, when it is settled or dropped:
/// - by an `ack`/`nack` with `multiple: true` of a later delivery of the
///   same channel, or by the [`TracedChannel`](crate::TracedChannel)'s
///   `basic_ack`/`basic_nack`/`basic_reject` with its tag: it ends with
///   that outcome, at that time;
/// - through lapin directly (`delivery.acker`, or `basic_ack` on the lapin
///   [`Channel`](lapin::Channel)): it ends as [`Outcome::SettledElsewhere`]
///   when its acker was used, else (lapin's channel-level calls leave no
///   trace on the delivery) as [`Outcome::Unsettled`].
pub struct TracedDelivery {
    delivery: Delivery,
    state: Option<MessageState>,
    chain: Arc<InterceptorChain>,
    no_ack: bool,
}

impl TracedDelivery {
    /// A pushed delivery, or (`pull`: when the `basic_get` call began) a
    /// pulled message.
    pub(crate) fn new(
        delivery: Delivery,
        chain: Arc<InterceptorChain>,
        queue: &str,
        no_ack: bool,
        pull: Option<Instant>,
    ) -> Self {
        let state = match pull {
            Some(call) => chain.start_pulled_delivery(&delivery, queue, call),
            None => chain.start_delivery(&delivery, queue, false),
        };
        TracedDelivery {
            delivery,
            state: Some(state),
            chain,
            no_ack,
        }
    }

    /// The OpenTelemetry context this delivery should be processed in: the
    /// CONSUMER span when spans are on, else the extracted remote parent,
    /// else empty. Use it as `tracer.start_with_context(.., traced.context())`
    /// or `future.with_context(traced.context().clone())`.
    pub fn context(&self) -> &Context {
        match &self.state {
            Some(state) => state.context(),
            None => empty_context(),
        }
    }

    /// The message state (kind, extensions) kept until settlement.
    pub fn state(&self) -> Option<&MessageState> {
        self.state.as_ref()
    }

    /// The lapin delivery.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// Acknowledges it, as [`Acker::ack`](lapin::Acker::ack). With
    /// `multiple: true`, every earlier unsettled delivery of the channel
    /// ends as acked too.
    pub async fn ack(mut self, options: BasicAckOptions) -> lapin::Result<bool> {
        let call = Instant::now();
        let res = self.delivery.acker.ack(options).await;
        self.finish(Outcome::Acked, &res, options.multiple, call);
        res
    }

    /// Negatively acknowledges it, as [`Acker::nack`](lapin::Acker::nack).
    /// With `multiple: true`, every earlier unsettled delivery of the
    /// channel ends as nacked too.
    pub async fn nack(mut self, options: BasicNackOptions) -> lapin::Result<bool> {
        let call = Instant::now();
        let res = self.delivery.acker.nack(options).await;
        let outcome = Outcome::Nacked {
            requeue: options.requeue,
        };
        self.finish(outcome, &res, options.multiple, call);
        res
    }

    /// Rejects it, as [`Acker::reject`](lapin::Acker::reject).
    pub async fn reject(mut self, options: BasicRejectOptions) -> lapin::Result<bool> {
        let call = Instant::now();
        let res = self.delivery.acker.reject(options).await;
        self.finish(
            Outcome::Rejected {
                requeue: options.requeue,
            },
            &res,
            false,
            call,
        );
        res
    }

    fn finish(
        &mut self,
        outcome: Outcome,
        res: &lapin::Result<bool>,
        multiple: bool,
        call: Instant,
    ) {
        let Some(mut state) = self.state.take() else {
            return;
        };
        let tag = self.delivery.delivery_tag;
        if multiple && matches!(res, Ok(true)) {
            // Every earlier delivery of the channel still unsettled.
            let settles = &self.chain.settles;
            settles.record(0, tag.saturating_sub(1), outcome, Instant::now());
        }
        // Settled already, by a multiple or by-tag settlement: that one
        // counts (this call, if lapin sent it, is the caller's to answer).
        if let Some((earlier, at)) = self.chain.settles.claim(tag, state.started()) {
            state.mark_ended_at(at);
            self.chain.settle(&mut state, &Settlement::new(earlier));
            return;
        }
        let settlement = Settlement {
            outcome,
            failure: None,
            error: res.as_ref().err(),
            applied: matches!(res, Ok(true)),
            call_started: Some(call),
        };
        self.chain.settle(&mut state, &settlement);
    }
}

impl Drop for TracedDelivery {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            let tag = self.delivery.delivery_tag;
            if !self.no_ack
                && let Some((outcome, at)) = self.chain.settles.claim(tag, state.started())
            {
                state.mark_ended_at(at);
                self.chain.settle(&mut state, &Settlement::new(outcome));
                return;
            }
            let acker = &self.delivery.acker;
            let outcome = if self.no_ack {
                Outcome::AutoAck
            } else if !acker.usable() && !acker.poisoned() {
                Outcome::SettledElsewhere
            } else {
                Outcome::Unsettled
            };
            let mut settlement = Settlement::new(outcome);
            settlement.applied = outcome == Outcome::AutoAck;
            self.chain.settle(&mut state, &settlement);
        }
    }
}

impl Deref for TracedDelivery {
    type Target = Delivery;
    fn deref(&self) -> &Delivery {
        &self.delivery
    }
}

impl AsRef<Delivery> for TracedDelivery {
    fn as_ref(&self) -> &Delivery {
        &self.delivery
    }
}

impl fmt::Debug for TracedDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedDelivery")
            .field("delivery_tag", &self.delivery.delivery_tag)
            .field("routing_key", &self.delivery.routing_key)
            .field("settled", &self.state.is_none())
            .finish_non_exhaustive()
    }
}

/// A message fetched with `basic_get`. Derefs to its [`TracedDelivery`].
#[derive(Debug)]
pub struct TracedGetMessage {
    /// The delivery.
    pub delivery: TracedDelivery,
    /// Messages left in the queue after this one.
    pub message_count: MessageCount,
}

impl TracedGetMessage {
    /// The delivery, to settle it.
    pub fn into_delivery(self) -> TracedDelivery {
        self.delivery
    }

    /// Acknowledges it (see [`TracedDelivery::ack`]).
    pub async fn ack(self, options: BasicAckOptions) -> lapin::Result<bool> {
        self.delivery.ack(options).await
    }

    /// Negatively acknowledges it (see [`TracedDelivery::nack`]).
    pub async fn nack(self, options: BasicNackOptions) -> lapin::Result<bool> {
        self.delivery.nack(options).await
    }

    /// Rejects it (see [`TracedDelivery::reject`]).
    pub async fn reject(self, options: BasicRejectOptions) -> lapin::Result<bool> {
        self.delivery.reject(options).await
    }
}

impl Deref for TracedGetMessage {
    type Target = TracedDelivery;
    fn deref(&self) -> &TracedDelivery {
        &self.delivery
    }
}

/// A lapin [`Consumer`] whose items are [`TracedDelivery`].
pub struct TracedConsumer {
    inner: Consumer,
    chain: Arc<InterceptorChain>,
    queue: Arc<str>,
    no_ack: bool,
}

impl TracedConsumer {
    pub(crate) fn new(
        inner: Consumer,
        chain: Arc<InterceptorChain>,
        queue: Arc<str>,
        no_ack: bool,
    ) -> Self {
        TracedConsumer {
            inner,
            chain,
            queue,
            no_ack,
        }
    }

    /// The consumer tag.
    pub fn tag(&self) -> ShortString {
        self.inner.tag()
    }

    /// The queue consumed from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The lapin consumer (its deliveries then bypass the chain).
    pub fn into_inner(self) -> Consumer {
        self.inner
    }

    pub(crate) fn into_parts(self) -> (Consumer, Arc<InterceptorChain>, Arc<str>, bool) {
        (self.inner, self.chain, self.queue, self.no_ack)
    }
}

impl Stream for TracedConsumer {
    type Item = lapin::Result<TracedDelivery>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(delivery))) => Poll::Ready(Some(Ok(TracedDelivery::new(
                delivery,
                Arc::clone(&this.chain),
                &this.queue,
                this.no_ack,
                None,
            )))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for TracedConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedConsumer")
            .field("queue", &self.queue)
            .field("no_ack", &self.no_ack)
            .finish_non_exhaustive()
    }
}
