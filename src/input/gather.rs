//! The facts a command needs, gathered once from the process environment and this machine:
//! the config, the step, this host's facts and the nodes' [`NodeInfo`]. Free of clap types:
//! the CLI says what it wants in a [`Request`].
//!
//! At run time a rank resolves only the names it needs (its own and the master's); a preview
//! (`ray-launch plan`) resolves every node's name, a few at a time.

use crate::env_vars as ev;
use crate::error::{Error, Result};
use crate::input::config;
use crate::input::host::{self, HostFacts};
use crate::input::hostlist;
use crate::input::settings::{self, Overrides, Settings};
use crate::input::slurm::{self, Step};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the plan needs to know about each node. In a preview every node gets this node's
/// facts; at run time each rank reports its own during the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// IP address as text, or the node's name when it could not be resolved (preview only).
    pub address: String,
    pub interface: Option<String>,
    pub cpus: u32,
    pub object_store_bytes: u64,
}

/// Which node names to resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Every node of the step (a preview shows each node's address).
    All,
    /// Only this node and the master (what `run` needs; the others report their own).
    Needed,
}

/// What a subcommand asks for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub config: Option<&'a Path>,
    pub overrides: Overrides,
    /// Simulate a step over these nodes instead of reading Slurm's variables.
    pub nodelist: Option<&'a str>,
    pub job_id: Option<&'a str>,
    pub client: Vec<String>,
    pub resolve: Resolve,
}

/// Everything the pure core needs, gathered from the process environment and the machine.
pub struct Gathered {
    pub settings: Settings,
    pub step: Step,
    pub facts: HostFacts,
    /// One per node in node-rank order: this node's own facts; the others assumed alike, with
    /// the address their name resolves to (or the name itself when it was not resolved).
    pub nodes: Vec<NodeInfo>,
}

pub fn load_config(path: Option<&Path>) -> Result<config::Loaded> {
    let path = path.ok_or_else(|| {
        Error::usage("no config given").hint(format!(
            "pass --config FILE (or set {}); examples are in configs/",
            ev::RAY_LAUNCH_CONFIG
        ))
    })?;
    config::load(path)
}

/// This node's NodeInfo from its own facts (address chosen by the config's network rule).
pub fn self_info(
    s: &Settings,
    step: &Step,
    name: &str,
    facts: &HostFacts,
    resolved: Option<std::net::IpAddr>,
) -> Result<NodeInfo> {
    let (ip, ifname) = host::choose_address(&s.config.network, facts, resolved)?;
    Ok(NodeInfo {
        address: ip.to_string(),
        interface: Some(ifname),
        ..local_info(s, step, name, facts)
    })
}

/// What this machine's facts say about a node, before its address is known.
fn local_info(s: &Settings, step: &Step, name: &str, facts: &HostFacts) -> NodeInfo {
    NodeInfo {
        name: name.to_string(),
        address: String::new(),
        interface: s.config.network.interface.clone(),
        cpus: step.cpus_on_node.unwrap_or(facts.cpus),
        object_store_bytes: match s.config.ray.object_store_memory {
            config::Size::Bytes(b) => b,
            config::Size::Auto => host::auto_object_store(facts, step.mem_per_node_mb),
        },
    }
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

pub fn gather(req: Request<'_>) -> Result<Gathered> {
    let loaded = load_config(req.config)?;
    let facts = HostFacts::read();
    let step = match req.nodelist {
        Some(expr) => {
            let nodes = hostlist::expand(expr)?;
            if nodes.is_empty() {
                return Err(Error::usage("--nodelist is empty").hint("give nodes like `node[1-4]`"));
            }
            Step::preview(nodes, req.job_id.unwrap_or("0").to_string())
        }
        None => slurm::detect(&env_lookup, &facts.hostname)?,
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let settings = settings::resolve(&loaded, &req.overrides, &step, req.client, &cwd);
    let wanted: Vec<usize> = match req.resolve {
        Resolve::All => (0..step.nodes.len()).collect(),
        Resolve::Needed => {
            let mut v = vec![0];
            v.extend(step.self_rank.filter(|r| *r != 0));
            v
        }
    };
    let names: Vec<String> = wanted.iter().map(|i| step.nodes[*i].clone()).collect();
    let mut resolved = vec![None; step.nodes.len()];
    for (i, ip) in wanted
        .iter()
        .zip(host::resolve_all(&names, Duration::from_secs(2)))
    {
        resolved[*i] = ip;
    }
    let mine = match step.self_rank {
        Some(r) => Some(self_info(
            &settings,
            &step,
            &step.nodes[r],
            &facts,
            resolved[r],
        )?),
        None => None,
    };
    let mut nodes = Vec::with_capacity(step.nodes.len());
    for (i, name) in step.nodes.iter().enumerate() {
        if step.self_rank == Some(i) {
            nodes.push(mine.clone().expect("self info"));
            continue;
        }
        // Other nodes: assumed alike (same CPUs, memory, interface name); at run time each
        // rank reports its own facts during the rendezvous.
        let template = mine
            .clone()
            .unwrap_or_else(|| local_info(&settings, &step, name, &facts));
        nodes.push(NodeInfo {
            name: name.clone(),
            address: resolved[i].map_or_else(|| name.clone(), |ip| ip.to_string()),
            ..template
        });
    }
    Ok(Gathered {
        settings,
        step,
        facts,
        nodes,
    })
}
