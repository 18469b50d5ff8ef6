//! Ordered start: which commands start on which event, the phases a starting engine reports
//! (each one extends its deadline), Ray nodes joining, a replica's readiness and the job's.

use super::replicas::RepState;
use super::{Action, Cmd, Coord, Phase, Starting};
use crate::endpoint::{ReplicaState, Status};
use crate::plan::lifecycle::{Deadline, Kind, Ready, StartAfter};
use crate::run::channel::ToRank;
use crate::run::events::Event;
use std::time::Instant;

impl Coord {
    /// A starting command entered a new phase: say so, and give it `timeouts.engine_ready`
    /// again from now, never past `timeouts.engine_ready_max` after its start.
    pub(super) fn on_phase(
        &mut self,
        rank: usize,
        kind: Kind,
        slot: usize,
        phase: String,
        now: Instant,
    ) -> Vec<Action> {
        let cmd = Cmd { rank, kind, slot };
        let t = self.settings.timeouts;
        let stopping = self.phase == Phase::Stopping;
        let Some(s) = self.starting.iter_mut().find(|s| s.cmd == cmd) else {
            return Vec::new();
        };
        if stopping {
            return Vec::new();
        }
        // from a peer: bounded, printable
        let phase: String = phase.chars().filter(|c| !c.is_control()).take(64).collect();
        s.phase = Some((phase.clone(), now));
        if s.deadline == Deadline::EngineReady {
            let cap = s.since + t.engine_ready_max;
            s.due = s.due.max((now + t.engine_ready).min(cap));
        }
        let rep = self.plan.as_ref().map(|p| p.replica_of(rank, slot));
        vec![
            self.event(
                Event::EnginePhase {
                    replica: rep,
                    kind,
                    phase: phase.clone(),
                },
                Some(rank),
            ),
            Action::Info(format!(
                "replica {}: {kind} on {}: {phase}",
                rep.unwrap_or(0),
                self.node(rank)
            )),
            self.replicas_action(),
        ]
    }

    pub(super) fn on_up(
        &mut self,
        rank: usize,
        kind: Kind,
        slot: usize,
        now: Instant,
    ) -> Vec<Action> {
        self.peers[rank].up.insert((kind, slot));
        self.starting.retain(|s| s.cmd != Cmd { rank, kind, slot });
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        if self.phase == Phase::Stopping {
            return Vec::new();
        }
        let rep = plan.replica_of(rank, slot);
        let ranks = plan.replica_ranks(rep);
        let serves = plan.ranks[rank]
            .command_in(kind, slot)
            .is_some_and(|c| matches!(c.lifecycle.ready, Ready::Http { .. }));
        let mut acts = Vec::new();
        match kind {
            Kind::RayHead => {
                acts.push(self.event(Event::HeadUp { replica: rep }, Some(rank)));
                acts.push(Action::Info(format!(
                    "replica {rep}: Ray head up on {}",
                    self.node(rank)
                )));
                acts.extend(self.start_after(ranks.clone(), StartAfter::HeadUp, None, now));
            }
            Kind::RayWorker => {
                let (joined, waiting) = self.ray_nodes(ranks.clone());
                let total = ranks.len();
                acts.push(self.event(
                    Event::WorkerJoined {
                        replica: rep,
                        joined,
                        of: total,
                    },
                    Some(rank),
                ));
                if waiting.is_empty() {
                    acts.push(Action::Info(format!(
                        "replica {rep}: {joined}/{total} nodes joined"
                    )));
                } else {
                    acts.push(Action::Info(format!(
                        "replica {rep}: {joined}/{total} nodes joined; waiting for {}",
                        waiting.join(", ")
                    )));
                }
            }
            Kind::Router => {
                self.router_up = true;
                acts.push(self.event(Event::RouterUp, Some(rank)));
                return {
                    acts.extend(self.maybe_ready(now));
                    acts
                };
            }
            Kind::Engine | Kind::Client => {}
        }
        if kind.is_ray() && !self.joined[rep] && self.ray_nodes(ranks.clone()).1.is_empty() {
            self.joined[rep] = true;
            acts.extend(self.start_after(ranks, StartAfter::ReplicaJoined, None, now));
        }
        if serves {
            acts.extend(self.replica_ready(rep, rank, now));
        }
        acts
    }

    /// (nodes whose Ray daemons are all up, nodes still waited for) among `ranks`.
    fn ray_nodes(&self, ranks: std::ops::Range<usize>) -> (usize, Vec<String>) {
        let Some(plan) = &self.plan else {
            return (0, Vec::new());
        };
        let mut joined = 0;
        let mut waiting = Vec::new();
        for r in ranks {
            let ray: Vec<Kind> = plan.ranks[r]
                .commands
                .iter()
                .map(|c| c.kind)
                .filter(|k| k.is_ray())
                .collect();
            if ray.iter().all(|k| self.peers[r].up.contains(&(*k, 0))) {
                joined += 1;
            } else {
                waiting.push(self.node(r));
            }
        }
        (joined, waiting)
    }

    fn replica_ready(&mut self, rep: usize, rank: usize, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        if self.reps[rep].state.public() != ReplicaState::Starting {
            return Vec::new();
        }
        self.reps[rep].state = RepState::Ready;
        let url = plan.endpoints[rep].url.clone();
        let mut acts = vec![
            self.event(
                Event::ReplicaReady {
                    replica: rep,
                    url,
                    restarts: self.reps[rep].restarts,
                },
                Some(rank),
            ),
            self.replicas_action(),
        ];
        let n_ready = self.serving();
        if self.phase == Phase::Ready {
            acts.push(Action::Info(format!(
                "replica {rep} serves again after {} restart(s) ({n_ready}/{} replicas serve)",
                self.reps[rep].restarts,
                self.reps.len()
            )));
            return acts;
        }
        acts.push(Action::Info(format!(
            "replica {rep} ready ({n_ready}/{} replicas)",
            self.reps.len()
        )));
        acts.extend(self.maybe_ready(now));
        acts
    }

    /// The job is ready once the router listens and every replica serves or is down for
    /// good (and enough serve; else the job has ended already).
    pub(super) fn maybe_ready(&mut self, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        if self.phase != Phase::Starting || !self.router_up {
            return Vec::new();
        }
        let settled = self
            .reps
            .iter()
            .all(|r| matches!(r.state, RepState::Ready | RepState::Down));
        if !settled || self.serving() == 0 {
            return Vec::new();
        }
        self.phase = Phase::Ready;
        let urls: Vec<String> = plan.endpoints.iter().map(|e| e.url.clone()).collect();
        let url = plan.url().to_string();
        let mut acts = vec![self.event(
            Event::Ready {
                url: url.clone(),
                urls: urls.clone(),
            },
            None,
        )];
        acts.push(Action::Endpoint {
            status: Status::Ready,
            reason: None,
            code: None,
        });
        let shown = if plan.router.is_some() {
            format!("{url} (router over {})", urls.join(" "))
        } else {
            urls.join(" ")
        };
        acts.push(Action::Info(format!(
            "ready: {shown} (endpoint file {})",
            self.settings.endpoint_file
        )));
        acts.extend(self.start_after(0..self.n(), StartAfter::AllReady, None, now));
        acts
    }

    /// Send `Start` for every command of `ranks` whose plan says to start after `event`, and
    /// note the deadlines that now run.
    /// `restart`: only the processes of the node's replica in this slot (a restart), not the
    /// router, the client or the node's other replicas.
    pub(super) fn start_after(
        &mut self,
        ranks: std::ops::Range<usize>,
        event: StartAfter,
        restart: Option<usize>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let mut acts = Vec::new();
        let mut engines = Vec::new();
        for r in ranks {
            for c in plan.ranks[r].commands.iter() {
                let other = restart.is_some_and(|s| !c.kind.of_replica() || c.slot != s);
                if c.lifecycle.start_after != event || other {
                    continue;
                }
                acts.push(Action::Send(
                    r,
                    ToRank::Start {
                        name: c.kind,
                        slot: c.slot,
                    },
                ));
                if let Some(deadline) = c.lifecycle.deadline {
                    let cmd = Cmd {
                        rank: r,
                        kind: c.kind,
                        slot: c.slot,
                    };
                    self.starting.retain(|s| s.cmd != cmd);
                    self.starting.push(Starting {
                        cmd,
                        since: now,
                        due: now + deadline.duration(&self.settings.timeouts),
                        deadline,
                        phase: None,
                    });
                }
                if c.kind == Kind::Engine {
                    engines.push(r);
                }
            }
        }
        match (engines.as_slice(), event) {
            ([], _) => {}
            ([leader], StartAfter::ReplicaJoined) => {
                acts.push(self.event(Event::EngineStarted { ranks: None }, Some(*leader)));
            }
            (many, _) => acts.push(self.event(
                Event::EngineStarted {
                    ranks: Some(many.len()),
                },
                None,
            )),
        }
        if event == StartAfter::AllReady && acts.iter().any(|a| matches!(a, Action::Send(..))) {
            acts.push(self.event(Event::ClientStarted, Some(0)));
        }
        acts
    }
}
