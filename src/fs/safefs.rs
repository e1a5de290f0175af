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

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};

pub use super::chain::{Chain, HELD_LEVELS, Moved};
pub use super::name::{NAME_MAX, NameError, SHOWN_KEEP, Shown, check_name, cstr_bytes, join, name_cstring, temp_name};

/// `path` with its deepest existing ancestor resolved (symlinks, `..`) and
/// the rest appended as given: where a path an administrator names would
/// be, whether or not it exists yet. `None` if no ancestor resolves.
pub fn resolve_existing_ancestor(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut rest = Vec::new();
    loop {
        if let Ok(p) = std::fs::canonicalize(existing) {
            return Some(rest.iter().rev().fold(p, |p: PathBuf, c| p.join(c)));
        }
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
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
        let mut out: Vec<Vec<u8>> = self.entries()?.into_iter().map(|(_, name, _)| name).collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The entries of this directory as `readdir` gives them (inode, name,
    /// type — `Unknown` where the filesystem doesn't say), without `.` and
    /// `..`, in no particular order.
    pub fn entries(&self) -> io::Result<Vec<(u64, Vec<u8>, FileType)>> {
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
                out.push((entry.ino(), name.to_vec(), entry.file_type()));
            }
        }
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

/// Deepest level a removal works at in place (see [`Dir::clear`]).
pub const REMOVE_DEPTH: usize = 16;

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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn removing_a_deep_tree_moves_its_depths_up_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let top = Dir::open_path(tmp.path()).unwrap();
        let doomed = top.create_dir(b"doomed").unwrap();
        crate::fs::chain::tests::chain_of(&doomed, 5 * REMOVE_DEPTH);
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join("doomed/d000/up")).unwrap();
        top.create_dir(b"kept").unwrap();
        top.remove_all(b"doomed").unwrap();
        assert_eq!(top.names().unwrap(), vec![b"kept".to_vec()]);
    }
}
