//! Groups the Redis steps of one gateway, one step in flight at a time.
//! An admission that finds none in flight sends its own at once, from the
//! caller's task (at c=1 nothing waits and nothing hops); one that finds a
//! step in flight hands its op to a task, which sends every op that came
//! meanwhile in the next step. Under load the admissions of a busy moment
//! so share one round trip, one script run and one read and write of each
//! subject (`charge_v5.lua`), where each cost its own before.
//! A settle waits up to `RIDE_FOR` for an admission step to ride on, then
//! the task sends it with the others waiting.

use std::{
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};

use super::{
    control::Admission,
    plan::{BudgetState, Denial, Granted, Op, Subject},
    redis::{Answer, Shared, Unreachable},
};

/// How long a settle waits for an admission step to ride on before it is
/// sent with the others waiting. Under load an admission comes sooner, so
/// a call costs one round trip or less, not two; meanwhile its
/// reservations still count (for at most this long).
const RIDE_FOR: Duration = Duration::from_millis(2);
/// The same for a call admitted ahead ([`super::ahead`]): its limits are
/// far from full, so its reservations may count a little longer, and the
/// settles of many calls share a step.
const RIDE_FOR_AHEAD: Duration = Duration::from_millis(20);
/// Most settles one step carries, and most admissions one step decides
/// (the script's size stays bounded).
const MAX_CARRIED: usize = 32;
const MAX_TICKETS: usize = 16;
/// Most settles that may wait for Redis at once; past it a settle is
/// dropped (counted as a Redis error), and its reservations age out.
const MAX_PENDING_SETTLES: usize = 4096;

/// A decision, or why Redis gave none.
pub type Verdict = Result<Result<Granted, Denial>, Unreachable>;

/// What the task is told.
pub enum Msg {
    /// An admission that found a step in flight: its decision comes back
    /// on `reply`.
    Admit { op: Arc<Op>, reply: oneshot::Sender<Verdict> },
    /// A settle waits that is due before any other: the task's timer is
    /// set from the settles waiting.
    SettleDue,
    /// Sends every settle waiting now, then answers.
    Drain(oneshot::Sender<()>),
}

/// The Redis client, the one turn to send a step, and the settles waiting.
#[derive(Debug)]
pub struct Steps {
    shared: Shared,
    turn: Semaphore,
    /// Settles waiting, with when each is due to go.
    pending: Mutex<Vec<(Instant, Op)>>,
}

impl Steps {
    pub fn new(shared: Shared) -> Self {
        Self { shared, turn: Semaphore::new(1), pending: Mutex::new(Vec::new()) }
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    fn pending(&self) -> MutexGuard<'_, Vec<(Instant, Op)>> {
        // Every update is one statement: a poisoned lock is still good.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Vec<Op> {
        let mut pending = self.pending();
        let n = pending.len().min(MAX_CARRIED);
        pending.drain(..n).map(|(_, op)| op).collect()
    }

    /// When the first settle waiting is due to go on its own.
    fn due(&self) -> Option<Instant> {
        self.pending().iter().map(|(due, _)| *due).min()
    }

    /// Queues a settle (of a call admitted ahead, when `ahead`): `Ok(true)`
    /// when it is due before every other waiting (the task must be told),
    /// `Err` when too many wait.
    pub fn push_settle(&self, op: Op, ahead: bool) -> Result<bool, Op> {
        let due = Instant::now() + if ahead { RIDE_FOR_AHEAD } else { RIDE_FOR };
        let mut pending = self.pending();
        if pending.len() >= MAX_PENDING_SETTLES {
            return Err(op);
        }
        let first = pending.iter().all(|(d, _)| due < *d);
        pending.push((due, op));
        Ok(first)
    }

    /// Sends `op`'s step here and now when no step is in flight (`None`:
    /// one is; hand it to the task). A caller that goes away meanwhile
    /// drops the step; the settles riding on it are lost and age out.
    pub async fn try_now(&self, op: &Op, owner: &Admission) -> Option<Verdict> {
        let _turn = self.turn.try_acquire().ok()?;
        let carried = self.take();
        let answer = self.shared.run(&[op], &carried).await;
        owner.landed(&carried, refunds(&answer));
        Some(answer.and_then(|mut a| a.decisions.pop().ok_or_else(short_reply)))
    }

    /// Sends every settle waiting, `MAX_CARRIED` at a time.
    async fn send_settles(&self, owner: &Weak<Admission>) {
        let _turn = self.turn.acquire().await;
        self.send_settles_holding_turn(owner).await;
    }

    /// When the oldest settle is due: sends them all if no step is in
    /// flight (a step in flight took its own; the next will take more).
    /// Answers when to look again.
    async fn settles_due(&self, owner: &Weak<Admission>) -> Option<Instant> {
        let due = self.due()?;
        let now = Instant::now();
        if now < due {
            return Some(due);
        }
        match self.turn.try_acquire() {
            Ok(_turn) => self.send_settles_holding_turn(owner).await,
            Err(_) => return Some(now + RIDE_FOR / 4),
        }
        self.due()
    }

    async fn send_settles_holding_turn(&self, owner: &Weak<Admission>) {
        loop {
            let ops = self.take();
            if ops.is_empty() {
                return;
            }
            let answer = self.shared.run(&[], &ops).await;
            landed(owner, &ops, refunds(&answer));
        }
    }
}

fn short_reply() -> Unreachable {
    Unreachable::Failed("the script's reply had no decision".into())
}

fn refunds(answer: &Result<Answer, Unreachable>) -> &[(Arc<Subject>, BudgetState)] {
    answer.as_ref().map_or(&[][..], |a| &a.refunds[..])
}

fn landed(owner: &Weak<Admission>, carried: &[Op], refunds: &[(Arc<Subject>, BudgetState)]) {
    if let Some(admission) = owner.upgrade() {
        admission.landed(carried, refunds);
    }
}

/// The task: runs until every sender is gone, then sends the settles still
/// waiting. `owner` mirrors what the steps' refunds say and wakes the
/// queues their releases freed, while it lives.
pub async fn run(steps: Arc<Steps>, owner: Weak<Admission>, mut rx: mpsc::Receiver<Msg>) {
    let mut due: Option<Instant> = None;
    let mut admits: Vec<(Arc<Op>, oneshot::Sender<Verdict>)> = Vec::new();
    let mut drains: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            msg = rx.recv() => msg,
            () = sleep_until(due), if due.is_some() => {
                due = steps.settles_due(&owner).await;
                continue;
            }
        };
        let Some(first) = first else {
            steps.send_settles(&owner).await;
            return;
        };
        let mut inbox = Inbox { admits: &mut admits, drains: &mut drains };
        inbox.sort(first);
        while let Ok(msg) = rx.try_recv() {
            inbox.sort(msg);
        }
        while !admits.is_empty() {
            let _turn = steps.turn.acquire().await;
            // Those that came while the step before was in flight go too.
            while admits.len() < MAX_TICKETS
                && let Ok(msg) = rx.try_recv()
            {
                Inbox { admits: &mut admits, drains: &mut drains }.sort(msg);
            }
            let n = admits.len().min(MAX_TICKETS);
            let batch: Vec<_> = admits.drain(..n).collect();
            let carried = steps.take();
            let tickets: Vec<&Op> = batch.iter().map(|(op, _)| &**op).collect();
            let answer = steps.shared.run(&tickets, &carried).await;
            landed(&owner, &carried, refunds(&answer));
            let verdicts: Vec<Verdict> = match answer {
                Ok(a) if a.decisions.len() == batch.len() => a.decisions.into_iter().map(Ok).collect(),
                Ok(_) => batch.iter().map(|_| Err(short_reply())).collect(),
                Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
            };
            for ((_, reply), verdict) in batch.into_iter().zip(verdicts) {
                // A caller that went away meanwhile: its reservations age
                // out, as when its own round trip was cut short.
                let _ = reply.send(verdict);
            }
        }
        // Timed from the settles waiting, so a note dropped from a full
        // inbox loses nothing.
        due = steps.due();
        if !drains.is_empty() {
            steps.send_settles(&owner).await;
            for done in drains.drain(..) {
                let _ = done.send(());
            }
        }
        // A stream of messages never lets the timer win the select: the
        // settles due go now.
        if due.is_some_and(|d| Instant::now() >= d) {
            due = steps.settles_due(&owner).await;
        }
    }
}

/// Where each message goes.
struct Inbox<'a> {
    admits: &'a mut Vec<(Arc<Op>, oneshot::Sender<Verdict>)>,
    drains: &'a mut Vec<oneshot::Sender<()>>,
}

impl Inbox<'_> {
    fn sort(&mut self, msg: Msg) {
        match msg {
            Msg::Admit { op, reply } => self.admits.push((op, reply)),
            // The timer is set from the settles waiting once the inbox is
            // read; one taken by a step meanwhile is simply not there.
            Msg::SettleDue => {}
            Msg::Drain(done) => self.drains.push(done),
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}
