//! The job keys that choose what a backup sends and how fast:
//! `exclude_from`, `paths`, `bwlimit` (and `one_file_system`, a plain bool).
//! Each is checked while the file is read, so that a bad value is an error
//! naming the file, the line and the key (docs/configuration.md), never a
//! surprise at 3 a.m. when the job runs.

use std::path::{Path, PathBuf};

use serde::Deserializer;
use serde::de::{Error, Visitor};

/// `bwlimit`: a rate as a string (`"5M"`) or a plain number of bytes per
/// second; checked while the file is read.
pub(super) fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct RateVisitor;
    impl Visitor<'_> for RateVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a rate in bytes per second, like \"500K\", \"5M\" or \"1G\"")
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v).map(Some).map_err(|_| E::custom(format!("bwlimit: bad rate {v}: it is negative")))
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
            crate::source::parse_rate(v).map(Some).map_err(|e| E::custom(format!("bwlimit: {e}")))
        }
    }
    d.deserialize_any(RateVisitor)
}

/// `paths`: folders relative to the source root, checked while the file is
/// read and kept normalized (no empty or `.` components).
pub(super) fn rel_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw: Vec<String> = serde::Deserialize::deserialize(d)?;
    raw.iter().map(|p| normalize_path(p).map_err(|e| D::Error::custom(format!("paths: {e}")))).collect()
}

/// One entry of `paths`, normalized: relative, no `..`, not the root itself
/// (a job without `paths` is the whole root).
pub fn normalize_path(p: &str) -> Result<String, String> {
    if p.starts_with('/') {
        return Err(format!("{p:?} is absolute: paths are relative to the source's root, e.g. \"srv/content\""));
    }
    let parts: Vec<&str> = p.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if parts.contains(&"..") {
        return Err(format!("{p:?} contains `..`: paths stay beneath the source's root"));
    }
    if parts.is_empty() {
        return Err(format!("{p:?} names the root itself: leave `paths` out to back up the whole root"));
    }
    if p.contains('\0') {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    Ok(parts.join("/"))
}

/// The patterns of an exclude file: one a line, gitignore syntax; blank
/// lines and `#` comments left out. The error names the file.
pub fn read_exclude_file(path: &Path) -> Result<Vec<String>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the exclude file {}: {e}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("the exclude file {} is not UTF-8 text", path.display()))?;
    Ok(patterns(&text))
}

fn patterns(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Where a job's `exclude_from` is: as written if absolute, else beside the
/// config file (a job runs from cron or systemd, whose working folder is
/// not the admin's).
pub fn exclude_file_path(config: Option<&Path>, file: &Path) -> PathBuf {
    match config.and_then(Path::parent) {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_path_buf(),
    }
}

/// Checks every job's `exclude_from` can be read; the error names the line
/// and the key, like the parser's own.
pub(super) fn check_exclude_files(text: &str, config: &Path, cfg: &super::FileConfig) -> Result<(), String> {
    for (job, j) in &cfg.job {
        let Some(file) = &j.exclude_from else { continue };
        let line = text[..file.span().start.min(text.len())].matches('\n').count() + 1;
        read_exclude_file(&exclude_file_path(Some(config), file.get_ref()))
            .map_err(|e| format!("line {line}, [job.{job}] exclude_from: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_file_lines_skip_comments_and_blanks() {
        let text = "# caches\n/cache/\n\n   \n*.tmp\r\n  # indented comment\n!keep.tmp\n";
        assert_eq!(patterns(text), ["/cache/", "*.tmp", "!keep.tmp"]);
        assert!(patterns("").is_empty());
    }

    #[test]
    fn a_missing_exclude_file_is_named() {
        let err = read_exclude_file(Path::new("/nonexistent/rbackup-excludes")).unwrap_err();
        assert!(err.contains("/nonexistent/rbackup-excludes"), "{err}");
    }

    #[test]
    fn relative_exclude_files_are_beside_the_config() {
        let cfg = Path::new("/etc/rbackup/rbackup.toml");
        assert_eq!(exclude_file_path(Some(cfg), Path::new("ex.txt")), Path::new("/etc/rbackup/ex.txt"));
        assert_eq!(exclude_file_path(Some(cfg), Path::new("/x/ex.txt")), Path::new("/x/ex.txt"));
        assert_eq!(exclude_file_path(None, Path::new("ex.txt")), Path::new("ex.txt"));
    }

    #[test]
    fn paths_are_relative_and_stay_beneath_the_root() {
        assert_eq!(normalize_path("srv/content/").unwrap(), "srv/content");
        assert_eq!(normalize_path("./etc//ssh").unwrap(), "etc/ssh");
        for bad in ["/etc", "srv/../../etc", "..", "", ".", "a\0b"] {
            assert!(normalize_path(bad).is_err(), "{bad:?}");
        }
    }

    /// A job's file with `body` after a few lines, so the line is checked.
    fn job(body: &str) -> String {
        format!("[job.web]\nsource = \"/srv\"\n{body}\n")
    }

    #[test]
    fn a_bad_bwlimit_names_the_line_and_the_key() {
        let err = crate::config::parse(&job("bwlimit = \"5X\"")).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("bwlimit") && err.contains("5X"), "{err}");
        let cfg = crate::config::parse(&job("bwlimit = \"5M\"")).unwrap();
        assert_eq!(cfg.job["web"].bwlimit, Some(5 << 20));
        let cfg = crate::config::parse(&job("bwlimit = 1000")).unwrap();
        assert_eq!(cfg.job["web"].bwlimit, Some(1000));
        assert!(crate::config::parse(&job("bwlimit = -1")).is_err());
    }

    #[test]
    fn paths_that_leave_the_root_name_the_line_and_the_key() {
        for (bad, why) in [("[\"srv\", \"/etc\"]", "absolute"), ("[\"srv/../../etc\"]", "..")] {
            let err = crate::config::parse(&job(&format!("paths = {bad}"))).unwrap_err().to_string();
            assert!(err.contains("line 3") && err.contains("paths") && err.contains(why), "{err}");
        }
        let cfg = crate::config::parse(&job("paths = [\"srv/content/\", \"etc\"]")).unwrap();
        assert_eq!(cfg.job["web"].paths, ["srv/content", "etc"]);
    }

    #[test]
    fn an_unreadable_exclude_file_names_the_file_the_line_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rbackup.toml");
        std::fs::write(&config, job("exclude_from = \"missing.txt\"")).unwrap();
        let err = crate::config::load(&config).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("exclude_from"), "{err}");
        assert!(err.contains(&dir.path().join("missing.txt").display().to_string()), "{err}");
        assert!(err.contains(&config.display().to_string()), "{err}");

        std::fs::write(dir.path().join("missing.txt"), "# caches\n/cache/\n").unwrap();
        let cfg = crate::config::load(&config).unwrap();
        let file = (config, cfg);
        let cli = crate::config::Overrides {
            backups_folder: Some("/b".into()),
            excludes: vec!["*.tmp".into()],
            ..Default::default()
        };
        let job = crate::config::resolve(Some(&file), None, &cli).unwrap();
        assert_eq!(job.excludes, ["/cache/", "*.tmp"]);
    }
}
