//! Parse, run, map the outcome to an exit code. Nothing else.

use std::process::ExitCode;

use clap::Parser;

use rbackup::cli::{Cli, Command, refuse_with_all};
use rbackup::cmd::all_jobs::{self, AllJobs};
use rbackup::cmd::prune::Rules;
use rbackup::config::{self, Job, Overrides};
use rbackup::error::{Code, code_of};
use rbackup::{
    agent::serve, cmd::backup, cmd::check, cmd::diff, cmd::list, cmd::prune, cmd::restore, cmd::verify, error,
    interrupt, log, setup, store,
};

fn main() -> ExitCode {
    // As the backup user's login shell, sshd runs `rbackup -c COMMAND`.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let login = args.first().is_some_and(|a| a.as_encoded_bytes().starts_with(b"-"));
    let command_line = args.len() == 3 && args[1] == "-c" && args[2].to_string_lossy().contains(' ');
    if login || command_line {
        let command = args.get(2).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        let Err(e) = rbackup::agent::shell::shell(&command);
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
            if args.write || args.append_only {
                // A restore's (or a replica's) agent writes: a Ctrl-C (which
                // reaches a local agent too) or a stop ends its sink at a safe
                // point, so no temporary file is left in the destination. (A read-only
                // agent has nothing to clean up, and ends when the desktop
                // hangs up.)
                interrupt::install()?;
            }
            serve::run(&args.into())?;
            Ok(Code::Ok)
        }
        Command::Backup(a) if a.all => {
            let args = a.run.for_every_job()?;
            let all = AllJobs::load(cli.config.as_deref(), cli.job.as_deref())?;
            interrupt::install()?;
            let exe = std::env::current_exe()?;
            let parallel = a.parallel.map_or(1, usize::from);
            let children = all_jobs::Children { exe, global: cli.verbosity_args(), args, parallel };
            Ok(all_jobs::summarize("backup", &all_jobs::backup(&all, &children)?))
        }
        Command::Prune(a) if a.jobs.all => {
            let overrides = a.store.overrides();
            refuse_with_all(&overrides)?;
            let all = AllJobs::load(cli.config.as_deref(), cli.job.as_deref())?;
            Ok(all_jobs::summarize("prune", &all_jobs::prune(&all, &overrides, &Rules::from(&a.rules), a.dry_run)))
        }
        Command::Verify(a) if a.jobs.all => {
            let overrides = a.store.overrides();
            refuse_with_all(&overrides)?;
            let all = AllJobs::load(cli.config.as_deref(), cli.job.as_deref())?;
            Ok(all_jobs::summarize("verify", &all_jobs::verify(&all, &overrides, a.snapshot.as_deref())))
        }
        Command::Check(a) if a.all || a.config_only => {
            let overrides = a.overrides();
            refuse_with_all(&overrides)?;
            let all = if a.all {
                AllJobs::load(cli.config.as_deref(), cli.job.as_deref())?
            } else {
                AllJobs::one(cli.config.as_deref(), cli.job.as_deref())?
            };
            if a.config_only {
                Ok(rbackup::cmd::check_config::run(&all))
            } else {
                Ok(all_jobs::summarize("check", &all_jobs::check(&all, &overrides)))
            }
        }
        Command::Backup(rbackup::cli::BackupArgs { run: args, .. }) | Command::Continue(args) => {
            let job = job(cli, &args.overrides())?;
            open_log(&job)?;
            log::set_tag(&job.job);
            interrupt::install()?;
            let resume = matches!(cli.command, Command::Continue(_));
            let opts = backup::RunOptions { resume, dry_run: args.dry_run, ..Default::default() };
            rbackup::cmd::run::command(&job, &opts, args.stats_json.as_deref())
        }
        Command::Restore(args) => {
            let job = job(cli, &args.overrides())?;
            // A restore changes a server's files: it leaves its trace in the
            // job's log like a backup.
            open_log(&job)?;
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
            let job = job(cli, &args.overrides())?;
            let email = job.email.ok_or_else(|| anyhow::anyhow!("there is no [email] section in the config file"))?;
            let (subject, body) = email.test_message(&job.job);
            email.send(&subject, &body)?;
            rbackup::info!("test message sent to {}", email.to.join(", "));
            Ok(Code::Ok)
        }
        Command::SetupServer(a) => {
            setup::server(&a.into())?;
            Ok(Code::Ok)
        }
        Command::SetupClient(a) => {
            let job = cli.job.clone().ok_or_else(|| rbackup::usage!("setup-client needs --job NAME"))?;
            setup::client(&a.options(job, cli.config_path()))?;
            Ok(Code::Ok)
        }
        Command::Check(args) => {
            let job = job(cli, &args.overrides())?;
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
            let job = job(cli, &args.store.overrides())?;
            list::run(&store::Store::open(&job.backups_folder, &job.name)?, !args.no_sizes, args.bytes)?;
            Ok(Code::Ok)
        }
        Command::Prune(a) => {
            let job = job(cli, &a.store.overrides())?;
            // What prune deletes is recorded in the job's log.
            if !a.dry_run {
                open_log(&job)?;
            }
            log::set_tag(&job.job);
            prune::run(&job, &Rules::from(&a.rules).or(&job.prune), a.dry_run)
        }
        Command::Verify(a) => {
            let job = job(cli, &a.store.overrides())?;
            verify::run(&job, a.snapshot.as_deref())
        }
        Command::Diff(a) => {
            let job = job(cli, &a.store.overrides())?;
            diff::run(&job, &a.a, &a.b)
        }
        Command::Status(a) => {
            if cli.job.is_some() || a.backups_folder.is_some() {
                rbackup::cmd::status::run(&job(cli, &a.overrides())?)?;
            } else {
                let all = rbackup::cmd::all_jobs::AllJobs::load(cli.config.as_deref(), None)?;
                for name in &all.names {
                    rbackup::cmd::status::run(&all.resolve(name, &a.overrides())?)?;
                }
            }
            Ok(Code::Ok)
        }
        Command::Replicate(a) => {
            let job = job(cli, &a.overrides())?;
            open_log(&job)?;
            log::set_tag(&job.job);
            interrupt::install()?;
            let to = match &a.to {
                Some(to) => vec![rbackup::config::Destination::named(to, &job.replicas)],
                None if job.replicas.is_empty() => {
                    return Err(rbackup::usage!("no destination: give --to DIR, or set `replicas` in the job"));
                }
                None => job.replicas.clone(),
            };
            // A first replica only where one was named: a configured
            // destination not holding the job's replicas is a drive not
            // mounted, whoever runs it.
            let seed = match (&a.to, a.new_drive) {
                (None, _) => rbackup::cmd::replicate::Seed::Never,
                (Some(_), false) => rbackup::cmd::replicate::Seed::IfNew,
                (Some(_), true) => rbackup::cmd::replicate::Seed::Always,
            };
            // Each destination, whatever became of the one before.
            let mut code = Code::Ok;
            for dest in &to {
                let done = match rbackup::cmd::replicate::run(&job, dest, a.dry_run, seed) {
                    Ok(c) => c,
                    Err(e) if to.len() == 1 => return Err(e),
                    Err(e) => {
                        rbackup::error!("replicating to {}: {e:#}", dest.to);
                        rbackup::error::code_of(&e)
                    }
                };
                code = Code::worst([code, done]);
                if rbackup::interrupt::received().is_some() {
                    break;
                }
            }
            Ok(code)
        }
        Command::Ui(a) => rbackup::ui::run(&a.options(cli.config.clone(), cli.job.clone())),
        Command::History(a) => {
            let job = job(cli, &a.store.overrides())?;
            let opts = rbackup::cmd::history::Options {
                path: a.path.clone(),
                all_versions_to: a.all_versions_to.clone(),
                json: a.json,
            };
            rbackup::cmd::history::run(&job, &opts)
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

/// Appends this run's log to the job's `log_file`, if it has one.
fn open_log(job: &Job) -> anyhow::Result<()> {
    if let Some(path) = &job.log_file {
        log::open_file(path).map_err(|e| anyhow::anyhow!("cannot open the log file {}: {e}", path.display()))?;
    }
    Ok(())
}

fn job(cli: &Cli, overrides: &Overrides) -> anyhow::Result<Job> {
    let file = config::find(cli.config.as_deref())?;
    config::resolve(file.as_ref(), cli.job.as_deref(), overrides)
}
