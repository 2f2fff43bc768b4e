//! Resilient routing (CONTRACT.md section 5, issue 11): first-token timeouts,
//! same-target retries, 429 cool-downs, circuit breakers, strategies, hedging
//! and proxies, each against fake upstreams that record what they saw, and
//! the machine-readable details of every failure (section 9).

use std::time::Duration;

use llm_gateway::api::pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    harness::{
        Binary, CLOSE_BOUND, Gateway, KEY_ENV, WAIT, check_config, completion_request, connect, eventually,
        http, md, stream_call, stream_request, within,
    },
    socks::Socks,
    upstream::{Reply, Step, Upstream, refused_url},
    wire::openai,
};

/// Settings of the two providers `a` and `b` unless a test says otherwise:
/// short first-token timeout, fast backoff, breaker off.
const FAST: &str = "timeouts: { first_token: 300ms }\n    retry: { attempts: 2, initial_backoff: 1ms, max_backoff: 5ms }\n    circuit_breaker: { failures: 0 }";

/// Providers `a` and `b` (openai wire format) on their own upstreams, and a
/// model `m` whose targets are `a/ma` then `b/mb`.
fn yaml(a: &str, a_extra: &str, b: &str, b_extra: &str, model_extra: &str) -> String {
    format!(
        "\
providers:
  a:
    kind: openai
    base_url: {a}
    api_key_env: {KEY_ENV}
    {a_extra}
  b:
    kind: openai
    base_url: {b}
    api_key_env: {KEY_ENV}
    {b_extra}
models:
  m:
    {model_extra}
    targets: [{{ provider: a, model: ma }}, {{ provider: b, model: mb }}]
"
    )
}

fn answer(model: &str, text: &str) -> Reply {
    Reply::events(&openai::answer("c1", model, &[text], "stop", 3, 1))
}

async fn ok_upstream(model: &'static str, text: &'static str) -> Upstream {
    Upstream::start(answer(model, text)).await
}

fn reason(s: &tonic::Status) -> String {
    s.get_error_details().error_info().map(|i| i.reason.clone()).unwrap_or_default()
}

#[tokio::test]
async fn a_silent_first_target_is_abandoned_after_first_token_timeout() {
    // Headers, then nothing: only a first-token bound gets past it.
    let a = Upstream::start(Reply::sse(vec![Step::Hang])).await;
    let b = ok_upstream("mb", "from b").await;
    let extra = "timeouts: { first_token: 200ms }\n    retry: { attempts: 1 }";
    let gw = Gateway::start(&yaml(&a.base_url(), extra, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let mut request = tonic::Request::new(stream_request("m", "hi"));
    request.set_timeout(Duration::from_secs(5));
    let got = stream_call(&mut client, request).await;
    got.end.as_ref().expect("answered by b");
    assert_eq!(got.text(), "from b");
    assert_eq!(got.messages[0].provider, "b");
    within(CLOSE_BOUND, "a's connection closed", a.closed()).await;
    assert_eq!(a.requests().len(), 1, "attempts: 1 means no retry");
}

#[tokio::test]
async fn hang_before_headers_is_retried_then_falls_back() {
    let a = Upstream::start(Reply::Hang).await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let r = within(WAIT, "Completion", client.completion(completion_request("m", "hi"))).await.expect("OK");
    assert_eq!(r.into_inner().content, "from b");
    assert_eq!(a.requests().len(), 2, "two attempts on a (retry.attempts: 2)");
}

#[tokio::test]
async fn a_5xx_is_retried_on_its_target_with_backoff() {
    let a =
        Upstream::with(|i, _| if i == 0 { Reply::error(500, "boom") } else { answer("ma", "second try") })
            .await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("m", "hi")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "second try");
    assert_eq!(a.requests().len(), 2);
    assert!(b.requests().is_empty(), "no fallback needed");
}

#[tokio::test]
async fn retries_and_fallback_are_bounded_by_the_sum_of_attempts() {
    let a = Upstream::start(Reply::error(503, "overloaded: account acct_42 over quota")).await;
    let b = Upstream::start(Reply::error(502, "bad gateway")).await;
    let b_extra = "retry: { attempts: 3, initial_backoff: 1ms, max_backoff: 2ms }\n    circuit_breaker: { failures: 0 }";
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), b_extra, "")).await;
    let mut client = gw.client().await;
    let s = within(WAIT, "Completion", client.completion(completion_request("m", "hi")))
        .await
        .expect_err("every target fails");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(reason(&s), "UPSTREAM_UNAVAILABLE");
    assert!(!s.message().contains("acct_42"), "5xx bodies stay in the operator's log: {}", s.message());
    assert_eq!((a.requests().len(), b.requests().len()), (2, 3));
}

#[tokio::test]
async fn an_invalid_request_is_never_retried_and_names_the_problem() {
    let a = Upstream::start(Reply::error(400, "max_tokens is too large")).await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let s = within(WAIT, "Completion", client.completion(completion_request("m", "hi")))
        .await
        .expect_err("rejected");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("max_tokens is too large"), "{}", s.message());
    let details = s.get_error_details();
    assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some("UPSTREAM_REJECTED"));
    assert!(details.bad_request().is_some_and(|b| !b.field_violations.is_empty()));
    assert_eq!(a.requests().len(), 1);
    assert!(b.requests().is_empty());
}

async fn rate_limited_then_skipped(retry_after: String) {
    let a = Upstream::start(
        Reply::error(429, "slow down, org org-secret").with_header("retry-after", &retry_after),
    )
    .await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    for call in 0..3 {
        let got = stream_call(&mut client, stream_request("m", "hi")).await;
        got.end.as_ref().unwrap_or_else(|s| panic!("call {call}: {s:?}"));
        assert_eq!(got.text(), "from b");
    }
    assert_eq!(a.requests().len(), 1, "a 429 is not retried, and its target cools down");
    assert_eq!(b.requests().len(), 3);
    let metrics =
        http().get(gw.admin_url("/metrics")).send().await.expect("scrape").text().await.expect("body");
    assert!(
        metrics.contains(r#"llm_gateway_target_cooldowns_total{provider="a",model="ma"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_429_moves_on_at_once_and_retry_after_seconds_keeps_the_target_out() {
    rate_limited_then_skipped("30".into()).await;
}

#[tokio::test]
async fn a_429_with_an_http_date_keeps_the_target_out() {
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    let date = humantime_date(later);
    rate_limited_then_skipped(date).await;
}

/// IMF-fixdate, as HTTP servers write `Retry-After`.
fn humantime_date(t: std::time::SystemTime) -> String {
    // "2026-12-01T10:00:00Z" -> "Tue, 01 Dec 2026 10:00:00 GMT"
    let iso = humantime::format_rfc3339_seconds(t).to_string();
    let (date, time) = iso.trim_end_matches('Z').split_once('T').expect("rfc3339");
    let parts: Vec<&str> = date.split('-').collect();
    let (y, m, d) = (parts[0], parts[1], parts[2]);
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        [m.parse::<usize>().expect("a month") - 1];
    format!("Mon, {d} {month} {y} {time} GMT")
}

#[tokio::test]
async fn every_target_cooling_down_fails_at_once_with_retry_info() {
    let a = Upstream::start(Reply::error(429, "slow").with_header("retry-after-ms", "20000")).await;
    let b = Upstream::start(Reply::error(429, "slow").with_header("retry-after", "40")).await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let s = within(WAIT, "first", client.completion(completion_request("m", "hi"))).await.expect_err("429s");
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(md(s.metadata(), "retry-after-ms"), "40000", "the last target's wait");
    let s =
        within(WAIT, "second", client.completion(completion_request("m", "hi"))).await.expect_err("cooling");
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(reason(&s), "UPSTREAM_UNAVAILABLE");
    let wait: u64 = md(s.metadata(), "retry-after-ms").parse().expect("retry-after-ms");
    assert!((15_000..=20_000).contains(&wait), "the earliest target back: {wait}");
    assert!(s.get_error_details().retry_info().is_some());
    assert_eq!((a.requests().len(), b.requests().len()), (1, 1), "nothing sent while cooling down");
}

#[tokio::test]
async fn connect_refused_is_retried_then_falls_back() {
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&refused_url().await, FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("m", "hi")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "from b");
}

#[tokio::test]
async fn a_malformed_first_event_falls_back_and_a_reset_after_a_delta_does_not() {
    let a = Upstream::start(Reply::sse(vec![Step::send("data: {not json\n\n")])).await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("m", "hi")).await;
    assert_eq!(got.text(), "from b", "{got:?}");
    assert_eq!(a.requests().len(), 2, "malformed before the first delta is retryable");

    let a = Upstream::start(Reply::sse(vec![
        Step::send(openai::role("c", "ma")),
        Step::send(openai::content("c", "ma", "partial")),
        Step::Reset,
    ]))
    .await;
    let b = ok_upstream("mb", "from b").await;
    let gw = Gateway::start(&yaml(&a.base_url(), FAST, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    let got = stream_call(&mut client, stream_request("m", "hi")).await;
    let s = got.error();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(reason(s), "UPSTREAM_FAILED_MIDSTREAM");
    assert_eq!(got.text(), "partial");
    assert_eq!((a.requests().len(), b.requests().len()), (1, 0), "no retry after the commit point");
}

#[tokio::test]
async fn an_open_circuit_fails_at_once_touching_no_upstream() {
    let a = Upstream::start(Reply::error(503, "down")).await;
    let breaker = "retry: { attempts: 1 }\n    circuit_breaker: { failures: 2, open_for: 60s }";
    let text = format!(
        "providers:\n  a:\n    kind: openai\n    base_url: {}\n    api_key_env: {KEY_ENV}\n    {breaker}\nmodels:\n  solo:\n    targets: [{{ provider: a, model: ma }}]\n",
        a.base_url()
    );
    let gw = Gateway::start(&text).await;
    let mut client = gw.client().await;
    for _ in 0..2 {
        let s = within(WAIT, "failing call", client.completion(completion_request("solo", "hi")))
            .await
            .expect_err("503");
        assert_eq!(reason(&s), "UPSTREAM_UNAVAILABLE");
    }
    let s = within(WAIT, "open circuit", client.completion(completion_request("solo", "hi")))
        .await
        .expect_err("open");
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(reason(&s), "CIRCUIT_OPEN");
    let wait: u64 = md(s.metadata(), "retry-after-ms").parse().expect("retry-after-ms");
    assert!(wait > 50_000 && wait <= 60_000, "{wait}");
    assert_eq!(a.requests().len(), 2, "the open circuit sent nothing");
    let metrics =
        http().get(gw.admin_url("/metrics")).send().await.expect("scrape").text().await.expect("body");
    assert!(metrics.contains(r#"llm_gateway_circuit_state{provider="a",model="ma"} 1"#), "{metrics}");
    assert!(
        metrics.contains(
            r#"llm_gateway_circuit_transitions_total{provider="a",model="ma",from="closed",to="open"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_open_first_target_is_skipped_for_the_next() {
    let a = Upstream::start(Reply::error(503, "down")).await;
    let b = ok_upstream("mb", "from b").await;
    let a_extra = "retry: { attempts: 1 }\n    circuit_breaker: { failures: 1, open_for: 60s }";
    let gw = Gateway::start(&yaml(&a.base_url(), a_extra, &b.base_url(), FAST, "")).await;
    let mut client = gw.client().await;
    for _ in 0..3 {
        let got = stream_call(&mut client, stream_request("m", "hi")).await;
        assert_eq!(got.text(), "from b");
    }
    assert_eq!(a.requests().len(), 1, "opened after one failure, then skipped");
}

#[tokio::test]
async fn weighted_spreads_calls_by_weight() {
    let text = "\
providers:
  mk:
    kind: mock
models:
  w:
    strategy: weighted
    targets:
      - { provider: mk, model: \"heavy?tokens=1\", weight: 3 }
      - { provider: mk, model: \"light?tokens=1\", weight: 1 }
";
    let gw = Gateway::start(text).await;
    let mut client = gw.client().await;
    let mut heavy = 0;
    for _ in 0..400 {
        let r =
            within(WAIT, "Completion", client.completion(completion_request("w", "hi"))).await.expect("OK");
        if r.into_inner().model.starts_with("heavy") {
            heavy += 1;
        }
    }
    // 300 expected; the band is wide enough never to flake (p < 1e-6).
    assert!((240..=360).contains(&heavy), "heavy answered {heavy} of 400");
}

#[tokio::test]
async fn least_busy_avoids_the_target_with_a_call_in_flight() {
    let text = "\
providers:
  mk:
    kind: mock
models:
  lb:
    strategy: least_busy
    targets:
      - { provider: mk, model: \"first?tokens=30&delay=50ms\" }
      - { provider: mk, model: \"second?tokens=30&delay=50ms\" }
";
    let gw = Gateway::start(text).await;
    let mut client = gw.client().await;
    let mut held = within(WAIT, "first stream", client.stream_completion(stream_request("lb", "hi")))
        .await
        .expect("OK")
        .into_inner();
    let first = within(WAIT, "first message", held.message()).await.expect("OK").expect("a message");
    let got = within(WAIT, "second stream", client.stream_completion(stream_request("lb", "hi")))
        .await
        .expect("OK")
        .into_inner()
        .message()
        .await
        .expect("OK")
        .expect("a message");
    assert_ne!(first.model, got.model, "the busy target is avoided: {} vs {}", first.model, got.model);
}

#[tokio::test]
async fn a_hedge_wins_over_a_silent_target_and_the_loser_is_aborted() {
    let a = Upstream::start(Reply::sse(vec![Step::Hang])).await;
    let b = ok_upstream("mb", "hedged").await;
    let a_extra = "timeouts: { first_token: 10s }\n    retry: { attempts: 1 }";
    let gw = Gateway::start(&yaml(&a.base_url(), a_extra, &b.base_url(), FAST, "hedge_after: 100ms")).await;
    let mut client = gw.client().await;
    let started = std::time::Instant::now();
    let got = stream_call(&mut client, stream_request("m", "hi")).await;
    got.end.as_ref().expect("OK");
    assert_eq!(got.text(), "hedged");
    assert!(started.elapsed() < Duration::from_secs(5), "the hedge answered long before first_token");
    within(CLOSE_BOUND, "the losing attempt's connection closed", a.closed()).await;
    let admin = gw.admin_url("/metrics");
    eventually(WAIT, "hedge metrics", async || {
        let m = http().get(&admin).send().await.expect("scrape").text().await.expect("body");
        m.contains(r#"llm_gateway_hedges_total{model="m",outcome="started"} 1"#)
            && m.contains(r#"llm_gateway_hedges_total{model="m",outcome="won"} 1"#)
    })
    .await;
}

#[tokio::test]
async fn no_backoff_is_started_past_the_deadline() {
    let a = Upstream::start(Reply::error(503, "down")).await;
    let text = format!(
        "providers:\n  a:\n    kind: openai\n    base_url: {}\n    api_key_env: {KEY_ENV}\n    retry: {{ attempts: 5, initial_backoff: 10s, max_backoff: 10s }}\n    circuit_breaker: {{ failures: 0 }}\nmodels:\n  solo:\n    targets: [{{ provider: a, model: ma }}]\n",
        a.base_url()
    );
    let gw = Gateway::start(&text).await;
    let mut client = gw.client().await;
    let mut request = tonic::Request::new(completion_request("solo", "hi"));
    request.set_timeout(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let s = within(WAIT, "Completion", client.completion(request)).await.expect_err("503s");
    // A wait that would end past the deadline is not started: the call ends
    // early with the upstream's failure instead of running out its deadline.
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert!(!a.requests().is_empty());
}

fn proxied(proxy: &str, fallback: bool, up: &Upstream) -> String {
    format!(
        "providers:\n  p:\n    kind: openai\n    base_url: {}\n    api_key_env: {KEY_ENV}\n    proxy: {proxy}\n    proxy_fallback_direct: {fallback}\n    retry: {{ attempts: 1 }}\nmodels:\n  px:\n    targets: [{{ provider: p, model: mp }}]\n",
        up.base_url()
    )
}

#[tokio::test]
async fn requests_go_through_a_socks5_proxy() {
    let up = ok_upstream("mp", "via proxy").await;
    let socks = Socks::start().await;
    for scheme in ["socks5", "socks5h"] {
        let gw = Gateway::start(&proxied(&format!("{scheme}://user:pw-secret@{}", socks.addr()), false, &up))
            .await;
        let mut client = gw.client().await;
        let got = stream_call(&mut client, stream_request("px", "hi")).await;
        got.end.as_ref().unwrap_or_else(|s| panic!("{scheme}: {s:?}"));
        assert_eq!(got.text(), "via proxy");
    }
    let connects = socks.connects();
    assert_eq!(connects.len(), 2, "{connects:?}");
    assert!(
        connects
            .iter()
            .all(|(target, user)| target.ends_with(&up.addr().port().to_string()) && user == "user")
    );
}

#[tokio::test]
async fn a_proxy_that_is_down_falls_back_to_direct_when_allowed() {
    let up = ok_upstream("mp", "direct").await;
    let down = refused_url().await.replace("http://", "socks5://user:pw-secret@").replace("/v1", "");
    let gw = Gateway::start(&proxied(&down, true, &up)).await;
    let mut client = gw.client().await;
    for _ in 0..2 {
        let got = stream_call(&mut client, stream_request("px", "hi")).await;
        got.end.as_ref().expect("direct");
        assert_eq!(got.text(), "direct");
    }
    let metrics =
        http().get(gw.admin_url("/metrics")).send().await.expect("scrape").text().await.expect("body");
    assert!(metrics.contains(r#"llm_gateway_proxy_fallbacks_total{provider="p"} 2"#), "{metrics}");

    let gw = Gateway::start(&proxied(&down, false, &up)).await;
    let mut client = gw.client().await;
    let s = within(WAIT, "Completion", client.completion(completion_request("px", "hi")))
        .await
        .expect_err("no fallback");
    assert_eq!(s.code(), Code::Unavailable);
    assert!(!s.message().contains("pw-secret"), "{}", s.message());
    assert_eq!(up.requests().len(), 2, "only the fallback calls reached the upstream");
}

#[tokio::test]
async fn an_http_error_through_a_working_proxy_is_the_providers_answer() {
    let up = Upstream::start(Reply::error(503, "provider down")).await;
    let socks = Socks::start().await;
    let gw = Gateway::start(&proxied(&format!("socks5://{}", socks.addr()), true, &up)).await;
    let mut client = gw.client().await;
    let s =
        within(WAIT, "Completion", client.completion(completion_request("px", "hi"))).await.expect_err("503");
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(up.requests().len(), 1, "not sent again directly");
    assert_eq!(socks.connects().len(), 1);
}

#[tokio::test]
async fn proxy_credentials_never_reach_logs_or_errors() {
    let up = ok_upstream("mp", "direct").await;
    let down = refused_url().await.replace("http://", "socks5://user:pw-secret-1@").replace("/v1", "");
    let no_fallback = proxied(&down, false, &up);
    let mut gw = Binary::start(&no_fallback, &[("RUST_LOG", "debug")]).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(gw.grpc).await);
    let s = within(WAIT, "Completion", client.completion(completion_request("px", "hi")))
        .await
        .expect_err("the proxy is down");
    assert!(!s.message().contains("pw-secret"), "{}", s.message());
    let mut with_fallback = Binary::start(&proxied(&down, true, &up), &[("RUST_LOG", "debug")]).await;
    let mut client = pb::llm_gateway_client::LlmGatewayClient::new(connect(with_fallback.grpc).await);
    within(WAIT, "Completion", client.completion(completion_request("px", "hi"))).await.expect("direct");
    for proc in [&mut gw.proc, &mut with_fallback.proc] {
        proc.signal("TERM");
        within(WAIT, "exit", proc.exit()).await;
        let all = format!("{}{}", proc.stdout_text(), proc.stderr_text());
        assert!(all.contains("upstream attempt failed") || all.contains("proxy unreachable"), "{all}");
        assert!(!all.contains("pw-secret"), "a proxy password was logged:\n{all}");
    }

    // A config error quotes the URL redacted.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.yaml");
    let bad = no_fallback.replace("socks5://", "ftp://");
    std::fs::write(&path, bad).expect("write");
    let (status, out, err) = check_config(&path).await;
    assert!(!status.success());
    let shown = format!("{out}{err}");
    assert!(shown.contains("providers.p.proxy"), "{shown}");
    assert!(!shown.contains("pw-secret"), "{shown}");
}
