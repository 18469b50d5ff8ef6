//! The router's cost, side by side in one run: the same requests straight to a stand-in engine
//! and through `ray-launch route` (the release binary, as a child process, over that one
//! replica). The stand-in answers at once (a fixed completion), so what differs is the router.
//! Latency: one client, requests alternating direct / routed (so drift hits both alike),
//! p50 and p99. Throughput: CONC concurrent clients for SECS seconds, direct and routed taking
//! turns for ROUNDS rounds, once with the stand-in answering at once (every process of the
//! run shares the machine's cores: this shows the router's CPU cost per request) and once
//! with it taking DELAY_MS (5) per request, as an engine whose work is elsewhere.
//! `cargo bench --bench router`; N, CONC, SECS, ROUNDS, DELAY_MS from the environment.
//! Goal: at most 1 ms added at p50, routed throughput within 5 % of direct.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each

use axum::routing::{get, post};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const ANSWER: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" stand-in","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
const BODY: &str = r#"{"model":"m","prompt":"hello","max_tokens":1}"#;

/// The stand-in engine on its own two-thread runtime; its port.
fn standin() -> u16 {
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
            let app = axum::Router::new()
                .route("/health", get(|| async { "" }))
                .route(
                    "/v1/completions",
                    post(|uri: axum::http::Uri| async move {
                        // `?delay_ms=N`: an engine that takes N ms (its work done elsewhere)
                        let delay = uri
                            .query()
                            .and_then(|q| q.strip_prefix("delay_ms="))
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        ([("content-type", "application/json")], ANSWER)
                    }),
                );
            axum::serve(l, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

struct Router(Child);

impl Drop for Router {
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

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n = env("N", 2000);
    let conc = env("CONC", 16);
    let secs = env("SECS", 5);
    let rounds = env("ROUNDS", 2);
    let delay = env("DELAY_MS", 5);
    let engine = standin();
    let port = free_port();
    let _router = Router(
        Command::new(env!("CARGO_BIN_EXE_ray-launch"))
            .args([
                "route",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--replica",
                &format!("http://127.0.0.1:{engine}"),
                "--health-interval",
                "1s",
            ])
            .env_remove(ray_launch::route::API_KEY_VAR)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the release binary runs"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let direct = format!("http://127.0.0.1:{engine}/v1/completions");
    let routed = format!("http://127.0.0.1:{port}/v1/completions");
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        // the router is up once its poll found the replica healthy
        let t0 = Instant::now();
        loop {
            let ok = client
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the router did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let one = |url: &str| {
            let req = client
                .post(url)
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
        // warm both paths (connections, the router's pool)
        for _ in 0..200 {
            one(&direct).await;
            one(&routed).await;
        }
        let (mut d, mut r) = (Vec::new(), Vec::new());
        for _ in 0..n {
            d.push(one(&direct).await);
            r.push(one(&routed).await);
        }
        let (d50, d99, r50, r99) = (
            pct(&mut d, 0.5),
            pct(&mut d, 0.99),
            pct(&mut r, 0.5),
            pct(&mut r, 0.99),
        );
        println!("router latency, {n} sequential requests each (ms): direct p50 {d50:.3} p99 {d99:.3} | routed p50 {r50:.3} p99 {r99:.3} | added p50 {:.3} p99 {:.3}", r50 - d50, r99 - d99);

        let run = |url: String| {
            let client = client.clone();
            async move {
                let stop = Arc::new(AtomicBool::new(false));
                let done = Arc::new(AtomicU64::new(0));
                let mut tasks = Vec::new();
                for _ in 0..conc {
                    let (client, url, stop, done) =
                        (client.clone(), url.clone(), stop.clone(), done.clone());
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let r = client
                                .post(&url)
                                .header("content-type", "application/json")
                                .body(BODY)
                                .send()
                                .await
                                .unwrap();
                            assert!(r.status().is_success());
                            r.bytes().await.unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
                let t = Instant::now();
                tokio::time::sleep(Duration::from_secs(secs)).await;
                stop.store(true, Ordering::Relaxed);
                let n = done.load(Ordering::Relaxed);
                for t in tasks {
                    t.await.unwrap();
                }
                n as f64 / t.elapsed().as_secs_f64()
            }
        };
        let show = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (what, query) in [
            ("engine answers at once", String::new()),
            (&*format!("engine takes {delay} ms"), format!("?delay_ms={delay}")),
        ] {
            let (mut ds, mut rs) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                ds.push(run(format!("{direct}{query}")).await);
                rs.push(run(format!("{routed}{query}")).await);
            }
            let (dm, rm) = (
                ds.iter().sum::<f64>() / ds.len() as f64,
                rs.iter().sum::<f64>() / rs.len() as f64,
            );
            println!(
                "router throughput, {what}, {conc} clients x {secs} s (requests/s): direct {dm:.0} ({}) | routed {rm:.0} ({}) | ratio {:.2}",
                show(&ds),
                show(&rs),
                rm / dm
            );
        }
    });
}
