//! The append-only agent: `rbackup serve --append-only --root R`, the
//! receiving end of `replicate --to host:R`, meant as the forced command of
//! a dedicated key on the off-site host.
//!
//! Roles swap as in a restore: the desktop serves the original snapshot as a
//! backup's source, and this agent takes it as a backup does — the same
//! `cmd::backup` run, store, `.incomplete`, links to the previous replica,
//! manifest, check and `RENAME_NOREPLACE` — so a replica over SSH is
//! crash-safe and resumable exactly like a local one.
//!
//! What makes it append-only is what the desktop can ask (docs/design.md
//! rule 11): the list of a job's snapshot folders, or the replica of one
//! snapshot named `NAME.dd-mm-yy_hh-mm-ss`, both names checked here, in R
//! itself and nowhere else. A stamp that is complete, or whose manifest
//! exists, is refused before anything is written, and again under the lock;
//! the run removes nothing (no superseded `.incomplete`, no prune), writes
//! only into its own `.incomplete` (whose shared inodes the sink replaces,
//! never modifies: rule 1) and the bookkeeping of that stamp, and names the
//! replica complete with `RENAME_NOREPLACE` only after every file's digest
//! equals the one the original's manifest, sent first, records.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::cmd::backup::{self, Replica, RunOptions};
use crate::config::{Job, SourceSpec};
use crate::fs::safefs::Dir;
use crate::store::{self, Store};
use crate::transport::link::Link;
use crate::transport::{Connection, Frames, Session};
use crate::wire::frame::Encoder;
use crate::wire::msg::{Hello, ReplicaAsk, Role, SinkMsg, SourceMsg};
use crate::wire::read_msg;

/// How long the desktop may be silent (or take nothing) before the agent
/// gives up: the desktop's own default.
const IDLE: Duration = Duration::from_secs(crate::config::DEFAULT_IO_TIMEOUT);

/// Runs the append-only agent for the backups folder `root` until the
/// desktop is done.
pub fn run(root: &Path) -> Result<()> {
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let conn = Connection::from_streams(stdin, stdout, "the desktop", Some(IDLE))?;
    let (hello, pending) = conn.accept()?;
    let ask = match check_hello(&hello, root) {
        Ok(ask) => ask,
        Err(reason) => return pending.refuse(&reason),
    };
    match ask {
        Ask::List(name) => {
            let held = match Store::open(root, &name).and_then(|s| s.snapshots()) {
                Ok(s) => s.into_iter().map(|s| s.folder).collect(),
                Err(e) => return pending.refuse(&format!("{e:#}")),
            };
            let mut session = pending.welcome(root.as_os_str().as_bytes())?;
            session.writer.write_all(&Encoder::new(false).msg(&SinkMsg::Held(held)))?;
            session.writer.flush()?;
            drop(session.writer);
            session.conn.finish()
        }
        Ask::Write { name, time, folder } => {
            if let Err(reason) = check_free(root, &name, &folder) {
                return pending.refuse(&reason);
            }
            let session = pending.welcome(root.as_os_str().as_bytes())?;
            let compress = hello.options.compress;
            let result = take(root, &name, time, &folder, compress, session);
            // The session's streams are gone by now: the last word goes on
            // a link of its own, bounded like every other wait.
            let last = match &result {
                Ok((folder, problems)) => SinkMsg::Committed { folder: folder.clone(), problems: *problems },
                Err(e) => SinkMsg::Fatal(format!("{e:#}")),
            };
            let out = std::io::stdout().as_fd().try_clone_to_owned()?;
            let mut w = Link::new("the desktop", Some(IDLE)).writer(out)?;
            let _ = w.write_all(&Encoder::new(false).msg(&last)).and_then(|()| w.flush());
            result.map(|(done, _)| crate::info!("{done} is complete"))
        }
    }
}

/// What the desktop asked, checked.
#[derive(Debug)]
enum Ask {
    List(String),
    Write { name: String, time: chrono::DateTime<chrono::Utc>, folder: String },
}

/// Checks the hello: a replica's, for exactly this agent's root, naming a
/// job and (to write) one snapshot by its canonical folder name. The reason
/// of a refusal goes to the desktop.
fn check_hello(hello: &Hello, root: &Path) -> Result<Ask, String> {
    if hello.role != Role::Replica {
        return Err("this agent only takes replicas (it was started with --append-only, a replica key); \
                    backups need `rbackup serve --read-only`, restores `rbackup serve --write`"
            .into());
    }
    let asked = Path::new(std::ffi::OsStr::from_bytes(&hello.path));
    if normal(asked).is_none() || normal(asked) != normal(root) {
        return Err(format!(
            "this agent writes replicas only into {} (its --root), not {}",
            root.display(),
            asked.display()
        ));
    }
    match &hello.replica {
        None => Err("a replica's hello without its request".into()),
        Some(ReplicaAsk::List { name }) => {
            store::check_name(name).map_err(|e| format!("{e:#}"))?;
            Ok(Ask::List(name.clone()))
        }
        Some(ReplicaAsk::Write { folder }) => {
            let (name, time) = parse_snapshot(folder)?;
            Ok(Ask::Write { name, time, folder: folder.clone() })
        }
    }
}

/// `NAME.dd-mm-yy_hh-mm-ss`, only in the form rbackup itself writes it:
/// a valid job name (no `/`, no `..`), a valid stamp, no `.incomplete`.
fn parse_snapshot(folder: &str) -> Result<(String, chrono::DateTime<chrono::Utc>), String> {
    let bad = || format!("{folder:?} is not a snapshot's name (NAME.dd-mm-yy_hh-mm-ss)");
    let (name, stamp) = folder.rsplit_once('.').ok_or_else(bad)?;
    store::check_name(name).map_err(|e| format!("{e:#}"))?;
    let time = store::parse_stamp(stamp).ok_or_else(bad)?;
    if store::folder_name(name, time, true) != folder {
        return Err(bad());
    }
    Ok((name.to_string(), time))
}

/// A path's normal components: `/a//b/` and `/a/b` are one path.
fn normal(p: &Path) -> Option<Vec<&std::ffi::OsStr>> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Refuses a snapshot that R already holds complete, or whose manifest is
/// there: the only writes an append-only agent makes are to a stamp that
/// has neither.
fn check_free(root: &Path, name: &str, folder: &str) -> Result<(), String> {
    let store = Store::open(root, name).map_err(|e| format!("{e:#}"))?;
    let exists = |dir: &Dir, n: &str| dir.try_stat(n.as_bytes()).map(|s| s.is_some()).map_err(|e| e.to_string());
    if exists(store.dir(), folder)? {
        return Err(format!("{folder} is already complete here: an append-only agent never writes into it"));
    }
    let meta = format!("{name}.rbackup");
    if let Some(meta) = store.dir().try_open_dir(meta.as_bytes()).map_err(|e| e.to_string())?
        && let Some(manifests) = meta.try_open_dir(b"manifests").map_err(|e| e.to_string())?
        && exists(&manifests, &crate::store::manifest::file_name(folder))?
    {
        return Err(format!("the manifest of {folder} is already here: an append-only agent never replaces it"));
    }
    Ok(())
}

/// Takes the replica of `folder` over `session`: receives the original's
/// manifest, then runs a backup of the desktop's snapshot into R. Returns
/// the complete replica's name and the problems the run had.
fn take(
    root: &Path,
    name: &str,
    time: chrono::DateTime<chrono::Utc>,
    folder: &str,
    compress: bool,
    mut session: Session,
) -> Result<(String, u64)> {
    let store = Store::open(root, name)?;
    // The original's manifest is kept beside this stamp's own bookkeeping,
    // under the snapshot's name (the next try overwrites it), and removed
    // once the replica is checked.
    let originals = match store.meta_dir()?.try_open_dir(b"originals")? {
        Some(d) => d,
        None => store.meta_dir()?.create_dir(b"originals")?,
    };
    let present = receive_manifest(&mut session.reader, &originals, folder)?;
    let resume = store.snapshots()?.iter().any(|s| !s.complete && s.time == time);
    let job = job(root, name, folder, compress);
    let manifest = (originals.clone(), if present { folder.to_string() } else { String::new() });
    let opts = RunOptions { resume, dry_run: false, replica_of: Some(Replica { time, manifest }), append_only: true };
    let report = backup::run_session(&job, &opts, |_, _| Ok(session));
    let _ = originals.unlink(folder.as_bytes());
    let report = report?;
    let problems = report.problems.len() as u64;
    Ok((report.snapshot.ok_or_else(|| anyhow!("{folder} was not made"))?, problems))
}

/// Writes the manifest the desktop sends into `dir`, named `folder`;
/// `false` if the original has none.
fn receive_manifest(reader: &mut Frames, dir: &Dir, folder: &str) -> Result<bool> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, folder, flags, Mode::from_raw_mode(0o600))
        .context("keeping the original's manifest")?;
    let mut file = std::fs::File::from(fd);
    loop {
        match read_msg::<SourceMsg, _>(reader).context("receiving the original's manifest")? {
            SourceMsg::Manifest(piece) => file.write_all(&piece).context("keeping the original's manifest")?,
            SourceMsg::ManifestEnd { present } => return Ok(present),
            _ => bail!("protocol violation: the desktop sent something else before the manifest's end"),
        }
    }
}

/// The backup job that takes a replica of `folder` into `root`: the
/// desktop's snapshot, whole, as it holds it, with deltas against the
/// previous replica.
fn job(root: &Path, name: &str, folder: &str, compress: bool) -> Job {
    Job {
        job: name.to_string(),
        // Remote: changed files travel as deltas.
        source: Some(SourceSpec::Remote { user: None, host: "the desktop".into(), path: PathBuf::from(folder) }),
        backups_folder: root.to_path_buf(),
        name: name.to_string(),
        excludes: Vec::new(),
        log_file: None,
        devices: true,
        compress,
        remote_bin: String::new(),
        ssh_config: None,
        io_timeout: Some(IDLE),
        restore_to: None,
        metrics_file: None,
        email: None,
        prune: crate::store::rules::Rules::default(),
        prune_after_backup: false,
        replicas: Vec::new(),
        replicate_after_backup: false,
        pre_hook: None,
        post_hook: None,
        hook_timeout: crate::hooks::DEFAULT_TIMEOUT,
        one_file_system: false,
        bwlimit: 0,
        paths: Vec::new(),
        invocation: "rbackup".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_snapshot_names_are_taken() {
        assert!(parse_snapshot("srv.07-10-19_13-32-58").is_ok());
        for bad in [
            "srv.07-10-19_13-32-58.incomplete",
            "../srv.07-10-19_13-32-58",
            "a/srv.07-10-19_13-32-58",
            "..07-10-19_13-32-58",
            "srv.32-10-19_13-32-58",
            "srv.7-10-19_13-32-58",
            "srv.rbackup",
            "srv",
            ".07-10-19_13-32-58",
        ] {
            assert!(parse_snapshot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_root_is_the_only_folder_written() {
        let hello = |path: &str| Hello {
            role: Role::Replica,
            path: path.as_bytes().to_vec(),
            options: crate::wire::msg::SessionOptions::default(),
            version: String::new(),
            replica: Some(ReplicaAsk::List { name: "srv".into() }),
        };
        let root = Path::new("/srv/replicas");
        assert!(check_hello(&hello("/srv/replicas/"), root).is_ok());
        assert!(check_hello(&hello("/srv/replicas/x"), root).is_err());
        assert!(check_hello(&hello("/srv/replicas/.."), root).is_err());
        assert!(check_hello(&hello("/srv"), root).is_err());
        assert!(check_hello(&hello("srv/replicas"), Path::new("srv/replicas")).is_err(), "relative");
        let mut h = hello("/srv/replicas");
        h.role = Role::Source;
        assert!(check_hello(&h, root).unwrap_err().contains("only takes replicas"));
    }
}
