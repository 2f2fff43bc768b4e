//! The parts of the gateway bench: the fake upstream, the gateway child
//! process, the load client, the OTLP collector, the measurements and the
//! report.

pub mod collector;
pub mod load;
pub mod perf;
pub mod phases;
pub mod process;
pub mod redis;
pub mod report;
pub mod soak;
pub mod tensorzero;
pub mod upstream;
pub mod versus;

/// Errors of the bench's own setup; they end the run with a message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Names of the bench's runtime threads, by which their CPU time is read.
pub const CLIENT_THREADS: &str = "bench-client";
pub const UPSTREAM_THREADS: &str = "bench-upstream";
pub const COLLECTOR_THREADS: &str = "bench-collector";

/// The hex SHA-256 of a client key, as `api_keys[].key_sha256` holds it.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}
