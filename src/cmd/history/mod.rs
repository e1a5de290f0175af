//! `history PATH`: one path across every snapshot — "when did this file
//! change, and give me Tuesday's" — the question hardlink tools answer with
//! `ls -li` across folders.
//!
//! For each complete snapshot, oldest first, the path's record comes from
//! the snapshot's manifest ([`lookup`]; no snapshot tree is walked), and each
//! row says what happened since the snapshot before ([`change`]): `new`,
//! `changed`, `metadata`, `same`, `unknown`, or `deleted`. With
//! `--all-versions-to DIR`, each distinct content is copied out ([`export`]).
//! Like `verify` and `diff`, it holds the readers lock, so `prune` deletes
//! nothing while it reads.

pub mod change;
pub mod export;
pub mod lookup;

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::Result;

use crate::config::Job;
use crate::error::Code;
use crate::fs::safefs::Shown;
use crate::store::manifest::{self, Kind};
use crate::store::{Snapshot, Store, lock};
use crate::{info, usage};
use change::{Change, Seen, Sighting, Source};

/// What `history` was asked.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Relative to the snapshot root; a leading `/` means the same.
    pub path: PathBuf,
    /// Copy each distinct content version into this folder.
    pub all_versions_to: Option<PathBuf>,
    /// One JSON array on stdout instead of the table.
    pub json: bool,
}

/// Prints the history of `opts.path` (and copies its versions out).
pub fn run(job: &Job, opts: &Options) -> Result<Code> {
    let path = change::normalize(opts.path.as_os_str().as_bytes())
        .map_err(|why| usage!("history {}: {why}", opts.path.display()))?;
    let store = Store::open(&job.backups_folder, &job.name)?;
    if let Some(to) = &opts.all_versions_to {
        export::refuse_inside(to, &store.folder)?;
    }
    store.require_snapshots()?;
    let Found { snapshots, sightings, rows } = lookup(&store, &path)?;
    if snapshots.is_empty() {
        return Err(usage!(
            "there is no complete snapshot of {} in {} yet (finish the interrupted one with `rbackup --continue`)",
            job.name,
            job.backups_folder.display()
        ));
    }
    if sightings.iter().all(Option::is_none) {
        return Err(usage!(
            "{} is in none of the {} snapshots of {} ({}); give the path relative to the snapshot root, as \
             `rbackup diff` and the snapshot folders show it",
            shown(&path),
            snapshots.len(),
            job.name,
            store.shown()
        ));
    }
    let text = if opts.json { json(&snapshots, &sightings, &rows)? } else { table(&snapshots, &sightings, &rows) };
    print(&text)?;
    let trees = sightings.iter().flatten().filter(|s| s.source == Source::Tree).count();
    let held = sightings.iter().flatten().count();
    let versions = rows.iter().filter(|(_, c)| c.new_content()).count();
    info!(
        "{}: in {held} of {} snapshots, {versions} content version{}{}",
        shown(&path),
        snapshots.len(),
        if versions == 1 { "" } else { "s" },
        if trees > 0 { format!(" ({trees} looked up in snapshot folders without a manifest)") } else { String::new() }
    );
    if let Some(to) = &opts.all_versions_to {
        let planned = export::plan(&path, &snapshots, &sightings, &rows);
        let written = export::copy_out(&store, &snapshots, &sightings, &path, &planned, to)?;
        for p in &planned {
            if let Some(earlier) = &p.same_as {
                info!("{}: the same content as {}, not copied again", snapshots[p.snapshot].folder, Shown(earlier));
            }
        }
        // With --json, stdout holds the JSON only.
        if opts.json {
            for w in &written {
                info!("wrote {}", w.display());
            }
        } else {
            print(&written.iter().map(|w| format!("{}\n", w.display())).collect::<String>())?;
        }
        info!("{} version{} copied to {}", written.len(), if written.len() == 1 { "" } else { "s" }, to.display());
    }
    Ok(Code::Ok)
}

/// A path's history: the complete snapshots (oldest first), the path as
/// each holds it, and the rows of [`change::rows`].
#[derive(Debug, Clone)]
pub struct Found {
    pub snapshots: Vec<Snapshot>,
    pub sightings: Vec<Sighting>,
    pub rows: Vec<(usize, Change)>,
}

/// Looks `path` (normalized, see [`change::normalize`]) up in every complete
/// snapshot, from the manifests, holding the readers lock meanwhile.
pub fn lookup(store: &Store, path: &[u8]) -> Result<Found> {
    let meta_dir = store.meta_dir()?;
    let _lock = lock::acquire_readers(&meta_dir, "history", &store.shown())?;
    let snapshots: Vec<Snapshot> = store.snapshots()?.into_iter().filter(|s| s.complete).collect();
    if snapshots.is_empty() {
        return Ok(Found { snapshots, sightings: Vec::new(), rows: Vec::new() });
    }
    let mut sightings = lookup::sightings(store, &manifest::folder(&meta_dir)?, &snapshots, path)?;
    fill_inodes(store, &snapshots, &mut sightings, path)?;
    let rows = change::rows(&sightings);
    Ok(Found { snapshots, sightings, rows })
}

/// Where two neighbouring sightings can't be compared by their digests,
/// their inodes decide (one inode is one content): looked up in the
/// snapshot folders, for those pairs only.
fn fill_inodes(store: &Store, snapshots: &[Snapshot], sightings: &mut [Sighting], path: &[u8]) -> Result<()> {
    for i in 1..sightings.len() {
        let (before, after) = sightings.split_at_mut(i);
        let (Some(a), Some(b)) = (before[i - 1].as_mut(), after[0].as_mut()) else { continue };
        if !change::needs_inodes(a, b) {
            continue;
        }
        for (seen, snap) in [(a, &snapshots[i - 1]), (b, &snapshots[i])] {
            if seen.inode.is_none() {
                seen.inode = lookup::inode(&store.open_snapshot(snap)?, path)?;
            }
        }
    }
    Ok(())
}

fn shown(path: &[u8]) -> String {
    if path.is_empty() { "/".into() } else { format!("{:#}", Shown(path)) }
}

fn kind_word(k: Kind) -> &'static str {
    match k {
        Kind::Dir => "dir",
        Kind::File => "file",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Char => "chardev",
        Kind::Block => "blockdev",
    }
}

/// `ls -l`'s mode column: type letter, then rwx with s/S and t/T.
pub fn mode_string(kind: Kind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        Kind::Dir => 'd',
        Kind::File => '-',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::Char => 'c',
        Kind::Block => 'b',
    });
    for (shift, special, set, unset) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

fn utc(sec: i64, nsec: u32) -> String {
    chrono::DateTime::from_timestamp(sec, nsec)
        .map_or_else(|| sec.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// The table's cells of one row (the snapshot and the word come first).
fn cells(snap: &Snapshot, change: Change, seen: Option<&Seen>) -> Vec<String> {
    let mut row = vec![snap.folder.clone(), change.word().to_string()];
    if let (Some(s), false) = (seen, change == Change::Deleted) {
        let r = &s.record;
        row.push(kind_word(r.kind).to_string());
        row.push(if r.kind == Kind::File { r.size.to_string() } else { "-".into() });
        row.push(utc(r.mtime, r.mtime_nsec));
        row.push(format!("{}:{}", r.uid, r.gid));
        row.push(mode_string(r.kind, r.mode));
        if let Some(t) = &r.target {
            row.push(format!("-> {}", Shown(t)));
        }
    }
    row
}

/// Writes to stdout; a reader that stops early (`| head`) is not an error.
fn print(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The rows as aligned columns (sizes right-aligned), a header first.
fn table(snapshots: &[Snapshot], sightings: &[Sighting], rows: &[(usize, Change)]) -> String {
    let header: Vec<String> =
        ["SNAPSHOT", "CHANGE", "TYPE", "SIZE", "MODIFIED (UTC)", "OWNER", "MODE"].map(String::from).to_vec();
    let table: Vec<Vec<String>> = std::iter::once(header)
        .chain(rows.iter().map(|&(i, c)| cells(&snapshots[i], c, sightings[i].as_ref())))
        .collect();
    let mut widths = [0usize; 7];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &table {
        let mut line = String::new();
        for (col, cell) in row.iter().enumerate() {
            let w = widths.get(col).copied().unwrap_or(0);
            let pad = w.saturating_sub(cell.chars().count());
            if col == 3 {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if col + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
            if col + 1 < row.len() {
                line.push_str("  ");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The rows as one JSON array: numbers as numbers, names as the table shows them.
fn json(snapshots: &[Snapshot], sightings: &[Sighting], rows: &[(usize, Change)]) -> Result<String> {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|&(i, c)| {
            let mut v = serde_json::json!({ "snapshot": snapshots[i].folder, "change": c });
            if let (Some(s), false) = (sightings[i].as_ref(), c == Change::Deleted) {
                let r = &s.record;
                v["type"] = kind_word(r.kind).into();
                v["size"] = r.size.into();
                v["mtime"] = utc(r.mtime, r.mtime_nsec).into();
                v["mtime_sec"] = r.mtime.into();
                v["mtime_nsec"] = r.mtime_nsec.into();
                v["uid"] = r.uid.into();
                v["gid"] = r.gid.into();
                v["mode"] = format!("{:04o}", r.mode).into();
                if let Some(t) = &r.target {
                    v["target"] = format!("{:#}", Shown(t)).into();
                }
                v["from"] = if s.source == Source::Tree { "folder" } else { "manifest" }.into();
            }
            v
        })
        .collect();
    Ok(serde_json::to_string_pretty(&items)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_like_ls() {
        assert_eq!(mode_string(Kind::File, 0o644), "-rw-r--r--");
        assert_eq!(mode_string(Kind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string(Kind::File, 0o2640), "-rw-r-S---");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(Kind::Symlink, 0o777), "lrwxrwxrwx");
    }
}
