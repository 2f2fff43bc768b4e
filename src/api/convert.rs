//! Generated proto types to the gateway's own, with validation that names the
//! field at fault (the value checks are the call core's, `core::validate`),
//! and answers back to proto messages. The proto types stop here.

use std::collections::{HashMap, HashSet};

use super::pb;
use crate::{
    chat::{ChatRequest, Delta, FinishReason, Message, ResponseFormat, Role, Tool, ToolCall, ToolChoice},
    core::{CallError, Validated, WireRequest, validate},
};

/// The fields both request messages share.
pub struct RequestParts {
    pub model: String,
    pub messages: Vec<pb::ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub tools: Vec<pb::Tool>,
    pub tool_choice: String,
    pub response_format: Option<pb::ResponseFormat>,
    pub user: String,
    pub metadata: HashMap<String, String>,
}

macro_rules! parts_from {
    ($t:ty) => {
        impl From<$t> for RequestParts {
            fn from(r: $t) -> Self {
                Self {
                    model: r.model,
                    messages: r.messages,
                    max_tokens: r.max_tokens,
                    temperature: r.temperature,
                    top_p: r.top_p,
                    stop: r.stop,
                    seed: r.seed,
                    tools: r.tools,
                    tool_choice: r.tool_choice,
                    response_format: r.response_format,
                    user: r.user,
                    metadata: r.metadata,
                }
            }
        }
    };
}
parts_from!(pb::CompletionRequest);
parts_from!(pb::StreamCompletionRequest);

impl WireRequest for RequestParts {
    fn model(&self) -> &str {
        &self.model
    }

    fn into_chat(self) -> Result<Validated, CallError> {
        let (request, tags) = chat_request(self)?;
        Ok(Validated { request, tags })
    }
}

/// Checks a request and turns it into a [`ChatRequest`].
pub fn chat_request(p: RequestParts) -> Result<(ChatRequest, HashMap<String, String>), CallError> {
    if p.model.is_empty() {
        return Err(CallError::invalid("model", "must name a configured model"));
    }
    validate::messages(p.messages.len())?;
    validate::sampling(p.max_tokens, "max_tokens", p.temperature, p.top_p, &p.stop)?;
    validate::metadata(&p.metadata)?;

    let mut messages = Vec::with_capacity(p.messages.len());
    for (i, m) in p.messages.into_iter().enumerate() {
        messages.push(message(i, m)?);
    }
    validate::tools(p.tools.len())?;
    let mut tools = Vec::with_capacity(p.tools.len());
    let mut names = HashSet::with_capacity(p.tools.len());
    for (i, t) in p.tools.into_iter().enumerate() {
        validate::tool_name(&t.name, &mut names)
            .map_err(|m| CallError::invalid(format!("tools[{i}].name"), m))?;
        tools.push(tool(i, t)?);
    }
    let tool_choice = match p.tool_choice.as_str() {
        "" => ToolChoice::Unset,
        "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "required" if !tools.is_empty() => ToolChoice::Required,
        name if tools.iter().any(|t| t.name == name) => ToolChoice::Named(name.to_owned()),
        other => {
            return Err(CallError::invalid(
                "tool_choice",
                format!(
                    "{other:?} is not \"\", \"auto\", \"none\", \"required\" or the name of a tool in `tools`"
                ),
            ));
        }
    };
    let response_format = response_format(p.response_format)?;
    let request = ChatRequest {
        messages,
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_p: p.top_p,
        stop: p.stop,
        seed: p.seed,
        tools,
        tool_choice,
        response_format,
        user: p.user,
        unary: false,
    };
    Ok((request, p.metadata))
}

fn message(i: usize, m: pb::ChatMessage) -> Result<Message, CallError> {
    let role = match pb::Role::try_from(m.role) {
        Ok(pb::Role::System) => Role::System,
        Ok(pb::Role::User) => Role::User,
        Ok(pb::Role::Assistant) => Role::Assistant,
        Ok(pb::Role::Tool) => Role::Tool,
        Ok(pb::Role::Unspecified) | Err(_) => {
            return Err(CallError::invalid(
                format!("messages[{i}].role"),
                "must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL",
            ));
        }
    };
    if role == Role::Tool && m.tool_call_id.is_empty() {
        return Err(CallError::invalid(format!("messages[{i}].tool_call_id"), "is required for ROLE_TOOL"));
    }
    if role != Role::Assistant && !m.tool_calls.is_empty() {
        return Err(CallError::invalid(
            format!("messages[{i}].tool_calls"),
            "only ROLE_ASSISTANT messages carry tool calls",
        ));
    }
    let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
    for (j, c) in m.tool_calls.into_iter().enumerate() {
        if c.id.is_empty() || c.name.is_empty() {
            return Err(CallError::invalid(
                format!("messages[{i}].tool_calls[{j}]"),
                "id and name are required",
            ));
        }
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&c.arguments_json) {
            return Err(CallError::invalid(
                format!("messages[{i}].tool_calls[{j}].arguments_json"),
                format!("is not valid JSON: {e}"),
            ));
        }
        tool_calls.push(ToolCall { id: c.id, name: c.name, arguments_json: c.arguments_json });
    }
    Ok(Message { role, content: m.content, name: m.name, tool_calls, tool_call_id: m.tool_call_id })
}

/// A tool whose name `core::validate::tool_name` has checked.
fn tool(i: usize, t: pb::Tool) -> Result<Tool, CallError> {
    let parameters = if t.parameters_json.trim().is_empty() {
        serde_json::json!({"type": "object", "properties": {}})
    } else {
        validate::json_object(&t.parameters_json)
            .map_err(|m| CallError::invalid(format!("tools[{i}].parameters_json"), m))?
    };
    Ok(Tool { name: t.name, description: t.description, parameters })
}

fn response_format(f: Option<pb::ResponseFormat>) -> Result<ResponseFormat, CallError> {
    let Some(f) = f else { return Ok(ResponseFormat::Text) };
    use pb::response_format::Type;
    Ok(match Type::try_from(f.r#type) {
        Ok(Type::Unspecified | Type::Text) => ResponseFormat::Text,
        Ok(Type::JsonObject) => ResponseFormat::JsonObject,
        Ok(Type::JsonSchema) => {
            let schema = validate::json_object(&f.schema_json)
                .map_err(|m| CallError::invalid("response_format.schema_json", m))?;
            let name = if f.schema_name.is_empty() { "response".to_owned() } else { f.schema_name };
            ResponseFormat::JsonSchema { name, schema, strict: f.strict }
        }
        Err(_) => {
            return Err(CallError::invalid("response_format.type", format!("unknown value {}", f.r#type)));
        }
    })
}

pub fn finish_reason(r: Option<FinishReason>) -> pb::FinishReason {
    match r {
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::ToolCalls) => pb::FinishReason::ToolCalls,
        Some(FinishReason::ContentFilter) => pb::FinishReason::ContentFilter,
        None => pb::FinishReason::Unspecified,
    }
}

pub fn usage(u: crate::chat::Usage, cost_usd: f64) -> pb::Usage {
    pb::Usage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        total_tokens: u.total(),
        cost_usd,
        cached_input_tokens: u.cached_input_tokens,
        reasoning_tokens: u.reasoning_tokens,
    }
}

/// A delta as a stream message. Moves the text; nothing is copied.
pub fn stream_message(d: Delta, id: String) -> pb::StreamCompletionResponse {
    pb::StreamCompletionResponse {
        id,
        content: d.content,
        reasoning: d.reasoning,
        tool_calls: d
            .tool_calls
            .into_iter()
            .map(|c| pb::ToolCallDelta {
                index: c.index,
                id: c.id,
                name: c.name,
                arguments_delta: c.arguments_delta,
            })
            .collect(),
        finish_reason: d.finish.map(|f| finish_reason(f.reason)).unwrap_or_default() as i32,
        // The cost is the call's to fill in (`Call::cost_usd`).
        usage: d.finish.map(|f| usage(f.usage, 0.0)),
        model: String::new(),
        provider: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> RequestParts {
        pb::CompletionRequest {
            model: "m".into(),
            messages: vec![pb::ChatMessage {
                role: pb::Role::User as i32,
                content: "hi".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .into()
    }

    fn field(r: Result<(ChatRequest, HashMap<String, String>), CallError>) -> String {
        match r {
            Err(CallError::InvalidArgument { field, .. }) => field,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn names_the_field() {
        assert!(chat_request(parts()).is_ok());
        let mut p = parts();
        p.messages.clear();
        assert_eq!(field(chat_request(p)), "messages");
        let mut p = parts();
        p.temperature = Some(2.5);
        assert_eq!(field(chat_request(p)), "temperature");
        let mut p = parts();
        p.temperature = Some(f32::NAN);
        assert_eq!(field(chat_request(p)), "temperature");
        let mut p = parts();
        p.top_p = Some(-0.1);
        assert_eq!(field(chat_request(p)), "top_p");
        let mut p = parts();
        p.stop = vec!["a".into(); 5];
        assert_eq!(field(chat_request(p)), "stop");
        let mut p = parts();
        p.tools =
            vec![pb::Tool { name: "f".into(), description: String::new(), parameters_json: "{nope".into() }];
        assert_eq!(field(chat_request(p)), "tools[0].parameters_json");
        let mut p = parts();
        let t = pb::Tool { name: "f".into(), description: String::new(), parameters_json: String::new() };
        p.tools = vec![t.clone(), t];
        assert_eq!(field(chat_request(p)), "tools[1].name");
        let mut p = parts();
        p.tools = (0..129)
            .map(|i| pb::Tool {
                name: format!("f{i}"),
                description: String::new(),
                parameters_json: String::new(),
            })
            .collect();
        assert_eq!(field(chat_request(p)), "tools");
        let mut p = parts();
        p.tool_choice = "g".into();
        assert_eq!(field(chat_request(p)), "tool_choice");
        let mut p = parts();
        p.messages[0].role = 0;
        assert_eq!(field(chat_request(p)), "messages[0].role");
        let mut p = parts();
        p.max_tokens = Some(0);
        assert_eq!(field(chat_request(p)), "max_tokens");
        let mut p = parts();
        p.response_format =
            Some(pb::ResponseFormat { r#type: 3, schema_json: "[]".into(), ..Default::default() });
        assert_eq!(field(chat_request(p)), "response_format.schema_json");
    }
}
