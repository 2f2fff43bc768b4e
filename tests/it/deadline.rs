//! `grpc-timeout`: the caller gets DEADLINE_EXCEEDED and the upstream request
//! is aborted, whether or not the caller's own client gives up too.

use std::time::{Duration, Instant};

use llm_gateway::api::pb;
use tonic::{Code, Request};

use crate::{
    harness::{
        CLOSE_BOUND, Gateway, RawH2, WAIT, collect, completion_request, config, stream_call, stream_request,
        within,
    },
    upstream::{Reply, Step, Upstream, slow_reply},
    wire::openai,
};

const DEADLINE_EXCEEDED: i32 = Code::DeadlineExceeded as i32;

/// The upstream saw its connection close, within [`CLOSE_BOUND`] of `deadline`.
async fn assert_aborted_at(up: &Upstream, deadline: Instant) {
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let late = closed.saturating_duration_since(deadline);
    assert!(late < CLOSE_BOUND, "the upstream saw the close {late:?} after the deadline");
}

#[tokio::test]
async fn tonic_timeout_mid_stream_is_deadline_exceeded() {
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let timeout = Duration::from_millis(400);
    let mut request = Request::new(stream_request("chat", "hi"));
    request.set_timeout(timeout);
    let started = Instant::now();
    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(request))
        .await
        .expect("the stream starts")
        .into_inner();
    let got = collect(&mut stream).await;
    let elapsed = started.elapsed();
    assert_eq!(got.text(), "first");
    assert_eq!(got.error().code(), Code::DeadlineExceeded, "{got:?}");
    assert!(
        elapsed >= timeout - Duration::from_millis(50),
        "ended {elapsed:?} after start, before the deadline"
    );
    assert_aborted_at(&up, started + timeout).await;
}

#[tokio::test]
async fn generous_timeout_changes_nothing() {
    let up =
        Upstream::start(Reply::events(&openai::answer("c", "gpt", &["all", " of it"], "stop", 1, 2))).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let mut request = Request::new(stream_request("chat", "hi"));
    request.set_timeout(Duration::from_secs(30));
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "all of it");
    assert!(up.none_closed_early());
}

/// A raw HTTP/2 call with `grpc-timeout: 200m`; the client never cancels, so
/// the status can only come from the gateway.
async fn raw_deadline(method: &str, reply: Reply, message: &impl prost::Message) -> (Vec<u8>, i32) {
    let up = Upstream::start(reply).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let started = Instant::now();
    let mut response = raw.call(method, &[("grpc-timeout", "200m")], message).await;
    let mut payloads = Vec::new();
    if method.ends_with("StreamCompletion") && response.headers.get("grpc-status").is_none() {
        while let Some(m) =
            within(WAIT, "a message or the end", response.message::<pb::StreamCompletionResponse>()).await
        {
            payloads.extend_from_slice(m.content.as_bytes());
        }
    }
    let (code, message, _) = within(WAIT, "the status", response.status()).await;
    assert_eq!(code, DEADLINE_EXCEEDED, "grpc-status {code} ({message})");
    assert_aborted_at(&up, started + Duration::from_millis(200)).await;
    (payloads, code)
}

#[tokio::test]
async fn raw_h2_stream_deadline_mid_answer() {
    let (text, _) = raw_deadline(
        "/llmgateway.v1.LlmGateway/StreamCompletion",
        slow_reply(),
        &stream_request("chat", "hi"),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&text), "first");
}

#[tokio::test]
async fn raw_h2_stream_deadline_before_the_first_token() {
    raw_deadline(
        "/llmgateway.v1.LlmGateway/StreamCompletion",
        Reply::sse(vec![Step::Hang]),
        &stream_request("chat", "hi"),
    )
    .await;
}

#[tokio::test]
async fn raw_h2_stream_deadline_before_the_response_headers() {
    raw_deadline("/llmgateway.v1.LlmGateway/StreamCompletion", Reply::Hang, &stream_request("chat", "hi"))
        .await;
}

#[tokio::test]
async fn raw_h2_completion_deadline_with_a_hanging_upstream() {
    raw_deadline("/llmgateway.v1.LlmGateway/Completion", Reply::Hang, &completion_request("chat", "hi"))
        .await;
}

#[tokio::test]
async fn raw_h2_completion_deadline_with_a_silent_stream() {
    raw_deadline("/llmgateway.v1.LlmGateway/Completion", slow_reply(), &completion_request("chat", "hi"))
        .await;
}

#[tokio::test]
async fn default_timeout_applies_without_grpc_timeout() {
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::start(&format!("server:\n  default_timeout: 300ms\n{}", config(&up.base_url()))).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let started = Instant::now();
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", &[], &stream_request("chat", "hi")).await;
    while within(WAIT, "a message or the end", response.message::<pb::StreamCompletionResponse>())
        .await
        .is_some()
    {}
    let (code, message, _) = within(WAIT, "the status", response.status()).await;
    assert_eq!(code, DEADLINE_EXCEEDED, "grpc-status {code} ({message})");
    assert_aborted_at(&up, started + Duration::from_millis(300)).await;
}

/// A raw call carrying `headers` to a gateway whose `server` section is
/// `server`: DEADLINE_EXCEEDED, and the upstream aborted, at `expected`.
async fn capped_deadline(server: &str, headers: &[(&str, &str)], expected: Duration) {
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::start(&format!("server:\n{server}{}", config(&up.base_url()))).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let started = Instant::now();
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", headers, &stream_request("chat", "hi")).await;
    while within(WAIT, "a message or the end", response.message::<pb::StreamCompletionResponse>())
        .await
        .is_some()
    {}
    let (code, message, _) = within(WAIT, "the status", response.status()).await;
    let elapsed = started.elapsed();
    assert_eq!(code, DEADLINE_EXCEEDED, "grpc-status {code} ({message})");
    assert!(elapsed >= expected - Duration::from_millis(50), "ended after {elapsed:?}, before {expected:?}");
    assert_aborted_at(&up, started + expected).await;
}

#[tokio::test]
async fn max_timeout_cuts_a_callers_longer_grpc_timeout() {
    // The caller asks for 99,999,999 hours; the gateway gives it 300 ms (not
    // the shorter default, which is for callers that ask for nothing).
    capped_deadline(
        "  default_timeout: 100ms\n  max_timeout: 300ms\n",
        &[("grpc-timeout", "99999999H")],
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test]
async fn max_timeout_bounds_a_call_without_any_other_deadline() {
    capped_deadline("  default_timeout: 0s\n  max_timeout: 300ms\n", &[], Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_shorter_grpc_timeout_still_wins_under_max_timeout() {
    capped_deadline("  max_timeout: 1h\n", &[("grpc-timeout", "250m")], Duration::from_millis(250)).await;
}
