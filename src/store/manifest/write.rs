//! Writing a manifest: records in listing order, each held until its file's
//! hash is known, flushed in batches under a temporary name, and named once
//! the snapshot is complete (see the module doc of [`super`]).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, Write};

use anyhow::{Context, Result, bail};

use super::index::{FRAME_EVERY, Mark};
use super::{FLUSH_AFTER, FLUSH_EVERY, FORMAT, Item, MAGIC, PARTIAL, Record, file_name};
use crate::fs::safefs::Dir;

/// The file under the zstd frames, counting the bytes written: where each
/// frame starts, for the index.
struct Counted {
    file: BufWriter<File>,
    bytes: u64,
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

type Frame = zstd::stream::write::Encoder<'static, Counted>;

fn frame(out: Counted) -> io::Result<Frame> {
    zstd::stream::write::Encoder::new(out, 1)
}

fn write_item(out: &mut impl Write, item: &Item) -> io::Result<()> {
    let bytes = postcard::to_stdvec(item).expect("records always serialize");
    out.write_all(&(bytes.len() as u32).to_le_bytes())?;
    out.write_all(&bytes)
}

/// A record whose content hash may still be on its way; `None` once dropped.
struct Held {
    record: Option<Record>,
    /// The ticket whose hash this record waits for.
    waiting: Option<u64>,
}

/// Writes a manifest while its snapshot is written (see the module doc).
pub struct ManifestWriter {
    /// The frame being written; `None` only between two frames.
    out: Option<Frame>,
    /// Where each frame after the first starts (see [`super::index`]).
    marks: Vec<Mark>,
    held: VecDeque<Held>,
    /// Sequence number of `held`'s front.
    front: u64,
    /// Records waiting for each ticket, by sequence number.
    waiting: HashMap<u64, Vec<u64>>,
    entries: u64,
    /// When the zstd stream was last flushed.
    flushed_at: std::time::Instant,
    dir: Dir,
    temp: Vec<u8>,
    name: String,
}

impl ManifestWriter {
    /// Starts `STAMP.partial-PID` in `dir` for `snapshot` (a name of its own:
    /// a resumed run reads the partial manifests of the runs before it).
    pub fn create(dir: &Dir, snapshot: &str) -> Result<ManifestWriter> {
        Self::create_format(dir, snapshot, FORMAT)
    }

    /// A manifest that says it is of `format` (tests write format 1 ones).
    #[doc(hidden)]
    pub fn create_format(dir: &Dir, snapshot: &str, format: u32) -> Result<ManifestWriter> {
        let name = file_name(snapshot);
        let temp = format!("{name}{PARTIAL}{}", std::process::id()).into_bytes();
        let fd = rustix::fs::openat(
            dir,
            temp.as_slice(),
            rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::TRUNC
                | rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("cannot create the manifest of {snapshot}"))?;
        let mut out = frame(Counted { file: BufWriter::new(File::from(fd)), bytes: 0 })?;
        write_item(&mut out, &Item::Header { magic: MAGIC.into(), format, snapshot: snapshot.to_string() })?;
        Ok(ManifestWriter {
            out: Some(out),
            marks: Vec::new(),
            held: VecDeque::new(),
            front: 0,
            waiting: HashMap::new(),
            entries: 0,
            flushed_at: std::time::Instant::now(),
            dir: dir.clone(),
            temp,
            name,
        })
    }

    /// Records held in memory: those waiting for a hash, and every record
    /// listed after the first of them (the manifest is written in order).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Adds the next entry in listing order; `waiting` is the ticket whose
    /// hash it still needs.
    pub fn push(&mut self, record: Record, waiting: Option<u64>) -> io::Result<()> {
        if let Some(t) = waiting {
            self.waiting.entry(t).or_default().push(self.front + self.held.len() as u64);
        }
        self.held.push_back(Held { record: Some(record), waiting });
        self.flush_ready()
    }

    /// The content of `ticket` is known (`size` bytes were written): fill in
    /// every record waiting for it.
    pub fn resolve(&mut self, ticket: u64, hash: [u8; 32], size: u64) -> io::Result<()> {
        for seq in self.waiting.remove(&ticket).unwrap_or_default() {
            let h = &mut self.held[(seq - self.front) as usize];
            if let Some(r) = h.record.as_mut() {
                r.hash = Some(hash);
                r.size = size;
            }
            h.waiting = None;
        }
        self.flush_ready()
    }

    /// The entry at `path` waiting for `ticket` will not be in the snapshot.
    pub fn drop_entry(&mut self, ticket: u64, path: &[u8]) -> io::Result<()> {
        let Some(seqs) = self.waiting.get_mut(&ticket) else { return Ok(()) };
        let front = self.front;
        let held = &mut self.held;
        seqs.retain(|&seq| {
            let h = &mut held[(seq - front) as usize];
            if h.record.as_ref().is_some_and(|r| r.path == path) {
                h.record = None;
                h.waiting = None;
                false
            } else {
                true
            }
        });
        if seqs.is_empty() {
            self.waiting.remove(&ticket);
        }
        self.flush_ready()
    }

    fn flush_ready(&mut self) -> io::Result<()> {
        let mut wrote = false;
        while self.held.front().is_some_and(|h| h.waiting.is_none()) {
            let h = self.held.pop_front().expect("checked");
            self.front += 1;
            let Some(record) = h.record else { continue };
            if self.entries > 0 && self.entries.is_multiple_of(FRAME_EVERY) {
                self.next_frame(&record.path)?;
            }
            write_item(self.out.as_mut().expect("between frames only in next_frame"), &Item::Entry(record))?;
            self.entries += 1;
            wrote = true;
            if self.entries.is_multiple_of(FLUSH_EVERY) {
                self.flush()?;
            }
        }
        if wrote && self.flushed_at.elapsed() >= FLUSH_AFTER {
            self.flush()?;
        }
        Ok(())
    }

    /// Ends a zstd block, so that an interrupted run's manifest holds what
    /// it wrote (a resumed run reuses it).
    fn flush(&mut self) -> io::Result<()> {
        self.flushed_at = std::time::Instant::now();
        self.out.as_mut().expect("between frames only in next_frame").flush()
    }

    /// Ends the zstd frame and starts the next, whose first record is
    /// `path`: a lookup can start decoding there.
    fn next_frame(&mut self, path: &[u8]) -> io::Result<()> {
        let out = self.out.take().expect("between frames only here").finish()?;
        self.marks.push(Mark { offset: out.bytes, entries: self.entries, path: path.to_vec() });
        self.out = Some(frame(out)?);
        Ok(())
    }

    /// Writes the footer and flushes the file to disk; the manifest keeps its
    /// `.partial` name until [`commit`].
    pub fn finish(mut self) -> Result<FinishedManifest> {
        if !self.held.is_empty() {
            bail!("{} manifest entries still wait for their content", self.held.len());
        }
        let mut out = self.out.take().expect("between frames only in next_frame");
        write_item(&mut out, &Item::Footer { entries: self.entries })?;
        let mut out = out.finish()?;
        super::index::write(&mut out, &self.marks)?;
        let file = out.file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(FinishedManifest { dir: self.dir, temp: self.temp, name: self.name })
    }
}

/// The partial manifests of `stamp_name` (an interrupted snapshot's), newest
/// first.
pub fn partials(dir: &Dir, name: &str) -> Vec<Vec<u8>> {
    let prefix = format!("{name}{PARTIAL}");
    let mut found: Vec<(i64, Vec<u8>)> = dir
        .names()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(prefix.as_bytes()))
        .map(|n| (dir.stat(&n).map_or(0, |st| st.st_mtime), n))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, n)| n).collect()
}

/// A manifest written whole, waiting for its snapshot to be complete.
pub struct FinishedManifest {
    dir: Dir,
    temp: Vec<u8>,
    name: String,
}

impl FinishedManifest {
    /// Reads it back (before it has its final name).
    pub fn reader(&self) -> Result<super::ManifestReader> {
        super::ManifestReader::open(&self.dir, &self.temp)?.context("the manifest just written is gone")
    }

    /// Gives the manifest its final name (after the snapshot got its own).
    pub fn commit(self) -> io::Result<()> {
        self.dir.rename(&self.temp, self.name.as_bytes())?;
        self.dir.fsync()
    }
}
