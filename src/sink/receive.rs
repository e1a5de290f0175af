//! Receiving one file's data: whole files as data extents (holes stay holes),
//! or a delta rebuilt against a basis window by window and then checked
//! against the source's BLAKE3 — MD4 block matches are weak, so a mismatch
//! means the file is fetched again whole (DESIGN, "Performance shape").
//!
//! Everything about the data is checked against what was asked for: the
//! file in progress, offsets only moving forward and staying inside the size
//! the source announced, delta output bounded.

use std::io::Read;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};

use super::{Group, Pending, Sink, violation};
use crate::plan::{Policy, signature_block_size};
use crate::protocol::msg::{ReadError, ReadStatus};
use crate::report::ProblemKind;
use crate::safefs::{Dir, Shown};
use crate::sys::Mapped;
use crate::writer::{self, Linked, TempEntry};

/// A restore reads its basis (a live file) into memory rather than mapping
/// it; above this size a changed file is sent whole.
const RESTORE_BASIS_MAX: u64 = 256 << 20;

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
    if !md.is_file() || md.len() == 0 || signature_block_size(md.len()).is_none() {
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
    temp: TempEntry,
    hasher: blake3::Hasher,
    /// Where the next data may start; everything before is written or a hole.
    next: u64,
    /// Size announced by the source when it opened the file.
    size: u64,
    /// Set for a delta transfer.
    base: Option<BaseData>,
    /// A delta window failed to apply: fetch again whole at the end.
    bad_delta: bool,
    buf: Vec<u8>,
}

static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn hash_zeros(hasher: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

impl Sink<'_> {
    pub(super) fn on_begin(&mut self, id: u64, size: u64) -> Result<()> {
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
        let mut pending = self.pending.pop_front().expect("checked above");
        self.sig_outstanding -= pending.sig_len;
        let dest = self.dest_of(pending.dir)?.expect("fetches only happen outside dry runs");
        let rel = self.path_of(pending.dir, &pending.name);
        let temp = TempEntry::file(&dest).with_context(|| format!("creating a file for {}", Shown(&rel)))?;
        let base = match pending.basis.take() {
            None => None,
            Some(Basis::Mapped(m)) => Some(BaseData::Mapped(m)),
            // A basis that went away now just fails the hash check.
            Some(Basis::Reread { dir, name }) => Some(BaseData::Memory(read_limited(&dir, &name).unwrap_or_default())),
        };
        self.receiving = Some(Receiving {
            pending,
            temp,
            hasher: blake3::Hasher::new(),
            next: 0,
            size,
            base,
            bad_delta: false,
            buf: Vec::new(),
        });
        Ok(())
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
        r.temp.file_mut().write_all_at(data, offset).context("writing received data")?;
        hash_zeros(&mut r.hasher, offset - r.next);
        r.hasher.update(data);
        r.next = end;
        self.stats.bytes_fetched += data.len() as u64;
        self.stats.bytes_written += data.len() as u64;
        self.events.progress(&self.stats);
        Ok(())
    }

    pub(super) fn on_delta(&mut self, out_len: u32, delta: &[u8]) -> Result<()> {
        let r = self.receiving.as_mut().ok_or_else(|| violation("delta data outside a file"))?;
        let Some(base) = &r.base else {
            return Err(violation("delta data for a file asked for whole"));
        };
        if out_len > DELTA_OUT_MAX || r.next + u64::from(out_len) > r.size {
            return Err(violation(format!("delta window of {out_len} bytes beyond the file's {} bytes", r.size)));
        }
        if r.bad_delta {
            return Ok(());
        }
        r.buf.clear();
        let applied = fast_rsync::apply_limited(base.bytes(), delta, &mut r.buf, out_len as usize);
        if applied.is_err() || r.buf.len() != out_len as usize {
            r.bad_delta = true;
            return Ok(());
        }
        r.temp.file_mut().write_all_at(&r.buf, r.next).context("writing received data")?;
        r.hasher.update(&r.buf);
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
        let Receiving { pending, mut temp, mut hasher, next, size, base, bad_delta, .. } = r;
        let rel = self.path_of(pending.dir, &pending.name);
        if next < size {
            // A trailing hole, or a file that shrank while read. (Otherwise
            // the new file already ends at `size`: it was empty, and every
            // write was below `next`.)
            hash_zeros(&mut hasher, size - next);
            temp.file_mut().set_len(size).with_context(|| format!("sizing {}", Shown(&rel)))?;
        }
        let delta = base.is_some();
        let content = *hasher.finalize().as_bytes();
        if delta && (bad_delta || hash != Some(content)) {
            // MD4 matched blocks that differ, or the delta was unusable:
            // fetch the file again, whole.
            drop(temp);
            self.stats.delta_retries += 1;
            return self.refetch_whole(pending);
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

    fn refetch_whole(&mut self, mut pending: Pending) -> Result<()> {
        pending.basis = None;
        self.send_fetch(pending)
    }

    /// After a fetched file is in place: link the rest of its hardlink
    /// group, and let its directory finish.
    fn file_written(&mut self, pending: &Pending, rel: &[u8], hash: [u8; 32]) -> Result<()> {
        if let Some(g) = pending.group
            && let Some(Group::Waiting { left, .. }) = self.groups.get(&g)
        {
            let left = *left;
            self.groups.insert(g, Group::Done { rel: rel.to_vec(), left, kept: false, hash: Some(hash) });
        }
        let dest = self.dest_of(pending.dir)?.expect("fetches only happen outside dry runs");
        for (wd, wname) in &pending.waiters {
            let wrel = self.path_of(*wd, wname);
            self.link_waiter(&dest, &pending.name, *wd, wname, &wrel, rel)?;
            self.node_mut(*wd).pending -= 1;
            self.maybe_finish_dir(*wd)?;
        }
        self.node_mut(pending.dir).pending -= 1;
        self.maybe_finish_dir(pending.dir)?;
        self.send_deferred()?;
        self.maybe_grant()
    }

    fn link_waiter(
        &mut self,
        src_dir: &Dir,
        src_name: &[u8],
        wd: usize,
        wname: &[u8],
        wrel: &[u8],
        rel: &[u8],
    ) -> Result<()> {
        let wdest = self.dest_of(wd)?.expect("fetches only happen outside dry runs");
        let existing = wdest.try_stat(wname)?;
        self.act(super::Action::Hardlink, wrel, existing.is_some());
        if existing.as_ref().is_some_and(|st| crate::safefs::file_type(st) == rustix::fs::FileType::Directory) {
            wdest.remove_all(wname)?;
        }
        match writer::link(src_dir, src_name, &wdest, wname, existing.is_some())
            .with_context(|| format!("hardlinking {} to {}", Shown(wrel), Shown(rel)))?
        {
            Linked::Done => Ok(()),
            Linked::TooManyLinks => {
                let src = src_dir.open_file(src_name)?;
                let st = src_dir.stat(src_name)?;
                let meta = crate::meta::from_stat(&st, crate::meta::read_xattrs(src_dir, src_name)?);
                self.copy_file_into(&wdest, &src, wname, wrel, &meta, st.st_size as u64)
            }
        }
    }

    pub(super) fn on_failed(&mut self, id: u64, error: &ReadError) -> Result<()> {
        let pending = match self.receiving.take() {
            Some(r) if r.pending.id == id => r.pending,
            Some(r) => {
                return Err(violation(format!("file {id} failed while file {} is in progress", r.pending.id)));
            }
            None => {
                if self.pending.front().map(|p| p.id) != Some(id) {
                    return Err(violation(format!("failure reported for file {id}, which was not due")));
                }
                self.pending.pop_front().expect("checked above")
            }
        };
        let rel = self.path_of(pending.dir, &pending.name);
        match error {
            ReadError::Vanished => self.problem(ProblemKind::Vanished, &rel, "disappeared before it could be read"),
            ReadError::Unreadable(e) => self.problem(ProblemKind::Unreadable, &rel, e.clone()),
            ReadError::Other(e) => self.problem(ProblemKind::Failed, &rel, e.clone()),
        }
        self.rec.drop_entry(pending.ticket, &rel);
        let Pending { dir, group, mut waiters, meta, size, ticket, .. } = pending;
        if waiters.is_empty() {
            if let Some(g) = group {
                self.groups.remove(&g);
            }
        } else {
            // Another name of the same inode may still be readable: it leads
            // the group now, and the others wait for it. Its directory already
            // counts it as pending.
            let (wd, wname) = waiters.remove(0);
            let lead =
                Pending { id: 0, ticket, dir: wd, name: wname, meta, size, basis: None, sig_len: 0, group, waiters };
            self.send_fetch(lead)?;
        }
        self.node_mut(dir).pending -= 1;
        self.maybe_finish_dir(dir)?;
        self.send_deferred()?;
        self.maybe_grant()
    }
}
