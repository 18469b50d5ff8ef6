//! Hostile input, in a process of its own (the children's peak memory is this process's to
//! read): deep nesting, devices and pipes for a config, a huge file, a huge bad value, huge
//! hostlists and durations, duplicate keys. Each is one `error:` line with a hint, exit 2,
//! no hang, and a small launcher.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OK: &str =
    "engine: vllm\nmodel: m\nparallel: {tensor: 1}\ngpus_per_node: 0\nvllm: {backend: mp}\n";

/// Run the binary with a clean environment, at most 20 s: (exit code, stderr, seconds).
fn run(args: &[&str], dir: &std::path::Path) -> (Option<i32>, String, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ray-launch"))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (code, reader.join().unwrap(), t0.elapsed().as_secs_f64())
}

#[test]
fn hostile_inputs_exit_2_at_once_with_a_short_message_and_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, body: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let fifo = dir.path().join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = fifo.display().to_string();
    let deep = file(
        "deep.yaml",
        format!("{OK}env: {}x{}\n", "[".repeat(100_000), "]".repeat(100_000)),
    );
    let dashes = file(
        "dashes.yaml",
        format!("{OK}engine_args:\n{}x\n", "- ".repeat(100_000)),
    );
    let big = file("big.yaml", format!("{OK}# {}\n", "x".repeat(2 << 20)));
    let long_value = file(
        "long.yaml",
        format!(
            "{OK}timeouts: {{engine_ready: '{}'}}\n",
            "9".repeat(900_000)
        ),
    );
    let window = file(
        "window.yaml",
        format!("{OK}replicas: {{restart_window: 500000000000y}}\n"),
    );
    let request = file(
        "request.yaml",
        format!("{OK}router: {{request_timeout: 500000000000y}}\n"),
    );
    let dup = file(
        "dup.yaml",
        format!("{OK}env:\n  HF_HOME: /a\n  HF_HOME: /b\n"),
    );
    let fifo_ray = file(
        "fifo-ray.yaml",
        format!("{OK}ray: {{executable: {fifo}}}\n"),
    );
    let zero_ray = file(
        "zero-ray.yaml",
        format!("{OK}ray: {{executable: /dev/zero}}\n"),
    );
    let long_prefix = format!("{}[0-65535]", "n".repeat(100_000));
    let many_prefix = format!("{}[0-65535]", "n".repeat(300));
    let long_list = "n1,".repeat(40_000);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "100,000 levels of flow nesting",
            vec!["check", "--config", &deep],
            "nests deeper than 32 levels",
        ),
        (
            "100,000 levels of block nesting",
            vec!["check", "--config", &dashes],
            "nests deeper than 32 levels",
        ),
        (
            "a device for a config",
            vec!["check", "--config", "/dev/zero"],
            "is not a regular file",
        ),
        (
            "random bytes for a config",
            vec!["check", "--config", "/dev/urandom"],
            "is not a regular file",
        ),
        (
            "a FIFO for a config",
            vec!["check", "--config", &fifo],
            "is not a regular file",
        ),
        (
            "a 2 MiB config",
            vec!["check", "--config", &big],
            "is larger than 1024 KiB",
        ),
        (
            "a 900 KB bad value",
            vec!["check", "--config", &long_value],
            "is not a duration",
        ),
        (
            "restart_window of 500 billion years",
            vec!["check", "--config", &window],
            "durations are held to 30 days",
        ),
        (
            "request_timeout of 500 billion years",
            vec!["check", "--config", &request],
            "durations are held to 30 days",
        ),
        (
            "a duplicate key under env",
            vec!["check", "--config", &dup],
            "duplicate entry with key \"HF_HOME\"",
        ),
        (
            "a 100,000-character host name",
            vec!["hostlist", "expand", &long_prefix],
            "more than 65536",
        ),
        (
            "a 300-character host name",
            vec!["hostlist", "expand", &many_prefix],
            "more than 255",
        ),
        (
            "a 100 KB hostlist",
            vec!["hostlist", "expand", &long_list],
            "more than 65536",
        ),
    ];
    let mut failures = Vec::new();
    for (name, args, want) in &cases {
        let (code, err, secs) = run(args, dir.path());
        eprintln!(
            "{name}: exit {code:?} in {secs:.2}s, {} bytes of stderr",
            err.len()
        );
        let ok = code == Some(2)
            && err.starts_with("error")
            && err.contains(want)
            && err.contains("hint:")
            && err.len() < 2000;
        if !ok {
            let shown: String = err.chars().take(600).collect();
            failures.push(format!(
                "[{name}] exit {code:?} in {secs:.2}s, want `{want}`: {shown}"
            ));
        }
    }
    // ray.executable is looked at, never read whole: a FIFO or a device there does not hang
    // `plan` (a Ray-less config plans fine)
    for cfg in [&fifo_ray, &zero_ray] {
        let (code, err, secs) = run(&["plan", "--config", cfg, "--nodelist", "n1"], dir.path());
        eprintln!("ray.executable {cfg}: exit {code:?} in {secs:.2}s");
        if code != Some(0) {
            failures.push(format!("[ray.executable {cfg}] exit {code:?}: {err}"));
        }
    }
    let peak = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .unwrap()
        .max_rss(); // KiB
    eprintln!("largest launcher: {} MiB", peak >> 10);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(peak < 100 << 10, "a launcher took {} MiB", peak >> 10);
}
