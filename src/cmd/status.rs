//! `status`: for a job, its snapshots and, for each of its `replicas`, which
//! of them the replica holds and which are pending, with what each pending
//! one would copy — "which backups are on which drive" without opening
//! every folder by hand. Read from the names and the manifests only.

use std::path::Path;

use anyhow::Result;

use crate::config::Job;
use crate::report::human_bytes;
use crate::store::manifest::{self, Kind, ManifestReader, Record, dfs_cmp};
use crate::store::{Snapshot, Store};

/// Prints the status of `job`.
pub fn run(job: &Job) -> Result<()> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    let snaps = store.snapshots()?;
    println!("{}: {}", job.job, crate::store::shown(&job.backups_folder, &job.name));
    if snaps.is_empty() {
        println!("  no snapshots yet");
        return Ok(());
    }
    // What each replica holds: nothing yet if its folder isn't made but its
    // parent is there; `None` if it can't be read (a drive not mounted?).
    let replicas: Vec<(String, Option<Vec<Snapshot>>)> = job
        .replicas
        .iter()
        .map(|r| {
            let path = Path::new(r);
            // Over SSH, the append-only agent says what it holds.
            if let Ok((_, Some(remote))) = crate::cmd::replicate::destination(r) {
                let held = remote.connect(job).and_then(|c| c.held(job));
                if let Err(e) = &held {
                    crate::warn!("asking {remote} which snapshots it holds: {e:#}");
                }
                return (r.clone(), held.ok());
            }
            let held = match Store::open(path, &job.name).and_then(|s| s.snapshots()) {
                Ok(h) => Some(h),
                Err(_) if !path.exists() && path.parent().is_some_and(Path::is_dir) => Some(Vec::new()),
                Err(_) => None,
            };
            (r.clone(), held)
        })
        .collect();
    let manifests = manifest::folder(&store.meta_dir()?)?;
    let open =
        |s: &Snapshot| ManifestReader::open(&manifests, manifest::file_name(&s.folder).as_bytes()).ok().flatten();
    let width = snaps.iter().map(|s| s.folder.len()).max().unwrap_or(0);
    if !replicas.is_empty() {
        let mut head = format!("  {:<width$}", "snapshot");
        for (name, _) in &replicas {
            head.push_str(&format!("  {name:<24}"));
        }
        println!("{}", head.trim_end());
    }
    let mut pending = vec![(0u64, 0u64); replicas.len()];
    let mut previous: Option<&Snapshot> = None;
    for s in &snaps {
        let mut line = format!("  {:<width$}", s.folder);
        if !s.complete {
            line.push_str("  (interrupted or in progress)");
            println!("{line}");
            continue;
        }
        // What a replica of it copies: the files not in the one before.
        let new = open(s).and_then(|m| new_bytes(previous.and_then(open), m).ok());
        for (i, (_, held)) in replicas.iter().enumerate() {
            let word = match held {
                None => "unreadable".to_string(),
                Some(h) if h.iter().any(|r| r.complete && r.time == s.time) => "yes".to_string(),
                Some(_) => {
                    pending[i].0 += 1;
                    pending[i].1 += new.unwrap_or(0);
                    format!("pending ({})", new.map_or_else(|| "size unknown".into(), human_bytes))
                }
            };
            line.push_str(&format!("  {word:<24}"));
        }
        println!("{}", line.trim_end());
        previous = Some(s);
    }
    for ((name, held), (n, bytes)) in replicas.iter().zip(&pending) {
        match held {
            None if matches!(crate::cmd::replicate::destination(name), Ok((_, Some(_)))) => {
                println!("  replica {name}: can't be asked (see the warning above)");
            }
            None => println!("  replica {name}: can't be read (not mounted?)"),
            Some(_) if *n == 0 => println!("  replica {name}: up to date"),
            Some(_) => println!(
                "  replica {name}: {} pending, about {} to copy (`{}`)",
                crate::report::count(*n, "snapshot", "snapshots"),
                human_bytes(*bytes),
                job.command(&format!("replicate --to {name}"))
            ),
        }
    }
    if job.replicas.is_empty() {
        println!("  no replicas (set `replicas` in the job, see docs/replicate.md)");
    }
    Ok(())
}

/// The bytes of the files in `cur` that `prev` doesn't hold with the same
/// content (all of them without `prev`): what a replica of `cur` copies
/// when the replica of `prev` is there to link from.
fn new_bytes(prev: Option<ManifestReader>, mut cur: ManifestReader) -> Result<u64> {
    let mut prev = prev;
    let mut last: Option<Record> = None;
    let mut total = 0u64;
    while let Some(r) = cur.next_record()? {
        if r.kind != Kind::File {
            continue;
        }
        // Advance the previous manifest to this path (both are in listing
        // order); it stops being read once it has ended.
        while let Some(p) = prev.as_mut()
            && last.as_ref().is_none_or(|l| dfs_cmp(&l.path, &r.path).is_lt())
        {
            last = p.next_record()?;
            if last.is_none() {
                prev = None;
            }
        }
        let same = last.as_ref().is_some_and(|l| l.path == r.path && l.hash.is_some() && l.hash == r.hash);
        if !same {
            total = total.saturating_add(r.size);
        }
    }
    Ok(total)
}
