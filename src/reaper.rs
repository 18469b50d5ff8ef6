//! The reaper: a second copy of the launcher (`ray-launch reap`, hidden) that outlives a
//! SIGKILLed launcher just long enough to stop its sessions and remove its temp dir.
//!
//! The launcher writes `session PID`, `dir PATH` lines to the reaper's stdin as it goes, and
//! `done` after its own teardown. End of input without `done` means the launcher died: the
//! reaper then SIGTERMs each session's leader, waits `--grace`, SIGKILLs what is left and
//! removes the dirs. It ignores SIGTERM/SIGINT/SIGHUP (scancel) and exits on its own.

use crate::proc;
use nix::sys::signal::{signal, SigHandler, Signal};
use std::io::BufRead as _;
use std::time::{Duration, Instant};

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
        match line.split_once(' ') {
            Some(("session", p)) => sessions.extend(p.trim().parse::<i32>().ok()),
            Some(("dir", d)) => dirs.push(d.to_string()),
            _ if line.trim() == "done" => done = true,
            _ => {}
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
