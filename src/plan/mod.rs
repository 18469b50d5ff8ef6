//! The plan: what every node of the step does. Pure: `build(settings, step, nodes)` does no
//! I/O, so it is the main test surface and what `ray-launch plan` prints.
//!
//! The JSON form (`plan --format json`) is a stable schema, version [`SCHEMA`]:
//! `master` {node, address}, `self` ({node, node_rank} or null), `ranks` [{node, node_rank,
//! role, replica, commands: [{name, argv, env, lifecycle}], …}], plus `ports`, `endpoints`,
//! `channel`. `lifecycle` is described in [`lifecycle`].
//! Fields are only ever added within one schema version.

pub mod lifecycle;
mod render;
pub mod versions;

use crate::env_vars as ev;
use crate::error::{Error, Result};
use crate::input::config::{Auto, Config, Engine, ModelSpec, NodeShare, VllmBackend};
use crate::input::settings::Settings;
use crate::input::slurm::Step;
use lifecycle::{Kind, Lifecycle, StartAfter};
use serde::Serialize;
use std::collections::BTreeMap;

pub const SCHEMA: u32 = 1;

/// Ports per job block. Offsets inside a block are fixed (see [`Ports::for_block`]).
pub use crate::input::config::PORT_BLOCK;

/// Linux `sun_path` is 108 bytes with the NUL. Ray's longest socket path under its temp dir
/// is `/session_2026-11-22_03-04-47_123456_1234567/sockets/plasma_store` (64 bytes), and
/// Ray's temp dir is `ray` inside the job's private one (4 bytes).
pub const MAX_TEMP_DIR_LEN: usize = 107 - 64 - 4;

pub use crate::input::gather::NodeInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Ray head, then the engine (vLLM, ray backend).
    RayHead,
    RayWorker,
    /// Engine rank 0 of its replica: serves HTTP (vLLM mp, SGLang).
    EngineLeader,
    /// Engine rank > 0 (vLLM `--headless`, SGLang non-zero rank).
    EngineFollower,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::RayHead => "ray-head",
            Role::RayWorker => "ray-worker",
            Role::EngineLeader => "engine-leader",
            Role::EngineFollower => "engine-follower",
        }
    }
}

/// A secret the rank fills in when it starts a command; the plan names it, never holds it.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Secret {
    /// The endpoint's API key (derived from the job key, or `server.api_key_file`).
    ApiKey,
}

/// What stands for a masked value wherever ray-launch prints or logs a command.
pub const MASK: &str = "<secret>";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `ray-head`, `ray-worker`, `engine`, `client` (one of each kind at most per rank).
    pub kind: Kind,
    pub argv: Vec<String>,
    /// Set on top of the launcher's own environment.
    pub env: BTreeMap<String, String>,
    /// Set from the job's secrets when the command starts.
    pub secret_env: BTreeMap<String, Secret>,
    /// `FLAG VALUE` appended from the job's secrets (only where an engine reads no variable).
    pub secret_args: Vec<(String, Secret)>,
    /// Names in `env` whose values are masked when printed (`secret_env:`, or names that look secret).
    pub masked: std::collections::BTreeSet<String>,
    pub lifecycle: Lifecycle,
    /// Which of the node's replicas it belongs to, when a node runs several (else 0).
    pub slot: usize,
    /// vLLM with Ray: variables whose values differ between the replica's nodes, written to
    /// `$VLLM_CONFIG_ROOT/ray_non_carry_over_env_vars.json` before the engine starts, so
    /// vLLM does not copy the head's values to the workers.
    pub non_carry_over: Vec<String>,
}

impl Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut m = ser.serialize_map(None)?;
        m.serialize_entry("name", &self.kind)?;
        if self.slot > 0 {
            m.serialize_entry("slot", &self.slot)?;
        }
        m.serialize_entry("argv", &self.argv)?;
        m.serialize_entry("env", &self.shown_env())?;
        if !self.secret_env.is_empty() {
            m.serialize_entry("secret_env", &self.secret_env)?;
        }
        if !self.secret_args.is_empty() {
            m.serialize_entry("secret_args", &self.secret_args)?;
        }
        if !self.non_carry_over.is_empty() {
            m.serialize_entry("non_carry_over", &self.non_carry_over)?;
        }
        m.serialize_entry("lifecycle", &self.lifecycle)?;
        m.end()
    }
}

impl Command {
    fn new(
        kind: Kind,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        lifecycle: Lifecycle,
    ) -> Command {
        Command {
            kind,
            argv,
            env,
            secret_env: BTreeMap::new(),
            secret_args: Vec::new(),
            masked: Default::default(),
            lifecycle,
            slot: 0,
            non_carry_over: Vec::new(),
        }
    }

    /// `env` as printed: masked values replaced by [`MASK`].
    pub fn shown_env(&self) -> BTreeMap<&str, &str> {
        self.env
            .iter()
            .map(|(k, v)| {
                let v = if self.masked.contains(k) {
                    MASK
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect()
    }

    /// `VAR=value ... argv`, shell-quoted, to paste into a terminal; secrets masked.
    pub fn shell(&self) -> String {
        let mut parts: Vec<String> = self
            .shown_env()
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect();
        parts.extend(
            self.secret_env
                .keys()
                .map(|k| format!("{k}={}", quote(MASK))),
        );
        parts.extend(self.argv.iter().map(|a| quote(a)));
        for (flag, _) in &self.secret_args {
            parts.push(quote(flag));
            parts.push(quote(MASK));
        }
        parts.join(" ")
    }
}

/// Shell-quote only words that need it (`--port=20001` stays as it is).
pub fn quote(w: &str) -> String {
    let safe = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c));
    if safe {
        w.to_string()
    } else {
        shell_words::quote(w).into_owned()
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Ports {
    /// ray-launch's own rank-to-rank channel (on the master).
    pub channel: u16,
    pub ray_gcs: u16,
    pub node_manager: u16,
    pub object_manager: u16,
    pub dashboard: u16,
    pub dashboard_agent_listen: u16,
    pub dashboard_agent_grpc: u16,
    pub metrics_export: u16,
    pub runtime_env_agent: u16,
    pub ray_client_server: u16,
    /// The job's HTTP endpoint: the engine on each replica leader, or the router (on the
    /// master) when there is one.
    pub engine_http: u16,
    /// Each replica leader's engine, behind the router (when there is one).
    pub replica_http: u16,
    /// vLLM mp `--master-port` / SGLang `--dist-init-addr` port.
    pub engine_rendezvous: u16,
    /// vLLM `--data-parallel-rpc-port` (with `parallel.data`; + slot side by side).
    pub data_parallel_rpc: u16,
    pub min_worker: u16,
    pub max_worker: u16,
}

impl Ports {
    /// Offsets: 0 channel, 1-9 Ray daemons, 10 engine HTTP (or the router), 11 engine
    /// rendezvous, 12 vLLM's data-parallel RPC (12-19 with replicas side by side), 20 the
    /// engines behind the router (20-27), 28-31 left free, 32-255 Ray worker ports.
    pub fn for_block(base: u16) -> Ports {
        Ports {
            channel: base,
            ray_gcs: base + 1,
            node_manager: base + 2,
            object_manager: base + 3,
            dashboard: base + 4,
            dashboard_agent_listen: base + 5,
            dashboard_agent_grpc: base + 6,
            metrics_export: base + 7,
            runtime_env_agent: base + 8,
            ray_client_server: base + 9,
            engine_http: base + 10,
            engine_rendezvous: base + 11,
            data_parallel_rpc: base + 12,
            replica_http: base + 20,
            min_worker: base + 32,
            max_worker: base + PORT_BLOCK - 1,
        }
    }
}

/// How many blocks a step may choose from: the first one free on every node is used.
pub const CANDIDATE_BLOCKS: usize = 4;

fn fnv(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Which block of `range` a step takes first: numeric job ids take consecutive blocks (so
/// jobs submitted one after another never share one until the range wraps), each step of a
/// job the next ones; other ids hash.
pub fn block_base(job_id: &str, step_id: &str, range: (u16, u16)) -> u16 {
    candidate_blocks(job_id, step_id, range)[0]
}

/// The first port of `SLURM_STEP_RESV_PORTS` when it holds a whole block (`12000-12255`, or a
/// list whose first range is that long): Slurm reserved those ports for this step.
pub fn reserved_block(resv: &str) -> Option<u16> {
    let first = resv.split(',').next()?.trim();
    let (lo, hi) = match first.split_once('-') {
        Some((a, b)) => (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?),
        None => {
            let p = first.parse::<u16>().ok()?;
            (p, p)
        }
    };
    (hi >= lo && (hi - lo) as u32 + 1 >= PORT_BLOCK as u32).then_some(lo)
}

/// The blocks this step may use, in order: the ports Slurm reserved for it when they hold a
/// block, else the step's candidates in `range`.
pub fn step_blocks(step: &Step, range: (u16, u16)) -> Vec<u16> {
    match step.resv_ports.as_deref().and_then(reserved_block) {
        Some(b) => vec![b],
        None => candidate_blocks(&step.job_id, &step.step_id, range),
    }
}

/// The step's candidate blocks, in order (distinct while the range holds enough blocks).
pub fn candidate_blocks(job_id: &str, step_id: &str, range: (u16, u16)) -> Vec<u16> {
    let nblocks = ((range.1 - range.0 + 1) / PORT_BLOCK) as u64;
    let job = job_id.parse::<u64>().unwrap_or_else(|_| fnv(job_id));
    let step = step_id.parse::<u64>().unwrap_or_else(|_| fnv(step_id));
    // a job's steps sit next to each other; the next job starts a few blocks further on
    let first = job.wrapping_mul(5).wrapping_add(step.wrapping_mul(3)) % nblocks;
    let mut out: Vec<u16> = Vec::new();
    for i in 0..nblocks {
        // later candidates jump far, so that one crowded neighbourhood is not tried twice
        let b = (first + i * (nblocks / 2 + 1)) % nblocks;
        let base = range.0 + (b as u16) * PORT_BLOCK;
        if !out.contains(&base) {
            out.push(base);
        }
        if out.len() == CANDIDATE_BLOCKS {
            break;
        }
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeRef {
    pub node: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelfRef {
    pub node: String,
    pub node_rank: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Channel {
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointUrl {
    pub replica: usize,
    /// The model it serves (its `name`).
    pub model: String,
    pub node: String,
    /// OpenAI-compatible base URL for clients (with `server.advertise`, its host).
    pub url: String,
    /// Where the router reaches it: the leader's own address, without `/v1`.
    #[serde(skip_serializing)]
    pub internal: String,
    /// What the leader's supervisor polls (on the leader itself).
    pub health_url: String,
    /// Its slice of the node's GPUs (`CUDA_VISIBLE_DEVICES`), when a node runs several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<String>,
}

/// The router: where it listens and what clients use.
#[derive(Debug, Clone, Serialize)]
pub struct RouterPlan {
    pub node: String,
    /// OpenAI-compatible base URL for clients (the job's `url`).
    pub url: String,
    pub listen: String,
}

/// One model of the job: which nodes and replicas serve it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelPlan {
    /// The entry's name (for the single top-level model, its served name).
    pub name: String,
    pub engine: Engine,
    /// vLLM's distributed backend; null for SGLang.
    pub backend: Option<VllmBackend>,
    pub model: String,
    pub served_model_name: String,
    /// Its nodes: node ranks `first_node .. first_node + nodes`.
    pub first_node: usize,
    pub nodes: usize,
    pub nodes_per_replica: usize,
    pub replicas_per_node: usize,
    /// Its replicas: `first_replica .. first_replica + replicas` of the job's.
    pub first_replica: usize,
    pub replicas: usize,
    /// Whether the job ends when it is down (else it is dropped and the job goes on).
    pub required: bool,
    /// Replicas of it that must serve, once ready, for it to count as up.
    pub min_healthy: usize,
    /// A base URL that serves this model alone (the router's per-model path, or its
    /// replica's own URL without a router).
    pub url: String,
}

impl ModelPlan {
    pub fn has_rank(&self, rank: usize) -> bool {
        (self.first_node..self.first_node + self.nodes).contains(&rank)
    }

    pub fn has_replica(&self, rep: usize) -> bool {
        (self.first_replica..self.first_replica + self.replicas).contains(&rep)
    }
}

/// An endpoint that already runs (`attach:`): the router's own spec of it.
pub use crate::route::attach::AttachSpec;

/// What a planned `argv[0]` of `ray-launch` means: this launcher's own binary (the rank runs
/// the executable it was started from).
pub const LAUNCHER: &str = "ray-launch";

#[derive(Debug, Clone, Serialize)]
pub struct RankPlan {
    pub node: String,
    pub node_rank: usize,
    pub address: String,
    pub interface: Option<String>,
    pub role: Role,
    pub replica: usize,
    /// Rank inside the replica (0 = leader).
    pub replica_rank: usize,
    /// Node name of this replica's leader.
    pub leader: String,
    pub temp_dir: String,
    /// The job's Ray token, written 0600 in the private temp dir (when Ray runs with auth).
    pub ray_token_file: Option<String>,
    pub commands: Vec<Command>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub schema: u32,
    pub job_id: String,
    pub engine: Engine,
    /// vLLM's distributed backend; null for SGLang.
    pub backend: Option<VllmBackend>,
    pub model: String,
    pub served_model_name: String,
    pub nodes: usize,
    pub nodes_per_replica: usize,
    /// Replicas side by side on each node (each on its own GPUs; 1 = a replica spans nodes).
    pub replicas_per_node: usize,
    pub replicas: usize,
    /// What the layout leaves unused (idle GPUs), said once by `plan`, `check` and `run`.
    pub warnings: Vec<String>,
    pub gpus_per_node: u32,
    /// Where `gpus_per_node: auto` found it (`SLURM_GPUS_ON_NODE`, `CUDA_VISIBLE_DEVICES`, the
    /// driver's list); absent when the flag or the config set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus_from: Option<String>,
    pub master: NodeRef,
    pub channel: Channel,
    #[serde(rename = "self")]
    pub self_rank: Option<SelfRef>,
    pub ports: Ports,
    pub endpoints: Vec<EndpointUrl>,
    /// One endpoint over the replicas (`router.enabled`; by default with more than one).
    pub router: Option<RouterPlan>,
    /// Every model, in step order (one for a config with a single top-level model). The
    /// top-level `engine` … `replicas_per_node` fields are the first model's.
    pub models: Vec<ModelPlan>,
    /// Endpoints the router adds that the job does not run.
    pub attached: Vec<AttachSpec>,
    pub ranks: Vec<RankPlan>,
}

impl Plan {
    /// Whether any model runs on Ray.
    pub fn uses_ray(&self) -> bool {
        self.models
            .iter()
            .any(|m| m.engine == Engine::Vllm && m.backend == Some(VllmBackend::Ray))
    }

    /// The model node `rank` serves.
    pub fn model_of_rank(&self, rank: usize) -> &ModelPlan {
        self.models
            .iter()
            .find(|m| m.has_rank(rank))
            .unwrap_or(&self.models[0])
    }

    /// The model replica `rep` belongs to.
    pub fn model_of_replica(&self, rep: usize) -> &ModelPlan {
        self.models
            .iter()
            .find(|m| m.has_replica(rep))
            .unwrap_or(&self.models[0])
    }

    /// The URL clients use: the router's, else replica 0's.
    pub fn url(&self) -> &str {
        self.router
            .as_ref()
            .map(|r| r.url.as_str())
            .unwrap_or(self.endpoints[0].url.as_str())
    }

    /// Whether a replica's failure restarts it (`replicas.on_failure`; by default with more
    /// than one replica) instead of ending the job.
    pub fn restarts_replicas(&self, s: &Settings) -> bool {
        use crate::input::config::OnFailure;
        match s.config.replicas.on_failure {
            Some(OnFailure::Restart) => true,
            Some(OnFailure::Stop) => false,
            None => self.replicas > 1 || !self.attached.is_empty(),
        }
    }

    /// The node ranks of replica `rep`.
    pub fn replica_ranks(&self, rep: usize) -> std::ops::Range<usize> {
        let m = self.model_of_replica(rep);
        let local = rep - m.first_replica;
        if m.replicas_per_node > 1 {
            let node = m.first_node + local / m.replicas_per_node;
            return node..node + 1;
        }
        let first = m.first_node + local * m.nodes_per_replica;
        first..first + m.nodes_per_replica
    }

    /// The replica a command of `rank` in `slot` belongs to.
    pub fn replica_of(&self, rank: usize, slot: usize) -> usize {
        let m = self.model_of_rank(rank);
        if m.replicas_per_node > 1 {
            m.first_replica + (rank - m.first_node) * m.replicas_per_node + slot
        } else {
            self.ranks[rank].replica
        }
    }

    /// The node-local slot of replica `rep` (0 unless nodes run several).
    pub fn slot_of(&self, rep: usize) -> usize {
        let m = self.model_of_replica(rep);
        if m.replicas_per_node > 1 {
            (rep - m.first_replica) % m.replicas_per_node
        } else {
            0
        }
    }

    /// How many replicas node `rank` runs side by side (1 unless its model runs several).
    pub fn slots_on(&self, rank: usize) -> usize {
        self.model_of_rank(rank).replicas_per_node
    }
}

impl RankPlan {
    /// This rank's command of this kind (in the node's first replica), if it has one.
    pub fn command(&self, kind: Kind) -> Option<&Command> {
        self.command_in(kind, 0)
    }

    /// This rank's command of this kind in `slot` (one of the node's replicas).
    pub fn command_in(&self, kind: Kind, slot: usize) -> Option<&Command> {
        self.commands
            .iter()
            .find(|c| c.kind == kind && (c.slot == slot || !c.kind.of_replica()))
    }
}

/// `vllm serve MODEL -tp T -pp P --distributed-executor-backend B`, common to both backends,
/// with `--data-parallel-size D` and `--enable-expert-parallel` when asked for. `rpc`: the
/// data-parallel RPC port (vLLM's default, 29550, is the same for every job on a node).
fn vllm_serve(c: &Config, m: &ModelSpec, backend: &str, rpc: u16) -> Vec<String> {
    let mut v = vec![
        c.vllm.executable.clone(),
        "serve".into(),
        m.model.clone(),
        "--tensor-parallel-size".into(),
        m.parallel.tensor.to_string(),
        "--pipeline-parallel-size".into(),
        m.parallel.pipeline.to_string(),
        "--distributed-executor-backend".into(),
        backend.into(),
    ];
    if m.parallel.data > 1 {
        v.extend([
            "--data-parallel-size".into(),
            m.parallel.data.to_string(),
            "--data-parallel-rpc-port".into(),
            rpc.to_string(),
        ]);
    }
    if m.parallel.expert {
        v.push("--enable-expert-parallel".into());
    }
    v
}

/// `python -m sglang.launch_server --model-path M --tp-size T [--pp-size P]`, common to every
/// SGLang command line, with `--dp-size D --enable-dp-attention` and `--ep-size T` when asked.
fn sglang_launch(c: &Config, m: &ModelSpec) -> Vec<String> {
    let p = &m.parallel;
    let mut v = vec![
        c.sglang.python.clone(),
        "-m".into(),
        "sglang.launch_server".into(),
        "--model-path".into(),
        m.model.clone(),
        "--tp-size".into(),
        p.tensor.to_string(),
    ];
    if p.pipeline > 1 {
        v.extend(["--pp-size".into(), p.pipeline.to_string()]);
    }
    if p.data > 1 {
        v.extend([
            "--dp-size".into(),
            p.data.to_string(),
            "--enable-dp-attention".into(),
        ]);
    }
    if p.expert {
        v.extend(["--ep-size".into(), p.tensor.to_string()]);
    }
    v
}

/// The job's API key for the engine that serves HTTP.
fn serving_key(m: &ModelSpec, cmd: &mut Command) {
    match m.engine {
        // vLLM reads VLLM_API_KEY: the key stays out of /proc/PID/cmdline
        Engine::Vllm => {
            cmd.secret_env
                .insert(ev::VLLM_API_KEY.into(), Secret::ApiKey);
        }
        // SGLang reads only --api-key
        Engine::Sglang => cmd.secret_args.push(("--api-key".into(), Secret::ApiKey)),
    }
}

/// What the rank that serves HTTP adds: `--host H --port P [--served-model-name N]`
/// (the same flags in vLLM and SGLang).
fn http_args(c: &Config, m: &ModelSpec, port: u16) -> Vec<String> {
    let mut v = vec![
        "--host".into(),
        c.server.host.clone(),
        "--port".into(),
        port.to_string(),
    ];
    if let Some(name) = &m.served_model_name {
        v.extend(["--served-model-name".into(), name.clone()]);
    }
    v
}

fn fill(template: &str, step: &Step, node: &str, rank: usize) -> String {
    template
        .replace("{job}", &step.job_id)
        .replace("{step}", &step.step_id)
        .replace("{node}", node)
        .replace("{node_rank}", &rank.to_string())
}

/// How the step splits into replicas.
struct Layout {
    npr: usize,
    replicas: usize,
    /// Replicas side by side on one node.
    per_node: usize,
    warnings: Vec<String>,
}

/// The most replicas one node may run side by side (each takes a port at block offset 20 + i).
pub const MAX_REPLICAS_PER_NODE: usize = 8;

/// Nodes per replica, replicas per node and replica count, or an error that says which
/// counts would work.
fn layout(s: &Settings, m: &ModelSpec, nnodes: usize) -> Result<Layout> {
    let c = m;
    let world = m.world();
    let gpus = s.gpus_per_node as usize;
    let spans_one_node = matches!(c.parallel.nodes_per_replica, Auto::Auto | Auto::Value(1));
    let per_node = match c.parallel.replicas_per_node {
        Auto::Value(k) => k as usize,
        Auto::Auto if gpus > 0 && spans_one_node && world <= gpus => gpus / world,
        Auto::Auto => 1,
    };
    if per_node > 1 {
        if !spans_one_node {
            return Err(Error::usage(format!(
                "parallel.replicas_per_node is {per_node} but parallel.nodes_per_replica is not 1"
            ))
            .hint("several replicas per node each fit on one node: set nodes_per_replica to 1 (or auto), or replicas_per_node to 1"));
        }
        if per_node > MAX_REPLICAS_PER_NODE {
            return Err(Error::usage(format!(
                "{per_node} replicas per node is more than ray-launch runs side by side ({MAX_REPLICAS_PER_NODE})"
            ))
            .hint("raise parallel.tensor, or set parallel.replicas_per_node to at most 8"));
        }
        if gpus > 0 && per_node * world > gpus {
            return Err(Error::usage(format!(
                "{per_node} replicas of {} = {} GPUs per node, but a node has {gpus}",
                m.shape(),
                per_node * world
            ))
            .hint(format!(
                "use parallel.replicas_per_node: {} (or auto)",
                gpus / world.max(1)
            )));
        }
        let mut warnings = Vec::new();
        if gpus > per_node * world {
            warnings.push(format!(
                "{} of the {gpus} GPUs per node stay idle: {per_node} replica(s) of {world} GPU(s) each",
                gpus - per_node * world
            ));
        }
        return Ok(Layout {
            npr: 1,
            replicas: nnodes * per_node,
            per_node,
            warnings,
        });
    }
    let (npr, replicas) = layout_nodes(s, m, nnodes)?;
    let mut warnings = Vec::new();
    if gpus > 0 && npr * gpus > world {
        warnings.push(format!(
            "{} of the {} GPUs of each replica stay idle: {} = {world} over {npr} node(s) of {gpus}",
            npr * gpus - world,
            npr * gpus,
            m.shape()
        ));
    }
    Ok(Layout {
        npr,
        replicas,
        per_node: 1,
        warnings,
    })
}

/// Nodes per replica and replica count, or an error that says which node counts would work.
fn layout_nodes(s: &Settings, m: &ModelSpec, nnodes: usize) -> Result<(usize, usize)> {
    let c = m;
    let world = m.world();
    let gpus = s.gpus_per_node as usize;
    let why;
    let npr = match c.parallel.nodes_per_replica {
        Auto::Value(n) => {
            why = format!("parallel.nodes_per_replica is {n}");
            n as usize
        }
        Auto::Auto if gpus == 0 => {
            why = String::new();
            nnodes
        }
        Auto::Auto => {
            why = format!("{} = {world} GPUs at {gpus} per node", m.shape());
            world.div_ceil(gpus)
        }
    };
    if nnodes < npr {
        return Err(Error::usage(format!(
            "one replica needs {npr} nodes ({why}) but the step has {nnodes}"
        ))
        .hint(format!(
            "run on {npr} nodes (`srun -N{npr}`), or lower parallel.data/tensor/pipeline"
        )));
    }
    if !nnodes.is_multiple_of(npr) {
        let ok: Vec<String> = (1..=4).map(|k| (k * npr).to_string()).collect();
        return Err(Error::usage(format!(
            "the step has {nnodes} nodes, which do not split into replicas of {npr} nodes ({why})"
        ))
        .hint(format!(
            "use a node count that is a multiple of {npr}: {}, ...",
            ok.join(", ")
        )));
    }
    let backend_needs_even = c.engine == Engine::Sglang || s.config.vllm.backend == VllmBackend::Mp;
    if backend_needs_even && !world.is_multiple_of(npr) {
        return Err(Error::usage(format!(
            "{} = {world} ranks do not split evenly over {npr} nodes per replica",
            m.shape()
        ))
        .hint("every node of a replica runs the same number of engine ranks: make their product a multiple of the nodes per replica"));
    }
    if gpus > 0 {
        let per_node = world.div_ceil(npr);
        if backend_needs_even && per_node > gpus {
            return Err(Error::usage(format!(
                "each node would run {per_node} engine ranks but has {gpus} GPUs"
            ))
            .hint("use more nodes per replica (parallel.nodes_per_replica) or smaller tensor/pipeline sizes"));
        }
        if world > npr * gpus {
            return Err(Error::usage(format!(
                "{} = {world} GPUs, but a replica of {npr} nodes has {}",
                m.shape(),
                npr * gpus
            ))
            .hint(
                "use more nodes per replica (parallel.nodes_per_replica) or check gpus_per_node",
            ));
        }
    }
    Ok((npr, nnodes / npr))
}

/// OpenAI base URL and health URL of each replica's leader.
/// `nodes`: the model's own; `first`: the job's number of its first replica.
fn endpoints(
    c: &Config,
    m: &ModelSpec,
    nodes: &[NodeInfo],
    l: &Layout,
    port: u16,
    first: usize,
    gpus: usize,
) -> Vec<EndpointUrl> {
    let world = m.world();
    let wildcard = c.server.host == "0.0.0.0" || c.server.host == "::";
    (0..l.replicas)
        .map(|r| {
            let (leader, slot) = if l.per_node > 1 {
                (&nodes[r / l.per_node], r % l.per_node)
            } else {
                (&nodes[r * l.npr], 0)
            };
            let port = port + slot as u16;
            let host = if wildcard {
                leader.address.clone()
            } else {
                c.server.host.clone()
            };
            let probe = if wildcard {
                "127.0.0.1".to_string()
            } else {
                c.server.host.clone()
            };
            EndpointUrl {
                replica: first + r,
                model: m.name.clone(),
                node: leader.name.clone(),
                url: format!("http://{}:{port}/v1", advertised(c, leader, &host)),
                internal: format!("http://{host}:{port}"),
                health_url: format!("http://{probe}:{port}/health"),
                gpus: (l.per_node > 1 && gpus > 0).then(|| gpu_slice(leader, slot, world)),
            }
        })
        .collect()
}

/// The host clients are given for a server on `node`: `server.advertise` with `{node}`
/// filled in (a name or address login nodes reach), else `host`.
fn advertised(c: &Config, node: &NodeInfo, host: &str) -> String {
    match &c.server.advertise {
        Some(a) => a.replace("{node}", &node.name),
        None => host.to_string(),
    }
}

/// The `CUDA_VISIBLE_DEVICES` of replica `slot` on `node`: positions `slot × world ..` of the
/// node's own list (as Slurm set it), or those numbers when the node has none.
fn gpu_slice(node: &NodeInfo, slot: usize, world: usize) -> String {
    (slot * world..(slot + 1) * world)
        .map(|i| {
            node.gpu_ids
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What is the same for every node of the step.
struct Job<'a> {
    s: &'a Settings,
    c: &'a Config,
    /// The model these nodes serve.
    m: &'a ModelSpec,
    step: &'a Step,
    ports: Ports,
    npr: usize,
    /// The model's first node rank and the job's number of its first replica.
    first_node: usize,
    first_replica: usize,
    /// The model's replicas (`endpoints[0]` is replica `first_replica`).
    endpoints: Vec<EndpointUrl>,
    router: Option<RouterPlan>,
    /// The port each replica's engine serves on (the first one, with several per node).
    serve_port: u16,
    per_node: usize,
}

impl Job<'_> {
    /// The endpoint of the replica a node's slot belongs to.
    fn endpoint(&self, x: &Slot<'_>) -> &EndpointUrl {
        &self.endpoints[x.replica - self.first_replica]
    }
}

/// One node's place in the step, and the environment every process on it gets.
struct Slot<'a> {
    node: &'a NodeInfo,
    replica: usize,
    /// Rank inside the replica (0 = leader).
    rr: usize,
    leader: &'a NodeInfo,
    temp_dir: String,
    /// Address and interface for vLLM, Gloo and NCCL.
    base: BTreeMap<String, String>,
    /// The user's `env`, filled for this node (it wins over `base`, e.g. NCCL_SOCKET_IFNAME=ib0).
    user: BTreeMap<String, String>,
}

impl Slot<'_> {
    fn with_user(&self, mut m: BTreeMap<String, String>) -> BTreeMap<String, String> {
        m.extend(self.user.clone());
        m
    }

    /// A command with the user's `env` on top of `env`, and the secret names masked.
    fn command(
        &self,
        j: &Job<'_>,
        kind: Kind,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        lifecycle: Lifecycle,
    ) -> Command {
        let mut c = Command::new(kind, argv, self.with_user(env), lifecycle);
        c.masked = j.s.secret_env.clone();
        c
    }

    /// Ray's own temp dir: inside the private one, because Ray makes its temp dir 0777
    /// ("so that others can use it"); the private parent keeps others out.
    fn ray_dir(&self) -> String {
        format!("{}/ray", self.temp_dir)
    }

    /// Where this node's Ray token file lives.
    fn token_file(&self) -> String {
        format!("{}/auth_token", self.temp_dir)
    }

    /// The replica's Ray GCS address.
    fn gcs(&self, j: &Job<'_>) -> String {
        format!("{}:{}", self.leader.address, j.ports.ray_gcs)
    }
}

/// `local`: which of the node's replicas (0 unless nodes run several).
fn slot<'a>(j: &Job<'_>, nodes: &'a [NodeInfo], rank: usize, local: usize) -> Result<Slot<'a>> {
    let (c, m) = (j.c, j.m);
    let n = &nodes[rank];
    let here = rank - j.first_node;
    let (replica, rr) = if j.per_node > 1 {
        (j.first_replica + here * j.per_node + local, 0)
    } else {
        (j.first_replica + here / j.npr, here % j.npr)
    };
    let temp_dir = fill(&c.ray.temp_dir, j.step, &n.name, rank);
    if temp_dir.len() > MAX_TEMP_DIR_LEN {
        return Err(Error::usage(format!(
            "ray.temp_dir expands to `{temp_dir}` ({} bytes) on {}; Ray's Unix sockets under it would pass the 107-byte limit",
            temp_dir.len(),
            n.name
        ))
        .hint(format!("keep ray.temp_dir at most {MAX_TEMP_DIR_LEN} bytes once expanded, e.g. `/tmp/rl-{{job}}.{{step}}-{{node_rank}}`")));
    }
    let mut base = BTreeMap::new();
    if m.engine == Engine::Vllm {
        base.insert(ev::VLLM_HOST_IP.to_string(), n.address.clone());
        base.insert(ev::VLLM_NO_USAGE_STATS.to_string(), "1".into());
    }
    if let Some(ifname) = &n.interface {
        // what the site set on the node (`NCCL_SOCKET_IFNAME=hsn`) stays, unless the config
        // names the network
        let named = c.network.interface.is_some() || c.network.cidr.is_some();
        for var in [ev::GLOO_SOCKET_IFNAME, ev::NCCL_SOCKET_IFNAME] {
            if named || !n.preset_ifname.iter().any(|p| p == var) {
                base.insert(var.to_string(), ifname.clone());
            }
        }
    }
    // compile caches on the node's own disk, private to the job: parallel jobs on a shared
    // $HOME race on ~/.cache/vllm, ~/.triton and the Inductor cache
    for (var, sub) in [
        (ev::VLLM_CACHE_ROOT, "vllm"),
        (ev::TRITON_CACHE_DIR, "triton"),
        (ev::TORCHINDUCTOR_CACHE_DIR, "inductor"),
    ] {
        if var != ev::VLLM_CACHE_ROOT || m.engine == Engine::Vllm {
            base.insert(var.to_string(), format!("{temp_dir}/cache/{sub}"));
        }
    }
    let user = m
        .env
        .iter()
        .map(|(k, v)| {
            let v = fill(&v.0, j.step, &n.name, rank)
                .replace("{replica_rank}", &rr.to_string())
                .replace("{replica}", &replica.to_string());
            (k.clone(), v)
        })
        .collect();
    Ok(Slot {
        node: n,
        replica,
        rr,
        leader: if j.per_node > 1 {
            n
        } else {
            &nodes[j.first_node + (here / j.npr) * j.npr]
        },
        temp_dir,
        base,
        user,
    })
}

/// vLLM with Ray: `ray start` (head on the leader, worker elsewhere), and on the leader
/// `vllm serve` as the driver of its replica's Ray cluster.
fn ray_commands(j: &Job<'_>, x: &Slot<'_>) -> (Role, Vec<Command>) {
    let (c, ports, n, rr) = (j.c, &j.ports, x.node, x.rr);
    let mut env = x.base.clone();
    if j.s.auth {
        env.insert(ev::RAY_AUTH_MODE.into(), "token".into());
        env.insert(ev::RAY_AUTH_TOKEN_PATH.into(), x.token_file());
    } else {
        env.insert(ev::RAY_AUTH_MODE.into(), "disabled".into());
    }
    env.insert(ev::RAY_USAGE_STATS_ENABLED.into(), "0".into());
    let mut argv = vec![c.ray.executable.clone(), "start".into()];
    let role = if rr == 0 {
        argv.extend(["--head".into(), format!("--port={}", ports.ray_gcs)]);
        Role::RayHead
    } else {
        argv.push(format!("--address={}", x.gcs(j)));
        Role::RayWorker
    };
    argv.extend([
        "--block".into(),
        format!("--node-ip-address={}", n.address),
        format!("--num-cpus={}", n.cpus),
        format!("--num-gpus={}", j.s.gpus_per_node),
        format!("--object-store-memory={}", n.object_store_bytes),
        format!("--temp-dir={}", x.ray_dir()),
        "--disable-usage-stats".into(),
        format!("--node-manager-port={}", ports.node_manager),
        format!("--object-manager-port={}", ports.object_manager),
        format!(
            "--dashboard-agent-listen-port={}",
            ports.dashboard_agent_listen
        ),
        format!("--dashboard-agent-grpc-port={}", ports.dashboard_agent_grpc),
        format!("--metrics-export-port={}", ports.metrics_export),
        format!("--runtime-env-agent-port={}", ports.runtime_env_agent),
        format!("--min-worker-port={}", ports.min_worker),
        format!("--max-worker-port={}", ports.max_worker),
    ]);
    if rr == 0 {
        if c.ray.client_server {
            argv.push(format!(
                "--ray-client-server-port={}",
                ports.ray_client_server
            ));
        } else if n.ray_client {
            // with ray[client] installed Ray binds 10001, the same for every job on the node:
            // 0 turns its client server off
            argv.push("--ray-client-server-port=0".into());
        }
        argv.push(format!("--include-dashboard={}", c.ray.dashboard));
        if c.ray.dashboard {
            argv.push(format!("--dashboard-port={}", ports.dashboard));
        }
    }
    argv.extend(c.ray.extra_args.iter().cloned());
    let (kind, lifecycle) = if rr == 0 {
        (Kind::RayHead, Lifecycle::ray_head())
    } else {
        (Kind::RayWorker, Lifecycle::ray_worker())
    };
    let mut commands = vec![x.command(j, kind, argv, env.clone(), lifecycle)];
    if rr == 0 {
        let mut argv = vllm_serve(c, j.m, "ray", j.ports.data_parallel_rpc);
        if j.m.parallel.data > 1 {
            // vLLM places every data-parallel rank on the replica's Ray cluster from here
            argv.extend([
                "--data-parallel-backend".into(),
                "ray".into(),
                "--data-parallel-address".into(),
                x.leader.address.clone(),
            ]);
        }
        argv.extend(http_args(c, j.m, j.serve_port));
        argv.extend(j.m.engine_args.iter().cloned());
        let mut env = env;
        env.insert(ev::RAY_ADDRESS.into(), x.gcs(j));
        let mut cmd = x.command(
            j,
            Kind::Engine,
            argv,
            env,
            Lifecycle::serving_engine(StartAfter::ReplicaJoined, &j.endpoint(x).health_url),
        );
        if j.s.auth {
            serving_key(j.m, &mut cmd);
        }
        commands.push(cmd);
    }
    (role, commands)
}

/// A one-node replica of several: the engine alone (no Ray, no rendezvous); side by side on a
/// node, on its slice of the node's GPUs and its own port.
fn side_by_side_command(j: &Job<'_>, x: &Slot<'_>, local: usize) -> Command {
    let (c, m) = (j.c, j.m);
    let mut argv: Vec<String> = match m.engine {
        Engine::Vllm => vllm_serve(c, m, "mp", j.ports.data_parallel_rpc + local as u16),
        Engine::Sglang => sglang_launch(c, m),
    };
    argv.extend(http_args(c, m, j.serve_port + local as u16));
    argv.extend(m.engine_args.iter().cloned());
    let mut env = x.base.clone();
    if let Some(g) = &j.endpoint(x).gpus {
        env.insert(ev::CUDA_VISIBLE_DEVICES.into(), g.clone());
    }
    let lifecycle = Lifecycle::serving_engine(StartAfter::Rendezvous, &j.endpoint(x).health_url);
    let mut cmd = x.command(j, Kind::Engine, argv, env, lifecycle);
    cmd.slot = local;
    if j.s.auth {
        serving_key(m, &mut cmd);
    }
    cmd
}

/// vLLM mp or SGLang: one engine rank per node that meets its leader's rendezvous.
fn engine_command(j: &Job<'_>, x: &Slot<'_>) -> (Role, Command) {
    let (c, m, ports, rr, npr) = (j.c, j.m, &j.ports, x.rr, j.npr);
    let role = if rr == 0 {
        Role::EngineLeader
    } else {
        Role::EngineFollower
    };
    let mut argv: Vec<String> = match m.engine {
        Engine::Vllm => {
            let mut v = vllm_serve(c, m, "mp", ports.data_parallel_rpc);
            v.extend([
                "--nnodes".into(),
                npr.to_string(),
                "--node-rank".into(),
                rr.to_string(),
                "--master-addr".into(),
                x.leader.address.clone(),
                "--master-port".into(),
                ports.engine_rendezvous.to_string(),
            ]);
            v
        }
        Engine::Sglang => {
            let mut v = sglang_launch(c, m);
            v.extend([
                "--nnodes".into(),
                npr.to_string(),
                "--node-rank".into(),
                rr.to_string(),
                "--dist-init-addr".into(),
                format!("{}:{}", x.leader.address, ports.engine_rendezvous),
            ]);
            v
        }
    };
    let headless = m.engine == Engine::Vllm && rr != 0;
    if headless {
        argv.push("--headless".into());
    } else {
        argv.extend(http_args(c, m, j.serve_port));
    }
    argv.extend(m.engine_args.iter().cloned());
    let lifecycle = if rr == 0 {
        Lifecycle::serving_engine(StartAfter::Rendezvous, &j.endpoint(x).health_url)
    } else {
        Lifecycle::following_engine()
    };
    let mut cmd = x.command(j, Kind::Engine, argv, x.base.clone(), lifecycle);
    if j.s.auth && rr == 0 {
        serving_key(m, &mut cmd);
    }
    (role, cmd)
}

/// The whole job as the router and the client see it: every replica, model and attached
/// endpoint.
struct Whole<'a> {
    endpoints: &'a [EndpointUrl],
    models: &'a [ModelPlan],
    attached: &'a [AttachSpec],
    /// The router routes by model name (`models:` or `attach:` in the config).
    by_name: bool,
}

/// The host of an `http://HOST:PORT/...` URL.
fn url_host(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or_default();
    match hostport.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => hostport.split(':').next().unwrap_or_default().to_string(),
    }
}

/// The client on the master, with the endpoint in its environment.
fn client_command(j: &Job<'_>, x: &Slot<'_>, w: &Whole<'_>, uses_ray: bool) -> Command {
    let s = j.s;
    let mut env = BTreeMap::new();
    let url = j
        .router
        .as_ref()
        .map_or(w.endpoints[0].url.clone(), |r| r.url.clone());
    env.insert(ev::OPENAI_BASE_URL.to_string(), url);
    env.insert(ev::RAY_LAUNCH_ENDPOINT.to_string(), s.endpoint_file.clone());
    env.insert(
        ev::RAY_LAUNCH_ENDPOINTS.to_string(),
        w.endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    );
    if w.by_name {
        for m in w.models {
            env.insert(crate::input::config::model_url_var(&m.name), m.url.clone());
        }
        for a in w.attached {
            env.insert(
                crate::input::config::model_url_var(&a.name),
                a.router_url.clone(),
            );
        }
    }
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let named = w
        .endpoints
        .iter()
        .flat_map(|e| [url_host(&e.url), e.node.clone()])
        .chain(w.attached.iter().map(|a| url_host(&a.url)));
    for host in named {
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    env.insert(ev::NO_PROXY.into(), hosts.join(","));
    env.insert(ev::NO_PROXY_LOWER.into(), hosts.join(","));
    if uses_ray {
        env.insert(ev::RAY_ADDRESS.into(), x.gcs(j));
        if s.auth {
            env.insert(ev::RAY_AUTH_MODE.into(), "token".into());
            env.insert(ev::RAY_AUTH_TOKEN_PATH.into(), x.token_file());
        } else {
            env.insert(ev::RAY_AUTH_MODE.into(), "disabled".into());
        }
    }
    let mut cmd = x.command(j, Kind::Client, s.client.clone(), env, Lifecycle::client());
    if s.auth {
        cmd.secret_env
            .insert(ev::OPENAI_API_KEY.into(), Secret::ApiKey);
    }
    cmd
}

/// The router on the master: `ray-launch route` over every replica's engine (and, by model
/// name, over several models and the attached endpoints).
fn router_command(j: &Job<'_>, x: &Slot<'_>, r: &RouterPlan, w: &Whole<'_>) -> Command {
    let (s, c) = (j.s, j.c);
    let mut argv = vec![
        LAUNCHER.to_string(),
        "route".into(),
        "--listen".into(),
        r.listen.clone(),
    ];
    let base = |e: &EndpointUrl| e.internal.clone();
    if w.by_name {
        for m in w.models {
            argv.push("--model".into());
            argv.push(format!("{}={}", m.name, m.served_model_name));
        }
        // in the job's replica order: the router's replica N is the endpoint file's
        for e in w.endpoints {
            argv.push("--replica".into());
            argv.push(format!("{}={}", e.model, base(e)));
        }
        for a in w.attached {
            argv.push("--attach".into());
            argv.push(format!("{}={}", a.name, a.url.trim_end_matches('/')));
            if let Some(f) = &a.api_key_file {
                argv.push("--attach-key".into());
                argv.push(format!("{}={f}", a.name));
            }
        }
    } else {
        for e in w.endpoints {
            argv.push("--replica".into());
            argv.push(base(e));
        }
    }
    let max_body = match c.router.max_body {
        crate::input::config::Size::Bytes(b) => b,
        crate::input::config::Size::Auto => 32 << 20,
    };
    argv.extend([
        "--health-interval".into(),
        humantime::format_duration(s.health.interval.min(std::time::Duration::from_secs(1)))
            .to_string(),
        "--health-failures".into(),
        s.health.failures.to_string(),
        "--health-timeout".into(),
        humantime::format_duration(
            w.models
                .iter()
                .map(|m| lifecycle::probe_timeout(m.engine))
                .max()
                .unwrap_or(std::time::Duration::from_secs(5)),
        )
        .to_string(),
        "--max-body".into(),
        max_body.to_string(),
        "--request-timeout".into(),
        humantime::format_duration(c.router.request_timeout.0).to_string(),
        "--policy".into(),
        c.router.policy.as_str().into(),
        "--retries".into(),
        c.router.retries.to_string(),
        "--prefix-memory".into(),
        match c.router.prefix_memory {
            crate::input::config::Size::Bytes(b) => b,
            crate::input::config::Size::Auto => 4 << 20,
        }
        .to_string(),
        "--prefix-margin".into(),
        c.router.prefix_margin.to_string(),
        "--state-file".into(),
        s.endpoint_file.clone(),
    ]);
    let mut cmd = x.command(j, Kind::Router, argv, BTreeMap::new(), Lifecycle::router());
    if s.auth {
        cmd.secret_env.insert(
            crate::env_vars::RAY_LAUNCH_ROUTER_API_KEY.into(),
            Secret::ApiKey,
        );
    }
    cmd
}

/// vLLM's Ray executor copies the driver's environment to every worker: a value that differs
/// between a replica's nodes (its address, compile cache paths, a `{node}` in `env`, an
/// interface name) would be the head's everywhere. The head's engine gets those names for
/// vLLM's non-carry-over list, in a config root of its own.
fn keep_per_node_values(ranks: &mut [RankPlan], models: &[ModelPlan]) {
    for m in models
        .iter()
        .filter(|m| m.backend == Some(VllmBackend::Ray))
    {
        for rep in 0..m.replicas {
            let first = m.first_node + rep * m.nodes_per_replica;
            let nodes = first..first + m.nodes_per_replica;
            let envs: Vec<&BTreeMap<String, String>> = nodes
                .clone()
                .filter_map(|r| ranks[r].commands.iter().find(|c| c.kind.is_ray()))
                .map(|c| &c.env)
                .collect();
            let names: std::collections::BTreeSet<&String> =
                envs.iter().flat_map(|e| e.keys()).collect();
            let differ: Vec<String> = names
                .into_iter()
                .filter(|k| envs.iter().any(|e| e.get(*k) != envs[0].get(*k)))
                .cloned()
                .collect();
            if differ.is_empty() {
                continue;
            }
            let leader = &mut ranks[first];
            let root = format!("{}/vllm-config", leader.temp_dir);
            if let Some(engine) = leader.commands.iter_mut().find(|c| c.kind == Kind::Engine) {
                engine
                    .env
                    .entry(ev::VLLM_CONFIG_ROOT.into())
                    .or_insert(root);
                engine.non_carry_over = differ;
            }
        }
    }
}

/// The plan with the step's first candidate port block (a preview, or before the rendezvous).
pub fn build(s: &Settings, step: &Step, nodes: &[NodeInfo]) -> Result<Plan> {
    build_in(s, step, nodes, step_blocks(step, s.port_range)[0], None)
}

/// Which node ranks each model gets: entries in step order, `rest` taking what the others
/// leave; an error that says what each model asks for and what the step has.
fn share_nodes(specs: &[ModelSpec], nnodes: usize) -> Result<Vec<(usize, usize)>> {
    let counted: usize = specs
        .iter()
        .map(|m| match m.nodes {
            NodeShare::Count(n) => n as usize,
            NodeShare::Rest => 0,
        })
        .sum();
    let has_rest = specs.iter().any(|m| m.nodes == NodeShare::Rest);
    let fits = if has_rest {
        counted < nnodes
    } else {
        counted == nnodes
    };
    if !fits {
        let asks: Vec<String> = specs
            .iter()
            .map(|m| match m.nodes {
                NodeShare::Count(n) => format!("{} {n}", m.name),
                NodeShare::Rest => format!("{} the rest (at least 1)", m.name),
            })
            .collect();
        let need = counted + usize::from(has_rest);
        let fix = if has_rest {
            format!("run on at least {need} nodes (`#SBATCH --nodes={need}`), or give the models fewer nodes")
        } else {
            format!("run on {counted} nodes, or let one model take the rest (`nodes: rest`) of the step's {nnodes}")
        };
        return Err(Error::usage(format!(
            "the models ask for {} node(s) ({}) but the step has {nnodes}",
            if has_rest {
                format!("{need}+")
            } else {
                counted.to_string()
            },
            asks.join(", ")
        ))
        .hint(fix));
    }
    let mut out = Vec::new();
    let mut next = 0;
    for m in specs {
        let n = match m.nodes {
            NodeShare::Count(n) => n as usize,
            NodeShare::Rest => nnodes - counted,
        };
        out.push((next, n));
        next += n;
    }
    Ok(out)
}

/// Each model's layout on its share of the nodes; a model that does not fit is named.
fn layouts(s: &Settings, shares: &[(usize, usize)], nodes: &[NodeInfo]) -> Result<Vec<Layout>> {
    let specs = &s.models;
    let nnodes = nodes.len();
    let several = specs.len() > 1;
    let mut layouts = Vec::new();
    for (m, &(first, n)) in specs.iter().zip(shares) {
        let l = layout(s, m, n).map_err(|mut e| {
            if several {
                let names: Vec<String> = nodes[first..first + n]
                    .iter()
                    .map(|x| x.name.clone())
                    .collect();
                e.msg = format!(
                    "model `{}` gets {n} of the step's {nnodes} node(s) ({}): {}",
                    m.name,
                    names.join(","),
                    e.msg
                        .replace(&format!("the step has {n}"), &format!("it has {n}"))
                );
            }
            e
        })?;
        layouts.push(l);
    }
    Ok(layouts)
}

/// Each model's `min_healthy`, checked against its replicas.
fn min_healthy(c: &Config, specs: &[ModelSpec], layouts: &[Layout]) -> Result<Vec<usize>> {
    let mut min_healthy = Vec::new();
    for (m, l) in specs.iter().zip(layouts) {
        let min = match (m.named, m.min_healthy) {
            (_, Some(k)) => k as usize,
            (false, None) => c.replicas.min_healthy as usize,
            (true, None) => (c.replicas.min_healthy as usize).min(l.replicas),
        };
        if min > l.replicas {
            let (key, of) = if m.named {
                (format!("models `{}`: min_healthy", m.name), "it has")
            } else {
                ("replicas.min_healthy".to_string(), "the step has")
            };
            return Err(Error::usage(format!(
                "{key} is {min} but {of} {} replica(s) of {} node(s)",
                l.replicas, l.npr
            ))
            .hint(format!(
                "lower it to at most {}, or give the model {} nodes",
                l.replicas,
                min * l.npr
            )));
        }
        min_healthy.push(min);
    }
    Ok(min_healthy)
}

/// The router: on the master's node, on the job's port.
fn router_plan(c: &Config, nodes: &[NodeInfo], ports: &Ports) -> RouterPlan {
    let wildcard = c.server.host == "0.0.0.0" || c.server.host == "::";
    let host = if wildcard {
        nodes[0].address.clone()
    } else {
        c.server.host.clone()
    };
    RouterPlan {
        node: nodes[0].name.clone(),
        url: format!(
            "http://{}:{}/v1",
            advertised(c, &nodes[0], &host),
            ports.engine_http
        ),
        listen: format!("{}:{}", c.server.host, ports.engine_http),
    }
}

/// Every rank's plan: its role and commands (and, on rank 0, the router and the client).
fn rank_plans(
    s: &Settings,
    jobs: &[(Job<'_>, bool, bool)],
    shares: &[(usize, usize)],
    nodes: &[NodeInfo],
    whole: &Whole<'_>,
) -> Result<Vec<RankPlan>> {
    let mut ranks = Vec::with_capacity(nodes.len());
    for (i, (job, alone, uses_ray)) in jobs.iter().enumerate() {
        for rank in job.first_node..job.first_node + shares[i].1 {
            let x = slot(job, nodes, rank, 0)?;
            let (role, mut commands) = if *alone {
                let mut v = Vec::new();
                for local in 0..job.per_node {
                    v.push(side_by_side_command(
                        job,
                        &slot(job, nodes, rank, local)?,
                        local,
                    ));
                }
                (Role::EngineLeader, v)
            } else if *uses_ray {
                ray_commands(job, &x)
            } else {
                let (role, cmd) = engine_command(job, &x);
                (role, vec![cmd])
            };
            if rank == 0 {
                if let Some(r) = &job.router {
                    commands.push(router_command(job, &x, r, whole));
                }
                if !s.client.is_empty() {
                    commands.push(client_command(job, &x, whole, *uses_ray));
                }
            }
            ranks.push(RankPlan {
                node: x.node.name.clone(),
                node_rank: rank,
                address: x.node.address.clone(),
                interface: x.node.interface.clone(),
                role,
                replica: x.replica,
                replica_rank: x.rr,
                leader: x.leader.name.clone(),
                ray_token_file: (*uses_ray && s.auth).then(|| x.token_file()),
                temp_dir: x.temp_dir,
                commands,
            });
        }
    }
    Ok(ranks)
}

/// The block's ports, with the channel's and the config's fixed ones.
fn job_ports(c: &Config, block: u16, channel: Option<u16>) -> Ports {
    let mut ports = Ports::for_block(block);
    if let Some(ch) = channel {
        ports.channel = ch;
    }
    if let Auto::Value(p) = c.ray.port {
        ports.ray_gcs = p;
    }
    if let Auto::Value(p) = c.server.port {
        ports.engine_http = p;
    }
    ports
}

/// Each layout's warnings, named by model when there are several.
fn warnings(models: &[ModelPlan], layouts: Vec<Layout>) -> Vec<String> {
    let several = models.len() > 1;
    let mut out = Vec::new();
    for (m, l) in models.iter().zip(layouts) {
        for w in l.warnings {
            out.push(if several {
                format!("model `{}`: {w}", m.name)
            } else {
                w
            });
        }
    }
    out
}

/// The attached endpoints, each with the router's URL for it alone.
fn attached(c: &Config, own_url: &dyn Fn(&str) -> Option<String>) -> Vec<AttachSpec> {
    c.attach
        .iter()
        .map(|a| AttachSpec {
            name: a.name.clone(),
            url: a.url.trim_end_matches('/').to_string(),
            api_key_file: a.api_key_file.clone(),
            router_url: own_url(&a.name).unwrap_or_default(),
        })
        .collect()
}

/// A model's plan, but where its nodes and replicas start, its policy and its URL.
fn model_plan(m: &ModelSpec, l: &Layout, uses_ray: bool) -> ModelPlan {
    ModelPlan {
        name: m.name.clone(),
        engine: m.engine,
        // replicas side by side on a node run vLLM's own mp backend
        backend: (m.engine == Engine::Vllm).then_some(if uses_ray {
            VllmBackend::Ray
        } else {
            VllmBackend::Mp
        }),
        model: m.model.clone(),
        served_model_name: m.served().to_string(),
        first_node: 0,
        nodes: 0,
        nodes_per_replica: l.npr,
        replicas_per_node: l.per_node,
        first_replica: 0,
        replicas: l.replicas,
        required: m.required,
        min_healthy: 0,
        url: String::new(),
    }
}

/// What every model's part of the plan shares.
struct Common<'a> {
    s: &'a Settings,
    step: &'a Step,
    ports: Ports,
    router: Option<RouterPlan>,
    /// The port each replica's engine serves on.
    serve_port: u16,
    /// Requests go by model name (`models:` or `attach:`).
    by_name: bool,
}

impl Common<'_> {
    /// The router's URL for one model alone: `http://HOST:PORT/models/NAME/v1`.
    fn own_url(&self, name: &str) -> Option<String> {
        self.router
            .as_ref()
            .map(|r| format!("{}/models/{name}/v1", r.url.trim_end_matches("/v1")))
    }
}

/// One model's part of the plan: the job its nodes' commands come from, its [`ModelPlan`],
/// whether each replica runs alone (no Ray, no rendezvous) and whether it uses Ray.
fn model_part<'a>(
    co: &Common<'a>,
    m: &'a ModelSpec,
    l: &Layout,
    (first_node, n): (usize, usize),
    first_replica: usize,
    nodes: &[NodeInfo],
    min_healthy: usize,
) -> (Job<'a>, ModelPlan, bool, bool) {
    let c = &co.s.config;
    let own = &nodes[first_node..first_node + n];
    let eps = endpoints(
        c,
        m,
        own,
        l,
        co.serve_port,
        first_replica,
        co.s.gpus_per_node as usize,
    );
    // A replica of one node needs neither Ray nor a rendezvous: with several replicas, each
    // one-node replica is its engine alone (and so are replicas side by side on a node).
    let alone = l.per_node > 1 || (l.npr == 1 && l.replicas > 1);
    let uses_ray = m.engine == Engine::Vllm && c.vllm.backend == VllmBackend::Ray && !alone;
    let url = match (&co.router, co.by_name) {
        (Some(_), true) => co.own_url(&m.name).unwrap_or_default(),
        (Some(r), false) => r.url.clone(),
        (None, _) => eps[0].url.clone(),
    };
    let model = ModelPlan {
        first_node,
        nodes: n,
        first_replica,
        min_healthy,
        url,
        ..model_plan(m, l, uses_ray)
    };
    let job = Job {
        s: co.s,
        c,
        m,
        step: co.step,
        ports: co.ports,
        npr: l.npr,
        first_node,
        first_replica,
        endpoints: eps,
        router: co.router.clone(),
        serve_port: co.serve_port,
        per_node: l.per_node,
    };
    (job, model, alone, uses_ray)
}

/// The plan with the port block the master chose (`block`) and the channel port it listens
/// on (`channel`, when it differs from the block's own).
pub fn build_in(
    s: &Settings,
    step: &Step,
    nodes: &[NodeInfo],
    block: u16,
    channel: Option<u16>,
) -> Result<Plan> {
    let c = &s.config;
    assert_eq!(step.nodes.len(), nodes.len(), "one NodeInfo per node");
    let nnodes = nodes.len();
    let specs = &s.models;
    let shares = share_nodes(specs, nnodes)?;
    let layouts = layouts(s, &shares, nodes)?;
    let replicas: usize = layouts.iter().map(|l| l.replicas).sum();
    let ports = job_ports(c, block, channel);
    // with `models:` or `attach:`, requests go by model name
    let by_name = c.routes_by_name();
    let routed = c.router.enabled.unwrap_or(replicas > 1 || by_name);
    let min_healthy = min_healthy(c, specs, &layouts)?;
    let serve_port = if routed {
        ports.replica_http
    } else {
        ports.engine_http
    };
    let common = Common {
        s,
        step,
        ports,
        router: routed.then(|| router_plan(c, nodes, &ports)),
        serve_port,
        by_name,
    };
    let mut jobs = Vec::new();
    let mut models = Vec::new();
    let mut all_endpoints = Vec::new();
    let mut first_replica = 0;
    for (i, (m, l)) in specs.iter().zip(&layouts).enumerate() {
        let (job, model, alone, uses_ray) = model_part(
            &common,
            m,
            l,
            shares[i],
            first_replica,
            nodes,
            min_healthy[i],
        );
        all_endpoints.extend(job.endpoints.iter().cloned());
        models.push(model);
        jobs.push((job, alone, uses_ray));
        first_replica += l.replicas;
    }
    let router = common.router.clone();
    let own_url = |name: &str| common.own_url(name);
    let attached = attached(c, &own_url);
    let whole = Whole {
        endpoints: &all_endpoints,
        models: &models,
        attached: &attached,
        by_name,
    };
    let mut ranks = rank_plans(s, &jobs, &shares, nodes, &whole)?;
    keep_per_node_values(&mut ranks, &models);
    let first = &models[0];
    let warnings = warnings(&models, layouts);
    Ok(Plan {
        schema: SCHEMA,
        job_id: step.job_id.clone(),
        engine: first.engine,
        backend: first.backend,
        model: first.model.clone(),
        served_model_name: first.served_model_name.clone(),
        nodes: nnodes,
        nodes_per_replica: first.nodes_per_replica,
        replicas_per_node: first.replicas_per_node,
        replicas,
        warnings,
        gpus_per_node: s.gpus_per_node,
        gpus_from: s.gpus_from.clone(),
        master: NodeRef {
            node: nodes[0].name.clone(),
            address: nodes[0].address.clone(),
        },
        channel: Channel {
            address: nodes[0].address.clone(),
            port: ports.channel,
        },
        self_rank: step.self_rank.map(|r| SelfRef {
            node: nodes[r].name.clone(),
            node_rank: r,
        }),
        ports,
        endpoints: all_endpoints,
        router,
        models,
        attached,
        ranks,
    })
}

pub use render::render_text;
