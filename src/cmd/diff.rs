//! `diff A B`: what changed between two snapshots — added, removed, changed
//! content, changed metadata only — from their manifests when both have one
//! with the same digest version (no file is read), else by walking both
//! trees (files that are one inode in both are equal without being read).

use std::cmp::Ordering;

use anyhow::{Context, Result};

use crate::config::Job;
use crate::digest::Version;
use crate::error::Code;
use crate::fs::safefs::Shown;
use crate::store::manifest::{self, Kind, ManifestReader, Record, dfs_cmp};
use crate::store::reader::{Item, Walk};
use crate::store::select::pick;
use crate::store::{Snapshot, Store};
use crate::{info, store::lock};

/// How an entry differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Added,
    Removed,
    Content,
    Metadata,
}

impl Change {
    fn word(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Content => "changed",
            Change::Metadata => "metadata",
        }
    }
}

/// A source of records in listing order: a manifest, or a tree being walked.
enum Side {
    Manifest(ManifestReader),
    Tree(Walk),
}

impl Side {
    fn next(&mut self) -> Result<Option<(Record, Option<Item>)>> {
        match self {
            Side::Manifest(r) => Ok(r.next_record()?.map(|r| (r, None))),
            Side::Tree(w) => match w.next() {
                None => Ok(None),
                Some(item) => {
                    let item = item?;
                    Ok(Some((item.record()?, Some(item))))
                }
            },
        }
    }
}

/// Prints the differences between snapshots `a` and `b`.
pub fn run(job: &Job, a: &str, b: &str) -> Result<Code> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    let folder_shown = crate::store::shown(&job.backups_folder, &job.name);
    store.require_snapshots()?;
    let _lock = lock::acquire_readers(&store.meta_dir()?, "diff", &folder_shown)?;
    let snaps = store.snapshots()?;
    let (sa, sb) = (pick(&snaps, &job.name, Some(a))?, pick(&snaps, &job.name, Some(b))?);
    let changes = diff(&store, &sa, &sb)?;
    let mut counts = [0u64; 4];
    let mut out = std::io::stdout().lock();
    let mut reading = true;
    for (change, path) in &changes {
        // A reader that stops early (`| head`) is not an error: stop writing.
        if reading {
            let shown = if path.is_empty() { ".".into() } else { format!("{:#}", Shown(path)) };
            reading = std::io::Write::write_fmt(&mut out, format_args!("{:<9}{shown}\n", change.word())).is_ok();
        }
        counts[*change as usize] += 1;
    }
    drop(out);
    info!(
        "{} → {}: {} added, {} removed, {} changed, {} metadata only",
        sa.folder, sb.folder, counts[0], counts[1], counts[2], counts[3]
    );
    Ok(Code::Ok)
}

/// The changes from `a` to `b`, in listing order.
pub fn diff(store: &Store, a: &Snapshot, b: &Snapshot) -> Result<Vec<(Change, Vec<u8>)>> {
    let folder = manifest::folder(&store.meta_dir()?)?;
    let open = |s: &Snapshot| ManifestReader::open(&folder, manifest::file_name(&s.folder).as_bytes());
    let (mut left, mut right) = match (open(a)?, open(b)?) {
        (Some(x), Some(y)) if x.digest() == y.digest() => (Side::Manifest(x), Side::Manifest(y)),
        (Some(_), Some(_)) => {
            info!("comparing the trees (the manifests record content digests of different versions)");
            (Side::Tree(Walk::new(store.open_snapshot(a)?)), Side::Tree(Walk::new(store.open_snapshot(b)?)))
        }
        _ => {
            info!("comparing the trees (one of the snapshots has no manifest)");
            (Side::Tree(Walk::new(store.open_snapshot(a)?)), Side::Tree(Walk::new(store.open_snapshot(b)?)))
        }
    };
    let mut out = Vec::new();
    let (mut l, mut r) = (left.next()?, right.next()?);
    loop {
        match (&l, &r) {
            (None, None) => break,
            (Some((x, _)), None) => {
                out.push((Change::Removed, x.path.clone()));
                l = left.next()?;
            }
            (None, Some((y, _))) => {
                out.push((Change::Added, y.path.clone()));
                r = right.next()?;
            }
            (Some((x, xi)), Some((y, yi))) => match dfs_cmp(&x.path, &y.path) {
                Ordering::Less => {
                    out.push((Change::Removed, x.path.clone()));
                    l = left.next()?;
                }
                Ordering::Greater => {
                    out.push((Change::Added, y.path.clone()));
                    r = right.next()?;
                }
                Ordering::Equal => {
                    if let Some(c) = compare(x, xi.as_ref(), y, yi.as_ref())
                        .with_context(|| format!("comparing {}", Shown(&x.path)))?
                    {
                        out.push((c, x.path.clone()));
                    }
                    l = left.next()?;
                    r = right.next()?;
                }
            },
        }
    }
    Ok(out)
}

/// How `b` differs from `a` (same path), if it does.
fn compare(a: &Record, ai: Option<&Item>, b: &Record, bi: Option<&Item>) -> Result<Option<Change>> {
    let content_differs = if a.kind != b.kind || a.target != b.target || a.rdev != b.rdev {
        true
    } else if a.kind != Kind::File {
        false
    } else if a.size != b.size {
        true
    } else if let (Some(x), Some(y)) = (a.hash, b.hash) {
        x != y
    } else if let (Some(x), Some(y)) = (ai, bi) {
        // Walking trees: one inode is one content; otherwise read both.
        let digest = |i: &Item| i.digest(Version::V2).map(|d| d.hash);
        !(x.stat.st_dev == y.stat.st_dev && x.stat.st_ino == y.stat.st_ino) && digest(x)? != digest(y)?
    } else {
        // Manifests without hashes: size and mtime are all there is.
        (a.mtime, a.mtime_nsec) != (b.mtime, b.mtime_nsec)
    };
    if content_differs {
        return Ok(Some(Change::Content));
    }
    let meta = |r: &Record| (r.mode, r.uid, r.gid, r.mtime, r.mtime_nsec, r.xattrs);
    // A directory's mtime moves whenever its children do: not a change of its own.
    let differs = if a.kind == Kind::Dir {
        (a.mode, a.uid, a.gid, a.xattrs) != (b.mode, b.uid, b.gid, b.xattrs)
    } else {
        meta(a) != meta(b)
    };
    Ok(differs.then_some(Change::Metadata))
}
