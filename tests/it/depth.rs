//! Deep trees with few descriptors: rbackup runs under `ulimit -n 256` (both
//! the desktop and the agent it starts) and backs up, continues, verifies and
//! removes trees far deeper than that, whose paths are far longer than
//! `PATH_MAX`. A walk that held a descriptor per level would fail with EMFILE
//! a tenth of the way down.
//!
//! The trees live on tmpfs (`/dev/shm`): on a busy disk ext4 takes half a
//! minute to remove 20,000 directories, whatever removes them (`rm -rf` too).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};

use crate::common::*;

/// The descriptor limit every run here gets.
const FDS: u32 = 256;
/// Levels of the honest deep tree: more than 8 × `FDS`, paths over 8 kB.
const DEPTH: usize = 2100;

fn limited(args: &[&OsStr]) -> Command {
    rbackup_with_fds(FDS, args)
}

/// A scratch directory on tmpfs, removed on drop.
fn scratch_in_memory() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rbackup-test-").tempdir_in("/dev/shm").expect("tmpfs at /dev/shm")
}

fn output(mut c: Command) -> (i32, String) {
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn open_dir(dir: &OwnedFd, name: &str) -> OwnedFd {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

fn write_at(dir: &OwnedFd, name: &str, data: &[u8]) {
    let fd =
        rustix::fs::openat(dir, name, OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC, Mode::from_raw_mode(0o640))
            .unwrap();
    std::io::Write::write_all(&mut std::fs::File::from(fd), data).unwrap();
}

/// `DEPTH` nested directories `dir`, each also holding a file `z` listed
/// after it (so every level is needed again after its subtree), a symlink
/// now and then, and a FIFO at the bottom. Built with `*at` calls.
fn deep_tree(top: &Path) {
    std::fs::create_dir_all(top).unwrap();
    let mut dir = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    for i in 0..DEPTH {
        write_at(&dir, "z", format!("level {i}\n").as_bytes());
        if i % 300 == 0 {
            rustix::fs::symlinkat("../z", &dir, "link").unwrap();
        }
        rustix::fs::mkdirat(&dir, "dir", Mode::from_raw_mode(0o750)).unwrap();
        dir = open_dir(&dir, "dir");
    }
    write_at(&dir, "bottom", b"at the bottom\n");
    rustix::fs::mknodat(&dir, "pipe", rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o640), 0).unwrap();
}

/// Starts a limited backup that stops at the bottom FIFO's metadata (the
/// debug build's pause hook), kills it there with everything above open,
/// and returns once it is dead.
fn kill_at_the_bottom(args: &[&OsStr], control: &Path) {
    let mut c = limited(args);
    c.env("RBACKUP_TEST_PAUSE_BEFORE_CHMOD", control).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(control);
        if opened.is_ok() {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the backup ended ({st}) before the bottom:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "the backup never reached the bottom");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_tree_2100_directories_deep_is_backed_up_continued_and_verified_with_256_descriptors() {
    require_root();
    let tmp = scratch_in_memory();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    deep_tree(&src);
    let control = tmp.path().join("control");
    sh(&format!("mkfifo '{}'", control.display()));

    // Killed at the bottom, every level above open at once.
    kill_at_the_bottom(&job_args("--backup", &src, &bk), &control);
    let snaps = snapshots(&bk, "srv");
    assert!(snaps.len() == 1 && !snaps[0].1, "one interrupted run: {snaps:?}");

    let (code, err) = output(limited(&job_args("--continue", &src, &bk)));
    assert_eq!(code, 0, "continue: {err}");
    let done = complete(&bk, "srv");
    assert_eq!(done.len(), 1, "{:?}", snapshots(&bk, "srv"));
    let (source, first) = (read_tree(&src), read_tree(&done[0]));
    assert!(deepest(&source) > 2 * 4096, "paths longer than PATH_MAX");
    let diffs = diff_trees(&source, &first, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // A second backup compares and links level by level with its basis.
    let (code, err) = output(limited(&job_args("--backup", &src, &bk)));
    assert_eq!(code, 0, "second backup: {err}");
    let done = complete(&bk, "srv");
    assert_eq!(done.len(), 2);
    let second = read_tree(&done[1]);
    let diffs = diff_trees(&source, &second, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let bottom = source.keys().find(|p| p.ends_with(b"/bottom")).unwrap();
    assert_eq!(first[bottom].ino, second[bottom].ino, "the unchanged bottom file is hardlinked");

    // verify walks the snapshot the same way.
    let args: Vec<&OsStr> = ["--verify", "--backups-folder"]
        .iter()
        .map(OsStr::new)
        .chain([bk.as_os_str(), OsStr::new("--name"), OsStr::new("srv")])
        .collect();
    let (code, err) = output(limited(&args));
    assert_eq!(code, 0, "verify: {err}");
}

/// Levels of the chain a killed run or a hostile server left: more than 75 ×
/// `FDS`, a 40 kB path.
const CHAIN: usize = 20_000;

/// A chain of `CHAIN` directories `a` as `top/a`, a file every 1,000 levels.
fn chain(top: &Path) {
    let mut dir = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
    for i in 0..CHAIN {
        rustix::fs::mkdirat(&dir, "a", Mode::from_raw_mode(0o700)).unwrap();
        if i % 1000 == 0 {
            write_at(&dir, "f", b"x");
        }
        dir = open_dir(&dir, "a");
    }
}

#[test]
fn an_interrupted_run_20000_directories_deep_is_continued_or_removed_with_256_descriptors() {
    require_root();
    let tmp = scratch_in_memory();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("a"), b"a file now");
    write(&src.join("b/c"), b"c");
    std::os::unix::fs::symlink("b/c", src.join("d")).unwrap();

    // continue: the source's `a` is a file now, the chain goes first.
    let inc = bk.join("srv.01-01-20_00-00-00.incomplete");
    std::fs::create_dir_all(&inc).unwrap();
    chain(&inc);
    let (code, err) = output(limited(&job_args("--continue", &src, &bk)));
    assert_eq!(code, 0, "continue: {err}");
    let done = complete(&bk, "srv");
    assert_eq!(done.len(), 1, "{:?}", snapshots(&bk, "srv"));
    assert_same_tree(&src, &done[0], &[]);

    // backup: an older interrupted run is superseded by the new snapshot,
    // and removed.
    let old = bk.join("srv.01-01-19_00-00-00.incomplete");
    std::fs::create_dir_all(&old).unwrap();
    chain(&old);
    let (code, err) = output(limited(&job_args("--backup", &src, &bk)));
    assert_eq!(code, 0, "backup: {err}");
    assert!(err.contains("removing srv.01-01-19_00-00-00.incomplete, superseded"), "{err}");
    let snaps = snapshots(&bk, "srv");
    assert!(snaps.len() == 2 && snaps.iter().all(|(_, c)| *c), "{snaps:?}");
    let trash: Vec<_> = std::fs::read_dir(bk.join("srv.rbackup/trash")).unwrap().collect();
    assert!(trash.is_empty(), "left in the trash: {trash:?}");
}
