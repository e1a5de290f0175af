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
mod receive;
mod record;

pub use ahead::Input;
pub use record::{ManifestSet, Recorder};

use record::{Carried, Content, record};

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{FileType, Stat};

use crate::fs::meta::{self, Meta, Privileges, Target, Tree};
use crate::fs::safefs::{Chain, Dir, HELD_LEVELS, Shown, file_type, join};
use crate::fs::writer::{self, Linked, TempEntry};
use crate::plan::{self, FileAction, Origin, Policy, Similarity};
use crate::report::{Action, Events, Problem, ProblemKind, Stats};
use crate::wire::frame::{Encoder, FrameReader};
use crate::wire::msg::{Entry, Fetch, Link, SinkMsg, SkipReason, SourceMsg, SpecialKind};
use crate::wire::{Outbox, ProtocolError};

/// Most fetches waiting for data before the listing is held back.
pub const WINDOW: usize = 512;
/// Most bytes of signatures the source holds at once; more delta requests
/// wait until answers come back.
const SIGNATURE_BUDGET: usize = 64 << 20;
/// Listing entries the source may send before it hears from us. Credit
/// outstanding never exceeds it, so the protocol refuses longer batches.
const INITIAL_CREDIT: u32 = crate::wire::msg::BATCH_MAX as u32;
/// Credit is returned in steps of at least this many entries.
const CREDIT_STEP: u32 = 1024;
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
}

/// What a finished sink hands back.
pub struct SinkOutcome {
    pub stats: Stats,
    /// The manifest, complete but for its footer (see `ManifestWriter::finish`).
    pub manifest: Option<crate::store::manifest::ManifestWriter>,
}

struct DirNode {
    /// Unique for the run (node indices are reused).
    serial: u64,
    /// Its position in the stack while its listing runs (the root's is 0).
    depth: usize,
    /// (`st_dev`, `st_ino`) of the destination directory; `None` only in a
    /// dry run, for a directory that doesn't exist yet.
    dest_id: Option<(u64, u64)>,
    /// Its name in its parent (empty for the root). Its path is found
    /// through the parents: a path per node would cost memory quadratic in
    /// the depth (a 20,000-deep chain's paths are 400 MB).
    name: Vec<u8>,
    meta: Meta,
    parent: Option<usize>,
    /// Unwritten fetches and unfinished subdirectories.
    pending: usize,
    ended: bool,
    /// The directory existed before this run: compare, and maybe clean up.
    existed: bool,
    /// Not every child is listed: never remove unlisted names.
    partial: bool,
    /// Names listed, kept only where extra entries must be removed.
    seen: Vec<Vec<u8>>,
    last: Option<Vec<u8>>,
    /// It existed with other metadata than the source's when first seen.
    meta_differs: bool,
}

/// A regular file whose data was asked for.
struct Pending {
    id: u64,
    /// Stable across retries: what manifest records of this content wait for.
    ticket: u64,
    dir: usize,
    name: Vec<u8>,
    meta: Meta,
    size: u64,
    basis: Option<receive::Basis>,
    /// Data an interrupted fetch of this file left: asked from its end on.
    partial: Option<receive::Partial>,
    /// Bytes of the signature sent with the request.
    sig_len: usize,
    group: Option<u64>,
    /// Later members of its hardlink group: (directory node, name).
    waiters: Vec<(usize, Vec<u8>)>,
}

/// State of a hardlink group whose first member was seen.
enum Group {
    /// Written at this path (relative to the destination root); `kept` if
    /// the first member was already in place (not rewritten by this run).
    Done { rel: Vec<u8>, left: u32, kept: bool, hash: Option<[u8; 32]> },
    /// The first member's data is still on its way.
    Waiting { left: u32 },
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
    granted: u64,
    received: u64,
    unreported: u32,
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
    stats: Stats,
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
            granted: 0,
            received: 0,
            unreported: 0,
            saw_root: false,
            root_done: false,
            listing_done: false,
            warned_devices: false,
            noted_rehash: false,
            noted_unhashed: false,
            unstorable_times: 0,
            noted_granularity: false,
            stats: Stats::default(),
        }
    }

    /// Runs the session to its end: the listing done, every fetch written,
    /// every directory finished. Returns the counters.
    pub fn run(mut self, incoming: &Receiver<Result<Input, ProtocolError>>) -> Result<SinkOutcome> {
        self.send(&SinkMsg::Credit(INITIAL_CREDIT))?;
        self.granted = u64::from(INITIAL_CREDIT);
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
        // Credit is what keeps memory flat: a source that lists more than it
        // was granted would grow the fetch queue without bound (docs/design.md rule 2).
        if self.received + u64::from(n) > self.granted {
            return Err(violation(format!(
                "{} listing entries sent where {} were granted (the source ignores flow control)",
                self.received + u64::from(n),
                self.granted
            )));
        }
        let mut sims = sims.into_iter();
        for entry in batch {
            self.on_entry(entry, sims.next().flatten())?;
        }
        self.received += u64::from(n);
        self.unreported += n;
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
        }
    }

    fn send(&mut self, msg: &SinkMsg) -> Result<()> {
        let frame = self.enc.msg(msg);
        Ok(self.out.send(frame)?)
    }

    /// Returns listing credit unless too many fetches are waiting.
    fn maybe_grant(&mut self) -> Result<()> {
        if self.unreported == 0 || self.pending.len() + self.deferred.len() >= WINDOW {
            return Ok(());
        }
        if self.unreported >= CREDIT_STEP || self.received >= self.granted {
            let n = self.unreported;
            self.send(&SinkMsg::Credit(n))?;
            self.granted += u64::from(n);
            self.unreported = 0;
        }
        Ok(())
    }

    fn node(&self, i: usize) -> &DirNode {
        self.dirs[i].as_ref().expect("live directory node")
    }

    fn node_mut(&mut self, i: usize) -> &mut DirNode {
        self.dirs[i].as_mut().expect("live directory node")
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

    /// Checks order and uniqueness of `name` in the current directory and
    /// records it. Returns the directory's node index and the entry's path.
    fn enter_name(&mut self, name: &[u8]) -> Result<(usize, Vec<u8>)> {
        let d = *self.stack.last().expect("inside a directory");
        let delete = self.cfg.delete;
        let node = self.dirs[d].as_mut().expect("live directory node");
        if node.last.as_deref().is_some_and(|last| name <= last) {
            let (dir, name) = (Shown(&self.cwd).to_string(), Shown(name).to_string());
            return Err(violation(format!("entry {name:?} in directory {dir:?} is out of order or listed twice")));
        }
        node.last = Some(name.to_vec());
        if node.existed && delete && !node.partial {
            node.seen.push(name.to_vec());
        }
        Ok((d, join(&self.cwd, name)))
    }

    fn on_dir(&mut self, name: &[u8], meta: Meta, unreadable: Option<String>, partial: bool) -> Result<()> {
        self.stats.directories += 1;
        let partial = partial || unreadable.is_some();
        self.next_serial += 1;
        let serial = self.next_serial;
        let mut dest_stat = None;
        let mut rel = Vec::new();
        let node = if self.stack.is_empty() {
            self.saw_root = true;
            if let Some(root) = &self.cfg.dest {
                dest_stat = Some(root.stat_self()?);
            }
            DirNode {
                serial,
                depth: 0,
                dest_id: dest_stat.as_ref().map(id),
                name: Vec::new(),
                meta,
                parent: None,
                pending: 0,
                ended: false,
                existed: !self.cfg.fresh,
                partial,
                seen: Vec::new(),
                last: None,
                meta_differs: false,
            }
        } else {
            let parent;
            (parent, rel) = self.enter_name(name)?;
            let (dest, existed) = self.open_child_dir(parent, name, &rel)?;
            match dest {
                Some(dir) => {
                    let st = dir.stat_self().with_context(|| format!("looking at directory {}", Shown(&rel)))?;
                    self.dest.push(name, dir, &st);
                    dest_stat = Some(st);
                }
                None => self.dest.push_absent(),
            }
            for chain in &mut self.bases {
                chain.enter_if_dir(name);
            }
            self.node_mut(parent).pending += 1;
            DirNode {
                serial,
                depth: self.stack.len(),
                dest_id: dest_stat.as_ref().map(id),
                name: name.to_vec(),
                meta,
                parent: Some(parent),
                pending: 0,
                ended: false,
                existed,
                partial,
                seen: Vec::new(),
                last: None,
                meta_differs: false,
            }
        };
        let mut node = node;
        let stored = self.cfg.privs.storable(&node.meta);
        self.rec.push(record(&rel, crate::store::manifest::Kind::Dir, 0, &stored), Content::Known(None));
        if node.existed
            && let Some(st) = &dest_stat
            && let Some(dest) = self.dest.top()?
        {
            // Decided now, before this run writes inside it and moves its mtime.
            let want = self.cfg.privs.storable(&node.meta);
            node.meta_differs = !(meta::stat_matches(st, &want) && meta::read_dir_xattrs(&dest)? == want.xattrs);
        }
        if let Some(err) = unreadable {
            self.problem(ProblemKind::Unreadable, &rel, format!("directory not listed: {err}"));
        }
        let idx = match self.free.pop() {
            Some(i) => {
                self.dirs[i] = Some(node);
                i
            }
            None => {
                self.dirs.push(Some(node));
                self.dirs.len() - 1
            }
        };
        self.stack.push(idx);
        if !rel.is_empty() {
            self.cwd_ends.push(self.cwd.len());
            self.cwd = rel;
        }
        Ok(())
    }

    /// Opens or creates the destination directory `name`; returns it (absent
    /// in a dry run when it would be created) and whether it already existed.
    fn open_child_dir(&mut self, parent: usize, name: &[u8], rel: &[u8]) -> Result<(Option<Dir>, bool)> {
        // The parent is the current directory.
        let Some(pdest) = self.dest.top().with_context(|| format!("opening the directory of {}", Shown(rel)))? else {
            // A dry run inside a directory that would be created.
            self.act(Action::Mkdir, rel, false);
            return Ok((None, false));
        };
        if self.node(parent).existed
            && let Some(st) = pdest.try_stat(name).with_context(|| format!("looking at {}", Shown(rel)))?
        {
            if file_type(&st) == FileType::Directory {
                let d = pdest.open_dir(name).with_context(|| format!("opening directory {}", Shown(rel)))?;
                return Ok((Some(d), true));
            }
            self.act(Action::Mkdir, rel, true);
            if !self.cfg.dry_run {
                pdest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
            }
        } else {
            self.act(Action::Mkdir, rel, false);
        }
        if self.cfg.dry_run {
            return Ok((None, false));
        }
        let d = pdest.create_dir(name).with_context(|| format!("creating directory {}", Shown(rel)))?;
        Ok((Some(d), false))
    }

    fn on_end_dir(&mut self) -> Result<()> {
        let idx = self.stack.pop().ok_or_else(|| violation("end of a directory that was never opened"))?;
        self.node_mut(idx).ended = true;
        if let Some(end) = self.cwd_ends.pop() {
            self.cwd.truncate(end);
        }
        if !self.stack.is_empty() {
            // Off the stack, its handle waits with the others reopened.
            if let Some(dir) = self.dest.top()? {
                self.keep_spare(self.node(idx).serial, dir);
            }
            self.dest.pop();
            for chain in &mut self.bases {
                chain.pop();
            }
        }
        self.maybe_finish_dir(idx)
    }

    /// Finishes directory `idx` and then its parents, as far as each has no
    /// pending work: removes extra entries, then applies its metadata.
    fn maybe_finish_dir(&mut self, mut idx: usize) -> Result<()> {
        loop {
            let node = self.node(idx);
            if !node.ended || node.pending > 0 {
                return Ok(());
            }
            let dest = self.dest_of(idx)?;
            let node = self.dirs[idx].take().expect("live directory node");
            self.free.push(idx);
            if let Some(dest) = &dest {
                // Its path, only where it is needed.
                let rel = |sink: &Self| node.parent.map_or_else(Vec::new, |p| sink.path_of(p, &node.name));
                if node.existed && self.cfg.delete && !node.partial {
                    let rel = rel(self);
                    self.remove_extras(dest, &node, &rel)?;
                }
                // A restore of chosen paths leaves the metadata of directories
                // that were already there on the way to them.
                let leave = self.cfg.policy == Policy::Restore && node.partial && node.existed;
                if node.meta_differs && !leave {
                    let rel = rel(self);
                    self.act(Action::Meta, &rel, true);
                    self.stats.metadata_fixed += 1;
                }
                if !self.cfg.dry_run && !leave {
                    let problems = meta::apply(&Target::Dir(dest), &node.meta, self.cfg.privs)
                        .with_context(|| format!("setting metadata of directory {}", Shown(&rel(self))))?;
                    if !problems.is_empty() {
                        let rel = rel(self);
                        self.apply_problems(&rel, problems);
                    }
                }
            }
            match node.parent {
                Some(p) => {
                    self.node_mut(p).pending -= 1;
                    idx = p;
                }
                None => {
                    self.root_done = true;
                    return Ok(());
                }
            }
        }
    }

    fn remove_extras(&mut self, dest: &Dir, node: &DirNode, dir_rel: &[u8]) -> Result<()> {
        let names = dest.names().with_context(|| format!("listing {}", Shown(dir_rel)))?;
        for name in names {
            if node.seen.binary_search(&name).is_ok() {
                continue;
            }
            let rel = join(dir_rel, &name);
            self.act(Action::Remove, &rel, true);
            self.stats.removed += 1;
            if !self.cfg.dry_run {
                dest.remove_all(&name).with_context(|| format!("removing {}", Shown(&rel)))?;
            }
        }
        Ok(())
    }

    fn on_skipped(&mut self, name: &[u8], reason: SkipReason) -> Result<()> {
        let (_, rel) = self.enter_name(name)?;
        match reason {
            SkipReason::Vanished => self.problem(ProblemKind::Vanished, &rel, "disappeared during the run"),
            SkipReason::Unreadable(e) => self.problem(ProblemKind::Unreadable, &rel, e),
            SkipReason::Socket => self.stats.sockets_skipped += 1,
        }
        Ok(())
    }

    /// What kind of tree the destination is.
    fn tree(&self) -> Tree {
        if self.cfg.policy == Policy::Snapshot { Tree::Ours } else { Tree::Live }
    }

    /// The destination directory of node `d` (`None`: a dry run's directory
    /// that would be created), opened again if its handle was let go.
    fn dest_of(&mut self, d: usize) -> Result<Option<Dir>> {
        let node = self.node(d);
        if node.dest_id.is_none() {
            return Ok(None);
        }
        if node.parent.is_none() {
            return Ok(self.cfg.dest.clone());
        }
        if !node.ended {
            if node.depth == self.dest.depth() {
                return Ok(self.dest.top()?);
            }
            if let Some(dir) = self.dest.held(node.depth) {
                return Ok(Some(dir));
            }
        }
        self.reopen(d).map(Some)
    }

    /// The path of directory node `d`, from the root.
    fn rel_of(&self, d: usize) -> Vec<u8> {
        if self.stack.last() == Some(&d) {
            return self.cwd.clone();
        }
        let mut names = Vec::new();
        let mut n = d;
        while let Some(p) = self.node(n).parent {
            names.push(&self.node(n).name[..]);
            n = p;
        }
        names.reverse();
        names.join(&b'/')
    }

    /// The path of `name` in directory node `d`.
    fn path_of(&self, d: usize, name: &[u8]) -> Vec<u8> {
        join(&self.rel_of(d), name)
    }

    /// A handle of node `d`'s destination directory without opening
    /// anything: the root's, a held one of the stack, or a spare one.
    fn handle_of(&self, d: usize) -> Option<Dir> {
        let node = self.node(d);
        if node.parent.is_none() {
            return self.cfg.dest.clone();
        }
        if !node.ended
            && let Some(dir) = self.dest.held(node.depth)
        {
            return Some(dir);
        }
        self.spare.iter().find(|(s, _)| *s == node.serial).map(|(_, dir)| dir.clone())
    }

    /// Opens node `d`'s destination directory again, with up to
    /// `HELD_LEVELS - 1` of its ancestors that have no handle either: the
    /// shallowest by name from the nearest ancestor that has one, or by its
    /// path from the root (beneath it, no symlink followed); each must be
    /// the directory first opened. They become the spare handles, so that
    /// finishing a chain of directories, each after its children, costs one
    /// path walk per `HELD_LEVELS` of them.
    fn reopen(&mut self, d: usize) -> Result<Dir> {
        if let Some(dir) = self.handle_of(d) {
            return Ok(dir);
        }
        let mut lost = vec![d];
        let mut dir = loop {
            let parent = self.node(*lost.last().expect("not empty")).parent.expect("the root is always open");
            let above = self.handle_of(parent);
            if above.is_some() || lost.len() == HELD_LEVELS {
                break above;
            }
            lost.push(parent);
        };
        for &n in lost.iter().rev() {
            let node = self.node(n);
            let opened = match &dir {
                Some(parent) => parent.open_dir(&node.name),
                None => self.cfg.dest.as_ref().expect("a destination").resolve_dir(&self.rel_of(n)),
            };
            let opened = opened.with_context(|| format!("opening directory {} again", Shown(&self.rel_of(n))))?;
            if Some(id(&opened.stat_self()?)) != node.dest_id {
                bail!(crate::fs::safefs::Moved { path: Shown(&self.rel_of(n)).to_string() });
            }
            self.keep_spare(node.serial, opened.clone());
            dir = Some(opened);
        }
        Ok(dir.expect("at least one directory reopened"))
    }

    /// Keeps the handle of a directory off the held part of the stack,
    /// letting go of the oldest beyond `HELD_LEVELS`.
    fn keep_spare(&mut self, serial: u64, dir: Dir) {
        if self.spare.len() == HELD_LEVELS {
            self.spare.pop_front();
        }
        self.spare.push_back((serial, dir));
    }

    /// The current directory in each basis (`None` where a basis lacks it).
    fn base_dirs(&mut self) -> Vec<Option<Dir>> {
        self.bases.iter_mut().map(|c| c.top().ok().flatten()).collect()
    }

    /// The current directory in basis `i`, which the plan chose.
    fn base_dir(&mut self, i: usize) -> Result<Dir> {
        self.bases[i].top()?.ok_or_else(|| anyhow!("the basis the plan chose lacks the directory"))
    }

    fn on_file(
        &mut self,
        name: Vec<u8>,
        meta: Meta,
        size: u64,
        sparse: bool,
        link: Option<Link>,
        sims: Option<Vec<Similarity>>,
    ) -> Result<()> {
        let (d, rel) = self.enter_name(&name)?;
        self.stats.files += 1;
        let want = self.cfg.privs.storable(&meta);
        if let Some(link) = link
            && self.join_group(d, &name, &rel, link, &want, size)?
        {
            return Ok(());
        }
        let tree = self.tree();
        let dest_sim = match (self.dest_of(d)?, self.node(d).existed) {
            (Some(dest), true) => {
                compare_file(&dest, &name, size, &want, tree).with_context(|| format!("looking at {}", Shown(&rel)))?
            }
            _ => Similarity::Missing,
        };
        let base_sims = match sims {
            Some(s) if s.len() == self.bases.len() => s,
            _ => base_similarities(&self.base_dirs(), &name, size, &want),
        };
        let delta = self.cfg.delta && !sparse && size >= plan::DELTA_MIN_SIZE;
        let action = plan::file(dest_sim, &base_sims, self.cfg.policy, delta);
        if dest_sim == Similarity::OtherType {
            self.clear_dir_for_file(d, &name, &rel)?;
        }
        let replacing = dest_sim != Similarity::Missing;
        let mut content = Content::Known(None);
        let done = match action {
            FileAction::Keep => {
                self.stats.kept += 1;
                content = Content::Known(self.carried_hash(None, d, &name, &rel, size, &want));
                true
            }
            FileAction::FixMeta => {
                self.fix_meta_in_place(d, &name, &rel, &meta)?;
                true
            }
            FileAction::Link(i) => {
                self.link_from_basis(d, i, &name, &rel, &meta, size, dest_sim)?;
                content = Content::Known(self.carried_hash(Some(i), d, &name, &rel, size, &want));
                true
            }
            FileAction::Copy(origin) => {
                self.copy_local(d, origin, &name, &rel, &meta, size, replacing)?;
                let from = match origin {
                    Origin::Dest => None,
                    Origin::Basis(i) => Some(i),
                };
                content = Content::Known(self.carried_hash(from, d, &name, &rel, size, &want));
                true
            }
            FileAction::Fetch { delta_base } => {
                let ticket = self.fetch(d, name, &rel, meta, size, delta_base, link.map(|l| l.id), replacing)?;
                content = Content::Waiting(ticket);
                // In a dry run nothing is pending: later links just print.
                self.cfg.dry_run
            }
        };
        if let Some(link) = link {
            let left = link.nlink - 1;
            let kept = action == FileAction::Keep;
            let group = match &content {
                Content::Known(hash) if done => Group::Done { rel: rel.clone(), left, kept, hash: *hash },
                Content::Waiting(_) if !done => Group::Waiting { left },
                _ => Group::Done { rel: rel.clone(), left, kept, hash: None },
            };
            self.groups.insert(link.id, group);
        }
        self.rec.push(record(&rel, crate::store::manifest::Kind::File, size, &want), content);
        Ok(())
    }

    /// The content hash of a file kept, linked or copied from `from` (the
    /// destination, or basis `i`), now `name` in node `d`'s directory: the
    /// one that tree's manifest recorded; for a file kept in a resumed
    /// snapshot whose run's manifest was cut short, the one of the basis it
    /// is a hardlink of (one inode, one content: docs/design.md rule 1); otherwise —
    /// no manifest, no record, or an older digest — its digest computed now
    /// from the file in the snapshot, once, in proportion to its data. So no
    /// file of a snapshot is left without a hash (see `record`).
    fn carried_hash(
        &mut self,
        from: Option<usize>,
        d: usize,
        name: &[u8],
        rel: &[u8],
        size: u64,
        want: &Meta,
    ) -> Option<[u8; 32]> {
        if !self.rec.active() {
            return None;
        }
        match self.rec.carried(from, rel, size, want) {
            Carried::Hash(h) => return Some(h),
            Carried::Legacy => {
                if !self.noted_rehash {
                    self.noted_rehash = true;
                    self.events.note(
                        "the previous snapshot's manifest has content digests of an older version: files \
                         linked from it are hashed once more (see docs/retention.md, Manifests)",
                    );
                }
            }
            Carried::None => {
                if let Some(h) = self.hash_of_basis_inode(from, d, name, rel, size, want) {
                    return Some(h);
                }
                if from.is_some() && !self.noted_unhashed {
                    self.noted_unhashed = true;
                    self.events.note(
                        "the previous snapshot's manifest is missing or lacks some files: files linked from it \
                         are hashed now, once (see docs/retention.md, Manifests)",
                    );
                }
            }
        }
        let digest = match self.dest_of(d) {
            Ok(Some(dest)) => dest.open_file(name),
            Ok(None) => return None,
            Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
        }
        .and_then(|f| crate::digest::of_file(&f, crate::digest::Version::V2));
        match digest {
            Ok(digest) => Some(digest.hash),
            Err(e) => {
                crate::warn!("{}: could not be hashed for the manifest: {e}", Shown(rel));
                None
            }
        }
    }

    /// The hash another basis's manifest (not `from`'s) records for `name`,
    /// when the destination's `name` is the same inode as that basis's file:
    /// a file an interrupted run linked, kept or linked again from it.
    #[allow(clippy::too_many_arguments)]
    fn hash_of_basis_inode(
        &mut self,
        from: Option<usize>,
        d: usize,
        name: &[u8],
        rel: &[u8],
        size: u64,
        want: &Meta,
    ) -> Option<[u8; 32]> {
        let st = self.dest_of(d).ok()??.try_stat(name).ok()??;
        let i = self.base_dirs().iter().enumerate().position(|(i, b)| {
            Some(i) != from
                && b.as_ref()
                    .and_then(|b| b.try_stat(name).ok().flatten())
                    .is_some_and(|b| b.st_ino == st.st_ino && b.st_dev == st.st_dev)
        })?;
        match self.rec.carried(Some(i), rel, size, want) {
            Carried::Hash(h) => Some(h),
            Carried::Legacy | Carried::None => None,
        }
    }

    /// A directory sits where a non-directory must go: remove it first, since
    /// a rename can't replace it.
    fn clear_dir_for_file(&mut self, d: usize, name: &[u8], rel: &[u8]) -> Result<()> {
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        let is_dir = dest.try_stat(name)?.is_some_and(|st| file_type(&st) == FileType::Directory);
        if is_dir && !self.cfg.dry_run {
            {
                dest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
            }
        }
        Ok(())
    }

    /// A later member of a hardlink group. Returns false for the first member,
    /// which the caller handles like any file.
    fn join_group(&mut self, d: usize, name: &[u8], rel: &[u8], link: Link, want: &Meta, size: u64) -> Result<bool> {
        let Some(group) = self.groups.get_mut(&link.id) else {
            return Ok(false);
        };
        self.stats.hardlinks += 1;
        let left = match group {
            Group::Done { left, .. } | Group::Waiting { left, .. } => {
                *left = left.saturating_sub(1);
                *left
            }
        };
        match self.groups.get(&link.id) {
            Some(Group::Done { rel: first, kept, hash, .. }) => {
                let (first, kept, hash) = (first.clone(), *kept, *hash);
                self.link_member(&first, kept, d, name, rel)?;
                self.rec.push(record(rel, crate::store::manifest::Kind::File, size, want), Content::Known(hash));
            }
            _ => {
                let waiter = (d, name.to_vec());
                let p = self
                    .pending
                    .iter_mut()
                    .chain(self.deferred.iter_mut())
                    .chain(self.receiving.as_mut().map(|r| &mut r.pending))
                    .find(|p| p.group == Some(link.id))
                    .ok_or_else(|| anyhow!("hardlink group {} lost its first member", link.id))?;
                p.waiters.push(waiter);
                let ticket = p.ticket;
                self.node_mut(d).pending += 1;
                self.rec.push(record(rel, crate::store::manifest::Kind::File, size, want), Content::Waiting(ticket));
            }
        }
        if left == 0 {
            self.groups.remove(&link.id);
        }
        Ok(true)
    }

    /// Links `name` in directory node `d` to the already written `first`
    /// (`first_kept`: it was in place before this run).
    fn link_member(&mut self, first: &[u8], first_kept: bool, d: usize, name: &[u8], rel: &[u8]) -> Result<()> {
        let (first_dir, first_name) = split_parent(first);
        let dest = self.dest_of(d)?;
        let existing = match (&dest, self.node(d).existed) {
            (Some(dest), true) => dest.try_stat(name)?,
            _ => None,
        };
        // The first member, where it already is (always, outside a dry run).
        let src_dir = self.cfg.dest.as_ref().and_then(|root| root.resolve_dir(first_dir).ok());
        let src = src_dir.as_ref().and_then(|dir| dir.stat(first_name).ok());
        // Already one inode with the first member: only if that one was kept
        // (a rewritten first member is a new inode; a dry run only pretends).
        if first_kept
            && let (Some(st), Some(src)) = (&existing, &src)
            && st.st_ino == src.st_ino
            && st.st_dev == src.st_dev
        {
            self.stats.kept += 1;
            return Ok(());
        }
        self.act(Action::Hardlink, rel, existing.is_some());
        let Some(dest) = dest else { return Ok(()) };
        if self.cfg.dry_run {
            return Ok(());
        }
        let src_dir = src_dir.ok_or_else(|| anyhow!("the first link of {} is missing", Shown(rel)))?;
        if existing.as_ref().is_some_and(|st| file_type(st) == FileType::Directory) {
            dest.remove_all(name)?;
        }
        match writer::link(&src_dir, first_name, &dest, name, existing.is_some())
            .with_context(|| format!("hardlinking {} to {}", Shown(rel), Shown(first)))?
        {
            Linked::Done => Ok(()),
            Linked::TooManyLinks => {
                let src = src_dir.open_file(first_name)?;
                let meta = meta::from_stat(&src_dir.stat(first_name)?, meta::read_xattrs(&src_dir, first_name)?);
                let size = src.metadata()?.len();
                self.copy_file_into(&dest, &src, name, rel, &meta, size)
            }
        }
    }

    fn fix_meta_in_place(&mut self, d: usize, name: &[u8], rel: &[u8], meta: &Meta) -> Result<()> {
        self.act(Action::Meta, rel, true);
        self.stats.metadata_fixed += 1;
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let file = dest.open_file(name).with_context(|| format!("opening {}", Shown(rel)))?;
        // Opened without following; what was opened must still be the file
        // that was compared, not something renamed over it since.
        if file_type(&rustix::fs::fstat(&file)?) != FileType::RegularFile {
            self.problem(ProblemKind::Changed, rel, "replaced while it was restored; left alone");
            return Ok(());
        }
        let problems = meta::apply(&Target::Fd(&file), meta, self.cfg.privs)?;
        self.apply_problems(rel, problems);
        Ok(())
    }

    /// Hardlinks the file from basis `i`, or copies it if the inode is full.
    #[allow(clippy::too_many_arguments)]
    fn link_from_basis(
        &mut self,
        d: usize,
        i: usize,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        size: u64,
        dest_sim: Similarity,
    ) -> Result<()> {
        self.act(Action::Link, rel, dest_sim != Similarity::Missing);
        self.stats.linked += 1;
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let base = self.base_dir(i)?;
        let replace = dest_sim != Similarity::Missing;
        match writer::link(&base, name, &dest, name, replace).with_context(|| format!("hardlinking {}", Shown(rel)))? {
            Linked::Done => {}
            Linked::TooManyLinks => {
                // The inode has the most links the filesystem allows: copy it.
                self.stats.linked -= 1;
                let src = base.open_file(name)?;
                self.copy_file_into(&dest, &src, name, rel, meta, size)?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_local(
        &mut self,
        d: usize,
        origin: Origin,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        size: u64,
        replacing: bool,
    ) -> Result<()> {
        self.act(Action::Copy, rel, replacing);
        let Some(dest) = self.dest_of(d)? else {
            self.stats.copied_locally += 1;
            return Ok(());
        };
        if self.cfg.dry_run {
            self.stats.copied_locally += 1;
            return Ok(());
        }
        let src_dir = match origin {
            Origin::Dest => dest.clone(),
            Origin::Basis(i) => self.base_dir(i)?,
        };
        let src = src_dir.open_file(name).with_context(|| format!("opening the basis of {}", Shown(rel)))?;
        self.copy_file_into(&dest, &src, name, rel, meta, size)
    }

    fn copy_file_into(
        &mut self,
        dest: &Dir,
        src: &std::fs::File,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        size: u64,
    ) -> Result<()> {
        let mut temp = TempEntry::file(dest).with_context(|| format!("creating a file for {}", Shown(rel)))?;
        writer::copy_contents(src, temp.file_mut(), size).with_context(|| format!("copying {}", Shown(rel)))?;
        let problems = temp.commit(name, meta, self.cfg.privs).with_context(|| format!("writing {}", Shown(rel)))?;
        self.stats.copied_locally += 1;
        self.stats.bytes_written = self.stats.bytes_written.saturating_add(size);
        self.apply_problems(rel, problems);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &mut self,
        d: usize,
        name: Vec<u8>,
        rel: &[u8],
        meta: Meta,
        size: u64,
        delta_base: Option<Origin>,
        group: Option<u64>,
        replacing: bool,
    ) -> Result<u64> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let basis_dir = match delta_base {
            None => None,
            Some(Origin::Dest) => self.dest_of(d)?,
            Some(Origin::Basis(i)) => self.bases[i].top().ok().flatten(),
        };
        let basis = basis_dir.and_then(|dir| receive::open_basis(&dir, &name, self.cfg.policy));
        let delta = basis.is_some();
        self.act(if delta { Action::Delta } else { Action::Fetch }, rel, replacing);
        // Sizes are the source's word: summed without overflow.
        self.stats.bytes_to_fetch = self.stats.bytes_to_fetch.saturating_add(size);
        if self.cfg.dry_run {
            if delta {
                self.stats.fetched_delta += 1;
            } else {
                self.stats.fetched_whole += 1;
            }
            return Ok(ticket);
        }
        // A snapshot's file that an interrupted run was receiving goes on
        // from where it stopped (see `receive`).
        let partial = if self.cfg.policy == Policy::Snapshot { self.find_partial(d, &name, size, &meta) } else { None };
        let p =
            Pending { id: 0, ticket, dir: d, name, meta, size, basis, partial, sig_len: 0, group, waiters: Vec::new() };
        self.node_mut(d).pending += 1;
        if delta && (self.sig_outstanding >= SIGNATURE_BUDGET || !self.deferred.is_empty()) {
            // Signatures already on their way are enough; this one waits.
            self.deferred.push_back(p);
            return Ok(ticket);
        }
        self.send_fetch(p)?;
        Ok(ticket)
    }

    /// Computes the signature (for a delta) and sends the request.
    fn send_fetch(&mut self, mut p: Pending) -> Result<()> {
        p.id = self.next_id;
        self.next_id += 1;
        let signature = p.basis.as_ref().and_then(receive::Basis::signature);
        if signature.is_none() {
            p.basis = None;
        }
        p.sig_len = signature.as_ref().map_or(0, Vec::len);
        self.sig_outstanding += p.sig_len;
        let path = self.path_of(p.dir, &p.name);
        let offset = p.partial.as_ref().map_or(0, receive::Partial::len);
        self.send(&SinkMsg::Fetch(Fetch { id: p.id, path, signature, offset }))?;
        self.pending.push_back(p);
        Ok(())
    }

    /// Sends deferred delta requests while the signature budget allows.
    fn send_deferred(&mut self) -> Result<()> {
        while self.sig_outstanding < SIGNATURE_BUDGET
            && let Some(p) = self.deferred.pop_front()
        {
            self.send_fetch(p)?;
        }
        Ok(())
    }

    fn on_symlink(&mut self, name: &[u8], meta: &Meta, target: &[u8]) -> Result<()> {
        let (d, rel) = self.enter_name(name)?;
        self.stats.symlinks += 1;
        let want = self.cfg.privs.storable(meta);
        let r = crate::store::manifest::Record {
            target: Some(target.to_vec()),
            ..record(&rel, crate::store::manifest::Kind::Symlink, 0, &want)
        };
        self.rec.push(r, Content::Known(None));
        let existing = self.existing(d, name, &rel)?;
        if let Some(dest) = self.dest_of(d)?
            && let Some(st) = &existing
            && file_type(st) == FileType::Symlink
            && dest.read_link(name).is_ok_and(|t| t == target)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, FileType::Symlink);
            }
        }
        self.create_at(d, name, &rel, meta, existing.as_ref(), |dir| TempEntry::symlink(dir, target))
    }

    fn on_special(&mut self, name: &[u8], meta: &Meta, kind: SpecialKind, rdev: u64) -> Result<()> {
        let (d, rel) = self.enter_name(name)?;
        if kind != SpecialKind::Fifo && !self.cfg.devices {
            self.stats.devices_skipped += 1;
            if !self.warned_devices {
                self.warned_devices = true;
                self.events.note("device nodes are skipped (first: see --devices to keep them)");
            }
            return Ok(());
        }
        self.stats.specials += 1;
        let want = self.cfg.privs.storable(meta);
        let kind_of = match kind {
            SpecialKind::Fifo => crate::store::manifest::Kind::Fifo,
            SpecialKind::Char => crate::store::manifest::Kind::Char,
            SpecialKind::Block => crate::store::manifest::Kind::Block,
        };
        let rdev_of = if kind == SpecialKind::Fifo { 0 } else { rdev };
        self.rec.push(
            crate::store::manifest::Record { rdev: rdev_of, ..record(&rel, kind_of, 0, &want) },
            Content::Known(None),
        );
        let existing = self.existing(d, name, &rel)?;
        let wanted_type = match kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        if let Some(dest) = self.dest_of(d)?
            && let Some(st) = &existing
            && file_type(st) == wanted_type
            && (kind == SpecialKind::Fifo || st.st_rdev == rdev)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, wanted_type);
            }
        }
        self.create_at(d, name, &rel, meta, existing.as_ref(), |dir| TempEntry::special(dir, kind, rdev))
    }

    /// The destination's current entry `name`, if the directory existed.
    fn existing(&mut self, d: usize, name: &[u8], rel: &[u8]) -> Result<Option<Stat>> {
        match (self.dest_of(d)?, self.node(d).existed) {
            (Some(dest), true) => dest.try_stat(name).with_context(|| format!("looking at {}", Shown(rel))),
            _ => Ok(None),
        }
    }

    /// Fixes the metadata of the symlink, FIFO or device node `name` in place
    /// (a restore), through a descriptor of the entry that is checked to be
    /// a `kind`: someone who can write the directory may swap it meanwhile.
    fn fix_meta_at(&mut self, dest: &Dir, name: &[u8], rel: &[u8], meta: &Meta, kind: FileType) -> Result<()> {
        self.act(Action::Meta, rel, true);
        self.stats.metadata_fixed += 1;
        if self.cfg.dry_run {
            return Ok(());
        }
        let pinned = match dest.pin(name, kind) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(crate::fs::safefs::libc_errno::ENOENT) => {
                self.problem(ProblemKind::Vanished, rel, "disappeared while it was restored");
                return Ok(());
            }
            Err(e) if crate::fs::safefs::Swapped::is(&e) => {
                self.problem(ProblemKind::Changed, rel, e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", Shown(rel))),
        };
        let problems = meta::apply(&Target::Pinned(&pinned), meta, self.cfg.privs)?;
        self.apply_problems(rel, problems);
        Ok(())
    }

    /// Creates a symlink or special file under a temporary name and renames
    /// it over whatever is there.
    fn create_at(
        &mut self,
        d: usize,
        name: &[u8],
        rel: &[u8],
        meta: &Meta,
        existing: Option<&Stat>,
        make: impl FnOnce(&Dir) -> std::io::Result<TempEntry>,
    ) -> Result<()> {
        self.act(Action::Create, rel, existing.is_some());
        let Some(dest) = self.dest_of(d)? else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        if existing.is_some_and(|st| file_type(st) == FileType::Directory) {
            dest.remove_all(name).with_context(|| format!("removing {}", Shown(rel)))?;
        }
        let temp = make(&dest).with_context(|| format!("creating {}", Shown(rel)))?;
        let problems = temp.commit(name, meta, self.cfg.privs).with_context(|| format!("writing {}", Shown(rel)))?;
        self.apply_problems(rel, problems);
        Ok(())
    }
}

/// What identifies a directory while the run holds no handle on it.
fn id(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

/// A time in seconds since 1970, as a UTC date where it is one.
fn shown_time(sec: i64) -> String {
    match chrono::DateTime::from_timestamp(sec, 0) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => format!("{sec} s after 1970"),
    }
}

/// Splits `a/b/c` into (`a/b`, `c`).
fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    }
}

/// Compares an existing entry with an incoming regular file.
/// How `name` compares with the same path in each basis. Bases are best
/// first: once one is the same, the rest don't matter.
fn base_similarities(bases: &[Option<Dir>], name: &[u8], size: u64, want: &Meta) -> Vec<Similarity> {
    let mut sims = vec![Similarity::Missing; bases.len()];
    for (sim, base) in sims.iter_mut().zip(bases) {
        if let Some(b) = base {
            *sim = compare_file(b, name, size, want, Tree::Ours).unwrap_or(Similarity::Missing);
            if *sim == Similarity::Same {
                break;
            }
        }
    }
    sims
}

fn compare_file(dir: &Dir, name: &[u8], size: u64, want: &Meta, tree: Tree) -> std::io::Result<Similarity> {
    let Some(st) = dir.try_stat(name)? else {
        return Ok(Similarity::Missing);
    };
    if file_type(&st) != FileType::RegularFile {
        return Ok(Similarity::OtherType);
    }
    if st.st_size as u64 != size || st.st_mtime != want.mtime || st.st_mtime_nsec as u32 != want.mtime_nsec {
        return Ok(Similarity::ContentDiffers);
    }
    if same_meta(dir, name, &st, want, tree)? { Ok(Similarity::Same) } else { Ok(Similarity::MetaDiffers) }
}

/// Mode, owner, mtime and xattrs of an existing entry equal `want`.
fn same_meta(dir: &Dir, name: &[u8], st: &Stat, want: &Meta, tree: Tree) -> std::io::Result<bool> {
    Ok(meta::stat_matches(st, want) && meta::xattrs_match(dir, name, st, &want.xattrs, tree)?)
}

#[cfg(test)]
mod tests {
    use super::split_parent;

    #[test]
    fn split_parent_of_paths() {
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
    }
}
