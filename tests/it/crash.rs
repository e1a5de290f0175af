//! kill -9 at several points, then `continue` or a new `backup`: the result
//! equals the source, an interrupted run never shows a partial file under a
//! real name, and older snapshots never change (docs/design.md rules 1 and 5).

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A source big enough that a run takes a while: 40 directories of 60 small
/// files, a few larger files, and a large file listed last (`zz-tail.bin`
/// sorts after every `dNN`), so that a run that reached any `dNN` still has
/// that file to fetch: the kill lands mid-run even if the test is slow to
/// see the directory appear.
fn big_source(src: &Path) {
    for d in 0..40 {
        for f in 0..60 {
            write(&src.join(format!("d{d:02}/f{f:02}.txt")), &noise(d * 100 + f, 2000 + (f as usize) * 37));
        }
    }
    for i in 0..6 {
        write(&src.join(format!("d{:02}/large{i}.bin", i * 7)), &noise(5000 + i, 6 << 20));
    }
    write_tail(src, 1);
    sh(&format!("setfacl -m u:{GHOST_UID}:r '{}'", src.join("d03/f01.txt").display()));
    sh(&format!("chown {GHOST_UID}:{GHOST_GID} '{}'", src.join("d05/f05.txt").display()));
}

/// The last file of the listing, rewritten by every change so each run
/// fetches it. Cheap to write (a repeated pattern), slow enough to fetch.
fn write_tail(src: &Path, version: u8) {
    let block: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ version).collect();
    write(&src.join("zz-tail.bin"), &block.repeat(TAIL_BYTES / block.len()));
}

const TAIL_BYTES: usize = 32 << 20;

/// Changes between the first snapshot and the interrupted one.
fn change_source(src: &Path) {
    for d in (0..40).step_by(3) {
        sh(&format!("chmod 640 '{}'", src.join(format!("d{d:02}/f00.txt")).display()));
        write(&src.join(format!("d{d:02}/f01.txt")), &noise(99_000 + d, 3000));
    }
    write(&src.join("d39/zz-new.txt"), b"new");
    std::fs::remove_file(src.join("d10/f10.txt")).unwrap();
    write_tail(src, 2);
}

fn start(cmd: &str, src: &Path, bk: &Path) -> Child {
    let mut args: Vec<&OsStr> = vec![OsStr::new(cmd)];
    if cmd == "--backup" || cmd == "--continue" {
        args.extend([OsStr::new("--source"), src.as_os_str()]);
    }
    args.extend([OsStr::new("--backups-folder"), bk.as_os_str(), OsStr::new("--name"), OsStr::new("srv")]);
    rbackup(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// The `.incomplete` folder, once it exists.
fn incomplete(bk: &Path) -> Option<PathBuf> {
    snapshots(bk, "srv").into_iter().find(|(_, c)| !c).map(|(f, _)| bk.join(f))
}

/// Kills `child` with SIGKILL once the `.incomplete` holds directory
/// `d{k}`, and checks that the signal is what ended it: a run that finished
/// (or failed) by itself first fails the test instead of passing as if
/// it had been killed.
fn kill_when(child: &mut Child, bk: &Path, k: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(inc) = incomplete(bk)
            && inc.join(format!("d{k:02}")).exists()
        {
            child.kill().unwrap();
            let status = child.wait().unwrap();
            assert_eq!(
                status.signal(),
                Some(rustix::process::Signal::KILL.as_raw()),
                "the run ended by itself ({status}) before the kill at d{k:02}"
            );
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it reached d{k:02}");
        }
        assert!(Instant::now() < deadline, "the run never reached d{k:02}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every non-directory under a real name in the interrupted snapshot is a
/// complete copy, metadata included, of the source's entry.
fn assert_only_whole_entries(src: &Path, inc: &Path) {
    let (source, partial) = (read_tree(src), read_tree(inc));
    for (path, info) in &partial {
        let name = path.rsplit(|&b| b == b'/').next().unwrap();
        if info.kind == "dir" || name.starts_with(b".rbk~") {
            continue;
        }
        let want = source.get(path).unwrap_or_else(|| panic!("{} is not in the source", String::from_utf8_lossy(path)));
        let strip = |i: &Info| Info { ino: 0, blocks: 0, ..i.clone() };
        assert_eq!(strip(info), strip(want), "{} is not a whole copy", String::from_utf8_lossy(path));
    }
}

#[test]
fn kill_9_then_continue_gives_the_source_and_leaves_older_snapshots_alone() {
    require_root();
    for (round, k) in [1usize, 12, 30].into_iter().enumerate() {
        let tmp = scratch();
        let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
        big_source(&src);
        assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
        let first = complete(&bk, "srv")[0].clone();
        let first_before = read_tree(&first);
        change_source(&src);

        let mut child = start("--backup", &src, &bk);
        kill_when(&mut child, &bk, k);
        let inc = incomplete(&bk).expect("the killed run leaves its .incomplete");
        assert_only_whole_entries(&src, &inc);

        // Kill the continue too, once, before letting one finish.
        if round == 1 {
            let mut child = start("--continue", &src, &bk);
            kill_when(&mut child, &bk, 35);
            assert!(inc.exists(), "the killed continue leaves the .incomplete");
            assert_only_whole_entries(&src, &inc);
        }
        let (code, _, err) = continue_backup(&src, &bk, "srv", &[]);
        assert_eq!(code, 0, "round {round}: {err}");
        let snaps = snapshots(&bk, "srv");
        assert_eq!(snaps.len(), 2, "round {round}: {snaps:?}");
        assert!(snaps.iter().all(|(_, c)| *c), "round {round}: {snaps:?}");
        // It kept the interrupted run's stamp.
        let inc_name = inc.file_name().unwrap().to_str().unwrap();
        assert_eq!(Some(snaps[1].0.as_str()), inc_name.strip_suffix(".incomplete"));
        assert_same_tree(&src, &bk.join(&snaps[1].0), &[]);
        let diffs = diff_trees(&first_before, &read_tree(&first), &[]);
        assert!(diffs.is_empty(), "round {round}: the older snapshot changed:\n{}", diffs.join("\n"));
    }
}

#[test]
fn backup_after_a_killed_run_reuses_its_files_and_removes_it() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    big_source(&src);
    let mut child = start("--backup", &src, &bk);
    kill_when(&mut child, &bk, 39);
    let inc = incomplete(&bk).unwrap();
    let before = read_tree(&inc);

    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let snaps = snapshots(&bk, "srv");
    assert_eq!(snaps.len(), 1, "the superseded .incomplete must be removed: {snaps:?}");
    let snap = bk.join(&snaps[0].0);
    assert_same_tree(&src, &snap, &[]);
    // What the killed run had fetched was linked, not fetched again.
    let after = read_tree(&snap);
    let mut reused = 0;
    for (path, info) in &before {
        let name = path.rsplit(|&b| b == b'/').next().unwrap();
        if info.kind == "file" && !name.starts_with(b".rbk~") {
            assert_eq!(after[path].ino, info.ino, "{} was not reused", String::from_utf8_lossy(path));
            reused += 1;
        }
    }
    assert!(reused > 0, "the killed run had fetched nothing to reuse");
    assert!(!bk.join("srv.rbackup/trash").read_dir().unwrap().any(|_| true), "the trash is empty");
}

#[test]
fn a_second_concurrent_run_exits_locked_and_names_the_holder() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    big_source(&src);
    let mut first = start("--backup", &src, &bk);
    let deadline = Instant::now() + Duration::from_secs(30);
    while incomplete(&bk).is_none() {
        assert!(
            Instant::now() < deadline && first.try_wait().unwrap().is_none(),
            "the first run never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    let still_running = first.try_wait().unwrap().is_none();
    assert!(still_running, "the first run ended before the second could test the lock");
    assert_eq!(code, 75, "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    // The locked run leaves the last-run summary to the running one.
    let last_run = bk.join("srv.rbackup/last-run.json");
    assert!(!last_run.exists(), "{}", std::fs::read_to_string(&last_run).unwrap_or_default());
    assert!(first.wait().unwrap().success());
    assert_eq!(complete(&bk, "srv").len(), 1);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&last_run).unwrap()).unwrap();
    assert_eq!(summary["exit_code"], 0, "{summary}");
    // Nothing stale: the next run proceeds.
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
}
