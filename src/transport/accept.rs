//! The agent's side of the handshake, over a [`Connection`] made from its
//! own stdin and stdout: the append-only agent answers the desktop here and
//! then runs a backup's sink over the same connection, so every wait on the
//! desktop is bounded by the link like the desktop's waits on an agent.

use std::io::Write;

use anyhow::{Result, anyhow, bail};

use super::{Connection, Frames, Handle, Session};
use crate::wire::frame::{Encoder, FrameReader};
use crate::wire::msg::{Hello, Reply};
use crate::wire::{SOFTWARE, read_msg, read_preamble, write_preamble};

/// A desktop that said hello, waiting for the agent's answer.
pub struct Pending {
    reader: Frames,
    writer: Box<dyn Write + Send>,
    handle: Handle,
}

impl Connection {
    /// Exchanges preambles and reads the desktop's hello: answer it with
    /// [`Pending::welcome`] or [`Pending::refuse`].
    pub fn accept(self) -> Result<(Hello, Pending)> {
        let Connection { mut reader, mut writer, handle } = self;
        write_preamble(&mut writer)?;
        read_preamble(&mut reader, "desktop")?;
        let mut reader = FrameReader::new(reader);
        let hello: Hello = read_msg(&mut reader).map_err(|e| anyhow!("reading the desktop's hello: {e}"))?;
        Ok((hello, Pending { reader, writer, handle }))
    }
}

impl Pending {
    /// Refuses the session, telling the desktop why; returns that as the error.
    pub fn refuse(mut self, reason: &str) -> Result<()> {
        let frame = Encoder::new(false).msg(&Reply::Refused { reason: reason.to_string() });
        let _ = self.writer.write_all(&frame).and_then(|()| self.writer.flush());
        bail!("refused: {reason}")
    }

    /// Welcomes the desktop to `root`: the session starts.
    pub fn welcome(mut self, root: &[u8]) -> Result<Session> {
        let frame = Encoder::new(false).msg(&Reply::Welcome { root: root.to_vec(), version: SOFTWARE.to_string() });
        self.writer.write_all(&frame)?;
        self.writer.flush()?;
        Ok(Session { reader: self.reader, writer: self.writer, root: root.to_vec(), conn: self.handle })
    }
}
