//! Input: what the user, Slurm and this machine say, turned once into validated
//! [`settings::Settings`], the [`slurm::Step`] and this node's facts ([`gather`]).
//!
//! Owns: the YAML schema, Slurm's variables and hostlists, host facts and address rules, the
//! CLI > env > file > default merge. May not touch: the plan or the runtime (nothing here
//! starts a process or opens a socket; `gather` only reads and resolves names).

pub mod config;
pub mod gather;
pub mod host;
pub mod hostlist;
pub mod settings;
pub mod slurm;
