//! Targets are tried in order, and only before the first delta reaches the
//! caller (CONTRACT.md section 2): after that a failure ends the stream.

use tonic::Code;

use crate::{
    harness::{
        Gateway, WAIT, completion_request, config_with_model, md, stream_call, stream_request, within,
    },
    upstream::{Reply, Step, Upstream},
    wire::{anthropic, openai},
};

/// A model `pair`: first the openai target, then the anthropic one, both on `up`.
async fn gateway(up: &Upstream) -> Gateway {
    let yaml = config_with_model(&up.base_url(), "pair", "oa", "gpt-first");
    Gateway::start(&yaml.replace(
        "[{ provider: oa, model: \"gpt-first\" }]",
        "[{ provider: oa, model: \"gpt-first\" }, { provider: an, model: \"claude-second\" }]",
    ))
    .await
}

fn anthropic_ok() -> Reply {
    Reply::events(&anthropic::answer("msg_f", "claude-second", &["from ", "the second"], "end_turn", 2, 3))
}

#[tokio::test]
async fn a_failing_first_target_falls_back_to_the_next() {
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") { Reply::error(503, "overloaded") } else { anthropic_ok() }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;

    let r =
        within(WAIT, "Completion", client.completion(completion_request("pair", "hi"))).await.expect("OK");
    assert_eq!(md(r.metadata(), "x-llm-provider"), "an");
    let r = r.into_inner();
    assert_eq!((r.provider.as_str(), r.content.as_str()), ("an", "from the second"));

    let got = stream_call(&mut client, stream_request("pair", "hi")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "from the second");
    assert_eq!(got.messages[0].provider, "an");
    let paths: Vec<String> = up.requests().iter().map(|r| r.path.clone()).collect();
    // A 503 is retried once on its target (retry.attempts defaults to 2), then falls back.
    let (oa, an) = ("/v1/chat/completions", "/v1/messages");
    assert_eq!(paths, [oa, oa, an, oa, oa, an]);
}

#[tokio::test]
async fn a_stream_broken_before_its_first_delta_falls_back() {
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") { Reply::sse(vec![Step::Close]) } else { anthropic_ok() }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("pair", "hi")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "from the second");
}

#[tokio::test]
async fn a_rejected_request_does_not_fall_back() {
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") {
            Reply::error(400, "bad max_tokens")
        } else {
            anthropic_ok()
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let s = within(WAIT, "Completion", client.completion(completion_request("pair", "hi")))
        .await
        .expect_err("the caller's error is final");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(up.requests().len(), 1, "the second target is not tried");
}

#[tokio::test]
async fn no_fallback_after_the_first_delta() {
    let up = Upstream::with(|_, r| {
        if r.path.ends_with("/chat/completions") {
            Reply::sse(vec![
                Step::send(openai::role("c", "gpt-first")),
                Step::send(openai::content("c", "gpt-first", "partial")),
                Step::Close,
            ])
        } else {
            anthropic_ok()
        }
    })
    .await;
    let gw = gateway(&up).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("pair", "hi")).await;
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert_eq!(got.text(), "partial", "no second answer spliced onto the first");
    assert_eq!(up.requests().len(), 1, "the second target is not tried after a delta was sent");
}
