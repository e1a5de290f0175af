//! Serving fetches, in request order: a file's data extents (holes are not
//! sent), or a delta against the signature the sink sent, from the offset a
//! resumed fetch asks for; each with the content digest of the whole file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;

use anyhow::Result;
use rustix::fs::{FileType, OFlags, SeekFrom};

use crate::digest::ContentHasher;
use crate::fs::safefs::{Dir, file_type, libc_errno};
use crate::wire::Outbox;
use crate::wire::frame::{CHUNK, Encoder};
use crate::wire::msg::{Fetch, ReadError, ReadStatus, SourceMsg};

use super::DELTA_WINDOW;

pub(super) fn serve_fetches(root: &Dir, fetches: &Receiver<Fetch>, out: &Outbox, compress: bool) {
    let mut enc = Encoder::new(compress);
    let mut buf = vec![0u8; DELTA_WINDOW];
    let mut batch = Batch { out, frames: Vec::new() };
    loop {
        // Send the gathered frames whenever no request is waiting: the sink
        // may be waiting for them.
        let fetch = match fetches.try_recv() {
            Ok(f) => f,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if batch.flush().is_err() {
                    return;
                }
                match fetches.recv() {
                    Ok(f) => f,
                    Err(_) => return,
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        };
        match serve_one(root, &fetch, &mut batch, &mut enc, &mut buf) {
            Ok(()) => {}
            Err(Served::Stopped) => return,
            Err(Served::Failed(error)) => {
                if batch.send(enc.msg(&SourceMsg::FileFailed { id: fetch.id, error })).is_err() {
                    return;
                }
            }
        }
    }
    let _ = batch.flush();
}

/// Frames gathered into few large writes: a small file is three small frames
/// (begin, data, end), and a write per frame costs the writer, SSH and the
/// sink a wake-up each.
pub(super) struct Batch<'a> {
    out: &'a Outbox,
    frames: Vec<u8>,
}

/// Size at which gathered frames are sent, and above which a frame goes alone.
pub(super) const BATCH_SEND: usize = 128 << 10;

impl Batch<'_> {
    fn send(&mut self, frame: Vec<u8>) -> Result<(), Served> {
        if frame.len() >= BATCH_SEND {
            self.flush()?;
            return self.out.send(frame).map_err(|_| Served::Stopped);
        }
        self.frames.extend_from_slice(&frame);
        if self.frames.len() >= BATCH_SEND {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Served> {
        if self.frames.is_empty() {
            return Ok(());
        }
        let frames = std::mem::replace(&mut self.frames, Vec::with_capacity(2 * BATCH_SEND));
        self.out.send(frames).map_err(|_| Served::Stopped)
    }
}

pub(super) enum Served {
    /// The session is over.
    Stopped,
    /// This file could not be sent; the session goes on.
    Failed(ReadError),
}

pub(super) fn read_error(e: &io::Error) -> ReadError {
    match e.raw_os_error() {
        Some(libc_errno::ENOENT | libc_errno::ENOTDIR) => ReadError::Vanished,
        Some(libc_errno::EACCES | libc_errno::EPERM) => ReadError::Unreadable(e.to_string()),
        Some(libc_errno::ELOOP | libc_errno::EXDEV) => {
            ReadError::Other("its path now goes through a symlink; not followed".into())
        }
        _ => ReadError::Other(e.to_string()),
    }
}

pub(super) fn serve_one(
    root: &Dir,
    fetch: &Fetch,
    out: &mut Batch,
    enc: &mut Encoder,
    buf: &mut [u8],
) -> Result<(), Served> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
    let fd = root.resolve(&fetch.path, flags).map_err(|e| Served::Failed(read_error(&e)))?;
    let file = File::from(fd);
    let before = rustix::fs::fstat(&file).map_err(|e| Served::Failed(read_error(&e.into())))?;
    if file_type(&before) != FileType::RegularFile {
        return Err(Served::Failed(ReadError::Other("no longer a regular file".into())));
    }
    let size = before.st_size as u64;
    // A resumed fetch starts where the sink's data ends, unless the file is
    // now shorter than that: then it is sent whole.
    let from = if fetch.offset <= size { fetch.offset } else { 0 };
    let begin = if from > 0 {
        SourceMsg::FileResume { id: fetch.id, size, offset: from }
    } else {
        SourceMsg::FileBegin { id: fetch.id, size }
    };
    out.send(enc.msg(&begin))?;

    // The digest of the whole file, for the sink to check what it rebuilt
    // or kept: the prefix it already has is read here, not sent.
    let mut hasher = ContentHasher::new();
    let mut done = 0;
    while done < from {
        let to = (done + PREFIX_STEP).min(from);
        hasher.update_from_file(&file, done, to).map_err(|e| Served::Failed(read_error(&e)))?;
        done = to;
        if done < from {
            // Nothing moves on the wire meanwhile: say that this is work.
            out.send(enc.msg(&SourceMsg::Hashing { id: fetch.id, done }))?;
            out.flush()?;
        }
    }
    let read = match &fetch.signature {
        Some(sig) => send_delta(&file, from..size, sig, enc, out, buf, &mut hasher)?,
        None => send_whole(&file, size, from, (before.st_blocks as u64) * 512 < size, enc, out, &mut hasher)?,
    };
    let hash = Some(hasher.finish(size));
    let after = rustix::fs::fstat(&file).map_err(|e| Served::Failed(read_error(&e.into())))?;
    let mut probe = [0u8; 1];
    let grew = file.read_at(&mut probe, size).is_ok_and(|n| n > 0);
    let changed = read != size
        || grew
        || after.st_size != before.st_size
        || after.st_mtime != before.st_mtime
        || after.st_mtime_nsec != before.st_mtime_nsec;
    let status = if changed { ReadStatus::Changed } else { ReadStatus::Complete };
    out.send(enc.msg(&SourceMsg::FileEnd { id: fetch.id, status, hash }))
}

/// Bytes of a resumed fetch's prefix hashed between two signs of life.
pub(super) const PREFIX_STEP: u64 = 64 << 20;

/// Sends the file's data extents from `from` on; returns how many bytes of
/// it could be read before EOF (less than `size` if it shrank).
pub(super) fn send_whole(
    file: &File,
    size: u64,
    from: u64,
    sparse: bool,
    enc: &mut Encoder,
    out: &mut Batch,
    hasher: &mut ContentHasher,
) -> Result<u64, Served> {
    let mut offset = from;
    while offset < size {
        let (start, end) = if sparse {
            match rustix::fs::seek(file, SeekFrom::Data(offset)) {
                Ok(d) if d < size => (d, rustix::fs::seek(file, SeekFrom::Hole(d)).unwrap_or(size).min(size)),
                // Only a hole remains.
                Ok(_) | Err(rustix::io::Errno::NXIO) => return Ok(size),
                Err(e) => return Err(Served::Failed(read_error(&e.into()))),
            }
        } else {
            (offset, size)
        };
        let mut pos = start;
        // Data is read from the file's position, which SEEK_HOLE moved (here
        // or when the prefix of a resumed fetch was hashed).
        rustix::fs::seek(file, SeekFrom::Start(pos)).map_err(|e| Served::Failed(read_error(&e.into())))?;
        while pos < end {
            let want = ((end - pos) as usize).min(CHUNK);
            match enc.data_from(file, pos, want, |data| hasher.update_at(pos, data)) {
                Ok(Some((frame, n))) => {
                    out.send(frame)?;
                    pos += n as u64;
                }
                Ok(None) => return Ok(pos),
                Err(e) => return Err(Served::Failed(read_error(&e))),
            }
        }
        offset = end;
    }
    Ok(size)
}

/// Largest signature block the source accepts; anything outside this range
/// is a malformed request.
pub(super) const SIG_BLOCK_RANGE: std::ops::RangeInclusive<u32> = 64..=(1 << 20);

/// Sends the bytes `range` of the file as a delta against `signature`,
/// window by window; returns where it stopped (before `range.end` if the
/// file shrank).
pub(super) fn send_delta(
    file: &File,
    range: std::ops::Range<u64>,
    signature: &[u8],
    enc: &mut Encoder,
    out: &mut Batch,
    buf: &mut [u8],
    hasher: &mut ContentHasher,
) -> Result<u64, Served> {
    let bad = || Served::Failed(ReadError::Other("malformed signature in the request".into()));
    if signature.len() < 12 {
        return Err(bad());
    }
    let block = u32::from_be_bytes(signature[4..8].try_into().expect("4 bytes"));
    let strong = u32::from_be_bytes(signature[8..12].try_into().expect("4 bytes"));
    if !SIG_BLOCK_RANGE.contains(&block) || !(1..=16).contains(&strong) {
        return Err(bad());
    }
    let sig = fast_rsync::Signature::deserialize(signature.to_vec()).map_err(|_| bad())?;
    let index = sig.index();
    let (mut pos, size) = (range.start, range.end);
    let mut delta = Vec::with_capacity(DELTA_WINDOW + 1024);
    while pos < size {
        let want = ((size - pos) as usize).min(buf.len());
        let n = read_fully_at(file, &mut buf[..want], pos).map_err(|e| Served::Failed(read_error(&e)))?;
        if n == 0 {
            break;
        }
        hasher.update_at(pos, &buf[..n]);
        delta.clear();
        fast_rsync::diff(&index, &buf[..n], &mut delta).map_err(|_| bad())?;
        out.send(enc.delta(n as u32, &delta))?;
        pos += n as u64;
        if n < want {
            break;
        }
    }
    Ok(pos)
}

pub(super) fn read_fully_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
