//! What routing knows of one target (provider and upstream model) across
//! calls: its circuit breaker, a rate-limit cool-down, the calls it has in
//! flight and a recent time to first token. Shared by every model that
//! routes to the same target. Time is tokio's, so tests can pause it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// The value of `llm_gateway_circuit_state`.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Breaker {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probing`: the one probe call is under way; others are skipped.
    HalfOpen {
        probing: bool,
    },
}

/// Whether a target may take an attempt now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the half-open circuit's one probe.
    Probe,
    /// Skipped: its circuit is open (until the instant, where known).
    CircuitOpen(Option<Instant>),
    /// Skipped: cooling down after a 429, until the instant.
    CoolingDown(Instant),
}

/// A breaker state change, for metrics and span events.
pub type Transition = (CircuitState, CircuitState);

#[derive(Debug)]
struct State {
    breaker: Breaker,
    cool_until: Option<Instant>,
}

pub struct Health {
    config: CircuitBreakerConfig,
    state: Mutex<State>,
    in_flight: AtomicU32,
    /// Exponentially weighted time to first token, in microseconds (0: none yet).
    ttft_us: AtomicU64,
}

impl Health {
    pub fn new(config: CircuitBreakerConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(State { breaker: Breaker::Closed { failures: 0 }, cool_until: None }),
            in_flight: AtomicU32::new(0),
            ttft_us: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave the state half-written.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides whether an attempt may start now; a half-open circuit lets
    /// exactly one probe through.
    pub fn admit(&self, now: Instant) -> (Admit, Option<Transition>) {
        let mut s = self.lock();
        if let Some(until) = s.cool_until {
            if until > now {
                return (Admit::CoolingDown(until), None);
            }
            s.cool_until = None;
        }
        match s.breaker {
            Breaker::Closed { .. } => (Admit::Yes, None),
            Breaker::Open { until } if until > now => (Admit::CircuitOpen(Some(until)), None),
            Breaker::Open { .. } => {
                s.breaker = Breaker::HalfOpen { probing: true };
                (Admit::Probe, Some((CircuitState::Open, CircuitState::HalfOpen)))
            }
            Breaker::HalfOpen { probing: true } => (Admit::CircuitOpen(None), None),
            Breaker::HalfOpen { probing: false } => {
                s.breaker = Breaker::HalfOpen { probing: true };
                (Admit::Probe, None)
            }
        }
    }

    /// Whether an attempt could start now, without claiming a probe.
    pub fn available(&self, now: Instant) -> bool {
        let s = self.lock();
        if s.cool_until.is_some_and(|u| u > now) {
            return false;
        }
        match s.breaker {
            Breaker::Closed { .. } | Breaker::HalfOpen { probing: false } => true,
            Breaker::Open { until } => until <= now,
            Breaker::HalfOpen { probing: true } => false,
        }
    }

    /// The attempt reached its first delta.
    pub fn success(&self) -> Option<Transition> {
        let mut s = self.lock();
        let from = state_of(&s.breaker);
        s.breaker = Breaker::Closed { failures: 0 };
        (from != CircuitState::Closed).then_some((from, CircuitState::Closed))
    }

    /// A retryable failure (before or after the first delta).
    pub fn failure(&self, now: Instant) -> Option<Transition> {
        if self.config.failures == 0 {
            return None;
        }
        let mut s = self.lock();
        let open = Breaker::Open { until: now + self.config.open_for };
        match s.breaker {
            Breaker::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failures {
                    s.breaker = open;
                    return Some((CircuitState::Closed, CircuitState::Open));
                }
                s.breaker = Breaker::Closed { failures };
                None
            }
            Breaker::HalfOpen { .. } => {
                s.breaker = open;
                Some((CircuitState::HalfOpen, CircuitState::Open))
            }
            Breaker::Open { .. } => None,
        }
    }

    /// The probe ended with no verdict (the caller left, a non-retryable
    /// answer): the next call may probe.
    pub fn probe_abandoned(&self) {
        let mut s = self.lock();
        if let Breaker::HalfOpen { probing: true } = s.breaker {
            s.breaker = Breaker::HalfOpen { probing: false };
        }
    }

    /// Keeps the target out of rotation until `until`; a longer cool-down
    /// already under way is kept.
    pub fn cool_down(&self, until: Instant) {
        let mut s = self.lock();
        if s.cool_until.is_none_or(|u| u < until) {
            s.cool_until = Some(until);
        }
    }

    pub fn circuit(&self) -> CircuitState {
        state_of(&self.lock().breaker)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts an attempt in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The recent time to first token (0 before any).
    pub fn ttft_us(&self) -> u64 {
        self.ttft_us.load(Ordering::Relaxed)
    }

    pub fn record_ttft(&self, ttft: Duration) {
        let new = u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX);
        let old = self.ttft_us.load(Ordering::Relaxed);
        // A lost update under a race only delays the average a little.
        let avg = if old == 0 { new } else { (old * 4 + new) / 5 };
        self.ttft_us.store(avg.max(1), Ordering::Relaxed);
    }
}

fn state_of(b: &Breaker) -> CircuitState {
    match b {
        Breaker::Closed { .. } => CircuitState::Closed,
        Breaker::Open { .. } => CircuitState::Open,
        Breaker::HalfOpen { .. } => CircuitState::HalfOpen,
    }
}

/// One attempt in flight on a target.
pub struct InFlight(Arc<Health>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(failures: u32) -> Arc<Health> {
        Health::new(CircuitBreakerConfig { failures, open_for: Duration::from_secs(30) })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_lets_one_probe() {
        let h = health(3);
        let now = Instant::now();
        assert_eq!(h.failure(now), None);
        assert_eq!(h.failure(now), None);
        assert_eq!(h.success(), None);
        // Not consecutive: the success reset the count.
        assert_eq!(h.failure(now), None);
        assert_eq!(h.failure(now), None);
        assert_eq!(h.failure(now), Some((CircuitState::Closed, CircuitState::Open)));
        assert!(matches!(h.admit(Instant::now()).0, Admit::CircuitOpen(Some(_))));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(matches!(h.admit(Instant::now()).0, Admit::CircuitOpen(_)));
        tokio::time::advance(Duration::from_secs(1)).await;
        let (admit, t) = h.admit(Instant::now());
        assert_eq!(admit, Admit::Probe);
        assert_eq!(t, Some((CircuitState::Open, CircuitState::HalfOpen)));
        // Exactly one probe.
        assert_eq!(h.admit(Instant::now()).0, Admit::CircuitOpen(None));
        assert_eq!(h.success(), Some((CircuitState::HalfOpen, CircuitState::Closed)));
        assert_eq!(h.admit(Instant::now()).0, Admit::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_one_frees_the_slot() {
        let h = health(1);
        assert!(h.failure(Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(h.admit(Instant::now()).0, Admit::Probe);
        h.probe_abandoned();
        assert_eq!(h.admit(Instant::now()).0, Admit::Probe);
        assert_eq!(h.failure(Instant::now()), Some((CircuitState::HalfOpen, CircuitState::Open)));
        assert!(matches!(h.admit(Instant::now()).0, Admit::CircuitOpen(Some(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn cool_down_keeps_the_longer_wait() {
        let h = health(0);
        let now = Instant::now();
        h.cool_down(now + Duration::from_secs(10));
        h.cool_down(now + Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(h.admit(Instant::now()).0, Admit::CoolingDown(_)));
        assert!(!h.available(Instant::now()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.admit(Instant::now()).0, Admit::Yes);
        // failures: 0 turns the breaker off.
        for _ in 0..100 {
            assert_eq!(h.failure(Instant::now()), None);
        }
        assert_eq!(h.circuit(), CircuitState::Closed);
    }
}
