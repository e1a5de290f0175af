//! The snapshot store: a backups folder holding `NAME.dd-mm-yy_hh-mm-ss`
//! snapshots (UTC), `NAME.<stamp>.incomplete` runs in progress, and the
//! bookkeeping folder `NAME.rbackup` (lock, trash, later manifests).
//!
//! Snapshots are ordered by the time parsed from their names, never by string
//! order (`dd-mm-yy` does not sort). Anything in the backups folder that is not
//! one of ours is ignored and never touched. A snapshot gets its final name
//! only after everything in it is on disk; deleting one first moves it into
//! the trash, so a half-deleted snapshot is never listed as complete.

pub mod held;
pub mod lock;
pub mod manifest;
pub mod reader;
pub mod rules;
pub mod select;
pub mod unread;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, NaiveDate, Timelike, Utc};

use crate::fs::safefs::Dir;
use crate::usage;

const INCOMPLETE: &str = ".incomplete";

/// One snapshot folder, complete or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub folder: String,
    pub time: DateTime<Utc>,
    pub complete: bool,
}

impl Snapshot {
    /// The stamp part of the name, `dd-mm-yy_hh-mm-ss`.
    pub fn stamp(&self) -> String {
        stamp(self.time)
    }
}

/// Formats a time as `dd-mm-yy_hh-mm-ss` (UTC).
pub fn stamp(t: DateTime<Utc>) -> String {
    t.format("%d-%m-%y_%H-%M-%S").to_string()
}

/// The folder name of a snapshot of `name` at `t`.
pub fn folder_name(name: &str, t: DateTime<Utc>, complete: bool) -> String {
    let mut s = format!("{name}.{}", stamp(t));
    if !complete {
        s.push_str(INCOMPLETE);
    }
    s
}

/// Parses a folder name of job `name`: `(time, complete)`, or `None` if it is
/// not one of this job's snapshots.
pub fn parse_folder_name(name: &str, folder: &str) -> Option<(DateTime<Utc>, bool)> {
    let rest = folder.strip_prefix(name)?.strip_prefix('.')?;
    let (stamp, complete) = match rest.strip_suffix(INCOMPLETE) {
        Some(s) => (s, false),
        None => (rest, true),
    };
    parse_stamp(stamp).map(|t| (t, complete))
}

/// Parses `dd-mm-yy_hh-mm-ss` strictly; `yy` is 20yy.
pub fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() != 17 || b[2] != b'-' || b[5] != b'-' || b[8] != b'_' || b[11] != b'-' || b[14] != b'-' {
        return None;
    }
    let num = |i: usize| -> Option<u32> {
        let (x, y) = (b[i], b[i + 1]);
        (x.is_ascii_digit() && y.is_ascii_digit()).then(|| u32::from(x - b'0') * 10 + u32::from(y - b'0'))
    };
    let date = NaiveDate::from_ymd_opt(2000 + num(6)? as i32, num(3)?, num(0)?)?;
    let time = date.and_hms_opt(num(9)?, num(12)?, num(15)?)?;
    Some(time.and_utc())
}

/// Checks a job's folder prefix: it names folders, so it must be one plain,
/// printable component.
pub fn check_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+');
    if name.len() > NAME_MAX {
        return Err(usage!(
            "invalid --name: {} characters is too long; at most {NAME_MAX} (it becomes part of every snapshot's \
             folder name, and a file name holds at most 255 bytes)",
            name.len()
        ));
    }
    if name.is_empty() || name.starts_with('.') || name.contains("..") || !name.chars().all(ok_char) {
        return Err(usage!(
            "invalid --name {name:?}: use letters, digits and - _ . @ + (not starting with a dot, no `..`, no `/`)"
        ));
    }
    Ok(())
}

/// Longest job name: `NAME.dd-mm-yy_hh-mm-ss.incomplete` must stay a
/// valid file name with room to spare.
pub const NAME_MAX: usize = 100;

/// An error about the backups folder itself. A folder that is a file, on a
/// read-only filesystem or missing its parent is a setting to fix, not a
/// failed run: exit 2 (docs/exit-codes.md).
fn folder_error(e: std::io::Error, what: String) -> anyhow::Error {
    let hint = match rustix::io::Errno::from_io_error(&e) {
        Some(rustix::io::Errno::NOTDIR) => Some("that path is a file, not a folder: choose another backups_folder"),
        Some(rustix::io::Errno::ROFS) => {
            Some("the filesystem is mounted read-only; remount it read-write or choose another backups_folder")
        }
        Some(rustix::io::Errno::ACCESS) => Some("run as root, or choose a folder this user can write"),
        _ => None,
    };
    match hint {
        Some(h) => usage!("{what}: {e}; {h}"),
        None => anyhow::Error::new(e).context(what),
    }
}

/// How messages name the snapshots of job `name` in `folder`: `FOLDER/NAME.*`.
pub fn shown(folder: &Path, name: &str) -> String {
    folder.join(format!("{name}.*")).display().to_string()
}

/// The backups folder of one job.
pub struct Store {
    pub folder: PathBuf,
    pub name: String,
    dir: Dir,
}

impl Store {
    /// Opens an existing backups folder.
    pub fn open(folder: &Path, name: &str) -> Result<Store> {
        check_name(name)?;
        let dir = Dir::open_path(folder)
            .map_err(|e| folder_error(e, format!("cannot open the backups folder {}", folder.display())))?;
        Ok(Store { folder: folder.to_path_buf(), name: name.to_string(), dir })
    }

    /// Opens the backups folder, creating it (mode 0700) if missing. Warns if
    /// others can enter it (once per folder and process: `replicate` opens
    /// its destination once per snapshot): snapshots keep other owners'
    /// setuid files and private data.
    pub fn open_or_create(folder: &Path, name: &str) -> Result<Store> {
        static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
        check_name(name)?;
        if !folder.is_absolute() {
            return Err(usage!("the backups folder must be an absolute path, not {}", folder.display()));
        }
        if !folder.exists() {
            // Created 0700 from the start: no window in which others can enter.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(folder)
                .map_err(|e| folder_error(e, format!("cannot create the backups folder {}", folder.display())))?;
        }
        let store = Store::open(folder, name)?;
        let mode = store.dir.stat_self()?.st_mode & 0o777;
        let first = || {
            let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let new = !warned.iter().any(|w| w == folder);
            if new {
                warned.push(folder.to_path_buf());
            }
            new
        };
        if mode & 0o011 != 0 && first() {
            crate::warn!(
                "the backups folder {} can be entered by other users (mode {mode:o}); snapshots keep other \
                 owners' private files and setuid programs: run `chmod 700 {}`",
                folder.display(),
                folder.display()
            );
        }
        Ok(store)
    }

    /// How messages name this job's snapshots: `FOLDER/NAME.*`.
    pub fn shown(&self) -> String {
        shown(&self.folder, &self.name)
    }

    /// The backups folder itself.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// This job's snapshots, oldest first (by the time in their names).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for name in self.dir.names().with_context(|| format!("cannot list {}", self.folder.display()))? {
            let Ok(folder) = String::from_utf8(name) else {
                continue;
            };
            if let Some((time, complete)) = parse_folder_name(&self.name, &folder)
                && self.dir.try_open_dir(folder.as_bytes())?.is_some()
            {
                out.push(Snapshot { folder, time, complete });
            }
        }
        // Same second: the complete one first, it is the older of the two runs.
        out.sort_by(|a, b| a.time.cmp(&b.time).then(b.complete.cmp(&a.complete)));
        Ok(out)
    }

    /// Fails, naming the job and the folder, if there are no snapshots of
    /// the job at all. Commands that work on existing snapshots check this
    /// before they create any bookkeeping, so a mistyped `--name` leaves
    /// nothing behind.
    pub fn require_snapshots(&self) -> Result<()> {
        if self.snapshots()?.is_empty() {
            return Err(usage!(
                "there are no snapshots of {} in {} (check --name and --backups-folder, or the job's name and \
                 backups_folder)",
                self.name,
                self.folder.display()
            ));
        }
        Ok(())
    }

    /// The time to name a new snapshot by: now, to the second. When a
    /// snapshot already holds this second (two runs within one second), the
    /// run waits for the next free second rather than naming itself after a
    /// time still to come, so a name is never ahead of the clock and the
    /// skew warning means what it says.
    pub fn new_stamp(&self) -> Result<DateTime<Utc>> {
        let taken: Vec<DateTime<Utc>> = self.snapshots()?.iter().map(|s| s.time).collect();
        loop {
            match pick_stamp(&taken, Utc::now()) {
                Stamp::Free(t) => return Ok(t),
                Stamp::Wait(d) => std::thread::sleep(d),
                Stamp::Skewed { t, newest } => {
                    crate::warn!(
                        "a snapshot of {} is newer than the clock says it is now; is the clock right?",
                        stamp(newest)
                    );
                    return Ok(t);
                }
            }
        }
    }

    /// Creates `NAME.<stamp>.incomplete` (mode 0700 until the snapshot's root
    /// metadata is applied).
    pub fn create_incomplete(&self, t: DateTime<Utc>) -> Result<(Snapshot, Dir)> {
        let folder = folder_name(&self.name, t, false);
        let dir = self
            .dir
            .create_dir(folder.as_bytes())
            .with_context(|| format!("cannot create {}", self.folder.join(&folder).display()))?;
        Ok((Snapshot { folder, time: t, complete: false }, dir))
    }

    /// Opens a snapshot's folder.
    pub fn open_snapshot(&self, s: &Snapshot) -> Result<Dir> {
        self.dir
            .open_dir(s.folder.as_bytes())
            .with_context(|| format!("cannot open snapshot {}", self.folder.join(&s.folder).display()))
    }

    /// Makes an `.incomplete` snapshot complete: flushes everything in it to
    /// disk, then renames it to its final name (never over an existing one).
    pub fn commit(&self, s: &Snapshot, dir: &Dir) -> Result<Snapshot> {
        dir.syncfs().context("flushing the snapshot to disk")?;
        let done = Snapshot { folder: folder_name(&self.name, s.time, true), time: s.time, complete: true };
        self.dir
            .rename_noreplace(s.folder.as_bytes(), &self.dir, done.folder.as_bytes())
            .with_context(|| format!("cannot rename {} to {}", s.folder, done.folder))?;
        self.dir.fsync().context("flushing the backups folder")?;
        Ok(done)
    }

    /// The job's bookkeeping folder `NAME.rbackup`, created 0700 if missing.
    pub fn meta_dir(&self) -> Result<Dir> {
        let name = format!("{}.rbackup", self.name);
        match self.dir.try_open_dir(name.as_bytes())? {
            Some(d) => Ok(d),
            None => self
                .dir
                .create_dir(name.as_bytes())
                .map_err(|e| folder_error(e, format!("cannot create {}", self.folder.join(&name).display()))),
        }
    }

    /// Deletes a snapshot crash-safely: it is first moved into the trash (a
    /// name no command takes for a snapshot), then removed.
    pub fn delete(&self, s: &Snapshot) -> Result<()> {
        let trash = self.trash()?;
        self.dir
            .rename_noreplace(s.folder.as_bytes(), &trash, s.folder.as_bytes())
            .with_context(|| format!("cannot move {} to the trash", s.folder))?;
        crate::fs::delete::remove_tree(&trash, s.folder.as_bytes())
            .with_context(|| format!("cannot delete {}", s.folder))?;
        self.remove_partial_manifests(&s.folder);
        unread::remove(self, &s.folder);
        if s.complete
            && let Ok(meta) = self.meta_dir()
            && let Ok(Some(dir)) = meta.try_open_dir(b"manifests")
        {
            let _ = dir.unlink(crate::store::manifest::file_name(&s.folder).as_bytes());
        }
        Ok(())
    }

    /// Removes the partial manifests of `folder`'s runs (and, for a deleted
    /// snapshot, its manifest): best effort, they are only bookkeeping.
    pub fn remove_partial_manifests(&self, folder: &str) {
        let Ok(meta) = self.meta_dir() else { return };
        let Ok(Some(dir)) = meta.try_open_dir(b"manifests") else { return };
        let name = crate::store::manifest::file_name(folder);
        for n in crate::store::manifest::partials(&dir, &name) {
            let _ = dir.unlink(&n);
        }
    }

    /// Finishes deletions a killed run left in the trash.
    pub fn empty_trash(&self) -> Result<()> {
        let trash = self.trash()?;
        for name in trash.names().context("cannot list the trash")? {
            crate::fs::delete::remove_tree(&trash, &name).context("cannot empty the trash")?;
        }
        Ok(())
    }

    fn trash(&self) -> Result<Dir> {
        let meta = self.meta_dir()?;
        match meta.try_open_dir(b"trash")? {
            Some(d) => Ok(d),
            None => meta.create_dir(b"trash").context("cannot create the trash folder"),
        }
    }
}

/// Snapshots of job `s` from their folder names, in the order given (for
/// unit tests of plans).
#[cfg(test)]
pub fn named(names: &[&str]) -> Vec<Snapshot> {
    names
        .iter()
        .map(|n| {
            let (time, complete) = parse_folder_name("s", n).expect("a snapshot name of job s");
            Snapshot { folder: (*n).to_string(), time, complete }
        })
        .collect()
}

/// The same, ordered by time as [`Store::snapshots`] returns them.
#[cfg(test)]
pub fn named_in_order(names: &[&str]) -> Vec<Snapshot> {
    let mut v = named(names);
    v.sort_by_key(|s| s.time);
    v
}

/// What [`Store::new_stamp`] does at `now`, given the times already taken.
#[derive(Debug, PartialEq, Eq)]
enum Stamp {
    /// Use this time.
    Free(DateTime<Utc>),
    /// A snapshot holds this second or the next: wait this long, then look again.
    Wait(std::time::Duration),
    /// The newest snapshot is well ahead of the clock: the clock (or the
    /// snapshot's name) is wrong. `t` is the first free second after now.
    Skewed { t: DateTime<Utc>, newest: DateTime<Utc> },
}

/// How far ahead of the clock a snapshot may be named before the clock is
/// called wrong (a run of a second ago, rounded, plus slack).
const SKEW_TOLERANCE_SECS: i64 = 2;

fn pick_stamp(taken: &[DateTime<Utc>], now: DateTime<Utc>) -> Stamp {
    let second = now.with_nanosecond(0).expect("zero nanoseconds is valid");
    let Some(&newest) = taken.iter().max() else { return Stamp::Free(second) };
    if newest < second {
        return Stamp::Free(second);
    }
    if newest - second > chrono::Duration::seconds(SKEW_TOLERANCE_SECS) {
        let mut t = second;
        while taken.contains(&t) {
            t += chrono::Duration::seconds(1);
        }
        return Stamp::Skewed { t, newest };
    }
    let until = newest + chrono::Duration::seconds(1);
    Stamp::Wait((until - now).to_std().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone};

    #[test]
    fn a_second_run_within_the_same_second_waits_for_the_next_one() {
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 18, 0, 5).unwrap();
        let now = t + chrono::Duration::milliseconds(300);
        assert_eq!(pick_stamp(&[], now), Stamp::Free(t));
        assert_eq!(pick_stamp(&[t - chrono::Duration::seconds(1)], now), Stamp::Free(t));
        // The same second is taken: wait until the next one starts, no warning.
        assert_eq!(pick_stamp(&[t], now), Stamp::Wait(std::time::Duration::from_millis(700)));
        // A run named a second ahead (a clock stepped back a little): wait too.
        let ahead = t + chrono::Duration::seconds(1);
        assert_eq!(pick_stamp(&[t, ahead], now), Stamp::Wait(std::time::Duration::from_millis(1700)));
    }

    #[test]
    fn a_snapshot_far_ahead_of_the_clock_is_called_skew() {
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 18, 0, 5).unwrap();
        let future = t + chrono::Duration::hours(3);
        assert_eq!(pick_stamp(&[t, future], t), Stamp::Skewed { t: t + chrono::Duration::seconds(1), newest: future });
    }

    #[test]
    fn names_are_utc_day_first() {
        let t = Utc.with_ymd_and_hms(2019, 10, 7, 13, 32, 58).unwrap();
        assert_eq!(folder_name("server", t, true), "server.07-10-19_13-32-58");
        assert_eq!(folder_name("server", t, false), "server.07-10-19_13-32-58.incomplete");
        assert_eq!(parse_folder_name("server", "server.07-10-19_13-32-58"), Some((t, true)));
        assert_eq!(parse_folder_name("server", "server.07-10-19_13-32-58.incomplete"), Some((t, false)));
    }

    #[test]
    fn foreign_and_malformed_names_are_not_snapshots() {
        for f in [
            "server.rbackup",
            "server2.07-10-19_13-32-58",
            "server.07-10-19_13-32-58.old",
            "server.32-10-19_13-32-58",
            "server.07-13-19_13-32-58",
            "server.07-10-19_24-00-00",
            "server.7-10-19_13-32-58",
            "server.07-10-19 13-32-58",
            "other.07-10-19_13-32-58",
        ] {
            assert_eq!(parse_folder_name("server", f), None, "{f}");
        }
    }

    #[test]
    fn two_digit_years_are_this_century() {
        let t = parse_stamp("01-01-99_00-00-00").unwrap();
        assert_eq!(t.year(), 2099);
        let t = parse_stamp("01-01-70_00-00-00").unwrap();
        assert_eq!(t.year(), 2070);
    }

    #[test]
    fn job_names_that_could_escape_are_refused() {
        for bad in ["", "a/b", "..", "../x", ".hidden", "a b", "x\n", "a..b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["server", "web-01", "db_main", "host.example.org", "me@host"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
    }
}
