//! [`TracedChannel`]: a lapin [`Channel`] whose publishes and deliveries go
//! through the interceptor chain.

use crate::confirm::PublisherConfirm;
use crate::delivery::{TracedConsumer, TracedDelivery, TracedGetMessage};
use crate::interceptor::{ChainError, Interceptor, InterceptorChain};
use crate::message::{MessageState, Outcome, PublishResult};
use crate::propagation::TraceContext;
use crate::spans::MessagingSpans;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicRejectOptions,
};
use lapin::types::{DeliveryTag, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

/// A lapin [`Channel`] with telemetry.
///
/// `basic_publish`, `basic_consume` and `basic_get` keep lapin's names and
/// argument order; every other lapin method is reached through `Deref`
/// (`traced.queue_declare(...)`, `traced.basic_qos(...)`, ...). Cloning is
/// cheap and shares the chain. See the [crate docs](crate) for the model.
#[derive(Clone)]
pub struct TracedChannel {
    inner: Channel,
    chain: Arc<InterceptorChain>,
}

impl TracedChannel {
    /// Wraps `channel` with the standard chain: W3C trace-context
    /// propagation ([`TraceContext`]) and PRODUCER/CONSUMER spans through
    /// the global tracer provider ([`MessagingSpans`]).
    pub fn new(channel: Channel) -> Self {
        TracedChannel::builder(channel)
            .with(TraceContext::default())
            .with(MessagingSpans::default())
            .build()
    }

    /// Starts configuring the chain for `channel`. An empty builder is a
    /// plain pass-through.
    pub fn builder(channel: Channel) -> TracedChannelBuilder {
        TracedChannelBuilder {
            channel,
            interceptors: Vec::new(),
            agent: None,
        }
    }

    /// The wrapped lapin channel.
    pub fn inner(&self) -> &Channel {
        &self.inner
    }

    /// Unwraps the lapin channel.
    pub fn into_inner(self) -> Channel {
        self.inner
    }

    /// This process's agent identity, as set on the builder.
    pub fn agent(&self) -> Option<&str> {
        self.chain.agent().map(|a| &**a)
    }

    /// Publishes a message, as [`Channel::basic_publish`].
    ///
    /// The publish hooks run first (they may add headers; the caller's
    /// headers and properties are kept), then lapin publishes. lapin's
    /// result comes back unchanged: telemetry never turns a success into an
    /// error or the reverse. The returned [`PublisherConfirm`] resolves to
    /// lapin's [`Confirmation`](lapin::Confirmation).
    pub async fn basic_publish(
        &self,
        exchange: ShortString,
        routing_key: ShortString,
        options: BasicPublishOptions,
        payload: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<PublisherConfirm> {
        if self.chain.is_empty() {
            let confirm = self
                .inner
                .basic_publish(exchange, routing_key, options, payload, properties)
                .await?;
            return Ok(PublisherConfirm::new(confirm, None));
        }
        let (properties, state) = self.chain.start_publish(
            exchange.as_str(),
            routing_key.as_str(),
            options,
            payload,
            properties,
        );
        let confirms = self.inner.status().confirm();
        // Reports `Abandoned` if this future is dropped mid-publish.
        let mut pending = PendingPublish {
            state: Some(state),
            chain: &self.chain,
        };
        let res = self
            .inner
            .basic_publish(exchange, routing_key, options, payload, properties)
            .await;
        match (res, pending.state.take()) {
            (Ok(confirm), Some(state)) if confirms => Ok(PublisherConfirm::new(
                confirm,
                Some((state, Arc::clone(&self.chain))),
            )),
            (Ok(confirm), Some(mut state)) => {
                self.chain.publish_result(&mut state, &PublishResult::Sent);
                Ok(PublisherConfirm::new(confirm, None))
            }
            (Ok(confirm), None) => Ok(PublisherConfirm::new(confirm, None)),
            (Err(error), Some(mut state)) => {
                self.chain
                    .publish_result(&mut state, &PublishResult::Failed(&error));
                Err(error)
            }
            (Err(error), None) => Err(error),
        }
    }

    /// Starts a consumer, as [`Channel::basic_consume`]: a `Stream` of
    /// [`TracedDelivery`]. For a handler that is acked for you, see
    /// [`TracedChannel::consume_with`].
    pub async fn basic_consume(
        &self,
        queue: ShortString,
        consumer_tag: ShortString,
        options: BasicConsumeOptions,
        arguments: FieldTable,
    ) -> lapin::Result<TracedConsumer> {
        let queue_name: Arc<str> = Arc::from(queue.as_str());
        let no_ack = options.no_ack;
        let consumer = self
            .inner
            .basic_consume(queue, consumer_tag, options, arguments)
            .await?;
        Ok(TracedConsumer::new(
            consumer,
            Arc::clone(&self.chain),
            queue_name,
            no_ack,
        ))
    }

    /// Acknowledges by delivery tag, as [`Channel::basic_ack`]. The
    /// deliveries it settles (that one, or with `multiple: true` every
    /// unsettled one up to it; tag 0 with `multiple`: all) end as acked
    /// when next seen (see [`TracedDelivery`]); in a
    /// [`consume_with`](Self::consume_with) handler, the plugin then does
    /// not settle the message again.
    pub async fn basic_ack(
        &self,
        delivery_tag: DeliveryTag,
        options: BasicAckOptions,
    ) -> lapin::Result<()> {
        let res = self.inner.basic_ack(delivery_tag, options).await;
        self.settled(delivery_tag, options.multiple, Outcome::Acked, &res);
        res
    }

    /// Negatively acknowledges by delivery tag, as [`Channel::basic_nack`]
    /// (see [`basic_ack`](Self::basic_ack) for the deliveries it ends).
    pub async fn basic_nack(
        &self,
        delivery_tag: DeliveryTag,
        options: BasicNackOptions,
    ) -> lapin::Result<()> {
        let res = self.inner.basic_nack(delivery_tag, options).await;
        let outcome = Outcome::Nacked {
            requeue: options.requeue,
        };
        self.settled(delivery_tag, options.multiple, outcome, &res);
        res
    }

    /// Rejects by delivery tag, as [`Channel::basic_reject`] (see
    /// [`basic_ack`](Self::basic_ack) for the delivery it ends).
    pub async fn basic_reject(
        &self,
        delivery_tag: DeliveryTag,
        options: BasicRejectOptions,
    ) -> lapin::Result<()> {
        let res = self.inner.basic_reject(delivery_tag, options).await;
        let outcome = Outcome::Rejected {
            requeue: options.requeue,
        };
        self.settled(delivery_tag, false, outcome, &res);
        res
    }

    fn settled(&self, tag: DeliveryTag, multiple: bool, outcome: Outcome, res: &lapin::Result<()>) {
        if res.is_err() {
            return;
        }
        let (lo, hi) = match (multiple, tag) {
            (true, 0) => (0, u64::MAX),
            (true, _) => (0, tag),
            (false, _) => (tag, tag),
        };
        self.chain.settles.record(lo, hi, outcome, Instant::now());
    }

    /// Fetches one message, as [`Channel::basic_get`].
    pub async fn basic_get(
        &self,
        queue: ShortString,
        options: BasicGetOptions,
    ) -> lapin::Result<Option<TracedGetMessage>> {
        let queue_name: Arc<str> = Arc::from(queue.as_str());
        let no_ack = options.no_ack;
        let call = Instant::now();
        let msg = match self.inner.basic_get(queue, options).await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                self.chain.empty_pull(&queue_name, call, None);
                return Ok(None);
            }
            Err(e) => {
                self.chain.empty_pull(&queue_name, call, Some(&e));
                return Err(e);
            }
        };
        let delivery = TracedDelivery::new(
            msg.delivery,
            Arc::clone(&self.chain),
            &queue_name,
            no_ack,
            Some(call),
        );
        Ok(Some(TracedGetMessage {
            delivery,
            message_count: msg.message_count,
        }))
    }
}

struct PendingPublish<'c> {
    state: Option<MessageState>,
    chain: &'c InterceptorChain,
}

impl Drop for PendingPublish<'_> {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            self.chain
                .publish_result(&mut state, &PublishResult::Abandoned);
        }
    }
}

impl Deref for TracedChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.inner
    }
}

impl AsRef<Channel> for TracedChannel {
    fn as_ref(&self) -> &Channel {
        &self.inner
    }
}

impl From<Channel> for TracedChannel {
    /// Same as [`TracedChannel::new`]: the standard chain.
    fn from(channel: Channel) -> Self {
        TracedChannel::new(channel)
    }
}

impl From<TracedChannel> for Channel {
    fn from(traced: TracedChannel) -> Self {
        traced.inner
    }
}

impl fmt::Debug for TracedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedChannel")
            .field("channel", &self.inner.id())
            .field("chain", &self.chain)
            .finish()
    }
}

/// Configures a [`TracedChannel`]'s chain.
///
/// Interceptors are listed nearest-the-wire first (see
/// [the order rules](crate::interceptor#order)):
/// ```no_run
/// # async fn f(channel: lapin::Channel) {
/// use mindbus_otel::{TracedChannel, TraceContext};
/// let traced = TracedChannel::builder(channel)
///     .agent("agent.writer.001")
///     .with(TraceContext::default())
///     .build();
/// # }
/// ```
#[must_use]
pub struct TracedChannelBuilder {
    channel: Channel,
    interceptors: Vec<Arc<dyn Interceptor>>,
    agent: Option<Arc<str>>,
}

impl TracedChannelBuilder {
    /// This process's agent identity (e.g. `agent.writer.001`), shown to
    /// interceptors as [`MessageState::agent`].
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(Arc::from(agent.into()));
        self
    }

    /// Appends an interceptor to the chain.
    pub fn with(mut self, interceptor: impl Interceptor) -> Self {
        self.interceptors.push(Arc::new(interceptor));
        self
    }

    /// Appends an interceptor that is shared (e.g. by several channels).
    pub fn with_shared(mut self, interceptor: Arc<dyn Interceptor>) -> Self {
        self.interceptors.push(interceptor);
        self
    }

    /// Builds the channel.
    ///
    /// # Panics
    /// When the chain holds one of the built-in interceptors
    /// ([`MessagingSpans`], [`AgentMetrics`](crate::AgentMetrics),
    /// [`TaskMetrics`](crate::TaskMetrics)) twice: their per-message state
    /// would overwrite each other's, recording wrong span times and
    /// outcomes. A configuration mistake, found when the channel is built,
    /// never while messages flow; [`try_build`](Self::try_build) returns it
    /// as an error instead.
    #[allow(clippy::panic)]
    pub fn build(self) -> TracedChannel {
        match self.try_build() {
            Ok(channel) => channel,
            Err(e) => panic!("{e}"),
        }
    }

    /// Builds the channel, or says why its chain is unsound.
    pub fn try_build(self) -> Result<TracedChannel, ChainError> {
        InterceptorChain::check(&self.interceptors)?;
        Ok(TracedChannel {
            inner: self.channel,
            chain: Arc::new(InterceptorChain::new(self.interceptors, self.agent)),
        })
    }
}

impl fmt::Debug for TracedChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TracedChannelBuilder")
            .field("interceptors", &self.interceptors.len())
            .field("agent", &self.agent)
            .finish()
    }
}
