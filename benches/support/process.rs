//! The gateway as a child process: its config and environment, its start
//! (timed to health SERVING), its CPU time and memory from /proc, a metric
//! from its admin `/metrics`, and its end. The guard kills
//! the child when dropped, so no exit path (error, Ctrl-C, panic) leaves a
//! gateway behind.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::BoxError;

/// Longest wait for the "serving" log line; a debug build on a busy machine
/// is slow to start.
const START_WAIT: Duration = Duration::from_secs(30);
/// Lines of the child's output kept to explain a failure.
const TAIL: usize = 20;
/// Variables of the bench's environment that would change what is measured;
/// every `OTEL_*` variable goes as well (exporter, sampler, batch settings).
const SCRUBBED_ENV: [&str; 8] = [
    "RUST_LOG",
    "LLM_GATEWAY_CONFIG",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The config every bench gateway runs: defaults everywhere, providers
/// pointing at the fake upstream.
pub fn config_yaml(upstream: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
http_listen: 127.0.0.1:0
telemetry: {{log_format: json, log_level: info}}
providers:
  up: {{kind: openai, base_url: \"http://{upstream}/v1\"}}
  an: {{kind: anthropic, base_url: \"http://{upstream}/v1\"}}
  mk: {{kind: mock}}
  dead: {{kind: openai, base_url: \"http://127.0.0.1:1/v1\", retry: {{attempts: 1}}, circuit_breaker: {{failures: 0}}}}
  dead-cb: {{kind: openai, base_url: \"http://127.0.0.1:1/v1\", retry: {{attempts: 1}}, circuit_breaker: {{failures: 1, open_for: 1h}}}}
  up503: {{kind: openai, base_url: \"http://{upstream}/v1\", retry: {{attempts: 1}}, circuit_breaker: {{failures: 0}}}}
  up503-cb: {{kind: openai, base_url: \"http://{upstream}/v1\", retry: {{attempts: 1}}, circuit_breaker: {{failures: 1, open_for: 1h}}}}
  faulty: {{kind: openai, base_url: \"http://{upstream}/v1\", retry: {{attempts: 1}}, circuit_breaker: {{failures: 0}}}}
models:
  fast: {{targets: [{{provider: up, model: fast}}]}}
  burst: {{targets: [{{provider: up, model: burst}}]}}
  slow: {{targets: [{{provider: up, model: slow}}]}}
  paced: {{targets: [{{provider: up, model: paced}}]}}
  an-fast: {{targets: [{{provider: an, model: fast}}]}}
  mock: {{targets: [{{provider: mk, model: \"lorem?tokens=20\"}}]}}
  down-refused: {{targets: [{{provider: dead, model: x}}, {{provider: up, model: fast}}]}}
  down-refused-open: {{targets: [{{provider: dead-cb, model: x}}, {{provider: up, model: fast}}]}}
  down-503: {{targets: [{{provider: up503, model: fail503}}, {{provider: up, model: fast}}]}}
  down-503-open: {{targets: [{{provider: up503-cb, model: fail503}}, {{provider: up, model: fast}}]}}
  soak-500: {{targets: [{{provider: faulty, model: fail500}}]}}
  soak-reset: {{targets: [{{provider: faulty, model: reset}}]}}
  soak-hang: {{targets: [{{provider: faulty, model: hang}}]}}
"
    )
}

/// The throughput models only, in keys every build since the spine reads:
/// for `--baseline`, an older build measured beside this one.
pub fn baseline_config_yaml(upstream: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
telemetry: {{log_format: json, log_level: info}}
providers:
  up: {{kind: openai, base_url: \"http://{upstream}/v1\"}}
models:
  fast: {{targets: [{{provider: up, model: fast}}]}}
  burst: {{targets: [{{provider: up, model: burst}}]}}
"
    )
}

/// How long the start took, from `spawn`.
#[derive(Clone, Copy, Debug)]
pub struct StartTimes {
    /// To the "serving" log line read on stdout.
    pub to_log: Duration,
    /// To the first health check answering SERVING.
    pub to_serving: Duration,
}

/// A running gateway; killed when dropped.
pub struct Gateway {
    child: Child,
    pub pid: u32,
    pub grpc_addr: SocketAddr,
    /// The admin listener (`/metrics`), from the "serving" line.
    pub admin_addr: Option<SocketAddr>,
    /// The OpenAI-compatible HTTP front door, from the "serving" line.
    pub http_addr: Option<SocketAddr>,
    pub start: StartTimes,
    log_lines: Arc<AtomicU64>,
    /// Lines of its output that report a panic.
    panics: Arc<AtomicU64>,
    tail: Arc<Mutex<VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts `bin` on `config` and waits (bounded) until its health service
    /// answers SERVING.
    pub async fn spawn(bin: &Path, config: &str) -> Result<Self, BoxError> {
        Self::spawn_with_env(bin, config, &[]).await
    }

    /// [`Gateway::spawn`], with `env` added to the scrubbed environment (for
    /// instance `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub async fn spawn_with_env(bin: &Path, config: &str, env: &[(&str, &str)]) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config)?;
        let mut command = Command::new(bin);
        command.arg("--config").arg(&path).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for var in SCRUBBED_ENV {
            command.env_remove(var);
        }
        for (var, _) in std::env::vars_os() {
            if var.to_str().is_some_and(|v| v.starts_with("OTEL_")) {
                command.env_remove(var);
            }
        }
        for &(var, value) in env {
            command.env(var, value);
        }
        // To debug the bench: the gateway's own filter, e.g. `debug`.
        if let Ok(filter) = std::env::var("BENCH_GATEWAY_RUST_LOG") {
            command.env("RUST_LOG", filter);
        }
        let t0 = Instant::now();
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // From here on a failure must still kill the child: build the guard
        // first, with the address filled in once known.
        let mut gateway = Gateway {
            child,
            pid,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: None,
            http_addr: None,
            start: StartTimes { to_log: Duration::ZERO, to_serving: Duration::ZERO },
            log_lines: Arc::new(AtomicU64::new(0)),
            panics: Arc::new(AtomicU64::new(0)),
            tail: Arc::new(Mutex::new(VecDeque::new())),
            _dir: dir,
        };
        let (serving_tx, serving_rx) = oneshot::channel();
        // To debug the bench: keep every line the gateways write.
        let copy = match std::env::var_os("BENCH_GATEWAY_LOG") {
            Some(path) => {
                Some(Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)))
            }
            None => None,
        };
        if let Some(out) = stdout {
            let counts = (gateway.log_lines.clone(), gateway.panics.clone());
            read_lines(out, Some(serving_tx), counts, gateway.tail.clone(), copy.clone());
        }
        if let Some(err) = stderr {
            let counts = (Arc::new(AtomicU64::new(0)), gateway.panics.clone());
            read_lines(err, None, counts, gateway.tail.clone(), copy);
        }
        let (logged_at, Serving { grpc: addr, admin, http }) =
            match tokio::time::timeout(START_WAIT, serving_rx).await {
                Ok(Ok(v)) => v,
                Ok(Err(_)) => {
                    return Err(format!("the gateway exited before serving:\n{}", gateway.tail()).into());
                }
                Err(_) => {
                    return Err(
                        format!("no \"serving\" line within {START_WAIT:?}:\n{}", gateway.tail()).into()
                    );
                }
            };
        gateway.grpc_addr = addr;
        gateway.admin_addr = admin;
        gateway.http_addr = http;
        let serving_at = wait_serving(addr).await.map_err(|e| format!("{e}\n{}", gateway.tail()))?;
        gateway.start = StartTimes { to_log: logged_at - t0, to_serving: serving_at - t0 };
        Ok(gateway)
    }

    /// Whether the child is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines the child wrote, for error messages.
    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    /// Panics the gateway reported so far (Rust prints "panicked at").
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }

    /// Lines written to stdout so far (one per finished call, at info).
    pub fn log_lines(&self) -> u64 {
        self.log_lines.load(Ordering::Relaxed)
    }

    pub fn usage(&self) -> Result<ProcUsage, BoxError> {
        ProcUsage::of(&self.pid.to_string())
    }

    /// The value of the sample `name` (e.g. `llm_gateway_dropped_spans_total`)
    /// on the admin listener's `/metrics`; None if the page has no such line.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>, BoxError> {
        let admin = self.admin_addr.ok_or("the gateway logged no admin address")?;
        let page = tokio::time::timeout(Duration::from_secs(5), get_metrics(admin))
            .await
            .map_err(|_| "GET /metrics took more than 5 s")??;
        Ok(sample(&page, name))
    }
}

/// GET /metrics over HTTP/1.0, so that the body is neither chunked nor kept
/// alive: it ends where the connection does.
async fn get_metrics(admin: SocketAddr) -> Result<String, BoxError> {
    let mut conn = tokio::net::TcpStream::connect(admin).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    let response = String::from_utf8(response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no end of headers in the /metrics answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("/metrics answered {}", head.lines().next().unwrap_or("")).into());
    }
    Ok(body.to_owned())
}

/// The value of a Prometheus text sample with no labels.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Reads a child's output on a thread of its own (so a full pipe never
/// stalls the gateway), hands the "serving" line's address to `serving`,
/// counts lines and panic reports, and keeps the last few lines.
fn read_lines(
    out: impl Read + Send + 'static,
    mut serving: Option<oneshot::Sender<(Instant, Serving)>>,
    (lines, panics): (Arc<AtomicU64>, Arc<AtomicU64>),
    tail: Arc<Mutex<VecDeque<String>>>,
    copy: Option<Arc<Mutex<std::fs::File>>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            lines.fetch_add(1, Ordering::Relaxed);
            if line.contains("panicked at") {
                panics.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(file) = &copy
                && let Ok(mut f) = file.lock()
            {
                let _ = std::io::Write::write_all(&mut *f, line.as_bytes());
            }
            if serving.is_some()
                && let Some(addrs) = serving_addrs(&line)
                && let Some(tx) = serving.take()
            {
                let _ = tx.send((Instant::now(), addrs));
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(line.trim_end().to_owned());
            }
        }
    });
}

/// The listeners' addresses in the "serving" line.
struct Serving {
    grpc: SocketAddr,
    admin: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

/// The addresses of the JSON "serving" line.
fn serving_addrs(line: &str) -> Option<Serving> {
    if !line.contains("\"serving\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != "serving" {
        return None;
    }
    let grpc = v.get("grpc_addr")?.as_str()?.parse().ok()?;
    let admin = v.get("admin_addr").and_then(|a| a.as_str()?.parse().ok());
    let http = v.get("http_addr").and_then(|a| a.as_str()?.parse().ok());
    Some(Serving { grpc, admin, http })
}

/// Polls grpc.health.v1 until SERVING; returns when it first answered so.
async fn wait_serving(addr: SocketAddr) -> Result<Instant, BoxError> {
    let deadline = Instant::now() + START_WAIT;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5));
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut health = HealthClient::new(channel);
            if let Ok(r) = health.check(HealthCheckRequest { service: String::new() }).await
                && r.get_ref().status == ServingStatus::Serving as i32
            {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("health did not turn SERVING within {START_WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// CPU time and memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcUsage {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub rss_kib: u64,
    pub threads: u64,
}

impl ProcUsage {
    /// `pid` is a number or "self".
    pub fn of(pid: &str) -> Result<Self, BoxError> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name may hold spaces and parentheses: fields start
        // after the last ')'. Field 3 (state) is index 0 here.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
        let field = |i: usize| -> Result<u64, BoxError> {
            Ok(fields.get(i).ok_or("short /proc/PID/stat")?.parse::<u64>()?)
        };
        let cpu_ticks = field(11)? + field(12)?;
        let threads = field(17)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmRSS in /proc/PID/status")?;
        Ok(Self { cpu_ticks, rss_kib, threads })
    }
}

/// CPU ticks of this process's threads whose name starts with `prefix`
/// (the bench's runtimes name theirs), so that the client's and the
/// upstream's shares of the cores can be told apart.
pub fn thread_ticks(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.split_once('(').is_some_and(|(_, name)| name.starts_with(prefix)) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += ticks(11) + ticks(12);
    }
    total
}

/// Busy CPU ticks of the whole machine (all cores, every process), from
/// /proc/stat: what else ran during a measurement shows as the difference.
pub fn machine_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().next().and_then(|l| l.strip_prefix("cpu ")) else {
        return 0;
    };
    let v: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

/// Clock ticks per second, for /proc CPU times.
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit with
/// `prlimit` (the bench forbids `unsafe`, so no setrlimit call); children
/// inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let pid = std::process::id().to_string();
    let hard = fd_limit("Max open files", 2);
    if let Some(hard) = hard {
        let _ = Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    fd_limit("Max open files", 1).unwrap_or(1024)
}

/// A column of /proc/self/limits: 1 soft, 2 hard.
fn fd_limit(name: &str, column: usize) -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let values: Vec<&str> = line[name.len()..].split_whitespace().collect();
    match values.get(column - 1)? {
        &"unlimited" => Some(1 << 20),
        v => v.parse().ok(),
    }
}
