//! One session between the desktop and an agent: the hello that opens it
//! ([`hello`]), and the driver that runs the desktop's sink over it and
//! shuts it down in the one safe order ([`drive_sink`]). `backup` and
//! `check` drive a sink here; `restore` sends the hello and runs the source;
//! the agent's write side wires its sink with [`SinkThreads`] too.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

use crate::report::Events;
use crate::sink::{Input, Sink, SinkConfig, SinkOutcome};
use crate::transport::{Handle, Session};
use crate::wire::frame::FrameReader;
use crate::wire::msg::{Hello, Role, SessionOptions};
use crate::wire::{Outbox, ProtocolError, SOFTWARE, spawn_writer};

/// The hello that asks the agent to be `role` for `path` (beneath the root
/// its forced command allows), with `options`.
pub fn hello(role: Role, path: &Path, options: SessionOptions) -> Hello {
    let path = path.as_os_str().as_encoded_bytes().to_vec();
    Hello { role, path, options, version: SOFTWARE.to_string(), replica: None }
}

/// A sink's two threads: the reader (frames in, with the look-ahead of
/// `sink::spawn_reader`) and the writer (frames out).
pub struct SinkThreads {
    pub incoming: Receiver<Result<Input, ProtocolError>>,
    pub out: Outbox,
    wire_bytes: Arc<AtomicU64>,
    reader: JoinHandle<()>,
    writer: JoinHandle<std::io::Result<()>>,
}

impl SinkThreads {
    /// Starts both threads for a sink configured by `cfg`.
    pub fn start<R, W>(reader: FrameReader<R>, writer: W, cfg: &SinkConfig) -> SinkThreads
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (incoming, wire_bytes, reader) = crate::sink::spawn_reader(reader, cfg);
        let (out, writer) = spawn_writer(writer, None);
        SinkThreads { incoming, out, wire_bytes, reader, writer }
    }

    /// The agent's end (see `agent::serve`): lets go of the channel (the
    /// reader may be blocked on it, full) and waits for the writer only. The
    /// reader is not waited for: it may be blocked on a desktop that keeps
    /// the connection open without sending, and the process ends right after
    /// this, which ends it too.
    pub fn end_without_reader(self) -> std::io::Result<()> {
        let SinkThreads { incoming, out, writer, reader, .. } = self;
        drop(out);
        drop(incoming);
        let written = writer.join().expect("writer thread");
        drop(reader);
        written
    }
}

/// A driven sink session that failed.
pub struct Failure {
    pub error: anyhow::Error,
    /// The connection, when the sink failed (its agent stopped): what the
    /// agent said may explain why. `None` when the session failed at its end.
    pub conn: Option<Handle>,
}

/// What a finished sink session returns: the sink's outcome and the bytes
/// received on the wire.
pub struct Driven {
    pub outcome: SinkOutcome,
    pub wire_bytes: u64,
}

/// Runs a sink configured by `cfg` over `session` to its end, reporting to
/// `events`, then shuts the session down. The order is what keeps a dying
/// agent from hanging the desktop (docs/design.md rule 2): nothing waits on
/// what waits on it. After a failure: the channel is let go (the reader may
/// be blocked on it, full), the connection hung up (a thread blocked on the
/// agent lets go), the threads joined, then the agent stopped. After
/// success: the writer is joined (every frame sent), then the agent waited
/// for, within the idle timeout.
pub fn drive_sink(session: Session, cfg: SinkConfig, events: &mut dyn Events) -> Result<Driven, Failure> {
    let Session { reader, writer, conn: mut handle, .. } = session;
    let threads = SinkThreads::start(reader, writer, &cfg);
    let result = Sink::new(cfg, threads.out.clone(), events).run(&threads.incoming);
    let SinkThreads { incoming, out, reader, writer, wire_bytes } = threads;
    drop(out);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            drop(incoming);
            handle.hang_up();
            let _ = writer.join();
            let _ = reader.join();
            handle.stop();
            return Err(Failure { error, conn: Some(handle) });
        }
    };
    let written = writer.join().expect("writer thread");
    drop(incoming);
    let peer = handle.peer.clone();
    let ended = written.with_context(|| format!("sending to {peer}")).and_then(|()| handle.finish());
    let _ = reader.join();
    ended.map_err(|error| Failure { error, conn: None })?;
    Ok(Driven { outcome, wire_bytes: wire_bytes.load(Ordering::Relaxed) })
}
