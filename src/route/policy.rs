//! The router's choices, pure: which replica gets a request, and when a replica counts as
//! healthy. No I/O, no clock of its own.

use std::time::{Duration, Instant};

/// What the router knows of one replica when it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub healthy: bool,
    /// Requests sent to it that have not finished (their response still streams).
    pub outstanding: usize,
}

/// The replica for the next request: the healthy one with the fewest outstanding requests,
/// ties going to the first at or after `start` (the caller turns `start` round, so idle
/// replicas take turns). `tried` are skipped (a request that could not connect to them).
/// When no replica is healthy, the least loaded untried one is still tried: health is
/// polled, and a replica that just came back should not wait for the next poll.
pub fn pick(views: &[View], start: usize, tried: &[usize]) -> Option<usize> {
    let n = views.len();
    if n == 0 {
        return None;
    }
    let order = (0..n)
        .map(|i| (start + i) % n)
        .filter(|i| !tried.contains(i));
    let best = |healthy_only: bool| {
        order
            .clone()
            .filter(|&i| !healthy_only || views[i].healthy)
            .min_by_key(|&i| views[i].outstanding)
    };
    best(true).or_else(|| best(false))
}

/// One replica's health as the router sees it: polled `/health`, plus what requests found.
/// A refused connection takes it out at once; a failed or slow poll only after `failures` in
/// a row (a busy engine answers `/health` late); one good poll brings it back.
#[derive(Debug, Clone)]
pub struct Health {
    healthy: bool,
    failed_polls: u32,
    failures: u32,
    pub since: Option<Instant>,
}

/// What changed, for the router's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Up,
    Down(String),
}

impl Health {
    pub fn new(failures: u32) -> Health {
        Health {
            healthy: false,
            failed_polls: 0,
            failures: failures.max(1),
            since: None,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    fn set(&mut self, healthy: bool, why: String, now: Instant) -> Option<Change> {
        if healthy == self.healthy {
            return None;
        }
        self.healthy = healthy;
        self.since = Some(now);
        Some(if healthy {
            Change::Up
        } else {
            Change::Down(why)
        })
    }

    pub fn on_poll(&mut self, ok: Result<(), String>, now: Instant) -> Option<Change> {
        match ok {
            Ok(()) => {
                self.failed_polls = 0;
                self.set(true, String::new(), now)
            }
            Err(why) => {
                self.failed_polls += 1;
                if self.failed_polls >= self.failures {
                    self.set(false, why, now)
                } else {
                    None
                }
            }
        }
    }

    /// A request could not connect: the replica is gone (its engine died or restarts).
    pub fn on_refused(&mut self, why: String, now: Instant) -> Option<Change> {
        self.failed_polls = self.failures;
        self.set(false, why, now)
    }
}

/// How long a poll of `/health` may take: longer than the engine's own health check.
pub fn poll_timeout(interval: Duration) -> Duration {
    interval.max(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(healthy: bool, outstanding: usize) -> View {
        View {
            healthy,
            outstanding,
        }
    }

    #[test]
    fn least_outstanding_among_the_healthy() {
        let views = [v(true, 3), v(true, 1), v(false, 0), v(true, 1)];
        // the fewest outstanding wins; the unhealthy idle one is skipped
        assert_eq!(pick(&views, 0, &[]), Some(1));
        // ties go to the first at or after `start`
        assert_eq!(pick(&views, 2, &[]), Some(3));
        assert_eq!(pick(&views, 3, &[]), Some(3));
        // a replica that refused this request is not tried again
        assert_eq!(pick(&views, 0, &[1]), Some(3));
        assert_eq!(pick(&views, 0, &[1, 3]), Some(0));
        // with nothing healthy left, the untried ones are still tried, least loaded first
        assert_eq!(pick(&views, 0, &[0, 1, 3]), Some(2));
        assert_eq!(pick(&views, 0, &[0, 1, 2, 3]), None);
        assert_eq!(pick(&[], 0, &[]), None);
    }

    #[test]
    fn idle_replicas_take_turns() {
        let views = [v(true, 0), v(true, 0), v(true, 0)];
        let picks: Vec<usize> = (0..6).map(|s| pick(&views, s, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn health_needs_several_failed_polls_but_one_refusal() {
        let t = Instant::now();
        let mut h = Health::new(3);
        assert!(!h.healthy());
        assert_eq!(h.on_poll(Ok(()), t), Some(Change::Up));
        assert_eq!(h.on_poll(Err("slow".into()), t), None);
        assert_eq!(h.on_poll(Err("slow".into()), t), None);
        assert!(h.healthy());
        // a good poll resets the count
        assert_eq!(h.on_poll(Ok(()), t), None);
        assert_eq!(h.on_poll(Err("a".into()), t), None);
        assert_eq!(h.on_poll(Err("b".into()), t), None);
        assert_eq!(
            h.on_poll(Err("c".into()), t),
            Some(Change::Down("c".into()))
        );
        assert_eq!(h.on_poll(Ok(()), t), Some(Change::Up));
        // a refused connection: out at once, back on the next good poll
        assert_eq!(
            h.on_refused("refused".into(), t),
            Some(Change::Down("refused".into()))
        );
        assert_eq!(h.on_poll(Err("x".into()), t), None);
        assert_eq!(h.on_poll(Ok(()), t), Some(Change::Up));
    }
}
