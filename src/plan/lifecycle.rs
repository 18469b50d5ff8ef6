//! Each planned command's lifecycle, in one place: what kind of process it is, when the master
//! starts it, how the launcher knows it is up, which deadline covers it until then, where its
//! output goes, in which teardown stage it stops, and what its end means for the step.
//! The coordinator and the rank follow these values; they do not match names or rank numbers.

use crate::exit;
use serde::{Deserialize, Serialize};

/// How long one `/health` of an engine may take: SGLang's runs a one-token generation and
/// allows itself 20 s; vLLM's answers at once.
pub fn probe_timeout(engine: crate::input::config::Engine) -> std::time::Duration {
    match engine {
        crate::input::config::Engine::Sglang => std::time::Duration::from_secs(25),
        crate::input::config::Engine::Vllm => std::time::Duration::from_secs(5),
    }
}

/// What Ray prints once `ray start` has brought the node up.
pub const RAY_STARTED: &str = "Ray runtime started";

/// The kinds of process a rank runs. The serde names are the names on the wire, in the plan's
/// JSON and in log file names (`NODE.ray-head.log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    RayHead,
    RayWorker,
    Engine,
    /// The router on the master: one endpoint over the replicas.
    Router,
    Client,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RayHead => "ray-head",
            Kind::RayWorker => "ray-worker",
            Kind::Engine => "engine",
            Kind::Router => "router",
            Kind::Client => "client",
        }
    }

    /// A process of one replica (torn down and started again when the replica restarts);
    /// the router and the client belong to the job.
    pub fn of_replica(self) -> bool {
        matches!(self, Kind::RayHead | Kind::RayWorker | Kind::Engine)
    }

    /// A Ray daemon: a node of its replica's Ray cluster once it is up.
    pub fn is_ray(self) -> bool {
        matches!(self, Kind::RayHead | Kind::RayWorker)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When the master starts a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAfter {
    /// As soon as every rank has connected.
    Rendezvous,
    /// Once its replica's Ray head is up.
    HeadUp,
    /// Once every node of its replica has joined its Ray cluster.
    ReplicaJoined,
    /// Once every replica is ready.
    AllReady,
}

/// How the launcher knows a command is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Ready {
    /// This text appears in its log.
    LogLine { text: String },
    /// This URL answers 200; afterwards it is polled for liveness (`health.interval`,
    /// `health.failures`). Up here means the replica serves.
    Http { url: String },
    /// Up once it has been started.
    Spawned,
    /// Nobody waits for it (the client).
    Untracked,
}

/// The deadline that covers a command from its start until it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Deadline {
    #[serde(rename = "timeouts.worker_join")]
    WorkerJoin,
    #[serde(rename = "timeouts.engine_ready")]
    EngineReady,
}

impl Deadline {
    /// The config key, for messages.
    pub fn key(self) -> &'static str {
        match self {
            Deadline::WorkerJoin => "timeouts.worker_join",
            Deadline::EngineReady => "timeouts.engine_ready",
        }
    }

    pub fn duration(self, t: &crate::input::settings::Timeouts) -> std::time::Duration {
        match self {
            Deadline::WorkerJoin => t.worker_join,
            Deadline::EngineReady => t.engine_ready,
        }
    }
}

/// Teardown stages, in order: every command of a stage is stopped before the next stage
/// begins. The client and the engine get SIGTERM, then the grace, then SIGKILL of their
/// sessions; Ray's daemons hold no user data once the engine is gone, so their sessions are
/// SIGKILLed at once (SIGTERM, which Slurm also sends them directly, sometimes makes them hang
/// for the whole grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Client,
    /// The router stops taking requests before the engines behind it stop.
    Router,
    Engine,
    Ray,
}

impl Stage {
    pub const ORDER: [Stage; 4] = [Stage::Client, Stage::Router, Stage::Engine, Stage::Ray];

    /// Whether the stage gets SIGTERM and the grace before SIGKILL.
    pub fn graceful(self) -> bool {
        !matches!(self, Stage::Ray)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Client => "client",
            Stage::Router => "router",
            Stage::Engine => "engine",
            Stage::Ray => "ray",
        }
    }
}

/// Where a command's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// `LOG_DIR/NODE.KIND.log` (daemons and engines: never the task's stdout).
    LogFile,
    /// The job's output (the client, whose output the user wants).
    Job,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lifecycle {
    pub start_after: StartAfter,
    pub ready: Ready,
    pub deadline: Option<Deadline>,
    pub stage: Stage,
    pub output: Output,
    /// Processes the command starts that are watched on their own once it is up (by name,
    /// in its session): their death is the command's failure at once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub daemons: Vec<String>,
}

impl Lifecycle {
    pub fn ray_head() -> Lifecycle {
        Lifecycle {
            start_after: StartAfter::Rendezvous,
            ready: Ready::LogLine {
                text: RAY_STARTED.into(),
            },
            deadline: Some(Deadline::WorkerJoin),
            stage: Stage::Ray,
            output: Output::LogFile,
            daemons: vec!["gcs_server".into(), "raylet".into()],
        }
    }

    pub fn ray_worker() -> Lifecycle {
        Lifecycle {
            start_after: StartAfter::HeadUp,
            daemons: vec!["raylet".into()],
            ..Lifecycle::ray_head()
        }
    }

    /// The engine on a replica's leader: it serves HTTP; `after` says when it may start.
    pub fn serving_engine(after: StartAfter, health_url: &str) -> Lifecycle {
        Lifecycle {
            start_after: after,
            ready: Ready::Http {
                url: health_url.to_string(),
            },
            deadline: Some(Deadline::EngineReady),
            stage: Stage::Engine,
            output: Output::LogFile,
            daemons: Vec::new(),
        }
    }

    /// An engine rank that joins its leader's rendezvous and serves nothing itself.
    pub fn following_engine() -> Lifecycle {
        Lifecycle {
            start_after: StartAfter::Rendezvous,
            ready: Ready::Spawned,
            deadline: Some(Deadline::WorkerJoin),
            stage: Stage::Engine,
            output: Output::LogFile,
            daemons: Vec::new(),
        }
    }

    /// The router: up once it listens (it answers 503 until a replica is healthy).
    pub fn router() -> Lifecycle {
        Lifecycle {
            start_after: StartAfter::Rendezvous,
            ready: Ready::LogLine {
                text: crate::route::LISTENING.into(),
            },
            deadline: Some(Deadline::WorkerJoin),
            stage: Stage::Router,
            output: Output::LogFile,
            daemons: Vec::new(),
        }
    }

    pub fn client() -> Lifecycle {
        Lifecycle {
            start_after: StartAfter::AllReady,
            ready: Ready::Untracked,
            deadline: None,
            stage: Stage::Client,
            output: Output::Job,
            daemons: Vec::new(),
        }
    }
}

/// What the end of a command means for the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The job is done: every rank exits with this code (the client's own).
    Done(i32),
    /// A failure of the command's node: every rank exits with this code.
    Failed(i32),
}

/// The rule for a command of `kind` that ended with `code` (`was_up`: it had reached its
/// ready point): the client's code is the step's; an engine's end is an engine failure; a Ray
/// daemon that was up is a node failure, one that never came up could not be started; the
/// router that served is the endpoint's failure, one that never listened could not start.
pub fn ending(kind: Kind, was_up: bool, code: i32) -> Ending {
    match kind {
        Kind::Client => Ending::Done(code),
        Kind::Engine => Ending::Failed(exit::ENGINE_FAILURE),
        Kind::Router if was_up => Ending::Failed(exit::ENGINE_FAILURE),
        Kind::Router => Ending::Failed(exit::LAUNCH_FAILURE),
        Kind::RayHead | Kind::RayWorker if was_up => Ending::Failed(exit::PEER_FAILURE),
        Kind::RayHead | Kind::RayWorker => Ending::Failed(exit::LAUNCH_FAILURE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_kebab_case() {
        for (k, s) in [
            (Kind::RayHead, "ray-head"),
            (Kind::RayWorker, "ray-worker"),
            (Kind::Engine, "engine"),
            (Kind::Router, "router"),
            (Kind::Client, "client"),
        ] {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{s}\""));
            assert_eq!(k.as_str(), s);
            assert_eq!(
                serde_json::from_str::<Kind>(&format!("\"{s}\"")).unwrap(),
                k
            );
        }
    }

    #[test]
    fn endings() {
        assert_eq!(ending(Kind::Client, false, 3), Ending::Done(3));
        assert_eq!(
            ending(Kind::Engine, true, 0),
            Ending::Failed(exit::ENGINE_FAILURE)
        );
        assert_eq!(
            ending(Kind::RayWorker, true, 1),
            Ending::Failed(exit::PEER_FAILURE)
        );
        assert_eq!(
            ending(Kind::RayHead, false, 1),
            Ending::Failed(exit::LAUNCH_FAILURE)
        );
        assert!(
            Stage::Client < Stage::Router
                && Stage::Router < Stage::Engine
                && Stage::Engine < Stage::Ray
        );
    }
}
