//! Fetches: each file the plan says to fetch is asked for at once (its
//! delta signature, if any, within [`SIGNATURE_BUDGET`]); answers come back
//! in request order and are received by [`super::receive`]. A file the
//! source can't read is left out, and another name of its inode leads its
//! hardlink group.

use anyhow::Result;

use super::receive;
use super::{Group, Sink, violation};
use crate::fs::meta::Meta;
use crate::plan::{Origin, Policy};
use crate::report::{Action, ProblemKind};
use crate::wire::msg::{Fetch, ReadError, SinkMsg};

/// Most bytes of signatures the source holds at once; more delta requests
/// wait until answers come back.
const SIGNATURE_BUDGET: usize = 64 << 20;

/// A regular file whose data was asked for.
pub(super) struct Pending {
    pub(super) id: u64,
    /// Stable across retries: what manifest records of this content wait for.
    pub(super) ticket: u64,
    pub(super) dir: usize,
    pub(super) name: Vec<u8>,
    pub(super) meta: Meta,
    pub(super) size: u64,
    pub(super) basis: Option<receive::Basis>,
    /// Data an interrupted fetch of this file left: asked from its end on.
    pub(super) partial: Option<receive::Partial>,
    /// Bytes of the signature sent with the request.
    pub(super) sig_len: usize,
    pub(super) group: Option<u64>,
    /// Later members of its hardlink group: (directory node, name).
    pub(super) waiters: Vec<(usize, Vec<u8>)>,
}

impl Pending {
    /// A request for the data of `name` in directory node `dir`, not sent yet.
    pub(super) fn new(dir: usize, name: Vec<u8>, meta: Meta, size: u64, group: Option<u64>) -> Pending {
        Pending {
            id: 0,
            ticket: 0,
            dir,
            name,
            meta,
            size,
            basis: None,
            partial: None,
            sig_len: 0,
            group,
            waiters: Vec::new(),
        }
    }
}

impl Sink<'_> {
    /// Asks for the data of `p` (at `rel`; `replacing` what the destination
    /// has), as a delta against `delta_base` where there is one. Returns the
    /// ticket its manifest record waits for.
    pub(super) fn fetch(
        &mut self,
        mut p: Pending,
        rel: &[u8],
        delta_base: Option<Origin>,
        replacing: bool,
    ) -> Result<u64> {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        p.ticket = ticket;
        let d = p.dir;
        let basis_dir = match delta_base {
            None => None,
            Some(Origin::Dest) => self.dest_of(d)?,
            Some(Origin::Basis(i)) => self.bases[i].top().ok().flatten(),
        };
        p.basis = basis_dir.and_then(|dir| receive::open_basis(&dir, &p.name, self.cfg.policy));
        let delta = p.basis.is_some();
        self.act(if delta { Action::Delta } else { Action::Fetch }, rel, replacing);
        // Sizes are the source's word: summed without overflow.
        self.stats.bytes_to_fetch = self.stats.bytes_to_fetch.saturating_add(p.size);
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
        if self.cfg.policy == Policy::Snapshot {
            p.partial = self.find_partial(d, &p.name, p.size, &p.meta);
        }
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
    pub(super) fn send_fetch(&mut self, mut p: Pending) -> Result<()> {
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
    pub(super) fn send_deferred(&mut self) -> Result<()> {
        while self.sig_outstanding < SIGNATURE_BUDGET
            && let Some(p) = self.deferred.pop_front()
        {
            self.send_fetch(p)?;
        }
        Ok(())
    }

    pub(super) fn refetch_whole(&mut self, mut pending: Pending) -> Result<()> {
        pending.basis = None;
        if let Some(p) = pending.partial.take() {
            p.discard();
        }
        self.send_fetch(pending)
    }

    /// After a fetched file is in place: link the rest of its hardlink
    /// group, and let its directory finish.
    pub(super) fn file_written(&mut self, pending: &Pending, rel: &[u8], hash: [u8; 32]) -> Result<()> {
        if let Some(g) = pending.group
            && let Some(Group::Waiting { left, .. }) = self.groups.get(&g)
        {
            let left = *left;
            self.groups.insert(g, Group::Done { rel: rel.to_vec(), left, kept: false, hash: Some(hash) });
        }
        let dest = self.dest_of(pending.dir)?.expect("fetches only happen outside dry runs");
        for (wd, wname) in &pending.waiters {
            self.link_waiter(&dest, &pending.name, *wd, wname, rel)?;
            self.node_mut(*wd).pending -= 1;
            self.maybe_finish_dir(*wd)?;
        }
        self.node_mut(pending.dir).pending -= 1;
        self.maybe_finish_dir(pending.dir)?;
        self.send_deferred()?;
        self.maybe_grant()
    }

    pub(super) fn on_failed(&mut self, id: u64, error: &ReadError) -> Result<()> {
        let pending = match self.receiving.take() {
            Some(r) if r.pending.id == id => {
                // Of no use to a later run: the file is not as it was.
                if let Some(t) = r.temp {
                    t.discard();
                }
                r.pending
            }
            Some(r) => {
                return Err(violation(format!("file {id} failed while file {} is in progress", r.pending.id)));
            }
            None => {
                if self.pending.front().map(|p| p.id) != Some(id) {
                    return Err(violation(format!("failure reported for file {id}, which was not due")));
                }
                self.pending.pop_front().expect("checked above")
            }
        };
        match error {
            ReadError::Vanished => self.give_up(pending, ProblemKind::Vanished, "disappeared before it could be read"),
            ReadError::Unreadable(e) => self.give_up(pending, ProblemKind::Unreadable, e.clone()),
            ReadError::Other(e) => self.give_up(pending, ProblemKind::Failed, e.clone()),
        }
    }

    /// The file of `pending` is not in the snapshot: report it, and let
    /// another name of the same inode try.
    pub(super) fn give_up(&mut self, pending: Pending, kind: ProblemKind, detail: impl Into<String>) -> Result<()> {
        let rel = self.path_of(pending.dir, &pending.name);
        self.problem(kind, &rel, detail);
        self.rec.drop_entry(pending.ticket, &rel);
        let Pending { dir, group, mut waiters, meta, size, ticket, partial, .. } = pending;
        if let Some(p) = partial {
            p.discard();
        }
        if waiters.is_empty() {
            if let Some(g) = group {
                self.groups.remove(&g);
            }
        } else {
            // Another name of the same inode may still be readable: it leads
            // the group now, and the others wait for it. Its directory already
            // counts it as pending.
            let (wd, wname) = waiters.remove(0);
            let lead = Pending { ticket, waiters, ..Pending::new(wd, wname, meta, size, group) };
            self.send_fetch(lead)?;
        }
        self.node_mut(dir).pending -= 1;
        self.maybe_finish_dir(dir)?;
        self.send_deferred()?;
        self.maybe_grant()
    }
}
