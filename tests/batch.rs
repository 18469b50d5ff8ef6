//! `ray-launch batch` (the binary) against an in-process stand-in engine: exactly once across
//! OUT and OUT.errors, retries, final errors with the engine's message, a stop with work left
//! and its resume (a torn last line cut), shards, the output lock, and bad inputs (exit 2,
//! the line named). The Slurm runs (a job's `--batch`, scancel and requeue) are in tests/e2e.rs.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use axum::routing::{get, post};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stand-in: `slots` requests at a time, each taking `service`; a prompt `BAD` gets a
/// 400 with an engine-like message, `FLAKY` a 503 at its first two attempts; /metrics shows
/// vLLM's queue gauge. Returns its base URL.
struct Engine {
    url: String,
    hits: Arc<Mutex<HashMap<String, u32>>>,
}

fn engine(slots: usize, service: Duration) -> Engine {
    let (tx, rx) = std::sync::mpsc::channel();
    let hits: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let h2 = hits.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            let sem = Arc::new(tokio::sync::Semaphore::new(slots));
            let waiting = Arc::new(std::sync::atomic::AtomicI64::new(0));
            let (s2, w2) = (sem.clone(), waiting.clone());
            let answer = move |body: axum::body::Bytes| {
                let (sem, waiting, hits) = (s2.clone(), w2.clone(), h2.clone());
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let prompt = v["prompt"].as_str().map(str::to_string).unwrap_or_else(|| v["messages"][0]["content"].as_str().unwrap_or_default().to_string());
                    let n = {
                        let mut h = hits.lock().unwrap();
                        let e = h.entry(prompt.clone()).or_default();
                        *e += 1;
                        *e
                    };
                    let json = |code: u16, v: serde_json::Value| {
                        (axum::http::StatusCode::from_u16(code).unwrap(), [("content-type", "application/json"), ("x-request-id", "cmpl-standin")], v.to_string())
                    };
                    if prompt.contains("BAD") {
                        return json(400, serde_json::json!({"error": {"message": "This model's maximum context length is 256 tokens", "code": 400}}));
                    }
                    if prompt.contains("FLAKY") && n <= 2 {
                        return json(503, serde_json::json!({"error": {"message": "busy"}}));
                    }
                    waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _permit = sem.acquire().await.unwrap();
                    waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(service).await;
                    json(200, serde_json::json!({
                        "id": "cmpl-1", "object": "text_completion", "model": v["model"],
                        "choices": [{"index": 0, "text": format!("answer to {prompt}")}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                    }))
                }
            };
            let app = axum::Router::new()
                .route("/v1/completions", post(answer.clone()))
                .route("/v1/chat/completions", post(answer))
                .route("/metrics", get(move || {
                    let w = waiting.clone();
                    async move { format!("vllm:num_requests_waiting{{model_name=\"tiny\"}} {}\n", w.load(std::sync::atomic::Ordering::SeqCst)) }
                }));
            axum::serve(l, app).await.unwrap();
        });
    });
    let port = rx.recv().unwrap();
    Engine {
        url: format!("http://127.0.0.1:{port}/v1"),
        hits,
    }
}

fn line(id: &str, chat: bool, prompt: &str) -> String {
    if chat {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"tiny","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":3}}}}"#
        )
    } else {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/completions","body":{{"model":"tiny","prompt":"{prompt}","max_tokens":3}}}}"#
        )
    }
}

/// `n` requests, chat and completions mixed; every 50th BAD, every 40th FLAKY.
fn input(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("in.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    for i in 0..n {
        let prompt = if i % 50 == 7 {
            format!("BAD {i}")
        } else if i % 40 == 3 {
            format!("FLAKY {i}")
        } else {
            format!("p{i}")
        };
        writeln!(f, "{}", line(&format!("req-{i}"), i % 2 == 0, &prompt)).unwrap();
    }
    p
}

fn batch(e: &Engine, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ray-launch"));
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("OPENAI_BASE_URL", &e.url)
        .env("RAY_LAUNCH_ENDPOINTS", &e.url)
        .arg("batch")
        .args(args);
    c
}

/// custom_id → how often it appears, over both output files; and the lines of each.
fn written(
    out: &Path,
) -> (
    BTreeMap<String, u32>,
    Vec<serde_json::Value>,
    Vec<serde_json::Value>,
) {
    let read = |p: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let ok = read(out.to_path_buf());
    let err = read(
        out.with_file_name(
            out.file_name()
                .unwrap()
                .to_string_lossy()
                .replace(".jsonl", ".errors.jsonl"),
        ),
    );
    let mut count = BTreeMap::new();
    for v in ok.iter().chain(&err) {
        *count
            .entry(v["custom_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    (count, ok, err)
}

#[test]
fn every_request_once_retries_and_final_errors_with_the_engines_message() {
    let e = engine(8, Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let inp = input(dir.path(), 300);
    let out = dir.path().join("out.jsonl");
    let o = batch(
        &e,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--models",
            "tiny",
        ],
    )
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{log}");
    let (count, ok, err) = written(&out);
    assert_eq!(count.len(), 300, "every id");
    assert!(count.values().all(|n| *n == 1), "once each");
    assert_eq!(err.len(), 6, "the BAD ones (7, 57, ..., 257)");
    for v in &err {
        assert_eq!(v["error"]["code"], "http_400");
        assert_eq!(
            v["error"]["message"],
            "This model's maximum context length is 256 tokens"
        );
        assert_eq!(v["response"]["status_code"], 400);
    }
    let flaky: Vec<_> = ok
        .iter()
        .filter(|v| {
            v["response"]["body"]["choices"][0]["text"]
                .as_str()
                .unwrap()
                .contains("FLAKY")
        })
        .collect();
    assert_eq!(
        flaky.len(),
        8,
        "the FLAKY ones answered on their third attempt"
    );
    assert_eq!(e.hits.lock().unwrap()["FLAKY 43"], 3);
    let one = ok.iter().find(|v| v["custom_id"] == "req-2").unwrap();
    assert_eq!(one["response"]["status_code"], 200);
    assert_eq!(one["response"]["request_id"], "cmpl-standin");
    assert_eq!(
        one["response"]["body"]["choices"][0]["text"],
        "answer to p2"
    );
    assert!(one["error"].is_null() && one["id"].as_str().unwrap().starts_with("batch_req_"));
    assert!(
        log.contains("batch summary: 294 answered, 6 failed"),
        "{log}"
    );
    assert!(log.contains("tokens in 1470 out 882"), "{log}");
    // files only the user can read
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // run again: nothing left to do, nothing sent, nothing written twice
    let before = e.hits.lock().unwrap().values().sum::<u32>();
    let o = batch(
        &e,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(e.hits.lock().unwrap().values().sum::<u32>(), before);
    assert_eq!(written(&out).0.values().sum::<u32>(), 300);
}

#[test]
fn a_stop_keeps_what_was_answered_and_the_next_run_resumes_past_a_torn_line() {
    let e = engine(4, Duration::from_millis(40));
    let dir = tempfile::tempdir().unwrap();
    let inp = input(dir.path(), 400);
    let out = dir.path().join("out.jsonl");
    let child = batch(
        &e,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--concurrency",
            "8",
            "--grace",
            "5s",
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .count()
        < 60
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(9), "stopped with work left: {log}");
    assert!(
        log.contains("no new requests; finishing those in flight"),
        "{log}"
    );
    let (count, _, _) = written(&out);
    assert!(count.len() >= 60 && count.len() < 400, "{}", count.len());
    assert!(count.values().all(|n| *n == 1));
    // what a launcher killed mid-write leaves
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    f.write_all(br#"{"id":"batch_req_x","custom_id":"req-399","respo"#)
        .unwrap();
    drop(f);
    let first = count.len();
    let o = batch(
        &e,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{log}");
    assert!(log.contains("cut a torn last line"), "{log}");
    assert!(
        log.contains(&format!(
            "resuming: {first} of 400 requests already answered or failed"
        )),
        "{log}"
    );
    let (count, _, _) = written(&out);
    assert_eq!(count.len(), 400);
    assert!(
        count.values().all(|n| *n == 1),
        "exactly once across the two runs"
    );
}

#[test]
fn shards_split_one_input_and_one_output_is_written_by_one_batch_at_a_time() {
    let e = engine(8, Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let inp = input(dir.path(), 101);
    let out = dir.path().join("out.jsonl");
    for s in ["0/2", "1/2"] {
        let o = batch(
            &e,
            &[
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--shard",
                s,
            ],
        )
        .output()
        .unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let a = written(&dir.path().join("out.shard-0-of-2.jsonl")).0;
    let b = written(&dir.path().join("out.shard-1-of-2.jsonl")).0;
    assert_eq!((a.len(), b.len()), (51, 50));
    assert!(a.keys().all(|k| !b.contains_key(k)), "disjoint");
    assert!(!out.exists(), "each shard writes its own files");

    // a second batch on the same output is refused while the first runs
    let slow = engine(1, Duration::from_millis(200));
    let out2 = dir.path().join("two.jsonl");
    let mut first = batch(
        &slow,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out2.to_str().unwrap(),
            "--concurrency",
            "1",
        ],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out2)
        .unwrap_or_default()
        .lines()
        .count()
        < 1
    {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = batch(
        &slow,
        &[
            "--input",
            inp.to_str().unwrap(),
            "--output",
            out2.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another batch is writing") && err.contains("two.jsonl"),
        "{err}"
    );
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn bad_input_exits_2_naming_the_line_and_sends_nothing() {
    let e = engine(2, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    let good = line("a", false, "x");
    for (bad, want) in [
        (
            line("a", true, "y"),
            "lines 1 and 2: custom_id \"a\" appears twice",
        ),
        (
            r#"{"custom_id":"b","method":"POST","url":"/v1/images","body":{"model":"tiny"}}"#
                .to_string(),
            "line 2: url \"/v1/images\" is not one of",
        ),
        (
            line("b", false, "y").replace("tiny", "llama-70b"),
            "line 2: model \"llama-70b\" is not served by this job (it serves tiny)",
        ),
        ("{\"custom_id\":".to_string(), "line 2: not valid JSON"),
    ] {
        std::fs::write(&inp, format!("{good}\n{bad}\n")).unwrap();
        let out = dir.path().join("out.jsonl");
        let o = batch(
            &e,
            &[
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--models",
                "tiny",
            ],
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(!err.contains("panicked"));
        assert!(e.hits.lock().unwrap().is_empty(), "nothing sent");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap_or_default(),
            "",
            "nothing written"
        );
        // `check --batch` says the same without a job
        let o = Command::new(env!("CARGO_BIN_EXE_ray-launch"))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "check",
                "--config",
                "configs/vllm-cpu-tiny.yaml",
                "--batch",
                inp.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "check: {want}: {err}");
    }
}
