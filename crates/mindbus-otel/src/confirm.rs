//! The publisher-confirm future returned by `TracedChannel::basic_publish`.

use crate::interceptor::InterceptorChain;
use crate::message::{MessageState, PublishResult};
use lapin::Confirmation;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// lapin's [`PublisherConfirm`](lapin::PublisherConfirm), observed.
///
/// It resolves to exactly what lapin's does (`lapin::Result<Confirmation>`),
/// so `channel.basic_publish(...).await?.await?` reads as with lapin. When
/// publisher confirms are on, resolving it runs the publish-result hooks
/// with the broker's ack or nack (a PRODUCER span ends there). Dropping it
/// unawaited leaves the confirm to lapin (`wait_for_confirms` still sees it)
/// and reports the publish as [`PublishResult::Abandoned`].
pub struct PublisherConfirm {
    inner: Option<lapin::PublisherConfirm>,
    pending: Option<(MessageState, Arc<InterceptorChain>)>,
}

impl PublisherConfirm {
    pub(crate) fn new(
        inner: lapin::PublisherConfirm,
        pending: Option<(MessageState, Arc<InterceptorChain>)>,
    ) -> Self {
        PublisherConfirm {
            inner: Some(inner),
            pending,
        }
    }

    /// lapin's confirm. If the publish was still being observed, it is
    /// reported as [`PublishResult::Abandoned`].
    pub fn into_inner(mut self) -> lapin::PublisherConfirm {
        self.abandon();
        // `inner` is only ever taken here, and `self` is consumed.
        self.inner
            .take()
            .unwrap_or_else(|| unreachable!("PublisherConfirm::inner taken twice"))
    }

    fn abandon(&mut self) {
        if let Some((mut state, chain)) = self.pending.take() {
            chain.publish_result(&mut state, &PublishResult::Abandoned);
        }
    }
}

impl Future for PublisherConfirm {
    type Output = lapin::Result<Confirmation>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(lapin::ErrorKind::FutureCompleted.into()));
        };
        let res = match Pin::new(inner).poll(cx) {
            Poll::Ready(res) => res,
            Poll::Pending => return Poll::Pending,
        };
        if let Some((mut state, chain)) = this.pending.take() {
            let result = match &res {
                Ok(confirmation) => PublishResult::Confirmed(confirmation),
                Err(error) => PublishResult::Failed(error),
            };
            chain.publish_result(&mut state, &result);
        }
        Poll::Ready(res)
    }
}

impl Drop for PublisherConfirm {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl fmt::Debug for PublisherConfirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherConfirm")
            .field("observed", &self.pending.is_some())
            .finish()
    }
}
