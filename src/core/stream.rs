//! The committed answer stream: the routed upstream deltas, counted on the
//! call, driven by the front door's reads. No task and no channel sit
//! between caller and upstream, so when the front door drops its response
//! (reset, disconnect) this stream is dropped, and the upstream body with it,
//! at once, even while the upstream is silent. The deadline and the hard stop
//! are watched here too. A front door wraps it to write its own frames.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{FutureExt, Stream, StreamExt, future::BoxFuture};
use tokio::time::Sleep;

use super::{call::Call, error::CallError};
use crate::{chat::Delta, routing::RoutedStream};

pub struct CallStream {
    call: Call,
    upstream: RoutedStream,
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: BoxFuture<'static, ()>,
    /// The id of the answer: the upstream's response id, or the request id.
    id: String,
    first: bool,
    done: bool,
    drained: bool,
}

impl CallStream {
    pub(super) fn new(call: Call, upstream: RoutedStream, shutdown: BoxFuture<'static, ()>) -> Self {
        let deadline = call.sleep_until_deadline().map(Box::pin);
        Self {
            id: call.request_id.clone(),
            call,
            upstream,
            deadline,
            shutdown,
            first: true,
            done: false,
            drained: false,
        }
    }

    pub fn call(&self) -> &Call {
        &self.call
    }

    /// For the front door to record how it reported an error.
    pub fn call_mut(&mut self) -> &mut Call {
        &mut self.call
    }

    /// The answer's id, known once the first delta has been read.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn fail(&mut self, error: CallError) -> Poll<Option<Result<Delta, CallError>>> {
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }
}

/// Deltas, then `None` after the final one; or one error, then `None`.
impl Stream for CallStream {
    type Item = Result<Delta, CallError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            if this.call.is_finished() && !std::mem::replace(&mut this.drained, true) {
                // Lets the upstream body reach its end without waiting, so its
                // connection goes back to the pool.
                let _ = this.upstream.poll_next_unpin(cx);
            }
            return Poll::Ready(None);
        }
        if this.shutdown.poll_unpin(cx).is_ready() {
            return this.fail(CallError::ShuttingDown);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return this.fail(CallError::DeadlineExceeded);
        }
        let mut delta = match this.upstream.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return this.fail(CallError::MidStream(e)),
            Poll::Ready(Some(Ok(delta))) => delta,
        };
        this.call.delta();
        this.call.record_output(&delta.content);
        if std::mem::take(&mut this.first)
            && let Some(id) = &delta.id
        {
            this.id.clone_from(id);
        }
        if let Some(finish) = delta.finish {
            // The usage as the call reports it (estimated when the upstream
            // sent none); its cost is `call().cost_usd()`.
            delta.finish = Some(this.call.finished(finish));
            this.done = true;
        }
        Poll::Ready(Some(Ok(delta)))
    }
}
