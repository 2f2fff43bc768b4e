//! The body of a streamed answer: the call core's committed stream, each
//! delta as one `chat.completion.chunk` event, written the moment it
//! arrives. hyper polls this body for the next frame, and it owns the core
//! stream: no task and no channel sit between caller and upstream, so when
//! the connection goes (the client left) hyper drops the body and the
//! upstream request with it, even while the upstream is silent.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::{
    error::error_event,
    response::{ChunkHead, ChunkWriter},
};
use crate::core::CallStream;

pub struct SseBody {
    inner: CallStream,
    writer: ChunkWriter,
    first: bool,
    ended: bool,
}

impl SseBody {
    pub fn new(inner: CallStream, writer: ChunkWriter) -> Self {
        Self { inner, writer, first: true, ended: false }
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.inner.poll_next_unpin(cx)) {
            None => {
                this.ended = true;
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                this.ended = true;
                error_event(this.inner.call_mut(), e, &mut this.writer)
            }
            Some(Ok(delta)) => {
                let call = this.inner.call();
                let head = ChunkHead {
                    id: this.inner.id(),
                    model: call.upstream_model().map(|m| &**m).unwrap_or_default(),
                    first: std::mem::take(&mut this.first),
                };
                let frame = this.writer.delta(&head, &delta);
                if delta.finish.is_some() {
                    this.ended = true;
                    // Lets the upstream body reach its end now, so that its
                    // connection goes back to the pool.
                    let _ = this.inner.poll_next_unpin(cx);
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }
}
