//! Reading a snapshot on the desktop, entry by entry, in the listing's order
//! (depth first, names sorted bytewise): what `verify`, `diff` and `list`
//! walk. Through directory handles like everything else: nothing followed,
//! long paths fine, and a bounded number of them open whatever the depth
//! ([`Chain`]).

use std::io;

use rustix::fs::{FileType, Stat};

use crate::digest::{FileDigest, Version};
use crate::fs::meta;
use crate::fs::safefs::{Chain, Dir, Shown, file_type, join};
use crate::store::manifest::{Kind, Record, xattr_digest};

/// One entry of a tree.
pub struct Item {
    /// Relative path; empty for the root.
    pub rel: Vec<u8>,
    /// The directory holding it (the root holds itself).
    pub parent: Dir,
    pub name: Vec<u8>,
    pub stat: Stat,
}

impl Item {
    pub fn kind(&self) -> Option<Kind> {
        Some(match file_type(&self.stat) {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => Kind::File,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::CharacterDevice => Kind::Char,
            FileType::BlockDevice => Kind::Block,
            _ => return None,
        })
    }

    /// The entry as a manifest record (without the content hash).
    pub fn record(&self) -> io::Result<Record> {
        let xattrs = if self.rel.is_empty() {
            meta::read_dir_xattrs(&self.parent)?
        } else {
            meta::read_xattrs(&self.parent, &self.name)?
        };
        let kind = self.kind().unwrap_or(Kind::File);
        let target = if kind == Kind::Symlink { Some(self.parent.read_link(&self.name)?) } else { None };
        Ok(Record {
            path: self.rel.clone(),
            kind,
            size: if kind == Kind::File { self.stat.st_size as u64 } else { 0 },
            mtime: self.stat.st_mtime,
            mtime_nsec: self.stat.st_mtime_nsec as u32,
            mode: self.stat.st_mode & meta::MODE_BITS,
            uid: self.stat.st_uid,
            gid: self.stat.st_gid,
            target,
            rdev: if matches!(kind, Kind::Char | Kind::Block) { self.stat.st_rdev } else { 0 },
            xattrs: xattr_digest(&xattrs),
            hash: None,
        })
    }

    /// The content digest of a regular file, of `version`: version 2 reads
    /// only its data extents.
    pub fn digest(&self, version: Version) -> io::Result<FileDigest> {
        let file = self.parent.open_file(&self.name)?;
        crate::digest::of_file(&file, version)
    }
}

/// Iterates a tree; see the module doc.
pub struct Walk {
    root: Option<Dir>,
    /// Where the walk is, holding a bounded number of descriptors.
    chain: Option<Chain>,
    /// The names still to visit at each level, the root's first.
    names: Vec<std::vec::IntoIter<Vec<u8>>>,
    /// The current directory's path, and where it ended one level up.
    rel: Vec<u8>,
    rel_ends: Vec<usize>,
}

impl Walk {
    pub fn new(root: Dir) -> Walk {
        Walk { root: Some(root), chain: None, names: Vec::new(), rel: Vec::new(), rel_ends: Vec::new() }
    }

    fn step(&mut self) -> io::Result<Option<Item>> {
        if let Some(root) = self.root.take() {
            let stat = root.stat_self()?;
            self.names.push(root.names()?.into_iter());
            self.chain = Some(Chain::new(root.clone()));
            return Ok(Some(Item { rel: Vec::new(), parent: root, name: Vec::new(), stat }));
        }
        let Some(chain) = self.chain.as_mut() else { return Ok(None) };
        loop {
            let Some(level) = self.names.last_mut() else { return Ok(None) };
            let Some(name) = level.next() else {
                self.names.pop();
                if let Some(end) = self.rel_ends.pop() {
                    chain.pop();
                    self.rel.truncate(end);
                }
                continue;
            };
            let rel = join(&self.rel, &name);
            let at = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", Shown(&rel)));
            let dir = chain.top().map_err(at)?.expect("a walked directory exists");
            let stat = dir.stat(&name).map_err(at)?;
            if file_type(&stat) == FileType::Directory {
                let child = dir.open_dir(&name).map_err(at)?;
                let names = child.names().map_err(at)?;
                chain.push(&name, child.clone(), &child.stat_self().map_err(at)?);
                self.names.push(names.into_iter());
                self.rel_ends.push(self.rel.len());
                self.rel.clone_from(&rel);
            }
            return Ok(Some(Item { rel, parent: dir, name, stat }));
        }
    }
}

impl Iterator for Walk {
    type Item = io::Result<Item>;

    fn next(&mut self) -> Option<io::Result<Item>> {
        self.step().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_depth_first_in_sorted_order() {
        let tmp = tempfile::tempdir().unwrap();
        for p in ["b/x", "a/c/d", "a.txt", "a/b"] {
            let p = tmp.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let paths: Vec<Vec<u8>> = Walk::new(Dir::open_path(tmp.path()).unwrap()).map(|i| i.unwrap().rel).collect();
        let want: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/c", b"a/c/d", b"a.txt", b"b", b"b/x"];
        assert_eq!(paths, want);
        let mut sorted = paths.clone();
        sorted.sort_by(|a, b| crate::store::manifest::dfs_cmp(a, b));
        assert_eq!(paths, sorted, "the walk's order is the manifests' order");
    }
}
