//! Metrics of admission: calls admitted and refused, the queue, budgets
//! left per key, and the Redis round trips behind them. Labels are config
//! names and fixed reasons only.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Admission: decisions, the queue, budgets, and the Redis behind them.
pub struct AdmissionMetrics {
    admitted: Counter,
    refused: Family<RefusalLabels, Counter>,
    queue_wait: Histogram,
    queue_depth: Gauge<i64, AtomicI64>,
    budget_tokens_left: Family<KeyLabels, Gauge<i64, AtomicI64>>,
    budget_usd_left: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    redis_round_trip: Histogram,
    redis_errors: Family<KindLabels, Counter>,
    redis_up: Gauge<i64, AtomicI64>,
    local_fallback: Counter,
    admitted_ahead: Counter,
    held_ahead: Gauge<i64, AtomicI64>,
}

impl AdmissionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            admitted: Counter::default(),
            refused: Family::default(),
            // 0.5 ms .. ~65 s
            queue_wait: Histogram::new(exponential_buckets(0.0005, 2.0, 18)),
            queue_depth: Gauge::default(),
            budget_tokens_left: Family::default(),
            budget_usd_left: Family::default(),
            // 50 us .. ~1.6 s
            redis_round_trip: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            redis_errors: Family::default(),
            redis_up: Gauge::default(),
            local_fallback: Counter::default(),
            admitted_ahead: Counter::default(),
            held_ahead: Gauge::default(),
        };
        registry.register(
            "llm_gateway_admission_admitted",
            "Calls admitted by the limits",
            m.admitted.clone(),
        );
        registry.register(
            "llm_gateway_admission_refused",
            "Refusals by reason (RATE_LIMITED, ...) and scope (key or target)",
            m.refused.clone(),
        );
        registry.register_with_unit(
            "llm_gateway_admission_queue_wait",
            "Time calls waited in the queue for a target's limits",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        registry.register(
            "llm_gateway_admission_queue_depth",
            "Calls waiting in the queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "llm_gateway_budget_remaining_tokens",
            "Tokens left in the key's budget window",
            m.budget_tokens_left.clone(),
        );
        registry.register(
            "llm_gateway_budget_remaining_usd",
            "USD left in the key's budget window",
            m.budget_usd_left.clone(),
        );
        registry.register_with_unit(
            "llm_gateway_redis_round_trip",
            "Admission round trips to Redis",
            Unit::Seconds,
            m.redis_round_trip.clone(),
        );
        registry.register(
            "llm_gateway_redis_errors",
            "Admission round trips to Redis that failed, by kind (timeout, error)",
            m.redis_errors.clone(),
        );
        registry.register(
            "llm_gateway_redis_up",
            "1 while Redis answers, 0 during an incident",
            m.redis_up.clone(),
        );
        registry.register(
            "llm_gateway_admission_local_fallback",
            "Admission steps decided by local limits because Redis was unreachable",
            m.local_fallback.clone(),
        );
        registry.register(
            "llm_gateway_admission_admitted_ahead",
            "Calls admitted by a reservation made in Redis before they came",
            m.admitted_ahead.clone(),
        );
        registry.register(
            "llm_gateway_admission_held_ahead",
            "Reservations made in Redis ahead of calls, held now",
            m.held_ahead.clone(),
        );
        m
    }
}

impl AdmissionMetrics {
    pub fn admitted(&self) {
        self.admitted.inc();
    }

    pub fn refused(&self, reason: &'static str, scope: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason, scope }).inc();
    }

    pub fn queue_wait(&self, waited: std::time::Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    pub fn queue_depth(&self, depth: usize) {
        self.queue_depth.set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub fn budget_left(&self, key: &str, tokens: Option<u64>, usd: Option<f64>) {
        let labels = KeyLabels { key: key.to_owned() };
        if let Some(t) = tokens {
            self.budget_tokens_left.get_or_create(&labels).set(i64::try_from(t).unwrap_or(i64::MAX));
        }
        if let Some(u) = usd {
            self.budget_usd_left.get_or_create(&labels).set(u);
        }
    }

    pub fn redis_round_trip(&self, took: std::time::Duration) {
        self.redis_round_trip.observe(took.as_secs_f64());
    }

    pub fn redis_error(&self, kind: &'static str) {
        self.redis_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    pub fn local_fallback(&self) {
        self.local_fallback.inc();
    }

    /// A call took a reservation made ahead.
    pub fn admitted_ahead(&self) {
        self.admitted_ahead.inc();
    }

    /// Reservations made ahead came (`delta` > 0) or went.
    pub fn held_ahead(&self, delta: i64) {
        self.held_ahead.inc_by(delta);
    }
}
