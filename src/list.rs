//! `list`: the job's snapshots, oldest first, by the time in their names.

use anyhow::Result;

use crate::store::Store;

/// Prints one line per snapshot: folder, state, UTC time.
pub fn run(store: &Store) -> Result<()> {
    let snapshots = store.snapshots()?;
    let width = snapshots.iter().map(|s| s.folder.len()).max().unwrap_or(0);
    for s in &snapshots {
        let state = if s.complete { "complete" } else { "incomplete" };
        println!("{:<width$}  {state:<10}  {}", s.folder, s.time.format("%Y-%m-%d %H:%M:%S UTC"));
    }
    if snapshots.is_empty() {
        crate::info!("no snapshots of {} in {}", store.name, store.folder.display());
    }
    Ok(())
}
