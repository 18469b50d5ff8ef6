//! ray-launch: start Ray / vLLM / SGLang across the nodes of a Slurm step, supervise every
//! process and every peer, and tear everything down on time.
//!
//! # Layout
//! Data flows one way:
//! CLI + environment + YAML → [`settings::Settings`] → a pure [`plan::Plan`] per step
//! → the supervisor that runs it → an exit code ([`exit`]).
//!
//! - [`cli`]: argument parsing and the subcommands (`run`, `plan`, `check`, `hostlist`, `wait`).
//! - [`config`]: the YAML schema, strict parsing and validation (errors name key and line).
//! - [`slurm`]: the step (nodes, this task's rank) from Slurm's variables; the election rule.
//! - [`hostlist`]: Slurm hostlist expressions, expand and compress.
//! - [`host`]: facts about this machine; address and object-store rules.
//! - [`settings`]: CLI > env > file > defaults, resolved once.
//! - [`plan`]: the pure plan: roles, addresses, ports, every command line and variable.
//! - [`rank`]: what every rank runs: connect, start what the master says, watch, tear down.
//! - [`coordinator`]: the master's rendezvous / ordered start / liveness state machine.
//! - [`channel`]: the rank-to-rank protocol (JSON lines over TCP).
//! - [`proc`]: children in their own sessions; teardown by session.
//! - [`signals`]: signals → shutdown events, with the escalation rule.
//! - [`logging`]: `[rank node]`-prefixed log lines.
//! - [`error`], [`exit`], [`env_vars`]: the error type, exit codes, variable names.

pub mod channel;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod env_vars;
pub mod error;
pub mod exit;
pub mod host;
pub mod hostlist;
pub mod logging;
pub mod plan;
pub mod proc;
pub mod rank;
pub mod reaper;
pub mod settings;
pub mod signals;
pub mod slurm;
