//! The gateway's own keep-alive connections to a plain-HTTP upstream
//! (`providers/conn.rs`): one connection carries call after call, a connection
//! the upstream closes (announced or not) is never used again, and a body
//! that goes quiet is cut at `timeouts.read`.

use std::time::{Duration, Instant};

use tonic::Code;

use llm_gateway::api::pb::llm_gateway_client::LlmGatewayClient;

use crate::{
    harness::{Binary, CLOSE_BOUND, Gateway, KEY_ENV, WAIT, connect, stream_call, stream_request, within},
    socks::Socks,
    upstream::{Reply, Step, Upstream},
    wire::openai,
};

fn answer(text: &str) -> Vec<String> {
    openai::answer("id", "gpt", &[text], "stop", 1, 1)
}

/// One OpenAI-compatible model `chat` on `base_url`, with no retry: a call
/// that met a dead connection would fail instead of being retried.
fn config(base_url: &str, extra: &str) -> String {
    format!(
        "providers:\n  oa:\n    kind: openai\n    base_url: {base_url}\n    api_key_env: {KEY_ENV}\n    \
         retry: {{ attempts: 1 }}\n{extra}models:\n  chat:\n    targets: [{{ provider: oa, model: gpt }}]\n"
    )
}

#[tokio::test]
async fn calls_one_after_another_share_one_upstream_connection() {
    let up = Upstream::start(Reply::events(&answer("ok"))).await;
    let gw = Gateway::start(&config(&up.base_url(), "")).await;
    let mut client = gw.client().await;
    for i in 0..4 {
        let got = stream_call(&mut client, stream_request("chat", "hi")).await;
        assert!(got.end.is_ok(), "call {i}: {got:?}");
        assert_eq!(got.text(), "ok", "call {i}");
    }
    let requests = up.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.conn == 0), "one connection: {:?}", requests.iter().map(|r| r.conn));
    let r = &requests[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("host"), Some(up.addr().to_string().as_str()), "{:?}", r.headers);
    assert!(r.header("user-agent").is_some_and(|ua| ua.starts_with("llm-gateway/")), "{:?}", r.headers);
    assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
}

#[tokio::test]
async fn an_answer_that_announces_its_close_is_followed_on_a_new_connection() {
    let up = Upstream::start(Reply::events(&answer("ok")).with_header("connection", "close")).await;
    let gw = Gateway::start(&config(&up.base_url(), "")).await;
    let mut client = gw.client().await;
    for i in 0..3 {
        let got = stream_call(&mut client, stream_request("chat", "hi")).await;
        assert!(got.end.is_ok(), "call {i}: {got:?}");
    }
    let conns: Vec<usize> = up.requests().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 1, 2]);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let mut events: Vec<Step> = answer("ok").into_iter().map(Step::send).collect();
    events.push(Step::EndAndClose);
    let up = Upstream::start(Reply::sse(events)).await;
    let gw = Gateway::start(&config(&up.base_url(), "")).await;
    let mut client = gw.client().await;
    for i in 0..3 {
        let got = stream_call(&mut client, stream_request("chat", "hi")).await;
        assert!(got.end.is_ok(), "call {i}: {got:?}");
        assert_eq!(got.text(), "ok", "call {i}");
        // The upstream has closed this connection by the time it reports the
        // answer finished.
        within(WAIT, "the answer to finish", up.finished(i)).await;
    }
    let conns: Vec<usize> = up.requests().iter().map(|r| r.conn).collect();
    assert_eq!(conns, [0, 1, 2]);
}

#[tokio::test]
async fn a_body_quiet_past_timeouts_read_breaks_off_and_closes_the_upstream() {
    let mut steps: Vec<Step> = openai::answer("id", "gpt", &["Hello", " world"], "stop", 1, 2)
        .into_iter()
        .take(2)
        .map(Step::send)
        .collect();
    steps.push(Step::Hang);
    let up = Upstream::start(Reply::sse(steps)).await;
    let read = Duration::from_millis(300);
    let gw =
        Gateway::start(&config(&up.base_url(), "    timeouts: { read: 300ms, first_token: 10s }\n")).await;
    let mut client = gw.client().await;
    let started = Instant::now();
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    let took = started.elapsed();
    assert_eq!(got.error().code(), Code::Unavailable, "{got:?}");
    assert_eq!(got.text(), "Hello", "the delta before the silence arrives");
    assert!(took >= read, "broke off after {took:?}, before timeouts.read");
    assert!(took < read + WAIT, "broke off after {took:?}");
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    assert!(closed.saturating_duration_since(started) < read + CLOSE_BOUND);
}

#[tokio::test]
async fn a_proxy_named_by_the_environment_still_carries_the_calls() {
    // The direct connections are for upstreams reached with no proxy: with
    // ALL_PROXY set, reqwest (which reads it) takes the call to the proxy.
    let up = Upstream::start(Reply::events(&answer("via proxy"))).await;
    let socks = Socks::start().await;
    let proxy = format!("socks5://{}", socks.addr());
    let gw = Binary::start(&config(&up.base_url(), ""), &[("ALL_PROXY", &proxy)]).await;
    let mut client = LlmGatewayClient::new(connect(gw.grpc).await);
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    assert!(got.end.is_ok(), "{got:?}");
    assert_eq!(got.text(), "via proxy");
    let connects = socks.connects();
    assert_eq!(connects.len(), 1, "{connects:?}");
    assert!(connects[0].0.ends_with(&format!(":{}", up.addr().port())), "{connects:?}");
}
