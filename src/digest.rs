//! Content digests of regular files: what manifests record, what `verify`
//! checks, and what the source sends with a file's data (`FileEnd`) so the
//! sink can check what it rebuilt.
//!
//! Version 2 costs time in proportion to a file's data, never to its
//! apparent size (a 1 TB sparse `/var/log/lastlog` hashes in microseconds),
//! and does not depend on where the holes are: a hole and written zeros
//! hash alike, so a file verifies the same on any filesystem. The file is
//! cut into aligned blocks of [`BLOCK`] bytes; the digest is BLAKE3 in
//! derive-key mode ([`CONTEXT`]) over, for every block that holds a non-zero
//! byte, in order, its index (u64 LE) and its bytes (the last block is short
//! at EOF), then the file size (u64 LE). All-zero blocks add nothing. The
//! indices place the data, and the size ends the stream, so the encoding is
//! unambiguous: two contents differ exactly when their streams do.
//!
//! Version 1 was plain BLAKE3 of the whole content: manifests of format 1
//! hold it, and `verify` still checks those with it; nothing writes it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

/// Size of the aligned blocks the digest is made of.
pub const BLOCK: usize = 64 << 10;

/// The BLAKE3 derive-key context of version 2.
pub const CONTEXT: &str = "rbackup content digest v2";

/// Which digest a hash is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Plain BLAKE3 of the content (manifest format 1; read only).
    V1,
    /// Blocks with data, see the module doc.
    V2,
}

/// Computes a version 2 digest from data given in increasing offsets; gaps
/// between the pieces are zeros (holes), and cost nothing.
pub struct ContentHasher {
    hasher: blake3::Hasher,
    /// The block being filled; zeros beyond `fill`.
    buf: Box<[u8]>,
    /// Index of the block in `buf`.
    index: u64,
    /// Bytes of `buf` that may be non-zero.
    fill: usize,
    /// Where the next piece may start.
    next: u64,
    /// Bytes of block data fed to BLAKE3: what hashing cost.
    hashed: u64,
}

impl Default for ContentHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl ContentHasher {
    pub fn new() -> ContentHasher {
        ContentHasher {
            hasher: blake3::Hasher::new_derive_key(CONTEXT),
            buf: vec![0; BLOCK].into_boxed_slice(),
            index: 0,
            fill: 0,
            next: 0,
            hashed: 0,
        }
    }

    /// Adds `data`, which starts at file offset `offset`: at or after the end
    /// of the previous piece (callers check what a peer sends first).
    pub fn update_at(&mut self, offset: u64, mut data: &[u8]) {
        assert!(offset >= self.next, "content hashed out of order: {offset} after {}", self.next);
        let mut offset = offset;
        while !data.is_empty() {
            let index = offset / BLOCK as u64;
            let at = (offset % BLOCK as u64) as usize;
            if index != self.index {
                self.flush(BLOCK);
                self.index = index;
            }
            let n = data.len().min(BLOCK - at);
            if n == BLOCK {
                // A whole aligned block: hashed where it is, no copy.
                self.block(index, &data[..n]);
            } else {
                self.buf[at..at + n].copy_from_slice(&data[..n]);
                self.fill = at + n;
            }
            data = &data[n..];
            offset += n as u64;
        }
        self.next = offset;
    }

    /// Hashes the buffered block as `len` bytes long.
    fn flush(&mut self, len: usize) {
        if self.fill == 0 {
            return;
        }
        let fill = self.fill.min(len);
        if !is_zero(&self.buf[..fill]) {
            self.hasher.update(&self.index.to_le_bytes());
            self.hasher.update(&self.buf[..len]);
            self.hashed += len as u64;
        }
        self.buf[..self.fill].fill(0);
        self.fill = 0;
    }

    fn block(&mut self, index: u64, data: &[u8]) {
        if !is_zero(data) {
            self.hasher.update(&index.to_le_bytes());
            self.hasher.update(data);
            self.hashed += data.len() as u64;
        }
    }

    /// Adds bytes `start..end` of `file`, reading only its data extents (a
    /// hole costs nothing), after what was given before `start`. Returns the
    /// bytes read (fewer if the file is shorter than `end`).
    pub fn update_from_file(&mut self, file: &File, start: u64, end: u64) -> io::Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0;
        for extent in (DataExtents { file, size: end, offset: start }) {
            let (start, stop) = extent?;
            read += read_range(file, start, stop, &mut buf, |at, data| self.update_at(at, data))?;
        }
        Ok(read)
    }

    /// Bytes of data fed to BLAKE3 so far (the last block is fed by
    /// [`finish`](Self::finish)).
    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    /// The digest of a file of `size` bytes whose data was given (anything
    /// given at or beyond `size` is not part of it).
    pub fn finish(self, size: u64) -> [u8; 32] {
        self.finish_counted(size).0
    }

    /// [`finish`](Self::finish), and how many bytes of data were hashed.
    pub fn finish_counted(mut self, size: u64) -> ([u8; 32], u64) {
        let start = self.index * BLOCK as u64;
        if start < size {
            self.flush((size - start).min(BLOCK as u64) as usize);
        }
        self.hasher.update(&size.to_le_bytes());
        (*self.hasher.finalize().as_bytes(), self.hashed)
    }
}

fn is_zero(data: &[u8]) -> bool {
    let (chunks, rest) = data.as_chunks::<64>();
    chunks.iter().all(|c| *c == [0; 64]) && rest.iter().all(|&b| b == 0)
}

/// The version 2 digest of `data`, a whole file's content.
pub fn of_bytes(data: &[u8]) -> [u8; 32] {
    let mut h = ContentHasher::new();
    h.update_at(0, data);
    h.finish(data.len() as u64)
}

/// A file's digest, and how many bytes were read to compute it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub hash: [u8; 32],
    pub bytes_read: u64,
}

/// The digest of an open regular file, from its current size: version 2
/// reads only its data extents (`SEEK_DATA`/`SEEK_HOLE`), version 1 reads
/// every byte.
pub fn of_file(file: &File, version: Version) -> io::Result<FileDigest> {
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    match version {
        Version::V1 => {
            let mut hasher = blake3::Hasher::new();
            let read = read_range(file, 0, size, &mut buf, |_, data| {
                hasher.update(data);
            })?;
            Ok(FileDigest { hash: *hasher.finalize().as_bytes(), bytes_read: read })
        }
        Version::V2 => {
            let mut hasher = ContentHasher::new();
            let mut read = 0;
            for extent in DataExtents::new(file, size) {
                let (start, end) = extent?;
                read += read_range(file, start, end, &mut buf, |at, data| hasher.update_at(at, data))?;
            }
            Ok(FileDigest { hash: hasher.finish(size), bytes_read: read })
        }
    }
}

/// Reads `start..end` of `file` (less if it ends sooner) piece by piece;
/// returns how many bytes were read.
fn read_range(file: &File, start: u64, end: u64, buf: &mut [u8], mut each: impl FnMut(u64, &[u8])) -> io::Result<u64> {
    let mut pos = start;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = match file.read_at(&mut buf[..want], pos) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(pos, &buf[..n]);
        pos += n as u64;
    }
    Ok(pos - start)
}

/// The data extents of a file below `size`, as (start, end); a filesystem
/// without `SEEK_DATA` yields the whole file as one extent.
struct DataExtents<'a> {
    file: &'a File,
    size: u64,
    offset: u64,
}

impl<'a> DataExtents<'a> {
    fn new(file: &'a File, size: u64) -> DataExtents<'a> {
        DataExtents { file, size, offset: 0 }
    }
}

impl Iterator for DataExtents<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.size {
            return None;
        }
        let start = match rustix::fs::seek(self.file, SeekFrom::Data(self.offset)) {
            Ok(d) if d < self.size => d,
            // Only a hole remains.
            Ok(_) | Err(rustix::io::Errno::NXIO) => return None,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => self.offset,
            Err(e) => {
                self.offset = self.size;
                return Some(Err(e.into()));
            }
        };
        let end = rustix::fs::seek(self.file, SeekFrom::Hole(start)).map_or(self.size, |h| h.min(self.size));
        self.offset = end;
        Some(Ok((start, end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sparse_file(size: u64, pieces: &[(u64, &[u8])]) -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        for (at, data) in pieces {
            f.as_file().write_all_at(data, *at).unwrap();
        }
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    #[test]
    fn a_sparse_file_and_the_same_content_written_out_hash_alike() {
        let size = 5 * BLOCK as u64 + 123;
        let pieces: [(u64, &[u8]); 2] = [(70_000, b"middle"), (size - 3, b"end")];
        let (_keep, sparse) = sparse_file(size, &pieces);
        let mut whole = vec![0u8; size as usize];
        for (at, data) in pieces {
            whole[at as usize..at as usize + data.len()].copy_from_slice(data);
        }
        let mut written = tempfile::NamedTempFile::new().unwrap();
        written.write_all(&whole).unwrap();
        let written = File::open(written.path()).unwrap();
        let a = of_file(&sparse, Version::V2).unwrap();
        let b = of_file(&written, Version::V2).unwrap();
        assert_eq!(a.hash, b.hash);
        assert_eq!(a.hash, of_bytes(&whole));
        // Fed in odd pieces, with the zeros given as data or left as gaps.
        let mut h = ContentHasher::new();
        h.update_at(0, &whole[..1000]);
        h.update_at(69_999, &whole[69_999..70_010]);
        h.update_at(200_000, &whole[200_000..size as usize]);
        assert_eq!(h.finish(size), a.hash);
        // Version 1 is plain BLAKE3.
        assert_eq!(of_file(&sparse, Version::V1).unwrap().hash, *blake3::hash(&whole).as_bytes());
    }

    #[test]
    fn the_digest_tells_size_content_and_position_apart() {
        let data = noise(3 * BLOCK + 10);
        let base = of_bytes(&data);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(of_bytes(&longer), base, "a trailing zero byte changes the size");
        let mut flipped = data.clone();
        flipped[BLOCK + 5] ^= 1;
        assert_ne!(of_bytes(&flipped), base);
        // The same block of data at another index.
        let mut at0 = vec![0u8; 2 * BLOCK];
        at0[..BLOCK].copy_from_slice(&data[..BLOCK]);
        let mut at1 = vec![0u8; 2 * BLOCK];
        at1[BLOCK..].copy_from_slice(&data[..BLOCK]);
        assert_ne!(of_bytes(&at0), of_bytes(&at1));
        assert_ne!(of_bytes(&[]), of_bytes(&[0]));
        assert_ne!(of_bytes(&[0; 10]), of_bytes(&[0; 11]));
        assert_ne!(of_bytes(b"x"), *blake3::hash(b"x").as_bytes(), "v2 is not v1");
    }

    #[test]
    fn hashing_costs_the_data_not_the_holes() {
        let size = 16u64 << 30;
        let (_keep, file) = sparse_file(size, &[(8 << 30, &[1; 4096]), (size - 4096, &[2; 4096])]);
        let d = of_file(&file, Version::V2).unwrap();
        assert!(d.bytes_read <= 2 * BLOCK as u64, "read {} bytes", d.bytes_read);
        let mut h = ContentHasher::new();
        h.update_at(8 << 30, &[1; 4096]);
        h.update_at(size - 4096, &[2; 4096]);
        let (hash, hashed) = h.finish_counted(size);
        assert_eq!(hash, d.hash);
        assert_eq!(hashed, 2 * BLOCK as u64, "one block per piece of data");
        // A trailing hole of any size costs nothing.
        let (_, hashed) = ContentHasher::new().finish_counted(i64::MAX as u64);
        assert_eq!(hashed, 0);
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_u32;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }
}
