//! Regular files, symlinks, FIFOs and device nodes: compare each with the
//! destination and the bases, and keep, fix, link, copy, create — or ask
//! for its data ([`super::fetch`]).

use anyhow::{Context, Result};
use rustix::fs::{FileType, Stat};

use super::record::{Carried, Content, record};
use super::{At, Group, Pending, Sink};
use crate::fs::meta::{self, Meta, Target, Tree};
use crate::fs::safefs::{Dir, Shown, file_type};
use crate::fs::writer::{self, TempEntry};
use crate::plan::{self, FileAction, Origin, Policy, Similarity};
use crate::report::{Action, ProblemKind};
use crate::store::manifest::{Kind, Record};
use crate::wire::msg::{Link, SpecialKind};

/// How `name` compares with the same path in each basis. Bases are best
/// first: once one is the same, the rest don't matter.
pub(super) fn base_similarities(bases: &[Option<Dir>], name: &[u8], size: u64, want: &Meta) -> Vec<Similarity> {
    let mut sims = vec![Similarity::Missing; bases.len()];
    for (sim, base) in sims.iter_mut().zip(bases) {
        if let Some(b) = base {
            *sim = compare_file(b, name, size, want, Tree::Ours).unwrap_or(Similarity::Missing);
            if *sim == Similarity::Same {
                break;
            }
        }
    }
    sims
}

fn compare_file(dir: &Dir, name: &[u8], size: u64, want: &Meta, tree: Tree) -> std::io::Result<Similarity> {
    let Some(st) = dir.try_stat(name)? else {
        return Ok(Similarity::Missing);
    };
    if file_type(&st) != FileType::RegularFile {
        return Ok(Similarity::OtherType);
    }
    if st.st_size as u64 != size || st.st_mtime != want.mtime || st.st_mtime_nsec as u32 != want.mtime_nsec {
        return Ok(Similarity::ContentDiffers);
    }
    if same_meta(dir, name, &st, want, tree)? { Ok(Similarity::Same) } else { Ok(Similarity::MetaDiffers) }
}

/// Mode, owner, mtime and xattrs of an existing entry equal `want`.
fn same_meta(dir: &Dir, name: &[u8], st: &Stat, want: &Meta, tree: Tree) -> std::io::Result<bool> {
    Ok(meta::stat_matches(st, want) && meta::xattrs_match(dir, name, st, &want.xattrs, tree)?)
}

impl Sink<'_> {
    pub(super) fn on_file(
        &mut self,
        name: Vec<u8>,
        meta: Meta,
        size: u64,
        sparse: bool,
        link: Option<Link>,
        sims: Option<Vec<Similarity>>,
    ) -> Result<()> {
        let (d, rel) = self.enter_name(&name)?;
        self.stats.files += 1;
        let want = self.cfg.privs.storable(&meta);
        if let Some(link) = link
            && self.join_group(d, &name, &rel, link, &want, size)?
        {
            return Ok(());
        }
        let tree = self.tree();
        let dest_sim = match (self.dest_of(d)?, self.node(d).existed) {
            (Some(dest), true) => {
                compare_file(&dest, &name, size, &want, tree).with_context(|| format!("looking at {}", Shown(&rel)))?
            }
            _ => Similarity::Missing,
        };
        let base_sims = match sims {
            Some(s) if s.len() == self.bases.len() => s,
            _ => base_similarities(&self.base_dirs(), &name, size, &want),
        };
        let delta = self.cfg.delta && !sparse && size >= plan::DELTA_MIN_SIZE;
        let action = plan::file(dest_sim, &base_sims, self.cfg.policy, delta);
        if dest_sim == Similarity::OtherType {
            self.clear_dir_for_file(d, &name, &rel)?;
        }
        let replacing = dest_sim != Similarity::Missing;
        let mut content = Content::Known(None);
        let done = match action {
            FileAction::Keep => {
                self.stats.kept += 1;
                content = Content::Known(self.carried_hash(None, d, &name, &rel, size, &want));
                true
            }
            FileAction::FixMeta => {
                self.fix_meta_in_place(d, &name, &rel, &meta)?;
                true
            }
            FileAction::Link(i) => {
                self.link_from_basis(d, i, &name, &rel, &meta, dest_sim)?;
                content = Content::Known(self.carried_hash(Some(i), d, &name, &rel, size, &want));
                true
            }
            FileAction::Copy(origin) => {
                self.copy_local(d, origin, &name, &rel, &meta, replacing)?;
                let from = match origin {
                    Origin::Dest => None,
                    Origin::Basis(i) => Some(i),
                };
                content = Content::Known(self.carried_hash(from, d, &name, &rel, size, &want));
                true
            }
            FileAction::Fetch { delta_base } => {
                let want = Pending::new(d, name, meta, size, link.map(|l| l.id));
                let ticket = self.fetch(want, &rel, delta_base, replacing)?;
                content = Content::Waiting(ticket);
                // In a dry run nothing is pending: later links just print.
                self.cfg.dry_run
            }
        };
        if let Some(link) = link
            && self.follow_group()
        {
            let left = link.nlink - 1;
            let kept = action == FileAction::Keep;
            let group = match &content {
                Content::Known(hash) if done => Group::Done { rel: rel.clone(), left, kept, hash: *hash },
                Content::Waiting(_) if !done => Group::Waiting { left },
                _ => Group::Done { rel: rel.clone(), left, kept, hash: None },
            };
            self.groups.insert(link.id, group);
        }
        self.rec.push(record(&rel, Kind::File, size, &want), content);
        Ok(())
    }

    /// The content hash of a file kept, linked or copied from `from` (the
    /// destination, or basis `i`), now `name` in node `d`'s directory: the
    /// one that tree's manifest recorded; for a file kept in a resumed
    /// snapshot whose run's manifest was cut short, the one of the basis it
    /// is a hardlink of (one inode, one content: docs/design.md rule 1); otherwise —
    /// no manifest, no record, or an older digest — its digest computed now
    /// from the file in the snapshot, once, in proportion to its data. So no
    /// file of a snapshot is left without a hash (see `record`).
    pub(super) fn carried_hash(
        &mut self,
        from: Option<usize>,
        d: usize,
        name: &[u8],
        rel: &[u8],
        size: u64,
        want: &Meta,
    ) -> Option<[u8; 32]> {
        if !self.rec.active() {
            return None;
        }
        match self.rec.carried(from, rel, size, want) {
            Carried::Hash(h) => return Some(h),
            Carried::Legacy => {
                if !self.noted_rehash {
                    self.noted_rehash = true;
                    self.events.note(
                        "the previous snapshot's manifest has content digests of an older version: files \
                         linked from it are hashed once more (see docs/retention.md, Manifests)",
                    );
                }
            }
            Carried::None => {
                if let Some(h) = self.hash_of_basis_inode(from, d, name, rel, size, want) {
                    return Some(h);
                }
                if from.is_some() && !self.noted_unhashed {
                    self.noted_unhashed = true;
                    self.events.note(
                        "the previous snapshot's manifest is missing or lacks some files: files linked from it \
                         are hashed now, once (see docs/retention.md, Manifests)",
                    );
                }
            }
        }
        let digest = match self.dest_of(d) {
            Ok(Some(dest)) => dest.open_file(name),
            Ok(None) => return None,
            Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
        }
        .and_then(|f| crate::digest::of_file(&f, crate::digest::Version::V2));
        match digest {
            Ok(digest) => Some(digest.hash),
            Err(e) => {
                crate::warn!("{}: could not be hashed for the manifest: {e}", Shown(rel));
                None
            }
        }
    }

    /// The hash another basis's manifest (not `from`'s) records for `name`,
    /// when the destination's `name` is the same inode as that basis's file:
    /// a file an interrupted run linked, kept or linked again from it.
    fn hash_of_basis_inode(
        &mut self,
        from: Option<usize>,
        d: usize,
        name: &[u8],
        rel: &[u8],
        size: u64,
        want: &Meta,
    ) -> Option<[u8; 32]> {
        let st = self.dest_of(d).ok()??.try_stat(name).ok()??;
        let i = self.base_dirs().iter().enumerate().position(|(i, b)| {
            Some(i) != from
                && b.as_ref()
                    .and_then(|b| b.try_stat(name).ok().flatten())
                    .is_some_and(|b| b.st_ino == st.st_ino && b.st_dev == st.st_dev)
        })?;
        match self.rec.carried(Some(i), rel, size, want) {
            Carried::Hash(h) => Some(h),
            Carried::Legacy | Carried::None => None,
        }
    }

    /// A directory sits where a non-directory must go: remove it first, since
    /// a rename can't replace it.
    pub(super) fn clear_dir_for_file(&mut self, d: usize, name: &[u8], rel: &[u8]) -> Result<()> {
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        let is_dir = dest.try_stat(name)?.is_some_and(|st| file_type(&st) == FileType::Directory);
        if is_dir && !self.cfg.dry_run {
            {
                dest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
            }
        }
        Ok(())
    }

    pub(super) fn fix_meta_in_place(&mut self, d: usize, name: &[u8], rel: &[u8], meta: &Meta) -> Result<()> {
        self.act(Action::Meta, rel, true);
        self.stats.metadata_fixed += 1;
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let file = dest.open_file(name).with_context(|| format!("opening {}", Shown(rel)))?;
        // Opened without following; what was opened must still be the file
        // that was compared, not something renamed over it since.
        if file_type(&rustix::fs::fstat(&file)?) != FileType::RegularFile {
            self.problem(ProblemKind::Changed, rel, "replaced while it was restored; left alone");
            return Ok(());
        }
        let problems = meta::apply(&Target::Fd(&file), meta, self.cfg.privs)?;
        self.apply_problems(rel, problems);
        Ok(())
    }

    /// Hardlinks `name` in directory node `d` to the same file in basis `i`,
    /// or copies it if the inode is full.
    fn link_from_basis(
        &mut self,
        d: usize,
        i: usize,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        dest_sim: Similarity,
    ) -> Result<()> {
        self.act(Action::Link, rel, dest_sim != Similarity::Missing);
        self.stats.linked += 1;
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let base = self.base_dir(i)?;
        let to = At { dir: &dest, name, rel };
        if !self.link_or_copy((&base, name), &to, dest_sim != Similarity::Missing, Some(meta), b"")? {
            // The inode has the most links the filesystem allows: copied.
            self.stats.linked -= 1;
        }
        Ok(())
    }

    /// Copies `name` from the destination or a basis, where the content is
    /// the same but the metadata can't be shared through a hardlink.
    fn copy_local(
        &mut self,
        d: usize,
        origin: Origin,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        replacing: bool,
    ) -> Result<()> {
        self.act(Action::Copy, rel, replacing);
        let Some(dest) = self.dest_of(d)? else {
            self.stats.copied_locally += 1;
            return Ok(());
        };
        if self.cfg.dry_run {
            self.stats.copied_locally += 1;
            return Ok(());
        }
        let src_dir = match origin {
            Origin::Dest => dest.clone(),
            Origin::Basis(i) => self.base_dir(i)?,
        };
        let src = src_dir.open_file(name).with_context(|| format!("opening the basis of {}", Shown(rel)))?;
        let size = src.metadata()?.len();
        self.copy_file_into(&dest, &src, name, rel, meta, size)
    }

    pub(super) fn copy_file_into(
        &mut self,
        dest: &Dir,
        src: &std::fs::File,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        size: u64,
    ) -> Result<()> {
        let mut temp = TempEntry::file(dest).with_context(|| format!("creating a file for {}", Shown(rel)))?;
        writer::copy_contents(src, temp.file_mut(), size).with_context(|| format!("copying {}", Shown(rel)))?;
        let problems = temp.commit(name, meta, self.cfg.privs).with_context(|| format!("writing {}", Shown(rel)))?;
        self.stats.copied_locally += 1;
        self.stats.bytes_written = self.stats.bytes_written.saturating_add(size);
        self.apply_problems(rel, problems);
        Ok(())
    }

    pub(super) fn on_symlink(&mut self, name: &[u8], meta: &Meta, target: &[u8]) -> Result<()> {
        let (d, rel) = self.enter_name(name)?;
        self.stats.symlinks += 1;
        let want = self.cfg.privs.storable(meta);
        let r = Record { target: Some(target.to_vec()), ..record(&rel, Kind::Symlink, 0, &want) };
        self.rec.push(r, Content::Known(None));
        let existing = self.existing(d, name, &rel)?;
        if let Some(dest) = self.dest_of(d)?
            && let Some(st) = &existing
            && file_type(st) == FileType::Symlink
            && dest.read_link(name).is_ok_and(|t| t == target)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, FileType::Symlink);
            }
        }
        self.create_at(d, name, &rel, meta, existing.as_ref(), |dir| TempEntry::symlink(dir, target))
    }

    pub(super) fn on_special(&mut self, name: &[u8], meta: &Meta, kind: SpecialKind, rdev: u64) -> Result<()> {
        let (d, rel) = self.enter_name(name)?;
        if kind != SpecialKind::Fifo && !self.cfg.devices {
            self.stats.devices_skipped += 1;
            if !self.warned_devices {
                self.warned_devices = true;
                self.events.note("device nodes are skipped (first: see --devices to keep them)");
            }
            return Ok(());
        }
        self.stats.specials += 1;
        let want = self.cfg.privs.storable(meta);
        let kind_of = match kind {
            SpecialKind::Fifo => Kind::Fifo,
            SpecialKind::Char => Kind::Char,
            SpecialKind::Block => Kind::Block,
        };
        let rdev_of = if kind == SpecialKind::Fifo { 0 } else { rdev };
        self.rec.push(Record { rdev: rdev_of, ..record(&rel, kind_of, 0, &want) }, Content::Known(None));
        let existing = self.existing(d, name, &rel)?;
        let wanted_type = match kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        if let Some(dest) = self.dest_of(d)?
            && let Some(st) = &existing
            && file_type(st) == wanted_type
            && (kind == SpecialKind::Fifo || st.st_rdev == rdev)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, wanted_type);
            }
        }
        self.create_at(d, name, &rel, meta, existing.as_ref(), |dir| TempEntry::special(dir, kind, rdev))
    }

    /// The destination's current entry `name`, if the directory existed.
    pub(super) fn existing(&mut self, d: usize, name: &[u8], rel: &[u8]) -> Result<Option<Stat>> {
        match (self.dest_of(d)?, self.node(d).existed) {
            (Some(dest), true) => dest.try_stat(name).with_context(|| format!("looking at {}", Shown(rel))),
            _ => Ok(None),
        }
    }

    /// Fixes the metadata of the symlink, FIFO or device node `name` in place
    /// (a restore), through a descriptor of the entry that is checked to be
    /// a `kind`: someone who can write the directory may swap it meanwhile.
    pub(super) fn fix_meta_at(
        &mut self,
        dest: &Dir,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        kind: FileType,
    ) -> Result<()> {
        self.act(Action::Meta, rel, true);
        self.stats.metadata_fixed += 1;
        if self.cfg.dry_run {
            return Ok(());
        }
        let pinned = match dest.pin(name, kind) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(crate::fs::safefs::libc_errno::ENOENT) => {
                self.problem(ProblemKind::Vanished, rel, "disappeared while it was restored");
                return Ok(());
            }
            Err(e) if crate::fs::safefs::Swapped::is(&e) => {
                self.problem(ProblemKind::Changed, rel, e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", Shown(rel))),
        };
        let problems = meta::apply(&Target::Pinned(&pinned), meta, self.cfg.privs)?;
        self.apply_problems(rel, problems);
        Ok(())
    }

    /// Creates a symlink or special file under a temporary name and renames
    /// it over whatever is there.
    pub(super) fn create_at(
        &mut self,
        d: usize,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        existing: Option<&Stat>,
        make: impl FnOnce(&Dir) -> std::io::Result<TempEntry>,
    ) -> Result<()> {
        self.act(Action::Create, rel, existing.is_some());
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        if existing.is_some_and(|st| file_type(st) == FileType::Directory) {
            dest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
        }
        let temp = make(&dest).with_context(|| format!("creating {}", Shown(rel)))?;
        let problems = temp.commit(name, meta, self.cfg.privs).with_context(|| format!("writing {}", Shown(rel)))?;
        self.apply_problems(rel, problems);
        Ok(())
    }
}
