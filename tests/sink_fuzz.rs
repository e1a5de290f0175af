//! Fuzzing the sink: arbitrary sessions from a hostile source, fed as bytes
//! through the real frame reader, look-ahead thread and [`Sink`] — the code
//! a backup (and the restore agent) runs against whatever the peer sends
//! (docs/design.md rule 2). For every session:
//! - nothing panics, on the sink's thread or the reader's;
//! - the session ends: input that runs out is a lost connection;
//! - nothing is written outside the destination: the tree around it (a
//!   basis snapshot, a symlink planted beside it, a folder it points to) is
//!   the same after the run, metadata included; a dry run writes nothing;
//! - memory stays bounded: peak heap (all threads, counted by the global
//!   allocator below) stays under a fixed budget, however long the session.
//!
//! Sessions come from three generators: honest sessions (a random tree, its
//! listing, every fetch answered — some with deltas) that must succeed and
//! write what was listed; the same sessions mutated (steps dropped,
//! repeated, swapped or replaced, bytes of the wire flipped or cut); and
//! random steps (hostile names, metadata, sizes, hardlink groups, data for
//! files never asked for, raw frames of any kind).
//!
//! CI runs a fixed number of cases from a fixed seed. A longer hunt:
//! `RBACKUP_FUZZ_CASES=100000 cargo nextest run --release --test sink_fuzz`
//! (`RBACKUP_FUZZ_SEED=<n>` for other cases than CI's).

#![allow(clippy::pedantic)]
// test code: plain asserts over polish
// The counting allocator is the only unsafe code here: it forwards every
// call to the system allocator unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicIsize, Ordering};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngSeed};
use rbackup::fs::meta::{Meta, Privileges, Xattr};
use rbackup::fs::safefs::Dir;
use rbackup::plan::Policy;
use rbackup::report::{Events, Problem, Stats};
use rbackup::sink::{Recorder, Sink, SinkConfig};
use rbackup::wire::Outbox;
use rbackup::wire::frame::{Encoder, FrameReader};
use rbackup::wire::msg::{Entry, Link, ReadError, ReadStatus, SkipReason, SourceMsg, SpecialKind};

// ------------------------------------------------------- allocation counting

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn note(delta: isize) {
    let now = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK.fetch_max(now, Ordering::Relaxed);
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

/// The counter is global: tests of this binary take turns, so that under
/// `cargo test` (threads, not processes) none sees another's memory.
static SERIAL: Mutex<()> = Mutex::new(());

/// Peak heap bytes (every thread) above what was live before, while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, (PEAK.load(Ordering::Relaxed) - base).max(0) as usize)
}

/// What one session may use, whatever it sends: the reader's look-ahead
/// and the sink's bounded queues, for the small frames generated here.
const MEMORY_BUDGET: usize = 64 << 20;

// ------------------------------------------------------------- the area

const T0: i64 = 1_600_000_000;

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The basis snapshot's `big` file, and the destination's (when it isn't
/// fresh): what honest deltas are computed against.
fn basis_big() -> Vec<u8> {
    noise(7, 100_000)
}

fn dest_big() -> Vec<u8> {
    noise(8, 100_000)
}

fn set_mtime(path: &Path, sec: i64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(sec as u64)).unwrap();
}

/// A scratch tree around the destination:
/// ```text
/// tmp/area/dest/     the destination (empty, or with entries to trip on)
/// tmp/area/escape -> ../outside
/// tmp/basis/         a previous snapshot (files, a subdirectory, a symlink)
/// tmp/outside/sentinel
/// tmp/meta/          where a manifest may be written
/// ```
struct Area {
    tmp: tempfile::TempDir,
}

impl Area {
    fn new(fresh: bool) -> Area {
        let tmp = tempfile::Builder::new().prefix("rbackup-fuzz-").tempdir().unwrap();
        let p = |rel: &str| tmp.path().join(rel);
        for d in ["area/dest", "basis/sub", "outside", "meta"] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        std::fs::write(p("outside/sentinel"), b"untouched").unwrap();
        std::os::unix::fs::symlink("../outside", p("area/escape")).unwrap();
        std::fs::write(p("basis/a"), noise(1, 10_000)).unwrap();
        std::fs::write(p("basis/big"), basis_big()).unwrap();
        std::fs::write(p("basis/sub/c"), b"ccc").unwrap();
        std::os::unix::fs::symlink("../outside/sentinel", p("basis/l")).unwrap();
        if !fresh {
            std::fs::write(p("area/dest/a"), noise(1, 10_000)).unwrap();
            std::fs::write(p("area/dest/big"), dest_big()).unwrap();
            std::fs::create_dir_all(p("area/dest/d")).unwrap();
            std::fs::write(p("area/dest/d/x"), b"x").unwrap();
            std::os::unix::fs::symlink("../../outside", p("area/dest/sub")).unwrap();
            std::os::unix::fs::symlink(p("outside"), p("area/dest/x")).unwrap();
        }
        for f in ["basis/a", "basis/big", "basis/sub/c", "area/dest/a", "area/dest/big"] {
            if p(f).exists() {
                std::fs::set_permissions(p(f), std::fs::Permissions::from_mode(0o644)).unwrap();
                set_mtime(&p(f), T0);
            }
        }
        Area { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Everything but the destination and the manifest folder.
    fn around(&self) -> Tree {
        let mut t = read_tree(self.tmp.path());
        t.retain(|p, _| !p.starts_with("area/dest") && !p.starts_with("meta"));
        t
    }

    fn dest(&self) -> Tree {
        read_tree(&self.path("area/dest"))
    }
}

/// Path → what an entry is: type, mode, owner, size, mtime (ns), and its
/// content or target. Directories' mtimes count: a file created and removed
/// again still shows.
type Tree = BTreeMap<String, (String, u32, u32, u32, u64, i128, Vec<u8>)>;

fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &Path, out: &mut Tree) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            let full = root.join(&rel);
            let md = std::fs::symlink_metadata(&full).unwrap();
            let ft = md.file_type();
            let (kind, body) = if ft.is_symlink() {
                ("symlink", std::fs::read_link(&full).unwrap().into_os_string().into_encoded_bytes())
            } else if ft.is_dir() {
                ("dir", Vec::new())
            } else if ft.is_file() {
                ("file", blake3::hash(&std::fs::read(&full).unwrap()).as_bytes().to_vec())
            } else {
                ("special", md.rdev().to_le_bytes().to_vec())
            };
            let mtime = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
            let key = rel.to_string_lossy().into_owned();
            out.insert(key, (kind.into(), md.mode(), md.uid(), md.gid(), md.len(), mtime, body));
            if ft.is_dir() {
                walk(root, &rel, out);
            }
        }
    }
    let mut out = Tree::new();
    walk(root, Path::new(""), &mut out);
    out
}

// ------------------------------------------------------------ the session

/// How the sink is set up for one session.
#[derive(Debug, Clone)]
struct Setup {
    policy: Policy,
    fresh: bool,
    delete: bool,
    dry_run: bool,
    devices: bool,
    delta: bool,
    compress: bool,
    manifest: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (any::<bool>(), any::<[bool; 7]>()).prop_map(
        |(restore, [fresh, delete, dry_run, devices, delta, compress, manifest])| {
            let policy = if restore { Policy::Restore } else { Policy::Snapshot };
            Setup {
                policy,
                // A restore target always exists.
                fresh: fresh && policy == Policy::Snapshot,
                delete: delete || policy == Policy::Snapshot,
                dry_run,
                devices,
                delta,
                compress,
                // As `backup` does: a manifest for a snapshot being written.
                manifest: manifest && policy == Policy::Snapshot && !dry_run,
            }
        },
    )
}

/// One thing the source sends.
#[derive(Debug, Clone)]
enum Step {
    Msg(SourceMsg),
    /// A data frame of `len` bytes (pseudo-random from `seed`, or zeros).
    Data {
        offset: u64,
        len: usize,
        seed: u64,
    },
    Delta {
        out_len: u32,
        delta: Vec<u8>,
    },
    /// A frame of any kind with any payload, its length right.
    Frame {
        kind: u8,
        body: Vec<u8>,
    },
    /// Bytes as they are.
    Raw(Vec<u8>),
}

fn encode(steps: &[Step], compress: bool) -> Vec<u8> {
    let mut enc = Encoder::new(compress);
    let mut wire = Vec::new();
    for s in steps {
        match s {
            Step::Msg(m) => wire.extend(enc.msg(m)),
            Step::Data { offset, len, seed } => {
                let data = if *seed == 0 { vec![0; *len] } else { noise(*seed, *len) };
                wire.extend(enc.data(*offset, &data));
            }
            Step::Delta { out_len, delta } => wire.extend(enc.delta(*out_len, delta)),
            Step::Frame { kind, body } => {
                wire.extend(((body.len() + 1) as u32).to_le_bytes());
                wire.push(*kind);
                wire.extend(body);
            }
            Step::Raw(bytes) => wire.extend(bytes),
        }
    }
    wire
}

#[derive(Default)]
struct Quiet {
    problems: u64,
}

impl Events for Quiet {
    fn action(&mut self, _verb: &str, _path: &[u8]) {}
    fn problem(&mut self, _problem: Problem) {
        self.problems += 1;
    }
    fn note(&mut self, _text: &str) {}
    fn progress(&mut self, _stats: &Stats) {}
}

struct Ran {
    result: anyhow::Result<Stats>,
    peak: usize,
}

/// Runs the sink on `wire` the way `backup` wires it: the frame reader and
/// look-ahead on their thread, the sink's frames to a writer that drains them.
fn run_session(area: &Area, s: &Setup, wire: Vec<u8>) -> Ran {
    let dest = Dir::open_path(&area.path("area/dest")).unwrap();
    let bases = match s.policy {
        Policy::Snapshot => vec![Dir::open_path(&area.path("basis")).unwrap()],
        Policy::Restore => Vec::new(),
    };
    let recorder = if s.manifest {
        let folder = rbackup::store::manifest::folder(&Dir::open_path(&area.path("meta")).unwrap()).unwrap();
        let writer =
            rbackup::store::manifest::ManifestWriter::create(&folder, "fuzz.01-01-20_00-00-00.incomplete").unwrap();
        Recorder { writer: Some(writer), ..Recorder::default() }
    } else {
        Recorder::default()
    };
    let cfg = SinkConfig {
        // A dry run of a snapshot not yet created has no destination at all.
        dest: if s.dry_run && s.fresh { None } else { Some(dest) },
        fresh: s.fresh,
        bases,
        policy: s.policy,
        delete: s.delete,
        dry_run: s.dry_run,
        devices: s.devices,
        delta: s.delta,
        privs: Privileges::current().storing_on(&Dir::open_path(&area.path("area")).unwrap()),
        compress: s.compress,
        recorder,
        keep_root: false,
    };
    let (ran, peak) = peak_of(move || {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let writer = std::thread::spawn(move || rx.into_iter().count());
        let (incoming, _, reader) = rbackup::sink::spawn_reader(FrameReader::new(std::io::Cursor::new(wire)), &cfg);
        let mut events = Quiet::default();
        let result = Sink::new(cfg, Outbox::Unbounded(tx), &mut events).run(&incoming);
        drop(incoming);
        assert!(reader.join().is_ok(), "the reader thread panicked");
        writer.join().unwrap();
        result.map(|outcome| {
            if let Some(m) = outcome.manifest {
                m.finish().unwrap();
            }
            outcome.stats
        })
    });
    Ran { result: ran, peak }
}

/// Runs `steps` in a fresh area and checks what must hold for any session.
fn check_session(s: &Setup, steps: &[Step], cut: Option<Index>, flip: Option<(Index, u8)>) -> (Area, Ran) {
    let area = Area::new(s.fresh);
    let around = area.around();
    let dest = area.dest();
    let mut wire = encode(steps, s.compress);
    if let Some((at, bits)) = flip
        && !wire.is_empty()
    {
        let i = at.index(wire.len());
        wire[i] ^= bits.max(1);
    }
    if let Some(at) = cut {
        wire.truncate(at.index(wire.len() + 1));
    }
    let ran = run_session(&area, s, wire);
    assert_eq!(area.around(), around, "something outside the destination changed");
    if s.dry_run {
        assert_eq!(area.dest(), dest, "a dry run changed the destination");
    }
    assert!(ran.peak <= MEMORY_BUDGET, "the session peaked at {} bytes", ran.peak);
    (area, ran)
}

// -------------------------------------------------- strategies: hostile

const NAMES: &[&[u8]] = &[b"a", b"b", b"big", b"c", b"d", b"l", b"sub", b"x", b"zz"];

fn name() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        12 => select(NAMES).prop_map(<[u8]>::to_vec),
        1 => select(vec![
            &b""[..], b".", b"..", b"a/b", b"/etc", b"x\0y", b"../outside", b"escape", b".rbk~0000000000000001",
            b"\xff\xfe", b"dest",
        ])
        .prop_map(<[u8]>::to_vec),
        1 => Just(vec![b'n'; 256]),
        1 => vec(any::<u8>(), 0..6),
    ]
    .boxed()
}

fn meta() -> BoxedStrategy<Meta> {
    let xattr_name = prop_oneof![
        select(vec![&b"user.a"[..], b"user.b", b"trusted.t", b"security.s", b"system.posix_acl_access"])
            .prop_map(<[u8]>::to_vec),
        vec(any::<u8>(), 0..12),
    ];
    (
        prop_oneof![4 => Just(0o644u32), 2 => Just(0o755), 1 => 0u32..0o10000, 1 => any::<u32>()],
        prop_oneof![3 => Just(0u32), 1 => Just(12345), 1 => any::<u32>()],
        prop_oneof![6 => Just(T0), 2 => T0 - 5..T0 + 5, 1 => any::<i64>(), 1 => Just(i64::MAX), 1 => Just(i64::MIN)],
        prop_oneof![4 => Just(0u32), 1 => 0u32..1_000_000_000, 1 => any::<u32>()],
        prop_oneof![6 => Just(Vec::new()), 1 => vec((xattr_name, vec(any::<u8>(), 0..20)), 0..3)],
    )
        .prop_map(|(mode, owner, mtime, mtime_nsec, xattrs)| Meta {
            mode,
            uid: owner,
            gid: owner,
            mtime,
            mtime_nsec,
            xattrs: xattrs.into_iter().map(|(name, value)| Xattr { name, value }).collect(),
        })
        .boxed()
}

fn size() -> BoxedStrategy<u64> {
    prop_oneof![6 => 0u64..120_000, 1 => Just(100_000), 1 => Just(i64::MAX as u64), 1 => any::<u64>()].boxed()
}

fn fetch_id() -> BoxedStrategy<u64> {
    prop_oneof![8 => 0u64..6, 1 => any::<u64>()].boxed()
}

fn entry() -> BoxedStrategy<Entry> {
    prop_oneof![
        3 => (name(), meta(), proptest::option::weighted(0.1, ".{0,10}"), any::<bool>())
            .prop_map(|(name, meta, unreadable, partial)| Entry::Dir { name, meta, unreadable, partial }),
        3 => Just(Entry::End),
        2 => select(vec![&b"a"[..], b"big", b"c"]).prop_map(known),
        6 => (
            name(),
            meta(),
            size(),
            any::<bool>(),
            proptest::option::weighted(0.3, (0u64..4, prop_oneof![Just(0u32), Just(1), 2u32..4, Just(u32::MAX)]))
        )
            .prop_map(|(name, meta, size, sparse, link)| Entry::File {
                name,
                meta,
                size,
                sparse,
                link: link.map(|(id, nlink)| Link { id, nlink }),
            }),
        2 => (
            name(),
            meta(),
            prop_oneof![
                select(vec![&b"../outside"[..], b"/etc/passwd", b"..", b"../../outside/sentinel", b""])
                    .prop_map(<[u8]>::to_vec),
                vec(any::<u8>(), 0..8),
            ]
        )
            .prop_map(|(name, meta, target)| Entry::Symlink { name, meta, target }),
        1 => (
            name(),
            meta(),
            prop_oneof![Just(SpecialKind::Fifo), Just(SpecialKind::Char), Just(SpecialKind::Block)],
            prop_oneof![Just(0u64), Just(0x0103), any::<u64>()]
        )
            .prop_map(|(name, meta, kind, rdev)| Entry::Special { name, meta, kind, rdev }),
        1 => (
            name(),
            prop_oneof![Just(SkipReason::Vanished), Just(SkipReason::Socket), ".{0,8}".prop_map(SkipReason::Unreadable)]
        )
            .prop_map(|(name, reason)| Entry::Skipped { name, reason }),
    ]
    .boxed()
}

/// A file exactly as the basis (and a destination that isn't fresh) has
/// it: linked or kept, never fetched.
fn known(name: &[u8]) -> Entry {
    let size = match name {
        b"a" => 10_000,
        b"big" => basis_big().len() as u64,
        _ => 3,
    };
    let meta = Meta { mode: 0o644, mtime: T0, ..Meta::default() };
    Entry::File { name: name.to_vec(), meta, size, sparse: false, link: None }
}

fn root() -> Entry {
    Entry::Dir {
        name: Vec::new(),
        meta: Meta { mode: 0o755, mtime: T0, ..Meta::default() },
        unreadable: None,
        partial: false,
    }
}

fn step() -> BoxedStrategy<Step> {
    prop_oneof![
        8 => vec(entry(), 0..6).prop_map(|batch| Step::Msg(SourceMsg::Entries(batch))),
        1 => Just(Step::Msg(SourceMsg::ListingDone)),
        // Any size: what the source doesn't send is a hole, and costs the
        // sink nothing (the content digest skips holes), up to sizes no
        // filesystem holds.
        3 => (fetch_id(), prop_oneof![0u64..120_000, Just(1 << 20), Just(1 << 40), Just(i64::MAX as u64), Just(u64::MAX)])
            .prop_map(|(id, size)| Step::Msg(SourceMsg::FileBegin { id, size })),
        3 => (
            fetch_id(),
            any::<bool>(),
            proptest::option::of(prop_oneof![Just(rbackup::digest::of_bytes(b"")), any::<[u8; 32]>()])
        )
            .prop_map(|(id, changed, hash)| {
                let status = if changed { ReadStatus::Changed } else { ReadStatus::Complete };
                Step::Msg(SourceMsg::FileEnd { id, status, hash })
            }),
        1 => (
            fetch_id(),
            prop_oneof![Just(ReadError::Vanished), ".{0,8}".prop_map(ReadError::Unreadable), ".{0,8}".prop_map(ReadError::Other)]
        )
            .prop_map(|(id, error)| Step::Msg(SourceMsg::FileFailed { id, error })),
        1 => ".{0,8}".prop_map(|m| Step::Msg(SourceMsg::Fatal(m))),
        3 => (prop_oneof![3 => 0u64..120_000, 1 => any::<u64>()], 0usize..70_000, 0u64..3)
            .prop_map(|(offset, len, seed)| Step::Data { offset, len, seed }),
        1 => (prop_oneof![0u32..120_000, Just(8 << 20), any::<u32>()], vec(any::<u8>(), 0..64))
            .prop_map(|(out_len, delta)| Step::Delta { out_len, delta }),
        1 => (any::<u8>(), vec(any::<u8>(), 0..64)).prop_map(|(kind, body)| Step::Frame { kind, body }),
        1 => vec(any::<u8>(), 0..16).prop_map(Step::Raw),
    ]
    .boxed()
}

/// Random steps, mostly after a valid root so that they reach past it.
fn hostile_session() -> BoxedStrategy<Vec<Step>> {
    (proptest::bool::weighted(0.85), vec(step(), 0..24))
        .prop_map(|(with_root, mut steps)| {
            if with_root {
                steps.insert(0, Step::Msg(SourceMsg::Entries(vec![root()])));
            }
            steps
        })
        .boxed()
}

// --------------------------------------------------- strategies: honest

/// A file of the honest tree, as the source holds it.
#[derive(Debug, Clone)]
struct FileSpec {
    mode: u32,
    mtime: i64,
    nsec: u32,
    content: Vec<u8>,
    /// Hardlink group, and how many names the inode has at the source.
    link: Option<(u64, u32)>,
    /// Listed as sparse (it has a hole the source doesn't send).
    sparse: bool,
    /// The changed `big`: a delta if the session asks for deltas.
    delta: bool,
    /// The basis's (and destination's) `a`: never fetched.
    known: bool,
}

#[derive(Debug, Clone)]
enum Node {
    Dir(BTreeMap<Vec<u8>, Node>),
    File(FileSpec),
    Symlink(Vec<u8>),
}

/// An honest session: the listing, then every fetch answered in order.
#[derive(Debug, Clone)]
struct Honest {
    steps: Vec<Step>,
    /// What the destination must hold afterwards (relative path → node).
    expect: Vec<(String, Node)>,
}

/// A random tree of at most a few levels: directories `sN`, files `fNN`
/// (some hardlinked together, some sparse), symlinks `lN`, and maybe `big`
/// at the top, a changed version of the basis's `big` (a delta if asked).
fn tree() -> BoxedStrategy<Node> {
    let file = (
        select(vec![0o644u32, 0o600, 0o4755, 0o640]),
        0i64..1000,
        0u32..1_000_000_000,
        prop_oneof![3 => 0usize..3000, 1 => 0usize..300_000],
        any::<u64>(),
        proptest::option::weighted(0.25, 0usize..3),
    )
        .prop_map(|(mode, dt, nsec, len, seed, hole)| {
            let mut content = noise(seed | 1, len);
            if let Some(h) = hole {
                // A hole: zeros the source won't send.
                let (a, b) = (len * h / 4, len * (h + 1) / 4 + len / 8);
                content[a..b.min(len)].fill(0);
            }
            FileSpec {
                mode,
                mtime: T0 + dt,
                nsec,
                content,
                link: None,
                sparse: hole.is_some(),
                delta: false,
                known: false,
            }
        });
    let leaf = prop_oneof![
        4 => file.prop_map(Node::File),
        1 => select(vec![&b"target"[..], b"../outside", b"/etc/passwd"]).prop_map(|t| Node::Symlink(t.to_vec())),
    ];
    leaf.prop_recursive(3, 40, 8, |inner| {
        vec(inner, 0..8)
            .prop_map(|children| {
                let mut map = BTreeMap::new();
                for (i, c) in children.into_iter().enumerate() {
                    let name = match &c {
                        Node::File(_) => format!("f{i:02}"),
                        Node::Symlink(_) => format!("l{i:02}"),
                        Node::Dir(_) => format!("s{i:02}"),
                    };
                    map.insert(name.into_bytes(), c);
                }
                Node::Dir(map)
            })
            .boxed()
    })
    .prop_map(|n| match n {
        Node::Dir(_) => n,
        leaf => Node::Dir(BTreeMap::from([(b"f00".to_vec(), leaf)])),
    })
    .boxed()
}

fn honest_session() -> BoxedStrategy<(Setup, Honest)> {
    (
        setup(),
        tree(),
        proptest::option::weighted(0.5, (0usize..100_000, any::<u8>())),
        any::<bool>(),
        vec(0u64..3, 0..12),
        any::<u64>(),
    )
        .prop_map(|(s, mut root, big, with_known, groups, chunk_seed)| {
            let Node::Dir(top) = &mut root else { unreachable!() };
            if let Some((at, byte)) = big {
                let mut content = basis_big();
                content[at] ^= byte | 1;
                content.extend_from_slice(b"grown");
                top.insert(
                    b"big".to_vec(),
                    Node::File(FileSpec {
                        mode: 0o644,
                        mtime: T0 + 7,
                        nsec: 0,
                        content,
                        link: None,
                        sparse: false,
                        delta: s.delta,
                        known: false,
                    }),
                );
            }
            if with_known {
                let content = noise(1, 10_000);
                let a = FileSpec {
                    mode: 0o644,
                    mtime: T0,
                    nsec: 0,
                    content,
                    link: None,
                    sparse: false,
                    delta: false,
                    known: true,
                };
                top.insert(b"a".to_vec(), Node::File(a));
            }
            assign_groups(&mut root, &groups);
            let honest = build(&root, &s, chunk_seed);
            (s, honest)
        })
        .boxed()
}

/// Puts files (in listing order, from the third on) into hardlink groups:
/// every member of a group gets the first member's content and metadata.
fn assign_groups(root: &mut Node, groups: &[u64]) {
    fn files<'a>(n: &'a mut Node, out: &mut Vec<&'a mut FileSpec>) {
        match n {
            Node::Dir(children) => children.values_mut().for_each(|c| files(c, out)),
            Node::File(f) if !f.delta && !f.known => out.push(f),
            _ => {}
        }
    }
    let mut all = Vec::new();
    files(root, &mut all);
    let mut firsts: BTreeMap<u64, FileSpec> = BTreeMap::new();
    let picked: Vec<(usize, u64)> = groups.iter().enumerate().map(|(i, g)| (i * 2 + 2, *g)).collect();
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for (i, g) in &picked {
        if *i < all.len() {
            *counts.entry(*g).or_default() += 1;
        }
    }
    for (i, g) in picked {
        let Some(f) = all.get_mut(i) else { continue };
        let first = firsts.entry(g).or_insert_with(|| (**f).clone());
        **f = FileSpec { link: Some((g, counts[&g] + 1)), ..first.clone() };
    }
}

/// The listing of `root` and the answers to the fetches it causes, in order.
fn build(root: &Node, s: &Setup, chunk_seed: u64) -> Honest {
    let mut listing = Vec::new();
    let mut fetches: Vec<FileSpec> = Vec::new();
    let mut expect = Vec::new();
    let mut seen_groups = std::collections::BTreeSet::new();
    fn walk(
        name: &[u8],
        rel: &str,
        node: &Node,
        listing: &mut Vec<Entry>,
        fetches: &mut Vec<FileSpec>,
        expect: &mut Vec<(String, Node)>,
        seen: &mut std::collections::BTreeSet<u64>,
    ) {
        let join = |n: &[u8]| {
            if rel.is_empty() {
                String::from_utf8_lossy(n).into_owned()
            } else {
                format!("{rel}/{}", String::from_utf8_lossy(n))
            }
        };
        match node {
            Node::Dir(children) => {
                let meta = Meta { mode: 0o755, mtime: T0, ..Meta::default() };
                listing.push(Entry::Dir { name: name.to_vec(), meta, unreadable: None, partial: false });
                for (n, c) in children {
                    let crel = join(n);
                    expect.push((crel.clone(), c.clone()));
                    walk(n, &crel, c, listing, fetches, expect, seen);
                }
                listing.push(Entry::End);
            }
            Node::File(f) => {
                let meta = Meta { mode: f.mode, mtime: f.mtime, mtime_nsec: f.nsec, ..Meta::default() };
                let link = f.link.map(|(id, nlink)| Link { id, nlink });
                let size = f.content.len() as u64;
                listing.push(Entry::File { name: name.to_vec(), meta, size, sparse: f.sparse, link });
                if !f.known && f.link.is_none_or(|(id, _)| seen.insert(id)) {
                    fetches.push(f.clone());
                }
            }
            Node::Symlink(t) => {
                let meta = Meta { mode: 0o777, mtime: T0, ..Meta::default() };
                listing.push(Entry::Symlink { name: name.to_vec(), meta, target: t.clone() });
            }
        }
    }
    walk(b"", "", root, &mut listing, &mut fetches, &mut expect, &mut seen_groups);
    let mut steps = Vec::new();
    // Batches of a few entries, as a source sends them.
    for batch in listing.chunks(5) {
        steps.push(Step::Msg(SourceMsg::Entries(batch.to_vec())));
    }
    steps.push(Step::Msg(SourceMsg::ListingDone));
    if !s.dry_run {
        let mut chunk = chunk_seed;
        for (id, f) in fetches.iter().enumerate() {
            let id = id as u64;
            let size = f.content.len() as u64;
            steps.push(Step::Msg(SourceMsg::FileBegin { id, size }));
            // What the sink computes its delta against: the destination's
            // own `big` where it has one, else the basis's.
            let delta = f.delta;
            if delta {
                let base = if s.fresh { basis_big() } else { dest_big() };
                let block_size = rbackup::plan::signature_block_size(base.len() as u64).unwrap();
                let sig = fast_rsync::Signature::calculate(
                    &base,
                    fast_rsync::SignatureOptions { block_size, crypto_hash_size: 8 },
                );
                let mut d = Vec::new();
                fast_rsync::diff(&sig.index(), &f.content, &mut d).unwrap();
                steps.push(Step::Delta { out_len: size as u32, delta: d });
            } else {
                let mut at = 0usize;
                while at < f.content.len() {
                    chunk = chunk.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let n = (1 + (chunk >> 33) as usize % 70_000).min(f.content.len() - at);
                    let piece = &f.content[at..at + n];
                    if piece.iter().any(|&b| b != 0) {
                        steps.push(Step::Frame { kind: 2, body: [&(at as u64).to_le_bytes()[..], piece].concat() });
                    }
                    at += n;
                }
            }
            let hash = Some(rbackup::digest::of_bytes(&f.content));
            steps.push(Step::Msg(SourceMsg::FileEnd { id, status: ReadStatus::Complete, hash }));
        }
    }
    Honest { steps, expect }
}

/// A change to an honest session.
#[derive(Debug, Clone)]
enum Mutation {
    Drop(Index),
    Repeat(Index),
    Swap(Index),
    Replace(Index, Step),
    Insert(Index, Step),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::Drop),
        any::<Index>().prop_map(Mutation::Repeat),
        any::<Index>().prop_map(Mutation::Swap),
        (any::<Index>(), step()).prop_map(|(i, s)| Mutation::Replace(i, s)),
        (any::<Index>(), step()).prop_map(|(i, s)| Mutation::Insert(i, s)),
    ]
    .boxed()
}

fn mutate(mut steps: Vec<Step>, mutations: &[Mutation]) -> Vec<Step> {
    for m in mutations {
        if steps.is_empty() {
            break;
        }
        let n = steps.len();
        match m {
            Mutation::Drop(i) => {
                steps.remove(i.index(n));
            }
            Mutation::Repeat(i) => {
                let s = steps[i.index(n)].clone();
                steps.insert(i.index(n), s);
            }
            Mutation::Swap(i) => {
                let i = i.index(n);
                steps.swap(i, (i + 1) % n);
            }
            Mutation::Replace(i, s) => steps[i.index(n)] = s.clone(),
            Mutation::Insert(i, s) => steps.insert(i.index(n + 1), s.clone()),
        }
    }
    steps
}

// --------------------------------------------------------------- running

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("RBACKUP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    let seed = std::env::var("RBACKUP_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED_0011);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Checks that the destination holds what an honest session listed.
fn assert_written(area: &Area, expect: &[(String, Node)]) {
    let dest = area.path("area/dest");
    for (rel, node) in expect {
        let p = dest.join(rel);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{rel} is missing: {e}"));
        match node {
            Node::Dir(_) => assert!(md.is_dir(), "{rel} is not a directory"),
            Node::Symlink(t) => {
                assert_eq!(std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes(), *t, "{rel}")
            }
            Node::File(f) => {
                assert!(md.is_file(), "{rel} is not a file");
                assert!(std::fs::read(&p).unwrap() == f.content, "{rel} has other content");
                assert_eq!(md.permissions().mode() & 0o7777, f.mode, "{rel}: mode");
                assert_eq!((md.mtime(), md.mtime_nsec() as u32), (f.mtime, f.nsec), "{rel}: mtime");
            }
        }
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// The generator is worth something only if honest sessions get deep:
    /// each must succeed and write exactly what was listed.
    #[test]
    fn honest_sessions_succeed_and_write_what_was_listed((s, honest) in honest_session()) {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let (area, ran) = check_session(&s, &honest.steps, None, None);
        if let Err(e) = &ran.result {
            panic!("an honest session failed: {e:#}");
        }
        if !s.dry_run {
            assert_written(&area, &honest.expect);
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    /// Honest sessions broken in a few places, and sessions of random steps:
    /// whatever the outcome, the checks of `check_session` hold.
    #[test]
    fn any_session_ends_without_panic_or_writes_outside(
        (s, steps) in prop_oneof![
            (honest_session(), vec(mutation(), 1..4)).prop_map(|((s, h), m)| (s, mutate(h.steps, &m))),
            (setup(), hostile_session()),
        ],
        cut in proptest::option::weighted(0.1, any::<Index>()),
        flip in proptest::option::weighted(0.1, (any::<Index>(), any::<u8>())),
    ) {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        check_session(&s, &steps, cut, flip);
    }
}

/// `n` regular files in batches of `batch`, after the root.
fn flood(n: usize, batch: usize) -> Vec<Step> {
    let meta = Meta { mode: 0o644, mtime: T0, ..Meta::default() };
    let mut steps = vec![Step::Msg(SourceMsg::Entries(vec![root()]))];
    let names: Vec<Vec<u8>> = (0..n).map(|i| format!("f{i:08}").into_bytes()).collect();
    for chunk in names.chunks(batch.max(1)) {
        let entries = chunk
            .iter()
            .map(|name| Entry::File { name: name.clone(), meta: meta.clone(), size: 1, sparse: false, link: None })
            .collect();
        steps.push(Step::Msg(SourceMsg::Entries(entries)));
    }
    steps
}

proptest! {
    #![proptest_config(config(6))]

    /// A source that lists without waiting for credit would grow the fetch
    /// queue with every entry: it is refused at the first batch beyond what
    /// was granted, and memory stays flat however long the flood.
    #[test]
    fn a_listing_beyond_its_credit_is_refused_with_flat_memory(
        s in setup(),
        n in 5_000usize..300_000,
        batch in prop_oneof![Just(256usize), 1usize..4096],
    ) {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let s = Setup { dry_run: false, ..s };
        let (_area, ran) = check_session(&s, &flood(n, batch), None, None);
        let err = format!("{:#}", ran.result.expect_err("a flood must be refused"));
        prop_assert!(err.contains("were granted"), "{}", err);
    }
}

/// One frame, within the size limit, holding as many entries as fit: each
/// decoded entry takes many times its wire size. Refused before it is
/// decoded, so a source can't make the desktop hold frames' worth of that.
#[test]
fn a_frame_of_tiny_entries_is_refused_without_decoding_it() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let meta = Meta::default();
    let tiny: Vec<Entry> = (0..600_000)
        .map(|_| Entry::File { name: b"f".to_vec(), meta: meta.clone(), size: 0, sparse: false, link: None })
        .collect();
    let mut steps = vec![Step::Msg(SourceMsg::Entries(vec![root()]))];
    steps.extend((0..3).map(|_| Step::Msg(SourceMsg::Entries(tiny.clone()))));
    drop(tiny);
    let s = Setup {
        policy: Policy::Snapshot,
        fresh: true,
        delete: true,
        dry_run: false,
        devices: false,
        delta: false,
        compress: true,
        manifest: false,
    };
    let wire = encode(&steps, true);
    drop(steps);
    let area = Area::new(true);
    let ran = run_session(&area, &s, wire);
    let err = format!("{:#}", ran.result.expect_err("refused"));
    assert!(err.contains("undecodable message"), "{err}");
    assert!(ran.peak <= 16 << 20, "peaked at {} bytes ({err})", ran.peak);
}
