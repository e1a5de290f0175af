//! The only door to disk: directory handles that follow nothing ([`safefs`]),
//! the writer that creates every entry under a temporary name ([`writer`]),
//! exact metadata ([`meta`], [`acl`]), fast whole-tree deletion ([`delete`]),
//! a local restore folder reached without following anything ([`target`]),
//! and the one place with `unsafe` ([`sys`]).

pub mod acl;
pub mod bounded;
mod chain;
pub mod delete;
pub mod meta;
mod name;
pub mod safefs;
pub(crate) mod sys;
pub mod target;
pub mod times;
pub mod writer;
