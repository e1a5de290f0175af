//! Manifests: for every entry of a snapshot, its path, type, size, mtime,
//! mode, owner, symlink target, a digest of its xattrs and ACLs, and the
//! content digest of a regular file — written while the snapshot is, beside
//! it (`NAME.rbackup/manifests/STAMP`), never inside.
//!
//! Format: one zstd stream of length-prefixed postcard records: a header
//! (magic, format version, snapshot name), the entries in the listing's order
//! (depth first, names sorted bytewise — see [`dfs_cmp`]), and a footer with
//! the entry count. A manifest without its footer is incomplete; one is only
//! named after its snapshot once the snapshot is complete. The stream is cut
//! into zstd frames of [`index::FRAME_EVERY`] records, and an index of where
//! each frame starts follows them in a skippable frame ([`index`]), so that
//! one path is found without decompressing the whole manifest.
//!
//! Entries arrive in listing order but a fetched file's hash only when its
//! data has been written: the writer holds records back until every one
//! before them is known, so the file stays sorted and memory stays bounded by
//! the sink's fetch window.
//!
//! Format 2 records content digests of version 2 ([`crate::digest`]); format
//! 1, plain BLAKE3 of the content. Both are read ([`ManifestReader::digest`]
//! says which a manifest holds); only format 2 is written.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::digest::Version;
use crate::fs::meta::Xattr;
use crate::fs::safefs::Dir;

mod index;
mod write;
pub use write::{FinishedManifest, ManifestWriter, partials};

/// Format version written in every manifest's header: 2, its content
/// digests are version 2.
pub const FORMAT: u32 = 2;
const MAGIC: &str = "rbackup-manifest";
/// Largest record accepted when reading.
const RECORD_MAX: usize = 8 << 20;
/// Records between two flushes of the zstd stream.
const FLUSH_EVERY: u64 = 4096;
/// Longest time records stay in the zstd stream's buffer: what a `kill -9`
/// may cost a resumed run (files it must hash again, see `sink::record`).
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Infix of the manifests of runs still going (or interrupted).
pub const PARTIAL: &str = ".partial-";

/// The type of an entry.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
}

/// One entry of a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Relative to the snapshot's root; empty for the root itself.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: Kind,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(with = "serde_bytes")]
    pub target: Option<Vec<u8>>,
    pub rdev: u64,
    /// BLAKE3 of the xattrs (ACLs included), or all zeros for none.
    pub xattrs: [u8; 16],
    /// A regular file's content digest, of the manifest's version.
    pub hash: Option<[u8; 32]>,
}

#[derive(Serialize, Deserialize, Debug)]
enum Item {
    Header { magic: String, format: u32, snapshot: String },
    Entry(Record),
    Footer { entries: u64 },
}

/// A digest of a sorted xattr list (zeros when there are none).
pub fn xattr_digest(xattrs: &[Xattr]) -> [u8; 16] {
    if xattrs.is_empty() {
        return [0; 16];
    }
    let mut h = blake3::Hasher::new();
    for x in xattrs {
        h.update(&(x.name.len() as u64).to_le_bytes());
        h.update(&x.name);
        h.update(&(x.value.len() as u64).to_le_bytes());
        h.update(&x.value);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The listing's order: depth first, children right after their directory,
/// siblings sorted bytewise — component-wise comparison of the paths.
pub fn dfs_cmp(a: &[u8], b: &[u8]) -> Ordering {
    fn components(p: &[u8]) -> impl Iterator<Item = &[u8]> {
        p.split(|&c| c == b'/').filter(|c| !c.is_empty())
    }
    components(a).cmp(components(b))
}

/// The name of a snapshot's manifest in the manifests folder.
pub fn file_name(snapshot_folder: &str) -> String {
    snapshot_folder.trim_end_matches(".incomplete").to_string()
}

/// Opens (creating) `NAME.rbackup/manifests`.
pub fn folder(meta_dir: &Dir) -> io::Result<Dir> {
    match meta_dir.try_open_dir(b"manifests")? {
        Some(d) => Ok(d),
        None => meta_dir.create_dir(b"manifests"),
    }
}

/// Reads a manifest, entry by entry.
pub struct ManifestReader {
    input: zstd::stream::read::Decoder<'static, BufReader<File>>,
    pub snapshot: String,
    digest: Version,
    seen: u64,
    done: bool,
}

impl ManifestReader {
    /// Opens the manifest named `name` in `dir` (`None` if there is none).
    pub fn open(dir: &Dir, name: &[u8]) -> Result<Option<ManifestReader>> {
        let file = match dir.open_file(name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("opening a manifest"),
        };
        let mut input = zstd::stream::read::Decoder::new(file)?;
        input.window_log_max(27)?;
        match read_item(&mut input)? {
            Some(Item::Header { magic, format, snapshot }) if magic == MAGIC => {
                let digest = match format {
                    1 => Version::V1,
                    2 => Version::V2,
                    _ => {
                        bail!("manifest format {format} is not one this rbackup reads (1 to {FORMAT}): upgrade rbackup")
                    }
                };
                Ok(Some(ManifestReader { input, snapshot, digest, seen: 0, done: false }))
            }
            _ => bail!("not an rbackup manifest"),
        }
    }

    /// Which digest the content hashes of this manifest are.
    pub fn digest(&self) -> Version {
        self.digest
    }

    /// The next entry; `Ok(None)` after the footer. A manifest cut short
    /// (an interrupted run's) ends with an error.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        if self.done {
            return Ok(None);
        }
        match read_item(&mut self.input)? {
            Some(Item::Entry(r)) => {
                self.seen += 1;
                Ok(Some(r))
            }
            Some(Item::Footer { entries }) => {
                self.done = true;
                if entries != self.seen {
                    bail!("manifest footer says {entries} entries, {} were read", self.seen);
                }
                Ok(None)
            }
            Some(Item::Header { .. }) => bail!("a second header in a manifest"),
            None => bail!("the manifest ends without its footer (an interrupted run's)"),
        }
    }
}

impl ManifestReader {
    /// The record of `path`, or `None` once past its place in the listing
    /// order (or at the end); uses the reader up. The records before it are
    /// not decoded: their path is read straight from the encoding (an enum
    /// variant, then a length-prefixed byte string: postcard's stable wire
    /// format), so a lookup costs little more than the decompression.
    ///
    /// With the manifest's index ([`index`]), decoding starts at the frame
    /// holding the path's place, so a lookup reads at most one frame of
    /// records whatever the manifest's size.
    pub fn find(mut self, path: &[u8]) -> Result<Option<Record>> {
        if self.seen == 0
            && let Some(mark) =
                index::read(self.input.get_ref().get_ref()).and_then(|m| index::start_for(&m, path).cloned())
        {
            // The clone shares the file's offset: put it back if the index
            // is not to be trusted, for the read from the start below.
            let mut file = self.input.get_ref().get_ref().try_clone()?;
            let back = file.stream_position()?;
            file.seek(io::SeekFrom::Start(mark.offset))?;
            let mut input = zstd::stream::read::Decoder::new(file)?;
            input.window_log_max(27)?;
            let mut input = BufReader::with_capacity(1 << 16, input);
            // The frame must start with the record its mark names: a
            // damaged index is not a path absent from the snapshot.
            let first = first_record(&mut input).unwrap_or_default();
            if first.get(4..).and_then(entry_path) == Some(&mark.path[..]) {
                let mut seen = mark.entries;
                return scan(io::Cursor::new(first).chain(input), &mut seen, path)
                    .with_context(|| format!("reading from the frame its index names at byte {}", mark.offset));
            }
            crate::debug!("a manifest's index doesn't match its frames: read from the start");
            self.input.get_mut().get_mut().seek(io::SeekFrom::Start(back))?;
        }
        // Records are small: read them out of a buffer, not one zstd call each.
        let input = BufReader::with_capacity(1 << 16, &mut self.input);
        scan(input, &mut self.seen, path)
    }
}

/// The next record as written (its length, then its encoding), undecoded.
fn first_record(input: &mut impl Read) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    if crate::wire::frame::read_full(input, &mut len)? != 4 {
        bail!("no record");
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > RECORD_MAX {
        bail!("manifest record of {n} bytes is too large");
    }
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    if crate::wire::frame::read_full(input, &mut buf[4..])? != n {
        bail!("manifest cut in the middle of a record");
    }
    Ok(buf)
}

/// Reads records up to `path`'s place; `seen` counts the records before.
fn scan(mut input: impl Read, seen: &mut u64, path: &[u8]) -> Result<Option<Record>> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if crate::wire::frame::read_full(&mut input, &mut len)? != 4 {
            bail!("the manifest ends without its footer (an interrupted run's)");
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > RECORD_MAX {
            bail!("manifest record of {len} bytes is too large");
        }
        buf.resize(len, 0);
        if crate::wire::frame::read_full(&mut input, &mut buf)? != len {
            bail!("manifest cut in the middle of a record");
        }
        let order = entry_path(&buf).map(|p| dfs_cmp(p, path));
        if order == Some(Ordering::Less) {
            *seen += 1;
            continue;
        }
        return match postcard::from_bytes(&buf).context("undecodable manifest record")? {
            Item::Entry(r) if r.path == path => Ok(Some(r)),
            Item::Entry(r) if dfs_cmp(&r.path, path) == Ordering::Less => bail!("a manifest record misread"),
            Item::Entry(_) => Ok(None),
            Item::Footer { entries } if entries == *seen => Ok(None),
            Item::Footer { entries } => bail!("manifest footer says {entries} entries, {seen} were read"),
            Item::Header { .. } => bail!("a second header in a manifest"),
        };
    }
}

/// The path of an encoded `Item::Entry` (variant 1, then the path's varint
/// length and bytes), without decoding the rest; `None` for anything else.
fn entry_path(buf: &[u8]) -> Option<&[u8]> {
    let (&variant, rest) = buf.split_first()?;
    if variant != 1 {
        return None;
    }
    let (mut len, mut shift) = (0usize, 0);
    for (i, &b) in rest.iter().enumerate().take(10) {
        len |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return rest.get(i + 1..i + 1 + len);
        }
        shift += 7;
    }
    None
}

fn read_item(input: &mut impl Read) -> Result<Option<Item>> {
    let mut len = [0u8; 4];
    match crate::wire::frame::read_full(input, &mut len)? {
        0 => return Ok(None),
        4 => {}
        _ => bail!("manifest cut in the middle of a record"),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > RECORD_MAX {
        bail!("manifest record of {len} bytes is too large");
    }
    let mut buf = vec![0u8; len];
    if crate::wire::frame::read_full(input, &mut buf)? != len {
        bail!("manifest cut in the middle of a record");
    }
    Ok(Some(postcard::from_bytes(&buf).context("undecodable manifest record")?))
}

/// Looks entries up in a manifest, in listing order: each lookup moves
/// forward, so a whole snapshot costs one pass over its manifest.
pub struct Cursor {
    reader: Option<ManifestReader>,
    current: Option<Record>,
    digest: Version,
}

impl Cursor {
    pub fn new(reader: Option<ManifestReader>) -> Cursor {
        let digest = reader.as_ref().map_or(Version::V2, ManifestReader::digest);
        Cursor { reader, current: None, digest }
    }

    /// Which digest the hashes found are.
    pub fn digest(&self) -> Version {
        self.digest
    }

    /// The record of `path`, if the manifest has it. Paths must be asked
    /// for in listing order.
    pub fn find(&mut self, path: &[u8]) -> Option<&Record> {
        loop {
            if let Some(r) = &self.current {
                match dfs_cmp(&r.path, path) {
                    Ordering::Less => {}
                    Ordering::Equal => return self.current.as_ref(),
                    Ordering::Greater => return None,
                }
            }
            let reader = self.reader.as_mut()?;
            match reader.next_record() {
                Ok(Some(r)) => self.current = Some(r),
                // The end, or a damaged/partial manifest: nothing more to find.
                Ok(None) | Err(_) => {
                    self.reader = None;
                    self.current = None;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dfs_order_puts_children_before_the_next_sibling() {
        let mut v: Vec<&[u8]> = vec![b"a.b", b"a/z", b"a", b"", b"a/b/c", b"b", b"a-"];
        v.sort_by(|a, b| dfs_cmp(a, b));
        assert_eq!(v, vec![&b""[..], b"a", b"a/b/c", b"a/z", b"a-", b"a.b", b"b"]);
    }

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
            hash: None,
        }
    }

    #[test]
    fn records_wait_for_their_hash_and_stay_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let mut w = ManifestWriter::create(&dir, "s.01-01-26_00-00-00.incomplete").unwrap();
        w.push(rec(b""), None).unwrap();
        w.push(rec(b"a"), Some(7)).unwrap();
        w.push(rec(b"b"), None).unwrap();
        w.push(rec(b"c"), Some(8)).unwrap();
        w.push(rec(b"d"), Some(9)).unwrap();
        w.resolve(8, [8; 32], 1).unwrap();
        w.drop_entry(9, b"d").unwrap();
        w.resolve(7, [7; 32], 5).unwrap();
        w.finish().unwrap().commit().unwrap();
        let mut r = ManifestReader::open(&dir, b"s.01-01-26_00-00-00").unwrap().unwrap();
        assert_eq!(r.snapshot, "s.01-01-26_00-00-00.incomplete");
        let mut got = Vec::new();
        while let Some(x) = r.next_record().unwrap() {
            got.push((x.path, x.hash));
        }
        assert_eq!(
            got,
            vec![
                (b"".to_vec(), None),
                (b"a".to_vec(), Some([7; 32])),
                (b"b".to_vec(), None),
                (b"c".to_vec(), Some([8; 32]))
            ]
        );
        let mut r = ManifestReader::open(&dir, b"s.01-01-26_00-00-00").unwrap().unwrap();
        r.next_record().unwrap();
        assert_eq!(r.next_record().unwrap().unwrap().size, 5, "the size written is recorded");
        let mut c = Cursor::new(ManifestReader::open(&dir, b"s.01-01-26_00-00-00").unwrap());
        assert!(c.find(b"a").is_some());
        assert!(c.find(b"a/x").is_none());
        assert_eq!(c.find(b"c").unwrap().hash, Some([8; 32]));
        assert!(c.find(b"d").is_none());
    }

    #[test]
    fn find_reads_the_paths_it_skips_as_decoding_would() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let mut w = ManifestWriter::create(&dir, "s").unwrap();
        // Paths long enough for a two-byte length, and names that are not UTF-8.
        let long = [b'x'; 300];
        let paths: Vec<Vec<u8>> =
            vec![b"".to_vec(), b"a".to_vec(), [b"a/".as_slice(), &long].concat(), b"a/\xff".to_vec(), b"b".to_vec()];
        for p in &paths {
            w.push(Record { target: Some(b"t".to_vec()), ..rec(p) }, None).unwrap();
        }
        w.finish().unwrap().commit().unwrap();
        let find = |p: &[u8]| ManifestReader::open(&dir, b"s").unwrap().unwrap().find(p).unwrap();
        for p in &paths {
            assert_eq!(find(p).map(|r| r.path), Some(p.clone()));
        }
        for absent in [&b"a/0"[..], b"a/\xfe", b"aa", b"c"] {
            assert_eq!(find(absent), None);
        }
        assert_eq!(entry_path(&postcard::to_stdvec(&Item::Entry(rec(&long))).unwrap()), Some(&long[..]));
    }

    /// A manifest of many frames reads the same record by record, and a
    /// lookup starts at its frame: it finds paths past a frame it could
    /// not have decoded.
    #[test]
    fn lookups_start_at_the_frame_the_index_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let mut w = ManifestWriter::create(&dir, "s").unwrap();
        let n = index::FRAME_EVERY * 3 + 5;
        let path = |i: u64| format!("d{:02}/f{i:08}", i / 1000).into_bytes();
        w.push(Record { kind: Kind::Dir, ..rec(b"") }, None).unwrap();
        let mut dirs = 0;
        for i in 0..n {
            if i % 1000 == 0 {
                w.push(Record { kind: Kind::Dir, ..rec(format!("d{:02}", i / 1000).as_bytes()) }, None).unwrap();
                dirs += 1;
            }
            w.push(Record { hash: Some([(i % 251) as u8; 32]), ..rec(&path(i)) }, None).unwrap();
        }
        w.finish().unwrap().commit().unwrap();
        let mut r = ManifestReader::open(&dir, b"s").unwrap().unwrap();
        let mut count = 0;
        while r.next_record().unwrap().is_some() {
            count += 1;
        }
        assert_eq!(count, 1 + dirs + n);
        let file = std::fs::File::open(tmp.path().join("s")).unwrap();
        let marks = index::read(&file).expect("an index");
        assert_eq!(marks.len(), 3);
        let find = |p: &[u8]| ManifestReader::open(&dir, b"s").unwrap().unwrap().find(p).unwrap();
        for i in (0..n).step_by(997).chain([n - 1, index::FRAME_EVERY * 2]) {
            assert_eq!(find(&path(i)).map(|r| r.hash), Some(Some([(i % 251) as u8; 32])), "{i}");
        }
        for absent in [&b"d00/f"[..], b"d05/x", b"d99", b"e"] {
            assert_eq!(find(absent), None);
        }
        // Damage the end of the first frame: reading it fails, but a path in
        // the last frame is still found, from its own frame.
        let mut bytes = std::fs::read(tmp.path().join("s")).unwrap();
        let at = usize::try_from(marks[0].offset).unwrap() - 40;
        for b in &mut bytes[at..at + 30] {
            *b ^= 0x5a;
        }
        std::fs::write(tmp.path().join("s"), &bytes).unwrap();
        let mut r = ManifestReader::open(&dir, b"s").unwrap().unwrap();
        let whole = std::iter::from_fn(|| r.next_record().transpose()).collect::<Result<Vec<_>>>();
        assert!(whole.is_err(), "the damage is where it should be");
        assert!(find(&path(n - 1)).is_some());
    }

    /// An index whose mark doesn't name its frame's first record (damaged,
    /// or written wrong) is not trusted: the lookup reads from the start,
    /// rather than call a path that is there absent.
    #[test]
    fn a_mark_that_does_not_name_its_frame_is_not_trusted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let mut w = ManifestWriter::create(&dir, "s").unwrap();
        for i in 0..index::FRAME_EVERY * 2 + 5 {
            w.push(Record { hash: Some([1; 32]), ..rec(format!("f{i:08}").as_bytes()) }, None).unwrap();
        }
        w.finish().unwrap().commit().unwrap();
        let file = tmp.path().join("s");
        let mut marks = index::read(&std::fs::File::open(&file).unwrap()).expect("an index");
        let mut r = ManifestReader::open(&dir, b"s").unwrap().unwrap();
        let paths: Vec<Vec<u8>> = std::iter::from_fn(|| r.next_record().unwrap()).map(|r| r.path).collect();
        let at = paths.iter().position(|p| *p == marks[1].path).unwrap();
        let find = |p: &[u8]| ManifestReader::open(&dir, b"s").unwrap().unwrap().find(p).unwrap();
        assert!(find(&paths[at - 3]).is_some());
        // The second mark names a path five records before its frame.
        marks[1].path.clone_from(&paths[at - 5]);
        let mut bytes = std::fs::read(&file).unwrap();
        let len = u32::from_le_bytes(bytes[bytes.len() - 12..bytes.len() - 8].try_into().unwrap()) as usize;
        bytes.truncate(bytes.len() - 12 - len - 8);
        index::write(&mut bytes, &marks).unwrap();
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(index::read(&std::fs::File::open(&file).unwrap()).unwrap()[1].path, paths[at - 5]);
        assert_eq!(find(&paths[at - 3]).map(|r| r.path), Some(paths[at - 3].clone()));
        assert_eq!(find(&paths[at + 2]).map(|r| r.path), Some(paths[at + 2].clone()));
        assert_eq!(find(b"f0000000x"), None);
    }

    #[test]
    fn format_1_manifests_are_read_as_holding_version_1_digests() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        for (format, digest) in [(1, Version::V1), (FORMAT, Version::V2)] {
            let name = format!("s.0{format}-01-26_00-00-00");
            let mut w = ManifestWriter::create_format(&dir, &name, format).unwrap();
            w.push(Record { hash: Some([1; 32]), ..rec(b"a") }, None).unwrap();
            w.finish().unwrap().commit().unwrap();
            let mut r = ManifestReader::open(&dir, name.as_bytes()).unwrap().unwrap();
            assert_eq!(r.digest(), digest);
            assert_eq!(r.next_record().unwrap().unwrap().hash, Some([1; 32]));
            let c = Cursor::new(ManifestReader::open(&dir, name.as_bytes()).unwrap());
            assert_eq!(c.digest(), digest);
        }
        let w = ManifestWriter::create_format(&dir, "s.09-01-26_00-00-00", 9).unwrap();
        w.finish().unwrap().commit().unwrap();
        let err = ManifestReader::open(&dir, b"s.09-01-26_00-00-00").err().unwrap().to_string();
        assert!(err.contains("format 9"), "{err}");
    }

    #[test]
    fn a_manifest_without_its_footer_is_incomplete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let mut w = ManifestWriter::create(&dir, "s").unwrap();
        w.push(rec(b"a"), None).unwrap();
        // Dropped without finish: the zstd stream is cut.
        drop(w);
        let partial = format!("s{PARTIAL}{}", std::process::id());
        let complete = match ManifestReader::open(&dir, partial.as_bytes()) {
            Err(_) => false,
            Ok(r) => {
                let mut r = r.unwrap();
                loop {
                    match r.next_record() {
                        Ok(Some(_)) => {}
                        Ok(None) => break true,
                        Err(_) => break false,
                    }
                }
            }
        };
        assert!(!complete);
    }
}
