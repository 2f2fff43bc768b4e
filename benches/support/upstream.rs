//! The fake upstream: an HTTP/1.1 server on loopback that answers OpenAI's
//! and Anthropic's streaming APIs from pre-encoded chunks, so that the
//! figures measure the gateway and not the stub. It reads only the request's
//! `model` (which picks the behaviour) and the last message (which may carry a
//! `bench:<id>` tag), and it records when a held stream's connection closes.
//!
//! Models: `fast` writes each token as its own chunk (one write per token, as
//! a model server does), `burst` writes the whole answer at once, `slow`
//! writes the first token and then holds the stream open until the
//! connection closes or the upstream stops, `paced` writes each token
//! [`PACE`] after the one before (a model server's pace, so that a burst of
//! calls finds the cores far from busy).
//!
//! Faults, for the soak: `fail500` answers HTTP 500, `reset` writes three
//! tokens and then breaks the connection off mid-stream (no end chunk),
//! `hang` sends its headers and then nothing until the connection closes.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::TcpSocket, sync::oneshot};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

use super::BoxError;

/// Largest request body read; ours are a few hundred bytes.
const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Listen backlog: thousands of streams open in bursts.
const BACKLOG: u32 = 4096;
/// Token texts, cycled; short words like a real tokenizer's.
const WORDS: [&str; 10] =
    ["lorem ", "ipsum ", "dolor ", "sit ", "amet ", "con", "sectetur ", "adi", "piscing ", "elit "];

/// Time between the tokens of the `paced` model.
pub const PACE: Duration = Duration::from_millis(10);

/// What the upstream saw; read by the bench to check and to time.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    pub completed: AtomicU64,
    /// Streams whose connection closed before their end.
    pub aborted: AtomicU64,
    /// Slow streams currently held open.
    pub held: AtomicI64,
    /// Response bodies alive (streams being written or held), and
    /// connections open: what a soak must find back at zero and at the
    /// gateway's idle pool.
    pub streams_open: AtomicI64,
    pub connections_open: AtomicI64,
    /// Tagged requests whose close someone waits for.
    close_waiters: Mutex<HashMap<u64, oneshot::Sender<Instant>>>,
}

impl Stats {
    /// Resolves with the instant the upstream saw the stream tagged `id`
    /// closed before its end. Register before sending the request.
    pub fn watch_close(&self, id: u64) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.close_waiters.lock() {
            w.insert(id, tx);
        }
        rx
    }

    fn closed(&self, id: u64, at: Instant) {
        let waiter = self.close_waiters.lock().ok().and_then(|mut w| w.remove(&id));
        if let Some(tx) = waiter {
            let _ = tx.send(at);
        }
    }
}

/// The pre-encoded answers of one wire format.
struct Script {
    /// One entry per write: the first token is in the first chunk.
    chunks: Arc<[Bytes]>,
    /// All chunks in one.
    whole: Arc<[Bytes]>,
}

impl Script {
    fn new(chunks: Vec<Bytes>) -> Self {
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        Self { chunks: chunks.into(), whole: Arc::from([Bytes::from(whole)]) }
    }
}

struct Shared {
    stats: Arc<Stats>,
    openai: Script,
    anthropic: Script,
    release: CancellationToken,
}

/// A running fake upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    release: CancellationToken,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.release.cancel();
        self.stop.cancel();
        self.accept.abort();
    }
}

/// Binds 127.0.0.1:0 and serves on the current runtime.
pub async fn start(tokens: usize) -> Result<Upstream, BoxError> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(BACKLOG)?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let release = CancellationToken::new();
    let shared = Arc::new(Shared {
        stats: stats.clone(),
        openai: Script::new(openai_chunks(tokens)),
        anthropic: Script::new(anthropic_chunks(tokens)),
        release: release.clone(),
    });
    let tracker = TaskTracker::new();
    let accept_stop = stop.clone();
    let accept = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = accept_stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else {
                // Out of descriptors: let streams close before accepting more.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                continue;
            };
            // Without it each token would wait for the peer's delayed ACK.
            let _ = stream.set_nodelay(true);
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            shared.stats.connections_open.fetch_add(1, Ordering::Relaxed);
            let shared = shared.clone();
            let stop = accept_stop.clone();
            tracker.spawn(async move {
                let stats = shared.stats.clone();
                let service = service_fn(move |req| handle(req, shared.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
                stats.connections_open.fetch_sub(1, Ordering::Relaxed);
            });
        }
        tracker.close();
    });
    Ok(Upstream { addr, stats, stop, release, accept })
}

#[derive(Deserialize)]
struct WireRequest {
    model: String,
    #[serde(default)]
    messages: Vec<WireMessage>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: serde_json::Value,
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<SseBody>, Infallible> {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path();
    let script = if path.ends_with("/chat/completions") {
        &shared.openai
    } else if path.ends_with("/messages") {
        &shared.anthropic
    } else {
        return Ok(error(StatusCode::NOT_FOUND, "no such path"));
    };
    let Some(body) = read_body(req.into_body()).await else {
        return Ok(error(StatusCode::BAD_REQUEST, "unreadable body"));
    };
    let Ok(request) = serde_json::from_slice::<WireRequest>(&body) else {
        return Ok(error(StatusCode::BAD_REQUEST, "invalid JSON"));
    };
    let tag = request
        .messages
        .last()
        .and_then(|m| m.content.as_str())
        .and_then(|c| c.strip_prefix("bench:"))
        .and_then(|id| id.parse::<u64>().ok());
    let body = match request.model.as_str() {
        "fast" => SseBody::stream(script.chunks.clone(), None, true),
        "burst" => SseBody::stream(script.whole.clone(), None, false),
        "paced" => SseBody::stream(script.chunks.clone(), None, false).paced(PACE),
        "slow" | "hang" => {
            let hold = Hold {
                stats: shared.stats.clone(),
                tag,
                release: Some(Box::pin(shared.release.clone().cancelled_owned())),
                holding: false,
                from: if request.model == "hang" { 0 } else { 1 },
            };
            SseBody::stream(script.chunks.clone(), Some(hold), false)
        }
        "reset" => {
            let mut body = SseBody::stream(script.chunks.clone(), None, true);
            body.reset_at = Some(3);
            body
        }
        // A target that is down hard (the routing scenario).
        "fail503" => return Ok(error(StatusCode::SERVICE_UNAVAILABLE, "down")),
        "fail500" => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, "broken")),
        _ => return Ok(error(StatusCode::NOT_FOUND, "no such model")),
    };
    shared.stats.streams_open.fetch_add(1, Ordering::Relaxed);
    let mut response = Response::new(body.counted(shared.stats.clone()));
    let headers = response.headers_mut();
    headers.insert("content-type", hyper::header::HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", hyper::header::HeaderValue::from_static("no-cache"));
    Ok(response)
}

async fn read_body(mut body: Incoming) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => return Some(out),
            Some(Err(_)) => return None,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > MAX_REQUEST_BODY {
                        return None;
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response<SseBody> {
    let text = serde_json::json!({"error": {"message": message, "type": "bench"}}).to_string();
    let mut response = Response::new(SseBody::stream(Arc::from([Bytes::from(text)]), None, false));
    *response.status_mut() = status;
    response
}

/// Where a slow stream stops: after its first chunk (`from` 1), or before
/// any (`from` 0, a hang).
struct Hold {
    stats: Arc<Stats>,
    tag: Option<u64>,
    release: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    holding: bool,
    from: usize,
}

/// A response body of pre-encoded chunks; counts completed and aborted
/// streams, and times the close of a held one.
pub struct SseBody {
    chunks: Arc<[Bytes]>,
    next: usize,
    /// Return Pending once between chunks, so hyper flushes each on its own.
    flush_each: bool,
    yielded: bool,
    hold: Option<Hold>,
    /// Break the connection off before this chunk.
    reset_at: Option<usize>,
    stats: Option<Arc<Stats>>,
    /// The wait before each chunk after the first, and the timer of the
    /// current one.
    pace: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SseBody {
    fn stream(chunks: Arc<[Bytes]>, hold: Option<Hold>, flush_each: bool) -> Self {
        Self {
            chunks,
            next: 0,
            flush_each,
            yielded: false,
            hold,
            reset_at: None,
            stats: None,
            pace: None,
            timer: None,
        }
    }

    fn paced(mut self, pace: Duration) -> Self {
        self.pace = Some(pace);
        self
    }

    fn counted(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }
}

impl Body for SseBody {
    type Data = Bytes;
    /// An error makes hyper drop the connection mid-body: the `reset` fault.
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let Some(chunk) = this.chunks.get(this.next).cloned() else {
            return Poll::Ready(None);
        };
        if this.reset_at.is_some_and(|at| this.next >= at) {
            return Poll::Ready(Some(Err(std::io::Error::other("reset fault"))));
        }
        if let Some(hold) = &mut this.hold
            && this.next >= hold.from
            && let Some(release) = &mut hold.release
        {
            if release.as_mut().poll(cx).is_pending() {
                if !hold.holding {
                    hold.holding = true;
                    hold.stats.held.fetch_add(1, Ordering::Relaxed);
                }
                return Poll::Pending;
            }
            hold.release = None;
            if std::mem::take(&mut hold.holding) {
                hold.stats.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if this.next > 0
            && let Some(pace) = this.pace
        {
            let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(pace)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.timer = None;
        }
        if this.next > 0 && this.flush_each && !std::mem::replace(&mut this.yielded, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        this.next += 1;
        if this.next == this.chunks.len()
            && let Some(stats) = &this.stats
        {
            stats.completed.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let at = Instant::now();
        if let Some(stats) = &self.stats {
            stats.streams_open.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(hold) = &self.hold
            && hold.holding
        {
            hold.stats.held.fetch_sub(1, Ordering::Relaxed);
        }
        if self.next < self.chunks.len()
            && let Some(stats) = &self.stats
        {
            stats.aborted.fetch_add(1, Ordering::Relaxed);
            if let Some(tag) = self.hold.as_ref().and_then(|h| h.tag) {
                stats.closed(tag, at);
            }
        }
    }
}

/// OpenAI chunks: the role and first token together, one chunk per further
/// token, then the finish reason, the usage and `[DONE]` in the last write.
fn openai_chunks(tokens: usize) -> Vec<Bytes> {
    let head = r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-bench","#;
    let mut chunks: Vec<Bytes> = (0..tokens)
        .map(|i| {
            let word = WORDS[i % WORDS.len()];
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            Bytes::from(format!(
                "{head}\"choices\":[{{\"index\":0,\"delta\":{{{role}\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
            ))
        })
        .collect();
    chunks.push(Bytes::from(format!(
        "{head}\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n\
         {head}\"choices\":[],\"usage\":{{\"prompt_tokens\":8,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n\
         data: [DONE]\n\n",
        tokens + 8
    )));
    chunks
}

/// Anthropic events: `message_start`, `content_block_start` and the first
/// token together, one `content_block_delta` per further token, then the
/// closing events in the last write.
fn anthropic_chunks(tokens: usize) -> Vec<Bytes> {
    let delta = |i: usize| {
        format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
            WORDS[i % WORDS.len()]
        )
    };
    let mut chunks = Vec::with_capacity(tokens + 1);
    for i in 0..tokens {
        let mut chunk = String::new();
        if i == 0 {
            chunk.push_str(
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_bench\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-bench\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":8,\"output_tokens\":1}}}\n\n\
                 event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            );
        }
        chunk.push_str(&delta(i));
        chunks.push(Bytes::from(chunk));
    }
    chunks.push(Bytes::from(format!(
        "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
         event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{tokens}}}}}\n\n\
         event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
    )));
    chunks
}
