//! The event log's vocabulary: every event the master records and its fields, in one place.
//!
//! An [`Event`] serialises to one JSON line (`{"event": NAME, ...fields}`); the writer adds
//! `ts`, `t` and `node` (see [`crate::run::master`]'s outputs). The README's list is this enum.

use crate::plan::lifecycle::Kind;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The master's launcher is up (on the master's node).
    LauncherStarted {
        nodes: usize,
        job_id: String,
        step_id: String,
        auth: String,
    },
    /// A connection failed the handshake (the first 20, then every hundredth).
    PeerRefused {
        peer: String,
        reason: String,
        count: u64,
    },
    RendezvousComplete {
        nodes: usize,
    },
    /// An attached endpoint answered the check, with the model ids it serves.
    Attached {
        name: String,
        models: Vec<String>,
    },
    HeadUp {
        replica: usize,
    },
    WorkerJoined {
        replica: usize,
        joined: usize,
        of: usize,
    },
    /// On the leader of a Ray replica (`node` set); else `ranks` engines at once.
    EngineStarted {
        #[serde(skip_serializing_if = "Option::is_none")]
        ranks: Option<usize>,
    },
    /// A starting engine's phase, read from its log.
    EnginePhase {
        replica: Option<usize>,
        kind: Kind,
        phase: String,
    },
    RouterUp,
    ReplicaReady {
        replica: usize,
        url: String,
        restarts: u32,
    },
    ReplicaFailed {
        replica: usize,
        reason: String,
        code: i32,
        restart: bool,
        restarts: u32,
        down: Option<String>,
    },
    ReplicaRestarting {
        replica: usize,
        restart: u32,
        node: String,
    },
    ModelDropped {
        model: String,
        reason: String,
    },
    Ready {
        url: String,
        urls: Vec<String>,
    },
    ClientStarted,
    Requeue {
        job_id: String,
        reason: String,
    },
    /// A batch job's input was read and found valid (before anything started).
    BatchChecked {
        requests: u64,
    },
    /// A batch's progress (every 10 s while it runs).
    BatchProgress {
        total: u64,
        done: u64,
        failed: u64,
        retried: u64,
        rate: f64,
        tokens_rate: f64,
        eta_s: Option<f64>,
    },
    /// A batch ended: `done` (every request has its line) or `stopped` (work left).
    BatchDone {
        state: String,
        total: u64,
        done: u64,
        failed: u64,
        resumed: u64,
        tokens_in: u64,
        tokens_out: u64,
        elapsed_s: f64,
    },
    Failure {
        code: i32,
        reason: String,
    },
    StopRequested {
        code: i32,
        reason: String,
    },
    NodeStopped,
    AllStopped,
}

impl Event {
    /// The event's name in the log.
    pub fn name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(o)) => o
                .get("event")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    }

    /// The log line: `ts`, `t`, `node`, the event's name and its fields (keys sorted).
    pub fn line(&self, ts: &str, t: f64, node: Option<&str>) -> serde_json::Value {
        let mut obj = serde_json::json!({ "ts": ts, "t": t, "event": "", "node": node });
        if let (Some(o), Ok(serde_json::Value::Object(d))) =
            (obj.as_object_mut(), serde_json::to_value(self))
        {
            o.extend(d);
        }
        obj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_json_object_with_its_name_and_fields() {
        let e = Event::ReplicaReady {
            replica: 2,
            url: "http://n:1/v1".into(),
            restarts: 1,
        };
        assert_eq!(e.name(), "replica_ready");
        let l = e.line("T", 1.5, Some("node2"));
        assert_eq!(
            l.to_string(),
            r#"{"event":"replica_ready","node":"node2","replica":2,"restarts":1,"t":1.5,"ts":"T","url":"http://n:1/v1"}"#
        );
        assert_eq!(
            Event::AllStopped.line("T", 0.0, None).to_string(),
            r#"{"event":"all_stopped","node":null,"t":0.0,"ts":"T"}"#
        );
        assert_eq!(
            Event::EngineStarted { ranks: None }
                .line("T", 0.0, None)
                .to_string(),
            r#"{"event":"engine_started","node":null,"t":0.0,"ts":"T"}"#
        );
    }
}
