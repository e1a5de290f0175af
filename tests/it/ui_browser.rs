//! The web console in a real browser: headless Chromium, driven over
//! WebDriver, walks from the printed URL to a restored file — the job, a
//! snapshot, a folder, the file, its history, a restore previewed and
//! confirmed — and the restored file equals the snapshot's, byte for byte.
//! Every page is saved as a screenshot (desktop and phone width) in
//! `target/ui-screenshots/`, and at a phone's width no page scrolls
//! sideways.

use std::path::PathBuf;

use crate::common::web::{Console, store_with_hostile_names};
use crate::common::webdriver::{Browser, Driver};
use crate::common::*;

/// Where the screenshots go: `ui-screenshots` in the target folder.
fn screenshots() -> PathBuf {
    bin().parent().and_then(|d| d.parent()).expect("target/debug/rbackup").join("ui-screenshots")
}

/// The page's content is wider than its viewport.
fn overflows(b: &Browser) -> Option<String> {
    let v = b.eval("return [document.documentElement.scrollWidth, window.innerWidth];");
    let (scroll, inner) = (v[0].as_i64().unwrap(), v[1].as_i64().unwrap());
    (scroll > inner).then(|| format!("{} is {scroll}px wide in a {inner}px viewport", b.url()))
}

#[test]
fn ui_browser_walk_from_the_url_to_a_restored_file() {
    require_root();
    let tmp = scratch();
    let (_, bk, config) = store_with_hostile_names(tmp.path());
    let ui = Console::start(&config, &["--allow-actions"]);
    let url = ui.url();
    let driver = Driver::start();
    let shots = screenshots();
    let to = tmp.path().join("restored");
    let name = |p: &std::path::Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let (snap, newer) = (name(&complete(&bk, "srv")[0]), name(&complete(&bk, "srv")[1]));
    let mut pages: Vec<(&str, String)> = Vec::new();
    {
        let b = driver.browser(1280, 900, &tmp.path().join("profile-desktop"));
        b.goto(&url);
        b.find("section.card.job");
        assert!(!b.url().contains("token="), "the token is gone from the address: {}", b.url());
        assert!(b.text("section.card.job h2").contains("srv"));
        b.screenshot(&shots, "home");
        pages.push(("home", b.url()));

        b.click("section.card.job h2 a");
        // The figures come once measured: the page reloads itself until then.
        b.find("figure.chart");
        assert_eq!(b.count("table.snaps tbody tr"), 2, "both snapshots on the timeline");
        assert_eq!(b.count("figure.chart svg polyline"), 2, "the space chart");
        b.screenshot(&shots, "job");
        pages.push(("job", b.url()));

        // The older snapshot (the timeline lists the newest first).
        b.click(&format!("table.snaps a[href$=\"snap={snap}\"]"));
        b.find("table.listing");
        b.screenshot(&shots, "browse");
        pages.push(("browse", b.url()));

        b.click("table.listing a[href$=\"p=docs\"]");
        b.find("a[href$=\"p=docs/a.txt\"]");
        assert!(b.text("table.listing").contains("<script>alert(1)"), "a hostile name is shown as text");
        assert!(b.eval("return window.alerted === undefined && document.querySelectorAll('table.listing script, table.listing img').length === 0;") == true);
        b.screenshot(&shots, "browse-folder");
        pages.push(("browse-folder", b.url()));

        b.click("a[href$=\"p=docs/a.txt\"]");
        b.find("table.history");
        assert_eq!(b.count("table.history tbody tr"), 2, "two versions");
        let history = b.text("table.history");
        assert!(history.contains("new") && history.contains("changed"), "{history}");
        b.screenshot(&shots, "file");
        pages.push(("file", b.url()));

        b.click("a.button[href^=\"/restore\"]");
        b.type_into("#to", &to.display().to_string());
        b.screenshot(&shots, "restore");
        pages.push(("restore", b.url()));
        b.click("#preview");
        // The page follows the dry run live, then offers the confirmation.
        b.find("#confirm");
        assert!(b.text("#output").contains("docs/a.txt"), "the preview lists the file");
        assert!(!to.join("docs/a.txt").exists(), "the preview wrote nothing");
        b.screenshot(&shots, "restore-preview");
        pages.push(("restore-preview", b.url()));
        b.click("#confirm");
        b.find("#status.ok");
        b.screenshot(&shots, "restore-done");
        pages.push(("restore-done", b.url()));

        b.goto(&format!("http://{}/log", ui.host));
        b.find("table.log");
        b.screenshot(&shots, "operations");
        pages.push(("operations", b.url()));

        // The newer snapshot, only what changed since the older one.
        b.goto(&format!("http://{}/browse?job=srv&snap={newer}&p=docs", ui.host));
        b.click("a.toggle");
        b.find("table.listing tr.changed");
        assert_eq!(b.count("table.listing tbody tr"), 1, "only a.txt changed");
        assert!(b.text("table.listing tbody").contains("a.txt"));
        b.screenshot(&shots, "browse-changed");
        pages.push(("browse-changed", b.url()));
    }
    let restored = std::fs::read(to.join("docs/a.txt")).expect("the restored file");
    assert_eq!(restored, std::fs::read(bk.join(&snap).join("docs/a.txt")).unwrap());
    assert_eq!(restored, b"first version\n");

    // The same pages at a phone's width: nothing wider than the screen.
    let b = driver.browser(390, 844, &tmp.path().join("profile-phone"));
    b.goto(&url);
    b.find("section.card.job");
    let mut wide = Vec::new();
    for (name, page) in &pages {
        b.goto(page);
        b.find("main");
        b.screenshot(&shots, &format!("phone-{name}"));
        wide.extend(overflows(&b));
    }
    assert_eq!(b.eval("return window.innerWidth;"), 390, "the phone's viewport");
    assert!(wide.is_empty(), "pages wider than a phone: {wide:?}");
}
