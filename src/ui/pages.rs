//! The frame of every page, and the home and job pages.
//!
//! Everything shown goes through maud's escaping; names from a snapshot go
//! through [`super::paths::shown`] first (control characters and invalid
//! UTF-8 made visible). No page has inline script or style attributes: the
//! Content-Security-Policy would refuse them.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use maud::{DOCTYPE, Markup, html};

use super::auth::Csrf;
use super::data::{self, JobCard};
use super::paths::{Params, encode};
use super::{State, chart};
use crate::cmd::status::{Held, Replica};
use crate::report::human_bytes;

/// A page: title, the trail of links above it, its body.
pub fn layout(title: &str, trail: &[(String, String)], body: &Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · rbackup" }
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "rbackup" }
                    nav.trail {
                        @for (href, text) in trail {
                            span.sep { "›" }
                            a href=(href) { (text) }
                        }
                    }
                    a.oplog href="/log" { "Operations" }
                }
                main { (body) }
            }
        }
    };
    page.into_response()
}

/// An error as a page with its status.
pub fn error_page(status: StatusCode, what: &str) -> Response {
    let mut r = layout("Error", &[], &html! { h1 { "Error" } p.error { (what) } });
    *r.status_mut() = status;
    r
}

/// A job, snapshot or path that a URL names and the store doesn't have.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// An error of reading the store: 404 for what isn't there, else 500.
pub fn failed(e: &anyhow::Error) -> Response {
    let missing = e.chain().any(|c| {
        c.is::<NotFound>()
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    error_page(if missing { StatusCode::NOT_FOUND } else { StatusCode::INTERNAL_SERVER_ERROR }, &format!("{e:#}"))
}

pub async fn not_found() -> Response {
    error_page(StatusCode::NOT_FOUND, "There is no such page.")
}

/// Runs blocking store work off the server's thread.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| anyhow::anyhow!("the page's work panicked: {e}"))?
}

/// `/PATH?k=v&...` with each value percent-encoded as bytes.
pub fn url(path: &str, params: &[(&str, &[u8])]) -> String {
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
    if q.is_empty() { path.to_string() } else { format!("{path}?{}", q.join("&")) }
}

/// A span of time, roughly: `40 s`, `12 min`, `5 h`, `3 days`.
pub fn span(d: Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

pub fn when(t: DateTime<Utc>) -> String {
    format!("{} ({} ago)", t.format("%Y-%m-%d %H:%M UTC"), span(Utc::now() - t))
}

/// A POST form of one button, with the CSRF token and hidden fields.
pub fn button_form(action: &str, csrf: &Csrf, fields: &[(&str, &str)], label: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(csrf.0);
            @for (k, v) in fields { input type="hidden" name=(k) value=(v); }
            button type="submit" { (label) }
        }
    }
}

/// `/`: every job of the config.
pub async fn home(AxState(st): AxState<Arc<State>>, Extension(csrf): Extension<Csrf>) -> Response {
    let st2 = st.clone();
    let cards = blocking(move || {
        let all = st2.jobs()?;
        Ok(all.names.iter().map(|n| data::card(n, all.resolve(n, &crate::config::Overrides::default()))).collect())
    })
    .await;
    let cards: Vec<JobCard> = match cards {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let body = html! {
        h1 { "Jobs" }
        p.muted { "Config " code { (st.config.display()) } @if !st.allow_actions { " · read-only (start with --allow-actions to restore and run jobs)" } }
        div.cards { @for c in &cards { (card(&st, &csrf, c)) } }
    };
    layout("Jobs", &[], &body)
}

fn card(st: &State, csrf: &Csrf, c: &JobCard) -> Markup {
    let running = st.ops.running_for(&c.name);
    html! {
        section.card.job {
            h2 { a href=(url("/job", &[("job", c.name.as_bytes())])) { (c.name) } }
            p.muted { (c.folder) }
            @if let Some(e) = &c.error { p.error { (e) } }
            dl {
                dt { "Last run" }
                dd {
                    @match &c.last_run {
                        None => { "none recorded" }
                        Some(r) => {
                            span class={ "badge " (r.result) } { (r.result) }
                            @if let Some(end) = r.end { " " (when(end)) }
                            " · " (format!("{:.1} s", r.seconds)) " · exit " (r.exit_code)
                            @if r.warnings > 0 { " · " span.warn { (r.warnings) " warnings" } }
                            @if let Some(s) = &r.snapshot { div.muted { "made " (s) } }
                            @if let Some(e) = &r.error { div.error { (e) } }
                        }
                    }
                }
                dt { "Newest snapshot" }
                dd {
                    @match (&c.newest, c.age()) {
                        (Some(s), Some(age)) => {
                            span class=(if c.stale() { "age stale" } else { "age" }) { (span(age)) " old" }
                            " · " a href=(url("/browse", &[("job", c.name.as_bytes()), ("snap", s.folder.as_bytes())])) { (s.folder) }
                            " · " (c.complete) " snapshots"
                            @if c.stale() { div.stale { "overdue: older than " (span(c.stale_after)) " (twice the usual gap between its snapshots)" } }
                        }
                        _ => { span.age.stale { "no complete snapshot" } }
                    }
                }
                @if let Some(inc) = &c.incomplete {
                    dt { "In progress" }
                    dd {
                        (inc)
                        @match &c.progress {
                            Some(p) => { div.running { "running: " (p) } }
                            None => { " (a run going on, or one to --continue)" }
                        }
                    }
                }
                @if !c.replicas.is_empty() {
                    dt { "Replicas" }
                    dd { ul.plain { @for r in &c.replicas { li { (replica(r)) } } } }
                }
            }
            @for op in &running {
                p.running {
                    "Running: " a href=(url("/op", &[("id", op.id.to_string().as_bytes())])) { (op.title) }
                    @if let Some(last) = op.snapshot().0.last() { br; code { (last) } }
                }
            }
            @if st.allow_actions {
                div.actions {
                    (button_form("/action", csrf, &[("job", &c.name), ("kind", "backup")], "Back up now"))
                    (button_form("/action", csrf, &[("job", &c.name), ("kind", "verify")], "Verify"))
                    @if c.prunable {
                        (button_form("/action", csrf, &[("job", &c.name), ("kind", "prune-preview")], "Prune…"))
                    } @else {
                        span.muted { "No prune: the job has no keep_* rules." }
                    }
                }
            }
        }
    }
}

fn replica(r: &Replica) -> Markup {
    html! {
        code { (r.name) } ": "
        @if !r.asked { span { "off site: not asked here (" code { "rbackup status" } " asks its agent)" } }
        @else if !r.readable {
            span.warn {
                "not there, or can't be read (a drive not mounted?)"
                @if let Some(w) = &r.reached { "; last reached " (w.shown()) }
            }
        }
        @else if r.pending == 0 { span.ok { "up to date" } }
        @else { span.warn { (r.pending) " pending, about " (human_bytes(r.pending_bytes)) " to copy" } }
    }
}

/// `/job?job=J`: the job's snapshots over time.
pub async fn job(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let params = Params::parse(q.as_deref().unwrap_or_default());
    let Some(name) = params.str("job").map(str::to_string) else {
        return error_page(StatusCode::BAD_REQUEST, "Which job? (job=NAME)");
    };
    let st2 = st.clone();
    let n2 = name.clone();
    let found = blocking(move || {
        let job = st2.job(&n2)?;
        let (rows, total, measuring) = data::snapshots(&st2.cache, &job)?;
        Ok((rows, total, measuring, job.replicas))
    })
    .await;
    let (rows, total, measuring, replicas) = match found {
        Ok(r) => r,
        Err(e) => return failed(&e),
    };
    let j = name.as_bytes();
    let body = html! {
        h1 { "Job " (name) }
        @if rows.is_empty() { p { "No complete snapshot yet." } }
        @if measuring { p #measuring.running { "Measuring the snapshots' sizes and changes… (this page reloads itself)" } }
        @else {
            @if let Some(t) = total { (chart::space(&rows, t)) }
            @if let Some(t) = total { p.muted { "All " (rows.len()) " snapshots take " (human_bytes(t)) " on disk together." } }
            div.scroll {
                table.snaps {
                    thead { tr {
                        th { "Snapshot" } th { "Size" } th { "Only here" } th { "Added" } th { "Removed" } th { "Changed" } th { "Metadata" }
                        @for r in &replicas { th { "On " (r.to) } }
                    } }
                    tbody {
                        @for r in rows.iter().rev() {
                            tr {
                                td {
                                    a href=(url("/browse", &[("job", j), ("snap", r.snapshot.folder.as_bytes())])) { (r.snapshot.folder) }
                                    div.muted { (when(r.snapshot.time)) }
                                }
                                td.num { (r.usage.map_or_else(|| "?".into(), |u| human_bytes(u.apparent))) }
                                td.num { (r.usage.map_or_else(|| "?".into(), |u| human_bytes(u.unique))) }
                                @match r.counts {
                                    Some(c) => { td.num { (c.added) } td.num { (c.removed) } td.num { (c.changed) } td.num { (c.metadata) } }
                                    None => { td.num colspan="4" { "first" } }
                                }
                                @for h in &r.replicas {
                                    td { @match h {
                                        Held::Yes => span.ok { "yes" },
                                        Held::NotKept => span { "not kept there" },
                                        Held::NotAsked => span { "not asked" },
                                        Held::Pending(b) => span.warn { "pending" @if let Some(b) = b { " (" (human_bytes(*b)) ")" } },
                                        Held::Unreadable => span.warn { "not there, or can't be read" },
                                    } }
                                }
                            }
                        }
                    }
                }
            }
        }
        p { a href=(url("/log", &[("job", j)])) { "Operations on this job" } }
    };
    layout(&format!("Job {name}"), &[(url("/job", &[("job", j)]), name.clone())], &body)
}
