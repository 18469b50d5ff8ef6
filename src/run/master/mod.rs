//! The master: rendezvous, ordered start, replicas, liveness, and the stop broadcast.
//!
//! [`Coord`] is a pure state machine: messages and clock ticks in, [`Action`]s out. Its
//! concerns live in child modules, each an `impl Coord` block: [`rendezvous`] (hellos, the port
//! block, the plan, the attach gate), [`startup`] (ordered start, phases, readiness),
//! [`replicas`] (a replica's failure, restart and the per-model policy), [`liveness`]
//! (deadlines, silence, lost nodes). The async shell is [`serve`] (the loop and the action
//! interpreter), [`gate`] (accept caps and the handshake) and [`outputs`] (event log, endpoint
//! file, key file, requeue); it runs inside the master's launcher next to its own rank (which
//! connects to it over loopback like any other).
//!
//! What starts when follows each command's [`Lifecycle`](crate::plan::lifecycle::Lifecycle)
//! in the plan: `start_after` says on which event the master sends `Start`, `ready` which
//! report counts as up (an HTTP-ready command makes its replica ready), `deadline` which
//! timeout covers it. With Ray, per replica: head → (head up) → workers → (all joined) →
//! engine on the leader → (`/health` 200) → replica ready; without Ray every engine starts at
//! once. When every replica is ready the endpoint file says `ready`, and the client starts.

mod gate;
mod liveness;
mod outputs;
mod rendezvous;
mod replicas;
mod serve;
mod service;
mod startup;
#[cfg(test)]
mod tests;

pub use gate::{bind, HELLO_WITHIN, MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS};
pub use outputs::api_key_file;
pub use serve::serve;

use crate::endpoint::{ReplicaStatus, Status};
use crate::exit;
use crate::input::settings::Settings;
use crate::input::slurm::Step;
use crate::plan::lifecycle::{self, Deadline, Ending, Kind};
use crate::plan::{self, NodeInfo, Plan};
use crate::run::channel::{Busy, ToMaster, ToRank};
use crate::run::events::Event;
use crate::run::signals;
use replicas::Rep;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(usize, ToRank),
    /// A line of the event log: what happened, and on which node.
    Event(Event, Option<String>),
    Endpoint {
        status: Status,
        reason: Option<String>,
        code: Option<i32>,
    },
    Info(String),
    Warn(String),
    /// Close the connection to this rank (given up on as silent while the job goes on: if
    /// it wakes, it finds the master gone and tears itself down).
    Drop(usize),
    /// Every replica's state changed (and the models dropped so far): the endpoint file
    /// shows it.
    Replicas(Vec<ReplicaStatus>, Vec<String>),
    /// Check that every attached endpoint answers, then say [`Coord::on_attach_checked`].
    CheckAttach(Vec<crate::route::attach::AttachSpec>),
    /// Read the batch input through (every line valid, every model served), then say
    /// [`Coord::on_batch_checked`].
    CheckBatch,
    /// Every rank has finished its teardown (or is gone).
    AllStopped,
    /// Put the job back in Slurm's queue once the teardown is over (`on_node_failure:
    /// requeue` and a node failed, or `batch.requeue` and a batch stopped with work left):
    /// `(SETTING): why`.
    Requeue(String),
    /// A service job was asked (SIGUSR1) to hand over to its successor now.
    HandoverNow,
}

/// The job's course, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rendezvous,
    Starting,
    Ready,
    Stopping,
}

/// One rank, as the master sees it.
#[derive(Debug, Clone)]
struct Peer {
    /// What it said of its node in its hello (none yet: it has not said hello).
    hello: Option<NodeInfo>,
    /// Candidate port blocks it found taken on its node.
    busy: Vec<Busy>,
    connected: bool,
    /// It reported its teardown complete.
    stopped: bool,
    last_seen: Instant,
    /// Given up on: connected but silent past the heartbeat timeout. Its node's processes
    /// can only be ended through Slurm.
    silent: bool,
    /// What is up on it: (kind, slot of the node's replica).
    up: BTreeSet<(Kind, usize)>,
}

/// One command of the plan on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Cmd {
    rank: usize,
    kind: Kind,
    slot: usize,
}

/// A command started and not up yet, with the deadline that covers it.
#[derive(Debug, Clone)]
struct Starting {
    cmd: Cmd,
    /// When it was started (the cap on extending its deadline counts from here).
    since: Instant,
    due: Instant,
    deadline: Deadline,
    /// The phase its log says it is in, and since when.
    phase: Option<(String, Instant)>,
}

pub struct Coord {
    settings: Settings,
    step: Step,
    version: String,
    peers: Vec<Peer>,
    /// The step's candidate port blocks, in order of preference.
    candidates: Vec<u16>,
    /// The port the master listens on.
    channel_port: u16,
    own_stall: crate::run::stall::OwnStall,
    /// Commands started and not up yet.
    starting: Vec<Starting>,
    /// Replicas whose Ray nodes have all joined (their `replica-joined` commands started).
    joined: Vec<bool>,
    reps: Vec<Rep>,
    /// The router listens (or the job has none).
    router_up: bool,
    /// A replica's failure restarts it (`replicas.on_failure`) instead of ending the job.
    restarts: bool,
    /// Models with `required: false` dropped because all their replicas are down.
    dropped: Vec<String>,
    /// The attached endpoints are being checked: nothing has started yet.
    attaching: bool,
    /// A batch job whose input is not checked yet: nothing starts before it is.
    batch_unchecked: bool,
    plan: Option<Plan>,
    phase: Phase,
    rendezvous_deadline: Instant,
    next_progress: Instant,
    master_digests: BTreeMap<String, String>,
    all_stopped_sent: bool,
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Keys whose digests differ between two digest maps (for mismatch messages).
pub fn diff_keys(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

impl Coord {
    /// `channel_port`: where the master listens (one of the candidate blocks' first ports).
    pub fn new(settings: Settings, step: Step, channel_port: u16, now: Instant) -> Coord {
        let n = step.nodes.len();
        let rendezvous = settings.timeouts.rendezvous;
        let master_digests = settings.agreed_digests();
        let candidates = plan::step_blocks(&step, settings.port_range);
        let heartbeat_interval = settings.health.heartbeat_interval;
        let peer = Peer {
            hello: None,
            busy: Vec::new(),
            connected: false,
            stopped: false,
            last_seen: now,
            silent: false,
            up: BTreeSet::new(),
        };
        Coord {
            settings,
            step,
            version: env!("CARGO_PKG_VERSION").to_string(),
            peers: vec![peer; n],
            candidates,
            channel_port,
            own_stall: crate::run::stall::OwnStall::new(heartbeat_interval),
            starting: Vec::new(),
            joined: Vec::new(),
            reps: Vec::new(),
            router_up: false,
            restarts: false,
            dropped: Vec::new(),
            attaching: false,
            batch_unchecked: false,
            plan: None,
            phase: Phase::Rendezvous,
            rendezvous_deadline: now + rendezvous,
            next_progress: now + Duration::from_secs(5),
            master_digests,
            all_stopped_sent: false,
        }
    }

    /// How many ranks the step has.
    fn n(&self) -> usize {
        self.peers.len()
    }

    /// The name of the node of `rank`.
    pub fn node(&self, rank: usize) -> String {
        self.step
            .nodes
            .get(rank)
            .cloned()
            .unwrap_or_else(|| format!("rank {rank}"))
    }

    fn event(&self, event: Event, node: Option<usize>) -> Action {
        Action::Event(event, node.map(|r| self.node(r)))
    }

    pub fn stopping(&self) -> bool {
        self.phase == Phase::Stopping
    }

    /// Whether ranks may still join (the listener stays open only this long).
    pub fn in_rendezvous(&self) -> bool {
        self.phase == Phase::Rendezvous
    }

    /// Start the stop: broadcast, record, and mark the endpoint. Only the first cause counts.
    pub fn stop(&mut self, code: i32, reason: String, node: Option<usize>) -> Vec<Action> {
        if self.phase == Phase::Stopping {
            return Vec::new();
        }
        self.phase = Phase::Stopping;
        let mut acts = Vec::new();
        let node_name = node.map(|r| self.node(r));
        let ev = if exit::is_failure(code) {
            Event::Failure {
                code,
                reason: reason.clone(),
            }
        } else {
            Event::StopRequested {
                code,
                reason: reason.clone(),
            }
        };
        acts.push(self.event(ev, node));
        for (r, p) in self.peers.iter().enumerate() {
            if p.connected {
                acts.push(Action::Send(
                    r,
                    ToRank::Stop {
                        code,
                        reason: reason.clone(),
                        node: node_name.clone(),
                    },
                ));
            }
        }
        if let Some(setting) = self.requeue_for(code) {
            acts.push(self.event(
                Event::Requeue {
                    job_id: self.step.job_id.clone(),
                    reason: reason.clone(),
                },
                node,
            ));
            acts.push(Action::Requeue(format!("({setting}): {reason}")));
        }
        acts.push(Action::Endpoint {
            status: if exit::is_failure(code) {
                Status::Failed
            } else {
                Status::Stopped
            },
            reason: Some(reason),
            code: Some(code),
        });
        acts.extend(self.check_all_stopped());
        acts
    }

    /// Whether a stop with `code` puts the job back in Slurm's queue: the setting that says
    /// so. A node that failed under the job is the cluster's fault, not the user's
    /// (`on_node_failure: requeue`, exit 4 only: config, engine and startup errors would fail
    /// again); a batch stopped with work left resumes from its files (`batch.requeue`, exit 9).
    fn requeue_for(&self, code: i32) -> Option<&'static str> {
        if code == exit::PEER_FAILURE && self.settings.policy.requeue_on_node_failure {
            return Some("on_node_failure: requeue");
        }
        let batch_requeue = self.settings.batch.as_ref().is_some_and(|b| b.requeue);
        (code == exit::BATCH_INCOMPLETE && batch_requeue).then_some("batch.requeue: true")
    }

    fn check_all_stopped(&mut self) -> Vec<Action> {
        if self.phase != Phase::Stopping || self.all_stopped_sent {
            return Vec::new();
        }
        if self.peers.iter().all(|p| p.stopped || !p.connected) {
            self.all_stopped_sent = true;
            return vec![self.event(Event::AllStopped, None), Action::AllStopped];
        }
        Vec::new()
    }

    /// A message from an authenticated rank.
    pub fn on_message(&mut self, rank: usize, msg: ToMaster, now: Instant) -> Vec<Action> {
        if self.peers[rank].silent {
            // given up on: what it says now changes nothing
            return Vec::new();
        }
        self.peers[rank].last_seen = now;
        let node = self.node(rank);
        match msg {
            ToMaster::Hello(_) => {
                vec![Action::Warn(format!("{node} said hello twice; ignored"))]
            }
            ToMaster::Heartbeat => Vec::new(),
            ToMaster::Up { name, slot } => self.on_up(rank, name, slot, now),
            ToMaster::Exited {
                name,
                slot,
                status,
                code,
                log,
                tail,
            } => {
                if self.phase == Phase::Stopping {
                    return Vec::new();
                }
                let was_up = self.peers[rank].up.contains(&(name, slot));
                let code = match lifecycle::ending(name, was_up, code) {
                    Ending::Done(code) => {
                        return self.stop(code, format!("the {name} exited with {status}"), None)
                    }
                    Ending::Failed(code) => code,
                };
                let mut reason = format!("{name} on {node} ended unexpectedly ({status})");
                if let Some(l) = log {
                    reason.push_str(&format!("; log: {l}"));
                }
                if let Some(last) = tail.last() {
                    reason.push_str(&format!("; last line: {last}"));
                }
                if name.of_replica() {
                    return self.replica_failed(rank, slot, code, reason, false, now);
                }
                self.stop(code, reason, Some(rank))
            }
            ToMaster::Failed {
                code,
                reason,
                kind,
                slot,
            } => {
                let reason = format!("{node}: {reason}");
                if kind.is_some_and(Kind::of_replica) && self.phase != Phase::Stopping {
                    return self.replica_failed(rank, slot, code, reason, false, now);
                }
                self.stop(code, reason, Some(rank))
            }
            ToMaster::ResetDone { slot } => self.on_reset_done(rank, slot, now),
            ToMaster::Phase { name, slot, phase } => self.on_phase(rank, name, slot, phase, now),
            ToMaster::Stopping { signal } => {
                let code = signals::exit_code_for_job(signal, self.settings.batch.is_some());
                let what = if signal == signals::libc_sig::USR1 {
                    "drain requested (SIGUSR1)".to_string()
                } else {
                    format!("received {}", signals::name(signal))
                };
                self.stop(code, format!("{node} {what}"), Some(rank))
            }
            // every rank gets Slurm's signal: the service task takes the first, the rest are
            // the same request
            ToMaster::HandoverNow => vec![Action::HandoverNow],
            ToMaster::Stopped => {
                self.peers[rank].stopped = true;
                let mut acts = vec![self.event(Event::NodeStopped, Some(rank))];
                acts.extend(self.check_all_stopped());
                acts
            }
        }
    }

    /// The ranks given up on as silent: their launcher is alive (its connection is open) but
    /// frozen or cut off, so whatever it started there is still running.
    pub fn abandoned_ranks(&self) -> Vec<usize> {
        (0..self.n()).filter(|r| self.peers[*r].silent).collect()
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
}
