//! The agent: `rbackup serve`, speaking the protocol on stdin/stdout.
//!
//! It is meant to run as a forced command (`restrict,command="rbackup serve
//! --read-only --root /srv/content"`), so it trusts nothing the desktop says:
//! the path asked for in the handshake is served only if it is the root or
//! beneath it, resolved without following symlinks. `--read-only` (the
//! default) can only send; `--write` can only receive. Logs go to stderr;
//! stdout carries nothing but protocol.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::fs::meta::Privileges;
use crate::fs::safefs::{Dir, Shown, libc_errno};
use crate::plan::Policy;
use crate::report::{Events, Problem};
use crate::sink::{Sink, SinkConfig};
use crate::source::{self, Selection};
use crate::wire::frame::{Encoder, FrameReader};
use crate::wire::msg::{Hello, LogKind, Reply, Role, SessionOptions, SinkMsg};
use crate::wire::{Outbox, SOFTWARE, read_msg, read_preamble, write_preamble};

/// What the agent may do, fixed by the server's admin in the forced command.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Receive data (restores) instead of sending it.
    pub write: bool,
    /// Take replicas into the root, append-only ([`super::append`]).
    pub append_only: bool,
    /// Serve only this directory and what is beneath it.
    pub root: Option<std::path::PathBuf>,
    /// Run before each backup lists the root (see `hooks`).
    pub before: Option<String>,
    pub before_timeout: std::time::Duration,
    /// Write role: leave the metadata of the root itself as it is.
    pub keep_root_metadata: bool,
}

/// Runs the agent until the desktop is done.
pub fn run(args: &ServeOptions) -> Result<()> {
    if args.append_only {
        let root = args.root.as_deref().context("--append-only needs --root: the backups folder replicas go into")?;
        return super::append::run(root);
    }
    let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut stdout = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    write_preamble(&mut stdout)?;
    let mut stdin = stdin;
    read_preamble(&mut stdin, "desktop")?;
    let mut reader = FrameReader::new(stdin);
    let hello: Hello = read_msg(&mut reader).context("reading the desktop's hello")?;

    let mut enc = Encoder::new(false);
    let mut refuse = |reason: String| -> Result<()> {
        stdout.write_all(&enc.msg(&Reply::Refused { reason: reason.clone() }))?;
        stdout.flush()?;
        bail!("refused: {reason}")
    };
    match (hello.role, args.write) {
        (Role::Source, true) => {
            return refuse(
                "this agent only receives (it was started with --write, a restore key); backups need \
                 `rbackup serve --read-only`"
                    .into(),
            );
        }
        (Role::Replica, _) => {
            return refuse(
                "this agent doesn't take replicas; they need a key whose forced command is \
                 `rbackup serve --append-only --root DIR`"
                    .into(),
            );
        }
        (Role::Sink, false) => {
            return refuse(
                "this agent is read-only; restores need a key whose forced command is \
                 `rbackup serve --write --root DIR`"
                    .into(),
            );
        }
        _ => {}
    }
    let create = match hello.role {
        Role::Source => Create::No,
        Role::Sink if hello.options.dry_run => Create::Pretend,
        Role::Sink => Create::Yes,
        Role::Replica => unreachable!("refused above"),
    };
    let (root, root_path) = match open_root(args.root.as_deref(), &hello.path, create) {
        Ok(r) => r,
        Err(reason) => return refuse(reason),
    };
    // The admin's command before a backup's listing: not for `check` or a
    // dry run (which only look), and it must finish within the desktop's
    // io_timeout, which is waiting for this answer.
    if let (Some(before), Role::Source, false) = (&args.before, hello.role, hello.options.probe_read) {
        let env = [("RBACKUP_ROOT", root_path.display().to_string())];
        if let Err(e) = crate::hooks::run("before", before, &env, args.before_timeout, crate::hooks::Output::Stderr) {
            return refuse(format!("the server's --before command failed: {e:#}"));
        }
    }
    stdout.write_all(
        &enc.msg(&Reply::Welcome { root: root_path.as_os_str().as_bytes().to_vec(), version: SOFTWARE.to_string() }),
    )?;
    stdout.flush()?;

    match hello.role {
        Role::Source => {
            let root = root.expect("a source's root exists: Create::No never pretends");
            let options = &hello.options;
            let mut selection = Selection::new(&options.excludes, &options.only)?;
            selection.probe_read = options.probe_read;
            selection.one_file_system = options.one_file_system;
            // A backup's listing is the snapshot: chosen `paths` are whole.
            selection.whole_on_the_way = true;
            source::run(root, selection, options.compress, options.bwlimit, &mut reader, stdout, &mut |_, _| {})?;
            Ok(())
        }
        Role::Sink => receive(root, &hello.options, args.keep_root_metadata, reader, stdout),
        Role::Replica => unreachable!("refused above"),
    }
}

/// The write agent: a restore's sink, writing beneath its root. Everything it
/// does and every problem goes back to the desktop as log lines.
fn receive(
    root: Option<Dir>,
    options: &SessionOptions,
    keep_root: bool,
    reader: FrameReader<File>,
    stdout: File,
) -> Result<()> {
    let privs = match &root {
        Some(root) => Privileges::current().storing_on(root).into_live_tree(),
        None => Privileges::current().into_live_tree(),
    };
    let cfg = SinkConfig {
        fresh: root.is_none(),
        dest: root,
        policy: Policy::Restore,
        delete: options.delete,
        dry_run: options.dry_run,
        devices: options.devices,
        delta: options.delta,
        privs,
        compress: options.compress,
        keep_root,
        ..SinkConfig::default()
    };
    let threads = crate::session::SinkThreads::start(reader, stdout, &cfg);
    let mut events = Forward { out: threads.out.clone(), enc: Encoder::new(options.compress) };
    let result = Sink::new(cfg, threads.out.clone(), &mut events).run(&threads.incoming);
    if let Err(e) = &result {
        let _ = threads.out.send(Encoder::new(options.compress).msg(&SinkMsg::Fatal(format!("{e:#}"))));
    }
    drop(events);
    let written = threads.end_without_reader();
    result?;
    written.context("writing to the desktop")?;
    Ok(())
}

/// Sends the sink's reports to the desktop.
struct Forward {
    out: Outbox,
    enc: Encoder,
}

impl Forward {
    fn send(&mut self, kind: LogKind, text: String) {
        let _ = self.out.send(self.enc.msg(&SinkMsg::Log { kind, text }));
    }
}

impl Events for Forward {
    fn action(&mut self, verb: &str, path: &[u8]) {
        let path = if path.is_empty() { ".".to_string() } else { format!("{:#}", Shown(path)) };
        self.send(LogKind::Action, format!("{verb:<8} {path}"));
    }

    fn problem(&mut self, problem: Problem) {
        self.send(LogKind::Problem, problem.to_string());
    }

    fn note(&mut self, text: &str) {
        self.send(LogKind::Note, text.to_string());
    }
}

/// The normal components of an absolute path, or an error naming it.
fn components(path: &Path) -> Result<Vec<&std::ffi::OsStr>, String> {
    if !path.is_absolute() {
        return Err(format!("the path {} is not absolute", path.display()));
    }
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("the path {} contains `..`", path.display()));
            }
        }
    }
    Ok(out)
}

/// Opens what the desktop asked for: with `--root R`, only R or a directory
/// beneath it, reached without following symlinks below R.
/// With `Create::Yes` (a restore), missing directories beneath the root are
/// created, one handle at a time, mode 0700 until the restore sets theirs;
/// with `Create::Pretend` (a restore's dry run) a missing one means no
/// directory yet (`None`): everything would be created.
fn open_root(root: Option<&Path>, requested: &[u8], create: Create) -> Result<(Option<Dir>, PathBuf), String> {
    if requested.contains(&0) {
        return Err("the requested path contains a NUL byte".into());
    }
    let requested = Path::new(std::ffi::OsStr::from_bytes(requested));
    let wanted = components(requested)?;
    let Some(root) = root else {
        if !requested.exists() {
            match create {
                Create::Yes => std::fs::DirBuilder::new()
                    .recursive(true)
                    .create(requested)
                    .map_err(|e| format!("cannot create {}: {e}", requested.display()))?,
                Create::Pretend => return Ok((None, requested.to_path_buf())),
                Create::No => {}
            }
        }
        let dir = Dir::open_path(requested).map_err(|e| format!("cannot open {}: {e}", requested.display()))?;
        return Ok((Some(dir), requested.to_path_buf()));
    };
    let base = components(root)?;
    if wanted.len() < base.len() || wanted[..base.len()] != base[..] {
        return Err(format!("{} is outside the directory this agent serves ({})", requested.display(), root.display()));
    }
    let root_dir = match Dir::open_path(root) {
        Ok(d) => d,
        // A local restore's target is served as the root itself.
        Err(e) if matches!(create, Create::Pretend) && e.raw_os_error() == Some(libc_errno::ENOENT) => {
            return Ok((None, requested.to_path_buf()));
        }
        Err(e) => return Err(format!("cannot open the served root {}: {e}", root.display())),
    };
    let rest = &wanted[base.len()..];
    if rest.is_empty() {
        return Ok((Some(root_dir), root.to_path_buf()));
    }
    let mut dir = root_dir;
    for c in rest {
        let name = c.as_bytes();
        let missing = |e: &std::io::Error| e.raw_os_error() == Some(libc_errno::ENOENT);
        dir = match (dir.open_dir(name), create) {
            (Ok(d), _) => Ok(d),
            (Err(e), Create::Yes) if missing(&e) => dir.create_dir(name),
            (Err(e), Create::Pretend) if missing(&e) => return Ok((None, requested.to_path_buf())),
            (Err(e), _) => Err(e),
        }
        .map_err(|e| {
            format!("cannot open {} beneath {} without following symlinks: {e}", requested.display(), root.display())
        })?;
    }
    Ok((Some(dir), requested.to_path_buf()))
}

/// Whether [`open_root`] creates what is missing of the requested path.
#[derive(Clone, Copy)]
enum Create {
    No,
    Yes,
    Pretend,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_root_are_refused() {
        let err = open_root(Some(Path::new("/srv/content")), b"/etc", Create::No).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"/srv/contentx", Create::No).unwrap_err();
        assert!(err.contains("outside"), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"/srv/content/../../etc", Create::No).unwrap_err();
        assert!(err.contains(".."), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"srv/content", Create::No).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");
    }

    #[test]
    fn the_root_and_beneath_are_served() {
        let tmp = std::env::temp_dir();
        let (_, p) = open_root(Some(&tmp), tmp.as_os_str().as_bytes(), Create::No).unwrap();
        assert_eq!(p, tmp);
        let mut slash = tmp.as_os_str().as_bytes().to_vec();
        slash.extend_from_slice(b"//");
        assert!(open_root(Some(&tmp), &slash, Create::No).is_ok());
    }
}
