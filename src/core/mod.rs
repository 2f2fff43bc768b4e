//! The protocol-neutral call core: what happens to every call whichever front
//! door it came through. Its ids, deadline, trace context and server span;
//! auth; validation; routing to the first delta; the committed answer stream
//! (deadline and hard stop watched); the metrics record and the log line.
//! Front doors (`api/` for gRPC, `http/` for OpenAI's HTTP API) translate
//! their wire format to these types and map [`CallError`] to their statuses.
//! Nothing here knows a protocol's types: metadata arrives as plain values.

mod auth;
mod call;
mod collect;
mod error;
mod open;
mod stream;
pub mod validate;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use auth::{Caller, INVALID_KEY, KeyError, Keys, MISSING_KEY};
pub(crate) use call::call_span;
pub use call::{Call, CallMeta, Door, Outcome, new_id};
pub use collect::Answer;
pub use error::{CallError, Reason};
pub use open::{ModelInfo, Validated, WireRequest};
pub use stream::CallStream;

use crate::{admission::Admission, routing::Router, telemetry::metrics::Metrics};

/// What a config reload replaces, all at once: models and providers (the
/// router), the client keys, and their limits, budgets and prices
/// (admission). A call takes the snapshot once, when it starts, and keeps it
/// to its end, so a reload never changes a call in flight. Limits kept in
/// Redis carry over a reload; local counters start afresh.
pub struct Live {
    pub router: Router,
    pub keys: Keys,
    pub admission: Arc<Admission>,
}

/// What every call needs, shared by all of them and by every front door.
pub struct Core {
    /// The reloadable part of the config (see [`Live`]).
    pub live: ArcSwap<Live>,
    pub metrics: Arc<Metrics>,
    /// The deadline of a call whose caller asked for none; 0: none.
    pub default_timeout: Duration,
    /// The longest deadline any call gets, whatever its caller asked.
    pub max_timeout: Duration,
    /// Record prompts and completions on spans (`telemetry.record_content`).
    pub record_content: bool,
    /// Set when the gateway starts draining: new calls are refused.
    pub draining: CancellationToken,
    /// Set when the grace period is over: calls in flight are cancelled.
    pub hard_stop: CancellationToken,
    /// Holds one token per call in flight (the drain waits on it).
    pub calls: TaskTracker,
}

impl Core {
    /// Starts the record of a call that came through `door` (see [`Call::start`]).
    pub fn start(
        &self,
        door: &'static Door,
        method: &'static str,
        span: tracing::Span,
        meta: &CallMeta<'_>,
    ) -> Call {
        Call::start(
            door,
            method,
            span,
            meta,
            call::Timeouts { default: self.default_timeout, max: self.max_timeout },
            self.metrics.clone(),
            self.calls.token(),
        )
    }
}
