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
    /// The node's GPUs as `CUDA_VISIBLE_DEVICES` lists them for the step (empty: 0, 1, …):
    /// replicas side by side on a node get slices of this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<String>,
    /// Which of `GLOO_SOCKET_IFNAME` and `NCCL_SOCKET_IFNAME` the site already set on this
    /// node (e.g. `NCCL_SOCKET_IFNAME=hsn`): kept unless `network.*` names an interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preset_ifname: Vec<String>,
    /// Whether `ray[client]` is installed next to this node's `ray` (then `ray start --head`
    /// binds 10001 for its client server unless told otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ray_client: bool,
}

/// How this rank proves it belongs to the job, and the user's own API key if any.
pub struct Security {
    pub method: crate::auth::Method,
    /// `server.api_key_file`'s content.
    pub user_api_key: Option<String>,
}

/// Decide the authentication method (`security.auth`) for a run, and read the user's API
/// key. Nothing is started before this succeeds. `munge_works` is the caller's probe of munge
/// (it runs `munge`: input/ starts no process itself).
pub fn security(s: &Settings, step: &Step, munge_works: &dyn Fn() -> bool) -> Result<Security> {
    use crate::auth::{self, Method};
    use config::AuthSetting;
    let c = &s.config;
    let secret = || -> Result<Option<Vec<u8>>> {
        if let Ok(v) = std::env::var(ev::RAY_LAUNCH_SECRET) {
            if v.trim().len() < 16 {
                return Err(Error::usage(format!(
                    "{} holds fewer than 16 characters",
                    ev::RAY_LAUNCH_SECRET
                ))
                .hint("use a long random value, e.g. `head -c 32 /dev/urandom | base64`"));
            }
            return Ok(Some(v.trim().as_bytes().to_vec()));
        }
        let path = std::env::var_os(ev::RAY_LAUNCH_SECRET_FILE)
            .map(PathBuf::from)
            .or_else(auth::default_secret_file);
        match path {
            Some(p) if p.exists() => auth::read_secret_file(&p).map(Some).map_err(|e| {
                Error::usage(format!("the ray-launch secret file is unusable: {e}"))
                    .hint("keep it a 0600 file of yours holding at least 16 random bytes")
            }),
            _ => Ok(None),
        }
    };
    let local = step.kind != slurm::StepKind::Srun;
    let method = match c.security.auth {
        AuthSetting::Off => Method::Off,
        AuthSetting::Munge => {
            if !munge_works() {
                return Err(Error::usage("security.auth is munge, but `munge --no-input` fails here (no munge on PATH, or munged is not running)")
                    .hint("use `security.auth: secret` with a per-user secret file, or ask your admins whether the cluster uses munge"));
            }
            Method::Munge
        }
        AuthSetting::Secret => match secret()? {
            Some(k) => Method::Secret(k),
            None => return Err(secret_missing()),
        },
        AuthSetting::Auto if local => Method::Local(auth::random_bytes().to_vec()),
        AuthSetting::Auto => {
            if munge_works() {
                Method::Munge
            } else if let Some(k) = secret()? {
                Method::Secret(k)
            } else {
                return Err(secret_missing());
            }
        }
    };
    // a service's key: made by the first launcher of the chain, then the same for every job
    if let Some(svc) = &s.service {
        crate::service::Service::open(&svc.name, Some(&svc.dir))
            .and_then(|sv| sv.ensure_key())
            .map_err(|e| {
                Error::usage(format!("service `{}`: {e}", svc.name))
                    .hint("the service directory must be yours and 0700 (`chmod 700 DIR`), its key 0600; or give another `service.dir`")
            })?;
    }
    let user_api_key = match &c.server.api_key_file {
        None => None,
        Some(f) => {
            // the same rules as an attached server's key, and as long as a secret
            let key = auth::read_key_file(Path::new(f))
                .and_then(|k| {
                    if k.len() < 16 {
                        Err(format!("{f} holds {} bytes; a secret needs at least 16", k.len()))
                    } else {
                        Ok(k)
                    }
                })
                .map_err(|e| {
                    Error::usage(format!("server.api_key_file: {e}"))
                        .hint("keep only the key, printable and 16 characters or more, in a 0600 file of yours that every node can read")
                })?;
            Some(key)
        }
    };
    Ok(Security {
        method,
        user_api_key,
    })
}

fn secret_missing() -> Error {
    Error::usage("no way to authenticate this job's ranks: munge does not work here and there is no per-user secret")
        .hint("create one: `mkdir -p ~/.config/ray-launch && (umask 077; head -c 32 /dev/urandom | base64 > ~/.config/ray-launch/secret)`, or set RAY_LAUNCH_SECRET_FILE; `security.auth: off` turns authentication off")
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
        gpu_ids: step
            .cuda_visible_devices
            .as_deref()
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty() && *d != "NoDevFiles")
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        preset_ifname: [ev::GLOO_SOCKET_IFNAME, ev::NCCL_SOCKET_IFNAME]
            .into_iter()
            .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
            .map(str::to_string)
            .collect(),
        ray_client: has_ray_client(&s.config.ray.executable),
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
        None => {
            let mut step = slurm::detect(&env_lookup, &facts.hostname)?;
            step.machine_gpus = facts.gpus.clone();
            step
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut overrides = req.overrides.clone();
    if overrides.home.is_none() {
        overrides.home = std::env::var("HOME").ok().filter(|h| !h.is_empty());
    }
    let settings = settings::resolve(&loaded, &overrides, &step, req.client, &cwd);
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

/// Whether the Python that runs `ray` has `grpc` (what `ray[client]` adds, and what Ray
/// checks before it starts a client server): read from the files, nothing is run.
pub fn has_ray_client(ray: &str) -> bool {
    let exe = if ray.contains('/') {
        Some(std::path::PathBuf::from(ray))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(ray))
                .find(|c| c.is_file())
        })
    };
    let Some(exe) = exe else { return false };
    // its first line only, of a regular file: never read whole, never a FIFO or a device
    let text = {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&exe)
        else {
            return false;
        };
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return false;
        }
        let mut head = Vec::new();
        if f.take(512).read_to_end(&mut head).is_err() {
            return false;
        }
        head
    };
    let first = String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let Some(python) = first
        .strip_prefix("#!")
        .map(|p| p.split_whitespace().next().unwrap_or_default().to_string())
    else {
        return false;
    };
    // PREFIX/bin/python -> PREFIX/lib/python3.X/site-packages/grpc
    let Some(prefix) = Path::new(&python).parent().and_then(Path::parent) else {
        return false;
    };
    std::fs::read_dir(prefix.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| d.path().join("site-packages/grpc/__init__.py").is_file())
}

#[cfg(test)]
mod ray_client_tests {
    use super::*;

    #[test]
    fn ray_client_is_found_next_to_the_python_that_runs_ray() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let ray = bin.join("ray");
        std::fs::write(&ray, format!("#!{}/python\nimport ray\n", bin.display())).unwrap();
        assert!(!has_ray_client(ray.to_str().unwrap()), "no grpc yet");
        let grpc = d.path().join("lib/python3.11/site-packages/grpc");
        std::fs::create_dir_all(&grpc).unwrap();
        std::fs::write(grpc.join("__init__.py"), "").unwrap();
        assert!(has_ray_client(ray.to_str().unwrap()));
        assert!(!has_ray_client("/nonexistent/ray"));
    }
}
