//! The real engine: vLLM's CPU build (scripts/setup-vllm.sh), tensor 2 across two nodes of the
//! local Slurm cluster with the mp backend, serving a tiny random-weight model, with
//! configs/vllm-cpu-tiny.yaml as it is. Also: the argv ray-launch builds, checked by vLLM's and
//! SGLang's own argument parsers. `#[ignore]`: run by scripts/test.sh.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn vllm_python() -> PathBuf {
    let p = root().join(".venv-vllm/bin/python");
    assert!(p.exists(), "no .venv-vllm: run scripts/setup-vllm.sh");
    p
}

/// srun -N2 ray-launch with the CPU config, from the repository root (the config's paths are
/// relative to it), logs and endpoint in the test's dir.
fn srun_cpu(bed: &Bed, name: &str, client: &[&str]) -> Command {
    let mut c = slurm("srun");
    c.args(["-N2", "--ntasks-per-node=1", "-J", name])
        .arg(bin())
        .args(["--config", "configs/vllm-cpu-tiny.yaml"]);
    c.arg("--log-dir").arg(bed.path("logs"));
    c.arg("--endpoint-file").arg(bed.path("endpoint.json"));
    c.arg("--event-log").arg(bed.path("events.jsonl"));
    if !client.is_empty() {
        c.arg("--").args(client);
    }
    c.current_dir(root());
    c
}

fn serve_cpu(bed: &Bed, name: &str) -> Child {
    let mut child = srun_cpu(bed, name, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if endpoint_status(&bed.path("endpoint.json")).is_some_and(|v| v["status"] == "ready") {
            eprintln!("real vLLM ready after {:.1}s", t0.elapsed().as_secs_f64());
            return child;
        }
        if child.try_wait().unwrap().is_some() {
            let out = wait_limited(&mut child, Duration::from_secs(5));
            panic!("ended before ready:\n{}", text(&out));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(400),
            "not ready in 400 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One completion with the key from the endpoint file's `api_key_path` (and a check that the
/// real vLLM refuses a request without it).
fn complete(bed: &Bed) -> serde_json::Value {
    let ep = endpoint_status(&bed.path("endpoint.json")).unwrap();
    let url = format!("{}/completions", ep["url"].as_str().unwrap());
    let key = std::fs::read_to_string(ep["api_key_path"].as_str().expect("api_key_path")).unwrap();
    let req = |auth: Option<&str>| {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "--noproxy",
            "*",
            "-m",
            "120",
            "-H",
            "Content-Type: application/json",
        ]);
        if let Some(k) = auth {
            c.args(["-H", &format!("Authorization: Bearer {k}")]);
        }
        c.args([
            "-w",
            "\n%{http_code}",
            "-d",
            r#"{"model":"tiny","prompt":"hello world","max_tokens":16}"#,
            &url,
        ]);
        c.output().unwrap()
    };
    let o = req(None);
    assert!(
        String::from_utf8_lossy(&o.stdout).ends_with("\n401"),
        "without the key: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = req(Some(&key));
    let body = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = body.rsplit_once('\n').unwrap_or((&body, ""));
    assert_eq!(code, "200", "with the key: {body}");
    let o = std::process::Output {
        stdout: body.as_bytes().to_vec(),
        ..o
    };
    assert!(
        o.status.success(),
        "completion failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn phases(bed: &Bed) -> String {
    let ev = std::fs::read_to_string(bed.path("events.jsonl")).unwrap_or_default();
    ev.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| format!("{}={}s", v["event"].as_str().unwrap_or(""), v["t"]))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
#[ignore = "needs the Slurm test bed and .venv-vllm: scripts/test.sh"]
fn real_vllm_serves_across_two_nodes_and_scancel_leaves_nothing() {
    vllm_python();
    let bed = Bed::new();
    let mut child = serve_cpu(&bed, "rl-vllm");
    let reply = complete(&bed);
    assert_eq!(reply["usage"]["completion_tokens"], 16, "{reply}");
    assert!(!reply["choices"][0]["text"].as_str().unwrap().is_empty());
    // both ranks run the right vllm serve: rank 1 headless
    let logs =
        |n: &str| std::fs::read_to_string(bed.path(&format!("logs/{n}.engine.log"))).unwrap();
    let head = |s: String| s.lines().nth(1).unwrap_or("").to_string();
    let (c1, c2) = (head(logs("node1")), head(logs("node2")));
    assert!(
        c1.contains("--node-rank 0")
            && !c1.contains("--headless")
            && c1.contains("VLLM_CPU_OMP_THREADS_BIND=0"),
        "{c1}"
    );
    assert!(
        c2.contains("--node-rank 1")
            && c2.contains("--headless")
            && c2.contains("VLLM_CPU_OMP_THREADS_BIND=1"),
        "{c2}"
    );
    assert!(
        c2.contains("--master-addr 10.77.0.11") && c2.contains("VLLM_HOST_IP=10.77.0.12"),
        "{c2}"
    );
    let jid = job_id("rl-vllm");
    let t0 = Instant::now();
    assert!(slurm("scancel").arg(&jid).status().unwrap().success());
    let out = wait_limited(&mut child, Duration::from_secs(60));
    let all = text(&out);
    eprintln!("{all}");
    let codes = exits(&all);
    assert_eq!(codes.len(), 2, "{codes:?}");
    assert!(codes.values().all(|c| *c == 143), "{codes:?}");
    assert_no_leftovers("after scancel of the real engine");
    eprintln!(
        "phases: {}; scancel -> nothing left {:.1}s",
        phases(&bed),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "needs the Slurm test bed and .venv-vllm: scripts/test.sh"]
fn kill_9_of_the_headless_engine_ends_the_step_naming_node2() {
    vllm_python();
    let bed = Bed::new();
    let mut child = serve_cpu(&bed, "rl-vllm-kill");
    complete(&bed);
    // the process ray-launch started on node2 (`vllm`, the session leader)
    let pid = pid_on(2, "vllm").unwrap_or_else(|| panic!("no vllm on node2: {:#?}", node_procs()));
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let out = wait_limited(&mut child, Duration::from_secs(60));
    let took = t0.elapsed();
    let all = text(&out);
    eprintln!("{all}");
    let codes = exits(&all);
    assert_eq!(codes.get("node1"), Some(&5), "{codes:?}");
    assert_eq!(codes.get("node2"), Some(&5), "{codes:?}");
    assert!(
        all.contains("engine on node2 ended unexpectedly (signal 9 (SIGKILL))"),
        "{all}"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    eprintln!(
        "kill -9 of node2's vllm -> step ended in {:.2}s",
        took.as_secs_f64()
    );
}

#[test]
#[ignore = "needs the Slurm test bed and .venv-vllm: scripts/test.sh"]
fn client_mode_with_the_real_engine_returns_the_clients_code() {
    let py = vllm_python();
    let bed = Bed::new();
    let client = root().join("tests/clients/complete.py");
    let out = run_limited(
        {
            let mut c = srun_cpu(
                &bed,
                "rl-vllm-client",
                &[
                    py.to_str().unwrap(),
                    client.to_str().unwrap(),
                    "the cat sat",
                ],
            );
            // a site proxy that does not exist: NO_PROXY must keep the SDK off it
            c.env("http_proxy", "http://proxy.invalid:3128")
                .env("HTTP_PROXY", "http://proxy.invalid:3128");
            c
        },
        Duration::from_secs(400),
    );
    let all = text(&out);
    eprintln!("{all}");
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("completion (16 tokens)"), "{all}");
    assert!(all.contains("a wrong key is refused (401)"), "{all}");
    assert_eq!(exits(&all).values().copied().collect::<Vec<_>>(), [0, 0]);
    eprintln!("phases: {}", phases(&bed));
}

fn plan_json(dir: &Path, config: &str, extra: &[&str]) -> PathBuf {
    let o = Command::new(bin())
        .args([
            "plan",
            "--format",
            "json",
            "--nodelist",
            "n[1-4]",
            "--gpus-per-node",
            "8",
            "--config",
            config,
        ])
        .args(extra)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = dir.join(format!(
        "{}.json",
        Path::new(config).file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(&p, &o.stdout).unwrap();
    p
}

fn check_argv(plan: &Path) -> (bool, String) {
    let o = Command::new(vllm_python())
        .arg(root().join("tests/engine_argv.py"))
        .arg(plan)
        .env("PYTHONPATH", root().join(".cache/sglang-parser/site"))
        .output()
        .unwrap();
    (o.status.success(), text(&o))
}

#[test]
#[ignore = "needs .venv-vllm: scripts/test.sh"]
fn every_example_configs_engine_argv_passes_the_engines_own_parser() {
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        "configs/vllm-ray.yaml",
        "configs/vllm-mp.yaml",
        "configs/vllm-replicas.yaml",
        "configs/vllm-cpu-tiny.yaml",
        "configs/sglang.yaml",
    ] {
        let (ok, out) = check_argv(&plan_json(dir.path(), cfg, &[]));
        assert!(ok, "{cfg}: {out}");
        assert!(out.contains("accepted"), "{out}");
    }
}

#[test]
#[ignore = "needs .venv-vllm: scripts/test.sh"]
fn a_flag_typo_is_caught_by_the_parser_check() {
    let dir = tempfile::tempdir().unwrap();
    for (engine, typo) in [
        ("vllm", "--max-modle-len"),
        ("sglang", "--mem-fraction-statc"),
    ] {
        let cfg = dir.path().join(format!("{engine}.yaml"));
        std::fs::write(&cfg, format!("engine: {engine}\nmodel: m\nparallel: {{tensor: 8}}\nengine_args: ['{typo}', '256']\n")).unwrap();
        let (ok, out) = check_argv(&plan_json(dir.path(), cfg.to_str().unwrap(), &[]));
        assert!(!ok, "{engine}: the typo passed: {out}");
        assert!(out.contains("rejected"), "{out}");
    }
}
