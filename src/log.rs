//! Logging: human lines on stderr, the same lines with UTC timestamps
//! appended to the job's log file, and the last lines kept in memory for the
//! failure mail.
//!
//! A small logger of our own rather than a framework: four levels, two sinks
//! and a ring buffer are all rbackup needs, and the progress display hooks in
//! here so that log lines print above it without tearing.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Severity of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn prefix(self) -> &'static str {
        match self {
            Level::Error => "error: ",
            Level::Warn => "warning: ",
            Level::Info | Level::Debug | Level::Trace => "",
        }
    }
}

/// Wraps each write to stderr (e.g. to hide and redraw a progress bar).
pub type StderrHook = Box<dyn Fn(&mut dyn FnMut()) + Send>;

/// Lines kept for the failure mail.
pub const TAIL_LINES: usize = 50;

struct Logger {
    stderr_level: Mutex<Level>,
    file: Mutex<Option<File>>,
    file_level: Mutex<Level>,
    tag: Mutex<String>,
    tail: Mutex<VecDeque<String>>,
    /// Called around stderr writes, to clear and redraw a progress display.
    around_stderr: Mutex<Option<StderrHook>>,
}

fn logger() -> &'static Logger {
    static LOGGER: OnceLock<Logger> = OnceLock::new();
    LOGGER.get_or_init(|| Logger {
        stderr_level: Mutex::new(Level::Info),
        file: Mutex::new(None),
        file_level: Mutex::new(Level::Info),
        tag: Mutex::new(String::new()),
        tail: Mutex::new(VecDeque::new()),
        around_stderr: Mutex::new(None),
    })
}

/// Sets what reaches stderr: `-q` shows warnings and errors only, `-v` adds
/// debug lines, `-vv` every action.
pub fn set_verbosity(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => Level::Warn,
        (false, 0) => Level::Info,
        (false, 1) => Level::Debug,
        _ => Level::Trace,
    };
    *logger().stderr_level.lock().expect("log lock") = level;
    *logger().file_level.lock().expect("log lock") = level.max(Level::Info);
}

/// True if lines of `level` go anywhere.
pub fn enabled(level: Level) -> bool {
    let l = logger();
    level <= *l.stderr_level.lock().expect("log lock") || level <= *l.file_level.lock().expect("log lock")
}

/// True if lines of `level` reach stderr.
pub fn on_stderr(level: Level) -> bool {
    level <= *logger().stderr_level.lock().expect("log lock")
}

/// Appends to `path` from now on (created 0600 if missing).
pub fn open_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.is_dir()
    {
        // "File exists" alone would not say that the folder is the problem.
        std::fs::create_dir_all(parent).map_err(|e| {
            std::io::Error::new(e.kind(), format!("its folder {} can't be made: {e}", parent.display()))
        })?;
    }
    let f = std::fs::OpenOptions::new().append(true).create(true).mode(0o600).open(path)?;
    *logger().file.lock().expect("log lock") = Some(f);
    Ok(())
}

/// The tag of the agent's lines; the desktop shows them as the agent's.
pub const AGENT_TAG: &str = "agent";

/// A tag for file lines, e.g. the job name; stderr's warnings and errors
/// start with it too.
pub fn set_tag(tag: &str) {
    *logger().tag.lock().expect("log lock") = tag.to_string();
}

/// Installs (or removes) the hook that wraps stderr writes.
pub fn set_stderr_hook(hook: Option<StderrHook>) {
    *logger().around_stderr.lock().expect("log lock") = hook;
}

/// The last lines logged (at info level and above), oldest first.
pub fn tail() -> Vec<String> {
    logger().tail.lock().expect("log lock").iter().cloned().collect()
}

/// Writes an info line to the log file only: for what the terminal already
/// shows in another form (e.g. `prune`'s table on stdout).
pub fn to_file_only(text: &str) {
    let l = logger();
    if let Some(f) = l.file.lock().expect("log lock").as_mut() {
        let stamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
        let tag = l.tag.lock().expect("log lock");
        let _ = writeln!(f, "{stamp} rbackup[{}] {tag}: {}{text}", std::process::id(), Level::Info.prefix());
    }
}

/// Writes one line. Use the macros.
pub fn emit(level: Level, args: fmt::Arguments<'_>) {
    let l = logger();
    let text = format!("{}{}", level.prefix(), args);
    if level <= Level::Info {
        let mut tail = l.tail.lock().expect("log lock");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text.clone());
    }
    if level <= *l.stderr_level.lock().expect("log lock") {
        // Warnings and errors name their job on stderr: one cron mail may hold
        // the output of several jobs.
        let tag = l.tag.lock().expect("log lock").clone();
        let line = if level <= Level::Warn && !tag.is_empty() && tag != AGENT_TAG {
            format!("{tag}: {text}")
        } else {
            text.clone()
        };
        let mut write = || {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        };
        match l.around_stderr.lock().expect("log lock").as_ref() {
            Some(hook) => hook(&mut write),
            None => write(),
        }
    }
    if level <= *l.file_level.lock().expect("log lock")
        && let Some(f) = l.file.lock().expect("log lock").as_mut()
    {
        let stamp = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
        let tag = l.tag.lock().expect("log lock");
        let _ = writeln!(f, "{stamp} rbackup[{}] {tag}: {text}", std::process::id());
    }
}

#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::Level::Error, format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::Level::Warn, format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::Level::Info, format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Debug) {
            $crate::log::emit($crate::log::Level::Debug, format_args!($($arg)*))
        }
    };
}
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::Trace) {
            $crate::log::emit($crate::log::Level::Trace, format_args!($($arg)*))
        }
    };
}
