//! Retention rules: which snapshots a job keeps (the `keep_*` keys, or
//! `prune`'s options over them). `prune` applies them ([`crate::cmd::prune`]);
//! they live with the store so that the config can name them without
//! depending on a command.

use anyhow::{Result, bail};
use chrono::Duration;
use serde::Deserialize;

use crate::usage;

/// The rules. `None`/0 means the rule is not used. `prune`'s options
/// override the job's `keep_*` keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Keep the N newest snapshots
    pub keep_last: Option<u32>,
    /// Keep every snapshot newer than this: 36h, 7d, 4w, 6m, 1y
    pub keep_within: Option<String>,
    /// Keep the newest snapshot of each of the N most recent hours
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent days (UTC)
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent months
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent years
    pub keep_yearly: Option<u32>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.keep_last.unwrap_or(0) == 0
            && self.keep_within.is_none()
            && [self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly]
                .iter()
                .all(|n| n.unwrap_or(0) == 0)
    }

    /// The rules as `prune`'s options (`--keep-daily=7` …), the unused
    /// ones left out.
    pub fn flags(&self) -> Vec<String> {
        let counts = [
            ("last", self.keep_last),
            ("hourly", self.keep_hourly),
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ];
        let mut out: Vec<String> =
            counts.iter().filter_map(|(what, n)| n.map(|n| format!("--keep-{what}={n}"))).collect();
        out.extend(self.keep_within.iter().map(|w| format!("--keep-within={w}")));
        out
    }

    /// Command-line rules over the job's, rule by rule.
    #[must_use]
    pub fn or(self, base: &Rules) -> Rules {
        Rules {
            keep_last: self.keep_last.or(base.keep_last),
            keep_within: self.keep_within.or(base.keep_within.clone()),
            keep_hourly: self.keep_hourly.or(base.keep_hourly),
            keep_daily: self.keep_daily.or(base.keep_daily),
            keep_weekly: self.keep_weekly.or(base.keep_weekly),
            keep_monthly: self.keep_monthly.or(base.keep_monthly),
            keep_yearly: self.keep_yearly.or(base.keep_yearly),
        }
    }
}

/// Parses `36h`, `7d`, `4w`, `6m` (31 days each), `1y` (365 days).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| usage!("bad duration {s:?}: use a number and h, d, w, m or y (e.g. 7d)"))?;
    let hours = match unit {
        "h" => 1,
        "d" => 24,
        "w" => 24 * 7,
        "m" => 24 * 31,
        "y" => 24 * 365,
        _ => bail!(usage!("bad duration {s:?}: use a number and h, d, w, m or y (e.g. 7d)")),
    };
    Ok(Duration::hours(n * hours))
}
