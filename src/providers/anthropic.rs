//! Anthropic's Messages API wire format (`POST /messages`, SSE events
//! `message_start` … `message_stop`). A request field the API cannot carry
//! (`seed`, a JSON `response_format`, a message `name`) is refused by name
//! before any upstream call, never dropped.

use std::{borrow::Cow, collections::HashMap};

use futures_util::{FutureExt, future::BoxFuture};
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    DeltaStream, Provider, ProviderError, UpstreamCall,
    http::{self, Endpoint},
    sse::{self, Event, Translate},
};
use crate::{
    chat::{
        ChatRequest, Delta, Finish, FinishReason, ResponseFormat, Role, ToolCallDelta, ToolChoice, Usage,
    },
    config::{ProviderConfig, ReasoningConfig},
};

const VERSION: &str = "2023-06-01";

pub struct Anthropic {
    endpoint: Endpoint,
    /// The key as a header value marked sensitive (kept out of HPACK tables
    /// and debug output).
    key_header: Option<HeaderValue>,
    default_max_tokens: u32,
    /// Extended thinking, when the config asks for it.
    thinking_budget: Option<u32>,
}

impl Anthropic {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(name, config, "/messages")?;
        let key_header = http::key_header(&endpoint)?;
        Ok(Self {
            endpoint,
            key_header,
            default_max_tokens: config.default_max_tokens,
            thinking_budget: config.reasoning.as_ref().and_then(|r: &ReasoningConfig| r.budget_tokens),
        })
    }
}

impl Provider for Anthropic {
    fn system(&self) -> &'static str {
        "anthropic"
    }

    fn server(&self) -> Option<(String, u16)> {
        self.endpoint.server.clone()
    }

    fn stream(&self, call: UpstreamCall) -> BoxFuture<'static, Result<DeltaStream, ProviderError>> {
        let e = &self.endpoint;
        let body = match body(&call.request, &call.model, self.default_max_tokens, self.thinking_budget) {
            Ok(b) => b,
            Err(refused) => return async move { Err(refused) }.boxed(),
        };
        let mut request = e
            .client
            .post(e.target.clone())
            .headers(call.headers)
            .header("anthropic-version", VERSION)
            .header("accept", "text/event-stream")
            .json(&body);
        if let Some(key) = &self.key_header {
            request = request.header("x-api-key", key.clone());
        }
        e.open(request, Translator::default())
    }
}

/// The request body. System messages move to the top-level `system`; tool
/// calls and results become content blocks. A field the API has no place
/// for is refused, naming it.
pub(crate) fn body(
    req: &ChatRequest,
    model: &str,
    default_max_tokens: u32,
    thinking_budget: Option<u32>,
) -> Result<Value, ProviderError> {
    if req.seed.is_some() {
        return Err(ProviderError::refused("seed", "Anthropic's Messages API has no seed"));
    }
    if !matches!(req.response_format, ResponseFormat::Text) {
        return Err(ProviderError::refused(
            "response_format",
            "Anthropic's Messages API (2023-06-01) has no JSON output mode; only TYPE_TEXT is accepted",
        ));
    }
    let system: Vec<&str> =
        req.messages.iter().filter(|m| m.role == Role::System).map(|m| m.content.as_str()).collect();
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !m.name.is_empty() {
            return Err(ProviderError::refused(
                format_args!("messages[{i}].name"),
                "Anthropic's Messages API has no participant name",
            ));
        }
        messages.push(match m.role {
            Role::System => continue,
            Role::Tool => json!({"role": "user", "content": [{
                "type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content,
            }]}),
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(json!({"type": "text", "text": m.content}));
                }
                for (j, c) in m.tool_calls.iter().enumerate() {
                    let input = http::json_object(&c.arguments_json).ok_or_else(|| {
                        ProviderError::refused(
                            format_args!("messages[{i}].tool_calls[{j}].arguments_json"),
                            "Anthropic takes a tool call's input as a JSON object only",
                        )
                    })?;
                    blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}));
                }
                json!({"role": "assistant", "content": blocks})
            }
            _ => json!({"role": m.role.as_str(), "content": m.content}),
        });
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": req.max_tokens.unwrap_or(default_max_tokens),
        "stream": true,
    });
    let Some(obj) = body.as_object_mut() else {
        return Ok(body);
    };
    if let Some(budget) = thinking_budget {
        obj.insert("thinking".into(), json!({"type": "enabled", "budget_tokens": budget}));
    }
    if !system.is_empty() {
        obj.insert("system".into(), system.join("\n\n").into());
    }
    if let Some(v) = req.temperature {
        obj.insert("temperature".into(), v.into());
    }
    if let Some(v) = req.top_p {
        obj.insert("top_p".into(), v.into());
    }
    if !req.stop.is_empty() {
        obj.insert("stop_sequences".into(), req.stop.clone().into());
    }
    if !req.user.is_empty() {
        obj.insert("metadata".into(), json!({"user_id": req.user}));
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
            .collect();
        obj.insert("tools".into(), tools.into());
    }
    let choice = match &req.tool_choice {
        ToolChoice::Unset => None,
        ToolChoice::Auto => Some(json!({"type": "auto"})),
        ToolChoice::None => Some(json!({"type": "none"})),
        ToolChoice::Required => Some(json!({"type": "any"})),
        ToolChoice::Named(name) => Some(json!({"type": "tool", "name": name})),
    };
    if let Some(choice) = choice {
        obj.insert("tool_choice".into(), choice);
    }
    Ok(body)
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent<'a> {
    MessageStart {
        #[serde(borrow)]
        message: StartMessage<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {},
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop {},
    Ping {},
    Error {
        error: Value,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct StartMessage<'a> {
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
    },
    /// Opens empty when streamed; text there would be the first piece.
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
    },
    /// `redacted_thinking` (encrypted) and server tool blocks: nothing a
    /// caller can read.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    ThinkingDelta {
        thinking: String,
    },
    /// `signature_delta` (the thinking block's signature) and
    /// `citations_delta`: our API has no field for them.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

/// Events to deltas. Content-block indices count every block; tool-call
/// indices count tool blocks only, so the map between them is kept here.
#[derive(Default)]
pub(crate) struct Translator {
    id: Option<String>,
    model: Option<String>,
    started: bool,
    tool_index: HashMap<u32, u32>,
    finish_reason: Option<FinishReason>,
    usage: Usage,
}

impl Translator {
    fn first(&mut self, mut delta: Delta) -> Delta {
        if !self.started {
            self.started = true;
            delta.id = self.id.take();
            delta.model = self.model.take();
        }
        delta
    }

    fn add_usage(&mut self, u: WireUsage) {
        // Anthropic counts cached input apart; callers want all input, with
        // the cache reads also on their own (cache writes stay in input only).
        let input = u.input_tokens.map(|i| {
            i.saturating_add(u.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(u.cache_read_input_tokens.unwrap_or(0))
        });
        if let Some(i) = input.filter(|i| *i > 0) {
            self.usage.input_tokens = i;
            self.usage.cached_input_tokens = u.cache_read_input_tokens.unwrap_or(0);
        }
        // `message_delta` carries the cumulative output count.
        if let Some(o) = u.output_tokens {
            self.usage.output_tokens = o;
        }
    }
}

impl Translate for Translator {
    fn event(&mut self, event: Event<'_>) -> Result<Option<Delta>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        let wire: WireEvent<'_> = sse::json(data)?;
        Ok(match wire {
            WireEvent::MessageStart { message } => {
                self.id = message.id.map(Cow::into_owned);
                self.model = message.model.map(Cow::into_owned);
                if let Some(u) = message.usage {
                    self.add_usage(u);
                }
                // The caller learns the model at once, before the first text.
                Some(self.first(Delta::default()))
            }
            WireEvent::ContentBlockStart { index, content_block: Block::ToolUse { id, name } } => {
                let tool = self.tool_index.len() as u32;
                self.tool_index.insert(index, tool);
                let call = ToolCallDelta { index: tool, id, name, arguments_delta: String::new() };
                Some(self.first(Delta { tool_calls: vec![call], ..Delta::default() }))
            }
            WireEvent::ContentBlockStart { content_block: Block::Text { text }, .. }
            | WireEvent::ContentBlockDelta { delta: BlockDelta::TextDelta { text }, .. }
                if !text.is_empty() =>
            {
                Some(self.first(Delta { content: text, ..Delta::default() }))
            }
            WireEvent::ContentBlockStart { content_block: Block::Thinking { thinking }, .. }
            | WireEvent::ContentBlockDelta { delta: BlockDelta::ThinkingDelta { thinking }, .. }
                if !thinking.is_empty() =>
            {
                Some(self.first(Delta { reasoning: thinking, ..Delta::default() }))
            }
            WireEvent::ContentBlockDelta { index, delta: BlockDelta::InputJsonDelta { partial_json } }
                if !partial_json.is_empty() =>
            {
                let Some(&tool) = self.tool_index.get(&index) else {
                    return Err(ProviderError::Protocol(format!(
                        "input_json_delta for content block {index}, which is not a tool_use block"
                    )));
                };
                let call = ToolCallDelta { index: tool, arguments_delta: partial_json, ..Default::default() };
                Some(self.first(Delta { tool_calls: vec![call], ..Delta::default() }))
            }
            WireEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.stop_reason {
                    self.finish_reason = stop_reason(&reason);
                }
                if let Some(u) = usage {
                    self.add_usage(u);
                }
                None
            }
            WireEvent::MessageStop {} => Some(self.first(Delta {
                finish: Some(Finish { reason: self.finish_reason, usage: self.usage }),
                ..Delta::default()
            })),
            WireEvent::Error { error } => {
                return Err(ProviderError::Upstream {
                    kind: error.get("type").and_then(Value::as_str).unwrap_or("error").to_owned(),
                    message: error.get("message").and_then(Value::as_str).unwrap_or("error event").to_owned(),
                });
            }
            WireEvent::ContentBlockStart { .. }
            | WireEvent::ContentBlockDelta { .. }
            | WireEvent::ContentBlockStop {}
            | WireEvent::Ping {}
            | WireEvent::Unknown => None,
        })
    }

    fn eof(&mut self) -> Result<Option<Delta>, ProviderError> {
        Err(ProviderError::Stream("upstream closed the stream before message_stop".into()))
    }
}

fn stop_reason(reason: &str) -> Option<FinishReason> {
    Some(match reason {
        "end_turn" | "stop_sequence" | "pause_turn" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Tool, ToolCall};

    fn ev(data: &str) -> Event<'_> {
        Event { event: "message", data }
    }

    #[test]
    fn translates_text_and_usage() {
        let mut t = Translator::default();
        let first = t
            .event(ev(r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":12,"output_tokens":1}}}"#))
            .unwrap()
            .unwrap();
        assert_eq!(first.model.as_deref(), Some("claude-x"));
        assert!(
            t.event(ev(
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
            ))
            .unwrap()
            .is_none()
        );
        assert!(t.event(ev(r#"{"type": "ping"}"#)).unwrap().is_none());
        let d = t
            .event(ev(
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ))
            .unwrap()
            .unwrap();
        assert_eq!(d.content, "Hi");
        assert!(d.model.is_none());
        assert!(t.event(ev(r#"{"type":"content_block_stop","index":0}"#)).unwrap().is_none());
        assert!(t
            .event(ev(r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens","stop_sequence":null},"usage":{"output_tokens":9}}"#))
            .unwrap()
            .is_none());
        let last = t.event(ev(r#"{"type":"message_stop"}"#)).unwrap().unwrap();
        let f = last.finish.unwrap();
        assert_eq!(f.reason, Some(FinishReason::Length));
        assert_eq!(f.usage, Usage { input_tokens: 12, output_tokens: 9, ..Usage::default() });
    }

    #[test]
    fn tool_blocks_get_their_own_indices() {
        let mut t = Translator::default();
        t.event(ev(r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#))
            .unwrap();
        let d = t
            .event(ev(r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get","input":{}}}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            d.tool_calls[0],
            ToolCallDelta {
                index: 0,
                id: "toolu_1".into(),
                name: "get".into(),
                arguments_delta: String::new()
            }
        );
        let d = t
            .event(ev(r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.tool_calls[0].index, 0);
        assert_eq!(d.tool_calls[0].arguments_delta, "{\"a\"");
    }

    #[test]
    fn thinking_and_cache_reads() {
        let mut t = Translator::default();
        t.event(ev(r#"{"type":"message_start","message":{"id":"m","model":"claude","usage":{"input_tokens":10,"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":1}}}"#))
            .unwrap();
        assert!(
            t.event(ev(r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#))
                .unwrap()
                .is_none()
        );
        let d = t
            .event(ev(r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me see"}}"#))
            .unwrap()
            .unwrap();
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("Let me see", ""));
        assert!(
            t.event(ev(r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQB"}}"#))
                .unwrap()
                .is_none(),
            "signatures are not text"
        );
        assert!(
            t.event(ev(r#"{"type":"content_block_start","index":1,"content_block":{"type":"redacted_thinking","data":"xyz"}}"#))
                .unwrap()
                .is_none()
        );
        t.event(ev(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":30}}"#,
        ))
        .unwrap();
        let f = t.event(ev(r#"{"type":"message_stop"}"#)).unwrap().unwrap().finish.unwrap();
        assert_eq!(
            f.usage,
            Usage { input_tokens: 115, output_tokens: 30, cached_input_tokens: 100, reasoning_tokens: 0 }
        );
    }

    #[test]
    fn refuses_what_it_cannot_carry() {
        let base = || ChatRequest { messages: vec![Message::new(Role::User, "q")], ..ChatRequest::default() };
        let refused = |req: ChatRequest| match body(&req, "c", 100, None) {
            Err(e) => {
                assert!(e.is_invalid_request() && !e.retryable(), "{e}");
                e.to_string()
            }
            Ok(b) => panic!("accepted: {b}"),
        };
        assert!(refused(ChatRequest { seed: Some(1), ..base() }).contains("seed:"));
        assert!(
            refused(ChatRequest { response_format: ResponseFormat::JsonObject, ..base() })
                .contains("response_format:")
        );
        let mut named = base();
        named.messages[0].name = "bob".into();
        assert!(refused(named).contains("messages[0].name:"));
        let mut assistant = Message::new(Role::Assistant, "");
        assistant.tool_calls.push(ToolCall { id: "t".into(), name: "f".into(), arguments_json: "3".into() });
        assert!(
            refused(ChatRequest { messages: vec![assistant], ..base() })
                .contains("messages[0].tool_calls[0].arguments_json:")
        );
        let b = body(&base(), "c", 8000, Some(2048)).unwrap();
        assert_eq!(b["thinking"], json!({"type": "enabled", "budget_tokens": 2048}));
    }

    #[test]
    fn error_event_and_early_close() {
        let mut t = Translator::default();
        let e = t
            .event(ev(r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#))
            .unwrap_err();
        assert!(matches!(e, ProviderError::Upstream { ref kind, .. } if kind == "overloaded_error"));
        assert!(t.eof().is_err());
    }

    #[test]
    fn request_body_moves_system_and_tools() {
        let mut assistant = Message::new(Role::Assistant, "");
        assistant.tool_calls.push(ToolCall {
            id: "t1".into(),
            name: "get".into(),
            arguments_json: r#"{"a":1}"#.into(),
        });
        let mut tool = Message::new(Role::Tool, "42");
        tool.tool_call_id = "t1".into();
        let req = ChatRequest {
            messages: vec![Message::new(Role::System, "sys"), Message::new(Role::User, "q"), assistant, tool],
            stop: vec!["END".into()],
            tools: vec![Tool {
                name: "get".into(),
                description: "d".into(),
                parameters: json!({"type":"object"}),
            }],
            tool_choice: ToolChoice::Required,
            user: "u".into(),
            ..ChatRequest::default()
        };
        let b = body(&req, "claude", 1024, None).unwrap();
        assert_eq!(b["system"], "sys");
        assert_eq!(b["max_tokens"], 1024);
        assert_eq!(b["messages"].as_array().unwrap().len(), 3);
        assert_eq!(b["messages"][1]["content"][0]["input"]["a"], 1);
        assert_eq!(b["messages"][2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(b["stop_sequences"][0], "END");
        assert_eq!(b["tool_choice"]["type"], "any");
        assert_eq!(b["metadata"]["user_id"], "u");
    }
}
