//! Joining the master: each candidate address in turn, its challenge checked, this rank's
//! hello with a proof, and only a verified answer taken.

use crate::auth::{Auth, JobKey};
use crate::exit;
use crate::run::channel::{self, Connection, Hello, ToMaster, ToRank};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How joining the master ended.
pub(super) enum Joined {
    Ok {
        conn: Connection<ToRank>,
        key: Option<JobKey>,
        port: u16,
    },
    Refused {
        code: i32,
        reason: String,
    },
    Signal(i32),
    GaveUp(String),
}

/// How one attempt to join ended, short of joining.
enum Failed {
    /// Nothing useful answered (refused, closed early): retried without a word.
    Quiet(String),
    /// Something answered that is not this step's master: logged each time, with its address.
    Loud(String),
    /// The (verified) master refused this rank: exit with this code.
    Refused(i32, String),
}

/// What a rank needs to join.
pub(super) struct JoinCtx<'a> {
    pub(super) hello: &'a Hello,
    pub(super) auth: &'a Auth,
    pub(super) user_timeout: Duration,
}

/// Connect to `target`, check its challenge, say hello with a proof, and check the master's
/// answer. Only a verified `Accepted` joins; a verified `Refused` ends the rank.
async fn attempt(
    target: &str,
    port: u16,
    j: &JoinCtx<'_>,
) -> Result<(Connection<ToRank>, Option<JobKey>), Failed> {
    use Failed::{Loud, Quiet};
    let st = match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return Err(Quiet(e.to_string())),
        Err(_) => return Err(Quiet("no answer within 3s".into())),
    };
    channel::tune(&st, j.user_timeout);
    // the challenge and the answer under the small limit, what follows (a Welcome) under the large
    let mut c = Connection::<ToRank>::with_limit(
        st,
        channel::Limit::staged(channel::PRE_AUTH_LINE, 2, channel::MAX_TO_RANK),
    );
    let (master_nonce, job_nonce) = match tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
    {
        Ok(Ok(ToRank::Challenge {
            protocol,
            nonce,
            job_nonce,
        })) => {
            if protocol != channel::PROTOCOL {
                return Err(Loud(format!("{target} speaks launcher channel protocol {protocol}, this rank {}: use one ray-launch binary for the whole step", channel::PROTOCOL)));
            }
            (nonce, job_nonce)
        }
        Ok(Ok(_)) => {
            return Err(Loud(format!(
                "{target} did not start with a challenge: not a ray-launch master"
            )))
        }
        Ok(Err(e)) => return Err(Quiet(format!("{target} closed the connection ({e})"))),
        Err(_) => {
            return Err(Loud(format!(
                "{target} sent no challenge within 10s: not a ray-launch master"
            )))
        }
    };
    let mut h = j.hello.clone();
    h.nonce = crate::auth::random_hex();
    h.master_port = port;
    let hd = h.digest_without_proof();
    h.proof = j
        .auth
        .rank_proof(&h.binding(&hd, &master_nonce, &job_nonce))
        .await
        .map_err(|e| Loud(format!("cannot make this rank's proof: {e}")))?;
    c.sender.send(&ToMaster::Hello(Box::new(h.clone())));
    let b = h.binding(&hd, &master_nonce, &job_nonce);
    match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
        Ok(Ok(ToRank::Accepted { proof })) => {
            match j.auth.check_master(&b, channel::ACCEPTED, proof.as_deref()).await {
                Ok(key) => {
                    // from here on every frame is sealed both ways
                    if let Some(k) = &key {
                        c.seal(channel::SealKeys::rank(k, &master_nonce, &h.nonce));
                    }
                    Ok((c, key))
                }
                Err(why) => Err(Loud(format!("{target} answered as the master, but {why}"))),
            }
        }
        Ok(Ok(ToRank::Refused {
            code,
            reason,
            proof,
        })) => {
            let outcome = channel::refused_outcome(code, &reason);
            match j.auth.check_master(&b, &outcome, proof.as_deref()).await {
                Ok(_) => Err(Failed::Refused(
                    if (1..=255).contains(&code) { code } else { exit::INTERNAL },
                    reason,
                )),
                Err(why) => Err(Loud(format!(
                    "{target} refused this rank, but {why}; ignored"
                ))),
            }
        }
        Ok(Ok(_)) => Err(Loud(format!(
            "{target} answered the hello with something else: not this step's master"
        ))),
        Ok(Err(e)) => Err(Loud(format!("{target} closed the connection after the hello ({e}): another job's or step's launcher, or a master that could not verify this rank"))),
        Err(_) => Err(Loud(format!("{target} did not answer the hello within 30s"))),
    }
}

/// Join the master: try each candidate address in turn, with back-off, until the rendezvous
/// deadline; a signal ends the attempt.
pub(super) async fn join(
    targets: &[(String, u16)],
    j: &JoinCtx<'_>,
    master: &str,
    rendezvous: Duration,
    sigs: &mut mpsc::UnboundedReceiver<i32>,
) -> Joined {
    let deadline = Instant::now() + rendezvous;
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0u32;
    let mut last = String::new();
    loop {
        for (addr, port) in targets {
            tries += 1;
            let target = format!("{addr}:{port}");
            tokio::select! {
                r = attempt(&target, *port, j) => match r {
                    Ok((conn, key)) => return Joined::Ok { conn, key, port: *port },
                    Err(Failed::Refused(code, reason)) => return Joined::Refused { code, reason },
                    Err(Failed::Loud(why)) => {
                        warn!("{why}");
                        last = why;
                    }
                    Err(Failed::Quiet(why)) => last = why,
                },
                Some(sig) = sigs.recv() => return Joined::Signal(sig),
            }
        }
        if Instant::now() + backoff >= deadline {
            let shown: Vec<String> = targets.iter().map(|(a, p)| format!("{a}:{p}")).collect();
            return Joined::GaveUp(format!(
                "cannot join the master {master} at {} within {} (timeouts.rendezvous; {tries} tries, last: {last}); is its launcher running, and is the address reachable from {}?",
                shown.join(" or "),
                humantime::format_duration(rendezvous),
                j.hello.node
            ));
        }
        if tries <= targets.len() as u32 || tries.is_multiple_of(20 * targets.len() as u32) {
            info!("waiting for the master {master} ({last})");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            Some(sig) = sigs.recv() => return Joined::Signal(sig),
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
