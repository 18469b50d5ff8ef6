//! The YAML config: schema, parsing and validation.
//!
//! Parsing is strict (unknown keys and wrong types are errors); `validate` then checks
//! values and relations. Every error names the key, the line, and the fix.
//! The schema is documented in README.md ("Config reference"); keep both in step.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Vllm,
    Sglang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VllmBackend {
    Ray,
    Mp,
}

/// `auto` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Auto<T> {
    #[default]
    Auto,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Auto<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Str(String),
            Val(T),
        }
        match Raw::<T>::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected `auto` or a non-negative whole number")
        })? {
            Raw::Str(s) if s == "auto" => Ok(Auto::Auto),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "expected `auto` or a non-negative whole number, found `{s}`"
            ))),
            Raw::Val(v) => Ok(Auto::Value(v)),
        }
    }
}

/// A duration written the humantime way: `30s`, `5m`, `1h 30m` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Str(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as `30s`, `5m` or `1h 30m`")
        })? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Str(s) => humantime::parse_duration(&s).map(Dur).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{} is not a duration ({e}); write it like `30s`, `5m` or `1h 30m`",
                    crate::error::quote(&s)
                ))
            }),
        }
        .and_then(|d| {
            if d.0 > MAX_DURATION {
                Err(serde::de::Error::custom(format!(
                    "{} is longer than ray-launch accepts ({}): durations are held to 30 days",
                    humantime::format_duration(d.0),
                    humantime::format_duration(MAX_DURATION)
                )))
            } else {
                Ok(d)
            }
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A size in bytes: `auto`, a number of bytes, or `64GiB` / `500M` (K, M, G, T are powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Size {
    #[default]
    Auto,
    Bytes(u64),
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Str(String),
        }
        let msg = "expected `auto`, a number of bytes, or a size such as `64GiB`";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(msg))? {
            Raw::Bytes(b) => Ok(Size::Bytes(b)),
            Raw::Str(s) if s == "auto" => Ok(Size::Auto),
            Raw::Str(s) => parse_size(&s).map(Size::Bytes).ok_or_else(|| {
                serde::de::Error::custom(format!("{msg}, found {}", crate::error::quote(&s)))
            }),
        }
    }
}

/// An environment variable value: YAML scalars are taken as their text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvValue(pub String);

impl<'de> Deserialize<'de> for EnvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_yaml::Value::deserialize(d)?;
        match v {
            serde_yaml::Value::String(s) => Ok(EnvValue(s)),
            serde_yaml::Value::Number(n) => Ok(EnvValue(n.to_string())),
            serde_yaml::Value::Bool(b) => Ok(EnvValue(b.to_string())),
            _ => Err(serde::de::Error::custom(
                "environment values must be text, numbers or true/false",
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Parallel {
    pub tensor: u32,
    #[serde(default = "one")]
    pub pipeline: u32,
    /// Data-parallel size of one replica (MoE models: DeepSeek, Qwen-MoE, Mixtral). vLLM:
    /// `--data-parallel-size`, data × tensor × pipeline GPUs per replica; SGLang: `--dp-size`
    /// with `--enable-dp-attention`, inside the tensor-parallel GPUs.
    #[serde(default = "one")]
    pub data: u32,
    /// Expert parallelism for MoE layers: vLLM `--enable-expert-parallel`, SGLang
    /// `--ep-size` = tensor size.
    #[serde(default)]
    pub expert: bool,
    /// Nodes one model instance spans. `auto`: tensor × pipeline ÷ GPUs per node, rounded up;
    /// all nodes of the step when there are no GPUs (CPU runs).
    #[serde(default)]
    pub nodes_per_replica: Auto<u32>,
    /// Replicas side by side on one node, each on its own slice of the node's GPUs. `auto`:
    /// as many as fit when one replica needs fewer GPUs than a node has (8 GPUs, tensor 2: 4).
    #[serde(default)]
    pub replicas_per_node: Auto<u32>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Vllm {
    pub backend: VllmBackend,
    pub executable: String,
}

impl Default for Vllm {
    fn default() -> Self {
        Vllm {
            backend: VllmBackend::Ray,
            executable: "vllm".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sglang {
    pub python: String,
}

impl Default for Sglang {
    fn default() -> Self {
        Sglang {
            python: "python3".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    pub host: String,
    /// `auto`: a port from the job's port block, so two jobs on one node never collide.
    pub port: Auto<u16>,
    /// Bring your own API key: a file (mode 0600) holding it, readable on every node. Unset:
    /// the key is derived from the job's key and written to `api_key_path` of the endpoint file.
    pub api_key_file: Option<String>,
    /// The host clients are given (endpoint file, `OPENAI_BASE_URL`), when the serving
    /// address is not what login nodes reach: a name or address, `{node}` for the node's
    /// name (`{node}.ext.cluster`). Unset: the node's address.
    pub advertise: Option<String>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            host: "0.0.0.0".into(),
            port: Auto::Auto,
            api_key_file: None,
            advertise: None,
        }
    }
}

/// `security.auth`: how ranks and master prove they belong to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthSetting {
    /// munge where it works, else the per-user secret (a local run needs neither).
    #[default]
    Auto,
    Munge,
    Secret,
    /// No authentication, no Ray token, no API key: only for a machine you do not share.
    Off,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    pub auth: AuthSetting,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Take addresses from this interface (e.g. `ib0`).
    pub interface: Option<String>,
    /// Or from the interface whose address is in this network (e.g. `10.10.0.0/16`).
    pub cidr: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ray {
    pub executable: String,
    /// GCS port; `auto` = from the job's port block.
    pub port: Auto<u16>,
    pub object_store_memory: Size,
    /// Node-local, job-, step- and node-scoped. Placeholders: `{job}`, `{step}`, `{node}`,
    /// `{node_rank}`. Created fresh (0700) by the launcher, or an existing 0700 directory of
    /// yours, of which only what the job created is removed.
    pub temp_dir: String,
    pub dashboard: bool,
    /// Start Ray's client server (needs `ray[client]`) on the job's port. When false and
    /// `ray[client]` is installed, Ray itself binds 10001 on the head.
    pub client_server: bool,
    pub extra_args: Vec<String>,
}

impl Default for Ray {
    fn default() -> Self {
        Ray {
            executable: "ray".into(),
            port: Auto::Auto,
            object_store_memory: Size::Auto,
            temp_dir: "/tmp/rl-{job}.{step}-{node_rank}".into(),
            dashboard: false,
            client_server: false,
            extra_args: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// Ports the job's block is taken from, `LOW-HIGH`. Keep it below the kernel's ephemeral
    /// range (`/proc/sys/net/ipv4/ip_local_port_range`, usually from 32768).
    pub range: String,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            range: "20000-32767".into(),
        }
    }
}

/// `batch:`: send an OpenAI batch file through the job's endpoint once every model is ready
/// (src/batch/); the job then ends like a client that exited 0.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The requests (JSON lines, OpenAI's batch format). Placeholder `{job}`.
    pub input: String,
    /// The answers; failures go to its `.errors` sibling. Placeholder `{job}`.
    pub output: String,
    /// Requests in flight: `auto` (from the engines' queue gauges) or a number.
    #[serde(default)]
    pub concurrency: Auto<u32>,
    /// Attempts of a request that fails in a retriable way (refused, 429, 5xx, timeout).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Stopped with work left (SIGUSR1): `scontrol requeue` the job, which resumes.
    #[serde(default)]
    pub requeue: bool,
    /// `none`, `auto` (a job array's task: SLURM_ARRAY_TASK_ID of the array), or `INDEX/COUNT`.
    #[serde(default = "default_shard")]
    pub shard: String,
    /// How long one request may take.
    #[serde(default = "default_batch_request_timeout")]
    pub request_timeout: Dur,
}

/// `service:`: this job is one of a chain that serves under one name, one key and one URL
/// (src/service/): it submits its successor before its time limit and hands over to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// The service's directory (default `~/.ray-launch/services/NAME`): on a file system every
    /// node and the login node share.
    #[serde(default)]
    pub dir: Option<String>,
    /// How long before the job's end its successor is submitted (and the handover begins).
    #[serde(default = "default_handover_before")]
    pub handover_before: Dur,
}

fn default_handover_before() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}

fn default_max_attempts() -> u32 {
    3
}
fn default_shard() -> String {
    "none".into()
}
fn default_batch_request_timeout() -> Dur {
    Dur(Duration::from_secs(600))
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Every rank has connected to the master.
    pub rendezvous: Dur,
    /// Every Ray worker has joined (or every engine rank has started).
    pub worker_join: Dur,
    /// The engine answers `/health` with 200; each new startup phase in its log (loading
    /// weights, compiling, capturing graphs) gives it this long again, up to `engine_ready_max`.
    pub engine_ready: Dur,
    /// The hard cap on an engine's start, however its phases move.
    pub engine_ready_max: Dur,
    /// How long each stage of teardown waits after SIGTERM before SIGKILL.
    pub shutdown_grace: Dur,
    /// Slurm's KillWait on this cluster: teardown must finish well inside it.
    pub kill_wait: Dur,
    /// Each `attach:` endpoint answers `GET /v1/models`, before anything starts.
    pub attach: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            rendezvous: Dur(Duration::from_secs(300)),
            worker_join: Dur(Duration::from_secs(180)),
            engine_ready: Dur(Duration::from_secs(1800)),
            engine_ready_max: Dur(Duration::from_secs(7200)),
            shutdown_grace: Dur(Duration::from_secs(10)),
            kill_wait: Dur(Duration::from_secs(30)),
            attach: Dur(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// How often the engine's `/health` is polled once ready.
    pub interval: Dur,
    /// Consecutive failed polls that count as an engine failure.
    pub failures: u32,
    /// How often ranks tell the master they are alive (and the master them).
    pub heartbeat_interval: Dur,
    /// Silence after which a rank (or the master) counts as lost.
    pub heartbeat_timeout: Dur,
    /// While the engine has requests running or waiting (its `/metrics`), its generated-token
    /// counter must advance within this long; else it counts as stalled (an engine failure).
    pub stall_timeout: Dur,
    /// Once `/health` answers, a one-token completion through the engine must come back
    /// within this long before the replica counts as ready (a replica that answers `/health`
    /// but hangs at its first request is a failed start).
    pub first_token_timeout: Dur,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            interval: Dur(Duration::from_secs(5)),
            failures: 3,
            heartbeat_interval: Dur(Duration::from_secs(1)),
            heartbeat_timeout: Dur(Duration::from_secs(4)),
            stall_timeout: Dur(Duration::from_secs(180)),
            first_token_timeout: Dur(Duration::from_secs(120)),
        }
    }
}

/// `on_node_failure`: what the job does when a node fails under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnNodeFailure {
    /// End (exit 4).
    #[default]
    Stop,
    /// End, and put the job back in the queue (`scontrol requeue`): for a lost node or a Ray
    /// or launcher death on another node, never for config or engine errors.
    Requeue,
}

/// `replicas.on_failure`: what a replica's failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Tear the replica down on all its nodes and start it again (with back-off, within the
    /// restart budget); the job goes on meanwhile.
    Restart,
    /// End the job (what one replica's failure always does when the job has one).
    Stop,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Replicas {
    /// Unset: `restart` when the job has more than one replica, `stop` when it has one.
    pub on_failure: Option<OnFailure>,
    /// Restarts of one replica allowed within `restart_window`; past that it stays down.
    pub max_restarts: u32,
    pub restart_window: Dur,
    /// Replicas that must serve for the job to go on (after it was ready once).
    pub min_healthy: u32,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas {
            on_failure: None,
            max_restarts: 3,
            restart_window: Dur(Duration::from_secs(1800)),
            min_healthy: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Router {
    /// Unset: a router when the job has more than one replica.
    pub enabled: Option<bool>,
    /// The largest request body the router accepts.
    pub max_body: Size,
    /// How long one request may take through the router, its streamed answer included.
    pub request_timeout: Dur,
    /// `prefix` (the replica that holds the prompt's longest prefix, within a load margin)
    /// or `least_outstanding`.
    pub policy: crate::route::policy::Policy,
    /// Another replica for a request that failed before the first byte of its answer, at
    /// most this often.
    pub retries: u32,
    /// What the prefix policy remembers, at most (`4MiB`).
    pub prefix_memory: Size,
    /// How many more requests in flight than the least loaded replica a prefix's replica may
    /// have and still get the request.
    pub prefix_margin: u32,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            enabled: None,
            max_body: Size::Bytes(32 << 20),
            request_timeout: Dur(Duration::from_secs(1800)),
            policy: crate::route::policy::Policy::Prefix,
            retries: 2,
            prefix_memory: Size::Bytes(4 << 20),
            prefix_margin: 4,
        }
    }
}

/// `models[].nodes`: how many of the step's nodes an entry gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum NodeShare {
    /// What the other entries leave (at most one entry says so).
    #[default]
    Rest,
    Count(u32),
}

impl<'de> Deserialize<'de> for NodeShare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Str(String),
            Val(u32),
        }
        let msg = "expected a node count or `rest`";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(msg))? {
            Raw::Str(s) if s == "rest" => Ok(NodeShare::Rest),
            Raw::Str(s) => Err(serde::de::Error::custom(format!("{msg}, found `{s}`"))),
            Raw::Val(v) => Ok(NodeShare::Count(v)),
        }
    }
}

/// One entry of `models:`: a model served on its own nodes, split into replicas like the
/// single top-level model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Clients may ask for it by this name (or its served name); `RAY_LAUNCH_MODEL_<NAME>_URL`.
    pub name: String,
    /// Unset: the top-level `engine`.
    #[serde(default)]
    pub engine: Option<Engine>,
    pub model: String,
    #[serde(default)]
    pub served_model_name: Option<String>,
    pub parallel: Parallel,
    #[serde(default)]
    pub engine_args: Vec<String>,
    /// On top of the top-level `env`, for this model's processes.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    /// How many of the step's nodes it gets, in step order after the entries before it.
    #[serde(default)]
    pub nodes: NodeShare,
    /// `false`: when all its replicas are down the model is dropped and the job goes on.
    #[serde(default = "yes")]
    pub required: bool,
    /// Unset: `replicas.min_healthy`, at most this model's replica count.
    #[serde(default)]
    pub min_healthy: Option<u32>,
}

fn yes() -> bool {
    true
}

/// One entry of `attach:`: an OpenAI-compatible server that already runs elsewhere.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Attach {
    pub name: String,
    /// Its OpenAI base URL, `http://HOST:PORT/v1`.
    pub url: String,
    /// A 0600 file holding its API key (sent to it alone, never the job's own key).
    #[serde(default)]
    pub api_key_file: Option<String>,
}

/// A model the job serves, resolved: the top-level one, or one entry of `models:`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The entry's name; for the top-level model its served name.
    pub name: String,
    /// Whether it came from `models:` (the router then routes by name).
    pub named: bool,
    pub engine: Engine,
    pub model: String,
    pub served_model_name: Option<String>,
    pub parallel: Parallel,
    pub engine_args: Vec<String>,
    /// The top-level `env`, then the entry's.
    pub env: BTreeMap<String, EnvValue>,
    pub nodes: NodeShare,
    pub required: bool,
    pub min_healthy: Option<u32>,
}

impl ModelSpec {
    /// GPUs (engine ranks) one replica runs: data × tensor × pipeline for vLLM; tensor ×
    /// pipeline for SGLang, whose data-parallel attention runs inside the tensor GPUs.
    pub fn world(&self) -> usize {
        let p = &self.parallel;
        let data = match self.engine {
            Engine::Vllm => p.data as usize,
            Engine::Sglang => 1,
        };
        data * p.tensor as usize * p.pipeline as usize
    }

    /// `tensor T x pipeline P` (with `data D x ` in front for vLLM data parallelism): how
    /// messages name a replica's shape.
    pub fn shape(&self) -> String {
        let p = &self.parallel;
        let tp = format!("tensor {} x pipeline {}", p.tensor, p.pipeline);
        if self.engine == Engine::Vllm && p.data > 1 {
            format!("data {} x {tp}", p.data)
        } else {
            tp
        }
    }

    /// What clients put in `model`: `served_model_name`, else the model path.
    pub fn served(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.model)
    }
}

/// The variable that gives client code one model's own URL: `RAY_LAUNCH_MODEL_<NAME>_URL`,
/// the name upper-cased with `-` and `.` as `_`.
pub fn model_url_var(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("RAY_LAUNCH_MODEL_{n}_URL")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The single model's engine (or, with `models:`, the default of each entry).
    #[serde(default)]
    pub engine: Option<Engine>,
    /// The single model; with `models:` unset.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub served_model_name: Option<String>,
    #[serde(default)]
    pub parallel: Option<Parallel>,
    /// Several models in one job, each on its own nodes (instead of `model`).
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Servers that already run, behind the same router (never started or stopped).
    #[serde(default)]
    pub attach: Vec<Attach>,
    /// `auto`: `SLURM_GPUS_ON_NODE`, then `CUDA_VISIBLE_DEVICES`, else 0.
    #[serde(default)]
    pub gpus_per_node: Auto<u32>,
    #[serde(default)]
    pub vllm: Vllm,
    #[serde(default)]
    pub sglang: Sglang,
    #[serde(default)]
    pub server: Server,
    /// Extra arguments appended to the engine's command line.
    #[serde(default)]
    pub engine_args: Vec<String>,
    /// Set for every process on every node (Ray's workers inherit it from `ray start`).
    /// Values may use {job}, {node}, {node_rank}, {replica}, {replica_rank}.
    #[serde(default)]
    pub env: BTreeMap<String, EnvValue>,
    /// Names in `env` whose values are secret (masked wherever ray-launch prints them), on top
    /// of those that look secret (containing TOKEN, KEY, SECRET, PASSWORD, CREDENTIAL).
    #[serde(default)]
    pub secret_env: Vec<String>,
    #[serde(default)]
    pub security: Security,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub ray: Ray,
    #[serde(default)]
    pub ports: Ports,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub replicas: Replicas,
    #[serde(default)]
    pub router: Router,
    /// A batch to run through the endpoint (instead of serving until stopped).
    #[serde(default)]
    pub batch: Option<Batch>,
    /// A chain of jobs serving one model for days (instead of one job).
    #[serde(default)]
    pub service: Option<Service>,
    #[serde(default)]
    pub on_node_failure: OnNodeFailure,
    /// Per-node process logs. Placeholders `{job}`; relative paths are from the working directory.
    #[serde(default = "default_log_dir")]
    pub log_dir: String,
    /// Written atomically when the endpoint is ready. Placeholder `{job}`.
    #[serde(default = "default_endpoint_file")]
    pub endpoint_file: String,
    /// JSON-lines event log (master writes it). Placeholder `{job}`. Empty = none.
    #[serde(default)]
    pub event_log: Option<String>,
}

fn default_log_dir() -> String {
    "ray-launch-{job}".into()
}
pub fn default_endpoint_file() -> String {
    "ray-launch-{job}/endpoint.json".into()
}

/// Flags the launcher sets itself; in `engine_args` they would fight the plan.
const OWNED_ENGINE_FLAGS: &[(&str, &str)] = &[
    ("--tensor-parallel-size", "parallel.tensor"),
    ("-tp", "parallel.tensor"),
    ("--tp-size", "parallel.tensor"),
    ("--tp", "parallel.tensor"),
    ("--pipeline-parallel-size", "parallel.pipeline"),
    ("-pp", "parallel.pipeline"),
    ("--pp-size", "parallel.pipeline"),
    ("--distributed-executor-backend", "vllm.backend"),
    ("--host", "server.host"),
    ("--port", "server.port"),
    ("--nnodes", "the step's node count"),
    ("--node-rank", "the node's rank in the step"),
    ("--master-addr", "the elected master"),
    ("--master-port", "the job's port block"),
    ("--dist-init-addr", "the elected master"),
    ("--headless", "the node's role"),
    ("--served-model-name", "served_model_name"),
    ("--data-parallel-size", "parallel.data"),
    ("-dp", "parallel.data"),
    (
        "--data-parallel-rank",
        "parallel.data (ranks follow the node's rank)",
    ),
    ("-dpn", "parallel.data (ranks follow the node's rank)"),
    (
        "--data-parallel-start-rank",
        "parallel.data (ranks follow the node's rank)",
    ),
    ("-dpr", "parallel.data (ranks follow the node's rank)"),
    (
        "--data-parallel-size-local",
        "parallel.data (split over the replica's nodes)",
    ),
    ("-dpl", "parallel.data (split over the replica's nodes)"),
    ("--data-parallel-address", "the elected master"),
    ("-dpa", "the elected master"),
    ("--data-parallel-rpc-port", "the job's port block"),
    ("-dpp", "the job's port block"),
    ("--data-parallel-backend", "vllm.backend"),
    ("-dpb", "vllm.backend"),
    ("--dp-size", "parallel.data"),
    ("--dp", "parallel.data"),
    ("--enable-dp-attention", "parallel.data"),
    ("--enable-expert-parallel", "parallel.expert"),
    ("-ep", "parallel.expert"),
    ("--ep-size", "parallel.expert"),
    ("--ep", "parallel.expert"),
    ("--model-path", "model"),
    ("--model", "model"),
];

const OWNED_RAY_FLAGS: &[&str] = &[
    "--head",
    "--address",
    "--port",
    "--node-ip-address",
    "--num-gpus",
    "--num-cpus",
    "--temp-dir",
    "--object-store-memory",
    "--block",
    "--include-dashboard",
    "--node-manager-port",
    "--object-manager-port",
    "--min-worker-port",
    "--max-worker-port",
    "--ray-client-server-port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
];

/// Where a key path (`["parallel", "tensor"]`) sits in the YAML text: 1-based line.
/// Good enough for block-style YAML, which is what configs are; `None` when not found.
pub fn locate(src: &str, path: &[&str]) -> Option<usize> {
    let mut depth_indent: Vec<usize> = Vec::new();
    let mut want = 0;
    for (i, line) in src.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        while let Some(&d) = depth_indent.last() {
            if indent <= d {
                depth_indent.pop();
                want -= 1;
            } else {
                break;
            }
        }
        if want < path.len() && depth_indent.len() == want {
            let key = path[want];
            let matches = trimmed
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'));
            if matches {
                if want + 1 == path.len() {
                    return Some(i + 1);
                }
                depth_indent.push(indent);
                want += 1;
            }
        }
    }
    None
}

pub struct Loaded {
    pub config: Config,
    pub path: String,
    pub source: String,
    /// `ports.range`, parsed once by validation.
    pub port_range: (u16, u16),
}

impl Loaded {
    /// A validation error for `key` (dotted), with its line.
    pub fn key_error(
        &self,
        key: &str,
        problem: impl std::fmt::Display,
        fix: impl Into<String>,
    ) -> Error {
        let parts: Vec<&str> = key.split('.').collect();
        let at = match locate(&self.source, &parts) {
            Some(line) => format!("{}:{line}", self.path),
            None => self.path.clone(),
        };
        Error::usage(format!("{at}: `{key}` {problem}")).hint(fix)
    }
}

/// The largest config file read (configs are a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The deepest nesting a config may have (the schema needs 4).
pub const MAX_NESTING: usize = 32;

/// Read the config: a regular file (not a FIFO, a device or a directory: opened without
/// blocking, checked before reading), at most [`MAX_CONFIG_BYTES`].
pub fn load(path: &Path) -> Result<Loaded> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = path.display().to_string();
    let unreadable = |e: std::io::Error| {
        Error::usage(format!("cannot read config {shown}"))
            .cause(e)
            .hint("pass an existing YAML file with --config (or RAY_LAUNCH_CONFIG); examples are in configs/")
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(unreadable)?;
    let md = f.metadata().map_err(unreadable)?;
    if !md.is_file() {
        return Err(Error::usage(format!(
            "config {shown} is not a regular file (a pipe, a device or a directory)"
        ))
        .hint("pass a YAML file with --config; examples are in configs/"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::usage(format!(
            "config {shown} is larger than {} KiB",
            MAX_CONFIG_BYTES >> 10
        ))
        .hint("a config is a few KiB of YAML; is this the right file?"));
    }
    let source = String::from_utf8(bytes).map_err(|_| {
        Error::usage(format!("config {shown} is not UTF-8 text"))
            .hint("pass a YAML file with --config; examples are in configs/")
    })?;
    parse(&shown, &source)
}

/// How deep `source` nests (flow `[`/`{`, and `- ` chains on a line), and the first line that
/// goes past [`MAX_NESTING`]. Counted before the YAML parser sees it (100,000 levels would
/// take it minutes).
fn too_deep(source: &str) -> Option<usize> {
    let mut flow = 0usize;
    for (n, line) in source.lines().enumerate() {
        let t = line.trim_start();
        let mut dashes = 0;
        let mut rest = t;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
            dashes += 1;
            rest = r.trim_start();
        }
        let (mut quote, mut prev) = (None, ' ');
        for c in rest.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => {
                    flow += 1;
                    if flow + dashes > MAX_NESTING {
                        return Some(n + 1);
                    }
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        if flow + dashes > MAX_NESTING {
            return Some(n + 1);
        }
    }
    None
}

/// Duplicate keys in any mapping (serde takes the last one for maps such as `env:`): the
/// first one, and its line.
fn duplicate_key(path: &str, source: &str) -> Result<()> {
    match serde_yaml::from_str::<serde_yaml::Value>(source) {
        Err(e) if e.to_string().contains("duplicate") => Err(yaml_error(path, &e)),
        _ => Ok(()),
    }
}

pub fn parse(path: &str, source: &str) -> Result<Loaded> {
    if let Some(line) = too_deep(source) {
        return Err(Error::usage(format!(
            "{path}:{line}: the YAML nests deeper than {MAX_NESTING} levels"
        ))
        .hint("a config nests a few levels; see configs/ for the shape"));
    }
    duplicate_key(path, source)?;
    let config: Config = serde_yaml::from_str(source).map_err(|e| yaml_error(path, &e))?;
    let mut loaded = Loaded {
        config,
        path: path.to_string(),
        source: source.to_string(),
        port_range: (0, 0),
    };
    loaded.port_range = validate(&loaded)?;
    Ok(loaded)
}

fn yaml_error(path: &str, e: &serde_yaml::Error) -> Error {
    let text = e.to_string();
    // serde_yaml puts " at line L column C" at the end; move the location to the front.
    let (msg, at) = match (text.rfind(" at line "), e.location()) {
        (Some(i), Some(loc)) => (text[..i].to_string(), format!("{path}:{}", loc.line())),
        (_, Some(loc)) => (text.clone(), format!("{path}:{}", loc.line())),
        _ => (text.clone(), path.to_string()),
    };
    let hint = if msg.contains("unknown field") {
        "remove or correct that key; README.md (\"Config reference\") lists every key"
    } else if msg.contains("missing field") {
        "the minimal config needs `engine`, `model` and `parallel.tensor`; see configs/"
    } else if msg.contains("unknown variant") {
        "use one of the values the message lists"
    } else {
        "fix the value or the YAML syntax at that line; README.md (\"Config reference\") shows each key's type"
    };
    Error::usage(format!("{at}: {msg}")).hint(hint)
}

/// Check values and relations; the parsed port range on success.
fn validate(l: &Loaded) -> Result<(u16, u16)> {
    let c = &l.config;
    validate_models(l)?;
    validate_server(l)?;
    let range = port_range(&c.ports.range).map_err(|why| {
        l.key_error("ports.range", format!("`{}` {why}", c.ports.range), "write it as `LOW-HIGH` with 1024 <= LOW and HIGH <= 65535, at least 256 ports, e.g. `20000-32767`")
    })?;
    validate_network(l)?;
    validate_timeouts(l)?;
    validate_ray(l)?;
    validate_batch(l)?;
    validate_service(l)?;
    Ok(range)
}

/// The `service:` section.
fn validate_service(l: &Loaded) -> Result<()> {
    let c = &l.config;
    let Some(svc) = &c.service else {
        return Ok(());
    };
    crate::service::check_name(&svc.name)
        .map_err(|why| l.key_error("service.name", why, "e.g. `service: {name: llama-70b}`"))?;
    if svc
        .dir
        .as_deref()
        .is_some_and(|d| d.trim().is_empty() || d.contains('\0'))
    {
        return Err(l.key_error(
            "service.dir",
            "is not a path",
            "give a directory on the shared home, or leave it out (~/.ray-launch/services/NAME)",
        ));
    }
    if svc.handover_before.0.is_zero() {
        return Err(l.key_error(
            "service.handover_before",
            "must be longer than zero",
            "give the successor time to queue and start, e.g. `30m`",
        ));
    }
    if c.server.api_key_file.is_some() {
        return Err(l.key_error(
            "server.api_key_file",
            "is set with `service`: every job of a service uses the service's own key",
            "remove `server.api_key_file` (the key is the service directory's `key`)",
        ));
    }
    if c.security.auth == AuthSetting::Off {
        return Err(l.key_error(
            "service",
            "needs `security.auth` on: the service key guards the chain's URL",
            "remove `security.auth: off`",
        ));
    }
    if c.batch.is_some() {
        return Err(l.key_error(
            "service",
            "and `batch` are both set: a batch ends when its input is done, a service serves on",
            "remove one of the two",
        ));
    }
    Ok(())
}

/// The `batch:` section.
fn validate_batch(l: &Loaded) -> Result<()> {
    let Some(b) = &l.config.batch else {
        return Ok(());
    };
    if b.input.trim().is_empty() || b.output.trim().is_empty() {
        return Err(l.key_error(
            "batch",
            "needs both `input` and `output`",
            "e.g. `batch: {input: prompts.jsonl, output: answers.jsonl}`",
        ));
    }
    if b.max_attempts == 0 || b.max_attempts > 100 {
        return Err(l.key_error(
            "batch.max_attempts",
            format!("{} is not between 1 and 100", b.max_attempts),
            "3 is a good start",
        ));
    }
    if matches!(b.concurrency, Auto::Value(0)) {
        return Err(l.key_error(
            "batch.concurrency",
            "0 would send nothing",
            "write `auto` or a number of requests in flight, e.g. 64",
        ));
    }
    if b.request_timeout.0.is_zero() {
        return Err(l.key_error(
            "batch.request_timeout",
            "must be longer than zero",
            "write it like `10m`",
        ));
    }
    if !matches!(b.shard.as_str(), "none" | "auto") {
        crate::batch::input::Shard::parse(&b.shard).map_err(|why| {
            l.key_error(
                "batch.shard",
                why,
                "write `none`, `auto` (a job array's task) or INDEX/COUNT like `0/4`",
            )
        })?;
    }
    Ok(())
}

/// The server, replica and router keys.
fn validate_server(l: &Loaded) -> Result<()> {
    let c = &l.config;
    if c.server.port == Auto::Value(0) {
        return Err(l.key_error(
            "server.port",
            "must be 1-65535",
            "use `auto` (a port from the job's block) or a port number",
        ));
    }
    if c.ray.port == Auto::Value(0) {
        return Err(l.key_error("ray.port", "must be 1-65535", "use `auto` or a port number"));
    }
    if c.server.host.parse::<IpAddr>().is_err() {
        return Err(l.key_error(
            "server.host",
            format!("`{}` is not an IP address", c.server.host),
            "use `0.0.0.0` (all interfaces) or an address such as `127.0.0.1`",
        ));
    }
    if c.replicas.min_healthy == 0 {
        return Err(l.key_error(
            "replicas.min_healthy",
            "must be at least 1",
            "the job ends when fewer replicas serve than this; use 1 to go on while any serves",
        ));
    }
    if c.router.max_body == Size::Bytes(0) {
        return Err(l.key_error(
            "router.max_body",
            "must be more than 0 bytes",
            "use `auto` (32MiB) or a size such as `64MiB`",
        ));
    }
    Ok(())
}

/// The network keys, secret names and the advertised host.
fn validate_network(l: &Loaded) -> Result<()> {
    let c = &l.config;
    if c.network.interface.is_some() && c.network.cidr.is_some() {
        return Err(l.key_error(
            "network.cidr",
            "is set together with `network.interface`",
            "keep one of the two",
        ));
    }
    if let Some(cidr) = &c.network.cidr {
        if cidr.parse::<ipnet::IpNet>().is_err() {
            return Err(l.key_error(
                "network.cidr",
                format!("`{cidr}` is not a network"),
                "write it like `10.10.0.0/16`",
            ));
        }
    }
    if c.network
        .interface
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.contains('/'))
    {
        return Err(l.key_error(
            "network.interface",
            "is not an interface name",
            "use a name from `ip -br addr`, e.g. `ib0`",
        ));
    }
    validate_env(&c.env, &|p, f| l.key_error("env", p, f))?;
    for name in &c.secret_env {
        if !c.env.contains_key(name) && !c.models.iter().any(|m| m.env.contains_key(name)) {
            return Err(l.key_error(
                "secret_env",
                format!("names `{name}`, which is not in `env`"),
                "list only names that `env:` sets",
            ));
        }
    }
    if let Some(a) = &c.server.advertise {
        let host = a.replace("{node}", "node");
        let ok = !host.is_empty()
            && check_placeholders_in(a, &["node"]).is_ok()
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-.".contains(ch)));
        if !ok {
            return Err(l.key_error(
                "server.advertise",
                format!("`{a}` is not a host name or address"),
                "give a name or address clients reach, `{node}` standing for the node's name, e.g. `{node}.ext.cluster`",
            ));
        }
    }
    if let Some(f) = &c.server.api_key_file {
        if f.trim().is_empty() || f.contains('\0') {
            return Err(l.key_error(
                "server.api_key_file",
                "is not a path",
                "give the path of a 0600 file holding the key",
            ));
        }
        if c.security.auth == AuthSetting::Off {
            return Err(l.key_error(
                "server.api_key_file",
                "is set while `security.auth` is off",
                "remove one of the two: with auth off the engine runs without a key",
            ));
        }
    }
    for (key, v) in c
        .ray
        .extra_args
        .iter()
        .map(|v| ("ray.extra_args", v))
        .chain([
            ("vllm.executable", &c.vllm.executable),
            ("sglang.python", &c.sglang.python),
            ("ray.executable", &c.ray.executable),
            ("ray.temp_dir", &c.ray.temp_dir),
            ("log_dir", &c.log_dir),
            ("endpoint_file", &c.endpoint_file),
        ])
        .chain(c.event_log.iter().map(|v| ("event_log", v)))
    {
        if v.contains('\0') {
            return Err(l.key_error(
                key,
                "contains a NUL byte, which no command line or path can hold",
                "remove it",
            ));
        }
    }
    Ok(())
}

/// Durations, health and the teardown budget against KillWait.
fn validate_timeouts(l: &Loaded) -> Result<()> {
    let c = &l.config;
    for (key, durv) in [
        ("timeouts.rendezvous", c.timeouts.rendezvous),
        ("timeouts.worker_join", c.timeouts.worker_join),
        ("timeouts.engine_ready", c.timeouts.engine_ready),
        ("timeouts.engine_ready_max", c.timeouts.engine_ready_max),
        ("timeouts.shutdown_grace", c.timeouts.shutdown_grace),
        ("timeouts.kill_wait", c.timeouts.kill_wait),
        ("timeouts.attach", c.timeouts.attach),
        ("health.interval", c.health.interval),
        ("health.heartbeat_interval", c.health.heartbeat_interval),
        ("health.heartbeat_timeout", c.health.heartbeat_timeout),
        ("health.stall_timeout", c.health.stall_timeout),
        ("health.first_token_timeout", c.health.first_token_timeout),
    ] {
        if durv.0.is_zero() {
            return Err(l.key_error(
                key,
                "must be longer than zero",
                "write it like `30s` or `5m`",
            ));
        }
        if durv.0 > MAX_DURATION {
            return Err(l.key_error(
                key,
                format!(
                    "({}) is longer than ray-launch accepts ({})",
                    humantime::format_duration(durv.0),
                    humantime::format_duration(MAX_DURATION)
                ),
                "no Slurm job runs that long: write it like `30s`, `5m` or `2h`",
            ));
        }
    }
    if c.timeouts.engine_ready_max.0 < c.timeouts.engine_ready.0 {
        return Err(l.key_error(
            "timeouts.engine_ready_max",
            format!(
                "({}) is shorter than `timeouts.engine_ready` ({})",
                humantime::format_duration(c.timeouts.engine_ready_max.0),
                humantime::format_duration(c.timeouts.engine_ready.0)
            ),
            "the cap must be at least the deadline it caps: raise it or lower engine_ready",
        ));
    }
    if c.health.failures == 0 {
        return Err(l.key_error(
            "health.failures",
            "must be at least 1",
            "e.g. `failures: 3`",
        ));
    }
    if c.health.heartbeat_timeout.0 < c.health.heartbeat_interval.0 * 2 {
        return Err(l.key_error(
            "health.heartbeat_timeout",
            format!(
                "({}) must be at least twice `health.heartbeat_interval` ({})",
                humantime::format_duration(c.health.heartbeat_timeout.0),
                humantime::format_duration(c.health.heartbeat_interval.0)
            ),
            "raise the timeout or shorten the interval",
        ));
    }
    let budget = teardown_budget(c);
    if budget >= c.timeouts.kill_wait.0 {
        return Err(l.key_error(
            "timeouts.shutdown_grace",
            format!(
                "({}) makes teardown take up to {} (engine, then Ray, plus 1s), which does not fit in `timeouts.kill_wait` ({})",
                humantime::format_duration(c.timeouts.shutdown_grace.0),
                humantime::format_duration(budget),
                humantime::format_duration(c.timeouts.kill_wait.0)
            ),
            "shorten shutdown_grace, or set kill_wait to your cluster's KillWait (`scontrol show config | grep KillWait`)",
        ));
    }
    Ok(())
}

/// Ray's flags and executables, the temp dir, placeholders.
fn validate_ray(l: &Loaded) -> Result<()> {
    let c = &l.config;
    for a in &c.ray.extra_args {
        let flag = a.split('=').next().unwrap_or(a);
        if OWNED_RAY_FLAGS.contains(&flag) {
            return Err(l.key_error(
                "ray.extra_args",
                format!("contains `{flag}`, which ray-launch sets from the plan"),
                format!(
                    "remove `{flag}`; the README's config reference says which key controls it"
                ),
            ));
        }
    }
    for (key, exe) in [
        ("vllm.executable", &c.vllm.executable),
        ("sglang.python", &c.sglang.python),
        ("ray.executable", &c.ray.executable),
    ] {
        if exe.trim().is_empty() {
            return Err(l.key_error(key, "is empty", "give a program name on PATH or a path"));
        }
    }
    if !c.ray.temp_dir.starts_with('/') {
        return Err(l.key_error(
            "ray.temp_dir",
            "must be an absolute path",
            "use a node-local path such as `/tmp/rl-{job}.{step}-{node_rank}`",
        ));
    }
    let parts = c
        .ray
        .temp_dir
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .count();
    if parts < 2 || c.ray.temp_dir.split('/').any(|p| p == "..") {
        return Err(l.key_error(
            "ray.temp_dir",
            format!("`{}` is a shared directory, not one for this job", c.ray.temp_dir),
            "give a directory of its own, such as `/tmp/rl-{job}.{step}-{node_rank}`; ray-launch creates it (0700) and removes only what the job put there",
        ));
    }
    for (key, v) in [
        ("ray.temp_dir", &c.ray.temp_dir),
        ("log_dir", &c.log_dir),
        ("endpoint_file", &c.endpoint_file),
    ] {
        if let Err(bad) = check_placeholders(v) {
            return Err(l.key_error(
                key,
                format!("has an unknown placeholder `{bad}`"),
                "placeholders are {job}, {step}, {node} and {node_rank}",
            ));
        }
    }
    Ok(())
}

type KeyErr<'a> = &'a dyn Fn(&str, String, String) -> Error;

/// The `attach:` entries: names unique among the models', plain http base URLs without
/// credentials, key files that are paths.
fn validate_attach(l: &Loaded, names: &mut Vec<(String, String)>) -> Result<()> {
    let c = &l.config;
    for (i, a) in c.attach.iter().enumerate() {
        let err = |key: &str, problem: String, fix: String| {
            entry_error(l, "attach", i, &a.name, key, problem, fix)
        };
        check_name(&a.name, names, &err)?;
        let fix = "write it as `http://HOST:PORT/v1`, the base URL OpenAI clients use".to_string();
        match reqwest::Url::parse(&a.url) {
            Err(e) => return Err(err("url", format!("`{}` is not a URL ({e})", a.url), fix)),
            Ok(u) if u.scheme() != "http" => {
                return Err(err(
                    "url",
                    format!("`{}` is not plain http", a.url),
                    "the router speaks plain HTTP to what it attaches: give an `http://` URL (an HTTPS service needs a local proxy)".into(),
                ))
            }
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                return Err(err(
                    "url",
                    "holds a user name or password, which would show in logs and the endpoint file".into(),
                    "remove it from the URL and put the key in `api_key_file` (a 0600 file)".into(),
                ))
            }
            Ok(u) if u.host_str().is_none() || u.query().is_some() || !u.path().trim_end_matches('/').ends_with("/v1") => {
                return Err(err("url", format!("`{}` is not an OpenAI base URL (a host, a path ending in `/v1`, no query)", a.url), fix))
            }
            Ok(_) => {}
        }
        if let Some(f) = &a.api_key_file {
            if f.trim().is_empty() || f.contains('\0') {
                return Err(err(
                    "api_key_file",
                    "is not a path".into(),
                    "give the path of a 0600 file holding its key".into(),
                ));
            }
        }
    }
    Ok(())
}

/// The model keys: the single top-level model, or `models:` (and `attach:`).
fn validate_models(l: &Loaded) -> Result<()> {
    let c = &l.config;
    if c.models.is_empty() {
        let missing = |key: &str| {
            l.key_error(
                key,
                "is missing",
                format!("set `{key}:` for the model the job serves, or list several under `models:`; see configs/"),
            )
        };
        if c.engine.is_none() {
            return Err(missing("engine"));
        }
        if c.model.is_none() {
            return Err(missing("model"));
        }
        if c.parallel.is_none() {
            return Err(missing("parallel"));
        }
    } else {
        for key in ["model", "served_model_name", "parallel", "engine_args"] {
            let set = match key {
                "model" => c.model.is_some(),
                "served_model_name" => c.served_model_name.is_some(),
                "parallel" => c.parallel.is_some(),
                _ => !c.engine_args.is_empty(),
            };
            if set {
                return Err(l.key_error(
                    key,
                    "is set together with `models:`",
                    format!("move `{key}` into each entry of `models:` (the top-level `engine` and `env` are defaults for every entry)"),
                ));
            }
        }
    }
    let mut names: Vec<(String, String)> = Vec::new();
    let mut rest = None;
    for (i, m) in c.models.iter().enumerate() {
        let err = |key: &str, problem: String, fix: String| {
            entry_error(l, "models", i, &m.name, key, problem, fix)
        };
        check_name(&m.name, &mut names, &err)?;
        if m.engine.or(c.engine).is_none() {
            return Err(err(
                "engine",
                "is missing".into(),
                "set `engine: vllm` or `engine: sglang` in the entry (or once at the top)".into(),
            ));
        }
        match m.nodes {
            NodeShare::Count(0) => {
                return Err(err(
                    "nodes",
                    "must be at least 1".into(),
                    "give a node count, or `rest`".into(),
                ))
            }
            NodeShare::Rest => {
                if let Some(other) = rest.replace(m.name.clone()) {
                    return Err(err(
                        "nodes",
                        format!("is `rest` (or unset), and so is model `{other}`'s"),
                        "give every entry but one a node count (`nodes: 2`)".into(),
                    ));
                }
            }
            NodeShare::Count(_) => {}
        }
        if m.min_healthy == Some(0) {
            return Err(err(
                "min_healthy",
                "must be at least 1".into(),
                "use 1 to go on while any replica of it serves".into(),
            ));
        }
        validate_env(&m.env, &|p, f| err("env", p, f))?;
    }
    validate_attach(l, &mut names)?;
    if c.serves_several() && c.router.enabled == Some(false) {
        return Err(l.key_error(
            "router.enabled",
            "is false, but the job serves several models (or attaches endpoints)",
            "remove `router.enabled: false`: one URL over several models needs the router",
        ));
    }
    for m in &c.model_specs() {
        let err: KeyErr = &|key: &str, problem: String, fix: String| match c
            .models
            .iter()
            .position(|e| e.name == m.name)
        {
            Some(i) if m.named => entry_error(l, "models", i, &m.name, key, problem, fix),
            _ => l.key_error(key, problem, fix),
        };
        validate_model(m, err)?;
    }
    Ok(())
}

/// An entry's name: letters, digits, `-`, `_` and `.`, unique in the job, also once made
/// into a variable name (`RAY_LAUNCH_MODEL_<NAME>_URL`).
fn check_name(name: &str, seen: &mut Vec<(String, String)>, err: KeyErr) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if !valid {
        return Err(err(
            "name",
            format!("`{name}` is not a name ray-launch takes"),
            "use letters, digits, `-`, `_` and `.` (at most 64, starting with a letter or digit), e.g. `policy`".into(),
        ));
    }
    let var = model_url_var(name);
    if let Some((other, _)) = seen.iter().find(|(n, v)| n == name || *v == var) {
        return Err(err(
            "name",
            format!("`{name}` is taken: `{other}` has the same name (or the same {var})"),
            "give every model and attached endpoint its own name".into(),
        ));
    }
    seen.push((name.to_string(), var));
    Ok(())
}

/// An error in entry `i` of the list `list` (`models` or `attach`), at its line.
fn entry_error(
    l: &Loaded,
    list: &str,
    i: usize,
    name: &str,
    key: &str,
    problem: String,
    fix: String,
) -> Error {
    let line = l.source.lines().position(|t| {
        let t = t.trim_start().trim_start_matches("- ").trim();
        t.strip_prefix("name:")
            .is_some_and(|v| v.trim().trim_matches(['"', '\'']) == name)
    });
    let at = match line {
        Some(n) => format!("{}:{}", l.path, n + 1),
        None => l.path.clone(),
    };
    Error::usage(format!("{at}: `{list}[{i}]` ({name}): `{key}` {problem}")).hint(fix)
}

/// One model's values.
fn validate_model(m: &ModelSpec, err: KeyErr) -> Result<()> {
    if m.model.trim().is_empty() {
        return Err(err(
            "model",
            "is empty".into(),
            "set `model:` to a model path or hub id".into(),
        ));
    }
    if m.served_model_name
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(err(
            "served_model_name",
            "is empty".into(),
            "remove the key or give a name".into(),
        ));
    }
    let p = &m.parallel;
    if p.tensor == 0 {
        return Err(err(
            "parallel.tensor",
            "must be at least 1".into(),
            "set the tensor-parallel size, e.g. `tensor: 8`".into(),
        ));
    }
    if p.pipeline == 0 {
        return Err(err(
            "parallel.pipeline",
            "must be at least 1".into(),
            "use `pipeline: 1` for no pipeline parallelism".into(),
        ));
    }
    if p.data == 0 {
        return Err(err(
            "parallel.data",
            "must be at least 1".into(),
            "use `data: 1` for no data parallelism".into(),
        ));
    }
    if m.engine == Engine::Sglang && p.data > 1 && !p.tensor.is_multiple_of(p.data) {
        return Err(err(
            "parallel.data",
            format!("({}) does not divide parallel.tensor ({}): SGLang's data-parallel attention splits the tensor-parallel GPUs", p.data, p.tensor),
            format!(
                "use a data size that divides {}, e.g. {}",
                p.tensor,
                (1..=p.data).rev().find(|d| p.tensor.is_multiple_of(*d)).unwrap_or(1)
            ),
        ));
    }
    if p.nodes_per_replica == Auto::Value(0) {
        return Err(err(
            "parallel.nodes_per_replica",
            "must be at least 1".into(),
            "use `auto` or a node count".into(),
        ));
    }
    if p.replicas_per_node == Auto::Value(0) {
        return Err(err(
            "parallel.replicas_per_node",
            "must be at least 1".into(),
            "use `auto` or a count".into(),
        ));
    }
    for (key, v) in std::iter::once(("model", &m.model))
        .chain(m.served_model_name.iter().map(|v| ("served_model_name", v)))
        .chain(m.engine_args.iter().map(|v| ("engine_args", v)))
    {
        if v.contains('\0') {
            return Err(err(
                key,
                "contains a NUL byte, which no command line can hold".into(),
                "remove it".into(),
            ));
        }
    }
    for a in &m.engine_args {
        let flag = a.split('=').next().unwrap_or(a);
        if let Some((_, owner)) = OWNED_ENGINE_FLAGS.iter().find(|(f, _)| *f == flag) {
            return Err(err(
                "engine_args",
                format!("contains `{flag}`, which ray-launch sets from {owner}"),
                format!("remove `{flag}` from engine_args and set {owner} instead"),
            ));
        }
    }
    Ok(())
}

/// Variable names and values of an `env:` map.
fn validate_env(
    env: &BTreeMap<String, EnvValue>,
    err: &dyn Fn(String, String) -> Error,
) -> Result<()> {
    for (k, v) in env {
        let valid = !k.is_empty()
            && !k.starts_with(|ch: char| ch.is_ascii_digit())
            && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
        if !valid {
            return Err(err(
                format!("has an invalid variable name `{k}`"),
                "names are letters, digits and `_`, not starting with a digit".into(),
            ));
        }
        if v.0.contains('\0') {
            return Err(err(
                format!("value of `{k}` contains a NUL byte"),
                "remove it".into(),
            ));
        }
        if let Err(bad) = check_placeholders_in(&v.0, ENV_PLACEHOLDERS) {
            return Err(err(
                format!("value of `{k}` has an unknown placeholder `{bad}`"),
                format!(
                    "placeholders in env values are {}",
                    ENV_PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}

impl Config {
    /// The models the job serves, in step order: the top-level one, or each entry of
    /// `models:` with the top-level defaults filled in. Valid once `parse` succeeded.
    pub fn model_specs(&self) -> Vec<ModelSpec> {
        if self.models.is_empty() {
            let model = self.model.clone().unwrap_or_default();
            return vec![ModelSpec {
                name: self
                    .served_model_name
                    .clone()
                    .unwrap_or_else(|| model.clone()),
                named: false,
                engine: self.engine.unwrap_or(Engine::Vllm),
                model,
                served_model_name: self.served_model_name.clone(),
                parallel: self.parallel.clone().unwrap_or(Parallel {
                    tensor: 1,
                    pipeline: 1,
                    data: 1,
                    expert: false,
                    nodes_per_replica: Auto::Auto,
                    replicas_per_node: Auto::Auto,
                }),
                engine_args: self.engine_args.clone(),
                env: self.env.clone(),
                nodes: NodeShare::Rest,
                required: true,
                min_healthy: None,
            }];
        }
        self.models
            .iter()
            .map(|e| {
                let mut env = self.env.clone();
                env.extend(e.env.clone());
                ModelSpec {
                    name: e.name.clone(),
                    named: true,
                    engine: e.engine.or(self.engine).unwrap_or(Engine::Vllm),
                    model: e.model.clone(),
                    // clients ask for an entry by its name: the engine serves it under that name
                    served_model_name: e.served_model_name.clone().or_else(|| Some(e.name.clone())),
                    parallel: e.parallel.clone(),
                    engine_args: e.engine_args.clone(),
                    env,
                    nodes: e.nodes,
                    required: e.required,
                    min_healthy: e.min_healthy,
                }
            })
            .collect()
    }

    /// Whether the job has one URL over several models or attached endpoints (it needs
    /// the router).
    pub fn serves_several(&self) -> bool {
        self.models.len() > 1 || !self.attach.is_empty()
    }

    /// Whether requests are routed by model name: a `models:` list or `attach:` entries.
    pub fn routes_by_name(&self) -> bool {
        !self.models.is_empty() || !self.attach.is_empty()
    }
}

/// Longest teardown: engine grace, then Ray grace, then a second for SIGKILL and reaping.
pub fn teardown_budget(c: &Config) -> Duration {
    c.timeouts
        .shutdown_grace
        .0
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1))
}

/// Placeholders allowed in `env` values, filled per node by the plan.
pub const ENV_PLACEHOLDERS: &[&str] = &[
    "job",
    "step",
    "node",
    "node_rank",
    "replica",
    "replica_rank",
];

/// The longest duration any key takes (a month: longer than any Slurm time limit here).
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

pub fn check_placeholders(s: &str) -> std::result::Result<(), String> {
    check_placeholders_in(s, &["job", "step", "node", "node_rank"])
}

pub fn check_placeholders_in(s: &str, allowed: &[&str]) -> std::result::Result<(), String> {
    let mut rest = s;
    while let Some(i) = rest.find('{') {
        let end = rest[i..].find('}').ok_or_else(|| rest[i..].to_string())?;
        let name = &rest[i + 1..i + end];
        if !allowed.contains(&name) {
            return Err(format!("{{{name}}}"));
        }
        rest = &rest[i + end + 1..];
    }
    Ok(())
}

/// Ports per job block (the plan fixes the offsets inside one).
pub const PORT_BLOCK: u16 = 256;

pub fn port_range(s: &str) -> std::result::Result<(u16, u16), &'static str> {
    let (a, b) = s.split_once('-').ok_or("is not of the form LOW-HIGH")?;
    let lo: u16 = a
        .trim()
        .parse()
        .map_err(|_| "has a low end that is not a port")?;
    let hi: u16 = b
        .trim()
        .parse()
        .map_err(|_| "has a high end that is not a port")?;
    if lo < 1024 {
        return Err("starts below 1024 (privileged ports)");
    }
    if hi < lo || (hi - lo + 1) < PORT_BLOCK {
        return Err("holds fewer ports than one job's block (256)");
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_nested_keys() {
        let src =
            "engine: vllm\nmodel: m\n# c\nparallel:\n  tensor: 8\n  pipeline: 2\nray:\n  port: 3\n";
        assert_eq!(locate(src, &["parallel", "tensor"]), Some(5));
        assert_eq!(locate(src, &["parallel", "pipeline"]), Some(6));
        assert_eq!(locate(src, &["ray", "port"]), Some(8));
        assert_eq!(locate(src, &["model"]), Some(2));
        assert_eq!(locate(src, &["ray", "tensor"]), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64GiB"), Some(64 << 30));
        assert_eq!(parse_size("500M"), Some(500 << 20));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("12 XB"), None);
    }
}
