//! Reading and checking a config file. Every error names the key and, where
//! the file has it, the line, so an operator can fix it without guessing.

use std::{fmt, path::Path};

use super::{
    schema::{Config, ProviderKind},
    validate::validate,
};

const DEFAULT: &str = include_str!("default.yaml");

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file, when there is one.
    pub file: Option<String>,
    /// The key, as a path like `models.chat.targets[0].provider`.
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config")?;
        if let Some(file) = &self.file {
            write!(f, " {file}")?;
        }
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, " key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The embedded default: a mock provider and a `mock` model.
pub fn load_default() -> Result<Config, ConfigError> {
    parse(DEFAULT, None)
}

pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.display().to_string()),
        key: None,
        line: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, Some(&path.display().to_string()))
}

/// Parses and checks a config text.
pub fn parse(text: &str, file: Option<&str>) -> Result<Config, ConfigError> {
    let err = |key: Option<String>, line: Option<usize>, message: String| ConfigError {
        file: file.map(str::to_owned),
        key,
        line,
        // The parser quotes the file around an error: a proxy URL on a line
        // near it would show its password.
        message: redact_urls_in(&message),
    };
    let config: Config = serde_saphyr::from_str(text).map_err(|e| {
        let message = e.to_string();
        let line = line_in_message(&message);
        // serde names a field only for unknown or missing keys; for a bad
        // value, the key is the one written on the line the error points at.
        let key = key_in_message(&message).or_else(|| line.and_then(|l| key_on_line(text, l)));
        err(key, line, message)
    })?;
    validate(&config, text).map_err(|(path, message)| {
        let line = locate(text, &path);
        err(Some(path.join(".").replace(".[", "[")), line, message)
    })?;
    Ok(config)
}

/// A URL with its password (and user) replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("REDACTED");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(u) => u.to_string(),
        // Unparsable: keep only what cannot be a secret.
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("…@{host}"),
            None => url.to_owned(),
        },
    }
}

/// `text` with the credentials of every URL in it replaced: whatever
/// stands between a `://` and the last `@` on its line, so that a password
/// holding `/`, `,` or `:` is cut too.
fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut rest = line;
        while let Some(scheme_end) = rest.find("://") {
            let (head, tail) = rest.split_at(scheme_end + 3);
            out.push_str(head);
            match tail.rfind('@') {
                Some(at) => {
                    out.push_str("REDACTED");
                    rest = &tail[at..];
                }
                None => rest = tail,
            }
        }
        out.push_str(rest);
    }
    out
}

/// The public endpoint of a vendor's API.
pub fn default_base_url(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai => "https://api.openai.com/v1",
        ProviderKind::Anthropic => "https://api.anthropic.com/v1",
        ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta",
        ProviderKind::Mock => "",
    }
}

/// The line of a key path in a YAML text, by indentation: good enough for
/// block-style files, which is what operators write.
fn locate(text: &str, path: &[String]) -> Option<usize> {
    let mut want = path.iter().peekable();
    let mut found = None;
    let mut min_indent = 0usize;
    let mut index_seen: Option<(usize, usize)> = None; // (wanted index, seen so far)
    for (no, line) in text.lines().enumerate() {
        let Some(key) = want.peek() else { break };
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if indent < min_indent && found.is_some() {
            break;
        }
        if let Some(idx) = key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) {
            let Ok(idx) = idx.parse::<usize>() else { break };
            if trimmed.starts_with('-') && indent >= min_indent {
                let (wanted, seen) = index_seen.unwrap_or((idx, 0));
                if seen == wanted {
                    found = Some(no + 1);
                    want.next();
                    min_indent = indent + 1;
                    index_seen = None;
                    // A flow or inline item holds its keys on this line.
                    let rest = trimmed.trim_start_matches('-').trim_start();
                    while let Some(k) = want.peek() {
                        if rest.contains(&format!("{k}:")) || rest.starts_with(&format!("{k}:")) {
                            want.next();
                        } else {
                            break;
                        }
                    }
                    if rest.starts_with('{') {
                        break;
                    }
                } else {
                    index_seen = Some((wanted, seen + 1));
                }
            }
            continue;
        }
        let bare = trimmed.trim_start_matches("- ");
        let quoted = |k: &str| bare.starts_with(&format!("\"{k}\":")) || bare.starts_with(&format!("'{k}':"));
        if indent >= min_indent && (bare.starts_with(&format!("{key}:")) || quoted(key)) {
            found = Some(no + 1);
            want.next();
            min_indent = indent + 1;
        }
    }
    found
}

fn key_on_line(text: &str, line: usize) -> Option<String> {
    let content = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = content.trim_start().trim_start_matches("- ").split_once(':')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.contains(' ')).then(|| key.to_owned())
}

fn line_in_message(message: &str) -> Option<usize> {
    let at = message.find("line ")?;
    let digits: String = message[at + 5..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn key_in_message(message: &str) -> Option<String> {
    // serde names fields in backticks: "unknown field `foo`", "missing field `bar`".
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
listen: 127.0.0.1:0
providers:
  openai:
    kind: openai
    base_url: http://127.0.0.1:9/v1
    api_key_env: OPENAI_API_KEY
  m:
    kind: mock
models:
  chat:
    targets:
      - { provider: openai, model: gpt-4o-mini }
  other:
    targets:
      - provider: m
        model: mock
api_keys:
  - { name: team-a, key_sha256: \"2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\", models: [chat] }
";

    #[test]
    fn parses_the_contract_example() {
        let c = parse(GOOD, None).unwrap();
        assert_eq!(c.models["chat"].targets[0].model, "gpt-4o-mini");
        assert_eq!(c.api_keys[0].models, vec!["chat"]);
        assert_eq!(c.server.shutdown_grace.as_secs(), 30);
    }

    #[test]
    fn default_is_valid() {
        let c = load_default().unwrap();
        assert!(c.models.contains_key("mock"));
        assert_eq!(c.http_listen.map(|a| a.port()), Some(8080), "a newcomer gets the HTTP API too");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("    kind: mock\n", "    kind: mock\n    tokens_typo: 3\n");
        let e = parse(&text, Some("f.yaml")).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("tokens_typo"), "{shown}");
        assert_eq!(e.line, Some(9), "{shown}");
    }

    #[test]
    fn unknown_provider_names_key_and_line() {
        let text = GOOD.replace("provider: m\n", "provider: nope\n");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("models.other.targets[0].provider"));
        assert_eq!(e.line, Some(15), "{e}");
    }

    #[test]
    fn flow_item_line() {
        let text = GOOD.replace("provider: openai,", "provider: nope,");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.line, Some(12), "{e}");
    }

    #[test]
    fn gemini_and_reasoning() {
        let gemini = "  g:\n    kind: gemini\n    api_key_env: GEMINI_API_KEY\n    reasoning: { budget_tokens: 512 }\n";
        let text = GOOD.replace("  m:\n", &format!("{gemini}  m:\n"));
        let c = parse(&text, None).unwrap();
        assert_eq!(c.providers["g"].kind, ProviderKind::Gemini);
        assert_eq!(c.providers["g"].reasoning.as_ref().and_then(|r| r.budget_tokens), Some(512));
        assert_eq!(
            default_base_url(ProviderKind::Gemini),
            "https://generativelanguage.googleapis.com/v1beta"
        );

        let text = GOOD.replace(
            "    api_key_env: OPENAI_API_KEY\n",
            "    api_key_env: OPENAI_API_KEY\n    reasoning: {}\n",
        );
        let e = parse(&text, None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("providers.openai.reasoning"), Some(7)), "{e}");

        let claude = "  c:\n    kind: anthropic\n    default_max_tokens: 2000\n    reasoning:\n      budget_tokens: 4000\n";
        let text = GOOD.replace("  m:\n", &format!("{claude}  m:\n"));
        let e = parse(&text, None).unwrap_err();
        assert_eq!(
            (e.key.as_deref(), e.line),
            (Some("providers.c.reasoning.budget_tokens"), Some(11)),
            "{e}"
        );
        assert!(e.to_string().contains("default_max_tokens"), "{e}");
    }

    #[test]
    fn http_listen_and_its_limits() {
        let c = parse(GOOD, None).unwrap();
        assert_eq!(c.http_listen, None, "the HTTP front door is off unless asked for");
        let c = parse(&format!("http_listen: 127.0.0.1:8080\n{GOOD}"), None).unwrap();
        assert_eq!(c.http_listen.map(|a| a.port()), Some(8080));
        let e = parse(&format!("http_listen: nowhere\n{GOOD}"), None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("http_listen"), "{e}");
        let e = parse(&format!("{GOOD}server:\n  max_request_bytes: 10\n"), None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.max_request_bytes"), "{e}");
        let e = parse(&format!("{GOOD}server:\n  handshake_timeout: 0s\n"), None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.handshake_timeout"), "{e}");
    }

    #[test]
    fn routing_nonsense_is_refused_by_key_and_line() {
        let with = |from: &str, to: &str| {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "the replacement must apply: {from}");
            parse(&text, None).unwrap_err()
        };
        let e = with(
            "    api_key_env: OPENAI_API_KEY\n",
            "    api_key_env: OPENAI_API_KEY\n    retry: { attempts: 0 }\n",
        );
        assert_eq!(e.key.as_deref(), Some("providers.openai.retry.attempts"), "{e}");
        assert_eq!(e.line, Some(7), "{e}");
        let e = with(
            "    api_key_env: OPENAI_API_KEY\n",
            "    api_key_env: OPENAI_API_KEY\n    retry:\n      initial_backoff: 2s\n      max_backoff: 1s\n",
        );
        assert_eq!(e.key.as_deref(), Some("providers.openai.retry.max_backoff"), "{e}");
        assert_eq!(e.line, Some(9), "{e}");
        let e = with("model: gpt-4o-mini }", "model: gpt-4o-mini, weight: 0 }");
        assert_eq!(e.key.as_deref(), Some("models.chat.targets[0].weight"), "{e}");
        assert_eq!(e.line, Some(12), "{e}");
        let e = with(
            "    api_key_env: OPENAI_API_KEY\n",
            "    api_key_env: OPENAI_API_KEY\n    timeouts: { first_token: 0s }\n",
        );
        assert_eq!(e.key.as_deref(), Some("providers.openai.timeouts.first_token"), "{e}");
        let e = with("  chat:\n    targets:", "  chat:\n    hedge_after: 0s\n    targets:");
        assert_eq!(e.key.as_deref(), Some("models.chat.hedge_after"), "{e}");
        let e = with("    kind: openai\n", "    kind: openai\n    proxy: \"ftp://u:hunter2@h:1\"\n");
        assert_eq!(e.key.as_deref(), Some("providers.openai.proxy"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "credentials redacted: {e}");
        let e = with("  chat:\n    targets:", "  chat:\n    strategy: fastest\n    targets:");
        assert!(e.to_string().contains("fastest"), "{e}");
    }

    #[test]
    fn connection_limits_are_checked_by_key_and_line() {
        let c = parse(GOOD, None).unwrap();
        let s = &c.server;
        assert_eq!(
            (s.handshake_timeout.as_secs(), s.idle_timeout.as_secs(), s.max_connections, s.max_request_bytes),
            (10, 600, 4096, 4 << 20),
            "the defaults protect the process"
        );
        for (add, key) in [
            ("handshake_timeout: 0s", "server.handshake_timeout"),
            ("max_connections: 0", "server.max_connections"),
            ("max_request_bytes: 100", "server.max_request_bytes"),
        ] {
            let e = parse(&format!("{GOOD}server:\n  {add}\n"), None).unwrap_err();
            assert_eq!((e.key.as_deref(), e.line), (Some(key), Some(20)), "{e}");
        }
        let c = parse(&format!("{GOOD}server:\n  idle_timeout: 0s\n"), None).unwrap();
        assert!(c.server.idle_timeout.is_zero(), "0 turns the idle timeout off");
    }

    #[test]
    fn bad_duration_and_hash() {
        let text = format!("{GOOD}server:\n  shutdown_grace: soon\n");
        let e = parse(&text, None).unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        let text = format!("{GOOD}server:\n  shutdown_grace: 1000000000s\n");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("shutdown_grace"), "{e}");
        let text = GOOD.replace("2c26b4", "zz26b4");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("api_keys[0].key_sha256"));
        assert_eq!(e.line, Some(18), "{e}");
    }

    #[test]
    fn admission_keys_are_checked_by_key_and_line() {
        let cases = [
            // (replace in GOOD, add at the end, key, line)
            (
                "    kind: mock\n",
                "    kind: mock\n    limits: { rpm: 0 }\n",
                "providers.m.limits.rpm",
                Some(9),
            ),
            (
                "    api_key_env: OPENAI_API_KEY\n",
                "    api_key_env: OPENAI_API_KEY\n    model_limits:\n      gpt-5: { rpm: 1 }\n",
                "providers.openai.model_limits.gpt-5",
                Some(8),
            ),
            ("models: [chat] }", "models: [chat], budget: { window: 1d } }", "api_keys[0].budget", Some(18)),
            (
                "models: [chat] }",
                "models: [chat], limits: { concurrency: 0 } }",
                "api_keys[0].limits.concurrency",
                Some(18),
            ),
        ];
        for (from, to, key, line) in cases {
            let text = GOOD.replace(from, to);
            let e = parse(&text, None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.line, line, "{e}");
        }
        let tail = [
            ("prices:\n  - { provider: nope, model: x, input: 1, output: 1 }\n", "prices[0].provider", 20),
            ("prices:\n  - { provider: m, model: x, input: -1, output: 1 }\n", "prices[0].input", 20),
            ("redis:\n  url: rediss://r:6379\n", "redis.url", 20),
            ("redis:\n  url: redis://r:6379\n  password_env: \"p w\"\n", "redis.password_env", 21),
            ("redis:\n  url: redis://r:6379\n  key_prefix: \"{x}\"\n", "redis.key_prefix", 21),
            ("redis:\n  url: redis://r:6379\n  replicas: 0\n", "redis.replicas", 21),
            ("redis:\n  url: redis://r:6379/2\n  cluster: true\n", "redis.url", 20),
        ];
        for (add, key, line) in tail {
            let e = parse(&format!("{GOOD}{add}"), None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert_eq!(e.line, Some(line), "{e}");
        }
        let e = parse(&format!("{GOOD}redis:\n  url: redis://r:6379\n  failure_mode: maybe\n"), None)
            .unwrap_err();
        assert!(e.to_string().contains("maybe") && e.line == Some(21), "{e}");
        let ok = format!(
            "{GOOD}prices:\n  - {{ provider: openai, model: gpt-4o-mini, input: 0.15, output: 0.6 }}\nqueue: {{ max_wait: 2s, max_waiting: 5 }}\nredis: {{ url: \"redis://r:6379/0\", failure_mode: closed }}\n"
        );
        let c = parse(&ok, None).unwrap();
        let r = c.redis.unwrap();
        assert_eq!(
            (r.key_prefix.as_str(), r.failure_mode, r.replicas),
            ("llmgw", crate::config::FailureMode::Closed, 1)
        );
        assert_eq!(c.queue.max_waiting, 5);
    }

    #[test]
    fn max_timeout_is_checked_against_zero_and_the_default() {
        let c = parse(GOOD, None).unwrap();
        assert_eq!(c.server.max_timeout.as_secs(), 3600);
        let text = format!("{GOOD}server:\n  max_timeout: 0s\n");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.max_timeout"), "{e}");
        assert_eq!(e.line, Some(20), "{e}");
        let text = format!("{GOOD}server:\n  default_timeout: 2h\n");
        let e = parse(&text, None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("server.default_timeout"), "{e}");
        assert!(e.to_string().contains("1h"), "{e}");
        let text = format!("{GOOD}server:\n  default_timeout: 2h\n  max_timeout: 3h\n");
        assert_eq!(parse(&text, None).unwrap().server.default_timeout.as_secs(), 7200);
    }

    #[test]
    fn values_that_fail_every_call_are_refused() {
        let mock = "  m:\n    kind: mock\n";
        for (insert, key) in [
            ("    default_max_tokens: 0\n", "providers.m.default_max_tokens"),
            ("    mock: { first_token_delay: 30s }\n", "providers.m.mock.first_token_delay"),
            (
                "    timeouts: { first_token: 1s }\n    mock: { first_token_delay: 2s }\n",
                "providers.m.mock.first_token_delay",
            ),
            ("    mock: { token_delay: 2h }\n", "providers.m.mock.token_delay"),
            ("    timeouts: { read: 0s }\n", "providers.m.timeouts.read"),
        ] {
            let text = GOOD.replace(mock, &format!("{mock}{insert}"));
            let e = parse(&text, None).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{insert}: {e}");
            assert!(e.line.is_some(), "{e}");
        }
        let ok =
            GOOD.replace(mock, &format!("{mock}    mock: {{ first_token_delay: 29s, token_delay: 1h }}\n"));
        parse(&ok, None).unwrap();
        for (extra, key) in [
            ("telemetry:\n  log_level: \"info,=[\"\n", "telemetry.log_level"),
            ("telemetry:\n  export_interval: 0s\n", "telemetry.export_interval"),
            ("admin_listen: 127.0.0.1:0\n", ""),
        ] {
            let text = format!("{GOOD}{extra}");
            match parse(&text, None) {
                Err(e) => assert_eq!(e.key.as_deref(), Some(key), "{extra}: {e}"),
                Ok(_) => assert_eq!(key, "", "{extra} was accepted"),
            }
        }
        let text =
            GOOD.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:7000\nadmin_listen: 127.0.0.1:7000");
        assert_eq!(parse(&text, None).unwrap_err().key.as_deref(), Some("admin_listen"));
    }

    #[test]
    fn urls_in_messages_lose_their_credentials() {
        let shown = redact_urls_in("4 |   proxy: socks5://u:p/a,s@s@h:1\n5 | x: http://h/@y z\nno url @ all");
        assert_eq!(shown, "4 |   proxy: socks5://REDACTED@h:1\n5 | x: http://REDACTED@y z\nno url @ all");
        let text = "providers:\n  p:\n    kind: openai\n    proxy: socks5://user:pw-secret@127.0.0.1:1080\n    timeouts: { connect: soon }\nmodels:\n  m:\n    targets: [{ provider: p, model: x }]\n";
        let e = parse(text, None).unwrap_err().to_string();
        assert!(e.contains("soon") && !e.contains("pw-secret"), "{e}");
    }
}
