//! Commands an admin hooks to a run, so no wrapper script is needed: a job's
//! `pre_hook` and `post_hook` on the desktop, and the agent's `--before` on
//! the server (a database dump before the listing), which the server's admin
//! fixes in the forced command — the desktop can trigger it, never choose it
//! (docs/security.md).
//!
//! A hook is `/bin/sh -c COMMAND` in a process group of its own, with
//! `RBACKUP_*` variables in its environment, its stdin empty and its output
//! passed on line by line (to the log on the desktop, to the agent's stderr
//! on the server: the agent's stdout is the protocol). Every wait on it is
//! bounded: past its timeout the whole group is killed, so a hook that hangs
//! or leaves children behind never holds the run (docs/design.md rule 2).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a hook may run unless the job says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The last lines of a hook's output a failure quotes.
const QUOTED_LINES: usize = 5;

/// Where a hook's output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// The run's log (the desktop).
    Log,
    /// This process's stderr (the agent, whose stdout is the protocol).
    Stderr,
}

/// Runs hook `what` (e.g. `pre_hook`): `command` through `/bin/sh -c`, with
/// `env` added to its environment, for at most `timeout`. An error says
/// which hook failed and how (its exit status, its signal, or the timeout).
pub fn run(what: &str, command: &str, env: &[(&str, String)], timeout: Duration, output: Output) -> Result<()> {
    let started = Instant::now();
    crate::info!("{what}: running `{command}`");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: the timeout kills what it started too.
        .process_group(0)
        .spawn()
        .with_context(|| format!("{what}: cannot start /bin/sh"))?;
    let pgid = rustix::process::Pid::from_child(&child);
    // The readers are not joined: a child the hook left in the background
    // may hold the pipes open after the hook itself is gone.
    let last: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    for (stream, name) in [
        (child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), "stdout"),
        (child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>), "stderr"),
    ] {
        let Some(stream) = stream else { continue };
        let (what, last, done) = (what.to_string(), last.clone(), done_tx.clone());
        let _ = std::thread::Builder::new().name(format!("rbackup-hook-{name}")).spawn(move || {
            pass_on(&what, stream, output, &last);
            let _ = done.send(());
        });
    }
    drop(done_tx);
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("{what}: waiting for it"))? {
            break status;
        }
        if started.elapsed() >= timeout {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            let _ = child.wait();
            bail!(
                "{what} `{command}` ran longer than {} s (hook_timeout) and was killed, with what it started",
                timeout.as_secs()
            );
        }
        // A signal to rbackup reaches the hook too (the same terminal or
        // unit): it ends on its own, and its status says so.
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.success() {
        crate::debug!("{what}: done in {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    // Its last words explain the failure: wait a little for the readers to
    // reach the end of the pipes (not for a child that holds them open).
    let deadline = Instant::now() + Duration::from_millis(500);
    while done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok() {}
    let said = {
        let last = last.lock().expect("hook output lock");
        if last.is_empty() {
            String::new()
        } else {
            format!("; it said: {}", last.iter().cloned().collect::<Vec<_>>().join(" / "))
        }
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => bail!("{what} `{command}` failed with exit code {code}{said}"),
        (None, Some(signal)) => {
            bail!("{what} `{command}` was killed by {}{said}", crate::interrupt::signal_name(signal))
        }
        (None, None) => bail!("{what} `{command}` failed ({status}){said}"),
    }
}

/// Passes a hook's output on, a line at a time, escaped (a hook may print
/// anything; a line is cut at 4 KiB so one endless line costs bounded memory).
fn pass_on(what: &str, stream: Box<dyn Read + Send>, output: Output, last: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(4096).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = crate::fs::safefs::Shown(line.strip_suffix(b"\n").unwrap_or(&line)).to_string();
        {
            let mut last = last.lock().expect("hook output lock");
            if last.len() == QUOTED_LINES {
                last.pop_front();
            }
            last.push_back(text.chars().take(200).collect());
        }
        match output {
            Output::Log => crate::info!("{what}: {text}"),
            Output::Stderr => eprintln!("{what}: {text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_sees_its_environment_and_its_exit_code_is_reported() {
        let env = [("RBACKUP_JOB", "web".to_string())];
        run("pre_hook", "test \"$RBACKUP_JOB\" = web", &env, DEFAULT_TIMEOUT, Output::Stderr).unwrap();
        let err = run("pre_hook", "exit 3", &env, DEFAULT_TIMEOUT, Output::Stderr).unwrap_err().to_string();
        assert!(err.contains("pre_hook `exit 3` failed with exit code 3"), "{err}");
        // Its last words are in the error.
        let err = run("before", "echo the database is down >&2; exit 1", &env, DEFAULT_TIMEOUT, Output::Stderr)
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("failed with exit code 1; it said: the database is down"), "{err}");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("child-survived");
        // The hook starts a child that would write the marker later.
        let cmd = format!("(sleep 2; touch '{}') & sleep 30", marker.display());
        let started = Instant::now();
        let err = run("post_hook", &cmd, &[], Duration::from_millis(300), Output::Stderr).unwrap_err().to_string();
        assert!(err.contains("ran longer than 0 s (hook_timeout) and was killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20), "the timeout did not end the wait");
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "a child of the hook outlived its timeout");
    }
}
