//! The gateway's own chat types: what the front doors turn a request into and what
//! `providers/` translate to and from each wire format. Nothing here knows gRPC.

use std::time::Duration;

/// A validated chat completion request, independent of the caller's protocol.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub response_format: ResponseFormat,
    /// End-user id; empty when the caller sent none.
    pub user: String,
    /// The caller wants the answer whole (`Completion`), not streamed. A
    /// provider with a unary endpoint of its own (Gemini's
    /// `:generateContent`) may use it; the deltas it yields are the same.
    pub unary: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Participant name; empty when absent.
    pub name: String,
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers; empty otherwise.
    pub tool_call_id: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            name: String::new(),
            tool_calls: Vec::new(),
            tool_call_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments_json: String,
}

#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// The JSON Schema of the arguments, already parsed and checked by the front door.
    pub parameters: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum ToolChoice {
    /// The caller said nothing: the provider's default.
    #[default]
    Unset,
    Auto,
    None,
    Required,
    Named(String),
}

#[derive(Debug, Clone, Default)]
pub enum ResponseFormat {
    #[default]
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        strict: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Token counts of one answer. Cached input is part of `input_tokens` and
/// reasoning is part of `output_tokens`: each is also counted on its own, 0
/// when the provider does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input_tokens: u32,
    /// Output tokens spent on reasoning (thinking).
    pub reasoning_tokens: u32,
}

impl Usage {
    /// Input plus output: what the call consumed.
    pub fn total(&self) -> u32 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// A fragment of a tool call, as streamed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub arguments_delta: String,
}

/// One step of an answer as it streams. Providers emit a delta for every
/// upstream event that carries text, reasoning or tool-call fragments, and
/// exactly one final delta with `finish` set (holding the finish reason and
/// usage).
#[derive(Debug, Clone, Default)]
pub struct Delta {
    /// The upstream's response id, when it has told us (first delta).
    pub id: Option<String>,
    /// The upstream model that answers, when it has told us (first delta).
    pub model: Option<String>,
    pub content: String,
    /// The model's reasoning (thinking) text: never part of `content`.
    pub reasoning: String,
    pub tool_calls: Vec<ToolCallDelta>,
    pub finish: Option<Finish>,
}

impl Delta {
    /// Whether it holds any of the answer: text, reasoning or a tool-call
    /// fragment (a delta with only an id or a model does not).
    pub fn has_output(&self) -> bool {
        !self.content.is_empty() || !self.reasoning.is_empty() || !self.tool_calls.is_empty()
    }
}

/// The end of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Finish {
    /// None when the upstream gave no reason we know.
    pub reason: Option<FinishReason>,
    pub usage: Usage,
}

/// How long to wait before trying again, when the upstream said.
pub type RetryAfter = Option<Duration>;
