//! The sink's side of the manifest: one record per entry written, in listing
//! order, with the content hash computed on fetched data or carried over
//! from the manifest of the tree a file was linked or copied from.
//!
//! A hash is carried over only if it is a digest of the version this
//! manifest records ([`crate::digest::Version::V2`]). A basis whose manifest
//! is of format 1 holds plain BLAKE3 hashes: the sink computes the file's
//! version 2 digest instead (once per file, in proportion to its data), so
//! no file of the new snapshot lacks a hash.

use crate::digest::Version;
use crate::fs::meta::Meta;
use crate::store::manifest::{Cursor, Kind, ManifestWriter, Record, xattr_digest};

/// Manifests of the trees a file may come from, newest first: the first
/// that has the path answers.
#[derive(Default)]
pub struct ManifestSet {
    cursors: Vec<Cursor>,
}

impl ManifestSet {
    pub fn new(cursors: Vec<Cursor>) -> ManifestSet {
        ManifestSet { cursors }
    }

    /// The recorded hash of `path`, if a manifest has it for a file of this
    /// size and mtime.
    fn hash(&mut self, path: &[u8], size: u64, meta: &Meta) -> Carried {
        self.cursors
            .iter_mut()
            .find_map(|c| {
                let digest = c.digest();
                c.find(path)
                    .filter(|r| {
                        r.kind == Kind::File
                            && r.size == size
                            && r.mtime == meta.mtime
                            && r.mtime_nsec == meta.mtime_nsec
                    })
                    .and_then(|r| r.hash)
                    .map(|h| match digest {
                        Version::V2 => Carried::Hash(h),
                        Version::V1 => Carried::Legacy,
                    })
            })
            .unwrap_or(Carried::None)
    }
}

/// What a manifest of the tree a file comes from says about its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Its digest, of the version this manifest records.
    Hash([u8; 32]),
    /// A digest of an older version: the file must be hashed again.
    Legacy,
    /// Nothing (no manifest, or no record of this file as it is).
    None,
}

/// Where a file's content hash comes from.
#[derive(Clone, Copy)]
pub enum Content {
    /// Known now (carried over, or none to be had).
    Known(Option<[u8; 32]>),
    /// Fetched data: known when ticket's data is written.
    Waiting(u64),
}

/// The manifest being written, and those it carries hashes over from.
#[derive(Default)]
pub struct Recorder {
    pub writer: Option<ManifestWriter>,
    /// The destination's own earlier manifests (a resumed snapshot).
    pub dest: ManifestSet,
    /// One per basis, in the sink's basis order.
    pub bases: Vec<ManifestSet>,
}

/// The record of an entry with stored metadata `meta`.
pub fn record(path: &[u8], kind: Kind, size: u64, meta: &Meta) -> Record {
    Record {
        path: path.to_vec(),
        kind,
        size,
        mtime: meta.mtime,
        mtime_nsec: meta.mtime_nsec,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        target: None,
        rdev: 0,
        xattrs: xattr_digest(&meta.xattrs),
        hash: None,
    }
}

impl Recorder {
    pub fn active(&self) -> bool {
        self.writer.is_some()
    }

    /// Records held in memory until the hash they wait for arrives.
    pub fn held(&self) -> usize {
        self.writer.as_ref().map_or(0, ManifestWriter::held)
    }

    /// Adds a record; a write error stops the manifest (the snapshot goes on
    /// without one, like a snapshot from before manifests).
    pub fn push(&mut self, record: Record, content: Content) {
        let Some(w) = self.writer.as_mut() else { return };
        let (record, waiting) = match content {
            Content::Known(hash) => (Record { hash, ..record }, None),
            Content::Waiting(ticket) => (record, Some(ticket)),
        };
        if let Err(e) = w.push(record, waiting) {
            crate::warn!("the manifest could not be written, the snapshot will have none: {e}");
            self.writer = None;
        }
    }

    /// The hash a basis (`Some(i)`) or the destination (`None`) recorded.
    pub fn carried(&mut self, from: Option<usize>, path: &[u8], size: u64, meta: &Meta) -> Carried {
        if !self.active() {
            return Carried::None;
        }
        match from {
            None => self.dest.hash(path, size, meta),
            Some(i) => self.bases.get_mut(i).map_or(Carried::None, |b| b.hash(path, size, meta)),
        }
    }

    pub fn resolve(&mut self, ticket: u64, hash: [u8; 32], size: u64) {
        let Some(w) = self.writer.as_mut() else { return };
        if let Err(e) = w.resolve(ticket, hash, size) {
            crate::warn!("the manifest could not be written, the snapshot will have none: {e}");
            self.writer = None;
        }
    }

    /// The entry at `path` waiting for `ticket` is not in the snapshot.
    pub fn drop_entry(&mut self, ticket: u64, path: &[u8]) {
        let Some(w) = self.writer.as_mut() else { return };
        if let Err(e) = w.drop_entry(ticket, path) {
            crate::warn!("the manifest could not be written, the snapshot will have none: {e}");
            self.writer = None;
        }
    }
}
