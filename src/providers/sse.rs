//! Turns an upstream SSE body into a [`DeltaStream`] through a per-provider
//! translator, driven by the caller's reads: no task, no channel, so dropping
//! the stream drops the upstream body and with it the connection.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::Stream;

use super::{DeltaStream, ProviderError, http::error_chain};
use crate::chat::Delta;

/// A stateful translation of one provider's SSE events into deltas.
pub(crate) trait Translate: Send + Unpin + 'static {
    /// Handles one event. Returns a delta to forward, if the event makes one;
    /// the final delta is the one with `finish` set.
    fn event(&mut self, event: Event) -> Result<Option<Delta>, ProviderError>;

    /// The upstream closed its body. Returns the final delta when the answer
    /// is complete without an explicit end marker, or an error.
    fn eof(&mut self) -> Result<Option<Delta>, ProviderError>;
}

/// The deltas of an SSE response, translated by `translator`.
pub(crate) fn deltas<T: Translate>(response: reqwest::Response, translator: T) -> DeltaStream {
    from_body(response.bytes_stream(), translator)
}

/// The deltas of an SSE body given as a stream of chunks: what [`deltas`]
/// does with a response, and what transcript replays feed directly.
pub(crate) fn from_body<S, T>(body: S, translator: T) -> DeltaStream
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
    T: Translate,
{
    Box::pin(Translated {
        events: Box::pin(EventBound { inner: Box::pin(body), pending: 0, newline: false }.eventsource()),
        translator,
        state: State::Open,
    })
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<BodyError>>> + Send>>;

#[derive(PartialEq)]
enum State {
    Open,
    /// The final delta was forwarded; what is left of the body is drained.
    Finished,
    Closed,
}

struct Translated<T> {
    events: Events,
    translator: T,
    state: State,
}

impl<T: Translate> Stream for Translated<T> {
    type Item = Result<Delta, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Closed => return Poll::Ready(None),
                State::Finished => {
                    // Reading the body to its end (usually the chunked
                    // terminator, already buffered) returns the connection to
                    // the pool; if the upstream lingers, drop it instead.
                    this.state = State::Closed;
                    while let Poll::Ready(Some(Ok(_))) = this.events.as_mut().poll_next(cx) {}
                    return Poll::Ready(None);
                }
                State::Open => {}
            }
            let item = match ready!(this.events.as_mut().poll_next(cx)) {
                Some(Ok(event)) => this.translator.event(event),
                Some(Err(e)) => Err(stream_error(e)),
                None => {
                    this.state = State::Closed;
                    match this.translator.eof() {
                        Ok(Some(delta)) => return Poll::Ready(Some(Ok(delta))),
                        Ok(None) => return Poll::Ready(None),
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
            };
            match item {
                Ok(Some(delta)) => {
                    if delta.finish.is_some() {
                        this.state = State::Finished;
                    }
                    return Poll::Ready(Some(Ok(delta)));
                }
                Ok(None) => continue,
                Err(e) => {
                    this.state = State::Closed;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

fn stream_error(e: EventStreamError<BodyError>) -> ProviderError {
    match e {
        EventStreamError::Transport(BodyError::Transport(e)) => {
            ProviderError::Stream(error_chain(&e.without_url()))
        }
        EventStreamError::Transport(BodyError::TooLarge) => {
            ProviderError::Protocol(format!("an SSE event over {MAX_EVENT} bytes"))
        }
        EventStreamError::Utf8(e) => ProviderError::Protocol(format!("invalid UTF-8: {e}")),
        EventStreamError::Parser(e) => ProviderError::Protocol(format!("invalid SSE: {e}")),
    }
}

/// Parses an event's JSON payload, naming the event on failure.
pub(crate) fn json<'a, D: serde::Deserialize<'a>>(data: &'a str) -> Result<D, ProviderError> {
    serde_json::from_str(data).map_err(|e| {
        let mut shown: String = data.chars().take(120).collect();
        if shown.len() < data.len() {
            shown.push('…');
        }
        ProviderError::Protocol(format!("{e} in event data {shown:?}"))
    })
}

/// Largest SSE event accepted. eventsource-stream buffers an event until its
/// blank line, so an upstream that never sends one must be cut off.
const MAX_EVENT: usize = 1 << 20;

#[derive(Debug)]
pub(crate) enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Transport(e) => e.fmt(f),
            BodyError::TooLarge => write!(f, "event over {MAX_EVENT} bytes"),
        }
    }
}

/// Counts the bytes of the event being received (since the last blank
/// line) and fails the body once one passes [`MAX_EVENT`].
struct EventBound<S> {
    inner: S,
    pending: usize,
    newline: bool,
}

impl<S> Stream for EventBound<S>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Unpin,
{
    type Item = Result<bytes::Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let chunk = match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return Poll::Ready(Some(Err(BodyError::Transport(e)))),
            None => return Poll::Ready(None),
        };
        let (mut pending, mut newline) = (self.pending, self.newline);
        for &b in chunk.iter() {
            match b {
                b'\n' if newline => pending = 0,
                b'\n' => newline = true,
                b'\r' => {}
                _ => {
                    newline = false;
                    pending += 1;
                }
            }
        }
        self.pending = pending;
        self.newline = newline;
        if pending > MAX_EVENT {
            return Poll::Ready(Some(Err(BodyError::TooLarge)));
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn an_event_without_end_is_cut_off() {
        let chunks: Vec<Result<bytes::Bytes, reqwest::Error>> = vec![
            Ok(bytes::Bytes::from_static(b"data: a\r\n\r\n")),
            Ok(bytes::Bytes::from(vec![b'x'; MAX_EVENT / 2])),
            Ok(bytes::Bytes::from(vec![b'\n'])),
            Ok(bytes::Bytes::from(vec![b'x'; MAX_EVENT / 2 + 2])),
        ];
        let mut s = EventBound { inner: futures_util::stream::iter(chunks), pending: 0, newline: false };
        for _ in 0..3 {
            assert!(s.next().await.unwrap().is_ok());
        }
        // One newline alone does not end an event: the two halves add up.
        assert!(matches!(s.next().await, Some(Err(BodyError::TooLarge))));
    }
}
