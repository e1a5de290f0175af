//! What the console *does*: every restore, backup, verify and prune is this
//! binary run as a child process with the job's config (`current_exe -c
//! CONFIG -j JOB COMMAND ...`), so it goes through exactly the checks,
//! locks and logs of the command line, and a console bug can't write
//! anything the commands wouldn't. Only with `--allow-actions`.
//!
//! A restore and a prune run first with `--dry-run`: the preview's output
//! (what would be created, replaced, deleted) is shown with a button that
//! runs the real thing. The real command is fixed when the preview starts
//! ([`Confirm`]: the snapshot resolved to its folder, the paths, the
//! destination) and runs only through `POST /confirm` with the preview's
//! one-use token, once the preview has finished well: there is no other
//! way to run a restore or a prune.
//! The output streams to the page as Server-Sent Events (`/op/events`).
//!
//! Every operation leaves two lines — started, finished with its exit code
//! and last output — in the job's operation log, `NAME.rbackup/console.jsonl`
//! beside the snapshots (append-only JSON lines; docs/ui.md).

use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use axum::extract::{RawQuery, State as AxState};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::html;
use rustix::fs::{Mode, OFlags};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

use super::State;
use super::pages::{blocking, error_page, failed, layout, url, when};
use super::paths::Params;
use crate::config::Job;
use crate::store::Store;

pub use super::restore::{restore, restore_form};

/// The operation log's file in the job's bookkeeping folder.
pub const LOG_FILE: &str = "console.jsonl";
/// Output lines kept with an operation's "finished" record.
const LOG_TAIL: usize = 10;
/// Output lines kept in memory per operation; later ones are dropped
/// (the command's own log keeps everything).
const LINES_MAX: usize = 20_000;
/// Finished operations kept in memory (their pages); the log keeps all.
const OPS_MAX: usize = 100;
/// Bytes of a job's operation log that its page reads, from the end.
const LOG_READ_MAX: u64 = 1 << 20;

/// What a finished preview offers to run: the exact command, fixed when
/// the preview started, behind a one-use token.
#[derive(Debug, Clone)]
pub struct Confirm {
    /// The button's text.
    pub label: String,
    /// The operation's title and arguments when confirmed.
    pub title: String,
    pub args: Vec<String>,
    /// The job's complete snapshots when the preview started, for a command
    /// whose effect depends on them (prune): changed, the run is refused.
    pub snapshots: Option<Vec<String>>,
    token: String,
}

impl Confirm {
    pub fn new(label: String, title: String, args: Vec<String>) -> Result<Confirm> {
        Ok(Confirm { label, title, args, snapshots: None, token: super::auth::random_hex(32)? })
    }
}

/// One child process and its output.
pub struct Op {
    pub id: u64,
    pub job: String,
    pub title: String,
    pub command: Vec<String>,
    pub started: DateTime<Utc>,
    /// Taken when used: a preview confirms one run.
    confirm: Mutex<Option<Confirm>>,
    state: Mutex<(Vec<String>, Option<i32>)>,
    tick: watch::Sender<usize>,
}

impl Op {
    /// The button a finished preview offers: its label and token.
    fn offer(&self) -> Option<(String, String)> {
        self.confirm.lock().expect("no panic holding it").as_ref().map(|c| (c.label.clone(), c.token.clone()))
    }

    /// The output so far and the exit code once it ended.
    pub fn snapshot(&self) -> (Vec<String>, Option<i32>) {
        self.state.lock().expect("no panic holding it").clone()
    }

    fn push(&self, line: String) {
        let n = {
            let mut s = self.state.lock().expect("no panic holding it");
            match s.0.len() {
                n if n < LINES_MAX => s.0.push(line),
                n if n == LINES_MAX => s.0.push(format!("(more output than {LINES_MAX} lines: see the job's log)")),
                _ => return,
            }
            s.0.len()
        };
        self.tick.send_replace(n);
    }
}

/// The operations of this console's life.
#[derive(Default)]
pub struct Ops {
    next: AtomicU64,
    all: Mutex<Vec<Arc<Op>>>,
}

impl Ops {
    pub fn get(&self, id: u64) -> Option<Arc<Op>> {
        self.all.lock().expect("no panic holding it").iter().find(|o| o.id == id).cloned()
    }

    /// `job`'s operations still running.
    pub fn running_for(&self, job: &str) -> Vec<Arc<Op>> {
        let all = self.all.lock().expect("no panic holding it");
        all.iter().filter(|o| o.job == job && o.snapshot().1.is_none()).cloned().collect()
    }
}

/// Starts `rbackup -c CONFIG -j JOB ARGS...` as an operation.
pub fn start(st: &Arc<State>, job: &Job, title: String, args: Vec<String>, confirm: Option<Confirm>) -> Result<u64> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg("-c").arg(&st.config).arg("-j").arg(&job.job).args(&args);
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| anyhow!("cannot start {}: {e}", exe.display()))?;
    // As typed in a shell, the config named (rbackup's default is another).
    let mut command =
        vec!["rbackup".to_string(), "-c".into(), st.config.display().to_string(), "-j".into(), job.job.clone()];
    command.extend(args);
    let op = Arc::new(Op {
        id: st.ops.next.fetch_add(1, Ordering::Relaxed) + 1,
        job: job.job.clone(),
        title,
        command,
        started: Utc::now(),
        confirm: Mutex::new(confirm),
        state: Mutex::new((Vec::new(), None)),
        tick: watch::channel(0).0,
    });
    {
        let mut all = st.ops.all.lock().expect("no panic holding it");
        if all.len() >= OPS_MAX
            && let Some(i) = all.iter().position(|o| o.snapshot().1.is_some())
        {
            all.remove(i);
        }
        all.push(op.clone());
    }
    record(job, &json!({"event": "started", "op": op.id, "title": op.title, "command": op.command}));
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let job = job.clone();
    let id = op.id;
    tokio::spawn(async move {
        let a = tokio::spawn(pump(out, op.clone()));
        let b = tokio::spawn(pump(err, op.clone()));
        let _ = tokio::join!(a, b);
        let code = match child.wait().await {
            Ok(s) => s.code().unwrap_or(-1),
            Err(_) => -1,
        };
        let tail: Vec<String> = {
            let mut s = op.state.lock().expect("no panic holding it");
            s.1 = Some(code);
            s.0.iter().rev().take(LOG_TAIL).rev().cloned().collect()
        };
        op.tick.send_modify(|_| {});
        let title = op.title.clone();
        let rec = json!({"event": "finished", "op": op.id, "title": title, "exit_code": code, "last_output": tail});
        let _ = tokio::task::spawn_blocking(move || record(&job, &rec)).await;
    });
    Ok(id)
}

/// Reads a child's output into the operation, a line at a time; a progress
/// line redrawn with `\r` counts as its last drawing.
async fn pump(stream: Option<impl AsyncRead + Unpin>, op: Arc<Op>) {
    let Some(stream) = stream else { return };
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let last = text.trim_end_matches(['\n', '\r']).rsplit('\r').next().unwrap_or_default().to_string();
                op.push(last);
            }
        }
    }
}

/// Appends one record to the job's operation log; a log that can't be
/// written is said on stderr, and the operation goes on.
fn record(job: &Job, rec: &serde_json::Value) {
    let mut line = serde_json::to_vec(&json!({"time": Utc::now().to_rfc3339(), "job": job.job, "record": rec}))
        .expect("plain JSON");
    line.push(b'\n');
    let written = Store::open(&job.backups_folder, &job.name).and_then(|s| s.meta_dir()).and_then(|dir| {
        let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&dir, LOG_FILE, flags, Mode::from_raw_mode(0o600))?;
        std::fs::File::from(fd).write_all(&line)?;
        Ok(())
    });
    if let Err(e) = written {
        crate::warn!("could not write the operation log of {}: {e:#}", job.job);
    }
}

/// The records of `job`'s operation log, newest first (at most `n`).
fn read_log(job: &Job, n: usize) -> Vec<serde_json::Value> {
    let Ok(store) = Store::open(&job.backups_folder, &job.name) else { return Vec::new() };
    let Some(file) = store
        .dir()
        .try_open_dir(format!("{}.rbackup", job.name).as_bytes())
        .ok()
        .flatten()
        .and_then(|d| d.open_file(LOG_FILE.as_bytes()).ok())
    else {
        return Vec::new();
    };
    let text = tail(file, LOG_READ_MAX).unwrap_or_default();
    text.lines().rev().take(n).filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The last `max` bytes of `file` at most, from the start of a line: the
/// log only grows, and a page shows its newest records.
fn tail(mut file: std::fs::File, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    let from = len.saturating_sub(max);
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    if from > 0 {
        // The first line is cut: drop it.
        let start = bytes.iter().position(|&b| b == b'\n').map_or(bytes.len(), |i| i + 1);
        bytes.drain(..start);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Refuses what `--allow-actions` alone allows.
pub fn refused(st: &State) -> Option<Response> {
    (!st.allow_actions).then(|| {
        error_page(
            StatusCode::FORBIDDEN,
            "This console is read-only: start `rbackup ui` with --allow-actions to restore or run jobs.",
        )
    })
}

/// `POST /action` (`job`, `kind`): backup, verify, prune-preview, prune.
pub async fn action(AxState(st): AxState<Arc<State>>, body: String) -> Response {
    if let Some(r) = refused(&st) {
        return r;
    }
    let form = Params::parse(&body);
    let (Some(name), Some(kind)) = (form.str("job"), form.str("kind")) else {
        return error_page(StatusCode::BAD_REQUEST, "Which job and which action?");
    };
    let job = match st.job(name) {
        Ok(j) => j,
        Err(e) => return failed(&e),
    };
    let (title, args, confirm): (String, Vec<&str>, Option<Confirm>) = match kind {
        "backup" => (format!("Backup of {name}"), vec!["backup"], None),
        "verify" => (format!("Verify of {name}"), vec!["verify"], None),
        "prune-preview" => match prune_confirm(&job) {
            Ok(c) => (format!("Prune of {name}: preview"), vec!["prune", "--dry-run"], c),
            Err(e) => return failed(&e),
        },
        "prune" => return unconfirmed(),
        _ => return error_page(StatusCode::BAD_REQUEST, "No such action."),
    };
    match start(&st, &job, title, args.into_iter().map(String::from).collect(), confirm) {
        Ok(id) => Redirect::to(&url("/op", &[("id", id.to_string().as_bytes())])).into_response(),
        Err(e) => failed(&e),
    }
}

/// The job's complete snapshots, by folder name.
fn complete_snapshots(job: &Job) -> Result<Vec<String>> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    Ok(store.snapshots()?.into_iter().filter(|s| s.complete).map(|s| s.folder).collect())
}

/// What a prune preview offers to run: `prune` with the job's rules as
/// they are now, given as flags (rules only keep, so a rule the config
/// gains later keeps more, and one it loses or lowers is still given), on
/// the complete snapshots there are now; nothing when the rules remove
/// none of them.
fn prune_confirm(job: &Job) -> Result<Option<Confirm>> {
    let rules = &job.prune;
    if rules.is_empty() {
        anyhow::bail!("{} has no retention rules (keep_* in the job): nothing to prune by", job.job);
    }
    let snapshots = Store::open(&job.backups_folder, &job.name)?.snapshots()?;
    let plan = crate::cmd::prune::plan(&snapshots, rules, Utc::now())?;
    if plan.iter().all(|d| d.keep) {
        return Ok(None);
    }
    let mut args = vec!["prune".to_string()];
    args.extend(rules.flags());
    let mut confirm = Confirm::new("Prune: delete these snapshots".into(), format!("Prune of {}", job.job), args)?;
    confirm.snapshots = Some(complete_snapshots(job)?);
    Ok(Some(confirm))
}

/// A restore or prune asked for without its preview's confirmation.
pub fn unconfirmed() -> Response {
    error_page(
        StatusCode::FORBIDDEN,
        "A restore or a prune runs only from its preview: preview it, then confirm on the preview's page.",
    )
}

/// `POST /confirm` (`id`, `token`): runs what finished preview `id` showed,
/// once.
pub async fn confirm(AxState(st): AxState<Arc<State>>, body: String) -> Response {
    if let Some(r) = refused(&st) {
        return r;
    }
    let form = Params::parse(&body);
    let Some(op) = op_of(&st, Some(&body)) else { return error_page(StatusCode::NOT_FOUND, "No such preview.") };
    if op.snapshot().1 != Some(0) {
        return error_page(StatusCode::CONFLICT, "That preview has not finished well: nothing to confirm.");
    }
    let taken = {
        let mut c = op.confirm.lock().expect("no panic holding it");
        let ok =
            c.as_ref().is_some_and(|c| form.get("token").is_some_and(|t| super::auth::ct_eq(t, c.token.as_bytes())));
        if ok { c.take() } else { None }
    };
    let Some(c) = taken else {
        return error_page(
            StatusCode::FORBIDDEN,
            "This confirmation is not valid (or was used already): preview again.",
        );
    };
    let job = match st.job(&op.job) {
        Ok(j) => j,
        Err(e) => return failed(&e),
    };
    if let Some(before) = &c.snapshots {
        match complete_snapshots(&job) {
            Ok(now) if now == *before => {}
            Ok(_) => {
                return error_page(StatusCode::CONFLICT, "The snapshots changed since the preview: preview again.");
            }
            Err(e) => return failed(&e),
        }
    }
    match start(&st, &job, c.title, c.args, None) {
        Ok(id) => Redirect::to(&url("/op", &[("id", id.to_string().as_bytes())])).into_response(),
        Err(e) => failed(&e),
    }
}

fn op_of(st: &State, q: Option<&str>) -> Option<Arc<Op>> {
    Params::parse(q.unwrap_or_default()).str("id").and_then(|i| i.parse().ok()).and_then(|id| st.ops.get(id))
}

/// `/op?id=N`: an operation, its output (live while it runs).
pub async fn page(
    AxState(st): AxState<Arc<State>>,
    axum::Extension(csrf): axum::Extension<super::auth::Csrf>,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(op) = op_of(&st, q.as_deref()) else { return error_page(StatusCode::NOT_FOUND, "No such operation.") };
    let (lines, exit) = op.snapshot();
    let events =
        url("/op/events", &[("id", op.id.to_string().as_bytes()), ("from", lines.len().to_string().as_bytes())]);
    let body = html! {
        h1 { (op.title) }
        p.muted { code { (op.command.join(" ")) } " · started " (when(op.started)) }
        @match exit {
            None => p #status.running data-events=(events) { "Running…" }
            Some(0) => p #status.ok { "Finished: exit code 0" }
            Some(c) => p #status.error { "Finished: exit code " (c) " (docs/exit-codes.md)" }
        }
        pre #output { @for l in &lines { (l) "\n" } }
        @if let (Some(0), Some((label, token))) = (exit, op.offer()) {
            form method="post" action="/confirm" {
                input type="hidden" name="csrf" value=(csrf.0);
                input type="hidden" name="id" value=(op.id);
                input type="hidden" name="token" value=(token);
                button.danger type="submit" id="confirm" { (label) }
                " " a href="/" { "Cancel" }
            }
        }
    };
    layout(&op.title, &[(url("/job", &[("job", op.job.as_bytes())]), op.job.clone())], &body)
}

/// `/op/events?id=N&from=K`: the output from line K on, then `done`.
pub async fn events(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let Some(op) = op_of(&st, q.as_deref()) else { return error_page(StatusCode::NOT_FOUND, "No such operation.") };
    let from: usize =
        Params::parse(q.as_deref().unwrap_or_default()).str("from").and_then(|f| f.parse().ok()).unwrap_or(0);
    let rx = op.tick.subscribe();
    let stream = futures_util::stream::unfold((op, from, rx, false), |(op, mut idx, mut rx, finished)| async move {
        if finished {
            return None;
        }
        loop {
            let (line, exit) = {
                let s = op.state.lock().expect("no panic holding it");
                (s.0.get(idx).cloned(), s.1)
            };
            if let Some(l) = line {
                idx += 1;
                return Some((Ok::<_, Infallible>(Event::default().event("line").data(l)), (op, idx, rx, false)));
            }
            if let Some(code) = exit {
                return Some((Ok(Event::default().event("done").data(code.to_string())), (op, idx, rx, true)));
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// `/log[?job=J]`: the operation logs, newest first.
pub async fn log_page(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let only = Params::parse(q.as_deref().unwrap_or_default()).str("job").map(str::to_string);
    let st2 = st.clone();
    let records = blocking(move || {
        let all = st2.jobs()?;
        if let Some(o) = &only
            && !all.names.contains(o)
        {
            return Err(super::pages::NotFound(format!("no job {o:?} in {}", st2.config.display())).into());
        }
        let mut out = Vec::new();
        for name in all.names.iter().filter(|n| only.as_ref().is_none_or(|o| o == *n)) {
            if let Ok(job) = all.resolve(name, &crate::config::Overrides::default()) {
                out.extend(read_log(&job, 200));
            }
        }
        out.sort_by(|a, b| b["time"].as_str().cmp(&a["time"].as_str()));
        Ok(out)
    })
    .await;
    let records = match records {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    let body = html! {
        h1 { "Operations" }
        p.muted { "What was done through the console, from each job's " code { "NAME.rbackup/" (LOG_FILE) } "." }
        @if records.is_empty() { p { "Nothing yet." } }
        div.scroll { table.log {
            thead { tr { th { "Time (UTC)" } th { "Job" } th { "Operation" } th { "Event" } } }
            tbody { @for r in &records {
                tr {
                    td { (r["time"].as_str().unwrap_or_default().get(..19).unwrap_or_default().replace('T', " ")) }
                    td { (r["job"].as_str().unwrap_or_default()) }
                    td { (r["record"]["title"].as_str().unwrap_or_default()) }
                    td {
                        (r["record"]["event"].as_str().unwrap_or_default())
                        @if let Some(c) = r["record"]["exit_code"].as_i64() { " · exit " (c) }
                    }
                }
            } }
        } }
    };
    layout("Operations", &[("/log".into(), "Operations".into())], &body)
}
