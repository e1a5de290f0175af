//! What happened to one path from one snapshot to the next: pure decisions
//! on two sightings of it, kept apart from the I/O so that every case is
//! unit-tested on records alone.
//!
//! Content is "the same" only when something proves it: equal digests of
//! the same digest version, or one inode in both snapshots (a hardlink
//! between snapshots is one content, docs/design.md rule 1). Different
//! sizes, types or symlink targets prove a change. When nothing proves
//! either — two digest versions, or a snapshot without a manifest holding a
//! copy rather than a link — the answer is `unknown`, never a guess.

use crate::digest::Version;
use crate::store::manifest::{Kind, Record};
pub use crate::store::select::normalize;

/// Where a sighting's record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The snapshot's manifest, whose hashes are of this digest version.
    Manifest(Version),
    /// `lstat` in the snapshot folder (it has no usable manifest).
    Tree,
}

/// The path as one snapshot holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub record: Record,
    pub source: Source,
    /// `(st_dev, st_ino)` in the snapshot folder: always known for a
    /// [`Source::Tree`] sighting, looked up for a manifest's one only when
    /// its digest can't decide.
    pub inode: Option<(u64, u64)>,
}

/// What a snapshot's row says about the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// First seen, or back after being absent.
    New,
    /// Other content: bytes, size, type, symlink target or device number.
    Changed,
    /// The same content with another mode, owner, mtime or xattrs.
    Metadata,
    Same,
    /// Present in both, but nothing proves whether the content is the same.
    Unknown,
    /// Absent here, present in the snapshot before.
    Deleted,
}

impl Change {
    pub fn word(self) -> &'static str {
        match self {
            Change::New => "new",
            Change::Changed => "changed",
            Change::Metadata => "metadata",
            Change::Same => "same",
            Change::Unknown => "unknown",
            Change::Deleted => "deleted",
        }
    }

    /// Whether this row holds content no earlier row of the run shows.
    pub fn new_content(self) -> bool {
        matches!(self, Change::New | Change::Changed | Change::Unknown)
    }
}

/// Whether `a` and `b` (the same path in two snapshots) hold the same
/// content: `Some(true)` or `Some(false)` when proven, `None` when not.
pub fn same_content(a: &Seen, b: &Seen) -> Option<bool> {
    let (x, y) = (&a.record, &b.record);
    if x.kind != y.kind || x.target != y.target || x.rdev != y.rdev {
        return Some(false);
    }
    if x.kind != Kind::File {
        return Some(true);
    }
    if x.size != y.size {
        return Some(false);
    }
    if let (Source::Manifest(va), Source::Manifest(vb), Some(ha), Some(hb)) = (a.source, b.source, x.hash, y.hash)
        && va == vb
    {
        return Some(ha == hb);
    }
    match (a.inode, b.inode) {
        (Some(ia), Some(ib)) if ia == ib => Some(true),
        _ => None,
    }
}

/// Whether [`same_content`] could decide with the inodes of both sightings,
/// where it can't without them.
pub fn needs_inodes(a: &Seen, b: &Seen) -> bool {
    same_content(a, b).is_none() && (a.inode.is_none() || b.inode.is_none())
}

/// The row of `cur`, given the sighting in the snapshot just before
/// (`None` if the path was absent there or this is the first snapshot).
pub fn classify(prev: Option<&Seen>, cur: &Seen) -> Change {
    let Some(prev) = prev else { return Change::New };
    match same_content(prev, cur) {
        Some(false) => Change::Changed,
        None => Change::Unknown,
        Some(true) if metadata_differs(&prev.record, &cur.record) => Change::Metadata,
        Some(true) => Change::Same,
    }
}

/// Mode, owner, mtime or xattrs differ. A directory's mtime moves whenever
/// an entry in it does: not a change of its own (as in `diff`).
fn metadata_differs(a: &Record, b: &Record) -> bool {
    let owner = |r: &Record| (r.mode, r.uid, r.gid, r.xattrs);
    owner(a) != owner(b) || (a.kind != Kind::Dir && (a.mtime, a.mtime_nsec) != (b.mtime, b.mtime_nsec))
}

/// One snapshot's answer: the path is there, or it is not.
pub type Sighting = Option<Seen>;

/// The rows of a path's history from its sightings, oldest snapshot first:
/// `(index of the snapshot, change)` for every snapshot holding the path,
/// and a [`Change::Deleted`] row for the first one without it after one
/// with it. The caller fills in inodes where [`needs_inodes`] says so first.
pub fn rows(sightings: &[Sighting]) -> Vec<(usize, Change)> {
    let mut out = Vec::new();
    let mut prev: Option<&Seen> = None;
    for (i, s) in sightings.iter().enumerate() {
        match s {
            Some(cur) => {
                out.push((i, classify(prev, cur)));
                prev = Some(cur);
            }
            None => {
                if prev.take().is_some() {
                    out.push((i, Change::Deleted));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(hash: u8, size: u64) -> Seen {
        Seen {
            record: Record {
                path: b"f".to_vec(),
                kind: Kind::File,
                size,
                mtime: 100,
                mtime_nsec: 5,
                mode: 0o644,
                uid: 1000,
                gid: 1000,
                target: None,
                rdev: 0,
                xattrs: [0; 16],
                hash: Some([hash; 32]),
            },
            source: Source::Manifest(Version::V2),
            inode: None,
        }
    }

    #[test]
    fn the_words_of_a_files_life() {
        let a = file(1, 5);
        assert_eq!(classify(None, &a), Change::New);
        assert_eq!(classify(Some(&a), &a.clone()), Change::Same);
        assert_eq!(classify(Some(&a), &file(2, 5)), Change::Changed, "same size, other digest");
        assert_eq!(classify(Some(&a), &file(1, 6)), Change::Changed, "other size");
        let mut chmodded = a.clone();
        chmodded.record.mode = 0o600;
        assert_eq!(classify(Some(&a), &chmodded), Change::Metadata);
        let mut touched = a.clone();
        touched.record.mtime_nsec = 6;
        assert_eq!(classify(Some(&a), &touched), Change::Metadata);
        let mut chowned = a.clone();
        chowned.record.gid = 0;
        assert_eq!(classify(Some(&a), &chowned), Change::Metadata);
        let mut xattr = a.clone();
        xattr.record.xattrs = [1; 16];
        assert_eq!(classify(Some(&a), &xattr), Change::Metadata);
        // Content wins over metadata.
        let mut both = file(3, 5);
        both.record.mode = 0o600;
        assert_eq!(classify(Some(&a), &both), Change::Changed);
    }

    #[test]
    fn deleted_once_and_new_again_after_a_gap() {
        let (a, b) = (Some(file(1, 5)), Some(file(2, 5)));
        let s = vec![None, a.clone(), a.clone(), None, None, b.clone(), b];
        assert_eq!(
            rows(&s),
            vec![(1, Change::New), (2, Change::Same), (3, Change::Deleted), (5, Change::New), (6, Change::Same)]
        );
        assert!(rows(&[None, None]).is_empty());
    }

    #[test]
    fn digests_of_different_versions_prove_nothing_but_one_inode_does() {
        let a = file(1, 5);
        let mut old = file(9, 5);
        old.source = Source::Manifest(Version::V1);
        assert_eq!(same_content(&old, &a), None);
        assert!(needs_inodes(&old, &a));
        assert_eq!(classify(Some(&old), &a), Change::Unknown);
        old.inode = Some((1, 42));
        let mut linked = a.clone();
        linked.inode = Some((1, 42));
        assert_eq!(classify(Some(&old), &linked), Change::Same);
        linked.inode = Some((1, 43));
        assert_eq!(classify(Some(&old), &linked), Change::Unknown, "a copy may hold the same bytes");
        assert!(!needs_inodes(&old, &linked));
    }

    #[test]
    fn a_tree_sighting_is_compared_by_inode_or_by_size() {
        let a = file(1, 5);
        let mut t = file(0, 5);
        t.record.hash = None;
        t.source = Source::Tree;
        t.inode = Some((1, 7));
        assert_eq!(same_content(&a, &t), None);
        let mut grown = t.clone();
        grown.record.size = 6;
        assert_eq!(classify(Some(&a), &grown), Change::Changed, "a size proves a change without a digest");
        let mut a_linked = a.clone();
        a_linked.inode = Some((1, 7));
        assert_eq!(classify(Some(&a_linked), &t), Change::Same);
    }

    #[test]
    fn types_targets_and_directories() {
        let f = file(1, 5);
        let mut dir = f.clone();
        dir.record.kind = Kind::Dir;
        dir.record.size = 0;
        dir.record.hash = None;
        assert_eq!(classify(Some(&f), &dir), Change::Changed, "a file became a directory");
        let mut dir_later = dir.clone();
        dir_later.record.mtime += 60;
        assert_eq!(classify(Some(&dir), &dir_later), Change::Same, "a directory's mtime follows its entries");
        dir_later.record.mode = 0o700;
        assert_eq!(classify(Some(&dir), &dir_later), Change::Metadata);
        let mut link = dir.clone();
        link.record.kind = Kind::Symlink;
        link.record.target = Some(b"a".to_vec());
        let mut relinked = link.clone();
        relinked.record.target = Some(b"b".to_vec());
        assert_eq!(classify(Some(&link), &relinked), Change::Changed);
        assert_eq!(classify(Some(&link), &link.clone()), Change::Same);
    }

    #[test]
    fn paths_are_relative_and_cannot_climb() {
        assert_eq!(normalize(b"/etc//passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize(b"./home/alice/").unwrap(), b"home/alice");
        assert_eq!(normalize(b"/").unwrap(), b"");
        assert_eq!(normalize(b"a\xffb").unwrap(), b"a\xffb", "names are bytes");
        assert!(normalize(b"a/../../etc").is_err());
        assert!(normalize(b"..").is_err());
        assert!(normalize(b"a..b").is_ok(), "only a `..` component climbs");
    }
}
