//! What every rank runs (the master too, over loopback): connect to the coordinator, say
//! hello, start the commands the master names, report their readiness and death, send
//! heartbeats, and tear down in order when told to stop or signalled.
//!
//! [`RankMachine`] makes every decision, purely, like the master's `Coord`: an [`Input`] (a
//! signal, a message from the master, a local process event, a heartbeat tick) and an explicit
//! `now` in, [`Action`]s out. [`run`] is the thin async shell around it: it owns the
//! connection, the children, the reaper and the teardown, and does what the actions say.
//!
//! Teardown follows the plan's stages (client, engine, Ray). Each stage: SIGTERM to the
//! process we started, wait up to `timeouts.shutdown_grace` for its whole session to be gone,
//! then SIGKILL the session. A second signal (after the duplicate window) SIGKILLs everything.

use crate::exit;
use crate::input::gather::Gathered;
use crate::input::settings::Settings;
use crate::plan::lifecycle::{self, Ending, Kind, Output, Ready, Stage};
use crate::plan::{self, NodeInfo, Plan};
use crate::run::channel::{self, Connection, Hello, ToMaster, ToRank};
use crate::run::coordinator;
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
    /// It reached its ready point (the plan's `lifecycle.ready`).
    Up(Kind),
    /// It ended: `status` in words, the exit code it maps to, its log and last lines.
    Exited {
        kind: Kind,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    },
    /// Something else failed here: a spawn, the health checks.
    Failed { code: i32, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The connection to the master is open.
    Connected,
    /// Gave up reaching the master (the rendezvous deadline passed); why, in words.
    Unreachable(String),
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(ToMaster),
    /// Build the plan from every rank's facts, then report `Input::Planned`.
    BuildPlan(Vec<NodeInfo>),
    /// Start this rank's command of this kind.
    Start(Kind),
    /// Stop everything this rank started, stage by stage; report `Input::TornDown`.
    Teardown,
    /// SIGKILL every session of this rank now (the teardown goes on and reports as usual).
    KillAll,
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
    hello: Hello,
    master: String,
    esc: Escalation,
    /// The first cause of the stop: (exit code, reason). Later causes do not change it.
    stopping: Option<(i32, String)>,
    master_closed: bool,
    last_master: Instant,
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
    /// `hello` is what this rank says once connected; `master` the master's node name.
    pub fn new(hello: Hello, master: String, heartbeat_timeout: Duration, now: Instant) -> Self {
        RankMachine {
            phase: Phase::Connecting,
            hello,
            master,
            esc: Escalation::default(),
            stopping: None,
            master_closed: false,
            last_master: now,
            heartbeat_timeout,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection to the master is gone (nothing more will come from it).
    pub fn master_closed(&self) -> bool {
        self.master_closed
    }

    fn node(&self) -> &str {
        &self.hello.node
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
            Phase::Connecting => self.connecting(input),
            Phase::Rendezvous => self.rendezvous(input, now),
            Phase::Running | Phase::Stopping => self.running(input, now),
        }
    }

    fn connecting(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Connected => {
                self.phase = Phase::Rendezvous;
                vec![Action::Send(ToMaster::Hello(Box::new(self.hello.clone())))]
            }
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
            Input::FromMaster(ToRank::Welcome { nodes }) => vec![Action::BuildPlan(nodes)],
            Input::FromMaster(ToRank::Stop { code, reason, node }) => vec![
                report_stop(code, &reason, node.as_deref()),
                Action::Exit {
                    code,
                    summary: None,
                },
            ],
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
                    ToRank::Start { name } if self.stopping.is_none() => {
                        acts.push(Action::Start(name));
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
            Input::Local(Event::Up(kind)) => {
                acts.push(Action::Info(format!("{kind} is up")));
                acts.push(Action::Send(ToMaster::Up { name: kind }));
            }
            Input::Local(Event::Failed { code, reason }) => {
                if self.stopping.is_none() {
                    acts.push(Action::Error(reason.clone()));
                    acts.push(Action::Send(ToMaster::Failed { code, reason }));
                }
            }
            Input::Tick => {
                acts.push(Action::Send(ToMaster::Heartbeat));
                if self.stopping.is_none()
                    && now.duration_since(self.last_master) > self.heartbeat_timeout
                {
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
            Input::Connected | Input::Unreachable(_) | Input::Planned(_) => {}
        }
        acts
    }
}

// ------------------------------------------------------------------ the async shell

/// A process this rank started: its teardown stage and its pid (= its session's id).
struct Running {
    stage: Stage,
    pid: i32,
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
    watchers: Vec<JoinHandle<()>>,
    local_tx: mpsc::UnboundedSender<Event>,
    kill_tx: watch::Sender<bool>,
    kill_rx: watch::Receiver<bool>,
    leftovers_before: BTreeSet<PathBuf>,
    teardown: Option<Pin<Box<dyn Future<Output = ()>>>>,
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
                    Action::BuildPlan(nodes) => {
                        queue.push_back(Input::Planned(self.build_plan(&nodes)))
                    }
                    Action::Start(kind) => {
                        if let Err(ev) = self.start(kind) {
                            queue.push_back(Input::Local(ev));
                        }
                    }
                    Action::Teardown => self.begin_teardown(),
                    Action::KillAll => {
                        let _ = self.kill_tx.send(true);
                    }
                    Action::Info(s) => info!("{s}"),
                    Action::Warn(s) => warn!("{s}"),
                    Action::Error(s) => error!("{s}"),
                    Action::Exit { code, summary } => return Some((code, summary)),
                }
            }
        }
        None
    }

    fn build_plan(&mut self, nodes: &[NodeInfo]) -> Result<(), String> {
        let plan = plan::build(&self.settings, &self.step, nodes).map_err(|e| e.report())?;
        if let Err(e) = std::fs::create_dir_all(&self.log_dir) {
            warn!("cannot create log dir {}: {e}", self.log_dir.display());
        }
        let mut reaper = Reaper::start(
            &self.log_dir.join(format!("{}.reaper.log", self.node)),
            self.settings.timeouts.shutdown_grace,
        );
        reaper.tell(&Note::Dir(plan.ranks[self.me].temp_dir.clone()));
        self.reaper = Some(reaper);
        self.plan = Some(plan);
        Ok(())
    }

    /// Start this rank's command of `kind` and what watches it; `Err` = the event to report.
    fn start(&mut self, kind: Kind) -> Result<(), Event> {
        let plan = self.plan.as_ref().expect("started only once planned");
        let rank = &plan.ranks[self.me];
        let Some(cmd) = rank.command(kind) else {
            return Err(Event::Failed {
                code: exit::INTERNAL,
                reason: format!(
                    "the master asked for `{kind}`, which this rank's plan does not have"
                ),
            });
        };
        let log = (cmd.lifecycle.output == Output::LogFile)
            .then(|| self.log_dir.join(format!("{}.{kind}.log", rank.node)));
        if let Some(l) = &log {
            let header = format!(
                "=== ray-launch: starting {kind} on {} at {}\n=== {}\n",
                rank.node,
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                cmd.shell()
            );
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(l)
                .and_then(|mut f| std::io::Write::write_all(&mut f, header.as_bytes()));
        }
        let out = match &log {
            Some(l) => proc::Output::Log(l),
            None => proc::Output::Inherit,
        };
        let mut child = proc::spawn(&cmd.argv, &cmd.env, out).map_err(|e| Event::Failed {
            code: exit::LAUNCH_FAILURE,
            reason: format!("cannot start {kind} (`{}`): {e}", cmd.argv[0]),
        })?;
        let pid = child.id().map_or(0, |p| p as i32);
        info!(
            "started {kind} (pid {pid}){}",
            log.as_ref()
                .map(|l| format!(", log {}", l.display()))
                .unwrap_or_default()
        );
        let tx = self.local_tx.clone();
        let log2 = log.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let (desc, code) = proc::describe(&status);
                let tail = log2
                    .as_deref()
                    .map(|l| proc::log_tail(l, 5))
                    .unwrap_or_default();
                let _ = tx.send(Event::Exited {
                    kind,
                    status: desc,
                    code,
                    log: log2.map(|l| l.display().to_string()),
                    tail,
                });
            }
        });
        let tx = self.local_tx.clone();
        match &cmd.lifecycle.ready {
            Ready::LogLine { text } => {
                let (l, text) = (
                    log.clone().expect("a log-line command logs to a file"),
                    text.clone(),
                );
                self.watchers.push(tokio::spawn(async move {
                    if watch_log(&l, &text).await {
                        let _ = tx.send(Event::Up(kind));
                    }
                }));
            }
            Ready::Http { url } => {
                let h = &self.settings.health;
                self.watchers.push(tokio::spawn(health(
                    kind,
                    url.clone(),
                    h.interval,
                    h.failures,
                    tx,
                )));
            }
            Ready::Spawned => {
                let _ = tx.send(Event::Up(kind));
            }
            Ready::Untracked => {}
        }
        self.procs.push(Running {
            stage: cmd.lifecycle.stage,
            pid,
        });
        if let Some(r) = self.reaper.as_mut() {
            r.tell(&Note::Session(pid));
        }
        Ok(())
    }

    fn begin_teardown(&mut self) {
        if self.teardown.is_some() {
            return;
        }
        for w in self.watchers.drain(..) {
            w.abort();
        }
        let temp_dir = self
            .plan
            .as_ref()
            .map(|p| p.ranks[self.me].temp_dir.clone())
            .unwrap_or_default();
        self.teardown = Some(Box::pin(teardown(
            std::mem::take(&mut self.procs),
            self.settings.timeouts.shutdown_grace,
            self.kill_rx.clone(),
            temp_dir,
            self.leftovers_before.clone(),
        )));
    }
}

enum Reached {
    Stream(tokio::net::TcpStream),
    Signal(i32),
    GaveUp(String),
}

/// Connect to the master, retrying with back-off until the rendezvous deadline; a signal
/// ends the attempt.
async fn connect(
    target: &str,
    master: &str,
    node: &str,
    rendezvous: Duration,
    sigs: &mut mpsc::UnboundedReceiver<i32>,
) -> Reached {
    let deadline = Instant::now() + rendezvous;
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    loop {
        tries += 1;
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(target),
        );
        let err = tokio::select! {
            r = attempt => match r {
                Ok(Ok(st)) => return Reached::Stream(st),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 3s".to_string(),
            },
            Some(sig) = sigs.recv() => return Reached::Signal(sig),
        };
        if Instant::now() + backoff >= deadline {
            return Reached::GaveUp(format!(
                "cannot reach the master {master} at {target} within {} (timeouts.rendezvous; {tries} tries, last: {err}); is its launcher running, and is the address reachable from {node}?",
                humantime::format_duration(rendezvous)
            ));
        }
        if tries == 1 || tries.is_multiple_of(20) {
            info!("waiting for the master {master} at {target} ({err})");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Run this rank until its exit code. `preview` is the plan from this node's own view (it
/// gives the master's address and the channel port; the real plan comes with the Welcome).
pub async fn run(g: Gathered, preview: Plan, mut sigs: mpsc::UnboundedReceiver<i32>) -> i32 {
    let me = g.step.self_rank.unwrap_or(0);
    let node = g.step.nodes[me].clone();
    let s = g.settings.clone();
    let port = preview.channel.port;

    // ---- the master also runs the coordinator; bind first so a port clash fails fast
    let mut coord_done: Option<oneshot::Receiver<()>> = None;
    if me == 0 {
        match coordinator::bind(port).await {
            Ok(l) => {
                let (tx, rx) = oneshot::channel();
                tokio::spawn(coordinator::serve(l, s.clone(), g.step.clone(), tx));
                coord_done = Some(rx);
            }
            Err(e) => {
                error!("cannot listen on the launcher channel port {port}: {e}; another job whose port block is the same (see ports.range), or a leftover launcher, holds it");
                return exit::LAUNCH_FAILURE;
            }
        }
    }
    let hello = Hello {
        protocol: channel::PROTOCOL,
        node: node.clone(),
        node_rank: me,
        version: env!("CARGO_PKG_VERSION").to_string(),
        digest: s.digest.clone(),
        info: g.nodes[me].clone(),
        proof: None,
        settings: s.agreed(),
    };
    let mut m = RankMachine::new(
        hello,
        preview.master.node.clone(),
        s.health.heartbeat_timeout,
        Instant::now(),
    );
    let (local_tx, mut local_rx) = mpsc::unbounded_channel::<Event>();
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
        kill_tx,
        kill_rx,
        leftovers_before: leftover_candidates(),
        teardown: None,
    };

    // ---- connect, retrying until the rendezvous deadline
    let target = if me == 0 {
        format!("127.0.0.1:{port}")
    } else {
        format!("{}:{port}", preview.master.address)
    };
    let (mut from_master, flush) = match connect(
        &target,
        &preview.master.node,
        &node,
        s.timeouts.rendezvous,
        &mut sigs,
    )
    .await
    {
        Reached::Stream(st) => {
            let (rx, sender, flush) = Connection::<ToRank>::new(st).split();
            sh.sender = Some(sender);
            (rx, flush)
        }
        Reached::Signal(sig) => {
            return finish(sh, &mut m, Input::Signal(sig)).await;
        }
        Reached::GaveUp(why) => {
            return finish(sh, &mut m, Input::Unreachable(why)).await;
        }
    };
    let mut next = Input::Connected;
    let mut hb = tokio::time::interval(s.health.heartbeat_interval);
    loop {
        if let Some(done) = sh.drive(&mut m, next) {
            return end(sh, done, Some(flush), coord_done).await;
        }
        let ticking = matches!(m.phase(), Phase::Running | Phase::Stopping);
        next = tokio::select! {
            Some(sig) = sigs.recv() => Input::Signal(sig),
            r = from_master.recv(), if !m.master_closed() => match r {
                Ok(msg) => Input::FromMaster(msg),
                Err(e) => Input::MasterLost(e.to_string()),
            },
            Some(ev) = local_rx.recv() => Input::Local(ev),
            _ = hb.tick(), if ticking => Input::Tick,
            _ = async { sh.teardown.as_mut().expect("guarded").await }, if sh.teardown.is_some() => {
                sh.teardown = None;
                Input::TornDown
            }
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
    if summary.is_some() {
        if let Some(done) = coord_done {
            let wait = sh.settings.timeouts.teardown_budget + Duration::from_secs(3);
            let _ = tokio::time::timeout(wait, done).await;
        }
    }
    drop(sh.sender.take());
    if let Some(f) = flush {
        f.wait(Duration::from_secs(2)).await;
    }
    if let Some(s) = summary {
        info!("{s}");
    }
    code
}

/// Wait until `needle` appears in the file (appended to by a child).
async fn watch_log(path: &Path, needle: &str) -> bool {
    let mut offset = 0usize;
    let mut carry = String::new();
    loop {
        if let Ok(data) = std::fs::read(path) {
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

/// Readiness, then liveness, of the engine's HTTP server. Proxies are ignored: cluster shells
/// often export http_proxy, and this is a local address.
async fn health(
    kind: Kind,
    url: String,
    every: Duration,
    failures: u32,
    tx: mpsc::UnboundedSender<Event>,
) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Event::Failed {
                code: exit::INTERNAL,
                reason: format!("HTTP client: {e}"),
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
    let _ = tx.send(Event::Up(kind));
    let mut bad = 0;
    loop {
        tokio::time::sleep(every).await;
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
    temp_dir: String,
    leftovers_before: BTreeSet<PathBuf>,
) {
    let t0 = Instant::now();
    for stage in Stage::ORDER {
        let group: Vec<&Running> = procs
            .iter()
            .filter(|p| p.stage == stage && p.pid > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let sids: Vec<i32> = group.iter().map(|p| p.pid).collect();
        let graceful = if *kill.borrow() {
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
            if n > 0 {
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
    if Path::new(&temp_dir).exists() {
        if let Err(e) = std::fs::remove_dir_all(&temp_dir) {
            warn!("cannot remove {temp_dir}: {e}");
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

#[cfg(test)]
mod machine_tests {
    use super::*;

    const HB: Duration = Duration::from_secs(20);

    fn hello() -> Hello {
        Hello {
            protocol: channel::PROTOCOL,
            node: "node2".into(),
            node_rank: 1,
            version: "v".into(),
            digest: "d".into(),
            info: NodeInfo {
                name: "node2".into(),
                address: "10.0.0.2".into(),
                interface: None,
                cpus: 1,
                object_store_bytes: 1,
            },
            proof: None,
            settings: serde_json::json!({}),
        }
    }

    /// A machine in the Running phase (connected, welcomed, planned) at `t0`.
    fn running(t0: Instant) -> RankMachine {
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        m.on(Input::Connected, t0);
        let acts = m.on(Input::FromMaster(ToRank::Welcome { nodes: vec![] }), t0);
        assert_eq!(acts, [Action::BuildPlan(vec![])]);
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
    fn hello_is_the_first_thing_said() {
        let t0 = Instant::now();
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        assert_eq!(
            m.on(Input::Connected, t0),
            [Action::Send(ToMaster::Hello(Box::new(hello())))]
        );
        assert_eq!(m.phase(), Phase::Rendezvous);
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
        let acts = m.on(Input::Tick, t0 + HB / 2 + HB + Duration::from_secs(1));
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
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        let acts = m.on(Input::Signal(15), t0);
        assert!(!acts.iter().any(|a| matches!(a, Action::Send(_))));
        assert_eq!(exit_of(&acts), Some(143));
        // rendezvous: tell the master, exit at once
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
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
            }),
            t0,
        );
        assert_eq!(acts, [Action::Start(Kind::RayWorker)]);
        let acts = m.on(
            stop(exit::STARTUP_TIMEOUT, "ray-head on node1 did not come up"),
            t0,
        );
        assert!(acts.contains(&Action::Teardown));
        assert!(m
            .on(Input::FromMaster(ToRank::Start { name: Kind::Engine }), t0)
            .is_empty());
        // what is already running still reports (the master counts it), but nothing starts
        let acts = m.on(Input::Local(Event::Up(Kind::RayWorker)), t0);
        assert!(acts.contains(&Action::Send(ToMaster::Up {
            name: Kind::RayWorker
        })));
        assert_eq!(
            exit_of(&m.on(Input::TornDown, t0)),
            Some(exit::STARTUP_TIMEOUT)
        );
    }

    #[test]
    fn a_stop_or_a_lost_master_during_the_rendezvous_exits_at_once() {
        let t0 = Instant::now();
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        m.on(Input::Connected, t0);
        assert_eq!(
            exit_of(&m.on(stop(exit::USAGE, "settings differ"), t0)),
            Some(exit::USAGE)
        );
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        m.on(Input::Connected, t0);
        assert_eq!(
            exit_of(&m.on(Input::MasterLost("closed".into()), t0)),
            Some(exit::PEER_FAILURE)
        );
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
        assert_eq!(
            exit_of(&m.on(Input::Unreachable("cannot reach".into()), t0)),
            Some(exit::STARTUP_TIMEOUT)
        );
        let mut m = RankMachine::new(hello(), "node1".into(), HB, t0);
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
        teardown(
            procs,
            grace,
            kill,
            "/nonexistent-rl".into(),
            BTreeSet::new(),
        )
        .await;
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
        std::fs::create_dir(&temp).unwrap();
        teardown(
            procs,
            Duration::from_secs(5),
            kill_rx,
            temp.display().to_string(),
            BTreeSet::new(),
        )
        .await;
        let order: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(order, ["client", "engine", "ray-head"]);
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
