//! A ticket's rules on the local backend, on tokio's paused clock: the key
//! charged once across targets, the queue (FIFO, deadline-aware, bounded,
//! left on cancel), settling exactly once, budgets.

use std::{sync::Arc, time::Duration};

use futures_util::FutureExt;

use super::{Admission, Gate, RefusalReason, Scope, Ticket};
use crate::{chat::Usage, telemetry::metrics::Metrics};

const KEY: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn admission(extra_provider: &str, key: &str, rest: &str) -> Arc<Admission> {
    let text = format!(
        "\
providers:
  p:
    kind: mock
    default_max_tokens: 100
{extra_provider}
  q:
    kind: mock
models:
  chat:
    targets: [{{ provider: p, model: a }}, {{ provider: q, model: b }}]
api_keys:
  - {{ name: k, key_sha256: \"{KEY}\"{key} }}
{rest}"
    );
    let config = crate::config::parse(&text, None).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Arc::new(Admission::new(&config, Arc::new(Metrics::new())).unwrap())
}

fn ticket(a: &Arc<Admission>, input: u32, max_tokens: Option<u32>) -> Ticket {
    a.ticket(Some("k"), input, max_tokens)
}

fn soon() -> Option<std::time::Instant> {
    Some(std::time::Instant::now() + Duration::from_secs(30))
}

#[tokio::test(start_paused = true)]
async fn the_key_is_charged_once_however_many_targets_are_tried() {
    let a = admission("    limits: { rpm: 1 }", ", limits: { rpm: 2 }", "queue: { max_wait: 0s }");
    let mut first = ticket(&a, 10, None);
    first.reserve("p", "a", soon()).await.unwrap();
    // Target p is full now; the second call falls back to q.
    let mut second = ticket(&a, 10, None);
    let refused = second.reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!((refused.scope, refused.reason), (Scope::Target, RefusalReason::RateLimited));
    assert_eq!(refused.subject, "target:p/a");
    assert!(refused.retry_after.is_some_and(|r| r > Duration::from_secs(59)), "{refused:?}");
    second.reserve("q", "b", soon()).await.unwrap();
    // A refused reservation charged nothing, the fallback charged the key
    // once: rpm 2 of the key is used up by the two calls.
    let mut third = ticket(&a, 10, None);
    let refused = third.reserve("q", "b", soon()).await.unwrap_err();
    assert_eq!((refused.scope, refused.subject.as_str()), (Scope::Key, "key:k"));
    assert!(refused.description.contains("rpm 2 of key k"), "{}", refused.description);
}

#[tokio::test(start_paused = true)]
async fn a_full_target_queues_first_come_first_served() {
    let a = admission("    limits: { concurrency: 1 }", "", "queue: { max_wait: 10s, max_waiting: 10 }");
    let mut holder = ticket(&a, 1, None);
    holder.reserve("p", "a", soon()).await.unwrap();
    assert!(!holder.has_capacity("p", "a"));
    let mut b = ticket(&a, 1, None);
    let mut c = ticket(&a, 1, None);
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let (tb, tc) = (tx.clone(), tx);
    let run_b = async {
        b.reserve("p", "a", soon()).await.unwrap();
        tb.send("b").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.settle(Some(Usage::default()), 0);
    };
    let run_c = async {
        // c comes second.
        tokio::time::sleep(Duration::from_millis(1)).await;
        c.reserve("p", "a", soon()).await.unwrap();
        tc.send("c").await.unwrap();
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(holder);
    };
    tokio::join!(run_b, run_c, release);
    assert_eq!(rx.recv().await, Some("b"));
    assert_eq!(rx.recv().await, Some("c"));
    assert!(b.waited() >= Duration::from_secs(2), "{:?}", b.waited());
    // c, queued at 1 ms, is admitted when b settles at 3 s.
    assert!(c.waited() >= Duration::from_millis(2_999), "{:?}", c.waited());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_that_cannot_be_met_is_refused_at_once() {
    let a = admission("    limits: { rpm: 1 }", "", "queue: { max_wait: 10m }");
    ticket(&a, 1, None).reserve("p", "a", soon()).await.unwrap();
    let started = tokio::time::Instant::now();
    // The next slot is 61 s away; the call has 5 s.
    let deadline = Some(std::time::Instant::now() + Duration::from_secs(5));
    let refused = ticket(&a, 1, None).reserve("p", "a", deadline).await.unwrap_err();
    assert_eq!(refused.reason, RefusalReason::RateLimited);
    assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
    // With time enough, the same call waits for the slot and gets it.
    let mut patient = ticket(&a, 1, None);
    patient.reserve("p", "a", Some(std::time::Instant::now() + Duration::from_secs(90))).await.unwrap();
    assert!(patient.waited() >= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded_and_a_cancelled_waiter_leaves_it_at_once() {
    let a = admission("    limits: { concurrency: 1 }", "", "queue: { max_wait: 10s, max_waiting: 1 }");
    let mut holder = ticket(&a, 1, None);
    holder.reserve("p", "a", soon()).await.unwrap();
    let mut waiter = ticket(&a, 1, None);
    let mut waiting = waiter.reserve("p", "a", soon());
    assert!((&mut waiting).now_or_never().is_none(), "waits");
    let full = ticket(&a, 1, None).reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!(full.reason, RefusalReason::QueueTimeout);
    assert!(full.description.contains("max_waiting"), "{}", full.description);
    // The caller cancels: its place is free at once.
    drop(waiting);
    let mut next = ticket(&a, 1, None);
    let mut next_waiting = next.reserve("p", "a", soon());
    assert!((&mut next_waiting).now_or_never().is_none(), "queued in the freed place");
    drop(next_waiting);
    // Waiting past max_wait ends in QUEUE_TIMEOUT.
    let started = tokio::time::Instant::now();
    let timeout = ticket(&a, 1, None).reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!(timeout.reason, RefusalReason::QueueTimeout);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    drop(holder);
}

#[tokio::test(start_paused = true)]
async fn settles_once_with_the_real_usage_and_refuses_what_never_fits() {
    let a = admission("    limits: { tpm: 200 }", "", "");
    let never = ticket(&a, 150, Some(100)).reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!(never.reason, RefusalReason::RateLimited);
    assert_eq!(never.retry_after, None, "it can never fit");
    assert!(never.description.contains("alone reserves 250"), "{}", never.description);
    let mut t = ticket(&a, 50, Some(100));
    t.reserve("p", "a", soon()).await.unwrap();
    // 150 reserved, 50 left: a call of 60 does not fit.
    assert!(!ticket(&a, 10, Some(50)).has_capacity("p", "a"));
    t.settle(Some(Usage { input_tokens: 20, output_tokens: 10, ..Usage::default() }), 0);
    // Settled with 30: 170 left; a second settle and the drop change nothing.
    t.settle(Some(Usage::default()), 0);
    drop(t);
    let mut fits = ticket(&a, 70, Some(100));
    fits.reserve("p", "a", soon()).await.unwrap();
    assert!(!ticket(&a, 0, Some(1)).has_capacity("p", "a"), "170 + 30 = 200");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_ticket_is_charged_the_estimate_and_what_streamed() {
    let a = admission("    limits: { tpm: 1000 }", "", "");
    let mut t = ticket(&a, 100, Some(500));
    t.reserve("p", "a", soon()).await.unwrap();
    t.note_streamed(50);
    drop(t);
    // 150 charged: 850 fit, 851 do not.
    assert!(ticket(&a, 350, Some(500)).has_capacity("p", "a"));
    assert!(!ticket(&a, 351, Some(500)).has_capacity("p", "a"));
}

#[tokio::test(start_paused = true)]
async fn a_released_target_gives_its_charge_back() {
    let a = admission("    limits: { concurrency: 1, tpm: 1000 }", "", "queue: { max_wait: 0s }");
    let mut t = ticket(&a, 100, Some(100));
    t.reserve("p", "a", soon()).await.unwrap();
    t.release("p", "a");
    // Released in full (the attempt failed before its first delta).
    let mut u = ticket(&a, 800, Some(200));
    u.reserve("p", "a", soon()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn budgets_refuse_the_key_until_the_window_ends() {
    let a = admission("", ", budget: { tokens: 1000, window: 1h }", "");
    let mut t = ticket(&a, 100, Some(300));
    t.reserve("p", "a", soon()).await.unwrap();
    t.settle(Some(Usage { input_tokens: 400, output_tokens: 500, ..Usage::default() }), 0);
    let refused = ticket(&a, 100, Some(100)).reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!((refused.reason, refused.scope), (RefusalReason::BudgetExhausted, Scope::Key));
    assert!(refused.description.contains("1000 tokens per 1h of key k"), "{}", refused.description);
    let retry = refused.retry_after.unwrap();
    assert!(retry <= Duration::from_secs(3600));
    tokio::time::advance(retry).await;
    ticket(&a, 100, Some(100)).reserve("p", "a", soon()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn usd_budgets_and_cost_follow_prices() {
    let a = admission(
        "",
        ", budget: { usd: 0.001 }",
        "prices:\n  - { provider: p, model: a, input: 1.0, output: 2.0, cached_input: 0.5 }",
    );
    let mut t = ticket(&a, 100, Some(100));
    t.reserve("p", "a", soon()).await.unwrap();
    let usage = Usage { input_tokens: 200, output_tokens: 300, ..Usage::default() };
    // 200 * 1 + 300 * 2 per million.
    assert!((t.cost_usd(usage, 0) - 0.0008).abs() < 1e-12);
    assert!((t.cost_usd(usage, 100) - 0.00075).abs() < 1e-12);
    t.settle(Some(usage), 0);
    // 0.0008 of 0.001 spent: a call reserving 0.0003 is refused.
    let refused = ticket(&a, 100, Some(100)).reserve("p", "a", soon()).await.unwrap_err();
    assert_eq!(refused.reason, RefusalReason::BudgetExhausted);
    assert!(refused.description.contains("0.001 USD"), "{}", refused.description);
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_behind_the_queue_counts_the_refill_of_those_ahead() {
    let a = admission("    limits: { rpm: 1 }", "", "queue: { max_wait: 10m }");
    ticket(&a, 1, None).reserve("p", "a", soon()).await.unwrap();
    let mut first = ticket(&a, 1, None);
    let mut waiting = first.reserve("p", "a", Some(std::time::Instant::now() + Duration::from_secs(120)));
    assert!((&mut waiting).now_or_never().is_none(), "the first waiter queues");
    // One waiter ahead at rpm 1: at least a minute more; 30 s is too short.
    let started = tokio::time::Instant::now();
    let late = ticket(&a, 1, None)
        .reserve("p", "a", Some(std::time::Instant::now() + Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert_eq!((late.reason, late.scope), (RefusalReason::QueueTimeout, Scope::Target));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(late.description.contains("1 call(s) wait"), "{}", late.description);
    drop(waiting);
}
