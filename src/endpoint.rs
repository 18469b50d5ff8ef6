//! The endpoint file: a public contract between the job and its users. The master writes it
//! (atomically and 0600: a fresh temp file in the same directory, then a rename) at each change of status;
//! `ray-launch wait` and client steps read it. Fields are only ever added.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where the job is: `starting` → `ready` → `stopped` (clean stop) or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Starting,
    Ready,
    Stopped,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }

    /// Whether the job is over (nothing will change any more).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Stopped | Status::Failed)
    }
}

/// One replica's state, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Started (or started again), not serving yet.
    #[default]
    Starting,
    /// Serving (the router sends it requests).
    Ready,
    /// Failed: being torn down on its nodes, then started again after a back-off.
    Restarting,
    /// Failed past its restarts, or its node was lost: it stays down.
    Down,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Starting => "starting",
            ReplicaState::Ready => "ready",
            ReplicaState::Restarting => "restarting",
            ReplicaState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicaStatus {
    pub replica: usize,
    /// The model it serves (its name in the config).
    pub model: String,
    /// Its leader's node.
    pub node: String,
    pub url: String,
    pub state: ReplicaState,
    /// How often it was started again.
    pub restarts: u32,
    /// Why it last failed.
    pub reason: Option<String>,
    /// While it starts: its engine's phase (`loading weights`, ...), from the engine's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// A model's state: `starting`, `ready` (a replica serves), `down` (none does),
/// `dropped` (down, and not required), or `attached` (not the job's own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStatus {
    /// A base URL that serves this model alone (through the router when there is one).
    pub url: String,
    /// Its replicas' own base URLs (the attached endpoint's URL).
    pub urls: Vec<String>,
    pub served_model_name: String,
    pub status: String,
    pub required: bool,
}

/// Each model's state from its replicas' states.
pub fn model_statuses(
    plan: &crate::plan::Plan,
    replicas: &[ReplicaStatus],
    dropped: &[String],
) -> std::collections::BTreeMap<String, ModelStatus> {
    let mut out = std::collections::BTreeMap::new();
    for m in &plan.models {
        let own: Vec<&ReplicaStatus> = replicas.iter().filter(|r| r.model == m.name).collect();
        let status = if dropped.contains(&m.name) {
            "dropped"
        } else if own.iter().any(|r| r.state == ReplicaState::Ready) {
            "ready"
        } else if !own.is_empty() && own.iter().all(|r| r.state == ReplicaState::Down) {
            "down"
        } else {
            "starting"
        };
        out.insert(
            m.name.clone(),
            ModelStatus {
                url: m.url.clone(),
                urls: plan
                    .endpoints
                    .iter()
                    .filter(|e| e.model == m.name)
                    .map(|e| e.url.clone())
                    .collect(),
                served_model_name: m.served_model_name.clone(),
                status: status.into(),
                required: m.required,
            },
        );
    }
    for a in &plan.attached {
        out.insert(
            a.name.clone(),
            ModelStatus {
                url: a.router_url.clone(),
                urls: vec![a.url.clone()],
                served_model_name: String::new(),
                status: "attached".into(),
                required: false,
            },
        );
    }
    out
}

/// A batch's progress (`ray-launch batch`, the job's `--batch`): written by the batch to its
/// progress file, copied by the master into the endpoint file, shown by `ray-launch status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchStatus {
    /// `running`, `done` (every request answered or failed for good), `stopped` (work left).
    pub state: String,
    /// Requests of this input (this shard's lines).
    pub total: u64,
    /// Answered (in OUT), this run and earlier ones.
    pub done: u64,
    /// Failed for good (in OUT.errors), this run and earlier ones.
    pub failed: u64,
    /// Found in OUT or OUT.errors at the start (earlier runs): not sent again.
    pub resumed: u64,
    /// Attempts sent again after a retriable failure.
    pub retried: u64,
    pub in_flight: u64,
    /// How many requests it keeps in flight now.
    pub window: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Requests (answered or failed) per second, over the last 10 s.
    pub rate: f64,
    /// Generated tokens per second, over the last 10 s.
    pub tokens_rate: f64,
    pub eta_s: Option<f64>,
    pub elapsed_s: f64,
    pub output: String,
    pub errors: String,
    /// Requests answered per model (this run).
    pub per_model: std::collections::BTreeMap<String, u64>,
}

impl BatchStatus {
    /// The progress line (`done/total, errors, rate, tokens/s, ETA`).
    pub fn line(&self) -> String {
        let pct = if self.total > 0 {
            100.0 * (self.done + self.failed) as f64 / self.total as f64
        } else {
            100.0
        };
        let eta = self.eta_s.map_or_else(
            || "-".to_string(),
            |s| {
                humantime::format_duration(std::time::Duration::from_secs(s.round() as u64))
                    .to_string()
            },
        );
        format!(
            "batch {}: {}/{} done ({pct:.1}%), {} failed, {} retried, {} in flight, {:.1} req/s, {:.0} tokens/s, ETA {eta}",
            self.state,
            self.done + self.failed,
            self.total,
            self.failed,
            self.retried,
            self.in_flight,
            self.rate,
            self.tokens_rate
        )
    }
}

/// Readers take what is there: a missing field has its default (files of older or newer
/// launchers, or written by hand, still read).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointFile {
    pub status: Status,
    /// OpenAI base URL clients should use: the router's, or replica 0's without a router.
    pub url: Option<String>,
    /// Every replica's base URL.
    pub urls: Vec<String>,
    /// Every replica's state and restarts.
    pub replicas: Vec<ReplicaStatus>,
    /// Every model the job serves (and every attached endpoint), by name.
    pub models: std::collections::BTreeMap<String, ModelStatus>,
    pub model: String,
    pub served_model_name: String,
    pub job_id: String,
    /// The master's node.
    pub node: String,
    pub updated_at: String,
    pub ready_at: Option<String>,
    /// The file (0600) that holds the endpoint's API key; null with `security.auth: off`.
    pub api_key_path: Option<String>,
    /// Why the job stopped, once it has.
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    /// The batch's progress, in a batch job (`--batch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchStatus>,
}

impl EndpointFile {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("the endpoint file serializes")
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::private::write_atomic(path, &self.to_json())
    }

    /// The file as it is now: `Ok(None)` while it does not exist yet.
    pub fn read(path: &Path) -> Result<Option<EndpointFile>, String> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| format!("{} is not an endpoint file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }
}

/// How long the job has served: from `ready_at` to now, or to its last update once over.
fn uptime(f: &EndpointFile, now: std::time::SystemTime) -> Option<std::time::Duration> {
    let since = humantime::parse_rfc3339_weak(f.ready_at.as_deref()?).ok()?;
    let until = if f.status.is_final() {
        humantime::parse_rfc3339_weak(&f.updated_at).ok()?
    } else {
        now
    };
    until.duration_since(since).ok()
}

/// A duration to the second (`1h 2m 3s`).
fn secs(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

/// `ray-launch status --format json`: the file, plus `uptime_s`.
pub fn status_json(f: &EndpointFile, now: std::time::SystemTime) -> String {
    let mut v = serde_json::to_value(f).expect("the endpoint file serializes");
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "uptime_s".into(),
            uptime(f, now).map_or(serde_json::Value::Null, |d| d.as_secs().into()),
        );
    }
    serde_json::to_string_pretty(&v).expect("JSON serializes")
}

/// `ray-launch status`: the job's state, URL, models and replicas as a short table.
pub fn status_text(f: &EndpointFile, now: std::time::SystemTime) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let up = match (uptime(f, now), f.status) {
        (Some(d), Status::Ready) => format!(", serving for {}", secs(d)),
        (Some(d), s) if s.is_final() => format!(" after serving for {}", secs(d)),
        _ => String::new(),
    };
    let code = f
        .exit_code
        .map(|c| format!(" (exit {c})"))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "job {} on {}: {}{code}{up}",
        f.job_id,
        f.node,
        f.status.as_str()
    );
    if let Some(r) = &f.reason {
        let _ = writeln!(o, "reason: {r}");
    }
    if let Some(u) = &f.url {
        let _ = writeln!(o, "url: {u}");
    }
    if let Some(k) = &f.api_key_path {
        let _ = writeln!(o, "api key: {k}");
    }
    if let Some(b) = &f.batch {
        let _ = writeln!(o, "{}", b.line());
        let _ = writeln!(
            o,
            "batch: {} resumed, tokens in {} out {}, answers in {}, failures in {}",
            b.resumed, b.tokens_in, b.tokens_out, b.output, b.errors
        );
    }
    if f.models.len() > 1 {
        let _ = writeln!(
            o,
            "\n{:<16} {:<10} {:<20} url",
            "model", "status", "served as"
        );
        for (name, m) in &f.models {
            let _ = writeln!(
                o,
                "{:<16} {:<10} {:<20} {}",
                name,
                m.status,
                if m.served_model_name.is_empty() {
                    "-"
                } else {
                    &m.served_model_name
                },
                m.url
            );
        }
    }
    if !f.replicas.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<8} {:<16} {:<12} {:<11} {:<9} url",
            "replica", "model", "node", "state", "restarts"
        );
        for r in &f.replicas {
            let state = match (&r.phase, r.state) {
                (Some(p), ReplicaState::Starting) => format!("starting ({p})"),
                _ => r.state.as_str().to_string(),
            };
            let _ = writeln!(
                o,
                "{:<8} {:<16} {:<12} {:<11} {:<9} {}",
                r.replica,
                if r.model.is_empty() { "-" } else { &r.model },
                r.node,
                state,
                r.restarts,
                r.url
            );
            if let (Some(why), false) = (&r.reason, r.state == ReplicaState::Ready) {
                let _ = writeln!(o, "         last failure: {why}");
            }
        }
    }
    let _ = writeln!(o, "\nupdated {}", f.updated_at);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_the_wire_names() {
        let f = EndpointFile {
            status: Status::Ready,
            url: Some("http://10.0.0.1:20010/v1".into()),
            urls: vec!["http://10.0.0.1:20010/v1".into()],
            replicas: vec![ReplicaStatus {
                replica: 0,
                model: "m".into(),
                node: "node1".into(),
                url: "http://10.0.0.1:20010/v1".into(),
                state: ReplicaState::Restarting,
                restarts: 1,
                reason: Some("engine died".into()),
                phase: None,
            }],
            models: [(
                "m".to_string(),
                ModelStatus {
                    url: "http://10.0.0.1:20010/models/m/v1".into(),
                    urls: vec!["http://10.0.0.1:20010/v1".into()],
                    served_model_name: "m".into(),
                    status: "starting".into(),
                    required: true,
                },
            )]
            .into(),
            model: "m".into(),
            served_model_name: "m".into(),
            job_id: "7".into(),
            node: "node1".into(),
            updated_at: "t".into(),
            ready_at: Some("t".into()),
            api_key_path: None,
            reason: None,
            exit_code: None,
            batch: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e/endpoint.json");
        assert_eq!(EndpointFile::read(&p).unwrap(), None);
        f.write(&p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["status"], "ready");
        assert_eq!(v["replicas"][0]["state"], "restarting");
        assert_eq!(v["models"]["m"]["status"], "starting");
        assert_eq!(EndpointFile::read(&p).unwrap(), Some(f));
    }

    #[test]
    fn status_says_state_uptime_and_each_replica() {
        let f = EndpointFile {
            status: Status::Ready,
            url: Some("http://10.0.0.1:20010/v1".into()),
            replicas: vec![
                ReplicaStatus {
                    replica: 0,
                    model: "m".into(),
                    node: "node1".into(),
                    url: "http://10.0.0.1:20020/v1".into(),
                    state: ReplicaState::Ready,
                    restarts: 0,
                    reason: None,
                    phase: None,
                },
                ReplicaStatus {
                    replica: 1,
                    model: "m".into(),
                    node: "node2".into(),
                    url: "http://10.0.0.2:20020/v1".into(),
                    state: ReplicaState::Restarting,
                    restarts: 2,
                    reason: Some("engine died".into()),
                    phase: None,
                },
            ],
            job_id: "7".into(),
            node: "node1".into(),
            updated_at: "2026-12-02T05:00:00Z".into(),
            ready_at: Some("2026-12-02T04:00:00Z".into()),
            ..Default::default()
        };
        let now = humantime::parse_rfc3339("2026-12-02T05:30:05Z").unwrap();
        let t = status_text(&f, now);
        assert!(
            t.starts_with("job 7 on node1: ready, serving for 1h 30m 5s\n"),
            "{t}"
        );
        assert!(
            t.contains("\n1        m                node2        restarting  2"),
            "{t}"
        );
        assert!(t.contains("last failure: engine died"), "{t}");
        let v: serde_json::Value = serde_json::from_str(&status_json(&f, now)).unwrap();
        assert_eq!(v["uptime_s"], 5405);
        // once over, the uptime ends at the last update
        let done = EndpointFile {
            status: Status::Stopped,
            exit_code: Some(143),
            ..f
        };
        assert!(status_text(&done, now)
            .starts_with("job 7 on node1: stopped (exit 143) after serving for 1h\n"));
    }
}
