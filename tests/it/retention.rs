//! Manifests, verify, diff, list sizes and prune, on real snapshots.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn rb(bk: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend(["--backups-folder".as_ref(), bk.as_os_str(), "--name".as_ref(), "srv".as_ref()]);
    run(&all)
}

/// Two snapshots of a small tree, one second apart.
fn two_snapshots(tmp: &Path, between: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
    let (src, bk) = (tmp.join("src"), tmp.join("bk"));
    write(&src.join("a.txt"), b"alpha");
    write(&src.join("dir/b.txt"), b"bravo");
    write(&src.join("dir/c.bin"), &noise(1, 300_000));
    write(&src.join("meta.txt"), b"meta");
    write(&src.join("gone.txt"), b"gone");
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    std::thread::sleep(Duration::from_millis(1100));
    between(&src);
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    (src, bk)
}

#[test]
fn verify_passes_untouched_snapshots_and_catches_damage() {
    require_root();
    let tmp = scratch();
    let (_, bk) = two_snapshots(tmp.path(), |_| {});
    let (code, _, err) = rb(&bk, &["verify", "--snapshot", "all"]);
    assert_eq!(code, 0, "{err}");
    // Both snapshots share every file: each inode is read once.
    let reads: Vec<&str> = err.lines().filter(|l| l.contains(" read)")).collect();
    assert_eq!(reads.len(), 2, "{err}");
    assert!(reads[1].contains("0 B read"), "the second snapshot's shared inodes were read again: {err}");

    // Damage the latest snapshot (a copy of it, so the first keeps its inodes).
    let latest = complete(&bk, "srv")[1].clone();
    for f in ["dir/c.bin", "meta.txt"] {
        let p = latest.join(f);
        let data = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &data).unwrap();
        sh(&format!("touch -r '{}' '{}'", complete(&bk, "srv")[0].join(f).display(), p.display()));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(latest.join("dir/c.bin")).unwrap();
        let mut byte = [0u8];
        f.read_at(&mut byte, 150_000).unwrap();
        f.write_all_at(&[byte[0] ^ 1], 150_000).unwrap();
    }
    sh(&format!(
        "touch -r '{}' '{}'",
        complete(&bk, "srv")[0].join("dir/c.bin").display(),
        latest.join("dir/c.bin").display()
    ));
    sh(&format!("chmod 600 '{}'", latest.join("meta.txt").display()));
    std::fs::remove_file(latest.join("gone.txt")).unwrap();
    write(&latest.join("dir/added.txt"), b"new");
    let (code, out, err) = rb(&bk, &["verify"]);
    assert_eq!(code, 3, "{out}{err}");
    let name = latest.file_name().unwrap().to_str().unwrap();
    for line in [
        format!("{name}: changed content: dir/c.bin"),
        format!("{name}: changed metadata: meta.txt"),
        format!("{name}: missing: gone.txt"),
        format!("{name}: extra: dir/added.txt"),
    ] {
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    // The first snapshot is still fine.
    let first = complete(&bk, "srv")[0].file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(rb(&bk, &["verify", "--snapshot", &first]).0, 0);
}

#[test]
fn diff_lists_exactly_the_changes_made_between_two_snapshots() {
    require_root();
    let tmp = scratch();
    let (_, bk) = two_snapshots(tmp.path(), |src| {
        write(&src.join("dir/b.txt"), b"BRAVO");
        write(&src.join("new/file.txt"), b"new");
        std::fs::remove_file(src.join("gone.txt")).unwrap();
        sh(&format!("chmod 600 '{}'", src.join("meta.txt").display()));
    });
    let expected = "added    new\nadded    new/file.txt\nchanged  dir/b.txt\nmetadata meta.txt\nremoved  gone.txt\n";
    let sorted = |s: &str| {
        let mut v: Vec<&str> = s.lines().collect();
        v.sort();
        v.join("\n") + "\n"
    };
    let (code, out, err) = rb(&bk, &["diff", "previous", "latest"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sorted(&out), expected, "from the manifests");
    // Without manifests: by walking the trees, the same answer.
    std::fs::remove_dir_all(bk.join("srv.rbackup/manifests")).unwrap();
    let (code, out, err) = rb(&bk, &["diff", "previous", "latest"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("comparing the trees"), "{err}");
    assert_eq!(sorted(&out), expected, "from the trees");
}

#[test]
fn snapshots_without_a_manifest_still_work_everywhere() {
    require_root();
    let tmp = scratch();
    let (src, bk) = two_snapshots(tmp.path(), |_| {});
    std::fs::remove_dir_all(bk.join("srv.rbackup/manifests")).unwrap();
    // A backup links from a manifest-less snapshot: it hashes the files it
    // links, once, so that its own manifest has every hash.
    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("are hashed now, once"), "{err}");
    let (code, _, err) = rb(&bk, &["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("no recorded hash"), "{err}");
    let (code, _, err) = rb(&bk, &["verify", "--snapshot", "all"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.matches("no manifest").count() == 2, "{err}");
    let (code, out, _) = rb(&bk, &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("total on disk"), "{out}");
    let to = tmp.path().join("restored");
    let (code, _, err) = rb(
        &bk,
        &[
            "restore",
            "--snapshot",
            &complete(&bk, "srv")[0].file_name().unwrap().to_string_lossy(),
            "--to",
            to.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&complete(&bk, "srv")[0], &to, &[]);
}

/// Bytes all snapshot folders take together, counted by `du` (each inode once).
fn du(bk: &Path, names: &[String]) -> u64 {
    if names.is_empty() {
        return 0;
    }
    let out = std::process::Command::new("du")
        .args(["-s", "-B1", "-c"])
        .args(names.iter().map(|n| bk.join(n)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().last().unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn list_sizes_match_what_deleting_each_snapshot_frees() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("shared.bin"), &noise(1, 500_000));
    write(&src.join("one.bin"), &noise(2, 200_000));
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    std::thread::sleep(Duration::from_millis(1100));
    write(&src.join("one.bin"), &noise(3, 300_000));
    write(&src.join("two.bin"), &noise(4, 100_000));
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    std::thread::sleep(Duration::from_millis(1100));
    write(&src.join("two.bin"), &noise(5, 700_000));
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);

    let (code, out, err) = rb(&bk, &["list", "--bytes"]);
    assert_eq!(code, 0, "{err}");
    let names: Vec<String> =
        complete(&bk, "srv").iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let all = du(&bk, &names);
    let total = out.lines().find(|l| l.starts_with("total on disk: ")).unwrap();
    let total: u64 = total.trim_start_matches("total on disk: ").split(" in ").next().unwrap().parse().unwrap();
    assert_eq!(total, all, "{out}");
    for (i, name) in names.iter().enumerate() {
        let line = out.lines().find(|l| l.starts_with(name.as_str())).unwrap();
        let unique: u64 = line.split("only here").nth(1).unwrap().trim().parse().unwrap();
        let others: Vec<String> = names.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| n.clone()).collect();
        let frees = all - du(&bk, &others);
        assert_eq!(unique, frees, "{name}: list says {unique} only here, deleting it frees {frees}\n{out}");
        let apparent: u64 =
            line.split("size").nth(1).unwrap().split("only here").next().unwrap().trim().parse().unwrap();
        assert!(apparent >= 500_000, "{line}");
    }
}

/// A snapshot made by hardlinking a copy of `from` under `name` (fast).
fn fake_snapshot(bk: &Path, from: &Path, name: &str) {
    let st = std::process::Command::new("cp").arg("-al").arg(from).arg(bk.join(name)).status().unwrap();
    assert!(st.success());
}

#[test]
fn prune_applies_the_rules_and_a_killed_prune_is_finished_by_the_next() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    // Enough files that deleting one snapshot takes a moment.
    for d in 0..40 {
        for f in 0..60 {
            write(&src.join(format!("d{d:02}/f{f:03}")), b"x");
        }
    }
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let base = complete(&bk, "srv")[0].clone();
    // Old snapshots, one per day of early 2024.
    for day in 1..=6 {
        fake_snapshot(&bk, &base, &format!("srv.0{day}-01-24_12-00-00"));
    }
    fake_snapshot(&bk, &base, "srv.01-01-23_00-00-00.incomplete");

    let (code, out, err) = rb(&bk, &["prune", "--keep-daily", "3", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would remove srv.01-01-24_12-00-00  (no rule keeps it)"), "{out}");
    assert!(out.contains("keep         srv.06-01-24_12-00-00  (daily #2)"), "{out}");
    assert!(out.contains("would remove srv.01-01-23_00-00-00.incomplete  (superseded"), "{out}");
    assert_eq!(snapshots(&bk, "srv").len(), 8, "a dry run removed something");

    let mut child = rbackup(&[
        "prune".as_ref(),
        "--keep-daily".as_ref(),
        "3".as_ref(),
        "--backups-folder".as_ref(),
        bk.as_os_str(),
        "--name".as_ref(),
        "srv".as_ref(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let trash = bk.join("srv.rbackup/trash");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let busy = trash.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false);
        if busy {
            child.kill().unwrap();
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "prune finished before it could be killed");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    }
    child.wait().unwrap();
    // Mid-deletion: what is half deleted sits in the trash, never listed.
    let (code, out, _) = rb(&bk, &["list", "--no-sizes"]);
    assert_eq!(code, 0);
    let listed: Vec<&str> = out.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    for name in listed {
        let n = bk.join(name).join("d00").read_dir().unwrap().count()
            + bk.join(name).join("d39").read_dir().unwrap().count();
        assert_eq!(n, 120, "{name} is listed but incomplete");
    }
    // The next prune finishes the job.
    let (code, _, err) = rb(&bk, &["prune", "--keep-daily", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(trash.read_dir().unwrap().count(), 0);
    let left: Vec<String> = snapshots(&bk, "srv").into_iter().map(|(n, _)| n).collect();
    let mut expected = vec!["srv.05-01-24_12-00-00".to_string(), "srv.06-01-24_12-00-00".to_string()];
    expected.push(base.file_name().unwrap().to_string_lossy().into_owned());
    assert_eq!(left, expected);
    // Without rules nothing is guessed.
    let (code, _, err) = rb(&bk, &["prune"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn prune_after_backup_runs_only_after_a_successful_backup() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let cfg = tmp.path().join("rbackup.toml");
    let bk = tmp.path().join("bk");
    let conf = |source: &Path| {
        std::fs::write(
            &cfg,
            format!(
                "[job.srv]\nsource = \"{}\"\nbackups_folder = \"{}\"\nkeep_last = 2\nprune_after_backup = true\n",
                source.display(),
                bk.display()
            ),
        )
        .unwrap();
    };
    conf(&src);
    for _ in 0..3 {
        let (code, _, err) = run(&["-c".as_ref(), cfg.as_os_str(), "--backup".as_ref()]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(complete(&bk, "srv").len(), 2);
    // Regression: `-q` printed prune's keep/remove table, so cron mailed it daily.
    let (code, out, err) = run(&["-q".as_ref(), "-c".as_ref(), cfg.as_os_str(), "--backup".as_ref()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!((out.as_str(), err.as_str()), ("", ""), "-q prints only warnings and errors");
    assert_eq!(complete(&bk, "srv").len(), 2, "the prune still ran");
    conf(&tmp.path().join("missing"));
    let before = snapshots(&bk, "srv");
    let (code, _, _) = run(&["-c".as_ref(), cfg.as_os_str(), "--backup".as_ref()]);
    assert_eq!(code, 1);
    assert_eq!(snapshots(&bk, "srv"), before, "a failed backup must not prune");
}

/// The data extents of a file, as (start, end).
fn data_extents(path: &Path) -> Vec<(u64, u64)> {
    use rustix::fs::SeekFrom;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut at = 0;
    while let Ok(start) = rustix::fs::seek(&f, SeekFrom::Data(at)) {
        let end = rustix::fs::seek(&f, SeekFrom::Hole(start)).unwrap().min(size);
        out.push((start, end));
        at = end;
    }
    out
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    f.read_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 1], at).unwrap();
}

#[test]
fn a_16_gib_sparse_file_is_stored_exactly_and_verified_by_its_data_alone() {
    // Issue 11: hashing cost the apparent size (16 GiB of zeros hashed by
    // the backup, read by verify); it costs the 8 KiB of data now.
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = 16u64 << 30;
    let (middle, end) = (noise(3, 4096), noise(4, 4096));
    {
        use std::os::unix::fs::FileExt;
        std::fs::create_dir_all(&src).unwrap();
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&middle, 8 << 30).unwrap();
        f.write_all_at(&end, size - 4096).unwrap();
    }
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let copy = complete(&bk, "srv")[0].join("sparse");
    {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let md = std::fs::metadata(&copy).unwrap();
        assert_eq!(md.len(), size);
        assert!(md.blocks() * 512 <= 64 << 10, "holes were filled: {} blocks", md.blocks());
        assert_eq!(data_extents(&copy), data_extents(&src.join("sparse")), "the same data where the source has it");
        let f = std::fs::File::open(&copy).unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 8 << 30).unwrap();
        assert_eq!(buf, middle);
        f.read_exact_at(&mut buf, size - 4096).unwrap();
        assert_eq!(buf, end);
    }
    let (code, _, err) = rb(&bk, &["verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("8.0 KiB read"), "verify read more than the data: {err}");

    // A changed byte in the data, then one in a hole, is caught. (Times are
    // put back so that only the content differs.)
    let touch_back = || sh(&format!("touch -r '{}' '{}'", src.join("sparse").display(), copy.display()));
    for at in [(8 << 30) + 100, 4 << 30] {
        flip_byte(&copy, at);
        touch_back();
        let (code, out, err) = rb(&bk, &["verify"]);
        assert_eq!(code, 3, "a flipped byte at {at} went unnoticed: {out}{err}");
        assert!(out.contains("changed content: sparse"), "{out}");
        flip_byte(&copy, at);
        touch_back();
    }
    let (code, _, err) = rb(&bk, &["verify"]);
    assert_eq!(code, 0, "{err}");
}

/// Rewrites the manifest of `snapshot` as an rbackup of manifest format 1
/// wrote it: the same records, with plain BLAKE3 content hashes.
fn rewrite_as_format_1(bk: &Path, snapshot: &Path) {
    use rbackup::store::manifest::{Kind, ManifestReader, ManifestWriter};
    let dir = rbackup::fs::safefs::Dir::open_path(&bk.join("srv.rbackup/manifests")).unwrap();
    let folder = snapshot.file_name().unwrap().to_str().unwrap();
    let mut reader = ManifestReader::open(&dir, folder.as_bytes()).unwrap().unwrap();
    let mut writer = ManifestWriter::create_format(&dir, folder, 1).unwrap();
    while let Some(mut r) = reader.next_record().unwrap() {
        if r.kind == Kind::File {
            use std::os::unix::ffi::OsStrExt;
            let data = std::fs::read(snapshot.join(OsStr::from_bytes(&r.path))).unwrap();
            r.hash = Some(*blake3::hash(&data).as_bytes());
        }
        writer.push(r, None).unwrap();
    }
    writer.finish().unwrap().commit().unwrap();
}

#[test]
fn a_snapshot_linked_from_a_format_1_manifest_has_every_file_hashed_with_digest_v2() {
    // Manifests of format 1 hold plain BLAKE3: verify checks them with it,
    // and a snapshot linking from one records v2 digests computed anew.
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("a.txt"), b"alpha");
    write(&src.join("dir/c.bin"), &noise(1, 300_000));
    write(&src.join("empty"), b"");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let first = complete(&bk, "srv")[0].clone();
    rewrite_as_format_1(&bk, &first);
    let (code, out, err) = rb(&bk, &["verify"]);
    assert_eq!(code, 0, "a format 1 manifest is checked with plain BLAKE3: {out}{err}");

    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("hashed once more"), "{err}");
    let latest = complete(&bk, "srv")[1].clone();
    let dir = rbackup::fs::safefs::Dir::open_path(&bk.join("srv.rbackup/manifests")).unwrap();
    let name = latest.file_name().unwrap().to_str().unwrap();
    let mut reader = rbackup::store::manifest::ManifestReader::open(&dir, name.as_bytes()).unwrap().unwrap();
    assert_eq!(reader.digest(), rbackup::digest::Version::V2);
    let mut files = 0;
    while let Some(r) = reader.next_record().unwrap() {
        if r.kind == rbackup::store::manifest::Kind::File {
            use std::os::unix::ffi::OsStrExt;
            files += 1;
            let data = std::fs::read(src.join(OsStr::from_bytes(&r.path))).unwrap();
            assert_eq!(r.hash, Some(rbackup::digest::of_bytes(&data)), "{:?}", String::from_utf8_lossy(&r.path));
        }
    }
    assert_eq!(files, 3);
    {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&first.join("dir/c.bin")), ino(&latest.join("dir/c.bin")), "still linked, not copied");
    }
    let (code, out, err) = rb(&bk, &["verify", "--snapshot", "all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("no recorded hash"), "{err}");
    // The manifests' digests differ in version: diff compares the trees.
    let (code, out, err) = rb(&bk, &["diff", "previous", "latest"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "", "nothing changed: {err}");
}

/// Regression (a newcomer's walk): with -q (cron, the anacron script) nothing
/// recorded which snapshots prune deleted. Each is now in the job's log.
#[test]
fn what_prune_deletes_is_in_the_jobs_log_even_under_quiet() {
    let tmp = scratch();
    let (src, bk, log) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("web.log"));
    write(&src.join("a.txt"), b"a");
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nlog_file = \"{}\"\nkeep_last = 1\nprune_after_backup = true\n",
        src.display(),
        bk.display(),
        log.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let quiet = |args: &[&str]| {
        let mut all = vec!["-q", "-c", c, "-j", "web"];
        all.extend_from_slice(args);
        run(&all.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>())
    };
    assert_eq!(quiet(&["--backup"]).0, 0);
    let first = complete(&bk, "web")[0].file_name().unwrap().to_string_lossy().into_owned();
    let (code, out, err) = quiet(&["--backup"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty() && err.is_empty(), "-q printed: {out}{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&format!("removed {first} (no rule keeps it)")), "{text}");
}

/// Regression: `diff … | head` panicked ("failed printing to stdout") once
/// head had read enough.
#[test]
fn diff_into_a_reader_that_stops_early_ends_quietly() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    for i in 0..2000 {
        write(&src.join(format!("d/f{i:04}")), b"x");
    }
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    for i in 0..2000 {
        write(&src.join(format!("d/f{i:04}")), b"changed");
    }
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' diff previous latest --backups-folder '{}' --name s | head -n 1",
            bin().display(),
            bk.display()
        ))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("changed") || stdout.starts_with("metadata"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
