//! One file per command. Each takes a resolved [`crate::config::Job`] (or
//! plain options) and returns an exit code; none of them sees clap.

pub mod after_run;
pub mod all_jobs;
pub mod backup;
pub mod check;
pub mod check_config;
pub mod diff;
pub mod history;
pub mod list;
pub mod prune;
pub mod replicate;
pub mod replicate_ssh;
pub mod restore;
pub mod run;
pub mod status;
pub mod verify;
