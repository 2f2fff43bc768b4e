//! The comparison with TensorZero's gateway (issue #17) as the report shows
//! it: one column per contender (the upstream itself, ours over gRPC, ours
//! over its HTTP front door, TensorZero), the ratios ours/TensorZero, and
//! the budgets beside them. It reports; it never judges a run.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{
    load::{RunResult, percentile},
    report::Cpu,
};

/// Column names, as [`super::phases::Contender::name`] gives them.
pub const DIRECT: &str = "direct";
pub const OURS_GRPC: &str = "ours gRPC";
pub const OURS_HTTP: &str = "ours HTTP";
pub const TENSORZERO: &str = "TensorZero";

/// Budgets of issue #17, item 2.
pub const BUDGET_CALLS_RATIO: f64 = 3.0;
pub const BUDGET_ADDED_P99_C1_US: f64 = 500.0;
pub const BUDGET_ADDED_P99_PACED_US: f64 = 1_000.0;
pub const BUDGET_IDLE_RSS_KIB: f64 = 20e6 / 1024.0;

/// Other processes' CPU above which the section is flagged.
const DISTURBED_CORES: f64 = 0.1;

/// One contender's run of one workload.
pub struct VersusRun {
    pub name: &'static str,
    pub run: RunResult,
    /// During the run; `gateway_s` is this contender's process.
    pub cpu: Cpu,
}

/// One workload on every contender; `runs[0]` is straight to the upstream.
pub struct VersusRow {
    pub workload: &'static str,
    pub concurrency: usize,
    pub runs: Vec<VersusRun>,
}

impl VersusRow {
    fn get(&self, name: &str) -> Option<&VersusRun> {
        self.runs.iter().find(|r| r.name == name)
    }

    /// Added time to first token of `name` at quantile `p`, µs.
    fn added(&self, name: &str, p: f64) -> Option<f64> {
        let via = percentile(&self.get(name)?.run.ttft_us, p)?;
        let direct = percentile(&self.get(DIRECT)?.run.ttft_us, p)?;
        Some(via as f64 - direct as f64)
    }

    fn ttft(&self, name: &str, p: f64) -> Option<f64> {
        percentile(&self.get(name)?.run.ttft_us, p).map(|v| v as f64)
    }

    fn cpu_us_per_delta(&self, name: &str) -> Option<f64> {
        let r = self.get(name)?;
        (r.run.deltas > 0 && name != DIRECT).then(|| r.cpu.gateway_s * 1e6 / r.run.deltas as f64)
    }

    fn cores(&self, name: &str) -> Option<f64> {
        let r = self.get(name)?;
        (name != DIRECT).then(|| r.cpu.gateway_s / r.run.elapsed.as_secs_f64().max(1e-9))
    }
}

/// The whole comparison.
pub struct Versus {
    /// The `tensorzero` package's version; empty when it did not start.
    pub tensorzero_version: String,
    /// Why TensorZero is missing from the columns, if it is.
    pub tensorzero_error: Option<String>,
    /// RSS of each gateway, fresh, before any call; and after the runs.
    pub idle_rss_kib: Vec<(&'static str, u64)>,
    pub after_rss_kib: Vec<(&'static str, u64)>,
    /// TensorZero's host with the package imported, before its gateway
    /// started: the interpreter's share of its RSS.
    pub tensorzero_python_kib: Option<u64>,
    pub rows: Vec<VersusRow>,
    /// Tokens per answer.
    pub tokens: usize,
}

const COLUMNS: [&str; 4] = [DIRECT, OURS_GRPC, OURS_HTTP, TENSORZERO];

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}")).unwrap_or_else(|| "-".into())
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn mark(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "-",
    }
}

impl Versus {
    fn row(&self, workload: &str) -> Option<&VersusRow> {
        self.rows.iter().find(|r| r.workload == workload)
    }

    fn rss(list: &[(&'static str, u64)], name: &str) -> Option<f64> {
        list.iter().find(|(n, _)| *n == name).map(|(_, k)| *k as f64 / 1024.0)
    }

    /// The section of the table.
    pub fn table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nBeside TensorZero (tensorzero {}: its Rust gateway in a Python host; the same upstream, prompt,\n\
             {}-token answers and HTTP/1.1 SSE client as \"ours HTTP\"; added = via a gateway minus direct, ms)",
            if self.tensorzero_version.is_empty() { "?" } else { &self.tensorzero_version },
            self.tokens
        );
        if let Some(e) = &self.tensorzero_error {
            let _ = writeln!(out, "  TensorZero did not run: {e}");
        }
        let busiest = self
            .rows
            .iter()
            .flat_map(|r| r.runs.iter().map(move |x| (x, r)))
            .map(|(x, r)| (x.cpu.other_s / x.run.elapsed.as_secs_f64().max(1e-9), x.name, r.workload))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((cores, name, workload)) = busiest
            && cores > DISTURBED_CORES
        {
            let _ = writeln!(
                out,
                "  WARNING: other processes used up to {cores:.2} cores (most in \"{workload}\", {name}): \
                 the figures are disturbed; rerun on a quiet machine"
            );
        }
        let _ = writeln!(
            out,
            "  {:<38} {:>10} {:>10} {:>10} {:>10}  {:>8} {:>8}  budget",
            "", COLUMNS[0], COLUMNS[1], COLUMNS[2], COLUMNS[3], "gRPC/TZ", "HTTP/TZ"
        );
        let mut line = |label: String, values: [Option<f64>; 4], decimals: usize, budget: String| {
            let _ = writeln!(
                out,
                "  {:<38} {:>10} {:>10} {:>10} {:>10}  {:>8} {:>8}  {}",
                label,
                cell(values[0], decimals),
                cell(values[1], decimals),
                cell(values[2], decimals),
                cell(values[3], decimals),
                ratio(values[1], values[3]),
                ratio(values[2], values[3]),
                budget
            );
        };
        let each = |f: &dyn Fn(&str) -> Option<f64>| COLUMNS.map(f);
        if let Some(r) = self.row("fast, closed loop") {
            let c = r.concurrency;
            let calls = each(&|n| r.get(n).map(|x| x.run.calls_per_s()));
            let ratio_ok = match (calls[1], calls[3]) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b >= BUDGET_CALLS_RATIO),
                _ => None,
            };
            line(format!("calls/s, c={c}, closed loop"), calls, 0, format!("≥ 3× TZ {}", mark(ratio_ok)));
            line(
                format!("deltas/s, c={c}"),
                each(&|n| r.get(n).map(|x| x.run.deltas_per_s())),
                0,
                String::new(),
            );
            line(format!("gateway CPU µs/delta, c={c}"), each(&|n| r.cpu_us_per_delta(n)), 2, String::new());
            line(format!("gateway cores, c={c}"), each(&|n| r.cores(n)), 2, String::new());
        }
        for (workload, budget_us) in
            [("fast", BUDGET_ADDED_P99_C1_US), ("paced (10 ms/token)", BUDGET_ADDED_P99_PACED_US)]
        {
            let Some(r) = self.row(workload) else { continue };
            let c = r.concurrency;
            line(
                format!("{workload}, c={c}: TTFT p50"),
                each(&|n| r.ttft(n, 0.5).map(|v| v / 1e3)),
                3,
                String::new(),
            );
            line(
                format!("{workload}, c={c}: TTFT p99"),
                each(&|n| r.ttft(n, 0.99).map(|v| v / 1e3)),
                3,
                String::new(),
            );
            line(
                format!("{workload}, c={c}: added p50"),
                each(&|n| r.added(n, 0.5).map(|v| v / 1e3)),
                3,
                String::new(),
            );
            let p99 = each(&|n| r.added(n, 0.99).map(|v| v / 1e3));
            let ok = |v: Option<f64>| v.map(|v| v * 1e3 < budget_us);
            line(
                format!("{workload}, c={c}: added p99"),
                p99,
                3,
                format!("< {} ms: gRPC {} HTTP {}", budget_us / 1e3, mark(ok(p99[1])), mark(ok(p99[2]))),
            );
            if workload.starts_with("paced") {
                line(format!("gateway cores, {workload}, c={c}"), each(&|n| r.cores(n)), 3, String::new());
            }
        }
        let idle = |list: &[(&'static str, u64)]| {
            [None, Self::rss(list, OURS_GRPC), Self::rss(list, OURS_HTTP), Self::rss(list, TENSORZERO)]
        };
        let fresh = idle(&self.idle_rss_kib);
        let ok = fresh[1].map(|v| v * 1024.0 < BUDGET_IDLE_RSS_KIB);
        line("idle RSS MiB, fresh start".into(), fresh, 1, format!("< 20 MB {}", mark(ok)));
        line("idle RSS MiB, after these runs".into(), idle(&self.after_rss_kib), 1, String::new());
        if let Some(py) = self.tensorzero_python_kib {
            let _ = writeln!(
                out,
                "  (TensorZero's RSS includes its Python host: {:.1} MiB with tensorzero imported, before the gateway started;\n   \
                 ours gRPC and ours HTTP are one gateway process, so their CPU and RSS figures are the same process's)",
                py as f64 / 1024.0
            );
        }
        for r in &self.rows {
            for x in &r.runs {
                if x.run.errors > 0 {
                    let _ = writeln!(
                        out,
                        "  {} / {} c={}: {} errors; first: {}",
                        r.workload,
                        x.name,
                        r.concurrency,
                        x.run.errors,
                        x.run.first_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
    }

    /// The machine-readable record.
    pub fn json(&self, run: &dyn Fn(&RunResult) -> Value) -> Value {
        json!({
            "tensorzero_version": self.tensorzero_version,
            "tensorzero_error": self.tensorzero_error,
            "idle_rss_kib": self.idle_rss_kib.iter().map(|(n, k)| (n.to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
            "after_rss_kib": self.after_rss_kib.iter().map(|(n, k)| (n.to_string(), json!(k))).collect::<serde_json::Map<_, _>>(),
            "tensorzero_python_kib": self.tensorzero_python_kib,
            "rows": self.rows.iter().map(|r| json!({
                "workload": r.workload,
                "concurrency": r.concurrency,
                "runs": r.runs.iter().map(|x| json!({
                    "name": x.name,
                    "run": run(&x.run),
                    "added_ttft_us": {"p50": r.added(x.name, 0.5), "p99": r.added(x.name, 0.99)},
                    "cpu_s": {"gateway": x.cpu.gateway_s, "client": x.cpu.client_s, "upstream": x.cpu.upstream_s, "other_processes": x.cpu.other_s},
                    "gateway_cpu_us_per_delta": r.cpu_us_per_delta(x.name),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}
