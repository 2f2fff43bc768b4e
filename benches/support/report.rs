//! What a bench run measured, printed as a table and written as JSON, with
//! the budgets of issue #6 beside the figures. It reports; it never fails a
//! run for a missed budget.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::load::{OpenLoopRun, RunResult, percentile};

/// Budgets of issue #6, item 2.
pub const BUDGET_ADDED_TTFT_P99_US: u64 = 1_000;
pub const BUDGET_CALLS_PER_S: f64 = 5_000.0;
pub const BUDGET_DELTAS_PER_S: f64 = 100_000.0;
/// 20 MB, read as 20 × 10^6 bytes.
pub const BUDGET_IDLE_RSS_KIB: f64 = 20e6 / 1024.0;
pub const BUDGET_KIB_PER_STREAM: f64 = 32.0;
pub const BUDGET_CANCEL_P99_US: u64 = 10_000;
pub const BUDGET_STARTUP_US: u64 = 100_000;

/// CPU of other processes during a run above which its figures are flagged.
const DISTURBED_CORES: f64 = 0.1;

/// The machine and the build.
pub struct Meta {
    pub date: String,
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub rustc: String,
    pub crate_version: &'static str,
    pub git_commit: String,
    pub profile: &'static str,
    pub quick: bool,
    pub tokens: usize,
    pub fd_limit: u64,
    pub command: String,
}

/// The same calls straight to the upstream and through the gateway.
pub struct Pair {
    pub label: String,
    pub concurrency: usize,
    pub direct: RunResult,
    pub gateway: RunResult,
    /// CPU during the gateway run.
    pub cpu: Cpu,
}

/// CPU seconds (user + system) spent during a run.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub gateway_s: f64,
    /// The bench's load-client threads.
    pub client_s: f64,
    /// The bench's fake-upstream threads.
    pub upstream_s: f64,
    /// The bench's OTLP collector threads (tracing runs only).
    pub collector_s: f64,
    /// Everything else on the machine: a quiet machine shows about 0.
    pub other_s: f64,
}

impl Pair {
    fn added(&self, p: f64) -> Option<i64> {
        Some(percentile(&self.gateway.ttft_us, p)? as i64 - percentile(&self.direct.ttft_us, p)? as i64)
    }

    fn cpu_s_per_1k_deltas(&self) -> Option<f64> {
        (self.gateway.deltas > 0).then(|| self.cpu.gateway_s / (self.gateway.deltas as f64 / 1000.0))
    }
}

/// The same open-loop schedule straight to the upstream and through the
/// gateway.
pub struct OpenLoop {
    /// Arrivals per second.
    pub rate: f64,
    /// Calls in flight at most.
    pub limit: usize,
    pub direct: OpenLoopRun,
    pub gateway: OpenLoopRun,
    /// CPU during the gateway run.
    pub cpu: Cpu,
}

impl OpenLoop {
    fn added(&self, p: f64) -> Option<i64> {
        Some(
            percentile(&self.gateway.run.ttft_us, p)? as i64
                - percentile(&self.direct.run.ttft_us, p)? as i64,
        )
    }

    fn cores(&self, seconds: f64) -> f64 {
        seconds / self.gateway.run.elapsed.as_secs_f64().max(1e-9)
    }
}

pub struct MemoryLevel {
    pub wanted: usize,
    pub opened: usize,
    pub rss_kib: u64,
    pub threads: u64,
    pub open_time_s: f64,
}

pub struct Memory {
    pub idle_kib: u64,
    pub levels: Vec<MemoryLevel>,
    pub after_release_kib: u64,
    /// 15 s later, idle.
    pub after_idle_kib: u64,
    pub open_errors: u64,
    pub first_error: Option<String>,
    pub note: Option<String>,
}

impl Memory {
    fn kib_per_stream(&self, level: &MemoryLevel) -> Option<f64> {
        (level.opened > 0).then(|| (level.rss_kib as f64 - self.idle_kib as f64) / level.opened as f64)
    }
}

pub struct Cancellation {
    /// Caller's drop to the upstream's close, µs, sorted.
    pub samples_us: Vec<u64>,
    /// Cancels whose close the upstream did not see in time.
    pub missed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

pub struct Startup {
    /// Spawn to the "serving" log line, µs, sorted.
    pub to_log_us: Vec<u64>,
    /// Spawn to health SERVING, µs, sorted.
    pub to_serving_us: Vec<u64>,
    pub idle_rss_kib: Vec<u64>,
}

/// One gateway of the tracing-cost runs: the same workload with the span
/// exporter off, on (to the bench's collector), or pointed at a dead port.
pub struct TracingVariant {
    pub label: &'static str,
    /// The `OTEL_*` variables the gateway was started with.
    pub env: Vec<(&'static str, String)>,
    /// Time to first token, one call at a time.
    pub ttft: RunResult,
    /// Saturation, `concurrency` calls in flight for a fixed time.
    pub throughput: RunResult,
    pub concurrency: usize,
    /// CPU during the saturation run.
    pub cpu: Cpu,
    /// Calls this gateway served, warm-ups included (each makes spans).
    pub calls_total: u64,
    /// Spans and export requests the collector received from this gateway.
    pub spans_received: Option<u64>,
    pub export_requests: Option<u64>,
    /// `llm_gateway_dropped_spans_total` at the end.
    pub dropped_spans: Option<f64>,
    /// Redis round trips the gateway made (`llm_gateway_redis_round_trip_seconds_count`).
    pub redis_trips: Option<f64>,
    /// Their time, summed (`llm_gateway_redis_round_trip_seconds_sum`).
    pub redis_seconds: Option<f64>,
    /// Calls admitted by a reservation made ahead (`llm_gateway_admission_admitted_ahead_total`).
    pub admitted_ahead: Option<f64>,
    /// The same c=1 calls straight to the upstream (admission rows).
    pub direct_ttft: Option<RunResult>,
    /// Saturation slices taken in turn with a plain gateway (admission rows).
    pub paired: Option<super::phases::Turns>,
    pub note: Option<String>,
}

impl TracingVariant {
    fn cpu_s_per_1k_deltas(&self) -> Option<f64> {
        (self.throughput.deltas > 0).then(|| self.cpu.gateway_s / (self.throughput.deltas as f64 / 1000.0))
    }

    fn other_cores(&self) -> f64 {
        self.cpu.other_s / self.throughput.elapsed.as_secs_f64().max(1e-9)
    }
}

pub struct Report {
    pub meta: Meta,
    pub startup: Option<Startup>,
    pub latency: Vec<Pair>,
    /// Open-loop time to first token, one entry per arrival rate.
    pub openloop: Vec<OpenLoop>,
    pub throughput: Vec<Pair>,
    /// `--baseline`: the throughput rows again, both builds in turns.
    pub turns: Vec<super::phases::Turns>,
    /// Calls started at once on one connection, and what came of them.
    pub burst: Option<(usize, RunResult)>,
    pub idle_after_load_kib: Option<u64>,
    pub memory: Option<Memory>,
    pub cancellation: Option<Cancellation>,
    /// Exporter off / on / collector down, in that order.
    pub tracing: Vec<TracingVariant>,
    pub soak: Option<super::soak::Soak>,
    /// Beside TensorZero's gateway (issue #17).
    pub versus: Option<super::versus::Versus>,
}

fn ms(us: Option<u64>) -> String {
    us.map(|v| format!("{:.3}", v as f64 / 1000.0)).unwrap_or_else(|| "-".into())
}

fn ms_signed(us: Option<i64>) -> String {
    us.map(|v| format!("{:+.3}", v as f64 / 1000.0)).unwrap_or_else(|| "-".into())
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "-",
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn triple(sorted: &[u64]) -> String {
    format!(
        "{} / {} / {}",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(percentile(sorted, 0.999))
    )
}

fn errors(r: &RunResult) -> String {
    match (&r.first_error, r.errors) {
        (_, 0) => String::new(),
        (Some(e), n) => format!("  [{n} errors; first: {e}]"),
        (None, n) => format!("  [{n} errors]"),
    }
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let m = &self.meta;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nllm-gateway {} ({}) bench — {} — {} cores ({}), {}, {} profile{}, {} tokens/answer",
            m.crate_version,
            m.git_commit,
            m.date,
            m.cores,
            m.cpu_model,
            m.rustc,
            m.profile,
            if m.quick { ", QUICK mode (a smoke check, figures not representative)" } else { "" },
            m.tokens
        );
        if m.profile != "release" {
            let _ = writeln!(out, "  (not a release build: the figures say nothing about performance)");
        }
        let busiest = self
            .latency
            .iter()
            .chain(&self.throughput)
            .map(|p| (p.cpu.other_s / p.gateway.elapsed.as_secs_f64().max(1e-9), p))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((cores, p)) = busiest
            && cores > DISTURBED_CORES
        {
            let _ = writeln!(
                out,
                "  WARNING: other processes used up to {cores:.2} cores during the runs (most in \"{}\", c={}): \
                 the figures are disturbed; rerun on a quiet machine",
                p.label, p.concurrency
            );
        }

        let _ = writeln!(
            out,
            "\nAdded time to first token (ms; p50 / p99 / p99.9; direct = the same request straight to the upstream)"
        );
        let _ = writeln!(
            out,
            "  {:<24} {:>5} {:>7}  {:<25} {:<25} {:<27} budget added p99 < 1 ms",
            "upstream", "conc", "calls", "direct", "via gateway", "added"
        );
        for p in &self.latency {
            let added = format!(
                "{} / {} / {}",
                ms_signed(p.added(0.5)),
                ms_signed(p.added(0.99)),
                ms_signed(p.added(0.999))
            );
            let judged = p.concurrency <= 64 && p.label.starts_with("openai");
            let ok = judged.then(|| p.added(0.99).map(|v| v < BUDGET_ADDED_TTFT_P99_US as i64)).flatten();
            let _ = writeln!(
                out,
                "  {:<24} {:>5} {:>7}  {:<25} {:<25} {:<27} {}{}{}",
                p.label,
                p.concurrency,
                p.gateway.calls,
                triple(&p.direct.ttft_us),
                triple(&p.gateway.ttft_us),
                added,
                if judged { mark(ok) } else { "" },
                errors(&p.direct),
                errors(&p.gateway)
            );
        }

        if !self.openloop.is_empty() {
            self.openloop_table(&mut out);
        }

        let _ = writeln!(out, "\nThroughput at saturation (closed loop)");
        let _ = writeln!(
            out,
            "  {:<24} {:>5}  {:>10} {:>10}  {:>10} {:>10}  {:>12}  {:<23}  budget ≥ 5,000 c/s, ≥ 100,000 d/s",
            "upstream",
            "conc",
            "direct c/s",
            "direct d/s",
            "gw calls/s",
            "gw d/s",
            "gw CPU s/1kd",
            "cores gw/cli/up/other"
        );
        for p in &self.throughput {
            let secs = p.gateway.elapsed.as_secs_f64().max(1e-9);
            let ok = p.gateway.calls_per_s() >= BUDGET_CALLS_PER_S
                && p.gateway.deltas_per_s() >= BUDGET_DELTAS_PER_S;
            let _ = writeln!(
                out,
                "  {:<24} {:>5}  {:>10.0} {:>10.0}  {:>10.0} {:>10.0}  {:>12}  {:<23}  {}{}{}",
                p.label,
                p.concurrency,
                p.direct.calls_per_s(),
                p.direct.deltas_per_s(),
                p.gateway.calls_per_s(),
                p.gateway.deltas_per_s(),
                p.cpu_s_per_1k_deltas().map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into()),
                format!(
                    "{:.2}/{:.2}/{:.2}/{:.2}",
                    p.cpu.gateway_s / secs,
                    p.cpu.client_s / secs,
                    p.cpu.upstream_s / secs,
                    p.cpu.other_s / secs
                ),
                mark(Some(ok)),
                errors(&p.direct),
                errors(&p.gateway)
            );
        }
        let _ = writeln!(
            out,
            "  (d/s = content deltas per second; gw CPU s/1kd = gateway CPU seconds per 1,000 deltas forwarded;\n   \
             cores = CPU used during the gateway run by the gateway, the load client, the fake upstream\n   \
             and every other process on the machine, which should be about 0)"
        );
        if let Some(t) = self.turns.first() {
            let _ = writeln!(
                out,
                "\nThis build and the baseline in turns (c={c}; {} slices of {:.1} s: this build, baseline, baseline, \
                 this build, twice)",
                t.slices,
                t.slice.as_secs_f64(),
                c = self.throughput.first().map(|p| p.concurrency).unwrap_or(0),
            );
        }
        for t in &self.turns {
            let errors = t.main.errors + t.base.errors;
            let _ = writeln!(
                out,
                "  {:<24} gw CPU µs/delta {:.2} vs {:.2} baseline ({:+.1} %); calls/s {:.0} vs {:.0}{}",
                t.label,
                t.main.us_per_delta(),
                t.base.us_per_delta(),
                (t.main.us_per_delta() / t.base.us_per_delta().max(1e-9) - 1.0) * 100.0,
                t.main.calls_per_s(),
                t.base.calls_per_s(),
                if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
            );
        }
        if let Some((n, b)) = &self.burst {
            let _ = writeln!(
                out,
                "\nBurst: {n} calls at once on one HTTP/2 connection: {} ok, {} failed{}",
                b.calls,
                b.errors,
                b.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
            );
        }

        let _ =
            writeln!(out, "\nSoak (faults, cancels and deadlines at half saturation; then a cancel storm)");
        match &self.soak {
            Some(soak) => out.push_str(&soak.table()),
            None => {
                let _ = writeln!(out, "  (not run)");
            }
        }

        let _ = writeln!(out, "\nMemory (gateway RSS; streams held open by a silent upstream)");
        if let Some(mem) = &self.memory {
            let idle_ok = (mem.idle_kib as f64) < BUDGET_IDLE_RSS_KIB;
            let _ = writeln!(
                out,
                "  {:<28} {:>10}   budget < 20 MB {}",
                "idle (fresh start)",
                mib(mem.idle_kib),
                mark(Some(idle_ok))
            );
            for level in &mem.levels {
                let per = mem.kib_per_stream(level);
                let judged = level.wanted >= 10_000;
                let ok = per.map(|v| v <= BUDGET_KIB_PER_STREAM);
                let _ = writeln!(
                    out,
                    "  {:<28} {:>10}   {:>6.1} KiB/stream, {} threads, opened in {:.1} s{}",
                    format!("{} open streams", level.opened),
                    mib(level.rss_kib),
                    per.unwrap_or(f64::NAN),
                    level.threads,
                    level.open_time_s,
                    if judged { format!("   budget ≤ 32 KiB/stream {}", mark(ok)) } else { String::new() }
                );
            }
            let _ = writeln!(out, "  {:<28} {:>10}", "after the streams closed", mib(mem.after_release_kib));
            let _ = writeln!(out, "  {:<28} {:>10}", "15 s later, idle", mib(mem.after_idle_kib));
            if let Some(note) = &mem.note {
                let _ = writeln!(out, "  note: {note}");
            }
            if mem.open_errors > 0 {
                let _ = writeln!(
                    out,
                    "  {} streams failed to open; first: {}",
                    mem.open_errors,
                    mem.first_error.as_deref().unwrap_or("")
                );
            }
        } else {
            let _ = writeln!(out, "  (not run)");
        }
        if let Some(after) = self.idle_after_load_kib {
            let _ = writeln!(
                out,
                "  {:<28} {:>10}   (the gateway of the latency and throughput runs)",
                "idle, after the load runs",
                mib(after)
            );
        }

        let _ = writeln!(
            out,
            "\nCancellation (caller drops the stream → the upstream sees its connection close)"
        );
        if let Some(c) = &self.cancellation {
            let p99 = percentile(&c.samples_us, 0.99);
            let _ = writeln!(
                out,
                "  {} cancels: p50 {} ms, p99 {} ms, max {} ms; {} not seen within 1 s{}   budget p99 < 10 ms {}",
                c.samples_us.len(),
                ms(percentile(&c.samples_us, 0.5)),
                ms(p99),
                ms(c.samples_us.last().copied()),
                c.missed,
                if c.errors > 0 {
                    format!(
                        "; {} failed to open (first: {})",
                        c.errors,
                        c.first_error.as_deref().unwrap_or("")
                    )
                } else {
                    String::new()
                },
                mark(p99.map(|v| v < BUDGET_CANCEL_P99_US && c.missed == 0))
            );
        } else {
            let _ = writeln!(out, "  (not run)");
        }

        if !self.tracing.is_empty() {
            self.tracing_table(&mut out);
        }

        if let Some(v) = &self.versus {
            v.table(&mut out);
        }

        if let Some(s) = &self.startup {
            let p50 = percentile(&s.to_serving_us, 0.5);
            let _ = writeln!(
                out,
                "\nStart-up ({} starts): spawn → \"serving\" log p50 {} ms; spawn → health SERVING p50 {} ms, max {} ms   budget < 100 ms {}",
                s.to_serving_us.len(),
                ms(percentile(&s.to_log_us, 0.5)),
                ms(p50),
                ms(s.to_serving_us.last().copied()),
                mark(p50.map(|v| v < BUDGET_STARTUP_US))
            );
        }
        out
    }

    /// The open-loop section of the table.
    fn openloop_table(&self, out: &mut String) {
        let limit = self.openloop.first().map(|o| o.limit).unwrap_or(0);
        let _ = writeln!(
            out,
            "\nAdded time to first token, open loop (arrival rate; at most {limit} in flight)\n\
             (ms; p50 / p99 / p99.9; Poisson arrivals, the same schedule straight to the upstream and via the gateway)"
        );
        let worst =
            self.openloop.iter().map(|o| (o.cores(o.cpu.other_s), o.rate)).max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((cores, rate)) = worst
            && cores > DISTURBED_CORES
        {
            let _ = writeln!(
                out,
                "  WARNING: other processes used up to {cores:.2} cores during the runs (most at {rate:.0}/s): \
                 the figures are disturbed; rerun on a quiet machine"
            );
        }
        let _ = writeln!(
            out,
            "  {:>6} {:>5} {:>7} {:>11} {:>9} {:>9}  {:<25} {:<25} {:<27} {:>12}  budget added p99 < 1 ms",
            "rate/s",
            "secs",
            "calls",
            "achieved/s",
            "max infl",
            "queued",
            "direct",
            "via gateway",
            "added",
            "cores gw/oth"
        );
        for o in &self.openloop {
            let (d, g) = (&o.direct, &o.gateway);
            let added = format!(
                "{} / {} / {}",
                ms_signed(o.added(0.5)),
                ms_signed(o.added(0.99)),
                ms_signed(o.added(0.999))
            );
            let ok = o.added(0.99).map(|v| v < BUDGET_ADDED_TTFT_P99_US as i64);
            let _ = writeln!(
                out,
                "  {:>6.0} {:>5.1} {:>7} {:>11} {:>9} {:>9}  {:<25} {:<25} {:<27} {:>12}  {}{}{}",
                o.rate,
                g.schedule.as_secs_f64(),
                g.run.calls,
                format!("{:.0}/{:.0}", d.achieved_per_s(), g.achieved_per_s()),
                format!("{}/{}", d.max_in_flight, g.max_in_flight),
                format!("{}/{}", d.queued, g.queued),
                triple(&d.run.ttft_us),
                triple(&g.run.ttft_us),
                added,
                format!("{:.2}/{:.2}", o.cores(o.cpu.gateway_s), o.cores(o.cpu.other_s)),
                mark(ok),
                errors(&d.run),
                errors(&g.run)
            );
        }
        let _ = writeln!(
            out,
            "  (achieved/s, max infl and queued: direct/gateway; queued = arrivals that found {limit} calls in flight\n   \
             and waited in the client; TTFT is timed from each call's start; cores = the gateway's CPU and other\n   \
             processes' during the gateway run)"
        );
    }

    /// The tracing-cost section of the table.
    fn tracing_table(&self, out: &mut String) {
        let c = self.tracing.first().map(|v| v.concurrency).unwrap_or(0);
        let _ = writeln!(
            out,
            "\nFeature cost: tracing (exporter off / on / collector down) and admission (no limits /\n\
             key and target limits and prices, local / on Redis; all: provider limits and a budget too);\n\
             a fresh gateway per row; OpenAI per-token; TTFT through the\n\
             gateway at c=1, saturation at c={c}"
        );
        let worst =
            self.tracing.iter().map(|v| (v.other_cores(), v.label)).max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((cores, label)) = worst
            && cores > DISTURBED_CORES
        {
            let _ = writeln!(
                out,
                "  WARNING: other processes used up to {cores:.2} cores during the saturation runs (most in \
                 \"{label}\"): the figures are disturbed; rerun on a quiet machine"
            );
        }
        let _ = writeln!(
            out,
            "  {:<15} {:>6}  {:<25} {:>9} {:>9}  {:>12}  {:<25} {:>7} {:>10} {:>8}",
            "variant",
            "calls",
            "TTFT p50/p99/p99.9 ms",
            "calls/s",
            "deltas/s",
            "gw CPU s/1kd",
            "cores gw/cli/up/coll/oth",
            "served",
            "spans recv",
            "dropped"
        );
        for v in &self.tracing {
            let secs = v.throughput.elapsed.as_secs_f64().max(1e-9);
            let _ = writeln!(
                out,
                "  {:<15} {:>6}  {:<25} {:>9.0} {:>9.0}  {:>12}  {:<25} {:>7} {:>10} {:>8}{}{}",
                v.label,
                v.ttft.calls,
                triple(&v.ttft.ttft_us),
                v.throughput.calls_per_s(),
                v.throughput.deltas_per_s(),
                v.cpu_s_per_1k_deltas().map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
                format!(
                    "{:.2}/{:.2}/{:.2}/{:.2}/{:.2}",
                    v.cpu.gateway_s / secs,
                    v.cpu.client_s / secs,
                    v.cpu.upstream_s / secs,
                    v.cpu.collector_s / secs,
                    v.cpu.other_s / secs
                ),
                v.calls_total,
                v.spans_received.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                v.dropped_spans.map(|n| format!("{n:.0}")).unwrap_or_else(|| "-".into()),
                errors(&v.ttft),
                errors(&v.throughput)
            );
        }
        if let Some(off) = self.tracing.first() {
            for v in self.tracing.iter().skip(1) {
                let ttft = |r: &RunResult, p| percentile(&r.ttft_us, p).map(|x| x as i64);
                let diff = |p| Some(ttft(&v.ttft, p)? - ttft(&off.ttft, p)?);
                let rel = |a: f64, b: f64| {
                    if b > 0.0 { format!("{:+.1} %", (a / b - 1.0) * 100.0) } else { "-".into() }
                };
                let _ = writeln!(
                    out,
                    "  {} vs {}: TTFT p50 {} ms, p99 {} ms; deltas/s {}; gateway CPU per delta {}",
                    v.label,
                    off.label,
                    ms_signed(diff(0.5)),
                    ms_signed(diff(0.99)),
                    rel(v.throughput.deltas_per_s(), off.throughput.deltas_per_s()),
                    match (v.cpu_s_per_1k_deltas(), off.cpu_s_per_1k_deltas()) {
                        (Some(a), Some(b)) => rel(a, b),
                        _ => "-".into(),
                    }
                );
            }
        }
        for v in &self.tracing {
            if let Some(p) = &v.paired {
                let errors = p.main.errors + p.base.errors;
                let _ = writeln!(
                    out,
                    "  {} in turns with a plain gateway ({} slices of {:.1} s, row/plain/plain/row): \
                     {:.0} vs {:.0} calls/s = {:.1} %{}",
                    v.label,
                    p.slices,
                    p.slice.as_secs_f64(),
                    p.main.calls_per_s(),
                    p.base.calls_per_s(),
                    p.ratio() * 100.0,
                    if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
                );
            }
        }
        for v in &self.tracing {
            let env = if v.env.is_empty() {
                "no OTEL_* variable".to_owned()
            } else {
                v.env.iter().map(|(k, val)| format!("{k}={val}")).collect::<Vec<_>>().join(" ")
            };
            let _ = writeln!(out, "  {}: {env}", v.label);
            if let Some(direct) = &v.direct_ttft {
                let added = |p| {
                    let via = percentile(&v.ttft.ttft_us, p)? as i64;
                    Some(via - percentile(&direct.ttft_us, p)? as i64)
                };
                let _ = writeln!(
                    out,
                    "    added TTFT at c=1 (via the gateway minus straight to the upstream, calls in turns): p50 {} ms, p99 {} ms (direct {})",
                    ms_signed(added(0.5)),
                    ms_signed(added(0.99)),
                    triple(&direct.ttft_us)
                );
            }
            if let Some(trips) = v.redis_trips.filter(|&n| n > 0.0) {
                let per_call = trips / (v.calls_total.max(1) as f64);
                let mean_us = v.redis_seconds.unwrap_or(0.0) / trips * 1e6;
                let _ = writeln!(
                    out,
                    "    Redis round trips: {trips:.0} for {} calls served, {per_call:.2} per call, {mean_us:.0} µs each on average; {:.0} calls admitted ahead",
                    v.calls_total,
                    v.admitted_ahead.unwrap_or(0.0)
                );
            }
            if let Some(note) = &v.note {
                let _ = writeln!(out, "    note: {note}");
            }
        }
        let _ = writeln!(
            out,
            "  (served = calls the gateway served, warm-ups included; spans recv = spans the bench's collector\n   \
             received; dropped = llm_gateway_dropped_spans_total on /metrics at the end; coll = the collector)"
        );
    }

    /// The machine-readable record.
    pub fn json(&self) -> Value {
        let m = &self.meta;
        let dist = |v: &[u64]| {
            json!({
                "n": v.len(),
                "p50_us": percentile(v, 0.5),
                "p99_us": percentile(v, 0.99),
                "p999_us": percentile(v, 0.999),
                "max_us": v.last(),
            })
        };
        let run = |r: &RunResult| {
            json!({
                "calls": r.calls,
                "deltas": r.deltas,
                "errors": r.errors,
                "first_error": r.first_error,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "calls_per_s": r.calls_per_s(),
                "deltas_per_s": r.deltas_per_s(),
                "ttft": dist(&r.ttft_us),
                "total": dist(&r.total_us),
            })
        };
        let pair = |p: &Pair| {
            json!({
                "label": p.label,
                "concurrency": p.concurrency,
                "direct": run(&p.direct),
                "gateway": run(&p.gateway),
                "added_ttft_us": {"p50": p.added(0.5), "p99": p.added(0.99), "p999": p.added(0.999)},
                "cpu_s": {
                    "gateway": p.cpu.gateway_s,
                    "client": p.cpu.client_s,
                    "upstream": p.cpu.upstream_s,
                    "other_processes": p.cpu.other_s,
                },
                "gateway_cpu_s_per_1k_deltas": p.cpu_s_per_1k_deltas(),
            })
        };
        let open_run = |r: &OpenLoopRun| {
            json!({
                "started": r.started,
                "schedule_s": r.schedule.as_secs_f64(),
                "achieved_per_s": r.achieved_per_s(),
                "queued_in_client": r.queued,
                "max_in_flight": r.max_in_flight,
                "start_lag": dist(&r.lag_us),
                "calls": run(&r.run),
            })
        };
        let openloop = |o: &OpenLoop| {
            json!({
                "rate_per_s": o.rate,
                "arrivals": "poisson",
                "max_in_flight_limit": o.limit,
                "direct": open_run(&o.direct),
                "gateway": open_run(&o.gateway),
                "added_ttft_us": {"p50": o.added(0.5), "p99": o.added(0.99), "p999": o.added(0.999)},
                "cpu_s": {
                    "gateway": o.cpu.gateway_s,
                    "client": o.cpu.client_s,
                    "upstream": o.cpu.upstream_s,
                    "other_processes": o.cpu.other_s,
                },
                "gateway_cores": o.cores(o.cpu.gateway_s),
            })
        };
        let tracing = |v: &TracingVariant| {
            json!({
                "variant": v.label,
                "env": v.env.iter().map(|(k, val)| (k.to_string(), json!(val))).collect::<serde_json::Map<_, _>>(),
                "ttft_c1": run(&v.ttft),
                "throughput": run(&v.throughput),
                "concurrency": v.concurrency,
                "cpu_s": {
                    "gateway": v.cpu.gateway_s,
                    "client": v.cpu.client_s,
                    "upstream": v.cpu.upstream_s,
                    "collector": v.cpu.collector_s,
                    "other_processes": v.cpu.other_s,
                },
                "gateway_cpu_s_per_1k_deltas": v.cpu_s_per_1k_deltas(),
                "calls_served": v.calls_total,
                "spans_received": v.spans_received,
                "export_requests": v.export_requests,
                "dropped_spans": v.dropped_spans,
                "redis_round_trips": v.redis_trips,
                "redis_round_trip_seconds": v.redis_seconds,
                "admitted_ahead": v.admitted_ahead,
                "direct_ttft_us": v.direct_ttft.as_ref().map(|d| [percentile(&d.ttft_us, 0.5), percentile(&d.ttft_us, 0.99)]),
                "in_turns_with_plain": v.paired.as_ref().map(|p| json!({
                    "slices": p.slices,
                    "slice_s": p.slice.as_secs_f64(),
                    "calls": p.main.calls,
                    "seconds": p.main.secs,
                    "plain_calls": p.base.calls,
                    "plain_seconds": p.base.secs,
                    "errors": p.main.errors + p.base.errors,
                    "ratio": p.ratio(),
                })),
                "note": v.note,
            })
        };
        json!({
            "meta": {
                "date": m.date,
                "cores": m.cores,
                "cpu_model": m.cpu_model,
                "kernel": m.kernel,
                "rustc": m.rustc,
                "crate_version": m.crate_version,
                "git_commit": m.git_commit,
                "profile": m.profile,
                "quick": m.quick,
                "tokens_per_answer": m.tokens,
                "fd_limit": m.fd_limit,
                "command": m.command,
            },
            "startup": self.startup.as_ref().map(|s| json!({
                "to_log": dist(&s.to_log_us),
                "to_serving": dist(&s.to_serving_us),
                "idle_rss_kib": s.idle_rss_kib,
            })),
            "latency": self.latency.iter().map(pair).collect::<Vec<_>>(),
            "openloop": self.openloop.iter().map(openloop).collect::<Vec<_>>(),
            "throughput": self.throughput.iter().map(pair).collect::<Vec<_>>(),
            "throughput_in_turns_with_baseline": self.turns.iter().map(|t| {
                let side = |s: &super::phases::Side| json!({
                    "calls": s.calls,
                    "deltas": s.deltas,
                    "seconds": s.secs,
                    "gateway_cpu_s": s.cpu_s,
                    "gateway_cpu_us_per_delta": s.us_per_delta(),
                    "errors": s.errors,
                });
                json!({
                    "label": t.label,
                    "slices": t.slices,
                    "slice_s": t.slice.as_secs_f64(),
                    "this_build": side(&t.main),
                    "baseline": side(&t.base),
                })
            }).collect::<Vec<_>>(),
            "burst_one_connection": self.burst.as_ref().map(|(n, b)| json!({
                "calls": n,
                "ok": b.calls,
                "failed": b.errors,
                "first_error": b.first_error,
                "ttft": dist(&b.ttft_us),
            })),
            "idle_after_load_rss_kib": self.idle_after_load_kib,
            "memory": self.memory.as_ref().map(|mem| json!({
                "idle_rss_kib": mem.idle_kib,
                "levels": mem.levels.iter().map(|l| json!({
                    "wanted": l.wanted,
                    "opened": l.opened,
                    "rss_kib": l.rss_kib,
                    "kib_per_stream": mem.kib_per_stream(l),
                    "threads": l.threads,
                    "open_time_s": l.open_time_s,
                })).collect::<Vec<_>>(),
                "after_release_rss_kib": mem.after_release_kib,
                "after_idle_rss_kib": mem.after_idle_kib,
                "open_errors": mem.open_errors,
                "first_error": mem.first_error,
                "note": mem.note,
            })),
            "cancellation": self.cancellation.as_ref().map(|c| json!({
                "cancel_to_close": dist(&c.samples_us),
                "missed": c.missed,
                "errors": c.errors,
                "first_error": c.first_error,
            })),
            "soak": self.soak.as_ref().map(super::soak::Soak::json),
            "tracing": (!self.tracing.is_empty()).then(|| json!({
                "variants": self.tracing.iter().map(tracing).collect::<Vec<_>>(),
            })),
            "versus_tensorzero": self.versus.as_ref().map(|v| v.json(&run)),
            "budgets": {
                "added_ttft_p99_us": BUDGET_ADDED_TTFT_P99_US,
                "calls_per_s": BUDGET_CALLS_PER_S,
                "deltas_per_s": BUDGET_DELTAS_PER_S,
                "idle_rss_kib": BUDGET_IDLE_RSS_KIB,
                "kib_per_stream": BUDGET_KIB_PER_STREAM,
                "cancel_p99_us": BUDGET_CANCEL_P99_US,
                "startup_us": BUDGET_STARTUP_US,
            },
        })
    }
}
