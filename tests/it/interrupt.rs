//! Runs stopped in their middle. By SIGTERM (systemd's stop) or SIGINT
//! (Ctrl-C): the run stops at a safe point and says so — exit code 20,
//! last-run.json, a word about `--continue`. By an agent that stops answering
//! while keeping its pipes open: the run ends by its `io_timeout`. Either
//! way no agent and no temporary file are left behind — but the partial data
//! of a file that was arriving, which `--continue` resumes from — and
//! `--continue` then finishes a snapshot equal to the source.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;

use crate::common::midrun::{Held, alive, busy_source, hold_mid_run, pid, send, wait_by_itself};
use crate::common::*;
use rustix::process::Signal;

/// Starts a backup of `src` with `extra` arguments, holds it in its middle,
/// sends it `signal` if one is given, and waits for it to end by itself;
/// returns its exit code, its stderr and its agent's pid.
fn hold_a_backup(
    src: &Path,
    bk: &Path,
    extra: &[&str],
    signal: Option<Signal>,
) -> (Option<i32>, String, rustix::process::Pid) {
    let err_file = bk.with_extension("stderr");
    // A machine fast enough to finish before the run is held: try again.
    let held = (0..5).find_map(|_| {
        let _ = std::fs::remove_dir_all(bk);
        let mut args: Vec<&OsStr> = vec![
            "--backup".as_ref(),
            "--source".as_ref(),
            src.as_os_str(),
            "--backups-folder".as_ref(),
            bk.as_os_str(),
            "--name".as_ref(),
            "srv".as_ref(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let mut cmd = rbackup(&args);
        cmd.stdout(Stdio::null()).stderr(File::create(&err_file).unwrap());
        hold_mid_run(cmd, bk, "srv", "d02")
    });
    let Held { mut child, agent } = held.expect("a run held in its middle");
    if let Some(signal) = signal {
        send(pid(&child), signal);
    }
    let status = wait_by_itself(&mut child);
    (status.code(), std::fs::read_to_string(&err_file).unwrap(), agent)
}

fn last_run(bk: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(bk.join("srv.rbackup/last-run.json")).unwrap()).unwrap()
}

/// Temporary entries under `bk`.
fn temporaries(bk: &Path) -> Vec<String> {
    let temps = std::process::Command::new("find").arg(bk).args(["-name", ".rbk~*"]).output().unwrap();
    String::from_utf8_lossy(&temps.stdout).lines().map(str::to_string).collect()
}

/// No temporary entry is left but the partial data of a file that was
/// arriving (for `--continue` to resume from), one `.incomplete` is, and
/// `--continue` turns it into a snapshot equal to the source, leaving none.
fn assert_clean_and_continue_finishes(src: &Path, bk: &Path) {
    let temps = temporaries(bk);
    assert!(temps.len() <= 1 && temps.iter().all(|t| t.ends_with(".part")), "temporary entries left behind: {temps:?}");
    let snaps = snapshots(bk, "srv");
    assert!(snaps.len() == 1 && !snaps[0].1, "one .incomplete, nothing else: {snaps:?}");
    let (code, _, err) = continue_backup(src, bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(temporaries(bk), Vec::<String>::new(), "temporary entries left after --continue");
    let done = complete(bk, "srv");
    assert_eq!(done.len(), 1, "{:?}", snapshots(bk, "srv"));
    assert_same_tree(src, &done[0], &[]);
}

fn a_signal_stops_the_run_cleanly_and_continue_finishes_it(signal: Signal, name: &str) {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    busy_source(&src);
    let (code, stderr, agent) = hold_a_backup(&src, &bk, &[], Some(signal));

    assert_eq!(code, Some(20), "{stderr}");
    assert!(stderr.contains(&format!("interrupted by {name}")), "{stderr}");
    assert!(stderr.contains("`rbackup --continue` finishes it"), "{stderr}");
    assert!(!alive(agent), "the agent outlived the run");
    let last = last_run(&bk);
    assert_eq!(last["result"], "interrupted", "{last}");
    assert_eq!(last["exit_code"], 20, "{last}");
    assert!(last["error"].as_str().unwrap().contains(&format!("interrupted by {name}")), "{last}");
    assert_clean_and_continue_finishes(&src, &bk);
}

#[test]
fn sigterm_stops_a_backup_at_a_safe_point_and_continue_finishes_it() {
    a_signal_stops_the_run_cleanly_and_continue_finishes_it(Signal::TERM, "SIGTERM");
}

#[test]
fn sigint_stops_a_backup_at_a_safe_point_and_continue_finishes_it() {
    a_signal_stops_the_run_cleanly_and_continue_finishes_it(Signal::INT, "SIGINT");
}

#[test]
fn a_stopped_agent_ends_the_run_by_its_io_timeout_and_continue_finishes_it() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    busy_source(&src);
    // The agent is stopped with its pipes open: only the timeout ends this.
    let (code, stderr, agent) = hold_a_backup(&src, &bk, &["--io-timeout", "2"], None);

    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!("no data from the local agent for {} for 2 s (io_timeout)", src.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("stays for `rbackup --continue`"), "{stderr}");
    assert!(!alive(agent), "the agent outlived the run");
    let last = last_run(&bk);
    assert_eq!(last["result"], "error", "{last}");
    assert!(last["error"].as_str().unwrap().contains(&expected), "{last}");
    assert_clean_and_continue_finishes(&src, &bk);
}
