//! Property tests of the wire: every message round-trips, and decoding
//! arbitrary bytes never panics and never allocates beyond the frame limit.
//!
//! Allocation is measured with a counting global allocator, per thread, so
//! parallel tests don't see each other's memory.

#![allow(clippy::pedantic)]
// test code: plain asserts over polish
// The counting allocator below is the only unsafe code in the tests: it
// forwards every call to the system allocator unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::collection::vec;
use proptest::prelude::*;
use rbackup::fs::meta::{Meta, Xattr};
use rbackup::wire::frame::{Encoder, Frame, FrameReader, MAX_FRAME};
use rbackup::wire::msg::{
    Entry, Fetch, Hello, Link, LogKind, ReadError, ReadStatus, ReplicaAsk, Reply, Role, SessionOptions, SinkMsg,
    SkipReason, SourceMsg, SpecialKind,
};

// ------------------------------------------------------- allocation counting

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = (live.get() as isize + delta).max(0) as usize;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated (above what was live before) while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

// ------------------------------------------------------------- strategies

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn meta() -> impl Strategy<Value = Meta> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<i64>(), any::<u32>(), vec((bytes(20), bytes(40)), 0..4)).prop_map(
        |(mode, uid, gid, mtime, mtime_nsec, xs)| Meta {
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs: xs.into_iter().map(|(name, value)| Xattr { name, value }).collect(),
        },
    )
}

fn entry() -> impl Strategy<Value = Entry> {
    prop_oneof![
        (bytes(30), meta(), proptest::option::of(".*"), any::<bool>())
            .prop_map(|(name, meta, unreadable, partial)| Entry::Dir { name, meta, unreadable, partial }),
        Just(Entry::End),
        (bytes(30), meta(), any::<u64>(), any::<bool>(), proptest::option::of((any::<u64>(), any::<u32>()))).prop_map(
            |(name, meta, size, sparse, link)| Entry::File {
                name,
                meta,
                size,
                sparse,
                link: link.map(|(id, nlink)| Link { id, nlink }),
            }
        ),
        (bytes(30), meta(), bytes(60)).prop_map(|(name, meta, target)| Entry::Symlink { name, meta, target }),
        (
            bytes(30),
            meta(),
            prop_oneof![Just(SpecialKind::Fifo), Just(SpecialKind::Char), Just(SpecialKind::Block)],
            any::<u64>()
        )
            .prop_map(|(name, meta, kind, rdev)| Entry::Special { name, meta, kind, rdev }),
        (
            bytes(30),
            prop_oneof![Just(SkipReason::Vanished), ".*".prop_map(SkipReason::Unreadable), Just(SkipReason::Socket)]
        )
            .prop_map(|(name, reason)| Entry::Skipped { name, reason }),
    ]
}

fn source_msg() -> impl Strategy<Value = SourceMsg> {
    prop_oneof![
        vec(entry(), 0..8).prop_map(SourceMsg::Entries),
        Just(SourceMsg::ListingDone),
        (any::<u64>(), any::<u64>()).prop_map(|(id, size)| SourceMsg::FileBegin { id, size }),
        (any::<u64>(), any::<bool>(), proptest::option::of(any::<[u8; 32]>())).prop_map(|(id, changed, hash)| {
            SourceMsg::FileEnd { id, status: if changed { ReadStatus::Changed } else { ReadStatus::Complete }, hash }
        }),
        (
            any::<u64>(),
            prop_oneof![
                Just(ReadError::Vanished),
                ".*".prop_map(ReadError::Unreadable),
                ".*".prop_map(ReadError::Other)
            ]
        )
            .prop_map(|(id, error)| SourceMsg::FileFailed { id, error }),
        ".*".prop_map(SourceMsg::Fatal),
        (any::<u64>(), any::<u64>()).prop_map(|(id, done)| SourceMsg::Hashing { id, done }),
        bytes(200).prop_map(SourceMsg::Manifest),
        any::<bool>().prop_map(|present| SourceMsg::ManifestEnd { present }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, size, offset)| SourceMsg::FileResume {
            id,
            size,
            offset
        }),
    ]
}

fn sink_msg() -> impl Strategy<Value = SinkMsg> {
    prop_oneof![
        any::<u32>().prop_map(SinkMsg::Credit),
        (any::<u64>(), bytes(100), proptest::option::of(bytes(200)), any::<u64>())
            .prop_map(|(id, path, signature, offset)| SinkMsg::Fetch(Fetch { id, path, signature, offset })),
        (prop_oneof![Just(LogKind::Action), Just(LogKind::Problem), Just(LogKind::Note)], ".*")
            .prop_map(|(kind, text)| SinkMsg::Log { kind, text }),
        vec((".*", any::<u64>()), 0..5).prop_map(|summary| SinkMsg::Finish { summary }),
        ".*".prop_map(SinkMsg::Fatal),
        vec(".*", 0..5).prop_map(SinkMsg::Held),
        (".*", any::<u64>()).prop_map(|(folder, problems)| SinkMsg::Committed { folder, problems }),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        (any::<bool>(), bytes(100), any::<bool>(), vec(".*", 0..3), vec(bytes(20), 0..3), any::<[bool; 4]>(), ".*"),
        (any::<u64>(), proptest::option::of((any::<bool>(), ".*"))),
    )
        .prop_map(
            |((sink, path, compress, excludes, only, [devices, delete, dry_run, delta], version), (bwlimit, ask))| {
                Hello {
                    role: match (&ask, sink) {
                        (Some(_), _) => Role::Replica,
                        (None, true) => Role::Sink,
                        (None, false) => Role::Source,
                    },
                    replica: ask.map(
                        |(list, name)| {
                            if list { ReplicaAsk::List { name } } else { ReplicaAsk::Write { folder: name } }
                        },
                    ),
                    path,
                    options: SessionOptions {
                        compress,
                        excludes,
                        only,
                        devices,
                        delete,
                        dry_run,
                        delta,
                        probe_read: dry_run,
                        one_file_system: delete,
                        bwlimit,
                    },
                    version,
                }
            },
        )
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(msg: &T, compress: bool) -> Vec<u8> {
    let wire = Encoder::new(compress).msg(msg);
    let Some(Frame::Msg(body)) = FrameReader::new(&wire[..]).read().unwrap() else { panic!("not a message frame") };
    let back: T = postcard::from_bytes(&body).unwrap();
    // Equal encodings: nothing was lost or changed on the way.
    postcard::to_stdvec(&back).unwrap()
}

#[test]
fn the_allocation_counter_sees_allocations() {
    let (v, peak) = peak_of(|| vec![1u8; 10 << 20]);
    assert!(peak >= 10 << 20, "peak {peak}");
    drop(v);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn source_messages_roundtrip(msg in source_msg(), compress in any::<bool>()) {
        prop_assert_eq!(roundtrip(&msg, compress), postcard::to_stdvec(&msg).unwrap());
    }

    #[test]
    fn sink_messages_roundtrip(msg in sink_msg(), compress in any::<bool>()) {
        prop_assert_eq!(roundtrip(&msg, compress), postcard::to_stdvec(&msg).unwrap());
    }

    #[test]
    fn handshake_messages_roundtrip(h in hello(), root in bytes(50), refused in proptest::option::of(".*")) {
        prop_assert_eq!(roundtrip(&h, false), postcard::to_stdvec(&h).unwrap());
        let reply = match refused {
            Some(reason) => Reply::Refused { reason },
            None => Reply::Welcome { root, version: "1".into() },
        };
        prop_assert_eq!(roundtrip(&reply, false), postcard::to_stdvec(&reply).unwrap());
    }

    #[test]
    fn data_frames_roundtrip(offset in any::<u64>(), data in bytes(5000), compress in any::<bool>()) {
        let wire = Encoder::new(compress).data(offset, &data);
        match FrameReader::new(&wire[..]).read().unwrap() {
            Some(Frame::Data { offset: o, data: d }) => { prop_assert_eq!(o, offset); prop_assert_eq!(d, data); }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn decoding_arbitrary_messages_never_panics_and_stays_small(input in bytes(4096)) {
        let (_, peak) = peak_of(|| {
            let _ = postcard::from_bytes::<SourceMsg>(&input);
            let _ = postcard::from_bytes::<SinkMsg>(&input);
            let _ = postcard::from_bytes::<Hello>(&input);
            let _ = postcard::from_bytes::<Reply>(&input);
        });
        prop_assert!(peak <= MAX_FRAME, "decoding {} bytes allocated {peak}", input.len());
    }

    #[test]
    fn reading_arbitrary_frames_never_panics_and_stays_within_the_limit(
        claimed in prop_oneof![any::<u32>(), 0u32..64, Just(MAX_FRAME as u32), Just(MAX_FRAME as u32 + 1)],
        kind in any::<u8>(),
        body in bytes(2048),
    ) {
        let mut wire = claimed.to_le_bytes().to_vec();
        wire.push(kind);
        wire.extend_from_slice(&body);
        let (_, peak) = peak_of(|| {
            let mut r = FrameReader::new(&wire[..]);
            while let Ok(Some(_)) = r.read() {}
        });
        prop_assert!(peak <= MAX_FRAME + (1 << 20), "a frame claiming {claimed} bytes allocated {peak}");
    }

    #[test]
    fn compressed_frames_claiming_huge_content_stay_within_the_limit(
        declared in prop_oneof![0u64..1 << 20, Just(MAX_FRAME as u64), Just(1 << 40)],
        kind in 1u8..4,
        noise in bytes(512),
    ) {
        // A zstd frame header that declares `declared` bytes, followed by junk.
        let real = zstd::bulk::compress(&vec![0u8; declared.min(1 << 20) as usize], 1).unwrap();
        let mut z = real.clone();
        if declared > 1 << 20 {
            // Patch in a bigger declared size: re-encode the header by hand.
            // magic, then a descriptor: 8-byte content size, single segment.
            z = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
            z.extend_from_slice(&declared.to_le_bytes());
        }
        z.extend_from_slice(&noise);
        let mut wire = ((z.len() + 1) as u32).to_le_bytes().to_vec();
        wire.push(kind | 0x80);
        wire.extend_from_slice(&z);
        let (_, peak) = peak_of(|| { let _ = FrameReader::new(&wire[..]).read(); });
        prop_assert!(peak <= MAX_FRAME + (1 << 20), "a frame declaring {declared} bytes allocated {peak}");
    }
}
