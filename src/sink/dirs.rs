//! Directories: the node each open directory has, from its listing to its
//! metadata (applied after its children), and the bounded set of handles
//! the sink writes through (see the module doc of [`super`]).

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{FileType, Stat};

use super::record::{Content, record};
use super::{Sink, violation};
use crate::fs::meta::{self, Meta, Target, Tree};
use crate::fs::safefs::{Dir, HELD_LEVELS, Shown, file_type, join};
use crate::plan::Policy;
use crate::report::{Action, ProblemKind};
use crate::store::manifest::Kind;
use crate::wire::msg::SkipReason;

/// An open directory of the listing.
pub(super) struct DirNode {
    /// Unique for the run (node indices are reused).
    pub(super) serial: u64,
    /// Its position in the stack while its listing runs (the root's is 0).
    pub(super) depth: usize,
    /// (`st_dev`, `st_ino`) of the destination directory; `None` only in a
    /// dry run, for a directory that doesn't exist yet.
    pub(super) dest_id: Option<(u64, u64)>,
    /// Its name in its parent (empty for the root). Its path is found
    /// through the parents: a path per node would cost memory quadratic in
    /// the depth (a 20,000-deep chain's paths are 400 MB).
    pub(super) name: Vec<u8>,
    pub(super) meta: Meta,
    pub(super) parent: Option<usize>,
    /// Unwritten fetches and unfinished subdirectories.
    pub(super) pending: usize,
    pub(super) ended: bool,
    /// The directory existed before this run: compare, and maybe clean up.
    pub(super) existed: bool,
    /// Not every child is listed: never remove unlisted names.
    pub(super) partial: bool,
    /// Names listed, kept only where extra entries must be removed.
    pub(super) seen: Vec<Vec<u8>>,
    pub(super) last: Option<Vec<u8>>,
    /// It existed with other metadata than the source's when first seen.
    pub(super) meta_differs: bool,
}

/// What identifies a directory while the run holds no handle on it.
fn id(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl Sink<'_> {
    pub(super) fn node(&self, i: usize) -> &DirNode {
        self.dirs[i].as_ref().expect("live directory node")
    }

    pub(super) fn node_mut(&mut self, i: usize) -> &mut DirNode {
        self.dirs[i].as_mut().expect("live directory node")
    }

    /// Checks order and uniqueness of `name` in the current directory and
    /// records it. Returns the directory's node index and the entry's path.
    pub(super) fn enter_name(&mut self, name: &[u8]) -> Result<(usize, Vec<u8>)> {
        let d = *self.stack.last().expect("inside a directory");
        let delete = self.cfg.delete;
        let node = self.dirs[d].as_mut().expect("live directory node");
        if node.last.as_deref().is_some_and(|last| name <= last) {
            let (dir, name) = (Shown(&self.cwd).to_string(), Shown(name).to_string());
            return Err(violation(format!("entry {name:?} in directory {dir:?} is out of order or listed twice")));
        }
        node.last = Some(name.to_vec());
        if node.existed && delete && !node.partial {
            node.seen.push(name.to_vec());
        }
        Ok((d, join(&self.cwd, name)))
    }

    pub(super) fn on_dir(&mut self, name: &[u8], meta: Meta, unreadable: Option<String>, partial: bool) -> Result<()> {
        self.stats.directories += 1;
        let partial = partial || unreadable.is_some();
        self.next_serial += 1;
        let serial = self.next_serial;
        let mut dest_stat = None;
        let mut rel = Vec::new();
        let node = if self.stack.is_empty() {
            self.saw_root = true;
            if let Some(root) = &self.cfg.dest {
                dest_stat = Some(root.stat_self()?);
            }
            DirNode {
                serial,
                depth: 0,
                dest_id: dest_stat.as_ref().map(id),
                name: Vec::new(),
                meta,
                parent: None,
                pending: 0,
                ended: false,
                existed: !self.cfg.fresh,
                partial,
                seen: Vec::new(),
                last: None,
                meta_differs: false,
            }
        } else {
            let parent;
            (parent, rel) = self.enter_name(name)?;
            let (dest, existed) = self.open_child_dir(parent, name, &rel)?;
            match dest {
                Some(dir) => {
                    let st = dir.stat_self().with_context(|| format!("looking at directory {}", Shown(&rel)))?;
                    self.dest.push(name, dir, &st);
                    dest_stat = Some(st);
                }
                None => self.dest.push_absent(),
            }
            for chain in &mut self.bases {
                chain.enter_if_dir(name);
            }
            self.node_mut(parent).pending += 1;
            DirNode {
                serial,
                depth: self.stack.len(),
                dest_id: dest_stat.as_ref().map(id),
                name: name.to_vec(),
                meta,
                parent: Some(parent),
                pending: 0,
                ended: false,
                existed,
                partial,
                seen: Vec::new(),
                last: None,
                meta_differs: false,
            }
        };
        let mut node = node;
        let stored = self.cfg.privs.storable(&node.meta);
        self.rec.push(record(&rel, Kind::Dir, 0, &stored), Content::Known(None));
        if node.existed
            && let Some(st) = &dest_stat
            && let Some(dest) = self.dest.top()?
        {
            // Decided now, before this run writes inside it and moves its mtime.
            let want = self.cfg.privs.storable(&node.meta);
            node.meta_differs = !(meta::stat_matches(st, &want)
                && meta::same_xattrs(&meta::read_dir_xattrs(&dest)?, &want.xattrs, self.tree()));
        }
        if let Some(err) = unreadable {
            self.problem(ProblemKind::Unreadable, &rel, format!("directory not listed: {err}"));
        }
        let idx = match self.free.pop() {
            Some(i) => {
                self.dirs[i] = Some(node);
                i
            }
            None => {
                self.dirs.push(Some(node));
                self.dirs.len() - 1
            }
        };
        self.stack.push(idx);
        if !rel.is_empty() {
            self.cwd_ends.push(self.cwd.len());
            self.cwd = rel;
        }
        Ok(())
    }

    /// Opens or creates the destination directory `name`; returns it (absent
    /// in a dry run when it would be created) and whether it already existed.
    pub(super) fn open_child_dir(&mut self, parent: usize, name: &[u8], rel: &[u8]) -> Result<(Option<Dir>, bool)> {
        // The parent is the current directory.
        let Some(pdest) = self.dest.top().with_context(|| format!("opening the directory of {}", Shown(rel)))? else {
            // A dry run inside a directory that would be created.
            self.act(Action::Mkdir, rel, false);
            return Ok((None, false));
        };
        if self.node(parent).existed
            && let Some(st) = pdest.try_stat(name).with_context(|| format!("looking at {}", Shown(rel)))?
        {
            if file_type(&st) == FileType::Directory {
                let d = pdest.open_dir(name).with_context(|| format!("opening directory {}", Shown(rel)))?;
                return Ok((Some(d), true));
            }
            self.act(Action::Mkdir, rel, true);
            if !self.cfg.dry_run {
                pdest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
            }
        } else {
            self.act(Action::Mkdir, rel, false);
        }
        if self.cfg.dry_run {
            return Ok((None, false));
        }
        let d = pdest.create_dir(name).with_context(|| format!("creating directory {}", Shown(rel)))?;
        Ok((Some(d), false))
    }

    pub(super) fn on_end_dir(&mut self) -> Result<()> {
        let idx = self.stack.pop().ok_or_else(|| violation("end of a directory that was never opened"))?;
        self.node_mut(idx).ended = true;
        if let Some(end) = self.cwd_ends.pop() {
            self.cwd.truncate(end);
        }
        if !self.stack.is_empty() {
            // Off the stack, its handle waits with the others reopened.
            if let Some(dir) = self.dest.top()? {
                self.keep_spare(self.node(idx).serial, dir);
            }
            self.dest.pop();
            for chain in &mut self.bases {
                chain.pop();
            }
        }
        self.maybe_finish_dir(idx)
    }

    /// Finishes directory `idx` and then its parents, as far as each has no
    /// pending work: removes extra entries, then applies its metadata.
    pub(super) fn maybe_finish_dir(&mut self, mut idx: usize) -> Result<()> {
        loop {
            let node = self.node(idx);
            if !node.ended || node.pending > 0 {
                return Ok(());
            }
            let dest = self.dest_of(idx)?;
            let node = self.dirs[idx].take().expect("live directory node");
            self.free.push(idx);
            if let Some(dest) = &dest {
                // Its path, only where it is needed.
                let rel = |sink: &Self| node.parent.map_or_else(Vec::new, |p| sink.path_of(p, &node.name));
                if node.existed && self.cfg.delete && !node.partial {
                    let rel = rel(self);
                    self.remove_extras(dest, &node, &rel)?;
                }
                // A restore of chosen paths leaves the metadata of directories
                // that were already there on the way to them.
                // Nor does one into a local folder that was there the root's.
                let leave = self.cfg.policy == Policy::Restore
                    && node.existed
                    && (node.partial || (node.parent.is_none() && self.cfg.keep_root));
                if node.meta_differs && !leave {
                    let rel = rel(self);
                    self.act(Action::Meta, &rel, true);
                    self.stats.metadata_fixed += 1;
                }
                if !self.cfg.dry_run && !leave {
                    let problems = meta::apply(&Target::Dir(dest), &node.meta, self.cfg.privs)
                        .with_context(|| format!("setting metadata of directory {}", Shown(&rel(self))))?;
                    if !problems.is_empty() {
                        let rel = rel(self);
                        self.apply_problems(&rel, problems);
                    }
                }
            }
            match node.parent {
                Some(p) => {
                    self.node_mut(p).pending -= 1;
                    idx = p;
                }
                None => {
                    self.root_done = true;
                    return Ok(());
                }
            }
        }
    }

    pub(super) fn remove_extras(&mut self, dest: &Dir, node: &DirNode, dir_rel: &[u8]) -> Result<()> {
        let names = dest.names().with_context(|| format!("listing {}", Shown(dir_rel)))?;
        for name in names {
            if node.seen.binary_search(&name).is_ok() {
                continue;
            }
            let rel = join(dir_rel, &name);
            self.act(Action::Remove, &rel, true);
            self.stats.removed += 1;
            if !self.cfg.dry_run {
                dest.remove_all(&name).with_context(|| format!("removing {}", Shown(&rel)))?;
            }
        }
        Ok(())
    }

    pub(super) fn on_skipped(&mut self, name: &[u8], reason: SkipReason) -> Result<()> {
        let (_, rel) = self.enter_name(name)?;
        match reason {
            SkipReason::Vanished => self.problem(ProblemKind::Vanished, &rel, "disappeared during the run"),
            SkipReason::Unreadable(e) => self.problem(ProblemKind::Unreadable, &rel, e),
            SkipReason::Socket => self.stats.sockets_skipped += 1,
        }
        Ok(())
    }

    /// What kind of tree the destination is.
    pub(super) fn tree(&self) -> Tree {
        if self.cfg.policy == Policy::Snapshot { Tree::Ours } else { Tree::Live }
    }

    /// The destination directory of node `d` (`None`: a dry run's directory
    /// that would be created), opened again if its handle was let go.
    pub(super) fn dest_of(&mut self, d: usize) -> Result<Option<Dir>> {
        let node = self.node(d);
        if node.dest_id.is_none() {
            return Ok(None);
        }
        if node.parent.is_none() {
            return Ok(self.cfg.dest.clone());
        }
        if !node.ended {
            if node.depth == self.dest.depth() {
                return Ok(self.dest.top()?);
            }
            if let Some(dir) = self.dest.held(node.depth) {
                return Ok(Some(dir));
            }
        }
        self.reopen(d).map(Some)
    }

    /// The path of directory node `d`, from the root.
    pub(super) fn rel_of(&self, d: usize) -> Vec<u8> {
        if self.stack.last() == Some(&d) {
            return self.cwd.clone();
        }
        let mut names = Vec::new();
        let mut n = d;
        while let Some(p) = self.node(n).parent {
            names.push(&self.node(n).name[..]);
            n = p;
        }
        names.reverse();
        names.join(&b'/')
    }

    /// The path of `name` in directory node `d`.
    pub(super) fn path_of(&self, d: usize, name: &[u8]) -> Vec<u8> {
        join(&self.rel_of(d), name)
    }

    /// A handle of node `d`'s destination directory without opening
    /// anything: the root's, a held one of the stack, or a spare one.
    pub(super) fn handle_of(&self, d: usize) -> Option<Dir> {
        let node = self.node(d);
        if node.parent.is_none() {
            return self.cfg.dest.clone();
        }
        if !node.ended
            && let Some(dir) = self.dest.held(node.depth)
        {
            return Some(dir);
        }
        self.spare.iter().find(|(s, _)| *s == node.serial).map(|(_, dir)| dir.clone())
    }

    /// Opens node `d`'s destination directory again, with up to
    /// `HELD_LEVELS - 1` of its ancestors that have no handle either: the
    /// shallowest by name from the nearest ancestor that has one, or by its
    /// path from the root (beneath it, no symlink followed); each must be
    /// the directory first opened. They become the spare handles, so that
    /// finishing a chain of directories, each after its children, costs one
    /// path walk per `HELD_LEVELS` of them.
    pub(super) fn reopen(&mut self, d: usize) -> Result<Dir> {
        if let Some(dir) = self.handle_of(d) {
            return Ok(dir);
        }
        let mut lost = vec![d];
        let mut dir = loop {
            let parent = self.node(*lost.last().expect("not empty")).parent.expect("the root is always open");
            let above = self.handle_of(parent);
            if above.is_some() || lost.len() == HELD_LEVELS {
                break above;
            }
            lost.push(parent);
        };
        for &n in lost.iter().rev() {
            let node = self.node(n);
            let opened = match &dir {
                Some(parent) => parent.open_dir(&node.name),
                None => self.cfg.dest.as_ref().expect("a destination").resolve_dir(&self.rel_of(n)),
            };
            let opened = opened.with_context(|| format!("opening directory {} again", Shown(&self.rel_of(n))))?;
            if Some(id(&opened.stat_self()?)) != node.dest_id {
                bail!(crate::fs::safefs::Moved { path: Shown(&self.rel_of(n)).to_string() });
            }
            self.keep_spare(node.serial, opened.clone());
            dir = Some(opened);
        }
        Ok(dir.expect("at least one directory reopened"))
    }

    /// Keeps the handle of a directory off the held part of the stack,
    /// letting go of the oldest beyond `HELD_LEVELS`.
    pub(super) fn keep_spare(&mut self, serial: u64, dir: Dir) {
        if self.spare.len() == HELD_LEVELS {
            self.spare.pop_front();
        }
        self.spare.push_back((serial, dir));
    }

    /// The current directory in each basis (`None` where a basis lacks it).
    pub(super) fn base_dirs(&mut self) -> Vec<Option<Dir>> {
        self.bases.iter_mut().map(|c| c.top().ok().flatten()).collect()
    }

    /// The current directory in basis `i`, which the plan chose.
    pub(super) fn base_dir(&mut self, i: usize) -> Result<Dir> {
        self.bases[i].top()?.ok_or_else(|| anyhow!("the basis the plan chose lacks the directory"))
    }
}
