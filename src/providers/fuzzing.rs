//! Entry points for the fuzz targets (`fuzz/`) and the test that replays
//! their corpus: the SSE splitting and each provider's translator, fed from
//! memory instead of a socket. Not part of the gateway's API.

use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::Stream;

use super::{DeltaStream, ProviderError, anthropic, gemini, openai, sse};
use crate::{chat::Delta, config::ProviderKind};

/// The provider kinds that have a wire format to translate.
pub const KINDS: &[ProviderKind] = &[ProviderKind::Openai, ProviderKind::Anthropic, ProviderKind::Gemini];

/// One SSE event, owned: its type (`message` unless named) and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// The SSE events of a body that arrives as `chunks`, in order, to the end
/// of the body or the first error.
pub fn sse_events(chunks: Vec<Bytes>) -> Vec<Result<SseEvent, ProviderError>> {
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, reqwest::Error>));
    let events =
        futures_util::StreamExt::map(sse::events(body), |e| e.map(|(event, data)| SseEvent { event, data }));
    drain(std::pin::pin!(events))
}

/// Everything the delta stream of a `kind` upstream yields for a body that
/// arrives as `chunks`: the gateway's own stream path, from memory.
/// Gemini's generated tool-call ids get a fixed prefix, so that two replays
/// of one body compare equal.
pub fn translate(kind: ProviderKind, chunks: Vec<Bytes>) -> Vec<Result<Delta, ProviderError>> {
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, reqwest::Error>));
    let mut stream: DeltaStream = match kind {
        ProviderKind::Openai => sse::from_body(body, openai::Translator::default()),
        ProviderKind::Anthropic => sse::from_body(body, anthropic::Translator::default()),
        ProviderKind::Gemini => sse::from_body(body, gemini::Translator::with_id_prefix("call_fuzz".into())),
        ProviderKind::Mock => return Vec::new(),
    };
    drain(stream.as_mut())
}

/// What a `kind` translator makes of `events` followed by the end of the
/// body, stopping where the stream path stops: after the final delta or the
/// first error.
pub fn translate_events(kind: ProviderKind, events: Vec<SseEvent>) -> Vec<Result<Delta, ProviderError>> {
    match kind {
        ProviderKind::Openai => run(openai::Translator::default(), events),
        ProviderKind::Anthropic => run(anthropic::Translator::default(), events),
        ProviderKind::Gemini => run(gemini::Translator::with_id_prefix("call_fuzz".into()), events),
        ProviderKind::Mock => Vec::new(),
    }
}

fn run(mut t: impl sse::Translate, events: Vec<SseEvent>) -> Vec<Result<Delta, ProviderError>> {
    let mut out = Vec::new();
    for event in events {
        match t.event(sse::Event { event: &event.event, data: &event.data }) {
            Ok(None) => {}
            Ok(Some(delta)) => {
                let last = delta.finish.is_some();
                out.push(Ok(delta));
                if last {
                    return out;
                }
            }
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
    match t.eof() {
        Ok(Some(delta)) => out.push(Ok(delta)),
        Ok(None) => {}
        Err(e) => out.push(Err(e)),
    }
    out
}

/// Every item of a stream whose sources are all in memory (so each poll is
/// ready at once; a stream that still says Pending has stalled), up to the
/// first error.
fn drain<T>(
    mut stream: std::pin::Pin<&mut (impl Stream<Item = Result<T, ProviderError>> + ?Sized)>,
) -> Vec<Result<T, ProviderError>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match stream.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(Ok(item))) => out.push(Ok(item)),
            // The stream path stops reading at an error.
            Poll::Ready(Some(Err(e))) => {
                out.push(Err(e));
                return out;
            }
            Poll::Ready(None) => return out,
            Poll::Pending => {
                out.push(Err(ProviderError::Stream("the replay stalled".into())));
                return out;
            }
        }
    }
}
