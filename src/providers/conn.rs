//! Keep-alive HTTP/1.1 connections to a plain-HTTP upstream reached directly
//! (an in-cluster model server, a local proxy), each driven by the task that
//! reads its answer.
//!
//! Why not reqwest's pool here: its connection runs as a task of its own and
//! hands the body over one chunk per wake-up, so every SSE event of a stream
//! costs a hop between two tasks, and each delta leaves the gateway in an
//! HTTP/2 frame of its own. Driven from the reader's task, the events that
//! arrived together are decoded in one poll and leave together. TLS
//! upstreams and proxies stay on reqwest, which negotiates HTTP/2 and proxies.
//!
//! Dropping an [`Answer`] before its end closes the connection: the upstream
//! sees the close. A finished answer returns its connection to the pool.

use std::{
    future::Future,
    pin::{Pin, pin},
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::http1::{self, Connection, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Sleep};

use super::{ProviderError, http::error_chain};

/// How long an unused connection is kept (reqwest's figure before).
const IDLE_FOR: Duration = Duration::from_secs(90);

type Io = TokioIo<TcpStream>;

/// A connection and the handle that sends requests on it.
struct Live {
    sender: SendRequest<reqwest::Body>,
    conn: Connection<Io, reqwest::Body>,
}

/// The idle connections to one upstream (`host:port`).
pub(crate) struct Pool {
    host: String,
    port: u16,
    /// The `Host` header every request carries.
    authority: http::HeaderValue,
    idle: Mutex<Vec<(Live, Instant)>>,
    max_idle: usize,
    connect_timeout: Duration,
    read_timeout: Duration,
}

/// Why an answer's body broke off.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("{0}")]
    Transport(#[from] hyper::Error),
    #[error("no data from the upstream for {0:?} (timeouts.read)")]
    ReadTimeout(Duration),
}

impl Pool {
    /// A pool for `url`'s host, or None when `url` is not plain HTTP.
    pub(crate) fn new(
        url: &reqwest::Url,
        max_idle: usize,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Option<Arc<Self>> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?.to_owned();
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let authority = http::HeaderValue::from_str(&authority).ok()?;
        // A bracketed IPv6 literal is how the URL writes it, not how a
        // socket address is resolved.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        Some(Arc::new(Self {
            host,
            port,
            authority,
            idle: Mutex::new(Vec::new()),
            max_idle,
            connect_timeout,
            read_timeout,
        }))
    }

    /// Whether `url` is served by this pool (same scheme, host and port).
    pub(crate) fn serves(&self, url: &reqwest::Url) -> bool {
        url.scheme() == "http"
            && url.port_or_known_default() == Some(self.port)
            && url.host_str().map(|h| h.trim_start_matches('[').trim_end_matches(']')) == Some(&*self.host)
    }

    /// Sends `request` on an idle connection, or a new one, and returns the
    /// answer once its head has arrived. A request that an idle connection
    /// could not take (the upstream closed it meanwhile) is sent again on a
    /// new connection; one already written is never sent twice.
    pub(crate) async fn send(
        self: &Arc<Self>,
        request: reqwest::Request,
    ) -> Result<http::Response<Answer>, ProviderError> {
        let mut request = self.to_http(request)?;
        loop {
            let (live, reused) = match self.take() {
                Some(live) => (live, true),
                None => (self.connect().await?, false),
            };
            match exchange(live, request, self.read_timeout).await {
                Ok((head, live)) => {
                    return Ok(head.map(|body| Answer {
                        body,
                        live,
                        pool: Arc::downgrade(self),
                        read_timeout: self.read_timeout,
                        last_data: Instant::now(),
                        timer: None,
                    }));
                }
                Err(Failed::NotSent(again, _)) if reused => request = *again,
                Err(Failed::NotSent(_, e) | Failed::Sent(e)) => return Err(ProviderError::Connect(e)),
                // As reqwest's read timeout reported it.
                Err(Failed::Timeout) => return Err(ProviderError::Connect("timed out".into())),
            }
        }
    }

    /// reqwest's request as hyper's: origin-form target, `Host`, the user agent
    /// reqwest's client would have added.
    fn to_http(&self, request: reqwest::Request) -> Result<http::Request<reqwest::Body>, ProviderError> {
        let target = match request.url().query() {
            Some(q) => format!("{}?{q}", request.url().path()),
            None => request.url().path().to_owned(),
        };
        let mut out = http::Request::try_from(request)
            .map_err(|e| ProviderError::Setup(format!("request: {}", e.without_url())))?;
        *out.uri_mut() =
            target.parse().map_err(|e| ProviderError::Setup(format!("request path {target:?}: {e}")))?;
        let headers = out.headers_mut();
        headers.insert(http::header::HOST, self.authority.clone());
        headers
            .entry(http::header::USER_AGENT)
            .or_insert(http::HeaderValue::from_static(concat!("llm-gateway/", env!("CARGO_PKG_VERSION"))));
        headers.entry(http::header::ACCEPT).or_insert(http::HeaderValue::from_static("*/*"));
        Ok(out)
    }

    /// The most recently used idle connection still open, if any.
    fn take(&self) -> Option<Live> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        expire(&mut idle);
        while let Some((live, _)) = idle.pop() {
            if !live.sender.is_closed() {
                return Some(live);
            }
        }
        None
    }

    fn put(&self, live: Live) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        expire(&mut idle);
        if idle.len() < self.max_idle {
            idle.push((live, Instant::now()));
        }
    }

    /// Connects to the first address that answers, each address getting
    /// its share of what is left of `timeouts.connect`.
    async fn connect(&self) -> Result<Live, ProviderError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let resolve = tokio::net::lookup_host((self.host.as_str(), self.port));
        let addrs: Vec<_> = match tokio::time::timeout_at(deadline, resolve).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Err(ProviderError::Connect(error_chain(&e))),
            Err(_) => return Err(ProviderError::Connect("timed out".into())),
        };
        let mut last = format!("{} resolves to no address", self.host);
        for (i, addr) in addrs.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return handshake(stream).await,
                Ok(Err(e)) => last = error_chain(&e),
                Err(_) => last = "timed out".into(),
            }
        }
        Err(ProviderError::Connect(last))
    }
}

/// Drops the connections idle for [`IDLE_FOR`] or more: the oldest, at the
/// front (they are pushed in the order they came back).
fn expire(idle: &mut Vec<(Live, Instant)>) {
    let old = idle.partition_point(|(_, since)| since.elapsed() >= IDLE_FOR);
    idle.drain(..old);
}

async fn handshake(stream: TcpStream) -> Result<Live, ProviderError> {
    // Each token is a small write: never hold one back for the next.
    let _ = stream.set_nodelay(true);
    // reqwest's keep-alive probes: a connection lost to a NAT timeout or a
    // vanished pod fails at once in the pool, not after `timeouts.read`.
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(15))
        .with_interval(Duration::from_secs(15))
        .with_retries(3);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&probes);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProviderError::Connect(error_chain(&e)))?;
    Ok(Live { sender, conn })
}

enum Failed {
    /// The connection could not take the request: here it is back.
    NotSent(Box<http::Request<reqwest::Body>>, String),
    Sent(String),
    Timeout,
}

/// Sends `request` on `live` and waits for the answer's head, driving the
/// connection meanwhile: nothing else does. Gives the connection back with
/// the head, unless it has ended.
async fn exchange(
    live: Live,
    request: http::Request<reqwest::Body>,
    read_timeout: Duration,
) -> Result<(http::Response<Incoming>, Option<Live>), Failed> {
    let Live { mut sender, conn } = live;
    let mut conn = Some(conn);
    // The connection first: an idle one reads the close the upstream sent
    // meanwhile, and a new one says it is ready for a request. One that is
    // still writing an earlier request's body, to an upstream that stopped
    // reading, is given up after `timeouts.read`.
    let ready = std::future::poll_fn(|cx| match conn.as_mut().map(|c| Pin::new(c).poll(cx)) {
        Some(Poll::Ready(Ok(()))) | None => Poll::Ready(Err("the upstream closed the connection".to_owned())),
        Some(Poll::Ready(Err(e))) => Poll::Ready(Err(error_chain(&e))),
        Some(Poll::Pending) => sender.poll_ready(cx).map_err(|e| error_chain(&e)),
    });
    match tokio::time::timeout(read_timeout, ready).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failed::NotSent(Box::new(request), e)),
        Err(_) => return Err(Failed::NotSent(Box::new(request), "timed out".into())),
    }
    let head = {
        let mut answer = pin!(sender.try_send_request(request));
        let head = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if let Some(c) = &mut conn
                && Pin::new(c).poll(cx).is_ready()
            {
                // The dispatcher ended. Dropping it hands back a request it
                // never wrote; the answer resolves with its reason either way.
                conn = None;
                return answer.as_mut().poll(cx);
            }
            Poll::Pending
        });
        tokio::time::timeout(read_timeout, head).await
    };
    match head {
        // A connection that ended with the head delivered has put its whole
        // answer in the body already: nothing is left to drive.
        Ok(Ok(head)) => Ok((head, conn.map(|conn| Live { sender, conn }))),
        Ok(Err(mut e)) => match e.take_message() {
            Some(request) => Err(Failed::NotSent(Box::new(request), error_chain(&e.into_error()))),
            None => Err(Failed::Sent(error_chain(&e.into_error()))),
        },
        Err(_) => Err(Failed::Timeout),
    }
}

/// An answer's body, read by driving its connection from the reader's task.
pub(crate) struct Answer {
    body: Incoming,
    /// None once the connection ended, or the body ended (the connection
    /// went back to the pool) or broke.
    live: Option<Live>,
    pool: Weak<Pool>,
    read_timeout: Duration,
    last_data: Instant,
    /// Armed while the body waits, re-armed from `last_data` when it fires
    /// early: one timer per quiet spell instead of one per chunk.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Answer {
    /// The body ended: its connection goes back to the pool unless the
    /// upstream is closing it or it is still busy with the request (an
    /// upstream that answered before reading a whole prompt).
    fn finish(&mut self, cx: &mut Context<'_>) {
        let Some(mut live) = self.live.take() else {
            return;
        };
        // One more turn lets the dispatcher see the end of the message (and
        // a `Connection: close`).
        if Pin::new(&mut live.conn).poll(cx).is_ready() || !live.sender.is_ready() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.put(live);
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.last_data = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.live = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish(cx);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Pending until `timeouts.read` has passed with no data. The timer is
    /// re-armed from `last_data` only when it fires, not on every chunk.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let (last, wait) = (self.last_data, self.read_timeout);
        let timer =
            self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until((last + wait).into())));
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            let due = self.last_data + self.read_timeout;
            if due <= Instant::now() {
                self.live = None;
                return Poll::Ready(BodyError::ReadTimeout(self.read_timeout));
            }
            timer.as_mut().reset(due.into());
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = this.poll_body(cx) {
            return Poll::Ready(frame);
        }
        // The body's next chunk comes from the connection, which only moves
        // when polled: decode what has arrived, then look again.
        if let Some(live) = &mut this.live
            && Pin::new(&mut live.conn).poll(cx).is_ready()
        {
            // Ended: what it decoded is in the body, with its end or error.
            this.live = None;
        }
        if let Poll::Ready(frame) = this.poll_body(cx) {
            return Poll::Ready(frame);
        }
        match this.poll_quiet(cx) {
            Poll::Ready(e) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not before `finish` has run: a reader that stops at the last byte
        // would drop a connection that could have been pooled.
        self.live.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
