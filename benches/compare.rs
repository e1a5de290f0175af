//! rbackup against `rsync -aHAX --numeric-ids --sparse --link-dest`, over the
//! same SSH, on the same machine, in the same run. See docs/performance.md;
//! run it with `sudo scripts/bench.sh` (arguments: --files N --rounds N
//! --rss-files N --delete-files N --replicate-snapshots N --seed N --dense-mib N --sparse-mib N --work DIR
//! --no-fresh-fs).

#![allow(clippy::pedantic)] // bench code, like test code

// The tests' harness; the benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../tests/it/common/mod.rs"]
mod common;

use common::bench::{Config, report, run};

fn main() {
    let mut cfg = Config::full(std::path::PathBuf::from("/tmp/rbackup-bench"));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--files" => cfg.files = val().parse().unwrap(),
            "--rounds" => cfg.rounds = val().parse().unwrap(),
            "--rss-files" => cfg.rss_files = val().parse().unwrap(),
            "--delete-files" => cfg.delete_files = val().parse().unwrap(),
            "--replicate-snapshots" => cfg.replicate_snapshots = val().parse().unwrap(),
            "--seed" => cfg.seed = val().parse().unwrap(),
            "--dense-mib" => cfg.dense_bytes = val().parse::<u64>().unwrap() << 20,
            "--sparse-mib" => cfg.sparse_bytes = val().parse::<u64>().unwrap() << 20,
            "--work" => cfg.work = val().into(),
            "--no-fresh-fs" => cfg.fresh_fs = false,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let results = run(&cfg);
    let table = report(&cfg, &results);
    println!("{table}");
    // The target directory cargo built into (CARGO_TARGET_DIR may move it).
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"), Into::into);
    std::fs::create_dir_all(&target).unwrap();
    let out = target.join("bench-results.md");
    std::fs::write(&out, &table).unwrap();
    eprintln!("results written to {}", out.display());
}
