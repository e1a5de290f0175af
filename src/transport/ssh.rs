//! Starting the agent over SSH: one master connection to a host
//! ([`SshHost`], the openssh crate's multiplexed session), and the agent
//! run over it as a channel of its own. Several sessions may share one
//! master: a `replicate` asks the off-site host what it holds, then sends
//! each snapshot it lacks, with one SSH handshake in all.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::{Agent, Connection, SSH_CLOSE, SshAgent, SshError, classify_ssh_error, mode_flag};
use crate::config::Job;
use crate::wire::msg::Role;

/// A master SSH connection to one host, shared by the sessions started over
/// it; closed when the last of them (and this) is gone.
pub struct SshHost {
    /// `None` once dropped.
    session: Option<Arc<openssh::Session>>,
    /// `user@host` or `host`, for messages.
    pub shown: String,
}

impl SshHost {
    /// Connects to `host` (as `user`) with `job`'s ssh settings: the admin's
    /// ssh config (or the job's), host keys checked, never a prompt.
    pub fn connect(user: Option<&str>, host: &str, job: &Job) -> Result<SshHost> {
        let rt = runtime()?;
        let mut b = openssh::SessionBuilder::default();
        b.known_hosts_check(openssh::KnownHosts::Strict)
            .control_directory(std::env::temp_dir())
            .control_persist(openssh::ControlPersist::IdleFor(std::num::NonZeroUsize::new(30).expect("nonzero")))
            .server_alive_interval(keepalive(job.io_timeout))
            .connect_timeout(Duration::from_secs(30));
        if let Some(u) = user {
            b.user(u.to_string());
        }
        if let Some(cfg) = &job.ssh_config {
            b.config_file(cfg);
        }
        let shown = match user {
            Some(u) => format!("{u}@{host}"),
            None => host.to_string(),
        };
        let session = rt.block_on(b.connect_mux(host)).map_err(|e| match e {
            openssh::Error::Connect(io) => anyhow!(classify_ssh_error(&shown, &io.to_string())),
            other => anyhow!(SshError::Other { host: shown.clone(), detail: format!("{other:#}") }),
        })?;
        Ok(SshHost { session: Some(Arc::new(session)), shown })
    }

    fn session(&self) -> Arc<openssh::Session> {
        self.session.clone().expect("a live master until dropped")
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        // The master is closed by its last user (see `SshAgent::close`).
        if let (Some(session), Ok(rt)) = (self.session.take().and_then(Arc::into_inner), runtime()) {
            let _ = rt.block_on(async { tokio::time::timeout(SSH_CLOSE, session.close()).await });
        }
    }
}

impl Connection {
    /// Starts `<remote_bin> serve` on `host` over SSH. With a forced command in
    /// the server's `authorized_keys`, the server runs its own command instead.
    pub fn ssh(user: Option<&str>, host: &str, job: &Job, role: Role) -> Result<Connection> {
        Connection::ssh_on(&SshHost::connect(user, host, job)?, job, &[mode_flag(role).into()])
    }

    /// Starts `<remote_bin> serve --append-only --root ROOT` over `host`'s
    /// master, to take replicas into `ROOT` (a forced command decides instead).
    pub fn ssh_replica(host: &SshHost, job: &Job, root: &Path) -> Result<Connection> {
        Connection::ssh_on(host, job, &[mode_flag(Role::Replica).into(), "--root".into(), shell_word(root)])
    }

    /// Starts `<remote_bin> serve ARGS` over `host`'s master (`args` are
    /// shell words).
    fn ssh_on(host: &SshHost, job: &Job, args: &[OsString]) -> Result<Connection> {
        let rt = runtime()?;
        let mut cmd = host.session().arc_raw_command(&job.remote_bin);
        cmd.raw_arg("serve");
        for a in args {
            cmd.raw_arg(a);
        }
        cmd.stdin(openssh::Stdio::piped()).stdout(openssh::Stdio::piped()).stderr(openssh::Stdio::piped());
        let shown = &host.shown;
        let mut child =
            rt.block_on(cmd.spawn()).with_context(|| format!("cannot start `{} serve` on {shown}", job.remote_bin))?;
        let stdin = child.stdin().take().expect("piped stdin").into_owned_fd()?;
        let stdout = child.stdout().take().expect("piped stdout").into_owned_fd()?;
        let stderr = child.stderr().take().expect("piped stderr").into_owned_fd()?;
        let agent = Agent::Ssh(Box::new(SshAgent {
            rt,
            session: Some(host.session()),
            child: Some(child),
            remote_bin: job.remote_bin.clone(),
        }));
        Connection::new(stdout, stdin, Some(stderr), format!("the agent on {shown}"), agent, job.io_timeout)
    }
}

impl SshAgent {
    /// Closes the master connection, if this was its last user.
    pub(super) fn close(&mut self) {
        if let Some(session) = self.session.take().and_then(Arc::into_inner) {
            let _ = self.rt.block_on(async { tokio::time::timeout(SSH_CLOSE, session.close()).await });
        }
    }
}

/// `p` as one word for the remote shell, whatever bytes it holds: in single
/// quotes, each `'` written `'\''`.
fn shell_word(p: &Path) -> OsString {
    let mut out = b"'".to_vec();
    for &b in p.as_os_str().as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

/// The runtime an SSH operation runs on: each its own, on the caller's thread.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the SSH runtime")
}

/// ssh's `ServerAliveInterval` for an idle timeout: with ssh's default
/// `ServerAliveCountMax` of 3, a dead connection is dropped after about
/// `io_timeout`. (The openssh crate can't set the count; an ssh config may.)
fn keepalive(io_timeout: Option<Duration>) -> Duration {
    io_timeout.map_or(Duration::from_secs(15), |t| Duration::from_secs((t.as_secs() / 3).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_path_is_one_shell_word() {
        let word = shell_word(Path::new("/srv/it's here"));
        assert_eq!(word, OsString::from("'/srv/it'\\''s here'"));
        let script = format!("printf %s {}", word.to_str().unwrap());
        let out = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert_eq!(out.stdout, b"/srv/it's here");
    }

    #[test]
    fn keepalives_follow_the_io_timeout() {
        assert_eq!(keepalive(Some(Duration::from_secs(300))), Duration::from_secs(100));
        assert_eq!(keepalive(Some(Duration::from_secs(2))), Duration::from_secs(1));
        assert_eq!(keepalive(None), Duration::from_secs(15));
    }
}
