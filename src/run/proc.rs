//! Child processes: each in its own session (so its whole tree can be found and killed),
//! stdin from /dev/null, output to a log file, and `PR_SET_PDEATHSIG` so that a SIGKILLed
//! launcher does not leave them running.
//!
//! Also: ending a step through Slurm when a node went silent (`wake_step`, `kill_step`).
//!
//! Teardown is by session and by tree: Ray's daemons and vLLM's workers keep the session of
//! the process we started even when they change process group; what leaves the session
//! (`setsid`, a double fork) is still found, two ways: the launcher is a child subreaper
//! ([`become_subreaper`]), so orphans of its tree stay its descendants, and every process it
//! starts carries `RAY_LAUNCH_PROC=TOKEN/KIND/SLOT` ([`tag_of`]), which every descendant
//! inherits. The rule: a process is this launcher's to stop when it descends from it, or
//! carries its token and runs as its user; nothing else is touched. Signals go through a
//! pidfd after the process's start time is checked, so a reused pid is never signalled.
//! Never `ray stop` (it is host-wide).

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

/// Children started from now on ignore SIGUSR1 (a service job: Slurm's `--signal=USR1@…`
/// reaches every process of the step, and there it asks the launcher for a handover while
/// the engines and the router serve on). An ignored signal stays ignored across `exec`
/// unless the program installs a handler of its own.
static CHILDREN_IGNORE_USR1: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub fn children_ignore_usr1() {
    CHILDREN_IGNORE_USR1.store(true, std::sync::atomic::Ordering::Relaxed);
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
    let ignore_usr1 = CHILDREN_IGNORE_USR1.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: only async-signal-safe calls (setsid, prctl, getppid, kill, sigaction) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if ignore_usr1 {
                nix::sys::signal::signal(Signal::SIGUSR1, nix::sys::signal::SigHandler::SigIgn)
                    .map_err(std::io::Error::from)?;
            }
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

/// Every live (non-zombie) process whose session id is `sid`.
pub fn session_members(sid: i32) -> Vec<i32> {
    all()
        .into_iter()
        .filter(|p| p.sid == sid)
        .map(|p| p.pid)
        .collect()
}

pub fn signal_pid(pid: i32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid), sig);
}

/// How long members may outlive their session's leader before they count as orphans.
pub const ORPHAN_LINGER: Duration = Duration::from_secs(1);

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

/// Make this process a child subreaper: what its children start and orphan (a double fork,
/// a `setsid`ed worker whose parent died) is re-parented to it, not to init, so it stays in
/// the launcher's tree. Orphans that exit stay zombies (they hold no memory and no GPU) until
/// the launcher exits.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(
            "cannot become a child subreaper ({}): orphans of this job are found by their tag only",
            std::io::Error::last_os_error()
        );
    }
}

/// This launcher's token in `RAY_LAUNCH_PROC` (random, made once per process).
pub fn token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(crate::auth::random_hex)
}

/// One live (not zombie) process, as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub sid: i32,
    /// Its start time (clock ticks since boot): with the pid, who it is.
    pub start: u64,
}

/// `/proc/PID/stat`, unless the process is gone or a zombie.
pub fn stat(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name, which is in parentheses and may contain spaces
    let rest = stat.rfind(')').map(|i| &stat[i + 2..])?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] state, f[1] ppid, f[3] session, f[19] starttime
    if f.len() < 20 || f[0] == "Z" || f[0] == "X" {
        return None;
    }
    Some(ProcInfo {
        pid,
        ppid: f[1].parse().ok()?,
        sid: f[3].parse().ok()?,
        start: f[19].parse().ok()?,
    })
}

/// Every live process of this machine (of those this user may see).
pub fn all() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// The descendants of `root` (not `root` itself), by parent links.
pub fn descendants(root: i32, all: &[ProcInfo]) -> Vec<ProcInfo> {
    let mut out: Vec<ProcInfo> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in all.iter().filter(|c| c.ppid == p && c.pid != root) {
            if !out.iter().any(|o| o.pid == c.pid) {
                out.push(*c);
                frontier.push(c.pid);
            }
        }
    }
    out
}

/// The value `RAY_LAUNCH_PROC=TOKEN/KIND/SLOT` for this launcher's command `kind` in `slot`.
pub fn tag(kind: &str, slot: usize) -> String {
    format!("{}/{kind}/{slot}", token())
}

/// `(kind, slot)` of a process this launcher tagged (its environment carries our token and
/// it runs as our user); `None` for anything else. Reads at most 256 KiB of its environment.
pub fn tag_of(pid: i32) -> Option<(String, usize)> {
    tag_with(pid, token())
}

/// [`tag_of`] for another launcher's token (the reaper's, after its launcher died).
pub fn tag_with(pid: i32, token: &str) -> Option<(String, usize)> {
    let tag = own_tag(pid)?;
    let rest = tag.strip_prefix(token)?.strip_prefix('/')?;
    let (kind, slot) = rest.rsplit_once('/')?;
    Some((kind.to_string(), slot.parse().ok()?))
}

/// The `RAY_LAUNCH_PROC` value of a process of this user (some launcher's tag), read from at
/// most 256 KiB of its environment; `None` for another user's process or an untagged one.
pub fn own_tag(pid: i32) -> Option<String> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let path = format!("/proc/{pid}/environ");
    if std::fs::metadata(&path).ok()?.uid() != nix::unistd::getuid().as_raw() {
        return None;
    }
    let mut buf = Vec::new();
    std::fs::File::open(&path)
        .ok()?
        .take(256 * 1024)
        .read_to_end(&mut buf)
        .ok()?;
    let want = format!("{}=", crate::env_vars::RAY_LAUNCH_PROC);
    let var = buf
        .split(|b| *b == 0)
        .find(|v| v.starts_with(want.as_bytes()))?;
    String::from_utf8(var[want.len()..].to_vec()).ok()
}

/// This launcher's processes among `all`: its descendants, and what carries its tag; `skip`:
/// pids left alone (the reaper).
pub fn ours(all: &[ProcInfo], skip: &[i32]) -> Vec<ProcInfo> {
    let me = std::process::id() as i32;
    let below = descendants(me, all);
    let mut out = Vec::new();
    for p in all {
        if p.pid == me || skip.contains(&p.pid) {
            continue;
        }
        if below.iter().any(|d| d.pid == p.pid) || tag_of(p.pid).is_some() {
            out.push(*p);
        }
    }
    out
}

/// Signal `p` if it is still the same process (its pid and start time): through a pidfd, so
/// that a pid reused in between is never signalled. False when it is gone.
pub fn signal_checked(p: &ProcInfo, sig: Signal) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
    if fd < 0 {
        return false;
    }
    let same = stat(p.pid).is_some_and(|now| now.start == p.start);
    // SAFETY: the fd is ours; pidfd_send_signal takes the fd, a signal and no info.
    let ok = same
        && unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd as i32,
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
    // SAFETY: closing the fd we opened.
    unsafe { libc::close(fd as i32) };
    ok
}

/// One teardown group: the sessions of the processes we started (their pids) and the tags
/// `(kind, slot)` of this launcher's commands in it (which find what left the sessions).
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub sids: Vec<i32>,
    pub tags: Vec<(String, usize)>,
}

impl Group {
    /// Its live processes: members of its sessions, and what carries one of its tags.
    pub fn members(&self) -> Vec<ProcInfo> {
        let all = all();
        let me = std::process::id() as i32;
        let mut out: Vec<ProcInfo> = all
            .iter()
            .filter(|p| self.sids.contains(&p.sid) && p.pid != me)
            .copied()
            .collect();
        if self.tags.is_empty() {
            return out;
        }
        for p in &all {
            if p.pid == me || out.iter().any(|o| o.pid == p.pid) {
                continue;
            }
            if let Some((k, s)) = tag_of(p.pid) {
                if self.tags.iter().any(|(k2, s2)| *k2 == k && *s2 == s) {
                    out.push(*p);
                }
            }
        }
        out
    }

    /// Send `sig` to every member; how many there were.
    pub fn signal(&self, sig: Signal) -> usize {
        let m = self.members();
        for p in &m {
            signal_checked(p, sig);
        }
        m.len()
    }

    /// Wait until the group is empty, or `limit` passes. True when it is. When every
    /// leader (pid == sid) is gone but members remain for `orphan_linger`, those are orphans
    /// that will not stop by themselves: give up early so the caller can SIGKILL them.
    pub async fn wait_empty(&self, limit: Duration, orphan_linger: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut orphaned_since: Option<tokio::time::Instant> = None;
        loop {
            let members = self.members();
            if members.is_empty() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let leaders_gone = !members.iter().any(|m| self.sids.contains(&m.pid));
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
}

/// `pid (command line)`, the command cut to 200 characters, for messages.
pub fn describe_pid(pid: i32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cmd: String = cmd.chars().take(200).collect();
    format!("pid {pid} ({})", if cmd.is_empty() { "?" } else { &cmd })
}

/// Stop `procs` (a snapshot): SIGTERM to each, up to `grace` for them to go, SIGKILL to the
/// rest, up to 2 s more. What is still alive then, described. Blocks (the reaper calls it as
/// it is; the rank from `spawn_blocking`).
pub fn stop_all(procs: &[ProcInfo], grace: Duration) -> Vec<String> {
    let alive = |ps: &[ProcInfo]| -> Vec<ProcInfo> {
        ps.iter()
            .filter(|p| stat(p.pid).is_some_and(|n| n.start == p.start))
            .copied()
            .collect()
    };
    for p in procs {
        signal_checked(p, Signal::SIGTERM);
    }
    let mut left = procs.to_vec();
    for limit in [grace, Duration::from_secs(2)] {
        let deadline = std::time::Instant::now() + limit;
        loop {
            left = alive(&left);
            if left.is_empty() || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if left.is_empty() {
            return Vec::new();
        }
        for p in &left {
            signal_checked(p, Signal::SIGKILL);
        }
    }
    alive(&left).iter().map(|p| describe_pid(p.pid)).collect()
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
