//! Metrics of routing's decisions: circuit breakers, retries, hedges,
//! cool-downs and proxy fallbacks. Labels are config names only.

use std::sync::{LazyLock, atomic::AtomicI64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub provider: String,
    pub model: String,
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HedgeLabels {
    pub model: String,
    pub outcome: &'static str,
}

/// Counted by `providers/` where a proxy could not be used; a static so the
/// providers need no handle on the registry.
pub static PROXY_FALLBACKS: LazyLock<Family<ProviderLabels, Counter>> = LazyLock::new(Family::default);

pub struct RoutingMetrics {
    circuit_state: Family<TargetLabels, Gauge<i64, AtomicI64>>,
    transitions: Family<TransitionLabels, Counter>,
    retries: Family<ProviderLabels, Counter>,
    hedges: Family<HedgeLabels, Counter>,
    cool_downs: Family<TargetLabels, Counter>,
}

impl RoutingMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            circuit_state: Family::default(),
            transitions: Family::default(),
            retries: Family::default(),
            hedges: Family::default(),
            cool_downs: Family::default(),
        };
        registry.register(
            "llm_gateway_circuit_state",
            "Circuit breaker state per target: 0 closed, 1 open, 2 half-open",
            m.circuit_state.clone(),
        );
        registry.register(
            "llm_gateway_circuit_transitions",
            "Circuit breaker state changes per target",
            m.transitions.clone(),
        );
        registry.register(
            "llm_gateway_retries",
            "Retries of a target after a failed attempt",
            m.retries.clone(),
        );
        registry.register(
            "llm_gateway_hedges",
            "Hedged attempts started, and those that won",
            m.hedges.clone(),
        );
        registry.register(
            "llm_gateway_target_cooldowns",
            "Targets taken out of rotation after an upstream 429",
            m.cool_downs.clone(),
        );
        registry.register(
            "llm_gateway_proxy_fallbacks",
            "Requests sent directly because the provider's proxy failed",
            PROXY_FALLBACKS.clone(),
        );
        m
    }

    fn target(provider: &str, model: &str) -> TargetLabels {
        TargetLabels { provider: provider.to_owned(), model: model.to_owned() }
    }

    /// `state`: 0 closed, 1 open, 2 half-open.
    pub fn circuit_state(&self, provider: &str, model: &str, state: i64) {
        self.circuit_state.get_or_create(&Self::target(provider, model)).set(state);
    }

    /// A transition between the named states; `gauge` is the new state's value.
    pub fn circuit(&self, provider: &str, model: &str, from: &'static str, to: &'static str, gauge: i64) {
        self.circuit_state(provider, model, gauge);
        self.transitions
            .get_or_create(&TransitionLabels {
                provider: provider.to_owned(),
                model: model.to_owned(),
                from,
                to,
            })
            .inc();
    }

    pub fn retry(&self, provider: &str) {
        self.retries.get_or_create(&ProviderLabels { provider: provider.to_owned() }).inc();
    }

    pub fn hedge(&self, model: &str, outcome: &'static str) {
        self.hedges.get_or_create(&HedgeLabels { model: model.to_owned(), outcome }).inc();
    }

    pub fn cool_down(&self, provider: &str, model: &str) {
        self.cool_downs.get_or_create(&Self::target(provider, model)).inc();
    }
}
