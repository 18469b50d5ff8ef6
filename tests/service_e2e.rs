//! A service on the local Slurm cluster: a chain of one-node jobs (`--time=2`, stand-in
//! engine) that each submit their successor before the limit and hand over to it, behind one
//! `ray-launch route --service` that a client uses without pause; a successor whose config is
//! broken; `ray-launch service stop`. `#[ignore]`: run by scripts/test.sh.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ONE_NODE: &str = "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, nodes_per_replica: 1}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_SERVICE_MS: '30'}";

/// Cancels the test's jobs however it ends (a failed test must not leave the bed busy).
struct CancelJobs;

impl Drop for CancelJobs {
    fn drop(&mut self) {
        let _ = slurm("scancel").args(["-n", "rl-svc"]).status();
    }
}

/// The service file.
fn service(dir: &Path) -> serde_json::Value {
    std::fs::read(dir.join("service.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn jobs(dir: &Path) -> Vec<(String, String)> {
    service(dir)["jobs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|j| {
                    (
                        j["job"].as_str().unwrap_or("").to_string(),
                        j["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, dir: &Path, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < limit,
            "{what} within {limit:?}: {:#}",
            service(dir)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The job's batch script (its options in `#SBATCH` lines, so the successor has them too),
/// submitted; its id.
fn submit(bed: &Bed, cfg: &Path) -> String {
    let script = bed.path("svc.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH -N1 --ntasks-per-node=1 --time=2 -J rl-svc\n#SBATCH --output={}/job-%j.out\nsrun --kill-on-bad-exit=0 {} --config {}\n",
            bed.dir.path().display(),
            bin().display(),
            cfg.display()
        ),
    )
    .unwrap();
    let out = slurm("sbatch")
        .args([
            "--parsable",
            &format!("--chdir={}", bed.dir.path().display()),
        ])
        .arg(&script)
        .output()
        .unwrap();
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!job.is_empty(), "{}", text(&out));
    job
}

/// Service `name`'s first job (in `--time=2` jobs handing over `handover_before` before
/// their end), submitted and serving: the service's directory, the config, the job.
fn first_job(bed: &Bed, name: &str, handover_before: &str) -> (PathBuf, PathBuf, String) {
    let dir = bed.path("svc");
    let cfg = bed.config(
        ONE_NODE,
        &format!(
            "service: {{name: {name}, dir: @RECORD@/svc, handover_before: {handover_before}}}"
        ),
    );
    let first = submit(bed, &cfg);
    wait_for(
        "the first job serves",
        Duration::from_secs(90),
        &dir,
        || jobs(&dir).contains(&(first.clone(), "serving".into())),
    );
    (dir, cfg, first)
}

/// `ray-launch route --service NAME` on this host; its URL.
fn front(dir: &Path, name: &str) -> (KillOnDrop, String) {
    let port = free_port();
    let child = Command::new(bin())
        .args(["route", "--service", name, "--service-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(format!("/tmp/{name}-route.log")).unwrap())
        .spawn()
        .unwrap();
    // up once a job of the service serves through it
    let t0 = Instant::now();
    while !Command::new("curl")
        .args(["-sf", "--noproxy", "*", "-m", "2"])
        .arg(format!("http://127.0.0.1:{port}/health"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "route --service never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (KillOnDrop(child), format!("http://127.0.0.1:{port}/v1"))
}

/// Completions through `url` without pause until `stop`: 200s by the job that answered
/// (`x-ray-launch-job`), and every failure.
fn client(
    url: String,
    key: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(BTreeMap<String, usize>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut by_job, mut failed) = (BTreeMap::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let o = Command::new("curl")
                .args([
                    "-s",
                    "--noproxy",
                    "*",
                    "-m",
                    "30",
                    "-D",
                    "-",
                    "-o",
                    "/dev/null",
                ])
                .args(["-H", &format!("Authorization: Bearer {key}")])
                .args(["-H", "Content-Type: application/json"])
                .args(["-d", r#"{"model":"tiny","prompt":"hi","max_tokens":2}"#])
                .arg(format!("{url}/completions"))
                .output()
                .unwrap();
            let head = String::from_utf8_lossy(&o.stdout).to_string();
            let ok = head.starts_with("HTTP/1.1 200");
            let job = head
                .lines()
                .find_map(|l| l.strip_prefix("x-ray-launch-job: "))
                .map(|j| j.trim().to_string());
            match (ok, job) {
                (true, Some(j)) => *by_job.entry(j).or_insert(0) += 1,
                _ => failed.push(format!(
                    "{} {}",
                    o.status,
                    head.lines().next().unwrap_or("")
                )),
            }
        }
        (by_job, failed)
    })
}

fn ray_launch(args: &[&str]) -> String {
    let o = Command::new(bin()).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    text(&o)
}

fn log_of(bed: &Bed, job: &str) -> String {
    std::fs::read_to_string(bed.path(&format!("job-{job}.out"))).unwrap_or_default()
}

/// Three jobs of one node, `--time=2`, handing over 85 s before their end (so each serves
/// about half a minute; the first on SIGUSR1, earlier): a client sends requests without pause through one `route
/// --service` for the whole chain; `service stop` ends it at the third job. No request
/// fails, every job serves some, each ends with exit 0 before its limit, and nothing is left.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_chain_of_three_jobs_hands_over_with_no_failed_request() {
    let bed = Bed::new();
    let _cancel = CancelJobs;
    let (dir, _cfg, first) = first_job(&bed, "chain", "85s");
    assert_eq!(private_mode(&dir), 0o700);
    assert_eq!(private_mode(&dir.join("key")), 0o600);
    let key = std::fs::read_to_string(dir.join("key"))
        .unwrap()
        .trim()
        .to_string();
    let (_router, url) = front(&dir, "chain");
    let stop = Arc::new(AtomicBool::new(false));
    let load = client(url, key, stop.clone());
    // the first hands over early: SIGUSR1, as `#SBATCH --signal=USR1@…` would send it
    std::thread::sleep(Duration::from_secs(2));
    assert!(slurm("scancel")
        .args(["--signal=USR1", &first])
        .status()
        .unwrap()
        .success());

    // two handovers: each job submits the next, which serves, and then it ends
    wait_for(
        "three jobs, the third serving",
        Duration::from_secs(300),
        &dir,
        || {
            let j = jobs(&dir);
            j.len() == 3 && j[2].1 == "serving" && j[1].1 == "ended"
        },
    );
    let chain: Vec<String> = jobs(&dir).into_iter().map(|(j, _)| j).collect();
    let status = ray_launch(&[
        "status",
        "--service",
        "chain",
        "--service-dir",
        dir.to_str().unwrap(),
    ]);
    eprintln!("{status}");
    assert!(
        status.contains(&format!("job {}: serving", chain[2])),
        "{status}"
    );
    std::thread::sleep(Duration::from_secs(3));
    // the chain's end is the client's end too (after `service stop` nothing serves: 503)
    stop.store(true, Ordering::Relaxed);
    let (by_job, failed) = load.join().unwrap();
    let said = ray_launch(&["service", "stop", "chain", "--dir", dir.to_str().unwrap()]);
    assert!(
        said.contains(&format!("job {} drains and exits 0", chain[2])),
        "{said}"
    );
    for j in &chain {
        wait_gone(j, Duration::from_secs(60));
    }
    eprintln!(
        "requests by job: {by_job:?}; service file: {:#}",
        service(&dir)
    );
    assert!(
        failed.is_empty(),
        "no failed request: {} failed, the first: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    for j in &chain {
        assert!(
            by_job.get(j).copied().unwrap_or(0) > 0,
            "job {j} served none: {by_job:?}"
        );
    }
    let f = service(&dir);
    assert_eq!(f["stopped"], true);
    for (i, j) in chain.iter().enumerate() {
        let log = log_of(&bed, j);
        assert!(log.contains("exit 0"), "job {j}:\n{log}");
        let want = match chain.get(i + 1) {
            Some(next) => format!("handed over to job {next}"),
            None => "the service was stopped (ray-launch service stop)".into(),
        };
        assert!(log.contains(&want), "job {j}:\n{log}");
        assert!(
            !log.contains("DUE TO TIME LIMIT"),
            "job {j} hit its limit:\n{log}"
        );
        assert_eq!(f["jobs"][i]["state"], "ended", "{f:#}");
    }
    // the first handed over on SIGUSR1, long before its handover time
    assert!(
        log_of(&bed, &chain[0]).contains("SIGUSR1: handing over to a successor (service)"),
        "{}",
        log_of(&bed, &chain[0])
    );
    // (the second started well before the first's handover time: its end, 2 min after its
    // start, is well before the first's handover time + 2 min)
    let at = |i: usize, k: &str| f["jobs"][i][k].as_u64().unwrap() as i64;
    let early = at(0, "handover_at") + 120 - at(1, "end");
    assert!(
        early > 10,
        "job {} started only {early} s before job {}'s handover time",
        chain[1],
        chain[0]
    );
    // the third submitted none: two handovers, two successors
    assert!(f["jobs"][2]["successor"].is_null(), "{f:#}");
}

/// A successor whose config was broken after the chain started ends at once (exit 2): the
/// current job keeps serving and the service file says why, with the successor's log; then
/// `service stop` drains it (exit 0).
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_broken_successor_leaves_the_current_job_serving_and_says_why() {
    let bed = Bed::new();
    let _cancel = CancelJobs;
    let (dir, cfg, first) = first_job(&bed, "broken", "95s");
    // the next job reads a config with a typo
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}\nreplicas: {{on_falure: restart}}\n")).unwrap();
    wait_for(
        "the successor's failure noted",
        Duration::from_secs(120),
        &dir,
        || {
            service(&dir)["jobs"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("failed"))
        },
    );
    let f = service(&dir);
    let reason = f["jobs"][0]["reason"].as_str().unwrap().to_string();
    let next = f["jobs"][0]["successor"].as_str().unwrap().to_string();
    assert!(
        reason.contains(&format!("the successor job {next} failed"))
            && reason.contains("before it served")
            && reason.contains(&format!("job-{next}.out"))
            && reason.contains("this job serves until its time limit"),
        "{reason}"
    );
    assert!(
        log_of(&bed, &next).contains("on_falure"),
        "{}",
        log_of(&bed, &next)
    );
    assert_eq!(f["jobs"][0]["state"], "serving");
    // it still answers, through a service router too
    let key = std::fs::read_to_string(dir.join("key"))
        .unwrap()
        .trim()
        .to_string();
    let (_router, url) = front(&dir, "broken");
    let stop = Arc::new(AtomicBool::new(false));
    let load = client(url, key, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let (by_job, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    ray_launch(&["service", "stop", "broken", "--dir", dir.to_str().unwrap()]);
    wait_gone(&first, Duration::from_secs(60));
    assert!(
        by_job.get(&first).copied().unwrap_or(0) > 0,
        "{by_job:?} {failed:?}"
    );
    let log = log_of(&bed, &first);
    assert!(log.contains("exit 0"), "{log}");
    assert_eq!(service(&dir)["jobs"][0]["state"], "ended");
}

fn private_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}
