//! The response stream of `StreamCompletion`: the call core's committed
//! stream, each delta as a proto message and an error as the stream's final
//! status. It is polled by tonic's reads and owns the core stream, so the
//! upstream goes away with it (see `core/stream.rs`).

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures_util::{Stream, StreamExt};
use tonic::Status;

use super::{convert, error, pb};
use crate::core::CallStream;

pub struct ResponseStream {
    inner: CallStream,
    first: bool,
}

impl ResponseStream {
    pub fn new(inner: CallStream) -> Self {
        Self { inner, first: true }
    }
}

impl Stream for ResponseStream {
    type Item = Result<pb::StreamCompletionResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let delta = match ready!(this.inner.poll_next_unpin(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(error::call_status(this.inner.call_mut(), e)))),
            Some(Ok(delta)) => delta,
        };
        let mut message = convert::stream_message(delta, this.inner.id().to_owned());
        if let Some(usage) = &mut message.usage {
            usage.cost_usd = this.inner.call().cost_usd();
        }
        if std::mem::take(&mut this.first) {
            let call = this.inner.call();
            message.provider = call.provider().map(|p| p.to_string()).unwrap_or_default();
            message.model = call.upstream_model().map(|m| m.to_string()).unwrap_or_default();
        }
        Poll::Ready(Some(Ok(message)))
    }
}
