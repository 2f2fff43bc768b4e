//! An OpenAI Chat Completions request body to the gateway's [`ChatRequest`].
//! Every error names the field at fault, as a path (`messages[2].content`).
//! What the gateway cannot honour is refused (400) rather than dropped;
//! hints that never change an answer are ignored, as OpenAI-compatible
//! servers do; a few fields are accepted at their default value only. The
//! README lists each.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, de::IgnoredAny};
use serde_json::Value;

use crate::{
    chat::{ChatRequest, Message, ResponseFormat, Role, Tool, ToolCall, ToolChoice},
    core::{CallError, Validated, WireRequest, validate},
};

/// A field that is read and thrown away.
type Ignored = Option<IgnoredAny>;

/// The body, parsed as JSON but not yet checked: the call core asks for the
/// check ([`WireRequest::into_chat`]) once the key and model are known good.
pub struct ChatCompletionRequest {
    body: Value,
    model: String,
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatCompletionRequest {
    /// Parses the body as JSON: the one check made before the key's.
    pub fn parse(body: &[u8]) -> Result<Self, CallError> {
        let body: Value = serde_json::from_slice(body)
            .map_err(|e| CallError::invalid("body", format!("is not a JSON object: {e}")))?;
        if !body.is_object() {
            return Err(CallError::invalid("body", "is not a JSON object"));
        }
        // The typed read in `into_chat` reports a wrong type; here only what
        // the front door must know first.
        let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self { body, model, stream, include_usage })
    }
}

impl WireRequest for ChatCompletionRequest {
    fn model(&self) -> &str {
        &self.model
    }

    fn into_chat(self) -> Result<Validated, CallError> {
        let body: Body = serde_path_to_error::deserialize(self.body).map_err(shape_error)?;
        body.into_chat()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(rename = "model")]
    _model: String,
    messages: Vec<InMessage>,
    #[serde(default, rename = "stream")]
    _stream: Option<bool>,
    #[serde(default, rename = "stream_options")]
    _stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    response_format: Option<InResponseFormat>,
    #[serde(default)]
    user: Option<String>,
    /// OpenAI's newer name for `user`'s purpose; `user` wins.
    #[serde(default)]
    safety_identifier: Option<String>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,

    // Accepted at their default only: the gateway cannot honour other values.
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    logit_bias: Option<HashMap<String, Value>>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    modalities: Option<Vec<String>>,

    // Refused unless null: they ask for what the gateway does not do.
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    functions: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<Value>,
    #[serde(default)]
    verbosity: Option<Value>,
    #[serde(default)]
    web_search_options: Option<Value>,

    // Ignored: hints about storage, billing, caching or speed that never
    // change the answer.
    #[serde(default, rename = "store")]
    _store: Ignored,
    #[serde(default, rename = "service_tier")]
    _service_tier: Ignored,
    #[serde(default, rename = "prompt_cache_key")]
    _prompt_cache_key: Ignored,
    #[serde(default, rename = "prediction")]
    _prediction: Ignored,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default, rename = "include_usage")]
    _include_usage: Option<bool>,
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Ignored,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    audio: Option<Value>,
    #[serde(default)]
    function_call: Option<Value>,
    // What a client sends back of an earlier answer: no meaning upstream.
    #[serde(default, rename = "refusal")]
    _refusal: Ignored,
    #[serde(default, rename = "annotations")]
    _annotations: Ignored,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: InFunctionCall,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InFunctionCall {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: InFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default, rename = "strict")]
    _strict: Ignored,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<InJsonSchema>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InJsonSchema {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
    #[serde(default, rename = "description")]
    _description: Ignored,
}

/// A deserialization error as the field it names; an unknown field is one
/// this gateway does not support.
fn shape_error(e: serde_path_to_error::Error<serde_json::Error>) -> CallError {
    let path = e.path().to_string();
    let message = e.inner().to_string();
    // The path of an unknown field already ends with it; a missing one's does not.
    let join = |name: &str| match path.as_str() {
        "." => name.to_owned(),
        p if p == name || p.ends_with(&format!(".{name}")) => p.to_owned(),
        p => format!("{p}.{name}"),
    };
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_owned);
    if message.starts_with("unknown field")
        && let Some(name) = quoted(&message)
    {
        return CallError::invalid(join(&name), "is not supported by this gateway");
    }
    if message.starts_with("missing field")
        && let Some(name) = quoted(&message)
    {
        return CallError::invalid(join(&name), "is required");
    }
    let field = if path == "." { "body".to_owned() } else { path };
    CallError::invalid(field, message)
}

fn refuse_unless_null(field: &str, v: &Option<Value>) -> Result<(), CallError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(CallError::invalid(field, "is not supported by this gateway")),
    }
}

impl Body {
    fn into_chat(self) -> Result<Validated, CallError> {
        self.defaults_only()?;
        validate::messages(self.messages.len())?;
        let (max_tokens, max_tokens_field) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(CallError::invalid("max_tokens", "differs from max_completion_tokens; send one"));
            }
            (Some(a), _) => (Some(a), "max_completion_tokens"),
            (None, b) => (b, "max_tokens"),
        };
        let stop = stop(self.stop)?;
        validate::sampling(max_tokens, max_tokens_field, self.temperature, self.top_p, &stop)?;
        let tags = self.metadata.unwrap_or_default();
        validate::metadata(&tags)?;

        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            messages.push(message(i, m)?);
        }
        let in_tools = self.tools.unwrap_or_default();
        validate::tools(in_tools.len())?;
        let mut tools = Vec::with_capacity(in_tools.len());
        let mut names = HashSet::with_capacity(in_tools.len());
        for (i, t) in in_tools.into_iter().enumerate() {
            tools.push(tool(i, t, &mut names)?);
        }
        let tool_choice = tool_choice(self.tool_choice, &tools)?;
        let response_format = response_format(self.response_format)?;
        let request = ChatRequest {
            messages,
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop,
            seed: self.seed,
            tools,
            tool_choice,
            response_format,
            user: self.user.or(self.safety_identifier).unwrap_or_default(),
            // The call core sets it from the endpoint's use (whole or streamed).
            unary: false,
        };
        Ok(Validated { request, tags })
    }

    /// Fields the gateway takes only at the value that changes nothing.
    fn defaults_only(&self) -> Result<(), CallError> {
        let not = |field: &str, default: &str| {
            Err(CallError::invalid(field, format!("only {default} is supported by this gateway")))
        };
        if self.n.is_some_and(|n| n != 1) {
            return not("n", "1");
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return not("presence_penalty", "0");
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return not("frequency_penalty", "0");
        }
        if self.logprobs == Some(true) {
            return not("logprobs", "false");
        }
        if self.top_logprobs.is_some_and(|n| n != 0) {
            return not("top_logprobs", "0");
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return not("logit_bias", "{}");
        }
        if self.parallel_tool_calls == Some(false) {
            return not("parallel_tool_calls", "true");
        }
        if self.modalities.as_ref().is_some_and(|m| m.iter().any(|m| m != "text")) {
            return not("modalities", "[\"text\"]");
        }
        refuse_unless_null("audio", &self.audio)?;
        refuse_unless_null("functions", &self.functions)?;
        refuse_unless_null("function_call", &self.function_call)?;
        refuse_unless_null("reasoning_effort", &self.reasoning_effort)?;
        refuse_unless_null("verbosity", &self.verbosity)?;
        refuse_unless_null("web_search_options", &self.web_search_options)
    }
}

/// `stop`: a string, a list of strings, or null.
fn stop(v: Option<Value>) -> Result<Vec<String>, CallError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(CallError::invalid(format!("stop[{i}]"), "must be a string")),
            })
            .collect(),
        Some(_) => Err(CallError::invalid("stop", "must be a string or a list of strings")),
    }
}

fn message(i: usize, m: InMessage) -> Result<Message, CallError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(CallError::invalid(
                at("role"),
                format!("{other:?} is not \"system\", \"developer\", \"user\", \"assistant\" or \"tool\""),
            ));
        }
    };
    refuse_unless_null(&at("audio"), &m.audio)?;
    refuse_unless_null(&at("function_call"), &m.function_call)?;
    let tool_call_id = m.tool_call_id.unwrap_or_default();
    if role == Role::Tool && tool_call_id.is_empty() {
        return Err(CallError::invalid(at("tool_call_id"), "is required for a \"tool\" message"));
    }
    let in_calls = m.tool_calls.unwrap_or_default();
    if role != Role::Assistant && !in_calls.is_empty() {
        return Err(CallError::invalid(at("tool_calls"), "only \"assistant\" messages carry tool calls"));
    }
    let mut tool_calls = Vec::with_capacity(in_calls.len());
    for (j, c) in in_calls.into_iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].tool_calls[{j}].{field}");
        if c.kind != "function" {
            return Err(CallError::invalid(at("type"), "only \"function\" is supported"));
        }
        if c.id.is_empty() {
            return Err(CallError::invalid(at("id"), "must not be empty"));
        }
        if c.function.name.is_empty() {
            return Err(CallError::invalid(at("function.name"), "must not be empty"));
        }
        if let Err(e) = serde_json::from_str::<Value>(&c.function.arguments) {
            return Err(CallError::invalid(at("function.arguments"), format!("is not valid JSON: {e}")));
        }
        tool_calls.push(ToolCall { id: c.id, name: c.function.name, arguments_json: c.function.arguments });
    }
    let content = match m.content {
        None | Some(Value::Null) if role == Role::Assistant => String::new(),
        None | Some(Value::Null) => return Err(CallError::invalid(at("content"), "is required")),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => text_parts(i, parts)?,
        Some(_) => {
            return Err(CallError::invalid(at("content"), "must be a string or a list of content parts"));
        }
    };
    Ok(Message { role, content, name: m.name.unwrap_or_default(), tool_calls, tool_call_id })
}

/// Content parts: text only (joined by newlines); an assistant's earlier
/// `refusal` part says nothing to the model and is skipped.
fn text_parts(i: usize, parts: Vec<Value>) -> Result<String, CallError> {
    let mut text = String::new();
    for (j, part) in parts.into_iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].content[{j}].{field}");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                let Some(t) = part.get("text").and_then(Value::as_str) else {
                    return Err(CallError::invalid(at("text"), "is required and must be a string"));
                };
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            Some("refusal") => {}
            Some(other) => {
                return Err(CallError::invalid(
                    at("type"),
                    format!("{other:?} is not supported by this gateway (text only)"),
                ));
            }
            None => return Err(CallError::invalid(at("type"), "is required")),
        }
    }
    Ok(text)
}

fn tool(i: usize, t: InTool, names: &mut HashSet<String>) -> Result<Tool, CallError> {
    let at = |field: &str| format!("tools[{i}].{field}");
    if t.kind != "function" {
        return Err(CallError::invalid(at("type"), "only \"function\" is supported"));
    }
    validate::tool_name(&t.function.name, names).map_err(|m| CallError::invalid(at("function.name"), m))?;
    let parameters = match t.function.parameters {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(CallError::invalid(at("function.parameters"), "must be a JSON object")),
    };
    Ok(Tool { name: t.function.name, description: t.function.description.unwrap_or_default(), parameters })
}

/// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": …}}`.
fn tool_choice(v: Option<Value>, tools: &[Tool]) -> Result<ToolChoice, CallError> {
    let choice = match &v {
        None | Some(Value::Null) => ToolChoice::Unset,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(CallError::invalid(
                    "tool_choice",
                    format!("{other:?} is not \"none\", \"auto\", \"required\" or a named function"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Named(name.to_owned()),
                _ => {
                    return Err(CallError::invalid(
                        "tool_choice",
                        "an object must be {\"type\": \"function\", \"function\": {\"name\": …}}",
                    ));
                }
            }
        }
        Some(_) => return Err(CallError::invalid("tool_choice", "must be a string or an object")),
    };
    match &choice {
        ToolChoice::Required if tools.is_empty() => {
            Err(CallError::invalid("tool_choice", "\"required\" needs at least one tool in `tools`"))
        }
        ToolChoice::Named(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(CallError::invalid("tool_choice", format!("{name:?} is not the name of a tool in `tools`")))
        }
        _ => Ok(choice),
    }
}

fn response_format(f: Option<InResponseFormat>) -> Result<ResponseFormat, CallError> {
    let Some(f) = f else { return Ok(ResponseFormat::Text) };
    Ok(match f.kind.as_str() {
        "text" => ResponseFormat::Text,
        "json_object" => ResponseFormat::JsonObject,
        "json_schema" => {
            let Some(s) = f.json_schema else {
                return Err(CallError::invalid(
                    "response_format.json_schema",
                    "is required for \"json_schema\"",
                ));
            };
            let schema = match s.schema {
                Some(v @ Value::Object(_)) => v,
                _ => {
                    return Err(CallError::invalid(
                        "response_format.json_schema.schema",
                        "is required and must be a JSON object",
                    ));
                }
            };
            let name = s.name.filter(|n| !n.is_empty()).unwrap_or_else(|| "response".to_owned());
            ResponseFormat::JsonSchema { name, schema, strict: s.strict.unwrap_or(false) }
        }
        other => {
            return Err(CallError::invalid(
                "response_format.type",
                format!("{other:?} is not \"text\", \"json_object\" or \"json_schema\""),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chat(body: Value) -> Result<Validated, CallError> {
        ChatCompletionRequest::parse(body.to_string().as_bytes())?.into_chat()
    }

    fn field(body: Value) -> String {
        match chat(body) {
            Err(CallError::InvalidArgument { field, .. }) => field,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    fn base() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(key: &str, v: Value) -> Value {
        let mut b = base();
        b[key] = v;
        b
    }

    #[test]
    fn translates_a_full_request() {
        let v = chat(json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "please"}]},
                {"role": "user", "content": "weather?", "name": "ann"},
                {"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"city\":\"Oslo\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
            ],
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}, "strict": true}}],
            "tool_choice": {"type": "function", "function": {"name": "get"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
            "max_completion_tokens": 50, "temperature": 0.5, "top_p": 1, "stop": "END", "seed": 7,
            "user": "u1", "metadata": {"team": "a"}, "n": 1, "store": false, "presence_penalty": 0,
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        let r = v.request;
        assert_eq!(r.messages[0].role, Role::System);
        assert_eq!(r.messages[0].content, "be brief\nplease");
        assert_eq!(r.messages[1].name, "ann");
        assert_eq!(r.messages[2].tool_calls[0].arguments_json, "{\"city\":\"Oslo\"}");
        assert_eq!(r.messages[3].tool_call_id, "c1");
        assert_eq!(r.tool_choice, ToolChoice::Named("get".into()));
        assert!(matches!(r.response_format, ResponseFormat::JsonSchema { strict: true, .. }));
        assert_eq!((r.max_tokens, r.seed, r.stop.as_slice()), (Some(50), Some(7), &["END".to_owned()][..]));
        assert_eq!(r.user, "u1");
        assert_eq!(v.tags["team"], "a");
    }

    #[test]
    fn names_the_field() {
        assert_eq!(field(with("temperature", json!(3))), "temperature");
        assert_eq!(field(with("temperature", json!("hot"))), "temperature");
        assert_eq!(field(with("max_completion_tokens", json!(0))), "max_completion_tokens");
        assert_eq!(field(with("stop", json!(["a", 1]))), "stop[1]");
        assert_eq!(field(with("logit_bias", json!({"1": 2}))), "logit_bias");
        assert_eq!(field(with("n", json!(2))), "n");
        assert_eq!(field(with("reasoning_effort", json!("high"))), "reasoning_effort");
        assert_eq!(field(with("top_k", json!(3))), "top_k");
        assert_eq!(field(with("messages", json!([]))), "messages");
        assert_eq!(field(with("messages", json!([{"role": "user"}]))), "messages[0].content");
        assert_eq!(field(with("messages", json!([{"role": "robot", "content": "x"}]))), "messages[0].role");
        assert_eq!(
            field(with("messages", json!([{"role": "user", "content": "x", "colour": 1}]))),
            "messages[0].colour"
        );
        assert_eq!(
            field(with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
            )),
            "messages[0].content[0].type"
        );
        assert_eq!(
            field(with(
                "messages",
                json!([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}])
            )),
            "messages[0].tool_calls[0].function.arguments"
        );
        assert_eq!(
            field(with("messages", json!([{"role": "tool", "content": "x"}]))),
            "messages[0].tool_call_id"
        );
        assert_eq!(
            field(with("tools", json!([{"type": "function", "function": {"name": "a b"}}]))),
            "tools[0].function.name"
        );
        assert_eq!(field(with("tools", json!([{"type": "function"}]))), "tools[0].function");
        assert_eq!(field(with("tool_choice", json!("required"))), "tool_choice");
        assert_eq!(field(with("response_format", json!({"type": "yaml"}))), "response_format.type");
        assert_eq!(
            field(with("response_format", json!({"type": "json_schema", "json_schema": {"name": "x"}}))),
            "response_format.json_schema.schema"
        );
        let mut b = base();
        b["max_tokens"] = json!(5);
        b["max_completion_tokens"] = json!(6);
        assert_eq!(field(b), "max_tokens");
        let no_model = json!({"messages": []});
        assert_eq!(field(no_model), "model");
    }

    #[test]
    fn reads_what_the_front_door_needs_first() {
        let r = ChatCompletionRequest::parse(
            br#"{"model": "m", "stream": true, "stream_options": {"include_usage": true}}"#,
        )
        .unwrap();
        assert_eq!((r.model(), r.stream, r.include_usage), ("m", true, true));
        assert!(matches!(ChatCompletionRequest::parse(b"{nope"), Err(CallError::InvalidArgument { .. })));
        assert!(matches!(ChatCompletionRequest::parse(b"[]"), Err(CallError::InvalidArgument { .. })));
    }
}
