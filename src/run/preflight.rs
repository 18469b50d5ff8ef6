//! The pre-flight check of a node, before anything starts: the step's GPUs are not held by
//! other processes (`nvidia-smi --query-compute-apps`, where present), the interface chosen
//! for NCCL/Gloo exists and is up, and the temp dir's filesystem has room. Each rank runs it
//! and reports what it found in its hello; the master decides (any finding stops the job,
//! exit 6, naming the node). `ray-launch check` runs the same on its node.
//!
//! A GPU held by the user's own orphan of an earlier ray-launch job (it carries some
//! launcher's `RAY_LAUNCH_PROC` tag) is freed here, with a log line; anything else holding
//! one (another user's process, or the user's own that ray-launch did not start) is not this
//! job's to stop: it is reported.

use crate::run::proc;
use std::path::Path;
use std::time::Duration;

/// What the node must have free in the temp dir's filesystem (compile caches, Ray's files).
pub const MIN_TEMP_FREE: u64 = 512 << 20;

/// One process on a GPU, as `nvidia-smi --query-compute-apps` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuApp {
    pub gpu_uuid: String,
    pub pid: i32,
    pub used_mib: u64,
}

/// Parse `nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits`.
pub fn parse_apps(csv: &str) -> Vec<GpuApp> {
    csv.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            Some(GpuApp {
                gpu_uuid: f.first()?.to_string(),
                pid: f.get(1)?.parse().ok()?,
                used_mib: f.get(2).and_then(|m| m.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// Parse `nvidia-smi --query-gpu=index,uuid --format=csv,noheader`: (index, uuid).
pub fn parse_gpus(csv: &str) -> Vec<(String, String)> {
    csv.lines()
        .filter_map(|l| {
            let (i, u) = l.split_once(',')?;
            Some((i.trim().to_string(), u.trim().to_string()))
        })
        .collect()
}

/// Whether GPU `index`/`uuid` is one of this step's (`CUDA_VISIBLE_DEVICES` lists indices or
/// UUIDs; unset: every GPU of the node).
pub fn in_step(visible: Option<&str>, index: &str, uuid: &str) -> bool {
    match visible.map(str::trim) {
        None | Some("") => true,
        Some(v) => v
            .split(',')
            .map(str::trim)
            .any(|d| d == index || d == uuid || (d.starts_with("GPU-") && uuid.starts_with(d))),
    }
}

async fn run(argv: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        _ => None,
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// The uid that runs `pid`, if this node can see it.
fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

/// The GPUs of this step held by other processes: each described; the user's own orphans
/// of an earlier ray-launch job are stopped instead (and logged).
pub async fn gpus(visible: Option<&str>) -> Vec<String> {
    if !on_path("nvidia-smi") {
        return Vec::new();
    }
    let (Some(gpus), Some(apps)) = (
        run(&[
            "nvidia-smi",
            "--query-gpu=index,uuid",
            "--format=csv,noheader",
        ])
        .await,
        run(&[
            "nvidia-smi",
            "--query-compute-apps=gpu_uuid,pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .await,
    ) else {
        return vec![
            "nvidia-smi is on the PATH but did not answer within 10s (is the driver loaded?)"
                .into(),
        ];
    };
    let gpus = parse_gpus(&gpus);
    let me = nix::unistd::getuid().as_raw();
    let mut found = Vec::new();
    let mut orphans = Vec::new();
    for app in parse_apps(&apps) {
        let Some((index, _)) = gpus.iter().find(|(_, u)| *u == app.gpu_uuid) else {
            continue;
        };
        if !in_step(visible, index, &app.gpu_uuid) {
            continue;
        }
        let uid = uid_of(app.pid);
        if uid == Some(me) && proc::own_tag(app.pid).is_some() {
            if let Some(p) = proc::stat(app.pid) {
                tracing::warn!(
                    "GPU {index} is held by {} ({} MiB), an orphan of an earlier ray-launch job of yours: stopping it",
                    proc::describe_pid(app.pid),
                    app.used_mib
                );
                orphans.push(p);
            }
            continue;
        }
        let who = uid.map_or_else(|| "a user this node does not show".to_string(), user_name);
        found.push(format!(
            "GPU {index} is held by {} of {who} ({} MiB)",
            proc::describe_pid(app.pid),
            app.used_mib
        ));
    }
    if !orphans.is_empty() {
        let left =
            tokio::task::spawn_blocking(move || proc::stop_all(&orphans, Duration::from_secs(1)))
                .await
                .unwrap_or_default();
        found.extend(
            left.into_iter()
                .map(|l| format!("an orphan of an earlier job survived SIGKILL: {l}")),
        );
    }
    found
}

/// The interface NCCL/Gloo use is there and up (`/sys/class/net/IF/operstate`: `up`, or
/// `unknown` as loopback and some virtual links say).
pub fn interface(name: &str) -> Option<String> {
    let state = std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"));
    match state.as_deref().map(str::trim) {
        Ok("up") | Ok("unknown") => None,
        Ok(s) => Some(format!("interface {name} (for NCCL/Gloo) is {s}, not up")),
        Err(_) => Some(format!(
            "interface {name} (for NCCL/Gloo) does not exist on this node"
        )),
    }
}

/// The temp dir's filesystem (its nearest existing ancestor) has `MIN_TEMP_FREE` free.
pub fn temp_room(dir: &str) -> Option<String> {
    let mut p = Path::new(dir);
    while !p.exists() {
        p = p.parent()?;
    }
    let s = nix::sys::statvfs::statvfs(p).ok()?;
    let free = s.blocks_available() as u64 * s.fragment_size() as u64;
    (free < MIN_TEMP_FREE).then(|| {
        format!(
            "the temp dir's filesystem ({}) has {} MiB free, less than {} MiB",
            p.display(),
            free >> 20,
            MIN_TEMP_FREE >> 20
        )
    })
}

/// Everything above for this node: what stops the job (empty: the node is fit).
pub async fn node(
    visible: Option<&str>,
    interface_name: Option<&str>,
    temp_dir: &str,
) -> Vec<String> {
    let mut out = gpus(visible).await;
    out.extend(interface_name.and_then(interface));
    out.extend(temp_room(temp_dir));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smis_lists_are_read() {
        let apps = parse_apps("GPU-aaaa, 4242, 8192\nGPU-bbbb, 77, 125000\n\ngarbage\n");
        assert_eq!(
            apps,
            [
                GpuApp {
                    gpu_uuid: "GPU-aaaa".into(),
                    pid: 4242,
                    used_mib: 8192
                },
                GpuApp {
                    gpu_uuid: "GPU-bbbb".into(),
                    pid: 77,
                    used_mib: 125000
                },
            ]
        );
        assert_eq!(
            parse_gpus("0, GPU-aaaa\n1, GPU-bbbb\n"),
            [
                ("0".to_string(), "GPU-aaaa".to_string()),
                ("1".into(), "GPU-bbbb".into())
            ]
        );
        assert!(in_step(None, "3", "GPU-x"));
        assert!(in_step(Some("0,3"), "3", "GPU-x"));
        assert!(!in_step(Some("0,1"), "3", "GPU-x"));
        assert!(in_step(Some("GPU-ab"), "7", "GPU-abcd-1234"));
    }

    #[test]
    fn a_missing_interface_and_a_full_disk_are_named() {
        assert!(interface("lo").is_none());
        assert!(interface("no-such-if0").unwrap().contains("does not exist"));
        assert!(temp_room("/tmp/rl-does-not-exist-yet/x").is_none());
    }
}
