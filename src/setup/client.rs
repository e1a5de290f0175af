//! `setup-client`: the desktop's keys, the server's host key (checked, then
//! pinned in the job's own `known_hosts`) and the job in the config file.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

use super::{Steps, command};
use crate::fs::safefs::Dir;
use crate::usage;

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
    let old = std::fs::read_to_string(&ssh_config).ok();
    // Blocks the admin added for other hosts (an off-site replica's alias,
    // a jump host) stay, after ours.
    if let Some(others) = old.as_deref().map(|o| other_blocks(o, &[alias.as_str(), host.as_str()]))
        && !others.is_empty()
    {
        cfg.push_str(&others);
    }
    if old.as_deref() == Some(&cfg) {
        steps.ok(&format!("{} is up to date", ssh_config.display()));
    } else {
        let name = ssh_config.file_name().expect("a file name").as_bytes().to_vec();
        if let Some(old) = &old {
            // The admin may have added to it (a ProxyJump, a timeout): their
            // version is kept beside it, not lost.
            let mut kept = name.clone();
            kept.extend_from_slice(b".before-setup-client");
            let shown = base.join(String::from_utf8_lossy(&kept).as_ref());
            steps.run(&format!("keep the current {} as {}", ssh_config.display(), shown.display()), || {
                crate::fs::writer::replace_file(&Dir::open_path(&base)?, &kept, old.as_bytes(), 0o644)?;
                Ok(())
            })?;
            crate::warn!(
                "{} is rewritten (its blocks for other hosts are kept); its previous version is kept as {}: if \
                 you changed its blocks for this server by hand, copy your changes back",
                ssh_config.display(),
                shown.display()
            );
        }
        steps.run(&format!("write {}", ssh_config.display()), || {
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
    let job = if o.config == Path::new(crate::config::DEFAULT_CONFIG) {
        format!("rbackup -j {}", o.job)
    } else {
        format!("rbackup -c {} -j {}", o.config.display(), o.job)
    };
    println!("then check the job with: {job} check");
    if restore {
        println!("and restore with: {job} restore (through {alias}, as root on {host})");
    }
    Ok(())
}

/// Creates an ed25519 key without a passphrase (cron runs it) unless it exists.
pub(super) fn create_key(steps: &Steps, key: &Path, comment: &str, purpose: &str) -> Result<()> {
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
pub(super) fn scan_host_key(host: &str, port: u16) -> Result<(String, String)> {
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
pub(super) fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Adds the job to the config file, or checks the one there; with
/// `restore_to`, sees that the job has it.
pub(super) fn add_job(steps: &Steps, o: &ClientOptions, ssh_config: &Path, restore_to: Option<&str>) -> Result<()> {
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

/// The admin's answer to a yes/no prompt: "y", or "yes" as ssh taught.
pub(super) fn accepts(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// The `Host` and `Match` blocks of an ssh config for hosts other than
/// `ours`, as they are written.
fn other_blocks(old: &str, ours: &[&str]) -> String {
    let mut out = String::new();
    let mut keep = false;
    for line in old.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_lowercase()) {
            Some(w) if w == "host" => keep = !words[1..].iter().any(|n| ours.contains(n)),
            Some(w) if w == "match" => keep = true,
            _ => {}
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
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
    fn blocks_for_other_hosts_are_kept_and_ours_are_not() {
        let old = "# rbackup job web\nHost web-restore\n  User root\nHost server\n  Port 22\n\
                   Host offsite-replica\n  HostName b2\n  User root\nMatch host x\n  Port 2\n";
        let kept = other_blocks(old, &["web-restore", "server"]);
        assert_eq!(kept, "Host offsite-replica\n  HostName b2\n  User root\nMatch host x\n  Port 2\n");
    }
}
