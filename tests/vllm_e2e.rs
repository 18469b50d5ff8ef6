//! The real engine: vLLM's CPU build (scripts/setup-vllm.sh), tensor 2 across two nodes of the
//! local Slurm cluster with the mp backend, serving a tiny random-weight model, with
//! configs/vllm-cpu-tiny.yaml as it is. Also: the argv ray-launch builds, checked by vLLM's and
//! SGLang's own argument parsers. `#[ignore]`: run by scripts/test.sh.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each

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
    srun_config(bed, name, "configs/vllm-cpu-tiny.yaml", client)
}

fn srun_config(bed: &Bed, name: &str, config: &str, client: &[&str]) -> Command {
    let mut c = slurm("srun");
    // always node1 and node2 (the tests look for processes there): a node still completing
    // the previous job is waited for, not replaced by node3
    c.args([
        "-N2",
        "-w",
        "node[1-2]",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=0",
        "-J",
        name,
    ])
    .arg(bin())
    .args(["--config", config]);
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
    serve_config(bed, name, "configs/vllm-cpu-tiny.yaml")
}

fn serve_config(bed: &Bed, name: &str, config: &str) -> Child {
    let mut child = srun_config(bed, name, config, &[])
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
    // the engine's startup phases, read from its log, are in the event log, in start order
    let ev = std::fs::read_to_string(bed.path("events.jsonl")).unwrap_or_default();
    let seen: Vec<String> = ev
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "engine_phase" && v["node"] == "node1")
        .map(|v| v["phase"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        seen.first().is_some_and(|p| p == "loading weights"),
        "{seen:?}\n{ev}"
    );
    // then the readiness check: a real completion of one token before the job is ready
    let n = seen.len();
    assert!(
        n >= 3
            && seen[n - 3] == "starting the server"
            && seen[n - 2] == "asking for a first token"
            && seen[n - 1].starts_with("first token in "),
        "{seen:?}\n{ev}"
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
    check_argvs(&[plan.to_path_buf()])
}

/// Every plan through the parsers in one Python process (vLLM's import alone takes seconds).
fn check_argvs(plans: &[PathBuf]) -> (bool, String) {
    let o = Command::new(vllm_python())
        .arg(root().join("tests/engine_argv.py"))
        .args(plans)
        .env("PYTHONPATH", root().join(".cache/sglang-parser/site"))
        .output()
        .unwrap();
    (o.status.success(), text(&o))
}

#[test]
#[ignore = "needs .venv-vllm: scripts/test.sh"]
fn every_example_configs_engine_argv_passes_the_engines_own_parser() {
    let dir = tempfile::tempdir().unwrap();
    let configs = [
        "configs/vllm-ray.yaml",
        "configs/vllm-mp.yaml",
        "configs/vllm-replicas.yaml",
        "configs/vllm-cpu-tiny.yaml",
        "configs/sglang.yaml",
        "configs/rl-models.yaml",
        "configs/vllm-cpu-models.yaml",
        "configs/vllm-moe.yaml",
        "configs/sglang-moe.yaml",
    ];
    let plans: Vec<PathBuf> = configs
        .iter()
        .map(|cfg| plan_json(dir.path(), cfg, &[]))
        .collect();
    let (ok, out) = check_argvs(&plans);
    assert!(ok, "{out}");
    for (cfg, plan) in configs.iter().zip(&plans) {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", plan.display())))
            .unwrap_or_else(|| panic!("{cfg} not checked: {out}"));
        assert!(line.contains("accepted"), "{cfg}: {line}");
        if cfg.contains("rl-models") {
            assert!(line.contains("by the sglang and vllm parser"), "{line}");
        }
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

/// What a replica's own vLLM `/metrics` says it finished.
fn vllm_successes(url: &str) -> f64 {
    vllm_counter(url, "vllm:request_success_total")
}

/// One counter of a replica's own vLLM `/metrics`, summed over its labels.
fn vllm_counter(url: &str, name: &str) -> f64 {
    let o = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "-m",
            "10",
            &url.replace("/v1", "/metrics"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The same shared-prefix workload (tests/clients/prefix.py: 8 long prefixes asked 4 times
/// each, shuffled, one at a time) through a `ray-launch route` of each policy in front of the
/// job's replicas, each run with its own prefixes; the share of prompt tokens the replicas'
/// own `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` say came from the
/// cache, per policy.
fn prefix_hit_rates(py: &Path, urls: &[String], key: &str) -> Vec<(&'static str, f64)> {
    let counters = || -> (f64, f64) {
        urls.iter().fold((0.0, 0.0), |(h, q), u| {
            (
                h + vllm_counter(u, "vllm:prefix_cache_hits_total"),
                q + vllm_counter(u, "vllm:prefix_cache_queries_total"),
            )
        })
    };
    let mut rates = Vec::new();
    for (seed, policy) in [(1, "least_outstanding"), (2, "prefix")] {
        let port = free_port();
        let mut route = Command::new(bin());
        route.args([
            "route",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
            policy,
        ]);
        for u in urls {
            route.args(["--replica", u.trim_end_matches("/v1")]);
        }
        let _router = KillOnDrop(
            route
                .env("RAY_LAUNCH_ROUTER_API_KEY", key)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = format!("http://127.0.0.1:{port}/v1");
        let t0 = Instant::now();
        while Command::new("curl")
            .args([
                "-sf",
                "--noproxy",
                "*",
                "-m",
                "2",
                &base.replace("/v1", "/health"),
            ])
            .status()
            .map_or(true, |s| !s.success())
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the {policy} router never came up"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (h0, q0) = counters();
        let o = Command::new(py)
            .args([
                root().join("tests/clients/prefix.py").to_str().unwrap(),
                &base,
                key,
                &seed.to_string(),
                "8",
                "4",
            ])
            .env("NO_PROXY", "*")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("{policy}: {}", String::from_utf8_lossy(&o.stdout).trim());
        let (h1, q1) = counters();
        assert!(q1 > q0, "the replicas counted no prefix-cache query");
        rates.push((policy, (h1 - h0) / (q1 - q0)));
    }
    rates
}

/// Two one-node replicas of the real vLLM behind the router (configs/vllm-cpu-replicas.yaml):
/// the official SDK lists the model, completes and streams through the router; both replicas'
/// own /metrics count requests. kill -9 of replica 1's vLLM under load: the job goes on, no
/// request fails but those replica 1 was handling (the router's 502 names it), the replica
/// is restarted and serves again.
#[test]
#[ignore = "needs the Slurm test bed and .venv-vllm: scripts/test.sh"]
fn two_real_vllm_replicas_behind_the_router_survive_kill_9_of_one() {
    let py = vllm_python();
    let bed = Bed::new();
    let client = root().join("tests/clients/router.py");
    let mut child = serve_config(&bed, "rl-vllm-replicas", "configs/vllm-cpu-replicas.yaml");
    let ep = bed.path("endpoint.json");
    let f = endpoint_status(&ep).unwrap();
    let url = f["url"].as_str().unwrap().to_string();
    let urls: Vec<String> = f["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    assert_eq!(urls.len(), 2);
    let key = api_key(&f);
    let before: Vec<f64> = urls.iter().map(|u| vllm_successes(u)).collect();
    let o = Command::new(&py)
        .args([client.to_str().unwrap(), &url, &key, "check"])
        .env("NO_PROXY", "*")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let check: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(check["models"], serde_json::json!(["tiny"]));
    assert_eq!(check["replicas"], serde_json::json!(["0", "1"]), "{check}");
    assert!(
        check["chunks"].as_u64().unwrap() > 1,
        "streamed in pieces: {check}"
    );
    let after: Vec<f64> = urls.iter().map(|u| vllm_successes(u)).collect();
    for i in 0..2 {
        assert!(
            after[i] > before[i],
            "replica {i}'s own /metrics: {before:?} -> {after:?}"
        );
    }

    // prefix-aware routing against least-outstanding, on the replicas' own cache counters
    let hit_rates = prefix_hit_rates(&py, &urls, &key);
    eprintln!("prefix cache hits/queries by policy over the two replicas: {hit_rates:?}");
    assert!(
        hit_rates[1].1 > hit_rates[0].1 + 0.1,
        "the prefix policy finds the cache: {hit_rates:?}"
    );

    // load through the router, then kill -9 of replica 1's vLLM
    let stop = bed.path("stop");
    let result = bed.path("load.json");
    let mut load = KillOnDrop(
        Command::new(&py)
            .args([
                client.to_str().unwrap(),
                &url,
                &key,
                "load",
                stop.to_str().unwrap(),
                result.to_str().unwrap(),
            ])
            .env("NO_PROXY", "*")
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let pid = pid_on(2, "vllm").unwrap_or_else(|| panic!("no vllm on node2: {:#?}", node_procs()));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    let state = |i: usize| {
        let v = endpoint_status(&ep).unwrap();
        (
            v["replicas"][i]["state"].as_str().unwrap_or("").to_string(),
            v["replicas"][i]["restarts"].as_u64().unwrap_or(0),
        )
    };
    // the load goes on through the failure and the restart's first 20 s (on two cores, a
    // restarting vLLM next to one under load would take minutes to come up)
    while state(1) != ("ready".to_string(), 1) && t0.elapsed() < Duration::from_secs(20) {
        assert!(child.try_wait().unwrap().is_none(), "the job ended");
        std::thread::sleep(Duration::from_millis(250));
    }
    std::fs::write(&stop, "").unwrap();
    assert!(load.0.wait().unwrap().success());
    while state(1) != ("ready".to_string(), 1) {
        assert!(
            t0.elapsed() < Duration::from_secs(400),
            "replica 1 did not come back: {:?}",
            state(1)
        );
        assert!(child.try_wait().unwrap().is_none(), "the job ended");
        std::thread::sleep(Duration::from_millis(250));
    }
    let back = t0.elapsed();
    let res: serde_json::Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    let failed: Vec<&str> = res["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(res["ok"].as_u64().unwrap() > 10, "{res}");
    // the requests replica 1 was handling got no byte of answer: the router sent them on
    assert!(failed.is_empty(), "no failed request: {failed:?}");
    let served_again = vllm_successes(&urls[1]);
    let o = Command::new(&py)
        .args([client.to_str().unwrap(), &url, &key, "check"])
        .env("NO_PROXY", "*")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        vllm_successes(&urls[1]) > served_again,
        "the restarted replica serves"
    );

    // a batch through the same job (`ray-launch batch` against its endpoint file), with
    // kill -9 of replica 0's vLLM in the middle: every request once, the engine's bodies
    let (batch_log, answered, failed_for_good) = batch_with_a_kill(&bed, &ep);
    eprintln!("{batch_log}");

    let all = scancel_all_143(&mut child, "rl-vllm-replicas");
    assert!(all.contains("replica 1 (leader node2) failed"), "{all}");
    assert!(
        all.contains("replica 1 serves again after 1 restart(s)"),
        "{all}"
    );
    assert_no_leftovers("after scancel");
    eprintln!(
        "kill -9 of replica 1's vLLM under load: {} requests ok, {} failed ({failed:?}); serving again after {:.1}s",
        res["ok"],
        failed.len(),
        back.as_secs_f64()
    );
    eprintln!("batch of 240 through the real replicas with kill -9 of replica 0's vLLM mid-batch: {answered} answered, {failed_for_good} failed for good (the 4 too long for the model)");
}

/// 240 requests (completions and chat mixed; 4 ask for more tokens than the model's 256)
/// sent by `ray-launch batch` through the job's router; replica 0's vLLM is SIGKILLed once 40
/// are answered. Every custom_id ends in exactly one file; answers are vLLM's own bodies;
/// the too-long ones carry vLLM's 400 message. The log, the answered and failed counts.
fn batch_with_a_kill(bed: &Bed, ep: &Path) -> (String, usize, usize) {
    let inp = bed.path("batch-in.jsonl");
    let mut text = String::new();
    for i in 0..240 {
        let max_tokens = if i % 60 == 7 { 1000 } else { 4 };
        if i % 2 == 0 {
            text.push_str(&format!("{{\"custom_id\":\"q{i}\",\"method\":\"POST\",\"url\":\"/v1/completions\",\"body\":{{\"model\":\"tiny\",\"prompt\":\"the cat {i}\",\"max_tokens\":{max_tokens}}}}}\n"));
        } else {
            text.push_str(&format!("{{\"custom_id\":\"q{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"tiny\",\"messages\":[{{\"role\":\"user\",\"content\":\"the dog {i}\"}}],\"max_tokens\":{max_tokens}}}}}\n"));
        }
    }
    std::fs::write(&inp, text).unwrap();
    let out = bed.path("batch-out.jsonl");
    let mut b = KillOnDrop(
        Command::new(bin())
            .args([
                "batch",
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--endpoint-file",
                ep.to_str().unwrap(),
                "--models",
                "tiny",
            ])
            .env("NO_PROXY", "*")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .count()
        < 40
    {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the batch does not progress"
        );
        assert!(b.0.try_wait().unwrap().is_none(), "the batch ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = pid_on(1, "vllm").unwrap_or_else(|| panic!("no vllm on node1: {:#?}", node_procs()));
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    let mut err = String::new();
    std::io::Read::read_to_string(b.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = b.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    let read = |p: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let ok = read(out.clone());
    let bad = read(bed.path("batch-out.errors.jsonl"));
    let mut seen = std::collections::BTreeMap::new();
    for v in ok.iter().chain(&bad) {
        *seen
            .entry(v["custom_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 240, "{err}");
    assert!(seen.values().all(|n| *n == 1), "exactly once");
    assert_eq!(bad.len(), 4, "only the too-long ones: {bad:?}");
    for v in &bad {
        assert_eq!(v["response"]["status_code"], 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("256"),
            "vLLM's own message: {v}"
        );
    }
    for v in &ok {
        let object = v["response"]["body"]["object"].as_str().unwrap_or_default();
        assert!(
            object == "text_completion" || object == "chat.completion",
            "vLLM's body: {v}"
        );
        assert!(
            v["response"]["body"]["usage"]["completion_tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "{v}"
        );
    }
    (err, ok.len(), bad.len())
}

/// Several models in one job, the way users run it: `sbatch` a script whose `srun` runs
/// configs/vllm-cpu-models.yaml (two real vLLM models, `policy` and `reward`, one node each)
/// plus an attached server that runs outside the job (a stand-in on the controller's
/// address, with its own key), with a client that uses the official SDK: every model by name
/// through one URL and each at its own `RAY_LAUNCH_MODEL_<NAME>_URL`, an unknown one a 404.
/// The client's exit 0 ends the job; nothing is left, and the attached server never saw the
/// job's key.
#[test]
#[ignore = "needs the Slurm test bed and .venv-vllm: scripts/test.sh"]
fn two_real_vllm_models_and_an_attached_server_behind_one_router() {
    let py = vllm_python();
    let bed = Bed::new();
    // the attached server: outside the job, on the controller's bridge address
    let port = {
        let l = std::net::TcpListener::bind("10.77.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let key_file = bed.path("judge.key");
    std::fs::write(&key_file, "judge-key-0123456789\n").unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let auth_log = bed.path("judge.auth");
    let _judge = KillOnDrop(
        Command::new("python3")
            .arg(root().join("tests/standin/engine.py"))
            .args(["vllm", "serve", "judge-8b", "--host", "10.77.0.1", "--port"])
            .arg(port.to_string())
            .args(["--api-key", "judge-key-0123456789"])
            .env("STANDIN_AUTH_LOG", &auth_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cfg = bed.path("models.yaml");
    let base = std::fs::read_to_string(root().join("configs/vllm-cpu-models.yaml")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{base}attach:\n  - name: judge\n    url: http://10.77.0.1:{port}/v1\n    api_key_file: {}\n",
            key_file.display()
        ),
    )
    .unwrap();
    let result = bed.path("client.json");
    let script = bed.path("models.sbatch");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nsrun --kill-on-bad-exit=0 {} --config {} --log-dir {} --endpoint-file {} --event-log {} -- {} {} {} policy reward judge\necho \"srun exit $?\" > {}\n",
            bin().display(),
            cfg.display(),
            bed.path("logs").display(),
            bed.path("endpoint.json").display(),
            bed.path("events.jsonl").display(),
            py.display(),
            root().join("tests/clients/models.py").display(),
            result.display(),
            bed.path("rc").display(),
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let out = slurm("sbatch")
        .args([
            "--parsable",
            "-N2",
            "-w",
            "node[1-2]",
            "--ntasks-per-node=1",
            "-J",
            "rl-models",
        ])
        .arg(format!("--output={}", bed.path("job.out").display()))
        .arg(format!("--chdir={}", root().display()))
        .arg(&script)
        .output()
        .unwrap();
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!job.is_empty(), "{}", text(&out));
    loop {
        let q = slurm("squeue").args(["-h", "-j", &job]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(500),
            "job {job} still runs: {}",
            std::fs::read_to_string(bed.path("job.out")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(bed.path("job.out")).unwrap_or_default();
    let rc = std::fs::read_to_string(bed.path("rc")).unwrap_or_default();
    assert_eq!(rc.trim(), "srun exit 0", "{log}");
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {log}"));
    assert_eq!(
        res["listed"],
        serde_json::json!(["judge-8b", "policy", "reward"]),
        "{res}"
    );
    assert_eq!(
        res["by_name"],
        serde_json::json!({"policy": "policy", "reward": "reward", "judge": "judge-8b"}),
        "{res}"
    );
    assert_eq!(res["unknown"], "model_not_found");
    assert!(
        log.contains("attached `judge`: it serves judge-8b"),
        "{log}"
    );
    let ep = endpoint_status(&bed.path("endpoint.json")).unwrap();
    assert_eq!(ep["status"], "stopped", "{ep}");
    assert_eq!(
        ep["models"]["policy"]["urls"].as_array().map(Vec::len),
        Some(1),
        "{ep}"
    );
    assert_eq!(ep["models"]["judge"]["status"], "attached", "{ep}");
    assert_eq!(ep["models"]["reward"]["required"], false, "{ep}");
    // every request the attached server saw carried its own key, never the job's
    let seen = std::fs::read_to_string(&auth_log).unwrap();
    assert!(!seen.is_empty());
    for l in seen.lines() {
        assert_eq!(l, "Bearer judge-key-0123456789", "{seen}");
    }
    assert_no_leftovers("after the client ended the job");
    eprintln!(
        "two real vLLM models + an attached server, sbatch to job gone: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
