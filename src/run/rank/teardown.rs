//! Teardown: this rank's processes stopped stage by stage (client, engine, Ray), each
//! session emptied, then what the job created removed.

use crate::plan::lifecycle::{Kind, Stage};
use crate::private::{self, DirState};
use crate::run::proc;
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// A process this rank started: its teardown stage and its pid (= its session's id).
#[derive(Clone)]
pub(super) struct Running {
    pub(super) kind: Kind,
    pub(super) slot: usize,
    pub(super) stage: Stage,
    pub(super) pid: i32,
}

/// Files that engines leave in shared memory and /tmp (vLLM's `vllm_dist_*`).
pub(super) fn leftover_candidates() -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for dir in ["/dev/shm", "/tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("vllm_dist") {
                    out.insert(e.path());
                }
            }
        }
    }
    out
}

pub(super) async fn killed(mut kill: watch::Receiver<bool>) {
    loop {
        if *kill.borrow() {
            return;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Stop everything this rank started, in order, within the budget; then clean up.
/// `sweep`: then every other process of this launcher's (its descendants, what carries its
/// tag), but the pids given (the reaper), gets SIGTERM, 1 s, SIGKILL. What survives even
/// that, described (empty: nothing of the job is left here).
pub(super) async fn teardown(
    procs: Vec<Running>,
    grace: Duration,
    kill: watch::Receiver<bool>,
    temp_dir: Option<(PathBuf, DirState)>,
    leftovers_before: BTreeSet<PathBuf>,
    sweep: Option<Vec<i32>>,
) -> Vec<String> {
    let t0 = Instant::now();
    stop_stages(procs, grace, kill).await;
    let left = match sweep {
        Some(skip) => swept(skip).await,
        None => Vec::new(),
    };
    if let Some((dir, state)) = &temp_dir {
        if let Err(e) = private::remove_created(dir, state) {
            warn!("cannot remove what the job put in {}: {e}", dir.display());
        }
    }
    let uid = nix::unistd::getuid().as_raw();
    for p in leftover_candidates().difference(&leftovers_before) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == uid) {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
    info!("teardown done in {:.1}s", t0.elapsed().as_secs_f64());
    left
}

/// The last pass: whatever of this launcher's is still alive after the stages (something
/// that left its session and its parent, say) is stopped; what survives SIGKILL, described.
async fn swept(skip: Vec<i32>) -> Vec<String> {
    let run = move || {
        let rest = proc::ours(&proc::all(), &skip);
        if rest.is_empty() {
            return Vec::new();
        }
        let shown: Vec<String> = rest.iter().map(|p| proc::describe_pid(p.pid)).collect();
        warn!(
            "{} process(es) of this job outlived their command's teardown (they left its session): stopping them: {}",
            rest.len(),
            shown.join(", ")
        );
        proc::stop_all(&rest, Duration::from_secs(1))
    };
    tokio::task::spawn_blocking(run).await.unwrap_or_default()
}

/// Stop `procs` stage by stage: SIGTERM and `grace` for the graceful stages, then SIGKILL
/// of their groups (their sessions, and what carries their tags: what left a session too).
pub(super) async fn stop_stages(procs: Vec<Running>, grace: Duration, kill: watch::Receiver<bool>) {
    for stage in Stage::ORDER {
        let group: Vec<&Running> = procs
            .iter()
            .filter(|p| p.stage == stage && p.pid > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let g = proc::Group {
            sids: group.iter().map(|p| p.pid).collect(),
            tags: group.iter().map(|p| (p.kind.to_string(), p.slot)).collect(),
        };
        let graceful = if *kill.borrow() || !stage.graceful() {
            false
        } else {
            // Signal the process we started, not its whole group: Ray's gcs_server can hang
            // when it gets SIGTERM at the same time as `ray start`.
            for p in &group {
                proc::signal_pid(p.pid, Signal::SIGTERM);
            }
            tokio::select! {
                ok = g.wait_empty(grace, proc::ORPHAN_LINGER) => ok,
                _ = killed(kill.clone()) => false,
            }
        };
        if !graceful {
            let n = g.signal(Signal::SIGKILL);
            if n > 0 && stage.graceful() {
                warn!("{}: {n} process(es) still running after SIGTERM (the grace of {} passed, or what it started was left orphaned): sent SIGKILL", stage.as_str(), humantime::format_duration(grace));
            }
            if !g
                .wait_empty(Duration::from_secs(3), Duration::from_secs(3))
                .await
            {
                error!(
                    "processes of the {} stage are still alive after SIGKILL",
                    stage.as_str()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    fn spawn(name: &str, script: &str, log: &Path) -> Running {
        let kind: Kind = serde_json::from_value(serde_json::json!(name)).unwrap();
        let argv = vec![
            "bash".to_string(),
            "-c".to_string(),
            script.to_string(),
            name.to_string(),
            log.display().to_string(),
        ];
        let child = proc::spawn(
            &argv,
            &BTreeMap::new(),
            proc::Output::Log(&log.with_extension(format!("{name}.out"))),
        )
        .unwrap();
        let pid = child.id().unwrap() as i32;
        // reap it when it exits, as the rank's waiter task does
        tokio::spawn(async move {
            let mut c = child;
            let _ = c.wait().await;
        });
        Running {
            kind,
            slot: 0,
            stage: match kind {
                Kind::Client => Stage::Client,
                Kind::Engine => Stage::Engine,
                _ => Stage::Ray,
            },
            pid,
        }
    }

    const POLITE: &str = r#"trap 'echo "$0 $(date +%s%N)" >> "$1"; exit 0' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;
    const STUBBORN: &str = r#"trap '' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;
    /// Leaves a TERM-ignoring child in its session and exits on SIGTERM itself.
    const ORPHANING: &str = r#"(trap '' TERM; while :; do sleep 0.05; done) & trap 'echo "$0 $(date +%s%N)" >> "$1"; exit 0' TERM; echo up > "$1.$0"; while :; do sleep 0.05; done"#;

    async fn ready(log: &Path, names: &[&str]) {
        for n in names {
            while !log.with_extension(n).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Tear down with this grace and no temp dir; how long it took.
    async fn timed_teardown(
        procs: Vec<Running>,
        grace: Duration,
        kill: watch::Receiver<bool>,
    ) -> Duration {
        let t0 = Instant::now();
        teardown(procs, grace, kill, None, BTreeSet::new(), None).await;
        t0.elapsed()
    }

    #[tokio::test]
    async fn teardown_goes_client_engine_ray_and_empties_every_session() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![
            spawn("ray-head", POLITE, &log),
            spawn("engine", POLITE, &log),
            spawn("client", POLITE, &log),
        ];
        ready(&log, &["ray-head", "engine", "client"]).await;
        let sids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
        let (_kill_tx, kill_rx) = watch::channel(false);
        let temp = dir.path().join("temp");
        let state = private::private_dir(&temp).unwrap();
        teardown(
            procs,
            Duration::from_secs(5),
            kill_rx,
            Some((temp.clone(), state)),
            BTreeSet::new(),
            None,
        )
        .await;
        let order: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        // the client and the engine stop gracefully, in order; Ray's daemons are SIGKILLed
        // (they never see a SIGTERM), last
        assert_eq!(order, ["client", "engine"]);
        assert!(sids.iter().all(|s| proc::session_members(*s).is_empty()));
        assert!(!temp.exists(), "the temp dir is removed");
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![spawn("engine", STUBBORN, &log)];
        ready(&log, &["engine"]).await;
        let sid = procs[0].pid;
        let (_kill_tx, kill_rx) = watch::channel(false);
        let took = timed_teardown(procs, Duration::from_millis(1500), kill_rx).await;
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
            "{took:?}"
        );
        assert!(proc::session_members(sid).is_empty());
    }

    #[tokio::test]
    async fn orphans_are_killed_soon_after_their_parent_exits() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![spawn("engine", ORPHANING, &log)];
        ready(&log, &["engine"]).await;
        let sid = procs[0].pid;
        let (_kill_tx, kill_rx) = watch::channel(false);
        let took = timed_teardown(procs, Duration::from_secs(20), kill_rx).await;
        assert!(
            took < Duration::from_secs(5),
            "did not wait the whole grace: {took:?}"
        );
        assert!(proc::session_members(sid).is_empty());
    }

    #[tokio::test]
    async fn a_second_signal_kills_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let procs = vec![
            spawn("engine", STUBBORN, &log),
            spawn("ray-head", STUBBORN, &log),
        ];
        ready(&log, &["engine", "ray-head"]).await;
        let sids: Vec<i32> = procs.iter().map(|p| p.pid).collect();
        let (kill_tx, kill_rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = kill_tx.send(true);
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let took = timed_teardown(procs, Duration::from_secs(30), kill_rx).await;
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(sids.iter().all(|s| proc::session_members(*s).is_empty()));
    }
}
