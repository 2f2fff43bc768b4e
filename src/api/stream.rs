//! The response stream of `StreamCompletion`: the routed upstream deltas as
//! proto messages, driven by tonic's reads. No task and no channel sit between
//! caller and upstream, so when the caller goes away (reset, disconnect) this
//! stream is dropped, and the upstream body with it, at once, even while the
//! upstream is silent. The deadline and shutdown are watched here too.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{FutureExt, Stream, StreamExt, future::BoxFuture};
use tokio::time::Sleep;
use tonic::Status;

use super::{call::Call, convert, error::CallError, pb};
use crate::routing::RoutedStream;

pub struct ResponseStream {
    call: Call,
    upstream: RoutedStream,
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: BoxFuture<'static, ()>,
    /// The id every message carries: the upstream's response id, or ours.
    id: String,
    first: bool,
    done: bool,
    drained: bool,
}

impl ResponseStream {
    pub fn new(call: Call, upstream: RoutedStream, shutdown: BoxFuture<'static, ()>) -> Self {
        let deadline = call.sleep_until_deadline().map(Box::pin);
        Self {
            id: call.request_id.to_str().unwrap_or_default().to_owned(),
            call,
            upstream,
            deadline,
            shutdown,
            first: true,
            done: false,
            drained: false,
        }
    }

    fn fail(&mut self, error: CallError) -> Poll<Option<Result<pb::StreamCompletionResponse, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(self.call.status(error))))
    }
}

impl Stream for ResponseStream {
    type Item = Result<pb::StreamCompletionResponse, Status>;

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
        let delta = match this.upstream.poll_next_unpin(cx) {
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
        if this.first
            && let Some(id) = &delta.id
        {
            this.id.clone_from(id);
        }
        let finish = delta.finish;
        let mut message = convert::stream_message(delta, this.id.clone());
        if std::mem::take(&mut this.first) {
            message.provider = this.call.provider().map(|p| p.to_string()).unwrap_or_default();
            message.model = this.call.upstream_model().map(|m| m.to_string()).unwrap_or_default();
        }
        if let Some(finish) = finish {
            this.call.finished(finish);
            this.done = true;
        }
        Poll::Ready(Some(Ok(message)))
    }
}
