//! Where the listeners' HTTP/2 streams run. A connection with no stream
//! running on its own task runs its next stream there; every other stream
//! gets a task of its own. At low load a call then does not cross tasks
//! between the connection (which reads its request and writes its frames)
//! and the stream (which produces them), so it wakes the other worker and
//! moves between cores less often (a third fewer migrations at c=1), and
//! the frames a stream queued are flushed in the same poll. Under load the
//! streams are tasks that the runtime spreads over its workers, as before.
//! Every stream runs under its call's deadline watchdog (`watchdog`) and is
//! tracked, so that the drain knows when the last has ended.

use std::{
    cell::{Cell, RefCell},
    pin::Pin,
    task::{Context, Poll},
};

use tokio_util::task::TaskTracker;

use crate::watchdog;

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How many streams one poll of a connection's task may start on it, one
/// after another, when each ends at once (an early error answer); past it
/// the task yields, so that a client sending a flood of them shares the
/// worker with the others.
const STARTS_PER_POLL: usize = 8;

/// The stream running on its connection's task, if any.
#[derive(Default)]
struct Slot {
    stream: RefCell<Option<Stream>>,
    /// Set when hyper handed a stream to the slot during this poll.
    started: Cell<bool>,
}

tokio::task_local! {
    /// The connection whose task is being polled (see [`on_connection`]).
    static CONNECTION: Slot;
}

/// Runs hyper's HTTP/2 stream tasks (see the module doc).
#[derive(Clone)]
pub struct StreamExec {
    pub(crate) streams: TaskTracker,
}

impl StreamExec {
    pub fn new() -> Self {
        Self { streams: TaskTracker::new() }
    }
}

impl Default for StreamExec {
    fn default() -> Self {
        Self::new()
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        let mut task = Some(self.streams.track_future(watchdog::guard(task)));
        // hyper starts a stream while its connection's task polls it, so
        // the slot found here is that connection's.
        let _ = CONNECTION.try_with(|slot| {
            let mut running = slot.stream.borrow_mut();
            if running.is_none()
                && let Some(task) = task.take()
            {
                *running = Some(Box::pin(task));
                slot.started.set(true);
            }
        });
        if let Some(task) = task {
            drop(tokio::spawn(task));
        }
    }
}

/// Drives `connection` (a listener's whole connection future, drain and
/// ageing included) with the stream it starts when it has none in flight
/// on the same task (see the module doc). When the connection ends, a
/// stream still running on it is dropped: its caller is gone with it.
pub async fn on_connection<C: Future<Output = ()>>(connection: C) {
    let mut connection = std::pin::pin!(connection);
    CONNECTION.scope(Slot::default(), std::future::poll_fn(|cx| poll_both(connection.as_mut(), cx))).await
}

fn poll_both<C: Future<Output = ()>>(mut connection: Pin<&mut C>, cx: &mut Context<'_>) -> Poll<()> {
    CONNECTION.with(|slot| {
        for _ in 0..STARTS_PER_POLL {
            // The stream first: the frames it queues go out in the
            // connection's poll right after.
            let running = slot.stream.borrow_mut().take();
            if let Some(mut stream) = running
                && stream.as_mut().poll(cx).is_pending()
            {
                *slot.stream.borrow_mut() = Some(stream);
            }
            slot.started.set(false);
            if connection.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            if !slot.started.get() {
                return Poll::Pending;
            }
            // A stream started in that poll: it runs now, before the task
            // waits, or nothing would wake it.
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    /// Where each stream ran: its task's id, recorded when it first runs.
    type Seen = Arc<Mutex<Vec<(&'static str, Option<tokio::task::Id>)>>>;

    fn stream(
        name: &'static str,
        seen: &Seen,
        end: oneshot::Receiver<()>,
    ) -> impl Future<Output = ()> + Send + use<> {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((name, tokio::task::try_id()));
            let _ = end.await;
        }
    }

    #[tokio::test]
    async fn the_first_stream_runs_on_the_connection_task_and_the_next_on_its_own() {
        let exec = StreamExec::new();
        let seen: Seen = Arc::default();
        let (end_first, first) = oneshot::channel();
        let (end_second, second) = oneshot::channel();
        let (end_third, third) = oneshot::channel();
        let (close, closed) = oneshot::channel::<()>();
        let connection = {
            let (exec, seen) = (exec.clone(), seen.clone());
            async move {
                let me = tokio::task::try_id();
                // hyper starts streams from inside the connection's poll.
                exec.execute(stream("first", &seen, first));
                exec.execute(stream("second", &seen, second));
                tokio::task::yield_now().await;
                let _ = end_first.send(());
                tokio::task::yield_now().await;
                // The first has ended: the slot takes the next one again.
                exec.execute(stream("third", &seen, third));
                tokio::task::yield_now().await;
                let _ = closed.await;
                me
            }
        };
        let conn_task = tokio::spawn(async move {
            let (id, done) = oneshot::channel();
            on_connection(async move {
                let _ = id.send(connection.await);
            })
            .await;
            done.await.ok().flatten()
        });
        // Wait (bounded) until all three have run once.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while seen.lock().unwrap().len() < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the three streams ran");
        let _ = close.send(());
        let conn_id = tokio::time::timeout(std::time::Duration::from_secs(5), conn_task)
            .await
            .expect("the connection ended")
            .expect("the connection task did not panic");
        let seen = seen.lock().unwrap().clone();
        let task_of = |name| seen.iter().find(|(n, _)| *n == name).and_then(|(_, id)| *id);
        assert!(conn_id.is_some());
        assert_eq!(task_of("first"), conn_id, "first: on the connection's task");
        assert_ne!(task_of("second"), conn_id, "second: a task of its own, the slot being taken");
        assert!(task_of("second").is_some());
        assert_eq!(task_of("third"), conn_id, "third: the slot was free again");
        drop((end_second, end_third));
        exec.streams.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), exec.streams.wait())
            .await
            .expect("every stream tracked has ended, the inline one with its connection");
    }
}
