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
