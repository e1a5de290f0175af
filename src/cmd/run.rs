//! The `backup` and `continue` commands around a run ([`super::backup::run`]):
//! the hooks, then what follows the run in order — the summary, the report
//! and mail, the stats file, the replicas, prune.

use std::path::Path;

use anyhow::{Context, Result};

use super::backup::{RunOptions, RunReport, run};
use crate::config::Job;
use crate::error::Code;
use crate::info;

/// Prints the end-of-run summary.
pub fn print_summary(report: &RunReport, dry_run: bool) {
    let s = &report.stats;
    let what = match (&report.snapshot, dry_run) {
        (_, true) => "dry run".to_string(),
        (Some(name), false) => format!("snapshot {name}"),
        (None, false) => "run".to_string(),
    };
    info!("{what}: {} in {:.1} s", report.code.word(), report.seconds);
    info!(
        "  entries {}: directories {}, files {}, symlinks {}, special {}",
        s.entries, s.directories, s.files, s.symlinks, s.specials
    );
    info!(
        "  unchanged, hardlinked {}; metadata-only changes, copied locally {}; fetched whole {}, as delta {}; \
         already in place {}; removed {}",
        s.linked, s.copied_locally, s.fetched_whole, s.fetched_delta, s.kept, s.removed
    );
    info!(
        "  data fetched {}, written {}, received on the wire {}",
        crate::report::human_bytes(s.bytes_fetched),
        crate::report::human_bytes(s.bytes_written),
        crate::report::human_bytes(s.wire_bytes_received)
    );
    if s.warnings > 0 {
        info!("  warnings {} (listed above)", s.warnings);
    }
    if dry_run && !crate::log::on_stderr(crate::log::Level::Debug) {
        info!("  only changes are listed; -v lists every entry");
    }
}

/// Writes the summary of a run as JSON (for benchmarks and monitoring).
pub fn write_stats_json(path: &std::path::Path, job: &Job, report: &RunReport) -> Result<()> {
    let json = serde_json::json!({
        "job": job.job,
        "source": job.source.as_ref().map(ToString::to_string),
        "snapshot": report.snapshot,
        "result": report.code,
        "exit_code": report.code.status(),
        "seconds": report.seconds,
        "stats": report.stats,
        "problems": report.problems,
    });
    let text = serde_json::to_string_pretty(&json).expect("JSON of plain data");
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// The variables every hook of `job` sees.
pub fn hook_env(job: &Job, snapshot: &str) -> Vec<(&'static str, String)> {
    vec![
        ("RBACKUP_JOB", job.job.clone()),
        ("RBACKUP_SNAPSHOT", snapshot.to_string()),
        ("RBACKUP_BACKUPS_FOLDER", job.backups_folder.display().to_string()),
    ]
}

/// Runs the job's `post_hook`, if any, after a backup that ended with
/// `code` (and made `snapshot`, if it did). Its failure is said, and changes
/// nothing of the run's outcome. A run refused before it began (another run
/// holds the lock, a setting to fix) runs no hook: the `post_hook` would
/// undo what the `pre_hook` of the run holding the lock did.
pub fn post_hook(job: &Job, code: Code, snapshot: Option<&str>) {
    let Some(hook) = &job.post_hook else { return };
    if matches!(code, Code::Locked | Code::Usage) {
        return;
    }
    let mut env = hook_env(job, snapshot.unwrap_or_default());
    env.push(("RBACKUP_RESULT", code.word().to_string()));
    env.push(("RBACKUP_EXIT_CODE", code.status().to_string()));
    if let Err(e) = crate::hooks::run("post_hook", hook, &env, job.hook_timeout, crate::hooks::Output::Log) {
        crate::error!("{e:#} (the run's outcome stands: {})", code.word());
    }
}

/// The `backup` and `continue` commands: the run, then what follows it in
/// order — the `post_hook`, the report and mail, the stats file, the
/// replicas, prune. Returns the exit code.
pub fn command(job: &Job, opts: &RunOptions, stats_json: Option<&Path>) -> Result<Code> {
    let started = chrono::Utc::now();
    let result = run(job, opts);
    match &result {
        Ok(report) => print_summary(report, opts.dry_run),
        Err(e) => crate::error!("{e:#}"),
    }
    if !opts.dry_run {
        // Before the report and the mail, which then show its output.
        let (code, snapshot) = match &result {
            Ok(r) => (r.code, r.snapshot.as_deref()),
            Err(e) => (crate::error::code_of(e), None),
        };
        post_hook(job, code, snapshot);
    }
    crate::cmd::after_run::after_backup(
        job,
        if opts.resume { "continue" } else { "backup" },
        started,
        &result,
        opts.dry_run,
    );
    let report = match result {
        Ok(r) => r,
        Err(e) => return Ok(crate::error::code_of(&e)),
    };
    if let Some(path) = stats_json {
        write_stats_json(path, job, &report)?;
    }
    // Replicas first: a snapshot prune removes would never reach them.
    let mut code = report.code;
    let mut failures = Vec::new();
    if job.replicate_after_backup && report.snapshot.is_some() && crate::interrupt::received().is_none() {
        for dest in &job.replicas {
            let replicated = crate::cmd::replicate::run(job, dest, false, crate::cmd::replicate::Seed::Never)
                .unwrap_or_else(|e| {
                    crate::error!(
                        "replicating to {} after the backup failed (the snapshot is complete): {e:#}",
                        dest.to
                    );
                    failures.push((dest.to.clone(), format!("{e:#}")));
                    crate::error::code_of(&e)
                });
            code = Code::worst([code, replicated]);
            if crate::interrupt::received().is_some() {
                break;
            }
        }
        crate::cmd::after_run::after_replicas(job, &failures, code);
    }
    // A snapshot pruned now would never reach a replica that hasn't got
    // it: those are kept, or nothing is pruned if that isn't known.
    if job.prune_after_backup
        && report.snapshot.is_some()
        && crate::interrupt::received().is_none()
        && let Some(also) = kept_for_replicas(job, &failures)
        && let Err(e) = {
            crate::info!("pruning {} by the job's rules", crate::store::shown(&job.backups_folder, &job.name));
            crate::cmd::prune::run_keeping(job, &job.prune, false, &also)
        }
    {
        crate::error!("prune after the backup failed (the snapshot is complete): {e:#}");
        return Ok(Code::worst([code, crate::error::code_of(&e)]));
    }
    Ok(code)
}

/// What a prune after this backup keeps for the job's replicas: what each
/// has not got yet ([`crate::cmd::replicate::not_yet_on`]), whether its
/// replicate failed just now or runs apart from the backups. `None`, said,
/// when one in `failures` never had a replicate that succeeded: then
/// nothing is pruned.
fn kept_for_replicas(job: &Job, failures: &[(String, String)]) -> Option<Vec<(String, String)>> {
    let mut keep = Vec::new();
    for dest in &job.replicas {
        let failed = failures.iter().any(|(to, _)| *to == dest.to);
        let pending = crate::cmd::replicate::not_yet_on(job, dest).unwrap_or_else(|e| {
            crate::warn!("{e:#}");
            None
        });
        match pending {
            None if failed => {
                crate::warn!(
                    "not pruning after this backup: the replica {} failed and has never been seen holding a \
                     snapshot, so anything prune removes might never reach it (its first replica: `{}`)",
                    dest.to,
                    job.command(&format!("replicate --to {}", dest.to))
                );
                return None;
            }
            None => {}
            Some(pending) => {
                if failed && !pending.is_empty() {
                    crate::warn!("the replica {} failed: prune keeps what it has not got yet", dest.to);
                }
                keep.extend(pending);
            }
        }
    }
    Some(keep)
}
