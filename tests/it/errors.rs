//! CONTRACT.md section 2, row by row: what a caller gets when the request,
//! the key or the upstream is at fault.

use llm_gateway::api::pb::{self, Role, llm_gateway_client::LlmGatewayClient};
use serde_json::json;
use tonic::{Code, Status, transport::Channel};

use crate::{
    harness::{Gateway, WAIT, completion_request, md, message, stream_call, stream_request, within},
    upstream::{Reply, Step, Upstream, refused_url},
    wire::{anthropic, openai},
};

async fn unary_error(client: &mut LlmGatewayClient<Channel>, request: pb::CompletionRequest) -> Status {
    match within(WAIT, "Completion", client.completion(request)).await {
        Ok(r) => panic!("Completion succeeded, an error was expected: {:?}", r.into_inner()),
        Err(s) => s,
    }
}

#[tokio::test]
async fn unknown_model_is_not_found() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let s = unary_error(&mut client, completion_request("no-such-model", "hi")).await;
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("no-such-model"), "{s:?}");
    let got = stream_call(&mut client, stream_request("no-such-model", "hi")).await;
    assert_eq!(got.error().code(), Code::NotFound, "{got:?}");
    assert!(got.messages.is_empty());
    assert!(up.requests().is_empty(), "nothing goes upstream");
}

/// Each invalid request, and the field its message must name.
fn invalid_requests() -> Vec<(pb::StreamCompletionRequest, &'static str)> {
    let base = || stream_request("chat", "hi");
    let mut out = Vec::new();
    let mut r = base();
    r.messages.clear();
    out.push((r, "messages"));
    let mut r = base();
    r.temperature = Some(2.5);
    out.push((r, "temperature"));
    let mut r = base();
    r.temperature = Some(-0.1);
    out.push((r, "temperature"));
    let mut r = base();
    r.top_p = Some(1.5);
    out.push((r, "top_p"));
    let mut r = base();
    r.stop = vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()];
    out.push((r, "stop"));
    let mut r = base();
    r.tools = vec![pb::Tool {
        name: "lookup".into(),
        description: "looks up".into(),
        parameters_json: "{\"type\": \"object\", ".into(),
    }];
    out.push((r, "tools[0].parameters_json"));
    let mut r = base();
    r.messages = vec![message(Role::Unspecified, "hi")];
    out.push((r, "messages[0].role"));
    out
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let up = Upstream::start(Reply::Hang).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    for (request, field) in invalid_requests() {
        let got = stream_call(&mut client, request.clone()).await;
        let s = got.error();
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().contains(field), "the message names {field:?}: {s:?}");

        let unary = pb::CompletionRequest {
            model: request.model,
            messages: request.messages,
            temperature: request.temperature,
            top_p: request.top_p,
            stop: request.stop,
            tools: request.tools,
            ..Default::default()
        };
        let s = unary_error(&mut client, unary).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(s.message().contains(field), "the message names {field:?}: {s:?}");
    }
    assert!(up.requests().is_empty(), "invalid requests never go upstream");
}

#[tokio::test]
async fn upstream_rejecting_the_request_is_invalid_argument_with_its_message() {
    let openai_msg = "This model's maximum context length is 128000 tokens.";
    let anthropic_msg = "messages: roles must alternate between \"user\" and \"assistant\"";
    let up = Upstream::with(move |_, r| {
        if r.path.ends_with("/messages") {
            Reply::json(
                400,
                &json!({"type": "error", "error": {"type": "invalid_request_error", "message": anthropic_msg}}),
            )
        } else {
            Reply::error(400, openai_msg)
        }
    })
    .await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    for (model, msg) in [("chat", openai_msg), ("claude", anthropic_msg)] {
        let s = unary_error(&mut client, completion_request(model, "hi")).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{model}: {s:?}");
        assert!(s.message().contains(msg), "{model}: the provider's message is carried: {s:?}");
        let got = stream_call(&mut client, stream_request(model, "hi")).await;
        assert_eq!(got.error().code(), Code::InvalidArgument, "{model}: {got:?}");
        assert!(got.error().message().contains(msg), "{model}: {got:?}");
    }
}

#[tokio::test]
async fn other_upstream_4xx_are_invalid_argument() {
    let up = Upstream::with(|i, _| match i {
        0 => Reply::error(404, "The model `gpt-4o-mini` does not exist"),
        _ => Reply::error(422, "unprocessable: tools[0]"),
    })
    .await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    for msg in ["does not exist", "unprocessable: tools[0]"] {
        let s = unary_error(&mut client, completion_request("chat", "hi")).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(msg), "{s:?}");
    }
}

#[tokio::test]
async fn upstream_failures_are_unavailable() {
    // 401/403/408/429 are not the caller's fault; 5xx neither.
    let statuses = [401u16, 403, 408, 429, 500, 502, 503, 529];
    let up = Upstream::with(move |i, _| Reply::error(statuses[i % statuses.len()], "upstream says no")).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    for status in statuses {
        let s = unary_error(&mut client, completion_request("chat", "hi")).await;
        assert_eq!(s.code(), Code::Unavailable, "upstream HTTP {status}: {s:?}");
    }
    for status in statuses {
        let got = stream_call(&mut client, stream_request("chat", "hi")).await;
        assert_eq!(got.error().code(), Code::Unavailable, "upstream HTTP {status}: {got:?}");
        assert!(got.messages.is_empty());
    }
}

#[tokio::test]
async fn upstream_429_retry_after_is_passed_on() {
    let up = Upstream::start(Reply::error(429, "slow down").with_header("retry-after", "7")).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let s = unary_error(&mut client, completion_request("chat", "hi")).await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(md(s.metadata(), "retry-after-ms"), "7000", "{s:?}");
}

#[tokio::test]
async fn mock_failures_map_like_upstream_ones() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut client = gw.client().await;
    let s = unary_error(&mut client, completion_request("down", "hi")).await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let s = unary_error(&mut client, completion_request("refused", "hi")).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("mock failure 400"), "{s:?}");
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    let gw = Gateway::with_upstream(&refused_url().await).await;
    let mut client = gw.client().await;
    let s = unary_error(&mut client, completion_request("chat", "hi")).await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let got = stream_call(&mut client, stream_request("claude", "hi")).await;
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
}

#[tokio::test]
async fn broken_answers_before_the_first_delta_are_unavailable() {
    let cases: Vec<(&str, &str, Reply)> = vec![
        (
            "malformed JSON",
            "chat",
            Reply::events(&["data: {\"choices\": [{\"delta\": {\"content\": \"x\"\n\n"]),
        ),
        ("not SSE at all", "chat", Reply::raw(200, "text/html", "<html><body>Bad gateway</body></html>\n")),
        ("empty body", "claude", Reply::events::<&str>(&[])),
        ("closed after the headers", "chat", Reply::sse(vec![Step::Close])),
        ("reset after the headers", "claude", Reply::sse(vec![Step::Reset])),
        ("no answer at all", "chat", Reply::Close),
        (
            "an error event first",
            "claude",
            Reply::events(&[anthropic::error("overloaded_error", "Overloaded")]),
        ),
    ];
    for (what, model, reply) in cases {
        let up = Upstream::start(reply).await;
        let gw = Gateway::with_upstream(&up.base_url()).await;
        let mut client = gw.client().await;
        let got = stream_call(&mut client, stream_request(model, "hi")).await;
        assert_eq!(got.error().code(), Code::Unavailable, "{what}: {got:?}");
        assert!(got.messages.is_empty(), "{what}: {got:?}");
        let s = unary_error(&mut client, completion_request(model, "hi")).await;
        assert_eq!(s.code(), Code::Unavailable, "{what}: {s:?}");
    }
}

/// Upstream answers that break after two text deltas ("Hello", " world").
fn broken_after_deltas() -> Vec<(&'static str, &'static str, Reply)> {
    let oa = |tail: Vec<Step>| {
        let mut steps = vec![
            Step::send(openai::role("c", "gpt")),
            Step::send(openai::content("c", "gpt", "Hello")),
            Step::send(openai::content("c", "gpt", " world")),
        ];
        steps.extend(tail);
        Reply::sse(steps)
    };
    let an = |tail: Vec<Step>| {
        let mut steps = vec![
            Step::send(anthropic::message_start("m", "claude", 3)),
            Step::send(anthropic::block_start(0)),
            Step::send(anthropic::text(0, "Hello")),
            Step::send(anthropic::text(0, " world")),
        ];
        steps.extend(tail);
        Reply::sse(steps)
    };
    vec![
        ("openai: connection closed mid-body", "chat", oa(vec![Step::Close])),
        ("openai: connection reset", "chat", oa(vec![Step::Reset])),
        (
            "openai: malformed JSON",
            "chat",
            oa(vec![Step::send("data: {\"choices\": [{\"delta\": {\"co\n\n")]),
        ),
        (
            "openai: error chunk",
            "chat",
            oa(vec![Step::send(openai::data(
                &json!({"error": {"message": "overloaded", "type": "server_error"}}),
            ))]),
        ),
        ("openai: clean end without finish or [DONE]", "chat", oa(vec![])),
        (
            "anthropic: error event",
            "claude",
            an(vec![Step::send(anthropic::error("overloaded_error", "Overloaded"))]),
        ),
        (
            "anthropic: clean end without message_stop",
            "claude",
            an(vec![Step::send(anthropic::block_stop(0))]),
        ),
        ("anthropic: connection closed", "claude", an(vec![Step::Close])),
    ]
}

#[tokio::test]
async fn upstream_failing_after_deltas_ends_the_stream_unavailable() {
    for (what, model, reply) in broken_after_deltas() {
        let up = Upstream::start(reply).await;
        let gw = Gateway::with_upstream(&up.base_url()).await;
        let mut client = gw.client().await;
        let got = stream_call(&mut client, stream_request(model, "hi")).await;
        assert_eq!(got.error().code(), Code::Unavailable, "{what}: never a silent OK: {got:?}");
        assert_eq!(got.text(), "Hello world", "{what}: the deltas before the failure arrive");
        assert!(
            got.messages.iter().all(|m| m.finish_reason == 0 && m.usage.is_none()),
            "{what}: no finish on a broken stream: {got:?}"
        );
        // A whole answer or nothing: Completion fails too.
        let s = unary_error(&mut client, completion_request(model, "hi")).await;
        assert_eq!(s.code(), Code::Unavailable, "{what}: {s:?}");
    }
}

#[tokio::test]
async fn mock_failing_after_deltas_ends_the_stream_unavailable() {
    let gw = Gateway::with_upstream("http://127.0.0.1:9/v1").await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("flaky", "hi")).await;
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert_eq!(got.text(), llm_gateway::providers::mock::lorem(3) + " ");
    let s = unary_error(&mut client, completion_request("flaky", "hi")).await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
}
