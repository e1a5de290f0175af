//! How the desktop reaches an agent, and the desktop's side of the handshake.
//!
//! A local source is served by the agent run as a child process over pipes,
//! so it speaks exactly the protocol the SSH agent speaks. The agent's stderr
//! is drained on its own thread (a full stderr pipe would otherwise stall the
//! agent mid-run, ripgrep learned the same) and its last lines are kept for
//! error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};

use crate::protocol::frame::{Encoder, FrameReader};
use crate::protocol::msg::{Hello, Reply, Role};
use crate::protocol::{HandshakeError, read_msg, read_preamble, write_preamble};

/// Lines of the agent's stderr kept for messages.
const STDERR_TAIL: usize = 20;

/// Frames from the agent.
pub type Frames = FrameReader<Box<dyn Read + Send>>;

/// A connected agent, before the handshake.
pub struct Connection {
    reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    /// Who the agent is, for messages.
    pub peer: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
    child: Child,
}

/// A connection after a successful handshake.
pub struct Session {
    pub reader: Frames,
    pub writer: Box<dyn Write + Send>,
    /// The root the agent serves, as it resolved it.
    pub root: Vec<u8>,
    pub conn: Handle,
}

/// What is left of the connection once its streams are in use: the child to
/// wait for and its stderr.
pub struct Handle {
    pub peer: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
    child: Child,
}

impl Connection {
    /// Starts this binary as the agent for a local `root`.
    pub fn local(root: &Path, role: Role) -> Result<Connection> {
        let exe = std::env::current_exe().context("cannot find the rbackup binary to start the local agent")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg(if role == Role::Source { "--read-only" } else { "--write" }).arg("--root").arg(root);
        let peer = format!("the local agent for {}", root.display());
        Connection::spawn(cmd, peer)
    }

    fn spawn(mut cmd: Command, peer: String) -> Result<Connection> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("cannot start {peer}"))?;
        let reader = Box::new(child.stdout.take().expect("piped stdout"));
        let writer = Box::new(child.stdin.take().expect("piped stdin"));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_thread = Some(drain_stderr(stderr_pipe, stderr.clone()));
        Ok(Connection { reader, writer, peer, stderr, stderr_thread, child })
    }

    /// Exchanges preambles and `Hello`/`Reply`. Errors carry what the agent
    /// printed on stderr (often the real reason).
    pub fn handshake(self, hello: &Hello) -> Result<Session> {
        let Connection { reader, mut writer, peer, stderr, stderr_thread, child } = self;
        let mut handle = Handle { peer, stderr, stderr_thread, child };
        let mut reader = reader;
        let result = (|| -> Result<(Frames, Vec<u8>)> {
            write_preamble(&mut writer).map_err(HandshakeError::Io)?;
            read_preamble(&mut reader, "agent")?;
            let mut enc = Encoder::new(false);
            writer.write_all(&enc.msg(hello))?;
            writer.flush()?;
            let mut frames = FrameReader::new(reader);
            match read_msg::<Reply, _>(&mut frames)? {
                Reply::Welcome { root, .. } => Ok((frames, root)),
                Reply::Refused { reason } => bail!("{} refused: {reason}", handle.peer),
            }
        })();
        match result {
            Ok((reader, root)) => Ok(Session { reader, writer, root, conn: handle }),
            Err(e) => {
                drop(writer);
                let detail = handle.finish_after_error();
                Err(e.context(format!("no session with {}{detail}", handle.peer)))
            }
        }
    }
}

impl Handle {
    /// Waits for the agent to exit; an error if it failed.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait().with_context(|| format!("waiting for {}", self.peer))?;
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        if !status.success() {
            return Err(anyhow!("{} exited with {status}{}", self.peer, self.stderr_excerpt()));
        }
        Ok(())
    }

    /// After a failed session: stops the agent and returns its last words.
    pub fn finish_after_error(&mut self) -> String {
        // The agent sees EOF once our side of the pipes is gone; give it a
        // moment to say why it stopped, then make sure it is gone.
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stderr_thread.take() {
            let _ = t.join();
        }
        self.stderr_excerpt()
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
