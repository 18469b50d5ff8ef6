//! The run's errors: one type with a kind per cause, and the exit code each kind means (as
//! `input`'s [`crate::error::Error`] has for bad input).

use crate::exit;

/// What went wrong while running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection or a rank the master will not take (wrong step, twice, too late).
    Refused,
    /// The plan cannot be built from what the rendezvous found.
    Plan,
    /// No candidate port block is free on every node.
    Ports,
    /// A file or directory the config names is unusable (log dir, temp dir, token file):
    /// bad input, nothing started.
    Files,
    /// Something a command needs could not be made as it started (its config root).
    Launch,
    /// An attached endpoint does not answer.
    Attach,
    /// A port answered by a process that is not this job's.
    Squatter,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct RunError {
    pub kind: Kind,
    pub msg: String,
}

impl RunError {
    pub fn new(kind: Kind, msg: impl Into<String>) -> RunError {
        RunError {
            kind,
            msg: msg.into(),
        }
    }

    /// The code a job that stops for this ends with.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Refused | Kind::Plan | Kind::Files => exit::USAGE,
            Kind::Ports | Kind::Launch | Kind::Squatter => exit::LAUNCH_FAILURE,
            Kind::Attach => exit::STARTUP_TIMEOUT,
        }
    }
}

pub type Result<T> = std::result::Result<T, RunError>;
