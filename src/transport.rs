//! How the desktop reaches an agent, and the desktop's side of the handshake.
//!
//! Over SSH, the system OpenSSH client runs it (through the `openssh` crate,
//! one multiplexed master connection), so `~/.ssh/config`, agents, `ProxyJump`
//! and `known_hosts` work as the admin expects. Host keys are always checked
//! (`StrictHostKeyChecking=yes`) and nothing ever prompts (`BatchMode=yes`). A
//! local source is served by the agent run as a child process over pipes, so
//! it speaks exactly the protocol the SSH agent speaks.
//!
//! The agent's stderr is drained on its own thread — a full stderr pipe would
//! otherwise stall the agent mid-run — and its last lines are kept for error
//! messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Job;
use crate::protocol::frame::{Encoder, FrameReader};
use crate::protocol::msg::{Hello, Reply, Role};
use crate::protocol::{HandshakeError, read_msg, read_preamble, write_preamble};

/// Lines of the agent's stderr kept for messages.
const STDERR_TAIL: usize = 20;

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
/// wait for and its stderr.
pub struct Handle {
    /// Who the agent is, for messages.
    pub peer: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
    agent: Agent,
}

/// Connects to the agent for `job`'s source: over SSH, or a local child.
pub fn connect(job: &Job, role: Role) -> Result<(Connection, std::path::PathBuf)> {
    match job.source.as_ref().ok_or_else(|| anyhow!("no source"))? {
        crate::config::SourceSpec::Local(p) => Ok((Connection::local(p, role)?, p.clone())),
        crate::config::SourceSpec::Remote { user, host, path } => {
            Ok((Connection::ssh(user.as_deref(), host, job, role)?, path.clone()))
        }
    }
}

impl Connection {
    /// Starts this binary as the agent for a local `root`.
    pub fn local(root: &Path, role: Role) -> Result<Connection> {
        let exe = std::env::current_exe().context("cannot find the rbackup binary to start the local agent")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg(if role == Role::Source { "--read-only" } else { "--write" }).arg("--root").arg(root);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let peer = format!("the local agent for {}", root.display());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {peer}"))?;
        let reader = Box::new(child.stdout.take().expect("piped stdout"));
        let writer = Box::new(child.stdin.take().expect("piped stdin"));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        Ok(Connection::new(reader, writer, Some(Box::new(stderr_pipe)), peer, Agent::Local(Some(child))))
    }

    /// A connection over streams the caller set up (tests play the agent).
    pub fn from_streams(reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>, peer: &str) -> Connection {
        Connection::new(reader, writer, None, peer.to_string(), Agent::Local(None))
    }

    /// Starts `<remote_bin> serve` on `host` over SSH. With a forced command in
    /// the server's `authorized_keys`, the server runs its own command instead.
    pub fn ssh(user: Option<&str>, host: &str, job: &Job, role: Role) -> Result<Connection> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the SSH runtime")?;
        let mut b = openssh::SessionBuilder::default();
        b.known_hosts_check(openssh::KnownHosts::Strict)
            .control_directory(std::env::temp_dir())
            .control_persist(openssh::ControlPersist::IdleFor(std::num::NonZeroUsize::new(30).expect("nonzero")))
            .server_alive_interval(Duration::from_secs(15))
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
        let session = Arc::new(session);
        let mut cmd = session.clone().arc_raw_command(&job.remote_bin);
        cmd.raw_arg("serve").raw_arg(if role == Role::Source { "--read-only" } else { "--write" });
        cmd.stdin(openssh::Stdio::piped()).stdout(openssh::Stdio::piped()).stderr(openssh::Stdio::piped());
        let mut child =
            rt.block_on(cmd.spawn()).with_context(|| format!("cannot start `{} serve` on {shown}", job.remote_bin))?;
        let stdin = child.stdin().take().expect("piped stdin").into_owned_fd()?;
        let stdout = child.stdout().take().expect("piped stdout").into_owned_fd()?;
        let stderr = child.stderr().take().expect("piped stderr").into_owned_fd()?;
        let agent = Agent::Ssh(Box::new(SshAgent {
            rt,
            session: Some(session),
            child: Some(child),
            remote_bin: job.remote_bin.clone(),
        }));
        Ok(Connection::new(
            Box::new(std::fs::File::from(stdout)),
            Box::new(std::fs::File::from(stdin)),
            Some(Box::new(std::fs::File::from(stderr))),
            format!("the agent on {shown}"),
            agent,
        ))
    }

    fn new(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        stderr_pipe: Option<Box<dyn Read + Send>>,
        peer: String,
        agent: Agent,
    ) -> Connection {
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_thread = stderr_pipe.map(|p| drain_stderr(p, stderr.clone()));
        Connection { reader, writer, handle: Handle { peer, stderr, stderr_thread, agent } }
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
                let (status, detail) = handle.stop();
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

impl Handle {
    /// Waits for the agent to exit; an error if it failed.
    pub fn finish(mut self) -> Result<()> {
        let status = match &mut self.agent {
            Agent::Local(None) => None,
            Agent::Local(Some(child)) => {
                let st = child.wait().with_context(|| format!("waiting for {}", self.peer))?;
                (!st.success()).then(|| st.to_string())
            }
            Agent::Ssh(ssh) => {
                let child = ssh.child.take().expect("an SSH agent");
                let st = ssh.rt.block_on(child.wait()).with_context(|| format!("waiting for {}", self.peer))?;
                if let Some(session) = ssh.session.take().and_then(Arc::into_inner) {
                    let _ = ssh.rt.block_on(session.close());
                }
                (!st.success()).then(|| st.to_string())
            }
        };
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        if let Some(status) = status {
            return Err(anyhow!("{} exited with {status}{}", self.peer, self.stderr_excerpt()));
        }
        Ok(())
    }

    /// After a failed session: stops the agent and returns its exit code (if
    /// it exited by itself) and its last words for the message.
    pub fn stop(&mut self) -> (Option<i32>, String) {
        let mut code = None;
        match &mut self.agent {
            Agent::Local(None) => {}
            Agent::Local(Some(child)) => {
                // The agent sees EOF once our end of the pipes is gone; give it
                // a moment to say why it stopped, then make sure it is gone.
                for _ in 0..50 {
                    if let Ok(Some(st)) = child.try_wait() {
                        code = st.code();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Agent::Ssh(ssh) => {
                if let Some(child) = ssh.child.take() {
                    let waited =
                        ssh.rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), child.wait()).await });
                    code = match waited {
                        Ok(Ok(st)) => st.code(),
                        // The crate turns the shell's 127 into this error.
                        Ok(Err(openssh::Error::Remote(e))) if e.kind() == std::io::ErrorKind::NotFound => Some(127),
                        _ => None,
                    };
                }
                if let Some(session) = ssh.session.take().and_then(Arc::into_inner) {
                    let _ = ssh.rt.block_on(session.close());
                }
            }
        }
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        (code, self.stderr_excerpt())
    }

    fn stderr_excerpt(&self) -> String {
        let lines = self.stderr.lock().expect("stderr lock");
        if lines.is_empty() {
            String::new()
        } else {
            format!("\n  the agent said: {}", lines.iter().cloned().collect::<Vec<_>>().join("\n  "))
        }
    }
}

fn drain_stderr(pipe: Box<dyn Read + Send>, tail: Arc<Mutex<VecDeque<String>>>) -> JoinHandle<()> {
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
