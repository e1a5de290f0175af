//! Bad input: a clear message, a non-zero exit, nothing created or removed.

use std::ffi::OsStr;

use crate::common::*;

fn args<'a>(list: &'a [&'a str]) -> Vec<&'a OsStr> {
    list.iter().map(OsStr::new).collect()
}

#[test]
fn a_missing_source_is_named_and_nothing_is_created() {
    require_root();
    let tmp = scratch();
    let bk = tmp.path().join("bk");
    let (code, _, err) = backup(&tmp.path().join("nope"), &bk, "srv", &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nope") && err.contains("cannot be read"), "{err}");
    assert!(!bk.exists());
}

#[test]
fn an_unwritable_backups_folder_is_reported() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    sh(&format!("chmod -R a+rX '{}'", src.display()));
    let locked = tmp.path().join("root-only");
    std::fs::create_dir(&locked).unwrap();
    sh(&format!("chmod 755 '{}'", locked.display()));
    let bk = locked.join("bk");
    let (code, err) = backup_under_setpriv(&["--reuid=nobody", "--regid=nogroup", "--clear-groups"], &src, &bk, "srv");
    assert_eq!(code, Some(2), "a folder this user can't write is a setting to fix: {err}");
    assert!(err.contains(&bk.display().to_string()) && err.contains("Permission denied"), "{err}");
    assert!(!bk.exists());
}

#[test]
fn names_that_could_escape_the_backups_folder_are_refused() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    for name in ["a/b", "..", "../evil", ".hidden"] {
        let (code, _, err) = backup(&src, &bk, name, &[]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains("--name"), "{err}");
        assert!(!bk.exists(), "{name}");
        assert!(!tmp.path().join("evil").exists());
    }
}

#[test]
fn commands_on_a_mistyped_name_say_so_and_create_nothing() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let entries = || {
        let mut v: Vec<_> = std::fs::read_dir(&bk).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let before = entries();
    let folder = bk.to_str().unwrap();
    for command in [
        &["verify"][..],
        &["diff", "latest", "previous"],
        &["prune", "--keep-last", "1"],
        &["prune", "--keep-last", "1", "--dry-run"],
    ] {
        let mut a = command.to_vec();
        a.extend(["--backups-folder", folder, "--name", "sr"]);
        let (code, _, err) = run(&args(&a));
        assert_eq!(code, 2, "{command:?}: {err}");
        assert!(err.contains("no snapshots of sr in") && err.contains("--name"), "{command:?}: {err}");
        assert_eq!(entries(), before, "{command:?} created something");
    }
}

#[test]
fn a_backups_folder_inside_the_source_is_refused_unless_excluded() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let bk = src.join("var/backups");
    // Also when the source is named through a symlink.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    for source in [&src, &link] {
        let (code, _, err) = backup(source, &bk, "srv", &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("inside the source") && err.contains("--exclude '/var/backups/'"), "{err}");
        assert!(!src.join("var").exists(), "the refused run created something");
    }
    let (code, _, err) = backup(&src, &src, "srv", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is the source itself"), "{err}");

    // Excluded, itself or through a parent: the snapshot leaves it out.
    for exclude in ["/var/backups/", "/var/"] {
        let (code, _, err) = backup(&src, &bk, "srv", &["--exclude", exclude]);
        assert_eq!(code, 0, "{exclude}: {err}");
        let snap = complete(&bk, "srv").pop().unwrap();
        assert_eq!(std::fs::read(snap.join("f")).unwrap(), b"f");
        assert!(!snap.join("var/backups").exists(), "{exclude}");
    }
}

#[test]
fn a_config_with_an_unknown_key_names_file_line_and_key() {
    require_root();
    let tmp = scratch();
    let cfg = tmp.path().join("rbackup.toml");
    let bk = tmp.path().join("bk");
    std::fs::write(
        &cfg,
        format!("[job.a]\nsource = \"/etc\"\nbackups_folder = \"{}\"\nexcludes = [\"x\"]\n", bk.display()),
    )
    .unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "--backup"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(cfg.to_str().unwrap()), "{err}");
    assert!(err.contains("line 4") && err.contains("excludes"), "{err}");
    assert!(!bk.exists());
}

#[test]
fn a_config_with_a_wrong_type_names_file_line_and_key() {
    require_root();
    let tmp = scratch();
    let cfg = tmp.path().join("rbackup.toml");
    let bk = tmp.path().join("bk");
    std::fs::write(&cfg, format!("[job.a]\nsource = \"/etc\"\nbackups_folder = \"{}\"\ncompress = 1\n", bk.display()))
        .unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "--backup"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 4") && err.contains("compress"), "{err}");
    assert!(!bk.exists());
}

#[test]
fn an_unknown_job_lists_the_known_ones() {
    require_root();
    let tmp = scratch();
    let cfg = tmp.path().join("rbackup.toml");
    std::fs::write(&cfg, "[job.web]\n[job.db]\n").unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "-j", "mail", "--backup"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("db, web"), "{err}");
}

#[test]
fn a_job_from_the_config_file_runs_and_the_command_line_overrides_it() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let cfg = tmp.path().join("rbackup.toml");
    std::fs::write(
        &cfg,
        format!(
            "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\n",
            src.display(),
            tmp.path().join("bk").display()
        ),
    )
    .unwrap();
    let (code, _, err) = run(&args(&["-c", cfg.to_str().unwrap(), "--backup"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(complete(&tmp.path().join("bk"), "web").len(), 1);
    let other = tmp.path().join("other");
    let (code, _, err) = run(&args(&[
        "-c",
        cfg.to_str().unwrap(),
        "-j",
        "web",
        "--backup",
        "--backups-folder",
        other.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(complete(&other, "web").len(), 1);
}

#[test]
fn continue_without_an_interrupted_run_says_so() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    assert_eq!(backup(&src, &bk, "srv", &[]).0, 0);
    let before = snapshots(&bk, "srv");
    let (code, _, err) = continue_backup(&src, &bk, "srv", &[]);
    assert_eq!(code, 2, "a request that can't be done, nothing done: {err}");
    assert!(err.contains("nothing to continue") && err.contains("--backup"), "{err}");
    assert_eq!(snapshots(&bk, "srv"), before);
}

#[test]
fn every_command_is_also_a_long_flag_and_help_has_examples() {
    let (code, out, _) = run(&args(&["--help"]));
    assert_eq!(code, 0);
    for word in ["backup", "continue", "list", "Examples:", "--continue", "Exit codes"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (code, out, _) = run(&args(&["--backup", "--help"]));
    assert_eq!(code, 0);
    for opt in ["--source", "--backups-folder", "--name", "--exclude", "--dry-run"] {
        assert!(out.contains(opt), "backup --help lacks {opt}:\n{out}");
    }
}

/// Regression: these exited 1 ("the run failed") although docs/exit-codes.md
/// says a bad setting exits 2.
#[test]
fn a_backups_folder_that_cannot_be_one_and_an_unreadable_config_exit_2() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");

    let file = tmp.path().join("a-file");
    write(&file, b"not a folder");
    let (code, _, err) = backup(&src, &file, "srv", &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a-file") && err.contains("not a folder"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");

    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    sh(&format!("mount -t tmpfs -o ro,size=1m tmpfs '{}'", ro.display()));
    let (code, _, err) = backup(&src, &ro.join("bk"), "srv", &[]);
    let (code2, _, err2) = backup(&src, &ro, "srv", &[]);
    sh(&format!("umount '{}'", ro.display()));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(code2, 2, "{err2}");
    assert!(err2.contains("read-only"), "{err2}");

    let missing = tmp.path().join("nope.toml");
    let (code, _, err) = run(&args(&["--config", missing.to_str().unwrap(), "--list"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn a_name_too_long_is_refused_for_its_length() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    let name = "n".repeat(250);
    let (code, _, err) = backup(&src, &bk, &name, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("250 characters is too long") && err.contains("at most 100"), "{err}");
    assert!(!bk.exists());
}

/// Regression: "No space left on device" didn't say which file was being
/// written, nor what to do.
#[test]
fn a_full_backups_filesystem_names_the_file_and_the_way_out() {
    require_root();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("small"), b"s");
    write(&src.join("big.bin"), &noise(7, 4 << 20));
    let bk = tmp.path().join("bk");
    std::fs::create_dir(&bk).unwrap();
    sh(&format!("chmod 700 '{0}' && mount -t tmpfs -o size=1m,mode=700 tmpfs '{0}'", bk.display()));
    let (code, _, err) = backup(&src, &bk, "srv", &[]);
    sh(&format!("umount '{}'", bk.display()));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("writing big.bin") && err.contains("filesystem is full"), "{err}");
    assert!(err.contains("--continue"), "{err}");
}

/// A `log_file` whose folder is a file says so, not just "File exists".
#[test]
fn a_log_file_whose_folder_cannot_be_made_names_the_folder() {
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    write(&src.join("f"), b"f");
    let blocker = tmp.path().join("logs");
    write(&blocker, b"a file where the log folder should be");
    let log = blocker.join("srv.log");
    let (code, _, err) = backup(&src, &bk, "srv", &["--log-file", log.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&format!("its folder {} can't be made", blocker.display())) && err.contains("File exists"),
        "{err}"
    );
}
