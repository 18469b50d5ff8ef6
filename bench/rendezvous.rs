//! 1,024 ranks against the real coordinator (release build): each rank is a thread with its
//! own runtime, its own socket and its own source address (127.0.x.y), authenticating with
//! HMAC proofs as real ranks do; the coordinator runs on its own thread, on a current-thread
//! runtime as in the launcher. Per round: rendezvous (release → last Welcome), start (last
//! Welcome → last Start), stop (a rank's SIGTERM report → last Stop) and all stopped (→ the
//! coordinator finished). `cargo bench --bench rendezvous`; RANKS, ROUNDS from the environment.

#![allow(clippy::too_many_lines)] // tests and benchmarks read better as one story each
#[path = "../tests/common/fake_rank.rs"]
mod fake_rank;

use ray_launch::auth::{Auth, Method};
use ray_launch::cli;
use ray_launch::input::config;
use ray_launch::input::settings::{self, Overrides};
use ray_launch::input::slurm::Step;
use ray_launch::run::channel::{ToMaster, ToRank};
use ray_launch::run::master as coordinator;
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

enum Seen {
    Welcome(Instant),
    Start(Instant),
    Stop(Instant),
}

/// One round: (rendezvous, start, stop, all stopped).
fn round(n: usize, secret: &[u8]) -> [Duration; 4] {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!("engine: vllm\nmodel: m\nparallel: {{tensor: {n}}}\ngpus_per_node: 0\nvllm: {{backend: mp}}\nhealth: {{heartbeat_timeout: 10m}}\n");
    let loaded = config::parse("bench.yaml", &yaml).unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("n{i:04}")).collect();
    let mut step = Step::preview(names.clone(), "123".into());
    step.self_rank = Some(0);
    let s = settings::resolve(&loaded, &Overrides::default(), &step, vec![], dir.path());

    // the coordinator, on its own thread
    let (port_tx, port_rx) = mpsc::channel();
    let (s2, step2, secret2) = (s.clone(), step.clone(), secret.to_vec());
    let coord = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = coordinator::bind(0).await.unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(coordinator::serve(
                listener,
                s2,
                step2,
                Auth::for_master(Method::Secret(secret2)),
                done_tx,
            ));
            done_rx.await.unwrap();
            Instant::now()
        })
    });
    let port = port_rx.recv().unwrap();

    let go = Arc::new(Barrier::new(n + 1));
    let (seen_tx, seen_rx) = mpsc::channel::<Seen>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_tx = Some(stop_tx);
    let mut stop_rx = Some(stop_rx);
    let retries = Arc::new(AtomicUsize::new(0));
    let mut ranks = Vec::new();
    for (rank, name) in names.iter().enumerate() {
        let who = fake_rank::Who {
            job: "123".into(),
            rank,
            name: name.clone(),
            digest: s.digest.clone(),
            digests: s.agreed_digests(),
            secret: secret.to_vec(),
        };
        let (go, seen, retries) = (go.clone(), seen_tx.clone(), retries.clone());
        let trigger = if rank == 7 { stop_rx.take() } else { None };
        let source =
            std::net::Ipv4Addr::new(127, 1 + (rank / 250) as u8, (rank % 250) as u8 + 1, 1);
        ranks.push(
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    go.wait();
                    rt.block_on(async move {
                        let mut c =
                            fake_rank::join(port, Some(source.into()), &who, &retries).await;
                        let mut trigger = trigger;
                        loop {
                            let msg = match trigger.as_mut() {
                                Some(t) => tokio::select! {
                                    m = c.recv() => m,
                                    _ = t => {
                                        trigger = None;
                                        c.sender.send(&ToMaster::Stopping { signal: 15 });
                                        continue;
                                    }
                                },
                                None => c.recv().await,
                            };
                            match msg {
                                Ok(ToRank::Welcome { .. }) => {
                                    let _ = seen.send(Seen::Welcome(Instant::now()));
                                }
                                Ok(ToRank::Start { name, .. }) => {
                                    let _ = seen.send(Seen::Start(Instant::now()));
                                    c.sender.send(&ToMaster::Up { name, slot: 0 });
                                }
                                Ok(ToRank::Stop { .. }) => {
                                    let _ = seen.send(Seen::Stop(Instant::now()));
                                    fake_rank::stopped(c).await;
                                    return;
                                }
                                Ok(_) => {}
                                Err(e) => panic!("rank {rank}: {e}"),
                            }
                        }
                    })
                })
                .unwrap(),
        );
    }
    drop(seen_tx);
    go.wait();
    let t0 = Instant::now();
    let (mut welcomes, mut starts, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_stop = None;
    while let Ok(seen) = seen_rx.recv_timeout(Duration::from_secs(60)) {
        match seen {
            Seen::Welcome(t) => welcomes.push(t),
            Seen::Start(t) => starts.push(t),
            Seen::Stop(t) => stops.push(t),
        }
        if starts.len() == n && t_stop.is_none() {
            // every rank started and said so: now rank 7 "receives SIGTERM"
            std::thread::sleep(Duration::from_millis(200));
            t_stop = Some(Instant::now());
            let _ = stop_tx.take().unwrap().send(());
        }
        if stops.len() == n {
            break;
        }
    }
    assert_eq!(
        (welcomes.len(), starts.len(), stops.len()),
        (n, n, n),
        "every rank got its Welcome, Start and Stop"
    );
    let finished = coord.join().unwrap();
    for r in ranks {
        r.join().unwrap();
    }
    let last = |v: &[Instant]| *v.iter().max().unwrap();
    let t_stop = t_stop.unwrap();
    [
        last(&welcomes) - t0,
        last(&starts) - last(&welcomes),
        last(&stops) - t_stop,
        finished - t_stop,
    ]
}

fn main() {
    let n = env("RANKS", 1024);
    let rounds = env("ROUNDS", 3);
    cli::raise_nofile();
    let secret = b"a per-user secret for the benchmark".to_vec();
    let mut all: Vec<[Duration; 4]> = Vec::new();
    for _ in 0..rounds {
        all.push(round(n, &secret));
    }
    let names = [
        "rendezvous (release -> last Welcome)",
        "start (last Welcome -> last Start)",
        "stop (a rank's SIGTERM -> last Stop)",
        "all stopped (a rank's SIGTERM -> coordinator done)",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut ms: Vec<f64> = all.iter().map(|r| r[i].as_secs_f64() * 1000.0).collect();
        let each: Vec<String> = ms.iter().map(|m| format!("{m:.0}")).collect();
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{n} ranks, {name}: {:.0} ms ({})",
            ms[ms.len() / 2],
            each.join(" ")
        );
    }
}
