//! Deleting a whole snapshot fast: several threads unlink files in parallel,
//! then the directories go, deepest first.
//!
//! Unlinking is metadata work in the kernel (inodes, directory blocks,
//! journal), so it scales with threads while `rm -rf` does one at a time.
//! Entries are removed in inode order within a directory, which keeps the
//! inode table reads of a big directory sequential. Nothing is followed: a
//! symlink is unlinked, a directory is opened beneath the top with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`. The caller has already moved the
//! tree where no command takes it for a snapshot, so a delete cut short is
//! simply finished later.
//!
//! Bounded whatever the tree's shape: the queue holds paths, not open
//! directories (a worker holds one at a time), and no path is more than
//! [`REMOVE_DEPTH`] directories deep — a directory found deeper is first
//! renamed to the top under a temporary name, and cleared from there. So
//! opening a directory, and removing it at the end, costs at most that many
//! name lookups, and a chain 20,000 deep is removed in time linear in its
//! length (it used to cost a path walk from the top per directory).

use std::sync::{Condvar, Mutex};

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, FileType, RenameFlags};

use crate::fs::safefs::{Dir, REMOVE_DEPTH, Shown, join, libc_errno, temp_name};

/// Threads used to delete.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get).clamp(2, 8) * 2
}

struct Queue {
    /// Directories still to clear, by path beneath the top.
    work: Vec<Vec<u8>>,
    busy: usize,
    /// Every directory found, by path beneath the top.
    dirs: Vec<Vec<u8>>,
    error: Option<anyhow::Error>,
}

/// Removes `name` in `parent` and everything beneath it.
pub fn remove_tree(parent: &Dir, name: &[u8]) -> Result<()> {
    let top = match parent.open_dir(name) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc_errno::ENOTDIR) || e.raw_os_error() == Some(libc_errno::ELOOP) => {
            return parent.unlink(name).context("removing");
        }
        Err(e) => return Err(e).context("opening the tree to delete"),
    };
    let queue = Mutex::new(Queue { work: vec![Vec::new()], busy: 0, dirs: Vec::new(), error: None });
    let wake = Condvar::new();
    std::thread::scope(|s| {
        for _ in 0..threads() {
            s.spawn(|| worker(&top, &queue, &wake));
        }
    });
    let mut q = queue.into_inner().expect("deleter lock");
    if let Some(e) = q.error.take() {
        return Err(e);
    }
    // Directories, deepest first: each is empty once its children are gone.
    q.dirs.sort_by_key(|d| std::cmp::Reverse(depth(d)));
    for rel in &q.dirs {
        let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (top.resolve_dir(&rel[..i])?, &rel[i + 1..]),
            None => (top.clone(), &rel[..]),
        };
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)
            .with_context(|| format!("removing directory {}", Shown(rel)))?;
    }
    drop(top);
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR).context("removing the top directory")?;
    Ok(())
}

/// Directories in a path beneath the top (0 for the top itself).
#[allow(clippy::naive_bytecount)] // at most REMOVE_DEPTH per path, not worth a crate
fn depth(rel: &[u8]) -> usize {
    if rel.is_empty() { 0 } else { 1 + rel.iter().filter(|&&b| b == b'/').count() }
}

fn worker(top: &Dir, queue: &Mutex<Queue>, wake: &Condvar) {
    loop {
        let rel = {
            let mut q = queue.lock().expect("deleter lock");
            loop {
                if q.error.is_some() {
                    return;
                }
                if let Some(job) = q.work.pop() {
                    q.busy += 1;
                    break job;
                }
                if q.busy == 0 {
                    wake.notify_all();
                    return;
                }
                q = wake.wait(q).expect("deleter lock");
            }
        };
        let result = clear_files(top, &rel);
        let mut q = queue.lock().expect("deleter lock");
        q.busy -= 1;
        match result {
            Ok(subdirs) => {
                q.dirs.extend(subdirs.iter().cloned());
                q.work.extend(subdirs);
            }
            Err(e) => q.error = Some(e),
        }
        wake.notify_all();
    }
}

/// Unlinks every non-directory in the directory `rel` beneath `top`;
/// returns the paths of its subdirectories, those too deep moved to the top.
fn clear_files(top: &Dir, rel: &[u8]) -> Result<Vec<Vec<u8>>> {
    let dir = if rel.is_empty() {
        top.clone()
    } else {
        top.resolve_dir(rel).with_context(|| format!("opening {}", Shown(rel)))?
    };
    let mut entries = dir.entries()?;
    // In inode order: the disk is read in its own order, not the names'.
    entries.sort_unstable_by_key(|e| e.0);
    let mut subdirs = Vec::new();
    for (_, name, ft) in entries {
        let is_dir = match ft {
            FileType::Directory => true,
            FileType::Unknown => {
                dir.stat(&name).is_ok_and(|st| crate::fs::safefs::file_type(&st) == FileType::Directory)
            }
            _ => false,
        };
        if !is_dir {
            match rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", Shown(&join(rel, &name)))),
            }
        } else if depth(rel) + 1 < REMOVE_DEPTH {
            subdirs.push(join(rel, &name));
        } else {
            let temp = temp_name();
            rustix::fs::renameat_with(&dir, name.as_slice(), top, temp.as_slice(), RenameFlags::NOREPLACE)
                .with_context(|| format!("moving {} up to be removed", Shown(&join(rel, &name))))?;
            subdirs.push(temp);
        }
    }
    Ok(subdirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_a_deep_tree_and_never_follows_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        let tree = tmp.path().join("tree");
        for i in 0..30 {
            let d = tree.join(format!("d{i}/e{}", i % 3));
            std::fs::create_dir_all(&d).unwrap();
            for j in 0..20 {
                std::fs::write(d.join(format!("f{j}")), b"x").unwrap();
            }
        }
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("d0/link")).unwrap();
        let parent = Dir::open_path(tmp.path()).unwrap();
        remove_tree(&parent, b"tree").unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        // Missing is fine.
        remove_tree(&parent, b"tree").unwrap();
    }

    #[test]
    fn removes_a_chain_deeper_than_it_works_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = Dir::open_path(tmp.path()).unwrap();
        let mut d = parent.create_dir(b"tree").unwrap();
        for i in 0..(4 * REMOVE_DEPTH) {
            for f in [&b"f"[..], b"g"] {
                rustix::fs::openat(
                    &d,
                    f,
                    rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::from_raw_mode(0o600),
                )
                .unwrap();
            }
            if i % 7 == 0 {
                d.create_dir(b"side").unwrap();
            }
            d = d.create_dir(b"d").unwrap();
        }
        drop(d);
        remove_tree(&parent, b"tree").unwrap();
        assert!(parent.names().unwrap().is_empty());
    }
}
