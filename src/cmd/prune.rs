//! `prune`: which snapshots to keep, by borg-style rules on the UTC times in
//! their names — a pure [`plan`], unit-tested on names and a fixed "now" —
//! and then the deletion, crash-safe (into the trash first) and parallel.

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::config::Job;
use crate::error::Code;
use crate::store::{Snapshot, Store};
use crate::{info, store::lock, usage};

pub use crate::store::rules::{Rules, parse_duration};

/// What happens to one snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub snapshot: Snapshot,
    pub keep: bool,
    pub reason: String,
}

/// Decides, for every snapshot, keep or remove. Rules apply in borg's order
/// (within, last, hourly, daily, weekly, monthly, yearly); each period rule
/// keeps the newest snapshot of each of its N most recent periods, skipping
/// periods whose newest snapshot an earlier rule already kept. The newest
/// complete snapshot is always kept; `.incomplete` ones older than a complete
/// snapshot are removed (superseded); a newer one is kept for `--continue`.
/// Why the newest interrupted run is kept.
const INTERRUPTED: &str = "interrupted, newer than every complete snapshot";

pub fn plan(snapshots: &[Snapshot], rules: &Rules, now: DateTime<Utc>) -> Result<Vec<Decision>> {
    let mut complete: Vec<&Snapshot> = snapshots.iter().filter(|s| s.complete).collect();
    complete.sort_by_key(|s| std::cmp::Reverse(s.time));
    let mut kept: BTreeMap<String, String> = BTreeMap::new();

    if let Some(within) = &rules.keep_within {
        let since = now - parse_duration(within)?;
        for s in complete.iter().filter(|s| s.time > since) {
            kept.entry(s.folder.clone()).or_insert_with(|| format!("within {within}"));
        }
    }
    if let Some(n) = rules.keep_last {
        split(&complete, n, "last", |t| t.timestamp(), &mut kept);
    }
    let rules_by_period: [(Option<u32>, &str, Period); 5] = [
        (rules.keep_hourly, "hourly", |t| t.timestamp() / 3600),
        (rules.keep_daily, "daily", |t| i64::from(t.year()) * 1000 + i64::from(t.ordinal())),
        (rules.keep_weekly, "weekly", |t| {
            let w = t.iso_week();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }),
        (rules.keep_monthly, "monthly", |t| i64::from(t.year()) * 100 + i64::from(t.month())),
        (rules.keep_yearly, "yearly", |t| i64::from(t.year())),
    ];
    for (n, rule, period) in rules_by_period {
        if let Some(n) = n {
            split(&complete, n, rule, period, &mut kept);
        }
    }
    if let Some(newest) = complete.first() {
        kept.entry(newest.folder.clone()).or_insert_with(|| "newest".into());
    }

    let newest_complete = complete.first().map(|s| s.time);
    let mut out: Vec<Decision> = snapshots
        .iter()
        .map(|s| {
            let (keep, reason) = if s.complete {
                match kept.get(&s.folder) {
                    Some(r) => (true, r.clone()),
                    None => (false, "no rule keeps it".into()),
                }
            } else {
                match newest_complete {
                    Some(t) if s.time < t => (false, "superseded by a newer complete snapshot".into()),
                    _ => (true, INTERRUPTED.into()),
                }
            };
            Decision { snapshot: s.clone(), keep, reason }
        })
        .collect();
    out.sort_by_key(|d| (d.snapshot.time, !d.snapshot.complete));
    Ok(out)
}

/// The period a time falls in, as a comparable number.
type Period = fn(DateTime<Utc>) -> i64;

/// borg's `prune_split`: newest first, one per period, `n` periods.
fn split(
    complete: &[&Snapshot],
    n: u32,
    rule: &str,
    period: impl Fn(DateTime<Utc>) -> i64,
    kept: &mut BTreeMap<String, String>,
) {
    if n == 0 {
        return;
    }
    let mut last = None;
    let mut count = 0;
    for s in complete {
        let p = period(s.time.with_nanosecond(0).unwrap_or(s.time));
        if last == Some(p) {
            continue;
        }
        last = Some(p);
        if !kept.contains_key(&s.folder) {
            count += 1;
            kept.insert(s.folder.clone(), format!("{rule} #{count}"));
            if count == n {
                break;
            }
        }
    }
}

/// Runs `prune` for `job` with `rules` (or the job's).
pub fn run(job: &Job, rules: &Rules, dry_run: bool) -> Result<Code> {
    run_keeping(job, rules, dry_run, &[])
}

/// [`run`], keeping besides what the rules keep each snapshot named in
/// `also` (folder, and the reason said for it).
pub fn run_keeping(job: &Job, rules: &Rules, dry_run: bool, also: &[(String, String)]) -> Result<Code> {
    if rules.is_empty() {
        return Err(usage!(
            "no retention rules: give --keep-daily N (and others), or set keep_* in the job; rbackup never \
             guesses what to delete"
        ));
    }
    let store = Store::open(&job.backups_folder, &job.name)?;
    store.require_snapshots()?;
    let meta = store.meta_dir()?;
    let folder_shown = crate::store::shown(&job.backups_folder, &job.name);
    // A dry run removes nothing and doesn't wait for the lock; but a run
    // that holds it is writing the newest `.incomplete`, which is then in
    // progress, not interrupted.
    let mut in_progress = false;
    let (_lock, _readers) = if dry_run {
        match lock::acquire(&meta, "prune --dry-run", &folder_shown) {
            Ok(l) => (Some(l), None),
            Err(e) if e.downcast_ref::<crate::error::LockedError>().is_some() => {
                info!("{e:#}");
                in_progress = true;
                (None, None)
            }
            Err(e) => return Err(e),
        }
    } else {
        (
            Some(lock::acquire(&meta, "prune", &folder_shown)?),
            Some(lock::acquire_readers_exclusive(&meta, "prune", &folder_shown)?),
        )
    };
    if !dry_run {
        store.empty_trash()?;
    }
    let mut decisions = plan(&store.snapshots()?, rules, Utc::now())?;
    let mut kept_also = 0;
    for d in decisions.iter_mut().filter(|d| !d.keep) {
        if let Some((_, why)) = also.iter().find(|(folder, _)| *folder == d.snapshot.folder) {
            d.keep = true;
            d.reason.clone_from(why);
            kept_also += 1;
        }
    }
    if kept_also > 0 {
        info!(
            "{} the rules would remove kept: not yet on a replica",
            crate::report::count(kept_also, "snapshot", "snapshots")
        );
    }
    if let Some(d) = decisions.iter_mut().rev().find(|d| !d.snapshot.complete && d.keep) {
        d.reason = if in_progress {
            "in progress: the run that holds the lock is writing it".into()
        } else {
            format!("{INTERRUPTED} (`{}` finishes it)", job.command("--continue"))
        };
    }
    // By hand, the rules alone decide (docs/design.md rule 12), but what a
    // replica has not got yet is said before it goes.
    for dest in &job.replicas {
        let Ok(Some(pending)) = crate::cmd::replicate::not_yet_on(job, dest) else { continue };
        for d in decisions.iter().filter(|d| !d.keep && pending.iter().any(|(f, _)| *f == d.snapshot.folder)) {
            crate::warn!(
                "{}, which the replica {} has not got yet, {}",
                d.snapshot.folder,
                dest.to,
                if dry_run { "would be removed" } else { "is removed" }
            );
        }
    }
    // `-q` (cron, prune_after_backup) means warnings and errors only; a dry
    // run's table is what was asked for, so it always prints.
    let show = dry_run || crate::log::on_stderr(crate::log::Level::Info);
    let mut removed = 0;
    for d in &decisions {
        let verb = match (d.keep, dry_run) {
            (true, _) => "keep",
            (false, true) => "would remove",
            (false, false) => "remove",
        };
        if show {
            println!("{verb:<12} {}  ({})", d.snapshot.folder, d.reason);
        }
        if !d.keep && !dry_run {
            store.delete(&d.snapshot)?;
            removed += 1;
            // Also under -q, in the job's log: what was deleted stays known.
            crate::log::to_file_only(&format!("removed {} ({})", d.snapshot.folder, d.reason));
        }
    }
    if !dry_run {
        let kept = decisions.iter().filter(|d| d.keep).count() as u64;
        info!("{} removed, {kept} kept", crate::report::count(removed, "snapshot", "snapshots"));
    }
    Ok(Code::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::named as snaps;
    use chrono::TimeZone;

    fn kept(d: &[Decision]) -> Vec<&str> {
        d.iter().filter(|d| d.keep).map(|d| d.snapshot.folder.as_str()).collect()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap()
    }

    #[test]
    fn daily_keeps_the_newest_of_each_utc_day() {
        let s = snaps(&[
            "s.08-03-26_23-59-59",
            "s.09-03-26_00-00-00",
            "s.09-03-26_10-00-00",
            "s.09-03-26_23-00-00",
            "s.10-03-26_01-00-00",
        ]);
        let rules = Rules { keep_daily: Some(2), ..Rules::default() };
        let d = plan(&s, &rules, now()).unwrap();
        assert_eq!(kept(&d), vec!["s.09-03-26_23-00-00", "s.10-03-26_01-00-00"]);
        let reason = |f: &str| d.iter().find(|x| x.snapshot.folder == f).unwrap().reason.clone();
        assert_eq!(reason("s.10-03-26_01-00-00"), "daily #1");
        assert_eq!(reason("s.09-03-26_23-00-00"), "daily #2");
        assert_eq!(reason("s.08-03-26_23-59-59"), "no rule keeps it");
    }

    #[test]
    fn weekly_and_monthly_boundaries_are_iso_weeks_and_calendar_months_in_utc() {
        // 2026-03-01 is a Sunday (ISO week 9), 2026-03-02 a Monday (week 10).
        let s = snaps(&["s.28-02-26_12-00-00", "s.01-03-26_12-00-00", "s.02-03-26_12-00-00"]);
        let weekly = plan(&s, &Rules { keep_weekly: Some(2), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&weekly), vec!["s.01-03-26_12-00-00", "s.02-03-26_12-00-00"]);
        let monthly = plan(&s, &Rules { keep_monthly: Some(2), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&monthly), vec!["s.28-02-26_12-00-00", "s.02-03-26_12-00-00"]);
        let yearly = plan(&s, &Rules { keep_yearly: Some(5), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&yearly), vec!["s.02-03-26_12-00-00"]);
    }

    #[test]
    fn an_earlier_rule_does_not_use_up_a_later_rules_count() {
        // borg: last keeps the two newest; daily then keeps the two newest
        // days *not already kept*, reaching further back.
        let s = snaps(&["s.06-03-26_12-00-00", "s.07-03-26_12-00-00", "s.08-03-26_12-00-00", "s.09-03-26_12-00-00"]);
        let rules = Rules { keep_last: Some(2), keep_daily: Some(2), ..Rules::default() };
        let d = plan(&s, &rules, now()).unwrap();
        let reasons: Vec<&str> = d.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, vec!["daily #2", "daily #1", "last #2", "last #1"]);
    }

    #[test]
    fn keep_within_counts_back_from_now() {
        let s = snaps(&["s.01-03-26_12-00-00", "s.04-03-26_11-00-00", "s.04-03-26_13-00-00", "s.09-03-26_12-00-00"]);
        let d = plan(&s, &Rules { keep_within: Some("6d".into()), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&d), vec!["s.04-03-26_13-00-00", "s.09-03-26_12-00-00"]);
        assert!(parse_duration("3x").is_err());
        assert_eq!(parse_duration("2w").unwrap(), chrono::Duration::days(14));
    }

    #[test]
    fn the_newest_complete_snapshot_is_always_kept() {
        let s = snaps(&["s.01-01-20_00-00-00", "s.01-01-21_00-00-00"]);
        let d = plan(&s, &Rules { keep_within: Some("1h".into()), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&d), vec!["s.01-01-21_00-00-00"]);
        assert_eq!(d[1].reason, "newest");
    }

    #[test]
    fn superseded_incompletes_go_and_a_newer_one_stays() {
        let s = snaps(&["s.01-03-26_00-00-00.incomplete", "s.02-03-26_00-00-00", "s.03-03-26_00-00-00.incomplete"]);
        let d = plan(&s, &Rules { keep_last: Some(5), ..Rules::default() }, now()).unwrap();
        assert!(!d[0].keep && d[0].reason.contains("superseded"));
        assert!(d[1].keep);
        assert!(d[2].keep && d[2].reason == INTERRUPTED);
    }

    #[test]
    fn names_sort_by_time_not_by_string() {
        // String order would call 31-12-25 the newest.
        let s = snaps(&["s.31-12-25_00-00-00", "s.01-01-26_00-00-00"]);
        let d = plan(&s, &Rules { keep_last: Some(1), ..Rules::default() }, now()).unwrap();
        assert_eq!(kept(&d), vec!["s.01-01-26_00-00-00"]);
    }
}
