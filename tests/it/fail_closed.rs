//! Configuration fails closed: a key that cannot be used stops start-up,
//! values that would fail every call are refused by `check-config`, and a
//! gateway open to the network without keys says so when it starts.

use std::ffi::OsStr;

use llm_gateway::app::{self, AppError, Listeners};

use crate::harness::{Proc, WAIT, check_config, within};

const MOCK: &str = "\
providers:
  mk:
    kind: mock
models:
  m:
    targets: [{ provider: mk, model: x }]
";

const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// check-config on `text` fails, naming `key` and `line` on its first line.
async fn refused(text: &str, key: &str, line: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).expect("write the config");
    let (status, _, stderr) = check_config(&path).await;
    assert!(!status.success(), "check-config accepted:\n{text}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains(&format!("`{key}`")), "names {key}: {first}\n{text}");
    assert!(first.contains(&format!("line {line}")), "names line {line}: {first}\n{text}");
}

#[tokio::test]
async fn check_config_refuses_values_that_fail_every_call() {
    let mock_with = |extra: &str| MOCK.replace("    kind: mock\n", &format!("    kind: mock\n{extra}"));
    refused(&format!("server:\n  max_timeout: 0s\n{MOCK}"), "server.max_timeout", 2).await;
    refused(
        &format!("server:\n  default_timeout: 2h\n  max_timeout: 1h\n{MOCK}"),
        "server.default_timeout",
        2,
    )
    .await;
    refused(&mock_with("    timeouts: { first_token: 0s }\n"), "providers.mk.timeouts.first_token", 4).await;
    refused(&mock_with("    default_max_tokens: 0\n"), "providers.mk.default_max_tokens", 4).await;
    refused(
        &mock_with("    timeouts:\n      first_token: 1s\n    mock:\n      first_token_delay: 1s\n"),
        "providers.mk.mock.first_token_delay",
        7,
    )
    .await;
    refused(&format!("{MOCK}telemetry:\n  export_interval: 0s\n"), "telemetry.export_interval", 8).await;
}

#[tokio::test]
async fn a_key_digest_that_does_not_parse_stops_start_up() {
    // The loader refuses it first; a config built another way must not get
    // past start-up either, with the key silently dropped.
    let text = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{MOCK}api_keys:\n  - {{ name: a, key_sha256: \"{DIGEST}\" }}\n"
    );
    let mut config = llm_gateway::config::parse(&text, None).expect("a valid config");
    config.api_keys[0].key_sha256.replace_range(..2, "zz");
    let listeners = Listeners::bind(&config).await.expect("bind");
    let result =
        within(WAIT, "app::run to refuse", app::run(config, listeners, std::future::pending())).await;
    match result {
        Err(e @ AppError::Keys(_)) => assert!(e.to_string().contains("api_keys[0]"), "{e}"),
        other => panic!("start-up went on: {other:?}"),
    }
}

/// Starts the binary on `yaml` and returns its log lines up to `serving`.
async fn start_up_log(yaml: &str) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    let mut proc = Proc::spawn(&[OsStr::new("--config"), path.as_os_str()], &[]);
    within(WAIT, "the `serving` line", proc.line(|l| l.contains("\"serving\""))).await;
    proc.stdout_text().lines().map(|l| serde_json::from_str(l).expect("JSON log line")).collect()
}

fn auth_off_warning(log: &[serde_json::Value]) -> Option<&serde_json::Value> {
    log.iter().find(|l| l["message"].as_str().is_some_and(|m| m.starts_with("auth is off")))
}

#[tokio::test]
async fn no_keys_on_a_non_loopback_listener_warns_that_auth_is_off() {
    let log = start_up_log(&format!("listen: 0.0.0.0:0\nadmin_listen: 127.0.0.1:0\n{MOCK}")).await;
    let warning = auth_off_warning(&log).unwrap_or_else(|| panic!("no auth-off warning in {log:?}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["listen"], "0.0.0.0:0", "{warning}");

    let log = start_up_log(&format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{MOCK}")).await;
    assert!(auth_off_warning(&log).is_none(), "a loopback listener needs no warning: {log:?}");
    let log = start_up_log(&format!(
        "listen: 0.0.0.0:0\nadmin_listen: 127.0.0.1:0\n{MOCK}api_keys:\n  - {{ name: a, key_sha256: \"{DIGEST}\" }}\n"
    ))
    .await;
    assert!(auth_off_warning(&log).is_none(), "keys are set: {log:?}");
}
