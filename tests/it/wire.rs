//! Upstream wire formats as the vendors send them (CONTRACT.md section 4):
//! OpenAI `chat.completion.chunk` SSE, Anthropic Messages SSE events and
//! Gemini `GenerateContentResponse` SSE events, as text the fake upstream
//! sends byte for byte.

use serde_json::{Value, json};

pub(crate) mod openai {
    use super::*;

    pub(crate) const DONE: &str = "data: [DONE]\n\n";

    pub(crate) fn data(v: &Value) -> String {
        format!("data: {v}\n\n")
    }

    fn chunk(id: &str, model: &str, delta: Value, finish: Value) -> Value {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// The first chunk: the role, and empty content.
    pub(crate) fn role(id: &str, model: &str) -> String {
        data(&chunk(id, model, json!({"role": "assistant", "content": ""}), Value::Null))
    }

    pub(crate) fn content(id: &str, model: &str, text: &str) -> String {
        data(&chunk(id, model, json!({"content": text}), Value::Null))
    }

    pub(crate) fn finish(id: &str, model: &str, reason: &str) -> String {
        data(&chunk(id, model, json!({}), json!(reason)))
    }

    /// The `include_usage` chunk: empty choices, usage set.
    pub(crate) fn usage(id: &str, model: &str, prompt: u32, completion: u32) -> String {
        data(&json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }))
    }

    /// A whole streamed answer: role, one chunk per piece, finish, usage, `[DONE]`.
    pub(crate) fn answer(
        id: &str,
        model: &str,
        pieces: &[&str],
        reason: &str,
        prompt: u32,
        completion: u32,
    ) -> Vec<String> {
        let mut out = vec![role(id, model)];
        out.extend(pieces.iter().map(|p| content(id, model, p)));
        out.push(finish(id, model, reason));
        out.push(usage(id, model, prompt, completion));
        out.push(DONE.to_owned());
        out
    }
}

pub(crate) mod anthropic {
    use super::*;

    pub(crate) fn event(name: &str, data: &Value) -> String {
        format!("event: {name}\ndata: {data}\n\n")
    }

    pub(crate) fn message_start(id: &str, model: &str, input_tokens: u32) -> String {
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            }}),
        )
    }

    pub(crate) fn block_start(index: u32) -> String {
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "text", "text": ""}}),
        )
    }

    pub(crate) fn text(index: u32, text: &str) -> String {
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
        )
    }

    pub(crate) fn block_stop(index: u32) -> String {
        event("content_block_stop", &json!({"type": "content_block_stop", "index": index}))
    }

    pub(crate) fn ping() -> String {
        event("ping", &json!({"type": "ping"}))
    }

    pub(crate) fn message_delta(stop_reason: &str, output_tokens: u32) -> String {
        event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                    "usage": {"output_tokens": output_tokens}}),
        )
    }

    pub(crate) fn message_stop() -> String {
        event("message_stop", &json!({"type": "message_stop"}))
    }

    pub(crate) fn error(kind: &str, message: &str) -> String {
        event("error", &json!({"type": "error", "error": {"type": kind, "message": message}}))
    }

    /// A whole streamed answer: start, one text block (with a ping), the
    /// stop reason and output usage, stop.
    pub(crate) fn answer(
        id: &str,
        model: &str,
        pieces: &[&str],
        stop_reason: &str,
        input_tokens: u32,
        output_tokens: u32,
    ) -> Vec<String> {
        let mut out = vec![message_start(id, model, input_tokens), block_start(0), ping()];
        out.extend(pieces.iter().map(|p| text(0, p)));
        out.push(block_stop(0));
        out.push(message_delta(stop_reason, output_tokens));
        out.push(message_stop());
        out
    }
}

pub(crate) mod gemini {
    //! Gemini `streamGenerateContent?alt=sse`: `data: {GenerateContentResponse}`
    //! events separated by CRLF blank lines, no end marker.
    use super::*;

    pub(crate) fn event(v: &Value) -> String {
        format!("data: {v}\r\n\r\n")
    }

    fn response(id: &str, model: &str, candidate: Value, usage: Option<Value>) -> String {
        let mut v = json!({"candidates": [candidate], "modelVersion": model, "responseId": id});
        if let Some(u) = usage {
            v["usageMetadata"] = u;
        }
        event(&v)
    }

    pub(crate) fn usage(prompt: u32, candidates: u32, thoughts: u32) -> Value {
        json!({"promptTokenCount": prompt, "candidatesTokenCount": candidates, "thoughtsTokenCount": thoughts,
               "totalTokenCount": prompt + candidates + thoughts})
    }

    /// A text part, with no usage in the event.
    pub(crate) fn text(id: &str, model: &str, text: &str) -> String {
        response(
            id,
            model,
            json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}),
            None,
        )
    }

    /// A thought part (`thought: true`), with cumulative usage.
    pub(crate) fn thought(id: &str, model: &str, text: &str, usage: Value) -> String {
        response(
            id,
            model,
            json!({"content": {"role": "model", "parts": [{"text": text, "thought": true}]}, "index": 0}),
            Some(usage),
        )
    }

    /// The last event as Gemini often sends it: only the finish reason and usage.
    pub(crate) fn finish(id: &str, model: &str, reason: &str, usage: Value) -> String {
        response(id, model, json!({"finishReason": reason, "index": 0}), Some(usage))
    }

    /// A whole function call in one part (no id: Gemini sends none), finished with STOP.
    pub(crate) fn function_call(id: &str, model: &str, name: &str, args: Value, usage: Value) -> String {
        response(
            id,
            model,
            json!({"content": {"role": "model", "parts": [{"functionCall": {"name": name, "args": args}}]},
                   "finishReason": "STOP", "index": 0}),
            Some(usage),
        )
    }

    /// A whole streamed answer: one text event per piece, then the finish event.
    pub(crate) fn answer(
        id: &str,
        model: &str,
        pieces: &[&str],
        reason: &str,
        prompt: u32,
        candidates: u32,
    ) -> Vec<String> {
        let mut out: Vec<String> = pieces.iter().map(|p| text(id, model, p)).collect();
        out.push(finish(id, model, reason, usage(prompt, candidates, 0)));
        out
    }
}
