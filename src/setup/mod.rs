//! One command per side: `setup-server` prepares the backup user, its read
//! access and its confined keys on the server; `setup-client` prepares the
//! desktop's key, the server's host key and the job. Both are idempotent and
//! print every step; `--dry-run` prints them without doing them.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::FileType;

use crate::fs::acl::{self, Acl};
use crate::fs::meta::{ACL_ACCESS, ACL_DEFAULT};
use crate::fs::safefs::{Dir, Shown, file_type};
use crate::{info, usage, warn};

/// How the backup user gets to read the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// An access ACL on everything and a default ACL on directories.
    Acl,
    /// A copy of the agent that only the backup user can run, with
    /// `CAP_DAC_READ_SEARCH`.
    Capability,
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
}

/// Says a step, and whether it is done or only shown.
struct Steps {
    dry_run: bool,
}

impl Steps {
    /// Runs `f` unless this is a dry run; says what it does either way.
    fn run(&self, what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.dry_run {
            println!("would: {what}");
            return Ok(());
        }
        println!("{what}");
        f().with_context(|| format!("failed: {what}"))
    }

    #[allow(clippy::unused_self)] // reads as the twin of `run`
    fn ok(&self, what: &str) {
        println!("ok: {what}");
    }
}

/// Checks a public key line: type, base64 blob, optional comment; nothing
/// that could break out of an `authorized_keys` line.
pub fn check_key(key: &str) -> Result<(String, String)> {
    let key = key.trim();
    if key.contains(['\n', '\r', '"', '\0']) {
        bail!(usage!("the key must be one line without quotes"));
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        bail!(usage!("the key must look like `ssh-ed25519 AAAA… comment`"));
    };
    let known = ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"];
    if !known.contains(&kind) && !kind.starts_with("sk-") {
        bail!(usage!("unknown key type {kind:?}"));
    }
    if blob.len() < 16 || !blob.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
        bail!(usage!("the key's base64 part is not valid"));
    }
    Ok((kind.to_string(), blob.to_string()))
}

fn check_user(user: &str) -> Result<()> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(usage!("invalid user name {user:?}")) }
}

/// The account's (uid, gid, home), if it exists.
fn lookup_user(user: &str) -> Result<Option<(u32, u32, PathBuf, String)>> {
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

fn command(program: &str, args: &[&str]) -> Result<()> {
    let st = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !st.success() {
        bail!("{program} {} failed with {st}", args.join(" "));
    }
    Ok(())
}

/// Quotes a path for the forced command (run by the account's shell).
fn quote(p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| usage!("{} is not UTF-8", p.display()))?;
    if s.contains(['\'', '"', '\n', '\\']) {
        bail!(usage!("{s:?} contains quotes or newlines"));
    }
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b)) {
        Ok(s.to_string())
    } else {
        Ok(format!("'{s}'"))
    }
}

/// `setup-server`: see the module doc and docs/setup.md.
pub fn server(o: &ServerOptions) -> Result<()> {
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
    };
    let line = format!(
        "restrict,command=\"{} serve --read-only --root {}\" {kind} {blob} {}",
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
    info!("server ready: the desktop pulls {}@{}:{}", o.user, crate::notify::hostname(), root.display());
    Ok(())
}

fn comment(key: &str) -> String {
    key.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
}

/// The `authorized_keys` file as it will be, before anything is written.
struct KeyPlan {
    file: PathBuf,
    line: String,
    /// The new content, or `None` if the file already holds the line.
    new: Option<String>,
}

/// The forced command of an `authorized_keys` line, if it has one.
fn forced_command(line: &str) -> Option<&str> {
    let start = line.find("command=\"")? + "command=\"".len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// Plans adding `line` for the key `blob` to `dir/authorized_keys`.
///
/// A key can carry one forced command only: sshd uses the first line that
/// matches it, so a second root for the same key would be a dead line, and
/// rewriting the existing line would silently cut off the job that uses it.
/// A line of this key with the same command (the program may differ: another
/// access mode, a moved binary) is replaced; any other line of this key is a
/// refusal that names it and says what to do.
fn plan_key(dir: &Path, blob: &str, line: &str) -> Result<KeyPlan> {
    let file = dir.join("authorized_keys");
    let old = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        // A dry run by another user than root: say what can't be checked.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !rustix::process::geteuid().is_root() => {
            warn!("cannot read {} as this user ({e}): run the dry run as root to check it", file.display());
            String::new()
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let wanted = forced_command(line).and_then(split_words).unwrap_or_default();
    let mut lines: Vec<String> = Vec::new();
    let mut present = false;
    for (n, l) in old.lines().enumerate() {
        if !l.split_whitespace().any(|w| w == blob) {
            lines.push(l.to_string());
            continue;
        }
        let existing = forced_command(l).and_then(split_words);
        if existing.as_ref().is_none_or(|w| w.get(1..) != wanted.get(1..)) {
            bail!(usage!("{}", key_conflict(&file, n + 1, l, existing.as_deref(), &wanted)));
        }
        if !present {
            lines.push(keep_options(l, line));
        }
        present = true;
    }
    if !present {
        lines.push(line.to_string());
    }
    let new = lines.join("\n") + "\n";
    Ok(KeyPlan { file, line: line.to_string(), new: (new != old).then_some(new) })
}

/// The line to write over `existing`, a line of the same key with the same
/// command: options the admin added (`from="…"`) stay if the line is
/// `restrict`ed; the program in the command becomes the one `ours` runs.
fn keep_options(existing: &str, ours: &str) -> String {
    let options = options_field(existing);
    let restricted = split_options(options).contains(&"restrict");
    match (restricted, forced_command(existing), forced_command(ours)) {
        (true, Some(old), Some(new)) => {
            existing.replacen(&format!("command=\"{old}\""), &format!("command=\"{new}\""), 1)
        }
        _ => ours.to_string(),
    }
}

/// The options field of an `authorized_keys` line: everything before the
/// first blank outside quotes, unless the line starts with the key type.
fn options_field(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                let first = &line[..i];
                let is_key_type = ["ssh-", "ecdsa-", "sk-"].iter().any(|t| first.starts_with(t));
                return if is_key_type { "" } else { first };
            }
            _ => {}
        }
    }
    ""
}

/// The options, split on commas outside quotes.
fn split_options(options: &str) -> Vec<&str> {
    let (mut out, mut quoted, mut start) = (Vec::new(), false, 0);
    for (i, c) in options.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < options.len() {
        out.push(&options[start..]);
    }
    out
}

/// Why a key's existing line is kept, and the ways forward.
fn key_conflict(file: &Path, n: usize, line: &str, existing: Option<&[String]>, wanted: &[String]) -> String {
    let root_of = |w: &[String]| w.iter().position(|a| a == "--root").and_then(|i| w.get(i + 1)).map(PathBuf::from);
    let what = match existing {
        None => "without a forced command (a key someone logs in with?)".to_string(),
        Some(w) => format!("for `{}`", w.join(" ")),
    };
    let mut text = format!(
        "{} line {n} already holds this key {what}:\n  {line}\n\
         sshd uses only the first line that matches a key, so one key can serve one directory; \
         the line is kept, nothing was changed. Either:\n\
         - give this tree its own key: on the desktop, `rbackup -j NEWJOB setup-client --remote …` \
         makes a key per job; run the setup-server line it prints;",
        file.display()
    );
    let old_root = existing.and_then(root_of);
    if let (Some(old), Some(new)) = (&old_root, root_of(wanted)) {
        let common = old.ancestors().find(|a| new.starts_with(a)).unwrap_or(Path::new("/"));
        text.push_str(&format!(
            "\n- or serve one directory that holds both: delete line {n} of {}, then run setup-server with \
             `--root {}` (each job's path beneath it);",
            file.display(),
            common.display()
        ));
    }
    text.push_str(&format!("\n- or, to move this key here, delete line {n} of {} and run this again.", file.display()));
    text
}

/// Writes the planned `authorized_keys`, owned by root so the account itself
/// can't change what it may run.
fn write_key(steps: &Steps, plan: &KeyPlan) -> Result<()> {
    let Some(new) = &plan.new else {
        steps.ok(&format!("{} already holds the key, confined", plan.file.display()));
        return Ok(());
    };
    let dir = plan.file.parent().expect("a file in a directory");
    steps.run(&format!("write {}: {}", plan.file.display(), plan.line), || {
        std::fs::create_dir_all(dir)?;
        let owner = if dir.starts_with("/root") { 0o700 } else { 0o755 };
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(owner))?;
        rustix::fs::chown(dir, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT))?;
        if let Some(home) = dir.parent() {
            // sshd refuses keys in a home that others can write.
            let st = rustix::fs::stat(home)?;
            if st.st_mode & 0o022 != 0 {
                std::fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(st.st_mode & 0o755))?;
            }
        }
        let d = Dir::open_path(dir)?;
        crate::fs::writer::replace_file(&d, b"authorized_keys", new.as_bytes(), 0o644)?;
        Ok(())
    })
}

/// `PermitRootLogin` must allow forced commands for the restore key.
fn check_root_login() {
    let Ok(out) = Command::new("sshd").arg("-T").output() else { return };
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text.lines().find_map(|l| l.strip_prefix("permitrootlogin ")).unwrap_or("unknown");
    if !matches!(value, "forced-commands-only" | "without-password" | "prohibit-password" | "yes") {
        warn!(
            "sshd has PermitRootLogin {value}: the restore key can't log in. Set \
             `PermitRootLogin forced-commands-only` in /etc/ssh/sshd_config and reload sshd"
        );
    } else if value != "forced-commands-only" {
        info!(
            "sshd has PermitRootLogin {value}; `forced-commands-only` is the tightest setting that lets the restore key in"
        );
    }
}

/// The capability agent of one backup user. Each user has its own copy: the
/// copy's group is what lets the user run it, and one file has one group.
/// (A shared copy re-owned by each setup locked out the users before.) Its
/// name starts with `rbackup`: the account's shell runs nothing else.
fn agent_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("rbackup-agent-{user}"))
}

/// Copies the agent to `agent`, where only the backup user's group can run
/// it, with `CAP_DAC_READ_SEARCH` as a file capability.
fn install_agent(steps: &Steps, exe: &Path, agent: &Path, gid: u32) -> Result<()> {
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

/// Every directory above the root must let the user through.
fn grant_ancestors(steps: &Steps, root: &Path, uid: u32) -> Result<()> {
    for dir in root.ancestors().skip(1) {
        let st = rustix::fs::stat(dir)?;
        if st.st_mode & 0o001 != 0 || st.st_uid == uid {
            continue;
        }
        let mut acl = current_acl(dir, ACL_ACCESS, st.st_mode)?;
        if acl.grant_user(uid, acl::X) {
            steps.run(&format!("let the backup user through {} (ACL u:{uid}:--x)", dir.display()), || {
                xattr::set_deref(dir, std::ffi::OsStr::from_bytes(ACL_ACCESS), &acl.to_bytes())?;
                Ok(())
            })?;
        }
    }
    Ok(())
}

fn current_acl(path: &Path, name: &[u8], mode: u32) -> Result<Acl> {
    match xattr::get_deref(path, std::ffi::OsStr::from_bytes(name))? {
        Some(raw) => Acl::parse(&raw),
        None => Ok(Acl::from_mode(mode)),
    }
}

/// Gives `uid` read access to everything beneath `root` (`rX`), and a default
/// ACL on directories so new files get it too. Walks with directory handles
/// ([`crate::store::reader::Walk`]): no symlink is followed, paths longer than
/// `PATH_MAX` work (where `setfacl -R` gives up), and a bounded number of
/// descriptors is open however deep or wide the tree. Each entry's ACL is
/// read and written through an `O_PATH` descriptor checked to be what the
/// walk saw, so an entry swapped for a symlink meanwhile is left alone. An
/// entry that can't be given access is named with the reason and the walk
/// goes on; returns how many there were.
fn grant_tree(steps: &Steps, root: &Path, user: &str, uid: u32) -> Result<u64> {
    let top = Dir::open_path(root)?;
    let mut g = Grants { steps, user, seen: 0, granted: 0, failed: 0 };
    for item in crate::store::reader::Walk::new(top.clone()) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                g.seen += 1;
                g.failed += 1;
                warn!("could not give the backup user read access: {e}");
                continue;
            }
        };
        let kind = file_type(&item.stat);
        if kind == FileType::Symlink {
            continue;
        }
        g.seen += 1;
        let pinned;
        let path = if item.rel.is_empty() {
            proc_of(&top)
        } else {
            pinned = match item.parent.pin(&item.name, kind) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // gone meanwhile
                Err(e) => {
                    g.fail(&item.rel, &e.to_string());
                    continue;
                }
            };
            pinned.proc_path()
        };
        let mode = item.stat.st_mode;
        let writes = if kind == FileType::Directory {
            grant_one(&path, ACL_ACCESS, mode, uid, acl::R | acl::X).and_then(|a| {
                let d = grant_one(&path, ACL_DEFAULT, mode, uid, acl::R | acl::X)?;
                Ok(a.into_iter().chain(d).flatten().collect::<Writes>())
            })
        } else {
            let perm = if mode & 0o111 != 0 { acl::R | acl::X } else { acl::R };
            grant_one(&path, ACL_ACCESS, mode, uid, perm).map(Option::unwrap_or_default)
        };
        g.apply(&path, &item.rel, writes.map(|w| (!w.is_empty()).then_some(w)))?;
    }
    g.summary(root);
    Ok(g.failed)
}

/// The ACL attributes to write for one entry.
type Writes = Vec<(&'static [u8], Vec<u8>)>;

fn grant_one(path: &Path, name: &'static [u8], mode: u32, uid: u32, perm: u16) -> Result<Option<Writes>> {
    let mut acl = match xattr::get_deref(path, std::ffi::OsStr::from_bytes(name))? {
        Some(raw) => Acl::parse(&raw)?,
        None => Acl::from_mode(mode),
    };
    Ok(acl.grant_user(uid, perm).then(|| vec![(name, acl.to_bytes())]))
}

/// Entries named (in a dry run and a real one) before the rest are counted.
const LISTED: u64 = 20;

/// The ACL walk's counts, and what it says as it goes.
struct Grants<'a> {
    steps: &'a Steps,
    user: &'a str,
    seen: u64,
    granted: u64,
    failed: u64,
}

impl Grants<'_> {
    /// Writes the ACLs one entry needs (or says it would), and names it.
    fn apply(&mut self, path: &Path, rel: &[u8], writes: Result<Option<Writes>>) -> Result<()> {
        let writes = match writes {
            Ok(Some(w)) => w,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.fail(rel, &format!("reading its ACL: {e:#}"));
                return Ok(());
            }
        };
        if !self.steps.dry_run {
            for (name, value) in writes {
                if let Err(e) = xattr::set_deref(path, std::ffi::OsStr::from_bytes(name), &value) {
                    if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) {
                        bail!(
                            "setting the ACL of {}: the filesystem does not support ACLs ({e}); mount it with \
                             ACLs, or use --mode capability",
                            shown(rel)
                        );
                    }
                    let hint = if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) {
                        " (an immutable or append-only file? see `lsattr`)"
                    } else {
                        ""
                    };
                    self.fail(rel, &format!("{e}{hint}"));
                    return Ok(());
                }
            }
        }
        let prefix = if self.steps.dry_run { "would: " } else { "" };
        if self.granted == 0 {
            println!(
                "{prefix}give the backup user read access (ACL u:{}:rX, and a default ACL on directories):",
                self.user
            );
        }
        if self.granted < LISTED {
            println!("{prefix}  {}", shown(rel));
        }
        self.granted += 1;
        Ok(())
    }

    /// An entry the user will not read, said with the reason.
    fn fail(&mut self, rel: &[u8], why: &str) {
        self.failed += 1;
        warn!("could not give the backup user read access to {}: {why}", shown(rel));
    }

    fn summary(&self, root: &Path) {
        let prefix = if self.steps.dry_run { "would: " } else { "" };
        if self.granted > LISTED {
            println!("{prefix}  … and {} more", self.granted - LISTED);
        }
        let already = self.seen.saturating_sub(self.granted + self.failed);
        if self.granted == 0 && self.failed == 0 {
            self.steps.ok(&format!("the backup user can read all {} entries under {}", self.seen, root.display()));
            return;
        }
        let mut line = format!(
            "{} the backup user read access to {} under {} ({already} already had it",
            if self.steps.dry_run { "would give" } else { "gave" },
            entries(self.granted),
            root.display()
        );
        if self.failed > 0 {
            line.push_str(&format!(", {} could not be given it: named above", self.failed));
        }
        println!("{line})");
    }
}

fn entries(n: u64) -> String {
    if n == 1 { "1 entry".into() } else { format!("{n} entries") }
}

fn shown(rel: &[u8]) -> String {
    if rel.is_empty() { ".".to_string() } else { Shown(rel).to_string() }
}

fn proc_of(dir: &Dir) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(dir)))
}

/// Options of `setup-client`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub job: String,
    pub remote: String,
    pub port: Option<u16>,
    pub backups_folder: PathBuf,
    /// The config file the job is added to; keys and ssh files go beside it.
    pub config: PathBuf,
    /// A host key fingerprint (`SHA256:…`) accepted without asking.
    pub accept_host_key: Option<String>,
    /// Also prepare restores: a second key, its `Host JOB-restore` and the
    /// job's `restore_to`. Kept on later runs once the job restores there.
    pub restore: bool,
    /// The job's `log_file`; `/var/log/rbackup/JOB.log` if not given.
    pub log_file: Option<PathBuf>,
    pub dry_run: bool,
}

/// The job's `log_file` unless `--log-file` says otherwise: the systemd
/// unit's `LogsDirectory`.
pub fn default_log_file(job: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/rbackup/{job}.log"))
}

/// The ssh host alias of a job's restore key.
pub fn restore_alias(job: &str) -> String {
    format!("{job}-restore")
}

/// `setup-client`: see the module doc and docs/setup.md.
pub fn client(o: &ClientOptions) -> Result<()> {
    crate::store::check_name(&o.job)?;
    let (user, host, path) = match crate::config::SourceSpec::parse_as(&o.remote, "--remote")? {
        crate::config::SourceSpec::Remote { user, host, path } => (user, host, path),
        crate::config::SourceSpec::Local(_) => bail!(usage!("--remote must be [user@]host:/abs/path")),
    };
    let base = o.config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let steps = Steps { dry_run: o.dry_run };
    let keys = base.join("keys");
    let key = keys.join(&o.job);
    let known_hosts = base.join("known_hosts");
    let ssh_config = base.join(format!("{}.ssh_config", o.job));

    let alias = restore_alias(&o.job);
    let restore_key = keys.join(&alias);
    let restore_to = format!("{alias}:{}", path.display());
    let existing = match std::fs::read_to_string(&o.config) {
        Ok(text) => crate::config::parse(&text).map_err(|e| usage!("config file {}: {e}", o.config.display()))?,
        Err(_) => crate::config::FileConfig::default(),
    };
    // Once set up, restores stay set up: a later run without --restore must
    // not drop the restore host from the ssh config.
    let restore =
        o.restore || existing.job.get(&o.job).and_then(|j| j.restore_to.as_deref()) == Some(restore_to.as_str());
    if restore && existing.job.contains_key(&alias) {
        bail!(usage!(
            "{} has a job named {alias}, whose key would be the restore key of job {} ({}): rename one of them",
            o.config.display(),
            o.job,
            restore_key.display()
        ));
    }

    // 1. A key for this job only, and one for its restores (root on the
    // server, confined there to `serve --write`).
    create_key(&steps, &key, &format!("rbackup-{}@{}", o.job, crate::notify::hostname()), "")?;
    if restore {
        let comment = format!("rbackup-{alias}@{}", crate::notify::hostname());
        create_key(&steps, &restore_key, &comment, " for restores")?;
    }

    // 2. The server's host key, after its fingerprint is checked.
    let port = o.port.unwrap_or(22);
    let scanned = scan_host_key(&host, port)?;
    let (line, fingerprint) = scanned;
    let recorded = std::fs::read_to_string(&known_hosts).unwrap_or_default();
    if recorded.lines().any(|l| l.trim() == line) {
        steps.ok(&format!("host key {fingerprint} of {host} is recorded in {}", known_hosts.display()));
    } else {
        println!("the server {host} port {port} presents the host key {fingerprint}");
        match &o.accept_host_key {
            Some(f) if f == &fingerprint => {}
            Some(f) => {
                bail!("the server's host key is {fingerprint}, not {f}: refusing (check for a man in the middle)")
            }
            None if std::io::IsTerminal::is_terminal(&std::io::stdin()) && !o.dry_run => {
                println!("compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the server.");
                print!("is this the server's key? [y/N] ");
                std::io::Write::flush(&mut std::io::stdout())?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !accepts(&answer) {
                    bail!("host key not accepted; nothing recorded");
                }
            }
            None if o.dry_run => {}
            None => bail!(usage!(
                "verify the fingerprint on the server (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then \
                 pass --accept-host-key {fingerprint}"
            )),
        }
        steps.run(&format!("record the host key in {}", known_hosts.display()), || {
            std::fs::create_dir_all(&base)?;
            let mut text = recorded.clone();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&line);
            text.push('\n');
            crate::fs::writer::replace_file(&Dir::open_path(&base)?, b"known_hosts", text.as_bytes(), 0o644)?;
            Ok(())
        })?;
    }

    // 3. The job's ssh config: this key, this known_hosts, strict checking.
    // `ssh -F` reads only this file (not root's ~/.ssh/config), so the
    // restore host is here too, first: the first value ssh reads wins.
    let mut cfg = format!("# rbackup job {}: written by `rbackup setup-client`\n", o.job);
    let block = |cfg: &mut String, user: Option<&str>, key: &Path| {
        if let Some(u) = user {
            cfg.push_str(&format!("  User {u}\n"));
        }
        cfg.push_str(&format!(
            "  Port {port}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            key.display(),
            known_hosts.display()
        ));
    };
    if restore {
        cfg.push_str(&format!("Host {alias}\n  HostName {host}\n"));
        block(&mut cfg, Some("root"), &restore_key);
    }
    cfg.push_str(&format!("Host {host}\n"));
    block(&mut cfg, user.as_deref(), &key);
    if std::fs::read_to_string(&ssh_config).ok().as_deref() == Some(&cfg) {
        steps.ok(&format!("{} is up to date", ssh_config.display()));
    } else {
        steps.run(&format!("write {}", ssh_config.display()), || {
            let name = ssh_config.file_name().expect("a file name").as_bytes().to_vec();
            crate::fs::writer::replace_file(&Dir::open_path(&base)?, &name, cfg.as_bytes(), 0o644)?;
            Ok(())
        })?;
    }

    // 4. The job in the config file.
    add_job(&steps, o, &ssh_config, restore.then_some(restore_to.as_str()))?;

    // 5. What to run on the server.
    let public = |key: &Path| {
        let pub_file = PathBuf::from(format!("{}.pub", key.display()));
        std::fs::read_to_string(pub_file).unwrap_or_else(|_| "ssh-ed25519 AAAA… (created at the real run)".into())
    };
    let mut line = format!(
        "rbackup setup-server --user {} --root {} --key '{}'",
        user.as_deref().unwrap_or("backupuser"),
        path.display(),
        public(&key).trim()
    );
    if restore {
        line.push_str(&format!(" --restore-key '{}'", public(&restore_key).trim()));
    }
    println!("\nnow, on {host} as root:\n  {line}");
    println!("then check the job with: rbackup -j {} check", o.job);
    if restore {
        println!("and restore with: rbackup -j {} restore (through {alias}, as root on {host})", o.job);
    }
    Ok(())
}

/// Creates an ed25519 key without a passphrase (cron runs it) unless it exists.
fn create_key(steps: &Steps, key: &Path, comment: &str, purpose: &str) -> Result<()> {
    if key.exists() {
        steps.ok(&format!("key {}{purpose} exists", key.display()));
        return Ok(());
    }
    let keys = key.parent().unwrap_or(Path::new("."));
    steps.run(&format!("create the key {}{purpose} (ed25519, no passphrase: cron runs it)", key.display()), || {
        std::fs::create_dir_all(keys)?;
        std::fs::set_permissions(keys, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let k = key.to_string_lossy();
        command("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &k])
    })
}

/// `ssh-keyscan` the host: (`known_hosts` line, SHA256 fingerprint) of its
/// ed25519 key (or the first key offered).
fn scan_host_key(host: &str, port: u16) -> Result<(String, String)> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", "10", "-p", &port.to_string(), "-t", "ed25519,ecdsa,rsa", host])
        .output()
        .context("running ssh-keyscan")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .min_by_key(|l| !l.contains("ssh-ed25519"))
        .ok_or_else(|| anyhow!("no host key from {host} port {port}: is sshd running there?"))?
        .trim()
        .to_string();
    let mut child = Command::new("ssh-keygen")
        .args(["-l", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running ssh-keygen")?;
    std::io::Write::write_all(child.stdin.as_mut().expect("piped"), line.as_bytes())?;
    let out = child.wait_with_output()?;
    let fingerprint = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("ssh-keygen printed no fingerprint"))?
        .to_string();
    Ok((line, fingerprint))
}

/// A TOML string literal (quotes and backslashes escaped).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Adds the job to the config file, or checks the one there; with
/// `restore_to`, sees that the job has it.
fn add_job(steps: &Steps, o: &ClientOptions, ssh_config: &Path, restore_to: Option<&str>) -> Result<()> {
    let text = std::fs::read_to_string(&o.config).unwrap_or_default();
    let write = |new: String| -> Result<()> {
        let parsed = crate::config::parse(&new).map_err(|e| anyhow!("the new job would not parse: {e}"))?;
        if restore_to.is_some() && parsed.job.get(&o.job).and_then(|j| j.restore_to.as_deref()) != restore_to {
            bail!("the job's restore_to did not land in [job.{}]", o.job);
        }
        if let Some(dir) = o.config.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let dir = Dir::open_path(o.config.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        let name = o.config.file_name().ok_or_else(|| anyhow!("no file name"))?.as_bytes().to_vec();
        crate::fs::writer::replace_file(&dir, &name, new.as_bytes(), 0o644)?;
        Ok(())
    };
    if !text.is_empty() {
        let parsed = crate::config::parse(&text).map_err(|e| usage!("config file {}: {e}", o.config.display()))?;
        if let Some(job) = parsed.job.get(&o.job) {
            if job.source.as_deref() != Some(o.remote.as_str()) {
                bail!(usage!(
                    "{} already has a job {} with source {:?}: choose another name or edit the file",
                    o.config.display(),
                    o.job,
                    job.source.as_deref().unwrap_or("")
                ));
            }
            let Some(want) = restore_to else {
                steps.ok(&format!("job {} is in {}", o.job, o.config.display()));
                return Ok(());
            };
            match job.restore_to.as_deref() {
                Some(have) if have == want => {
                    steps.ok(&format!("job {} is in {}, restoring to {want}", o.job, o.config.display()));
                    return Ok(());
                }
                Some(have) => bail!(usage!(
                    "job {} in {} restores to {have:?}, not to {want:?} (the restore key's host): change or \
                     remove its restore_to",
                    o.job,
                    o.config.display()
                )),
                None => {}
            }
            // Under the job's header, so the rest of the file stays as it is.
            let header = format!("[job.{}]", o.job);
            let mut lines: Vec<&str> = text.lines().collect();
            let Some(at) = lines.iter().position(|l| l.trim() == header) else {
                bail!(usage!(
                    "add `restore_to = {}` to the job {} in {} (its table has no `{header}` line to add it under)",
                    toml_string(want),
                    o.job,
                    o.config.display()
                ));
            };
            let entry = format!("restore_to = {}", toml_string(want));
            lines.insert(at + 1, &entry);
            let new = lines.join("\n") + "\n";
            return steps.run(&format!("add {entry} to job {} in {}", o.job, o.config.display()), || write(new));
        }
    }
    let mut table = format!(
        "\n[job.{}]\nsource = {}\nbackups_folder = {}\nssh_config = {}\nlog_file = {}\n",
        o.job,
        toml_string(&o.remote),
        toml_string(&o.backups_folder.to_string_lossy()),
        toml_string(&ssh_config.to_string_lossy()),
        toml_string(&o.log_file.clone().unwrap_or_else(|| default_log_file(&o.job)).to_string_lossy()),
    );
    if let Some(to) = restore_to {
        table.push_str(&format!("restore_to = {}\n", toml_string(to)));
    }
    steps.run(&format!("add job {} to {}", o.job, o.config.display()), || write(text.clone() + &table))
}

/// The account shell mode: sshd runs `SHELL -c "COMMAND"`. With rbackup as
/// the backup user's shell, only `rbackup serve …` runs (the forced command,
/// or what a key without one asks for); anything else is refused.
pub fn shell(command: &str) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let words = split_words(command).ok_or_else(|| anyhow!("this account only runs `rbackup serve`"))?;
    let program = Path::new(words.first().map_or("", String::as_str));
    let is_rbackup = program.file_name().is_some_and(|n| n.as_bytes().starts_with(b"rbackup"));
    if !is_rbackup
        || words.get(1).map(String::as_str) != Some("serve")
        || !program.is_absolute() && words[0] != "rbackup"
    {
        bail!("this account only runs `rbackup serve`");
    }
    let program = if program.is_absolute() { program.to_path_buf() } else { std::env::current_exe()? };
    let err = Command::new(program).args(&words[1..]).exec();
    Err(err.into())
}

/// Splits a command line on whitespace, honouring single and double quotes.
fn split_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, ';' | '|' | '&' | '`' | '$' | '<' | '>' | '\\') => return None,
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return None;
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// The admin's answer to a yes/no prompt: "y", or "yes" as ssh taught.
fn accepts(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: "yes" at the host-key prompt (what ssh asks for) was
    /// taken as a no.
    #[test]
    fn the_host_key_prompt_takes_yes_as_ssh_does() {
        assert!(accepts("y\n") && accepts("yes\n") && accepts(" YES "));
        assert!(!accepts("\n") && !accepts("no\n") && !accepts("yess\n"));
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1ypdKLd+1Yy8R0nK0Zz3cA me@host").is_ok());
        assert!(check_key("ssh-ed25519 AAAA\"x\" me").is_err());
        assert!(check_key("command=\"/bin/sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE1y").is_err());
        assert!(check_key("ssh-ed25519 AAAAC3Nza\nssh-rsa AAAA").is_err());
        assert!(check_key("").is_err());
    }

    #[test]
    fn shell_words_refuse_shell_syntax() {
        assert_eq!(
            split_words("/usr/bin/rbackup serve --read-only --root '/srv/my content'").unwrap(),
            vec!["/usr/bin/rbackup", "serve", "--read-only", "--root", "/srv/my content"]
        );
        assert!(split_words("rbackup serve; rm -rf /").is_none());
        assert!(split_words("rbackup serve $(id)").is_none());
        assert!(split_words("rbackup 'serve").is_none());
    }

    #[test]
    fn the_shell_only_runs_serve() {
        for cmd in
            ["/bin/sh", "rbackup backup", "/usr/bin/python3 -c x", "sh -c 'rbackup serve'", "rbackup serve | cat"]
        {
            assert!(shell(cmd).is_err(), "{cmd}");
        }
    }

    const BLOB: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIE1ypdKLd+1Yy8R0nK0Zz3cA";

    fn plan_over(existing: &str, line: &str) -> Result<Option<String>> {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("authorized_keys"), existing).unwrap();
        Ok(plan_key(tmp.path(), BLOB, line)?.new)
    }

    #[test]
    fn a_key_keeps_one_forced_command() {
        let ours = format!("restrict,command=\"/usr/bin/rbackup serve --read-only --root /srv\" ssh-ed25519 {BLOB} d");
        let other = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ other\n";
        // New key: appended, other lines kept.
        assert_eq!(plan_over(other, &ours).unwrap().unwrap(), format!("{other}{ours}\n"));
        // Same line: nothing to write.
        assert_eq!(plan_over(&format!("{ours}\n"), &ours).unwrap(), None);
        // Another program for the same root (another access mode): updated in
        // place, keeping the options the admin added.
        let old = format!(
            "from=\"10.0.0.5\",restrict,command=\"/opt/rbackup-agent serve --read-only --root /srv\" ssh-ed25519 {BLOB} d"
        );
        let new = plan_over(&format!("{old}\n"), &ours).unwrap().unwrap();
        assert_eq!(new, old.replace("/opt/rbackup-agent", "/usr/bin/rbackup") + "\n");
        // Another root, no forced command, or another command: refused.
        for existing in [
            ours.replace("--root /srv", "--root /home"),
            format!("ssh-ed25519 {BLOB} admin"),
            ours.replace("--read-only", "--write"),
        ] {
            let err = plan_over(&format!("{existing}\n"), &ours).unwrap_err().to_string();
            assert!(err.contains("line 1 already holds this key") && err.contains(&existing), "{err}");
        }
    }

    #[test]
    fn forced_command_paths_are_quoted() {
        assert_eq!(quote(Path::new("/srv/content")).unwrap(), "/srv/content");
        assert_eq!(quote(Path::new("/srv/my content")).unwrap(), "'/srv/my content'");
        assert!(quote(Path::new("/srv/it's")).is_err());
    }
}
