//! The token estimate of a request, made before any upstream has seen it:
//! what admission reserves, and what `Usage` reports when an upstream sends
//! none. No tokenizer: one token per 4 bytes (rounded up) of every text the
//! model reads (message content, names, tool calls and their arguments,
//! tool names, descriptions and schemas, a JSON schema to answer in), plus 4
//! tokens of framing per message and 3 to prime the answer. Close to
//! OpenAI's own rule of thumb for English; settling with the real usage
//! corrects the rest.

use crate::chat::{ChatRequest, ResponseFormat};

/// Framing tokens around each message (role, separators).
const PER_MESSAGE: u64 = 4;
/// Tokens that start the assistant's answer.
const PRIMING: u64 = 3;
/// Framing tokens around each tool definition.
const PER_TOOL: u64 = 8;

fn text_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// The input tokens of `request`, estimated.
pub fn input_tokens(request: &ChatRequest) -> u32 {
    let mut tokens = PRIMING;
    for m in &request.messages {
        let mut bytes = m.content.len() + m.name.len() + m.tool_call_id.len();
        for call in &m.tool_calls {
            bytes += call.id.len() + call.name.len() + call.arguments_json.len();
        }
        tokens += PER_MESSAGE + text_tokens(bytes);
    }
    for tool in &request.tools {
        // The schema as the upstream receives it: compact JSON.
        let schema = serde_json::to_string(&tool.parameters).map(|s| s.len()).unwrap_or(0);
        tokens += PER_TOOL + text_tokens(tool.name.len() + tool.description.len() + schema);
    }
    if let ResponseFormat::JsonSchema { name, schema, .. } = &request.response_format {
        let schema = serde_json::to_string(schema).map(|s| s.len()).unwrap_or(0);
        tokens += PER_TOOL + text_tokens(name.len() + schema);
    }
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Output tokens streamed, estimated from the text (and tool-call
/// fragments) sent: for a call whose upstream gave no usage.
pub fn output_tokens(bytes: usize, deltas: u32) -> u32 {
    // A delta is rarely less than a token; a long one is several.
    u32::try_from(text_tokens(bytes)).unwrap_or(u32::MAX).max(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Message, Role, Tool};

    #[test]
    fn counts_bytes_over_four_and_framing() {
        let mut r = ChatRequest {
            messages: vec![Message::new(Role::System, "be brief"), Message::new(Role::User, "hello")],
            ..Default::default()
        };
        // 3 + (4 + 2) + (4 + 2)
        assert_eq!(input_tokens(&r), 15);
        r.tools.push(Tool {
            name: "get".into(),
            description: "gets".into(),
            parameters: serde_json::json!({"type": "object"}),
        });
        // schema {"type":"object"} is 17 bytes; 3 + 4 + 17 = 24 bytes = 6 tokens, + 8
        assert_eq!(input_tokens(&r), 15 + 14);
    }

    #[test]
    fn output_estimate_is_never_below_the_deltas() {
        assert_eq!(output_tokens(40, 3), 10);
        assert_eq!(output_tokens(4, 3), 3);
    }
}
