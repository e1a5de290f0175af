//! What each replica destination held after its last `replicate` that
//! succeeded, in `NAME.rbackup/replicas.json` beside the originals.
//!
//! A backup whose replica fails (a drive not mounted, a host down) can then
//! still prune: it keeps, besides what its rules keep, every snapshot that
//! destination wants and was not known to hold (docs/replicate.md). A
//! destination with no record here has never been seen holding anything,
//! and the backup does not prune at all.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Store;

const FILE: &[u8] = b"replicas.json";
/// Larger than any honest record (a folder name per snapshot).
const SIZE_MAX: u64 = 16 << 20;

#[derive(Serialize, Deserialize, Default)]
struct Held {
    destinations: BTreeMap<String, Seen>,
}

#[derive(Serialize, Deserialize)]
struct Seen {
    /// When the replicate that saw it ended (RFC 3339, UTC).
    when: String,
    /// The complete snapshots it held then, by folder name.
    holds: Vec<String>,
}

fn read(store: &Store) -> Result<Held> {
    let dir = store.meta_dir()?;
    let file = match dir.open_file(FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Held::default()),
        Err(e) => return Err(e).context("opening replicas.json"),
    };
    if file.metadata()?.len() > SIZE_MAX {
        anyhow::bail!("replicas.json is larger than {SIZE_MAX} bytes");
    }
    serde_json::from_reader(std::io::BufReader::new(file)).context("reading replicas.json")
}

/// Records that destination `to` (as the job names it) holds `holds` now.
pub fn remember(store: &Store, to: &str, mut holds: Vec<String>) -> Result<()> {
    let mut held = read(store).unwrap_or_default();
    holds.sort();
    holds.dedup();
    held.destinations.insert(to.to_string(), Seen { when: chrono::Utc::now().to_rfc3339(), holds });
    let text = serde_json::to_vec_pretty(&held).expect("plain JSON");
    crate::fs::writer::replace_file(&store.meta_dir()?, FILE, &text, 0o600).context("writing replicas.json")
}

/// What a destination held after its last replicate that succeeded.
#[derive(Debug, Clone)]
pub struct Reached {
    /// Its complete snapshots, by folder name.
    pub holds: Vec<String>,
    pub when: chrono::DateTime<chrono::Utc>,
}

impl Reached {
    /// `when`, as messages show it: `YYYY-MM-DD HH:MM UTC`.
    pub fn shown(&self) -> String {
        self.when.format("%Y-%m-%d %H:%M UTC").to_string()
    }

    /// Whether it was at most `days` days ago (a drive's `away_days`).
    pub fn within_days(&self, days: u32) -> bool {
        chrono::Utc::now() - self.when <= chrono::Duration::days(i64::from(days))
    }
}

/// What `to` held after its last replicate that succeeded; `None` if it
/// never succeeded (or the record can't be read).
pub fn remembered(store: &Store, to: &str) -> Option<Reached> {
    let mut held = read(store).ok()?;
    let seen = held.destinations.remove(to)?;
    let when = chrono::DateTime::parse_from_rfc3339(&seen.when).ok()?.with_timezone(&chrono::Utc);
    Some(Reached { holds: seen.holds, when })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_destination_keeps_its_own_last_record() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("s.rbackup")).unwrap();
        let store = Store::open(tmp.path(), "s").unwrap();
        assert!(remembered(&store, "/usb").is_none());
        remember(&store, "/usb", vec!["s.b".into(), "s.a".into(), "s.a".into()]).unwrap();
        remember(&store, "host:/r", vec!["s.a".into()]).unwrap();
        remember(&store, "/usb", vec!["s.a".into(), "s.b".into(), "s.c".into()]).unwrap();
        assert_eq!(remembered(&store, "/usb").unwrap().holds, ["s.a", "s.b", "s.c"]);
        assert_eq!(remembered(&store, "host:/r").unwrap().holds, ["s.a"]);
        // A damaged record is no record: nothing is taken as held.
        std::fs::write(tmp.path().join("s.rbackup/replicas.json"), b"{not json").unwrap();
        assert!(remembered(&store, "/usb").is_none());
    }
}
