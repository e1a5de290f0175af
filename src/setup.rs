//! One command per side: `setup-server` prepares the backup user, its read
//! access and its confined keys on the server; `setup-client` prepares the
//! desktop's key, the server's host key and the job. Both are idempotent and
//! print every step; `--dry-run` prints them without doing them.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::FileType;

use crate::acl::{self, Acl};
use crate::meta::{ACL_ACCESS, ACL_DEFAULT};
use crate::safefs::{Dir, Shown, file_type};
use crate::{info, usage, warn};

/// How the backup user gets to read the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

    // 1. The user: no password (but not locked: keys work), and rbackup as its
    // shell, which only runs `rbackup serve`.
    let home = o.home_base.join(&o.user);
    let account = lookup_user(&o.user)?;
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
    let (uid, gid, home) = match lookup_user(&o.user)? {
        Some((u, g, h, _)) => (u, g, h),
        None if o.dry_run => (u32::MAX, u32::MAX, home),
        None => bail!("user {} was not created", o.user),
    };

    // 2. Read access.
    let agent = match o.mode {
        AccessMode::Acl => {
            grant_tree(&steps, &root, uid)?;
            exe.clone()
        }
        AccessMode::Capability => install_agent(&steps, &exe, &o.agent_dir, gid)?,
    };
    grant_ancestors(&steps, &root, uid)?;

    // 3. Keys, confined by forced commands.
    let line = format!(
        "restrict,command=\"{} serve --read-only --root {}\" {kind} {blob} {}",
        quote(&agent)?,
        quote(&root)?,
        comment(&o.key)
    );
    install_key(&steps, &home.join(".ssh"), &blob, line.trim_end())?;
    if let Some((rkind, rblob)) = &restore {
        let line = format!(
            "restrict,command=\"{} serve --write --root {}\" {rkind} {rblob} {}",
            quote(&exe)?,
            quote(&root)?,
            comment(o.restore_key.as_deref().unwrap_or_default())
        );
        install_key(&steps, Path::new("/root/.ssh"), rblob, line.trim_end())?;
        check_root_login();
    }
    info!("server ready: the desktop pulls {}@{}:{}", o.user, crate::notify::hostname(), root.display());
    Ok(())
}

fn comment(key: &str) -> String {
    key.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
}

/// Adds or replaces (matched by key) the line in `dir/authorized_keys`,
/// owned by root so the account itself can't change what it may run.
fn install_key(steps: &Steps, dir: &Path, blob: &str, line: &str) -> Result<()> {
    let file = dir.join("authorized_keys");
    let old = std::fs::read_to_string(&file).unwrap_or_default();
    let mut lines: Vec<String> = Vec::new();
    let mut present = false;
    for l in old.lines() {
        if l.split_whitespace().any(|w| w == blob) {
            if !present {
                lines.push(line.to_string());
            }
            present = true;
        } else {
            lines.push(l.to_string());
        }
    }
    if !present {
        lines.push(line.to_string());
    }
    let new = lines.join("\n") + "\n";
    if new == old {
        steps.ok(&format!("{} already holds the key, confined", file.display()));
        return Ok(());
    }
    steps.run(&format!("write {}: {line}", file.display()), || {
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
        crate::writer::replace_file(&d, b"authorized_keys", new.as_bytes(), 0o644)?;
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

/// Copies the agent where only the backup user's group can run it, with
/// `CAP_DAC_READ_SEARCH` as a file capability.
fn install_agent(steps: &Steps, exe: &Path, dir: &Path, gid: u32) -> Result<PathBuf> {
    let agent = dir.join("rbackup-agent");
    // VFS_CAP_REVISION_2 | effective; permitted = CAP_DAC_READ_SEARCH (2).
    let mut cap = Vec::new();
    for word in [0x0200_0001u32, 1 << 2, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    let same = std::fs::read(&agent).ok() == std::fs::read(exe).ok()
        && xattr::get(&agent, "security.capability").ok().flatten().as_deref() == Some(&cap[..])
        && rustix::fs::stat(&agent).is_ok_and(|st| st.st_gid == gid && st.st_mode & 0o7777 == 0o750);
    if same {
        steps.ok(&format!("{} is installed with cap_dac_read_search", agent.display()));
        return Ok(agent);
    }
    steps.run(
        &format!("install {} (root, group of the backup user, 0750) with cap_dac_read_search", agent.display()),
        || {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(".rbackup-agent.new");
            std::fs::copy(exe, &tmp)?;
            rustix::fs::chown(&tmp, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::from_raw(gid)))?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
            xattr::set(&tmp, "security.capability", &cap)?;
            std::fs::rename(&tmp, &agent)?;
            Ok(())
        },
    )?;
    Ok(agent)
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
/// ([`crate::tree::Walk`]): no symlink is followed, paths longer than
/// `PATH_MAX` work (where `setfacl -R` gives up), and a bounded number of
/// descriptors is open however deep or wide the tree. Each entry's ACL is
/// read and written through an `O_PATH` descriptor checked to be what the
/// walk saw, so an entry swapped for a symlink meanwhile is left alone.
fn grant_tree(steps: &Steps, root: &Path, uid: u32) -> Result<()> {
    let top = Dir::open_path(root)?;
    let (mut seen, mut granted) = (0u64, 0u64);
    for item in crate::tree::Walk::new(top.clone()) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                warn!("skipping {e}");
                continue;
            }
        };
        let kind = file_type(&item.stat);
        if kind == FileType::Symlink {
            continue;
        }
        let pinned;
        let path = if item.rel.is_empty() {
            proc_of(&top)
        } else {
            pinned = match item.parent.pin(&item.name, kind) {
                Ok(p) => p,
                Err(e) => {
                    warn!("skipping {}: {e}", Shown(&item.rel));
                    continue;
                }
            };
            pinned.proc_path()
        };
        seen += 1;
        let mode = item.stat.st_mode;
        let writes = if kind == FileType::Directory {
            let mut w = grant_one(&path, ACL_ACCESS, mode, uid, acl::R | acl::X)?.unwrap_or_default();
            w.extend(grant_one(&path, ACL_DEFAULT, mode, uid, acl::R | acl::X)?.unwrap_or_default());
            w
        } else {
            let perm = if mode & 0o111 != 0 { acl::R | acl::X } else { acl::R };
            grant_one(&path, ACL_ACCESS, mode, uid, perm)?.unwrap_or_default()
        };
        if !writes.is_empty() {
            write_acls(steps, &path, &item.rel, writes, granted)?;
            granted += 1;
        }
    }
    if granted == 0 {
        steps.ok(&format!("the backup user can read all {seen} entries under {}", root.display()));
    } else {
        println!(
            "{} the backup user read access to {granted} of {seen} entries",
            if steps.dry_run { "would give" } else { "gave" }
        );
    }
    Ok(())
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

/// Entries a dry run names before it only counts.
const DRY_RUN_LISTED: u64 = 20;

fn write_acls(steps: &Steps, path: &Path, rel: &[u8], writes: Writes, n: u64) -> Result<()> {
    let shown = if rel.is_empty() { ".".to_string() } else { Shown(rel).to_string() };
    if steps.dry_run {
        if n == 0 {
            println!("would: give the backup user read access (ACL u:UID:rX, and a default ACL on directories):");
        }
        if n < DRY_RUN_LISTED {
            println!("would:   {shown}");
        }
        return Ok(());
    }
    for (name, value) in writes {
        xattr::set_deref(path, std::ffi::OsStr::from_bytes(name), &value)
            .with_context(|| format!("setting the ACL of {shown}"))?;
    }
    Ok(())
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
    pub dry_run: bool,
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

    // 1. A key for this job only.
    if key.exists() {
        steps.ok(&format!("key {} exists", key.display()));
    } else {
        let comment = format!("rbackup-{}@{}", o.job, crate::notify::hostname());
        steps.run(&format!("create the key {} (ed25519, no passphrase: cron runs it)", key.display()), || {
            std::fs::create_dir_all(&keys)?;
            std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            let k = key.to_string_lossy();
            command("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f", &k])
        })?;
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
                if !answer.trim().eq_ignore_ascii_case("y") {
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
            crate::writer::replace_file(&Dir::open_path(&base)?, b"known_hosts", text.as_bytes(), 0o644)?;
            Ok(())
        })?;
    }

    // 3. The job's ssh config: this key, this known_hosts, strict checking.
    let mut cfg = format!("# rbackup job {}: written by `rbackup setup-client`\nHost {host}\n", o.job);
    if let Some(u) = &user {
        cfg.push_str(&format!("  User {u}\n"));
    }
    cfg.push_str(&format!(
        "  Port {port}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
        key.display(),
        known_hosts.display()
    ));
    if std::fs::read_to_string(&ssh_config).ok().as_deref() == Some(&cfg) {
        steps.ok(&format!("{} is up to date", ssh_config.display()));
    } else {
        steps.run(&format!("write {}", ssh_config.display()), || {
            let name = ssh_config.file_name().expect("a file name").as_bytes().to_vec();
            crate::writer::replace_file(&Dir::open_path(&base)?, &name, cfg.as_bytes(), 0o644)?;
            Ok(())
        })?;
    }

    // 4. The job in the config file.
    add_job(&steps, o, &ssh_config)?;

    // 5. What to run on the server.
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap_or_else(|_| "ssh-ed25519 AAAA… (created at the real run)".into());
    println!(
        "\nnow, on {host} as root:\n  rbackup setup-server --user {} --root {} --key '{}'",
        user.as_deref().unwrap_or("backupuser"),
        path.display(),
        pubkey.trim()
    );
    println!("then check the job with: rbackup -j {} check", o.job);
    Ok(())
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

fn add_job(steps: &Steps, o: &ClientOptions, ssh_config: &Path) -> Result<()> {
    let text = std::fs::read_to_string(&o.config).unwrap_or_default();
    if !text.is_empty() {
        let parsed = crate::config::parse(&text).map_err(|e| usage!("config file {}: {e}", o.config.display()))?;
        if let Some(job) = parsed.job.get(&o.job) {
            if job.source.as_deref() == Some(o.remote.as_str()) {
                steps.ok(&format!("job {} is in {}", o.job, o.config.display()));
                return Ok(());
            }
            bail!(usage!(
                "{} already has a job {} with source {:?}: choose another name or edit the file",
                o.config.display(),
                o.job,
                job.source.as_deref().unwrap_or("")
            ));
        }
    }
    let table = format!(
        "\n[job.{}]\nsource = \"{}\"\nbackups_folder = \"{}\"\nssh_config = \"{}\"\n",
        o.job,
        o.remote,
        o.backups_folder.display(),
        ssh_config.display()
    );
    steps.run(&format!("add job {} to {}", o.job, o.config.display()), || {
        let new = text.clone() + &table;
        crate::config::parse(&new).map_err(|e| anyhow!("the new job would not parse: {e}"))?;
        if let Some(dir) = o.config.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let dir = Dir::open_path(o.config.parent().unwrap_or(Path::new(".")))?;
        let name = o.config.file_name().ok_or_else(|| anyhow!("no file name"))?.as_bytes().to_vec();
        crate::writer::replace_file(&dir, &name, new.as_bytes(), 0o644)?;
        Ok(())
    })
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn forced_command_paths_are_quoted() {
        assert_eq!(quote(Path::new("/srv/content")).unwrap(), "/srv/content");
        assert_eq!(quote(Path::new("/srv/my content")).unwrap(), "'/srv/my content'");
        assert!(quote(Path::new("/srv/it's")).is_err());
    }
}
