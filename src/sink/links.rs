//! Hardlink groups: the first member of a group is handled like any file;
//! each later one is linked to it once it is written (at once if it is, or
//! when its data has arrived). [`Sink::link_or_copy`] is the one way a
//! snapshot's file is linked.

use anyhow::{Context, Result, anyhow};
use rustix::fs::FileType;

use super::record::{Content, record};
use super::{At, Sink};
use crate::fs::meta::{self, Meta};
use crate::fs::safefs::{Dir, Shown, file_type};
use crate::fs::writer::{self, Linked};
use crate::report::Action;
use crate::store::manifest::Kind;
use crate::wire::msg::Link;

/// State of a hardlink group whose first member was seen.
pub(super) enum Group {
    /// Written at this path (relative to the destination root); `kept` if
    /// the first member was already in place (not rewritten by this run).
    Done { rel: Vec<u8>, left: u32, kept: bool, hash: Option<[u8; 32]> },
    /// The first member's data is still on its way.
    Waiting { left: u32 },
}

/// Splits `a/b/c` into (`a/b`, `c`).
pub(super) fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    }
}

impl Sink<'_> {
    /// Whether a new hardlink group can be followed (see [`super::GROUPS_MAX`]).
    pub(super) fn follow_group(&mut self) -> bool {
        if self.groups.len() < super::GROUPS_MAX {
            return true;
        }
        if !self.noted_groups {
            self.noted_groups = true;
            self.events.note(&format!(
                "more than {} hardlink groups are open at once (files whose other links are not listed yet, \
                 or are outside the root): later links of new ones are stored as separate files",
                super::GROUPS_MAX
            ));
        }
        false
    }

    /// A later member of a hardlink group. Returns false for the first member,
    /// which the caller handles like any file.
    pub(super) fn join_group(
        &mut self,
        d: usize,
        name: &[u8],
        rel: &[u8],
        link: Link,
        want: &Meta,
        size: u64,
    ) -> Result<bool> {
        let Some(group) = self.groups.get_mut(&link.id) else {
            return Ok(false);
        };
        self.stats.hardlinks += 1;
        let left = match group {
            Group::Done { left, .. } | Group::Waiting { left, .. } => {
                *left = left.saturating_sub(1);
                *left
            }
        };
        match self.groups.get(&link.id) {
            Some(Group::Done { rel: first, kept, hash, .. }) => {
                let (first, kept, hash) = (first.clone(), *kept, *hash);
                self.link_member(&first, kept, d, name, rel)?;
                self.rec.push(record(rel, Kind::File, size, want), Content::Known(hash));
            }
            _ => {
                let waiter = (d, name.to_vec());
                let p = self
                    .pending
                    .iter_mut()
                    .chain(self.deferred.iter_mut())
                    .chain(self.receiving.as_mut().map(|r| &mut r.pending))
                    .find(|p| p.group == Some(link.id))
                    .ok_or_else(|| anyhow!("hardlink group {} lost its first member", link.id))?;
                p.waiters.push(waiter);
                let ticket = p.ticket;
                self.node_mut(d).pending += 1;
                self.rec.push(record(rel, Kind::File, size, want), Content::Waiting(ticket));
            }
        }
        if left == 0 {
            self.groups.remove(&link.id);
        }
        Ok(true)
    }

    /// Links `name` in directory node `d` to the already written `first`
    /// (`first_kept`: it was in place before this run).
    pub(super) fn link_member(
        &mut self,
        first: &[u8],
        first_kept: bool,
        d: usize,
        name: &[u8],
        rel: &[u8],
    ) -> Result<()> {
        let (first_dir, first_name) = split_parent(first);
        let dest = self.dest_of(d)?;
        let existing = match (&dest, self.node(d).existed) {
            (Some(dest), true) => dest.try_stat(name)?,
            _ => None,
        };
        // The first member, where it already is (always, outside a dry run).
        let src_dir = self.cfg.dest.as_ref().and_then(|root| root.resolve_dir(first_dir).ok());
        let src = src_dir.as_ref().and_then(|dir| dir.stat(first_name).ok());
        // Already one inode with the first member: only if that one was kept
        // (a rewritten first member is a new inode; a dry run only pretends).
        if first_kept
            && let (Some(st), Some(src)) = (&existing, &src)
            && st.st_ino == src.st_ino
            && st.st_dev == src.st_dev
        {
            self.stats.kept += 1;
            return Ok(());
        }
        self.act(Action::Hardlink, rel, existing.is_some());
        let Some(dest) = dest else { return Ok(()) };
        if self.cfg.dry_run {
            return Ok(());
        }
        let src_dir = src_dir.ok_or_else(|| anyhow!("the first link of {} is missing", Shown(rel)))?;
        if existing.as_ref().is_some_and(|st| file_type(st) == FileType::Directory) {
            dest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
        }
        let to = At { dir: &dest, name, rel };
        self.link_or_copy((&src_dir, first_name), &to, existing.is_some(), None, first)?;
        Ok(())
    }

    /// Links a later member of a fetched file's group, now that the first
    /// member (`rel`, `src_name` in `src_dir`) is written.
    pub(super) fn link_waiter(
        &mut self,
        src_dir: &Dir,
        src_name: &[u8],
        wd: usize,
        wname: &[u8],
        rel: &[u8],
    ) -> Result<()> {
        let wrel = self.path_of(wd, wname);
        let wdest = self.dest_of(wd)?.expect("fetches only happen outside dry runs");
        let existing = wdest.try_stat(wname)?;
        self.act(Action::Hardlink, &wrel, existing.is_some());
        if existing.as_ref().is_some_and(|st| file_type(st) == FileType::Directory) {
            wdest.remove_all(wname).with_context(|| format!("removing {}", Shown(&wrel)))?;
        }
        let to = At { dir: &wdest, name: wname, rel: &wrel };
        self.link_or_copy((src_dir, src_name), &to, existing.is_some(), None, rel)?;
        Ok(())
    }

    /// Hardlinks `from` as `to` (over what is there when `replace`), or —
    /// when the inode has the most links the filesystem allows — copies it,
    /// with `meta` or else the metadata `from` has. `first` names the file
    /// linked to in messages. Returns whether it was linked.
    ///
    /// The one place a snapshot's file is linked rather than written: a
    /// basis's unchanged file, and each later member of a hardlink group.
    pub(super) fn link_or_copy(
        &mut self,
        from: (&Dir, &[u8]),
        to: &At<'_>,
        replace: bool,
        meta: Option<&Meta>,
        first: &[u8],
    ) -> Result<bool> {
        let (src_dir, src_name) = from;
        let linked = writer::link(src_dir, src_name, to.dir, to.name, replace).with_context(|| {
            if first.is_empty() {
                format!("hardlinking {}", Shown(to.rel))
            } else {
                format!("hardlinking {} to {}", Shown(to.rel), Shown(first))
            }
        })?;
        match linked {
            Linked::Done => Ok(true),
            Linked::TooManyLinks => {
                let src = src_dir.open_file(src_name)?;
                let size = src.metadata()?.len();
                let read;
                let meta = match meta {
                    Some(m) => m,
                    None => {
                        read = meta::from_stat(&src_dir.stat(src_name)?, meta::read_xattrs(src_dir, src_name)?);
                        &read
                    }
                };
                self.copy_file_into(to.dir, &src, to.name, to.rel, meta, size)?;
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_parent;

    #[test]
    fn split_parent_of_paths() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
    }
}
