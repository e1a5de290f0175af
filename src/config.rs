//! Configuration: the TOML file's jobs, overridden by the command line, resolved
//! into the [`Job`] the commands run. The core never sees clap or TOML.
//!
//! Unknown keys and wrong types are errors that name the file, line and key:
//! a typo in a backup config must not silently back up the wrong thing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::notify::EmailConfig;
use crate::store::rules::Rules;
use crate::usage;

mod replicas;
mod select;
pub use replicas::Destination;
pub use select::{normalize_path, read_exclude_file};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/rbackup/rbackup.toml";

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub job: BTreeMap<String, JobConfig>,
    /// Mail reports, for every job.
    pub email: Option<EmailConfig>,
}

/// One `[job.NAME]` table; every key optional, the command line may fill in.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// `/abs/path` or `[user@]host:/abs/path`.
    pub source: Option<String>,
    pub backups_folder: Option<PathBuf>,
    /// Folder prefix of the snapshots; defaults to the job's name.
    pub name: Option<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    pub log_file: Option<PathBuf>,
    /// Keep device nodes.
    pub devices: Option<bool>,
    /// zstd on the wire.
    pub compress: Option<bool>,
    /// The rbackup binary on the server (like rsync's `--rsync-path`).
    pub remote_bin: Option<String>,
    /// A job-specific ssh config file (`ssh -F`).
    pub ssh_config: Option<PathBuf>,
    /// Seconds without data from the agent (or without it taking any) after
    /// which the run ends as failed; 0 waits forever.
    pub io_timeout: Option<u64>,
    /// Where `restore` writes by default, if not back to `source`, e.g.
    /// `root@server-restore:/srv/content` with a write-confined key.
    pub restore_to: Option<String>,
    /// A Prometheus textfile (for `node_exporter`) rewritten after every run.
    pub metrics_file: Option<PathBuf>,
    /// Retention rules for `prune` (see docs/retention.md).
    pub keep_last: Option<u32>,
    pub keep_within: Option<String>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// Prune after every successful backup.
    #[serde(default)]
    pub prune_after_backup: bool,
    /// Where `replicate` copies the snapshots (a USB drive, a host over
    /// SSH), each with its own retention rules if it says so.
    #[serde(default, deserialize_with = "replicas::destinations")]
    pub replicas: Vec<Destination>,
    /// Replicate to every one of `replicas` after each backup that
    /// completed a snapshot.
    #[serde(default)]
    pub replicate_after_backup: bool,
    /// Run on the desktop (`/bin/sh -c`) before a backup writes anything;
    /// its failure aborts the run (see `hooks`).
    pub pre_hook: Option<String>,
    /// Run on the desktop after every backup, whatever its outcome.
    pub post_hook: Option<String>,
    /// Seconds a hook may run before its process group is killed.
    pub hook_timeout: Option<u64>,
    /// A file of exclude patterns, one a line; relative to the config's folder.
    pub exclude_from: Option<toml::Spanned<PathBuf>>,
    /// Don't descend into other filesystems below the root.
    pub one_file_system: Option<bool>,
    /// Bytes per second the sender keeps to on average (`"5M"`); 0: none.
    #[serde(default, deserialize_with = "select::rate")]
    pub bwlimit: Option<u64>,
    /// Folders beneath the source root to back up (relative); empty: all.
    #[serde(default, deserialize_with = "select::rel_paths")]
    pub paths: Vec<String>,
}

/// The idle timeout when neither the job nor the command line sets one.
pub const DEFAULT_IO_TIMEOUT: u64 = 300;

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Local(PathBuf),
    Remote { user: Option<String>, host: String, path: PathBuf },
}

impl SourceSpec {
    /// Parses `/abs/path` or `[user@]host:/abs/path`.
    pub fn parse(s: &str) -> Result<SourceSpec> {
        Self::parse_as(s, "source")
    }

    /// The same, with `what` naming the argument in the error.
    pub fn parse_as(s: &str, what: &str) -> Result<SourceSpec> {
        let bad = || usage!("invalid {what} {s:?}: expected /absolute/path or [user@]host:/absolute/path");
        if s.starts_with('/') {
            return Ok(SourceSpec::Local(PathBuf::from(s)));
        }
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) if !u.is_empty() && !u.contains(':') => (Some(u.to_string()), r),
            Some(_) => return Err(bad()),
            None => (None, s),
        };
        let (host, path) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            rest.split_once(':').ok_or_else(bad)?
        };
        if host.is_empty() || host.starts_with('-') || !path.starts_with('/') {
            return Err(bad());
        }
        Ok(SourceSpec::Remote { user, host: host.to_string(), path: PathBuf::from(path) })
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Local(p) => write!(f, "{}", p.display()),
            SourceSpec::Remote { user: Some(u), host, path } => write!(f, "{u}@{host}:{}", path.display()),
            SourceSpec::Remote { user: None, host, path } => write!(f, "{host}:{}", path.display()),
        }
    }
}

/// A job ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's name in the config (or the snapshot name without one).
    pub job: String,
    pub source: Option<SourceSpec>,
    pub backups_folder: PathBuf,
    pub name: String,
    pub excludes: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub devices: bool,
    pub compress: bool,
    pub remote_bin: String,
    pub ssh_config: Option<PathBuf>,
    /// How long the agent may send nothing (and take nothing); `None`: forever.
    pub io_timeout: Option<std::time::Duration>,
    pub restore_to: Option<String>,
    pub metrics_file: Option<PathBuf>,
    /// The `[email]` settings, if any.
    pub email: Option<EmailConfig>,
    pub prune: Rules,
    pub prune_after_backup: bool,
    pub replicas: Vec<Destination>,
    pub replicate_after_backup: bool,
    pub pre_hook: Option<String>,
    pub post_hook: Option<String>,
    pub hook_timeout: std::time::Duration,
    /// Don't descend into other filesystems below the root.
    pub one_file_system: bool,
    /// Bytes per second the sender keeps to on average; 0: no limit.
    pub bwlimit: u64,
    /// Folders beneath the source root the snapshot holds (normalized,
    /// relative); empty: the whole root.
    pub paths: Vec<String>,
    /// How a command line names this job, for the hints rbackup prints:
    /// `rbackup -j JOB`, with `-c FILE` when the config isn't the default
    /// one; `rbackup` for a job the command line gave whole (the same
    /// options go with it).
    pub invocation: String,
}

impl Job {
    /// The command line that runs `rest` (e.g. `--continue`) for this job.
    pub fn command(&self, rest: &str) -> String {
        format!("{} {rest}", self.invocation)
    }
}

/// `s` as one shell word.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+@:=,".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Values from the command line, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub source: Option<String>,
    pub backups_folder: Option<PathBuf>,
    pub name: Option<String>,
    pub excludes: Vec<String>,
    pub log_file: Option<PathBuf>,
    pub devices: bool,
    pub compress: bool,
    pub remote_bin: Option<String>,
    pub ssh_config: Option<PathBuf>,
    /// Seconds; 0 waits forever.
    pub io_timeout: Option<u64>,
    /// Exclude files, added to the job's.
    pub exclude_from: Vec<PathBuf>,
    pub one_file_system: bool,
    /// A rate as given (`5M`), checked when the job is resolved.
    pub bwlimit: Option<String>,
}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<FileConfig> {
    // A config that can't be read is a setting to fix: exit 2, like a bad key.
    let text = std::fs::read_to_string(path).map_err(|e| usage!("cannot read config file {}: {e}", path.display()))?;
    let cfg = parse(&text).map_err(|e| usage!("config file {}: {e}", path.display()))?;
    select::check_exclude_files(&text, path, &cfg).map_err(|e| usage!("config file {}: {e}", path.display()))?;
    Ok(cfg)
}

/// Parses config text.
pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

/// The config file to use: `--config` (must exist), else the default if it
/// exists, else none.
pub fn find(explicit: Option<&Path>) -> Result<Option<(PathBuf, FileConfig)>> {
    match explicit {
        Some(p) => Ok(Some((p.to_path_buf(), load(p)?))),
        None => {
            let p = Path::new(DEFAULT_CONFIG);
            if p.exists() { Ok(Some((p.to_path_buf(), load(p)?))) } else { Ok(None) }
        }
    }
}

/// Picks the job and applies the command line over it.
pub fn resolve(file: Option<&(PathBuf, FileConfig)>, job: Option<&str>, cli: &Overrides) -> Result<Job> {
    let (job_name, base) = match (file, job) {
        (Some((path, cfg)), Some(j)) => {
            let base = cfg.job.get(j).cloned().ok_or_else(|| {
                let known: Vec<&str> = cfg.job.keys().map(String::as_str).collect();
                usage!("no job {j:?} in {} (jobs: {})", path.display(), list_or_none(&known))
            })?;
            (j.to_string(), base)
        }
        (Some((path, cfg)), None) => match cfg.job.len() {
            0 => (String::new(), JobConfig::default()),
            1 => {
                let (k, v) = cfg.job.iter().next().expect("one job");
                (k.clone(), v.clone())
            }
            // The command line names the snapshots itself: the config's jobs
            // don't matter (a backup without --source then says it needs one).
            _ if cli.backups_folder.is_some() && cli.name.is_some() => (String::new(), JobConfig::default()),
            _ => {
                let known: Vec<&str> = cfg.job.keys().map(String::as_str).collect();
                return Err(usage!(
                    "{} has several jobs ({}): choose one with --job NAME",
                    path.display(),
                    known.join(", ")
                ));
            }
        },
        (None, Some(j)) => {
            return Err(usage!(
                "--job {j:?} given but there is no config file (looked for {DEFAULT_CONFIG}; use --config FILE)"
            ));
        }
        (None, None) => (String::new(), JobConfig::default()),
    };
    let name = cli
        .name
        .clone()
        .or(base.name.clone())
        .or_else(|| (!job_name.is_empty()).then(|| job_name.clone()))
        .ok_or_else(|| usage!("no snapshot name: give --name NAME (or a job in the config file)"))?;
    crate::store::check_name(&name)?;
    let backups_folder = cli
        .backups_folder
        .clone()
        .or(base.backups_folder.clone())
        .ok_or_else(|| usage!("no backups folder: give --backups-folder DIR (or backups_folder in the job)"))?;
    if !backups_folder.is_absolute() {
        return Err(usage!("the backups folder must be an absolute path, not {}", backups_folder.display()));
    }
    let source = cli.source.clone().or(base.source.clone()).map(|s| SourceSpec::parse(&s)).transpose()?;
    let mut excludes = base.exclude.clone();
    // Exclude files are read now, on the desktop; their patterns go to the
    // agent with the others.
    let config_path = file.map(|(p, _)| p.as_path());
    if let Some(f) = &base.exclude_from {
        let f = select::exclude_file_path(config_path, f.get_ref());
        excludes.extend(read_exclude_file(&f).map_err(|e| usage!("exclude_from: {e}"))?);
    }
    excludes.extend(cli.excludes.iter().cloned());
    for f in &cli.exclude_from {
        excludes.extend(read_exclude_file(f).map_err(|e| usage!("--exclude-from: {e}"))?);
    }
    let bwlimit = match &cli.bwlimit {
        Some(r) => crate::source::parse_rate(r).map_err(|e| usage!("--bwlimit: {e}"))?,
        None => base.bwlimit.unwrap_or(0),
    };
    let invocation = match (file, job_name.is_empty()) {
        (Some((path, _)), false) if path == Path::new(DEFAULT_CONFIG) => {
            format!("rbackup -j {}", shell_word(&job_name))
        }
        (Some((path, _)), false) => {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            format!("rbackup -c {} -j {}", shell_word(&path.to_string_lossy()), shell_word(&job_name))
        }
        // The command line said everything: the same options again.
        _ => "rbackup".to_string(),
    };
    Ok(Job {
        invocation,
        job: if job_name.is_empty() { name.clone() } else { job_name },
        source,
        backups_folder,
        name,
        excludes,
        log_file: cli.log_file.clone().or(base.log_file.clone()),
        devices: cli.devices || base.devices.unwrap_or(false),
        compress: cli.compress || base.compress.unwrap_or(false),
        remote_bin: cli.remote_bin.clone().or(base.remote_bin.clone()).unwrap_or_else(|| "rbackup".into()),
        ssh_config: cli.ssh_config.clone().or(base.ssh_config.clone()),
        io_timeout: match cli.io_timeout.or(base.io_timeout).unwrap_or(DEFAULT_IO_TIMEOUT) {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        },
        restore_to: base.restore_to.clone(),
        metrics_file: base.metrics_file.clone(),
        prune: Rules {
            keep_last: base.keep_last,
            keep_within: base.keep_within.clone(),
            keep_hourly: base.keep_hourly,
            keep_daily: base.keep_daily,
            keep_weekly: base.keep_weekly,
            keep_monthly: base.keep_monthly,
            keep_yearly: base.keep_yearly,
        },
        prune_after_backup: base.prune_after_backup,
        replicas: base.replicas.clone(),
        replicate_after_backup: base.replicate_after_backup,
        pre_hook: base.pre_hook.clone(),
        post_hook: base.post_hook.clone(),
        hook_timeout: base.hook_timeout.map_or(crate::hooks::DEFAULT_TIMEOUT, std::time::Duration::from_secs),
        one_file_system: cli.one_file_system || base.one_file_system.unwrap_or(false),
        bwlimit,
        paths: base.paths.clone(),
        email: file.and_then(|(_, cfg)| cfg.email.clone()),
    })
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(SourceSpec::parse("/srv").unwrap(), SourceSpec::Local("/srv".into()));
        assert_eq!(
            SourceSpec::parse("bk@server:/srv/content").unwrap(),
            SourceSpec::Remote { user: Some("bk".into()), host: "server".into(), path: "/srv/content".into() }
        );
        assert_eq!(
            SourceSpec::parse("server:/srv").unwrap(),
            SourceSpec::Remote { user: None, host: "server".into(), path: "/srv".into() }
        );
        assert_eq!(
            SourceSpec::parse("[::1]:/srv").unwrap(),
            SourceSpec::Remote { user: None, host: "::1".into(), path: "/srv".into() }
        );
        for bad in ["relative/path", "server:relative", "@server:/x", "-oProxyCommand=x:/y", "server", ""] {
            assert!(SourceSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse("[job.a]\nsource = \"/x\"\nbackup_folder = \"/b\"\n").unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("backup_folder"), "{err}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let err = parse("[job.a]\ncompress = \"yes\"\n").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("compress") || err.contains("bool"), "{err}");
    }

    #[test]
    fn command_line_overrides_the_job() {
        let cfg = parse("[job.web]\nsource = \"/srv\"\nbackups_folder = \"/b\"\nexclude = [\"*.tmp\"]\n").unwrap();
        let file = (PathBuf::from("/etc/x.toml"), cfg);
        let cli =
            Overrides { backups_folder: Some("/other".into()), excludes: vec!["/cache".into()], ..Default::default() };
        let job = resolve(Some(&file), None, &cli).unwrap();
        assert_eq!(job.name, "web");
        assert_eq!(job.backups_folder, PathBuf::from("/other"));
        assert_eq!(job.excludes, vec!["*.tmp".to_string(), "/cache".to_string()]);
        assert_eq!(job.source, Some(SourceSpec::Local("/srv".into())));
    }

    #[test]
    fn io_timeout_defaults_to_five_minutes_and_zero_waits_forever() {
        let cfg = parse("[job.a]\nio_timeout = 30\n[job.b]\n").unwrap();
        let file = (PathBuf::from("/etc/x.toml"), cfg);
        let cli = Overrides { backups_folder: Some("/b".into()), ..Default::default() };
        let secs = |job: &str, cli: &Overrides| resolve(Some(&file), Some(job), cli).unwrap().io_timeout;
        assert_eq!(secs("a", &cli), Some(std::time::Duration::from_secs(30)));
        assert_eq!(secs("b", &cli), Some(std::time::Duration::from_secs(DEFAULT_IO_TIMEOUT)));
        assert_eq!(secs("a", &Overrides { io_timeout: Some(0), ..cli.clone() }), None);
        assert_eq!(secs("b", &Overrides { io_timeout: Some(7), ..cli }), Some(std::time::Duration::from_secs(7)));
    }

    #[test]
    fn several_jobs_need_a_choice() {
        let cfg = parse("[job.a]\n[job.b]\n").unwrap();
        let file = (PathBuf::from("/etc/x.toml"), cfg);
        let err = resolve(Some(&file), None, &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("--job"), "{err}");
        let err = resolve(Some(&file), Some("c"), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("a, b"), "{err}");
    }

    /// Regression: `list`, `verify`, `diff` and `prune` with an explicit
    /// folder and name failed on a config with several jobs.
    #[test]
    fn an_explicit_folder_and_name_need_no_job_from_the_config() {
        let cfg = parse("[job.a]\n[job.b]\n").unwrap();
        let file = (PathBuf::from("/etc/x.toml"), cfg);
        let cli = Overrides { backups_folder: Some("/b".into()), name: Some("web".into()), ..Default::default() };
        let job = resolve(Some(&file), None, &cli).unwrap();
        assert_eq!((job.backups_folder, job.name), (PathBuf::from("/b"), "web".to_string()));
        assert_eq!(job.source, None);
    }

    #[test]
    fn the_documented_example_parses() {
        let cfg = parse(include_str!("../examples/rbackup.toml")).unwrap();
        assert_eq!(cfg.job.len(), 2);
        let file = (PathBuf::from("examples/rbackup.toml"), cfg);
        let job = resolve(Some(&file), Some("server"), &Overrides::default()).unwrap();
        assert_eq!(job.name, "server");
        assert!(matches!(job.source, Some(SourceSpec::Remote { .. })));
        let docs = resolve(Some(&file), Some("documents"), &Overrides::default()).unwrap();
        assert_eq!(docs.name, "documents");
    }

    #[test]
    fn bad_names_are_refused() {
        let cli = Overrides { backups_folder: Some("/b".into()), name: Some("../x".into()), ..Default::default() };
        assert!(resolve(None, None, &cli).is_err());
    }
}
