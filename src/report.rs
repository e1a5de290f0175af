//! What a run did and what went wrong with single entries: the counters of
//! the end-of-run summary and the per-path problems that make a run partial.
//!
//! Policy (ripgrep's): a problem with one entry never stops the run, but it
//! always reaches the exit code — see [`crate::error`].

use serde::{Deserialize, Serialize};

use crate::fs::safefs::Shown;

/// Kinds of per-entry problems, from the most to the least serious.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The source could not read it (permission denied): not in the snapshot.
    Unreadable,
    /// Written, but some metadata could not be applied.
    Metadata,
    /// Something else failed for this entry.
    Failed,
    /// It disappeared while the run went on.
    Vanished,
    /// It changed while it was read: stored as read, fetched again next run.
    Changed,
}

impl ProblemKind {
    /// Vanished and changed files are normal on a live server (rsync's 24);
    /// the others mean something the admin should fix (rsync's 23).
    pub fn is_live_change(self) -> bool {
        matches!(self, ProblemKind::Vanished | ProblemKind::Changed)
    }
}

/// One problem with one entry.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// Relative to the root of the run, escaped for display.
    pub path: String,
    /// The same, as the bytes it is.
    #[serde(skip)]
    pub raw_path: Vec<u8>,
    /// Escaped for display too: it often quotes the peer (an error text the
    /// server sent), and must not reach a terminal's control sequences.
    pub detail: String,
}

impl Problem {
    pub fn new(kind: ProblemKind, path: &[u8], detail: impl Into<String>) -> Problem {
        let shown = if path.is_empty() { ".".to_string() } else { Shown(path).to_string() };
        Problem { kind, path: shown, raw_path: path.to_vec(), detail: Shown(detail.into().as_bytes()).to_string() }
    }
}

impl Problem {
    /// The entry may be missing from the snapshot: it could not be read, it
    /// vanished, or writing it failed (as opposed to a metadata problem or a
    /// file stored as read while it changed).
    pub fn may_be_missing(&self) -> bool {
        matches!(self.kind, ProblemKind::Unreadable | ProblemKind::Vanished | ProblemKind::Failed)
    }

    /// The source was refused access (`EACCES`, `EPERM`): what the ACL mask
    /// and default ACL hints are about. Other read errors — a file replaced
    /// while the walk looked at it gives `EINVAL` or `ESTALE` — are not.
    /// The detail is the source's `io::Error` text, as it sent it.
    pub fn is_permission_denied(&self) -> bool {
        let d = &self.detail;
        self.kind == ProblemKind::Unreadable
            && (d.contains("(os error 13)")
                || d.contains("(os error 1)")
                || d.contains("Permission denied")
                || d.contains("Operation not permitted"))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            ProblemKind::Unreadable => "cannot read",
            ProblemKind::Metadata => "metadata not kept for",
            ProblemKind::Failed => "failed",
            ProblemKind::Vanished => "vanished",
            ProblemKind::Changed => "changed while read",
        };
        write!(f, "{what}: {}: {}", self.path, self.detail)
    }
}

/// Counters of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Stats {
    /// Entries in the source listing, directories included.
    pub entries: u64,
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub specials: u64,
    /// Already in place (a resumed snapshot, or unchanged at a restore target).
    pub kept: u64,
    /// Hardlinked to the previous snapshot.
    pub linked: u64,
    /// Unchanged content with changed metadata: copied locally.
    pub copied_locally: u64,
    /// Metadata fixed in place (restore only).
    pub metadata_fixed: u64,
    pub fetched_whole: u64,
    pub fetched_delta: u64,
    /// Delta results that failed the BLAKE3 check and were fetched whole.
    pub delta_retries: u64,
    /// Files an interrupted run had partly received, finished from there.
    pub resumed: u64,
    /// Bytes those files kept from the interrupted run (not fetched again).
    pub bytes_resumed: u64,
    /// Resumed files that failed the digest check and were fetched whole.
    pub resume_retries: u64,
    /// Hardlinks within the tree recreated.
    pub hardlinks: u64,
    /// Entries removed because the source no longer has them.
    pub removed: u64,
    pub devices_skipped: u64,
    pub sockets_skipped: u64,
    pub warnings: u64,
    /// Bytes of file data written.
    pub bytes_written: u64,
    /// Bytes of file data received (whole files, and what deltas rebuilt).
    pub bytes_fetched: u64,
    /// Sizes of the files asked for so far (what `bytes_fetched` goes to).
    pub bytes_to_fetch: u64,
    /// Bytes received on the wire, compressed or not.
    pub wire_bytes_received: u64,
    /// The whole listing has arrived, so `bytes_to_fetch` is the total (for
    /// the progress display; not a counter).
    #[serde(skip)]
    pub listing_done: bool,
}

impl Stats {
    /// The counters as name/value pairs (for the wire and for reports).
    pub fn pairs(&self) -> Vec<(String, u64)> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => {
                map.into_iter().filter_map(|(k, v)| v.as_u64().map(|v| (k, v))).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Rebuilds counters from [`Stats::pairs`]; a peer's unknown names are
    /// ignored and missing ones are zero.
    pub fn from_pairs(pairs: &[(String, u64)]) -> Stats {
        let map: serde_json::Map<String, serde_json::Value> =
            pairs.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(*v))).collect();
        serde_json::from_value(serde_json::Value::Object(map)).unwrap_or_default()
    }
}

/// What the sink does to one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Mkdir,
    /// Hardlink an unchanged file of a basis.
    Link,
    /// Copy locally (same content, new metadata).
    Copy,
    Fetch,
    Delta,
    /// A symlink or special file.
    Create,
    /// Another name of an inode already written.
    Hardlink,
    /// Metadata fixed in place.
    Meta,
    Remove,
}

impl Action {
    /// The word a snapshot's dry run prints.
    pub fn snapshot_verb(self) -> &'static str {
        match self {
            Action::Mkdir => "mkdir",
            Action::Link => "link",
            Action::Copy => "copy",
            Action::Fetch => "fetch",
            Action::Delta => "delta",
            Action::Create => "create",
            Action::Hardlink => "hardlink",
            Action::Meta => "meta",
            Action::Remove => "remove",
        }
    }
}

/// Where the sink reports as it goes: the desktop logs directly; an agent
/// acting as sink forwards to the desktop.
pub trait Events {
    /// A planned or performed action on `path` (printed in dry runs, logged
    /// at debug level otherwise).
    fn action(&mut self, verb: &str, path: &[u8]);
    /// A problem with one entry.
    fn problem(&mut self, problem: Problem);
    /// A note for the log (e.g. "not root: owners are not kept").
    fn note(&mut self, text: &str);
    /// The counters so far, for a progress display.
    fn progress(&mut self, _stats: &Stats) {}
}

/// `n` with its noun: `1 entry`, `2 entries`.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `1234567` → `1.2 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(20 << 20), "20.0 MiB");
    }

    #[test]
    fn only_access_refusals_are_permission_problems() {
        let p = |kind, detail: &str| Problem::new(kind, b"f", detail).is_permission_denied();
        assert!(p(ProblemKind::Unreadable, "Permission denied (os error 13)"));
        assert!(p(ProblemKind::Unreadable, "directory not listed: Permission denied (os error 13)"));
        assert!(p(ProblemKind::Unreadable, "Operation not permitted (os error 1)"));
        assert!(!p(ProblemKind::Unreadable, "Invalid argument (os error 22)"));
        assert!(!p(ProblemKind::Unreadable, "Stale file handle (os error 116)"));
        assert!(!p(ProblemKind::Failed, "Permission denied (os error 13)"));
    }

    #[test]
    fn a_problem_shows_control_characters_escaped() {
        let p = Problem::new(ProblemKind::Unreadable, b"f\x1b", "denied\x1b]0;owned\x07");
        let shown = p.to_string();
        assert!(!shown.contains('\x1b') && !shown.contains('\x07'), "{shown:?}");
        assert!(shown.contains("denied\\u{1b}]0;owned"), "{shown}");
    }

    #[test]
    fn stats_roundtrip_through_pairs() {
        let s = Stats { entries: 3, linked: 2, wire_bytes_received: 99, ..Stats::default() };
        assert_eq!(Stats::from_pairs(&s.pairs()), s);
    }
}
