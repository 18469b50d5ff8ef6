//! The reaper: a second copy of the launcher (`ray-launch reap`, hidden) that outlives a
//! SIGKILLed launcher just long enough to stop its sessions and remove its temp dir.
//!
//! The launcher writes `session PID`, `dir PATH` lines to the reaper's stdin as it goes, and
//! `done` after its own teardown. End of input without `done` means the launcher died: the
//! reaper then SIGTERMs each session's leader, waits `--grace`, SIGKILLs what is left and
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
    /// The launcher finished its own teardown: nothing to do.
    Done,
}

impl Note {
    pub fn line(&self) -> String {
        match self {
            Note::Session(p) => format!("session {p}\n"),
            Note::Dir(d) => format!("dir {d}\n"),
            Note::Done => "done\n".into(),
        }
    }

    /// `None` for a line that is not a note (ignored).
    pub fn parse(line: &str) -> Option<Note> {
        match line.split_once(' ') {
            Some(("session", p)) => p.trim().parse().ok().map(Note::Session),
            Some(("dir", d)) => Some(Note::Dir(d.to_string())),
            _ if line.trim() == "done" => Some(Note::Done),
            _ => None,
        }
    }
}

/// The launcher's end of the reaper's pipe. Best effort: without a reaper, a SIGKILLed
/// launcher still takes its children along through PDEATHSIG.
pub struct Reaper {
    stdin: Option<std::process::ChildStdin>,
}

impl Reaper {
    /// Start `ray-launch reap` in its own session, output to `log`.
    pub fn start(log: &Path, grace: Duration) -> Reaper {
        let spawn = || -> std::io::Result<std::process::ChildStdin> {
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
            // reap the reaper when it exits, without blocking the runtime
            std::thread::spawn(move || child.wait());
            Ok(stdin)
        };
        match spawn() {
            Ok(s) => Reaper { stdin: Some(s) },
            Err(e) => {
                tracing::warn!(
                    "cannot start the reaper ({e}); a SIGKILLed launcher would leave its temp dir"
                );
                Reaper { stdin: None }
            }
        }
    }

    pub fn tell(&mut self, note: &Note) {
        if let Some(s) = self.stdin.as_mut() {
            if std::io::Write::write_all(s, note.line().as_bytes()).is_err() {
                self.stdin = None;
            }
        }
    }
}

pub fn main(grace: Duration) -> i32 {
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: setting SIG_IGN installs no handler code.
        unsafe {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
    let mut sessions = Vec::new();
    let mut dirs = Vec::new();
    let mut done = false;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match Note::parse(&line) {
            Some(Note::Session(p)) => sessions.push(p),
            Some(Note::Dir(d)) => dirs.push(d),
            Some(Note::Done) => done = true,
            None => {}
        }
    }
    if done {
        return 0;
    }
    eprintln!("reaper: the launcher is gone; stopping sessions {sessions:?}, removing {dirs:?}");
    for s in &sessions {
        proc::signal_pid(*s, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && sessions
            .iter()
            .any(|s| !proc::session_members(*s).is_empty())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in &sessions {
        proc::kill_session(*s, Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(200));
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        for n in [
            Note::Session(42),
            Note::Dir("/tmp/rl-7-0".into()),
            Note::Done,
        ] {
            assert_eq!(Note::parse(n.line().trim_end()), Some(n));
        }
        assert_eq!(Note::parse("session x"), None);
        assert_eq!(Note::parse("hello"), None);
    }
}
