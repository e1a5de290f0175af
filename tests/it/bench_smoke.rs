//! A tiny run of the benchmark (benches/compare.rs): the harness works, both
//! tools' snapshots equal the source. Times are printed, never asserted.

use crate::common::bench::{Config, report, run};

#[test]
fn the_benchmark_runs_and_both_snapshots_equal_the_source() {
    let work = crate::common::scratch();
    let cfg = Config {
        files: 300,
        dense_bytes: 4 << 20,
        sparse_bytes: 16 << 20,
        seed: 7,
        rounds: 1,
        rss_files: 2000,
        delete_files: 500,
        replicate_snapshots: 3,
        work: work.path().join("bench"),
        // Keep the smoke run to what any machine has.
        fresh_fs: false,
    };
    let results = run(&cfg);
    println!("{}", report(&cfg, &results));
    let cases = &results.cases;
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names[..4],
        [
            "first full snapshot",
            "no-change snapshot",
            "1 % changed",
            "deleting a snapshot of 500 files (prune / rm -rf)"
        ]
    );
    assert_eq!(cases.len(), 7);
    for c in cases {
        assert!(!c.rbackup.is_empty(), "{}", c.name);
        if let Some(e) = &c.rbackup_equal {
            assert!(e.is_ok(), "{}: rbackup's snapshot differs: {e:?}", c.name);
        }
        if let Some(e) = &c.rsync_equal {
            assert!(e.is_ok(), "{}: rsync's snapshot differs: {e:?}", c.name);
        }
    }
    let changed = &cases[2];
    assert!(changed.rbackup[0].wire_bytes > 0 && changed.rsync[0].wire_bytes > 0);
    // The replication case: every tool ran; rbackup's and rsync's replicas
    // equal the originals snapshot by snapshot, links included.
    let rep = results.replication.as_ref().expect("the replication case ran");
    assert_eq!(rep.tools.len(), 3);
    for t in &rep.tools {
        assert_eq!(t.runs.len(), 1, "{}", t.tool);
        assert!(t.bytes > 0, "{}", t.tool);
    }
    for t in &rep.tools[..2] {
        assert!(matches!(t.equal, Some(Ok(()))), "{}: {:?}", t.tool, t.equal);
    }
    assert!(matches!(rep.incremental_equal, Some(Ok(()))), "{:?}", rep.incremental_equal);
}
