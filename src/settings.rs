//! Validated, merged settings: command line > environment (clap reads the `RAY_LAUNCH_*`
//! fallbacks) > config file > defaults, resolved here once. Nothing downstream re-reads flags,
//! the environment or the YAML.

use crate::config::{Auto, Config, Loaded};
use crate::slurm::Step;
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub config_path: String,
    /// Resolved: `--gpus-per-node`, else the config's number, else Slurm's count, else 0.
    pub gpus_per_node: u32,
    /// Absolute, `{job}` filled in.
    pub endpoint_file: String,
    pub event_log: Option<String>,
    pub log_dir: String,
    /// The client command (after `--`); empty = serve until stopped.
    pub client: Vec<String>,
    /// Digest of everything that must be equal on every rank (ranks compare it at rendezvous).
    pub digest: String,
}

#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub gpus_per_node: Option<u32>,
    pub endpoint_file: Option<String>,
    pub event_log: Option<String>,
    pub log_dir: Option<String>,
}

fn absolute(p: &str, cwd: &Path) -> String {
    if Path::new(p).is_absolute() {
        p.to_string()
    } else {
        cwd.join(p).to_string_lossy().into_owned()
    }
}

pub fn resolve(
    loaded: &Loaded,
    ov: &Overrides,
    step: &Step,
    client: Vec<String>,
    cwd: &Path,
) -> Settings {
    let c = &loaded.config;
    let gpus_per_node = ov.gpus_per_node.unwrap_or(match c.gpus_per_node {
        Auto::Value(n) => n,
        Auto::Auto => step.detected_gpus().unwrap_or(0),
    });
    let job = &step.job_id;
    let fill = |s: &str| s.replace("{job}", job);
    let endpoint_file = absolute(
        &fill(ov.endpoint_file.as_deref().unwrap_or(&c.endpoint_file)),
        cwd,
    );
    let log_dir = absolute(&fill(ov.log_dir.as_deref().unwrap_or(&c.log_dir)), cwd);
    let event_log = ov
        .event_log
        .clone()
        .or_else(|| c.event_log.clone())
        .filter(|s| !s.is_empty())
        .map(|s| absolute(&fill(&s), cwd));
    let mut s = Settings {
        config: c.clone(),
        config_path: loaded.path.clone(),
        gpus_per_node,
        endpoint_file,
        event_log,
        log_dir,
        client,
        digest: String::new(),
    };
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&s.agreed()).expect("serializes"));
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    s.digest = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    s
}

impl Settings {
    /// What every rank of a step must agree on. The digest is taken over it; the master
    /// compares it key by key to say what differs when digests do not match.
    pub fn agreed(&self) -> serde_json::Value {
        serde_json::json!({
            "config": self.config,
            "gpus_per_node": self.gpus_per_node,
            "client": self.client,
        })
    }
}
