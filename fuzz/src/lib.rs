//! The checks the fuzz targets run; `tests/it/fuzz_corpus.rs` includes the
//! same file to replay the committed corpus under `cargo test`.

pub mod checks;
