//! The replication case: N snapshots of the tree, each after a 1 % change,
//! copied whole to an empty second filesystem by `rbackup replicate --to`,
//! `rsync -aHAX --numeric-ids --sparse` and `cp -a`; then one more snapshot,
//! replicated alone. Each replica is checked snapshot by snapshot against
//! its original (the harness's tree comparison), and its inodes against the
//! original's: where two original paths share an inode, so must the replica's.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::super::{Hashes, bin, diff_trees, read_tree_with, sh};
use super::{Config, FreshFs, Run, Tools, median, mutate, remove, snaps, timed};

/// One tool's runs over the whole backups folder, and what its replica holds.
#[derive(Debug, Clone)]
pub struct ToolRuns {
    pub tool: &'static str,
    pub command: String,
    pub runs: Vec<Run>,
    /// The `sync` right after each run (rbackup flushes before it ends; the
    /// others leave their data dirty).
    pub sync_seconds: Vec<f64>,
    /// `du -s` of the replica folder (hardlinks counted once).
    pub bytes: u64,
    /// Inodes in the replica folder (`du -s --inodes`).
    pub inodes: u64,
    /// Every snapshot equal to its original, and the same inodes shared.
    pub equal: Option<Result<(), String>>,
}

/// Everything the replication case measured.
#[derive(Debug, Clone)]
pub struct Replication {
    pub snapshots: usize,
    pub files: usize,
    pub original_bytes: u64,
    pub original_inodes: u64,
    /// rbackup, rsync, cp, in that order.
    pub tools: Vec<ToolRuns>,
    /// The extra snapshot's own backup (over SSH).
    pub backup: Run,
    /// `rbackup replicate` of that one snapshot, `rsync` of the whole folder again.
    pub incremental: Vec<(&'static str, Run)>,
    pub incremental_equal: Option<Result<(), String>>,
    /// `dd bs=1M conv=fsync` of `original_bytes` onto the replica's filesystem.
    pub dd_seconds: f64,
    pub replica_fs: String,
}

const TOOLS: [&str; 3] = ["rbackup replicate --to", "rsync -aHAX --numeric-ids --sparse", "cp -a"];

/// A fresh filesystem for each replica (or a folder when there is none).
struct Target {
    work: PathBuf,
    fresh: bool,
    fs: Option<FreshFs>,
}

impl Target {
    /// An empty folder on an empty filesystem.
    fn renew(&mut self) -> PathBuf {
        self.fs = None;
        if self.fresh {
            match FreshFs::make(&self.work, "replica") {
                Ok(fs) => {
                    let dir = fs.mount.join("backups");
                    self.fs = Some(fs);
                    return dir;
                }
                Err(e) => {
                    eprintln!("bench: no fresh filesystem for the replica ({e}); writing to the work directory");
                    self.fresh = false;
                }
            }
        }
        let dir = self.work.join("replica-backups");
        remove(&dir);
        dir
    }
}

fn du(dir: &Path, inodes: bool) -> u64 {
    let mut c = Command::new("du");
    c.arg("-s").arg(if inodes { "--inodes" } else { "--block-size=1" }).arg(dir);
    let out = c.output().unwrap();
    assert!(out.status.success(), "du {}", dir.display());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
}

fn command(tool: usize, from: &Path, to: &Path) -> Command {
    match tool {
        0 => {
            let mut c = Command::new(bin());
            c.args(["replicate", "-q", "--name", "srv", "--backups-folder"]).arg(from).arg("--to").arg(to);
            c
        }
        1 => {
            let mut c = Command::new("rsync");
            c.args(["-aHAX", "--numeric-ids", "--sparse"]).arg(format!("{}/", from.display())).arg(to);
            c
        }
        _ => {
            std::fs::create_dir_all(to).unwrap();
            let mut c = Command::new("cp");
            c.arg("-a").arg(from.join(".")).arg(to);
            c
        }
    }
}

/// Runs `c` timed, then `sync` timed apart.
fn timed_then_sync(c: Command, out: &Path) -> (Run, f64) {
    let (seconds, rss_kib, _) = timed(c, out);
    let start = Instant::now();
    sh("sync");
    (Run { seconds, rss_kib, wire_bytes: 0 }, start.elapsed().as_secs_f64())
}

/// Every complete snapshot of `orig` has an equal twin in `copy` (and no
/// other is there), and inodes are shared alike: one replica inode per
/// original inode, never two originals' in one.
pub fn same_history(orig: &Path, copy: &Path, hashes: &mut Hashes) -> Result<(), String> {
    let (a, b) = (snaps(orig), snaps(copy));
    let names = |v: &[PathBuf]| v.iter().map(|p| p.file_name().unwrap().to_owned()).collect::<Vec<_>>();
    if names(&a) != names(&b) {
        return Err(format!("other snapshots: {:?} against {:?}", names(&b), names(&a)));
    }
    let (mut forth, mut back) = (HashMap::new(), HashMap::new());
    let mut theirs = Hashes::new();
    for (o, c) in a.iter().zip(&b) {
        let (to, tc) = (read_tree_with(o, hashes), read_tree_with(c, &mut theirs));
        let d = diff_trees(&to, &tc, &["trusted."]);
        if !d.is_empty() {
            return Err(format!("{}: {} differences, first: {}", o.display(), d.len(), d[0]));
        }
        for (p, io) in to.iter().filter(|(_, i)| i.kind == "file") {
            let ic = tc[p].ino;
            if *forth.entry(io.ino).or_insert(ic) != ic || *back.entry(ic).or_insert(io.ino) != io.ino {
                return Err(format!(
                    "{}/{}: its inode is shared otherwise than in the original",
                    c.display(),
                    String::from_utf8_lossy(p)
                ));
            }
        }
    }
    Ok(())
}

/// The case: `cfg.replicate_snapshots` snapshots into `dest/replicate-originals`
/// (over SSH, like the other cases), then the replicas, each on a fresh filesystem.
pub(super) fn replication_case(cfg: &Config, tools: &Tools, files: &[PathBuf], dest: &Path) -> Replication {
    let n = cfg.replicate_snapshots;
    let orig = dest.join("replicate-originals");
    remove(&orig);
    eprintln!("bench: {n} snapshots for the replication case");
    let new_snapshot = |k: usize| {
        if k > 0 {
            mutate(&tools.src, files, cfg.seed + 1000 + k as u64);
            tools.sshd.grant_read(&tools.src);
        }
        tools.rbackup(&orig, &[])
    };
    for k in 0..n {
        new_snapshot(k);
    }
    assert_eq!(snaps(&orig).len(), n);
    let (original_bytes, original_inodes) = (du(&orig, false), du(&orig, true));
    let mut target = Target { work: cfg.work.clone(), fresh: cfg.fresh_fs, fs: None };
    let mut hashes = Hashes::new();
    let mut results: Vec<ToolRuns> = TOOLS
        .iter()
        .map(|t| ToolRuns {
            tool: t,
            command: String::new(),
            runs: vec![],
            sync_seconds: vec![],
            bytes: 0,
            inodes: 0,
            equal: None,
        })
        .collect();
    for round in 0..cfg.rounds {
        for k in 0..TOOLS.len() {
            let tool = (k + round) % TOOLS.len();
            let to = target.renew();
            let c = command(tool, &orig, &to);
            results[tool].command = format!("{c:?}");
            let (run, sync) = timed_then_sync(c, &cfg.work.join("replicate"));
            let r = &mut results[tool];
            r.runs.push(run);
            r.sync_seconds.push(sync);
            if round + 1 == cfg.rounds {
                (r.bytes, r.inodes) = (du(&to, false), du(&to, true));
                r.equal = Some(same_history(&orig, &to, &mut hashes));
            }
        }
        eprintln!("bench: replicating {n} snapshots, round {} done", round + 1);
    }

    // The disk's speed for the bytes a perfect replicator would write.
    let to = target.renew();
    std::fs::create_dir_all(&to).unwrap();
    let start = Instant::now();
    sh(&format!(
        "dd if=/dev/zero of='{}' bs=1M count={} conv=fsync status=none",
        to.join("dd.test").display(),
        original_bytes.div_ceil(1 << 20)
    ));
    let dd_seconds = start.elapsed().as_secs_f64();
    std::fs::remove_file(to.join("dd.test")).unwrap();

    // One more snapshot, replicated alone: rbackup and rsync each onto its
    // full replica (made untimed), on one fresh filesystem.
    let base = to.parent().unwrap().to_path_buf();
    let (rb, rs) = (base.join("rbackup"), base.join("rsync"));
    for (tool, dir) in [(0, &rb), (1, &rs)] {
        let (seconds, ..) = timed(command(tool, &orig, dir), &cfg.work.join("replicate"));
        eprintln!("bench: full replica by {} for the incremental case: {seconds:.2} s", TOOLS[tool]);
    }
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let backup = new_snapshot(n);
    let mut incremental = Vec::new();
    for (tool, dir) in [(0, &rb), (1, &rs)] {
        let (run, _) = timed_then_sync(command(tool, &orig, dir), &cfg.work.join("replicate"));
        incremental.push((TOOLS[tool], run));
    }
    let incremental_equal = Some(same_history(&orig, &rb, &mut hashes));
    let replica_fs = if target.fs.is_some() {
        "a fresh ext4 of its own (mkfs defaults, loop-mounted image), made anew for each run".to_string()
    } else {
        format!("the work directory's filesystem ({})", cfg.work.display())
    };
    drop(target);
    remove(&orig);
    Replication {
        snapshots: n,
        files: cfg.files,
        original_bytes,
        original_inodes,
        tools: results,
        backup,
        incremental,
        incremental_equal,
        dd_seconds,
        replica_fs,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// The replication tables, in Markdown.
pub fn report(r: &Replication) -> String {
    let mut s = String::new();
    let secs = |v: &[f64]| format!("{:.2} s", median(v));
    let times = |t: &ToolRuns| t.runs.iter().map(|r| r.seconds).collect::<Vec<_>>();
    let rbackup = median(&times(&r.tools[0]));
    let ideal = r.dd_seconds;
    let _ = writeln!(
        s,
        "\nReplicating {} snapshots of {} files (1 % changed between them) to an empty second filesystem: {}. \
         The originals take {} in {} inodes (`du`); `dd bs=1M conv=fsync` of as many bytes there took {:.2} s \
         ({:.0} MiB/s). Median of {} rounds; the `sync` after each run is timed apart.\n",
        r.snapshots,
        r.files,
        r.replica_fs,
        mib(r.original_bytes),
        r.original_inodes,
        ideal,
        r.original_bytes as f64 / 1048576.0 / ideal.max(1e-9),
        r.tools[0].runs.len()
    );
    s.push_str(
        "| tool | wall (median) | then `sync` | rbackup/tool | replica (`du`) | replica/original | inodes | peak RSS | \
         every snapshot equal, links as the original |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for t in &r.tools {
        let ok = match &t.equal {
            None => "–".to_string(),
            Some(Ok(())) => "yes".to_string(),
            Some(Err(e)) => format!("no: {e}"),
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.2} | {} | {:.3} | {} | {:.1} MiB | {} |",
            t.tool,
            secs(&times(t)),
            secs(&t.sync_seconds),
            rbackup / median(&times(t)),
            mib(t.bytes),
            t.bytes as f64 / r.original_bytes as f64,
            t.inodes,
            t.runs.iter().map(|r| r.rss_kib).max().unwrap_or(0) as f64 / 1024.0,
            ok
        );
    }
    let _ = writeln!(
        s,
        "\nrbackup against writing the originals' bytes at the disk's speed: {rbackup:.2} s / {ideal:.2} s = {:.2}.",
        rbackup / ideal.max(1e-9)
    );
    let _ = writeln!(
        s,
        "\nOne more snapshot (its own backup over SSH: {:.2} s, {:.1} MiB peak RSS), replicated alone:\n",
        r.backup.seconds,
        r.backup.rss_kib as f64 / 1024.0
    );
    s.push_str("| tool | wall | peak RSS | replica equal |\n|---|---:|---:|---|\n");
    for (i, (tool, run)) in r.incremental.iter().enumerate() {
        let ok = match (i, &r.incremental_equal) {
            (0, Some(Ok(()))) => "yes",
            (0, Some(Err(_))) => "NO",
            _ => "–",
        };
        let _ = writeln!(s, "| `{tool}` | {:.2} s | {:.1} MiB | {ok} |", run.seconds, run.rss_kib as f64 / 1024.0);
    }
    if let Some(Err(e)) = &r.incremental_equal {
        let _ = writeln!(s, "\nThe incremental replica differs: {e}");
    }
    s
}
