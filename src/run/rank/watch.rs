//! Watchers of one process: its ready line in its log, the phases a starting engine logs,
//! the Ray daemons it started (pidfds), and the engine's health and progress over HTTP.
//! Each reports [`Event`]s tagged with the rank's reset epoch.

use super::Event;
use crate::exit;
use crate::plan::lifecycle::Kind;
use crate::run::{ports, proc};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Where a watcher reports, tagged with the rank's reset epoch at the process's start: a
/// report about a process a reset already stopped is dropped.
#[derive(Clone)]
pub(super) struct Reports {
    pub(super) tx: mpsc::UnboundedSender<(usize, u64, Event)>,
    pub(super) slot: usize,
    pub(super) epoch: u64,
}

impl Reports {
    pub(super) fn send(&self, ev: Event) -> Result<(), ()> {
        self.tx.send((self.slot, self.epoch, ev)).map_err(|_| ())
    }

    /// Report that `kind` (of this slot) failed with `code`.
    pub(super) fn failed(&self, kind: Kind, code: i32, reason: String) {
        let _ = self.send(Event::Failed {
            code,
            reason,
            kind: Some(kind),
            slot: self.slot,
        });
    }
}

/// The command an event is about.
pub(super) fn event_kind(ev: &Event) -> Option<Kind> {
    match ev {
        Event::Up(k, _) => Some(*k),
        Event::Exited { kind, .. } => Some(*kind),
        Event::Failed { kind, .. } => *kind,
        Event::Phase(k, _, _) => Some(*k),
    }
}

/// Wait until `needle` appears in the file (appended to by a child).
/// Only what was written from byte `from` on counts (a restarted command appends to its log).
pub(super) async fn watch_log(path: &Path, needle: &str, from: u64) -> bool {
    let mut offset = from as usize;
    let mut carry = String::new();
    loop {
        // off the runtime thread, which carries the heartbeats
        if let Ok(data) = tokio::fs::read(path).await {
            if data.len() > offset {
                carry.push_str(&String::from_utf8_lossy(&data[offset..]));
                offset = data.len();
                if carry.contains(needle) {
                    return true;
                }
                let keep = carry.len().saturating_sub(needle.len());
                let cut = (0..=keep)
                    .rev()
                    .find(|i| carry.is_char_boundary(*i))
                    .unwrap_or(0);
                carry.drain(..cut);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A starting engine's phases, from the lines its log gains after `from` (read in pieces,
/// at most 1 MiB a time): each new one, in start order, is reported; done once it serves.
pub(super) async fn watch_phases(path: PathBuf, from: u64, kind: Kind, tx: Reports) {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut offset = from;
    let mut carry = String::new();
    let mut last: Option<&'static str> = None;
    loop {
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = (&mut f).take(1 << 20).read_to_end(&mut buf).await {
                    offset += n as u64;
                    carry.push_str(&String::from_utf8_lossy(&buf));
                }
            }
        }
        // whole lines only (progress bars rewrite theirs with \r)
        while let Some(i) = carry.find(['\n', '\r']) {
            let line: String = carry.drain(..=i).collect();
            if let Some(p) = crate::run::phases::of_line(&line) {
                let later =
                    last.is_none_or(|l| crate::run::phases::rank(p) > crate::run::phases::rank(l));
                if later {
                    last = Some(p);
                    if tx.send(Event::Phase(kind, tx.slot, p.to_string())).is_err() {
                        return;
                    }
                    if p == "starting the server" {
                        return;
                    }
                }
            }
        }
        if carry.len() > 1 << 16 {
            carry.clear();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Once `kind` is up: the first of its `daemons` (in session `sid`) to exit is reported as
/// the command's end, the moment the kernel says so (pidfd), instead of when `ray start
/// --block`, which polls its children, notices.
pub(super) async fn watch_daemons(
    kind: Kind,
    sid: i32,
    daemons: &[String],
    log: &Path,
    leader_ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tx: Reports,
) {
    if daemons.is_empty() {
        return;
    }
    let names: Vec<&str> = daemons.iter().map(String::as_str).collect();
    // they are started before the ready line, but give a slow /proc a moment
    let mut found = Vec::new();
    for _ in 0..50 {
        found = proc::session_named(sid, &names);
        if names.iter().all(|n| found.iter().any(|(_, c)| c == n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fds = Vec::new();
    for (pid, name) in found {
        match proc::PidFd::open(pid) {
            Ok(fd) => fds.push((pid, name, fd)),
            Err(e) => warn!("cannot watch {name} (pid {pid}) of {kind}: {e}; its death is seen when `{kind}` notices"),
        }
    }
    if fds.is_empty() {
        return;
    }
    let (pid, name) = {
        let each = fds.iter().map(|(pid, name, fd)| {
            Box::pin(async move {
                fd.exited().await;
                (*pid, name.clone())
            })
        });
        futures_util::future::select_all(each).await.0
    };
    // killing `ray start` takes its daemons along: then its own end is the news
    tokio::time::sleep(Duration::from_millis(100)).await;
    if leader_ended.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let _ = tx.send(Event::Exited {
        kind,
        slot: tx.slot,
        status: format!("its {name} (pid {pid}) is gone"),
        code: 1,
        log: Some(log.display().to_string()),
        tail: proc::log_tail(log, 5),
    });
}

/// What the engine's health watcher polls, and how.
pub(super) struct Probe {
    pub(super) url: String,
    pub(super) every: Duration,
    pub(super) failures: u32,
    pub(super) timeout: Duration,
    /// `health.stall_timeout`: busy without a new token this long is a stall.
    pub(super) stall: Duration,
    /// The engine's first token, asked for once `/health` answers (the engine only).
    pub(super) first_token: Option<FirstToken>,
}

/// A one-token request through the engine, the last step of its start.
pub(super) struct FirstToken {
    /// The engine's base URL, without `/v1`.
    pub(super) base: String,
    /// The name it serves its model under.
    pub(super) model: String,
    pub(super) key: Option<String>,
    /// `health.first_token_timeout`.
    pub(super) timeout: Duration,
}

/// One token from the engine, within `f.timeout`: a completion (`max_tokens: 1`), or for a
/// model that does not complete (an embedding model answers 4xx), an embedding. Tried again
/// each second until then: the last failure is the answer.
pub(super) async fn first_token(f: &FirstToken) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let post = |path: &str, body: serde_json::Value, left: Duration| {
        let mut rb = client
            .post(format!("{}{path}", f.base))
            .timeout(left)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(k) = &f.key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    let mut last = String::from("no answer");
    while let Some(left) = f.timeout.checked_sub(t0.elapsed()).filter(|d| !d.is_zero()) {
        let body = serde_json::json!({"model": f.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0});
        match post("/v1/completions", body, left).await {
            Ok(r) if r.status().is_success() => {
                let b = r.bytes().await.unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
                if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                    return Ok(());
                }
                last = format!("a completion with no choices: {v}");
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status().as_u16();
                let body = serde_json::json!({"model": f.model, "input": "Hello"});
                match post("/v1/embeddings", body, left).await {
                    Ok(e) if e.status().is_success() => return Ok(()),
                    Ok(e) => {
                        last = format!(
                            "/v1/completions answered {status}, /v1/embeddings {}",
                            e.status().as_u16()
                        );
                    }
                    Err(e) => last = format!("/v1/embeddings: {e}"),
                }
            }
            Ok(r) => last = format!("/v1/completions answered {}", r.status().as_u16()),
            Err(e) if e.is_timeout() => {
                last = format!(
                    "no answer to a one-token completion within {}",
                    humantime::format_duration(f.timeout)
                );
            }
            Err(e) => last = format!("/v1/completions: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

/// Readiness, then liveness, of the engine's HTTP server: `/health`, and progress from its
/// `/metrics` (busy without new tokens is a stall). Proxies are ignored: cluster shells
/// often export http_proxy, and this is a local address.
pub(super) async fn health(kind: Kind, p: Probe, session: i32, tx: Reports) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(p.timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => return tx.failed(kind, exit::INTERNAL, format!("HTTP client: {e}")),
    };
    while probe(&client, &p.url).await.is_err() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Ready only if the engine itself answered: someone else may have bound the port first.
    let port = reqwest::Url::parse(&p.url)
        .ok()
        .and_then(|u| u.port_or_known_default());
    if let Some(port) = port {
        if let Err(e) = ports::held_by_session(port, session) {
            return tx.failed(kind, e.exit_code(), e.msg);
        }
    }
    // ready means it generates: /health alone has marked engines ready that hang at the
    // first request
    if let Some(f) = &p.first_token {
        let _ = tx.send(Event::Phase(
            kind,
            tx.slot,
            "asking for a first token".into(),
        ));
        let t0 = std::time::Instant::now();
        if let Err(why) = first_token(f).await {
            return tx.failed(
                kind,
                exit::ENGINE_FAILURE,
                format!("the engine answers /health but gave no first token: {why} (health.first_token_timeout)"),
            );
        }
        let ms = t0.elapsed().as_millis();
        let _ = tx.send(Event::Phase(
            kind,
            tx.slot,
            format!("first token in {ms} ms"),
        ));
    }
    let _ = tx.send(Event::Up(kind, tx.slot));
    let why = alive(&client, &p).await;
    tx.failed(kind, exit::ENGINE_FAILURE, why);
}

/// One `/health` poll: `Err` says why it failed.
async fn probe(client: &reqwest::Client, url: &str) -> Result<(), String> {
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        Err(e) => Err(if e.is_connect() {
            "connection refused".to_string()
        } else {
            e.to_string()
        }),
    }
}

/// Liveness of a serving engine, every `p.every`: its progress from `/metrics` (busy without
/// new tokens for `p.stall` is a stall) and `/health` (`p.failures` in a row). Returns why it
/// is not alive any more.
async fn alive(client: &reqwest::Client, p: &Probe) -> String {
    let mut bad = 0;
    let metrics = p
        .url
        .strip_suffix("/health")
        .map(|b| format!("{b}/metrics"));
    let mut progress = crate::run::progress::Progress::new(p.stall);
    loop {
        tokio::time::sleep(p.every).await;
        if let Some(m) = &metrics {
            let sample = match client.get(m).send().await {
                Ok(r) if r.status().is_success() => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| crate::run::progress::parse(&t)),
                _ => None,
            };
            if let Some(s) = sample {
                if let Some(d) = progress.on_sample(s, std::time::Instant::now()) {
                    return format!(
                        "engine stalled: {} request(s) running or waiting and no token generated for {} (health.stall_timeout; {} tokens so far)",
                        s.busy,
                        humantime::format_duration(Duration::from_secs(d.as_secs())),
                        s.tokens
                    );
                }
            }
        }
        match probe(client, &p.url).await {
            Ok(()) => bad = 0,
            Err(e) => {
                bad += 1;
                if bad >= p.failures {
                    return format!(
                        "engine health check {} failed {bad} times in a row (last: {e})",
                        p.url
                    );
                }
            }
        }
    }
}
