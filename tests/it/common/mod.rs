//! Shared helpers for the integration tests: a rich source tree, an entry-by-
//! entry tree comparison written independently of rbackup's own code (raw
//! `*at` syscalls, so paths longer than `PATH_MAX` work), and the binary.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

pub mod bench;
pub mod midrun;
pub mod smtp;
pub mod sshd;
pub mod web;
pub mod webdriver;

/// Fails loudly unless the test runs as root: these tests create files of
/// other owners, `trusted.*` xattrs and device nodes. They never skip.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (owners, ACLs, trusted.* xattrs): run `sudo scripts/test.sh`"
    );
}

/// The rbackup binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rbackup"))
}

/// A command running rbackup with `args`.
pub fn rbackup(args: &[&OsStr]) -> Command {
    let mut c = Command::new(bin());
    c.args(args);
    c.env_remove("RUST_BACKTRACE");
    c
}

/// Runs rbackup and returns (exit code, stdout, stderr).
pub fn run(args: &[&OsStr]) -> (i32, String, String) {
    let out = rbackup(args).output().expect("run rbackup");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `backup` of `src` into `folder` under `name`, with extra args.
pub fn backup(src: &Path, folder: &Path, name: &str, extra: &[&str]) -> (i32, String, String) {
    job_command("--backup", src, folder, name, extra)
}

/// `continue` of `src` into `folder` under `name`, with extra args.
pub fn continue_backup(src: &Path, folder: &Path, name: &str, extra: &[&str]) -> (i32, String, String) {
    job_command("--continue", src, folder, name, extra)
}

fn job_command(command: &str, src: &Path, folder: &Path, name: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new(command),
        OsStr::new("--source"),
        src.as_os_str(),
        OsStr::new("--backups-folder"),
        folder.as_os_str(),
        OsStr::new("--name"),
        OsStr::new(name),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run(&args)
}

/// `backup` of `src` into `folder` under `name`, started through
/// `setpriv PRIVS…` (another user, fewer capabilities): (exit code, stderr).
pub fn backup_under_setpriv(privs: &[&str], src: &Path, folder: &Path, name: &str) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .args(privs)
        .arg(bin())
        .args(["--backup", "--source"])
        .arg(src)
        .arg("--backups-folder")
        .arg(folder)
        .args(["--name", name])
        .output()
        .expect("run setpriv");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Snapshot folders of `name` in `folder` as (folder name, complete), sorted
/// by their names' time, parsed here independently of rbackup.
pub fn snapshots(folder: &Path, name: &str) -> Vec<(String, bool)> {
    // (year, month, day, hour, minute, second) → folder, complete
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    for entry in entries {
        let folder = entry.unwrap().file_name().into_string().unwrap();
        let Some(rest) = folder.strip_prefix(&format!("{name}.")) else { continue };
        let (stamp, complete) = match rest.strip_suffix(".incomplete") {
            Some(s) => (s, false),
            None => (rest, true),
        };
        if stamp.len() != 17 {
            continue;
        }
        let field = |i: usize| stamp[i..i + 2].parse::<u32>().ok();
        let Some(key) = [6, 3, 0, 9, 12, 15].into_iter().map(field).collect::<Option<Vec<u32>>>() else { continue };
        found.push((key, folder.clone(), complete));
    }
    found.sort();
    found.into_iter().map(|(_, folder, complete)| (folder, complete)).collect()
}

/// The complete snapshots' folders, oldest first.
pub fn complete(folder: &Path, name: &str) -> Vec<PathBuf> {
    snapshots(folder, name).into_iter().filter(|(_, c)| *c).map(|(f, _)| folder.join(f)).collect()
}

// ---------------------------------------------------------------- tree model

/// Everything compared about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u64),
    pub content: Option<[u8; 32]>,
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Not compared directly: used for hardlink groups and sharing checks.
    pub ino: u64,
    pub blocks: u64,
}

/// A tree as a map from relative path (raw bytes, "" for the root) to entry.
pub type Tree = BTreeMap<Vec<u8>, Info>;

fn open_dir_at(dir: &impl AsFd, name: &[u8]) -> OwnedFd {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open dir {:?}: {e}", String::from_utf8_lossy(name)))
}

fn xattrs_at(dir: &impl AsFd, name: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_fd().as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    let path = PathBuf::from(OsString::from_vec(p));
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&path)
        .unwrap()
        .filter(|n| {
            let b = n.as_bytes();
            b.starts_with(b"user.")
                || b.starts_with(b"trusted.")
                || b.starts_with(b"security.")
                || b.starts_with(b"system.posix_acl_")
        })
        .map(|n| {
            let v = xattr::get(&path, &n).unwrap().unwrap_or_default();
            (n.as_bytes().to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

fn info_at(dir: &impl AsFd, name: &[u8], hashes: &mut Hashes) -> Info {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    let ft = FileType::from_raw_mode(st.st_mode);
    let kind = match ft {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::CharacterDevice => "chardev",
        FileType::BlockDevice => "blockdev",
        FileType::Socket => "socket",
        FileType::Unknown => "unknown",
    };
    let content = (ft == FileType::RegularFile).then(|| {
        let key = (st.st_dev as u64, st.st_ino as u64, st.st_ctime as i64, st.st_ctime_nsec as i64);
        *hashes.entry(key).or_insert_with(|| {
            let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                .unwrap();
            let mut f = std::fs::File::from(fd);
            let mut h = blake3::Hasher::new();
            std::io::copy(&mut f, &mut h).unwrap();
            *h.finalize().as_bytes()
        })
    });
    let target = (ft == FileType::Symlink).then(|| rustix::fs::readlinkat(dir, name, Vec::new()).unwrap().into_bytes());
    Info {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: if ft == FileType::RegularFile { st.st_size as u64 } else { 0 },
        mtime: (st.st_mtime, st.st_mtime_nsec as u64),
        content,
        target,
        rdev: if matches!(ft, FileType::CharacterDevice | FileType::BlockDevice) { st.st_rdev } else { 0 },
        xattrs: xattrs_at(dir, name),
        ino: st.st_ino,
        blocks: st.st_blocks as u64,
    }
}

fn names(dir: &OwnedFd) -> Vec<Vec<u8>> {
    let dup = rustix::io::dup(dir).unwrap();
    let mut out: Vec<Vec<u8>> = rustix::fs::Dir::new(dup)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_bytes().to_vec())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    out.sort();
    out
}

/// Content digests already computed, by device, inode and ctime: trees that
/// share inodes (hardlinked snapshots) are hashed once per inode.
pub type Hashes = std::collections::HashMap<(u64, u64, i64, i64), [u8; 32]>;

/// Reads a whole tree, root included.
pub fn read_tree(root: &Path) -> Tree {
    read_tree_with(root, &mut Hashes::new())
}

/// [`read_tree`], taking content digests from `hashes` and adding to it.
pub fn read_tree_with(root: &Path, hashes: &mut Hashes) -> Tree {
    let parent = root.parent().unwrap();
    let pfd = rustix::fs::open(parent, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    let rname = root.file_name().unwrap().as_bytes();
    let mut tree = Tree::new();
    tree.insert(Vec::new(), info_at(&pfd, rname, hashes));
    let mut stack = vec![(open_dir_at(&pfd, rname), Vec::<u8>::new())];
    while let Some((dir, rel)) = stack.pop() {
        for name in names(&dir) {
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let info = info_at(&dir, &name, hashes);
            if info.kind == "dir" {
                stack.push((open_dir_at(&dir, &name), path.clone()));
            }
            tree.insert(path, info);
        }
    }
    tree
}

fn shown(p: &[u8]) -> String {
    if p.is_empty() { ".".into() } else { String::from_utf8_lossy(p).into_owned() }
}

/// Groups of paths sharing an inode (regular files with more than one name).
pub fn link_groups(t: &Tree) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    for (p, i) in t {
        if i.kind == "file" {
            by_ino.entry(i.ino).or_default().push(p.clone());
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    groups
}

/// Differences between two trees, entry by entry (everything in [`Info`] but
/// inode numbers and allocated blocks), and in their hardlink groups.
/// `skip_xattr` leaves out attributes whose name starts with one of its
/// prefixes (an unprivileged backup user can't read `trusted.*`).
pub fn diff_trees(a: &Tree, b: &Tree, skip_xattr: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let clean = |i: &Info| {
        let mut i = i.clone();
        i.ino = 0;
        i.blocks = 0;
        i.xattrs.retain(|(n, _)| !skip_xattr.iter().any(|s| n.starts_with(s.as_bytes())));
        i
    };
    for (p, ia) in a {
        match b.get(p) {
            None => out.push(format!("missing: {}", shown(p))),
            Some(ib) => {
                let (ca, cb) = (clean(ia), clean(ib));
                if ca != cb {
                    out.push(format!("differs: {}\n  source:   {ca:?}\n  snapshot: {cb:?}", shown(p)));
                }
            }
        }
    }
    for p in b.keys() {
        if !a.contains_key(p) {
            out.push(format!("extra: {}", shown(p)));
        }
    }
    let (ga, gb) = (link_groups(a), link_groups(b));
    if ga != gb {
        out.push(format!("hardlink groups differ:\n  source:   {ga:?}\n  snapshot: {gb:?}"));
    }
    out
}

/// Panics with every difference if the trees differ.
pub fn assert_same_tree(source: &Path, copy: &Path, skip_xattr: &[&str]) {
    let diffs = diff_trees(&read_tree(source), &read_tree(copy), skip_xattr);
    assert!(diffs.is_empty(), "{} differs from {}:\n{}", copy.display(), source.display(), diffs.join("\n"));
}

// ---------------------------------------------------------------- fixtures

/// Sets mtime (with nanoseconds) of `name` in `dir` without following it.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let times = Timestamps {
        last_access: Timespec { tv_sec: sec, tv_nsec: nsec },
        last_modification: Timespec { tv_sec: sec, tv_nsec: nsec },
    };
    rustix::fs::utimensat(rustix::fs::CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

pub fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "command failed: {cmd}");
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A uid and gid that no desktop user has.
pub const GHOST_UID: u32 = 12345;
pub const GHOST_GID: u32 = 54321;

/// Builds the tree the issues describe: owners that don't exist, 0600/0700,
/// setuid, setgid, sticky, ACLs and default ACLs, user.* and trusted.*
/// xattrs, in-tree hardlinks, relative/absolute/dangling symlinks, a FIFO, a
/// sparse file, empty directories, names with spaces, newlines and non-UTF-8
/// bytes, a path longer than 4096 bytes, and mtimes with nanoseconds.
pub fn rich_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    let p = |rel: &str| root.join(rel);
    write(&p("etc/motd"), b"welcome\n");
    write(&p("etc/shadow-like"), b"secret\n");
    sh(&format!("chmod 600 '{}'", p("etc/shadow-like").display()));
    write(&p("home/alice/notes.txt"), &noise(1, 10_000));
    write(&p("home/alice/big.bin"), &noise(2, 3 << 20));
    sh(&format!("chown -R {GHOST_UID}:{GHOST_GID} '{}'", p("home/alice").display()));
    sh(&format!("chmod 700 '{}'", p("home/alice").display()));
    write(&p("bin/tool"), b"#!/bin/sh\necho tool\n");
    sh(&format!("chown {GHOST_UID}:{GHOST_GID} '{0}' && chmod 4755 '{0}'", p("bin/tool").display()));
    std::fs::create_dir_all(p("shared")).unwrap();
    sh(&format!("chmod 2775 '{}'", p("shared").display()));
    std::fs::create_dir_all(p("tmp")).unwrap();
    sh(&format!("chmod 1777 '{}'", p("tmp").display()));
    write(&p("shared/report.txt"), b"report\n");
    sh(&format!("setfacl -m u:{GHOST_UID}:rw,g:{GHOST_GID}:r '{}'", p("shared/report.txt").display()));
    sh(&format!("setfacl -d -m u:{GHOST_UID}:rx '{}'", p("shared").display()));
    sh(&format!("setfattr -n user.color -v blue '{}'", p("etc/motd").display()));
    sh(&format!("setfattr -n trusted.origin -v server1 '{}'", p("etc/motd").display()));
    sh(&format!("setfattr -n user.dirnote -v yes '{}'", p("shared").display()));
    // in-tree hardlinks, across directories
    std::fs::hard_link(p("home/alice/notes.txt"), p("shared/notes-link.txt")).unwrap();
    std::fs::hard_link(p("etc/motd"), p("etc/motd.hardlink")).unwrap();
    // symlinks
    std::os::unix::fs::symlink("../etc/motd", p("bin/motd-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", p("bin/passwd-abs")).unwrap();
    std::os::unix::fs::symlink("nowhere/at/all", p("bin/dangling")).unwrap();
    // a FIFO
    sh(&format!("mkfifo '{}'", p("tmp/pipe").display()));
    // a sparse file: 64 MiB with two small data regions
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(p("var/disk.img")).unwrap_or_else(|_| {
            std::fs::create_dir_all(p("var")).unwrap();
            std::fs::File::create(p("var/disk.img")).unwrap()
        });
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&noise(3, 8192), 1 << 20).unwrap();
        f.write_all_at(&noise(4, 4096), 40 << 20).unwrap();
    }
    // empty directories
    std::fs::create_dir_all(p("empty/deeper/empty-too")).unwrap();
    // odd names
    write(&p("names/with space.txt"), b"space\n");
    write(&p("names/with\nnewline"), b"newline\n");
    let bad = root.join("names").join(OsStr::from_bytes(b"latin1-\xe9t\xe9"));
    write(&bad, b"not utf-8\n");
    std::fs::create_dir_all(root.join("names").join(OsStr::from_bytes(b"dir-\xff"))).unwrap();
    write(&p("names/.hidden"), b"hidden\n");
    long_path(&p("long"));
    // nanosecond mtimes on files, directories and symlinks (last: children first)
    set_mtime(&p("etc/motd"), 1_500_000_000, 123_456_789);
    set_mtime(&p("bin/motd-rel"), 1_400_000_000, 987_654_321);
    set_mtime(&p("bin/dangling"), 1_400_000_001, 1);
    set_mtime(&p("tmp/pipe"), 1_300_000_000, 5);
    set_mtime(&p("empty/deeper"), 1_200_000_000, 42);
    set_mtime(&p("names"), 1_100_000_000, 999_999_999);
}

/// Nested directories whose path is longer than 4096 bytes, with a file at
/// the bottom; built with `*at` calls since path calls would fail.
pub fn long_path(top: &Path) {
    std::fs::create_dir_all(top).unwrap();
    let mut dir = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    for i in 0..20 {
        let name = format!("{i:02}-{}", "d".repeat(240));
        rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        dir = open_dir_at(&dir, name.as_bytes());
    }
    let fd = rustix::fs::openat(
        &dir,
        "deep-file",
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    )
    .unwrap();
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, b"at the bottom\n").unwrap();
}

/// Total path length of the deepest entry of a tree.
pub fn deepest(t: &Tree) -> usize {
    t.keys().map(Vec::len).max().unwrap_or(0)
}

/// A fresh scratch directory under /tmp (world-traversable, so an
/// unprivileged user can be given access), removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("rbackup-test-").tempdir_in("/tmp").unwrap();
    sh(&format!("chmod 755 '{}'", d.path().display()));
    d
}

/// A command running rbackup with `args` under `ulimit -n FDS` (soft and hard
/// limit, so it can't raise it); the agent it starts inherits the limit.
pub fn rbackup_with_fds(fds: u32, args: &[&OsStr]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\"")).arg(bin()).args(args);
    c.env_remove("RUST_BACKTRACE");
    c
}

/// `COMMAND --source SRC --backups-folder BK --name srv`, for commands run
/// by hand (under a limit, killed mid-way).
pub fn job_args<'a>(command: &'a str, src: &'a Path, bk: &'a Path) -> Vec<&'a OsStr> {
    vec![
        OsStr::new(command),
        OsStr::new("--source"),
        src.as_os_str(),
        OsStr::new("--backups-folder"),
        bk.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("srv"),
    ]
}
