//! Metrics of the listeners' connection limits: connections open and
//! connections refused past `server.max_connections`, per listener
//! (`grpc`, `http`, `admin`).

use std::sync::atomic::AtomicI64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

pub struct ListenerMetrics {
    open: Family<ListenerLabels, Gauge<i64, AtomicI64>>,
    refused: Family<ListenerLabels, Counter>,
}

/// One listener's two series, looked up once so that a connection costs
/// an atomic add, never a label lookup.
#[derive(Clone)]
pub struct ListenerSeries {
    pub open: Gauge<i64, AtomicI64>,
    pub refused: Counter,
}

impl ListenerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self { open: Family::default(), refused: Family::default() };
        registry.register(
            "llm_gateway_connections_open",
            "Client connections open, per listener",
            m.open.clone(),
        );
        registry.register(
            "llm_gateway_connections_refused",
            "Client connections closed at once because the listener had server.max_connections open",
            m.refused.clone(),
        );
        m
    }

    /// The series of `listener`, present (at 0) from now on.
    pub fn series(&self, listener: &'static str) -> ListenerSeries {
        let labels = ListenerLabels { listener };
        ListenerSeries {
            open: self.open.get_or_create(&labels).clone(),
            refused: self.refused.get_or_create(&labels).clone(),
        }
    }
}
