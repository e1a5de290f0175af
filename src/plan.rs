//! Pure decisions: given how an incoming regular file compares with what the
//! destination and each basis already hold, what to do. No I/O here, so every
//! rule is unit-tested.
//!
//! The rules that matter most:
//! - A snapshot never changes an inode it did not create in this run: the
//!   destination of a resumed snapshot may hold hardlinks into older
//!   snapshots (docs/design.md rule 1), so a metadata change there is a new copy.
//! - A restore may fix metadata in place: the destination is the live tree.

/// How an existing entry compares with the incoming regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    /// Nothing of that name.
    Missing,
    /// Something that is not a regular file.
    OtherType,
    /// A regular file with another size or mtime.
    ContentDiffers,
    /// Same size and mtime, different mode, owner or xattrs.
    MetaDiffers,
    /// Same size, mtime, mode, owner and xattrs.
    Same,
}

/// Where a local copy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The destination's own current entry.
    Dest,
    /// Basis number `i` (the previous snapshot, or an interrupted one).
    Basis(usize),
}

/// What to do with one incoming regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    /// The destination already has it exactly.
    Keep,
    /// Restore only: same content, apply the metadata to the existing file.
    FixMeta,
    /// Hardlink basis `i`'s file.
    Link(usize),
    /// Same content under other metadata: copy locally (reflink when the
    /// filesystem can) and apply the new metadata to the copy.
    Copy(Origin),
    /// Ask the source for the data; as a delta against `delta_base` if set.
    Fetch { delta_base: Option<Origin> },
}

/// The write policy of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Writing a snapshot: never touch an existing inode, link from bases.
    Snapshot,
    /// Restoring into a live tree: fix in place, no bases.
    Restore,
}

/// Decides what to do with an incoming regular file.
///
/// `dest` compares it with the destination's current entry, `bases` with the
/// same path in each basis (best first). `delta` says whether the file is
/// worth a delta transfer at all (size, sparseness, transport).
pub fn file(dest: Similarity, bases: &[Similarity], policy: Policy, delta: bool) -> FileAction {
    match (dest, policy) {
        (Similarity::Same, _) => return FileAction::Keep,
        (Similarity::MetaDiffers, Policy::Restore) => return FileAction::FixMeta,
        (Similarity::MetaDiffers, Policy::Snapshot) => return FileAction::Copy(Origin::Dest),
        _ => {}
    }
    if policy == Policy::Snapshot {
        if let Some(i) = bases.iter().position(|s| *s == Similarity::Same) {
            return FileAction::Link(i);
        }
        if let Some(i) = bases.iter().position(|s| *s == Similarity::MetaDiffers) {
            return FileAction::Copy(Origin::Basis(i));
        }
    }
    if !delta {
        return FileAction::Fetch { delta_base: None };
    }
    let delta_base = if dest == Similarity::ContentDiffers {
        Some(Origin::Dest)
    } else if policy == Policy::Snapshot {
        bases.iter().position(|s| *s == Similarity::ContentDiffers).map(Origin::Basis)
    } else {
        None
    };
    FileAction::Fetch { delta_base }
}

/// Files smaller than this are always fetched whole: their signature would
/// be about as big as the change.
pub const DELTA_MIN_SIZE: u64 = 8 << 10;

/// Most blocks a signature may have: keeps it under ~7 MiB (12 bytes a
/// block), well inside one frame.
pub const SIGNATURE_BLOCKS_MAX: u64 = 600_000;

/// Largest signature block: a delta window holds at least four blocks.
pub const SIGNATURE_BLOCK_MAX: u64 = 256 << 10;

/// Block size for the rsync signature of a `size`-byte basis: about the square
/// root of the size, as rsync does, grown for huge files so the signature
/// stays bounded. `None` if the file is too large for a delta (over ~150 GiB):
/// it is then fetched whole.
pub fn signature_block_size(size: u64) -> Option<u32> {
    let bs = size.isqrt().max(size / SIGNATURE_BLOCKS_MAX + 1).clamp(512, SIGNATURE_BLOCK_MAX);
    let bs = bs.next_multiple_of(128);
    (size.div_ceil(bs) <= SIGNATURE_BLOCKS_MAX).then_some(bs as u32)
}

#[cfg(test)]
mod tests {
    use super::Similarity::*;
    use super::*;

    #[test]
    fn unchanged_file_is_linked_from_the_first_matching_basis() {
        assert_eq!(file(Missing, &[Missing, Same], Policy::Snapshot, true), FileAction::Link(1));
        assert_eq!(file(Missing, &[Same, Same], Policy::Snapshot, true), FileAction::Link(0));
    }

    #[test]
    fn chmod_only_is_a_local_copy_never_a_fetch() {
        assert_eq!(file(Missing, &[MetaDiffers], Policy::Snapshot, true), FileAction::Copy(Origin::Basis(0)));
    }

    #[test]
    fn resumed_snapshot_never_fixes_metadata_in_place() {
        // The destination's file may be a hardlink into an older snapshot.
        assert_eq!(file(MetaDiffers, &[Same], Policy::Snapshot, true), FileAction::Copy(Origin::Dest));
    }

    #[test]
    fn resumed_snapshot_keeps_finished_files() {
        assert_eq!(file(Same, &[ContentDiffers], Policy::Snapshot, true), FileAction::Keep);
    }

    #[test]
    fn restore_fixes_metadata_in_place_and_ignores_bases() {
        assert_eq!(file(MetaDiffers, &[], Policy::Restore, true), FileAction::FixMeta);
        assert_eq!(file(Missing, &[Same], Policy::Restore, true), FileAction::Fetch { delta_base: None });
    }

    #[test]
    fn changed_content_is_a_delta_against_the_best_basis() {
        assert_eq!(
            file(Missing, &[Missing, ContentDiffers], Policy::Snapshot, true),
            FileAction::Fetch { delta_base: Some(Origin::Basis(1)) }
        );
        assert_eq!(
            file(ContentDiffers, &[ContentDiffers], Policy::Snapshot, true),
            FileAction::Fetch { delta_base: Some(Origin::Dest) }
        );
        assert_eq!(
            file(ContentDiffers, &[], Policy::Restore, true),
            FileAction::Fetch { delta_base: Some(Origin::Dest) }
        );
        assert_eq!(
            file(ContentDiffers, &[ContentDiffers], Policy::Snapshot, false),
            FileAction::Fetch { delta_base: None }
        );
    }

    #[test]
    fn new_file_or_type_change_is_fetched_whole() {
        assert_eq!(file(OtherType, &[OtherType], Policy::Snapshot, true), FileAction::Fetch { delta_base: None });
        assert_eq!(file(Missing, &[], Policy::Snapshot, true), FileAction::Fetch { delta_base: None });
    }

    #[test]
    fn signature_blocks_scale_with_size() {
        assert_eq!(signature_block_size(8 << 10), Some(512));
        assert_eq!(signature_block_size(64 << 10), Some(512));
        let bs = signature_block_size(20 << 20).unwrap();
        assert!((4096..=5120).contains(&bs), "{bs}");
        let big = 100u64 << 30;
        let bs = u64::from(signature_block_size(big).unwrap());
        assert!(big.div_ceil(bs) <= SIGNATURE_BLOCKS_MAX, "{bs}");
        assert!(bs <= SIGNATURE_BLOCK_MAX && bs % 128 == 0, "{bs}");
        assert_eq!(signature_block_size(1 << 40), None);
    }
}
