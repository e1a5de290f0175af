//! A headless Chromium driven over WebDriver: Debian's `chromium` and
//! `chromedriver` (scripts/install-deps.sh installs both), spoken to in
//! the handful of W3C WebDriver commands the console's walk needs, as JSON
//! over the same raw HTTP client as the other console tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use super::web::request;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `chromedriver` on a free port, killed on drop.
pub struct Driver {
    child: Child,
    addr: String,
}

impl Driver {
    /// Starts chromedriver and waits until it is ready. Fails loudly when
    /// it is missing: the browser walk never skips.
    pub fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run scripts/install-deps.sh (chromium chromium-driver)");
        let d = Driver { child, addr: format!("127.0.0.1:{port}") };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(&d.addr).is_ok() && d.call("GET", "/status", None)["ready"] == true {
                return d;
            }
            assert!(Instant::now() < until, "chromedriver did not get ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers = [("Content-Type".to_string(), "application/json".to_string())];
        let r = request(&self.addr, method, path, &self.addr, &headers, body.as_bytes());
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("{method} {path}: {}", r.text()));
        v["value"].clone()
    }

    /// A browser whose viewport is `width` × `height` CSS pixels (a phone's
    /// through Chrome's device emulation), with its own profile in `profile`.
    pub fn browser(&self, width: u32, height: u32, profile: &Path) -> Browser<'_> {
        let mut options = json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={width},{height}"), format!("--user-data-dir={}", profile.display())],
        });
        if width < 600 {
            options["mobileEmulation"] =
                json!({"deviceMetrics": {"width": width, "height": height, "pixelRatio": 1.0}});
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}});
        let v = self.call("POST", "/session", Some(caps));
        let id = v["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {v}")).to_string();
        Browser { driver: self, id }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session, closed on drop.
pub struct Browser<'a> {
    driver: &'a Driver,
    id: String,
}

impl Browser<'_> {
    fn cmd(&self, method: &str, rest: &str, body: Option<Value>) -> Value {
        self.driver.call(method, &format!("/session/{}{rest}", self.id), body)
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    /// The element `css` selects, waiting up to 30 s for it.
    pub fn find(&self, css: &str) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
            if let Some(id) = v[ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(Instant::now() < until, "no element {css} on {}: {v}\n{}", self.url(), self.text("body"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// How many elements `css` selects now.
    pub fn count(&self, css: &str) -> usize {
        self.cmd("POST", "/elements", Some(json!({"using": "css selector", "value": css})))
            .as_array()
            .map_or(0, Vec::len)
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Replaces the text of the input `css`.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.cmd("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    /// The rendered text of the element `css`.
    pub fn text(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        let Some(id) = v[ELEMENT].as_str() else { return String::new() };
        self.cmd("GET", &format!("/element/{id}/text"), None).as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` in the page; its return value.
    pub fn eval(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Saves a PNG of the viewport as `dir/name.png`.
    pub fn screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().expect("a screenshot")).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        self.driver.call("DELETE", &format!("/session/{}", self.id), None);
    }
}
