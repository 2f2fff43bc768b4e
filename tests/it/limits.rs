//! Connection limits (`server.handshake_timeout`, `idle_timeout`,
//! `max_connections`, `max_request_bytes`) on the gRPC and admin listeners,
//! and slow readers: a caller that stops reading still has its deadline and
//! the drain's hard stop enforced, seen from the upstream, whose connection
//! closes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use llm_gateway::api::pb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    harness::{
        CLOSE_BOUND, Gateway, RawH2, RawResponse, WAIT, completion_request, config, eventually, get_status,
        stream_call, stream_request, within,
    },
    http,
    metrics::{sample, scrape},
    upstream::{Reply, Step, Upstream},
    wire::openai,
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

/// An upstream that streams 100 deltas of 500 bytes at once, then hangs:
/// only the gateway closing the connection ends it.
fn flood_then_hang() -> Reply {
    let mut steps = vec![Step::send(openai::role("c", "gpt"))];
    let chunk = "y".repeat(500);
    steps.extend((0..100).map(|_| Step::send(openai::content("c", "gpt", &chunk))));
    steps.push(Step::Hang);
    Reply::sse(steps)
}

/// Starts a stream for a caller with a 1 KiB window that never reads it.
async fn stalled_call(gw: &Gateway, headers: &[(&str, &str)]) -> (RawH2, RawResponse) {
    let mut raw = RawH2::with_window(gw.grpc, 1024).await;
    let response = raw.call(STREAM, headers, &stream_request("chat", "hi")).await;
    (raw, response)
}

#[tokio::test]
async fn a_caller_that_stops_reading_has_its_upstream_closed_at_the_deadline() {
    let up = Upstream::start(flood_then_hang()).await;
    let gw = Gateway::with_upstream(&up.base_url()).await;
    let started = Instant::now();
    let (mut raw, _unread) = stalled_call(&gw, &[("grpc-timeout", "700m")]).await;
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let at = closed.saturating_duration_since(started);
    assert!(at >= Duration::from_millis(650), "not before the deadline: {at:?}");
    assert!(at < Duration::from_millis(700) + CLOSE_BOUND, "at the deadline: {at:?}");
    // Only that stream was reset: the connection serves the next call.
    let response = raw.call(STREAM, &[], &stream_request("lorem", "hi")).await;
    let (code, message, _) = within(WAIT, "the next call's status", response.status()).await;
    assert_eq!(code, 0, "{message}");
    // Recorded as past its deadline, not as a caller who went away.
    let series = r#"llm_gateway_calls_total{front_door="grpc",method="StreamCompletion",model="chat",provider="oa",code="DEADLINE_EXCEEDED"} "#;
    eventually(WAIT, "the call's record", async || sample(&scrape(&gw).await, series) == Some(1.0)).await;
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_cut_at_the_drains_hard_stop() {
    let up = Upstream::start(flood_then_hang()).await;
    let mut gw = Gateway::start(&with_server("  shutdown_grace: 300ms\n", &up.base_url())).await;
    let (_raw, _unread) = stalled_call(&gw, &[]).await;
    within(WAIT, "the upstream request", up.request(0)).await;
    gw.trigger_shutdown();
    let asked = Instant::now();
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let at = closed.saturating_duration_since(asked);
    // The grace, then a second for the cancelled calls' statuses to leave.
    assert!(at >= Duration::from_millis(280), "not before the grace is over: {at:?}");
    assert!(at < Duration::from_millis(1300) + CLOSE_BOUND, "at the hard stop: {at:?}");
    within(WAIT, "the gateway to stop", gw.stopped()).await.expect("a clean stop");
}

/// An upstream that streams about 4 MB at once, then hangs: more than the
/// loopback socket buffers between gateway and caller hold.
fn megabytes_then_hang() -> Reply {
    const N: usize = 40;
    let mut steps = vec![Step::send(openai::role("c", "gpt"))];
    let chunk = "z".repeat(100_000);
    steps.extend((0..N).map(|_| Step::send(openai::content("c", "gpt", &chunk))));
    steps.push(Step::Hang);
    Reply::sse(steps)
}

#[tokio::test]
async fn an_http1_caller_that_stops_reading_has_its_upstream_closed_at_the_deadline() {
    let up = Upstream::start(megabytes_then_hang()).await;
    // The deadline leaves a debug build on a busy 2-core machine time to
    // push the 4 MB into the socket buffers first, so that what is timed is
    // the watchdog, not how fast the flood is parsed.
    let yaml =
        format!("http_listen: 127.0.0.1:0\n{}", with_server("  default_timeout: 1500ms\n", &up.base_url()));
    let gw = Gateway::start(&yaml).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = within(WAIT, "TCP connect", socket.connect(gw.http_addr())).await.expect("connect");
    let started = Instant::now();
    tcp.write_all(&http::raw_request(&http::chat_body("chat", true), true)).await.expect("write");
    // Reads nothing.
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let at = closed.saturating_duration_since(started);
    assert!(at >= Duration::from_millis(1450), "not before the deadline: {at:?}");
    assert!(at < Duration::from_millis(1500) + CLOSE_BOUND, "at the deadline: {at:?}");
}

#[tokio::test]
async fn a_kept_alive_http1_connection_outlives_its_last_calls_deadline() {
    let yaml = format!(
        "http_listen: 127.0.0.1:0\n{}",
        with_server("  default_timeout: 300ms\n", "http://127.0.0.1:9/v1")
    );
    let gw = Gateway::start(&yaml).await;
    let mut tcp = silent(gw.http_addr()).await;
    for i in 0..2 {
        tcp.write_all(&http::raw_request(&http::chat_body("lorem", true), true)).await.expect("write");
        let got = http::read_until(&mut tcp, "data: [DONE]").await;
        assert!(got.starts_with("HTTP/1.1 200"), "request {i}: {got}");
        // Past the deadline of the call just answered: a window to observe
        // an absence in, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
