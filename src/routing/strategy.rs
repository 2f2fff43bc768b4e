//! The order in which one call tries a model's targets: the strategy's
//! pick first, the rest as fallbacks; and the backoff between tries of one
//! target.

use std::time::Duration;

use crate::config::Strategy;

/// What a strategy reads of each target.
pub struct Candidate {
    pub weight: u32,
    pub in_flight: u32,
    /// Recent time to first token in µs; 0 when unknown.
    pub ttft_us: u64,
}

/// Target indices in the order to try them.
pub fn order(strategy: Strategy, candidates: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    match strategy {
        Strategy::Ordered => {}
        Strategy::Weighted => {
            // Weighted draw without replacement: the first pick follows the
            // weights, and so does each fallback among those left.
            let mut left: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
            for i in 0..order.len() {
                if left == 0 {
                    break;
                }
                let mut r = fastrand::u64(..left);
                let mut pick = i;
                for (j, &idx) in order.iter().enumerate().skip(i) {
                    let w = u64::from(candidates[idx].weight);
                    if r < w {
                        pick = j;
                        break;
                    }
                    r -= w;
                }
                left -= u64::from(candidates[order[pick]].weight);
                order.swap(i, pick);
            }
        }
        Strategy::LeastBusy => {
            // Unknown latency sorts after known, so a new target is tried
            // only when it is less busy.
            order.sort_by_key(|&i| {
                let c = &candidates[i];
                (c.in_flight, if c.ttft_us == 0 { u64::MAX } else { c.ttft_us })
            });
        }
    }
    order
}

/// Full jitter: a uniform wait below `initial * 2^(retry-1)`, capped at `max`.
pub fn backoff(retry: u32, initial: Duration, max: Duration) -> Duration {
    let shift = retry.saturating_sub(1).min(20);
    let ceiling = initial.saturating_mul(1 << shift).min(max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(weight: u32, in_flight: u32, ttft_us: u64) -> Candidate {
        Candidate { weight, in_flight, ttft_us }
    }

    #[test]
    fn weighted_follows_the_weights() {
        let cands = [c(3, 0, 0), c(1, 0, 0)];
        let mut first = [0u32; 2];
        for _ in 0..4000 {
            let o = order(Strategy::Weighted, &cands);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            first[o[0]] += 1;
        }
        // 3:1 expected; a wide band keeps the test from flaking.
        assert!((2700..3300).contains(&first[0]), "{first:?}");
    }

    #[test]
    fn least_busy_then_fastest() {
        let cands = [c(1, 5, 100), c(1, 1, 900), c(1, 1, 300), c(1, 1, 0)];
        assert_eq!(order(Strategy::LeastBusy, &cands), vec![2, 1, 3, 0]);
        assert_eq!(order(Strategy::Ordered, &cands), vec![0, 1, 2, 3]);
    }

    #[test]
    fn backoff_is_capped_and_grows() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(250));
        for retry in 1..40 {
            let b = backoff(retry, i, m);
            assert!(b <= m, "{b:?}");
            if retry == 1 {
                assert!(b <= i);
            }
        }
    }
}
