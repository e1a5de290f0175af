//! rbackup: pull snapshots of a server over SSH into timestamped folders,
//! unchanged files hardlinked to the previous snapshot.
//!
//! The data flow, in ten lines:
//!
//! 1. `main` parses the command line ([`cli`]) and the config ([`config`]) into a [`config::Job`].
//! 2. [`backup`] locks the destination ([`lock`]) and picks the basis snapshots ([`store`]).
//! 3. [`transport`] starts the agent — over SSH, or as a local child — and shakes hands ([`protocol`]);
//!    every wait on it is bounded ([`link`]), and SIGINT/SIGTERM stop a run at a safe point ([`interrupt`]).
//! 4. The agent ([`serve`]) runs the [`source`]: it walks its root and streams the listing.
//! 5. The desktop runs the [`sink`]: for each entry [`plan`] decides keep / link / copy / fetch.
//! 6. Fetches are pipelined; changed files come as rsync deltas against the basis.
//! 7. Every write goes through [`writer`] (temporary name, metadata from [`meta`], rename),
//!    and every path through [`safefs`] directory handles: nothing is followed, nothing escapes.
//! 8. Directories get their metadata after their children.
//! 9. The snapshot is flushed to disk and renamed from `.incomplete` to its final name.
//! 10. [`report`] counts what happened; [`exit`] turns problems into the exit code.

pub mod acl;
pub mod backup;
pub mod check;
pub mod cli;
pub mod config;
pub mod delete;
pub mod diff;
pub mod digest;
pub mod exit;
pub mod finish;
pub mod interrupt;
pub mod link;
pub mod list;
pub mod lock;
pub mod log;
pub mod manifest;
pub mod manpages;
pub mod meta;
pub mod notify;
pub mod plan;
pub mod progress;
pub mod protocol;
pub mod prune;
pub mod report;
pub mod restore;
pub mod safefs;
pub mod serve;
pub mod setup;
pub mod sink;
pub mod source;
pub mod store;
mod sys;
pub mod transport;
pub mod tree;
pub mod verify;
pub mod writer;
