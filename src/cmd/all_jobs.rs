//! `--all`: every job of the config file in one command (`backup`, `prune`,
//! `verify`, `check`), so that a scheduler (the anacron script,
//! `rbackup-all.service`) names no job, and adding a job to the config is all
//! an admin does. One line per job at the end, and the worst exit code
//! ([`Code::worst`]); a job that fails never stops the others.
//!
//! `backup --all` runs each job as a child process of this same binary
//! (`rbackup -c FILE -j JOB backup …`), not as a thread. The log (its tag, its
//! file, the tail the failure mail quotes) and the signal flag are
//! per process (see [`crate::log`], [`crate::interrupt`]), so a child is
//! exactly a single run: its own lock (docs/design.md rule 7), log file, mail,
//! `last-run.json` and exit code; and a job that panics or is killed cannot
//! take the others with it. The parent only schedules (`--parallel N` at a
//! time), relays each child's stderr with the job's name in front, and sums
//! up. `prune`, `verify` and `check` are short and print tables: they run one
//! job after the other in this process.
//!
//! Signals: each child leads its own process group, so a Ctrl-C on the
//! terminal reaches only this process, which passes it on once to each
//! running job (a second signal would stop a job at once instead of at a safe
//! point, docs/design.md rule 9) and starts no more. `rbackup-all.service`
//! sets `KillMode=mixed` for the same reason: systemd signals only us.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::config::{self, FileConfig, Job, Overrides};
use crate::error::{Code, code_of};
use crate::{error, info, interrupt, log, usage};

/// The config file and its jobs, in the order of their tables in the file.
#[derive(Debug)]
pub struct AllJobs {
    pub file: (PathBuf, FileConfig),
    pub names: Vec<String>,
}

impl AllJobs {
    /// The config (`--config`, else the default file) for `--all`; `job` is
    /// the `--job` given, which `--all` refuses.
    pub fn load(explicit: Option<&Path>, job: Option<&str>) -> Result<AllJobs> {
        if let Some(j) = job {
            return Err(usage!("--all runs every job of the config file: leave out --job {j}"));
        }
        let Some((path, config)) = config::find(explicit)? else {
            return Err(usage!(
                "--all runs the jobs of a config file, and there is none: no {} (give --config FILE)",
                config::DEFAULT_CONFIG
            ));
        };
        if config.job.is_empty() {
            return Err(usage!("{} has no [job.NAME] table: --all has nothing to run", path.display()));
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let names = in_file_order(&text, &config);
        Ok(AllJobs { file: (path, config), names })
    }

    /// The config for a command that takes `--all` but was given one job
    /// (`check --config-only -j JOB`): that job, or the file's only one.
    pub fn one(explicit: Option<&Path>, job: Option<&str>) -> Result<AllJobs> {
        let Some((path, config)) = config::find(explicit)? else {
            return Err(usage!("there is no config file to check: no {} (give --config FILE)", config::DEFAULT_CONFIG));
        };
        let name = match job {
            Some(j) => j.to_string(),
            None if config.job.len() == 1 => config.job.keys().next().expect("one job").clone(),
            None => {
                return Err(usage!(
                    "{} has {} jobs: choose one with --job NAME, or --all",
                    path.display(),
                    config.job.len()
                ));
            }
        };
        if !config.job.contains_key(&name) {
            let known: Vec<&str> = config.job.keys().map(String::as_str).collect();
            return Err(usage!("no job {name:?} in {} (jobs: {})", path.display(), known.join(", ")));
        }
        Ok(AllJobs { file: (path, config), names: vec![name] })
    }

    /// Job `name` with the command line's options over it.
    pub fn resolve(&self, name: &str, overrides: &Overrides) -> Result<Job> {
        config::resolve(Some(&self.file), Some(name), overrides)
    }
}

/// The jobs in the order of their tables in `text` (the parsed config's map
/// is sorted by name); a job the scan can't place goes last, by name.
pub fn in_file_order(text: &str, config: &FileConfig) -> Vec<String> {
    let starts = job_spans(text);
    let mut names: Vec<(usize, &String)> =
        config.job.keys().map(|k| (starts.get(k).map_or(usize::MAX, |s| s.start), k)).collect();
    names.sort();
    names.into_iter().map(|(_, n)| n.clone()).collect()
}

/// Where each `[job.NAME]` key sits in `text`, and its keys.
pub fn job_spans(text: &str) -> BTreeMap<String, JobSpan> {
    use toml::de::{DeTable, DeValue};
    let mut out = BTreeMap::new();
    let Ok(doc) = DeTable::parse(text) else { return out };
    let Some(jobs) = doc.get_ref().iter().find(|(k, _)| k.get_ref() == "job").map(|(_, v)| v) else { return out };
    let DeValue::Table(jobs) = jobs.get_ref() else { return out };
    for (name, table) in jobs {
        let mut keys = BTreeMap::new();
        if let DeValue::Table(t) = table.get_ref() {
            for (key, _) in t {
                keys.insert(key.get_ref().to_string(), line_of(text, key.span().start));
            }
        }
        out.insert(
            name.get_ref().to_string(),
            JobSpan { start: name.span().start, line: line_of(text, name.span().start), keys },
        );
    }
    out
}

/// A job's place in the config text.
#[derive(Debug, Clone)]
pub struct JobSpan {
    pub start: usize,
    /// 1-based line of the job's table.
    pub line: usize,
    /// Each key's 1-based line.
    pub keys: BTreeMap<String, usize>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// How one job ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub job: String,
    pub code: Code,
    /// The snapshot made, or the first line of the error.
    pub detail: String,
    pub seconds: f64,
}

/// Prints one line per job (with `-q`, only when a job did not end OK:
/// cron mails whatever is printed) and returns the worst code.
pub fn summarize(command: &str, outcomes: &[Outcome]) -> Code {
    let worst = Code::worst(outcomes.iter().map(|o| o.code));
    if worst == Code::Ok && !log::on_stderr(log::Level::Info) {
        return worst;
    }
    let width = outcomes.iter().map(|o| o.job.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{command} --all: {}, exit code {} ({})",
        crate::report::count(outcomes.len() as u64, "job", "jobs"),
        worst.status(),
        worst.label()
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "  {:<width$}  {:<11} {:>3} {:>8.1} s  {}",
            o.job,
            o.code.label(),
            o.code.status(),
            o.seconds,
            o.detail
        );
    }
    worst
}

/// The first line of an error chain, for a summary line.
pub fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_string()
}

/// Runs `run` for every job, one after the other, in this process; a job
/// whose config doesn't resolve or whose run fails is an outcome like the
/// others. `run` returns the code and the detail for the summary line.
pub fn each(
    command: &str,
    all: &AllJobs,
    overrides: &Overrides,
    mut run: impl FnMut(&Job) -> Result<(Code, String)>,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for name in &all.names {
        info!("{command}: job {name}");
        log::set_tag(name);
        let started = Instant::now();
        let (code, detail) = match all.resolve(name, overrides).and_then(|job| run(&job)) {
            Ok(done) => done,
            Err(e) => {
                error!("{e:#}");
                (code_of(&e), first_line(&e))
            }
        };
        log::set_tag("");
        outcomes.push(Outcome { job: name.clone(), code, detail, seconds: started.elapsed().as_secs_f64() });
    }
    outcomes
}

/// `prune --all`: each job with `rules` over its own; a job with no rule
/// at all is left alone (rbackup never guesses what to delete).
pub fn prune(all: &AllJobs, overrides: &Overrides, rules: &crate::cmd::prune::Rules, dry_run: bool) -> Vec<Outcome> {
    each("prune", all, overrides, |job| {
        let rules = rules.clone().or(&job.prune);
        if rules.is_empty() {
            return Ok((Code::Ok, "no keep_* rule: nothing pruned".into()));
        }
        let code = crate::cmd::prune::run(job, &rules, dry_run)?;
        Ok((code, if dry_run { "dry run: nothing removed".into() } else { "pruned".into() }))
    })
}

/// `verify --all`: `snapshot` (default the latest) of each job.
pub fn verify(all: &AllJobs, overrides: &Overrides, snapshot: Option<&str>) -> Vec<Outcome> {
    each("verify", all, overrides, |job| {
        let code = crate::cmd::verify::run(job, snapshot)?;
        let detail = if code == Code::Ok { "as written" } else { "differences: listed above" };
        Ok((code, detail.into()))
    })
}

/// `check --all`: every check of each job.
pub fn check(all: &AllJobs, overrides: &Overrides) -> Vec<Outcome> {
    each("check", all, overrides, |job| {
        let code = crate::cmd::check::run(job)?;
        Ok((code, if code == Code::Ok { "all checks passed" } else { "FAIL lines above" }.into()))
    })
}

/// How `backup --all` starts each job's run.
#[derive(Debug, Clone)]
pub struct Children {
    /// This binary.
    pub exe: PathBuf,
    /// Before the command: `-q`, `-v`.
    pub global: Vec<OsString>,
    /// After `backup`: the options every job gets (`--dry-run`, …).
    pub args: Vec<OsString>,
    /// Jobs at a time (at least 1).
    pub parallel: usize,
}

/// The jobs running, and whether a signal was passed on to them.
#[derive(Default)]
struct Running {
    pids: Vec<u32>,
    forwarded: bool,
}

/// Backs up every job, `parallel` at a time, each in a child process; the
/// outcomes in config order. Call [`interrupt::install`] first.
pub fn backup(all: &AllJobs, children: &Children) -> Result<Vec<Outcome>> {
    let n = all.names.len();
    // The children's `--stats-json` files: in a folder only root can enter,
    // made here (mkdir fails rather than follow anything already there).
    let scratch = std::env::temp_dir().join(format!("rbackup-all.{}", std::process::id()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let running = Mutex::new(Running::default());
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; n]);
    std::thread::scope(|s| {
        for _ in 0..children.parallel.clamp(1, n) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let stats = scratch.join(format!("{i}.json"));
                    let outcome = run_child(all, &all.names[i], children, &stats, &running);
                    results.lock().expect("results lock")[i] = Some(outcome);
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        while finished.load(Ordering::SeqCst) < n {
            if let Some(signal) = interrupt::received() {
                forward(&running, signal.0);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(results.into_inner().expect("results lock").into_iter().map(|o| o.expect("every job ran")).collect())
}

/// Passes the first signal on, once, to every running job's process group
/// (its agent and ssh included, as a terminal's Ctrl-C would).
fn forward(running: &Mutex<Running>, signal: i32) {
    let mut r = running.lock().expect("running lock");
    if r.forwarded {
        return;
    }
    r.forwarded = true;
    let sig = if signal == signal_hook::consts::SIGINT {
        rustix::process::Signal::INT
    } else {
        rustix::process::Signal::TERM
    };
    for pid in &r.pids {
        if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(*pid).unwrap_or(0)) {
            let _ = rustix::process::kill_process_group(pid, sig);
        }
    }
}

/// One job's run: `rbackup -c FILE -j JOB backup …`, its stderr relayed line
/// by line with the job's name in front (drained here, so a chatty child
/// never blocks on a full pipe), its exit status turned back into a [`Code`].
fn run_child(all: &AllJobs, name: &str, children: &Children, stats: &Path, running: &Mutex<Running>) -> Outcome {
    let started = Instant::now();
    let outcome = |code: Code, detail: String| Outcome {
        job: name.to_string(),
        code,
        detail,
        seconds: started.elapsed().as_secs_f64(),
    };
    let config = std::path::absolute(&all.file.0).unwrap_or_else(|_| all.file.0.clone());
    let mut command = Command::new(&children.exe);
    command
        .args(&children.global)
        .arg("--config")
        .arg(&config)
        .arg("--job")
        .arg(name)
        .arg("backup")
        .args(&children.args)
        .arg("--stats-json")
        .arg(stats)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = {
        // Under the lock: a signal passed on either sees this child or
        // keeps it from starting.
        let mut r = running.lock().expect("running lock");
        if let Some(signal) = interrupt::received() {
            return outcome(Code::Interrupted, format!("not started: {signal}"));
        }
        match command.spawn() {
            Ok(c) => {
                r.pids.push(c.id());
                c
            }
            Err(e) => return outcome(Code::Error, format!("cannot start {}: {e}", children.exe.display())),
        }
    };
    let prefix = format!("{name}: ");
    let error_prefix = format!("{name}: error: ");
    let mut first_error = None;
    if let Some(stderr) = child.stderr.take() {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches('\n');
            let shown = if text.starts_with(&prefix) { text.to_string() } else { format!("{prefix}{text}") };
            if first_error.is_none()
                && let Some(e) = shown.strip_prefix(&error_prefix)
            {
                first_error = Some(e.to_string());
            }
            let _ = writeln!(std::io::stderr().lock(), "{shown}");
            line.clear();
        }
    }
    let status = child.wait();
    running.lock().expect("running lock").pids.retain(|p| *p != child.id());
    let code = match status.as_ref().ok().and_then(std::process::ExitStatus::code) {
        Some(status) => Code::from_status(status).unwrap_or(Code::Error),
        None => {
            let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            return outcome(Code::Error, first_error.unwrap_or(format!("the run ended abnormally: {how}")));
        }
    };
    let detail = match (code, first_error) {
        (Code::Ok | Code::Vanished | Code::Partial, _) | (_, None) => made(stats).unwrap_or_else(|| "-".into()),
        (_, Some(e)) => e,
    };
    outcome(code, detail)
}

/// What a run's `--stats-json` says it made: the snapshot, and how many
/// entries had problems.
fn made(stats: &Path) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).ok()?).ok()?;
    let mut text = json["snapshot"].as_str().unwrap_or("no snapshot (dry run)").to_string();
    match json["stats"]["warnings"].as_u64() {
        Some(0) | None => {}
        Some(n) => text.push_str(&format!(", {}", crate::report::count(n, "warning", "warnings"))),
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_keep_the_order_of_the_file_not_of_their_names() {
        let text = "[email]\nhost = \"h\"\nfrom = \"a@b\"\nto = [\"c@d\"]\n\n[job.zeta]\nsource = \"/z\"\n\n\
                    [job.alpha]\nsource = \"/a\"\nkeep_within = \"5x\"\n[job.mid]\n";
        let cfg = config::parse(text).unwrap();
        assert_eq!(in_file_order(text, &cfg), ["zeta", "alpha", "mid"]);
        let spans = job_spans(text);
        assert_eq!(spans["alpha"].line, 9);
        assert_eq!(spans["alpha"].keys["keep_within"], 11);
    }

    #[test]
    fn the_summary_is_the_worst_code() {
        let o = |code| Outcome { job: "j".into(), code, detail: String::new(), seconds: 0.0 };
        assert_eq!(summarize("backup", &[o(Code::Ok), o(Code::Locked), o(Code::Error)]), Code::Error);
        assert_eq!(summarize("backup", &[o(Code::Ok), o(Code::Vanished)]), Code::Vanished);
    }
}
