//! The HTTP front door driven by a real OpenAI client library
//! (`async-openai`) pointed at it by base URL: unary, streaming with usage,
//! tools, the model list, and errors as the SDK reports them.

use async_openai::{
    Client,
    config::OpenAIConfig,
    error::OpenAIError,
    types::chat::{
        ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls, ChatCompletionNamedToolChoice,
        ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
        ChatCompletionRequestToolMessageArgs, ChatCompletionRequestUserMessageArgs,
        ChatCompletionStreamOptions, ChatCompletionTool, ChatCompletionToolChoiceOption, ChatCompletionTools,
        CreateChatCompletionRequest, CreateChatCompletionRequestArgs, FinishReason, FunctionCall,
        FunctionName, FunctionObject,
    },
};
use futures_util::StreamExt;
use serde_json::json;

use crate::{
    harness::{Gateway, WAIT, http, within},
    http::{http_config, http_gateway},
    upstream::{Reply, Upstream},
    wire::openai,
};

fn client(gw: &Gateway, key: &str) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new().with_api_base(gw.http_url("/v1")).with_api_key(key);
    Client::with_config(config).with_http_client(http())
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessageArgs::default().content(text).build().expect("message").into()
}

fn request(model: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages(vec![user("hi")])
        .build()
        .expect("request")
}

fn answer() -> Reply {
    Reply::events(&openai::answer("chatcmpl-s", "gpt-4o-mini-2024", &["Hel", "lo"], "stop", 7, 2))
}

#[tokio::test]
async fn unary_call() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let r = within(WAIT, "create", client(&gw, "none").chat().create(request("chat"))).await.expect("answer");
    assert_eq!(r.id, "chatcmpl-s");
    assert_eq!(r.model, "gpt-4o-mini-2024");
    assert_eq!(r.choices[0].message.content.as_deref(), Some("Hello"));
    assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Stop));
    let usage = r.usage.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (7, 2, 9));
}

#[tokio::test]
async fn streaming_with_usage() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let mut req = request("chat");
    req.stream_options =
        Some(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None });
    let mut stream =
        within(WAIT, "create_stream", client(&gw, "none").chat().create_stream(req)).await.expect("stream");
    let mut text = String::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = within(WAIT, "the next chunk", stream.next()).await {
        let chunk = chunk.expect("a chunk");
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            finish = finish.or(c.finish_reason);
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(text, "Hello");
    assert_eq!(finish, Some(FinishReason::Stop));
    let usage = usage.expect("the usage chunk");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 2));
}

fn tool_answer() -> Reply {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        openai::data(
            &json!({"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "gpt-t",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
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

#[tokio::test]
async fn tools_and_tool_history() {
    let up = Upstream::start(tool_answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let past_call = ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
        id: "call_0".into(),
        function: FunctionCall { name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() },
    });
    let messages = vec![
        user("Weather in Oslo, then Paris?"),
        ChatCompletionRequestAssistantMessageArgs::default()
            .tool_calls(vec![past_call])
            .build()
            .expect("m")
            .into(),
        ChatCompletionRequestToolMessageArgs::default()
            .tool_call_id("call_0")
            .content("-3C")
            .build()
            .expect("m")
            .into(),
    ];
    let req = CreateChatCompletionRequestArgs::default()
        .model("chat")
        .messages(messages)
        .tools(vec![ChatCompletionTools::Function(ChatCompletionTool {
            function: FunctionObject {
                name: "get_weather".into(),
                description: Some("Weather by city".into()),
                parameters: Some(schema.clone()),
                strict: None,
            },
        })])
        .tool_choice(ChatCompletionToolChoiceOption::Function(ChatCompletionNamedToolChoice {
            function: FunctionName { name: "get_weather".into() },
        }))
        .build()
        .expect("request");
    let r = within(WAIT, "create", client(&gw, "none").chat().create(req)).await.expect("answer");
    assert_eq!(r.choices[0].finish_reason, Some(FinishReason::ToolCalls));
    let calls = r.choices[0].message.tool_calls.clone().expect("tool calls");
    match &calls[..] {
        [ChatCompletionMessageToolCalls::Function(c)] => {
            assert_eq!((c.id.as_str(), c.function.name.as_str()), ("call_1", "get_weather"));
            assert_eq!(c.function.arguments, r#"{"city":"Paris"}"#);
        }
        other => panic!("one function call expected: {other:?}"),
    }

    // Upstream: the tools, the choice and the history, in OpenAI's shape again.
    let sent = up.requests()[0].json();
    assert_eq!(sent["tools"][0]["function"]["parameters"], schema);
    assert_eq!(sent["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
    assert_eq!(sent["messages"][1]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Oslo"}"#);
    assert_eq!(sent["messages"][2]["tool_call_id"], "call_0");
}

#[tokio::test]
async fn the_model_list() {
    let gw = http_gateway("http://127.0.0.1:9/v1").await;
    let list = within(WAIT, "models", client(&gw, "none").models().list()).await.expect("list");
    let ids: Vec<&str> = list.data.iter().map(|m| m.id.as_str()).collect();
    assert!(ids.contains(&"chat") && ids.contains(&"lorem"), "{ids:?}");
}

fn api_error(e: OpenAIError) -> (u16, async_openai::error::ApiError) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error),
        other => panic!("an API error expected, got {other:?}"),
    }
}

#[tokio::test]
async fn errors_as_the_sdk_sees_them() {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(b"k1"));
    let keys = format!("api_keys:\n  - {{ name: a, key_sha256: \"{digest}\", models: [lorem, flaky] }}\n");
    let gw = Gateway::start(&http_config("http://127.0.0.1:9/v1", &keys)).await;

    let (status, e) = api_error(client(&gw, "wrong").chat().create(request("lorem")).await.expect_err("401"));
    assert_eq!((status, e.code.as_deref()), (401, Some("unauthenticated")));
    let (status, e) = api_error(client(&gw, "k1").chat().create(request("nope")).await.expect_err("404"));
    assert_eq!((status, e.code.as_deref()), (404, Some("model_not_found")));
    let (status, e) = api_error(client(&gw, "k1").chat().create(request("chat")).await.expect_err("403"));
    assert_eq!((status, e.code.as_deref()), (403, Some("model_not_allowed")));
    let mut hot = request("lorem");
    hot.temperature = Some(9.0);
    let (status, e) = api_error(client(&gw, "k1").chat().create(hot).await.expect_err("400"));
    assert_eq!((status, e.param.as_deref()), (400, Some("temperature")));

    // Mid-stream: the SDK raises the error event, it does not end quietly.
    let mut stream = within(WAIT, "create_stream", client(&gw, "k1").chat().create_stream(request("flaky")))
        .await
        .expect("the stream starts");
    let mut failed = None;
    while let Some(item) = within(WAIT, "the next chunk", stream.next()).await {
        if let Err(e) = item {
            failed = Some(e.to_string());
            break;
        }
    }
    let failed = failed.expect("the stream ends with an error");
    assert!(failed.contains("upstream_failed_midstream"), "{failed}");
}
