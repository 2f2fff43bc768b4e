//! Connection limits (`server.handshake_timeout`, `idle_timeout`,
//! `max_connections`, `max_request_bytes`) on the gRPC and admin listeners.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use llm_gateway::api::pb;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    harness::{
        CLOSE_BOUND, Gateway, RawH2, WAIT, completion_request, config, eventually, get_status, stream_call,
        stream_request, within,
    },
    metrics::{sample, scrape},
};

const STREAM: &str = "/llmgateway.v1.LlmGateway/StreamCompletion";

fn with_server(server: &str, base_url: &str) -> String {
    format!("server:\n{server}{}", config(base_url))
}

/// A TCP connection that sends nothing.
async fn silent(addr: SocketAddr) -> TcpStream {
    within(WAIT, "TCP connect", TcpStream::connect(addr)).await.expect("connect")
}

/// Waits for the server to close `tcp` (EOF or reset) and returns when.
async fn closed_by_server(tcp: &mut TcpStream) -> Instant {
    let mut buf = [0u8; 256];
    loop {
        match within(WAIT, "the server to close the connection", tcp.read(&mut buf)).await {
            Ok(0) | Err(_) => return Instant::now(),
            // An HTTP/2 server's SETTINGS, or a 408 on HTTP/1.1: read on.
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn a_connection_that_never_speaks_is_closed_at_the_handshake_timeout() {
    let gw = Gateway::start(&with_server("  handshake_timeout: 300ms\n", "http://127.0.0.1:9/v1")).await;
    let opened = Instant::now();
    let mut tcp = silent(gw.grpc).await;
    // One that sends its HTTP/2 preface and settings but no request.
    let mut preface_only = RawH2::connect(gw.grpc, false).await;
    let closed = closed_by_server(&mut tcp).await - opened;
    assert!(closed >= Duration::from_millis(280), "not before the timeout: {closed:?}");
    assert!(closed < Duration::from_millis(300) + CLOSE_BOUND, "at the timeout: {closed:?}");
    within(WAIT, "the preface-only connection to close", preface_only.closed()).await;
    assert!(opened.elapsed() >= Duration::from_millis(280));
}

#[tokio::test]
async fn a_connection_that_calls_in_time_outlives_the_handshake_timeout() {
    let yaml = with_server("  handshake_timeout: 300ms\n  idle_timeout: 0s\n", "http://127.0.0.1:9/v1");
    let gw = Gateway::start(&yaml).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let response = raw.call(STREAM, &[], &stream_request("lorem", "hi")).await;
    let (code, message, _) = within(WAIT, "the status", response.status()).await;
    assert_eq!(code, 0, "{message}");
    // A window to observe an absence in, not a synchronisation.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!raw.is_closed(), "a connection that made its first request in time stays open");
}

#[tokio::test]
async fn past_max_connections_new_ones_are_refused_and_counted() {
    let gw = Gateway::start(&with_server("  max_connections: 2\n", "http://127.0.0.1:9/v1")).await;
    let series = |name: &str| format!("llm_gateway_{name}{{listener=\"grpc\"}} ");
    let (a, _b) = (silent(gw.grpc).await, silent(gw.grpc).await);
    eventually(WAIT, "two connections open", async || {
        sample(&scrape(&gw).await, &series("connections_open")) == Some(2.0)
    })
    .await;
    let mut third = silent(gw.grpc).await;
    let asked = Instant::now();
    let refused = closed_by_server(&mut third).await - asked;
    assert!(refused < CLOSE_BOUND, "refused at once, not left waiting: {refused:?}");
    let text = scrape(&gw).await;
    assert_eq!(sample(&text, &series("connections_refused_total")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &series("connections_open")), Some(2.0), "{text}");
    // One closes: there is room again.
    drop(a);
    eventually(WAIT, "one connection open", async || {
        sample(&scrape(&gw).await, &series("connections_open")) == Some(1.0)
    })
    .await;
    let mut client = gw.client().await;
    within(WAIT, "Completion", client.completion(completion_request("lorem", "hi")))
        .await
        .expect("a call on the connection that fits");
}

#[tokio::test]
async fn the_http_front_door_counts_and_refuses_its_own_connections() {
    let yaml = format!(
        "http_listen: 127.0.0.1:0\n{}",
        with_server("  max_connections: 2\n", "http://127.0.0.1:9/v1")
    );
    let gw = Gateway::start(&yaml).await;
    let series = |name: &str| format!("llm_gateway_{name}{{listener=\"http\"}} ");
    let _held = (silent(gw.http_addr()).await, silent(gw.http_addr()).await);
    eventually(WAIT, "two HTTP connections open", async || {
        sample(&scrape(&gw).await, &series("connections_open")) == Some(2.0)
    })
    .await;
    let mut third = silent(gw.http_addr()).await;
    let asked = Instant::now();
    let refused = closed_by_server(&mut third).await - asked;
    assert!(refused < CLOSE_BOUND, "refused at once: {refused:?}");
    let text = scrape(&gw).await;
    assert_eq!(sample(&text, &series("connections_refused_total")), Some(1.0), "{text}");
    // The gRPC listener has room of its own.
    let mut client = gw.client().await;
    within(WAIT, "Completion", client.completion(completion_request("lorem", "hi")))
        .await
        .expect("a gRPC call while the HTTP listener is full");
}

#[tokio::test]
async fn an_idle_connection_gets_goaway_and_a_busy_one_does_not() {
    let gw = Gateway::start(&with_server("  idle_timeout: 300ms\n", "http://127.0.0.1:9/v1")).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    // `slow` streams for about two seconds: far past the idle timeout.
    let mut response = raw.call(STREAM, &[], &stream_request("slow", "hi")).await;
    let started = Instant::now();
    let mut messages = 0;
    while within(WAIT, "the next message", response.message::<pb::StreamCompletionResponse>()).await.is_some()
    {
        messages += 1;
    }
    let (code, message, _) = within(WAIT, "the status", response.status()).await;
    assert_eq!(code, 0, "a call in flight keeps its connection however long it runs: {message}");
    assert!(messages >= 40 && started.elapsed() > Duration::from_millis(600), "{messages} messages");
    let ended = Instant::now();
    within(WAIT, "the idle connection to close", raw.closed()).await;
    let idle = ended.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed once idle for the timeout, not before: {idle:?}");
    assert!(idle < Duration::from_millis(300) + CLOSE_BOUND, "{idle:?}");
}

#[tokio::test]
async fn an_oversized_request_gets_resource_exhausted_naming_the_limit() {
    let gw = Gateway::start(&with_server("  max_request_bytes: 2048\n", "http://127.0.0.1:9/v1")).await;
    let mut client = gw.client().await;
    let big = "x".repeat(4000);
    let check = |status: tonic::Status| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("server.max_request_bytes") && status.message().contains("2048"),
            "{status:?}"
        );
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_REQUEST", "llmgateway.v1"));
        let violation = &details.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!(violation.field, "request");
    };
    let unary = within(WAIT, "Completion", client.completion(completion_request("echo", &big))).await;
    check(unary.expect_err("refused"));
    let streamed = stream_call(&mut client, stream_request("echo", &big)).await;
    assert!(streamed.messages.is_empty());
    check(streamed.error().clone());
    // Under the limit, and on the same connection: served.
    let small = within(WAIT, "Completion", client.completion(completion_request("lorem", "hello"))).await;
    assert!(!small.expect("served").into_inner().content.is_empty());
}

#[tokio::test]
async fn the_admin_listener_has_the_same_limits() {
    let yaml = with_server("  handshake_timeout: 300ms\n  max_connections: 2\n", "http://127.0.0.1:9/v1");
    let gw = Gateway::start(&yaml).await;
    let opened = Instant::now();
    let (mut a, mut b) = (silent(gw.admin).await, silent(gw.admin).await);
    let mut third = silent(gw.admin).await;
    let refused = closed_by_server(&mut third).await - opened;
    assert!(refused < Duration::from_millis(280), "the third is refused at once: {refused:?}");
    for tcp in [&mut a, &mut b] {
        let closed = closed_by_server(tcp).await - opened;
        assert!(closed >= Duration::from_millis(280), "a silent one is closed at the timeout: {closed:?}");
        assert!(closed < Duration::from_millis(300) + CLOSE_BOUND, "{closed:?}");
    }
    // Room again; the admin endpoints answer, and counted the refusal.
    eventually(WAIT, "/healthz", async || get_status(&gw.admin_url("/healthz")).await == 200).await;
    let text = scrape(&gw).await;
    let refused = sample(&text, "llm_gateway_connections_refused_total{listener=\"admin\"} ");
    assert_eq!(refused, Some(1.0), "{text}");
}
