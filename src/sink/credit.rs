//! Flow control of the listing: the source may send only as many entries as
//! the sink granted, which keeps the sink's memory flat whatever the peer
//! does (docs/design.md rule 2). Entries the sink has taken in are granted
//! again in steps, as long as the fetch window has room.

use crate::wire::ProtocolError;

/// Listing entries the source may send before it hears from us. Credit
/// outstanding never exceeds it, so the protocol refuses longer batches.
pub(super) const INITIAL: u32 = crate::wire::msg::BATCH_MAX as u32;
/// Credit is returned in steps of at least this many entries.
const STEP: u32 = 1024;

/// The listing entries granted, received, and taken in but not granted again.
#[derive(Debug, Default)]
pub(super) struct Credit {
    granted: u64,
    received: u64,
    unreported: u32,
}

impl Credit {
    /// The first grant, sent before anything is received.
    pub(super) fn start(&mut self) -> u32 {
        self.granted = u64::from(INITIAL);
        INITIAL
    }

    /// Checks that a batch of `n` entries stays within what was granted: a
    /// source that lists more than it may would grow the fetch queue
    /// without bound.
    pub(super) fn check(&self, n: u32) -> Result<(), ProtocolError> {
        let after = self.received + u64::from(n);
        if after > self.granted {
            return Err(ProtocolError::Unexpected(format!(
                "{after} listing entries sent where {} were granted (the source ignores flow control)",
                self.granted
            )));
        }
        Ok(())
    }

    /// Counts a batch of `n` entries, taken in.
    pub(super) fn taken(&mut self, n: u32) {
        self.received += u64::from(n);
        self.unreported += n;
    }

    /// The credit to grant now, if any: nothing while the fetch window is
    /// full; otherwise in steps, or at once when the source has used all it
    /// had (it is waiting for us).
    pub(super) fn due(&mut self, window_full: bool) -> Option<u32> {
        if self.unreported == 0 || window_full {
            return None;
        }
        if self.unreported < STEP && self.received < self.granted {
            return None;
        }
        let n = std::mem::take(&mut self.unreported);
        self.granted += u64::from(n);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_beyond_the_grant_is_refused_and_one_within_is_taken() {
        let mut c = Credit::default();
        assert_eq!(c.start(), INITIAL);
        assert!(c.check(INITIAL).is_ok());
        let err = c.check(INITIAL + 1).unwrap_err().to_string();
        assert!(err.contains("were granted"), "{err}");
        c.taken(INITIAL);
        // Everything granted is used: nothing more may come until we grant.
        assert!(c.check(1).is_err());
    }

    #[test]
    fn credit_returns_in_steps_and_at_once_when_the_source_waits() {
        let mut c = Credit::default();
        c.start();
        c.taken(10);
        // Few entries taken, the source still has credit: nothing yet.
        assert_eq!(c.due(false), None);
        c.taken(STEP);
        assert_eq!(c.due(false), Some(STEP + 10));
        // A source that used all its credit gets what was taken, however little.
        let left = (c.granted - c.received) as u32;
        c.taken(left);
        assert_eq!(c.due(false), Some(left));
        assert!(c.check(left).is_ok());
    }

    #[test]
    fn a_full_fetch_window_holds_the_listing_back() {
        let mut c = Credit::default();
        c.start();
        c.taken(INITIAL);
        assert_eq!(c.due(true), None);
        assert!(c.check(1).is_err(), "no credit was granted, so the source must wait");
        assert_eq!(c.due(false), Some(INITIAL));
        assert!(c.check(INITIAL).is_ok());
    }
}
