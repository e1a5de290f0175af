//! A local folder that rbackup writes into as root at a path an admin (or
//! the web console) names: `restore --to /DIR`.
//!
//! Opening such a path as it is would follow whatever is on the way: a
//! local user who plants `/var/tmp/rbackup-restore/JOB -> /etc` (a
//! world-writable folder lets them) gets root's restore written into
//! `/etc`. So the path is walked from `/` one component at a time, each
//! opened with `O_NOFOLLOW | O_DIRECTORY` and checked on its descriptor;
//! a missing one is created (mode 0700). Every folder on the way must be
//! owned by root (or by the user running rbackup) and writable by nobody
//! else, so that once checked, nobody else can change what the path leads
//! to before the restore opens it: a group- or other-writable folder is
//! allowed on the way only when it is root's and sticky (`/tmp`), where
//! others can't rename or remove the entry we go through — and that entry
//! must itself pass the checks. The target itself must not be writable by
//! others either (no sticky exception for it); it may belong to another
//! user (a local source restored in place, `/home/alice`) only when its
//! parent is not a shared folder like `/tmp`, where anyone could have made
//! it to catch a restore.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use anyhow::{Result, bail};
use rustix::fs::{FileType, Stat};

use super::safefs::{Dir, file_type, libc_errno};

/// Whether the target was there before, or made now (or, in a dry run,
/// would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Existed,
    Created,
}

/// Walks the absolute `path` as the module says, creating what is missing
/// unless `dry_run` (then it checks what exists and stops at the first
/// missing component). Errors name the component and why it is refused.
pub fn prepare(path: &Path, dry_run: bool) -> Result<Target> {
    if !path.is_absolute() {
        bail!("the restore folder {} must be an absolute path", path.display());
    }
    let mut dir = Dir::open_path(Path::new("/"))?;
    let mut st = dir.stat_self()?;
    check(&st, Path::new("/"), None)?;
    let names: Vec<&[u8]> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n.as_bytes())),
            Component::RootDir | Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<Result<_, ()>>()
        .map_err(|()| anyhow::anyhow!("the restore folder {} must not contain `..`", path.display()))?;
    let mut so_far = std::path::PathBuf::from("/");
    let mut created = false;
    for (i, name) in names.iter().enumerate() {
        so_far.push(std::ffi::OsStr::from_bytes(name));
        let last = i + 1 == names.len();
        dir = match open_or_make(&dir, name, dry_run, &so_far)? {
            Some((d, made)) => {
                created |= made;
                d
            }
            None => return Ok(Target::Created),
        };
        let parent = st;
        st = dir.stat_self()?;
        check(&st, &so_far, last.then_some(&parent))?;
    }
    if names.is_empty() {
        bail!("refusing to restore into / itself: give a folder");
    }
    Ok(if created { Target::Created } else { Target::Existed })
}

/// Opens the directory `name` in `dir` without following it, or makes it;
/// `None` in a dry run when it is missing.
fn open_or_make(dir: &Dir, name: &[u8], dry_run: bool, shown: &Path) -> Result<Option<(Dir, bool)>> {
    for _ in 0..3 {
        match dir.open_dir(name) {
            Ok(d) => return Ok(Some((d, false))),
            Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {
                if dry_run {
                    return Ok(None);
                }
                match dir.create_dir(name) {
                    Ok(d) => return Ok(Some((d, true))),
                    // Made by someone else meanwhile: look at it again.
                    Err(e) if e.raw_os_error() == Some(libc_errno::EEXIST) => {}
                    Err(e) => return Err(io_context(e, "cannot create", shown)),
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc_errno::ELOOP | libc_errno::ENOTDIR)) => {
                let what = match dir.stat(name).map(|s| file_type(&s)) {
                    Ok(FileType::Symlink) => format!(
                        "is a symlink (to {}): give the folder it points to, if that is really meant",
                        dir.read_link(name).map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default()
                    ),
                    _ => "is not a folder".into(),
                };
                bail!("refusing to restore through {}: it {what}", shown.display());
            }
            Err(e) => return Err(io_context(e, "cannot open", shown)),
        }
    }
    bail!("{} keeps changing under the restore: refusing it", shown.display())
}

fn io_context(e: io::Error, what: &str, path: &Path) -> anyhow::Error {
    anyhow::Error::from(e).context(format!("{what} {}", path.display()))
}

/// A folder on the way must be ours and writable by nobody else, except
/// root's sticky folders (`/tmp`); the target (given with its `parent`)
/// must be writable by nobody else, and ours unless its parent is private.
fn check(st: &Stat, path: &Path, parent: Option<&Stat>) -> Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let last = parent.is_some();
    let parent_shared = parent.is_some_and(|p| p.st_mode & 0o022 != 0);
    if st.st_uid != 0 && st.st_uid != me && (!last || parent_shared) {
        bail!(
            "refusing to restore through {}: it belongs to uid {}, who could redirect the restore; \
             restore to a folder of root's (the default, /var/lib/rbackup/restore/JOB, is one)",
            path.display(),
            st.st_uid
        );
    }
    let others_write = st.st_mode & 0o022 != 0;
    let sticky = st.st_mode & 0o1000 != 0 && st.st_uid == 0;
    if others_write && (last || !sticky) {
        bail!(
            "refusing to restore {} {}: it is writable by others (mode {:o}), who could redirect the restore; \
             restore to a folder only root can write to (the default, /var/lib/rbackup/restore/JOB, is one)",
            if last { "into" } else { "through" },
            path.display(),
            st.st_mode & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_missing_target_is_made_private_and_an_existing_one_is_said() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("a/b");
        assert_eq!(prepare(&t, true).unwrap(), Target::Created);
        assert!(!t.exists(), "a dry run makes nothing");
        assert_eq!(prepare(&t, false).unwrap(), Target::Created);
        assert_eq!(std::fs::metadata(&t).unwrap().permissions().mode() & 0o7777, 0o700);
        assert_eq!(prepare(&t, false).unwrap(), Target::Existed);
        assert!(prepare(Path::new("a/b"), false).is_err(), "relative");
        assert!(prepare(&tmp.path().join("a/../a/b"), false).is_err(), "..");
    }

    #[test]
    fn a_symlink_or_a_folder_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        let e = prepare(&tmp.path().join("link/x"), false).unwrap_err().to_string();
        assert!(e.contains("is a symlink"), "{e}");
        assert!(!tmp.path().join("real/x").exists());
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&open.join("x"), false).unwrap_err().to_string();
        assert!(e.contains("writable by others"), "{e}");
        assert!(prepare(&open, false).is_err(), "the target itself too");
        // Root's sticky folders are fine on the way, not as the target.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        if rustix::process::geteuid().is_root() {
            assert!(prepare(&open.join("x"), false).is_ok());
        }
        assert!(prepare(&open, false).is_err());
        // Another user's folder: the target only where nobody else could
        // have made it.
        let home = tmp.path().join("home");
        std::fs::create_dir_all(home.join("alice")).unwrap();
        std::fs::create_dir_all(open.join("alice")).unwrap();
        if rustix::process::geteuid().is_root() {
            for d in [home.join("alice"), open.join("alice")] {
                std::os::unix::fs::chown(&d, Some(4242), None).unwrap();
            }
            assert_eq!(prepare(&home.join("alice"), false).unwrap(), Target::Existed);
            let e = prepare(&open.join("alice"), false).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 4242"), "{e}");
            assert!(prepare(&home.join("alice/x"), false).is_err(), "not on the way");
        }
    }
}
