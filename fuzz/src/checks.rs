//! What each fuzz target checks on one input. Each function takes the raw
//! input and panics on a violated property, so libFuzzer reports it, and so
//! does `cargo test` when it replays `fuzz/corpus/` (tests/it/fuzz_corpus.rs
//! includes this file). Only the gateway's public API and crates the
//! gateway already depends on are used here.

use std::time::Duration;

use bytes::Bytes;
use llm_gateway::{
    chat::Delta,
    config::{self, ProviderKind},
    core::Keys,
    providers::{
        ProviderError,
        fuzzing::{self, SseEvent},
    },
};

/// The input's first byte seeds how the rest is cut into chunks, so that
/// chunk boundaries fall everywhere (inside a `\r\n`, a UTF-8 sequence, a
/// JSON string) while the whole body stays the same.
fn chunked(data: &[u8]) -> (Bytes, Vec<Bytes>) {
    let Some((&seed, body)) = data.split_first() else {
        return (Bytes::new(), Vec::new());
    };
    let body = Bytes::copy_from_slice(body);
    let mut state = u32::from(seed) | 0x100;
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < body.len() {
        // xorshift: cheap, deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = 1 + (state as usize % 24);
        let end = (at + len).min(body.len());
        chunks.push(body.slice(at..end));
        at = end;
    }
    (body, chunks)
}

/// The items up to the first error, rendered, and whether an error came.
fn split<T: std::fmt::Debug>(items: &[Result<T, ProviderError>]) -> (Vec<String>, Option<&'static str>) {
    let mut ok = Vec::new();
    for item in items {
        match item {
            Ok(v) => ok.push(format!("{v:?}")),
            Err(e) => return (ok, Some(e.label())),
        }
    }
    (ok, None)
}

/// The same body in one chunk and in many gives the same items. On an error
/// (invalid UTF-8 is caught per chunk), the one that saw it sooner has fewer
/// items, the same up to there, and the same kind of error.
fn same_whatever_the_chunks<T: std::fmt::Debug>(
    whole: &[Result<T, ProviderError>],
    chunked: &[Result<T, ProviderError>],
) {
    let (a, a_err) = split(whole);
    let (b, b_err) = split(chunked);
    assert_eq!(a_err, b_err, "one chunk: {whole:?}\nmany chunks: {chunked:?}");
    if a_err.is_none() {
        assert_eq!(a, b, "the chunking changed the items");
    } else {
        let n = a.len().min(b.len());
        assert_eq!(a[..n], b[..n], "the chunking changed the items before the error");
    }
    assert!(whole.iter().skip_while(|i| i.is_ok()).count() <= 1, "items after an error: {whole:?}");
}

/// SSE event splitting: chunk boundaries change nothing, and no event's data
/// is larger than the body (its type may be the default, `message`).
pub fn sse_events(data: &[u8]) {
    let (body, chunks) = chunked(data);
    let whole = fuzzing::sse_events(vec![body.clone()]);
    let many = fuzzing::sse_events(chunks);
    same_whatever_the_chunks(&whole, &many);
    for event in whole.iter().flatten() {
        assert!(event.data.len() <= body.len(), "an event larger than its body");
    }
}

fn text_size(d: &Delta) -> usize {
    d.content.len()
        + d.id.as_ref().map_or(0, String::len)
        + d.model.as_ref().map_or(0, String::len)
        + d.tool_calls.iter().map(|t| t.id.len() + t.name.len() + t.arguments_delta.len()).sum::<usize>()
}

/// What every delta stream owes its caller, whatever the upstream sent: it
/// never ends silently (its last item is the final delta or an error), the
/// final delta comes once and last, nothing follows an error, and the text
/// it yields is no larger than what the upstream sent (`input` bytes).
fn a_well_formed_answer(items: &[Result<Delta, ProviderError>], input: usize) {
    match items.last() {
        None => panic!("the stream ended with no final delta and no error"),
        Some(Ok(d)) => assert!(d.finish.is_some(), "the stream ended without its final delta: {items:?}"),
        Some(Err(_)) => {}
    }
    let deltas: Vec<&Delta> = items.iter().flatten().collect();
    let errors = items.len() - deltas.len();
    assert!(errors <= 1, "more than one error: {items:?}");
    let finals = deltas.iter().filter(|d| d.finish.is_some()).count();
    assert!(finals <= 1, "{finals} final deltas: {items:?}");
    if finals == 1 {
        assert_eq!(errors, 0, "an error after the final delta: {items:?}");
    }
    let size: usize = deltas.iter().map(|d| text_size(d)).sum();
    assert!(size <= input, "{size} bytes of text out of {input} bytes in");
}

/// A provider's stream path on an arbitrary body.
pub fn translate(kind: ProviderKind, data: &[u8]) {
    let (body, chunks) = chunked(data);
    let whole = fuzzing::translate(kind, vec![body.clone()]);
    let many = fuzzing::translate(kind, chunks);
    same_whatever_the_chunks(&whole, &many);
    a_well_formed_answer(&whole, body.len());
    a_well_formed_answer(&many, body.len());
}

/// Reads an input as a sequence of choices; past its end every choice is 0.
struct Choices<'a> {
    data: &'a [u8],
}

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[usize::from(self.byte()) % from.len()]
    }

    fn raw(&mut self) -> String {
        let n = usize::from(self.byte() % 16).min(self.data.len());
        let (s, rest) = self.data.split_at(n);
        self.data = rest;
        String::from_utf8_lossy(s).into_owned()
    }
}

const EVENT_NAMES: &[&str] = &[
    "message",
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
    "",
];

/// Keys of both wire formats, so that generated JSON reaches past the
/// first `match`.
const KEYS: &[&str] = &[
    "id",
    "model",
    "choices",
    "delta",
    "content",
    "tool_calls",
    "index",
    "function",
    "name",
    "arguments",
    "finish_reason",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "type",
    "code",
    "message",
    "content_block",
    "text",
    "partial_json",
    "stop_reason",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "reasoning_content",
    "reasoning",
    "thinking",
];

const STRINGS: &[&str] = &[
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
    "text",
    "text_delta",
    "tool_use",
    "input_json_delta",
    "thinking_delta",
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "end_turn",
    "max_tokens",
    "refusal",
    "[DONE]",
    "",
    "é",
    "{\"a\":",
];

/// Gemini's keys and values: its stream has no event names and no
/// `[DONE]`, and shares almost no key with the other two.
const GEMINI_KEYS: &[&str] = &[
    "candidates",
    "content",
    "parts",
    "role",
    "text",
    "thought",
    "functionCall",
    "name",
    "args",
    "finishReason",
    "index",
    "usageMetadata",
    "promptTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "totalTokenCount",
    "promptFeedback",
    "blockReason",
    "modelVersion",
    "responseId",
    "error",
    "code",
    "message",
    "status",
];

const GEMINI_STRINGS: &[&str] = &[
    "model",
    "user",
    "STOP",
    "MAX_TOKENS",
    "SAFETY",
    "RECITATION",
    "LANGUAGE",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "MALFORMED_FUNCTION_CALL",
    "FINISH_REASON_UNSPECIFIED",
    "OTHER",
    "UNEXPECTED_TOOL_CALL",
    "RESOURCE_EXHAUSTED",
    "",
    "é",
    "{\"a\":",
];

/// The words a generated JSON value is made of.
struct Words {
    keys: &'static [&'static str],
    strings: &'static [&'static str],
}

fn json(c: &mut Choices<'_>, words: &Words, depth: u32) -> serde_json::Value {
    use serde_json::Value;
    let kind = if depth >= 5 { c.byte() % 5 } else { c.byte() % 8 };
    match kind {
        0 => Value::Null,
        1 => Value::Bool(c.byte() & 1 == 1),
        2 => {
            let n: &[i64] = &[0, 1, 2, -1, 3, 1 << 31, u32::MAX as i64, u32::MAX as i64 + 1, i64::MAX];
            Value::from(n[usize::from(c.byte()) % n.len()])
        }
        3 => Value::from(c.pick(words.strings)),
        4 => Value::from(c.raw()),
        5 => Value::Array((0..c.byte() % 4).map(|_| json(c, words, depth + 1)).collect()),
        _ => {
            let mut map = serde_json::Map::new();
            for _ in 0..c.byte() % 6 {
                let key = if c.byte().is_multiple_of(8) { c.raw() } else { c.pick(words.keys).to_owned() };
                map.insert(key, json(c, words, depth + 1));
            }
            Value::Object(map)
        }
    }
}

/// A provider's translator on an arbitrary sequence of events whose data
/// is mostly JSON shaped like its wire format.
pub fn translate_events(kind: ProviderKind, data: &[u8]) {
    let words = match kind {
        ProviderKind::Gemini => Words { keys: GEMINI_KEYS, strings: GEMINI_STRINGS },
        _ => Words { keys: KEYS, strings: STRINGS },
    };
    let mut c = Choices { data };
    let mut events = Vec::new();
    let mut input = 0;
    while !c.data.is_empty() && events.len() < 64 {
        let event = c.pick(EVENT_NAMES).to_owned();
        let data = match c.byte() % 8 {
            0 => "[DONE]".to_owned(),
            1 => c.raw(),
            _ => json(&mut c, &words, 0).to_string(),
        };
        input += data.len();
        events.push(SseEvent { event, data });
    }
    let items = fuzzing::translate_events(kind, events);
    a_well_formed_answer(&items, input);
}

/// The config loader: any text gives a config or an error (never a panic or
/// a hang), the error can be shown, and a config it accepts starts: its
/// keys parse, and its deadlines hold together.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match config::parse(text, Some("fuzz.yaml")) {
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("config fuzz.yaml"), "{shown}");
            if let Some(line) = e.line {
                // YAML ends a line at \r\n, \n or a lone \r.
                let lines = text.replace("\r\n", "\n").matches(['\n', '\r']).count() + 1;
                assert!(line >= 1 && line <= lines, "line {line} of {lines}: {shown}");
            }
        }
        Ok(c) => {
            if let Err(e) = Keys::new(&c.api_keys) {
                panic!("the loader accepted a key start-up refuses: {e}");
            }
            assert!(!c.server.max_timeout.is_zero());
            assert!(c.server.default_timeout <= c.server.max_timeout);
        }
    }
}

/// What `grpc-timeout` means, written out from the gRPC-over-HTTP/2 spec
/// rather than shared with the parser: 1 to 8 ASCII digits and a unit.
fn reference_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-timeout` parser agrees with the spec on every header value.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = tonic::metadata::AsciiMetadataValue::try_from(data) else { return };
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert("grpc-timeout", value);
    let got = llm_gateway::api::grpc_timeout(&metadata);
    // A value that is not visible ASCII never reaches the parser as text.
    let want = if data.iter().all(|b| (0x20..0x7f).contains(b)) { reference_timeout(data) } else { None };
    assert_eq!(got, want, "grpc-timeout {:?}", String::from_utf8_lossy(data));
}
