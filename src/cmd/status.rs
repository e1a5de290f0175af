//! `status`: for a job, its snapshots and, for each of its `replicas`, which
//! of them the replica holds and which are pending, with what each pending
//! one would copy — "which backups are on which drive" without opening
//! every folder by hand. Read from the names and the manifests only.
//!
//! [`status`] gathers the facts (the web console shows them too); [`run`]
//! prints them.

use std::path::Path;

use anyhow::Result;

use crate::config::Job;
use crate::report::human_bytes;
use crate::store::manifest::{self, Kind, ManifestReader, Record, dfs_cmp};
use crate::store::{Snapshot, Store};

/// Whether one replica holds one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Yes,
    /// Not held, and not to be: the replica's own rules leave it out
    /// (`replicas` entries with `keep_*`, docs/replicate.md).
    NotKept,
    /// Not yet; what copying it would take (`None`: unknown, no manifest).
    Pending(Option<u64>),
    /// The replica's folder can't be read (a drive not mounted?), or its
    /// agent can't be asked.
    Unreadable,
    /// An off-site replica that wasn't asked (the console doesn't open SSH
    /// connections to draw a page).
    NotAsked,
}

/// One snapshot of the job and, for a complete one, its state in each replica
/// (in the job's order of `replicas`).
#[derive(Debug, Clone)]
pub struct Row {
    pub snapshot: Snapshot,
    pub replicas: Vec<Held>,
}

/// One replica: its folder as configured, and what is pending there.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    /// `false` when its folder can't be read (or its agent not asked).
    pub readable: bool,
    /// Over SSH (`[user@]host:/path`).
    pub remote: bool,
    /// Over SSH and not asked ([`status`] with `ask_remote` false).
    pub asked: bool,
    pub pending: u64,
    pub pending_bytes: u64,
    /// Its complete snapshots the backups folder no longer holds (a drive
    /// that keeps a longer history), oldest first.
    pub only_there: Vec<String>,
    /// Its last `replicate` that succeeded, if ever (`crate::store::held`).
    pub reached: Option<crate::store::held::Reached>,
}

/// A job's snapshots and its replicas' state.
#[derive(Debug, Clone)]
pub struct Status {
    pub rows: Vec<Row>,
    pub replicas: Vec<Replica>,
}

/// The status of `job`, from the snapshot names and the manifests; an
/// off-site replica's agent is asked what it holds if `ask_remote`.
pub fn status(job: &Job, ask_remote: bool) -> Result<Status> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    let snaps = store.snapshots()?;
    // What each replica holds: nothing yet if its folder isn't made but its
    // parent is there; `None` if it can't be read (a drive not mounted?).
    let held: Vec<Option<Vec<Snapshot>>> = job
        .replicas
        .iter()
        .map(|r| {
            let path = Path::new(&r.to);
            // Over SSH, the append-only agent says what it holds.
            if let Ok((_, Some(remote))) = crate::cmd::replicate::destination(&r.to) {
                if !ask_remote {
                    return None;
                }
                let held = remote.connect(job).and_then(|c| c.held(job));
                if let Err(e) = &held {
                    crate::warn!("asking {remote} which snapshots it holds: {e:#}");
                }
                return held.ok();
            }
            // A folder without the job's bookkeeping is a drive not mounted
            // (its bare mount point) or a replica not made yet, never an
            // empty replica.
            if !path.join(format!("{}.rbackup", job.name)).is_dir() {
                return None;
            }
            Store::open(path, &job.name).and_then(|s| s.snapshots()).ok()
        })
        .collect();
    let mut replicas: Vec<Replica> = job
        .replicas
        .iter()
        .zip(&held)
        .map(|(r, h)| {
            let remote = !r.is_local();
            Replica {
                name: r.to.clone(),
                readable: h.is_some(),
                remote,
                asked: !remote || ask_remote,
                pending: 0,
                pending_bytes: 0,
                only_there: h
                    .iter()
                    .flatten()
                    .filter(|r| r.complete && !snaps.iter().any(|s| s.complete && s.time == r.time))
                    .map(|r| r.folder.clone())
                    .collect(),
                reached: crate::store::held::remembered(&store, &r.key()),
            }
        })
        .collect();
    let mut rows = Vec::new();
    if snaps.is_empty() {
        return Ok(Status { rows, replicas });
    }
    // Which snapshots each replica's rules keep (all of them without rules).
    let complete: Vec<Snapshot> = snaps.iter().filter(|s| s.complete).cloned().collect();
    let now = chrono::Utc::now();
    let wanted: Vec<Vec<chrono::DateTime<chrono::Utc>>> = job
        .replicas
        .iter()
        .zip(&held)
        .map(|(r, h)| {
            let w = crate::cmd::replicate::wanted(&complete, h.as_deref().unwrap_or_default(), &r.keep, now)?;
            Ok(w.iter().map(|s| s.time).collect())
        })
        .collect::<Result<_>>()?;
    let manifests = manifest::folder(&store.meta_dir()?)?;
    let open =
        |s: &Snapshot| ManifestReader::open(&manifests, manifest::file_name(&s.folder).as_bytes()).ok().flatten();
    let mut previous: Option<&Snapshot> = None;
    for s in &snaps {
        if !s.complete {
            rows.push(Row { snapshot: s.clone(), replicas: Vec::new() });
            continue;
        }
        // What a replica of it copies: the files not in the one before.
        let mut new = None;
        let mut states = Vec::new();
        for (i, h) in held.iter().enumerate() {
            let state = match h {
                None if !replicas[i].asked => Held::NotAsked,
                None => Held::Unreadable,
                Some(h) if h.iter().any(|r| r.complete && r.time == s.time) => Held::Yes,
                Some(_) if !wanted[i].contains(&s.time) => Held::NotKept,
                Some(_) => {
                    if new.is_none() {
                        new = Some(open(s).and_then(|m| new_bytes(previous.and_then(open), m).ok()));
                    }
                    let bytes = new.flatten();
                    replicas[i].pending += 1;
                    replicas[i].pending_bytes += bytes.unwrap_or(0);
                    Held::Pending(bytes)
                }
            };
            states.push(state);
        }
        rows.push(Row { snapshot: s.clone(), replicas: states });
        previous = Some(s);
    }
    Ok(Status { rows, replicas })
}

/// Prints the status of `job`.
pub fn run(job: &Job) -> Result<()> {
    let st = status(job, true)?;
    println!("{}: {}", job.job, crate::store::shown(&job.backups_folder, &job.name));
    if st.rows.is_empty() {
        println!("  no snapshots yet");
        return Ok(());
    }
    let width = st.rows.iter().map(|r| r.snapshot.folder.len()).max().unwrap_or(0);
    if !st.replicas.is_empty() {
        let mut head = format!("  {:<width$}", "snapshot");
        for r in &st.replicas {
            head.push_str(&format!("  {:<24}", r.name));
        }
        println!("{}", head.trim_end());
    }
    for row in &st.rows {
        let mut line = format!("  {:<width$}", row.snapshot.folder);
        if !row.snapshot.complete {
            line.push_str("  (interrupted or in progress)");
            println!("{line}");
            continue;
        }
        for (held, r) in row.replicas.iter().zip(&st.replicas) {
            let word = match held {
                Held::Unreadable if r.remote => "can't be asked".to_string(),
                Held::Unreadable => "not there".to_string(),
                Held::NotAsked => "not asked".to_string(),
                Held::Yes => "yes".to_string(),
                Held::NotKept => "not kept there".to_string(),
                Held::Pending(new) => {
                    format!("pending ({})", new.map_or_else(|| "size unknown".into(), human_bytes))
                }
            };
            line.push_str(&format!("  {word:<24}"));
        }
        println!("{}", line.trim_end());
    }
    for (r, dest) in st.replicas.iter().zip(&job.replicas) {
        let away = dest.away_days > 0 && r.reached.as_ref().is_some_and(|w| w.within_days(dest.away_days));
        match r {
            Replica { readable: false, .. } if away => {
                println!(
                    "  replica {}: away{} (it may be away {} days; its snapshots wait for it)",
                    r.name,
                    last_reached(r),
                    dest.away_days
                );
            }
            Replica { readable: false, remote: true, .. } => {
                println!("  replica {}: can't be asked (see the warning above){}", r.name, last_reached(r));
            }
            Replica { readable: false, reached: Some(_), .. } => {
                println!("  replica {}: not there, or can't be read (a drive not mounted?){}", r.name, last_reached(r));
            }
            Replica { readable: false, .. } => println!(
                "  replica {}: not there, or can't be read (a drive not mounted? none made yet: `{}`)",
                r.name,
                job.command(&format!("replicate --to {}", r.name))
            ),
            Replica { pending: 0, .. } => println!("  replica {}: up to date", r.name),
            Replica { pending: n, pending_bytes: bytes, .. } => println!(
                "  replica {}: {} pending, about {} to copy (`{}`)",
                r.name,
                crate::report::count(*n, "snapshot", "snapshots"),
                human_bytes(*bytes),
                job.command(&format!("replicate --to {}", r.name))
            ),
        }
    }
    for r in st.replicas.iter().filter(|r| !r.only_there.is_empty()) {
        let n = r.only_there.len() as u64;
        println!(
            "  replica {} also holds {} the backups folder no longer has ({}{})",
            r.name,
            crate::report::count(n, "snapshot", "snapshots"),
            r.only_there[0],
            if n > 1 { format!(" … {}", r.only_there[r.only_there.len() - 1]) } else { String::new() }
        );
    }
    if job.replicas.is_empty() {
        println!("  no replicas (set `replicas` in the job, see docs/replicate.md)");
    }
    Ok(())
}

/// `; last reached YYYY-MM-DD HH:MM UTC` when a replicate to `r` ever succeeded.
fn last_reached(r: &Replica) -> String {
    r.reached.as_ref().map(|w| format!("; last reached {}", w.shown())).unwrap_or_default()
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
