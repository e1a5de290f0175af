//! How the desktop reaches an agent, and the desktop's side of the handshake.
//!
//! Over SSH, the system OpenSSH client runs it (through the `openssh` crate,
//! one multiplexed master connection), so `~/.ssh/config`, agents, `ProxyJump`
//! and `known_hosts` work as the admin expects. Host keys are always checked
//! (`StrictHostKeyChecking=yes`) and nothing ever prompts (`BatchMode=yes`). A
//! local source is served by the agent run as a child process over pipes, so
//! it speaks exactly the protocol the SSH agent speaks.
//!
//! Every read and write on the agent's pipes is bounded by the job's
//! `io_timeout` ([`crate::transport::link`]); ssh's keepalives are derived from it, so a
//! dead connection is noticed in about the same time.
//!
//! The agent's stderr is drained on its own thread — a full stderr pipe would
//! otherwise stall the agent mid-run — and its last lines are kept for error
//! messages, shown as the agent's words. That thread is never waited for
//! long: something other than the agent can hold its stderr open (an ssh
//! multiplexing master, a process the agent started), and shutdown must not
//! depend on it.

mod accept;
pub mod link;
mod ssh;

pub use accept::Pending;
pub use ssh::SshHost;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Job;
use crate::transport::link::{Link, LinkError};
use crate::wire::frame::{Encoder, FrameReader};
use crate::wire::msg::{Hello, Reply, Role};
use crate::wire::{HandshakeError, PeerFailed, ProtocolError, read_msg, read_preamble, write_preamble};

/// Lines of the agent's stderr kept for messages.
const STDERR_TAIL: usize = 20;
/// How long a stopped agent may take to exit by itself before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long the agent's last words may take to arrive once it is gone.
const STDERR_GRACE: Duration = Duration::from_secs(2);
/// How long ssh gets to close the connection.
const SSH_CLOSE: Duration = Duration::from_secs(5);

/// Frames from the agent.
pub type Frames = FrameReader<Box<dyn Read + Send>>;

/// Why an SSH connection could not be made, told apart so each gets its fix.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot reach {host}: {detail}")]
    Unreachable { host: String, detail: String },
    #[error(
        "{host} refused the authentication: {detail}\n  the desktop's key must be in the backup user's \
         authorized_keys on the server (see docs/setup.md)"
    )]
    AuthRefused { host: String, detail: String },
    #[error(
        "the host key of {host} is not known: {detail}\n  check its fingerprint on the server \
         (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then add it with `ssh-keyscan` to the \
         known_hosts file ssh uses, or run `rbackup setup-client`"
    )]
    HostKeyUnknown { host: String, detail: String },
    #[error(
        "the host key of {host} has CHANGED since it was recorded: {detail}\n  this may be an attack; \
         if the server was reinstalled, verify its new key and replace the old line in known_hosts \
         (`ssh-keygen -R HOST`)"
    )]
    HostKeyChanged { host: String, detail: String },
    #[error("ssh to {host} failed: {detail}")]
    Other { host: String, detail: String },
}

/// Sorts an ssh failure by what the client printed.
pub fn classify_ssh_error(host: &str, text: &str) -> SshError {
    let detail = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("@@@")).collect::<Vec<_>>();
    let detail = detail.join("\n    ");
    let host = host.to_string();
    if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key for") && text.contains("has changed")
    {
        SshError::HostKeyChanged { host, detail }
    } else if text.contains("Host key verification failed") || text.contains("host key is known") {
        SshError::HostKeyUnknown { host, detail }
    } else if text.contains("Permission denied (") || text.contains("Too many authentication failures") {
        SshError::AuthRefused { host, detail }
    } else if [
        "Connection refused",
        "No route to host",
        "Could not resolve hostname",
        "Connection timed out",
        "Network is unreachable",
        "Name or service not known",
        "Connection closed by",
        "kex_exchange_identification",
    ]
    .iter()
    .any(|s| text.contains(s))
    {
        SshError::Unreachable { host, detail }
    } else {
        SshError::Other { host, detail }
    }
}

/// Whether `e` is about the agent's side of a session — a protocol
/// violation, the connection lost or stalled, the agent reporting its own
/// failure — rather than the desktop's own (its disk, its limits). Only
/// errors about the agent's side are shown with what the agent printed:
/// after the desktop gives up, the agent only complains that it hung up.
pub fn from_peer(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ProtocolError>()
            || c.is::<PeerFailed>()
            || c.is::<HandshakeError>()
            || c.is::<LinkError>()
            || c.downcast_ref::<std::io::Error>().and_then(LinkError::of).is_some()
    })
}

/// The process on the other side.
enum Agent {
    /// A local child, or nothing (streams supplied by the caller).
    Local(Option<std::process::Child>),
    Ssh(Box<SshAgent>),
}

struct SshAgent {
    rt: tokio::runtime::Runtime,
    session: Option<Arc<openssh::Session>>,
    child: Option<openssh::Child<Arc<openssh::Session>>>,
    remote_bin: String,
}

/// A connected agent, before the handshake.
pub struct Connection {
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    handle: Handle,
}

/// A connection after a successful handshake.
pub struct Session {
    pub reader: Frames,
    pub writer: Box<dyn Write + Send>,
    /// The root the agent serves, as it resolved it.
    pub root: Vec<u8>,
    pub conn: Handle,
}

/// What is left of the connection once its streams are in use: the agent to
/// wait for and its stderr. Dropped without [`Handle::finish`], it stops the
/// agent.
pub struct Handle {
    /// Who the agent is, for messages.
    pub peer: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
    agent: Agent,
    link: Arc<Link>,
    timeout: Option<Duration>,
}

/// Connects to the agent for `job`'s source: over SSH, or a local child.
pub fn connect(job: &Job, role: Role) -> Result<(Connection, std::path::PathBuf)> {
    match job.source.as_ref().ok_or_else(|| anyhow!("no source"))? {
        crate::config::SourceSpec::Local(p) => Ok((Connection::local(p, role, job.io_timeout)?, p.clone())),
        crate::config::SourceSpec::Remote { user, host, path } => {
            Ok((Connection::ssh(user.as_deref(), host, job, role)?, path.clone()))
        }
    }
}

impl Connection {
    /// Starts this binary as the agent for a local `root`.
    pub fn local(root: &Path, role: Role, timeout: Option<Duration>) -> Result<Connection> {
        let exe = std::env::current_exe().context("cannot find the rbackup binary to start the local agent")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg(mode_flag(role)).arg("--root").arg(root);
        Connection::spawn(cmd, &format!("the local agent for {}", root.display()), timeout)
    }

    /// The local write agent of a restore into `root`; `keep_root`: leave
    /// the metadata of `root` itself as it is (it was there before).
    pub fn local_sink(root: &Path, keep_root: bool, timeout: Option<Duration>) -> Result<Connection> {
        let exe = std::env::current_exe().context("cannot find the rbackup binary to start the local agent")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg("--write").arg("--root").arg(root);
        if keep_root {
            cmd.arg("--keep-root-metadata");
        }
        Connection::spawn(cmd, &format!("the local agent for {}", root.display()), timeout)
    }

    /// Starts `cmd` as the agent, speaking the protocol on its stdin and
    /// stdout (tests start hostile agents this way).
    pub fn spawn(mut cmd: Command, peer: &str, timeout: Option<Duration>) -> Result<Connection> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {peer}"))?;
        let reader = child.stdout.take().expect("piped stdout").into();
        let writer = child.stdin.take().expect("piped stdin").into();
        let stderr_pipe = child.stderr.take().expect("piped stderr").into();
        Connection::new(reader, writer, Some(stderr_pipe), peer.to_string(), Agent::Local(Some(child)), timeout)
    }

    /// A connection over pipes or sockets the caller set up (tests play the
    /// agent).
    pub fn from_streams(
        reader: impl Into<OwnedFd>,
        writer: impl Into<OwnedFd>,
        peer: &str,
        timeout: Option<Duration>,
    ) -> Result<Connection> {
        Connection::new(reader.into(), writer.into(), None, peer.to_string(), Agent::Local(None), timeout)
    }

    fn new(
        reader: OwnedFd,
        writer: OwnedFd,
        stderr_pipe: Option<OwnedFd>,
        peer: String,
        agent: Agent,
        timeout: Option<Duration>,
    ) -> Result<Connection> {
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_thread = stderr_pipe.map(|p| drain_stderr(std::fs::File::from(p), stderr.clone()));
        let link = Link::new(&peer, timeout);
        let mut handle = Handle { peer, stderr, stderr_thread, agent, link: link.clone(), timeout };
        let halves = link.reader(reader).and_then(|r| Ok((r, link.writer(writer)?)));
        match halves {
            Ok((r, w)) => Ok(Connection { reader: Box::new(r), writer: Box::new(w), handle }),
            Err(e) => {
                handle.stop();
                Err(anyhow!("cannot set up the pipes to {}: {e}", handle.peer))
            }
        }
    }

    /// Exchanges preambles and `Hello`/`Reply`. Errors carry what the agent
    /// printed on stderr (often the real reason).
    pub fn handshake(self, hello: &Hello) -> Result<Session> {
        let Connection { mut reader, mut writer, mut handle } = self;
        let result = (|| -> Result<(Frames, Vec<u8>)> {
            write_preamble(&mut writer).map_err(HandshakeError::Io)?;
            read_preamble(&mut reader, "agent")?;
            let mut enc = Encoder::new(false);
            writer.write_all(&enc.msg(hello))?;
            writer.flush()?;
            let mut frames = FrameReader::new(reader);
            match read_msg::<Reply, _>(&mut frames)? {
                Reply::Welcome { root, .. } => Ok((frames, root)),
                Reply::Refused { reason } => bail!(Refused(reason)),
            }
        })();
        match result {
            Ok((reader, root)) => Ok(Session { reader, writer, root, conn: handle }),
            Err(e) => {
                drop(writer);
                let status = handle.stop();
                if let Some(signal) = crate::interrupt::received() {
                    return Err(anyhow!(signal).context(format!("no session with {}", handle.peer)));
                }
                let detail = handle.agent_said();
                if let Some(reason) = e.downcast_ref::<Refused>() {
                    bail!("{} refused the request: {}", handle.peer, reason.0);
                }
                if status == Some(127)
                    && let Agent::Ssh(ssh) = &handle.agent
                {
                    bail!(
                        "{} could not be started: `{}` was not found on the server{detail}\n  install rbackup \
                         there, or point --remote-bin (remote_bin in the job) at it",
                        handle.peer,
                        ssh.remote_bin
                    );
                }
                Err(anyhow!("no session with {}: {e:#}{detail}", handle.peer))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// The agent's flag that makes it `role`.
fn mode_flag(role: Role) -> &'static str {
    match role {
        Role::Source => "--read-only",
        Role::Sink => "--write",
        Role::Replica => "--append-only",
    }
}

impl Handle {
    /// Ends the connection from this side: every thread reading from or
    /// writing to the agent stops within a fraction of a second.
    pub fn hang_up(&self) {
        self.link.close();
    }

    /// After the session ended: waits for the agent to exit (within the
    /// idle timeout); an error if it failed, or had to be killed.
    pub fn finish(mut self) -> Result<()> {
        let status = match &mut self.agent {
            Agent::Local(None) => None,
            Agent::Local(Some(child)) => match wait_for(child, self.timeout)? {
                Some(st) => (!st.success()).then(|| format!("exited with {st}")),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Some("did not exit within the io_timeout after the session, and was killed".into())
                }
            },
            Agent::Ssh(ssh) => {
                let child = ssh.child.take().expect("an SSH agent");
                let timeout = self.timeout;
                let waited = ssh.rt.block_on(async move {
                    match timeout {
                        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
                        None => Some(child.wait().await),
                    }
                });
                let status = match waited {
                    Some(st) => {
                        let st = st.with_context(|| format!("waiting for {}", self.peer))?;
                        (!st.success()).then(|| format!("exited with {st}"))
                    }
                    None => Some("did not exit within the io_timeout after the session".into()),
                };
                ssh.close();
                status
            }
        };
        self.link.close();
        self.join_stderr();
        if let Some(status) = status {
            return Err(anyhow!("{} {status}{}", self.peer, self.agent_said()));
        }
        Ok(())
    }

    /// After a failed session: hangs up, stops the agent (it gets a moment to
    /// exit by itself, then it is killed) and returns its exit code if it
    /// exited by itself. Every wait here is bounded.
    pub fn stop(&mut self) -> Option<i32> {
        self.link.close();
        let mut code = None;
        match &mut self.agent {
            Agent::Local(None) => {}
            Agent::Local(Some(child)) => {
                // The agent sees EOF once our end of the pipes is gone; give it
                // a moment to say why it stopped, then make sure it is gone.
                code = wait_for(child, Some(EXIT_GRACE)).ok().flatten().and_then(|st| st.code());
                let _ = child.kill();
                let _ = child.wait();
            }
            Agent::Ssh(ssh) => {
                if let Some(child) = ssh.child.take() {
                    let waited = ssh.rt.block_on(async { tokio::time::timeout(3 * EXIT_GRACE, child.wait()).await });
                    code = match waited {
                        Ok(Ok(st)) => st.code(),
                        // The crate turns the shell's 127 into this error.
                        Ok(Err(openssh::Error::Remote(e))) if e.kind() == std::io::ErrorKind::NotFound => Some(127),
                        _ => None,
                    };
                }
                ssh.close();
            }
        }
        self.join_stderr();
        code
    }

    /// Waits a little for the stderr thread to reach the end of the agent's
    /// last words, never long: whatever else holds the pipe open (an ssh
    /// master, a process the agent left behind) must not hold up shutdown.
    /// A thread still blocked then is left to end with the process.
    fn join_stderr(&mut self) {
        let Some(t) = self.stderr_thread.take() else { return };
        let deadline = Instant::now() + STDERR_GRACE;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            crate::debug!("{}'s stderr is still open; not waiting for it", self.peer);
        }
    }

    /// What the agent printed on stderr, as its words, for an error message
    /// about the agent's side: `\n  the agent on … said: …`. Empty if it said
    /// nothing. Not for the desktop's own errors: what the agent says after
    /// the desktop gave up is about the desktop hanging up.
    pub fn agent_said(&self) -> String {
        let lines = self.stderr.lock().expect("stderr lock");
        if lines.is_empty() {
            String::new()
        } else {
            format!("\n  {} said: {}", self.peer, lines.iter().cloned().collect::<Vec<_>>().join("\n  "))
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for `child` to exit, at most `bound`: `None` if it is still running.
fn wait_for(child: &mut std::process::Child, bound: Option<Duration>) -> std::io::Result<Option<ExitStatus>> {
    let Some(bound) = bound else { return child.wait().map(Some) };
    let deadline = Instant::now() + bound;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn drain_stderr(pipe: impl Read + Send + 'static, tail: Arc<Mutex<VecDeque<String>>>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("rbackup-agent-stderr".into())
        .spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                crate::debug!("agent: {line}");
                let mut t = tail.lock().expect("stderr lock");
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
        .expect("spawn stderr thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_failures_are_told_apart() {
        let h = "bk@server";
        assert!(matches!(
            classify_ssh_error(h, "ssh: connect to host 127.0.0.1 port 1: Connection refused"),
            SshError::Unreachable { .. }
        ));
        assert!(matches!(
            classify_ssh_error(h, "bk@127.0.0.1: Permission denied (publickey)."),
            SshError::AuthRefused { .. }
        ));
        assert!(matches!(
            classify_ssh_error(
                h,
                "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\nHost key verification failed."
            ),
            SshError::HostKeyUnknown { .. }
        ));
        assert!(matches!(
            classify_ssh_error(
                h,
                "@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed."
            ),
            SshError::HostKeyChanged { .. }
        ));
        assert!(matches!(
            classify_ssh_error(h, "ssh: Could not resolve hostname nosuch: Name or service not known"),
            SshError::Unreachable { .. }
        ));
    }
}
