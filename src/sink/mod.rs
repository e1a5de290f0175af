//! The sink side of a session: take the source's listing, compare each entry
//! with what the destination and the bases hold, and write through
//! [`crate::writer`]. The desktop runs this for a backup; the agent runs it
//! for a restore.
//!
//! The listing arrives depth first. Each open directory has a node that lives
//! until its listing has ended *and* every fetch inside it has been written;
//! then whatever the source no longer has is removed (when the policy says
//! so) and the directory gets its metadata — after its children, so their
//! creation can't disturb its mtime. Fetches are pipelined: requests go out
//! as soon as the plan says so, data comes back in request order, and the
//! listing keeps flowing as long as fewer than [`WINDOW`] fetches are waiting.
//! Memory is flat in the number of files: per open directory, the names seen
//! (only where extra entries must be found), and the pending fetches.

mod ahead;
mod receive;
mod record;

pub use ahead::Input;
pub use record::{ManifestSet, Recorder};

use record::{Content, record};

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use rustix::fs::{FileType, Stat};

use crate::meta::{self, Meta, Privileges, Target, Tree};
use crate::plan::{self, FileAction, Origin, Policy, Similarity};
use crate::protocol::frame::{Encoder, FrameReader};
use crate::protocol::msg::{Entry, Fetch, Link, SinkMsg, SkipReason, SourceMsg, SpecialKind};
use crate::protocol::{Outbox, ProtocolError};
use crate::report::{Action, Events, Problem, ProblemKind, Stats};
use crate::safefs::{Dir, Shown, file_type, join};
use crate::writer::{self, Linked, TempEntry};

/// Most fetches waiting for data before the listing is held back.
pub const WINDOW: usize = 512;
/// Most bytes of signatures the source holds at once; more delta requests
/// wait until answers come back.
const SIGNATURE_BUDGET: usize = 64 << 20;
/// Listing entries the source may send before it hears from us. Credit
/// outstanding never exceeds it, so the protocol refuses longer batches.
const INITIAL_CREDIT: u32 = crate::protocol::msg::BATCH_MAX as u32;
/// Credit is returned in steps of at least this many entries.
const CREDIT_STEP: u32 = 1024;

/// Starts the thread that reads the source's frames for [`Sink::run`],
/// comparing listed files with the bases on the way (see `ahead`).
pub fn spawn_reader<R: Read + Send + 'static>(
    reader: FrameReader<R>,
    cfg: &SinkConfig,
) -> (Receiver<Result<Input, ProtocolError>>, Arc<AtomicU64>, JoinHandle<()>) {
    let bases = if cfg.policy == Policy::Snapshot { cfg.bases.clone() } else { Vec::new() };
    let mut ahead = ahead::Ahead::new(bases, cfg.privs);
    crate::protocol::spawn_reader(reader, 64, move |frame| ahead.stage(frame))
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
    pub manifest: Option<crate::manifest::ManifestWriter>,
}

struct DirNode {
    /// `None` only in a dry run, for a directory that doesn't exist yet.
    dest: Option<Dir>,
    rel: Vec<u8>,
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
    /// The same directory in each basis, while its listing runs.
    bases: Vec<Option<Dir>>,
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
        Sink {
            cfg,
            events,
            dirs: Vec::new(),
            free: Vec::new(),
            stack: Vec::new(),
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
            match incoming.recv().map_err(|_| ProtocolError::Closed)?? {
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
        // was granted would grow the fetch queue without bound (DESIGN rule 2).
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
                Ok(())
            }
            SourceMsg::FileBegin { id, size } => self.on_begin(id, size),
            SourceMsg::FileEnd { id, status, hash } => self.on_end(id, &status, hash),
            SourceMsg::FileFailed { id, error } => self.on_failed(id, &error),
            SourceMsg::Fatal(msg) => bail!("the sending side failed: {}", Shown(msg.as_bytes())),
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
                    (Some(&d), Some(name)) => join(&self.node(d).rel, name),
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
        let node = self.node_mut(d);
        if node.last.as_deref().is_some_and(|last| name <= last) {
            let (dir, name) = (Shown(&node.rel).to_string(), Shown(name).to_string());
            return Err(violation(format!("entry {name:?} in directory {dir:?} is out of order or listed twice")));
        }
        node.last = Some(name.to_vec());
        if node.existed && delete && !node.partial {
            node.seen.push(name.to_vec());
        }
        let rel = join(&node.rel, name);
        Ok((d, rel))
    }

    fn on_dir(&mut self, name: &[u8], meta: Meta, unreadable: Option<String>, partial: bool) -> Result<()> {
        self.stats.directories += 1;
        let partial = partial || unreadable.is_some();
        let node = if self.stack.is_empty() {
            self.saw_root = true;
            DirNode {
                dest: self.cfg.dest.clone(),
                rel: Vec::new(),
                meta,
                parent: None,
                pending: 0,
                ended: false,
                existed: !self.cfg.fresh,
                partial,
                seen: Vec::new(),
                last: None,
                bases: self.cfg.bases.iter().cloned().map(Some).collect(),
                meta_differs: false,
            }
        } else {
            let (parent, rel) = self.enter_name(name)?;
            let (dest, existed) = self.open_child_dir(parent, name, &rel)?;
            let bases = self
                .node(parent)
                .bases
                .iter()
                .map(|b| b.as_ref().and_then(|b| b.try_open_dir(name).ok().flatten()))
                .collect();
            self.node_mut(parent).pending += 1;
            DirNode {
                dest,
                rel,
                meta,
                parent: Some(parent),
                pending: 0,
                ended: false,
                existed,
                partial,
                seen: Vec::new(),
                last: None,
                bases,
                meta_differs: false,
            }
        };
        let mut node = node;
        let stored = self.cfg.privs.storable(&node.meta);
        self.rec.push(record(&node.rel, crate::manifest::Kind::Dir, 0, &stored), Content::Known(None));
        if node.existed
            && let Some(dest) = &node.dest
        {
            // Decided now, before this run writes inside it and moves its mtime.
            let want = self.cfg.privs.storable(&node.meta);
            node.meta_differs =
                !(meta::stat_matches(&dest.stat_self()?, &want) && meta::read_dir_xattrs(dest)? == want.xattrs);
        }
        if let Some(err) = unreadable {
            self.problem(ProblemKind::Unreadable, &node.rel, format!("directory not listed: {err}"));
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
        Ok(())
    }

    /// Opens or creates the destination directory `name`; returns it (absent
    /// in a dry run when it would be created) and whether it already existed.
    fn open_child_dir(&mut self, parent: usize, name: &[u8], rel: &[u8]) -> Result<(Option<Dir>, bool)> {
        let node = self.node(parent);
        let Some(pdest) = node.dest.clone() else {
            // A dry run inside a directory that would be created.
            self.act(Action::Mkdir, rel, false);
            return Ok((None, false));
        };
        if node.existed
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
        let node = self.node_mut(idx);
        node.ended = true;
        node.bases.clear();
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
            let node = self.dirs[idx].take().expect("live directory node");
            self.free.push(idx);
            if let Some(dest) = &node.dest {
                if node.existed && self.cfg.delete && !node.partial {
                    self.remove_extras(dest, &node)?;
                }
                // A restore of chosen paths leaves the metadata of directories
                // that were already there on the way to them.
                let leave = self.cfg.policy == Policy::Restore && node.partial && node.existed;
                if node.meta_differs && !leave {
                    self.act(Action::Meta, &node.rel, true);
                    self.stats.metadata_fixed += 1;
                }
                if !self.cfg.dry_run && !leave {
                    let problems = meta::apply(&Target::Dir(dest), &node.meta, self.cfg.privs)
                        .with_context(|| format!("setting metadata of directory {}", Shown(&node.rel)))?;
                    self.apply_problems(&node.rel, problems);
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

    fn remove_extras(&mut self, dest: &Dir, node: &DirNode) -> Result<()> {
        let names = dest.names().with_context(|| format!("listing {}", Shown(&node.rel)))?;
        for name in names {
            if node.seen.binary_search(&name).is_ok() {
                continue;
            }
            let rel = join(&node.rel, &name);
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

    fn dest_of(&self, d: usize) -> Option<Dir> {
        self.node(d).dest.clone()
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
        let node = self.node(d);
        let dest_sim = match (&node.dest, node.existed) {
            (Some(dest), true) => {
                compare_file(dest, &name, size, &want, tree).with_context(|| format!("looking at {}", Shown(&rel)))?
            }
            _ => Similarity::Missing,
        };
        let base_sims = match sims {
            Some(s) if s.len() == node.bases.len() => s,
            _ => base_similarities(&node.bases, &name, size, &want),
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
                content = Content::Known(self.rec.carried(None, &rel, size, &want));
                true
            }
            FileAction::FixMeta => {
                self.fix_meta_in_place(d, &name, &rel, &meta)?;
                true
            }
            FileAction::Link(i) => {
                self.link_from_basis(d, i, &name, &rel, &meta, size, dest_sim)?;
                content = Content::Known(self.rec.carried(Some(i), &rel, size, &want));
                true
            }
            FileAction::Copy(origin) => {
                self.copy_local(d, origin, &name, &rel, &meta, size, replacing)?;
                let from = match origin {
                    Origin::Dest => None,
                    Origin::Basis(i) => Some(i),
                };
                content = Content::Known(self.rec.carried(from, &rel, size, &want));
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
        self.rec.push(record(&rel, crate::manifest::Kind::File, size, &want), content);
        Ok(())
    }

    /// A directory sits where a non-directory must go: remove it first, since
    /// a rename can't replace it.
    fn clear_dir_for_file(&mut self, d: usize, name: &[u8], rel: &[u8]) -> Result<()> {
        let Some(dest) = self.dest_of(d) else {
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
                self.rec.push(record(rel, crate::manifest::Kind::File, size, want), Content::Known(hash));
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
                self.rec.push(record(rel, crate::manifest::Kind::File, size, want), Content::Waiting(ticket));
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
        let dest = self.dest_of(d);
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
        let Some(dest) = self.dest_of(d) else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let file = dest.open_file(name).with_context(|| format!("opening {}", Shown(rel)))?;
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
        let Some(dest) = self.dest_of(d) else {
            return Ok(());
        };
        if self.cfg.dry_run {
            return Ok(());
        }
        let base = self.node(d).bases[i].clone().expect("the basis the plan chose");
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
        let Some(dest) = self.dest_of(d) else {
            self.stats.copied_locally += 1;
            return Ok(());
        };
        if self.cfg.dry_run {
            self.stats.copied_locally += 1;
            return Ok(());
        }
        let src_dir = match origin {
            Origin::Dest => dest.clone(),
            Origin::Basis(i) => self.node(d).bases[i].clone().expect("the basis the plan chose"),
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
        self.stats.bytes_written += size;
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
        let basis_dir = delta_base.and_then(|origin| match origin {
            Origin::Dest => self.dest_of(d),
            Origin::Basis(i) => self.node(d).bases[i].clone(),
        });
        let basis = basis_dir.and_then(|dir| receive::open_basis(&dir, &name, self.cfg.policy));
        let delta = basis.is_some();
        self.act(if delta { Action::Delta } else { Action::Fetch }, rel, replacing);
        self.stats.bytes_to_fetch += size;
        if self.cfg.dry_run {
            if delta {
                self.stats.fetched_delta += 1;
            } else {
                self.stats.fetched_whole += 1;
            }
            return Ok(ticket);
        }
        let p = Pending { id: 0, ticket, dir: d, name, meta, size, basis, sig_len: 0, group, waiters: Vec::new() };
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
        let path = join(&self.node(p.dir).rel, &p.name);
        self.send(&SinkMsg::Fetch(Fetch { id: p.id, path, signature }))?;
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
        let r = crate::manifest::Record {
            target: Some(target.to_vec()),
            ..record(&rel, crate::manifest::Kind::Symlink, 0, &want)
        };
        self.rec.push(r, Content::Known(None));
        let existing = self.existing(d, name, &rel)?;
        if let Some(dest) = self.dest_of(d)
            && let Some(st) = &existing
            && file_type(st) == FileType::Symlink
            && dest.read_link(name).is_ok_and(|t| t == target)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, true);
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
            SpecialKind::Fifo => crate::manifest::Kind::Fifo,
            SpecialKind::Char => crate::manifest::Kind::Char,
            SpecialKind::Block => crate::manifest::Kind::Block,
        };
        let rdev_of = if kind == SpecialKind::Fifo { 0 } else { rdev };
        self.rec
            .push(crate::manifest::Record { rdev: rdev_of, ..record(&rel, kind_of, 0, &want) }, Content::Known(None));
        let existing = self.existing(d, name, &rel)?;
        let wanted_type = match kind {
            SpecialKind::Fifo => FileType::Fifo,
            SpecialKind::Char => FileType::CharacterDevice,
            SpecialKind::Block => FileType::BlockDevice,
        };
        if let Some(dest) = self.dest_of(d)
            && let Some(st) = &existing
            && file_type(st) == wanted_type
            && (kind == SpecialKind::Fifo || st.st_rdev == rdev)
        {
            if same_meta(&dest, name, st, &want, self.tree())? {
                self.stats.kept += 1;
                return Ok(());
            }
            if self.cfg.policy == Policy::Restore {
                return self.fix_meta_at(&dest, name, &rel, meta, false);
            }
        }
        self.create_at(d, name, &rel, meta, existing.as_ref(), |dir| TempEntry::special(dir, kind, rdev))
    }

    /// The destination's current entry `name`, if the directory existed.
    fn existing(&self, d: usize, name: &[u8], rel: &[u8]) -> Result<Option<Stat>> {
        let node = self.node(d);
        match (&node.dest, node.existed) {
            (Some(dest), true) => dest.try_stat(name).with_context(|| format!("looking at {}", Shown(rel))),
            _ => Ok(None),
        }
    }

    fn fix_meta_at(&mut self, dest: &Dir, name: &[u8], rel: &[u8], meta: &Meta, symlink: bool) -> Result<()> {
        self.act(Action::Meta, rel, true);
        self.stats.metadata_fixed += 1;
        if self.cfg.dry_run {
            return Ok(());
        }
        let problems = meta::apply(&Target::At { dir: dest, name, symlink }, meta, self.cfg.privs)?;
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
        let Some(dest) = self.dest_of(d) else {
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
