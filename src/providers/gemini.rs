//! Google's Gemini API wire format: `POST {base_url}/models/{model}:streamGenerateContent?alt=sse`
//! (unary: `:generateContent`), the key in `x-goog-api-key`. The stream has no
//! end marker: it ends at EOF, and its last event may hold only the finish
//! reason and the (cumulative) usage. A request field the API cannot carry is
//! refused by name before any upstream call.

use std::{borrow::Cow, collections::HashMap};

use futures_util::{FutureExt, future::BoxFuture};
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value, json};

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
    config::{ProviderConfig, ReasoningConfig},
};

/// Largest unary answer read: the size `Completion` gathers at most.
const MAX_UNARY_BODY: usize = 64 << 20;

pub struct Gemini {
    endpoint: Endpoint,
    key_header: Option<HeaderValue>,
    reasoning: Option<ReasoningConfig>,
}

impl Gemini {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(name, config, "")?;
        let key_header = http::key_header(&endpoint)?;
        Ok(Self { endpoint, key_header, reasoning: config.reasoning.clone() })
    }

    /// `{base_url}/models/{model}:{method}`; a model given as a resource
    /// name (`tunedModels/x`, `models/x`) is used as it is.
    fn url(&self, model: &str, method: &str) -> String {
        let resource =
            if model.contains('/') { Cow::Borrowed(model) } else { format!("models/{model}").into() };
        format!("{}/{}:{method}", self.endpoint.url, escape_path(&resource))
    }
}

impl Provider for Gemini {
    fn system(&self) -> &'static str {
        "gcp.gemini"
    }

    fn server(&self) -> Option<(String, u16)> {
        self.endpoint.server.clone()
    }

    fn answers_whole(&self, request: &ChatRequest) -> bool {
        request.unary
    }

    fn stream(&self, call: UpstreamCall) -> BoxFuture<'static, Result<DeltaStream, ProviderError>> {
        let body = match body(&call.request, self.reasoning.as_ref()) {
            Ok(b) => b,
            Err(refused) => return async move { Err(refused) }.boxed(),
        };
        let unary = call.request.unary;
        let url = if unary {
            self.url(&call.model, "generateContent")
        } else {
            self.url(&call.model, "streamGenerateContent?alt=sse")
        };
        let mut request = self.endpoint.client.post(url).headers(call.headers).json(&body);
        if let Some(key) = &self.key_header {
            request = request.header("x-goog-api-key", key.clone());
        }
        if !unary {
            return self.endpoint.open(request.header("accept", "text/event-stream"), Translator::new());
        }
        let response = self.endpoint.send(request);
        async move {
            let response = response.await?;
            let body = http::read_body(response, MAX_UNARY_BODY).await?;
            let deltas = unary_deltas(&body, Translator::new());
            let stream: DeltaStream = Box::pin(futures_util::stream::iter(deltas));
            Ok(stream)
        }
        .boxed()
    }
}

/// A whole `generateContent` answer as the deltas a stream of one event
/// would give: the answer, then the end.
pub(crate) fn unary_deltas(body: &[u8], mut t: Translator) -> Vec<Result<Delta, ProviderError>> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::with_capacity(2);
    match sse::json::<WireResponse<'_>>(&text).and_then(|r| t.response(r)) {
        Ok(Some(delta)) => out.push(Ok(delta)),
        Ok(None) => {}
        Err(e) => return vec![Err(e)],
    }
    match t.end() {
        Ok(finish) => out.push(Ok(finish)),
        Err(_) => {
            out.push(Err(ProviderError::Protocol("generateContent answered with no finishReason".into())))
        }
    }
    out
}

/// Percent-encodes what a URL path must not hold raw, `:` included (the
/// `:method` suffix is added after); `/` stays, as resource names have it.
fn escape_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request body: `contents` with roles `user` / `model`, system
/// messages in `systemInstruction`, sampling in `generationConfig`, tools
/// as `functionDeclarations`, tool results as `functionResponse` parts.
pub(crate) fn body(req: &ChatRequest, reasoning: Option<&ReasoningConfig>) -> Result<Value, ProviderError> {
    let mut body = Map::new();
    let system: Vec<Value> =
        req.messages.iter().filter(|m| m.role == Role::System).map(|m| json!({"text": m.content})).collect();
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": system}));
    }
    body.insert("contents".into(), contents(&req.messages)?.into());
    if !req.tools.is_empty() {
        let declarations: Vec<Value> = req
            .tools
            .iter()
            .map(|t| {
                let mut d = json!({"name": t.name, "description": t.description});
                // Gemini refuses an OBJECT schema without properties: a tool
                // that takes nothing has no `parameters` at all.
                if !no_parameters(&t.parameters) {
                    d["parameters"] = t.parameters.clone();
                }
                d
            })
            .collect();
        body.insert("tools".into(), json!([{"functionDeclarations": declarations}]));
    }
    let mode = match &req.tool_choice {
        ToolChoice::Unset => None,
        ToolChoice::Auto => Some(json!({"mode": "AUTO"})),
        ToolChoice::None => Some(json!({"mode": "NONE"})),
        ToolChoice::Required => Some(json!({"mode": "ANY"})),
        ToolChoice::Named(name) => Some(json!({"mode": "ANY", "allowedFunctionNames": [name]})),
    };
    if let Some(mode) = mode {
        body.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    let config = generation_config(req, reasoning)?;
    if !config.is_empty() {
        body.insert("generationConfig".into(), config.into());
    }
    // `user` has no place in this API and does not shape the answer: it is
    // not sent (the README's field matrix says so).
    Ok(Value::Object(body))
}

fn generation_config(
    req: &ChatRequest,
    reasoning: Option<&ReasoningConfig>,
) -> Result<Map<String, Value>, ProviderError> {
    let mut c = Map::new();
    if let Some(v) = req.max_tokens {
        c.insert("maxOutputTokens".into(), v.into());
    }
    if let Some(v) = req.temperature {
        c.insert("temperature".into(), v.into());
    }
    if let Some(v) = req.top_p {
        c.insert("topP".into(), v.into());
    }
    if !req.stop.is_empty() {
        c.insert("stopSequences".into(), req.stop.clone().into());
    }
    if let Some(seed) = req.seed {
        let seed =
            i32::try_from(seed).map_err(|_| ProviderError::refused("seed", "Gemini takes a 32-bit seed"))?;
        c.insert("seed".into(), seed.into());
    }
    match &req.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            c.insert("responseMimeType".into(), "application/json".into());
        }
        // Gemini always holds the answer to the schema (`strict` is how it
        // works anyway) and names no schema.
        ResponseFormat::JsonSchema { schema, .. } => {
            c.insert("responseMimeType".into(), "application/json".into());
            c.insert("responseSchema".into(), schema.clone());
        }
    }
    if let Some(r) = reasoning {
        let mut thinking = json!({"includeThoughts": true});
        if let Some(budget) = r.budget_tokens {
            thinking["thinkingBudget"] = budget.into();
        }
        c.insert("thinkingConfig".into(), thinking);
    }
    Ok(c)
}

/// `{"type": "object"}` with no properties: what `api/` fills in for a tool
/// given no schema.
fn no_parameters(schema: &Value) -> bool {
    let props_empty = match schema.get("properties") {
        None => true,
        Some(Value::Object(p)) => p.is_empty(),
        Some(_) => false,
    };
    props_empty && schema.as_object().is_some_and(|o| o.keys().all(|k| k == "type" || k == "properties"))
}

/// The conversation as `contents`. Consecutive tool results go back in one
/// `user` turn, as Gemini wants the answers to parallel calls together.
fn contents(messages: &[Message]) -> Result<Vec<Value>, ProviderError> {
    // A functionResponse carries the function's name, not the call's id:
    // the name comes from the assistant message that made the call.
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    let mut results: Vec<Value> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Tool && !results.is_empty() {
            out.push(json!({"role": "user", "parts": std::mem::take(&mut results)}));
        }
        if !m.name.is_empty() && m.role != Role::Tool {
            return Err(ProviderError::refused(
                format_args!("messages[{i}].name"),
                "Gemini has no participant name",
            ));
        }
        match m.role {
            Role::System => {}
            Role::User => out.push(json!({"role": "user", "parts": [{"text": m.content}]})),
            Role::Assistant => {
                let mut parts = Vec::with_capacity(1 + m.tool_calls.len());
                if !m.content.is_empty() || m.tool_calls.is_empty() {
                    parts.push(json!({"text": m.content}));
                }
                for (j, c) in m.tool_calls.iter().enumerate() {
                    let args = http::json_object(&c.arguments_json).ok_or_else(|| {
                        ProviderError::refused(
                            format_args!("messages[{i}].tool_calls[{j}].arguments_json"),
                            "Gemini takes a function call's args as a JSON object only",
                        )
                    })?;
                    names.insert(&c.id, &c.name);
                    parts.push(json!({"functionCall": {"name": c.name, "args": args}}));
                }
                out.push(json!({"role": "model", "parts": parts}));
            }
            Role::Tool => {
                let name = names.get(m.tool_call_id.as_str()).copied().or(Some(m.name.as_str()));
                let Some(name) = name.filter(|n| !n.is_empty()) else {
                    return Err(ProviderError::refused(
                        format_args!("messages[{i}].tool_call_id"),
                        "names no tool call of an earlier assistant message (Gemini needs the function's name), and the message has no name",
                    ));
                };
                results
                    .push(json!({"functionResponse": {"name": name, "response": tool_response(&m.content)}}));
            }
        }
    }
    if !results.is_empty() {
        out.push(json!({"role": "user", "parts": results}));
    }
    Ok(out)
}

/// A tool's result as the JSON object Gemini wants: an object as it is,
/// anything else under `output`.
fn tool_response(content: &str) -> Value {
    match serde_json::from_str::<Value>(content) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => json!({"output": v}),
        Err(_) => json!({"output": content}),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse<'a> {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    model_version: Option<Cow<'a, str>>,
    #[serde(borrow, deserialize_with = "sse::borrowed_text", default)]
    response_id: Option<Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    finish_message: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

/// A part of an answer. Parts of other kinds (inline data, executable code)
/// and thought signatures have no field in our API and are passed over.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<FunctionCall>,
}

#[derive(Deserialize)]
struct FunctionCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u32,
    #[serde(default)]
    candidates_token_count: u32,
    #[serde(default)]
    thoughts_token_count: u32,
    #[serde(default)]
    cached_content_token_count: u32,
    #[serde(default)]
    tool_use_prompt_token_count: u32,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            // Tool-use prompts (grounding results) are billed as input.
            input_tokens: u.prompt_token_count.saturating_add(u.tool_use_prompt_token_count),
            // Thoughts are billed as output but not in candidatesTokenCount.
            output_tokens: u.candidates_token_count.saturating_add(u.thoughts_token_count),
            cached_input_tokens: u.cached_content_token_count,
            reasoning_tokens: u.thoughts_token_count,
        }
    }
}

/// Events to deltas. The finish reason and the usage may come before the
/// last event, so both are kept and sent in the final delta at EOF.
pub(crate) struct Translator {
    /// Generated tool-call ids are this plus a counter: Gemini sends none.
    id_prefix: String,
    started: bool,
    sent_id: bool,
    sent_model: bool,
    tool_calls: u32,
    /// A finish reason (or a blocked prompt) was seen.
    finish: Option<FinishReason>,
    usage: Usage,
}

impl Translator {
    pub(crate) fn new() -> Self {
        Self::with_id_prefix(format!("call_{:016x}", fastrand::u64(..)))
    }

    /// Tool-call ids `{prefix}_0`, `{prefix}_1`, …: fixed ones for replays.
    pub(crate) fn with_id_prefix(id_prefix: String) -> Self {
        Self {
            id_prefix,
            started: false,
            sent_id: false,
            sent_model: false,
            tool_calls: 0,
            finish: None,
            usage: Usage::default(),
        }
    }

    /// One `GenerateContentResponse`: a stream event, or a whole unary answer.
    fn response(&mut self, r: WireResponse<'_>) -> Result<Option<Delta>, ProviderError> {
        if let Some(error) = r.error {
            return Err(upstream_error(&error));
        }
        // Cumulative: each count is the whole so far, so the last one wins;
        // an event without usage leaves it as it was.
        if let Some(u) = r.usage_metadata {
            self.usage = u.into();
        }
        if r.prompt_feedback.and_then(|f| f.block_reason).is_some() {
            self.finish = Some(FinishReason::ContentFilter);
        }
        let mut delta = Delta::default();
        if !self.sent_id {
            delta.id = r.response_id.filter(|v| !v.is_empty()).map(Cow::into_owned);
            self.sent_id = delta.id.is_some();
        }
        if !self.sent_model {
            delta.model = r.model_version.filter(|v| !v.is_empty()).map(Cow::into_owned);
            self.sent_model = delta.model.is_some();
        }
        // Only the first candidate is followed (we never ask for more).
        if let Some(c) = r.candidates.into_iter().find(|c| c.index.unwrap_or(0) == 0) {
            for part in c.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(call) = part.function_call {
                    let index = self.tool_calls;
                    self.tool_calls = self.tool_calls.saturating_add(1);
                    let id = call.id.filter(|id| !id.is_empty());
                    delta.tool_calls.push(ToolCallDelta {
                        index,
                        id: id.unwrap_or_else(|| format!("{}_{index}", self.id_prefix)),
                        name: call.name,
                        arguments_delta: call.args.unwrap_or_else(|| json!({})).to_string(),
                    });
                }
                if let Some(text) = part.text {
                    if part.thought {
                        delta.reasoning.push_str(&text);
                    } else {
                        delta.content.push_str(&text);
                    }
                }
            }
            if let Some(reason) = c.finish_reason {
                self.finish = Some(finish_reason(&reason, c.finish_message.as_deref())?);
            }
        }
        let informative = delta.id.is_some() || delta.model.is_some();
        if !delta.has_output() && (self.started || !informative) {
            return Ok(None);
        }
        self.started = true;
        Ok(Some(delta))
    }

    /// The final delta, once the answer is known to be whole.
    fn end(&mut self) -> Result<Delta, ProviderError> {
        let Some(mut reason) = self.finish else {
            return Err(ProviderError::Stream("upstream closed the stream before a finishReason".into()));
        };
        // Gemini says STOP when the model called a function.
        if reason == FinishReason::Stop && self.tool_calls > 0 {
            reason = FinishReason::ToolCalls;
        }
        Ok(Delta { finish: Some(Finish { reason: Some(reason), usage: self.usage }), ..Delta::default() })
    }
}

impl Translate for Translator {
    fn event(&mut self, event: Event<'_>) -> Result<Option<Delta>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(None);
        }
        self.response(sse::json(data)?)
    }

    fn eof(&mut self) -> Result<Option<Delta>, ProviderError> {
        self.end().map(Some)
    }
}

/// CONTRACT.md section 4: a reason not listed there is an error, never a
/// silent STOP (MALFORMED_FUNCTION_CALL, OTHER, LANGUAGE, … end an answer
/// that is not one).
fn finish_reason(reason: &str, message: Option<&str>) -> Result<FinishReason, ProviderError> {
    Ok(match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        other => {
            let detail = message.map(|m| format!(": {m}")).unwrap_or_default();
            return Err(ProviderError::Upstream {
                kind: "finish_reason".into(),
                message: format!("the answer ended with finishReason {other}{detail}"),
            });
        }
    })
}

/// An `{"error": {"code", "message", "status"}}` event. Gemini's
/// INVALID_ARGUMENT is the caller's error, as a 400 would be.
fn upstream_error(error: &Value) -> ProviderError {
    let status = error.get("status").and_then(Value::as_str).unwrap_or("error");
    let message = error.get("message").and_then(Value::as_str).unwrap_or("error event");
    match status {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" => ProviderError::invalid_request(message),
        _ => ProviderError::Upstream { kind: status.to_owned(), message: message.to_owned() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Tool, ToolCall};

    fn ev(data: &str) -> Event<'_> {
        Event { event: "message", data }
    }

    fn translator() -> Translator {
        Translator::with_id_prefix("call_t".into())
    }

    #[test]
    fn text_reasoning_and_cumulative_usage() {
        let mut t = translator();
        let d = t
            .event(ev(r#"{"candidates":[{"content":{"parts":[{"text":"Let me think","thought":true}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":9,"thoughtsTokenCount":4,"totalTokenCount":13},"modelVersion":"gemini-2.5-flash","responseId":"r1"}"#))
            .unwrap()
            .unwrap();
        assert_eq!((d.id.as_deref(), d.model.as_deref()), (Some("r1"), Some("gemini-2.5-flash")));
        assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("Let me think", ""));
        // No usage in this event: the last one stands.
        let d = t
            .event(ev(r#"{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"}}],"modelVersion":"gemini-2.5-flash","responseId":"r1"}"#))
            .unwrap()
            .unwrap();
        assert_eq!((d.content.as_str(), d.id.as_deref(), d.model.as_deref()), ("Hi", None, None));
        // The last event: only the finish reason and usage.
        assert!(
            t.event(ev(r#"{"candidates":[{"content":{"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":2,"thoughtsTokenCount":4,"cachedContentTokenCount":3,"totalTokenCount":15}}"#))
                .unwrap()
                .is_none()
        );
        let f = t.eof().unwrap().unwrap().finish.unwrap();
        assert_eq!(f.reason, Some(FinishReason::Stop));
        assert_eq!(
            f.usage,
            Usage { input_tokens: 9, output_tokens: 6, cached_input_tokens: 3, reasoning_tokens: 4 }
        );
    }

    #[test]
    fn function_calls_get_ids_and_stop_means_tool_calls() {
        let mut t = translator();
        let d = t
            .event(ev(r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"get","args":{"city":"Oslo"}},"thoughtSignature":"c2ln"},{"functionCall":{"name":"get","args":{"city":"Paris"}}}],"role":"model"},"finishReason":"STOP"}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(
            d.tool_calls,
            vec![
                ToolCallDelta {
                    index: 0,
                    id: "call_t_0".into(),
                    name: "get".into(),
                    arguments_delta: r#"{"city":"Oslo"}"#.into()
                },
                ToolCallDelta {
                    index: 1,
                    id: "call_t_1".into(),
                    name: "get".into(),
                    arguments_delta: r#"{"city":"Paris"}"#.into()
                },
            ]
        );
        assert_eq!(t.eof().unwrap().unwrap().finish.unwrap().reason, Some(FinishReason::ToolCalls));
        // Production ids differ per answer.
        assert_ne!(Translator::new().id_prefix, Translator::new().id_prefix);
    }

    #[test]
    fn blocked_prompt_and_filters_are_content_filter() {
        let mut t = translator();
        let d = t.event(ev(r#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7},"modelVersion":"gemini-x"}"#)).unwrap();
        assert!(d.is_some_and(|d| d.model.as_deref() == Some("gemini-x") && d.content.is_empty()));
        let f = t.eof().unwrap().unwrap().finish.unwrap();
        assert_eq!((f.reason, f.usage.input_tokens), (Some(FinishReason::ContentFilter), 7));
        for reason in ["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"] {
            assert_eq!(finish_reason(reason, None).unwrap(), FinishReason::ContentFilter);
        }
        assert_eq!(finish_reason("MAX_TOKENS", None).unwrap(), FinishReason::Length);
    }

    #[test]
    fn unknown_finish_reason_and_early_eof_are_errors() {
        let mut t = translator();
        let e = t
            .event(ev(r#"{"candidates":[{"content":{"parts":[{"text":""}]},"finishReason":"MALFORMED_FUNCTION_CALL","finishMessage":"bad call"}]}"#))
            .unwrap_err();
        assert!(e.to_string().contains("MALFORMED_FUNCTION_CALL: bad call"), "{e}");
        assert!(e.retryable());
        let mut t = translator();
        t.event(ev(r#"{"candidates":[{"content":{"parts":[{"text":"half"}]}}]}"#)).unwrap();
        assert!(matches!(t.eof(), Err(ProviderError::Stream(_))));
    }

    #[test]
    fn only_candidate_zero_and_error_events() {
        let mut t = translator();
        let d = t
            .event(ev(r#"{"candidates":[{"index":1,"content":{"parts":[{"text":"other"}]}},{"index":0,"content":{"parts":[{"text":"mine"}]}}]}"#))
            .unwrap()
            .unwrap();
        assert_eq!(d.content, "mine");
        let e = t
            .event(ev(r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#))
            .unwrap_err();
        assert!(matches!(e, ProviderError::Upstream { ref kind, .. } if kind == "UNAVAILABLE"));
        assert!(e.retryable());
        let e =
            t.event(ev(r#"{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}"#)).unwrap_err();
        assert!(e.is_invalid_request() && !e.retryable());
    }

    #[test]
    fn unary_answer() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"thinking","thought":true},{"text":"Hello"}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"thoughtsTokenCount":2},"modelVersion":"g","responseId":"u1"}"#;
        let out = unary_deltas(body, translator());
        let first = out[0].as_ref().unwrap();
        assert_eq!((first.content.as_str(), first.reasoning.as_str()), ("Hello", "thinking"));
        let f = out[1].as_ref().unwrap().finish.unwrap();
        assert_eq!((f.usage.input_tokens, f.usage.output_tokens), (3, 3));
        assert!(unary_deltas(b"{}", translator())[0].is_err(), "no finishReason");
        assert!(unary_deltas(b"not json", translator())[0].is_err());
    }

    #[test]
    fn request_body() {
        let mut assistant = Message::new(Role::Assistant, "");
        assistant.tool_calls = vec![
            ToolCall { id: "c1".into(), name: "get".into(), arguments_json: r#"{"city":"Oslo"}"#.into() },
            ToolCall { id: "c2".into(), name: "time".into(), arguments_json: "{}".into() },
        ];
        let mut r1 = Message::new(Role::Tool, "-3C");
        r1.tool_call_id = "c1".into();
        let mut r2 = Message::new(Role::Tool, r#"{"hour":9}"#);
        r2.tool_call_id = "c2".into();
        let req = ChatRequest {
            messages: vec![
                Message::new(Role::System, "be brief"),
                Message::new(Role::User, "q"),
                assistant,
                r1,
                r2,
                Message::new(Role::User, "thanks"),
            ],
            max_tokens: Some(10),
            temperature: Some(0.5),
            top_p: Some(0.25),
            stop: vec!["END".into()],
            seed: Some(7),
            tools: vec![
                Tool {
                    name: "get".into(),
                    description: "d".into(),
                    parameters: json!({"type":"object","properties":{"city":{"type":"string"}}}),
                },
                Tool {
                    name: "time".into(),
                    description: "t".into(),
                    parameters: json!({"type":"object","properties":{}}),
                },
            ],
            tool_choice: ToolChoice::Named("get".into()),
            response_format: ResponseFormat::JsonSchema {
                name: "r".into(),
                schema: json!({"type":"object"}),
                strict: true,
            },
            ..ChatRequest::default()
        };
        let b = body(&req, Some(&ReasoningConfig { budget_tokens: Some(512) })).unwrap();
        assert_eq!(b["systemInstruction"], json!({"parts": [{"text": "be brief"}]}));
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "q"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get", "args": {"city": "Oslo"}}},
                    {"functionCall": {"name": "time", "args": {}}},
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get", "response": {"output": "-3C"}}},
                    {"functionResponse": {"name": "time", "response": {"hour": 9}}},
                ]},
                {"role": "user", "parts": [{"text": "thanks"}]},
            ])
        );
        let g = &b["generationConfig"];
        assert_eq!(g["maxOutputTokens"], 10);
        assert_eq!(g["temperature"], 0.5);
        assert_eq!(g["topP"], 0.25);
        assert_eq!(g["stopSequences"], json!(["END"]));
        assert_eq!(g["seed"], 7);
        assert_eq!(g["responseMimeType"], "application/json");
        assert_eq!(g["responseSchema"], json!({"type": "object"}));
        assert_eq!(g["thinkingConfig"], json!({"includeThoughts": true, "thinkingBudget": 512}));
        let decls = &b["tools"][0]["functionDeclarations"];
        assert_eq!(decls[0]["parameters"]["properties"]["city"]["type"], "string");
        assert!(decls[1].get("parameters").is_none(), "no empty OBJECT schema: {decls}");
        assert_eq!(
            b["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get"]}})
        );
        // Nothing set, nothing sent.
        let plain = body(
            &ChatRequest { messages: vec![Message::new(Role::User, "hi")], ..ChatRequest::default() },
            None,
        )
        .unwrap();
        assert_eq!(plain, json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}));
    }

    #[test]
    fn refuses_what_it_cannot_carry() {
        let field = |req: ChatRequest| match body(&req, None) {
            Err(ProviderError::Unsupported { field, .. }) => field,
            other => panic!("accepted: {other:?}"),
        };
        let mut named = Message::new(Role::User, "hi");
        named.name = "bob".into();
        assert_eq!(
            field(ChatRequest { messages: vec![named], ..ChatRequest::default() }),
            "messages[0].name"
        );
        let mut orphan = Message::new(Role::Tool, "1");
        orphan.tool_call_id = "nope".into();
        assert_eq!(
            field(ChatRequest { messages: vec![orphan.clone()], ..ChatRequest::default() }),
            "messages[0].tool_call_id"
        );
        // A tool message that names its function needs no history.
        orphan.name = "f".into();
        let b = body(&ChatRequest { messages: vec![orphan], ..ChatRequest::default() }, None).unwrap();
        assert_eq!(b["contents"][0]["parts"][0]["functionResponse"]["name"], "f");
        assert_eq!(
            field(ChatRequest {
                messages: vec![Message::new(Role::User, "hi")],
                seed: Some(1 << 40),
                ..ChatRequest::default()
            }),
            "seed"
        );
        let mut bad = Message::new(Role::Assistant, "");
        bad.tool_calls = vec![ToolCall { id: "c".into(), name: "f".into(), arguments_json: "[1]".into() }];
        assert_eq!(
            field(ChatRequest { messages: vec![bad], ..ChatRequest::default() }),
            "messages[0].tool_calls[0].arguments_json"
        );
    }

    #[test]
    fn urls() {
        let config: ProviderConfig = serde_json::from_value(json!({
            "kind": "gemini", "base_url": "http://h:1/v1beta/",
        }))
        .unwrap();
        let g = Gemini::new("g", &config).unwrap();
        assert_eq!(
            g.url("gemini-2.5-flash", "generateContent"),
            "http://h:1/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(g.url("tunedModels/my model", "x"), "http://h:1/v1beta/tunedModels/my%20model:x");
    }
}
