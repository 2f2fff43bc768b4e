//! The integration tests of llm-gateway: one binary, the gateway in process
//! or as the real binary, a fake upstream speaking each wire format.
#![expect(clippy::expect_used, clippy::panic, reason = "tests fail loudly")]

mod harness;
mod socks;
mod upstream;
mod wire;

mod auth;
mod cancel;
mod config;
mod deadline;
mod errors;
mod fail_closed;
mod fallback;
mod fuzz_corpus;
mod headers;
mod metrics;
mod routing;
mod secrets;
mod service;
mod shutdown;
mod sse;
mod streaming;
mod tools;
mod trace;
