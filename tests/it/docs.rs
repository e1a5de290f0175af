//! Statements of docs/*.md checked against what rbackup does: each test
//! reads the doc's sentence and then makes it happen.

use std::ffi::OsStr;
use std::path::Path;

use crate::common::sshd::Sshd;
use crate::common::*;
use clap::CommandFactory;

fn doc(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name)).unwrap()
}

/// The doc's text with its line breaks and list indents as single spaces.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Regression: docs/backup.md said an unreachable server "leaves nothing
/// behind", but the lock and the bookkeeping folder are made before the
/// connection (on purpose). The doc now names what stays; nothing else does.
#[test]
fn an_unreachable_server_leaves_only_the_bookkeeping_the_doc_names() {
    let text = flat(&doc("backup.md"));
    assert!(!text.contains("leaves nothing behind"), "docs/backup.md");
    let claim = "the backups folder itself (created 0700 if it was missing) and `NAME.rbackup/`, holding `lock`, an \
                 empty `trash/` and `last-run.json` (which says why the run failed)";
    assert!(text.contains(claim), "docs/backup.md no longer says: {claim}");

    let tmp = scratch();
    let bk = tmp.path().join("bk");
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ssh_config = tmp.path().join("ssh_config");
    let known_hosts = tmp.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    std::fs::write(
        &ssh_config,
        format!(
            "Host nowhere\n  HostName 127.0.0.1\n  Port {port}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            known_hosts.display()
        ),
    )
    .unwrap();
    let args = [
        "--backup",
        "--source",
        "nowhere:/srv",
        "--backups-folder",
        bk.to_str().unwrap(),
        "--name",
        "srv",
        "--ssh-config",
        ssh_config.to_str().unwrap(),
    ];
    let (code, _, err) = run(&args.iter().map(OsStr::new).collect::<Vec<_>>());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");

    let names = |dir: &Path| {
        let mut n: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    };
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bk).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(names(&bk), ["srv.rbackup"]);
    assert_eq!(names(&bk.join("srv.rbackup")), ["last-run.json", "lock", "trash"]);
    assert!(names(&bk.join("srv.rbackup/trash")).is_empty());
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bk.join("srv.rbackup/last-run.json")).unwrap()).unwrap();
    assert_eq!(last["exit_code"], 1, "{last}");
}

/// Regression: with the classic `passwd -l`, sshd refuses the key and
/// `check` only said "see docs/setup.md"; its hint now names the lock and
/// the fix, as docs/troubleshooting.md does.
#[test]
fn check_names_passwd_l_when_the_server_refuses_the_key() {
    let sshd = Sshd::start();
    let tmp = scratch();
    let src = tmp.path().join("src");
    write(&src.join("f.txt"), b"f");
    sshd.grant_read(&src);
    sshd.authorize(&sshd.forced_read_only(&src));
    let user = sshd.user.name.clone();
    let source = format!("{user}@rbk-test:{}", src.display());
    let check = || {
        let mut args: Vec<String> = vec!["check".into(), "--source".into(), source.clone()];
        args.extend(["--backups-folder".into(), tmp.path().join("bk").display().to_string()]);
        args.extend(["--name".into(), "srv".into()]);
        args.extend(sshd.args());
        run(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    };
    let (code, out, err) = check();
    assert_eq!(code, 0, "{out}{err}\n{}", sshd.log());

    sh(&format!("passwd -q -l {user}"));
    let (code, out, err) = check();
    assert_eq!(code, 1, "{out}{err}");
    assert!(sshd.log().contains("account is locked"), "the premise: sshd refuses a locked account\n{}", sshd.log());
    assert!(out.contains("refused the authentication"), "{out}");
    assert!(
        out.contains("if the account is locked with passwd -l, use `usermod -p '*' ") && out.contains(&user),
        "{out}"
    );
    assert!(flat(&doc("troubleshooting.md")).contains("Use `usermod -p '*' USER` instead"));

    // The fix it names works.
    sh(&format!("usermod -p '*' {user}"));
    let (code, out, err) = check();
    assert_eq!(code, 0, "{out}{err}");
}

/// Regression: `setup-client --port` was in no doc. Every option of
/// setup-client is in docs/setup.md.
#[test]
fn every_setup_client_option_is_in_the_setup_doc() {
    let text = doc("setup.md");
    let mut cmd = rbackup::cli::Cli::command();
    cmd.build();
    let client = cmd.find_subcommand("setup-client").unwrap();
    let global = ["config", "job", "verbose", "quiet", "help", "version"];
    for arg in client.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if global.contains(&long) {
            continue;
        }
        assert!(text.contains(&format!("`--{long}")), "docs/setup.md doesn't mention setup-client --{long}");
    }
}
