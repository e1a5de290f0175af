//! Paths between URLs and snapshots.
//!
//! A snapshot path is bytes (a server's names need not be UTF-8). In a URL
//! it travels percent-encoded byte by byte ([`encode`]), so any name goes
//! there and back unchanged; in a form's hidden field it is that encoded
//! text again. Read back, it is checked by the one rule for a path in a
//! snapshot ([`crate::store::select::normalize`]: no `..`, no NUL), then
//! opened beneath the snapshot's root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` ([`crate::fs::safefs::Dir::resolve`]): no symlink
//! on the way is followed, and the last component is only ever `lstat`ed or
//! opened with `O_NOFOLLOW`, so a symlink is shown, never followed.

use std::io;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, percent_encode};

use crate::fs::safefs::{Dir, Shown};

/// Everything but letters, digits and `-._~/` is encoded.
const ENCODED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// Bytes as URL text.
pub fn encode(bytes: &[u8]) -> String {
    percent_encode(bytes, ENCODED).to_string()
}

/// A query string or form body: `key=value` pairs, values as bytes.
#[derive(Debug, Default, Clone)]
pub struct Params(pub Vec<(String, Vec<u8>)>);

impl Params {
    /// Parses `application/x-www-form-urlencoded` text (`+` is a space).
    pub fn parse(raw: &str) -> Params {
        let decode = |s: &str| -> Vec<u8> { percent_decode(s.replace('+', " ").as_bytes()).collect() };
        Params(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (String::from_utf8_lossy(&decode(k)).into_owned(), decode(v))
                })
                .collect(),
        )
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
    }

    /// The first value of `key`, if it is UTF-8.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A snapshot path given as bytes (in a URL's query).
    pub fn path(&self, key: &str) -> Result<Vec<u8>, String> {
        clean(self.get(key).unwrap_or_default())
    }

    /// A snapshot path given as encoded text (in a form's field).
    pub fn encoded_path(&self, key: &str) -> Result<Vec<u8>, String> {
        let raw: Vec<u8> = percent_decode(self.get(key).unwrap_or_default()).collect();
        clean(&raw)
    }
}

/// Checks a path from a URL: relative to the snapshot root, no `..`, no
/// NUL; the root is the empty path.
pub fn clean(raw: &[u8]) -> Result<Vec<u8>, String> {
    crate::store::select::normalize(raw)
}

/// `(parent, name)` of a cleaned path; the root's name is empty.
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b""[..], rel),
    }
}

/// Opens the directory `rel` beneath `root`, following no symlink.
pub fn open_dir(root: &Dir, rel: &[u8]) -> io::Result<Dir> {
    if rel.is_empty() { Ok(root.clone()) } else { root.resolve_dir(rel) }
}

/// How a name or path is shown: control characters and invalid UTF-8
/// escaped (`\n`, `\u{..}`, `\xNN`) — and then, by maud, HTML-escaped.
pub fn shown(bytes: &[u8]) -> String {
    if bytes.is_empty() { "/".into() } else { format!("{:#}", Shown(bytes)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_name_goes_through_a_url_and_back() {
        let names: [&[u8]; 4] =
            [b"plain.txt", b"<script>alert(1)</script>", b"new\nline & a+b=c", b"bad\xff\xfe utf8/x"];
        for n in names {
            let url = format!("p={}&x=1", encode(n));
            assert!(url.bytes().all(|b| b.is_ascii_graphic()), "{url}");
            assert_eq!(Params::parse(&url).get("p").unwrap(), n);
        }
    }

    #[test]
    fn climbing_and_nul_are_refused_and_the_root_is_empty() {
        for bad in ["..%2fetc", "a%2f..%2f..%2fb", "a%00b", "%2e%2e", "x/../../y"] {
            assert!(Params::parse(&format!("p={bad}")).path("p").is_err(), "{bad}");
        }
        assert_eq!(Params::parse("p=%2F").path("p").unwrap(), b"");
        assert!(Params::parse("p=..%2f..%2fetc").path("p").unwrap_err().contains(".."));
        assert!(Params::parse("p=a%00b").path("p").unwrap_err().contains("NUL"));
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
    }

    #[test]
    fn names_are_shown_with_controls_escaped() {
        assert_eq!(shown(b"a\nb"), "a\\nb");
        assert_eq!(shown(b"x\xffy"), "x\\xffy");
    }

    #[test]
    fn a_symlink_on_the_way_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("snap")).unwrap();
        std::os::unix::fs::symlink("/etc", tmp.path().join("snap/out")).unwrap();
        let root = Dir::open_path(&tmp.path().join("snap")).unwrap();
        assert!(open_dir(&root, b"out").is_err());
        assert!(open_dir(&root, b"out/ssh").is_err());
    }
}
