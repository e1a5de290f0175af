//! SIGTERM (systemd's stop) and SIGINT (Ctrl-C) in the middle of a backup:
//! the run stops at a safe point and says so — exit code 20, last-run.json,
//! a word about `--continue` — leaving no temporary file and no agent
//! behind, and `--continue` then finishes a snapshot equal to the source.

#![allow(clippy::pedantic)] // test code: plain asserts over polish

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;

use common::midrun::{Held, alive, busy_source, hold_mid_run, pid, send, wait_by_itself};
use common::*;
use rustix::process::Signal;

/// Starts a backup of `src`, holds it in its middle, sends it `signal`;
/// returns its exit code and stderr.
fn interrupt_a_backup(src: &Path, bk: &Path, signal: Signal) -> (Option<i32>, String, rustix::process::Pid) {
    let err_file = bk.with_extension("stderr");
    // A machine fast enough to finish before the run is held: try again.
    let held = (0..5).find_map(|_| {
        let _ = std::fs::remove_dir_all(bk);
        let args: [&OsStr; 7] = [
            "--backup".as_ref(),
            "--source".as_ref(),
            src.as_os_str(),
            "--backups-folder".as_ref(),
            bk.as_os_str(),
            "--name".as_ref(),
            "srv".as_ref(),
        ];
        let mut cmd = rbackup(&args);
        cmd.stdout(Stdio::null()).stderr(File::create(&err_file).unwrap());
        hold_mid_run(cmd, bk, "srv", "d02")
    });
    let Held { mut child, agent } = held.expect("a run held in its middle");
    send(pid(&child), signal);
    let status = wait_by_itself(&mut child);
    (status.code(), std::fs::read_to_string(&err_file).unwrap(), agent)
}

fn a_signal_stops_the_run_cleanly_and_continue_finishes_it(signal: Signal, name: &str) {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    busy_source(&src);
    let (code, stderr, agent) = interrupt_a_backup(&src, &bk, signal);

    assert_eq!(code, Some(20), "{stderr}");
    assert!(stderr.contains(&format!("interrupted by {name}")), "{stderr}");
    assert!(stderr.contains("`rbackup --continue` finishes it"), "{stderr}");
    assert!(!alive(agent), "the agent outlived the run");
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bk.join("srv.rbackup/last-run.json")).unwrap()).unwrap();
    assert_eq!(last["result"], "interrupted", "{last}");
    assert_eq!(last["exit_code"], 20, "{last}");
    assert!(last["error"].as_str().unwrap().contains(&format!("interrupted by {name}")), "{last}");
    let temps = std::process::Command::new("find").arg(&bk).args(["-name", ".rbk~*"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&temps.stdout), "", "temporary entries left behind");
    let snaps = snapshots(&bk, "srv");
    assert!(snaps.len() == 1 && !snaps[0].1, "one .incomplete, nothing else: {snaps:?}");

    let (code, _, err) = continue_backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let done = complete(&bk, "srv");
    assert_eq!(done.len(), 1, "{:?}", snapshots(&bk, "srv"));
    assert_same_tree(&src, &done[0], &[]);
}

#[test]
fn sigterm_stops_a_backup_at_a_safe_point_and_continue_finishes_it() {
    a_signal_stops_the_run_cleanly_and_continue_finishes_it(Signal::TERM, "SIGTERM");
}

#[test]
fn sigint_stops_a_backup_at_a_safe_point_and_continue_finishes_it() {
    a_signal_stops_the_run_cleanly_and_continue_finishes_it(Signal::INT, "SIGINT");
}
