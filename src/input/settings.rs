//! Validated, merged settings: command line > environment (clap reads the `RAY_LAUNCH_*`
//! fallbacks) > config file > defaults, resolved here once. Nothing downstream re-reads flags,
//! the environment or the YAML.

use crate::input::config::{self, Auto, Config, Loaded};
use crate::input::slurm::Step;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    /// The models the job serves, resolved from `model` or `models:`.
    pub models: Vec<config::ModelSpec>,
    pub config_path: String,
    /// Resolved: `--gpus-per-node`, else the config's number, else Slurm's count, else 0.
    pub gpus_per_node: u32,
    /// Where `gpus_per_node: auto` found its number (none: set by flag or config).
    pub gpus_from: Option<String>,
    /// Absolute, `{job}` filled in.
    pub endpoint_file: String,
    pub event_log: Option<String>,
    pub log_dir: String,
    /// The client command (after `--`); empty = serve until stopped.
    pub client: Vec<String>,
    /// Digest of everything that must be equal on every rank (ranks compare it at rendezvous).
    pub digest: String,
    pub timeouts: Timeouts,
    pub health: Health,
    /// `ports.range`, parsed: where the job's port block comes from.
    pub port_range: (u16, u16),
    /// Whether ranks authenticate and the job has a key (`security.auth` is not `off`).
    pub auth: bool,
    /// `env:` names whose values are masked wherever ray-launch prints them.
    pub secret_env: BTreeSet<String>,
    /// `-step{N}` for steps after the first, so two steps of one job never share a log name
    /// or a default endpoint file; empty for step 0.
    pub step_suffix: String,
    pub policy: Policy,
    /// A batch job (`--batch`, `batch:`): what its batch runs with. Its command is the client.
    pub batch: Option<BatchJob>,
    /// A job of a service (`service:`).
    pub service: Option<ServiceJob>,
}

/// A batch job's settings (the config's `batch:` with the command line's `--batch`/`--output`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchJob {
    pub input: String,
    pub output: String,
    /// None: `auto`.
    pub concurrency: Option<u32>,
    pub max_attempts: u32,
    pub requeue: bool,
    pub shard: String,
    pub request_timeout: Duration,
    /// Where the batch writes its progress for the master (next to the endpoint file).
    pub progress_file: String,
    /// The names a request's `model` may take: each model's name and served name, and the
    /// attached endpoints' names.
    pub models: Vec<String>,
}

impl BatchJob {
    /// The batch's command line (`ray-launch batch ...`), run as the job's client.
    pub fn argv(&self, grace: Duration) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "ray-launch".into(),
            "batch".into(),
            "--input".into(),
            self.input.clone(),
            "--output".into(),
            self.output.clone(),
            "--concurrency".into(),
            self.concurrency
                .map_or_else(|| "auto".to_string(), |n| n.to_string()),
            "--max-attempts".into(),
            self.max_attempts.to_string(),
            "--request-timeout".into(),
            humantime::format_duration(self.request_timeout).to_string(),
            "--grace".into(),
            humantime::format_duration(grace).to_string(),
            "--shard".into(),
            self.shard.clone(),
            "--progress-file".into(),
            self.progress_file.clone(),
        ];
        if !self.models.is_empty() {
            v.push("--models".into());
            v.push(self.models.join(","));
        }
        v
    }
}

/// What the run decides by, from the config (so `run/` never reads [`Config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Restarts of one replica allowed within `restart_window` (`replicas.*`).
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// A lost node puts the job back in the queue (`on_node_failure: requeue`).
    pub requeue_on_node_failure: bool,
    /// How long an attached endpoint may take to answer the check (`timeouts.attach`).
    pub attach_timeout: Duration,
    /// The user's own API key file (`server.api_key_file`); else the launcher writes one.
    pub api_key_file: Option<String>,
    /// The config's ports that do not come from the block (`ray.port`, `server.port`).
    pub fixed_ports: Vec<u16>,
}

/// Whether a variable's name says its value is secret.
pub fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL"]
        .iter()
        .any(|w| n.contains(w))
}

/// `timeouts.*` as plain durations, and what follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub rendezvous: Duration,
    pub worker_join: Duration,
    pub engine_ready: Duration,
    pub engine_ready_max: Duration,
    pub shutdown_grace: Duration,
    pub kill_wait: Duration,
    /// The longest teardown of one rank: the engine's grace, then Ray's, then a second for
    /// SIGKILL and reaping. Validation keeps it inside `kill_wait`.
    pub teardown_budget: Duration,
}

/// `health.*` as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub interval: Duration,
    pub failures: u32,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub stall_timeout: Duration,
    pub first_token_timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub gpus_per_node: Option<u32>,
    pub endpoint_file: Option<String>,
    pub event_log: Option<String>,
    pub log_dir: Option<String>,
    /// `run --batch IN --output OUT`.
    pub batch: Option<(String, String)>,
    /// `$HOME` (where a service's directory is by default).
    pub home: Option<String>,
}

/// A job of a service (`service:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceJob {
    pub name: String,
    /// The service's directory (absolute).
    pub dir: String,
    pub handover_before: Duration,
}

/// The job of service `svc`: its directory, and the config as a service job runs it (the
/// service's key, and the router in front whatever the replica count: one place for the
/// job's header and its count of requests in flight).
fn service_job(
    svc: &config::Service,
    c: &mut Config,
    home: Option<&str>,
    cwd: &Path,
) -> ServiceJob {
    let dir = match (&svc.dir, home) {
        (Some(d), _) => absolute(d, cwd),
        (None, Some(h)) => format!("{h}/.ray-launch/services/{}", svc.name),
        (None, None) => absolute(&format!(".ray-launch/services/{}", svc.name), cwd),
    };
    c.server.api_key_file = Some(format!("{dir}/key"));
    c.router.enabled = Some(true);
    ServiceJob {
        name: svc.name.clone(),
        dir,
        handover_before: svc.handover_before.0,
    }
}

fn absolute(p: &str, cwd: &Path) -> String {
    if Path::new(p).is_absolute() {
        p.to_string()
    } else {
        cwd.join(p).to_string_lossy().into_owned()
    }
}

/// What the run decides by, from the config.
fn policy(c: &Config) -> Policy {
    Policy {
        max_restarts: c.replicas.max_restarts,
        restart_window: c.replicas.restart_window.0,
        requeue_on_node_failure: c.on_node_failure == config::OnNodeFailure::Requeue,
        attach_timeout: c.timeouts.attach.0,
        api_key_file: c.server.api_key_file.clone(),
        fixed_ports: [c.ray.port, c.server.port]
            .into_iter()
            .filter_map(|p| match p {
                Auto::Value(v) => Some(v),
                Auto::Auto => None,
            })
            .collect(),
    }
}

pub fn resolve(
    loaded: &Loaded,
    ov: &Overrides,
    step: &Step,
    client: Vec<String>,
    cwd: &Path,
) -> Settings {
    let mut cfg = loaded.config.clone();
    let service = cfg
        .service
        .clone()
        .map(|svc| service_job(&svc, &mut cfg, ov.home.as_deref(), cwd));
    let c = &cfg;
    let (gpus_per_node, gpus_from) = gpus_of(ov, c, step);
    let job = &step.job_id;
    let fill = |s: &str| s.replace("{job}", job).replace("{step}", &step.step_id);
    let step_suffix = if step.step_id == "0" {
        String::new()
    } else {
        format!("-step{}", step.step_id)
    };
    let mut endpoint_template = ov
        .endpoint_file
        .clone()
        .unwrap_or_else(|| c.endpoint_file.clone());
    if endpoint_template == config::default_endpoint_file() && !step_suffix.is_empty() {
        endpoint_template = format!("ray-launch-{{job}}/endpoint{step_suffix}.json");
    }
    let endpoint_file = absolute(&fill(&endpoint_template), cwd);
    let log_dir = absolute(&fill(ov.log_dir.as_deref().unwrap_or(&c.log_dir)), cwd);
    let event_log = ov
        .event_log
        .clone()
        .or_else(|| c.event_log.clone())
        .filter(|s| !s.is_empty())
        .map(|s| absolute(&fill(&s), cwd));
    let mut s = Settings {
        config: c.clone(),
        models: c.model_specs(),
        config_path: loaded.path.clone(),
        gpus_per_node,
        gpus_from,
        endpoint_file,
        event_log,
        log_dir,
        client,
        digest: String::new(),
        timeouts: Timeouts::of(c),
        health: Health::of(c),
        port_range: loaded.port_range,
        auth: c.security.auth != config::AuthSetting::Off,
        secret_env: c
            .env
            .keys()
            .chain(c.models.iter().flat_map(|m| m.env.keys()))
            .filter(|k| looks_secret(k) || c.secret_env.contains(k))
            .cloned()
            .collect(),
        step_suffix,
        policy: policy(c),
        batch: None,
        service,
    };
    s.batch = batch_job(c, ov, &s, &fill, cwd);
    if let (Some(b), true) = (&s.batch, s.client.is_empty()) {
        // the batch finishes its requests in flight within most of the client's grace
        s.client = b.argv(s.timeouts.shutdown_grace.mul_f64(0.75));
    }
    s.digest = digest(&s);
    s
}

/// GPUs per node: the flag, the config, or what the step and the machine say (and whence).
fn gpus_of(ov: &Overrides, c: &Config, step: &Step) -> (u32, Option<String>) {
    match (ov.gpus_per_node, c.gpus_per_node) {
        (Some(n), _) => (n, None),
        (None, Auto::Value(n)) => (n, None),
        (None, Auto::Auto) => match step.detected_gpus_from() {
            Some((n, from)) => (n, Some(from)),
            None => (
                0,
                Some(
                    "none found: no Slurm GPUs, no CUDA_VISIBLE_DEVICES, no GPU driver's list"
                        .into(),
                ),
            ),
        },
    }
}

impl Timeouts {
    fn of(c: &Config) -> Timeouts {
        Timeouts {
            rendezvous: c.timeouts.rendezvous.0,
            worker_join: c.timeouts.worker_join.0,
            engine_ready: c.timeouts.engine_ready.0,
            engine_ready_max: c.timeouts.engine_ready_max.0,
            shutdown_grace: c.timeouts.shutdown_grace.0,
            kill_wait: c.timeouts.kill_wait.0,
            teardown_budget: config::teardown_budget(c),
        }
    }
}

impl Health {
    fn of(c: &Config) -> Health {
        Health {
            interval: c.health.interval.0,
            failures: c.health.failures,
            heartbeat_interval: c.health.heartbeat_interval.0,
            heartbeat_timeout: c.health.heartbeat_timeout.0,
            stall_timeout: c.health.stall_timeout.0,
            first_token_timeout: c.health.first_token_timeout.0,
        }
    }
}

/// What every rank must agree on, hashed with the version (the Hello carries it).
fn digest(s: &Settings) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&s.agreed()).expect("serializes"));
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The batch of a job: the command line's `--batch`/`--output` over the config's `batch:`.
fn batch_job(
    c: &Config,
    ov: &Overrides,
    s: &Settings,
    fill: &dyn Fn(&str) -> String,
    cwd: &Path,
) -> Option<BatchJob> {
    let cfg = c.batch.clone();
    let (input, output) = match (&ov.batch, &cfg) {
        (Some((i, o)), _) => (i.clone(), o.clone()),
        (None, Some(b)) => (b.input.clone(), b.output.clone()),
        (None, None) => return None,
    };
    let models = s.model_names();
    Some(BatchJob {
        input: absolute(&fill(&input), cwd),
        output: absolute(&fill(&output), cwd),
        concurrency: cfg.as_ref().and_then(|b| match b.concurrency {
            Auto::Value(n) => Some(n),
            Auto::Auto => None,
        }),
        max_attempts: cfg.as_ref().map_or(3, |b| b.max_attempts),
        requeue: cfg.as_ref().is_some_and(|b| b.requeue),
        shard: cfg
            .as_ref()
            .map_or_else(|| "none".into(), |b| b.shard.clone()),
        request_timeout: cfg
            .as_ref()
            .map_or(Duration::from_secs(600), |b| b.request_timeout.0),
        progress_file: Path::new(&s.endpoint_file)
            .with_extension("batch.json")
            .display()
            .to_string(),
        models,
    })
}

impl Settings {
    /// The names a request's `model` may take: each model's name and served name, and the
    /// attached endpoints' names.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for m in &self.models {
            for n in [m.name.clone(), m.served().to_string()] {
                if !n.is_empty() && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names.extend(self.config.attach.iter().map(|a| a.name.clone()));
        names
    }

    /// What every rank of a step must agree on. The digest is taken over it; the master
    /// compares it key by key to say what differs when digests do not match.
    pub fn agreed(&self) -> serde_json::Value {
        serde_json::json!({
            "config": self.config,
            "gpus_per_node": self.gpus_per_node,
            "client": self.client,
        })
    }

    /// A short digest of each agreed leaf value, by dotted key (`config.parallel.tensor`):
    /// what the Hello carries, so the master names differing keys without seeing values.
    pub fn agreed_digests(&self) -> std::collections::BTreeMap<String, String> {
        fn walk(
            v: &serde_json::Value,
            key: String,
            out: &mut std::collections::BTreeMap<String, String>,
        ) {
            match v {
                serde_json::Value::Object(m) if !m.is_empty() => {
                    for (k, x) in m {
                        let p = if key.is_empty() {
                            k.clone()
                        } else {
                            format!("{key}.{k}")
                        };
                        walk(x, p, out);
                    }
                }
                _ => {
                    let d = Sha256::digest(serde_json::to_vec(v).expect("serializes"));
                    out.insert(key, d.iter().take(8).map(|b| format!("{b:02x}")).collect());
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk(&self.agreed(), String::new(), &mut out);
        out
    }
}
