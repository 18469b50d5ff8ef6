//! Exit codes of `ray-launch`, in one place. Every rank of a step exits with the same code
//! for the same cause, so `sacct` shows one story.

/// Clean stop: a client finished with 0, or a stop was asked for with SIGUSR1 (drain).
pub const SUCCESS: i32 = 0;
/// A bug or an unexpected local I/O failure in the launcher itself.
pub const INTERNAL: i32 = 1;
/// Bad input: flags, config, environment or hostlist. Nothing was started.
pub const USAGE: i32 = 2;
/// A deadline passed while starting: rendezvous, worker join, or engine readiness.
pub const STARTUP_TIMEOUT: i32 = 3;
/// Another node failed: its launcher, Ray daemon or engine process died, or it went silent.
pub const PEER_FAILURE: i32 = 4;
/// The engine on this node died, or its `/health` failed too often.
pub const ENGINE_FAILURE: i32 = 5;
/// A process could not be started (missing executable, Ray head did not come up).
pub const LAUNCH_FAILURE: i32 = 6;
/// Fewer replicas serve than `replicas.min_healthy`: each of the others failed past its
/// restarts, or lost its node.
pub const REPLICAS_DOWN: i32 = 7;
/// A process of the job survived SIGKILL at the teardown (it is named in the log): the node
/// may still hold its memory or GPU.
pub const LEFT_BEHIND: i32 = 8;
/// A batch stopped with work left (SIGUSR1 before the time limit, or a stop before its end):
/// what it answered is in its output files; the same job run again resumes (with
/// `batch.requeue: true` the job is requeued at once).
pub const BATCH_INCOMPLETE: i32 = 9;
/// Killed by signal `n` (SIGTERM from scancel or the time limit: 143).
/// 128 + the signal's number; a number that is no signal (from a peer, say) counts as 1.
pub const fn signal(n: i32) -> i32 {
    if n >= 1 && n <= 64 {
        128 + n
    } else {
        INTERNAL
    }
}

/// Whether a step that ends with `code` failed. 0 and 128+n (a signal: scancel, the time
/// limit) are how a job normally ends; anything else is a failure.
pub const fn is_failure(code: i32) -> bool {
    code != SUCCESS && code < 128
}

/// The table printed by `--help` and the README.
pub const TABLE: &[(i32, &str)] = &[
    (SUCCESS, "clean stop (client exited 0, or SIGUSR1 drain)"),
    (INTERNAL, "internal error of the launcher"),
    (
        USAGE,
        "bad flags, config, environment or hostlist; nothing was started",
    ),
    (
        STARTUP_TIMEOUT,
        "rendezvous, worker join or engine readiness deadline passed",
    ),
    (
        PEER_FAILURE,
        "another node's launcher, Ray or engine died, or it went silent",
    ),
    (
        ENGINE_FAILURE,
        "the engine (or the router) died or failed its health checks",
    ),
    (LAUNCH_FAILURE, "a process could not be started"),
    (
        REPLICAS_DOWN,
        "fewer replicas serve than replicas.min_healthy (failed past their restarts, or their node was lost)",
    ),
    (
        LEFT_BEHIND,
        "a process of the job survived SIGKILL at the teardown (named in the log)",
    ),
    (
        BATCH_INCOMPLETE,
        "a batch stopped with work left (SIGUSR1); run the same job again to resume",
    ),
    (
        143,
        "stopped by SIGTERM (scancel, time limit); 128+n for signal n",
    ),
];
