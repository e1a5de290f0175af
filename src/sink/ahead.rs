//! Comparing files with the bases ahead of the sink, on the reader thread.
//!
//! In a snapshot of a tree that mostly did not change, most of the sink's
//! time goes to two things per file: comparing it with the previous snapshot
//! (`lstat`, then its xattrs) and hardlinking it there. The comparison only
//! reads the bases, which no one writes during a run, so the thread that
//! reads frames off the wire does it for each listing batch while the sink
//! is still busy with the batch before: the sink gets each file's similarity
//! with every basis ready-made, and only links.
//!
//! Names are checked here exactly as the sink checks them before anything
//! touches the disk; a listing that breaks the rules stops the look-ahead,
//! and the sink, which sees the same entries, ends the session.

use crate::meta::Privileges;
use crate::plan::Similarity;
use crate::protocol::frame::Frame;
use crate::protocol::msg::{Entry, SourceMsg};
use crate::protocol::{ProtocolError, decode};
use crate::safefs::Dir;

/// What the sink gets from the reader thread.
pub enum Input {
    /// A message other than a listing batch.
    Msg(SourceMsg),
    /// A listing batch, with one comparison per entry (`None` where there was
    /// nothing to compare or no look-ahead).
    Entries(Vec<Entry>, Vec<Option<Vec<Similarity>>>),
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Delta {
        out_len: u32,
        delta: Vec<u8>,
    },
}

/// The look-ahead's state: the same directory in each basis, along the path
/// of the entry being listed.
pub struct Ahead {
    bases: Vec<Dir>,
    privs: Privileges,
    stack: Vec<Vec<Option<Dir>>>,
    /// Off (no bases), or stopped by a listing the sink will refuse.
    off: bool,
}

impl Ahead {
    /// Compares with `bases` (none: only decodes).
    pub fn new(bases: Vec<Dir>, privs: Privileges) -> Ahead {
        let off = bases.is_empty();
        Ahead { bases, privs, stack: Vec::new(), off }
    }

    /// Turns a frame into the sink's input, comparing a listing batch's files.
    pub fn stage(&mut self, frame: Frame) -> Result<Input, ProtocolError> {
        Ok(match frame {
            Frame::Msg(body) => match decode::<SourceMsg>(&body)? {
                SourceMsg::Entries(batch) => {
                    let sims = batch.iter().map(|e| self.probe(e)).collect();
                    Input::Entries(batch, sims)
                }
                msg => Input::Msg(msg),
            },
            Frame::Data { offset, data } => Input::Data { offset, data },
            Frame::Delta { out_len, delta } => Input::Delta { out_len, delta },
        })
    }

    fn probe(&mut self, entry: &Entry) -> Option<Vec<Similarity>> {
        if self.off {
            return None;
        }
        let is_root = self.stack.is_empty();
        if entry.validate(is_root).is_err() {
            self.off = true;
            return None;
        }
        match entry {
            Entry::Dir { name, .. } => {
                let dirs = match self.stack.last() {
                    None => self.bases.iter().cloned().map(Some).collect(),
                    Some(parent) => {
                        parent.iter().map(|b| b.as_ref().and_then(|b| b.try_open_dir(name).ok().flatten())).collect()
                    }
                };
                self.stack.push(dirs);
                None
            }
            Entry::End => {
                self.stack.pop();
                if self.stack.is_empty() {
                    // The root ended: anything after it is the sink's to refuse.
                    self.off = true;
                }
                None
            }
            Entry::File { name, meta, size, .. } => {
                let dirs = self.stack.last()?;
                let want = self.privs.storable(meta);
                Some(super::base_similarities(dirs, name, *size, &want))
            }
            Entry::Symlink { .. } | Entry::Special { .. } | Entry::Skipped { .. } => None,
        }
    }
}
