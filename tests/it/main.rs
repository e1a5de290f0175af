//! The integration tests, as one binary: the shared harness (`common`: a
//! rich source tree, an independent tree comparison, a test sshd, an SMTP
//! server, the benchmark data) is compiled once. Each module is one area;
//! they run the real `rbackup` binary, as root, against real parts.
//!
//! Two suites stay binaries of their own: `tests/sink_fuzz.rs` (its
//! counting allocator must see only its own sessions) and
//! `tests/protocol_props.rs` (pure property tests of the wire format).

#![allow(clippy::pedantic)] // test code: plain asserts over polish

mod common;

mod all_jobs;
mod backup;
mod bench_smoke;
mod crash;
mod depth;
mod docs;
mod email;
mod errors;
mod history;
mod hooks;
mod hostile;
mod interrupt;
mod man;
mod package;
mod races;
mod replicate;
mod replicate_ssh;
mod reports;
mod restore;
mod resume;
mod retention;
mod selection;
mod setup;
mod ssh;
mod systemd;
mod ui;
mod ui_browser;
mod ui_security;
