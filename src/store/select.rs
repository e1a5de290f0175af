//! Which snapshot a command means: `--snapshot latest`, `previous`, a
//! folder name, a stamp or a UTC time — one parser for restore, verify and
//! diff — and which path in a snapshot (`normalize`, for restore's
//! `--path` and `history`).

use anyhow::{Result, anyhow};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

use super::{Snapshot, parse_stamp};
use crate::usage;

/// Picks the snapshot `spec` names: `latest` (or nothing), `previous` (the
/// one before the latest), a folder name, a stamp, or a UTC time — then the
/// newest complete snapshot at or before it.
pub fn pick(snapshots: &[Snapshot], name: &str, spec: Option<&str>) -> Result<Snapshot> {
    let complete: Vec<&Snapshot> = snapshots.iter().filter(|s| s.complete).collect();
    let oldest = complete.first().map_or("none".to_string(), |s| s.folder.clone());
    match spec.map(str::trim) {
        Some("previous") => complete
            .len()
            .checked_sub(2)
            .map(|i| complete[i].clone())
            .ok_or_else(|| anyhow!("there is no snapshot of {name} before the latest")),
        None | Some("latest") => {
            complete.last().map(|s| (*s).clone()).ok_or_else(|| anyhow!("there is no complete snapshot of {name}"))
        }
        Some(spec) => {
            if let Some(s) = snapshots.iter().find(|s| s.folder == spec || s.stamp() == spec) {
                if !s.complete {
                    return Err(usage!(
                        "{} is an interrupted snapshot; finish it with `rbackup --continue` first",
                        s.folder
                    ));
                }
                return Ok(s.clone());
            }
            let time = parse_time(spec).ok_or_else(|| {
                usage!(
                    "--snapshot {spec:?}: not a snapshot of {name}, nor a time (use latest, a folder name, \
                     YYYY-MM-DD, or \"YYYY-MM-DD HH:MM[:SS]\", UTC)"
                )
            })?;
            complete.iter().rev().find(|s| s.time <= time).map(|s| (*s).clone()).ok_or_else(|| {
                anyhow!(
                    "no snapshot of {name} at or before {} (the oldest is {oldest})",
                    time.format("%Y-%m-%d %H:%M:%S UTC")
                )
            })
        }
    }
}

/// Parses a UTC time: `YYYY-MM-DD` (the end of that day), `YYYY-MM-DD HH:MM`,
/// `YYYY-MM-DD HH:MM:SS` (also with `T`, and with `Z` or ` UTC`), or a stamp
/// `dd-mm-yy_hh-mm-ss`.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim().trim_end_matches(" UTC").trim_end_matches('Z').replace('T', " ");
    if let Some(t) = parse_stamp(&s) {
        return Some(t);
    }
    for fmt in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&s, fmt) {
            return Some(t.and_utc());
        }
    }
    let day = NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok()?;
    Some(day.and_hms_opt(23, 59, 59)?.and_utc())
}

/// Checks and normalizes PATH: relative to the snapshot root (a leading `/`
/// means the same), `.` and doubled slashes dropped, no `..`. The root itself
/// is the empty path.
pub fn normalize(path: &[u8]) -> Result<Vec<u8>, String> {
    let parts: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
    if parts.contains(&&b".."[..]) {
        return Err("`..` is not allowed: give the path as the snapshot holds it, relative to its root".into());
    }
    if path.contains(&0) {
        return Err("a path holds no NUL byte".into());
    }
    Ok(parts.join(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::named_in_order as snaps;

    #[test]
    fn picks_by_name_latest_and_time() {
        let s = snaps(&[
            "s.01-01-20_10-00-00",
            "s.05-01-20_10-00-00",
            "s.31-12-19_10-00-00",
            "s.06-01-20_10-00-00.incomplete",
        ]);
        assert_eq!(pick(&s, "s", None).unwrap().folder, "s.05-01-20_10-00-00");
        assert_eq!(pick(&s, "s", Some("latest")).unwrap().folder, "s.05-01-20_10-00-00");
        assert_eq!(pick(&s, "s", Some("s.31-12-19_10-00-00")).unwrap().folder, "s.31-12-19_10-00-00");
        assert_eq!(pick(&s, "s", Some("01-01-20_10-00-00")).unwrap().folder, "s.01-01-20_10-00-00");
        // The newest at or before the time.
        assert_eq!(pick(&s, "s", Some("2020-01-04")).unwrap().folder, "s.01-01-20_10-00-00");
        assert_eq!(pick(&s, "s", Some("2020-01-01 10:00")).unwrap().folder, "s.01-01-20_10-00-00");
        assert_eq!(pick(&s, "s", Some("2020-01-01 09:59:59")).unwrap().folder, "s.31-12-19_10-00-00");
        assert_eq!(pick(&s, "s", Some("2020-01-05T10:00:00Z")).unwrap().folder, "s.05-01-20_10-00-00");
        assert!(pick(&s, "s", Some("2019-12-30")).is_err());
        assert!(pick(&s, "s", Some("s.06-01-20_10-00-00.incomplete")).is_err());
        assert!(pick(&s, "s", Some("yesterday")).is_err());
        assert_eq!(pick(&s, "s", Some("previous")).unwrap().folder, "s.01-01-20_10-00-00");
        assert!(pick(&s[..1], "s", Some("previous")).is_err());
    }
}
