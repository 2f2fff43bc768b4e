//! Replays every committed fuzz input (`fuzz/corpus/<target>/`) through the
//! checks its fuzz target runs, so CI keeps every past finding without
//! libFuzzer or a nightly toolchain.

use std::path::Path;

use llm_gateway::config::ProviderKind;

#[path = "../../fuzz/src/checks.rs"]
mod checks;

/// A fuzz target's name and its check.
type Target = (&'static str, fn(&[u8]));

/// The fuzz targets, as `fuzz/Cargo.toml` names them.
const TARGETS: &[Target] = &[
    ("sse_events", checks::sse_events),
    ("translate_openai", |d| checks::translate(ProviderKind::Openai, d)),
    ("translate_anthropic", |d| checks::translate(ProviderKind::Anthropic, d)),
    ("events_openai", |d| checks::translate_events(ProviderKind::Openai, d)),
    ("events_anthropic", |d| checks::translate_events(ProviderKind::Anthropic, d)),
    ("translate_gemini", |d| checks::translate(ProviderKind::Gemini, d)),
    ("events_gemini", |d| checks::translate_events(ProviderKind::Gemini, d)),
    ("config", checks::config),
    ("grpc_timeout", checks::grpc_timeout),
];

#[test]
fn every_committed_fuzz_input_passes_its_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no seed inputs", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("read a corpus file");
            let replay = std::panic::catch_unwind(|| check(&data));
            assert!(replay.is_ok(), "{} fails its fuzz check", file.display());
        }
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
        .expect("fuzz/Cargo.toml");
    let declared = manifest.lines().filter(|l| l.trim_start().starts_with("name = ")).count() - 1;
    assert_eq!(declared, TARGETS.len(), "a fuzz target in fuzz/Cargo.toml is not replayed here");
}
