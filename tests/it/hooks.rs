//! Hooks: a job's `pre_hook` and `post_hook` on the desktop (environment,
//! a failing pre_hook leaves no snapshot, a failing post_hook changes no
//! outcome, the timeout kills the hook's group, output in the log), and the
//! agent's `--before` on the server, fixed in the forced command.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::sshd::Sshd;
use crate::common::*;

/// A config with job `web` backing up `src` into `tmp/bk`, plus `extra` keys.
fn config(tmp: &Path, src: &Path, extra: &str) -> PathBuf {
    let path = tmp.join("rbackup.toml");
    let text = format!(
        "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nlog_file = \"{}\"\n{extra}",
        src.display(),
        tmp.join("bk").display(),
        tmp.join("web.log").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn rb(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![OsStr::new("-c"), cfg.as_os_str(), OsStr::new("-j"), OsStr::new("web")];
    all.extend(args.iter().map(OsStr::new));
    run(&all)
}

/// `KEY=value` lines a hook wrote with `env | grep ^RBACKUP_`.
fn vars(file: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(file).unwrap().lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn the_hooks_run_around_a_backup_and_see_the_job_the_snapshot_and_the_result() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a.txt"), b"a");
    let (pre, post) = (tmp.path().join("pre.env"), tmp.path().join("post.env"));
    let extra = format!(
        "pre_hook = \"env | grep ^RBACKUP_ > {}; echo dumping the database\"\npost_hook = \"env | grep ^RBACKUP_ > {}\"\n",
        pre.display(),
        post.display()
    );
    let cfg = config(tmp.path(), &src, &extra);
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 0, "{err}");
    let snap = complete(&tmp.path().join("bk"), "web")[0].file_name().unwrap().to_string_lossy().into_owned();
    let folder = format!("RBACKUP_BACKUPS_FOLDER={}", tmp.path().join("bk").display());
    // The pre_hook knows the name the snapshot gets, before it exists.
    assert_eq!(vars(&pre), vec![folder.clone(), "RBACKUP_JOB=web".into(), format!("RBACKUP_SNAPSHOT={snap}")]);
    assert_eq!(
        vars(&post),
        vec![
            folder,
            "RBACKUP_EXIT_CODE=0".into(),
            "RBACKUP_JOB=web".into(),
            "RBACKUP_RESULT=OK".into(),
            format!("RBACKUP_SNAPSHOT={snap}")
        ]
    );
    let log = std::fs::read_to_string(tmp.path().join("web.log")).unwrap();
    assert!(log.contains("pre_hook: dumping the database"), "the hook's output is in the log: {log}");
}

#[test]
fn a_failing_pre_hook_aborts_before_anything_is_written_and_the_post_hook_still_runs() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a.txt"), b"a");
    let post = tmp.path().join("post.env");
    let extra = format!("pre_hook = \"exit 3\"\npost_hook = \"env | grep ^RBACKUP_ > {}\"\n", post.display());
    let cfg = config(tmp.path(), &src, &extra);
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the backup did not start") && err.contains("pre_hook `exit 3` failed with exit code 3"),
        "{err}"
    );
    assert!(snapshots(&tmp.path().join("bk"), "web").is_empty(), "no snapshot, not even an .incomplete");
    let post = vars(&post);
    assert!(
        post.contains(&"RBACKUP_RESULT=FAILED".to_string()) && post.contains(&"RBACKUP_EXIT_CODE=1".to_string()),
        "{post:?}"
    );
    assert!(post.contains(&"RBACKUP_SNAPSHOT=".to_string()), "{post:?}");
}

#[test]
fn a_failing_post_hook_is_said_and_the_snapshot_stands() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a.txt"), b"a");
    let cfg = config(tmp.path(), &src, "post_hook = \"echo cleanup failed >&2; exit 1\"\n");
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("post_hook: cleanup failed"), "{err}");
    assert!(
        err.contains("post_hook `")
            && err.contains("failed with exit code 1; it said: cleanup failed (the run's outcome stands: OK)"),
        "{err}"
    );
    assert_eq!(complete(&tmp.path().join("bk"), "web").len(), 1);
}

#[test]
fn a_hook_past_hook_timeout_is_killed_with_its_children_and_the_run_fails() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a.txt"), b"a");
    let marker = tmp.path().join("child-survived");
    let extra = format!("pre_hook = \"(sleep 3; touch {}) & sleep 60\"\nhook_timeout = 1\n", marker.display());
    let cfg = config(tmp.path(), &src, &extra);
    let started = Instant::now();
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ran longer than 1 s (hook_timeout) and was killed"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "the timeout did not end the run");
    std::thread::sleep(Duration::from_secs(4));
    assert!(!marker.exists(), "a child of the hook outlived its timeout");
    assert!(snapshots(&tmp.path().join("bk"), "web").is_empty());
}

#[test]
fn a_dry_run_runs_no_hook() {
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a.txt"), b"a");
    let ran = tmp.path().join("ran");
    let extra = format!("pre_hook = \"touch {0}\"\npost_hook = \"touch {0}\"\n", ran.display());
    let cfg = config(tmp.path(), &src, &extra);
    let (code, _, err) = rb(&cfg, &["backup", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(!ran.exists());
}

/// The server's admin fixes the command in the forced command; the desktop
/// triggers it by backing up, and what it wrote is in the snapshot.
#[test]
fn the_agents_before_command_runs_before_the_listing_and_its_failure_fails_the_run() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("data.txt"), b"data");
    std::fs::create_dir(src.join("dumps")).unwrap();
    sh(&format!("chown {0} '{1}'", sshd.user.name, src.join("dumps").display()));
    sshd.grant_read(&src);
    let script = tmp.path().join("dump-db");
    write(&script, b"#!/bin/sh\necho \"dump of $RBACKUP_ROOT\" > \"$RBACKUP_ROOT/dumps/db.sql\"\n");
    sh(&format!("chmod 755 '{}' && chmod 755 '{}'", script.display(), tmp.path().display()));
    // What `setup-server --before` writes: the command, in the forced command.
    let read_only = sshd.forced_read_only(&src);
    let forced = format!("{} --before {}\"", read_only.strip_suffix('"').unwrap(), script.display());
    sshd.authorize(&forced);
    let pull = |cmd: &str| {
        let mut args: Vec<String> = vec![cmd.into(), "--source".into(), sshd.source(&src)];
        args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
        args.extend(sshd.args());
        run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    };
    // `check` only looks: no dump.
    let (_, out, err) = pull("check");
    assert!(!src.join("dumps/db.sql").exists(), "check ran the before command: {out}{err}");
    let (code, _, err) = pull("--backup");
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    let snap = complete(&bk, "srv")[0].clone();
    assert_eq!(std::fs::read_to_string(snap.join("dumps/db.sql")).unwrap(), format!("dump of {}\n", src.display()));

    write(&script, b"#!/bin/sh\necho the database is down >&2\nexit 4\n");
    let (code, _, err) = pull("--backup");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the server's --before command failed") && err.contains("exit code 4"), "{err}");
    assert!(err.contains("it said: the database is down"), "the command's last words: {err}");
    assert_eq!(complete(&bk, "srv").len(), 1, "no new snapshot");
}
