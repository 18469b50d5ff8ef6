//! OS signals are read here once and turned into [`Shutdown`] events; nothing else sees a raw
//! signal. The escalation rule is pure and unit-tested:
//! - first SIGTERM/SIGINT/SIGHUP/SIGUSR1: graceful stop;
//! - the same again within [`DUPLICATE_WINDOW`]: ignored (Slurm sends SIGTERM twice on a time
//!   limit, ~10 ms apart);
//! - any later one: kill everything now (SIGKILL to every session).

use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop gracefully because of this signal (exit 128+n), or drain (SIGUSR1, exit 0).
    Graceful { signal: i32 },
    /// A repeat within the duplicate window: nothing to do.
    Duplicate,
    /// Stop now: SIGKILL whatever is left.
    Kill,
}

#[derive(Debug, Default)]
pub struct Escalation {
    first: Option<Instant>,
}

impl Escalation {
    pub fn on_signal(&mut self, signal: i32, now: Instant) -> Shutdown {
        match self.first {
            None => {
                self.first = Some(now);
                Shutdown::Graceful { signal }
            }
            Some(t) if now.duration_since(t) < DUPLICATE_WINDOW => Shutdown::Duplicate,
            Some(_) => Shutdown::Kill,
        }
    }
}

/// Register the handlers (before anything is spawned) and return a stream of raw signal numbers.
pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<i32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, n) in [
        (SignalKind::terminate(), libc_sig::TERM),
        (SignalKind::interrupt(), libc_sig::INT),
        (SignalKind::hangup(), libc_sig::HUP),
        (SignalKind::user_defined1(), libc_sig::USR1),
    ] {
        let mut s = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(n).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

pub mod libc_sig {
    pub const HUP: i32 = 1;
    pub const INT: i32 = 2;
    pub const USR1: i32 = 10;
    pub const TERM: i32 = 15;
}

/// Exit code for a graceful stop of a job caused by `signal`: in a batch job SIGUSR1 stops
/// the batch with work left (9: run it again to resume); else as [`exit_code_for`].
pub fn exit_code_for_job(signal: i32, batch: bool) -> i32 {
    if batch && signal == libc_sig::USR1 {
        crate::exit::BATCH_INCOMPLETE
    } else {
        exit_code_for(signal)
    }
}

/// Exit code for a graceful stop caused by `signal`: SIGUSR1 is a drain (0), others 128+n.
pub fn exit_code_for(signal: i32) -> i32 {
    if signal == libc_sig::USR1 {
        crate::exit::SUCCESS
    } else {
        crate::exit::signal(signal)
    }
}

pub fn name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("signal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_graceful_repeat_is_ignored_later_kills() {
        let t0 = Instant::now();
        let mut e = Escalation::default();
        assert_eq!(e.on_signal(15, t0), Shutdown::Graceful { signal: 15 });
        assert_eq!(
            e.on_signal(15, t0 + Duration::from_millis(10)),
            Shutdown::Duplicate
        );
        assert_eq!(
            e.on_signal(2, t0 + Duration::from_millis(900)),
            Shutdown::Duplicate
        );
        assert_eq!(e.on_signal(15, t0 + Duration::from_secs(2)), Shutdown::Kill);
        assert_eq!(e.on_signal(15, t0 + Duration::from_secs(3)), Shutdown::Kill);
    }

    #[test]
    fn codes() {
        assert_eq!(exit_code_for(15), 143);
        assert_eq!(exit_code_for(2), 130);
        assert_eq!(exit_code_for(10), 0);
    }
}
