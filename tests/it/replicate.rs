//! `replicate --to DIR`: a second backups folder with the same snapshots,
//! unchanged files hardlinked between replicas, each checked against its
//! original's manifest, resumed after a failure.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::*;

fn replicate(bk: &Path, to: &Path) -> (i32, String, String) {
    let args = ["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to", to.to_str().unwrap()];
    run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
}

/// Writes `rbackup.toml` in `dir` with job `s`, backing up `src` into `bk`,
/// and `keys` (more job keys, one a line); returns a runner of `rbackup -c
/// THAT -j s ARGS`.
fn job_s(dir: &Path, src: &Path, bk: &Path, keys: &str) -> impl Fn(&[&str]) -> (i32, String, String) + use<> {
    let cfg = dir.join("rbackup.toml");
    let text = format!("[job.s]\nsource = \"{}\"\nbackups_folder = \"{}\"\n{keys}", src.display(), bk.display());
    std::fs::write(&cfg, text).unwrap();
    move |args: &[&str]| {
        let mut all: Vec<&OsStr> = vec!["-c".as_ref(), cfg.as_os_str(), "-j".as_ref(), "s".as_ref()];
        all.extend(args.iter().map(OsStr::new));
        run(&all)
    }
}

fn names(folder: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn replicas_keep_the_names_the_links_and_the_digests_of_the_originals() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("usb/backups"));
    // The drive is mounted at usb/: rbackup makes only the last folder.
    std::fs::create_dir(tmp.path().join("usb")).unwrap();
    rich_tree(&src);
    write(&src.join("big.bin"), &noise(3, 2 << 20));
    for round in 0..3 {
        write(&src.join("changes.txt"), format!("round {round}").as_bytes());
        let (code, _, err) = backup(&src, &bk, "s", &[]);
        assert_eq!(code, 0, "{err}");
    }
    let originals = complete(&bk, "s");
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 0, "{err}");
    let replicas = complete(&rep, "s");
    let folder = |p: &Path| p.file_name().unwrap().to_owned();
    assert_eq!(
        replicas.iter().map(|p| folder(p)).collect::<Vec<_>>(),
        originals.iter().map(|p| folder(p)).collect::<Vec<_>>()
    );
    for (o, r) in originals.iter().zip(&replicas) {
        assert_same_tree(o, r, &[]);
    }
    // Unchanged files are one inode across replicas, as across the originals.
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&replicas[0].join("big.bin")), ino(&replicas[2].join("big.bin")));
    assert_ne!(ino(&replicas[0].join("changes.txt")), ino(&replicas[1].join("changes.txt")));
    assert_ne!(ino(&replicas[0].join("big.bin")), ino(&originals[0].join("big.bin")), "a copy, not a link to drive 1");
    // Each replica has its manifest: verify reads it.
    let args = ["verify", "--backups-folder", rep.to_str().unwrap(), "--name", "s", "--snapshot", "all"];
    let (code, _, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    // Nothing new: nothing done.
    let before = names(&rep);
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("holds every snapshot"), "{err}");
    assert_eq!(names(&rep), before);
}

/// A file that rotted on the first drive (same size and time, other bytes)
/// is not copied into a replica named complete; once the original is
/// mended, the next `replicate` finishes the replica it left.
#[test]
fn a_replica_of_a_damaged_file_is_refused_and_the_next_run_finishes_it() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("rep"));
    write(&src.join("a.txt"), b"first");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    write(&src.join("b.txt"), b"only in the second");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let second = complete(&bk, "s")[1].clone();
    let rotten = second.join("b.txt");
    let mtime = std::fs::metadata(&rotten).unwrap().modified().unwrap();
    let set_bytes = |bytes: &[u8]| {
        std::fs::write(&rotten, bytes).unwrap();
        std::fs::File::options().write(true).open(&rotten).unwrap().set_modified(mtime).unwrap();
    };
    set_bytes(b"ONLY IN THE SECOND");
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("b.txt reads differently from what its snapshot recorded") && err.contains("not replicated"),
        "{err}"
    );
    let state = snapshots(&rep, "s");
    assert_eq!(state.iter().filter(|(_, c)| *c).count(), 1, "only the sound snapshot is a complete replica: {state:?}");
    assert!(state.iter().any(|(_, c)| !c), "the refused one stays .incomplete: {state:?}");

    set_bytes(b"only in the second");
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("continuing the replica of"), "{err}");
    let replicas = complete(&rep, "s");
    assert_eq!(replicas.len(), 2);
    assert!(snapshots(&rep, "s").iter().all(|(_, c)| *c));
    assert_eq!(std::fs::read(replicas[1].join("b.txt")).unwrap(), b"only in the second");
}

#[test]
fn a_destination_that_overlaps_the_originals_is_refused() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let (code, _, err) = replicate(&bk, &bk.join("copy"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("overlaps the backups folder"), "{err}");
}

/// `replicas` and `replicate_after_backup` in a job: every backup that made a
/// snapshot is replicated before prune runs; `replicate` alone uses them too.
#[test]
fn a_job_replicates_after_each_backup_before_it_prunes() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("rep"));
    write(&src.join("a.txt"), b"a");
    let keys = format!(
        "replicas = [\"{}\"]\nreplicate_after_backup = true\nkeep_last = 1\nprune_after_backup = true\n",
        rep.display()
    );
    let rb = job_s(tmp.path(), &src, &bk, &keys);
    // The drive holds no replica yet (or isn't mounted): the scheduled
    // replicate makes nothing, the run says so, and nothing is pruned.
    write(&src.join("a.txt"), b"round 0");
    let (code, _, err) = rb(&["--backup"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("holds no replica of s (a drive not mounted?)"), "{err}");
    assert!(err.contains("not pruning after this backup"), "{err}");
    assert!(!rep.exists(), "nothing written where the drive should be");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bk.join("s.rbackup/last-run.json")).unwrap()).unwrap();
    assert_eq!(summary["exit_code"], 1, "{summary}");
    assert_eq!(summary["replica_errors"][0]["to"], rep.to_str().unwrap(), "{summary}");
    // An empty folder (a bare mount point) is not made a replica by
    // `replicate` of the configured destinations either: only by naming it.
    std::fs::create_dir(&rep).unwrap();
    let (code, _, err) = rb(&["replicate"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("holds no replica of s") && err.contains("replicate --to"), "{err}");
    assert!(complete(&rep, "s").is_empty(), "nothing written where the drive should be");
    // Made by hand once; then every backup reaches it before prune.
    let (code, _, err) = rb(&["replicate", "--to", rep.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    write(&src.join("a.txt"), b"round 1");
    let (code, _, err) = rb(&["--backup"]);
    assert_eq!(code, 0, "{err}");
    // Drive 1 keeps one; the replica got both before prune removed the first.
    assert_eq!(complete(&bk, "s").len(), 1);
    let replicas = complete(&rep, "s");
    assert_eq!(replicas.len(), 2);
    assert_eq!(std::fs::read(replicas[0].join("a.txt")).unwrap(), b"round 0");
    let (code, _, err) = rb(&["replicate"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("holds every snapshot"), "{err}");
    // The snapshot only the drive still holds shows in `status`.
    let (code, out, err) = rb(&["status"]);
    assert_eq!(code, 0, "{err}");
    let only = replicas[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(out.contains(&format!("also holds 1 snapshot the backups folder no longer has ({only})")), "{out}");

    // The drive away (unplugged for a while): each backup still prunes,
    // keeping every snapshot the drive has not got yet.
    let away = tmp.path().join("rep.away");
    std::fs::rename(&rep, &away).unwrap();
    for (round, kept) in [(2, None), (3, Some("1 snapshot the rules would remove kept"))] {
        write(&src.join("a.txt"), format!("round {round}").as_bytes());
        let (code, _, err) = rb(&["--backup"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("failed: prune keeps what it has not got yet"), "{err}");
        assert!(kept.is_none_or(|k| err.contains(k)), "{err}");
    }
    let (_, out, _) = rb(&["status"]);
    assert!(out.contains("not there, or can't be read (a drive not mounted?); last reached 20"), "{out}");
    // Told to make a first replica there, as for a new drive: it was reached
    // before, so it is a drive not mounted; nothing is written.
    let (code, _, err) = rb(&["replicate", "--to", rep.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the drive is not mounted?") && err.contains("--new-drive"), "{err}");
    assert!(!rep.exists(), "nothing made where the drive should be");
    let waiting = complete(&bk, "s");
    assert_eq!(waiting.len(), 2, "the two taken while it was away; the one it has pruned: {waiting:?}");
    // A prune by hand goes by the rules, but says what hasn't reached it.
    let (code, _, err) = rb(&["prune", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let older = waiting[0].file_name().unwrap().to_string_lossy().into_owned();
    let said = format!("{older}, which the replica {} has not got yet, would be removed", rep.display());
    assert!(err.contains(&said), "{err}");
    assert_eq!(std::fs::read(waiting[0].join("a.txt")).unwrap(), b"round 2");
    // Back: they reach it, then go by the job's rule.
    std::fs::rename(&away, &rep).unwrap();
    write(&src.join("a.txt"), b"round 4");
    let (code, _, err) = rb(&["--backup"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(complete(&bk, "s").len(), 1);
    let on_drive: Vec<Vec<u8>> = complete(&rep, "s").iter().map(|p| std::fs::read(p.join("a.txt")).unwrap()).collect();
    assert_eq!(on_drive, [&b"round 0"[..], b"round 1", b"round 2", b"round 3", b"round 4"]);
    // The drive lost; a new one in its place takes what the originals hold.
    std::fs::remove_dir_all(&rep).unwrap();
    std::fs::create_dir(&rep).unwrap();
    assert_eq!(rb(&["replicate", "--to", rep.to_str().unwrap()]).0, 2);
    let (code, _, err) = rb(&["replicate", "--to", rep.to_str().unwrap(), "--new-drive"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(complete(&rep, "s").len(), 1);
}

/// `status` says, per snapshot, which replica holds it and which not, with
/// what a pending one would copy, and what to run.
#[test]
fn status_matches_what_is_where() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let (usb, other) = (tmp.path().join("usb"), tmp.path().join("other"));
    write(&src.join("big.bin"), &noise(4, 1 << 20));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    write(&src.join("a.txt"), b"changed");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.s]\nsource = \"{}\"\nbackups_folder = \"{}\"\nreplicas = [\"{}\", \"{}\", \"/nonexistent/drive\"]\n",
        src.display(),
        bk.display(),
        usb.display(),
        other.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    // `other` holds the job's replicas, none left (all pruned there);
    // /nonexistent/drive isn't there.
    std::fs::create_dir_all(other.join("s.rbackup")).unwrap();
    // Only the first snapshot is on the USB drive.
    assert_eq!(replicate(&bk, &usb).0, 0);
    let newest = complete(&usb, "s").pop().unwrap();
    std::fs::remove_dir_all(&newest).unwrap();
    let (code, out, err) = run(&["-c", c, "status"].iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with("s.")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    let cells =
        |row: &str| row.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_string).collect::<Vec<_>>();
    let (first, second) = (cells(rows[0]), cells(rows[1]));
    assert_eq!(first[1], "yes", "{out}");
    assert!(first[2].starts_with("pending (1.0 MiB)"), "all of it, to a replica holding none: {out}");
    assert_eq!(first[3], "not there", "{out}");
    assert_eq!(second[1], "pending (7 B)", "only what changed, with the first replica there: {out}");
    assert!(out.contains(&format!("replica {}: 1 snapshot pending", usb.display())), "{out}");
    assert!(out.contains(&format!("replica {}: 2 snapshots pending", other.display())), "{out}");
    assert!(out.contains("replica /nonexistent/drive: not there, or can't be read (a drive not mounted?"), "{out}");
}

/// Killed mid-file, then run again: the replica is finished from what it
/// had, exact, and the replicas before it are untouched.
#[test]
fn a_replicate_killed_mid_file_is_finished_by_the_next_one() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("rep"));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    sh(&format!("head -c 300M /dev/urandom > '{}'", src.join("big.bin").display()));
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    // The first replica, then the second killed while its big file arrives.
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 0, "{err}");
    let first = complete(&rep, "s")[0].clone();
    std::fs::remove_dir_all(complete(&rep, "s")[1].clone()).unwrap();
    let before = read_tree(&first);
    let mut child = std::process::Command::new(bin())
        .args(["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to", rep.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::resume::kill_when(&mut child, "the big file is half copied", || {
        crate::resume::temps(&rep).iter().any(|(_, len)| *len > 100 << 20)
    });
    assert!(snapshots(&rep, "s").iter().any(|(_, c)| !c), "an .incomplete replica is left");
    let (code, _, err) = replicate(&bk, &rep);
    assert_eq!(code, 0, "{err}");
    let replicas = complete(&rep, "s");
    assert_eq!(replicas.len(), 2);
    assert_same_tree(&complete(&bk, "s")[1], &replicas[1], &[]);
    assert!(diff_trees(&before, &read_tree(&first), &[]).is_empty(), "the replica before was touched");
    assert!(crate::resume::temps(&rep).is_empty(), "a temporary file was left");
}

/// A destination with its own rules gets only what they keep, and with
/// `prune = true` loses there what they no longer keep; `status` says
/// which snapshots it doesn't keep.
#[test]
fn a_destination_with_its_own_rules_gets_and_keeps_only_those() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("usb"));
    write(&src.join("big.bin"), &noise(5, 1 << 20));
    let keys = format!("replicas = [{{ to = \"{}\", keep_last = 2, prune = true }}]\n", rep.display());
    let rb = job_s(tmp.path(), &src, &bk, &keys);
    let folder = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    for round in 0..3 {
        write(&src.join("a.txt"), format!("round {round}").as_bytes());
        let (code, _, err) = rb(&["--backup"]);
        assert_eq!(code, 0, "{err}");
    }
    let originals: Vec<String> = complete(&bk, "s").iter().map(|p| folder(p)).collect();
    std::fs::create_dir(&rep).unwrap(); // the drive, mounted, with no replica yet
    let (code, out, err) = rb(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not there, or can't be read"), "an empty folder is no replica yet: {out}");
    let (code, _, err) = rb(&["replicate", "--to", rep.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 of the 2 snapshots its rules keep"), "{err}");
    assert_eq!(complete(&rep, "s").iter().map(|p| folder(p)).collect::<Vec<_>>(), originals[1..]);
    let (code, out, err) = rb(&["status"]);
    assert_eq!(code, 0, "{err}");
    let first_row = out.lines().find(|l| l.contains(&originals[0])).unwrap();
    assert!(first_row.contains("not kept there"), "{out}");
    assert!(out.contains("up to date"), "{out}");

    // One more: it is copied, linked to the replica before, and the oldest
    // replica goes by the destination's rule.
    write(&src.join("a.txt"), b"round 3");
    assert_eq!(rb(&["--backup"]).0, 0);
    assert!(rb(&["status"]).1.contains("1 snapshot pending"));
    // A dry run says what the destination's prune would remove, and does nothing.
    let before = names(&rep);
    let (code, out, err) = rb(&["replicate", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("would remove {}", originals[1])), "{out}");
    assert_eq!(names(&rep), before);
    let (code, _, err) = rb(&["replicate"]);
    assert_eq!(code, 0, "{err}");
    let originals: Vec<String> = complete(&bk, "s").iter().map(|p| folder(p)).collect();
    let replicas = complete(&rep, "s");
    assert_eq!(replicas.iter().map(|p| folder(p)).collect::<Vec<_>>(), originals[2..]);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&replicas[0].join("big.bin")), ino(&replicas[1].join("big.bin")));
    assert_eq!(std::fs::read(replicas[1].join("a.txt")).unwrap(), b"round 3");
    // The originals themselves are untouched: the job has no rules of its own.
    assert_eq!(originals.len(), 4);
}

/// `check` looks at each replica: a drive that holds no replica while the
/// job replicates after each backup fails the check, with the command that
/// makes the first one; once made, it counts its snapshots.
#[test]
fn check_says_whether_each_replica_is_there() {
    let tmp = scratch();
    let (src, bk, usb) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("usb"));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let rb =
        job_s(tmp.path(), &src, &bk, &format!("replicas = [\"{}\"]\nreplicate_after_backup = true\n", usb.display()));
    let check = || rb(&["check"]);
    let (code, out, _) = check();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&format!("FAIL  replica {}: holds no replica of s (a drive not mounted?)", usb.display())));
    assert!(out.contains("the first replica is made by hand"), "{out}");
    std::fs::create_dir(&usb).unwrap();
    assert_eq!(replicate(&bk, &usb).0, 0);
    let (_, out, _) = check();
    // On one test filesystem the replica is where the originals are: said.
    assert!(out.contains(&format!("FAIL  replica {}: on the backups folder's own filesystem", usb.display())), "{out}");
}

/// `replicate` of the configured destinations tries each, whatever became
/// of the one before, and fails if one did.
#[test]
fn every_configured_destination_is_tried() {
    let tmp = scratch();
    let (src, bk, usb) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("usb"));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    std::fs::create_dir_all(usb.join("s.rbackup")).unwrap(); // a drive holding the job's replicas
    let rb = job_s(tmp.path(), &src, &bk, &format!("replicas = [\"/nonexistent/drive\", \"{}\"]\n", usb.display()));
    let (code, _, err) = rb(&["replicate"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("replicating to /nonexistent/drive:"), "{err}");
    assert_eq!(complete(&usb, "s").len(), 1, "the second one got its replica: {err}");
}

/// Replicated apart from the backups (its own timer): a prune after a
/// backup still keeps what the replica has not got yet.
#[test]
fn a_prune_after_a_backup_waits_for_a_replica_made_apart() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("rep"));
    let keys = format!("replicas = [\"{}/\"]\nkeep_last = 1\nprune_after_backup = true\n", rep.display());
    let rb = job_s(tmp.path(), &src, &bk, &keys);
    let round = |n: u32| {
        write(&src.join("a.txt"), format!("round {n}").as_bytes());
        let (code, _, err) = rb(&["--backup"]);
        assert_eq!(code, 0, "{err}");
        err
    };
    round(0);
    // Named without the trailing slash: the same destination.
    assert_eq!(rb(&["replicate", "--to", rep.to_str().unwrap()]).0, 0);
    round(1); // round 0 is on the replica: pruned
    let err = round(2); // round 1 is not: kept
    assert!(err.contains("1 snapshot the rules would remove kept: not yet on a replica"), "{err}");
    let contents = |folder: &Path| -> Vec<Vec<u8>> {
        complete(folder, "s").iter().map(|p| std::fs::read(p.join("a.txt")).unwrap()).collect()
    };
    assert_eq!(contents(&bk), [&b"round 1"[..], b"round 2"]);
    assert_eq!(rb(&["replicate"]).0, 0);
    round(3);
    assert_eq!(contents(&bk), [&b"round 3"[..]]);
    assert_eq!(contents(&rep), [&b"round 0"[..], b"round 1", b"round 2"]);
}

/// Two drives rotated off site, each with `away_days`: the one away is a
/// note while its allowance lasts (its snapshots wait for it), an error
/// after; back, it gets what it missed.
#[test]
fn a_drive_rotated_off_site_is_away_not_failed_for_its_away_days() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let keys = format!(
        "replicas = [{{ to = \"{}\", away_days = 7 }}, {{ to = \"{}\", away_days = 7 }}]\n\
         replicate_after_backup = true\nkeep_last = 1\nprune_after_backup = true\n",
        a.display(),
        b.display()
    );
    let rb = job_s(tmp.path(), &src, &bk, &keys);
    let round = |n: u32| {
        write(&src.join("a.txt"), format!("round {n}").as_bytes());
        rb(&["--backup"])
    };
    assert_eq!(round(0).0, 1, "neither drive has a first replica yet");
    for d in [&a, &b] {
        assert_eq!(rb(&["replicate", "--to", d.to_str().unwrap()]).0, 0);
    }
    let away = tmp.path().join("b.away");
    std::fs::rename(&b, &away).unwrap();
    for n in 1..3 {
        let (code, _, err) = round(n);
        assert_eq!(code, 0, "away within its allowance: {err}");
        assert!(err.contains(&format!("{} is away (last reached", b.display())), "{err}");
    }
    assert_eq!(complete(&bk, "s").len(), 2, "rounds 1 and 2 wait for the drive away");
    let (_, out, _) = rb(&["check"]);
    assert!(out.contains(&format!("note  replica {}: away since", b.display())), "{out}");
    let (_, out, _) = rb(&["status"]);
    assert!(out.contains(&format!("replica {}: away; last reached", b.display())), "{out}");
    // Away longer than its allowance: an error, and still nothing lost.
    let record = bk.join("s.rbackup/replicas.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let long_ago = (chrono::Utc::now() - chrono::Duration::days(10)).to_rfc3339();
    json["destinations"][b.to_str().unwrap()]["when"] = serde_json::Value::String(long_ago);
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let (code, _, err) = round(3);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("longer than its away_days = 7"), "{err}");
    std::fs::rename(&away, &b).unwrap();
    assert_eq!(round(4).0, 0);
    assert_eq!(complete(&bk, "s").len(), 1);
    let on = |d: &Path| -> Vec<Vec<u8>> {
        complete(d, "s").iter().map(|p| std::fs::read(p.join("a.txt")).unwrap()).collect()
    };
    let all: Vec<Vec<u8>> = (0..5).map(|n| format!("round {n}").into_bytes()).collect();
    assert_eq!(on(&a), all);
    assert_eq!(on(&b), all, "the drive back got every round it missed");
}
