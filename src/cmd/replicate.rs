//! `replicate --to DEST`: copy every complete snapshot a second backups
//! folder lacks, oldest first, each under its own name (a second drive).
//!
//! A replica is taken like a backup whose source is the original snapshot,
//! read through the local agent (`cmd::backup`): written as `.incomplete`
//! and renamed when flushed, resumed by the next `replicate` after a kill,
//! and every file unchanged since the previous replica hardlinked to it —
//! so the second drive holds the history at the cost of what changed, like
//! the first (where `cp -a` would break the links). Before a replica is
//! named complete, each file's content digest must equal the one the
//! original's manifest recorded: the copy of a file that rotted on the
//! first drive is refused, not made.
//!
//! Over SSH (`[user@]host:/path`), the off-site host's append-only agent
//! takes each replica the same way ([`super::replicate_ssh`]): the desktop
//! serves the original and sends its manifest, the agent checks and commits.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd::backup::{self, Replica, RunOptions};
use crate::cmd::replicate_ssh::{Connected, Remote};
use crate::config::{Destination, Job, SourceSpec};
use crate::error::Code;
use crate::fs::safefs::Dir;
use crate::store::manifest::{self, FinishedManifest, Kind, ManifestReader};
use crate::store::rules::Rules;
use crate::store::{Snapshot, Store, lock};
use crate::{info, usage, warn};

/// Whether a local destination that holds no replica of the job may get
/// its first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    /// Never (`replicate_after_backup`, `replicate` of the configured
    /// `replicas`): a drive not mounted is an error, not a copy onto the
    /// disk beneath its mount point.
    Never,
    /// Yes, unless a replicate reached it before (`replicate --to DEST`):
    /// then it is a drive not mounted too.
    IfNew,
    /// Yes (`replicate --to DEST --new-drive`: a new drive in place of one
    /// that was lost).
    Always,
}

/// Replicates into `dest` the complete snapshots of `job` that its rules
/// keep (all of them without rules), then, with `prune = true`, deletes
/// there what they don't. A local destination gets its first replica as
/// `seed` allows.
pub fn run(job: &Job, dest: &Destination, dry_run: bool, seed: Seed) -> Result<Code> {
    let (to, remote) = destination(&dest.to)?;
    if remote.is_none() {
        refuse_overlap(&to, &job.backups_folder)?;
        if seed == Seed::Never && away(job, dest, &to)? {
            return Ok(Code::Ok);
        }
        require_local(job, &dest.key(), &to, seed)?;
    }
    let source = Store::open(&job.backups_folder, &job.name)?;
    source.require_snapshots()?;
    let shown = crate::store::shown(&job.backups_folder, &job.name);
    // Nothing is deleted from the originals while they are read.
    let _readers = lock::acquire_readers(&source.meta_dir()?, "replicate", &shown)?;
    let originals: Vec<Snapshot> = source.snapshots()?.into_iter().filter(|s| s.complete).collect();
    // One SSH connection for every session with an off-site agent.
    let remote = remote.as_ref().map(|r| r.connect(job)).transpose()?;
    let have: Vec<Snapshot> = match &remote {
        Some(r) => r.held(job).with_context(|| format!("asking {r} which snapshots it holds"))?,
        None => Store::open(&to, &job.name).map_or_else(|_| Ok(Vec::new()), |s| s.snapshots())?,
    };
    let wanted = wanted(&originals, &have, &dest.keep, chrono::Utc::now())?;
    let missing: Vec<&Snapshot> =
        wanted.iter().copied().filter(|o| !have.iter().any(|h| h.complete && h.time == o.time)).collect();
    let code = if missing.is_empty() {
        let of = if dest.keep.is_empty() { "every snapshot" } else { "every snapshot its rules keep" };
        info!("{} holds {of} of {shown} ({} of them)", to.display(), wanted.len());
        Code::Ok
    } else {
        let of = if dest.keep.is_empty() { String::new() } else { " its rules keep".to_string() };
        info!("{} of the {} snapshots{of} to replicate into {}", missing.len(), wanted.len(), to.display());
        copy_each(job, dest, &to, remote.as_ref(), &have, &missing, dry_run)?
    };
    if !dry_run && missing.is_empty() {
        note_held(&source, dest, have.iter().filter(|h| h.complete).map(|h| h.folder.clone()));
    }
    if dest.prune && dry_run {
        // What prune would remove once the missing ones are there.
        let mut after: Vec<Snapshot> = have.iter().filter(|h| h.complete).cloned().collect();
        after.extend(missing.iter().map(|m| (*m).clone()));
        for d in crate::cmd::prune::plan(&after, &dest.keep, chrono::Utc::now())?.iter().filter(|d| !d.keep) {
            println!("{:<12} {}  ({}, on {})", "would remove", d.snapshot.folder, d.reason, to.display());
        }
        return Ok(code);
    }
    if dest.prune && Store::open(&to, &job.name).is_ok_and(|s| s.snapshots().is_ok_and(|v| !v.is_empty())) {
        info!("pruning {} by its own rules", to.display());
        let there = Job { backups_folder: to.clone(), ..job.clone() };
        let pruned = crate::cmd::prune::run(&there, &dest.keep, dry_run);
        // What is there now, not what was copied.
        if let Ok(left) = Store::open(&to, &job.name).and_then(|s| s.snapshots()) {
            note_held(&source, dest, left.into_iter().filter(|s| s.complete).map(|s| s.folder));
        }
        let pruned = pruned.with_context(|| format!("pruning the replica {}", to.display()))?;
        return Ok(Code::worst([code, pruned]));
    }
    Ok(code)
}

/// The originals a destination with the rules `keep` holds: every one
/// without rules; else those the rules keep, applied to the originals and
/// the replicas it already has together (a month's newest snapshot may be
/// one the originals no longer hold). Oldest first.
pub fn wanted<'a>(
    originals: &'a [Snapshot],
    held: &[Snapshot],
    keep: &Rules,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<&'a Snapshot>> {
    if keep.is_empty() {
        return Ok(originals.iter().filter(|s| s.complete).collect());
    }
    let mut all: Vec<Snapshot> = originals.iter().filter(|s| s.complete).cloned().collect();
    let only_held: Vec<Snapshot> =
        held.iter().filter(|h| h.complete && !all.iter().any(|o| o.time == h.time)).cloned().collect();
    all.extend(only_held);
    let kept: Vec<_> =
        crate::cmd::prune::plan(&all, keep, now)?.into_iter().filter(|d| d.keep).map(|d| d.snapshot.time).collect();
    Ok(originals.iter().filter(|s| s.complete && kept.contains(&s.time)).collect())
}

/// The snapshots `dest` wants (its rules) and was not known to hold after
/// its last replicate that succeeded, each with why a prune keeps it;
/// `None` if it never had one (then nothing can be said to have reached it).
pub fn not_yet_on(job: &Job, dest: &Destination) -> Result<Option<Vec<(String, String)>>> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    let Some(reached) = crate::store::held::remembered(&store, &dest.key()) else { return Ok(None) };
    let (holds, when) = (&reached.holds, reached.shown());
    let held: Vec<Snapshot> = holds
        .iter()
        .filter_map(|f| {
            let (time, complete) = crate::store::parse_folder_name(&job.name, f)?;
            Some(Snapshot { folder: f.clone(), time, complete })
        })
        .collect();
    let originals: Vec<Snapshot> = store.snapshots()?.into_iter().filter(|s| s.complete).collect();
    Ok(Some(
        wanted(&originals, &held, &dest.keep, chrono::Utc::now())?
            .into_iter()
            .filter(|o| !holds.contains(&o.folder))
            .map(|o| (o.folder.clone(), format!("not yet on {} (last reached {when})", dest.to)))
            .collect(),
    ))
}

/// Records that `dest` holds `holds` ([`crate::store::held`]); a record
/// that can't be written is said.
fn note_held(source: &Store, dest: &Destination, holds: impl Iterator<Item = String>) {
    if let Err(e) = crate::store::held::remember(source, &dest.key(), holds.collect()) {
        warn!("{e:#}: a prune after a failed replica to {} will not prune at all", dest.to);
    }
}

/// Copies each of `missing` (oldest first) into the backups folder `to`,
/// or through the append-only agent of `remote`; `have` is what it holds.
/// After each, what `dest` holds is recorded.
fn copy_each(
    job: &Job,
    dest: &Destination,
    to: &Path,
    remote: Option<&Connected>,
    have: &[Snapshot],
    missing: &[&Snapshot],
    dry_run: bool,
) -> Result<Code> {
    let source = Store::open(&job.backups_folder, &job.name)?;
    let manifests = manifest::folder(&source.meta_dir()?)?;
    let mut worst = Code::Ok;
    let mut holds: Vec<String> = have.iter().filter(|h| h.complete).map(|h| h.folder.clone()).collect();
    for original in missing {
        // What a dry run can say without the replicas before it being
        // there to link from: which snapshots go (`status` says how much).
        if dry_run {
            match &remote {
                Some(remote) => println!("replicate {} to {remote}", original.folder),
                None => println!("replicate {} to {}", original.folder, to.display()),
            }
            continue;
        }
        if let Some(remote) = &remote {
            // As below: the next one would link from a replica not there.
            let code =
                remote.replicate(job, &source, original).with_context(|| format!("replicating {}", original.folder))?;
            worst = Code::worst([worst, code]);
            holds.push(original.folder.clone());
            note_held(&source, dest, holds.iter().cloned());
            continue;
        }
        let resume = have.iter().any(|h| !h.complete && h.time == original.time);
        let replica =
            Replica { time: original.time, manifest: (manifests.clone(), manifest::file_name(&original.folder)) };
        let copy = Job {
            source: Some(SourceSpec::Local(job.backups_folder.join(&original.folder))),
            backups_folder: to.to_path_buf(),
            // Everything the snapshot holds, as it holds it.
            excludes: Vec::new(),
            paths: Vec::new(),
            devices: true,
            one_file_system: false,
            pre_hook: None,
            post_hook: None,
            log_file: None,
            ..job.clone()
        };
        let opts = RunOptions { resume, dry_run, replica_of: Some(replica), ..RunOptions::default() };
        info!("{} {}", if resume { "continuing the replica of" } else { "replicating" }, original.folder);
        let result =
            backup::run_with(&copy, &opts, |job| crate::transport::connect(job, crate::wire::msg::Role::Source));
        match result {
            Ok(report) => {
                if !dry_run {
                    crate::cmd::run::print_summary(&report, dry_run);
                    holds.push(original.folder.clone());
                    note_held(&source, dest, holds.iter().cloned());
                }
                worst = Code::worst([worst, report.code]);
            }
            Err(e) => {
                // The next snapshot would link from a replica that isn't
                // there: stop here; `replicate` again goes on from it.
                return Err(e.context(format!("replicating {}", original.folder)));
            }
        }
    }
    Ok(worst)
}

/// `DEST`: a local folder (absolute), or `[user@]host:/path` and the
/// append-only agent there (the path as a folder, for messages).
pub fn destination(to: &str) -> Result<(PathBuf, Option<Remote>)> {
    Ok(match SourceSpec::parse_as(to, "replica destination")? {
        SourceSpec::Local(p) => (p, None),
        SourceSpec::Remote { user, host, path } => (PathBuf::from(to), Some(Remote { user, host, path })),
    })
}

/// Whether `dest` (a local folder, `to`) is a drive away within its
/// `away_days`: not there, reached before, not long ago. Said so; the
/// snapshots wait for it (a prune keeps them, docs/design.md rule 12).
/// Away longer than that is an error.
fn away(job: &Job, dest: &Destination, to: &Path) -> Result<bool> {
    if dest.away_days == 0 || to.join(format!("{}.rbackup", job.name)).is_dir() {
        return Ok(false);
    }
    let store = Store::open(&job.backups_folder, &job.name)?;
    let Some(reached) = crate::store::held::remembered(&store, &dest.key()) else { return Ok(false) };
    if !reached.within_days(dest.away_days) {
        bail!(
            "{} has been away since {}, longer than its away_days = {}: mount the drive (its snapshots wait for it \
             on the backups folder)",
            to.display(),
            reached.shown(),
            dest.away_days
        );
    }
    info!(
        "{} is away (last reached {}; it may be away {} days): its snapshots wait for it",
        to.display(),
        reached.shown(),
        dest.away_days
    );
    Ok(true)
}

/// A local destination: one that holds the job's replicas (its
/// `NAME.rbackup`), or as `seed` allows, a folder to make them in, made if
/// missing beneath a folder that is there (never its parents: those of a
/// drive not mounted are the mount point's). A destination on the backups
/// folder's own filesystem is said to be, once. `named` is the
/// destination as the job names it (its record in [`crate::store::held`]).
fn require_local(job: &Job, named: &str, to: &Path, seed: Seed) -> Result<()> {
    let meta = to.join(format!("{}.rbackup", job.name));
    if meta.is_dir() {
        return Ok(());
    }
    let reached = Store::open(&job.backups_folder, &job.name)
        .ok()
        .and_then(|s| crate::store::held::remembered(&s, named))
        .map(|r| (r.holds.len() as u64, r.shown()));
    match (seed, &reached) {
        (Seed::Never | Seed::IfNew, Some((n, when))) => {
            let e = anyhow::anyhow!(
                "{} holds no replica of {} now, but a replicate reached it on {when} and left {} there: the drive \
                 is not mounted? Nothing was written; mount it and run again. (A new, empty drive in place of a \
                 lost one: `{}`.)",
                to.display(),
                job.name,
                crate::report::count(*n, "snapshot", "snapshots"),
                job.command(&format!("replicate --to {} --new-drive", to.display()))
            );
            // Typed by hand, it is the command that is refused (exit 2).
            return Err(if seed == Seed::IfNew { usage!("{e}") } else { e });
        }
        (Seed::Never, None) => bail!(
            "{} holds no replica of {} (a drive not mounted?); nothing was written there. The first replica is \
             made by hand: `{}`",
            to.display(),
            job.name,
            job.command(&format!("replicate --to {}", to.display()))
        ),
        _ => {}
    }
    let parent = to.parent().filter(|p| p.is_dir()).ok_or_else(|| {
        usage!(
            "--to {}: its parent folder isn't there (a drive not mounted?); rbackup makes only the last folder",
            to.display()
        )
    })?;
    let dev = |p: &Path| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let here = if to.is_dir() { dev(to) } else { dev(parent) };
    if here.is_some() && here == dev(&job.backups_folder) {
        warn!(
            "{} is on the same filesystem as the backups folder {}: a copy there is no second drive (is the drive \
             mounted?)",
            to.display(),
            job.backups_folder.display()
        );
    } else if here.is_some() && here == dev(Path::new("/")) {
        warn!(
            "{} is on the root filesystem, not on a drive of its own: if a drive belongs there, it is not mounted \
             (the first replica is made there all the same)",
            to.display()
        );
    }
    Ok(())
}

/// The replica's folder must be neither inside the originals' nor around them.
fn refuse_overlap(to: &Path, backups: &Path) -> Result<()> {
    let canon = |p: &Path| crate::fs::safefs::resolve_existing_ancestor(p).unwrap_or_else(|| p.to_path_buf());
    let (to_c, backups_c) = (canon(to), canon(backups));
    if to_c.starts_with(&backups_c) || backups_c.starts_with(&to_c) {
        bail!(usage!(
            "--to {}: it overlaps the backups folder {}; a replica belongs on another drive",
            to.display(),
            backups.display()
        ));
    }
    Ok(())
}

/// Checks the replica's manifest, just written, against its original's:
/// every file both record must have the same content digest. `folder` names
/// the replica (`dest`, still `.incomplete`) in messages. A file that
/// differs is removed from it, so that the next `replicate`, which resumes
/// the replica, reads it again rather than keep it.
pub fn check_against(replica: &Replica, written: Option<&FinishedManifest>, folder: &str, dest: &Dir) -> Result<()> {
    let (dir, name) = &replica.manifest;
    let Some(mut theirs) = ManifestReader::open(dir, name.as_bytes()).context("reading the original's manifest")?
    else {
        warn!("{folder}: the original has no manifest; the copy is checked only against what was read");
        return Ok(());
    };
    let Some(written) = written else {
        bail!("{folder}: the replica's manifest could not be written, so it can't be checked: not made")
    };
    let mut ours = written.reader()?;
    let (mut checked, mut damaged_count, mut damaged) = (0u64, 0u64, Vec::new());
    while let Some(mine) = ours.next_record()? {
        if mine.kind != Kind::File {
            continue;
        }
        // Both lists are in the same order: walk the original's to this path.
        let found = loop {
            match theirs.next_record()? {
                Some(r) if r.path == mine.path => break Some(r),
                Some(r) if manifest::dfs_cmp(&r.path, &mine.path).is_lt() => {}
                _ => break None,
            }
        };
        let Some(orig) = found else { continue };
        if theirs.digest() != ours.digest() {
            continue;
        }
        if let (Some(a), Some(b)) = (orig.hash, mine.hash) {
            if a != b {
                let (parent, name) = match mine.path.iter().rposition(|&b| b == b'/') {
                    Some(i) => (&mine.path[..i], &mine.path[i + 1..]),
                    None => (&b""[..], &mine.path[..]),
                };
                let dir = if parent.is_empty() { Ok(dest.clone()) } else { dest.resolve_dir(parent) };
                if let Err(e) = dir.and_then(|d| d.unlink(name)) {
                    warn!("{folder}: {} could not be removed: {e}", crate::fs::safefs::Shown(&mine.path));
                }
                if damaged.is_empty() {
                    damaged.clone_from(&mine.path);
                }
                damaged_count += 1;
                continue;
            }
            checked += 1;
        }
    }
    if damaged_count > 0 {
        let more = if damaged_count > 1 { format!(" (and {} more)", damaged_count - 1) } else { String::new() };
        bail!(
            "{folder}: {}{more} reads differently from what its snapshot recorded (the original is damaged; \
             `rbackup verify` names what): not replicated",
            crate::fs::safefs::Shown(&damaged)
        );
    }
    crate::debug!("{folder}: {checked} files checked against the original's manifest");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(stamp: &str) -> Snapshot {
        let time = crate::store::parse_stamp(stamp).unwrap();
        Snapshot { folder: format!("s.{stamp}"), time, complete: true }
    }

    fn stamps(v: &[&Snapshot]) -> Vec<String> {
        v.iter().map(|s| s.stamp()).collect()
    }

    #[test]
    fn without_rules_every_original_is_wanted() {
        let originals = [snap("01-11-26_03-00-00"), snap("02-11-26_03-00-00")];
        let got = wanted(&originals, &[], &Rules::default(), chrono::Utc::now()).unwrap();
        assert_eq!(got.len(), 2);
    }

    /// A monthly destination takes each month's newest snapshot; one it
    /// already holds counts, so a newer original of that month is taken
    /// (its own prune then drops the older one), and one the originals
    /// lost is not asked for.
    #[test]
    fn a_monthly_destination_takes_each_months_newest() {
        let originals = [
            snap("30-10-26_03-00-00"),
            snap("31-10-26_03-00-00"),
            snap("02-11-26_03-00-00"),
            snap("03-11-26_03-00-00"),
        ];
        let held = [snap("15-09-26_03-00-00"), snap("02-11-26_03-00-00")];
        let keep = Rules { keep_monthly: Some(12), ..Rules::default() };
        let now = crate::store::parse_stamp("04-11-26_00-00-00").unwrap();
        let got = wanted(&originals, &held, &keep, now).unwrap();
        assert_eq!(stamps(&got), ["31-10-26_03-00-00", "03-11-26_03-00-00"]);
    }
}
