//! Races against the write agent: someone who can write a directory being
//! restored swaps an entry between the agent's checks and its metadata calls.
//! Every call must land on the entry that was checked, never on what a
//! symlink swapped in points to. A debug-build hook
//! (`RBACKUP_TEST_PAUSE_BEFORE_CHMOD`) holds the agent between two metadata
//! steps while the test swaps.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn restore_args(bk: &Path, dest: &Path) -> Vec<std::ffi::OsString> {
    ["--restore", "--backups-folder"]
        .iter()
        .map(Into::into)
        .chain([bk.as_os_str().to_owned(), "--name".into(), "srv".into(), "--to".into(), dest.as_os_str().to_owned()])
        .collect()
}

#[test]
fn a_fifo_swapped_for_a_symlink_during_a_restore_never_changes_the_file_it_points_to() {
    require_root();
    let tmp = scratch();
    let (src, bk, dest) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("dest"));
    // A directory its user writes, holding the user's FIFO (0666).
    std::fs::create_dir_all(src.join("shared")).unwrap();
    sh(&format!("mkfifo -m 0666 '{0}/shared/pipe' && chown -R {GHOST_UID}:{GHOST_GID} '{0}/shared'", src.display()));
    // Root's secret, outside the restored tree.
    let secret = tmp.path().join("outside/secret");
    write(&secret, b"root only\n");
    sh(&format!("chmod 0600 '{}'", secret.display()));
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let args = restore_args(&bk, &dest);
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "first restore: {err}");

    // The FIFO's mode drifted: the next restore fixes it in place (chown,
    // then chmod), and is held between the two.
    sh(&format!("chmod 0600 '{}'", dest.join("shared/pipe").display()));
    let control = tmp.path().join("control");
    sh(&format!("mkfifo '{}'", control.display()));
    let mut child = rbackup(&args)
        .env("RBACKUP_TEST_PAUSE_BEFORE_CHMOD", &control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Opening the control FIFO for writing succeeds once the agent waits on it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc_o_nonblock()).open(&control) {
            Ok(f) => break f,
            Err(e) if e.raw_os_error() == Some(6) => {} // ENXIO: no reader yet
            Err(e) => panic!("opening the control FIFO: {e}"),
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!("the restore ended ({st}) without pausing:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(Instant::now() < deadline, "the agent never reached the pause");
        std::thread::sleep(Duration::from_millis(5));
    };

    // The swap: the FIFO's name now is a symlink to the secret.
    let pipe = dest.join("shared/pipe");
    std::os::unix::fs::symlink(&secret, dest.join("shared/pipe.swap")).unwrap();
    std::fs::rename(dest.join("shared/pipe.swap"), &pipe).unwrap();
    drop(held);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);

    let md = std::fs::metadata(&secret).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o600, "the secret's mode changed through the symlink:\n{err}");
    assert_eq!((md.uid(), md.gid()), (0, 0), "the secret's owner changed through the symlink:\n{err}");
    assert_eq!(std::fs::read(&secret).unwrap(), b"root only\n");
    assert!(std::fs::symlink_metadata(&pipe).unwrap().file_type().is_symlink(), "the swapped-in symlink is left alone");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// `O_NONBLOCK`, so that opening the control FIFO without a reader fails
/// instead of blocking.
fn libc_o_nonblock() -> i32 {
    rustix::fs::OFlags::NONBLOCK.bits() as i32
}
