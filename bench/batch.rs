//! Batch throughput, side by side in one run: stand-in replicas with SLOTS slots each and a
//! fixed SERVICE_MS per request (a queue beyond the slots, shown in vLLM's
//! `vllm:num_requests_waiting`), so the ideal is replicas × slots ÷ service time. For 1 and 3
//! replicas (3 behind `ray-launch route`): `ray-launch batch` with `--concurrency auto`, and a
//! 30-line hand-written client (asyncio + the official openai SDK + a semaphore of
//! replicas × slots, the best a user would write; needs .venv-vllm) on the same replicas.
//! Prints requests/s and the ratio to the ideal (goal for ray-launch: >= 0.9), and the
//! batch's peak RSS on a 1,000,000-line input (memory bounded by the window, plus 16 bytes
//! per custom_id). `cargo bench --bench batch`; N, SLOTS, SERVICE_MS, BIG from the environment.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use axum::routing::{get, post};
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A stand-in replica: `slots` at a time, `service` each; its port.
fn replica(slots: usize, service: Duration) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            let sem = Arc::new(tokio::sync::Semaphore::new(slots));
            let waiting = Arc::new(AtomicI64::new(0));
            let (s2, w2) = (sem.clone(), waiting.clone());
            let answer = move || {
                let (sem, waiting) = (s2.clone(), w2.clone());
                async move {
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let _p = sem.acquire().await.unwrap();
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    tokio::time::sleep(service).await;
                    ([("content-type", "application/json")], r#"{"object":"text_completion","model":"tiny","choices":[{"index":0,"text":" x","finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#)
                }
            };
            let app = axum::Router::new()
                .route("/health", get(|| async { "" }))
                .route("/v1/completions", post(answer))
                .route("/metrics", get(move || {
                    let w = waiting.clone();
                    async move { format!("vllm:num_requests_waiting{{model_name=\"tiny\"}} {}\n", w.load(Ordering::SeqCst)) }
                }));
            axum::serve(l, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn input(path: &Path, n: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        writeln!(f, r#"{{"custom_id":"r{i}","method":"POST","url":"/v1/completions","body":{{"model":"tiny","prompt":"p{i}","max_tokens":1}}}}"#).unwrap();
    }
}

/// The best hand-written client: asyncio, the official SDK, a semaphore.
const SDK: &str = r#"
import asyncio, json, sys, time
from openai import AsyncOpenAI
url, inp, out, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
async def main():
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=3)
    sem = asyncio.Semaphore(conc)
    reqs = [json.loads(l) for l in open(inp)]
    f = open(out, "w")
    async def one(r):
        async with sem:
            resp = await client.completions.create(**r["body"])
            f.write(json.dumps({"custom_id": r["custom_id"], "response": {"status_code": 200, "body": resp.model_dump()}}) + "\n")
    t0 = time.monotonic()
    await asyncio.gather(*(one(r) for r in reqs))
    print(len(reqs) / (time.monotonic() - t0))
asyncio.run(main())
"#;

fn main() {
    let n = env("N", 3000);
    let slots = env("SLOTS", 16) as usize;
    let service = Duration::from_millis(env("SERVICE_MS", 50));
    let big = env("BIG", 1_000_000);
    let bin = env!("CARGO_BIN_EXE_ray-launch");
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    input(&inp, n);
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-vllm/bin/python");
    println!(
        "batch of {n} requests; replicas with {slots} slots, {} ms per request",
        service.as_millis()
    );
    println!(
        "{:<10} {:>10} {:>12} {:>8} {:>14} {:>8}",
        "replicas", "ideal/s", "ray-launch/s", "ratio", "openai SDK/s", "ratio"
    );
    for reps in [1usize, 3] {
        let ports: Vec<u16> = (0..reps).map(|_| replica(slots, service)).collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}/v1"))
            .collect();
        let mut _router = None;
        let base = if reps == 1 {
            urls[0].clone()
        } else {
            let port = free_port();
            let mut args = vec![
                "route".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--health-interval".into(),
                "1s".into(),
            ];
            for p in &ports {
                args.push("--replica".into());
                args.push(format!("http://127.0.0.1:{p}"));
            }
            _router = Some(Kill(
                Command::new(bin)
                    .args(&args)
                    .env_remove(ray_launch::route::API_KEY_VAR)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ));
            let t0 = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
                || t0.elapsed() < Duration::from_secs(2)
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the router did not come up"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            format!("http://127.0.0.1:{port}/v1")
        };
        let ideal = (reps * slots) as f64 / service.as_secs_f64();
        let out = dir.path().join(format!("out-{reps}.jsonl"));
        let t0 = Instant::now();
        let o = Command::new(bin)
            .args([
                "batch",
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--url",
                &base,
            ])
            .env("RAY_LAUNCH_ENDPOINTS", urls.join(" "))
            .env_remove("OPENAI_API_KEY")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ours = n as f64 / t0.elapsed().as_secs_f64();
        let sdk = if py.exists() {
            let s = dir.path().join("sdk.py");
            std::fs::write(&s, SDK).unwrap();
            let o = Command::new(&py)
                .args([
                    s.to_str().unwrap(),
                    &base,
                    inp.to_str().unwrap(),
                    dir.path().join("sdk.jsonl").to_str().unwrap(),
                    &(reps * slots).to_string(),
                ])
                .env("NO_PROXY", "*")
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        } else {
            None
        };
        let sdk_s = sdk.map_or("-".into(), |v| format!("{v:.0}"));
        let sdk_r = sdk.map_or("-".into(), |v| format!("{:.2}", v / ideal));
        println!(
            "{reps:<10} {ideal:>10.0} {ours:>12.0} {:>8.2} {sdk_s:>14} {sdk_r:>8}",
            ours / ideal
        );
    }
    // memory on a large input: peak RSS of the batch process, bounded by the window
    let big_in = dir.path().join("big.jsonl");
    input(&big_in, big);
    let port = replica(256, Duration::ZERO);
    let out = dir.path().join("big-out.jsonl");
    let t0 = Instant::now();
    let o = Command::new("/usr/bin/time")
        .args([
            "-f",
            "%M",
            bin,
            "batch",
            "--input",
            big_in.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--url",
            &format!("http://127.0.0.1:{port}/v1"),
            "--concurrency",
            "64",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let rss_kb: u64 = err
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    println!(
        "{big} lines ({} MB in): peak RSS {} MB, {:.0} req/s against an instant replica",
        std::fs::metadata(&big_in).unwrap().len() >> 20,
        rss_kb >> 10,
        big as f64 / t0.elapsed().as_secs_f64()
    );
}
