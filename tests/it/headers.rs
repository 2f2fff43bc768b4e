//! Response metadata: `x-request-id` (echoed or generated), `x-llm-provider`
//! and `x-llm-model`, on answers and on errors alike.

use tonic::{Code, Request, metadata::MetadataMap};

use crate::{
    harness::{Gateway, WAIT, completion_request, md, stream_call, stream_request, within},
    upstream::{Reply, Step, Upstream},
    wire::openai,
};

fn with_request_id<T>(message: T, id: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("x-request-id", id.parse().expect("ascii"));
    r
}

fn assert_generated_id(md_map: &MetadataMap) -> String {
    let id = md(md_map, "x-request-id");
    assert!(!id.is_empty() && id.len() <= 128, "a generated x-request-id: {md_map:?}");
    id.to_owned()
}

fn answer() -> Reply {
    Reply::events(&openai::answer("chatcmpl-h", "gpt-4o-mini-2024-07-18", &["a", "b"], "stop", 1, 2))
}

#[tokio::test]
async fn request_id_is_echoed_when_sent() {
    let up = Upstream::start(answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r = within(
        WAIT,
        "Completion",
        client.completion(with_request_id(completion_request("chat", "hi"), "req-1")),
    )
    .await
    .expect("Completion OK");
    assert_eq!(md(r.metadata(), "x-request-id"), "req-1");

    let r = within(
        WAIT,
        "StreamCompletion",
        client.stream_completion(with_request_id(stream_request("chat", "hi"), "req-2")),
    )
    .await
    .expect("StreamCompletion OK");
    assert_eq!(md(r.metadata(), "x-request-id"), "req-2");

    // On errors too.
    let s = within(
        WAIT,
        "Completion",
        client.completion(with_request_id(completion_request("nope", "hi"), "req-3")),
    )
    .await
    .expect_err("unknown model");
    assert_eq!(s.code(), Code::NotFound);
    assert_eq!(md(s.metadata(), "x-request-id"), "req-3", "{s:?}");
}

#[tokio::test]
async fn request_id_is_generated_when_absent() {
    let up = Upstream::start(answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r =
        within(WAIT, "Completion", client.completion(completion_request("chat", "hi"))).await.expect("OK");
    let a = assert_generated_id(r.metadata());
    let r = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("OK");
    let b = assert_generated_id(r.metadata());
    let s = within(WAIT, "Completion", client.completion(completion_request("nope", "hi")))
        .await
        .expect_err("404");
    let c = assert_generated_id(s.metadata());
    assert!(a != b && b != c && a != c, "one id per call: {a} {b} {c}");
}

#[tokio::test]
async fn provider_and_model_headers_on_answers() {
    let up = Upstream::start(answer()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let r =
        within(WAIT, "Completion", client.completion(completion_request("chat", "hi"))).await.expect("OK");
    assert_eq!(md(r.metadata(), "x-llm-provider"), "oa");
    assert_eq!(md(r.metadata(), "x-llm-model"), "gpt-4o-mini-2024-07-18", "the upstream model that answered");

    let r = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("OK");
    assert_eq!(md(r.metadata(), "x-llm-provider"), "oa");
    assert_eq!(md(r.metadata(), "x-llm-model"), "gpt-4o-mini-2024-07-18");

    let r = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("lorem", "hi")))
        .await
        .expect("OK");
    assert_eq!(md(r.metadata(), "x-llm-provider"), "mk");
    assert_eq!(md(r.metadata(), "x-llm-model"), "lorem?tokens=12");
}

// A status from a failed upstream names the target that failed last.
#[tokio::test]
async fn provider_and_model_headers_on_upstream_errors() {
    let up = Upstream::start(Reply::error(400, "bad request")).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let s = within(
        WAIT,
        "Completion",
        client.completion(with_request_id(completion_request("chat", "hi"), "e-1")),
    )
    .await
    .expect_err("upstream 400");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(md(s.metadata(), "x-request-id"), "e-1");
    assert_eq!(md(s.metadata(), "x-llm-provider"), "oa", "on an upstream error: {s:?}");
    assert_eq!(md(s.metadata(), "x-llm-model"), "gpt-4o-mini", "on an upstream error: {s:?}");

    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    let s = got.error();
    assert_eq!(md(s.metadata(), "x-llm-provider"), "oa", "on an upstream error: {s:?}");
    assert_eq!(md(s.metadata(), "x-llm-model"), "gpt-4o-mini", "on an upstream error: {s:?}");
}

#[tokio::test]
async fn headers_in_the_trailers_of_a_stream_broken_midway() {
    let up = Upstream::start(Reply::sse(vec![
        Step::send(openai::role("c", "gpt-mid")),
        Step::send(openai::content("c", "gpt-mid", "partial")),
        Step::Close,
    ]))
    .await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let got = stream_call(&mut client, with_request_id(stream_request("chat", "hi"), "mid-1")).await;
    assert_eq!(got.text(), "partial");
    let s = got.error();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(md(s.metadata(), "x-request-id"), "mid-1", "{s:?}");
    assert_eq!(md(s.metadata(), "x-llm-provider"), "oa", "{s:?}");
    assert_eq!(md(s.metadata(), "x-llm-model"), "gpt-mid", "{s:?}");
}
