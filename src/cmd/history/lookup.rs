//! Finding one path in one snapshot: in its manifest when it has one, else
//! with `lstat` in the snapshot folder.
//!
//! A manifest is a zstd stream in listing order, cut into frames with an
//! index of where each starts (docs/design.md, "Formats"): a lookup decodes
//! from the frame holding the path's place and stops at the first record at
//! or past it — one frame at most, one record in memory at a time (rule 10).
//! A manifest without an index (written before it) is streamed from the
//! start. The snapshots are independent, so several are read at once, one
//! thread each.
//!
//! The snapshot tree is only touched when the manifest is missing or
//! damaged, and then through directory handles (rule 3): `resolve` beneath
//! the snapshot's root refuses any symlink on the way, so a symlink in a
//! snapshot never leads the lookup out of it.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use anyhow::{Context, Result};

use super::change::{Seen, Sighting, Source};
use crate::fs::safefs::Dir;
use crate::store::manifest::{self, ManifestReader};
use crate::store::reader::Item;
use crate::store::{Snapshot, Store};
use crate::warn;

/// Most snapshots read at once: manifests are decompressed on the CPU, and
/// more threads than cores only take turns.
const MAX_THREADS: usize = 8;

/// The sightings of `path` in each of `snapshots`, in their order.
pub fn sightings(store: &Store, manifests: &Dir, snapshots: &[Snapshot], path: &[u8]) -> Result<Vec<Sighting>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .clamp(1, MAX_THREADS)
        .min(snapshots.len());
    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<Option<Result<Sighting>>>> = Mutex::new((0..snapshots.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, AtomicOrdering::Relaxed);
                    let Some(snap) = snapshots.get(i) else { break };
                    let one = in_snapshot(store, manifests, snap, path)
                        .with_context(|| format!("looking for the path in {}", snap.folder));
                    found.lock().expect("no thread panics holding it")[i] = Some(one);
                }
            });
        }
    });
    found.into_inner().expect("no thread panics holding it").into_iter().map(|r| r.expect("every index ran")).collect()
}

/// The path in one snapshot.
fn in_snapshot(store: &Store, manifests: &Dir, snap: &Snapshot, path: &[u8]) -> Result<Sighting> {
    let found = ManifestReader::open(manifests, manifest::file_name(&snap.folder).as_bytes())
        .and_then(|reader| reader.map(|r| in_manifest(r, path)).transpose());
    match found {
        Ok(Some(found)) => return Ok(found),
        Ok(None) => {}
        Err(e) => warn!("{}: its manifest can't be read to the path ({e:#}): looking in the folder", snap.folder),
    }
    in_tree(&store.open_snapshot(snap)?, path)
}

/// Streams the manifest up to the path's place in the listing order,
/// decoding only the record found ([`ManifestReader::find`]).
fn in_manifest(reader: ManifestReader, path: &[u8]) -> Result<Sighting> {
    let source = Source::Manifest(reader.digest());
    Ok(reader.find(path)?.map(|record| Seen { record, source, inode: None }))
}

/// `lstat` of the path in a snapshot folder, through its root's handle.
pub fn in_tree(root: &Dir, path: &[u8]) -> Result<Sighting> {
    let Some(item) = item(root, path)? else { return Ok(None) };
    let record = item.record().context("reading its metadata")?;
    let inode = Some((item.stat.st_dev, item.stat.st_ino));
    Ok(Some(Seen { record, source: Source::Tree, inode }))
}

/// The `(st_dev, st_ino)` of the path in a snapshot folder, if it is there.
pub fn inode(root: &Dir, path: &[u8]) -> Result<Option<(u64, u64)>> {
    Ok(item(root, path)?.map(|i| (i.stat.st_dev, i.stat.st_ino)))
}

/// The entry at `path` beneath `root`; `None` when a component is missing,
/// is not a directory, or is a symlink (the snapshot holds no such path).
fn item(root: &Dir, path: &[u8]) -> io::Result<Option<Item>> {
    if path.is_empty() {
        let stat = root.stat_self()?;
        return Ok(Some(Item { rel: Vec::new(), parent: root.clone(), name: Vec::new(), stat }));
    }
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(cut) => (&path[..cut], &path[cut + 1..]),
        None => (&b""[..], path),
    };
    let dir = if parent.is_empty() {
        root.clone()
    } else {
        match root.resolve_dir(parent) {
            Ok(d) => d,
            Err(e) if not_there(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    Ok(dir.try_stat(name)?.map(|stat| Item { rel: path.to_vec(), parent: dir, name: name.to_vec(), stat }))
}

/// Errors that mean "no such path in this snapshot": missing, not a
/// directory, or a symlink on the way (`ELOOP`, `EXDEV` from
/// `RESOLVE_NO_SYMLINKS`/`RESOLVE_BENEATH`).
fn not_there(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP | rustix::io::Errno::XDEV)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::{Kind, ManifestWriter, Record};

    fn rec(path: &[u8]) -> Record {
        Record {
            path: path.to_vec(),
            kind: Kind::File,
            size: 1,
            mtime: 2,
            mtime_nsec: 3,
            mode: 0o644,
            uid: 0,
            gid: 0,
            target: None,
            rdev: 0,
            xattrs: [0; 16],
            hash: Some([path.len() as u8; 32]),
        }
    }

    fn manifest(dir: &Dir, name: &str, paths: &[&[u8]]) -> ManifestReader {
        let mut w = ManifestWriter::create(dir, name).unwrap();
        for p in paths {
            w.push(rec(p), None).unwrap();
        }
        w.finish().unwrap().commit().unwrap();
        ManifestReader::open(dir, name.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn a_manifest_lookup_finds_the_path_and_stops_past_its_place() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let paths: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/c", b"a.txt", b"b"];
        let found = in_manifest(manifest(&dir, "s.1", &paths), b"a/c").unwrap().unwrap();
        assert_eq!(found.record.path, b"a/c");
        assert_eq!(found.source, Source::Manifest(crate::digest::Version::V2));
        assert!(in_manifest(manifest(&dir, "s.2", &paths), b"a/bb").unwrap().is_none());
        assert!(in_manifest(manifest(&dir, "s.3", &paths), b"c").unwrap().is_none());
        assert_eq!(in_manifest(manifest(&dir, "s.4", &paths), b"").unwrap().unwrap().record.path, b"");
    }

    #[test]
    fn a_tree_lookup_follows_no_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("snap");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"data").unwrap();
        std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/f"), b"out").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("l")).unwrap();
        let dir = Dir::open_path(&root).unwrap();
        let f = in_tree(&dir, b"d/f").unwrap().unwrap();
        assert_eq!((f.record.kind, f.record.size, f.source), (Kind::File, 4, Source::Tree));
        assert!(f.inode.is_some());
        assert!(in_tree(&dir, b"l/f").unwrap().is_none(), "a symlink on the way leads nowhere");
        assert_eq!(in_tree(&dir, b"l").unwrap().unwrap().record.kind, Kind::Symlink);
        assert!(in_tree(&dir, b"d/f/x").unwrap().is_none());
        assert!(in_tree(&dir, b"nope/f").unwrap().is_none());
        assert_eq!(in_tree(&dir, b"").unwrap().unwrap().record.kind, Kind::Dir);
    }
}
