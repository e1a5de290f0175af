//! `setup-client` and `setup-server` on one machine (desktop and server are
//! the same host), then a backup through what they set up; `check` before
//! and after the ACL mask trap; the capability mode.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use crate::common::sshd::{BackupUser, Sshd};
use crate::common::*;

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
        // The log in the scratch folder, not the machine's /var/log/rbackup.
        let log = self.path("log/web.log");
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
            "--log-file",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    }

    fn server(&self, extra: &[&str]) -> (i32, String, String) {
        self.server_with_fds(None, extra)
    }

    /// `setup-server` for the test's user with job web's key, under
    /// `ulimit -n FDS` if given.
    fn server_with_fds(&self, fds: Option<u32>, extra: &[&str]) -> (i32, String, String) {
        self.server_for("web", &self.sshd.user.name, "src", fds, extra)
    }

    /// `setup-server` for `user` with the key of job `job` and `root`
    /// (relative to the scratch folder), under `ulimit -n FDS` if given.
    fn server_for(&self, job: &str, user: &str, root: &str, fds: Option<u32>, extra: &[&str]) -> (i32, String, String) {
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

    let (code, out, err) = s.server_for("web", &user, "other", None, &[]);
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

/// Regression (issue 11, item 4): setup-server, as root, read and wrote the
/// backup user's `.ssh/authorized_keys` by path, so a symlink the account's
/// owner planted there made root copy another file's text, or chmod, chown
/// and write another folder. Each name is now opened without following.
#[test]
fn setup_server_follows_no_symlink_in_the_backup_users_ssh_folder() {
    let s = Setup::new();
    write(&s.path("src/a.txt"), b"a");
    assert_eq!(s.client(&[]).0, 0);
    let user = s.sshd.user.name.clone();
    let ssh = s.path(&format!("home/{user}/.ssh"));
    let victim = s.path("victim");
    write(&victim.join("secret"), b"root's secret\n");
    std::fs::set_permissions(&victim, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let _ = std::fs::remove_dir_all(&ssh);
    std::fs::create_dir_all(ssh.parent().unwrap()).unwrap();

    // `.ssh` itself a symlink: refused, the folder it points to untouched.
    std::os::unix::fs::symlink(&victim, &ssh).unwrap();
    let (code, out, err) = s.server(&[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("is a symlink: not followed"), "{err}");
    assert!(!victim.join("authorized_keys").exists(), "nothing written through the symlink");
    let st = std::fs::metadata(&victim).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&st.permissions()) & 0o777, 0o700, "not chmodded");

    // `authorized_keys` a symlink to a file root can read: its text is not
    // copied into the keys file, and the link is not written through.
    std::fs::remove_file(&ssh).unwrap();
    std::fs::create_dir(&ssh).unwrap();
    std::os::unix::fs::symlink(victim.join("secret"), ssh.join("authorized_keys")).unwrap();
    let (code, out, err) = s.server(&[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("is a symlink: not followed"), "{err}");
    assert_eq!(std::fs::read(victim.join("secret")).unwrap(), b"root's secret\n");
    assert!(std::fs::symlink_metadata(ssh.join("authorized_keys")).unwrap().file_type().is_symlink());

    // Once the admin removes it, the setup goes through.
    std::fs::remove_file(ssh.join("authorized_keys")).unwrap();
    let (code, out, err) = s.server(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!s.authorized_keys(&user).contains("secret"));
}

/// Regression (a newcomer's walk): `setup-client -c conf/rbackup.toml` wrote
/// relative paths (keys, known_hosts, the ssh config) into the job, and the
/// job failed from any other working directory with a misleading host-key
/// error. Paths are absolute now, so the job runs from anywhere.
#[test]
fn setup_client_with_a_relative_config_path_gives_a_job_that_runs_from_anywhere() {
    let s = Setup::new();
    write(&s.path("src/a.txt"), b"a");
    let remote = format!("{}@127.0.0.1:{}", s.sshd.user.name, s.path("src").display());
    let (port, fp, bk, log) = (s.sshd.port.to_string(), fingerprint(&s.sshd), s.path("bk"), s.path("log/web.log"));
    let out = Command::new(bin())
        .current_dir(s.tmp.path())
        .args(["-c", "etc/rbackup.toml", "-j", "web", "setup-client", "--remote", &remote, "--port", &port])
        .args(["--backups-folder", bk.to_str().unwrap(), "--accept-host-key", &fp])
        .args(["--log-file", log.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(s.path("etc/rbackup.toml")).unwrap()
        + &std::fs::read_to_string(s.path("etc/web.ssh_config")).unwrap();
    assert!(!written.contains("\"etc/") && !written.contains(" etc/"), "a relative path was written: {written}");
    assert_eq!(s.server(&[]).0, 0);
    // From another working directory, as cron would run it.
    let (code, out, err) = s.rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Regression (a newcomer's walk): setup-server said "server ready" with a
/// binary in a folder only root can enter (where `cargo install` puts it),
/// and the first backup failed with "Permission denied". It now checks that
/// the backup user can run it, and says what to do.
#[test]
fn setup_server_refuses_a_binary_the_backup_user_cannot_run() {
    let s = Setup::new();
    write(&s.path("src/a.txt"), b"a");
    assert_eq!(s.client(&[]).0, 0);
    let private = s.path("private/bin");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::copy(&s.sshd.agent, private.join("rbackup")).unwrap();
    std::fs::set_permissions(s.path("private"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = std::fs::read_to_string(s.path("etc/keys/web.pub")).unwrap();
    let (src, home) = (s.path("src"), s.path("home"));
    let out = Command::new(private.join("rbackup"))
        .args(["setup-server", "--user", &s.sshd.user.name, "--root", src.to_str().unwrap()])
        .args(["--key", key.trim(), "--home-base", home.to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}{err}");
    assert!(!stdout.contains("server ready") && !err.contains("server ready"), "{stdout}{err}");
    assert!(err.contains("can't run") && err.contains("install"), "{err}");
}

/// Regression (a newcomer's walk): running setup-client again (e.g. with
/// `--restore`) rewrote the job's ssh config and lost what the admin had
/// added by hand. The previous version is kept beside it, and said so.
#[test]
fn setup_client_again_keeps_the_previous_ssh_config_beside_the_new_one() {
    let s = Setup::new();
    assert_eq!(s.client(&[]).0, 0);
    let ssh_config = s.path("etc/web.ssh_config");
    let mut text = std::fs::read_to_string(&ssh_config).unwrap();
    text.push_str("  ConnectTimeout 7\n");
    // An off-site replica's alias, added by hand (docs/replicate.md).
    let replica = "Host offsite-replica\n  HostName backup2.example.org\n  User root\n";
    text.push_str(replica);
    std::fs::write(&ssh_config, &text).unwrap();
    let (code, out, err) = s.client(&["--restore"]);
    assert_eq!(code, 0, "{out}{err}");
    let kept = s.path("etc/web.ssh_config.before-setup-client");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), text);
    let now = std::fs::read_to_string(&ssh_config).unwrap();
    assert!(now.ends_with(replica) && !now.contains("ConnectTimeout 7"), "{now}");
    assert!(err.contains("previous version is kept as") && err.contains("before-setup-client"), "{err}");
    // Nothing to rewrite: nothing kept again, nothing said.
    std::fs::remove_file(&kept).unwrap();
    let (code, out, err) = s.client(&["--restore"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!kept.exists() && !err.contains("previous version"), "{err}");
}

/// `setup-server --before CMD` writes the command into the key's forced
/// command, where the desktop can't change it; a command that can't be
/// quoted there is refused.
#[test]
fn setup_server_before_goes_into_the_forced_command() {
    let s = Setup::new();
    write(&s.path("src/a.txt"), b"a");
    assert_eq!(s.client(&[]).0, 0);
    let (code, out, err) = s.server(&["--before", "/usr/local/sbin/dump-db --all"]);
    assert_eq!(code, 0, "{out}{err}");
    let keys = s.authorized_keys(&s.sshd.user.name);
    assert!(
        keys.contains(&format!("--root {} --before '/usr/local/sbin/dump-db --all'\"", s.path("src").display())),
        "{keys}"
    );
    let (code, out, err) = s.server(&["--before", "echo \"x\""]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("contains quotes or newlines"), "{err}");
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
        let (code, out, err) = s.server_for(job, user, root, None, &cap);
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
    // --user may be left out only with --mode replica.
    let out =
        run_it(&["setup-server", "--root", root, "--key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1y", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --user"));
    assert!(Path::new(root).read_dir().unwrap().next().is_none(), "nothing was written");
}

/// Root's `authorized_keys` on this machine, where `setup-server
/// --restore-key` puts the restore key (as on a real server). Held under a
/// lock between test processes; the lines a test added are removed after it.
struct RootKeys {
    _lock: std::fs::File,
    marker: String,
}

const ROOT_KEYS: &str = "/root/.ssh/authorized_keys";

impl RootKeys {
    /// `marker`: a string in every line the test adds (its scratch path).
    fn hold(marker: &Path) -> RootKeys {
        let lock = std::fs::File::options()
            .create(true)
            .write(true)
            .truncate(false)
            .open("/tmp/rbackup-tests-rootkeys.lock")
            .unwrap();
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
        RootKeys { _lock: lock, marker: marker.display().to_string() }
    }
}

impl Drop for RootKeys {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(ROOT_KEYS) else { return };
        let kept: Vec<&str> = text.lines().filter(|l| !l.contains(&self.marker)).collect();
        if kept.is_empty() {
            let _ = std::fs::remove_file(ROOT_KEYS);
        } else {
            let _ = std::fs::write(ROOT_KEYS, kept.join("\n") + "\n");
        }
    }
}

/// Regression (docs/restore.md): a `Host server-restore` block in
/// /root/.ssh/config was never read, because the job's own ssh_config
/// (`ssh -F`) replaces it, and nothing made the restore key. Now the
/// documented flow is: `setup-client --restore`, the `setup-server` line it
/// prints (with `--restore-key`), a backup, and a restore that goes through
/// root's write-confined agent, by the job's `restore_to` alone.
#[test]
fn setup_client_restore_then_the_printed_setup_server_line_gives_a_working_restore() {
    let s = Setup::new();
    rich_tree(&s.path("src"));
    let _root_keys = RootKeys::hold(&s.path("src"));

    let (code, out, err) = s.client(&["--restore"]);
    assert_eq!(code, 0, "{out}{err}");
    // What it made: the second key, the restore host in the job's own ssh
    // config (the only one ssh reads with -F), and the job's restore_to.
    let restore_key = s.path("etc/keys/web-restore");
    assert!(restore_key.is_file() && s.path("etc/keys/web-restore.pub").is_file());
    let ssh_config = std::fs::read_to_string(s.path("etc/web.ssh_config")).unwrap();
    let block = format!(
        "Host web-restore\n  HostName 127.0.0.1\n  User root\n  Port {}\n  IdentityFile {}\n",
        s.sshd.port,
        restore_key.display()
    );
    assert!(ssh_config.contains(&block), "{ssh_config}");
    let cfg = std::fs::read_to_string(s.path("etc/rbackup.toml")).unwrap();
    assert!(cfg.contains(&format!("restore_to = \"web-restore:{}\"", s.path("src").display())), "{cfg}");
    // docs/restore.md shows these very files, for doing it by hand.
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/restore.md")).unwrap();
    documented(&doc, "setup-client --remote backupuser@server.example.org:/srv/content --restore\n");
    let as_here = |text: &str| {
        text.replace("server-restore", "web-restore")
            .replace("server.example.org", "127.0.0.1")
            .replace("Port 22\n", &format!("Port {}\n", s.sshd.port))
            .replace("/etc/rbackup", s.path("etc").to_str().unwrap())
            .replace("/srv/content", s.path("src").to_str().unwrap())
    };
    let doc_block = documented(
        &doc,
        "Host server-restore\n  HostName server.example.org\n  User root\n  Port 22\n  \
         IdentityFile /etc/rbackup/keys/server-restore\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile /etc/rbackup/known_hosts\n  StrictHostKeyChecking yes\n",
    );
    assert!(ssh_config.contains(&as_here(doc_block)), "docs/restore.md:\n{doc_block}\nwritten:\n{ssh_config}");
    assert!(ssh_config.find("Host web-restore") < ssh_config.find("Host 127.0.0.1"), "{ssh_config}");
    assert!(cfg.contains(&as_here(documented(&doc, "restore_to = \"server-restore:/srv/content\"\n"))), "{cfg}");

    // The line it prints for the server, run as printed (the agent copy
    // stands for the server's rbackup; the home base keeps the test's user
    // out of /var/lib).
    let line = out.lines().map(str::trim).find(|l| l.starts_with("rbackup setup-server ")).expect(&out);
    assert!(line.contains(" --restore-key 'ssh-ed25519 "), "{line}");
    let line = line.replacen("rbackup", &s.sshd.agent.display().to_string(), 1);
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("{line} --home-base '{}'", s.path("home").display()))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}{}", String::from_utf8_lossy(&st.stdout), String::from_utf8_lossy(&st.stderr));
    let root_keys = std::fs::read_to_string(ROOT_KEYS).unwrap();
    let restore_pub = std::fs::read_to_string(s.path("etc/keys/web-restore.pub")).unwrap();
    let blob = restore_pub.split_whitespace().nth(1).unwrap();
    let root_line = root_keys.lines().find(|l| l.contains(blob)).expect(&root_keys);
    assert!(
        root_line.starts_with("restrict,command=\"") && root_line.contains(" serve --write --root "),
        "{root_line}"
    );

    let (code, _, err) = s.rb(&["--backup"]);
    assert_eq!(code, 0, "{err}\n{}", s.sshd.log());
    let snap = complete(&s.path("bk"), "web")[0].clone();
    let log = std::fs::read_to_string(s.path("log/web.log")).unwrap();
    assert!(log.contains(&format!("writing {}", snap.file_name().unwrap().to_string_lossy())), "{log}");

    // Ransomware: a file overwritten, one deleted, a mode changed.
    write(&s.path("src/etc/motd"), b"encrypted");
    std::fs::remove_file(s.path("src/names/with space.txt")).unwrap();
    sh(&format!("chmod 666 '{}'", s.path("src/etc/shadow-like").display()));

    let (code, out, err) = s.rb(&["restore"]);
    assert_eq!(code, 0, "{out}{err}\n{}", s.sshd.log());
    assert!(s.sshd.log().contains("Accepted publickey for root"), "the restore logs in as root:\n{}", s.sshd.log());
    assert_same_tree(&snap, &s.path("src"), &["trusted."]);

    // Once set up, a later setup-client without --restore keeps it.
    let (code, out, err) = s.client(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("--restore-key"), "{out}");
    assert!(std::fs::read_to_string(s.path("etc/web.ssh_config")).unwrap().contains("Host web-restore\n"));
}

/// setup-client gives the job the log file docs/scheduling.md promises,
/// where the systemd unit may write (`LogsDirectory=rbackup`).
#[test]
fn setup_client_writes_the_log_file_the_scheduling_doc_promises() {
    let s = Setup::new();
    let cfg = s.path("etc/rbackup.toml");
    let remote = format!("{}@127.0.0.1:{}", s.sshd.user.name, s.path("src").display());
    let (port, fp, bk) = (s.sshd.port.to_string(), fingerprint(&s.sshd), s.path("bk"));
    let args = [
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
    let (code, out, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("log_file = \"/var/log/rbackup/web.log\"\n"), "{text}");
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/scheduling.md")).unwrap();
    assert!(doc.contains("/var/log/rbackup/JOB.log"), "docs/scheduling.md names the log file setup-client sets");
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/rbackup@.service")).unwrap();
    assert!(unit.contains("LogsDirectory=rbackup\n"), "the unit may write /var/log/rbackup");
}

/// A snippet of a doc, which must be there word for word.
fn documented<'a>(doc: &str, snippet: &'a str) -> &'a str {
    assert!(doc.contains(snippet), "the doc no longer says:\n{snippet}");
    snippet
}

/// Regression (docs/setup.md, by hand): the steps gave the user `--shell
/// /bin/sh` (setup-server sets rbackup, docs/security.md says it has no
/// shell), put its key under a home of /nonexistent, and kept the desktop's
/// key in /root/.ssh, which the systemd unit can't see (`ProtectHome=yes`).
/// The documented commands, run as written on this machine (example names
/// replaced by the test's), give a working backup through a shell-less user.
#[test]
fn the_by_hand_setup_steps_as_documented_give_a_working_backup() {
    let s = Setup::new();
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/setup.md")).unwrap();
    let by_hand = &doc[doc.find("## Server").unwrap()..];
    for (file, setting) in [("systemd/rbackup@.service", "ProtectHome=yes\n"), ("docs/security.md", "no shell")] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        assert!(text.contains(setting), "{file} no longer says {setting:?}");
    }
    let desktop = &by_hand[by_hand.find("## Desktop").unwrap()..];
    assert!(!desktop.contains("/root/.ssh/rbackup") && !desktop.contains("/root/.ssh/known_hosts"), "{desktop}");
    write(&s.path("src/etc/motd"), b"welcome\n");
    write(&s.path("src/home/alice/notes.txt"), b"notes\n");
    sh(&format!("chmod 600 '{}'", s.path("src/home/alice/notes.txt").display()));

    let user = s.sshd.user.name.clone();
    let (agent, port) = (s.sshd.agent.display().to_string(), s.sshd.port.to_string());
    let (src, home, etc, bk, log) = (s.path("src"), s.path("home"), s.path("etc"), s.path("bk"), s.path("log"));
    let subst = |text: &str, pubkey: &str| -> String {
        let mut t = text.replace("sudo ", "");
        if !pubkey.is_empty() {
            t = t.replace("ssh-ed25519 AAAA… rbackup-server@desktop", pubkey.trim());
        }
        for (from, to) in [
            ("backupuser", user.as_str()),
            ("/usr/local/bin/rbackup", agent.as_str()),
            ("/var/lib/rbackup", home.to_str().unwrap()),
            ("/etc/rbackup", etc.to_str().unwrap()),
            ("/srv/content", src.to_str().unwrap()),
            ("/var/log/rbackup", log.to_str().unwrap()),
            ("\"/backups\"", &format!("\"{}\"", bk.display())),
            ("server.example.org", "127.0.0.1"),
            ("ssh-keyscan ", &format!("ssh-keyscan -p {port} ")),
            ("Port 22\n", &format!("Port {port}\n")),
        ] {
            t = t.replace(from, to);
        }
        t
    };
    let shell = |commands: &str, pubkey: &str| {
        let script = subst(commands, pubkey);
        let out = Command::new("sh").arg("-ec").arg(&script).output().unwrap();
        assert!(
            out.status.success(),
            "{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Desktop, step 1: the key (the server's steps need its public half).
    shell(
        documented(
            desktop,
            "sudo install -d -m 700 /etc/rbackup/keys\n\
             sudo ssh-keygen -t ed25519 -N '' -C rbackup-server@desktop -f /etc/rbackup/keys/server\n",
        ),
        "",
    );
    let pubkey = std::fs::read_to_string(s.path("etc/keys/server.pub")).unwrap();

    // Server: the user, read access, the confined key.
    shell(
        documented(
            by_hand,
            "sudo mkdir -p /var/lib/rbackup\n\
             sudo useradd --system --home-dir /var/lib/rbackup/backupuser --create-home --shell /usr/local/bin/rbackup backupuser\n\
             sudo usermod -p '*' backupuser\n",
        ),
        "",
    );
    shell(
        documented(
            by_hand,
            "sudo setfacl -R -m u:backupuser:rX /srv/content\nsudo setfacl -R -d -m u:backupuser:rX /srv/content\n",
        ),
        "",
    );
    shell(
        documented(
            by_hand,
            "sudo install -d -o root -g root -m 755 /var/lib/rbackup/backupuser/.ssh\n\
             echo 'restrict,command=\"/usr/local/bin/rbackup serve --read-only --root /srv/content\" ssh-ed25519 AAAA… rbackup-server@desktop' | sudo tee /var/lib/rbackup/backupuser/.ssh/authorized_keys\n",
        ),
        &pubkey,
    );

    // Desktop: the host key, the job's ssh config, the job.
    shell(
        documented(
            desktop,
            "sudo ssh-keyscan -t ed25519 server.example.org | sudo tee -a /etc/rbackup/known_hosts\n\
             sudo ssh-keygen -lf /etc/rbackup/known_hosts\n",
        ),
        "",
    );
    let ssh_config = documented(
        desktop,
        "Host server.example.org\n  User backupuser\n  Port 22\n  IdentityFile /etc/rbackup/keys/server\n  \
         IdentitiesOnly yes\n  UserKnownHostsFile /etc/rbackup/known_hosts\n  StrictHostKeyChecking yes\n",
    );
    std::fs::write(s.path("etc/server.ssh_config"), subst(ssh_config, "")).unwrap();
    let job = documented(
        desktop,
        "[job.server]\nsource = \"backupuser@server.example.org:/srv/content\"\nbackups_folder = \"/backups\"\n\
         ssh_config = \"/etc/rbackup/server.ssh_config\"\nlog_file = \"/var/log/rbackup/server.log\"\n",
    );
    std::fs::write(s.path("etc/rbackup.toml"), subst(job, "")).unwrap();

    // The account: rbackup is its shell, which runs nothing but `serve`.
    let entry = Command::new("getent").args(["passwd", &user]).output().unwrap();
    let entry = String::from_utf8_lossy(&entry.stdout).trim().to_string();
    assert!(entry.ends_with(&format!(":{agent}")), "{entry}");
    let out = Command::new("su").args(["-c", "id", &user]).output().unwrap();
    assert!(!out.status.success(), "its login shell must refuse anything but `rbackup serve`");

    let cfg = s.path("etc/rbackup.toml");
    let rb = |args: &[&str]| {
        let mut all = vec!["-c", cfg.to_str().unwrap(), "-j", "server"];
        all.extend_from_slice(args);
        run(&all.iter().map(OsStr::new).collect::<Vec<_>>())
    };
    for command in ["sudo rbackup -j server check\n", "sudo rbackup -j server --backup\n"] {
        documented(desktop, command);
    }
    let (code, out, err) = rb(&["check"]);
    assert_eq!(code, 0, "{out}{err}\n{}", s.sshd.log());
    let (code, _, err) = rb(&["--backup"]);
    assert_eq!(code, 0, "{err}\n{}", s.sshd.log());
    let snap = complete(&s.path("bk"), "server")[0].clone();
    assert_same_tree(&s.path("src"), &snap, &["trusted."]);
    assert!(s.path("log/server.log").is_file());
}

/// The restore key of job `web` is keys/web-restore, which is also the key a
/// job named `web-restore` would get: setup-client refuses to mix them up.
#[test]
fn setup_client_restore_refuses_a_job_named_like_its_restore_key() {
    require_root();
    let tmp = scratch();
    let cfg = tmp.path().join("etc/rbackup.toml");
    write(&cfg, b"[job.web-restore]\nsource = \"/srv\"\nbackups_folder = \"/backups\"\n");
    let args = ["-c", cfg.to_str().unwrap(), "-j", "web", "setup-client", "--remote", "127.0.0.1:/srv", "--restore"];
    let (code, out, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("has a job named web-restore"), "{err}");
    assert!(!tmp.path().join("etc/keys").exists(), "nothing was made");
}

/// docs/replicate.md: `setup-server --mode replica` on the off-site host
/// makes the replica folder and confines the desktop's replica key to root's
/// append-only agent; a job whose `replicas` names that host (through a
/// `Host` alias in its ssh config) replicates after each backup.
#[test]
fn setup_server_mode_replica_confines_a_key_that_replicate_after_backup_uses() {
    let s = Setup::new();
    let rep = s.path("offsite/backups");
    let _root_keys = RootKeys::hold(&rep);
    let key = s.path("etc/keys/web-replica");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let st =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "replica", "-f"]).arg(&key).status();
    assert!(st.unwrap().success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let args = ["setup-server", "--mode", "replica", "--root", rep.to_str().unwrap(), "--key", public.trim()];
    let (code, out, err) = agent_run(&s.sshd, &args);
    assert_eq!(code, 0, "{out}{err}");
    let mode = std::fs::metadata(&rep).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.unwrap(), 0o700);
    let blob = public.split_whitespace().nth(1).unwrap();
    let root_keys = std::fs::read_to_string(ROOT_KEYS).unwrap();
    let line = root_keys.lines().find(|l| l.contains(blob)).expect(&root_keys);
    let forced =
        format!("restrict,command=\"{} serve --append-only --root {}\" ", s.sshd.agent.display(), rep.display());
    assert!(line.starts_with(&forced), "{line}");
    // Idempotent.
    let (code, out, err) = agent_run(&s.sshd, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already holds the key"), "{out}");
    assert_eq!(std::fs::read_to_string(ROOT_KEYS).unwrap().matches(blob).count(), 1);
    let said = format!("{out}{err}");
    assert!(said.contains("Host offsite-replica") && said.contains(&format!("\"offsite-replica:{}\"", rep.display())));
    // The same key for another root is refused, and nothing is made for it.
    let other = s.path("offsite/other");
    let args2 = ["setup-server", "--mode", "replica", "--root", other.to_str().unwrap(), "--key", public.trim()];
    let (code, out, err) = agent_run(&s.sshd, &args2);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!other.exists(), "{out}{err}");

    // The desktop: a Host alias for the replica key, and the job.
    let ssh_config = s.path("etc/web.ssh_config");
    write(
        &ssh_config,
        format!(
            "Host offsite-replica\n  HostName 127.0.0.1\n  User root\n  Port {}\n  IdentityFile {}\n  \
             IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            s.sshd.port,
            key.display(),
            s.sshd.known_hosts.display()
        )
        .as_bytes(),
    );
    write(&s.path("src/a.txt"), b"to the off-site host");
    write(
        &s.path("etc/rbackup.toml"),
        format!(
            "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nssh_config = \"{}\"\nremote_bin = \"{}\"\n\
             replicas = [\"offsite-replica:{}\"]\nreplicate_after_backup = true\n",
            s.path("src").display(),
            s.path("bk").display(),
            ssh_config.display(),
            s.sshd.agent.display(),
            rep.display()
        )
        .as_bytes(),
    );
    let (code, _, err) = s.rb(&["--backup"]);
    assert_eq!(code, 0, "{err}\n{}", s.sshd.log());
    let (originals, replicas) = (complete(&s.path("bk"), "web"), complete(&rep, "web"));
    assert_eq!(replicas.len(), 1, "{err}");
    assert_eq!(originals[0].file_name(), replicas[0].file_name());
    assert_same_tree(&originals[0], &replicas[0], &[]);
    // The key is good for nothing else: a backup through it is refused.
    let (cfg, elsewhere) = (ssh_config.display().to_string(), s.path("elsewhere").display().to_string());
    let args = ["--backup", "--source", "offsite-replica:/etc", "--backups-folder", &elsewhere, "--name", "x"];
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--ssh-config", &cfg]);
    let (code, _, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("only takes replicas"), "{err}");
}
