//! After every backup run, whatever its result: the summary of the last run
//! beside the snapshots (`NAME.rbackup/last-run.json`), the Prometheus
//! textfile if the job has one, and the mail if the run calls for it.
//!
//! None of these may change what the run reports: each failure here is
//! logged and the run's own result and exit code stand.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::cmd::backup::RunReport;
use crate::config::Job;
use crate::error::{Code, code_of};
use crate::notify::RunMail;
use crate::store::Store;
use crate::{error, log, warn};

/// Problems kept in the last-run summary.
const PROBLEMS_IN_SUMMARY: usize = 100;

/// Records and reports a finished `backup` or `continue`.
pub fn after_backup(job: &Job, command: &str, started: DateTime<Utc>, result: &Result<RunReport>, dry_run: bool) {
    if dry_run {
        return;
    }
    let ended = Utc::now();
    let code = match result {
        Ok(r) => r.code,
        Err(e) => code_of(e),
    };
    let store = Store::open(&job.backups_folder, &job.name).ok();
    let previous = store.as_ref().and_then(|s| read_last_run(s).ok());
    let succeeded = result.as_ref().is_ok_and(|r| r.snapshot.is_some());
    let last_success = if succeeded {
        Some(ended.to_rfc3339())
    } else {
        previous.as_ref().and_then(|p| p["last_success"].as_str().map(str::to_string))
    };
    let summary = json!({
        "job": job.job,
        "command": command,
        "source": job.source.as_ref().map(ToString::to_string),
        "start": started.to_rfc3339(),
        "end": ended.to_rfc3339(),
        "seconds": (ended - started).num_milliseconds() as f64 / 1000.0,
        "result": code,
        "exit_code": code.status(),
        "snapshot": result.as_ref().ok().and_then(|r| r.snapshot.clone()),
        "stats": result.as_ref().ok().map(|r| &r.stats),
        "warnings": result.as_ref().map_or(0, |r| r.stats.warnings),
        "problems": result.as_ref().map(|r| &r.problems[..r.problems.len().min(PROBLEMS_IN_SUMMARY)]).ok(),
        "error": result.as_ref().err().map(|e| format!("{e:#}")),
        "last_success": last_success,
    });
    // A run that found the lock taken did nothing: the summary is the
    // running one's to write when it ends, not this one's.
    if let Some(store) = &store
        && code != Code::Locked
        && let Err(e) = write_last_run(store, &summary)
    {
        warn!("could not write the last-run summary: {e:#}");
    }
    if let Some(path) = &job.metrics_file {
        let snapshots =
            store.as_ref().and_then(|s| s.snapshots().ok()).map_or(0, |v| v.iter().filter(|s| s.complete).count());
        if let Err(e) = write_metrics(path, job, &summary, snapshots) {
            warn!("could not write the metrics file {}: {e:#}", path.display());
        }
    }
    if let Some(email) = &job.email
        && email.wants(code)
    {
        let mail = compose(job, code, result, store.as_ref());
        match email.send(&mail.subject(), &mail.body()) {
            Ok(()) => crate::debug!("report mailed to {}", email.to.join(", ")),
            Err(e) => error!("could not send the report mail (the run's result stands): {e:#}"),
        }
    }
}

fn compose<'a>(job: &'a Job, code: Code, result: &'a Result<RunReport>, store: Option<&Store>) -> RunMail<'a> {
    let (reason, error, problems, count): (String, Option<String>, &[crate::report::Problem], u64) = match result {
        Ok(r) => {
            let reason = match (&r.snapshot, r.stats.warnings) {
                (Some(s), 0) => format!("snapshot {s}"),
                (Some(s), n) => format!("snapshot {s}, {n} entries with problems"),
                (None, _) => "no snapshot".into(),
            };
            (reason, None, &r.problems, r.stats.warnings)
        }
        Err(e) => (reason_of(e), Some(e.chain().map(ToString::to_string).collect::<Vec<_>>().join(":\n  ")), &[], 0),
    };
    RunMail {
        job: &job.job,
        code,
        reason,
        error,
        next_step: result.as_ref().err().and_then(|e| crate::notify::next_step(&job.command("check"), code, e)),
        problems,
        problem_count: count,
        state: describe_store(job, store, code),
        log_tail: log::tail(),
    }
}

/// One line for the subject: the error chain without the generic "backup
/// from … failed" wrapper, which the subject already says.
fn reason_of(e: &anyhow::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string().lines().next().unwrap_or_default().to_string()).collect();
    let skip = usize::from(chain.len() > 1 && chain[0].starts_with("backup from"));
    chain[skip..].join(": ")
}

/// What the backups folder holds, for the mail.
fn describe_store(job: &Job, store: Option<&Store>, code: Code) -> String {
    let Some(snaps) = store.and_then(|s| s.snapshots().ok()) else {
        return format!("the backups folder {} could not be read", job.backups_folder.display());
    };
    let mut parts = Vec::new();
    if let Some(inc) = snaps.iter().rev().find(|s| !s.complete) {
        if code == Code::Locked {
            // The run that holds the lock may be writing it right now.
            parts.push(format!("{} is the run in progress, or one it will finish", inc.folder));
        } else {
            parts.push(format!("{} is kept; run `{}` to finish it", inc.folder, job.command("--continue")));
        }
    }
    match snaps.iter().rev().find(|s| s.complete) {
        Some(s) => {
            let age = Utc::now() - s.time;
            let age = match age.num_hours() {
                0 => format!("{} minutes old", age.num_minutes().max(0)),
                1 => "1 hour old".to_string(),
                h => format!("{h} hours old"),
            };
            parts.push(format!("the latest complete snapshot is {} ({age})", s.folder));
        }
        None => parts.push("there is no complete snapshot yet".into()),
    }
    parts.join("; ")
}

fn read_last_run(store: &Store) -> Result<serde_json::Value> {
    let dir = store.meta_dir()?;
    let file = dir.open_file(b"last-run.json")?;
    Ok(serde_json::from_reader(file)?)
}

fn write_last_run(store: &Store, summary: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(summary).expect("JSON of plain data");
    text.push(b'\n');
    crate::fs::writer::replace_file(&store.meta_dir()?, b"last-run.json", &text, 0o600)?;
    Ok(())
}

/// Writes the Prometheus textfile atomically (temporary file, then rename),
/// so `node_exporter` never reads half of it.
fn write_metrics(path: &Path, job: &Job, s: &serde_json::Value, snapshots: usize) -> Result<()> {
    use std::fmt::Write;
    let label = job.job.replace('\\', "\\\\").replace('"', "\\\"");
    let ts =
        |key: &str| s[key].as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map_or(0, |t| t.timestamp());
    let stat = |key: &str| s["stats"][key].as_u64().unwrap_or(0);
    let exit = s["exit_code"].as_u64().unwrap_or(1);
    let lines = [
        (
            "last_success_timestamp_seconds",
            "Time the last run that completed a snapshot ended.",
            ts("last_success").to_string(),
        ),
        ("last_run_timestamp_seconds", "Time the last run ended.", ts("end").to_string()),
        (
            "last_run_exit_code",
            "Exit code of the last run (0 ok, 23 partial, 24 files changed, 1 failed, …).",
            exit.to_string(),
        ),
        (
            "last_run_success",
            "1 if the last run completed a snapshot.",
            u8::from(s["snapshot"].is_string()).to_string(),
        ),
        ("last_run_duration_seconds", "Duration of the last run.", s["seconds"].as_f64().unwrap_or(0.0).to_string()),
        (
            "last_run_bytes_received",
            "Bytes received on the wire by the last run.",
            stat("wire_bytes_received").to_string(),
        ),
        ("last_run_bytes_written", "Bytes of file data written by the last run.", stat("bytes_written").to_string()),
        ("last_run_files", "Regular files in the last run's snapshot.", stat("files").to_string()),
        ("last_run_warnings", "Entries with problems in the last run.", stat("warnings").to_string()),
        ("snapshots", "Complete snapshots in the backups folder.", snapshots.to_string()),
    ];
    let mut text = String::new();
    for (name, help, value) in lines {
        let _ = write!(
            text,
            "# HELP rbackup_{name} {help}
# TYPE rbackup_{name} gauge
rbackup_{name}{{job=\"{label}\"}} {value}
"
        );
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("metrics_file {} names no file", path.display()))?;
    // The textfile folder is created like the log file's; node_exporter
    // reads it, so it stays world-readable (0755, the file 0644).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dir = crate::fs::safefs::Dir::open_path(parent).with_context(|| format!("cannot open {}", parent.display()))?;
    // Through the writer's replace: a fresh temp name, fsync, rename over —
    // never a write through whatever sits at a predictable name.
    crate::fs::writer::replace_file(&dir, name.as_encoded_bytes(), text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// After a backup's replicas, when one failed: the failure shows where a
/// monitor looks — `last-run.json` (its exit code, and `replica_errors`),
/// the metrics — and in a mail of its own, since the backup's report went
/// out before the replicas ran. `code` is the run's code with theirs.
pub fn after_replicas(job: &Job, failures: &[(String, String)], code: Code) {
    if failures.is_empty() {
        return;
    }
    let store = Store::open(&job.backups_folder, &job.name).ok();
    if let Some(store) = &store
        && let Ok(mut summary) = read_last_run(store)
    {
        summary["result"] = json!(code);
        summary["exit_code"] = json!(code.status());
        summary["replica_errors"] =
            failures.iter().map(|(to, e)| json!({ "to": to, "error": e })).collect::<serde_json::Value>();
        if let Err(e) = write_last_run(store, &summary) {
            warn!("could not write the last-run summary: {e:#}");
        }
        if let Some(path) = &job.metrics_file {
            let snapshots = store.snapshots().map_or(0, |v| v.iter().filter(|s| s.complete).count());
            if let Err(e) = write_metrics(path, job, &summary, snapshots) {
                warn!("could not write the metrics file {}: {e:#}", path.display());
            }
        }
    }
    if let Some(email) = &job.email
        && email.wants(code)
    {
        use std::fmt::Write;
        let host = crate::notify::hostname();
        let subject = format!(
            "[rbackup] {} on {host}: REPLICA FAILED — {}",
            job.job,
            failures.iter().map(|(to, _)| to.as_str()).collect::<Vec<_>>().join(", ")
        );
        let mut body = format!(
            "Job {} on {host}: the backup's snapshot is complete, but a replica failed (the copy, or the \
             destination's own prune).\nExit code: {}\n\n",
            job.job,
            code.status()
        );
        for (to, e) in failures {
            let _ = writeln!(body, "{to}:\n  {e}\n");
        }
        if job.prune_after_backup {
            body.push_str(
                "Prune after this backup keeps every snapshot that has not reached the replica (and prunes nothing \
                 for a replica never made).\n",
            );
        }
        let _ = writeln!(
            body,
            "What to do: mend the destination (a drive to mount, a host to reach), then `{}`; `{}` shows what each \
             replica lacks.",
            job.command("replicate"),
            job.command("status")
        );
        if let Err(e) = email.send(&subject, &body) {
            error!("could not send the replica failure mail: {e:#}");
        }
    }
}
