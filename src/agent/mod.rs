//! The server's side: the agent `rbackup serve` that a forced command runs
//! ([`serve`]; append-only, the receiving end of a replica: [`append`]), and
//! the backup user's login shell that runs nothing else ([`shell`]).

pub mod append;
pub mod serve;
pub mod shell;
