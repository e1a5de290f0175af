//! The backup user's `authorized_keys`: one line per key, its forced
//! command fixed by the server's admin; a key already there for another
//! root or command is refused, never rewritten.

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
pub(super) fn write_key(steps: &Steps, plan: &KeyPlan) -> Result<()> {
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
