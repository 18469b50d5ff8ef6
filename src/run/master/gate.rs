//! The channel's door: the listening socket, caps on connections that have not
//! authenticated (per address and in all), and each connection's handshake; an authenticated
//! rank's messages go to the master's loop as [`Inbound`].

use crate::auth::{self, Auth};
use crate::run::channel::{self, Connection, Hello, Line, RecvError, ToMaster, ToRank};
use crate::run::error::RunError;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub(super) enum Inbound {
    /// An authenticated hello. `accepted` is the master's answer, ready to send first if the
    /// coordinator takes the rank; `reply` says what it decided.
    Hello {
        hello: Box<Hello>,
        tx: channel::Sender,
        accepted: Line,
        reply: oneshot::Sender<Result<usize, RunError>>,
    },
    /// A connection failed the handshake.
    Refused {
        peer: std::net::SocketAddr,
        reason: String,
    },
    Msg(usize, ToMaster),
    Closed(usize),
    /// What the check of the attached endpoints found.
    Attached(Result<Vec<(String, Vec<String>)>, RunError>),
    /// The batch input's check: its request count, or the first bad line.
    BatchChecked(Result<u64, String>),
    /// A service job handed over (or the service was stopped): end the job with exit 0.
    Handover(String),
}

/// Bind the channel's port (before anything else starts, so a clash fails fast).
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(std::net::SocketAddr::from(([0, 0, 0, 0], port)))?;
    sock.listen(1024)
}

/// How long a new connection may take to say hello: a port scanner or a stray client is
/// dropped after this.
pub const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Connections that have not authenticated yet, at most, in all and from one address.
pub const MAX_UNAUTHENTICATED: usize = 256;
pub const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 16;

/// Counts connections that have not authenticated, in all and per address.
#[derive(Default)]
struct Gate {
    total: usize,
    per: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// A place in the [`Gate`], given back when dropped (authenticated, or gone).
struct Pass {
    gate: Arc<Mutex<Gate>>,
    ip: std::net::IpAddr,
}

impl Pass {
    fn take(gate: &Arc<Mutex<Gate>>, ip: std::net::IpAddr) -> Option<Pass> {
        let mut g = gate.lock().expect("gate lock");
        let here = g.per.get(&ip).copied().unwrap_or(0);
        if g.total >= MAX_UNAUTHENTICATED || here >= MAX_UNAUTHENTICATED_PER_ADDRESS {
            return None;
        }
        g.total += 1;
        g.per.insert(ip, here + 1);
        Some(Pass {
            gate: gate.clone(),
            ip,
        })
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut g = self.gate.lock().expect("gate lock");
        g.total -= 1;
        if let Some(n) = g.per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.per.remove(&self.ip);
            }
        }
    }
}

/// What every connection's handshake needs.
pub(super) struct Ctx {
    pub(super) auth: Auth,
    pub(super) job: String,
    pub(super) step: String,
    pub(super) job_nonce: String,
    pub(super) user_timeout: Duration,
    /// The port the master listens on (a hello must name it).
    pub(super) port: u16,
}

/// Accept connections (for the rendezvous only: the caller aborts this once every rank is
/// in), each through the [`Gate`] and its own handshake.
pub(super) async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    tx: mpsc::UnboundedSender<Inbound>,
) {
    let gate = Arc::new(Mutex::new(Gate::default()));
    let mut backoff = Duration::from_millis(10);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // out of descriptors, or the like: do not spin
                tracing::warn!("accepting a channel connection failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let Some(pass) = Pass::take(&gate, peer.ip()) else {
            // too many unauthenticated connections: drop this one at once
            drop(sock);
            let _ = tx.send(Inbound::Refused {
                peer,
                reason: format!("too many connections that have not authenticated ({MAX_UNAUTHENTICATED_PER_ADDRESS} from one address, {MAX_UNAUTHENTICATED} in all)"),
            });
            continue;
        };
        tokio::spawn(handle_conn(sock, peer, pass, ctx.clone(), tx.clone()));
    }
}

/// The master's side of the handshake: its challenge, the rank's hello checked (protocol,
/// job and step, proof), the answer made. `Err`: why the connection is refused.
async fn handshake(
    c: &mut Connection<ToMaster>,
    ctx: &Ctx,
) -> Result<(Hello, String, String, Line), String> {
    let nonce = auth::random_hex();
    c.sender.send(&ToRank::Challenge {
        protocol: channel::PROTOCOL,
        nonce: nonce.clone(),
        job_nonce: ctx.job_nonce.clone(),
    });
    let hello = match tokio::time::timeout(HELLO_WITHIN, c.recv()).await {
        Ok(Ok(ToMaster::Hello(h))) => *h,
        Ok(Ok(_)) => return Err("it spoke before saying hello".into()),
        Ok(Err(e)) => return Err(format!("no hello ({e})")),
        Err(_) => {
            return Err(format!(
                "it said nothing within {}s",
                HELLO_WITHIN.as_secs()
            ))
        }
    };
    let who = format!(
        "it claims to be {} (node rank {})",
        hello.node, hello.node_rank
    );
    if hello.protocol != channel::PROTOCOL {
        return Err(format!(
            "{who} but speaks channel protocol {}, not {}",
            hello.protocol,
            channel::PROTOCOL
        ));
    }
    if hello.job_id != ctx.job || hello.step_id != ctx.step {
        return Err(format!(
            "{who} of job {} step {}, not of this step ({}.{})",
            hello.job_id, hello.step_id, ctx.job, ctx.step
        ));
    }
    let hd = hello.digest_without_proof();
    let b = hello.binding(&hd, &nonce, &ctx.job_nonce);
    if let Err(why) = ctx.auth.check_rank(&b, hello.proof.as_deref()).await {
        return Err(format!("{who} but failed authentication: {why}"));
    }
    // the proof covers the port the rank dialled: one relayed from another port is refused
    if hello.master_port != ctx.port {
        return Err(format!(
            "{who} but reached the master through port {}, not the master's {}: a relay on another port (a port squatter)",
            hello.master_port, ctx.port
        ));
    }
    let accepted = match ctx.auth.master_proof(&b, channel::ACCEPTED).await {
        Ok(proof) => channel::encode(&ToRank::Accepted { proof }),
        Err(e) => return Err(format!("{who}; cannot answer it: {e}")),
    };
    Ok((hello, hd, nonce, accepted))
}

/// One connection: the handshake, then its messages to the coordinator.
async fn handle_conn(
    sock: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    pass: Pass,
    ctx: Arc<Ctx>,
    tx: mpsc::UnboundedSender<Inbound>,
) {
    channel::tune(&sock, ctx.user_timeout);
    let mut c = Connection::<ToMaster>::new(sock);
    let (hello, hd, nonce, accepted) = match handshake(&mut c, &ctx).await {
        Ok(x) => x,
        Err(reason) => {
            // closed now, both directions: a peer that keeps its end open holds nothing here
            c.close();
            let _ = tx.send(Inbound::Refused { peer, reason });
            return;
        }
    };
    let b = hello.binding(&hd, &nonce, &ctx.job_nonce);
    // every frame after the Accepted (or Refused) is sealed both ways, with this
    // connection's keys
    if let Some(k) = ctx.auth.master_job_key(&ctx.job, &ctx.step, &ctx.job_nonce) {
        c.seal(channel::SealKeys::master(&k, &nonce, &hello.nonce));
    }
    drop(pass);
    c.limit.set(channel::MAX_TO_MASTER);
    let (mut rx, sender, flush) = c.split();
    let (reply, decided) = oneshot::channel();
    if tx
        .send(Inbound::Hello {
            hello: Box::new(hello.clone()),
            tx: sender.clone(),
            accepted,
            reply,
        })
        .is_err()
    {
        return;
    }
    let rank = match decided.await {
        Ok(Ok(rank)) => rank,
        Ok(Err(e)) => {
            let (code, reason) = (e.exit_code(), e.msg);
            let proof = ctx
                .auth
                .master_proof(&b, &channel::refused_outcome(code, &reason))
                .await
                .ok()
                .flatten();
            sender.send(&ToRank::Refused {
                code,
                reason,
                proof,
            });
            drop(sender);
            flush.wait(Duration::from_secs(2)).await;
            return;
        }
        Err(_) => return,
    };
    drop(sender);
    loop {
        match rx.recv().await {
            Ok(m) => {
                if tx.send(Inbound::Msg(rank, m)).is_err() {
                    return;
                }
            }
            // someone else's bytes in this rank's connection: dropped and named, the rank's
            // own frames go on
            Err(e @ RecvError::Forged(_)) => {
                let reason = format!("on node rank {rank}'s connection: {e}");
                if tx.send(Inbound::Refused { peer, reason }).is_err() {
                    return;
                }
            }
            Err(_) => {
                let _ = tx.send(Inbound::Closed(rank));
                return;
            }
        }
    }
}
