//! The router's policies and its retry rule, on this machine (no Slurm): a real
//! `ray-launch route` in front of small raw-HTTP backends that can be told to fail in each way
//! an engine fails (close before headers, 503 of their own, an SSE stream cut after its first
//! event or before it), and that say which of them answered and what they were asked.

#![allow(clippy::too_many_lines)] // tests read better as one story each
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a backend answers `POST`s.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ok,
    /// Reads the request, closes without a byte (EOF before headers).
    Close,
    /// Its own 503, as an engine that shuts down.
    Unavailable,
    /// SSE headers, then the connection cut before any event.
    SseCutBeforeFirst,
    /// One SSE event, then the connection cut.
    SseCutAfterFirst,
}

struct Backend {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    /// The prompts of the POSTs it answered (`prompt` or the last message's content).
    prompts: Arc<Mutex<Vec<String>>>,
    /// `GET /v1/models` it was asked.
    lists: Arc<AtomicUsize>,
}

impl Backend {
    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
    fn prompts(&self) -> Vec<String> {
        self.prompts.lock().unwrap().clone()
    }
}

fn read_request(s: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut r = BufReader::new(s.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        if h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((method, path, body))
}

fn reply(s: &mut TcpStream, status: &str, ctype: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn prompt_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match v["messages"].as_array() {
        Some(m) => m
            .last()
            .map(|x| x["content"].as_str().unwrap_or("").to_string()),
        None => v["prompt"].as_str().map(str::to_string),
    }
    .unwrap_or_default()
}

fn backend(id: usize) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let b = Backend {
        port,
        mode: Arc::new(Mutex::new(Mode::Ok)),
        prompts: Arc::default(),
        lists: Arc::default(),
    };
    let (mode, prompts, lists) = (b.mode.clone(), b.prompts.clone(), b.lists.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let (mode, prompts, lists) = (mode.clone(), prompts.clone(), lists.clone());
            std::thread::spawn(move || {
                let Some((method, path, body)) = read_request(&mut s) else {
                    return;
                };
                if method == "GET" {
                    if path == "/v1/models" {
                        lists.fetch_add(1, Ordering::SeqCst);
                        return reply(
                            &mut s,
                            "200 OK",
                            "application/json",
                            r#"{"object":"list","data":[{"id":"tiny","object":"model","max_model_len":512,"root":"/models/tiny"}]}"#,
                        );
                    }
                    return reply(&mut s, "200 OK", "application/json", "{}");
                }
                let m = *mode.lock().unwrap();
                let stream = serde_json::from_slice::<serde_json::Value>(&body)
                    .map(|v| v["stream"] == true)
                    .unwrap_or(false);
                match m {
                    Mode::Close => {}
                    Mode::Unavailable => reply(
                        &mut s,
                        "503 Service Unavailable",
                        "application/json",
                        r#"{"error":{"message":"the engine is shutting down"}}"#,
                    ),
                    Mode::SseCutBeforeFirst => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
                        let _ = s.flush();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Mode::SseCutAfterFirst => {
                        let ev = format!("data: {{\"backend\":{id},\"text\":\"first\"}}\n\n");
                        let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{ev}\r\n", ev.len());
                        let _ = s.flush();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Mode::Ok => {
                        prompts.lock().unwrap().push(prompt_of(&body));
                        if stream {
                            let ev = format!(
                                "data: {{\"backend\":{id},\"text\":\"a\"}}\n\ndata: [DONE]\n\n"
                            );
                            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{ev}\r\n0\r\n\r\n", ev.len());
                        } else {
                            reply(
                                &mut s,
                                "200 OK",
                                "application/json",
                                &format!(r#"{{"backend":{id},"choices":[{{"text":"a"}}]}}"#),
                            );
                        }
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    b
}

struct Router(Child, String);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn router(backends: &[&Backend], extra: &[&str]) -> Router {
    let port = free_port();
    let mut c = Command::new(env!("CARGO_BIN_EXE_ray-launch"));
    c.args(["route", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--health-interval", "200ms"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for b in backends {
        c.args(["--replica", &format!("http://127.0.0.1:{}", b.port)]);
    }
    let r = Router(c.spawn().unwrap(), format!("http://127.0.0.1:{port}"));
    // up when every replica is healthy (each lists its card once)
    let t0 = Instant::now();
    while !metrics(&r).contains("replica_healthy{replica=\"0\"} 1")
        || backends.iter().any(|b| b.lists.load(Ordering::SeqCst) == 0)
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "router up");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    r
}

/// (status, body, the replica that answered).
fn post(
    r: &Router,
    path: &str,
    body: &serde_json::Value,
    headers: &[&str],
) -> (u16, String, Option<usize>) {
    let mut c = Command::new("curl");
    c.args(["-s", "-m", "10", "-D", "-", "-X", "POST"])
        .args(["-H", "content-type: application/json"]);
    for h in headers {
        c.args(["-H", h]);
    }
    let out = c
        .arg(format!("{}{path}", r.1))
        .args(["-d", &body.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let replica = head.lines().find_map(|l| {
        l.strip_prefix("x-ray-launch-replica: ")
            .and_then(|v| v.trim().parse().ok())
    });
    (status, body.to_string(), replica)
}

fn get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn metrics(r: &Router) -> String {
    get(&format!("{}/metrics", r.1))
}

/// The value of one metric line (`name{labels}`), 0 when absent.
fn metric(text: &str, line: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn completion(prompt: &str) -> serde_json::Value {
    serde_json::json!({"model": "tiny", "prompt": prompt, "max_tokens": 1})
}

#[test]
fn a_request_whose_replica_fails_before_the_first_byte_goes_to_another() {
    let (a, b) = (backend(0), backend(1));
    let r = router(&[&a, &b], &["--policy", "least_outstanding"]);
    // replica 0 closes every connection before a byte of answer, then answers 503
    for (mode, reason) in [(Mode::Close, "upstream"), (Mode::Unavailable, "status")] {
        a.set(mode);
        for n in 0..8 {
            let (status, body, replica) =
                post(&r, "/v1/completions", &completion(&format!("q{n}")), &[]);
            assert_eq!((status, replica), (200, Some(1)), "{mode:?}: {body}");
        }
        let m = metrics(&r);
        let retried = metric(
            &m,
            &format!("ray_launch_router_retries_total{{replica=\"0\",reason=\"{reason}\"}}"),
        );
        assert!(retried >= 3.0, "{mode:?}: retries counted: {m}");
    }
    // streamed: a stream cut before its first event is retried too
    a.set(Mode::SseCutBeforeFirst);
    for _ in 0..4 {
        let mut req = completion("stream me");
        req["stream"] = true.into();
        let (status, body, replica) = post(&r, "/v1/completions", &req, &[]);
        assert_eq!((status, replica), (200, Some(1)), "{body}");
        assert!(
            body.contains("\"backend\":1") && body.contains("[DONE]"),
            "{body}"
        );
    }
    // both fail: after the retries, the last answer, naming the replica, not its address
    b.set(Mode::Close);
    a.set(Mode::Close);
    let (status, body, _) = post(&r, "/v1/completions", &completion("doomed"), &[]);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("failed while handling the request"), "{body}");
    assert!(!body.contains("127.0.0.1"), "no internal address: {body}");
}

#[test]
fn a_stream_cut_after_its_first_event_ends_with_an_error_event() {
    let (a, b) = (backend(0), backend(1));
    let r = router(&[&a, &b], &["--policy", "least_outstanding"]);
    a.set(Mode::SseCutAfterFirst);
    b.set(Mode::SseCutAfterFirst);
    let mut req = completion("stream me");
    req["stream"] = true.into();
    let (status, body, replica) = post(&r, "/v1/completions", &req, &[]);
    assert_eq!(status, 200, "{body}");
    let i = replica.unwrap();
    // the first event went out: not retried, the end is an error event naming the replica
    assert!(body.contains("\"text\":\"first\""), "{body}");
    let last = body.trim().lines().last().unwrap_or("");
    assert!(last.starts_with("data: {\"error\""), "{body}");
    assert!(
        last.contains(&format!("replica {i} failed mid-answer")),
        "{body}"
    );
    assert!(!body.contains("127.0.0.1"), "{body}");
    assert_eq!(metric(&metrics(&r), "ray_launch_router_retries_total"), 0.0);
}

#[test]
fn the_router_lists_the_models_itself_and_ties_do_not_pin_a_kind_of_request() {
    let bs: Vec<Backend> = (0..3).map(backend).collect();
    let refs: Vec<&Backend> = bs.iter().collect();
    let r = router(&refs, &["--policy", "least_outstanding"]);
    let before: Vec<usize> = bs.iter().map(|b| b.lists.load(Ordering::SeqCst)).collect();
    // a client that lists the models before each completion, one at a time
    let mut by = Vec::new();
    for n in 0..12 {
        let list: serde_json::Value =
            serde_json::from_str(&get(&format!("{}/v1/models", r.1))).unwrap();
        assert_eq!(list["data"][0]["id"], "tiny", "{list}");
        // the engine's own entry: its max_model_len too
        assert_eq!(list["data"][0]["max_model_len"], 512, "{list}");
        let (status, _, replica) = post(&r, "/v1/completions", &completion(&format!("q{n}")), &[]);
        assert_eq!(status, 200);
        by.push(replica.unwrap());
    }
    let after: Vec<usize> = bs.iter().map(|b| b.lists.load(Ordering::SeqCst)).collect();
    assert_eq!(before, after, "no list reached an engine");
    for i in 0..3 {
        assert_eq!(
            by.iter().filter(|&&x| x == i).count(),
            4,
            "even turns: {by:?}"
        );
    }
}

/// Six long prefixes (a system prompt each), each asked four times with its own question,
/// in shuffled order, one at a time.
fn workload() -> Vec<serde_json::Value> {
    let mut reqs = Vec::new();
    for p in 0..6 {
        let system = format!("You are assistant number {p}. ").repeat(12);
        for q in 0..4 {
            reqs.push(
                serde_json::json!({"model": "tiny", "max_tokens": 1, "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": format!("p{p} question {q}")},
                ]}),
            );
        }
    }
    // a fixed shuffle
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    let mut x = 12345u64;
    for i in (1..order.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    order.into_iter().map(|i| reqs[i].clone()).collect()
}

/// For each prefix, the replicas that got it.
fn spread(bs: &[Backend]) -> Vec<usize> {
    (0..6)
        .map(|p| {
            bs.iter()
                .filter(|b| b.prompts().iter().any(|q| q.starts_with(&format!("p{p} "))))
                .count()
        })
        .collect()
}

#[test]
fn the_prefix_policy_keeps_a_prefix_on_one_replica_and_least_outstanding_spreads_it() {
    for (policy, one_each) in [("prefix", true), ("least_outstanding", false)] {
        let bs: Vec<Backend> = (0..3).map(backend).collect();
        let refs: Vec<&Backend> = bs.iter().collect();
        let r = router(&refs, &["--policy", policy]);
        for req in workload() {
            assert_eq!(post(&r, "/v1/chat/completions", &req, &[]).0, 200);
        }
        let s = spread(&bs);
        let m = metrics(&r);
        if one_each {
            assert_eq!(s, vec![1; 6], "{policy}: each prefix on one replica");
            // and the prefixes themselves spread over the replicas
            assert!(bs.iter().all(|b| !b.prompts().is_empty()), "{s:?}");
            assert_eq!(
                metric(&m, "ray_launch_router_routed_total{by=\"prefix\"}"),
                18.0,
                "{m}"
            );
        } else {
            assert!(
                s.iter().sum::<usize>() >= 12,
                "{policy}: prefixes spread: {s:?}"
            );
            assert_eq!(
                metric(&m, "ray_launch_router_routed_total{by=\"prefix\"}"),
                0.0
            );
        }
    }
}

#[test]
fn a_session_key_keeps_a_client_on_its_replica_until_it_is_loaded() {
    let bs: Vec<Backend> = (0..3).map(backend).collect();
    let refs: Vec<&Backend> = bs.iter().collect();
    let r = router(&refs, &[]);
    let mut seen = std::collections::BTreeMap::<String, Vec<usize>>::new();
    for n in 0..12 {
        let s = format!("s{}", n % 3);
        let (status, _, replica) = post(
            &r,
            "/v1/completions",
            &completion(&format!("short {n}")),
            &[&format!("x-session-id: {s}")],
        );
        assert_eq!(status, 200);
        seen.entry(s).or_default().push(replica.unwrap());
    }
    // the body's `user` field is a session key too
    for n in 0..4 {
        let mut req = completion(&format!("short {n}"));
        req["user"] = "alice".into();
        seen.entry("alice".into())
            .or_default()
            .push(post(&r, "/v1/completions", &req, &[]).2.unwrap());
    }
    for (s, reps) in &seen {
        assert!(reps.iter().all(|x| *x == reps[0]), "{s}: {reps:?}");
    }
    let m = metrics(&r);
    assert!(
        metric(&m, "ray_launch_router_routed_total{by=\"session\"}") >= 12.0,
        "{m}"
    );
}

#[test]
fn a_replica_the_master_does_not_call_ready_gets_no_request() {
    let (a, b) = (backend(0), backend(1));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("endpoint.json");
    let write = |one: &str, why: &str| {
        let v = serde_json::json!({"status": "ready", "replicas": [
            {"replica": 0, "state": "ready"},
            {"replica": 1, "state": one, "reason": why},
        ]});
        let tmp = dir.path().join("tmp.json");
        std::fs::write(&tmp, v.to_string()).unwrap();
        std::fs::rename(&tmp, &state).unwrap();
    };
    write(
        "restarting",
        "engine stalled: 2 request(s) running or waiting",
    );
    let r = router(
        &[&a, &b],
        &[
            "--policy",
            "least_outstanding",
            "--state-file",
            state.to_str().unwrap(),
        ],
    );
    // /health answers on both: the master's word keeps replica 1 out
    for n in 0..6 {
        assert_eq!(
            post(&r, "/v1/completions", &completion(&format!("q{n}")), &[]).2,
            Some(0)
        );
    }
    assert!(metrics(&r).contains("replica_healthy{replica=\"1\"} 0"));
    // the master says ready: it serves within a poll or two
    write("ready", "");
    let t0 = Instant::now();
    loop {
        let (_, _, rep) = post(&r, "/v1/completions", &completion("again"), &[]);
        if rep == Some(1) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "replica 1 back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // and out again the moment the master hears of a stall
    write("restarting", "engine stalled");
    std::thread::sleep(Duration::from_millis(800));
    for n in 0..6 {
        assert_eq!(
            post(&r, "/v1/completions", &completion(&format!("z{n}")), &[]).2,
            Some(0)
        );
    }
}
