//! Browsing a snapshot: a directory's entries (paginated, directories
//! first, optionally only what changed since the snapshot before), a file's
//! page with its history across snapshots, and its download.
//!
//! The job comes from the config and the snapshot must be one of its
//! complete snapshots by exact folder name: neither is ever a path. The path
//! inside is opened through [`super::paths`]: beneath the snapshot, no
//! symlink followed; a symlink's page shows its target as text, and its
//! download is refused.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use rustix::fs::{FileType, Stat};

use super::State;
use super::data::{self, Entry};
use super::pages::{NotFound, blocking, error_page, failed, layout, url, when};
use super::paths::{self, Params, shown};
use crate::cmd::history::{self, change::Change, mode_string};
use crate::config::Job;
use crate::fs::safefs::{Dir, file_type, join, libc_errno};
use crate::report::human_bytes;
use crate::store::manifest::Kind;
use crate::store::{Snapshot, Store};

/// Entries on one page of a listing.
const PAGE: usize = 200;
/// The highest page number asked for that is looked at (far beyond any
/// folder; `PAGE_MAX * PAGE` can't overflow).
const PAGE_MAX: usize = 1 << 32;

/// A job's complete snapshot, opened.
struct Opened {
    job: Job,
    store: Store,
    snaps: Vec<Snapshot>,
    index: usize,
    root: Dir,
}

impl Opened {
    fn snap(&self) -> &Snapshot {
        &self.snaps[self.index]
    }

    fn previous_root(&self) -> Option<Dir> {
        let prev = self.snaps.get(self.index.checked_sub(1)?)?;
        self.store.open_snapshot(prev).ok()
    }
}

fn open(st: &State, params: &Params) -> Result<Opened> {
    let job = st.job(params.str("job").ok_or_else(|| NotFound("no job given".into()))?)?;
    let want = params.str("snap").ok_or_else(|| NotFound("no snapshot given".into()))?;
    let store = Store::open(&job.backups_folder, &job.name)?;
    let snaps: Vec<Snapshot> = store.snapshots()?.into_iter().filter(|s| s.complete).collect();
    let index = snaps
        .iter()
        .position(|s| s.folder == want)
        .ok_or_else(|| NotFound(format!("no snapshot {want:?} of job {} is complete", job.job)))?;
    let root = store.open_snapshot(&snaps[index])?;
    Ok(Opened { job, store, snaps, index, root })
}

fn kind_of(t: FileType) -> Kind {
    match t {
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::CharacterDevice => Kind::Char,
        FileType::BlockDevice => Kind::Block,
        _ => Kind::File,
    }
}

fn mtime(st: &Stat) -> String {
    chrono::DateTime::from_timestamp(st.st_mtime, 0)
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M").to_string())
}

/// The links to each folder on the way to `rel`.
fn trail(job: &str, snap: &str, rel: &[u8]) -> Vec<(String, String)> {
    let (j, s) = (job.as_bytes(), snap.as_bytes());
    let mut out = vec![
        (url("/job", &[("job", j)]), job.to_string()),
        (url("/browse", &[("job", j), ("snap", s)]), snap.to_string()),
    ];
    let mut so_far: Vec<u8> = Vec::new();
    for part in rel.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        so_far = join(&so_far, part);
        out.push((url("/browse", &[("job", j), ("snap", s), ("p", &so_far)]), shown(part)));
    }
    out
}

/// A symlink on the way (ELOOP), a file as a folder (ENOTDIR), nothing
/// (ENOENT): there is no such path to follow in the snapshot.
fn no_such_path(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc_errno::ELOOP | libc_errno::ENOTDIR | libc_errno::ENOENT))
}

fn bad(why: &str) -> Response {
    error_page(StatusCode::BAD_REQUEST, why)
}

/// `/browse?job=J&snap=S&p=PATH[&page=N][&changed=1]`.
pub async fn browse(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let params = Params::parse(q.as_deref().unwrap_or_default());
    let rel = match params.path("p") {
        Ok(p) => p,
        Err(why) => return bad(&why),
    };
    let changed = params.get("changed") == Some(b"1");
    // Clamped: a page number past any listing must not overflow.
    let page: usize = params.str("page").and_then(|p| p.parse().ok()).unwrap_or(0).min(PAGE_MAX);
    let st2 = st.clone();
    let (p2, rel2) = (params.clone(), rel.clone());
    // Dropped with this handler when the client leaves: the listing stops.
    let gone = data::Gone::default();
    let _gone_on_drop = gone.guard();
    let found = blocking(move || {
        let o = open(&st2, &p2)?;
        let dir = match paths::open_dir(&o.root, &rel2) {
            Ok(d) => d,
            Err(e) if no_such_path(&e) => {
                return Err(NotFound(format!(
                    "{} is not a folder in {} (a symlink is never followed)",
                    shown(&rel2),
                    o.snap().folder
                ))
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        // Only what changed: every entry compared. Else only this page's
        // entries are looked at.
        let (total, entries) = if changed {
            let prev = o.previous_root().and_then(|r| paths::open_dir(&r, &rel2).ok());
            let mut all = data::list_dir(&dir, prev.as_ref(), true, &gone)?;
            all.retain(|e| e.change.is_some());
            let total = all.len();
            (total, all.into_iter().skip(page * PAGE).take(PAGE).collect())
        } else {
            let names = data::sorted_names(&dir)?;
            let slice = names.get(page * PAGE..).unwrap_or_default();
            (names.len(), data::stat_entries(&dir, &slice[..slice.len().min(PAGE)]))
        };
        Ok((o.job.job.clone(), o.snap().clone(), o.index > 0, total, entries))
    })
    .await;
    let (job, snap, has_prev, total, entries) = match found {
        Ok(f) => f,
        Err(e) => {
            // A path that is not a directory (a file, a symlink, never
            // followed) has a page of its own.
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(
                    rustix::io::Errno::from_io_error(io),
                    Some(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
                )
            {
                let (j, s) = (params.get("job").unwrap_or_default(), params.get("snap").unwrap_or_default());
                return Redirect::to(&url("/file", &[("job", j), ("snap", s), ("p", &rel)])).into_response();
            }
            return failed(&e);
        }
    };
    let (j, s) = (job.as_bytes(), snap.folder.as_bytes());
    let pages = total.div_ceil(PAGE).max(1);
    let toggle = if changed { "0" } else { "1" };
    let page_url = |n: usize| {
        url(
            "/browse",
            &[
                ("job", j),
                ("snap", s),
                ("p", &rel),
                ("changed", if changed { b"1" } else { b"0" }),
                ("page", n.to_string().as_bytes()),
            ],
        )
    };
    let body = html! {
        h1 { (shown(&rel)) }
        p.muted { "In " (snap.folder) " · " (when(snap.time)) }
        div.toolbar {
            @if has_prev {
                a.toggle href=(url("/browse", &[("job", j), ("snap", s), ("p", &rel), ("changed", toggle.as_bytes())])) {
                    @if changed { "Show everything" } @else { "Only what changed since the previous snapshot" }
                }
            }
            @if st.allow_actions {
                a.button href=(url("/restore", &[("job", j), ("snap", s), ("p", &rel)])) { "Restore this folder…" }
            }
        }
        @if total == 0 { p { @if changed { "Nothing changed here." } @else { "Empty folder." } } }
        @else if entries.is_empty() { p { "No such page." } }
        @else {
            div.scroll { table.listing {
                thead { tr { th { "Name" } th { "Mode" } th { "Owner" } th.num { "Size" } th { "Modified (UTC)" } } }
                tbody { @for e in &entries { (entry_row(j, s, &rel, e)) } }
            } }
        }
        @if pages > 1 {
            nav.pages {
                @if page > 0 { a href=(page_url(page - 1)) { "‹ previous" } }
                span { "page " (page + 1) " of " (pages) " (" (total) " entries)" }
                @if page + 1 < pages { a href=(page_url(page + 1)) { "next ›" } }
            }
        }
    };
    layout(&shown(&rel), &trail(&job, &snap.folder, &rel), &body)
}

fn entry_row(j: &[u8], s: &[u8], dir: &[u8], e: &Entry) -> Markup {
    let path = join(dir, &e.name);
    let is_dir = e.kind == FileType::Directory;
    let href = if is_dir && e.change != Some("deleted") {
        url("/browse", &[("job", j), ("snap", s), ("p", &path)])
    } else {
        url("/file", &[("job", j), ("snap", s), ("p", &path)])
    };
    html! {
        tr class=(e.change.unwrap_or("")) {
            td.name {
                a href=(href) { (shown(&e.name)) @if is_dir { "/" } }
                @if let Some(t) = &e.target { span.target { " → " (shown(t)) } }
                @if let Some(c) = e.change { " " span class={ "badge " (c) } { (c) } }
            }
            td.mode { code { (mode_string(kind_of(e.kind), e.stat.st_mode)) } }
            td { (e.stat.st_uid) ":" (e.stat.st_gid) }
            td.num { @if e.kind == FileType::RegularFile { (human_bytes(e.stat.st_size as u64)) } }
            td { (mtime(&e.stat)) }
        }
    }
}

/// `/file?job=J&snap=S&p=PATH`: one entry, its history, its versions.
pub async fn file(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let params = Params::parse(q.as_deref().unwrap_or_default());
    let rel = match params.path("p") {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return bad("The root is a folder: browse it."),
        Err(why) => return bad(&why),
    };
    let st2 = st.clone();
    let (p2, rel2) = (params.clone(), rel.clone());
    let found = blocking(move || {
        let o = open(&st2, &p2)?;
        let (parent, name) = paths::split(&rel2);
        let here = paths::open_dir(&o.root, parent).ok().and_then(|d| {
            let stat = d.try_stat(name).ok()??;
            let target = (file_type(&stat) == FileType::Symlink).then(|| d.read_link(name).unwrap_or_default());
            Some((stat, target))
        });
        let found = history::lookup(&o.store, &rel2)?;
        Ok((o.job.job.clone(), o.snap().clone(), here, found))
    })
    .await;
    let (job, snap, here, found) = match found {
        Ok(f) => f,
        Err(e) => return failed(&e),
    };
    let (j, s) = (job.as_bytes(), snap.folder.as_bytes());
    let body = html! {
        h1 { (shown(&rel)) }
        p.muted { "In " (snap.folder) }
        @match &here {
            None => p { "Not in this snapshot." }
            Some((stat, target)) => {
                dl.facts {
                    dt { "Type" } dd { code { (mode_string(kind_of(file_type(stat)), stat.st_mode)) } }
                    dt { "Owner" } dd { (stat.st_uid) ":" (stat.st_gid) " (numeric, as on the server)" }
                    dt { "Size" } dd { (human_bytes(stat.st_size as u64)) " (" (stat.st_size) " bytes)" }
                    dt { "Modified" } dd { (mtime(stat)) " UTC" }
                    @if let Some(t) = target { dt { "Symlink to" } dd { code.target { (shown(t)) } " (shown, never followed)" } }
                }
                div.toolbar {
                    @if file_type(stat) == FileType::RegularFile {
                        a.button href=(url("/download", &[("job", j), ("snap", s), ("p", &rel)])) { "Download this version" }
                    }
                    @if st.allow_actions {
                        a.button href=(url("/restore", &[("job", j), ("snap", s), ("p", &rel)])) { "Restore…" }
                    }
                }
            }
        }
        h2 { "History" }
        div.scroll { table.history {
            thead { tr { th { "Snapshot" } th { "Change" } th.num { "Size" } th { "Modified (UTC)" } th {} } }
            tbody {
                @for (i, change) in &found.rows {
                    @let snap_i = &found.snapshots[*i];
                    @let seen = found.sightings[*i].as_ref();
                    tr class=(if snap_i.folder == snap.folder { "current" } else { "" }) {
                        td { a href=(url("/file", &[("job", j), ("snap", snap_i.folder.as_bytes()), ("p", &rel)])) { (snap_i.folder) } }
                        td { span class={ "badge " (change.word()) } { (change.word()) } }
                        @match seen {
                            Some(v) if *change != Change::Deleted => {
                                td.num { @if v.record.kind == Kind::File { (human_bytes(v.record.size)) } }
                                td { (chrono::DateTime::from_timestamp(v.record.mtime, 0).map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M").to_string())) }
                                td { @if v.record.kind == Kind::File && change.new_content() {
                                    a href=(url("/download", &[("job", j), ("snap", snap_i.folder.as_bytes()), ("p", &rel)])) { "download" }
                                } }
                            }
                            _ => { td {} td {} td {} }
                        }
                    }
                }
            }
        } }
    };
    let mut t = trail(&job, &snap.folder, paths::split(&rel).0);
    t.push((url("/file", &[("job", j), ("snap", s), ("p", &rel)]), shown(paths::split(&rel).1)));
    layout(&shown(&rel), &t, &body)
}

/// `/download?job=J&snap=S&p=PATH`: a regular file's bytes, as an attachment.
pub async fn download(AxState(st): AxState<Arc<State>>, RawQuery(q): RawQuery) -> Response {
    let params = Params::parse(q.as_deref().unwrap_or_default());
    let rel = match params.path("p") {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return bad("Only a file can be downloaded."),
        Err(why) => return bad(&why),
    };
    let rel2 = rel.clone();
    let opened = blocking(move || {
        let o = open(&st, &params)?;
        let (parent, name) = paths::split(&rel2);
        let not_found =
            || NotFound(format!("{} is not in {} (a symlink is never followed)", shown(&rel2), o.snap().folder));
        let dir = match paths::open_dir(&o.root, parent) {
            Ok(d) => d,
            Err(e) if no_such_path(&e) => {
                return Err(not_found().into());
            }
            Err(e) => return Err(e.into()),
        };
        // Its type from lstat before any open: a device node is never
        // opened (an open can act on a device), a symlink never followed.
        let Some(seen) = dir.try_stat(name)? else { return Err(not_found().into()) };
        if file_type(&seen) != FileType::RegularFile {
            return Ok(Err(format!("{} is not a regular file: only files are downloaded", shown(&rel2))));
        }
        // O_NOFOLLOW | O_NONBLOCK, then the same file again by fstat: an
        // entry swapped meanwhile is refused.
        let file = dir.open_file(name)?;
        let meta = file.metadata()?;
        if !meta.is_file() || (meta.dev(), meta.ino()) != (seen.st_dev, seen.st_ino) {
            return Err(anyhow!("{} changed while it was opened", shown(&rel2)));
        }
        Ok(Ok((file, meta.len())))
    })
    .await;
    let (file, len) = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(why)) => return bad(&why),
        Err(e) => return failed(&e),
    };
    let stream = futures_util::stream::unfold(Some(file), |f| async move {
        let mut f = f?;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let n = f.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((f, buf))
        })
        .await;
        match read {
            Ok(Ok((_, buf))) if buf.is_empty() => None,
            Ok(Ok((f, buf))) => Some((Ok(Bytes::from(buf)), Some(f))),
            Ok(Err(e)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    let name = paths::split(&rel).1;
    let ascii: String =
        name.iter().map(|&b| if b.is_ascii_alphanumeric() || b"._-".contains(&b) { b as char } else { '_' }).collect();
    let disposition =
        format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{}", paths::encode(name).replace('/', "%2F"));
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}
