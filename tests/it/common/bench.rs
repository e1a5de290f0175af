//! The benchmark against `rsync -aHAX --numeric-ids --sparse --link-dest`:
//! a server-like tree (deterministic from a seed), the test sshd with an
//! ACL'd backup user, both tools pulling over the same SSH in alternation.
//! `benches/compare.rs` runs it full size (scripts/bench.sh); the test suite
//! runs a tiny smoke version of the same code.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::sshd::Sshd;
use super::{bin, diff_trees, noise, read_tree, sh, write};

mod fresh_fs;
mod replicate;
use fresh_fs::FreshFs;
pub use replicate::Replication;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub files: usize,
    /// Dense bytes spread over the files (the sparse file comes on top).
    pub dense_bytes: u64,
    pub sparse_bytes: u64,
    pub seed: u64,
    pub rounds: usize,
    /// Files of the peak-RSS case (0: skip it).
    pub rss_files: usize,
    /// Files of the deletion case (0: skip it).
    pub delete_files: usize,
    /// Snapshots of the replication case (0: skip it).
    pub replicate_snapshots: usize,
    pub work: PathBuf,
    /// Write the snapshots to a fresh ext4 filesystem made for the run (a
    /// loop-mounted image), rather than to the work directory's.
    pub fresh_fs: bool,
}

impl Config {
    /// The sizes: 20,000 files, ~0.5 GiB with a 256 MiB sparse file.
    #[allow(dead_code)] // the benchmark's sizes: used by benches/compare.rs only
    pub fn full(work: PathBuf) -> Config {
        Config {
            files: 20_000,
            dense_bytes: 256 << 20,
            sparse_bytes: 256 << 20,
            seed: 42,
            rounds: 3,
            rss_files: 1_000_000,
            delete_files: 100_000,
            replicate_snapshots: 30,
            work,
            fresh_fs: true,
        }
    }
}

/// One run of one tool.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub seconds: f64,
    pub rss_kib: u64,
    pub wire_bytes: u64,
}

/// One case: both tools' runs, and whether their last snapshot equals the source.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub rbackup: Vec<Run>,
    pub rsync: Vec<Run>,
    pub rbackup_equal: Option<Result<(), String>>,
    pub rsync_equal: Option<Result<(), String>>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

impl Case {
    fn new(name: impl Into<String>) -> Case {
        Case { name: name.into(), rbackup: vec![], rsync: vec![], rbackup_equal: None, rsync_equal: None }
    }

    pub fn ratio(&self) -> f64 {
        let r: Vec<f64> = self.rbackup.iter().map(|r| r.seconds).collect();
        let s: Vec<f64> = self.rsync.iter().map(|r| r.seconds).collect();
        median(&r) / median(&s)
    }
}

/// Deterministic random numbers (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Builds the server-like tree: log-normal sizes, a sparse file, owners that
/// don't exist, 0600 files, ACLs, xattrs, hardlinks, odd names.
pub fn generate(root: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut rng = Rng::new(cfg.seed);
    std::fs::create_dir_all(root).unwrap();
    // Log-normal with sigma 1.8, scaled so the sizes add up to dense_bytes.
    let raw: Vec<f64> = (0..cfg.files).map(|_| (1.8 * rng.normal()).exp()).collect();
    let scale = cfg.dense_bytes as f64 / raw.iter().sum::<f64>();
    let dirs = (cfg.files / 40).max(1);
    let mut files = Vec::with_capacity(cfg.files);
    let mut blob = noise(cfg.seed, 1 << 20);
    for (i, r) in raw.iter().enumerate() {
        let size = ((r * scale) as usize).min(48 << 20);
        let d = i % dirs;
        let dir = root.join(format!("srv/d{:03}/sub{:02}", d / 20, d % 20));
        let name = match i % 97 {
            0 => OsStr::from_bytes(format!("odd name {i}.txt").as_bytes()).to_owned(),
            1 => OsStr::from_bytes(&[b'n', b'-', 0xe9, b'-', b'0' + (i % 10) as u8]).to_owned(),
            _ => format!("f{i:06}.dat").into(),
        };
        let path = dir.join(name);
        // Content: a window of the noise blob, different per file.
        if blob.len() < size {
            blob = noise(cfg.seed + 1, size);
        }
        let start = (rng.below(blob.len().saturating_sub(size) as u64 + 1)) as usize;
        write(&path, &blob[start..start + size]);
        files.push(path);
    }
    // One big sparse file: a few data extents in a large hole.
    let sparse = root.join("srv/images/disk.img");
    std::fs::create_dir_all(sparse.parent().unwrap()).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(cfg.sparse_bytes).unwrap();
        for k in 0..4u64 {
            f.write_all_at(&noise(cfg.seed + 10 + k, 64 << 10), k * (cfg.sparse_bytes / 4)).unwrap();
        }
    }
    // Metadata: owners, modes, ACLs, xattrs, hardlinks.
    for (i, f) in files.iter().enumerate() {
        match i % 50 {
            0 => std::os::unix::fs::lchown(f, Some(12_345 + (i % 7) as u32), Some(54_321)).unwrap(),
            1 => chmod(f, 0o600),
            2 => {
                let mut acl = rbackup::fs::acl::Acl::from_mode(0o644);
                acl.grant_user(4242, rbackup::fs::acl::R);
                xattr::set(f, "system.posix_acl_access", &acl.to_bytes()).unwrap();
            }
            3 => xattr::set(f, "user.origin", format!("file {i}").as_bytes()).unwrap(),
            4 if i + 5 < files.len() => {
                let link = f.with_extension("hardlink");
                std::fs::hard_link(f, link).unwrap();
            }
            _ => {}
        }
    }
    files
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// Changes about 1 % of the files: rewrites in the middle, appends, chmods,
/// deletes, and new files.
pub fn mutate(root: &Path, files: &[PathBuf], seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut rng = Rng::new(seed ^ 0xdead_beef);
    let count = (files.len() / 100).max(5);
    for k in 0..count {
        let f = &files[rng.below(files.len() as u64) as usize];
        let Ok(md) = std::fs::metadata(f) else { continue };
        match k % 5 {
            0 => {
                let at = md.len() / 2;
                let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
                file.write_all_at(&noise(seed + k as u64, 4096.min(md.len() as usize).max(1)), at).unwrap();
            }
            1 => {
                let file = std::fs::OpenOptions::new().append(true).open(f).unwrap();
                file.write_all_at(&noise(seed + k as u64, 1024), md.len()).unwrap();
            }
            2 => chmod(f, 0o640),
            3 => {
                let _ = std::fs::remove_file(f);
            }
            _ => write(&root.join(format!("srv/new/n{k:05}.dat")), &noise(seed + k as u64, 8192)),
        }
    }
}

/// Runs `cmd` under GNU time; returns (seconds, peak RSS in KiB, stdout).
fn timed(cmd: Command, out: &Path) -> (f64, u64, String) {
    let stats = out.with_extension("time");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let mut t = Command::new("/usr/bin/time");
    t.args(["-f", "%M", "-o"]).arg(&stats).arg(program).args(args);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            t.env(k, v);
        }
    }
    // Untimed: write back what the previous run left dirty (rsync leaves all
    // it wrote; rbackup flushes before it finishes), so that no run pays for
    // another's writes.
    sh("sync");
    let start = Instant::now();
    let output = t.output().expect("GNU time (Debian package time)");
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let rss = std::fs::read_to_string(&stats).unwrap().trim().lines().last().unwrap().parse().unwrap();
    (seconds, rss, String::from_utf8_lossy(&output.stdout).into_owned())
}

struct Tools<'a> {
    sshd: &'a Sshd,
    cfg: &'a Config,
    src: PathBuf,
}

impl Tools<'_> {
    /// An rbackup snapshot into `bk`.
    fn rbackup(&self, bk: &Path, extra: &[&str]) -> Run {
        let json = self.cfg.work.join("stats.json");
        let mut c = Command::new(bin());
        c.args(["--backup", "-q", "--source"]).arg(self.sshd.source(&self.src)).arg("--backups-folder").arg(bk);
        c.args(["--name", "srv", "--stats-json"]).arg(&json).args(self.sshd.args()).args(extra);
        let (seconds, rss_kib, _) = timed(c, &json);
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        Run { seconds, rss_kib, wire_bytes: s["stats"]["wire_bytes_received"].as_u64().unwrap() }
    }

    /// An rsync snapshot into `dest`, linking unchanged files to `link`.
    fn rsync(&self, dest: &Path, link: Option<&Path>, extra: &[&str]) -> Run {
        let mut c = Command::new("rsync");
        c.args(["-aHAX", "--numeric-ids", "--sparse", "--stats"]);
        c.arg("-e").arg(format!("ssh -F {}", self.sshd.ssh_config.display()));
        if let Some(l) = link {
            c.arg(format!("--link-dest={}", l.display()));
        }
        c.args(extra);
        c.arg(format!("{}/", self.sshd.source(&self.src))).arg(dest);
        let (seconds, rss_kib, out) = timed(c, &self.cfg.work.join("rsync"));
        let wire = out
            .lines()
            .find_map(|l| l.strip_prefix("Total bytes received: "))
            .map_or(0, |n| n.replace(',', "").trim().parse().unwrap_or(0));
        Run { seconds, rss_kib, wire_bytes: wire }
    }
}

/// The complete snapshots in `bk`, oldest first.
fn snaps(bk: &Path) -> Vec<PathBuf> {
    super::complete(bk, "srv")
}

fn equal(src: &Path, copy: &Path) -> Result<(), String> {
    let d = diff_trees(&read_tree(src), &read_tree(copy), &["trusted."]);
    if d.is_empty() { Ok(()) } else { Err(format!("{} differences, first: {}", d.len(), d[0])) }
}

fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

/// Everything one run measured.
pub struct Results {
    pub cases: Vec<Case>,
    /// Where the snapshots were written.
    pub dest_fs: String,
    /// Median time of `ssh HOST true` over the same SSH: the floor under both
    /// tools' times.
    pub ssh_floor: f64,
    pub replication: Option<Replication>,
}

/// Median wall time of `ssh HOST true` over five tries.
fn ssh_floor(sshd: &Sshd) -> f64 {
    let host = sshd.source(Path::new("/")).split(':').next().unwrap().to_string();
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let out = Command::new("ssh").arg("-F").arg(&sshd.ssh_config).arg(&host).arg("true").output().unwrap();
            assert!(out.status.success(), "ssh {host} true: {}", String::from_utf8_lossy(&out.stderr));
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(&times)
}

/// Runs every case; prints progress on stderr.
pub fn run(cfg: &Config) -> Results {
    super::require_root();
    std::fs::create_dir_all(&cfg.work).unwrap();
    sh(&format!("chmod 755 '{}'", cfg.work.display()));
    let sshd = Sshd::start();
    sshd.authorize("");
    let src = cfg.work.join("source");
    remove(&src);
    eprintln!("bench: generating {} files (seed {}) in {}", cfg.files, cfg.seed, src.display());
    let files = generate(&src, cfg);
    sshd.grant_read(&src);
    let tools = Tools { sshd: &sshd, cfg, src: src.clone() };
    let fresh = if cfg.fresh_fs {
        FreshFs::make(&cfg.work, "dest")
            .map_err(|e| eprintln!("bench: no fresh filesystem ({e}); writing to the work directory"))
    } else {
        Err(())
    };
    let (dest, dest_fs) = match &fresh {
        Ok(f) => (f.mount.clone(), "a fresh ext4 (mkfs defaults, loop-mounted image)".to_string()),
        Err(()) => (cfg.work.join("snapshots"), format!("the work directory's filesystem ({})", cfg.work.display())),
    };
    std::fs::create_dir_all(&dest).unwrap();
    sh(&format!("chmod 700 '{}'", dest.display()));
    let ssh_floor = ssh_floor(&sshd);
    let (rbk, rsy) = (dest.join("rbackup"), dest.join("rsync"));
    remove(&rbk);
    remove(&rsy);
    std::fs::create_dir_all(&rsy).unwrap();
    let mut cases = Vec::new();

    // First full snapshot: a fresh destination each round.
    let mut full = Case::new("first full snapshot");
    for round in 0..cfg.rounds {
        let last = round + 1 == cfg.rounds;
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for is_rbackup in order {
            if is_rbackup {
                remove(&rbk);
                full.rbackup.push(tools.rbackup(&rbk, &[]));
                if last {
                    full.rbackup_equal = Some(equal(&src, &snaps(&rbk)[0]));
                }
            } else {
                remove(&rsy.join("full"));
                full.rsync.push(tools.rsync(&rsy.join("full"), None, &[]));
                if last {
                    full.rsync_equal = Some(equal(&src, &rsy.join("full")));
                }
            }
        }
        eprintln!("bench: {} round {} done", full.name, round + 1);
    }
    cases.push(full);

    // No change, then 1 % changed: each round makes a snapshot linked to the
    // full one and removes it afterwards (untimed).
    for (name, change) in [("no-change snapshot", false), ("1 % changed", true)] {
        if change {
            mutate(&src, &files, cfg.seed);
            sshd.grant_read(&src);
        }
        let mut case = Case::new(name);
        for round in 0..cfg.rounds {
            let last = round + 1 == cfg.rounds;
            let order = if round % 2 == 0 { [true, false] } else { [false, true] };
            for is_rbackup in order {
                if is_rbackup {
                    case.rbackup.push(tools.rbackup(&rbk, &[]));
                    let newest = snaps(&rbk).pop().unwrap();
                    if last {
                        case.rbackup_equal = Some(equal(&src, &newest));
                    }
                    remove(&newest);
                    std::thread::sleep(std::time::Duration::from_millis(1000));
                } else {
                    let dest = rsy.join("next");
                    case.rsync.push(tools.rsync(&dest, Some(&rsy.join("full")), &[]));
                    if last {
                        case.rsync_equal = Some(equal(&src, &dest));
                    }
                    remove(&dest);
                }
            }
            eprintln!("bench: {name} round {} done", round + 1);
        }
        cases.push(case);
    }

    remove(&rsy);
    remove(&rbk);
    let replication = (cfg.replicate_snapshots > 0).then(|| replicate::replication_case(cfg, &tools, &files, &dest));
    if cfg.delete_files > 0 {
        cases.push(delete_case(cfg, &sshd, &dest));
    }

    if cfg.rss_files > 0 {
        cases.extend(rss_cases(cfg, &sshd));
    }
    remove(&src);
    drop(fresh);
    Results { cases, dest_fs, ssh_floor, replication }
}

/// Creates `n` empty files in directories of 1,000 under `root`, the tree
/// split in quarters `q0`..`q3`.
fn small_files(root: &Path, n: usize) {
    let per_dir = 1000;
    let dirs = n.div_ceil(per_dir);
    for d in 0..dirs {
        let dir = root.join(format!("q{}/d{d:05}", d * 4 / dirs));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir.min(n - d * per_dir) {
            std::fs::File::create(dir.join(format!("f{f:04}"))).unwrap();
        }
    }
}

/// Deleting a snapshot whose files all have a link in a newer one (what
/// prune does every day): `rbackup prune` against `rm -rf` of the same tree
/// made with `cp -al`.
fn delete_case(cfg: &Config, sshd: &Sshd, dest: &Path) -> Case {
    let n = cfg.delete_files;
    let tree = cfg.work.join("to-delete");
    remove(&tree);
    eprintln!("bench: creating {n} files for the deletion case");
    small_files(&tree, n);
    let tools = Tools { sshd, cfg, src: tree.clone() };
    let rbk = dest.join("rbackup-delete");
    remove(&rbk);
    tools.rbackup(&rbk, &[]);
    let mut del = Case::new(format!("deleting a snapshot of {n} files (prune / rm -rf)"));
    for round in 0..cfg.rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for is_rbackup in order {
            if is_rbackup {
                // Untimed: a newer snapshot sharing the files of the older one.
                std::thread::sleep(std::time::Duration::from_millis(1000));
                tools.rbackup(&rbk, &[]);
                assert_eq!(snaps(&rbk).len(), 2);
                let mut c = Command::new(bin());
                c.args(["prune", "-q", "--keep-last", "1", "--name", "srv", "--backups-folder"]).arg(&rbk);
                let (seconds, rss_kib, _) = timed(c, &cfg.work.join("prune"));
                assert_eq!(snaps(&rbk).len(), 1, "prune kept one snapshot");
                del.rbackup.push(Run { seconds, rss_kib, wire_bytes: 0 });
            } else {
                let copy = dest.join("copy");
                remove(&copy);
                sh(&format!("cp -al '{}' '{}'", snaps(&rbk)[0].display(), copy.display()));
                let mut c = Command::new("rm");
                c.arg("-rf").arg(&copy);
                let (seconds, rss_kib, _) = timed(c, &cfg.work.join("rm"));
                assert!(!copy.exists());
                del.rsync.push(Run { seconds, rss_kib, wire_bytes: 0 });
            }
        }
        eprintln!("bench: {} round {} done", del.name, round + 1);
    }
    remove(&rbk);
    remove(&tree);
    del
}

/// Peak RSS of no-change snapshots of many small files: rbackup at a
/// quarter, half and all of them (flat?), rsync at all of them.
fn rss_cases(cfg: &Config, sshd: &Sshd) -> Vec<Case> {
    let many = cfg.work.join("many");
    remove(&many);
    eprintln!("bench: creating {} small files for the memory case", cfg.rss_files);
    // q0..q3: quarters of the tree, for the flatness runs.
    small_files(&many, cfg.rss_files);
    let tools = Tools { sshd, cfg, src: many.clone() };
    let rbk = cfg.work.join("rbackup-many");
    remove(&rbk);
    eprintln!("bench: first rbackup snapshot of the small files (untimed)");
    tools.rbackup(&rbk, &[]);
    let base = snaps(&rbk)[0].clone();
    let mut out = Vec::new();
    for (label, excludes) in [("1/4", vec!["/q1/", "/q2/", "/q3/"]), ("1/2", vec!["/q2/", "/q3/"]), ("all", vec![])] {
        let n = match label {
            "1/4" => cfg.rss_files / 4,
            "1/2" => cfg.rss_files / 2,
            _ => cfg.rss_files,
        };
        let mut case = Case::new(format!("no-change, {n} small files (memory)"));
        let args: Vec<String> = excludes.iter().flat_map(|e| ["--exclude".to_string(), (*e).to_string()]).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        case.rbackup.push(tools.rbackup(&rbk, &args));
        let newest = snaps(&rbk).pop().unwrap();
        if label == "all" {
            case.rbackup_equal = Some(equal(&many, &newest));
            let dest = cfg.work.join("rsync-many");
            case.rsync.push(tools.rsync(&dest, Some(&base), &args));
            case.rsync_equal = Some(equal(&many, &dest));
            remove(&dest);
        }
        remove(&newest);
        eprintln!("bench: {} done", case.name);
        out.push(case);
    }
    remove(&rbk);
    remove(&many);
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The results as a Markdown table.
pub fn report(cfg: &Config, results: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} files, {} MiB dense + {} MiB sparse, seed {}, {} rounds; over SSH on 127.0.0.1 \
         (`ssh HOST true` alone: {:.2} s); snapshots written to {}\n",
        cfg.files,
        cfg.dense_bytes >> 20,
        cfg.sparse_bytes >> 20,
        cfg.seed,
        cfg.rounds,
        results.ssh_floor,
        results.dest_fs
    );
    let cases = &results.cases;
    s.push_str("In the deletion case, the rsync columns are `rm -rf`.\n\n");
    s.push_str("| case | rbackup (median) | rsync (median) | rbackup/rsync | received rbackup | received rsync | peak RSS rbackup | peak RSS rsync | equal to source |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for c in cases {
        let med = |v: &[Run], f: fn(&Run) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        let secs = |v: &[Run]| if v.is_empty() { "–".to_string() } else { format!("{:.2} s", med(v, |r| r.seconds)) };
        let wire = |v: &[Run]| {
            if v.is_empty() {
                "–".to_string()
            } else {
                format!("{:.1} MiB", med(v, |r| r.wire_bytes as f64) / 1048576.0)
            }
        };
        let rss = |v: &[Run]| v.iter().map(|r| r.rss_kib).max().map_or("–".to_string(), mib);
        let ok = |e: &Option<Result<(), String>>| match e {
            None => "–".to_string(),
            Some(Ok(())) => "yes".to_string(),
            Some(Err(e)) => format!("NO: {e}"),
        };
        let ratio = if c.rsync.is_empty() { "–".to_string() } else { format!("{:.2}", c.ratio()) };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | rbackup {}, rsync {} |",
            c.name,
            secs(&c.rbackup),
            secs(&c.rsync),
            ratio,
            wire(&c.rbackup),
            wire(&c.rsync),
            rss(&c.rbackup),
            rss(&c.rsync),
            ok(&c.rbackup_equal),
            ok(&c.rsync_equal).replace("NO", "no")
        );
    }
    if let Some(r) = &results.replication {
        s.push_str(&replicate::report(r));
    }
    s
}
