//! The router's choices, pure: which replica gets a request, and when a replica counts as
//! healthy. No I/O, no clock of its own.

use std::time::{Duration, Instant};

/// What the router knows of one replica when it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub healthy: bool,
    /// Out of the rotation by the master's (or the service's) word, or no replica there yet:
    /// never tried, not even when nothing is healthy.
    pub held: bool,
    /// Requests sent to it that have not finished (their response still streams).
    pub outstanding: usize,
    /// When it was last chosen (a sequence number; 0: never): ties go to the one chosen
    /// longest ago, so no kind of request is coupled to one replica.
    pub last_chosen: u64,
}

/// How requests are spread over a model's replicas (`router.policy`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Policy {
    /// The fewest requests in flight.
    LeastOutstanding,
    /// The replica that holds the longest prefix of the prompt (or the client's session),
    /// unless it has more than the margin more in flight than the least loaded.
    #[default]
    Prefix,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LeastOutstanding => "least_outstanding",
            Policy::Prefix => "prefix",
        }
    }
}

/// Why a replica was chosen (the router's `routed` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Load,
    Prefix,
    Session,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::Load => "load",
            By::Prefix => "prefix",
            By::Session => "session",
        }
    }
}

/// The replica for the next request: the healthy one with the fewest outstanding requests,
/// ties going to the one chosen longest ago. `tried` are skipped (replicas this request
/// failed on). When no replica is healthy, the least loaded untried one that is not held is
/// still tried: health is polled, and a replica that just came back should not wait for the
/// next poll.
pub fn pick(views: &[View], tried: &[usize]) -> Option<usize> {
    let best = |healthy_only: bool| {
        (0..views.len())
            .filter(|i| !tried.contains(i) && !views[*i].held)
            .filter(|&i| !healthy_only || views[i].healthy)
            .min_by_key(|&i| (views[i].outstanding, views[i].last_chosen))
    };
    best(true).or_else(|| best(false))
}

/// The prefix policy's pick: the replica holding the client's session, else the one holding
/// the longest prefix of the prompt (`prefixes`: longest first), when it is healthy, not
/// tried, and has at most `margin` more requests in flight than the least loaded; else the
/// least loaded ([`pick`]).
pub fn pick_affine(
    views: &[View],
    tried: &[usize],
    session: Option<usize>,
    prefixes: &[(usize, usize)],
    margin: usize,
) -> Option<(usize, By)> {
    let least = pick(views, tried)?;
    let floor = views[least].outstanding;
    let fits = |i: usize| {
        i < views.len()
            && views[i].healthy
            && !tried.contains(&i)
            && views[i].outstanding <= floor + margin
    };
    let candidates = session
        .map(|s| (s, By::Session))
        .into_iter()
        .chain(prefixes.iter().map(|&(r, _)| (r, By::Prefix)));
    for (i, by) in candidates {
        if fits(i) {
            return Some((i, by));
        }
    }
    Some((least, By::Load))
}

/// One replica's health as the router sees it: polled `/health`, plus what requests found.
/// A refused connection takes it out at once; a failed or slow poll only after `failures` in
/// a row (a busy engine answers `/health` late); one good poll brings it back.
#[derive(Debug, Clone)]
pub struct Health {
    healthy: bool,
    /// The job's master says it does not serve now (stalled, restarting, not yet generating):
    /// out of the rotation whatever its `/health` says.
    held: bool,
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
            held: false,
            failed_polls: 0,
            failures: failures.max(1),
            since: None,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy && !self.held
    }

    pub fn held(&self) -> bool {
        self.held
    }

    /// `healthy` and `held` as given; what changed for the rotation.
    fn change(&mut self, healthy: bool, held: bool, why: String, now: Instant) -> Option<Change> {
        let before = self.healthy();
        self.healthy = healthy;
        self.held = held;
        let after = self.healthy();
        if before == after {
            return None;
        }
        self.since = Some(now);
        Some(if after { Change::Up } else { Change::Down(why) })
    }

    fn set(&mut self, healthy: bool, why: String, now: Instant) -> Option<Change> {
        self.change(healthy, self.held, why, now)
    }

    /// What the job's master says: `Some(why)` while the replica must not serve.
    pub fn on_state(&mut self, held: Option<String>, now: Instant) -> Option<Change> {
        let healthy = self.healthy;
        let why = held.clone().unwrap_or_default();
        self.change(healthy, held.is_some(), why, now)
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
            held: false,
            outstanding,
            last_chosen: 0,
        }
    }

    #[test]
    fn least_outstanding_among_the_healthy() {
        let views = [v(true, 3), v(true, 1), v(false, 0), v(true, 1)];
        // the fewest outstanding wins; the unhealthy idle one is skipped
        assert_eq!(pick(&views, &[]), Some(1));
        // a replica that failed this request is not tried again
        assert_eq!(pick(&views, &[1]), Some(3));
        assert_eq!(pick(&views, &[1, 3]), Some(0));
        // with nothing healthy left, the untried ones are still tried, least loaded first
        assert_eq!(pick(&views, &[0, 1, 3]), Some(2));
        assert_eq!(pick(&views, &[0, 1, 2, 3]), None);
        assert_eq!(pick(&[], &[]), None);
        // a held replica (the master's word, or a service router's free slot) never
        let held = View {
            held: true,
            ..v(false, 0)
        };
        assert_eq!(pick(&[held, v(false, 5)], &[]), Some(1));
        assert_eq!(pick(&[held], &[]), None);
    }

    #[test]
    fn ties_go_to_the_one_chosen_longest_ago() {
        // three idle replicas; a client alternates two kinds of request, one at a time: each
        // kind still reaches every replica (with a turn counter shared by all requests, every
        // second request, always of the same kind, went to the same replica)
        let mut views = [v(true, 0), v(true, 0), v(true, 0)];
        let mut seq = 0;
        let mut by_kind = [Vec::new(), Vec::new()];
        for n in 0..12 {
            let i = pick(&views, &[]).unwrap();
            seq += 1;
            views[i].last_chosen = seq;
            by_kind[n % 2].push(i);
        }
        for k in &by_kind {
            let mut seen = k.clone();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, [0, 1, 2], "{by_kind:?}");
        }
        // load first, then age
        views = [v(true, 1), v(true, 0), v(true, 0)];
        views[1].last_chosen = 5;
        views[2].last_chosen = 3;
        assert_eq!(pick(&views, &[]), Some(2));
    }

    #[test]
    fn the_prefix_holder_wins_within_the_margin() {
        let views = [v(true, 0), v(true, 3), v(true, 6), v(false, 0)];
        // the longest prefix is on replica 1, within 4 of the least loaded
        assert_eq!(
            pick_affine(&views, &[], None, &[(1, 5), (2, 9)], 4),
            Some((1, By::Prefix))
        );
        // too loaded: the next holder, else load
        assert_eq!(
            pick_affine(&views, &[], None, &[(2, 9), (1, 5)], 4),
            Some((1, By::Prefix))
        );
        assert_eq!(
            pick_affine(&views, &[], None, &[(2, 9)], 4),
            Some((0, By::Load))
        );
        // the session's replica comes first
        assert_eq!(
            pick_affine(&views, &[], Some(2), &[(1, 5)], 8),
            Some((2, By::Session))
        );
        // an unhealthy or tried holder is passed over
        assert_eq!(
            pick_affine(&views, &[1], Some(3), &[(1, 5)], 8),
            Some((0, By::Load))
        );
        // nothing known: load
        assert_eq!(pick_affine(&views, &[], None, &[], 4), Some((0, By::Load)));
        assert_eq!(pick_affine(&views, &[0, 1, 2, 3], None, &[], 4), None);
    }

    #[test]
    fn the_masters_word_holds_a_replica_out_whatever_its_health() {
        let t = Instant::now();
        let mut h = Health::new(3);
        // starting: held until the master says it generates, even with /health 200
        assert_eq!(h.on_state(Some("starting".into()), t), None);
        assert_eq!(h.on_poll(Ok(()), t), None);
        assert!(!h.healthy());
        assert_eq!(h.on_state(None, t), Some(Change::Up));
        // a stall its rank saw: out at once, though /health still answers
        assert_eq!(
            h.on_state(Some("stalled".into()), t),
            Some(Change::Down("stalled".into()))
        );
        assert_eq!(h.on_poll(Ok(()), t), None);
        assert!(!h.healthy());
        assert_eq!(h.on_state(None, t), Some(Change::Up));
        // ready by the master but refusing: out
        assert!(h.on_refused("refused".into(), t).is_some());
        assert_eq!(h.on_state(None, t), None);
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
