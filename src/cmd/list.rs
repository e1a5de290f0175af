//! `list`: the job's snapshots, oldest first by the time in their names,
//! with the two figures users try to get from `du` and misread: each
//! snapshot's apparent size, and the bytes only it holds — what removing it
//! would free — plus the total on disk.
//!
//! "Only it holds": a file whose every link is inside the snapshot (its
//! directories always are). A file hardlinked into any other snapshot costs
//! nothing to remove.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use rustix::fs::FileType;

use crate::fs::safefs::file_type;
use crate::report::human_bytes;
use crate::store::reader::Walk;
use crate::store::{Snapshot, Store};

/// Sizes of one snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the regular files' sizes.
    pub apparent: u64,
    /// Bytes allocated to entries no other snapshot shares.
    pub unique: u64,
}

/// Sizes of `snapshots`, and the bytes all of them take on disk together.
pub fn usage(store: &Store, snapshots: &[Snapshot]) -> Result<(Vec<Usage>, u64)> {
    let mut total = 0u64;
    let mut counted: HashSet<(u64, u64)> = HashSet::new();
    let mut out = Vec::new();
    for snap in snapshots {
        let mut u = Usage::default();
        // Multiply linked files: links seen here, links in all, blocks.
        let mut shared: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
        for item in Walk::new(store.open_snapshot(snap)?) {
            let item = item.with_context(|| format!("reading {}", snap.folder))?;
            let st = &item.stat;
            let bytes = st.st_blocks as u64 * 512;
            if file_type(st) == FileType::RegularFile {
                u.apparent += st.st_size as u64;
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    shared.entry(key).or_insert((0, st.st_nlink, bytes)).0 += 1;
                    if counted.insert(key) {
                        total += bytes;
                    }
                    continue;
                }
            }
            u.unique += bytes;
            total += bytes;
        }
        u.unique += shared.values().filter(|(here, all, _)| here == all).map(|(_, _, b)| b).sum::<u64>();
        out.push(u);
    }
    Ok((out, total))
}

/// Prints one line per snapshot: folder, state, UTC time, and with `sizes`
/// its apparent size and the bytes only it holds; then the total.
pub fn run(store: &Store, sizes: bool, bytes: bool) -> Result<()> {
    let fmt = |n: u64| if bytes { n.to_string() } else { human_bytes(n) };
    let snapshots = store.snapshots()?;
    if snapshots.is_empty() {
        crate::info!("no snapshots of {} in {}", store.name, store.folder.display());
        return Ok(());
    }
    let (usage, total) = if sizes { usage(store, &snapshots)? } else { (Vec::new(), 0) };
    let width = snapshots.iter().map(|s| s.folder.len()).max().unwrap_or(0);
    for (i, s) in snapshots.iter().enumerate() {
        let state = if s.complete { "complete" } else { "incomplete" };
        let mut line = format!("{:<width$}  {state:<10}  {}", s.folder, s.time.format("%Y-%m-%d %H:%M:%S UTC"));
        if let Some(u) = usage.get(i) {
            line.push_str(&format!("  size {:>10}  only here {:>10}", fmt(u.apparent), fmt(u.unique)));
        }
        println!("{line}");
    }
    if sizes {
        let n = snapshots.len();
        println!("total on disk: {} in {n} snapshot{}", fmt(total), if n == 1 { "" } else { "s" });
    }
    Ok(())
}
