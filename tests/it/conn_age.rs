//! `server.max_connection_age`: an old connection is sent a graceful GOAWAY,
//! its calls in flight finish and it is closed; past the grace it is closed
//! anyway; the client reconnects.

use std::time::{Duration, Instant};

use llm_gateway::api::pb;

use crate::harness::{Gateway, RawH2, WAIT, completion_request, config, stream_call, stream_request, within};

fn aged(age: &str, grace: &str) -> String {
    format!(
        "server:\n  max_connection_age: {age}\n  max_connection_age_grace: {grace}\n{}",
        config("http://127.0.0.1:9/v1")
    )
}

#[tokio::test]
async fn an_old_connection_gets_goaway_and_its_stream_finishes() {
    let gw = Gateway::start(&aged("300ms", "10s")).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let started = Instant::now();
    // `slow`: 40 tokens 50 ms apart, about two seconds: the connection
    // reaches its age (at most 330 ms) mid-stream.
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", &[], &stream_request("slow", "hi")).await;
    let mut messages = 0;
    while let Some(m) =
        within(WAIT, "the next message", response.message::<pb::StreamCompletionResponse>()).await
    {
        messages += 1;
        if m.finish_reason != 0 {
            break;
        }
    }
    let (code, message, _) = within(WAIT, "the stream's status", response.status()).await;
    assert_eq!(code, 0, "the stream in flight runs to its end: {message}");
    assert!(messages >= 40, "every token arrived: {messages}");
    assert!(started.elapsed() > Duration::from_millis(500), "the stream outlived the connection's age");
    // The server closes the aged connection once its last call is over.
    within(WAIT, "the aged connection to close", raw.closed()).await;
}

#[tokio::test]
async fn a_young_connection_stays_open() {
    let gw = Gateway::start(&aged("1h", "10s")).await;
    let mut raw = RawH2::connect(gw.grpc, false).await;
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", &[], &stream_request("lorem", "hi")).await;
    while within(WAIT, "the next message", response.message::<pb::StreamCompletionResponse>()).await.is_some()
    {
    }
    let (code, message, _) = within(WAIT, "the stream's status", response.status()).await;
    assert_eq!(code, 0, "{message}");
    // The contrast with the test above: with the age far off, the
    // connection outlives its calls. (A window to observe an absence in,
    // not a synchronisation.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!raw.is_closed(), "a connection younger than max_connection_age stays open");
}

#[tokio::test]
async fn past_the_grace_the_connection_is_closed_and_the_client_reconnects() {
    let gw = Gateway::start(&aged("200ms", "300ms")).await;
    let mut client = gw.client().await;
    let started = Instant::now();
    let collected = stream_call(&mut client, stream_request("slow", "hi")).await;
    let elapsed = started.elapsed();
    assert!(collected.end.is_err(), "a stream longer than age + grace is cut: {:?}", collected.end);
    assert!(!collected.messages.is_empty(), "it had started");
    assert!(elapsed < Duration::from_millis(1500), "cut at about age + grace, not at its end: {elapsed:?}");
    // The same channel opens a new connection and calls go on.
    within(WAIT, "Completion", client.completion(completion_request("lorem", "hi")))
        .await
        .expect("a call over the new connection");
}
