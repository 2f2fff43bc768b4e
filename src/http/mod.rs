//! The OpenAI-compatible HTTP front door (`http_listen`, CONTRACT.md section
//! 8): `POST /v1/chat/completions` and `GET /v1/models`, a thin adapter over
//! the call core like `api/` is for gRPC (OpenAI JSON to chat types and back,
//! headers to plain values, one map from the core's errors to HTTP). No
//! axum or hyper type goes below this module.

mod error;
mod handlers;
mod headers;
mod request;
mod response;
mod sse;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};

pub use error::HTTP;

use crate::{config::ServerConfig, core::Core};

/// What the endpoints share.
pub struct HttpState {
    pub core: Arc<Core>,
    pub max_request_bytes: usize,
    pub body_read_timeout: Duration,
    /// Unix seconds at start-up: each model's `created`.
    pub started: u64,
}

/// The routes of the front door.
pub fn router(core: Arc<Core>, server: &ServerConfig) -> Router {
    let state = Arc::new(HttpState {
        core,
        max_request_bytes: server.max_request_bytes,
        body_read_timeout: server.body_read_timeout,
        started: handlers::started(),
    });
    Router::new()
        .route(
            "/v1/chat/completions",
            post(handlers::chat_completions).fallback(handlers::method_not_allowed),
        )
        .route("/v1/models", get(handlers::models).fallback(handlers::method_not_allowed))
        .fallback(handlers::not_found)
        .with_state(state)
}
