//! Progress while a backup runs: a bar on a terminal (entries, bytes, rate,
//! ETA; log lines print above it), a line every few seconds otherwise (cron,
//! systemd), which also lands in the log file.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::log;
use crate::report::Stats;
use crate::report::human_bytes;

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
    /// The bar shows a total (the listing is complete).
    total_shown: bool,
    /// The job's `bwlimit` (bytes/s; 0: none), shown beside the rate.
    pub limit: u64,
}

impl Progress {
    /// A bar if stderr is a terminal, periodic lines if not; nothing when
    /// `quiet` (or for dry runs, whose output is the plan).
    pub fn new(quiet: bool) -> Progress {
        let now = Instant::now();
        let tty = !quiet && std::io::stderr().is_terminal();
        Progress { bar: None, tty, lines: !quiet && !tty, last_line: now, started: now, total_shown: false, limit: 0 }
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
            bar.set_style(listing_style());
            bar.enable_steady_tick(Duration::from_millis(200));
            let hook = bar.clone();
            log::set_stderr_hook(Some(Box::new(move |write: &mut dyn FnMut()| hook.suspend(write))));
            bar
        })
    }

    /// Shows the counters of the run so far. While the listing is still
    /// arriving the total isn't known: what is shown is what was done and
    /// how fast, with no bar and no ETA (a total that grows as the listing
    /// comes would hold the bar at 65-90 % and the ETA at a few seconds for
    /// the whole run). Once the listing is complete, the bar and the ETA.
    pub fn update(&mut self, s: &Stats) {
        if self.tty {
            let total_known = s.listing_done;
            let switch = total_known && !self.total_shown;
            let limit = limit_note(self.limit);
            let bar = self.bar();
            if switch {
                bar.set_style(total_style());
            }
            if total_known {
                bar.set_length(s.bytes_to_fetch.max(1));
            }
            bar.set_position(s.bytes_fetched);
            bar.set_message(format!("{} entries, {} linked{limit}", s.entries, s.linked));
            self.total_shown |= switch;
        } else if self.lines && self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            crate::info!("{}{}", line(s, self.started.elapsed().as_secs_f64()), limit_note(self.limit));
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

/// The periodic line without a terminal: a total only once it is known.
fn line(s: &Stats, secs: f64) -> String {
    let of = if s.listing_done {
        format!("of {}", human_bytes(s.bytes_to_fetch))
    } else {
        "so far, listing still arriving".to_string()
    };
    format!(
        "progress: {} entries, {} linked, {} fetched {of} ({}/s)",
        s.entries,
        s.linked,
        human_bytes(s.bytes_fetched),
        human_bytes((s.bytes_fetched as f64 / secs.max(0.001)) as u64)
    )
}

/// The limit as the progress shows it: `, limit 5.0 MiB/s`; nothing for none.
fn limit_note(limit: u64) -> String {
    if limit == 0 { String::new() } else { format!(", limit {}/s", human_bytes(limit)) }
}

/// While the listing arrives: what was done, and the rate.
fn listing_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg}, {bytes} fetched, {binary_bytes_per_sec} (listing…)")
        .expect("a valid template")
}

/// Once the total is known: a bar, and an ETA that means something.
fn total_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}")
        .expect("a valid template")
        .progress_chars("=> ")
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the total grew while the listing arrived, so the bar sat
    /// at 65-90 % with an ETA of 2-3 s for a whole 32 s run.
    #[test]
    fn no_total_is_claimed_before_the_listing_is_complete() {
        let mut s =
            Stats { entries: 10, linked: 4, bytes_fetched: 1 << 20, bytes_to_fetch: 2 << 20, ..Stats::default() };
        let during = line(&s, 2.0);
        assert!(during.contains("1.0 MiB fetched so far, listing still arriving"), "{during}");
        assert!(!during.contains("2.0 MiB"), "{during}");
        s.listing_done = true;
        let after = line(&s, 2.0);
        assert!(after.contains("1.0 MiB fetched of 2.0 MiB"), "{after}");
    }

    #[test]
    fn the_progress_line_shows_the_bandwidth_limit() {
        assert_eq!(limit_note(0), "");
        assert_eq!(limit_note(5 << 20), ", limit 5.0 MiB/s");
    }
}
