//! Replicas that fail alone, several models, the attach gate, requeue, phases.

use super::*;

/// vLLM mp, one node per replica: `n` replicas behind a router.
fn replicas_yaml(extra: &str) -> String {
    format!("engine: vllm\nmodel: m\nparallel:\n  tensor: 1\n  nodes_per_replica: 1\nvllm:\n  backend: mp\n{extra}")
}

/// (rank, slot) of every engine the actions start.
fn engine_starts(acts: &[Action]) -> Vec<(usize, usize)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send(
                r,
                ToRank::Start {
                    name: Kind::Engine,
                    slot,
                },
            ) => Some((*r, *slot)),
            _ => None,
        })
        .collect()
}

fn resets(acts: &[Action]) -> Vec<usize> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send(r, ToRank::Reset { .. }) => Some(*r),
            _ => None,
        })
        .collect()
}

fn states(acts: &[Action]) -> Option<Vec<(ReplicaState, u32)>> {
    acts.iter().rev().find_map(|a| match a {
        Action::Replicas(v, _) => Some(v.iter().map(|r| (r.state, r.restarts)).collect()),
        _ => None,
    })
}

fn exited(kind: Kind) -> ToMaster {
    ToMaster::Exited {
        name: kind,
        slot: 0,
        status: "signal 9 (SIGKILL)".into(),
        code: 137,
        log: None,
        tail: vec![],
    }
}

/// Heartbeats from every rank, then a tick: the clock moves on while every node is alive.
fn beat(c: &mut Coord, t: Instant) -> Vec<Action> {
    for r in 0..c.n() {
        c.on_message(r, ToMaster::Heartbeat, t);
    }
    c.on_tick(t)
}

fn is_ready(acts: &[Action]) -> bool {
    acts.iter().any(|a| {
        matches!(
            a,
            Action::Endpoint {
                status: Status::Ready,
                ..
            }
        )
    })
}

/// Two replicas up, the router listening, the client started: the job is ready.
fn two_ready(extra: &str, client: &[&str]) -> (Coord, Instant) {
    let (mut c, infos, t0) = setup(&replicas_yaml(extra), 2, client);
    let acts = hello_all(&mut c, &infos, t0);
    // every engine and the router start at once (no Ray)
    assert_eq!(
        sends(&acts),
        [
            (0, "engine".into()),
            (0, "router".into()),
            (1, "engine".into())
        ]
    );
    let mut acts = c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Engine,
            slot: 0,
        },
        t0,
    );
    acts.extend(c.on_message(
        1,
        ToMaster::Up {
            name: Kind::Engine,
            slot: 0,
        },
        t0,
    ));
    assert!(!is_ready(&acts), "not before the router listens: {acts:?}");
    let acts = c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Router,
            slot: 0,
        },
        t0,
    );
    assert!(is_ready(&acts), "{acts:?}");
    (c, t0)
}

#[test]
fn a_failed_replica_is_torn_down_and_started_again_while_the_job_goes_on() {
    let (mut c, t0) = two_ready("", &["python", "x.py"]);
    let s = Duration::from_secs(1);
    // replica 1's engine dies: only its node resets, nobody stops, the job stays ready
    let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
    assert_eq!(resets(&acts), [1], "{acts:?}");
    assert!(sends(&acts).is_empty(), "no stop, no start: {acts:?}");
    assert_eq!(
        states(&acts),
        Some(vec![
            (ReplicaState::Ready, 0),
            (ReplicaState::Restarting, 1)
        ])
    );
    assert!(!c.stopping());
    // its teardown is done; the back-off (1 s) runs from then
    c.on_message(1, ToMaster::ResetDone { slot: 0 }, t0 + 2 * s);
    assert!(sends(&c.on_tick(t0 + 2 * s)).is_empty());
    let acts = c.on_tick(t0 + 3 * s);
    // only the replica's own engine starts again: not the router, not the client
    assert_eq!(sends(&acts), [(1, "engine".into())], "{acts:?}");
    assert_eq!(
        states(&acts),
        Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Starting, 1)])
    );
    let acts = c.on_message(
        1,
        ToMaster::Up {
            name: Kind::Engine,
            slot: 0,
        },
        t0 + 4 * s,
    );
    assert_eq!(
        states(&acts),
        Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Ready, 1)])
    );
    assert!(
        sends(&acts).is_empty(),
        "the client is not started twice: {acts:?}"
    );
    // a late report from the killed engine's other watchers changes nothing
    let mut c2 = c;
    c2.on_message(1, exited(Kind::Engine), t0 + 5 * s);
    assert!(!c2.stopping());
}

#[test]
fn a_replica_that_keeps_failing_stays_down_and_the_last_one_ends_the_job() {
    let (mut c, t0) = two_ready("replicas:\n  max_restarts: 2\n  restart_window: 10m\n", &[]);
    let s = Duration::from_secs(1);
    let mut t = t0;
    let mut restarts_seen = Vec::new();
    for attempt in 0..3 {
        t += 10 * s;
        // the health checks fail this time: a `Failed` of the engine
        let acts = c.on_message(
            1,
            ToMaster::Failed {
                code: exit::ENGINE_FAILURE,
                reason: "health check failed".into(),
                kind: Some(Kind::Engine),
                slot: 0,
            },
            t,
        );
        assert_eq!(resets(&acts), [1], "attempt {attempt}: {acts:?}");
        let st = states(&acts).unwrap()[1];
        restarts_seen.push(st);
        c.on_message(1, ToMaster::ResetDone { slot: 0 }, t);
        // back-off 1 s, then 2 s
        let acts = beat(&mut c, t + 5 * s);
        if attempt < 2 {
            assert_eq!(sends(&acts), [(1, "engine".into())], "attempt {attempt}");
        } else {
            assert!(sends(&acts).is_empty());
        }
    }
    assert_eq!(
        restarts_seen,
        [
            (ReplicaState::Restarting, 1),
            (ReplicaState::Restarting, 2),
            (ReplicaState::Down, 2)
        ]
    );
    assert!(!c.stopping(), "replica 0 still serves");
    // the last serving replica fails too: below min_healthy, the job ends with exit 7
    let acts = c.on_message(0, exited(Kind::Engine), t + 20 * s);
    assert!(c.stopping());
    assert!(
        sends(&acts).contains(&(0, format!("stop {}", exit::REPLICAS_DOWN))),
        "{acts:?}"
    );
}

#[test]
fn a_lost_node_keeps_its_replica_down_and_min_healthy_decides() {
    let (mut c, t0) = two_ready("", &[]);
    let acts = c.on_closed(1, t0 + Duration::from_secs(1));
    assert_eq!(
        states(&acts),
        Some(vec![(ReplicaState::Ready, 0), (ReplicaState::Down, 0)])
    );
    assert!(
        resets(&acts).is_empty(),
        "nobody is left on that node to reset"
    );
    assert!(!c.stopping());
    // with min_healthy 2 the same loss ends the job
    let (mut c, t0) = two_ready("replicas:\n  min_healthy: 2\n", &[]);
    c.on_closed(1, t0 + Duration::from_secs(1));
    assert!(c.stopping());
}

#[test]
fn with_on_failure_stop_one_replica_ends_the_job_as_before() {
    let (mut c, t0) = two_ready("replicas:\n  on_failure: stop\n", &[]);
    let acts = c.on_message(1, exited(Kind::Engine), t0 + Duration::from_secs(1));
    assert!(c.stopping());
    assert!(sends(&acts).contains(&(0, format!("stop {}", exit::ENGINE_FAILURE))));
    // the router's death is the job's failure in any case
    let (mut c, t0) = two_ready("", &[]);
    c.on_message(0, exited(Kind::Router), t0 + Duration::from_secs(1));
    assert!(c.stopping());
}

/// Two one-node models (`a` required, `b` as `b_extra` says) and, with `attach`, an
/// attached endpoint; every engine and the router up.
fn two_models(b_extra: &str, attach: bool) -> (Coord, Instant, Vec<Action>) {
    let yaml = format!(
        "engine: vllm\nvllm: {{backend: mp}}\nmodels:\n  - {{name: a, model: m, parallel: {{tensor: 1}}, nodes: 1}}\n  - {{name: b, model: m, parallel: {{tensor: 1}}{b_extra}}}\nreplicas: {{max_restarts: 0}}\n{}",
        if attach { "attach:\n  - {name: j, url: 'http://10.9.9.9:8000/v1'}\n" } else { "" }
    );
    let (mut c, infos, t0) = setup(&yaml, 2, &[]);
    let mut acts = hello_all(&mut c, &infos, t0);
    if attach {
        // nothing starts before the attached endpoint answered
        assert!(sends(&acts).is_empty(), "{acts:?}");
        let check = acts.iter().find_map(|a| match a {
            Action::CheckAttach(v) => Some(v.clone()),
            _ => None,
        });
        assert_eq!(check.map(|v| v[0].name.clone()).as_deref(), Some("j"));
        acts = c.on_attach_checked(Ok(vec![("j".into(), vec!["judge".into()])]), t0);
    }
    assert_eq!(
        sends(&acts),
        [
            (0, "engine".into()),
            (0, "router".into()),
            (1, "engine".into())
        ]
    );
    let mut all = Vec::new();
    for (r, k) in [(0, Kind::Engine), (1, Kind::Engine), (0, Kind::Router)] {
        all.extend(c.on_message(r, ToMaster::Up { name: k, slot: 0 }, t0));
    }
    assert!(is_ready(&all), "{all:?}");
    (c, t0, all)
}

#[test]
fn a_model_whose_replicas_are_down_ends_the_job_unless_it_is_not_required() {
    let s = Duration::from_secs(1);
    // b is required: its only replica down (no restarts left) ends the job with exit 7
    let (mut c, t0, _) = two_models(", nodes: 1", false);
    let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
    assert!(c.stopping());
    assert!(sends(&acts).contains(&(0, format!("stop {}", exit::REPLICAS_DOWN))));
    let why = acts.iter().find_map(|a| match a {
        Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
        _ => None,
    });
    assert!(
        why.as_deref()
            .is_some_and(|w| w.starts_with("model `b`: 0 of its 1 replica(s) serve")),
        "{why:?}"
    );
    // `required: false`: b is dropped, a goes on serving
    let (mut c, t0, _) = two_models(", required: false", false);
    let acts = c.on_message(1, exited(Kind::Engine), t0 + s);
    assert!(!c.stopping(), "{acts:?}");
    let dropped = acts.iter().rev().find_map(|a| match a {
        Action::Replicas(_, d) => Some(d.clone()),
        _ => None,
    });
    assert_eq!(dropped, Some(vec!["b".to_string()]));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Warn(w) if w.starts_with("model `b` is dropped"))));
    // then a's own failure ends it: nothing serves
    c.on_message(0, exited(Kind::Engine), t0 + 2 * s);
    assert!(c.stopping());
}

#[test]
fn an_attached_endpoint_that_does_not_answer_stops_the_job_before_anything_starts() {
    let (c, _, _) = two_models(", nodes: 1", true);
    assert!(!c.stopping());
    // the same setup, but the check fails: exit 3, and no Start was ever sent
    let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nattach:\n  - {name: j, url: 'http://10.9.9.9:8000/v1'}\n";
    let (mut c, infos, t0) = setup(yaml, 1, &[]);
    let acts = hello_all(&mut c, &infos, t0);
    assert!(sends(&acts).is_empty());
    let why = "attach `j`: GET http://10.9.9.9:8000/v1/models failed: connection refused";
    let acts = c.on_attach_checked(
        Err(crate::run::error::RunError::new(
            crate::run::error::Kind::Attach,
            why,
        )),
        t0,
    );
    assert!(c.stopping());
    assert_eq!(
        sends(&acts),
        [(0, format!("stop {}", exit::STARTUP_TIMEOUT))]
    );
}

#[test]
fn a_lost_node_requeues_with_on_node_failure_requeue_and_nothing_else_does() {
    let requeues = |acts: &[Action]| {
        acts.iter()
            .filter(|a| matches!(a, Action::Requeue(_)))
            .count()
    };
    let yaml = "engine: vllm\nmodel: m\nparallel:\n  tensor: 3\non_node_failure: requeue\n";
    // node3's launcher is gone: exit 4, and the job goes back in the queue
    let (mut c, infos, t0) = setup(yaml, 3, &[]);
    hello_all(&mut c, &infos, t0);
    let acts = c.on_closed(2, t0 + Duration::from_secs(1));
    assert!(sends(&acts).contains(&(0, format!("stop {}", exit::PEER_FAILURE))));
    assert_eq!(requeues(&acts), 1, "{acts:?}");
    // the engine's own failure is not the cluster's: no requeue
    let (mut c, infos, t0) = setup(yaml, 3, &[]);
    hello_all(&mut c, &infos, t0);
    let acts = c.on_message(0, exited(Kind::Engine), t0 + Duration::from_secs(1));
    assert!(c.stopping());
    assert_eq!(requeues(&acts), 0, "{acts:?}");
    // and without the key a lost node only stops the job
    let (mut c, infos, t0) = setup(RAY, 3, &[]);
    hello_all(&mut c, &infos, t0);
    assert_eq!(requeues(&c.on_closed(2, t0 + Duration::from_secs(1))), 0);
}

#[test]
fn a_moving_phase_extends_the_engine_deadline_up_to_the_cap() {
    let yaml = "engine: vllm\nmodel: m\nparallel: {tensor: 1}\nvllm: {backend: mp}\ntimeouts: {engine_ready: 10s, engine_ready_max: 25s}\n";
    let (mut c, infos, t0) = setup(yaml, 1, &[]);
    let acts = hello_all(&mut c, &infos, t0);
    assert_eq!(sends(&acts), [(0, "engine".to_string())]);
    let s = Duration::from_secs(1);
    let phase = |c: &mut Coord, p: &str, t: Instant| {
        c.on_message(
            0,
            ToMaster::Phase {
                name: Kind::Engine,
                slot: 0,
                phase: p.into(),
            },
            t,
        )
    };
    let acts = phase(&mut c, "loading weights", t0 + 8 * s);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Event(Event::EnginePhase { .. }, _))));
    // the endpoint file (and `ray-launch status`) shows it
    let shown = acts.iter().find_map(|a| match a {
        Action::Replicas(v, _) => v[0].phase.clone(),
        _ => None,
    });
    assert_eq!(shown.as_deref(), Some("loading weights"));
    assert!(
        beat(&mut c, t0 + 12 * s).is_empty() && !c.stopping(),
        "extended to 18 s"
    );
    phase(&mut c, "compiling", t0 + 17 * s);
    beat(&mut c, t0 + 24 * s);
    assert!(!c.stopping(), "extended to the cap, 25 s");
    let acts = beat(&mut c, t0 + 26 * s);
    assert!(c.stopping());
    let why = acts.iter().find_map(|a| match a {
        Action::Send(_, ToRank::Stop { reason, .. }) => Some(reason.clone()),
        _ => None,
    });
    assert!(
        why.as_deref().is_some_and(|w| w.contains(
            "did not come up within 10s (timeouts.engine_ready); stuck in `compiling` for 9s"
        )),
        "{why:?}"
    );
    // without phases the first deadline holds
    let (mut c, infos, t0) = setup(yaml, 1, &[]);
    hello_all(&mut c, &infos, t0);
    beat(&mut c, t0 + 11 * s);
    assert!(c.stopping());
}

#[test]
fn a_replica_that_never_comes_up_does_not_hold_the_job_back_once_down() {
    let yaml = replicas_yaml("replicas:\n  max_restarts: 1\ntimeouts:\n  engine_ready: 60s\n");
    let (mut c, infos, t0) = setup(&yaml, 2, &["python", "x.py"]);
    hello_all(&mut c, &infos, t0);
    c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Engine,
            slot: 0,
        },
        t0,
    );
    c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Router,
            slot: 0,
        },
        t0,
    );
    // replica 1 misses its deadline: restarted once
    let s = Duration::from_secs(1);
    for i in 1..60 {
        assert!(beat(&mut c, t0 + i * s).is_empty(), "at {i} s");
    }
    let acts = beat(&mut c, t0 + 60 * s);
    assert_eq!(resets(&acts), [1], "{acts:?}");
    c.on_message(1, ToMaster::ResetDone { slot: 0 }, t0 + 61 * s);
    assert_eq!(sends(&beat(&mut c, t0 + 63 * s)), [(1, "engine".into())]);
    // and again: now it stays down, and the job is ready with replica 0 alone
    for i in 64..123 {
        assert!(beat(&mut c, t0 + i * s).is_empty(), "at {i} s");
    }
    let acts = beat(&mut c, t0 + 123 * s);
    assert_eq!(states(&acts).unwrap()[1], (ReplicaState::Down, 1));
    assert!(is_ready(&acts), "{acts:?}");
    assert!(sends(&acts).contains(&(0, "client".into())), "{acts:?}");
}

#[test]
fn side_by_side_replicas_restart_one_slot_of_a_node() {
    let yaml = replicas_yaml("").replace("nodes_per_replica: 1", "replicas_per_node: 2");
    let (mut c, infos, t0) = setup_gpus(&yaml, 2, &[], 2);
    let acts = hello_all(&mut c, &infos, t0);
    assert_eq!(engine_starts(&acts), [(0, 0), (0, 1), (1, 0), (1, 1)]);
    for r in 0..2 {
        for slot in 0..2 {
            c.on_message(
                r,
                ToMaster::Up {
                    name: Kind::Engine,
                    slot,
                },
                t0,
            );
        }
    }
    assert!(is_ready(&c.on_message(
        0,
        ToMaster::Up {
            name: Kind::Router,
            slot: 0
        },
        t0
    )));
    // node2's second engine (replica 3) dies: only that slot resets
    let s = Duration::from_secs(1);
    let mut exit = exited(Kind::Engine);
    if let ToMaster::Exited { slot, .. } = &mut exit {
        *slot = 1;
    }
    let acts = c.on_message(1, exit, t0 + s);
    let reset: Vec<(usize, usize)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Send(r, ToRank::Reset { slot, .. }) => Some((*r, *slot)),
            _ => None,
        })
        .collect();
    assert_eq!(reset, [(1, 1)]);
    let st: Vec<ReplicaState> = states(&acts).unwrap().into_iter().map(|x| x.0).collect();
    use ReplicaState::*;
    assert_eq!(st, [Ready, Ready, Ready, Restarting]);
    c.on_message(1, ToMaster::ResetDone { slot: 1 }, t0 + s);
    let acts = beat(&mut c, t0 + 3 * s);
    assert_eq!(engine_starts(&acts), [(1, 1)], "{acts:?}");
    // a lost node takes both of its replicas down
    let acts = c.on_closed(1, t0 + 4 * s);
    let st: Vec<ReplicaState> = states(&acts).unwrap().into_iter().map(|x| x.0).collect();
    assert_eq!(st, [Ready, Ready, Down, Down]);
    assert!(!c.stopping());
}
