//! The man pages: rbackup(1) for the tool, one rbackup-COMMAND(1) per command
//! and rbackup.toml(5) for the configuration file.
//!
//! The command pages come from the clap definitions (through `clap_mangen`), so
//! they say what `--help` says. The configuration keys, the exit codes and the
//! files rbackup keeps are rendered from the tables of docs/configuration.md
//! and docs/exit-codes.md: the pages and the docs can't say different things,
//! and the tests below hold those tables to the config structs and to
//! [`crate::error::Code`], so neither can drift from the code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_mangen::Man;

const CONFIGURATION: &str = include_str!("../../docs/configuration.md");
const EXIT_CODES: &str = include_str!("../../docs/exit-codes.md");
const EXAMPLE_CONFIG: &str = include_str!("../../examples/rbackup.toml");

/// Where the package installs docs/*.md (and examples/).
pub const DOC_DIR: &str = "/usr/share/doc/rbackup";

/// The heading of the files table in docs/configuration.md.
const FILES_HEADING: &str = "Files rbackup keeps";

/// One generated page.
pub struct Page {
    /// `rbackup.1`, `rbackup-backup.1`, `rbackup.toml.5`.
    pub file_name: String,
    pub roff: String,
}

/// The command as the pages show it: no `help` subcommand (it has no page;
/// `--help` is on every page).
fn command() -> clap::Command {
    let mut cmd = crate::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// rbackup(1).
pub fn main_page() -> Result<Page> {
    command_page(&command(), None)
}

/// Every page: rbackup(1), one per command, rbackup.toml(5).
pub fn all() -> Result<Vec<Page>> {
    let cmd = command();
    let mut pages = vec![command_page(&cmd, None)?];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push(command_page(sub, Some(sub.get_name()))?);
    }
    pages.push(config_page());
    Ok(pages)
}

/// Writes every page into `dir` (created if missing); returns their paths.
pub fn write_to(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for page in all()? {
        let path = dir.join(&page.file_name);
        std::fs::write(&path, page.roff.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// A section-1 page: `clap_mangen`'s sections, then examples, exit status,
/// files (on the main page) and see also.
fn command_page(cmd: &clap::Command, sub: Option<&str>) -> Result<Page> {
    let man = Man::new(cmd.clone()).source(format!("rbackup {}", env!("CARGO_PKG_VERSION"))).manual("rbackup manual");
    let file_name = man.get_filename();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut part = |f: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| -> Result<()> {
        let mut out = Vec::new();
        f(&mut out)?;
        parts.push(out);
        Ok(())
    };
    part(&|w| man.render_title(w))?;
    part(&|w| man.render_name_section(w))?;
    part(&|w| man.render_synopsis_section(w))?;
    part(&|w| man.render_description_section(w))?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        part(&|w| man.render_options_section(w))?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        part(&|w| man.render_subcommands_section(w))?;
    }
    // Each part starts with the same string definition; keep the first.
    let mut page = String::new();
    for (i, p) in parts.iter().enumerate() {
        let text = String::from_utf8_lossy(p);
        let text = if i == 0 { &text[..] } else { text.strip_prefix(APOSTROPHE_PREAMBLE).unwrap_or(&text) };
        page.push_str(text);
        if i == 0 {
            page.push_str(LAYOUT);
        }
    }
    if let Some(after) = cmd.get_after_help() {
        examples(&mut page, &after.to_string());
    }
    page.push_str(".SH \"EXIT STATUS\"\n");
    table(&mut page, &first_table(EXIT_CODES, None));
    if sub.is_none() {
        page.push_str(".SH FILES\n");
        table(&mut page, &first_table(CONFIGURATION, Some(FILES_HEADING)));
    }
    see_also(&mut page, cmd, sub);
    page.push_str(&format!(".SH VERSION\nv{}\n", env!("CARGO_PKG_VERSION")));
    Ok(Page { file_name, roff: ascii(&installed_doc_paths(&page)) })
}

/// After the title: left-aligned, no hyphenation (option and file names
/// must not be split).
const LAYOUT: &str = ".ad l\n.nh\n";

/// What `clap_mangen`'s `Roff` writes before every part it renders.
const APOSTROPHE_PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// The `after_help` text as EXAMPLES, kept as laid out. The exit-code note
/// of `--help` is left out: the page has its own EXIT STATUS.
fn examples(page: &mut String, text: &str) {
    let paragraphs: Vec<&str> = text.split("\n\n").filter(|p| !p.starts_with("Exit codes:")).collect();
    let text = paragraphs.join("\n\n");
    let text = text.strip_prefix("Examples:\n").unwrap_or(&text);
    page.push_str(".SH EXAMPLES\n.nf\n");
    for line in text.lines() {
        page.push_str(&escape_line(&escape(line)));
        page.push('\n');
    }
    page.push_str(".fi\n");
}

/// Other pages of a command, and the guide that explains it.
fn related(sub: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match sub {
        "backup" | "continue" => (&["list", "prune", "check"], &["backup.md", "scheduling.md"]),
        "list" | "diff" | "verify" => (&["backup", "restore"], &["backup.md"]),
        "prune" => (&["list"], &["retention.md"]),
        "restore" => (&["list", "diff", "setup-client"], &["restore.md"]),
        "history" => (&["diff", "restore"], &["restore.md"]),
        "test-email" => (&["check"], &["email.md"]),
        "setup-server" => (&["setup-client", "check", "serve"], &["setup.md", "security.md"]),
        "setup-client" => (&["setup-server", "check", "restore"], &["setup.md", "restore.md"]),
        "check" => (&["setup-client", "setup-server"], &["troubleshooting.md"]),
        "serve" => (&["setup-server"], &["security.md"]),
        _ => (&[], &[]),
    }
}

fn see_also(page: &mut String, cmd: &clap::Command, sub: Option<&str>) {
    let mut refs: Vec<String> = Vec::new();
    let docs: Vec<&str> = match sub {
        None => {
            refs.extend(
                cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| format!("rbackup-{}", s.get_name())),
            );
            refs.push("rbackup.toml(5)".into());
            for r in ["ssh(1)", "ssh_config(5)", "sshd(8)", "setfacl(1)", "systemd.timer(5)"] {
                refs.push(r.into());
            }
            Vec::new()
        }
        Some(sub) => {
            let (pages, docs) = related(sub);
            refs.push("rbackup".into());
            refs.extend(pages.iter().map(|p| format!("rbackup-{p}")));
            refs.push("rbackup.toml(5)".into());
            docs.to_vec()
        }
    };
    page.push_str(".SH \"SEE ALSO\"\n");
    let shown: Vec<String> = refs
        .iter()
        .map(|r| {
            let (name, section) = r.strip_suffix(')').and_then(|r| r.split_once('(')).unwrap_or((r, "1"));
            format!("\\fB\\%{}\\fR({section})", escape(name))
        })
        .collect();
    page.push_str(&shown.join(",\n"));
    page.push('\n');
    page.push_str(".PP\nThe guides are in ");
    page.push_str(&format!("\\fI{}/\\fR", escape(DOC_DIR)));
    if docs.is_empty() {
        page.push_str(", starting with \\fIsetup.md\\fR.\n");
    } else {
        let names: Vec<String> = docs.iter().map(|d| format!("\\fI{}\\fR", escape(d))).collect();
        page.push_str(&format!(": see {}.\n", names.join(" and ")));
    }
}

/// rbackup.toml(5), from docs/configuration.md.
fn config_page() -> Page {
    let version = env!("CARGO_PKG_VERSION");
    let mut page = format!(
        "{APOSTROPHE_PREAMBLE}.TH rbackup.toml 5 \"\" \"rbackup {version}\" \"rbackup manual\"\n{LAYOUT}.SH NAME\n\
         rbackup.toml \\- the jobs and mail settings of rbackup(1)\n.SH SYNOPSIS\n\\fI/etc/rbackup/rbackup.toml\\fR\n\
         .SH DESCRIPTION\n"
    );
    for section in sections(CONFIGURATION) {
        match section.heading {
            None => {}
            Some(h) if h == FILES_HEADING => page.push_str(".SH FILES\n"),
            Some(h) => {
                let h = h.replace('`', "");
                page.push_str(&format!(".SH \"{}\"\n", escape(&h)));
            }
        }
        for block in section.blocks {
            match block {
                Block::Paragraph(text) => {
                    page.push_str(".PP\n");
                    page.push_str(&escape_line(&inline(&text)));
                    page.push('\n');
                }
                Block::Table(rows) => table(&mut page, &rows),
            }
        }
    }
    page.push_str(".SH EXAMPLE\n.nf\n");
    for line in EXAMPLE_CONFIG.lines() {
        page.push_str(&escape_line(&escape(line)));
        page.push('\n');
    }
    page.push_str(
        ".fi\n.SH \"SEE ALSO\"\n\\fBrbackup\\fR(1), \\fBrbackup\\-setup\\-client\\fR(1), \\fBssh_config\\fR(5)\n",
    );
    Page { file_name: "rbackup.toml.5".into(), roff: ascii(&installed_doc_paths(&page)) }
}

/// A piece of a Markdown file.
enum Block {
    Paragraph(String),
    /// Header row first; cells still in Markdown.
    Table(Vec<Vec<String>>),
}

struct Section<'a> {
    /// The `## ` heading, `None` for the text before the first one.
    heading: Option<&'a str>,
    blocks: Vec<Block>,
}

/// Splits Markdown at its `## ` headings into paragraphs and tables (all
/// our docs' tables and text need). The `# ` title is dropped.
fn sections(md: &str) -> Vec<Section<'_>> {
    let mut out = vec![Section { heading: None, blocks: Vec::new() }];
    let mut para: Vec<&str> = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let flush = |out: &mut Vec<Section>, para: &mut Vec<&str>, rows: &mut Vec<Vec<String>>| {
        let blocks = &mut out.last_mut().expect("a section").blocks;
        if !para.is_empty() {
            blocks.push(Block::Paragraph(para.join(" ")));
            para.clear();
        }
        if !rows.is_empty() {
            blocks.push(Block::Table(std::mem::take(rows)));
        }
    };
    for line in md.lines() {
        let line = line.trim_end();
        if let Some(h) = line.strip_prefix("## ") {
            flush(&mut out, &mut para, &mut rows);
            out.push(Section { heading: Some(h.trim()), blocks: Vec::new() });
        } else if line.starts_with("# ") {
        } else if line.starts_with('|') {
            if !para.is_empty() {
                flush(&mut out, &mut para, &mut rows);
            }
            let cells: Vec<String> = line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
            // The |---|:--| line under the header.
            if !cells.iter().all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':'))) {
                rows.push(cells);
            }
        } else if line.trim().is_empty() {
            flush(&mut out, &mut para, &mut rows);
        } else {
            if !rows.is_empty() {
                flush(&mut out, &mut para, &mut rows);
            }
            para.push(line.trim());
        }
    }
    flush(&mut out, &mut para, &mut rows);
    out
}

/// The first table of `md` (under `heading` if given).
fn first_table(md: &str, heading: Option<&str>) -> Vec<Vec<String>> {
    sections(md)
        .into_iter()
        .filter(|s| heading.is_none() || s.heading == heading)
        .flat_map(|s| s.blocks)
        .find_map(|b| match b {
            Block::Table(rows) => Some(rows),
            Block::Paragraph(_) => None,
        })
        .unwrap_or_default()
}

/// A table as a tagged list: the first column is the tag, `type` and
/// `default` follow it in parentheses, the other columns are the text.
fn table(page: &mut String, rows: &[Vec<String>]) {
    let Some((header, body)) = rows.split_first() else { return };
    let col = |name: &str| header.iter().position(|h| h == name);
    let (kind, default) = (col("type"), col("default"));
    for row in body {
        let cell = |i: usize| row.get(i).map_or("", String::as_str);
        let mut tag = inline(cell(0));
        let default = default.filter(|&i| cell(i) != "\u{2014}");
        let extra: Vec<String> =
            [kind.map(|i| inline(cell(i))), default.map(|i| format!("default: {}", inline(cell(i))))]
                .into_iter()
                .flatten()
                .collect();
        if !extra.is_empty() {
            tag.push_str(&format!(" ({})", extra.join("; ")));
        }
        page.push_str(".TP\n");
        page.push_str(&escape_line(&tag));
        page.push('\n');
        let mut first = true;
        for (i, h) in header.iter().enumerate().skip(1) {
            let text = cell(i);
            if Some(i) == kind || Some(i) == col("default") || text.is_empty() || text == "\u{2014}" {
                continue;
            }
            if !first {
                page.push_str(".br\n");
            }
            first = false;
            let prefix = if h == "what to do" { "What to do: " } else { "" };
            page.push_str(&escape_line(&format!("{prefix}{}", inline(text))));
            page.push('\n');
        }
    }
}

/// Markdown inline text to roff: code spans bold, relative links as the
/// installed file, the rest escaped.
fn inline(md: &str) -> String {
    let mut out = String::new();
    let mut rest = md;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('`')
            && let Some(end) = r.find('`')
        {
            let _ = write!(out, "\\fB{}\\fR", escape(&r[..end]));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix("**")
            && let Some(end) = r.find("**")
        {
            let _ = write!(out, "\\fB{}\\fR", escape(&r[..end]));
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix('[')
            && let Some(close) = r.find("](")
            && let Some(end) = r[close..].find(')')
        {
            let (text, url) = (&r[..close], &r[close + 2..close + end]);
            let plain = text.replace('`', "");
            if url.contains("://") {
                let _ = write!(out, "{} ({})", inline(text), escape(url));
            } else {
                let file = format!("{DOC_DIR}/{}", url.trim_start_matches("../"));
                if file.ends_with(&plain) {
                    let _ = write!(out, "\\fI{}\\fR", escape(&file));
                } else {
                    let _ = write!(out, "{} (\\fI{}\\fR)", inline(text), escape(&file));
                }
            }
            rest = &r[close + end + 1..];
        } else {
            let n =
                rest.char_indices().skip(1).find(|(_, c)| matches!(c, '`' | '*' | '[')).map_or(rest.len(), |(i, _)| i);
            out.push_str(&escape(&rest[..n]));
            rest = &rest[n..];
        }
    }
    out
}

/// Escapes text for roff: backslashes, dashes (so options stay `-`),
/// quotes that roff would typeset.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            '\'' => out.push_str("\\(aq"),
            '`' => out.push_str("\\(ga"),
            '^' => out.push_str("\\(ha"),
            '~' => out.push_str("\\(ti"),
            c => out.push(c),
        }
    }
    out
}

/// A text line that starts with `.` or `'` would be a request.
fn escape_line(line: &str) -> String {
    if line.starts_with(['.', '\'']) { format!("\\&{line}") } else { line.to_string() }
}

/// Non-ASCII characters as groff's `\[uXXXX]`, so the page needs no input
/// encoding.
fn ascii(roff: &str) -> String {
    let mut out = String::with_capacity(roff.len());
    for c in roff.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let _ = write!(out, "\\[u{:04X}]", c as u32);
        }
    }
    out
}

/// `docs/NAME.md` in help texts is where the package installs it.
fn installed_doc_paths(roff: &str) -> String {
    let mut out = String::with_capacity(roff.len());
    let mut rest = roff;
    while let Some(i) = rest.find("docs/") {
        let before = rest[..i].chars().next_back();
        out.push_str(&rest[..i]);
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '/') {
            out.push_str("docs/");
        } else {
            out.push_str(DOC_DIR);
            out.push('/');
        }
        rest = &rest[i + 5..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    /// The keys serde accepts in a table, from its unknown-field error.
    fn accepted_keys(table: &str) -> Vec<String> {
        let err = crate::config::parse(&format!("{table}\nno_such_key_zz = 1\n")).unwrap_err().to_string();
        let list = err.split("expected").nth(1).unwrap_or_else(|| panic!("no key list in: {err}"));
        let mut keys: Vec<String> = list.split('`').skip(1).step_by(2).map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// The keys a table of docs/configuration.md documents.
    fn documented_keys(heading: &str) -> Vec<String> {
        let rows = first_table(CONFIGURATION, Some(heading));
        let mut keys: Vec<String> =
            rows[1..].iter().flat_map(|r| r[0].split('`').skip(1).step_by(2).map(str::to_string)).collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_config_page_documents_every_key_the_config_accepts() {
        assert_eq!(documented_keys("`[job.NAME]`"), accepted_keys("[job.a]"));
        assert_eq!(documented_keys("`[email]`"), accepted_keys("[email]"));
        // The file's top-level tables are the sections.
        let mut top = accepted_keys("");
        top.sort();
        assert_eq!(top, ["email", "job"]);
        let page = config_page().roff;
        for key in accepted_keys("[job.a]").iter().chain(&accepted_keys("[email]")) {
            assert!(page.contains(&format!("\\fB{}\\fR", escape(key))), "{key} missing from rbackup.toml(5)");
        }
    }

    #[test]
    fn the_exit_status_section_lists_every_code() {
        // A new Code fails to compile here until it is in the list.
        let all = Code::ALL;
        for c in all {
            match c {
                Code::Ok
                | Code::Vanished
                | Code::Partial
                | Code::Mismatch
                | Code::Error
                | Code::Interrupted
                | Code::Usage
                | Code::Locked => {}
            }
        }
        let mut expected: Vec<String> = all.iter().map(|c| c.status().to_string()).collect();
        expected.sort();
        let mut documented: Vec<String> = first_table(EXIT_CODES, None)[1..].iter().map(|r| r[0].clone()).collect();
        documented.sort();
        assert_eq!(documented, expected);
    }

    #[test]
    fn markdown_becomes_escaped_roff() {
        assert_eq!(inline("`--keep-last` and `a\\b`"), "\\fB\\-\\-keep\\-last\\fR and \\fBa\\eb\\fR");
        assert_eq!(inline("see [restore.md](restore.md)"), "see \\fI/usr/share/doc/rbackup/restore.md\\fR");
        assert_eq!(
            inline("[the example](../examples/rbackup.toml)"),
            "the example (\\fI/usr/share/doc/rbackup/examples/rbackup.toml\\fR)"
        );
        assert_eq!(escape_line(".hidden"), "\\&.hidden");
        assert_eq!(ascii("a \u{2014} b"), "a \\[u2014] b");
        assert_eq!(
            installed_doc_paths("see docs/x.md, not my/docs/y"),
            "see /usr/share/doc/rbackup/x.md, not my/docs/y"
        );
    }
}
