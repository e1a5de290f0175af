//! `replicate --to host:/path` over a real sshd, into an append-only agent
//! (root's key confined to `serve --append-only --root R`), and a patched
//! desktop that speaks the protocol to that agent directly and tries to
//! make it destroy or rewrite what it holds.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rbackup::fs::safefs::Dir;
use rbackup::source::Selection;
use rbackup::transport::{Connection, Session};
use rbackup::wire::frame::Encoder;
use rbackup::wire::msg::{Entry, Hello, ReplicaAsk, Role, SessionOptions, SinkMsg, SourceMsg};

use crate::common::sshd::Sshd;
use crate::common::*;

/// The forced command of the replica key: append-only into `root`.
fn forced_append_only(sshd: &Sshd, root: &Path) -> String {
    format!("restrict,command=\"{} serve --append-only --root {}\"", sshd.agent.display(), root.display())
}

/// `replicate` of job `s` in `bk` to `rbk-root:rep` with the sshd's arguments.
fn replicate_ssh(sshd: &Sshd, bk: &Path, rep: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args: Vec<String> = ["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(Sshd::root_target(rep));
    args.extend(sshd.args());
    args.extend(extra.iter().map(ToString::to_string));
    run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
}

/// Three snapshots of a rich tree, changing between them: a small file
/// rewritten, a large one changed in one place (a delta), a file added.
fn three_snapshots(src: &Path, bk: &Path) {
    rich_tree(src);
    let mut big = noise(7, 4 << 20);
    write(&src.join("data/big.db"), &big);
    for round in 0..3u8 {
        write(&src.join("changes.txt"), format!("round {round}").as_bytes());
        if round == 2 {
            big[1 << 20] ^= 0xff;
            write(&src.join("data/big.db"), &big);
            write(&src.join("new.txt"), b"new in the third");
        }
        let (code, _, err) = backup(src, bk, "s", &[]);
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn replicas_over_ssh_into_an_append_only_agent_equal_the_originals() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("offsite"));
    std::fs::create_dir(&rep).unwrap();
    sshd.authorize_root(&forced_append_only(&sshd, &rep));
    three_snapshots(&src, &bk);
    // A dry run says what it would replicate, and writes nothing.
    let (code, out, err) = replicate_ssh(&sshd, &bk, &rep, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("replicate s.")).count(), 3, "{out}");
    assert_eq!(std::fs::read_dir(&rep).unwrap().count(), 0, "a dry run wrote into the replica folder");

    let (code, _, err) = replicate_ssh(&sshd, &bk, &rep, &[]);
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    let (originals, replicas) = (complete(&bk, "s"), complete(&rep, "s"));
    let folder = |p: &PathBuf| p.file_name().unwrap().to_owned();
    assert_eq!(replicas.iter().map(folder).collect::<Vec<_>>(), originals.iter().map(folder).collect::<Vec<_>>());
    for (o, r) in originals.iter().zip(&replicas) {
        assert_same_tree(o, r, &[]);
    }
    // Unchanged files are one inode across replicas; the changed one went
    // as a delta against the replica before.
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&replicas[0].join("home/alice/big.bin")), ino(&replicas[2].join("home/alice/big.bin")));
    assert_eq!(ino(&replicas[0].join("data/big.db")), ino(&replicas[1].join("data/big.db")));
    assert_ne!(ino(&replicas[1].join("data/big.db")), ino(&replicas[2].join("data/big.db")));
    assert_ne!(ino(&replicas[0].join("changes.txt")), ino(&replicas[1].join("changes.txt")));
    assert!(err.contains("(1 as deltas)"), "the changed big file travels as a delta: {err}");
    // Each replica has its manifest, and the agent kept no copy of the originals'.
    let args = ["verify", "--backups-folder", rep.to_str().unwrap(), "--name", "s", "--snapshot", "all"];
    let (code, _, verr) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{verr}");
    let originals_dir = rep.join("s.rbackup/originals");
    assert_eq!(std::fs::read_dir(&originals_dir).unwrap().count(), 0, "a copy of an original's manifest was left");

    // A second run copies nothing.
    let before = read_tree(&rep);
    let (code, _, err) = replicate_ssh(&sshd, &bk, &rep, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("holds every snapshot of"), "{err}");
    for r in &replicas {
        assert_eq!(read_tree(r), before_sub(&before, &rep, r), "{} changed", r.display());
    }

    // status asks the agent what it holds.
    let cfg = tmp.path().join("rbackup.toml");
    std::fs::write(
        &cfg,
        format!(
            "[job.s]\nsource = \"{}\"\nbackups_folder = \"{}\"\nreplicas = [\"{}\", \"{}\"]\nssh_config = \"{}\"\n",
            src.display(),
            bk.display(),
            Sshd::root_target(&rep),
            sshd.source(&rep),
            sshd.ssh_config.display()
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["-c", cfg.to_str().unwrap(), "status"].iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with("s.")).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().all(|r| r.split_whitespace().nth(1) == Some("yes")), "{out}");
    assert!(out.contains(&format!("replica {}: up to date", Sshd::root_target(&rep))), "{out}");
    // The backup user has no key here: that replica can't be asked, and says so.
    assert!(rows.iter().all(|r| r.trim_end().ends_with("can't be asked")), "{out}");
    assert!(out.contains(&format!("replica {}: can't be asked", sshd.source(&rep))), "{out}");
    assert!(err.contains("refused the authentication"), "{err}");
}

/// Without a forced command (a key the admin didn't confine), `replicate`
/// starts `REMOTE_BIN serve --append-only --root PATH` itself, the path
/// quoted for the remote shell. (As a user that isn't root, the agent keeps
/// no other owners: contents, modes and times are compared.)
#[test]
fn without_a_forced_command_replicate_starts_the_append_only_agent_itself() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("off site's"));
    std::fs::create_dir(&rep).unwrap();
    sh(&format!("chown {} \"{}\"", sshd.user.name, rep.display()));
    sshd.authorize("");
    write(&src.join("a.txt"), b"a");
    write(&src.join("d/b.txt"), b"b");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let mut args: Vec<String> = ["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(sshd.source(&rep));
    args.extend(sshd.args());
    let (code, _, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}\n{}", sshd.log());
    let replica = complete(&rep, "s").pop().expect("a replica");
    assert_eq!(std::fs::read(replica.join("d/b.txt")).unwrap(), b"b");
    assert_eq!(std::fs::metadata(replica.join("a.txt")).unwrap().uid(), sshd.user.uid());
}

/// The entries of `tree` (read at `root`) beneath `sub`, relative to it.
fn before_sub(tree: &Tree, root: &Path, sub: &Path) -> Tree {
    let prefix = sub.strip_prefix(root).unwrap().as_os_str().as_encoded_bytes().to_vec();
    tree.iter()
        .filter_map(|(p, i)| {
            if *p == prefix {
                Some((Vec::new(), i.clone()))
            } else {
                p.strip_prefix(&[&prefix[..], b"/"].concat()[..]).map(|rest| (rest.to_vec(), i.clone()))
            }
        })
        .collect()
}

/// A file that rotted on the first drive is refused by the agent's check,
/// and the replica stays `.incomplete`; once mended, the next run finishes it.
#[test]
fn an_offsite_replica_of_a_damaged_file_is_refused_not_committed() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("offsite"));
    std::fs::create_dir(&rep).unwrap();
    sshd.authorize_root(&forced_append_only(&sshd, &rep));
    write(&src.join("a.txt"), b"first");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    write(&src.join("b.txt"), b"only in the second");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    let rotten = complete(&bk, "s")[1].join("b.txt");
    let mtime = std::fs::metadata(&rotten).unwrap().modified().unwrap();
    let set_bytes = |bytes: &[u8]| {
        std::fs::write(&rotten, bytes).unwrap();
        std::fs::File::options().write(true).open(&rotten).unwrap().set_modified(mtime).unwrap();
    };
    set_bytes(b"ONLY IN THE SECOND");

    let (code, _, err) = replicate_ssh(&sshd, &bk, &rep, &["--compress"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("b.txt reads differently from what its snapshot recorded"), "{err}");
    let state = snapshots(&rep, "s");
    assert_eq!(state.iter().filter(|(_, c)| *c).count(), 1, "only the sound snapshot is complete: {state:?}");
    assert!(state.iter().any(|(_, c)| !c), "the refused one stays .incomplete: {state:?}");

    set_bytes(b"only in the second");
    let (code, _, err) = replicate_ssh(&sshd, &bk, &rep, &["--compress", "--bwlimit", "10M"]);
    assert_eq!(code, 0, "{err}");
    assert!(snapshots(&rep, "s").iter().all(|(_, c)| *c));
    assert_same_tree(&complete(&bk, "s")[1], &complete(&rep, "s")[1], &[]);
}

/// Killed with SIGKILL while a large file arrives — first the desktop
/// (its agent ends by itself), then the agent — and the next `replicate`
/// finishes that replica from what it kept, exact; the one before is
/// untouched and no temporary file is left.
#[test]
fn an_offsite_replica_killed_mid_file_is_finished_by_the_next_run() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("offsite"));
    std::fs::create_dir(&rep).unwrap();
    sshd.authorize_root(&forced_append_only(&sshd, &rep));
    write(&src.join("a.txt"), b"a");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    sh(&format!("head -c 200M /dev/urandom > '{}'", src.join("big.bin").display()));
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    // Only the first replica, so that the second is the one interrupted.
    let (second, hidden) = (complete(&bk, "s")[1].clone(), tmp.path().join("hidden"));
    std::fs::rename(&second, &hidden).unwrap();
    assert_eq!(replicate_ssh(&sshd, &bk, &rep, &[]).0, 0);
    std::fs::rename(&hidden, &second).unwrap();
    let first = complete(&rep, "s")[0].clone();
    let before = read_tree(&first);

    // The desktop killed: its agent sees the connection end and goes.
    let mut child = start_replicate(&sshd, &bk, &rep);
    wait_for_partial(&mut child, &rep, 40 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !agents_of(&rep).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the agent outlived its desktop by 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(snapshots(&rep, "s").iter().any(|(_, c)| !c), "an .incomplete replica is left");

    // The agent killed, further on.
    let mut child = start_replicate(&sshd, &bk, &rep);
    wait_for_partial(&mut child, &rep, 120 << 20);
    let agents = agents_of(&rep);
    assert_eq!(agents.len(), 1, "one append-only agent for {}: {agents:?}", rep.display());
    sh(&format!("kill -9 {}", agents[0]));
    let status = child.wait().unwrap();
    assert!(!status.success(), "the desktop saw the agent die");
    assert!(snapshots(&rep, "s").iter().any(|(_, c)| !c), "an .incomplete replica is left");

    let (code, _, err) = replicate_ssh(&sshd, &bk, &rep, &[]);
    assert_eq!(code, 0, "{err}");
    let replicas = complete(&rep, "s");
    assert_eq!(replicas.len(), 2);
    assert_same_tree(&complete(&bk, "s")[1], &replicas[1], &[]);
    assert_eq!(read_tree(&first), before, "the replica before was touched");
    assert!(crate::resume::temps(&rep).is_empty(), "a temporary file was left");
}

/// `replicate` to `rbk-root:rep`, in the background.
fn start_replicate(sshd: &Sshd, bk: &Path, rep: &Path) -> std::process::Child {
    let mut args: Vec<String> = ["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(Sshd::root_target(rep));
    args.extend(sshd.args());
    std::process::Command::new(bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until a temporary file in `rep` holds more than `bytes`.
fn wait_for_partial(child: &mut std::process::Child, rep: &Path, bytes: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !crate::resume::temps(rep).iter().any(|(_, len)| *len > bytes) {
        assert!(child.try_wait().unwrap().is_none(), "the replicate ended before {bytes} bytes of the big file");
        assert!(std::time::Instant::now() < deadline, "the big file never reached {bytes} bytes");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pids of the append-only agents writing into `root`.
fn agents_of(root: &Path) -> Vec<u32> {
    let want = root.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.contains(&&b"--append-only"[..]) && args.contains(&want) {
            out.push(pid);
        }
    }
    out
}

// ------------------------------------------------------- a patched desktop

/// Starts the append-only agent for `root` over pipes and says `hello`.
fn agent(root: &Path, hello: &Hello) -> anyhow::Result<Session> {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["serve", "--append-only", "--root"]).arg(root);
    Connection::spawn(cmd, "the append-only agent", Some(Duration::from_secs(30)))?.handshake(hello)
}

fn hello(root: &Path, role: Role, replica: Option<ReplicaAsk>) -> Hello {
    Hello {
        role,
        path: root.as_os_str().as_encoded_bytes().to_vec(),
        options: SessionOptions::default(),
        version: "patched".into(),
        replica,
    }
}

fn write_ask(folder: &str) -> Option<ReplicaAsk> {
    Some(ReplicaAsk::Write { folder: folder.into() })
}

/// Everything of a replica root that must never change: every entry of
/// every complete snapshot and of the manifests folder, with its inode, its
/// metadata and its content.
fn held(rep: &Path) -> Vec<(String, Tree)> {
    let mut out: Vec<(String, Tree)> = complete(rep, "s")
        .iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), read_tree(p)))
        .collect();
    out.push(("manifests".into(), read_tree(&rep.join("s.rbackup/manifests"))));
    out
}

/// Asserts that the agent refused `hello`, saying `why`.
fn assert_refused(rep: &Path, hello: &Hello, why: &str) {
    match agent(rep, hello) {
        Ok(_) => panic!("the agent took {hello:?}"),
        Err(e) => assert!(format!("{e:#}").contains(why), "{hello:?}: {e:#}"),
    }
}

#[test]
fn a_patched_desktop_cannot_make_the_append_only_agent_destroy_or_rewrite_a_snapshot() {
    let tmp = scratch();
    let (src, bk, rep) = (tmp.path().join("src"), tmp.path().join("bk"), tmp.path().join("offsite"));
    write(&src.join("a.txt"), b"the original");
    write(&src.join("dir/b.txt"), b"beneath");
    assert_eq!(backup(&src, &bk, "s", &[]).0, 0);
    assert_eq!(replicate_local(&bk, &rep), 0);
    let snap = complete(&rep, "s")[0].file_name().unwrap().to_string_lossy().into_owned();
    let stamp = snap.strip_prefix("s.").unwrap().to_string();
    // Another run's .incomplete, which nothing the desktop sends may remove.
    let other = "s.01-01-20_00-00-00.incomplete";
    write(&rep.join(other).join("partial.txt"), b"someone's run");
    let intact = held(&rep);
    let other_before = read_tree(&rep.join(other));

    // (a) Writing into the complete snapshot's stamp, in every spelling.
    assert_refused(&rep, &hello(&rep, Role::Replica, write_ask(&snap)), "already complete");
    // ... also while its .incomplete exists (a planted one).
    std::fs::create_dir(rep.join(format!("{snap}.incomplete"))).unwrap();
    assert_refused(&rep, &hello(&rep, Role::Replica, write_ask(&snap)), "already complete");
    std::fs::remove_dir(rep.join(format!("{snap}.incomplete"))).unwrap();
    assert_refused(&rep, &hello(&rep, Role::Replica, write_ask(&format!("{snap}.incomplete"))), "not a snapshot");
    // (b) Names that climb out or name other folders.
    for bad in [
        format!("../s.{stamp}"),
        format!("s/../s.{stamp}"),
        format!("x/s.{stamp}"),
        format!("/etc/s.{stamp}"),
        format!("..{stamp}"),
        "s.rbackup".into(),
        "s.99-99-99_99-99-99".into(),
        format!("s.{stamp}/"),
    ] {
        match agent(&rep, &hello(&rep, Role::Replica, write_ask(&bad))) {
            Ok(_) => panic!("the agent took {bad:?}"),
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains("invalid --name") || e.contains("not a snapshot's name"), "{bad:?}: {e}");
            }
        }
        assert!(!tmp.path().join(&bad).exists() && !Path::new("/etc").join(&bad).exists());
    }
    assert_refused(&rep, &hello(&rep, Role::Replica, Some(ReplicaAsk::List { name: "../bk/s".into() })), "invalid");
    assert_refused(&rep, &hello(&tmp.path().join("bk"), Role::Replica, write_ask("s.01-02-20_00-00-00")), "only into");
    assert_refused(&rep, &hello(&rep.join("s.rbackup"), Role::Replica, write_ask("s.01-02-20_00-00-00")), "only into");
    // Other roles: no reading, no restore-style writing.
    assert_refused(&rep, &hello(&rep, Role::Source, None), "only takes replicas");
    assert_refused(&rep, &hello(&rep, Role::Sink, None), "only takes replicas");
    assert_refused(&rep, &hello(&rep, Role::Replica, None), "without its request");
    // (c) A manifest whose snapshot is gone (pruned by hand) is not replaced.
    let orphan = "s.02-01-20_00-00-00";
    std::fs::copy(rep.join("s.rbackup/manifests").join(&snap), rep.join("s.rbackup/manifests").join(orphan)).unwrap();
    let orphan_bytes = std::fs::read(rep.join("s.rbackup/manifests").join(orphan)).unwrap();
    assert_refused(&rep, &hello(&rep, Role::Replica, write_ask(orphan)), "manifest of");
    assert_eq!(std::fs::read(rep.join("s.rbackup/manifests").join(orphan)).unwrap(), orphan_bytes);
    std::fs::remove_file(rep.join("s.rbackup/manifests").join(orphan)).unwrap();

    // (c) A session for a new stamp whose listing climbs out: the agent
    // fails it; nothing of what it holds changed.
    let session = agent(&rep, &hello(&rep, Role::Replica, write_ask("s.03-01-20_00-00-00"))).unwrap();
    let outcome = hostile_listing(session);
    assert!(outcome.is_err(), "a listing with `..` was taken: {outcome:?}");
    // (c) A session that serves an empty tree, as if everything had been
    // deleted: the agent makes a new (empty) snapshot — it can't be told
    // not to — and removes nothing, not even the other run's .incomplete.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let session = agent(&rep, &hello(&rep, Role::Replica, write_ask("s.04-01-20_00-00-00"))).unwrap();
    let done = serve_tree(session, &empty).expect("a bogus new snapshot is made");
    assert_eq!(done, "s.04-01-20_00-00-00");
    assert_eq!(std::fs::read_dir(rep.join(&done)).unwrap().count(), 0);
    // ... and then again for the same stamp, now complete.
    assert_refused(&rep, &hello(&rep, Role::Replica, write_ask(&done)), "already complete");

    // Everything it held is as it was: entries, inodes, metadata, contents.
    let mut now = held(&rep);
    now.retain(|(name, _)| name != &done);
    let manifests_now = now.pop().unwrap();
    let mut intact_manifests = intact.clone();
    let manifests_before = intact_manifests.pop().unwrap();
    assert_eq!(now, intact_manifests, "a complete snapshot changed");
    for (path, info) in &manifests_before.1 {
        if !path.is_empty() {
            assert_eq!(manifests_now.1.get(path), Some(info), "the manifest {} changed", String::from_utf8_lossy(path));
        }
    }
    assert_eq!(read_tree(&rep.join(other)), other_before, "another run's .incomplete was touched");
}

fn replicate_local(bk: &Path, to: &Path) -> i32 {
    let args = ["replicate", "--backups-folder", bk.to_str().unwrap(), "--name", "s", "--to", to.to_str().unwrap()];
    run(&args.iter().map(OsStr::new).collect::<Vec<_>>()).0
}

/// Sends no manifest, then a listing whose second entry is named `..`.
fn hostile_listing(session: Session) -> anyhow::Result<String> {
    let Session { mut reader, mut writer, conn, .. } = session;
    let mut enc = Encoder::new(false);
    let meta = rbackup::fs::meta::Meta::default();
    let batch = vec![
        Entry::Dir { name: Vec::new(), meta: meta.clone(), unreadable: None, partial: false },
        Entry::File { name: b"..".to_vec(), meta, size: 1, sparse: false, link: None },
    ];
    use std::io::Write;
    writer.write_all(&enc.msg(&SourceMsg::ManifestEnd { present: false }))?;
    writer.write_all(&enc.msg(&SourceMsg::Entries(batch)))?;
    writer.flush()?;
    loop {
        match rbackup::wire::read_msg::<SinkMsg, _>(&mut reader)? {
            SinkMsg::Fatal(m) => {
                drop(writer);
                let _ = conn.finish();
                anyhow::bail!("{m}")
            }
            SinkMsg::Committed { folder, .. } => return Ok(folder),
            _ => {}
        }
    }
}

/// Serves `tree` as the original (with no manifest): the agent's answer.
fn serve_tree(session: Session, tree: &Path) -> anyhow::Result<String> {
    let Session { mut reader, mut writer, conn, .. } = session;
    use std::io::Write;
    writer.write_all(&Encoder::new(false).msg(&SourceMsg::ManifestEnd { present: false }))?;
    let dir = Dir::open_path(tree)?;
    rbackup::source::run(dir, Selection::new(&[], &[])?, false, 0, &mut reader, writer, &mut |_, _| {})?;
    let last = rbackup::wire::read_msg::<SinkMsg, _>(&mut reader)?;
    conn.finish()?;
    match last {
        SinkMsg::Committed { folder, .. } => Ok(folder),
        other => anyhow::bail!("{other:?}"),
    }
}
