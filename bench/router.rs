//! The router against the routers users would install instead, side by side in one run, over
//! the same stand-in engines: straight to the engine ("direct"), `ray-launch route` with each
//! policy (the release binary), and — when installed in BENCH_VENV (default .venv-bench:
//! `python3 -m venv .venv-bench && .venv-bench/bin/pip install vllm-router sglang-router`) —
//! vllm-router and sglang-router with their default `cache_aware` policy.
//!
//! 1. Cost, each router over one stand-in that answers a fixed completion (at once, or after
//!    a delay as an engine whose work is elsewhere): added p50/p99 latency (one client,
//!    requests to direct and to each router taking turns, so drift hits all alike);
//!    throughput as a ratio of direct at DELAYS ms (CONC clients for SECS seconds, routers
//!    taking turns for ROUNDS rounds); CPU µs per request (the router's own utime + stime
//!    over those runs ÷ their requests); peak RSS.
//! 2. Prefix hits, each router over REPLICAS stand-ins that each keep a cache of the prompt
//!    prefixes (the first PREFIX_BYTES bytes) they served: PREFIXES long prompts asked ASKS
//!    times each with a distinct question, shuffled, 4 clients: the share of requests that
//!    found their prefix cached where they landed, and the spread over the replicas.
//!
//! `cargo bench --bench router`; the capitals above come from the environment.
//! Goals: least_outstanding ≤ 20 µs CPU per request; prefix hit rate ≥ the peers' cache_aware.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each

use axum::routing::{get, post};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const ANSWER: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" stand-in","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
const BODY: &str = r#"{"model":"m","prompt":"hello","max_tokens":1}"#;

/// What one stand-in engine saw of the shared-prefix workload.
#[derive(Default)]
struct Cache {
    seen: Mutex<HashSet<String>>,
    hits: AtomicU64,
    requests: AtomicU64,
}

/// A stand-in engine on its own two-thread runtime: `/v1/completions` answers ANSWER after
/// `delay`; a prompt of at least `prefix_bytes` counts as a hit when its first `prefix_bytes`
/// were seen before here. Its port.
fn standin(delay: Duration, prefix_bytes: usize, cache: Arc<Cache>) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            let models =
                r#"{"object":"list","data":[{"id":"m","object":"model","owned_by":"bench"}]}"#;
            let app = axum::Router::new()
                .route("/health", get(|| async { "" }))
                .route("/v1/models", get(move || async move { models }))
                .route(
                    "/v1/completions",
                    post(move |body: axum::body::Bytes| {
                        let cache = cache.clone();
                        async move {
                            if body.len() > prefix_bytes {
                                let v: serde_json::Value =
                                    serde_json::from_slice(&body).unwrap_or_default();
                                if let Some(p) = v["prompt"].as_str() {
                                    if p.len() >= prefix_bytes {
                                        cache.requests.fetch_add(1, Ordering::Relaxed);
                                        let key = p[..prefix_bytes].to_string();
                                        if !cache.seen.lock().unwrap().insert(key) {
                                            cache.hits.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                            }
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            ([("content-type", "application/json")], ANSWER)
                        }
                    }),
                );
            axum::serve(l, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// A router under test, killed when dropped.
struct Router {
    name: String,
    child: Child,
    url: String,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Router {
    /// The router's pid and its children's (a Python launcher's Rust router).
    fn pids(&self) -> Vec<u32> {
        let pid = self.child.id();
        let mut pids = vec![pid];
        if let Ok(kids) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(
                kids.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }

    /// CPU seconds of the router and its children so far.
    fn cpu(&self) -> f64 {
        let pids = self.pids();
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        pids.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .map(|s| {
                let f: Vec<&str> = s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                (t(11) + t(12)) / tick
            })
            .sum()
    }

    /// Peak RSS of the router and its children, MB.
    fn rss_mb(&self) -> f64 {
        let pids = self.pids();
        pids.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .sum::<f64>()
            / 1024.0
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The routers of this run over `engines`: ray-launch's two policies and the installed peers.
fn routers(engines: &[u16]) -> Vec<Router> {
    let venv = PathBuf::from(
        std::env::var("BENCH_VENV")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv-bench").into()),
    );
    let workers: Vec<String> = engines
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let mut out = Vec::new();
    let mut start = |name: &str, mut cmd: Command, port: u16| {
        let child = cmd
            .env_remove(ray_launch::route::API_KEY_VAR)
            .env("NO_PROXY", "*")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        out.push(Router {
            name: name.into(),
            child,
            url: format!("http://127.0.0.1:{port}"),
        });
    };
    for policy in ["least_outstanding", "prefix"] {
        let port = free_port();
        let mut c = Command::new(env!("CARGO_BIN_EXE_ray-launch"));
        c.args([
            "route",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--policy",
            policy,
        ]);
        for w in &workers {
            c.args(["--replica", w]);
        }
        start(&format!("ray-launch {policy}"), c, port);
    }
    let vllm_router = venv.join("bin/vllm-router");
    if vllm_router.exists() {
        let port = free_port();
        let mut c = Command::new(vllm_router);
        c.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--policy",
            "cache_aware",
        ]);
        c.args([
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            &free_port().to_string(),
        ]);
        c.arg("--worker-urls").args(&workers);
        start("vllm-router cache_aware", c, port);
    }
    let python = venv.join("bin/python");
    let has_sglang = python.exists()
        && Command::new(&python)
            .args(["-c", "import sglang_router"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if has_sglang {
        let port = free_port();
        let mut c = Command::new(&python);
        c.args(["-m", "sglang_router.launch_router", "--host", "127.0.0.1"]);
        c.args(["--port", &port.to_string(), "--policy", "cache_aware"]);
        c.args([
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            &free_port().to_string(),
        ]);
        c.arg("--worker-urls").args(&workers);
        start("sglang-router cache_aware", c, port);
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Requests per second of `conc` clients sending `body` to `url` for `secs`.
async fn throughput(client: &reqwest::Client, url: &str, conc: u64, secs: u64) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (client, url, stop, done) =
            (client.clone(), url.to_string(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(BODY)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{url}: {}", r.status());
                r.bytes().await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / t.elapsed().as_secs_f64(), n)
}

/// Waits until every router answers a completion.
async fn until_up(client: &reqwest::Client, routers: &[Router]) {
    for r in routers {
        let t0 = Instant::now();
        loop {
            let ok = client
                .post(format!("{}/v1/completions", r.url))
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .await
                .is_ok_and(|a| a.status().is_success());
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{} did not come up",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn main() {
    let n = env("N", 1000);
    let conc = env("CONC", 16);
    let secs = env("SECS", 3);
    let rounds = env("ROUNDS", 2);
    let delays: Vec<u64> = std::env::var("DELAYS")
        .unwrap_or_else(|_| "0,5,50".into())
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();

    // ---- 1. cost, one engine per delay, every router over it
    let mut cost: Vec<(String, Vec<f64>, f64, u64, f64)> = Vec::new(); // name, ratios, cpu, reqs, rss
    let mut latency = Vec::new();
    for (k, &delay) in delays.iter().enumerate() {
        let engine = standin(Duration::from_millis(delay), usize::MAX, Arc::default());
        let rs = routers(&[engine]);
        let direct = format!("http://127.0.0.1:{engine}");
        rt.block_on(async {
            until_up(&client, &rs).await;
            let one = |url: String| {
                let req = client
                    .post(format!("{url}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(BODY);
                async move {
                    let t = Instant::now();
                    let r = req.send().await.unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                    t.elapsed().as_secs_f64() * 1000.0
                }
            };
            if k == 0 {
                // latency over the engine that answers at once
                let mut lat: Vec<Vec<f64>> = vec![Vec::new(); rs.len() + 1];
                for i in 0..n + 100 {
                    let d = one(direct.clone()).await;
                    if i >= 100 {
                        lat[0].push(d);
                    }
                    for (j, r) in rs.iter().enumerate() {
                        let x = one(r.url.clone()).await;
                        if i >= 100 {
                            lat[j + 1].push(x);
                        }
                    }
                }
                let (d50, d99) = (pct(&mut lat[0], 0.5), pct(&mut lat[0], 0.99));
                latency.push(format!(
                    "  {:<26} p50 {d50:.3} ms  p99 {d99:.3} ms",
                    "direct"
                ));
                for (j, r) in rs.iter().enumerate() {
                    let (p50, p99) = (pct(&mut lat[j + 1], 0.5), pct(&mut lat[j + 1], 0.99));
                    latency.push(format!(
                        "  {:<26} p50 {p50:.3} ms  p99 {p99:.3} ms  added p50 {:.3} p99 {:.3}",
                        r.name,
                        p50 - d50,
                        p99 - d99
                    ));
                }
            }
            let mut sums = vec![0.0; rs.len() + 1];
            for _ in 0..rounds {
                sums[0] += throughput(&client, &format!("{direct}/v1/completions"), conc, secs)
                    .await
                    .0;
                for (j, r) in rs.iter().enumerate() {
                    let cpu0 = r.cpu();
                    let (rate, reqs) =
                        throughput(&client, &format!("{}/v1/completions", r.url), conc, secs).await;
                    sums[j + 1] += rate;
                    let cpu = r.cpu() - cpu0;
                    match cost.iter_mut().find(|c| c.0 == r.name) {
                        Some(c) => {
                            c.2 += cpu;
                            c.3 += reqs;
                        }
                        None => cost.push((r.name.clone(), Vec::new(), cpu, reqs, 0.0)),
                    }
                }
            }
            for (j, r) in rs.iter().enumerate() {
                let c = cost.iter_mut().find(|c| c.0 == r.name).unwrap();
                c.1.push(sums[j + 1] / sums[0]);
                c.4 = c.4.max(r.rss_mb());
            }
        });
    }
    println!("router latency, {n} sequential requests each, engine answers at once:");
    for l in &latency {
        println!("{l}");
    }
    println!(
        "router cost, {conc} clients x {secs} s x {rounds} rounds per engine delay (throughput as a ratio of direct):"
    );
    for (name, ratios, cpu, reqs, rss) in &cost {
        let r: Vec<String> = delays
            .iter()
            .zip(ratios)
            .map(|(d, r)| format!("{d} ms {r:.2}"))
            .collect();
        println!(
            "  {name:<26} {}  CPU {:.1} µs/request  peak RSS {rss:.1} MB",
            r.join("  "),
            cpu / *reqs as f64 * 1e6
        );
    }

    // ---- 2. prefix hits over several engines
    let replicas = env("REPLICAS", 3) as usize;
    let prefixes = env("PREFIXES", 64) as usize;
    let asks = env("ASKS", 16) as usize;
    let prefix_bytes = env("PREFIX_BYTES", 2048) as usize;
    let caches: Vec<Arc<Cache>> = (0..replicas).map(|_| Arc::default()).collect();
    let engines: Vec<u16> = caches
        .iter()
        .map(|c| standin(Duration::from_millis(2), prefix_bytes, c.clone()))
        .collect();
    let rs = routers(&engines);
    println!(
        "prefix hits, {replicas} engines, {prefixes} prefixes of {prefix_bytes} bytes x {asks} asks, shuffled, 4 clients:"
    );
    rt.block_on(async {
        until_up(&client, &rs).await;
        for (k, r) in rs.iter().enumerate() {
            // each router its own prefixes, so no router finds another's cache
            let mut rng = fastrand_seed(k as u64 + 1);
            let texts: Vec<String> = (0..prefixes)
                .map(|p| {
                    let mut s = format!("router {k} prefix {p}:");
                    while s.len() < prefix_bytes {
                        s.push_str(&format!(" w{}", rng() % 1000));
                    }
                    s
                })
                .collect();
            let mut work: Vec<usize> = (0..prefixes * asks).map(|i| i % prefixes).collect();
            for i in (1..work.len()).rev() {
                work.swap(i, (rng() % (i as u64 + 1)) as usize);
            }
            let bodies: Vec<String> = work
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    serde_json::json!({"model": "m", "max_tokens": 1,
                        "prompt": format!("{} question {i}: why?", texts[p])})
                    .to_string()
                })
                .collect();
            let before: Vec<(u64, u64)> = caches
                .iter()
                .map(|c| (c.hits.load(Ordering::Relaxed), c.requests.load(Ordering::Relaxed)))
                .collect();
            let queue = Arc::new(Mutex::new(bodies));
            let cpu0 = r.cpu();
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let (client, queue, url) =
                    (client.clone(), queue.clone(), format!("{}/v1/completions", r.url));
                tasks.push(tokio::spawn(async move {
                    loop {
                        let Some(body) = queue.lock().unwrap().pop() else { break };
                        let a = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        assert!(a.status().is_success());
                        a.bytes().await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let cpu = r.cpu() - cpu0;
            let (mut hits, mut reqs, mut spread) = (0, 0, Vec::new());
            for (c, (h0, q0)) in caches.iter().zip(before) {
                let (h, q) = (c.hits.load(Ordering::Relaxed) - h0, c.requests.load(Ordering::Relaxed) - q0);
                hits += h;
                reqs += q;
                spread.push(q.to_string());
            }
            println!(
                "  {:<26} hit rate {:.2} ({hits}/{reqs})  per engine {}  CPU {:.1} µs/request  peak RSS {:.1} MB",
                r.name,
                hits as f64 / reqs.max(1) as f64,
                spread.join("/"),
                cpu / reqs.max(1) as f64 * 1e6,
                r.rss_mb()
            );
        }
    });
}

/// A small deterministic generator (xorshift), so each run asks the same.
fn fastrand_seed(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
