//! `backup` and `continue`: take a snapshot, or finish an interrupted one.
//!
//! The order of a run is what makes it crash-safe (docs/design.md rule 5): lock the
//! destination; connect and handshake *before* creating anything, so an
//! unreachable source leaves no empty folder behind; write everything into
//! `NAME.<stamp>.incomplete`; flush it to disk; rename it to its final name;
//! only then remove the interrupted runs it supersedes. A failure at any
//! point leaves the `.incomplete` for `continue`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use chrono::Utc;

use crate::config::{Job, SourceSpec};
use crate::error::Code;
use crate::fs::meta::Privileges;
use crate::fs::safefs::{Dir, Shown};
use crate::plan::Policy;
use crate::progress::Progress;
use crate::report::{Events, Problem, Stats};
use crate::sink::{ManifestSet, Recorder, SinkConfig};
use crate::store::{Snapshot, Store};
use crate::transport::{self, Connection, Handle, Session};
use crate::wire::msg::{Role, SessionOptions};
use crate::{info, store::lock, usage, warn};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Finish the latest `.incomplete` instead of starting a new snapshot.
    pub resume: bool,
    pub dry_run: bool,
    /// A replica (`replicate`): the snapshot is named with this time (its
    /// original's), and every file's content digest must equal the one the
    /// original's manifest records, or the replica is not made.
    pub replica_of: Option<Replica>,
    /// The append-only agent's run (`serve --append-only`): nothing is
    /// removed, not even the interrupted runs a new snapshot supersedes
    /// (docs/design.md rule 11).
    pub append_only: bool,
}

/// The snapshot a replica copies.
#[derive(Debug, Clone)]
pub struct Replica {
    pub time: chrono::DateTime<Utc>,
    /// The original's manifests folder and its manifest's name there.
    pub manifest: (Dir, String),
}

/// What a run produced, for reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub code: Code,
    pub snapshot: Option<String>,
    pub stats: Stats,
    pub problems: Vec<Problem>,
    pub seconds: f64,
}

/// Problems kept in memory for reports; all are counted and logged.
const PROBLEMS_KEPT: usize = 1000;

/// The desktop's view of a running sink: log as it goes, keep problems.
pub struct DesktopEvents {
    dry_run: bool,
    progress: Progress,
    pub problems: Vec<Problem>,
    /// Paths that may be missing from the snapshot (see `store::unread`).
    pub missing: crate::store::unread::Missing,
    /// Entries the source was refused access to (the ACL hint is for those).
    pub denied: u64,
    pub serious: u64,
    pub live: u64,
    /// Writes data back while the run goes on (not in a dry run).
    flusher: Option<crate::fs::writer::Flusher>,
}

impl DesktopEvents {
    pub fn new(dry_run: bool) -> DesktopEvents {
        let progress = Progress::new(dry_run || !crate::log::on_stderr(crate::log::Level::Info));
        DesktopEvents {
            dry_run,
            progress,
            problems: Vec::new(),
            missing: crate::store::unread::Missing::default(),
            denied: 0,
            serious: 0,
            live: 0,
            flusher: None,
        }
    }

    /// The exit code these problems call for.
    pub fn code(&self) -> Code {
        if self.serious > 0 {
            Code::Partial
        } else if self.live > 0 {
            Code::Vanished
        } else {
            Code::Ok
        }
    }
}

impl Events for DesktopEvents {
    fn action(&mut self, verb: &str, path: &[u8]) {
        // A dry run lists what would change; what stays as it is (a link to
        // the previous snapshot, a directory) only with -v: an unchanged tree
        // is a summary, not one line per entry.
        let unchanged = matches!(verb, "link" | "mkdir");
        if self.dry_run && (!unchanged || crate::log::on_stderr(crate::log::Level::Debug)) {
            println!("{verb:<8} {}", if path.is_empty() { ".".to_string() } else { format!("{:#}", Shown(path)) });
        } else {
            crate::trace!("{verb:<8} {}", Shown(path));
        }
    }

    fn problem(&mut self, problem: Problem) {
        warn!("{problem}");
        if problem.kind.is_live_change() {
            self.live += 1;
        } else {
            self.serious += 1;
        }
        if problem.is_permission_denied() {
            self.denied += 1;
        }
        if problem.may_be_missing() {
            self.missing.add(&problem.raw_path);
        }
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(problem);
        }
    }

    fn note(&mut self, text: &str) {
        info!("{text}");
    }

    fn progress(&mut self, stats: &Stats) {
        self.progress.update(stats);
        if let Some(f) = &mut self.flusher {
            f.wrote(stats.bytes_written);
        }
    }
}

/// Runs `backup` or `continue` for `job`.
pub fn run(job: &Job, opts: &RunOptions) -> Result<RunReport> {
    run_with(job, opts, |job| transport::connect(job, Role::Source))
}

/// Refuses a backups folder inside a local source that the excludes (or the
/// job's `paths`) don't leave out: every snapshot would hold the ones before
/// it, and its own `.incomplete` too.
fn refuse_folder_inside(source: &Path, folder: &Path, excludes: &[String], paths: &[String]) -> Result<()> {
    let source = std::fs::canonicalize(source).with_context(|| format!("resolving the source {}", source.display()))?;
    // The folder may not exist yet: resolve what does, keep the rest.
    let Some(folder) = crate::fs::safefs::resolve_existing_ancestor(folder) else { return Ok(()) };
    let Ok(rel) = folder.strip_prefix(&source) else { return Ok(()) };
    let rel_bytes = rel.as_os_str().as_encoded_bytes();
    if rel_bytes.is_empty() {
        return Err(usage!("the backups folder {} is the source itself: keep the backups elsewhere", folder.display()));
    }
    if crate::source::Selection::new(excludes, &[])?.leaves_out_dir(rel_bytes) {
        return Ok(());
    }
    let overlaps = |p: &String| rel.starts_with(p) || Path::new(p).starts_with(rel);
    if !paths.is_empty() && !paths.iter().any(overlaps) {
        return Ok(());
    }
    let shown = rel.display();
    Err(usage!(
        "the backups folder {} is inside the source {}: every snapshot would contain the ones before it. Keep the \
         backups elsewhere, or exclude the folder: --exclude '/{shown}/' (exclude = [\"/{shown}/\"] in the job)",
        folder.display(),
        source.display()
    ))
}

/// Runs `backup` or `continue`, reaching the agent through `connect` (which
/// returns the connection and the path to ask it for). Tests use this to play
/// a hostile agent.
pub fn run_with(
    job: &Job,
    opts: &RunOptions,
    connect: impl FnOnce(&Job) -> Result<(Connection, std::path::PathBuf)>,
) -> Result<RunReport> {
    run_session(job, opts, |job, options| {
        let (conn, path) = connect(job)?;
        conn.handshake(&crate::session::hello(Role::Source, &path, options))
    })
}

/// Runs `backup` or `continue` over the session `open` returns, given the
/// options the run asks of its source. The append-only agent opens its
/// session with the desktop that serves the original snapshot.
pub fn run_session(
    job: &Job,
    opts: &RunOptions,
    open: impl FnOnce(&Job, SessionOptions) -> Result<Session>,
) -> Result<RunReport> {
    let started = Instant::now();
    let source =
        job.source.clone().ok_or_else(|| usage!("no source: give --source SRC, or set `source` in the job"))?;
    if let SourceSpec::Local(p) = &source {
        let md = std::fs::metadata(p).with_context(|| format!("the source {} cannot be read", p.display()))?;
        if !md.is_dir() {
            return Err(anyhow!("the source {} is not a directory", p.display()));
        }
    }
    if let SourceSpec::Local(p) = &source {
        refuse_folder_inside(p, &job.backups_folder, &job.excludes, &job.paths)?;
    }
    let privs = Privileges::current();
    if !privs.root {
        warn!("not running as root: owners, trusted.* and security.* attributes of the source are not kept");
    }

    let store = if opts.dry_run && !job.backups_folder.exists() {
        None
    } else if opts.dry_run {
        Some(Store::open(&job.backups_folder, &job.name)?)
    } else {
        Some(Store::open_or_create(&job.backups_folder, &job.name)?)
    };
    let folder_shown = crate::store::shown(&job.backups_folder, &job.name);
    let _lock = match (&store, opts.dry_run) {
        (Some(store), false) => {
            Some(lock::acquire(&store.meta_dir()?, if opts.resume { "continue" } else { "backup" }, &folder_shown)?)
        }
        _ => None,
    };
    if let (Some(store), false) = (&store, opts.dry_run) {
        store.empty_trash()?;
    }
    let snapshots = match &store {
        Some(s) => s.snapshots()?,
        None => Vec::new(),
    };
    let plan = match &opts.replica_of {
        Some(r) => plan_replica(&snapshots, r.time, &folder_shown)?,
        None => plan_run(&snapshots, opts.resume, &folder_shown)?,
    };
    if let (true, Some(r), Some(store)) = (opts.append_only, &opts.replica_of, &store) {
        // Under the lock, as the complete snapshot above (rule 11).
        let name = crate::store::folder_name(&job.name, r.time, true);
        if crate::store::manifest::folder(&store.meta_dir()?)?.try_stat(name.as_bytes())?.is_some() {
            return Err(anyhow!("the manifest of {name} is already there: a replica never replaces it"));
        }
    }
    // A new snapshot's name is chosen now, for the pre_hook to know it.
    let new_stamp = match (&plan.resume, &store, &opts.replica_of) {
        (None, Some(_), Some(r)) if !opts.dry_run => Some(r.time),
        (None, Some(store), None) if !opts.dry_run => Some(store.new_stamp()?),
        _ => None,
    };
    if let Some(hook) = &job.pre_hook {
        if opts.dry_run {
            info!("dry run: the pre_hook is not run");
        } else {
            // The name the snapshot has once complete.
            let snapshot = match (&plan.resume, new_stamp) {
                (Some(s), _) => crate::store::folder_name(&job.name, s.time, true),
                (None, Some(t)) => crate::store::folder_name(&job.name, t, true),
                (None, None) => String::new(),
            };
            let env = crate::cmd::run::hook_env(job, &snapshot);
            // Before anything is written: a failure leaves no snapshot.
            crate::hooks::run("pre_hook", hook, &env, job.hook_timeout, crate::hooks::Output::Log)
                .context("the backup did not start")?;
        }
    }

    // Connect before creating anything.
    let session = open(
        job,
        SessionOptions {
            compress: job.compress,
            excludes: job.excludes.clone(),
            // A dry run fetches nothing, so the agent opens each file while
            // listing: what the real run couldn't read is reported, with
            // the exit code the real run would have (23).
            probe_read: opts.dry_run,
            one_file_system: job.one_file_system,
            bwlimit: job.bwlimit,
            only: job.paths.iter().map(|p| p.clone().into_bytes()).collect(),
            ..SessionOptions::default()
        },
    )?;
    crate::debug!("connected to the agent in {:.3} s", started.elapsed().as_secs_f64());

    let open = |s: &Snapshot| -> Result<Dir> { store.as_ref().expect("snapshots come from a store").open_snapshot(s) };
    let bases = plan.bases.iter().map(open).collect::<Result<Vec<_>>>()?;
    let (target, dest, fresh) = match (&plan.resume, &store) {
        (Some(s), _) => (s.clone(), Some(open(s)?), false),
        (None, Some(store)) if !opts.dry_run => {
            let t = new_stamp.expect("chosen above for a new snapshot");
            let (s, d) = store.create_incomplete(t)?;
            (s, Some(d), true)
        }
        (None, _) => {
            let t = Utc::now();
            (Snapshot { folder: crate::store::folder_name(&job.name, t, false), time: t, complete: false }, None, true)
        }
    };
    if !opts.dry_run {
        info!(
            "{} {} from {source} into {}",
            if opts.resume { "continuing" } else { "writing" },
            target.folder,
            job.backups_folder.display()
        );
    }

    let mut events = DesktopEvents::new(opts.dry_run);
    events.progress.limit = job.bwlimit;
    events.flusher = dest.clone().filter(|_| !opts.dry_run).map(crate::fs::writer::Flusher::new);
    let cfg = SinkConfig {
        dest: dest.clone(),
        fresh,
        bases,
        policy: Policy::Snapshot,
        delete: true,
        dry_run: opts.dry_run,
        devices: job.devices,
        delta: matches!(source, SourceSpec::Remote { .. }),
        // Compare with the times the backups' filesystem can hold.
        privs: store.as_ref().map_or(privs, |s| privs.storing_on(s.dir())),
        compress: job.compress,
        recorder: match (&store, opts.dry_run) {
            (Some(store), false) => recorder(store, &target, &plan)?,
            _ => Recorder::default(),
        },
        keep_root: false,
    };
    let driven = crate::session::drive_sink(session, cfg, &mut events);
    crate::debug!("listing and data done at {:.3} s", started.elapsed().as_secs_f64());
    events.progress.finish();
    events.flusher = None;
    let driven = match driven {
        Ok(d) => d,
        Err(crate::session::Failure { error, conn: Some(conn) }) => {
            // A replica is finished by replicating again (`job` is its copy job).
            let cont = match opts.replica_of {
                Some(_) => job.command(&format!("replicate --to {}", job.backups_folder.display())),
                None => job.command("--continue"),
            };
            return Err(failed(error, &source, &conn, dest.as_ref().filter(|_| !opts.dry_run), &target.folder, &cont));
        }
        Err(crate::session::Failure { error, conn: None }) => return Err(error),
    };
    let (mut stats, manifest) = (driven.outcome.stats, driven.outcome.manifest);
    stats.wire_bytes_received = driven.wire_bytes;

    let snapshot = match (&store, &dest) {
        (Some(store), Some(dest)) if !opts.dry_run => {
            // The manifest is whole and on disk before the snapshot is named
            // complete; it gets its own name after.
            let manifest = manifest.map(crate::store::manifest::ManifestWriter::finish).transpose();
            let manifest = manifest.unwrap_or_else(|e| {
                warn!("the manifest could not be finished, the snapshot will have none: {e:#}");
                None
            });
            if let Some(replica) = &opts.replica_of {
                // Before it is named complete: a copy of a damaged file is
                // refused, not made (it stays .incomplete).
                crate::cmd::replicate::check_against(replica, manifest.as_ref(), &target.folder, dest)?;
            }
            let done = store.commit(&target, dest)?;
            if let Err(e) = crate::store::unread::write(store, &done.folder, &events.missing) {
                warn!("{e:#}: a restore with --delete from {} may remove what it lacks", done.folder);
            }
            crate::debug!("flushed to disk and renamed at {:.3} s", started.elapsed().as_secs_f64());
            if let Some(m) = manifest
                && let Err(e) = m.commit()
            {
                warn!("the manifest of {} could not be named: {e}", done.folder);
            }
            store.remove_partial_manifests(&target.folder);
            for old in snapshots.iter().filter(|s| !s.complete && s.time < done.time && !opts.append_only) {
                if let Some(signal) = crate::interrupt::received() {
                    // The snapshot is complete; the next run removes the rest.
                    info!("{signal}: {} is left for the next run to remove", old.folder);
                    continue;
                }
                info!("removing {}, superseded by {}", old.folder, done.folder);
                store.delete(old).with_context(|| format!("removing the superseded {}", old.folder))?;
            }
            Some(done.folder)
        }
        _ => None,
    };
    if events.denied > 0 {
        let user = crate::cmd::check::backup_user(job).unwrap_or_else(|| "USER".into());
        warn!(
            "{} could not be read at the source: permission denied. On an ACL setup, a chmod may have shrunk the ACL \
             mask, or files were moved in without the default ACL: check with `getfacl`, fix with \
             `setfacl -Rm u:{user}:rX DIR` and `setfacl -Rdm u:{user}:rX DIR`, or use the capability setup \
             (docs/setup.md)",
            crate::report::count(events.denied, "entry", "entries")
        );
    }
    Ok(RunReport {
        code: events.code(),
        snapshot,
        stats,
        problems: std::mem::take(&mut events.problems),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The error of a run that stopped in the session. A signal wins over
/// whatever it caused (the agent dies of the same Ctrl-C); the agent's words
/// go only with an error on its side (see [`transport::from_peer`]).
/// `cont` is the command line that finishes the snapshot (`… --continue`).
fn failed(
    e: anyhow::Error,
    source: &SourceSpec,
    handle: &Handle,
    dest: Option<&Dir>,
    folder: &str,
    cont: &str,
) -> anyhow::Error {
    if let Some(signal) = crate::interrupt::received() {
        // What is complete is made durable: the machine may be shutting down.
        if let Some(dest) = dest
            && let Err(e) = dest.syncfs()
        {
            warn!("flushing {folder} to disk: {e}");
        }
        if dest.is_some() {
            warn!("{signal}: {folder} is kept; `{cont}` finishes it (or the next backup links from it)");
        }
        return anyhow!(signal).context(format!("backup from {source} stopped"));
    }
    if dest.is_some() {
        warn!("{folder} stays for `{cont}` (or the next backup) to finish");
    }
    let said = if transport::from_peer(&e) { handle.agent_said() } else { String::new() };
    let context = format!("backup from {source} failed");
    if said.is_empty() { e.context(context) } else { anyhow!("{e:#}{said}").context(context) }
}

/// The manifest of `target`, and those of the trees it links from.
fn recorder(store: &Store, target: &Snapshot, plan: &RunPlan) -> Result<Recorder> {
    let folder = crate::store::manifest::folder(&store.meta_dir()?).context("opening the manifests folder")?;
    let cursors = |s: &Snapshot| -> Vec<crate::store::manifest::Cursor> {
        let name = crate::store::manifest::file_name(&s.folder);
        let names = if s.complete { vec![name.into_bytes()] } else { crate::store::manifest::partials(&folder, &name) };
        names
            .iter()
            .filter_map(|n| crate::store::manifest::ManifestReader::open(&folder, n).ok().flatten())
            .map(|r| crate::store::manifest::Cursor::new(Some(r)))
            .collect()
    };
    let dest = if plan.resume.is_some() { ManifestSet::new(cursors(target)) } else { ManifestSet::default() };
    let bases = plan.bases.iter().map(|b| ManifestSet::new(cursors(b))).collect();
    let writer = match crate::store::manifest::ManifestWriter::create(&folder, &target.folder) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("no manifest for this snapshot: {e:#}");
            None
        }
    };
    Ok(Recorder { writer, dest, bases })
}

/// A replica of the snapshot taken at `time`: finish its own `.incomplete`
/// if there is one, else start it; link from the newest complete replica
/// before it (the one a replica of the next snapshot differs least from).
/// A complete snapshot of that time is refused here, under the lock: a
/// replica never writes into one (docs/design.md rule 11).
fn plan_replica(snapshots: &[Snapshot], time: chrono::DateTime<Utc>, folder: &str) -> Result<RunPlan> {
    if snapshots.iter().any(|s| s.complete && s.time == time) {
        return Err(anyhow!(
            "{folder} already holds the snapshot of {}: a replica is never rewritten",
            crate::store::stamp(time)
        ));
    }
    let resume = snapshots.iter().find(|s| !s.complete && s.time == time).cloned();
    let base =
        snapshots.iter().rfind(|s| s.complete && s.time < time).or_else(|| snapshots.iter().rfind(|s| s.complete));
    Ok(RunPlan { resume, bases: base.into_iter().cloned().collect() })
}

/// Which snapshot to write and what to link from.
struct RunPlan {
    /// `continue`: the `.incomplete` to finish.
    resume: Option<Snapshot>,
    /// Trees to link from, best first.
    bases: Vec<Snapshot>,
}

fn plan_run(snapshots: &[Snapshot], resume: bool, folder: &str) -> Result<RunPlan> {
    let latest_complete = snapshots.iter().rfind(|s| s.complete);
    if resume {
        let inc = snapshots.iter().rfind(|s| !s.complete).ok_or_else(|| {
            crate::usage!(
                "nothing to continue: there is no {folder}.incomplete (the last run finished); `--backup` takes \
                     a new snapshot"
            )
        })?;
        let base = snapshots.iter().rfind(|s| s.complete && s.time < inc.time).or(latest_complete);
        return Ok(RunPlan { resume: Some(inc.clone()), bases: base.into_iter().cloned().collect() });
    }
    // An interrupted run newer than the last snapshot holds files already
    // fetched: link from it first.
    let mut bases = Vec::new();
    if let Some(inc) = snapshots.iter().rfind(|s| !s.complete)
        && latest_complete.is_none_or(|c| inc.time > c.time)
    {
        bases.push(inc.clone());
    }
    bases.extend(latest_complete.cloned());
    Ok(RunPlan { resume: None, bases })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::named_in_order as snaps;

    #[test]
    fn backup_links_from_a_newer_interrupted_run_first() {
        let s = snaps(&["s.01-01-20_00-00-00", "s.02-01-20_00-00-00.incomplete"]);
        let p = plan_run(&s, false, "x").unwrap();
        let names: Vec<_> = p.bases.iter().map(|b| b.folder.as_str()).collect();
        assert_eq!(names, ["s.02-01-20_00-00-00.incomplete", "s.01-01-20_00-00-00"]);
    }

    #[test]
    fn backup_ignores_an_older_interrupted_run() {
        let s = snaps(&["s.01-01-20_00-00-00.incomplete", "s.02-01-20_00-00-00"]);
        let p = plan_run(&s, false, "x").unwrap();
        assert_eq!(p.bases.len(), 1);
        assert!(p.bases[0].complete);
    }

    #[test]
    fn continue_picks_the_latest_incomplete_by_time_not_by_name() {
        // "31-12-19" sorts after "01-01-20" as a string.
        let s = snaps(&["s.31-12-19_00-00-00.incomplete", "s.01-01-20_00-00-00.incomplete", "s.30-12-19_00-00-00"]);
        let p = plan_run(&s, true, "x").unwrap();
        assert_eq!(p.resume.unwrap().folder, "s.01-01-20_00-00-00.incomplete");
        assert_eq!(p.bases[0].folder, "s.30-12-19_00-00-00");
    }

    #[test]
    fn a_replica_finishes_only_its_own_incomplete_and_never_a_complete_stamp() {
        let s = snaps(&[
            "s.01-01-20_00-00-00",
            "s.02-01-20_00-00-00.incomplete",
            "s.03-01-20_00-00-00",
            "s.04-01-20_00-00-00.incomplete",
        ]);
        let t = |f: &str| s.iter().find(|x| x.folder == f).unwrap().time;
        let p = plan_replica(&s, t("s.02-01-20_00-00-00.incomplete"), "x").unwrap();
        assert_eq!(p.resume.unwrap().folder, "s.02-01-20_00-00-00.incomplete");
        assert_eq!(p.bases[0].folder, "s.01-01-20_00-00-00", "the replica before it, not the newest");
        let p = plan_replica(&s, t("s.04-01-20_00-00-00.incomplete") + chrono::Duration::days(1), "x").unwrap();
        assert!(p.resume.is_none(), "another stamp's .incomplete is not taken over");
        assert_eq!(p.bases.len(), 1);
        assert_eq!(p.bases[0].folder, "s.03-01-20_00-00-00");
        assert!(plan_replica(&s, t("s.03-01-20_00-00-00"), "x").is_err());
    }

    #[test]
    fn continue_without_incomplete_is_an_error() {
        let s = snaps(&["s.01-01-20_00-00-00"]);
        assert!(plan_run(&s, true, "x").is_err());
    }
}
