//! Parse, run, map the outcome to an exit code. Nothing else.

use std::process::ExitCode;

use clap::Parser;

use rbackup::cli::{Cli, Command, RestoreArgs, RunArgs, StoreArgs};
use rbackup::config::{self, Job, Overrides};
use rbackup::exit::{Code, code_of};
use rbackup::{backup, error, finish, list, log, notify, restore, serve, store};

fn main() -> ExitCode {
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
    match &cli.command {
        Command::Serve(args) => {
            log::set_tag("agent");
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
            let resume = matches!(cli.command, Command::Continue(_));
            let opts = backup::RunOptions { resume, dry_run: args.dry_run };
            let started = chrono::Utc::now();
            let result = backup::run(&job, &opts);
            match &result {
                Ok(report) => backup::print_summary(report, opts.dry_run),
                Err(e) => error!("{e:#}"),
            }
            finish::after_backup(&job, if resume { "continue" } else { "backup" }, started, &result, opts.dry_run);
            let report = match result {
                Ok(r) => r,
                Err(e) => return Ok(code_of(&e)),
            };
            if let Some(path) = &args.stats_json {
                backup::write_stats_json(path, &job, &report)?;
            }
            Ok(report.code)
        }
        Command::Restore(args) => {
            let job = job(cli, &restore_overrides(args))?;
            log::set_tag(&job.job);
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
            let subject = format!("[rbackup] {} on {}: test message", job.job, notify::hostname());
            let body = format!(
                "This is a test of rbackup's mail reports for job {} on {}.\nReports are sent on: {:?}.\n",
                job.job,
                notify::hostname(),
                email.send_on
            );
            email.send(&subject, &body)?;
            rbackup::info!("test message sent to {}", email.to.join(", "));
            Ok(Code::Ok)
        }
        Command::List(args) => {
            let job = job(cli, &store_overrides(args))?;
            list::run(&store::Store::open(&job.backups_folder, &job.name)?)?;
            Ok(Code::Ok)
        }
    }
}

fn job(cli: &Cli, overrides: &Overrides) -> anyhow::Result<Job> {
    let file = config::find(cli.config.as_deref())?;
    config::resolve(file.as_ref(), cli.job.as_deref(), overrides)
}

fn store_overrides(args: &StoreArgs) -> Overrides {
    Overrides { backups_folder: args.backups_folder.clone(), name: args.name.clone(), ..Overrides::default() }
}

fn restore_overrides(args: &RestoreArgs) -> Overrides {
    Overrides {
        compress: args.compress,
        remote_bin: args.remote_bin.clone(),
        ssh_config: args.ssh_config.clone(),
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
        ..store_overrides(&args.store)
    }
}
