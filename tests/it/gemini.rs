//! The `gemini` provider against the fake upstream speaking Gemini's exact
//! wire format (CONTRACT.md section 4), one test per pitfall gateways hit:
//! `alt=sse`, no `[DONE]`, a last event with only the finish reason and usage,
//! cumulative usage, thoughts billed as output, STOP after a function call,
//! whole function calls with no id, results sent back by name, a blocked
//! prompt answered with HTTP 200, unknown finish reasons, candidate 0 only;
//! and retries, fallback, cancellation and tracing as for the other kinds.

use std::time::{Duration, Instant};

use llm_gateway::api::pb::{self, Role};
use serde_json::json;
use tonic::Code;

use crate::{
    harness::{
        CLOSE_BOUND, Gateway, KEY_ENV, WAIT, completion_request, config, message, parse_traceparent,
        stream_call, stream_request, upstream_key, within,
    },
    streaming::assert_stream_shape,
    upstream::{Reply, Request, Step, Upstream},
    wire::{gemini, openai},
};

/// [`config`] plus two Gemini providers on `up` (`gm`; `gt`, which asks for
/// thoughts) and the models `gem`, `gem-think` and `gem-then-openai`.
fn gemini_config(up: &Upstream) -> String {
    let base = format!("http://{}/v1beta", up.addr());
    let providers = format!(
        "  gm:
    kind: gemini
    base_url: {base}
    api_key_env: {KEY_ENV}
    retry: {{ attempts: 1 }}
  gt:
    kind: gemini
    base_url: {base}
    api_key_env: {KEY_ENV}
    retry: {{ attempts: 1 }}
    reasoning: {{ budget_tokens: 1024 }}
  mk:
    kind: mock
"
    );
    let yaml = config(&up.base_url()).replacen("  mk:\n    kind: mock\n", &providers, 1);
    format!(
        "{yaml}  gem:
    targets: [{{ provider: gm, model: gemini-2.5-flash }}]
  gem-think:
    targets: [{{ provider: gt, model: gemini-2.5-pro }}]
  gem-then-openai:
    targets: [{{ provider: gm, model: gemini-2.5-flash }}, {{ provider: oa, model: gpt-4o-mini }}]
"
    )
}

async fn gateway(up: &Upstream) -> Gateway {
    Gateway::start(&gemini_config(up)).await
}

/// What every Gemini request must look like: the model in the URL, `alt=sse`,
/// the key in `x-goog-api-key` and nowhere else, the trace context.
fn assert_gemini_request(r: &Request, model: &str) {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/v1beta/models/{model}:streamGenerateContent?alt=sse"));
    assert_eq!(r.header("x-goog-api-key"), Some(upstream_key().as_str()));
    assert_eq!(r.header("authorization"), None, "the key goes in x-goog-api-key only");
    assert!(!r.path.contains("key="), "the key never sits in the URL: {}", r.path);
    parse_traceparent(r.header("traceparent").expect("traceparent on the upstream request"));
}

/// A thinking answer: thoughts first, text with multi-byte characters, a
/// second candidate that must be ignored, an event without usage, and a last
/// event holding only the finish reason and the (cumulative) usage.
fn thinking_answer() -> Reply {
    let (id, model) = ("resp-1", "gemini-2.5-pro-preview");
    let with_other = gemini::event(&json!({
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "NOT THIS"}]}, "index": 1},
            {"content": {"role": "model", "parts": [{"text": " wörld — ✓"}]}, "index": 0},
        ],
        "modelVersion": model, "responseId": id,
    }));
    Reply::events(&[
        gemini::thought(id, model, "**Planning** the greeting", gemini::usage(11, 0, 40)),
        gemini::thought(id, model, ", then answer.", gemini::usage(11, 0, 64)),
        gemini::text(id, model, "Hello,"),
        with_other,
        gemini::text(id, model, " 🚀"),
        gemini::finish(
            id,
            model,
            "STOP",
            json!({"promptTokenCount": 11, "candidatesTokenCount": 6, "thoughtsTokenCount": 64,
                   "cachedContentTokenCount": 8, "totalTokenCount": 81}),
        ),
    ])
}

fn full_request(model: &str) -> pb::StreamCompletionRequest {
    pb::StreamCompletionRequest {
        model: model.into(),
        messages: vec![message(Role::System, "be brief"), message(Role::User, "hi there")],
        max_tokens: Some(64),
        temperature: Some(0.5),
        top_p: Some(0.25),
        stop: vec!["END".into()],
        seed: Some(42),
        ..Default::default()
    }
}

#[tokio::test]
async fn streams_reasoning_apart_from_text_with_cumulative_usage_and_no_done() {
    let up = Upstream::start(thinking_answer()).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, full_request("gem-think")).await;
    got.end.as_ref().expect("the stream ends OK at EOF, with no [DONE]");
    assert_eq!(got.text(), "Hello, wörld — ✓ 🚀", "candidate 0's text, byte for byte");
    let reasoning: String = got.messages.iter().map(|m| m.reasoning.as_str()).collect();
    assert_eq!(reasoning, "**Planning** the greeting, then answer.");
    assert!(
        got.messages.iter().all(|m| m.reasoning.is_empty() || m.content.is_empty()),
        "reasoning and text arrive in messages of their own here: {:?}",
        got.messages
    );
    let usage = assert_stream_shape(&got.messages, "gt", "gemini-2.5-pro-preview", pb::FinishReason::Stop);
    // Thoughts are billed as output; the last event's counts are the whole.
    assert_eq!((usage.input_tokens, usage.output_tokens, usage.total_tokens), (11, 70, 81));
    assert_eq!((usage.cached_input_tokens, usage.reasoning_tokens), (8, 64));
    assert!(got.messages.iter().all(|m| m.id == "resp-1"), "the upstream's responseId");

    let requests = up.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_gemini_request(r, "gemini-2.5-pro");
    let body = r.json();
    assert_eq!(body["systemInstruction"], json!({"parts": [{"text": "be brief"}]}));
    assert_eq!(body["contents"], json!([{"role": "user", "parts": [{"text": "hi there"}]}]));
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens": 64, "temperature": 0.5, "topP": 0.25, "stopSequences": ["END"], "seed": 42,
               "thinkingConfig": {"includeThoughts": true, "thinkingBudget": 1024}})
    );
}

#[tokio::test]
async fn completion_carries_text_reasoning_and_usage() {
    // Completion goes to the unary endpoint, whose answer is one JSON object.
    let whole = json!({
        "candidates": [{
            "content": {"role": "model", "parts": [
                {"text": "**Planning** the greeting", "thought": true},
                {"text": ", then answer.", "thought": true},
                {"text": "Hello, wörld — ✓ 🚀"},
            ]},
            "finishReason": "STOP", "index": 0,
        }],
        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 6, "thoughtsTokenCount": 64,
                          "cachedContentTokenCount": 8, "totalTokenCount": 81},
        "modelVersion": "gemini-2.5-pro-preview", "responseId": "resp-1",
    });
    let up = Upstream::with(move |_, r| {
        if r.path.ends_with(":generateContent") { Reply::json(200, &whole) } else { thinking_answer() }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let r = within(WAIT, "Completion", client.completion(completion_request("gem-think", "hi")))
        .await
        .expect("Completion OK")
        .into_inner();
    assert_eq!(r.content, "Hello, wörld — ✓ 🚀");
    assert_eq!(r.reasoning, "**Planning** the greeting, then answer.");
    assert_eq!(
        (r.id.as_str(), r.provider.as_str(), r.model.as_str()),
        ("resp-1", "gt", "gemini-2.5-pro-preview")
    );
    assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32);
    let u = r.usage.expect("usage");
    assert_eq!((u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens), (11, 70, 8, 64));
    let sent = &up.requests()[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-2.5-pro:generateContent", "unary: :generateContent");
    assert_eq!(sent.header("x-goog-api-key"), Some(upstream_key().as_str()));
    // Without `reasoning` in its config, a provider asks for no thoughts.
    let up = Upstream::start(Reply::events(&gemini::answer("r", "g", &["ok"], "STOP", 1, 1))).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    stream_call(&mut client, stream_request("gem", "hi")).await.end.expect("OK");
    assert!(up.requests()[0].json().get("generationConfig").is_none());
}

#[tokio::test]
async fn a_function_call_becomes_a_tool_call_and_its_result_goes_back_by_name() {
    let up = Upstream::with(|i, _| {
        if i == 0 {
            Reply::events(&[gemini::function_call(
                "fc",
                "gemini-2.5-flash",
                "get_weather",
                json!({"city": "Paris"}),
                gemini::usage(30, 8, 0),
            )])
        } else {
            // The second turn is a Completion: Gemini's unary answer.
            Reply::json(
                200,
                &json!({
                    "candidates": [{"content": {"role": "model", "parts": [{"text": "It is 18C."}]},
                                    "finishReason": "STOP", "index": 0}],
                    "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 5, "totalTokenCount": 55},
                    "modelVersion": "gemini-2.5-flash", "responseId": "r2",
                }),
            )
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let tool = pb::Tool {
        name: "get_weather".into(),
        description: "Weather by city".into(),
        parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}"#
            .into(),
    };
    let mut request = stream_request("gem", "Weather in Paris?");
    request.tools = vec![tool.clone()];
    request.tool_choice = "required".into();
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("OK");
    assert_stream_shape(&got.messages, "gm", "gemini-2.5-flash", pb::FinishReason::ToolCalls);
    let calls: Vec<&pb::ToolCallDelta> = got.messages.iter().flat_map(|m| &m.tool_calls).collect();
    assert_eq!(calls.len(), 1, "the call comes whole: {calls:?}");
    let call = calls[0];
    assert!(!call.id.is_empty(), "Gemini sends no id: the gateway makes one");
    assert_eq!((call.index, call.name.as_str()), (0, "get_weather"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&call.arguments_delta).expect("JSON"),
        json!({"city": "Paris"})
    );
    let body = up.requests()[0].json();
    assert_eq!(body["tools"][0]["functionDeclarations"][0]["name"], "get_weather");
    assert_eq!(body["tools"][0]["functionDeclarations"][0]["parameters"]["required"], json!(["city"]));
    assert_eq!(body["toolConfig"], json!({"functionCallingConfig": {"mode": "ANY"}}));

    // The next turn: the call and its result, identified by the made-up id.
    let mut assistant = message(Role::Assistant, "");
    assistant.tool_calls = vec![pb::ToolCall {
        id: call.id.clone(),
        name: call.name.clone(),
        arguments_json: call.arguments_delta.clone(),
    }];
    let mut result = message(Role::Tool, r#"{"temp_c": 18}"#);
    result.tool_call_id = call.id.clone();
    let request = pb::CompletionRequest {
        model: "gem".into(),
        messages: vec![message(Role::User, "Weather in Paris?"), assistant, result],
        tools: vec![tool],
        ..Default::default()
    };
    let r = within(WAIT, "Completion", client.completion(request)).await.expect("OK").into_inner();
    assert_eq!(r.content, "It is 18C.");
    let body = up.requests()[1].json();
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}}]},
        ])
    );
}

#[tokio::test]
async fn a_blocked_prompt_is_content_filter_though_the_upstream_says_200() {
    let blocked = gemini::event(&json!({
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
        "modelVersion": "gemini-2.5-flash", "responseId": "b1",
    }));
    let blocked_whole = json!({
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
        "modelVersion": "gemini-2.5-flash", "responseId": "b1",
    });
    let up = Upstream::with(move |_, r| {
        if r.path.ends_with(":generateContent") {
            Reply::json(200, &blocked_whole)
        } else {
            Reply::events(std::slice::from_ref(&blocked))
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("gem", "something bad")).await;
    got.end.as_ref().expect("a filtered answer is an answer, not an error");
    assert_eq!(got.text(), "");
    let last = got.messages.last().expect("a final message");
    assert_eq!(last.finish_reason, pb::FinishReason::ContentFilter as i32, "{got:?}");
    assert_eq!(last.usage.map(|u| u.input_tokens), Some(7));
    let r =
        within(WAIT, "Completion", client.completion(completion_request("gem", "bad"))).await.expect("OK");
    assert_eq!(r.into_inner().finish_reason, pb::FinishReason::ContentFilter as i32);
}

#[tokio::test]
async fn an_unknown_finish_reason_is_an_error_never_a_silent_stop() {
    let up = Upstream::with(|_, r| {
        let model = "gemini-2.5-flash";
        if r.json()["contents"][0]["parts"][0]["text"] == "late" {
            Reply::events(&[
                gemini::text("u", model, "partial"),
                gemini::finish("u", model, "MALFORMED_FUNCTION_CALL", gemini::usage(3, 1, 0)),
            ])
        } else {
            Reply::events(&[gemini::finish("u", model, "OTHER", gemini::usage(3, 0, 0))])
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    // Before any delta: the attempt failed, and with one target the call.
    let got = stream_call(&mut client, stream_request("gem", "early")).await;
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert!(got.messages.is_empty());
    // After a delta: the stream ends with an error, not FINISH_REASON_STOP.
    let got = stream_call(&mut client, stream_request("gem", "late")).await;
    assert_eq!(got.text(), "partial");
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert!(got.messages.iter().all(|m| m.finish_reason == 0), "no finish reason was made up: {got:?}");
}

#[tokio::test]
async fn a_stream_that_ends_without_a_finish_reason_is_an_error() {
    let model = "gemini-2.5-flash";
    let up = Upstream::with(move |i, _| {
        let text = gemini::text("t", model, "half an answer");
        if i == 0 { Reply::events(&[text]) } else { Reply::sse(vec![Step::send(text), Step::Close]) }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    for what in ["a clean EOF", "a broken connection"] {
        let got = stream_call(&mut client, stream_request("gem", "hi")).await;
        assert_eq!(got.text(), "half an answer", "{what}");
        assert_eq!(got.error().code(), Code::Unavailable, "{what}: {got:?}");
    }
}

#[tokio::test]
async fn falls_back_from_gemini_to_openai_and_not_on_a_rejected_request() {
    let up = Upstream::with(|i, r| {
        if r.path.ends_with("/chat/completions") {
            return Reply::events(&openai::answer("c", "gpt-4o-mini", &["from openai"], "stop", 2, 2));
        }
        // Requests are counted over both targets: Gemini gets 0, 2 and 4.
        match i {
            0 => Reply::json(503, &json!({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})),
            2 => Reply::sse(vec![Step::Close]),
            _ => Reply::json(
                400,
                &json!({"error": {"code": 400, "message": "Invalid JSON payload received.", "status": "INVALID_ARGUMENT"}}),
            ),
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    // A 503, then a stream broken before its first delta: both fall back.
    for _ in 0..2 {
        let got = stream_call(&mut client, stream_request("gem-then-openai", "hi")).await;
        got.end.as_ref().expect("the second target answers");
        assert_eq!((got.text().as_str(), got.messages[0].provider.as_str()), ("from openai", "oa"));
    }
    // A 400 is the caller's error: no fallback, Gemini's message carried.
    let got = stream_call(&mut client, stream_request("gem-then-openai", "hi")).await;
    let status = got.error();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("Invalid JSON payload"), "{status:?}");
    let paths: Vec<String> = up.requests().iter().map(|r| r.path.clone()).collect();
    let g = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse";
    assert_eq!(paths, [g, "/v1/chat/completions", g, "/v1/chat/completions", g]);
}

#[tokio::test]
async fn cancelling_the_call_closes_the_gemini_upstream() {
    let model = "gemini-2.5-flash";
    let up = Upstream::start(Reply::sse(vec![
        Step::send(gemini::text("slow", model, "first")),
        Step::Sleep(Duration::from_secs(60)),
        Step::send(gemini::finish("slow", model, "STOP", gemini::usage(1, 2, 0))),
    ]))
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("gem", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = within(WAIT, "the first message", stream.message()).await.expect("OK").expect("a message");
    assert_eq!(first.content, "first");
    let left = Instant::now();
    drop(stream);
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let latency = closed.saturating_duration_since(left);
    assert!(latency < CLOSE_BOUND, "the upstream saw the close {latency:?} after the caller left");
}

#[tokio::test]
async fn a_field_gemini_cannot_carry_is_refused_by_name_before_any_upstream_call() {
    let up = Upstream::start(Reply::events(&gemini::answer("r", "g", &["ok"], "STOP", 1, 1))).await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let mut named = stream_request("gem", "hi");
    named.messages[0].name = "bob".into();
    let mut big_seed = stream_request("gem", "hi");
    big_seed.seed = Some(1 << 40);
    for (request, field) in [(named, "messages[0].name"), (big_seed, "seed")] {
        let got = stream_call(&mut client, request).await;
        let status = got.error();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "names {field}: {status:?}");
    }
    assert!(up.requests().is_empty(), "nothing was sent upstream");
}

#[tokio::test]
async fn a_retryable_failure_is_retried_on_the_same_gemini_target() {
    let up = Upstream::with(|i, _| match i {
        0 => Reply::json(500, &json!({"error": {"code": 500, "message": "internal", "status": "INTERNAL"}})),
        _ => Reply::events(&gemini::answer("r", "gemini-2.5-flash", &["second try"], "STOP", 1, 2)),
    })
    .await;
    let yaml = gemini_config(&up).replacen(
        "    retry: { attempts: 1 }\n",
        "    retry: { attempts: 2, initial_backoff: 1ms, max_backoff: 1ms }\n",
        1,
    );
    let gw = Gateway::start(&yaml).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("gem", "hi")).await;
    got.end.as_ref().expect("the retry answers");
    assert_eq!(got.text(), "second try");
    let requests = up.requests();
    assert_eq!(requests.len(), 2, "one retry on the same target");
    for r in &requests {
        assert_gemini_request(r, "gemini-2.5-flash");
    }
}

#[tokio::test]
async fn a_slow_unary_answer_is_not_cut_by_the_first_token_timeout() {
    // The unary endpoint answers only when the whole answer is ready: the
    // first-token bound (200 ms here) must not abort it.
    let whole = json!({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "slow but whole"}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 3, "totalTokenCount": 5},
        "modelVersion": "gemini-2.5-flash", "responseId": "s1",
    });
    let up = Upstream::start(Reply::Response {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: crate::upstream::Body::Chunked(vec![Step::sleep_ms(600), Step::send(whole.to_string())]),
    })
    .await;
    let yaml = gemini_config(&up).replace(
        "  gm:\n    kind: gemini\n",
        "  gm:\n    kind: gemini\n    timeouts: { first_token: 200ms }\n",
    );
    let gw = Gateway::start(&yaml).await;
    let mut client = gw.client().await;
    let r = within(WAIT, "Completion", client.completion(completion_request("gem", "hi")))
        .await
        .expect("the whole answer, not a first-token timeout")
        .into_inner();
    assert_eq!(r.content, "slow but whole");
    assert_eq!(up.requests().len(), 1, "not retried");
}
