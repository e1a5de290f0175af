//! The backup user's login shell: sshd runs `rbackup -c COMMAND` for it, and
//! the only command it runs is the agent (`rbackup serve …`, split into
//! words without a shell); anything else is refused. Whatever the key's
//! forced command says, the account can't run anything but rbackup.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Result, anyhow, bail};

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
pub fn split_words(s: &str) -> Option<Vec<String>> {
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
}
