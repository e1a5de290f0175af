//! One run per destination: an exclusive `flock` on `NAME.rbackup/lock`.
//!
//! Why flock and not a PID file: the kernel drops the lock when the holder
//! exits, however it exits, so nothing stale survives a crash or `kill -9`
//! and there is no "is that PID still ours?" guessing. The file's content
//! (PID, command, start time) is only for the message a second run prints;
//! it is rewritten by each holder after it holds the lock. A second run that
//! reads it while the holder is still writing may see it empty, and then says
//! so rather than guessing.

use std::fs::File;
use std::io::{Read, Seek, Write};

use anyhow::{Context, Result};
use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::error::LockedError;
use crate::fs::safefs::Dir;

/// Restores (and later verifies) read snapshots: they share this lock, which
/// `prune` takes exclusively, so nothing is deleted while it is read.
pub fn acquire_readers(meta_dir: &Dir, what: &str, folder_for_messages: &str) -> Result<Lock> {
    take(meta_dir, "readers.lock", FlockOperation::NonBlockingLockShared, what, folder_for_messages)
}

/// `prune` takes the readers lock exclusively: no restore or verify is
/// reading a snapshot it deletes.
pub fn acquire_readers_exclusive(meta_dir: &Dir, what: &str, folder_for_messages: &str) -> Result<Lock> {
    take(meta_dir, "readers.lock", FlockOperation::NonBlockingLockExclusive, what, folder_for_messages)
}

/// Held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Takes the lock in `meta_dir`, or fails with [`LockedError`] naming the
/// holder.
pub fn acquire(meta_dir: &Dir, what: &str, folder_for_messages: &str) -> Result<Lock> {
    take(meta_dir, "lock", FlockOperation::NonBlockingLockExclusive, what, folder_for_messages)
}

fn take(meta_dir: &Dir, file: &str, op: FlockOperation, what: &str, folder_for_messages: &str) -> Result<Lock> {
    let fd = rustix::fs::openat(
        meta_dir,
        file,
        OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .with_context(|| format!("cannot open the lock file in {folder_for_messages}"))?;
    let mut file = File::from(fd);
    match rustix::fs::flock(&file, op) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another rbackup run".to_string() } else { holder.to_string() };
            return Err(LockedError(format!(
                "{folder_for_messages} is locked by {who}; only one run per destination at a time"
            ))
            .into());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot lock {folder_for_messages}")),
    }
    // Shared holders can't all write their name: only the exclusive one does.
    if op == FlockOperation::NonBlockingLockExclusive {
        let started = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC");
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "pid {} ({what}, started {started})", std::process::id())?;
    }
    Ok(Lock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    // flock belongs to an open file description: two opens in one process
    // contend like two processes do.
    fn meta_dir() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        (tmp, dir)
    }

    #[test]
    fn a_second_run_is_refused_naming_the_holder_and_gets_the_lock_once_it_is_dropped() {
        let (_tmp, dir) = meta_dir();
        let first = acquire(&dir, "backup", "/bk/web.*").unwrap();
        let err = acquire(&dir, "continue", "/bk/web.*").unwrap_err();
        let locked = err.downcast_ref::<LockedError>().expect("a LockedError, for exit code 75");
        let text = locked.0.clone();
        assert!(text.contains("/bk/web.*"), "{text}");
        assert!(text.contains(&format!("pid {} (backup, started ", std::process::id())), "{text}");
        drop(first);
        acquire(&dir, "continue", "/bk/web.*").expect("free once the holder is gone");
    }

    #[test]
    fn readers_share_and_prune_waits_for_them() {
        let (_tmp, dir) = meta_dir();
        let a = acquire_readers(&dir, "restore", "f").unwrap();
        let b = acquire_readers(&dir, "verify", "f").unwrap();
        assert!(acquire_readers_exclusive(&dir, "prune", "f").is_err(), "prune must not delete what is read");
        drop((a, b));
        let prune = acquire_readers_exclusive(&dir, "prune", "f").unwrap();
        assert!(acquire_readers(&dir, "restore", "f").is_err(), "no reader starts while prune deletes");
        // The run lock is another file: a backup runs beside a reader.
        let _run = acquire(&dir, "backup", "f").unwrap();
        drop(prune);
    }

    #[test]
    fn a_symlink_planted_as_the_lock_file_is_not_followed() {
        let (tmp, dir) = meta_dir();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("lock")).unwrap();
        let err = acquire(&dir, "backup", "f").unwrap_err();
        assert!(format!("{err:#}").contains("cannot open the lock file"), "{err:#}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
