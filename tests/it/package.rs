//! The Debian package's metadata (Cargo.toml `[package.metadata.deb]`, built
//! by scripts/package-deb.sh): a summary line that fits, and assets that
//! install every man page `rbackup man --dir` generates.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::*;

fn manifest() -> toml::Table {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    text.parse().unwrap()
}

/// Regression: the summary (Cargo.toml `description`, the first line of the
/// package's Description) was 85 characters and wrapped.
#[test]
fn the_package_summary_fits_on_one_line() {
    let m = manifest();
    let summary = m["package"]["description"].as_str().unwrap();
    assert!(summary.len() < 80, "{} characters: {summary}", summary.len());
    assert!(!summary.ends_with('.') && !summary.contains('\n'), "{summary}");
    let long = m["package"]["metadata"]["deb"]["extended-description"].as_str().unwrap();
    assert!(!long.starts_with(summary), "the extended description repeats the summary");
}

/// Regression: the package installed rbackup.1 only, whose SUBCOMMANDS and
/// SEE ALSO name rbackup-COMMAND(1) pages.
#[test]
fn the_package_installs_every_generated_man_page() {
    let tmp = scratch();
    let dir = tmp.path().join("target/assets/man");
    let (code, out, err) = run(&[OsStr::new("man"), OsStr::new("--dir"), dir.as_os_str()]);
    assert_eq!(code, 0, "{err}");
    let script = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/package-deb.sh")).unwrap();
    assert!(script.contains("man --dir target/assets/man"), "package-deb.sh generates the pages there");
    let m = manifest();
    let assets = m["package"]["metadata"]["deb"]["assets"].as_array().unwrap();
    for page in out.lines().map(Path::new) {
        let name = page.file_name().unwrap().to_str().unwrap();
        let section = name.rsplit('.').next().unwrap();
        let installed = assets.iter().any(|a| {
            let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            src == format!("target/assets/man/*.{section}") && dest == format!("usr/share/man/man{section}/")
        });
        assert!(installed, "no asset installs {name} into usr/share/man/man{section}/");
    }
}

/// The package's changelog (lintian's no-changelog is an error) starts with
/// the version being packaged, in Debian's format.
#[test]
fn the_debian_changelog_names_the_packaged_version() {
    let m = manifest();
    let deb = &m["package"]["metadata"]["deb"];
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(deb["changelog"].as_str().unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    let version = m["package"]["version"].as_str().unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(first, format!("rbackup ({version}-1) unstable; urgency=medium"), "{}", path.display());
    let trailer = text.lines().find(|l| l.starts_with(" -- ")).expect("a trailer line");
    assert!(trailer.contains(deb["maintainer"].as_str().unwrap()), "{trailer}");
    // Two spaces, then an RFC 2822 date.
    let date = trailer.split("  ").nth(1).unwrap();
    assert!(chrono::DateTime::parse_from_rfc2822(date).is_ok(), "{date}");
}
