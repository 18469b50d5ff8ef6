//! The router over several models and attached endpoints, on this machine (no Slurm): real
//! `ray-launch route` processes in front of stand-in engines, spoken to with curl.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
use std::path::{Path, PathBuf};
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

/// Children killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A stand-in vLLM serving `served` on `port` (with `key`, it wants that key).
fn standin(port: u16, served: &str, key: Option<&str>, auth_log: Option<&Path>) -> Child {
    let mut c = Command::new("python3");
    c.arg(root().join("tests/standin/engine.py"))
        .args(["vllm", "serve", "tiny", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--served-model-name", served])
        .env_remove("VLLM_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(k) = key {
        c.args(["--api-key", k]);
    }
    if let Some(l) = auth_log {
        c.env("STANDIN_AUTH_LOG", l);
    }
    c.spawn().unwrap()
}

/// `curl` a request: (status, body).
fn curl(method: &str, url: &str, key: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    curl_with(&[], method, url, key, body)
}

/// [`curl`] with more of curl's arguments (headers, `--path-as-is`).
fn curl_with(
    extra: &[&str],
    method: &str,
    url: &str,
    key: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut c = Command::new("curl");
    c.args(extra);
    c.args([
        "-s",
        "-m",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ])
    .args(["-H", &format!("Authorization: Bearer {key}")])
    .arg(url);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn complete(base: &str, key: &str, model: Option<&str>) -> (u16, serde_json::Value) {
    let body = match model {
        Some(m) => format!(r#"{{"model":"{m}","prompt":"hi","max_tokens":1}}"#),
        None => r#"{"prompt":"hi","max_tokens":1}"#.to_string(),
    };
    curl("POST", &format!("{base}/completions"), key, Some(&body))
}

#[test]
fn the_router_routes_by_model_name_and_keeps_the_jobs_key_in_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let key_file = dir.path().join("ext.key");
    std::fs::write(&key_file, "ext-secret-key\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_log = dir.path().join("open.auth");
    let mut procs = Procs(vec![
        standin(ports[0], "policy", Some("job-key"), None),
        standin(ports[1], "rm", Some("job-key"), None),
        // attached: one with a key of its own, one open (it logs what it is sent)
        standin(ports[2], "ext-model", Some("ext-secret-key"), None),
        standin(ports[3], "open-model", None, Some(&open_log)),
    ]);
    let u = |p: u16| format!("http://127.0.0.1:{p}");
    let router = Command::new(env!("CARGO_BIN_EXE_ray-launch"))
        .args(["route", "--listen", &format!("127.0.0.1:{}", ports[4])])
        .args([
            "--model",
            "policy=policy",
            "--replica",
            &format!("policy={}", u(ports[0])),
        ])
        .args([
            "--model",
            "reward=rm",
            "--replica",
            &format!("reward={}", u(ports[1])),
        ])
        .args(["--attach", &format!("ext={}/v1", u(ports[2]))])
        .args(["--attach-key", &format!("ext={}", key_file.display())])
        .args(["--attach", &format!("open={}/v1", u(ports[3]))])
        .args(["--health-interval", "200ms"])
        .env("RAY_LAUNCH_ROUTER_API_KEY", "job-key")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    procs.0.push(router);
    let base = format!("{}/v1", u(ports[4]));
    // every backend healthy (the attached ones polled on /v1/models, which learns their ids)
    wait_until("all four healthy", Duration::from_secs(30), || {
        let (code, m) = curl("GET", &format!("{base}/models"), "job-key", None);
        code == 200
            && m["data"].as_array().is_some_and(|d| {
                d.iter().any(|x| x["id"] == "open-model")
                    && d.iter().any(|x| x["id"] == "ext-model")
            })
            && complete(&base, "job-key", Some("open-model")).0 == 200
            && complete(&base, "job-key", Some("policy")).0 == 200
            && complete(&base, "job-key", Some("rm")).0 == 200
    });
    let (_, models) = curl("GET", &format!("{base}/models"), "job-key", None);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["policy", "rm", "ext-model", "open-model"]);

    // by served name, by the entry's name (the router puts the served name in), none: the first
    assert_eq!(complete(&base, "job-key", Some("rm")).1["model"], "rm");
    assert_eq!(complete(&base, "job-key", Some("reward")).1["model"], "rm");
    assert_eq!(complete(&base, "job-key", None).1["model"], "policy");
    // an attached endpoint by its id or its name, sent its own key (the job's would be a 401)
    assert_eq!(
        complete(&base, "job-key", Some("ext-model")),
        (200, complete(&base, "job-key", Some("ext")).1)
    );
    assert_eq!(
        complete(&base, "job-key", Some("ext")).1["model"],
        "ext-model"
    );
    // one model's own URL: whatever the body names
    let own = format!("{}/models/reward/v1", u(ports[4]));
    assert_eq!(complete(&own, "job-key", Some("anything")).1["model"], "rm");
    let (code, list) = curl("GET", &format!("{own}/models"), "job-key", None);
    assert_eq!((code, list["data"][0]["id"].as_str()), (200, Some("rm")));
    // unknown: a 404 in OpenAI's format, naming what there is
    let (code, e) = complete(&base, "job-key", Some("gpt-5"));
    assert_eq!(code, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`gpt-5`") && msg.contains("policy, reward, ext, open"),
        "{msg}"
    );
    assert_eq!(
        complete(&format!("{}/models/nope/v1", u(ports[4])), "job-key", None).0,
        404
    );
    // the job's key is still needed at the router
    assert_eq!(complete(&base, "wrong", Some("rm")).0, 401);

    // strict routing: a body that is not JSON, a model that is no string: 400 in OpenAI's
    // format; a path that leaves a model's /v1/ (encoded or not) never reaches it
    let completions = format!("{base}/completions");
    for body in ["{not json", r#"{"model": 7, "prompt": "x"}"#, "[1]"] {
        let (code, e) = curl("POST", &completions, "job-key", Some(body));
        assert_eq!(code, 400, "{body}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    }
    let root = u(ports[4]);
    for path in [
        "/models/open/../../admin",
        "/models/open/v1/%2e%2e/%2e%2e/admin",
        "/models/open/admin",
    ] {
        let (code, _) = curl_with(
            &["--path-as-is"],
            "GET",
            &format!("{root}{path}"),
            "job-key",
            None,
        );
        assert_eq!(code, 400, "{path}");
    }
    // an attached server gets no cookie and no other credential of the client's
    let (code, _) = curl_with(
        &[
            "-H",
            "Cookie: session=client-cookie",
            "-H",
            "X-Api-Key: client-xkey",
        ],
        "POST",
        &completions,
        "job-key",
        Some(r#"{"model": "open-model", "prompt": "x"}"#),
    );
    assert_eq!(code, 200);

    // the open attached endpoint never saw the job's key, nor the client's cookie or X-Api-Key
    let seen = std::fs::read_to_string(&open_log).unwrap();
    assert!(!seen.is_empty());
    for secret in ["job-key", "client-cookie", "client-xkey"] {
        assert!(
            !seen.contains(secret),
            "`{secret}` went to an attached endpoint: {seen}"
        );
    }

    // an attached endpoint that goes away: its requests fail, the others go on
    let mut ext = procs.0.remove(2);
    ext.kill().unwrap();
    ext.wait().unwrap();
    wait_until("ext out of the router", Duration::from_secs(10), || {
        complete(&base, "job-key", Some("ext")).0 == 503
    });
    assert_eq!(complete(&base, "job-key", Some("policy")).0, 200);
}

#[test]
fn bad_route_flags_exit_2() {
    for (args, want) in [
        (
            &["--replica", "a=http://x:1"][..],
            "names model `a`, which no --model gives",
        ),
        (
            &["--model", "a=a", "--replica", "http://x:1"][..],
            "names no model",
        ),
        (
            &["--attach-key", "z=/k", "--replica", "http://x:1"][..],
            "names no --attach",
        ),
        (&["--model", "a"][..], "is not NAME=VALUE"),
        (&[][..], "nothing to route to"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ray-launch"))
            .args(["route", "--listen", "127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
