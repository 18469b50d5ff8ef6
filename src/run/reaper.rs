//! The reaper: a second copy of the launcher (`ray-launch reap`, hidden) that outlives a
//! SIGKILLed launcher just long enough to stop its sessions and remove its temp dir.
//!
//! The launcher writes `session PID`, `dir PATH` lines to the reaper's stdin as it goes, and
//! `tag TOKEN` (the launcher's `RAY_LAUNCH_PROC` token), and `done` after its own teardown.
//! End of input without `done` means the launcher died: the reaper then SIGTERMs every
//! process of the launcher's (its sessions' members and whatever carries its tag, so also
//! what left a session), SIGKILLs what is left after at most 1 s (the processes had their
//! chance: PDEATHSIG), twice over, signalling through pidfds with the start time checked, and
//! removes the dirs. It ignores SIGTERM/SIGINT/SIGHUP (scancel) and exits on its own.

use crate::run::proc;
use nix::sys::signal::{signal, SigHandler, Signal};
use std::io::BufRead as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// One line of the pipe protocol, launcher → reaper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A session the launcher started (its leader's pid).
    Session(i32),
    /// A directory to remove if the launcher dies.
    Dir(String),
    /// The launcher's token in `RAY_LAUNCH_PROC`: what carries it is the launcher's.
    Tag(String),
    /// The launcher finished its own teardown: nothing to do.
    Done,
}

impl Note {
    pub fn line(&self) -> String {
        match self {
            Note::Session(p) => format!("session {p}\n"),
            Note::Dir(d) => format!("dir {d}\n"),
            Note::Tag(t) => format!("tag {t}\n"),
            Note::Done => "done\n".into(),
        }
    }

    /// `None` for a line that is not a note (ignored).
    pub fn parse(line: &str) -> Option<Note> {
        match line.split_once(' ') {
            Some(("session", p)) => p.trim().parse().ok().map(Note::Session),
            Some(("dir", d)) => Some(Note::Dir(d.to_string())),
            Some(("tag", t)) if !t.trim().is_empty() => Some(Note::Tag(t.trim().to_string())),
            _ if line.trim() == "done" => Some(Note::Done),
            _ => None,
        }
    }
}

/// The launcher's end of the reaper's pipe. Best effort: without a reaper, a SIGKILLed
/// launcher still takes its children along through PDEATHSIG.
pub struct Reaper {
    stdin: Option<std::process::ChildStdin>,
    pid: Option<i32>,
}

impl Reaper {
    /// Start `ray-launch reap` in its own session, output to `log`.
    pub fn start(log: &Path, grace: Duration) -> Reaper {
        let spawn = || -> std::io::Result<(std::process::ChildStdin, i32)> {
            use std::os::unix::process::CommandExt as _;
            let exe = std::env::current_exe()?;
            let out = crate::private::open_append(log)?;
            let mut cmd = std::process::Command::new(exe);
            cmd.args([
                "reap",
                "--grace",
                &humantime::format_duration(grace).to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out);
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    nix::unistd::setsid()
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
            let mut child = cmd.spawn()?;
            let stdin = child.stdin.take().expect("piped");
            let pid = child.id() as i32;
            // reap the reaper when it exits, without blocking the runtime
            std::thread::spawn(move || child.wait());
            Ok((stdin, pid))
        };
        match spawn() {
            Ok((s, pid)) => {
                let mut r = Reaper {
                    stdin: Some(s),
                    pid: Some(pid),
                };
                r.tell(&Note::Tag(proc::token().to_string()));
                r
            }
            Err(e) => {
                tracing::warn!(
                    "cannot start the reaper ({e}); a SIGKILLed launcher would leave its temp dir"
                );
                Reaper {
                    stdin: None,
                    pid: None,
                }
            }
        }
    }

    /// The reaper's own pid (the teardown leaves it alone: it exits on `done`).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    pub fn tell(&mut self, note: &Note) {
        if let Some(s) = self.stdin.as_mut() {
            if std::io::Write::write_all(s, note.line().as_bytes()).is_err() {
                self.stdin = None;
            }
        }
    }
}

/// After the launcher's death its processes had their chance (PDEATHSIG sent them SIGTERM):
/// what is left gets SIGTERM now and SIGKILL after at most this long.
const REAP_GRACE: Duration = Duration::from_secs(1);

pub fn main(grace: Duration) -> i32 {
    // Slurm signals every process of a step (`scancel --signal`, `--signal=USR1@…`): the
    // reaper lives until its launcher is gone, whatever the job is told
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        // SAFETY: setting SIG_IGN installs no handler code.
        unsafe {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
    let mut sessions = Vec::new();
    let mut dirs = Vec::new();
    let mut tag = None;
    let mut done = false;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match Note::parse(&line) {
            Some(Note::Session(p)) => sessions.push(p),
            Some(Note::Dir(d)) => dirs.push(d),
            Some(Note::Tag(t)) => tag = Some(t),
            Some(Note::Done) => done = true,
            None => {}
        }
    }
    if done {
        return 0;
    }
    let t0 = Instant::now();
    eprintln!("reaper: the launcher is gone; stopping sessions {sessions:?} and every process tagged by it, removing {dirs:?}");
    // the whole tree, twice: what the first pass stopped may have started something
    let mut left = Vec::new();
    for _ in 0..2 {
        let victims = left_of(&sessions, tag.as_deref());
        if victims.is_empty() {
            break;
        }
        left = proc::stop_all(&victims, REAP_GRACE.min(grace));
    }
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    if left.is_empty() {
        eprintln!(
            "reaper: nothing of the launcher's is left ({:.2}s)",
            t0.elapsed().as_secs_f64()
        );
        0
    } else {
        eprintln!("reaper: survived SIGKILL: {}", left.join(", "));
        crate::exit::LEFT_BEHIND
    }
}

/// The dead launcher's processes: members of its sessions, and what carries its tag.
fn left_of(sessions: &[i32], tag: Option<&str>) -> Vec<proc::ProcInfo> {
    let me = std::process::id() as i32;
    proc::all()
        .into_iter()
        .filter(|p| p.pid != me)
        .filter(|p| {
            sessions.contains(&p.sid) || tag.is_some_and(|t| proc::tag_with(p.pid, t).is_some())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        for n in [
            Note::Session(42),
            Note::Dir("/tmp/rl-7-0".into()),
            Note::Tag("0123abcd".into()),
            Note::Done,
        ] {
            assert_eq!(Note::parse(n.line().trim_end()), Some(n));
        }
        assert_eq!(Note::parse("session x"), None);
        assert_eq!(Note::parse("hello"), None);
    }
}
