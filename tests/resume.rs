//! `--continue` keeps what an interrupted run had: every file of every
//! snapshot still gets its content digest in the manifest, and a file
//! interrupted mid-transfer is resumed from the data already received
//! rather than fetched again whole.

#![allow(clippy::pedantic)] // test code: plain asserts over polish

mod common;

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rbackup::manifest::{Kind, ManifestReader};
use rbackup::safefs::Dir;

fn start(cmd: &str, src: &Path, bk: &Path) -> Child {
    let args: Vec<&OsStr> = vec![
        OsStr::new(cmd),
        OsStr::new("--source"),
        src.as_os_str(),
        OsStr::new("--backups-folder"),
        bk.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("srv"),
    ];
    rbackup(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// The `.incomplete` folder, once it exists.
fn incomplete(bk: &Path) -> Option<PathBuf> {
    snapshots(bk, "srv").into_iter().find(|(_, c)| !c).map(|(f, _)| bk.join(f))
}

/// Temporary files (names `.rbk~…`) anywhere under `root`, with their sizes.
fn temps(root: &Path) -> Vec<(PathBuf, u64)> {
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
fn kill_when(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) {
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
