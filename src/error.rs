//! The one error type. Every error says what is wrong and, where there is one, the fix (`hint`).
//! `main` prints `error: …`, then `  caused by: …` lines, then `hint: …`, and exits with
//! `Error::exit_code`.

use crate::exit;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Flags, config, environment, hostlist: exit 2, nothing started.
    Usage,
    StartupTimeout,
    PeerFailure,
    EngineFailure,
    LaunchFailure,
    Internal,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub msg: String,
    pub causes: Vec<String>,
    pub hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The most of one message part a report shows.
pub const MAX_SHOWN: usize = 600;

/// `s`, cut to [`MAX_SHOWN`] characters with a note of how much more there was.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(MAX_SHOWN) {
        None => std::borrow::Cow::Borrowed(s),
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i).into(),
    }
}

/// A value from the input, quoted for a message: at most 200 characters of it.
pub fn quote(v: &str) -> String {
    match v.char_indices().nth(200) {
        None => format!("`{v}`"),
        Some((i, _)) => format!("`{}…` ({} bytes)", &v[..i], v.len()),
    }
}

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            causes: Vec::new(),
            hint: None,
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Self::new(Kind::Usage, msg)
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(Kind::Internal, msg)
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn cause(mut self, cause: impl fmt::Display) -> Self {
        self.causes.push(cause.to_string());
        self
    }
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            Kind::Usage => exit::USAGE,
            Kind::StartupTimeout => exit::STARTUP_TIMEOUT,
            Kind::PeerFailure => exit::PEER_FAILURE,
            Kind::EngineFailure => exit::ENGINE_FAILURE,
            Kind::LaunchFailure => exit::LAUNCH_FAILURE,
            Kind::Internal => exit::INTERNAL,
        }
    }
    /// The full report as printed on stderr (each part at most [`MAX_SHOWN`] characters: a
    /// huge bad value is not echoed whole).
    pub fn report(&self) -> String {
        let mut s = format!("error: {}", clip(&self.msg));
        for c in &self.causes {
            s.push_str("\n  caused by: ");
            s.push_str(&clip(c));
        }
        if let Some(h) = &self.hint {
            s.push_str("\nhint: ");
            s.push_str(h);
        }
        s
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_prints_the_chain_then_the_hint() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Error::usage("cannot read config /x.yaml")
            .cause(io)
            .cause("second")
            .hint("pass --config FILE");
        assert_eq!(
            e.report(),
            "error: cannot read config /x.yaml\n  caused by: entity not found\n  caused by: second\nhint: pass --config FILE"
        );
        assert_eq!(e.exit_code(), exit::USAGE);
    }
}
