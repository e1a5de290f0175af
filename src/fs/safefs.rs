//! Directory handles and name checks: the only way rbackup touches a tree.
//!
//! Every path is walked one directory handle at a time with `*at` calls, so that
//! no symlink is ever followed below a root, and paths longer than `PATH_MAX`
//! work. Where the kernel only offers a path-based call (extended attributes of
//! a symlink or FIFO), the path goes through `/proc/self/fd/N/NAME`, which names
//! the already-opened directory and so cannot be redirected — for reading,
//! with the `l*` calls that don't follow `NAME`. Metadata is never *applied*
//! by name: a symlink, FIFO or device node is first pinned by an `O_PATH`
//! descriptor checked for its type ([`Dir::pin`]), and every call goes
//! through that descriptor, so a symlink renamed over the name meanwhile is
//! never followed (docs/security.md, "Every call on a name acts on the entry
//! itself").
//!
//! Descriptors are bounded whatever the depth. A walk keeps handles for its
//! root and its deepest [`HELD_LEVELS`] levels only, and opens a level again
//! beneath the root when it climbs back to it, checking that it is the
//! directory it entered ([`Chain`]); a removal descends at most
//! [`REMOVE_DEPTH`] levels and first moves anything deeper up to the top of
//! the doomed tree ([`Dir::clear`]). Nothing deep costs quadratic time: one
//! path walk from the root serves [`HELD_LEVELS`] climbs, and a removal never
//! walks a long path at all.
//!
//! Names that come from a peer are checked by [`check_name`] before they reach
//! any syscall.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};

/// Longest single name Linux accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Why a name from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name is `.` or `..`")]
    Dots,
    #[error("name contains `/`")]
    Slash,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("name longer than {NAME_MAX} bytes")]
    TooLong,
}

/// Checks that `name` is one path component that can't climb or be split.
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dots);
    }
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    if name.contains(&b'/') {
        return Err(NameError::Slash);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    Ok(())
}

/// A relative path as raw bytes, printed with non-UTF-8 bytes and control
/// characters escaped. In messages a long path is cut in the middle: its
/// first and last [`SHOWN_KEEP`] bytes around `…(N bytes)…`, N the bytes
/// left out (a hostile server's 40 kB path must not flood a log or a mail).
/// The alternate form (`{:#}`) prints it whole, for listings whose lines are
/// the paths themselves.
pub struct Shown<'a>(pub &'a [u8]);

/// Bytes kept at each end of a long path in messages.
pub const SHOWN_KEEP: usize = 100;

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        // Cutting saves something only beyond the length of the marker.
        if f.alternate() || p.len() <= 2 * SHOWN_KEEP + 24 {
            return escaped(f, p);
        }
        // Cut between characters, never inside one.
        let continuation = |b: u8| b & 0xc0 == 0x80;
        let mut head = SHOWN_KEEP;
        while head > SHOWN_KEEP - 3 && continuation(p[head]) {
            head -= 1;
        }
        let mut tail = p.len() - SHOWN_KEEP;
        while tail < p.len() - SHOWN_KEEP + 3 && continuation(p[tail]) {
            tail += 1;
        }
        escaped(f, &p[..head])?;
        write!(f, "…({} bytes)…", tail - head)?;
        escaped(f, &p[tail..])
    }
}

fn escaped(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// Joins a relative directory path and a name with `/`.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    out.extend_from_slice(dir);
    if !dir.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

/// An open directory. Cheap to clone; closed when the last clone drops.
#[derive(Clone, Debug)]
pub struct Dir {
    fd: Arc<OwnedFd>,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl std::os::fd::AsRawFd for Dir {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Extended attributes of the directory itself, through its descriptor.
impl xattr::FileExt for Dir {}

const DIR_FLAGS: OFlags =
    OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC).union(OFlags::NOFOLLOW).union(OFlags::NOCTTY);

impl Dir {
    /// Opens a directory named by an administrator (a root given on the command
    /// line or in the config): symlinks in this path are the admin's choice.
    pub fn open_path(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(Dir { fd: Arc::new(fd) })
    }

    /// Opens the child directory `name`, refusing a symlink.
    pub fn open_dir(&self, name: &[u8]) -> io::Result<Dir> {
        let fd = rustix::fs::openat(self, name, DIR_FLAGS, Mode::empty())?;
        Ok(Dir { fd: Arc::new(fd) })
    }

    /// Opens the child directory `name` if it exists and is a directory.
    pub fn try_open_dir(&self, name: &[u8]) -> io::Result<Option<Dir>> {
        match self.open_dir(name) {
            Ok(d) => Ok(Some(d)),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc_errno::ENOENT | libc_errno::ENOTDIR | libc_errno::ELOOP)) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the child directory `name` (mode 0700 until its metadata is set)
    /// and opens it.
    pub fn create_dir(&self, name: &[u8]) -> io::Result<Dir> {
        rustix::fs::mkdirat(self, name, Mode::from_raw_mode(0o700))?;
        self.open_dir(name)
    }

    /// Opens the regular file `name` for reading, refusing symlinks, and without
    /// blocking on a FIFO that replaced it.
    pub fn open_file(&self, name: &[u8]) -> io::Result<std::fs::File> {
        let fd = rustix::fs::openat(
            self,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        Ok(std::fs::File::from(fd))
    }

    /// `lstat` of a child.
    pub fn stat(&self, name: &[u8]) -> io::Result<Stat> {
        Ok(rustix::fs::statat(self, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// `lstat` of a child, `None` if it does not exist.
    pub fn try_stat(&self, name: &[u8]) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(self, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `fstat` of this directory.
    pub fn stat_self(&self) -> io::Result<Stat> {
        Ok(rustix::fs::fstat(self)?)
    }

    /// Pins the entry `name` with an `O_PATH | O_NOFOLLOW` descriptor and
    /// checks, on that descriptor, that it is a `kind`. Metadata applied
    /// through the [`Pinned`] lands on this very inode, whatever is renamed
    /// over `name` meanwhile: a symlink swapped in is never followed.
    pub fn pin(&self, name: &[u8], kind: FileType) -> io::Result<Pinned> {
        let fd = rustix::fs::openat(self, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
        let found = file_type(&rustix::fs::fstat(&fd)?);
        if found != kind {
            return Err(io::Error::other(Swapped { found, wanted: kind }));
        }
        Ok(Pinned { fd, kind })
    }

    /// Reads the symlink `name` as raw bytes.
    pub fn read_link(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let target = rustix::fs::readlinkat(self, name, Vec::new())?;
        Ok(target.into_bytes())
    }

    /// A path naming `name` in this directory through procfs, for the few calls
    /// that only take paths. It stays short whatever the depth of the tree.
    pub fn proc_path(&self, name: &[u8]) -> PathBuf {
        use std::os::fd::AsRawFd;
        let mut p = format!("/proc/self/fd/{}/", self.fd.as_raw_fd()).into_bytes();
        p.extend_from_slice(name);
        PathBuf::from(OsStr::from_bytes(&p))
    }

    /// Names in this directory, without `.` and `..`, sorted bytewise.
    pub fn names(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        // A dup shares the file position with our handle: start from the top,
        // whoever read this directory before.
        let dup = rustix::io::dup(self)?;
        let mut dir = rustix::fs::Dir::new(dup)?;
        dir.rewind();
        for entry in dir {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(name.to_vec());
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Renames `from` to `to` within this directory, replacing `to`.
    pub fn rename(&self, from: &[u8], to: &[u8]) -> io::Result<()> {
        rustix::fs::renameat(self, from, self, to)?;
        Ok(())
    }

    /// Renames `from` to `to` within this directory, failing if `to` exists.
    pub fn rename_noreplace(&self, from: &[u8], to_dir: &Dir, to: &[u8]) -> io::Result<()> {
        rustix::fs::renameat_with(self, from, to_dir, to, rustix::fs::RenameFlags::NOREPLACE)?;
        Ok(())
    }

    /// Removes the non-directory `name`.
    pub fn unlink(&self, name: &[u8]) -> io::Result<()> {
        rustix::fs::unlinkat(self, name, AtFlags::empty())?;
        Ok(())
    }

    /// Removes `name` whatever it is; a directory with everything beneath it.
    /// Nothing is followed: a symlink is removed, never entered.
    pub fn remove_all(&self, name: &[u8]) -> io::Result<()> {
        match rustix::fs::unlinkat(self, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) => {}
            Err(e) => return Err(e.into()),
        }
        let child = match self.open_dir(name) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        child.clear()?;
        drop(child);
        match rustix::fs::unlinkat(self, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes everything in this directory, depth first, iteratively and
    /// with a bounded number of descriptors and bounded work per entry,
    /// however deep the tree: it descends at most [`REMOVE_DEPTH`] levels
    /// (a handle each); a directory found deeper is renamed into this one
    /// under a temporary name (everything in here is going anyway) and
    /// cleared from there. So each entry is unlinked once, and each
    /// directory opened twice and renamed at most once.
    pub fn clear(&self) -> io::Result<()> {
        let mut stack: Vec<(Dir, Vec<Vec<u8>>)> = vec![(self.clone(), self.names()?)];
        while let Some((dir, mut names)) = stack.pop() {
            let Some(name) = names.pop() else {
                continue;
            };
            match rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => stack.push((dir, names)),
                Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) => {
                    let child = dir.open_dir(&name)?;
                    let child_names = child.names()?;
                    if child_names.is_empty() {
                        drop(child);
                        rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::REMOVEDIR)?;
                        stack.push((dir, names));
                    } else if stack.len() + 1 < REMOVE_DEPTH {
                        // Revisit this name once its contents are gone.
                        names.push(name);
                        stack.push((dir, names));
                        stack.push((child, child_names));
                    } else {
                        // Too deep: up to the top, to be cleared from there.
                        drop(child);
                        let temp = temp_name();
                        rustix::fs::renameat_with(
                            &dir,
                            name.as_slice(),
                            self,
                            temp.as_slice(),
                            RenameFlags::NOREPLACE,
                        )?;
                        stack.push((dir, names));
                        stack[0].1.push(temp);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Opens `rel` (a `/`-separated relative path) beneath this directory
    /// without following any symlink and without leaving it, in steps short
    /// enough for `PATH_MAX`. `last` are the open flags for the final component.
    pub fn resolve(&self, rel: &[u8], last: OFlags) -> io::Result<OwnedFd> {
        let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let mut rest = rel;
        let mut current: Option<OwnedFd> = None;
        loop {
            // Cut the path into pieces that each fit in PATH_MAX, at a `/`.
            let (piece, tail, is_last) = if rest.len() < 4000 {
                (rest, &rest[rest.len()..], true)
            } else {
                let cut = rest[..4000]
                    .iter()
                    .rposition(|&b| b == b'/')
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path component too long"))?;
                (&rest[..cut], &rest[cut + 1..], false)
            };
            let flags = if is_last { last } else { DIR_FLAGS };
            let piece = if piece.is_empty() { &b"."[..] } else { piece };
            let fd = match &current {
                None => rustix::fs::openat2(self, piece, flags | OFlags::CLOEXEC, Mode::empty(), resolve)?,
                Some(dir) => rustix::fs::openat2(dir, piece, flags | OFlags::CLOEXEC, Mode::empty(), resolve)?,
            };
            if is_last {
                return Ok(fd);
            }
            current = Some(fd);
            rest = tail;
        }
    }

    /// Opens the directory `rel` beneath this one (see [`Dir::resolve`]).
    pub fn resolve_dir(&self, rel: &[u8]) -> io::Result<Dir> {
        let fd = self.resolve(rel, DIR_FLAGS)?;
        Ok(Dir { fd: Arc::new(fd) })
    }

    /// Flushes the whole filesystem this directory lives on.
    pub fn syncfs(&self) -> io::Result<()> {
        rustix::fs::syncfs(self)?;
        Ok(())
    }

    /// `fsync` of this directory (its entries).
    pub fn fsync(&self) -> io::Result<()> {
        rustix::fs::fsync(self)?;
        Ok(())
    }
}

/// Most levels below its root for which a [`Chain`] keeps a descriptor.
pub const HELD_LEVELS: usize = 16;

/// Deepest level a removal works at in place (see [`Dir::clear`]).
pub const REMOVE_DEPTH: usize = 16;

/// Where a depth-first walk is: the directories from a root down to the
/// current one, with a descriptor for the root and for the deepest
/// [`HELD_LEVELS`] levels only, so that a walk holds a bounded number of
/// descriptors however deep the tree (a hostile server can make it as deep
/// as it likes; `RLIMIT_NOFILE` is often 1024).
///
/// A level keeps its name and the identity (`st_dev`, `st_ino`) of the
/// directory entered. When the walk climbs back to a level whose descriptor
/// was let go, that level and the ones just above it (up to
/// [`HELD_LEVELS`] of them) are opened again: the shallowest by its path
/// from the root through [`Dir::resolve_dir`] (`RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS`, so it can't leave the root or follow a symlink),
/// the others by name from the one above, and each must be the directory
/// first entered, else the walk fails with [`Moved`]. Descriptors are let
/// go shallowest first, so the held levels are always the deepest ones, and
/// one path walk serves [`HELD_LEVELS`] climbs: climbing out of a chain `D`
/// deep costs about `D² / (2 × HELD_LEVELS)` name lookups in the kernel (a
/// few million for 20,000 levels), and nothing for trees less deep than
/// [`HELD_LEVELS`].
///
/// Levels below a directory that doesn't exist (a basis without it, a dry
/// run's directory not yet created) are absent: [`Chain::top`] is `None`.
pub struct Chain {
    root: Option<Dir>,
    levels: Vec<Level>,
    /// Absent levels below the last present one.
    absent: usize,
}

struct Level {
    name: Vec<u8>,
    id: (u64, u64),
    dir: Option<Dir>,
}

/// A directory a [`Chain`] opened again is not the one it entered: it was
/// moved or replaced during the run.
#[derive(Debug, thiserror::Error)]
#[error("directory {path} was moved or replaced during the run")]
pub struct Moved {
    pub path: String,
}

impl Chain {
    /// A walk standing at `root`.
    pub fn new(root: Dir) -> Chain {
        Chain { root: Some(root), levels: Vec::new(), absent: 0 }
    }

    /// A walk of a tree that doesn't exist: every level is absent.
    pub fn absent() -> Chain {
        Chain { root: None, levels: Vec::new(), absent: 0 }
    }

    /// Levels below the root.
    pub fn depth(&self) -> usize {
        self.levels.len() + self.absent
    }

    /// Enters `dir`, the directory `name` in the current one (the caller
    /// opened it from [`Chain::top`]); `st` is its `fstat`.
    pub fn push(&mut self, name: &[u8], dir: Dir, st: &Stat) {
        debug_assert!(self.absent == 0 && self.root.is_some(), "a present level below an absent one");
        self.levels.push(Level { name: name.to_vec(), id: (st.st_dev, st.st_ino), dir: Some(dir) });
        if let Some(i) = self.levels.len().checked_sub(HELD_LEVELS + 1) {
            self.levels[i].dir = None;
        }
    }

    /// Enters the directory `name` of the current one if there is one (not
    /// a symlink or anything else), else an absent level: for trees only
    /// read to compare with (bases), where an unreadable directory is as
    /// good as a missing one.
    pub fn enter_if_dir(&mut self, name: &[u8]) {
        let found = self.top().ok().flatten().and_then(|d| d.try_open_dir(name).ok().flatten());
        match found.and_then(|d| d.stat_self().ok().map(|st| (d, st))) {
            Some((d, st)) => self.push(name, d, &st),
            None => self.push_absent(),
        }
    }

    /// Enters a level that doesn't exist.
    pub fn push_absent(&mut self) {
        self.absent += 1;
    }

    /// Climbs back to the level above.
    pub fn pop(&mut self) {
        if self.absent > 0 {
            self.absent -= 1;
        } else {
            self.levels.pop();
        }
    }

    /// The current directory, opened again if its descriptor was let go;
    /// `None` if it is absent.
    pub fn top(&mut self) -> io::Result<Option<Dir>> {
        if self.absent > 0 {
            return Ok(None);
        }
        match self.levels.last() {
            None => Ok(self.root.clone()),
            Some(Level { dir: Some(d), .. }) => Ok(Some(d.clone())),
            Some(_) => self.reopen().map(Some),
        }
    }

    /// The directory `depth` levels below the root, if it has a descriptor
    /// (never opens anything).
    pub fn held(&self, depth: usize) -> Option<Dir> {
        match depth.checked_sub(1) {
            None => self.root.clone(),
            Some(i) => self.levels.get(i).and_then(|l| l.dir.clone()),
        }
    }

    /// Opens the deepest [`HELD_LEVELS`] levels again (none of them has a
    /// descriptor: descriptors are let go shallowest first).
    fn reopen(&mut self) -> io::Result<Dir> {
        let root = self.root.clone().expect("present levels have a root");
        let from = self.levels.len().saturating_sub(HELD_LEVELS);
        let mut path = Vec::new();
        for l in &self.levels[..=from] {
            path = join(&path, &l.name);
        }
        let moved = |path: &[u8]| io::Error::other(Moved { path: Shown(path).to_string() });
        let at = |path: &[u8], e: io::Error| io::Error::new(e.kind(), format!("opening {} again: {e}", Shown(path)));
        let mut dir = root.resolve_dir(&path).map_err(|e| at(&path, e))?;
        for i in from..self.levels.len() {
            if i > from {
                path = join(&path, &self.levels[i].name);
                dir = dir.open_dir(&self.levels[i].name).map_err(|e| at(&path, e))?;
            }
            let st = dir.stat_self()?;
            if (st.st_dev, st.st_ino) != self.levels[i].id {
                return Err(moved(&path));
            }
            self.levels[i].dir = Some(dir.clone());
        }
        Ok(dir)
    }
}

/// An entry held by an `O_PATH` descriptor (see [`Dir::pin`]). Such a
/// descriptor can't be read, written, `fchmod`ed or `fchown`ed; the calls go
/// through `AT_EMPTY_PATH` or through `/proc/self/fd/N`, a magic link that
/// resolves to the pinned inode itself (a pinned symlink is not followed).
#[derive(Debug)]
pub struct Pinned {
    fd: OwnedFd,
    kind: FileType,
}

impl AsFd for Pinned {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Pinned {
    /// What it was checked to be.
    pub fn kind(&self) -> FileType {
        self.kind
    }

    /// `/proc/self/fd/N`: for the path-only calls (chmod, utimensat, xattrs),
    /// which must *follow* it to reach the entry.
    pub fn proc_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// A pinned entry turned out to be of another type than expected: it was
/// replaced since it was looked at.
#[derive(Debug, thiserror::Error)]
#[error("it was replaced while being worked on (it is now a {found:?}, not a {wanted:?}); left alone")]
pub struct Swapped {
    pub found: FileType,
    pub wanted: FileType,
}

impl Swapped {
    /// Whether `e` is a [`Swapped`] error of [`Dir::pin`].
    pub fn is(e: &io::Error) -> bool {
        matches!(e.get_ref(), Some(inner) if inner.is::<Swapped>())
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// (capped at 65,536: children inherit the limit, and some programs loop over
/// every possible descriptor). rbackup holds a bounded number of directory
/// handles whatever the depth (see [`Chain`]), but a soft limit of 1024 —
/// sshd's and many services' default — leaves little room around them. Best
/// effort: a sandbox may forbid `setrlimit` (the systemd unit sets
/// `LimitNOFILE=` instead).
pub fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(maximum)) = (limit.current, limit.maximum) else { return };
    let wanted = maximum.min(1 << 16);
    if current < wanted {
        let _ = setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(wanted), maximum: Some(maximum) });
    }
}

/// The few errno values this crate matches on, as raw numbers for
/// `io::Error::raw_os_error`.
pub mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EMLINK: i32 = 31;
    pub const ELOOP: i32 = 40;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
    pub const EXDEV: i32 = 18;
    pub const EPERM: i32 = 1;
    pub const ENOSPC: i32 = 28;
}

/// The type of a stat result.
pub fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Converts a `CStr` name from the kernel into bytes.
pub fn cstr_bytes(name: &CStr) -> &[u8] {
    name.to_bytes()
}

/// Creates a name for a temporary file that no source name will match by
/// accident: `.rbk~` and 16 hex digits, a random start drawn once per process
/// plus a counter. (Callers create it with `O_EXCL` and retry on collision.)
pub fn temp_name() -> Vec<u8> {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // getrandom only fails before the kernel's pool is ready at early
        // boot; time and pid still make collisions negligible.
        if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            bytes = (t ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
        }
        u64::from_le_bytes(bytes)
    });
    let n = start.wrapping_add(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!(".rbk~{n:016x}").into_bytes()
}

/// Makes a `CString` of a name already checked by [`check_name`].
pub fn name_cstring(name: &[u8]) -> io::Result<CString> {
    cstr(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(check_name(b""), Err(NameError::Empty));
        assert_eq!(check_name(b"."), Err(NameError::Dots));
        assert_eq!(check_name(b".."), Err(NameError::Dots));
        assert_eq!(check_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(check_name(b"/"), Err(NameError::Slash));
        assert_eq!(check_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(check_name(&[b'x'; 256]), Err(NameError::TooLong));
        assert!(check_name(b"...").is_ok());
        assert!(check_name(b"\xff\xfe name\n").is_ok());
        assert!(check_name(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn shown_escapes_bytes_and_controls() {
        assert_eq!(Shown(b"a\xffb\nc").to_string(), "a\\xffb\\nc");
    }

    #[test]
    fn a_long_path_is_shown_cut_in_the_middle_and_whole_in_listings() {
        let path: Vec<u8> = b"a/".repeat(20_000);
        let short = Shown(&path).to_string();
        assert_eq!(short, format!("{}…({} bytes)…{}", "a/".repeat(50), 40_000 - 200, "a/".repeat(50)));
        assert_eq!(format!("{:#}", Shown(&path)).len(), 40_000);
        // Never cut inside a character.
        let path = "é".repeat(500);
        let short = Shown(path.as_bytes()).to_string();
        assert!(short.starts_with(&"é".repeat(50)) && short.ends_with(&"é".repeat(50)), "{short}");
        assert!(!short.contains("\\x"), "{short}");
        // Short paths are whole.
        assert_eq!(Shown(&[b'x'; 224]).to_string().len(), 224);
    }

    #[test]
    fn join_handles_root() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
    }

    #[test]
    fn resolve_never_follows_a_symlink_or_leaves_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/file"), b"in").unwrap();
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/file"), b"out").unwrap();
        let dir = Dir::open_path(&root).unwrap();
        let flags = OFlags::RDONLY;
        assert!(dir.resolve(b"dir/file", flags).is_ok());
        assert!(dir.resolve(b"../outside/file", flags).is_err());
        assert!(dir.resolve(b"/etc/passwd", flags).is_err());
        // A directory swapped for a symlink is not followed.
        std::fs::rename(root.join("dir"), root.join("old")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("dir")).unwrap();
        assert!(dir.resolve(b"dir/file", flags).is_err());
        assert!(dir.open_dir(b"dir").is_err());
        // A long path is resolved in pieces.
        let mut rel = Vec::new();
        let mut d = dir.clone();
        for i in 0..20 {
            let name = format!("{i:02}{}", "x".repeat(250));
            d = d.create_dir(name.as_bytes()).unwrap();
            rel = join(&rel, name.as_bytes());
        }
        assert!(rel.len() > 4096);
        assert!(dir.resolve_dir(&rel).is_ok());
    }

    /// A chain `depth` deep of directories `dNNN`, each holding a file.
    fn chain_of(root: &Dir, depth: usize) {
        let mut d = root.clone();
        for i in 0..depth {
            rustix::fs::openat(
                &d,
                "file",
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .unwrap();
            d = d.create_dir(format!("d{i:03}").as_bytes()).unwrap();
        }
    }

    fn held_levels(c: &Chain) -> usize {
        c.levels.iter().filter(|l| l.dir.is_some()).count()
    }

    #[test]
    fn a_chain_holds_few_descriptors_and_reopens_the_directories_it_entered() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        chain_of(&root, 100);
        let mut chain = Chain::new(root.clone());
        let mut ids = Vec::new();
        for i in 0..100 {
            let dir = chain.top().unwrap().unwrap().open_dir(format!("d{i:03}").as_bytes()).unwrap();
            let st = dir.stat_self().unwrap();
            ids.push((st.st_dev, st.st_ino));
            chain.push(format!("d{i:03}").as_bytes(), dir, &st);
            assert!(held_levels(&chain) <= HELD_LEVELS);
        }
        // Climbing back, every level is the directory entered there.
        for i in (0..100).rev() {
            let st = chain.top().unwrap().unwrap().stat_self().unwrap();
            assert_eq!((st.st_dev, st.st_ino), ids[i], "level {i}");
            assert!(held_levels(&chain) <= HELD_LEVELS);
            chain.pop();
        }
        assert_eq!(chain.depth(), 0);

        // A directory moved away while the walk was below it is not taken
        // for another one that now has its path.
        let mut chain = Chain::new(root.clone());
        let mut rel = Vec::new();
        for i in 0..40 {
            let name = format!("d{i:03}");
            let dir = chain.top().unwrap().unwrap().open_dir(name.as_bytes()).unwrap();
            chain.push(name.as_bytes(), dir.clone(), &dir.stat_self().unwrap());
            rel = join(&rel, name.as_bytes());
        }
        let parent = root.resolve_dir(b"d000/d001/d002").unwrap();
        parent.rename(b"d003", b"moved").unwrap();
        parent.create_dir(b"d003").unwrap();
        for _ in 0..(40 - 4) {
            chain.pop();
        }
        let err = chain.top().unwrap_err();
        assert!(matches!(err.get_ref(), Some(e) if e.is::<Moved>()), "{err}");
    }

    #[test]
    fn absent_levels_have_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        root.create_dir(b"here").unwrap();
        let mut chain = Chain::new(root);
        chain.enter_if_dir(b"here");
        assert!(chain.top().unwrap().is_some());
        chain.enter_if_dir(b"missing");
        chain.enter_if_dir(b"below");
        assert_eq!(chain.depth(), 3);
        assert!(chain.top().unwrap().is_none());
        chain.pop();
        chain.pop();
        assert!(chain.top().unwrap().is_some());
        assert!(Chain::absent().top().unwrap().is_none());
    }

    #[test]
    fn removing_a_deep_tree_moves_its_depths_up_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let top = Dir::open_path(tmp.path()).unwrap();
        let doomed = top.create_dir(b"doomed").unwrap();
        chain_of(&doomed, 5 * REMOVE_DEPTH);
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("doomed/d000/up")).unwrap();
        top.create_dir(b"kept").unwrap();
        top.remove_all(b"doomed").unwrap();
        assert_eq!(top.names().unwrap(), vec![b"kept".to_vec()]);
    }

    #[test]
    fn temp_names_differ_and_are_valid() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(check_name(&a).is_ok());
    }
}
