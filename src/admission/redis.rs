//! The shared backend: every replica's limits and budgets in one Redis (or
//! Valkey), one script call per admission step: the admissions that came
//! together, and the settles that wait to be sent (see `batch`). The script is sent by its
//! SHA-1 (EVALSHA) and, when the server does not know it (NOSCRIPT: a
//! restart, a failover, a proxy in front of several nodes), sent whole with
//! EVAL in the same step, never through a separate SCRIPT LOAD. Every round
//! trip has its own timeout. After a failure Redis is left alone for a
//! short while (each call then decides at once by `failure_mode`), and one
//! call probes it again; the connection manager reconnects by itself.
//! With `cluster: true` the same goes through a Cluster client: every key
//! of a step carries one hash tag, so a step is one slot on one node.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{
    ErrorKind, IntoConnectionInfo, ServerErrorKind,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::time::Instant;

use super::{
    budget::{Exhausted, Spending},
    plan::{BudgetOp, BudgetState, Denial, Granted, Op, Subject},
    window::{Exceeded, Full},
};
use crate::{config::RedisConfig, telemetry::metrics::Metrics};

/// The script, named with its version (its first line says `llmgw_charge_v5`).
const SCRIPT: &str = include_str!("charge_v5.lua");

/// How long Redis is left alone after a failure before one call probes it.
const PROBE_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("redis.password_env: the environment variable {0} is not set or empty")]
    Password(String),
    #[error("redis.url: {0}")]
    Url(String),
}

/// Why a step did not reach a decision in Redis.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unreachable {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Failed(String),
    #[error("redis failed moments ago; not asked again yet")]
    Resting,
}

/// What a step answered: the decision on each ticket's charges, in order,
/// and the budget figures after each refund that landed (for the local
/// mirror and the budget-left gauges).
#[derive(Debug)]
pub struct Answer {
    pub decisions: Vec<Result<Granted, Denial>>,
    pub refunds: Vec<(Arc<Subject>, BudgetState)>,
}

#[derive(Debug, Clone, Copy)]
enum Health {
    Up,
    /// Since an incident; asked again from `probe_at`.
    Down {
        probe_at: Instant,
    },
}

/// One node (the connection manager reconnects by itself) or a Cluster
/// (its client learns the nodes from the one configured, follows MOVED and
/// ASK, and reconnects by itself; connected on first use).
enum Conn {
    Single(ConnectionManager),
    /// Boxed: the client's settings are large, and only one exists.
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(conn) => cmd.query_async(&mut conn.clone()).await,
            Conn::Cluster(c) => {
                // A failed connect leaves the cell empty: the next call tries again.
                let conn = c.conn.get_or_try_init(|| c.client.get_async_connection()).await?;
                cmd.query_async(&mut conn.clone()).await
            }
        }
    }
}

pub struct Shared {
    conn: Conn,
    timeout: Duration,
    sha: String,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info holds the password: never printed.
        f.debug_struct("Shared").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the client; it connects on first use, so a Redis that is down
    /// at start-up is an incident like any other, not a failed start.
    pub fn new(config: &RedisConfig, metrics: Arc<Metrics>) -> Result<Self, SetupError> {
        let mut info =
            config.url.as_str().into_connection_info().map_err(|e| SetupError::Url(e.to_string()))?;
        if let Some(var) = &config.password_env {
            let password = std::env::var(var).ok().filter(|p| !p.is_empty());
            let Some(password) = password else { return Err(SetupError::Password(var.clone())) };
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let conn = if config.cluster {
            let client = redis::cluster::ClusterClientBuilder::new([info])
                .connection_timeout(config.timeout)
                .response_timeout(config.timeout)
                .retries(1)
                .build()
                .map_err(|e| SetupError::Url(e.to_string()))?;
            Conn::Cluster(Box::new(Cluster { client, conn: tokio::sync::OnceCell::new() }))
        } else {
            let client = redis::Client::open(info).map_err(|e| SetupError::Url(e.to_string()))?;
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(PROBE_AFTER);
            Conn::Single(
                ConnectionManager::new_lazy_with_config(client, manager)
                    .map_err(|e| SetupError::Url(e.to_string()))?,
            )
        };
        let sha = redis::Script::new(SCRIPT).get_hash().to_owned();
        metrics.admission.redis_up(true);
        Ok(Self { conn, timeout: config.timeout, sha, health: Mutex::new(Health::Up), metrics })
    }

    /// Connects now (bounded by the timeout), so the first call does not
    /// pay for it; a failure is logged and counted like any incident.
    pub async fn connect(&self) {
        let cmd = redis::cmd("PING");
        let ping = self.conn.query::<String>(&cmd);
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                self.failed(Unreachable::Failed(error_text(&e)));
            }
            Err(_) => {
                self.failed(Unreachable::Timeout(self.timeout));
            }
        }
    }

    /// Runs one step in Redis: the admissions in `tickets`, with the
    /// settles in `carried` riding on it (their releases and refunds go
    /// first, whatever the decisions): a decision per ticket, or why there
    /// is none.
    pub async fn run(&self, tickets: &[&Op], carried: &[Op]) -> Result<Answer, Unreachable> {
        if !self.may_ask() {
            return Err(Unreachable::Resting);
        }
        let merged = Merged::of(tickets, carried);
        let started = Instant::now();
        let reply = tokio::time::timeout(self.timeout, self.eval(tickets, &merged)).await;
        self.metrics.admission.redis_round_trip(started.elapsed());
        let reply = match reply {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(self.failed(Unreachable::Failed(error_text(&e)))),
            Err(_) => return Err(self.failed(Unreachable::Timeout(self.timeout))),
        };
        match decode(&reply, tickets.len()) {
            Some((decisions, figures)) => {
                self.succeeded();
                let refunds = merged
                    .refunds
                    .iter()
                    .zip(figures)
                    .filter_map(|(r, b)| Some((r.subject.clone(), b?)))
                    .collect();
                Ok(Answer { decisions, refunds })
            }
            None => Err(self.failed(Unreachable::Failed(format!("unexpected script reply {reply:?}")))),
        }
    }

    async fn eval(&self, tickets: &[&Op], merged: &Merged<'_>) -> redis::RedisResult<Vec<i64>> {
        match self.conn.query(&command(tickets, merged, "EVALSHA", &self.sha)).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.conn.query(&command(tickets, merged, "EVAL", SCRIPT)).await
            }
            other => other,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up, or down long enough that this call may probe (the others keep
    /// leaving Redis alone meanwhile).
    fn may_ask(&self) -> bool {
        let mut health = self.lock();
        match *health {
            Health::Up => true,
            Health::Down { probe_at } => {
                let now = Instant::now();
                if now < probe_at {
                    return false;
                }
                *health = Health::Down { probe_at: now + PROBE_AFTER };
                true
            }
        }
    }

    fn failed(&self, why: Unreachable) -> Unreachable {
        let kind = match why {
            Unreachable::Timeout(_) => "timeout",
            _ => "error",
        };
        self.metrics.admission.redis_error(kind);
        let was_up = {
            let mut health = self.lock();
            let was_up = matches!(*health, Health::Up);
            *health = Health::Down { probe_at: Instant::now() + PROBE_AFTER };
            was_up
        };
        if was_up {
            // One line per incident; the end of it gets one too.
            tracing::warn!(error = %why, "redis unreachable: admission decides by failure_mode until it is back");
            self.metrics.admission.redis_up(false);
        }
        why
    }

    fn succeeded(&self) {
        let was_down = {
            let mut health = self.lock();
            std::mem::replace(&mut *health, Health::Up)
        };
        if matches!(was_down, Health::Down { .. }) {
            tracing::info!("redis reachable again: shared limits apply");
            self.metrics.admission.redis_up(true);
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.lock(), Health::Up)
    }
}

fn error_text(e: &redis::RedisError) -> String {
    // Redis error texts carry no secrets (AUTH failures say WRONGPASS).
    e.to_string()
}

/// Every op of a step: the settles riding on it, then the tickets.
fn ops<'a>(tickets: &'a [&'a Op], carried: &'a [Op]) -> impl Iterator<Item = &'a Op> {
    carried.iter().chain(tickets.iter().copied())
}

/// One release as sent: the sum of a step's releases of one subject by one
/// member in one second (the calls of a block share a member).
struct SentRelease<'a> {
    subject: &'a Arc<Subject>,
    member: u64,
    at_sec: u64,
    refund: i64,
    leases: u64,
    requests: u64,
}

/// One budget refund as sent: the sum of a step's refunds to one key's
/// window.
struct SentRefund<'a> {
    subject: &'a Arc<Subject>,
    window: u64,
    tokens: i64,
    nano_usd: i64,
}

/// What a step gives back, merged: the settles riding on it, then the
/// tickets' own releases (an attempt that moved to another target). One
/// that gives back nothing (no token limit to refund, no lease) is left out.
struct Merged<'a> {
    releases: Vec<SentRelease<'a>>,
    refunds: Vec<SentRefund<'a>>,
}

impl<'a> Merged<'a> {
    fn of(tickets: &'a [&'a Op], carried: &'a [Op]) -> Self {
        let mut releases: Vec<SentRelease<'a>> = Vec::new();
        let mut refunds: Vec<SentRefund<'a>> = Vec::new();
        for op in ops(tickets, carried) {
            for r in &op.releases {
                let refund = if r.subject.limits.tpm.is_some() { r.refund } else { 0 };
                let leases = if r.subject.has_lease() { r.leases } else { 0 };
                let requests = if r.subject.limits.rpm.is_some() { r.requests } else { 0 };
                if refund == 0 && leases == 0 && requests == 0 {
                    continue;
                }
                let same = releases.iter_mut().find(|s| {
                    Arc::ptr_eq(s.subject, &r.subject) && s.member == r.member && s.at_sec == r.at_sec
                });
                match same {
                    Some(s) => {
                        s.refund = s.refund.saturating_add(refund);
                        s.leases = s.leases.saturating_add(leases);
                        s.requests = s.requests.saturating_add(requests);
                    }
                    None => releases.push(SentRelease {
                        subject: &r.subject,
                        member: r.member,
                        at_sec: r.at_sec,
                        refund,
                        leases,
                        requests,
                    }),
                }
            }
            if let BudgetOp::Refund { subject, window, tokens, nano_usd } = &op.budget {
                match refunds.iter_mut().find(|s| Arc::ptr_eq(s.subject, subject) && s.window == *window) {
                    Some(s) => {
                        s.tokens = s.tokens.saturating_add(*tokens);
                        s.nano_usd = s.nano_usd.saturating_add(*nano_usd);
                    }
                    None => refunds.push(SentRefund {
                        subject,
                        window: *window,
                        tokens: *tokens,
                        nano_usd: *nano_usd,
                    }),
                }
            }
        }
        Self { releases, refunds }
    }
}

/// A ticket's budget charge, when it has one.
fn budget_charge(op: &Op) -> Option<(&Arc<Subject>, u64, i64)> {
    match &op.budget {
        BudgetOp::Charge { subject, tokens, nano_usd } => Some((subject, *tokens, *nano_usd)),
        _ => None,
    }
}

/// The script call for `tickets` and what the step gives back:
/// `EVALSHA sha` or `EVAL body` (the layout is in the header of
/// `charge_v5.lua`).
fn command(tickets: &[&Op], merged: &Merged<'_>, verb: &str, script: &str) -> redis::Cmd {
    let mut cmd = redis::cmd(verb);
    let (nrel, nref) = (merged.releases.len(), merged.refunds.len());
    let charged: usize =
        tickets.iter().map(|t| t.charges.len() + usize::from(budget_charge(t).is_some())).sum();
    cmd.arg(script).arg(nrel + nref + charged);
    for r in &merged.releases {
        cmd.arg(&r.subject.redis.subject);
    }
    for r in &merged.refunds {
        cmd.arg(&r.subject.redis.budget);
    }
    for t in tickets {
        for c in &t.charges {
            cmd.arg(&c.subject.redis.subject);
        }
        if let Some((subject, ..)) = budget_charge(t) {
            cmd.arg(&subject.redis.budget);
        }
    }
    cmd.arg(nrel).arg(nref).arg(tickets.len());
    for r in &merged.releases {
        cmd.arg(r.member).arg(r.at_sec).arg(r.refund).arg(r.leases).arg(r.requests);
    }
    for r in &merged.refunds {
        cmd.arg(r.window).arg(r.tokens).arg(r.nano_usd);
    }
    let or_none = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok()).unwrap_or(-1);
    for t in tickets {
        let lease_ms = u64::try_from(t.lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let charge_budget = budget_charge(t);
        cmd.arg(t.member)
            .arg(lease_ms)
            .arg(t.units.max(1))
            .arg(t.charges.len())
            .arg(u8::from(charge_budget.is_some()));
        for c in &t.charges {
            let l = &c.subject.limits;
            cmd.arg(or_none(l.rpm))
                .arg(or_none(l.tpm))
                .arg(or_none(l.concurrency.map(u64::from)))
                .arg(c.tokens);
        }
        if let Some((subject, tokens, nano_usd)) = charge_budget {
            let (window, ltok, lusd) = match &subject.budget {
                Some(b) => (b.window_secs, or_none(b.tokens), b.nano_usd.unwrap_or(-1)),
                None => (1, -1, -1),
            };
            cmd.arg(window).arg(ltok).arg(lusd).arg(tokens).arg(nano_usd);
        }
    }
    cmd
}

/// The budget's figures in a reply (window -1: none).
fn budget_state(tokens: i64, nano_usd: i64, window: i64) -> Option<BudgetState> {
    (window >= 0).then(|| BudgetState {
        window: window as u64,
        tokens: tokens.max(0) as u64,
        nano_usd: nano_usd.max(0),
    })
}

/// A reply, decoded: the decision on each ticket, and the budget after
/// each refund sent (none where its window had moved on).
type Decoded = (Vec<Result<Granted, Denial>>, Vec<Option<BudgetState>>);

/// The script's answer (see the header of `charge_v5.lua`): five figures
/// per ticket, then three per refund sent.
fn decode(reply: &[i64], tickets: usize) -> Option<Decoded> {
    let (heads, rest) = reply.split_at_checked(tickets.checked_mul(5)?)?;
    if rest.len() % 3 != 0 {
        return None;
    }
    let refunds = rest.chunks_exact(3).map(|r| budget_state(r[0], r[1], r[2])).collect();
    let decisions = heads.chunks_exact(5).map(decision).collect::<Option<_>>()?;
    Some((decisions, refunds))
}

/// One ticket's five figures.
fn decision(head: &[i64]) -> Option<Result<Granted, Denial>> {
    Some(match *head {
        [1, now_sec, tokens, nano_usd, window] => Ok(Granted {
            at_sec: u64::try_from(now_sec).ok()?,
            budget: budget_state(tokens, nano_usd, window),
        }),
        [0, index, code, retry_ms, never] => {
            let retry_after = u64::try_from(retry_ms).ok().map(Duration::from_millis);
            let never = never == 1;
            let charge = usize::try_from(index).ok()?.checked_sub(1);
            let window = |limit| Denial::Window {
                charge: charge.unwrap_or(0),
                full: Full { limit, retry_after, never },
            };
            let budget = |what| Denial::Budget(Exhausted { what, retry_after, never });
            Err(match code {
                1 => window(Exceeded::Rpm),
                2 => window(Exceeded::Tpm),
                3 => Denial::Concurrency { charge: charge? },
                4 => budget(Spending::Tokens),
                5 => budget(Spending::Usd),
                _ => return None,
            })
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_script_replies() {
        let decision = |reply: &[i64]| decode(reply, 1).map(|(mut d, _)| d.remove(0));
        assert_eq!(decision(&[1, 100, -1, -1, -1]), Some(Ok(Granted { at_sec: 100, budget: None })));
        assert_eq!(
            decision(&[0, 2, 1, 1500, 0]),
            Some(Err(Denial::Window {
                charge: 1,
                full: Full {
                    limit: Exceeded::Rpm,
                    retry_after: Some(Duration::from_millis(1500)),
                    never: false
                }
            }))
        );
        assert_eq!(decision(&[0, 1, 3, -1, 0]), Some(Err(Denial::Concurrency { charge: 0 })));
        assert!(matches!(
            decision(&[0, 0, 5, -1, 1]),
            Some(Err(Denial::Budget(Exhausted { never: true, .. })))
        ));
        assert_eq!(decision(&[7]), None);
        // Refund figures follow, three per refund; a window that moved on is none.
        let (_, refunds) = decode(&[1, 0, -1, -1, -1, 40, 900, 7, -1, -1, -1], 1).unwrap();
        assert_eq!(refunds, [Some(BudgetState { window: 7, tokens: 40, nano_usd: 900 }), None]);
        assert_eq!(decode(&[1, 0, -1, -1, -1, 40], 1), None);
        // Five figures per ticket come first.
        let (two, refunds) = decode(&[1, 9, -1, -1, -1, 0, 1, 3, -1, 0], 2).unwrap();
        assert_eq!(two, [Ok(Granted { at_sec: 9, budget: None }), Err(Denial::Concurrency { charge: 0 })]);
        assert!(refunds.is_empty());
        assert_eq!(decode(&[1, 9, -1, -1, -1], 2), None);
        // A settle-only step answers for no ticket.
        assert_eq!(decode(&[], 0), Some((vec![], vec![])));
    }

    #[test]
    fn the_script_says_its_name_and_version() {
        assert!(SCRIPT.starts_with("-- llmgw_charge_v5:"));
    }
}
