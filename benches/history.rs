//! `history` of one path over many snapshots of a large tree, read from
//! the manifests (docs/performance.md, "History of one path"): manifests of
//! `--files` records for `--snapshots` snapshots are written (the snapshot
//! folders themselves are empty: `history` reads the manifests), then the
//! release binary's `history` is timed for paths at the start, middle and
//! end of the listing, with the manifests' index and without it (the same
//! manifests, their index cut off, read from the start as older ones are).
//!
//!   cargo bench --bench history -- --snapshots 100 --files 1000000

#![allow(clippy::pedantic)] // bench code, like test code

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rbackup::fs::safefs::Dir;
use rbackup::store::manifest::{Kind, ManifestWriter, Record};

fn main() {
    let (mut snapshots, mut files, mut work) = (100usize, 1_000_000u64, PathBuf::from("/tmp/rbackup-bench-history"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--snapshots" => snapshots = val().parse().unwrap(),
            "--files" => files = val().parse().unwrap(),
            "--work" => work = val().into(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_rbackup"));
    let _ = std::fs::remove_dir_all(&work);
    let manifests = work.join("s.rbackup/manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let dir = Dir::open_path(&manifests).unwrap();
    // 1,000 files a folder, 100 folders a parent: a server-like depth.
    let path = |i: u64| format!("srv/p{:04}/d{:03}/file-{i:09}.dat", i / 100_000, (i / 1000) % 100).into_bytes();
    let started = Instant::now();
    let names: Vec<String> = (0..snapshots)
        .map(|k| {
            let t = chrono::DateTime::from_timestamp(1_780_000_000 + k as i64 * 86_400, 0).unwrap();
            format!("s.{}", t.format("%d-%m-%y_%H-%M-%S"))
        })
        .collect();
    let first = &names[0];
    let mut w = ManifestWriter::create(&dir, first).unwrap();
    let rec = |p: Vec<u8>, kind: Kind, i: u64| Record {
        path: p,
        kind,
        size: i * 37 % 100_000,
        mtime: 1_700_000_000 + i as i64,
        mtime_nsec: 0,
        mode: if kind == Kind::Dir { 0o40755 } else { 0o100644 },
        uid: 1000,
        gid: 1000,
        target: None,
        rdev: 0,
        xattrs: [0; 16],
        hash: (kind == Kind::File).then(|| *blake3::hash(&i.to_le_bytes()).as_bytes()),
    };
    w.push(rec(Vec::new(), Kind::Dir, 0), None).unwrap();
    w.push(rec(b"srv".to_vec(), Kind::Dir, 0), None).unwrap();
    for i in 0..files {
        if i % 100_000 == 0 {
            w.push(rec(format!("srv/p{:04}", i / 100_000).into_bytes(), Kind::Dir, i), None).unwrap();
        }
        if i % 1000 == 0 {
            let d = format!("srv/p{:04}/d{:03}", i / 100_000, (i / 1000) % 100);
            w.push(rec(d.into_bytes(), Kind::Dir, i), None).unwrap();
        }
        w.push(rec(path(i), Kind::File, i), None).unwrap();
    }
    w.finish().unwrap().commit().unwrap();
    let size = std::fs::metadata(manifests.join(first)).unwrap().len();
    for name in &names {
        std::fs::create_dir_all(work.join(name)).unwrap();
        if name != first {
            std::fs::copy(manifests.join(first), manifests.join(name)).unwrap();
        }
    }
    eprintln!(
        "{snapshots} manifests of {files} files ({:.1} MiB each) written in {:.1} s",
        size as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let history = |p: &[u8]| {
        let t = Instant::now();
        let out = Command::new(bin)
            .args(["history", "--backups-folder"])
            .arg(&work)
            .args(["--name", "s", "--json"])
            .arg(std::str::from_utf8(p).unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(!rows.as_array().unwrap().is_empty(), "the path was found");
        t.elapsed().as_secs_f64()
    };
    let median = |p: &[u8]| {
        let mut v: Vec<f64> = (0..3).map(|_| history(p)).collect();
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let probes = [("start", path(0)), ("middle", path(files / 2)), ("end", path(files - 1))];
    let with: Vec<f64> = probes.iter().map(|(_, p)| median(p)).collect();
    // The same manifests without their index: cut the skippable frame off.
    for name in &names {
        let f = manifests.join(name);
        let bytes = std::fs::read(&f).unwrap();
        assert_eq!(&bytes[bytes.len() - 8..], b"rbkindex", "{name} has an index");
        let len = u32::from_le_bytes(bytes[bytes.len() - 12..bytes.len() - 8].try_into().unwrap()) as usize;
        std::fs::write(&f, &bytes[..bytes.len() - 20 - len]).unwrap();
    }
    let without: Vec<f64> = probes.iter().map(|(_, p)| median(p)).collect();
    println!("| path in the listing | with the index | without (read from the start) |");
    println!("|---|---|---|");
    for (((what, _), a), b) in probes.iter().zip(&with).zip(&without) {
        println!("| {what} | {a:.3} s | {b:.3} s |");
    }
    let _ = std::fs::remove_dir_all(&work);
}
