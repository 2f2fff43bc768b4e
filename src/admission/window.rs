//! The 60 s sliding window behind `rpm` and `tpm`, and the clock it runs on.
//! Requests and tokens are counted in one-second buckets; a bucket counts
//! until 61 s after it opened, so no 60 s span ever holds more than the
//! limit (a freed slot comes back at most one second late). The Redis script
//! keeps the same buckets, so both backends agree to the second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The span `rpm` and `tpm` hold over.
pub const WINDOW_SECS: u64 = 60;
/// Buckets alive at once: the current second and the 60 before it.
const BUCKETS: usize = WINDOW_SECS as usize + 1;

/// Unix time as tokio sees it: wall time at creation, advanced by tokio's
/// clock, so a test on a paused clock moves every window and budget.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
    unix_origin: Duration,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        let unix_origin = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Self { origin: tokio::time::Instant::now(), unix_origin }
    }

    /// Since the Unix epoch.
    pub fn now(&self) -> Duration {
        self.unix_origin + self.origin.elapsed()
    }
}

/// Why a window refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Rpm,
    Tpm,
}

/// A refusal by a window: which limit, when it would admit the charge
/// (`None` with `never`: the charge alone is over the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub limit: Exceeded,
    pub retry_after: Option<Duration>,
    pub never: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    sec: u64,
    requests: u64,
    tokens: u64,
}

/// One subject's requests and tokens over the last 61 seconds.
#[derive(Debug, Clone)]
pub struct Window {
    buckets: [Bucket; BUCKETS],
}

impl Default for Window {
    fn default() -> Self {
        Self { buckets: [Bucket { sec: u64::MAX, requests: 0, tokens: 0 }; BUCKETS] }
    }
}

fn live(b: &Bucket, now_sec: u64) -> bool {
    b.sec <= now_sec && b.sec + WINDOW_SECS >= now_sec
}

impl Window {
    fn totals(&self, now_sec: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| live(b, now_sec))
            .fold((0, 0), |(r, t), b| (r + b.requests, t + b.tokens))
    }

    /// When enough of what is counted now has aged out to free `need` of a
    /// figure (`pick` chooses requests or tokens).
    fn freed_after(&self, now: Duration, need: u64, pick: impl Fn(&Bucket) -> u64) -> Option<Duration> {
        let now_sec = now.as_secs();
        let mut live: Vec<&Bucket> = self.buckets.iter().filter(|b| live(b, now_sec)).collect();
        live.sort_by_key(|b| b.sec);
        let mut freed = 0;
        for b in live {
            freed += pick(b);
            if freed >= need {
                let expires = Duration::from_secs(b.sec + WINDOW_SECS + 1);
                return Some(expires.saturating_sub(now));
            }
        }
        None
    }

    /// Whether one more request of `tokens` fits `rpm` and `tpm` now.
    pub fn check(&self, now: Duration, rpm: Option<u64>, tpm: Option<u64>, tokens: u64) -> Result<(), Full> {
        let (requests, counted) = self.totals(now.as_secs());
        if let Some(rpm) = rpm
            && requests + 1 > rpm
        {
            let retry_after = self.freed_after(now, requests + 1 - rpm, |b| b.requests);
            return Err(Full { limit: Exceeded::Rpm, retry_after, never: false });
        }
        if let Some(tpm) = tpm {
            if tokens > tpm {
                return Err(Full { limit: Exceeded::Tpm, retry_after: None, never: true });
            }
            if counted + tokens > tpm {
                let retry_after = self.freed_after(now, counted + tokens - tpm, |b| b.tokens);
                return Err(Full { limit: Exceeded::Tpm, retry_after, never: false });
            }
        }
        Ok(())
    }

    /// Counts one request of `tokens` in the current second.
    pub fn add(&mut self, now_sec: u64, tokens: u64) {
        let b = &mut self.buckets[(now_sec % BUCKETS as u64) as usize];
        if b.sec != now_sec {
            *b = Bucket { sec: now_sec, requests: 0, tokens: 0 };
        }
        b.requests += 1;
        b.tokens += tokens;
    }

    /// Corrects the tokens counted at `at_sec` by `-refund` (a negative
    /// refund charges more), if that second still counts.
    pub fn refund(&mut self, at_sec: u64, now_sec: u64, refund: i64) {
        let b = &mut self.buckets[(at_sec % BUCKETS as u64) as usize];
        if b.sec == at_sec && live(b, now_sec) {
            b.tokens = b.tokens.saturating_add_signed(-refund);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn rpm_holds_over_any_60_seconds() {
        let mut w = Window::default();
        let t0 = Duration::from_secs(1_000);
        // 3 requests at t0+0.5 s, rpm 3.
        let at = t0 + S / 2;
        for _ in 0..3 {
            w.check(at, Some(3), None, 0).unwrap();
            w.add(at.as_secs(), 0);
        }
        let full = w.check(at, Some(3), None, 0).unwrap_err();
        assert_eq!(full.limit, Exceeded::Rpm);
        // The bucket opened at t0 counts until t0 + 61 s.
        assert_eq!(full.retry_after, Some(Duration::from_millis(60_500)));
        // Still full 60 s after those requests: the window never holds 4.
        assert!(w.check(at + 60 * S, Some(3), None, 0).is_err());
        w.check(t0 + 61 * S, Some(3), None, 0).unwrap();
    }

    #[test]
    fn tpm_refuses_at_once_what_can_never_fit() {
        let w = Window::default();
        let full = w.check(Duration::from_secs(5), None, Some(100), 101).unwrap_err();
        assert!(full.never);
        assert_eq!(full.retry_after, None);
    }

    #[test]
    fn tpm_retry_after_counts_the_buckets_that_must_age_out() {
        let mut w = Window::default();
        let t0 = Duration::from_secs(2_000);
        w.add(t0.as_secs(), 40);
        w.add(t0.as_secs() + 10, 40);
        let now = t0 + 20 * S;
        // 80 counted, 50 wanted, 100 allowed: 30 must go, the first bucket frees 40.
        let full = w.check(now, None, Some(100), 50).unwrap_err();
        assert_eq!(full.retry_after, Some(41 * S));
        // 70 wanted: both buckets must go.
        assert_eq!(w.check(now, None, Some(100), 70).unwrap_err().retry_after, Some(51 * S));
    }

    #[test]
    fn refunds_correct_a_live_bucket_only() {
        let mut w = Window::default();
        w.add(100, 50);
        w.refund(100, 120, 30);
        assert_eq!(w.totals(120), (1, 20));
        w.refund(100, 120, -5);
        assert_eq!(w.totals(120), (1, 25));
        // An aged-out bucket is not brought back.
        w.refund(100, 200, -5);
        assert_eq!(w.totals(200), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_tokio_time() {
        let c = Clock::new();
        let a = c.now();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(c.now() - a, Duration::from_secs(61));
    }
}
