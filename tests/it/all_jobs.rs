//! `--all` (issue 14): every job of the config in one command — `backup`
//! (in order or `--parallel N`), `prune`, `verify`, `check --config-only` —
//! with one summary line per job and the worst exit code; a job that fails
//! or is locked never stops the others.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::smtp::Smtp;
use crate::common::*;

/// Three local jobs into `dir/bk`: `first` and `third` back up real trees,
/// `broken` a source that doesn't exist. `extra` is appended to each job.
fn three_jobs(dir: &Path, extra: &str, tail: &str) -> PathBuf {
    for (name, n) in [("first", 3), ("third", 5)] {
        for i in 0..n {
            write(&dir.join(name).join(format!("f{i}")), format!("{name} {i}").as_bytes());
        }
    }
    let bk = dir.join("bk");
    let mut text = String::new();
    // Not in alphabetical order: the summary keeps the file's.
    for (job, source) in [("third", dir.join("third")), ("broken", dir.join("missing")), ("first", dir.join("first"))] {
        text.push_str(&format!(
            "[job.{job}]\nsource = \"{}\"\nbackups_folder = \"{}\"\n{extra}\n",
            source.display(),
            bk.display()
        ));
    }
    text.push_str(tail);
    let cfg = dir.join("rbackup.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// The same config without the job `broken`, beside it.
fn without_broken(cfg: &Path) -> PathBuf {
    let text = std::fs::read_to_string(cfg).unwrap();
    let kept: Vec<&str> = text.split("[job.").filter(|t| !t.starts_with("broken")).collect();
    let path = cfg.with_file_name("two-jobs.toml");
    std::fs::write(&path, kept.join("[job.")).unwrap();
    path
}

fn rb(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&OsStr> = vec!["-c".as_ref(), cfg.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    run(&all)
}

/// The summary's line for `job`: (label, exit code, detail).
fn line<'a>(out: &'a str, job: &str) -> (&'a str, i32, &'a str) {
    let l = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(job))
        .unwrap_or_else(|| panic!("no summary line for {job}:\n{out}"));
    let mut words = l.split_whitespace();
    words.next();
    let label = words.next().unwrap();
    let code = words.next().unwrap().parse().unwrap();
    let detail = l.split(" s  ").nth(1).unwrap_or("");
    (label, code, detail)
}

fn summary_jobs(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("  ")).map(|l| l.split_whitespace().next().unwrap()).collect()
}

fn backs_up_every_job_though_one_fails(parallel: &[&str]) {
    require_root();
    let tmp = scratch();
    let cfg = three_jobs(tmp.path(), "", "");
    let bk = tmp.path().join("bk");
    let mut args = vec!["backup", "--all"];
    args.extend(parallel);
    let (code, out, err) = rb(&cfg, &args);
    assert_eq!(code, 1, "the failed job's code is the worst\n{out}\n{err}");
    assert!(out.starts_with("backup --all: 3 jobs, exit code 1 (FAILED)"), "{out}");
    assert_eq!(summary_jobs(&out), ["third", "broken", "first"], "the config's order:\n{out}");
    for job in ["first", "third"] {
        let snaps = complete(&bk, job);
        assert_eq!(snaps.len(), 1, "{job}: {out}\n{err}");
        assert_same_tree(&tmp.path().join(job), &snaps[0], &[]);
        let (label, c, detail) = line(&out, job);
        assert_eq!((label, c), ("OK", 0), "{out}");
        assert_eq!(detail, snaps[0].file_name().unwrap().to_str().unwrap(), "{out}");
    }
    let (label, c, detail) = line(&out, "broken");
    assert_eq!((label, c), ("FAILED", 1), "{out}");
    assert!(detail.contains("missing") && detail.contains("cannot be read"), "the error's first line: {out}");
    assert!(complete(&bk, "broken").is_empty());
    // Each job's stderr is relayed with its name, and its own run wrote its
    // own summary, as a single run does. (Only once the backups folder
    // exists: a run that fails before creating it has nowhere to write it,
    // and in parallel `broken` may end before `third` created the folder.)
    assert!(err.contains("broken: error: the source"), "{err}");
    if !parallel.is_empty() {
        return;
    }
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bk.join("broken.rbackup/last-run.json")).unwrap()).unwrap();
    assert_eq!(last["exit_code"], 1, "{last}");
}

#[test]
fn backup_all_runs_every_job_in_order_and_exits_with_the_failing_code() {
    backs_up_every_job_though_one_fails(&[]);
}

#[test]
fn backup_all_in_parallel_gives_the_same_results() {
    backs_up_every_job_though_one_fails(&["--parallel", "2"]);
}

/// A job whose lock another run holds is LOCKED (75) and the others run;
/// the lock is held here exactly as a running backup holds it.
#[test]
fn a_locked_job_is_skipped_and_the_others_run() {
    require_root();
    let tmp = scratch();
    let cfg = three_jobs(tmp.path(), "", "");
    let cfg2 = without_broken(&cfg);
    let meta = tmp.path().join("bk/third.rbackup");
    std::fs::create_dir_all(&meta).unwrap();
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(meta.join("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();

    let (code, out, err) = rb(&cfg2, &["backup", "--all", "--parallel", "2"]);
    assert_eq!(code, 75, "{out}\n{err}");
    assert_eq!(line(&out, "third").0, "LOCKED", "{out}");
    assert!(line(&out, "third").2.contains("is locked by"), "{out}");
    assert_eq!(line(&out, "first").0, "OK", "{out}");
    assert_eq!(complete(&tmp.path().join("bk"), "first").len(), 1);
    assert!(complete(&tmp.path().join("bk"), "third").is_empty());

    // The failed job outranks the locked one (docs/exit-codes.md).
    let (code, out, _) = rb(&cfg, &["backup", "--all"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!((line(&out, "third").0, line(&out, "broken").0), ("LOCKED", "FAILED"), "{out}");
    drop(lock);
}

#[test]
fn prune_all_and_verify_all_sum_up_every_job() {
    require_root();
    let tmp = scratch();
    let cfg = without_broken(&three_jobs(tmp.path(), "keep_last = 1", ""));
    let bk = tmp.path().join("bk");
    for _ in 0..2 {
        let (code, out, err) = rb(&cfg, &["backup", "--all"]);
        assert_eq!(code, 0, "{out}\n{err}");
    }
    assert_eq!(complete(&bk, "first").len(), 2);

    let (code, out, err) = rb(&cfg, &["prune", "--all"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(summary_jobs(&out), ["third", "first"], "{out}");
    assert_eq!(complete(&bk, "first").len(), 1);
    assert_eq!(complete(&bk, "third").len(), 1);

    let (code, out, err) = rb(&cfg, &["verify", "--all"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(line(&out, "third").0, "OK", "{out}");
    // A changed file in one job's snapshot: MISMATCH there, OK elsewhere.
    let snap = complete(&bk, "first").pop().unwrap();
    std::fs::write(snap.join("f0"), b"changed").unwrap();
    let (code, out, _) = rb(&cfg, &["verify", "--all"]);
    assert_eq!(code, 3, "{out}");
    assert_eq!((line(&out, "first").0, line(&out, "third").0), ("MISMATCH", "OK"), "{out}");
}

/// Each job's run mails as a single run does: one failure mail, for the
/// job that failed.
#[test]
fn each_job_mails_as_a_single_run_does() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let email = format!(
        "[email]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nfrom = \"rbackup@example.org\"\nto = \
         [\"admin@example.org\"]\n",
        smtp.port
    );
    let cfg = three_jobs(tmp.path(), "", &email);
    let (code, out, err) = rb(&cfg, &["-q", "backup", "--all", "--parallel", "3"]);
    assert_eq!(code, 1, "{out}\n{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let subject = msgs[0]["subject"].as_str().unwrap();
    assert!(subject.contains("broken") && subject.contains("FAILED"), "{subject}");
}

#[test]
fn check_all_config_only_names_the_job_and_key_and_needs_no_network() {
    let tmp = scratch();
    let cfg = tmp.path().join("rbackup.toml");
    // A server that doesn't resolve: any connection attempt would fail.
    let good = "[job.web]\nsource = \"backupuser@server.invalid:/srv\"\nbackups_folder = \"/backups\"\nkeep_within = \
                \"7d\"\n\n[job.docs]\nsource = \"/srv/docs\"\nbackups_folder = \"/backups\"\n\n[email]\nhost = \
                \"mail.invalid\"\nfrom = \"rbackup@example.org\"\nto = [\"admin@example.org\"]\n";
    std::fs::write(&cfg, good).unwrap();
    let (code, out, err) = rb(&cfg, &["check", "--all", "--config-only"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ok    job web") && out.contains("ok    job docs") && out.contains("ok    [email]"), "{out}");

    let bad = good.replace("\"7d\"", "\"5x\"").replace(
        "[job.docs]\nsource = \"/srv/docs\"\nbackups_folder = \"/backups\"",
        "[job.docs]\nsource = \"/srv/docs\"\nbackups_folder = \"backups\"",
    );
    std::fs::write(&cfg, bad).unwrap();
    let (code, out, err) = rb(&cfg, &["check", "--all", "--config-only"]);
    assert_eq!(code, 2, "{out}\n{err}");
    let shown = cfg.display().to_string();
    assert!(out.contains("FAIL  job web: keep_within: bad duration \"5x\""), "{out}");
    assert!(out.contains(&format!("in {shown}:4, [job.web] keep_within")), "file, line, job, key:\n{out}");
    assert!(out.contains("FAIL  job docs: backups_folder: backups is relative"), "{out}");
    assert!(out.contains(&format!("in {shown}:8, [job.docs] backups_folder")), "{out}");

    // One job: -j, without --all.
    let (code, out, _) = rb(&cfg, &["-j", "docs", "check", "--config-only"]);
    assert_eq!(code, 2, "{out}");
    assert!(!out.contains("job web"), "{out}");
}

#[test]
fn all_with_a_job_or_without_jobs_is_a_usage_error() {
    let tmp = scratch();
    let cfg = three_jobs(tmp.path(), "", "");
    for args in [
        &["-j", "first", "backup", "--all"][..],
        &["-j", "first", "prune", "--all"],
        &["-j", "first", "verify", "--all"],
        &["backup", "--all", "--source", "/srv"],
        &["backup", "--parallel", "2"],
    ] {
        let (code, out, err) = rb(&cfg, args);
        assert_eq!(code, 2, "{args:?}: {out}\n{err}");
    }
    let (_, _, err) = rb(&cfg, &["-j", "first", "backup", "--all"]);
    assert!(err.contains("leave out --job first"), "{err}");
    assert!(!tmp.path().join("bk").exists(), "nothing ran");

    let empty = tmp.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let (code, _, err) = rb(&empty, &["backup", "--all"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no [job.NAME] table"), "{err}");
}
