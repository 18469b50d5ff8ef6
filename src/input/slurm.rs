//! The Slurm step this task belongs to, read through a lookup function (tests pass maps).
//!
//! Election rule: the master is the node with `SLURM_NODEID=0`, i.e. the first host of the
//! expanded `SLURM_STEP_NODELIST`. That is right under `srun -r`, `-w` in any order (Slurm
//! sorts it), steps smaller than the job, and natural node order (node9 before node10),
//! because Slurm itself numbers the step's nodes in that list's order. It never uses
//! `SLURM_JOB_NODELIST` (the whole job), `SLURM_SRUN_COMM_HOST` (the login node) or an IP
//! match with `gethostname()` (127.0.1.1 on many systems). Under `srun -m arbitrary` the task
//! with `SLURM_PROCID=0` may run on NODEID 1: ray-launch still elects NODEID 0; PROCID plays
//! no part.

use crate::env_vars as ev;
use crate::error::{Error, Result};
use crate::input::hostlist;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// Inside an `srun` task.
    Srun,
    /// No Slurm variables: a single-node job on this machine.
    Local,
    /// `ray-launch plan --nodelist`: a simulated step, this process is none of its nodes.
    Preview,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    pub job_id: String,
    /// `SLURM_STEP_ID` (`0` for a local run or a preview).
    pub step_id: String,
    /// The step's nodes in NODEID order.
    pub nodes: Vec<String>,
    /// This task's NODEID; `None` in a preview.
    pub self_rank: Option<usize>,
    /// Per-node facts Slurm gives this task (assumed equal on every node of the step).
    pub gpus_on_node: Option<u32>,
    pub cuda_visible_devices: Option<String>,
    pub cpus_on_node: Option<u32>,
    pub mem_per_node_mb: Option<u64>,
    /// `SLURM_STEP_RESV_PORTS` as Slurm wrote it (`12000-12255`), when srun reserved ports.
    pub resv_ports: Option<String>,
    /// A local run's GPUs from the machine (the drivers' lists), and where they were read.
    /// Never used under Slurm: there a step may use only the GPUs Slurm gave it.
    pub machine_gpus: Option<(u32, String)>,
}

/// Expand Slurm's `N(xR)` lists: `2(x3),1` → [2, 2, 2, 1].
pub fn parse_counts(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((n, rep)) = part.split_once("(x") {
            let rep = rep.strip_suffix(')')?;
            let n: u32 = n.parse().ok()?;
            let r: usize = rep.parse().ok()?;
            if r > hostlist::MAX_HOSTS {
                return None;
            }
            out.extend(std::iter::repeat_n(n, r));
        } else {
            out.push(part.parse().ok()?);
        }
    }
    Some(out)
}

/// How many GPUs `CUDA_VISIBLE_DEVICES` lists (`NoDevFiles` and empty = 0).
pub fn count_visible_devices(v: &str) -> u32 {
    let v = v.trim();
    if v.is_empty() || v == "NoDevFiles" || v == "-1" {
        return 0;
    }
    v.split(',').filter(|s| !s.trim().is_empty()).count() as u32
}

fn env_error(msg: impl Into<String>, hint: impl Into<String>) -> Error {
    Error::usage(msg).hint(hint)
}

/// A whole-number variable, if set.
fn num(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<u64>> {
    match get(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
            env_error(
                format!("{name}=`{v}` is not a whole number"),
                format!("unset {name} or fix it; inside srun, Slurm sets it for you"),
            )
        }),
    }
}

/// One task per node is the contract.
fn one_task_per_node(get: &dyn Fn(&str) -> Option<String>, nodes: &[String]) -> Result<()> {
    let num = |name: &str| num(get, name);
    // Check it from variables every rank sees alike, so
    // every rank raises the same error.
    let tasks = get(ev::SLURM_STEP_TASKS_PER_NODE).or_else(|| get(ev::SLURM_TASKS_PER_NODE));
    let ntasks = num(ev::SLURM_NTASKS)?;
    let mut many: Option<(usize, u32)> = None;
    if let Some(t) = &tasks {
        let counts = parse_counts(t).ok_or_else(|| {
            env_error(
                format!("SLURM_STEP_TASKS_PER_NODE=`{t}` cannot be read"),
                "expected Slurm's `N(xR),M` form",
            )
        })?;
        many = counts
            .iter()
            .enumerate()
            .find(|(_, c)| **c != 1)
            .map(|(i, c)| (i, *c));
    }
    if many.is_some() || ntasks.is_some_and(|n| n as usize != nodes.len()) {
        let detail = match many {
            Some((i, c)) => format!(
                "{c} tasks on node {}",
                nodes.get(i).map_or("?", |s| s.as_str())
            ),
            None => format!("{} tasks on {} nodes", ntasks.unwrap_or(0), nodes.len()),
        };
        return Err(env_error(
            format!("this step runs {detail}; ray-launch needs exactly one task per node (SLURM_STEP_TASKS_PER_NODE={})", tasks.as_deref().unwrap_or("?")),
            "launch it with `srun --ntasks-per-node=1 ray-launch ...` (an sbatch `--ntasks-per-node` is inherited by srun)",
        ));
    }
    Ok(())
}

/// `SLURM_JOB_ID` is a job id (it names files and ports).
fn job_id_ok(job_id: &str) -> Result<()> {
    if job_id.trim().is_empty()
        || job_id.len() > 64
        || !job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(env_error(
            format!("SLURM_JOB_ID=`{job_id}` is not a job id"),
            "run under Slurm, or unset SLURM_JOB_ID for a local run",
        ));
    }
    Ok(())
}

/// `SLURM_STEP_ID` is a step id.
fn step_id_ok(step_id: &str) -> Result<()> {
    if step_id.is_empty()
        || step_id.len() > 32
        || !step_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(env_error(
            format!("SLURM_STEP_ID=`{step_id}` is not a step id"),
            "this variable comes from srun: do not set it by hand",
        ));
    }
    Ok(())
}

/// The step's nodes from `SLURM_STEP_NODELIST`, as many as `SLURM_NNODES` says.
fn step_nodes_of(get: &dyn Fn(&str) -> Option<String>, step_nodes: &str) -> Result<Vec<String>> {
    let num = |name: &str| num(get, name);
    let nodes = hostlist::expand(step_nodes).map_err(|e| {
        env_error(
            format!("SLURM_STEP_NODELIST: {e}"),
            "this variable comes from Slurm; if you set it by hand, use hostlist syntax like `node[01-04]`",
        )
    })?;
    if nodes.is_empty() {
        return Err(env_error(
            "SLURM_STEP_NODELIST is empty",
            "run inside an srun step",
        ));
    }
    let nnodes = num(ev::SLURM_NNODES)?;
    if let Some(n) = nnodes {
        if n as usize != nodes.len() {
            return Err(env_error(
                format!(
                    "SLURM_NNODES={n} but SLURM_STEP_NODELIST=`{step_nodes}` has {} nodes",
                    nodes.len()
                ),
                "do not override Slurm's step variables",
            ));
        }
    }
    Ok(nodes)
}

/// This task's place in the step (`SLURM_NODEID`), checked against `SLURMD_NODENAME`.
fn node_rank(
    get: &dyn Fn(&str) -> Option<String>,
    nodes: &[String],
    step_nodes: &str,
) -> Result<usize> {
    let num = |name: &str| num(get, name);
    let node_id = num(ev::SLURM_NODEID)?.ok_or_else(|| {
        env_error(
            "SLURM_NODEID is not set inside an srun step",
            "run ray-launch as an srun task, not through a wrapper that clears the environment",
        )
    })? as usize;
    if node_id >= nodes.len() {
        return Err(env_error(
            format!(
                "SLURM_NODEID={node_id} is outside the step's {} nodes",
                nodes.len()
            ),
            "do not override Slurm's step variables",
        ));
    }
    if let Some(name) = get(ev::SLURMD_NODENAME) {
        if !name.is_empty() && name != nodes[node_id] {
            return Err(env_error(
                format!(
                    "SLURMD_NODENAME=`{name}` but SLURM_NODEID={node_id} is `{}` in SLURM_STEP_NODELIST=`{step_nodes}`",
                    nodes[node_id]
                ),
                "the step's variables disagree: were they copied from another task's environment?",
            ));
        }
    }
    Ok(node_id)
}

/// Read the step. `local_name` is this machine's host name, used for the local default.
pub fn detect(get: &dyn Fn(&str) -> Option<String>, local_name: &str) -> Result<Step> {
    let job_id = get(ev::SLURM_JOB_ID).or_else(|| get(ev::SLURM_JOBID));
    let step_id = get(ev::SLURM_STEP_ID);
    let step_nodes = get(ev::SLURM_STEP_NODELIST);
    let num = |name: &str| num(get, name);
    let gpus_on_node = num(ev::SLURM_GPUS_ON_NODE)?.map(|g| g as u32);
    let cpus_on_node = num(ev::SLURM_CPUS_ON_NODE)?.map(|g| g as u32);
    let mem_per_node_mb = num(ev::SLURM_MEM_PER_NODE)?;
    let cuda_visible_devices = get(ev::CUDA_VISIBLE_DEVICES);
    let resv_ports = get(ev::SLURM_STEP_RESV_PORTS).filter(|v| !v.trim().is_empty());

    let Some(job_id) = job_id else {
        return Ok(Step {
            kind: StepKind::Local,
            job_id: format!("local-{}", std::process::id()),
            step_id: "0".into(),
            nodes: vec![local_name.to_string()],
            self_rank: Some(0),
            gpus_on_node,
            cuda_visible_devices,
            cpus_on_node,
            mem_per_node_mb,
            resv_ports: None,
            machine_gpus: None,
        });
    };
    job_id_ok(&job_id)?;
    let (Some(step_id), Some(step_nodes)) = (step_id, step_nodes) else {
        return Err(env_error(
            format!("not launched by srun: job {job_id} has no step here (SLURM_STEP_ID/SLURM_STEP_NODELIST unset), so only this one node would run"),
            "start it with `srun --ntasks-per-node=1 ray-launch ...` inside the batch script",
        ));
    };
    let step_id = step_id.trim().to_string();
    step_id_ok(&step_id)?;
    let nodes = step_nodes_of(get, &step_nodes)?;
    one_task_per_node(get, &nodes)?;
    let node_id = node_rank(get, &nodes, &step_nodes)?;
    Ok(Step {
        kind: StepKind::Srun,
        job_id,
        step_id,
        nodes,
        self_rank: Some(node_id),
        gpus_on_node,
        cuda_visible_devices,
        cpus_on_node,
        mem_per_node_mb,
        resv_ports,
        machine_gpus: None,
    })
}

impl Step {
    /// A simulated step over `nodes` (for `plan --nodelist`).
    pub fn preview(nodes: Vec<String>, job_id: String) -> Step {
        Step {
            kind: StepKind::Preview,
            job_id,
            step_id: "0".into(),
            nodes,
            self_rank: None,
            gpus_on_node: None,
            cuda_visible_devices: None,
            cpus_on_node: None,
            mem_per_node_mb: None,
            resv_ports: None,
            machine_gpus: None,
        }
    }

    /// GPUs this node has, from Slurm's view: `SLURM_GPUS_ON_NODE`, else `CUDA_VISIBLE_DEVICES`.
    pub fn detected_gpus(&self) -> Option<u32> {
        self.detected_gpus_from().map(|(n, _)| n)
    }

    /// The GPUs per node for `gpus_per_node: auto`, and where the number came from: Slurm's
    /// `SLURM_GPUS_ON_NODE`, else `CUDA_VISIBLE_DEVICES` (what the process may use), else, in
    /// a local run, the machine's own list.
    pub fn detected_gpus_from(&self) -> Option<(u32, String)> {
        if let Some(n) = self.gpus_on_node {
            return Some((n, "SLURM_GPUS_ON_NODE".into()));
        }
        if let Some(v) = self.cuda_visible_devices.as_deref() {
            return Some((count_visible_devices(v), "CUDA_VISIBLE_DEVICES".into()));
        }
        self.machine_gpus
            .clone()
            .filter(|_| self.kind == StepKind::Local)
    }

    pub fn master(&self) -> &str {
        &self.nodes[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(parse_counts("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(parse_counts("1(x4)"), Some(vec![1, 1, 1, 1]));
        assert_eq!(parse_counts("1"), Some(vec![1]));
        assert_eq!(parse_counts("x"), None);
    }

    #[test]
    fn visible_devices() {
        assert_eq!(count_visible_devices("0,1,2,3"), 4);
        assert_eq!(count_visible_devices("GPU-aa,GPU-bb"), 2);
        assert_eq!(count_visible_devices("NoDevFiles"), 0);
        assert_eq!(count_visible_devices(""), 0);
    }
}
