//! The rank's machine with an explicit clock.

use super::*;
use crate::run::channel::{ToMaster, ToRank};
use crate::run::error::{self as run_error, RunError};

const HB: Duration = Duration::from_secs(20);
const RDV: Duration = Duration::from_secs(300);

/// A machine in the Running phase (connected, welcomed, planned) at `t0`.
fn running(t0: Instant) -> RankMachine {
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    let acts = m.on(
        Input::FromMaster(ToRank::Welcome {
            nodes: vec![],
            block: 20000,
        }),
        t0,
    );
    assert_eq!(acts, [Action::BuildPlan(vec![], 20000)]);
    assert!(m.on(Input::Planned(Ok(())), t0).is_empty());
    assert_eq!(m.phase(), Phase::Running);
    m
}

fn exit_of(acts: &[Action]) -> Option<i32> {
    acts.iter().find_map(|a| match a {
        Action::Exit { code, .. } => Some(*code),
        _ => None,
    })
}

fn stop(code: i32, reason: &str) -> Input {
    Input::FromMaster(ToRank::Stop {
        code,
        reason: reason.into(),
        node: Some("node3".into()),
    })
}

#[test]
fn the_rendezvous_has_a_deadline_and_watches_the_master() {
    let t0 = Instant::now();
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    // the handshake said hello already
    assert!(m.on(Input::Connected, t0).is_empty());
    assert_eq!(m.phase(), Phase::Rendezvous);
    // heartbeats from the master keep it waiting; the Welcome deadline still holds
    let mut t = t0;
    while t < t0 + RDV + HB {
        assert_eq!(exit_of(&m.on(Input::Tick, t)), None, "at {:?}", t - t0);
        m.on(Input::FromMaster(ToRank::Heartbeat), t);
        t += Duration::from_secs(5);
    }
    let acts = m.on(Input::Tick, t0 + RDV + HB);
    assert_eq!(exit_of(&acts), Some(exit::STARTUP_TIMEOUT), "{acts:?}");
    // a silent master is noticed sooner
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    assert_eq!(exit_of(&m.on(Input::Tick, t0 + HB)), None);
    assert_eq!(
        exit_of(&m.on(Input::Tick, t0 + HB + Duration::from_secs(1))),
        Some(exit::PEER_FAILURE)
    );
    // a verified refusal ends the rank with the master's code, before anything started
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    let acts = m.on(
        Input::Refused {
            code: exit::USAGE,
            reason: "connected twice".into(),
        },
        t0,
    );
    assert_eq!(exit_of(&acts), Some(exit::USAGE));
}

#[test]
fn a_stall_of_the_rank_itself_is_not_the_masters_silence() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let hb = HB / 10;
    let mut t = t0 + hb;
    assert_eq!(exit_of(&m.on(Input::Tick, t)), None);
    // this launcher was stopped for ten minutes; the master's heartbeats wait unread
    t += Duration::from_secs(600);
    assert_eq!(exit_of(&m.on(Input::Tick, t)), None);
    assert!(!m.master_silent());
    // then the master stays silent while this rank runs
    let from = t;
    let mut n = 0;
    while !m.master_silent() {
        t += hb;
        m.on(Input::Tick, t);
        n += 1;
        assert!(n < 100);
    }
    // the silence counted: before the stall, one interval of the gap, and after it
    assert!(
        t - from > HB - 2 * hb && t - from <= HB - hb,
        "{:?}",
        t - from
    );
}

#[test]
fn a_plan_that_cannot_be_built_is_reported_to_the_master() {
    let t0 = Instant::now();
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    let acts = m.on(
        Input::Planned(Err(RunError::new(
            run_error::Kind::Files,
            "ray.temp_dir: taken",
        ))),
        t0,
    );
    assert!(acts.iter().any(|a| matches!(a, Action::Send(ToMaster::Failed { code: 2, reason, .. }) if reason.contains("taken"))), "{acts:?}");
    assert_eq!(exit_of(&acts), Some(exit::USAGE));
}

#[test]
fn the_first_cause_wins() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let acts = m.on(stop(exit::ENGINE_FAILURE, "engine on node3 ended"), t0);
    assert!(acts.contains(&Action::Teardown));
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::Error(s) if s.contains("[caused by node3]"))));
    // later causes: a signal, the master's loss, a local death, silence: no second stop
    for later in [
        Input::Signal(15),
        Input::MasterLost("closed".into()),
        Input::Local(Event::Exited {
            kind: Kind::RayWorker,
            slot: 0,
            status: "exit code 1".into(),
            code: 1,
            log: None,
            tail: vec![],
        }),
        stop(exit::PEER_FAILURE, "other"),
    ] {
        let acts = m.on(later, t0 + Duration::from_millis(10));
        assert!(
            !acts.contains(&Action::Teardown)
                && !acts.iter().any(|a| matches!(
                    a,
                    Action::Send(ToMaster::Exited { .. } | ToMaster::Stopping { .. })
                )),
            "{acts:?}"
        );
    }
    let acts = m.on(Input::Tick, t0 + HB * 2);
    assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)]);
    let acts = m.on(Input::TornDown(vec![]), t0 + HB * 2);
    assert_eq!(acts[0], Action::Send(ToMaster::Stopped));
    assert_eq!(exit_of(&acts), Some(exit::ENGINE_FAILURE));
}

#[test]
fn a_local_death_while_the_master_is_gone_stops_with_peer_failure() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let acts = m.on(Input::MasterLost("connection closed".into()), t0);
    assert!(acts.contains(&Action::Teardown));
    assert!(acts.iter().any(
        |a| matches!(a, Action::Error(s) if s.contains("lost the connection to the master node1"))
    ));
    assert!(m.master_closed());
    // the engine dies during the teardown: reported nowhere, the code stays
    let acts = m.on(
        Input::Local(Event::Exited {
            kind: Kind::Engine,
            slot: 0,
            status: "signal 9 (SIGKILL)".into(),
            code: 137,
            log: None,
            tail: vec![],
        }),
        t0,
    );
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(
        exit_of(&m.on(Input::TornDown(vec![]), t0)),
        Some(exit::PEER_FAILURE)
    );
}

#[test]
fn master_silence_past_the_heartbeat_timeout_stops_the_rank() {
    let t0 = Instant::now();
    let mut m = running(t0);
    // heartbeats from the master keep it alive
    m.on(Input::FromMaster(ToRank::Heartbeat), t0 + HB / 2);
    let acts = m.on(Input::Tick, t0 + HB);
    assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)]);
    // ticking every interval, as the shell does: stopped at the first tick past the timeout
    let mut t = t0 + HB;
    let acts = loop {
        t += HB / 10;
        let acts = m.on(Input::Tick, t);
        if t <= t0 + HB / 2 + HB {
            assert_eq!(acts, [Action::Send(ToMaster::Heartbeat)], "at {:?}", t - t0);
        } else {
            break acts;
        }
    };
    assert!(acts.contains(&Action::Teardown), "{acts:?}");
    assert!(acts.iter().any(|a| matches!(a, Action::Error(s) if s.contains("the master node1 went silent: nothing for 20s"))));
    assert_eq!(
        exit_of(&m.on(Input::TornDown(vec![]), t0)),
        Some(exit::PEER_FAILURE)
    );
}

#[test]
fn a_signal_in_each_phase() {
    let t0 = Instant::now();
    // connecting: nothing was started, nothing to tell
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    let acts = m.on(Input::Signal(15), t0);
    assert!(!acts.iter().any(|a| matches!(a, Action::Send(_))));
    assert_eq!(exit_of(&acts), Some(143));
    // rendezvous: tell the master, exit at once
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    let acts = m.on(Input::Signal(2), t0);
    assert_eq!(acts[0], Action::Send(ToMaster::Stopping { signal: 2 }));
    assert_eq!(exit_of(&acts), Some(130));
    // running: tell the master and tear down; a repeat within 1 s is Slurm's duplicate,
    // a later one kills at once
    let mut m = running(t0);
    let acts = m.on(Input::Signal(15), t0);
    assert_eq!(acts[0], Action::Send(ToMaster::Stopping { signal: 15 }));
    assert!(acts.contains(&Action::Teardown));
    assert_eq!(m.phase(), Phase::Stopping);
    assert!(m
        .on(Input::Signal(15), t0 + Duration::from_millis(10))
        .is_empty());
    let acts = m.on(Input::Signal(15), t0 + Duration::from_secs(2));
    assert!(acts.contains(&Action::KillAll), "{acts:?}");
    assert!(!acts.contains(&Action::Teardown));
    let acts = m.on(Input::TornDown(vec![]), t0 + Duration::from_secs(3));
    assert!(
        matches!(&acts[1], Action::Exit { code: 143, summary: Some(s) } if s.contains("all processes of this job on node2 are gone; exit 143")),
        "{acts:?}"
    );
    // SIGUSR1 drains: a clean stop
    let mut m = running(t0);
    m.on(Input::Signal(10), t0);
    let acts = m.on(Input::TornDown(vec![]), t0);
    assert!(
        matches!(&acts[1], Action::Exit { code: 0, summary: Some(s) } if s.starts_with("done: SIGUSR1: draining")),
        "{acts:?}"
    );
}

#[test]
fn sigusr1_in_a_service_job_asks_for_the_handover_and_serves_on() {
    let t0 = Instant::now();
    let mut m = running(t0).for_service(true);
    let acts = m.on(Input::Signal(10), t0);
    assert_eq!(
        acts,
        [
            Action::Send(ToMaster::HandoverNow),
            Action::Info("SIGUSR1: handing over to a successor (service)".into())
        ]
    );
    assert!(!acts.contains(&Action::Teardown));
    // the time limit's SIGTERM later is a first, graceful one
    let acts = m.on(Input::Signal(15), t0 + Duration::from_secs(1));
    assert!(acts.contains(&Action::Teardown), "{acts:?}");
    assert!(!acts.contains(&Action::KillAll), "{acts:?}");
}

#[test]
fn a_stop_during_startup_starts_nothing_more() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let acts = m.on(
        Input::FromMaster(ToRank::Start {
            name: Kind::RayWorker,
            slot: 0,
        }),
        t0,
    );
    assert_eq!(acts, [Action::Start(Kind::RayWorker, 0)]);
    let acts = m.on(
        stop(exit::STARTUP_TIMEOUT, "ray-head on node1 did not come up"),
        t0,
    );
    assert!(acts.contains(&Action::Teardown));
    assert!(m
        .on(
            Input::FromMaster(ToRank::Start {
                name: Kind::Engine,
                slot: 0
            }),
            t0
        )
        .is_empty());
    // what is already running still reports (the master counts it), but nothing starts
    let acts = m.on(Input::Local(Event::Up(Kind::RayWorker, 0)), t0);
    assert!(acts.contains(&Action::Send(ToMaster::Up {
        name: Kind::RayWorker,
        slot: 0
    })));
    assert_eq!(
        exit_of(&m.on(Input::TornDown(vec![]), t0)),
        Some(exit::STARTUP_TIMEOUT)
    );
}

#[test]
fn a_stop_or_a_lost_master_during_the_rendezvous_exits_at_once() {
    let t0 = Instant::now();
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    assert_eq!(
        exit_of(&m.on(stop(exit::USAGE, "settings differ"), t0)),
        Some(exit::USAGE)
    );
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    assert_eq!(
        exit_of(&m.on(Input::MasterLost("closed".into()), t0)),
        Some(exit::PEER_FAILURE)
    );
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    assert_eq!(
        exit_of(&m.on(Input::Unreachable("cannot reach".into()), t0)),
        Some(exit::STARTUP_TIMEOUT)
    );
    let mut m = RankMachine::new("node2".into(), "node1".into(), HB / 10, HB, RDV, t0);
    m.on(Input::Connected, t0);
    assert_eq!(
        exit_of(&m.on(
            Input::Planned(Err(RunError::new(run_error::Kind::Plan, "bad"))),
            t0
        )),
        Some(exit::USAGE)
    );
}

#[test]
fn a_client_exit_is_reported_not_a_failure_here() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let acts = m.on(
        Input::Local(Event::Exited {
            kind: Kind::Client,
            slot: 0,
            status: "exit code 3".into(),
            code: 3,
            log: None,
            tail: vec![],
        }),
        t0,
    );
    assert!(matches!(&acts[0], Action::Info(s) if s == "client exited with exit code 3"));
    assert!(matches!(
        &acts[1],
        Action::Send(ToMaster::Exited { code: 3, .. })
    ));
    assert!(!acts.contains(&Action::Teardown), "the master decides");
}
