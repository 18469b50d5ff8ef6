//! A launcher's own stalls: the time it was not running between two ticks (stopped, starved
//! of CPU), which must not count as a peer's silence. Shared by the master and the ranks.

use std::time::{Duration, Instant};

pub struct OwnStall {
    last_tick: Option<Instant>,
    interval: Duration,
}

impl OwnStall {
    /// Ticks are expected at least every `interval` (the heartbeat interval).
    pub fn new(interval: Duration) -> OwnStall {
        OwnStall {
            last_tick: None,
            interval,
        }
    }

    /// At a tick: the part of the gap since the previous tick beyond one interval (zero on
    /// the first tick). Peers are forgiven that much of their silence.
    pub fn on_tick(&mut self, now: Instant) -> Duration {
        self.last_tick.replace(now).map_or(Duration::ZERO, |prev| {
            now.saturating_duration_since(prev)
                .saturating_sub(self.interval)
        })
    }
}

/// When a peer was last heard from, moved on by `stall`, never past `now`.
pub fn forgive(seen: Instant, stall: Duration, now: Instant) -> Instant {
    (seen + stall).min(now)
}
