//! The integration tests of llm-gateway: one binary, the gateway in process
//! or as the real binary, a fake upstream speaking each wire format.
#![expect(clippy::expect_used, clippy::panic, reason = "tests fail loudly")]

mod harness;
mod redis_server;
mod socks;
mod upstream;
mod wire;

mod admission;
mod auth;
mod cancel;
mod config;
mod conn_age;
mod deadline;
mod errors;
mod fail_closed;
mod fallback;
mod fuzz_corpus;
mod gemini;
mod golden;
mod headers;
mod http;
mod limits;
mod metrics;
mod openai_sdk;
mod parity;
mod pool;
mod reload;
mod routing;
mod secrets;
mod service;
mod shutdown;
mod sse;
mod streaming;
mod tls;
mod tools;
mod trace;
