//! The one place with `unsafe`: memory-mapping a basis file for delta work,
//! and giving a thread a working directory of its own.
//!
//! ## Maps
//!
//! `fast_rsync` needs the whole basis as a slice. A map is only ever made of a
//! file inside a snapshot or an interrupted snapshot, which rbackup never
//! writes to after creating it (docs/design.md rule 1), and which lives in a backups
//! folder only root can enter. The remaining risk is another root process
//! truncating that file while it is mapped, which would raise SIGBUS; a live
//! server file is never mapped (restores read their basis into memory).
//!
//! ## A thread's own working directory
//!
//! The walker reads each entry's xattrs by name. `lgetxattr` takes no
//! directory handle, and a procfs path (`/proc/self/fd/N/name`) costs several
//! lookups; a name relative to the working directory costs one. The walker
//! thread unshares its filesystem context (`CLONE_FS`) and changes into each
//! directory it lists, without moving any other thread's working directory.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// A read-only map of a whole file.
pub struct Mapped(memmap2::Mmap);

impl Mapped {
    /// Maps `file`, which must be a regular file of a snapshot.
    pub fn new(file: &File) -> io::Result<Mapped> {
        // SAFETY: the file belongs to a snapshot, which is immutable (see the
        // module doc); the map is read-only and private to this process.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(Mapped(map))
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Gives the calling thread its own working directory (and root and umask),
/// so that it may `fchdir` without moving the rest of the process.
pub fn private_cwd() -> io::Result<()> {
    // SAFETY: `FS` unshares only the working directory, root and umask; the
    // file descriptor table stays shared, which is what makes `unshare`
    // unsafe in general (`FILES`).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.map_err(io::Error::from)
}
