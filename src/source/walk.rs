//! The walker: lists the tree depth first, as far as the sink's credit
//! allows, in batches bounded in entries and bytes; never follows a symlink
//! (see the module doc of [`super`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustix::fs::FileType;

use crate::fs::meta::{self, Meta};
use crate::fs::safefs::{Chain, Dir, file_type, join, libc_errno};
use crate::wire::Outbox;
use crate::wire::frame::Encoder;
use crate::wire::msg::{BATCH_XATTRS_MAX, Entry, Link, SkipReason, SourceMsg, SpecialKind};

use super::{Credits, Selection};

/// Entries per listing frame, and the byte size that also closes a batch.
pub(super) const BATCH_ENTRIES: usize = 256;

pub(super) const BATCH_BYTES: usize = 1 << 20;

pub(super) struct Walker {
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
    /// For `Selection::one_file_system`, per level of the walk: the
    /// filesystem its entries must be on — that of the root, or of the
    /// chosen path (`paths`) the level is in; `None` for a directory on the
    /// way to a chosen path, which may be on any.
    devs: Vec<Option<u64>>,
    /// Chosen paths (`paths`, a restore's `--path`) not found where they
    /// should be: listed as unreadable, so the run says so.
    missing: Vec<Vec<u8>>,
}

/// A directory just entered: its handle, `fstat` and names.
pub(super) struct Level {
    dir: Dir,
    st: rustix::fs::Stat,
    names: Vec<Vec<u8>>,
    /// The filesystem its entries must be on (see `Walker::devs`).
    dev: Option<u64>,
}

impl Walker {
    pub(super) fn new(out: Outbox, credits: Arc<Credits>, selection: Selection, compress: bool) -> Walker {
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
            devs: Vec::new(),
            missing: Vec::new(),
        }
    }

    pub(super) fn run(mut self, root: &Dir) -> Result<()> {
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
        let names = self.with_missing(b"", names);
        let on_the_way = !self.selection.only.is_empty() && self.selection.chosen(b"") != Some(true);
        let partial = (on_the_way && !self.selection.whole_on_the_way) || self.selection.keeps_unlisted(b"");
        self.devs = vec![(!on_the_way).then_some(st.st_dev)];
        self.push(Entry::Dir { name: Vec::new(), meta: meta::from_stat(&st, xattrs), unreadable: None, partial })?;
        // The names left at each level, the directories' handles (a bounded
        // number of them, see `Chain`), and the current directory's path.
        let mut stack = vec![names.into_iter()];
        let mut chain = Chain::new(root.clone());
        let (mut rel, mut rel_ends) = (Vec::new(), Vec::new());
        while let Some(names) = stack.last_mut() {
            let Some(name) = names.next() else {
                stack.pop();
                self.devs.pop();
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
                let names = self.with_missing(&child_rel, next.names);
                stack.push(names.into_iter());
                self.devs.push(next.dev);
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
            Err(e) if self.missing.iter().any(|m| m == rel) => {
                let why = format!("{e}: a path the job names (`paths`) is not on the source; fix the job or create it");
                self.push(Entry::Skipped { name, reason: SkipReason::Unreadable(why) })?;
                return Ok(None);
            }
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
            let partial = (!whole && !self.selection.whole_on_the_way) || self.selection.keeps_unlisted(rel);
            return self.visit_dir(dir, name, whole, partial);
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

    /// `names` of directory `rel` with the chosen paths it lacks merged in,
    /// in order, remembered as missing (see `missing`).
    fn with_missing(&mut self, rel: &[u8], mut names: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let missing = self.selection.missing_beneath(rel, &names);
        for name in missing {
            self.missing.push(join(rel, &name));
            let at = names.binary_search(&name).unwrap_or_else(|i| i);
            names.insert(at, name);
        }
        names
    }

    /// Lists a directory (`partial`: the sink removes nothing the listing
    /// lacks from it) and returns the level to descend into.
    fn visit_dir(&mut self, parent: &Dir, name: Vec<u8>, whole: bool, partial: bool) -> Result<Option<Level>> {
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
        // On the way to a chosen path: any filesystem; a chosen path: its
        // own; beneath: the one it is on.
        let dev = match (whole, self.devs.last().copied().flatten()) {
            (false, _) => None,
            (true, None) => Some(st.st_dev),
            (true, Some(d)) => Some(d),
        };
        if self.selection.one_file_system && dev.is_some_and(|d| d != st.st_dev) {
            // A mount point: listed with its own metadata, never entered.
            self.push(Entry::Dir { name, meta, unreadable: None, partial: false })?;
            self.push(Entry::End)?;
            return Ok(None);
        }
        let names = match child.names() {
            Ok(n) => n,
            Err(e) => {
                self.push(Entry::Dir { name, meta, unreadable: Some(e.to_string()), partial: false })?;
                self.push(Entry::End)?;
                return Ok(None);
            }
        };
        self.push(Entry::Dir { name, meta, unreadable: None, partial })?;
        Ok(Some(Level { dir: child, st, names, dev }))
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
pub(super) struct Stopped;

pub(super) fn entry_size(e: &Entry) -> usize {
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

pub(super) fn skip_reason(e: &io::Error) -> SkipReason {
    match e.raw_os_error() {
        Some(libc_errno::ENOENT | libc_errno::ENOTDIR | libc_errno::ELOOP) => SkipReason::Vanished,
        _ => SkipReason::Unreadable(e.to_string()),
    }
}
