//! The master's core with an explicit clock: rendezvous, ordered start, replicas, liveness.

use super::*;
use crate::endpoint::ReplicaState;
use crate::input::config;
use crate::input::settings::{self, Overrides};
use crate::plan::lifecycle::Kind;
use crate::run::channel::{self, Hello};

fn setup(yaml: &str, n: usize, client: &[&str]) -> (Coord, Vec<NodeInfo>, Instant) {
    setup_gpus(yaml, n, client, 1)
}

fn setup_gpus(yaml: &str, n: usize, client: &[&str], gpus: u32) -> (Coord, Vec<NodeInfo>, Instant) {
    let loaded = config::parse("t.yaml", yaml).unwrap();
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let mut step = Step::preview(names.clone(), "7".into());
    step.self_rank = Some(0);
    let s = settings::resolve(
        &loaded,
        &Overrides {
            gpus_per_node: Some(gpus),
            ..Default::default()
        },
        &step,
        client.iter().map(|c| c.to_string()).collect(),
        std::path::Path::new("/w"),
    );
    let infos = names
        .iter()
        .enumerate()
        .map(|(i, nm)| NodeInfo {
            name: nm.clone(),
            address: format!("10.0.0.{}", i + 1),
            interface: Some("eth0".into()),
            cpus: 2,
            object_store_bytes: 1 << 30,
            gpu_ids: vec![],
            preset_ifname: vec![],
            ray_client: false,
        })
        .collect();
    let now = Instant::now();
    let port = plan::block_base(&step.job_id, &step.step_id, s.port_range);
    (Coord::new(s, step, port, now), infos, now)
}

fn hello(c: &Coord, info: &NodeInfo, rank: usize) -> Hello {
    Hello {
        protocol: channel::PROTOCOL,
        node: info.name.clone(),
        node_rank: rank,
        version: env!("CARGO_PKG_VERSION").into(),
        digest: c.settings.digest.clone(),
        info: info.clone(),
        proof: None,
        job_id: c.step.job_id.clone(),
        step_id: c.step.step_id.clone(),
        settings_digests: c.settings.agreed_digests(),
        busy: vec![],
        preflight: vec![],
        master_port: 0,
        nonce: "n".into(),
    }
}

/// Every rank says hello in rank order; the actions of the last hello.
fn hello_all(c: &mut Coord, infos: &[NodeInfo], now: Instant) -> Vec<Action> {
    let mut acts = Vec::new();
    for (i, info) in infos.iter().enumerate() {
        let h = hello(c, info, i);
        acts = c.on_hello(&h, now).unwrap().1;
    }
    acts
}

fn sends(acts: &[Action]) -> Vec<(usize, String)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send(r, ToRank::Start { name, .. }) => Some((*r, name.to_string())),
            Action::Send(r, ToRank::Stop { code, .. }) => Some((*r, format!("stop {code}"))),
            _ => None,
        })
        .collect()
}

const RAY: &str = "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\n";
const RAY2: &str = "engine: vllm\nmodel: m\nparallel:\n  tensor: 2\n";

#[test]
fn ray_start_is_ordered_head_workers_engine_client() {
    let (mut c, infos, now) = setup(RAY, 3, &["python", "x.py"]);
    let mut all = Vec::new();
    for (i, info) in infos.iter().enumerate().rev() {
        let h = hello(&c, info, i);
        let (_, acts) = c.on_hello(&h, now).unwrap();
        all = acts;
    }
    assert_eq!(
        sends(&all),
        [(0, "ray-head".to_string())],
        "only the head starts first"
    );
    let acts = c.on_message(
        0,
        ToMaster::Up {
            name: Kind::RayHead,
            slot: 0,
        },
        now,
    );
    assert_eq!(
        sends(&acts),
        [(1, "ray-worker".to_string()), (2, "ray-worker".to_string())]
    );
    let acts = c.on_message(
        2,
        ToMaster::Up {
            name: Kind::RayWorker,
            slot: 0,
        },
        now,
    );
    assert!(sends(&acts).is_empty());
    assert!(acts.iter().any(
        |a| matches!(a, Action::Info(s) if s.contains("2/3 nodes joined; waiting for node2"))
    ));
    let acts = c.on_message(
        1,
        ToMaster::Up {
            name: Kind::RayWorker,
            slot: 0,
        },
        now,
    );
    assert_eq!(sends(&acts), [(0, "engine".to_string())]);
    let acts = c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Engine,
            slot: 0,
        },
        now,
    );
    assert_eq!(sends(&acts), [(0, "client".to_string())]);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Endpoint {
            status: Status::Ready,
            ..
        }
    )));
    // the client's exit code becomes everyone's
    let acts = c.on_message(
        0,
        ToMaster::Exited {
            name: Kind::Client,
            slot: 0,
            status: "exit code 3".into(),
            code: 3,
            log: None,
            tail: vec![],
        },
        now,
    );
    assert_eq!(
        sends(&acts),
        [
            (0, "stop 3".to_string()),
            (1, "stop 3".to_string()),
            (2, "stop 3".to_string())
        ]
    );
}

#[test]
fn mp_starts_every_engine_at_once() {
    let (mut c, infos, now) = setup(
        "engine: vllm\nmodel: m\nparallel: {tensor: 2}\nvllm: {backend: mp}\ngpus_per_node: 0\n",
        2,
        &[],
    );
    let acts = hello_all(&mut c, &infos, now);
    assert_eq!(
        sends(&acts),
        [(0, "engine".to_string()), (1, "engine".to_string())]
    );
}

#[test]
fn failures_map_to_codes_and_name_the_node() {
    let (mut c, infos, now) = setup(RAY, 3, &[]);
    hello_all(&mut c, &infos, now);
    c.on_message(
        0,
        ToMaster::Up {
            name: Kind::RayHead,
            slot: 0,
        },
        now,
    );
    c.on_message(
        1,
        ToMaster::Up {
            name: Kind::RayWorker,
            slot: 0,
        },
        now,
    );
    let acts = c.on_message(
        1,
        ToMaster::Exited {
            name: Kind::RayWorker,
            slot: 0,
            status: "exit code 1".into(),
            code: 1,
            log: Some("/l/node2.ray-worker.log".into()),
            tail: vec![],
        },
        now,
    );
    let stop = acts.iter().find_map(|a| match a {
        Action::Send(2, ToRank::Stop { code, reason, node }) => {
            Some((*code, reason.clone(), node.clone()))
        }
        _ => None,
    });
    let (code, reason, node) = stop.unwrap();
    assert_eq!(code, exit::PEER_FAILURE);
    assert_eq!(node.as_deref(), Some("node2"));
    assert!(
        reason.contains("ray-worker on node2 ended unexpectedly (exit code 1)"),
        "{reason}"
    );
    // a second failure does not change the cause
    assert!(c
        .on_closed(2, Instant::now())
        .iter()
        .all(|a| !matches!(a, Action::Send(..))));
}

#[test]
fn silent_node_and_slow_join_time_out() {
    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    hello_all(&mut c, &infos, now);
    // head never comes up: startup timeout after worker_join (3m)
    let acts = c.on_tick(now + Duration::from_secs(181));
    assert!(acts.iter().any(|a| matches!(a, Action::Send(_, ToRank::Stop { code, reason, .. }) if *code == exit::STARTUP_TIMEOUT && reason.contains("ray-head on node1 did not come up within 3m"))), "{acts:?}");

    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    hello_all(&mut c, &infos, now);
    c.on_message(
        0,
        ToMaster::Up {
            name: Kind::RayHead,
            slot: 0,
        },
        now + Duration::from_secs(19),
    );
    let acts = c.on_tick(now + Duration::from_secs(21));
    assert!(acts.iter().any(|a| matches!(a, Action::Send(_, ToRank::Stop { code, reason, .. }) if *code == exit::PEER_FAILURE && reason.contains("node2 went silent"))), "{acts:?}");
}

#[test]
fn a_stall_of_the_master_itself_is_not_a_peers_silence() {
    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    hello_all(&mut c, &infos, now);
    let stops = |acts: &[Action]| {
        acts.iter().find_map(|a| match a {
            Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
            _ => None,
        })
    };
    let tick = Duration::from_millis(250);
    let mut t = now;
    for _ in 0..8 {
        t += tick;
        c.on_message(0, ToMaster::Heartbeat, t);
        c.on_message(1, ToMaster::Heartbeat, t);
        assert_eq!(stops(&c.on_tick(t)), None);
    }
    // the master was stopped (or starved) for a minute: its peers were not silent
    t += Duration::from_secs(60);
    assert_eq!(stops(&c.on_tick(t)), None);
    // node2 then stays silent while the master runs: stopped once 4 s (the default) of
    // silence were seen, one interval (1 s) of the stall included
    let from = t;
    let mut stopped = None;
    for _ in 0..40 {
        t += tick;
        c.on_message(0, ToMaster::Heartbeat, t);
        if let Some(r) = stops(&c.on_tick(t)) {
            stopped = Some((t - from, r));
            break;
        }
    }
    let (after, reason) = stopped.expect("node2's silence is seen");
    assert!(reason.contains("node2 went silent"), "{reason}");
    assert!(
        after > Duration::from_secs(3) && after <= Duration::from_millis(3500),
        "{after:?}"
    );
    assert_eq!(c.abandoned_ranks(), [1]);
}

#[test]
fn mismatched_settings_name_the_node_and_the_keys() {
    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    let mut h = hello(&c, &infos[1], 1);
    h.digest = "other".into();
    h.settings_digests
        .insert("config.parallel.tensor".into(), "other".into());
    let (_, acts) = c.on_hello(&h, now).unwrap();
    let reason = acts.iter().find_map(|a| match a {
        Action::Send(
            1,
            ToRank::Stop {
                code: 2, reason, ..
            },
        ) => Some(reason.clone()),
        _ => None,
    });
    assert!(reason
        .unwrap()
        .contains("node2's settings differ from the master's (node1) in: config.parallel.tensor"));
}

#[test]
fn rendezvous_names_missing_nodes_and_times_out() {
    let (mut c, infos, now) = setup(RAY, 3, &[]);
    let h = hello(&c, &infos[0], 0);
    c.on_hello(&h, now).unwrap();
    let acts = c.on_tick(now + Duration::from_secs(6));
    assert!(acts.iter().any(|a| matches!(a, Action::Info(s) if s.contains("1/3 node(s) connected; waiting for node2, node3"))), "{acts:?}");
    let acts = c.on_tick(now + Duration::from_secs(301));
    assert!(acts.iter().any(|a| matches!(a, Action::Send(0, ToRank::Stop { code: 3, reason, .. }) if reason.contains("node2, node3 did not connect within 5m"))), "{acts:?}");
}

#[test]
fn all_stopped_after_every_rank_reports() {
    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    hello_all(&mut c, &infos, now);
    c.on_message(1, ToMaster::Stopping { signal: 15 }, now);
    assert!(!c
        .on_message(0, ToMaster::Stopped, now)
        .contains(&Action::AllStopped));
    assert!(c.on_closed(1, Instant::now()).contains(&Action::AllStopped));
}
// ---- replicas: restarts, the budget, min_healthy, the router

mod replicas;

const BATCH: &str = "engine: vllm\nmodel: m\nvllm:\n  backend: mp\nparallel:\n  tensor: 2\nbatch:\n  input: in.jsonl\n  output: out.jsonl\n  requeue: true\n";

#[test]
fn a_batch_job_starts_nothing_before_its_input_is_checked_and_a_bad_line_stops_it() {
    let (mut c, infos, now) = setup(BATCH, 2, &[]);
    assert_eq!(
        c.settings.client[..2],
        ["ray-launch".to_string(), "batch".to_string()],
        "the batch is the client"
    );
    let acts = hello_all(&mut c, &infos, now);
    assert!(acts.contains(&Action::CheckBatch));
    assert!(sends(&acts).is_empty(), "nothing started: {acts:?}");
    let acts = c.on_batch_checked(Err("in.jsonl line 3: custom_id is missing".into()), now);
    assert_eq!(
        sends(&acts),
        [(0, "stop 2".to_string()), (1, "stop 2".to_string())]
    );
    assert!(acts.iter().any(|a| matches!(a, Action::Endpoint { reason: Some(r), code: Some(2), .. } if r.contains("line 3"))));

    let (mut c, infos, now) = setup(BATCH, 2, &[]);
    hello_all(&mut c, &infos, now);
    let acts = c.on_batch_checked(Ok(300), now);
    assert_eq!(
        sends(&acts),
        [(0, "engine".to_string()), (1, "engine".to_string())]
    );
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Event(Event::BatchChecked { requests: 300 }, _))));
}

#[test]
fn usr1_stops_a_batch_with_work_left_and_requeues_it() {
    let (mut c, infos, now) = setup(BATCH, 2, &[]);
    hello_all(&mut c, &infos, now);
    c.on_batch_checked(Ok(10), now);
    let acts = c.on_message(
        1,
        ToMaster::Stopping {
            signal: signals::libc_sig::USR1,
        },
        now,
    );
    assert_eq!(
        sends(&acts),
        [(0, "stop 9".to_string()), (1, "stop 9".to_string())]
    );
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Requeue(r) if r.contains("batch.requeue"))));
    // without a batch, SIGUSR1 is a drain: 0, no requeue
    let (mut c, infos, now) = setup(RAY2, 2, &[]);
    hello_all(&mut c, &infos, now);
    let acts = c.on_message(
        1,
        ToMaster::Stopping {
            signal: signals::libc_sig::USR1,
        },
        now,
    );
    assert_eq!(
        sends(&acts),
        [(0, "stop 0".to_string()), (1, "stop 0".to_string())]
    );
    assert!(!acts.iter().any(|a| matches!(a, Action::Requeue(_))));
}
