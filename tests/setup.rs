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
        self.client_for("web", &self.sshd.user.name, "src", extra)
    }

    /// `setup-client` for job `job`: `user` on this server backs up `root`
    /// (relative to the scratch folder).
    fn client_for(&self, job: &str, user: &str, root: &str, extra: &[&str]) -> (i32, String, String) {
        let cfg = self.path("etc/rbackup.toml");
        let remote = format!("{user}@127.0.0.1:{}", self.path(root).display());
        let (port, fp, bk) = (self.sshd.port.to_string(), fingerprint(&self.sshd), self.path("bk"));
        let mut args = vec![
            "-c",
            cfg.to_str().unwrap(),
            "-j",
            job,
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
        self.server_for("web", &self.sshd.user.name, "src", extra)
    }

    /// `setup-server` for `user` with the key of job `job` and `root`
    /// (relative to the scratch folder).
    fn server_for(&self, job: &str, user: &str, root: &str, extra: &[&str]) -> (i32, String, String) {
        let key = std::fs::read_to_string(self.path(&format!("etc/keys/{job}.pub"))).unwrap();
        let (src, home) = (self.path(root), self.path("home"));
        let mut args = vec![
            "setup-server",
            "--user",
            user,
            "--root",
            src.to_str().unwrap(),
            "--key",
            key.trim(),
            "--home-base",
            home.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        agent_run(&self.sshd, &args)
    }

    fn authorized_keys(&self, user: &str) -> String {
        std::fs::read_to_string(self.path(&format!("home/{user}/.ssh/authorized_keys"))).unwrap()
    }

    fn rb(&self, args: &[&str]) -> (i32, String, String) {
        self.rb_job("web", args)
    }

    fn rb_job(&self, job: &str, args: &[&str]) -> (i32, String, String) {
        let cfg = self.path("etc/rbackup.toml");
        let mut all = vec!["-c", cfg.to_str().unwrap(), "-j", job];
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
    assert!(out.contains("2 entries can't be read") && out.contains("etc/motd.hardlink"), "{out}");
    // The hint names the real account, not a placeholder.
    assert!(out.contains(&format!("setfacl -m u:{}:rX PATH", s.sshd.user.name)), "{out}");
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("gave the backup user read access to 1 entry under"), "{out}");
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
    let agent = agent_dir.join(format!("rbackup-agent-{}", s.sshd.user.name));
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

/// Regression (issue 12, item 3): `setup-server` with the same key and another
/// root rewrote the first root's line, and the first job's `check` failed
/// with "outside the directory this agent serves".
#[test]
fn setup_server_refuses_a_second_root_for_a_key_and_keeps_the_first_line() {
    let s = Setup::new();
    write(&s.path("src/a.txt"), b"a");
    write(&s.path("other/b.txt"), b"b");
    assert_eq!(s.client(&[]).0, 0);
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    let user = s.sshd.user.name.clone();
    let before = s.authorized_keys(&user);

    let (code, out, err) = s.server_for("web", &user, "other", &[]);
    assert_eq!(code, 2, "{out}{err}");
    let file = s.path(&format!("home/{user}/.ssh/authorized_keys"));
    assert!(err.contains(&format!("{} line 1 already holds this key", file.display())), "{err}");
    assert!(err.contains(before.trim()), "the message shows the line it keeps: {err}");
    assert!(err.contains("setup-client") && err.contains("its own key"), "{err}");
    assert!(err.contains(&format!("`--root {}`", s.tmp.path().display())), "names a root covering both: {err}");
    assert!(err.contains("delete line 1 of"), "{err}");
    assert_eq!(s.authorized_keys(&user), before, "nothing was changed");
    assert!(
        !s.path("other/b.txt").exists()
            || xattr::get(s.path("other/b.txt"), "system.posix_acl_access").unwrap().is_none(),
        "no ACL was set either"
    );

    // The first job still works.
    let (code, out, err) = s.rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(s.rb(&["--backup"]).0, 0);

    // The same root in another access mode is the same line, updated in place.
    let agent_dir = s.path("agent");
    let (code, out, err) = s.server(&["--mode", "capability", "--agent-dir", agent_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let keys = s.authorized_keys(&user);
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert!(keys.contains(&format!("{}/rbackup-agent-{user} serve --read-only --root", agent_dir.display())), "{keys}");
    let (code, out, err) = s.rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Regression (issue 12, item 4): a second backup user in capability mode
/// re-owned the one shared agent copy (`root:user2 0750`), and the first
/// user's backups failed with "Permission denied".
#[test]
fn two_backup_users_in_capability_mode_each_get_their_own_agent() {
    let s = Setup::new();
    let second = BackupUser::named();
    let users = [s.sshd.user.name.clone(), second.name.clone()];
    for (root, secret) in [("src", b"first secret"), ("src2", b"other secret")] {
        write(&s.path(&format!("{root}/private/secret.txt")), secret);
        sh(&format!("chmod 700 '{0}' && chmod 600 '{0}/secret.txt'", s.path(&format!("{root}/private")).display()));
    }
    let agent_dir = s.path("agent");
    let cap = ["--mode", "capability", "--agent-dir", agent_dir.to_str().unwrap()];
    for (job, user, root) in [("web", &users[0], "src"), ("web2", &users[1], "src2")] {
        let (code, out, err) = s.client_for(job, user, root, &[]);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = s.server_for(job, user, root, &cap);
        assert_eq!(code, 0, "{out}{err}");
    }
    // Both back up, the first one after the second user's setup.
    for (job, root, secret) in [("web", "src", &b"first secret"[..]), ("web2", "src2", b"other secret")] {
        let (code, _, err) = s.rb_job(job, &["--backup"]);
        assert_eq!(code, 0, "{job}: {err}\n{}", s.sshd.log());
        let snap = complete(&s.path("bk"), job)[0].clone();
        assert_eq!(std::fs::read(snap.join("private/secret.txt")).unwrap(), secret);
        assert_same_tree(&s.path(root), &snap, &["trusted."]);
    }
    for user in &users {
        let agent = agent_dir.join(format!("rbackup-agent-{user}"));
        let md = std::fs::metadata(&agent).unwrap();
        let gid = String::from_utf8(Command::new("id").args(["-g", user]).output().unwrap().stdout).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, gid.trim().parse().unwrap(), 0o750), "{user}");
        assert!(xattr::get(&agent, "security.capability").unwrap().is_some());
        assert!(s.authorized_keys(user).contains(&format!("command=\"{} serve", agent.display())));
    }
    assert!(!agent_dir.join("rbackup-agent").exists(), "no shared copy");
    drop(second);
}

/// Removes the immutable flag a test set, so the scratch folder can go.
struct Immutable(std::path::PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// Regression (issue 12, item 16): the dry run listed 20 entries with no
/// "… and N more" and still said "server ready"; the real run's "22 of 23
/// entries" did not say which entry failed, nor why.
#[test]
fn setup_server_names_what_it_grants_counts_the_rest_and_says_what_failed() {
    let s = Setup::new();
    for i in 0..30 {
        write(&s.path(&format!("src/f{i:02}")), b"x");
    }
    assert_eq!(s.client(&[]).0, 0);
    let user = s.sshd.user.name.clone();

    let (code, out, err) = s.server(&["--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("would: give the backup user read access (ACL u:{user}:rX")), "{out}");
    // 31 entries: the root and 30 files; 20 are named.
    assert_eq!(out.lines().filter(|l| l.starts_with("would:   ")).count(), 21, "{out}");
    assert!(out.contains("would:   … and 11 more\n"), "{out}");
    assert!(out.contains("would give the backup user read access to 31 entries under"), "{out}");
    assert!(!err.contains("server ready") && !out.contains("server ready"), "{out}{err}");
    assert!(err.contains("dry run: nothing was changed"), "{err}");

    // One file refuses ACLs: the run names it and the reason, and fails.
    let stuck = s.path("src/f07");
    sh(&format!("chattr +i '{}'", stuck.display()));
    let guard = Immutable(stuck.clone());
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("could not give the backup user read access to f07: Operation not permitted"), "{err}");
    assert!(err.contains("immutable"), "{err}");
    assert!(out.contains("gave the backup user read access to 30 entries under"), "{out}");
    assert!(out.contains("(0 already had it, 1 could not be given it: named above)"), "{out}");
    assert!(out.contains("  … and 10 more\n"), "{out}");
    assert!(err.contains("1 entry under") && err.contains("could not be given read access"), "{err}");
    assert!(!err.contains("server ready"), "{err}");

    drop(guard);
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("gave the backup user read access to 1 entry under") && out.contains("(30 already had it)"),
        "{out}"
    );
    assert!(out.contains("\n  f07\n"), "the entry it gave access to is named: {out}");
    assert!(err.contains("server ready"), "{err}");
    assert_eq!(s.rb(&["check"]).0, 0);
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
