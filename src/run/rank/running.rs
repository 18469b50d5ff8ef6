//! The rank's machine once planned: starting what the master names, reporting what happens
//! to its processes, watching the master's heartbeat, and the stop.

use super::{report_stop, Action, Event, Input, RankMachine, Stop};
use crate::exit;
use crate::plan::lifecycle::{self, Ending, Kind};
use crate::run::channel::{ToMaster, ToRank};
use crate::run::signals::{self, Shutdown};
use std::time::Instant;

impl RankMachine {
    pub(super) fn running(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::Signal(sig) => self.on_signal(sig, now),
            Input::FromMaster(m) => {
                self.last_master = now;
                self.on_master(m)
            }
            Input::MasterLost(_) => {
                self.master_closed = true;
                if self.stopping.is_some() {
                    return Vec::new();
                }
                let reason = format!("lost the connection to the master {} (its launcher was killed, or its node failed)", self.master);
                let mut acts = vec![Action::Error(reason.clone())];
                acts.extend(self.stop(exit::PEER_FAILURE, reason));
                acts
            }
            Input::Local(ev) => self.local(ev),
            Input::Tick => self.tick(now),
            Input::TornDown(left) => self.torn_down(left),
            Input::ResetDone(slot) => {
                if self.stopping.is_some() {
                    return Vec::new();
                }
                vec![
                    Action::Info("the replica's processes on this node are gone".into()),
                    Action::Send(ToMaster::ResetDone { slot }),
                ]
            }
            Input::Connected
            | Input::Unreachable(_)
            | Input::Refused { .. }
            | Input::Planned(_) => Vec::new(),
        }
    }

    fn on_signal(&mut self, sig: i32, now: Instant) -> Vec<Action> {
        let mut acts = Vec::new();
        // a service job: SIGUSR1 (Slurm's `--signal=USR1@…` before the limit) starts the
        // handover now; the job serves on, and a later SIGTERM is a first one
        if sig == signals::libc_sig::USR1 && self.service && self.stopping.is_none() {
            return vec![
                Action::Send(ToMaster::HandoverNow),
                Action::Info("SIGUSR1: handing over to a successor (service)".into()),
            ];
        }
        match self.esc.on_signal(sig, now) {
            Shutdown::Graceful { signal } if self.stopping.is_none() => {
                let what = if signal == signals::libc_sig::USR1 {
                    "SIGUSR1: draining".to_string()
                } else {
                    format!("received {}: stopping", signals::name(signal))
                };
                acts.push(Action::Send(ToMaster::Stopping { signal }));
                acts.push(Action::Info(what.clone()));
                acts.extend(self.stop(signals::exit_code_for_job(signal, self.batch), what));
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
        }
        acts
    }

    fn on_master(&mut self, m: ToRank) -> Vec<Action> {
        if self.stopping.is_some() {
            return Vec::new();
        }
        match m {
            ToRank::Start { name, slot } => vec![Action::Start(name, slot)],
            ToRank::Reset { reason, slot } => vec![
                Action::Warn(format!(
                    "{reason}: stopping this node's processes of the replica (the job goes on)"
                )),
                Action::Reset(slot),
            ],
            ToRank::Stop { code, reason, node } => {
                let mut acts = vec![report_stop(code, &reason, node.as_deref())];
                acts.extend(self.stop(code, reason));
                acts
            }
            _ => Vec::new(),
        }
    }

    /// Something happened to one of this rank's processes.
    fn local(&mut self, ev: Event) -> Vec<Action> {
        match ev {
            Event::Exited {
                kind,
                slot,
                status,
                code,
                log,
                tail,
            } => self.exited(kind, slot, status, code, log, tail),
            Event::Up(kind, slot) => vec![
                Action::Info(format!("{kind} is up")),
                Action::Send(ToMaster::Up { name: kind, slot }),
            ],
            Event::Phase(kind, slot, phase) => vec![Action::Send(ToMaster::Phase {
                name: kind,
                slot,
                phase: phase.to_string(),
            })],
            Event::Failed {
                code,
                reason,
                kind,
                slot,
            } => {
                if self.stopping.is_some() {
                    return Vec::new();
                }
                vec![
                    Action::Error(reason.clone()),
                    Action::Send(ToMaster::Failed {
                        code,
                        reason,
                        kind,
                        slot,
                    }),
                ]
            }
        }
    }

    fn exited(
        &mut self,
        kind: Kind,
        slot: usize,
        status: String,
        code: i32,
        log: Option<String>,
        tail: Vec<String>,
    ) -> Vec<Action> {
        if self.stopping.is_some() {
            return Vec::new();
        }
        let mut acts = Vec::new();
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
        acts
    }

    fn tick(&mut self, now: Instant) -> Vec<Action> {
        // time the master's silence only while this process ran
        let stall = self.own_stall.on_tick(now);
        self.last_master = crate::run::stall::forgive(self.last_master, stall, now);
        let mut acts = vec![Action::Send(ToMaster::Heartbeat)];
        if self.stopping.is_none() && now.duration_since(self.last_master) > self.heartbeat_timeout
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
        acts
    }

    /// `left`: processes of the job that survived SIGKILL (checked, not assumed): named, and
    /// the exit says so.
    fn torn_down(&mut self, left: Vec<String>) -> Vec<Action> {
        let Stop { code, reason } = self.stopping.clone().unwrap_or(Stop {
            code: exit::INTERNAL,
            reason: "torn down without a cause".into(),
        });
        if !left.is_empty() {
            let code = if exit::is_failure(code) {
                code
            } else {
                exit::LEFT_BEHIND
            };
            let summary = format!(
                "{} process(es) of this job on {} survived SIGKILL: {}; exit {code}",
                left.len(),
                self.node(),
                left.join(", ")
            );
            return vec![
                Action::Error(summary),
                Action::Send(ToMaster::Stopped),
                Action::Exit {
                    code,
                    summary: None,
                },
            ];
        }
        let summary = if code == exit::SUCCESS {
            format!("done: {reason}; exit {code}")
        } else {
            format!(
                "all processes of this job on {} are gone; exit {code}",
                self.node()
            )
        };
        vec![
            Action::Send(ToMaster::Stopped),
            Action::Exit {
                code,
                summary: Some(summary),
            },
        ]
    }
}
