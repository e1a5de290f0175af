//! Progress while a backup runs: a bar on a terminal (entries, bytes, rate,
//! ETA; log lines print above it), a line every few seconds otherwise (cron,
//! systemd), which also lands in the log file.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::backup::human_bytes;
use crate::log;
use crate::report::Stats;

/// How often a progress line is logged when there is no terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// Shows progress; silent when not enabled.
pub struct Progress {
    /// On a terminal: created with the first update, so it never shows an
    /// empty 0-of-0 bar.
    bar: Option<ProgressBar>,
    tty: bool,
    lines: bool,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    /// A bar if stderr is a terminal, periodic lines if not; nothing when
    /// `quiet` (or for dry runs, whose output is the plan).
    pub fn new(quiet: bool) -> Progress {
        let now = Instant::now();
        let tty = !quiet && std::io::stderr().is_terminal();
        Progress { bar: None, tty, lines: !quiet && !tty, last_line: now, started: now }
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(5));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            let hook = bar.clone();
            log::set_stderr_hook(Some(Box::new(move |write: &mut dyn FnMut()| hook.suspend(write))));
            bar
        })
    }

    /// Shows the counters of the run so far.
    pub fn update(&mut self, s: &Stats) {
        if self.tty {
            let bar = self.bar();
            bar.set_length(s.bytes_to_fetch.max(1));
            bar.set_position(s.bytes_fetched);
            bar.set_message(format!("{} entries, {} linked", s.entries, s.linked));
        } else if self.lines && self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            crate::info!(
                "progress: {} entries, {} linked, {} of {} fetched ({}/s)",
                s.entries,
                s.linked,
                human_bytes(s.bytes_fetched),
                human_bytes(s.bytes_to_fetch),
                human_bytes((s.bytes_fetched as f64 / secs) as u64)
            );
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            log::set_stderr_hook(None);
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
