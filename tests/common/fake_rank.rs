//! A rank as the coordinator sees it, for tests and benchmarks with many ranks: it connects
//! (from its own source address when given), authenticates with the secret method (HMAC
//! proofs both ways) and hands back the connection. Shared by tests/many_ranks.rs and
//! bench/rendezvous.rs.
use ray_launch::auth::{self, Auth, Method};
use ray_launch::plan::NodeInfo;
use ray_launch::run::channel::{self, Connection, ToMaster, ToRank};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Who a fake rank says it is.
#[derive(Clone)]
pub struct Who {
    pub job: String,
    pub rank: usize,
    pub name: String,
    pub digest: String,
    pub digests: BTreeMap<String, String>,
    pub secret: Vec<u8>,
}

impl Who {
    pub fn info(&self) -> NodeInfo {
        let r = self.rank;
        NodeInfo {
            name: self.name.clone(),
            address: format!("10.{}.{}.{}", r / 65536, r / 256 % 256, r % 256),
            interface: Some("ib0".into()),
            cpus: 64,
            object_store_bytes: 1 << 30,
            gpu_ids: vec![],
            preset_ifname: vec![],
            ray_client: false,
        }
    }
}

async fn connect(port: u16, source: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    match source {
        None => tokio::net::TcpStream::connect(to).await,
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(to).await
        }
    }
}

/// Join the coordinator on 127.0.0.1:`port` as `who`; a connection dropped before the
/// challenge (the cap on unauthenticated connections) is retried and counted in `retries`.
pub async fn join(
    port: u16,
    source: Option<IpAddr>,
    who: &Who,
    retries: &AtomicUsize,
) -> Connection<ToRank> {
    let me = Auth::new(Method::Secret(who.secret.clone()));
    loop {
        let Ok(sock) = connect(port, source).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut c = Connection::<ToRank>::with_limit(
            sock,
            channel::Limit::staged(channel::PRE_AUTH_LINE, 2, channel::MAX_TO_RANK),
        );
        let Ok(ToRank::Challenge {
            nonce, job_nonce, ..
        }) = c.recv().await
        else {
            retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut h = channel::Hello {
            protocol: channel::PROTOCOL,
            job_id: who.job.clone(),
            step_id: "0".into(),
            node: who.name.clone(),
            node_rank: who.rank,
            version: env!("CARGO_PKG_VERSION").into(),
            digest: who.digest.clone(),
            settings_digests: who.digests.clone(),
            info: who.info(),
            busy: vec![],
            preflight: vec![],
            master_port: port,
            nonce: auth::random_hex(),
            proof: None,
        };
        let hd = h.digest_without_proof();
        h.proof = me
            .rank_proof(&h.binding(&hd, &nonce, &job_nonce))
            .await
            .unwrap();
        let b = h.binding(&hd, &nonce, &job_nonce);
        c.sender.send(&ToMaster::Hello(Box::new(h.clone())));
        match c.recv().await {
            Ok(ToRank::Accepted { proof }) => {
                let key = me
                    .check_master(&b, channel::ACCEPTED, proof.as_deref())
                    .await
                    .expect("the master's proof verifies");
                if let Some(k) = key {
                    c.seal(channel::SealKeys::rank(&k, &nonce, &h.nonce));
                }
                return c;
            }
            other => panic!("rank {}: {other:?}", who.rank),
        }
    }
}

/// Answer a Stop as a rank does once torn down: `Stopped`, then close once it is sent.
pub async fn stopped(c: Connection<ToRank>) {
    c.sender.send(&ToMaster::Stopped);
    let (_, sender, flush) = c.split();
    drop(sender);
    flush.wait(Duration::from_secs(10)).await;
}
