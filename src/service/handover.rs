//! When a job of a service hands over to its successor, pure: the job's end time, the
//! handover time, what the service file says of the successor and of a stop, and an explicit
//! clock (seconds since the epoch: Slurm's end time is a wall-clock time) in; actions out.
//!
//! ```text
//! Waiting ──(ready, and end − handover_before reached, or SIGUSR1)──► Submitting ──► Submitted
//! Submitted ──(successor serving)──► Draining ──(settled, nothing in flight, or the grace)──► Done (exit 0)
//! Submitted ──(successor failed)──► Failed: serve to the limit, the service file says why
//! any ──(service stop)──► Draining (no successor) ──► Done
//! ```

use std::time::Duration;

/// What the job knows of its successor (the service file, and Slurm for one that never wrote
/// there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Successor {
    /// Queued, or starting and not serving yet.
    Pending,
    Serving,
    /// It ended or failed before it served: why, with its log.
    Failed(String),
}

/// One look at the world.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Now, seconds since the epoch.
    pub now: u64,
    /// When Slurm ends this job (seconds since the epoch), when it has a limit.
    pub end: Option<u64>,
    /// This job serves (every model ready).
    pub ready: bool,
    /// SIGUSR1 asked for the handover now.
    pub usr1: bool,
    /// `ray-launch service stop`: the chain ends with this job.
    pub stop: bool,
    /// The successor, once one was submitted.
    pub successor: Option<Successor>,
    /// Requests in flight through this job's router.
    pub outstanding: usize,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Submit the successor (once); answer with [`Handover::submitted`].
    Submit,
    /// Stop taking new requests: the service file marks this job draining (routers that
    /// follow it send nothing new here).
    Drain(String),
    /// The service file notes why (the successor failed, a submission failed).
    Note(String),
    /// End the job with exit 0, for this reason.
    Exit(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting,
    Submitting,
    Submitted(String),
    /// Since when, and why it ends.
    Draining {
        since: u64,
        why: String,
    },
    /// The successor (or its submission) failed: serve until the limit.
    Failed,
    Done,
}

#[derive(Debug, Clone)]
pub struct Handover {
    /// How long before the end the successor is submitted.
    pub before: Duration,
    /// How long a draining job waits for its requests in flight, at most.
    pub grace: Duration,
    pub state: State,
}

/// A draining job waits at least this long, so every router following the service file has
/// read it (they look every quarter second) before in-flight counts are trusted.
pub const SETTLE: u64 = 2;

impl Handover {
    pub fn new(before: Duration, grace: Duration) -> Handover {
        Handover {
            before,
            grace,
            state: State::Waiting,
        }
    }

    /// When the successor is due (seconds since the epoch), for the log and `status`.
    pub fn due(&self, end: Option<u64>) -> Option<u64> {
        end.map(|e| e.saturating_sub(self.before.as_secs()))
    }

    /// What the sbatch of the successor gave: its job id, or why it failed.
    pub fn submitted(&mut self, res: Result<String, String>) -> Vec<Act> {
        if self.state != State::Submitting {
            return Vec::new();
        }
        match res {
            Ok(job) => {
                self.state = State::Submitted(job);
                Vec::new()
            }
            Err(why) => {
                self.state = State::Failed;
                vec![Act::Note(format!(
                    "the successor could not be submitted: {why}; this job serves until its time limit"
                ))]
            }
        }
    }

    pub fn step(&mut self, s: &Seen) -> Vec<Act> {
        let draining = matches!(self.state, State::Draining { .. } | State::Done);
        if s.stop && !draining {
            let why = "the service was stopped (ray-launch service stop)".to_string();
            self.state = State::Draining {
                since: s.now,
                why: why.clone(),
            };
            return vec![Act::Drain(why)];
        }
        match self.state.clone() {
            State::Waiting => {
                let due = self.due(s.end).is_some_and(|d| s.now >= d);
                if s.ready && (due || s.usr1) {
                    self.state = State::Submitting;
                    return vec![Act::Submit];
                }
                Vec::new()
            }
            State::Submitting | State::Failed | State::Done => Vec::new(),
            State::Submitted(job) => match &s.successor {
                Some(Successor::Serving) => {
                    let why = format!("handed over to job {job}");
                    self.state = State::Draining {
                        since: s.now,
                        why: why.clone(),
                    };
                    vec![Act::Drain(why)]
                }
                Some(Successor::Failed(why)) => {
                    self.state = State::Failed;
                    vec![Act::Note(format!(
                        "the successor job {job} failed: {why}; this job serves until its time limit"
                    ))]
                }
                _ => Vec::new(),
            },
            State::Draining { since, why } => {
                let settled = s.now >= since + SETTLE;
                let over = s.now >= since + self.grace.as_secs().max(SETTLE);
                if settled && s.outstanding == 0 || over {
                    self.state = State::Done;
                    return vec![Act::Exit(why)];
                }
                Vec::new()
            }
        }
    }
}

/// Slurm's time left (`squeue -o %L`: `MM:SS`, `HH:MM:SS`, `D-HH:MM:SS`; `UNLIMITED`,
/// `NOT_SET`, `INVALID`: none) as a duration.
pub fn parse_time_left(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let secs = match parts[..] {
        [m, s] => m * 60 + s,
        [h, m, s] => h * 3600 + m * 60 + s,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86_400 + secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> Handover {
        Handover::new(Duration::from_secs(60), Duration::from_secs(30))
    }

    fn seen(now: u64) -> Seen {
        Seen {
            now,
            end: Some(1000),
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn the_successor_is_submitted_once_at_the_handover_time_then_takes_over() {
        let mut h = h();
        assert_eq!(h.due(Some(1000)), Some(940));
        assert!(h.step(&seen(939)).is_empty());
        // not before this job serves
        assert!(h
            .step(&Seen {
                ready: false,
                ..seen(945)
            })
            .is_empty());
        assert_eq!(h.step(&seen(945)), vec![Act::Submit]);
        // once: while sbatch runs, and after
        assert!(h.step(&seen(946)).is_empty());
        assert!(h.submitted(Ok("42".into())).is_empty());
        assert_eq!(h.state, State::Submitted("42".into()));
        let pending = Seen {
            successor: Some(Successor::Pending),
            ..seen(950)
        };
        assert!(h.step(&pending).is_empty());
        let serving = Seen {
            successor: Some(Successor::Serving),
            outstanding: 3,
            ..seen(960)
        };
        assert_eq!(
            h.step(&serving),
            vec![Act::Drain("handed over to job 42".into())]
        );
        // requests in flight finish; the routers are given SETTLE seconds to read the file
        assert!(h
            .step(&Seen {
                outstanding: 3,
                ..serving.clone()
            })
            .is_empty());
        assert!(h
            .step(&Seen {
                outstanding: 0,
                ..seen(961)
            })
            .is_empty());
        assert_eq!(
            h.step(&Seen {
                outstanding: 0,
                ..seen(962)
            }),
            vec![Act::Exit("handed over to job 42".into())]
        );
        assert!(h.step(&seen(963)).is_empty());
    }

    #[test]
    fn requests_in_flight_get_the_grace_and_no_more() {
        let mut h = h();
        h.state = State::Draining {
            since: 100,
            why: "x".into(),
        };
        let busy = |now| Seen {
            outstanding: 1,
            ..seen(now)
        };
        assert!(h.step(&busy(129)).is_empty());
        assert_eq!(h.step(&busy(130)), vec![Act::Exit("x".into())]);
    }

    #[test]
    fn sigusr1_hands_over_early_and_no_limit_means_no_handover() {
        let mut h = h();
        let unlimited = Seen {
            end: None,
            ..seen(10)
        };
        assert!(h.step(&unlimited).is_empty());
        assert_eq!(
            h.step(&Seen {
                usr1: true,
                ..unlimited
            }),
            vec![Act::Submit]
        );
    }

    #[test]
    fn a_failed_successor_leaves_this_job_serving_and_says_why() {
        let mut h = h();
        h.step(&seen(950));
        h.submitted(Ok("43".into()));
        let failed = Seen {
            successor: Some(Successor::Failed("exit 2; log: /x/slurm-43.out".into())),
            ..seen(955)
        };
        let acts = h.step(&failed);
        assert_eq!(acts.len(), 1);
        assert!(
            matches!(&acts[0], Act::Note(n) if n.contains("job 43 failed: exit 2; log: /x/slurm-43.out")),
            "{acts:?}"
        );
        assert_eq!(h.state, State::Failed);
        assert!(h.step(&seen(999)).is_empty(), "it serves until the limit");
        // a submission that failed: the same
        let mut h2 = self::h();
        h2.step(&seen(950));
        let acts = h2.submitted(Err("sbatch: error: invalid partition".into()));
        assert!(matches!(&acts[0], Act::Note(n) if n.contains("invalid partition")));
        assert_eq!(h2.state, State::Failed);
    }

    #[test]
    fn a_stop_drains_without_a_successor_whatever_the_state() {
        for state in [State::Waiting, State::Submitted("9".into()), State::Failed] {
            let mut h = h();
            h.state = state;
            let acts = h.step(&Seen {
                stop: true,
                ..seen(500)
            });
            assert_eq!(
                acts,
                vec![Act::Drain(
                    "the service was stopped (ray-launch service stop)".into()
                )]
            );
            assert!(h
                .step(&Seen {
                    stop: true,
                    ..seen(501)
                })
                .is_empty());
            assert_eq!(
                h.step(&Seen {
                    stop: true,
                    ..seen(502)
                })
                .len(),
                1
            );
            assert_eq!(h.state, State::Done);
        }
    }

    #[test]
    fn slurm_time_left_parses() {
        assert_eq!(parse_time_left("1:59"), Some(Duration::from_secs(119)));
        assert_eq!(parse_time_left("2:00:05"), Some(Duration::from_secs(7205)));
        assert_eq!(
            parse_time_left("1-00:00:01"),
            Some(Duration::from_secs(86_401))
        );
        for none in ["UNLIMITED", "NOT_SET", "INVALID", "", "1:2:3:4"] {
            assert_eq!(parse_time_left(none), None, "{none}");
        }
    }
}
