//! Read access for the backup user: an access ACL on every entry of the
//! root and a default ACL on its directories, walked without following
//! anything; what it grants is named, the rest counted.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use rustix::fs::FileType;

use super::Steps;
use crate::fs::acl::{self, Acl};
use crate::fs::meta::{ACL_ACCESS, ACL_DEFAULT};
use crate::fs::safefs::{Dir, Shown, file_type};
use crate::warn;

/// The ACL attributes to write for one entry.
pub(super) type Writes = Vec<(&'static [u8], Vec<u8>)>;

/// Every directory above the root must let the user through.
pub(super) fn grant_ancestors(steps: &Steps, root: &Path, uid: u32) -> Result<()> {
    for dir in root.ancestors().skip(1) {
        let st = rustix::fs::stat(dir)?;
        if st.st_mode & 0o001 != 0 || st.st_uid == uid {
            continue;
        }
        let mut acl = current_acl(dir, ACL_ACCESS, st.st_mode)?;
        if acl.grant_user(uid, acl::X) {
            steps.run(&format!("let the backup user through {} (ACL u:{uid}:--x)", dir.display()), || {
                xattr::set_deref(dir, std::ffi::OsStr::from_bytes(ACL_ACCESS), &acl.to_bytes())?;
                Ok(())
            })?;
        }
    }
    Ok(())
}

pub(super) fn current_acl(path: &Path, name: &[u8], mode: u32) -> Result<Acl> {
    match xattr::get_deref(path, std::ffi::OsStr::from_bytes(name))? {
        Some(raw) => Acl::parse(&raw),
        None => Ok(Acl::from_mode(mode)),
    }
}

/// Gives `uid` read access to everything beneath `root` (`rX`), and a default
/// ACL on directories so new files get it too. Walks with directory handles
/// ([`crate::store::reader::Walk`]): no symlink is followed, paths longer than
/// `PATH_MAX` work (where `setfacl -R` gives up), and a bounded number of
/// descriptors is open however deep or wide the tree. Each entry's ACL is
/// read and written through an `O_PATH` descriptor checked to be what the
/// walk saw, so an entry swapped for a symlink meanwhile is left alone. An
/// entry that can't be given access is named with the reason and the walk
/// goes on; returns how many there were.
pub(super) fn grant_tree(steps: &Steps, root: &Path, user: &str, uid: u32) -> Result<u64> {
    let top = Dir::open_path(root)?;
    let mut g = Grants { steps, user, seen: 0, granted: 0, failed: 0 };
    for item in crate::store::reader::Walk::new(top.clone()) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                g.seen += 1;
                g.failed += 1;
                warn!("could not give the backup user read access: {e}");
                continue;
            }
        };
        let kind = file_type(&item.stat);
        if kind == FileType::Symlink {
            continue;
        }
        g.seen += 1;
        let pinned;
        let path = if item.rel.is_empty() {
            proc_of(&top)
        } else {
            pinned = match item.parent.pin(&item.name, kind) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // gone meanwhile
                Err(e) => {
                    g.fail(&item.rel, &e.to_string());
                    continue;
                }
            };
            pinned.proc_path()
        };
        let mode = item.stat.st_mode;
        let writes = if kind == FileType::Directory {
            grant_one(&path, ACL_ACCESS, mode, uid, acl::R | acl::X).and_then(|a| {
                let d = grant_one(&path, ACL_DEFAULT, mode, uid, acl::R | acl::X)?;
                Ok(a.into_iter().chain(d).flatten().collect::<Writes>())
            })
        } else {
            let perm = if mode & 0o111 != 0 { acl::R | acl::X } else { acl::R };
            grant_one(&path, ACL_ACCESS, mode, uid, perm).map(Option::unwrap_or_default)
        };
        g.apply(&path, &item.rel, writes.map(|w| (!w.is_empty()).then_some(w)))?;
    }
    g.summary(root);
    Ok(g.failed)
}

pub(super) fn grant_one(path: &Path, name: &'static [u8], mode: u32, uid: u32, perm: u16) -> Result<Option<Writes>> {
    let mut acl = match xattr::get_deref(path, std::ffi::OsStr::from_bytes(name))? {
        Some(raw) => Acl::parse(&raw)?,
        None => Acl::from_mode(mode),
    };
    Ok(acl.grant_user(uid, perm).then(|| vec![(name, acl.to_bytes())]))
}

/// Entries named (in a dry run and a real one) before the rest are counted.
pub(super) const LISTED: u64 = 20;

/// The ACL walk's counts, and what it says as it goes.
pub(super) struct Grants<'a> {
    steps: &'a Steps,
    user: &'a str,
    seen: u64,
    granted: u64,
    failed: u64,
}

impl Grants<'_> {
    /// Writes the ACLs one entry needs (or says it would), and names it.
    fn apply(&mut self, path: &Path, rel: &[u8], writes: Result<Option<Writes>>) -> Result<()> {
        let writes = match writes {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.fail(rel, &format!("reading its ACL: {e:#}"));
                return Ok(());
            }
        };
        if !self.steps.dry_run {
            for (name, value) in writes {
                if let Err(e) = xattr::set_deref(path, std::ffi::OsStr::from_bytes(name), &value) {
                    if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) {
                        bail!(
                            "setting the ACL of {}: the filesystem does not support ACLs ({e}); mount it with \
                             ACLs, or use --mode capability",
                            shown(rel)
                        );
                    }
                    let hint = if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) {
                        " (an immutable or append-only file? see `lsattr`)"
                    } else {
                        ""
                    };
                    self.fail(rel, &format!("{e}{hint}"));
                    return Ok(());
                }
            }
        }
        let prefix = if self.steps.dry_run { "would: " } else { "" };
        if self.granted == 0 {
            println!(
                "{prefix}give the backup user read access (ACL u:{}:rX, and a default ACL on directories):",
                self.user
            );
        }
        if self.granted < LISTED {
            println!("{prefix}  {}", shown(rel));
        }
        self.granted += 1;
        Ok(())
    }

    /// An entry the user will not read, said with the reason.
    fn fail(&mut self, rel: &[u8], why: &str) {
        self.failed += 1;
        warn!("could not give the backup user read access to {}: {why}", shown(rel));
    }

    fn summary(&self, root: &Path) {
        let prefix = if self.steps.dry_run { "would: " } else { "" };
        if self.granted > LISTED {
            println!("{prefix}  … and {} more", self.granted - LISTED);
        }
        let already = self.seen.saturating_sub(self.granted + self.failed);
        if self.granted == 0 && self.failed == 0 {
            self.steps.ok(&format!("the backup user can read all {} entries under {}", self.seen, root.display()));
            return;
        }
        let mut line = format!(
            "{} the backup user read access to {} under {} ({already} already had it",
            if self.steps.dry_run { "would give" } else { "gave" },
            entries(self.granted),
            root.display()
        );
        if self.failed > 0 {
            line.push_str(&format!(", {} could not be given it: named above", self.failed));
        }
        println!("{line})");
    }
}

pub(super) fn entries(n: u64) -> String {
    if n == 1 { "1 entry".into() } else { format!("{n} entries") }
}

pub(super) fn shown(rel: &[u8]) -> String {
    if rel.is_empty() { ".".to_string() } else { Shown(rel).to_string() }
}

pub(super) fn proc_of(dir: &Dir) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir)))
}
