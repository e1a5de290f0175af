//! Parse, run, map the outcome to an exit code. Nothing else.

use std::process::ExitCode;

use clap::Parser;

use rbackup::cli::{CheckArgs, Cli, Command, RestoreArgs, RunArgs, StoreArgs};
use rbackup::config::{self, Job, Overrides};
use rbackup::error::{Code, code_of};
use rbackup::{
    agent::serve, cmd::after_run, cmd::backup, cmd::check, cmd::diff, cmd::list, cmd::prune, cmd::restore, cmd::verify,
    error, interrupt, log, setup, store,
};

fn main() -> ExitCode {
    // As the backup user's login shell, sshd runs `rbackup -c COMMAND`.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let login = args.first().is_some_and(|a| a.as_encoded_bytes().starts_with(b"-"));
    let command_line = args.len() == 3 && args[1] == "-c" && args[2].to_string_lossy().contains(' ');
    if login || command_line {
        let command = args.get(2).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        let Err(e) = setup::shell(&command);
        eprintln!("rbackup: {e:#}");
        return Code::Usage.into();
    }
    let cli = Cli::parse();
    log::set_verbosity(cli.verbose, cli.quiet);
    match run(&cli) {
        Ok(code) => code.into(),
        Err(e) => {
            error!("{e:#}");
            code_of(&e).into()
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Code> {
    rbackup::fs::safefs::raise_descriptor_limit();
    match &cli.command {
        Command::Serve(args) => {
            log::set_tag(log::AGENT_TAG);
            if args.write {
                // A restore's agent writes: a Ctrl-C (which reaches a local
                // agent too) or a stop ends its sink at a safe point, so no
                // temporary file is left in the destination. (A read-only
                // agent has nothing to clean up, and ends when the desktop
                // hangs up.)
                interrupt::install()?;
            }
            serve::run(args)?;
            Ok(Code::Ok)
        }
        Command::Backup(args) | Command::Continue(args) => {
            let job = job(cli, &run_overrides(args))?;
            if let Some(path) = &job.log_file {
                log::open_file(path)
                    .map_err(|e| anyhow::anyhow!("cannot open the log file {}: {e}", path.display()))?;
            }
            log::set_tag(&job.job);
            interrupt::install()?;
            let resume = matches!(cli.command, Command::Continue(_));
            let opts = backup::RunOptions { resume, dry_run: args.dry_run };
            let started = chrono::Utc::now();
            let result = backup::run(&job, &opts);
            match &result {
                Ok(report) => backup::print_summary(report, opts.dry_run),
                Err(e) => error!("{e:#}"),
            }
            after_run::after_backup(&job, if resume { "continue" } else { "backup" }, started, &result, opts.dry_run);
            let report = match result {
                Ok(r) => r,
                Err(e) => return Ok(code_of(&e)),
            };
            if let Some(path) = &args.stats_json {
                backup::write_stats_json(path, &job, &report)?;
            }
            if job.prune_after_backup
                && report.snapshot.is_some()
                && interrupt::received().is_none()
                && let Err(e) = prune::run(&job, &job.prune, false)
            {
                error!("prune after the backup failed (the snapshot is complete): {e:#}");
                return Ok(report.code.max(code_of(&e)));
            }
            Ok(report.code)
        }
        Command::Restore(args) => {
            let job = job(cli, &restore_overrides(args))?;
            log::set_tag(&job.job);
            interrupt::install()?;
            let opts = restore::RestoreOptions {
                snapshot: args.snapshot.clone(),
                paths: args.paths.clone(),
                to: args.to.clone(),
                delete: args.delete,
                dry_run: args.dry_run,
            };
            let report = restore::run(&job, &opts)?;
            restore::print_summary(&report, opts.dry_run);
            Ok(report.code)
        }
        Command::TestEmail(args) => {
            let job = job(cli, &store_overrides(args))?;
            let email = job.email.ok_or_else(|| anyhow::anyhow!("there is no [email] section in the config file"))?;
            let (subject, body) = email.test_message(&job.job);
            email.send(&subject, &body)?;
            rbackup::info!("test message sent to {}", email.to.join(", "));
            Ok(Code::Ok)
        }
        Command::SetupServer(a) => {
            setup::server(&setup::ServerOptions {
                user: a.user.clone(),
                root: a.root.clone(),
                key: a.key.clone(),
                mode: a.mode,
                restore_key: a.restore_key.clone(),
                dry_run: a.dry_run,
                agent_dir: a.agent_dir.clone(),
                home_base: a.home_base.clone(),
            })?;
            Ok(Code::Ok)
        }
        Command::SetupClient(a) => {
            let job = cli.job.clone().ok_or_else(|| rbackup::usage!("setup-client needs --job NAME"))?;
            setup::client(&setup::ClientOptions {
                job,
                remote: a.remote.clone(),
                port: a.port,
                backups_folder: a.backups_folder.clone(),
                config: cli.config.clone().unwrap_or_else(|| config::DEFAULT_CONFIG.into()),
                accept_host_key: a.accept_host_key.clone(),
                restore: a.restore,
                log_file: a.log_file.clone(),
                dry_run: a.dry_run,
            })?;
            Ok(Code::Ok)
        }
        Command::Check(args) => {
            let job = job(cli, &check_overrides(args))?;
            check::run(&job)
        }
        Command::Man { dir: None } => print_all(rbackup::cli::man::main_page()?.roff.as_bytes()),
        Command::Man { dir: Some(dir) } => {
            for path in rbackup::cli::man::write_to(dir)? {
                println!("{}", path.display());
            }
            Ok(Code::Ok)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "rbackup", &mut script);
            print_all(&script)
        }
        Command::List(args) => {
            let job = job(cli, &store_overrides(&args.store))?;
            list::run(&store::Store::open(&job.backups_folder, &job.name)?, !args.no_sizes, args.bytes)?;
            Ok(Code::Ok)
        }
        Command::Prune(a) => {
            let job = job(cli, &store_overrides(&a.store))?;
            prune::run(&job, &a.rules.clone().or(&job.prune), a.dry_run)
        }
        Command::Verify(a) => {
            let job = job(cli, &store_overrides(&a.store))?;
            verify::run(&job, a.snapshot.as_deref())
        }
        Command::Diff(a) => {
            let job = job(cli, &store_overrides(&a.store))?;
            diff::run(&job, &a.a, &a.b)
        }
    }
}

/// Writes to stdout; a reader that stops early (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<Code> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(Code::Ok),
    }
}

fn job(cli: &Cli, overrides: &Overrides) -> anyhow::Result<Job> {
    let file = config::find(cli.config.as_deref())?;
    config::resolve(file.as_ref(), cli.job.as_deref(), overrides)
}

fn store_overrides(args: &StoreArgs) -> Overrides {
    Overrides { backups_folder: args.backups_folder.clone(), name: args.name.clone(), ..Overrides::default() }
}

fn check_overrides(args: &CheckArgs) -> Overrides {
    Overrides {
        source: args.source.clone(),
        remote_bin: args.remote_bin.clone(),
        ssh_config: args.ssh_config.clone(),
        io_timeout: args.io_timeout,
        ..store_overrides(&args.store)
    }
}

fn restore_overrides(args: &RestoreArgs) -> Overrides {
    Overrides {
        compress: args.compress,
        remote_bin: args.remote_bin.clone(),
        ssh_config: args.ssh_config.clone(),
        io_timeout: args.io_timeout,
        ..store_overrides(&args.store)
    }
}

fn run_overrides(args: &RunArgs) -> Overrides {
    Overrides {
        source: args.source.clone(),
        excludes: args.exclude.clone(),
        log_file: args.log_file.clone(),
        devices: args.devices,
        compress: args.compress,
        remote_bin: args.remote_bin.clone(),
        ssh_config: args.ssh_config.clone(),
        io_timeout: args.io_timeout,
        ..store_overrides(&args.store)
    }
}
