//! The OpenAI chat-completions wire format, spoken by OpenAI and by every
//! OpenAI-compatible API (OpenRouter, DeepSeek, Qwen, vLLM, Ollama, …).

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    DeltaStream, Provider, ProviderError, UpstreamCall,
    http::{self, Endpoint},
    sse::{self, Event, Translate},
};
use crate::{
    chat::{
        ChatRequest, Delta, Finish, FinishReason, Message, ResponseFormat, Role, ToolCallDelta, ToolChoice,
        Usage,
    },
    config::ProviderConfig,
};

pub struct OpenAi {
    endpoint: Endpoint,
}

impl OpenAi {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        Ok(Self { endpoint: Endpoint::new(name, config, "/chat/completions")? })
    }
}

impl Provider for OpenAi {
    fn system(&self) -> &'static str {
        "openai"
    }

    fn server(&self) -> Option<(String, u16)> {
        self.endpoint.server.clone()
    }

    fn stream(&self, call: UpstreamCall) -> BoxFuture<'static, Result<DeltaStream, ProviderError>> {
        let e = &self.endpoint;
        let mut request = e
            .client
            .post(e.target.clone())
            .headers(call.headers)
            .header("accept", "text/event-stream")
            .json(&body(&call.request, &call.model));
        if let Some(bearer) = &e.bearer {
            request = request.header(reqwest::header::AUTHORIZATION, bearer.clone());
        }
        e.open(request, Translator::default())
    }
}

/// The request body: `stream: true` with usage in the last chunk.
pub(crate) fn body(req: &ChatRequest, model: &str) -> Value {
    let mut body = json!({
        "model": model,
        "messages": req.messages.iter().map(message).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let Some(obj) = body.as_object_mut() else {
        return body;
    };
    if let Some(v) = req.max_tokens {
        obj.insert("max_tokens".into(), v.into());
    }
    if let Some(v) = req.temperature {
        obj.insert("temperature".into(), v.into());
    }
    if let Some(v) = req.top_p {
        obj.insert("top_p".into(), v.into());
    }
    if !req.stop.is_empty() {
        obj.insert("stop".into(), req.stop.clone().into());
    }
    if let Some(v) = req.seed {
        obj.insert("seed".into(), v.into());
    }
    if !req.user.is_empty() {
        obj.insert("user".into(), req.user.clone().into());
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                }})
            })
            .collect();
        obj.insert("tools".into(), tools.into());
    }
    match &req.tool_choice {
        ToolChoice::Unset => {}
        ToolChoice::Auto => _ = obj.insert("tool_choice".into(), "auto".into()),
        ToolChoice::None => _ = obj.insert("tool_choice".into(), "none".into()),
        ToolChoice::Required => _ = obj.insert("tool_choice".into(), "required".into()),
        ToolChoice::Named(name) => {
            obj.insert("tool_choice".into(), json!({"type": "function", "function": {"name": name}}));
        }
    }
    match &req.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            obj.insert("response_format".into(), json!({"type": "json_object"}));
        }
        ResponseFormat::JsonSchema { name, schema, strict } => {
            obj.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {
                    "name": name, "schema": schema, "strict": strict,
                }}),
            );
        }
    }
    body
}

fn message(m: &Message) -> Value {
    let mut v = json!({ "role": m.role.as_str(), "content": m.content });
    let Some(obj) = v.as_object_mut() else {
        return v;
    };
    if !m.name.is_empty() {
        obj.insert("name".into(), m.name.clone().into());
    }
    if m.role == Role::Assistant && !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments_json}})
            })
            .collect();
        obj.insert("tool_calls".into(), calls.into());
        if m.content.is_empty() {
            obj.insert("content".into(), Value::Null);
        }
    }
    if !m.tool_call_id.is_empty() {
        obj.insert("tool_call_id".into(), m.tool_call_id.clone().into());
    }
    v
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    /// DeepSeek's, Qwen's and older vLLM's name for the reasoning text.
    #[serde(default)]
    reasoning_content: Option<String>,
    /// OpenRouter's, Ollama's and newer vLLM's.
    #[serde(default)]
    reasoning: Option<String>,
    /// OpenAI's refusal text (structured outputs): the model's answer.
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
    /// DeepSeek's own count of cached prompt tokens.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u32>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        // Both details are subsets: prompt_tokens counts the cached tokens,
        // completion_tokens the reasoning ones.
        let cached = u.prompt_tokens_details.and_then(|d| d.cached_tokens).or(u.prompt_cache_hit_tokens);
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            cached_input_tokens: cached.unwrap_or(0),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

/// Chunks to deltas. The finish reason and the usage arrive in separate
/// chunks; both are held back and sent together in the final delta at
/// `[DONE]`, so that callers see them on the last message only.
#[derive(Default)]
pub(crate) struct Translator {
    started: bool,
    sent_id: bool,
    sent_model: bool,
    finish_reason: Option<FinishReason>,
    saw_finish: bool,
    usage: Usage,
}

impl Translator {
    fn finish(&mut self) -> Delta {
        Delta { finish: Some(Finish { reason: self.finish_reason, usage: self.usage }), ..Delta::default() }
    }
}

impl Translate for Translator {
    fn event(&mut self, event: Event<'_>) -> Result<Option<Delta>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        if data == "[DONE]" {
            return Ok(Some(self.finish()));
        }
        let chunk: Chunk<'_> = sse::json(data)?;
        if let Some(error) = chunk.error {
            return Err(ProviderError::Upstream {
                kind: error
                    .get("type")
                    .or_else(|| error.get("code"))
                    .map(|t| t.as_str().map(str::to_owned).unwrap_or_else(|| t.to_string()))
                    .unwrap_or_else(|| "error".into()),
                message: http::error_message(data.as_bytes(), "error"),
            });
        }
        if let Some(u) = chunk.usage {
            self.usage = u.into();
        }
        let mut delta = Delta::default();
        // Azure's first chunk carries empty ones: take the first non-empty.
        if !self.sent_id {
            delta.id = chunk.id.filter(|v| !v.is_empty()).map(Cow::into_owned);
            self.sent_id = delta.id.is_some();
        }
        if !self.sent_model {
            delta.model = chunk.model.filter(|v| !v.is_empty()).map(Cow::into_owned);
            self.sent_model = delta.model.is_some();
        }
        // n > 1 is not part of our API: only the first choice is followed.
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(reason) = choice.finish_reason {
                self.saw_finish = true;
                self.finish_reason = finish_reason(&reason);
            }
            if let Some(d) = choice.delta {
                delta.content = d.content.unwrap_or_default();
                if let Some(refusal) = d.refusal {
                    delta.content.push_str(&refusal);
                }
                // A server that sends both names sends the same text twice.
                delta.reasoning =
                    d.reasoning_content.filter(|r| !r.is_empty()).or(d.reasoning).unwrap_or_default();
                for call in d.tool_calls.unwrap_or_default() {
                    let function = call.function;
                    let (name, arguments) = match function {
                        Some(f) => (f.name.unwrap_or_default(), f.arguments.unwrap_or_default()),
                        None => Default::default(),
                    };
                    delta.tool_calls.push(ToolCallDelta {
                        index: call.index,
                        id: call.id.unwrap_or_default(),
                        name,
                        arguments_delta: arguments,
                    });
                }
            }
        }
        let informative = delta.id.is_some() || delta.model.is_some();
        if !delta.has_output() && self.started && !informative {
            return Ok(None);
        }
        self.started = true;
        Ok(Some(delta))
    }

    fn eof(&mut self) -> Result<Option<Delta>, ProviderError> {
        // Some compatible servers close without `[DONE]`; a finish reason
        // already seen means the answer is whole.
        if self.saw_finish {
            Ok(Some(self.finish()))
        } else {
            Err(ProviderError::Stream("upstream closed the stream before the answer finished".into()))
        }
    }
}

fn finish_reason(reason: &str) -> Option<FinishReason> {
    Some(match reason {
        "stop" | "eos" | "end_turn" | "stop_sequence" => FinishReason::Stop,
        "length" | "max_tokens" => FinishReason::Length,
        "tool_calls" | "function_call" | "tool_use" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(data: &str) -> Event<'_> {
        Event { event: "message", data }
    }

    #[test]
    fn a_chunk_borrows_its_id_and_model_from_the_event() {
        let chunk: Chunk<'_> = sse::json(r#"{"id":"c1","model":"gpt-x","choices":[]}"#).unwrap();
        assert!(matches!(chunk.id, Some(Cow::Borrowed("c1"))));
        assert!(matches!(chunk.model, Some(Cow::Borrowed("gpt-x"))));
        // Text with an escape cannot be borrowed; it is still read.
        let chunk: Chunk<'_> = sse::json(r#"{"id":"c\"1","model":null}"#).unwrap();
        assert_eq!(chunk.id.as_deref(), Some("c\"1"));
        assert!(chunk.model.is_none());
        let chunk: Chunk<'_> = sse::json(r#"{"choices":[]}"#).unwrap();
        assert!(chunk.id.is_none());
    }

    #[test]
    fn translates_a_stream() {
        let mut t = Translator::default();
        let first = t
            .event(ev(r#"{"id":"c1","model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(first.model.as_deref(), Some("gpt-x"));
        assert_eq!(first.id.as_deref(), Some("c1"));
        let d = t
            .event(ev(r#"{"id":"c1","model":"gpt-x","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.content, "Hel");
        assert!(d.model.is_none());
        assert!(
            t.event(ev(r#"{"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#))
                .unwrap()
                .is_none()
        );
        assert!(t
            .event(ev(r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#))
            .unwrap()
            .is_none());
        let last = t.event(ev("[DONE]")).unwrap().unwrap();
        let finish = last.finish.unwrap();
        assert_eq!(finish.reason, Some(FinishReason::Length));
        assert_eq!(finish.usage, Usage { input_tokens: 5, output_tokens: 2, ..Usage::default() });
    }

    #[test]
    fn empty_id_and_model_are_not_taken() {
        // Azure OpenAI opens with a prompt-filter chunk whose id and model are empty.
        let mut t = Translator::default();
        let first =
            t.event(ev(r#"{"id":"","model":"","choices":[],"prompt_filter_results":[]}"#)).unwrap().unwrap();
        assert!(first.model.is_none() && first.id.is_none());
        let d = t
            .event(ev(r#"{"id":"c9","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"x"}}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.model.as_deref(), Some("gpt-4o"));
        assert_eq!(d.id.as_deref(), Some("c9"));
    }

    #[test]
    fn tool_call_fragments() {
        let mut t = Translator::default();
        let d = t
            .event(ev(r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":""}}]}}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.tool_calls[0].id, "call_1");
        assert_eq!(d.tool_calls[0].name, "get");
        let d = t
            .event(ev(
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}"#,
            ))
            .unwrap()
            .unwrap();
        assert_eq!(d.tool_calls[0].arguments_delta, "{\"a\":");
    }

    #[test]
    fn errors_in_stream_and_early_close() {
        let mut t = Translator::default();
        let e = t.event(ev(r#"{"error":{"message":"boom","type":"server_error"}}"#)).unwrap_err();
        assert!(
            matches!(e, ProviderError::Upstream { ref kind, ref message } if kind == "server_error" && message == "boom")
        );
        assert!(matches!(t.event(ev("{not json")), Err(ProviderError::Protocol(_))));
        assert!(Translator::default().eof().is_err());
    }

    #[test]
    fn reasoning_and_token_details() {
        let mut t = Translator::default();
        // DeepSeek: reasoning_content; content null while it thinks.
        let d = t
            .event(ev(r#"{"id":"r","model":"deepseek-reasoner","choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":"Hmm"}}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("Hmm", ""));
        // OpenRouter: reasoning. A server sending both names: taken once.
        let d = t.event(ev(r#"{"choices":[{"delta":{"reasoning":"ok."}}]}"#)).unwrap().unwrap();
        assert_eq!(d.reasoning, "ok.");
        let d = t
            .event(ev(r#"{"choices":[{"delta":{"reasoning_content":"x","reasoning":"x"}}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.reasoning, "x");
        let d =
            t.event(ev(r#"{"choices":[{"delta":{"content":null,"refusal":"I can't"}}]}"#)).unwrap().unwrap();
        assert_eq!(d.content, "I can't");
        t.event(ev(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#)).unwrap();
        t.event(ev(r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":16},"completion_tokens_details":{"reasoning_tokens":7}}}"#))
            .unwrap();
        let f = t.event(ev("[DONE]")).unwrap().unwrap().finish.unwrap();
        assert_eq!(
            f.usage,
            Usage { input_tokens: 20, output_tokens: 9, cached_input_tokens: 16, reasoning_tokens: 7 }
        );
        // DeepSeek's own cache count; null details.
        let mut t = Translator::default();
        t.event(ev(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":null,"prompt_cache_hit_tokens":4}}"#))
            .unwrap();
        t.event(ev(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#)).unwrap();
        assert_eq!(t.eof().unwrap().unwrap().finish.unwrap().usage.cached_input_tokens, 4);
    }

    #[test]
    fn request_body_carries_parameters() {
        let req = ChatRequest {
            messages: vec![Message::new(Role::System, "be brief"), Message::new(Role::User, "hi")],
            max_tokens: Some(7),
            temperature: Some(0.5),
            top_p: Some(0.25),
            stop: vec!["\n".into()],
            seed: Some(42),
            user: "u1".into(),
            ..ChatRequest::default()
        };
        let b = body(&req, "m");
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "hi");
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["temperature"], 0.5);
        assert_eq!(b["top_p"], 0.25);
        assert_eq!(b["stop"][0], "\n");
        assert_eq!(b["seed"], 42);
        assert_eq!(b["user"], "u1");
    }
}
