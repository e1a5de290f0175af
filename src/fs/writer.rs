//! The one door to the destination disk: every entry is created under a
//! temporary name in its final directory, gets all its metadata there, and
//! only then is renamed to its real name. A reader — or the next run after a
//! `kill -9` — sees either the old entry or the complete new one, never a
//! half-written file under a real name. Temporary entries are removed on drop;
//! those a crash leaves behind are removed by the next run, which deletes
//! every name its source did not list.
//!
//! The one exception is the file a snapshot's fetch writes: its temporary
//! name is derived from the entry ([`partial_name`]) and it stays when
//! dropped, so that what an interrupted run received is still there for the
//! next one to resume from (`sink::receive`). It is never renamed into place
//! before the whole file checks out, and the next run removes it like any
//! leftover once it no longer needs it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, SeekFrom};

use crate::fs::meta::SpecialKind;
use crate::fs::meta::{self, ApplyProblem, Meta, Privileges, Target};
use crate::fs::safefs::{Dir, libc_errno, temp_name};

/// An entry being created under a temporary name.
pub struct TempEntry {
    dir: Dir,
    name: Vec<u8>,
    /// Open for regular files; `None` for symlinks and special files.
    file: Option<File>,
    kind: FileType,
    done: bool,
    /// Left in place when dropped: partial data to resume from.
    keep: bool,
}

impl TempEntry {
    /// Creates an empty regular file, mode 0600 until its metadata is set.
    pub fn file(dir: &Dir) -> io::Result<TempEntry> {
        retry_on_collision(|name| {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )?;
            Ok(TempEntry {
                dir: dir.clone(),
                name: name.to_vec(),
                file: Some(File::from(fd)),
                kind: FileType::RegularFile,
                done: false,
                keep: false,
            })
        })
    }

    /// Creates an empty regular file named `name` (a [`partial_name`]),
    /// replacing a leftover of that name, and kept when dropped (see the
    /// module doc): [`discard`](Self::discard) removes it. `None` if the name
    /// is taken by something that is not a file (say, a directory the
    /// source lists under that name).
    pub fn resumable(dir: &Dir, name: &[u8]) -> io::Result<Option<TempEntry>> {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let fd = match rustix::fs::openat(
            dir,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::EXIST) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(TempEntry {
            dir: dir.clone(),
            name: name.to_vec(),
            file: Some(File::from(fd)),
            kind: FileType::RegularFile,
            done: false,
            keep: true,
        }))
    }

    /// The partial file `name` an interrupted fetch left in `dir`, and how
    /// many bytes it holds — if it is one: a regular file with one link, so
    /// that writing to it can never change another snapshot (docs/design.md rule 1).
    pub fn open_partial(dir: &Dir, name: &[u8]) -> io::Result<Option<(TempEntry, u64)>> {
        let fd = match rustix::fs::openat(
            dir,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::ISDIR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
            return Ok(None);
        }
        let entry = TempEntry {
            dir: dir.clone(),
            name: name.to_vec(),
            file: Some(File::from(fd)),
            kind: FileType::RegularFile,
            done: false,
            keep: true,
        };
        Ok(Some((entry, st.st_size as u64)))
    }

    /// Removes the entry (one that would be kept when dropped, too).
    pub fn discard(mut self) {
        self.keep = false;
    }

    /// Creates a symlink to `target` (raw bytes, never interpreted).
    pub fn symlink(dir: &Dir, target: &[u8]) -> io::Result<TempEntry> {
        retry_on_collision(|name| {
            rustix::fs::symlinkat(target, dir, name)?;
            Ok(TempEntry {
                dir: dir.clone(),
                name: name.to_vec(),
                file: None,
                kind: FileType::Symlink,
                done: false,
                keep: false,
            })
        })
    }

    /// Creates a FIFO or device node.
    pub fn special(dir: &Dir, kind: SpecialKind, rdev: u64) -> io::Result<TempEntry> {
        let file_type = match kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        retry_on_collision(|name| {
            rustix::fs::mknodat(dir, name, file_type, Mode::from_raw_mode(0o600), rdev)?;
            Ok(TempEntry {
                dir: dir.clone(),
                name: name.to_vec(),
                file: None,
                kind: file_type,
                done: false,
                keep: false,
            })
        })
    }

    /// The open file (regular files only).
    pub fn file_mut(&mut self) -> &mut File {
        self.file.as_mut().expect("a regular temporary file")
    }

    /// The open file, to read (regular files only).
    pub fn file_ref(&self) -> &File {
        self.file.as_ref().expect("a regular temporary file")
    }

    /// The temporary name, for links made to it before it is committed.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Applies `meta`, then renames the entry to `final_name`, replacing what
    /// is there (the caller has removed a directory of that name first).
    pub fn commit(mut self, final_name: &[u8], meta: &Meta, privs: Privileges) -> io::Result<Vec<ApplyProblem>> {
        let problems = match &self.file {
            Some(f) => meta::apply_new(f, meta, privs)?,
            // In a live directory (a restore) others may write, and may swap
            // the temporary entry for a symlink: pinned, it is never followed.
            None => meta::apply(&Target::Pinned(&self.dir.pin(&self.name, self.kind)?), meta, privs)?,
        };
        self.dir.rename(&self.name, final_name)?;
        self.done = true;
        Ok(problems)
    }
}

impl Drop for TempEntry {
    fn drop(&mut self) {
        if !self.done && !self.keep {
            let _ = rustix::fs::unlinkat(&self.dir, self.name.as_slice(), AtFlags::empty());
        }
    }
}

fn retry_on_collision(mut make: impl FnMut(&[u8]) -> io::Result<TempEntry>) -> io::Result<TempEntry> {
    let mut tries = 0;
    loop {
        match make(&temp_name()) {
            Err(e) if e.raw_os_error() == Some(libc_errno::EEXIST) && tries < 8 => tries += 1,
            other => return other,
        }
    }
}

/// The temporary name of the partial data of `name` (an entry of `size`
/// bytes and this mtime) in its directory: `.rbk~`, 16 hex digits of a
/// digest of the four, and `.part` — of another length than the names of
/// [`temp_name`], so the two never meet. A file that changed at the source
/// gets another name, and its stale partial is removed as a leftover.
pub fn partial_name(name: &[u8], size: u64, mtime: i64, mtime_nsec: u32) -> Vec<u8> {
    let mut h = blake3::Hasher::new_derive_key("rbackup partial file name v1");
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name);
    h.update(&size.to_le_bytes());
    h.update(&mtime.to_le_bytes());
    h.update(&mtime_nsec.to_le_bytes());
    let d = h.finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&d.as_bytes()[..8]);
    format!(".rbk~{:016x}.part", u64::from_le_bytes(n)).into_bytes()
}

/// Replaces the small file `name` in `dir` with `contents` atomically: a
/// reader sees the old or the new file, never a part (bookkeeping files).
pub fn replace_file(dir: &Dir, name: &[u8], contents: &[u8], mode: u32) -> io::Result<()> {
    let mut temp = TempEntry::file(dir)?;
    let file = temp.file_mut();
    std::io::Write::write_all(file, contents)?;
    rustix::fs::fchmod(&*file, Mode::from_raw_mode(mode))?;
    file.sync_all()?;
    dir.rename(&temp.name, name)?;
    temp.done = true;
    Ok(())
}

/// Result of trying to hardlink.
pub enum Linked {
    Done,
    /// The inode has as many links as the filesystem allows (`EMLINK`).
    TooManyLinks,
}

/// Hardlinks `src_name` in `src_dir` as `dst_name` in `dst_dir`, replacing an
/// existing non-directory `dst_name` atomically when `replace` is set. Never
/// follows a symlink: a symlink would be linked as itself.
pub fn link(src_dir: &Dir, src_name: &[u8], dst_dir: &Dir, dst_name: &[u8], replace: bool) -> io::Result<Linked> {
    let target: Vec<u8> = if replace { temp_name() } else { dst_name.to_vec() };
    match rustix::fs::linkat(src_dir, src_name, dst_dir, target.as_slice(), AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::MLINK) => return Ok(Linked::TooManyLinks),
        Err(e) => return Err(e.into()),
    }
    if replace && let Err(e) = dst_dir.rename(&target, dst_name) {
        let _ = dst_dir.unlink(&target);
        return Err(e);
    }
    if replace {
        // rename(2) does nothing when both names are already the same inode.
        let _ = rustix::fs::unlinkat(dst_dir, target.as_slice(), AtFlags::empty());
    }
    Ok(Linked::Done)
}

/// Copies `size` bytes of `src` into the empty `dst`: a reflink where the
/// filesystem shares extents, else a copy that keeps holes as holes.
pub fn copy_contents(src: &File, dst: &File, size: u64) -> io::Result<()> {
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut offset = 0u64;
    while offset < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(size);
        copy_range(src, dst, data, hole)?;
        offset = hole;
    }
    // Only for a trailing hole: a truncate to the same size is a journaled
    // inode update, and on ext4 it makes an empty file's close flush.
    if offset < size { dst.set_len(size) } else { Ok(()) }
}

fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let mut off_in = pos;
        let mut off_out = pos;
        let want = (end - pos).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while copied"));
            }
            Ok(n) => pos += n as u64,
            Err(rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::INVAL) => {
                return copy_range_by_read(src, dst, pos, end);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_by_read(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while copied"));
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes a snapshot's data back to disk while the run goes on, so that the
/// `syncfs` before the final rename (which makes the snapshot durable) has
/// little left to wait for: the disk works while the network does.
pub struct Flusher {
    tx: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Bytes written when the last flush was asked for.
    asked_at: u64,
}

/// Written bytes between two background flushes.
const FLUSH_EVERY: u64 = 32 << 20;

impl Flusher {
    /// Flushes the filesystem of `dir` in the background.
    pub fn new(dir: Dir) -> Flusher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("rbackup-flush".into())
            .spawn(move || {
                for () in rx {
                    // An error here shows again at the final syncfs, which
                    // fails the run.
                    let _ = rustix::fs::syncfs(&dir);
                }
            })
            .ok();
        Flusher { tx: thread.as_ref().map(|_| tx), thread, asked_at: 0 }
    }

    /// `written` bytes have been written so far in this run.
    pub fn wrote(&mut self, written: u64) {
        if written >= self.asked_at + FLUSH_EVERY
            && let Some(tx) = &self.tx
        {
            self.asked_at = written;
            // Busy flushing already: this data goes with the next one.
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_partial_file_survives_its_drop_and_is_never_a_shared_inode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let name = partial_name(b"big.bin", 1 << 30, 1_700_000_000, 5);
        assert!(name.starts_with(b".rbk~") && name.len() != temp_name().len());
        assert_ne!(name, partial_name(b"big.bin", 1 << 30, 1_700_000_000, 6), "another mtime, another name");
        let mut t = TempEntry::resumable(&dir, &name).unwrap().unwrap();
        t.file_mut().write_all_at(b"received", 0).unwrap();
        drop(t);
        let (t, len) = TempEntry::open_partial(&dir, &name).unwrap().expect("kept when dropped");
        assert_eq!(len, 8);
        t.discard();
        assert!(dir.try_stat(&name).unwrap().is_none(), "discard removes it");
        // A second link (say, into an older snapshot) is never written to.
        std::fs::write(tmp.path().join("other"), b"shared").unwrap();
        std::fs::hard_link(tmp.path().join("other"), tmp.path().join(OsStr::from_bytes(&name))).unwrap();
        assert!(TempEntry::open_partial(&dir, &name).unwrap().is_none());
        // Creating one replaces a leftover file, not a directory.
        let t = TempEntry::resumable(&dir, &name).unwrap().unwrap();
        assert_eq!(std::fs::read(tmp.path().join("other")).unwrap(), b"shared");
        t.discard();
        std::fs::create_dir(tmp.path().join(OsStr::from_bytes(&name))).unwrap();
        assert!(TempEntry::resumable(&dir, &name).unwrap().is_none());
        assert!(TempEntry::open_partial(&dir, &name).unwrap().is_none());
    }

    #[test]
    fn the_flusher_asks_once_per_step_and_stops_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = Flusher::new(Dir::open_path(tmp.path()).unwrap());
        assert!(f.tx.is_some(), "the flush thread started");
        f.wrote(FLUSH_EVERY - 1);
        assert_eq!(f.asked_at, 0);
        f.wrote(FLUSH_EVERY);
        assert_eq!(f.asked_at, FLUSH_EVERY);
        f.wrote(FLUSH_EVERY + 10);
        assert_eq!(f.asked_at, FLUSH_EVERY, "not again before another step");
        f.wrote(3 * FLUSH_EVERY);
        assert_eq!(f.asked_at, 3 * FLUSH_EVERY);
        // Dropping waits for a flush in progress and ends the thread.
        drop(f);
    }
}
