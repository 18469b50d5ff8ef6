//! The master's word on each replica, from the job's endpoint file (`--state-file`): a
//! replica serves only while the master calls it `ready` — so one whose rank saw a stall
//! leaves the rotation the moment the master hears of it (not when its restart kills the
//! engine), and one that starts or restarts joins only once it generated a token (the rank's
//! check before it reports the replica up). The file is written atomically by the master;
//! the router looks at its modification time every quarter second and reads it on a change.

use super::Shared;
use crate::endpoint::{EndpointFile, ReplicaState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Each replica the file names, with why it must not serve (`None`: it may).
pub(super) fn holds(f: &EndpointFile) -> Vec<(usize, Option<String>)> {
    f.replicas
        .iter()
        .map(|r| {
            let held = (r.state != ReplicaState::Ready).then(|| {
                let why = r
                    .reason
                    .as_deref()
                    .map(|w| format!(": {w}"))
                    .unwrap_or_default();
                format!("the job's master says it is {}{why}", r.state.as_str())
            });
            (r.replica, held)
        })
        .collect()
}

/// Follow the file for as long as the router runs.
pub(super) async fn watch(st: Arc<Shared>, path: PathBuf) {
    let mut seen: Option<(SystemTime, u64)> = None;
    loop {
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp.is_some() && stamp != seen {
            seen = stamp;
            if let Ok(Some(f)) = EndpointFile::read(&path) {
                for (i, held) in holds(&f) {
                    if st.replicas.get(i).is_some_and(|r| !r.attached) {
                        st.update_health(i, |h| h.on_state(held, Instant::now()));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::ReplicaStatus;

    #[test]
    fn only_a_ready_replica_may_serve() {
        let r = |replica, state, reason: Option<&str>| ReplicaStatus {
            replica,
            state,
            reason: reason.map(str::to_string),
            ..Default::default()
        };
        let f = EndpointFile {
            replicas: vec![
                r(0, ReplicaState::Ready, None),
                r(
                    1,
                    ReplicaState::Restarting,
                    Some("engine stalled: 2 request(s)"),
                ),
                r(2, ReplicaState::Starting, None),
            ],
            ..Default::default()
        };
        assert_eq!(
            holds(&f),
            vec![
                (0, None),
                (
                    1,
                    Some(
                        "the job's master says it is restarting: engine stalled: 2 request(s)"
                            .into()
                    )
                ),
                (2, Some("the job's master says it is starting".into())),
            ]
        );
    }
}
