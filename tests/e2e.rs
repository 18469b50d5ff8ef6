//! End to end on the local 3-node Slurm cluster (slurm/testbed, brought up by
//! scripts/test.sh), with real Ray 2.60 from .venv and the stand-in engine
//! (tests/standin: a real Ray driver that serves /health and /v1/models).
//!
//! `#[ignore]`: they need root, the test bed and the venv. Run them with
//! `bash scripts/test.sh`, or `cargo test --test e2e -- --include-ignored --test-threads=1`
//! once `slurm/testbed/up.sh` has run. After every test, no process other than the bed's own
//! (tini, slurmd) may remain in any node's namespace, and no temp dir of the job.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RAY3: &str = "engine: vllm\nmodel: tiny\nserved_model_name: tiny-chat\nparallel: {tensor: 3}\ngpus_per_node: 1\nvllm: {executable: @STANDIN@/vllm}\nenv: {STANDIN_EXPECT_NODES: 3, STANDIN_RECORD_DIR: @RECORD@}";

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn ray_mode_reaches_ready_and_client_exit_code_is_the_steps() {
    let bed = Bed::new();
    let cfg = bed.config(RAY3, "");
    // no --noproxy: NO_PROXY from the launcher must keep the request off the (dead) proxy;
    // without the key the endpoint refuses, with OPENAI_API_KEY it answers
    let client = "cat \"$RAY_LAUNCH_ENDPOINT\" > client-saw.json; \
        curl -s -o /dev/null -w '%{http_code}' \"$OPENAI_BASE_URL/models\" > nokey.txt; \
        curl -sf -H \"Authorization: Bearer $OPENAI_API_KEY\" \"$OPENAI_BASE_URL/models\" > models.json || exit 9; \
        python3 -c 'import os; print(os.environ[\"RAY_AUTH_MODE\"], os.path.exists(os.environ[\"RAY_AUTH_TOKEN_PATH\"]))' > ray-auth.txt; exit 3";
    let mut c = bed.srun(&[
        bin().to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--event-log",
        "events.jsonl",
        "--",
        "bash",
        "-c",
        client,
    ]);
    c.env("http_proxy", "http://proxy.invalid:3128");
    let t0 = Instant::now();
    let out = run_limited(c, Duration::from_secs(120));
    let all = text(&out);
    eprintln!("{all}");
    assert_eq!(out.status.code(), Some(3), "the client's exit code");
    assert_eq!(
        exits(&all).values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "{:?}",
        exits(&all)
    );
    // the endpoint the client saw, and what it got from the stand-in engine
    let saw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bed.path("client-saw.json")).unwrap()).unwrap();
    assert_eq!(saw["status"], "ready");
    assert!(
        saw["url"]
            .as_str()
            .unwrap()
            .starts_with("http://10.77.0.11:"),
        "{saw}"
    );
    assert_eq!(saw["served_model_name"], "tiny-chat");
    let models = std::fs::read_to_string(bed.path("models.json")).unwrap();
    assert!(models.contains("tiny-chat"), "{models}");
    assert_eq!(
        std::fs::read_to_string(bed.path("nokey.txt")).unwrap(),
        "401"
    );
    assert_eq!(
        std::fs::read_to_string(bed.path("ray-auth.txt"))
            .unwrap()
            .trim(),
        "token True"
    );
    // the key file the endpoint file names is private, and gone with the job
    let kp = saw["api_key_path"].as_str().expect("api_key_path");
    assert!(kp.ends_with("endpoint.api-key"), "{kp}");
    assert!(
        !std::path::Path::new(kp).exists(),
        "the launcher removes its key file at the end"
    );
    // the engine ran on the master only, as a driver of the 3-node Ray cluster
    let (argv, env) = bed.argv("node1", "vllm");
    // what differs between the nodes is kept off vLLM's copy to the Ray workers
    let nco = bed.record("node1", "vllm")["non_carry_over"].clone();
    assert!(
        nco.as_array()
            .is_some_and(|v| v.iter().any(|x| x == "VLLM_CACHE_ROOT")
                && v.iter().any(|x| x == "VLLM_HOST_IP")),
        "{nco}"
    );
    assert!(
        has(&argv, "--distributed-executor-backend", "ray"),
        "{argv:?}"
    );
    assert!(has(&argv, "--tensor-parallel-size", "3"), "{argv:?}");
    assert!(env["RAY_ADDRESS"]
        .as_str()
        .unwrap()
        .starts_with("10.77.0.11:"));
    assert_eq!(env["VLLM_HOST_IP"], "10.77.0.11");
    assert!(!bed.path("node2.vllm.json").exists());
    // the progress and event log
    assert!(all.contains("replica 0: 3/3 nodes joined"), "{all}");
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    for e in [
        "rendezvous_complete",
        "head_up",
        "worker_joined",
        "engine_started",
        "ready",
        "client_started",
        "all_stopped",
    ] {
        assert!(
            events.contains(&format!("\"event\":\"{e}\"")),
            "missing {e} in {events}"
        );
    }
    let ep = endpoint_status(&endpoint_file(bed.dir.path())).unwrap();
    assert_eq!(ep["status"], "failed");
    assert_eq!(ep["exit_code"], 3);
    eprintln!(
        "client mode: {:.1}s from srun to the end",
        t0.elapsed().as_secs_f64()
    );
}

/// Start a serving step in the background, wait until its endpoint says ready.
fn serve(bed: &Bed, cfg: &Path) -> (Child, PathBuf) {
    let mut c = bed.srun(&[
        "-J",
        "rl-e2e",
        bin().to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--event-log",
        "events.jsonl",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    let ep = loop {
        if let Some(Ok(Some(d))) = std::fs::read_dir(bed.dir.path()).ok().map(|mut r| {
            r.find(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ray-launch-"))
            })
            .transpose()
        }) {
            let p = d.path().join("endpoint.json");
            if endpoint_status(&p).is_some_and(|v| v["status"] == "ready") {
                break p;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = wait_limited(&mut child, Duration::from_secs(5));
            panic!("the step ended ({st}) before ready:\n{}", text(&out));
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "not ready in 90 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    (child, ep)
}

/// The everyday case: `sbatch` a script whose `srun ray-launch` serves, then `scancel` the
/// job (which also signals the batch script's srun). No process and no file of the job may
/// remain on any node; a stale temp dir of a launcher that was SIGKILLed is removed by the
/// next launcher on that node.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn sbatch_then_scancel_leaves_no_process_and_no_file() {
    let bed = Bed::new();
    // the engine leaves a child outside its session (double fork, setsid, SIGTERM ignored)
    let cfg = bed.config(&escaping(RAY3), "");
    // a stale temp dir, as a SIGKILLed launcher leaves it: created (0700) and locked by a
    // launcher that is gone (the lock file holds the launcher's marker and id)
    let stale = std::path::PathBuf::from("/tmp/rl-999999.0-0");
    std::fs::create_dir(&stale).unwrap();
    std::fs::set_permissions(&stale, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(
        stale.join(".ray-launch.lock"),
        format!("ray-launch temp dir {}\n", "ab".repeat(32)),
    )
    .unwrap();
    std::fs::create_dir(stale.join("ray")).unwrap();
    let job = sbatch_serve(&bed, &cfg, &[]);
    assert!(
        !stale.exists(),
        "the stale dir of a dead launcher is removed"
    );
    let t1 = Instant::now();
    assert!(slurm("scancel").arg(&job).status().unwrap().success());
    wait_gone(&job, Duration::from_secs(60));
    let log = std::fs::read_to_string(bed.path("job.out")).unwrap_or_default();
    eprintln!(
        "{log}\nscancel -> job gone: {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    assert!(
        log.contains("removed /tmp/rl-999999.0-0: left by a launcher of yours that is gone"),
        "{log}"
    );
    // Bed's drop: no process in any node's namespace, no temp dir, no vllm_dist file
}

/// `base` whose engine leaves a child outside its session (STANDIN_ESCAPE).
fn escaping(base: &str) -> String {
    base.replace("env: {", "env: {STANDIN_ESCAPE: '1', ")
}

/// sbatch a 3-node job whose `srun` serves `cfg` (output to job.out); its id, once ready.
fn sbatch_serve(bed: &Bed, cfg: &std::path::Path, sbatch_args: &[&str]) -> String {
    let script = bed.path("serve.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nsrun --kill-on-bad-exit=0 {} --config {}\n",
            bin().display(),
            cfg.display()
        ),
    )
    .unwrap();
    let out = slurm("sbatch")
        .args([
            "--parsable",
            "-N3",
            "--ntasks-per-node=1",
            "-J",
            "rl-sbatch",
        ])
        .args(sbatch_args)
        .arg(format!("--output={}", bed.path("job.out").display()))
        .arg(format!("--chdir={}", bed.dir.path().display()))
        .arg(&script)
        .output()
        .unwrap();
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!job.is_empty(), "{}", text(&out));
    let ep = bed.path(&format!("ray-launch-{job}/endpoint.json"));
    let t0 = Instant::now();
    while !endpoint_status(&ep).is_some_and(|v| v["status"] == "ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "not ready: {}",
            std::fs::read_to_string(bed.path("job.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    job
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn the_time_limit_of_an_sbatch_job_leaves_no_process_and_no_file() {
    let bed = Bed::new();
    let cfg = bed.config(&escaping(RAY3), "");
    let job = sbatch_serve(&bed, &cfg, &["--time=1"]);
    // Slurm checks time limits about every 30 s: the job ends 60-90 s after it started
    wait_gone(&job, Duration::from_secs(180));
    let log = std::fs::read_to_string(bed.path("job.out")).unwrap_or_default();
    eprintln!("{log}");
    assert!(log.contains("received SIGTERM: stopping"), "{log}");
    assert!(
        log.contains("all processes of this job on node1 are gone; exit 143"),
        "{log}"
    );
    // Bed's drop: no process in any node's namespace, no temp dir
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_worker_whose_launcher_is_stopped_ends_the_step_through_slurm() {
    let bed = Bed::new();
    let cfg = bed.config(RAY3, "");
    let job = sbatch_serve(&bed, &cfg, &[]);
    let pid = pid_on(3, "ray-launch").expect("node3's launcher");
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    // the others stop on the heartbeat timeout (4 s by default); the master then ends the
    // step through Slurm: SIGCONT + SIGTERM, and the resumed launcher cleans node3 itself
    wait_gone(&job, Duration::from_secs(60));
    let log = std::fs::read_to_string(bed.path("job.out")).unwrap_or_default();
    eprintln!(
        "{log}\nSIGSTOP of node3's launcher -> job gone: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        log.contains("node3 went silent: no heartbeat for 4s"),
        "{log}"
    );
    assert!(
        log.contains(&format!("ending step {job}.0 through Slurm")),
        "{log}"
    );
    assert!(
        log.contains("all processes of this job on node3 are gone"),
        "{log}"
    );
    let t1 = Instant::now();
    while !node_procs().is_empty() {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "left on the nodes: {:#?}",
            node_procs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn scancel_stops_every_rank_with_the_signal_code_and_leaves_nothing() {
    let bed = Bed::new();
    let cfg = bed.config(RAY3, "");
    let (mut child, ep) = serve(&bed, &cfg);
    let url = endpoint_status(&ep).unwrap()["url"]
        .as_str()
        .unwrap()
        .replace("/v1", "/health");
    let h = Command::new("curl")
        .args([
            "-sf",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&h.stdout), "200");
    let jid = job_id("rl-e2e");
    let t0 = Instant::now();
    assert!(slurm("scancel").arg(&jid).status().unwrap().success());
    let out = wait_limited(&mut child, Duration::from_secs(60));
    let all = text(&out);
    eprintln!("{all}");
    let codes = exits(&all);
    assert_eq!(codes.len(), 3, "{codes:?}");
    assert!(codes.values().all(|c| *c == 143), "{codes:?}");
    assert_no_leftovers("after scancel");
    eprintln!(
        "scancel -> nothing left: {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(endpoint_status(&ep).unwrap()["exit_code"], 143);
}

fn kill_and_expect(bed: &Bed, node: usize, comm: &str, want_code: i32, want_msg: &str) {
    let cfg = bed.config(
        RAY3,
        "health: {heartbeat_interval: 1s, heartbeat_timeout: 5s}",
    );
    let (mut child, _ep) = serve(bed, &cfg);
    let pid = pid_on(node, comm)
        .unwrap_or_else(|| panic!("no {comm} on node{node}: {:#?}", node_procs()));
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let out = wait_limited(&mut child, Duration::from_secs(60));
    let took = t0.elapsed();
    let all = text(&out);
    eprintln!("{all}");
    let codes = exits(&all);
    for n in 1..=NODES {
        let name = format!("node{n}");
        if comm == "ray-launch" && n == node {
            continue; // that one was killed
        }
        assert_eq!(codes.get(&name), Some(&want_code), "{name}: {codes:?}");
    }
    assert!(all.contains(want_msg), "want `{want_msg}`");
    eprintln!(
        "kill -9 {comm} on node{node} -> step ended in {:.2}s",
        took.as_secs_f64()
    );
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn kill_9_of_a_workers_raylet_ends_the_step_with_peer_failure() {
    let bed = Bed::new();
    kill_and_expect(
        &bed,
        3,
        "raylet",
        4,
        "ray-worker on node3 ended unexpectedly",
    );
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn kill_9_of_a_workers_ray_start_ends_the_step_with_peer_failure() {
    let bed = Bed::new();
    kill_and_expect(
        &bed,
        2,
        "ray",
        4,
        "ray-worker on node2 ended unexpectedly (signal 9 (SIGKILL))",
    );
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn kill_9_of_a_workers_launcher_ends_the_step_and_its_children() {
    let bed = Bed::new();
    kill_and_expect(
        &bed,
        2,
        "ray-launch",
        4,
        "lost the connection to node2's launcher",
    );
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn kill_9_of_the_engine_ends_the_step_with_engine_failure() {
    let bed = Bed::new();
    kill_and_expect(&bed, 1, "python", 5, "engine on node1 ended unexpectedly");
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_worker_that_cannot_reach_the_master_says_so_before_the_deadline() {
    let bed = Bed::new();
    let cfg = bed.config(
        RAY3,
        "timeouts: {rendezvous: 4s, shutdown_grace: 5s, kill_wait: 30s}",
    );
    // the master's task never starts ray-launch: nobody listens on the channel port
    let script = bed.path("nomaster.sh");
    std::fs::write(&script, format!("#!/bin/bash\nif [ \"$SLURM_NODEID\" = 0 ]; then sleep 8; exit 0; fi\nexec {} --config {} \"$@\"\n", bin().display(), cfg.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let t0 = Instant::now();
    let out = run_limited(
        bed.srun(&[script.to_str().unwrap()]),
        Duration::from_secs(60),
    );
    let all = text(&out);
    eprintln!("{all}");
    assert!(
        all.contains("cannot join the master node1 at 10.77.0.11:"),
        "{all}"
    );
    assert!(all.contains("within 4s (timeouts.rendezvous"), "{all}");
    assert_eq!(all.matches("cannot join the master").count(), 2);
    // both workers exit with the startup-timeout code (srun reports each task's code)
    assert_eq!(all.matches("Exited with exit code 3").count(), 2, "{all}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// Run a 3-node step whose client is `true`: it starts, becomes ready, and stops with 0.
fn run_to_completion(bed: &Bed, cfg: &Path) -> String {
    let out = bed.run_client(cfg, &["true"], Duration::from_secs(60));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    all
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn mp_mode_starts_vllm_on_every_node_with_the_right_rank() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: vllm\nmodel: tiny\nparallel: {tensor: 3}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_RECORD_DIR: @RECORD@}",
        "",
    );
    let all = run_to_completion(&bed, &cfg);
    for n in 1..=3 {
        let (argv, env) = bed.argv(&format!("node{n}"), "vllm");
        assert!(
            has(&argv, "--node-rank", &(n - 1).to_string())
                && has(&argv, "--nnodes", "3")
                && has(&argv, "--master-addr", "10.77.0.11"),
            "{argv:?}"
        );
        assert_eq!(argv.iter().any(|a| a == "--headless"), n != 1, "{argv:?}");
        assert_eq!(env["VLLM_HOST_IP"], format!("10.77.0.1{n}"));
        assert_eq!(env["GLOO_SOCKET_IFNAME"], "eth0");
    }
    assert!(!all.contains("ray-head"), "no Ray in mp mode");
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn sglang_mode_starts_launch_server_on_every_node() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: sglang\nmodel: tiny\nparallel: {tensor: 3}\ngpus_per_node: 1\nsglang: {python: @STANDIN@/python}\nenv: {STANDIN_RECORD_DIR: @RECORD@}",
        "",
    );
    run_to_completion(&bed, &cfg);
    for n in 1..=3 {
        let (argv, _) = bed.argv(&format!("node{n}"), "sglang");
        assert!(
            has(&argv, "-m", "sglang.launch_server")
                && has(&argv, "--node-rank", &(n - 1).to_string())
                && has(&argv, "--tp-size", "3"),
            "{argv:?}"
        );
        let dist = &argv[argv.iter().position(|a| a == "--dist-init-addr").unwrap() + 1];
        assert!(dist.starts_with("10.77.0.11:"), "{dist}");
    }
}

/// No Slurm at all: the local default runs the same code on this machine (rank 0 of 1), and
/// SIGUSR1 drains: a clean stop with exit 0.
#[test]
#[ignore = "needs .venv (scripts/setup.sh)"]
fn local_default_runs_without_slurm_and_sigusr1_drains() {
    let dir = tempfile::tempdir().unwrap();
    let standin = root().join("tests/standin/vllm");
    let cfg = dir.path().join("local.yaml");
    std::fs::write(
        &cfg,
        format!(
            "engine: vllm\nmodel: tiny\nparallel: {{tensor: 1}}\ngpus_per_node: 0\nvllm: {{executable: {}}}\nray: {{executable: {}, object_store_memory: 200MiB}}\ntimeouts: {{shutdown_grace: 5s}}\nenv: {{STANDIN_ESCAPE: '1'}}\n",
            standin.display(),
            root().join(".venv/bin/ray").display()
        ),
    )
    .unwrap();
    let mut c = Command::new(bin());
    c.args(["--config", cfg.to_str().unwrap()])
        .current_dir(dir.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("SLURM_") {
            c.env_remove(k);
        }
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    let ep = loop {
        let found = std::fs::read_dir(dir.path()).unwrap().flatten().find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ray-launch-local-")
        });
        if let Some(d) = found {
            let p = d.path().join("endpoint.json");
            if endpoint_status(&p).is_some_and(|v| v["status"] == "ready") {
                break p;
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "ended early");
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    signal(child.id() as i32, nix::sys::signal::Signal::SIGUSR1);
    let out = wait_limited(&mut child, Duration::from_secs(30));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("SIGUSR1: draining"), "{all}");
    let v = endpoint_status(&ep).unwrap();
    assert_eq!(v["status"], "stopped");
    // nothing of this job is left on this machine: no process runs our stand-in (its child
    // that left the session included: STANDIN_ESCAPE) or Ray from this temp dir, and Ray's
    // temp dir is gone
    let temp = format!("/tmp/rl-{}-0", v["job_id"].as_str().unwrap());
    assert!(!Path::new(&temp).exists(), "{temp} left behind");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .filter(|c| c.contains(&temp) || (c.contains("engine.py") && c.contains("tiny")))
        .collect();
    assert!(left.is_empty(), "{left:#?}");
}

/// One request through `url` with `key`: (HTTP status, the replica that answered).
fn routed(url: &str, key: &str, body: Option<&str>) -> (u16, Option<usize>) {
    let (code, rep, _) = routed_body(url, key, body);
    (code, rep)
}

/// [`routed`] and the answer's body.
fn routed_body(url: &str, key: &str, body: Option<&str>) -> (u16, Option<usize>, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "--noproxy",
        "*",
        "-m",
        "10",
        "-w",
        "\n%{http_code} %header{x-ray-launch-replica}",
        "-H",
        &format!("Authorization: Bearer {key}"),
    ]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c.arg(url).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let (answer, status) = s.rsplit_once('\n').unwrap_or(("", &s));
    let mut it = status.split_whitespace();
    let code = it.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        it.next().and_then(|r| r.parse().ok()),
        answer.to_string(),
    )
}

fn replica_states(ep: &Path) -> Vec<(String, u64)> {
    endpoint_status(ep).unwrap()["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["state"].as_str().unwrap().to_string(),
                r["restarts"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Three one-node replicas behind the router (stand-in engine, vLLM mp): the one on node3
/// fails at every start and stays down after its two restarts, the job is ready with the
/// other two; requests through the router reach both; kill -9 of node2's engine: every
/// request still succeeds (the router retries only refused connections), the replica is
/// restarted and serves again; scancel leaves nothing.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn replicas_behind_the_router_fail_alone_and_come_back() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, nodes_per_replica: 1}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_REPLICA: '{replica}', STANDIN_FAIL_REPLICA: '2'}\nreplicas: {max_restarts: 2, restart_window: 10m}",
        "",
    );
    let (mut child, ep) = serve(&bed, &cfg);
    let f = endpoint_status(&ep).unwrap();
    let url = f["url"].as_str().unwrap().to_string();
    let urls: Vec<&str> = f["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(urls.len(), 3);
    assert!(
        !urls.contains(&url.as_str()),
        "the job's url is the router's: {url} {urls:?}"
    );
    assert_eq!(
        replica_states(&ep),
        [("ready".into(), 0), ("ready".into(), 0), ("down".into(), 2)]
    );
    let key = api_key(&f);
    let key = key.as_str();
    // the router checks the key itself
    assert_eq!(routed(&format!("{url}/models"), "wrong", None).0, 401);
    let completions = format!("{url}/completions");
    let body = r#"{"model":"tiny","prompt":"hi","max_tokens":1}"#;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (code, rep) = routed(&completions, key, Some(body));
        assert_eq!(code, 200);
        seen.insert(rep.unwrap());
    }
    assert_eq!(
        seen,
        [0, 1].into(),
        "both serving replicas answer; the down one never"
    );
    assert_eq!(routed(&format!("{url}/models"), key, None).0, 200);

    // kill -9 of replica 1's engine while requests go on
    let pid = pid_on(2, "python").unwrap_or_else(|| panic!("{:#?}", node_procs()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, completions, key) = (stop.clone(), completions.clone(), key.to_string());
        std::thread::spawn(move || {
            let mut codes = std::collections::BTreeMap::<u16, usize>::new();
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (code, _, answer) = routed_body(&completions, &key, Some(body));
                *codes.entry(code).or_default() += 1;
                if code != 200 {
                    failed.push(format!("{code} {answer}"));
                }
            }
            (codes, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    while replica_states(&ep)[1] != ("ready".into(), 1) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "replica 1 did not come back: {:?}",
            replica_states(&ep)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let back = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (during, failed) = load.join().unwrap();
    // a request replica 1 was handling when it was killed got no byte: the router sent it on
    assert!(during.get(&200).copied().unwrap_or(0) > 20, "{during:?}");
    assert!(failed.is_empty(), "no failed request: {failed:?}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(routed(&completions, key, Some(body)).1.unwrap());
    }
    assert_eq!(seen, [0, 1].into(), "the restarted replica serves again");
    // the router's own metrics count both
    let m = Command::new("curl")
        .args(["-s", "--noproxy", "*", &url.replace("/v1", "/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&m.stdout).to_string();
    assert!(
        metrics.contains("ray_launch_router_replica_healthy{replica=\"1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ray_launch_router_replica_healthy{replica=\"2\"} 0"),
        "{metrics}"
    );

    let all = scancel_all_143(&mut child, "rl-e2e");
    for want in [
        "replica 2 (leader node3) failed",
        "it stays down: it failed after 2 restart(s)",
        "replica 1 (leader node2) failed: engine on node2 ended unexpectedly (signal 9 (SIGKILL))",
        "replica 1 serves again after 1 restart(s)",
    ] {
        assert!(all.contains(want), "want `{want}`");
    }
    eprintln!(
        "kill -9 of a replica's engine -> serving again in {:.1}s; requests during it: {during:?}",
        back.as_secs_f64()
    );
}

/// Two replicas side by side on each node (`parallel.replicas_per_node: 2`, stand-in, no
/// GPUs): six replicas behind the router, each on its own port; kill -9 of one of node2's two
/// engines restarts that replica alone: its neighbour on node2 keeps serving throughout.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn replicas_side_by_side_on_a_node_restart_alone() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, replicas_per_node: 2}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}",
        "",
    );
    let (mut child, ep) = serve(&bed, &cfg);
    let f = endpoint_status(&ep).unwrap();
    let url = f["url"].as_str().unwrap().to_string();
    let key = api_key(&f);
    let key = key.as_str();
    let reps = f["replicas"].as_array().unwrap().clone();
    assert_eq!(reps.len(), 6);
    let nodes: Vec<&str> = reps.iter().map(|r| r["node"].as_str().unwrap()).collect();
    assert_eq!(
        nodes,
        ["node1", "node1", "node2", "node2", "node3", "node3"]
    );
    let body = r#"{"model":"tiny","prompt":"hi","max_tokens":1}"#;
    let seen: std::collections::BTreeSet<usize> = (0..30)
        .map(|_| {
            routed(&format!("{url}/completions"), key, Some(body))
                .1
                .unwrap()
        })
        .collect();
    assert_eq!(seen, (0..6).collect(), "every replica answers");
    // replica 3 is node2's second engine: find it by its port
    let port = reps[3]["url"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/v1")
        .to_string();
    let (_, pid, _) = node_procs()
        .into_iter()
        .find(|(n, _, c)| {
            n == "node2" && c.starts_with("python") && c.contains(&format!("--port {port}"))
        })
        .unwrap_or_else(|| panic!("no engine on port {port}: {:#?}", node_procs()));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    loop {
        let st = replica_states(&ep);
        assert_eq!(
            st[2],
            ("ready".into(), 0),
            "node2's other replica is untouched: {st:?}"
        );
        if st[3] == ("ready".into(), 1) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // the master saw it serve; the router learns it from its own next poll (every second)
    let t1 = Instant::now();
    loop {
        let m = Command::new("curl")
            .args(["-s", "--noproxy", "*", &url.replace("/v1", "/metrics")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&m.stdout)
            .contains("ray_launch_router_replica_healthy{replica=\"3\"} 1")
        {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "the router never took replica 3 back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen: std::collections::BTreeSet<usize> = (0..30)
        .map(|_| {
            routed(&format!("{url}/completions"), key, Some(body))
                .1
                .unwrap()
        })
        .collect();
    assert_eq!(seen, (0..6).collect(), "the restarted one serves again");
    let all = scancel_all_143(&mut child, "rl-e2e");
    assert!(all.contains("replica 3 (leader node2) failed"), "{all}");
}

/// An `attach:` URL where nothing answers: every rank exits 3 within seconds, the message
/// names the entry and the URL, and nothing was started (no Ray, no engine: the stand-in
/// records nothing) or left.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn an_attach_url_that_does_not_answer_fails_fast_with_exit_3_and_starts_nothing() {
    let bed = Bed::new();
    let cfg = bed.config(
        RAY3,
        "attach:\n  - {name: judge, url: 'http://10.77.0.1:9/v1'}\ntimeouts: {attach: 5s, shutdown_grace: 5s, kill_wait: 30s}",
    );
    let t0 = Instant::now();
    let out = bed.run_client(&cfg, &["true"], Duration::from_secs(90));
    let took = t0.elapsed();
    let all = text(&out);
    eprintln!(
        "{all}\nattach refused -> every rank gone: {:.1}s",
        took.as_secs_f64()
    );
    assert_eq!(
        exits(&all).values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "{all}"
    );
    assert!(
        all.contains("attach `judge`: GET http://10.77.0.1:9/v1/models failed"),
        "{all}"
    );
    assert!(took < Duration::from_secs(45), "fails fast: {took:?}");
    let records: Vec<String> = std::fs::read_dir(bed.path(""))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vllm.json"))
        .collect();
    assert!(records.is_empty(), "an engine started: {records:?}");
    let ep = endpoint_status(&endpoint_file(&bed.path(""))).unwrap();
    assert_eq!(ep["status"], "failed");
    assert_eq!(ep["exit_code"], 3);
    assert!(!all.contains("Ray head up"), "{all}");
    assert_no_leftovers("after the refused attach");
}

/// Two models of stand-in engines: `chat` on node1 and node2 (two one-node replicas), `judge`
/// on node3 with `required: false`, whose engine fails at every start. The judge is dropped
/// after its restart, the job is ready and serves the chat model by name; a request for the
/// judge is a 503 that names it, an unknown model a 404; the chat model losing a replica does
/// not end the job; scancel leaves nothing.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_model_that_is_not_required_is_dropped_and_the_others_serve() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: vllm\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_REPLICA: '{replica}', STANDIN_FAIL_REPLICA: '2'}\nmodels:\n  - {name: chat, model: tiny, parallel: {tensor: 1, nodes_per_replica: 1}, nodes: 2}\n  - {name: judge, model: tiny, parallel: {tensor: 1}, required: false}\nreplicas: {max_restarts: 1, restart_window: 10m}",
        "",
    );
    let (mut child, ep) = serve(&bed, &cfg);
    let f = endpoint_status(&ep).unwrap();
    assert_eq!(f["models"]["judge"]["status"], "dropped", "{f}");
    assert_eq!(f["models"]["chat"]["status"], "ready", "{f}");
    assert_eq!(f["replicas"][2]["model"], "judge");
    assert_eq!(f["replicas"][2]["state"], "down");
    let url = f["url"].as_str().unwrap().to_string();
    let key = api_key(&f);
    let ask = |model: &str| {
        routed_body(
            &format!("{url}/completions"),
            &key,
            Some(&format!(
                r#"{{"model":"{model}","prompt":"hi","max_tokens":1}}"#
            )),
        )
    };
    let (code, replica, body) = ask("chat");
    assert_eq!(
        (code, replica.is_some_and(|r| r < 2)),
        (200, true),
        "{body}"
    );
    assert!(body.contains(r#""model": "chat""#), "{body}");
    let (code, _, body) = ask("judge");
    assert_eq!(code, 503, "{body}");
    // (the router still tries a replica it holds unhealthy when there is no other)
    assert!(
        body.contains("no replica of model `judge` is serving")
            || body.contains("no replica of model `judge` accepted the connection"),
        "{body}"
    );
    let (code, _, body) = ask("llama");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    // the model's own URL
    let own = f["models"]["chat"]["url"].as_str().unwrap();
    assert_eq!(ask_at(own, &key), 200);
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    assert!(events.contains(r#""event":"model_dropped""#), "{events}");
    // one of chat's replicas dies: it restarts, the job goes on
    let pid =
        pid_on(2, "python").unwrap_or_else(|| panic!("no engine on node2: {:#?}", node_procs()));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    while replica_states(&ep)[1] != ("ready".to_string(), 1) {
        assert!(child.try_wait().unwrap().is_none(), "the job ended");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            replica_states(&ep)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `ray-launch status` on the running job, then on the stopped one
    let status = |fmt: &str| {
        let o = Command::new(bin())
            .args(["status", "--format", fmt])
            .arg(&ep)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let running = status("text");
    eprintln!("{running}");
    assert!(running.contains(": ready, serving for"), "{running}");
    assert!(
        running
            .lines()
            .any(|l| l.starts_with("judge") && l.contains("dropped")),
        "{running}"
    );
    assert!(
        running.lines().any(|l| l.starts_with("1 ")
            && l.contains("chat")
            && l.contains("node2")
            && l.contains("ready")),
        "{running}"
    );
    let all = scancel_all_143(&mut child, "rl-e2e");
    assert!(
        all.contains("model `judge` is dropped: all its 1 replica(s) are down"),
        "{all}"
    );
    let stopped = status("text");
    assert!(
        stopped.contains(": stopped (exit 143) after serving for"),
        "{stopped}"
    );
    let v: serde_json::Value = serde_json::from_str(&status("json")).unwrap();
    assert_eq!(v["status"], "stopped");
    assert!(v["uptime_s"].as_u64().is_some(), "{v}");
}

fn ask_at(base: &str, key: &str) -> u16 {
    routed(
        &format!("{base}/completions"),
        key,
        Some(r#"{"model":"whatever","prompt":"hi","max_tokens":1}"#),
    )
    .0
}

/// A hung engine (stand-in: from its fourth completion on — the first is the readiness
/// check's first token — requests hang and no token is
/// generated while /health answers 200) is a stall once busy for `health.stall_timeout`
/// without a token: its replica fails with a reason that says so and is restarted, while
/// the other replicas serve.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_hung_engine_that_still_answers_health_is_caught_by_its_token_counter() {
    let bed = Bed::new();
    let cfg = bed.config(
        "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, nodes_per_replica: 1}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_REPLICA: '{replica}', STANDIN_STALL_REPLICA: '1', STANDIN_STALL_AFTER: '3'}\nhealth: {interval: 1s, stall_timeout: 3s}",
        "",
    );
    let (mut child, ep) = serve(&bed, &cfg);
    let f = endpoint_status(&ep).unwrap();
    let key = api_key(&f);
    let own = f["urls"][1].as_str().unwrap().to_string();
    let body = r#"{"model":"tiny","prompt":"hi","max_tokens":1}"#;
    for _ in 0..2 {
        assert_eq!(
            routed(&format!("{own}/completions"), &key, Some(body)).0,
            200
        );
    }
    // the third hangs (curl gives up after 10 s); /health still answers meanwhile
    let hung = {
        let (u, k) = (format!("{own}/completions"), key.clone());
        std::thread::spawn(move || routed(&u, &k, Some(body)).0)
    };
    let t0 = Instant::now();
    while replica_states(&ep)[1].1 == 0 {
        assert!(child.try_wait().unwrap().is_none(), "the job ended");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no stall seen: {:?}",
            replica_states(&ep)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    let reason = endpoint_status(&ep).unwrap()["replicas"][1]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("engine stalled: 1 request(s) running or waiting and no token generated for 3s (health.stall_timeout"),
        "{reason}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "not before the timeout: {took:?}"
    );
    assert_eq!(replica_states(&ep)[0], ("ready".to_string(), 0));
    let _ = hung.join();
    let all = scancel_all_143(&mut child, "rl-e2e");
    eprintln!(
        "stall detected {:.1}s after the hung request",
        took.as_secs_f64()
    );
    assert!(all.contains("engine stalled"), "{all}");
}

/// `on_node_failure: requeue`: kill -9 of node2's launcher (a lost node) ends the step with
/// exit 4 and, once the teardown is over, the master runs `scontrol requeue JOB` (a stand-in
/// `scontrol` first on PATH records its argv); kill -9 of the engine (exit 5) does not.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_lost_node_requeues_the_job_and_an_engine_failure_does_not() {
    let bed = Bed::new();
    let cfg = bed.config(RAY3, "on_node_failure: requeue");
    let bin_dir = bed.path("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let record = bed.path("scontrol.argv");
    let fake = bin_dir.join("scontrol");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", record.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (node, comm, code) in [(2, "ray-launch", 4), (1, "python", 5)] {
        let _ = std::fs::remove_file(&record);
        let mut c = bed.srun(&[
            "-J",
            "rl-requeue",
            bin().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
        c.env("PATH", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let t0 = Instant::now();
        let job = loop {
            let ready = std::fs::read_dir(bed.path(""))
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ray-launch-"))
                .any(|d| {
                    endpoint_status(&d.path().join("endpoint.json"))
                        .is_some_and(|v| v["status"] == "ready")
                });
            if ready {
                break job_id("rl-requeue");
            }
            assert!(child.try_wait().unwrap().is_none(), "ended before ready");
            assert!(t0.elapsed() < Duration::from_secs(90), "not ready");
            std::thread::sleep(Duration::from_millis(100));
        };
        let pid = pid_on(node, comm)
            .unwrap_or_else(|| panic!("no {comm} on node{node}: {:#?}", node_procs()));
        signal(pid, nix::sys::signal::Signal::SIGKILL);
        let out = wait_limited(&mut child, Duration::from_secs(60));
        let all = text(&out);
        eprintln!("{all}");
        assert_eq!(exits(&all).get("node1"), Some(&code), "{all}");
        let argv = std::fs::read_to_string(&record).unwrap_or_default();
        if code == 4 {
            assert_eq!(argv.trim(), format!("requeue {job}"), "{all}");
            assert!(
                all.contains(&format!("requeueing job {job} (on_node_failure: requeue)")),
                "{all}"
            );
        } else {
            assert_eq!(argv, "", "an engine failure must not requeue: {all}");
        }
        // each node's own cleanup, then the next round
        assert_no_leftovers(&format!("after kill -9 of {comm}"));
        for d in std::fs::read_dir(bed.path("")).unwrap().flatten() {
            if d.file_name().to_string_lossy().starts_with("ray-launch-") {
                std::fs::remove_dir_all(d.path()).unwrap();
            }
        }
    }
}

// ---- nothing escapes: engine children that leave the launcher's session (issue 22)

/// mp, one engine per node and a replica each, behind the router; every engine leaves a
/// child that double-forks, `setsid()`s and ignores SIGTERM (STANDIN_ESCAPE).
const ESCAPING: &str = "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, nodes_per_replica: 1}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_ESCAPE: '1', STANDIN_RECORD_DIR: @RECORD@, STANDIN_REPLICA: '{replica}'}\nhealth: {heartbeat_interval: 1s, heartbeat_timeout: 5s}";

/// Processes on `node` whose command line contains `needle`.
fn procs_with(node: usize, needle: &str) -> Vec<(i32, String)> {
    node_procs()
        .into_iter()
        .filter(|(n, _, c)| *n == format!("node{node}") && c.contains(needle))
        .map(|(_, p, c)| (p, c))
        .collect()
}

/// Wait until `node` has at least `n` escaped children recorded.
fn wait_escapees(bed: &Bed, node: usize, n: usize) {
    let t0 = Instant::now();
    loop {
        let have = std::fs::read_dir(bed.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("node{node}.escapee."))
            })
            .count();
        if have >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "node{node}: {have} escaped children recorded, want {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn kill_9_of_a_launcher_takes_its_escaped_children_along_and_a_restart_its_replicas() {
    let bed = Bed::new();
    let cfg = bed.config(ESCAPING, "");
    let (mut child, ep) = serve(&bed, &cfg);
    for n in 1..=NODES {
        wait_escapees(&bed, n, 1);
    }
    // a replica's restart: kill -9 of node3's engine; its escaped child goes with it
    let engine = |node: usize| procs_with(node, "vllm serve tiny");
    assert_eq!(
        engine(3).len(),
        2,
        "the engine and its escaped child: {:#?}",
        engine(3)
    );
    let leader = engine(3).iter().map(|p| p.0).min().unwrap();
    signal(leader, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    loop {
        let st = endpoint_status(&ep).unwrap();
        let r2 = &st["replicas"][2];
        if r2["state"] == "ready" && r2["restarts"] == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "replica 2 did not come back: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_escapees(&bed, 3, 2);
    assert_eq!(
        engine(3).len(),
        2,
        "after the restart: the new engine and its escaped child, nothing of the old one: {:#?}",
        engine(3)
    );
    // kill -9 of node2's launcher: its reaper stops what it left, escaped child included
    let launcher = procs_with(2, "ray-launch --config")
        .first()
        .map(|p| p.0)
        .expect("node2's launcher");
    let t1 = Instant::now();
    signal(launcher, nix::sys::signal::Signal::SIGKILL);
    let took = loop {
        if node_procs().iter().all(|(n, _, _)| n != "node2") {
            break t1.elapsed();
        }
        assert!(
            t1.elapsed() < Duration::from_secs(15),
            "left on node2 after kill -9 of its launcher: {:#?}",
            node_procs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "kill -9 of node2's launcher -> nothing of it left on node2: {:.2}s",
        took.as_secs_f64()
    );
    // the job goes on with the two other replicas; scancel ends it, nothing left anywhere
    let all = scancel_all_143(&mut child, "rl-e2e");
    assert!(
        all.contains("all processes of this job on node1 are gone; exit 143"),
        "{all}"
    );
    // Bed's drop: no process in any node's namespace (escaped children included), no temp dir
}

// ---- batch generation (issue 25): a job's `batch:` through sbatch, scancel, USR1, arrays

/// Three one-node stand-in replicas behind the router, each answer taking 40 ms; a batch of
/// the bed's in.jsonl into out.jsonl, 6 requests in flight.
const BATCH: &str = "engine: vllm\nmodel: tiny\nparallel: {tensor: 1, nodes_per_replica: 1}\ngpus_per_node: 0\nvllm: {backend: mp, executable: @STANDIN@/vllm}\nenv: {STANDIN_SERVICE_MS: '40', STANDIN_REPLICA: '{replica}'}\nevent_log: @RECORD@/events.jsonl\nbatch: {input: @RECORD@/in.jsonl, output: @RECORD@/out.jsonl, concurrency: 6";

/// `n` requests, completions and chat mixed; every 97th is BAD (the stand-in's 400).
fn batch_input(bed: &Bed, n: usize) -> usize {
    let mut text = String::new();
    let mut bad = 0;
    for i in 0..n {
        let prompt = if i % 97 == 5 {
            bad += 1;
            format!("BAD {i}")
        } else {
            format!("p{i}")
        };
        if i % 2 == 0 {
            text.push_str(&format!("{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/v1/completions\",\"body\":{{\"model\":\"tiny\",\"prompt\":\"{prompt}\"}}}}\n"));
        } else {
            text.push_str(&format!("{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"tiny\",\"messages\":[{{\"role\":\"user\",\"content\":\"{prompt}\"}}]}}}}\n"));
        }
    }
    std::fs::write(bed.path("in.jsonl"), text).unwrap();
    bad
}

/// custom_id → count over OUT and OUT.errors (named by their stem), and the error lines.
fn batch_written(
    bed: &Bed,
    stem: &str,
) -> (
    std::collections::BTreeMap<String, u32>,
    Vec<serde_json::Value>,
) {
    let read = |name: String| -> Vec<serde_json::Value> {
        std::fs::read_to_string(bed.path(&name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
            .collect()
    };
    let ok = read(format!("{stem}.jsonl"));
    let err = read(format!("{stem}.errors.jsonl"));
    let mut count = std::collections::BTreeMap::new();
    for v in ok.iter().chain(&err) {
        *count
            .entry(v["custom_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    (count, err)
}

fn lines_in(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .count()
}

/// sbatch the batch job (`-N nodes`, more sbatch flags); its id.
fn sbatch_batch(bed: &Bed, cfg: &Path, nodes: usize, args: &[&str]) -> String {
    let script = bed.path("batch.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nsrun --kill-on-bad-exit=0 {} --config {}\n",
            bin().display(),
            cfg.display()
        ),
    )
    .unwrap();
    let out = slurm("sbatch")
        .args([
            "--parsable",
            &format!("-N{nodes}"),
            "--ntasks-per-node=1",
            "-J",
            "rl-batch",
            "--open-mode=append",
        ])
        .args(args)
        .arg(format!("--output={}", bed.path("job-%j.out").display()))
        .arg(format!("--chdir={}", bed.dir.path().display()))
        .arg(&script)
        .output()
        .unwrap();
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!job.is_empty(), "{}", text(&out));
    job
}

fn job_log(bed: &Bed, job: &str) -> String {
    std::fs::read_to_string(bed.path(&format!("job-{job}.out"))).unwrap_or_default()
}

/// Until `p` holds at least `n` lines (the job must not end first).
fn wait_lines(p: &Path, n: usize, job: &str, bed: &Bed) {
    let t0 = Instant::now();
    while lines_in(p) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} lines: {}",
            lines_in(p),
            job_log(bed, job)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The way users run a batch: sbatch; scancel mid-batch (what is written stays, nothing
/// twice); the same sbatch again resumes and ends by itself with exit 0: every request once
/// across out.jsonl and out.errors.jsonl, the engine's 400s with its message; the endpoint
/// file and the event log say what the batch did.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn a_batch_job_survives_scancel_and_resumes_exactly_once() {
    let bed = Bed::new();
    let bad = batch_input(&bed, 1500);
    let cfg = bed.config(&format!("{BATCH}}}"), "");
    let job = sbatch_batch(&bed, &cfg, 3, &[]);
    wait_lines(&bed.path("out.jsonl"), 150, &job, &bed);
    assert!(slurm("scancel").arg(&job).status().unwrap().success());
    wait_gone(&job, Duration::from_secs(60));
    let first = job_log(&bed, &job);
    let (count, _) = batch_written(&bed, "out");
    eprintln!("{first}\nafter scancel: {} of 1500 written", count.len());
    assert!(count.len() < 1500, "stopped mid-batch");
    assert!(count.values().all(|n| *n == 1));
    assert!(
        first.contains("all processes of this job on node1 are gone; exit 143"),
        "{first}"
    );
    let ep = bed.path(&format!("ray-launch-{job}/endpoint.json"));
    let f = endpoint_status(&ep).unwrap();
    assert_eq!(f["batch"]["total"], 1500, "{f}");

    let job2 = sbatch_batch(&bed, &cfg, 3, &[]);
    wait_gone(&job2, Duration::from_secs(180));
    let log = job_log(&bed, &job2);
    eprintln!("{log}");
    let (count, errors) = batch_written(&bed, "out");
    assert_eq!(count.len(), 1500, "every request: {log}");
    assert!(
        count.values().all(|n| *n == 1),
        "exactly once across both jobs"
    );
    assert_eq!(errors.len(), bad);
    assert_eq!(
        errors[0]["error"]["message"],
        "This model's maximum context length is 256 tokens"
    );
    assert!(log.contains("resuming:"), "{log}");
    assert!(log.contains("batch done: "), "{log}");
    assert!(
        log.contains("done: the client exited with exit code 0; exit 0"),
        "{log}"
    );
    let f = endpoint_status(&bed.path(&format!("ray-launch-{job2}/endpoint.json"))).unwrap();
    assert_eq!(f["status"], "stopped");
    assert_eq!(f["batch"]["state"], "done", "{f}");
    assert_eq!(
        f["batch"]["done"].as_u64().unwrap() + f["batch"]["failed"].as_u64().unwrap(),
        1500
    );
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    assert!(
        events.contains("\"event\":\"batch_checked\"") && events.contains("\"requests\":1500"),
        "{events}"
    );
    assert!(
        events.contains("\"event\":\"batch_done\"") && events.contains("\"state\":\"done\""),
        "{events}"
    );
    assert!(
        !bed.path(&format!("ray-launch-{job2}/endpoint.batch.json"))
            .exists(),
        "the progress file goes with the job"
    );
    // Bed's drop: no process, no temp dir
}

/// `--signal=USR1@...` before the time limit, here sent by hand: the batch stops sending,
/// finishes what is in flight, the job exits 9 and, with `batch.requeue: true`, is requeued
/// through the bed's real scontrol; the next run resumes and finishes.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn usr1_stops_a_batch_with_work_left_and_the_requeued_job_finishes_it() {
    let bed = Bed::new();
    batch_input(&bed, 1200);
    let cfg = bed.config(&format!("{BATCH}, requeue: true}}"), "");
    let job = sbatch_batch(&bed, &cfg, 3, &["--requeue"]);
    wait_lines(&bed.path("out.jsonl"), 150, &job, &bed);
    let signalled = Instant::now();
    assert!(slurm("scancel")
        .args(["--signal=USR1", &job])
        .status()
        .unwrap()
        .success());
    // requeued: back in the queue, then running again
    let t0 = Instant::now();
    loop {
        let o = slurm("scontrol")
            .args(["show", "job", &job])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        if s.contains("Restarts=1") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not requeued: {s}\n{}",
            job_log(&bed, &job)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stopped_at = lines_in(&bed.path("out.jsonl"));
    wait_gone(&job, Duration::from_secs(400));
    let log = job_log(&bed, &job);
    eprintln!(
        "{log}\nUSR1 -> requeued in {:.1}s, {stopped_at} lines then",
        signalled.elapsed().as_secs_f64()
    );
    assert!(
        log.contains("requeueing job") || log.contains("is back in the queue"),
        "{log}"
    );
    let (count, _) = batch_written(&bed, "out");
    assert_eq!(count.len(), 1200, "the requeued run finished it: {log}");
    assert!(
        count.values().all(|n| *n == 1),
        "exactly once across the two runs"
    );
    let events = std::fs::read_to_string(bed.path("events.jsonl")).unwrap();
    assert!(events.contains("\"event\":\"requeue\""), "{events}");
    assert!(
        events.contains("\"state\":\"stopped\"") && events.contains("\"state\":\"done\""),
        "{events}"
    );
}

/// `batch.shard: auto` in a job array: each task sends its share of the lines and writes its
/// own files; together they answer every request once.
#[test]
#[ignore = "needs the Slurm test bed: scripts/test.sh"]
fn an_array_of_two_shards_answers_every_request_once() {
    let bed = Bed::new();
    batch_input(&bed, 301);
    let cfg = bed.config(&format!("{BATCH}, shard: auto}}"), "");
    let job = sbatch_batch(&bed, &cfg, 1, &["--array=0-1"]);
    let t0 = Instant::now();
    loop {
        let q = slurm("squeue").args(["-h", "-j", &job]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "array {job} still queued"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (a, _) = batch_written(&bed, "out.shard-0-of-2");
    let (b, _) = batch_written(&bed, "out.shard-1-of-2");
    assert_eq!((a.len(), b.len()), (151, 150));
    assert!(a.keys().all(|k| !b.contains_key(k)), "disjoint shards");
    assert!(!bed.path("out.jsonl").exists());
}
