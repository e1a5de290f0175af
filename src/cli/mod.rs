//! The command line, as clap sees it: parsing here, and turning what was
//! parsed into the plain options of config and commands (`convert`); nothing
//! outside this folder sees clap.

// Doc comments here are --help text, where Markdown backticks would show.
#![allow(clippy::doc_markdown)]

mod convert;
mod examples;
pub use convert::refuse_with_all;
use examples::{HISTORY_EXAMPLES, RESTORE_EXAMPLES, SETUP_SERVER_EXAMPLES};
pub mod man;
mod ui;
pub use ui::UiArgs;
mod serve;
pub use serve::ServeArgs;

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  # Snapshot a local folder into /backups/docs.DD-MM-YY_HH-MM-SS
  rbackup --backup --source /srv/docs --backups-folder /backups --name docs

  # Pull a server's tree over SSH (the server runs `rbackup serve`)
  rbackup --backup --source backupuser@server:/srv/content --backups-folder /backups --name server

  # Run the job `server` of /etc/rbackup/rbackup.toml
  rbackup -j server --backup

  # Finish a run that was interrupted, keeping its timestamp
  rbackup -j server --continue

  # What would the next run link, copy and fetch?
  rbackup -j server backup --dry-run

  # The job's snapshots, oldest first
  rbackup -j server --list

  # Every job of the config file, two at a time; check all their settings first
  rbackup check --all --config-only
  rbackup backup --all --parallel 2

Every command is also a long flag: `rbackup --backup` is `rbackup backup`.

Exit codes: 0 ok, 1 failed, 2 usage or config error, 20 stopped by
SIGINT/SIGTERM (`--continue` finishes it), 23 partial (some files could
not be read), 24 files changed or vanished during the run, 75 another run
holds the lock. See docs/exit-codes.md.";

/// Pull-snapshot backups over SSH: every snapshot a full browsable tree,
/// unchanged files hardlinked to the previous one.
#[derive(Parser, Debug)]
#[command(name = "rbackup", version, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: /etc/rbackup/rbackup.toml, if it exists]
    #[arg(short = 'c', long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The job of the configuration file to use
    #[arg(short = 'j', long, global = true, value_name = "NAME")]
    pub job: Option<String>,

    /// More output: -v debug lines, -vv every action
    #[arg(short = 'v', long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Only warnings and errors
    #[arg(short = 'q', long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Take a new snapshot
    #[command(long_flag = "backup")]
    Backup(BackupArgs),

    /// Finish the latest interrupted snapshot (NAME.<stamp>.incomplete), keeping its stamp
    #[command(long_flag = "continue")]
    Continue(RunArgs),

    /// List the job's snapshots, oldest first, with their sizes
    #[command(long_flag = "list")]
    List(ListArgs),

    /// Remove snapshots the retention rules don't keep (borg-style, by the UTC times in the names)
    #[command(long_flag = "prune")]
    Prune(PruneArgs),

    /// Re-read snapshots and compare them with their manifests (exit code 3 on any difference)
    #[command(long_flag = "verify")]
    Verify(VerifyArgs),

    /// What changed between two snapshots: added, removed, changed, metadata only
    #[command(long_flag = "diff")]
    Diff(DiffArgs),

    /// One path across every snapshot: size, mtime, owner, mode, and whether it is new, changed,
    /// metadata only, the same or deleted since the snapshot before
    #[command(long_flag = "history", after_help = HISTORY_EXAMPLES)]
    History(HistoryArgs),

    /// Which snapshots each replica holds and which are pending (every job, or -j JOB)
    Status(StoreArgs),

    /// Copy every complete snapshot a second backups folder lacks, oldest first, unchanged files
    /// hardlinked to the replica before, each checked against its original's manifest
    Replicate(ReplicateArgs),

    /// Put a snapshot (or chosen paths of it) back, with owners, modes, ACLs, xattrs and times
    #[command(long_flag = "restore", after_help = RESTORE_EXAMPLES)]
    Restore(RestoreArgs),

    /// Send a test message with the job's [email] settings
    #[command(name = "test-email", long_flag = "test-email")]
    TestEmail(StoreArgs),

    /// Prepare this server for backups, as root: the backup user, its read access, its
    /// confined key (and a write-confined restore key)
    #[command(name = "setup-server", long_flag = "setup-server", after_help = SETUP_SERVER_EXAMPLES)]
    SetupServer(SetupServerArgs),

    /// Prepare this desktop for a job, as root: a key, the server's host key, the job in the config
    #[command(name = "setup-client", long_flag = "setup-client")]
    SetupClient(SetupClientArgs),

    /// Check a job: SSH, the agent, that every file is readable, the backups folder, the lock, mail
    #[command(long_flag = "check")]
    Check(CheckArgs),

    /// Print the man page rbackup(1) on stdout: `rbackup man > rbackup.1`; with --dir,
    /// write every page there: rbackup.1, rbackup-COMMAND.1 per command, rbackup.toml.5
    Man {
        /// Write all the pages into this folder (created if missing) and list them
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },

    /// Print shell completions on stdout: `rbackup completions bash > /etc/bash_completion.d/rbackup`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Run the agent on stdin/stdout (started by the desktop over SSH, usually as a
    /// forced command: restrict,command="rbackup serve --read-only --root /srv/content")
    #[command(long_flag = "serve")]
    Serve(ServeArgs),

    /// A web console on 127.0.0.1: every job at a glance, browse snapshots, a file's history,
    /// restores (with --allow-actions); prints the URL with its secret token (docs/ui.md)
    Ui(UiArgs),
}

/// Where the snapshots are.
#[derive(Args, Debug, Default, Clone)]
pub struct StoreArgs {
    /// Folder holding the snapshot folders
    #[arg(long, value_name = "DIR")]
    pub backups_folder: Option<PathBuf>,

    /// Prefix of the snapshot folders, e.g. "server" for server.07-10-19_13-32-58
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// How to reach the agent: options of every command that talks to it.
#[derive(Args, Debug, Default, Clone)]
pub struct ConnectArgs {
    /// The rbackup binary on the server, like rsync's --rsync-path [default: rbackup]
    #[arg(long, value_name = "PATH")]
    pub remote_bin: Option<String>,

    /// An ssh config file for this job (ssh -F): host, port, identity, `known_hosts`
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,

    /// End the run as failed when the agent sends nothing (or takes nothing) for this
    /// long; 0 waits forever [default: 300, or io_timeout in the job]
    #[arg(long, value_name = "SECS")]
    pub io_timeout: Option<u64>,
}

/// Options of `backup` and `continue`; they override the config file.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// What to back up: `/abs/path` (local) or `[user@]host:/abs/path` (over SSH)
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,

    /// Leave out matching paths (gitignore syntax, relative to the source root;
    /// repeatable, added to the job's list)
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,

    /// Print what would be linked, copied, fetched and removed; write nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Also back up device nodes (needs root on the desktop)
    #[arg(long)]
    pub devices: bool,

    /// Append the log to this file, with timestamps
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Compress the data on the wire with zstd (worth it on slow links)
    #[arg(long)]
    pub compress: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Write the end-of-run summary as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,

    /// Read exclude patterns from FILE, one a line (# comments; repeatable,
    /// added to the job's)
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,

    /// Don't descend into other filesystems below the source root (a mount
    /// point is kept as an empty directory)
    #[arg(short = 'x', long)]
    pub one_file_system: bool,

    /// Send at most RATE bytes per second on average: 500K, 5M, 1G (powers
    /// of 1024) or plain bytes; 0 for no limit
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
}

/// Options of `backup`: those of a run, and every job at once.
#[derive(Args, Debug, Default, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Back up every job of the config file, in its order; one line per job at the end, and
    /// the worst exit code (see docs/exit-codes.md)
    #[arg(long)]
    pub all: bool,

    /// With --all: run N jobs at a time [default: 1]
    #[arg(long, value_name = "N", requires = "all", value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: Option<u16>,
}

/// `--all` of `prune` and `verify`.
#[derive(Args, Debug, Default, Clone)]
pub struct AllArgs {
    /// Every job of the config file, one after the other; one line per job at the end, and
    /// the worst exit code
    #[arg(long)]
    pub all: bool,
}

/// Options of `list`.
#[derive(Args, Debug, Default, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Don't compute sizes (they walk every snapshot)
    #[arg(long)]
    pub no_sizes: bool,

    /// Sizes in bytes, for scripts
    #[arg(long)]
    pub bytes: bool,
}

/// The retention rules as `prune` options.
#[derive(Args, Debug, Clone, Default)]
pub struct RulesArgs {
    /// Keep the N newest snapshots
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep every snapshot newer than this: 36h, 7d, 4w, 6m, 1y
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep the newest snapshot of each of the N most recent hours
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent days (UTC)
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent months
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent years
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
}

/// How the backup user reads (`setup-server --mode`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default)]
pub enum ModeArg {
    /// An access ACL on everything and a default ACL on directories.
    #[default]
    Acl,
    /// A copy of the agent that only the backup user can run, with
    /// `CAP_DAC_READ_SEARCH`.
    Capability,
    /// The off-site host of replicas: root's key confined to `serve --append-only --root DIR`
    Replica,
}

/// Options of `prune`.
#[derive(Args, Debug, Default, Clone)]
pub struct PruneArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub rules: RulesArgs,
    /// Print keep/remove for each snapshot with the rule that keeps it; remove nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub jobs: AllArgs,
}

/// Options of `verify`.
#[derive(Args, Debug, Default, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// A snapshot's name, `latest`, `all`, or a UTC time [default: latest]
    #[arg(long, value_name = "NAME|latest|all")]
    pub snapshot: Option<String>,
    #[command(flatten)]
    pub jobs: AllArgs,
}

/// Options of `diff`.
#[derive(Args, Debug, Default, Clone)]
pub struct DiffArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The older snapshot: a name, `previous`, `latest` or a UTC time
    pub a: String,
    /// The newer snapshot
    #[arg(default_value = "latest")]
    pub b: String,
}

/// Options of `replicate`.
#[derive(Args, Debug, Default, Clone)]
pub struct ReplicateArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// The second backups folder: a local folder (a second drive; created 0700 if missing), or
    /// `[user@]host:/path` served by `rbackup serve --append-only` [default: each of the job's
    /// `replicas`]
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,

    /// List the snapshots each destination would get (and what its own prune would remove;
    /// `status` says how much each would copy); write nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Make a first replica in --to DEST even though a replicate reached DEST before (a new,
    /// empty drive in place of a lost one); without it, such a destination that holds no replica
    /// now is taken for a drive not mounted
    #[arg(long, requires = "to")]
    pub new_drive: bool,

    /// Compress the data on the wire with zstd (over SSH)
    #[arg(long)]
    pub compress: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Send at most RATE bytes per second on average (over SSH): 500K, 5M, 1G or plain bytes;
    /// 0 for no limit [default: the job's bwlimit]
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
}

/// Options of `history`.
#[derive(Args, Debug, Default, Clone)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The path, relative to the snapshot root (a leading / means the same)
    pub path: PathBuf,
    /// Copy each distinct content of the path into DIR as NAME.<stamp> (mtime and permission
    /// bits kept; nothing overwritten; not inside the backups folder)
    #[arg(long, value_name = "DIR")]
    pub all_versions_to: Option<PathBuf>,
    /// Print the rows as one JSON array
    #[arg(long)]
    pub json: bool,
}

/// Options of `restore`.
#[derive(Args, Debug, Default, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// Which snapshot: a folder name, `latest`, or a UTC time (the newest snapshot at or
    /// before it: YYYY-MM-DD, "YYYY-MM-DD HH:MM[:SS]") [default: latest]
    #[arg(long, value_name = "NAME|latest|TIME")]
    pub snapshot: Option<String>,

    /// Restore only this path of the snapshot (repeatable) [default: everything]
    #[arg(long = "path", value_name = "REL")]
    pub paths: Vec<String>,

    /// Where to: `[user@]host:/abs/path` or a local `/abs/path` [default: the job's
    /// `restore_to`, else its source: in place]
    #[arg(long, value_name = "DEST")]
    pub to: Option<String>,

    /// Also remove what the destination has and the snapshot doesn't
    #[arg(long)]
    pub delete: bool,

    /// List what would be created, replaced, changed (metadata only) or deleted; change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Compress the data on the wire with zstd
    #[arg(long)]
    pub compress: bool,

    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Send at most RATE bytes per second on average: 500K, 5M, 1G or plain
    /// bytes; 0 for no limit [default: the job's bwlimit]
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,
}

/// Options of `setup-server`.
#[derive(Args, Debug, Clone)]
pub struct SetupServerArgs {
    /// The backup user (created if missing; not with --mode replica)
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// The tree to back up (with --mode replica: the folder replicas go into)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,

    /// The desktop's public key for backups (with --mode replica: for replicas)
    #[arg(long, value_name = "PUBKEY")]
    pub key: String,

    /// How the backup user reads: ACLs on the tree, or an agent with CAP_DAC_READ_SEARCH; or
    /// `replica`: this host takes the desktop's replicas, append-only
    #[arg(long, value_enum, default_value = "acl")]
    pub mode: ModeArg,

    /// The desktop's public key for restores: root, confined to `serve --write --root DIR`
    #[arg(long, value_name = "PUBKEY")]
    pub restore_key: Option<String>,

    /// Print every step, do nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Where the capability agent is installed
    #[arg(long, value_name = "DIR", default_value = "/usr/local/lib/rbackup")]
    pub agent_dir: PathBuf,

    /// Where the backup user's home is created
    #[arg(long, value_name = "DIR", default_value = "/var/lib/rbackup")]
    pub home_base: PathBuf,

    /// A command the agent runs before each backup lists the root (e.g. a
    /// database dump), written into the key's forced command
    #[arg(long, value_name = "CMD")]
    pub before: Option<String>,
}

/// Options of `setup-client` (the job's name is `--job`).
#[derive(Args, Debug, Clone)]
pub struct SetupClientArgs {
    /// What to back up: `[user@]host:/abs/path`
    #[arg(long, value_name = "SRC")]
    pub remote: String,

    /// The server's SSH port, written into the job's ssh config [default: 22]
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Where the snapshots go
    #[arg(long, value_name = "DIR", default_value = "/backups")]
    pub backups_folder: PathBuf,

    /// Accept this host key fingerprint (SHA256:...) without asking; check it on the
    /// server first: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub
    #[arg(long, value_name = "FINGERPRINT")]
    pub accept_host_key: Option<String>,

    /// Also set up restores: a second key (keys/JOB-restore) for root on the server, its
    /// `Host JOB-restore` in the job's ssh config, and the job's restore_to; the printed
    /// setup-server line then has --restore-key
    #[arg(long)]
    pub restore: bool,

    /// The job's log file [default: /var/log/rbackup/JOB.log]
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Print every step, do nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `check`.
#[derive(Args, Debug, Default, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    /// What to back up: /abs/path or [user@]host:/abs/path
    #[arg(long, value_name = "SRC")]
    pub source: Option<String>,

    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Check every job of the config file
    #[arg(long)]
    pub all: bool,

    /// Only the config file: every key of the job (with --all, of every job) and [email],
    /// without the network or the backups folders; exit code 2 if anything is wrong
    #[arg(long)]
    pub config_only: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Regression: `diff --help` said "[default: latest] [default: latest]",
    /// once from the doc comment and once from clap.
    #[test]
    fn no_help_text_states_a_default_that_clap_already_shows() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                if !arg.get_default_values().is_empty() && help.contains("[default:") {
                    bad.push(format!("{path} --{}: {help}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&super::Cli::command(), "rbackup", &mut bad);
        assert!(bad.is_empty(), "{bad:#?}");
    }
}
