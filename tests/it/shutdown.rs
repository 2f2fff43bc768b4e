//! Draining on SIGTERM (the real binary) and on the shutdown future (in
//! process): not ready, NOT_SERVING, no new connections, calls in flight run
//! to the end of the grace period and are then cancelled, exit 0.

use std::time::{Duration, Instant};

use llm_gateway::{api::pb, providers::mock::lorem};
use tokio::net::TcpStream;
use tonic::{Code, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    harness::{
        Binary, CLOSE_BOUND, Gateway, WAIT, collect, config, config_with_model, connect, eventually,
        get_status, stream_request, within,
    },
    streaming::assert_stream_shape,
    upstream::{Reply, Step, Upstream, slow_reply},
    wire::openai,
};

#[tokio::test]
async fn sigterm_drains_and_lets_the_stream_in_flight_finish() {
    // 60 tokens, 50 ms apart: three seconds in flight, time enough for the
    // checks below even on a loaded machine.
    let yaml = config_with_model("http://127.0.0.1:9/v1", "drain", "mk", "lorem?tokens=60&delay=50ms");
    let mut bin = Binary::start(&yaml, &[]).await;
    let channel = connect(bin.grpc).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(get_status(&bin.admin_url("/readyz")).await, 200, "ready before SIGTERM");

    let mut watch = within(WAIT, "Health/Watch", health.watch(HealthCheckRequest { service: String::new() }))
        .await
        .expect("Watch")
        .into_inner();
    let first = within(WAIT, "the first health status", watch.message()).await.expect("status").expect("one");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut stream =
        within(WAIT, "StreamCompletion", client.stream_completion(stream_request("drain", "hi")))
            .await
            .expect("the stream starts")
            .into_inner();
    let head = within(WAIT, "the first message", stream.message()).await.expect("ok").expect("a message");

    bin.proc.signal("TERM");
    let signalled = Instant::now();

    // Health turns NOT_SERVING for the watcher…
    let next = within(WAIT, "NOT_SERVING on Watch", watch.message()).await.expect("status").expect("one");
    assert_eq!(next.status, ServingStatus::NotServing as i32, "{next:?}");
    drop(watch);
    // …readyz says 503 (the admin listener is still up)…
    let readyz = bin.admin_url("/readyz");
    eventually(Duration::from_secs(2), "/readyz to answer 503", async || get_status(&readyz).await == 503)
        .await;
    // …and new connections are refused.
    let grpc = bin.grpc;
    eventually(Duration::from_secs(2), "new connections to be refused", async || {
        TcpStream::connect(grpc).await.is_err()
    })
    .await;
    // A probe on a new connection: refused, or told NOT_SERVING.
    let endpoint = Endpoint::from_shared(format!("http://{grpc}")).expect("uri");
    match within(WAIT, "a new connection attempt", endpoint.connect()).await {
        Err(_) => {}
        Ok(ch) => {
            let r = within(WAIT, "Health/Check", HealthClient::new(ch).check(HealthCheckRequest::default()))
                .await;
            if let Ok(r) = r {
                assert_eq!(r.into_inner().status, ServingStatus::NotServing as i32);
            }
        }
    }
    assert!(signalled.elapsed() < Duration::from_secs(3), "the checks ran while the stream was in flight");

    // The call in flight runs to its end.
    let rest = collect(&mut stream).await;
    rest.end.as_ref().expect("the stream in flight completes OK");
    let mut messages = vec![head];
    messages.extend(rest.messages);
    assert_eq!(messages.iter().map(|m| m.content.as_str()).collect::<String>(), lorem(60));
    assert_stream_shape(&messages, "mk", "lorem?tokens=60&delay=50ms", pb::FinishReason::Stop);

    let status = within(WAIT, "the process to exit", bin.proc.exit()).await;
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", bin.proc.stderr_text());
    assert!(
        bin.proc.stdout_text().contains("\"draining\""),
        "a draining log line:\n{}",
        bin.proc.stdout_text()
    );
}

#[tokio::test]
async fn sigterm_cancels_calls_after_the_grace_period() {
    let up = Upstream::start(slow_reply()).await;
    let yaml = format!(
        "server:\n  shutdown_grace: 300ms\n{}",
        config(&up.base_url()).replace(crate::harness::KEY_ENV, "LLMGW_IT_KEY")
    );
    let mut bin = Binary::start(&yaml, &[("LLMGW_IT_KEY", "sk-binary-test")]).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(bin.grpc).await);

    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    loop {
        let m = within(WAIT, "a message", stream.message()).await.expect("ok").expect("a message");
        if m.content == "first" {
            break;
        }
    }
    let request = up.requests().remove(0);
    assert_eq!(request.header("authorization"), Some("Bearer sk-binary-test"), "the key from api_key_env");

    bin.proc.signal("TERM");
    let signalled = Instant::now();
    let rest = collect(&mut stream).await;
    let ended = signalled.elapsed();
    assert_eq!(rest.error().code(), Code::Unavailable, "{rest:?}");
    assert!(ended >= Duration::from_millis(250), "cancelled after {ended:?}, before the 300ms grace period");
    assert!(ended < Duration::from_secs(3), "cancelled after {ended:?}, long after the grace period");

    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let late = closed.saturating_duration_since(signalled + Duration::from_millis(300));
    assert!(late < CLOSE_BOUND, "the upstream saw the close {late:?} after the grace period");

    let status = within(WAIT, "the process to exit", bin.proc.exit()).await;
    assert!(status.success(), "exit status {status:?}; stderr:\n{}", bin.proc.stderr_text());
}

// The signal handlers are installed before the `serving` line is logged, so a
// signal right after it drains rather than killing the process.
#[tokio::test]
async fn sigint_right_after_start_drains_and_exits_zero() {
    // A signal as soon as the gateway says it serves: it must already be
    // handled (drain, exit 0), not kill the process. A few rounds, since
    // the window, if there is one, is narrow.
    for (round, signal) in ["INT", "TERM", "INT"].into_iter().enumerate() {
        let mut bin = Binary::start(&config("http://127.0.0.1:9/v1"), &[]).await;
        bin.proc.signal(signal);
        let status = within(WAIT, "the process to exit", bin.proc.exit()).await;
        assert!(
            status.success(),
            "round {round}: SIG{signal} right after `serving`: exit status {status:?}; stdout:\n{}",
            bin.proc.stdout_text()
        );
    }
}

#[tokio::test]
async fn invalid_config_stops_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nproviders: {}\nmodels: {}\n")
        .expect("write");
    let mut proc = crate::harness::Proc::spawn(&[std::ffi::OsStr::new("--config"), path.as_os_str()], &[]);
    let status = within(WAIT, "the process to exit", proc.exit()).await;
    assert!(!status.success(), "an invalid config must not start");
    assert!(proc.stderr_text().contains("models"), "the message names the key: {}", proc.stderr_text());
}

#[tokio::test]
async fn in_process_shutdown_lets_the_stream_finish() {
    let mut steps = vec![Step::send(openai::role("c", "gpt-paced"))];
    for i in 0..10 {
        steps.push(Step::sleep_ms(60));
        steps.push(Step::send(openai::content("c", "gpt-paced", &format!("{i} "))));
    }
    steps.extend([
        Step::send(openai::finish("c", "gpt-paced", "stop")),
        Step::send(openai::usage("c", "gpt-paced", 1, 10)),
        Step::send(openai::DONE),
    ]);
    let up = Upstream::start(Reply::sse(steps)).await;
    let mut gw = Gateway::with_upstream(&up.base_url()).await;
    let mut client = gw.client().await;
    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    let head = within(WAIT, "the first message", stream.message()).await.expect("ok").expect("a message");

    gw.trigger_shutdown();
    let readyz = gw.admin_url("/readyz");
    eventually(Duration::from_secs(2), "/readyz to answer 503", async || get_status(&readyz).await == 503)
        .await;

    let rest = collect(&mut stream).await;
    rest.end.as_ref().expect("the stream in flight completes OK");
    let text: String = std::iter::once(&head).chain(&rest.messages).map(|m| m.content.as_str()).collect();
    assert_eq!(text, "0 1 2 3 4 5 6 7 8 9 ");
    within(WAIT, "app::run to return", gw.stopped()).await.expect("run returns Ok");
    within(WAIT, "the upstream answer to be written in full", up.finished(0)).await;
    assert!(up.none_closed_early(), "the upstream answer was read to its end");
    let refused = within(WAIT, "a connection attempt", TcpStream::connect(gw.grpc)).await.is_err();
    assert!(refused, "the gRPC listener is closed");
}

#[tokio::test]
async fn in_process_grace_period_cancels_with_unavailable() {
    let up = Upstream::start(slow_reply()).await;
    let mut gw =
        Gateway::start(&format!("server:\n  shutdown_grace: 200ms\n{}", config(&up.base_url()))).await;
    let mut client = gw.client().await;
    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("chat", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    loop {
        let m = within(WAIT, "a message", stream.message()).await.expect("ok").expect("a message");
        if m.content == "first" {
            break;
        }
    }
    gw.trigger_shutdown();
    let triggered = Instant::now();
    let rest = collect(&mut stream).await;
    assert_eq!(rest.error().code(), Code::Unavailable, "{rest:?}");
    assert!(triggered.elapsed() >= Duration::from_millis(150), "cancelled before the grace period");
    within(WAIT, "the upstream to see its connection close", up.closed()).await;
    within(WAIT, "app::run to return", gw.stopped()).await.expect("run returns Ok");
}

// Past the grace period, streams the gateway does not own (a health watch)
// are cut by closing their connections, so the exit is prompt.
#[tokio::test]
async fn sigterm_ends_health_watches_after_the_grace_period() {
    // A health Watch never ends by itself; it is a call in flight like any
    // other and must not hold the process past the grace period.
    let yaml = format!("server:\n  shutdown_grace: 300ms\n{}", config("http://127.0.0.1:9/v1"));
    let mut bin = Binary::start(&yaml, &[]).await;
    let mut health = HealthClient::new(connect(bin.grpc).await);
    let mut watch = within(WAIT, "Health/Watch", health.watch(HealthCheckRequest::default()))
        .await
        .expect("Watch")
        .into_inner();
    within(WAIT, "the first health status", watch.message()).await.expect("status").expect("one");

    bin.proc.signal("TERM");
    let signalled = Instant::now();
    let status = within(Duration::from_secs(10), "the process to exit", bin.proc.exit()).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(2), "exited {took:?} after SIGTERM with a 300ms grace period");
    drop(watch);
}
