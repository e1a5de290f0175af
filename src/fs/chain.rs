//! A depth-first walk's directories with a bounded number of descriptors
//! (see [`Chain`]).

use std::io;

use rustix::fs::Stat;

use super::name::{Shown, join};
use super::safefs::Dir;

/// Most levels below its root for which a [`Chain`] keeps a descriptor.
pub const HELD_LEVELS: usize = 16;

/// Where a depth-first walk is: the directories from a root down to the
/// current one, with a descriptor for the root and for the deepest
/// [`HELD_LEVELS`] levels only, so that a walk holds a bounded number of
/// descriptors however deep the tree (a hostile server can make it as deep
/// as it likes; `RLIMIT_NOFILE` is often 1024).
///
/// A level keeps its name and the identity (`st_dev`, `st_ino`) of the
/// directory entered. When the walk climbs back to a level whose descriptor
/// was let go, that level and the ones just above it (up to
/// [`HELD_LEVELS`] of them) are opened again: the shallowest by its path
/// from the root through [`Dir::resolve_dir`] (`RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS`, so it can't leave the root or follow a symlink),
/// the others by name from the one above, and each must be the directory
/// first entered, else the walk fails with [`Moved`]. Descriptors are let
/// go shallowest first, so the held levels are always the deepest ones, and
/// one path walk serves [`HELD_LEVELS`] climbs: climbing out of a chain `D`
/// deep costs about `D² / (2 × HELD_LEVELS)` name lookups in the kernel (a
/// few million for 20,000 levels), and nothing for trees less deep than
/// [`HELD_LEVELS`].
///
/// Levels below a directory that doesn't exist (a basis without it, a dry
/// run's directory not yet created) are absent: [`Chain::top`] is `None`.
pub struct Chain {
    root: Option<Dir>,
    levels: Vec<Level>,
    /// Absent levels below the last present one.
    absent: usize,
}

struct Level {
    name: Vec<u8>,
    id: (u64, u64),
    dir: Option<Dir>,
}

/// A directory a [`Chain`] opened again is not the one it entered: it was
/// moved or replaced during the run.
#[derive(Debug, thiserror::Error)]
#[error("directory {path} was moved or replaced during the run")]
pub struct Moved {
    pub path: String,
}

impl Chain {
    /// A walk standing at `root`.
    pub fn new(root: Dir) -> Chain {
        Chain { root: Some(root), levels: Vec::new(), absent: 0 }
    }

    /// A walk of a tree that doesn't exist: every level is absent.
    pub fn absent() -> Chain {
        Chain { root: None, levels: Vec::new(), absent: 0 }
    }

    /// Levels below the root.
    pub fn depth(&self) -> usize {
        self.levels.len() + self.absent
    }

    /// Enters `dir`, the directory `name` in the current one (the caller
    /// opened it from [`Chain::top`]); `st` is its `fstat`.
    pub fn push(&mut self, name: &[u8], dir: Dir, st: &Stat) {
        debug_assert!(self.absent == 0 && self.root.is_some(), "a present level below an absent one");
        self.levels.push(Level { name: name.to_vec(), id: (st.st_dev, st.st_ino), dir: Some(dir) });
        if let Some(i) = self.levels.len().checked_sub(HELD_LEVELS + 1) {
            self.levels[i].dir = None;
        }
    }

    /// Enters the directory `name` of the current one if there is one (not
    /// a symlink or anything else), else an absent level: for trees only
    /// read to compare with (bases), where an unreadable directory is as
    /// good as a missing one.
    pub fn enter_if_dir(&mut self, name: &[u8]) {
        let found = self.top().ok().flatten().and_then(|d| d.try_open_dir(name).ok().flatten());
        match found.and_then(|d| d.stat_self().ok().map(|st| (d, st))) {
            Some((d, st)) => self.push(name, d, &st),
            None => self.push_absent(),
        }
    }

    /// Enters a level that doesn't exist.
    pub fn push_absent(&mut self) {
        self.absent += 1;
    }

    /// Climbs back to the level above.
    pub fn pop(&mut self) {
        if self.absent > 0 {
            self.absent -= 1;
        } else {
            self.levels.pop();
        }
    }

    /// The current directory, opened again if its descriptor was let go;
    /// `None` if it is absent.
    pub fn top(&mut self) -> io::Result<Option<Dir>> {
        if self.absent > 0 {
            return Ok(None);
        }
        match self.levels.last() {
            None => Ok(self.root.clone()),
            Some(Level { dir: Some(d), .. }) => Ok(Some(d.clone())),
            Some(_) => self.reopen().map(Some),
        }
    }

    /// The directory `depth` levels below the root, if it has a descriptor
    /// (never opens anything).
    pub fn held(&self, depth: usize) -> Option<Dir> {
        match depth.checked_sub(1) {
            None => self.root.clone(),
            Some(i) => self.levels.get(i).and_then(|l| l.dir.clone()),
        }
    }

    /// Opens the deepest [`HELD_LEVELS`] levels again (none of them has a
    /// descriptor: descriptors are let go shallowest first).
    fn reopen(&mut self) -> io::Result<Dir> {
        let root = self.root.clone().expect("present levels have a root");
        let from = self.levels.len().saturating_sub(HELD_LEVELS);
        let mut path = Vec::new();
        for l in &self.levels[..=from] {
            path = join(&path, &l.name);
        }
        let moved = |path: &[u8]| io::Error::other(Moved { path: Shown(path).to_string() });
        let at = |path: &[u8], e: io::Error| io::Error::new(e.kind(), format!("opening {} again: {e}", Shown(path)));
        let mut dir = root.resolve_dir(&path).map_err(|e| at(&path, e))?;
        for i in from..self.levels.len() {
            if i > from {
                path = join(&path, &self.levels[i].name);
                dir = dir.open_dir(&self.levels[i].name).map_err(|e| at(&path, e))?;
            }
            let st = dir.stat_self()?;
            if (st.st_dev, st.st_ino) != self.levels[i].id {
                return Err(moved(&path));
            }
            self.levels[i].dir = Some(dir.clone());
        }
        Ok(dir)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rustix::fs::{Mode, OFlags};

    /// A chain `depth` deep of directories `dNNN`, each holding a file.
    pub(in crate::fs) fn chain_of(root: &Dir, depth: usize) {
        let mut d = root.clone();
        for i in 0..depth {
            rustix::fs::openat(
                &d,
                "file",
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .unwrap();
            d = d.create_dir(format!("d{i:03}").as_bytes()).unwrap();
        }
    }

    fn held_levels(c: &Chain) -> usize {
        c.levels.iter().filter(|l| l.dir.is_some()).count()
    }

    #[test]
    fn a_chain_holds_few_descriptors_and_reopens_the_directories_it_entered() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        chain_of(&root, 100);
        let mut chain = Chain::new(root.clone());
        let mut ids = Vec::new();
        for i in 0..100 {
            let dir = chain.top().unwrap().unwrap().open_dir(format!("d{i:03}").as_bytes()).unwrap();
            let st = dir.stat_self().unwrap();
            ids.push((st.st_dev, st.st_ino));
            chain.push(format!("d{i:03}").as_bytes(), dir, &st);
            assert!(held_levels(&chain) <= HELD_LEVELS);
        }
        // Climbing back, every level is the directory entered there.
        for i in (0..100).rev() {
            let st = chain.top().unwrap().unwrap().stat_self().unwrap();
            assert_eq!((st.st_dev, st.st_ino), ids[i], "level {i}");
            assert!(held_levels(&chain) <= HELD_LEVELS);
            chain.pop();
        }
        assert_eq!(chain.depth(), 0);

        // A directory moved away while the walk was below it is not taken
        // for another one that now has its path.
        let mut chain = Chain::new(root.clone());
        let mut rel = Vec::new();
        for i in 0..40 {
            let name = format!("d{i:03}");
            let dir = chain.top().unwrap().unwrap().open_dir(name.as_bytes()).unwrap();
            chain.push(name.as_bytes(), dir.clone(), &dir.stat_self().unwrap());
            rel = join(&rel, name.as_bytes());
        }
        let parent = root.resolve_dir(b"d000/d001/d002").unwrap();
        parent.rename(b"d003", b"moved").unwrap();
        parent.create_dir(b"d003").unwrap();
        for _ in 0..(40 - 4) {
            chain.pop();
        }
        let err = chain.top().unwrap_err();
        assert!(matches!(err.get_ref(), Some(e) if e.is::<Moved>()), "{err}");
    }

    #[test]
    fn absent_levels_have_no_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_path(tmp.path()).unwrap();
        root.create_dir(b"here").unwrap();
        let mut chain = Chain::new(root);
        chain.enter_if_dir(b"here");
        assert!(chain.top().unwrap().is_some());
        chain.enter_if_dir(b"missing");
        chain.enter_if_dir(b"below");
        assert_eq!(chain.depth(), 3);
        assert!(chain.top().unwrap().is_none());
        chain.pop();
        chain.pop();
        assert!(chain.top().unwrap().is_some());
        assert!(Chain::absent().top().unwrap().is_none());
    }
}
