//! Attacks on a job on the Slurm test bed, the way another user of a shared cluster could
//! make them: a foreign process on the launcher channel (forged, replayed and foreign-job
//! hellos, garbage, a flood of idle connections), a fake master squatting the channel port,
//! a squatter on the engine's port, a pre-filled temp dir, secrets in the config; and two
//! jobs and two steps of one job on the same nodes at once. Each ends with the job safe and
//! the attacker named, and nothing of the job left behind.
//!
//! `#[ignore]`: they need root, the test bed and the venv (scripts/test.sh runs them).

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
mod common;
use common::*;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RAY3: &str = "engine: vllm\nmodel: tiny\nserved_model_name: tiny-chat\nparallel: {tensor: 3}\ngpus_per_node: 1\nvllm: {executable: @STANDIN@/vllm}";
const MP3: &str = "engine: vllm\nmodel: tiny\nparallel: {tensor: 3}\ngpus_per_node: 1\nvllm: {executable: @STANDIN@/vllm, backend: mp}";
const NOBODY: &str = "65534";

/// `cmd` run as the unprivileged user `nobody`, optionally inside node `netns`'s network.
/// `args` run as the unprivileged user `nobody`, on the host or inside node `node` (its
/// network, PID and mount namespaces: the launcher there sees it as a local process).
/// (The system's python: nobody cannot enter root's home, where a pyenv may live.)
fn as_nobody(node: Option<usize>, args: &[&str]) -> Command {
    let mut c = match node {
        Some(n) => {
            let init = node_init(n);
            let mut c = Command::new("nsenter");
            c.args(["-t", &init.to_string(), "-n", "-p", "-m", "setpriv"]);
            c
        }
        None => Command::new("setpriv"),
    };
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]);
    c.args(args.iter().map(|a| {
        if *a == "python3" {
            "/usr/bin/python3"
        } else {
            a
        }
    }));
    c.current_dir("/");
    c
}

/// The attack script, copied where nobody can read it (the checkout may be private).
fn attack_script(bed: &Bed) -> String {
    let to = bed.path("attack.py");
    if !to.exists() {
        std::fs::copy(root().join("tests/attack/channel.py"), &to).unwrap();
    }
    to.display().to_string()
}

/// Kill what runs on node `n` with `needle` in its command line (nsenter forks with `-p`:
/// killing the child we spawned would not reach it).
fn kill_on_node(n: usize, needle: &str) {
    for (node, pid, cmd) in node_procs() {
        if node == format!("node{n}") && cmd.contains(needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The host pid of node `n`'s init (tini), whose namespaces are the node's.
fn node_init(n: usize) -> i32 {
    let o = Command::new("ip")
        .args(["netns", "pids", &format!("sl-n{n}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "tini")
        })
        .unwrap_or_else(|| panic!("no tini on node{n}"))
}

/// Submit `script` with sbatch on all three nodes; `hold` keeps it pending until released.
fn sbatch(bed: &Bed, name: &str, script: &str, hold: bool) -> String {
    let p = bed.path(&format!("{name}.sbatch"));
    std::fs::write(&p, format!("#!/bin/bash\n{script}\n")).unwrap();
    let mut c = slurm("sbatch");
    c.args(["--parsable", "-N3", "--ntasks-per-node=1", "-J", name])
        .arg(format!(
            "--output={}",
            bed.path(&format!("{name}.out")).display()
        ))
        .arg(format!("--chdir={}", bed.dir.path().display()));
    if hold {
        c.arg("--hold");
    }
    let out = c.arg(&p).output().unwrap();
    assert!(out.status.success(), "sbatch: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn scontrol(args: &[&str]) {
    let out = slurm("scontrol").args(args).output().unwrap();
    assert!(out.status.success(), "scontrol {args:?}: {}", text(&out));
}

/// Wait until `path` (an endpoint file) says `ready`; panics with the job's output if not.
fn wait_ready(bed: &Bed, path: &Path, out: &str, limit: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        if let Some(v) = endpoint_status(path) {
            if v["status"] == "ready" {
                return v;
            }
            assert_ne!(v["status"], "failed", "{v}\n{}", job_out(bed, out));
        }
        assert!(
            t0.elapsed() < limit,
            "{} not ready after {limit:?}:\n{}",
            path.display(),
            job_out(bed, out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn job_out(bed: &Bed, name: &str) -> String {
    std::fs::read_to_string(bed.path(&format!("{name}.out"))).unwrap_or_default()
}

/// Cancels its jobs when dropped (a failed assertion must not leave a job running).
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let ids: Vec<&str> = self.0.iter().map(String::as_str).collect();
            cancel(&ids);
        }
    }
}

/// scancel the jobs and wait until Slurm has none of them left.
fn cancel(jobs: &[&str]) {
    let _ = slurm("scancel").args(jobs).status();
    let t0 = Instant::now();
    loop {
        let out = slurm("squeue").args(["-h", "-o", "%i"]).output().unwrap();
        let left = String::from_utf8_lossy(&out.stdout).to_string();
        if !jobs.iter().any(|j| left.lines().any(|l| l.trim() == *j)) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "jobs {jobs:?} still queued: {left}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// HTTP status of GET `url`, with `Authorization: Bearer key` if given.
fn http(url: &str, key: Option<&str>) -> String {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ]);
    if let Some(k) = key {
        c.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    String::from_utf8_lossy(&c.output().unwrap().stdout).to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The pid of the launcher (not its reaper) on node `n`.
fn launcher_pid(n: usize) -> Option<i32> {
    node_procs()
        .into_iter()
        .find(|(node, _, c)| {
            *node == format!("node{n}") && c.starts_with("ray-launch:") && c.contains("--config")
        })
        .map(|(_, p, _)| p)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_foreign_user_on_the_channel_is_refused_and_named_and_the_job_serves() {
    let bed = Bed::new();
    let cfg = bed.config(
        RAY3,
        "env: {STANDIN_EXPECT_NODES: 3, HF_TOKEN: hf_do_not_leak_4711, WANDB_PROJECT: visible}\nevent_log: events.jsonl",
    );
    // the workers come late, so the attacks land during the rendezvous
    let wrapper = bed.path("late-workers.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/bash\nif [ \"$SLURM_NODEID\" != 0 ]; then sleep 6; fi\nexec {} --config {}\n",
            bin().display(),
            cfg.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let job = sbatch(
        &bed,
        "rl-sec",
        &format!("srun --kill-on-bad-exit=0 {}", wrapper.display()),
        true,
    );
    let _guard = Jobs(vec![job.clone()]);
    // squeue shows the pending job to everyone, so its ports are predictable: a fake master
    // takes the first channel port before the job runs
    let cand = ray_launch::plan::candidate_blocks(&job, "0", (20000, 32767));
    let mut fake = as_nobody(
        Some(1),
        &[
            "python3",
            &attack_script(&bed),
            "fake-master",
            &cand[0].to_string(),
            "25",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    scontrol(&["release", &job]);
    // the real master listens on the next candidate; the foreign user floods and forges there
    let flood = as_nobody(None, &[
        "bash", "-c",
        &format!("for i in $(seq 100); do (exec 3<>/dev/tcp/10.77.0.11/{p}) 2>/dev/null && break; sleep 0.1; done; exec /usr/bin/python3 {} flood 10.77.0.11 {p} {job} 0", attack_script(&bed), p = cand[1]),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let logs = bed.path(&format!("ray-launch-{job}"));
    let ep_path = logs.join("endpoint.json");
    let ep = wait_ready(&bed, &ep_path, "rl-sec", Duration::from_secs(120));
    let flood = wait_limited(&mut { flood }, Duration::from_secs(60));
    let summary: serde_json::Value = serde_json::from_str(
        text(&flood)
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or("{}"),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", text(&flood)));
    eprintln!("attacker saw: {summary}");
    assert_eq!(summary["challenge_seen"], true, "{summary}");
    for k in [
        "garbage_closed",
        "forged_proof_closed",
        "foreign_uid_closed",
        "replay_closed",
        "other_job_closed",
        "oversized_closed",
    ] {
        assert_eq!(summary[k], true, "{k}: {summary}");
    }
    let dropped = summary["idle_dropped"].as_u64().unwrap();
    assert!(
        dropped >= 450,
        "idle connections are dropped, not kept: {summary}"
    );
    // the master stays small
    let master = launcher_pid(1).expect("the master's launcher");
    let rss = rss_kib(master);
    eprintln!("master launcher RSS after the flood: {} KiB", rss);
    assert!(rss < 100 * 1024, "{rss} KiB");
    // every rank is in: the channel is closed to newcomers
    assert!(std::net::TcpStream::connect_timeout(
        &format!("10.77.0.11:{}", cand[1]).parse().unwrap(),
        Duration::from_secs(2)
    )
    .is_err());
    // the API key: 401 without, 200 with the key from api_key_path; vLLM's /health is open
    let url = ep["url"].as_str().unwrap().to_string();
    let key = std::fs::read_to_string(ep["api_key_path"].as_str().unwrap()).unwrap();
    assert_eq!(http(&format!("{url}/models"), None), "401");
    assert_eq!(http(&format!("{url}/models"), Some("wrong")), "401");
    assert_eq!(http(&format!("{url}/models"), Some(&key)), "200");
    // Ray runs with token auth on every node
    let mut tokens = Vec::new();
    for n in 1..=3 {
        let raylet = node_procs()
            .into_iter()
            .find(|(node, _, c)| *node == format!("node{n}") && c.starts_with("raylet:"))
            .map(|(_, p, _)| p)
            .unwrap_or_else(|| panic!("no raylet on node{n}"));
        let env =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{raylet}/environ")).unwrap())
                .to_string();
        assert!(
            env.split('\0').any(|v| v == "RAY_AUTH_MODE=token"),
            "node{n}"
        );
        let tf = env
            .split('\0')
            .find_map(|v| v.strip_prefix("RAY_AUTH_TOKEN_PATH="))
            .unwrap()
            .to_string();
        assert_eq!(mode(Path::new(&tf)), 0o600, "{tf}");
        assert_eq!(mode(Path::new(&tf).parent().unwrap()), 0o700);
        tokens.push(std::fs::read_to_string(&tf).unwrap());
    }
    assert!(tokens.windows(2).all(|w| w[0] == w[1]) && tokens[0].len() == 64);
    // modes of everything the launcher wrote
    assert_eq!(mode(&logs), 0o700, "log dir");
    for f in files(&logs) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&bed.path("events.jsonl")), 0o600);
    // the attackers are named: the master's event log and the workers' logs
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    let refused: Vec<serde_json::Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "peer_refused")
        .collect();
    let reasons: Vec<String> = refused
        .iter()
        .map(|e| format!("{} {}", e["peer"], e["reason"]))
        .collect();
    eprintln!("refused: {reasons:#?}");
    for want in [
        "from uid 65534",
        "Replayed credential",
        "of job 999999 step 0",
        "no hello (unreadable message",
        "no hello (message longer",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no refusal with `{want}` in {reasons:#?}"
        );
    }
    assert!(
        refused
            .iter()
            .all(|e| e["peer"].as_str().unwrap().starts_with("10.77.0.1:")),
        "{reasons:?}"
    );
    let fake_out = wait_limited(&mut fake, Duration::from_secs(40));
    eprintln!("fake master: {}", text(&fake_out));
    cancel(&[&job]);
    let out = job_out(&bed, "rl-sec");
    eprintln!("{out}");
    assert!(
        out.contains(&format!(
            "10.77.0.11:{} answered as the master, but",
            cand[0]
        )),
        "the workers name the fake master: {out}"
    );
    assert!(out.contains(&format!("using {}", cand[1])), "{out}");
    // no secret in anything the job wrote, nor in the plan
    let plan = Command::new(bin())
        .args([
            "plan",
            "--config",
            cfg.to_str().unwrap(),
            "--nodelist",
            "node[1-3]",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let mut haystacks = vec![
        ("plan".to_string(), text(&plan)),
        ("job output".to_string(), out),
    ];
    for f in files(bed.dir.path()) {
        let name = f.display().to_string();
        if name.ends_with("job.yaml") || name.ends_with(".vllm.json") {
            continue; // the config itself, and the stand-in's own records
        }
        haystacks.push((
            name,
            String::from_utf8_lossy(&std::fs::read(&f).unwrap()).to_string(),
        ));
    }
    assert!(text(&plan).contains("<secret>") && text(&plan).contains("visible"));
    for (name, h) in &haystacks {
        for secret in [key.as_str(), tokens[0].as_str(), "hf_do_not_leak_4711"] {
            assert!(!h.contains(secret), "a secret in {name}");
        }
    }
    assert!(!Path::new(ep["api_key_path"].as_str().unwrap()).exists());
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_squatter_on_the_engine_port_is_named_and_the_job_never_says_ready() {
    let bed = Bed::new();
    const PORT: &str = "29977";
    let squat = format!(
        "import http.server as h, os\nclass H(h.BaseHTTPRequestHandler):\n    def do_GET(s):\n        s.send_response(200); s.end_headers(); s.wfile.write(b'{{}}')\n    def log_message(s, *a): pass\nprint(os.getpid(), flush=True)\nh.HTTPServer(('0.0.0.0', {PORT}), H).serve_forever()\n"
    );
    let start_squatter = || {
        let mut c = as_nobody(Some(1), &["python3", "-c", &squat])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        (c, line.trim().to_string())
    };
    // 1. there before the job: the bind test finds it, nothing starts
    let cfg = bed.config(
        MP3,
        &format!("server: {{port: {PORT}}}\nevent_log: events.jsonl"),
    );
    let (mut sq, pid) = start_squatter();
    let out = run_limited(
        bed.srun(&[bin().to_str().unwrap(), "--config", cfg.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    let all = text(&out);
    eprintln!("{all}");
    assert!(
        all.contains(&format!(
            "port {PORT} is held by pid {pid} (python3), uid 65534"
        )),
        "{all}"
    );
    assert_eq!(out.status.code(), Some(6), "{all}");
    assert!(!all.contains("started engine"), "nothing started: {all}");
    // 2. it takes the port after the bind test, while the engine is slow to bind
    kill_on_node(1, "HTTPServer");
    let _ = sq.wait();
    let _ = std::fs::remove_file(bed.path("events.jsonl"));
    std::fs::remove_dir_all(endpoint_file(bed.dir.path()).parent().unwrap()).unwrap();
    let cfg = bed.config(
        MP3,
        &format!(
            "server: {{port: {PORT}}}\nevent_log: events.jsonl\nenv: {{STANDIN_BIND_DELAY: 8}}"
        ),
    );
    let mut c = bed.srun(&[bin().to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    let engine_log = loop {
        let found = std::fs::read_dir(bed.dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("ray-launch-"))
            .map(|d| d.path().join("node1.engine.log"));
        if let Some(l) = found.filter(|l| l.exists()) {
            break l;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the engine never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut sq, pid) = start_squatter();
    let out = wait_limited(&mut child, Duration::from_secs(60));
    kill_on_node(1, "HTTPServer");
    let _ = sq.wait();
    let all = text(&out);
    eprintln!("{all}");
    assert!(engine_log.exists());
    assert!(
        all.contains(&format!("port {PORT} answers, but it is held by pid {pid} (python3), uid 65534, not by the engine")),
        "{all}"
    );
    assert_eq!(out.status.code(), Some(6), "{all}");
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    assert!(!events.contains("\"event\":\"ready\""), "{events}");
    let ep = endpoint_status(&endpoint_file(bed.dir.path())).unwrap();
    assert_eq!(ep["status"], "failed");
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn two_jobs_and_two_steps_of_one_job_serve_side_by_side() {
    let bed = Bed::new();
    let keep = |p: PathBuf, name: &str| {
        let to = bed.path(name);
        std::fs::rename(&p, &to).unwrap();
        to
    };
    let ray_cfg = keep(
        bed.config(RAY3, "env: {STANDIN_EXPECT_NODES: 3}"),
        "ray.yaml",
    );
    let mp = keep(bed.config(MP3, ""), "mp.yaml");
    let b_cfg = keep(
        bed.config(&format!("{MP3}\nsecurity: {{auth: secret}}"), ""),
        "b.yaml",
    );
    let rl = bin().display().to_string();
    // job A: two steps at once (a Ray cluster and an mp engine) on the same three nodes
    let a = sbatch(
        &bed,
        "rl-two-a",
        &format!("srun --overlap --kill-on-bad-exit=0 {rl} --config {} &\nsrun --overlap --kill-on-bad-exit=0 {rl} --config {} &\nwait", ray_cfg.display(), mp.display()),
        false,
    );
    // job B: another job on the same nodes, authenticated with a per-user secret
    let b = sbatch(
        &bed,
        "rl-two-b",
        &format!("export RAY_LAUNCH_SECRET=the-users-own-secret-0123456789\nsrun --kill-on-bad-exit=0 {rl} --config {} --endpoint-file ep-b.json", b_cfg.display()),
        false,
    );
    let _guard = Jobs(vec![a.clone(), b.clone()]);
    let dir_a = bed.path(&format!("ray-launch-{a}"));
    let eps = [
        (dir_a.join("endpoint.json"), "rl-two-a"),
        (dir_a.join("endpoint-step1.json"), "rl-two-a"),
        (bed.path("ep-b.json"), "rl-two-b"),
    ];
    let mut seen = Vec::new();
    for (p, out) in &eps {
        let v = wait_ready(&bed, p, out, Duration::from_secs(120));
        let key = std::fs::read_to_string(v["api_key_path"].as_str().unwrap()).unwrap();
        let url = v["url"].as_str().unwrap().to_string();
        assert_eq!(http(&format!("{url}/models"), Some(&key)), "200", "{url}");
        seen.push((url, key));
    }
    eprintln!(
        "endpoints: {:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    let urls: std::collections::BTreeSet<&String> = seen.iter().map(|s| &s.0).collect();
    assert_eq!(urls.len(), 3, "three endpoints, three ports");
    let keys: std::collections::BTreeSet<&String> = seen.iter().map(|s| &s.1).collect();
    assert_eq!(keys.len(), 3, "each step has its own key");
    // one step's key opens no other step's endpoint
    assert_eq!(
        http(&format!("{}/models", seen[2].0), Some(&seen[0].1)),
        "401"
    );
    // separate logs for the two steps of job A
    assert!(
        dir_a.join("node1.engine.log").exists() && dir_a.join("node1-step1.engine.log").exists()
    );
    let b_out = job_out(&bed, "rl-two-b");
    assert!(b_out.contains("auth secret"), "{b_out}");
    cancel(&[&a, &b]);
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_users_own_temp_dir_keeps_its_files_and_an_open_one_is_refused() {
    let bed = Bed::new();
    let mine = bed.path("mine");
    for n in 0..3 {
        let d = PathBuf::from(format!("{}-{n}", mine.display()));
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        std::fs::write(d.join("keep.txt"), "the user's own file").unwrap();
    }
    let cfg = bed.config_ray(
        RAY3,
        &format!("temp_dir: '{}-{{node_rank}}'", mine.display()),
        "env: {STANDIN_EXPECT_NODES: 3}",
    );
    let out = bed.run_client(&cfg, &["true"], Duration::from_secs(120));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    for n in 0..3 {
        let d = PathBuf::from(format!("{}-{n}", mine.display()));
        let left: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            ["keep.txt"],
            "only the user's file stays in {}",
            d.display()
        );
    }
    // a directory others can enter is refused before anything starts; its file survives
    let open = PathBuf::from(format!("{}-0", mine.display()));
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = bed.run_client(&cfg, &["true"], Duration::from_secs(60));
    let all = text(&out);
    eprintln!("{all}");
    assert!(
        all.contains(&format!(
            "ray.temp_dir: {} exists with mode 755",
            open.display()
        )),
        "{all}"
    );
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(!all.contains("started ray-head"), "{all}");
    assert_eq!(
        std::fs::read_to_string(open.join("keep.txt")).unwrap(),
        "the user's own file"
    );
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_relay_on_the_first_channel_port_is_refused_named_and_the_job_serves() {
    let bed = Bed::new();
    let cfg = bed.config(RAY3, "event_log: events.jsonl");
    let job = sbatch(
        &bed,
        "rl-relay",
        &format!(
            "srun --kill-on-bad-exit=0 {} --config {}",
            bin().display(),
            cfg.display()
        ),
        true,
    );
    let _guard = Jobs(vec![job.clone()]);
    // another user squats the job's first channel port on the master's node and relays it to
    // the real master (on the next candidate), rewriting the Welcome and injecting a Stop
    // once a rank is accepted through it
    let cand = ray_launch::plan::candidate_blocks(&job, "0", (20000, 32767));
    let relay = as_nobody(
        Some(1),
        &[
            "python3",
            &attack_script(&bed),
            "relay",
            &cand[0].to_string(),
            "10.77.0.11",
            &cand[1].to_string(),
            "30",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    scontrol(&["release", &job]);
    let logs = bed.path(&format!("ray-launch-{job}"));
    let ep = wait_ready(
        &bed,
        &logs.join("endpoint.json"),
        "rl-relay",
        Duration::from_secs(120),
    );
    assert_eq!(ep["status"], "ready");
    let relay = wait_limited(&mut { relay }, Duration::from_secs(60));
    let summary: serde_json::Value = serde_json::from_str(
        text(&relay)
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or("{}"),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", text(&relay)));
    eprintln!("the relay saw: {summary}");
    assert!(summary["relayed"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert_eq!(
        summary["accepted"], 0,
        "the master accepted a rank through the relay: {summary}"
    );
    assert_eq!(summary["injected"], 0, "{summary}");
    // named in the event log, and the job is still serving
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    let want = format!(
        "reached the master through port {}, not the master's {}",
        cand[0], cand[1]
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("peer_refused") && l.contains(&want)),
        "no peer_refused with `{want}`:\n{events}"
    );
    let url = ep["url"].as_str().unwrap().to_string();
    let key = std::fs::read_to_string(ep["api_key_path"].as_str().unwrap()).unwrap();
    assert_eq!(http(&format!("{url}/models"), Some(&key)), "200");
    let out = job_out(&bed, "rl-relay");
    assert!(!out.contains("forged by the port squatter"), "{out}");
}
