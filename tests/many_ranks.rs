//! A thousand ranks against the real coordinator over TCP on loopback, in one process: each
//! authenticates (the secret method: HMAC proofs both ways), the rendezvous completes, every
//! rank gets the same Welcome and its Start, the endpoint becomes ready, and one rank's
//! SIGTERM stops all of them with 143. All come from one address, so the coordinator's cap on
//! unauthenticated connections per address makes most of them retry, as real ranks do.
//! Prints how long each phase took.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
#[path = "common/fake_rank.rs"]
mod fake_rank;

use ray_launch::auth::{Auth, Method};
use ray_launch::cli;
use ray_launch::input::config;
use ray_launch::input::settings::{self, Overrides};
use ray_launch::input::slurm::Step;
use ray_launch::plan::lifecycle::Kind;
use ray_launch::run::channel::{ToMaster, ToRank};
use ray_launch::run::master as coordinator;
use std::time::{Duration, Instant};

const N: usize = 1000;

#[tokio::test(flavor = "current_thread")]
async fn a_thousand_ranks_rendezvous_start_and_stop() {
    cli::raise_nofile();
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft >= 2 * N as u64 + 64,
        "need {} open files, have {soft}",
        2 * N + 64
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("engine: vllm\nmodel: m\nparallel: {{tensor: {N}}}\ngpus_per_node: 0\nvllm: {{backend: mp}}\n# the fake ranks send no heartbeats: liveness is not what this test is about\nhealth: {{heartbeat_timeout: 10m}}\n");
    let loaded = config::parse("many.yaml", &yaml).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("n{i:04}")).collect();
    let mut step = Step::preview(names.clone(), "123".into());
    step.self_rank = Some(0);
    let s = settings::resolve(&loaded, &Overrides::default(), &step, vec![], dir.path());
    let listener = coordinator::bind(0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let secret = b"a per-user secret for the test".to_vec();
    tokio::spawn(coordinator::serve(
        listener,
        s.clone(),
        step.clone(),
        Auth::for_master(Method::Secret(secret.clone())),
        done_tx,
    ));
    let digests = s.agreed_digests();
    let retries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let (res_tx, mut res_rx) =
        tokio::sync::mpsc::unbounded_channel::<(usize, &'static str, Duration)>();
    for (rank, name) in names.iter().enumerate() {
        let (name, digest, digests, tx, secret, retries) = (
            name.clone(),
            s.digest.clone(),
            digests.clone(),
            res_tx.clone(),
            secret.clone(),
            retries.clone(),
        );
        tokio::spawn(async move {
            let who = fake_rank::Who {
                job: "123".into(),
                rank,
                name,
                digest,
                digests,
                secret,
            };
            let mut c = fake_rank::join(port, None, &who, &retries).await;
            loop {
                match c.recv().await {
                    Ok(ToRank::Welcome { nodes, .. }) => {
                        assert_eq!(nodes.len(), N);
                        let _ = tx.send((rank, "welcome", t0.elapsed()));
                    }
                    Ok(ToRank::Start { name, .. }) => {
                        assert_eq!(name, Kind::Engine);
                        let _ = tx.send((rank, "start", t0.elapsed()));
                        c.sender.send(&ToMaster::Up { name, slot: 0 });
                        if rank == 7 {
                            // give the others time to report up, then "receive SIGTERM"
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            c.sender.send(&ToMaster::Stopping { signal: 15 });
                        }
                    }
                    Ok(ToRank::Stop { code, node, reason }) => {
                        assert_eq!(code, 143, "{reason}");
                        assert_eq!(node.as_deref(), Some("n0007"));
                        let _ = tx.send((rank, "stop", t0.elapsed()));
                        fake_rank::stopped(c).await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("rank {rank}: {e}"),
                }
            }
        });
    }
    drop(res_tx);
    let mut count = std::collections::BTreeMap::<&str, (usize, Duration)>::new();
    while let Some((_, what, at)) = tokio::time::timeout(Duration::from_secs(60), res_rx.recv())
        .await
        .expect("no progress for 60 s")
    {
        let e = count.entry(what).or_default();
        e.0 += 1;
        e.1 = e.1.max(at);
    }
    tokio::time::timeout(Duration::from_secs(30), done_rx)
        .await
        .expect("coordinator finished")
        .unwrap();
    eprintln!(
        "{N} ranks from one address: {} connection(s) dropped before the challenge and retried",
        retries.load(std::sync::atomic::Ordering::Relaxed)
    );
    for what in ["welcome", "start", "stop"] {
        let (n, last) = count[what];
        assert_eq!(n, N, "{what}");
        eprintln!("{N} ranks: last {what} after {:.3}s", last.as_secs_f64());
    }
    let ep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&s.endpoint_file).unwrap()).unwrap();
    assert_eq!(ep["status"], "stopped");
    assert_eq!(ep["exit_code"], 143);
}
