//! ray-launch: start Ray / vLLM / SGLang across the nodes of a Slurm step, supervise every
//! process and every peer, and tear everything down on time.
//!
//! # Layout
//! Data flows one way, and the folders follow it:
//!
//! ```text
//! CLI + environment + YAML ──► input/ ──► plan/ ──► run/ ──► exit code
//!                               Settings    Plan      rank + master
//! ```
//!
//! - [`input`]: what the user, Slurm and the machine say, validated once:
//!   [`input::config`] (YAML schema, errors with key and line), [`input::slurm`] (the step, the
//!   election rule), [`input::hostlist`], [`input::host`] (machine facts, address rules),
//!   [`input::settings`] (CLI > env > file > default, plain durations, derived deadlines),
//!   [`input::gather`] (the facts a command needs, free of clap types).
//! - [`plan`]: the pure plan per step — roles, addresses, ports, every command line and
//!   variable, and each command's [`plan::lifecycle`] (when it starts, how it is known to be
//!   up, which deadline covers it, in which teardown stage it stops). No I/O.
//! - [`run`]: carries the plan out: [`run::rank`] (every node: a pure state machine and a thin
//!   async shell), [`run::master`] (the master's pure state machine, one child module per
//!   concern, and its shell), [`run::events`] (the event log's vocabulary), [`run::channel`]
//!   (the typed connection between them), [`run::proc`], [`run::signals`], [`run::reaper`].
//! - [`auth`]: who may join a job (munge or a per-user secret, or a local run's own key),
//!   the per-job key, and what is derived from it (Ray token, API key); [`private`]: files
//!   and directories only the job's user can read, and removing only what the job created.
//! - Contracts, one module each: [`endpoint`] (the endpoint file), [`exit`] (exit codes),
//!   [`env_vars`] (variable names), [`error`] (`error:` / `caused by:` / `hint:`).
//! - [`route`]: the router (`ray-launch route`), one OpenAI endpoint over the replicas; a
//!   child of the master's launcher, planned and supervised like the engine.
//! - [`service`]: a chain of jobs under one name, key and URL (its directory, and the pure
//!   [`service::handover`]); the master's [`run::master`] carries it out, `route --service`
//!   follows it.
//! - [`cli`]: clap and the subcommands; [`logging`]: `[rank node]`-prefixed lines.
//!
//! Imports go one way: `run` → `plan` → `input` (and `plan` → `route::attach`, the spec the
//! router owns); nothing in `input` or `plan` names `run` or `cli`, `route` names no `plan`,
//! and `run` reads `Settings`, never the YAML's `Config`.

// module docs name their private rooms (`cargo doc --document-private-items` shows them)
#![allow(rustdoc::private_intra_doc_links)]

pub mod auth;
pub mod batch;
pub mod cli;
pub mod endpoint;
pub mod env_vars;
pub mod error;
pub mod exit;
pub mod input;
pub mod logging;
pub mod plan;
pub mod private;
pub mod route;
pub mod run;
pub mod service;
