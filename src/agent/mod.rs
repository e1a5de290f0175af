//! The server's side: the agent `rbackup serve` that a forced command runs.

pub mod serve;
