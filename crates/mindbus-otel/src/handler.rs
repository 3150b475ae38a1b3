//! Handler-style consuming: [`TracedChannel::consume_with`].
//!
//! The handler gets lapin's own [`Delivery`] and returns
//! `Result<(), E>`; the plugin settles for it:
//!
//! | handler | settlement | hooks see |
//! |---|---|---|
//! | `Ok(())` | `basic.ack` | [`Outcome::Acked`] |
//! | `Err(e)` | `basic.nack(requeue = false)`: dead-lettered when the queue has a DLX | [`Outcome::Nacked`] and [`HandlerFailure::Error`] |
//! | panics | caught; `basic.nack(requeue = false)`; counted and logged | [`Outcome::Nacked`] and [`HandlerFailure::Panic`] |
//! | (`no_ack` consumer) | nothing to send | [`Outcome::AutoAck`] |
//! | settled the message itself | nothing more | see below |
//!
//! A handler may settle its message itself; the plugin then does not
//! settle it again (a second ack of one delivery tag would close the
//! channel). Through the [`TracedChannel`]'s `basic_ack` / `basic_nack` /
//! `basic_reject` with `delivery.delivery_tag`, the hooks see that outcome,
//! at that time. Through lapin's `delivery.acker` they see
//! [`Outcome::SettledElsewhere`] (settled, not by the plugin, outcome
//! unknown), without an error. Lapin's own channel-level calls leave no
//! trace the plugin can see: do not use them here.
//!
//! The handler future runs inside the message's OpenTelemetry context, so
//! `Context::current()` in it (also after an `.await`) is the CONSUMER span
//! (or the extracted parent when spans are off), and what it publishes on a
//! [`TracedChannel`] joins the same trace. Messages are handled one at a
//! time, in order, as MindBus agents do (`prefetch_count = 1`); for
//! concurrent processing use the stream style.

use crate::channel::TracedChannel;
use crate::interceptor::InterceptorChain;
use crate::message::{HandlerFailure, MessageState, Outcome, Settlement};
use futures_util::{FutureExt as _, Stream as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, Channel, Consumer};
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

/// Counters of one handler-style consumer.
#[derive(Debug, Default)]
pub struct ConsumeStats {
    delivered: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    handler_errors: AtomicU64,
    panics: AtomicU64,
    settle_errors: AtomicU64,
    settled_by_handler: AtomicU64,
}

impl ConsumeStats {
    /// Deliveries handed to the handler.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
    /// Messages acked: by the plugin after the handler returned `Ok`, or by
    /// the handler itself through the traced channel's `basic_ack`. Counted
    /// after the settle hooks ran: once this reads `n`, the spans and
    /// metrics of those `n` messages are recorded.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }
    /// Messages nacked (requeue = false) after an `Err` or a panic, or
    /// nacked or rejected by the handler itself through the traced channel;
    /// counted after the settle hooks ran, as [`acked`](Self::acked).
    pub fn nacked(&self) -> u64 {
        self.nacked.load(Ordering::Acquire)
    }
    /// Handler calls that returned `Err`.
    pub fn handler_errors(&self) -> u64 {
        self.handler_errors.load(Ordering::Relaxed)
    }
    /// Handler calls that panicked (caught).
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }
    /// Acks/nacks that did not reach the broker because the channel or
    /// connection closed: lapin failed the call, or (as it does once the
    /// channel is gone) did not send it. The broker redelivers those.
    pub fn settle_errors(&self) -> u64 {
        self.settle_errors.load(Ordering::Relaxed)
    }
    /// Messages the handler settled through lapin's `delivery.acker`
    /// (outcome unknown to the plugin, so neither acked nor nacked here).
    /// Those it settled through the traced channel's `basic_ack` /
    /// `basic_nack` / `basic_reject` count as acked or nacked.
    pub fn settled_by_handler(&self) -> u64 {
        self.settled_by_handler.load(Ordering::Acquire)
    }
}

/// Release, so a reader that sees the count (with `Acquire`) also sees what
/// was recorded before it.
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Release);
}

/// A running handler-style consumer.
///
/// Dropping the handle leaves the consumer running (as a detached task);
/// [`cancel`](ConsumerHandle::cancel) stops it after the message in hand.
pub struct ConsumerHandle {
    tag: ShortString,
    channel: Channel,
    stats: Arc<ConsumeStats>,
    task: tokio::task::JoinHandle<()>,
}

impl ConsumerHandle {
    /// The consumer tag.
    pub fn tag(&self) -> &ShortString {
        &self.tag
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<ConsumeStats> {
        &self.stats
    }

    /// Cancels the consumer (`basic.cancel`) and waits until the message in
    /// hand is settled and the loop has ended.
    ///
    /// The handle and the loop hold clones of the channel; once they are
    /// gone, lapin closes the channel if nothing else holds it. Keep a
    /// [`TracedChannel`] of it until the connection is closed: with lapin
    /// 4.12, closing the connection while one of its channels is closing
    /// fails (`invalid channel state: Closing`), and may not complete.
    pub async fn cancel(self) -> lapin::Result<()> {
        let res = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default())
            .await;
        let _ = self.task.await;
        res
    }

    /// [`cancel`](Self::cancel) within `bound`, whatever the broker and the
    /// handler do: for a shutdown that must end (a supervisor's SIGTERM,
    /// a rolling restart). The message in hand is finished and settled if
    /// that fits in `bound`; otherwise the consumer loop is stopped with the
    /// message unsettled, and the broker redelivers it when the channel or
    /// connection closes (the handler may have done part of its work: an
    /// at-least-once redelivery, as after a crash).
    ///
    /// ```no_run
    /// # async fn f(handle: mindbus_otel::ConsumerHandle) {
    /// use mindbus_otel::CancelOutcome;
    /// match handle.cancel_within(std::time::Duration::from_secs(5)).await {
    ///     CancelOutcome::Clean => {}
    ///     other => eprintln!("consumer stopped uncleanly: {other}"),
    /// }
    /// # }
    /// ```
    pub async fn cancel_within(self, bound: std::time::Duration) -> CancelOutcome {
        let deadline = tokio::time::Instant::now() + bound;
        let cancel = self
            .channel
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default());
        let cancelled = tokio::time::timeout_at(deadline, cancel).await;
        let mut task = self.task;
        let joined = tokio::time::timeout_at(deadline, &mut task).await;
        if joined.is_err() {
            task.abort();
        }
        match (cancelled, joined) {
            (Err(_), _) | (_, Err(_)) => CancelOutcome::TimedOut(bound),
            (Ok(Err(e)), Ok(_)) => CancelOutcome::Broker(e),
            (Ok(Ok(())), Ok(_)) => CancelOutcome::Clean,
        }
    }

    /// Waits until the consumer ends (cancelled, or its channel closed).
    pub async fn join(self) {
        let _ = self.task.await;
    }

    /// True when the consumer loop has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// How [`ConsumerHandle::cancel_within`] ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// Cancelled, and the message in hand (if any) was settled.
    Clean,
    /// The broker refused or lost the cancel (its channel or connection is
    /// gone); the consumer loop has ended. A message it had not settled
    /// goes back to its queue with the channel.
    Broker(lapin::Error),
    /// The bound passed: the consumer loop was stopped; the message in
    /// hand, unsettled, goes back to its queue when the channel or
    /// connection closes.
    TimedOut(std::time::Duration),
}

impl CancelOutcome {
    /// True for [`CancelOutcome::Clean`].
    pub fn is_clean(&self) -> bool {
        matches!(self, CancelOutcome::Clean)
    }
}

impl fmt::Display for CancelOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelOutcome::Clean => f.write_str("cancelled, message in hand settled"),
            CancelOutcome::Broker(e) => write!(f, "the broker did not take the cancel: {e}"),
            CancelOutcome::TimedOut(bound) => write!(
                f,
                "not done within {bound:?}: stopped, the message in hand left to the broker to redeliver"
            ),
        }
    }
}

impl fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("tag", &self.tag)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload")
}

impl TracedChannel {
    /// Consumes `queue` with a handler that is settled for you (see the
    /// [module docs](crate::handler)). Spawns the consumer loop on the
    /// current Tokio runtime and returns once the consumer is registered.
    ///
    /// ```no_run
    /// # async fn f(channel: mindbus_otel::TracedChannel) -> lapin::Result<()> {
    /// use lapin::{options::BasicConsumeOptions, types::FieldTable};
    /// let handle = channel
    ///     .consume_with("agent.writer".into(), "writer".into(), BasicConsumeOptions::default(),
    ///         FieldTable::default(), |delivery| async move {
    ///             let body = std::str::from_utf8(&delivery.data).map_err(|e| e.to_string())?;
    ///             println!("got {body}");
    ///             Ok::<(), String>(())
    ///         })
    ///     .await?;
    /// # handle.cancel().await
    /// # }
    /// ```
    pub async fn consume_with<F, Fut, E>(
        &self,
        queue: ShortString,
        consumer_tag: ShortString,
        options: BasicConsumeOptions,
        arguments: FieldTable,
        handler: F,
    ) -> lapin::Result<ConsumerHandle>
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let consumer = self
            .basic_consume(queue, consumer_tag, options, arguments)
            .await?;
        let tag = consumer.tag();
        let stats = Arc::new(ConsumeStats::default());
        let task = tokio::spawn(run_handler(consumer, handler, Arc::clone(&stats)));
        Ok(ConsumerHandle {
            tag,
            channel: self.inner().clone(),
            stats,
            task,
        })
    }
}

async fn run_handler<F, Fut, E>(
    consumer: crate::TracedConsumer,
    handler: F,
    stats: Arc<ConsumeStats>,
) where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    let (mut consumer, chain, queue, no_ack) = consumer.into_parts();
    // Stream items seen while a settlement was pending (see `settle`).
    let mut backlog = VecDeque::new();
    loop {
        let item = match backlog.pop_front() {
            Some(item) => item,
            None => consumer.next().await,
        };
        let Some(item) = item else { break };
        let delivery = match item {
            Ok(delivery) => delivery,
            Err(error) => {
                // Without auto-recovery lapin ends the stream after an
                // error; with it, the stream resumes once recovered.
                tracing::warn!(%error, queue = &*queue, "mindbus-otel: consumer stream error");
                continue;
            }
        };
        bump(&stats.delivered);
        // Settled as unsettled if this task is dropped mid-handler (runtime
        // shut down): every started span ends.
        let mut state = InHand {
            state: Some(chain.start_delivery(&delivery, &queue, false)),
            chain: &chain,
        };
        let acker = delivery.acker.clone();
        let tag = delivery.delivery_tag;
        let cx = state.context();

        // A handler may panic when called or while polled: both are caught.
        // The handler's synchronous part runs in the context too.
        let call = || {
            let _guard = cx.clone().attach();
            handler(delivery)
        };
        let result = match catch_unwind(AssertUnwindSafe(call)) {
            Ok(fut) => AssertUnwindSafe(fut.with_context(cx)).catch_unwind().await,
            Err(panic) => Err(panic),
        };
        let error_text;
        let failure = match &result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                bump(&stats.handler_errors);
                error_text = e.to_string();
                Some(HandlerFailure::Error(&error_text))
            }
            Err(panic) => {
                bump(&stats.panics);
                let text = panic_text(panic.as_ref());
                metrics::counter!("mindbus_otel_handler_panics_total").increment(1);
                tracing::error!(
                    panic = text,
                    queue = &*queue,
                    "mindbus-otel: message handler panicked; message nacked, consumer goes on"
                );
                Some(HandlerFailure::Panic(text))
            }
        };

        // Settled by the handler itself: by tag on the traced channel (its
        // outcome is known), or through lapin's acker (it is not).
        let by_handler = if no_ack {
            None
        } else {
            let claimed = state
                .state
                .as_ref()
                .and_then(|s| chain.settles.claim(tag, s.started()));
            let through_acker = !acker.usable() && !acker.poisoned();
            claimed.or_else(|| {
                through_acker.then(|| (Outcome::SettledElsewhere, std::time::Instant::now()))
            })
        };
        if let Some((outcome, at)) = by_handler {
            if let Some(mut state) = state.state.take() {
                state.mark_ended_at(at);
                let mut settlement = Settlement::new(outcome);
                settlement.failure = failure;
                chain.settle(&mut state, &settlement);
            }
            match outcome {
                Outcome::Acked => bump(&stats.acked),
                Outcome::Nacked { .. } | Outcome::Rejected { .. } => bump(&stats.nacked),
                _ => bump(&stats.settled_by_handler),
            }
            continue;
        }
        let call = std::time::Instant::now();
        let (outcome, res, counter) = if no_ack {
            (Outcome::AutoAck, Ok(true), None)
        } else if failure.is_none() {
            let ack = acker.ack(BasicAckOptions::default());
            let res = settle(ack, &acker, &mut consumer, &mut backlog).await;
            (Outcome::Acked, res, Some(&stats.acked))
        } else {
            let options = BasicNackOptions {
                requeue: false,
                ..BasicNackOptions::default()
            };
            let nack = acker.nack(options);
            let res = settle(nack, &acker, &mut consumer, &mut backlog).await;
            (Outcome::Nacked { requeue: false }, res, Some(&stats.nacked))
        };
        if let Err(error) = &res {
            bump(&stats.settle_errors);
            tracing::warn!(%error, queue = &*queue, "mindbus-otel: settling a delivery failed");
        } else if matches!(res, Ok(false)) && acker.poisoned() {
            // lapin answers `Ok(false)`, without sending anything, when the
            // channel closed while the handler ran: the broker requeues the
            // message. That is a failed settlement too.
            bump(&stats.settle_errors);
            tracing::warn!(
                queue = &*queue,
                "mindbus-otel: delivery not settled, its channel closed; the broker will redeliver it"
            );
        }
        let settlement = Settlement {
            outcome,
            failure,
            error: res.as_ref().err(),
            applied: matches!(res, Ok(true)),
            call_started: (!no_ack).then_some(call),
        };
        if let Some(mut state) = state.state.take() {
            chain.settle(&mut state, &settlement);
        }
        // Counted after the settle hooks: once `acked()` reaches n, the
        // spans and metrics of those n messages are recorded.
        if let (Some(counter), Ok(true)) = (counter, &res) {
            bump(counter);
        }
    }
}

/// A delivery's state until it is settled; dropped unsettled (the consumer
/// task cancelled mid-handler), it runs the settle hooks with
/// [`Outcome::Unsettled`].
struct InHand<'c> {
    state: Option<MessageState>,
    chain: &'c InterceptorChain,
}

impl InHand<'_> {
    fn context(&self) -> Context {
        self.state
            .as_ref()
            .map(|s| s.context().clone())
            .unwrap_or_default()
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            let mut settlement = Settlement::new(Outcome::Unsettled);
            settlement.applied = false;
            self.chain.settle(&mut state, &settlement);
        }
    }
}

/// Awaits an ack or nack while still watching the consumer stream.
///
/// lapin 4.12 can drop an ack that was queued just as its channel died
/// without ever resolving it (its internal RPC skips commands for dead
/// channels), which would stall this consumer forever. Once the stream
/// reports anything (a delivery, the error, its end) and the acker is
/// poisoned, the settlement is given up with lapin's own answer for a dead
/// channel, `Ok(false)` (nothing sent; the broker redelivers the message).
/// Items seen meanwhile are kept, in order, for the loop.
async fn settle(
    settlement: impl Future<Output = lapin::Result<bool>>,
    acker: &Acker,
    consumer: &mut Consumer,
    backlog: &mut VecDeque<Option<lapin::Result<Delivery>>>,
) -> lapin::Result<bool> {
    let mut settlement = pin!(settlement);
    let mut ended = matches!(backlog.back(), Some(None));
    poll_fn(|cx| {
        if let Poll::Ready(res) = settlement.as_mut().poll(cx) {
            return Poll::Ready(res);
        }
        while !ended {
            match Pin::new(&mut *consumer).poll_next(cx) {
                Poll::Ready(item) => {
                    ended = item.is_none();
                    backlog.push_back(item);
                    if acker.poisoned() {
                        return Poll::Ready(Ok(false));
                    }
                }
                Poll::Pending => break,
            }
        }
        if ended && acker.poisoned() {
            return Poll::Ready(Ok(false));
        }
        Poll::Pending
    })
    .await
}
