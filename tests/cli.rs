//! The binary's small commands: `wait`, `plan --format json` schema, `hostlist` via stdin.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use assert_cmd::Command;
use std::time::{Duration, Instant};

fn rl() -> Command {
    let mut c = Command::cargo_bin("ray-launch").unwrap();
    c.env_clear().env("PATH", "/usr/bin:/bin");
    c
}

#[test]
fn wait_prints_the_url_once_ready() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("endpoint.json");
    let f2 = f.clone();
    let writer = std::thread::spawn(move || {
        std::fs::write(&f2, r#"{"status":"starting"}"#).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        std::fs::write(
            &f2,
            r#"{"status":"ready","url":"http://10.0.0.1:20010/v1"}"#,
        )
        .unwrap();
    });
    let t0 = Instant::now();
    let out = rl()
        .args(["wait", f.to_str().unwrap(), "--timeout", "20s"])
        .output()
        .unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "http://10.0.0.1:20010/v1"
    );
    assert!(t0.elapsed() >= Duration::from_millis(500), "it did wait");
}

#[test]
fn wait_fails_fast_on_a_failed_job_and_times_out_on_none() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("endpoint.json");
    std::fs::write(
        &f,
        r#"{"status":"failed","reason":"engine on node2 ended unexpectedly"}"#,
    )
    .unwrap();
    let out = rl().args(["wait", f.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("engine on node2 ended unexpectedly"));
    let t0 = Instant::now();
    let out = rl()
        .args([
            "wait",
            dir.path().join("none.json").to_str().unwrap(),
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not say ready within 1s"));
}

#[test]
fn plan_json_has_the_documented_schema() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "engine: vllm\nmodel: m\nparallel: {tensor: 8, pipeline: 2}\n",
    )
    .unwrap();
    let out = rl()
        .args([
            "plan",
            "--config",
            cfg.to_str().unwrap(),
            "--nodelist",
            "node[1-4]",
            "--gpus-per-node",
            "8",
            "--format",
            "json",
            "--job-id",
            "77",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["master"]["node"], "node1");
    assert!(v["self"].is_null(), "a preview is no task of the step");
    assert_eq!(v["replicas"], 2);
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["node_rank"], i);
        for k in ["node", "role", "replica", "commands", "address", "temp_dir"] {
            assert!(!r[k].is_null(), "rank {i} lacks {k}");
        }
        for c in r["commands"].as_array().unwrap() {
            assert!(c["name"].is_string() && c["argv"].is_array() && c["env"].is_object());
        }
    }
    // job 77, step 0: block (77 x 5 + 0 x 3) mod 49
    assert_eq!(v["ports"]["channel"], 20000 + (77 * 5) % 49 * 256);
}

#[test]
fn hostlist_compress_reads_stdin() {
    let out = rl()
        .args(["hostlist", "compress"])
        .write_stdin("node1\nnode2,node3\nnode10\n")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "node[1-3,10]");
    let out = rl()
        .args(["hostlist", "expand", "n[1-2]", "x"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n1\nn2\nx\n");
}

#[test]
fn check_refuses_an_engine_too_old_for_the_config_and_says_which_version_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let vllm = dir.path().join("vllm");
    std::fs::write(&vllm, "#!/bin/sh\necho 0.10.1\n").unwrap();
    std::fs::set_permissions(&vllm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("c.yaml");
    let yaml = |data: u32| {
        format!(
            "engine: vllm\nmodel: m\nparallel: {{tensor: 1, data: {data}}}\ngpus_per_node: 0\nvllm: {{backend: mp, executable: {}}}\n",
            vllm.display()
        )
    };
    std::fs::write(&cfg, yaml(2)).unwrap();
    let out = rl().args(["check", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("vLLM 0.10.1 is too old for this config: its own multi-node backend (--nnodes/--node-rank/--headless) and data parallelism over it needs 0.11.0 or newer"),
        "{err}"
    );
    // without data parallelism nothing needs 0.11: reported, accepted
    std::fs::write(&cfg, yaml(1)).unwrap();
    let out = rl().args(["check", "--config"]).arg(&cfg).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("vLLM 0.10.1\n"), "{so}");
}

/// Root: the GPU's holder runs as `nobody`. A fake `nvidia-smi` on the PATH says that
/// `nobody`'s process holds GPU 1 (8 GiB).
#[test]
fn a_gpu_held_by_another_users_process_stops_check_and_the_run_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let mut holder = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .spawn()
        .expect("setpriv (util-linux) runs, as root");
    // the holder is `sleep` of nobody once setpriv has exec'd it (before, it is root's setpriv)
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(format!("/proc/{}/comm", holder.id()))
        .map_or(true, |c| c.trim() != "sleep")
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "setpriv never ran sleep");
        std::thread::sleep(Duration::from_millis(10));
    }
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = |name: &str, body: String| {
        let p = bin.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        p
    };
    exe(
        "nvidia-smi",
        format!(
            "#!/bin/sh\ncase \"$*\" in\n  *query-gpu*) echo '0, GPU-aaaa-1111'; echo '1, GPU-bbbb-2222' ;;\n  *query-compute-apps*) echo 'GPU-bbbb-2222, {}, 8192' ;;\nesac\n",
            holder.id()
        ),
    );
    let started = dir.path().join("engine-started");
    let vllm = exe(
        "vllm",
        format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 0.32.0; exit 0; }}\ntouch {}\nsleep 30\n",
            started.display()
        ),
    );
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "engine: vllm\nmodel: m\nparallel: {{tensor: 2}}\ngpus_per_node: 2\nvllm: {{backend: mp, executable: {}}}\n",
            vllm.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str], visible: Option<&str>| {
        let mut c = rl();
        c.env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .current_dir(dir.path())
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .timeout(Duration::from_secs(60));
        if let Some(v) = visible {
            c.env("CUDA_VISIBLE_DEVICES", v);
        }
        c.output().unwrap()
    };
    let held = format!(
        "GPU 1 is held by pid {} (sleep 60) of nobody (8192 MiB)",
        holder.id()
    );
    let out = run(&["check"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains(&held), "{err}");
    // a run: refused at the rendezvous, exit 6, the node and the holder named, nothing started
    let out = run(&[], None);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(6), "{all}");
    assert!(
        all.contains("failed its pre-flight check") && all.contains(&held),
        "{all}"
    );
    assert!(!started.exists(), "the engine started: {all}");
    // GPU 1 is not this step's: nothing to say
    let out = run(&["check"], Some("0"));
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{so}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(so.contains("pre-flight: this node's GPUs are free"), "{so}");
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let out = rl().arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v = String::from_utf8_lossy(&out.stdout);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let want = format!("ray-launch {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(v.starts_with(&want), "{v}");
    if let Some(c) = commit {
        assert!(v.contains(&format!("commit {c},")), "{v} does not name {c}");
    }
    // `built YYYY-MM-DD)`
    let date = v
        .trim()
        .rsplit("built ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    assert_eq!(date.len(), 10, "{v}");
    assert!(
        humantime::parse_rfc3339_weak(&format!("{date}T00:00:00")).is_ok(),
        "{v}"
    );
}

#[test]
fn completions_and_man_page_come_from_the_flags() {
    for (shell, mark) in [
        ("bash", "--endpoint-file"),
        ("zsh", "--endpoint-file"),
        ("fish", "endpoint-file"),
    ] {
        let out = rl().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(mark) && text.contains("hostlist"),
            "{shell}: {text}"
        );
    }
    let out = rl().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    let out = rl().arg("man").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") || man.contains("\n.TH ray-launch 1"),
        "{man}"
    );
    for sub in [
        "ray-launch-run",
        "ray-launch-plan",
        "ray-launch-wait",
        "ray-launch-status",
    ] {
        assert!(
            man.contains(&format!(".TH {sub} 1")),
            "no {sub} page in {man}"
        );
    }
    assert!(
        !man.contains("ray-launch-reap"),
        "the internal command stays out"
    );
}
