//! Length-prefixed frames with a hard size limit, optionally zstd-compressed.
//!
//! ```text
//! u32 LE length (of what follows) | u8 kind | payload
//! kind 1: a postcard message
//! kind 2: file data:   u64 LE offset | bytes
//! kind 3: a delta window: u32 LE length of the window it rebuilds | librsync delta
//! kind | 0x80: the payload is one zstd frame (decompressed size also bounded)
//! ```
//! A peer can't make us allocate more than [`MAX_FRAME`] per frame, whatever
//! it sends: the length is checked before reading, and decompression is
//! bounded by the same limit.

use std::io::{self, Read, Write};

use serde::Serialize;

/// Largest frame, before and after decompression.
pub const MAX_FRAME: usize = 8 << 20;

/// Largest chunk of file data one frame carries.
pub const CHUNK: usize = 256 << 10;

const KIND_MSG: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_DELTA: u8 = 3;
const COMPRESSED: u8 = 0x80;

/// Payloads shorter than this are never worth compressing.
const COMPRESS_MIN: usize = 512;

/// Errors reading frames: all of them end the session.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the connection was closed in the middle of a frame")]
    Truncated,
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("compressed frame could not be decompressed: {0}")]
    Decompress(io::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One frame, decoded.
#[derive(Debug)]
pub enum Frame {
    Msg(Vec<u8>),
    Data { offset: u64, data: Vec<u8> },
    Delta { out_len: u32, delta: Vec<u8> },
}

/// Turns messages and data into frame bytes. One per producing thread, so
/// compression runs in parallel with I/O.
pub struct Encoder {
    /// Messages (the listing above all) are always compressed: they shrink
    /// several times for little CPU.
    messages: zstd::bulk::Compressor<'static>,
    /// File data only with `--compress`.
    data: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    /// `compress`: also compress file data and deltas.
    pub fn new(compress: bool) -> Encoder {
        let messages = zstd::bulk::Compressor::new(1).expect("zstd level 1 is valid");
        let data = compress.then(|| zstd::bulk::Compressor::new(3).expect("zstd level 3 is valid"));
        Encoder { messages, data }
    }

    /// A message frame.
    pub fn msg<T: Serialize>(&mut self, msg: &T) -> Vec<u8> {
        let body = postcard::to_stdvec(msg).expect("messages always serialize");
        frame(Some(&mut self.messages), KIND_MSG, &[], &body)
    }

    /// A file data frame of up to `max` bytes read from `data`, whose current
    /// position is file offset `offset`, and how many bytes it carries;
    /// `None` at end of file. An uncompressed frame is read straight into
    /// place: no buffer, no copy. `seen` gets the bytes read (to hash them).
    pub fn data_from(
        &mut self,
        data: impl Read,
        offset: u64,
        max: usize,
        seen: impl FnOnce(&[u8]),
    ) -> io::Result<Option<(Vec<u8>, usize)>> {
        const HEAD: usize = 4 + 1 + 8;
        let max = max.min(MAX_FRAME - (HEAD - 4));
        let mut out = Vec::with_capacity(HEAD + max);
        out.extend_from_slice(&[0; 4]);
        out.push(KIND_DATA);
        out.extend_from_slice(&offset.to_le_bytes());
        let n = data.take(max as u64).read_to_end(&mut out)?;
        if n == 0 {
            return Ok(None);
        }
        seen(&out[HEAD..]);
        if self.data.is_some() {
            return Ok(Some((self.data(offset, &out[HEAD..]), n)));
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        Ok(Some((out, n)))
    }

    /// A file data frame.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> Vec<u8> {
        frame(self.data.as_mut(), KIND_DATA, &offset.to_le_bytes(), data)
    }

    /// A delta window frame.
    pub fn delta(&mut self, out_len: u32, delta: &[u8]) -> Vec<u8> {
        frame(self.data.as_mut(), KIND_DELTA, &out_len.to_le_bytes(), delta)
    }
}

fn frame(compressor: Option<&mut zstd::bulk::Compressor<'static>>, kind: u8, head: &[u8], body: &[u8]) -> Vec<u8> {
    let plain_len = head.len() + body.len();
    if let Some(c) = compressor
        && plain_len >= COMPRESS_MIN
    {
        let mut plain = Vec::with_capacity(plain_len);
        plain.extend_from_slice(head);
        plain.extend_from_slice(body);
        if let Ok(z) = c.compress(&plain)
            && z.len() < plain_len
        {
            return assemble(kind | COMPRESSED, &[], &z);
        }
    }
    assemble(kind, head, body)
}

fn assemble(kind: u8, head: &[u8], body: &[u8]) -> Vec<u8> {
    let len = 1 + head.len() + body.len();
    assert!(len <= MAX_FRAME, "frame of {len} bytes exceeds the limit");
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    out
}

/// Reads frames from a peer, counting the bytes that crossed the wire.
pub struct FrameReader<R> {
    /// Buffered: a listing arrives as many small frames. (Large payloads
    /// bypass the buffer.)
    inner: io::BufReader<R>,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// A compressed frame as received, kept between frames.
    scratch: Vec<u8>,
    /// Bytes read from the peer so far (frames as sent, compressed or not).
    pub wire_bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner: io::BufReader::with_capacity(64 << 10, inner),
            decompressor: zstd::bulk::Decompressor::new().expect("zstd decompressor"),
            scratch: Vec::new(),
            wire_bytes: 0,
        }
    }

    /// The next frame; `None` if the peer closed the stream between frames.
    ///
    /// A plain frame's payload is read straight into the buffer the frame
    /// hands over: file data is copied once, from the pipe.
    pub fn read(&mut self) -> Result<Option<Frame>, FrameError> {
        // Length and kind, read together.
        let mut head = [0u8; 5];
        let got = read_full(&mut self.inner, &mut head)?;
        if got == 0 {
            return Ok(None);
        }
        if got < 4 {
            return Err(FrameError::Truncated);
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame"));
        }
        if got < 5 {
            return Err(FrameError::Truncated);
        }
        let (kind, body) = (head[4], len - 1);
        let frame = if kind & COMPRESSED != 0 {
            self.scratch.clear();
            read_exactly(&mut self.inner, &mut self.scratch, body)?;
            let plain = decompress(&mut self.decompressor, &self.scratch)?;
            parse(kind & !COMPRESSED, plain.len(), &mut &plain[..])?
        } else {
            parse(kind, body, &mut self.inner)?
        };
        self.wire_bytes += 4 + len as u64;
        Ok(Some(frame))
    }
}

/// The frame of `kind` whose payload, `body` bytes, comes next in `r`.
fn parse(kind: u8, body: usize, r: &mut impl Read) -> Result<Frame, FrameError> {
    Ok(match kind {
        KIND_MSG => Frame::Msg(payload(r, body)?),
        KIND_DATA => {
            let offset = u64::from_le_bytes(fixed(r, body, "data frame without offset")?);
            Frame::Data { offset, data: payload(r, body - 8)? }
        }
        KIND_DELTA => {
            let out_len = u32::from_le_bytes(fixed(r, body, "delta frame without length")?);
            Frame::Delta { out_len, delta: payload(r, body - 4)? }
        }
        other => return Err(FrameError::UnknownKind(other)),
    })
}

/// The fixed-size head of a payload of `body` bytes.
fn fixed<const N: usize>(r: &mut impl Read, body: usize, short: &'static str) -> Result<[u8; N], FrameError> {
    if body < N {
        return Err(FrameError::Malformed(short));
    }
    let mut bytes = [0u8; N];
    if read_full(r, &mut bytes)? != N {
        return Err(FrameError::Truncated);
    }
    Ok(bytes)
}

fn payload(r: &mut impl Read, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    read_exactly(r, &mut out, len)?;
    Ok(out)
}

/// Appends exactly `len` bytes from `r` to `out`, without zero-filling
/// first (`read_to_end` reads into the spare capacity).
fn read_exactly(r: &mut impl Read, out: &mut Vec<u8>, len: usize) -> Result<(), FrameError> {
    out.reserve_exact(len);
    let start = out.len();
    r.take(len as u64).read_to_end(out)?;
    if out.len() - start == len { Ok(()) } else { Err(FrameError::Truncated) }
}

/// Decompresses one zstd frame into exactly the size its header declares,
/// which must be present and within the limit: memory is bounded by what the
/// frame really holds, and a hostile peer can't make the decoder reserve more
/// (no streaming window is ever allocated).
fn decompress(decompressor: &mut zstd::bulk::Decompressor<'static>, compressed: &[u8]) -> Result<Vec<u8>, FrameError> {
    let size = match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(n)) if n <= MAX_FRAME as u64 => n as usize,
        Ok(Some(n)) => return Err(FrameError::TooLarge(usize::try_from(n).unwrap_or(usize::MAX))),
        _ => return Err(FrameError::Malformed("compressed frame without a valid content size")),
    };
    let mut out = Vec::with_capacity(size);
    let n = decompressor.decompress_to_buffer(compressed, &mut out).map_err(FrameError::Decompress)?;
    if n != size {
        return Err(FrameError::Malformed("compressed frame shorter than its declared size"));
    }
    Ok(out)
}

/// Reads until `buf` is full or EOF; returns how much was read.
pub fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes frames handed over by producer threads, flushing whenever no more
/// are waiting, so that small messages never sit in a buffer while the peer
/// waits for them.
pub fn pump_frames(rx: &std::sync::mpsc::Receiver<Vec<u8>>, out: impl Write) -> io::Result<()> {
    let mut out = io::BufWriter::with_capacity(256 << 10, out);
    while let Ok(frame) = rx.recv() {
        out.write_all(&frame)?;
        while let Ok(frame) = rx.try_recv() {
            out.write_all(&frame)?;
        }
        out.flush()?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(compress: bool) {
        let mut enc = Encoder::new(compress);
        let mut wire = Vec::new();
        wire.extend(enc.msg(&(1u32, "hello".to_string())));
        wire.extend(enc.data(77, &vec![7u8; 100_000]));
        wire.extend(enc.delta(5, b"abc"));
        let mut r = FrameReader::new(&wire[..]);
        match r.read().unwrap().unwrap() {
            Frame::Msg(m) => assert_eq!(postcard::from_bytes::<(u32, String)>(&m).unwrap(), (1, "hello".into())),
            f => panic!("{f:?}"),
        }
        match r.read().unwrap().unwrap() {
            Frame::Data { offset, data } => {
                assert_eq!(offset, 77);
                assert_eq!(data, vec![7u8; 100_000]);
            }
            f => panic!("{f:?}"),
        }
        match r.read().unwrap().unwrap() {
            Frame::Delta { out_len, delta } => {
                assert_eq!((out_len, delta.as_slice()), (5, &b"abc"[..]));
            }
            f => panic!("{f:?}"),
        }
        assert!(r.read().unwrap().is_none());
        assert_eq!(r.wire_bytes, wire.len() as u64);
        if compress {
            assert!(wire.len() < 10_000, "compressed stream is {} bytes", wire.len());
        } else {
            assert!(wire.len() > 100_000, "data is compressed only when asked");
        }
    }

    #[test]
    fn data_read_into_frames_decodes_like_encoded_data() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for compress in [false, true] {
            let mut enc = Encoder::new(compress);
            let mut src = &bytes[..];
            let (a, n) = enc.data_from(&mut src, 5, 60_000, |_| {}).unwrap().unwrap();
            assert_eq!((a.clone(), n), (enc.data(5, &bytes[..60_000]), 60_000));
            let (b, m) = enc.data_from(&mut src, 60_005, 60_000, |_| {}).unwrap().unwrap();
            assert_eq!(m, 40_000);
            assert!(enc.data_from(&mut src, 100_005, 60_000, |_| {}).unwrap().is_none());
            let mut wire = a;
            wire.extend(b);
            let mut r = FrameReader::new(&wire[..]);
            let mut got = Vec::new();
            while let Some(Frame::Data { offset, data }) = r.read().unwrap() {
                assert_eq!(offset, 5 + got.len() as u64);
                got.extend(data);
            }
            assert_eq!(got, bytes);
        }
    }

    #[test]
    fn frames_roundtrip_plain() {
        roundtrip(false);
    }

    #[test]
    fn frames_roundtrip_compressed() {
        roundtrip(true);
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let wire = (u32::MAX).to_le_bytes();
        assert!(matches!(FrameReader::new(&wire[..]).read(), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut wire = Encoder::new(false).msg(&5u8);
        wire.pop();
        assert!(matches!(FrameReader::new(&wire[..]).read(), Err(FrameError::Truncated)));
        assert!(matches!(FrameReader::new(&[1u8, 0][..]).read(), Err(FrameError::Truncated)));
    }

    #[test]
    fn short_or_unknown_frames_are_errors() {
        let frame = |kind: u8, body: &[u8]| {
            let mut w = ((body.len() + 1) as u32).to_le_bytes().to_vec();
            w.push(kind);
            w.extend_from_slice(body);
            w
        };
        let read = |w: Vec<u8>| FrameReader::new(&w[..]).read();
        assert!(matches!(read(frame(KIND_DATA, &[1, 2, 3])), Err(FrameError::Malformed(_))));
        assert!(matches!(read(frame(KIND_DELTA, &[1])), Err(FrameError::Malformed(_))));
        assert!(matches!(read(frame(9, b"x")), Err(FrameError::UnknownKind(9))));
        assert!(matches!(read(0u32.to_le_bytes().to_vec()), Err(FrameError::Malformed(_))));
        // A data frame whose payload stops short.
        let mut w = frame(KIND_DATA, &[0; 20]);
        w.truncate(w.len() - 3);
        assert!(matches!(read(w), Err(FrameError::Truncated)));
    }

    #[test]
    fn zip_bomb_is_refused() {
        // 64 MiB of zeros compresses to a few KiB; its declared size is over the limit.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        let mut wire = ((bomb.len() + 1) as u32).to_le_bytes().to_vec();
        wire.push(KIND_DATA | COMPRESSED);
        wire.extend(bomb);
        assert!(matches!(FrameReader::new(&wire[..]).read(), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn compressed_frame_without_its_size_is_refused() {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, b"some data that streams").unwrap();
        let z = enc.finish().unwrap();
        let mut wire = ((z.len() + 1) as u32).to_le_bytes().to_vec();
        wire.push(KIND_MSG | COMPRESSED);
        wire.extend(z);
        assert!(matches!(FrameReader::new(&wire[..]).read(), Err(FrameError::Malformed(_))));
    }
}
