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

use crate::fs::meta::Privileges;
use crate::fs::safefs::{Chain, Dir};
use crate::plan::Similarity;
use crate::wire::frame::Frame;
use crate::wire::msg::{Entry, SourceMsg};
use crate::wire::{ProtocolError, decode};

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
/// of the entry being listed (a bounded number of descriptors, see [`Chain`]).
pub struct Ahead {
    bases: Vec<Dir>,
    privs: Privileges,
    chains: Vec<Chain>,
    /// The current directory in each basis, once a file asked for it.
    tops: Option<Vec<Option<Dir>>>,
    /// Directories open in the listing, the root included.
    depth: usize,
    /// Off (no bases), or stopped by a listing the sink will refuse.
    off: bool,
}

impl Ahead {
    /// Compares with `bases` (none: only decodes).
    pub fn new(bases: Vec<Dir>, privs: Privileges) -> Ahead {
        let off = bases.is_empty();
        Ahead { bases, privs, chains: Vec::new(), tops: None, depth: 0, off }
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
        let is_root = self.depth == 0;
        if entry.validate(is_root).is_err() {
            self.off = true;
            return None;
        }
        match entry {
            Entry::Dir { name, .. } => {
                self.tops = None;
                if is_root {
                    self.chains = self.bases.iter().cloned().map(Chain::new).collect();
                } else {
                    for chain in &mut self.chains {
                        chain.enter_if_dir(name);
                    }
                }
                self.depth += 1;
                None
            }
            Entry::End => {
                self.tops = None;
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    // The root ended: anything after it is the sink's to refuse.
                    self.off = true;
                } else {
                    for chain in &mut self.chains {
                        chain.pop();
                    }
                }
                None
            }
            Entry::File { name, meta, size, .. } => {
                if self.depth == 0 {
                    return None;
                }
                let chains = &mut self.chains;
                let dirs = self.tops.get_or_insert_with(|| chains.iter_mut().map(|c| c.top().ok().flatten()).collect());
                let want = self.privs.storable(meta);
                Some(super::files::base_similarities(dirs, name, *size, &want))
            }
            Entry::Symlink { .. } | Entry::Special { .. } | Entry::Skipped { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::{self, Meta};
    use crate::plan::Similarity::{ContentDiffers, MetaDiffers, Missing, Same};

    fn file(name: &[u8], meta: Meta, size: u64) -> Entry {
        Entry::File { name: name.to_vec(), meta, size, sparse: false, link: None }
    }

    fn dir(name: &[u8], meta: &Meta) -> Entry {
        Entry::Dir { name: name.to_vec(), meta: meta.clone(), unreadable: None, partial: false }
    }

    #[test]
    fn files_are_compared_with_the_same_path_in_each_basis() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, older) = (tmp.path().join("old"), tmp.path().join("older"));
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123);
        for b in [&old, &older] {
            std::fs::create_dir_all(b.join("sub")).unwrap();
            std::fs::write(b.join("sub/same"), b"abc").unwrap();
            std::fs::File::options().write(true).open(b.join("sub/same")).unwrap().set_modified(when).unwrap();
        }
        std::fs::write(older.join("only-older"), b"xy").unwrap();
        let bases = [&old, &older].map(|p| Dir::open_path(p).unwrap()).to_vec();
        let privs = Privileges::current();
        let st = rustix::fs::lstat(old.join("sub/same")).unwrap();
        let same = meta::from_stat(&st, meta::read_xattrs(&bases[0].open_dir(b"sub").unwrap(), b"same").unwrap());
        let root = Meta::default();

        let mut ahead = Ahead::new(bases, privs);
        let batch = [
            dir(b"", &root),
            file(b"missing", same.clone(), 3),
            file(b"only-older", Meta { mtime: same.mtime - 100, ..same.clone() }, 2),
            dir(b"sub", &root),
            file(b"same", same.clone(), 3),
            file(b"same", Meta { mode: same.mode ^ 0o040, ..same.clone() }, 3),
            file(b"same", same.clone(), 4),
            Entry::End,
            Entry::End,
        ];
        let got: Vec<_> = batch.iter().map(|e| ahead.probe(e)).collect();
        assert_eq!(got[0], None);
        assert_eq!(got[1], Some(vec![Missing, Missing]));
        assert_eq!(got[2], Some(vec![Missing, ContentDiffers]), "another mtime");
        assert_eq!(got[4], Some(vec![Same, Missing]), "the first basis that has it the same is enough");
        assert_eq!(got[5], Some(vec![MetaDiffers, MetaDiffers]));
        assert_eq!(got[6], Some(vec![ContentDiffers, ContentDiffers]));
        assert!(ahead.off, "off once the root ended");
    }

    #[test]
    fn a_name_the_sink_would_refuse_stops_the_look_ahead() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("b")).unwrap();
        let mut ahead = Ahead::new(vec![Dir::open_path(&tmp.path().join("b")).unwrap()], Privileges::current());
        let root = Meta::default();
        assert_eq!(ahead.probe(&dir(b"", &root)), None);
        assert_eq!(ahead.probe(&dir(b"..", &root)), None);
        assert!(ahead.off);
        assert_eq!(ahead.probe(&file(b"x", root.clone(), 1)), None, "nothing is looked at any more");
    }

    #[test]
    fn without_bases_it_only_decodes() {
        let mut ahead = Ahead::new(Vec::new(), Privileges::current());
        let mut enc = crate::wire::frame::Encoder::new(false);
        let wire = enc.msg(&SourceMsg::Entries(vec![dir(b"", &Meta::default()), Entry::End]));
        let frame = crate::wire::frame::FrameReader::new(&wire[..]).read().unwrap().unwrap();
        match ahead.stage(frame).unwrap() {
            Input::Entries(batch, sims) => {
                assert_eq!(batch.len(), 2);
                assert!(sims.iter().all(Option::is_none));
            }
            _ => panic!("a listing batch"),
        }
    }
}
