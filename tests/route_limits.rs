//! The router under a client that holds what it can (in a process of its own: it opens
//! thousands of sockets): 2,000 idle connections while a real client keeps getting answers,
//! a half-sent header and a stalled body closed on their deadlines, bodies held across
//! requests capped (503 with Retry-After), and the router's memory and descriptors after.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A completion through the router: its HTTP status.
fn complete(base: &str) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"])
        .args([
            "-H",
            "Authorization: Bearer job-key",
            "-H",
            "Content-Type: application/json",
        ])
        .args(["-d", r#"{"model": "tiny", "prompt": "x"}"#])
        .arg(format!("{base}/v1/completions"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_mib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        >> 10
}

/// Whether the router closes (or answers and closes) `s` within `limit`; what it sent.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn a_client_that_holds_connections_time_and_memory_does_not_stop_the_router() {
    ray_launch::cli::raise_nofile();
    let (engine_port, port) = (free_port(), free_port());
    let engine = Command::new("python3")
        .arg(root().join("tests/standin/engine.py"))
        .args(["vllm", "serve", "tiny", "--host", "127.0.0.1", "--port"])
        .arg(engine_port.to_string())
        .env_remove("VLLM_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let router = Command::new(env!("CARGO_BIN_EXE_ray-launch"))
        .args(["route", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--replica", &format!("http://127.0.0.1:{engine_port}")])
        .args([
            "--health-interval",
            "200ms",
            "--header-timeout",
            "2s",
            "--body-timeout",
            "3s",
        ])
        .args(["--max-buffered", &(4 << 20).to_string()])
        .env("RAY_LAUNCH_ROUTER_API_KEY", "job-key")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = router.id();
    let _procs = Procs(vec![engine, router]);
    let base = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while complete(&base) != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the router never served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (fd0, rss0) = (fds(pid), rss_mib(pid));

    // ---- bodies held across requests: two stalled 2 MiB bodies fill the 4 MiB cap
    let head = |len: usize| {
        format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer job-key\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(head(3 << 20).as_bytes()).unwrap();
        s.write_all(&vec![b' '; 2 << 20]).unwrap();
        held.push(s);
        std::thread::sleep(Duration::from_millis(300));
    }
    let rss_peak = rss_mib(pid);
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    third.write_all(head(1 << 20).as_bytes()).unwrap();
    let _ = third.write_all(&vec![b' '; 1 << 20]);
    let answer = closed_within(&mut third, Duration::from_secs(10)).unwrap_or_default();
    assert!(
        answer.starts_with("HTTP/1.1 503")
            && answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    // the stalled bodies time out (408), and their memory goes back
    for s in &mut held {
        let a = closed_within(s, Duration::from_secs(10)).expect("closed after the body timeout");
        assert!(a.starts_with("HTTP/1.1 408"), "{a}");
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = rss_mib(pid);
    eprintln!("router RSS: {rss0} MiB idle, {rss_peak} MiB holding 4 MiB of bodies, {rss_after} MiB after");

    // ---- 2,000 idle connections: a real client keeps getting answers meanwhile
    let mut idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut answered = 0;
    for _ in 0..10 {
        assert_eq!(complete(&base), 200, "a real client during the flood");
        answered += 1;
    }
    let fd_flood = fds(pid);
    // a half-sent header and an idle keep-alive are closed on the header deadline (2 s)
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t1 = Instant::now();
    assert!(
        closed_within(&mut half, Duration::from_secs(15)).is_some(),
        "a half-sent header stays open"
    );
    let took = t1.elapsed();
    let mut closed = 0;
    for s in &mut idle {
        if closed_within(s, Duration::from_millis(50)).is_some() {
            closed += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fd_end = fds(pid);
    eprintln!(
        "2000 idle connections: {answered} answers meanwhile; router descriptors {fd0} before, {fd_flood} during, {fd_end} after the header deadline ({closed} closed by the router; a half-sent header closed after {:.1}s)",
        took.as_secs_f64()
    );
    assert_eq!(
        closed,
        idle.len(),
        "the router closes idle connections on its header deadline"
    );
    assert!(
        fd_end < fd0 + 50,
        "{fd_end} descriptors after, {fd0} before"
    );
    assert_eq!(complete(&base), 200);
}
