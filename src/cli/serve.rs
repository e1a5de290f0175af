//! The agent's options (`rbackup serve`): fixed by the server's admin in a
//! forced command, never chosen by the desktop.

use std::path::PathBuf;

use clap::Args;

/// Options of the agent.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Only send data; refuse to write anything (the default)
    #[arg(long, conflicts_with_all = ["write", "append_only"])]
    pub read_only: bool,

    /// Only receive data (restores); refuse to send
    #[arg(long, conflicts_with = "append_only")]
    pub write: bool,

    /// Only take replicas into --root (the backups folder): create new snapshots and finish
    /// its own interrupted ones; never delete, rename over or change a complete one
    #[arg(long, requires = "root")]
    pub append_only: bool,

    /// Serve only this directory and what is beneath it
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// Run this command (/bin/sh -c) before each backup lists the root, e.g. a
    /// database dump; fixed here, in the forced command, the desktop can only
    /// trigger it
    #[arg(long, value_name = "CMD")]
    pub before: Option<String>,

    /// Seconds the --before command may run before it is killed
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub before_timeout: u64,

    /// Leave the metadata of --root itself as it is (a local restore into a
    /// folder that was there before; set by `restore`, not for forced commands)
    #[arg(long, hide = true, requires = "write")]
    pub keep_root_metadata: bool,
}
