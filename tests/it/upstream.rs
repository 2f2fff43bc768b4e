//! A scriptable fake LLM upstream on 127.0.0.1:0, speaking raw HTTP/1.1 so that
//! every byte is the test's: each scripted chunk leaves as one chunked-encoding
//! chunk. It records each request, and notices when the gateway closes the
//! connection before a response has ended (the signal that a call was aborted).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::WriteHalf},
    sync::watch,
    task::{JoinHandle, JoinSet},
};

/// One step of a streamed (chunked) response body.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// Sends these bytes as one chunk (an empty one is skipped: it would end the body).
    Send(Bytes),
    /// Pauses the script.
    Sleep(Duration),
    /// Stops without the terminating chunk and closes the connection (FIN).
    Close,
    /// Closes the connection with a TCP reset.
    Reset,
    /// Sends nothing more, ever; only the gateway closing the connection ends it.
    Hang,
    /// Ends the body (the terminating chunk) and closes the connection
    /// without announcing it, as an upstream's idle timeout does.
    EndAndClose,
}

impl Step {
    pub(crate) fn send(bytes: impl Into<Bytes>) -> Self {
        Step::Send(bytes.into())
    }

    pub(crate) fn sleep_ms(ms: u64) -> Self {
        Step::Sleep(Duration::from_millis(ms))
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Body {
    /// Sent whole, with a content-length.
    Full(Bytes),
    /// Sent with chunked transfer encoding, one chunk per [`Step::Send`].
    Chunked(Vec<Step>),
}

/// What the upstream does with one request.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    /// Reads the request and never answers, not even a status line.
    Hang,
    /// Closes the connection without answering.
    Close,
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Body,
    },
}

impl Reply {
    /// A 200 `text/event-stream` response streaming `steps`.
    pub(crate) fn sse(steps: Vec<Step>) -> Self {
        Reply::Response {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: Body::Chunked(steps),
        }
    }

    /// A 200 SSE response sending each event as one chunk, back to back.
    pub(crate) fn events<S: AsRef<str>>(events: &[S]) -> Self {
        Self::sse(events.iter().map(|e| Step::send(e.as_ref().to_owned())).collect())
    }

    /// A JSON response (an error body, usually) sent whole.
    pub(crate) fn json(status: u16, body: &serde_json::Value) -> Self {
        Reply::Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Body::Full(Bytes::from(body.to_string())),
        }
    }

    /// OpenAI's (and most compatible APIs') error shape.
    pub(crate) fn error(status: u16, message: &str) -> Self {
        Self::json(
            status,
            &serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": null}}),
        )
    }

    /// Any status, headers and body.
    pub(crate) fn raw(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Reply::Response {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: Body::Full(body.into()),
        }
    }

    pub(crate) fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Reply::Response { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Which TCP connection (0, 1, …) carried it.
    pub conn: usize,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("upstream request body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        })
    }
}

/// How the response to one request ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// Still being answered (or hanging).
    Open,
    /// The whole response was written.
    Finished(Instant),
    /// The script itself closed or reset the connection.
    EndedByScript,
    /// The gateway closed the connection (or reset it) before the response ended.
    PeerClosed(Instant),
}

#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    pub request: Request,
    pub outcome: Outcome,
}

type Handler = Arc<dyn Fn(usize, &Request) -> Reply + Send + Sync>;

/// The fake upstream. Dropping it stops the server and closes its connections.
pub(crate) struct Upstream {
    addr: SocketAddr,
    state: Arc<watch::Sender<Vec<Exchange>>>,
    server: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Upstream {
    /// Answers every request with `reply`.
    pub(crate) async fn start(reply: Reply) -> Self {
        Self::with(move |_, _| reply.clone()).await
    }

    /// Answers request number `i` (0-based, over all connections) with `f(i, request)`.
    pub(crate) async fn with(f: impl Fn(usize, &Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fake upstream");
        let addr = listener.local_addr().expect("fake upstream address");
        let state = Arc::new(watch::Sender::new(Vec::new()));
        let handler: Handler = Arc::new(f);
        let server = tokio::spawn(accept(listener, handler, state.clone()));
        Self { addr, state, server }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to put in a provider's `base_url`.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub(crate) fn exchanges(&self) -> Vec<Exchange> {
        self.state.borrow().clone()
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        self.state.borrow().iter().map(|e| e.request.clone()).collect()
    }

    /// Waits for request number `i` to arrive. Unbounded: wrap it in a timeout.
    pub(crate) async fn request(&self, i: usize) -> Request {
        let mut rx = self.state.subscribe();
        let seen = rx.wait_for(|ex| ex.len() > i).await.expect("the upstream state lives as long as self");
        seen[i].request.clone()
    }

    /// Waits until the gateway closes a connection in the middle of a response,
    /// and returns when the upstream noticed. Unbounded: wrap it in a timeout.
    pub(crate) async fn closed(&self) -> Instant {
        let mut rx = self.state.subscribe();
        let seen = rx
            .wait_for(|ex| ex.iter().any(|e| matches!(e.outcome, Outcome::PeerClosed(_))))
            .await
            .expect("the upstream state lives as long as self");
        seen.iter()
            .find_map(|e| match e.outcome {
                Outcome::PeerClosed(at) => Some(at),
                _ => None,
            })
            .expect("a closed exchange was just seen")
    }

    /// Waits until response number `i` has been written in full.
    pub(crate) async fn finished(&self, i: usize) -> Instant {
        let mut rx = self.state.subscribe();
        let seen = rx
            .wait_for(|ex| ex.get(i).is_some_and(|e| matches!(e.outcome, Outcome::Finished(_))))
            .await
            .expect("the upstream state lives as long as self");
        match seen[i].outcome {
            Outcome::Finished(at) => at,
            _ => unreachable!("waited for Finished"),
        }
    }

    /// True when no response so far was cut short by the gateway.
    pub(crate) fn none_closed_early(&self) -> bool {
        !self.state.borrow().iter().any(|e| matches!(e.outcome, Outcome::PeerClosed(_)))
    }
}

async fn accept(listener: TcpListener, handler: Handler, state: Arc<watch::Sender<Vec<Exchange>>>) {
    // Dropped (and so aborted) with this task when the upstream is dropped.
    let mut conns = JoinSet::new();
    let mut next = 0usize;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                conns.spawn(serve_conn(stream, next, handler.clone(), state.clone()));
                next += 1;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

enum End {
    Finished,
    /// Finished, then closed by the script.
    FinishedClose,
    Close,
    Reset,
    Peer(Instant),
}

async fn serve_conn(
    mut stream: TcpStream,
    conn: usize,
    handler: Handler,
    state: Arc<watch::Sender<Vec<Exchange>>>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    // Keep-alive: one request after another until the gateway closes.
    while let Some(request) = read_request(&mut stream, &mut buf, conn).await {
        let mut index = 0;
        state.send_modify(|ex| {
            index = ex.len();
            ex.push(Exchange { request: request.clone(), outcome: Outcome::Open });
        });
        let reply = handler(index, &request);
        let end = respond(&mut stream, reply).await;
        if matches!(end, End::FinishedClose) {
            // Closed before the exchange shows as finished, so a test that
            // waits for the end has the close behind it too.
            let _ = stream.shutdown().await;
        }
        let outcome = match end {
            End::Finished | End::FinishedClose => Outcome::Finished(Instant::now()),
            End::Close | End::Reset => Outcome::EndedByScript,
            End::Peer(at) => Outcome::PeerClosed(at),
        };
        state.send_modify(|ex| ex[index].outcome = outcome);
        match end {
            End::Finished => {}
            End::Close | End::FinishedClose => {
                let _ = stream.shutdown().await;
                return;
            }
            End::Reset => {
                let _ = stream.set_zero_linger();
                return;
            }
            End::Peer(_) => return,
        }
    }
}

/// Reads one request (head and content-length body); None when the
/// connection closes between requests.
async fn read_request(stream: &mut TcpStream, buf: &mut BytesMut, conn: usize) -> Option<Request> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut first = lines.next()?.split(' ');
            let method = first.next()?.to_owned();
            let path = first.next()?.to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                if stream.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            buf.advance(end + 4);
            let body = buf.split_to(len).freeze();
            return Some(Request { method, path, headers, body, conn });
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// Writes the reply while watching the read side: a gateway that closes the
/// connection mid-response is seen at once, even while the script sleeps.
async fn respond(stream: &mut TcpStream, reply: Reply) -> End {
    let (mut rd, mut wr) = stream.split();
    let peer_gone = async move {
        let mut scratch = [0u8; 1024];
        loop {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => return Instant::now(),
                // A client sends nothing while it waits for a response.
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        at = peer_gone => End::Peer(at),
        end = write_reply(&mut wr, reply) => end,
    }
}

async fn write_reply(wr: &mut WriteHalf<'_>, reply: Reply) -> End {
    let (status, headers, body) = match reply {
        Reply::Hang => std::future::pending().await,
        Reply::Close => return End::Close,
        Reply::Response { status, headers, body } => (status, headers, body),
    };
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in &headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match &body {
        Body::Full(b) => head.push_str(&format!("content-length: {}\r\n\r\n", b.len())),
        Body::Chunked(_) => head.push_str("transfer-encoding: chunked\r\n\r\n"),
    }
    if wr.write_all(head.as_bytes()).await.is_err() {
        return End::Peer(Instant::now());
    }
    let steps = match body {
        Body::Full(b) => {
            return if wr.write_all(&b).await.is_ok() { End::Finished } else { End::Peer(Instant::now()) };
        }
        Body::Chunked(steps) => steps,
    };
    for step in steps {
        match step {
            Step::Send(b) if b.is_empty() => {}
            Step::Send(b) => {
                let mut chunk = Vec::with_capacity(b.len() + 16);
                chunk.extend_from_slice(format!("{:x}\r\n", b.len()).as_bytes());
                chunk.extend_from_slice(&b);
                chunk.extend_from_slice(b"\r\n");
                if wr.write_all(&chunk).await.is_err() {
                    return End::Peer(Instant::now());
                }
            }
            Step::Sleep(d) => tokio::time::sleep(d).await,
            Step::Close => return End::Close,
            Step::Reset => return End::Reset,
            Step::Hang => std::future::pending().await,
            Step::EndAndClose => {
                return if wr.write_all(b"0\r\n\r\n").await.is_ok() {
                    End::FinishedClose
                } else {
                    End::Peer(Instant::now())
                };
            }
        }
    }
    if wr.write_all(b"0\r\n\r\n").await.is_err() {
        return End::Peer(Instant::now());
    }
    End::Finished
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        529 => "Overloaded",
        _ => "Status",
    }
}

/// Splits `text` into chunks whose sizes cycle through `sizes`, cutting
/// anywhere: inside `data:`, inside a JSON string, inside a UTF-8 character.
pub(crate) fn split_bytes(text: &str, sizes: &[usize]) -> Vec<Step> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = sizes[i % sizes.len()].max(1).min(bytes.len() - at);
        out.push(Step::Send(Bytes::copy_from_slice(&bytes[at..at + n])));
        at += n;
        i += 1;
    }
    out
}

/// A closed port: connecting to it is refused.
pub(crate) async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}/v1")
}

/// The fake upstream itself, checked with a plain HTTP client: the tests
/// above rely on what it records.
mod self_test {
    use super::*;
    use crate::harness::{WAIT, http, within};

    async fn post(up: &Upstream) -> reqwest::Response {
        post_with(&http(), up).await
    }

    async fn post_with(client: &reqwest::Client, up: &Upstream) -> reqwest::Response {
        let send = client
            .post(format!("{}/chat/completions", up.base_url()))
            .header("x-test", "yes")
            .json(&serde_json::json!({"model": "m", "n": 1}))
            .send();
        within(WAIT, "the response headers", send).await.expect("a response")
    }

    #[tokio::test]
    async fn records_requests_and_sends_chunks_byte_exact() {
        let up = Upstream::start(Reply::sse(vec![
            Step::send("data: a"),
            Step::sleep_ms(20),
            Step::send("b\r\n\r\n"),
            Step::send(""),
            Step::send("data: [DONE]\n\n"),
        ]))
        .await;
        let client = http();
        let mut response = post_with(&client, &up).await;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let first = within(WAIT, "a chunk", response.chunk()).await.expect("ok").expect("a chunk");
        assert_eq!(&first[..], b"data: a", "the first chunk alone, paced apart from the next");
        let mut rest = Vec::new();
        while let Some(c) = within(WAIT, "a chunk", response.chunk()).await.expect("ok") {
            rest.extend_from_slice(&c);
        }
        assert_eq!(rest, b"b\r\n\r\ndata: [DONE]\n\n");
        within(WAIT, "the exchange to finish", up.finished(0)).await;
        assert!(up.none_closed_early());

        let r = &up.requests()[0];
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/chat/completions"));
        assert_eq!(r.header("X-Test"), Some("yes"));
        assert_eq!(r.json(), serde_json::json!({"model": "m", "n": 1}));

        // Keep-alive: the next request comes on the same connection.
        drop(response);
        let response = post_with(&client, &up).await;
        within(WAIT, "the body", response.bytes()).await.expect("body");
        let requests = up.requests();
        assert_eq!(requests[1].conn, requests[0].conn, "the pooled connection is reused");
    }

    #[tokio::test]
    async fn sees_a_body_dropped_midway() {
        let up = Upstream::start(Reply::sse(vec![
            Step::send("data: 1\n\n"),
            Step::Sleep(Duration::from_secs(60)),
        ]))
        .await;
        let mut response = post(&up).await;
        within(WAIT, "a chunk", response.chunk()).await.expect("ok").expect("a chunk");
        assert!(matches!(up.exchanges()[0].outcome, Outcome::Open));
        let dropped = Instant::now();
        drop(response);
        let closed = within(WAIT, "the close", up.closed()).await;
        assert!(closed.duration_since(dropped) < Duration::from_secs(1));
        assert!(matches!(up.exchanges()[0].outcome, Outcome::PeerClosed(_)));
        assert!(!up.none_closed_early());
    }

    #[tokio::test]
    async fn sees_a_request_abandoned_before_any_answer() {
        let up = Upstream::start(Reply::Hang).await;
        tokio::select! {
            _ = post(&up) => panic!("a hanging upstream answered"),
            _ = up.request(0) => {}
        }
        within(WAIT, "the close", up.closed()).await;
    }

    #[tokio::test]
    async fn close_and_reset_break_the_body() {
        for step in [Step::Close, Step::Reset] {
            let up = Upstream::start(Reply::sse(vec![Step::send("data: 1\n\n"), step.clone()])).await;
            let mut response = post(&up).await;
            let mut broke = false;
            loop {
                match within(WAIT, "a chunk", response.chunk()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        broke = true;
                        break;
                    }
                }
            }
            assert!(broke, "{step:?}: the client sees a broken body, not a clean end");
            assert!(matches!(up.exchanges()[0].outcome, Outcome::EndedByScript), "{step:?}");
        }
    }
}

/// A first delta, then a minute of silence before the end: an upstream that
/// only a closed connection can stop early.
pub(crate) fn slow_reply() -> Reply {
    use crate::wire::openai;
    Reply::sse(vec![
        Step::send(openai::role("c", "gpt-slow")),
        Step::send(openai::content("c", "gpt-slow", "first")),
        Step::Sleep(Duration::from_secs(60)),
        Step::send(openai::finish("c", "gpt-slow", "stop")),
        Step::send(openai::DONE),
    ])
}
