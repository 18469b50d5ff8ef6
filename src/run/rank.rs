//! What every rank runs (the master too, over loopback): connect to the coordinator, say
//! hello, start the commands the master names, report their readiness and death, send
//! heartbeats, and tear down in order when told to stop or signalled.
//!
//! [`RankMachine`] makes every decision, purely, like the master's `Coord`: an [`Input`] (a
//! signal, a message from the master, a local process event, a heartbeat tick) and an explicit
//! `now` in, [`Action`]s out. [`run`] is the thin async shell around it: it owns the
//! connection, the children, the reaper and the teardown, and does what the actions say.
//!
//! Teardown follows the plan's stages (client, engine, Ray). The client and the engine:
//! SIGTERM to the process we started, wait up to `timeouts.shutdown_grace` for its whole
//! session to be gone, then SIGKILL the session. Ray's daemons (once the engine is gone):
//! SIGKILL of their sessions at once. A second signal (after the duplicate window) SIGKILLs
//! everything.

use crate::auth::{Auth, JobKey};
use crate::exit;
use crate::input::gather::Gathered;
use crate::input::gather::Security;
use crate::input::settings::Settings;
use crate::plan::lifecycle::{self, Ending, Kind, Output, Ready, Stage};
use crate::plan::{self, NodeInfo, Plan};
use crate::private::{self, DirState};
use crate::run::channel::{self, Connection, Hello, ToMaster, ToRank};
use crate::run::master as coordinator;
use crate::run::ports;
use crate::run::proc;
use crate::run::reaper::{Note, Reaper};
use crate::run::signals::{self, Escalation, Shutdown};
use nix::sys::signal::Signal;
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

// ------------------------------------------------------------------ the state machine

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Trying to reach the master.
    Connecting,
    /// Hello sent; waiting for the Welcome (every rank connected).
    Rendezvous,
    /// The plan is known; starting and watching what the master names.
    Running,
    /// A stop was decided; the teardown runs.
    Stopping,
}

/// Something that happened to a process this rank runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// It reached its ready point (the plan's `lifecycle.ready`); of the node's replica `slot`.
    Up(Kind, usize),
    /// It ended: `status` in words, the exit code it maps to, its log and last lines.
    Exited {
        kind: Kind,
        slot: usize,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    },
    /// Something else failed here: a spawn, the health checks (of `kind`, when a command).
    Failed {
        code: i32,
        reason: String,
        kind: Option<Kind>,
        slot: usize,
    },
    /// While starting, its log says it entered this phase (`loading weights`, ...).
    Phase(Kind, usize, &'static str),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The connection to the master is open.
    Connected,
    /// Gave up reaching the master (the rendezvous deadline passed); why, in words.
    Unreachable(String),
    /// The (authenticated) master refused this rank: exit with `code`.
    Refused {
        code: i32,
        reason: String,
    },
    Signal(i32),
    FromMaster(ToRank),
    /// The connection to the master closed or carried something unreadable.
    MasterLost(String),
    /// The shell built this rank's plan from the Welcome (or could not: the report).
    Planned(Result<(), String>),
    Local(Event),
    /// The heartbeat interval passed.
    Tick,
    /// The teardown finished: every process of this rank is gone.
    TornDown,
    /// The processes here of the node's replica `slot` are gone (after `Action::Reset`).
    ResetDone(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(ToMaster),
    /// Build the plan from every rank's facts and the chosen port block, then report
    /// `Input::Planned`.
    BuildPlan(Vec<NodeInfo>, u16),
    /// Start this rank's command of this kind (of the node's replica `slot`).
    Start(Kind, usize),
    /// Stop everything this rank started, stage by stage; report `Input::TornDown`.
    Teardown,
    /// SIGKILL every session of this rank now (the teardown goes on and reports as usual).
    KillAll,
    /// Stop this rank's processes of the node's replica `slot` (its Ray and engine), keep
    /// the rest; report `Input::ResetDone`.
    Reset(usize),
    Info(String),
    Warn(String),
    Error(String),
    /// Exit with `code`, after flushing; `summary` is the last log line (once torn down).
    Exit {
        code: i32,
        summary: Option<String>,
    },
}

pub struct RankMachine {
    phase: Phase,
    node: String,
    master: String,
    /// How long the rendezvous may take once connected (`timeouts.rendezvous`).
    rendezvous: Duration,
    welcome_deadline: Option<Instant>,
    esc: Escalation,
    /// The first cause of the stop: (exit code, reason). Later causes do not change it.
    stopping: Option<(i32, String)>,
    master_closed: bool,
    /// The master went silent while the job ran: what it started is still running there.
    master_silent: bool,
    last_master: Instant,
    own_stall: crate::run::stall::OwnStall,
    heartbeat_timeout: Duration,
}

fn report_stop(code: i32, reason: &str, culprit: Option<&str>) -> Action {
    let by = culprit
        .map(|n| format!(" [caused by {n}]"))
        .unwrap_or_default();
    if exit::is_failure(code) {
        Action::Error(format!("stopping: {reason}{by}"))
    } else {
        Action::Info(format!("stopping: {reason}{by}"))
    }
}

impl RankMachine {
    /// `node` is this rank's node, `master` the master's; `rendezvous` how long to wait for
    /// the Welcome once connected.
    pub fn new(
        node: String,
        master: String,
        heartbeat_interval: Duration,
        heartbeat_timeout: Duration,
        rendezvous: Duration,
        now: Instant,
    ) -> Self {
        RankMachine {
            phase: Phase::Connecting,
            node,
            master,
            rendezvous,
            welcome_deadline: None,
            esc: Escalation::default(),
            stopping: None,
            master_closed: false,
            master_silent: false,
            own_stall: crate::run::stall::OwnStall::new(heartbeat_interval),
            last_master: now,
            heartbeat_timeout,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection to the master is gone (nothing more will come from it).
    /// The stop is for a failure (a process, a node, a peer), not a signal or a client's end.
    pub fn stopping_for_failure(&self) -> bool {
        self.stopping
            .as_ref()
            .is_some_and(|(code, _)| exit::is_failure(*code))
    }

    pub fn master_silent(&self) -> bool {
        self.master_silent
    }

    pub fn master_closed(&self) -> bool {
        self.master_closed
    }

    fn node(&self) -> &str {
        &self.node
    }

    /// Decide to stop with this cause, unless a stop is already under way.
    fn stop(&mut self, code: i32, reason: String) -> Vec<Action> {
        if self.stopping.is_some() {
            return Vec::new();
        }
        self.stopping = Some((code, reason));
        self.phase = Phase::Stopping;
        vec![Action::Teardown]
    }

    pub fn on(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Connecting => self.connecting(input, now),
            Phase::Rendezvous => self.rendezvous(input, now),
            Phase::Running | Phase::Stopping => self.running(input, now),
        }
    }

    fn connecting(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            // the handshake (hello and the master's proof) is done by then
            Input::Connected => {
                self.phase = Phase::Rendezvous;
                self.last_master = now;
                // a margin past the master's own deadline, so that its message (naming the missing
                // nodes) arrives first
                self.welcome_deadline = Some(now + self.rendezvous + self.heartbeat_timeout);
                Vec::new()
            }
            Input::Refused { code, reason } => vec![
                Action::Error(format!("the master refused this rank: {reason}")),
                Action::Exit {
                    code,
                    summary: None,
                },
            ],
            Input::Unreachable(why) => vec![
                Action::Error(why),
                Action::Exit {
                    code: exit::STARTUP_TIMEOUT,
                    summary: None,
                },
            ],
            Input::Signal(sig) => vec![
                Action::Info(format!(
                    "received {} before the rendezvous; nothing was started",
                    signals::name(sig)
                )),
                Action::Exit {
                    code: signals::exit_code_for(sig),
                    summary: None,
                },
            ],
            _ => Vec::new(),
        }
    }

    fn rendezvous(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::Signal(sig) => vec![
                Action::Send(ToMaster::Stopping { signal: sig }),
                Action::Info(format!(
                    "received {} during the rendezvous; nothing was started",
                    signals::name(sig)
                )),
                Action::Exit {
                    code: signals::exit_code_for(sig),
                    summary: None,
                },
            ],
            Input::FromMaster(ToRank::Welcome { nodes, block }) => {
                vec![Action::BuildPlan(nodes, block)]
            }
            Input::Tick => {
                let mut acts = vec![Action::Send(ToMaster::Heartbeat)];
                let why = if self.welcome_deadline.is_some_and(|d| now >= d) {
                    Some((exit::STARTUP_TIMEOUT, format!(
                        "the master {} did not complete the rendezvous within {} of this rank joining (timeouts.rendezvous)",
                        self.master,
                        humantime::format_duration(self.rendezvous)
                    )))
                } else if now.duration_since(self.last_master) > self.heartbeat_timeout {
                    Some((exit::PEER_FAILURE, format!(
                        "the master {} went silent during the rendezvous: nothing for {} (health.heartbeat_timeout)",
                        self.master,
                        humantime::format_duration(self.heartbeat_timeout)
                    )))
                } else {
                    None
                };
                if let Some((code, reason)) = why {
                    acts.push(Action::Error(reason));
                    acts.push(Action::Exit {
                        code,
                        summary: None,
                    });
                }
                acts
            }
            Input::FromMaster(ToRank::Stop { code, reason, node }) => vec![
                report_stop(code, &reason, node.as_deref()),
                Action::Exit {
                    code,
                    summary: None,
                },
            ],
            Input::FromMaster(_) => {
                self.last_master = now;
                Vec::new()
            }
            Input::MasterLost(e) => {
                self.master_closed = true;
                vec![
                    Action::Error(format!(
                        "lost the connection to the master {} during the rendezvous ({e})",
                        self.master
                    )),
                    Action::Exit {
                        code: exit::PEER_FAILURE,
                        summary: None,
                    },
                ]
            }
            Input::Planned(Ok(())) => {
                self.phase = Phase::Running;
                self.last_master = now;
                Vec::new()
            }
            Input::Planned(Err(report)) => vec![
                Action::Send(ToMaster::Failed {
                    code: exit::USAGE,
                    reason: report.replace('\n', " "),
                    kind: None,
                    slot: 0,
                }),
                Action::Error(report),
                Action::Exit {
                    code: exit::USAGE,
                    summary: None,
                },
            ],
            _ => Vec::new(),
        }
    }

    fn running(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        match input {
            Input::Signal(sig) => match self.esc.on_signal(sig, now) {
                Shutdown::Graceful { signal } if self.stopping.is_none() => {
                    let what = if signal == signals::libc_sig::USR1 {
                        "SIGUSR1: draining".to_string()
                    } else {
                        format!("received {}: stopping", signals::name(signal))
                    };
                    acts.push(Action::Send(ToMaster::Stopping { signal }));
                    acts.push(Action::Info(what.clone()));
                    acts.extend(self.stop(signals::exit_code_for(signal), what));
                }
                Shutdown::Graceful { .. } | Shutdown::Duplicate => {}
                Shutdown::Kill => {
                    acts.push(Action::Warn(format!(
                        "{} again: killing every process of this job on {} now",
                        signals::name(sig),
                        self.node()
                    )));
                    acts.push(Action::KillAll);
                }
            },
            Input::FromMaster(m) => {
                self.last_master = now;
                match m {
                    ToRank::Start { name, slot } if self.stopping.is_none() => {
                        acts.push(Action::Start(name, slot));
                    }
                    ToRank::Reset { reason, slot } if self.stopping.is_none() => {
                        acts.push(Action::Warn(format!(
                            "{reason}: stopping this node's processes of the replica (the job goes on)"
                        )));
                        acts.push(Action::Reset(slot));
                    }
                    ToRank::Stop { code, reason, node } if self.stopping.is_none() => {
                        acts.push(report_stop(code, &reason, node.as_deref()));
                        acts.extend(self.stop(code, reason));
                    }
                    _ => {}
                }
            }
            Input::MasterLost(_) => {
                self.master_closed = true;
                if self.stopping.is_none() {
                    let reason = format!("lost the connection to the master {} (its launcher was killed, or its node failed)", self.master);
                    acts.push(Action::Error(reason.clone()));
                    acts.extend(self.stop(exit::PEER_FAILURE, reason));
                }
            }
            Input::Local(Event::Exited {
                kind,
                slot,
                status,
                code,
                log,
                tail,
            }) => {
                if self.stopping.is_some() {
                    return acts;
                }
                if matches!(lifecycle::ending(kind, true, code), Ending::Done(_)) {
                    acts.push(Action::Info(format!("{kind} exited with {status}")));
                } else {
                    acts.push(Action::Error(format!(
                        "{kind} exited unexpectedly ({status}); log: {}",
                        log.as_deref().unwrap_or("-")
                    )));
                    acts.extend(tail.iter().map(|t| Action::Error(format!("  | {t}"))));
                }
                acts.push(Action::Send(ToMaster::Exited {
                    name: kind,
                    slot,
                    status,
                    code,
                    log,
                    tail,
                }));
                if self.master_closed {
                    acts.extend(self.stop(
                        exit::PEER_FAILURE,
                        "a process died and the master is gone".into(),
                    ));
                }
            }
            Input::Local(Event::Up(kind, slot)) => {
                acts.push(Action::Info(format!("{kind} is up")));
                acts.push(Action::Send(ToMaster::Up { name: kind, slot }));
            }
            Input::Local(Event::Phase(kind, slot, phase)) => {
                acts.push(Action::Send(ToMaster::Phase {
                    name: kind,
                    slot,
                    phase: phase.to_string(),
                }));
            }
            Input::Local(Event::Failed {
                code,
                reason,
                kind,
                slot,
            }) => {
                if self.stopping.is_none() {
                    acts.push(Action::Error(reason.clone()));
                    acts.push(Action::Send(ToMaster::Failed {
                        code,
                        reason,
                        kind,
                        slot,
                    }));
                }
            }
            Input::Tick => {
                // time the master's silence only while this process ran
                let stall = self.own_stall.on_tick(now);
                self.last_master = crate::run::stall::forgive(self.last_master, stall, now);
                acts.push(Action::Send(ToMaster::Heartbeat));
                if self.stopping.is_none()
                    && now.duration_since(self.last_master) > self.heartbeat_timeout
                {
                    self.master_silent = true;
                    let reason = format!(
                        "the master {} went silent: nothing for {} (health.heartbeat_timeout)",
                        self.master,
                        humantime::format_duration(self.heartbeat_timeout)
                    );
                    acts.push(Action::Error(reason.clone()));
                    acts.extend(self.stop(exit::PEER_FAILURE, reason));
                }
            }
            Input::TornDown => {
                let (code, reason) = self
                    .stopping
                    .clone()
                    .unwrap_or((exit::INTERNAL, "torn down without a cause".into()));
                let summary = if code == exit::SUCCESS {
                    format!("done: {reason}; exit {code}")
                } else {
                    format!(
                        "all processes of this job on {} are gone; exit {code}",
                        self.node()
                    )
                };
                acts.push(Action::Send(ToMaster::Stopped));
                acts.push(Action::Exit {
                    code,
                    summary: Some(summary),
                });
            }
            Input::ResetDone(slot) => {
                if self.stopping.is_none() {
                    acts.push(Action::Info(
                        "the replica's processes on this node are gone".into(),
                    ));
                    acts.push(Action::Send(ToMaster::ResetDone { slot }));
                }
            }
            Input::Connected
            | Input::Unreachable(_)
            | Input::Refused { .. }
            | Input::Planned(_) => {}
        }
        acts
    }
}

// ------------------------------------------------------------------ the async shell

/// A process this rank started: its teardown stage and its pid (= its session's id).
#[derive(Clone)]
struct Running {
    kind: Kind,
    slot: usize,
    stage: Stage,
    pid: i32,
}

/// Where a watcher reports, tagged with the rank's reset epoch at the process's start: a
/// report about a process a reset already stopped is dropped.
#[derive(Clone)]
struct Reports {
    tx: mpsc::UnboundedSender<(usize, u64, Event)>,
    slot: usize,
    epoch: u64,
}

impl Reports {
    fn send(&self, ev: Event) -> Result<(), ()> {
        self.tx.send((self.slot, self.epoch, ev)).map_err(|_| ())
    }
}

/// The command an event is about.
fn event_kind(ev: &Event) -> Option<Kind> {
    match ev {
        Event::Up(k, _) => Some(*k),
        Event::Exited { kind, .. } => Some(*kind),
        Event::Failed { kind, .. } => *kind,
        Event::Phase(k, _, _) => Some(*k),
    }
}

/// Files that engines leave in shared memory and /tmp (vLLM's `vllm_dist_*`).
fn leftover_candidates() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for dir in ["/dev/shm", "/tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("vllm_dist") {
                    out.insert(e.path());
                }
            }
        }
    }
    out
}

/// The secrets this rank fills into its commands (from the handshake's job key).
#[derive(Default, Clone)]
struct Secrets {
    api_key: Option<String>,
    ray_token: Option<String>,
}

/// How long a child's end (but a SIGKILL) waits before it is reported: the time for this
/// launcher to see a signal Slurm sent the whole step at once.
const EXIT_SETTLE: Duration = Duration::from_millis(200);

/// The engine's grace when the job failed: its endpoint is broken already (a node, a Ray
/// daemon or a process is gone), and a Ray driver whose cluster died can hang in its shutdown.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// What the shell owns while the machine decides.
struct Shell {
    settings: Settings,
    step: crate::input::slurm::Step,
    me: usize,
    node: String,
    sender: Option<channel::Sender>,
    plan: Option<Plan>,
    log_dir: PathBuf,
    reaper: Option<Reaper>,
    procs: Vec<Running>,
    watchers: Vec<(Kind, usize, JoinHandle<()>)>,
    local_tx: mpsc::UnboundedSender<(usize, u64, Event)>,
    /// Resets so far, per slot: events of a replica's processes from before its last reset
    /// are stale.
    epochs: std::collections::BTreeMap<usize, u64>,
    /// What resets under way are stopping; each reports its slot on `reset_tx` when done.
    resetting: Vec<Running>,
    reset_tx: mpsc::UnboundedSender<usize>,
    kill_tx: watch::Sender<bool>,
    kill_rx: watch::Receiver<bool>,
    leftovers_before: BTreeSet<PathBuf>,
    teardown: Option<Pin<Box<dyn Future<Output = ()>>>>,
    secrets: Secrets,
    /// The channel port the master listens on, when it is not its block's first port.
    channel_port: Option<u16>,
    /// The private temp dir, once taken: what to remove at the end.
    temp_dir: Option<(PathBuf, DirState)>,
    /// The lock on a temp dir this launcher created.
    dir_lock: Option<private::DirLock>,
}

impl Shell {
    /// Feed `input` to the machine and do what it says, including the inputs that actions
    /// produce (a built plan, a failed spawn). `Some` when the machine says to exit.
    fn drive(&mut self, m: &mut RankMachine, input: Input) -> Option<(i32, Option<String>)> {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            for a in m.on(input, Instant::now()) {
                match a {
                    Action::Send(msg) => {
                        if let Some(s) = &self.sender {
                            s.send(&msg);
                        }
                    }
                    Action::BuildPlan(nodes, block) => {
                        queue.push_back(Input::Planned(self.build_plan(&nodes, block)))
                    }
                    Action::Start(kind, slot) => {
                        if let Err(ev) = self.start(kind, slot) {
                            queue.push_back(Input::Local(ev));
                        }
                    }
                    Action::Teardown => self.begin_teardown(m.stopping_for_failure()),
                    Action::KillAll => {
                        let _ = self.kill_tx.send(true);
                    }
                    Action::Reset(slot) => self.begin_reset(slot),
                    Action::Info(s) => info!("{s}"),
                    Action::Warn(s) => warn!("{s}"),
                    Action::Error(s) => error!("{s}"),
                    Action::Exit { code, summary } => return Some((code, summary)),
                }
            }
        }
        None
    }

    /// The plan from the Welcome; the log dir, and with Ray the private temp dir and the
    /// token file in it.
    fn build_plan(&mut self, nodes: &[NodeInfo], block: u16) -> Result<(), String> {
        let plan = plan::build_in(&self.settings, &self.step, nodes, block, self.channel_port)
            .map_err(|e| e.report())?;
        private::own_dir(&self.log_dir).map_err(|e| {
            format!("log_dir: {e}; use a log directory of your own (the default, ray-launch-{{job}}, is created 0700)")
        })?;
        let mut reaper = Reaper::start(
            &self.log_dir.join(format!(
                "{}{}.reaper.log",
                self.node, self.settings.step_suffix
            )),
            self.settings.timeouts.shutdown_grace,
        );
        let rank = &plan.ranks[self.me];
        // the node's private temp dir: Ray's files, and every engine's compile caches
        if !rank.commands.is_empty() {
            let dir = PathBuf::from(&rank.temp_dir);
            for p in private::remove_stale_siblings(&dir) {
                info!(
                    "removed {}: left by a launcher of yours that is gone",
                    p.display()
                );
            }
            let state = private::private_dir(&dir).map_err(|e| {
                format!("ray.temp_dir: {e}; give ray.temp_dir a path of its own, which ray-launch creates (0700) and removes, or make that directory yours with mode 0700 (then only what the job puts there is removed)")
            })?;
            if state == DirState::Created {
                reaper.tell(&Note::Dir(rank.temp_dir.clone()));
                // held until this process is gone: a later launcher then knows it is stale
                self.dir_lock = Some(
                    private::lock_dir(&dir)
                        .map_err(|e| format!("cannot lock {}: {e}", dir.display()))?,
                );
            }
            self.temp_dir = Some((dir, state));
            if let (Some(f), Some(token)) = (&rank.ray_token_file, &self.secrets.ray_token) {
                private::write_atomic(Path::new(f), token.as_bytes())
                    .map_err(|e| format!("cannot write the Ray token file {f}: {e}"))?;
            }
        }
        self.reaper = Some(reaper);
        self.plan = Some(plan);
        Ok(())
    }

    /// Start this rank's command of `kind` and what watches it; `Err` = the event to report.
    fn start(&mut self, kind: Kind, slot: usize) -> Result<(), Event> {
        let plan = self.plan.as_ref().expect("started only once planned");
        let rank = &plan.ranks[self.me];
        let side_by_side = plan.slots_on(self.me) > 1 && kind.of_replica();
        let Some(cmd) = rank.command_in(kind, slot) else {
            return Err(Event::Failed {
                code: exit::INTERNAL,
                reason: format!(
                    "the master asked for `{kind}`, which this rank's plan does not have"
                ),
                kind: Some(kind),
                slot,
            });
        };
        let secret = |s: &plan::Secret| match s {
            plan::Secret::ApiKey => self.secrets.api_key.clone().ok_or_else(|| Event::Failed {
                code: exit::INTERNAL,
                reason: format!("{kind} needs the job's API key, which this rank does not have"),
                kind: Some(kind),
                slot,
            }),
        };
        if !cmd.non_carry_over.is_empty() {
            write_non_carry_over(cmd, rank.temp_dir.as_str()).map_err(|reason| Event::Failed {
                code: exit::LAUNCH_FAILURE,
                reason,
                kind: Some(kind),
                slot,
            })?;
        }
        let mut env = cmd.env.clone();
        for (k, s) in &cmd.secret_env {
            env.insert(k.clone(), secret(s)?);
        }
        let mut argv = cmd.argv.clone();
        if argv[0] == plan::LAUNCHER {
            // the router and other launcher subcommands: this very binary
            if let Ok(exe) = std::env::current_exe() {
                argv[0] = exe.display().to_string();
            }
        }
        for (flag, s) in &cmd.secret_args {
            argv.push(flag.clone());
            argv.push(secret(s)?);
        }
        // the endpoints go first; what the user's shell had stays
        for k in [crate::env_vars::NO_PROXY, crate::env_vars::NO_PROXY_LOWER] {
            if let (Some(v), Ok(old)) = (env.get_mut(k), std::env::var(k)) {
                if !old.is_empty() {
                    v.push(',');
                    v.push_str(&old);
                }
            }
        }
        let log = (cmd.lifecycle.output == Output::LogFile).then(|| {
            let name = if side_by_side {
                format!("{kind}-{slot}")
            } else {
                kind.to_string()
            };
            self.log_dir.join(format!(
                "{}{}.{name}.log",
                rank.node, self.settings.step_suffix
            ))
        });
        if let Some(l) = &log {
            let header = format!(
                "=== ray-launch: starting {kind} on {} at {}\n=== {}\n",
                rank.node,
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                cmd.shell()
            );
            let _ = private::open_append(l)
                .and_then(|mut f| std::io::Write::write_all(&mut f, header.as_bytes()));
        }
        // a restarted command appends to its log: only what it writes now counts
        let from = log
            .as_ref()
            .and_then(|l| std::fs::metadata(l).ok())
            .map_or(0, |m| m.len());
        let out = match &log {
            Some(l) => proc::Output::Log(l),
            None => proc::Output::Inherit,
        };
        let mut child = proc::spawn(&argv, &env, out).map_err(|e| Event::Failed {
            code: exit::LAUNCH_FAILURE,
            reason: format!("cannot start {kind} (`{}`): {e}", cmd.argv[0]),
            kind: Some(kind),
            slot,
        })?;
        let pid = child.id().map_or(0, |p| p as i32);
        info!(
            "started {kind} (pid {pid}){}",
            log.as_ref()
                .map(|l| format!(", log {}", l.display()))
                .unwrap_or_default()
        );
        let tx = Reports {
            tx: self.local_tx.clone(),
            slot,
            epoch: self.epochs.get(&slot).copied().unwrap_or(0),
        };
        let log2 = log.clone();
        let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended2 = ended.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                ended2.store(true, std::sync::atomic::Ordering::SeqCst);
                let (desc, code) = proc::describe(&status);
                // Slurm signals every process of the step, in no particular order: a child
                // that a SIGTERM ended (or that exited on it) may go before this launcher has
                // seen its own. Wait a moment, so that a stop is not reported as a failure.
                if code != 128 + libc::SIGKILL {
                    tokio::time::sleep(EXIT_SETTLE).await;
                }
                let tail = log2
                    .as_deref()
                    .map(|l| proc::log_tail(l, 5))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| t.chars().take(500).collect())
                    .collect();
                let _ = tx.send(Event::Exited {
                    kind,
                    slot,
                    status: desc,
                    code,
                    log: log2.map(|l| l.display().to_string()),
                    tail,
                });
            }
        });
        let tx = Reports {
            tx: self.local_tx.clone(),
            slot,
            epoch: self.epochs.get(&slot).copied().unwrap_or(0),
        };
        match &cmd.lifecycle.ready {
            Ready::LogLine { text } => {
                let (l, text) = (
                    log.clone().expect("a log-line command logs to a file"),
                    text.clone(),
                );
                let daemons = cmd.lifecycle.daemons.clone();
                self.watchers.push((
                    kind,
                    slot,
                    tokio::spawn(async move {
                        if watch_log(&l, &text, from).await {
                            let _ = tx.send(Event::Up(kind, slot));
                            watch_daemons(kind, pid, &daemons, &l, ended, tx).await;
                        }
                    }),
                ));
            }
            Ready::Http { url } => {
                let h = &self.settings.health;
                let engine = self
                    .plan
                    .as_ref()
                    .map_or(crate::input::config::Engine::Vllm, |p| {
                        p.model_of_rank(self.me).engine
                    });
                let probe = Probe {
                    url: url.clone(),
                    every: h.interval,
                    failures: h.failures,
                    timeout: crate::plan::lifecycle::probe_timeout(engine),
                    stall: h.stall_timeout,
                };
                if let Some(l) = log.clone() {
                    let tx = Reports {
                        tx: self.local_tx.clone(),
                        slot,
                        epoch: tx.epoch,
                    };
                    self.watchers
                        .push((kind, slot, tokio::spawn(watch_phases(l, from, kind, tx))));
                }
                self.watchers
                    .push((kind, slot, tokio::spawn(health(kind, probe, pid, tx))));
            }
            Ready::Spawned => {
                let _ = tx.send(Event::Up(kind, slot));
            }
            Ready::Untracked => {}
        }
        self.procs.push(Running {
            kind,
            slot,
            stage: cmd.lifecycle.stage,
            pid,
        });
        if let Some(r) = self.reaper.as_mut() {
            r.tell(&Note::Session(pid));
        }
        Ok(())
    }

    /// `failure`: the job failed (a process or a node is gone), so no request can still
    /// complete: the engine gets SIGTERM but at most `FAILURE_GRACE`, not the full grace.
    fn begin_teardown(&mut self, failure: bool) {
        if self.teardown.is_some() {
            return;
        }
        let grace = if failure {
            self.settings.timeouts.shutdown_grace.min(FAILURE_GRACE)
        } else {
            self.settings.timeouts.shutdown_grace
        };
        for (_, _, w) in self.watchers.drain(..) {
            w.abort();
        }
        // what a reset under way is stopping is stopped again with the rest
        let mut procs = std::mem::take(&mut self.procs);
        procs.append(&mut self.resetting);
        self.teardown = Some(Box::pin(teardown(
            procs,
            grace,
            self.kill_rx.clone(),
            self.temp_dir.take(),
            self.leftovers_before.clone(),
        )));
    }
}

impl Shell {
    /// Stop this rank's processes of its replica (Ray, engine) the way a failed job's are
    /// stopped (SIGTERM with `FAILURE_GRACE`, then SIGKILL; Ray's at once); the router and
    /// the client go on. Their reports from now on are stale.
    fn begin_reset(&mut self, slot: usize) {
        if self.teardown.is_some() {
            return;
        }
        *self.epochs.entry(slot).or_default() += 1;
        let ours = |k: Kind, s: usize| k.of_replica() && s == slot;
        self.watchers.retain(|(k, s, w)| {
            if ours(*k, *s) {
                w.abort();
            }
            !ours(*k, *s)
        });
        let (gone, keep): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| ours(p.kind, p.slot));
        self.procs = keep;
        self.resetting.extend(gone.iter().cloned());
        let grace = self.settings.timeouts.shutdown_grace.min(FAILURE_GRACE);
        let (kill, done) = (self.kill_rx.clone(), self.reset_tx.clone());
        tokio::spawn(async move {
            stop_stages(gone, grace, kill).await;
            let _ = done.send(slot);
        });
    }

    /// A report from a watcher, unless it is about a process a reset stopped.
    fn fresh(&self, slot: usize, epoch: u64, ev: Event) -> Option<Event> {
        let now = self.epochs.get(&slot).copied().unwrap_or(0);
        let stale = epoch < now && event_kind(&ev).is_none_or(Kind::of_replica);
        (!stale).then_some(ev)
    }
}

/// How joining the master ended.
enum Joined {
    Ok {
        conn: Connection<ToRank>,
        key: Option<JobKey>,
        port: u16,
    },
    Refused {
        code: i32,
        reason: String,
    },
    Signal(i32),
    GaveUp(String),
}

/// How one attempt to join ended, short of joining.
enum Failed {
    /// Nothing useful answered (refused, closed early): retried without a word.
    Quiet(String),
    /// Something answered that is not this step's master: logged each time, with its address.
    Loud(String),
    /// The (verified) master refused this rank: exit with this code.
    Refused(i32, String),
}

/// What a rank needs to join.
struct JoinCtx<'a> {
    hello: &'a Hello,
    auth: &'a Auth,
    user_timeout: Duration,
}

/// Connect to `target`, check its challenge, say hello with a proof, and check the master's
/// answer. Only a verified `Accepted` joins; a verified `Refused` ends the rank.
async fn attempt(
    target: &str,
    j: &JoinCtx<'_>,
) -> Result<(Connection<ToRank>, Option<JobKey>), Failed> {
    use Failed::{Loud, Quiet};
    let st = match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return Err(Quiet(e.to_string())),
        Err(_) => return Err(Quiet("no answer within 3s".into())),
    };
    channel::tune(&st, j.user_timeout);
    // the challenge and the answer under the small limit, what follows (a Welcome) under the large
    let mut c = Connection::<ToRank>::with_limit(
        st,
        channel::Limit::staged(channel::PRE_AUTH_LINE, 2, channel::MAX_TO_RANK),
    );
    let (master_nonce, job_nonce) = match tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
    {
        Ok(Ok(ToRank::Challenge {
            protocol,
            nonce,
            job_nonce,
        })) => {
            if protocol != channel::PROTOCOL {
                return Err(Loud(format!("{target} speaks launcher channel protocol {protocol}, this rank {}: use one ray-launch binary for the whole step", channel::PROTOCOL)));
            }
            (nonce, job_nonce)
        }
        Ok(Ok(_)) => {
            return Err(Loud(format!(
                "{target} did not start with a challenge: not a ray-launch master"
            )))
        }
        Ok(Err(e)) => return Err(Quiet(format!("{target} closed the connection ({e})"))),
        Err(_) => {
            return Err(Loud(format!(
                "{target} sent no challenge within 10s: not a ray-launch master"
            )))
        }
    };
    let mut h = j.hello.clone();
    h.nonce = crate::auth::random_hex();
    let hd = h.digest_without_proof();
    h.proof = j
        .auth
        .rank_proof(&h.binding(&hd, &master_nonce, &job_nonce))
        .await
        .map_err(|e| Loud(format!("cannot make this rank's proof: {e}")))?;
    c.sender.send(&ToMaster::Hello(Box::new(h.clone())));
    let b = h.binding(&hd, &master_nonce, &job_nonce);
    match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
        Ok(Ok(ToRank::Accepted { proof })) => {
            match j.auth.check_master(&b, channel::ACCEPTED, proof.as_deref()).await {
                Ok(key) => Ok((c, key)),
                Err(why) => Err(Loud(format!("{target} answered as the master, but {why}"))),
            }
        }
        Ok(Ok(ToRank::Refused {
            code,
            reason,
            proof,
        })) => {
            let outcome = channel::refused_outcome(code, &reason);
            match j.auth.check_master(&b, &outcome, proof.as_deref()).await {
                Ok(_) => Err(Failed::Refused(
                    if (1..=255).contains(&code) { code } else { exit::INTERNAL },
                    reason,
                )),
                Err(why) => Err(Loud(format!(
                    "{target} refused this rank, but {why}; ignored"
                ))),
            }
        }
        Ok(Ok(_)) => Err(Loud(format!(
            "{target} answered the hello with something else: not this step's master"
        ))),
        Ok(Err(e)) => Err(Loud(format!("{target} closed the connection after the hello ({e}): another job's or step's launcher, or a master that could not verify this rank"))),
        Err(_) => Err(Loud(format!("{target} did not answer the hello within 30s"))),
    }
}

/// Join the master: try each candidate address in turn, with back-off, until the rendezvous
/// deadline; a signal ends the attempt.
async fn join(
    targets: &[(String, u16)],
    j: &JoinCtx<'_>,
    master: &str,
    rendezvous: Duration,
    sigs: &mut mpsc::UnboundedReceiver<i32>,
) -> Joined {
    let deadline = Instant::now() + rendezvous;
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    let mut last = String::new();
    loop {
        for (addr, port) in targets {
            tries += 1;
            let target = format!("{addr}:{port}");
            tokio::select! {
                r = attempt(&target, j) => match r {
                    Ok((conn, key)) => return Joined::Ok { conn, key, port: *port },
                    Err(Failed::Refused(code, reason)) => return Joined::Refused { code, reason },
                    Err(Failed::Loud(why)) => {
                        warn!("{why}");
                        last = why;
                    }
                    Err(Failed::Quiet(why)) => last = why,
                },
                Some(sig) = sigs.recv() => return Joined::Signal(sig),
            }
        }
        if Instant::now() + backoff >= deadline {
            let shown: Vec<String> = targets.iter().map(|(a, p)| format!("{a}:{p}")).collect();
            return Joined::GaveUp(format!(
                "cannot join the master {master} at {} within {} (timeouts.rendezvous; {tries} tries, last: {last}); is its launcher running, and is the address reachable from {}?",
                shown.join(" or "),
                humantime::format_duration(rendezvous),
                j.hello.node
            ));
        }
        if tries <= targets.len() as u32 || tries.is_multiple_of(20 * targets.len() as u32) {
            info!("waiting for the master {master} ({last})");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            Some(sig) = sigs.recv() => return Joined::Signal(sig),
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The ports from the config that do not come from the block (`ray.port`, `server.port`).
fn fixed_ports(s: &Settings) -> Vec<u16> {
    s.policy.fixed_ports.clone()
}

/// Run this rank until its exit code. `preview` is the plan from this node's own view (it
/// gives the master's address; the real plan comes with the Welcome).
pub async fn run(
    g: Gathered,
    preview: Plan,
    security: Security,
    mut sigs: mpsc::UnboundedReceiver<i32>,
) -> i32 {
    let me = g.step.self_rank.unwrap_or(0);
    let node = g.step.nodes[me].clone();
    let s = g.settings.clone();
    let candidates = plan::step_blocks(&g.step, s.port_range);

    // ---- the master also runs the coordinator; bind first so a port clash fails fast
    let mut coord_done: Option<oneshot::Receiver<()>> = None;
    let mut channel_port = None;
    if me == 0 {
        let mut taken = Vec::new();
        for &c in &candidates {
            match coordinator::bind(c).await {
                Ok(l) => {
                    let (tx, rx) = oneshot::channel();
                    tokio::spawn(coordinator::serve(
                        l,
                        s.clone(),
                        g.step.clone(),
                        Auth::for_master(security.method.clone()),
                        tx,
                    ));
                    coord_done = Some(rx);
                    channel_port = Some(c);
                    break;
                }
                Err(e) => taken.push(format!("{c} ({e}; held by {})", ports::holder(c))),
            }
        }
        if channel_port.is_none() {
            error!("cannot listen on any of this step's launcher channel ports: {}; other jobs on this node hold them (see ports.range)", taken.join(", "));
            return exit::LAUNCH_FAILURE;
        }
        if !taken.is_empty() {
            warn!(
                "launcher channel port(s) taken on this node: {}; using {}",
                taken.join(", "),
                channel_port.unwrap_or(0)
            );
        }
    }
    let busy = ports::busy_blocks(&candidates, &fixed_ports(&s));
    for b in &busy {
        info!("port block {} is not free here: {}", b.base, b.why);
    }
    let hello = Hello {
        protocol: channel::PROTOCOL,
        job_id: g.step.job_id.clone(),
        step_id: g.step.step_id.clone(),
        node: node.clone(),
        node_rank: me,
        version: env!("CARGO_PKG_VERSION").to_string(),
        digest: s.digest.clone(),
        settings_digests: s.agreed_digests(),
        info: g.nodes[me].clone(),
        busy,
        nonce: String::new(),
        proof: None,
    };
    let mut m = RankMachine::new(
        node.clone(),
        preview.master.node.clone(),
        s.health.heartbeat_interval,
        s.health.heartbeat_timeout,
        s.timeouts.rendezvous,
        Instant::now(),
    );
    let (local_tx, mut local_rx) = mpsc::unbounded_channel::<(usize, u64, Event)>();
    let (reset_tx, mut reset_rx) = mpsc::unbounded_channel::<usize>();
    let (kill_tx, kill_rx) = watch::channel(false);
    let mut sh = Shell {
        settings: s.clone(),
        step: g.step.clone(),
        me,
        node: node.clone(),
        sender: None,
        plan: None,
        log_dir: PathBuf::from(&s.log_dir),
        reaper: None,
        procs: Vec::new(),
        watchers: Vec::new(),
        local_tx,
        epochs: Default::default(),
        resetting: Vec::new(),
        reset_tx,
        kill_tx,
        kill_rx,
        leftovers_before: leftover_candidates(),
        teardown: None,
        secrets: Secrets::default(),
        channel_port: None,
        temp_dir: None,
        dir_lock: None,
    };

    // ---- join: the master's own rank over loopback, the others try each candidate port
    let targets: Vec<(String, u16)> = match channel_port {
        Some(p) => vec![("127.0.0.1".to_string(), p)],
        None => candidates
            .iter()
            .map(|c| (preview.master.address.clone(), *c))
            .collect(),
    };
    let auth = Auth::new(security.method.clone());
    let j = JoinCtx {
        hello: &hello,
        auth: &auth,
        user_timeout: s.health.heartbeat_timeout,
    };
    let (mut from_master, flush) = match join(
        &targets,
        &j,
        &preview.master.node,
        s.timeouts.rendezvous,
        &mut sigs,
    )
    .await
    {
        Joined::Ok { conn, key, port } => {
            if let Some(k) = key {
                sh.secrets = Secrets {
                    api_key: Some(security.user_api_key.clone().unwrap_or_else(|| k.api_key())),
                    ray_token: Some(k.ray_token()),
                };
            }
            sh.channel_port = (port != candidates[0]).then_some(port);
            let (rx, sender, flush) = conn.split();
            sh.sender = Some(sender);
            (rx, flush)
        }
        Joined::Refused { code, reason } => {
            return finish(sh, &mut m, Input::Refused { code, reason }).await;
        }
        Joined::Signal(sig) => {
            return finish(sh, &mut m, Input::Signal(sig)).await;
        }
        Joined::GaveUp(why) => {
            return finish(sh, &mut m, Input::Unreachable(why)).await;
        }
    };
    let mut next = Some(Input::Connected);
    let mut hb = tokio::time::interval(s.health.heartbeat_interval);
    loop {
        if let Some(done) = next.take().and_then(|input| sh.drive(&mut m, input)) {
            if m.master_silent() {
                proc::wake_step(
                    &sh.step,
                    std::slice::from_ref(&m.master),
                    Duration::from_secs(2),
                )
                .await;
            }
            return end(sh, done, Some(flush), coord_done).await;
        }
        // what arrived goes first, the clock last: a queued message from the master counts
        // before its silence is judged
        next = tokio::select! {
            biased;
            Some(sig) = sigs.recv() => Some(Input::Signal(sig)),
            r = from_master.recv(), if !m.master_closed() => Some(match r {
                Ok(msg) => Input::FromMaster(msg),
                Err(e) => Input::MasterLost(e.to_string()),
            }),
            Some((slot, epoch, ev)) = local_rx.recv() => sh.fresh(slot, epoch, ev).map(Input::Local),
            _ = async { sh.teardown.as_mut().expect("guarded").await }, if sh.teardown.is_some() => {
                sh.teardown = None;
                Some(Input::TornDown)
            }
            Some(slot) = reset_rx.recv() => {
                sh.resetting.retain(|p| p.slot != slot);
                Some(Input::ResetDone(slot))
            }
            _ = hb.tick() => Some(Input::Tick),
        };
    }
}

/// Exit before a connection existed.
async fn finish(mut sh: Shell, m: &mut RankMachine, input: Input) -> i32 {
    let done = sh.drive(m, input).unwrap_or((exit::INTERNAL, None));
    end(sh, done, None, None).await
}

/// The last steps: tell the reaper all is done, let the coordinator finish (on the master),
/// flush what is queued for the master, print the summary.
async fn end(
    mut sh: Shell,
    (code, summary): (i32, Option<String>),
    flush: Option<channel::Flush>,
    coord_done: Option<oneshot::Receiver<()>>,
) -> i32 {
    if let Some(r) = sh.reaper.as_mut() {
        r.tell(&Note::Done);
    }
    // what is queued for the master goes out, and the connection closes (so the coordinator
    // counts this rank as done)
    drop(sh.sender.take());
    if let Some(f) = flush {
        f.wait(Duration::from_secs(2)).await;
    }
    // the master's rank lets the coordinator finish: it may still have a stop to broadcast
    // (this rank's own failure, say) and every other rank's teardown to wait for
    if let Some(done) = coord_done {
        let wait = sh.settings.timeouts.teardown_budget + Duration::from_secs(3);
        let _ = tokio::time::timeout(wait, done).await;
    }
    if let Some(s) = summary {
        info!("{s}");
    }
    code
}

/// Wait until `needle` appears in the file (appended to by a child).
/// Only what was written from byte `from` on counts (a restarted command appends to its log).
async fn watch_log(path: &Path, needle: &str, from: u64) -> bool {
    let mut offset = from as usize;
    let mut carry = String::new();
    loop {
        // off the runtime thread, which carries the heartbeats
        if let Ok(data) = tokio::fs::read(path).await {
            if data.len() > offset {
                carry.push_str(&String::from_utf8_lossy(&data[offset..]));
                offset = data.len();
                if carry.contains(needle) {
                    return true;
                }
                let keep = carry.len().saturating_sub(needle.len());
                let cut = (0..=keep)
                    .rev()
                    .find(|i| carry.is_char_boundary(*i))
                    .unwrap_or(0);
                carry.drain(..cut);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// vLLM's non-carry-over list for Ray workers, in the engine's own config root when that is
/// inside the node's private temp dir (a `VLLM_CONFIG_ROOT` of the user's own is left alone).
fn write_non_carry_over(cmd: &plan::Command, temp_dir: &str) -> Result<(), String> {
    let Some(root) = cmd.env.get(crate::env_vars::VLLM_CONFIG_ROOT) else {
        return Ok(());
    };
    if !root.starts_with(&format!("{temp_dir}/")) {
        warn!(
            "VLLM_CONFIG_ROOT is yours ({root}): the per-node values {} are copied from the head to the Ray workers",
            cmd.non_carry_over.join(", ")
        );
        return Ok(());
    }
    let dir = Path::new(root);
    private::private_dir(dir).map_err(|e| format!("{root}: {e}"))?;
    let body = serde_json::to_vec(&cmd.non_carry_over).expect("names serialize");
    private::write_atomic(&dir.join("ray_non_carry_over_env_vars.json"), &body)
        .map_err(|e| format!("cannot write {root}/ray_non_carry_over_env_vars.json: {e}"))
}

/// A starting engine's phases, from the lines its log gains after `from` (read in pieces,
/// at most 1 MiB a time): each new one, in start order, is reported; done once it serves.
async fn watch_phases(path: PathBuf, from: u64, kind: Kind, tx: Reports) {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut offset = from;
    let mut carry = String::new();
    let mut last: Option<&'static str> = None;
    loop {
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = (&mut f).take(1 << 20).read_to_end(&mut buf).await {
                    offset += n as u64;
                    carry.push_str(&String::from_utf8_lossy(&buf));
                }
            }
        }
        // whole lines only (progress bars rewrite theirs with \r)
        while let Some(i) = carry.find(['\n', '\r']) {
            let line: String = carry.drain(..=i).collect();
            if let Some(p) = crate::run::phases::of_line(&line) {
                let later =
                    last.is_none_or(|l| crate::run::phases::rank(p) > crate::run::phases::rank(l));
                if later {
                    last = Some(p);
                    if tx.send(Event::Phase(kind, tx.slot, p)).is_err() {
                        return;
                    }
                    if p == "starting the server" {
                        return;
                    }
                }
            }
        }
        if carry.len() > 1 << 16 {
            carry.clear();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Once `kind` is up: the first of its `daemons` (in session `sid`) to exit is reported as
/// the command's end, the moment the kernel says so (pidfd), instead of when `ray start
/// --block`, which polls its children, notices.
async fn watch_daemons(
    kind: Kind,
    sid: i32,
    daemons: &[String],
    log: &Path,
    leader_ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tx: Reports,
) {
    if daemons.is_empty() {
        return;
    }
    let names: Vec<&str> = daemons.iter().map(String::as_str).collect();
    // they are started before the ready line, but give a slow /proc a moment
    let mut found = Vec::new();
    for _ in 0..50 {
        found = proc::session_named(sid, &names);
        if names.iter().all(|n| found.iter().any(|(_, c)| c == n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fds = Vec::new();
    for (pid, name) in found {
        match proc::PidFd::open(pid) {
            Ok(fd) => fds.push((pid, name, fd)),
            Err(e) => warn!("cannot watch {name} (pid {pid}) of {kind}: {e}; its death is seen when `{kind}` notices"),
        }
    }
    if fds.is_empty() {
        return;
    }
    let (pid, name) = {
        let each = fds.iter().map(|(pid, name, fd)| {
            Box::pin(async move {
                fd.exited().await;
                (*pid, name.clone())
            })
        });
        futures_util::future::select_all(each).await.0
    };
    // killing `ray start` takes its daemons along: then its own end is the news
    tokio::time::sleep(Duration::from_millis(100)).await;
    if leader_ended.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let _ = tx.send(Event::Exited {
        kind,
        slot: tx.slot,
        status: format!("its {name} (pid {pid}) is gone"),
        code: 1,
        log: Some(log.display().to_string()),
        tail: proc::log_tail(log, 5),
    });
}

/// What the engine's health watcher polls, and how.
struct Probe {
    url: String,
    every: Duration,
    failures: u32,
    timeout: Duration,
    /// `health.stall_timeout`: busy without a new token this long is a stall.
    stall: Duration,
}

/// Readiness, then liveness, of the engine's HTTP server: `/health`, and progress from its
/// `/metrics` (busy without new tokens is a stall). Proxies are ignored: cluster shells
/// often export http_proxy, and this is a local address.
async fn health(kind: Kind, p: Probe, session: i32, tx: Reports) {
    let Probe {
        url,
        every,
        failures,
        timeout,
        stall,
    } = p;
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Event::Failed {
                code: exit::INTERNAL,
                reason: format!("HTTP client: {e}"),
                kind: Some(kind),
                slot: tx.slot,
            });
            return;
        }
    };
    let probe = |c: &reqwest::Client| {
        let req = c.get(&url).send();
        async move {
            match req.await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
                Err(e) => Err(if e.is_connect() {
                    "connection refused".to_string()
                } else {
                    e.to_string()
                }),
            }
        }
    };
    while probe(&client).await.is_err() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Ready only if the engine itself answered: someone else may have bound the port first.
    let port = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| u.port_or_known_default());
    if let Some(port) = port {
        if let Err(why) = ports::held_by_session(port, session) {
            let _ = tx.send(Event::Failed {
                code: exit::LAUNCH_FAILURE,
                reason: why,
                kind: Some(kind),
                slot: tx.slot,
            });
            return;
        }
    }
    let _ = tx.send(Event::Up(kind, tx.slot));
    let mut bad = 0;
    let metrics = url.strip_suffix("/health").map(|b| format!("{b}/metrics"));
    let mut progress = crate::run::progress::Progress::new(stall);
    loop {
        tokio::time::sleep(every).await;
        if let Some(m) = &metrics {
            let sample = match client.get(m).send().await {
                Ok(r) if r.status().is_success() => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| crate::run::progress::parse(&t)),
                _ => None,
            };
            if let Some(s) = sample {
                if let Some(d) = progress.on_sample(s, std::time::Instant::now()) {
                    let _ = tx.send(Event::Failed {
                        code: exit::ENGINE_FAILURE,
                        reason: format!(
                            "engine stalled: {} request(s) running or waiting and no token generated for {} (health.stall_timeout; {} tokens so far)",
                            s.busy,
                            humantime::format_duration(Duration::from_secs(d.as_secs())),
                            s.tokens
                        ),
                        kind: Some(kind),
                        slot: tx.slot,
                    });
                    return;
                }
            }
        }
        match probe(&client).await {
            Ok(()) => bad = 0,
            Err(e) => {
                bad += 1;
                if bad >= failures {
                    let _ = tx.send(Event::Failed {
                        code: exit::ENGINE_FAILURE,
                        reason: format!(
                            "engine health check {url} failed {bad} times in a row (last: {e})"
                        ),
                        kind: Some(kind),
                        slot: tx.slot,
                    });
                    return;
                }
            }
        }
    }
}

async fn killed(mut kill: watch::Receiver<bool>) {
    loop {
        if *kill.borrow() {
            return;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Stop everything this rank started, in order, within the budget; then clean up.
async fn teardown(
    procs: Vec<Running>,
    grace: Duration,
    kill: watch::Receiver<bool>,
    temp_dir: Option<(PathBuf, DirState)>,
    leftovers_before: BTreeSet<PathBuf>,
) {
    let t0 = Instant::now();
    stop_stages(procs, grace, kill).await;
    if let Some((dir, state)) = &temp_dir {
        if let Err(e) = private::remove_created(dir, state) {
            warn!("cannot remove what the job put in {}: {e}", dir.display());
        }
    }
    let uid = nix::unistd::getuid().as_raw();
    for p in leftover_candidates().difference(&leftovers_before) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == uid) {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
    info!("teardown done in {:.1}s", t0.elapsed().as_secs_f64());
}

/// Stop `procs` stage by stage: SIGTERM and `grace` for the graceful stages, then SIGKILL
/// of their sessions.
async fn stop_stages(procs: Vec<Running>, grace: Duration, kill: watch::Receiver<bool>) {
    for stage in Stage::ORDER {
        let group: Vec<&Running> = procs
            .iter()
            .filter(|p| p.stage == stage && p.pid > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let sids: Vec<i32> = group.iter().map(|p| p.pid).collect();
        let graceful = if *kill.borrow() || !stage.graceful() {
            false
        } else {
            // Signal the process we started, not its whole group: Ray's gcs_server can hang
            // when it gets SIGTERM at the same time as `ray start`.
            for p in &group {
                proc::signal_pid(p.pid, Signal::SIGTERM);
            }
            tokio::select! {
                ok = proc::wait_sessions(&sids, grace, proc::ORPHAN_LINGER) => ok,
                _ = killed(kill.clone()) => false,
            }
        };
        if !graceful {
            let n: usize = sids
                .iter()
                .map(|s| proc::kill_session(*s, Signal::SIGKILL))
                .sum();
            if n > 0 && stage.graceful() {
                warn!("{}: {n} process(es) still running after SIGTERM (the grace of {} passed, or what it started was left orphaned): sent SIGKILL", stage.as_str(), humantime::format_duration(grace));
            }
            if !proc::wait_sessions(&sids, Duration::from_secs(3), Duration::from_secs(3)).await {
                error!(
                    "processes of the {} stage are still alive after SIGKILL",
                    stage.as_str()
                );
            }
        }
    }
}

#[cfg(test)]
mod machine_tests {
    use super::*;

    const HB: Duration = Duration::from_secs(20);
    const RDV: Duration = Duration::from_secs(300);

    /// A machine in the Running phase (connected, welcomed, planned) at `t0`.
    fn running(t0: Instant) -> RankMachine {
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        let acts = m.on(
            Input::FromMaster(ToRank::Welcome {
                nodes: vec![],
                block: 20000,
            }),
            t0,
        );
        assert_eq!(acts, [Action::BuildPlan(vec![], 20000)]);
        assert!(m.on(Input::Planned(Ok(())), t0).is_empty());
        assert_eq!(m.phase(), Phase::Running);
        m
    }

    fn exit_of(acts: &[Action]) -> Option<i32> {
        acts.iter().find_map(|a| match a {
            Action::Exit { code, .. } => Some(*code),
            _ => None,
        })
    }

    fn stop(code: i32, reason: &str) -> Input {
        Input::FromMaster(ToRank::Stop {
            code,
            reason: reason.into(),
            node: Some("node3".into()),
        })
    }

    #[test]
    fn the_rendezvous_has_a_deadline_and_watches_the_master() {
        let t0 = Instant::now();
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        // the handshake said hello already
        assert!(m.on(Input::Connected, t0).is_empty());
        assert_eq!(m.phase(), Phase::Rendezvous);
        // heartbeats from the master keep it waiting; the Welcome deadline still holds
        let mut t = t0;
        while t < t0 + RDV + HB {
            assert_eq!(exit_of(&m.on(Input::Tick, t)), None, "at {:?}", t - t0);
            m.on(Input::FromMaster(ToRank::Heartbeat), t);
            t += Duration::from_secs(5);
        }
        let acts = m.on(Input::Tick, t0 + RDV + HB);
        assert_eq!(exit_of(&acts), Some(exit::STARTUP_TIMEOUT), "{acts:?}");
        // a silent master is noticed sooner
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        assert_eq!(exit_of(&m.on(Input::Tick, t0 + HB)), None);
        assert_eq!(
            exit_of(&m.on(Input::Tick, t0 + HB + Duration::from_secs(1))),
            Some(exit::PEER_FAILURE)
        );
        // a verified refusal ends the rank with the master's code, before anything started
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        let acts = m.on(
            Input::Refused {
                code: exit::USAGE,
                reason: "connected twice".into(),
            },
            t0,
        );
        assert_eq!(exit_of(&acts), Some(exit::USAGE));
    }

    #[test]
    fn a_stall_of_the_rank_itself_is_not_the_masters_silence() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let hb = HB / 10;
        let mut t = t0 + hb;
        assert_eq!(exit_of(&m.on(Input::Tick, t)), None);
        // this launcher was stopped for ten minutes; the master's heartbeats wait unread
        t += Duration::from_secs(600);
        assert_eq!(exit_of(&m.on(Input::Tick, t)), None);
        assert!(!m.master_silent());
        // then the master stays silent while this rank runs
        let from = t;
        let mut n = 0;
        while !m.master_silent() {
            t += hb;
            m.on(Input::Tick, t);
            n += 1;
            assert!(n < 100);
        }
        // the silence counted: before the stall, one interval of the gap, and after it
        assert!(
            t - from > HB - 2 * hb && t - from <= HB - hb,
            "{:?}",
            t - from
        );
    }

    #[test]
    fn a_plan_that_cannot_be_built_is_reported_to_the_master() {
        let t0 = Instant::now();
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        let acts = m.on(Input::Planned(Err("ray.temp_dir: taken".into())), t0);
        assert!(acts.iter().any(|a| matches!(a, Action::Send(ToMaster::Failed { code: 2, reason, .. }) if reason.contains("taken"))), "{acts:?}");
        assert_eq!(exit_of(&acts), Some(exit::USAGE));
    }

    #[test]
    fn the_first_cause_wins() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let acts = m.on(stop(exit::ENGINE_FAILURE, "engine on node3 ended"), t0);
        assert!(acts.contains(&Action::Teardown));
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Error(s) if s.contains("[caused by node3]"))));
        // later causes: a signal, the master's loss, a local death, silence: no second stop
        for later in [
            Input::Signal(15),
            Input::MasterLost("closed".into()),
            Input::Local(Event::Exited {
                kind: Kind::RayWorker,
                slot: 0,
                status: "exit code 1".into(),
                code: 1,
                log: None,
                tail: vec![],
            }),
            stop(exit::PEER_FAILURE, "other"),
        ] {
            let acts = m.on(later, t0 + Duration::from_millis(10));
            assert!(
                !acts.contains(&Action::Teardown)
                    && !acts.iter().any(|a| matches!(
                        a,
                        Action::Send(ToMaster::Exited { .. } | ToMaster::Stopping { .. })
                    )),
                "{acts:?}"
            );
        }
        let acts = m.on(Input::Tick, t0 + HB * 2);
        assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)]);
        let acts = m.on(Input::TornDown, t0 + HB * 2);
        assert_eq!(acts[0], Action::Send(ToMaster::Stopped));
        assert_eq!(exit_of(&acts), Some(exit::ENGINE_FAILURE));
    }

    #[test]
    fn a_local_death_while_the_master_is_gone_stops_with_peer_failure() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let acts = m.on(Input::MasterLost("connection closed".into()), t0);
        assert!(acts.contains(&Action::Teardown));
        assert!(acts.iter().any(|a| matches!(a, Action::Error(s) if s.contains("lost the connection to the master node1"))));
        assert!(m.master_closed());
        // the engine dies during the teardown: reported nowhere, the code stays
        let acts = m.on(
            Input::Local(Event::Exited {
                kind: Kind::Engine,
                slot: 0,
                status: "signal 9 (SIGKILL)".into(),
                code: 137,
                log: None,
                tail: vec![],
            }),
            t0,
        );
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!(
            exit_of(&m.on(Input::TornDown, t0)),
            Some(exit::PEER_FAILURE)
        );
    }

    #[test]
    fn master_silence_past_the_heartbeat_timeout_stops_the_rank() {
        let t0 = Instant::now();
        let mut m = running(t0);
        // heartbeats from the master keep it alive
        m.on(Input::FromMaster(ToRank::Heartbeat), t0 + HB / 2);
        let acts = m.on(Input::Tick, t0 + HB);
        assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)]);
        // ticking every interval, as the shell does: stopped at the first tick past the timeout
        let mut t = t0 + HB;
        let acts = loop {
            t += HB / 10;
            let acts = m.on(Input::Tick, t);
            if t <= t0 + HB / 2 + HB {
                assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)], "at {:?}", t - t0);
            } else {
                break acts;
            }
        };
        assert!(acts.contains(&Action::Teardown), "{acts:?}");
        assert!(acts.iter().any(|a| matches!(a, Action::Error(s) if s.contains("the master node1 went silent: nothing for 20s"))));
        assert_eq!(
            exit_of(&m.on(Input::TornDown, t0)),
            Some(exit::PEER_FAILURE)
        );
    }

    #[test]
    fn a_signal_in_each_phase() {
        let t0 = Instant::now();
        // connecting: nothing was started, nothing to tell
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        let acts = m.on(Input::Signal(15), t0);
        assert!(!acts.iter().any(|a| matches!(a, Action::Send(_))));
        assert_eq!(exit_of(&acts), Some(143));
        // rendezvous: tell the master, exit at once
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        let acts = m.on(Input::Signal(2), t0);
        assert_eq!(acts[0], Action::Send(ToMaster::Stopping { signal: 2 }));
        assert_eq!(exit_of(&acts), Some(130));
        // running: tell the master and tear down; a repeat within 1 s is Slurm's duplicate,
        // a later one kills at once
        let mut m = running(t0);
        let acts = m.on(Input::Signal(15), t0);
        assert_eq!(acts[0], Action::Send(ToMaster::Stopping { signal: 15 }));
        assert!(acts.contains(&Action::Teardown));
        assert_eq!(m.phase(), Phase::Stopping);
        assert!(m
            .on(Input::Signal(15), t0 + Duration::from_millis(10))
            .is_empty());
        let acts = m.on(Input::Signal(15), t0 + Duration::from_secs(2));
        assert!(acts.contains(&Action::KillAll), "{acts:?}");
        assert!(!acts.contains(&Action::Teardown));
        let acts = m.on(Input::TornDown, t0 + Duration::from_secs(3));
        assert!(
            matches!(&acts[1], Action::Exit { code: 143, summary: Some(s) } if s.contains("all processes of this job on node2 are gone; exit 143")),
            "{acts:?}"
        );
        // SIGUSR1 drains: a clean stop
        let mut m = running(t0);
        m.on(Input::Signal(10), t0);
        let acts = m.on(Input::TornDown, t0);
        assert!(
            matches!(&acts[1], Action::Exit { code: 0, summary: Some(s) } if s.starts_with("done: SIGUSR1: draining")),
            "{acts:?}"
        );
    }

    #[test]
    fn a_stop_during_startup_starts_nothing_more() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let acts = m.on(
            Input::FromMaster(ToRank::Start {
                name: Kind::RayWorker,
                slot: 0,
            }),
            t0,
        );
        assert_eq!(acts, [Action::Start(Kind::RayWorker, 0)]);
        let acts = m.on(
            stop(exit::STARTUP_TIMEOUT, "ray-head on node1 did not come up"),
            t0,
        );
        assert!(acts.contains(&Action::Teardown));
        assert!(m
            .on(
                Input::FromMaster(ToRank::Start {
                    name: Kind::Engine,
                    slot: 0
                }),
                t0
            )
            .is_empty());
        // what is already running still reports (the master counts it), but nothing starts
        let acts = m.on(Input::Local(Event::Up(Kind::RayWorker, 0)), t0);
        assert!(acts.contains(&Action::Send(ToMaster::Up {
            name: Kind::RayWorker,
            slot: 0
        })));
        assert_eq!(
            exit_of(&m.on(Input::TornDown, t0)),
            Some(exit::STARTUP_TIMEOUT)
        );
    }

    #[test]
    fn a_stop_or_a_lost_master_during_the_rendezvous_exits_at_once() {
        let t0 = Instant::now();
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        assert_eq!(
            exit_of(&m.on(stop(exit::USAGE, "settings differ"), t0)),
            Some(exit::USAGE)
        );
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        assert_eq!(
            exit_of(&m.on(Input::MasterLost("closed".into()), t0)),
            Some(exit::PEER_FAILURE)
        );
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        assert_eq!(
            exit_of(&m.on(Input::Unreachable("cannot reach".into()), t0)),
            Some(exit::STARTUP_TIMEOUT)
        );
        let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
        m.on(Input::Connected, t0);
        assert_eq!(
            exit_of(&m.on(Input::Planned(Err("bad".into())), t0)),
            Some(exit::USAGE)
        );
    }

    #[test]
    fn a_client_exit_is_reported_not_a_failure_here() {
        let t0 = Instant::now();
        let mut m = running(t0);
        let acts = m.on(
            Input::Local(Event::Exited {
                kind: Kind::Client,
                slot: 0,
                status: "exit code 3".into(),
                code: 3,
                log: None,
                tail: vec![],
            }),
            t0,
        );
        assert!(matches!(&acts[0], Action::Info(s) if s == "client exited with exit code 3"));
        assert!(matches!(
            &acts[1],
            Action::Send(ToMaster::Exited { code: 3, .. })
        ));
        assert!(!acts.contains(&Action::Teardown), "the master decides");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spawn(name: &str, script: &str, log: &Path) -> Running {
        let kind: Kind = serde_json::from_value(serde_json::json!(name)).unwrap();
        let argv = vec![
            "bash".to_string(),
            "-c".to_string(),
            script.to_string(),
            name.to_string(),
            log.display().to_string(),
        ];
        let child = proc::spawn(
            &argv,
            &BTreeMap::new(),
            proc::Output::Log(&log.with_extension(format!("{name}.out"))),
        )
        .unwrap();
        let pid = child.id().unwrap() as i32;
        // reap it when it exits, as the rank's waiter task does
        tokio::spawn(async move {
            let mut c = child;
            let _ = c.wait().await;
        });
        Running {
            kind,
            slot: 0,
            stage: match kind {
                Kind::Client => Stage::Client,
                Kind::Engine => Stage::Engine,
                _ => Stage::Ray,
            },
            pid,
        }
    }

    const POLITE: &str = r#"trap 'echo "$0 $(date +%s%N)" >> "$1"; exit 0' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;
    const STUBBORN: &str = r#"trap '' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;
    /// Leaves a TERM-ignoring child in its session and exits on SIGTERM itself.
    const ORPHANING: &str = r#"(trap '' TERM; while :; do sleep 0.05; done) & trap 'echo "$0 $(date +%s%N)" >> "$1"; exit 0' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;

    async fn ready(log: &Path, names: &[&str]) {
        for n in names {
            while !log.with_extension(n).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Tear down with this grace and no temp dir; how long it took.
    async fn timed_teardown(
        procs: Vec<Running>,
        grace: Duration,
        kill: watch::Receiver<bool>,
    ) -> Duration {
        let t0 = Instant::now();
        teardown(procs, grace, kill, None, BTreeSet::new()).await;
        t0.elapsed()
    }

    #[tokio::test]
    async fn teardown_goes_client_engine_ray_and_empties_every_session() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![
            spawn("ray-head", POLITE, &log),
            spawn("engine", POLITE, &log),
            spawn("client", POLITE, &log),
        ];
        ready(&log, &["ray-head", "engine", "client"]).await;
        let sids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
        let (_kill_tx, kill_rx) = watch::channel(false);
        let temp = dir.path().join("temp");
        let state = private::private_dir(&temp).unwrap();
        teardown(
            procs,
            Duration::from_secs(5),
            kill_rx,
            Some((temp.clone(), state)),
            BTreeSet::new(),
        )
        .await;
        let order: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        // the client and the engine stop gracefully, in order; Ray's daemons are SIGKILLed
        // (they never see a SIGTERM), last
        assert_eq!(order, ["client", "engine"]);
        assert!(sids.iter().all(|s| proc::session_members(*s).is_empty()));
        assert!(!temp.exists(), "the temp dir is removed");
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![spawn("engine", STUBBORN, &log)];
        ready(&log, &["engine"]).await;
        let sid = procs[0].pid;
        let (_kill_tx, kill_rx) = watch::channel(false);
        let took = timed_teardown(procs, Duration::from_millis(1500), kill_rx).await;
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert!(proc::session_members(sid).is_empty());
    }

    #[tokio::test]
    async fn orphans_are_killed_soon_after_their_parent_exits() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![spawn("engine", ORPHANING, &log)];
        ready(&log, &["engine"]).await;
        let sid = procs[0].pid;
        let (_kill_tx, kill_rx) = watch::channel(false);
        let took = timed_teardown(procs, Duration::from_secs(20), kill_rx).await;
        assert!(
            took < Duration::from_secs(5),
            "did not wait the whole grace: {took:?}"
        );
        assert!(proc::session_members(sid).is_empty());
    }

    #[tokio::test]
    async fn a_second_signal_kills_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![
            spawn("engine", STUBBORN, &log),
            spawn("ray-head", STUBBORN, &log),
        ];
        ready(&log, &["engine", "ray-head"]).await;
        let sids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
        let (kill_tx, kill_rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = kill_tx.send(true);
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let took = timed_teardown(procs, Duration::from_secs(30), kill_rx).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(sids.iter().all(|s| proc::session_members(*s).is_empty()));
    }
}
