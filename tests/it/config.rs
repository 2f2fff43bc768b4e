//! `llm-gateway check-config`: exit 0 on a good file; on a bad one, non-zero
//! with a message naming the key and its line.

use std::path::{Path, PathBuf};

use crate::harness::{check_config, config};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the config");
    path
}

/// Runs check-config on `text`, expects a failure, and returns stderr.
async fn rejected(text: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "bad.yaml", text);
    let (status, _, stderr) = check_config(&path).await;
    assert!(!status.success(), "check-config accepted:\n{text}");
    stderr
}

/// The first line of the message (what a one-line log shows, before any
/// source excerpt) names the key and the line.
fn assert_names(stderr: &str, key: &str, line: usize) {
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains(key), "the first line names the key {key:?}: {first}\n(all of stderr:\n{stderr})");
    assert!(first.contains(&format!("line {line}")), "the first line names line {line}: {first}");
}

#[tokio::test]
async fn a_good_file_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text =
        format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{}", config("https://api.example.com/v1"));
    let path = write(dir.path(), "good.yaml", &text);
    let (status, stdout, stderr) = check_config(&path).await;
    assert!(status.success(), "check-config refused a good file: {stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[tokio::test]
async fn an_unknown_key_is_named_with_its_line() {
    let stderr = rejected(
        "\
providers:
  mk:
    kind: mock
    tokens_typo: 3
models:
  m:
    targets: [{ provider: mk, model: x }]
",
    )
    .await;
    assert_names(&stderr, "tokens_typo", 4);
}

#[tokio::test]
async fn an_unknown_top_level_key_is_named_with_its_line() {
    let stderr = rejected(
        "\
providers:
  mk:
    kind: mock
models:
  m:
    targets: [{ provider: mk, model: x }]
listen_address: 0.0.0.0:1
",
    )
    .await;
    assert_names(&stderr, "listen_address", 7);
}

#[tokio::test]
async fn an_unknown_provider_in_a_target_is_named_with_its_line() {
    let stderr = rejected(
        "\
providers:
  mk:
    kind: mock
models:
  m:
    targets:
      - provider: mk
        model: x
      - provider: nope
        model: y
",
    )
    .await;
    assert_names(&stderr, "models.m.targets[1].provider", 9);
    assert!(stderr.contains("nope"), "{stderr}");
}

// A bad value (here from the `duration` deserializer) is named by the key on
// the line the error points at.
#[tokio::test]
async fn a_bad_duration_is_named_with_its_line() {
    let stderr = rejected(
        "\
server:
  shutdown_grace: soon
providers:
  mk:
    kind: mock
models:
  m:
    targets: [{ provider: mk, model: x }]
",
    )
    .await;
    assert_names(&stderr, "shutdown_grace", 2);
    assert!(stderr.contains("soon"), "{stderr}");
}

#[tokio::test]
async fn the_example_config_passes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.yaml");
    assert!(path.exists(), "config/example.yaml is missing: CONTRACT.md section 3 asks for it");
    let (status, stdout, stderr) = check_config(&path).await;
    assert!(status.success(), "check-config refused config/example.yaml:\n{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}
