//! `check`: everything a job needs, tested without writing a snapshot — the
//! SSH connection and agent, the path served, that the backup user can read
//! every file (the ACL mask trap), the backups folder's space, inodes and
//! permissions, the lock, each replica, the mail settings. One line per item, and a fix
//! for each problem.

use std::os::unix::fs::MetadataExt;

use anyhow::Result;

use crate::config::{Job, SourceSpec};
use crate::error::Code;
use crate::report::human_bytes;
use crate::report::{Events, Problem, ProblemKind};
use crate::sink::SinkConfig;
use crate::store::Store;

use crate::transport;
use crate::wire::SOFTWARE;
use crate::wire::msg::{Role, SessionOptions};

struct Report {
    failed: bool,
}

impl Report {
    #[allow(clippy::unused_self)] // reads as the twin of `bad`
    fn good(&self, what: &str) {
        println!("ok    {what}");
    }

    fn bad(&mut self, what: &str, fix: &str) {
        self.failed = true;
        println!("FAIL  {what}");
        for line in fix.lines() {
            println!("      {line}");
        }
    }
}

/// Collects what the source could not read; prints nothing else.
struct Unreadable {
    paths: Vec<Problem>,
    count: u64,
    /// Of those, the ones the backup user was refused.
    denied: u64,
}

impl Events for Unreadable {
    fn action(&mut self, _verb: &str, _path: &[u8]) {}

    fn problem(&mut self, problem: Problem) {
        if problem.kind == ProblemKind::Unreadable {
            self.count += 1;
            self.denied += u64::from(problem.is_permission_denied());
            if self.paths.len() < 50 {
                self.paths.push(problem);
            }
        }
    }

    fn note(&mut self, _text: &str) {}
}

/// Runs every check of `job`; exit code 0 if all pass.
pub fn run(job: &Job) -> Result<Code> {
    let mut r = Report { failed: false };
    println!("checking job {}", job.job);
    check_source(job, &mut r);
    check_folder(job, &mut r);
    check_replicas(job, &mut r);
    check_email(job, &mut r);
    Ok(if r.failed { Code::Error } else { Code::Ok })
}

fn check_source(job: &Job, r: &mut Report) {
    let Some(source) = &job.source else {
        r.bad("no source", "set `source` in the job");
        return;
    };
    let conn = match transport::connect(job, Role::Source) {
        Ok(c) => c,
        Err(e) => {
            r.bad(&format!("connect to {source}: {e:#}"), &connect_fix(source, &e));
            return;
        }
    };
    let (conn, path) = conn;
    let options = SessionOptions {
        excludes: job.excludes.clone(),
        probe_read: true,
        one_file_system: job.one_file_system,
        only: job.paths.iter().map(|p| p.clone().into_bytes()).collect(),
        ..SessionOptions::default()
    };
    let hello = crate::session::hello(Role::Source, &path, options);
    let session = match conn.handshake(&hello) {
        Ok(s) => s,
        Err(e) => {
            r.bad(&format!("agent for {source}: {e:#}"), "see docs/setup.md");
            return;
        }
    };
    r.good(&format!("{source}: reachable, agent speaks protocol {} (rbackup {SOFTWARE})", crate::wire::VERSION));
    r.good(&format!("path served: {}", String::from_utf8_lossy(&session.root)));

    // Walk the whole tree as the backup user would, opening every file.
    let mut events = Unreadable { paths: Vec::new(), count: 0, denied: 0 };
    // A dry run writing nowhere: it only lists what can't be read.
    let cfg = SinkConfig { dry_run: true, devices: job.devices, ..SinkConfig::default() };
    match crate::session::drive_sink(session, cfg, &mut events) {
        Ok(driven) => {
            let user = backup_user(job).unwrap_or_else(|| "USER".into());
            report_unreadable(&events, driven.outcome.stats.entries, &user, r);
        }
        Err(crate::session::Failure { error, conn }) => {
            let said = match &conn {
                Some(conn) if transport::from_peer(&error) => conn.agent_said(),
                _ => String::new(),
            };
            r.bad(&format!("walking {source}: {error:#}{said}"), "see docs/troubleshooting.md");
        }
    }
}

/// The account the source is read as: the source's `user@`, else the `User`
/// ssh would use for the host (`ssh -G`, with the job's ssh config); `None`
/// for a local source.
pub(crate) fn backup_user(job: &Job) -> Option<String> {
    let Some(crate::config::SourceSpec::Remote { user, host, .. }) = &job.source else { return None };
    if let Some(u) = user {
        return Some(u.clone());
    }
    let mut ssh = std::process::Command::new("ssh");
    if let Some(cfg) = &job.ssh_config {
        ssh.arg("-F").arg(cfg);
    }
    let out = ssh.arg("-G").arg("--").arg(host).stderr(std::process::Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let user = text.lines().find_map(|l| l.strip_prefix("user "))?.trim();
    (out.status.success() && !user.is_empty()).then(|| user.to_string())
}

/// What the walk could not read: refusals get the ACL fix; other errors
/// (an entry replaced while the walk looked at it) are only listed.
fn report_unreadable(events: &Unreadable, entries: u64, user: &str, r: &mut Report) {
    let list = |problems: &[&Problem], count: u64| -> String {
        let mut list: String = problems.iter().map(|p| format!("{}: {}\n", p.path, p.detail)).collect();
        if count > problems.len() as u64 {
            list.push_str(&format!("… and {} more\n", count - problems.len() as u64));
        }
        list
    };
    let (denied, other): (Vec<&Problem>, Vec<&Problem>) = events.paths.iter().partition(|p| p.is_permission_denied());
    if events.count == 0 {
        r.good(&format!("every entry under the path is readable by the backup user ({entries} entries)"));
    }
    if events.denied > 0 {
        r.bad(
            &format!("{} can't be read by the backup user", crate::report::count(events.denied, "entry", "entries")),
            &format!(
                "{}fix: on the server, `setfacl -m u:{user}:rX PATH` (a chmod may have shrunk the ACL mask; a file \
                 moved in may lack the default ACL), or re-run `rbackup setup-server`, or use --mode capability",
                list(&denied, events.denied)
            ),
        );
    }
    let others = events.count - events.denied;
    if others > 0 {
        r.bad(
            &format!(
                "{} could not be read for another reason than permissions",
                crate::report::count(others, "entry", "entries")
            ),
            &format!(
                "{}they may have changed while the check read them: run it again; if they stay, look at \
                 them on the server",
                list(&other, others)
            ),
        );
    }
}

/// What to do about a failed connection.
fn connect_fix(source: &SourceSpec, err: &anyhow::Error) -> String {
    match err.downcast_ref::<transport::SshError>() {
        // sshd without PAM refuses every login to an account locked with
        // `passwd -l` (`!` in /etc/shadow), keys included, and says so only
        // in its own log: the classic setup step is the likely cause.
        Some(transport::SshError::AuthRefused { .. }) => {
            let user = match source {
                SourceSpec::Remote { user: Some(u), .. } => u.as_str(),
                _ => "BACKUPUSER",
            };
            format!(
                "if the account is locked with passwd -l, use `usermod -p '*' {user}` instead: it has no \
                 password but is not locked, so sshd lets its key in\nsee docs/setup.md"
            )
        }
        _ => "see docs/setup.md".into(),
    }
}

fn check_folder(job: &Job, r: &mut Report) {
    let folder = &job.backups_folder;
    if !folder.exists() {
        r.good(&format!("backups folder {} will be created (0700) by the first backup", folder.display()));
        return;
    }
    match rustix::fs::statvfs(folder) {
        Ok(s) => {
            let free = s.f_bavail * s.f_frsize;
            let total = s.f_blocks * s.f_frsize;
            let pct = (free * 100).checked_div(total).unwrap_or(0);
            let line = format!(
                "backups folder {}: {} free of {} ({pct}%), {} inodes free",
                folder.display(),
                human_bytes(free),
                human_bytes(total),
                s.f_favail
            );
            if pct < 5 || s.f_favail < 10_000 {
                r.bad(&line, "free space or inodes are low: prune old snapshots (rbackup prune) or grow the disk");
            } else {
                r.good(&line);
            }
        }
        Err(e) => r.bad(&format!("backups folder {}: {e}", folder.display()), "check the path"),
    }
    if let Ok(st) = rustix::fs::stat(folder) {
        let mode = st.st_mode & 0o777;
        if mode & 0o011 != 0 {
            r.bad(
                &format!("backups folder mode {mode:o}: other users can enter it"),
                &format!("snapshots keep private files and setuid programs: chmod 700 {}", folder.display()),
            );
        } else {
            r.good(&format!("backups folder mode {mode:o}"));
        }
    }
    if let Ok(store) = Store::open(folder, &job.name)
        && let Ok(meta) = store.meta_dir()
    {
        let shown = crate::store::shown(folder, &job.name);
        match crate::store::lock::acquire(&meta, "check", &shown) {
            Ok(_lock) => r.good("lock: free"),
            Err(e) => println!("note  {e:#}"),
        }
        if let Ok(snaps) = store.snapshots() {
            let complete = snaps.iter().filter(|s| s.complete).count();
            let newest = snaps.iter().rev().find(|s| s.complete).map_or("none".to_string(), |s| s.folder.clone());
            if complete == 0 {
                r.good("no complete snapshot yet");
            } else {
                r.good(&format!(
                    "{}; the newest is {newest}",
                    crate::report::count(complete as u64, "complete snapshot", "complete snapshots")
                ));
            }
        }
    }
}

/// Each of the job's `replicas`: a drive that holds the job's replicas
/// (mounted, not the backups folder's own disk), or an append-only agent
/// that answers.
fn check_replicas(job: &Job, r: &mut Report) {
    for dest in &job.replicas {
        let first = job.command(&format!("replicate --to {}", dest.to));
        let held = match crate::cmd::replicate::destination(&dest.to) {
            Ok((_, Some(remote))) => match remote.connect(job).and_then(|c| c.held(job)) {
                Ok(held) => held,
                Err(e) => {
                    r.bad(
                        &format!("replica {}: its agent can't be asked: {e:#}", dest.to),
                        "the Host alias, the replica key and setup-server --mode replica: docs/replicate.md",
                    );
                    continue;
                }
            },
            Ok((to, None)) => {
                let dev = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| m.dev());
                if !to.join(format!("{}.rbackup", job.name)).is_dir() {
                    let what = format!("replica {}: holds no replica of {} (a drive not mounted?)", dest.to, job.name);
                    let reached = crate::store::Store::open(&job.backups_folder, &job.name)
                        .ok()
                        .and_then(|s| crate::store::held::remembered(&s, &dest.key()));
                    if let Some(reached) =
                        reached.as_ref().filter(|r| dest.away_days > 0 && r.within_days(dest.away_days))
                    {
                        println!(
                            "note  replica {}: away since {} (it may be away {} days; its snapshots wait for it)",
                            dest.to,
                            reached.shown(),
                            dest.away_days
                        );
                    } else if let Some(reached) = reached {
                        r.bad(&what, &format!("a replicate reached it on {}: mount the drive", reached.shown()));
                    } else if job.replicate_after_backup {
                        r.bad(&what, &format!("mount the drive; the first replica is made by hand: `{first}`"));
                    } else {
                        println!("note  {what}; the first one is made by `{first}`");
                    }
                    continue;
                }
                if dev(&to).is_some() && dev(&to) == dev(&job.backups_folder) {
                    r.bad(
                        &format!("replica {}: on the backups folder's own filesystem", dest.to),
                        "a copy there is no second drive: is the drive mounted?",
                    );
                    continue;
                }
                Store::open(&to, &job.name).and_then(|s| s.snapshots()).unwrap_or_default()
            }
            Err(e) => {
                r.bad(&format!("replica {}: {e:#}", dest.to), "see docs/configuration.md, `replicas`");
                continue;
            }
        };
        let complete = held.iter().filter(|s| s.complete).count() as u64;
        r.good(&format!(
            "replica {}: {}",
            dest.to,
            crate::report::count(complete, "complete snapshot", "complete snapshots")
        ));
    }
}

fn check_email(job: &Job, r: &mut Report) {
    let Some(email) = &job.email else {
        println!("note  no [email] section: failures are only logged");
        return;
    };
    match email.check() {
        Ok(()) => r.good(&format!("email: {} reachable, reports to {}", email.server(), email.to.join(", "))),
        Err(e) => {
            // The first line is what failed; the lines after it are the fix.
            let text = format!("{e:#}");
            let (what, more) = text.split_once('\n').unwrap_or((&text, ""));
            let fix: String = more.lines().map(|l| format!("{}\n", l.trim())).collect();
            r.bad(
                &format!("email: {what}"),
                &format!("{fix}fix the [email] section; `rbackup test-email` sends a test"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, parse, resolve};

    fn job_with(source: &str, ssh_config: &std::path::Path) -> Job {
        let text = format!(
            "[job.web]\nsource = \"{source}\"\nbackups_folder = \"/backups\"\nssh_config = \"{}\"\n",
            ssh_config.display()
        );
        let file = (std::path::PathBuf::from("/etc/x.toml"), parse(&text).unwrap());
        resolve(Some(&file), Some("web"), &Overrides::default()).unwrap()
    }

    /// Regression: the setfacl hint said `u:USER:rX` although the user was known.
    #[test]
    fn the_backup_user_comes_from_the_source_or_the_ssh_config() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tmp.path().join("ssh_config");
        std::fs::write(&cfg, "Host fileserver\n  User bkreader\n").unwrap();
        assert_eq!(backup_user(&job_with("alice@fileserver:/srv", &cfg)).as_deref(), Some("alice"));
        assert_eq!(backup_user(&job_with("fileserver:/srv", &cfg)).as_deref(), Some("bkreader"));
        assert_eq!(backup_user(&job_with("/srv", &cfg)), None);
    }
}
