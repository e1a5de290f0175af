//! Backups of a local source, against the built binary: exact copies, hardlink
//! dedup, dry runs, excludes, device nodes, non-root runs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::common::*;

#[test]
fn snapshot_equals_source_entry_by_entry() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    rich_tree(&src);
    let source = read_tree(&src);
    assert!(deepest(&source) > 4096, "the fixture must hold a path longer than PATH_MAX");

    let (code, _, err) = backup(&src, &tmp.path().join("bk"), "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let snaps = snapshots(&tmp.path().join("bk"), "srv");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].1, "the snapshot is complete");
    let snap = tmp.path().join("bk").join(&snaps[0].0);
    assert_same_tree(&src, &snap, &[]);

    // Holes stay holes: the 64 MiB sparse file allocates what the source does.
    let copy = read_tree(&snap);
    let (a, b) = (&source[&b"var/disk.img".to_vec()], &copy[&b"var/disk.img".to_vec()]);
    assert!(b.blocks <= a.blocks, "sparse file allocates {} blocks, source {}", b.blocks, a.blocks);
    assert!(b.blocks * 512 < 1 << 20, "sparse file allocates {} blocks", b.blocks);

    // Bookkeeping lives beside the snapshot, never inside it.
    let inside: Vec<_> = std::fs::read_dir(&snap).unwrap().map(|e| e.unwrap().file_name()).collect();
    let expected: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(inside.len(), expected.len());
    assert!(tmp.path().join("bk/srv.rbackup/lock").exists());
}

#[test]
fn second_snapshot_links_unchanged_files_and_never_touches_the_first() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    rich_tree(&src);
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let first = complete(&bk, "srv")[0].clone();
    let first_before = read_tree(&first);

    // chmod, changed xattr, changed ACL, changed content, new and removed files.
    sh(&format!("chmod 640 '{}'", src.join("etc/shadow-like").display()));
    sh(&format!("setfattr -n user.color -v red '{}'", src.join("etc/motd").display()));
    sh(&format!("setfacl -m u:4242:r '{}'", src.join("shared/report.txt").display()));
    write(&src.join("home/alice/big.bin"), &noise(9, 3 << 20));
    write(&src.join("new/file.txt"), b"new\n");
    std::fs::remove_file(src.join("names/with space.txt")).unwrap();

    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let snaps = complete(&bk, "srv");
    assert_eq!(snaps.len(), 2);
    let second = &snaps[1];
    assert_same_tree(&src, second, &[]);

    let (a, b) = (read_tree(&first), read_tree(second));
    let changed: [&[u8]; 5] =
        [b"etc/shadow-like", b"etc/motd", b"etc/motd.hardlink", b"shared/report.txt", b"home/alice/big.bin"];
    for (path, info) in &b {
        if info.kind != "file" {
            continue;
        }
        let shared = a.get(path).is_some_and(|old| old.ino == info.ino);
        if changed.contains(&path.as_slice()) || path == b"new/file.txt" {
            assert!(!shared, "{} changed but shares the first snapshot's inode", String::from_utf8_lossy(path));
        } else {
            assert!(shared, "{} is unchanged but was not hardlinked", String::from_utf8_lossy(path));
        }
    }
    // The first snapshot is exactly as it was: content, modes, owners, times, xattrs, ACLs.
    let diffs = diff_trees(&first_before, &read_tree(&first), &[]);
    assert!(diffs.is_empty(), "the first snapshot changed:\n{}", diffs.join("\n"));
    assert_eq!(std::fs::metadata(first.join("etc/shadow-like")).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn dry_run_lists_actions_and_writes_nothing() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("a.txt"), b"a");
    write(&src.join("b.txt"), b"b");
    let (code, out, err) = backup(&src, &bk, "srv", &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(!bk.exists(), "a dry run created the backups folder");
    assert!(out.contains("fetch    a.txt") && out.contains("fetch    b.txt"), "{out}");

    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    write(&src.join("b.txt"), b"bb");
    let before = snapshots(&bk, "srv");
    let (code, out, err) = backup(&src, &bk, "srv", &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    // Regression: every entry was printed (39,338 lines for an unchanged
    // tree); now only the changes, and every entry with -v.
    assert_eq!(out, "fetch    b.txt\n", "{out}");
    assert!(err.contains("-v lists every entry"), "{err}");
    let (code, out, err) = backup(&src, &bk, "srv", &["--dry-run", "-v"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("link     a.txt"), "{out}");
    assert!(out.contains("fetch    b.txt"), "{out}");
    assert_eq!(snapshots(&bk, "srv"), before, "a dry run changed the snapshots");
}

#[test]
fn excluded_paths_are_left_out() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("keep.txt"), b"k");
    write(&src.join("cache/big"), b"c");
    write(&src.join("sub/cache/kept-not-root"), b"k");
    write(&src.join("sub/x.tmp"), b"t");
    let (code, _, err) = backup(&src, &bk, "srv", &["--exclude", "/cache/", "--exclude", "*.tmp"]);
    assert_eq!(code, 0, "{err}");
    let snap = &complete(&bk, "srv")[0];
    assert!(snap.join("keep.txt").exists());
    assert!(!snap.join("cache").exists());
    assert!(snap.join("sub/cache/kept-not-root").exists());
    assert!(!snap.join("sub/x.tmp").exists());
}

#[test]
fn device_nodes_only_when_asked() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    sh(&format!("mknod '{}' c 1 3", src.join("null").display()));
    let (code, _, err) = backup(&src, &bk, "plain", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!complete(&bk, "plain")[0].join("null").exists());
    assert!(err.contains("device nodes are skipped"), "{err}");

    let (code, _, err) = backup(&src, &bk, "dev", &["--devices"]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &complete(&bk, "dev")[0], &[]);
}

#[test]
fn two_runs_in_the_same_second_do_not_collide() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    for _ in 0..3 {
        let (code, _, err) = backup(&src, &bk, "srv", &[]);
        assert_eq!(code, 0, "{err}");
    }
    let snaps = complete(&bk, "srv");
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    for s in &snaps {
        assert_same_tree(&src, s, &[]);
    }
}

#[test]
fn list_orders_by_time_in_the_name_and_ignores_other_folders() {
    require_root();
    let tmp = scratch();
    let bk = tmp.path().join("bk");
    // String order would put 31-12-19 after 01-01-20 and 02-01-19.
    for f in [
        "srv.31-12-19_23-59-59",
        "srv.01-01-20_00-00-00",
        "srv.02-01-19_10-00-00.incomplete",
        "srv.02-01-19_10-00-00",
        "srv.not-a-stamp",
        "other.01-01-20_00-00-00",
        "srv.rbackup",
    ] {
        std::fs::create_dir_all(bk.join(f)).unwrap();
    }
    std::fs::write(bk.join("srv.05-05-05_05-05-05"), b"a file, not a snapshot").unwrap();
    let (code, out, err) =
        run(&["--list".as_ref(), "--backups-folder".as_ref(), bk.as_os_str(), "--name".as_ref(), "srv".as_ref()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().last().unwrap().starts_with("total on disk: "), "{out}");
    let folders: Vec<&str> =
        out.lines().filter(|l| l.starts_with("srv.")).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(
        folders,
        ["srv.02-01-19_10-00-00", "srv.02-01-19_10-00-00.incomplete", "srv.31-12-19_23-59-59", "srv.01-01-20_00-00-00"]
    );
    assert!(out.lines().nth(1).unwrap().contains("incomplete"), "{out}");
    assert!(out.lines().next().unwrap().contains("2019-01-02 10:00:00 UTC"), "{out}");
}

#[test]
fn a_non_root_run_of_a_local_source_works_and_warns_about_owners() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("a/b.txt"), b"b");
    sh(&format!("setfattr -n user.k -v v '{}'", src.join("a/b.txt").display()));
    sh(&format!("chown -R nobody:nogroup '{}' && chmod 777 '{}'", src.display(), tmp.path().display()));
    let (code, err) = backup_under_setpriv(
        &["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"],
        &src,
        &bk,
        "srv",
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches("not running as root").count(), 1, "{err}");
    let snaps = complete(&bk, "srv");
    assert_eq!(snaps.len(), 1);
    assert_same_tree(&src, &snaps[0], &[]);
    // A second run links, even without root.
    let (code, err) = backup_under_setpriv(&["--reuid=nobody", "--regid=nogroup", "--clear-groups"], &src, &bk, "srv");
    assert_eq!(code, Some(0), "{err}");
    let snaps = complete(&bk, "srv");
    let ino = |p: &Path| std::fs::metadata(p.join("a/b.txt")).unwrap().ino();
    assert_eq!(ino(&snaps[0]), ino(&snaps[1]));
}

#[test]
fn an_inode_at_the_link_limit_is_copied_and_the_run_goes_on() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    // ext4 allows 65000 links per inode: give the source file all of them.
    write(&src.join("d0/n0"), b"many names");
    for i in 1..65_000 {
        let dir = src.join(format!("d{}", i / 10_000));
        if i % 10_000 == 0 {
            std::fs::create_dir(&dir).unwrap();
        }
        std::fs::hard_link(src.join("d0/n0"), dir.join(format!("n{i}"))).unwrap();
    }
    assert_eq!(std::fs::metadata(src.join("d0/n0")).unwrap().nlink(), 65_000);
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let first = complete(&bk, "srv")[0].clone();
    assert_eq!(std::fs::metadata(first.join("d0/n0")).unwrap().nlink(), 65_000, "one inode, 65000 names");
    assert!(
        std::fs::hard_link(first.join("d0/n0"), tmp.path().join("one-more")).is_err(),
        "this filesystem has no 65000-link limit; the test needs ext4"
    );

    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let second = complete(&bk, "srv")[1].clone();
    assert_same_tree(&src, &second, &[]);
    assert_ne!(
        std::fs::metadata(first.join("d0/n0")).unwrap().ino(),
        std::fs::metadata(second.join("d0/n0")).unwrap().ino()
    );
}

#[test]
fn the_log_file_gets_the_same_lines_with_timestamps() {
    require_root();
    let tmp = scratch();
    let (src, bk, log) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("logs/srv.log"));
    write(&src.join("f"), b"f");
    for _ in 0..2 {
        let (code, _, err) = backup(&src, &bk, "srv", &["--log-file", log.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("linked"), "{err}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let summaries: Vec<&str> = text.lines().filter(|l| l.contains(": OK in ")).collect();
    assert_eq!(summaries.len(), 2, "{text}");
    for line in summaries {
        // 2026-11-22T10:00:00Z rbackup[123] srv: snapshot srv.…: OK in 0.1 s
        let stamp = line.split_whitespace().next().unwrap();
        assert_eq!(stamp.len(), 20, "{line}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{line}");
        assert!(line.contains(" rbackup[") && line.contains("] srv: snapshot srv."), "{line}");
    }
    assert_eq!(std::fs::metadata(&log).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn an_unreadable_file_is_listed_and_the_run_completes_as_partial() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("ok.txt"), b"ok");
    write(&src.join("private/secret.txt"), b"secret");
    write(&src.join("closed/inside.txt"), b"x");
    sh(&format!("chown -R nobody:nogroup '{}' && chmod 777 '{}'", src.display(), tmp.path().display()));
    sh(&format!("chown root:root '{0}' && chmod 600 '{0}'", src.join("private/secret.txt").display()));
    sh(&format!("chown root:root '{0}' && chmod 700 '{0}'", src.join("closed").display()));
    let (code, err) = backup_under_setpriv(&["--reuid=nobody", "--regid=nogroup", "--clear-groups"], &src, &bk, "srv");
    assert_eq!(code, Some(23), "{err}");
    assert!(err.contains("cannot read: private/secret.txt"), "{err}");
    assert!(err.contains("cannot read: closed"), "{err}");
    assert!(err.contains("setfacl"), "the hint is missing: {err}");
    let snap = &complete(&bk, "srv")[0];
    assert_eq!(std::fs::read(snap.join("ok.txt")).unwrap(), b"ok");
    assert!(!snap.join("private/secret.txt").exists());
}

#[test]
fn the_backups_folder_is_created_private_and_an_open_one_gets_a_warning() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let fresh = tmp.path().join("a/b/bk");
    let (code, _, err) = backup(&src, &fresh, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
    assert!(!err.contains("can be entered by other users"), "{err}");

    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    sh(&format!("chmod 755 '{}'", open.display()));
    let (code, _, err) = backup(&src, &open, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("can be entered by other users") && err.contains("chmod 700"), "{err}");
    assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o777, 0o755, "the admin's folder mode is left alone");
}

/// Regression: two runs within one second once printed "a snapshot … is newer
/// than the clock says it is now" and named the second run after a time still
/// to come. Each run gets its own second, none ahead of the clock.
#[test]
fn runs_within_one_second_get_distinct_names_and_no_clock_warning() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("a"), b"a");
    let bk = tmp.path().join("bk");
    for _ in 0..3 {
        let (code, _, err) = backup(&src, &bk, "srv", &[]);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("newer than the clock"), "{err}");
    }
    let snaps = snapshots(&bk, "srv");
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(snaps.iter().all(|(_, complete)| *complete), "{snaps:?}");
    let now = chrono::Utc::now().naive_utc();
    for (folder, _) in &snaps {
        let stamp = folder.strip_prefix("srv.").unwrap();
        let t = chrono::NaiveDateTime::parse_from_str(stamp, "%d-%m-%y_%H-%M-%S").unwrap();
        assert!(t <= now, "{folder} is named after a time to come ({now})");
    }
}

/// A filesystem mounted for one test, unmounted when dropped.
struct Mounted(std::path::PathBuf);

impl Mounted {
    fn new(what: &str, options: &[&str], at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount").args(options).arg(what).arg(at).status().unwrap();
        assert!(st.success(), "mount {what} on {} failed", at.display());
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_mtime_the_destination_cant_hold_is_warned_about_and_linked_next_run() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    // The source holds any time (tmpfs); the backups' ext4 holds 1901 to 2446.
    let image = tmp.path().join("bk.img");
    std::fs::File::create(&image).unwrap().set_len(64 << 20).unwrap();
    sh(&format!("mkfs.ext4 -q -F -I 256 '{}'", image.display()));
    let _bk = Mounted::new(image.to_str().unwrap(), &["-o", "loop"], &bk);
    let _src = Mounted::new("tmpfs", &["-t", "tmpfs", "-o", "size=16m"], &src);
    write(&src.join("future"), b"far ahead");
    write(&src.join("normal"), b"now");
    write(&src.join("past"), b"long ago");
    set_mtime(&src.join("future"), i64::MAX, 0);
    set_mtime(&src.join("past"), i64::MIN, 0);
    assert_eq!(std::fs::symlink_metadata(src.join("future")).unwrap().mtime(), i64::MAX, "tmpfs keeps any time");
    let json = tmp.path().join("stats.json");
    let stats = || -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap() };

    // The first run stores what ext4 can and says so, once, as a metadata problem.
    let (code, _, err) = backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 23, "{err}");
    assert_eq!(err.matches("outside what the destination's filesystem holds").count(), 1, "{err}");
    assert!(err.contains("future") && err.contains("stored as 2446-05-10 22:38:55 UTC"), "{err}");
    assert!(err.contains("1 more entries have modification times"), "{err}");
    let first = complete(&bk, "srv")[0].clone();
    assert_eq!(std::fs::symlink_metadata(first.join("future")).unwrap().mtime(), 15_032_385_535);
    assert_eq!(std::fs::symlink_metadata(first.join("past")).unwrap().mtime(), -(1 << 31));

    // The second compares with what was stored: nothing is fetched again.
    let (code, _, err) = backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 23, "the snapshot still differs from the source: {err}");
    let s = stats();
    assert_eq!(s["stats"]["fetched_whole"], 0, "{s}");
    assert_eq!(s["stats"]["linked"], 3, "{s}");
    let second = complete(&bk, "srv")[1].clone();
    for f in ["future", "normal", "past"] {
        let ino = |p: &Path| std::fs::symlink_metadata(p.join(f)).unwrap().ino();
        assert_eq!(ino(&first), ino(&second), "{f} is linked to the first snapshot");
    }
}

/// The sink refuses a listing batch with more than BATCH_XATTRS_MAX
/// extended attributes (a bound against hostile sources): an honest source
/// with many attributes splits its batches to stay within it.
#[test]
fn many_files_with_many_attributes_are_listed_within_the_batch_bound() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    for f in 0..300 {
        let path = src.join(format!("f{f:03}"));
        write(&path, b"x");
        for a in 0..70 {
            xattr::set(&path, format!("user.a{a:02}"), b"").unwrap();
        }
    }
    let total = 256 * 70; // one batch of the source's 256 entries
    assert!(total > rbackup::wire::msg::BATCH_XATTRS_MAX);
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &[]);
}

/// Regression: a dry run said `fetch` for a file the backup user can't read,
/// with exit 0, where the real run exits 23.
#[test]
fn a_dry_run_reports_unreadable_files_and_the_real_runs_exit_code() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("open.txt"), b"o");
    write(&src.join("secret.txt"), b"s");
    sh(&format!(
        "chmod 755 '{}' && chmod 644 '{}/open.txt' && chmod 600 '{}/secret.txt'",
        src.display(),
        src.display(),
        src.display()
    ));
    sh(&format!("chmod 755 '{}'", tmp.path().display()));
    let privs = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    let out = std::process::Command::new("setpriv")
        .args(privs)
        .arg(bin())
        .args(["--backup", "--dry-run", "--source"])
        .arg(&src)
        .arg("--backups-folder")
        .arg(&bk)
        .args(["--name", "srv"])
        .output()
        .unwrap();
    let (dry_out, dry_err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(dry_err.contains("secret.txt"), "{dry_err}");
    assert!(!dry_out.contains("secret.txt"), "listed as fetched: {dry_out}");
    std::fs::create_dir(&bk).unwrap();
    sh(&format!("chown nobody '{}'", bk.display()));
    let (real, real_err) = backup_under_setpriv(&privs, &src, &bk, "srv");
    assert_eq!(real, Some(23), "{real_err}");
    assert_eq!(out.status.code(), real, "the dry run's exit code is the real run's: {dry_err}");
}
