//! Run: carry out a [`crate::plan::Plan`] on this node and supervise it until an exit code.
//!
//! Owns: the rank's state machine and its async shell ([`rank`]), the master's coordinator
//! ([`master`]), the event log's vocabulary ([`events`]), the rank-to-rank [`channel`], children in their own sessions ([`proc`]),
//! who holds which port here ([`ports`]),
//! signals ([`signals`]), the launcher's own stalls ([`stall`]), each replica's restart budget
//! ([`restarts`]) and the [`reaper`]. Reads the plan and the settings; never re-reads
//! flags, the environment or the YAML, and decides nothing the plan already says (what starts
//! when, how it is known to be up, which deadline covers it, in which stage it stops).

pub mod channel;
pub mod events;
pub mod master;
pub mod phases;
pub mod ports;
pub mod proc;
pub mod progress;
pub mod rank;
pub mod reaper;
pub mod restarts;
pub mod signals;
pub mod stall;
