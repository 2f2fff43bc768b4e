//! The load client: bounded runs of streaming calls, through the gateway
//! (tonic, or reqwest to its OpenAI-compatible HTTP front door) or straight
//! to the upstream (reqwest), timing each call's first content delta and
//! counting what it streamed.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use llm_gateway::api::pb::{self, llm_gateway_client::LlmGatewayClient};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::{Streaming, transport::Channel};

use super::BoxError;

/// Streams one gRPC connection carries at most in the load runs. The gateway
/// allows 1,024 (`server.max_concurrent_streams`), but h2 (0.4.20 on) closes
/// a connection with ENHANCE_YOUR_CALM once about 145 small request DATA
/// frames wait unread at the gateway's 64 KiB connection window, which a
/// burst of new calls on a busy gateway does: the runs spread their calls the
/// way a fleet of clients would, and [`super::phases::burst`] probes the
/// limit on its own.
pub const STREAMS_PER_CONNECTION: usize = 64;
/// The prompt of every call.
const PROMPT: &str = "Say something.";

/// Which upstream wire format a direct call speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wire {
    OpenAi,
    Anthropic,
}

impl Wire {
    /// The bytes that start each text delta in the stub's answers.
    fn marker(self) -> &'static [u8] {
        match self {
            Wire::OpenAi => b"\"content\":\"",
            Wire::Anthropic => b"\"text_delta\"",
        }
    }
}

/// Where the calls go.
pub enum Target {
    /// Through the gateway: gRPC `StreamCompletion` on `model`.
    Gateway { clients: Vec<LlmGatewayClient<Channel>>, model: &'static str, key: Option<&'static str> },
    /// Straight to the fake upstream, as the gateway would call it.
    Direct { client: reqwest::Client, url: String, body: Bytes, wire: Wire },
}

impl Target {
    /// `connections` HTTP/2 connections to the gateway at `addr`.
    pub async fn gateway(
        addr: SocketAddr,
        connections: usize,
        model: &'static str,
    ) -> Result<Self, BoxError> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections.max(1) {
            clients.push(LlmGatewayClient::new(connect(addr).await?));
        }
        Ok(Target::Gateway { clients, model, key: None })
    }

    /// The same calls with `authorization: Bearer KEY`.
    pub fn with_key(self, k: Option<&'static str>) -> Self {
        match self {
            Target::Gateway { clients, model, .. } => Target::Gateway { clients, model, key: k },
            direct => direct,
        }
    }

    /// Through the gateway's HTTP front door at `addr`: the same request a
    /// direct OpenAI call sends, on `model` (a gateway model name). One
    /// HTTP/1.1 keep-alive connection per call in flight.
    pub fn gateway_http(addr: SocketAddr, model: &str) -> Result<Self, BoxError> {
        Self::direct(addr, Wire::OpenAi, model)
    }

    /// Another OpenAI-compatible gateway: the same streaming request (the
    /// same prompt, the same HTTP/1.1 client) to `base` (`http://…/v1`, where
    /// `chat/completions` lives), on `model` as that gateway names it.
    pub fn openai_at(base: &str, model: &str) -> Result<Self, BoxError> {
        let Target::Direct { client, body, wire, .. } =
            Self::direct(([127, 0, 0, 1], 0).into(), Wire::OpenAi, model)?
        else {
            return Err("Target::direct made no direct target".into());
        };
        Ok(Target::Direct {
            client,
            url: format!("{}/chat/completions", base.trim_end_matches('/')),
            body,
            wire,
        })
    }

    /// The request the gateway itself would send for `model`.
    pub fn direct(upstream: SocketAddr, wire: Wire, model: &str) -> Result<Self, BoxError> {
        // reqwest is built without a default TLS provider; plain HTTP still
        // needs one installed. A second install is refused, harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .no_proxy()
            // Never close a connection for want of pool room: the baseline is
            // the upstream's best.
            .pool_max_idle_per_host(usize::MAX)
            .build()?;
        let (path, body) = match wire {
            Wire::OpenAi => (
                "chat/completions",
                serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "stream": true,
                    "stream_options": {"include_usage": true},
                }),
            ),
            Wire::Anthropic => (
                "messages",
                serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": 4096,
                    "stream": true,
                }),
            ),
        };
        Ok(Target::Direct {
            client,
            url: format!("http://{upstream}/v1/{path}"),
            body: Bytes::from(serde_json::to_vec(&body)?),
            wire,
        })
    }
}

/// An open-loop run: its calls, and how the schedule went.
#[derive(Default)]
pub struct OpenLoopRun {
    /// `elapsed` is from the start of the schedule to the end of the last call.
    pub run: RunResult,
    /// Calls the schedule started, and the time from its start to the last.
    pub started: u64,
    pub schedule: Duration,
    /// Arrivals that found every slot taken and waited for a call to end.
    pub queued: u64,
    pub max_in_flight: usize,
    /// How late each call started after its arrival time, µs, sorted.
    pub lag_us: Vec<u64>,
}

impl OpenLoopRun {
    /// Calls started per second of the schedule.
    pub fn achieved_per_s(&self) -> f64 {
        self.started as f64 / self.schedule.as_secs_f64().max(1e-9)
    }
}

/// Open loop: calls start at Poisson arrivals of `rate` a second for
/// `duration`, whatever the calls before them are doing, with at most
/// `max_in_flight` running: an arrival that finds them all busy waits for one
/// to end (and is counted in `queued`). The arrival times come from `seed`,
/// so two runs with the same seed follow the same schedule. A thread of the
/// runtime's blocking pool keeps the schedule (a tokio timer would round it
/// to the millisecond); time to first token is timed from each call's start,
/// as in [`run`], and `lag_us` says how late that start was. Everything ends
/// by `max_time`.
pub async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    seed: u64,
    max_time: Duration,
) -> OpenLoopRun {
    let handle = tokio::runtime::Handle::current();
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::from_std(t0 + max_time);
    let schedule = tokio::task::spawn_blocking(move || {
        let slots = Arc::new(Semaphore::new(max_in_flight));
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut calls, mut queued, mut most) = (Vec::new(), 0, 0);
        let mut at = Duration::ZERO;
        loop {
            at += Duration::from_secs_f64(-(1.0 - rng.f64()).ln() / rate);
            if at >= duration {
                break;
            }
            let due = t0 + at;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    queued += 1;
                    match handle.block_on(tokio::time::timeout_at(deadline, slots.clone().acquire_owned())) {
                        Ok(Ok(p)) => p,
                        _ => break,
                    }
                }
            };
            most = most.max(max_in_flight - slots.available_permits());
            let target = target.clone();
            let worker = calls.len();
            calls.push(handle.spawn(async move {
                let lag = due.elapsed();
                let outcome = call(&target, worker).await;
                drop(permit);
                (lag, outcome)
            }));
        }
        (calls, queued, most, t0.elapsed())
    });
    let mut out = OpenLoopRun::default();
    let Ok((calls, queued, most, schedule)) = schedule.await else {
        out.run.add(Err("the open-loop scheduler panicked".into()));
        return out;
    };
    (out.started, out.queued, out.max_in_flight, out.schedule) = (calls.len() as u64, queued, most, schedule);
    for mut task in calls {
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok((lag, outcome))) => {
                out.lag_us.push(lag.as_micros() as u64);
                out.run.add(outcome);
            }
            Ok(Err(e)) => out.run.add(Err(e.to_string())),
            Err(_) => {
                task.abort();
                out.run.add(Err(format!("still running after {max_time:?}")));
            }
        }
    }
    out.run.elapsed = t0.elapsed();
    out.run.ttft_us.sort_unstable();
    out.run.total_us.sort_unstable();
    out.lag_us.sort_unstable();
    out
}

/// A gRPC client of the gateway.
pub type Client = LlmGatewayClient<Channel>;

/// A client on one of the connections.
pub fn pb_client(channel: Channel) -> LlmGatewayClient<Channel> {
    LlmGatewayClient::new(channel)
}

/// One HTTP/2 connection to the gateway.
pub async fn connect(addr: SocketAddr) -> Result<Channel, BoxError> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// One call's timing.
struct Sample {
    ttft: Duration,
    total: Duration,
    deltas: u32,
}

/// What a run measured.
#[derive(Default)]
pub struct RunResult {
    /// Time to the first content delta, µs, sorted.
    pub ttft_us: Vec<u64>,
    /// Time to the end of the stream, µs, sorted.
    pub total_us: Vec<u64>,
    pub calls: u64,
    pub deltas: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl RunResult {
    pub fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn deltas_per_s(&self) -> f64 {
        self.deltas as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, outcome: Result<Sample, String>) {
        match outcome {
            Ok(s) => {
                self.calls += 1;
                self.deltas += u64::from(s.deltas);
                self.ttft_us.push(s.ttft.as_micros() as u64);
                self.total_us.push(s.total.as_micros() as u64);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// One caller, its calls taking turns among `targets` (`calls` each at
/// most, within `max_time`; each round in an order of its own, shuffled
/// from a fixed seed, so that no target always follows the same one: a
/// gateway called right after another call to itself finds its threads
/// awake, one called after a slower contender does not). The distributions then share every
/// hiccup of the machine, so a difference between two of them (what a
/// gateway adds, against the upstream itself) is not a hiccup that met one
/// run and not the other, as runs one after the other can be.
pub async fn in_turns(targets: &[&Target], calls: u64, max_time: Duration) -> Vec<RunResult> {
    let started = Instant::now();
    let deadline = started + max_time;
    let n = targets.len();
    let mut results: Vec<RunResult> = (0..n).map(|_| RunResult::default()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = fastrand::Rng::with_seed(17);
    'rounds: for _ in 0..calls {
        rng.shuffle(&mut order);
        for &i in &order {
            if Instant::now() >= deadline {
                break 'rounds;
            }
            results[i].add(call(targets[i], 0).await);
        }
    }
    for r in &mut results {
        r.elapsed = started.elapsed();
        r.ttft_us.sort_unstable();
        r.total_us.sort_unstable();
    }
    results
}

/// Runs calls on `target`, `concurrency` at a time, until `max_calls` have
/// been issued or `max_time` has passed, whichever comes first.
pub async fn run(target: Arc<Target>, concurrency: usize, max_calls: u64, max_time: Duration) -> RunResult {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + max_time;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let target = target.clone();
        let issued = issued.clone();
        workers.spawn(async move {
            let mut samples = Vec::new();
            let mut errors = (0u64, None::<String>);
            while issued.fetch_add(1, Ordering::Relaxed) < max_calls && Instant::now() < deadline {
                match call(&target, worker).await {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        errors.0 += 1;
                        errors.1.get_or_insert(e);
                    }
                }
            }
            (samples, errors)
        });
    }
    let mut result = RunResult::default();
    while let Some(joined) = workers.join_next().await {
        let Ok((samples, (errors, first_error))) = joined else {
            result.errors += 1;
            continue;
        };
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        for s in samples {
            result.add(Ok(s));
        }
    }
    result.elapsed = started.elapsed();
    result.ttft_us.sort_unstable();
    result.total_us.sort_unstable();
    result
}

async fn call(target: &Target, worker: usize) -> Result<Sample, String> {
    match target {
        Target::Gateway { clients, model, key } => {
            let mut client = clients[worker % clients.len()].clone();
            gateway_call(&mut client, model, *key).await
        }
        Target::Direct { client, url, body, wire } => direct_call(client, url, body.clone(), *wire).await,
    }
}

async fn gateway_call(
    client: &mut LlmGatewayClient<Channel>,
    model: &str,
    key: Option<&'static str>,
) -> Result<Sample, String> {
    let t0 = Instant::now();
    let mut req = tonic::Request::new(request(model, PROMPT));
    if let Some(key) = key
        && let Ok(v) = format!("Bearer {key}").parse()
    {
        req.metadata_mut().insert("authorization", v);
    }
    let mut stream = client.stream_completion(req).await.map_err(status)?.into_inner();
    let mut ttft = None;
    let mut deltas = 0;
    while let Some(m) = stream.message().await.map_err(status)? {
        if !m.content.is_empty() {
            deltas += 1;
            ttft.get_or_insert_with(|| t0.elapsed());
        }
    }
    Ok(Sample { ttft: ttft.ok_or("no content delta")?, total: t0.elapsed(), deltas })
}

async fn direct_call(client: &reqwest::Client, url: &str, body: Bytes, wire: Wire) -> Result<Sample, String> {
    let t0 = Instant::now();
    let mut response = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("upstream answered {}", response.status()));
    }
    let mut counter = Counter::new(wire.marker());
    let mut ttft = None;
    let mut deltas = 0;
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        let n = counter.feed(&chunk);
        if n > 0 {
            ttft.get_or_insert_with(|| t0.elapsed());
        }
        deltas += n;
    }
    Ok(Sample { ttft: ttft.ok_or("no content delta")?, total: t0.elapsed(), deltas })
}

/// Counts a marker's occurrences across chunk boundaries.
struct Counter {
    marker: &'static [u8],
    carry: Vec<u8>,
}

impl Counter {
    fn new(marker: &'static [u8]) -> Self {
        Self { marker, carry: Vec::new() }
    }

    fn feed(&mut self, chunk: &[u8]) -> u32 {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let n = buf.windows(self.marker.len()).filter(|w| *w == self.marker).count() as u32;
        let keep = (self.marker.len() - 1).min(buf.len());
        self.carry = buf[buf.len() - keep..].to_vec();
        n
    }
}

/// A `StreamCompletion` request with one user message.
pub fn request(model: &str, content: &str) -> pb::StreamCompletionRequest {
    pb::StreamCompletionRequest {
        model: model.to_owned(),
        messages: vec![pb::ChatMessage {
            role: pb::Role::User as i32,
            content: content.to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Opens a stream and waits for its first message, so that the gateway holds
/// an upstream connection for it; the caller keeps (or drops) the stream.
pub async fn open_held(
    client: &mut LlmGatewayClient<Channel>,
    model: &str,
    content: &str,
) -> Result<Streaming<pb::StreamCompletionResponse>, String> {
    let mut stream = client.stream_completion(request(model, content)).await.map_err(status)?.into_inner();
    match stream.message().await.map_err(status)? {
        Some(_) => Ok(stream),
        None => Err("the stream ended before its first message".into()),
    }
}

fn status(s: tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    // A transport error says what went wrong only in its sources.
    let mut source = std::error::Error::source(&s);
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// The `p`-quantile (0..1) of sorted values, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}
