//! `/metrics` on the admin listener: counters and histograms move as calls
//! are made, with low-cardinality labels only.

use tonic::Code;

use crate::harness::{
    Gateway, WAIT, collect, completion_request, config, eventually, http, stream_request, within,
};

pub(crate) async fn scrape(gw: &Gateway) -> String {
    let response =
        within(WAIT, "GET /metrics", http().get(gw.admin_url("/metrics")).send()).await.expect("GET");
    assert_eq!(response.status(), 200);
    response.text().await.expect("metrics text")
}

/// The value of the sample whose line starts with `series`.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Scrapes until `pred` holds: a stream's record is written when tonic drops
/// it, just after the caller has read its end.
async fn scrape_until(gw: &Gateway, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    eventually(WAIT, what, async || {
        last = scrape(gw).await;
        pred(&last)
    })
    .await;
    last
}

#[tokio::test]
async fn counters_and_histograms_move_with_calls() {
    let gw = Gateway::start(&config("http://127.0.0.1:9/v1")).await;
    let mut client = gw.client().await;

    let before = scrape(&gw).await;
    assert_eq!(sample(&before, "llm_gateway_streams_in_flight "), Some(0.0), "{before}");

    let answer = collect(
        &mut client.stream_completion(stream_request("lorem", "hi")).await.expect("call").into_inner(),
    )
    .await;
    assert!(answer.end.is_ok());
    client.completion(completion_request("lorem", "hi")).await.expect("unary call");
    let missing =
        client.completion(completion_request("no-such-model", "hi")).await.expect_err("unknown model");
    assert_eq!(missing.code(), Code::NotFound);
    let down = client.completion(completion_request("down", "hi")).await.expect_err("upstream 503");
    assert_eq!(down.code(), Code::Unavailable);

    let stream_ok = r#"llm_gateway_calls_total{front_door="grpc",method="StreamCompletion",model="lorem",provider="mk",code="OK"}"#;
    let text = scrape_until(&gw, "the stream's record", |t| sample(t, stream_ok) == Some(1.0)).await;
    let unary_ok = r#"llm_gateway_calls_total{front_door="grpc",method="Completion",model="lorem",provider="mk",code="OK"}"#;
    assert_eq!(sample(&text, unary_ok), Some(1.0), "{text}");
    // An unknown model name is not a label value: callers cannot grow the series.
    let not_found = r#"llm_gateway_calls_total{front_door="grpc",method="Completion",model="",provider="",code="NOT_FOUND"}"#;
    assert_eq!(sample(&text, not_found), Some(1.0), "{text}");
    assert!(!text.contains("no-such-model"), "{text}");
    let unavailable = r#"llm_gateway_calls_total{front_door="grpc",method="Completion",model="down",provider="mk",code="UNAVAILABLE"}"#;
    assert_eq!(sample(&text, unavailable), Some(1.0), "{text}");

    let attempts_ok = r#"llm_gateway_upstream_attempts_total{provider="mk",outcome="ok"}"#;
    assert_eq!(sample(&text, attempts_ok), Some(2.0), "{text}");
    let attempts_err = r#"llm_gateway_upstream_attempts_total{provider="mk",outcome="error"}"#;
    // `down` answers 503, which is retried once (retry.attempts defaults to 2).
    assert_eq!(sample(&text, attempts_err), Some(2.0), "{text}");

    let ttft = r#"gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="lorem",gen_ai_provider_name="mk"}"#;
    assert_eq!(sample(&text, ttft), Some(2.0), "{text}");
    let duration = r#"gen_ai_client_operation_duration_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="lorem",gen_ai_provider_name="mk",error_type=""}"#;
    assert_eq!(sample(&text, duration), Some(2.0), "{text}");
    let per_token = r#"gen_ai_server_time_per_output_token_seconds_count{gen_ai_operation_name="chat",gen_ai_request_model="lorem""#;
    assert_eq!(sample(&text, per_token), Some(2.0), "{text}");
    let output = r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_request_model="lorem",gen_ai_provider_name="mk",gen_ai_token_type="output"}"#;
    assert_eq!(sample(&text, output), Some(24.0), "two answers of 12 tokens: {text}");
    assert_eq!(sample(&text, "llm_gateway_streams_in_flight "), Some(0.0), "{text}");
    assert!(text.contains("llm_gateway_dropped_spans_total"), "{text}");
}

#[tokio::test]
async fn a_caller_who_leaves_is_counted_as_cancelled() {
    let gw = Gateway::start(&config("http://127.0.0.1:9/v1")).await;
    let mut client = gw.client().await;
    let mut stream = client.stream_completion(stream_request("slow", "hi")).await.expect("call").into_inner();
    within(WAIT, "the first message", stream.message()).await.expect("stream").expect("a message");
    let during = scrape(&gw).await;
    assert_eq!(sample(&during, "llm_gateway_streams_in_flight "), Some(1.0), "{during}");
    drop(stream);
    let cancelled = r#"llm_gateway_cancelled_calls_total{model="slow"}"#;
    let text = scrape_until(&gw, "the cancelled call's record", |t| sample(t, cancelled) == Some(1.0)).await;
    let code = r#"llm_gateway_calls_total{front_door="grpc",method="StreamCompletion",model="slow",provider="mk",code="CANCELLED"}"#;
    assert_eq!(sample(&text, code), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, r#"llm_gateway_upstream_attempts_total{provider="mk",outcome="cancelled"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&text, "llm_gateway_streams_in_flight "), Some(0.0), "{text}");
}
