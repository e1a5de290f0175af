//! From what clap parsed to the plain options the config and the commands
//! take: the only place that knows both.

use super::{
    CheckArgs, Cli, ConnectArgs, ModeArg, ReplicateArgs, RestoreArgs, RulesArgs, RunArgs, ServeArgs, SetupClientArgs,
    SetupServerArgs, StoreArgs,
};
use crate::agent::serve::ServeOptions;
use crate::cmd::prune::Rules;
use crate::config::Overrides;
use crate::setup::{AccessMode, ClientOptions, ServerOptions};

impl StoreArgs {
    /// The job settings these options override.
    pub fn overrides(&self) -> Overrides {
        Overrides { backups_folder: self.backups_folder.clone(), name: self.name.clone(), ..Overrides::default() }
    }
}

impl ConnectArgs {
    /// `base` with the connection's settings these options override.
    fn over(&self, base: Overrides) -> Overrides {
        Overrides {
            remote_bin: self.remote_bin.clone(),
            ssh_config: self.ssh_config.clone(),
            io_timeout: self.io_timeout,
            ..base
        }
    }
}

impl CheckArgs {
    /// The job settings these options override.
    pub fn overrides(&self) -> Overrides {
        Overrides { source: self.source.clone(), ..self.connect.over(self.store.overrides()) }
    }
}

impl RestoreArgs {
    /// The job settings these options override.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            compress: self.compress,
            bwlimit: self.bwlimit.clone(),
            ..self.connect.over(self.store.overrides())
        }
    }
}

impl ReplicateArgs {
    /// The job settings these options override.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            compress: self.compress,
            bwlimit: self.bwlimit.clone(),
            ..self.connect.over(self.store.overrides())
        }
    }
}

impl RunArgs {
    /// The job settings these options override.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            source: self.source.clone(),
            excludes: self.exclude.clone(),
            log_file: self.log_file.clone(),
            devices: self.devices,
            compress: self.compress,
            exclude_from: self.exclude_from.clone(),
            one_file_system: self.one_file_system,
            bwlimit: self.bwlimit.clone(),
            ..self.connect.over(self.store.overrides())
        }
    }
}

impl RunArgs {
    /// The options a `backup --all` passes on to each job's own run (see
    /// `cmd::all_jobs`): those that make sense for every job. Options that name
    /// one job's things (its source, folder, name, log, ssh config, stats
    /// file) are refused: each job runs with its own.
    pub fn for_every_job(&self) -> anyhow::Result<Vec<std::ffi::OsString>> {
        refuse_with_all(&self.overrides())?;
        if self.stats_json.is_some() {
            return Err(crate::usage!("--all runs every job with its own settings: leave out --stats-json"));
        }
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let flags = [
            (self.dry_run, "--dry-run"),
            (self.devices, "--devices"),
            (self.compress, "--compress"),
            (self.one_file_system, "--one-file-system"),
        ];
        for (on, flag) in flags {
            if on {
                args.push(flag.into());
            }
        }
        for pattern in &self.exclude {
            args.extend(["--exclude".into(), pattern.into()]);
        }
        for file in &self.exclude_from {
            // Absolute: the child may resolve it from elsewhere.
            let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            args.extend(["--exclude-from".into(), file.into_os_string()]);
        }
        if let Some(rate) = &self.bwlimit {
            args.extend(["--bwlimit".into(), rate.into()]);
        }
        if let Some(bin) = &self.connect.remote_bin {
            args.extend(["--remote-bin".into(), bin.into()]);
        }
        if let Some(secs) = self.connect.io_timeout {
            args.extend(["--io-timeout".into(), secs.to_string().into()]);
        }
        Ok(args)
    }
}

/// Refuses, with `--all`, the options that name one job's settings.
pub fn refuse_with_all(o: &Overrides) -> anyhow::Result<()> {
    let named = [
        (o.source.is_some(), "--source"),
        (o.backups_folder.is_some(), "--backups-folder"),
        (o.name.is_some(), "--name"),
        (o.log_file.is_some(), "--log-file"),
        (o.ssh_config.is_some(), "--ssh-config"),
    ];
    match named.iter().find(|(given, _)| *given) {
        Some((_, flag)) => Err(crate::usage!("--all runs every job with its own settings: leave out {flag}")),
        None => Ok(()),
    }
}

impl Cli {
    /// `-q` / `-v…` again, for the runs `--all` starts.
    pub fn verbosity_args(&self) -> Vec<std::ffi::OsString> {
        if self.quiet { vec!["--quiet".into()] } else { (0..self.verbose).map(|_| "--verbose".into()).collect() }
    }
}

impl From<&RulesArgs> for Rules {
    fn from(a: &RulesArgs) -> Rules {
        Rules {
            keep_last: a.keep_last,
            keep_within: a.keep_within.clone(),
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
        }
    }
}

impl From<ModeArg> for AccessMode {
    fn from(m: ModeArg) -> AccessMode {
        match m {
            ModeArg::Acl => AccessMode::Acl,
            ModeArg::Capability => AccessMode::Capability,
            ModeArg::Replica => AccessMode::Replica,
        }
    }
}

impl From<&ServeArgs> for ServeOptions {
    fn from(a: &ServeArgs) -> ServeOptions {
        ServeOptions {
            write: a.write,
            append_only: a.append_only,
            root: a.root.clone(),
            before: a.before.clone(),
            before_timeout: std::time::Duration::from_secs(a.before_timeout),
            keep_root_metadata: a.keep_root_metadata,
        }
    }
}

impl From<&SetupServerArgs> for ServerOptions {
    fn from(a: &SetupServerArgs) -> ServerOptions {
        ServerOptions {
            user: a.user.clone().unwrap_or_default(),
            root: a.root.clone(),
            key: a.key.clone(),
            mode: a.mode.into(),
            restore_key: a.restore_key.clone(),
            dry_run: a.dry_run,
            agent_dir: a.agent_dir.clone(),
            home_base: a.home_base.clone(),
            before: a.before.clone(),
        }
    }
}

impl SetupClientArgs {
    /// The options of `setup-client` for `job`, added to `config`.
    pub fn options(&self, job: String, config: std::path::PathBuf) -> ClientOptions {
        ClientOptions {
            job,
            remote: self.remote.clone(),
            port: self.port,
            backups_folder: self.backups_folder.clone(),
            config,
            accept_host_key: self.accept_host_key.clone(),
            restore: self.restore,
            log_file: self.log_file.clone(),
            dry_run: self.dry_run,
        }
    }
}

impl Cli {
    /// The config file given, or the default one; absolute, since
    /// `setup-client` writes paths beside it into the job, and the job runs
    /// later from another working directory (cron, systemd).
    pub fn config_path(&self) -> std::path::PathBuf {
        let path = self.config.clone().unwrap_or_else(|| crate::config::DEFAULT_CONFIG.into());
        std::path::absolute(&path).unwrap_or(path)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    /// Every option that applies to each job reaches each job's run.
    #[test]
    fn backup_all_passes_on_every_option_meant_for_each_job() {
        let cli = Cli::parse_from([
            "rbackup",
            "backup",
            "--all",
            "-x",
            "--bwlimit",
            "5M",
            "--exclude-from",
            "/etc/ex",
            "--exclude",
            "*.tmp",
            "--compress",
        ]);
        let Command::Backup(a) = &cli.command else { panic!("not a backup: {:?}", cli.command) };
        let args: Vec<String> = a.run.for_every_job().unwrap().iter().map(|s| s.to_string_lossy().into()).collect();
        let joined = args.join(" ");
        for expected in ["--one-file-system", "--bwlimit 5M", "--exclude-from /etc/ex", "--exclude *.tmp", "--compress"]
        {
            assert!(joined.contains(expected), "{expected} missing from {joined}");
        }
        let cli = Cli::parse_from(["rbackup", "backup", "--all", "--source", "/srv"]);
        let Command::Backup(a) = &cli.command else { panic!() };
        assert!(a.run.for_every_job().is_err(), "one job's source with --all");
    }

    /// Rules given back as `prune`'s options (the console's confirmed
    /// prune) are the same rules.
    #[test]
    fn rules_as_flags_parse_back_to_the_same_rules() {
        use crate::store::rules::Rules;
        let rules = Rules {
            keep_last: Some(3),
            keep_within: Some("36h".into()),
            keep_hourly: Some(0),
            keep_daily: Some(7),
            keep_weekly: None,
            keep_monthly: Some(12),
            keep_yearly: Some(5),
        };
        let mut args = vec!["rbackup".to_string(), "prune".into()];
        args.extend(rules.flags());
        let cli = Cli::parse_from(args);
        let Command::Prune(a) = &cli.command else { panic!("not a prune: {:?}", cli.command) };
        assert_eq!(Rules::from(&a.rules), rules);
    }
}
