//! What the agent lists: the root, or chosen paths beneath it (a restore
//! of some paths, or a backup job's `paths`), minus the excluded (gitignore
//! syntax, relative to the root), optionally without crossing into other
//! filesystems.

use anyhow::{Context, Result};
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// What the source lists.
#[derive(Default)]
pub struct Selection {
    excludes: Option<Gitignore>,
    pub(super) only: Vec<Vec<u8>>,
    /// Open every regular file while listing; list those that can't be read
    /// as unreadable (`rbackup check`).
    pub probe_read: bool,
    /// Directories listed as partial, so that the sink removes nothing from
    /// them that the listing lacks (a restore with `--delete` from a
    /// snapshot that lacks something of theirs). Sorted.
    pub keep_unlisted: Vec<Vec<u8>>,
    /// Don't descend into a directory on another filesystem than the
    /// root's: list it as an empty directory (rsync's `-x`).
    pub one_file_system: bool,
    /// The listing is the whole of what the sink should hold (a backup of
    /// chosen paths): directories on the way to them are listed as
    /// complete, so a resumed snapshot sheds what is no longer chosen.
    /// Without it (a restore of chosen paths) they are listed as partial:
    /// the destination keeps what the listing lacks.
    pub whole_on_the_way: bool,
}

impl Selection {
    /// Gitignore-style `excludes` (relative to the root) and, if not empty,
    /// `only` these relative paths.
    pub fn new(excludes: &[String], only: &[Vec<u8>]) -> Result<Selection> {
        let excludes = if excludes.is_empty() {
            None
        } else {
            let mut b = GitignoreBuilder::new(".");
            for pattern in excludes {
                b.add_line(None, pattern).with_context(|| format!("bad exclude pattern {pattern:?}"))?;
            }
            Some(b.build().context("building the exclude patterns")?)
        };
        let only = only
            .iter()
            .map(|p| p.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect::<Vec<_>>().join(&b'/'))
            .collect();
        Ok(Selection { excludes, only, ..Selection::default() })
    }

    /// Whether the directory `rel` is listed as partial (`keep_unlisted`).
    pub(super) fn keeps_unlisted(&self, rel: &[u8]) -> bool {
        self.keep_unlisted.binary_search_by(|k| k.as_slice().cmp(rel)).is_ok()
    }

    pub(super) fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.excludes.as_ref().is_some_and(|g| g.matched(std::ffi::OsStr::from_bytes(rel), is_dir).is_ignore())
    }

    /// Whether the directory `rel` is left out of the listing, itself or
    /// through one of its parents (the walk never enters an excluded one).
    pub fn leaves_out_dir(&self, rel: &[u8]) -> bool {
        let mut end = 0;
        while end < rel.len() {
            end = rel[end..].iter().position(|&b| b == b'/').map_or(rel.len(), |i| end + i);
            if end > 0 && self.excluded(&rel[..end], true) {
                return true;
            }
            end += 1;
        }
        false
    }

    /// The chosen paths' next names beneath directory `rel` that `names` (its
    /// sorted entries) lacks: a path the job names that isn't there must be
    /// said, not skipped in silence (a typo in `paths` would back up nothing).
    pub(super) fn missing_beneath(&self, rel: &[u8], names: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut missing: Vec<Vec<u8>> = Vec::new();
        for p in &self.only {
            if p.is_empty() || !is_within(p, rel) || p.as_slice() == rel {
                continue;
            }
            let below = if rel.is_empty() { &p[..] } else { &p[rel.len() + 1..] };
            let next = below.split(|&b| b == b'/').next().unwrap_or_default();
            if names.binary_search_by(|n| n.as_slice().cmp(next)).is_err() && !missing.iter().any(|m| m == next) {
                missing.push(next.to_vec());
            }
        }
        missing
    }

    /// Whether `rel` is listed: `Some(true)` wholly, `Some(false)` only as a
    /// directory on the way to a chosen path, `None` not at all.
    pub(super) fn chosen(&self, rel: &[u8]) -> Option<bool> {
        if self.only.is_empty() {
            return Some(true);
        }
        let mut on_the_way = false;
        for p in &self.only {
            if p.is_empty() || is_within(rel, p) {
                return Some(true);
            }
            if is_within(p, rel) {
                on_the_way = true;
            }
        }
        on_the_way.then_some(false)
    }
}

/// `path` equals `dir` or lies beneath it (everything lies beneath the root, `""`).
pub(super) fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_of_chosen_paths() {
        let s = Selection::new(&[], &[b"a/b".to_vec(), b"/c/".to_vec()]).unwrap();
        assert_eq!(s.chosen(b""), Some(false));
        assert_eq!(s.chosen(b"a"), Some(false));
        assert_eq!(s.chosen(b"a/b"), Some(true));
        assert_eq!(s.chosen(b"a/b/x"), Some(true));
        assert_eq!(s.chosen(b"a/bx"), None);
        assert_eq!(s.chosen(b"c"), Some(true));
        assert_eq!(s.chosen(b"d"), None);
        assert_eq!(Selection::default().chosen(b"x"), Some(true));
    }

    #[test]
    fn a_directory_is_left_out_through_its_parents() {
        let s = Selection::new(&["/var/cache/".into(), "*.tmp".into()], &[]).unwrap();
        assert!(s.leaves_out_dir(b"var/cache"));
        assert!(s.leaves_out_dir(b"var/cache/backups/x"));
        assert!(s.leaves_out_dir(b"home/a.tmp/bk"));
        assert!(!s.leaves_out_dir(b"var/lib/backups"));
        assert!(!s.leaves_out_dir(b"cache/var"));
        assert!(!Selection::new(&[], &[]).unwrap().leaves_out_dir(b"var/cache"));
    }

    #[test]
    fn excludes_are_gitignore_style_and_relative() {
        let s = Selection::new(&["/cache/".into(), "*.tmp".into(), "!keep.tmp".into()], &[]).unwrap();
        assert!(s.excluded(b"cache", true));
        assert!(!s.excluded(b"cache", false));
        assert!(!s.excluded(b"sub/cache", true));
        assert!(s.excluded(b"x/y.tmp", false));
        assert!(!s.excluded(b"x/keep.tmp", false));
        assert!(!s.excluded(b"\xff.txt", false));
    }
}
