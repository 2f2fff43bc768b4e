//! Admission through the gateway: key and target limits, the queue,
//! budgets and prices, and limits shared by two gateways through a real
//! Redis (started per test), including Redis stopped, frozen and restarted
//! under both failure modes.

use std::time::{Duration, Instant};

use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::{
    harness::{Gateway, WAIT, completion_request, eventually, md, stream_request, within},
    metrics::{sample, scrape},
    redis_server::{RedisCluster, RedisServer},
};

/// The keys' names; each key is its own name.
const KEYS: [&str; 3] = ["key-a", "key-b", "key-c"];

fn sha256_hex(s: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()))
}

/// A gateway config over the mock provider `mk`: model `m` (4 tokens),
/// `slow` (20 tokens, 50 ms apart), `long` (20 tokens, 250 ms apart), `two` (target `mk/full` then `mk2/m`).
/// `keys` are `api_keys` entries after the name and digest; `extra` is
/// appended as top-level keys.
fn config(mk_limits: &str, keys: [&str; 3], extra: &str) -> String {
    let mut text = format!(
        "\
providers:
  mk:
    kind: mock
    default_max_tokens: 20
{mk_limits}
  mk2:
    kind: mock
models:
  m:
    targets: [{{ provider: mk, model: \"lorem?tokens=4\" }}]
  slow:
    targets: [{{ provider: mk, model: \"lorem?tokens=20&delay=50ms\" }}]
  long:
    targets: [{{ provider: mk, model: \"lorem?tokens=20&delay=250ms\" }}]
  two:
    targets: [{{ provider: mk, model: \"full\" }}, {{ provider: mk2, model: \"lorem?tokens=4\" }}]
api_keys:
"
    );
    for (name, limits) in KEYS.iter().zip(keys) {
        text.push_str(&format!("  - {{ name: {name}, key_sha256: \"{}\"{limits} }}\n", sha256_hex(name)));
    }
    text.push_str(extra);
    text
}

fn redis_section(redis: &RedisServer, failure_mode: &str, replicas: u32) -> String {
    format!(
        "redis: {{ url: \"{}\", failure_mode: {failure_mode}, replicas: {replicas}, timeout: 100ms }}\n",
        redis.url()
    )
}

fn with_key<T>(key: &str, body: T) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ascii"));
    r
}

async fn call(
    gw: &Gateway,
    key: &str,
    model: &str,
) -> Result<tonic::Response<llm_gateway::api::pb::CompletionResponse>, tonic::Status> {
    let mut client = gw.client().await;
    within(WAIT, "Completion", client.completion(with_key(key, completion_request(model, "hello there"))))
        .await
}

/// Checks a refusal: code, ErrorInfo reason, QuotaFailure subject.
fn assert_refused(status: &tonic::Status, code: Code, reason: &str, subject: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some(reason), "{status:?}");
    if !subject.is_empty() {
        let quota = details.quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, subject, "{status:?}");
        assert!(!quota.violations[0].description.is_empty());
    }
}

#[tokio::test]
async fn a_key_limit_refuses_with_retry_after_and_quota_details() {
    let gw = Gateway::start(&config("", [", limits: { rpm: 2 }", "", ""], "")).await;
    for _ in 0..2 {
        call(&gw, "key-a", "m").await.expect("within the key's rpm");
    }
    let refused = call(&gw, "key-a", "m").await.expect_err("third call in a minute");
    assert_refused(&refused, Code::ResourceExhausted, "RATE_LIMITED", "key:key-a");
    let after: u64 = md(refused.metadata(), "retry-after-ms").parse().expect("retry-after-ms");
    assert!((55_000..=61_000).contains(&after), "{after}");
    assert!(refused.get_error_details().retry_info().is_some());
    // Another key is not limited by key-a's figure.
    call(&gw, "key-b", "m").await.expect("key-b has no limit");
    let text = scrape(&gw).await;
    assert_eq!(
        sample(&text, r#"llm_gateway_admission_refused_total{reason="RATE_LIMITED",scope="key"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_full_target_falls_back_and_a_call_that_can_never_fit_is_refused_at_once() {
    let limits = "    model_limits: { full: { rpm: 1 } }\n    limits: { tpm: 1000 }";
    let gw = Gateway::start(&config(limits, ["", "", ""], "queue: { max_wait: 0s }\n")).await;
    let first = call(&gw, "key-a", "two").await.expect("first call");
    assert_eq!(md(first.metadata(), "x-llm-provider"), "mk");
    // The first target is full: the call goes to the next one, at once.
    let second = call(&gw, "key-a", "two").await.expect("fallback");
    assert_eq!(md(second.metadata(), "x-llm-provider"), "mk2");
    // 5000 tokens reserved can never fit tpm 1000.
    let mut client = gw.client().await;
    let mut big = completion_request("m", "hi");
    big.max_tokens = Some(5000);
    let refused =
        within(WAIT, "Completion", client.completion(with_key("key-a", big))).await.expect_err("too big");
    assert_refused(&refused, Code::ResourceExhausted, "RATE_LIMITED", "target:mk/lorem?tokens=4");
    assert!(md(refused.metadata(), "retry-after-ms").is_empty(), "it can never fit");
}

#[tokio::test]
async fn the_queue_waits_for_a_slot_refuses_a_deadline_it_cannot_meet_and_lets_a_cancelled_call_go() {
    let limits = "    limits: { concurrency: 1 }\n    model_limits: { \"lorem?tokens=4\": { rpm: 1 } }";
    let gw = Gateway::start(&config(limits, ["", "", ""], "queue: { max_wait: 10s }\n")).await;
    let mut client = gw.client().await;
    // One slow stream holds the provider's only slot.
    let mut holder =
        within(WAIT, "slow stream", client.stream_completion(with_key("key-a", stream_request("slow", "x"))))
            .await
            .expect("first call")
            .into_inner();
    within(WAIT, "first delta", holder.message()).await.expect("delta").expect("a message");
    // A second call waits in the queue; cancelled, it leaves it at once.
    let waiting = tokio::spawn({
        let mut c = gw.client().await;
        async move { c.completion(with_key("key-b", completion_request("slow", "y"))).await }
    });
    let depth = r"llm_gateway_admission_queue_depth ";
    eventually(WAIT, "the call to queue", async || sample(&scrape(&gw).await, depth) == Some(1.0)).await;
    waiting.abort();
    eventually(WAIT, "the cancelled call to leave", async || sample(&scrape(&gw).await, depth) == Some(0.0))
        .await;
    // A third waits, and is served when the slow stream ends.
    let queued = tokio::spawn({
        let mut c = gw.client().await;
        async move { c.completion(with_key("key-b", completion_request("slow", "z"))).await }
    });
    while within(WAIT, "the slow stream", holder.message()).await.expect("stream").is_some() {}
    let served =
        within(WAIT * 2, "the queued call", queued).await.expect("join").expect("served after the wait");
    assert_eq!(md(served.metadata(), "x-llm-provider"), "mk");
    let text = scrape(&gw).await;
    assert!(
        sample(&text, "llm_gateway_admission_queue_wait_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // rpm 1 of the model is used: a call with 2 s to live is refused at
    // once rather than queued for the minute it would need.
    call(&gw, "key-a", "m").await.expect("the model's one call this minute");
    let started = Instant::now();
    let mut r = with_key("key-a", completion_request("m", "late"));
    r.set_timeout(Duration::from_secs(2));
    let refused = within(WAIT, "Completion", client.completion(r)).await.expect_err("cannot be met");
    assert_refused(&refused, Code::ResourceExhausted, "RATE_LIMITED", "target:mk/lorem?tokens=4");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after waiting");
    assert!(!md(refused.metadata(), "retry-after-ms").is_empty());
}

#[tokio::test]
async fn usage_carries_cost_from_prices_and_budgets_refuse_when_spent() {
    let prices = "prices:\n  - { provider: mk, model: \"lorem?tokens=4\", input: 2.0, output: 10.0 }\n";
    let gw = Gateway::start(&config("", ["", ", budget: { usd: 0.0001, window: 1d }", ""], prices)).await;
    let answer = call(&gw, "key-a", "m").await.expect("call").into_inner();
    let usage = answer.usage.expect("usage");
    let expected = (f64::from(usage.input_tokens) * 2.0 + f64::from(usage.output_tokens) * 10.0) / 1e6;
    assert!(usage.output_tokens == 4 && (usage.cost_usd - expected).abs() < 1e-12, "{usage:?}");
    // key-b: each call reserves (its estimate + 20 max tokens) at the price,
    // about 0.00023 USD: over a 0.0001 budget, so refused before any upstream.
    let refused = call(&gw, "key-b", "m").await.expect_err("over budget");
    assert_refused(&refused, Code::ResourceExhausted, "BUDGET_EXHAUSTED", "key:key-b");
}

#[tokio::test]
async fn two_gateways_sharing_redis_admit_exactly_the_limit() {
    two_gateways_share_one_limit(RedisServer::start().await).await;
}

/// The same on Valkey 8, which the contract names beside Redis 7.
#[tokio::test]
async fn two_gateways_sharing_valkey_admit_exactly_the_limit() {
    two_gateways_share_one_limit(RedisServer::valkey().await).await;
}

async fn two_gateways_share_one_limit(redis: RedisServer) {
    let text = config("", [", limits: { rpm: 5 }", "", ""], &redis_section(&redis, "closed", 2));
    let (a, b) = (Gateway::start(&text).await, Gateway::start(&text).await);
    let (mut admitted, mut on_a) = (0, (0, 0));
    for i in 0..10 {
        let via_a = i % 2 == 0;
        match call(if via_a { &a } else { &b }, "key-a", "m").await {
            Ok(_) => {
                admitted += 1;
                on_a.0 += u32::from(via_a);
            }
            Err(s) => {
                assert_refused(&s, Code::ResourceExhausted, "RATE_LIMITED", "key:key-a");
                on_a.1 += u32::from(via_a);
            }
        }
    }
    assert_eq!(admitted, 5, "rpm 5 holds for both gateways together");
    // Round trips, counted: an admitted call makes at most two (admission,
    // settle: the settle rides on the next admission when one comes within
    // 2 ms), a refused one one (nothing to settle).
    let series = "llm_gateway_redis_round_trip_seconds_count ";
    let (least, most) = (f64::from(on_a.0 + on_a.1), f64::from(2 * on_a.0 + on_a.1));
    eventually(WAIT, "every settle to land", async || {
        sample(&scrape(&a).await, series).is_some_and(|n| (least..=most).contains(&n))
    })
    .await;
    // Every key of one admission shares one hash tag (one Cluster slot).
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*")).await;
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("{llmgw}:v3:")), "{keys:?}");
    // A Redis that lost its scripts (restart, failover): EVALSHA fails with
    // NOSCRIPT and the step is sent again whole, with EVAL.
    let _: () = redis.query(redis::cmd("FLUSHALL").arg("SYNC")).await;
    let _: () = redis.query(redis::cmd("SCRIPT").arg("FLUSH")).await;
    call(&b, "key-a", "m").await.expect("admitted: the counts were flushed");
    let sha = redis::Script::new(include_str!("../../src/admission/charge_v5.lua")).get_hash().to_owned();
    let exists: Vec<i64> = redis.query(redis::cmd("SCRIPT").arg("EXISTS").arg(&sha)).await;
    assert_eq!(exists, [1], "EVAL brought the script back");
}

/// Several tickets in one step are decided in order, each seeing what the
/// ones before it reserved; a refused one reserves nothing, and one
/// behind it that fits is still admitted.
#[tokio::test]
async fn the_script_decides_the_tickets_of_a_step_in_order() {
    let redis = RedisServer::start().await;
    let other = "{llmgw}:v3:s:other";
    // rpm 2 and concurrency 2 on SUBJECT; tickets a, b, c charge it, and d
    // charges SUBJECT's neighbour `other` (rpm 1) as well.
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(include_str!("../../src/admission/charge_v5.lua")).arg(5);
    cmd.arg(&[SUBJECT, SUBJECT, SUBJECT, other, other]);
    cmd.arg(&[0, 0, 4]);
    for m in ["a", "b", "c"] {
        cmd.arg(&[m, "60000", "1", "1", "0"]).arg(&[2, -1, 2, 10]);
    }
    cmd.arg(&["d", "60000", "1", "2", "0"]).arg(&[-1, -1, -1, 10]).arg(&[1, -1, -1, 10]);
    let answer: Vec<i64> = redis.query(&cmd).await;
    assert_eq!(answer.len(), 20, "five figures per ticket: {answer:?}");
    assert_eq!((answer[0], answer[5]), (1, 1), "a and b fit: {answer:?}");
    assert_eq!(answer[10..12], [0, 1], "c is refused by its first charge: {answer:?}");
    assert_eq!(answer[12], 1, "by rpm, not by its slot: {answer:?}");
    assert_eq!(answer[15], 1, "d fits, behind the refusal: {answer:?}");
    let fields = rate_fields(&redis).await;
    assert_eq!(fields.get("R"), Some(&2), "c reserved nothing: {fields:?}");
    assert_eq!(fields.get("C"), Some(&2), "{fields:?}");
    assert!(
        fields.contains_key("la") && fields.contains_key("lb") && !fields.contains_key("lc"),
        "{fields:?}"
    );
    let other_fields: std::collections::HashMap<String, i64> =
        redis.query(redis::cmd("HGETALL").arg(other)).await;
    assert_eq!(other_fields.get("R"), Some(&1), "d's one request: {other_fields:?}");
    // A settle-only step (no ticket) answers with the refunds alone.
    let mut settle = redis::cmd("EVAL");
    settle.arg(include_str!("../../src/admission/charge_v5.lua")).arg(1).arg(SUBJECT);
    settle.arg(&[1, 0, 0]).arg("a").arg(0).arg(0).arg(1).arg(0);
    let answer: Vec<i64> = redis.query(&settle).await;
    assert!(answer.is_empty(), "{answer:?}");
    assert_eq!(rate_fields(&redis).await.get("C"), Some(&1), "a gave its slot back");
}

/// `cluster: true`, seeded with a node that does not own the hash tag's
/// slot: the client must learn the cluster and follow MOVED to the owner.
#[tokio::test]
async fn two_gateways_sharing_a_redis_cluster_admit_exactly_the_limit() {
    let cluster = RedisCluster::start().await;
    let owner = cluster.owner("{llmgw}").await;
    let seed = &cluster.nodes[(owner + 1) % cluster.nodes.len()];
    let section = format!(
        "redis: {{ url: \"redis://127.0.0.1:{}\", cluster: true, failure_mode: closed, replicas: 2, timeout: 500ms }}\n",
        seed.port
    );
    let text = config("", [", limits: { rpm: 5 }", "", ""], &section);
    let (a, b) = (Gateway::start(&text).await, Gateway::start(&text).await);
    let mut admitted = 0;
    for i in 0..10 {
        match call(if i % 2 == 0 { &a } else { &b }, "key-a", "m").await {
            Ok(_) => admitted += 1,
            Err(s) => assert_refused(&s, Code::ResourceExhausted, "RATE_LIMITED", "key:key-a"),
        }
    }
    assert_eq!(admitted, 5, "rpm 5 holds for both gateways together, through the cluster");
    // Every key sits on the slot's owner; the seed holds none.
    let keys: Vec<String> = cluster.nodes[owner].query(redis::cmd("KEYS").arg("*")).await;
    assert!(!keys.is_empty() && keys.iter().all(|k| k.starts_with("{llmgw}:v3:")), "{keys:?}");
    let elsewhere: Vec<String> = seed.query(redis::cmd("KEYS").arg("*")).await;
    assert!(elsewhere.is_empty(), "{elsewhere:?}");
}

#[tokio::test]
async fn a_budget_spent_through_one_gateway_is_refused_through_the_other() {
    let redis = RedisServer::start().await;
    // A call reserves 30 tokens (its estimate of 10 and max_tokens 20) and
    // uses 6 (2 words in, 4 out): alone, a call fits a budget of 35.
    let budget = ", budget: { tokens: 35, window: 1d }";
    let text = config("", [budget, "", ""], &redis_section(&redis, "closed", 1));
    let (a, b) = (Gateway::start(&text).await, Gateway::start(&text).await);
    call(&a, "key-a", "m").await.expect("first call");
    // Settled with what it used: 29 left.
    let left = "llm_gateway_budget_remaining_tokens{key=\"key-a\"}";
    eventually(WAIT, "the settle to land", async || sample(&scrape(&a).await, left) == Some(29.0)).await;
    // Through the other gateway: 6 spent + 30 reserved > 35.
    let refused = call(&b, "key-a", "m").await.expect_err("spent through the other gateway");
    assert_refused(&refused, Code::ResourceExhausted, "BUDGET_EXHAUSTED", "key:key-a");
    assert!(md(refused.metadata(), "retry-after-ms").parse::<u64>().is_ok_and(|ms| ms <= 86_400_000));
}

#[tokio::test]
async fn redis_down_with_failure_mode_open_serves_on_local_limits_and_shares_again_when_back() {
    let mut redis = RedisServer::start().await;
    // key-a: rpm 4 over 2 replicas (2 each while Redis is down); key-c
    // has a limit that never bites, so its calls go to Redis: a probe.
    let keys = [", limits: { rpm: 4 }", ", limits: { rpm: 4 }", ", limits: { concurrency: 1000 }"];
    let text = config("", keys, &redis_section(&redis, "open", 2));
    let (a, b) = (Gateway::start(&text).await, Gateway::start(&text).await);
    call(&a, "key-c", "m").await.expect("through redis");
    redis.stop();
    let mut admitted = 0;
    for _ in 0..3 {
        let started = Instant::now();
        if call(&a, "key-a", "m").await.is_ok() {
            admitted += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "never a hang");
    }
    assert_eq!(admitted, 2, "this replica's share of rpm 4 while Redis is down");
    let text = scrape(&a).await;
    assert_eq!(sample(&text, "llm_gateway_redis_up "), Some(0.0), "{text}");
    assert!(sample(&text, "llm_gateway_admission_local_fallback_total").is_some_and(|n| n >= 1.0), "{text}");
    assert!(text.contains("llm_gateway_redis_errors_total"), "{text}");

    redis.restart().await;
    for gw in [&a, &b] {
        eventually(Duration::from_secs(10), "the gateway to use redis again", async || {
            call(gw, "key-c", "m").await.is_ok()
                && sample(&scrape(gw).await, "llm_gateway_redis_up ") == Some(1.0)
        })
        .await;
    }
    // Shared again: key-b's rpm 4 holds for both gateways together.
    let mut admitted = 0;
    for i in 0..8 {
        if call(if i % 2 == 0 { &a } else { &b }, "key-b", "m").await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 4);
}

/// Admissions that meet a step in flight share the next one: eight calls
/// held behind a frozen Redis take two round trips, not eight.
#[tokio::test]
async fn admissions_that_meet_a_step_in_flight_share_the_next_round_trip() {
    let redis = RedisServer::start().await;
    let section = format!("redis: {{ url: \"{}\", failure_mode: closed, timeout: 10s }}\n", redis.url());
    let gw = Gateway::start(&config("", [", limits: { rpm: 100 }", "", ""], &section)).await;
    call(&gw, "key-a", "m").await.expect("through redis");
    let trips = "llm_gateway_redis_round_trip_seconds_count ";
    eventually(WAIT, "the first call's admission and settle", async || {
        sample(&scrape(&gw).await, trips) == Some(2.0)
    })
    .await;
    redis.pause();
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut client = gw.client().await;
        streams.push(tokio::spawn(async move {
            let request = with_key("key-a", stream_request("long", "x"));
            let mut stream = client.stream_completion(request).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((stream, first))
        }));
    }
    eventually(WAIT, "eight calls waiting for their admission", async || {
        sample(&scrape(&gw).await, "llm_gateway_streams_in_flight ") == Some(8.0)
    })
    .await;
    redis.resume();
    // The streams are kept open: a stream dropped here would cancel its
    // call, whose settle would be one more round trip in the count.
    let mut open = Vec::new();
    for s in streams {
        let (stream, first) =
            within(WAIT, "a first delta", s).await.expect("the call's task").expect("admitted");
        assert!(first.is_some());
        open.push(stream);
    }
    // Read while the streams still run (5 s), before their settles.
    let n = sample(&scrape(&gw).await, trips).expect("the round-trip histogram") - 2.0;
    assert!((2.0..=3.0).contains(&n), "eight admissions took {n} round trips");
    drop(open);
}

/// Under limits far from full, calls take reservations made in Redis
/// ahead of them: one goes ahead while Redis is frozen, and those never
/// taken are given back whole (tokens, budget and leases).
#[tokio::test]
async fn calls_under_limits_far_from_full_take_reservations_made_ahead_and_the_rest_are_given_back() {
    const BUDGET: u64 = 1_000_000_000;
    let redis = RedisServer::start().await;
    let section = format!("redis: {{ url: \"{}\", failure_mode: closed, timeout: 10s }}\n", redis.url());
    let key = format!(
        ", limits: {{ rpm: 1000000, tpm: 1000000000, concurrency: 100000 }}, budget: {{ tokens: {BUDGET}, window: 1d }}"
    );
    let mk = "    model_limits: { \"lorem?tokens=4\": { rpm: 1000000, concurrency: 100000 } }";
    let gw = Gateway::start(&config(mk, [&key, "", ""], &section)).await;
    let held = "llm_gateway_admission_held_ahead ";
    // Calls close together: the pool starts holding some.
    let mut calls = 0u64;
    loop {
        call(&gw, "key-a", "m").await.expect("admitted");
        calls += 1;
        if sample(&scrape(&gw).await, held).is_some_and(|h| h >= 2.0) {
            break;
        }
        assert!(calls < 500, "no reservation held ahead after {calls} calls");
    }
    // Frozen, Redis answers nothing (a call asking it would wait 10 s):
    // the next call goes ahead at once, on a reservation held.
    redis.pause();
    let started = Instant::now();
    call(&gw, "key-a", "m").await.expect("admitted ahead");
    calls += 1;
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    redis.resume();
    let text = scrape(&gw).await;
    assert!(sample(&text, "llm_gateway_admission_admitted_ahead_total").is_some_and(|n| n >= 1.0), "{text}");
    // Left alone, the pool gives back all it held: the budget shows only
    // what the calls used (6 tokens each), and no lease is left in Redis.
    let left = "llm_gateway_budget_remaining_tokens{key=\"key-a\"}";
    let want = (BUDGET - 6 * calls) as f64;
    eventually(WAIT, "the reservations never taken given back", async || {
        let text = scrape(&gw).await;
        sample(&text, held) == Some(0.0) && sample(&text, left) == Some(want)
    })
    .await;
    for subject in ["key:key-a", "model:mk/lorem?tokens=4"] {
        let leases: Option<u64> =
            redis.query(redis::cmd("HGET").arg(format!("{{llmgw}}:v3:s:{subject}")).arg("C")).await;
        assert_eq!(leases, Some(0), "live leases of {subject}");
    }
}

#[tokio::test]
async fn redis_down_or_frozen_with_failure_mode_closed_fails_limited_calls_at_once() {
    let mut redis = RedisServer::start().await;
    let text = config("", [", limits: { rpm: 100 }", "", ""], &redis_section(&redis, "closed", 1));
    let gw = Gateway::start(&text).await;
    call(&gw, "key-a", "m").await.expect("through redis");
    // Frozen: connections open, no answer. The timeout bounds each call.
    redis.pause();
    for _ in 0..3 {
        let started = Instant::now();
        let refused = call(&gw, "key-a", "m").await.expect_err("limiter unavailable");
        assert_refused(&refused, Code::Unavailable, "LIMITER_UNAVAILABLE", "");
        assert!(started.elapsed() < Duration::from_secs(1), "never a hang: {:?}", started.elapsed());
    }
    // A call that needs no limit is served all the same.
    call(&gw, "key-b", "m").await.expect("no limit, no redis");
    redis.resume();
    redis.stop();
    let started = Instant::now();
    let refused = call(&gw, "key-a", "m").await.expect_err("redis is down");
    assert_refused(&refused, Code::Unavailable, "LIMITER_UNAVAILABLE", "");
    assert!(started.elapsed() < Duration::from_secs(1));
    redis.restart().await;
    eventually(Duration::from_secs(10), "calls through redis again", async || {
        call(&gw, "key-a", "m").await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_stream_is_charged_what_it_streamed_and_a_finished_one_its_cost() {
    let prices = "prices:\n  - { provider: mk, model: \"lorem?tokens=4\", input: 2.0, output: 10.0 }\n";
    let gw = Gateway::start(&config("", [", budget: { tokens: 1000, window: 1d }", "", ""], prices)).await;
    let mut client = gw.client().await;
    // A streamed answer's last message carries its cost.
    let answer = crate::harness::stream_call(&mut client, with_key("key-b", stream_request("m", "hi"))).await;
    let usage = answer.messages.last().and_then(|m| m.usage).expect("usage on the last message");
    assert!(
        usage.cost_usd > 0.0
            && (usage.cost_usd - (f64::from(usage.input_tokens) * 2.0 + 40.0) / 1e6).abs() < 1e-12
    );
    // A slow stream reserves its estimate (8) + max_tokens (20) of key-a's
    // budget; cancelled after 3 deltas it is charged 8 + what streamed.
    let mut r = stream_request("slow", "x");
    r.max_tokens = Some(20);
    let mut stream = within(WAIT, "slow stream", client.stream_completion(with_key("key-a", r)))
        .await
        .expect("admitted")
        .into_inner();
    for _ in 0..3 {
        within(WAIT, "a delta", stream.message()).await.expect("delta").expect("a message");
    }
    drop(stream);
    let left = "llm_gateway_budget_remaining_tokens{key=\"key-a\"}";
    let mut seen = None;
    eventually(WAIT, "the cancelled call's settle", async || {
        seen = sample(&scrape(&gw).await, left);
        seen.is_some_and(|v| v > 972.0)
    })
    .await;
    let charged = 1000.0 - seen.unwrap_or_default();
    assert!(
        (11.0..=14.0).contains(&charged),
        "charged {charged}: the input estimate and about 3 tokens streamed"
    );
}

/// Runs the charge script once with one charge on `{llmgw}:v3:s:s`, for
/// ticket `member`. Returns the script's answer.
async fn charge(redis: &RedisServer, member: &str, [rpm, tpm, cc, tokens]: [i64; 4]) -> Vec<i64> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(include_str!("../../src/admission/charge_v5.lua"))
        .arg(1)
        .arg(SUBJECT)
        .arg(&["0", "0", "1", member, "60000", "1", "1", "0"])
        .arg(&[rpm, tpm, cc, tokens]);
    redis.query(&cmd).await
}

const SUBJECT: &str = "{llmgw}:v3:s:s";

async fn charge_once(redis: &RedisServer, rpm: i64, tpm: i64, tokens: i64) -> Vec<i64> {
    charge(redis, "t1", [rpm, tpm, -1, tokens]).await
}

async fn rate_fields(redis: &RedisServer) -> std::collections::HashMap<String, i64> {
    redis.query(redis::cmd("HGETALL").arg(SUBJECT)).await
}

#[tokio::test]
async fn the_script_takes_aged_buckets_off_its_sums() {
    aged_buckets_come_off_the_sums(RedisServer::start().await).await;
}

#[tokio::test]
async fn the_script_takes_aged_buckets_off_its_sums_on_valkey() {
    aged_buckets_come_off_the_sums(RedisServer::valkey().await).await;
}

async fn aged_buckets_come_off_the_sums(redis: RedisServer) {
    let time: Vec<i64> = redis.query(&redis::cmd("TIME")).await;
    let now = time[0];
    // 70 s ago: out of the window; 10 s ago: in it.
    let (old, recent) = (now - 70, now - 10);
    let mut seed = redis::cmd("HSET");
    seed.arg(SUBJECT)
        .arg(&[format!("r{old}"), "5".into(), format!("t{old}"), "100".into()])
        .arg(&[format!("r{recent}"), "2".into(), format!("t{recent}"), "50".into()])
        .arg(&["R", "7", "T", "150", "o"])
        .arg(old);
    let _: i64 = redis.query(&seed).await;
    // Only the recent bucket counts: 2 requests + 1 fits rpm 3.
    let granted = charge_once(&redis, 3, 1000, 10).await;
    assert_eq!(granted[0], 1, "{granted:?}");
    let fields = rate_fields(&redis).await;
    assert_eq!(fields.get("R"), Some(&3), "{fields:?}");
    assert_eq!(fields.get("T"), Some(&60), "{fields:?}");
    assert!(
        !fields.contains_key(&format!("r{old}")) && !fields.contains_key(&format!("t{old}")),
        "{fields:?}"
    );
    assert!(fields.get("o").is_some_and(|&o| o >= now - 60), "{fields:?}");
    // A fourth request within the minute is refused, with the time until
    // the recent bucket ages out (about 51 s).
    let refused = charge_once(&redis, 3, 1000, 10).await;
    assert_eq!(refused[..3], [0, 1, 1], "{refused:?}");
    assert!((45_000..=52_000).contains(&refused[3]), "{refused:?}");
    // tpm: 60 used, 950 more would pass 1000.
    let refused = charge_once(&redis, 10, 1000, 950).await;
    assert_eq!(refused[..3], [0, 1, 2], "{refused:?}");
    // After a clock jump (an oldest second far in the past) every bucket
    // is counted again, and the sums come out the same.
    let _: i64 = redis.query(redis::cmd("HSET").arg(SUBJECT).arg(&["R", "999", "o", "1"])).await;
    let granted = charge_once(&redis, 10, 1000, 5).await;
    assert_eq!(granted[0], 1, "{granted:?}");
    let fields = rate_fields(&redis).await;
    assert_eq!((fields.get("R"), fields.get("T")), (Some(&4), Some(&65)), "{fields:?}");
}

#[tokio::test]
async fn the_script_counts_live_leases_and_purges_those_that_ran_out() {
    let redis = RedisServer::start().await;
    let time: Vec<i64> = redis.query(&redis::cmd("TIME")).await;
    let now_ms = time[0] * 1000 + time[1] / 1000;
    // Two leases of a replica that died (ended a second ago), one live.
    let mut seed = redis::cmd("HSET");
    seed.arg(SUBJECT).arg("C").arg(3);
    seed.arg("ldead-1").arg(now_ms - 1000).arg("ldead-2").arg(now_ms - 1000);
    seed.arg("llive").arg(now_ms + 60_000);
    let _: i64 = redis.query(&seed).await;
    // Concurrency 3: the dead leases are purged, so two more fit.
    assert_eq!(charge(&redis, "a", [-1, -1, 3, 1]).await[0], 1);
    assert_eq!(charge(&redis, "b", [-1, -1, 3, 1]).await[0], 1);
    let fields = rate_fields(&redis).await;
    let leases: Vec<&String> = fields.keys().filter(|f| f.starts_with('l')).collect();
    assert_eq!(leases.len(), 3, "{fields:?}");
    assert!(!leases.iter().any(|m| m.starts_with("ldead")), "{fields:?}");
    assert_eq!(fields.get("C"), Some(&3), "{fields:?}");
    // Full: a new ticket is refused, one already holding a slot is not.
    let refused = charge(&redis, "c", [-1, -1, 3, 1]).await;
    assert_eq!(refused[..3], [0, 1, 3], "{refused:?}");
    assert_eq!(charge(&redis, "a", [-1, -1, 3, 1]).await[0], 1);
    assert_eq!(rate_fields(&redis).await.get("C"), Some(&3), "a slot held is not counted twice");
    let ttl: i64 = redis.query(redis::cmd("PTTL").arg(SUBJECT)).await;
    assert!(ttl > 60_000, "the hash outlives its longest lease: {ttl}");
}

/// Settles of two tickets riding on a third's admission, in one step:
/// their tokens and leases come back before the new charge is checked,
/// and a release given twice frees one slot, not two.
/// Runs the script with `releases` (member, at_sec, leases, requests)
/// first, then one ticket of `units` calls charging `[rpm, tpm, cc,
/// tokens]` on SUBJECT.
async fn block_step(
    redis: &RedisServer,
    releases: &[(&str, i64, i64, i64)],
    ticket: Option<(&str, i64, [i64; 4])>,
) -> Vec<i64> {
    let mut cmd = redis::cmd("EVAL");
    let keys = releases.len() + usize::from(ticket.is_some());
    cmd.arg(include_str!("../../src/admission/charge_v5.lua")).arg(keys);
    for _ in 0..keys {
        cmd.arg(SUBJECT);
    }
    cmd.arg(releases.len()).arg(0).arg(usize::from(ticket.is_some()));
    for (member, at_sec, leases, requests) in releases {
        cmd.arg(member).arg(at_sec).arg(0).arg(leases).arg(requests);
    }
    if let Some((member, units, limits)) = ticket {
        cmd.arg(member).arg(60_000).arg(units).arg(1).arg(0).arg(&limits);
    }
    redis.query(&cmd).await
}

/// v5's blocks: a ticket of several calls counts a request and a lease for
/// each, its leases are given back by count, and a purge counts a live
/// block's leases and drops a dead one's.
#[tokio::test]
async fn the_script_reserves_blocks_and_gives_their_leases_back_by_count() {
    blocks_are_counted_and_given_back(RedisServer::start().await).await;
}

#[tokio::test]
async fn the_script_reserves_blocks_and_gives_their_leases_back_by_count_on_valkey() {
    blocks_are_counted_and_given_back(RedisServer::valkey().await).await;
}

async fn blocks_are_counted_and_given_back(redis: RedisServer) {
    // rpm 10, concurrency 4: a block of 3 and one call fit; one more does not.
    let granted = block_step(&redis, &[], Some(("blk", 3, [10, -1, 4, 30]))).await;
    assert_eq!(granted[0], 1, "{granted:?}");
    let at = granted[1];
    let fields = rate_fields(&redis).await;
    assert_eq!(
        (fields.get("R"), fields.get("C"), fields.get("nblk")),
        (Some(&3), Some(&3), Some(&3)),
        "{fields:?}"
    );
    let x = block_step(&redis, &[], Some(("x", 1, [10, -1, 4, 10]))).await;
    assert_eq!(x[0], 1, "{x:?}");
    let full = block_step(&redis, &[], Some(("y", 1, [10, -1, 4, 10]))).await;
    assert_eq!(full[..3], [0, 1, 3], "four leases held: {full:?}");
    // Two of the block's calls end: two leases come back, one is left.
    let _ = block_step(&redis, &[("blk", at, 1, 0), ("blk", at, 1, 0)], None).await;
    let fields = rate_fields(&redis).await;
    assert_eq!((fields.get("C"), fields.get("nblk")), (Some(&2), Some(&1)), "{fields:?}");
    // The call never taken goes back: its lease and its request. Giving
    // back more than the block holds takes only what it holds.
    let _ = block_step(&redis, &[("blk", at, 5, 1)], None).await;
    let fields = rate_fields(&redis).await;
    assert_eq!(
        (fields.get("C"), fields.get("R")),
        (Some(&1), Some(&3)),
        "x's lease; 4 requests less 1: {fields:?}"
    );
    let in_blk_second = 3 + i64::from(x[1] == at) - 1;
    assert_eq!(fields.get(&format!("r{at}")), Some(&in_blk_second), "{fields:?}");
    assert!(!fields.contains_key("lblk") && !fields.contains_key("nblk"), "{fields:?}");
    // A block can never be bigger than the limit.
    let never = block_step(&redis, &[], Some(("big", 11, [10, -1, -1, 10]))).await;
    assert_eq!(never[..3], [0, 1, 1], "{never:?}");
    assert_eq!(never[4], 1, "never fits: {never:?}");
    // A dead replica's block (5 leases, ended) and a live one (2): the
    // count says 8, the purge makes it 1 (x) + 2, and one more fits 4.
    let time: Vec<i64> = redis.query(&redis::cmd("TIME")).await;
    let now_ms = time[0] * 1000 + time[1] / 1000;
    let mut seed = redis::cmd("HSET");
    seed.arg(SUBJECT).arg("C").arg(8);
    seed.arg("ldead").arg(now_ms - 1000).arg("ndead").arg(5);
    seed.arg("llive").arg(now_ms + 60_000).arg("nlive").arg(2);
    let _: i64 = redis.query(&seed).await;
    assert_eq!(block_step(&redis, &[], Some(("z", 1, [-1, -1, 4, 10]))).await[0], 1);
    let fields = rate_fields(&redis).await;
    assert_eq!(fields.get("C"), Some(&4), "{fields:?}");
    assert!(!fields.contains_key("ldead") && !fields.contains_key("ndead"), "{fields:?}");
}

#[tokio::test]
async fn the_script_applies_carried_settles_before_the_charge() {
    let redis = RedisServer::start().await;
    // tpm 100, concurrency 2: tickets a and b reserve 40 tokens each.
    for m in ["a", "b"] {
        assert_eq!(charge(&redis, m, [-1, 100, 2, 40]).await[0], 1);
    }
    let at = charge(&redis, "c", [-1, 100, 2, 10]).await;
    assert_eq!(at[..3], [0, 1, 3], "80 + 10 fits tpm, but the slots are full: {at:?}");
    let at = rate_fields(&redis).await.keys().find_map(|f| f.strip_prefix('t')?.parse::<i64>().ok());
    let at = at.expect("this second's token bucket");
    // a used 10 of its 40 (refund 30), b all of its 40, and a's release is
    // sent twice; then c charges 50: 50 left + 50 fits tpm 100 exactly.
    // a's budget refund rides along too (window 5: 30 tokens, 400 nano-USD back).
    let budget = "{llmgw}:v3:budget:k";
    let _: i64 =
        redis.query(redis::cmd("HSET").arg(budget).arg(&["w", "5", "tok", "100", "usd", "1000"])).await;
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(include_str!("../../src/admission/charge_v5.lua")).arg(5);
    cmd.arg(&[SUBJECT, SUBJECT, SUBJECT, budget, SUBJECT]);
    cmd.arg(&[3, 1, 1]);
    cmd.arg("a").arg(at).arg(30).arg(1).arg(0);
    cmd.arg("b").arg(at).arg(0).arg(1).arg(0);
    cmd.arg("a").arg(at).arg(0).arg(1).arg(0);
    cmd.arg(&[5, 30, 400]);
    cmd.arg(&["c", "60000", "1", "1", "0"]);
    cmd.arg(&[-1, 100, 2, 50]);
    let answer: Vec<i64> = redis.query(&cmd).await;
    assert_eq!(answer[0], 1, "50 used + 50 fits tpm 100, and both slots are free: {answer:?}");
    assert_eq!(answer[5..], [70, 600, 5], "the refund's figures follow the decision");
    let fields = rate_fields(&redis).await;
    assert_eq!(fields.get("T"), Some(&100), "{fields:?}");
    assert_eq!(fields.get("C"), Some(&1), "only c holds a slot: {fields:?}");
    assert!(fields.contains_key("lc") && !fields.contains_key("la") && !fields.contains_key("lb"));
}
