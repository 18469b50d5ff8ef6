//! Replicas that fail alone: a failed replica is torn down on its nodes and started again
//! after a back-off while its restart budget lasts, else it stays down; the per-model policy
//! (`min_healthy`, `required: false` → dropped) decides whether the job goes on.

use super::{dur, Action, Cmd, Coord, Phase};
use crate::endpoint::{ReplicaState, ReplicaStatus};
use crate::exit;
use crate::input::settings::Policy;
use crate::plan::lifecycle::{Kind, StartAfter};
use crate::run::channel::ToRank;
use crate::run::events::Event;
use crate::run::restarts::Budget;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Where a replica is in its life; each state carries what only it needs.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RepState {
    /// Started (or started again), not serving yet.
    Starting,
    Ready,
    /// Failed: being torn down on its nodes; starts again `backoff` after the last of them
    /// is done (`at`, once known).
    Restarting {
        backoff: Duration,
        at: Option<Instant>,
    },
    /// Failed past its restarts, or its node was lost.
    Down,
}

impl RepState {
    /// The state the endpoint file shows.
    pub(super) fn public(&self) -> ReplicaState {
        match self {
            RepState::Starting => ReplicaState::Starting,
            RepState::Ready => ReplicaState::Ready,
            RepState::Restarting { .. } => ReplicaState::Restarting,
            RepState::Down => ReplicaState::Down,
        }
    }
}

/// One replica, as the master tracks it.
#[derive(Debug, Clone)]
pub(super) struct Rep {
    pub(super) state: RepState,
    budget: Budget,
    pub(super) restarts: u32,
    reason: Option<String>,
    /// Ranks still tearing down its processes (a `Reset` sent, no `ResetDone` yet).
    resetting: BTreeSet<usize>,
}

impl Rep {
    pub(super) fn new(policy: &Policy) -> Rep {
        Rep {
            state: RepState::Starting,
            budget: Budget::new(policy.max_restarts, policy.restart_window),
            restarts: 0,
            reason: None,
            resetting: BTreeSet::new(),
        }
    }
}

impl Coord {
    /// How many replicas serve now.
    pub(super) fn serving(&self) -> usize {
        self.reps
            .iter()
            .filter(|r| r.state == RepState::Ready)
            .count()
    }

    /// Every replica's state, for the endpoint file.
    pub(super) fn replicas_action(&self) -> Action {
        let Some(plan) = &self.plan else {
            return Action::Replicas(Vec::new(), Vec::new());
        };
        let phase = |i: usize| {
            let leader = Cmd {
                rank: plan.replica_ranks(i).start,
                kind: Kind::Engine,
                slot: plan.slot_of(i),
            };
            self.starting
                .iter()
                .find(|s| s.cmd == leader)
                .and_then(|s| s.phase.as_ref())
                .map(|(p, _)| p.clone())
        };
        Action::Replicas(
            self.reps
                .iter()
                .enumerate()
                .map(|(i, r)| ReplicaStatus {
                    replica: i,
                    model: plan.endpoints[i].model.clone(),
                    node: plan.endpoints[i].node.clone(),
                    url: plan.endpoints[i].url.clone(),
                    state: r.state.public(),
                    restarts: r.restarts,
                    reason: r.reason.clone(),
                    phase: (r.state == RepState::Starting).then(|| phase(i)).flatten(),
                })
                .collect(),
            self.dropped.clone(),
        )
    }

    /// A process of `rank`'s replica failed (or, `lost`, its node is gone). Without restarts
    /// the job stops. Else the replica leaves the job: its processes on all its nodes are torn
    /// down and it starts again after a back-off while its budget lasts; a lost node, or a
    /// spent budget, keeps it down. The job ends when too few replicas are left.
    pub(super) fn replica_failed(
        &mut self,
        rank: usize,
        slot: usize,
        code: i32,
        reason: String,
        lost: bool,
        now: Instant,
    ) -> Vec<Action> {
        if !self.restarts || self.phase == Phase::Stopping {
            return self.stop(code, reason, Some(rank));
        }
        let Some(plan) = &self.plan else {
            return self.stop(code, reason, Some(rank));
        };
        let rep = plan.replica_of(rank, slot);
        let ranks = plan.replica_ranks(rep);
        if !matches!(self.reps[rep].state, RepState::Starting | RepState::Ready) {
            // the same failure seen by another process of it, or a node lost while it restarts
            if lost && self.reps[rep].state != RepState::Down {
                self.reps[rep].state = RepState::Down;
                self.reps[rep].resetting.remove(&rank);
                let mut acts = vec![
                    Action::Warn(format!("replica {rep}: {reason}; it stays down")),
                    self.replicas_action(),
                ];
                acts.extend(self.check_serving(rep, code, &reason, now));
                return acts;
            }
            return Vec::new();
        }
        self.joined[rep] = false;
        for r in ranks.clone() {
            self.peers[r]
                .up
                .retain(|(k, s)| !(k.of_replica() && *s == slot));
        }
        self.starting.retain(|s| {
            !(ranks.contains(&s.cmd.rank) && s.cmd.kind.of_replica() && s.cmd.slot == slot)
        });
        let mut acts = self.take_down(rep, rank, code, &reason, lost, now);
        for r in ranks {
            if r == rank && lost {
                continue;
            }
            if self.peers[r].connected {
                self.reps[rep].resetting.insert(r);
                acts.push(Action::Send(
                    r,
                    ToRank::Reset {
                        reason: format!("replica {rep} failed: {reason}"),
                        slot,
                    },
                ));
            }
        }
        let r = &mut self.reps[rep];
        if let RepState::Restarting { backoff, at } = &mut r.state {
            if r.resetting.is_empty() {
                *at = Some(now + *backoff);
            }
        }
        acts.push(self.replicas_action());
        acts.extend(self.check_serving(rep, code, &reason, now));
        acts
    }

    /// The failed replica `rep` restarts after a back-off while its budget lasts, else stays
    /// down: its new state, said in the log and the event log.
    fn take_down(
        &mut self,
        rep: usize,
        rank: usize,
        code: i32,
        reason: &str,
        lost: bool,
        now: Instant,
    ) -> Vec<Action> {
        let leader = self
            .plan
            .as_ref()
            .map_or_else(String::new, |p| p.endpoints[rep].node.clone());
        let max = self.settings.policy.max_restarts;
        let window = self.settings.policy.restart_window;
        let r = &mut self.reps[rep];
        let next = if lost { None } else { r.budget.restart(now) };
        r.reason = Some(reason.to_string());
        let (warn, down) = match next {
            Some(backoff) => {
                r.state = RepState::Restarting { backoff, at: None };
                r.restarts += 1;
                (
                    format!(
                        "replica {rep} (leader {leader}) failed: {reason}; restarting it in {} (restart {} of at most {max} within {})",
                        dur(backoff),
                        r.restarts,
                        dur(window)
                    ),
                    None,
                )
            }
            None => {
                r.state = RepState::Down;
                let why = if lost {
                    "its node is lost".to_string()
                } else {
                    format!(
                        "it failed after {} restart(s) within {} (replicas.max_restarts {max})",
                        r.budget.used(),
                        dur(window)
                    )
                };
                (
                    format!(
                        "replica {rep} (leader {leader}) failed: {reason}; it stays down: {why}"
                    ),
                    Some(why),
                )
            }
        };
        let failed = Event::ReplicaFailed {
            replica: rep,
            reason: reason.to_string(),
            code,
            restart: down.is_none(),
            restarts: r.restarts,
            down,
        };
        vec![self.event(failed, Some(rank)), Action::Warn(warn)]
    }

    /// After replica `rep` left: end the job when too few replicas of its model serve (or
    /// can still come up), or drop the model when it is not required and none of it is left;
    /// else see whether the job is ready now (a replica down for good no longer holds it up).
    pub(super) fn check_serving(
        &mut self,
        rep: usize,
        code: i32,
        reason: &str,
        now: Instant,
    ) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let m = plan.model_of_replica(rep).clone();
        let named = plan.models.len() > 1 || !plan.attached.is_empty();
        let own = &self.reps[m.first_replica..m.first_replica + m.replicas];
        let serving = own.iter().filter(|r| r.state == RepState::Ready).count();
        let alive = own.iter().filter(|r| r.state != RepState::Down).count();
        let code = if exit::is_failure(code) {
            exit::REPLICAS_DOWN
        } else {
            code
        };
        if !m.required {
            let mut acts = Vec::new();
            if alive == 0 && !self.dropped.contains(&m.name) {
                self.dropped.push(m.name.clone());
                acts.push(self.event(
                    Event::ModelDropped {
                        model: m.name.clone(),
                        reason: reason.to_string(),
                    },
                    None,
                ));
                acts.push(Action::Warn(format!(
                    "model `{}` is dropped: all its {} replica(s) are down (it has `required: false`, so the job goes on); last: {reason}",
                    m.name, m.replicas
                )));
                acts.push(self.replicas_action());
            }
            if self.reps.iter().all(|r| r.state == RepState::Down) {
                acts.extend(self.stop(
                    code,
                    format!("no model serves any more; last: {reason}"),
                    None,
                ));
                return acts;
            }
            acts.extend(self.maybe_ready(now));
            return acts;
        }
        let min = m.min_healthy;
        let too_few = if self.phase == Phase::Ready {
            serving < min
        } else {
            alive < min
        };
        if alive == 0 || too_few {
            let what = if named {
                format!(
                    "model `{}`: {serving} of its {} replica(s) serve, fewer than its min_healthy ({min})",
                    m.name, m.replicas
                )
            } else {
                format!(
                    "{serving} of {} replica(s) serve, fewer than replicas.min_healthy ({min})",
                    m.replicas
                )
            };
            return self.stop(code, format!("{what}; last: {reason}"), None);
        }
        self.maybe_ready(now)
    }

    /// A rank finished tearing down its replica's processes.
    pub(super) fn on_reset_done(&mut self, rank: usize, slot: usize, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let rep = plan.replica_of(rank, slot);
        let r = &mut self.reps[rep];
        if !r.resetting.remove(&rank) || !r.resetting.is_empty() {
            return Vec::new();
        }
        let RepState::Restarting { backoff, at } = &mut r.state else {
            return vec![Action::Info(format!(
                "replica {rep}: its processes are gone on all its nodes"
            ))];
        };
        *at = Some(now + *backoff);
        vec![Action::Info(format!(
            "replica {rep}: its processes are gone on all its nodes; starting it again in {}",
            dur(*backoff)
        ))]
    }

    /// Replicas whose back-off is over start again, from their first command on.
    pub(super) fn restart_due(&mut self, now: Instant) -> Vec<Action> {
        let due: Vec<usize> = (0..self.reps.len())
            .filter(|i| {
                matches!(self.reps[*i].state, RepState::Restarting { at: Some(t), .. } if now >= t)
            })
            .collect();
        let mut acts = Vec::new();
        for rep in due {
            let Some(plan) = &self.plan else {
                break;
            };
            let ranks = plan.replica_ranks(rep);
            let leader = plan.endpoints[rep].node.clone();
            let slot = plan.slot_of(rep);
            let r = &mut self.reps[rep];
            r.state = RepState::Starting;
            let n = r.restarts;
            acts.push(self.event(
                Event::ReplicaRestarting {
                    replica: rep,
                    restart: n,
                    node: leader.clone(),
                },
                None,
            ));
            acts.push(Action::Info(format!(
                "replica {rep}: starting it again on {leader} (restart {n})"
            )));
            acts.extend(self.start_after(ranks, StartAfter::Rendezvous, Some(slot), now));
            acts.push(self.replicas_action());
        }
        acts
    }
}
