//! The server's side: the agent `rbackup serve` that a forced command runs
//! ([`serve`]), and the backup user's login shell that runs nothing else
//! ([`shell`]).

pub mod serve;
pub mod shell;
