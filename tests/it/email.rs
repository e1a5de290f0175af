//! Mail reports against a real SMTP server on loopback: plain, STARTTLS with
//! a private CA trusted through `ca_file`, AUTH with a password file; one mail
//! per failed run; an unreachable SMTP server changes nothing about the run.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::common::smtp::{Pki, Smtp, make_pki};
use crate::common::*;

/// A config with job `web` backing up `source` into `dir/bk`, and `email`.
fn config(dir: &Path, source: &str, email: &str) -> PathBuf {
    let path = dir.join("rbackup.toml");
    let text = format!(
        "[job.web]\nsource = \"{source}\"\nbackups_folder = \"{}\"\n\n[email]\nfrom = \"rbackup@example.org\"\nto = [\"admin@example.org\", \"oncall@example.org\"]\n{email}",
        dir.join("bk").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn rb(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&OsStr> = vec!["-c".as_ref(), cfg.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    run(&all)
}

fn hostname() -> String {
    String::from_utf8(std::process::Command::new("uname").arg("-n").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn a_test_message_goes_through_plain_smtp() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let cfg = config(
        tmp.path(),
        "/srv",
        &format!("host = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nsend_on = \"partial\"\n", smtp.port),
    );
    let (code, _, err) = rb(&cfg, &["test-email"]);
    assert_eq!(code, 0, "{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["subject"], format!("[rbackup] web on {}: test message", hostname()));
    assert_eq!(msgs[0]["rcpt_tos"], serde_json::json!(["admin@example.org", "oncall@example.org"]));
    // Regression: it said "Reports are sent on: Partial." (the Rust name).
    let body = msgs[0]["body"].as_str().unwrap();
    assert!(body.contains("Reports are sent on: send_on = \"partial\" (runs that fail"), "{body}");
    assert_mime(&msgs[0]);
}

/// Regression (a newcomer's walk): a `security` that doesn't match the
/// server's port failed with lettre's words only ("received corrupt
/// message of type InvalidContentType", "STARTTLS is not supported on this
/// server"). Each now says which setting to use.
#[test]
fn a_security_setting_that_does_not_fit_the_server_says_which_one_does() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    for (security, fix) in [("tls", "security = \"starttls\""), ("starttls", "security = \"none\"")] {
        let mail =
            format!("host = \"127.0.0.1\"\nport = {}\nsecurity = \"{security}\"\ntimeout_seconds = 5\n", smtp.port);
        let cfg = config(tmp.path(), "/srv", &mail);
        let (code, _, err) = rb(&cfg, &["test-email"]);
        assert_ne!(code, 0, "{err}");
        assert!(err.contains(fix), "security = {security}: {err}");
    }
}

/// Regression: mails had no MIME-Version, Content-Type nor Message-ID
/// although the body was quoted-printable and the subject an encoded word.
fn assert_mime(msg: &serde_json::Value) {
    let h = &msg["headers"];
    assert_eq!(h["mime-version"], "1.0", "{h}");
    let ct = h["content-type"].as_str().unwrap_or_default().to_lowercase().replace([' ', '"'], "");
    assert!(ct.starts_with("text/plain;charset=utf-8"), "{h}");
    assert!(h["content-transfer-encoding"].is_string(), "{h}");
    let id = h["message-id"].as_str().unwrap_or_default();
    assert!(id.starts_with('<') && id.ends_with('>') && id.contains('@'), "{h}");
    assert!(h["date"].is_string(), "{h}");
}

#[test]
fn starttls_with_a_private_ca_and_auth_from_a_password_file() {
    require_root();
    let tmp = scratch();
    let pki: Pki = make_pki(tmp.path());
    let smtp = Smtp::start(tmp.path(), "starttls", Some(&pki), Some(("mailer", "s3cret pass")));
    let pw = tmp.path().join("smtp-password");
    std::fs::write(&pw, "s3cret pass\n").unwrap();
    sh(&format!("chmod 600 '{}'", pw.display()));
    let settings = |ca: bool| {
        let mut s = format!(
            "host = \"localhost\"\nport = {}\nsecurity = \"starttls\"\nusername = \"mailer\"\npassword_file = \"{}\"\n",
            smtp.port,
            pw.display()
        );
        if ca {
            s.push_str(&format!("ca_file = \"{}\"\n", pki.ca.display()));
        }
        s
    };

    // Without the CA the server's certificate is not trusted: nothing is sent.
    let cfg = config(tmp.path(), "/srv", &settings(false));
    let (code, _, err) = rb(&cfg, &["test-email"]);
    assert_eq!(code, 1, "{err}");
    // Regression: the error said "invalid peer certificate: UnknownIssuer" twice.
    assert_eq!(err.matches("UnknownIssuer").count(), 1, "{err}");
    assert!(err.contains(&format!("sending mail through localhost:{}", smtp.port)), "{err}");
    assert!(err.contains("put your CA's certificate (PEM) in `ca_file`"), "{err}");
    assert!(smtp.messages().is_empty());

    let cfg = config(tmp.path(), "/srv", &settings(true));
    let (code, _, err) = rb(&cfg, &["test-email"]);
    assert_eq!(code, 0, "{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["tls"], true);
    assert_eq!(msgs[0]["auth_user"], "mailer");

    // A password file others can read is refused, clearly.
    sh(&format!("chmod 644 '{}'", pw.display()));
    let (code, _, err) = rb(&cfg, &["test-email"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("others can read it") && err.contains("chmod 600"), "{err}");
    assert_eq!(smtp.messages().len(), 1);
}

#[test]
fn a_failed_backup_sends_exactly_one_mail_that_says_what_failed() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let mail = format!("host = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n", smtp.port);

    // A missing source.
    let missing = tmp.path().join("missing");
    let cfg = config(tmp.path(), missing.to_str().unwrap(), &mail);
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1, "{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let subject = msgs[0]["subject"].as_str().unwrap();
    assert!(
        subject.starts_with(&format!(
            "[rbackup] web on {}: FAILED — the source {} cannot be read",
            hostname(),
            missing.display()
        )),
        "{subject}"
    );
    let body = msgs[0]["body"].as_str().unwrap();
    assert!(body.contains("Exit code: 1") && body.contains("No such file or directory"), "{body}");
    assert!(body.contains("The log's last lines:"), "{body}");
    // The hint carries the config the job came from: copied, it runs.
    let cfg = tmp.path().join("rbackup.toml");
    let check = format!("`rbackup -c {} -j web check`", cfg.display());
    assert!(body.contains(&format!("What to do:\n  Run {check}")), "{body}");
    assert_mime(&msgs[0]);

    // SSH refused: nothing listens where the source points.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ssh_cfg = tmp.path().join("ssh_config");
    std::fs::write(&ssh_cfg, format!("Host nowhere\n  HostName 127.0.0.1\n  Port {port}\n")).unwrap();
    let cfg = config(tmp.path(), "nowhere:/srv", &mail);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[email]", &format!("ssh_config = \"{}\"\n\n[email]", ssh_cfg.display()));
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1, "{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let subject = msgs[1]["subject"].as_str().unwrap();
    assert!(subject.contains(": FAILED — cannot reach nowhere"), "{subject}");
    // Regression: it said what failed, not what to do about it.
    let body = msgs[1]["body"].as_str().unwrap();
    assert!(body.contains("What to do:\n  The server could not be reached from this machine"), "{body}");
    assert!(
        body.contains("Check the network and ssh")
            && body.contains("then run `rbackup -c ")
            && body.contains(" -j web check`"),
        "{body}"
    );

    // A successful run sends nothing (send_on = failure is the default).
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let cfg = config(tmp.path(), src.to_str().unwrap(), &mail);
    assert_eq!(rb(&cfg, &["--backup"]).0, 0);
    assert_eq!(smtp.messages().len(), 2);
}

#[test]
fn an_interrupted_run_mail_says_how_to_continue() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let mail = format!("host = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\nsend_on = \"partial\"\n", smtp.port);
    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    // An interrupted run: its folder is there, and this run fails.
    std::fs::create_dir_all(tmp.path().join("bk/web.01-01-26_00-00-00.incomplete")).unwrap();
    let cfg = config(tmp.path(), tmp.path().join("gone").to_str().unwrap(), &mail);
    let (code, _, _) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1);
    let body = smtp.messages()[0]["body"].as_str().unwrap().to_string();
    let cont = format!("`rbackup -c {} -j web --continue`", cfg.display());
    assert!(body.contains(&format!("web.01-01-26_00-00-00.incomplete is kept; run {cont}")), "{body}");
    assert!(body.contains("there is no complete snapshot yet"), "{body}");
}

#[test]
fn an_unreachable_smtp_server_does_not_change_the_exit_code() {
    require_root();
    let tmp = scratch();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mail = format!("host = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\nsend_on = \"always\"\n");
    let cfg = config(tmp.path(), tmp.path().join("missing").to_str().unwrap(), &mail);
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("could not send the report mail"), "{err}");
    assert!(err.contains("the source"), "the run's own error must still be shown: {err}");

    let src = tmp.path().join("src");
    write(&src.join("f"), b"f");
    let cfg = config(tmp.path(), src.to_str().unwrap(), &mail);
    let (code, _, err) = rb(&cfg, &["--backup"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("could not send the report mail"), "{err}");
}

/// The ```sh blocks of docs/email.md that make a certificate (they start
/// with `HOST=`), with HOST set to `host`.
fn documented_certificate_commands(host: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/email.md")).unwrap();
    let blocks: Vec<String> = doc
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.starts_with("HOST=smtp.example.org\n"))
        .map(|b| b.replacen("HOST=smtp.example.org", &format!("HOST={host}"), 1))
        .collect();
    assert_eq!(blocks.len(), 2, "docs/email.md shows a CA + server certificate, and a self-signed one");
    blocks
}

/// The openssl commands docs/email.md gives make certificates that rustls
/// accepts: a CA and a server certificate (ca_file = the CA), and one
/// self-signed server certificate (ca_file = the certificate itself).
#[test]
fn the_certificates_docs_email_md_makes_are_accepted() {
    require_root();
    for (i, commands) in documented_certificate_commands("localhost").into_iter().enumerate() {
        let tmp = scratch();
        let d = tmp.path();
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &commands])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "block {i}: {}", String::from_utf8_lossy(&out.stderr));
        let ca = if d.join("ca.pem").exists() { d.join("ca.pem") } else { d.join("server.pem") };
        let pki = Pki { ca: ca.clone(), cert: d.join("server.pem"), key: d.join("server.key") };
        let smtp = Smtp::start(d, "starttls", Some(&pki), None);
        let settings = format!(
            "host = \"localhost\"\nport = {}\nsecurity = \"starttls\"\nca_file = \"{}\"\n",
            smtp.port,
            ca.display()
        );
        let cfg = config(d, "/srv", &settings);
        let (code, _, err) = rb(&cfg, &["test-email"]);
        assert_eq!(code, 0, "block {i}: {err}");
        let msgs = smtp.messages();
        assert_eq!(msgs.len(), 1, "block {i}");
        assert_eq!(msgs[0]["tls"], true);
    }
}

/// Regression: a certificate from a plain `openssl req -x509` (a CA
/// certificate) was refused as `CaUsedAsEndEntity` with no word on what to
/// do instead.
#[test]
fn a_plain_openssl_self_signed_certificate_is_refused_with_the_fix() {
    require_root();
    let tmp = scratch();
    let d = tmp.path();
    sh(&format!(
        "cd '{}' && openssl req -x509 -newkey rsa:2048 -nodes -keyout server.key -out server.pem -days 2 \
         -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null",
        d.display()
    ));
    let pki = Pki { ca: d.join("server.pem"), cert: d.join("server.pem"), key: d.join("server.key") };
    let smtp = Smtp::start(d, "starttls", Some(&pki), None);
    let settings = format!(
        "host = \"localhost\"\nport = {}\nsecurity = \"starttls\"\nca_file = \"{}\"\n",
        smtp.port,
        pki.ca.display()
    );
    let (code, _, err) = rb(&config(d, "/srv", &settings), &["test-email"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.matches("CaUsedAsEndEntity").count(), 1, "{err}");
    assert!(err.contains("basicConstraints=CA:FALSE") && err.contains("docs/email.md"), "{err}");
    assert!(smtp.messages().is_empty());
}

/// Regression: a server that accepts the connection and never answers was
/// reported after 30 s as "Resource temporarily unavailable (os error 11)".
#[test]
fn a_stalled_smtp_server_is_reported_as_a_timeout_naming_it() {
    require_root();
    let tmp = scratch();
    // The kernel completes the handshake for the backlog; nobody ever answers.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    let mail = format!("host = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\ntimeout_seconds = 1\n");
    let cfg = config(tmp.path(), "/srv", &mail);
    let (code, _, err) = rb(&cfg, &["test-email"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("no answer from 127.0.0.1:{port} within 1 s (timeout)")), "{err}");
    assert!(!err.contains("os error 11"), "{err}");
    // `check` says the same.
    let (code, out, _) = rb(&cfg, &["-j", "web", "check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("no answer from 127.0.0.1:{port} within 1 s (timeout)")), "{out}");
    drop(stalled);
}

#[test]
fn a_run_stopped_by_sigterm_mails_that_it_was_interrupted_and_how_to_continue() {
    use crate::common::midrun::{Held, busy_source, hold_mid_run, pid, send, wait_by_itself};
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let mail = format!("host = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n", smtp.port);
    let src = tmp.path().join("src");
    busy_source(&src);
    let cfg = config(tmp.path(), src.to_str().unwrap(), &mail);
    let bk = tmp.path().join("bk");
    let held = (0..5).find_map(|_| {
        let _ = std::fs::remove_dir_all(&bk);
        let mut cmd = rbackup(&["-c".as_ref(), cfg.as_os_str(), "--backup".as_ref()]);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        hold_mid_run(cmd, &bk, "web", "d02")
    });
    let Held { mut child, .. } = held.expect("a run held in its middle");
    send(pid(&child), rustix::process::Signal::TERM);
    assert_eq!(wait_by_itself(&mut child).code(), Some(20));
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let subject = msgs[0]["subject"].as_str().unwrap();
    assert_eq!(subject, format!("[rbackup] web on {}: INTERRUPTED — interrupted by SIGTERM", hostname()));
    let body = msgs[0]["body"].as_str().unwrap();
    assert!(body.contains("Exit code: 20"), "{body}");
    assert!(body.contains(".incomplete is kept; run `rbackup -c ") && body.contains(" -j web --continue`"), "{body}");
}

/// The backup's report goes out before its replicas run: a replica that
/// fails then sends a mail of its own, saying nothing was pruned.
#[test]
fn a_failed_replica_after_a_backup_sends_its_own_mail() {
    require_root();
    let tmp = scratch();
    let smtp = Smtp::start(tmp.path(), "plain", None, None);
    let src = tmp.path().join("src");
    write(&src.join("a"), b"a");
    let usb = tmp.path().join("usb/backups");
    let cfg = tmp.path().join("rbackup.toml");
    let text = format!(
        "[job.web]\nsource = \"{}\"\nbackups_folder = \"{}\"\nreplicas = [\"{}\"]\nreplicate_after_backup = true\n\
         keep_last = 1\nprune_after_backup = true\n\n[email]\nfrom = \"rbackup@example.org\"\n\
         to = [\"admin@example.org\"]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n",
        src.display(),
        tmp.path().join("bk").display(),
        usb.display(),
        smtp.port
    );
    std::fs::write(&cfg, text).unwrap();
    let (code, _, err) = rb(&cfg, &["-j", "web", "--backup"]);
    assert_eq!(code, 1, "{err}");
    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1, "the backup itself was OK, so only the replica's mail: {msgs:?}");
    let subject = msgs[0]["subject"].as_str().unwrap();
    assert_eq!(subject, format!("[rbackup] web on {}: REPLICA FAILED — {}", hostname(), usb.display()));
    let body = msgs[0]["body"].as_str().unwrap();
    assert!(
        body.contains("holds no replica of web")
            && body.contains("keeps every snapshot that has not reached the replica"),
        "{body}"
    );
}
