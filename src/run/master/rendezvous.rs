//! The rendezvous: every rank's hello checked (place in the step, version, settings), the
//! port block chosen from what the nodes found taken, the plan built, the attach gate.

use super::replicas::Rep;
use super::{diff_keys, Action, Coord, Phase};
use crate::exit;
use crate::plan::lifecycle::StartAfter;
use crate::plan::{self, NodeInfo};
use crate::run::channel::{self, Hello, ToRank};
use crate::run::error::{Kind, RunError};
use crate::run::events::Event;

fn refused(msg: String) -> RunError {
    RunError::new(Kind::Refused, msg)
}
use std::time::Instant;

impl Coord {
    /// A connection said Hello as `rank`. `Err` = refuse this connection with that reason.
    pub fn on_hello(
        &mut self,
        hello: &Hello,
        now: Instant,
    ) -> Result<(usize, Vec<Action>), RunError> {
        let Hello {
            protocol,
            node,
            node_rank,
            version,
            digest,
            info,
            settings_digests,
            busy,
            ..
        } = hello;
        let rank = *node_rank;
        if *protocol != channel::PROTOCOL {
            return Err(refused(format!(
                "{node} speaks channel protocol {protocol}, the master {}",
                channel::PROTOCOL
            )));
        }
        if rank >= self.n() || self.step.nodes[rank] != *node {
            return Err(refused(format!(
                "{node} claims node rank {rank}, which is not its place in the step's node list"
            )));
        }
        if self.peers[rank].hello.is_some() || self.peers[rank].connected {
            return Err(refused(format!(
                "node rank {rank} ({node}) connected twice: more than one task on that node?"
            )));
        }
        let mut acts = Vec::new();
        if self.phase != Phase::Rendezvous {
            return Err(refused(format!(
                "{node} connected after the rendezvous was over"
            )));
        }
        self.peers[rank].connected = true;
        self.peers[rank].last_seen = now;
        if *version != self.version {
            acts.extend(self.stop(
                exit::USAGE,
                format!("{node} runs ray-launch {version}, the master ({}) runs {}: use one binary for the whole step", self.node(0), self.version),
                Some(rank),
            ));
            return Ok((rank, acts));
        }
        if *digest != self.settings.digest {
            let keys = diff_keys(&self.master_digests, settings_digests);
            let keys = if keys.is_empty() {
                "unknown".to_string()
            } else {
                keys.join(", ")
            };
            acts.extend(self.stop(
                exit::USAGE,
                format!("{node}'s settings differ from the master's ({}) in: {keys}; every rank must get the same config, flags and client command", self.node(0)),
                Some(rank),
            ));
            return Ok((rank, acts));
        }
        if !hello.preflight.is_empty() {
            // from a peer: bounded, printable
            let found: Vec<String> = hello
                .preflight
                .iter()
                .take(8)
                .map(|f| f.chars().filter(|c| !c.is_control()).take(300).collect())
                .collect();
            acts.extend(self.stop(
                exit::LAUNCH_FAILURE,
                format!("{node} failed its pre-flight check: {}", found.join("; ")),
                Some(rank),
            ));
            return Ok((rank, acts));
        }
        self.peers[rank].hello = Some(info.clone());
        self.peers[rank].busy = busy.iter().take(plan::CANDIDATE_BLOCKS).cloned().collect();
        if self.peers.iter().all(|p| p.hello.is_some()) {
            acts.extend(self.all_connected(now));
        }
        Ok((rank, acts))
    }

    /// The first candidate block that no node found taken, or why there is none.
    fn choose_block(&self) -> Result<u16, RunError> {
        let taken = |base: u16| {
            (0..self.n()).find_map(|r| {
                self.peers[r]
                    .busy
                    .iter()
                    .find(|b| b.base == base)
                    .map(|b| format!("on {}: {}", self.node(r), b.why))
            })
        };
        let mut why: Vec<String> = Vec::new();
        for &c in &self.candidates {
            match taken(c) {
                None => return Ok(c),
                Some(w) if !why.contains(&w) => why.push(w),
                Some(_) => {}
            }
        }
        Err(RunError::new(
            Kind::Ports,
            format!(
                "every candidate port block of this step is taken ({}): {}",
                self.candidates
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                why.join("; ")
            ),
        ))
    }

    fn all_connected(&mut self, now: Instant) -> Vec<Action> {
        let nodes: Vec<NodeInfo> = self
            .peers
            .iter()
            .map(|p| p.hello.clone().expect("all hello"))
            .collect();
        let block = match self.choose_block() {
            Ok(b) => b,
            Err(e) => {
                self.phase = Phase::Starting;
                return self.stop(e.exit_code(), e.msg, None);
            }
        };
        let channel = (self.channel_port != block).then_some(self.channel_port);
        let plan = match plan::build_in(&self.settings, &self.step, &nodes, block, channel) {
            Ok(p) => p,
            Err(e) => return self.stop(exit::USAGE, e.report().replace('\n', " "), None),
        };
        let mut acts = vec![
            self.event(Event::RendezvousComplete { nodes: self.n() }, None),
            Action::Info(format!(
                "rendezvous complete: all {} node(s) connected",
                self.n()
            )),
        ];
        for r in 0..self.n() {
            acts.push(Action::Send(
                r,
                ToRank::Welcome {
                    nodes: nodes.clone(),
                    block,
                },
            ));
        }
        self.phase = Phase::Starting;
        self.joined = vec![false; plan.replicas];
        self.reps = vec![Rep::new(&self.settings.policy); plan.replicas];
        self.router_up = plan.router.is_none();
        self.restarts = plan.restarts_replicas(&self.settings);
        let attached = plan.attached.clone();
        self.plan = Some(plan);
        acts.push(self.replicas_action());
        self.batch_unchecked = self.settings.batch.is_some();
        if !attached.is_empty() {
            // nothing starts before every attached endpoint answers
            self.attaching = true;
            acts.push(Action::Info(format!(
                "checking the attached endpoint(s): {}",
                attached
                    .iter()
                    .map(|a| format!("{} ({})", a.name, a.url))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            acts.push(Action::CheckAttach(attached));
            return acts;
        }
        acts.extend(self.begin(now));
        acts
    }

    /// Start the job once its checks passed: the batch input's, if it has one.
    fn begin(&mut self, now: Instant) -> Vec<Action> {
        if self.batch_unchecked {
            return vec![Action::CheckBatch];
        }
        self.start_after(0..self.n(), StartAfter::Rendezvous, None, now)
    }

    /// The batch input's check: valid (its request count), or the first bad line (the job
    /// stops with exit 2, nothing started).
    pub fn on_batch_checked(&mut self, result: Result<u64, String>, now: Instant) -> Vec<Action> {
        if !self.batch_unchecked || self.phase != Phase::Starting {
            return Vec::new();
        }
        self.batch_unchecked = false;
        match result {
            Err(e) => self.stop(exit::USAGE, format!("bad batch input: {e}"), None),
            Ok(requests) => {
                let mut acts = vec![
                    self.event(Event::BatchChecked { requests }, None),
                    Action::Info(format!("batch input checked: {requests} request(s)")),
                ];
                acts.extend(self.begin(now));
                acts
            }
        }
    }

    /// What the check of the attached endpoints found: each one's model ids, or why one
    /// does not answer (the job then stops with nothing started).
    pub fn on_attach_checked(
        &mut self,
        result: Result<Vec<(String, Vec<String>)>, RunError>,
        now: Instant,
    ) -> Vec<Action> {
        if !self.attaching || self.phase != Phase::Starting {
            return Vec::new();
        }
        self.attaching = false;
        match result {
            Err(e) => self.stop(e.exit_code(), e.msg, None),
            Ok(found) => {
                let mut acts = Vec::new();
                for (name, ids) in found {
                    acts.push(self.event(
                        Event::Attached {
                            name: name.clone(),
                            models: ids.clone(),
                        },
                        None,
                    ));
                    acts.push(Action::Info(format!(
                        "attached `{name}`: it serves {}",
                        ids.join(", ")
                    )));
                }
                acts.extend(self.begin(now));
                acts
            }
        }
    }
}
