//! The backup user's `authorized_keys`: one line per key, its forced
//! command fixed by the server's admin; a key already there for another
//! root or command is refused, never rewritten.

use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::Steps;
use crate::agent::shell::split_words;
use crate::fs::safefs::Dir;
use crate::{usage, warn};

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

pub(super) fn comment(key: &str) -> String {
    key.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
}

/// The `authorized_keys` file as it will be, before anything is written.
pub(super) struct KeyPlan {
    file: PathBuf,
    line: String,
    /// The new content, or `None` if the file already holds the line.
    new: Option<String>,
}

/// The forced command of an `authorized_keys` line, if it has one.
pub(super) fn forced_command(line: &str) -> Option<&str> {
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
pub(super) fn plan_key(dir: &Path, blob: &str, line: &str) -> Result<KeyPlan> {
    let file = dir.join("authorized_keys");
    let old = match read_keys(dir) {
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
pub(super) fn keep_options(existing: &str, ours: &str) -> String {
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
pub(super) fn options_field(line: &str) -> &str {
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
pub(super) fn split_options(options: &str) -> Vec<&str> {
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
pub(super) fn key_conflict(
    file: &Path,
    n: usize,
    line: &str,
    existing: Option<&[String]>,
    wanted: &[String],
) -> String {
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
/// The `.ssh` folder `dir` opened without following a symlink at its own
/// name or at `authorized_keys` (the account's owner may have planted one,
/// to make root read or write another file): `None` if it doesn't exist.
fn open_ssh_dir(dir: &Path) -> std::io::Result<Option<Dir>> {
    let (Some(home), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(std::io::Error::other(format!("{} has no parent folder", dir.display())));
    };
    let home = Dir::open_path(home)?;
    match home.open_dir(name.as_bytes()) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(refused_symlink(e, &home, name.as_bytes(), dir)),
    }
}

/// A no-follow open of `name` in `parent` failed: if `name` is a symlink,
/// say so and what to do.
fn refused_symlink(e: std::io::Error, parent: &Dir, name: &[u8], path: &Path) -> std::io::Error {
    match parent.try_stat(name) {
        Ok(Some(st)) if crate::fs::safefs::file_type(&st) == rustix::fs::FileType::Symlink => std::io::Error::other(
            format!("{} is a symlink: not followed (as root); remove it and run again", path.display()),
        ),
        _ => e,
    }
}

/// The text of `dir/authorized_keys`, read without following a symlink.
fn read_keys(dir: &Path) -> std::io::Result<String> {
    let Some(d) = open_ssh_dir(dir)? else {
        return Err(std::io::ErrorKind::NotFound.into());
    };
    let mut text = String::new();
    let file = d
        .open_file(b"authorized_keys")
        .map_err(|e| refused_symlink(e, &d, b"authorized_keys", &dir.join("authorized_keys")))?;
    // At most what an authorized_keys file plausibly holds.
    file.take(16 << 20).read_to_string(&mut text)?;
    Ok(text)
}

pub(super) fn write_key(steps: &Steps, plan: &KeyPlan) -> Result<()> {
    let Some(new) = &plan.new else {
        steps.ok(&format!("{} already holds the key, confined", plan.file.display()));
        return Ok(());
    };
    let dir = plan.file.parent().expect("a file in a directory");
    steps.run(&format!("write {}: {}", plan.file.display(), plan.line), || {
        // Every step on a handle opened without following: the home's owner
        // can't redirect root's writes, chmod or chown with a symlink.
        let home_path = dir.parent().expect("a folder in a home");
        std::fs::create_dir_all(home_path)?;
        let home = Dir::open_path(home_path)?;
        let name = dir.file_name().expect("a named folder").as_bytes();
        let d = match open_ssh_dir(dir)? {
            Some(d) => d,
            None => home.create_dir(name)?,
        };
        let mode = if dir.starts_with("/root") { 0o700 } else { 0o755 };
        rustix::fs::fchmod(&d, rustix::fs::Mode::from_raw_mode(mode))?;
        rustix::fs::fchown(&d, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT))?;
        // sshd refuses keys in a home that others can write.
        let st = home.stat_self()?;
        if st.st_mode & 0o022 != 0 {
            rustix::fs::fchmod(&home, rustix::fs::Mode::from_raw_mode(st.st_mode & 0o7755))?;
        }
        crate::fs::writer::replace_file(&d, b"authorized_keys", new.as_bytes(), 0o644)?;
        Ok(())
    })
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
}
