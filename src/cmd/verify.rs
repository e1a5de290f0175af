//! `verify`: re-read snapshots and compare them with their manifests —
//! changed bytes, changed metadata, missing and extra entries, by path.
//!
//! Snapshots share most inodes: when several are verified, a file with more
//! than one link is read once and its hash remembered by inode. Each
//! manifest is checked with the digest it records ([`crate::digest`]):
//! version 2, which reads only a file's data, or plain BLAKE3 for one of
//! format 1.

use std::cmp::Ordering;
use std::collections::HashMap;

use anyhow::{Context, Result};

use crate::config::Job;
use crate::digest::Version;
use crate::error::Code;
use crate::fs::safefs::Shown;
use crate::store::manifest::{self, Kind, ManifestReader, Record, dfs_cmp};
use crate::store::reader::Walk;
use crate::store::{Snapshot, Store};
use crate::{info, store::lock, usage, warn};

/// What one snapshot's verification found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Findings {
    pub entries: u64,
    pub content: Vec<String>,
    pub metadata: Vec<String>,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    /// Files whose manifest has no hash (linked from a snapshot that had no
    /// manifest): their metadata is checked, not their bytes.
    pub unhashed: u64,
    pub bytes_read: u64,
}

impl Findings {
    pub fn mismatches(&self) -> usize {
        self.content.len() + self.metadata.len() + self.missing.len() + self.extra.len()
    }
}

/// Picks the snapshots `spec` names: `latest` (default), `all`, or one.
fn choose(snapshots: &[Snapshot], spec: Option<&str>, name: &str) -> Result<Vec<Snapshot>> {
    let complete: Vec<Snapshot> = snapshots.iter().filter(|s| s.complete).cloned().collect();
    match spec {
        Some("all") => Ok(complete),
        other => Ok(vec![crate::store::select::pick(snapshots, name, other)?]),
    }
}

/// Verifies `--snapshot` (default the latest); exit code 3 on any mismatch.
pub fn run(job: &Job, spec: Option<&str>) -> Result<Code> {
    let store = Store::open(&job.backups_folder, &job.name)?;
    let folder_shown = crate::store::shown(&job.backups_folder, &job.name);
    store.require_snapshots()?;
    let _lock = lock::acquire_readers(&store.meta_dir()?, "verify", &folder_shown)?;
    let chosen = choose(&store.snapshots()?, spec, &job.name)?;
    if chosen.is_empty() {
        return Err(usage!("there is no complete snapshot of {} to verify", job.name));
    }
    let manifests = manifest::folder(&store.meta_dir()?)?;
    let mut cache = InodeHashes::new();
    let (mut bad, mut skipped) = (0usize, 0usize);
    for snap in &chosen {
        let Some(reader) = ManifestReader::open(&manifests, manifest::file_name(&snap.folder).as_bytes())? else {
            warn!("{}: no manifest (taken before manifests, or its manifest was lost): not verified", snap.folder);
            skipped += 1;
            continue;
        };
        let f = verify_one(&store, snap, reader, &mut cache).with_context(|| format!("verifying {}", snap.folder))?;
        for (what, list) in [
            ("changed content", &f.content),
            ("changed metadata", &f.metadata),
            ("missing", &f.missing),
            ("extra", &f.extra),
        ] {
            for p in list {
                println!("{}: {what}: {p}", snap.folder);
            }
        }
        if f.mismatches() == 0 {
            info!("{}: ok ({} entries, {} read)", snap.folder, f.entries, crate::report::human_bytes(f.bytes_read));
        } else {
            bad += 1;
            let n = f.mismatches();
            warn!("{}: {n} mismatch{}", snap.folder, if n == 1 { "" } else { "es" });
        }
        if f.unhashed > 0 {
            info!(
                "{}: {} files have no recorded hash (linked from a snapshot without a manifest): metadata checked only",
                snap.folder, f.unhashed
            );
        }
    }
    if skipped == chosen.len() {
        warn!("nothing was verified");
    }
    Ok(if bad > 0 { Code::Mismatch } else { Code::Ok })
}

/// Hashes of files with several links, by (device, inode, digest version),
/// shared between the snapshots one `verify` reads.
pub type InodeHashes = HashMap<(u64, u64, Version), [u8; 32]>;

/// Compares one snapshot with its manifest.
pub fn verify_one(
    store: &Store,
    snap: &Snapshot,
    mut reader: ManifestReader,
    cache: &mut InodeHashes,
) -> Result<Findings> {
    let root = store.open_snapshot(snap)?;
    let digest = reader.digest();
    let mut f = Findings::default();
    let mut pending: Option<Record> = reader.next_record()?;
    for item in Walk::new(root) {
        let item = item?;
        // Manifest entries before this one are missing from the tree.
        while let Some(r) = pending.as_ref().filter(|r| dfs_cmp(&r.path, &item.rel) == Ordering::Less) {
            f.missing.push(shown(&r.path));
            pending = reader.next_record()?;
        }
        match pending.as_ref().filter(|r| r.path == item.rel) {
            None => f.extra.push(shown(&item.rel)),
            Some(want) => {
                f.entries += 1;
                let have = item.record()?;
                if have.kind != want.kind
                    || have.size != want.size && want.kind == Kind::File
                    || have.target != want.target
                {
                    f.content.push(shown(&item.rel));
                } else if (have.mode, have.uid, have.gid, have.mtime, have.mtime_nsec, have.xattrs, have.rdev)
                    != (want.mode, want.uid, want.gid, want.mtime, want.mtime_nsec, want.xattrs, want.rdev)
                {
                    f.metadata.push(shown(&item.rel));
                }
                if want.kind == Kind::File && have.kind == Kind::File {
                    match want.hash {
                        None => f.unhashed += 1,
                        Some(expected) => {
                            let key = (item.stat.st_dev, item.stat.st_ino, digest);
                            let hash = match cache.get(&key) {
                                Some(h) => *h,
                                None => {
                                    let d = item.digest(digest)?;
                                    f.bytes_read += d.bytes_read;
                                    if item.stat.st_nlink > 1 {
                                        cache.insert(key, d.hash);
                                    }
                                    d.hash
                                }
                            };
                            if hash != expected && !f.content.contains(&shown(&item.rel)) {
                                f.content.push(shown(&item.rel));
                            }
                        }
                    }
                }
                pending = reader.next_record()?;
            }
        }
    }
    while let Some(r) = pending {
        f.missing.push(shown(&r.path));
        pending = reader.next_record()?;
    }
    Ok(f)
}

fn shown(p: &[u8]) -> String {
    if p.is_empty() { ".".into() } else { format!("{:#}", Shown(p)) }
}
