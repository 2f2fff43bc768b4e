//! A key's budget: tokens and USD per window. Windows are fixed, counted
//! from the Unix epoch in UTC (`window: 1d` resets at 00:00 UTC; `30d` every
//! 30 days since 1970-01-01), so every replica and Redis agree on when one
//! ends without storing a start. A call reserves its estimate when admitted
//! and is settled with what it used, in the window it was admitted in.

use std::time::Duration;

use super::prices::NANO_PER_USD;
use crate::config::BudgetConfig;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetLimits {
    pub tokens: Option<u64>,
    pub nano_usd: Option<i64>,
    pub window_secs: u64,
}

impl BudgetLimits {
    pub fn new(config: &BudgetConfig) -> Self {
        Self {
            tokens: config.tokens,
            nano_usd: config.usd.map(|usd| (usd * NANO_PER_USD) as i64),
            window_secs: config.window.as_secs().max(1),
        }
    }

    pub fn window_index(&self, now: Duration) -> u64 {
        now.as_secs() / self.window_secs
    }

    /// From `now` to the end of its window.
    pub fn until_window_end(&self, now: Duration) -> Duration {
        let end = Duration::from_secs((self.window_index(now) + 1) * self.window_secs);
        end.saturating_sub(now)
    }
}

/// Which budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spending {
    Tokens,
    Usd,
}

/// A refusal by a budget; `never`: the reservation alone is over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub what: Spending,
    pub retry_after: Option<Duration>,
    pub never: bool,
}

/// What one key has spent (and holds reserved) in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub window: u64,
    pub tokens: u64,
    pub nano_usd: i64,
}

impl Spent {
    /// Starts afresh when `now` is in a later window.
    pub fn roll(&mut self, limits: &BudgetLimits, now: Duration) {
        let window = limits.window_index(now);
        if self.window != window {
            *self = Spent { window, tokens: 0, nano_usd: 0 };
        }
    }

    /// Whether `tokens` and `nano_usd` more fit (after [`Spent::roll`]).
    pub fn check(
        &self,
        limits: &BudgetLimits,
        now: Duration,
        tokens: u64,
        nano_usd: i64,
    ) -> Result<(), Exhausted> {
        let retry_after = Some(limits.until_window_end(now));
        if let Some(limit) = limits.tokens {
            if tokens > limit {
                return Err(Exhausted { what: Spending::Tokens, retry_after: None, never: true });
            }
            if self.tokens + tokens > limit {
                return Err(Exhausted { what: Spending::Tokens, retry_after, never: false });
            }
        }
        if let Some(limit) = limits.nano_usd {
            if nano_usd > limit {
                return Err(Exhausted { what: Spending::Usd, retry_after: None, never: true });
            }
            // A budget spent to the last nano-dollar is spent, even for a
            // call with no price.
            if self.nano_usd + nano_usd > limit || self.nano_usd >= limit {
                return Err(Exhausted { what: Spending::Usd, retry_after, never: false });
            }
        }
        Ok(())
    }

    pub fn add(&mut self, tokens: u64, nano_usd: i64) {
        self.tokens = self.tokens.saturating_add(tokens);
        self.nano_usd = self.nano_usd.saturating_add(nano_usd);
    }

    /// Gives back what a call reserved beyond what it used (a negative
    /// refund charges more), if its window is still the current one.
    pub fn refund(&mut self, window: u64, tokens: i64, nano_usd: i64) {
        if self.window == window {
            self.tokens = self.tokens.saturating_add_signed(-tokens);
            self.nano_usd = self.nano_usd.saturating_sub(nano_usd).max(0);
        }
    }

    /// What is left, for the metric: (tokens, USD).
    pub fn left(&self, limits: &BudgetLimits) -> (Option<u64>, Option<f64>) {
        (
            limits.tokens.map(|l| l.saturating_sub(self.tokens)),
            limits.nano_usd.map(|l| (l - self.nano_usd).max(0) as f64 / NANO_PER_USD),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits { tokens: Some(1_000), nano_usd: Some(2_000), window_secs: 3_600 }
    }

    #[test]
    fn fixed_windows_from_the_epoch() {
        let l = limits();
        let now = Duration::from_secs(7_200 + 600);
        assert_eq!(l.window_index(now), 2);
        assert_eq!(l.until_window_end(now), Duration::from_secs(3_000));
        let mut s = Spent::default();
        s.roll(&l, now);
        s.add(900, 100);
        let e = s.check(&l, now, 200, 0).unwrap_err();
        assert_eq!((e.what, e.retry_after), (Spending::Tokens, Some(Duration::from_secs(3_000))));
        // The next window starts afresh.
        let later = Duration::from_secs(3 * 3_600);
        s.roll(&l, later);
        s.check(&l, later, 200, 0).unwrap();
    }

    #[test]
    fn refunds_stay_in_their_window_and_never_fit_is_final() {
        let l = limits();
        let mut s = Spent::default();
        s.roll(&l, Duration::ZERO);
        s.add(500, 1_500);
        s.refund(0, 300, 1_000);
        assert_eq!((s.tokens, s.nano_usd), (200, 500));
        s.refund(1, 100, 100);
        assert_eq!((s.tokens, s.nano_usd), (200, 500));
        let e = s.check(&l, Duration::ZERO, 0, 2_001).unwrap_err();
        assert!(e.never && e.what == Spending::Usd);
        assert_eq!(s.left(&l), (Some(800), Some(1.5e-6)));
    }
}
