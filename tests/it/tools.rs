//! Tool calling through both wire formats: the tools, the choice and the
//! tool-call history go upstream translated; streamed call fragments come back
//! as `ToolCallDelta`s and, for Completion, as whole calls.

use llm_gateway::api::pb::{self, Role};
use serde_json::json;

use crate::{
    harness::{Gateway, WAIT, message, stream_call, within},
    upstream::{Reply, Upstream},
    wire::{anthropic, openai},
};

const SCHEMA: &str = r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#;

fn tool() -> pb::Tool {
    pb::Tool {
        name: "get_weather".into(),
        description: "Weather by city".into(),
        parameters_json: SCHEMA.into(),
    }
}

/// A conversation that already called the tool once and got its result.
fn history() -> Vec<pb::ChatMessage> {
    let mut assistant = message(Role::Assistant, "");
    assistant.tool_calls = vec![pb::ToolCall {
        id: "call_0".into(),
        name: "get_weather".into(),
        arguments_json: r#"{"city":"Oslo"}"#.into(),
    }];
    let mut result = message(Role::Tool, "-3C");
    result.tool_call_id = "call_0".into();
    vec![message(Role::User, "Weather in Oslo, then Paris?"), assistant, result]
}

fn completion(model: &str) -> pb::CompletionRequest {
    pb::CompletionRequest {
        model: model.into(),
        messages: history(),
        tools: vec![tool()],
        tool_choice: "get_weather".into(),
        ..Default::default()
    }
}

fn openai_tool_answer() -> Reply {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        openai::data(&json!({"id": "chatcmpl-t", "object": "chat.completion.chunk", "model": "gpt-t",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
    };
    Reply::events(&[
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}}]}),
            json!(null),
        ),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), json!(null)),
        chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), json!(null)),
        chunk(json!({}), json!("tool_calls")),
        openai::usage("chatcmpl-t", "gpt-t", 30, 12),
        openai::DONE.to_owned(),
    ])
}

fn anthropic_tool_answer() -> Reply {
    Reply::events(&[
        anthropic::message_start("msg_t", "claude-t", 40),
        anthropic::block_start(0),
        anthropic::text(0, "Let me check."),
        anthropic::block_stop(0),
        anthropic::event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 1,
                    "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}}),
        ),
        anthropic::event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
        ),
        anthropic::event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
        ),
        anthropic::block_stop(1),
        anthropic::message_delta("tool_use", 15),
        anthropic::message_stop(),
    ])
}

#[tokio::test]
async fn openai_tools_go_up_and_calls_come_back() {
    let up = Upstream::start(openai_tool_answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r = within(WAIT, "Completion", client.completion(completion("chat"))).await.expect("OK").into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::ToolCalls as i32);
    assert_eq!(
        r.tool_calls,
        [pb::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments_json: r#"{"city":"Paris"}"#.into()
        }]
    );

    let body = up.requests()[0].json();
    assert_eq!(
        body["tools"],
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather by city",
            "parameters": serde_json::from_str::<serde_json::Value>(SCHEMA).expect("schema")}}])
    );
    assert_eq!(body["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Weather in Oslo, then Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "content": "-3C", "tool_call_id": "call_0"},
        ])
    );
}

#[tokio::test]
async fn openai_tool_call_fragments_stream_as_deltas() {
    let up = Upstream::start(openai_tool_answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let c = completion("chat");
    let request = pb::StreamCompletionRequest {
        model: c.model,
        messages: c.messages,
        tools: c.tools,
        tool_choice: c.tool_choice,
        ..Default::default()
    };
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("OK");
    let deltas: Vec<&pb::ToolCallDelta> = got.messages.iter().flat_map(|m| &m.tool_calls).collect();
    assert_eq!(
        (deltas[0].index, deltas[0].id.as_str(), deltas[0].name.as_str()),
        (0, "call_1", "get_weather")
    );
    assert!(deltas.iter().all(|d| d.index == 0));
    let arguments: String = deltas.iter().map(|d| d.arguments_delta.as_str()).collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    let last = got.messages.last().expect("messages");
    assert_eq!(last.finish_reason, pb::FinishReason::ToolCalls as i32);
}

#[tokio::test]
async fn anthropic_tools_go_up_and_calls_come_back() {
    let up = Upstream::start(anthropic_tool_answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r =
        within(WAIT, "Completion", client.completion(completion("claude"))).await.expect("OK").into_inner();
    assert_eq!(r.content, "Let me check.");
    assert_eq!(r.finish_reason, pb::FinishReason::ToolCalls as i32);
    // Tool-call indices count tool blocks only: the call is number 0.
    assert_eq!(
        r.tool_calls,
        [pb::ToolCall {
            id: "toolu_1".into(),
            name: "get_weather".into(),
            arguments_json: r#"{"city":"Paris"}"#.into()
        }]
    );
    assert_eq!(r.usage.map(|u| (u.input_tokens, u.output_tokens)), Some((40, 15)));

    let body = up.requests()[0].json();
    assert_eq!(
        body["tools"],
        json!([{"name": "get_weather", "description": "Weather by city",
                "input_schema": serde_json::from_str::<serde_json::Value>(SCHEMA).expect("schema")}])
    );
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "get_weather"}));
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "Weather in Oslo, then Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_0", "content": "-3C"}]},
        ])
    );
}
