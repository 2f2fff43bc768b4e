//! The endpoints: `POST /v1/chat/completions` (one `chat.completion`, or a
//! `chat.completion.chunk` stream ending in `data: [DONE]`) and
//! `GET /v1/models`. Each reads its headers, hands the call to the call core,
//! and answers in OpenAI's shapes.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tracing::Instrument;

use super::{
    HttpState,
    error::{error_response, plain},
    headers::{authorization, call_headers, call_meta, span},
    request::ChatCompletionRequest,
    response::{self, ChunkWriter},
    sse::SseBody,
};
use crate::core::CallError;

const CHAT: &str = "POST /v1/chat/completions";
const MODELS: &str = "GET /v1/models";

pub async fn chat_completions(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let core = &state.core;
    let span = span(CHAT, "POST", "/v1/chat/completions", parts.version);
    let mut call = core.start(&super::HTTP, CHAT, span.clone(), &call_meta(&parts.headers));
    let body = read_body(body, parts.headers.get(header::CONTENT_LENGTH), &state).instrument(span).await;
    let request = match body.and_then(|b| ChatCompletionRequest::parse(&b)) {
        Ok(r) => r,
        Err(e) => return error_response(&mut call, e),
    };
    let authorization = authorization(&parts.headers);
    if request.stream {
        let writer = ChunkWriter::new(unix_now(), request.include_usage);
        match core.open_stream(&mut call, authorization, request).await {
            Ok(routed) => {
                let mut headers = call_headers(&call);
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                // A proxy in front (nginx) must not hold events back either.
                headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
                let body = SseBody::new(core.commit(call, routed), writer);
                (headers, Body::from_stream(body)).into_response()
            }
            Err(e) => error_response(&mut call, e),
        }
    } else {
        match core.complete(&mut call, authorization, request).await {
            Ok(answer) => {
                let model = call.upstream_model().map(|m| &**m).unwrap_or_default();
                let body = response::completion(&answer, model, unix_now());
                let mut headers = call_headers(&call);
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (headers, body).into_response()
            }
            Err(e) => error_response(&mut call, e),
        }
    }
}

pub async fn models(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let core = &state.core;
    let headers = request.headers();
    let span = span(MODELS, "GET", "/v1/models", request.version());
    let mut call = core.start(&super::HTTP, MODELS, span, &call_meta(headers));
    match core.models(&mut call, authorization(headers)) {
        Ok(models) => {
            let mut out = call_headers(&call);
            out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            (out, response::models(&models, state.started)).into_response()
        }
        Err(e) => error_response(&mut call, e),
    }
}

pub async fn not_found(request: Request) -> Response {
    let message = format!("no route {} {}", request.method(), request.uri().path());
    plain(StatusCode::NOT_FOUND, &message, "not_found")
}

pub async fn method_not_allowed(request: Request) -> Response {
    let message = format!("{} is not allowed on {}", request.method(), request.uri().path());
    plain(StatusCode::METHOD_NOT_ALLOWED, &message, "method_not_allowed")
}

/// The whole body, at most `server.max_request_bytes`, within
/// `server.body_read_timeout`.
async fn read_body(body: Body, length: Option<&HeaderValue>, state: &HttpState) -> Result<Bytes, CallError> {
    let limit = state.max_request_bytes;
    let declared = length.and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(CallError::RequestTooLarge { limit });
    }
    let read = async {
        let mut stream = body.into_data_stream();
        // What the caller declares is not trusted with memory before it is sent.
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(64 << 10));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| CallError::invalid("body", format!("could not be read: {e}")))?;
            if buf.len() + chunk.len() > limit {
                return Err(CallError::RequestTooLarge { limit });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(state.body_read_timeout, read)
        .await
        .unwrap_or(Err(CallError::RequestTimeout(state.body_read_timeout)))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Seconds since the epoch when the gateway started: `created` of each model.
pub fn started() -> u64 {
    unix_now()
}
