//! rbackup: pull snapshots of a server over SSH into timestamped folders,
//! unchanged files hardlinked to the previous snapshot.
//!
//! The data flow, and the folder each step lives in:
//!
//! 1. `main` parses the command line ([`cli`]) and the config ([`config`]) into a [`config::Job`],
//!    and runs one of the commands ([`cmd`]).
//! 2. [`cmd::backup`] locks the destination ([`store::lock`]) and picks the basis snapshots ([`store`]).
//! 3. [`transport`] starts the agent — over SSH, or as a local child — and [`session`] opens the
//!    session with its hello ([`wire`]) and drives the sink over it;
//!    every wait on it is bounded ([`transport::link`]), and SIGINT/SIGTERM stop a run at a safe
//!    point ([`interrupt`]).
//! 4. The agent ([`agent`]) runs the [`source`]: it walks its root and streams the listing.
//! 5. The desktop runs the [`sink`]: for each entry [`plan`] decides keep / link / copy / fetch.
//! 6. Fetches are pipelined; changed files come as rsync deltas against the basis.
//! 7. Every write goes through [`fs::writer`] (temporary name, metadata from [`fs::meta`], rename),
//!    and every path through [`fs::safefs`] directory handles: nothing is followed, nothing escapes.
//! 8. Directories get their metadata after their children.
//! 9. The snapshot is flushed to disk and renamed from `.incomplete` to its final name; the
//!    [`store::manifest`] records every entry with its content [`digest`].
//! 10. [`report`] counts what happened, [`cmd::after_run`] leaves the summary and sends the
//!     mail ([`notify`]); [`error`] turns problems into the exit code.
//!
//! [`setup`] prepares both sides once; [`log`] and [`progress`] are what the admin sees;
//! [`ui`] is a web console that reads the store and runs the commands above as child processes.

pub mod agent;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod digest;
pub mod error;
pub mod fs;
pub mod hooks;
pub mod interrupt;
pub mod log;
pub mod notify;
pub mod plan;
pub mod progress;
pub mod report;
pub mod session;
pub mod setup;
pub mod sink;
pub mod source;
pub mod store;
pub mod transport;
pub mod ui;
pub mod wire;
