//! The web console under test: `rbackup ui` started as a child (its URL
//! read from its stdout), a raw HTTP/1.1 client on a `TcpStream` — raw so a
//! test sends exactly the bytes it means (`..%2f`, `%00`, a foreign `Host`)
//! — and a snapshot store with hostile names to point it at.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// A running `rbackup ui`, killed on drop.
pub struct Console {
    child: Child,
    /// `127.0.0.1:PORT`: where the client connects.
    pub addr: String,
    /// `rbackup-<random>.localhost:PORT`: the console's secret name, which
    /// every request names in its `Host` (the client connects to `addr`).
    pub host: String,
    pub token: String,
}

impl Console {
    /// Starts `rbackup -c CONFIG ui --listen 127.0.0.1:0 EXTRA...`.
    pub fn start(config: &Path, extra: &[&str]) -> Console {
        let mut args: Vec<&OsStr> =
            vec!["-c".as_ref(), config.as_os_str(), "ui".as_ref(), "--listen".as_ref(), "127.0.0.1:0".as_ref()];
        args.extend(extra.iter().map(OsStr::new));
        let mut child =
            rbackup(&args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start rbackup ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().to_string();
        let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("rbackup ui printed no URL but {url:?}"));
        let (host, query) = rest.split_once("/?token=").expect("URL with the token");
        let port = host.rsplit_once(':').expect("HOST:PORT").1;
        Console { child, addr: format!("127.0.0.1:{port}"), host: host.to_string(), token: query.to_string() }
    }

    /// The address `rbackup ui` printed.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.host, self.token)
    }

    /// A request with the right `Host`.
    pub fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        let mut headers = vec![];
        if let Some(c) = cookie {
            headers.push(("Cookie".to_string(), c.to_string()));
        }
        request(&self.addr, "GET", path, &self.host, &headers, b"")
    }

    /// Logs in with the token: the session cookie (`rbackup_session_PORT=...`).
    pub fn login(&self) -> String {
        let r = self.get(&format!("/?token={}", self.token), None);
        assert_eq!(r.status, 303, "the token is exchanged for a session");
        r.header("set-cookie").expect("a session cookie").split(';').next().unwrap().to_string()
    }

    /// The CSRF token of the session (from a page's form).
    pub fn csrf(&self, cookie: &str) -> String {
        let page = self.get("/", Some(cookie)).text();
        let at = page.find("name=\"csrf\" value=\"").expect("a form with the CSRF token (start with --allow-actions)");
        page[at + 19..].split('"').next().unwrap().to_string()
    }

    /// A form POST from the console's own page.
    pub fn post(&self, path: &str, cookie: &str, body: &str) -> Resp {
        let headers = vec![
            ("Cookie".to_string(), cookie.to_string()),
            ("Origin".to_string(), format!("http://{}", self.host)),
            ("Content-Type".to_string(), "application/x-www-form-urlencoded".to_string()),
        ];
        request(&self.addr, "POST", path, &self.host, &headers, body.as_bytes())
    }

    /// Confirms the finished preview whose page is `preview` (its
    /// `/confirm` form: the operation and its one-use token).
    pub fn confirm(&self, preview: &str, cookie: &str) -> Resp {
        let field = |name: &str| {
            let at =
                preview.find(&format!("name=\"{name}\" value=\"")).unwrap_or_else(|| panic!("no {name}: {preview}"));
            preview[at + name.len() + 15..].split('"').next().unwrap().to_string()
        };
        let body = format!("csrf={}&id={}&token={}", field("csrf"), field("id"), field("token"));
        self.post("/confirm", cookie, &body)
    }

    /// The page of `job` once its sizes and changes are measured.
    pub fn job_page(&self, job: &str, cookie: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let page = self.get(&format!("/job?job={job}"), Some(cookie)).text();
            if !page.contains("id=\"measuring\"") {
                return page;
            }
            assert!(Instant::now() < until, "the job page stays unmeasured:\n{page}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for operation page `path` (`/op?id=N`) to finish; its text.
    pub fn wait_op(&self, path: &str, cookie: &str) -> String {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let page = self.get(path, Some(cookie)).text();
            if page.contains("Finished: exit code") {
                return page;
            }
            assert!(Instant::now() < until, "the operation did not finish:\n{page}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A console started with `--allow-actions` and logged in: the session's
/// cookie and CSRF token beside it, for the tests that act.
pub struct Acting {
    pub ui: Console,
    pub cookie: String,
    pub csrf: String,
}

impl Acting {
    pub fn start(config: &Path) -> Acting {
        let ui = Console::start(config, &["--allow-actions"]);
        let cookie = ui.login();
        let csrf = ui.csrf(&cookie);
        Acting { ui, cookie, csrf }
    }

    /// Posts `form` (the CSRF token added) to `path`, which starts an
    /// operation: the operation's page once it has finished.
    pub fn start_op(&self, path: &str, form: &str) -> String {
        let r = self.ui.post(path, &self.cookie, &format!("csrf={}&{form}", self.csrf));
        assert_eq!(r.status, 303, "{}", r.text());
        self.ui.wait_op(r.header("location").unwrap(), &self.cookie)
    }

    /// Confirms the preview whose page is `preview`: the confirmed
    /// operation's page once it has finished.
    pub fn confirm(&self, preview: &str) -> String {
        let r = self.ui.confirm(preview, &self.cookie);
        assert_eq!(r.status, 303, "{}", r.text());
        self.ui.wait_op(r.header("location").unwrap(), &self.cookie)
    }
}

/// Adds `text` at the end of the config file.
pub fn add_to_config(config: &Path, text: &str) {
    let mut all = std::fs::read_to_string(config).unwrap();
    all.push_str(text);
    std::fs::write(config, all).unwrap();
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request (`Connection: close`), sent as given.
pub fn request(addr: &str, method: &str, path: &str, host: &str, headers: &[(String, String)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect to the console");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    // Read to the end of the answer by its length (a peer may keep the
    // connection open), else to the end of the connection.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let body = &raw[end + 4..];
            if len.is_some_and(|n| body.len() >= n) || (head.contains("chunked") && body.ends_with(b"0\r\n\r\n")) {
                break;
            }
        }
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> Resp {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Resp { status, headers, body }
}

/// The source tree of the console tests, and its store after two backups:
/// `docs/a.txt` changes between them; hostile names; symlinks out of the
/// tree to a file and to a directory. Returns (source, backups, config).
pub fn store_with_hostile_names(tmp: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (src, bk) = (tmp.join("src"), tmp.join("bk"));
    write(&src.join("docs/a.txt"), b"first version\n");
    write(&src.join("--help"), b"a file named like an option");
    write(&src.join("docs/<script>alert(1)"), b"x");
    write(&src.join("docs/<img src=x onerror=alert(2)>"), b"y");
    write(&src.join("docs/new\nline"), b"z");
    write(&src.join(OsStr::from_bytes(b"docs/bad\xffname")), b"not utf-8");
    std::os::unix::fs::symlink("/etc/passwd", src.join("out")).unwrap();
    std::os::unix::fs::symlink("/etc", src.join("outdir")).unwrap();
    let config = tmp.join("rbackup.toml");
    std::fs::write(
        &config,
        format!("[job.srv]\nsource = \"{}\"\nbackups_folder = \"{}\"\n", src.display(), bk.display()),
    )
    .unwrap();
    for step in 0..2 {
        if step == 1 {
            write(&src.join("docs/a.txt"), b"second version, longer\n");
        }
        let (code, _, err) = run(&["-c".as_ref(), config.as_os_str(), "backup".as_ref()]);
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(complete(&bk, "srv").len(), 2);
    (src, bk, config)
}
