//! The `replicas` job key: where `replicate` copies the snapshots, and for
//! each destination which of them it keeps. An entry is a destination alone
//! (`"/media/usb/backups"`: every snapshot) or a table with its own
//! retention rules (`{ to = "/media/usb/backups", keep_monthly = 60 }`: the
//! snapshots those rules keep), and for a local folder `prune = true` to
//! delete there what they don't and `away_days = N` for a drive that
//! travels (docs/replicate.md).

use serde::Deserialize;
use serde::de::Error;

use crate::store::rules::Rules;

/// One destination of `replicate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destination {
    /// `/abs/folder` or `[user@]host:/abs/folder`.
    pub to: String,
    /// Which snapshots it holds; empty: all of them.
    pub keep: Rules,
    /// After copying, delete from it what `keep` doesn't keep (local only).
    pub prune: bool,
    /// Days it may be away (a drive rotated off site, local only) before
    /// its absence is an error; 0: absent is an error at once.
    pub away_days: u32,
}

impl Destination {
    /// A destination named on the command line: its settings in `configured`
    /// if the job names it there, else every snapshot and no prune.
    pub fn named(to: &str, configured: &[Destination]) -> Destination {
        configured
            .iter()
            .find(|d| same_place(&d.to, to))
            .cloned()
            .unwrap_or_else(|| Destination { to: to.to_string(), ..Destination::default() })
    }

    /// Whether it is a folder on this machine (not `host:/path`).
    pub fn is_local(&self) -> bool {
        self.to.starts_with('/')
    }

    /// One spelling of the place, whichever was written: what records
    /// about it are kept under (`crate::store::held`).
    pub fn key(&self) -> String {
        place(&self.to)
    }
}

/// `[user@]host:` as written, then the path's components joined by `/`:
/// `/media/usb//backups/` is `/media/usb/backups`.
fn place(s: &str) -> String {
    let (host, path) = if s.starts_with('/') { ("", s) } else { s.split_once(':').map_or(("", s), |(h, p)| (h, p)) };
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if host.is_empty() { format!("/{}", parts.join("/")) } else { format!("{host}:/{}", parts.join("/")) }
}

/// Whether two spellings name the same destination (components compared;
/// a host's part as is).
fn same_place(a: &str, b: &str) -> bool {
    place(a) == place(b)
}

/// The table form of an entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    to: String,
    keep_last: Option<u32>,
    keep_within: Option<String>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    #[serde(default)]
    prune: bool,
    #[serde(default)]
    away_days: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Entry {
    To(String),
    Table(Table),
}

/// `replicas`: checked while the file is read, so a bad entry is an error
/// naming the line (docs/configuration.md).
pub(super) fn destinations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Destination>, D::Error> {
    let entries: Vec<toml::Value> = Deserialize::deserialize(d)?;
    entries.into_iter().map(|v| entry(v).map_err(D::Error::custom)).collect()
}

fn entry(v: toml::Value) -> Result<Destination, String> {
    let shown = v.to_string();
    // Untagged enums hide why a table didn't fit; the table's own error says.
    let e = match v {
        toml::Value::String(s) => Entry::To(s),
        toml::Value::Table(t) => {
            Entry::Table(Table::deserialize(t).map_err(|e| format!("replicas: the entry {shown}: {e}"))?)
        }
        _ => return Err(format!("replicas: {shown} is neither a destination nor a table with `to`")),
    };
    let d = match e {
        Entry::To(to) => Destination { to, ..Destination::default() },
        Entry::Table(t) => Destination {
            to: t.to,
            keep: Rules {
                keep_last: t.keep_last,
                keep_within: t.keep_within,
                keep_hourly: t.keep_hourly,
                keep_daily: t.keep_daily,
                keep_weekly: t.keep_weekly,
                keep_monthly: t.keep_monthly,
                keep_yearly: t.keep_yearly,
            },
            prune: t.prune,
            away_days: t.away_days,
        },
    };
    crate::config::SourceSpec::parse_as(&d.to, "replica destination").map_err(|e| format!("replicas: {e}"))?;
    if let Some(w) = &d.keep.keep_within {
        crate::store::rules::parse_duration(w).map_err(|e| format!("replicas: {}: keep_within: {e}", d.to))?;
    }
    if d.prune && d.keep.is_empty() {
        return Err(format!(
            "replicas: {}: prune = true needs keep_* rules saying what to keep there; rbackup never guesses what \
             to delete",
            d.to
        ));
    }
    if d.away_days > 0 && !d.is_local() {
        return Err(format!(
            "replicas: {}: away_days is for a drive of this machine that travels; a host over SSH that can't be \
             reached is an error",
            d.to
        ));
    }
    if d.prune && !d.is_local() {
        return Err(format!(
            "replicas: {}: prune = true works only on a folder of this machine; a host over SSH takes replicas \
             append-only and prunes them itself (`rbackup prune` run there)",
            d.to
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        #[serde(deserialize_with = "destinations")]
        replicas: Vec<Destination>,
    }

    fn parse(s: &str) -> Result<Vec<Destination>, String> {
        toml::from_str::<Doc>(s).map(|d| d.replicas).map_err(|e| e.to_string())
    }

    #[test]
    fn a_string_is_every_snapshot_a_table_has_its_rules() {
        let got = parse(
            "replicas = [\"/media/usb\", { to = \"/media/usb2\", keep_monthly = 60, prune = true }, \
             \"off:/backups\"]",
        )
        .unwrap();
        assert_eq!(got[0], Destination { to: "/media/usb".into(), ..Destination::default() });
        assert_eq!(got[1].keep.keep_monthly, Some(60));
        assert!(got[1].prune);
        assert!(!got[2].is_local());
    }

    #[test]
    fn bad_entries_are_named() {
        for (doc, says) in [
            ("replicas = [{ to = \"/m\", keep_montly = 3 }]", "keep_montly"),
            ("replicas = [{ to = \"/m\", prune = true }]", "never guesses"),
            ("replicas = [{ to = \"h:/m\", keep_daily = 3, prune = true }]", "append-only"),
            ("replicas = [\"relative\"]", "replica destination"),
            ("replicas = [{ to = \"/m\", keep_within = \"soon\" }]", "keep_within"),
            ("replicas = [3]", "neither"),
            ("replicas = [{ to = \"h:/m\", away_days = 7 }]", "a drive of this machine"),
        ] {
            let e = parse(doc).unwrap_err();
            assert!(e.contains(says), "{doc}: {e}");
        }
    }

    #[test]
    fn the_command_line_finds_the_configured_rules() {
        let conf = parse("replicas = [{ to = \"/media/usb/\", keep_daily = 3 }]").unwrap();
        assert_eq!(Destination::named("/media/usb", &conf).keep.keep_daily, Some(3));
        assert!(Destination::named("/elsewhere", &conf).keep.is_empty());
        assert_eq!(Destination::named("/media//usb/./", &conf).keep.keep_daily, Some(3));
        let remote = parse("replicas = [{ to = \"off:/srv/r\", keep_daily = 2 }]").unwrap();
        assert_eq!(Destination::named("off:/srv//r/", &remote).keep.keep_daily, Some(2));
        assert!(Destination::named("other:/srv/r", &remote).keep.is_empty());
        // Every spelling of a place has one key.
        assert_eq!(conf[0].key(), "/media/usb");
        assert_eq!(Destination::named("/media//usb/./", &[]).key(), "/media/usb");
        assert_eq!(Destination::named("off:/srv//r/", &[]).key(), "off:/srv/r");
    }
}
