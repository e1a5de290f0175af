//! `restore`: push a snapshot, or chosen paths of it, back to the server (or
//! to a local folder) through a write-confined agent.
//!
//! Roles swap: the desktop runs the source over the snapshot, and the agent
//! (`rbackup serve --write --root R`, normally root through a forced command)
//! runs the sink with the restore policy: the snapshot's version wins — also
//! over newer files — every replaced file is written under a temporary name
//! and renamed over, unchanged files are skipped by size, mtime and metadata,
//! and changed ones travel as deltas against what the destination has. The
//! agent reports every action and problem back, so a dry run lists exactly
//! what a real run does.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use crate::config::{Job, SourceSpec};
use crate::error::Code;
use crate::fs::safefs::Shown;
use crate::report::Stats;
use crate::source::{self, Selection};
use crate::store::Store;
use crate::store::unread::Unread;
use crate::transport::Connection;
use crate::wire::msg::{LogKind, Role, SessionOptions};
use crate::{info, store::lock, usage, warn};

/// What to restore, and where.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// A folder name, `latest`, or a time; `None` is the latest.
    pub snapshot: Option<String>,
    /// Paths relative to the snapshot's root; empty restores everything.
    pub paths: Vec<String>,
    /// `[user@]host:/abs/path` or `/abs/path`; `None` restores in place.
    pub to: Option<String>,
    pub delete: bool,
    pub dry_run: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub code: Code,
    pub snapshot: String,
    pub to: String,
    pub stats: Stats,
    pub problems: u64,
    pub seconds: f64,
}

/// Checks and normalizes `--path` values: relative to the snapshot root
/// (a leading `/` is allowed and means the same), no `..`.
pub fn normalize_paths(paths: &[String]) -> Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| crate::store::select::normalize(p.as_bytes()).map_err(|why| usage!("--path {p:?}: {why}")))
        .collect()
}

/// The folders a restore with `--delete` must not clean up, because the
/// snapshot lacks something of theirs: its backup could not read it (see
/// `store::unread`). Says so; refuses `--delete` when more was missing
/// than the snapshot's record holds.
fn kept_by_delete(store: &Store, folder: &str, delete: bool) -> Result<Vec<Vec<u8>>> {
    match crate::store::unread::read(store, folder)? {
        Unread::Paths(p) if p.is_empty() => Ok(Vec::new()),
        Unread::Paths(p) => {
            let first = Shown(&p[0]);
            let more = if p.len() > 1 { format!(" and {} more", p.len() - 1) } else { String::new() };
            warn!("{folder} lacks what its backup could not read: {first}{more} (see the backup's log)");
            if !delete {
                return Ok(Vec::new());
            }
            let kept = crate::store::unread::kept_folders(&p);
            warn!(
                "--delete leaves alone what the destination has beyond the snapshot in the {} folder(s) holding them",
                kept.len()
            );
            Ok(kept)
        }
        Unread::TooMany if delete => Err(usage!(
            "{folder} lacks more than 100,000 entries its backup could not read: --delete could remove what it \
             never held; restore without --delete, or choose another snapshot with --snapshot"
        )),
        Unread::TooMany => {
            warn!("{folder} lacks more than 100,000 entries its backup could not read (see the backup's log)");
            Ok(Vec::new())
        }
    }
}

/// Runs a restore for `job`.
pub fn run(job: &Job, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let store = Store::open(&job.backups_folder, &job.name)?;
    let snapshot = crate::store::select::pick(&store.snapshots()?, &job.name, opts.snapshot.as_deref())?;
    let meta_dir = store.meta_dir()?;
    let folder_shown = crate::store::shown(&job.backups_folder, &job.name);
    let _lock = lock::acquire_readers(&meta_dir, "restore", &folder_shown)?;
    let snap_dir = store.open_snapshot(&snapshot)?;
    let kept = kept_by_delete(&store, &snapshot.folder, opts.delete)?;
    let mut paths = normalize_paths(&opts.paths)?;
    if paths.is_empty() && !job.paths.is_empty() {
        // A job of chosen `paths` restores those: the folders on the way to
        // them keep what the snapshot never held (with `--delete` too).
        paths = job.paths.iter().map(|p| p.clone().into_bytes()).filter(|p| exists_in(&snap_dir, p)).collect();
        if paths.is_empty() {
            return Err(usage!("{} holds none of the job's paths ({})", snapshot.folder, job.paths.join(", ")));
        }
    }
    for p in &paths {
        if !p.is_empty() && !exists_in(&snap_dir, p) {
            return Err(usage!("{} has no {}", snapshot.folder, String::from_utf8_lossy(p)));
        }
    }

    let target = match opts.to.as_deref().or(job.restore_to.as_deref()) {
        Some(to) => SourceSpec::parse_as(to, "restore destination")?,
        None => job.source.clone().ok_or_else(|| usage!("nowhere to restore to: give --to DEST"))?,
    };
    let (conn, path) = match &target {
        SourceSpec::Local(p) => {
            refuse_inside_backups(p, &job.backups_folder)?;
            // Walked without following anything, each folder checked: no
            // other user can redirect root's writes (crate::fs::target).
            let made = crate::fs::target::prepare(p, opts.dry_run)
                .with_context(|| format!("restore of {} to {}", snapshot.folder, p.display()))?;
            // A folder that was there keeps its owner and mode: the
            // snapshot root's are for a folder this restore makes.
            let keep_root = made == crate::fs::target::Target::Existed;
            (Connection::local_sink(p, keep_root, job.io_timeout)?, p.clone())
        }
        SourceSpec::Remote { user, host, path } => {
            (Connection::ssh(user.as_deref(), host, job, Role::Sink)?, path.clone())
        }
    };
    let hello = crate::session::hello(
        Role::Sink,
        &path,
        SessionOptions {
            compress: job.compress,
            devices: true,
            delete: opts.delete,
            dry_run: opts.dry_run,
            delta: matches!(target, SourceSpec::Remote { .. }),
            ..SessionOptions::default()
        },
    );
    let session = conn.handshake(&hello)?;
    if !opts.dry_run {
        info!("restoring {} to {target}", snapshot.folder);
    }
    let crate::transport::Session { mut reader, writer, conn: mut handle, .. } = session;
    let mut problems = 0u64;
    let dry_run = opts.dry_run;
    let mut on_log = |kind: LogKind, text: &str| match kind {
        LogKind::Action if dry_run => println!("{text}"),
        LogKind::Action => crate::trace!("{text}"),
        LogKind::Problem => {
            problems += 1;
            warn!("{text}");
        }
        LogKind::Note => info!("{text}"),
    };
    let mut selection = Selection::new(&[], &paths)?;
    selection.keep_unlisted = kept;
    let result = source::run(snap_dir, selection, job.compress, job.bwlimit, &mut reader, writer, &mut on_log);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            // `source::run` has joined its threads: every wait in it is bounded.
            handle.stop();
            let what = format!("restore of {} to {target}", snapshot.folder);
            if let Some(signal) = crate::interrupt::received() {
                return Err(anyhow!(signal).context(format!("{what} stopped (run the restore again to finish it)")));
            }
            let said = if crate::transport::from_peer(&e) { handle.agent_said() } else { String::new() };
            return Err(anyhow!("{what} failed: {e:#}{said}"));
        }
    };
    handle.finish()?;
    Ok(RestoreReport {
        code: if problems > 0 { Code::Partial } else { Code::Ok },
        snapshot: snapshot.folder,
        to: target.to_string(),
        stats: Stats::from_pairs(&summary),
        problems,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn exists_in(snap: &crate::fs::safefs::Dir, rel: &[u8]) -> bool {
    let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    };
    let parent = if dir.is_empty() { Ok(snap.clone()) } else { snap.resolve_dir(dir) };
    parent.is_ok_and(|p| p.try_stat(name).is_ok_and(|s| s.is_some()))
}

/// A restore must never write into the backups folder: that is where the
/// immutable snapshots live.
fn refuse_inside_backups(to: &Path, backups: &Path) -> Result<()> {
    let canon =
        |p: &Path| -> PathBuf { crate::fs::safefs::resolve_existing_ancestor(p).unwrap_or_else(|| p.to_path_buf()) };
    let (to, backups) = (canon(to), canon(backups));
    if to.starts_with(&backups) || backups.starts_with(&to) {
        return Err(usage!(
            "refusing to restore to {}: it overlaps the backups folder {}, where snapshots must stay untouched",
            to.display(),
            backups.display()
        ));
    }
    Ok(())
}

/// Prints the end-of-restore summary.
pub fn print_summary(r: &RestoreReport, dry_run: bool) {
    let s = &r.stats;
    let what = if dry_run { "dry run of the restore" } else { "restore" };
    info!("{what} of {} to {}: {} in {:.1} s", r.snapshot, r.to, r.code.word(), r.seconds);
    info!(
        "  entries {}: unchanged {}, files sent {} (as delta {}), metadata changed {}, deleted {}",
        s.entries,
        s.kept,
        s.fetched_whole + s.fetched_delta,
        s.fetched_delta,
        s.metadata_fixed,
        s.removed
    );
    if r.problems > 0 {
        warn!("{} entries could not be restored (listed above)", r.problems);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_and_cannot_climb() {
        let p = normalize_paths(&["/etc/passwd".into(), "home/alice/".into(), "./a".into()]).unwrap();
        assert_eq!(p, vec![b"etc/passwd".to_vec(), b"home/alice".to_vec(), b"a".to_vec()]);
        assert!(normalize_paths(&["a/../../etc".into()]).is_err());
    }

    #[test]
    fn restoring_into_the_backups_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let bk = tmp.path().join("bk");
        std::fs::create_dir(&bk).unwrap();
        assert!(refuse_inside_backups(&bk.join("s.01-01-20_00-00-00/x"), &bk).is_err());
        assert!(refuse_inside_backups(&bk, &bk).is_err());
        assert!(refuse_inside_backups(tmp.path(), &bk).is_err());
        assert!(refuse_inside_backups(&tmp.path().join("elsewhere"), &bk).is_ok());
    }
}
