//! The wire: frames ([`frame`]), messages ([`msg`]), and the version handshake.
//!
//! Both sides open with a fixed preamble that will never change shape —
//! magic, protocol version, software version — so that a mismatch is always
//! reported with both versions, whatever later versions do to the messages.
//! No I/O policy lives here: the source and sink engines decide what to send.

pub mod frame;
pub mod msg;

use std::io::{self, Read, Write};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
use std::thread::JoinHandle;

use frame::{Frame, FrameError, FrameReader, read_full};

/// Protocol spoken by this build. 2: `FileEnd` carries the version 2
/// content digest ([`crate::digest`]), for whole transfers too. 3: the
/// hello's `SessionOptions` carry `one_file_system` and `bwlimit` (postcard
/// is not self-describing: a field more shifts what follows, so an older
/// peer is refused by the preamble rather than misread). 4: replicas to an
/// append-only agent (`Role::Replica`, the hello's `replica`, the manifest
/// and the agent's answers).
pub const VERSION: u32 = 4;

/// The software version, sent for messages.
pub const SOFTWARE: &str = env!("CARGO_PKG_VERSION");

const MAGIC: [u8; 8] = *b"rbackup\0";

/// Errors before the session starts.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer closed the connection before saying which protocol it speaks")]
    Closed,
    #[error("the peer is not an rbackup agent (it said {0:?})")]
    NotRbackup(String),
    #[error(
        "protocol mismatch: the {peer_side} runs rbackup {peer_software} (protocol {peer}), this side runs \
         rbackup {SOFTWARE} (protocol {VERSION}); install the same rbackup version on both sides \
         (upgrade the older one)"
    )]
    Version { peer_side: &'static str, peer: u32, peer_software: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes this side's preamble.
pub fn write_preamble(w: &mut impl Write) -> io::Result<()> {
    let mut p = Vec::with_capacity(16 + SOFTWARE.len());
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&VERSION.to_le_bytes());
    p.push(SOFTWARE.len() as u8);
    p.extend_from_slice(SOFTWARE.as_bytes());
    w.write_all(&p)?;
    w.flush()
}

/// Reads the peer's preamble and checks the version. `peer_side` names the
/// peer in messages ("agent" or "desktop").
pub fn read_preamble(r: &mut impl Read, peer_side: &'static str) -> Result<(), HandshakeError> {
    let mut head = [0u8; 13];
    let n = read_full(r, &mut head)?;
    if n == 0 {
        return Err(HandshakeError::Closed);
    }
    if n < head.len() || head[..8] != MAGIC {
        // Show what came instead: often a shell's or a login banner's text.
        let mut seen = head[..n].to_vec();
        let mut more = [0u8; 200];
        if n == head.len() {
            let m = r.read(&mut more).unwrap_or(0);
            seen.extend_from_slice(&more[..m]);
        }
        return Err(HandshakeError::NotRbackup(String::from_utf8_lossy(&seen).trim().to_string()));
    }
    let peer = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let mut software = vec![0u8; head[12] as usize];
    if read_full(r, &mut software)? != software.len() {
        return Err(HandshakeError::Closed);
    }
    if peer != VERSION {
        return Err(HandshakeError::Version {
            peer_side,
            peer,
            peer_software: String::from_utf8_lossy(&software).into_owned(),
        });
    }
    Ok(())
}

/// Reads one message frame and decodes it as `T`.
pub fn read_msg<T: serde::de::DeserializeOwned, R: Read>(r: &mut FrameReader<R>) -> Result<T, ProtocolError> {
    match r.read()? {
        Some(Frame::Msg(body)) => decode(&body),
        Some(_) => Err(ProtocolError::Unexpected("a data frame where a message was expected".into())),
        None => Err(ProtocolError::Closed),
    }
}

/// Decodes a message body.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    postcard::from_bytes(body).map_err(|e| ProtocolError::Decode(e.to_string()))
}

/// A violation by the peer, or the peer going away. Ends the session.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the connection was closed before the run finished")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("protocol violation: {0}")]
    Unexpected(String),
}

/// The peer said it failed (its `Fatal` message), in its own words.
#[derive(Debug, thiserror::Error)]
#[error("the {side} side failed: {message}")]
pub struct PeerFailed {
    /// "sending" or "receiving".
    pub side: &'static str,
    pub message: String,
}

/// Starts a thread that reads frames, turns each into what the consumer
/// wants (`stage`, run on that thread, in parallel with the consumer's own
/// work) and hands them over, ending with `Err(Closed)` or the error that
/// stopped it. Returns the live count of bytes read from the wire.
pub fn spawn_reader<R, T, S>(
    reader: FrameReader<R>,
    depth: usize,
    mut stage: S,
) -> (Receiver<Result<T, ProtocolError>>, Arc<AtomicU64>, JoinHandle<()>)
where
    R: Read + Send + 'static,
    T: Send + 'static,
    S: FnMut(Frame) -> Result<T, ProtocolError> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(depth);
    let bytes = Arc::new(AtomicU64::new(reader.wire_bytes));
    let counter = bytes.clone();
    let handle = std::thread::Builder::new()
        .name("rbackup-read".into())
        .spawn(move || {
            let mut reader = reader;
            loop {
                let item = match reader.read() {
                    Ok(Some(frame)) => stage(frame),
                    Ok(None) => Err(ProtocolError::Closed),
                    Err(e) => Err(ProtocolError::Frame(e)),
                };
                counter.store(reader.wire_bytes, Ordering::Relaxed);
                let last = item.is_err();
                if tx.send(item).is_err() || last {
                    return;
                }
            }
        })
        .expect("spawn reader thread");
    (rx, bytes, handle)
}

/// Where producers hand frames to the writer thread.
#[derive(Clone)]
pub enum Outbox {
    /// Producers wait when the wire is slower than they are (the source).
    Bounded(SyncSender<Vec<u8>>),
    /// Never waits (the sink, whose messages are few and bounded by its
    /// fetch window, and which must never block while the source waits on it).
    Unbounded(Sender<Vec<u8>>),
}

impl Outbox {
    /// Queues a frame; `Err` once the writer has stopped.
    pub fn send(&self, frame: Vec<u8>) -> Result<(), ProtocolError> {
        let sent = match self {
            Outbox::Bounded(tx) => tx.send(frame).is_ok(),
            Outbox::Unbounded(tx) => tx.send(frame).is_ok(),
        };
        if sent { Ok(()) } else { Err(ProtocolError::Closed) }
    }
}

/// Starts a thread that writes the frames queued in the returned outbox:
/// bounded to `depth` frames, or unbounded for `None`.
pub fn spawn_writer<W: Write + Send + 'static>(
    writer: W,
    depth: Option<usize>,
) -> (Outbox, JoinHandle<io::Result<()>>) {
    let (outbox, rx) = match depth {
        Some(d) => {
            let (tx, rx) = std::sync::mpsc::sync_channel(d);
            (Outbox::Bounded(tx), rx)
        }
        None => {
            let (tx, rx) = std::sync::mpsc::channel();
            (Outbox::Unbounded(tx), rx)
        }
    };
    let handle = std::thread::Builder::new()
        .name("rbackup-write".into())
        .spawn(move || frame::pump_frames(&rx, writer))
        .expect("spawn writer thread");
    (outbox, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_roundtrip() {
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        read_preamble(&mut &buf[..], "agent").unwrap();
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&9u32.to_le_bytes());
        buf.push(6);
        buf.extend_from_slice(b"99.9.9");
        let msg = read_preamble(&mut &buf[..], "agent").unwrap_err().to_string();
        assert!(msg.contains("protocol 9"), "{msg}");
        assert!(msg.contains(&format!("protocol {VERSION}")), "{msg}");
        assert!(msg.contains("rbackup 99.9.9"), "{msg}");
        assert!(msg.contains("agent"), "{msg}");
    }

    #[test]
    fn banner_instead_of_preamble_is_shown() {
        let msg =
            read_preamble(&mut &b"This account is currently not available.\n"[..], "agent").unwrap_err().to_string();
        assert!(msg.contains("This account is currently not available."), "{msg}");
    }
}
