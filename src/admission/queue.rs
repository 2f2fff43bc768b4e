//! Calls waiting for a target's limits: one FIFO per target on this
//! replica, and a bound on how many wait in all (`queue.max_waiting`). Only
//! the head of a queue asks the backend again; the others wait to become
//! head, so the first to come is the first served. A waiter leaves the
//! moment its future is dropped (the caller cancelled), and the next one
//! is woken. Across replicas, order is not kept: each replica's head asks
//! Redis on its own.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use super::window::WINDOW_SECS;
use crate::{config::LimitsConfig, telemetry::metrics::Metrics};

#[derive(Debug)]
struct Waiter {
    id: u64,
    tokens: u64,
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

/// The waiters of one target, first come first served.
#[derive(Debug, Default)]
pub struct TargetQueue {
    inner: Mutex<Inner>,
}

/// What waits ahead of a newcomer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ahead {
    pub waiters: u64,
    pub tokens: u64,
}

impl TargetQueue {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().waiters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Joins at the back; `tokens` is what the newcomer will reserve.
    pub fn join(self: &Arc<Self>, tokens: u64) -> (Place, Ahead) {
        let mut inner = self.lock();
        let ahead = inner
            .waiters
            .iter()
            .fold(Ahead::default(), |a, w| Ahead { waiters: a.waiters + 1, tokens: a.tokens + w.tokens });
        inner.next_id += 1;
        let id = inner.next_id;
        let wake = Arc::new(Notify::new());
        inner.waiters.push_back(Waiter { id, tokens, wake: wake.clone() });
        drop(inner);
        (Place { queue: self.clone(), id, wake }, ahead)
    }

    /// Tells the head that capacity may have come back.
    pub fn wake_head(&self) {
        if let Some(head) = self.lock().waiters.front() {
            head.wake.notify_one();
        }
    }
}

/// A call's place in a queue; dropping it leaves the queue.
#[derive(Debug)]
pub struct Place {
    queue: Arc<TargetQueue>,
    id: u64,
    wake: Arc<Notify>,
}

impl Place {
    pub fn is_head(&self) -> bool {
        self.queue.lock().waiters.front().is_some_and(|w| w.id == self.id)
    }

    /// Resolves when this waiter is told to look again (it became head,
    /// or capacity may have come back).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        let was_head = inner.waiters.front().is_some_and(|w| w.id == self.id);
        inner.waiters.retain(|w| w.id != self.id);
        if was_head && let Some(next) = inner.waiters.front() {
            next.wake.notify_one();
        }
    }
}

/// How many calls wait on this replica, bounded by `queue.max_waiting`.
pub struct Waiting {
    max: usize,
    now: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting").field("max", &self.max).field("now", &self.now).finish()
    }
}

impl Waiting {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self { max, now: AtomicUsize::new(0), metrics }
    }

    /// A slot to wait in, unless `max_waiting` calls already wait.
    pub fn enter(self: &Arc<Self>) -> Option<WaitSlot> {
        let before = self
            .now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()?;
        self.metrics.admission.queue_depth(before + 1);
        Some(WaitSlot(self.clone()))
    }
}

#[derive(Debug)]
pub struct WaitSlot(Arc<Waiting>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let before = self.0.now.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.admission.queue_depth(before.saturating_sub(1));
    }
}

/// A lower bound on the wait of a newcomer: until the limit frees what it
/// asked for (`hint`, when the backend knows), plus the refill time of what
/// the waiters ahead will take first, at each rate limit's refill rate.
/// Zero when nothing is known (a concurrency limit alone).
pub fn expected_wait(limits: &[&LimitsConfig], share: u64, hint: Option<Duration>, ahead: Ahead) -> Duration {
    let window = Duration::from_secs(WINDOW_SECS);
    let share = share.max(1);
    let mut refill = Duration::ZERO;
    for l in limits {
        if let Some(rpm) = l.rpm {
            let per = window.div_f64(rpm.div_ceil(share) as f64);
            refill = refill.max(per.saturating_mul(u32::try_from(ahead.waiters).unwrap_or(u32::MAX)));
        }
        if let Some(tpm) = l.tpm {
            let secs = ahead.tokens as f64 * WINDOW_SECS as f64 / tpm.div_ceil(share) as f64;
            refill = refill.max(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
        }
    }
    hint.unwrap_or_default().saturating_add(refill)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_come_first_served_and_leaving_wakes_the_next() {
        let q = Arc::new(TargetQueue::default());
        let (a, ahead_a) = q.join(10);
        let (b, ahead_b) = q.join(20);
        let (c, ahead_c) = q.join(5);
        assert_eq!(ahead_a, Ahead::default());
        assert_eq!(ahead_b, Ahead { waiters: 1, tokens: 10 });
        assert_eq!(ahead_c, Ahead { waiters: 2, tokens: 30 });
        assert!(a.is_head() && !b.is_head());
        // A waiter in the middle that leaves (cancelled) wakes nobody.
        drop(b);
        assert!(a.is_head() && !c.is_head());
        drop(a);
        assert!(c.is_head());
        // c was told at once, even though it was not waiting yet.
        assert!(futures_util::FutureExt::now_or_never(c.woken()).is_some());
        drop(c);
        assert!(q.is_empty());
    }

    #[test]
    fn at_most_max_waiting() {
        let w = Arc::new(Waiting::new(2, Arc::new(Metrics::new())));
        let a = w.enter().unwrap();
        let _b = w.enter().unwrap();
        assert!(w.enter().is_none());
        drop(a);
        assert!(w.enter().is_some());
    }

    #[test]
    fn expected_wait_from_refill_rates_and_the_queue_ahead() {
        let rpm = LimitsConfig { rpm: Some(60), ..Default::default() };
        let tpm = LimitsConfig { tpm: Some(6_000), ..Default::default() };
        let ahead = Ahead { waiters: 3, tokens: 1_200 };
        // rpm 60: a request a second, 3 ahead: 3 s; tpm 6000: 100/s, 1200 ahead: 12 s.
        let hint = Some(Duration::from_millis(500));
        assert_eq!(expected_wait(&[&rpm], 1, hint, ahead), Duration::from_millis(3_500));
        assert_eq!(expected_wait(&[&rpm, &tpm], 1, hint, ahead), Duration::from_millis(12_500));
        // Split between 2 replicas: half the rate each.
        assert_eq!(expected_wait(&[&rpm], 2, None, ahead), Duration::from_secs(6));
        let conc = LimitsConfig { concurrency: Some(1), ..Default::default() };
        assert_eq!(expected_wait(&[&conc], 1, None, ahead), Duration::ZERO);
    }
}
