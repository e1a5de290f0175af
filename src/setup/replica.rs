//! `setup-server --mode replica`: the off-site host of `replicate --to
//! host:R`. It makes the replica root R (0700, like a backups folder) and
//! confines the desktop's replica key, in root's `authorized_keys`, to
//! `restrict,command="rbackup serve --append-only --root R"`.
//!
//! Root, not a dedicated user: a replica must keep the original's numeric
//! owners, setuid bits, `trusted.*` attributes and device nodes, which only
//! root (or a binary holding `CAP_CHOWN`, `CAP_FOWNER`, `CAP_DAC_OVERRIDE`,
//! `CAP_SYS_ADMIN` and `CAP_MKNOD`, which is root by another name) can
//! write. What confines the key is the forced command: `restrict` (no pty,
//! no forwarding), and an agent that can only take replicas into R and never
//! remove or change a complete one (docs/design.md rule 11) — the same
//! confinement as the restore key's `serve --write`.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Result, bail};

use super::keys::{check_key, comment, plan_key, write_key};
use super::server::{ServerOptions, check_root_login};
use super::{Steps, quote};
use crate::{info, usage, warn};

/// Prepares this host to take replicas from the desktop whose key is `o.key`.
pub(super) fn replica(o: &ServerOptions) -> Result<()> {
    if !rustix::process::geteuid().is_root() && !o.dry_run {
        bail!("setup-server --mode replica needs root (the key goes into root's authorized_keys)");
    }
    if !o.user.is_empty() && o.user != "root" {
        warn!("--mode replica: the agent runs as root (it keeps the replicas' owners); --user {} is not used", o.user);
    }
    let (kind, blob) = check_key(&o.key)?;
    if !o.root.is_absolute() {
        bail!(usage!("--root {} must be an absolute path", o.root.display()));
    }
    let exe = std::env::current_exe()?.canonicalize()?;
    let steps = Steps { dry_run: o.dry_run };

    // The root as the forced command will name it; made only once the key
    // is known to be acceptable (a refused key changes nothing).
    let root = match (o.root.canonicalize(), o.root.parent().zip(o.root.file_name())) {
        (Ok(r), _) => r,
        (Err(_), Some((parent, name))) => parent.canonicalize().map_or_else(|_| o.root.clone(), |p| p.join(name)),
        (Err(_), None) => o.root.clone(),
    };
    let line = format!(
        "restrict,command=\"{} serve --append-only --root {}\" {kind} {blob} {}",
        quote(&exe)?,
        quote(&root)?,
        comment(&o.key)
    );
    let key = plan_key(Path::new("/root/.ssh"), &blob, line.trim_end())?;
    if o.root.is_dir() {
        steps.ok(&format!("{} exists", o.root.display()));
    } else {
        steps.run(&format!("create {} (0700)", o.root.display()), || {
            Ok(std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&o.root)?)
        })?;
    }
    write_key(&steps, &key)?;
    check_root_login();
    if o.dry_run {
        info!("dry run: nothing was changed; run the same command without --dry-run to set up the replica host");
        return Ok(());
    }
    let host = crate::notify::hostname();
    info!(
        "replica host ready. On the desktop, in the job's ssh_config, a Host alias for the replica key \
         (IdentityFile: the private half of the key given here, JOB the job's name):\n\n  \
         Host offsite-replica\n    HostName {host}\n    User root\n    IdentityFile \
         /etc/rbackup/keys/JOB-replica\n    IdentitiesOnly yes\n    UserKnownHostsFile \
         /etc/rbackup/known_hosts\n    StrictHostKeyChecking yes\n\nthen in the job: replicas = \
         [\"offsite-replica:{}\"] (docs/replicate.md, step 3)",
        root.display()
    );
    Ok(())
}
