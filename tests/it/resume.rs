//! `--continue` keeps what an interrupted run had: every file of every
//! snapshot still gets its content digest in the manifest, and a file
//! interrupted mid-transfer is resumed from the data already received
//! rather than fetched again whole.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use rbackup::fs::safefs::Dir;
use rbackup::store::manifest::{Kind, ManifestReader};

fn start(cmd: &str, src: &Path, bk: &Path) -> Child {
    rbackup(&job_args(cmd, src, bk)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// The `.incomplete` folder, once it exists.
fn incomplete(bk: &Path) -> Option<PathBuf> {
    snapshots(bk, "srv").into_iter().find(|(_, c)| !c).map(|(f, _)| bk.join(f))
}

/// Temporary files (names `.rbk~…`) anywhere under `root`, with their sizes.
pub(crate) fn temps(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if e.file_name().as_encoded_bytes().starts_with(b".rbk~") {
                found.push((e.path(), md.len()));
            }
        }
    }
    found
}

/// SIGKILLs `child` once `ready` holds; panics if the run ended first.
pub(crate) fn kill_when(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if ready() {
            child.kill().unwrap();
            let status = child.wait().unwrap();
            assert_eq!(status.signal(), Some(9), "the run was not killed by SIGKILL: {status:?}");
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status:?}) before {what}");
        }
        assert!(Instant::now() < deadline, "the run never reached {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every regular file of every complete snapshot, read through the
/// library's manifest reader: (snapshot, files, files without a hash).
fn manifest_hashes(bk: &Path) -> Vec<(String, u64, Vec<String>)> {
    let manifests = Dir::open_path(&bk.join("srv.rbackup/manifests")).unwrap();
    let mut out = Vec::new();
    for snap in complete(bk, "srv") {
        let name = snap.file_name().unwrap().to_str().unwrap().to_string();
        let mut r = ManifestReader::open(&manifests, name.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{name} has no manifest"));
        let (mut files, mut unhashed) = (0, Vec::new());
        while let Some(rec) = r.next_record().unwrap() {
            if rec.kind == Kind::File {
                files += 1;
                if rec.hash.is_none() {
                    unhashed.push(String::from_utf8_lossy(&rec.path).into_owned());
                }
            }
        }
        out.push((name, files, unhashed));
    }
    out
}

/// 30 directories of 100 small files.
fn small_files(src: &Path) {
    for d in 0..30 {
        for f in 0..100 {
            write(&src.join(format!("d{d:02}/f{f:03}.txt")), &noise(d * 1000 + f, 500 + (f as usize) * 13));
        }
    }
}

fn urandom(path: &Path, mib: u64) {
    sh(&format!("head -c {mib}M /dev/urandom > '{}'", path.display()));
}

#[test]
fn every_file_keeps_its_hash_through_kills_and_continues() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    small_files(&src);
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);

    // A fifth of the files change, and a large file comes early in the
    // listing: records behind it wait for its data, so a kill finds most of
    // the run's manifest unwritten.
    for d in 0..30 {
        for f in (0..100).step_by(5) {
            write(&src.join(format!("d{d:02}/f{f:03}.txt")), &noise(7_000_000 + d * 1000 + f, 900));
        }
    }
    urandom(&src.join("d00/a-large.bin"), 96);

    let mut child = start("--backup", &src, &bk);
    kill_when(&mut child, "the large file was being written", || {
        incomplete(&bk).is_some_and(|inc| temps(&inc).iter().any(|(_, len)| *len > 0))
    });

    // Continue, killed again while it fetches another large file.
    urandom(&src.join("d15/b-large.bin"), 96);
    let inc = incomplete(&bk).expect("the killed run leaves its .incomplete");
    let mut child = start("--continue", &src, &bk);
    kill_when(&mut child, "the second large file was being written", || {
        temps(&inc.join("d15")).iter().any(|(_, len)| *len > 0)
    });

    let (code, _, err) = continue_backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    // And one more snapshot, linked from the resumed one.
    write(&src.join("d29/f001.txt"), b"one more change");
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(complete(&bk, "srv").len(), 3);
    assert_same_tree(&src, complete(&bk, "srv").last().unwrap(), &[]);

    for (snap, files, unhashed) in manifest_hashes(&bk) {
        assert!(files >= 3000, "{snap}: {files} files in the manifest");
        assert!(
            unhashed.is_empty(),
            "{snap}: {} files without a hash, e.g. {:?}",
            unhashed.len(),
            &unhashed[..3.min(unhashed.len())]
        );
    }
    let (code, out, err) = run(&[
        OsStr::new("verify"),
        OsStr::new("--backups-folder"),
        bk.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("srv"),
        OsStr::new("--snapshot"),
        OsStr::new("all"),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!format!("{out}{err}").contains("no recorded hash"), "{out}{err}");
}

/// The partial data of an interrupted fetch in `dir`: (path, length).
fn partial_in(dir: &Path) -> Option<(PathBuf, u64)> {
    temps(dir).into_iter().find(|(p, _)| p.extension().is_some_and(|e| e == "part"))
}

fn stats(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn stat(s: &serde_json::Value, key: &str) -> u64 {
    s["stats"][key].as_u64().unwrap_or_else(|| panic!("no {key} in {s}"))
}

fn verify_all(bk: &Path) {
    let (code, out, err) = run(&[
        OsStr::new("verify"),
        OsStr::new("--backups-folder"),
        bk.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("srv"),
        OsStr::new("--snapshot"),
        OsStr::new("all"),
    ]);
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(!format!("{out}{err}").contains("no recorded hash"), "{out}{err}");
}

/// A few small files beside one large file of random data.
fn tree_with_large_file(src: &Path, mib: u64) -> u64 {
    write(&src.join("a/small.txt"), b"small\n");
    write(&src.join("z/last.txt"), b"last\n");
    std::fs::create_dir_all(src.join("m")).unwrap();
    urandom(&src.join("m/large.bin"), mib);
    mib << 20
}

fn over_ssh(
    sshd: &crate::common::sshd::Sshd,
    cmd: &str,
    src: &Path,
    bk: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut args: Vec<String> = vec![
        cmd.into(),
        "--source".into(),
        sshd.source(src),
        "--backups-folder".into(),
        bk.display().to_string(),
        "--name".into(),
        "srv".into(),
    ];
    args.extend(sshd.args());
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    rbackup(&args)
}

#[test]
fn a_file_killed_at_60_percent_resumes_over_ssh_instead_of_starting_again() {
    let sshd = crate::common::sshd::Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = tree_with_large_file(&src, 320);
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));

    let mut child =
        over_ssh(&sshd, "--backup", &src, &bk, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    kill_when(&mut child, "half of the large file had arrived", || {
        incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len >= size / 2)
    });
    let inc = incomplete(&bk).expect("the killed run leaves its .incomplete");
    let (_, kept) = partial_in(&inc.join("m")).expect("the data received stays, under a temporary name");
    assert!(kept >= size / 2 && kept < size, "{kept} of {size} bytes kept");

    let json = tmp.path().join("stats.json");
    let out = over_ssh(&sshd, "--continue", &src, &bk, &["--stats-json", json.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}\n{}", sshd.log());
    let s = stats(&json);
    assert_eq!(stat(&s, "resumed"), 1, "{s}");
    assert_eq!(stat(&s, "resume_retries"), 0, "{s}");
    assert_eq!(stat(&s, "bytes_resumed"), kept, "{s}");
    let wire = stat(&s, "wire_bytes_received");
    assert!(wire < size * 6 / 10, "the continue received {wire} bytes of a {size}-byte file it had half of");
    let snap = complete(&bk, "srv");
    assert_eq!(snap.len(), 1);
    assert_same_tree(&src, &snap[0], &["trusted."]);
    verify_all(&bk);
}

#[test]
fn a_partial_file_with_a_corrupted_prefix_is_fetched_again_whole_and_ends_exact() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = tree_with_large_file(&src, 64);
    let mut child = start("--backup", &src, &bk);
    kill_when(&mut child, "the large file's data began to arrive", || {
        incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len > 0)
    });
    let inc = incomplete(&bk).unwrap();
    let (part, _) = partial_in(&inc.join("m")).unwrap();
    // 60 % of the file as received, but for one byte the disk flipped.
    let mut prefix = std::fs::read(src.join("m/large.bin")).unwrap();
    prefix.truncate((size * 6 / 10) as usize);
    prefix[12_345] ^= 0x20;
    std::fs::write(&part, &prefix).unwrap();

    let json = tmp.path().join("stats.json");
    let (code, _, err) = continue_backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s = stats(&json);
    assert_eq!(stat(&s, "resume_retries"), 1, "the bad prefix is caught: {s}");
    assert_eq!(stat(&s, "resumed"), 0, "{s}");
    assert!(stat(&s, "bytes_fetched") >= size, "the file was fetched again whole: {s}");
    let snap = complete(&bk, "srv");
    assert_same_tree(&src, &snap[0], &[]);
    verify_all(&bk);
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid …; comm may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            found.push(child);
        }
    }
    found
}

#[test]
fn a_connection_lost_mid_file_is_resumed_by_the_next_continue() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = tree_with_large_file(&src, 128);
    let mut child = start("--backup", &src, &bk);
    // The local agent dies mid-file: for the desktop, the connection drops.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len > 0) {
            let agents = children_of(child.id());
            assert_eq!(agents.len(), 1, "one local agent: {agents:?}");
            sh(&format!("kill -9 {}", agents[0]));
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the large file began");
        assert!(Instant::now() < deadline, "the large file never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = child.wait().unwrap();
    assert!(status.code().is_some_and(|c| c != 0), "the run ends with an error: {status:?}");
    let inc = incomplete(&bk).expect("the failed run leaves its .incomplete");
    let (_, kept) = partial_in(&inc.join("m")).expect("the data received stays");
    assert!(kept > 0 && kept < size, "{kept}");

    let json = tmp.path().join("stats.json");
    let (code, _, err) = continue_backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s = stats(&json);
    assert_eq!((stat(&s, "resumed"), stat(&s, "bytes_resumed")), (1, kept), "{s}");
    // The rest of the large file, and the 5-byte file listed after it.
    assert_eq!(stat(&s, "bytes_fetched"), size - kept + 5, "only the rest was fetched: {s}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &[]);
    verify_all(&bk);
}

#[test]
fn a_new_backup_after_a_killed_run_resumes_from_its_partial_file() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = tree_with_large_file(&src, 64);
    let mut child = start("--backup", &src, &bk);
    kill_when(&mut child, "the large file's data began to arrive", || {
        incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len > 0)
    });
    let (_, kept) = partial_in(&incomplete(&bk).unwrap().join("m")).unwrap();

    // Not `--continue`: a new snapshot, which supersedes the interrupted one.
    let json = tmp.path().join("stats.json");
    let (code, _, err) = backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s = stats(&json);
    assert_eq!((stat(&s, "resumed"), stat(&s, "bytes_resumed")), (1, kept), "{s}");
    assert_eq!(stat(&s, "bytes_fetched"), size - kept + 5, "only the rest was fetched: {s}");
    let snaps = snapshots(&bk, "srv");
    assert_eq!(snaps.len(), 1, "the interrupted run is superseded: {snaps:?}");
    assert_same_tree(&src, &complete(&bk, "srv")[0], &[]);
    verify_all(&bk);
}

#[test]
fn a_delta_transfer_killed_midway_resumes_as_a_delta() {
    let sshd = crate::common::sshd::Sshd::start();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    let size = tree_with_large_file(&src, 256);
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));
    let out = over_ssh(&sshd, "--backup", &src, &bk, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // 4 KiB changed in every 8 MiB: a delta against the first snapshot.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(src.join("m/large.bin")).unwrap();
        for i in 0..(size >> 23) {
            f.write_all_at(&noise(i, 4096), (i << 23) + 4096).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(1100)); // a new snapshot name

    let mut child =
        over_ssh(&sshd, "--backup", &src, &bk, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    kill_when(&mut child, "half of the large file was rebuilt", || {
        incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len >= size / 2)
    });
    let inc = incomplete(&bk).unwrap();
    let (_, kept) = partial_in(&inc.join("m")).unwrap();

    let json = tmp.path().join("stats.json");
    let out = over_ssh(&sshd, "--continue", &src, &bk, &["--stats-json", json.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stats(&json);
    assert_eq!((stat(&s, "resumed"), stat(&s, "bytes_resumed"), stat(&s, "fetched_delta")), (1, kept, 1), "{s}");
    assert_eq!(stat(&s, "delta_retries") + stat(&s, "resume_retries"), 0, "{s}");
    let wire = stat(&s, "wire_bytes_received");
    assert!(wire < size / 20, "the rest came as a delta, yet {wire} bytes were received");
    assert_same_tree(&src, complete(&bk, "srv").last().unwrap(), &["trusted."]);
    verify_all(&bk);
}

#[test]
fn a_sparse_file_resumes_and_keeps_its_holes() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    tree_with_large_file(&src, 1);
    // 512 MiB apparent, 64 MiB of data: 8 MiB at the start of every 64 MiB.
    let size: u64 = 512 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("m/large.bin")).unwrap();
        f.set_len(size).unwrap();
        for i in 0..8u64 {
            f.write_all_at(&noise(40 + i, 8 << 20), i << 26).unwrap();
        }
    }
    let mut child = start("--backup", &src, &bk);
    kill_when(&mut child, "the sparse file's data began to arrive", || {
        incomplete(&bk).and_then(|inc| partial_in(&inc.join("m"))).is_some_and(|(_, len)| len > 0)
    });
    let (_, kept) = partial_in(&incomplete(&bk).unwrap().join("m")).unwrap();
    assert!(kept < size, "{kept}");

    let json = tmp.path().join("stats.json");
    let (code, _, err) = continue_backup(&src, &bk, "srv", &["--stats-json", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s = stats(&json);
    assert_eq!((stat(&s, "resumed"), stat(&s, "bytes_resumed")), (1, kept), "{s}");
    assert!(stat(&s, "bytes_fetched") <= 64 << 20, "only data is sent: {s}");
    let snap = complete(&bk, "srv")[0].clone();
    assert_same_tree(&src, &snap, &[]);
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(snap.join("m/large.bin")).unwrap());
    assert!(blocks * 512 <= 72 << 20, "holes stay holes: {} bytes allocated", blocks * 512);
    verify_all(&bk);
}
