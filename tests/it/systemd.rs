//! The systemd units: `systemd-analyze verify` is clean, the service rates
//! 2.2 or better in `systemd-analyze security`, and a real backup runs under
//! the service's capability bounding set. `rbackup-all.service`/`.timer`
//! (every job, `backup --all`) keep every property of the per-job units;
//! `rbackup-ui.service` (the web console) is verified and rated the same.
//! Also the anacron script.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const UNITS: [&str; 5] =
    ["rbackup@.service", "rbackup@.timer", "rbackup-all.service", "rbackup-all.timer", "rbackup-ui.service"];

/// The units, copied with ExecStart pointing at the binary under test (verify
/// checks that the command exists).
fn units(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for unit in UNITS {
        let text = std::fs::read_to_string(root.join(unit)).unwrap();
        std::fs::write(dir.join(unit), text.replace("/usr/bin/rbackup", bin().to_str().unwrap())).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn the_units_verify_cleanly_and_the_service_is_hardened() {
    require_root();
    let tmp = scratch();
    let dir = units(tmp.path());
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "rbackup@server.service",
            "rbackup@server.timer",
            "rbackup-all.service",
            "rbackup-all.timer",
            "rbackup-ui.service",
        ])
        .current_dir(&dir)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");

    for service in ["rbackup@server.service", "rbackup-all.service", "rbackup-ui.service"] {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=22", service])
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let level: f64 = text
            .lines()
            .find_map(|l| l.split(&format!("Overall exposure level for {service}: ")).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(level <= 2.2, "{service}: exposure {level}:\n{text}");
        assert!(out.status.success(), "{service}: --threshold=22 failed:\n{text}");
    }

    for timer in ["rbackup@.timer", "rbackup-all.timer"] {
        let timer = std::fs::read_to_string(dir.join(timer)).unwrap();
        for line in ["OnCalendar=daily", "Persistent=true", "RandomizedDelaySec="] {
            assert!(timer.contains(line), "timer lacks {line}");
        }
    }
}

/// A unit's settings, without comments and descriptions.
fn settings(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(unit)).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("Description="))
        .map(str::to_string)
        .collect()
}

/// The all-jobs units are the per-job ones with another command: same
/// sandbox, limits and exit statuses, same schedule. Only `KillMode=mixed`
/// is added (rbackup passes a stop on to each job once).
#[test]
fn the_all_jobs_units_keep_every_property_of_the_per_job_units() {
    let one = settings("rbackup@.service");
    let all = settings("rbackup-all.service");
    let differ = |a: &[String], b: &[String]| -> Vec<String> { a.iter().filter(|l| !b.contains(l)).cloned().collect() };
    assert_eq!(differ(&one, &all), ["ExecStart=/usr/bin/rbackup --job %i --backup"]);
    assert_eq!(differ(&all, &one), ["ExecStart=/usr/bin/rbackup backup --all", "KillMode=mixed"]);
    assert!(all.contains(&"SuccessExitStatus=20 23 24".to_string()) && all.contains(&"LimitNOFILE=65536".to_string()));
    assert_eq!(settings("rbackup@.timer"), settings("rbackup-all.timer"));
}

/// `CAP_CHOWN CAP_FOWNER` → `chown,fowner`.
fn bounding_set() -> String {
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/rbackup@.service")).unwrap();
    let line = unit.lines().find(|l| l.starts_with("CapabilityBoundingSet=")).unwrap();
    line["CapabilityBoundingSet=".len()..]
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_backup_works_under_the_services_capability_bounding_set() {
    require_root();
    let tmp = scratch();
    let (src, bk) = (tmp.path().join("src"), tmp.path().join("bk"));
    rich_tree(&src);
    let caps = format!("-all,{}", bounding_set());
    let bounding = format!("--bounding-set={caps}");
    let backup_limited = || backup_under_setpriv(&[&bounding, "--no-new-privs"], &src, &bk, "srv");
    let (code, err) = backup_limited();
    assert_eq!(code, Some(0), "{err}");
    // Without CAP_SYS_ADMIN, trusted.* attributes are invisible: all else is exact.
    assert_same_tree(&src, &complete(&bk, "srv")[0], &["trusted."]);

    // A second run links files of other owners and copies a chmod'ed one.
    sh(&format!("chmod 640 '{}'", src.join("home/alice/notes.txt").display()));
    write(&src.join("home/alice/new.txt"), b"new");
    sh(&format!("chown {GHOST_UID}:{GHOST_GID} '{}'", src.join("home/alice/new.txt").display()));
    let (code, err) = backup_limited();
    assert_eq!(code, Some(0), "{err}");
    let snaps = complete(&bk, "srv");
    assert_same_tree(&src, &snaps[1], &["trusted."]);
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    assert_eq!(ino(&snaps[0].join("home/alice/big.bin")), ino(&snaps[1].join("home/alice/big.bin")));
}

#[test]
fn the_anacron_script_is_runnable_by_run_parts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/anacron");
    let out = Command::new("run-parts").arg("--test").arg(&dir).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.trim().ends_with("/rbackup"), "run-parts would not run it: {listed:?}");
    let st = Command::new("sh").arg("-n").arg(dir.join("rbackup")).status().unwrap();
    assert!(st.success());
    // No job list to keep up to date: every job of the config runs.
    let script = std::fs::read_to_string(dir.join("rbackup")).unwrap();
    assert!(script.contains("/usr/bin/rbackup --quiet backup --all"), "{script}");
    assert!(!script.contains("--job"), "{script}");
}

/// The package installs every unit of systemd/.
#[test]
fn the_package_installs_every_unit() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let m: toml::Table = text.parse().unwrap();
    let assets = m["package"]["metadata"]["deb"]["assets"].as_array().unwrap();
    for unit in UNITS {
        let installed = assets
            .iter()
            .any(|a| a[0].as_str() == Some(&format!("systemd/{unit}")) && a[1].as_str() == Some("lib/systemd/system/"));
        assert!(installed, "no asset installs {unit}");
    }
}
