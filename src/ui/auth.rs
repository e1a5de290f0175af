//! Who may talk to the console, and what every answer carries.
//!
//! - On loopback, the `Host` header must name the address the console
//!   listens on (a page of another site that rebinds its DNS name to
//!   127.0.0.1 sends its own name, and is refused); over TLS the
//!   certificate check does that.
//! - A secret token, made at start (or read from `--token-file`), is given
//!   once in the URL; it is exchanged for a random session id in an
//!   `HttpOnly`, `SameSite=Strict` cookie, and the answer redirects to the
//!   same page without the token, so it does not stay in the address bar or
//!   the history. Without a valid session: 401; a wrong token: 403.
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

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::State;
use super::paths::Params;

/// The cookie holding the session id.
const COOKIE: &str = "rbackup_session";
/// Largest form the console accepts.
const FORM_MAX: usize = 64 * 1024;
/// How long a session lasts; then the token is needed again.
const SESSION_LIFE: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
/// Most sessions kept; the oldest goes when a new one would pass it.
const SESSIONS_MAX: usize = 64;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The token, the sessions, and the hosts a request may name.
pub struct Auth {
    token: String,
    /// Session id → its CSRF token, in order of creation.
    sessions: Mutex<Vec<Session>>,
    /// The `Host` headers accepted; `None`: any (over TLS, where a page of
    /// another name can't reach the console without a certificate error).
    hosts: Option<Vec<String>>,
    /// `https` or `http`: what an `Origin` must start with.
    scheme: &'static str,
}

/// A session id, its CSRF token, and when it began.
struct Session {
    id: String,
    csrf: String,
    since: std::time::Instant,
}

/// The session's CSRF token, for the forms of a page.
#[derive(Clone, Debug)]
pub struct Csrf(pub String);

impl Auth {
    /// For a console listening on `addr`, over TLS or not.
    pub fn new(token: String, addr: SocketAddr, tls: bool) -> Auth {
        let port = addr.port();
        let mut hosts = vec![addr.to_string()];
        if addr.ip().is_loopback() {
            hosts.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
        }
        let hosts = (!tls || addr.ip().is_loopback()).then_some(hosts);
        Auth { token, sessions: Mutex::new(Vec::new()), hosts, scheme: if tls { "https" } else { "http" } }
    }

    /// A new session's id.
    fn new_session(&self) -> Result<String> {
        let s = Session { id: random_hex(32)?, csrf: random_hex(32)?, since: std::time::Instant::now() };
        let id = s.id.clone();
        let mut sessions = self.sessions.lock().expect("no panic holding it");
        sessions.retain(|s| s.since.elapsed() < SESSION_LIFE);
        if sessions.len() >= SESSIONS_MAX {
            sessions.remove(0);
        }
        sessions.push(s);
        Ok(id)
    }

    /// The CSRF token of a live session.
    fn csrf_of(&self, session: &str) -> Option<String> {
        let sessions = self.sessions.lock().expect("no panic holding it");
        sessions
            .iter()
            .find(|s| ct_eq(s.id.as_bytes(), session.as_bytes()) && s.since.elapsed() < SESSION_LIFE)
            .map(|s| s.csrf.clone())
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
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(crate::usage!(
            "the token in {} must be one line of at least 16 letters, digits, - or _ (e.g. `openssl rand -hex 32`)",
            path.display()
        ));
    }
    Ok(token)
}

/// Compares without an early exit, so the time taken says nothing of how
/// much of a guess was right.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie_session(req: &Request) -> Option<String> {
    let cookies = req.headers().get_all(header::COOKIE);
    cookies.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_string())
    })
}

/// A short plain page for a refusal.
fn refuse(status: StatusCode, why: &str) -> Response {
    let page = maud::html! {
        (maud::DOCTYPE)
        html { head { title { "rbackup" } } body { h1 { (status.as_str()) } p { (why) } } }
    };
    (status, page).into_response()
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
    if auth.hosts.as_ref().is_some_and(|hosts| !hosts.iter().any(|h| h == host)) {
        return refuse(StatusCode::FORBIDDEN, "This console answers only to the address it listens on.");
    }
    let host = host.to_string();
    let params = Params::parse(req.uri().query().unwrap_or_default());
    if let Some(given) = params.get("token") {
        if req.method() != Method::GET || !ct_eq(given, auth.token.as_bytes()) {
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
        let target = if rest.is_empty() {
            req.uri().path().to_string()
        } else {
            format!("{}?{}", req.uri().path(), rest.join("&"))
        };
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let secure = if auth.scheme == "https" { "; Secure" } else { "" };
        let life = SESSION_LIFE.as_secs();
        let cookie = format!("{COOKIE}={id}; Path=/; Max-Age={life}; HttpOnly; SameSite=Strict{secure}");
        resp.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("ASCII"));
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_str(&target).unwrap_or(HeaderValue::from_static("/")));
        return resp;
    }
    let Some(csrf) = cookie_session(&req).and_then(|s| auth.csrf_of(&s)) else {
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
        assert_eq!(read_token(&f).unwrap(), "0123456789abcdef0123");
        std::fs::write(&f, "short\n").unwrap();
        assert!(read_token(&f).is_err());
        std::fs::write(&f, "0123456789abcdef0123&x=1\n").unwrap();
        assert!(read_token(&f).is_err());
    }

    #[test]
    fn only_the_listening_address_is_a_host() {
        let a = Auth::new("t".into(), "127.0.0.1:8470".parse().unwrap(), false);
        let hosts = a.hosts.unwrap();
        assert!(hosts.contains(&"localhost:8470".to_string()));
        assert!(!hosts.iter().any(|h| h.starts_with("evil")));
        assert!(Auth::new("t".into(), "127.0.0.1:8470".parse().unwrap(), true).hosts.is_some());
        assert!(Auth::new("t".into(), "0.0.0.0:8470".parse().unwrap(), true).hosts.is_none());
    }
}
