//! Helpers shared by the end-to-end suites (tests/e2e.rs, tests/vllm_e2e.rs).
#![allow(dead_code)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NODES: usize = 3;
pub const BED_PROCS: &[&str] = &["unshare", "tini", "slurmd", "slurmstepd"];

/// A child killed when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Until `job` has left the queue (at most `limit`).
pub fn wait_gone(job: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let q = slurm("squeue").args(["-h", "-j", job]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            return;
        }
        assert!(t0.elapsed() < limit, "job {job} still queued");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ray-launch"))
}

pub fn slurm(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") {
            c.env_remove(k);
        }
    }
    c.env("SLURM_CONF", "/etc/slurm/slurm.conf");
    c
}

pub struct Bed {
    pub dir: tempfile::TempDir,
}

impl Bed {
    /// Check the bed is up and idle, and give the test a work dir on the shared filesystem.
    pub fn new() -> Bed {
        let out = slurm("sinfo")
            .args(["-h", "-N", "-t", "idle", "-o", "%N"])
            .output()
            .expect("sinfo runs (bash scripts/test.sh sets up the bed)");
        let idle = String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        assert_eq!(
            idle, NODES,
            "the test bed is not up with {NODES} idle nodes: run `bash slurm/testbed/up.sh`"
        );
        assert!(
            root().join(".venv/bin/ray").exists(),
            "no .venv: run scripts/setup.sh"
        );
        let dir = tempfile::Builder::new()
            .prefix("rl-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_no_leftovers("before the test");
        Bed { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write a config: `base` plus `extra` YAML; `timeouts` default to a short grace unless
    /// `extra` sets them. @STANDIN@ and @RECORD@ are replaced by the stand-in dir and the work dir.
    pub fn config(&self, base: &str, extra: &str) -> PathBuf {
        self.config_ray(base, "", extra)
    }

    /// [`Bed::config`] with more keys in the `ray:` map (`ray_fields`, e.g. `temp_dir: /x`).
    pub fn config_ray(&self, base: &str, ray_fields: &str, extra: &str) -> PathBuf {
        let standin = root().join("tests/standin");
        let ray_fields = if ray_fields.is_empty() {
            String::new()
        } else {
            format!(", {ray_fields}")
        };
        let timeouts = if extra.contains("timeouts:") {
            ""
        } else {
            "timeouts: {shutdown_grace: 5s, kill_wait: 30s}\n"
        };
        let yaml = format!(
            "{base}\nray: {{executable: {ray}, object_store_memory: 200MiB{ray_fields}}}\n{timeouts}{extra}\n",
            ray = root().join(".venv/bin/ray").display()
        )
        .replace("@STANDIN@", &standin.display().to_string())
        .replace("@RECORD@", &self.dir.path().display().to_string());
        let p = self.path("job.yaml");
        std::fs::write(&p, yaml).unwrap();
        p
    }

    pub fn srun(&self, args: &[&str]) -> Command {
        let mut c = slurm("srun");
        c.args(["-N3", "--ntasks-per-node=1", "--kill-on-bad-exit=0"])
            .args(args)
            .current_dir(self.dir.path());
        c
    }

    /// `srun ray-launch --config CFG -- CLIENT...` on the three nodes, to its end (at most `limit`).
    pub fn run_client(&self, cfg: &Path, client: &[&str], limit: Duration) -> Output {
        let mut args = vec![
            bin().display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--".into(),
        ];
        args.extend(client.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_limited(self.srun(&args), limit)
    }

    pub fn record(&self, node: &str, flavour: &str) -> serde_json::Value {
        let p = self.path(&format!("{node}.{flavour}.json"));
        let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_slice(&data).unwrap()
    }

    /// The argv and environment the stand-in engine recorded on `node`.
    pub fn argv(&self, node: &str, flavour: &str) -> (Vec<String>, serde_json::Value) {
        let rec = self.record(node, flavour);
        let argv = rec["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        (argv, rec["env"].clone())
    }
}

/// `argv` has `flag value` next to each other.
pub fn has(argv: &[String], flag: &str, value: &str) -> bool {
    argv.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// The Slurm job id of the running job named `name`.
pub fn job_id(name: &str) -> String {
    let o = slurm("squeue")
        .args(["-h", "-n", name, "-o", "%i"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The pid (seen from the host) of the first process named `comm` on node `node`.
pub fn pid_on(node: usize, comm: &str) -> Option<i32> {
    node_procs()
        .into_iter()
        .find(|(n, _, c)| *n == format!("node{node}") && c.starts_with(&format!("{comm}:")))
        .map(|(_, p, _)| p)
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

impl Drop for Bed {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_leftovers("after the test");
        } else {
            // best effort so the next test starts clean
            for (_, pid, _) in node_procs() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            for dir in ["/tmp", "/dev/shm"] {
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("rl-") && !n.starts_with("rl-e2e-") {
                        let _ = std::fs::remove_dir_all(e.path());
                    } else if n.starts_with("vllm_dist") {
                        // what the SIGKILLed engines leave
                        let _ = std::fs::remove_dir_all(e.path())
                            .or_else(|_| std::fs::remove_file(e.path()));
                    }
                }
            }
        }
    }
}

/// (node, pid, "comm cmdline") of every process in the nodes' namespaces that is not the bed's.
pub fn node_procs() -> Vec<(String, i32, String)> {
    let mut out = Vec::new();
    for i in 1..=NODES {
        let o = Command::new("ip")
            .args(["netns", "pids", &format!("sl-n{i}")])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_string();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rfind(')')
                .is_some_and(|i| stat[i + 2..].starts_with('Z'));
            if comm.is_empty() || zombie || BED_PROCS.contains(&comm.as_str()) {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            out.push((format!("node{i}"), pid, format!("{comm}: {cmd}")));
        }
    }
    out
}

/// Wait (a few seconds: Slurm's step cleanup is asynchronous) until the nodes hold nothing
/// but the bed's own processes and no job temp dir exists.
pub fn assert_no_leftovers(when: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let procs = node_procs();
        let dirs: Vec<String> = std::fs::read_dir("/tmp")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("rl-") && !n.starts_with("rl-e2e-"))
            .chain(
                ["/dev/shm", "/tmp"]
                    .iter()
                    .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
                    .map(|e| e.path().display().to_string())
                    .filter(|p| p.contains("vllm_dist")),
            )
            .collect();
        if procs.is_empty() && dirs.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("left behind {when}: processes {procs:#?}, temp dirs {dirs:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run with a hard limit; kill srun (and with it the step) if it hangs.
pub fn run_limited(mut c: Command, limit: Duration) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    wait_limited(&mut child, limit)
}

pub fn wait_limited(child: &mut Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let a = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let b = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let st = child.wait().unwrap();
            let out = Output {
                status: st,
                stdout: a.join().unwrap(),
                stderr: b.join().unwrap(),
            };
            panic!("timed out after {limit:?}:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: a.join().unwrap(),
        stderr: b.join().unwrap(),
    }
}

pub fn endpoint_status(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

pub fn endpoint_file(dir: &Path) -> PathBuf {
    let d = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("ray-launch-"))
        .expect("a log dir");
    d.path().join("endpoint.json")
}

/// Ranks' final lines: node -> exit code, from "...; exit N".
pub fn exits(out: &str) -> std::collections::BTreeMap<String, i32> {
    let mut m = std::collections::BTreeMap::new();
    for l in out.lines() {
        if let (Some(i), Some(j)) = (l.find(" ["), l.rfind("; exit ")) {
            if let Some(k) = l[i + 2..].find(']') {
                let node = l[i + 2..i + 2 + k]
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                if let Ok(c) = l[j + 7..].trim().parse() {
                    m.insert(node, c);
                }
            }
        }
    }
    m
}

/// The API key the endpoint file `f` names (`api_key_path`), trimmed.
pub fn api_key(f: &serde_json::Value) -> String {
    let p = f["api_key_path"].as_str().expect("api_key_path");
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

/// `scancel` the job named `name`, wait (at most 60 s) for its srun `child`, print its output
/// and check that every rank exited with 143; the output.
pub fn scancel_all_143(child: &mut std::process::Child, name: &str) -> String {
    assert!(slurm("scancel")
        .arg(job_id(name))
        .status()
        .unwrap()
        .success());
    let out = wait_limited(child, Duration::from_secs(60));
    let all = text(&out);
    eprintln!("{all}");
    let codes = exits(&all);
    assert!(
        !codes.is_empty() && codes.values().all(|c| *c == 143),
        "{codes:?}\n{all}"
    );
    all
}
