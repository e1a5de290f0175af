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

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result, bail};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::digest::ContentHasher;
use crate::fs::meta::{self, Meta};
use crate::fs::safefs::{Chain, Dir, Shown, file_type, join, libc_errno};
use crate::wire::frame::{CHUNK, Encoder, Frame, FrameReader};
use crate::wire::msg::{
    BATCH_XATTRS_MAX, Entry, Fetch, Link, LogKind, ReadError, ReadStatus, SinkMsg, SkipReason, SourceMsg, SpecialKind,
};
use crate::wire::{Outbox, ProtocolError, decode, spawn_writer};

/// Size of the windows a delta is computed in (docs/design.md: one signature, diffed
/// window by window, so memory stays flat for any file size).
pub const DELTA_WINDOW: usize = 1 << 20;

/// What the source lists.
#[derive(Default)]
pub struct Selection {
    excludes: Option<Gitignore>,
    only: Vec<Vec<u8>>,
    /// Open every regular file while listing; list those that can't be read
    /// as unreadable (`rbackup check`).
    pub probe_read: bool,
}

impl Selection {
    /// Gitignore-style `excludes` (relative to the root) and, if not empty,
    /// `only` these relative paths.
    pub fn new(excludes: &[String], only: &[Vec<u8>]) -> Result<Selection> {
        let excludes = if excludes.is_empty() {
            None
        } else {
            let mut b = GitignoreBuilder::new(".");
            for pattern in excludes {
                b.add_line(None, pattern).with_context(|| format!("bad exclude pattern {pattern:?}"))?;
            }
            Some(b.build().context("building the exclude patterns")?)
        };
        let only = only
            .iter()
            .map(|p| p.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect::<Vec<_>>().join(&b'/'))
            .collect();
        Ok(Selection { excludes, only, probe_read: false })
    }

    fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.excludes.as_ref().is_some_and(|g| g.matched(std::ffi::OsStr::from_bytes(rel), is_dir).is_ignore())
    }

    /// Whether the directory `rel` is left out of the listing, itself or
    /// through one of its parents (the walk never enters an excluded one).
    pub fn leaves_out_dir(&self, rel: &[u8]) -> bool {
        let mut end = 0;
        while end < rel.len() {
            end = rel[end..].iter().position(|&b| b == b'/').map_or(rel.len(), |i| end + i);
            if end > 0 && self.excluded(&rel[..end], true) {
                return true;
            }
            end += 1;
        }
        false
    }

    /// Whether `rel` is listed: `Some(true)` wholly, `Some(false)` only as a
    /// directory on the way to a chosen path, `None` not at all.
    fn chosen(&self, rel: &[u8]) -> Option<bool> {
        if self.only.is_empty() {
            return Some(true);
        }
        let mut on_the_way = false;
        for p in &self.only {
            if p.is_empty() || is_within(rel, p) {
                return Some(true);
            }
            if is_within(p, rel) {
                on_the_way = true;
            }
        }
        on_the_way.then_some(false)
    }
}

/// `path` equals `dir` or lies beneath it (everything lies beneath the root, `""`).
fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

/// How many listing entries the sink still accepts.
struct Credits {
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
    fn take(&self, want: u64) -> Option<u64> {
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

/// Runs the source side of a session until the sink says it is finished.
/// Lines the sink reports go to `on_log`; returns the sink's summary.
pub fn run<R, W>(
    root: Dir,
    selection: Selection,
    compress: bool,
    reader: FrameReader<R>,
    writer: W,
    on_log: &mut dyn FnMut(LogKind, &str),
) -> Result<Vec<(String, u64)>>
where
    R: Read,
    W: Write + Send + 'static,
{
    let (out, writer_thread) = spawn_writer(writer, Some(64));
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
    mut reader: FrameReader<R>,
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
        }
    }
}

/// Entries per listing frame, and the byte size that also closes a batch.
const BATCH_ENTRIES: usize = 256;
const BATCH_BYTES: usize = 1 << 20;

struct Walker {
    out: Outbox,
    enc: Encoder,
    credits: Arc<Credits>,
    credit: u64,
    selection: Selection,
    batch: Vec<Entry>,
    batch_bytes: usize,
    /// Extended attributes in the batch (bounded: `BATCH_XATTRS_MAX`).
    batch_xattrs: usize,
    /// (dev, ino) of multiply-linked files seen → (group id, links still to see).
    links: HashMap<(u64, u64), (u64, u32)>,
    next_link: u64,
    /// The directory this thread's own working directory is in (kept open,
    /// so that its descriptor number can't be reused), if it has its own.
    cwd: Option<Dir>,
    own_cwd: bool,
}

/// A directory just entered: its handle, `fstat` and names.
struct Level {
    dir: Dir,
    st: rustix::fs::Stat,
    names: Vec<Vec<u8>>,
}

impl Walker {
    fn new(out: Outbox, credits: Arc<Credits>, selection: Selection, compress: bool) -> Walker {
        Walker {
            out,
            enc: Encoder::new(compress),
            credits,
            credit: 0,
            selection,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_xattrs: 0,
            links: HashMap::new(),
            next_link: 0,
            cwd: None,
            own_cwd: false,
        }
    }

    fn run(mut self, root: &Dir) -> Result<()> {
        // Without it (a sandbox that forbids unshare), xattrs are read
        // through procfs paths.
        self.own_cwd = crate::fs::sys::private_cwd().is_ok();
        match self.walk(root) {
            Ok(()) => Ok(()),
            // The sink went away; the caller reports why.
            Err(e) if e.downcast_ref::<Stopped>().is_some() => Ok(()),
            Err(e) => {
                let _ = self.out.send(self.enc.msg(&SourceMsg::Fatal(format!("{e:#}"))));
                Err(e)
            }
        }
    }

    fn walk(&mut self, root: &Dir) -> Result<()> {
        let st = root.stat_self().context("reading the root directory")?;
        let xattrs = meta::read_dir_xattrs(root).context("reading the root's extended attributes")?;
        let names = root.names().context("listing the root directory")?;
        let partial = !self.selection.only.is_empty() && self.selection.chosen(b"") != Some(true);
        self.push(Entry::Dir { name: Vec::new(), meta: meta::from_stat(&st, xattrs), unreadable: None, partial })?;
        // The names left at each level, the directories' handles (a bounded
        // number of them, see `Chain`), and the current directory's path.
        let mut stack = vec![names.into_iter()];
        let mut chain = Chain::new(root.clone());
        let (mut rel, mut rel_ends) = (Vec::new(), Vec::new());
        while let Some(names) = stack.last_mut() {
            let Some(name) = names.next() else {
                stack.pop();
                if let Some(end) = rel_ends.pop() {
                    chain.pop();
                    rel.truncate(end);
                }
                self.push(Entry::End)?;
                continue;
            };
            let dir = match chain.top() {
                Ok(dir) => dir.expect("a walked directory exists"),
                Err(_) => {
                    // Opened again deep in the tree, it was gone or another
                    // directory: what it still held has vanished.
                    for name in std::iter::once(name).chain(names.by_ref()) {
                        self.push(Entry::Skipped { name, reason: SkipReason::Vanished })?;
                    }
                    continue;
                }
            };
            let child_rel = join(&rel, &name);
            if let Some(next) = self.visit(&dir, name.clone(), &child_rel)? {
                chain.push(&name, next.dir, &next.st);
                stack.push(next.names.into_iter());
                rel_ends.push(rel.len());
                rel = child_rel;
            }
        }
        self.flush()?;
        self.send(&SourceMsg::ListingDone)
    }

    /// Lists one entry; returns the level to descend into for a directory.
    fn visit(&mut self, dir: &Dir, name: Vec<u8>, rel: &[u8]) -> Result<Option<Level>> {
        let Some(whole) = self.selection.chosen(rel) else {
            return Ok(None);
        };
        let st = match dir.stat(&name) {
            Ok(st) => st,
            Err(e) => {
                self.push(Entry::Skipped { name, reason: skip_reason(&e) })?;
                return Ok(None);
            }
        };
        let ft = file_type(&st);
        if self.selection.excluded(rel, ft == FileType::Directory) {
            return Ok(None);
        }
        if !whole && ft != FileType::Directory {
            return Ok(None);
        }
        if ft == FileType::Directory {
            return self.visit_dir(dir, name, whole);
        }
        let xattrs = match self.xattrs(dir, &name) {
            Ok(x) => x,
            Err(e) => {
                self.push(Entry::Skipped { name, reason: skip_reason(&e) })?;
                return Ok(None);
            }
        };
        let meta = meta::from_stat(&st, xattrs);
        let entry = match ft {
            FileType::RegularFile
                if self.selection.probe_read
                    && let Err(e) = dir.open_file(&name) =>
            {
                Entry::Skipped { name, reason: skip_reason(&e) }
            }
            FileType::RegularFile => {
                let size = st.st_size as u64;
                let link = self.link_of(&st);
                Entry::File { name, meta, size, sparse: (st.st_blocks as u64) * 512 < size, link }
            }
            FileType::Symlink => match dir.read_link(&name) {
                Ok(target) => Entry::Symlink { name, meta, target },
                Err(e) => Entry::Skipped { name, reason: skip_reason(&e) },
            },
            FileType::Fifo => Entry::Special { name, meta, kind: SpecialKind::Fifo, rdev: 0 },
            FileType::CharacterDevice => Entry::Special { name, meta, kind: SpecialKind::Char, rdev: st.st_rdev },
            FileType::BlockDevice => Entry::Special { name, meta, kind: SpecialKind::Block, rdev: st.st_rdev },
            _ => Entry::Skipped { name, reason: SkipReason::Socket },
        };
        self.push(entry)?;
        Ok(None)
    }

    fn visit_dir(&mut self, parent: &Dir, name: Vec<u8>, whole: bool) -> Result<Option<Level>> {
        // Open first and describe what was opened, so the metadata and the
        // children belong to the same directory even if it is being replaced.
        let child = match parent.open_dir(&name) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc_errno::EACCES) => {
                return self.unreadable_dir(parent, name, &e);
            }
            Err(e) => {
                // Gone, or swapped for a symlink or file since the stat.
                self.push(Entry::Skipped { name, reason: skip_reason(&e) })?;
                return Ok(None);
            }
        };
        let st = child.stat_self()?;
        let xattrs = match meta::read_dir_xattrs(&child) {
            Ok(x) => x,
            Err(e) => {
                self.push(Entry::Skipped { name, reason: skip_reason(&e) })?;
                return Ok(None);
            }
        };
        let meta = meta::from_stat(&st, xattrs);
        let names = match child.names() {
            Ok(n) => n,
            Err(e) => {
                self.push(Entry::Dir { name, meta, unreadable: Some(e.to_string()), partial: false })?;
                self.push(Entry::End)?;
                return Ok(None);
            }
        };
        self.push(Entry::Dir { name, meta, unreadable: None, partial: !whole })?;
        Ok(Some(Level { dir: child, st, names }))
    }

    fn unreadable_dir(&mut self, parent: &Dir, name: Vec<u8>, err: &io::Error) -> Result<Option<Level>> {
        let st = match parent.stat(&name) {
            Ok(st) => st,
            Err(e) => {
                self.push(Entry::Skipped { name, reason: skip_reason(&e) })?;
                return Ok(None);
            }
        };
        let xattrs = self.xattrs(parent, &name).unwrap_or_default();
        let meta = meta::from_stat(&st, xattrs);
        self.push(Entry::Dir { name, meta, unreadable: Some(err.to_string()), partial: false })?;
        self.push(Entry::End)?;
        Ok(None)
    }

    /// The managed xattrs of `name` in `dir`, by a name relative to this
    /// thread's working directory when it has its own.
    fn xattrs(&mut self, dir: &Dir, name: &[u8]) -> io::Result<Vec<meta::Xattr>> {
        if !self.own_cwd {
            return meta::read_xattrs(dir, name);
        }
        if self.cwd.as_ref().map(AsRawFd::as_raw_fd) != Some(dir.as_raw_fd()) {
            rustix::process::fchdir(dir)?;
            self.cwd = Some(dir.clone());
        }
        meta::read_xattrs_in_cwd(name)
    }

    fn link_of(&mut self, st: &rustix::fs::Stat) -> Option<Link> {
        if st.st_nlink < 2 {
            return None;
        }
        let nlink = st.st_nlink as u32;
        let key = (st.st_dev, st.st_ino);
        let id = match self.links.get_mut(&key) {
            Some((id, left)) => {
                let id = *id;
                *left -= 1;
                if *left == 0 {
                    self.links.remove(&key);
                }
                id
            }
            None => {
                self.next_link += 1;
                self.links.insert(key, (self.next_link, nlink - 1));
                self.next_link
            }
        };
        Some(Link { id, nlink })
    }

    fn push(&mut self, entry: Entry) -> Result<()> {
        if self.credit == 0 {
            // Out of credit: send what we have, then wait for the sink.
            self.flush()?;
            self.credit = self.credits.take(u64::MAX).ok_or(Stopped)?;
        }
        self.credit -= 1;
        // A batch stays within what the sink decodes (BATCH_XATTRS_MAX).
        let xattrs = entry.meta().map_or(0, |m| m.xattrs.len());
        if self.batch_xattrs + xattrs > BATCH_XATTRS_MAX {
            self.flush()?;
        }
        self.batch_xattrs += xattrs;
        self.batch_bytes += entry_size(&entry);
        self.batch.push(entry);
        if self.batch.len() >= BATCH_ENTRIES || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_xattrs = 0;
        self.send(&SourceMsg::Entries(batch))
    }

    fn send(&mut self, msg: &SourceMsg) -> Result<()> {
        self.out.send(self.enc.msg(msg)).map_err(|_| Stopped.into())
    }
}

/// The session ended under the walker (the sink went away).
#[derive(Debug, thiserror::Error)]
#[error("the session ended")]
struct Stopped;

fn entry_size(e: &Entry) -> usize {
    let meta_size = |m: &Meta| 40 + m.xattrs.iter().map(|x| x.name.len() + x.value.len() + 4).sum::<usize>();
    match e {
        Entry::Dir { name, meta, .. } | Entry::File { name, meta, .. } | Entry::Special { name, meta, .. } => {
            name.len() + meta_size(meta)
        }
        Entry::Symlink { name, meta, target } => name.len() + target.len() + meta_size(meta),
        Entry::Skipped { name, .. } => name.len() + 16,
        Entry::End => 1,
    }
}

fn skip_reason(e: &io::Error) -> SkipReason {
    match e.raw_os_error() {
        Some(libc_errno::ENOENT | libc_errno::ENOTDIR | libc_errno::ELOOP) => SkipReason::Vanished,
        _ => SkipReason::Unreadable(e.to_string()),
    }
}

fn serve_fetches(root: &Dir, fetches: &Receiver<Fetch>, out: &Outbox, compress: bool) {
    let mut enc = Encoder::new(compress);
    let mut buf = vec![0u8; DELTA_WINDOW];
    let mut batch = Batch { out, frames: Vec::new() };
    loop {
        // Send the gathered frames whenever no request is waiting: the sink
        // may be waiting for them.
        let fetch = match fetches.try_recv() {
            Ok(f) => f,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if batch.flush().is_err() {
                    return;
                }
                match fetches.recv() {
                    Ok(f) => f,
                    Err(_) => return,
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        };
        match serve_one(root, &fetch, &mut batch, &mut enc, &mut buf) {
            Ok(()) => {}
            Err(Served::Stopped) => return,
            Err(Served::Failed(error)) => {
                if batch.send(enc.msg(&SourceMsg::FileFailed { id: fetch.id, error })).is_err() {
                    return;
                }
            }
        }
    }
    let _ = batch.flush();
}

/// Frames gathered into few large writes: a small file is three small frames
/// (begin, data, end), and a write per frame costs the writer, SSH and the
/// sink a wake-up each.
struct Batch<'a> {
    out: &'a Outbox,
    frames: Vec<u8>,
}

/// Size at which gathered frames are sent, and above which a frame goes alone.
const BATCH_SEND: usize = 128 << 10;

impl Batch<'_> {
    fn send(&mut self, frame: Vec<u8>) -> Result<(), Served> {
        if frame.len() >= BATCH_SEND {
            self.flush()?;
            return self.out.send(frame).map_err(|_| Served::Stopped);
        }
        self.frames.extend_from_slice(&frame);
        if self.frames.len() >= BATCH_SEND {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Served> {
        if self.frames.is_empty() {
            return Ok(());
        }
        let frames = std::mem::replace(&mut self.frames, Vec::with_capacity(2 * BATCH_SEND));
        self.out.send(frames).map_err(|_| Served::Stopped)
    }
}

enum Served {
    /// The session is over.
    Stopped,
    /// This file could not be sent; the session goes on.
    Failed(ReadError),
}

fn read_error(e: &io::Error) -> ReadError {
    match e.raw_os_error() {
        Some(libc_errno::ENOENT | libc_errno::ENOTDIR) => ReadError::Vanished,
        Some(libc_errno::EACCES | libc_errno::EPERM) => ReadError::Unreadable(e.to_string()),
        Some(libc_errno::ELOOP | libc_errno::EXDEV) => {
            ReadError::Other("its path now goes through a symlink; not followed".into())
        }
        _ => ReadError::Other(e.to_string()),
    }
}

fn serve_one(root: &Dir, fetch: &Fetch, out: &mut Batch, enc: &mut Encoder, buf: &mut [u8]) -> Result<(), Served> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = root.resolve(&fetch.path, flags).map_err(|e| Served::Failed(read_error(&e)))?;
    let file = File::from(fd);
    let before = rustix::fs::fstat(&file).map_err(|e| Served::Failed(read_error(&e.into())))?;
    if file_type(&before) != FileType::RegularFile {
        return Err(Served::Failed(ReadError::Other("no longer a regular file".into())));
    }
    let size = before.st_size as u64;
    // A resumed fetch starts where the sink's data ends, unless the file is
    // now shorter than that: then it is sent whole.
    let from = if fetch.offset <= size { fetch.offset } else { 0 };
    let begin = if from > 0 {
        SourceMsg::FileResume { id: fetch.id, size, offset: from }
    } else {
        SourceMsg::FileBegin { id: fetch.id, size }
    };
    out.send(enc.msg(&begin))?;

    // The digest of the whole file, for the sink to check what it rebuilt
    // or kept: the prefix it already has is read here, not sent.
    let mut hasher = ContentHasher::new();
    let mut done = 0;
    while done < from {
        let to = (done + PREFIX_STEP).min(from);
        hasher.update_from_file(&file, done, to).map_err(|e| Served::Failed(read_error(&e)))?;
        done = to;
        if done < from {
            // Nothing moves on the wire meanwhile: say that this is work.
            out.send(enc.msg(&SourceMsg::Hashing { id: fetch.id, done }))?;
            out.flush()?;
        }
    }
    let read = match &fetch.signature {
        Some(sig) => send_delta(&file, size, from, sig, enc, out, buf, &mut hasher)?,
        None => send_whole(&file, size, from, (before.st_blocks as u64) * 512 < size, enc, out, &mut hasher)?,
    };
    let hash = Some(hasher.finish(size));
    let after = rustix::fs::fstat(&file).map_err(|e| Served::Failed(read_error(&e.into())))?;
    let mut probe = [0u8; 1];
    let grew = file.read_at(&mut probe, size).is_ok_and(|n| n > 0);
    let changed = read != size
        || grew
        || after.st_size != before.st_size
        || after.st_mtime != before.st_mtime
        || after.st_mtime_nsec != before.st_mtime_nsec;
    let status = if changed { ReadStatus::Changed } else { ReadStatus::Complete };
    out.send(enc.msg(&SourceMsg::FileEnd { id: fetch.id, status, hash }))
}

/// Bytes of a resumed fetch's prefix hashed between two signs of life.
const PREFIX_STEP: u64 = 64 << 20;

/// Sends the file's data extents from `from` on; returns how many bytes of
/// it could be read before EOF (less than `size` if it shrank).
fn send_whole(
    file: &File,
    size: u64,
    from: u64,
    sparse: bool,
    enc: &mut Encoder,
    out: &mut Batch,
    hasher: &mut ContentHasher,
) -> Result<u64, Served> {
    let mut offset = from;
    while offset < size {
        let (start, end) = if sparse {
            match rustix::fs::seek(file, SeekFrom::Data(offset)) {
                Ok(d) if d < size => (d, rustix::fs::seek(file, SeekFrom::Hole(d)).unwrap_or(size).min(size)),
                // Only a hole remains.
                Ok(_) | Err(rustix::io::Errno::NXIO) => return Ok(size),
                Err(e) => return Err(Served::Failed(read_error(&e.into()))),
            }
        } else {
            (offset, size)
        };
        let mut pos = start;
        // Data is read from the file's position, which SEEK_HOLE moved (here
        // or when the prefix of a resumed fetch was hashed).
        rustix::fs::seek(file, SeekFrom::Start(pos)).map_err(|e| Served::Failed(read_error(&e.into())))?;
        while pos < end {
            let want = ((end - pos) as usize).min(CHUNK);
            match enc.data_from(file, pos, want, |data| hasher.update_at(pos, data)) {
                Ok(Some((frame, n))) => {
                    out.send(frame)?;
                    pos += n as u64;
                }
                Ok(None) => return Ok(pos),
                Err(e) => return Err(Served::Failed(read_error(&e))),
            }
        }
        offset = end;
    }
    Ok(size)
}

/// Largest signature block the source accepts; anything outside this range
/// is a malformed request.
const SIG_BLOCK_RANGE: std::ops::RangeInclusive<u32> = 64..=(1 << 20);

#[allow(clippy::too_many_arguments)]
fn send_delta(
    file: &File,
    size: u64,
    from: u64,
    signature: &[u8],
    enc: &mut Encoder,
    out: &mut Batch,
    buf: &mut [u8],
    hasher: &mut ContentHasher,
) -> Result<u64, Served> {
    let bad = || Served::Failed(ReadError::Other("malformed signature in the request".into()));
    if signature.len() < 12 {
        return Err(bad());
    }
    let block = u32::from_be_bytes(signature[4..8].try_into().expect("4 bytes"));
    let strong = u32::from_be_bytes(signature[8..12].try_into().expect("4 bytes"));
    if !SIG_BLOCK_RANGE.contains(&block) || !(1..=16).contains(&strong) {
        return Err(bad());
    }
    let sig = fast_rsync::Signature::deserialize(signature.to_vec()).map_err(|_| bad())?;
    let index = sig.index();
    let mut pos = from;
    let mut delta = Vec::with_capacity(DELTA_WINDOW + 1024);
    while pos < size {
        let want = ((size - pos) as usize).min(buf.len());
        let n = read_fully_at(file, &mut buf[..want], pos).map_err(|e| Served::Failed(read_error(&e)))?;
        if n == 0 {
            break;
        }
        hasher.update_at(pos, &buf[..n]);
        delta.clear();
        fast_rsync::diff(&index, &buf[..n], &mut delta).map_err(|_| bad())?;
        out.send(enc.delta(n as u32, &delta))?;
        pos += n as u64;
        if n < want {
            break;
        }
    }
    Ok(pos)
}

fn read_fully_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_of_chosen_paths() {
        let s = Selection::new(&[], &[b"a/b".to_vec(), b"/c/".to_vec()]).unwrap();
        assert_eq!(s.chosen(b""), Some(false));
        assert_eq!(s.chosen(b"a"), Some(false));
        assert_eq!(s.chosen(b"a/b"), Some(true));
        assert_eq!(s.chosen(b"a/b/x"), Some(true));
        assert_eq!(s.chosen(b"a/bx"), None);
        assert_eq!(s.chosen(b"c"), Some(true));
        assert_eq!(s.chosen(b"d"), None);
        assert_eq!(Selection::default().chosen(b"x"), Some(true));
    }

    #[test]
    fn a_directory_is_left_out_through_its_parents() {
        let s = Selection::new(&["/var/cache/".into(), "*.tmp".into()], &[]).unwrap();
        assert!(s.leaves_out_dir(b"var/cache"));
        assert!(s.leaves_out_dir(b"var/cache/backups/x"));
        assert!(s.leaves_out_dir(b"home/a.tmp/bk"));
        assert!(!s.leaves_out_dir(b"var/lib/backups"));
        assert!(!s.leaves_out_dir(b"cache/var"));
        assert!(!Selection::new(&[], &[]).unwrap().leaves_out_dir(b"var/cache"));
    }

    #[test]
    fn excludes_are_gitignore_style_and_relative() {
        let s = Selection::new(&["/cache/".into(), "*.tmp".into(), "!keep.tmp".into()], &[]).unwrap();
        assert!(s.excluded(b"cache", true));
        assert!(!s.excluded(b"cache", false));
        assert!(!s.excluded(b"sub/cache", true));
        assert!(s.excluded(b"x/y.tmp", false));
        assert!(!s.excluded(b"x/keep.tmp", false));
        assert!(!s.excluded(b"\xff.txt", false));
    }
}
