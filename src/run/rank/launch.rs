//! Launching one command of the plan: [`prepare`] (pure: its argv with secrets filled in, its
//! environment, its log file and the log's header) apart from the spawn and its watchers
//! ([`Shell::start`]).

use super::shell::Shell;
use super::teardown::Running;
use super::watch::{self, Probe, Reports};
use super::Event;
use crate::exit;
use crate::plan::lifecycle::{Kind, Output, Ready};
use crate::plan::{self, Plan};
use crate::private;
use crate::run::error::{self, RunError};
use crate::run::proc;
use crate::run::reaper::Note;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The secrets this rank fills into its commands (from the handshake's job key).
#[derive(Default, Clone)]
pub(super) struct Secrets {
    pub(super) api_key: Option<String>,
    pub(super) ray_token: Option<String>,
}

/// How long a child's end (but a SIGKILL) waits before it is reported: the time for this
/// launcher to see a signal Slurm sent the whole step at once.
const EXIT_SETTLE: Duration = Duration::from_millis(200);

/// One command, ready to spawn.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Launch {
    pub(super) argv: Vec<String>,
    pub(super) env: BTreeMap<String, String>,
    /// Its log file (none: it inherits the launcher's output, as the client does).
    pub(super) log: Option<PathBuf>,
    /// The lines the log gets before the command's own.
    pub(super) header: String,
}

/// What [`prepare`] needs besides the plan: this launcher's own executable, the user's
/// `NO_PROXY` values, the log dir, the step's suffix for log names, and the time in words.
pub(super) struct Here<'a> {
    pub(super) exe: Option<String>,
    pub(super) no_proxy: &'a dyn Fn(&str) -> Option<String>,
    pub(super) log_dir: &'a Path,
    pub(super) step_suffix: &'a str,
    pub(super) now: String,
}

/// `rank`'s command of `kind` in `slot`, as it will run; `Err` = the event to report.
pub(super) fn prepare(
    plan: &Plan,
    rank: usize,
    kind: Kind,
    slot: usize,
    secrets: &Secrets,
    here: &Here<'_>,
) -> Result<Launch, Event> {
    let r = &plan.ranks[rank];
    let failed = |code: i32, reason: String| Event::Failed {
        code,
        reason,
        kind: Some(kind),
        slot,
    };
    let Some(cmd) = r.command_in(kind, slot) else {
        return Err(failed(
            exit::INTERNAL,
            format!("the master asked for `{kind}`, which this rank's plan does not have"),
        ));
    };
    let secret = |s: &plan::Secret| match s {
        plan::Secret::ApiKey => secrets.api_key.clone().ok_or_else(|| {
            failed(
                exit::INTERNAL,
                format!("{kind} needs the job's API key, which this rank does not have"),
            )
        }),
    };
    let mut env = cmd.env.clone();
    // which launcher and command every process of its tree comes from (teardown, reset, reaper)
    env.insert(
        crate::env_vars::RAY_LAUNCH_PROC.into(),
        proc::tag(&kind.to_string(), slot),
    );
    for (k, s) in &cmd.secret_env {
        env.insert(k.clone(), secret(s)?);
    }
    let mut argv = cmd.argv.clone();
    if argv[0] == plan::LAUNCHER {
        // the router and other launcher subcommands: this very binary
        if let Some(exe) = &here.exe {
            argv[0] = exe.clone();
        }
    }
    for (flag, s) in &cmd.secret_args {
        argv.push(flag.clone());
        argv.push(secret(s)?);
    }
    // the endpoints go first; what the user's shell had stays
    for k in [crate::env_vars::NO_PROXY, crate::env_vars::NO_PROXY_LOWER] {
        if let (Some(v), Some(old)) = (env.get_mut(k), (here.no_proxy)(k)) {
            if !old.is_empty() {
                v.push(',');
                v.push_str(&old);
            }
        }
    }
    let side_by_side = plan.slots_on(rank) > 1 && kind.of_replica();
    let log = (cmd.lifecycle.output == Output::LogFile).then(|| {
        let name = if side_by_side {
            format!("{kind}-{slot}")
        } else {
            kind.to_string()
        };
        here.log_dir
            .join(format!("{}{}.{name}.log", r.node, here.step_suffix))
    });
    let header = format!(
        "=== ray-launch: starting {kind} on {} at {}\n=== {}\n",
        r.node,
        here.now,
        cmd.shell()
    );
    Ok(Launch {
        argv,
        env,
        log,
        header,
    })
}

impl Shell {
    /// Start this rank's command of `kind` and what watches it; `Err` = the event to report.
    pub(super) fn start(&mut self, kind: Kind, slot: usize) -> Result<(), Event> {
        let plan = self.plan.as_ref().expect("started only once planned");
        let here = Here {
            exe: std::env::current_exe()
                .ok()
                .map(|e| e.display().to_string()),
            no_proxy: &|k| std::env::var(k).ok(),
            log_dir: &self.log_dir,
            step_suffix: &self.settings.step_suffix,
            now: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        };
        let launch = prepare(plan, self.me, kind, slot, &self.secrets, &here)?;
        let rank = &plan.ranks[self.me];
        let cmd = rank.command_in(kind, slot).expect("prepared");
        if !cmd.non_carry_over.is_empty() {
            write_non_carry_over(cmd, rank.temp_dir.as_str()).map_err(|e| Event::Failed {
                code: e.exit_code(),
                reason: e.msg,
                kind: Some(kind),
                slot,
            })?;
        }
        let (ready, stage) = (cmd.lifecycle.ready.clone(), cmd.lifecycle.stage);
        let daemons = cmd.lifecycle.daemons.clone();
        let program = cmd.argv[0].clone();
        let log = launch.log.clone();
        if let Some(l) = &log {
            let _ = private::open_append(l)
                .and_then(|mut f| std::io::Write::write_all(&mut f, launch.header.as_bytes()));
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
        let child = proc::spawn(&launch.argv, &launch.env, out).map_err(|e| Event::Failed {
            code: exit::LAUNCH_FAILURE,
            reason: format!("cannot start {kind} (`{program}`): {e}"),
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
        let ended = self.wait_for(child, kind, slot, log.clone());
        self.watch_ready(kind, slot, pid, &ready, daemons, log, from, ended);
        self.procs.push(Running {
            kind,
            slot,
            stage,
            pid,
        });
        if let Some(r) = self.reaper.as_mut() {
            r.tell(&Note::Session(pid));
        }
        Ok(())
    }

    fn reports(&self, slot: usize) -> Reports {
        Reports {
            tx: self.local_tx.clone(),
            slot,
            epoch: self.epochs.get(&slot).copied().unwrap_or(0),
        }
    }

    /// Reap the child and report its end (with its log's last lines); the flag says it ended.
    fn wait_for(
        &self,
        mut child: tokio::process::Child,
        kind: Kind,
        slot: usize,
        log: Option<PathBuf>,
    ) -> Arc<AtomicBool> {
        let tx = self.reports(slot);
        let ended = Arc::new(AtomicBool::new(false));
        let ended2 = ended.clone();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                ended2.store(true, Ordering::SeqCst);
                let (desc, code) = proc::describe(&status);
                // Slurm signals every process of the step, in no particular order: a child
                // that a SIGTERM ended (or that exited on it) may go before this launcher has
                // seen its own. Wait a moment, so that a stop is not reported as a failure.
                if code != 128 + libc::SIGKILL {
                    tokio::time::sleep(EXIT_SETTLE).await;
                }
                let tail = log
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
                    log: log.map(|l| l.display().to_string()),
                    tail,
                });
            }
        });
        ended
    }

    /// What tells that the command is up (and, for the engine, alive), by its lifecycle.
    #[allow(clippy::too_many_arguments)]
    fn watch_ready(
        &mut self,
        kind: Kind,
        slot: usize,
        pid: i32,
        ready: &Ready,
        daemons: Vec<String>,
        log: Option<PathBuf>,
        from: u64,
        ended: Arc<AtomicBool>,
    ) {
        let tx = self.reports(slot);
        match ready {
            Ready::LogLine { text } => {
                let (l, text) = (
                    log.expect("a log-line command logs to a file"),
                    text.clone(),
                );
                self.watchers.push((
                    kind,
                    slot,
                    tokio::spawn(async move {
                        if watch::watch_log(&l, &text, from).await {
                            let _ = tx.send(Event::Up(kind, slot));
                            watch::watch_daemons(kind, pid, &daemons, &l, ended, tx).await;
                        }
                    }),
                ));
            }
            Ready::Http { url } => {
                let h = &self.settings.health;
                let plan = self.plan.as_ref().expect("started only once planned");
                let engine = plan.model_of_rank(self.me).engine;
                let first_token = (kind == Kind::Engine).then(|| watch::FirstToken {
                    base: url.trim_end_matches("/health").to_string(),
                    model: plan.model_of_rank(self.me).served_model_name.clone(),
                    key: self.secrets.api_key.clone(),
                    timeout: h.first_token_timeout,
                });
                let probe = Probe {
                    url: url.clone(),
                    every: h.interval,
                    failures: h.failures,
                    timeout: crate::plan::lifecycle::probe_timeout(engine),
                    stall: h.stall_timeout,
                    first_token,
                };
                if let Some(l) = log {
                    let phases = watch::watch_phases(l, from, kind, self.reports(slot));
                    self.watchers.push((kind, slot, tokio::spawn(phases)));
                }
                self.watchers.push((
                    kind,
                    slot,
                    tokio::spawn(watch::health(kind, probe, pid, tx)),
                ));
            }
            Ready::Spawned => {
                let _ = tx.send(Event::Up(kind, slot));
            }
            Ready::Untracked => {}
        }
    }
}

/// vLLM's non-carry-over list for Ray workers, in the engine's own config root when that is
/// inside the node's private temp dir (a `VLLM_CONFIG_ROOT` of the user's own is left alone).
pub(super) fn write_non_carry_over(cmd: &plan::Command, temp_dir: &str) -> Result<(), RunError> {
    let files = |msg: String| RunError::new(error::Kind::Launch, msg);
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
    private::private_dir(dir).map_err(|e| files(format!("{root}: {e}")))?;
    let body = serde_json::to_vec(&cmd.non_carry_over).expect("names serialize");
    private::write_atomic(&dir.join("ray_non_carry_over_env_vars.json"), &body).map_err(|e| {
        files(format!(
            "cannot write {root}/ray_non_carry_over_env_vars.json: {e}"
        ))
    })
}
