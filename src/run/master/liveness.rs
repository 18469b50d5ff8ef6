//! Liveness: the rendezvous deadline, each started command's deadline, silent and lost nodes,
//! and the master's own stalls (which are not its peers' fault).

use super::{dur, Action, Coord, Phase};
use crate::exit;
use std::time::{Duration, Instant};

impl Coord {
    /// A rank's connection closed.
    pub fn on_closed(&mut self, rank: usize, now: Instant) -> Vec<Action> {
        let was = self.peers[rank].connected;
        self.peers[rank].connected = false;
        if self.phase == Phase::Stopping {
            return self.check_all_stopped();
        }
        if !was {
            return Vec::new();
        }
        let node = self.node(rank);
        let reason =
            format!("lost the connection to {node}'s launcher (killed, or the node failed)");
        if rank != 0 && self.phase != Phase::Rendezvous {
            return self.node_lost(rank, reason, now);
        }
        self.stop(exit::PEER_FAILURE, reason, Some(rank))
    }

    /// Every replica on a lost node stays down (or the job stops, without restarts).
    fn node_lost(&mut self, rank: usize, reason: String, now: Instant) -> Vec<Action> {
        let slots = self.plan.as_ref().map_or(1, |p| p.slots_on(rank));
        let mut acts = Vec::new();
        for slot in 0..slots {
            acts.extend(self.replica_failed(
                rank,
                slot,
                exit::PEER_FAILURE,
                reason.clone(),
                true,
                now,
            ));
            if self.phase == Phase::Stopping {
                break;
            }
        }
        acts
    }

    /// The clock moved on.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        self.forgive_own_stall(now);
        match self.phase {
            Phase::Rendezvous => self.tick_rendezvous(now),
            Phase::Starting | Phase::Ready => {
                let mut acts = self.deadlines_passed(now);
                if self.phase == Phase::Stopping {
                    return acts;
                }
                acts.extend(self.silences(now));
                if self.phase == Phase::Stopping {
                    return acts;
                }
                acts.extend(self.restart_due(now));
                acts
            }
            Phase::Stopping => {
                let mut acts = Vec::new();
                // a node that freezes during the teardown is not waited for either
                while let Some(r) = self.newly_silent(now) {
                    acts.push(Action::Warn(format!(
                        "{} went silent while stopping: not waiting for it",
                        self.node(r)
                    )));
                }
                acts.extend(self.check_all_stopped());
                acts
            }
        }
    }

    /// The nodes that have not said hello yet.
    fn missing(&self) -> Vec<String> {
        (0..self.n())
            .filter(|r| self.peers[*r].hello.is_none())
            .map(|r| self.node(r))
            .collect()
    }

    /// The rendezvous times out, or says every 5 s whom it waits for.
    fn tick_rendezvous(&mut self, now: Instant) -> Vec<Action> {
        let missing = self.missing();
        if now >= self.rendezvous_deadline {
            let d = self.settings.timeouts.rendezvous;
            return self.stop(
                exit::STARTUP_TIMEOUT,
                format!(
                    "{} did not connect within {} (timeouts.rendezvous)",
                    missing.join(", "),
                    dur(d)
                ),
                None,
            );
        }
        if now < self.next_progress {
            return Vec::new();
        }
        self.next_progress = now + Duration::from_secs(5);
        let shown: Vec<String> = missing.iter().take(10).cloned().collect();
        let more = if missing.len() > 10 {
            format!(" and {} more", missing.len() - 10)
        } else {
            String::new()
        };
        vec![Action::Info(format!(
            "rendezvous: {}/{} node(s) connected; waiting for {}{more}",
            self.n() - missing.len(),
            self.n(),
            shown.join(", ")
        ))]
    }

    /// Commands whose deadline passed: a replica's fails alone, anything else stops the job.
    fn deadlines_passed(&mut self, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        while let Some(late) = self.starting.iter().find(|s| now >= s.due).cloned() {
            let (r, kind, slot) = (late.cmd.rank, late.cmd.kind, late.cmd.slot);
            let t = &self.settings.timeouts;
            let mut reason = format!(
                "{kind} on {} did not come up within {} ({})",
                self.node(r),
                dur(late.deadline.duration(t)),
                late.deadline.key()
            );
            if let Some((phase, since)) = &late.phase {
                reason.push_str(&format!(
                    "; stuck in `{phase}` for {} (each new phase gives it that long again, up to timeouts.engine_ready_max {})",
                    dur(Duration::from_secs(now.duration_since(*since).as_secs())),
                    dur(t.engine_ready_max)
                ));
            }
            if !kind.of_replica() {
                return self.stop(exit::STARTUP_TIMEOUT, reason, Some(r));
            }
            self.starting.retain(|s| s.cmd != late.cmd);
            acts.extend(self.replica_failed(r, slot, exit::STARTUP_TIMEOUT, reason, false, now));
            if self.phase == Phase::Stopping {
                return acts;
            }
        }
        acts
    }

    /// Nodes silent past the heartbeat timeout: the master's own silence stops the job, a
    /// peer's is a lost node.
    fn silences(&mut self, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        while let Some(r) = self.newly_silent(now) {
            let node = self.node(r);
            let reason = format!(
                "{node} went silent: no heartbeat for {} (health.heartbeat_timeout)",
                dur(self.settings.health.heartbeat_timeout)
            );
            if r == 0 {
                acts.extend(self.stop(exit::PEER_FAILURE, reason, Some(r)));
            } else {
                if self.restarts {
                    acts.push(Action::Drop(r));
                }
                acts.extend(self.node_lost(r, reason, now));
            }
            if self.phase == Phase::Stopping {
                return acts;
            }
        }
        acts
    }

    /// Time a peer's silence only while this process was running: when the clock jumped past
    /// a heartbeat interval since the last tick (this launcher was stopped, or starved of CPU),
    /// the gap is not the peers' fault, and what they sent meanwhile may still be unread.
    fn forgive_own_stall(&mut self, now: Instant) {
        let stall = self.own_stall.on_tick(now);
        for p in &mut self.peers {
            p.last_seen = crate::run::stall::forgive(p.last_seen, stall, now);
        }
    }

    /// The first connected, unstopped rank silent past the heartbeat timeout, now given up
    /// on: it gets no more messages and the stop does not wait for it.
    fn newly_silent(&mut self, now: Instant) -> Option<usize> {
        let limit = self.settings.health.heartbeat_timeout;
        let r = self
            .peers
            .iter()
            .position(|p| p.connected && !p.stopped && now.duration_since(p.last_seen) > limit)?;
        self.peers[r].connected = false;
        self.peers[r].silent = true;
        Some(r)
    }
}
