//! One command per side: `setup-server` prepares the backup user, its read
//! access and its confined keys on the server; `setup-client` prepares the
//! desktop's key, the server's host key and the job. Both are idempotent and
//! print every step; `--dry-run` prints them without doing them.

//!
//! - [`server`]: the backup user, the agent it runs, its keys ([`keys`]) and
//!   its read access ([`grant`]);
//! - [`client`]: the desktop's keys, the server's host key, the job;
//! - [`replica`] (`--mode replica`): the off-site host of replicas, root's
//!   key confined to the append-only agent.
//!
//! The backup user's login shell, which runs only the agent, is runtime
//! security code and lives with the agent ([`crate::agent::shell`]).

mod client;
mod grant;
mod keys;
mod replica;
mod server;

pub use client::{ClientOptions, client, default_log_file, restore_alias};
pub use keys::check_key;
pub use server::{AccessMode, ServerOptions, server};

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::usage;

/// Says a step, and whether it is done or only shown.
struct Steps {
    dry_run: bool,
}

impl Steps {
    /// Runs `f` unless this is a dry run; says what it does either way.
    fn run(&self, what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.dry_run {
            println!("would: {what}");
            return Ok(());
        }
        println!("{what}");
        f().with_context(|| format!("failed: {what}"))
    }

    #[allow(clippy::unused_self)] // reads as the twin of `run`
    fn ok(&self, what: &str) {
        println!("ok: {what}");
    }
}

fn command(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !st.success() {
        bail!("{program} {} failed with {st}", args.join(" "));
    }
    Ok(())
}

/// Quotes a path for the forced command (run by the account's shell).
fn quote(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| usage!("{} is not UTF-8", p.display()))?;
    if s.contains(['\'', '"', '\n', '\\']) {
        bail!(usage!("{s:?} contains quotes or newlines"));
    }
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b)) {
        Ok(s.to_string())
    } else {
        Ok(format!("'{s}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_command_paths_are_quoted() {
        assert_eq!(quote(Path::new("/srv/content")).unwrap(), "/srv/content");
        assert_eq!(quote(Path::new("/srv/my content")).unwrap(), "'/srv/my content'");
        assert!(quote(Path::new("/srv/it's")).is_err());
    }
}
