//! Live config reload: on request (SIGHUP) and when the file changes, a valid
//! file swaps models, providers and keys at once; an invalid one keeps the
//! running config, is logged with its key and line and counted; a stream in
//! flight finishes on the config it started with.

use llm_gateway::api::pb::{self, ListModelsRequest};
use tonic::Code;

use crate::harness::{
    Binary, Reloading, WAIT, collect, completion_request, config, config_with_model, eventually, http,
    stream_request, within,
};

const UPSTREAM: &str = "http://127.0.0.1:9/v1";

/// `config` with the file checked every `interval` (0s: only on request).
fn polled(interval: &str, models: &str) -> String {
    format!("server:\n  config_reload_interval: {interval}\n{models}")
}

async fn models(gw: &crate::harness::Gateway) -> Vec<String> {
    let mut client = gw.client().await;
    let list = within(WAIT, "ListModels", client.list_models(ListModelsRequest::default()))
        .await
        .expect("ListModels")
        .into_inner();
    list.models.into_iter().map(|m| m.name).collect()
}

async fn metrics(gw: &crate::harness::Gateway) -> String {
    let r = within(WAIT, "GET /metrics", http().get(gw.admin_url("/metrics")).send()).await.expect("GET");
    r.text().await.expect("metrics text")
}

fn reloads(text: &str, outcome: &str) -> u64 {
    let series = format!("llm_gateway_config_reloads_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&series)?.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_requested_reload_adds_a_model() {
    let r = Reloading::start(&polled("0s", &config(UPSTREAM))).await;
    assert!(!models(&r.gw).await.contains(&"fresh".to_owned()));
    r.write(&polled("0s", &config_with_model(UPSTREAM, "fresh", "mk", "echo")));
    r.request().await;
    let gw = &r.gw;
    eventually(WAIT, "the new model to be listed", async || models(gw).await.contains(&"fresh".to_owned()))
        .await;
    let mut client = gw.client().await;
    let answer = within(WAIT, "Completion", client.completion(completion_request("fresh", "hello there")))
        .await
        .expect("the new model answers")
        .into_inner();
    assert_eq!(answer.content, "hello there");
    assert_eq!(reloads(&metrics(gw).await, "ok"), 1);
}

#[tokio::test]
async fn a_changed_file_is_reloaded_without_a_request() {
    let r = Reloading::start(&polled("50ms", &config(UPSTREAM))).await;
    r.write(&polled("50ms", &config_with_model(UPSTREAM, "fresh", "mk", "echo")));
    let gw = &r.gw;
    eventually(WAIT, "the changed file to be picked up", async || {
        models(gw).await.contains(&"fresh".to_owned())
    })
    .await;
}

#[tokio::test]
async fn an_invalid_file_keeps_the_running_config_and_is_counted() {
    let r = Reloading::start(&polled("0s", &config(UPSTREAM))).await;
    // A target naming a provider that does not exist, beside a new model.
    r.write(&polled("0s", &config_with_model(UPSTREAM, "fresh", "nope", "echo")));
    r.request().await;
    let gw = &r.gw;
    eventually(WAIT, "the refusal to be counted", async || reloads(&metrics(gw).await, "invalid") == 1).await;
    assert_eq!(reloads(&metrics(gw).await, "ok"), 0);
    let listed = models(gw).await;
    assert!(listed.contains(&"echo".to_owned()) && !listed.contains(&"fresh".to_owned()), "{listed:?}");
    let mut client = gw.client().await;
    within(WAIT, "Completion", client.completion(completion_request("echo", "still here")))
        .await
        .expect("the running config still serves");
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_config_it_started_with() {
    // `slow`: 40 tokens 50 ms apart, two seconds in flight.
    let r = Reloading::start(&polled("0s", &config(UPSTREAM))).await;
    let mut client = r.gw.client().await;
    let mut stream = within(WAIT, "StreamCompletion", client.stream_completion(stream_request("slow", "hi")))
        .await
        .expect("the stream starts")
        .into_inner();
    let first = within(WAIT, "the first message", stream.message()).await.expect("ok").expect("a message");

    // The new config has no `slow` (and a new model): it is in force for
    // new calls while the stream goes on.
    let without_slow = config_with_model(UPSTREAM, "fresh", "mk", "echo")
        .replace("  slow:\n    targets: [{ provider: mk, model: \"lorem?tokens=40&delay=50ms\" }]\n", "");
    assert!(!without_slow.contains("slow:"), "the test removes `slow`");
    r.write(&polled("0s", &without_slow));
    r.request().await;
    let gw = &r.gw;
    eventually(WAIT, "the new config", async || models(gw).await.contains(&"fresh".to_owned())).await;
    let refused =
        within(WAIT, "StreamCompletion", gw.client().await.stream_completion(stream_request("slow", "x")))
            .await
            .expect_err("`slow` is gone for new calls");
    assert_eq!(refused.code(), Code::NotFound);

    let rest = collect(&mut stream).await;
    assert!(rest.end.is_ok(), "the stream in flight finishes: {:?}", rest.end);
    let text: String = std::iter::once(first.content.as_str())
        .chain(rest.messages.iter().map(|m| m.content.as_str()))
        .collect();
    assert_eq!(text.split_whitespace().count(), 40, "all of the old model's answer: {text:?}");
    let last: &pb::StreamCompletionResponse = rest.messages.last().expect("more messages");
    assert_ne!(last.finish_reason, 0, "it ended with a finish reason");
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_is_logged_with_key_and_line() {
    let yaml = polled("0s", &config(UPSTREAM));
    let mut bin = Binary::start(&yaml, &[]).await;

    // A bad file: logged with the key and its line, the running config kept.
    bin.rewrite_config(&polled("0s", &config_with_model(UPSTREAM, "fresh", "nope", "echo")));
    bin.proc.signal("HUP");
    let line =
        within(WAIT, "the refusal's log line", bin.proc.line(|l| l.contains("config reload refused"))).await;
    let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    assert_eq!(log["key"], "models.fresh.targets[0].provider", "{line}");
    // listen, admin_listen, server's one line, then the config's lines: the
    // new model is the last two lines of the file.
    let text = std::fs::read_to_string(bin.config_path()).expect("the file");
    let expected = text.lines().position(|l| l.contains("provider: nope")).expect("the bad line") + 1;
    assert_eq!(log["line"], expected, "{line}");

    // A good one, with a start-up setting changed too.
    let good = config_with_model(UPSTREAM, "fresh", "mk", "echo");
    bin.rewrite_config(&format!("server:\n  config_reload_interval: 0s\n  shutdown_grace: 7s\n{good}"));
    bin.proc.signal("HUP");
    within(WAIT, "the reload's log line", bin.proc.line(|l| l.contains("\"config reloaded\""))).await;
    let warn =
        within(WAIT, "the restart warning", bin.proc.line(|l| l.contains("only take effect at a restart")))
            .await;
    assert!(warn.contains("server.shutdown_grace"), "{warn}");
    let channel = crate::harness::connect(bin.grpc).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(channel);
    let answer = within(WAIT, "Completion", client.completion(completion_request("fresh", "hup")))
        .await
        .expect("the reloaded model answers")
        .into_inner();
    assert_eq!(answer.content, "hup");
}
