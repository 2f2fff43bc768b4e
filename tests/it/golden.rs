//! Golden transcripts: `tests/golden/<provider>/NAME.sse` is an upstream SSE
//! body as the provider's documentation shows it, and `NAME.expected` the
//! deltas the gateway yields from it, one per line (see
//! `llm_gateway::providers::transcript::render`). Each transcript is replayed
//! through the provider's real SSE splitting and translator whole, cut in two
//! at every byte (inside multi-byte characters too) and cut into small pieces
//! of several sizes; every replay must give the expected text.
//!
//! Adding a transcript needs no code: put `NAME.sse` in the folder, run
//! `GOLDEN_BLESS=1 cargo test --test it golden` to write `NAME.expected`
//! (that run fails on purpose), read it as you would code, and commit both.

use std::{fs, path::Path};

use bytes::Bytes;
use llm_gateway::{
    config::ProviderKind,
    providers::transcript::{render, replay},
};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
const PROVIDERS: &[(&str, ProviderKind)] = &[
    ("openai", ProviderKind::Openai),
    ("anthropic", ProviderKind::Anthropic),
    ("gemini", ProviderKind::Gemini),
];
/// Piece sizes for the many-piece cuts (the two-piece cuts cover every position).
const SIZES: &[usize] = &[1, 2, 3, 5, 7, 64];

fn replayed(kind: ProviderKind, pieces: Vec<Bytes>) -> String {
    render(&replay(kind, pieces))
}

fn pieces(body: &[u8], size: usize) -> Vec<Bytes> {
    body.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// What is wrong with one transcript, if anything.
fn check(kind: ProviderKind, sse: &Path, bless: bool) -> Option<String> {
    let name = sse.display();
    let body = fs::read(sse).unwrap_or_else(|e| panic!("read {name}: {e}"));
    let whole = replayed(kind, vec![Bytes::from(body.clone())]);
    let expected_path = sse.with_extension("expected");
    if bless {
        fs::write(&expected_path, &whole)
            .unwrap_or_else(|e| panic!("write {}: {e}", expected_path.display()));
        return Some(format!("{name}: wrote {}", expected_path.display()));
    }
    let Ok(expected) = fs::read_to_string(&expected_path) else {
        return Some(format!("{name}: no {} (write it with GOLDEN_BLESS=1)", expected_path.display()));
    };
    if whole != expected {
        return Some(format!("{name}: replayed whole\n--- expected\n{expected}--- got\n{whole}"));
    }
    for cut in 1..body.len() {
        let two = vec![Bytes::copy_from_slice(&body[..cut]), Bytes::copy_from_slice(&body[cut..])];
        let got = replayed(kind, two);
        if got != whole {
            return Some(format!("{name}: cut at byte {cut}\n--- whole\n{whole}--- cut\n{got}"));
        }
    }
    for &size in SIZES {
        let got = replayed(kind, pieces(&body, size));
        if got != whole {
            return Some(format!("{name}: in pieces of {size} bytes\n--- whole\n{whole}--- pieces\n{got}"));
        }
    }
    None
}

#[test]
fn every_transcript_replays_as_expected_whole_and_cut_anywhere() {
    let bless = std::env::var_os("GOLDEN_BLESS").is_some();
    let mut problems = Vec::new();
    for &(dir, kind) in PROVIDERS {
        let folder = Path::new(ROOT).join(dir);
        let mut transcripts: Vec<_> = fs::read_dir(&folder)
            .unwrap_or_else(|e| panic!("read {}: {e}", folder.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "sse"))
            .collect();
        transcripts.sort();
        assert!(transcripts.len() >= 5, "{}: too few transcripts ({})", folder.display(), transcripts.len());
        // The cuts at every byte land inside a multi-byte character only if
        // some transcript has one.
        assert!(
            transcripts.iter().any(|p| fs::read(p).is_ok_and(|b| b.iter().any(|&c| c >= 0x80))),
            "{}: no transcript holds a multi-byte UTF-8 character",
            folder.display()
        );
        problems.extend(transcripts.iter().filter_map(|p| check(kind, p, bless)));
    }
    assert!(problems.is_empty(), "{} transcript(s):\n\n{}", problems.len(), problems.join("\n\n"));
}

#[test]
fn a_wrong_expectation_is_caught() {
    // The comparison itself: a transcript whose output differs is reported.
    let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    let got = replayed(ProviderKind::Openai, vec![Bytes::from_static(body)]);
    assert_eq!(got, "content=\"a\"\nfinish=stop input=0 output=0 cached=0 reasoning_tokens=0\n");
    assert_ne!(got, replayed(ProviderKind::Anthropic, vec![Bytes::from_static(body)]));
}
