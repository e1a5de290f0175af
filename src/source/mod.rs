//! The source side of a session: walk a root and stream its listing, and serve
//! the file data the sink asks for. The agent runs this for a backup; the
//! desktop runs it over a snapshot for a restore.
//!
//! Three threads besides the caller's: the walker streams the listing as far
//! as the sink's credit allows; the server answers fetches in order; the
//! writer puts their frames on the wire. The caller's thread reads the sink's
//! messages. The walker never follows a symlink: it opens each directory
//! from its parent's handle with `O_NOFOLLOW`, so a directory swapped for a
//! symlink mid-run is reported as changed, never entered. It keeps a bounded
//! number of those handles whatever the depth ([`Chain`]): a directory deep
//! in the tree is opened again beneath the root when the walk climbs back
//! to it, and what it held is reported as vanished if it is no longer the
//! directory the walk entered. Fetches resolve
//! their path beneath the root with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`.

mod pace;
mod select;
mod serve;
mod walk;

pub use pace::{Paced, parse_rate};
pub use select::Selection;

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result, bail};

use crate::fs::safefs::{Dir, Shown};
use crate::wire::frame::{Frame, FrameReader};
use crate::wire::msg::{Fetch, LogKind, SinkMsg};
use crate::wire::{ProtocolError, decode, spawn_writer};
use serve::serve_fetches;
use walk::Walker;

/// Size of the windows a delta is computed in (docs/design.md: one signature, diffed
/// window by window, so memory stays flat for any file size).
pub const DELTA_WINDOW: usize = 1 << 20;

/// How many listing entries the sink still accepts.
pub(super) struct Credits {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Credits {
    fn add(&self, n: u32) {
        let mut s = self.state.lock().expect("credits lock");
        s.0 += u64::from(n);
        self.cv.notify_all();
    }

    fn close(&self) {
        self.state.lock().expect("credits lock").1 = true;
        self.cv.notify_all();
    }

    /// Takes up to `want` credits, waiting for at least one. `None` once closed.
    pub(super) fn take(&self, want: u64) -> Option<u64> {
        let mut s = self.state.lock().expect("credits lock");
        loop {
            if s.1 {
                return None;
            }
            if s.0 > 0 {
                let n = s.0.min(want);
                s.0 -= n;
                return Some(n);
            }
            s = self.cv.wait(s).expect("credits lock");
        }
    }
}

/// Runs the source side of a session until the sink says it is finished,
/// sending at most `bwlimit` bytes per second on average (0: no limit).
/// Lines the sink reports go to `on_log`; returns the sink's summary.
pub fn run<R, W>(
    root: Dir,
    selection: Selection,
    compress: bool,
    bwlimit: u64,
    reader: &mut FrameReader<R>,
    writer: W,
    on_log: &mut dyn FnMut(LogKind, &str),
) -> Result<Vec<(String, u64)>>
where
    R: Read,
    W: Write + Send + 'static,
{
    let (out, writer_thread) =
        if bwlimit > 0 { spawn_writer(Paced::new(writer, bwlimit), Some(64)) } else { spawn_writer(writer, Some(64)) };
    let credits = Arc::new(Credits { state: Mutex::new((0, false)), cv: Condvar::new() });
    let (fetch_tx, fetch_rx) = std::sync::mpsc::channel::<Fetch>();

    let walker = {
        let (out, credits, root) = (out.clone(), credits.clone(), root.clone());
        std::thread::Builder::new()
            .name("rbackup-walk".into())
            .spawn(move || Walker::new(out, credits, selection, compress).run(&root))
            .expect("spawn walker")
    };
    let server = {
        let out = out.clone();
        std::thread::Builder::new()
            .name("rbackup-serve".into())
            .spawn(move || serve_fetches(&root, &fetch_rx, &out, compress))
            .expect("spawn server")
    };
    drop(out);

    let result = read_sink(reader, &credits, &fetch_tx, on_log);
    credits.close();
    drop(fetch_tx);
    let walked = walker.join().expect("walker thread");
    server.join().expect("server thread");
    let written = writer_thread.join().expect("writer thread");
    let summary = result?;
    walked?;
    written.context("writing to the sink")?;
    Ok(summary)
}

fn read_sink<R: Read>(
    reader: &mut FrameReader<R>,
    credits: &Credits,
    fetches: &std::sync::mpsc::Sender<Fetch>,
    on_log: &mut dyn FnMut(LogKind, &str),
) -> Result<Vec<(String, u64)>> {
    loop {
        let frame = reader.read().map_err(ProtocolError::from)?.ok_or(ProtocolError::Closed)?;
        let Frame::Msg(body) = frame else {
            bail!(ProtocolError::Unexpected("the sink sent a data frame".into()));
        };
        match decode::<SinkMsg>(&body)? {
            SinkMsg::Credit(n) => credits.add(n),
            SinkMsg::Fetch(f) => {
                if fetches.send(f).is_err() {
                    bail!("the file server stopped");
                }
            }
            // The peer's text, escaped before it reaches a terminal or a log.
            SinkMsg::Log { kind, text } => on_log(kind, &Shown(text.as_bytes()).to_string()),
            SinkMsg::Finish { summary } => return Ok(summary),
            SinkMsg::Fatal(message) => bail!(crate::wire::PeerFailed {
                side: "receiving",
                message: format!("{:#}", Shown(message.as_bytes()))
            }),
            SinkMsg::Held(_) | SinkMsg::Committed { .. } => {
                bail!(ProtocolError::Unexpected("the sink answered a replica's question in a session".into()))
            }
        }
    }
}
