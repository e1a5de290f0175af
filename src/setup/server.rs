//! `setup-server`: the backup user, the agent it may run (ACL mode: the
//! installed binary; capability mode: a copy of its own), its keys and its
//! read access.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::grant::{entries, grant_ancestors, grant_tree};
use super::keys::{check_key, comment, plan_key, write_key};
use super::{Steps, command, quote};
use crate::{info, usage, warn};

/// How the backup user gets to read the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// An access ACL on everything and a default ACL on directories.
    Acl,
    /// A copy of the agent that only the backup user can run, with
    /// `CAP_DAC_READ_SEARCH`.
    Capability,
    /// No backup user: the off-site host of replicas, root's key confined
    /// to the append-only agent ([`super::replica`]).
    Replica,
}

/// Options of `setup-server`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub user: String,
    pub root: PathBuf,
    pub key: String,
    pub mode: AccessMode,
    pub restore_key: Option<String>,
    pub dry_run: bool,
    /// Where the capability agent goes.
    pub agent_dir: PathBuf,
    /// Where the backup user's home (and `authorized_keys`) goes.
    pub home_base: PathBuf,
    /// The agent's `--before` command, in the forced command.
    pub before: Option<String>,
}

pub(super) fn check_user(user: &str) -> Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(usage!("invalid user name {user:?}")) }
}

/// The account's (uid, gid, home), if it exists.
pub(super) fn lookup_user(user: &str) -> Result<Option<(u32, u32, PathBuf, String)>> {
    let out = Command::new("getent").args(["passwd", user]).output().context("running getent")?;
    if !out.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = line.trim().split(':').collect();
    if f.len() < 7 {
        bail!("unexpected passwd entry for {user}: {line}");
    }
    Ok(Some((f[2].parse()?, f[3].parse()?, PathBuf::from(f[5]), f[6].to_string())))
}

/// `setup-server`: see the module doc and docs/setup.md.
pub fn server(o: &ServerOptions) -> Result<()> {
    if o.mode == AccessMode::Replica {
        return super::replica::replica(o);
    }
    if o.user.is_empty() {
        bail!(usage!("setup-server needs --user: the backup user (created if missing)"));
    }
    if !rustix::process::geteuid().is_root() && !o.dry_run {
        bail!("setup-server needs root (it creates a user and sets ACLs)");
    }
    check_user(&o.user)?;
    let (kind, blob) = check_key(&o.key)?;
    let restore = o.restore_key.as_deref().map(check_key).transpose()?;
    if !o.root.is_absolute() || !o.root.is_dir() {
        bail!(usage!("--root {} must be an existing directory (absolute path)", o.root.display()));
    }
    let root = o.root.canonicalize()?;
    let exe = std::env::current_exe()?.canonicalize()?;
    let steps = Steps { dry_run: o.dry_run };
    let account = lookup_user(&o.user)?;
    let home = account.as_ref().map_or_else(|| o.home_base.join(&o.user), |(_, _, h, _)| h.clone());

    // Before changing anything: the keys' lines, refused if the key already
    // carries another forced command (see `plan_key`).
    let agent = match o.mode {
        AccessMode::Acl => exe.clone(),
        AccessMode::Capability => agent_path(&o.agent_dir, &o.user),
        AccessMode::Replica => unreachable!("set up by setup::replica"),
    };
    let before = match &o.before {
        Some(cmd) => format!(" --before {}", quote(Path::new(cmd))?),
        None => String::new(),
    };
    let line = format!(
        "restrict,command=\"{} serve --read-only --root {}{before}\" {kind} {blob} {}",
        quote(&agent)?,
        quote(&root)?,
        comment(&o.key)
    );
    let backup_key = plan_key(&home.join(".ssh"), &blob, line.trim_end())?;
    let restore_key = match &restore {
        Some((rkind, rblob)) => {
            let line = format!(
                "restrict,command=\"{} serve --write --root {}\" {rkind} {rblob} {}",
                quote(&exe)?,
                quote(&root)?,
                comment(o.restore_key.as_deref().unwrap_or_default())
            );
            Some(plan_key(Path::new("/root/.ssh"), rblob, line.trim_end())?)
        }
        None => None,
    };

    // 1. The user: no password (but not locked: keys work), and rbackup as its
    // shell, which only runs `rbackup serve`.
    match &account {
        Some((_, _, h, shell)) => {
            steps.ok(&format!("user {} exists (home {}, shell {shell})", o.user, h.display()));
            if Path::new(shell) != exe {
                warn!(
                    "the shell of {} is {shell}; with rbackup as its shell the account can run nothing but \
                     `rbackup serve`: usermod -s {} {}",
                    o.user,
                    exe.display(),
                    o.user
                );
            }
        }
        None => {
            let exe_s = exe.to_string_lossy();
            let home_s = home.to_string_lossy();
            steps.run(&format!("create user {} (home {home_s}, shell {exe_s}, no password)", o.user), || {
                std::fs::create_dir_all(&o.home_base)?;
                command("useradd", &["--system", "--home-dir", &home_s, "--create-home", "--shell", &exe_s, &o.user])?;
                command("usermod", &["-p", "*", &o.user])
            })?;
        }
    }
    let (uid, gid) = match lookup_user(&o.user)? {
        Some((u, g, _, _)) => (u, g),
        None if o.dry_run => (u32::MAX, u32::MAX),
        None => bail!("user {} was not created", o.user),
    };

    // 2. Read access.
    let mut not_granted = 0;
    match o.mode {
        AccessMode::Acl => not_granted = grant_tree(&steps, &root, &o.user, uid)?,
        AccessMode::Capability => install_agent(&steps, &exe, &agent, gid)?,
        AccessMode::Replica => unreachable!("set up by setup::replica"),
    }
    grant_ancestors(&steps, &root, uid)?;

    // 3. Keys, confined by forced commands.
    write_key(&steps, &backup_key)?;
    if let Some(k) = &restore_key {
        write_key(&steps, k)?;
        check_root_login();
    }
    if o.dry_run {
        info!("dry run: nothing was changed; run the same command without --dry-run to set up the server");
        return Ok(());
    }
    if not_granted > 0 {
        bail!(
            "{} under {} could not be given read access (named above, each with the reason): the backup \
             user can't read those. Fix what stopped it and run setup-server again, or use --mode capability",
            entries(not_granted),
            root.display()
        );
    }
    // The account's shell is this binary, and its forced command the agent:
    // both must run as the backup user (not so if they sit in a folder only
    // root can enter, e.g. /root/.cargo/bin).
    for program in if agent == exe { vec![&exe] } else { vec![&exe, &agent] } {
        runs_as(program, &o.user, uid, gid)?;
    }
    info!("server ready: the desktop pulls {}@{}:{}", o.user, crate::notify::hostname(), root.display());
    Ok(())
}

/// Checks that `user` (`uid`, `gid`) can run `program`.
fn runs_as(program: &Path, user: &str, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let status = Command::new(program)
        .arg("--version")
        .uid(uid)
        .gid(gid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => bail!("{} --version, run as {user}, failed with {st}", program.display()),
        Err(e) => bail!(
            "the backup user {user} can't run {} ({e}), which is its login shell and forced command: install \
             rbackup where every user can run it (e.g. `cargo install --path . --root /usr/local`, or the \
             .deb), then run setup-server again with that binary",
            program.display()
        ),
    }
}

/// `PermitRootLogin` must allow forced commands for the restore key.
pub(super) fn check_root_login() {
    let Ok(out) = Command::new("sshd").arg("-T").output() else { return };
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text.lines().find_map(|l| l.strip_prefix("permitrootlogin ")).unwrap_or("unknown");
    if !matches!(value, "forced-commands-only" | "without-password" | "prohibit-password" | "yes") {
        warn!(
            "sshd has PermitRootLogin {value}: root's confined keys (restore, replica) can't log in. Set \
             `PermitRootLogin forced-commands-only` in /etc/ssh/sshd_config and reload sshd"
        );
    } else if value != "forced-commands-only" {
        info!(
            "sshd has PermitRootLogin {value}; `forced-commands-only` is the tightest setting that lets root's \
             confined keys in"
        );
    }
}

/// The capability agent of one backup user. Each user has its own copy: the
/// copy's group is what lets the user run it, and one file has one group.
/// (A shared copy re-owned by each setup locked out the users before.) Its
/// name starts with `rbackup`: the account's shell runs nothing else.
pub(super) fn agent_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("rbackup-agent-{user}"))
}

/// Copies the agent to `agent`, where only the backup user's group can run
/// it, with `CAP_DAC_READ_SEARCH` as a file capability.
pub(super) fn install_agent(steps: &Steps, exe: &Path, agent: &Path, gid: u32) -> Result<()> {
    let dir = agent.parent().expect("the agent is in a directory");
    // VFS_CAP_REVISION_2 | effective; permitted = CAP_DAC_READ_SEARCH (2).
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 2, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    let same = std::fs::read(agent).ok() == std::fs::read(exe).ok()
        && xattr::get(agent, "security.capability").ok().flatten().as_deref() == Some(&cap[..])
        && rustix::fs::stat(agent).is_ok_and(|st| st.st_uid == 0 && st.st_gid == gid && st.st_mode & 0o7777 == 0o750);
    let shared = dir.join("rbackup-agent");
    if shared.exists() {
        info!(
            "{} (one copy for every backup user, from an older rbackup) is no longer used by keys set up now; \
             once setup-server has been run again for each backup user, remove it",
            shared.display()
        );
    }
    if same {
        steps.ok(&format!("{} is installed with cap_dac_read_search", agent.display()));
        return Ok(());
    }
    steps.run(
        &format!("install {} (root, group of the backup user, 0750) with cap_dac_read_search", agent.display()),
        || {
            std::fs::create_dir_all(dir)?;
            let name = agent.file_name().expect("a file name").to_string_lossy();
            let tmp = dir.join(format!(".{name}.new"));
            std::fs::copy(exe, &tmp)?;
            rustix::fs::chown(&tmp, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::from_raw(gid)))?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
            xattr::set(&tmp, "security.capability", &cap)?;
            std::fs::rename(&tmp, agent)?;
            Ok(())
        },
    )
}
