//! Facts about this machine (interfaces, memory, CPUs), read once; and the pure rules that
//! turn them into an address and an object store size.

use crate::error::{Error, Result};
use crate::input::config::Network;
use std::net::IpAddr;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub hostname: String,
    /// (interface, IPv4 address) of every interface that is up, loopback included.
    pub interfaces: Vec<(String, IpAddr)>,
    pub cpus: u32,
    pub mem_available: Option<u64>,
    pub cgroup_limit: Option<u64>,
    pub shm_size: Option<u64>,
    /// The GPUs the machine has, and where that was read (see [`machine_gpus`]).
    pub gpus: Option<(u32, String)>,
}

impl HostFacts {
    pub fn read() -> HostFacts {
        let hostname = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut interfaces = Vec::new();
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let up = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
                if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                    if up {
                        interfaces.push((a.interface_name.clone(), IpAddr::V4(sin.ip())));
                    }
                }
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let mem_available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
        let cgroup_limit = [
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
        .filter(|v| *v < (1u64 << 60));
        let shm_size = nix::sys::statvfs::statvfs("/dev/shm")
            .ok()
            .map(|s| s.blocks() * s.fragment_size());
        HostFacts {
            hostname,
            interfaces,
            cpus,
            mem_available,
            cgroup_limit,
            shm_size,
            gpus: machine_gpus(std::path::Path::new("/")),
        }
    }
}

/// The GPUs this machine has, from the kernel's own lists under `root` (`/` but in tests):
/// NVIDIA's driver lists one directory per GPU in `/proc/driver/nvidia/gpus`; AMD's kfd one
/// topology node per device, GPUs with `simd_count` above 0. `None`: neither is there.
/// Reads files only (no `nvidia-smi`: input/ starts no process).
pub fn machine_gpus(root: &std::path::Path) -> Option<(u32, String)> {
    let nvidia = root.join("proc/driver/nvidia/gpus");
    if let Ok(d) = std::fs::read_dir(&nvidia) {
        let n = d.flatten().count() as u32;
        return Some((n, "/proc/driver/nvidia/gpus".into()));
    }
    let kfd = root.join("sys/class/kfd/kfd/topology/nodes");
    if let Ok(d) = std::fs::read_dir(&kfd) {
        let n = d
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("properties")).is_ok_and(|p| {
                    p.lines().any(|l| {
                        l.strip_prefix("simd_count ")
                            .is_some_and(|v| v.trim().parse::<u64>().is_ok_and(|v| v > 0))
                    })
                })
            })
            .count() as u32;
        return Some((n, "/sys/class/kfd (AMD)".into()));
    }
    None
}

/// Ray's own floor for the object store.
pub const MIN_OBJECT_STORE: u64 = 78_643_200;
const CAP_OBJECT_STORE: u64 = 200 << 30;

/// min(30 % of the memory the job may use, /dev/shm, 200 GiB), never below Ray's floor.
/// "Memory the job may use" = the smallest of the cgroup limit, `--mem`, and MemAvailable.
pub fn auto_object_store(f: &HostFacts, slurm_mem_mb: Option<u64>) -> u64 {
    let job_mem = [
        f.cgroup_limit,
        slurm_mem_mb.map(|m| m << 20),
        f.mem_available,
    ]
    .into_iter()
    .flatten()
    .min();
    let mut v = CAP_OBJECT_STORE;
    if let Some(m) = job_mem {
        v = v.min(m / 10 * 3);
    }
    if let Some(s) = f.shm_size {
        v = v.min(s);
    }
    v.max(MIN_OBJECT_STORE)
}

/// Pick this node's address and interface.
/// - `network.interface`: that interface's first IPv4 address.
/// - `network.cidr`: the first address inside that network.
/// - neither: the address the node's name resolves to when it is a non-loopback address of
///   this host (what Slurm and DNS agree on), else the first non-loopback IPv4 address,
///   else 127.0.0.1 (a single-node run).
pub fn choose_address(
    net: &Network,
    f: &HostFacts,
    resolved_self: Option<IpAddr>,
) -> Result<(IpAddr, String)> {
    let listing = || {
        f.interfaces
            .iter()
            .map(|(n, a)| format!("{n} {a}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(want) = &net.interface {
        return f
            .interfaces
            .iter()
            .find(|(n, _)| n == want)
            .map(|(n, a)| (*a, n.clone()))
            .ok_or_else(|| {
                Error::usage(format!(
                    "network.interface `{want}` has no IPv4 address on {} (up interfaces: {})",
                    f.hostname,
                    listing()
                ))
                .hint("set network.interface to one of those, or use network.cidr")
            });
    }
    if let Some(cidr) = &net.cidr {
        let netw: ipnet::IpNet = cidr
            .parse()
            .map_err(|_| Error::usage(format!("bad network.cidr `{cidr}`")))?;
        return f
            .interfaces
            .iter()
            .find(|(_, a)| netw.contains(a))
            .map(|(n, a)| (*a, n.clone()))
            .ok_or_else(|| {
                Error::usage(format!(
                    "no address of {} is inside network.cidr {cidr} (up interfaces: {})",
                    f.hostname,
                    listing()
                ))
                .hint("set network.cidr to the network of the interface the nodes talk over")
            });
    }
    if let Some(r) = resolved_self.filter(|r| !r.is_loopback()) {
        if let Some((n, a)) = f.interfaces.iter().find(|(_, a)| *a == r) {
            return Ok((*a, n.clone()));
        }
    }
    if let Some((n, a)) = f.interfaces.iter().find(|(_, a)| !a.is_loopback()) {
        return Ok((*a, n.clone()));
    }
    Ok((IpAddr::from([127, 0, 0, 1]), "lo".into()))
}

/// At most this many `getaddrinfo` calls run at once (a preview of a thousand nodes must not
/// start a thousand threads).
pub const RESOLVE_THREADS: usize = 32;

/// Resolve host names to IPv4 addresses on a few threads, all within `timeout`.
/// `getaddrinfo` blocks and may wait on a DNS server; a name not resolved in time is `None`.
pub fn resolve_all(names: &[String], timeout: Duration) -> Vec<Option<IpAddr>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut uniq: Vec<String> = names.to_vec();
    uniq.sort();
    uniq.dedup();
    let uniq = Arc::new(uniq);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..uniq.len().min(RESOLVE_THREADS) {
        let (tx, uniq, next) = (tx.clone(), uniq.clone(), next.clone());
        std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(n) = uniq.get(i) else { return };
            let ip = dns_lookup::lookup_host(n)
                .ok()
                .and_then(|v| v.into_iter().find(IpAddr::is_ipv4));
            if tx.send((i, ip)).is_err() {
                return;
            }
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + timeout;
    let mut got = vec![None; uniq.len()];
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((i, ip)) => got[i] = ip,
            Err(_) => break,
        }
    }
    names
        .iter()
        .map(|n| got[uniq.binary_search(n).expect("present")])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            hostname: "node1".into(),
            interfaces: vec![
                ("lo".into(), "127.0.0.1".parse().unwrap()),
                ("eth0".into(), "192.168.1.5".parse().unwrap()),
                ("ib0".into(), "10.10.0.5".parse().unwrap()),
            ],
            cpus: 8,
            mem_available: Some(100 << 30),
            cgroup_limit: None,
            shm_size: Some(20 << 30),
            gpus: None,
        }
    }

    #[test]
    fn gpus_are_counted_from_the_drivers_lists() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(machine_gpus(d.path()), None);
        let nv = d.path().join("proc/driver/nvidia/gpus");
        for bus in ["0000:07:00.0", "0000:0f:00.0", "0000:47:00.0"] {
            std::fs::create_dir_all(nv.join(bus)).unwrap();
        }
        assert_eq!(
            machine_gpus(d.path()),
            Some((3, "/proc/driver/nvidia/gpus".into()))
        );
        let a = tempfile::tempdir().unwrap();
        let nodes = a.path().join("sys/class/kfd/kfd/topology/nodes");
        for (i, simd) in [0, 304, 304].iter().enumerate() {
            std::fs::create_dir_all(nodes.join(i.to_string())).unwrap();
            std::fs::write(
                nodes.join(i.to_string()).join("properties"),
                format!("cpu_cores_count 0\nsimd_count {simd}\n"),
            )
            .unwrap();
        }
        assert_eq!(
            machine_gpus(a.path()),
            Some((2, "/sys/class/kfd (AMD)".into()))
        );
    }

    #[test]
    fn address_choice() {
        let f = facts();
        let mut n = Network::default();
        assert_eq!(choose_address(&n, &f, None).unwrap().1, "eth0");
        // name resolves to 127.0.1.1: ignored
        assert_eq!(
            choose_address(&n, &f, Some("127.0.1.1".parse().unwrap()))
                .unwrap()
                .1,
            "eth0"
        );
        assert_eq!(
            choose_address(&n, &f, Some("10.10.0.5".parse().unwrap()))
                .unwrap()
                .1,
            "ib0"
        );
        n.interface = Some("ib0".into());
        assert_eq!(
            choose_address(&n, &f, None).unwrap().0.to_string(),
            "10.10.0.5"
        );
        n.interface = Some("ib9".into());
        let e = choose_address(&n, &f, None).unwrap_err();
        assert!(
            e.msg.contains("ib9") && e.msg.contains("eth0 192.168.1.5"),
            "{}",
            e.msg
        );
        n.interface = None;
        n.cidr = Some("10.10.0.0/16".into());
        assert_eq!(choose_address(&n, &f, None).unwrap().1, "ib0");
    }

    #[test]
    fn object_store() {
        let mut f = facts();
        // 30 % of 100 GiB = 30 GiB, capped by /dev/shm 20 GiB
        assert_eq!(auto_object_store(&f, None), 20 << 30);
        // --mem=10G → 3 GiB
        assert_eq!(
            auto_object_store(&f, Some(10 * 1024)),
            (10u64 << 30) / 10 * 3
        );
        f.cgroup_limit = Some(1 << 30);
        assert_eq!(
            auto_object_store(&f, Some(10 * 1024)),
            (1u64 << 30) / 10 * 3
        );
        f.shm_size = Some(1 << 20);
        assert_eq!(auto_object_store(&f, None), MIN_OBJECT_STORE);
    }
}
