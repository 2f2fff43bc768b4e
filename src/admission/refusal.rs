//! The refusals a call's admission gives, built from what refused it: the
//! limit named in the description, the QuotaFailure subject, and when the
//! limit would admit the call.

use std::time::Duration;

use super::{
    Refusal, RefusalReason, Scope,
    budget::Spending,
    control::TargetPlan,
    plan::{Denial, Subject},
    window::Exceeded,
};

/// The refusal for a denial by `subject` (the key's, or a target's).
pub(super) fn denial(
    d: &Denial,
    subject: &Subject,
    plan: Option<&TargetPlan>,
    tokens: u64,
    retry_after: Option<Duration>,
) -> Refusal {
    let l = &subject.limits;
    let figure = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let (reason, mut description) = match d {
        Denial::Window { full, .. } => match full.limit {
            Exceeded::Rpm => {
                (RefusalReason::RateLimited, format!("rpm {} of {}", figure(l.rpm), subject.name))
            }
            Exceeded::Tpm => {
                (RefusalReason::RateLimited, format!("tpm {} of {}", figure(l.tpm), subject.name))
            }
        },
        Denial::Concurrency { .. } => (
            RefusalReason::ConcurrencyLimited,
            format!("concurrency {} of {}", figure(l.concurrency.map(u64::from)), subject.name),
        ),
        Denial::Budget(e) => {
            let b = subject.budget.as_ref();
            let amount = match e.what {
                Spending::Tokens => format!("{} tokens", figure(b.and_then(|b| b.tokens))),
                Spending::Usd => {
                    let usd =
                        b.and_then(|b| b.nano_usd).map_or(0.0, |n| n as f64 / super::prices::NANO_PER_USD);
                    format!("{usd} USD")
                }
            };
            (
                RefusalReason::BudgetExhausted,
                format!("budget of {amount} per {} of {}", subject.budget_window, subject.name),
            )
        }
    };
    if d.never() {
        description.push_str(&format!(": this call alone reserves {tokens} tokens"));
    }
    let subject_id = match (subject.scope, plan) {
        (Scope::Target, Some(p)) => p.subject(),
        _ => subject.id.to_string(),
    };
    Refusal {
        reason,
        scope: subject.scope,
        subject: subject_id,
        description,
        retry_after: if d.never() { None } else { retry_after },
    }
}

/// The refusal of a call that cannot wait at `plan`.
pub(super) fn queue(plan: &TargetPlan, description: String, retry_after: Option<Duration>) -> Refusal {
    Refusal {
        reason: RefusalReason::QueueTimeout,
        scope: Scope::Target,
        subject: plan.subject(),
        description,
        retry_after,
    }
}
