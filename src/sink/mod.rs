//! The sink side of a session: take the source's listing, compare each entry
//! with what the destination and the bases hold, and write through
//! [`crate::fs::writer`]. The desktop runs this for a backup; the agent runs it
//! for a restore.
//!
//! The listing arrives depth first. Each open directory has a node that lives
//! until its listing has ended *and* every fetch inside it has been written;
//! then whatever the source no longer has is removed (when the policy says
//! so) and the directory gets its metadata — after its children, so their
//! creation can't disturb its mtime. Fetches are pipelined: requests go out
//! as soon as the plan says so, data comes back in request order, and the
//! listing keeps flowing as long as fewer than [`WINDOW`] fetches are waiting.
//! Memory is flat in the number of files: per open directory, its name and
//! the names seen (only where extra entries must be found), and the pending
//! fetches.
//!
//! Descriptors are bounded whatever the depth: the destination and each
//! basis are walked as [`Chain`]s (handles for the root and the deepest
//! `HELD_LEVELS` directories of the stack), and a directory off that part of
//! the stack — a finished listing still waiting for its fetches, or a level
//! whose handle was let go — is opened again when a fetch or its metadata
//! needs it, with up to `HELD_LEVELS - 1` ancestors at once, into a spare set
//! of at most `HELD_LEVELS` handles. About 100 descriptors in all, with two
//! bases and the look-ahead's own chains.

mod ahead;
mod credit;
mod dirs;
mod fetch;
mod files;
mod links;
mod receive;
mod record;

pub use ahead::Input;
pub use record::{ManifestSet, Recorder};

use credit::Credit;
use dirs::DirNode;
use fetch::Pending;
use links::Group;

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;

use anyhow::{Result, anyhow, bail};

use crate::fs::meta::{self, Privileges};
use crate::fs::safefs::{Chain, Dir, Shown};
use crate::plan::{Policy, Similarity};
use crate::report::{Action, Events, Problem, ProblemKind, Stats};
use crate::wire::frame::{Encoder, FrameReader};
use crate::wire::msg::{Entry, SinkMsg, SourceMsg, SpecialKind};
use crate::wire::{Outbox, ProtocolError};

/// Most fetches waiting for data before the listing is held back.
pub const WINDOW: usize = 512;
/// Most manifest records held in memory before the listing is held back:
/// records are written in listing order, so all those after a file whose
/// data is still on its way wait with it (a large file, or a source that
/// never answers one fetch while it lists on).
const RECORDS_HELD_MAX: usize = 65_536;
/// Most hardlink groups followed at once. A group stays until its last
/// member is listed, which a hostile source may never do (and an honest
/// one doesn't, for files with links outside the root): beyond this, the
/// later members of new groups are stored as files of their own.
const GROUPS_MAX: usize = 100_000;
/// How often a sink waiting for input looks for a signal.
const TICK: std::time::Duration = std::time::Duration::from_millis(200);

/// Starts the thread that reads the source's frames for [`Sink::run`],
/// comparing listed files with the bases on the way (see `ahead`).
pub fn spawn_reader<R: Read + Send + 'static>(
    reader: FrameReader<R>,
    cfg: &SinkConfig,
) -> (Receiver<Result<Input, ProtocolError>>, Arc<AtomicU64>, JoinHandle<()>) {
    let bases = if cfg.policy == Policy::Snapshot { cfg.bases.clone() } else { Vec::new() };
    let mut ahead = ahead::Ahead::new(bases, cfg.privs);
    crate::wire::spawn_reader(reader, 64, move |frame| ahead.stage(frame))
}

/// How a sink writes.
pub struct SinkConfig {
    /// The root written to: a snapshot folder, or a restore target. `None`
    /// only in a dry run of a snapshot that doesn't exist yet.
    pub dest: Option<Dir>,
    /// `dest` was created empty for this run (nothing to compare or remove).
    pub fresh: bool,
    /// Trees to link or copy unchanged files from, best first.
    pub bases: Vec<Dir>,
    pub policy: Policy,
    /// Remove entries of existing directories that the source doesn't list.
    pub delete: bool,
    pub dry_run: bool,
    /// Create device nodes (otherwise counted and skipped).
    pub devices: bool,
    /// Ask for deltas of changed files that have a basis.
    pub delta: bool,
    pub privs: Privileges,
    pub compress: bool,
    /// The manifest to write, and those to carry hashes over from.
    pub recorder: Recorder,
    /// A restore leaves the metadata of its root as it was (a local folder
    /// that existed before the restore is the admin's, not the snapshot's).
    pub keep_root: bool,
}

impl Default for SinkConfig {
    /// A snapshot sink writing nowhere yet: a fresh destination, no bases,
    /// nothing removed, no deltas, this process's privileges, no manifest.
    /// Each session sets what differs.
    fn default() -> SinkConfig {
        SinkConfig {
            dest: None,
            fresh: true,
            bases: Vec::new(),
            policy: Policy::Snapshot,
            delete: false,
            dry_run: false,
            devices: false,
            delta: false,
            privs: Privileges::current(),
            compress: false,
            recorder: Recorder::default(),
            keep_root: false,
        }
    }
}

/// What a finished sink hands back.
pub struct SinkOutcome {
    pub stats: Stats,
    /// The manifest, complete but for its footer (see `ManifestWriter::finish`).
    pub manifest: Option<crate::store::manifest::ManifestWriter>,
}

/// The sink engine. See the module doc.
pub struct Sink<'e> {
    cfg: SinkConfig,
    events: &'e mut dyn Events,
    dirs: Vec<Option<DirNode>>,
    free: Vec<usize>,
    stack: Vec<usize>,
    /// The path of the directory on top of the stack, and where each
    /// level's path ends in it.
    cwd: Vec<u8>,
    cwd_ends: Vec<usize>,
    next_serial: u64,
    /// The destination directories along the stack, and the same directory
    /// in each basis, with a bounded number of descriptors (see `handles`).
    dest: Chain,
    bases: Vec<Chain>,
    /// Directories opened again off the held part of the stack (finished
    /// listings waiting for their fetches), by node serial; at most
    /// `HELD_LEVELS`.
    spare: VecDeque<(u64, Dir)>,
    /// Requests sent, in the order the source answers them.
    pending: VecDeque<Pending>,
    /// Delta requests waiting for the signature budget.
    deferred: VecDeque<Pending>,
    /// Bytes of signatures the source holds for requests not yet answered.
    sig_outstanding: usize,
    receiving: Option<receive::Receiving>,
    groups: HashMap<u64, Group>,
    next_id: u64,
    next_ticket: u64,
    rec: Recorder,
    out: Outbox,
    enc: Encoder,
    credit: Credit,
    saw_root: bool,
    root_done: bool,
    listing_done: bool,
    warned_devices: bool,
    /// A file was hashed again because its basis manifest is of format 1.
    noted_rehash: bool,
    /// A file was hashed because its basis manifest had no hash for it.
    noted_unhashed: bool,
    /// Entries whose mtime the destination can't hold (the first is a problem).
    unstorable_times: u64,
    noted_granularity: bool,
    noted_groups: bool,
    stats: Stats,
}

/// Where an entry goes: its directory in the destination, its name there,
/// and its path from the root (for messages).
struct At<'a> {
    dir: &'a Dir,
    name: &'a [u8],
    rel: &'a [u8],
}

fn violation(what: impl Into<String>) -> anyhow::Error {
    anyhow!(ProtocolError::Unexpected(what.into()))
}

impl<'e> Sink<'e> {
    pub fn new(mut cfg: SinkConfig, out: Outbox, events: &'e mut dyn Events) -> Sink<'e> {
        let enc = Encoder::new(cfg.compress);
        let rec = std::mem::take(&mut cfg.recorder);
        let dest = cfg.dest.clone().map_or_else(Chain::absent, Chain::new);
        let bases = cfg.bases.iter().cloned().map(Chain::new).collect();
        Sink {
            cfg,
            events,
            dirs: Vec::new(),
            free: Vec::new(),
            stack: Vec::new(),
            cwd: Vec::new(),
            cwd_ends: Vec::new(),
            next_serial: 0,
            dest,
            bases,
            spare: VecDeque::new(),
            pending: VecDeque::new(),
            deferred: VecDeque::new(),
            sig_outstanding: 0,
            receiving: None,
            groups: HashMap::new(),
            next_id: 0,
            next_ticket: 0,
            rec,
            out,
            enc,
            credit: Credit::default(),
            saw_root: false,
            root_done: false,
            listing_done: false,
            warned_devices: false,
            noted_rehash: false,
            noted_unhashed: false,
            unstorable_times: 0,
            noted_granularity: false,
            noted_groups: false,
            stats: Stats::default(),
        }
    }

    /// Runs the session to its end: the listing done, every fetch written,
    /// every directory finished. Returns the counters.
    pub fn run(mut self, incoming: &Receiver<Result<Input, ProtocolError>>) -> Result<SinkOutcome> {
        let first = self.credit.start();
        self.send(&SinkMsg::Credit(first))?;
        while !(self.listing_done
            && self.root_done
            && self.pending.is_empty()
            && self.deferred.is_empty()
            && self.receiving.is_none())
        {
            // A signal stops the run here, between two inputs: what is
            // written is whole, and a file still arriving is a temporary
            // entry — a snapshot's stays as partial data for the next run to
            // resume from (see `receive`), a restore's is removed.
            crate::interrupt::check()?;
            let input = match incoming.recv_timeout(TICK) {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => Err(ProtocolError::Closed),
            };
            // The connection may fail because of the signal (a Ctrl-C reaches
            // the agent too): say that the signal stopped the run.
            let input = input.map_err(|e| crate::interrupt::check().map_or_else(anyhow::Error::from, |()| e.into()))?;
            match input {
                Input::Entries(batch, sims) => self.on_entries(batch, sims)?,
                Input::Msg(msg) => self.on_message(msg)?,
                Input::Data { offset, data } => self.on_data(offset, &data)?,
                Input::Delta { out_len, delta } => self.on_delta(out_len, &delta)?,
            }
        }
        if self.unstorable_times > 1 {
            let n = self.unstorable_times - 1;
            self.events.note(&format!("{n} more entries have modification times the destination can't hold"));
        }
        let summary = self.stats.pairs();
        self.send(&SinkMsg::Finish { summary })?;
        Ok(SinkOutcome { stats: self.stats, manifest: self.rec.writer.take() })
    }

    /// A listing batch, with each file's comparison with the bases when the
    /// reader thread made it.
    fn on_entries(&mut self, batch: Vec<Entry>, sims: Vec<Option<Vec<Similarity>>>) -> Result<()> {
        let n = batch.len() as u32;
        self.credit.check(n)?;
        let mut sims = sims.into_iter();
        for entry in batch {
            self.on_entry(entry, sims.next().flatten())?;
        }
        self.credit.taken(n);
        self.events.progress(&self.stats);
        self.maybe_grant()
    }

    fn on_message(&mut self, msg: SourceMsg) -> Result<()> {
        match msg {
            // The reader thread hands batches over as `Input::Entries`.
            SourceMsg::Entries(batch) => self.on_entries(batch, Vec::new()),
            SourceMsg::ListingDone => {
                if !self.saw_root || !self.stack.is_empty() {
                    return Err(violation("the listing ended inside a directory"));
                }
                self.listing_done = true;
                self.stats.listing_done = true;
                self.events.progress(&self.stats);
                Ok(())
            }
            SourceMsg::FileBegin { id, size } => self.on_begin(id, size, None),
            SourceMsg::FileResume { id, size, offset } => self.on_begin(id, size, Some(offset)),
            SourceMsg::Hashing { id, done } => self.on_hashing(id, done),
            SourceMsg::FileEnd { id, status, hash } => self.on_end(id, &status, hash),
            SourceMsg::FileFailed { id, error } => self.on_failed(id, &error),
            SourceMsg::Fatal(message) => {
                bail!(crate::wire::PeerFailed { side: "sending", message: format!("{:#}", Shown(message.as_bytes())) })
            }
            SourceMsg::Manifest(_) | SourceMsg::ManifestEnd { .. } => {
                Err(violation("a manifest in the middle of a session"))
            }
        }
    }

    fn send(&mut self, msg: &SinkMsg) -> Result<()> {
        let frame = self.enc.msg(msg);
        Ok(self.out.send(frame)?)
    }

    /// Returns listing credit unless too many fetches are waiting.
    fn maybe_grant(&mut self) -> Result<()> {
        let full = self.pending.len() + self.deferred.len() >= WINDOW || self.rec.held() >= RECORDS_HELD_MAX;
        if let Some(n) = self.credit.due(full) {
            self.send(&SinkMsg::Credit(n))?;
        }
        Ok(())
    }

    /// Reports what is done to `rel`. A snapshot says how the entry gets
    /// there (link, copy, fetch…); a restore says what happens to the
    /// destination: create, replace, change (metadata only) or delete.
    fn act(&mut self, action: Action, rel: &[u8], replacing: bool) {
        let verb = match (self.cfg.policy, action) {
            (Policy::Snapshot, a) => a.snapshot_verb(),
            (Policy::Restore, Action::Remove) => "delete",
            (Policy::Restore, Action::Meta) => "change",
            (Policy::Restore, _) if replacing => "replace",
            (Policy::Restore, _) => "create",
        };
        self.events.action(verb, rel);
    }

    fn problem(&mut self, kind: ProblemKind, path: &[u8], detail: impl Into<String>) {
        self.stats.warnings += 1;
        self.events.problem(Problem::new(kind, path, detail));
    }

    fn apply_problems(&mut self, path: &[u8], problems: Vec<meta::ApplyProblem>) {
        for p in problems {
            self.problem(ProblemKind::Metadata, path, format!("{}: {}", p.what, p.error));
        }
    }

    fn on_entry(&mut self, entry: Entry, sims: Option<Vec<Similarity>>) -> Result<()> {
        let is_root = !self.saw_root;
        if self.saw_root && self.stack.is_empty() {
            return Err(violation("entries after the end of the root directory"));
        }
        entry.validate(is_root).map_err(|e| violation(format!("bad entry: {e}")))?;
        if is_root && !matches!(&entry, Entry::Dir { name, .. } if name.is_empty()) {
            return Err(violation("the listing must start with the root directory"));
        }
        if !matches!(entry, Entry::End) {
            self.stats.entries += 1;
        }
        self.note_unstorable_time(&entry);
        match entry {
            Entry::Dir { name, meta, unreadable, partial } => self.on_dir(&name, meta, unreadable, partial),
            Entry::End => self.on_end_dir(),
            Entry::File { name, meta, size, sparse, link } => self.on_file(name, meta, size, sparse, link, sims),
            Entry::Symlink { name, meta, target } => self.on_symlink(&name, &meta, &target),
            Entry::Special { name, meta, kind, rdev } => self.on_special(&name, &meta, kind, rdev),
            Entry::Skipped { name, reason } => self.on_skipped(&name, reason),
        }
    }

    /// Warns, once a run, of a modification time the destination's
    /// filesystem can't hold: the entry is stored with the nearest time it
    /// can, and compared with that one (`Privileges::storable`), so it is
    /// linked, not fetched again, on the next run.
    fn note_unstorable_time(&mut self, entry: &Entry) {
        let meta = match entry {
            Entry::Dir { meta, .. } | Entry::File { meta, .. } | Entry::Symlink { meta, .. } => meta,
            Entry::Special { meta, kind, .. } if *kind == SpecialKind::Fifo || self.cfg.devices => meta,
            _ => return,
        };
        let times = self.cfg.privs.times;
        let (sec, nsec) = times.clamp(meta.mtime, meta.mtime_nsec);
        if sec != meta.mtime {
            self.unstorable_times += 1;
            if self.unstorable_times == 1 {
                let rel = match (self.stack.last(), entry.name()) {
                    (Some(&d), Some(name)) => self.path_of(d, name),
                    _ => Vec::new(),
                };
                let detail = format!(
                    "modification time {} is outside what the destination's filesystem holds ({} to {}): stored as {}",
                    shown_time(meta.mtime),
                    shown_time(times.min),
                    shown_time(times.max),
                    shown_time(sec)
                );
                self.problem(ProblemKind::Metadata, &rel, detail);
            }
        } else if nsec != meta.mtime_nsec && !self.noted_granularity {
            self.noted_granularity = true;
            let g = times.granularity;
            self.events
                .note(&format!("the destination's filesystem keeps modification times to {g} ns: finer is dropped"));
        }
    }
}

/// A time in seconds since 1970, as a UTC date where it is one.
fn shown_time(sec: i64) -> String {
    match chrono::DateTime::from_timestamp(sec, 0) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => format!("{sec} s after 1970"),
    }
}

#[cfg(test)]
mod tests;
