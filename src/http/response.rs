//! The gateway's answers in OpenAI's shapes: a `chat.completion`, the
//! `chat.completion.chunk` events of a stream (written into a reused buffer,
//! borrowing the delta: nothing is copied per delta), usage, the model list.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

use crate::{
    chat::{Delta, FinishReason, Usage},
    core::{Answer, ModelInfo},
};

#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [Choice<'a>; 1],
    pub usage: UsageOut,
}

#[derive(Serialize)]
pub struct Choice<'a> {
    pub index: u32,
    pub message: OutMessage<'a>,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<()>,
}

#[derive(Serialize)]
pub struct OutMessage<'a> {
    pub role: &'static str,
    /// null for an answer that is only tool calls, as OpenAI sends it.
    pub content: Option<&'a str>,
    /// The model's reasoning, as DeepSeek and vLLM send it; absent when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    pub refusal: Option<()>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<OutToolCall<'a>>,
}

#[derive(Serialize)]
pub struct OutToolCall<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: OutFunction<'a>,
}

#[derive(Serialize)]
pub struct OutFunction<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

/// Usage in OpenAI's shape; the details are 0 when the provider does not
/// say, as OpenAI itself sends them.
#[derive(Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptDetails,
    pub completion_tokens_details: CompletionDetails,
}

#[derive(Serialize)]
pub struct PromptDetails {
    pub cached_tokens: u32,
}

#[derive(Serialize)]
pub struct CompletionDetails {
    pub reasoning_tokens: u32,
}

pub fn usage(u: Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: u.input_tokens,
        completion_tokens: u.output_tokens,
        total_tokens: u.total(),
        prompt_tokens_details: PromptDetails { cached_tokens: u.cached_input_tokens },
        completion_tokens_details: CompletionDetails { reasoning_tokens: u.reasoning_tokens },
    }
}

pub fn finish_reason(r: Option<FinishReason>) -> Option<&'static str> {
    r.map(FinishReason::as_str)
}

/// The whole answer as a `chat.completion` body.
pub fn completion(answer: &Answer, model: &str, created: u64) -> Vec<u8> {
    let tool_calls: Vec<OutToolCall<'_>> = answer
        .tool_calls
        .iter()
        .map(|c| OutToolCall {
            id: &c.id,
            kind: "function",
            function: OutFunction { name: &c.name, arguments: &c.arguments_json },
        })
        .collect();
    let content = (!answer.content.is_empty() || tool_calls.is_empty()).then_some(answer.content.as_str());
    let body = Completion {
        id: &answer.id,
        object: "chat.completion",
        created,
        model,
        choices: [Choice {
            index: 0,
            message: OutMessage {
                role: "assistant",
                content,
                reasoning_content: (!answer.reasoning.is_empty()).then_some(answer.reasoning.as_str()),
                refusal: None,
                tool_calls,
            },
            finish_reason: finish_reason(answer.finish.reason),
            logprobs: None,
        }],
        usage: usage(answer.finish.usage),
    };
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// Present (null until the last chunk) only when the caller asked for usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageOut>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: ChunkDelta<'a>,
    finish_reason: Option<&'static str>,
    logprobs: Option<()>,
}

#[derive(Serialize)]
struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    /// The model's reasoning, as DeepSeek and vLLM stream it.
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallChunk<'a>>,
}

#[derive(Serialize)]
struct ToolCallChunk<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: ChunkFunction<'a>,
}

#[derive(Serialize)]
struct ChunkFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// Writes the SSE events of one stream into one reused buffer.
pub struct ChunkWriter {
    buf: BytesMut,
    pub created: u64,
    pub include_usage: bool,
}

/// The fixed parts of every chunk of one answer.
pub struct ChunkHead<'a> {
    pub id: &'a str,
    pub model: &'a str,
    /// The first chunk carries the role.
    pub first: bool,
}

impl ChunkWriter {
    pub fn new(created: u64, include_usage: bool) -> Self {
        Self { buf: BytesMut::with_capacity(512), created, include_usage }
    }

    /// One `data:` event for `delta`; after the final delta, the usage chunk
    /// (when asked for) and `data: [DONE]` follow in the same write.
    pub fn delta(&mut self, head: &ChunkHead<'_>, delta: &Delta) -> Bytes {
        let tool_calls = delta
            .tool_calls
            .iter()
            .map(|c| ToolCallChunk {
                index: c.index,
                id: (!c.id.is_empty()).then_some(c.id.as_str()),
                kind: (!c.id.is_empty()).then_some("function"),
                function: ChunkFunction {
                    name: (!c.name.is_empty()).then_some(c.name.as_str()),
                    arguments: &c.arguments_delta,
                },
            })
            .collect();
        let choice = ChunkChoice {
            index: 0,
            delta: ChunkDelta {
                role: head.first.then_some("assistant"),
                content: (!delta.content.is_empty() || head.first).then_some(delta.content.as_str()),
                reasoning_content: (!delta.reasoning.is_empty()).then_some(delta.reasoning.as_str()),
                tool_calls,
            },
            finish_reason: delta.finish.and_then(|f| finish_reason(f.reason)),
            logprobs: None,
        };
        let no_usage_yet = self.include_usage.then_some(None);
        self.event(&Chunk {
            id: head.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: head.model,
            choices: &[choice],
            usage: no_usage_yet,
        });
        if let Some(finish) = delta.finish {
            if self.include_usage {
                self.event(&Chunk {
                    id: head.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: head.model,
                    choices: &[],
                    usage: Some(Some(usage(finish.usage))),
                });
            }
            self.buf.put_slice(b"data: [DONE]\n\n");
        }
        self.buf.split().freeze()
    }

    /// An error event, `data: {"error": {...}}`, which the OpenAI SDKs
    /// raise; no `[DONE]` follows it.
    pub fn error(&mut self, body: &impl Serialize) -> Bytes {
        self.event(body);
        self.buf.split().freeze()
    }

    fn event(&mut self, body: &impl Serialize) {
        // Space freed by the last event, once hyper has written it, is reused.
        self.buf.reserve(256);
        self.buf.put_slice(b"data: ");
        // Writing into memory cannot fail.
        let _ = serde_json::to_writer((&mut self.buf).writer(), body);
        self.buf.put_slice(b"\n\n");
    }
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelOut<'a>>,
}

#[derive(Serialize)]
struct ModelOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// `GET /v1/models`: the gateway's model names as `id`.
pub fn models(models: &[ModelInfo], created: u64) -> Vec<u8> {
    let list = ModelList {
        object: "list",
        data: models
            .iter()
            .map(|m| ModelOut { id: &m.name, object: "model", created, owned_by: "llm-gateway" })
            .collect(),
    };
    serde_json::to_vec(&list).unwrap_or_default()
}
