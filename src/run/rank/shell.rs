//! The rank's async shell: the loop that feeds the machine (signals, the master's frames,
//! what the watchers report, the teardown's end, the clock) and carries out its actions.

use super::join::{self, JoinCtx, Joined};
use super::launch::Secrets;
use super::teardown::{self, Running};
use super::watch;
use super::{Action, Event, Input, RankMachine};
use crate::auth::Auth;
use crate::exit;
use crate::input::gather::{Gathered, Security};
use crate::input::settings::Settings;
use crate::plan::lifecycle::Kind;
use crate::plan::{self, NodeInfo, Plan};
use crate::private::{self, DirState};
use crate::run::channel::{self, Hello};
use crate::run::error::{self, RunError};
use crate::run::ports;
use crate::run::preflight;
use crate::run::proc;
use crate::run::reaper::{Note, Reaper};
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch as tokio_watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

/// The master's side of this node, when this node is the master: the channel port it
/// listens on, and word when it has finished.
pub struct MasterHandle {
    pub port: u16,
    pub done: oneshot::Receiver<()>,
}

/// The engine's grace when the job failed: its endpoint is broken already (a node, a Ray
/// daemon or a process is gone), and a Ray driver whose cluster died can hang in its shutdown.
const FAILURE_GRACE: Duration = Duration::from_secs(1);

/// What the shell owns while the machine decides.
pub(super) struct Shell {
    pub(super) settings: Settings,
    step: crate::input::slurm::Step,
    pub(super) me: usize,
    node: String,
    sender: Option<channel::Sender>,
    pub(super) plan: Option<Plan>,
    pub(super) log_dir: PathBuf,
    pub(super) reaper: Option<Reaper>,
    pub(super) procs: Vec<Running>,
    pub(super) watchers: Vec<(Kind, usize, JoinHandle<()>)>,
    pub(super) local_tx: mpsc::UnboundedSender<(usize, u64, Event)>,
    /// Resets so far, per slot: events of a replica's processes from before its last reset
    /// are stale.
    pub(super) epochs: std::collections::BTreeMap<usize, u64>,
    /// What resets under way are stopping; each reports its slot on `reset_tx` when done.
    resetting: Vec<Running>,
    reset_tx: mpsc::UnboundedSender<usize>,
    kill_tx: tokio_watch::Sender<bool>,
    kill_rx: tokio_watch::Receiver<bool>,
    leftovers_before: BTreeSet<PathBuf>,
    teardown: Option<Pin<Box<dyn Future<Output = Vec<String>>>>>,
    pub(super) secrets: Secrets,
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
    fn build_plan(&mut self, nodes: &[NodeInfo], block: u16) -> Result<(), RunError> {
        let files = |msg: String| RunError::new(error::Kind::Files, msg);
        let plan = plan::build_in(&self.settings, &self.step, nodes, block, self.channel_port)
            .map_err(|e| RunError::new(error::Kind::Plan, e.report()))?;
        private::own_dir(&self.log_dir).map_err(|e| {
            files(format!("log_dir: {e}; use a log directory of your own (the default, ray-launch-{{job}}, is created 0700)"))
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
            let (gone, left) = private::remove_stale_siblings(&dir);
            for p in gone {
                info!(
                    "removed {}: left by a launcher of yours that is gone",
                    p.display()
                );
            }
            for (p, why) in left {
                warn!(
                    "left {} alone although it holds a ray-launch lock file: {why}",
                    p.display()
                );
            }
            let state = private::private_dir(&dir).map_err(|e| {
                files(format!("ray.temp_dir: {e}; give ray.temp_dir a path of its own, which ray-launch creates (0700) and removes, or make that directory yours with mode 0700 (then only what the job puts there is removed)"))
            })?;
            if state == DirState::Created {
                reaper.tell(&Note::Dir(rank.temp_dir.clone()));
                // held until this process is gone: a later launcher then knows it is stale
                self.dir_lock = Some(
                    private::lock_dir(&dir)
                        .map_err(|e| files(format!("cannot lock {}: {e}", dir.display())))?,
                );
            }
            self.temp_dir = Some((dir, state));
            if let (Some(f), Some(token)) = (&rank.ray_token_file, &self.secrets.ray_token) {
                private::write_atomic(Path::new(f), token.as_bytes())
                    .map_err(|e| files(format!("cannot write the Ray token file {f}: {e}")))?;
            }
        }
        self.reaper = Some(reaper);
        self.plan = Some(plan);
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
        self.teardown = Some(Box::pin(teardown::teardown(
            procs,
            grace,
            self.kill_rx.clone(),
            self.temp_dir.take(),
            self.leftovers_before.clone(),
            Some(
                self.reaper
                    .as_ref()
                    .and_then(|r| r.pid())
                    .into_iter()
                    .collect(),
            ),
        )));
    }

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
            teardown::stop_stages(gone, grace, kill).await;
            let _ = done.send(slot);
        });
    }

    /// A report from a watcher, unless it is about a process a reset stopped.
    fn fresh(&self, slot: usize, epoch: u64, ev: Event) -> Option<Event> {
        let now = self.epochs.get(&slot).copied().unwrap_or(0);
        let stale = epoch < now && watch::event_kind(&ev).is_none_or(Kind::of_replica);
        (!stale).then_some(ev)
    }
}

/// This rank's hello: who it is, what it found on its node, the settings it runs with.
fn hello(g: &Gathered, me: usize, busy: Vec<channel::Busy>, preflight: Vec<String>) -> Hello {
    let s = &g.settings;
    Hello {
        protocol: channel::PROTOCOL,
        job_id: g.step.job_id.clone(),
        step_id: g.step.step_id.clone(),
        node: g.step.nodes[me].clone(),
        node_rank: me,
        version: env!("CARGO_PKG_VERSION").to_string(),
        digest: s.digest.clone(),
        settings_digests: s.agreed_digests(),
        info: g.nodes[me].clone(),
        busy,
        preflight,
        master_port: 0,
        nonce: String::new(),
        proof: None,
    }
}

/// Where the shell's inner events arrive.
struct Inbox {
    local_rx: mpsc::UnboundedReceiver<(usize, u64, Event)>,
    reset_rx: mpsc::UnboundedReceiver<usize>,
}

impl Shell {
    fn new(g: &Gathered, me: usize) -> (Shell, Inbox) {
        let s = &g.settings;
        let (local_tx, local_rx) = mpsc::unbounded_channel::<(usize, u64, Event)>();
        let (reset_tx, reset_rx) = mpsc::unbounded_channel::<usize>();
        let (kill_tx, kill_rx) = tokio_watch::channel(false);
        let sh = Shell {
            settings: s.clone(),
            step: g.step.clone(),
            me,
            node: g.step.nodes[me].clone(),
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
            leftovers_before: teardown::leftover_candidates(),
            teardown: None,
            secrets: Secrets::default(),
            channel_port: None,
            temp_dir: None,
            dir_lock: None,
        };
        (sh, Inbox { local_rx, reset_rx })
    }
}

/// Run this rank until its exit code. `preview` is the plan from this node's own view (it
/// gives the master's address; the real plan comes with the Welcome). `master`: this node is
/// the master's, whose channel already listens.
pub async fn run(
    g: Gathered,
    preview: Plan,
    security: Security,
    mut sigs: mpsc::UnboundedReceiver<i32>,
    master: Option<MasterHandle>,
) -> i32 {
    let me = g.step.self_rank.unwrap_or(0);
    let s = g.settings.clone();
    let candidates = plan::step_blocks(&g.step, s.port_range);
    let busy = ports::busy_blocks(&candidates, &s.policy.fixed_ports);
    for b in &busy {
        info!("port block {} is not free here: {}", b.base, b.why);
    }
    // the node's pre-flight check: the master decides on what each rank found
    let temp_dir = preview
        .ranks
        .get(me)
        .map_or_else(|| "/tmp".to_string(), |r| r.temp_dir.clone());
    let found = preflight::node(
        g.step.cuda_visible_devices.as_deref(),
        g.nodes[me].interface.as_deref(),
        &temp_dir,
    )
    .await;
    for f in &found {
        error!("pre-flight: {f}");
    }
    let hello = hello(&g, me, busy, found);
    let mut m = RankMachine::new(
        g.step.nodes[me].clone(),
        preview.master.node.clone(),
        s.health.heartbeat_interval,
        s.health.heartbeat_timeout,
        s.timeouts.rendezvous,
        Instant::now(),
    )
    .for_batch(s.batch.is_some())
    .for_service(s.service.is_some());
    if s.service.is_some() {
        proc::children_ignore_usr1();
    }
    let (mut sh, inbox) = Shell::new(&g, me);
    let (channel_port, coord_done) = match master {
        Some(h) => (Some(h.port), Some(h.done)),
        None => (None, None),
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
    let joined = join::join(
        &targets,
        &j,
        &preview.master.node,
        s.timeouts.rendezvous,
        &mut sigs,
    )
    .await;
    let (from_master, flush) = match joined {
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
        Joined::Signal(sig) => return finish(sh, &mut m, Input::Signal(sig)).await,
        Joined::GaveUp(why) => return finish(sh, &mut m, Input::Unreachable(why)).await,
    };
    let done = sh.serve(&mut m, from_master, inbox, &mut sigs).await;
    if m.master_silent() {
        proc::wake_step(
            &sh.step,
            std::slice::from_ref(&m.master),
            Duration::from_secs(2),
        )
        .await;
    }
    end(sh, done, Some(flush), coord_done).await
}

impl Shell {
    /// The loop, from the connection on, until the machine says to exit.
    async fn serve(
        &mut self,
        m: &mut RankMachine,
        mut from_master: channel::Receiver<crate::run::channel::ToRank>,
        mut inbox: Inbox,
        sigs: &mut mpsc::UnboundedReceiver<i32>,
    ) -> (i32, Option<String>) {
        let mut next = Some(Input::Connected);
        let mut hb = tokio::time::interval(self.settings.health.heartbeat_interval);
        loop {
            if let Some(done) = next.take().and_then(|input| self.drive(m, input)) {
                return done;
            }
            // what arrived goes first, the clock last: a queued message from the master counts
            // before its silence is judged
            next = tokio::select! {
                biased;
                Some(sig) = sigs.recv() => Some(Input::Signal(sig)),
                r = from_master.recv(), if !m.master_closed() => match r {
                    Ok(msg) => Some(Input::FromMaster(msg)),
                    // someone else's bytes in the master's connection: dropped, named
                    Err(e @ channel::RecvError::Forged(_)) => {
                        warn!("from the master {}'s connection: {e}", m.master);
                        None
                    }
                    Err(e) => Some(Input::MasterLost(e.to_string())),
                },
                Some((slot, epoch, ev)) = inbox.local_rx.recv() => self.fresh(slot, epoch, ev).map(Input::Local),
                left = async { self.teardown.as_mut().expect("guarded").await }, if self.teardown.is_some() => {
                    self.teardown = None;
                    Some(Input::TornDown(left))
                }
                Some(slot) = inbox.reset_rx.recv() => {
                    self.resetting.retain(|p| p.slot != slot);
                    Some(Input::ResetDone(slot))
                }
                _ = hb.tick() => Some(Input::Tick),
            };
        }
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
