//! The modification times a destination's filesystem can hold, asked of it
//! once per run (see [`TimeRange`]): comparisons use what it stores, so a
//! file with a time out of its range is linked, not fetched again, next run.

use rustix::fs::{Mode, Timespec, Timestamps, UTIME_OMIT};

use super::safefs::Dir;

/// The modification times a filesystem holds. Linux stores what it is asked
/// within `[min, max]` seconds and clamps the rest to the nearer bound (ext4:
/// 1901 to 2446) without an error; at a bound, and below the filesystem's
/// granularity, nanoseconds are dropped (`timestamp_truncate` in the
/// kernel). A file whose source time is out of range is therefore stored
/// with another time: comparisons must expect that value, or such a file
/// would be fetched again on every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub min: i64,
    pub max: i64,
    /// Nanoseconds per unit of stored time (1: exact; 1e9: whole seconds).
    pub granularity: u32,
}

impl TimeRange {
    /// No limit: what the kernel allows (tmpfs, btrfs).
    pub const ANY: TimeRange = TimeRange { min: i64::MIN, max: i64::MAX, granularity: 1 };

    /// Asks the filesystem of `dir`: sets extreme times on an unnamed file
    /// (`O_TMPFILE`: nothing appears in the directory, nothing of it changes)
    /// and reads back what was kept. [`Self::ANY`] where no such file can be
    /// made (then the kernel still clamps, and comparisons just miss it).
    pub fn probe(dir: &Dir) -> TimeRange {
        let flags = rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::openat(dir, ".", flags, Mode::from_raw_mode(0o600)) else {
            return TimeRange::ANY;
        };
        let kept = |sec: i64, nsec: u32| -> Option<(i64, u32)> {
            let times = Timestamps {
                last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
                last_modification: Timespec { tv_sec: sec, tv_nsec: i64::from(nsec) },
            };
            rustix::fs::futimens(&fd, &times).ok()?;
            let st = rustix::fs::fstat(&fd).ok()?;
            Some((st.st_mtime, st.st_mtime_nsec as u32))
        };
        let (Some((max, _)), Some((min, _))) = (kept(i64::MAX, 0), kept(i64::MIN, 0)) else {
            return TimeRange::ANY;
        };
        if min >= max {
            return TimeRange::ANY;
        }
        // A time well inside the range, with every nanosecond digit set.
        let inside = 1_600_000_000i64.clamp(min.saturating_add(1), max.saturating_sub(1));
        let granularity = match kept(inside, 999_999_999) {
            Some((_, n)) if n < 999_999_999 && 1_000_000_000 % (1_000_000_000 - n) == 0 => 1_000_000_000 - n,
            _ => 1,
        };
        TimeRange { min, max, granularity }
    }

    /// The time the filesystem keeps when asked for `sec`.`nsec`.
    pub fn clamp(&self, sec: i64, nsec: u32) -> (i64, u32) {
        let sec = sec.clamp(self.min, self.max);
        if sec == self.min || sec == self.max {
            return (sec, 0);
        }
        (sec, nsec - nsec % self.granularity.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::meta::{Meta, Privileges};

    #[test]
    fn times_are_clamped_as_the_kernel_stores_them() {
        let ext4 = TimeRange { min: -(1 << 31), max: 15_032_385_535, granularity: 1 };
        assert_eq!(ext4.clamp(1_600_000_000, 123), (1_600_000_000, 123));
        assert_eq!(ext4.clamp(i64::MAX, 999_999_999), (15_032_385_535, 0));
        assert_eq!(ext4.clamp(i64::MIN, 5), (-(1 << 31), 0));
        assert_eq!(TimeRange::ANY.clamp(i64::MAX, 7), (i64::MAX, 0), "at the bound, nanoseconds go");
        let seconds = TimeRange { granularity: 1_000_000_000, ..ext4 };
        assert_eq!(seconds.clamp(5, 999_999_999), (5, 0));
        let root = Privileges { root: true, uid: 0, gid: 0, times: ext4, live: false };
        let meta = Meta { mtime: i64::MAX, mtime_nsec: 1, ..Meta::default() };
        assert_eq!((root.storable(&meta).mtime, root.storable(&meta).mtime_nsec), (15_032_385_535, 0));
    }

    #[test]
    fn the_probe_finds_what_the_filesystem_keeps() {
        // Whatever the test folder's filesystem is, a time the probe says it
        // keeps as X is kept as X.
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open_path(tmp.path()).unwrap();
        let range = TimeRange::probe(&dir);
        assert!(range.min < 0 && range.max > 4_000_000_000, "{range:?}");
        let f = std::fs::File::create(tmp.path().join("f")).unwrap();
        for (sec, nsec) in [(i64::MAX, 999_999_999), (i64::MIN, 1), (1_600_000_000, 123_456_789), (17_000_000_000, 5)] {
            let times = Timestamps {
                last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
                last_modification: Timespec { tv_sec: sec, tv_nsec: i64::from(nsec) },
            };
            rustix::fs::futimens(&f, &times).unwrap();
            let st = rustix::fs::fstat(&f).unwrap();
            assert_eq!((st.st_mtime, st.st_mtime_nsec as u32), range.clamp(sec, nsec), "{sec}.{nsec}");
        }
        assert_eq!(dir.names().unwrap(), vec![b"f".to_vec()], "the probe leaves nothing behind");
    }
}
