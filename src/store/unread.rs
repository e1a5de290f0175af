//! What a snapshot lacks: the paths its run could not read, that vanished
//! or that failed, kept in `NAME.rbackup/unread/FOLDER` (NUL-separated,
//! written when the snapshot is complete). A restore with `--delete` reads
//! it so that it never deletes, at the destination, what the snapshot never
//! had a chance to hold: the folders holding those paths are restored
//! without removing what they have beyond the snapshot.

use std::io::Read;

use anyhow::{Context, Result};

use super::Store;

const FOLDER: &[u8] = b"unread";
/// Most paths recorded; beyond, the record says "more" (`.`, a path no
/// entry can have) and a restore with `--delete` is refused.
const RECORDED_MAX: usize = 100_000;
const MORE: &[u8] = b".";

/// The paths a run found missing, as it goes.
#[derive(Default, Debug)]
pub struct Missing {
    paths: Vec<Vec<u8>>,
    more: bool,
}

impl Missing {
    pub fn add(&mut self, path: &[u8]) {
        if self.paths.len() < RECORDED_MAX {
            self.paths.push(path.to_vec());
        } else {
            self.more = true;
        }
    }
}

/// What a snapshot's record says.
#[derive(Debug, PartialEq, Eq)]
pub enum Unread {
    /// These paths (none: the snapshot lacks nothing the run knew of).
    Paths(Vec<Vec<u8>>),
    /// More than could be recorded.
    TooMany,
}
/// Most bytes read back (the desktop wrote it; a bound all the same).
const READ_MAX: u64 = 64 << 20;

/// Records `paths` as missing from the complete snapshot `folder`.
pub fn write(store: &Store, folder: &str, missing: &Missing) -> Result<()> {
    if missing.paths.is_empty() {
        return Ok(());
    }
    let meta = store.meta_dir()?;
    let dir = match meta.try_open_dir(FOLDER)? {
        Some(d) => d,
        None => meta.create_dir(FOLDER)?,
    };
    let text = if missing.more { MORE.to_vec() } else { missing.paths.join(&0u8) };
    crate::fs::writer::replace_file(&dir, folder.as_bytes(), &text, 0o600)
        .with_context(|| format!("recording what {folder} lacks"))
}

/// The paths recorded as missing from snapshot `folder` (none recorded:
/// empty, as for snapshots taken before this record existed).
pub fn read(store: &Store, folder: &str) -> Result<Unread> {
    let Some(dir) = store.meta_dir()?.try_open_dir(FOLDER)? else { return Ok(Unread::Paths(Vec::new())) };
    let file = match dir.open_file(folder.as_bytes()) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Unread::Paths(Vec::new())),
        Err(e) => return Err(e).with_context(|| format!("reading what {folder} lacks")),
    };
    let mut text = Vec::new();
    file.take(READ_MAX).read_to_end(&mut text)?;
    if text == MORE {
        return Ok(Unread::TooMany);
    }
    Ok(Unread::Paths(text.split(|&b| b == 0).filter(|p| !p.is_empty()).map(<[u8]>::to_vec).collect()))
}

/// Forgets the record of a deleted snapshot (best effort: bookkeeping).
pub fn remove(store: &Store, folder: &str) {
    if let Ok(meta) = store.meta_dir()
        && let Ok(Some(dir)) = meta.try_open_dir(FOLDER)
    {
        let _ = dir.unlink(folder.as_bytes());
    }
}

/// The folders a restore with `--delete` must not clean up: each missing
/// path's parent, and the path itself (it may be a folder that could not be
/// listed). Sorted, without duplicates.
pub fn kept_folders(paths: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in paths {
        let parent = p.iter().rposition(|&b| b == b'/').map_or(&p[..0], |i| &p[..i]);
        out.push(parent.to_vec());
        out.push(p.clone());
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_folders_are_each_paths_parent_and_itself() {
        let k = kept_folders(&[b"a/b/c".to_vec(), b"top".to_vec(), b"a/b/d".to_vec()]);
        assert_eq!(k, vec![b"".to_vec(), b"a/b".to_vec(), b"a/b/c".to_vec(), b"a/b/d".to_vec(), b"top".to_vec()]);
    }

    #[test]
    fn a_record_is_written_read_back_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(tmp.path(), "s").unwrap();
        let none = Unread::Paths(Vec::new());
        let mut missing = Missing::default();
        missing.add(b"d/caf\xe9.txt");
        missing.add(b"shared");
        write(&store, "s.01-01-20_00-00-00", &missing).unwrap();
        let paths = vec![b"d/caf\xe9.txt".to_vec(), b"shared".to_vec()];
        assert_eq!(read(&store, "s.01-01-20_00-00-00").unwrap(), Unread::Paths(paths));
        assert_eq!(read(&store, "s.02-01-20_00-00-00").unwrap(), none);
        remove(&store, "s.01-01-20_00-00-00");
        assert_eq!(read(&store, "s.01-01-20_00-00-00").unwrap(), none);
        // Beyond what is recorded: said so.
        let mut many = Missing::default();
        for i in 0..=RECORDED_MAX {
            many.add(format!("f{i}").as_bytes());
        }
        write(&store, "s.03-01-20_00-00-00", &many).unwrap();
        assert_eq!(read(&store, "s.03-01-20_00-00-00").unwrap(), Unread::TooMany);
    }
}
