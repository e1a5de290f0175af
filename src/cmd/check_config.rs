//! `check --config-only`: the config file alone, like rsnapshot's
//! `configtest` — every key of every job (or of one) and `[email]`, checked
//! the way a run would use them, without the network and without reading a
//! backups folder. A scheduled `backup --all` meets a bad key at 3 a.m.;
//! this meets it when the file is edited.
//!
//! Unknown keys and wrong types already stop the file from loading (with the
//! line, see [`crate::config`]); what is checked here are the values: each
//! problem names the file, the line, the job and the key, and every job is
//! checked even after one failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cmd::all_jobs::{AllJobs, job_spans};
use crate::config::{JobConfig, Overrides, SourceSpec};
use crate::error::Code;

/// One value that is wrong: the key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

/// Checks the jobs `all.names` and `[email]`; prints `ok`/`FAIL` lines like
/// `check`, and returns [`Code::Usage`] (exit 2) if anything is wrong.
pub fn run(all: &AllJobs) -> Code {
    let (path, config) = &all.file;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let spans = job_spans(&text);
    println!("checking {} (configuration only: no network, no backups folder)", path.display());
    let mut failed = false;
    // Two jobs writing the same snapshots would share one lock and prune
    // each other's snapshots.
    let mut destinations: BTreeMap<(PathBuf, String), &str> = BTreeMap::new();
    for name in &all.names {
        let job = &config.job[name];
        let mut problems = problems(name, job);
        if problems.is_empty() {
            match all.resolve(name, &Overrides::default()) {
                Ok(resolved) => {
                    let key = (resolved.backups_folder.clone(), resolved.name.clone());
                    if let Some(other) = destinations.get(&key) {
                        problems.push(Problem {
                            key: if job.name.is_some() { "name" } else { "backups_folder" },
                            message: format!(
                                "job {other} writes the same snapshots ({}): give one of them another `name`",
                                crate::store::shown(&key.0, &key.1)
                            ),
                        });
                    } else {
                        destinations.insert(key, name);
                    }
                }
                Err(e) => problems.push(Problem { key: "job", message: format!("{e:#}") }),
            }
        }
        if problems.is_empty() {
            println!("ok    job {name}");
        }
        for p in problems {
            failed = true;
            let span = spans.get(name);
            let line = span.and_then(|s| s.keys.get(p.key)).or(span.map(|s| &s.line));
            let place = line.map_or_else(|| path.display().to_string(), |l| format!("{}:{l}", path.display()));
            println!("FAIL  job {name}: {}: {}", p.key, p.message);
            println!("      in {place}, [job.{name}] {}", p.key);
        }
    }
    match &config.email {
        None => println!("note  no [email] section: failures are only logged"),
        Some(email) => match email.validate() {
            Ok(()) => println!("ok    [email] (not sent: `rbackup test-email` sends a test)"),
            Err(e) => {
                failed = true;
                println!("FAIL  [email]: {e:#}");
                println!("      in {}, [email]", path.display());
            }
        },
    }
    if failed { Code::Usage } else { Code::Ok }
}

/// What is wrong with the values of job `name`.
pub fn problems(name: &str, job: &JobConfig) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut bad = |key, message: String| out.push(Problem { key, message });
    match &job.source {
        None => bad("source", "missing: `source = \"/abs/path\"` or `\"[user@]host:/abs/path\"`".into()),
        Some(s) => {
            if let Err(e) = SourceSpec::parse(s) {
                bad("source", format!("{e:#}"));
            }
        }
    }
    match &job.backups_folder {
        None => bad("backups_folder", "missing: where the snapshots go, e.g. `backups_folder = \"/backups\"`".into()),
        Some(p) if !p.is_absolute() => bad(
            "backups_folder",
            format!(
                "{} is relative: it must be absolute (a run from cron or systemd has another working directory)",
                p.display()
            ),
        ),
        Some(_) => {}
    }
    let snapshot_name = job.name.as_deref().unwrap_or(name);
    if let Err(e) = crate::store::check_name(snapshot_name) {
        bad(if job.name.is_some() { "name" } else { "job" }, format!("{e:#}"));
    }
    if let Some(p) = &job.ssh_config {
        if let Some(m) = not_a_file(p) {
            bad("ssh_config", m);
        } else if !p.is_file() {
            bad("ssh_config", format!("{} does not exist (ssh -F would refuse to start)", p.display()));
        }
    }
    for (key, path) in [("log_file", &job.log_file), ("metrics_file", &job.metrics_file)] {
        if let Some(m) = path.as_deref().and_then(not_a_file) {
            bad(key, m);
        }
    }
    if let Some(w) = &job.keep_within
        && let Err(e) = crate::cmd::prune::parse_duration(w)
    {
        bad("keep_within", format!("{e:#}"));
    }
    let rules = crate::cmd::prune::Rules {
        keep_last: job.keep_last,
        keep_within: job.keep_within.clone(),
        keep_hourly: job.keep_hourly,
        keep_daily: job.keep_daily,
        keep_weekly: job.keep_weekly,
        keep_monthly: job.keep_monthly,
        keep_yearly: job.keep_yearly,
    };
    if job.prune_after_backup && rules.is_empty() {
        bad("prune_after_backup", "true, but the job has no keep_* rule: rbackup never guesses what to delete".into());
    }
    if let Some(to) = &job.restore_to
        && let Err(e) = SourceSpec::parse_as(to, "restore_to")
    {
        bad("restore_to", format!("{e:#}"));
    }
    if let Err(e) = crate::source::Selection::new(&job.exclude, &[]) {
        bad("exclude", format!("{e:#}"));
    }
    out
}

/// Why `p` can't be a file rbackup writes or reads, if it can't.
fn not_a_file(p: &Path) -> Option<String> {
    if !p.is_absolute() {
        Some(format!(
            "{} is relative: it must be absolute (a run from cron or systemd has another working directory)",
            p.display()
        ))
    } else if p.is_dir() {
        Some(format!("{} is a directory, not a file", p.display()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<&'static str> {
        let cfg = crate::config::parse(text).unwrap();
        problems("web", &cfg.job["web"]).iter().map(|p| p.key).collect()
    }

    #[test]
    fn a_good_job_has_no_problem() {
        assert!(keys("[job.web]\nsource = \"h:/srv\"\nbackups_folder = \"/b\"\nkeep_within = \"7d\"\n").is_empty());
    }

    #[test]
    fn each_bad_value_is_named_by_its_key() {
        let text = "[job.web]\nsource = \"srv\"\nbackups_folder = \"b\"\nkeep_within = \"5x\"\nlog_file = \"x.log\"\n\
                    restore_to = \"nowhere\"\nprune_after_backup = true\nname = \"../x\"\n";
        assert_eq!(
            keys(text),
            ["source", "backups_folder", "name", "log_file", "keep_within", "restore_to"],
            "prune_after_backup has a rule (keep_within), even a bad one"
        );
        assert_eq!(
            keys("[job.web]\nsource = \"/s\"\nbackups_folder = \"/b\"\nprune_after_backup = true\n"),
            ["prune_after_backup"]
        );
        assert_eq!(keys("[job.web]\nbackups_folder = \"/b\"\n"), ["source"]);
    }
}
