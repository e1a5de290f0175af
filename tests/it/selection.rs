//! What a job sends and how fast: exclude files, one filesystem, the
//! bandwidth limit, several folders in one snapshot (issue 14), through the
//! real binary, and over the real sshd where the server decides.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::sshd::Sshd;
use crate::common::*;

fn args<'a>(v: &'a [&'a str]) -> Vec<&'a OsStr> {
    v.iter().map(OsStr::new).collect()
}

#[test]
fn an_exclude_file_leaves_out_what_its_lines_match_and_a_missing_one_is_named() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("keep.txt"), b"keep");
    write(&src.join("cache/big"), b"cache");
    write(&src.join("a/b.tmp"), b"tmp");
    write(&src.join("a/keep.tmp"), b"kept by !");
    let list = tmp.path().join("excludes");
    std::fs::write(&list, "# caches\n/cache/\n\n  \n*.tmp\n!keep.tmp\n").unwrap();

    let (code, _, err) = backup(&src, &bk, "s", &["--exclude-from", list.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let snap = complete(&bk, "s")[0].clone();
    assert!(snap.join("keep.txt").exists() && snap.join("a/keep.tmp").exists());
    assert!(!snap.join("cache").exists() && !snap.join("a/b.tmp").exists());

    let missing = tmp.path().join("no-such-excludes");
    let (code, _, err) = backup(&src, &bk, "s", &["--exclude-from", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert_eq!(complete(&bk, "s").len(), 1, "a run with a missing exclude file wrote a snapshot");
}

/// The config's new keys are checked when the file is read: each error names
/// the file, the line and the key, and nothing runs (exit code 2).
#[test]
fn bad_values_of_the_new_keys_name_the_file_the_line_and_the_key() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    let config = tmp.path().join("rbackup.toml");
    for (line, needles) in [
        ("bwlimit = \"5X\"", &["bwlimit", "5X"][..]),
        ("paths = [\"etc\", \"/srv\"]", &["paths", "/srv", "absolute"]),
        ("paths = [\"srv/../../etc\"]", &["paths", ".."]),
        ("exclude_from = \"missing.exclude\"", &["exclude_from", "missing.exclude"]),
    ] {
        let text =
            format!("[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\n{line}\n", src.display(), bk.display());
        std::fs::write(&config, text).unwrap();
        let (code, _, err) = run(&args(&["-c", config.to_str().unwrap(), "-j", "web", "--backup"]));
        assert_eq!(code, 2, "{line}: {err}");
        assert!(err.contains(config.to_str().unwrap()) && err.contains("line 4"), "{line}: {err}");
        for n in needles {
            assert!(err.contains(n), "{line}: {n} missing from: {err}");
        }
    }
    assert!(snapshots(&bk, "web").is_empty());
    let (code, _, err) = backup(&src, &bk, "s", &["--bwlimit", "5X"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--bwlimit") && err.contains("5X"), "{err}");
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!("mount -t tmpfs -o size=8m rbackup-test '{}'", at.display()));
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn one_file_system_keeps_a_mount_point_as_an_empty_directory() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("here.txt"), b"on the root's filesystem");
    let mnt = Mounted::tmpfs(&src.join("data/mnt"));
    write(&mnt.0.join("other.txt"), b"on another filesystem");
    write(&mnt.0.join("deep/more.txt"), b"more");
    std::fs::set_permissions(&mnt.0, std::fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&mnt.0, 1_500_000_000, 7);

    let (code, _, err) = backup(&src, &bk, "x", &["-x"]);
    assert_eq!(code, 0, "{err}");
    let snap = complete(&bk, "x")[0].clone();
    assert_eq!(std::fs::read(snap.join("here.txt")).unwrap(), b"on the root's filesystem");
    let kept = std::fs::symlink_metadata(snap.join("data/mnt")).unwrap();
    assert!(kept.is_dir());
    assert_eq!(std::fs::read_dir(snap.join("data/mnt")).unwrap().count(), 0, "the mount point was entered");
    // The mount point's own metadata, as lstat shows it.
    assert_eq!((kept.mode() & 0o7777, kept.mtime(), kept.mtime_nsec()), (0o750, 1_500_000_000, 7));

    // Without it, the other filesystem is backed up like the rest.
    let (code, _, err) = backup(&src, &bk, "whole", &[]);
    assert_eq!(code, 0, "{err}");
    let whole = complete(&bk, "whole")[0].clone();
    assert_same_tree(&src, &whole, &[]);
    assert_eq!(std::fs::read(whole.join("data/mnt/deep/more.txt")).unwrap(), b"more");
}

/// With `paths`, -x keeps each chosen folder to its own filesystem: a chosen
/// folder that is a mount point is backed up (rsync -x with several
/// sources does the same), a mount beneath it is not entered.
#[test]
fn one_file_system_with_paths_keeps_each_chosen_folder_on_its_own_filesystem() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("left-out.txt"), b"not chosen");
    let mnt = Mounted::tmpfs(&src.join("data/mnt"));
    write(&mnt.0.join("other.txt"), b"on the chosen folder's filesystem");
    let inner = Mounted::tmpfs(&mnt.0.join("inner"));
    write(&inner.0.join("deeper.txt"), b"on a third filesystem");
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.x]\nsource = \"{}\"\nbackups_folder = \"{}\"\npaths = [\"data/mnt\"]\none_file_system = true\n",
        src.display(),
        bk.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "-j", "x", "--backup"]));
    assert_eq!(code, 0, "{err}");
    let snap = complete(&bk, "x")[0].clone();
    assert_eq!(std::fs::read(snap.join("data/mnt/other.txt")).unwrap(), b"on the chosen folder's filesystem");
    assert!(snap.join("data/mnt/inner").is_dir());
    assert_eq!(std::fs::read_dir(snap.join("data/mnt/inner")).unwrap().count(), 0, "a mount beneath was entered");
    assert!(!snap.join("left-out.txt").exists());
    drop(inner);
}

/// Regression (a newcomer's walk): a folder in `paths` that isn't on the
/// source (a typo) backed up nothing, with exit 0. It is now named as
/// unreadable (exit 23), and the folders that are there are backed up.
#[test]
fn a_path_the_job_names_that_is_not_on_the_source_is_said() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("var/lib/dumps/db.sql"), b"dump");
    write(&src.join("etc/hosts"), b"hosts");
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.x]\nsource = \"{}\"\nbackups_folder = \"{}\"\npaths = [\"etc\", \"var/lib/dumsp\", \"opt/app\"]\n",
        src.display(),
        bk.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "-j", "x", "--backup"]));
    assert_eq!(code, 23, "{err}");
    assert!(err.contains("var/lib/dumsp") && err.contains("is not on the source"), "{err}");
    assert!(err.contains("opt") && !err.contains("opt/app"), "the first missing level is named: {err}");
    let snap = complete(&bk, "x")[0].clone();
    assert_eq!(std::fs::read(snap.join("etc/hosts")).unwrap(), b"hosts");
}

#[test]
fn bwlimit_paces_backups_and_restores_and_the_copy_is_exact() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("four.bin"), &noise(14, 4 << 20));
    write(&src.join("small.txt"), b"small");

    // 4 MiB at 1 MiB/s: a lower bound only, the limit is a guarantee.
    let started = Instant::now();
    let (code, _, err) = backup(&src, &bk, "s", &["--bwlimit", "1M"]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(took >= Duration::from_secs(3), "4 MiB at 1 MiB/s took {took:?}");
    let snap = complete(&bk, "s")[0].clone();
    assert_same_tree(&src, &snap, &[]);

    // A restore is sent by the desktop: it paces itself.
    let to = tmp.path().join("restored");
    let started = Instant::now();
    let (code, _, err) = run(&args(&[
        "restore",
        "--backups-folder",
        bk.to_str().unwrap(),
        "--name",
        "s",
        "--to",
        to.to_str().unwrap(),
        "--bwlimit",
        "1M",
    ]));
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert!(took >= Duration::from_secs(3), "a 4 MiB restore at 1 MiB/s took {took:?}");
    assert_eq!(std::fs::read(to.join("four.bin")).unwrap(), noise(14, 4 << 20));
}

/// Sets a directory's mode and mtime, as a server's folders on the way have.
fn dir_meta(p: &Path, mode: u32, mtime: i64) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(p, mtime, 0);
}

#[test]
fn paths_over_ssh_put_two_folders_in_one_snapshot_with_excludes_and_link_unchanged_files() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (root, bk) = (tmp.path().join("root"), tmp.path().join("bk"));
    write(&root.join("srv/content/index.html"), b"<html>");
    write(&root.join("srv/content/sub/page.html"), b"page");
    write(&root.join("srv/content/cache/blob"), b"cached");
    write(&root.join("srv/other/not-chosen"), b"no");
    write(&root.join("etc/motd"), b"hello");
    write(&root.join("etc/cache/kept"), b"the exclude is anchored at the root");
    write(&root.join("home/alice/secret"), b"no");
    sshd.grant_read(&root);
    dir_meta(&root.join("srv"), 0o751, 1_400_000_000);
    sshd.authorize(&sshd.forced_read_only(&root));

    let config = tmp.path().join("rbackup.toml");
    std::fs::write(
        &config,
        format!(
            "[job.srv]\nsource = \"{}\"\nbackups_folder = \"{}\"\npaths = [\"srv/content\", \"etc\"]\n\
             exclude = [\"/srv/content/cache/\"]\n",
            sshd.source(&root),
            bk.display()
        ),
    )
    .unwrap();
    let pull = || {
        let mut a: Vec<String> = vec!["-c".into(), config.display().to_string(), "-j".into(), "srv".into()];
        a.push("--backup".into());
        a.extend(sshd.args());
        let a: Vec<&OsStr> = a.iter().map(OsStr::new).collect();
        run(&a)
    };

    let (code, _, err) = pull();
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    let first = complete(&bk, "srv")[0].clone();
    assert_same_tree(&root.join("etc"), &first.join("etc"), &[]);
    assert_eq!(std::fs::read(first.join("srv/content/sub/page.html")).unwrap(), b"page");
    assert!(!first.join("srv/content/cache").exists(), "the exclude in one folder was not applied");
    assert!(!first.join("srv/other").exists() && !first.join("home").exists(), "an unchosen folder was kept");
    // The folder on the way has its real metadata.
    let srv = std::fs::metadata(first.join("srv")).unwrap();
    assert_eq!((srv.mode() & 0o7777, srv.mtime()), (0o751, 1_400_000_000));
    let top: Vec<_> = std::fs::read_dir(&first).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top.len(), 2, "{top:?}");

    write(&root.join("etc/motd"), b"changed");
    std::thread::sleep(Duration::from_millis(1100));
    let (code, _, err) = pull();
    assert_eq!(code, 0, "{err}");
    let second = complete(&bk, "srv")[1].clone();
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&first.join("srv/content/index.html")), ino(&second.join("srv/content/index.html")));
    assert_eq!(ino(&first.join("etc/cache/kept")), ino(&second.join("etc/cache/kept")));
    assert_eq!(std::fs::read(second.join("etc/motd")).unwrap(), b"changed");

    // A restore of the job without --path restores its paths: with --delete,
    // the folders on the way keep what the snapshot never held.
    let to = tmp.path().join("restored");
    write(&to.join("srv/other/mine"), b"not in any snapshot");
    let (code, _, err) =
        run(&args(&["-c", config.to_str().unwrap(), "-j", "srv", "restore", "--to", to.to_str().unwrap(), "--delete"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(to.join("srv/other/mine")).unwrap(), b"not in any snapshot");
    assert_eq!(std::fs::read(to.join("etc/motd")).unwrap(), b"changed");
}
