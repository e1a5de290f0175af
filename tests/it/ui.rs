//! `rbackup ui` over HTTP: who gets in (token, session cookie, Host),
//! what a POST needs (CSRF, Origin, --allow-actions), what a URL can reach
//! (nothing above the snapshot, no symlink followed), how hostile names are
//! shown (escaped), the security headers, and a restore through the
//! console's preview and confirmation.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::common::web::{Acting, Console, add_to_config, request, store_with_hostile_names};
use crate::common::*;

fn snap_names(bk: &Path) -> Vec<String> {
    complete(bk, "srv").iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn ui_refuses_without_a_session_and_with_a_wrong_token() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let snap = &snap_names(&bk)[1];
    for path in ["/", "/job?job=srv", &format!("/browse?job=srv&snap={snap}"), "/log", "/assets/style.css"] {
        assert_eq!(ui.get(path, None).status, 401, "{path} without a session");
        let made_up = format!("rbackup_session_{}=0123456789abcdef", ui.addr.rsplit(':').next().unwrap());
        assert_eq!(ui.get(path, Some(&made_up)).status, 401, "{path} with a made-up session");
    }
    assert_eq!(ui.get("/?token=wrong", None).status, 403);
    assert_eq!(ui.get(&format!("/?token={}x", ui.token), None).status, 403);
    let r = ui.get(&format!("/job?job=srv&token={}", ui.token), None);
    assert_eq!(r.status, 303);
    let cookie = r.header("set-cookie").unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert_eq!(r.header("location"), Some("/job?job=srv"), "the token is stripped from the address");
    let cookie = cookie.split(';').next().unwrap();
    let home = ui.get("/", Some(cookie));
    assert_eq!(home.status, 200);
    assert!(home.text().contains("/job?job=srv"), "the job is listed");
    // A page of another site whose name resolves to 127.0.0.1 (DNS rebinding).
    let r = request(&ui.addr, "GET", "/", "evil.example:80", &[("Cookie".into(), cookie.into())], b"");
    assert_eq!(r.status, 403);
}

#[test]
fn ui_answers_carry_a_strict_csp_and_no_inline_script() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let snap = &snap_names(&bk)[1];
    for path in [
        "/",
        "/job?job=srv",
        &format!("/browse?job=srv&snap={snap}&p=docs"),
        &format!("/file?job=srv&snap={snap}&p=docs/a.txt"),
        "/log",
        "/nope",
    ] {
        let r = ui.get(path, Some(&cookie));
        let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("{path}: no CSP"));
        for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'"] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{path}");
        let text = r.text();
        for (i, _) in text.match_indices("<script") {
            assert!(text[i..].starts_with("<script src=\"/assets/app.js\""), "{path}: inline script at {i}");
        }
        assert!(!text.contains(" style="), "{path}: an inline style");
    }
    assert_eq!(ui.get("/nope", None).header("x-frame-options"), Some("DENY"), "refusals carry them too");
}

#[test]
fn ui_posts_need_the_csrf_token_our_origin_and_allow_actions() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &["--allow-actions"]);
    let cookie = ui.login();
    let csrf = ui.csrf(&cookie);
    assert_eq!(ui.post("/action", &cookie, "job=srv&kind=verify").status, 403, "no CSRF token");
    assert_eq!(ui.post("/action", &cookie, "job=srv&kind=verify&csrf=0000").status, 403, "a wrong one");
    let other = ui.login();
    assert_eq!(
        ui.post("/action", &other, &format!("job=srv&kind=verify&csrf={csrf}")).status,
        403,
        "another session's"
    );
    let foreign = vec![
        ("Cookie".to_string(), cookie.clone()),
        ("Origin".to_string(), "http://evil.example".to_string()),
        ("Content-Type".to_string(), "application/x-www-form-urlencoded".to_string()),
    ];
    let body = format!("job=srv&kind=verify&csrf={csrf}");
    assert_eq!(request(&ui.addr, "POST", "/action", &ui.host, &foreign, body.as_bytes()).status, 403, "another origin");
    let ok = ui.post("/action", &cookie, &body);
    assert_eq!(ok.status, 303, "{}", ok.text());
    let op = ok.header("location").unwrap().to_string();
    assert!(op.starts_with("/op?id="), "{op}");
    let page = ui.wait_op(&op, &cookie);
    assert!(page.contains("Finished: exit code 0"), "{page}");

    // Read-only: nothing offered, every POST refused even with its token.
    let ro = Console::start(&config, &[]);
    let cookie = ro.login();
    let home = ro.get("/", Some(&cookie)).text();
    assert!(!home.contains("name=\"csrf\"") && !home.contains("Back up now"), "{home}");
    // Refused as read-only whatever the form holds.
    assert_eq!(ro.post("/action", &cookie, "job=srv&kind=backup&csrf=x").status, 403);
    assert_eq!(ro.get("/restore?job=srv&snap=x&p=", Some(&cookie)).status, 403);
}

#[test]
fn ui_urls_cannot_climb_out_and_symlinks_are_shown_not_followed() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let snap = &snap_names(&bk)[1];
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let first_line = passwd.lines().next().unwrap().to_string();
    let leaks = |path: &str| {
        let r = ui.get(path, Some(&cookie));
        let t = r.text();
        assert!(!t.contains(&first_line), "{path} served /etc/passwd: {t}");
        r.status
    };
    for p in [
        "..%2f..%2f..%2fetc%2fpasswd",
        "../../../etc/passwd",
        "docs%2f..%2f..%2f..",
        "a%00b",
        "%2e%2e%2fetc",
        "x/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ] {
        for page in ["browse", "file", "download"] {
            let status = leaks(&format!("/{page}?job=srv&snap={snap}&p={p}"));
            assert_eq!(status, 400, "/{page} with p={p}");
        }
    }
    // The snapshot and the job are names to look up, never paths.
    for q in ["snap=..&p=etc/passwd", "snap=..%2f..%2fetc&p=passwd", "snap=%2fetc&p=passwd"] {
        assert_eq!(leaks(&format!("/download?job=srv&{q}")), 404, "{q}");
    }
    assert_eq!(leaks(&format!("/download?job=..%2f..&snap={snap}&p=etc/passwd")), 404);
    // Encoded slashes in the URL's path reach no file either.
    for path in ["/assets/..%2f..%2f..%2fetc%2fpasswd", "/..%2f..%2fetc%2fpasswd", "/assets/%2e%2e/%2e%2e/etc/passwd"] {
        assert_eq!(leaks(path), 404, "{path}");
    }
    // A symlink to a file outside: listed with its target, its page says so, never served.
    let root = ui.get(&format!("/browse?job=srv&snap={snap}"), Some(&cookie)).text();
    assert!(root.contains("→ /etc/passwd") && root.contains("→ /etc<"), "{root}");
    let page = ui.get(&format!("/file?job=srv&snap={snap}&p=out"), Some(&cookie));
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/etc/passwd") && !page.text().contains(&first_line));
    assert!(!page.text().contains("Download this version"), "a symlink offers no download");
    assert_ne!(leaks(&format!("/download?job=srv&snap={snap}&p=out")), 200);
    // A symlink to a directory outside: not entered, nothing beneath it reached.
    assert_ne!(leaks(&format!("/browse?job=srv&snap={snap}&p=outdir")), 200);
    assert_ne!(leaks(&format!("/download?job=srv&snap={snap}&p=outdir/passwd")), 200);
    leaks(&format!("/file?job=srv&snap={snap}&p=outdir/passwd"));
}

#[test]
fn ui_renders_hostile_names_escaped_and_non_utf8_names_round_trip() {
    require_root();
    let tmp = scratch();
    let (src, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let snap = &snap_names(&bk)[1];
    let page = ui.get(&format!("/browse?job=srv&snap={snap}&p=docs"), Some(&cookie)).text();
    assert!(!page.contains("<script>alert") && !page.contains("<img src=x"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)"), "{page}");
    assert!(page.contains("&lt;img src=x onerror=alert(2)&gt;"), "{page}");
    assert!(page.contains("new\\nline"), "a newline is shown as \\n: {page}");
    assert!(page.contains("bad\\xffname"), "an invalid byte is shown as \\xff: {page}");
    // Its link carries the raw byte, percent-encoded, and leads back to it.
    assert!(page.contains("p=docs/bad%FFname"), "{page}");
    let file = ui.get(&format!("/file?job=srv&snap={snap}&p=docs/bad%FFname"), Some(&cookie));
    assert_eq!(file.status, 200);
    assert!(file.text().contains("bad\\xffname"));
    let dl = ui.get(&format!("/download?job=srv&snap={snap}&p=docs/bad%FFname"), Some(&cookie));
    assert_eq!(dl.status, 200);
    assert_eq!(dl.body, std::fs::read(src.join(OsStr::from_bytes(b"docs/bad\xffname"))).unwrap());
    let hist = ui.get(&format!("/file?job=srv&snap={snap}&p=docs/%3Cscript%3Ealert(1)"), Some(&cookie)).text();
    assert!(!hist.contains("<script>alert"), "{hist}");
    assert!(hist.contains("&lt;script&gt;alert(1)"), "{hist}");
}

#[test]
fn ui_file_history_and_downloads_of_each_version() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let snaps = snap_names(&bk);
    let page = ui.get(&format!("/file?job=srv&snap={}&p=docs/a.txt", snaps[1]), Some(&cookie)).text();
    assert!(page.contains(">new<") && page.contains(">changed<"), "{page}");
    for (s, want) in snaps.iter().zip([&b"first version\n"[..], b"second version, longer\n"]) {
        let r = ui.get(&format!("/download?job=srv&snap={s}&p=docs/a.txt"), Some(&cookie));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, want, "{s}");
        assert!(r.header("content-disposition").unwrap().starts_with("attachment"));
    }
    let changed = ui.get(&format!("/browse?job=srv&snap={}&p=docs&changed=1", snaps[1]), Some(&cookie)).text();
    assert!(changed.contains("p=docs/a.txt") && !changed.contains("alert(1)"), "only what changed: {changed}");
    let job = ui.job_page("srv", &cookie);
    assert!(job.contains("<svg") && job.contains(&snaps[0]) && job.contains(&snaps[1]), "{job}");
    assert!(job.contains("<td class=\"num\">1</td>"), "one file changed: {job}");
}

#[test]
fn ui_restore_previews_then_restores_on_confirmation_and_logs_it() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Acting::start(&config);
    let snap = &snap_names(&bk)[0];
    let to = tmp.path().join("restored");
    let form = format!("job=srv&snap={snap}&p=docs%252Fa.txt&dest=local&to={}&step=preview", to.display());
    let preview = ui.start_op("/restore", &form);
    assert!(preview.contains("docs/a.txt") && preview.contains("id=\"confirm\""), "{preview}");
    assert!(!to.join("docs/a.txt").exists(), "a preview writes nothing");
    let done = ui.confirm(&preview);
    assert!(done.contains("Finished: exit code 0"), "{done}");
    assert_eq!(std::fs::read(to.join("docs/a.txt")).unwrap(), std::fs::read(bk.join(snap).join("docs/a.txt")).unwrap());
    let log = std::fs::read_to_string(bk.join("srv.rbackup/console.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "started and finished, twice: {log}");
    assert!(log.lines().last().unwrap().contains("\"exit_code\":0"), "{log}");
    let page = ui.ui.get("/log", Some(&ui.cookie)).text();
    assert!(page.contains("Restore docs/a.txt"), "{page}");
}

#[test]
fn ui_refuses_a_non_loopback_address_without_allow_remote_and_tls() {
    let tmp = scratch();
    let config = tmp.path().join("rbackup.toml");
    std::fs::write(&config, format!("[job.srv]\nsource = \"/srv\"\nbackups_folder = \"{}\"\n", tmp.path().display()))
        .unwrap();
    for (extra, why) in [(&[][..], "--allow-remote"), (&["--allow-remote"][..], "without TLS")] {
        let mut args: Vec<&OsStr> =
            vec!["-c".as_ref(), config.as_os_str(), "ui".as_ref(), "--listen".as_ref(), "0.0.0.0:0".as_ref()];
        args.extend(extra.iter().map(OsStr::new));
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{out}{err}");
        assert!(err.contains("refusing to listen on 0.0.0.0") && err.contains(why) && out.is_empty(), "{err}");
    }
    // Another loopback address: the printed name would not reach it.
    let args: Vec<&OsStr> =
        ["-c".as_ref(), config.as_os_str(), "ui".as_ref(), "--listen".as_ref(), "127.0.0.2:0".as_ref()].to_vec();
    let (code, out, err) = run(&args);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("listen on 127.0.0.1") && out.is_empty(), "{err}");
}

/// One HTTP/1.1 request over TLS (through `openssl s_client`, which does
/// not check the test's self-signed certificate); the raw answer.
fn https_get(port: u16, path: &str) -> String {
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl (scripts/install-deps.sh installs it)");
    let req = format!("GET {path} HTTP/1.1\r\nHost: desktop.example:{port}\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), req.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ui_beyond_loopback_speaks_only_tls_with_a_secure_cookie() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=desktop.example \
         -keyout '{}' -out '{}' 2>/dev/null",
        key.display(),
        cert.display()
    ));
    let child = rbackup(&[
        "-c".as_ref(),
        config.as_os_str(),
        "ui".as_ref(),
        "--listen".as_ref(),
        "0.0.0.0:0".as_ref(),
        "--allow-remote".as_ref(),
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let rest = line.trim().strip_prefix("https://0.0.0.0:").unwrap_or_else(|| panic!("printed {line:?}"));
    let (port, token) = rest.split_once("/?token=").unwrap();
    let port: u16 = port.parse().unwrap();
    let answer = https_get(port, &format!("/?token={token}"));
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let cookie = answer.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap_or_default();
    assert!(cookie.contains("Secure") && cookie.contains("HttpOnly"), "{cookie}");
    assert!(https_get(port, "/").starts_with("HTTP/1.1 401"), "no session over TLS either");
    // Plain HTTP gets no page.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    std::io::Write::write_all(&mut plain, format!("GET /?token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut got);
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1"), "{got:?}");
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("beyond this machine"), "a warning: {err}");
}

#[test]
fn ui_reads_its_token_from_a_file_and_never_prints_it() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let file = tmp.path().join("ui-token");
    let token = "tok-0123456789abcdef0123456789";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    sh(&format!("chmod 600 '{}'", file.display()));
    let mut ui = Console::start(&config, &["--token-file", file.to_str().unwrap()]);
    assert!(ui.token.starts_with("TOKEN (TOKEN is in ") && !ui.token.contains(token), "printed: {}", ui.token);
    assert_eq!(ui.get(&format!("/?token={token}x"), None).status, 403);
    ui.token = token.to_string();
    let cookie = ui.login();
    assert_eq!(ui.get("/", Some(&cookie)).status, 200);
    std::fs::write(&file, "short\n").unwrap();
    let (code, _, err) =
        run(&["-c".as_ref(), config.as_os_str(), "ui".as_ref(), "--token-file".as_ref(), file.as_os_str()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn ui_prune_shows_its_dry_run_and_deletes_only_when_confirmed() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    add_to_config(&config, "keep_last = 1\n");
    let ui = Acting::start(&config);
    let preview = ui.start_op("/action", "job=srv&kind=prune-preview");
    let older = &snap_names(&bk)[0];
    assert!(preview.contains(older.as_str()) && preview.contains("id=\"confirm\""), "{preview}");
    assert_eq!(complete(&bk, "srv").len(), 2, "a preview deletes nothing");
    let done = ui.confirm(&preview);
    assert!(done.contains("Finished: exit code 0"), "{done}");
    assert_eq!(complete(&bk, "srv").len(), 1, "the older snapshot is gone");
    assert!(!bk.join(older).exists());
}

#[test]
fn ui_listings_paginate_with_directories_first() {
    require_root();
    let tmp = scratch();
    let (src, bk, config) = store_with_hostile_names(tmp.path());
    for i in 0..450 {
        write(&src.join(format!("many/f{i:03}")), b"");
    }
    std::fs::create_dir(src.join("many/zz-dir")).unwrap();
    let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "backup".as_ref()]);
    assert_eq!(code, 0, "{err}");
    let snap = snap_names(&bk).pop().unwrap();
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let mut seen = Vec::new();
    for page in 0..3 {
        let text = ui.get(&format!("/browse?job=srv&snap={snap}&p=many&page={page}"), Some(&cookie)).text();
        assert!(text.contains(&format!("page {} of 3 (451 entries)", page + 1)), "{text}");
        let names: Vec<String> =
            text.match_indices("p=many/").map(|(i, _)| text[i + 7..].split('"').next().unwrap().to_string()).collect();
        if page == 0 {
            assert_eq!(names[0], "zz-dir", "directories first");
        }
        seen.extend(names);
    }
    let mut want: Vec<String> = (0..450).map(|i| format!("f{i:03}")).collect();
    want.insert(0, "zz-dir".into());
    assert_eq!(seen, want, "three pages, each entry once, in order");
}

#[test]
fn ui_shows_what_each_replica_holds_and_what_is_pending() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let usb = tmp.path().join("usb");
    std::fs::create_dir(&usb).unwrap(); // a bare mount point: no drive there
    add_to_config(&config, &format!("replicas = [\"{}\"]\n", usb.display()));
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let home = ui.get("/", Some(&cookie)).text();
    assert!(home.contains("not there, or can't be read") && !home.contains("pending"), "{home}");
    // The drive, holding the job's replicas (none left on it).
    std::fs::create_dir(usb.join("srv.rbackup")).unwrap();
    let home = ui.get("/", Some(&cookie)).text();
    assert!(home.contains("2 pending, about"), "{home}");
    let job = ui.job_page("srv", &cookie);
    assert!(job.contains(&format!("On {}", usb.display())) && job.matches(">pending").count() == 2, "{job}");
    let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "replicate".as_ref()]);
    assert_eq!(code, 0, "{err}");
    let home = ui.get("/", Some(&cookie)).text();
    assert!(home.contains("up to date"), "{home}");
    let job = ui.job_page("srv", &cookie);
    assert_eq!(job.matches(">yes<").count(), 2, "{job}");
}

#[test]
fn ui_home_shows_the_progress_of_a_run_in_the_jobs_log() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let log = tmp.path().join("srv.log");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("log_file = \"{}\"\n", log.display()));
    std::fs::write(&config, text).unwrap();
    // A run going on, as the timer's leaves it: its .incomplete snapshot and,
    // every few seconds, a progress line in the job's log.
    std::fs::create_dir(bk.join("srv.01-01-30_00-00-00.incomplete")).unwrap();
    std::fs::write(&log, "2030-01-01 00:00:01 [srv] progress: 1200 entries, 1100 linked, 5.0 MiB fetched so far\n")
        .unwrap();
    let ui = Console::start(&config, &[]);
    let cookie = ui.login();
    let home = ui.get("/", Some(&cookie)).text();
    assert!(home.contains("running: progress: 1200 entries, 1100 linked, 5.0 MiB fetched so far"), "{home}");
    // A log untouched for minutes: no run is said to go on.
    sh(&format!("touch -d '-5 minutes' '{}'", log.display()));
    let home = ui.get("/", Some(&cookie)).text();
    assert!(!home.contains("running: progress") && home.contains("one to --continue"), "{home}");
}

#[test]
fn ui_restores_back_to_the_source_in_place_with_delete_after_a_preview() {
    require_root();
    let tmp = scratch();
    let (src, bk, config) = store_with_hostile_names(tmp.path());
    write(&src.join("docs/added-later.txt"), b"not in any snapshot");
    let ui = Acting::start(&config);
    let snap = &snap_names(&bk)[0];
    let form = ui.ui.get(&format!("/restore?job=srv&snap={snap}&p=docs"), Some(&ui.cookie)).text();
    assert!(form.contains(&format!("Back to the server, in place: <code>{}</code>", src.display())), "{form}");
    let preview = ui.start_op("/restore", &format!("job=srv&snap={snap}&p=docs&dest=server&delete=1&step=preview"));
    assert!(
        preview.contains("--delete") && preview.contains("added-later.txt"),
        "the preview names what goes: {preview}"
    );
    assert!(src.join("docs/added-later.txt").exists(), "a preview deletes nothing");
    let done = ui.confirm(&preview);
    assert!(done.contains("Finished: exit code 0"), "{done}");
    assert_eq!(std::fs::read(src.join("docs/a.txt")).unwrap(), b"first version\n");
    assert!(!src.join("docs/added-later.txt").exists(), "--delete removed it");
}

#[test]
fn ui_with_a_job_shows_that_job_only() {
    require_root();
    let tmp = scratch();
    let (src, bk, config) = store_with_hostile_names(tmp.path());
    add_to_config(
        &config,
        &format!("\n[job.other]\nsource = \"{}\"\nbackups_folder = \"{}\"\n", src.display(), bk.display()),
    );
    let all = Console::start(&config, &[]);
    let cookie = all.login();
    let home = all.get("/", Some(&cookie)).text();
    assert!(home.contains("/job?job=srv") && home.contains("/job?job=other"), "{home}");
    let one = Console::start(&config, &["-j", "other"]);
    let cookie = one.login();
    let home = one.get("/", Some(&cookie)).text();
    assert!(!home.contains("/job?job=srv") && home.contains("/job?job=other"), "{home}");
    assert_eq!(one.get("/job?job=srv", Some(&cookie)).status, 404);
    let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "-j".as_ref(), "nope".as_ref(), "ui".as_ref()]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn ui_streams_an_operations_output_as_server_sent_events() {
    require_root();
    let tmp = scratch();
    let (_, _, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &["--allow-actions"]);
    let cookie = ui.login();
    let csrf = ui.csrf(&cookie);
    let r = ui.post("/action", &cookie, &format!("csrf={csrf}&job=srv&kind=verify"));
    let id = r.header("location").unwrap().strip_prefix("/op?id=").unwrap().to_string();
    // From the first line to the end: every line, then `done` with the exit code.
    let events = ui.get(&format!("/op/events?id={id}&from=0"), Some(&cookie));
    assert_eq!(events.header("content-type"), Some("text/event-stream"));
    let text = events.text();
    assert!(text.contains("event: line\ndata: "), "{text}");
    assert!(text.trim_end().ends_with("event: done\ndata: 0"), "{text}");
    let page = ui.wait_op(&format!("/op?id={id}"), &cookie);
    let lines = text.matches("event: line").count();
    assert_eq!(
        page.split("<pre id=\"output\">").nth(1).unwrap().split("</pre>").next().unwrap().lines().count(),
        lines
    );
}

#[test]
fn ui_restores_a_file_named_like_an_option() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Acting::start(&config);
    let snap = &snap_names(&bk)[0];
    let to = tmp.path().join("restored");
    let preview =
        ui.start_op("/restore", &format!("job=srv&snap={snap}&p=--help&dest=local&to={}&step=preview", to.display()));
    let done = ui.confirm(&preview);
    assert!(done.contains("Finished: exit code 0") && done.contains("--path=--help"), "{done}");
    assert_eq!(std::fs::read(to.join("--help")).unwrap(), b"a file named like an option");
}

#[test]
fn ui_without_a_config_file_says_so() {
    let tmp = scratch();
    let missing = tmp.path().join("none.toml");
    let (code, out, err) = run(&["-c".as_ref(), missing.as_os_str(), "ui".as_ref()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty() && err.contains("none.toml"), "{err}");
}
