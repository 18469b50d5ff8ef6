//! A replica's restart budget, pure with an explicit clock: at most `max` restarts within any
//! `window`, each after a back-off that doubles (1 s, 2 s, 4 s … at most 30 s).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Budget {
    max: u32,
    window: Duration,
    /// When each restart within the window was granted.
    granted: VecDeque<Instant>,
}

impl Budget {
    pub fn new(max: u32, window: Duration) -> Budget {
        Budget {
            max,
            window,
            granted: VecDeque::new(),
        }
    }

    /// A failure at `now`: `Some(back-off)` when one more restart fits in the window (it
    /// counts from now), `None` when the replica has used them all.
    pub fn restart(&mut self, now: Instant) -> Option<Duration> {
        while self
            .granted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.granted.pop_front();
        }
        if self.granted.len() as u32 >= self.max {
            return None;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << self.granted.len().min(16))
            .min(MAX_BACKOFF);
        self.granted.push_back(now);
        Some(backoff)
    }

    /// Restarts granted within the window that ended at the last failure.
    pub fn used(&self) -> usize {
        self.granted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn at_most_max_within_the_window_with_growing_back_off() {
        let t0 = Instant::now();
        let mut b = Budget::new(3, 600 * S);
        assert_eq!(b.restart(t0), Some(S));
        assert_eq!(b.restart(t0 + 10 * S), Some(2 * S));
        assert_eq!(b.restart(t0 + 20 * S), Some(4 * S));
        assert_eq!(b.used(), 3);
        // the fourth failure within ten minutes: no more
        assert_eq!(b.restart(t0 + 30 * S), None);
        assert_eq!(b.restart(t0 + 599 * S), None);
        // once the first restart is older than the window, one fits again
        assert_eq!(b.restart(t0 + 600 * S), Some(4 * S));
        // a long quiet time forgives everything: the back-off starts over
        assert_eq!(b.restart(t0 + 5000 * S), Some(S));
        assert_eq!(b.used(), 1);
    }

    #[test]
    fn no_restarts_and_a_capped_back_off() {
        let t0 = Instant::now();
        assert_eq!(Budget::new(0, 60 * S).restart(t0), None);
        let mut b = Budget::new(100, 3600 * S);
        let last = (0..100).map(|i| b.restart(t0 + i * S)).last().flatten();
        assert_eq!(last, Some(MAX_BACKOFF));
        assert_eq!(b.restart(t0 + 100 * S), None);
    }
}
