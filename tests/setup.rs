//! `setup-client` and `setup-server` on one machine (desktop and server are
//! the same host), then a backup through what they set up; `check` before
//! and after the ACL mask trap; the capability mode.

#![allow(clippy::pedantic)] // test code: plain asserts over polish

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use common::sshd::{BackupUser, Sshd};
use common::*;

/// Runs the agent copy (which the backup user can reach) with `args`.
fn agent_run(sshd: &Sshd, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(&sshd.agent).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fingerprint(sshd: &Sshd) -> String {
    let out = Command::new("ssh-keygen").arg("-lf").arg(sshd.dir.path().join("host_key.pub")).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

struct Setup {
    sshd: Sshd,
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let sshd = Sshd::start_for_setup(BackupUser::named());
        Setup { sshd, tmp: scratch() }
    }

    fn path(&self, p: &str) -> std::path::PathBuf {
        self.tmp.path().join(p)
    }

    fn client(&self, extra: &[&str]) -> (i32, String, String) {
        let cfg = self.path("etc/rbackup.toml");
        let remote = format!("{}@127.0.0.1:{}", self.sshd.user.name, self.path("src").display());
        let (port, fp, bk) = (self.sshd.port.to_string(), fingerprint(&self.sshd), self.path("bk"));
        let mut args = vec![
            "-c",
            cfg.to_str().unwrap(),
            "-j",
            "web",
            "setup-client",
            "--remote",
            &remote,
            "--port",
            &port,
            "--backups-folder",
            bk.to_str().unwrap(),
            "--accept-host-key",
            &fp,
        ];
        args.extend_from_slice(extra);
        run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    }

    fn server(&self, extra: &[&str]) -> (i32, String, String) {
        self.server_with_fds(None, extra)
    }

    /// `setup-server`, under `ulimit -n FDS` if given.
    fn server_with_fds(&self, fds: Option<u32>, extra: &[&str]) -> (i32, String, String) {
        let key = std::fs::read_to_string(self.path("etc/keys/web.pub")).unwrap();
        let (src, home) = (self.path("src"), self.path("home"));
        let mut args = vec![
            "setup-server",
            "--user",
            &self.sshd.user.name,
            "--root",
            src.to_str().unwrap(),
            "--key",
            key.trim(),
            "--home-base",
            home.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let Some(fds) = fds else { return agent_run(&self.sshd, &args) };
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
            .arg(&self.sshd.agent)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn rb(&self, args: &[&str]) -> (i32, String, String) {
        let cfg = self.path("etc/rbackup.toml");
        let mut all = vec!["-c", cfg.to_str().unwrap(), "-j", "web"];
        all.extend_from_slice(args);
        run(&all.iter().map(OsStr::new).collect::<Vec<_>>())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.sshd.user.name]).status();
    }
}

#[test]
fn both_setups_then_a_backup_through_them() {
    let s = Setup::new();
    rich_tree(&s.path("src"));

    let (code, out, err) = s.client(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rbackup setup-server --user"), "{out}");
    // Dry run first: it says everything and does nothing.
    let (code, out, err) = s.server(&["--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("would: create user") && out.contains("would: write"), "{out}");
    assert!(Command::new("id").arg(&s.sshd.user.name).output().unwrap().status.code() != Some(0));

    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = s.rb(&["--backup"]);
    assert_eq!(code, 0, "{err}\n{}", s.sshd.log());
    let snap = complete(&s.path("bk"), "web")[0].clone();
    assert_same_tree(&s.path("src"), &snap, &["trusted."]);

    // The account: no password, but not locked; its shell only runs serve.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let entry = shadow.lines().find(|l| l.starts_with(&format!("{}:", s.sshd.user.name))).unwrap();
    assert_eq!(entry.split(':').nth(1), Some("*"));
    let st = Command::new("su").args(["-s", "/bin/sh", "-c", "exit 0", &s.sshd.user.name]).status().unwrap();
    assert!(st.success(), "the account is usable with an explicit shell (for this check only)");
    let out = Command::new("su").args(["-c", "id", &s.sshd.user.name]).output().unwrap();
    assert!(!out.status.success(), "its login shell must refuse anything but `rbackup serve`");

    // Idempotent: both again, nothing doubles.
    assert_eq!(s.client(&[]).0, 0);
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: user") && out.contains("already holds the key"), "{out}");
    let keys = std::fs::read_to_string(s.path(&format!("home/{}/.ssh/authorized_keys", s.sshd.user.name))).unwrap();
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert!(keys.starts_with("restrict,command=\""), "{keys}");
    assert_eq!(std::fs::read_to_string(s.path("etc/known_hosts")).unwrap().lines().count(), 1);
    let cfg = std::fs::read_to_string(s.path("etc/rbackup.toml")).unwrap();
    assert_eq!(cfg.matches("[job.web]").count(), 1, "{cfg}");

    // check: all good; then the ACL mask trap; setup-server fixes it.
    let (code, out, err) = s.rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("readable by the backup user"), "{out}");
    sh(&format!("chmod 600 '{}'", s.path("src/etc/motd").display()));
    let (code, out, _) = s.rb(&["check"]);
    assert_eq!(code, 1, "{out}");
    // etc/motd and its hardlink etc/motd.hardlink: one inode, two names.
    assert!(
        out.contains("2 entries can't be read") && out.contains("etc/motd.hardlink") && out.contains("setfacl"),
        "{out}"
    );
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("gave the backup user read access to 1 of"), "{out}");
    assert_eq!(s.rb(&["check"]).0, 0);
    // The grant kept the mode's group class as narrow as it could.
    let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(s.path("src/etc/motd")).unwrap());
    assert_eq!(mode & 0o077, 0o040, "mode {mode:o}");
}

#[test]
fn the_capability_mode_reads_what_acls_do_not_cover() {
    let s = Setup::new();
    write(&s.path("src/public.txt"), b"public");
    write(&s.path("src/private/secret.txt"), b"secret");
    sh(&format!("chmod 700 '{0}' && chmod 600 '{0}/secret.txt'", s.path("src/private").display()));
    assert_eq!(s.client(&[]).0, 0);
    let agent_dir = s.path("agent");
    let (code, out, err) = s.server(&["--mode", "capability", "--agent-dir", agent_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let agent = agent_dir.join("rbackup-agent");
    let md = std::fs::metadata(&agent).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::mode(&md) & 0o7777, 0o750);
    assert!(xattr::get(&agent, "security.capability").unwrap().is_some());
    // No ACL was set on the tree.
    assert!(xattr::get(s.path("src/private/secret.txt"), "system.posix_acl_access").unwrap().is_none());
    let (code, _, err) = s.rb(&["--backup"]);
    assert_eq!(code, 0, "{err}\n{}", s.sshd.log());
    let snap = complete(&s.path("bk"), "web")[0].clone();
    assert_eq!(std::fs::read(snap.join("private/secret.txt")).unwrap(), b"secret");
    assert_same_tree(&s.path("src"), &snap, &["trusted."]);
}

#[test]
fn setup_server_grants_a_tree_wider_than_its_descriptor_limit() {
    let s = Setup::new();
    for i in 0..600 {
        write(&s.path(&format!("src/d{i:03}/f")), b"x");
    }
    sh(&format!("chmod -R go-rwx '{}'", s.path("src").display()));
    assert_eq!(s.client(&[]).0, 0);
    let (code, out, err) = s.server_with_fds(Some(256), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = s.rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("readable by the backup user"), "{out}");
}

#[test]
fn setup_server_refuses_bad_input() {
    require_root();
    let tmp = scratch();
    let bin = bin();
    let run_it = |args: &[&str]| Command::new(&bin).args(args).output().unwrap();
    let root = tmp.path().to_str().unwrap();
    for (user, key) in [
        ("Bad User", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1ypdKLd+1Yy8R0nK0Zz3cA x"),
        ("ok", "ssh-ed25519 AAAA\" command=\"/bin/sh"),
        ("ok", "not a key"),
    ] {
        let out = run_it(&["setup-server", "--user", user, "--root", root, "--key", key, "--dry-run"]);
        assert_eq!(out.status.code(), Some(2), "{user} {key}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = run_it(&[
        "setup-server",
        "--user",
        "ok",
        "--root",
        "/nonexistent",
        "--key",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1y",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(Path::new(root).read_dir().unwrap().next().is_none(), "nothing was written");
}
