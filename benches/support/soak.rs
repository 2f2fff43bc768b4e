//! The soak (issue #16): steady open-loop load at half the saturation rate,
//! mixed with what goes wrong in production (callers that cancel, short
//! deadlines, upstreams that answer 500, break off mid-stream or hang), then
//! a storm of cancels all at once. Each is followed by the checks that the
//! gateway went back to idle: no panic in its log, no upstream stream left
//! open, descriptors, threads and calls in flight back to their count
//! before, RSS within 20 %. Measured and shown, never asserted.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::Code;

use super::{
    BoxError,
    load::{self, STREAMS_PER_CONNECTION, Target},
    process::Gateway,
    upstream::Stats,
};

/// How much of everything.
pub struct SoakPlan {
    /// The closed-loop run that finds the saturation rate.
    pub saturation_time: Duration,
    pub concurrency: usize,
    pub soak_time: Duration,
    /// Calls in flight at most during the soak.
    pub max_in_flight: usize,
    pub storm: usize,
    /// Longest wait for the gateway to settle after each part.
    pub settle: Duration,
}

/// What the gateway looked like at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub rss_kib: u64,
    pub threads: u64,
    pub fds: u64,
    /// `llm_gateway_streams_in_flight` on /metrics.
    pub in_flight: f64,
    /// Response bodies the upstream is still writing or holding.
    pub upstream_streams: i64,
    /// Connections open at the upstream (the gateway's idle pool, at rest).
    pub upstream_connections: i64,
    /// Panic messages in the gateway's output so far.
    pub panics: u64,
}

impl Snapshot {
    async fn take(gateway: &Gateway, stats: &Stats) -> Result<Self, BoxError> {
        let usage = gateway.usage()?;
        Ok(Self {
            rss_kib: usage.rss_kib,
            threads: usage.threads,
            fds: std::fs::read_dir(format!("/proc/{}/fd", gateway.pid))?.count() as u64,
            in_flight: gateway.metric("llm_gateway_streams_in_flight").await?.unwrap_or(f64::NAN),
            upstream_streams: stats.streams_open.load(Ordering::Relaxed),
            upstream_connections: stats.connections_open.load(Ordering::Relaxed),
            panics: gateway.panics(),
        })
    }

    fn json(&self) -> Value {
        json!({
            "rss_kib": self.rss_kib,
            "threads": self.threads,
            "fds": self.fds,
            "streams_in_flight": self.in_flight,
            "upstream_streams_open": self.upstream_streams,
            "upstream_connections_open": self.upstream_connections,
            "panics": self.panics,
        })
    }
}

/// One part (the soak, or the storm): the calls and the state before and after.
pub struct Part {
    pub label: String,
    /// Call outcomes by gRPC code (plus `stuck`: still running at the bound).
    pub outcomes: BTreeMap<String, u64>,
    pub before: Snapshot,
    pub after: Snapshot,
    /// How long the gateway took to settle after the part.
    pub settle_s: f64,
    /// When RSS was more than 20 % up or threads more once settled: the
    /// readings once both were back (an allocator that purges on a clock,
    /// tokio's blocking threads that exit after 10 s idle), or at the bound.
    pub later: Option<Later>,
}

impl Part {
    /// Descriptors not explained by idle upstream connections the gateway
    /// pooled during the part (each is one descriptor of the gateway's).
    pub fn unexplained_fds(&self) -> i64 {
        let pooled = self.after.upstream_connections - self.before.upstream_connections;
        self.after.fds as i64 - self.before.fds as i64 - pooled.max(0)
    }

    pub fn rss_change(&self) -> f64 {
        self.after.rss_kib as f64 / self.before.rss_kib.max(1) as f64 - 1.0
    }

    /// The RSS change at the last reading: after the purge wait, if any.
    pub fn final_rss_change(&self) -> f64 {
        let last = self.later.map_or(self.after.rss_kib, |l| l.rss_kib);
        last as f64 / self.before.rss_kib.max(1) as f64 - 1.0
    }

    /// Every check of the issue, by name.
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("0 panics", self.after.panics == 0),
            ("0 upstream streams open", self.after.upstream_streams == 0),
            ("0 calls in flight", self.after.in_flight == 0.0),
            ("descriptors back", self.unexplained_fds() <= 0),
            ("threads back", self.later.map_or(self.after.threads, |l| l.threads) <= self.before.threads),
            ("RSS within 20 %", self.final_rss_change() <= 0.2),
            ("no call stuck", self.outcomes.get("stuck").copied().unwrap_or(0) == 0),
        ]
    }

    fn json(&self) -> Value {
        json!({
            "label": self.label,
            "outcomes": self.outcomes,
            "before": self.before.json(),
            "after": self.after.json(),
            "settle_s": self.settle_s,
            "unexplained_fds": self.unexplained_fds(),
            "rss_change": self.rss_change(),
            "back_after_s": self.later.and_then(|l| l.after_s),
            "final_rss_change": self.final_rss_change(),
            "checks": self.checks().into_iter().map(|(k, v)| (k.to_owned(), Value::from(v))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

pub struct Soak {
    pub saturation_per_s: f64,
    pub rate: f64,
    pub duration: Duration,
    /// The mix of call kinds, in percent.
    pub mix: Vec<(&'static str, u32)>,
    pub parts: Vec<Part>,
}

impl Soak {
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mix: Vec<String> = self.mix.iter().map(|(k, p)| format!("{k} {p}%")).collect();
        let _ = writeln!(
            out,
            "  saturation {:.0} calls/s; soak at {:.0} calls/s for {:.0} s: {}",
            self.saturation_per_s,
            self.rate,
            self.duration.as_secs_f64(),
            mix.join(", ")
        );
        for part in &self.parts {
            let outcomes: Vec<String> = part.outcomes.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "  {}: {}", part.label, outcomes.join(", "));
            let (b, a) = (&part.before, &part.after);
            let _ = writeln!(
                out,
                "    {:<24} {:>10} {:>10}\n    {:<24} {:>10} {:>10}\n    {:<24} {:>10} {:>10}   ({} not explained by pooled upstream connections)\n    {:<24} {:>10} {:>10}\n    {:<24} {:>10} {:>10}\n    {:<24} {:>10} {:>10}\n    {:<24} {:>10} {:>10}",
                "",
                "before",
                "after",
                "RSS",
                super::report::mib(b.rss_kib),
                format!("{} ({:+.1} %)", super::report::mib(a.rss_kib), part.rss_change() * 100.0),
                "descriptors",
                b.fds,
                a.fds,
                part.unexplained_fds(),
                "threads",
                b.threads,
                a.threads,
                "calls in flight",
                b.in_flight,
                a.in_flight,
                "upstream streams open",
                b.upstream_streams,
                a.upstream_streams,
                "upstream connections",
                b.upstream_connections,
                a.upstream_connections,
            );
            let checks: Vec<String> = part
                .checks()
                .into_iter()
                .map(|(name, ok)| format!("{name} {}", if ok { "✓" } else { "✗" }))
                .collect();
            if let Some(l) = part.later {
                let when = match l.after_s {
                    Some(s) => format!("back {s:.1} s later"),
                    None => format!("not back {:.0} s later", LATER_BOUND.as_secs_f64()),
                };
                let _ = writeln!(
                    out,
                    "    {when}: RSS {} ({:+.1} %), {} threads",
                    super::report::mib(l.rss_kib),
                    part.final_rss_change() * 100.0,
                    l.threads
                );
            }
            let _ = writeln!(out, "    settled in {:.1} s; {}", part.settle_s, checks.join(", "));
        }
        out
    }

    pub fn json(&self) -> Value {
        json!({
            "saturation_calls_per_s": self.saturation_per_s,
            "rate_calls_per_s": self.rate,
            "duration_s": self.duration.as_secs_f64(),
            "mix_percent": self.mix.iter().map(|(k, p)| (k.to_string(), Value::from(*p))).collect::<serde_json::Map<_, _>>(),
            "parts": self.parts.iter().map(Part::json).collect::<Vec<_>>(),
        })
    }
}

/// The kinds of call the soak mixes, and their shares in percent.
const MIX: [(&str, u32); 6] = [
    ("ok", 50),
    ("cancel", 15),
    ("upstream 500", 10),
    ("reset mid-stream", 10),
    ("hang", 10),
    ("deadline", 5),
];

/// Runs the soak and the storm on `gateway` (which serves the `soak-*`
/// models of `process::config_yaml`).
pub async fn run(gateway: &Gateway, stats: &Stats, plan: &SoakPlan) -> Result<Soak, BoxError> {
    let connections = plan.max_in_flight.div_ceil(STREAMS_PER_CONNECTION);
    let fast = Arc::new(
        Target::gateway(gateway.grpc_addr, plan.concurrency.div_ceil(STREAMS_PER_CONNECTION), "fast").await?,
    );
    // Warm-up and the saturation rate, closed loop: this also fills the
    // gateway's upstream pool, so that "before" is a warm gateway's state.
    load::run(fast.clone(), plan.concurrency, u64::MAX, plan.saturation_time / 3).await;
    let saturation = load::run(fast, plan.concurrency, u64::MAX, plan.saturation_time).await;
    let saturation_per_s = saturation.calls_per_s();
    let rate = (saturation_per_s / 2.0).max(1.0);

    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(load::pb_client(load::connect(gateway.grpc_addr).await?));
    }
    let clients = Arc::new(clients);
    settle(gateway, stats, plan.settle).await?;
    let before = Snapshot::take(gateway, stats).await?;
    let outcomes = open_loop(clients.clone(), rate, plan.soak_time, plan.max_in_flight).await;
    let settle_s = settle(gateway, stats, plan.settle).await?;
    let after = Snapshot::take(gateway, stats).await?;
    let later = back_later(gateway, &before, &after).await?;
    let soak = Part {
        label: format!("soak, {:.0} s", plan.soak_time.as_secs_f64()),
        outcomes,
        before,
        after,
        settle_s,
        later,
    };

    let before = after;
    let outcomes = storm(gateway, stats, plan.storm).await?;
    let settle_s = settle(gateway, stats, plan.settle).await?;
    let after = Snapshot::take(gateway, stats).await?;
    let later = back_later(gateway, &before, &after).await?;
    let storm = Part {
        label: format!("storm of {} concurrent cancels", plan.storm),
        outcomes,
        before,
        after,
        settle_s,
        later,
    };
    drop(clients);
    Ok(Soak { saturation_per_s, rate, duration: plan.soak_time, mix: MIX.to_vec(), parts: vec![soak, storm] })
}

/// How long the soak waits for RSS and threads to come back: jemalloc's
/// decay returns freed pages over about 10 s, and tokio's blocking threads
/// exit after 10 s idle.
const LATER_BOUND: Duration = Duration::from_secs(20);

/// What a part's RSS and threads came back to, after the settle.
#[derive(Clone, Copy, Debug)]
pub struct Later {
    /// Seconds after the settle; None: not back within [`LATER_BOUND`].
    pub after_s: Option<f64>,
    pub rss_kib: u64,
    pub threads: u64,
}

/// None when `after` already has RSS within 20 % of `before` and no more
/// threads; else polls (bounded by [`LATER_BOUND`]) until it has.
async fn back_later(
    gateway: &Gateway,
    before: &Snapshot,
    after: &Snapshot,
) -> Result<Option<Later>, BoxError> {
    let back = |rss_kib: u64, threads: u64| {
        rss_kib as f64 <= before.rss_kib as f64 * 1.2 && threads <= before.threads
    };
    if back(after.rss_kib, after.threads) {
        return Ok(None);
    }
    let t0 = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let usage = gateway.usage()?;
        let (rss_kib, threads) = (usage.rss_kib, usage.threads);
        if back(rss_kib, threads) {
            return Ok(Some(Later { after_s: Some(t0.elapsed().as_secs_f64()), rss_kib, threads }));
        }
        if t0.elapsed() > LATER_BOUND {
            return Ok(Some(Later { after_s: None, rss_kib, threads }));
        }
    }
}

/// Waits (bounded) for no call in flight and no upstream stream open; returns how long.
async fn settle(gateway: &Gateway, stats: &Stats, limit: Duration) -> Result<f64, BoxError> {
    let t0 = Instant::now();
    loop {
        let idle = stats.streams_open.load(Ordering::Relaxed) == 0
            && gateway.metric("llm_gateway_streams_in_flight").await?.is_some_and(|v| v == 0.0);
        if idle || t0.elapsed() > limit {
            // Let lazy frees and the log writer catch up before measuring.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(t0.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One call of the mix; returns its outcome's name.
async fn call(mut client: load::Client, kind: &str, rng: &mut fastrand::Rng) -> String {
    let (model, deadline, cancel_after) = match kind {
        "ok" => ("fast", Duration::from_secs(5), None),
        "cancel" => {
            let model = if rng.bool() { "fast" } else { "slow" };
            (model, Duration::from_secs(5), Some(Duration::from_micros(rng.u64(0..20_000))))
        }
        "upstream 500" => ("soak-500", Duration::from_secs(5), None),
        "reset mid-stream" => ("soak-reset", Duration::from_secs(5), None),
        "hang" => ("soak-hang", Duration::from_millis(rng.u64(100..400)), None),
        // A deadline shorter than the answer: cut off mid-stream.
        _ => ("slow", Duration::from_millis(rng.u64(20..200)), None),
    };
    let mut request = tonic::Request::new(load::request(model, "soak"));
    request.set_timeout(deadline);
    let work = async {
        let mut stream = match client.stream_completion(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return code(s.code()),
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return code(Code::Ok),
                Err(s) => return code(s.code()),
            }
        }
    };
    // The caller's own bound: a call still running past it is a leak.
    let bound = deadline + Duration::from_secs(5);
    match cancel_after {
        Some(after) => match tokio::time::timeout(after, work).await {
            Ok(outcome) => outcome,
            Err(_) => "cancelled by the caller".into(),
        },
        None => tokio::time::timeout(bound, work).await.unwrap_or_else(|_| "stuck".into()),
    }
}

fn code(c: Code) -> String {
    format!("{c:?}")
}

/// Poisson arrivals at `rate` for `duration`, each call of a kind drawn
/// from [`MIX`]; at most `max_in_flight` at once (an arrival waits for a slot).
async fn open_loop(
    clients: Arc<Vec<load::Client>>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
) -> BTreeMap<String, u64> {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut rng = fastrand::Rng::with_seed(16);
    let mut calls = JoinSet::new();
    let mut outcomes = BTreeMap::new();
    let t0 = tokio::time::Instant::now();
    let mut at = Duration::ZERO;
    let mut n = 0usize;
    loop {
        at += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate);
        if at >= duration {
            break;
        }
        tokio::time::sleep_until(t0 + at).await;
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let mut pick = rng.u32(0..100);
        let mut kind = "ok";
        for (k, p) in MIX {
            if pick < p {
                kind = k;
                break;
            }
            pick -= p;
        }
        let client = clients[n % clients.len()].clone();
        let mut call_rng = fastrand::Rng::with_seed(rng.u64(..));
        n += 1;
        calls.spawn(async move {
            let outcome = call(client, kind, &mut call_rng).await;
            drop(permit);
            outcome
        });
        while let Some(done) = calls.try_join_next() {
            *outcomes.entry(done.unwrap_or_else(|_| "panicked".into())).or_insert(0) += 1;
        }
    }
    while let Some(done) = calls.join_next().await {
        *outcomes.entry(done.unwrap_or_else(|_| "panicked".into())).or_insert(0) += 1;
    }
    outcomes
}

/// `n` streams held open on the silent upstream, then every caller gone at
/// once.
async fn storm(gateway: &Gateway, stats: &Stats, n: usize) -> Result<BTreeMap<String, u64>, BoxError> {
    // The gateway allows 1,024 streams a connection; stay below.
    const PER_CONNECTION: usize = 500;
    const OPENERS: usize = 128;
    let mut clients = Vec::new();
    for _ in 0..n.div_ceil(PER_CONNECTION) {
        clients.push(load::pb_client(load::connect(gateway.grpc_addr).await?));
    }
    let clients = Arc::new(clients);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut openers = JoinSet::new();
    for _ in 0..OPENERS {
        let (clients, next) = (clients.clone(), next.clone());
        openers.spawn(async move {
            let mut held = Vec::new();
            let mut failed = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let mut client = clients[i / PER_CONNECTION].clone();
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    load::open_held(&mut client, "slow", "storm"),
                )
                .await
                {
                    Ok(Ok(s)) => held.push(s),
                    _ => failed += 1,
                }
            }
            (held, failed)
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut outcomes = BTreeMap::new();
    while let Some(joined) = openers.join_next().await {
        let (streams, failed) = joined?;
        held.extend(streams);
        if failed > 0 {
            *outcomes.entry("failed to open".to_owned()).or_insert(0) += failed;
        }
    }
    // Every stream is held at the upstream before the callers all leave.
    let t0 = Instant::now();
    while (stats.held.load(Ordering::Relaxed) as usize) < held.len() && t0.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    outcomes.insert("cancelled by the caller".to_owned(), held.len() as u64);
    drop(held);
    drop(clients);
    Ok(outcomes)
}
