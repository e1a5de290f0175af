//! Restores: over SSH as root through a write-confined forced command, and to
//! a local folder; damaged destinations, chosen paths and snapshots, planted
//! symlinks, the read-only agent, and dry runs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::sshd::Sshd;
use crate::common::*;

/// A restore with `extra` arguments; returns (code, stdout, stderr).
fn restore(bk: &Path, extra: &[String]) -> (i32, String, String) {
    let mut args: Vec<String> =
        vec!["--restore".into(), "--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()];
    args.extend(extra.iter().cloned());
    run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
}

/// Restores over SSH as root to `dest`, beneath `area` (the forced command's root).
fn restore_ssh(sshd: &Sshd, bk: &Path, dest: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--to".to_string(), Sshd::root_target(dest)];
    args.extend(sshd.args());
    args.extend(extra.iter().map(ToString::to_string));
    restore(bk, &args)
}

/// `tmp/server`, where root's write-confined agent may write; returns the
/// restore destination in it, `tmp/server/content` (not created).
fn write_area(sshd: &Sshd, tmp: &Path) -> PathBuf {
    let area = tmp.join("server");
    std::fs::create_dir(&area).unwrap();
    sshd.authorize_root(&sshd.forced_write(&area));
    area.join("content")
}

/// A backup of a rich tree (taken locally, as root: trusted.* included).
fn snapshot_of_rich_tree(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (src, bk) = (tmp.join("src"), tmp.join("bk"));
    rich_tree(&src);
    write(&src.join("data/big.db"), &noise(11, 3 << 20));
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let snap = complete(&bk, "srv")[0].clone();
    (src, bk, snap)
}

#[test]
fn full_restore_over_ssh_as_root_into_an_empty_folder_equals_the_snapshot() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (_, bk, snap) = snapshot_of_rich_tree(tmp.path());
    let dest = write_area(&sshd, tmp.path());

    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &[]);
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    assert_same_tree(&snap, &dest, &[]);
    let (a, b) = (read_tree(&snap), read_tree(&dest));
    let sparse = b"var/disk.img".to_vec();
    assert!(b[&sparse].blocks <= a[&sparse].blocks, "holes were filled: {} > {}", b[&sparse].blocks, a[&sparse].blocks);

    // A second restore sends nothing: everything is in place.
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &["-v"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("files sent 0"), "{err}");
}

#[test]
fn restore_over_a_damaged_destination_puts_the_snapshot_back() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (_, bk, snap) = snapshot_of_rich_tree(tmp.path());
    let dest = write_area(&sshd, tmp.path());
    assert_eq!(restore_ssh(&sshd, &bk, &dest, &[]).0, 0);

    // Damage: changed content (in the middle of a big file too), deleted,
    // chmodded, newer files (ransomware's work looks like this), extras.
    write(&dest.join("etc/motd"), b"encrypted!!");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(dest.join("data/big.db")).unwrap();
        f.write_all_at(b"ENCRYPTED", 1 << 20).unwrap();
    }
    std::fs::remove_file(dest.join("names/with space.txt")).unwrap();
    std::fs::remove_dir_all(dest.join("empty")).unwrap();
    sh(&format!("chmod 777 '{}'", dest.join("etc/shadow-like").display()));
    sh(&format!("chown 4242 '{}'", dest.join("bin/tool").display()));
    write(&dest.join("home/alice/notes.txt"), b"newer, but wrong");
    sh(&format!("touch -d '2099-01-01' '{}'", dest.join("home/alice/notes.txt").display()));
    write(&dest.join("extra.txt"), b"not in the snapshot");
    write(&dest.join("etc/extra/deep.txt"), b"not in the snapshot");

    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &["-v"]);
    assert_eq!(code, 0, "{err}");
    // big.db and the 10 kB notes.txt have a basis on the server: deltas.
    assert!(err.contains("as delta 2"), "the changed files with a basis should travel as deltas: {err}");
    // Without --delete the extras stay; everything else is the snapshot's.
    assert!(dest.join("extra.txt").exists() && dest.join("etc/extra/deep.txt").exists());
    std::fs::remove_file(dest.join("extra.txt")).unwrap();
    std::fs::remove_dir_all(dest.join("etc/extra")).unwrap();
    // (Removing them by hand changed two directories' mtimes; restore again.)
    assert_eq!(restore_ssh(&sshd, &bk, &dest, &[]).0, 0);
    assert_same_tree(&snap, &dest, &[]);

    // With --delete the extras go too.
    write(&dest.join("extra.txt"), b"x");
    write(&dest.join("etc/extra/deep.txt"), b"x");
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &["--delete"]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&snap, &dest, &[]);
}

#[test]
fn chosen_paths_and_snapshots_are_restored_to_a_local_folder() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("etc/motd"), b"version 1");
    write(&src.join("deep/a/b/c/file.txt"), b"deep 1");
    write(&src.join("deep/a/b/c/d/more.txt"), b"more 1");
    write(&src.join("other.txt"), b"other");
    sh(&format!(
        "chown -R {GHOST_UID}:{GHOST_GID} '{}' && chmod 750 '{}'",
        src.join("deep").display(),
        src.join("deep/a").display()
    ));
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let first = complete(&bk, "srv")[0].clone();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&src.join("etc/motd"), b"version 2");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let second = complete(&bk, "srv")[1].clone();

    // One file, from the latest snapshot.
    let out = tmp.path().join("one-file");
    let (code, _, err) = restore(&bk, &["--path".into(), "etc/motd".into(), "--to".into(), out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(out.join("etc/motd")).unwrap(), b"version 2");
    assert!(!out.join("other.txt").exists() && !out.join("deep").exists());

    // One deep directory: missing parents get the snapshot's metadata.
    let out = tmp.path().join("one-dir");
    let (code, _, err) =
        restore(&bk, &["--path".into(), "/deep/a/b/c".into(), "--to".into(), out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&second.join("deep/a/b/c"), &out.join("deep/a/b/c"), &[]);
    let (snap_tree, out_tree) = (read_tree(&second), read_tree(&out));
    for parent in [&b"deep"[..], b"deep/a", b"deep/a/b"] {
        let (s, o) = (&snap_tree[parent], &out_tree[parent]);
        assert_eq!(
            (o.mode, o.uid, o.gid, o.mtime),
            (s.mode, s.uid, s.gid, s.mtime),
            "{}",
            String::from_utf8_lossy(parent)
        );
    }
    assert!(!out.join("etc").exists());

    // The older snapshot, by name and by time.
    let name = first.file_name().unwrap().to_str().unwrap().to_string();
    let out = tmp.path().join("by-name");
    let (code, _, err) = restore(&bk, &["--snapshot".into(), name, "--to".into(), out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&first, &out, &[]);
    let stamp = &first.file_name().unwrap().to_str().unwrap()["srv.".len()..];
    let (d, m, y, t) = (&stamp[0..2], &stamp[3..5], &stamp[6..8], stamp[9..].replace('-', ":"));
    let out = tmp.path().join("by-time");
    let time = format!("20{y}-{m}-{d} {t}");
    let (code, _, err) = restore(&bk, &["--snapshot".into(), time, "--to".into(), out.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(out.join("etc/motd")).unwrap(), b"version 1");

    // A path the snapshot doesn't have, and a destination inside the backups folder.
    let (code, _, err) =
        restore(&bk, &["--path".into(), "nope".into(), "--to".into(), tmp.path().join("x").display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no nope"), "{err}");
    let (code, _, err) = restore(&bk, &["--to".into(), first.join("etc").display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("overlaps the backups folder"), "{err}");
    assert_eq!(std::fs::read(first.join("etc/motd")).unwrap(), b"version 1");
}

#[test]
fn a_symlink_planted_in_the_destination_is_never_written_through() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("etc/motd"), b"restored");
    write(&src.join("etc/passwd"), b"restored passwd");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let area = tmp.path().join("server");
    let dest = area.join("content");
    let outside = tmp.path().join("outside");
    write(&outside.join("motd"), b"outside, untouched");
    write(&tmp.path().join("outside-passwd"), b"outside passwd, untouched");
    std::fs::create_dir_all(&dest).unwrap();
    // The whole etc directory is a symlink out of the root...
    std::os::unix::fs::symlink(&outside, dest.join("etc")).unwrap();
    sshd.authorize_root(&sshd.forced_write(&area));
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(outside.join("motd")).unwrap(), b"outside, untouched");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    assert!(dest.join("etc").symlink_metadata().unwrap().is_dir());
    // ...and a file is a symlink out of the root.
    std::fs::remove_file(dest.join("etc/passwd")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside-passwd"), dest.join("etc/passwd")).unwrap();
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(tmp.path().join("outside-passwd")).unwrap(), b"outside passwd, untouched");
    assert_same_tree(&complete(&bk, "srv")[0], &dest, &[]);
    // The root itself reached through a symlink is refused.
    std::os::unix::fs::symlink(&outside, area.join("link")).unwrap();
    let (code, _, err) = restore_ssh(&sshd, &bk, &area.join("link/x"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("without following symlinks"), "{err}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}

#[test]
fn the_read_only_agent_refuses_a_restore() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let dest = tmp.path().join("server");
    std::fs::create_dir(&dest).unwrap();
    sshd.authorize_root(&sshd.forced_read_only(&dest));
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("read-only") && err.contains("serve --write"), "{err}");
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0, "something was written");
}

/// The action lines of a run: `verb path`.
fn actions(text: &str) -> Vec<String> {
    let verbs = ["create ", "replace ", "change ", "delete "];
    let mut v: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| verbs.iter().any(|vb| l.starts_with(vb)))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    v.sort();
    v
}

#[test]
fn a_dry_run_lists_exactly_what_the_real_run_does_and_writes_nothing() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (_, bk, snap) = snapshot_of_rich_tree(tmp.path());
    let dest = write_area(&sshd, tmp.path());
    assert_eq!(restore_ssh(&sshd, &bk, &dest, &[]).0, 0);
    write(&dest.join("etc/motd"), b"changed");
    sh(&format!("chmod 700 '{}'", dest.join("shared").display()));
    sh(&format!("chmod 600 '{}'", dest.join("etc/shadow-like").display()));
    std::fs::remove_file(dest.join("bin/dangling")).unwrap();
    std::fs::remove_dir_all(dest.join("names")).unwrap();
    write(&dest.join("extra.txt"), b"x");
    sh(&format!("chmod 600 '{}'", dest.join("extra.txt").display()));
    let before = read_tree(&dest);

    let (code, out, err) = restore_ssh(&sshd, &bk, &dest, &["--dry-run", "--delete"]);
    assert_eq!(code, 0, "{err}");
    let planned = actions(&out);
    assert!(diff_trees(&before, &read_tree(&dest), &[]).is_empty(), "the dry run changed the destination");
    for expected in ["replace etc/motd", "change shared", "create bin/dangling", "create names", "delete extra.txt"] {
        assert!(planned.contains(&expected.to_string()), "{expected} missing from the plan: {planned:?}");
    }

    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &["--delete", "-vv"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(actions(&err), planned, "the real run did something else than the dry run said");
    assert_same_tree(&snap, &dest, &[]);
}

/// The temporary entries (`.rbk~…`) under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("find").arg(dir).args(["-name", ".rbk~*"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).collect()
}

#[test]
fn a_ctrl_c_during_a_local_restore_leaves_no_temporary_file_in_the_destination() {
    use crate::common::midrun::{busy_source, pid, send, wait_by_itself};
    use rustix::process::Signal;
    require_root();
    let tmp = scratch();
    let (src, bk, dest) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("dest"));
    busy_source(&src);
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);

    // Caught while the agent writes a file: it is stopped then, and a
    // Ctrl-C reaches both processes, as a terminal sends it to its
    // foreground group.
    let caught = (0..5).find_map(|_| {
        let _ = std::fs::remove_dir_all(&dest);
        let args: [&OsStr; 7] = [
            "--restore".as_ref(),
            "--backups-folder".as_ref(),
            bk.as_os_str(),
            "--name".as_ref(),
            "srv".as_ref(),
            "--to".as_ref(),
            dest.as_os_str(),
        ];
        let mut child = rbackup(&args).stdout(std::process::Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()));
            let agent = children.ok().and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()));
            if let Some(agent) = agent.and_then(rustix::process::Pid::from_raw)
                && dest.exists()
                && !temporaries(&dest).is_empty()
            {
                send(agent, Signal::STOP);
                if temporaries(&dest).is_empty() || child.try_wait().unwrap().is_some() {
                    send(agent, Signal::CONT);
                    let _ = wait_by_itself(&mut child);
                    return None;
                }
                return Some((child, agent));
            }
            assert!(std::time::Instant::now() < deadline, "the restore never got going");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    let (mut child, agent) = caught.expect("a restore caught while writing a file");
    send(agent, Signal::INT);
    send(pid(&child), Signal::INT);
    send(agent, Signal::CONT);
    let status = wait_by_itself(&mut child);
    assert_eq!(status.code(), Some(20));
    assert_eq!(temporaries(&dest), Vec::<PathBuf>::new(), "temporary files left in the destination");
    // Run again, it finishes.
    let (code, _, err) = restore(&bk, &["--to".into(), dest.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    // Everything beneath the root is the snapshot's; the root, made (0700)
    // by the interrupted run, was there for this one and keeps its own
    // metadata, as any folder that exists before a restore does.
    let (mut want, mut got) = (read_tree(&complete(&bk, "srv")[0]), read_tree(&dest));
    assert_eq!(got.remove(&Vec::new()).unwrap().mode & 0o7777, 0o700);
    want.remove(&Vec::new());
    let diffs = diff_trees(&want, &got, &[]);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// Regression: a dry run into a folder that doesn't exist yet failed ("cannot
/// open … No such file or directory") where the real restore creates it.
#[test]
fn a_dry_run_into_a_folder_not_made_yet_says_everything_would_be_created() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (_, bk, snap) = snapshot_of_rich_tree(tmp.path());
    let local = tmp.path().join("inspect/new");
    let (code, out, err) = restore(&bk, &["--to".to_string(), local.display().to_string(), "--dry-run".into()]);
    assert_eq!(code, 0, "{err}");
    assert!(!local.exists() && !tmp.path().join("inspect").exists(), "a dry run created the folder");
    let planned = actions(&out);
    assert!(planned.contains(&"create etc/motd".to_string()), "{planned:?}");
    assert!(planned.iter().all(|a| a.starts_with("create ")), "{planned:?}");
    // Through the write-confined agent, beneath its root.
    let dest = write_area(&sshd, tmp.path());
    let (code, out, err) = restore_ssh(&sshd, &bk, &dest, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(!dest.exists(), "a dry run created the folder");
    assert_eq!(actions(&out), planned, "the same plan through the agent");
    let (code, _, err) = restore_ssh(&sshd, &bk, &dest, &["-vv"]);
    assert_eq!(code, 0, "{err}");
    // The real run's agent makes the folder (0700) before the session, then
    // gives it the snapshot's metadata: "change .", which the plan's
    // creation of everything beneath it implies.
    let done: Vec<String> = actions(&err).into_iter().filter(|a| a != "change .").collect();
    assert_eq!(done, planned, "the real run did what the dry run said");
    assert_same_tree(&snap, &dest, &[]);
}

/// Regression (a newcomer's walk): an in-place restore removed `trusted.*`
/// attributes from the server's files, which a backup user can never read
/// and so no snapshot of theirs holds. A restore now keeps a `trusted.*`
/// attribute the snapshot lacks, and doesn't count it as a change.
#[test]
fn a_restore_keeps_trusted_attributes_the_snapshot_lacks() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("d/f.txt"), b"content");
    write(&src.join("g.txt"), b"other");
    xattr::set(src.join("g.txt"), "trusted.in_snapshot", b"1").unwrap();
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    let dest = tmp.path().join("dest");
    let to = ["--to".to_string(), dest.display().to_string()];
    assert_eq!(restore(&bk, &to).0, 0);
    xattr::set(dest.join("d/f.txt"), "trusted.live", b"keep me").unwrap();
    xattr::set(dest.join("d"), "trusted.live", b"keep me too").unwrap();
    xattr::remove(dest.join("g.txt"), "trusted.in_snapshot").unwrap();

    let mut dry = to.to_vec();
    dry.push("--dry-run".into());
    let (code, out, err) = restore(&bk, &dry);
    assert_eq!(code, 0, "{err}");
    let planned = actions(&out);
    assert_eq!(planned, vec!["change g.txt".to_string()], "only the missing snapshot attribute is a change");

    let (code, _, err) = restore(&bk, &to);
    assert_eq!(code, 0, "{err}");
    assert_eq!(xattr::get(dest.join("d/f.txt"), "trusted.live").unwrap().as_deref(), Some(&b"keep me"[..]));
    assert_eq!(xattr::get(dest.join("d"), "trusted.live").unwrap().as_deref(), Some(&b"keep me too"[..]));
    assert_eq!(xattr::get(dest.join("g.txt"), "trusted.in_snapshot").unwrap().as_deref(), Some(&b"1"[..]));
}

/// Regression (a newcomer's walk): restores, which change a server's files,
/// left nothing in the job's `log_file`.
#[test]
fn a_restore_is_written_to_the_jobs_log_file() {
    let tmp = scratch();
    let (src, bk, log) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("log/srv.log"));
    write(&src.join("f.txt"), b"f");
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.srv]\nsource = \"{}\"\nbackups_folder = \"{}\"\nlog_file = \"{}\"\n",
        src.display(),
        bk.display(),
        log.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    assert_eq!(
        run(&[OsStr::new("-c"), OsStr::new(c), OsStr::new("-j"), OsStr::new("srv"), OsStr::new("--backup")]).0,
        0
    );
    let dest = tmp.path().join("dest");
    let (code, _, err) = run(&[
        OsStr::new("-c"),
        OsStr::new(c),
        OsStr::new("-j"),
        OsStr::new("srv"),
        OsStr::new("restore"),
        OsStr::new("--to"),
        dest.as_os_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().any(|l| l.contains("restore") && l.contains(&dest.display().to_string())), "{text}");
}
