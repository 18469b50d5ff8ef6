//! Child processes: each in its own session (so its whole tree can be found and killed),
//! stdin from /dev/null, output to a log file, and `PR_SET_PDEATHSIG` so that a SIGKILLed
//! launcher does not leave them running.
//!
//! Also: ending a step through Slurm when a node went silent (`wake_step`, `kill_step`).
//!
//! Teardown is by session: Ray's daemons and vLLM's workers keep the session of the process
//! we started even when they change process group. Never `ray stop` (it is host-wide).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

/// Where a child's output goes.
pub enum Output<'a> {
    /// Append to this file (daemons, engines: never the task's stdout).
    Log(&'a Path),
    /// The launcher's own stdout/stderr (the client, whose output the user wants).
    Inherit,
}

/// Spawn `argv` with `env` added, in a new session. Must be called from a thread that lives
/// as long as the child should (PDEATHSIG fires when the *thread* that forked exits): the
/// launcher runs a current-thread runtime on the main thread.
/// The user's umask, given back to children (`u32::MAX`: unchanged).
static USER_UMASK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Make everything this process creates private (umask 077), remembering the user's umask
/// for the children.
pub fn private_umask() {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    USER_UMASK.store(old.bits() as u32, std::sync::atomic::Ordering::Relaxed);
}

pub fn spawn(
    argv: &[String],
    env: &BTreeMap<String, String>,
    out: Output<'_>,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(env).stdin(Stdio::null());
    match out {
        Output::Log(path) => {
            let f = crate::private::open_append(path)?;
            let f2 = f.try_clone()?;
            cmd.stdout(f).stderr(f2);
        }
        Output::Inherit => {}
    }
    let parent = nix::unistd::getpid();
    let umask = USER_UMASK.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: only async-signal-safe calls (setsid, prctl, getppid, kill) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if umask != u32::MAX {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask as _));
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            // The parent may have died between fork and prctl: then nobody would signal us.
            if nix::unistd::getppid() != parent {
                let _ = kill(nix::unistd::getpid(), Signal::SIGTERM);
            }
            Ok(())
        });
    }
    let mut tcmd = tokio::process::Command::from(cmd);
    tcmd.kill_on_drop(false);
    tcmd.spawn()
}

/// (pid, state) of every live (non-zombie) process whose session id is `sid`.
pub fn session_members(sid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // fields after the command name, which is in parentheses and may contain spaces
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] state, f[1] ppid, f[2] pgrp, f[3] session
        if f.len() > 3 && f[3] == sid.to_string() && f[0] != "Z" && f[0] != "X" {
            out.push(pid);
        }
    }
    out
}

pub fn signal_pid(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

pub fn kill_session(sid: i32, sig: Signal) -> usize {
    let pids = session_members(sid);
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), sig);
    }
    pids.len()
}

/// How long members may outlive their session's leader before they count as orphans.
pub const ORPHAN_LINGER: Duration = Duration::from_secs(1);

/// Wait until none of `sids` has a live member, or `limit` passes. True when all are empty.
/// When the process that leads a session (pid == sid) is gone but members remain for
/// `orphan_linger`, those are orphans that will not stop by themselves (an engine's workers
/// whose API server died): give up early so the caller can SIGKILL them.
pub async fn wait_sessions(sids: &[i32], limit: Duration, orphan_linger: Duration) -> bool {
    let start = tokio::time::Instant::now();
    let deadline = start + limit;
    let mut orphaned_since: Option<tokio::time::Instant> = None;
    loop {
        let members: Vec<Vec<i32>> = sids.iter().map(|s| session_members(*s)).collect();
        if members.iter().all(Vec::is_empty) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        let leaders_gone = sids
            .iter()
            .zip(&members)
            .all(|(s, m)| m.is_empty() || !m.contains(s));
        if leaders_gone {
            let since = *orphaned_since.get_or_insert(now);
            if now.duration_since(since) >= orphan_linger {
                return false;
            }
        } else {
            orphaned_since = None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// "exit code 1" / "signal 9 (SIGKILL)", and the code a step should exit with for it.
pub fn describe(status: &ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt as _;
    if let Some(c) = status.code() {
        (format!("exit code {c}"), c)
    } else if let Some(s) = status.signal() {
        let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
        (format!("signal {s} ({name})"), 128 + s)
    } else {
        ("unknown status".into(), 1)
    }
}

/// The last `n` non-empty lines of a log file (for error messages).
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    let start = data.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&data[start..]);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.chars().take(300).collect())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The members of session `sid` whose command name (`/proc/PID/comm`) is one of `names`.
pub fn session_named(sid: i32, names: &[&str]) -> Vec<(i32, String)> {
    session_members(sid)
        .into_iter()
        .filter_map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
            let comm = comm.trim_end();
            names.contains(&comm).then(|| (p, comm.to_string()))
        })
        .collect()
}

/// A handle on a process this launcher did not fork (a daemon in one of its sessions): a
/// pidfd, which the kernel makes readable when the process exits. No polling, and no mix-up
/// with a later process that reuses the pid.
pub struct PidFd(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl PidFd {
    pub fn open(pid: i32) -> std::io::Result<PidFd> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the fd is new and ours alone.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd stays open, and the same fd, for as long as the AsyncFd lives.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        Ok(PidFd(fd))
    }

    /// Until the process has exited.
    pub async fn exited(&self) {
        let _ = self.0.readable().await;
    }
}

/// What a frozen node started can only be stopped through Slurm: SIGCONT and SIGTERM to the
/// step's tasks (`scancel -s`), so that a stopped launcher resumes, finds the job stopping and
/// tears down as usual, its files included. (This launcher gets the SIGTERM too: it is ending
/// anyway, and a signal during the end changes nothing.) False outside Slurm, or when
/// scancel could not be run.
/// Each scancel gets `within` (a rank cut off from the controller does not wait long).
pub async fn wake_step(
    step: &crate::input::slurm::Step,
    nodes: &[String],
    within: Duration,
) -> bool {
    let who = nodes.join(", ");
    if step.kind != crate::input::slurm::StepKind::Srun {
        tracing::error!("{who} went silent; what the job started there may still run");
        return false;
    }
    let id = format!("{}.{}", step.job_id, step.step_id);
    tracing::warn!(
        "{who} went silent with the job's processes still running there: ending step {id} through Slurm (SIGCONT, SIGTERM)"
    );
    for sig in ["CONT", "TERM"] {
        let run = tokio::process::Command::new("scancel")
            .args(["-Q", "-s", sig, &id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(within, run).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(
                    "cannot run scancel ({e}); the processes on {who} may run until the job ends"
                );
                return false;
            }
            Err(_) => {
                tracing::error!(
                    "scancel -s {sig} {id} did not return within {} (is the controller reachable?)",
                    humantime::format_duration(within)
                );
                return false;
            }
        }
    }
    true
}

/// `scancel JOB.STEP`: SIGKILL to every task of the step (this launcher's too), for nodes
/// that did not stop after `wake_step`. In its own session, so that it outlives this launcher.
pub fn kill_step(step: &crate::input::slurm::Step, nodes: &[String]) {
    let id = format!("{}.{}", step.job_id, step.step_id);
    tracing::warn!(
        "{} did not stop within the teardown budget: scancel {id} (SIGKILL)",
        nodes.join(", ")
    );
    let mut cmd = std::process::Command::new("scancel");
    cmd.args(["-Q", &id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    if let Ok(mut c) = cmd.spawn() {
        std::thread::spawn(move || c.wait());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pidfd_wakes_when_the_process_exits_and_not_before() {
        let mut c = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let fd = PidFd::open(c.id() as i32).unwrap();
        let t0 = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), fd.exited())
            .await
            .expect("woken when sleep exits");
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t0.elapsed()
        );
        c.wait().unwrap();
        assert!(
            PidFd::open(c.id() as i32).is_err(),
            "a reaped pid has no pidfd"
        );
    }
}
