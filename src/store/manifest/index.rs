//! The index at a manifest's end, so that looking one path up does not
//! decompress the whole manifest (docs/design.md, "Formats").
//!
//! The writer ends the zstd frame every [`FRAME_EVERY`] records and starts a
//! new one, which a decoder can start at; after the last frame it appends
//! a zstd *skippable* frame holding, for every frame but the first, where it
//! starts in the file, how many records come before it, and its first
//! path. Decoders skip such a frame, so a manifest reads the same record by
//! record with or without it (older manifests have none: they are read from
//! the start). The skippable frame ends with its own length and a magic, so
//! it is found from the file's end.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::dfs_cmp;

/// Records per zstd frame: a lookup decodes at most this many.
pub const FRAME_EVERY: u64 = 8192;
/// A zstd skippable frame's magic (any of 0x184D2A50..=0x184D2A5F).
const SKIPPABLE: u32 = 0x184D_2A5E;
/// The last bytes of a manifest that has an index.
const TRAILER: &[u8; 8] = b"rbkindex";
/// Largest index read: about 60 bytes a frame, so room for billions of records.
const INDEX_MAX: u32 = 64 << 20;

/// Where a frame starts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// Byte offset of the frame in the file.
    pub offset: u64,
    /// Records before it.
    pub entries: u64,
    /// Its first record's path.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
}

/// Appends the index of `marks` (nothing for a one-frame manifest).
pub fn write(out: &mut impl Write, marks: &[Mark]) -> io::Result<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let body = postcard::to_stdvec(marks).expect("marks always serialize");
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= INDEX_MAX)
        .ok_or_else(|| io::Error::other("index too large"))?;
    out.write_all(&SKIPPABLE.to_le_bytes())?;
    out.write_all(&(len + 12).to_le_bytes())?;
    out.write_all(&body)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(TRAILER)
}

/// The index of the manifest in `file`; `None` if it has none, or one
/// that doesn't hold together (the manifest is then read from the start).
pub fn read(file: &File) -> Option<Vec<Mark>> {
    let size = file.metadata().ok()?.len();
    let mut tail = [0u8; 12];
    file.read_exact_at(&mut tail, size.checked_sub(12)?).ok()?;
    if &tail[4..] != TRAILER {
        return None;
    }
    let len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
    if len > INDEX_MAX {
        return None;
    }
    let start = size.checked_sub(12 + u64::from(len) + 8)?;
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, start).ok()?;
    if head[..4] != SKIPPABLE.to_le_bytes() || head[4..] != (len + 12).to_le_bytes() {
        return None;
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, start + 8).ok()?;
    let marks: Vec<Mark> = postcard::from_bytes(&body).ok()?;
    let ordered = marks
        .windows(2)
        .all(|w| w[0].offset < w[1].offset && w[0].entries < w[1].entries && dfs_cmp(&w[0].path, &w[1].path).is_lt());
    (ordered && marks.last().is_none_or(|m| m.offset < start)).then_some(marks)
}

/// The frame to look `path` up from: the last whose first path is at or
/// before it; `None`: the first frame, from the file's start.
pub fn start_for<'a>(marks: &'a [Mark], path: &[u8]) -> Option<&'a Mark> {
    let after = marks.partition_point(|m| dfs_cmp(&m.path, path) != Ordering::Greater);
    after.checked_sub(1).map(|i| &marks[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(offset: u64, path: &[u8]) -> Mark {
        Mark { offset, entries: offset * 10, path: path.to_vec() }
    }

    #[test]
    fn a_lookup_starts_at_the_last_frame_at_or_before_the_path() {
        let marks = [mark(100, b"b"), mark(200, b"b/x"), mark(300, b"c")];
        assert_eq!(start_for(&marks, b"a"), None);
        assert_eq!(start_for(&marks, b"b").unwrap().offset, 100);
        assert_eq!(start_for(&marks, b"b/a"), Some(&marks[0]));
        assert_eq!(start_for(&marks, b"b/x/y").unwrap().offset, 200);
        assert_eq!(start_for(&marks, b"b-"), Some(&marks[1]), "b- sorts after b's children");
        assert_eq!(start_for(&marks, b"z").unwrap().offset, 300);
    }

    #[test]
    fn an_index_is_found_from_the_end_and_a_damaged_one_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m");
        let marks = vec![mark(10, b"a"), mark(20, b"b")];
        let mut bytes = vec![7u8; 30];
        write(&mut bytes, &marks).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&File::open(&path).unwrap()), Some(marks.clone()));
        // Out of order, pointing past its own start, cut: no index.
        for bad in [vec![mark(20, b"b"), mark(10, b"a")], vec![mark(10, b"a"), mark(40, b"b")]] {
            let mut bytes = vec![7u8; 30];
            write(&mut bytes, &bad).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(read(&File::open(&path).unwrap()), None);
        }
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(read(&File::open(&path).unwrap()), None);
        std::fs::write(&path, b"short").unwrap();
        assert_eq!(read(&File::open(&path).unwrap()), None);
    }
}
