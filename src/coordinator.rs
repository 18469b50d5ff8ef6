//! The master's coordinator: rendezvous, ordered start, liveness, and the stop broadcast.
//!
//! [`Coord`] is a pure state machine: messages and clock ticks in, [`Action`]s out. The async
//! shell ([`serve`]) owns the sockets, the event log and the endpoint file, and runs inside the
//! master's launcher next to its own rank (which connects to it over loopback like any other).
//!
//! Order of start (Ray backend), per replica: head → (head up) → workers → (all joined) →
//! engine on the leader → (`/health` 200) → replica ready. Without Ray, every rank's engine
//! starts at once. When every replica is ready the endpoint file says `ready`, and in client
//! mode the client starts on the master.

use crate::channel::{self, ToMaster, ToRank};
use crate::exit;
use crate::plan::{self, NodeInfo, Plan};
use crate::settings::Settings;
use crate::signals;
use crate::slurm::Step;
use serde::Serialize;
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
        status: &'static str,
        reason: Option<String>,
        code: Option<i32>,
    },
    Info(String),
    Warn(String),
    /// Every rank has finished its teardown (or is gone).
    AllStopped,
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
    hello: Vec<Option<(NodeInfo, serde_json::Value)>>,
    connected: Vec<bool>,
    stopped: Vec<bool>,
    last_seen: Vec<Instant>,
    up: Vec<BTreeSet<String>>,
    pending: Vec<(usize, String, Instant, Duration)>,
    joined: Vec<usize>,
    ready: Vec<bool>,
    plan: Option<Plan>,
    phase: Phase,
    rendezvous_deadline: Instant,
    next_progress: Instant,
    master_settings: serde_json::Value,
    all_stopped_sent: bool,
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Dotted keys whose values differ between two JSON objects (for mismatch messages).
pub fn diff_keys(
    a: &serde_json::Value,
    b: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff_keys(va, vb, &p, out),
                    _ => out.push(p),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

impl Coord {
    pub fn new(settings: Settings, step: Step, now: Instant) -> Coord {
        let n = step.nodes.len();
        let rendezvous = settings.config.timeouts.rendezvous.0;
        let master_settings = settings.agreed();
        Coord {
            settings,
            step,
            n,
            version: env!("CARGO_PKG_VERSION").to_string(),
            hello: vec![None; n],
            connected: vec![false; n],
            stopped: vec![false; n],
            last_seen: vec![now; n],
            up: vec![BTreeSet::new(); n],
            pending: Vec::new(),
            joined: Vec::new(),
            ready: Vec::new(),
            plan: None,
            phase: Phase::Rendezvous,
            rendezvous_deadline: now + rendezvous,
            next_progress: now + Duration::from_secs(5),
            master_settings,
            all_stopped_sent: false,
        }
    }

    fn node(&self, rank: usize) -> String {
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
        acts.push(Action::Endpoint {
            status: if exit::is_failure(code) {
                "failed"
            } else {
                "stopped"
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
        msg: &ToMaster,
        settings: serde_json::Value,
        now: Instant,
    ) -> Result<(usize, Vec<Action>), String> {
        let ToMaster::Hello {
            protocol,
            node,
            node_rank,
            version,
            digest,
            info,
            ..
        } = msg
        else {
            return Err("the first message must be hello".into());
        };
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
            let mut keys = Vec::new();
            diff_keys(&self.master_settings, &settings, "", &mut keys);
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
        self.hello[rank] = Some((info.clone(), settings));
        if self.hello.iter().all(Option::is_some) {
            acts.extend(self.all_connected(now));
        }
        Ok((rank, acts))
    }

    fn all_connected(&mut self, now: Instant) -> Vec<Action> {
        let nodes: Vec<NodeInfo> = self
            .hello
            .iter()
            .map(|h| h.as_ref().expect("all hello").0.clone())
            .collect();
        let plan = match plan::build(&self.settings, &self.step, &nodes) {
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
                },
            ));
        }
        self.phase = Phase::Starting;
        self.joined = vec![0; plan.replicas];
        self.ready = vec![false; plan.replicas];
        let join = self.settings.config.timeouts.worker_join.0;
        let engine_ready = self.settings.config.timeouts.engine_ready.0;
        if plan.uses_ray() {
            for rep in 0..plan.replicas {
                let leader = rep * plan.nodes_per_replica;
                acts.push(Action::Send(
                    leader,
                    ToRank::Start {
                        name: "ray-head".into(),
                    },
                ));
                self.pending
                    .push((leader, "ray-head".into(), now + join, join));
            }
        } else {
            for r in 0..self.n {
                acts.push(Action::Send(
                    r,
                    ToRank::Start {
                        name: "engine".into(),
                    },
                ));
                let leader = r % plan.nodes_per_replica == 0;
                let d = if leader { engine_ready } else { join };
                self.pending.push((r, "engine".into(), now + d, d));
            }
            acts.push(self.event(
                "engine_started",
                None,
                serde_json::json!({ "ranks": self.n }),
            ));
        }
        self.plan = Some(plan);
        acts
    }

    pub fn on_message(&mut self, rank: usize, msg: ToMaster, now: Instant) -> Vec<Action> {
        self.last_seen[rank] = now;
        let node = self.node(rank);
        match msg {
            ToMaster::Hello { .. } => {
                vec![Action::Warn(format!("{node} said hello twice; ignored"))]
            }
            ToMaster::Heartbeat => Vec::new(),
            ToMaster::Up { name } => self.on_up(rank, name, now),
            ToMaster::Exited {
                name,
                status,
                code,
                log,
                tail,
            } => {
                if self.phase == Phase::Stopping {
                    return Vec::new();
                }
                if name == "client" {
                    return self.stop(code, format!("the client exited with {status}"), None);
                }
                let code = if name == "engine" {
                    exit::ENGINE_FAILURE
                } else if self.up[rank].contains(&name) {
                    exit::PEER_FAILURE
                } else {
                    exit::LAUNCH_FAILURE
                };
                let mut reason = format!("{name} on {node} ended unexpectedly ({status})");
                if let Some(l) = log {
                    reason.push_str(&format!("; log: {l}"));
                }
                if let Some(last) = tail.last() {
                    reason.push_str(&format!("; last line: {last}"));
                }
                self.stop(code, reason, Some(rank))
            }
            ToMaster::Failed { code, reason } => {
                self.stop(code, format!("{node}: {reason}"), Some(rank))
            }
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

    fn on_up(&mut self, rank: usize, name: String, now: Instant) -> Vec<Action> {
        self.up[rank].insert(name.clone());
        self.pending
            .retain(|(r, n, _, _)| !(*r == rank && *n == name));
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        if self.phase == Phase::Stopping {
            return Vec::new();
        }
        let npr = plan.nodes_per_replica;
        let rep = rank / npr;
        let leader = rep * npr;
        let join = self.settings.config.timeouts.worker_join.0;
        let engine_ready = self.settings.config.timeouts.engine_ready.0;
        let mut acts = Vec::new();
        match name.as_str() {
            "ray-head" => {
                acts.push(self.event("head_up", Some(rank), serde_json::json!({ "replica": rep })));
                acts.push(Action::Info(format!(
                    "replica {rep}: Ray head up on {}",
                    self.node(rank)
                )));
                if npr == 1 {
                    acts.extend(self.start_engine(leader, now, engine_ready));
                } else {
                    for r in leader + 1..leader + npr {
                        acts.push(Action::Send(
                            r,
                            ToRank::Start {
                                name: "ray-worker".into(),
                            },
                        ));
                        self.pending
                            .push((r, "ray-worker".into(), now + join, join));
                    }
                }
            }
            "ray-worker" => {
                self.joined[rep] += 1;
                let total = npr;
                let joined = self.joined[rep] + 1;
                let waiting: Vec<String> = (leader + 1..leader + npr)
                    .filter(|r| !self.up[*r].contains("ray-worker"))
                    .map(|r| self.node(r))
                    .collect();
                acts.push(self.event(
                    "worker_joined",
                    Some(rank),
                    serde_json::json!({ "replica": rep, "joined": joined, "of": total }),
                ));
                if waiting.is_empty() {
                    acts.push(Action::Info(format!(
                        "replica {rep}: {joined}/{total} nodes joined"
                    )));
                    acts.extend(self.start_engine(leader, now, engine_ready));
                } else {
                    acts.push(Action::Info(format!(
                        "replica {rep}: {joined}/{total} nodes joined; waiting for {}",
                        waiting.join(", ")
                    )));
                }
            }
            "engine" if rank == leader => {
                self.ready[rep] = true;
                let url = plan.endpoints[rep].url.clone();
                acts.push(self.event(
                    "replica_ready",
                    Some(rank),
                    serde_json::json!({ "replica": rep, "url": url }),
                ));
                if self.ready.iter().all(|r| *r) {
                    self.phase = Phase::Ready;
                    let urls: Vec<String> = plan.endpoints.iter().map(|e| e.url.clone()).collect();
                    acts.push(self.event("ready", None, serde_json::json!({ "urls": urls })));
                    acts.push(Action::Endpoint {
                        status: "ready",
                        reason: None,
                        code: None,
                    });
                    acts.push(Action::Info(format!(
                        "ready: {} (endpoint file {})",
                        urls.join(" "),
                        self.settings.endpoint_file
                    )));
                    if !self.settings.client.is_empty() {
                        acts.push(Action::Send(
                            0,
                            ToRank::Start {
                                name: "client".into(),
                            },
                        ));
                        acts.push(self.event("client_started", Some(0), serde_json::json!({})));
                    }
                } else {
                    let n_ready = self.ready.iter().filter(|r| **r).count();
                    acts.push(Action::Info(format!(
                        "replica {rep} ready ({n_ready}/{} replicas)",
                        self.ready.len()
                    )));
                }
            }
            _ => {}
        }
        acts
    }

    fn start_engine(&mut self, leader: usize, now: Instant, d: Duration) -> Vec<Action> {
        self.pending.push((leader, "engine".into(), now + d, d));
        vec![
            Action::Send(
                leader,
                ToRank::Start {
                    name: "engine".into(),
                },
            ),
            self.event("engine_started", Some(leader), serde_json::json!({})),
        ]
    }

    pub fn on_closed(&mut self, rank: usize) -> Vec<Action> {
        self.connected[rank] = false;
        if self.phase == Phase::Stopping {
            return self.check_all_stopped();
        }
        let node = self.node(rank);
        self.stop(
            exit::PEER_FAILURE,
            format!("lost the connection to {node}'s launcher (killed, or the node failed)"),
            Some(rank),
        )
    }

    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        match self.phase {
            Phase::Stopping => return acts,
            Phase::Rendezvous => {
                let missing = self.missing();
                if now >= self.rendezvous_deadline {
                    let d = self.settings.config.timeouts.rendezvous.0;
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
                if let Some((r, name, _, d)) = self
                    .pending
                    .iter()
                    .find(|(_, _, dl, _)| now >= *dl)
                    .cloned()
                {
                    let key = match name.as_str() {
                        "engine"
                            if r % self.plan.as_ref().map_or(1, |p| p.nodes_per_replica) == 0 =>
                        {
                            "timeouts.engine_ready"
                        }
                        _ => "timeouts.worker_join",
                    };
                    return self.stop(
                        exit::STARTUP_TIMEOUT,
                        format!(
                            "{name} on {} did not come up within {} ({key})",
                            self.node(r),
                            dur(d)
                        ),
                        Some(r),
                    );
                }
                let limit = self.settings.config.health.heartbeat_timeout.0;
                if let Some(r) = (0..self.n)
                    .find(|r| self.connected[*r] && now.duration_since(self.last_seen[*r]) > limit)
                {
                    let node = self.node(r);
                    return self.stop(
                        exit::PEER_FAILURE,
                        format!(
                            "{node} went silent: no heartbeat for {} (health.heartbeat_timeout)",
                            dur(limit)
                        ),
                        Some(r),
                    );
                }
            }
        }
        acts
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
}

// ------------------------------------------------------------------ async shell

#[derive(Serialize)]
struct EndpointFile<'a> {
    status: &'a str,
    url: Option<&'a str>,
    urls: Vec<&'a str>,
    model: &'a str,
    served_model_name: &'a str,
    job_id: &'a str,
    node: &'a str,
    updated_at: String,
    ready_at: Option<String>,
    api_key_path: Option<&'a str>,
    reason: Option<&'a str>,
    exit_code: Option<i32>,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Write `data` to `path` atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

struct Shell {
    settings: Settings,
    step: Step,
    event_log: Option<std::fs::File>,
    t0: Instant,
    ready_at: Option<String>,
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

    fn endpoint(
        &mut self,
        plan: Option<&Plan>,
        status: &str,
        reason: Option<&str>,
        code: Option<i32>,
    ) {
        if status == "ready" {
            self.ready_at = Some(now_rfc3339());
        }
        let urls: Vec<&str> = plan
            .map(|p| p.endpoints.iter().map(|e| e.url.as_str()).collect())
            .unwrap_or_default();
        let served = self
            .settings
            .config
            .served_model_name
            .as_deref()
            .unwrap_or(&self.settings.config.model);
        let f = EndpointFile {
            status,
            url: urls.first().copied(),
            urls: urls.clone(),
            model: &self.settings.config.model,
            served_model_name: served,
            job_id: &self.step.job_id,
            node: self.step.master(),
            updated_at: now_rfc3339(),
            ready_at: self.ready_at.clone(),
            api_key_path: None,
            reason,
            exit_code: code,
        };
        let data = serde_json::to_vec_pretty(&f).expect("serializes");
        if let Err(e) = write_atomic(std::path::Path::new(&self.settings.endpoint_file), &data) {
            tracing::warn!(
                "cannot write endpoint file {}: {e}",
                self.settings.endpoint_file
            );
        }
    }
}

/// One serialized message, shared by every connection it goes to (a Welcome for a thousand
/// nodes is serialized once, not a thousand times).
type Line = std::sync::Arc<Vec<u8>>;

fn to_line(m: &ToRank) -> Line {
    let mut v = serde_json::to_vec(m).expect("serializes");
    v.push(b'\n');
    std::sync::Arc::new(v)
}

enum Inbound {
    Hello {
        msg: ToMaster,
        settings: serde_json::Value,
        tx: mpsc::UnboundedSender<Line>,
        rank_tx: oneshot::Sender<Option<usize>>,
    },
    Msg(usize, ToMaster),
    Closed(usize),
}

/// Bind the channel's port (before anything else starts, so a clash fails fast).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(std::net::SocketAddr::from(([0, 0, 0, 0], port)))?;
    sock.listen(4096)
}

/// Run the coordinator until every rank has stopped (or `done_wait` after the stop, when
/// some never report). Sends on `finished` when it is over.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    step: Step,
    finished: oneshot::Sender<()>,
) {
    let event_log = settings.event_log.as_ref().and_then(|p| {
        let p = PathBuf::from(p);
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| tracing::warn!("cannot open event log {}: {e}", p.display()))
            .ok()
    });
    let t0 = Instant::now();
    let mut shell = Shell {
        settings: settings.clone(),
        step: step.clone(),
        event_log,
        t0,
        ready_at: None,
    };
    shell.event(
        "launcher_started",
        Some(step.master().to_string()),
        serde_json::json!({ "nodes": step.nodes.len(), "job_id": step.job_id }),
    );
    shell.endpoint(None, "starting", None, None);
    let mut coord = Coord::new(settings.clone(), step, t0);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Inbound>();
    let mut writers: BTreeMap<usize, mpsc::UnboundedSender<Line>> = BTreeMap::new();
    let mut cached: Option<(ToRank, Line)> = None;

    // accept loop
    let accept_tx = in_tx.clone();
    tokio::spawn(async move {
        let mut conn_id = 0u64;
        loop {
            let Ok((sock, _peer)) = listener.accept().await else {
                continue;
            };
            let _ = sock.set_nodelay(true);
            conn_id += 1;
            let tx = accept_tx.clone();
            tokio::spawn(handle_conn(sock, conn_id, tx));
        }
    });

    let tick = Duration::from_millis(250);
    let hb_every = settings.config.health.heartbeat_interval.0;
    let mut hb = tokio::time::interval(hb_every);
    let mut ticker = tokio::time::interval(tick);
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    loop {
        let acts = tokio::select! {
            Some(m) = in_rx.recv() => match m {
                Inbound::Hello { msg, settings: s, tx, rank_tx } => {
                    match coord.on_hello(&msg, s, Instant::now()) {
                        Ok((rank, acts)) => {
                            writers.insert(rank, tx);
                            let _ = rank_tx.send(Some(rank));
                            acts
                        }
                        Err(reason) => {
                            tracing::warn!("refused a connection: {reason}");
                            let _ = tx.send(to_line(&ToRank::Stop { code: exit::USAGE, reason, node: None }));
                            let _ = rank_tx.send(None);
                            Vec::new()
                        }
                    }
                }
                Inbound::Msg(rank, msg) => coord.on_message(rank, msg, Instant::now()),
                Inbound::Closed(rank) => {
                    writers.remove(&rank);
                    coord.on_closed(rank)
                }
            },
            _ = ticker.tick() => {
                if stop_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    tracing::warn!("not every node reported its teardown complete; giving up waiting");
                    break;
                }
                coord.on_tick(Instant::now())
            }
            _ = hb.tick() => {
                let hb = to_line(&ToRank::Heartbeat);
                for w in writers.values() {
                    let _ = w.send(hb.clone());
                }
                Vec::new()
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
                                let l = to_line(&m);
                                cached = Some((m, l.clone()));
                                l
                            }
                        };
                        let _ = w.send(line);
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
                Action::Info(s) => tracing::info!("{s}"),
                Action::Warn(s) => tracing::warn!("{s}"),
                Action::AllStopped => done = true,
            }
        }
        if coord.stopping() && stop_deadline.is_none() {
            let budget = crate::config::teardown_budget(&settings.config) + Duration::from_secs(2);
            stop_deadline = Some(tokio::time::Instant::now() + budget);
        }
        if done {
            break;
        }
    }
    let _ = finished.send(());
}

async fn handle_conn(sock: tokio::net::TcpStream, conn: u64, tx: mpsc::UnboundedSender<Inbound>) {
    let (r, mut w) = sock.into_split();
    let mut reader = channel::Reader::new(r);
    let nonce = format!(
        "{:016x}{:08x}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        conn
    );
    if channel::send(
        &mut w,
        &ToRank::Challenge {
            protocol: channel::PROTOCOL,
            nonce,
        },
    )
    .await
    .is_err()
    {
        return;
    }
    use tokio::io::AsyncWriteExt as _;
    // the hello must come soon; a port scanner or a stray client is dropped
    let hello =
        match tokio::time::timeout(Duration::from_secs(30), reader.recv::<serde_json::Value>())
            .await
        {
            Ok(Ok(v)) => v,
            _ => return,
        };
    let settings = hello
        .get("settings")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let Ok(msg) = serde_json::from_value::<ToMaster>(strip_settings(hello)) else {
        return;
    };
    let (wtx, mut wrx) = mpsc::unbounded_channel::<Line>();
    // writer: drains the queue until the coordinator drops the sender or the socket breaks
    let writer = tokio::spawn(async move {
        while let Some(l) = wrx.recv().await {
            if w.write_all(&l).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
    });
    let (rank_tx, rank_rx) = oneshot::channel();
    if tx
        .send(Inbound::Hello {
            msg,
            settings,
            tx: wtx,
            rank_tx,
        })
        .is_err()
    {
        return;
    }
    let Ok(Some(rank)) = rank_rx.await else {
        // refused: let the writer flush the Stop, then close
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        return;
    };
    loop {
        match reader.recv::<ToMaster>().await {
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

/// Hello travels as `ToMaster::Hello` plus a `settings` field (compared for mismatch messages).
fn strip_settings(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("settings");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::settings::{self, Overrides};

    fn setup(yaml: &str, n: usize, client: &[&str]) -> (Coord, Vec<NodeInfo>, Instant) {
        let loaded = config::parse("t.yaml", yaml).unwrap();
        let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
        let mut step = Step::preview(names.clone(), "7".into());
        step.self_rank = Some(0);
        let s = settings::resolve(
            &loaded,
            &Overrides {
                gpus_per_node: Some(1),
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
            })
            .collect();
        let now = Instant::now();
        (Coord::new(s, step, now), infos, now)
    }

    fn hello(c: &Coord, info: &NodeInfo, rank: usize) -> ToMaster {
        ToMaster::Hello {
            protocol: channel::PROTOCOL,
            node: info.name.clone(),
            node_rank: rank,
            version: env!("CARGO_PKG_VERSION").into(),
            digest: c.settings.digest.clone(),
            info: info.clone(),
            proof: None,
        }
    }

    /// Every rank says hello in rank order; the actions of the last hello.
    fn hello_all(c: &mut Coord, infos: &[NodeInfo], now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        for (i, info) in infos.iter().enumerate() {
            let h = hello(c, info, i);
            acts = c.on_hello(&h, c.settings.agreed(), now).unwrap().1;
        }
        acts
    }

    fn sends(acts: &[Action]) -> Vec<(usize, String)> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(r, ToRank::Start { name }) => Some((*r, name.clone())),
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
            let s = c.settings.agreed();
            let (_, acts) = c.on_hello(&h, s, now).unwrap();
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
                name: "ray-head".into(),
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
                name: "ray-worker".into(),
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
                name: "ray-worker".into(),
            },
            now,
        );
        assert_eq!(sends(&acts), [(0, "engine".to_string())]);
        let acts = c.on_message(
            0,
            ToMaster::Up {
                name: "engine".into(),
            },
            now,
        );
        assert_eq!(sends(&acts), [(0, "client".to_string())]);
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::Endpoint {
                status: "ready",
                ..
            }
        )));
        // the client's exit code becomes everyone's
        let acts = c.on_message(
            0,
            ToMaster::Exited {
                name: "client".into(),
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
                name: "ray-head".into(),
            },
            now,
        );
        c.on_message(
            1,
            ToMaster::Up {
                name: "ray-worker".into(),
            },
            now,
        );
        let acts = c.on_message(
            1,
            ToMaster::Exited {
                name: "ray-worker".into(),
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
            .on_closed(2)
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
                name: "ray-head".into(),
            },
            now + Duration::from_secs(15),
        );
        let acts = c.on_tick(now + Duration::from_secs(21));
        assert!(acts.iter().any(|a| matches!(a, Action::Send(_, ToRank::Stop { code, reason, .. }) if *code == exit::PEER_FAILURE && reason.contains("node2 went silent"))), "{acts:?}");
    }

    #[test]
    fn mismatched_settings_name_the_node_and_the_keys() {
        let (mut c, infos, now) = setup(RAY2, 2, &[]);
        let mut h = hello(&c, &infos[1], 1);
        if let ToMaster::Hello { digest, .. } = &mut h {
            *digest = "other".into();
        }
        let mut theirs = c.settings.agreed();
        theirs["config"]["parallel"]["tensor"] = serde_json::json!(4);
        let (_, acts) = c.on_hello(&h, theirs, now).unwrap();
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
        c.on_hello(&h, c.settings.agreed(), now).unwrap();
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
        assert!(c.on_closed(1).contains(&Action::AllStopped));
    }
}
