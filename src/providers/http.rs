//! The HTTP side every HTTP provider shares: one pooled client per provider,
//! the key from the environment, sending a request and typing a refusal.

use std::{
    sync::{
        Arc, Once,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use reqwest::{
    Client, RequestBuilder, Response,
    header::{HeaderMap, HeaderValue},
};

use futures_util::{FutureExt, StreamExt, future::BoxFuture};

use super::{
    DeltaStream, ProviderError, conn,
    sse::{self, Translate},
};
use crate::config::ProviderConfig;

/// Largest error body read from an upstream, so a hostile one cannot make us
/// buffer without bound.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Longest wait passed on from an upstream's Retry-After.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Longest provider message carried into a status.
const MAX_ERROR_MESSAGE: usize = 1024;

static CRYPTO: Once = Once::new();

/// What an HTTP provider holds: its pooled client, the endpoint it posts to,
/// its key and, for telemetry, the server's address.
pub(crate) struct Endpoint {
    /// Through the proxy, when there is one.
    pub client: Client,
    pub url: String,
    /// `url`, parsed once: a request to it copies it instead of parsing it.
    pub target: reqwest::Url,
    pub api_key: Option<String>,
    /// `Bearer <key>`, marked sensitive, built once.
    pub bearer: Option<HeaderValue>,
    /// The key again, shared with every call's redaction.
    redact: Option<Arc<str>>,
    pub server: Option<(String, u16)>,
    fallback: Option<Arc<Fallback>>,
    /// For a plain-HTTP upstream reached directly: connections driven by the
    /// reader's task (see `conn`). Anything else goes through `client`.
    direct: Option<Arc<conn::Pool>>,
}

/// The direct route taken when the proxy fails (`proxy_fallback_direct`).
struct Fallback {
    provider: String,
    direct: Client,
    /// Set while the proxy is failing, so one incident logs once.
    failing: AtomicBool,
}

impl Endpoint {
    /// `path` is appended to the config's `base_url`.
    pub(crate) fn new(name: &str, config: &ProviderConfig, path: &str) -> Result<Self, ProviderError> {
        let base = config.base_url.trim_end_matches('/');
        let fallback = match (&config.proxy, config.proxy_fallback_direct) {
            (Some(_), true) => Some(Arc::new(Fallback {
                provider: name.to_owned(),
                direct: client(config, Route::Direct)?,
                failing: AtomicBool::new(false),
            })),
            _ => None,
        };
        let url = format!("{base}{path}");
        let target = reqwest::Url::parse(&url)
            .map_err(|e| ProviderError::Setup(format!("providers.{name}.base_url: {e}")))?;
        let api_key = api_key(config)?;
        let direct = if config.proxy.is_none() && !proxy_from_env() {
            let t = &config.timeouts;
            conn::Pool::new(&target, config.pool_max_idle_per_host, t.connect, t.read)
        } else {
            None
        };
        let bearer = match &api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ProviderError::Setup("the API key holds characters a header cannot carry".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Self {
            client: client(config, config.proxy.as_deref().map_or(Route::Default, Route::Proxy))?,
            url,
            target,
            redact: api_key.as_deref().map(Arc::from),
            api_key,
            bearer,
            server: server_of(base),
            fallback,
            direct,
        })
    }

    /// Sends `request` and streams its SSE answer through `translator`.
    /// With a proxy and `proxy_fallback_direct`, a request whose connection
    /// through the proxy fails (refused, failed handshake) is sent again
    /// directly; an HTTP answer through the proxy is the provider's own.
    pub(crate) fn open<T: Translate>(
        &self,
        request: RequestBuilder,
        translator: T,
    ) -> BoxFuture<'static, Result<DeltaStream, ProviderError>> {
        let response = self.send(request);
        let key = self.redact.clone();
        async move {
            let deltas = sse::deltas(response.await?, translator);
            // An upstream may quote the key in an error event mid-stream too.
            Ok(match key {
                Some(key) => {
                    Box::pin(deltas.map(move |item| item.map_err(|e| e.redact(&key)))) as DeltaStream
                }
                None => deltas,
            })
        }
        .boxed()
    }

    /// Sends `request` as [`Endpoint::open`] does and returns the 2xx
    /// response, for an answer that is not a stream.
    pub(crate) fn send(
        &self,
        request: RequestBuilder,
    ) -> impl Future<Output = Result<Response, ProviderError>> + Send + 'static {
        let fallback = self.fallback.clone();
        let direct = self.direct.clone();
        let key = self.redact.clone();
        async move {
            let sent = match (fallback, direct) {
                (Some(fallback), _) => fallback.send(request).await,
                (None, Some(pool)) => send_direct(&pool, request).await,
                (None, None) => send(request).await,
            };
            // An upstream may quote the key it was sent in its refusal: it
            // never travels further.
            match (sent, key) {
                (Err(e), Some(key)) => Err(e.redact(&key)),
                (sent, _) => sent,
            }
        }
    }
}

impl Fallback {
    async fn send(&self, request: RequestBuilder) -> Result<Response, ProviderError> {
        let (client, request) = request.build_split();
        let request = request.map_err(|e| ProviderError::Setup(format!("request: {}", e.without_url())))?;
        let again = request.try_clone();
        match client.execute(request).await {
            Ok(response) => {
                self.failing.store(false, Ordering::Relaxed);
                check(response).await
            }
            Err(e) if e.is_connect() && again.is_some() => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    // The proxy's URL may hold credentials: it stays out.
                    tracing::warn!(
                        provider = %self.provider,
                        error = %error_chain(&e.without_url()),
                        "proxy unreachable: sending directly until it answers again"
                    );
                }
                crate::telemetry::routing_metrics::PROXY_FALLBACKS
                    .get_or_create(&crate::telemetry::routing_metrics::ProviderLabels {
                        provider: self.provider.clone(),
                    })
                    .inc();
                let Some(again) = again else {
                    return Err(ProviderError::Connect("no request to resend".into()));
                };
                check(self.direct.execute(again).await.map_err(connect_error)?).await
            }
            Err(e) => Err(connect_error(e)),
        }
    }
}

/// The key as a header value marked sensitive (kept out of HPACK tables and
/// debug output), for providers that send it in a header of their own.
pub(crate) fn key_header(endpoint: &Endpoint) -> Result<Option<HeaderValue>, ProviderError> {
    let Some(key) = &endpoint.api_key else {
        return Ok(None);
    };
    let mut v = HeaderValue::from_str(key)
        .map_err(|_| ProviderError::Setup("the API key holds characters a header cannot carry".into()))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// A JSON object given as text (a tool call's arguments), or None.
pub(crate) fn json_object(text: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(text).ok().filter(serde_json::Value::is_object)
}

/// Reads a whole (unary) response body, at most `max` bytes.
pub(crate) async fn read_body(mut response: Response, max: usize) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(ProviderError::Protocol(format!("a response body over {max} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(ProviderError::Stream(error_chain(&e.without_url()))),
        }
    }
}

/// How a client reaches the upstream.
#[derive(Clone, Copy)]
pub(crate) enum Route<'a> {
    /// reqwest's default: the `HTTPS_PROXY`-style variables, if set.
    Default,
    Proxy(&'a str),
    /// Never through a proxy (the fallback).
    Direct,
}

/// Builds the provider's pooled client from its config.
pub(crate) fn client(config: &ProviderConfig, route: Route<'_>) -> Result<Client, ProviderError> {
    CRYPTO.call_once(|| {
        // Only ring is compiled in; installing twice is harmless and ignored.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let t = &config.timeouts;
    let mut builder = Client::builder()
        .connect_timeout(t.connect)
        .read_timeout(t.read)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        // Fixed, large windows: h2 closes a connection whose unread small
        // DATA frames pass half its window, and a shared upstream connection
        // carries many streams whose callers may read slowly.
        .http2_initial_connection_window_size(8 << 20)
        .http2_initial_stream_window_size(1 << 20)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false)
        .user_agent(concat!("llm-gateway/", env!("CARGO_PKG_VERSION")))
        // A redirect would carry the key (x-api-key survives a cross-host
        // redirect) and the prompt to another host: never follow one.
        .redirect(reqwest::redirect::Policy::none());
    match route {
        Route::Proxy(proxy) => {
            // reqwest's error may quote the URL, credentials and all.
            let proxy = reqwest::Proxy::all(proxy).map_err(|_| {
                ProviderError::Setup(format!("proxy {:?} is not usable", crate::config::redact_url(proxy)))
            })?;
            builder = builder.proxy(proxy);
        }
        Route::Direct => builder = builder.no_proxy(),
        Route::Default => {}
    }
    builder.build().map_err(|e| ProviderError::Setup(format!("http client: {e}")))
}

/// The provider's API key, read from the environment variable its config
/// names. The value never reaches a log or an error message.
pub(crate) fn api_key(config: &ProviderConfig) -> Result<Option<String>, ProviderError> {
    let Some(var) = &config.api_key_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Some(v)),
        _ => Err(ProviderError::Setup(format!("environment variable {var} (api_key_env) is not set"))),
    }
}

/// Host and port of a base URL, for telemetry.
pub(crate) fn server_of(base_url: &str) -> Option<(String, u16)> {
    let url = reqwest::Url::parse(base_url).ok()?;
    Some((url.host_str()?.to_owned(), url.port_or_known_default()?))
}

/// Sends the request; a non-2xx answer becomes [`ProviderError::Status`]
/// carrying the provider's own message.
pub(crate) async fn send(request: RequestBuilder) -> Result<Response, ProviderError> {
    let response = request.send().await.map_err(connect_error)?;
    check(response).await
}

/// [`send`] through the pool of connections driven by their readers; a URL
/// on another host (none today) takes reqwest's way.
async fn send_direct(pool: &Arc<conn::Pool>, request: RequestBuilder) -> Result<Response, ProviderError> {
    let (client, request) = request.build_split();
    let request = request.map_err(|e| ProviderError::Setup(format!("request: {}", e.without_url())))?;
    if !pool.serves(request.url()) {
        return check(client.execute(request).await.map_err(connect_error)?).await;
    }
    let answer = pool.send(request).await?;
    check(Response::from(answer.map(reqwest::Body::wrap))).await
}

/// Whether reqwest would route plain-HTTP requests through a proxy named by
/// the environment; the direct pool then stays out of the way.
fn proxy_from_env() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

fn connect_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Connect("timed out".into())
    } else {
        // The URL stays out: callers' logs and a proxy's credentials.
        ProviderError::Connect(error_chain(&e.without_url()))
    }
}

/// A 2xx response passes; anything else becomes [`ProviderError::Status`].
async fn check(response: Response) -> Result<Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers());
    let body = read_bounded(response).await;
    Err(ProviderError::Status {
        status: status.as_u16(),
        message: error_message(&body, status.canonical_reason().unwrap_or("")),
        retry_after,
    })
}

/// The whole cause chain of an error, which reqwest keeps out of `Display`.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn read_bounded(mut response: Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    body
}

/// The provider's message from an error body: OpenAI's and Anthropic's
/// `{"error": {"message": …}}`, Gemini's likewise, a bare `{"message": …}`,
/// or the text itself.
pub(crate) fn error_message(body: &[u8], fallback: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|v| {
        let v = if let Some(arr) = v.as_array() { arr.first()? } else { v };
        v.pointer("/error/message")
            .or_else(|| v.get("message"))
            .or_else(|| v.get("error").filter(|e| e.is_string()))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    });
    let mut message = message.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    if message.is_empty() {
        message = fallback.to_owned();
    }
    truncate(message, MAX_ERROR_MESSAGE)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// `Retry-After` (seconds or an HTTP date) or `retry-after-ms`.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(
            Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(MAX_RETRY_AFTER).min(MAX_RETRY_AFTER),
        );
    }
    if let Some(value) = headers.get("retry-after").and_then(|v| v.to_str().ok()).map(str::trim) {
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        }
        if let Some(when) = humantime::parse_rfc3339_weak(value).ok().or_else(|| httpdate(value)) {
            let wait = when.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            return Some(wait.min(MAX_RETRY_AFTER));
        }
    }
    // OpenAI's own: the longer of the two resets, which is when both fit.
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|name| headers.get(*name)?.to_str().ok().and_then(go_duration))
        .max()
        .map(|d| d.min(MAX_RETRY_AFTER))
}

/// A Go-style duration as OpenAI writes its resets: `1s`, `6m0s`, `20ms`,
/// `1h2m3.5s`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// IMF-fixdate, the only HTTP date form servers send today.
fn httpdate(value: &str) -> Option<std::time::SystemTime> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = value.split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    let iso = format!("{year:04}-{month:02}-{day:02}T{time}Z");
    humantime::parse_rfc3339(&iso).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_forms() {
        assert_eq!(error_message(br#"{"error":{"message":"bad model","type":"x"}}"#, ""), "bad model");
        assert_eq!(
            error_message(br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#, ""),
            "max_tokens: too big"
        );
        assert_eq!(error_message(b"plain text\n", ""), "plain text");
        assert_eq!(error_message(b"", "Bad Request"), "Bad Request");
        assert_eq!(error_message(br#"[{"error":{"message":"g"}}]"#, ""), "g");
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        // An absurd value is capped, never a panic.
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", "1e30".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(go_duration("soon"), None);
    }
}
