//! The OpenAI-compatible HTTP front door over raw HTTP: the SSE framing byte
//! by byte, headers, every error shape, limits and timeouts on slow clients,
//! HTTP/1.1 keep-alive and h2c, cancellation (asserted on the upstream: it
//! sees its connection close) and the drain.

use std::{net::SocketAddr, time::Instant};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    harness::{CLOSE_BOUND, Gateway, WAIT, config, config_with_model, eventually, http, within},
    upstream::{Reply, Step, Upstream, slow_reply},
    wire::openai,
};

/// [`config`] with the HTTP front door on, and `extra` top-level YAML first.
pub(crate) fn http_config(base_url: &str, extra: &str) -> String {
    format!("http_listen: 127.0.0.1:0\n{extra}{}", config(base_url))
}

pub(crate) async fn http_gateway(base_url: &str) -> Gateway {
    Gateway::start(&http_config(base_url, "")).await
}

pub(crate) fn chat_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// POSTs `body` to /v1/chat/completions; returns status, headers and body text.
pub(crate) async fn post(
    gw: &Gateway,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = http().post(gw.http_url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = within(WAIT, "POST /v1/chat/completions", request.send()).await.expect("HTTP request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = within(WAIT, "the response body", response.text()).await.expect("body");
    (status, headers, text)
}

/// The `data:` payloads of an SSE body, checking the framing on the way:
/// every event is one `data: …` line and a blank line.
pub(crate) fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "the body ends with a whole event: {body:?}");
    body.trim_end_matches("\n\n")
        .split("\n\n")
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data line: {e:?}"));
            assert!(!data.contains('\n'), "one line per event: {e:?}");
            data.to_owned()
        })
        .collect()
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Checks an OpenAI-shaped error body and returns its `error` object.
fn error_of(status: u16, expected: u16, headers: &reqwest::header::HeaderMap, body: &str) -> Value {
    assert_eq!(status, expected, "{body}");
    assert_eq!(header(headers, "content-type"), "application/json");
    assert!(!header(headers, "x-request-id").is_empty(), "errors carry x-request-id too");
    let v: Value = serde_json::from_str(body).expect("a JSON error body");
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string() && e["code"].is_string(), "{body}");
    e
}

fn answer() -> Reply {
    Reply::events(&openai::answer("chatcmpl-h", "gpt-4o-mini-2024", &["Hel", "lo"], "stop", 7, 2))
}

/// Usage as OpenAI shapes it, details included (0 when the provider is silent).
fn usage(prompt: u32, completion: u32, cached: u32, reasoning: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached},
           "completion_tokens_details": {"reasoning_tokens": reasoning}})
}

/// A reasoning model's answer: reasoning deltas first (DeepSeek's shape),
/// then the text, and usage with cached and reasoning tokens.
fn reasoning_answer() -> Reply {
    let chunk = |delta: Value, finish: Value| {
        openai::data(
            &json!({"id": "r1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-r",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
        )
    };
    Reply::events(&[
        chunk(json!({"role": "assistant", "content": null, "reasoning_content": "Think"}), Value::Null),
        chunk(json!({"reasoning_content": "ing."}), Value::Null),
        chunk(json!({"content": "Yes."}), Value::Null),
        chunk(json!({}), json!("stop")),
        openai::data(
            &json!({"id": "r1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-r",
            "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 16}, "completion_tokens_details": {"reasoning_tokens": 7}}}),
        ),
        openai::DONE.to_owned(),
    ])
}

#[tokio::test]
async fn reasoning_and_token_details_in_openai_shape() {
    let up = Upstream::start(reasoning_answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let (status, _, body) = post(&gw, &chat_body("chat", false), &[]).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["choices"][0]["message"]["content"], "Yes.");
    assert_eq!(v["choices"][0]["message"]["reasoning_content"], "Thinking.");
    assert_eq!(v["usage"], usage(20, 9, 16, 7));

    let mut streamed = chat_body("chat", true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, _, text) = post(&gw, &streamed, &[]).await;
    let chunks: Vec<Value> = sse_events(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    let deltas: Vec<&Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["delta"]).collect();
    let reasoning: String = deltas.iter().filter_map(|d| d["reasoning_content"].as_str()).collect();
    let content: String = deltas.iter().filter_map(|d| d["content"].as_str()).collect();
    assert_eq!((reasoning.as_str(), content.as_str()), ("Thinking.", "Yes."), "{text}");
    assert_eq!(chunks.last().map(|c| &c["usage"]), Some(&usage(20, 9, 16, 7)));
}

#[tokio::test]
async fn unary_answer_in_openai_shape_with_headers() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let (status, headers, body) = post(&gw, &chat_body("chat", false), &[("x-request-id", "h-1")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-request-id"), "h-1");
    assert_eq!(header(&headers, "x-llm-provider"), "oa");
    assert_eq!(header(&headers, "x-llm-model"), "gpt-4o-mini-2024");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["id"], "chatcmpl-h");
    assert_eq!(v["model"], "gpt-4o-mini-2024");
    assert!(v["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": "Hello", "refusal": null}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"], usage(7, 2, 0, 0));

    // The upstream got the translated request, streamed, with a traceparent.
    let sent = up.requests()[0].json();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "hi"}]));
    assert!(up.requests()[0].header("traceparent").is_some());
}

#[tokio::test]
async fn a_generated_request_id_and_the_callers_trace() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (status, headers, _) = post(&gw, &chat_body("chat", true), &[("traceparent", &parent)]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-request-id").len(), 32, "a generated id");
    let (sent_trace, _) =
        crate::harness::parse_traceparent(up.requests()[0].header("traceparent").expect("traceparent"));
    assert_eq!(sent_trace, trace, "the upstream request is in the caller's trace");
}

#[tokio::test]
async fn stream_framing_with_usage_then_done() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let mut body = chat_body("chat", true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, headers, text) = post(&gw, &body, &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(header(&headers, "content-type"), "text/event-stream");
    assert_eq!(header(&headers, "x-llm-model"), "gpt-4o-mini-2024");
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("a JSON chunk")).collect();
    assert_eq!(chunks.len(), 4, "Hel, lo, the finish, the usage: {text}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], "chatcmpl-h");
        assert_eq!(c["model"], "gpt-4o-mini-2024");
        assert!(c.as_object().expect("object").contains_key("usage"), "usage (null) on every chunk: {c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": "Hel"}));
    assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "lo"}));
    assert_eq!(chunks[0]["usage"], Value::Null);
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"], usage(7, 2, 0, 0));

    // Without include_usage: no usage anywhere.
    let (_, _, text) = post(&gw, &chat_body("chat", true), &[]).await;
    let events = sse_events(&text);
    assert_eq!(events.len(), 4, "Hel, lo, the finish, [DONE]: {text}");
    assert!(events.iter().all(|e| !e.contains("usage")), "{text}");
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let up = Upstream::start(Reply::error(429, "slow down").with_header("retry-after", "7")).await;
    let yaml = http_config(&up.base_url(), "server:\n  max_request_bytes: 2048\n");
    let gw = Gateway::start(&yaml).await;

    let mut bad = chat_body("lorem", false);
    bad["temperature"] = json!(5);
    let (s, h, b) = post(&gw, &bad, &[]).await;
    let e = error_of(s, 400, &h, &b);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["param"].as_str()),
        (Some("invalid_request_error"), Some("invalid_request"), Some("temperature"))
    );

    let mut unknown = chat_body("lorem", false);
    unknown["top_k"] = json!(5);
    let (s, h, b) = post(&gw, &unknown, &[]).await;
    assert_eq!(error_of(s, 400, &h, &b)["param"], "top_k", "an unsupported field is refused by name");

    let (s, h, b) = post(&gw, &chat_body("no-such-model", false), &[]).await;
    assert_eq!(error_of(s, 404, &h, &b)["code"], "model_not_found");

    let (s, h, b) = post(&gw, &chat_body("down", false), &[]).await;
    let e = error_of(s, 503, &h, &b);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("server_error"), Some("upstream_unavailable"))
    );

    // The upstream's Retry-After reaches the caller.
    let (s, h, b) = post(&gw, &chat_body("chat", false), &[]).await;
    error_of(s, 503, &h, &b);
    assert_eq!(header(&h, "retry-after"), "7");
    assert_eq!(header(&h, "retry-after-ms"), "7000");

    let (s, h, b) = post(&gw, &chat_body("refused", false), &[]).await;
    assert_eq!(error_of(s, 400, &h, &b)["code"], "upstream_rejected");

    let mut big = chat_body("lorem", false);
    big["messages"][0]["content"] = json!("x".repeat(4096));
    let (s, h, b) = post(&gw, &big, &[]).await;
    assert_eq!(error_of(s, 413, &h, &b)["code"], "request_too_large");

    let r = within(
        WAIT,
        "a POST that is not JSON",
        http().post(gw.http_url("/v1/chat/completions")).body("{nope").send(),
    )
    .await
    .expect("response");
    let h = r.headers().clone();
    let b = r.text().await.expect("body");
    assert_eq!(error_of(400, 400, &h, &b)["param"], "body");

    for (method, path, status) in [("GET", "/v1/chat/completions", 405), ("POST", "/v1/embeddings", 404)] {
        let r = within(WAIT, path, http().request(method.parse().expect("method"), gw.http_url(path)).send())
            .await
            .expect("response");
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let v: Value = r.json().await.expect("a JSON error");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
}

#[tokio::test]
async fn keys_and_model_lists() {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(b"k-chat"));
    let keys = format!("api_keys:\n  - {{ name: a, key_sha256: \"{digest}\", models: [chat, lorem] }}\n");
    let gw = Gateway::start(&http_config("http://127.0.0.1:9/v1", &keys)).await;

    let (s, h, b) = post(&gw, &chat_body("lorem", false), &[]).await;
    let e = error_of(s, 401, &h, &b);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("authentication_error"), Some("unauthenticated"))
    );
    assert!(e["message"].as_str().is_some_and(|m| m.contains("Authorization")), "{e}");
    let (s, h, b) = post(&gw, &chat_body("lorem", false), &[("authorization", "Bearer wrong")]).await;
    error_of(s, 401, &h, &b);
    let (s, h, b) = post(&gw, &chat_body("echo", false), &[("authorization", "Bearer k-chat")]).await;
    assert_eq!(error_of(s, 403, &h, &b)["code"], "model_not_allowed");
    let (s, _, b) = post(&gw, &chat_body("lorem", false), &[("authorization", "Bearer k-chat")]).await;
    assert_eq!(s, 200, "{b}");

    let list = |key: Option<&'static str>| {
        let mut r = http().get(gw.http_url("/v1/models"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move { within(WAIT, "GET /v1/models", r.send()).await.expect("response") }
    };
    assert_eq!(list(None).await.status().as_u16(), 401);
    let r = list(Some("k-chat")).await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(!header(r.headers(), "x-request-id").is_empty());
    let v: Value = r.json().await.expect("JSON");
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> =
        v["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["chat", "lorem"], "only the key's models");
    assert_eq!(v["data"][0]["object"], "model");
}

#[tokio::test]
async fn an_error_after_the_first_chunk_is_an_error_event() {
    let gw = http_gateway("http://127.0.0.1:9/v1").await;
    let (status, _, text) = post(&gw, &chat_body("flaky", true), &[]).await;
    assert_eq!(status, 200, "the stream had begun");
    let events = sse_events(&text);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "upstream_failed_midstream", "{text}");
    assert_eq!(last["error"]["type"], "server_error");
    assert!(events.len() >= 2, "content came first: {text}");
    assert!(!text.contains("[DONE]"), "never a clean end: {text}");
}

#[tokio::test]
async fn the_deadline_is_server_default_timeout() {
    let yaml = http_config("http://127.0.0.1:9/v1", "server:\n  default_timeout: 300ms\n");
    let gw = Gateway::start(&yaml).await;
    let (s, h, b) = post(&gw, &chat_body("slow", false), &[]).await;
    let e = error_of(s, 504, &h, &b);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("timeout_error"), Some("deadline_exceeded")));
    let (s, _, text) = post(&gw, &chat_body("slow", true), &[]).await;
    assert_eq!(s, 200);
    let events = sse_events(&text);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("JSON");
    assert_eq!(last["error"]["code"], "deadline_exceeded", "{text}");
}

pub(crate) fn raw_request(body: &Value, keep_alive: bool) -> Vec<u8> {
    let body = body.to_string();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n\
         connection: {connection}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    within(WAIT, "TCP connect", TcpStream::connect(addr)).await.expect("connect")
}

/// Reads from `tcp` until `needle` has been seen; returns all that was read.
pub(crate) async fn read_until(tcp: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    within(WAIT, needle, async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(n > 0, "the connection closed before {needle:?}: {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&seen).into_owned()
}

/// Waits for the upstream to see its connection close, and checks how soon.
async fn assert_upstream_closed(up: &Upstream, since: Instant) {
    let closed = within(WAIT, "the upstream to see its connection close", up.closed()).await;
    let latency = closed.saturating_duration_since(since);
    assert!(latency < CLOSE_BOUND, "the upstream saw the close {latency:?} after the client left");
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_closes_the_quiet_upstream() {
    // "first" arrives, then the upstream is silent for a minute: only the
    // gateway closing the connection ends it early. That the client reads
    // "first" at all shows the delta was written at once, not buffered.
    let up = Upstream::start(slow_reply()).await;
    let gw = http_gateway(&up.base_url()).await;
    let mut tcp = connect(gw.http_addr()).await;
    tcp.write_all(&raw_request(&chat_body("chat", true), true)).await.expect("write");
    let head = read_until(&mut tcp, "first").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let left = Instant::now();
    drop(tcp);
    assert_upstream_closed(&up, left).await;
}

#[tokio::test]
async fn a_client_that_leaves_before_the_first_token_closes_the_upstream() {
    let up = Upstream::start(Reply::sse(vec![Step::send(openai::role("c", "m")), Step::Hang])).await;
    let gw = http_gateway(&up.base_url()).await;
    for stream in [true, false] {
        let mut tcp = connect(gw.http_addr()).await;
        tcp.write_all(&raw_request(&chat_body("chat", stream), true)).await.expect("write");
        let i = if stream { 0 } else { 1 };
        within(WAIT, "the upstream request", up.request(i)).await;
        let left = Instant::now();
        drop(tcp);
        eventually(WAIT, "the upstream to see its connection close", async || {
            matches!(up.exchanges()[i].outcome, crate::upstream::Outcome::PeerClosed(at) if at >= left)
        })
        .await;
        let crate::upstream::Outcome::PeerClosed(at) = up.exchanges()[i].outcome else { unreachable!() };
        assert!(at.saturating_duration_since(left) < CLOSE_BOUND, "stream: {stream}");
    }
}

#[tokio::test]
async fn keep_alive_serves_requests_one_after_another() {
    let gw = http_gateway("http://127.0.0.1:9/v1").await;
    let mut tcp = connect(gw.http_addr()).await;
    for i in 0..3 {
        tcp.write_all(&raw_request(&chat_body("lorem", false), true)).await.expect("write");
        let got = read_until(&mut tcp, "\"usage\"").await;
        assert!(got.starts_with("HTTP/1.1 200"), "request {i} on the same connection: {got}");
        // The JSON body ends the response (it has a content-length).
        read_until_end_of_json(&mut tcp, got).await;
    }
}

async fn read_until_end_of_json(tcp: &mut TcpStream, mut got: String) {
    let mut buf = [0u8; 4096];
    while !got.trim_end().ends_with("}}") {
        let n = within(WAIT, "the rest of the body", tcp.read(&mut buf)).await.expect("read");
        assert!(n > 0);
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn h2c_serves_streams() {
    let up = Upstream::start(answer()).await;
    let gw = http_gateway(&up.base_url()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().expect("client");
    let r = within(
        WAIT,
        "an h2c call",
        client.post(gw.http_url("/v1/chat/completions")).json(&chat_body("chat", true)).send(),
    )
    .await
    .expect("response");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("body");
    assert_eq!(sse_events(&text).last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn slow_clients_are_timed_out() {
    let yaml = http_config(
        "http://127.0.0.1:9/v1",
        "server:\n  handshake_timeout: 300ms\n  body_read_timeout: 300ms\n",
    );
    let gw = Gateway::start(&yaml).await;
    let closed = |mut tcp: TcpStream| async move {
        let mut buf = [0u8; 1024];
        let mut got = Vec::new();
        loop {
            match within(WAIT, "the gateway to close the connection", tcp.read(&mut buf)).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    // Says nothing at all.
    let started = Instant::now();
    closed(connect(gw.http_addr()).await).await;
    assert!(started.elapsed() < WAIT);
    // Half a request head, then nothing.
    let mut tcp = connect(gw.http_addr()).await;
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n").await.expect("write");
    closed(tcp).await;
    // Half an h2c preface.
    let mut tcp = connect(gw.http_addr()).await;
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    closed(tcp).await;
    // The whole head, half the body: 408 in OpenAI's shape.
    let mut tcp = connect(gw.http_addr()).await;
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .await
        .expect("write");
    let answer = read_until(&mut tcp, "request_timeout").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn drain_lets_the_stream_finish_and_refuses_new_connections() {
    let yaml = format!(
        "http_listen: 127.0.0.1:0\n{}",
        config_with_model("http://127.0.0.1:9/v1", "drain", "mk", "lorem?tokens=20&delay=50ms")
    );
    let mut gw = Gateway::start(&yaml).await;
    let addr = gw.http_addr();
    let mut tcp = connect(addr).await;
    tcp.write_all(&raw_request(&chat_body("drain", true), false)).await.expect("write");
    read_until(&mut tcp, "chat.completion.chunk").await;
    gw.trigger_shutdown();
    eventually(WAIT, "new connections to be refused", async || TcpStream::connect(addr).await.is_err()).await;
    // The stream in flight runs to its end.
    let mut rest = Vec::new();
    within(WAIT, "the stream to end", tcp.read_to_end(&mut rest)).await.expect("read");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("data: [DONE]"), "{rest}");
    within(WAIT, "the gateway to stop", gw.stopped()).await.expect("clean stop");
}

#[tokio::test]
async fn past_the_grace_period_a_stream_ends_with_an_error_event() {
    let yaml = format!(
        "http_listen: 127.0.0.1:0\nserver:\n  shutdown_grace: 200ms\n{}",
        config("http://127.0.0.1:9/v1")
    );
    let mut gw = Gateway::start(&yaml).await;
    let mut tcp = connect(gw.http_addr()).await;
    tcp.write_all(&raw_request(&chat_body("slow", true), false)).await.expect("write");
    read_until(&mut tcp, "chat.completion.chunk").await;
    gw.trigger_shutdown();
    let mut rest = Vec::new();
    within(WAIT, "the stream to end", tcp.read_to_end(&mut rest)).await.expect("read");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"code\":\"shutting_down\""), "{rest}");
    assert!(!rest.contains("[DONE]"), "{rest}");
    within(WAIT, "the gateway to stop", gw.stopped()).await.expect("clean stop");
}

#[tokio::test]
async fn metrics_count_http_calls_by_front_door() {
    let gw = http_gateway("http://127.0.0.1:9/v1").await;
    let (s, _, _) = post(&gw, &chat_body("lorem", true), &[]).await;
    assert_eq!(s, 200);
    let (s, _, _) = post(&gw, &chat_body("nope", false), &[]).await;
    assert_eq!(s, 404);
    let ok = r#"llm_gateway_calls_total{front_door="http",method="POST /v1/chat/completions",model="lorem",provider="mk",code="200"} 1"#;
    let missing = r#"llm_gateway_calls_total{front_door="http",method="POST /v1/chat/completions",model="",provider="",code="404"} 1"#;
    let url = gw.admin_url("/metrics");
    let mut text = String::new();
    eventually(WAIT, "the HTTP calls in /metrics", async || {
        text = http().get(&url).send().await.expect("GET").text().await.expect("text");
        text.contains(ok)
    })
    .await;
    assert!(text.contains(missing), "{text}");
}

#[tokio::test]
async fn a_key_limit_is_429_with_retry_after() {
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(b"k-limited"));
    let keys = format!("api_keys:\n  - {{ name: a, key_sha256: \"{digest}\", limits: {{ rpm: 1 }} }}\n");
    let gw = Gateway::start(&http_config("http://127.0.0.1:9/v1", &keys)).await;
    let auth = [("authorization", "Bearer k-limited")];
    let (s, _, b) = post(&gw, &chat_body("lorem", false), &auth).await;
    assert_eq!(s, 200, "{b}");
    let (s, h, b) = post(&gw, &chat_body("lorem", true), &auth).await;
    let e = error_of(s, 429, &h, &b);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("rate_limit_error"), Some("rate_limited")));
    let secs: u64 = header(&h, "retry-after").parse().expect("Retry-After in seconds");
    let ms: u64 = header(&h, "retry-after-ms").parse().expect("retry-after-ms");
    assert!((55..=61).contains(&secs) && (55_000..=61_000).contains(&ms), "{secs} s, {ms} ms");
}
