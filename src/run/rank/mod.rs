//! What every rank runs (the master too, over loopback): connect to the master, say
//! hello, start the commands the master names, report their readiness and death, send
//! heartbeats, and tear down in order when told to stop or signalled.
//!
//! [`RankMachine`] makes every decision, purely, like the master's `Coord`: an [`Input`] (a
//! signal, a message from the master, a local process event, a heartbeat tick) and an explicit
//! `now` in, [`Action`]s out; this file holds it up to the rendezvous, [`running`] the rest.
//! The async shell around it: [`shell`] (the loop; it owns the connection, the children, the
//! reaper and the teardown, and does what the actions say), [`join`] (reaching and
//! authenticating the master), [`launch`] (a command's argv, environment and log, then its
//! spawn), [`watch`] (readiness, phases, daemons, health), [`teardown`] (stage by stage).
//!
//! Teardown follows the plan's stages (client, engine, Ray). The client and the engine:
//! SIGTERM to the process we started, wait up to `timeouts.shutdown_grace` for its whole
//! session to be gone, then SIGKILL the session. Ray's daemons (once the engine is gone):
//! SIGKILL of their sessions at once. A second signal (after the duplicate window) SIGKILLs
//! everything.

mod join;
mod launch;
mod running;
mod shell;
mod teardown;
#[cfg(test)]
mod tests;
mod watch;

pub use shell::{run, MasterHandle};

use crate::exit;
use crate::plan::lifecycle::Kind;
use crate::plan::NodeInfo;
use crate::run::channel::{ToMaster, ToRank};
use crate::run::signals::{self, Escalation};
use std::time::{Duration, Instant};

/// Why this rank stops: the exit code, and the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub code: i32,
    pub reason: String,
}

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
    Phase(Kind, usize, String),
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
    Planned(Result<(), crate::run::error::RunError>),
    Local(Event),
    /// The heartbeat interval passed.
    Tick,
    /// The teardown finished: every process of this rank is gone, but these (described),
    /// which survived SIGKILL.
    TornDown(Vec<String>),
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
    /// The first cause of the stop. Later causes do not change it.
    stopping: Option<Stop>,
    master_closed: bool,
    /// The master went silent while the job ran: what it started is still running there.
    master_silent: bool,
    last_master: Instant,
    own_stall: crate::run::stall::OwnStall,
    heartbeat_timeout: Duration,
    /// A batch job: SIGUSR1 stops it with work left (exit 9), not as a drain (0).
    batch: bool,
    /// A service job: SIGUSR1 asks for the handover to a successor instead of a stop.
    service: bool,
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
            batch: false,
            service: false,
        }
    }

    /// The job runs a batch (see [`signals::exit_code_for_job`]).
    #[must_use]
    pub fn for_batch(mut self, batch: bool) -> Self {
        self.batch = batch;
        self
    }

    /// The job is one of a service's chain (SIGUSR1: hand over, see [`Self::on_signal`]).
    #[must_use]
    pub fn for_service(mut self, service: bool) -> Self {
        self.service = service;
        self
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connection to the master is gone (nothing more will come from it).
    /// The stop is for a failure (a process, a node, a peer), not a signal or a client's end.
    pub fn stopping_for_failure(&self) -> bool {
        self.stopping
            .as_ref()
            .is_some_and(|s| exit::is_failure(s.code))
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
        self.stopping = Some(Stop { code, reason });
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
            Input::Planned(Err(e)) => vec![
                Action::Send(ToMaster::Failed {
                    code: e.exit_code(),
                    reason: e.msg.replace('\n', " "),
                    kind: None,
                    slot: 0,
                }),
                Action::Error(e.msg.clone()),
                Action::Exit {
                    code: e.exit_code(),
                    summary: None,
                },
            ],
            _ => Vec::new(),
        }
    }
}
