//! Ports on this node: which process holds a listening TCP port (from `/proc/net/tcp{,6}` and
//! `/proc/PID/fd`), bind tests of the step's candidate port blocks before anything starts, and
//! the check that the port an engine answers on is held by the engine's own session.

use crate::run::channel::Busy;
use crate::run::error::{Kind, RunError};
use std::collections::BTreeSet;

/// A listening socket on `port`: its owner's uid and its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub uid: u32,
    pub inode: u64,
}

/// Listening TCP sockets (IPv4 and IPv6) on `port` in this network namespace.
pub fn listeners(port: u16) -> Vec<Listener> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some(p) = cols[1].rsplit(':').next() else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            if let (Ok(uid), Ok(inode)) = (cols[7].parse(), cols[9].parse()) {
                out.push(Listener { uid, inode });
            }
        }
    }
    out
}

/// Processes (that this user may look into) with a descriptor on socket `inode`.
pub fn holders(inode: u64) -> Vec<i32> {
    let want = format!("socket:[{inode}]");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        {
            out.push(pid);
        }
    }
    out
}

/// The session id of `pid`, from `/proc/PID/stat`.
pub fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Who holds `port` here, in words (`pid 123 (python3), uid 1001`), or `None` if no one
/// listens on it.
pub fn describe_holder(port: u16) -> Option<String> {
    listeners(port).first().map(|l| name(l, &holders(l.inode)))
}

/// A listener's holder in words, from the pids that hold its socket.
fn name(l: &Listener, pids: &[i32]) -> String {
    match pids.first() {
        Some(pid) => format!("pid {pid} ({}), uid {}", comm(*pid), l.uid),
        None => format!("a process of uid {} (not visible to this user)", l.uid),
    }
}

/// Who holds a port that cannot be bound, in words (a socket bound but not listening, too).
pub fn holder(port: u16) -> String {
    describe_holder(port).unwrap_or_else(|| "a socket that is not listening".into())
}

/// Whether `port` can be bound here now (as the servers bind it: SO_REUSEADDR, all addresses).
pub fn bindable(port: u16) -> bool {
    use socket2::{Domain, Socket, Type};
    let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
        return false;
    };
    let _ = s.set_reuse_address(true);
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    s.bind(&addr.into()).is_ok() && s.listen(1).is_ok()
}

/// The ports of a block that the step's processes bind on every node: Ray's daemons, the
/// engine's (or the router's) HTTP and rendezvous ports (offsets 1-11), the engines behind
/// the router (20-27). The channel (offset 0) is the master's
/// and tested by binding it; the worker range is Ray's to pick from.
pub fn block_ports(base: u16) -> impl Iterator<Item = u16> {
    // Ray's daemons and the engine (or the router), then the replicas' engines behind it
    let behind = 20..20 + crate::plan::MAX_REPLICAS_PER_NODE as u16;
    (1..=11).chain(behind).map(move |o| base + o)
}

/// Bind-test each candidate block (and the fixed ports from the config) on this node: the
/// blocks with a port someone holds, and what holds it.
pub fn busy_blocks(candidates: &[u16], fixed: &[u16]) -> Vec<Busy> {
    let mut out = Vec::new();
    let fixed_busy = fixed
        .iter()
        .find(|p| !bindable(**p))
        .map(|p| (*p, holder(*p)));
    for &base in candidates {
        let taken = block_ports(base)
            .find(|p| !bindable(*p))
            .map(|p| (p, holder(p)));
        if let Some((p, who)) = taken.or_else(|| fixed_busy.clone()) {
            out.push(Busy {
                base,
                why: format!("port {p} is held by {who}"),
            });
        }
    }
    out
}

/// Check that whoever listens on `port` belongs to session `sid` (the engine's), or carries
/// this launcher's tag (a process of the engine's that left its session): `Err` names the
/// squatter.
pub fn held_by_session(port: u16, sid: i32) -> Result<(), RunError> {
    let ls = listeners(port);
    if ls.is_empty() {
        return Ok(()); // answered but no listener seen: another namespace; nothing to name
    }
    let mut foreign: BTreeSet<String> = BTreeSet::new();
    for l in &ls {
        let pids = holders(l.inode);
        if pids
            .iter()
            .any(|p| session_of(*p) == Some(sid) || crate::run::proc::tag_of(*p).is_some())
        {
            return Ok(());
        }
        foreign.insert(name(l, &pids));
    }
    Err(RunError::new(Kind::Squatter, format!(
        "port {port} answers, but it is held by {}, not by the engine (session {sid}): another process squats the engine's port",
        foreign.into_iter().collect::<Vec<_>>().join(" and ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bind_test_covers_the_engines_behind_the_router() {
        let p: Vec<u16> = block_ports(20000).collect();
        assert_eq!(p[..11], (20001..=20011).collect::<Vec<_>>()[..]);
        let plan = crate::plan::Ports::for_block(20000);
        for port in [
            plan.engine_http,
            plan.engine_rendezvous,
            plan.replica_http,
            plan.replica_http + 7,
        ] {
            assert!(p.contains(&port), "{port}");
        }
        assert!(!p.contains(&20000) && !p.contains(&20012) && !p.contains(&20032));
    }

    #[test]
    fn a_listener_is_found_and_named_with_its_pid() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let ls = listeners(port);
        assert_eq!(ls.len(), 1, "{ls:?}");
        assert_eq!(ls[0].uid, nix::unistd::getuid().as_raw());
        assert!(holders(ls[0].inode).contains(&(std::process::id() as i32)));
        let who = describe_holder(port).unwrap();
        assert!(
            who.contains(&format!("pid {}", std::process::id())),
            "{who}"
        );
        // our own session holds it; another session does not
        let me = session_of(std::process::id() as i32).unwrap();
        assert!(held_by_session(port, me).is_ok());
        let err = held_by_session(port, me + 1_000_000).unwrap_err();
        assert!(
            err.msg.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(!bindable(port) || cfg!(target_os = "macos"));
        drop(l);
        assert!(describe_holder(port).is_none());
    }

    #[test]
    fn a_taken_block_is_reported_with_its_holder() {
        // find a block whose port base+3 we can take
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let base = p - 3;
        let busy = busy_blocks(&[base], &[]);
        assert_eq!(busy.len(), 1);
        assert!(busy[0].why.contains(&format!("port {p}")), "{:?}", busy[0]);
        assert!(busy[0].why.contains(&format!("pid {}", std::process::id())));
    }
}
