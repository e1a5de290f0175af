//! The man pages the package installs (`rbackup man --dir`): a page per
//! command, every `rbackup…(N)` reference naming a page that exists, the
//! sections a reader looks for, and roff that groff renders without a warning.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use clap::CommandFactory;

fn generate(dir: &Path) -> Vec<PathBuf> {
    let (code, out, err) = run(&[OsStr::new("man"), OsStr::new("--dir"), dir.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<PathBuf> = out.lines().map(PathBuf::from).collect();
    for p in &listed {
        assert!(p.is_file(), "{} listed but not written", p.display());
    }
    listed
}

/// The page as a reader sees it: groff's plain-text rendering, 80 columns.
fn rendered(page: &Path) -> String {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-rLL=80n", "-P-cbou"])
        .arg(page)
        .output()
        .expect("groff is installed by scripts/install-deps.sh (groff-base)");
    assert!(out.status.success(), "groff failed on {}", page.display());
    String::from_utf8(out.stdout).unwrap()
}

/// `name(N)` references in rendered text.
fn references(text: &str) -> Vec<(String, String)> {
    let mut refs = Vec::new();
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('(') {
        let Some(close) = text[i..].find(')') else { continue };
        let section = &text[i + 1..i + close];
        if section.len() != 1 || !section.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let start = text[..i].rfind(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c))).map_or(0, |s| s + 1);
        if start < i && bytes[start].is_ascii_alphabetic() {
            refs.push((text[start..i].to_string(), section.to_string()));
        }
    }
    refs
}

#[test]
fn every_command_has_a_page_and_every_reference_resolves() {
    let tmp = scratch();
    let listed = generate(tmp.path());
    let names: Vec<String> = listed.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let mut cmd = rbackup::cli::Cli::command();
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let page = format!("rbackup-{}.1", sub.get_name());
        assert!(names.contains(&page), "no page {page} in {names:?}");
    }
    for page in ["rbackup.1", "rbackup.toml.5"] {
        assert!(names.contains(&page.to_string()), "no page {page} in {names:?}");
    }
    for path in &listed {
        let text = rendered(path);
        let refs = references(&text);
        assert!(refs.iter().any(|(n, _)| n == "rbackup"), "{} refers to no rbackup page", path.display());
        for (name, section) in refs.iter().filter(|(n, _)| n.starts_with("rbackup")) {
            let target = tmp.path().join(format!("{name}.{section}"));
            assert!(target.is_file(), "{} refers to {name}({section}), which is not generated", path.display());
        }
        // Docs are referred to where the package installs them.
        for (i, _) in text.match_indices("docs/") {
            assert!(
                text[..i].ends_with("/usr/share/"),
                "{} points at a source-tree path: …{}…",
                path.display(),
                &text[i.saturating_sub(30)..(i + 30).min(text.len())]
            );
        }
    }
}

#[test]
fn every_page_renders_without_groff_warnings() {
    let tmp = scratch();
    for path in generate(tmp.path()) {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&path)
            .output()
            .expect("groff is installed by scripts/install-deps.sh (groff-base)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{}: {err}", path.display());
    }
}

#[test]
fn the_pages_say_options_exit_status_files_and_config_keys() {
    let tmp = scratch();
    generate(tmp.path());
    let page = |name: &str| rendered(&tmp.path().join(name));

    let main = page("rbackup.1");
    for want in ["EXIT STATUS", "FILES", "SEE ALSO", "/etc/rbackup/rbackup.toml", "/etc/rbackup/keys/", "NAME.rbackup/"]
    {
        assert!(main.contains(want), "rbackup(1) lacks {want:?}:\n{main}");
    }
    for code in ["0", "1", "2", "3", "23", "24", "75"] {
        assert!(main.lines().any(|l| l.trim_start().starts_with(&format!("{code} "))), "exit code {code}:\n{main}");
    }
    assert!(!main.contains("exit-codes.md"), "the page has its own EXIT STATUS:\n{main}");

    // A command's page has its own options, not only the global ones.
    let backup = page("rbackup-backup.1");
    for want in ["--source", "--exclude", "--dry-run", "--backups-folder", "--job", "EXIT STATUS"] {
        assert!(backup.contains(want), "rbackup-backup(1) lacks {want}:\n{backup}");
    }
    let restore = page("rbackup-restore.1");
    assert!(
        restore.contains("--snapshot") && restore.contains("--delete") && restore.contains("EXAMPLES"),
        "{restore}"
    );
    let client = page("rbackup-setup-client.1");
    assert!(client.contains("--port") && client.contains("--restore"), "{client}");

    let config = page("rbackup.toml.5");
    for key in
        ["source", "backups_folder", "restore_to", "keep_within", "prune_after_backup", "password_file", "send_on"]
    {
        assert!(config.contains(key), "rbackup.toml(5) lacks {key}:\n{config}");
    }
    assert!(config.contains("FILES") && config.contains("EXAMPLE"), "{config}");
}

#[test]
fn man_without_dir_prints_the_main_page() {
    let tmp = scratch();
    generate(tmp.path());
    let (code, out, err) = run(&[OsStr::new("man")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, std::fs::read_to_string(tmp.path().join("rbackup.1")).unwrap());
}
