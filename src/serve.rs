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

use crate::cli::ServeArgs;
use crate::protocol::frame::{Encoder, FrameReader};
use crate::protocol::msg::{Hello, Reply, Role};
use crate::protocol::{SOFTWARE, read_msg, read_preamble, write_preamble};
use crate::safefs::Dir;
use crate::source::{self, Selection};

/// Runs the agent until the desktop is done.
pub fn run(args: &ServeArgs) -> Result<()> {
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
        (Role::Sink, false) => {
            return refuse(
                "this agent is read-only; restores need a key whose forced command is \
                 `rbackup serve --write --root DIR`"
                    .into(),
            );
        }
        _ => {}
    }
    let (root, root_path) = match open_root(args.root.as_deref(), &hello.path) {
        Ok(r) => r,
        Err(reason) => return refuse(reason),
    };
    stdout.write_all(
        &enc.msg(&Reply::Welcome { root: root_path.as_os_str().as_bytes().to_vec(), version: SOFTWARE.to_string() }),
    )?;
    stdout.flush()?;

    match hello.role {
        Role::Source => {
            let selection = Selection::new(&hello.options.excludes, &hello.options.only)?;
            source::run(root, selection, hello.options.compress, reader, stdout)
        }
        Role::Sink => bail!("restores are not supported by this agent yet"),
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
fn open_root(root: Option<&Path>, requested: &[u8]) -> Result<(Dir, PathBuf), String> {
    if requested.contains(&0) {
        return Err("the requested path contains a NUL byte".into());
    }
    let requested = Path::new(std::ffi::OsStr::from_bytes(requested));
    let wanted = components(requested)?;
    let Some(root) = root else {
        let dir = Dir::open_path(requested).map_err(|e| format!("cannot open {}: {e}", requested.display()))?;
        return Ok((dir, requested.to_path_buf()));
    };
    let base = components(root)?;
    if wanted.len() < base.len() || wanted[..base.len()] != base[..] {
        return Err(format!("{} is outside the directory this agent serves ({})", requested.display(), root.display()));
    }
    let root_dir = Dir::open_path(root).map_err(|e| format!("cannot open the served root {}: {e}", root.display()))?;
    let rest = &wanted[base.len()..];
    if rest.is_empty() {
        return Ok((root_dir, root.to_path_buf()));
    }
    let rel = rest.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
    let dir = root_dir.resolve_dir(&rel).map_err(|e| {
        format!("cannot open {} beneath {} without following symlinks: {e}", requested.display(), root.display())
    })?;
    Ok((dir, requested.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_root_are_refused() {
        let err = open_root(Some(Path::new("/srv/content")), b"/etc").unwrap_err();
        assert!(err.contains("outside"), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"/srv/contentx").unwrap_err();
        assert!(err.contains("outside"), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"/srv/content/../../etc").unwrap_err();
        assert!(err.contains(".."), "{err}");
        let err = open_root(Some(Path::new("/srv/content")), b"srv/content").unwrap_err();
        assert!(err.contains("not absolute"), "{err}");
    }

    #[test]
    fn the_root_and_beneath_are_served() {
        let tmp = std::env::temp_dir();
        let (_, p) = open_root(Some(&tmp), tmp.as_os_str().as_bytes()).unwrap();
        assert_eq!(p, tmp);
        let mut slash = tmp.as_os_str().as_bytes().to_vec();
        slash.extend_from_slice(b"//");
        assert!(open_root(Some(&tmp), &slash).is_ok());
    }
}
