//! Holding a backup in the middle of its run: its local agent is stopped
//! (SIGSTOP) once the `.incomplete` holds a given directory, so whatever the
//! test does next — a signal, a timeout — meets a run that is surely not
//! done, however fast the machine.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::{noise, snapshots, write};

/// A source whose backup takes a while: 12 directories of 40 small files,
/// each with a larger file first, so a fetch is usually under way.
pub fn busy_source(src: &Path) {
    for d in 0..12 {
        write(&src.join(format!("d{d:02}/aaa-large.bin")), &noise(7000 + d, 3 << 20));
        for f in 0..40 {
            write(&src.join(format!("d{d:02}/f{f:02}.txt")), &noise(d * 100 + f, 1500 + (f as usize) * 31));
        }
    }
}

/// A run held with its agent stopped.
pub struct Held {
    pub child: Child,
    /// The stopped agent, a child of the run.
    pub agent: Pid,
}

/// Sends `signal` to `pid`.
pub fn send(pid: Pid, signal: Signal) {
    rustix::process::kill_process(pid, signal).expect("send a signal");
}

/// The run's pid.
pub fn pid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32).expect("a pid")
}

/// The processes `pid` started, from /proc.
fn children(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", pid.as_raw_nonzero())) else { return out };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse().ok()).filter_map(Pid::from_raw));
        }
    }
    out
}

/// The processes of `uid` named `comm` (an agent the test's sshd started).
pub fn processes_of(uid: u32, comm: &str) -> Vec<Pid> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()).and_then(Pid::from_raw) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).map(str::to_string);
        let real_uid = field("Uid:").and_then(|u| u.split_whitespace().next().map(str::to_string));
        if field("Name:").as_deref() == Some(comm) && real_uid == Some(uid.to_string()) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Starts `cmd` (a backup of a local source into `bk` under `name`) and
/// stops its agent once `NAME.….incomplete/DIR` exists. `None` if the run
/// ended first (the caller tries again).
pub fn hold_mid_run(cmd: Command, bk: &Path, name: &str, dir: &str) -> Option<Held> {
    hold_mid_run_with(cmd, bk, name, dir, |child| match children(pid(child))[..] {
        [agent] => Some(agent),
        _ => None,
    })
}

/// The same, with `agent_of` finding the agent to stop.
pub fn hold_mid_run_with(
    mut cmd: Command,
    bk: &Path,
    name: &str,
    dir: &str,
    agent_of: impl Fn(&Child) -> Option<Pid>,
) -> Option<Held> {
    let mut child = cmd.spawn().expect("start rbackup");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let inc = snapshots(bk, name).into_iter().find(|(_, complete)| !complete);
        if let Some((inc, _)) = inc
            && bk.join(inc).join(dir).exists()
            && let Some(agent) = agent_of(&child)
        {
            send(agent, Signal::STOP);
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            return Some(Held { child, agent });
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(Instant::now() < deadline, "the run never reached {dir}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `child` to exit by itself; kills it and fails the test if it
/// has not after a bound far beyond what it should take (no timing is
/// asserted, only that it ends).
pub fn wait_by_itself(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rbackup did not exit by itself within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is still a process (a zombie counts as gone).
pub fn alive(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}
