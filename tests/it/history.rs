//! `history PATH` on real snapshots: the words of a file's life, its
//! versions copied out, bad paths, and snapshots without a manifest.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::*;

fn rb(bk: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend(["--backups-folder".as_ref(), bk.as_os_str(), "--name".as_ref(), "srv".as_ref()]);
    run(&all)
}

/// Six snapshots of `f.txt`: created, unchanged, rewritten, chmodded,
/// deleted, created again. (Each backup waits for a second of its own.)
fn life_of_a_file(tmp: &Path) -> PathBuf {
    let (src, bk) = (tmp.join("src"), tmp.join("bk"));
    write(&src.join("f.txt"), b"one");
    write(&src.join("dir/other.txt"), b"other");
    std::os::unix::fs::symlink("f.txt", src.join("link")).unwrap();
    let steps: [&dyn Fn(); 6] = [
        &|| {},
        &|| {},
        &|| write(&src.join("f.txt"), b"two, longer"),
        &|| sh(&format!("chmod 600 '{}'", src.join("f.txt").display())),
        &|| std::fs::remove_file(src.join("f.txt")).unwrap(),
        &|| write(&src.join("f.txt"), b"three"),
    ];
    for step in steps {
        step();
        let (code, _, err) = backup(&src, &bk, "srv", &[]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(complete(&bk, "srv").len(), 6);
    bk
}

/// (snapshot folder, word) of each row of the table.
fn words(out: &str) -> Vec<(String, String)> {
    let mut lines = out.lines();
    assert!(lines.next().is_some_and(|h| h.starts_with("SNAPSHOT")), "a header first:\n{out}");
    lines
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0].to_string(), cols[1].to_string())
        })
        .collect()
}

fn folder_names(bk: &Path) -> Vec<String> {
    complete(bk, "srv").iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

fn expect(bk: &Path, want: &[&str]) -> Vec<(String, String)> {
    folder_names(bk).into_iter().zip(want).map(|(f, w)| (f, (*w).to_string())).collect()
}

#[test]
fn history_says_new_same_changed_metadata_deleted_new() {
    require_root();
    let tmp = scratch();
    let bk = life_of_a_file(tmp.path());
    let (code, out, err) = rb(&bk, &["history", "/f.txt"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(words(&out), expect(&bk, &["new", "same", "changed", "metadata", "deleted", "new"]), "{out}");
    // The rows carry what changed: the size, then the mode.
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[3].contains(" 11 ") && lines[3].contains("-rw-r--r--"), "{out}");
    assert!(lines[4].contains(" 11 ") && lines[4].contains("-rw-------"), "{out}");
    assert!(lines[1].contains("0:0"), "numeric owner:group: {out}");
    assert!(err.contains("3 content versions"), "{err}");

    let (code, out, err) = rb(&bk, &["history", "f.txt", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let changes: Vec<&str> = rows.iter().map(|r| r["change"].as_str().unwrap()).collect();
    assert_eq!(changes, ["new", "same", "changed", "metadata", "deleted", "new"]);
    assert_eq!(rows[2]["size"], 11);
    assert_eq!(rows[3]["mode"], "0600");

    // Directories and symlinks have a history too, with their type.
    let (code, out, _) = rb(&bk, &["--history", "dir"]);
    assert_eq!(code, 0);
    assert!(out.lines().skip(1).all(|l| l.split_whitespace().nth(2) == Some("dir")), "{out}");
    assert_eq!(words(&out).iter().filter(|(_, w)| w == "same").count(), 5, "{out}");
    let (code, out, _) = rb(&bk, &["history", "link"]);
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).is_some_and(|l| l.contains("symlink") && l.ends_with("-> f.txt")), "{out}");
}

#[test]
fn all_versions_to_writes_each_content_once_with_its_bytes_and_mtime() {
    require_root();
    let tmp = scratch();
    let bk = life_of_a_file(tmp.path());
    let snaps = complete(&bk, "srv");
    let to = tmp.path().join("versions");
    let (code, out, err) = rb(&bk, &["history", "f.txt", "--all-versions-to", to.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let stamp = |i: usize| snaps[i].file_name().unwrap().to_str().unwrap().strip_prefix("srv.").unwrap().to_string();
    let mut names: Vec<String> =
        std::fs::read_dir(&to).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let want: Vec<String> = [0, 2, 5].iter().map(|&i| format!("f.txt.{}", stamp(i))).collect();
    names.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(names, sorted, "one copy per content, named after the first snapshot holding it");
    for (name, (i, bytes)) in want.iter().zip([(0, &b"one"[..]), (2, b"two, longer"), (5, b"three")]) {
        let copy = to.join(name);
        assert_eq!(std::fs::read(&copy).unwrap(), bytes, "{name}");
        let (c, s) = (std::fs::metadata(&copy).unwrap(), std::fs::metadata(snaps[i].join("f.txt")).unwrap());
        assert_eq!((c.mtime(), c.mtime_nsec()), (s.mtime(), s.mtime_nsec()), "{name}: mtime kept");
        assert_eq!(c.permissions().mode() & 0o7777, 0o644, "{name}");
        assert!(out.contains(copy.to_str().unwrap()), "each copy is listed: {out}");
    }

    // With --json, stdout is the JSON alone; the copies are named on stderr.
    let json_to = tmp.path().join("json-versions");
    let (code, out, err) = rb(&bk, &["history", "f.txt", "--json", "--all-versions-to", json_to.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap().len(), 6);
    assert_eq!(err.matches("wrote ").count(), 3, "{err}");

    // Never overwritten: a second run refuses before it copies anything.
    std::fs::write(to.join(&want[0]), b"mine").unwrap();
    let (code, _, err) = rb(&bk, &["history", "f.txt", "--all-versions-to", to.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&want[0]) && err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(to.join(&want[0])).unwrap(), b"mine");

    // Never into the backups folder.
    let inside = bk.join("versions");
    let (code, _, err) = rb(&bk, &["history", "f.txt", "--all-versions-to", inside.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("inside the backups folder"), "{err}");
    assert!(!inside.exists());
}

#[test]
fn a_path_never_backed_up_or_climbing_out_is_a_usage_error() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    std::fs::create_dir_all(&bk).unwrap();
    let (code, _, err) = rb(&bk, &["history", "a.txt"]);
    assert_eq!(code, 2, "no snapshots: {err}");
    assert!(err.contains("no snapshots of srv"), "{err}");

    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let (code, out, err) = rb(&bk, &["history", "nothing/here.txt"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("nothing/here.txt is in none of the 1 snapshots of srv"), "{err}");
    assert!(out.is_empty(), "{out}");
    let (code, _, err) = rb(&bk, &["history", "a/../../etc/passwd"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`..` is not allowed"), "{err}");
}

#[test]
fn snapshots_without_a_manifest_are_looked_up_in_their_folders() {
    require_root();
    let tmp = scratch();
    let bk = life_of_a_file(tmp.path());
    // The unchanged, the rewritten and the chmodded snapshot lose their manifests.
    let manifests = bk.join("srv.rbackup/manifests");
    for s in &folder_names(&bk)[1..4] {
        std::fs::remove_file(manifests.join(s)).unwrap();
    }
    // The last one's is cut short: damaged, it is read no further.
    let last = manifests.join(&folder_names(&bk)[5]);
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(len / 2).unwrap();
    let (code, out, err) = rb(&bk, &["history", "f.txt"]);
    assert_eq!(code, 0, "{err}");
    // Unchanged: one inode with the snapshot before. Rewritten: another size.
    // Chmodded: a copy with the same size, and no digest to compare: unknown.
    assert_eq!(words(&out), expect(&bk, &["new", "same", "changed", "unknown", "deleted", "new"]), "{out}");
    assert!(err.contains("4 looked up in snapshot folders without a manifest"), "{err}");
    assert!(err.contains("its manifest can't be read to the path"), "{err}");
}
