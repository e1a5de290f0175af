//! The console against a local attacker (the security review of `rbackup
//! ui`): each test pins one finding — a cookie another server on
//! 127.0.0.1 could capture, a restore target planted by another user, a run
//! without its preview, work a client can make quadratic, a device opened
//! by a download, a token file others can read, a page number that
//! overflows.

use crate::common::web::{Acting, Console, add_to_config, request, store_with_hostile_names};
use std::os::unix::fs::PermissionsExt;

use crate::common::*;

fn hdr(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[test]
fn ui_session_cookie_is_for_the_consoles_secret_name_alone() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let port = ui.addr.rsplit(':').next().unwrap().to_string();
    assert!(ui.host.starts_with("rbackup-") && ui.host.ends_with(&format!(".localhost:{port}")), "{}", ui.host);
    let r = ui.get(&format!("/?token={}", ui.token), None);
    assert_eq!(r.status, 303);
    let set = r.header("set-cookie").unwrap().to_string();
    assert!(set.starts_with(&format!("rbackup_session_{port}=")), "named after the port: {set}");
    assert!(!set.to_ascii_lowercase().contains("domain="), "host-only: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    assert_eq!(ui.get("/", Some(&cookie)).status, 200);
    // The cookie, as a server of another user on 127.0.0.1 would capture
    // it, opens nothing under any other name or port.
    let name = ui.host.rsplit_once(':').unwrap().0.to_string();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("{name}:1"), name.clone()] {
        let r = request(&ui.addr, "GET", "/", &host, &[hdr("Cookie", &cookie)], b"");
        assert_eq!(r.status, 403, "Host {host}");
    }
    // The plain address takes the token only to send the browser on to the
    // secret name, and sets no cookie there.
    let plain = format!("127.0.0.1:{port}");
    let r = request(&ui.addr, "GET", &format!("/job?job=srv&token={}", ui.token), &plain, &[], b"");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location").unwrap(), format!("http://{}/job?job=srv&token={}", ui.host, ui.token));
    assert!(r.header("set-cookie").is_none());
    let r = request(&ui.addr, "GET", "/?token=wrong", &plain, &[], b"");
    assert_eq!(r.status, 403);
    assert!(r.header("location").is_none() && !r.text().contains(&name), "the name is not given away");
    // The token's redirect goes to a path of the console, never another host.
    for path in ["//evil.example/x", "/\\evil.example/x"] {
        let r = ui.get(&format!("{path}?token={}", ui.token), None);
        assert_eq!(r.status, 303, "{path}");
        assert_eq!(r.header("location").unwrap(), "/", "{path}");
    }
}

/// `rbackup -c CONFIG restore ARGS...`.
fn restore_cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["-c".as_ref(), config.as_os_str(), "restore".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    run(&all)
}

#[test]
fn ui_restore_never_follows_a_planted_symlink_or_chmods_an_existing_folder() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    // A world-writable sticky folder, like /var/tmp, where another user
    // planted the restore folder as a symlink to a folder of root's.
    let open = tmp.path().join("open");
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::create_dir(&open).unwrap();
    sh(&format!("chmod 1777 '{}' && chmod 700 '{}'", open.display(), victim.display()));
    std::os::unix::fs::symlink(&victim, open.join("srv")).unwrap();
    let to = open.join("srv");
    for dry in [true, false] {
        let mut args = vec!["--path", "docs/a.txt", "--to", to.to_str().unwrap()];
        if dry {
            args.push("--dry-run");
        }
        let (code, out, err) = restore_cli(&config, &args);
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains("is a symlink"), "{err}");
    }
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "nothing written through the symlink");
    assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o7777, 0o700);
    // A folder of another user on the way, and a folder others can write to.
    let theirs = open.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    sh(&format!("chown 4242 '{}'", theirs.display()));
    let (code, _, err) = restore_cli(&config, &["--to", theirs.join("x").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("belongs to uid 4242"), "{err}");
    assert!(!theirs.join("x").exists());
    let (code, _, err) = restore_cli(&config, &["--to", open.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("writable by others"), "{err}");
    // Through the sticky folder to a new folder of root's: made 0700, and
    // then given the snapshot root's metadata, as a restore does.
    let fresh = open.join("fresh");
    let (code, _, err) = restore_cli(&config, &["--to", fresh.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(fresh.join("docs/a.txt")).unwrap(), b"second version, longer\n");
    // A folder that was there keeps its owner and mode (the snapshot
    // root's 0755 would open a private folder).
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    sh(&format!("chmod 700 '{}'", mine.display()));
    let (code, _, err) = restore_cli(&config, &["--to", mine.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(mine.join("docs/a.txt").exists());
    assert_eq!(std::fs::metadata(&mine).unwrap().permissions().mode() & 0o7777, 0o700, "left as it was");
    // The console offers a folder of root's, not one in /var/tmp.
    let ui = Console::start(&config, &["--allow-actions"]);
    let cookie = ui.login();
    let form = ui.get("/restore?job=srv&snap=x&p=docs", Some(&cookie)).text();
    assert!(form.contains("value=\"/var/lib/rbackup/restore/srv\""), "{form}");
}

#[test]
fn ui_restore_and_prune_run_only_through_their_previews_one_use_confirmation() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    add_to_config(&config, "keep_last = 1\n");
    let Acting { ui, cookie, csrf } = Acting::start(&config);
    let snaps = complete(&bk, "srv");
    let newest = snaps[1].file_name().unwrap().to_str().unwrap().to_string();
    let to = tmp.path().join("restored");
    // A run without a preview: refused, nothing written, nothing deleted.
    let form = format!("csrf={csrf}&job=srv&snap=latest&p=docs&dest=local&to={}", to.display());
    let r = ui.post("/restore", &cookie, &format!("{form}&step=run"));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = ui.post("/action", &cookie, &format!("csrf={csrf}&job=srv&kind=prune"));
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!to.exists());
    assert_eq!(complete(&bk, "srv").len(), 2);
    // The preview resolves `latest` to its folder and gives each value as
    // --flag=VALUE; its confirmation runs that very command, once.
    let r = ui.post("/restore", &cookie, &format!("{form}&step=preview"));
    let preview = ui.wait_op(r.header("location").unwrap(), &cookie);
    assert!(preview.contains(&format!("--snapshot={newest} --path=docs --to={}", to.display())), "{preview}");
    let forged = preview.replace("name=\"token\" value=\"", "name=\"token\" value=\"0");
    assert_eq!(ui.confirm(&forged, &cookie).status, 403, "a wrong token");
    let r = ui.confirm(&preview, &cookie);
    assert_eq!(r.status, 303, "{}", r.text());
    let done = ui.wait_op(r.header("location").unwrap(), &cookie);
    assert!(done.contains(&format!("--snapshot={newest} --path=docs --to=")), "{done}");
    assert!(done.contains("Finished: exit code 0") && !done.contains("id=\"confirm\""), "{done}");
    assert_eq!(std::fs::read(to.join("docs/a.txt")).unwrap(), b"second version, longer\n");
    assert_eq!(ui.confirm(&preview, &cookie).status, 403, "used once");
    // A value starting with `-` stays a value.
    let r = ui.post(
        "/restore",
        &cookie,
        &format!("csrf={csrf}&job=srv&snap={newest}&p=-x&dest=local&to={}&step=preview", to.display()),
    );
    let preview = ui.wait_op(r.header("location").unwrap(), &cookie);
    assert!(preview.contains("--path=-x") && preview.contains("has no -x"), "{preview}");
    // Prune: the snapshots changed since its preview, its confirmation is refused.
    let r = ui.post("/action", &cookie, &format!("csrf={csrf}&job=srv&kind=prune-preview"));
    let preview = ui.wait_op(r.header("location").unwrap(), &cookie);
    assert!(preview.contains("id=\"confirm\""), "{preview}");
    let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "backup".as_ref()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ui.confirm(&preview, &cookie).status, 409);
    assert_eq!(complete(&bk, "srv").len(), 3, "nothing pruned");
}

#[test]
fn ui_download_never_opens_a_device_or_fifo_and_refusals_are_not_500() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let snap = complete(&bk, "srv")[1].clone();
    let name = snap.file_name().unwrap().to_str().unwrap().to_string();
    // A FIFO in the snapshot, with a writer waiting for a reader: an open
    // for reading, even O_NONBLOCK, lets the writer through.
    let fifo = snap.join("docs/fifo");
    sh(&format!("mkfifo '{}' && mknod '{}' c 1 3", fifo.display(), snap.join("docs/null").display()));
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.clone();
    std::thread::spawn(move || {
        let w = std::fs::OpenOptions::new().write(true).open(&f2);
        let _ = tx.send(w.is_ok());
    });
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let get = |p: &str| ui.get(&format!("/download?job=srv&snap={name}&p={p}"), Some(&cookie));
    assert_eq!(get("docs/fifo").status, 400);
    assert_eq!(get("docs/null").status, 400, "a device node");
    let opened = rx.recv_timeout(std::time::Duration::from_secs(2)).is_ok();
    if !opened {
        // Let the writer go.
        drop(std::fs::File::open(&fifo));
    }
    assert!(!opened, "the console opened the FIFO");
    // A symlink, a path through one, a file as a folder, a folder: 404 or 400, never 500.
    assert_eq!(get("out").status, 400, "a symlink (shown, never served)");
    assert_eq!(get("outdir/passwd").status, 404);
    assert_eq!(get("docs/a.txt/x").status, 404);
    assert_eq!(get("docs").status, 400);
    let missing = ui.get(&format!("/browse?job=srv&snap={name}&p=docs/nosuch"), Some(&cookie));
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("docs/nosuch is not a folder in"), "{}", missing.text());
    assert_eq!(get("docs/a.txt").body, b"second version, longer\n");
    // A page number that would overflow: an empty page, not a panic.
    for page in ["18446744073709551615", "99999999999999999999999"] {
        let r = ui.get(&format!("/browse?job=srv&snap={name}&p=docs&page={page}"), Some(&cookie));
        assert_eq!(r.status, 200, "page={page}");
        let r = ui.get(&format!("/browse?job=srv&snap={name}&p=docs&changed=1&page={page}"), Some(&cookie));
        assert_eq!(r.status, 200, "page={page}");
    }
    assert_eq!(ui.get("/", Some(&cookie)).status, 200, "the console still answers");
}

#[test]
fn ui_log_page_reads_only_the_end_of_a_huge_operation_log() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    // 64 GiB of holes, then a record: reading it whole would never end.
    let log = bk.join("srv.rbackup/console.jsonl");
    let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&log).unwrap();
    f.set_len(64 << 30).unwrap();
    drop(f);
    let rec = r#"{"time":"2030-01-01T00:00:00+00:00","job":"srv","record":{"event":"finished","op":1,"title":"the last one","exit_code":0}}"#;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, format!("\n{rec}\n").as_bytes()).unwrap();
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let page = ui.get("/log", Some(&cookie));
    assert_eq!(page.status, 200);
    assert!(page.text().contains("the last one"), "{}", page.text());
    assert_eq!(ui.get("/log?job=nosuch", Some(&cookie)).status, 404, "a job the config doesn't have");
}

#[test]
fn ui_refuses_a_token_file_others_can_read_or_that_is_not_roots() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let file = tmp.path().join("ui-token");
    std::fs::write(&file, "tok-0123456789abcdef0123456789\n").unwrap();
    let start_with = |env: Option<&std::path::Path>, file: &std::path::Path| {
        let mut c = rbackup(&[
            "-c".as_ref(),
            config.as_os_str(),
            "ui".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--token-file".as_ref(),
            file.as_os_str(),
        ]);
        c.env_remove("CREDENTIALS_DIRECTORY");
        if let Some(d) = env {
            c.env("CREDENTIALS_DIRECTORY", d);
        }
        let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), line, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let start = |env: Option<&std::path::Path>| start_with(env, &file);
    sh(&format!("chmod 644 '{}'", file.display()));
    let (code, line, err) = start(None);
    assert_eq!(code, Some(2), "{line}{err}");
    assert!(err.contains("others can read it") && line.is_empty(), "{err}");
    sh(&format!("chmod 600 '{}' && chown 4242 '{}'", file.display(), file.display()));
    let (code, _, err) = start(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("belongs to uid 4242"), "{err}");
    // systemd's credentials folder is private to the service: accepted.
    sh(&format!("chown 0 '{}' && chmod 644 '{}'", file.display(), file.display()));
    let (_, line, err) = start(Some(tmp.path()));
    assert!(line.contains("/?token=TOKEN"), "{line}{err}");
    // … but only what is really in it, not what a `..` reaches from it.
    let credentials = tmp.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let (code, line, err) = start_with(Some(&credentials), &credentials.join("../ui-token"));
    assert_eq!(code, Some(2), "{line}{err}");
    assert!(err.contains("others can read it"), "{err}");
}

#[test]
fn ui_prune_deletes_no_more_than_its_preview_showed() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Acting::start(&config);
    // No keep_* rules: nothing to prune by, and no button that would fail.
    let home = ui.ui.get("/", Some(&ui.cookie)).text();
    assert!(!home.contains("prune-preview") && home.contains("no keep_* rules"), "{home}");
    let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "backup".as_ref()]);
    assert_eq!(code, 0, "{err}");
    let rules = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{rules}keep_last = 5\n")).unwrap();
    let preview = ui.start_op("/action", "job=srv&kind=prune-preview");
    assert!(!preview.contains("id=\"confirm\""), "the rules remove nothing: nothing to confirm: {preview}");
    std::fs::write(&config, format!("{rules}keep_last = 2\n")).unwrap();
    let preview = ui.start_op("/action", "job=srv&kind=prune-preview");
    assert!(preview.contains("would remove") && preview.contains("id=\"confirm\""), "{preview}");
    // The config's rules lowered after the preview: the confirmed run
    // still prunes by the rules the preview showed.
    std::fs::write(&config, format!("{rules}keep_last = 1\n")).unwrap();
    let done = ui.confirm(&preview);
    assert!(done.contains("--keep-last=2") && done.contains("Finished: exit code 0"), "{done}");
    assert!(done.contains(&format!("-c {}", config.display())), "the command as run, its config named: {done}");
    assert_eq!(complete(&bk, "srv").len(), 2, "one removed, as previewed");
}
