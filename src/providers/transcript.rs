//! Replays a recorded upstream SSE body through a provider's real translator,
//! for the golden transcript tests and fuzzing: the same SSE splitting and
//! per-provider state machine the stream path runs, fed from memory instead
//! of a socket. Not part of the gateway's API.

use std::{
    fmt::Write,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;

use super::{DeltaStream, ProviderError, anthropic, gemini, openai, sse};
use crate::{chat::Delta, config::ProviderKind};

/// The prefix of the tool-call ids a Gemini replay generates, fixed so that
/// a transcript's output is the same on every run.
pub const GEMINI_ID_PREFIX: &str = "call_gen";

/// Feeds `chunks`, in order, as the body of a `kind` upstream's answer and
/// returns every item the provider's delta stream yields, to its end.
pub fn replay(kind: ProviderKind, chunks: Vec<Bytes>) -> Vec<Result<Delta, ProviderError>> {
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, reqwest::Error>));
    let mut stream: DeltaStream = match kind {
        ProviderKind::Openai => sse::from_body(body, openai::Translator::default()),
        ProviderKind::Anthropic => sse::from_body(body, anthropic::Translator::default()),
        ProviderKind::Gemini => {
            sse::from_body(body, gemini::Translator::with_id_prefix(GEMINI_ID_PREFIX.into()))
        }
        ProviderKind::Mock => return vec![Err(ProviderError::Setup("mock has no wire format".into()))],
    };
    // Every source is in memory, so each poll is ready at once.
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match stream.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(item)) => out.push(item),
            Poll::Ready(None) => return out,
            Poll::Pending => {
                out.push(Err(ProviderError::Stream("the replay stalled".into())));
                return out;
            }
        }
    }
}

/// The items of a replay as text, one line each: a delta's non-empty fields
/// (strings quoted and escaped as Rust does), or an error with its label.
pub fn render(items: &[Result<Delta, ProviderError>]) -> String {
    let mut out = String::new();
    for item in items {
        match item {
            Ok(d) => out.push_str(&delta_line(d)),
            Err(e) => {
                let _ = write!(out, "error[{}] {e}", e.label());
            }
        }
        out.push('\n');
    }
    out
}

fn delta_line(d: &Delta) -> String {
    let mut parts = Vec::new();
    if let Some(id) = &d.id {
        parts.push(format!("id={id:?}"));
    }
    if let Some(model) = &d.model {
        parts.push(format!("model={model:?}"));
    }
    if !d.reasoning.is_empty() {
        parts.push(format!("reasoning={:?}", d.reasoning));
    }
    if !d.content.is_empty() {
        parts.push(format!("content={:?}", d.content));
    }
    for t in &d.tool_calls {
        let mut call = format!("tool[{}]", t.index);
        if !t.id.is_empty() {
            let _ = write!(call, " id={:?}", t.id);
        }
        if !t.name.is_empty() {
            let _ = write!(call, " name={:?}", t.name);
        }
        let _ = write!(call, " args={:?}", t.arguments_delta);
        parts.push(call);
    }
    if let Some(f) = &d.finish {
        let u = &f.usage;
        parts.push(format!(
            "finish={} input={} output={} cached={} reasoning_tokens={}",
            f.reason.map(|r| r.as_str()).unwrap_or("none"),
            u.input_tokens,
            u.output_tokens,
            u.cached_input_tokens,
            u.reasoning_tokens
        ));
    }
    if parts.is_empty() {
        return "(empty)".into();
    }
    parts.join(" ")
}
