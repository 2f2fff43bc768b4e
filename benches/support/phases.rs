//! The measurements, one function each; every one is bounded in calls and in
//! time, and none judges what it measured.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use super::{
    BoxError,
    collector::CollectorStats,
    load::{self, RunResult, STREAMS_PER_CONNECTION, Target},
    process::{Gateway, ProcUsage, clock_ticks, machine_busy_ticks, thread_ticks},
    report::{Cancellation, Cpu, Memory, MemoryLevel, OpenLoop, Pair, Startup, TracingVariant},
    upstream::Stats,
    versus::{VersusRow, VersusRun},
};

/// Starts `n` gateways one after another, timing each to SERVING.
pub async fn startup(bin: &Path, config: &str, n: usize) -> Result<Startup, BoxError> {
    let mut s = Startup { to_log_us: Vec::new(), to_serving_us: Vec::new(), idle_rss_kib: Vec::new() };
    for _ in 0..n {
        let gateway = Gateway::spawn(bin, config).await?;
        s.to_log_us.push(gateway.start.to_log.as_micros() as u64);
        s.to_serving_us.push(gateway.start.to_serving.as_micros() as u64);
        s.idle_rss_kib.push(gateway.usage()?.rss_kib);
    }
    s.to_log_us.sort_unstable();
    s.to_serving_us.sort_unstable();
    Ok(s)
}

/// HTTP/2 connections for `concurrency` streams.
fn connections_for(concurrency: usize) -> usize {
    concurrency.div_ceil(STREAMS_PER_CONNECTION)
}

/// Which front door the gateway side of a run goes through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Front {
    Grpc,
    /// The OpenAI-compatible HTTP API (`http_listen`), streaming SSE.
    Http,
}

/// The load target for `model` through `front`.
async fn via(
    gateway: &Gateway,
    front: Front,
    model: &'static str,
    concurrency: usize,
) -> Result<Target, BoxError> {
    match front {
        Front::Grpc => Target::gateway(gateway.grpc_addr, connections_for(concurrency), model).await,
        Front::Http => {
            let addr = gateway.http_addr.ok_or("the gateway logged no http_addr (http_listen unset?)")?;
            Target::gateway_http(addr, model)
        }
    }
}

/// The same calls, `concurrency` at a time, first straight to the upstream
/// and then through the gateway's `front` door, each after an unmeasured
/// warm-up that fills the connection pools.
#[expect(clippy::too_many_arguments, reason = "one run's whole description")]
pub async fn pair(
    label: &str,
    gateway: &Gateway,
    front: Front,
    direct: Arc<Target>,
    model: &'static str,
    concurrency: usize,
    calls: u64,
    max_time: Duration,
) -> Result<Pair, BoxError> {
    let via = Arc::new(via(gateway, front, model, concurrency).await?);
    let warmup = (2 * concurrency as u64).max(200).min(calls);
    load::run(direct.clone(), concurrency, warmup, max_time).await;
    let direct_run = load::run(direct, concurrency, calls, max_time).await;
    load::run(via.clone(), concurrency, warmup, max_time).await;
    let before = CpuTicks::sample(gateway)?;
    let gateway_run = load::run(via, concurrency, calls, max_time).await;
    let cpu = CpuTicks::sample(gateway)?.since(before);
    Ok(Pair { label: label.to_owned(), concurrency, direct: direct_run, gateway: gateway_run, cpu })
}

/// Calls in flight at most in the open-loop runs: the budget's c=64.
pub const OPEN_LOOP_IN_FLIGHT: usize = 64;

/// Open loop at `rate` calls/s for `duration`: the same Poisson schedule
/// straight to the upstream and then through the gateway, each after a
/// warm-up at that rate (a schedule of its own).
pub async fn open_loop(
    gateway: &Gateway,
    direct: Arc<Target>,
    model: &'static str,
    rate: f64,
    duration: Duration,
    max_time: Duration,
) -> Result<OpenLoop, BoxError> {
    let limit = OPEN_LOOP_IN_FLIGHT;
    let via = Arc::new(Target::gateway(gateway.grpc_addr, connections_for(limit), model).await?);
    let warmup = (duration / 5).min(Duration::from_secs(1));
    let seed = rate.to_bits();
    load::open_loop(direct.clone(), rate, warmup, limit, !seed, max_time).await;
    let direct_run = load::open_loop(direct, rate, duration, limit, seed, max_time).await;
    load::open_loop(via.clone(), rate, warmup, limit, !seed, max_time).await;
    let before = CpuTicks::sample(gateway)?;
    let gateway_run = load::open_loop(via, rate, duration, limit, seed, max_time).await;
    let cpu = CpuTicks::sample(gateway)?.since(before);
    Ok(OpenLoop { rate, limit, direct: direct_run, gateway: gateway_run, cpu })
}

/// Like [`pair`], but bounded by time only: saturation throughput.
#[expect(clippy::too_many_arguments, reason = "one run's whole description")]
pub async fn throughput(
    label: &str,
    gateway: &Gateway,
    front: Front,
    direct: Arc<Target>,
    model: &'static str,
    concurrency: usize,
    duration: Duration,
    perf: Option<&Path>,
) -> Result<Pair, BoxError> {
    let via = Arc::new(via(gateway, front, model, concurrency).await?);
    let warmup = (duration / 3).min(Duration::from_secs(1));
    load::run(direct.clone(), concurrency, u64::MAX, warmup).await;
    let direct_run = load::run(direct, concurrency, u64::MAX, duration).await;
    load::run(via.clone(), concurrency, u64::MAX, warmup).await;
    let profiler = match perf {
        Some(out) => Some(super::perf::Recorder::start(gateway.pid, out)?),
        None => None,
    };
    let before = CpuTicks::sample(gateway)?;
    let gateway_run = load::run(via, concurrency, u64::MAX, duration).await;
    let cpu = CpuTicks::sample(gateway)?.since(before);
    if let Some(p) = profiler {
        p.stop().await;
    }
    Ok(Pair { label: label.to_owned(), concurrency, direct: direct_run, gateway: gateway_run, cpu })
}

/// One side of [`Turns`]: its slices' sums.
#[derive(Debug, Default, Clone, Copy)]
pub struct Side {
    pub calls: u64,
    pub deltas: u64,
    pub secs: f64,
    /// The gateway's CPU over its slices.
    pub cpu_s: f64,
    pub errors: u64,
}

impl Turns {
    /// The main side's calls/s over the baseline's.
    pub fn ratio(&self) -> f64 {
        self.main.calls_per_s() / self.base.calls_per_s().max(1e-9)
    }
}

impl Side {
    pub fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.secs.max(1e-9)
    }

    pub fn us_per_delta(&self) -> f64 {
        self.cpu_s * 1e6 / self.deltas.max(1) as f64
    }
}

/// The same saturation load on two gateways in turns (the main one, the
/// baseline, the baseline, the main one, twice), each side's slices summed,
/// so that a drift of the machine's speed falls on both alike. Runs one
/// after the other cannot promise that: two no-limit admission rows of one
/// run differed by 32 %, and `--baseline`'s rows, which put the baseline
/// always second, read one change as +14 %, +3 % and −15 % in one hour.
/// Used by `--baseline` (this build against another) and by the admission
/// rows (each row against a plain gateway).
#[derive(Debug, Clone)]
pub struct Turns {
    pub label: &'static str,
    pub slices: usize,
    pub slice: Duration,
    pub main: Side,
    pub base: Side,
}

pub async fn turns(
    label: &'static str,
    main: &Gateway,
    main_key: Option<&'static str>,
    base: &Gateway,
    model: &'static str,
    concurrency: usize,
    duration: Duration,
) -> Result<Turns, BoxError> {
    const SLICES: usize = 8;
    let a = Arc::new(via(main, Front::Grpc, model, concurrency).await?.with_key(main_key));
    let b = Arc::new(via(base, Front::Grpc, model, concurrency).await?);
    let warmup = Duration::from_millis(300);
    load::run(a.clone(), concurrency, u64::MAX, warmup).await;
    load::run(b.clone(), concurrency, u64::MAX, warmup).await;
    let slice = duration / (SLICES as u32 / 2);
    let mut out = Turns { label, slices: SLICES, slice, main: Side::default(), base: Side::default() };
    for i in 0..SLICES {
        let main_turn = matches!(i % 4, 0 | 3);
        let (target, gateway) = if main_turn { (a.clone(), main) } else { (b.clone(), base) };
        let before = CpuTicks::sample(gateway)?;
        let r = load::run(target, concurrency, u64::MAX, slice).await;
        let cpu = CpuTicks::sample(gateway)?.since(before);
        let side = if main_turn { &mut out.main } else { &mut out.base };
        side.calls += r.calls;
        side.deltas += r.deltas;
        side.secs += r.elapsed.as_secs_f64();
        side.cpu_s += cpu.gateway_s;
        side.errors += r.errors;
    }
    Ok(out)
}

/// How one tracing-cost gateway is run.
pub struct TracingRun<'a> {
    pub label: &'static str,
    /// Added to the gateway's (scrubbed) environment.
    pub env: Vec<(&'static str, String)>,
    /// The collector the gateway exports to, if any: its spans are counted.
    pub collector: Option<&'a CollectorStats>,
    /// Calls of the time-to-first-token run, one at a time.
    pub calls: u64,
    /// Calls in flight and duration of the saturation run.
    pub concurrency: usize,
    pub duration: Duration,
    /// Longest the time-to-first-token run may take.
    pub max_time: Duration,
    /// The client key the calls carry, when the config has `api_keys`.
    pub key: Option<&'static str>,
    /// `perf record` the gateway during the saturation run, into this file.
    pub perf: Option<&'a Path>,
    /// A gateway with no feature on, to run saturation slices with this one
    /// in turn ([`Turns`]: this one is the main side, the plain one the
    /// baseline).
    pub plain: Option<&'a Gateway>,
    /// The upstream itself: the time-to-first-token calls then alternate
    /// with calls straight to it, read into `direct_ttft`.
    pub direct: Option<Arc<Target>>,
}

/// A fresh gateway started with `run.env`, then the same workload as the
/// other parts, through the gateway only: time to first token at c=1 after a
/// warm-up, and saturation at `run.concurrency` for `run.duration`. Then the
/// spans the collector received (once its exporter has gone quiet) and the
/// gateway's dropped-span counter.
pub async fn tracing_variant(
    bin: &Path,
    config: &str,
    run: TracingRun<'_>,
) -> Result<TracingVariant, BoxError> {
    let env: Vec<(&str, &str)> = run.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spans_before = run.collector.map(|c| (c.spans(), c.requests()));
    let mut gateway = Gateway::spawn_with_env(bin, config, &env).await?;
    let mut served = 0;

    let one = Arc::new(Target::gateway(gateway.grpc_addr, 1, "fast").await?.with_key(run.key));
    let warmup = load::run(one.clone(), 1, 200.min(run.calls), run.max_time).await;
    served += warmup.calls + warmup.errors;
    let (ttft, direct_ttft) = match &run.direct {
        Some(direct) => {
            let mut both = load::in_turns(&[&one, direct], run.calls, run.max_time).await;
            let direct = both.pop();
            (both.pop().unwrap_or_default(), direct)
        }
        None => (load::run(one, 1, run.calls, run.max_time).await, None),
    };
    served += ttft.calls + ttft.errors;

    let c = run.concurrency;
    let many =
        Arc::new(Target::gateway(gateway.grpc_addr, connections_for(c), "fast").await?.with_key(run.key));
    let warmup = load::run(many.clone(), c, u64::MAX, (run.duration / 3).min(Duration::from_secs(1))).await;
    served += warmup.calls + warmup.errors;
    let profiler = match run.perf {
        Some(out) => Some(super::perf::Recorder::start(gateway.pid, out)?),
        None => None,
    };
    let before = CpuTicks::sample(&gateway)?;
    let throughput = load::run(many, c, u64::MAX, run.duration).await;
    let cpu = CpuTicks::sample(&gateway)?.since(before);
    if let Some(p) = profiler {
        p.stop().await;
    }
    served += throughput.calls + throughput.errors;
    let paired = match run.plain {
        Some(plain) => {
            let t = turns(run.label, &gateway, run.key, plain, "fast", c, run.duration).await?;
            served += t.main.calls + t.main.errors;
            Some(t)
        }
        None => None,
    };

    // The last calls' spans end just after their callers see the end; then
    // the exporter (if any) sends what it still holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = match (run.collector, spans_before) {
        (Some(c), Some((spans, requests))) => {
            let all = c.settle(Duration::from_secs(1), Duration::from_secs(15)).await;
            Some((all.saturating_sub(spans), c.requests().saturating_sub(requests)))
        }
        _ => None,
    };
    let dropped = gateway.metric("llm_gateway_dropped_spans_total").await?;
    let redis_trips = gateway.metric("llm_gateway_redis_round_trip_seconds_count").await?;
    let redis_seconds = gateway.metric("llm_gateway_redis_round_trip_seconds_sum").await?;
    let admitted_ahead = gateway.metric("llm_gateway_admission_admitted_ahead_total").await?;
    if !gateway.alive() {
        return Err(format!("the \"{}\" gateway died under load:\n{}", run.label, gateway.tail()).into());
    }
    Ok(TracingVariant {
        label: run.label,
        env: run.env,
        ttft,
        throughput,
        concurrency: c,
        cpu,
        calls_total: served,
        spans_received: received.map(|r| r.0),
        export_requests: received.map(|r| r.1),
        dropped_spans: dropped,
        redis_trips,
        redis_seconds,
        admitted_ahead,
        direct_ttft,
        paired,
        note: None,
    })
}

/// `n` calls at once on a single HTTP/2 connection: what one client with
/// many calls in flight meets (see [`STREAMS_PER_CONNECTION`]).
pub async fn burst(gateway: &Gateway, n: usize, max_time: Duration) -> Result<RunResult, BoxError> {
    let via = Arc::new(Target::gateway(gateway.grpc_addr, 1, "fast").await?);
    Ok(load::run(via, n, n as u64, max_time).await)
}

/// CPU ticks of the gateway, and of the bench's client and upstream threads.
#[derive(Clone, Copy)]
struct CpuTicks {
    gateway: u64,
    client: u64,
    upstream: u64,
    collector: u64,
    bench: u64,
    machine: u64,
}

impl CpuTicks {
    fn sample(gateway: &Gateway) -> Result<Self, BoxError> {
        Self::of(Some(gateway.pid))
    }

    /// With the gateway process `pid` (none: a run straight to the upstream).
    fn of(pid: Option<u32>) -> Result<Self, BoxError> {
        Ok(Self {
            gateway: match pid {
                Some(pid) => ProcUsage::of(&pid.to_string())?.cpu_ticks,
                None => 0,
            },
            client: thread_ticks(super::CLIENT_THREADS),
            upstream: thread_ticks(super::UPSTREAM_THREADS),
            collector: thread_ticks(super::COLLECTOR_THREADS),
            bench: ProcUsage::of("self")?.cpu_ticks,
            machine: machine_busy_ticks(),
        })
    }

    fn since(self, before: Self) -> Cpu {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / clock_ticks() as f64;
        Cpu {
            gateway_s: s(self.gateway, before.gateway),
            client_s: s(self.client, before.client),
            upstream_s: s(self.upstream, before.upstream),
            collector_s: s(self.collector, before.collector),
            other_s: s(
                self.machine.saturating_sub(self.gateway + self.bench),
                before.machine.saturating_sub(before.gateway + before.bench),
            ),
        }
    }
}

/// Gateway RSS idle and with `levels` streams held open on the silent
/// upstream; then every stream is dropped and the upstream must see them all
/// close.
/// How long the memory part idles after the streams closed before its last
/// reading.
const AFTER_IDLE: Duration = Duration::from_secs(15);

pub async fn memory(
    gateway: &Gateway,
    stats: &Stats,
    levels: &[usize],
    max_time: Duration,
) -> Result<Memory, BoxError> {
    // The gateway allows 1,024 streams a connection; stay below.
    const PER_CONNECTION: usize = 1000;
    // Opens in flight at once: enough to go fast, few enough not to overflow
    // the listen backlogs.
    const OPENERS: usize = 128;
    let idle_kib = gateway.usage()?.rss_kib;
    let most = levels.iter().copied().max().unwrap_or(0);
    let mut clients = Vec::new();
    for _ in 0..most.div_ceil(PER_CONNECTION) {
        clients.push(load::connect(gateway.grpc_addr).await?);
    }
    let clients = Arc::new(clients);
    let mut held = Vec::with_capacity(most);
    let mut mem = Memory {
        idle_kib,
        levels: Vec::new(),
        after_release_kib: 0,
        after_idle_kib: 0,
        open_errors: 0,
        first_error: None,
        note: None,
    };
    let deadline = Instant::now() + max_time;
    for &wanted in levels {
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(held.len()));
        let mut openers = JoinSet::new();
        for _ in 0..OPENERS {
            let next = next.clone();
            let clients = clients.clone();
            openers.spawn(async move {
                let mut opened = Vec::new();
                let mut errors = (0u64, None::<String>);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= wanted || Instant::now() > deadline {
                        break;
                    }
                    let mut client = load::pb_client(clients[i / PER_CONNECTION].clone());
                    match load::open_held(&mut client, "slow", "hold").await {
                        Ok(s) => opened.push(s),
                        Err(e) => {
                            errors.0 += 1;
                            errors.1.get_or_insert(e);
                        }
                    }
                }
                (opened, errors)
            });
        }
        while let Some(joined) = openers.join_next().await {
            let (opened, (errors, first)) = joined?;
            held.extend(opened);
            mem.open_errors += errors;
            if mem.first_error.is_none() {
                mem.first_error = first;
            }
        }
        let open_time_s = started.elapsed().as_secs_f64();
        // The upstream holding every stream is the sign the gateway has
        // forwarded each first token and now only waits.
        wait_until(Duration::from_secs(5), || stats.held.load(Ordering::Relaxed) as usize >= held.len())
            .await;
        // Let allocations settle (lazy frees, timers) before reading RSS.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let usage = gateway.usage()?;
        mem.levels.push(MemoryLevel {
            wanted,
            opened: held.len(),
            rss_kib: usage.rss_kib,
            threads: usage.threads,
            open_time_s,
        });
    }
    drop(held);
    let closed = wait_until(Duration::from_secs(30), || stats.held.load(Ordering::Relaxed) == 0).await;
    if !closed {
        mem.note = Some(format!(
            "{} upstream streams still open 30 s after the callers dropped theirs",
            stats.held.load(Ordering::Relaxed)
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    mem.after_release_kib = gateway.usage()?.rss_kib;
    // An allocator that purges on a clock (jemalloc's decay, 10 s by
    // default) gives its pages back only later: the same reading, idle.
    tokio::time::sleep(AFTER_IDLE).await;
    mem.after_idle_kib = gateway.usage()?.rss_kib;
    Ok(mem)
}

/// `n` cancels, one at a time: open a stream on the silent upstream, take its
/// first message, drop it, and time until the upstream sees the close.
pub async fn cancellation(
    gateway_addr: SocketAddr,
    stats: &Stats,
    n: usize,
) -> Result<Cancellation, BoxError> {
    const SEEN_WITHIN: Duration = Duration::from_secs(1);
    let mut client = load::pb_client(load::connect(gateway_addr).await?);
    let mut c = Cancellation { samples_us: Vec::with_capacity(n), missed: 0, errors: 0, first_error: None };
    for i in 0..n as u64 {
        let closed = stats.watch_close(i);
        let stream = match load::open_held(&mut client, "slow", &format!("bench:{i}")).await {
            Ok(s) => s,
            Err(e) => {
                c.errors += 1;
                c.first_error.get_or_insert(e);
                continue;
            }
        };
        let cancelled = Instant::now();
        drop(stream);
        match tokio::time::timeout(SEEN_WITHIN, closed).await {
            Ok(Ok(at)) => c.samples_us.push(at.saturating_duration_since(cancelled).as_micros() as u64),
            _ => c.missed += 1,
        }
    }
    c.samples_us.sort_unstable();
    Ok(c)
}

/// Polls `done` every millisecond until it holds or `limit` passes.
async fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// RSS of the gateway after its load, once idle.
pub async fn idle_after_load(gateway: &Gateway) -> Result<u64, BoxError> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(gateway.usage()?.rss_kib)
}

/// One side of the comparison with TensorZero: a gateway process (none for
/// the upstream itself) and the same load's targets through it.
pub struct Contender {
    pub name: &'static str,
    pub pid: Option<u32>,
    /// The `fast` model (a token a write, no delay) and the `paced` one
    /// (10 ms between tokens), as this side names them.
    pub fast: Arc<Target>,
    pub paced: Arc<Target>,
}

/// How much of each workload of [`versus`].
pub struct VersusPlan {
    pub concurrency: usize,
    pub throughput_time: Duration,
    pub c1_calls: u64,
    pub paced_calls: u64,
    pub max_time: Duration,
}

/// Issue #17: the same three workloads on every contender, one after the
/// other within each workload (so that a disturbance of the machine lands
/// on neighbouring figures alike), each after an unmeasured warm-up:
/// saturation on `fast` at `plan.concurrency` (closed loop, bounded by
/// time), `fast` one call at a time, and `paced` at `plan.concurrency`.
pub async fn versus(contenders: &[Contender], plan: &VersusPlan) -> Result<Vec<VersusRow>, BoxError> {
    let c = plan.concurrency;
    let warm_time = (plan.throughput_time / 3).min(Duration::from_secs(1));
    let mut rows = Vec::new();
    let workloads: [(&'static str, usize, u64, Duration, bool); 3] = [
        ("fast, closed loop", c, u64::MAX, plan.throughput_time, false),
        ("fast", 1, plan.c1_calls, plan.max_time, false),
        ("paced (10 ms/token)", c, plan.paced_calls, plan.max_time, true),
    ];
    for (workload, concurrency, calls, time, paced) in workloads {
        let mut runs = Vec::new();
        for k in contenders {
            eprintln!("gateway bench: beside TensorZero: {workload}, c={concurrency}, {} …", k.name);
            let target = if paced { k.paced.clone() } else { k.fast.clone() };
            let warmup =
                if calls == u64::MAX { u64::MAX } else { (2 * concurrency as u64).max(200).min(calls) };
            load::run(target.clone(), concurrency, warmup, warm_time.max(Duration::from_millis(100))).await;
            let before = CpuTicks::of(k.pid)?;
            let run = load::run(target, concurrency, calls, time).await;
            let cpu = CpuTicks::of(k.pid)?.since(before);
            runs.push(VersusRun { name: k.name, run, cpu });
        }
        rows.push(VersusRow { workload, concurrency, runs });
    }
    Ok(rows)
}
