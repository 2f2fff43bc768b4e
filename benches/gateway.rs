//! The gateway's benchmark (issue #6): starts a fake OpenAI/Anthropic upstream
//! on loopback, the `llm-gateway` binary pointing at it, and a tonic load
//! client (and, for the OpenAI-compatible HTTP front door, a reqwest one),
//! then measures side by side, in one run: added time to first token,
//! the same at fixed arrival rates below saturation (open loop),
//! saturation throughput and CPU per delta, RSS per open stream,
//! cancel-to-upstream-close, start-up time, the cost of tracing (issue
//! #4: the same calls with the span exporter off, on, and pointed at a
//! collector that refuses connections), and a soak with faults (issue #16:
//! half the saturation rate with cancels, deadlines, upstream 500s, resets
//! and hangs, then a storm of cancels, each followed by idle checks). It prints a table, writes
//! JSON to `target/bench-results/`, and never judges: budgets are shown, not
//! asserted.
//!
//! ```text
//! cargo bench --bench gateway                 # full run, release build
//! cargo bench --bench gateway -- --quick      # a few seconds: does it still work?
//! cargo bench --bench gateway -- --perf       # also `perf record` the gateway
//! cargo bench --bench gateway -- --only soak  # the soak alone, about two minutes
//! cargo bench --bench gateway -- --only tensorzero   # beside TensorZero's gateway
//! ```
//!
//! Options: `--tokens N` (tokens per answer, 20), `--concurrency N` (calls in
//! flight in the throughput runs, 64, as in the issue's comparison),
//! `--baseline BIN` (the throughput rows again against another build, e.g.
//! `git worktree add ../base <commit> && cargo build --release` there, then
//! both builds in turns: read the change from the turns), `--only
//! startup,latency,openloop,throughput,memory,cancel,tracing,admission,soak,tensorzero`
//! (some parts only). The `tensorzero` part (issue #17) runs TensorZero's
//! gateway beside ours under the same load (`support::tensorzero`); under
//! `cargo bench` it installs the `tensorzero` package into a venv under
//! `~/.cache` when missing, never as a test.
//! `BENCH_QUICK=1` is `--quick`; `BENCH_GATEWAY_LOG=FILE` keeps the gateways'
//! output and `BENCH_GATEWAY_RUST_LOG=FILTER` sets their log filter.
//!
//! Run without `--bench` (as `cargo test --benches` does), it takes the quick
//! path, so a test run only checks that it works.

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use support::{
    BoxError,
    collector::{self, Collector},
    load::{Target, Wire},
    phases::{self, Contender, Front},
    process::{self, Gateway},
    report::{self, Meta, Report},
    tensorzero::{self, TensorZero},
    upstream,
    versus::{DIRECT, OURS_GRPC, OURS_HTTP, TENSORZERO, Versus},
};

/// The gateway binary, built with the bench's own profile.
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_llm-gateway");

/// The parts of a run, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Startup,
    Latency,
    OpenLoop,
    Throughput,
    Memory,
    Cancel,
    Tracing,
    Admission,
    Soak,
    TensorZero,
}

impl Phase {
    fn parse(name: &str) -> Result<Self, BoxError> {
        Ok(match name {
            "startup" => Phase::Startup,
            "latency" => Phase::Latency,
            "openloop" => Phase::OpenLoop,
            "throughput" => Phase::Throughput,
            "memory" => Phase::Memory,
            "cancel" => Phase::Cancel,
            "tracing" => Phase::Tracing,
            "admission" => Phase::Admission,
            "soak" => Phase::Soak,
            "tensorzero" => Phase::TensorZero,
            _ => {
                return Err(format!(
                    "--only: unknown part {name:?} (startup, latency, openloop, throughput, memory, cancel, tracing, admission, soak, tensorzero)"
                )
                .into());
            }
        })
    }
}

struct Options {
    /// Empty: every part.
    only: Vec<Phase>,
    quick: bool,
    /// Run by `cargo bench` (not as a test): may install TensorZero.
    under_bench: bool,
    perf: bool,
    tokens: usize,
    /// Calls in flight in the throughput runs.
    throughput_concurrency: usize,
    /// `--baseline BIN`: another build of the gateway (an older commit's),
    /// measured in the same run on the throughput rows, for a same-run
    /// before/after.
    baseline: Option<PathBuf>,
}

impl Options {
    fn parse() -> Result<Self, BoxError> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo bench` passes --bench; without it we run as a test would.
        let under_bench = args.iter().any(|a| a == "--bench");
        let env_quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
        let mut tokens = 20;
        let mut throughput_concurrency = 64;
        let mut only = Vec::new();
        let mut baseline = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--tokens" => tokens = it.next().ok_or("--tokens needs a number")?.parse()?,
                "--only" => {
                    for name in it.next().ok_or("--only needs a list")?.split(',') {
                        only.push(Phase::parse(name.trim())?);
                    }
                }
                "--baseline" => baseline = Some(PathBuf::from(it.next().ok_or("--baseline needs a path")?)),
                "--concurrency" => {
                    throughput_concurrency = it.next().ok_or("--concurrency needs a number")?.parse()?;
                }
                _ => {}
            }
        }
        if tokens == 0 {
            return Err("--tokens must be at least 1".into());
        }
        Ok(Self {
            only,
            quick: !under_bench || env_quick || args.iter().any(|a| a == "--quick"),
            under_bench,
            perf: args.iter().any(|a| a == "--perf"),
            tokens,
            throughput_concurrency: throughput_concurrency.max(1),
            baseline,
        })
    }

    fn runs(&self, phase: Phase) -> bool {
        self.only.is_empty() || self.only.contains(&phase)
    }
}

/// How much of everything: full runs for figures, quick runs to check.
struct Plan {
    startups: usize,
    /// Concurrency and calls of each time-to-first-token row (OpenAI).
    latency: Vec<(usize, u64)>,
    anthropic: (usize, u64),
    /// Arrival rates (calls/s) of the open-loop runs, and how long each
    /// schedule lasts (straight to the upstream, then via the gateway).
    openloop_rates: Vec<f64>,
    openloop_time: Duration,
    throughput_time: Duration,
    /// Longest any one run may take, whatever its count.
    run_limit: Duration,
    memory_levels: Vec<usize>,
    cancels: usize,
    /// Time-to-first-token calls (c=1) and saturation time of each tracing
    /// variant.
    tracing_calls: u64,
    tracing_time: Duration,
    soak: support::soak::SoakPlan,
    /// Beside TensorZero: calls at c=1, and calls of the paced run.
    versus_c1_calls: u64,
    versus_paced_calls: u64,
    /// The whole bench stops after this, measured or not.
    total_limit: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                startups: 2,
                latency: vec![(1, 100), (64, 640), (1024, 1024)],
                anthropic: (64, 320),
                openloop_rates: vec![200.0],
                openloop_time: Duration::from_secs(1),
                throughput_time: Duration::from_millis(300),
                run_limit: Duration::from_secs(10),
                memory_levels: vec![100, 1000],
                cancels: 50,
                tracing_calls: 200,
                tracing_time: Duration::from_secs(1),
                soak: support::soak::SoakPlan {
                    saturation_time: Duration::from_millis(600),
                    concurrency: 64,
                    soak_time: Duration::from_secs(2),
                    max_in_flight: 256,
                    storm: 100,
                    settle: Duration::from_secs(10),
                },

                versus_c1_calls: 100,
                versus_paced_calls: 128,
                // Room for the TensorZero part (about 20 s more in quick mode).
                total_limit: Duration::from_secs(240),
            }
        } else {
            Plan {
                startups: 10,
                latency: vec![(1, 5_000), (64, 20_000), (1024, 20_480)],
                anthropic: (64, 10_000),
                // Fractions of the ~7,000 calls/s this gateway forwards at
                // saturation on the 2-core machine (docs/performance.md).
                openloop_rates: vec![500.0, 1_000.0, 2_000.0, 3_000.0],
                openloop_time: Duration::from_secs(5),
                throughput_time: Duration::from_secs(10),
                run_limit: Duration::from_secs(60),
                memory_levels: vec![1_000, 10_000],
                cancels: 1_000,
                tracing_calls: 3_000,
                tracing_time: Duration::from_secs(5),
                // About two minutes in all.
                soak: support::soak::SoakPlan {
                    saturation_time: Duration::from_secs(3),
                    concurrency: 64,
                    soak_time: Duration::from_secs(90),
                    max_in_flight: 1024,
                    storm: 1_000,
                    settle: Duration::from_secs(10),
                },
                versus_c1_calls: 5_000,
                // 50 rounds of 64 calls of ~200 ms each: about 10 s a side.
                versus_paced_calls: 3_200,
                total_limit: Duration::from_secs(900),
            }
        }
    }
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<(), BoxError> {
    let options = Options::parse()?;
    let plan = Plan::new(options.quick);
    let fd_limit = process::raise_fd_limit();
    let out_dir = results_dir();
    std::fs::create_dir_all(&out_dir)?;
    // The upstream gets threads of its own so that its work never queues
    // behind the load client's; all of it shares the cores with the gateway,
    // as in the issue's comparison.
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(support::UPSTREAM_THREADS)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(support::CLIENT_THREADS)
        .enable_all()
        .build()?;
    // The OTLP collector of the tracing part, on a thread of its own so that
    // its CPU shows apart.
    let collector_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(support::COLLECTOR_THREADS)
        .enable_all()
        .build()?;
    let upstream = upstream_rt.block_on(upstream::start(options.tokens))?;
    let collector = if options.runs(Phase::Tracing) || options.runs(Phase::Admission) {
        Some(collector_rt.block_on(Collector::start())?)
    } else {
        None
    };
    let meta = meta(&options, fd_limit);
    eprintln!(
        "gateway bench: {} mode, {} build, upstream on {}, fd limit {fd_limit}",
        if options.quick { "quick" } else { "full" },
        meta.profile,
        upstream.addr
    );
    let result = client_rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(
                plan.total_limit,
                run(&options, &plan, &upstream, collector.as_ref(), meta, &out_dir),
            ) => {
                r.unwrap_or_else(|_| Err(format!("stopped after {:?}", plan.total_limit).into()))
            }
            _ = interrupted() => Err("interrupted".into()),
        }
    });
    // Dropping the run (above) killed every gateway; now the upstream.
    drop(upstream);
    drop(collector);
    client_rt.shutdown_timeout(Duration::from_secs(2));
    collector_rt.shutdown_timeout(Duration::from_secs(2));
    upstream_rt.shutdown_timeout(Duration::from_secs(2));
    let report = result?;
    print!("{}", report.table());
    let name = match (options.quick, options.only.is_empty()) {
        (true, _) => "gateway-quick.json",
        (false, false) => "gateway-partial.json",
        (false, true) => "gateway.json",
    };
    let path = out_dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(&report.json())?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

async fn run(
    options: &Options,
    plan: &Plan,
    upstream: &upstream::Upstream,
    collector: Option<&Collector>,
    meta: Meta,
    out_dir: &Path,
) -> Result<Report, BoxError> {
    let bin = Path::new(GATEWAY_BIN);
    let config = process::config_yaml(upstream.addr);
    let fd_limit = meta.fd_limit;
    let mut report = Report {
        meta,
        startup: None,
        latency: Vec::new(),
        openloop: Vec::new(),
        throughput: Vec::new(),
        turns: Vec::new(),
        burst: None,
        idle_after_load_kib: None,
        memory: None,
        cancellation: None,
        tracing: Vec::new(),
        soak: None,
        versus: None,
    };

    if options.runs(Phase::Startup) {
        progress("start-up");
        report.startup = Some(phases::startup(bin, &config, plan.startups).await?);
    }

    if [Phase::Latency, Phase::OpenLoop, Phase::Throughput].into_iter().any(|p| options.runs(p)) {
        let mut gateway = Gateway::spawn(bin, &config).await?;
        let openai = Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "fast")?);
        // Its config names only what every build since the spine
        // understands; each gateway idles while the other is measured.
        let base = match &options.baseline {
            Some(bin) => Some(Gateway::spawn(bin, &process::baseline_config_yaml(upstream.addr)).await?),
            None => None,
        };
        if options.runs(Phase::Latency) {
            for &(concurrency, calls) in &plan.latency {
                progress(&format!("time to first token, c={concurrency}"));
                let label = "openai, per-token";
                let run = phases::pair(
                    label,
                    &gateway,
                    Front::Grpc,
                    openai.clone(),
                    "fast",
                    concurrency,
                    calls,
                    plan.run_limit,
                );
                report.latency.push(run.await?);
            }
            for &(concurrency, calls) in plan.latency.iter().filter(|_| base.is_some()) {
                let Some(base) = &base else { break };
                progress(&format!("time to first token, baseline, c={concurrency}"));
                let label = "openai, per-token, baseline";
                let run = phases::pair(
                    label,
                    base,
                    Front::Grpc,
                    openai.clone(),
                    "fast",
                    concurrency,
                    calls,
                    plan.run_limit,
                );
                report.latency.push(run.await?);
            }
            // The same calls through the OpenAI-compatible HTTP front door
            // (one HTTP/1.1 connection per call in flight, as OpenAI SDKs
            // pool them), at the budget's concurrencies.
            for &(concurrency, calls) in plan.latency.iter().filter(|(c, _)| *c <= 64) {
                progress(&format!("time to first token, HTTP front door, c={concurrency}"));
                let label = "openai, per-token, HTTP";
                let run = phases::pair(
                    label,
                    &gateway,
                    Front::Http,
                    openai.clone(),
                    "fast",
                    concurrency,
                    calls,
                    plan.run_limit,
                );
                report.latency.push(run.await?);
            }
            // The mock provider has no network: the gateway's own cost for
            // one stream. Its "direct" column is the OpenAI stub's, as a
            // reference, not the same request.
            if let Some(&(1, calls)) = plan.latency.first() {
                progress("time to first token, mock provider, c=1");
                let label = "mock (direct: openai)";
                let run = phases::pair(
                    label,
                    &gateway,
                    Front::Grpc,
                    openai.clone(),
                    "mock",
                    1,
                    calls,
                    plan.run_limit,
                );
                report.latency.push(run.await?);
            }
            // Issue #11: the first target down hard, its circuit closed (every
            // call pays a failed try) and open (skipped). Compare the open
            // rows' added time with the healthy single-target row above.
            if let Some(&(1, calls)) = plan.latency.first() {
                for (label, model) in [
                    ("first target refused, circuit closed", "down-refused"),
                    ("first target refused, circuit open", "down-refused-open"),
                    ("first target 503, circuit closed", "down-503"),
                    ("first target 503, circuit open", "down-503-open"),
                ] {
                    progress(&format!("time to first token, {label}, c=1"));
                    let run = phases::pair(
                        label,
                        &gateway,
                        Front::Grpc,
                        openai.clone(),
                        model,
                        1,
                        calls,
                        plan.run_limit,
                    );
                    report.latency.push(run.await?);
                }
            }
            let (concurrency, calls) = plan.anthropic;
            progress(&format!("time to first token, anthropic, c={concurrency}"));
            let direct = Arc::new(Target::direct(upstream.addr, Wire::Anthropic, "fast")?);
            let label = "anthropic, per-token";
            let run = phases::pair(
                label,
                &gateway,
                Front::Grpc,
                direct,
                "an-fast",
                concurrency,
                calls,
                plan.run_limit,
            );
            report.latency.push(run.await?);
        }
        if options.runs(Phase::OpenLoop) {
            for &rate in &plan.openloop_rates {
                progress(&format!(
                    "time to first token, open loop, {rate:.0} calls/s for {:?} each way",
                    plan.openloop_time
                ));
                let run = phases::open_loop(
                    &gateway,
                    openai.clone(),
                    "fast",
                    rate,
                    plan.openloop_time,
                    plan.run_limit,
                );
                report.openloop.push(run.await?);
            }
        }
        if options.runs(Phase::Throughput) {
            let c = options.throughput_concurrency;
            let time = plan.throughput_time;
            progress(&format!("throughput, per-token writes, c={c}"));
            let perf_out = out_dir.join("gateway-perf.data");
            let perf = options.perf.then_some(perf_out.as_path());
            let run = phases::throughput(
                "openai, per-token",
                &gateway,
                Front::Grpc,
                openai.clone(),
                "fast",
                c,
                time,
                perf,
            );
            report.throughput.push(run.await?);
            progress(&format!("throughput, HTTP front door, per-token writes, c={c}"));
            let label = "openai, per-token, HTTP";
            let run = phases::throughput(label, &gateway, Front::Http, openai.clone(), "fast", c, time, None);
            report.throughput.push(run.await?);
            progress(&format!("throughput, one write per answer, c={c}"));
            let burst = Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "burst")?);
            // Per-call costs weigh most here: recorded apart.
            let perf_out = out_dir.join("gateway-perf-burst.data");
            let perf = options.perf.then_some(perf_out.as_path());
            let run =
                phases::throughput("openai, burst", &gateway, Front::Grpc, burst, "burst", c, time, perf);
            report.throughput.push(run.await?);
            if let Some(base) = &base {
                progress(&format!("throughput, baseline, per-token writes, c={c}"));
                let run = phases::throughput(
                    "openai, per-token, baseline",
                    base,
                    Front::Grpc,
                    openai.clone(),
                    "fast",
                    c,
                    time,
                    None,
                );
                report.throughput.push(run.await?);
                progress(&format!("throughput, baseline, one write per answer, c={c}"));
                let burst = Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "burst")?);
                let label = "openai, burst, baseline";
                let run = phases::throughput(label, base, Front::Grpc, burst, "burst", c, time, None);
                report.throughput.push(run.await?);
                for (label, model) in [("openai, per-token", "fast"), ("openai, burst", "burst")] {
                    progress(&format!("throughput, {label}, this build and the baseline in turns, c={c}"));
                    report.turns.push(phases::turns(label, &gateway, None, base, model, c, time).await?);
                }
            }
            progress("1,024 calls at once on one connection");
            report.burst = Some((1024, phases::burst(&gateway, 1024, plan.run_limit).await?));
        }
        if !gateway.alive() {
            return Err(format!("the gateway died under load:\n{}", gateway.tail()).into());
        }
        report.idle_after_load_kib = Some(phases::idle_after_load(&gateway).await?);
        eprintln!("gateway bench: the load gateway logged {} lines", gateway.log_lines());
        // Frees the descriptors of the load runs (this gateway's pool and
        // the direct client's) before thousands of streams are held.
    }

    if options.runs(Phase::Memory) || options.runs(Phase::Cancel) {
        // A fresh gateway, so that its idle RSS is a start's and not a load's.
        let gateway = Gateway::spawn(bin, &config).await?;
        if options.runs(Phase::Memory) {
            // Each open stream costs a descriptor here (the upstream's side)
            // and one in the gateway; keep a margin for everything else.
            let room = (fd_limit as usize).saturating_sub(512);
            let mut note = None;
            let mut levels = plan.memory_levels.clone();
            for l in &mut levels {
                if *l > room {
                    note = Some(format!("{l} streams wanted, capped at {room} by the descriptor limit"));
                    *l = room;
                }
            }
            progress(&format!("memory, {levels:?} streams"));
            let mut memory = phases::memory(&gateway, &upstream.stats, &levels, plan.run_limit * 2).await?;
            if memory.note.is_none() {
                memory.note = note;
            }
            report.memory = Some(memory);
        }
        if options.runs(Phase::Cancel) {
            progress(&format!("cancellation, {} cancels", plan.cancels));
            report.cancellation =
                Some(phases::cancellation(gateway.grpc_addr, &upstream.stats, plan.cancels).await?);
        }
    }
    if options.runs(Phase::Soak) {
        // A fresh gateway: what it holds at the end is the soak's doing.
        let gateway = Gateway::spawn(bin, &config).await?;
        let s = &plan.soak;
        progress(&format!(
            "soak: saturation, then half of it for {:?} with faults; then {} cancels at once",
            s.soak_time, s.storm
        ));
        report.soak = Some(support::soak::run(&gateway, &upstream.stats, s).await?);
    }
    if options.runs(Phase::Tracing)
        && let Some(collector) = collector
    {
        report.tracing = tracing_cost(options, plan, &config, collector).await?;
    }
    if options.runs(Phase::Admission)
        && let Some(collector) = collector
    {
        report.tracing.extend(admission_cost(options, plan, upstream, &config, collector).await?);
    }
    if options.runs(Phase::TensorZero) {
        report.versus = Some(beside_tensorzero(options, plan, upstream, &config).await?);
    }
    let stats = &upstream.stats;
    eprintln!(
        "gateway bench: done; upstream: {} requests, {} connections, {} completed, {} aborted",
        stats.requests.load(Ordering::Relaxed),
        stats.connections.load(Ordering::Relaxed),
        stats.completed.load(Ordering::Relaxed),
        stats.aborted.load(Ordering::Relaxed),
    );
    Ok(report)
}

/// Issue #4: the same workload against three gateways started one after the
/// other: no exporter (the default), an exporter to the bench's collector,
/// and an exporter to a port where nothing listens.
async fn tracing_cost(
    options: &Options,
    plan: &Plan,
    config: &str,
    collector: &Collector,
) -> Result<Vec<report::TracingVariant>, BoxError> {
    // Exports every 200 ms instead of the default 5 s, so that the
    // exporter's work falls inside the measured runs.
    const SCHEDULE_DELAY: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "200");
    let bin = Path::new(GATEWAY_BIN);
    let dead = collector::dead_endpoint()?;
    let exporting_to = |addr: std::net::SocketAddr| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            (SCHEDULE_DELAY.0, SCHEDULE_DELAY.1.to_owned()),
        ]
    };
    let variants = [
        ("off", Vec::new(), None),
        ("on", exporting_to(collector.addr), Some(&*collector.stats)),
        ("collector down", exporting_to(dead), None),
    ];
    let mut out = Vec::new();
    for (label, env, stats) in variants {
        progress(&format!(
            "tracing cost, exporter {label}: {} calls at c=1, {:?} at c={}",
            plan.tracing_calls, plan.tracing_time, options.throughput_concurrency
        ));
        let run = phases::TracingRun {
            label,
            env,
            collector: stats,
            calls: plan.tracing_calls,
            concurrency: options.throughput_concurrency,
            duration: plan.tracing_time,
            max_time: plan.run_limit,
            key: None,
            perf: None,
            plain: None,
            direct: None,
        };
        let mut variant = phases::tracing_variant(bin, config, run).await?;
        if label == "collector down" && !collector::still_refused(dead) {
            variant.note = Some(format!("something took {dead} during the run: the collector was not down"));
        }
        out.push(variant);
    }
    Ok(out)
}

/// Issue #12: the same workload with no limits, then with what #12 item 10
/// and #17 item 3 name (a client key with limits, one target's limits,
/// prices) kept locally, then the same on a Redis on loopback
/// (`failure_mode: closed`, so any Redis trouble shows as errors), then on
/// Redis with every limit there is (the provider's own limits too, and a
/// budget on the key), then the Redis limits with the OTLP exporter on too
/// (#17 item 3: every feature). The limits sit far above the load: only
/// admission's cost is measured, never a refusal.
async fn admission_cost(
    options: &Options,
    plan: &Plan,
    upstream: &upstream::Upstream,
    config: &str,
    collector: &Collector,
) -> Result<Vec<report::TracingVariant>, BoxError> {
    const KEY: &str = "bench-key";
    const LIMITS: &str = "{rpm: 100000000, tpm: 100000000000, concurrency: 100000}";
    let bin = Path::new(GATEWAY_BIN);
    let redis = support::redis::Redis::start().await?;
    let digest = support::sha256_hex(KEY);
    let limited = |shared: bool, all: bool| {
        let provider = if all { format!("limits: {LIMITS}, ") } else { String::new() };
        let mut c = config.replace(
            "up: {kind: openai, base_url:",
            &format!("up: {{{provider}model_limits: {{fast: {LIMITS}}}, kind: openai, base_url:"),
        );
        let budget = if all { ", budget: {usd: 1000000, tokens: 100000000000000, window: 30d}" } else { "" };
        c.push_str(&format!(
            "api_keys: [{{name: bench, key_sha256: \"{digest}\", limits: {LIMITS}{budget}}}]\n\
             prices: [{{provider: up, model: fast, input: 0.15, output: 0.60, cached_input: 0.075}}]\n"
        ));
        if shared {
            c.push_str(&format!(
                "redis: {{url: \"redis://127.0.0.1:{}/0\", key_prefix: bench, failure_mode: closed}}\n",
                redis.port
            ));
        }
        c
    };
    // #17 item 3, every feature on: the Redis limits and prices, and the
    // OTLP exporter sending to the bench's collector (the log line per call
    // is on in every row).
    let exporting = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", collector.addr)),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
    ];
    let variants = [
        ("no limits", config.to_owned(), None, Vec::new(), None),
        ("limits, local", limited(false, false), Some(KEY), Vec::new(), None),
        ("limits, Redis", limited(true, false), Some(KEY), Vec::new(), None),
        ("all, Redis", limited(true, true), Some(KEY), Vec::new(), None),
        ("Redis + OTLP", limited(true, false), Some(KEY), exporting.clone(), Some(&*collector.stats)),
        // The first row again: this VM's speed drifts within a run (the
        // first row has read up to 30 % faster than the second with nothing
        // between them but time), and the repeat shows by how much.
        ("no limits, again", config.to_owned(), None, Vec::new(), None),
    ];
    // `--baseline BIN`: the every-feature row again on the other build,
    // for a same-run before/after of a change to the exporter's path.
    let baseline = options.baseline.as_deref().map(|b| {
        (
            "Redis + OTLP, baseline",
            limited(true, false),
            Some(KEY),
            exporting.clone(),
            Some(&*collector.stats),
            b,
        )
    });
    let variants = variants
        .into_iter()
        .map(|(label, config, key, env, stats)| (label, config, key, env, stats, bin))
        .chain(baseline);
    let perf_all = results_dir().join("gateway-perf-all.data");
    // The plain gateway each limited row takes turns with (see
    // `phases::Turns`); the ratios #12 item 10 and #17 item 3 name are
    // read from those turns.
    let plain = Gateway::spawn(bin, config).await?;
    let mut out = Vec::new();
    for (label, config, key, env, stats, bin) in variants {
        progress(&format!(
            "admission cost, {label}: {} calls at c=1, {:?} at c={}",
            plan.tracing_calls, plan.tracing_time, options.throughput_concurrency
        ));
        let run = phases::TracingRun {
            label,
            env,
            collector: stats,
            calls: plan.tracing_calls,
            concurrency: options.throughput_concurrency,
            duration: plan.tracing_time,
            max_time: plan.run_limit,
            key,
            // `--perf`: the every-feature row (#17 item 3) is the one whose
            // cost is still to be found.
            perf: (options.perf && label == "Redis + OTLP").then_some(perf_all.as_path()),
            // The no-limit rows too: plain against plain, the method's own
            // control (it should read about 100 %).
            plain: Some(&plain),
            // The same c=1 calls straight to the upstream, in turns with
            // the gateway's: what the gateway adds is read against them
            // (#12 item 10, #17 item 3).
            direct: Some(Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "fast")?)),
        };
        out.push(phases::tracing_variant(bin, &config, run).await?);
    }
    Ok(out)
}

/// Issue #17: our gateway (gRPC and its HTTP front door) and TensorZero's,
/// both fresh, under the same load (see [`phases::versus`]). If TensorZero
/// cannot start or answer, the reason is reported and ours still measured.
async fn beside_tensorzero(
    options: &Options,
    plan: &Plan,
    upstream: &upstream::Upstream,
    config: &str,
) -> Result<Versus, BoxError> {
    progress("beside TensorZero: starting both gateways");
    let mut gateway = Gateway::spawn(Path::new(GATEWAY_BIN), config).await?;
    let tensorzero = TensorZero::spawn(upstream.addr, options.under_bench).await;
    // Let both settle before reading their idle RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut versus = Versus {
        tensorzero_version: String::new(),
        tensorzero_error: None,
        idle_rss_kib: vec![(OURS_GRPC, gateway.usage()?.rss_kib), (OURS_HTTP, gateway.usage()?.rss_kib)],
        after_rss_kib: Vec::new(),
        tensorzero_python_kib: None,
        rows: Vec::new(),
        tokens: options.tokens,
    };
    let c = options.throughput_concurrency;
    let connections = c.div_ceil(support::load::STREAMS_PER_CONNECTION);
    let http = gateway.http_addr.ok_or("the gateway logged no http_addr (http_listen unset?)")?;
    let mut contenders = vec![
        Contender {
            name: DIRECT,
            pid: None,
            fast: Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "fast")?),
            paced: Arc::new(Target::direct(upstream.addr, Wire::OpenAi, "paced")?),
        },
        Contender {
            name: OURS_GRPC,
            pid: Some(gateway.pid),
            fast: Arc::new(Target::gateway(gateway.grpc_addr, connections, "fast").await?),
            paced: Arc::new(Target::gateway(gateway.grpc_addr, connections, "paced").await?),
        },
        Contender {
            name: OURS_HTTP,
            pid: Some(gateway.pid),
            fast: Arc::new(Target::gateway_http(http, "fast")?),
            paced: Arc::new(Target::gateway_http(http, "paced")?),
        },
    ];
    let tensorzero = match tensorzero {
        Ok(tz) => {
            versus.tensorzero_version = tz.version.clone();
            versus.tensorzero_python_kib = Some(tz.rss_before_start_kib);
            versus.idle_rss_kib.push((TENSORZERO, tz.usage()?.rss_kib));
            let fast = Arc::new(Target::openai_at(&tz.base_url, tensorzero::MODEL)?);
            // One call first, so that a gateway that starts but cannot
            // stream is reported as such rather than as a column of errors.
            let probe = support::load::run(fast.clone(), 1, 1, Duration::from_secs(10)).await;
            if probe.calls == 1 {
                contenders.push(Contender {
                    name: TENSORZERO,
                    pid: Some(tz.pid),
                    fast,
                    paced: Arc::new(Target::openai_at(&tz.base_url, tensorzero::MODEL_PACED)?),
                });
                Some(tz)
            } else {
                versus.tensorzero_error = Some(format!(
                    "its first call failed: {}
{}",
                    probe.first_error.unwrap_or_default(),
                    tz.tail()
                ));
                None
            }
        }
        Err(e) => {
            versus.tensorzero_error = Some(e.to_string());
            None
        }
    };
    if let Some(e) = &versus.tensorzero_error {
        eprintln!("gateway bench: TensorZero is left out: {e}");
    }
    let versus_plan = phases::VersusPlan {
        concurrency: c,
        throughput_time: plan.throughput_time,
        c1_calls: plan.versus_c1_calls,
        paced_calls: plan.versus_paced_calls,
        max_time: plan.run_limit,
    };
    versus.rows = phases::versus(&contenders, &versus_plan).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gateway.usage()?.rss_kib;
    versus.after_rss_kib = vec![(OURS_GRPC, after), (OURS_HTTP, after)];
    if !gateway.alive() {
        return Err(format!("the gateway died under load:\n{}", gateway.tail()).into());
    }
    if let Some(mut tz) = tensorzero {
        if tz.alive() {
            versus.after_rss_kib.push((TENSORZERO, tz.usage()?.rss_kib));
        } else {
            versus.tensorzero_error = Some(format!("TensorZero's host died during the runs:\n{}", tz.tail()));
        }
    }
    Ok(versus)
}

fn progress(what: &str) {
    eprintln!("gateway bench: {what} …");
}

/// Ctrl-C or SIGTERM: the run is dropped, and with it every gateway.
async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// `target/bench-results`, next to the profile directory that holds the
/// gateway binary (so CARGO_TARGET_DIR is honoured), never the source tree.
fn results_dir() -> PathBuf {
    let bin = Path::new(GATEWAY_BIN);
    bin.parent().and_then(Path::parent).unwrap_or(Path::new("target")).join("bench-results")
}

fn meta(options: &Options, fd_limit: u64) -> Meta {
    let output = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    Meta {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu_model,
        kernel: output("uname", &["-r"]),
        rustc: output("rustc", &["-V"]),
        crate_version: env!("CARGO_PKG_VERSION"),
        git_commit: {
            let commit = output("git", &["rev-parse", "--short", "HEAD"]);
            // Uncommitted changes to what the gateway is built from: the
            // figures are not the commit's.
            let status = ["status", "--porcelain", "--untracked-files=no", "--", "src", "proto", "build.rs"];
            let dirty = !output("git", &[&status[..], &["Cargo.toml", "Cargo.lock"]].concat()).is_empty();
            if dirty { format!("{commit}+dirty") } else { commit }
        },
        profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        quick: options.quick,
        tokens: options.tokens,
        fd_limit,
        command: if args.is_empty() {
            "cargo bench --bench gateway".into()
        } else {
            format!("cargo bench --bench gateway -- {}", args.join(" "))
        },
    }
}
