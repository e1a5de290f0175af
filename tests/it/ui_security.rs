//! The console against a local attacker (the security review of `rbackup
//! ui`): each test pins one finding — a cookie another server on
//! 127.0.0.1 could capture, a restore target planted by another user, a run
//! without its preview, work a client can make quadratic, a device opened
//! by a download, a token file others can read, a page number that
//! overflows.

use crate::common::web::{Console, request, store_with_hostile_names};
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
