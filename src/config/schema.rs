//! The shape of the config file. Every key is documented in
//! `config/example.yaml`; unknown keys are refused so a typo is not ignored.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The OpenAI-compatible HTTP front door; absent: off.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    #[serde(default)]
    pub server: ServerConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// USD per million tokens, per provider and upstream model.
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    /// Shared admission state; absent: every limit is local to the replica.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50051))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9464))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long calls in flight may run on after SIGTERM before they are cancelled.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Deadline for a call that carries no `grpc-timeout`; 0 means none
    /// (then `max_timeout` is the deadline).
    #[serde(deserialize_with = "duration")]
    pub default_timeout: Duration,
    /// The longest deadline any call gets: a caller's longer `grpc-timeout`
    /// is cut to it, and so is the default.
    #[serde(deserialize_with = "duration")]
    pub max_timeout: Duration,
    /// Most concurrent gRPC streams per client connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval towards clients; 0 turns it off.
    #[serde(deserialize_with = "duration")]
    pub http2_keepalive_interval: Duration,
    /// A connection older than this (±10%) is sent a graceful GOAWAY; 0: never.
    #[serde(deserialize_with = "duration")]
    pub max_connection_age: Duration,
    /// How long calls on a connection told GOAWAY for its age may run on
    /// before the connection is closed.
    #[serde(deserialize_with = "duration")]
    pub max_connection_age_grace: Duration,
    /// TLS on the call listeners (gRPC, and the HTTP front door); absent: plain text.
    pub tls: Option<TlsConfig>,
    /// How often the config file is checked for a change to reload; 0: only on SIGHUP.
    #[serde(deserialize_with = "duration")]
    pub config_reload_interval: Duration,
    /// Every listener: a new connection must finish its TLS handshake (if
    /// any), send its preface and its first request within it, or it is
    /// closed (on HTTP/1.1, every request's headers must arrive within it).
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// Every listener: a connection with no request in flight for this long
    /// is sent a graceful GOAWAY (HTTP/2) or closed (HTTP/1.1); 0: never.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Open connections per listener; past it a new one is closed at once.
    pub max_connections: usize,
    /// HTTP front door: a request body must arrive whole within it.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// The largest request message (gRPC) or body (HTTP front door), in bytes.
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change; 0: never.
    #[serde(default = "default_tls_reload", deserialize_with = "duration")]
    pub reload_interval: Duration,
}

fn default_tls_reload() -> Duration {
    Duration::from_secs(30)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(30),
            default_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(3600),
            max_concurrent_streams: 1024,
            http2_keepalive_interval: Duration::from_secs(30),
            max_connection_age: Duration::ZERO,
            max_connection_age_grace: Duration::from_secs(600),
            tls: None,
            config_reload_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_connections: 4096,
            max_request_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Gemini,
    Mock,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Defaults to the vendor's public API for `openai`, `anthropic` and `gemini`.
    #[serde(default)]
    pub base_url: String,
    /// The environment variable holding the API key; the key itself never
    /// sits in the file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub timeouts: ProviderTimeouts,
    /// A proxy for this provider's requests: `http://`, `https://`,
    /// `socks5://` or `socks5h://` (the proxy resolves names), with optional
    /// `user:password@`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// When the proxy cannot be reached or fails its handshake, connect
    /// directly instead.
    #[serde(default)]
    pub proxy_fallback_direct: bool,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    #[serde(default = "default_pool")]
    pub pool_max_idle_per_host: usize,
    /// `max_tokens` sent when the caller gives none (Anthropic requires one).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// Behaviour of a `mock` provider.
    #[serde(default)]
    pub mock: MockConfig,
    /// Limits of the whole account at this provider.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Limits of one upstream model at this provider, by model id.
    #[serde(default)]
    pub model_limits: BTreeMap<String, LimitsConfig>,
    /// Ask the upstream for its reasoning text (`gemini`, `anthropic`).
    #[serde(default)]
    pub reasoning: Option<ReasoningConfig>,
}

/// Asks a model for its reasoning (thinking) text: Gemini's
/// `thinkingConfig.includeThoughts`, Anthropic's extended `thinking`.
/// OpenAI-compatible servers send theirs unasked, when they have any.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningConfig {
    /// Tokens the model may spend thinking: Gemini's `thinkingBudget`
    /// (absent: the model decides), Anthropic's `budget_tokens` (required).
    #[serde(default)]
    pub budget_tokens: Option<u32>,
}

fn default_pool() -> usize {
    1024
}

fn default_max_tokens() -> u32 {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderTimeouts {
    /// TCP (and TLS) connect.
    #[serde(deserialize_with = "duration")]
    pub connect: Duration,
    /// Longest silence while reading a response, headers or body.
    #[serde(deserialize_with = "duration")]
    pub read: Duration,
    /// Longest wait from sending the request to its first delta; past it the
    /// attempt is aborted and counts as a retryable failure.
    #[serde(deserialize_with = "duration")]
    pub first_token: Duration,
}

impl Default for ProviderTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(120),
            first_token: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts on one target for retryable failures; 1 means no retry.
    pub attempts: u32,
    /// The first backoff's ceiling; each retry doubles it (full jitter).
    #[serde(deserialize_with = "duration")]
    pub initial_backoff: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { attempts: 2, initial_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(5) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive retryable failures that open a target's circuit; 0 turns
    /// the breaker off.
    pub failures: u32,
    /// How long an open circuit skips its target before one probe is let through.
    #[serde(deserialize_with = "duration")]
    pub open_for: Duration,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self { failures: 5, open_for: Duration::from_secs(30) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Tokens in each answer.
    pub tokens: u32,
    /// Pause before the first token.
    #[serde(deserialize_with = "duration")]
    pub first_token_delay: Duration,
    /// Pause between tokens.
    #[serde(deserialize_with = "duration")]
    pub token_delay: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self { tokens: 16, first_token_delay: Duration::ZERO, token_delay: Duration::ZERO }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// How the first target of a call is chosen.
    #[serde(default)]
    pub strategy: Strategy,
    /// With no first delta by then, the next target is started too; absent:
    /// no hedging.
    #[serde(default, deserialize_with = "optional_duration")]
    pub hedge_after: Option<Duration>,
    /// Tried in order (after the strategy's pick) until one answers.
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The targets in the order written.
    #[default]
    Ordered,
    /// Spread by `weight`; the others follow as fallbacks.
    Weighted,
    /// Fewest calls in flight first; ties go to the faster first token.
    LeastBusy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A name under `providers`.
    pub provider: String,
    /// The model id sent upstream.
    pub model: String,
    /// Share of calls under `strategy: weighted`.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds the key; recorded on traces and logs, never the key.
    pub name: String,
    /// Hex SHA-256 of the key.
    pub key_sha256: String,
    /// Model names this key may use; empty or `["*"]` means all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` wins when set.
    pub log_level: String,
    /// OTLP/gRPC collector; `OTEL_EXPORTER_OTLP_ENDPOINT` wins when set.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
    /// Fraction of root traces sampled (parent-based); `OTEL_TRACES_SAMPLER*` win.
    pub sample_ratio: f64,
    /// Record prompts and completions on spans.
    pub record_content: bool,
    /// Extra resource attributes; `OTEL_RESOURCE_ATTRIBUTES` adds to them.
    pub resource_attributes: BTreeMap<String, String>,
    /// Batch export interval; `OTEL_BSP_SCHEDULE_DELAY` wins when set.
    #[serde(deserialize_with = "duration")]
    pub export_interval: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            otlp_endpoint: None,
            service_name: "llm-gateway".into(),
            sample_ratio: 1.0,
            record_content: false,
            resource_attributes: BTreeMap::new(),
            export_interval: Duration::from_secs(5),
        }
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Rate and concurrency limits of one key, account or model; an absent
/// figure is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in any 60 s.
    pub rpm: Option<u64>,
    /// Tokens (input and output) in any 60 s.
    pub tpm: Option<u64>,
    /// Calls in flight.
    pub concurrency: Option<u32>,
}

impl LimitsConfig {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.concurrency.is_none()
    }
}

/// What one key may spend per window.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub usd: Option<f64>,
    pub tokens: Option<u64>,
    /// Fixed windows counted from the Unix epoch (UTC).
    #[serde(default = "default_budget_window", deserialize_with = "long_duration")]
    pub window: Duration,
}

fn default_budget_window() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

/// The price of one upstream model, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub provider: String,
    pub model: String,
    pub input: f64,
    pub output: f64,
    /// Input tokens the provider served from its prompt cache; default: `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Longest wait for a target's limits.
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    /// Most calls waiting at once on this replica; 0: no queue.
    pub max_waiting: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_wait: Duration::from_secs(10), max_waiting: 1000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Serve with local limits while Redis is unreachable.
    #[default]
    Open,
    /// Fail the calls that need a limit.
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// The environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Bound on each Redis round trip, connecting included.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Replicas sharing the limits: while Redis is unreachable each one
    /// enforces `limit / replicas` (rounded up) on its own.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// `url` is one node of a Redis Cluster: the client learns the others
    /// from it and follows the slot's owner.
    #[serde(default)]
    pub cluster: bool,
}

fn default_key_prefix() -> String {
    "llmgw".into()
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(100)
}

fn default_replicas() -> u32 {
    1
}

/// Budget windows may be longer than other durations (a year at most).
fn long_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    let d = match Raw::deserialize(d)? {
        Raw::Secs(s) => Duration::from_secs(s),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            serde::de::Error::custom(format!("{t:?} is not a duration like \"30d\" or \"1h\": {e}"))
        })?,
    };
    if d > Duration::from_secs(366 * 24 * 3600) {
        return Err(serde::de::Error::custom("a budget window over 366 days is not supported"));
    }
    Ok(d)
}

const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A duration written as `30s`, `250ms`, `1m 30s`, or a bare number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    let d = match Raw::deserialize(d)? {
        Raw::Secs(s) => Duration::from_secs(s),
        Raw::Text(t) => humantime::parse_duration(&t).map_err(|e| {
            serde::de::Error::custom(format!("{t:?} is not a duration like \"30s\" or \"250ms\": {e}"))
        })?,
    };
    // Timers add durations to the clock; an absurd one would overflow it.
    if d > MAX_DURATION {
        return Err(serde::de::Error::custom("a duration over 30 days is not supported"));
    }
    Ok(d)
}
