//! llm-gateway: a streaming-first gRPC gateway to LLM providers.
//! `app` is the composition root; the other modules are its layers.

pub mod admin;
pub mod admission;
pub mod api;
pub mod app;
pub mod chat;
pub mod config;
pub mod core;
pub mod http;
pub mod listener;
pub mod providers;
pub mod reload;
pub mod routing;
pub mod server;
pub mod streams;
pub mod telemetry;
pub mod tls;
pub mod watchdog;
