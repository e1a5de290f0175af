//! Backups over SSH against a real sshd and a real unprivileged backup user
//! that reads through ACLs, with the agent as a forced command.

#![allow(clippy::pedantic)] // test code: plain asserts over polish

mod common;

use std::path::Path;

use common::sshd::Sshd;
use common::*;

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
    assert!(s["stats"]["wire_bytes_received"].as_u64().unwrap() > 20 << 20);

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
