//! What every rank runs (the master too, over loopback): connect to the coordinator, say
//! hello, start the commands the master names, report their readiness and death, send
//! heartbeats, and tear down in order when told to stop or signalled.
//!
//! Teardown order: client, engine, then Ray. Each stage: SIGTERM to the process we started,
//! wait up to `timeouts.shutdown_grace` for its whole session to be gone, then SIGKILL the
//! session. A second signal (after the duplicate window) SIGKILLs everything at once.

use crate::channel::{self, ToMaster, ToRank};
use crate::cli::Gathered;
use crate::coordinator;
use crate::exit;
use crate::plan::{self, Plan};
use crate::proc;
use crate::signals::{self, Escalation, Shutdown};
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

enum Local {
    Exit {
        name: String,
        status: std::process::ExitStatus,
    },
    Up {
        name: String,
    },
    Failed {
        code: i32,
        reason: String,
    },
}

struct Running {
    name: String,
    pid: i32,
    log: Option<PathBuf>,
}

fn line<T: serde::Serialize>(m: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(m).expect("serializes");
    v.push(b'\n');
    v
}

/// Files that engines leave in shared memory and /tmp (vLLM's `vllm_dist_*`).
fn leftover_candidates() -> BTreeSet<PathBuf> {
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

pub async fn run(g: Gathered, mut sigs: mpsc::UnboundedReceiver<i32>) -> i32 {
    let me = g.step.self_rank.unwrap_or(0);
    let node = g.step.nodes[me].clone();
    let s = g.settings.clone();
    let cfg = &s.config;
    let port = g.plan.channel.port;
    let mut esc = Escalation::default();
    let leftovers_before = leftover_candidates();

    // ---- the master also runs the coordinator; bind first so a port clash fails fast
    let mut coord_done: Option<oneshot::Receiver<()>> = None;
    if me == 0 {
        match coordinator::bind(port).await {
            Ok(l) => {
                let (tx, rx) = oneshot::channel();
                tokio::spawn(coordinator::serve(l, s.clone(), g.step.clone(), tx));
                coord_done = Some(rx);
            }
            Err(e) => {
                error!("cannot listen on the launcher channel port {port}: {e}; another job whose port block is the same (see ports.range), or a leftover launcher, holds it");
                return exit::LAUNCH_FAILURE;
            }
        }
    }

    // ---- connect, retrying until the rendezvous deadline
    let target = if me == 0 {
        format!("127.0.0.1:{port}")
    } else {
        format!("{}:{port}", g.plan.master.address)
    };
    let rendezvous = cfg.timeouts.rendezvous.0;
    let deadline = Instant::now() + rendezvous;
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    let stream = loop {
        tries += 1;
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&target),
        );
        let err = tokio::select! {
            r = attempt => match r {
                Ok(Ok(st)) => break st,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 3s".to_string(),
            },
            Some(sig) = sigs.recv() => {
                info!("received {} before the rendezvous; nothing was started", signals::name(sig));
                return signals::exit_code_for(sig);
            }
        };
        if Instant::now() + backoff >= deadline {
            error!(
                "cannot reach the master {} at {target} within {} (timeouts.rendezvous; {tries} tries, last: {err}); is its launcher running, and is the address reachable from {node}?",
                g.plan.master.node,
                humantime::format_duration(rendezvous)
            );
            return exit::STARTUP_TIMEOUT;
        }
        if tries == 1 || tries.is_multiple_of(20) {
            info!(
                "waiting for the master {} at {target} ({err})",
                g.plan.master.node
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    };
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();

    // reader task: the channel reader is not cancel-safe, so it runs on its own
    let (from_tx, mut from_master) = mpsc::unbounded_channel::<Result<ToRank, String>>();
    tokio::spawn(async move {
        let mut r = channel::Reader::new(rd);
        loop {
            match r.recv::<ToRank>().await {
                Ok(m) => {
                    if from_tx.send(Ok(m)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = from_tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    let (to_master, mut to_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer: JoinHandle<()> = tokio::spawn(async move {
        while let Some(l) = to_rx.recv().await {
            if wr.write_all(&l).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    });
    let send = |m: &ToMaster| {
        let _ = to_master.send(line(m));
    };

    // ---- hello, then wait for the welcome
    let mut hello = serde_json::to_value(ToMaster::Hello {
        protocol: channel::PROTOCOL,
        node: node.clone(),
        node_rank: me,
        version: env!("CARGO_PKG_VERSION").to_string(),
        digest: s.digest.clone(),
        info: g.nodes[me].clone(),
        proof: None,
    })
    .expect("serializes");
    hello["settings"] = s.agreed();
    let _ = to_master.send(line(&hello));
    let nodes = loop {
        tokio::select! {
            m = from_master.recv() => match m {
                Some(Ok(ToRank::Welcome { nodes })) => break nodes,
                Some(Ok(ToRank::Stop { code, reason, node: culprit })) => {
                    report_stop(code, &reason, culprit.as_deref());
                    return code;
                }
                Some(Ok(_)) => {}
                other => {
                    let e = match other { Some(Err(e)) => e, _ => "closed".to_string() };
                    error!("lost the connection to the master {} during the rendezvous ({e})", g.plan.master.node);
                    return exit::PEER_FAILURE;
                }
            },
            Some(sig) = sigs.recv() => {
                send(&ToMaster::Stopping { signal: sig });
                info!("received {} during the rendezvous; nothing was started", signals::name(sig));
                flush(to_master, writer).await;
                return signals::exit_code_for(sig);
            }
        }
    };
    let plan: Plan = match plan::build(&s, &g.step, &nodes) {
        Ok(p) => p,
        Err(e) => {
            error!("{}", e.report());
            return exit::USAGE;
        }
    };
    let mine = plan.ranks[me].clone();
    let log_dir = PathBuf::from(&s.log_dir);
    if let Err(e) = std::fs::create_dir_all(&log_dir) {
        warn!("cannot create log dir {}: {e}", log_dir.display());
    }
    let mut reaper = Reaper::start(
        &log_dir.join(format!("{node}.reaper.log")),
        cfg.timeouts.shutdown_grace.0,
    );
    reaper.tell(&format!("dir {}", mine.temp_dir));

    // ---- main loop
    let (local_tx, mut local_rx) = mpsc::unbounded_channel::<Local>();
    let (kill_tx, kill_rx) = watch::channel(false);
    let mut procs: Vec<Running> = Vec::new();
    let mut watchers: Vec<JoinHandle<()>> = Vec::new();
    let mut stopping: Option<(i32, String)> = None;
    let mut teardown_fut: Option<Pin<Box<dyn Future<Output = ()>>>> = None;
    let mut master_closed = false;
    let mut last_master = Instant::now();
    let hb_timeout = cfg.health.heartbeat_timeout.0;
    let mut hb = tokio::time::interval(cfg.health.heartbeat_interval.0);
    let grace = cfg.timeouts.shutdown_grace.0;

    loop {
        // A stop was decided in the previous round: start the teardown once.
        if stopping.is_some() && teardown_fut.is_none() {
            for w in watchers.drain(..) {
                w.abort();
            }
            let taken = std::mem::take(&mut procs);
            teardown_fut = Some(Box::pin(teardown(
                taken,
                grace,
                kill_rx.clone(),
                mine.temp_dir.clone(),
                leftovers_before.clone(),
            )));
        }
        tokio::select! {
            Some(sig) = sigs.recv() => match esc.on_signal(sig, Instant::now()) {
                Shutdown::Graceful { signal } => {
                    if stopping.is_none() {
                        send(&ToMaster::Stopping { signal });
                        let what = if signal == signals::libc_sig::USR1 { "SIGUSR1: draining".to_string() } else { format!("received {}: stopping", signals::name(signal)) };
                        info!("{what}");
                        stopping = Some((signals::exit_code_for(signal), what));
                    }
                }
                Shutdown::Duplicate => {}
                Shutdown::Kill => {
                    warn!("{} again: killing every process of this job on {node} now", signals::name(sig));
                    let _ = kill_tx.send(true);
                }
            },
            m = from_master.recv(), if !master_closed => match m {
                Some(Ok(ToRank::Start { name })) => {
                    last_master = Instant::now();
                    if stopping.is_none() {
                        start(&name, &plan, me, &log_dir, &local_tx, &to_master, &mut procs, &mut watchers, &s);
                        if let Some(p) = procs.last().filter(|p| p.name == name) {
                            reaper.tell(&format!("session {}", p.pid));
                        }
                    }
                }
                Some(Ok(ToRank::Stop { code, reason, node: culprit })) => {
                    last_master = Instant::now();
                    if stopping.is_none() {
                        report_stop(code, &reason, culprit.as_deref());
                        stopping = Some((code, reason));
                    }
                }
                Some(Ok(_)) => last_master = Instant::now(),
                Some(Err(_)) | None => {
                    master_closed = true;
                    if stopping.is_none() {
                        let reason = format!("lost the connection to the master {} (its launcher was killed, or its node failed)", plan.master.node);
                        error!("{reason}");
                        stopping = Some((exit::PEER_FAILURE, reason));
                    }
                }
            },
            Some(l) = local_rx.recv() => match l {
                Local::Exit { name, status } => {
                    let (desc, code) = proc::describe(&status);
                    if stopping.is_none() {
                        let log = procs.iter().find(|p| p.name == name).and_then(|p| p.log.clone());
                        let tail = log.as_deref().map(|l| proc::log_tail(l, 5)).unwrap_or_default();
                        if name == "client" {
                            info!("client exited with {desc}");
                        } else {
                            error!("{name} exited unexpectedly ({desc}); log: {}", log.as_deref().map_or("-".into(), |l| l.display().to_string()));
                            for t in &tail {
                                error!("  | {t}");
                            }
                        }
                        send(&ToMaster::Exited { name, status: desc, code, log: log.map(|l| l.display().to_string()), tail });
                        if master_closed {
                            stopping = Some((exit::PEER_FAILURE, "a process died and the master is gone".into()));
                        }
                    }
                }
                Local::Up { name } => {
                    info!("{name} is up");
                    send(&ToMaster::Up { name });
                }
                Local::Failed { code, reason } => {
                    if stopping.is_none() {
                        error!("{reason}");
                        send(&ToMaster::Failed { code, reason });
                    }
                }
            },
            _ = hb.tick() => {
                send(&ToMaster::Heartbeat);
                if stopping.is_none() && last_master.elapsed() > hb_timeout {
                    let reason = format!("the master {} went silent: nothing for {} (health.heartbeat_timeout)", plan.master.node, humantime::format_duration(hb_timeout));
                    error!("{reason}");
                    stopping = Some((exit::PEER_FAILURE, reason));
                }
            }
            _ = async { teardown_fut.as_mut().expect("guarded").await }, if teardown_fut.is_some() => break,
        }
    }
    let (code, reason) = stopping.expect("the loop ends only after a stop");
    reaper.tell("done");
    send(&ToMaster::Stopped);
    if let Some(done) = coord_done {
        let wait = crate::config::teardown_budget(cfg) + Duration::from_secs(3);
        let _ = tokio::time::timeout(wait, done).await;
    }
    flush(to_master, writer).await;
    if code == exit::SUCCESS {
        info!("done: {reason}; exit {code}");
    } else {
        info!("all processes of this job on {node} are gone; exit {code}");
    }
    code
}

/// The launcher's end of the reaper's pipe (see src/reaper.rs). Best effort: without a
/// reaper, a SIGKILLed launcher still takes its children along through PDEATHSIG.
struct Reaper {
    stdin: Option<std::process::ChildStdin>,
}

impl Reaper {
    fn start(log: &Path, grace: Duration) -> Reaper {
        let spawn = || -> std::io::Result<std::process::ChildStdin> {
            use std::os::unix::process::CommandExt as _;
            let exe = std::env::current_exe()?;
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
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
                warn!(
                    "cannot start the reaper ({e}); a SIGKILLed launcher would leave its temp dir"
                );
                Reaper { stdin: None }
            }
        }
    }

    fn tell(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            if std::io::Write::write_all(s, format!("{line}\n").as_bytes()).is_err() {
                self.stdin = None;
            }
        }
    }
}

fn report_stop(code: i32, reason: &str, culprit: Option<&str>) {
    let by = culprit
        .map(|n| format!(" [caused by {n}]"))
        .unwrap_or_default();
    if !exit::is_failure(code) {
        info!("stopping: {reason}{by}");
    } else {
        error!("stopping: {reason}{by}");
    }
}

async fn flush(to_master: mpsc::UnboundedSender<Vec<u8>>, writer: JoinHandle<()>) {
    drop(to_master);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

#[allow(clippy::too_many_arguments)]
fn start(
    name: &str,
    plan: &Plan,
    me: usize,
    log_dir: &Path,
    local: &mpsc::UnboundedSender<Local>,
    to_master: &mpsc::UnboundedSender<Vec<u8>>,
    procs: &mut Vec<Running>,
    watchers: &mut Vec<JoinHandle<()>>,
    s: &crate::settings::Settings,
) {
    let rank = &plan.ranks[me];
    let fail = |code: i32, reason: String| {
        error!("{reason}");
        let _ = to_master.send(line(&ToMaster::Failed { code, reason }));
    };
    let Some(cmd) = rank.commands.iter().find(|c| c.name == name) else {
        fail(
            exit::INTERNAL,
            format!("the master asked for `{name}`, which this rank's plan does not have"),
        );
        return;
    };
    let log = (name != "client").then(|| log_dir.join(format!("{}.{name}.log", rank.node)));
    if let Some(l) = &log {
        let header = format!(
            "=== ray-launch: starting {name} on {} at {}\n=== {}\n",
            rank.node,
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            cmd.shell()
        );
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l)
            .and_then(|mut f| std::io::Write::write_all(&mut f, header.as_bytes()));
    }
    let out = match &log {
        Some(l) => proc::Output::Log(l),
        None => proc::Output::Inherit,
    };
    let mut child = match proc::spawn(&cmd.argv, &cmd.env, out) {
        Ok(c) => c,
        Err(e) => {
            fail(
                exit::LAUNCH_FAILURE,
                format!("cannot start {name} (`{}`): {e}", cmd.argv[0]),
            );
            return;
        }
    };
    let pid = child.id().map_or(0, |p| p as i32);
    info!(
        "started {name} (pid {pid}){}",
        log.as_ref()
            .map(|l| format!(", log {}", l.display()))
            .unwrap_or_default()
    );
    let tx = local.clone();
    let n = name.to_string();
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            let _ = tx.send(Local::Exit { name: n, status });
        }
    });
    procs.push(Running {
        name: name.to_string(),
        pid,
        log: log.clone(),
    });
    if name.starts_with("ray-") {
        let tx = local.clone();
        let n = name.to_string();
        let l = log.clone().expect("ray logs to a file");
        watchers.push(tokio::spawn(async move {
            if watch_log(&l, "Ray runtime started").await {
                let _ = tx.send(Local::Up { name: n });
            }
        }));
    } else if name == "engine" {
        if rank.replica_rank == 0 {
            let ep = &plan.endpoints[rank.replica];
            watchers.push(tokio::spawn(health(
                ep.health_url.clone(),
                s.config.health.interval.0,
                s.config.health.failures,
                local.clone(),
            )));
        } else {
            let _ = local.send(Local::Up {
                name: "engine".into(),
            });
        }
    }
}

/// Wait until `needle` appears in the file (appended to by a child).
async fn watch_log(path: &Path, needle: &str) -> bool {
    let mut offset = 0usize;
    let mut carry = String::new();
    loop {
        if let Ok(data) = std::fs::read(path) {
            if data.len() > offset {
                carry.push_str(&String::from_utf8_lossy(&data[offset..]));
                offset = data.len();
                if carry.contains(needle) {
                    return true;
                }
                let keep = carry.len().saturating_sub(needle.len());
                let cut = (0..=keep)
                    .rev()
                    .find(|i| carry.is_char_boundary(*i))
                    .unwrap_or(0);
                carry.drain(..cut);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Readiness, then liveness, of the engine's HTTP server. Proxies are ignored: cluster shells
/// often export http_proxy, and this is a local address.
async fn health(url: String, every: Duration, failures: u32, tx: mpsc::UnboundedSender<Local>) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Local::Failed {
                code: exit::INTERNAL,
                reason: format!("HTTP client: {e}"),
            });
            return;
        }
    };
    let probe = |c: &reqwest::Client| {
        let req = c.get(&url).send();
        async move {
            match req.await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
                Err(e) => Err(if e.is_connect() {
                    "connection refused".to_string()
                } else {
                    e.to_string()
                }),
            }
        }
    };
    while probe(&client).await.is_err() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = tx.send(Local::Up {
        name: "engine".into(),
    });
    let mut bad = 0;
    loop {
        tokio::time::sleep(every).await;
        match probe(&client).await {
            Ok(()) => bad = 0,
            Err(e) => {
                bad += 1;
                if bad >= failures {
                    let _ = tx.send(Local::Failed {
                        code: exit::ENGINE_FAILURE,
                        reason: format!(
                            "engine health check {url} failed {bad} times in a row (last: {e})"
                        ),
                    });
                    return;
                }
            }
        }
    }
}

async fn killed(mut kill: watch::Receiver<bool>) {
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
async fn teardown(
    procs: Vec<Running>,
    grace: Duration,
    kill: watch::Receiver<bool>,
    temp_dir: String,
    leftovers_before: BTreeSet<PathBuf>,
) {
    let t0 = Instant::now();
    let stages: [&[&str]; 3] = [&["client"], &["engine"], &["ray-worker", "ray-head"]];
    for names in stages {
        let group: Vec<&Running> = procs
            .iter()
            .filter(|p| names.contains(&p.name.as_str()) && p.pid > 0)
            .collect();
        if group.is_empty() {
            continue;
        }
        let sids: Vec<i32> = group.iter().map(|p| p.pid).collect();
        let graceful = if *kill.borrow() {
            false
        } else {
            // Signal the process we started, not its whole group: Ray's gcs_server can hang
            // when it gets SIGTERM at the same time as `ray start`.
            for p in &group {
                proc::signal_pid(p.pid, Signal::SIGTERM);
            }
            tokio::select! {
                ok = proc::wait_sessions(&sids, grace, proc::ORPHAN_LINGER) => ok,
                _ = killed(kill.clone()) => false,
            }
        };
        if !graceful {
            let n: usize = sids
                .iter()
                .map(|s| proc::kill_session(*s, Signal::SIGKILL))
                .sum();
            if n > 0 {
                warn!("{}: {n} process(es) still running after SIGTERM (the grace of {} passed, or what it started was left orphaned): sent SIGKILL", names.join("/"), humantime::format_duration(grace));
            }
            if !proc::wait_sessions(&sids, Duration::from_secs(3), Duration::from_secs(3)).await {
                error!(
                    "processes of {} are still alive after SIGKILL",
                    names.join("/")
                );
            }
        }
    }
    if Path::new(&temp_dir).exists() {
        if let Err(e) = std::fs::remove_dir_all(&temp_dir) {
            warn!("cannot remove {temp_dir}: {e}");
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spawn(name: &str, script: &str, log: &Path) -> Running {
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
            name: name.to_string(),
            pid,
            log: None,
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
        teardown(
            procs,
            grace,
            kill,
            "/nonexistent-rl".into(),
            BTreeSet::new(),
        )
        .await;
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
        std::fs::create_dir(&temp).unwrap();
        teardown(
            procs,
            Duration::from_secs(5),
            kill_rx,
            temp.display().to_string(),
            BTreeSet::new(),
        )
        .await;
        let order: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(order, ["client", "engine", "ray-head"]);
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
