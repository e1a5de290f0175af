//! The bandwidth limit (`bwlimit`): the source's writer goes through a token
//! bucket, so the sender never sends faster than the rate on average. It
//! sits under the writer thread, where every frame passes (listing, data,
//! deltas), so the walker and the file server simply wait on their bounded
//! outbox when the wire is paced, as they do on a slow link. A paced write
//! never waits longer than a tenth of a second per chunk, so the peer's idle
//! timeout (docs/design.md rule 9) sees data moving at any rate.

use std::io::{self, Write};
use std::time::{Duration, Instant};

/// Bytes the bucket may hold after a pause: a burst of at most this long
/// at the full rate, so an idle moment is not paid back as a flood.
const BURST: Duration = Duration::from_millis(250);

/// A writer that sends at most `rate` bytes per second on average.
pub struct Paced<W> {
    inner: W,
    rate: u64,
    /// When everything written so far is paid for at the rate.
    paid_until: Instant,
}

impl<W: Write> Paced<W> {
    /// Paces `inner` to `rate` bytes per second (`rate` > 0).
    pub fn new(inner: W, rate: u64) -> Paced<W> {
        assert!(rate > 0, "a pace of 0 bytes/s is no limit: don't pace");
        Paced { inner, rate, paid_until: Instant::now() }
    }

    /// The most written in one go: a tenth of a second's worth.
    fn chunk(&self) -> usize {
        usize::try_from(self.rate / 10).unwrap_or(usize::MAX).clamp(1, 256 << 10)
    }
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let now = Instant::now();
        // Unused allowance from a pause is capped at one burst.
        if let Some(earliest) = now.checked_sub(BURST) {
            self.paid_until = self.paid_until.max(earliest);
        }
        if self.paid_until > now {
            std::thread::sleep(self.paid_until - now);
        }
        let want = buf.len().min(self.chunk());
        let n = self.inner.write(&buf[..want])?;
        self.paid_until += Duration::from_secs_f64(n as f64 / self.rate as f64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Parses a rate: bytes per second, with an optional `K`, `M` or `G`
/// suffix (powers of 1024, like rsync's `--bwlimit`; a trailing `B`, `/s`
/// or `iB` is allowed). `0` means no limit.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        _ => return Err(format!("bad rate {s:?}: expected bytes per second, like 500K, 5M or 1G")),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("bad rate {s:?}: expected bytes per second, like 500K, 5M or 1G"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("rate {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_binary_suffixes() {
        assert_eq!(parse_rate("5M"), Ok(5 << 20));
        assert_eq!(parse_rate("500k"), Ok(500 << 10));
        assert_eq!(parse_rate("1G"), Ok(1 << 30));
        assert_eq!(parse_rate("1MiB"), Ok(1 << 20));
        assert_eq!(parse_rate("2MB/s"), Ok(2 << 20));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("0"), Ok(0));
        for bad in ["5X", "", "M", "-1", "1.5M", "5 M", "99999999999999999999G", "18014398509481984G"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_paced_writer_keeps_to_its_rate() {
        let rate = 200 << 10;
        let mut w = Paced::new(Vec::new(), rate);
        let started = Instant::now();
        w.write_all(&vec![7u8; 100 << 10]).unwrap();
        w.write_all(&vec![7u8; 100 << 10]).unwrap();
        // 200 KiB at 200 KiB/s, less the first burst allowance: the lower
        // bound is the guarantee; no upper bound is asserted.
        assert!(started.elapsed() >= Duration::from_millis(700), "{:?}", started.elapsed());
        assert_eq!(w.inner.len(), 200 << 10);
    }
}
