//! Backups over SSH against a real sshd and a real unprivileged backup user
//! that reads through ACLs, with the agent as a forced command.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::sshd::Sshd;
use crate::common::*;

/// A backup of `server.source(src)` with the sshd's arguments and `extra`.
fn pull(sshd: &Sshd, src: &Path, bk: &Path, extra: &[&str]) -> (i32, String, String) {
    let source = sshd.source(src);
    let mut args: Vec<String> = vec![
        "--backup".into(),
        "--source".into(),
        source,
        "--backups-folder".into(),
        bk.display().to_string(),
        "--name".into(),
        "srv".into(),
    ];
    args.extend(sshd.args());
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    run(&args)
}

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pull_over_ssh_equals_the_source_and_changed_files_come_as_deltas() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    rich_tree(&src);
    write(&src.join("data/big.db"), &noise(77, 20 << 20));
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));

    let json = tmp.path().join("stats.json");
    let (code, _, err) = pull(&sshd, &src, &bk, &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    let first = complete(&bk, "srv")[0].clone();
    // The backup user can't read trusted.* attributes; everything else is exact.
    assert_same_tree(&src, &first, &["trusted."]);
    let s = stats(&json);
    assert_eq!(s["exit_code"], 0);
    // 20 MiB + 3 MiB of dense data; the 64 MiB sparse file sends only its 12 KiB of extents.
    let wire = s["stats"]["wire_bytes_received"].as_u64().unwrap();
    assert!(wire > 23 << 20 && wire < 24 << 20, "first run received {wire} bytes");

    // 4 KiB changed in the middle of the 20 MiB file, and a few other changes.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(src.join("data/big.db")).unwrap();
        f.write_all_at(&noise(78, 4096), 10 << 20).unwrap();
    }
    write(&src.join("etc/motd"), b"changed\n");
    let (code, _, err) = pull(&sshd, &src, &bk, &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let second = complete(&bk, "srv")[1].clone();
    assert_same_tree(&src, &second, &["trusted."]);
    let s = stats(&json);
    assert!(s["stats"]["fetched_delta"].as_u64().unwrap() >= 1, "{s}");
    let wire = s["stats"]["wire_bytes_received"].as_u64().unwrap();
    assert!(wire < 1 << 20, "the delta run received {wire} bytes for a 4 KiB change in 20 MiB");
    // Unchanged files are hardlinked to the first snapshot.
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(ino(&first.join("home/alice/big.bin")), ino(&second.join("home/alice/big.bin")));
    assert_ne!(ino(&first.join("data/big.db")), ino(&second.join("data/big.db")));
}

fn atime(p: &Path) -> i64 {
    std::os::unix::fs::MetadataExt::atime(&std::fs::metadata(p).unwrap())
}

#[test]
fn the_forced_command_confines_the_agent_to_its_root() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("inside.txt"), b"inside");
    // A secret outside the root that the backup user *could* read, and
    // symlinks pointing at it and at /etc/shadow.
    let secret = tmp.path().join("outside/secret.txt");
    write(&secret, b"TOP SECRET");
    std::os::unix::fs::symlink(&secret, src.join("to-secret")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", src.join("shadow")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside"), src.join("outside-dir")).unwrap();
    sshd.grant_read(&src);
    sshd.grant_read(&tmp.path().join("outside"));
    sshd.authorize(&sshd.forced_read_only(&src));
    // atime older than mtime: any read moves it (relatime).
    set_mtime(&secret, 1_000_000_000, 0);
    sh(&format!("touch -m '{}'", secret.display()));
    let before = atime(&secret);
    assert_eq!(before, 1_000_000_000);

    // A path outside the root is refused, clearly, and nothing is created.
    let (code, _, err) = pull(&sshd, &tmp.path().join("outside"), &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused") && err.contains("outside the directory this agent serves"), "{err}");
    assert!(snapshots(&bk, "srv").is_empty());
    let (code, _, err) = pull(&sshd, Path::new("/etc"), &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("outside the directory this agent serves"), "{err}");

    // Symlinks arrive as symlinks; nothing they point at is read.
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 0, "{err}");
    let snap = complete(&bk, "srv")[0].clone();
    assert_eq!(std::fs::read_link(snap.join("shadow")).unwrap(), Path::new("/etc/shadow"));
    assert_eq!(std::fs::read_link(snap.join("to-secret")).unwrap(), secret);
    assert!(std::fs::symlink_metadata(snap.join("outside-dir")).unwrap().file_type().is_symlink());
    assert_eq!(atime(&secret), before, "the secret outside the root was read");
    // The detector works: reading the file does move its atime.
    std::fs::read(&secret).unwrap();
    assert_ne!(atime(&secret), before, "atime does not move on this filesystem; the check above proves nothing");
}

#[test]
fn a_file_the_backup_user_cannot_read_is_listed_and_the_run_is_partial() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("ok.txt"), b"ok");
    write(&src.join("later-chmod.txt"), b"secret");
    sshd.grant_read(&src);
    // A later chmod 600 shrinks the ACL mask: the backup user loses access.
    sh(&format!("chmod 600 '{}'", src.join("later-chmod.txt").display()));
    // A file moved in without the default ACL (created elsewhere, then mv'd).
    write(&tmp.path().join("elsewhere/moved.txt"), b"moved");
    sh(&format!("chmod 600 '{0}' && mv '{0}' '{1}'", tmp.path().join("elsewhere/moved.txt").display(), src.display()));
    sshd.authorize(&sshd.forced_read_only(&src));
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 23, "{err}");
    assert!(err.contains("cannot read: later-chmod.txt"), "{err}");
    assert!(err.contains("cannot read: moved.txt"), "{err}");
    assert!(err.contains("ACL mask") && err.contains("setfacl"), "{err}");
    let snap = complete(&bk, "srv")[0].clone();
    assert_eq!(std::fs::read(snap.join("ok.txt")).unwrap(), b"ok");
}

/// Regression (a newcomer's walk, data loss): a file the backup user could
/// not read is missing from that snapshot, and `restore --delete` from it
/// deleted the live file, never backed up. The snapshot now records what it
/// lacks, and a restore with --delete leaves the folders holding it alone
/// (and says so), while removing extras elsewhere.
#[test]
fn restore_delete_never_removes_what_the_snapshot_could_not_read() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("sub/ok.txt"), b"ok");
    write(&src.join("sub/later-chmod.txt"), b"only copy");
    write(&src.join("other/ok.txt"), b"ok");
    sshd.grant_read(&src);
    sh(&format!("chmod 600 '{}'", src.join("sub/later-chmod.txt").display()));
    sshd.authorize(&sshd.forced_read_only(&src));
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 23, "{err}");
    write(&src.join("other/extra.txt"), b"not in the snapshot");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "--restore".to_string(),
            "--backups-folder".into(),
            bk.display().to_string(),
            "--name".into(),
            "srv".into(),
            "--to".into(),
            src.display().to_string(),
            "--delete".into(),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    };
    let (code, out, err) = restore(&["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("lacks what its backup could not read: sub/later-chmod.txt"), "{err}");
    assert!(out.contains("delete   other/extra.txt"), "{out}");
    assert!(!out.contains("later-chmod"), "the dry run plans to delete what the snapshot lacks: {out}");
    let (code, _, err) = restore(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(src.join("sub/later-chmod.txt")).unwrap(), b"only copy");
    assert!(!src.join("other/extra.txt").exists(), "extras elsewhere still go");
}

#[test]
fn compression_on_the_wire_keeps_the_snapshot_exact() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("log.txt"), "a line of a very repetitive log file\n".repeat(100_000).as_bytes());
    write(&src.join("random.bin"), &noise(5, 1 << 20));
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));
    let json = tmp.path().join("stats.json");
    let (code, _, err) = pull(&sshd, &src, &bk, &["--compress", "--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &["trusted."]);
    let wire = stats(&json)["stats"]["wire_bytes_received"].as_u64().unwrap();
    assert!(wire < (1 << 20) + (1 << 19), "compressed run received {wire} bytes for 1 MiB of noise + 3.6 MiB of text");
}

#[test]
fn without_a_forced_command_the_remote_bin_is_started() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f.txt"), b"f");
    sshd.grant_read(&src);
    sshd.authorize("");
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &["trusted."]);
}

#[test]
fn ssh_failures_each_get_their_own_message() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f.txt"), b"f");
    sshd.grant_read(&src);

    // Authentication refused: the key is not authorized.
    sshd.authorize("restrict,command=\"/bin/false\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7sKdlmaQXUC0GCKhKBV7rNYMVUt4AbtUF6wcLG4KVX other@host\n#");
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused the authentication"), "{err}");

    sshd.authorize(&sshd.forced_read_only(&src));
    let good_known_hosts = std::fs::read_to_string(&sshd.known_hosts).unwrap();

    // Host key unknown.
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not known"), "{err}");

    // Host key changed: another key recorded for this host and port.
    let other = tmp.path().join("other_key");
    let st =
        std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).status();
    assert!(st.unwrap().success());
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    let line = format!("[127.0.0.1]:{} {} {}\n", sshd.port, parts.next().unwrap(), parts.next().unwrap());
    std::fs::write(&sshd.known_hosts, line).unwrap();
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CHANGED"), "{err}");
    std::fs::write(&sshd.known_hosts, good_known_hosts).unwrap();

    // Remote binary missing (no forced command, a --remote-bin that isn't there).
    sshd.authorize("");
    let mut args: Vec<String> = vec!["--backup".into(), "--source".into(), sshd.source(&src)];
    args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
    args.extend(["--ssh-config".into(), sshd.ssh_config.display().to_string()]);
    args.extend(["--remote-bin".into(), "/nonexistent/rbackup".into()]);
    let (code, _, err) = run(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not found on the server") && err.contains("--remote-bin"), "{err}");

    // Host unreachable: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = std::fs::read_to_string(&sshd.ssh_config)
        .unwrap()
        .replace(&format!("Port {}", sshd.port), &format!("Port {port}"));
    std::fs::write(&sshd.ssh_config, cfg).unwrap();
    let (code, _, err) = pull(&sshd, &src, &bk, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    assert!(snapshots(&bk, "srv").is_empty(), "failed connections must not leave folders behind");
}

#[test]
fn a_connection_lost_mid_run_leaves_a_resumable_snapshot() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    for d in 0..30 {
        for f in 0..40 {
            write(&src.join(format!("d{d:02}/f{f:02}")), &noise(d * 1000 + f, 4000));
        }
        write(&src.join(format!("d{d:02}/big")), &noise(d, 2 << 20));
    }
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));
    assert_eq!(pull(&sshd, &src, &bk, &[]).0, 0);
    let first = complete(&bk, "srv")[0].clone();
    let first_before = read_tree(&first);
    for d in 0..30 {
        write(&src.join(format!("d{d:02}/big")), &noise(d + 100, 2 << 20));
    }

    let mut args: Vec<String> = vec!["--backup".into(), "--source".into(), sshd.source(&src)];
    args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
    args.extend(sshd.args());
    let child = rbackup(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let inc = snapshots(&bk, "srv").into_iter().find(|(_, c)| !c);
        if inc.is_some_and(|(f, _)| bk.join(f).join("d03").exists()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the run never got going");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // Cut the connection: kill everything the backup user runs on the server.
    sh(&format!("pkill -KILL -u {}", sshd.user.name));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rbackup --continue"), "{err}");
    let inc = snapshots(&bk, "srv");
    assert!(inc.iter().any(|(_, c)| !c), "{inc:?}");

    let mut args: Vec<String> = vec!["--continue".into(), "--source".into(), sshd.source(&src)];
    args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
    args.extend(sshd.args());
    let (code, _, err) = run(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let snaps = complete(&bk, "srv");
    assert_eq!(snaps.len(), 2);
    assert_same_tree(&src, &snaps[1], &["trusted."]);
    let diffs = diff_trees(&first_before, &read_tree(&first), &[]);
    assert!(diffs.is_empty(), "the previous snapshot changed:\n{}", diffs.join("\n"));
}

#[test]
fn sigterm_with_the_agent_stuck_over_ssh_ends_the_run_and_the_agent_goes_too() {
    use crate::common::midrun::{Held, alive, busy_source, hold_mid_run_with, pid, processes_of, send};
    use rustix::process::Signal;
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    busy_source(&src);
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));
    let err_file = tmp.path().join("stderr");
    let uid = sshd.user.uid();
    let held = (0..5).find_map(|_| {
        let _ = std::fs::remove_dir_all(&bk);
        let mut args: Vec<String> = vec!["--backup".into(), "--source".into(), sshd.source(&src)];
        args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
        args.extend(sshd.args());
        let mut cmd = rbackup(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
        cmd.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&err_file).unwrap());
        // The agent on the server stops answering, its connection open.
        hold_mid_run_with(cmd, &bk, "srv", "d02", |_| match processes_of(uid, "rbackup")[..] {
            [agent] => Some(agent),
            _ => None,
        })
    });
    let Held { mut child, agent } = held.expect("a run held in its middle");
    send(pid(&child), Signal::TERM);
    let status = crate::common::midrun::wait_by_itself(&mut child);
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert_eq!(status.code(), Some(20), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");

    // Let go, the agent finds the desktop gone and ends by itself.
    send(agent, Signal::CONT);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while alive(agent) {
        assert!(std::time::Instant::now() < deadline, "the agent kept running after the desktop stopped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let mut args: Vec<String> = vec!["--continue".into(), "--source".into(), sshd.source(&src)];
    args.extend(["--backups-folder".into(), bk.display().to_string(), "--name".into(), "srv".into()]);
    args.extend(sshd.args());
    let (code, _, err) = run(&args.iter().map(std::ffi::OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &["trusted."]);
}
