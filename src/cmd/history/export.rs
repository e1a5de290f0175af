//! `history --all-versions-to DIR`: each distinct content of the path,
//! copied out of the snapshots as `NAME.<stamp>` (the stamp of the first
//! snapshot holding that content), with its mtime and permission bits.
//!
//! The snapshots are only read (docs/design.md rule 1), through directory
//! handles that follow no symlink (rule 3): the file copied is the entry the
//! snapshot holds, whatever symlinks its tree contains. What is written goes
//! into DIR only — refused when DIR is inside the backups folder — under a
//! temporary name first, and gets its final name without replacing anything
//! (a crash leaves no half copy under a version's name, and an existing file
//! is never overwritten).
//!
//! Setuid, setgid and sticky bits are dropped, and the copies belong to the
//! user running rbackup: a hostile server's setuid program must not become a
//! root-owned setuid file on the desktop (rule 2). Putting a version back
//! with its owner is `restore`'s job.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

use super::change::{Change, Seen, Sighting, Source};
use crate::fs::safefs::{Dir, Shown, file_type};
use crate::store::manifest::Kind;
use crate::store::{Snapshot, Store};
use crate::usage;

/// One version to copy, or one found to be a copy of an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Index of the snapshot it is copied from.
    pub snapshot: usize,
    /// `NAME.<stamp>` in DIR.
    pub name: Vec<u8>,
    /// `Some(earlier name)` when its digest equals an earlier version's
    /// (content that came back): nothing is copied.
    pub same_as: Option<Vec<u8>>,
}

/// The versions to copy: one per row that brings content not seen in the
/// row before (new, changed, unknown) of a file or symlink, once per digest.
pub fn plan(path: &[u8], snapshots: &[Snapshot], sightings: &[Sighting], rows: &[(usize, Change)]) -> Vec<Planned> {
    let base = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    let mut by_digest: HashMap<(crate::digest::Version, [u8; 32]), Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for &(i, change) in rows {
        let Some(seen) = sightings[i].as_ref().filter(|_| change.new_content()) else { continue };
        if !matches!(seen.record.kind, Kind::File | Kind::Symlink) {
            continue;
        }
        let mut name = base.to_vec();
        name.push(b'.');
        name.extend_from_slice(snapshots[i].stamp().as_bytes());
        let key = match (seen.source, seen.record.hash) {
            (Source::Manifest(v), Some(h)) if seen.record.kind == Kind::File => Some((v, h)),
            _ => None,
        };
        let same_as = key.and_then(|k| by_digest.get(&k).cloned());
        if same_as.is_none()
            && let Some(k) = key
        {
            by_digest.insert(k, name.clone());
        }
        out.push(Planned { snapshot: i, name, same_as });
    }
    out
}

/// Copies the planned versions into `to`; returns the paths written.
pub fn copy_out(
    store: &Store,
    snapshots: &[Snapshot],
    sightings: &[Sighting],
    path: &[u8],
    planned: &[Planned],
    to: &Path,
) -> Result<Vec<PathBuf>> {
    refuse_inside(to, &store.folder)?;
    if planned.is_empty() {
        return Err(usage!(
            "{} is never a file or a symlink in these snapshots: --all-versions-to copies files and symlinks; \
             a directory comes back with `rbackup restore --path {} --to DIR`",
            Shown(path),
            Shown(path)
        ));
    }
    if !to.exists() {
        // 0700: the versions may be other owners' private files.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(to)
            .with_context(|| format!("cannot create {}", to.display()))?;
    }
    let dir = Dir::open_path(to).with_context(|| format!("cannot open {}", to.display()))?;
    for p in planned.iter().filter(|p| p.same_as.is_none()) {
        if dir.try_stat(&p.name)?.is_some() {
            return Err(usage!(
                "{} already exists; rbackup never overwrites a file there: move it away or choose another folder \
                 (nothing was copied)",
                to.join(std::ffi::OsStr::from_bytes(&p.name)).display()
            ));
        }
    }
    let mut written = Vec::new();
    for p in planned.iter().filter(|p| p.same_as.is_none()) {
        let snap = &snapshots[p.snapshot];
        let seen = sightings[p.snapshot].as_ref().expect("planned from a sighting");
        let root = store.open_snapshot(snap)?;
        let shown = to.join(std::ffi::OsStr::from_bytes(&p.name));
        match seen.record.kind {
            Kind::Symlink => copy_symlink(&root, path, &dir, &p.name, seen),
            _ => copy_file(&root, path, &dir, &p.name, seen),
        }
        .with_context(|| format!("copying {} of {} to {}", Shown(path), snap.folder, shown.display()))?;
        written.push(shown);
    }
    Ok(written)
}

fn copy_file(root: &Dir, path: &[u8], dir: &Dir, name: &[u8], seen: &Seen) -> Result<()> {
    let src = std::fs::File::from(
        root.resolve(path, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK)
            .context("opening it in the snapshot")?,
    );
    let st = rustix::fs::fstat(&src)?;
    if file_type(&st) != FileType::RegularFile {
        anyhow::bail!("the snapshot holds a {:?} there now, not a file: was the snapshot changed?", file_type(&st));
    }
    let temp = crate::fs::safefs::temp_name();
    let fd = rustix::fs::openat(
        dir,
        temp.as_slice(),
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let dst = std::fs::File::from(fd);
    let done = (|| -> Result<()> {
        crate::fs::writer::copy_contents(&src, &dst, st.st_size as u64)?;
        rustix::fs::fchmod(&dst, Mode::from_raw_mode(seen.record.mode & 0o777))?;
        let mtime = system_time(seen.record.mtime, seen.record.mtime_nsec);
        dst.set_times(std::fs::FileTimes::new().set_modified(mtime))?;
        dst.sync_all()?;
        dir.rename_noreplace(&temp, dir, name).context("naming the copy (it must not exist)")?;
        Ok(())
    })();
    if done.is_err() {
        let _ = dir.unlink(&temp);
    }
    done
}

fn copy_symlink(root: &Dir, path: &[u8], dir: &Dir, name: &[u8], seen: &Seen) -> Result<()> {
    // The target as the snapshot holds it now (the record says the same).
    let target = super::lookup::in_tree(root, path)?
        .and_then(|s| s.record.target)
        .or_else(|| seen.record.target.clone())
        .context("the symlink is gone from the snapshot")?;
    rustix::fs::symlinkat(target.as_slice(), dir, name)?;
    let t = Timespec { tv_sec: seen.record.mtime, tv_nsec: i64::from(seen.record.mtime_nsec) };
    rustix::fs::utimensat(dir, name, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec));
    if sec >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(sec as u64) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos
    }
}

/// The copies must never land in the backups folder, where snapshots are
/// immutable (docs/design.md rule 1). A folder holding the backups folder is
/// fine: only new names are made in it.
pub fn refuse_inside(to: &Path, backups: &Path) -> Result<()> {
    let canon = |p: &Path| crate::fs::safefs::resolve_existing_ancestor(p).unwrap_or_else(|| p.to_path_buf());
    let (to_c, backups_c) = (canon(&std::path::absolute(to)?), canon(backups));
    if to_c.starts_with(&backups_c) {
        return Err(usage!(
            "refusing to copy versions into {}: it is inside the backups folder {}, where snapshots must stay \
             untouched; choose a folder outside it",
            to.display(),
            backups.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Version;
    use crate::store::manifest::Record;

    fn seen(kind: Kind, hash: u8) -> Seen {
        Seen {
            record: Record {
                path: b"d/f.txt".to_vec(),
                kind,
                size: 1,
                mtime: 0,
                mtime_nsec: 0,
                mode: 0o644,
                uid: 0,
                gid: 0,
                target: None,
                rdev: 0,
                xattrs: [0; 16],
                hash: (kind == Kind::File).then_some([hash; 32]),
            },
            source: Source::Manifest(Version::V2),
            inode: None,
        }
    }

    #[test]
    fn each_content_is_copied_once_named_after_its_first_snapshot() {
        let snaps = crate::store::named_in_order(&[
            "s.01-01-26_00-00-00",
            "s.02-01-26_00-00-00",
            "s.03-01-26_00-00-00",
            "s.04-01-26_00-00-00",
            "s.05-01-26_00-00-00",
        ]);
        let s = vec![
            Some(seen(Kind::File, 1)),
            Some(seen(Kind::File, 1)),
            Some(seen(Kind::File, 2)),
            None,
            Some(seen(Kind::File, 1)),
        ];
        let rows = super::super::change::rows(&s);
        let p = plan(b"d/f.txt", &snaps, &s, &rows);
        let names: Vec<(String, Option<String>)> = p
            .iter()
            .map(|p| {
                (String::from_utf8(p.name.clone()).unwrap(), p.same_as.clone().map(|s| String::from_utf8(s).unwrap()))
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("f.txt.01-01-26_00-00-00".into(), None),
                ("f.txt.03-01-26_00-00-00".into(), None),
                ("f.txt.05-01-26_00-00-00".into(), Some("f.txt.01-01-26_00-00-00".into())),
            ]
        );
        let dirs = vec![Some(seen(Kind::Dir, 0)), Some(seen(Kind::Dir, 0))];
        assert!(plan(b"d", &snaps[..2], &dirs, &super::super::change::rows(&dirs)).is_empty());
    }

    #[test]
    fn a_folder_inside_the_backups_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let bk = tmp.path().join("bk");
        std::fs::create_dir_all(&bk).unwrap();
        assert!(refuse_inside(&bk.join("s.01-01-26_00-00-00/x"), &bk).is_err());
        assert!(refuse_inside(&bk, &bk).is_err());
        assert!(refuse_inside(tmp.path(), &bk).is_ok(), "beside the backups folder, nothing in it is touched");
        assert!(refuse_inside(&tmp.path().join("out"), &bk).is_ok());
        std::os::unix::fs::symlink(&bk, tmp.path().join("via")).unwrap();
        assert!(refuse_inside(&tmp.path().join("via/new"), &bk).is_err(), "a symlink to it is seen through");
    }
}
