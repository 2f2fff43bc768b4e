//! A caller who cancels or disconnects aborts the upstream request, asserted on
//! the upstream side: it sees its connection close. The upstream is silent
//! when the caller leaves, so only the gateway closing the connection can tell it.

use std::time::Instant;

use llm_gateway::api::pb;
use tonic::Streaming;

use crate::{
    harness::{
        CLOSE_BOUND, Gateway, RawH2, WAIT, completion_request, grpc_frame, stream_call, stream_request,
        within,
    },
    upstream::{Reply, Step, Upstream, slow_reply},
    wire::openai,
};

async fn read_until_first(stream: &mut Streaming<pb::StreamCompletionResponse>) {
    loop {
        let m = within(WAIT, "a stream message", stream.message())
            .await
            .expect("the stream runs")
            .expect("the stream has not ended");
        if m.content == "first" {
            return;
        }
    }
}

/// Waits for the upstream to see its connection close and checks how soon.
async fn assert_upstream_closed(up: &Upstream, since: Instant) {
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let latency = closed.saturating_duration_since(since);
    assert!(latency < CLOSE_BOUND, "the upstream saw the close {latency:?} after the caller left");
}

/// The gateway still answers after a cancel.
async fn assert_still_serving(gw: &Gateway) {
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("lorem", "hi")).await;
    got.end.as_ref().expect("a new call after a cancel succeeds");
}

#[tokio::test]
async fn dropping_the_stream_mid_answer_closes_the_upstream() {
    // The first request gets the slow answer, the next a quick one.
    let up = Upstream::with(|i, _| {
        if i == 0 { slow_reply() } else { Reply::events(&openai::answer("q", "gpt", &["ok"], "stop", 1, 1)) }
    })
    .await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;

    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    read_until_first(&mut stream).await;
    let left = Instant::now();
    drop(stream);
    assert_upstream_closed(&up, left).await;

    // The same model answers again, on a fresh upstream connection.
    let got = stream_call(&mut client, stream_request("chat", "hi")).await;
    got.end.as_ref().expect("a new call after a cancel succeeds");
    assert_eq!(got.text(), "ok");
    let requests = up.requests();
    assert_ne!(requests[1].conn, requests[0].conn, "the aborted connection is not reused");
}

#[tokio::test]
async fn dropping_client_and_channel_closes_the_upstream() {
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let channel = gw.channel().await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(channel.clone());

    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    read_until_first(&mut stream).await;
    let left = Instant::now();
    drop(client);
    drop(channel);
    drop(stream);
    assert_upstream_closed(&up, left).await;
    assert_still_serving(&gw).await;
}

/// A caller process that dies: its HTTP/2 connection goes away with no
/// RST_STREAM and no GOAWAY; with `abortive`, as a TCP reset.
async fn killed_caller(abortive: bool) {
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut raw = RawH2::connect(gw.grpc, abortive).await;
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", &[], &stream_request("chat", "hi")).await;
    assert_eq!(response.headers.get("grpc-status"), None, "not an immediate error: {:?}", response.headers);
    loop {
        let m: pb::StreamCompletionResponse =
            within(WAIT, "a stream message", response.message()).await.expect("a message");
        if m.content == "first" {
            break;
        }
    }
    let left = Instant::now();
    drop(response);
    raw.kill().await;
    assert_upstream_closed(&up, left).await;
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn a_killed_callers_connection_closes_the_upstream() {
    killed_caller(false).await;
}

#[tokio::test]
async fn a_reset_callers_connection_closes_the_upstream() {
    killed_caller(true).await;
}

/// The caller gives up while the gateway still waits for the first token
/// (`reply` sends headers and nothing, or nothing at all).
async fn cancel_before_the_first_token(reply: Reply, unary: bool) {
    let up = Upstream::start(reply).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let arrived = async {
        within(WAIT, "the upstream request", up.request(0)).await;
    };
    if unary {
        tokio::select! {
            r = client.completion(completion_request("chat", "hi")) => panic!("the call ended: {r:?}"),
            () = arrived => {}
        }
    } else {
        tokio::select! {
            r = client.stream_completion(stream_request("chat", "hi")) => panic!("the call ended: {r:?}"),
            () = arrived => {}
        }
    }
    // The call's future is gone: tonic resets the HTTP/2 stream.
    let left = Instant::now();
    assert_upstream_closed(&up, left).await;
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn cancel_before_the_first_token_closes_the_upstream() {
    cancel_before_the_first_token(Reply::sse(vec![Step::Hang]), false).await;
}

#[tokio::test]
async fn cancel_before_the_response_headers_closes_the_upstream() {
    cancel_before_the_first_token(Reply::Hang, false).await;
}

#[tokio::test]
async fn cancel_of_a_unary_call_closes_the_upstream() {
    cancel_before_the_first_token(Reply::sse(vec![Step::send(openai::role("c", "m")), Step::Hang]), true)
        .await;
}

#[tokio::test]
async fn raw_reset_stream_closes_the_upstream() {
    // RST_STREAM(CANCEL) on one stream, the connection stays up.
    let up = Upstream::start(slow_reply()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let tcp = within(WAIT, "connect", tokio::net::TcpStream::connect(gw.grpc)).await.expect("connect");
    let (send, conn) = within(WAIT, "handshake", h2::client::handshake(tcp)).await.expect("handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = within(WAIT, "ready", send.ready()).await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/llmgateway.v1.LlmGateway/StreamCompletion", gw.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = send.send_request(request, false).expect("send");
    body.send_data(grpc_frame(&stream_request("chat", "hi")), true).expect("send body");
    let mut response = within(WAIT, "headers", response).await.expect("headers").into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("first") {
        let chunk = within(WAIT, "data", response.data()).await.expect("data").expect("data ok");
        let _ = response.flow_control().release_capacity(chunk.len());
        seen.extend_from_slice(&chunk);
    }
    let left = Instant::now();
    body.send_reset(h2::Reason::CANCEL);
    assert_upstream_closed(&up, left).await;
    conn.abort();
}
