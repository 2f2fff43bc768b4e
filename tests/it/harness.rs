//! Starts gateways for the tests: in process (`Gateway`, from a YAML string)
//! or as the real binary (`Binary`, from a temp config file), plus the clients
//! that talk to them: tonic, and a raw HTTP/2 one that never cancels on its
//! own. Every wait here is bounded.

use std::{
    ffi::OsStr,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use llm_gateway::{
    api::pb::{self, llm_gateway_client::LlmGatewayClient},
    app::{self, AppError, Listeners},
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tonic::{
    Status, Streaming,
    transport::{Channel, Endpoint},
};

/// The bound on any single wait that should take a fraction of it.
pub(crate) const WAIT: Duration = Duration::from_secs(5);
/// How soon the upstream must see its connection close after a cancel. The
/// contract says 50 ms; the benchmark measures that, tests allow slack.
pub(crate) const CLOSE_BOUND: Duration = Duration::from_secs(1);

/// Polls `probe` (bounded by `bound`, 10 ms apart) until it returns true:
/// for state another process or task publishes with no event to wait on
/// (an HTTP status, a metric written when tonic drops a stream).
pub(crate) async fn eventually(bound: Duration, what: &str, mut probe: impl AsyncFnMut() -> bool) {
    within(bound, what, async {
        while !probe().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Awaits `fut` for at most `bound`, failing the test with `what` otherwise.
pub(crate) async fn within<T>(bound: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}

/// The environment variable in-process gateways read the upstream key from.
/// Tests cannot set variables (`set_var` is unsafe and unsafe code is
/// forbidden), so they use one `cargo test` always sets.
pub(crate) const KEY_ENV: &str = "CARGO_PKG_NAME";

/// The key in-process gateways send upstream.
pub(crate) fn upstream_key() -> String {
    std::env::var(KEY_ENV)
        .unwrap_or_else(|_| panic!("{KEY_ENV} is not set: run the tests with `cargo test --test it`"))
}

/// A config with every provider kind; `openai` and `anthropic` point at `base_url`.
///
/// Models: `chat` (openai, `gpt-4o-mini`), `claude` (anthropic, `claude-test`),
/// `lorem` (mock, 12 tokens), `echo` (mock), `slow` (mock, 40 tokens 50 ms apart),
/// `flaky` (mock, fails after 3 tokens), `down` (mock, 503), `refused` (mock, 400).
pub(crate) fn config(base_url: &str) -> String {
    format!(
        "\
providers:
  oa:
    kind: openai
    base_url: {base_url}
    api_key_env: {KEY_ENV}
  an:
    kind: anthropic
    base_url: {base_url}
    api_key_env: {KEY_ENV}
    default_max_tokens: 333
  mk:
    kind: mock
models:
  chat:
    targets: [{{ provider: oa, model: gpt-4o-mini }}]
  claude:
    targets: [{{ provider: an, model: claude-test }}]
  lorem:
    targets: [{{ provider: mk, model: \"lorem?tokens=12\" }}]
  echo:
    targets: [{{ provider: mk, model: echo }}]
  slow:
    targets: [{{ provider: mk, model: \"lorem?tokens=40&delay=50ms\" }}]
  flaky:
    targets: [{{ provider: mk, model: \"lorem?tokens=10&fail_after=3\" }}]
  down:
    targets: [{{ provider: mk, model: \"x?fail=503\" }}]
  refused:
    targets: [{{ provider: mk, model: \"x?fail=400\" }}]
"
    )
}

/// [`config`] with one more model (`models` is the last key of it).
pub(crate) fn config_with_model(base_url: &str, name: &str, provider: &str, model: &str) -> String {
    format!("{}  {name}:\n    targets: [{{ provider: {provider}, model: \"{model}\" }}]\n", config(base_url))
}

/// A gateway running in this process, on 127.0.0.1 ports of its own.
pub(crate) struct Gateway {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTP front door, when the config sets `http_listen`.
    pub http: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<Result<(), AppError>>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(run) = &self.run {
            run.abort();
        }
    }
}

impl Gateway {
    /// Starts a gateway from `yaml`, which must not set `listen` or `admin_listen`.
    pub(crate) async fn start(yaml: &str) -> Self {
        let text = format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}");
        let config = llm_gateway::config::parse(&text, None)
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}\n{text}"));
        let listeners = Listeners::bind(&config).await.expect("bind the gateway's listeners");
        let grpc = listeners.grpc_addr().expect("gRPC address");
        let admin = listeners.admin_addr().expect("admin address");
        let http = listeners.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        Self { grpc, admin, http, stop: Some(stop), run: Some(run) }
    }

    /// Starts a gateway on `text` (a whole config) read from `path`, which it
    /// reloads on each message of `requests` and when the file changes.
    async fn start_reloading(path: std::path::PathBuf, requests: mpsc::Receiver<()>) -> Self {
        let (mut source, config) = llm_gateway::reload::Source::read(path)
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}"));
        source.requests = Some(requests);
        let listeners = Listeners::bind(&config).await.expect("bind the gateway's listeners");
        let grpc = listeners.grpc_addr().expect("gRPC address");
        let admin = listeners.admin_addr().expect("admin address");
        let http = listeners.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app::run_with(config, Some(source), listeners, async move {
            let _ = stopped.await;
        }));
        Self { grpc, admin, http, stop: Some(stop), run: Some(run) }
    }

    /// [`config`] pointed at `base_url`.
    pub(crate) async fn with_upstream(base_url: &str) -> Self {
        Self::start(&config(base_url)).await
    }

    pub(crate) async fn channel(&self) -> Channel {
        connect(self.grpc).await
    }

    pub(crate) async fn client(&self) -> LlmGatewayClient<Channel> {
        LlmGatewayClient::new(self.channel().await)
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The HTTP front door's address; the config must set `http_listen`.
    pub(crate) fn http_addr(&self) -> SocketAddr {
        self.http.expect("the test config sets http_listen")
    }

    /// A URL on the HTTP front door.
    pub(crate) fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr())
    }

    /// Resolves the shutdown future given to `app::run`: the gateway drains.
    pub(crate) fn trigger_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for `app::run` to return. Unbounded: wrap it in a timeout.
    pub(crate) async fn stopped(&mut self) -> Result<(), AppError> {
        let run = self.run.take().expect("stopped() is called once");
        run.await.expect("app::run panicked")
    }
}

/// A gateway in this process serving a config file, as the binary does:
/// reloaded on [`Reloading::request`] (what SIGHUP sends) and when the file
/// changes (checked every `server.config_reload_interval`).
pub(crate) struct Reloading {
    pub gw: Gateway,
    path: std::path::PathBuf,
    requests: mpsc::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Reloading {
    /// `yaml` must not set `listen` or `admin_listen`.
    pub(crate) async fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, Self::text(yaml)).expect("write the config");
        let (requests, rx) = mpsc::channel(1);
        let gw = Gateway::start_reloading(path.clone(), rx).await;
        Self { gw, path, requests, _dir: dir }
    }

    fn text(yaml: &str) -> String {
        format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}")
    }

    /// Replaces the file with `yaml` (same listen lines) in one rename, as a
    /// ConfigMap update does.
    pub(crate) fn write(&self, yaml: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, Self::text(yaml)).expect("write the config");
        std::fs::rename(&tmp, &self.path).expect("rename the config");
    }

    /// Asks for a reload, as SIGHUP does.
    pub(crate) async fn request(&self) {
        within(WAIT, "the reload request", self.requests.send(())).await.expect("the gateway listens");
    }
}

/// A tonic channel to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint URI");
    within(WAIT, "the gRPC connection", endpoint.connect()).await.expect("connect to the gateway")
}

pub(crate) fn message(role: pb::Role, content: &str) -> pb::ChatMessage {
    pb::ChatMessage { role: role as i32, content: content.into(), ..Default::default() }
}

pub(crate) fn stream_request(model: &str, text: &str) -> pb::StreamCompletionRequest {
    pb::StreamCompletionRequest {
        model: model.into(),
        messages: vec![message(pb::Role::User, text)],
        ..Default::default()
    }
}

pub(crate) fn completion_request(model: &str, text: &str) -> pb::CompletionRequest {
    pb::CompletionRequest {
        model: model.into(),
        messages: vec![message(pb::Role::User, text)],
        ..Default::default()
    }
}

/// Everything a response stream gave, and how it ended.
#[derive(Debug)]
pub(crate) struct Collected {
    pub messages: Vec<pb::StreamCompletionResponse>,
    pub end: Result<(), Status>,
}

impl Collected {
    /// The concatenated content deltas.
    pub(crate) fn text(&self) -> String {
        self.messages.iter().map(|m| m.content.as_str()).collect()
    }

    pub(crate) fn error(&self) -> &Status {
        match &self.end {
            Err(s) => s,
            Ok(()) => panic!("the stream ended OK, an error was expected; got {:?}", self.messages),
        }
    }
}

/// Reads a response stream to its end, each message within [`WAIT`].
pub(crate) async fn collect(stream: &mut Streaming<pb::StreamCompletionResponse>) -> Collected {
    let mut messages = Vec::new();
    loop {
        match within(WAIT, "the next stream message", stream.message()).await {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => return Collected { messages, end: Ok(()) },
            Err(s) => return Collected { messages, end: Err(s) },
        }
    }
}

/// Calls StreamCompletion and reads the answer to its end; an error status
/// before the stream starts ends it with no messages.
pub(crate) async fn stream_call(
    client: &mut LlmGatewayClient<Channel>,
    request: impl tonic::IntoRequest<pb::StreamCompletionRequest>,
) -> Collected {
    match within(WAIT, "StreamCompletion", client.stream_completion(request)).await {
        Ok(response) => collect(&mut response.into_inner()).await,
        Err(s) => Collected { messages: Vec::new(), end: Err(s) },
    }
}

/// A metadata value as text, or "" when absent.
pub(crate) fn md<'a>(map: &'a tonic::metadata::MetadataMap, key: &str) -> &'a str {
    map.get(key).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A reqwest client for the admin endpoints.
pub(crate) fn http() -> reqwest::Client {
    // reqwest is built without a default TLS provider; the gateway installs
    // ring on first use, but a test may need a client before any gateway runs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().expect("reqwest client")
}

/// GET `url`, returning the status code (within [`WAIT`]).
pub(crate) async fn get_status(url: &str) -> u16 {
    within(WAIT, url, http().get(url).send()).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Checks a W3C `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero.
/// Returns (trace id, span id).
pub(crate) fn parse_traceparent(v: &str) -> (String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1].bytes().any(|b| b != b'0')
            && parts[2].bytes().any(|b| b != b'0'),
        "malformed traceparent {v:?}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

// ---------------------------------------------------------------------------
// A raw HTTP/2 gRPC client: it sends what it is told and never cancels on its
// own, so only the gateway can end a call (deadline, shutdown).

pub(crate) struct RawH2 {
    addr: SocketAddr,
    send: h2::client::SendRequest<Bytes>,
    conn: JoinHandle<()>,
}

impl RawH2 {
    /// Connects; with `abortive`, dropping the connection resets the TCP
    /// connection (as when a process dies with unread data) instead of a FIN.
    pub(crate) async fn connect(addr: SocketAddr, abortive: bool) -> Self {
        let tcp = within(WAIT, "TCP connect", TcpStream::connect(addr)).await.expect("connect");
        if abortive {
            tcp.set_zero_linger().expect("SO_LINGER 0");
        }
        Self::over(addr, tcp).await
    }

    /// Connects offering a stream window of `window` bytes: a response it
    /// does not read stalls once that much has arrived (a slow reader).
    pub(crate) async fn with_window(addr: SocketAddr, window: u32) -> Self {
        let tcp = within(WAIT, "TCP connect", TcpStream::connect(addr)).await.expect("connect");
        let mut builder = h2::client::Builder::new();
        builder.initial_window_size(window);
        Self::handshake(addr, tcp, builder).await
    }

    /// The HTTP/2 handshake over a connection already made (a TLS one, say).
    pub(crate) async fn over<IO>(addr: SocketAddr, io: IO) -> Self
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake(addr, io, h2::client::Builder::new()).await
    }

    async fn handshake<IO>(addr: SocketAddr, io: IO, builder: h2::client::Builder) -> Self
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) =
            within(WAIT, "the HTTP/2 handshake", builder.handshake(io)).await.expect("HTTP/2 handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { addr, send, conn }
    }

    /// Sends one gRPC request (`headers` added to the usual ones) to `method`,
    /// e.g. `/llmgateway.v1.LlmGateway/StreamCompletion`, and waits for the
    /// response headers.
    pub(crate) async fn call(
        &mut self,
        method: &str,
        headers: &[(&str, &str)],
        message: &impl prost::Message,
    ) -> RawResponse {
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{method}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(()).expect("request");
        let mut send = within(WAIT, "an HTTP/2 stream", self.send.clone().ready()).await.expect("ready");
        let (response, mut body) = send.send_request(request, false).expect("send the request headers");
        body.send_data(grpc_frame(message), true).expect("send the request body");
        let response = within(WAIT, "the response headers", response).await.expect("response headers");
        let (parts, body) = response.into_parts();
        RawResponse { headers: parts.headers, body, buf: BytesMut::new() }
    }

    /// Waits for the connection to end: the server closed it. Unbounded:
    /// wrap it; call it at most once, and not with [`RawH2::kill`].
    pub(crate) async fn closed(&mut self) {
        let _ = (&mut self.conn).await;
    }

    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_finished()
    }

    /// Drops the connection as a dying process would: no RST_STREAM, no GOAWAY.
    pub(crate) async fn kill(self) {
        let Self { send, conn, .. } = self;
        drop(send);
        conn.abort();
        let _ = within(WAIT, "the connection task to end", conn).await;
    }
}

/// A length-prefixed gRPC message (uncompressed).
pub(crate) fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let payload = message.encode_to_vec();
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(payload.len()).expect("small message").to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.into()
}

pub(crate) struct RawResponse {
    pub headers: http::HeaderMap,
    body: h2::RecvStream,
    buf: BytesMut,
}

impl RawResponse {
    /// The next gRPC message, or None when the body ends. Unbounded: wrap it.
    pub(crate) async fn message<M: prost::Message + Default>(&mut self) -> Option<M> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() >= 5 + len {
                    assert_eq!(self.buf[0], 0, "compressed messages are not expected");
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len);
                    return Some(M::decode(payload).expect("a valid message"));
                }
            }
            let chunk = self.body.data().await?.expect("response body");
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Reads the rest of the body and returns (grpc-status, grpc-message, the
    /// trailers), from the trailers or, for a trailers-only answer, the headers.
    /// Unbounded: wrap it.
    pub(crate) async fn status(mut self) -> (i32, String, http::HeaderMap) {
        let from = |h: &http::HeaderMap| {
            let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
            let msg = h.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            Some((code, msg))
        };
        if let Some((code, msg)) = from(&self.headers) {
            return (code, msg, self.headers.clone());
        }
        while let Some(chunk) = self.body.data().await {
            let chunk = chunk.expect("response body");
            let _ = self.body.flow_control().release_capacity(chunk.len());
        }
        let trailers = self.body.trailers().await.expect("trailers").expect("the response has trailers");
        let (code, msg) = from(&trailers).expect("grpc-status in the trailers");
        (code, msg, trailers)
    }
}

// ---------------------------------------------------------------------------
// The real binary.

/// A child process with its output collected line by line.
pub(crate) struct Proc {
    pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    exit: Option<oneshot::Receiver<ExitStatus>>,
    status: Option<ExitStatus>,
    exited: Arc<AtomicBool>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.exited.load(Ordering::Acquire) {
            let _ = self.send_signal("KILL");
        }
    }
}

impl Proc {
    /// Runs the gateway binary with `args`; proxies, OpenTelemetry and
    /// config variables of the test's environment are not passed on.
    pub(crate) fn spawn<S: AsRef<OsStr>>(args: &[S], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-gateway"));
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars_os().filter(|(k, _)| {
            let k = k.to_string_lossy().to_ascii_uppercase();
            k.ends_with("_PROXY") || k.starts_with("OTEL_") || k == "LLM_GATEWAY_CONFIG" || k == "RUST_LOG"
        }) {
            cmd.env_remove(k);
        }
        cmd.env("RUST_LOG", "info");
        cmd.envs(envs.iter().copied());
        let mut child = cmd.spawn().expect("spawn llm-gateway");
        let pid = child.id();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (line_tx, lines) = mpsc::unbounded_channel();
        let out_pipe = child.stdout.take().expect("stdout pipe");
        let err_pipe = child.stderr.take().expect("stderr pipe");
        let out_reader = {
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
                    stdout.lock().expect("stdout lock").push(line.clone());
                    let _ = line_tx.send(line);
                }
            })
        };
        let err_reader = {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                    stderr.lock().expect("stderr lock").push(line);
                }
            })
        };
        let (exit_tx, exit) = oneshot::channel();
        let exited = Arc::new(AtomicBool::new(false));
        {
            let exited = exited.clone();
            std::thread::spawn(move || {
                let status = child.wait().expect("wait for llm-gateway");
                exited.store(true, Ordering::Release);
                let _ = out_reader.join();
                let _ = err_reader.join();
                let _ = exit_tx.send(status);
            });
        }
        Self { pid, lines, stdout, stderr, exit: Some(exit), status: None, exited }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with the `kill` command.
    pub(crate) fn signal(&self, name: &str) {
        if !self.send_signal(name) && !self.exited.load(Ordering::Acquire) {
            panic!("kill -{name} {} failed", self.pid);
        }
    }

    fn send_signal(&self, name: &str) -> bool {
        Command::new("kill")
            .args([format!("-{name}"), self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the process to exit, all its output read. Unbounded: wrap it.
    pub(crate) async fn exit(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let exit = self.exit.take().expect("exit() is awaited once at a time");
        let status = exit.await.expect("the waiter thread reports the exit");
        self.status = Some(status);
        status
    }

    /// The next stdout line matching `pred`. Unbounded: wrap it.
    pub(crate) async fn line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        loop {
            match self.lines.recv().await {
                Some(l) if pred(&l) => return l,
                Some(_) => {}
                None => panic!("the process closed stdout first; stderr:\n{}", self.stderr_text()),
            }
        }
    }

    pub(crate) fn stdout_text(&self) -> String {
        self.stdout.lock().expect("stdout lock").join("\n")
    }

    pub(crate) fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr lock").join("\n")
    }
}

/// The gateway binary serving a temp config file.
pub(crate) struct Binary {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTP front door, when the config sets `http_listen`.
    pub http: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Starts the binary on `yaml` (which must not set `listen` or
    /// `admin_listen`) and waits for its `serving` log line.
    pub(crate) async fn start(yaml: &str, envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}"))
            .expect("write the config");
        let mut proc = Proc::spawn(&[OsStr::new("--config"), path.as_os_str()], envs);
        let line = match tokio::time::timeout(WAIT, proc.line(|l| l.contains("\"serving\""))).await {
            Ok(l) => l,
            Err(_) => panic!(
                "no `serving` log line within {WAIT:?}; stdout:\n{}\nstderr:\n{}",
                proc.stdout_text(),
                proc.stderr_text()
            ),
        };
        let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        assert_eq!(log["message"], "serving", "{line}");
        let addr = |key: &str| -> SocketAddr {
            log[key].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no {key} in {line}"))
        };
        let http = log["http_addr"].as_str().and_then(|a| a.parse().ok());
        Self { grpc: addr("grpc_addr"), admin: addr("admin_addr"), http, proc, _dir: dir }
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The config file it serves.
    pub(crate) fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("gateway.yaml")
    }

    /// Replaces its config file with `yaml` (same listen lines as at start)
    /// in one rename.
    pub(crate) fn rewrite_config(&self, yaml: &str) {
        let path = self.config_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{yaml}"))
            .expect("write the config");
        std::fs::rename(&tmp, &path).expect("rename the config");
    }
}

/// Runs `llm-gateway check-config PATH`; returns (exit status, stdout, stderr).
pub(crate) async fn check_config(path: &std::path::Path) -> (ExitStatus, String, String) {
    let mut proc = Proc::spawn(&[OsStr::new("check-config"), path.as_os_str()], &[]);
    let status = within(WAIT, "check-config to exit", proc.exit()).await;
    (status, proc.stdout_text(), proc.stderr_text())
}
