//! What every provider owes the caller beyond text: reasoning in its own
//! field (never in `content`), cached and reasoning token counts, and request
//! fields forwarded or refused by name, never silently dropped.

use llm_gateway::api::pb::{self, Role};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    harness::{
        Gateway, KEY_ENV, WAIT, config, config_with_model, message, stream_call, stream_request, within,
    },
    streaming::assert_stream_shape,
    upstream::{Reply, Step, Upstream},
    wire::{anthropic, openai},
};

/// DeepSeek's reasoner as it streams: `reasoning_content` first, then the
/// answer, and usage with the reasoning and cached counts.
fn deepseek_answer() -> Reply {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        openai::data(&json!({"id": "ds-1", "object": "chat.completion.chunk", "model": "deepseek-reasoner",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
    };
    Reply::events(&[
        chunk(json!({"role": "assistant", "content": null, "reasoning_content": ""}), json!(null)),
        chunk(json!({"content": null, "reasoning_content": "9.11 < 9.8"}), json!(null)),
        chunk(json!({"content": null, "reasoning_content": " since 1 < 8."}), json!(null)),
        chunk(json!({"content": "9.8", "reasoning_content": null}), json!(null)),
        chunk(json!({"content": ""}), json!("stop")),
        openai::data(
            &json!({"id": "ds-1", "object": "chat.completion.chunk", "model": "deepseek-reasoner", "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50,
                      "prompt_tokens_details": {"cached_tokens": 16},
                      "completion_tokens_details": {"reasoning_tokens": 25}}}),
        ),
        openai::DONE.to_owned(),
    ])
}

#[tokio::test]
async fn openai_compatible_reasoning_and_token_details_reach_the_caller() {
    let up = Upstream::start(deepseek_answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, stream_request("chat", "Which is larger?")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "9.8", "no reasoning in content");
    let reasoning: String = got.messages.iter().map(|m| m.reasoning.as_str()).collect();
    assert_eq!(reasoning, "9.11 < 9.8 since 1 < 8.");
    let usage = assert_stream_shape(&got.messages, "oa", "deepseek-reasoner", pb::FinishReason::Stop);
    assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (20, 30, 50));
    assert_eq!((usage.cached_input_tokens, usage.reasoning_tokens), (16, 25));

    let r =
        within(WAIT, "Completion", client.completion(crate::harness::completion_request("chat", "Which?")))
            .await
            .expect("OK")
            .into_inner();
    assert_eq!((r.content.as_str(), r.reasoning.as_str()), ("9.8", "9.11 < 9.8 since 1 < 8."));
    let u = r.usage.expect("usage");
    assert_eq!((u.cached_input_tokens, u.reasoning_tokens), (16, 25));
}

#[tokio::test]
async fn a_delta_with_only_reasoning_commits_the_call() {
    // The first target thinks, then breaks: the caller has been sent the
    // reasoning, so the second target must not answer in its place.
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") {
            Reply::sse(vec![
                Step::send(openai::role("c", "gpt-first")),
                Step::send(openai::data(&json!({"id": "c", "model": "gpt-first",
                    "choices": [{"index": 0, "delta": {"reasoning": "thinking…"}, "finish_reason": null}]}))),
                Step::Close,
            ])
        } else {
            Reply::events(&anthropic::answer("m", "claude-second", &["second"], "end_turn", 1, 1))
        }
    })
    .await;
    let yaml = config_with_model(&up.base_url(), "pair", "oa", "gpt-first").replace(
        "[{ provider: oa, model: \"gpt-first\" }]",
        "[{ provider: oa, model: \"gpt-first\" }, { provider: an, model: \"claude-second\" }]",
    );
    let gw = Gateway::start(&yaml).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("pair", "hi")).await;
    assert_eq!(got.messages.first().map(|m| m.reasoning.as_str()), Some("thinking…"), "{got:?}");
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert_eq!(got.text(), "");
    assert_eq!(up.requests().len(), 1, "no fallback after a reasoning delta was sent");
}

/// [`config`] plus an Anthropic provider `at` asking for extended thinking,
/// and its model `claude-think`.
fn thinking_config(base_url: &str) -> String {
    let provider = format!(
        "  at:\n    kind: anthropic\n    base_url: {base_url}\n    api_key_env: {KEY_ENV}\n    default_max_tokens: 8000\n    reasoning: {{ budget_tokens: 2048 }}\n  mk:\n    kind: mock\n"
    );
    let yaml = config(base_url).replacen("  mk:\n    kind: mock\n", &provider, 1);
    format!("{yaml}  claude-think:\n    targets: [{{ provider: at, model: claude-think-test }}]\n")
}

#[tokio::test]
async fn anthropic_thinking_and_cache_reads_reach_the_caller() {
    let event = anthropic::event;
    let up = Upstream::start(Reply::events(&[
        event(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "msg_t", "type": "message", "role": "assistant",
                "model": "claude-think-test", "content": [],
                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "27 * 453…"}}),
        ),
        event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}}),
        ),
        anthropic::block_stop(0),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        anthropic::text(1, "12,231"),
        anthropic::block_stop(1),
        anthropic::message_delta("end_turn", 90),
        anthropic::message_stop(),
    ]))
    .await;
    let gw = Gateway::start(&thinking_config(&up.base_url())).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("claude-think", "27 * 453?")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "12,231", "thinking and its signature stay out of content");
    let reasoning: String = got.messages.iter().map(|m| m.reasoning.as_str()).collect();
    assert_eq!(reasoning, "27 * 453…");
    let usage = assert_stream_shape(&got.messages, "at", "claude-think-test", pb::FinishReason::Stop);
    // All input (cache writes and reads included); reads also on their own.
    assert_eq!((usage.input_tokens, usage.cached_input_tokens, usage.output_tokens), (330, 300, 90));
    let body = up.requests()[0].json();
    assert_eq!(body["thinking"], json!({"type": "enabled", "budget_tokens": 2048}));
    assert_eq!(body["max_tokens"], 8000);
}

#[tokio::test]
async fn anthropic_refuses_what_it_cannot_carry_by_name_before_any_upstream_call() {
    let up = Upstream::start(Reply::events(&anthropic::answer("m", "c", &["x"], "end_turn", 1, 1))).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let json_object =
        pb::ResponseFormat { r#type: pb::response_format::Type::JsonObject as i32, ..Default::default() };
    let json_schema = pb::ResponseFormat {
        r#type: pb::response_format::Type::JsonSchema as i32,
        schema_json: r#"{"type":"object"}"#.into(),
        ..Default::default()
    };
    let mut cases = Vec::new();
    let mut r = stream_request("claude", "hi");
    r.seed = Some(7);
    cases.push((r, "seed"));
    let mut r = stream_request("claude", "hi");
    r.response_format = Some(json_object);
    cases.push((r, "response_format"));
    let mut r = stream_request("claude", "hi");
    r.response_format = Some(json_schema.clone());
    cases.push((r, "response_format"));
    let mut r = stream_request("claude", "hi");
    r.messages =
        vec![message(Role::System, "s"), pb::ChatMessage { name: "bob".into(), ..message(Role::User, "hi") }];
    cases.push((r, "messages[1].name"));
    for (request, field) in cases {
        let got = stream_call(&mut client, request).await;
        let status = got.error();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(&format!("{field}:")), "names {field}: {status:?}");
        let details = status.get_error_details();
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("INVALID_REQUEST"), "{field}");
        let violations = details.bad_request().map(|b| b.field_violations.clone()).unwrap_or_default();
        assert_eq!(violations.first().map(|v| v.field.as_str()), Some(field), "BadRequest names {field}");
    }
    let request = pb::CompletionRequest {
        model: "claude".into(),
        messages: vec![message(Role::User, "hi")],
        response_format: Some(json_schema),
        ..Default::default()
    };
    let status = within(WAIT, "Completion", client.completion(request)).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("response_format"), "{status:?}");
    assert!(up.requests().is_empty(), "the refusal comes before any upstream call");

    // TYPE_TEXT is what Anthropic does anyway: accepted.
    let mut r = stream_request("claude", "hi");
    r.response_format =
        Some(pb::ResponseFormat { r#type: pb::response_format::Type::Text as i32, ..Default::default() });
    stream_call(&mut client, r).await.end.expect("OK");
}

#[tokio::test]
async fn a_field_one_target_cannot_carry_falls_back_to_one_that_can() {
    // `seed` is refused by Anthropic's wire format, carried by OpenAI's.
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") {
            Reply::events(&openai::answer("c", "gpt-4o-mini", &["seeded"], "stop", 1, 1))
        } else {
            Reply::events(&anthropic::answer("m", "c", &["x"], "end_turn", 1, 1))
        }
    })
    .await;
    let yaml = config(&up.base_url()).replace(
        "  claude:\n    targets: [{ provider: an, model: claude-test }]\n",
        "  claude:\n    targets: [{ provider: an, model: claude-test }, { provider: oa, model: gpt-4o-mini }]\n",
    );
    let gw = Gateway::start(&yaml).await;
    let mut client = gw.client().await;
    let mut r = stream_request("claude", "hi");
    r.seed = Some(7);
    let got = stream_call(&mut client, r).await;
    got.end.as_ref().expect("served by the target that carries seed");
    assert_eq!(got.text(), "seeded");
    let paths: Vec<String> = up.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/chat/completions"], "nothing was sent to the target that cannot carry it");
    assert_eq!(up.requests()[0].json()["seed"], 7);
}
