//! Who may talk to the console, and what every answer carries.
//!
//! - On loopback (plain HTTP), each start of the console picks a secret
//!   host name, `rbackup-<random>.localhost` (browsers and curl resolve
//!   every `*.localhost` name to loopback), and every request must name it
//!   with the console's port in its `Host` header. A cookie ignores ports:
//!   one set for `127.0.0.1` would also go to any other server a local user
//!   runs on `127.0.0.1`; one set, host-only, for a name nobody else knows
//!   goes to the console alone. (A page of another site that rebinds its DNS
//!   name to 127.0.0.1 sends its own name too, and is refused.) The plain
//!   addresses (`127.0.0.1:PORT`, `localhost:PORT`) only take the token and
//!   send the browser on to the secret name. Over TLS the certificate check
//!   does that work.
//! - A secret token, made at start (or read from `--token-file`), is given
//!   once in the URL; it is exchanged for a random session id in an
//!   `HttpOnly`, `SameSite=Strict` cookie named after the port (two consoles
//!   keep their own), and the answer redirects to the same page (a path of
//!   the console, never another host) without the token, so it does not stay
//!   in the address bar or the history. A session ends [`SESSION_LIFE`]
//!   after it began. Without a valid session: 401; a wrong token: 403.
//! - Every POST must come from the console's own pages: an `Origin` of
//!   another site is refused, and the form must carry the session's CSRF
//!   token (the field `csrf`, or the header `X-CSRF-Token`).
//! - Every answer carries a strict Content-Security-Policy (scripts and
//!   styles from the console only, no inline script, no framing), `nosniff`
//!   and `Referrer-Policy: same-origin` (`no-referrer` would make a browser
//!   send `Origin: null` with the forms), and is not cached.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::State;
use super::paths::Params;

/// The cookie holding the session id, followed by `_PORT`.
const COOKIE: &str = "rbackup_session";
/// Largest form the console accepts.
const FORM_MAX: usize = 64 * 1024;
/// How long a session lasts, used or not; then the token is needed again.
const SESSION_LIFE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; the oldest goes when a new one would pass it.
const SESSIONS_MAX: usize = 64;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The token, the sessions, and the hosts a request may name.
pub struct Auth {
    token: String,
    /// The sessions, in order of creation.
    sessions: Mutex<Vec<Session>>,
    /// The `Host` headers of the console's pages; `None`: any (over TLS,
    /// where a page of another name can't reach the console without a
    /// certificate error).
    hosts: Option<Vec<String>>,
    /// The plain loopback addresses (`127.0.0.1:PORT`…) when the console
    /// has a secret name: they only take the token and send the browser on.
    entry: Vec<String>,
    /// `https` or `http`: what an `Origin` must start with.
    scheme: &'static str,
    /// `rbackup_session_PORT`.
    cookie: String,
}

/// A session id, its CSRF token, and when it began.
struct Session {
    id: String,
    csrf: String,
    since: Instant,
}

/// The session's CSRF token, for the forms of a page.
#[derive(Clone, Debug)]
pub struct Csrf(pub String);

impl Auth {
    /// For a console listening on `addr`, over TLS or not.
    pub fn new(token: String, addr: SocketAddr, tls: bool) -> Result<Auth> {
        let port = addr.port();
        let mut plain = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            plain.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
        }
        let (hosts, entry) = if tls {
            // The certificate names the host; on loopback, the addresses.
            (addr.ip().is_loopback().then_some(plain), Vec::new())
        } else {
            // A browser leaves out port 80.
            let name = format!("rbackup-{}.localhost", random_hex(10)?);
            let mut hosts = vec![format!("{name}:{port}")];
            if port == 80 {
                hosts.push(name);
            }
            (Some(hosts), plain)
        };
        Ok(Auth {
            token,
            sessions: Mutex::new(Vec::new()),
            hosts,
            entry,
            scheme: if tls { "https" } else { "http" },
            cookie: format!("{COOKIE}_{port}"),
        })
    }

    /// `scheme://host:port` of the console's pages: its secret name on
    /// loopback, else the address it listens on.
    pub fn origin(&self, addr: SocketAddr) -> String {
        let host = self.hosts.as_ref().filter(|_| !self.entry.is_empty()).map_or(addr.to_string(), |h| h[0].clone());
        format!("{}://{host}", self.scheme)
    }

    /// A new session's id.
    fn new_session(&self) -> Result<String> {
        let s = Session { id: random_hex(32)?, csrf: random_hex(32)?, since: Instant::now() };
        let id = s.id.clone();
        let mut sessions = self.sessions.lock().expect("no panic holding it");
        sessions.retain(|s| s.since.elapsed() < SESSION_LIFE);
        if sessions.len() >= SESSIONS_MAX {
            sessions.remove(0);
        }
        sessions.push(s);
        Ok(id)
    }

    /// The CSRF token of session `id` if it is still live at `now`; an
    /// ended one is forgotten.
    fn csrf_of(&self, id: &str, now: Instant) -> Option<String> {
        let mut sessions = self.sessions.lock().expect("no panic holding it");
        sessions.retain(|s| now.saturating_duration_since(s.since) < SESSION_LIFE);
        sessions.iter().find(|s| ct_eq(s.id.as_bytes(), id.as_bytes())).map(|s| s.csrf.clone())
    }
}

/// `n` random bytes from the kernel, as hex.
pub fn random_hex(n: usize) -> Result<String> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        filled += rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty())
            .context("no random bytes from the kernel")?;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token in `path`: its first line, at least 16 characters of
/// `[A-Za-z0-9_-]` (it goes into URLs as it is).
pub fn read_token(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).map_err(|e| crate::usage!("cannot read the token file {}: {e}", path.display()))?;
    private_enough(path, &file.metadata()?)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)
        .map_err(|e| crate::usage!("cannot read the token file {}: {e}", path.display()))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let token = lines.next().unwrap_or_default().to_string();
    let one_line = lines.next().is_none();
    if !one_line || token.len() < 16 || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(crate::usage!(
            "the token in {} must be one line of at least 16 letters, digits, - or _ (e.g. `openssl rand -hex 32`)",
            path.display()
        ));
    }
    Ok(token)
}

/// A token file must be root's (or the caller's) and readable by nobody
/// else — except beneath `$CREDENTIALS_DIRECTORY`, which systemd keeps
/// private to the service.
fn private_enough(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Compared once resolved: `$CREDENTIALS_DIRECTORY/../file` is not in it.
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty());
    let inside = |d: &std::ffi::OsStr| match (std::fs::canonicalize(path), std::fs::canonicalize(d)) {
        (Ok(p), Ok(d)) => p.starts_with(&d),
        _ => false,
    };
    if credentials.is_some_and(|d| inside(&d)) {
        return Ok(());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(crate::usage!(
            "refusing the token file {}: it belongs to uid {}, who could read or change it; \
             it must be root's (chown root {0})",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(crate::usage!(
            "refusing the token file {}: others can read it (mode {:o}), and the token opens the console as root: \
             chmod 600 {0}",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Compares without an early exit, so the time taken says nothing of how
/// much of a guess was right.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie_session(req: &Request, name: &str) -> Option<String> {
    let cookies = req.headers().get_all(header::COOKIE);
    cookies.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// Where the token's answer sends the browser: `path` (and `query`) when
/// it is a path of this console; `//host/x` (another host, for a browser)
/// or anything odd goes to `/`.
fn local_target(path: &str, query: &str) -> String {
    let odd = !path.starts_with('/') || path.starts_with("//") || path.contains('\\') || path.bytes().any(|b| b < 0x21);
    let path = if odd { "/" } else { path };
    if query.is_empty() { path.to_string() } else { format!("{path}?{query}") }
}

/// A short plain page for a refusal.
fn refuse(status: StatusCode, why: &str) -> Response {
    let page = maud::html! {
        (maud::DOCTYPE)
        html { head { title { "rbackup" } } body { h1 { (status.as_str()) } p { (why) } } }
    };
    (status, page).into_response()
}

/// A 303 to `location`, setting `cookie` if given.
fn redirect(location: &str, cookie: Option<&str>) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Some(c) = cookie {
        resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(c).expect("ASCII"));
    }
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/")));
    resp
}

/// The guard in front of every route (see the module's doc).
pub async fn guard(AxState(state): AxState<Arc<State>>, req: Request, next: Next) -> Response {
    let mut resp = check(&state, req, next).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn check(state: &State, req: Request, next: Next) -> Response {
    let auth = &state.auth;
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let params = Params::parse(req.uri().query().unwrap_or_default());
    let token_ok = |given: &[u8]| req.method() == Method::GET && ct_eq(given, auth.token.as_bytes());
    if auth.entry.iter().any(|h| h == host) {
        // A plain address: with the token, on to the secret name (no
        // cookie is ever set for a name other servers share).
        return match params.get("token") {
            Some(given) if token_ok(given) => {
                let target = local_target(req.uri().path(), req.uri().query().unwrap_or_default());
                let origin = format!("{}://{}", auth.scheme, auth.hosts.as_ref().map_or(host, |h| &h[0]));
                redirect(&format!("{origin}{target}"), None)
            }
            Some(_) => refuse(StatusCode::FORBIDDEN, "Wrong token: open the URL that `rbackup ui` printed."),
            None => refuse(StatusCode::FORBIDDEN, "Open the address that `rbackup ui` printed, with its token."),
        };
    }
    if auth.hosts.as_ref().is_some_and(|hosts| !hosts.iter().any(|h| h == host)) {
        return refuse(StatusCode::FORBIDDEN, "This console answers only to the address it printed.");
    }
    let host = host.to_string();
    if let Some(given) = params.get("token") {
        if !token_ok(given) {
            return refuse(StatusCode::FORBIDDEN, "Wrong token: open the URL that `rbackup ui` printed.");
        }
        let Ok(id) = auth.new_session() else {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "No random bytes for a session.");
        };
        // Back to the same page, without the token in the address.
        let rest: Vec<String> = params
            .0
            .iter()
            .filter(|(k, _)| k != "token")
            .map(|(k, v)| format!("{k}={}", super::paths::encode(v)))
            .collect();
        let target = local_target(req.uri().path(), &rest.join("&"));
        let secure = if auth.scheme == "https" { "; Secure" } else { "" };
        let life = SESSION_LIFE.as_secs();
        // No Domain: the cookie is the host's alone.
        let cookie = format!("{}={id}; Path=/; Max-Age={life}; HttpOnly; SameSite=Strict{secure}", auth.cookie);
        return redirect(&target, Some(&cookie));
    }
    let Some(csrf) = cookie_session(&req, &auth.cookie).and_then(|s| auth.csrf_of(&s, Instant::now())) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "No session: open the URL with the token that `rbackup ui` printed (or read from its token file).",
        );
    };
    let mut req = req;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let ok = origin.to_str().is_ok_and(|o| o == format!("{}://{host}", auth.scheme));
            if !ok {
                return refuse(StatusCode::FORBIDDEN, "A form of another site was refused.");
            }
        }
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, FORM_MAX).await else {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "That form is too large.");
        };
        let header_token = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::as_bytes);
        let form = Params::parse(std::str::from_utf8(&bytes).unwrap_or_default());
        let given = form.get("csrf").or(header_token);
        if !given.is_some_and(|g| ct_eq(g, csrf.as_bytes())) {
            return refuse(StatusCode::FORBIDDEN, "This form lacks its CSRF token: reload the page and try again.");
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(Csrf(csrf));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let (a, b) = (random_hex(32).unwrap(), random_hex(32).unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(ct_eq(a.as_bytes(), a.as_bytes()));
        assert!(!ct_eq(a.as_bytes(), b.as_bytes()));
        assert!(!ct_eq(a.as_bytes(), &a.as_bytes()[..63]));
    }

    #[test]
    fn a_token_file_needs_a_long_plain_token() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("t");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&f).unwrap(), "0123456789abcdef0123");
        std::fs::write(&f, "short\n").unwrap();
        assert!(read_token(&f).is_err());
        std::fs::write(&f, "0123456789abcdef0123&x=1\n").unwrap();
        assert!(read_token(&f).is_err());
        std::fs::write(&f, "0123456789abcdef0123\nsomething else\n").unwrap();
        assert!(read_token(&f).unwrap_err().to_string().contains("one line"), "two lines: which is the token?");
        std::fs::write(&f, "\n0123456789abcdef0123\n\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "0123456789abcdef0123", "blank lines around it are fine");
        let e = read_token(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(crate::error::code_of(&e), crate::error::Code::Usage, "a file given on the command line: {e}");
        // Readable by others: refused, whatever it holds.
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let e = read_token(&f).unwrap_err().to_string();
        assert!(e.contains("others can read it") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn only_the_secret_name_is_a_host_on_loopback() {
        let addr = "127.0.0.1:8470".parse().unwrap();
        let a = Auth::new("t".into(), addr, false).unwrap();
        let hosts = a.hosts.clone().unwrap();
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].starts_with("rbackup-") && hosts[0].ends_with(".localhost:8470"), "{hosts:?}");
        assert_eq!(a.origin(addr), format!("http://{}", hosts[0]));
        assert!(a.entry.contains(&"127.0.0.1:8470".to_string()) && a.entry.contains(&"localhost:8470".to_string()));
        assert_eq!(a.cookie, "rbackup_session_8470");
        let b = Auth::new("t".into(), addr, false).unwrap();
        assert_ne!(b.hosts.unwrap(), hosts, "a new name at each start");
        assert!(Auth::new("t".into(), addr, true).unwrap().hosts.is_some());
        assert!(Auth::new("t".into(), "0.0.0.0:8470".parse().unwrap(), true).unwrap().hosts.is_none());
    }

    #[test]
    fn a_session_ends_twelve_hours_after_it_began() {
        let a = Auth::new("t".into(), "127.0.0.1:8470".parse().unwrap(), false).unwrap();
        let id = a.new_session().unwrap();
        let now = Instant::now();
        assert!(a.csrf_of(&id, now + Duration::from_secs(11 * 3600)).is_some(), "after 11 hours");
        assert!(a.csrf_of(&id, now + Duration::from_secs(13 * 3600)).is_none(), "after 13 hours: ended");
        assert!(a.csrf_of(&id, now).is_none(), "and gone");
    }

    #[test]
    fn the_token_redirect_stays_on_the_console() {
        assert_eq!(local_target("//evil.example/x", ""), "/");
        assert_eq!(local_target("/\\evil.example/x", "a=1"), "/?a=1");
        assert_eq!(local_target("/job", "job=srv"), "/job?job=srv");
        assert_eq!(local_target("/", ""), "/");
    }
}
