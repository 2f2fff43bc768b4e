//! The checks serde cannot do on a parsed config: each returns the key path
//! of the problem and what is wrong, and `load` turns it into a line.

use super::{
    load::{default_base_url, redact_url},
    schema::{Config, LimitsConfig, ProviderConfig, ProviderKind, ReasoningConfig},
};

/// The smallest `server.max_request_bytes` accepted.
const MIN_REQUEST_BYTES: usize = 1024;

/// The semantic checks serde cannot do. Returns the key path of a problem.
pub(super) fn validate(c: &Config, _text: &str) -> Result<(), (Vec<String>, String)> {
    let p = |parts: &[&str]| parts.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    if c.models.is_empty() {
        return Err((p(&["models"]), "at least one model is needed".into()));
    }
    for (name, provider) in &c.providers {
        if provider.kind != ProviderKind::Mock {
            let url = if provider.base_url.is_empty() {
                default_base_url(provider.kind).to_owned()
            } else {
                provider.base_url.clone()
            };
            match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err((
                        p(&["providers", name, "base_url"]),
                        format!("{url:?} is not an http(s) URL"),
                    ));
                }
            }
        }
        if let Some(var) = &provider.api_key_env
            && !env_name_ok(var)
        {
            return Err((
                p(&["providers", name, "api_key_env"]),
                "must name an environment variable (letters, digits, _), not hold a key".into(),
            ));
        }
        if let Some(proxy) = &provider.proxy {
            let at = p(&["providers", name, "proxy"]);
            match reqwest::Url::parse(proxy) {
                Ok(u)
                    if matches!(u.scheme(), "http" | "https" | "socks5" | "socks5h")
                        && u.host().is_some() => {}
                // The URL may hold credentials: never echo it whole.
                _ => {
                    return Err((
                        at,
                        format!(
                            "{:?} is not an http://, https://, socks5:// or socks5h:// URL with a host",
                            redact_url(proxy)
                        ),
                    ));
                }
            }
        }
        let t = &provider.timeouts;
        for (key, value) in [("connect", t.connect), ("read", t.read), ("first_token", t.first_token)] {
            if value.is_zero() {
                return Err((
                    p(&["providers", name, "timeouts", key]),
                    "must be more than 0: every call would time out".into(),
                ));
            }
        }
        if provider.default_max_tokens == 0 {
            return Err((
                p(&["providers", name, "default_max_tokens"]),
                "must be at least 1: an answer of 0 tokens is refused (anthropic) or empty".into(),
            ));
        }
        if provider.kind == ProviderKind::Mock {
            let m = &provider.mock;
            for (key, value) in [("first_token_delay", m.first_token_delay), ("token_delay", m.token_delay)] {
                // The same bound the model name's overrides have.
                if value > MAX_MOCK_DELAY {
                    return Err((p(&["providers", name, "mock", key]), "must be at most 1h".into()));
                }
            }
            if m.first_token_delay >= t.first_token {
                return Err((
                    p(&["providers", name, "mock", "first_token_delay"]),
                    format!(
                        "must be less than `timeouts.first_token` ({}): every call would time out",
                        humantime::format_duration(t.first_token)
                    ),
                ));
            }
        }
        let r = &provider.retry;
        if r.attempts == 0 {
            return Err((
                p(&["providers", name, "retry", "attempts"]),
                "must be at least 1 (1 = no retry)".into(),
            ));
        }
        if r.max_backoff < r.initial_backoff {
            return Err((
                p(&["providers", name, "retry", "max_backoff"]),
                "must not be less than `initial_backoff`".into(),
            ));
        }
        let b = &provider.circuit_breaker;
        if b.failures > 0 && b.open_for.is_zero() {
            return Err((
                p(&["providers", name, "circuit_breaker", "open_for"]),
                "must be more than 0 (set `failures: 0` to turn the breaker off)".into(),
            ));
        }
        if let Some(r) = &provider.reasoning {
            reasoning(provider, r).map_err(|(key, m)| {
                let mut path = p(&["providers", name, "reasoning"]);
                path.extend(key.map(str::to_owned));
                (path, m)
            })?;
        }
    }
    for (name, model) in &c.models {
        if model.targets.is_empty() {
            return Err((p(&["models", name, "targets"]), "at least one target is needed".into()));
        }
        for (i, t) in model.targets.iter().enumerate() {
            let at = |field: &str| {
                vec!["models".into(), name.clone(), "targets".into(), format!("[{i}]"), field.into()]
            };
            if !c.providers.contains_key(&t.provider) {
                return Err((
                    at("provider"),
                    format!("no provider named {:?} under `providers`", t.provider),
                ));
            }
            if t.model.is_empty() {
                return Err((at("model"), "must not be empty".into()));
            }
            if t.weight == 0 {
                return Err((
                    at("weight"),
                    "must be at least 1 (remove the target to send it nothing)".into(),
                ));
            }
        }
        if model.hedge_after.is_some_and(|h| h.is_zero()) {
            return Err((
                p(&["models", name, "hedge_after"]),
                "must be more than 0 (leave it out for no hedging)".into(),
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, k) in c.api_keys.iter().enumerate() {
        let at = |field: &str| vec!["api_keys".into(), format!("[{i}]"), field.into()];
        if k.name.is_empty() {
            return Err((at("name"), "must not be empty".into()));
        }
        if !names.insert(k.name.as_str()) {
            return Err((at("name"), format!("{:?} is used twice", k.name)));
        }
        let hex_ok = k.key_sha256.len() == 64 && k.key_sha256.chars().all(|ch| ch.is_ascii_hexdigit());
        if !hex_ok {
            return Err((
                at("key_sha256"),
                "must be the 64 hex digits of the key's SHA-256 (`printf %s KEY | sha256sum`)".into(),
            ));
        }
        for m in &k.models {
            if m != "*" && !c.models.contains_key(m) {
                return Err((at("models"), format!("no model named {m:?} under `models`")));
            }
        }
    }
    let t = &c.telemetry;
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        return Err((p(&["telemetry", "sample_ratio"]), "must be between 0 and 1".into()));
    }
    if let Some(tls) = &c.server.tls {
        let paths = [("cert_file", Some(&tls.cert_file)), ("key_file", Some(&tls.key_file))];
        let ca = [("client_ca_file", tls.client_ca_file.as_ref())];
        for (key, path) in paths.into_iter().chain(ca) {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                return Err((p(&["server", "tls", key]), "must name a PEM file".into()));
            }
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&t.log_level) {
        return Err((p(&["telemetry", "log_level"]), format!("not a log filter like \"info\": {e}")));
    }
    if t.export_interval.is_zero() {
        return Err((p(&["telemetry", "export_interval"]), "must be more than 0".into()));
    }
    if c.listen.port() != 0 && c.listen == c.admin_listen {
        return Err((p(&["admin_listen"]), "must not be the same address as `listen`".into()));
    }
    if c.server.max_concurrent_streams == 0 {
        return Err((p(&["server", "max_concurrent_streams"]), "must be at least 1".into()));
    }
    let s = &c.server;
    if s.max_timeout.is_zero() {
        return Err((p(&["server", "max_timeout"]), "must be more than 0: every call would time out".into()));
    }
    if s.default_timeout > s.max_timeout {
        return Err((
            p(&["server", "default_timeout"]),
            format!(
                "must not be more than `server.max_timeout` ({}), which caps every deadline",
                humantime::format_duration(s.max_timeout)
            ),
        ));
    }
    if c.server.body_read_timeout.is_zero() {
        return Err((p(&["server", "body_read_timeout"]), "must be more than 0".into()));
    }
    if c.server.handshake_timeout.is_zero() {
        return Err((
            p(&["server", "handshake_timeout"]),
            "must be more than 0: every connection would be closed before its first request".into(),
        ));
    }
    if c.server.max_connections == 0 {
        return Err((
            p(&["server", "max_connections"]),
            "must be at least 1: every connection would be refused".into(),
        ));
    }
    if c.server.max_request_bytes < MIN_REQUEST_BYTES {
        return Err((
            p(&["server", "max_request_bytes"]),
            format!("must be at least {MIN_REQUEST_BYTES}: smaller would refuse ordinary calls"),
        ));
    }
    if c.server.body_read_timeout.is_zero() {
        return Err((p(&["server", "body_read_timeout"]), "must be more than 0".into()));
    }
    if let Some(http) = c.http_listen
        && (http == c.listen || http == c.admin_listen)
        && http.port() != 0
    {
        return Err((p(&["http_listen"]), format!("{http} is already `listen` or `admin_listen`")));
    }
    validate_admission(c)
}

fn env_name_ok(var: &str) -> bool {
    !var.is_empty()
        && var.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
        && !var.starts_with(|ch: char| ch.is_ascii_digit())
}

/// Limits, budgets, prices, queue and Redis (CONTRACT.md sections 6 and 7).
fn validate_admission(c: &Config) -> Result<(), (Vec<String>, String)> {
    let path = |parts: &[&str]| parts.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let limits = |at: Vec<String>, l: &LimitsConfig| -> Result<(), (Vec<String>, String)> {
        let figures = [("rpm", l.rpm), ("tpm", l.tpm), ("concurrency", l.concurrency.map(u64::from))];
        for (name, v) in figures {
            if v == Some(0) {
                let mut at = at.clone();
                at.push(name.into());
                return Err((at, "must be at least 1 (omit it for no limit)".into()));
            }
        }
        Ok(())
    };
    for (name, provider) in &c.providers {
        limits(path(&["providers", name, "limits"]), &provider.limits)?;
        for (model, l) in &provider.model_limits {
            let at = path(&["providers", name, "model_limits", model]);
            let served =
                c.models.values().flat_map(|m| &m.targets).any(|t| &t.provider == name && &t.model == model);
            if !served {
                return Err((
                    at,
                    format!("no target under `models` sends model {model:?} to provider {name:?}"),
                ));
            }
            limits(at, l)?;
        }
    }
    for (i, k) in c.api_keys.iter().enumerate() {
        let at = |field: &str| vec!["api_keys".into(), format!("[{i}]"), field.into()];
        limits(at("limits"), &k.limits)?;
        if let Some(b) = &k.budget {
            let sub = |field: &str| vec!["api_keys".into(), format!("[{i}]"), "budget".into(), field.into()];
            if b.usd.is_none() && b.tokens.is_none() {
                return Err((at("budget"), "needs `usd`, `tokens` or both".into()));
            }
            if let Some(usd) = b.usd
                && !(usd.is_finite() && usd > 0.0 && usd <= 1e6)
            {
                return Err((sub("usd"), "must be a number of dollars above 0 and at most 1000000".into()));
            }
            if b.tokens == Some(0) {
                return Err((sub("tokens"), "must be at least 1 (omit it for no token budget)".into()));
            }
            if b.window < std::time::Duration::from_secs(1) {
                return Err((sub("window"), "must be at least 1s".into()));
            }
        }
    }
    let mut priced = std::collections::HashSet::new();
    for (i, price) in c.prices.iter().enumerate() {
        let at = |field: &str| vec!["prices".into(), format!("[{i}]"), field.into()];
        if !c.providers.contains_key(&price.provider) {
            return Err((
                at("provider"),
                format!("no provider named {:?} under `providers`", price.provider),
            ));
        }
        if price.model.is_empty() {
            return Err((at("model"), "must not be empty".into()));
        }
        if !priced.insert((price.provider.as_str(), price.model.as_str())) {
            return Err((at("model"), format!("{:?} of {:?} is priced twice", price.model, price.provider)));
        }
        let figures = [
            ("input", Some(price.input)),
            ("output", Some(price.output)),
            ("cached_input", price.cached_input),
        ];
        for (field, v) in figures {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err((at(field), "must be a number of USD per million tokens, 0 or more".into()));
            }
        }
    }
    if let Some(r) = &c.redis {
        let at = |field: &str| path(&["redis", field]);
        match reqwest::Url::parse(&r.url) {
            Ok(u) if u.scheme() == "redis" && r.cluster && !matches!(u.path(), "" | "/" | "/0") => {
                return Err((at("url"), "a Redis Cluster has database 0 only: drop the /N".into()));
            }
            Ok(u) if u.scheme() == "redis" => {}
            Ok(u) if u.scheme() == "rediss" => {
                return Err((at("url"), "TLS to Redis (rediss://) is not built in; use redis://".into()));
            }
            _ => return Err((at("url"), "must be a URL like redis://host:6379/0".into())),
        }
        if let Some(var) = &r.password_env
            && !env_name_ok(var)
        {
            return Err((
                at("password_env"),
                "must name an environment variable (letters, digits, _), not hold a password".into(),
            ));
        }
        if r.key_prefix.is_empty()
            || r.key_prefix.contains(['{', '}'])
            || r.key_prefix.contains(char::is_whitespace)
        {
            return Err((at("key_prefix"), "must be a non-empty name without braces or spaces".into()));
        }
        if r.timeout < std::time::Duration::from_millis(1) || r.timeout > std::time::Duration::from_secs(10) {
            return Err((at("timeout"), "must be between 1ms and 10s".into()));
        }
        if r.replicas == 0 {
            return Err((at("replicas"), "must be at least 1".into()));
        }
    }
    Ok(())
}

/// The longest mock pacing; longer is a typo, and would overflow timers.
const MAX_MOCK_DELAY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks `providers.*.reasoning`; the error names a key under it, if one.
fn reasoning(provider: &ProviderConfig, r: &ReasoningConfig) -> Result<(), (Option<&'static str>, String)> {
    match provider.kind {
        ProviderKind::Gemini => Ok(()),
        ProviderKind::Anthropic => match r.budget_tokens {
            None => Err((Some("budget_tokens"), "is required for anthropic (its `thinking.budget_tokens`)".into())),
            Some(b) if b < 1024 => Err((Some("budget_tokens"), "must be at least 1024 for anthropic".into())),
            Some(b) if b >= provider.default_max_tokens => Err((
                Some("budget_tokens"),
                format!(
                    "must be below default_max_tokens ({}): Anthropic counts thinking in max_tokens",
                    provider.default_max_tokens
                ),
            )),
            Some(_) => Ok(()),
        },
        ProviderKind::Openai | ProviderKind::Mock => Err((
            None,
            "applies to kind gemini and anthropic only; an OpenAI-compatible server's reasoning text is forwarded unasked".into(),
        )),
    }
}
