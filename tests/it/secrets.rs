//! No secret in any output. The real binary runs with a provider key, a
//! client key and a proxy password set to values unique to this run, at
//! debug log level and exporting spans; the test drives every error path it
//! can reach (no key, wrong keys, upstream 401/403/400/429/500 and mid-stream
//! errors that echo the key they were sent, a proxy that is down, config
//! errors) and searches everything the gateway said: stdout, stderr, each
//! status (message, details, trailers), /metrics and the exported spans.
//!
//! The Redis password (`redis.password_env`) has a test of its own: right
//! (a protected Redis admits calls), wrong, and Redis gone.

use std::path::Path;

use llm_gateway::api::pb::{self, llm_gateway_client::LlmGatewayClient};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    harness::{
        Binary, WAIT, check_config, completion_request, connect, eventually, http, stream_request, within,
    },
    redis_server::RedisServer,
    trace::Collector,
    upstream::{Reply, Step, Upstream, refused_url},
    wire::openai,
};

/// A value that appears nowhere unless the gateway wrote it out.
fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

const KEY_VAR: &str = "LLMGW_SECRETS_TEST_PROVIDER_KEY";

struct Secrets {
    provider_key: String,
    client_key: String,
    wrong_key: String,
    proxy_password: String,
}

impl Secrets {
    fn new() -> Self {
        Self {
            provider_key: unique("sk-provider-"),
            client_key: unique("sk-client-"),
            wrong_key: unique("sk-wrong-"),
            proxy_password: unique("proxy-pw-"),
        }
    }

    /// Fails the test if `text` (from `source`) holds any of the secrets.
    fn assert_absent(&self, source: &str, text: &str) {
        for (what, secret) in [
            ("the provider key", &self.provider_key),
            ("the client key", &self.client_key),
            ("a wrong client key", &self.wrong_key),
            ("the proxy password", &self.proxy_password),
        ] {
            // A key cut in half still leaks most of it.
            let half = &secret[..secret.len() / 2 + 4];
            if let Some(at) = text.find(half) {
                let from = at.saturating_sub(200);
                let shown: String = text[from..].chars().take(400).collect();
                panic!("{what} appears in {source}:\n…{shown}…");
            }
        }
    }
}

/// An upstream that rejects or breaks off according to the model asked for,
/// quoting the key it was sent, as some vendors do.
async fn echoing_upstream() -> Upstream {
    Upstream::with(|_, req| {
        let key = req.header("authorization").or(req.header("x-api-key")).unwrap_or("").to_owned();
        let model = req.json()["model"].as_str().unwrap_or("").to_owned();
        let echo = format!("Incorrect API key provided: {key}");
        match model.as_str() {
            "u401" => Reply::error(401, &echo),
            "u403" => Reply::error(403, &echo),
            "u400" => Reply::error(400, &echo),
            "u429" => Reply::error(429, &echo).with_header("retry-after", "1"),
            "u500" => Reply::error(500, &echo),
            "mid" => {
                let error = serde_json::json!({"error": {"message": echo, "type": key}});
                Reply::sse(vec![
                    Step::send(openai::role("c", "gpt")),
                    Step::send(openai::content("c", "gpt", "partial")),
                    Step::send(openai::data(&error)),
                ])
            }
            "an401" => Reply::json(
                401,
                &serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": echo}}),
            ),
            _ => Reply::events(&openai::answer("c", "gpt", &["fine"], "stop", 1, 1)),
        }
    })
    .await
}

fn gateway_yaml(base_url: &str, proxy: &str, client_key: &str) -> String {
    let mut models = String::new();
    for (name, provider) in [
        ("u401", "oa"),
        ("u403", "oa"),
        ("u400", "oa"),
        ("u429", "oa"),
        ("u500", "oa"),
        ("mid", "oa"),
        ("an401", "an"),
        ("ok", "oa"),
        ("px", "px"),
    ] {
        models.push_str(&format!("  {name}:\n    targets: [{{ provider: {provider}, model: {name} }}]\n"));
    }
    let digest = hex::encode(Sha256::digest(client_key.as_bytes()));
    let common = format!(
        "api_key_env: {KEY_VAR}\n    retry: {{ attempts: 1 }}\n    circuit_breaker: {{ failures: 0 }}"
    );
    format!(
        "\
providers:
  oa:
    kind: openai
    base_url: {base_url}
    {common}
  an:
    kind: anthropic
    base_url: {base_url}
    {common}
  px:
    kind: openai
    base_url: {base_url}
    {common}
    proxy: {proxy}
models:
{models}api_keys:
  - {{ name: team, key_sha256: \"{digest}\" }}
"
    )
}

/// The gateway's `/metrics` page.
async fn metrics_page(gw: &Binary) -> String {
    within(WAIT, "GET /metrics", http().get(gw.admin_url("/metrics")).send())
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

fn authorized<T>(message: T, value: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", value.parse().expect("ascii"));
    r
}

/// Everything a status shows a caller.
fn shown(status: &tonic::Status) -> String {
    format!(
        "{} | {:?} | {:?} | {}",
        status.message(),
        status.metadata(),
        status.get_error_details(),
        String::from_utf8_lossy(status.details())
    )
}

/// Every call the test makes: (what, code) and what the caller was shown.
async fn drive(client: &mut LlmGatewayClient<Channel>, s: &Secrets) -> Vec<(String, Code, String)> {
    let good = format!("Bearer {}", s.client_key);
    let mut seen = Vec::new();
    for auth in [format!("Bearer {}", s.wrong_key), s.wrong_key.clone(), format!("Basic {}", s.client_key)] {
        let r =
            within(WAIT, "Completion", client.completion(authorized(completion_request("ok", "hi"), &auth)))
                .await;
        let status = r.expect_err("a wrong key is refused");
        seen.push((format!("auth {auth:.12}"), status.code(), shown(&status)));
    }
    let r =
        within(WAIT, "ListModels", client.list_models(authorized(pb::ListModelsRequest {}, &auth_wrong(s))))
            .await;
    let status = r.expect_err("a wrong key is refused");
    seen.push(("ListModels".into(), status.code(), shown(&status)));
    for model in ["u401", "u403", "u400", "u429", "u500", "mid", "an401", "px", "ok"] {
        let r =
            within(WAIT, "Completion", client.completion(authorized(completion_request(model, "hi"), &good)))
                .await;
        let (code, text) = match r {
            Ok(response) => (Code::Ok, format!("{:?}", response)),
            Err(status) => (status.code(), shown(&status)),
        };
        seen.push((format!("Completion {model}"), code, text));
        let r = within(
            WAIT,
            "StreamCompletion",
            client.stream_completion(authorized(stream_request(model, "hi"), &good)),
        )
        .await;
        let (code, text) = match r {
            Err(status) => (status.code(), shown(&status)),
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut text = String::new();
                loop {
                    match within(WAIT, "a message", stream.message()).await {
                        Ok(Some(m)) => text.push_str(&format!("{m:?}")),
                        Ok(None) => break (Code::Ok, text),
                        Err(status) => break (status.code(), format!("{text}{}", shown(&status))),
                    }
                }
            }
        };
        seen.push((format!("StreamCompletion {model}"), code, text));
    }
    seen
}

fn auth_wrong(s: &Secrets) -> String {
    format!("Bearer {}", s.wrong_key)
}

#[tokio::test]
async fn no_secret_reaches_logs_errors_metrics_or_spans() {
    let s = Secrets::new();
    let up = echoing_upstream().await;
    let proxy_down = refused_url().await.replace("http://", &format!("socks5://user:{}@", s.proxy_password));
    let proxy_down = proxy_down.trim_end_matches("/v1").to_owned();
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let mut gw = Binary::start(
        &gateway_yaml(&up.base_url(), &proxy_down, &s.client_key),
        &[
            (KEY_VAR, s.provider_key.as_str()),
            ("RUST_LOG", "debug"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let mut client = LlmGatewayClient::new(connect(gw.grpc).await);
    let seen = drive(&mut client, &s).await;

    // The error paths were taken, and the upstream was sent the key it echoed.
    let code = |what: &str| seen.iter().find(|(w, ..)| w == what).map(|(_, c, _)| *c);
    assert_eq!(code("auth Bearer sk-wr"), Some(Code::Unauthenticated), "{seen:?}");
    assert_eq!(code("Completion u400"), Some(Code::InvalidArgument), "{seen:?}");
    assert_eq!(code("Completion u401"), Some(Code::Unavailable), "{seen:?}");
    assert_eq!(code("StreamCompletion mid"), Some(Code::Unavailable), "{seen:?}");
    assert_eq!(code("Completion px"), Some(Code::Unavailable), "{seen:?}");
    assert_eq!(code("Completion ok"), Some(Code::Ok), "{seen:?}");
    let sent = up.requests();
    assert!(
        sent.iter().any(|r| r.header("authorization") == Some(&format!("Bearer {}", s.provider_key))),
        "the upstream never saw the provider key: the test would prove nothing"
    );
    for (what, _, text) in &seen {
        s.assert_absent(&format!("what the caller of {what} was shown"), text);
    }

    let metrics = metrics_page(&gw).await;
    assert!(metrics.contains("llm_gateway_"), "{metrics}");
    s.assert_absent("/metrics", &metrics);

    let mut spans = Vec::new();
    eventually(WAIT, "the spans of every call", async || {
        spans = collector.all();
        spans.iter().filter(|s| s.name.contains("LlmGateway")).count() >= seen.len()
    })
    .await;
    s.assert_absent("the exported spans", &format!("{spans:?}"));

    gw.proc.signal("TERM");
    within(WAIT, "the gateway to exit", gw.proc.exit()).await;
    let stdout = gw.proc.stdout_text();
    assert!(stdout.contains("upstream attempt failed"), "debug logs ran: {stdout}");
    s.assert_absent("stdout", &stdout);
    s.assert_absent("stderr", &gw.proc.stderr_text());
}

/// check-config (and start-up, which loads the same way) on a file holding
/// credentials in a proxy URL, with an error on that line or next to it.
#[tokio::test]
async fn config_errors_never_quote_proxy_credentials() {
    let s = Secrets::new();
    // Only parsed, never dialled: a name that cannot resolve.
    let proxy = format!("socks5://user:{}@proxy.invalid:1080", s.proxy_password);
    let base = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:9/v1\n";
    let models = "models:\n  m:\n    targets: [{ provider: p, model: x }]\n";
    let cases = [
        format!("{base}    proxy: {}\n{models}", proxy.replace("socks5", "ftp")),
        format!("{base}    proxy: {proxy}\n    timeouts: {{ connect: soon }}\n{models}"),
        format!("{base}    timeouts: {{ connect: soon }}\n    proxy: {proxy}\n{models}"),
        format!("{base}    proxy: [{proxy}]\n{models}"),
        format!("{base}    proxy: {proxy}\n    proxy_typo: 1\n{models}"),
        format!("{base}    proxy: \"{proxy}\n{models}"),
        format!("{base}    api_key_env: {}\n{models}", s.provider_key),
        format!("{base}    api_key_env: \"{} x\"\n{models}", s.provider_key),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, text) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, text).expect("write the config");
        let (status, out, err) = check_config(Path::new(&path)).await;
        assert!(!status.success(), "check-config accepted:\n{text}");
        assert!(err.contains("config"), "an error was shown: {err}");
        s.assert_absent(&format!("check-config on\n{text}\n"), &format!("{out}{err}"));
    }
}

const REDIS_PW_VAR: &str = "LLMGW_SECRETS_TEST_REDIS_PASSWORD";

/// A call to model `m` of a gateway whose target limit lives in Redis:
/// the status it ends with, everything it showed.
async fn limited_call(gw: &Binary) -> (Code, String) {
    let mut client = LlmGatewayClient::new(connect(gw.grpc).await);
    match within(WAIT, "a limited call", client.completion(completion_request("m", "hi"))).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), shown(&status)),
    }
}

#[tokio::test]
async fn the_redis_password_never_shows() {
    let right = unique("redis-pw-");
    let wrong = unique("redis-wrong-");
    let mut redis = RedisServer::with_password(&right).await;
    let yaml = format!(
        "\
providers:
  mk:
    kind: mock
    limits: {{ rpm: 1000 }}
models:
  m:
    targets: [{{ provider: mk, model: \"lorem?tokens=4\" }}]
redis: {{ url: \"{}\", password_env: {REDIS_PW_VAR}, failure_mode: closed, timeout: 300ms }}
",
        redis.url()
    );
    let mut good = Binary::start(&yaml, &[(REDIS_PW_VAR, right.as_str()), ("RUST_LOG", "debug")]).await;
    let mut bad = Binary::start(&yaml, &[(REDIS_PW_VAR, wrong.as_str()), ("RUST_LOG", "debug")]).await;

    let (code, _) = limited_call(&good).await;
    assert_eq!(code, Code::Ok, "the right password admits the call");
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*")).await;
    assert!(!keys.is_empty(), "the admission went through the protected Redis");
    let (code, wrong_shown) = limited_call(&bad).await;
    assert_eq!(code, Code::Unavailable, "a wrong password fails closed: {wrong_shown}");
    redis.stop();
    let (code, gone_shown) = limited_call(&good).await;
    assert_eq!(code, Code::Unavailable, "Redis gone fails closed: {gone_shown}");

    let absent = |source: &str, text: &str| {
        for (what, secret) in [("the Redis password", &right), ("a wrong Redis password", &wrong)] {
            let half = &secret[..secret.len() / 2 + 4];
            assert!(!text.contains(half), "{what} appears in {source}:\n{text}");
        }
    };
    absent("the wrong password's refusal", &wrong_shown);
    absent("the refusal with Redis gone", &gone_shown);
    for gw in [&mut good, &mut bad] {
        absent("/metrics", &metrics_page(gw).await);
        gw.proc.signal("TERM");
        within(WAIT, "the gateway to exit", gw.proc.exit()).await;
        let stdout = gw.proc.stdout_text();
        assert!(stdout.contains("redis"), "the Redis incident was logged: {stdout}");
        absent("stdout", &stdout);
        absent("stderr", &gw.proc.stderr_text());
    }
}
