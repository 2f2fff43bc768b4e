//! Whole answers through each wire format: the text byte for byte, usage, the
//! first/last message rules, and what the upstream received.

use llm_gateway::{
    api::pb::{self, Role},
    providers::mock::lorem,
};
use serde_json::json;

use crate::{
    harness::{
        Gateway, WAIT, completion_request, message, parse_traceparent, stream_call, stream_request,
        upstream_key, within,
    },
    upstream::{Reply, Request, Upstream},
    wire::{anthropic, openai},
};

/// Text with multi-byte characters, escapes and a newline.
const PIECES: &[&str] = &["Hel", "lo, ", "wörld", " — ✓ 🚀", "\n", "\"quoted\" \\ back"];

fn full_text() -> String {
    PIECES.concat()
}

/// A request using every translated parameter (the `seed` only where the
/// format has one: Anthropic refuses it by name).
fn full_request(model: &str) -> pb::StreamCompletionRequest {
    pb::StreamCompletionRequest {
        model: model.into(),
        messages: vec![message(Role::System, "be brief"), message(Role::User, "hi there")],
        max_tokens: Some(64),
        temperature: Some(0.5),
        top_p: Some(0.25),
        stop: vec!["END".into(), "\n\n".into()],
        seed: (model != "claude").then_some(42),
        user: "user-7".into(),
        ..Default::default()
    }
}

fn full_completion_request(model: &str) -> pb::CompletionRequest {
    let r = full_request(model);
    pb::CompletionRequest {
        model: r.model,
        messages: r.messages,
        max_tokens: r.max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        stop: r.stop,
        seed: r.seed,
        user: r.user,
        ..Default::default()
    }
}

/// The stream rules of CONTRACT.md section 1: model and provider on the first
/// message only, finish_reason and usage on the last only, one id throughout.
pub(crate) fn assert_stream_shape(
    messages: &[pb::StreamCompletionResponse],
    provider: &str,
    model: &str,
    finish: pb::FinishReason,
) -> pb::Usage {
    assert!(messages.len() >= 2, "too few messages: {messages:?}");
    let (first, last) = (&messages[0], &messages[messages.len() - 1]);
    assert_eq!(first.provider, provider, "provider on the first message");
    assert_eq!(first.model, model, "model on the first message");
    for (i, m) in messages.iter().enumerate().skip(1) {
        assert!(m.provider.is_empty() && m.model.is_empty(), "model/provider on message {i}: {m:?}");
    }
    for (i, m) in messages[..messages.len() - 1].iter().enumerate() {
        assert_eq!(m.finish_reason, 0, "finish_reason on message {i}: {m:?}");
        assert!(m.usage.is_none(), "usage on message {i}: {m:?}");
    }
    assert_eq!(last.finish_reason, finish as i32, "finish_reason on the last message: {last:?}");
    assert!(!first.id.is_empty(), "no id");
    assert!(messages.iter().all(|m| m.id == first.id), "the id changes mid-stream: {messages:?}");
    last.usage.expect("usage on the last message")
}

fn assert_openai_request(r: &Request) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some(format!("Bearer {}", upstream_key()).as_str()));
    assert_eq!(r.header("x-api-key"), None, "the OpenAI format sends no x-api-key");
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{r:?}");
    parse_traceparent(r.header("traceparent").expect("traceparent on the upstream request"));
    let body = r.json();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    );
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["top_p"], 0.25);
    assert_eq!(body["stop"], json!(["END", "\n\n"]));
    assert_eq!(body["seed"], 42);
    assert_eq!(body["user"], "user-7");
}

fn assert_anthropic_request(r: &Request, max_tokens: u32) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(upstream_key().as_str()));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r.header("authorization"), None, "the Anthropic format sends the key as x-api-key only");
    parse_traceparent(r.header("traceparent").expect("traceparent on the upstream request"));
    let body = r.json();
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["stream"], true);
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["messages"], json!([{"role": "user", "content": "hi there"}]));
    assert_eq!(body["max_tokens"], max_tokens);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["top_p"], 0.25);
    assert_eq!(body["stop_sequences"], json!(["END", "\n\n"]));
    assert_eq!(body["metadata"], json!({"user_id": "user-7"}));
    assert!(body.get("seed").is_none(), "Anthropic has no seed (and refuses one, see parity.rs): {body}");
}

fn openai_answer() -> Vec<String> {
    openai::answer("chatcmpl-42", "gpt-4o-mini-2024-07-18", PIECES, "stop", 11, 6)
}

fn anthropic_answer(stop_reason: &str) -> Vec<String> {
    anthropic::answer("msg_42", "claude-test-20250101", PIECES, stop_reason, 25, 9)
}

#[tokio::test]
async fn openai_stream_carries_the_exact_text_and_usage() {
    let up = Upstream::start(Reply::events(&openai_answer())).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, full_request("chat")).await;
    got.end.as_ref().expect("the stream ends OK");
    assert_eq!(got.text(), full_text());
    let usage = assert_stream_shape(&got.messages, "oa", "gpt-4o-mini-2024-07-18", pb::FinishReason::Stop);
    assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (11, 6, 17));
    assert!(got.messages.iter().all(|m| m.id == "chatcmpl-42"), "the upstream's id: {:?}", got.messages);

    let requests = up.requests();
    assert_eq!(requests.len(), 1, "one upstream request");
    assert_openai_request(&requests[0]);
}

#[tokio::test]
async fn openai_completion_carries_the_exact_text_and_usage() {
    let up = Upstream::start(Reply::events(&openai::answer(
        "chatcmpl-7",
        "gpt-4o-mini-2024-07-18",
        PIECES,
        "length",
        11,
        64,
    )))
    .await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r = within(WAIT, "Completion", client.completion(full_completion_request("chat")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, full_text());
    assert_eq!(r.id, "chatcmpl-7");
    assert_eq!(r.provider, "oa");
    assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
    assert_eq!(r.finish_reason, pb::FinishReason::Length as i32);
    let u = r.usage.expect("usage");
    assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens), (11, 64, 75));
    assert_openai_request(&up.requests()[0]);
}

#[tokio::test]
async fn anthropic_stream_carries_the_exact_text_and_usage() {
    let up = Upstream::start(Reply::events(&anthropic_answer("end_turn"))).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, full_request("claude")).await;
    got.end.as_ref().expect("the stream ends OK");
    assert_eq!(got.text(), full_text());
    let usage = assert_stream_shape(&got.messages, "an", "claude-test-20250101", pb::FinishReason::Stop);
    // Input from message_start, output from message_delta.
    assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (25, 9, 34));
    assert!(got.messages.iter().all(|m| m.id == "msg_42"), "the upstream's id: {:?}", got.messages);

    let requests = up.requests();
    assert_eq!(requests.len(), 1);
    assert_anthropic_request(&requests[0], 64);
}

#[tokio::test]
async fn anthropic_completion_carries_the_exact_text_and_usage() {
    let up = Upstream::start(Reply::events(&anthropic_answer("max_tokens"))).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r = within(WAIT, "Completion", client.completion(full_completion_request("claude")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, full_text());
    assert_eq!(r.id, "msg_42");
    assert_eq!(r.provider, "an");
    assert_eq!(r.model, "claude-test-20250101");
    assert_eq!(r.finish_reason, pb::FinishReason::Length as i32);
    let u = r.usage.expect("usage");
    assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens), (25, 9, 34));
    assert_anthropic_request(&up.requests()[0], 64);
}

#[tokio::test]
async fn anthropic_gets_the_default_max_tokens_when_the_caller_sets_none() {
    let up = Upstream::start(Reply::events(&anthropic_answer("end_turn"))).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r = within(WAIT, "Completion", client.completion(completion_request("claude", "hi")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, full_text());
    let body = up.requests()[0].json();
    assert_eq!(body["max_tokens"], 333, "providers.an.default_max_tokens: {body}");
    assert!(body.get("system").is_none(), "no system message, no system field: {body}");
}

#[tokio::test]
async fn mock_stream_and_completion_carry_the_exact_text() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, stream_request("lorem", "one two three")).await;
    got.end.as_ref().expect("the stream ends OK");
    assert_eq!(got.text(), lorem(12));
    let usage = assert_stream_shape(&got.messages, "mk", "lorem?tokens=12", pb::FinishReason::Stop);
    assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (3, 12, 15));

    let r = within(WAIT, "Completion", client.completion(completion_request("lorem", "one two three")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, lorem(12));
    assert_eq!((r.provider.as_str(), r.model.as_str()), ("mk", "lorem?tokens=12"));
    assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(r.usage.map(|u| (u.input_tokens, u.output_tokens)), Some((3, 12)));

    let r = within(WAIT, "Completion", client.completion(completion_request("echo", "say this back please")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, "say this back please");
}

#[tokio::test]
async fn mock_honours_max_tokens() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut client = gw.client().await;
    let mut request = stream_request("lorem", "hi");
    request.max_tokens = Some(5);
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("the stream ends OK");
    assert_eq!(got.text(), lorem(5));
    let usage = assert_stream_shape(&got.messages, "mk", "lorem?tokens=12", pb::FinishReason::Length);
    assert_eq!(usage.output_tokens, 5);
}

#[tokio::test]
async fn upstream_traceparent_continues_the_callers_trace() {
    let up = Upstream::start(Reply::events(&openai_answer())).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(stream_request("chat", "hi"));
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{caller_trace}-{caller_span}-01").parse().expect("value"));
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("the stream ends OK");

    // Without a traceparent, a fresh (valid) one.
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    got.end.as_ref().expect("the stream ends OK");

    let requests = up.requests();
    let (trace, span) = parse_traceparent(requests[0].header("traceparent").expect("traceparent"));
    assert_eq!(trace, caller_trace, "the upstream request joins the caller's trace");
    assert_ne!(span, caller_span, "the upstream request has a span of its own");
    let (fresh, _) = parse_traceparent(requests[1].header("traceparent").expect("traceparent"));
    assert_ne!(fresh, caller_trace);
}

/// A burst of calls on one HTTP/2 connection: each request is a small DATA
/// frame, and a backlog of them must not make the server close the connection
/// (h2's ENHANCE_YOUR_CALM against a too-small connection window).
#[tokio::test]
async fn a_burst_of_calls_on_one_connection_all_succeed() {
    let gw = Gateway::start(&crate::harness::config("http://127.0.0.1:9/v1")).await;
    let channel = gw.channel().await;
    let calls = (0..600).map(|_| {
        let mut client = pb::llm_gateway_client::LlmGatewayClient::new(channel.clone());
        async move { stream_call(&mut client, stream_request("lorem", "hi")).await }
    });
    let answers = within(WAIT * 4, "600 calls", futures_util::future::join_all(calls)).await;
    let failed: Vec<_> = answers.iter().filter(|a| a.end.is_err()).map(|a| a.error().clone()).collect();
    assert!(failed.is_empty(), "{} of 600 failed; first: {:?}", failed.len(), failed.first());
    assert!(answers.iter().all(|a| a.text() == lorem(12)));
}
