//! Receiving one file's data: whole files as data extents (holes stay holes),
//! or a delta rebuilt against a basis window by window and then checked
//! against the source's content digest — MD4 block matches are weak, so a
//! mismatch means the file is fetched again whole (docs/design.md, "Performance
//! shape").
//!
//! Everything about the data is checked against what was asked for: the
//! file in progress, offsets only moving forward and staying inside the size
//! the source announced, delta output bounded. No work is proportional to an
//! announced size, only to the data received (docs/design.md rule 2): the file is
//! sized when it begins (a hole, free), and the digest ([`crate::digest`])
//! costs nothing for holes. A size the destination filesystem can't hold is
//! known before any data arrives: that file is left out of the snapshot as a
//! per-file problem, its data read and dropped, and the run goes on.
//!
//! ## Resuming an interrupted fetch
//!
//! A snapshot's fetch writes to a temporary file named after the entry
//! ([`writer::partial_name`]: name, size and mtime) whose length is always
//! the data received so far, and which stays when the run is killed or its
//! connection drops. The next run that fetches the same file — `--continue`,
//! or a new backup that supersedes the interrupted one (its partial file is
//! then copied, reflinked where the filesystem can) — asks for the data from
//! that length on (`Fetch::offset`); the source reads and hashes the prefix
//! itself, so its digest still covers the whole file, and the sink hashes
//! the prefix it kept. A mismatch (the file changed with the same size and
//! mtime, or the disk flipped a bit) means the file is fetched again whole;
//! a partial file is never renamed into place unchecked. It is new data of
//! this snapshot, never a shared inode (one link, docs/design.md rule 1), and once of
//! no use it is removed with the other leftovers of its directory.
//!
//! Why resume from the prefix rather than send a delta against the partial
//! file: the prefix costs the sink one local read of it and the wire nothing
//! but the rest of the file; a delta would cost a signature over the partial
//! file, a rolling-checksum pass over the whole file at the source, and
//! bytes of matches on the wire — to learn what the prefix rule knows
//! already: the data received is the file's start. It also works for a
//! local source (which gets no deltas), and for sparse files, whose holes a
//! signature would read as data. A delta basis and a resume combine: the
//! delta windows start at the offset.

use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{Context, Result};

use super::{Pending, Sink, violation};
use crate::digest::ContentHasher;
use crate::fs::meta::Meta;
use crate::fs::safefs::{Dir, Shown};
use crate::fs::sys::Mapped;
use crate::fs::writer::{self, TempEntry};
use crate::plan::{Policy, signature_block_size};
use crate::report::ProblemKind;
use crate::wire::msg::ReadStatus;

/// A restore reads its basis (a live file) into memory rather than mapping
/// it; above this size a changed file is sent whole.
const RESTORE_BASIS_MAX: u64 = 256 << 20;

/// Largest file a snapshot stores (1 PiB, apparent size). A source may
/// announce any size and send only holes, for free: a file that claims more
/// is left out as a per-file problem (docs/design.md rule 2) rather than
/// stored as a hole no tool could read back in a lifetime.
const FILE_SIZE_MAX: u64 = 1 << 50;

/// Announced sizes from which a new file is sized before its data comes
/// (below it, every filesystem a snapshot can live on holds the file).
const SIZE_PROBE_FROM: u64 = 1 << 30;

/// Largest window a delta frame may rebuild.
const DELTA_OUT_MAX: u32 = 8 << 20;

/// The basis of a delta transfer, kept from the request to the data.
pub(super) enum Basis {
    /// A snapshot's file, mapped (it never changes).
    Mapped(Mapped),
    /// A live file, read again when the data arrives.
    Reread { dir: Dir, name: Vec<u8> },
}

enum BaseData {
    Mapped(Mapped),
    Memory(Vec<u8>),
}

impl BaseData {
    fn bytes(&self) -> &[u8] {
        match self {
            BaseData::Mapped(m) => m,
            BaseData::Memory(v) => v,
        }
    }
}

/// Opens what a delta for `name` will be computed against; `None` if there
/// is no usable basis, and the file is then fetched whole.
pub(super) fn open_basis(dir: &Dir, name: &[u8], policy: Policy) -> Option<Basis> {
    let file = dir.open_file(name).ok()?;
    let md = file.metadata().ok()?;
    // A sparse basis is not worth a delta, and its signature would read
    // every byte of its holes: work in proportion to a size a source once
    // announced, not to data it sent.
    if !md.is_file() || md.len() == 0 || signature_block_size(md.len()).is_none() || md.blocks() * 512 < md.len() {
        return None;
    }
    match policy {
        Policy::Snapshot => Mapped::new(&file).ok().map(Basis::Mapped),
        Policy::Restore => {
            (md.len() <= RESTORE_BASIS_MAX).then(|| Basis::Reread { dir: dir.clone(), name: name.to_vec() })
        }
    }
}

impl Basis {
    /// The rsync signature of the basis, computed when the request goes out.
    pub(super) fn signature(&self) -> Option<Vec<u8>> {
        match self {
            Basis::Mapped(map) => signature(map),
            Basis::Reread { dir, name } => signature(&read_limited(dir, name)?),
        }
    }
}

fn read_limited(dir: &Dir, name: &[u8]) -> Option<Vec<u8>> {
    let file = dir.open_file(name).ok()?;
    let mut data = Vec::new();
    file.take(RESTORE_BASIS_MAX).read_to_end(&mut data).ok()?;
    Some(data)
}

fn signature(data: &[u8]) -> Option<Vec<u8>> {
    let block_size = signature_block_size(data.len() as u64)?;
    let options = fast_rsync::SignatureOptions { block_size, crypto_hash_size: 8 };
    Some(fast_rsync::Signature::calculate(data, options).into_serialized())
}

/// The file whose data is arriving.
pub(super) struct Receiving {
    pub pending: Pending,
    /// `None` when the file is refused: its data is checked and dropped.
    pub temp: Option<TempEntry>,
    /// Why the file is left out of the snapshot.
    refused: Option<String>,
    hasher: ContentHasher,
    /// Where the next data may start; everything before is written or a hole.
    next: u64,
    /// Size announced by the source when it opened the file.
    size: u64,
    /// Set for a delta transfer.
    base: Option<BaseData>,
    /// A delta window failed to apply, or the prefix kept could not be read:
    /// fetch again whole at the end.
    bad_delta: bool,
    /// Bytes kept from an interrupted fetch (0: none).
    resumed: u64,
    buf: Vec<u8>,
}

/// Data an interrupted fetch left for a file: its first `len` bytes.
pub(super) struct Partial {
    temp: TempEntry,
    len: u64,
}

impl Partial {
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Removes it (no longer of use).
    pub(super) fn discard(self) {
        self.temp.discard();
    }
}

impl Sink<'_> {
    /// A file's data begins: from 0 (`FileBegin`), or after the partial data
    /// the request offered (`FileResume`, `resume` is its offset).
    pub(super) fn on_begin(&mut self, id: u64, size: u64, resume: Option<u64>) -> Result<()> {
        if self.receiving.is_some() {
            return Err(violation(format!("file {id} started while another file is in progress")));
        }
        let expected = self.pending.front().map(|p| p.id);
        if expected != Some(id) {
            return Err(violation(format!("data for file {id} where file {expected:?} was due")));
        }
        if size > i64::MAX as u64 {
            return Err(violation(format!("file size {size} out of range")));
        }
        let offered = self.pending.front().and_then(|p| p.partial.as_ref()).map(|p| p.len);
        if resume.is_some_and(|at| Some(at) != offered || at > size) {
            return Err(violation(format!(
                "file {id} resumed at {resume:?} where {offered:?} was offered, of {size} bytes"
            )));
        }
        let mut pending = self.pending.pop_front().expect("checked above");
        self.sig_outstanding -= pending.sig_len;
        let dest = self.dest_of(pending.dir)?.expect("fetches only happen outside dry runs");
        let rel = self.path_of(pending.dir, &pending.name);
        let from = resume.unwrap_or(0);
        let mut temp = match (pending.partial.take(), resume) {
            (Some(partial), Some(_)) => partial.temp,
            (partial, _) => {
                // The source could not resume: what it offered is of no use.
                if let Some(p) = partial {
                    p.discard();
                }
                self.fetch_temp(&dest, &pending).with_context(|| format!("creating a file for {}", Shown(&rel)))?
            }
        };
        // Sized to the announced size first: free (a hole), and a size this
        // filesystem can't hold shows before any data is written. Then cut
        // to the data kept, so that the file's length always says how much
        // of it was received (what a resumed run may keep). A new file of a
        // size any filesystem holds is left as created, empty: on ext4, cutting
        // a file to zero makes its close start writing its data back there
        // and then (`auto_da_alloc`), which cost a full snapshot a tenth of
        // its time.
        let sized = if size > FILE_SIZE_MAX {
            Err(std::io::Error::from(rustix::io::Errno::FBIG))
        } else if from == 0 && size < SIZE_PROBE_FROM {
            Ok(())
        } else {
            temp.file_mut().set_len(size).and_then(|()| temp.file_mut().set_len(from))
        };
        let (temp, refused) = match sized {
            Ok(()) => (Some(temp), None),
            Err(e)
                if matches!(
                    rustix::io::Errno::from_io_error(&e),
                    Some(rustix::io::Errno::FBIG | rustix::io::Errno::INVAL)
                ) =>
            {
                temp.discard();
                let why = if size > FILE_SIZE_MAX {
                    format!("its announced size, {size} bytes, is more than the 1 PiB a snapshot stores")
                } else {
                    format!("its size, {size} bytes, is more than the destination filesystem can hold ({e})")
                };
                (None, Some(why))
            }
            Err(e) => return Err(e).with_context(|| format!("sizing {}", Shown(&rel))),
        };
        let mut hasher = ContentHasher::new();
        let mut bad_prefix = false;
        if from > 0
            && let Some(t) = &temp
        {
            // The whole file is checked against the source's digest: the
            // prefix kept is hashed here (a local read of it).
            crate::debug!("{}: resuming after the {from} bytes an interrupted run received", Shown(&rel));
            bad_prefix = hasher.update_from_file(t.file_ref(), 0, from).is_err();
            self.stats.bytes_to_fetch = self.stats.bytes_to_fetch.saturating_sub(from);
        }
        let base = match pending.basis.take() {
            None => None,
            Some(Basis::Mapped(m)) => Some(BaseData::Mapped(m)),
            // A basis that went away now just fails the hash check.
            Some(Basis::Reread { dir, name }) => Some(BaseData::Memory(read_limited(&dir, &name).unwrap_or_default())),
        };
        self.receiving = Some(Receiving {
            pending,
            temp,
            refused,
            hasher,
            next: from,
            size,
            base,
            bad_delta: bad_prefix,
            resumed: from,
            buf: Vec::new(),
        });
        Ok(())
    }

    /// The temporary file a fetch writes to: in a snapshot, under the name
    /// an interrupted run would resume from ([`writer::partial_name`]).
    fn fetch_temp(&self, dest: &Dir, pending: &Pending) -> std::io::Result<TempEntry> {
        if self.cfg.policy == Policy::Snapshot {
            let name = writer::partial_name(&pending.name, pending.size, pending.meta.mtime, pending.meta.mtime_nsec);
            if let Some(temp) = TempEntry::resumable(dest, &name)? {
                return Ok(temp);
            }
        }
        TempEntry::file(dest)
    }

    /// The data an interrupted fetch of `name` (of `size` bytes, modified at
    /// `meta`'s mtime) left: in the destination (a resumed snapshot), or in
    /// a basis — an interrupted run this one supersedes — whose data is then
    /// copied (reflinked where the filesystem can) to a file of this
    /// snapshot's own. `None` when there is none worth resuming from.
    pub(super) fn find_partial(&mut self, d: usize, name: &[u8], size: u64, meta: &Meta) -> Option<Partial> {
        let pname = writer::partial_name(name, size, meta.mtime, meta.mtime_nsec);
        let dest = self.dest_of(d).ok()??;
        if self.node(d).existed {
            match TempEntry::open_partial(&dest, &pname) {
                Ok(Some((temp, len))) if len > 0 && len <= size => return Some(Partial { temp, len }),
                Ok(Some((temp, _))) => temp.discard(),
                Ok(None) => {}
                Err(e) => crate::debug!("{}: partial data not usable: {e}", Shown(name)),
            }
        }
        let src = self.base_dirs().into_iter().flatten().find_map(|b| {
            let f = b.open_file(&pname).ok()?;
            let md = f.metadata().ok()?;
            (md.is_file() && md.len() > 0 && md.len() <= size).then_some((f, md.len()))
        })?;
        let (src, len) = src;
        let copied = TempEntry::resumable(&dest, &pname).and_then(|temp| {
            let mut temp = temp.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::AlreadyExists))?;
            match writer::copy_contents(&src, temp.file_mut(), len) {
                Ok(()) => Ok(temp),
                Err(e) => {
                    temp.discard();
                    Err(e)
                }
            }
        });
        match copied {
            Ok(temp) => Some(Partial { temp, len }),
            Err(e) => {
                crate::debug!("{}: the partial data of the interrupted run could not be copied: {e}", Shown(name));
                None
            }
        }
    }

    /// The source reads the prefix of the resumed file in progress.
    pub(super) fn on_hashing(&mut self, id: u64, done: u64) -> Result<()> {
        match &self.receiving {
            Some(r) if r.pending.id == id && done < r.resumed && r.next == r.resumed => Ok(()),
            _ => Err(violation(format!("file {id} is not a resumed file whose prefix is being read ({done} bytes)"))),
        }
    }

    pub(super) fn on_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.receiving.as_mut().ok_or_else(|| violation("file data outside a file"))?;
        if r.base.is_some() {
            return Err(violation("whole-file data in a delta transfer"));
        }
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| violation("data offset overflows"))?;
        if offset < r.next || end > r.size {
            return Err(violation(format!(
                "data at {offset}..{end} is out of order or beyond the announced {} bytes",
                r.size
            )));
        }
        r.next = end;
        self.stats.bytes_fetched += data.len() as u64;
        let Some(temp) = r.temp.as_mut() else { return Ok(()) };
        if let Err(e) = temp.file_mut().write_all_at(data, offset) {
            let (dir, name) = (r.pending.dir, r.pending.name.clone());
            return Err(self.write_error(e, dir, &name));
        }
        r.hasher.update_at(offset, data);
        self.stats.bytes_written += data.len() as u64;
        self.events.progress(&self.stats);
        Ok(())
    }

    /// A write of received data failed: name the file (a full disk must say
    /// which file it stopped at), and say what to do about a full one.
    fn write_error(&self, e: std::io::Error, dir: usize, name: &[u8]) -> anyhow::Error {
        let path = self.path_of(dir, name);
        let what = format!("writing {}", Shown(&path));
        if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            anyhow::Error::new(e).context(format!(
                "{what}: the backups folder's filesystem is full; free space (e.g. `rbackup prune`), then \
                 `rbackup --continue` finishes the snapshot"
            ))
        } else {
            anyhow::Error::new(e).context(what)
        }
    }

    pub(super) fn on_delta(&mut self, out_len: u32, delta: &[u8]) -> Result<()> {
        let r = self.receiving.as_mut().ok_or_else(|| violation("delta data outside a file"))?;
        let Some(base) = &r.base else {
            return Err(violation("delta data for a file asked for whole"));
        };
        if out_len > DELTA_OUT_MAX || r.next + u64::from(out_len) > r.size {
            return Err(violation(format!("delta window of {out_len} bytes beyond the file's {} bytes", r.size)));
        }
        if r.bad_delta || r.temp.is_none() {
            return Ok(());
        }
        r.buf.clear();
        let applied = fast_rsync::apply_limited(base.bytes(), delta, &mut r.buf, out_len as usize);
        if applied.is_err() || r.buf.len() != out_len as usize {
            r.bad_delta = true;
            return Ok(());
        }
        let temp = r.temp.as_mut().expect("checked above");
        if let Err(e) = temp.file_mut().write_all_at(&r.buf, r.next) {
            let (dir, name) = (r.pending.dir, r.pending.name.clone());
            return Err(self.write_error(e, dir, &name));
        }
        r.hasher.update_at(r.next, &r.buf);
        r.next += u64::from(out_len);
        self.stats.bytes_fetched += u64::from(out_len);
        self.stats.bytes_written += u64::from(out_len);
        Ok(())
    }

    pub(super) fn on_end(&mut self, id: u64, status: &ReadStatus, hash: Option<[u8; 32]>) -> Result<()> {
        let r = self.receiving.take().ok_or_else(|| violation(format!("end of file {id} that was not started")))?;
        if r.pending.id != id {
            return Err(violation(format!("end of file {id} while file {} is in progress", r.pending.id)));
        }
        let Receiving { pending, temp, refused, hasher, size, base, bad_delta, resumed, .. } = r;
        let rel = self.path_of(pending.dir, &pending.name);
        let Some(mut temp) = temp else {
            let why = refused.unwrap_or_default();
            return self.give_up(pending, ProblemKind::Failed, format!("{why}: not in the snapshot"));
        };
        // A trailing hole, or the end of a file that shrank while read, costs
        // nothing. (Only then: a truncate to the same size is still a
        // journaled inode update, and on ext4 an empty file's close flushes.)
        let len = temp.file_mut().metadata().with_context(|| format!("sizing {}", Shown(&rel)))?.len();
        if len != size {
            temp.file_mut().set_len(size).with_context(|| format!("sizing {}", Shown(&rel)))?;
        }
        let delta = base.is_some();
        let content = hasher.finish(size);
        if (delta || resumed > 0) && (bad_delta || hash != Some(content)) {
            // MD4 matched blocks that differ, the delta was unusable, or the
            // data kept from an interrupted run is not the start of this
            // file (it changed, or the disk did): fetch it again, whole.
            temp.discard();
            if delta {
                self.stats.delta_retries += 1;
            }
            if resumed > 0 {
                self.stats.resume_retries += 1;
            }
            return self.refetch_whole(pending);
        }
        if !delta && hash.is_some_and(|h| h != content) {
            // The source hashes exactly the bytes it sends.
            temp.discard();
            return Err(violation(format!(
                "the data received for {} does not match the digest the source sent",
                Shown(&rel)
            )));
        }
        if resumed > 0 {
            self.stats.resumed += 1;
            self.stats.bytes_resumed += resumed;
        }
        if *status == ReadStatus::Changed || size != pending.size {
            self.problem(ProblemKind::Changed, &rel, "stored as read; it is fetched again next run");
        }
        let problems = temp
            .commit(&pending.name, &pending.meta, self.cfg.privs)
            .with_context(|| format!("writing {}", Shown(&rel)))?;
        self.apply_problems(&rel, problems);
        if delta {
            self.stats.fetched_delta += 1;
        } else {
            self.stats.fetched_whole += 1;
        }
        self.events.progress(&self.stats);
        self.rec.resolve(pending.ticket, content, size);
        self.file_written(&pending, &rel, content)
    }
}
