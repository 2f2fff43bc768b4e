//! A call's deadline, enforced on the task that sends its response even
//! while nobody polls that response. hyper polls a response body only while
//! the caller's HTTP/2 window has room, so a caller that stops reading
//! would keep its call, and the upstream request behind it, past the
//! deadline the body itself watches (on HTTP/1.1, once the socket's buffers
//! are full). A listener runs each HTTP/2 stream's task, and each HTTP/1.1
//! connection's, under [`guard`]; the call core [`arm`]s it with the call's
//! deadline, and the response's end [`disarm`]s it; at the deadline a task
//! still running is dropped: its response body (and the upstream with it)
//! goes, and h2 resets the stream (HTTP/1.1: the connection is closed).
//! No lock and no task: one atomic load per poll of the guarded task, and
//! one timer per call.

use std::{
    future::poll_fn,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::Poll,
    time::Instant,
};

tokio::task_local! {
    static SLOT: Arc<Slot>;
}

/// One stream task's deadline, set by the call it serves.
struct Slot {
    base: Instant,
    /// Nanoseconds from `base` to the deadline, plus one; 0: not armed.
    deadline: AtomicU64,
    /// Set when [`guard`] ended the stream at its deadline.
    fired: AtomicBool,
}

impl Slot {
    fn instant(&self, armed: u64) -> Instant {
        self.base + std::time::Duration::from_nanos(armed - 1)
    }
}

/// What the call holds of its stream's watchdog.
pub struct Armed(Arc<Slot>);

impl Armed {
    /// Whether the watchdog ended the call's response at its deadline (the
    /// call then records a deadline, not a caller who went away).
    pub fn fired(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }
}

/// The response of the call running on this task must not outlive
/// `deadline`. None (and nothing happens) off a guarded task: an HTTP/1
/// connection, or a test calling the core directly.
pub fn arm(deadline: Instant) -> Option<Armed> {
    SLOT.try_with(|slot| {
        let nanos = deadline.saturating_duration_since(slot.base).as_nanos();
        let armed = u64::try_from(nanos).unwrap_or(u64::MAX - 1).saturating_add(1);
        slot.deadline.store(armed, Ordering::Release);
        Armed(slot.clone())
    })
    .ok()
}

/// The response this task was sending has ended (its body is gone): its
/// deadline no longer applies. A kept-alive HTTP/1.1 connection's next
/// request arms the watchdog anew.
pub fn disarm() {
    let _ = SLOT.try_with(|slot| slot.deadline.store(0, Ordering::Release));
}

/// Runs `task` (one HTTP/2 stream: its service future, then its body; or
/// one HTTP/1.1 connection) until it ends, or until the deadline armed from within it has passed
/// with the task still pending; then drops it. The task is always polled
/// first, so a response that can still end by itself (with its deadline
/// status) does.
pub async fn guard<F: Future<Output = ()>>(task: F) {
    let slot =
        Arc::new(Slot { base: Instant::now(), deadline: AtomicU64::new(0), fired: AtomicBool::new(false) });
    let mut task = pin!(SLOT.scope(slot.clone(), task));
    let mut timer = pin!(tokio::time::sleep_until(slot.base.into()));
    let mut timer_at = 0;
    poll_fn(|cx| {
        if task.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let armed = slot.deadline.load(Ordering::Acquire);
        if armed == 0 {
            return Poll::Pending;
        }
        if armed != timer_at {
            timer.as_mut().reset(slot.instant(armed).into());
            timer_at = armed;
        }
        // Unconstrained: a busy task spends the coop budget this poll shares
        // with it, and a timer polled on an empty budget is Pending however
        // late it is, so a flood the caller is not reading would outrun
        // its own deadline.
        if pin!(tokio::task::unconstrained(timer.as_mut())).poll(cx).is_pending() {
            return Poll::Pending;
        }
        slot.fired.store(true, Ordering::Release);
        tracing::debug!("a response past its deadline was not being read: stream reset");
        Poll::Ready(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pending_task_is_dropped_at_its_deadline() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct OnDrop(Arc<AtomicBool>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let flag = OnDrop(dropped.clone());
        let armed = Arc::new(std::sync::Mutex::new(None));
        let keep = armed.clone();
        let start = tokio::time::Instant::now();
        guard(async move {
            let _flag = flag;
            *keep.lock().unwrap() = arm(Instant::now() + Duration::from_secs(3));
            std::future::pending::<()>().await
        })
        .await;
        assert!(dropped.load(Ordering::Acquire), "the task was dropped");
        assert!(start.elapsed() >= Duration::from_secs(3), "not before its deadline");
        assert!(armed.lock().unwrap().as_ref().is_some_and(Armed::fired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_is_left_alone() {
        let armed = Arc::new(std::sync::Mutex::new(None));
        let keep = armed.clone();
        guard(async move {
            *keep.lock().unwrap() = arm(Instant::now() + Duration::from_secs(3));
            tokio::time::sleep(Duration::from_secs(1)).await;
        })
        .await;
        assert!(armed.lock().unwrap().as_ref().is_some_and(|a| !a.fired()));
        assert!(arm(Instant::now()).is_none(), "no watchdog off a guarded task");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disarmed_task_outlives_the_old_deadline() {
        let start = tokio::time::Instant::now();
        guard(async {
            let armed = arm(Instant::now() + Duration::from_secs(1));
            disarm();
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(armed.is_some_and(|a| !a.fired()));
        })
        .await;
        assert!(start.elapsed() >= Duration::from_secs(3), "the task ran to its own end");
    }
}
