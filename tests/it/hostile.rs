//! A hostile agent: a test double that speaks the protocol from the server
//! side and lies. The real desktop code (backup::run_with) runs against it.
//! For every lie: nothing is written outside the snapshot folder, nothing is
//! followed through a symlink, the run ends with a clear error (or the
//! documented safe outcome), and the `.incomplete` stays resumable by an
//! honest `continue`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::common::*;
use rbackup::cmd::backup::{self, RunOptions, RunReport};
use rbackup::config::{Job, SourceSpec};
use rbackup::fs::meta::Meta;
use rbackup::transport::Connection;
use rbackup::wire::frame::{Encoder, Frame, FrameReader, MAX_FRAME};
use rbackup::wire::msg::{Entry, Fetch, Reply, SinkMsg, SkipReason, SourceMsg, SpecialKind};
use rbackup::wire::{decode, read_preamble, write_preamble};

/// The agent's side of the pipes.
struct Agent {
    input: FrameReader<std::io::PipeReader>,
    output: std::io::PipeWriter,
    enc: Encoder,
}

impl Agent {
    fn send(&mut self, msg: &SourceMsg) {
        let _ = self.output.write_all(&self.enc.msg(msg));
    }

    fn raw(&mut self, bytes: &[u8]) {
        let _ = self.output.write_all(bytes);
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) {
        let frame = self.enc.data(offset, bytes);
        self.raw(&frame);
    }

    fn entries(&mut self, entries: Vec<Entry>) {
        self.send(&SourceMsg::Entries(entries));
    }

    /// The next fetch the desktop asks for (credits are ignored: a hostile
    /// agent sends what it likes).
    fn next_fetch(&mut self) -> Option<Fetch> {
        loop {
            let Ok(Some(Frame::Msg(body))) = self.input.read() else { return None };
            match decode::<SinkMsg>(&body).ok()? {
                SinkMsg::Fetch(f) => return Some(f),
                SinkMsg::Finish { .. } | SinkMsg::Fatal(_) => return None,
                _ => {}
            }
        }
    }

    /// Answers the next fetch honestly with `content`.
    fn serve(&mut self, content: &[u8]) {
        let f = self.next_fetch().expect("a fetch");
        self.send(&SourceMsg::FileBegin { id: f.id, size: content.len() as u64 });
        if !content.is_empty() {
            self.data(0, content);
        }
        self.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: None });
    }

    /// Reads everything the desktop still sends, until it hangs up.
    fn drain(&mut self) {
        while let Ok(Some(_)) = self.input.read() {}
    }
}

fn meta(mode: u32) -> Meta {
    Meta { mode, uid: GHOST_UID, gid: GHOST_GID, mtime: 1_600_000_000, mtime_nsec: 5, xattrs: vec![] }
}

fn dir(name: &[u8]) -> Entry {
    Entry::Dir { name: name.to_vec(), meta: meta(0o755), unreadable: None, partial: false }
}

fn file(name: &[u8], size: u64) -> Entry {
    Entry::File { name: name.to_vec(), meta: meta(0o644), size, sparse: false, link: None }
}

fn symlink(name: &[u8], target: &Path) -> Entry {
    Entry::Symlink { name: name.to_vec(), meta: meta(0o777), target: target.as_os_str().as_encoded_bytes().to_vec() }
}

fn job(bk: &Path) -> Job {
    Job {
        job: "hostile".into(),
        source: Some(SourceSpec::Remote { user: None, host: "hostile".into(), path: "/srv".into() }),
        backups_folder: bk.to_path_buf(),
        name: "h".into(),
        excludes: vec![],
        log_file: None,
        devices: false,
        compress: false,
        remote_bin: "rbackup".into(),
        ssh_config: None,
        io_timeout: Some(std::time::Duration::from_secs(rbackup::config::DEFAULT_IO_TIMEOUT)),
        restore_to: None,
        metrics_file: None,
        email: None,
        prune: Default::default(),
        prune_after_backup: false,
        replicas: vec![],
        replicate_after_backup: false,
        pre_hook: None,
        post_hook: None,
        hook_timeout: rbackup::hooks::DEFAULT_TIMEOUT,
        one_file_system: false,
        bwlimit: 0,
        paths: vec![],
        invocation: "rbackup".into(),
    }
}

/// Runs a backup against an agent that follows `script` after the handshake.
fn run_hostile(bk: &Path, resume: bool, script: impl FnOnce(&mut Agent) + Send + 'static) -> anyhow::Result<RunReport> {
    run_hostile_with(job(bk), resume, script)
}

/// The same for `job` (its `io_timeout` applies).
fn run_hostile_with(
    job: Job,
    resume: bool,
    script: impl FnOnce(&mut Agent) + Send + 'static,
) -> anyhow::Result<RunReport> {
    let (desk_r, agent_w) = std::io::pipe().unwrap();
    let (agent_r, desk_w) = std::io::pipe().unwrap();
    let agent = std::thread::spawn(move || {
        let mut output = agent_w;
        let mut input = agent_r;
        write_preamble(&mut output).unwrap();
        read_preamble(&mut input, "desktop").unwrap();
        let mut input = FrameReader::new(input);
        let _hello = input.read().unwrap();
        let mut agent = Agent { input, output, enc: Encoder::new(false) };
        let welcome = agent.enc.msg(&Reply::Welcome { root: b"/srv".to_vec(), version: "hostile".into() });
        agent.raw(&welcome);
        script(&mut agent);
        drop(agent.output);
        while let Ok(Some(_)) = agent.input.read() {}
    });
    let conn = Connection::from_streams(desk_r, desk_w, "the hostile agent", job.io_timeout).unwrap();
    let result = backup::run_with(&job, &RunOptions { resume, dry_run: false, ..Default::default() }, |_| {
        Ok((conn, PathBuf::from("/srv")))
    });
    agent.join().unwrap();
    result
}

/// The scratch area: a backups folder, and canaries outside it.
struct Area {
    tmp: tempfile::TempDir,
}

impl Area {
    fn new() -> Area {
        require_root();
        let tmp = scratch();
        write(&tmp.path().join("outside/canary.txt"), b"untouched");
        Area { tmp }
    }

    fn bk(&self) -> PathBuf {
        self.tmp.path().join("bk")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// Nothing appeared or changed outside the backups folder.
    fn assert_outside_untouched(&self) {
        let mut top: Vec<_> = std::fs::read_dir(self.tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        top.sort();
        let allowed = ["bk", "outside", "src"];
        assert!(top.iter().all(|n| allowed.contains(&n.to_str().unwrap())), "new entries beside bk: {top:?}");
        let inside: Vec<_> = std::fs::read_dir(self.outside()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(inside, vec![std::ffi::OsString::from("canary.txt")], "something was written outside");
        assert_eq!(std::fs::read(self.outside().join("canary.txt")).unwrap(), b"untouched");
        assert!(!Path::new("/etc/rbackup-hostile").exists());
    }

    /// The run left a `.incomplete`, and an honest `continue` finishes it.
    fn assert_resumable(&self) {
        let snaps = snapshots(&self.bk(), "h");
        assert!(snaps.iter().any(|(_, c)| !c), "no .incomplete left: {snaps:?}");
        let src = self.tmp.path().join("src");
        write(&src.join("good"), b"abc");
        write(&src.join("more/file"), b"more");
        let (code, _, err) = continue_backup(&src, &self.bk(), "h", &[]);
        assert_eq!(code, 0, "{err}");
        let done = complete(&self.bk(), "h");
        assert_eq!(done.len(), 1);
        assert_same_tree(&src, &done[0], &[]);
    }
}

/// Lists a valid root with one honest file, then `bad`.
fn after_a_good_file(bad: Vec<Entry>) -> impl FnOnce(&mut Agent) + Send + 'static {
    move |a| {
        a.entries(vec![dir(b""), file(b"good", 3)]);
        a.serve(b"abc");
        a.entries(bad);
    }
}

fn expect_error(result: anyhow::Result<RunReport>, words: &[&str]) {
    let err = match result {
        Ok(r) => panic!("the run succeeded: {r:?}"),
        Err(e) => format!("{e:#}"),
    };
    for w in words {
        assert!(err.contains(w), "the error lacks {w:?}: {err}");
    }
}

#[test]
fn names_that_are_not_one_component_are_refused() {
    for name in [&b"a/b"[..], b"/etc/rbackup-hostile", b".", b"..", b"", b"a\0b", b"../outside/x"] {
        let area = Area::new();
        let result = run_hostile(&area.bk(), false, after_a_good_file(vec![file(name, 1)]));
        expect_error(result, &["bad name"]);
        area.assert_outside_untouched();
        area.assert_resumable();
    }
}

#[test]
fn a_file_beneath_a_symlink_is_refused() {
    let area = Area::new();
    let outside = area.outside();
    let result = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), symlink(b"link", &outside), dir(b"link"), file(b"planted", 1)]);
        let _ = a.next_fetch();
    });
    expect_error(result, &["out of order or listed twice"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn a_symlink_left_in_an_interrupted_snapshot_is_never_written_through() {
    let area = Area::new();
    let outside = area.outside();
    // First run: the agent lists a symlink to a directory outside, then dies.
    let result = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), symlink(b"d", &outside)]);
    });
    assert!(result.is_err());
    // Continue: now `d` is a directory with a file in it.
    let result = run_hostile(&area.bk(), true, |a| {
        a.entries(vec![dir(b""), dir(b"d"), file(b"x", 5), Entry::End, Entry::End]);
        a.send(&SourceMsg::ListingDone);
        a.serve(b"hello");
        a.drain();
    });
    let report = result.unwrap();
    assert_eq!(report.code, rbackup::error::Code::Ok);
    area.assert_outside_untouched();
    let snap = complete(&area.bk(), "h")[0].clone();
    assert!(snap.join("d").symlink_metadata().unwrap().is_dir());
    assert_eq!(std::fs::read(snap.join("d/x")).unwrap(), b"hello");
}

#[test]
fn a_directory_then_a_file_of_the_same_name_is_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, after_a_good_file(vec![dir(b"x"), Entry::End, file(b"x", 1)]));
    expect_error(result, &["out of order or listed twice"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn duplicate_and_unsorted_entries_are_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, after_a_good_file(vec![file(b"z", 1), file(b"z", 1)]));
    expect_error(result, &["out of order or listed twice"]);
    area.assert_resumable();
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, after_a_good_file(vec![file(b"a", 1)]));
    expect_error(result, &["out of order or listed twice"]);
    area.assert_resumable();
}

#[test]
fn more_data_than_announced_is_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"good", 3), file(b"liar", 10), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        a.serve(b"abc");
        let f = a.next_fetch().unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: 10 });
        a.data(0, &[7u8; 4096]);
    });
    expect_error(result, &["beyond the announced 10 bytes"]);
    area.assert_outside_untouched();
    let inc = snapshots(&area.bk(), "h").into_iter().find(|(_, c)| !c).unwrap().0;
    // Partial data never appears under the real name.
    assert!(!area.bk().join(&inc).join("liar").exists());
    area.assert_resumable();
}

/// A source that lists without waiting for credit: the fetch queue would
/// grow with every entry (3 M entries once took 1.66 GB). The sink refuses
/// the first batch beyond what it granted, so memory stays flat.
/// `RBACKUP_FLOOD_ENTRIES` makes the flood bigger, to measure the run's RSS.
#[test]
fn a_listing_that_ignores_credit_is_refused() {
    let area = Area::new();
    let total: usize = std::env::var("RBACKUP_FLOOD_ENTRIES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let result = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b"")]);
        let mut sent = 0;
        while sent < total {
            let batch: Vec<Entry> =
                (sent..(sent + 500).min(total)).map(|i| file(format!("f{i:08}").as_bytes(), 1)).collect();
            sent += batch.len();
            a.entries(batch);
        }
        a.entries(vec![Entry::End]);
        a.send(&SourceMsg::ListingDone);
    });
    expect_error(result, &["were granted", "ignores flow control"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn a_file_that_shrank_is_stored_as_read_with_a_warning() {
    // Documented outcome: a size other than the listing's is a file that
    // changed while read: kept as read, warned about, fetched again next run.
    let area = Area::new();
    let report = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"shrunk", 10), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        a.serve(b"12345");
        a.drain();
    })
    .unwrap();
    assert_eq!(report.code, rbackup::error::Code::Vanished);
    assert!(report.problems.iter().any(|p| p.path == "shrunk"), "{:?}", report.problems);
    let snap = complete(&area.bk(), "h")[0].clone();
    assert_eq!(std::fs::read(snap.join("shrunk")).unwrap(), b"12345");
}

#[test]
fn out_of_order_data_and_unrequested_files_are_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"f", 100), Entry::End]);
        let f = a.next_fetch().unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: 100 });
        a.data(50, &[1u8; 10]);
        a.data(0, &[1u8; 10]);
    });
    expect_error(result, &["out of order"]);
    area.assert_resumable();

    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"f", 100)]);
        a.send(&SourceMsg::FileBegin { id: 999, size: 1 });
    });
    expect_error(result, &["file 999"]);
    area.assert_resumable();
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_read() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"good", 3)]);
        a.serve(b"abc");
        let mut huge = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        huge.push(1);
        a.raw(&huge);
    });
    expect_error(result, &["larger than"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn a_truncated_stream_is_a_lost_connection() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"good", 3)]);
        a.serve(b"abc");
        let frame = a.enc.msg(&SourceMsg::Entries(vec![file(b"h", 1), file(b"i", 1)]));
        a.raw(&frame[..frame.len() / 2]);
    });
    expect_error(result, &["closed"]);
    area.assert_resumable();
}

#[test]
fn device_nodes_are_skipped_unless_asked_and_setuid_root_files_are_kept_private() {
    // Documented outcome: without --devices a device node is skipped; a
    // setuid-root file is stored exactly (it is the server's data) inside the
    // backups folder, which is 0700 so no other user can reach it.
    let area = Area::new();
    let report = run_hostile(&area.bk(), false, |a| {
        let mut suid = meta(0o4755);
        suid.uid = 0;
        suid.gid = 0;
        a.entries(vec![
            dir(b""),
            Entry::Special { name: b"disk".to_vec(), meta: meta(0o660), kind: SpecialKind::Block, rdev: 0x0801 },
            Entry::File { name: b"suid".to_vec(), meta: suid, size: 2, sparse: false, link: None },
            Entry::End,
        ]);
        a.send(&SourceMsg::ListingDone);
        a.serve(b"#!");
        a.drain();
    })
    .unwrap();
    assert_eq!(report.code, rbackup::error::Code::Ok);
    assert_eq!(report.stats.devices_skipped, 1);
    let snap = complete(&area.bk(), "h")[0].clone();
    assert!(!snap.join("disk").exists());
    let md = std::fs::metadata(snap.join("suid")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o4755, 0));
    assert_eq!(std::fs::metadata(area.bk()).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn a_version_mismatch_names_both_versions() {
    require_root();
    let tmp = scratch();
    let (desk_r, mut agent_w) = std::io::pipe().unwrap();
    let (mut agent_r, desk_w) = std::io::pipe().unwrap();
    let agent = std::thread::spawn(move || {
        let mut p = b"rbackup\0".to_vec();
        p.extend_from_slice(&77u32.to_le_bytes());
        p.push(4);
        p.extend_from_slice(b"77.0");
        agent_w.write_all(&p).unwrap();
        let mut sink = Vec::new();
        let _ = agent_r.read_to_end(&mut sink);
    });
    let conn = Connection::from_streams(desk_r, desk_w, "the old agent", None).unwrap();
    let result =
        backup::run_with(&job(&tmp.path().join("bk")), &RunOptions::default(), |_| Ok((conn, PathBuf::from("/srv"))));
    let err = format!("{:#}", result.unwrap_err());
    agent.join().unwrap();
    assert!(err.contains("protocol 77") && err.contains("rbackup 77.0"), "{err}");
    assert!(err.contains(&format!("rbackup {}", env!("CARGO_PKG_VERSION"))), "{err}");
    assert!(err.contains("upgrade"), "{err}");
    assert!(snapshots(&tmp.path().join("bk"), "h").is_empty());
}

#[test]
fn a_delta_that_fails_the_hash_check_is_fetched_again_whole() {
    let area = Area::new();
    let old = noise(1, 200_000);
    let mut new = old.clone();
    new[100_000..100_100].copy_from_slice(&[9u8; 100]);
    let first = old.clone();
    run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), file(b"f", first.len() as u64), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        a.serve(&first);
    })
    .unwrap();

    let right = new.clone();
    let report = run_hostile(&area.bk(), false, move |a| {
        let mut changed = file(b"f", right.len() as u64);
        if let Entry::File { meta, .. } = &mut changed {
            meta.mtime += 1;
        }
        a.entries(vec![dir(b""), changed, Entry::End]);
        a.send(&SourceMsg::ListingDone);
        // A delta against the basis that rebuilds the wrong content, sent with
        // the hash of the right content: what an MD4 collision would look like.
        let f = a.next_fetch().unwrap();
        let sig = fast_rsync::Signature::deserialize(f.signature.clone().expect("a delta request")).unwrap();
        let mut wrong = right.clone();
        wrong[0] ^= 0xff;
        let mut delta = Vec::new();
        fast_rsync::diff(&sig.index(), &wrong, &mut delta).unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: right.len() as u64 });
        let frame = a.enc.delta(wrong.len() as u32, &delta);
        a.raw(&frame);
        let hash = rbackup::digest::of_bytes(&right);
        a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: Some(hash) });
        // The desktop asks again, whole; answer honestly.
        let again = a.next_fetch().expect("a second request");
        assert!(again.signature.is_none(), "the retry must be a whole-file fetch");
        a.send(&SourceMsg::FileBegin { id: again.id, size: right.len() as u64 });
        a.data(0, &right);
        a.send(&SourceMsg::FileEnd { id: again.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: None });
    })
    .unwrap();
    assert_eq!(report.stats.delta_retries, 1);
    assert_eq!(report.stats.fetched_whole, 1);
    let snap = complete(&area.bk(), "h")[1].clone();
    assert_eq!(std::fs::read(snap.join("f")).unwrap(), new);
}

/// `run_hostile`, on a thread of its own: a run that does not end by itself
/// within two minutes fails the test instead of hanging it (a harness
/// bound, not a timing assertion: the run must simply terminate).
fn run_hostile_bounded(bk: &Path, script: impl FnOnce(&mut Agent) + Send + 'static) -> anyhow::Result<RunReport> {
    let bk = bk.to_path_buf();
    returns_by_itself(move || run_hostile(&bk, false, script))
}

#[test]
fn an_announced_huge_size_without_data_ends_that_file_not_the_desktop() {
    // Issue 11: the sink hashed the zeros of the announced size before sizing
    // the file, so FileBegin{size: i64::MAX} and no data ran for centuries
    // holding the lock. The size costs nothing now: a size the destination
    // can't hold leaves that file out (exit 23); one it can is stored as a
    // hole, warned about since the listing said otherwise (exit 24).
    for announced in [i64::MAX as u64, 1 << 40] {
        let area = Area::new();
        let report = run_hostile_bounded(&area.bk(), move |a| {
            a.entries(vec![dir(b""), file(b"good", 3), file(b"huge", 3), Entry::End]);
            a.send(&SourceMsg::ListingDone);
            a.serve(b"abc");
            let f = a.next_fetch().expect("a fetch of huge");
            a.send(&SourceMsg::FileBegin { id: f.id, size: announced });
            a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: None });
            a.drain();
        })
        .unwrap();
        let problem = report.problems.iter().find(|p| p.path == "huge").expect("a problem names the file");
        let snap = complete(&area.bk(), "h")[0].clone();
        assert_eq!(std::fs::read(snap.join("good")).unwrap(), b"abc");
        // Beyond 1 PiB the sink refuses whatever the filesystem could hold.
        let stored = std::fs::symlink_metadata(snap.join("huge"));
        if announced > 1 << 50 {
            assert!(stored.is_err(), "a size beyond 1 PiB is never stored");
        }
        match stored {
            Err(_) => {
                assert_eq!(problem.kind, rbackup::report::ProblemKind::Failed, "{problem:?}");
                let why = if announced > 1 << 50 {
                    "more than the 1 PiB a snapshot stores"
                } else {
                    "more than the destination filesystem can hold"
                };
                assert!(problem.detail.contains(why), "{problem:?}");
                assert_eq!(report.code, rbackup::error::Code::Partial);
            }
            Ok(md) => {
                use std::os::unix::fs::MetadataExt;
                assert_eq!(md.len(), announced, "stored as announced");
                assert_eq!(md.blocks(), 0, "a hole, allocating nothing");
                assert_eq!(problem.kind, rbackup::report::ProblemKind::Changed, "{problem:?}");
                assert_eq!(report.code, rbackup::error::Code::Vanished);
            }
        }
        area.assert_outside_untouched();
        // An honest run afterwards finishes, and replaces the file.
        let src = area.tmp.path().join("src");
        write(&src.join("good"), b"abc");
        write(&src.join("huge"), b"xyz");
        let (code, _, err) = backup(&src, &area.bk(), "h", &[]);
        assert_eq!(code, 0, "{err}");
        let done = complete(&area.bk(), "h");
        assert_eq!(done.len(), 2);
        assert_same_tree(&src, &done[1], &[]);
    }
}

#[test]
fn whole_data_that_does_not_match_the_sources_digest_is_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"good", 3), file(b"liar", 5), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        a.serve(b"abc");
        let f = a.next_fetch().unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: 5 });
        a.data(0, b"hello");
        let hash = Some(rbackup::digest::of_bytes(b"world"));
        a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash });
    });
    expect_error(result, &["liar", "does not match the digest"]);
    let inc = snapshots(&area.bk(), "h").into_iter().find(|(_, c)| !c).unwrap().0;
    assert!(!area.bk().join(&inc).join("liar").exists());
    area.assert_resumable();
}

// ------------------------------------------------ agents that stop answering

/// Runs `f` on its own thread; fails the test if it has not returned after
/// a bound far beyond anything it should take (no timing is asserted: only
/// that it ends by itself).
fn returns_by_itself<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the desktop hung: it did not return within 120 s"),
        Err(e) => panic!("the run panicked: {e}"),
    }
}

fn job_with_timeout(bk: &Path, secs: u64) -> Job {
    Job { io_timeout: Some(std::time::Duration::from_secs(secs)), ..job(bk) }
}

/// No temporary entry (`.rbk~…`) anywhere under `dir`.
fn assert_no_temporaries(dir: &Path) {
    let out = std::process::Command::new("find").arg(dir).args(["-name", ".rbk~*"]).output().unwrap();
    let found = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && found.is_empty(), "temporary entries left: {found}");
}

#[test]
fn an_agent_that_stops_sending_mid_listing_ends_the_run_by_its_idle_timeout() {
    let area = Area::new();
    let job = job_with_timeout(&area.bk(), 2);
    let result = returns_by_itself(move || {
        run_hostile_with(job, false, |a| {
            a.entries(vec![dir(b""), file(b"good", 3)]);
            a.serve(b"abc");
            a.entries(vec![file(b"more", 4)]);
            // Silent from here on, with both pipes open, until the desktop
            // hangs up.
            a.drain();
        })
    });
    let err = result.as_ref().map(|_| ()).unwrap_err();
    assert_eq!(rbackup::error::code_of(err), rbackup::error::Code::Error);
    expect_error(result, &["no data from the hostile agent for 2 s (io_timeout)"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn a_sparse_basis_is_never_read_for_a_delta() {
    // Its signature would read every byte of its holes: work in proportion
    // to a size announced in an earlier run, not to data sent.
    let area = Area::new();
    run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"f", 64 << 20), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        let f = a.next_fetch().unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: 64 << 20 });
        a.data(0, &[7u8; 4096]);
        a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: None });
        a.drain();
    })
    .unwrap();
    let report = run_hostile(&area.bk(), false, |a| {
        let mut changed = file(b"f", 64 << 20);
        if let Entry::File { meta, .. } = &mut changed {
            meta.mtime += 1;
        }
        a.entries(vec![dir(b""), changed, Entry::End]);
        a.send(&SourceMsg::ListingDone);
        let f = a.next_fetch().unwrap();
        assert!(f.signature.is_none(), "a delta against a sparse basis was asked for");
        a.send(&SourceMsg::FileBegin { id: f.id, size: 64 << 20 });
        a.data(0, &[8u8; 4096]);
        a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash: None });
        a.drain();
    })
    .unwrap();
    assert_eq!((report.stats.fetched_whole, report.stats.fetched_delta), (1, 0));
}

#[test]
fn an_agent_that_stops_sending_mid_file_ends_the_run_and_keeps_the_data_for_continue() {
    let area = Area::new();
    let job = job_with_timeout(&area.bk(), 2);
    let result = returns_by_itself(move || {
        run_hostile_with(job, false, |a| {
            a.entries(vec![dir(b""), file(b"big", 100_000), file(b"good", 3), Entry::End]);
            a.send(&SourceMsg::ListingDone);
            let f = a.next_fetch().unwrap();
            a.send(&SourceMsg::FileBegin { id: f.id, size: 100_000 });
            a.data(0, &[7u8; 1000]);
            a.drain();
        })
    });
    expect_error(result, &["no data from the hostile agent for 2 s (io_timeout)"]);
    let inc = snapshots(&area.bk(), "h").into_iter().find(|(_, c)| !c).unwrap().0;
    assert!(!area.bk().join(&inc).join("big").exists());
    // What arrived stays under a temporary name, for `--continue` to resume
    // from; nothing else is left.
    let out = std::process::Command::new("find").arg(area.bk()).args(["-name", ".rbk~*"]).output().unwrap();
    let found = String::from_utf8_lossy(&out.stdout).into_owned();
    let found: Vec<&str> = found.lines().collect();
    assert!(found.len() == 1 && found[0].ends_with(".part"), "temporary entries left: {found:?}");
    assert_eq!(std::fs::metadata(found[0]).unwrap().len(), 1000, "the data received, and only that");
    area.assert_resumable();
    assert_no_temporaries(&area.bk());
}

/// The bytes an agent sends: preamble, welcome, then `frames`.
fn agent_stream(frames: &[SourceMsg]) -> Vec<u8> {
    let mut out = Vec::new();
    write_preamble(&mut out).unwrap();
    let mut enc = Encoder::new(false);
    out.extend(enc.msg(&Reply::Welcome { root: b"/srv".to_vec(), version: "hostile".into() }));
    for f in frames {
        out.extend(enc.msg(f));
    }
    out
}

/// A child process as the agent: `script` (sh) with `$STREAM` the file
/// holding `stream`.
fn run_scripted_agent(area: &Area, stream: &[u8], script: &str, secs: u64) -> anyhow::Result<RunReport> {
    let file = area.tmp.path().join("outside/stream");
    std::fs::write(&file, stream).unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(script).env("STREAM", &file).env("PIDFILE", area.tmp.path().join("outside/pid"));
    let job = job_with_timeout(&area.bk(), secs);
    returns_by_itself(move || {
        backup::run_with(&job, &RunOptions::default(), move |job| {
            Ok((Connection::spawn(cmd, "the hostile agent", job.io_timeout)?, PathBuf::from("/srv")))
        })
    })
}

#[test]
fn an_agent_that_dies_with_its_stderr_held_open_and_a_full_channel_does_not_hang_the_desktop() {
    let area = Area::new();
    // Many directories for the desktop to create: its reader thread runs
    // ahead and fills the channel, and is blocked on it when the agent is
    // gone (the listing never ends).
    let mut frames = vec![SourceMsg::Entries(vec![dir(b"")])];
    for batch in 0..40 {
        frames.push(SourceMsg::Entries(
            (0..200).flat_map(|i| [dir(format!("d{batch:02}-{i:03}").as_bytes()), Entry::End]).collect(),
        ));
    }
    // The agent leaves a process holding its stderr (and only that), says
    // why it gives up, sends part of a listing and closes its output. It
    // keeps reading its input until the desktop hangs up: an agent that
    // stopped reading before the desktop's hello would end the run at the
    // handshake (a broken pipe), before the `.incomplete` this test needs.
    let script = "sleep 1000 </dev/null >/dev/null & echo $! > \"$PIDFILE\"; \
                  echo 'error: the hostile agent gives up' >&2; cat \"$STREAM\"; \
                  exec >&-; exec cat >/dev/null";
    let result = run_scripted_agent(&area, &agent_stream(&frames), script, 300);
    let held = std::fs::read_to_string(area.tmp.path().join("outside/pid")).unwrap();
    sh(&format!("kill {}", held.trim()));
    std::fs::remove_file(area.tmp.path().join("outside/stream")).unwrap();
    std::fs::remove_file(area.tmp.path().join("outside/pid")).unwrap();
    // A lost connection is about the agent's side: its words go with it.
    expect_error(result, &["closed", "the hostile agent said: error: the hostile agent gives up"]);
    area.assert_resumable();
}

#[test]
fn the_desktops_own_error_is_not_shown_as_the_agents() {
    let area = Area::new();
    // A descriptor limit too low for the desktop's own work (it holds a
    // bounded number of directories, so depth alone no longer exhausts it):
    // the desktop fails on its own (EMFILE) while the agent has only said
    // something misleading on stderr.
    let depth = 200;
    let mut entries = vec![dir(b"")];
    entries.extend((0..depth).map(|i| dir(format!("n{i}").as_bytes())));
    entries.extend((0..=depth).map(|_| Entry::End));
    let stream = agent_stream(&[SourceMsg::Entries(entries), SourceMsg::ListingDone]);
    let file = area.tmp.path().join("outside/stream");
    std::fs::write(&file, &stream).unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("echo 'error: the connection was closed before the run finished' >&2; cat \"$STREAM\"; sleep 1000")
        .env("STREAM", &file);
    let job = job_with_timeout(&area.bk(), 300);
    let result = returns_by_itself(move || {
        backup::run_with(&job, &RunOptions::default(), move |job| {
            let conn = Connection::spawn(cmd, "the hostile agent", job.io_timeout)?;
            // The test runs in a process of its own (nextest): the limit
            // is the desktop's alone. Barely room beyond what is open.
            let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            let lower = rustix::process::Rlimit { current: Some(open + 4), ..limit };
            rustix::process::setrlimit(rustix::process::Resource::Nofile, lower).unwrap();
            Ok((conn, PathBuf::from("/srv")))
        })
    });
    std::fs::remove_file(&file).unwrap();
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("Too many open files"), "{err}");
    assert!(!err.contains("said:") && !err.contains("connection was closed"), "{err}");
}

#[test]
fn only_a_refused_read_gets_the_acl_hint_not_a_walk_race() {
    let skipped = |name: &[u8], error: &str| Entry::Skipped {
        name: name.to_vec(),
        reason: SkipReason::Unreadable(error.to_string()),
    };
    let area = Area::new();
    // An entry replaced while the agent looked at it.
    let race = skipped(b"race", "Invalid argument (os error 22)");
    let report = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), race, Entry::End]);
        a.send(&SourceMsg::ListingDone);
    })
    .unwrap();
    assert_eq!(report.code, rbackup::error::Code::Partial);
    let log = rbackup::log::tail().join("\n");
    assert!(log.contains("cannot read: race: Invalid argument"), "{log}");
    assert!(!log.contains("setfacl") && !log.contains("ACL"), "an ACL hint for a race: {log}");

    let denied = skipped(b"secret", "Permission denied (os error 13)");
    let report = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), denied, Entry::End]);
        a.send(&SourceMsg::ListingDone);
    })
    .unwrap();
    assert_eq!(report.code, rbackup::error::Code::Partial);
    let log = rbackup::log::tail().join("\n");
    assert!(log.contains("1 entry could not be read at the source: permission denied"), "{log}");
    // The hint names the account ssh logs in as (`ssh -G` for this host).
    assert!(log.contains("setfacl -Rm u:") && log.contains(":rX DIR"), "{log}");
    assert!(!log.contains("u:USER:"), "{log}");
}

/// A lie deep down: the error names the directory with its path cut short,
/// and an honest `continue` with 256 descriptors removes the chain the lie
/// left. (3,000 levels: more than 10 times the descriptors, a 6 kB path;
/// tests/it/depth.rs goes to 20,000 on tmpfs, since this disk is slow to remove
/// that many directories.)
#[test]
fn a_lie_3000_directories_deep_is_refused_with_its_path_cut_short_and_continue_removes_the_chain() {
    let area = Area::new();
    // 3,000 nested `z`, then a name listed twice.
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"good", 3)]);
        a.serve(b"abc");
        for _ in 0..(3000 / 500) {
            a.entries((0..500).map(|_| dir(b"z")).collect());
        }
        a.entries(vec![file(b"x", 1), file(b"x", 1)]);
    });
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("out of order or listed twice"), "{}", &err[..err.len().min(1000)]);
    assert!(err.len() < 1000, "a {}-byte error: {}", err.len(), &err[..err.len().min(1000)]);
    assert!(err.contains(&format!("{}…(5799 bytes)…", "z/".repeat(50))), "{err}");
    area.assert_outside_untouched();

    // The honest server has a file `z`: continue, with few descriptors,
    // removes the chain first.
    let src = area.tmp.path().join("src");
    write(&src.join("good"), b"abc");
    write(&src.join("z"), b"a file");
    let bk = area.bk();
    let args: Vec<&std::ffi::OsStr> = vec![
        "--continue".as_ref(),
        "--source".as_ref(),
        src.as_os_str(),
        "--backups-folder".as_ref(),
        bk.as_os_str(),
        "--name".as_ref(),
        "h".as_ref(),
    ];
    let out = rbackup_with_fds(256, &args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let done = complete(&area.bk(), "h");
    assert_eq!(done.len(), 1);
    assert_same_tree(&src, &done[0], &[]);
}

#[test]
fn the_agents_error_text_reaches_the_terminal_escaped() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b"")]);
        a.send(&SourceMsg::Fatal("disk gone\x1b]0;owned\x07\x1b[2J".into()));
    });
    let err = format!("{:#}", result.expect_err("a fatal error from the agent"));
    assert!(err.contains("disk gone"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "control characters reach the terminal: {err:?}");
    area.assert_resumable();
}

#[test]
fn a_resume_the_desktop_did_not_offer_is_refused() {
    let area = Area::new();
    let result = run_hostile(&area.bk(), false, |a| {
        a.entries(vec![dir(b""), file(b"a", 100), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        let f = a.next_fetch().unwrap();
        assert_eq!(f.offset, 0, "nothing to resume from");
        // Skipping data the desktop never had: it would keep a hole.
        a.send(&SourceMsg::FileResume { id: f.id, size: 100, offset: 50 });
        a.data(50, &[1; 50]);
    });
    expect_error(result, &["resumed at Some(50) where None was offered"]);
    area.assert_outside_untouched();
    area.assert_resumable();
}

#[test]
fn a_resumed_prefix_the_whole_file_digest_disowns_is_fetched_again_whole() {
    let area = Area::new();
    let first = noise(5, 300_000);
    let kept = 100_000;
    let sent = first.clone();
    // The first run dies after a third of the file: the connection drops.
    let result = run_hostile(&area.bk(), false, move |a| {
        a.entries(vec![dir(b""), file(b"f", sent.len() as u64), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        let f = a.next_fetch().unwrap();
        a.send(&SourceMsg::FileBegin { id: f.id, size: sent.len() as u64 });
        a.data(0, &sent[..kept]);
    });
    expect_error(result, &[]);

    // The file changed since, with the same size and mtime: the prefix the
    // desktop kept is not the start of it any more.
    let mut second = first.clone();
    second[10] ^= 1;
    let right = second.clone();
    let report = run_hostile(&area.bk(), true, move |a| {
        a.entries(vec![dir(b""), file(b"f", right.len() as u64), Entry::End]);
        a.send(&SourceMsg::ListingDone);
        let f = a.next_fetch().unwrap();
        assert_eq!(f.offset, kept as u64, "the desktop offers what it kept");
        a.send(&SourceMsg::FileResume { id: f.id, size: right.len() as u64, offset: f.offset });
        a.data(f.offset, &right[kept..]);
        let hash = Some(rbackup::digest::of_bytes(&right));
        a.send(&SourceMsg::FileEnd { id: f.id, status: rbackup::wire::msg::ReadStatus::Complete, hash });
        let again = a.next_fetch().expect("a second request");
        assert_eq!(again.offset, 0, "the retry is a whole-file fetch");
        a.send(&SourceMsg::FileBegin { id: again.id, size: right.len() as u64 });
        a.data(0, &right);
        a.send(&SourceMsg::FileEnd { id: again.id, status: rbackup::wire::msg::ReadStatus::Complete, hash });
    })
    .unwrap();
    assert_eq!((report.stats.resume_retries, report.stats.resumed, report.stats.fetched_whole), (1, 0, 1));
    let snap = complete(&area.bk(), "h")[0].clone();
    assert_eq!(std::fs::read(snap.join("f")).unwrap(), second);
    let names: Vec<_> = std::fs::read_dir(&snap).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")], "no partial data left in the snapshot");
    area.assert_outside_untouched();
}
