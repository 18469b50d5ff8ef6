//! The master's coordinator: rendezvous, ordered start, liveness, and the stop broadcast.
//!
//! [`Coord`] is a pure state machine: messages and clock ticks in, [`Action`]s out. The async
//! shell ([`serve`]) owns the sockets, the event log and the endpoint file, and runs inside the
//! master's launcher next to its own rank (which connects to it over loopback like any other).
//!
//! What starts when follows each command's [`Lifecycle`](crate::plan::lifecycle::Lifecycle)
//! in the plan: `start_after` says on which event the master sends `Start`, `ready` which
//! report counts as up (an HTTP-ready command makes its replica ready), `deadline` which
//! timeout covers it. With Ray, per replica: head → (head up) → workers → (all joined) →
//! engine on the leader → (`/health` 200) → replica ready; without Ray every engine starts at
//! once. When every replica is ready the endpoint file says `ready`, and the client starts.

use crate::auth::{self, Auth};
use crate::endpoint::{EndpointFile, ReplicaState, ReplicaStatus, Status};
use crate::exit;
use crate::input::settings::Settings;
use crate::input::slurm::Step;
use crate::plan::lifecycle::{self, Deadline, Ending, Kind, Ready, StartAfter};
use crate::plan::{self, NodeInfo, Plan};
use crate::run::channel::{self, Busy, Connection, Hello, Line, ToMaster, ToRank};
use crate::run::signals;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(usize, ToRank),
    Event {
        event: &'static str,
        node: Option<String>,
        detail: serde_json::Value,
    },
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
    CheckAttach(Vec<plan::AttachPlan>),
    /// Every rank has finished its teardown (or is gone).
    AllStopped,
    /// Put the job back in Slurm's queue once the teardown is over (`on_node_failure:
    /// requeue`, a node failed): why.
    Requeue(String),
}

/// One replica, as the master tracks it.
#[derive(Debug, Clone)]
struct Rep {
    state: ReplicaState,
    budget: crate::run::restarts::Budget,
    restarts: u32,
    reason: Option<String>,
    /// Ranks still tearing down its processes (a `Reset` sent, no `ResetDone` yet).
    resetting: BTreeSet<usize>,
    backoff: Duration,
    restart_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rendezvous,
    Starting,
    Ready,
    Stopping,
}

pub struct Coord {
    settings: Settings,
    step: Step,
    n: usize,
    version: String,
    hello: Vec<Option<NodeInfo>>,
    /// Candidate port blocks each rank found taken on its node.
    busy: Vec<Vec<Busy>>,
    /// The step's candidate port blocks, in order of preference.
    candidates: Vec<u16>,
    /// The port the master listens on.
    channel_port: u16,
    connected: Vec<bool>,
    stopped: Vec<bool>,
    last_seen: Vec<Instant>,
    /// Ranks given up on: connected but silent past the heartbeat timeout. Their node's
    /// processes can only be ended through Slurm (`Coord::abandoned`).
    silent: Vec<usize>,
    own_stall: crate::run::stall::OwnStall,
    /// What is up on each rank: (kind, slot of the node's replica).
    up: Vec<BTreeSet<(Kind, usize)>>,
    /// Started, not yet up: (rank, kind, slot, deadline, which deadline).
    pending: Vec<(usize, Kind, usize, Instant, Deadline)>,
    /// Each starting command's phase from its log, and since when: (rank, kind, slot).
    phases: BTreeMap<(usize, Kind, usize), (String, Instant)>,
    /// When each command with a deadline was started (the cap on extending it counts from here).
    started_at: BTreeMap<(usize, Kind, usize), Instant>,
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
        Coord {
            settings,
            step,
            n,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hello: vec![None; n],
            busy: vec![Vec::new(); n],
            candidates,
            channel_port,
            connected: vec![false; n],
            stopped: vec![false; n],
            last_seen: vec![now; n],
            silent: Vec::new(),
            own_stall: crate::run::stall::OwnStall::new(heartbeat_interval),
            up: vec![BTreeSet::new(); n],
            pending: Vec::new(),
            phases: BTreeMap::new(),
            started_at: BTreeMap::new(),
            joined: Vec::new(),
            reps: Vec::new(),
            router_up: false,
            restarts: false,
            dropped: Vec::new(),
            attaching: false,
            plan: None,
            phase: Phase::Rendezvous,
            rendezvous_deadline: now + rendezvous,
            next_progress: now + Duration::from_secs(5),
            master_digests,
            all_stopped_sent: false,
        }
    }

    /// The name of the node of `rank`.
    pub fn node(&self, rank: usize) -> String {
        self.step
            .nodes
            .get(rank)
            .cloned()
            .unwrap_or_else(|| format!("rank {rank}"))
    }

    fn event(&self, event: &'static str, node: Option<usize>, detail: serde_json::Value) -> Action {
        Action::Event {
            event,
            node: node.map(|r| self.node(r)),
            detail,
        }
    }

    fn missing(&self) -> Vec<String> {
        (0..self.n)
            .filter(|r| self.hello[*r].is_none())
            .map(|r| self.node(r))
            .collect()
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
            "failure"
        } else {
            "stop_requested"
        };
        acts.push(self.event(
            ev,
            node,
            serde_json::json!({ "code": code, "reason": reason }),
        ));
        for r in 0..self.n {
            if self.connected[r] {
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
        // a node that failed under the job is the cluster's fault, not the user's: with
        // `on_node_failure: requeue` the job goes back in the queue (exit 4 only: config,
        // engine and startup errors would fail again)
        let requeue = code == exit::PEER_FAILURE
            && self.settings.config.on_node_failure == crate::input::config::OnNodeFailure::Requeue;
        if requeue {
            acts.push(self.event(
                "requeue",
                node,
                serde_json::json!({ "job_id": self.step.job_id, "reason": reason }),
            ));
            acts.push(Action::Requeue(reason.clone()));
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

    fn check_all_stopped(&mut self) -> Vec<Action> {
        if self.phase != Phase::Stopping || self.all_stopped_sent {
            return Vec::new();
        }
        if (0..self.n).all(|r| self.stopped[r] || !self.connected[r]) {
            self.all_stopped_sent = true;
            return vec![
                self.event("all_stopped", None, serde_json::json!({})),
                Action::AllStopped,
            ];
        }
        Vec::new()
    }

    /// A connection said Hello as `rank`. `Err` = refuse this connection with that reason.
    pub fn on_hello(
        &mut self,
        hello: &Hello,
        now: Instant,
    ) -> Result<(usize, Vec<Action>), String> {
        let Hello {
            protocol,
            node,
            node_rank,
            version,
            digest,
            info,
            settings_digests,
            busy,
            ..
        } = hello;
        let rank = *node_rank;
        if *protocol != channel::PROTOCOL {
            return Err(format!(
                "{node} speaks channel protocol {protocol}, the master {}",
                channel::PROTOCOL
            ));
        }
        if rank >= self.n || self.step.nodes[rank] != *node {
            return Err(format!(
                "{node} claims node rank {rank}, which is not its place in the step's node list"
            ));
        }
        if self.hello[rank].is_some() || self.connected[rank] {
            return Err(format!(
                "node rank {rank} ({node}) connected twice: more than one task on that node?"
            ));
        }
        let mut acts = Vec::new();
        if self.phase != Phase::Rendezvous {
            return Err(format!("{node} connected after the rendezvous was over"));
        }
        self.connected[rank] = true;
        self.last_seen[rank] = now;
        if *version != self.version {
            acts.extend(self.stop(
                exit::USAGE,
                format!("{node} runs ray-launch {version}, the master ({}) runs {}: use one binary for the whole step", self.node(0), self.version),
                Some(rank),
            ));
            return Ok((rank, acts));
        }
        if *digest != self.settings.digest {
            let keys = diff_keys(&self.master_digests, settings_digests);
            let keys = if keys.is_empty() {
                "unknown".to_string()
            } else {
                keys.join(", ")
            };
            acts.extend(self.stop(
                exit::USAGE,
                format!("{node}'s settings differ from the master's ({}) in: {keys}; every rank must get the same config, flags and client command", self.node(0)),
                Some(rank),
            ));
            return Ok((rank, acts));
        }
        self.hello[rank] = Some(info.clone());
        self.busy[rank] = busy.iter().take(plan::CANDIDATE_BLOCKS).cloned().collect();
        if self.hello.iter().all(Option::is_some) {
            acts.extend(self.all_connected(now));
        }
        Ok((rank, acts))
    }

    /// The first candidate block that no node found taken, or why there is none.
    fn choose_block(&self) -> Result<u16, String> {
        let taken = |base: u16| {
            (0..self.n).find_map(|r| {
                self.busy[r]
                    .iter()
                    .find(|b| b.base == base)
                    .map(|b| format!("on {}: {}", self.node(r), b.why))
            })
        };
        let mut why: Vec<String> = Vec::new();
        for &c in &self.candidates {
            match taken(c) {
                None => return Ok(c),
                Some(w) if !why.contains(&w) => why.push(w),
                Some(_) => {}
            }
        }
        Err(format!(
            "every candidate port block of this step is taken ({}): {}",
            self.candidates
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            why.join("; ")
        ))
    }

    fn all_connected(&mut self, now: Instant) -> Vec<Action> {
        let nodes: Vec<NodeInfo> = self
            .hello
            .iter()
            .map(|h| h.clone().expect("all hello"))
            .collect();
        let block = match self.choose_block() {
            Ok(b) => b,
            Err(why) => {
                self.phase = Phase::Starting;
                return self.stop(exit::LAUNCH_FAILURE, why, None);
            }
        };
        let channel = (self.channel_port != block).then_some(self.channel_port);
        let plan = match plan::build_in(&self.settings, &self.step, &nodes, block, channel) {
            Ok(p) => p,
            Err(e) => return self.stop(exit::USAGE, e.report().replace('\n', " "), None),
        };
        let mut acts = vec![
            self.event(
                "rendezvous_complete",
                None,
                serde_json::json!({ "nodes": self.n }),
            ),
            Action::Info(format!(
                "rendezvous complete: all {} node(s) connected",
                self.n
            )),
        ];
        for r in 0..self.n {
            acts.push(Action::Send(
                r,
                ToRank::Welcome {
                    nodes: nodes.clone(),
                    block,
                },
            ));
        }
        self.phase = Phase::Starting;
        self.joined = vec![false; plan.replicas];
        let r = &self.settings.config.replicas;
        self.reps = vec![
            Rep {
                state: ReplicaState::Starting,
                budget: crate::run::restarts::Budget::new(r.max_restarts, r.restart_window.0),
                restarts: 0,
                reason: None,
                resetting: BTreeSet::new(),
                backoff: Duration::ZERO,
                restart_at: None,
            };
            plan.replicas
        ];
        self.router_up = plan.router.is_none();
        self.restarts = plan.restarts_replicas(&self.settings);
        let attached = plan.attached.clone();
        self.plan = Some(plan);
        acts.push(self.replicas_action());
        if !attached.is_empty() {
            // nothing starts before every attached endpoint answers
            self.attaching = true;
            acts.push(Action::Info(format!(
                "checking the attached endpoint(s): {}",
                attached
                    .iter()
                    .map(|a| format!("{} ({})", a.name, a.url))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            acts.push(Action::CheckAttach(attached));
            return acts;
        }
        acts.extend(self.start_after(0..self.n, StartAfter::Rendezvous, None, now));
        acts
    }

    /// What the check of the attached endpoints found: each one's model ids, or why one
    /// does not answer (the job then stops with nothing started).
    pub fn on_attach_checked(
        &mut self,
        result: Result<Vec<(String, Vec<String>)>, String>,
        now: Instant,
    ) -> Vec<Action> {
        if !self.attaching || self.phase != Phase::Starting {
            return Vec::new();
        }
        self.attaching = false;
        match result {
            Err(why) => self.stop(exit::STARTUP_TIMEOUT, why, None),
            Ok(found) => {
                let mut acts = Vec::new();
                for (name, ids) in found {
                    acts.push(self.event(
                        "attached",
                        None,
                        serde_json::json!({ "name": name, "models": ids }),
                    ));
                    acts.push(Action::Info(format!(
                        "attached `{name}`: it serves {}",
                        ids.join(", ")
                    )));
                }
                acts.extend(self.start_after(0..self.n, StartAfter::Rendezvous, None, now));
                acts
            }
        }
    }

    /// Send `Start` for every command of `ranks` whose plan says to start after `event`, and
    /// note the deadlines that now run.
    /// `restart`: only the processes of the node's replica in this slot (a restart), not the
    /// router, the client or the node's other replicas.
    fn start_after(
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
                if let Some(d) = c.lifecycle.deadline {
                    let dur = d.duration(&self.settings.timeouts);
                    self.pending.push((r, c.kind, c.slot, now + dur, d));
                    self.started_at.insert((r, c.kind, c.slot), now);
                    self.phases.remove(&(r, c.kind, c.slot));
                }
                if c.kind == Kind::Engine {
                    engines.push(r);
                }
            }
        }
        match (engines.as_slice(), event) {
            ([], _) => {}
            ([leader], StartAfter::ReplicaJoined) => {
                acts.push(self.event("engine_started", Some(*leader), serde_json::json!({})));
            }
            (many, _) => acts.push(self.event(
                "engine_started",
                None,
                serde_json::json!({ "ranks": many.len() }),
            )),
        }
        if event == StartAfter::AllReady && acts.iter().any(|a| matches!(a, Action::Send(..))) {
            acts.push(self.event("client_started", Some(0), serde_json::json!({})));
        }
        acts
    }

    pub fn on_message(&mut self, rank: usize, msg: ToMaster, now: Instant) -> Vec<Action> {
        if self.silent.contains(&rank) {
            // given up on: what it says now changes nothing
            return Vec::new();
        }
        self.last_seen[rank] = now;
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
                let was_up = self.up[rank].contains(&(name, slot));
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
                let code = signals::exit_code_for(signal);
                let what = if signal == signals::libc_sig::USR1 {
                    "drain requested (SIGUSR1)".to_string()
                } else {
                    format!("received {}", signals::name(signal))
                };
                self.stop(code, format!("{node} {what}"), Some(rank))
            }
            ToMaster::Stopped => {
                self.stopped[rank] = true;
                let mut acts = vec![self.event("node_stopped", Some(rank), serde_json::json!({}))];
                acts.extend(self.check_all_stopped());
                acts
            }
        }
    }

    /// A starting command entered a new phase: say so, and give it `timeouts.engine_ready`
    /// again from now, never past `timeouts.engine_ready_max` after its start.
    fn on_phase(
        &mut self,
        rank: usize,
        kind: Kind,
        slot: usize,
        phase: String,
        now: Instant,
    ) -> Vec<Action> {
        let key = (rank, kind, slot);
        if self.phase == Phase::Stopping || !self.started_at.contains_key(&key) {
            return Vec::new();
        }
        // from a peer: bounded, printable
        let phase: String = phase.chars().filter(|c| !c.is_control()).take(64).collect();
        self.phases.insert(key, (phase.clone(), now));
        let t = &self.settings.timeouts;
        let cap = self.started_at[&key] + t.engine_ready_max;
        for p in self.pending.iter_mut() {
            if (p.0, p.1, p.2) == key && p.4 == Deadline::EngineReady {
                p.3 = p.3.max((now + t.engine_ready).min(cap));
            }
        }
        let rep = self.plan.as_ref().map(|p| p.replica_of(rank, slot));
        vec![
            self.event(
                "engine_phase",
                Some(rank),
                serde_json::json!({ "replica": rep, "kind": kind, "phase": phase }),
            ),
            Action::Info(format!(
                "replica {}: {kind} on {}: {phase}",
                rep.unwrap_or(0),
                self.node(rank)
            )),
            self.replicas_action(),
        ]
    }

    fn on_up(&mut self, rank: usize, kind: Kind, slot: usize, now: Instant) -> Vec<Action> {
        self.up[rank].insert((kind, slot));
        self.pending
            .retain(|(r, k, s, _, _)| !(*r == rank && *k == kind && *s == slot));
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
                acts.push(self.event("head_up", Some(rank), serde_json::json!({ "replica": rep })));
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
                    "worker_joined",
                    Some(rank),
                    serde_json::json!({ "replica": rep, "joined": joined, "of": total }),
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
                acts.push(self.event("router_up", Some(rank), serde_json::json!({})));
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
            if ray.iter().all(|k| self.up[r].contains(&(*k, 0))) {
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
        if self.reps[rep].state != ReplicaState::Starting {
            return Vec::new();
        }
        self.reps[rep].state = ReplicaState::Ready;
        let url = plan.endpoints[rep].url.clone();
        let mut acts = vec![
            self.event(
                "replica_ready",
                Some(rank),
                serde_json::json!({ "replica": rep, "url": url, "restarts": self.reps[rep].restarts }),
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
    fn maybe_ready(&mut self, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        if self.phase != Phase::Starting || !self.router_up {
            return Vec::new();
        }
        let settled = self
            .reps
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Ready | ReplicaState::Down));
        if !settled || self.serving() == 0 {
            return Vec::new();
        }
        self.phase = Phase::Ready;
        let urls: Vec<String> = plan.endpoints.iter().map(|e| e.url.clone()).collect();
        let url = plan.url().to_string();
        let mut acts = vec![self.event(
            "ready",
            None,
            serde_json::json!({ "url": url, "urls": urls }),
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
        acts.extend(self.start_after(0..self.n, StartAfter::AllReady, None, now));
        acts
    }

    /// How many replicas serve now.
    fn serving(&self) -> usize {
        self.reps
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .count()
    }

    /// Every replica's state, for the endpoint file.
    fn replicas_action(&self) -> Action {
        let Some(plan) = &self.plan else {
            return Action::Replicas(Vec::new(), Vec::new());
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
                    state: r.state,
                    restarts: r.restarts,
                    reason: r.reason.clone(),
                    phase: (r.state == ReplicaState::Starting)
                        .then(|| {
                            let leader = plan.replica_ranks(i).start;
                            self.phases
                                .get(&(leader, Kind::Engine, plan.slot_of(i)))
                                .map(|(p, _)| p.clone())
                        })
                        .flatten(),
                })
                .collect(),
            self.dropped.clone(),
        )
    }

    /// A process of `rank`'s replica failed (or, `lost`, its node is gone). Without restarts
    /// the job stops. Else the replica leaves the job: its processes on all its nodes are torn
    /// down and it starts again after a back-off while its budget lasts; a lost node, or a
    /// spent budget, keeps it down. The job ends when too few replicas are left.
    fn replica_failed(
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
        let leader = plan.endpoints[rep].node.clone();
        if !matches!(
            self.reps[rep].state,
            ReplicaState::Starting | ReplicaState::Ready
        ) {
            // the same failure seen by another process of it, or a node lost while it restarts
            if lost && self.reps[rep].state != ReplicaState::Down {
                self.reps[rep].state = ReplicaState::Down;
                self.reps[rep].restart_at = None;
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
            self.up[r].retain(|(k, s)| !(k.of_replica() && *s == slot));
        }
        self.pending
            .retain(|(r, k, s, _, _)| !(ranks.contains(r) && k.of_replica() && *s == slot));
        let next = if lost {
            None
        } else {
            self.reps[rep].budget.restart(now)
        };
        let max = self.settings.config.replicas.max_restarts;
        let window = self.settings.config.replicas.restart_window.0;
        let r = &mut self.reps[rep];
        r.reason = Some(reason.clone());
        let mut acts = Vec::new();
        let why_down;
        match next {
            Some(backoff) => {
                r.state = ReplicaState::Restarting;
                r.backoff = backoff;
                r.restarts += 1;
                why_down = None;
                acts.push(Action::Warn(format!(
                    "replica {rep} (leader {leader}) failed: {reason}; restarting it in {} (restart {} of at most {max} within {})",
                    dur(backoff),
                    r.restarts,
                    dur(window)
                )));
            }
            None => {
                r.state = ReplicaState::Down;
                let why = if lost {
                    "its node is lost".to_string()
                } else {
                    format!(
                        "it failed after {} restart(s) within {} (replicas.max_restarts {max})",
                        r.budget.used(),
                        dur(window)
                    )
                };
                acts.push(Action::Warn(format!(
                    "replica {rep} (leader {leader}) failed: {reason}; it stays down: {why}"
                )));
                why_down = Some(why);
            }
        }
        let restarting = self.reps[rep].state == ReplicaState::Restarting;
        acts.insert(
            0,
            self.event(
                "replica_failed",
                Some(rank),
                serde_json::json!({
                    "replica": rep,
                    "reason": reason,
                    "code": code,
                    "restart": restarting,
                    "restarts": self.reps[rep].restarts,
                    "down": why_down,
                }),
            ),
        );
        for r in ranks {
            if r == rank && lost {
                continue;
            }
            if self.connected[r] {
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
        if restarting && self.reps[rep].resetting.is_empty() {
            self.reps[rep].restart_at = Some(now + self.reps[rep].backoff);
        }
        acts.push(self.replicas_action());
        acts.extend(self.check_serving(rep, code, &reason, now));
        acts
    }

    /// After replica `rep` left: end the job when too few replicas of its model serve (or
    /// can still come up), or drop the model when it is not required and none of it is left;
    /// else see whether the job is ready now (a replica down for good no longer holds it up).
    fn check_serving(&mut self, rep: usize, code: i32, reason: &str, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let m = plan.model_of_replica(rep).clone();
        let named = plan.models.len() > 1 || !plan.attached.is_empty();
        let own = &self.reps[m.first_replica..m.first_replica + m.replicas];
        let serving = own
            .iter()
            .filter(|r| r.state == ReplicaState::Ready)
            .count();
        let alive = own.iter().filter(|r| r.state != ReplicaState::Down).count();
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
                    "model_dropped",
                    None,
                    serde_json::json!({ "model": m.name, "reason": reason }),
                ));
                acts.push(Action::Warn(format!(
                    "model `{}` is dropped: all its {} replica(s) are down (it has `required: false`, so the job goes on); last: {reason}",
                    m.name, m.replicas
                )));
                acts.push(self.replicas_action());
            }
            if self.reps.iter().all(|r| r.state == ReplicaState::Down) {
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
    fn on_reset_done(&mut self, rank: usize, slot: usize, now: Instant) -> Vec<Action> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        let rep = plan.replica_of(rank, slot);
        let r = &mut self.reps[rep];
        if !r.resetting.remove(&rank) || !r.resetting.is_empty() {
            return Vec::new();
        }
        if r.state != ReplicaState::Restarting {
            return vec![Action::Info(format!(
                "replica {rep}: its processes are gone on all its nodes"
            ))];
        }
        r.restart_at = Some(now + r.backoff);
        vec![Action::Info(format!(
            "replica {rep}: its processes are gone on all its nodes; starting it again in {}",
            dur(r.backoff)
        ))]
    }

    /// Replicas whose back-off is over start again, from their first command on.
    fn restart_due(&mut self, now: Instant) -> Vec<Action> {
        let due: Vec<usize> = (0..self.reps.len())
            .filter(|i| {
                self.reps[*i].state == ReplicaState::Restarting
                    && self.reps[*i].restart_at.is_some_and(|t| now >= t)
            })
            .collect();
        let mut acts = Vec::new();
        for rep in due {
            let Some(plan) = &self.plan else {
                break;
            };
            let ranks = plan.replica_ranks(rep);
            let leader = plan.endpoints[rep].node.clone();
            let r = &mut self.reps[rep];
            r.state = ReplicaState::Starting;
            r.restart_at = None;
            let n = r.restarts;
            acts.push(self.event(
                "replica_restarting",
                None,
                serde_json::json!({ "replica": rep, "restart": n, "node": leader }),
            ));
            acts.push(Action::Info(format!(
                "replica {rep}: starting it again on {leader} (restart {n})"
            )));
            let slot = plan.slot_of(rep);
            acts.extend(self.start_after(ranks, StartAfter::Rendezvous, Some(slot), now));
            acts.push(self.replicas_action());
        }
        acts
    }

    pub fn on_closed(&mut self, rank: usize, now: Instant) -> Vec<Action> {
        let was = self.connected[rank];
        self.connected[rank] = false;
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

    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        self.forgive_own_stall(now);
        match self.phase {
            Phase::Rendezvous => {
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
                if now >= self.next_progress {
                    self.next_progress = now + Duration::from_secs(5);
                    let shown: Vec<String> = missing.iter().take(10).cloned().collect();
                    let more = if missing.len() > 10 {
                        format!(" and {} more", missing.len() - 10)
                    } else {
                        String::new()
                    };
                    acts.push(Action::Info(format!(
                        "rendezvous: {}/{} node(s) connected; waiting for {}{more}",
                        self.n - missing.len(),
                        self.n,
                        shown.join(", ")
                    )));
                }
            }
            Phase::Starting | Phase::Ready => {
                while let Some((r, kind, slot, _, d)) = self
                    .pending
                    .iter()
                    .find(|(_, _, _, dl, _)| now >= *dl)
                    .cloned()
                {
                    let mut reason = format!(
                        "{kind} on {} did not come up within {} ({})",
                        self.node(r),
                        dur(d.duration(&self.settings.timeouts)),
                        d.key()
                    );
                    if let Some((phase, since)) = self.phases.get(&(r, kind, slot)) {
                        reason.push_str(&format!(
                            "; stuck in `{phase}` for {} (each new phase gives it that long again, up to timeouts.engine_ready_max {})",
                            dur(Duration::from_secs(now.duration_since(*since).as_secs())),
                            dur(self.settings.timeouts.engine_ready_max)
                        ));
                    }
                    if !kind.of_replica() {
                        return self.stop(exit::STARTUP_TIMEOUT, reason, Some(r));
                    }
                    self.pending
                        .retain(|(r2, k2, s2, _, _)| !(*r2 == r && *k2 == kind && *s2 == slot));
                    acts.extend(self.replica_failed(
                        r,
                        slot,
                        exit::STARTUP_TIMEOUT,
                        reason,
                        false,
                        now,
                    ));
                    if self.phase == Phase::Stopping {
                        return acts;
                    }
                }
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
                acts.extend(self.restart_due(now));
            }
            Phase::Stopping => {
                // a node that freezes during the teardown is not waited for either
                while let Some(r) = self.newly_silent(now) {
                    acts.push(Action::Warn(format!(
                        "{} went silent while stopping: not waiting for it",
                        self.node(r)
                    )));
                }
                acts.extend(self.check_all_stopped());
            }
        }
        acts
    }

    /// Time a peer's silence only while this process was running: when the clock jumped past
    /// a heartbeat interval since the last tick (this launcher was stopped, or starved of CPU),
    /// the gap is not the peers' fault, and what they sent meanwhile may still be unread.
    fn forgive_own_stall(&mut self, now: Instant) {
        let stall = self.own_stall.on_tick(now);
        for t in &mut self.last_seen {
            *t = crate::run::stall::forgive(*t, stall, now);
        }
    }

    /// The first connected, unstopped rank silent past the heartbeat timeout, now given up
    /// on: it gets no more messages and the stop does not wait for it.
    fn newly_silent(&mut self, now: Instant) -> Option<usize> {
        let limit = self.settings.health.heartbeat_timeout;
        let r = (0..self.n).find(|r| {
            self.connected[*r]
                && !self.stopped[*r]
                && now.duration_since(self.last_seen[*r]) > limit
        })?;
        self.connected[r] = false;
        self.silent.push(r);
        Some(r)
    }

    /// The ranks given up on as silent: their launcher is alive (its connection is open) but
    /// frozen or cut off, so whatever it started there is still running.
    pub fn abandoned_ranks(&self) -> Vec<usize> {
        self.silent.clone()
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
}

// ------------------------------------------------------------------ async shell

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

struct Shell {
    settings: Settings,
    step: Step,
    event_log: Option<std::fs::File>,
    t0: Instant,
    ready_at: Option<String>,
    /// The API key file named by the endpoint file, and whether the launcher wrote it.
    api_key_path: Option<String>,
    wrote_api_key: bool,
    refused: u64,
    /// What the endpoint file says now (rewritten when the replicas change).
    status: (Status, Option<String>, Option<i32>),
    replicas: Vec<ReplicaStatus>,
    dropped: Vec<String>,
}

impl Shell {
    fn event(&mut self, event: &str, node: Option<String>, detail: serde_json::Value) {
        let Some(f) = self.event_log.as_mut() else {
            return;
        };
        let mut obj = serde_json::json!({
            "ts": now_rfc3339(),
            "t": (self.t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            "event": event,
            "node": node,
        });
        if let (Some(o), serde_json::Value::Object(d)) = (obj.as_object_mut(), detail) {
            o.extend(d);
        }
        use std::io::Write as _;
        let _ = writeln!(f, "{obj}");
    }

    /// A connection that failed the handshake: logged and recorded (the first ones one by
    /// one, then one line per hundred, so that a flood cannot fill the disk).
    fn refused(&mut self, peer: std::net::SocketAddr, reason: &str) {
        self.refused += 1;
        let n = self.refused;
        if n <= 20 || n.is_multiple_of(100) {
            let more = if n > 20 {
                format!(" ({n} refused so far)")
            } else {
                String::new()
            };
            tracing::warn!("dropped a connection from {peer}: {reason}{more}");
            self.event(
                "peer_refused",
                None,
                serde_json::json!({ "peer": peer.to_string(), "reason": reason, "count": n }),
            );
        }
    }

    fn endpoint(
        &mut self,
        plan: Option<&Plan>,
        status: Status,
        reason: Option<&str>,
        code: Option<i32>,
    ) {
        if status == Status::Ready && self.status.0 != Status::Ready {
            self.ready_at = Some(now_rfc3339());
        }
        self.status = (status, reason.map(str::to_string), code);
        let urls: Vec<String> = plan
            .map(|p| p.endpoints.iter().map(|e| e.url.clone()).collect())
            .unwrap_or_default();
        let first = &self.settings.models[0];
        let f = EndpointFile {
            status,
            url: plan.map(|p| p.url().to_string()),
            urls,
            replicas: self.replicas.clone(),
            models: plan
                .map(|p| crate::endpoint::model_statuses(p, &self.replicas, &self.dropped))
                .unwrap_or_default(),
            model: first.model.clone(),
            served_model_name: first.served().to_string(),
            job_id: self.step.job_id.clone(),
            node: self.step.master().to_string(),
            updated_at: now_rfc3339(),
            ready_at: self.ready_at.clone(),
            api_key_path: self.api_key_path.clone(),
            reason: reason.map(str::to_string),
            exit_code: code,
        };
        let path = std::path::Path::new(&self.settings.endpoint_file);
        if let Err(e) = f.write(path) {
            tracing::warn!(
                "cannot write endpoint file {}: {e}",
                self.settings.endpoint_file
            );
        }
    }
}

/// `scontrol requeue JOB` once every node has torn down: Slurm ends what is left of the job
/// and queues it again (a batch job, requeue allowed on the cluster); what it says is logged.
async fn requeue_job(step: &Step, why: &str) {
    if step.kind != crate::input::slurm::StepKind::Srun {
        tracing::warn!("on_node_failure is requeue, but this is no Slurm job: nothing to requeue");
        return;
    }
    tracing::warn!(
        "requeueing job {} (on_node_failure: requeue): {why}",
        step.job_id
    );
    let run = tokio::process::Command::new("scontrol")
        .args(["requeue", &step.job_id])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(o)) if o.status.success() => {
            tracing::info!("job {} is back in the queue (scontrol requeue)", step.job_id)
        }
        Ok(Ok(o)) => tracing::warn!(
            "scontrol requeue {} failed ({}): {}; submit with `sbatch --requeue` on a cluster that allows it",
            step.job_id,
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(Err(e)) => tracing::warn!("cannot run scontrol requeue {}: {e}", step.job_id),
        Err(_) => tracing::warn!("scontrol requeue {} did not answer within 10s", step.job_id),
    }
}

/// The API key file the launcher writes next to the endpoint file (`endpoint.json` →
/// `endpoint.api-key`).
pub fn api_key_file(endpoint_file: &str) -> PathBuf {
    PathBuf::from(endpoint_file).with_extension("api-key")
}

enum Inbound {
    /// An authenticated hello. `accepted` is the master's answer, ready to send first if the
    /// coordinator takes the rank; `reply` says what it decided.
    Hello {
        hello: Box<Hello>,
        tx: channel::Sender,
        accepted: Line,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// A connection failed the handshake.
    Refused {
        peer: std::net::SocketAddr,
        reason: String,
    },
    Msg(usize, ToMaster),
    Closed(usize),
    /// What the check of the attached endpoints found.
    Attached(Result<Vec<(String, Vec<String>)>, String>),
}

/// Bind the channel's port (before anything else starts, so a clash fails fast).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(std::net::SocketAddr::from(([0, 0, 0, 0], port)))?;
    sock.listen(1024)
}

/// How long a new connection may take to say hello: a port scanner or a stray client is
/// dropped after this.
pub const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Connections that have not authenticated yet, at most, in all and from one address.
pub const MAX_UNAUTHENTICATED: usize = 256;
pub const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 16;

/// Counts connections that have not authenticated, in all and per address.
#[derive(Default)]
struct Gate {
    total: usize,
    per: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// A place in the [`Gate`], given back when dropped (authenticated, or gone).
struct Pass {
    gate: std::sync::Arc<std::sync::Mutex<Gate>>,
    ip: std::net::IpAddr,
}

impl Pass {
    fn take(gate: &std::sync::Arc<std::sync::Mutex<Gate>>, ip: std::net::IpAddr) -> Option<Pass> {
        let mut g = gate.lock().expect("gate lock");
        let here = g.per.get(&ip).copied().unwrap_or(0);
        if g.total >= MAX_UNAUTHENTICATED || here >= MAX_UNAUTHENTICATED_PER_ADDRESS {
            return None;
        }
        g.total += 1;
        g.per.insert(ip, here + 1);
        Some(Pass {
            gate: gate.clone(),
            ip,
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut g = self.gate.lock().expect("gate lock");
        g.total -= 1;
        if let Some(n) = g.per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.per.remove(&self.ip);
            }
        }
    }
}

/// What every connection's handshake needs.
struct Ctx {
    auth: Auth,
    job: String,
    step: String,
    job_nonce: String,
    user_timeout: Duration,
}

/// Run the coordinator until every rank has stopped (or `done_wait` after the stop, when
/// some never report). Sends on `finished` when it is over.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    step: Step,
    auth: Auth,
    finished: oneshot::Sender<()>,
) {
    let event_log = settings.event_log.as_ref().and_then(|p| {
        let p = PathBuf::from(p);
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        crate::private::open_append(&p)
            .map_err(|e| tracing::warn!("cannot open event log {}: {e}", p.display()))
            .ok()
    });
    let channel_port = listener.local_addr().map_or(0, |a| a.port());
    let ctx = std::sync::Arc::new(Ctx {
        auth,
        job: step.job_id.clone(),
        step: step.step_id.clone(),
        job_nonce: auth::random_hex(),
        user_timeout: settings.health.heartbeat_timeout,
    });
    let t0 = Instant::now();
    let mut shell = Shell {
        settings: settings.clone(),
        step: step.clone(),
        event_log,
        t0,
        ready_at: None,
        api_key_path: None,
        wrote_api_key: false,
        refused: 0,
        status: (Status::Starting, None, None),
        replicas: Vec::new(),
        dropped: Vec::new(),
    };
    // the endpoint's API key: the user's own file, or one the launcher writes (0600)
    if settings.auth {
        match &settings.config.server.api_key_file {
            Some(f) => shell.api_key_path = Some(f.clone()),
            None => {
                let key = ctx
                    .auth
                    .master_job_key(&ctx.job, &ctx.step, &ctx.job_nonce)
                    .map(|k| k.api_key());
                let path = api_key_file(&settings.endpoint_file);
                if let Some(key) = key {
                    match crate::private::write_atomic(&path, key.as_bytes()) {
                        Ok(()) => {
                            shell.api_key_path = Some(path.display().to_string());
                            shell.wrote_api_key = true;
                        }
                        Err(e) => {
                            tracing::warn!("cannot write the API key file {}: {e}", path.display())
                        }
                    }
                }
            }
        }
    }
    shell.event(
        "launcher_started",
        Some(step.master().to_string()),
        serde_json::json!({ "nodes": step.nodes.len(), "job_id": step.job_id, "step_id": step.step_id, "auth": ctx.auth.method.name() }),
    );
    shell.endpoint(None, Status::Starting, None, None);
    let mut coord = Coord::new(settings.clone(), step, channel_port, t0);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Inbound>();
    let mut writers: BTreeMap<usize, channel::Sender> = BTreeMap::new();
    let mut cached: Option<(ToRank, Line)> = None;

    // accept loop: open only during the rendezvous
    let accept_tx = in_tx.clone();
    let actx = ctx.clone();
    let mut acceptor = Some(tokio::spawn(async move {
        let gate = std::sync::Arc::new(std::sync::Mutex::new(Gate::default()));
        let mut backoff = Duration::from_millis(10);
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // out of descriptors, or the like: do not spin
                    tracing::warn!("accepting a channel connection failed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            let Some(pass) = Pass::take(&gate, peer.ip()) else {
                // too many unauthenticated connections: drop this one at once
                drop(sock);
                let _ = accept_tx.send(Inbound::Refused {
                    peer,
                    reason: format!("too many connections that have not authenticated ({MAX_UNAUTHENTICATED_PER_ADDRESS} from one address, {MAX_UNAUTHENTICATED} in all)"),
                });
                continue;
            };
            tokio::spawn(handle_conn(
                sock,
                peer,
                pass,
                actx.clone(),
                accept_tx.clone(),
            ));
        }
    }));

    let tick = Duration::from_millis(250);
    let mut hb = tokio::time::interval(settings.health.heartbeat_interval);
    let mut ticker = tokio::time::interval(tick);
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let mut requeue: Option<String> = None;
    loop {
        // heartbeats out first, then what arrived, then the clock: a queued message counts
        // before a rank's silence is judged
        let acts = tokio::select! {
            biased;
            _ = hb.tick() => {
                let hb = channel::encode(&ToRank::Heartbeat);
                for w in writers.values() {
                    w.send_line(hb.clone());
                }
                Vec::new()
            }
            Some(m) = in_rx.recv() => match m {
                Inbound::Hello { hello, tx, accepted, reply } => {
                    match coord.on_hello(&hello, Instant::now()) {
                        Ok((rank, acts)) => {
                            tx.send_line(accepted);
                            writers.insert(rank, tx);
                            let _ = reply.send(Ok(rank));
                            acts
                        }
                        Err(reason) => {
                            tracing::warn!("refused {} (node rank {}): {reason}", hello.node, hello.node_rank);
                            let _ = reply.send(Err(reason));
                            Vec::new()
                        }
                    }
                }
                Inbound::Refused { peer, reason } => {
                    shell.refused(peer, &reason);
                    Vec::new()
                }
                Inbound::Msg(rank, msg) => coord.on_message(rank, msg, Instant::now()),
                Inbound::Attached(res) => coord.on_attach_checked(res, Instant::now()),
                Inbound::Closed(rank) => {
                    writers.remove(&rank);
                    coord.on_closed(rank, Instant::now())
                }
            },
            _ = ticker.tick() => {
                if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    tracing::warn!("not every node reported its teardown complete; giving up waiting");
                    break;
                }
                coord.on_tick(Instant::now())
            }
        };
        let mut done = false;
        for a in acts {
            match a {
                Action::Send(r, m) => {
                    if let Some(w) = writers.get(&r) {
                        let line = match &cached {
                            Some((c, l)) if *c == m => l.clone(),
                            _ => {
                                let l = channel::encode(&m);
                                cached = Some((m, l.clone()));
                                l
                            }
                        };
                        w.send_line(line);
                    }
                }
                Action::Event {
                    event,
                    node,
                    detail,
                } => shell.event(event, node, detail),
                Action::Endpoint {
                    status,
                    reason,
                    code,
                } => shell.endpoint(coord.plan(), status, reason.as_deref(), code),
                Action::Replicas(v, dropped) => {
                    shell.replicas = v;
                    shell.dropped = dropped;
                    let (st, reason, code) = shell.status.clone();
                    if !st.is_final() {
                        shell.endpoint(coord.plan(), st, reason.as_deref(), code);
                    }
                }
                Action::Drop(r) => {
                    writers.remove(&r);
                }
                Action::CheckAttach(all) => {
                    let tx = in_tx.clone();
                    let within = settings.config.timeouts.attach.0;
                    tokio::spawn(async move {
                        let res = crate::route::attach::check_all(&all, within).await;
                        let _ = tx.send(Inbound::Attached(res));
                    });
                }
                Action::Info(s) => tracing::info!("{s}"),
                Action::Warn(s) => tracing::warn!("{s}"),
                Action::AllStopped => done = true,
                Action::Requeue(why) => requeue = Some(why),
            }
        }
        if !coord.in_rendezvous() {
            // every rank is in (or the job is over): nobody else may connect
            if let Some(a) = acceptor.take() {
                a.abort();
            }
        }
        if coord.stopping() && stop_deadline.is_none() {
            let budget = settings.timeouts.teardown_budget + Duration::from_secs(2);
            stop_deadline = Some(tokio::time::Instant::now() + budget);
        }
        if done {
            break;
        }
    }
    if let Some(a) = acceptor.take() {
        a.abort();
    }
    let abandoned = coord.abandoned_ranks();
    if !abandoned.is_empty() {
        let names: Vec<String> = abandoned.iter().map(|r| coord.node(*r)).collect();
        if crate::run::proc::wake_step(&shell.step, &names, Duration::from_secs(10)).await {
            // a stopped launcher resumes, finds the job stopping and tears down: its
            // connection closes; one that does not within the budget is SIGKILLed by Slurm
            let mut waiting: BTreeSet<usize> = abandoned.into_iter().collect();
            let deadline = tokio::time::Instant::now() + settings.timeouts.teardown_budget;
            while !waiting.is_empty() {
                match tokio::time::timeout_at(deadline, in_rx.recv()).await {
                    Ok(Some(Inbound::Closed(r))) | Ok(Some(Inbound::Msg(r, ToMaster::Stopped))) => {
                        waiting.remove(&r);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            if waiting.is_empty() {
                tracing::info!("{} stopped after all", names.join(", "));
            } else {
                crate::run::proc::kill_step(&shell.step, &names);
            }
        }
    }
    if shell.wrote_api_key {
        if let Some(p) = &shell.api_key_path {
            let _ = std::fs::remove_file(p);
        }
    }
    if let Some(why) = requeue {
        requeue_job(&shell.step, &why).await;
    }
    let _ = finished.send(());
}

/// One connection: the handshake, then its messages to the coordinator.
async fn handle_conn(
    sock: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    pass: Pass,
    ctx: std::sync::Arc<Ctx>,
    tx: mpsc::UnboundedSender<Inbound>,
) {
    channel::tune(&sock, ctx.user_timeout);
    let mut c = Connection::<ToMaster>::new(sock);
    let nonce = auth::random_hex();
    c.sender.send(&ToRank::Challenge {
        protocol: channel::PROTOCOL,
        nonce: nonce.clone(),
        job_nonce: ctx.job_nonce.clone(),
    });
    let refuse = |reason: String| {
        let _ = tx.send(Inbound::Refused { peer, reason });
    };
    let hello = match tokio::time::timeout(HELLO_WITHIN, c.recv()).await {
        Ok(Ok(ToMaster::Hello(h))) => *h,
        Ok(Ok(_)) => return refuse("it spoke before saying hello".into()),
        Ok(Err(e)) => return refuse(format!("no hello ({e})")),
        Err(_) => {
            return refuse(format!(
                "it said nothing within {}s",
                HELLO_WITHIN.as_secs()
            ))
        }
    };
    let who = format!(
        "it claims to be {} (node rank {})",
        hello.node, hello.node_rank
    );
    if hello.protocol != channel::PROTOCOL {
        return refuse(format!(
            "{who} but speaks channel protocol {}, not {}",
            hello.protocol,
            channel::PROTOCOL
        ));
    }
    if hello.job_id != ctx.job || hello.step_id != ctx.step {
        return refuse(format!(
            "{who} of job {} step {}, not of this step ({}.{})",
            hello.job_id, hello.step_id, ctx.job, ctx.step
        ));
    }
    let hd = hello.digest_without_proof();
    let b = hello.binding(&hd, &nonce, &ctx.job_nonce);
    if let Err(why) = ctx.auth.check_rank(&b, hello.proof.as_deref()).await {
        return refuse(format!("{who} but failed authentication: {why}"));
    }
    let accepted = match ctx.auth.master_proof(&b, channel::ACCEPTED).await {
        Ok(proof) => channel::encode(&ToRank::Accepted { proof }),
        Err(e) => return refuse(format!("{who}; cannot answer it: {e}")),
    };
    drop(pass);
    c.limit.set(channel::MAX_TO_MASTER);
    let (mut rx, sender, flush) = c.split();
    let (reply, decided) = oneshot::channel();
    if tx
        .send(Inbound::Hello {
            hello: Box::new(hello.clone()),
            tx: sender.clone(),
            accepted,
            reply,
        })
        .is_err()
    {
        return;
    }
    let rank = match decided.await {
        Ok(Ok(rank)) => rank,
        Ok(Err(reason)) => {
            let proof = ctx
                .auth
                .master_proof(&b, &channel::refused_outcome(exit::USAGE, &reason))
                .await
                .ok()
                .flatten();
            sender.send(&ToRank::Refused {
                code: exit::USAGE,
                reason,
                proof,
            });
            drop(sender);
            flush.wait(Duration::from_secs(2)).await;
            return;
        }
        Err(_) => return,
    };
    drop(sender);
    loop {
        match rx.recv().await {
            Ok(m) => {
                if tx.send(Inbound::Msg(rank, m)).is_err() {
                    return;
                }
            }
            Err(_) => {
                let _ = tx.send(Inbound::Closed(rank));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::config;
    use crate::input::settings::{self, Overrides};

    fn setup(yaml: &str, n: usize, client: &[&str]) -> (Coord, Vec<NodeInfo>, Instant) {
        setup_gpus(yaml, n, client, 1)
    }

    fn setup_gpus(
        yaml: &str,
        n: usize,
        client: &[&str],
        gpus: u32,
    ) -> (Coord, Vec<NodeInfo>, Instant) {
        let loaded = config::parse("t.yaml", yaml).unwrap();
        let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
        let mut step = Step::preview(names.clone(), "7".into());
        step.self_rank = Some(0);
        let s = settings::resolve(
            &loaded,
            &Overrides {
                gpus_per_node: Some(gpus),
                ..Default::default()
            },
            &step,
            client.iter().map(|c| c.to_string()).collect(),
            std::path::Path::new("/w"),
        );
        let infos = names
            .iter()
            .enumerate()
            .map(|(i, nm)| NodeInfo {
                name: nm.clone(),
                address: format!("10.0.0.{}", i + 1),
                interface: Some("eth0".into()),
                cpus: 2,
                object_store_bytes: 1 << 30,
                gpu_ids: vec![],
                preset_ifname: vec![],
                ray_client: false,
            })
            .collect();
        let now = Instant::now();
        let port = plan::block_base(&step.job_id, &step.step_id, s.port_range);
        (Coord::new(s, step, port, now), infos, now)
    }

    fn hello(c: &Coord, info: &NodeInfo, rank: usize) -> Hello {
        Hello {
            protocol: channel::PROTOCOL,
            node: info.name.clone(),
            node_rank: rank,
            version: env!("CARGO_PKG_VERSION").into(),
            digest: c.settings.digest.clone(),
            info: info.clone(),
            proof: None,
            job_id: c.step.job_id.clone(),
            step_id: c.step.step_id.clone(),
            settings_digests: c.settings.agreed_digests(),
            busy: vec![],
            nonce: "n".into(),
        }
    }

    /// Every rank says hello in rank order; the actions of the last hello.
    fn hello_all(c: &mut Coord, infos: &[NodeInfo], now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        for (i, info) in infos.iter().enumerate() {
            let h = hello(c, info, i);
            acts = c.on_hello(&h, now).unwrap().1;
        }
        acts
    }

    fn sends(acts: &[Action]) -> Vec<(usize, String)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(r, ToRank::Start { name, .. }) => Some((*r, name.to_string())),
                Action::Send(r, ToRank::Stop { code, .. }) => Some((*r, format!("stop {code}"))),
                _ => None,
            })
            .collect()
    }

    const RAY: &str = "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\n";
    const RAY2: &str = "engine: vllm\nmodel: m\nparallel:\n  tensor: 2\n";

    #[test]
    fn ray_start_is_ordered_head_workers_engine_client() {
        let (mut c, infos, now) = setup(RAY, 3, &["python", "x.py"]);
        let mut all = Vec::new();
        for (i, info) in infos.iter().enumerate().rev() {
            let h = hello(&c, info, i);
            let (_, acts) = c.on_hello(&h, now).unwrap();
            all = acts;
        }
        assert_eq!(
            sends(&all),
            [(0, "ray-head".to_string())],
            "only the head starts first"
        );
        let acts = c.on_message(
            0,
            ToMaster::Up {
                name: Kind::RayHead,
                slot: 0,
            },
            now,
        );
        assert_eq!(
            sends(&acts),
            [(1, "ray-worker".to_string()), (2, "ray-worker".to_string())]
        );
        let acts = c.on_message(
            2,
            ToMaster::Up {
                name: Kind::RayWorker,
                slot: 0,
            },
            now,
        );
        assert!(sends(&acts).is_empty());
        assert!(acts.iter().any(
            |a| matches!(a, Action::Info(s) if s.contains("2/3 nodes joined; waiting for node2"))
        ));
        let acts = c.on_message(
            1,
            ToMaster::Up {
                name: Kind::RayWorker,
                slot: 0,
            },
            now,
        );
        assert_eq!(sends(&acts), [(0, "engine".to_string())]);
        let acts = c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Engine,
                slot: 0,
            },
            now,
        );
        assert_eq!(sends(&acts), [(0, "client".to_string())]);
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::Endpoint {
                status: Status::Ready,
                ..
            }
        )));
        // the client's exit code becomes everyone's
        let acts = c.on_message(
            0,
            ToMaster::Exited {
                name: Kind::Client,
                slot: 0,
                status: "exit code 3".into(),
                code: 3,
                log: None,
                tail: vec![],
            },
            now,
        );
        assert_eq!(
            sends(&acts),
            [
                (0, "stop 3".to_string()),
                (1, "stop 3".to_string()),
                (2, "stop 3".to_string())
            ]
        );
    }

    #[test]
    fn mp_starts_every_engine_at_once() {
        let (mut c, infos, now) = setup("engine: vllm\nmodel: m\nparallel: {tensor: 2}\nvllm: {backend: mp}\ngpus_per_node: 0\n", 2, &[]);
        let acts = hello_all(&mut c, &infos, now);
        assert_eq!(
            sends(&acts),
            [(0, "engine".to_string()), (1, "engine".to_string())]
        );
    }

    #[test]
    fn failures_map_to_codes_and_name_the_node() {
        let (mut c, infos, now) = setup(RAY, 3, &[]);
        hello_all(&mut c, &infos, now);
        c.on_message(
            0,
            ToMaster::Up {
                name: Kind::RayHead,
                slot: 0,
            },
            now,
        );
        c.on_message(
            1,
            ToMaster::Up {
                name: Kind::RayWorker,
                slot: 0,
            },
            now,
        );
        let acts = c.on_message(
            1,
            ToMaster::Exited {
                name: Kind::RayWorker,
                slot: 0,
                status: "exit code 1".into(),
                code: 1,
                log: Some("/l/node2.ray-worker.log".into()),
                tail: vec![],
            },
            now,
        );
        let stop = acts.iter().find_map(|a| match a {
            Action::Send(2, ToRank::Stop { code, reason, node }) => {
                Some((*code, reason.clone(), node.clone()))
            }
            _ => None,
        });
        let (code, reason, node) = stop.unwrap();
        assert_eq!(code, exit::PEER_FAILURE);
        assert_eq!(node.as_deref(), Some("node2"));
        assert!(
            reason.contains("ray-worker on node2 ended unexpectedly (exit code 1)"),
            "{reason}"
        );
        // a second failure does not change the cause
        assert!(c
            .on_closed(2, Instant::now())
            .iter()
            .all(|a| !matches!(a, Action::Send(..))));
    }

    #[test]
    fn silent_node_and_slow_join_time_out() {
        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        hello_all(&mut c, &infos, now);
        // head never comes up: startup timeout after worker_join (3m)
        let acts = c.on_tick(now + Duration::from_secs(181));
        assert!(acts.iter().any(|a| matches!(a, Action::Send(_, ToRank::Stop { code, reason, .. }) if *code == exit::STARTUP_TIMEOUT && reason.contains("ray-head on node1 did not come up within 3m"))), "{acts:?}");

        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        hello_all(&mut c, &infos, now);
        c.on_message(
            0,
            ToMaster::Up {
                name: Kind::RayHead,
                slot: 0,
            },
            now + Duration::from_secs(19),
        );
        let acts = c.on_tick(now + Duration::from_secs(21));
        assert!(acts.iter().any(|a| matches!(a, Action::Send(_, ToRank::Stop { code, reason, .. }) if *code == exit::PEER_FAILURE && reason.contains("node2 went silent"))), "{acts:?}");
    }

    #[test]
    fn a_stall_of_the_master_itself_is_not_a_peers_silence() {
        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        hello_all(&mut c, &infos, now);
        let stops = |acts: &[Action]| {
            acts.iter().find_map(|a| match a {
                Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
                _ => None,
            })
        };
        let tick = Duration::from_millis(250);
        let mut t = now;
        for _ in 0..8 {
            t += tick;
            c.on_message(0, ToMaster::Heartbeat, t);
            c.on_message(1, ToMaster::Heartbeat, t);
            assert_eq!(stops(&c.on_tick(t)), None);
        }
        // the master was stopped (or starved) for a minute: its peers were not silent
        t += Duration::from_secs(60);
        assert_eq!(stops(&c.on_tick(t)), None);
        // node2 then stays silent while the master runs: stopped once 4 s (the default) of
        // silence were seen, one interval (1 s) of the stall included
        let from = t;
        let mut stopped = None;
        for _ in 0..40 {
            t += tick;
            c.on_message(0, ToMaster::Heartbeat, t);
            if let Some(r) = stops(&c.on_tick(t)) {
                stopped = Some((t - from, r));
                break;
            }
        }
        let (after, reason) = stopped.expect("node2's silence is seen");
        assert!(reason.contains("node2 went silent"), "{reason}");
        assert!(
            after > Duration::from_secs(3) && after <= Duration::from_millis(3500),
            "{after:?}"
        );
        assert_eq!(c.abandoned_ranks(), [1]);
    }

    #[test]
    fn mismatched_settings_name_the_node_and_the_keys() {
        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        let mut h = hello(&c, &infos[1], 1);
        h.digest = "other".into();
        h.settings_digests
            .insert("config.parallel.tensor".into(), "other".into());
        let (_, acts) = c.on_hello(&h, now).unwrap();
        let reason = acts.iter().find_map(|a| match a {
            Action::Send(
                1,
                ToRank::Stop {
                    code: 2, reason, ..
                },
            ) => Some(reason.clone()),
            _ => None,
        });
        assert!(reason.unwrap().contains(
            "node2's settings differ from the master's (node1) in: config.parallel.tensor"
        ));
    }

    #[test]
    fn rendezvous_names_missing_nodes_and_times_out() {
        let (mut c, infos, now) = setup(RAY, 3, &[]);
        let h = hello(&c, &infos[0], 0);
        c.on_hello(&h, now).unwrap();
        let acts = c.on_tick(now + Duration::from_secs(6));
        assert!(acts.iter().any(|a| matches!(a, Action::Info(s) if s.contains("1/3 node(s) connected; waiting for node2, node3"))), "{acts:?}");
        let acts = c.on_tick(now + Duration::from_secs(301));
        assert!(acts.iter().any(|a| matches!(a, Action::Send(0, ToRank::Stop { code: 3, reason, .. }) if reason.contains("node2, node3 did not connect within 5m"))), "{acts:?}");
    }

    #[test]
    fn all_stopped_after_every_rank_reports() {
        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        hello_all(&mut c, &infos, now);
        c.on_message(1, ToMaster::Stopping { signal: 15 }, now);
        assert!(!c
            .on_message(0, ToMaster::Stopped, now)
            .contains(&Action::AllStopped));
        assert!(c.on_closed(1, Instant::now()).contains(&Action::AllStopped));
    }
    // ---- replicas: restarts, the budget, min_healthy, the router

    /// vLLM mp, one node per replica: `n` replicas behind a router.
    fn replicas_yaml(extra: &str) -> String {
        format!("engine: vllm\nmodel: m\nparallel:\n  tensor: 1\n  nodes_per_replica: 1\nvllm:\n  backend: mp\n{extra}")
    }

    /// (rank, slot) of every engine the actions start.
    fn engine_starts(acts: &[Action]) -> Vec<(usize, usize)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(
                    r,
                    ToRank::Start {
                        name: Kind::Engine,
                        slot,
                    },
                ) => Some((*r, *slot)),
                _ => None,
            })
            .collect()
    }

    fn resets(acts: &[Action]) -> Vec<usize> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(r, ToRank::Reset { .. }) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn states(acts: &[Action]) -> Option<Vec<(ReplicaState, u32)>> {
        acts.iter().rev().find_map(|a| match a {
            Action::Replicas(v, _) => Some(v.iter().map(|r| (r.state, r.restarts)).collect()),
            _ => None,
        })
    }

    fn exited(kind: Kind) -> ToMaster {
        ToMaster::Exited {
            name: kind,
            slot: 0,
            status: "signal 9 (SIGKILL)".into(),
            code: 137,
            log: None,
            tail: vec![],
        }
    }

    /// Heartbeats from every rank, then a tick: the clock moves on while every node is alive.
    fn beat(c: &mut Coord, t: Instant) -> Vec<Action> {
        for r in 0..c.n {
            c.on_message(r, ToMaster::Heartbeat, t);
        }
        c.on_tick(t)
    }

    fn is_ready(acts: &[Action]) -> bool {
        acts.iter().any(|a| {
            matches!(
                a,
                Action::Endpoint {
                    status: Status::Ready,
                    ..
                }
            )
        })
    }

    /// Two replicas up, the router listening, the client started: the job is ready.
    fn two_ready(extra: &str, client: &[&str]) -> (Coord, Instant) {
        let (mut c, infos, t0) = setup(&replicas_yaml(extra), 2, client);
        let acts = hello_all(&mut c, &infos, t0);
        // every engine and the router start at once (no Ray)
        assert_eq!(
            sends(&acts),
            [
                (0, "engine".into()),
                (0, "router".into()),
                (1, "engine".into())
            ]
        );
        let mut acts = c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Engine,
                slot: 0,
            },
            t0,
        );
        acts.extend(c.on_message(
            1,
            ToMaster::Up {
                name: Kind::Engine,
                slot: 0,
            },
            t0,
        ));
        assert!(!is_ready(&acts), "not before the router listens: {acts:?}");
        let acts = c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Router,
                slot: 0,
            },
            t0,
        );
        assert!(is_ready(&acts), "{acts:?}");
        (c, t0)
    }

    #[test]
    fn a_failed_replica_is_torn_down_and_started_again_while_the_job_goes_on() {
        let (mut c, t0) = two_ready("", &["python", "x.py"]);
        let s = Duration::from_secs(1);
        // replica 1's engine dies: only its node resets, nobody stops, the job stays ready
        let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
        assert_eq!(resets(&acts), [1], "{acts:?}");
        assert!(sends(&acts).is_empty(), "no stop, no start: {acts:?}");
        assert_eq!(
            states(&acts),
            Some(vec![
                (ReplicaState::Ready, 0),
                (ReplicaState::Restarting, 1)
            ])
        );
        assert!(!c.stopping());
        // its teardown is done; the back-off (1 s) runs from then
        c.on_message(1, ToMaster::ResetDone { slot: 0 }, t0 + 2 * s);
        assert!(sends(&c.on_tick(t0 + 2 * s)).is_empty());
        let acts = c.on_tick(t0 + 3 * s);
        // only the replica's own engine starts again: not the router, not the client
        assert_eq!(sends(&acts), [(1, "engine".into())], "{acts:?}");
        assert_eq!(
            states(&acts),
            Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Starting, 1)])
        );
        let acts = c.on_message(
            1,
            ToMaster::Up {
                name: Kind::Engine,
                slot: 0,
            },
            t0 + 4 * s,
        );
        assert_eq!(
            states(&acts),
            Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Ready, 1)])
        );
        assert!(
            sends(&acts).is_empty(),
            "the client is not started twice: {acts:?}"
        );
        // a late report from the killed engine's other watchers changes nothing
        let mut c2 = c;
        c2.on_message(1, exited(Kind::Engine), t0 + 5 * s);
        assert!(!c2.stopping());
    }

    #[test]
    fn a_replica_that_keeps_failing_stays_down_and_the_last_one_ends_the_job() {
        let (mut c, t0) = two_ready("replicas:\n  max_restarts: 2\n  restart_window: 10m\n", &[]);
        let s = Duration::from_secs(1);
        let mut t = t0;
        let mut restarts_seen = Vec::new();
        for attempt in 0..3 {
            t += 10 * s;
            // the health checks fail this time: a `Failed` of the engine
            let acts = c.on_message(
                1,
                ToMaster::Failed {
                    code: exit::ENGINE_FAILURE,
                    reason: "health check failed".into(),
                    kind: Some(Kind::Engine),
                    slot: 0,
                },
                t,
            );
            assert_eq!(resets(&acts), [1], "attempt {attempt}: {acts:?}");
            let st = states(&acts).unwrap()[1];
            restarts_seen.push(st);
            c.on_message(1, ToMaster::ResetDone { slot: 0 }, t);
            // back-off 1 s, then 2 s
            let acts = beat(&mut c, t + 5 * s);
            if attempt < 2 {
                assert_eq!(sends(&acts), [(1, "engine".into())], "attempt {attempt}");
            } else {
                assert!(sends(&acts).is_empty());
            }
        }
        assert_eq!(
            restarts_seen,
            [
                (ReplicaState::Restarting, 1),
                (ReplicaState::Restarting, 2),
                (ReplicaState::Down, 2)
            ]
        );
        assert!(!c.stopping(), "replica 0 still serves");
        // the last serving replica fails too: below min_healthy, the job ends with exit 7
        let acts = c.on_message(0, exited(Kind::Engine), t + 20 * s);
        assert!(c.stopping());
        assert!(
            sends(&acts).contains(&(0, format!("stop {}", exit::REPLICAS_DOWN))),
            "{acts:?}"
        );
    }

    #[test]
    fn a_lost_node_keeps_its_replica_down_and_min_healthy_decides() {
        let (mut c, t0) = two_ready("", &[]);
        let acts = c.on_closed(1, t0 + Duration::from_secs(1));
        assert_eq!(
            states(&acts),
            Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Down, 0)])
        );
        assert!(
            resets(&acts).is_empty(),
            "nobody is left on that node to reset"
        );
        assert!(!c.stopping());
        // with min_healthy 2 the same loss ends the job
        let (mut c, t0) = two_ready("replicas:\n  min_healthy: 2\n", &[]);
        c.on_closed(1, t0 + Duration::from_secs(1));
        assert!(c.stopping());
    }

    #[test]
    fn with_on_failure_stop_one_replica_ends_the_job_as_before() {
        let (mut c, t0) = two_ready("replicas:\n  on_failure: stop\n", &[]);
        let acts = c.on_message(1, exited(Kind::Engine), t0 + Duration::from_secs(1));
        assert!(c.stopping());
        assert!(sends(&acts).contains(&(0, format!("stop {}", exit::ENGINE_FAILURE))));
        // the router's death is the job's failure in any case
        let (mut c, t0) = two_ready("", &[]);
        c.on_message(0, exited(Kind::Router), t0 + Duration::from_secs(1));
        assert!(c.stopping());
    }

    /// Two one-node models (`a` required, `b` as `b_extra` says) and, with `attach`, an
    /// attached endpoint; every engine and the router up.
    fn two_models(b_extra: &str, attach: bool) -> (Coord, Instant, Vec<Action>) {
        let yaml = format!(
            "engine: vllm\nvllm: {{backend: mp}}\nmodels:\n  - {{name: a, model: m, parallel: {{tensor: 1}}, nodes: 1}}\n  - {{name: b, model: m, parallel: {{tensor: 1}}{b_extra}}}\nreplicas: {{max_restarts: 0}}\n{}",
            if attach { "attach:\n  - {name: j, url: 'http://10.9.9.9:8000/v1'}\n" } else { "" }
        );
        let (mut c, infos, t0) = setup(&yaml, 2, &[]);
        let mut acts = hello_all(&mut c, &infos, t0);
        if attach {
            // nothing starts before the attached endpoint answered
            assert!(sends(&acts).is_empty(), "{acts:?}");
            let check = acts.iter().find_map(|a| match a {
                Action::CheckAttach(v) => Some(v.clone()),
                _ => None,
            });
            assert_eq!(check.map(|v| v[0].name.clone()).as_deref(), Some("j"));
            acts = c.on_attach_checked(Ok(vec![("j".into(), vec!["judge".into()])]), t0);
        }
        assert_eq!(
            sends(&acts),
            [
                (0, "engine".into()),
                (0, "router".into()),
                (1, "engine".into())
            ]
        );
        let mut all = Vec::new();
        for (r, k) in [(0, Kind::Engine), (1, Kind::Engine), (0, Kind::Router)] {
            all.extend(c.on_message(r, ToMaster::Up { name: k, slot: 0 }, t0));
        }
        assert!(is_ready(&all), "{all:?}");
        (c, t0, all)
    }

    #[test]
    fn a_model_whose_replicas_are_down_ends_the_job_unless_it_is_not_required() {
        let s = Duration::from_secs(1);
        // b is required: its only replica down (no restarts left) ends the job with exit 7
        let (mut c, t0, _) = two_models(", nodes: 1", false);
        let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
        assert!(c.stopping());
        assert!(sends(&acts).contains(&(0, format!("stop {}", exit::REPLICAS_DOWN))));
        let why = acts.iter().find_map(|a| match a {
            Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
            _ => None,
        });
        assert!(
            why.as_deref()
                .is_some_and(|w| w.starts_with("model `b`: 0 of its 1 replica(s) serve")),
            "{why:?}"
        );
        // `required: false`: b is dropped, a goes on serving
        let (mut c, t0, _) = two_models(", required: false", false);
        let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
        assert!(!c.stopping(), "{acts:?}");
        let dropped = acts.iter().rev().find_map(|a| match a {
            Action::Replicas(_, d) => Some(d.clone()),
            _ => None,
        });
        assert_eq!(dropped, Some(vec!["b".to_string()]));
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Warn(w) if w.starts_with("model `b` is dropped"))));
        // then a's own failure ends it: nothing serves
        c.on_message(0, exited(Kind::Engine), t0 + 2 * s);
        assert!(c.stopping());
    }

    #[test]
    fn an_attached_endpoint_that_does_not_answer_stops_the_job_before_anything_starts() {
        let (c, _, _) = two_models(", nodes: 1", true);
        assert!(!c.stopping());
        // the same setup, but the check fails: exit 3, and no Start was ever sent
        let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nattach:\n  - {name: j, url: 'http://10.9.9.9:8000/v1'}\n";
        let (mut c, infos, t0) = setup(yaml, 1, &[]);
        let acts = hello_all(&mut c, &infos, t0);
        assert!(sends(&acts).is_empty());
        let why = "attach `j`: GET http://10.9.9.9:8000/v1/models failed: connection refused";
        let acts = c.on_attach_checked(Err(why.into()), t0);
        assert!(c.stopping());
        assert_eq!(
            sends(&acts),
            [(0, format!("stop {}", exit::STARTUP_TIMEOUT))]
        );
    }

    #[test]
    fn a_lost_node_requeues_with_on_node_failure_requeue_and_nothing_else_does() {
        let requeues = |acts: &[Action]| {
            acts.iter()
                .filter(|a| matches!(a, Action::Requeue(_)))
                .count()
        };
        let yaml = "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\non_node_failure: requeue\n";
        // node3's launcher is gone: exit 4, and the job goes back in the queue
        let (mut c, infos, t0) = setup(yaml, 3, &[]);
        hello_all(&mut c, &infos, t0);
        let acts = c.on_closed(2, t0 + Duration::from_secs(1));
        assert!(sends(&acts).contains(&(0, format!("stop {}", exit::PEER_FAILURE))));
        assert_eq!(requeues(&acts), 1, "{acts:?}");
        // the engine's own failure is not the cluster's: no requeue
        let (mut c, infos, t0) = setup(yaml, 3, &[]);
        hello_all(&mut c, &infos, t0);
        let acts = c.on_message(0, exited(Kind::Engine), t0 + Duration::from_secs(1));
        assert!(c.stopping());
        assert_eq!(requeues(&acts), 0, "{acts:?}");
        // and without the key a lost node only stops the job
        let (mut c, infos, t0) = setup(RAY, 3, &[]);
        hello_all(&mut c, &infos, t0);
        assert_eq!(requeues(&c.on_closed(2, t0 + Duration::from_secs(1))), 0);
    }

    #[test]
    fn a_moving_phase_extends_the_engine_deadline_up_to_the_cap() {
        let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nvllm: {backend: mp}\ntimeouts: {engine_ready: 10s, engine_ready_max: 25s}\n";
        let (mut c, infos, t0) = setup(yaml, 1, &[]);
        let acts = hello_all(&mut c, &infos, t0);
        assert_eq!(sends(&acts), [(0, "engine".to_string())]);
        let s = Duration::from_secs(1);
        let phase = |c: &mut Coord, p: &str, t: Instant| {
            c.on_message(
                0,
                ToMaster::Phase {
                    name: Kind::Engine,
                    slot: 0,
                    phase: p.into(),
                },
                t,
            )
        };
        let acts = phase(&mut c, "loading weights", t0 + 8 * s);
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::Event {
                event: "engine_phase",
                ..
            }
        )));
        // the endpoint file (and `ray-launch status`) shows it
        let shown = acts.iter().find_map(|a| match a {
            Action::Replicas(v, _) => v[0].phase.clone(),
            _ => None,
        });
        assert_eq!(shown.as_deref(), Some("loading weights"));
        assert!(
            beat(&mut c, t0 + 12 * s).is_empty() && !c.stopping(),
            "extended to 18 s"
        );
        phase(&mut c, "compiling", t0 + 17 * s);
        beat(&mut c, t0 + 24 * s);
        assert!(!c.stopping(), "extended to the cap, 25 s");
        let acts = beat(&mut c, t0 + 26 * s);
        assert!(c.stopping());
        let why = acts.iter().find_map(|a| match a {
            Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
            _ => None,
        });
        assert!(
            why.as_deref().is_some_and(|w| w.contains(
                "did not come up within 10s (timeouts.engine_ready); stuck in `compiling` for 9s"
            )),
            "{why:?}"
        );
        // without phases the first deadline holds
        let (mut c, infos, t0) = setup(yaml, 1, &[]);
        hello_all(&mut c, &infos, t0);
        beat(&mut c, t0 + 11 * s);
        assert!(c.stopping());
    }

    #[test]
    fn a_replica_that_never_comes_up_does_not_hold_the_job_back_once_down() {
        let yaml = replicas_yaml("replicas:\n  max_restarts: 1\ntimeouts:\n  engine_ready: 60s\n");
        let (mut c, infos, t0) = setup(&yaml, 2, &["python", "x.py"]);
        hello_all(&mut c, &infos, t0);
        c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Engine,
                slot: 0,
            },
            t0,
        );
        c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Router,
                slot: 0,
            },
            t0,
        );
        // replica 1 misses its deadline: restarted once
        let s = Duration::from_secs(1);
        for i in 1..60 {
            assert!(beat(&mut c, t0 + i * s).is_empty(), "at {i} s");
        }
        let acts = beat(&mut c, t0 + 60 * s);
        assert_eq!(resets(&acts), [1], "{acts:?}");
        c.on_message(1, ToMaster::ResetDone { slot: 0 }, t0 + 61 * s);
        assert_eq!(sends(&beat(&mut c, t0 + 63 * s)), [(1, "engine".into())]);
        // and again: now it stays down, and the job is ready with replica 0 alone
        for i in 64..123 {
            assert!(beat(&mut c, t0 + i * s).is_empty(), "at {i} s");
        }
        let acts = beat(&mut c, t0 + 123 * s);
        assert_eq!(states(&acts).unwrap()[1], (ReplicaState::Down, 1));
        assert!(is_ready(&acts), "{acts:?}");
        assert!(sends(&acts).contains(&(0, "client".into())), "{acts:?}");
    }

    #[test]
    fn side_by_side_replicas_restart_one_slot_of_a_node() {
        let yaml = replicas_yaml("").replace("nodes_per_replica: 1", "replicas_per_node: 2");
        let (mut c, infos, t0) = setup_gpus(&yaml, 2, &[], 2);
        let acts = hello_all(&mut c, &infos, t0);
        assert_eq!(engine_starts(&acts), [(0, 0), (0, 1), (1, 0), (1, 1)]);
        for r in 0..2 {
            for slot in 0..2 {
                c.on_message(
                    r,
                    ToMaster::Up {
                        name: Kind::Engine,
                        slot,
                    },
                    t0,
                );
            }
        }
        assert!(is_ready(&c.on_message(
            0,
            ToMaster::Up {
                name: Kind::Router,
                slot: 0
            },
            t0
        )));
        // node2's second engine (replica 3) dies: only that slot resets
        let s = Duration::from_secs(1);
        let mut exit = exited(Kind::Engine);
        if let ToMaster::Exited { slot, .. } = &mut exit {
            *slot = 1;
        }
        let acts = c.on_message(1, exit, t0 + s);
        let reset: Vec<(usize, usize)> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Send(r, ToRank::Reset { slot, .. }) => Some((*r, *slot)),
                _ => None,
            })
            .collect();
        assert_eq!(reset, [(1, 1)]);
        let st: Vec<ReplicaState> = states(&acts).unwrap().into_iter().map(|x| x.0).collect();
        use ReplicaState::*;
        assert_eq!(st, [Ready, Ready, Ready, Restarting]);
        c.on_message(1, ToMaster::ResetDone { slot: 1 }, t0 + s);
        let acts = beat(&mut c, t0 + 3 * s);
        assert_eq!(engine_starts(&acts), [(1, 1)], "{acts:?}");
        // a lost node takes both of its replicas down
        let acts = c.on_closed(1, t0 + 4 * s);
        let st: Vec<ReplicaState> = states(&acts).unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(st, [Ready, Ready, Down, Down]);
        assert!(!c.stopping());
    }
}
