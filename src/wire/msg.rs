//! The messages both sides exchange, and the checks every received one passes
//! before anything acts on it (docs/design.md rule 2: the peer is hostile).
//!
//! Roles: the *source* walks a tree and serves file data; the *sink* plans
//! against what it already has and writes. In a backup the agent on the server
//! is the source; in a restore it is the sink.

use serde::{Deserialize, Serialize};

use crate::fs::bounded::Bounded;
pub use crate::fs::meta::SpecialKind;
use crate::fs::meta::{Meta, XATTR_VALUE_MAX, is_managed_xattr};
use crate::fs::safefs::{NameError, check_name};

/// What the desktop asks of the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent reads and sends (backup).
    Source,
    /// The agent receives and writes (restore).
    Sink,
    /// The agent takes replicas into its backups folder, append-only
    /// (`serve --append-only`): what it does is [`Hello::replica`].
    Replica,
}

/// First message of the desktop, after the preambles.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Hello {
    pub role: Role,
    /// The absolute path on the agent's side to serve or write.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub options: SessionOptions,
    /// The desktop's rbackup version, for messages.
    pub version: String,
    /// With [`Role::Replica`]: what the desktop asks of the append-only agent.
    pub replica: Option<ReplicaAsk>,
}

/// What a desktop may ask of an append-only agent: nothing else exists to
/// ask (docs/replicate.md). The agent checks both names before it answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAsk {
    /// Which snapshot folders of job `name` it holds: answered with
    /// [`SinkMsg::Held`] after the welcome.
    List { name: String },
    /// Take the replica of the snapshot `NAME.dd-mm-yy_hh-mm-ss` (a stamp
    /// with no complete snapshot there): the desktop sends the original's
    /// manifest ([`SourceMsg::Manifest`], [`SourceMsg::ManifestEnd`]), then
    /// serves the snapshot as a backup's source; the agent answers the
    /// session's end with [`SinkMsg::Committed`] or [`SinkMsg::Fatal`].
    Write { folder: String },
}

/// Options of one session, set by the desktop.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct SessionOptions {
    /// zstd on the wire in both directions.
    pub compress: bool,
    /// Gitignore-style patterns, relative to the served root (source role).
    #[serde(deserialize_with = "bounded_excludes")]
    pub excludes: Vec<String>,
    /// Only these relative paths (and the directories leading to them) are
    /// listed; empty means everything (source role: a job's `paths`). They
    /// are walked to beneath the root like everything else, one name at a
    /// time from the parent's handle, so they cannot climb out of it.
    #[serde(deserialize_with = "bounded_only")]
    pub only: Vec<Vec<u8>>,
    /// Sink role: create device nodes.
    pub devices: bool,
    /// Sink role: remove what the destination has and the source doesn't.
    pub delete: bool,
    /// Sink role: report what would happen, change nothing.
    pub dry_run: bool,
    /// Sink role: ask for deltas of changed files (worth it over a network).
    pub delta: bool,
    /// Source role: open every regular file while listing, and list the ones
    /// that can't be read as such (`rbackup check`).
    pub probe_read: bool,
    /// Source role: don't descend into directories on another filesystem
    /// than the root's; list such a mount point as an empty directory.
    pub one_file_system: bool,
    /// Source role: bytes per second the source sends at most, on average;
    /// 0 for no limit.
    pub bwlimit: u64,
}

/// Most exclude patterns, and most chosen paths, a hello may carry, and the
/// bytes each list may hold in all: far beyond any real job, well within
/// what the agent can afford to hold (docs/design.md rule 2: the agent
/// trusts nothing the desktop sends).
pub const PATTERNS_MAX: usize = 65_536;
/// See [`PATTERNS_MAX`].
pub const PATTERNS_BYTES_MAX: usize = 4 << 20;

fn bounded_excludes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_seq(Bounded {
        limit: PATTERNS_MAX,
        what: "at most 65536 exclude patterns of 4 MiB in all",
        cost: String::len,
        budget: PATTERNS_BYTES_MAX,
        item: std::marker::PhantomData,
    })
}

fn bounded_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
    d.deserialize_seq(Bounded {
        limit: PATTERNS_MAX,
        what: "at most 65536 chosen paths of 4 MiB in all",
        cost: Vec::len,
        budget: PATTERNS_BYTES_MAX,
        item: std::marker::PhantomData,
    })
}

/// The agent's answer to [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Reply {
    Welcome {
        /// The root actually served, as the agent resolved it.
        #[serde(with = "serde_bytes")]
        root: Vec<u8>,
        version: String,
    },
    Refused {
        reason: String,
    },
}

/// Why the source left something out of its listing.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// It disappeared between reading the directory and looking at it.
    Vanished,
    /// The source could not look at it (e.g. permission denied).
    Unreadable(String),
    /// A socket: nothing to back up.
    Socket,
}

/// Hardlink membership: entries with the same `id` are one inode at the source.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub id: u64,
    /// Links the inode has at the source (some may be outside the tree).
    pub nlink: u32,
}

/// One item of the listing, in depth-first order, names sorted bytewise
/// within a directory. A `Dir` opens a directory; its children follow until
/// the matching `End`. The first entry is the root `Dir` with an empty name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        meta: Meta,
        /// Set if the directory could not be listed; no children follow.
        unreadable: Option<String>,
        /// Only some children are listed (a restore of chosen paths): the sink
        /// must not remove what is not listed.
        partial: bool,
    },
    End,
    File {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        meta: Meta,
        size: u64,
        /// Allocated less than its size: fetch it by data extents.
        sparse: bool,
        link: Option<Link>,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        meta: Meta,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Special {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        meta: Meta,
        kind: SpecialKind,
        rdev: u64,
    },
    Skipped {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        reason: SkipReason,
    },
}

impl Entry {
    /// The entry's name; `None` for `End`.
    pub fn name(&self) -> Option<&[u8]> {
        match self {
            Entry::Dir { name, .. }
            | Entry::File { name, .. }
            | Entry::Symlink { name, .. }
            | Entry::Special { name, .. }
            | Entry::Skipped { name, .. } => Some(name),
            Entry::End => None,
        }
    }

    /// The entry's metadata; `None` for `End` and `Skipped`.
    pub fn meta(&self) -> Option<&Meta> {
        match self {
            Entry::Dir { meta, .. }
            | Entry::File { meta, .. }
            | Entry::Symlink { meta, .. }
            | Entry::Special { meta, .. } => Some(meta),
            Entry::Skipped { .. } | Entry::End => None,
        }
    }
}

/// How reading a file went at the source.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ReadStatus {
    Complete,
    /// The file changed while it was read (size or mtime moved): what arrived
    /// is kept, with a warning, and the next run fetches it again.
    Changed,
}

/// Why the source could not send a requested file.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    Vanished,
    /// Permission denied: the backup user can't read it.
    Unreadable(String),
    /// It is no longer a regular file, or another error.
    Other(String),
}

/// Most entries one listing batch may hold. A sink never has more listing
/// credit outstanding than this, so a longer batch is always a violation.
/// It is refused while decoding, before the entries exist: an entry takes
/// about ten times its wire size in memory, so one frame of tiny entries
/// would otherwise cost ~80 MB, and the reader's look-ahead holds dozens of
/// frames.
pub const BATCH_MAX: usize = 4096;

/// Source to sink.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum SourceMsg {
    Entries(#[serde(deserialize_with = "bounded_batch")] Vec<Entry>),
    ListingDone,
    /// Data of fetch `id` follows (data or delta frames), then `FileEnd`.
    FileBegin {
        id: u64,
        size: u64,
    },
    FileEnd {
        id: u64,
        status: ReadStatus,
        /// The content digest (version 2, [`crate::digest`]) of the whole
        /// file, as a file of the size `FileBegin` announced: of what was
        /// sent, and of the prefix a resumed fetch did not send.
        hash: Option<[u8; 32]>,
    },
    FileFailed {
        id: u64,
        error: ReadError,
    },
    /// The source hit an error it can't go on from.
    Fatal(String),
    /// Like `FileBegin`, for a fetch that asked to resume at `offset`: the
    /// data frames start there, the sink keeps its first `offset` bytes. (A
    /// source that can't resume — the file is now shorter — answers with
    /// `FileBegin` and sends the whole file.)
    FileResume {
        id: u64,
        size: u64,
        offset: u64,
    },
    /// The source is still reading the prefix of resumed fetch `id` to hash
    /// it (`done` bytes so far): a sign of life while no data moves, so that
    /// a long prefix never looks like a dead peer (`io_timeout`).
    Hashing {
        id: u64,
        done: u64,
    },
    /// A piece of the original's manifest, before a replica's session
    /// ([`ReplicaAsk::Write`]), in order.
    Manifest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The original's manifest is whole; `present: false`: it has none.
    ManifestEnd {
        present: bool,
    },
}

/// Most extended attributes one listing batch may hold. An attribute takes
/// about ten times its smallest wire size in memory, like an entry, so a
/// batch of attribute-laden tiny entries is bounded by this and not by the
/// frame size (the source flushes a batch before it would pass it).
pub const BATCH_XATTRS_MAX: usize = 16_384;

/// Decodes a listing batch of at most [`BATCH_MAX`] entries holding at most
/// [`BATCH_XATTRS_MAX`] extended attributes.
fn bounded_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    let bounds = Bounded {
        limit: BATCH_MAX,
        what: "a listing batch of at most 4096 entries and 16384 extended attributes",
        cost: |e: &Entry| e.meta().map_or(0, |m| m.xattrs.len()),
        budget: BATCH_XATTRS_MAX,
        item: std::marker::PhantomData,
    };
    d.deserialize_seq(bounds)
}

/// Sink to source.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum SinkMsg {
    /// The source may send this many more listing entries.
    Credit(u32),
    Fetch(Fetch),
    /// A line for the desktop (the agent as sink reports through this).
    Log {
        kind: LogKind,
        text: String,
    },
    /// The sink is done; nothing more will be asked.
    Finish {
        summary: Vec<(String, u64)>,
    },
    /// The sink hit an error it can't go on from.
    Fatal(String),
    /// The append-only agent's answer to [`ReplicaAsk::List`]: folder names.
    Held(Vec<String>),
    /// The append-only agent checked the replica against the original's
    /// manifest and named it complete as `folder`; `problems`: entries it
    /// could not take as they are (each logged on its side).
    Committed {
        folder: String,
        problems: u64,
    },
}

/// What a [`SinkMsg::Log`] line is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// `verb path`: an action (the dry-run listing, or -vv output).
    Action,
    /// A problem with one entry (counts toward the exit code).
    Problem,
    /// Something to tell the admin.
    Note,
}

/// A request for one file's data.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Fetch {
    pub id: u64,
    /// `/`-separated path relative to the served root.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// An rsync signature of the sink's basis: answer with delta windows.
    #[serde(with = "serde_bytes")]
    pub signature: Option<Vec<u8>>,
    /// The sink holds the file's first `offset` bytes from an interrupted
    /// fetch: send from there (`SourceMsg::FileResume`); 0 for the whole file.
    pub offset: u64,
}

/// What is wrong with a received entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("bad name {name:?}: {err}")]
    Name { name: String, err: NameError },
    #[error("mode {0:o} has bits beyond 07777")]
    Mode(u32),
    #[error("bad extended attribute {0:?}")]
    Xattr(String),
    #[error("bad symlink target: {0}")]
    Target(&'static str),
    #[error("nanoseconds {0} out of range")]
    Nanos(u32),
    #[error("size {0} out of range")]
    Size(u64),
    #[error("hardlink count {0} is below 2")]
    Nlink(u32),
}

const XATTRS_MAX_TOTAL: usize = 4 << 20;

fn check_meta(meta: &Meta) -> Result<(), EntryError> {
    if meta.mode & !crate::fs::meta::MODE_BITS != 0 {
        return Err(EntryError::Mode(meta.mode));
    }
    if meta.mtime_nsec >= 1_000_000_000 {
        return Err(EntryError::Nanos(meta.mtime_nsec));
    }
    let mut total = 0;
    let mut prev: Option<&[u8]> = None;
    for x in &meta.xattrs {
        let shown = || String::from_utf8_lossy(&x.name).into_owned();
        if x.name.is_empty() || x.name.len() > 255 || x.name.contains(&0) || !is_managed_xattr(&x.name) {
            return Err(EntryError::Xattr(shown()));
        }
        if x.value.len() > XATTR_VALUE_MAX {
            return Err(EntryError::Xattr(shown()));
        }
        // Sorted and unique, so comparisons with what is on disk are exact.
        if prev.is_some_and(|p| p >= x.name.as_slice()) {
            return Err(EntryError::Xattr(shown()));
        }
        prev = Some(&x.name);
        total += x.name.len() + x.value.len();
    }
    if total > XATTRS_MAX_TOTAL {
        return Err(EntryError::Xattr("(total size)".into()));
    }
    Ok(())
}

/// Largest symlink target Linux stores.
pub const TARGET_MAX: usize = 4095;

impl Entry {
    /// Checks everything the sink relies on. The root `Dir` (empty name) is
    /// checked by the caller, which knows whether it is first.
    pub fn validate(&self, is_root: bool) -> Result<(), EntryError> {
        if let Some(name) = self.name()
            && !(is_root && name.is_empty())
        {
            check_name(name)
                .map_err(|err| EntryError::Name { name: String::from_utf8_lossy(name).into_owned(), err })?;
        }
        match self {
            Entry::Dir { meta, .. } | Entry::Special { meta, .. } => check_meta(meta),
            Entry::File { meta, size, link, .. } => {
                check_meta(meta)?;
                if *size > i64::MAX as u64 {
                    return Err(EntryError::Size(*size));
                }
                if let Some(l) = link
                    && l.nlink < 2
                {
                    return Err(EntryError::Nlink(l.nlink));
                }
                Ok(())
            }
            Entry::Symlink { meta, target, .. } => {
                check_meta(meta)?;
                if target.is_empty() {
                    return Err(EntryError::Target("empty"));
                }
                if target.len() > TARGET_MAX {
                    return Err(EntryError::Target("longer than 4095 bytes"));
                }
                if target.contains(&0) {
                    return Err(EntryError::Target("contains NUL"));
                }
                Ok(())
            }
            Entry::Skipped { .. } | Entry::End => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::Xattr;

    fn meta() -> Meta {
        Meta { mode: 0o644, ..Meta::default() }
    }

    #[test]
    fn valid_entries_pass() {
        let e = Entry::File { name: b"a\xff".to_vec(), meta: meta(), size: 3, sparse: false, link: None };
        e.validate(false).unwrap();
        let root = Entry::Dir { name: vec![], meta: meta(), unreadable: None, partial: false };
        root.validate(true).unwrap();
        assert!(root.validate(false).is_err());
    }

    #[test]
    fn a_batch_longer_than_any_credit_is_refused_while_decoding() {
        let entry = Entry::File { name: b"f".to_vec(), meta: meta(), size: 0, sparse: false, link: None };
        let full = postcard::to_stdvec(&SourceMsg::Entries(vec![entry.clone(); BATCH_MAX])).unwrap();
        assert!(matches!(postcard::from_bytes(&full), Ok(SourceMsg::Entries(b)) if b.len() == BATCH_MAX));
        let over = postcard::to_stdvec(&SourceMsg::Entries(vec![entry; BATCH_MAX + 1])).unwrap();
        assert!(postcard::from_bytes::<SourceMsg>(&over).is_err());
    }

    /// Regression (found by the sink fuzz target): one 2.3 KB compressed
    /// frame holding an entry with 2.7 M one-byte attributes decoded to
    /// 152 MB before validation refused it. Attributes are bounded while
    /// decoding: per entry by what Linux can list, per batch by a budget the
    /// source keeps to.
    #[test]
    fn attributes_beyond_what_linux_lists_or_a_batch_holds_are_refused_while_decoding() {
        let with = |n: usize| {
            let mut m = meta();
            m.xattrs = (0..n).map(|i| Xattr { name: format!("user.{i}").into_bytes(), value: vec![] }).collect();
            Entry::File { name: b"f".to_vec(), meta: m, size: 0, sparse: false, link: None }
        };
        let decode = |batch: Vec<Entry>| {
            postcard::from_bytes::<SourceMsg>(&postcard::to_stdvec(&SourceMsg::Entries(batch)).unwrap())
        };
        assert!(matches!(decode(vec![with(crate::fs::meta::XATTRS_MAX)]), Ok(SourceMsg::Entries(b)) if b.len() == 1));
        assert!(decode(vec![with(crate::fs::meta::XATTRS_MAX + 1)]).is_err());
        // Two entries within the per-entry bound, beyond the batch's.
        let half = BATCH_XATTRS_MAX / 2 + 1;
        assert!(decode(vec![with(half)]).is_ok());
        assert!(decode(vec![with(half), with(half)]).is_err());
    }

    #[test]
    fn a_hello_with_more_patterns_or_paths_than_the_bounds_is_refused_while_decoding() {
        let hello = |options: SessionOptions| {
            let h = Hello { role: Role::Source, path: b"/".to_vec(), options, version: "x".into(), replica: None };
            postcard::from_bytes::<Hello>(&postcard::to_stdvec(&h).unwrap())
        };
        let ok = SessionOptions {
            excludes: vec!["*.tmp".into(); 3],
            only: vec![b"etc".to_vec()],
            bwlimit: 5,
            ..Default::default()
        };
        let back = hello(ok).unwrap();
        assert_eq!((back.options.excludes.len(), back.options.bwlimit), (3, 5));
        assert!(
            hello(SessionOptions { excludes: vec![String::new(); PATTERNS_MAX + 1], ..Default::default() }).is_err()
        );
        assert!(hello(SessionOptions { only: vec![Vec::new(); PATTERNS_MAX + 1], ..Default::default() }).is_err());
        let big = vec![vec![b'a'; 1 << 20]; 5];
        assert!(hello(SessionOptions { only: big, ..Default::default() }).is_err());
    }

    #[test]
    fn hostile_entries_fail() {
        for name in [&b""[..], b".", b"..", b"a/b", b"/etc", b"a\0"] {
            let e = Entry::File { name: name.to_vec(), meta: meta(), size: 0, sparse: false, link: None };
            assert!(e.validate(false).is_err(), "{name:?}");
        }
        let mut m = meta();
        m.mode = 0o170_644;
        assert!(
            Entry::Special { name: b"x".to_vec(), meta: m, kind: SpecialKind::Fifo, rdev: 0 }.validate(false).is_err()
        );
        let mut m = meta();
        m.xattrs = vec![Xattr { name: b"system.evil".to_vec(), value: vec![] }];
        assert!(Entry::Dir { name: b"d".to_vec(), meta: m, unreadable: None, partial: false }.validate(false).is_err());
        let mut m = meta();
        m.xattrs =
            vec![Xattr { name: b"user.b".to_vec(), value: vec![] }, Xattr { name: b"user.a".to_vec(), value: vec![] }];
        assert!(Entry::Dir { name: b"d".to_vec(), meta: m, unreadable: None, partial: false }.validate(false).is_err());
        let s = Entry::Symlink { name: b"l".to_vec(), meta: meta(), target: b"a\0b".to_vec() };
        assert!(s.validate(false).is_err());
        let f = Entry::File {
            name: b"f".to_vec(),
            meta: meta(),
            size: 1,
            sparse: false,
            link: Some(Link { id: 1, nlink: 1 }),
        };
        assert!(f.validate(false).is_err());
    }
}
