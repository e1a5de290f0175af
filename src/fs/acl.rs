//! Granting one user read access in a POSIX ACL, on the raw
//! `system.posix_acl_access` / `_default` xattr value.
//!
//! Why not libacl's (or posix-acl's) write path: it recomputes the mask from
//! every group-class entry, so a named entry that a `chmod` had masked down
//! (say `user:bob:rwx` under mask `r--`) would get its write access back.
//! Here the mask only grows by the permissions being granted.
//!
//! Format (`linux/posix_acl_xattr.h`): a little-endian u32 version (2), then
//! entries of u16 tag, u16 permissions, u32 id, sorted by tag then id.

use anyhow::{Result, bail};

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

/// Read permission.
pub const R: u16 = 4;
/// Execute (search, for directories) permission.
pub const X: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AclEntry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<AclEntry>,
}

impl Acl {
    /// The ACL equivalent to a file mode (no named entries).
    pub fn from_mode(mode: u32) -> Acl {
        let p = |shift: u32| ((mode >> shift) & 7) as u16;
        Acl {
            entries: vec![
                AclEntry { tag: USER_OBJ, perm: p(6), id: UNDEFINED_ID },
                AclEntry { tag: GROUP_OBJ, perm: p(3), id: UNDEFINED_ID },
                AclEntry { tag: OTHER, perm: p(0), id: UNDEFINED_ID },
            ],
        }
    }

    /// Parses a raw xattr value.
    pub fn parse(raw: &[u8]) -> Result<Acl> {
        if raw.len() < 4 || !(raw.len() - 4).is_multiple_of(8) {
            bail!("malformed ACL of {} bytes", raw.len());
        }
        let version = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
        if version != VERSION {
            bail!("unknown ACL version {version}");
        }
        let entries = raw[4..]
            .chunks_exact(8)
            .map(|c| AclEntry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Acl { entries })
    }

    /// The raw xattr value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// What user `uid` is granted through a named entry, as the mask allows.
    pub fn effective_user(&self, uid: u32) -> u16 {
        let named = self.entries.iter().find(|e| e.tag == USER && e.id == uid).map_or(0, |e| e.perm);
        let mask = self.entries.iter().find(|e| e.tag == MASK).map_or(7, |e| e.perm);
        named & mask
    }

    /// Grants `perm` to user `uid`, growing the mask by exactly `perm`.
    /// Returns false if the user already had it (nothing to write).
    pub fn grant_user(&mut self, uid: u32, perm: u16) -> bool {
        if self.effective_user(uid) & perm == perm {
            return false;
        }
        match self.entries.iter_mut().find(|e| e.tag == USER && e.id == uid) {
            Some(e) => e.perm |= perm,
            None => self.entries.push(AclEntry { tag: USER, perm, id: uid }),
        }
        match self.entries.iter_mut().find(|e| e.tag == MASK) {
            Some(m) => m.perm |= perm,
            None => {
                // A minimal ACL had no mask: the group class was the owning
                // group's entry alone, which the new mask must keep.
                let group = self.entries.iter().find(|e| e.tag == GROUP_OBJ).map_or(0, |e| e.perm);
                self.entries.push(AclEntry { tag: MASK, perm: group | perm, id: UNDEFINED_ID });
            }
        }
        self.entries.sort_by_key(|e| (e.tag, e.id));
        true
    }

    /// The mode's group bits for this ACL: the mask if there is one.
    pub fn group_class(&self) -> u16 {
        let tag = if self.entries.iter().any(|e| e.tag == MASK) { MASK } else { GROUP_OBJ };
        self.entries.iter().find(|e| e.tag == tag).map_or(0, |e| e.perm)
    }

    /// True if the ACL has named user or group entries.
    pub fn is_extended(&self) -> bool {
        self.entries.iter().any(|e| e.tag == USER || e.tag == GROUP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granting_never_widens_a_masked_entry() {
        // user::rw-, user:bob(1000):rwx, group::r--, mask::r--, other::---
        let mut acl = Acl::from_mode(0o640);
        acl.entries.push(AclEntry { tag: USER, perm: 7, id: 1000 });
        acl.entries.push(AclEntry { tag: MASK, perm: 4, id: UNDEFINED_ID });
        acl.entries.sort_by_key(|e| (e.tag, e.id));
        assert_eq!(acl.effective_user(1000), 4);
        assert!(acl.grant_user(2000, R));
        // Bob keeps r-- effective: the mask grew by r only.
        assert_eq!(acl.effective_user(1000), 4);
        assert_eq!(acl.effective_user(2000), R);
        assert!(!acl.grant_user(2000, R), "granting twice changes nothing");
    }

    #[test]
    fn a_minimal_acl_gets_a_mask_that_keeps_the_group() {
        let mut acl = Acl::from_mode(0o750);
        assert!(!acl.is_extended());
        assert!(acl.grant_user(7, R | X));
        assert_eq!(acl.group_class(), 5);
        assert_eq!(acl.effective_user(7), 5);
        assert!(acl.is_extended());
    }

    #[test]
    fn a_masked_grant_is_granted_again() {
        // The user has r-- but a chmod shrank the mask to ---: not readable.
        let mut acl = Acl::from_mode(0o600);
        acl.entries.push(AclEntry { tag: USER, perm: R, id: 9 });
        acl.entries.push(AclEntry { tag: MASK, perm: 0, id: UNDEFINED_ID });
        acl.entries.sort_by_key(|e| (e.tag, e.id));
        assert_eq!(acl.effective_user(9), 0);
        assert!(acl.grant_user(9, R));
        assert_eq!(acl.effective_user(9), R);
    }

    #[test]
    fn bytes_roundtrip_and_garbage_is_refused() {
        let mut acl = Acl::from_mode(0o755);
        acl.grant_user(42, R | X);
        assert_eq!(Acl::parse(&acl.to_bytes()).unwrap(), acl);
        assert!(Acl::parse(&[1, 2, 3]).is_err());
        assert!(Acl::parse(&[3, 0, 0, 0]).is_err());
    }
}
