//! Metadata: read it from a tree, compare it, apply it exactly.
//!
//! What is kept (docs/design.md rule 4): numeric owner and group, all mode bits
//! (setuid, setgid, sticky), mtime with nanoseconds, and every extended
//! attribute, POSIX ACLs included as their raw `system.posix_acl_*` values so
//! that the mask is never recomputed. Applying follows the order that keeps
//! each step from undoing the one before: chown (which clears setuid and
//! `security.capability`), chmod, xattrs, ACLs, times.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Mode, Stat, Timespec, Timestamps, UTIME_OMIT};
use serde::{Deserialize, Serialize};

use xattr::FileExt;

use crate::fs::safefs::{Dir, Pinned, libc_errno};
pub use crate::fs::times::TimeRange;

/// The part of `st_mode` rbackup keeps besides the file type.
pub const MODE_BITS: u32 = 0o7777;

/// One extended attribute, name and value as raw bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// The metadata of one entry, as sent on the wire and applied to disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Sorted by name; ACLs are here as `system.posix_acl_access` / `_default`.
    #[serde(deserialize_with = "bounded_xattrs")]
    pub xattrs: Vec<Xattr>,
}

/// Most extended attributes one entry can have: Linux lists at most 64 KiB
/// of names, each at least `user.x` and its NUL. More is a lie, refused
/// while decoding (one frame of one-byte attributes once decoded to 152 MB).
pub const XATTRS_MAX: usize = 65_536 / 7;

fn bounded_xattrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Xattr>, D::Error> {
    d.deserialize_seq(crate::fs::bounded::Bounded {
        limit: XATTRS_MAX,
        what: "at most 9362 extended attributes",
        cost: |_: &Xattr| 0,
        budget: 0,
        item: std::marker::PhantomData,
    })
}

/// The ACL attributes; applied after the other attributes.
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

fn is_acl(name: &[u8]) -> bool {
    name == ACL_ACCESS || name == ACL_DEFAULT
}

/// Namespaces rbackup copies and manages. Anything else (e.g. an `NFSv4` ACL
/// surfaced as `system.nfs4_acl`) is left alone on both sides.
pub fn is_managed_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"trusted.") || name.starts_with(b"security.") || is_acl(name)
}

/// The kind of a special file.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialKind {
    Fifo,
    Char,
    Block,
}

/// Largest xattr value Linux stores.
pub const XATTR_VALUE_MAX: usize = 65536;

/// What the side that writes can preserve: what the running process may
/// set, and the modification times its filesystem can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    /// Running as root: owners, `trusted.*` and `security.*` can be set.
    pub root: bool,
    pub uid: u32,
    pub gid: u32,
    pub times: TimeRange,
    /// Writing into a live tree (a restore): `trusted.*` attributes an
    /// entry has and the snapshot lacks are kept, not removed. A backup
    /// user can't read `trusted.*`, so a snapshot's lack of one says
    /// nothing about the file (see [`same_xattrs`]).
    pub live: bool,
}

impl Privileges {
    /// The running process's, with no limit on times (see [`Self::storing_on`]).
    pub fn current() -> Privileges {
        let uid = rustix::process::geteuid().as_raw();
        Privileges { root: uid == 0, uid, gid: rustix::process::getegid().as_raw(), times: TimeRange::ANY, live: false }
    }

    /// These privileges, writing into a live tree (a restore).
    #[must_use]
    pub fn into_live_tree(self) -> Privileges {
        Privileges { live: true, ..self }
    }

    /// These privileges, writing to the filesystem of `dir`: with the times
    /// it can hold, asked of it once.
    #[must_use]
    pub fn storing_on(self, dir: &Dir) -> Privileges {
        Privileges { times: TimeRange::probe(dir), ..self }
    }

    /// The metadata this process can actually store for an entry that has
    /// `meta` at its source. Comparisons use this, so that a non-root run
    /// doesn't see every file as changed because it can't chown.
    pub fn storable(&self, meta: &Meta) -> Meta {
        let (mtime, mtime_nsec) = self.times.clamp(meta.mtime, meta.mtime_nsec);
        if self.root {
            return Meta { mtime, mtime_nsec, ..meta.clone() };
        }
        Meta {
            mtime,
            mtime_nsec,
            uid: self.uid,
            gid: self.gid,
            xattrs: meta
                .xattrs
                .iter()
                .filter(|x| !x.name.starts_with(b"trusted.") && !x.name.starts_with(b"security."))
                .cloned()
                .collect(),
            // Without root, chown can't run, and the kernel drops setuid/setgid
            // on files we write for other owners anyway.
            ..meta.clone()
        }
    }
}

/// Metadata from an `lstat` result plus xattrs.
pub fn from_stat(st: &Stat, xattrs: Vec<Xattr>) -> Meta {
    Meta {
        mode: st.st_mode & MODE_BITS,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        xattrs,
    }
}

/// True when the stat fields of `st` equal those in `meta` (xattrs aside).
pub fn stat_matches(st: &Stat, meta: &Meta) -> bool {
    st.st_mode & MODE_BITS == meta.mode
        && st.st_uid == meta.uid
        && st.st_gid == meta.gid
        && st.st_mtime == meta.mtime
        && st.st_mtime_nsec as u32 == meta.mtime_nsec
}

/// Where xattrs are read and written: an open file or directory (by
/// descriptor, so the call can't land anywhere else); a pinned entry through
/// its `/proc/self/fd/N` magic link, which the calls follow to the pinned
/// inode and no further; or, for reading only, an entry named in its
/// directory, whose last component is never followed.
enum Xattrs<'a> {
    File(&'a std::fs::File),
    Dir(&'a Dir),
    Pinned(std::path::PathBuf),
    Path(std::path::PathBuf),
}

impl Xattrs<'_> {
    /// The raw name list: NUL-terminated names.
    fn list(&self) -> io::Result<Vec<u8>> {
        sized(|buf| match self {
            Xattrs::File(f) => rustix::fs::flistxattr(f, buf),
            Xattrs::Dir(d) => rustix::fs::flistxattr(d, buf),
            Xattrs::Pinned(p) => rustix::fs::listxattr(p, buf),
            Xattrs::Path(p) => rustix::fs::llistxattr(p, buf),
        })
    }

    fn get(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        sized(|buf| match self {
            Xattrs::File(f) => rustix::fs::fgetxattr(f, name, buf),
            Xattrs::Dir(d) => rustix::fs::fgetxattr(d, name, buf),
            Xattrs::Pinned(p) => rustix::fs::getxattr(p, name, buf),
            Xattrs::Path(p) => rustix::fs::lgetxattr(p, name, buf),
        })
    }

    fn set(&self, name: &OsStr, value: &[u8]) -> io::Result<()> {
        match self {
            Xattrs::File(f) => f.set_xattr(name, value),
            Xattrs::Dir(d) => d.set_xattr(name, value),
            Xattrs::Pinned(p) => {
                rustix::fs::setxattr(p, name, value, rustix::fs::XattrFlags::empty()).map_err(io::Error::from)
            }
            Xattrs::Path(_) => unreachable!("entries are pinned before their xattrs are written"),
        }
    }

    fn remove(&self, name: &OsStr) -> io::Result<()> {
        match self {
            Xattrs::File(f) => f.remove_xattr(name),
            Xattrs::Dir(d) => d.remove_xattr(name),
            Xattrs::Pinned(p) => rustix::fs::removexattr(p, name).map_err(io::Error::from),
            Xattrs::Path(_) => unreachable!("entries are pinned before their xattrs are written"),
        }
    }

    /// The managed xattrs, sorted by name. A filesystem without xattr
    /// support has none.
    fn read(&self) -> io::Result<Vec<Xattr>> {
        let names = match self.list() {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc_errno::EOPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty() && is_managed_xattr(n)) {
            match self.get(OsStr::from_bytes(name)) {
                Ok(value) => out.push(Xattr { name: name.to_vec(), value }),
                // Removed since the listing.
                Err(e) if e.raw_os_error() == Some(libc_errno::ENODATA) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Runs a list or get call with a buffer that grows until the answer fits:
/// one call for the usual short list or value, where asking for the size
/// first would always take two.
fn sized(mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // Too small (or it grew since): ask for the size, then retry.
            Err(rustix::io::Errno::RANGE) => {
                let need = call(&mut [])?;
                if need > 16 * XATTR_VALUE_MAX {
                    return Err(io::Error::other(format!("extended attribute list of {need} bytes")));
                }
                buf.resize(need.max(2 * buf.len()), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the managed xattrs of `name` in `dir`, sorted by name, without
/// following a symlink.
pub fn read_xattrs(dir: &Dir, name: &[u8]) -> io::Result<Vec<Xattr>> {
    Xattrs::Path(dir.proc_path(name)).read()
}

/// Reads the managed xattrs of `name` in the calling thread's working
/// directory, which it made its own (`sys::private_cwd`) and changed into:
/// one lookup instead of a procfs path's several. `name` is one component.
pub fn read_xattrs_in_cwd(name: &[u8]) -> io::Result<Vec<Xattr>> {
    debug_assert!(!name.contains(&b'/') && name != b".." && name != b".");
    Xattrs::Path(std::path::PathBuf::from(OsStr::from_bytes(name))).read()
}

/// Reads the managed xattrs of a directory through its handle.
pub fn read_dir_xattrs(dir: &Dir) -> io::Result<Vec<Xattr>> {
    Xattrs::Dir(dir).read()
}

/// Reads the managed xattrs of an open file.
pub fn read_file_xattrs(file: &std::fs::File) -> io::Result<Vec<Xattr>> {
    Xattrs::File(file).read()
}

/// How an entry's metadata is applied: through an open file descriptor
/// (regular files and directories), or through the `O_PATH` descriptor of a
/// symlink, FIFO or device node, which can't be opened safely
/// ([`Dir::pin`]). Never by name: a name can be swapped for a symlink between
/// one call and the next, and `chmod` by name would follow it.
pub enum Target<'a> {
    Fd(&'a std::fs::File),
    Dir(&'a Dir),
    Pinned(&'a Pinned),
}

/// One thing that could not be applied; the entry is still written.
#[derive(Debug)]
pub struct ApplyProblem {
    pub what: String,
    pub error: io::Error,
}

/// Applies `meta` in the order of docs/design.md rule 4. Returns what could not be applied
/// (e.g. a `trusted.*` attribute on a filesystem that refuses it); the caller
/// reports those as warnings.
pub fn apply(target: &Target<'_>, meta: &Meta, privs: Privileges) -> io::Result<Vec<ApplyProblem>> {
    Ok(apply_over(target, meta, privs, None))
}

/// [`apply`] for a regular file this run just created and wrote: what its
/// owner and mode already are is read first (one cheap `fstat`), and the
/// `chown` and `chmod` that would change nothing are left out, each being a
/// journaled inode update.
pub fn apply_new(file: &std::fs::File, meta: &Meta, privs: Privileges) -> io::Result<Vec<ApplyProblem>> {
    let now = rustix::fs::fstat(file)?;
    Ok(apply_over(&Target::Fd(file), meta, privs, Some(&now)))
}

/// `now`: the entry's current stat, when it is known to be fresh.
fn apply_over(target: &Target<'_>, meta: &Meta, privs: Privileges, now: Option<&Stat>) -> Vec<ApplyProblem> {
    let mut problems = Vec::new();
    let mut note = |what: String, error: io::Error| problems.push(ApplyProblem { what, error });

    // chown: only root can give a file away; a non-root run keeps its own ids.
    let chown = privs.root && now.is_none_or(|st| st.st_uid != meta.uid || st.st_gid != meta.gid);
    if chown {
        let uid = Some(rustix::fs::Uid::from_raw(meta.uid));
        let gid = Some(rustix::fs::Gid::from_raw(meta.gid));
        let res = match target {
            Target::Fd(f) => rustix::fs::fchown(f, uid, gid),
            Target::Dir(d) => rustix::fs::fchown(d, uid, gid),
            // fchown refuses an O_PATH descriptor; this form takes it.
            Target::Pinned(p) => rustix::fs::chownat(p, c"", uid, gid, AtFlags::EMPTY_PATH),
        };
        if let Err(e) = res {
            note(format!("owner {}:{}", meta.uid, meta.gid), e.into());
        }
    }

    // chmod: symlinks have no mode of their own on Linux. After a chown it
    // always runs: chown cleared setuid and setgid.
    let mode = Mode::from_raw_mode(meta.mode);
    let res = match target {
        _ if !chown && now.is_some_and(|st| st.st_mode & MODE_BITS == meta.mode) => Ok(()),
        Target::Fd(f) => rustix::fs::fchmod(f, mode).map_err(io::Error::from),
        Target::Dir(d) => rustix::fs::fchmod(d, mode).map_err(io::Error::from),
        Target::Pinned(p) if p.kind() == rustix::fs::FileType::Symlink => Ok(()),
        // fchmod refuses an O_PATH descriptor (and fchmodat2 with
        // AT_EMPTY_PATH needs Linux 6.6): chmod its magic link, which
        // resolves to the pinned FIFO or device node itself.
        Target::Pinned(p) => {
            #[cfg(debug_assertions)]
            test_hook::pause_before_chmod();
            rustix::fs::chmodat(rustix::fs::CWD, p.proc_path(), mode, AtFlags::empty()).map_err(io::Error::from)
        }
    };
    if let Err(e) = res {
        note(format!("mode {:o}", meta.mode), e);
    }

    apply_xattrs(target, meta, privs, &mut note);

    // Times last: everything above may have touched ctime but not mtime, and
    // nothing may follow that changes mtime.
    let times = Timestamps {
        last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
        last_modification: Timespec { tv_sec: meta.mtime, tv_nsec: i64::from(meta.mtime_nsec) },
    };
    let res = match target {
        Target::Fd(f) => rustix::fs::futimens(f, &times),
        Target::Dir(d) => rustix::fs::futimens(d, &times),
        Target::Pinned(p) => rustix::fs::utimensat(rustix::fs::CWD, p.proc_path(), &times, AtFlags::empty()),
    };
    if let Err(e) = res {
        note("modification time".to_string(), e.into());
    }
    problems
}

fn apply_xattrs(target: &Target<'_>, meta: &Meta, privs: Privileges, note: &mut impl FnMut(String, io::Error)) {
    let handle = match target {
        Target::Fd(f) => Xattrs::File(f),
        Target::Dir(d) => Xattrs::Dir(d),
        Target::Pinned(p) => Xattrs::Pinned(p.proc_path()),
    };
    // What is there already: inherited default ACLs in a new file, or the old
    // attributes of an entry fixed in place.
    let existing = match handle.read() {
        Ok(x) => x,
        Err(e) => {
            note("extended attributes (listing)".to_string(), e);
            return;
        }
    };
    let wanted = privs.storable(meta).xattrs;
    for old in &existing {
        let kept = wanted.iter().any(|w| w.name == old.name) || (privs.live && is_trusted(&old.name));
        if !kept
            && let Err(e) = handle.remove(OsStr::from_bytes(&old.name))
            && e.raw_os_error() != Some(libc_errno::ENODATA)
        {
            note(format!("removing xattr {}", String::from_utf8_lossy(&old.name)), e);
        }
    }
    // Plain attributes first, ACLs after (docs/design.md rule 4).
    let ordered = wanted.iter().filter(|x| !is_acl(&x.name)).chain(wanted.iter().filter(|x| is_acl(&x.name)));
    for x in ordered {
        if existing.iter().any(|e| e == x) {
            continue;
        }
        if let Err(e) = handle.set(OsStr::from_bytes(&x.name), &x.value) {
            note(format!("xattr {}", String::from_utf8_lossy(&x.name)), e);
        }
    }
}

/// Where an entry's xattrs may be read from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tree {
    /// A snapshot rbackup writes: a regular file may be opened to read its
    /// xattrs by descriptor, half the cost of a procfs path.
    Ours,
    /// A live tree (a server being restored to): never opened just to look,
    /// since an open breaks other programs' leases and wakes their watches.
    Live,
}

/// Reads the managed xattrs of `name` in `dir`, whose `lstat` is `st`.
pub fn read_xattrs_of(dir: &Dir, name: &[u8], st: &Stat, tree: Tree) -> io::Result<Vec<Xattr>> {
    if tree == Tree::Ours && crate::fs::safefs::file_type(st) == rustix::fs::FileType::RegularFile {
        // Only a regular file: opening a device node can have effects.
        return Xattrs::File(&dir.open_file(name)?).read();
    }
    read_xattrs(dir, name)
}

/// True if `name` in `dir` (whose `lstat` is `st`) carries exactly the
/// xattrs in `wanted` (see [`same_xattrs`]).
pub fn xattrs_match(dir: &Dir, name: &[u8], st: &Stat, wanted: &[Xattr], tree: Tree) -> io::Result<bool> {
    Ok(same_xattrs(&read_xattrs_of(dir, name, st, tree)?, wanted, tree))
}

fn is_trusted(name: &[u8]) -> bool {
    name.starts_with(b"trusted.")
}

/// True if an entry's attributes `found` are `wanted`. In a live tree, a
/// `trusted.*` attribute `wanted` lacks doesn't count: a restore keeps it
/// ([`Privileges::live`]).
pub fn same_xattrs(found: &[Xattr], wanted: &[Xattr], tree: Tree) -> bool {
    if tree == Tree::Live {
        let kept = |x: &&Xattr| !is_trusted(&x.name) || wanted.iter().any(|w| w.name == x.name);
        found.iter().filter(kept).eq(wanted.iter())
    } else {
        found == wanted
    }
}

/// A pause between two metadata steps, for the regression test of a race
/// (tests/races.rs): with `RBACKUP_TEST_PAUSE_BEFORE_CHMOD=FIFO` set, the first
/// chmod of a pinned FIFO or device node waits until a writer has opened and closed FIFO,
/// so that the test can swap the entry for a symlink in between. Compiled in
/// debug builds only: a release binary has no such door.
#[cfg(debug_assertions)]
mod test_hook {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};

    static DONE: AtomicBool = AtomicBool::new(false);

    pub fn pause_before_chmod() {
        if DONE.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(fifo) = std::env::var_os("RBACKUP_TEST_PAUSE_BEFORE_CHMOD")
            && let Ok(mut f) = std::fs::File::open(fifo)
        {
            let _ = f.read_to_end(&mut Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_root_keeps_user_xattrs_and_acls_only() {
        let privs = Privileges { root: false, uid: 1000, gid: 1000, times: TimeRange::ANY, live: false };
        let meta = Meta {
            mode: 0o4755,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 2,
            xattrs: vec![
                Xattr { name: b"security.capability".to_vec(), value: vec![1] },
                Xattr { name: ACL_ACCESS.to_vec(), value: vec![2] },
                Xattr { name: b"trusted.x".to_vec(), value: vec![3] },
                Xattr { name: b"user.y".to_vec(), value: vec![4] },
            ],
        };
        let s = privs.storable(&meta);
        assert_eq!((s.uid, s.gid), (1000, 1000));
        let names: Vec<_> = s.xattrs.iter().map(|x| x.name.clone()).collect();
        assert_eq!(names, vec![ACL_ACCESS.to_vec(), b"user.y".to_vec()]);
        let root = Privileges { root: true, uid: 0, gid: 0, times: TimeRange::ANY, live: false };
        assert_eq!(root.storable(&meta), meta);
    }

    #[test]
    fn managed_namespaces() {
        assert!(is_managed_xattr(b"user.a"));
        assert!(is_managed_xattr(b"trusted.a"));
        assert!(is_managed_xattr(b"security.selinux"));
        assert!(is_managed_xattr(ACL_DEFAULT));
        assert!(!is_managed_xattr(b"system.nfs4_acl"));
    }
}
