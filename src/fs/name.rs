//! Names: checked before any syscall sees one from a peer ([`check_name`]),
//! shown escaped ([`Shown`]), joined into paths, and made up for temporary
//! entries.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;

/// Longest single name Linux accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Why a name from a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name is `.` or `..`")]
    Dots,
    #[error("name contains `/`")]
    Slash,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("name longer than {NAME_MAX} bytes")]
    TooLong,
}

/// Checks that `name` is one path component that can't climb or be split.
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == b"." || name == b".." {
        return Err(NameError::Dots);
    }
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    if name.contains(&b'/') {
        return Err(NameError::Slash);
    }
    if name.contains(&0) {
        return Err(NameError::Nul);
    }
    Ok(())
}

/// A relative path as raw bytes, printed with non-UTF-8 bytes and control
/// characters escaped. In messages a long path is cut in the middle: its
/// first and last [`SHOWN_KEEP`] bytes around `…(N bytes)…`, N the bytes
/// left out (a hostile server's 40 kB path must not flood a log or a mail).
/// The alternate form (`{:#}`) prints it whole, for listings whose lines are
/// the paths themselves.
pub struct Shown<'a>(pub &'a [u8]);

/// Bytes kept at each end of a long path in messages.
pub const SHOWN_KEEP: usize = 100;

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        // Cutting saves something only beyond the length of the marker.
        if f.alternate() || p.len() <= 2 * SHOWN_KEEP + 24 {
            return escaped(f, p);
        }
        // Cut between characters, never inside one.
        let continuation = |b: u8| b & 0xc0 == 0x80;
        let mut head = SHOWN_KEEP;
        while head > SHOWN_KEEP - 3 && continuation(p[head]) {
            head -= 1;
        }
        let mut tail = p.len() - SHOWN_KEEP;
        while tail < p.len() - SHOWN_KEEP + 3 && continuation(p[tail]) {
            tail += 1;
        }
        escaped(f, &p[..head])?;
        write!(f, "…({} bytes)…", tail - head)?;
        escaped(f, &p[tail..])
    }
}

fn escaped(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        for b in chunk.invalid() {
            write!(f, "\\x{b:02x}")?;
        }
    }
    Ok(())
}

/// Joins a relative directory path and a name with `/`.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    out.extend_from_slice(dir);
    if !dir.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// Converts a `CStr` name from the kernel into bytes.
pub fn cstr_bytes(name: &CStr) -> &[u8] {
    name.to_bytes()
}

/// Creates a name for a temporary file that no source name will match by
/// accident: `.rbk~` and 16 hex digits, a random start drawn once per process
/// plus a counter. (Callers create it with `O_EXCL` and retry on collision.)
pub fn temp_name() -> Vec<u8> {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // getrandom only fails before the kernel's pool is ready at early
        // boot; time and pid still make collisions negligible.
        if rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).is_err() {
            let t =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            bytes = (t ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
        }
        u64::from_le_bytes(bytes)
    });
    let n = start.wrapping_add(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!(".rbk~{n:016x}").into_bytes()
}

/// Makes a `CString` of a name already checked by [`check_name`].
pub fn name_cstring(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(check_name(b""), Err(NameError::Empty));
        assert_eq!(check_name(b"."), Err(NameError::Dots));
        assert_eq!(check_name(b".."), Err(NameError::Dots));
        assert_eq!(check_name(b"a/b"), Err(NameError::Slash));
        assert_eq!(check_name(b"/"), Err(NameError::Slash));
        assert_eq!(check_name(b"a\0b"), Err(NameError::Nul));
        assert_eq!(check_name(&[b'x'; 256]), Err(NameError::TooLong));
        assert!(check_name(b"...").is_ok());
        assert!(check_name(b"\xff\xfe name\n").is_ok());
        assert!(check_name(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn shown_escapes_bytes_and_controls() {
        assert_eq!(Shown(b"a\xffb\nc").to_string(), "a\\xffb\\nc");
    }

    #[test]
    fn a_long_path_is_shown_cut_in_the_middle_and_whole_in_listings() {
        let path: Vec<u8> = b"a/".repeat(20_000);
        let short = Shown(&path).to_string();
        assert_eq!(short, format!("{}…({} bytes)…{}", "a/".repeat(50), 40_000 - 200, "a/".repeat(50)));
        assert_eq!(format!("{:#}", Shown(&path)).len(), 40_000);
        // Never cut inside a character.
        let path = "é".repeat(500);
        let short = Shown(path.as_bytes()).to_string();
        assert!(short.starts_with(&"é".repeat(50)) && short.ends_with(&"é".repeat(50)), "{short}");
        assert!(!short.contains("\\x"), "{short}");
        // Short paths are whole.
        assert_eq!(Shown(&[b'x'; 224]).to_string().len(), 224);
    }

    #[test]
    fn join_handles_root() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
    }

    #[test]
    fn temp_names_differ_and_are_valid() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(check_name(&a).is_ok());
    }
}
