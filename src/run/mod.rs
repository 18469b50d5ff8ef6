//! Run: carry out a [`crate::plan::Plan`] on this node and supervise it until an exit code.
//!
//! Owns: the rank's state machine and its async shell ([`rank`]), the master's coordinator
//! ([`master`]), the event log's vocabulary ([`events`]), the rank-to-rank [`channel`],
//! children in their own sessions ([`proc`]), who holds which port here ([`ports`]),
//! signals ([`signals`]), the launcher's own stalls ([`stall`]), each replica's restart budget
//! ([`restarts`]) and the [`reaper`]. Reads the plan and the settings; never re-reads
//! flags, the environment or the YAML, and decides nothing the plan already says (what starts
//! when, how it is known to be up, which deadline covers it, in which stage it stops).
//!
//! [`node`] decides what this node runs: the rank always, and on the master's node the
//! master's channel too; the rank never starts the master itself.

pub mod channel;
pub mod error;
pub mod events;
pub mod master;
pub mod phases;
pub mod ports;
pub mod preflight;
pub mod proc;
pub mod progress;
pub mod rank;
pub mod reaper;
pub mod restarts;
pub mod signals;
pub mod stall;

use crate::auth::Auth;
use crate::exit;
use crate::input::gather::{Gathered, Security};
use crate::plan::Plan;
use tokio::sync::{mpsc, oneshot};

/// Run this node until its exit code: on the master's node the channel is bound first (so a
/// port clash fails fast) and the master served, then the rank runs.
pub async fn node(
    g: Gathered,
    preview: Plan,
    security: Security,
    sigs: mpsc::UnboundedReceiver<i32>,
) -> i32 {
    // what this launcher's children orphan stays its descendant (teardown finds it)
    proc::become_subreaper();
    let me = g.step.self_rank.unwrap_or(0);
    let master = if me == 0 {
        match serve_master(&g, &security).await {
            Some(h) => Some(h),
            None => return exit::LAUNCH_FAILURE,
        }
    } else {
        None
    };
    rank::run(g, preview, security, sigs, master).await
}

/// Listen on the first of the step's candidate channel ports that is free here and serve
/// the master on it; none free: said, and `None`.
async fn serve_master(g: &Gathered, security: &Security) -> Option<rank::MasterHandle> {
    let s = &g.settings;
    let mut taken = Vec::new();
    for c in crate::plan::step_blocks(&g.step, s.port_range) {
        match master::bind(c).await {
            Ok(l) => {
                let (tx, done) = oneshot::channel();
                tokio::spawn(master::serve(
                    l,
                    s.clone(),
                    g.step.clone(),
                    Auth::for_master(security.method.clone()),
                    tx,
                ));
                if !taken.is_empty() {
                    tracing::warn!(
                        "launcher channel port(s) taken on this node: {}; using {c}",
                        taken.join(", ")
                    );
                }
                return Some(rank::MasterHandle { port: c, done });
            }
            Err(e) => taken.push(format!("{c} ({e}; held by {})", ports::holder(c))),
        }
    }
    tracing::error!("cannot listen on any of this step's launcher channel ports: {}; other jobs on this node hold them (see ports.range)", taken.join(", "));
    None
}
