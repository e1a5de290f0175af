//! Restoring from the console: pick where (a local folder, or back to the
//! server through the job's write-confined restore agent), see the dry
//! run's list of what would be created, replaced and deleted, confirm.
//! Both steps are `rbackup restore` run as an operation ([`super::ops`]),
//! with the options of [`crate::cmd::restore::RestoreOptions`] as flags,
//! each written `--flag=VALUE` (a value starting with `-` stays a value).
//! The snapshot is resolved to its exact folder when the preview starts,
//! and the run is that very command, through the preview's one-use
//! confirmation ([`ops::confirm`]).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{RawQuery, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;

use super::State;
use super::auth::Csrf;
use super::ops::{self, Confirm};
use super::pages::{error_page, failed, layout, url};
use super::paths::{Params, encode, shown};
use crate::store::Store;

/// The folder offered for a local restore, `DIR/JOB`: root's own, made
/// 0700 by the restore ([`crate::fs::target`]), unlike a world-writable
/// `/var/tmp` where another user could plant a symlink for it.
pub const DEFAULT_RESTORE_DIR: &str = "/var/lib/rbackup/restore";

/// Where a restore of `job` goes when it goes back to the server.
fn server_target(job: &crate::config::Job) -> Option<String> {
    job.restore_to.clone().or_else(|| job.source.as_ref().map(ToString::to_string))
}

/// `/restore?job=J&snap=S&p=PATH`: the choice of destination.
pub async fn restore_form(
    AxState(st): AxState<Arc<State>>,
    Extension(csrf): Extension<Csrf>,
    RawQuery(q): RawQuery,
) -> Response {
    if let Some(r) = ops::refused(&st) {
        return r;
    }
    let params = Params::parse(q.as_deref().unwrap_or_default());
    let rel = match params.path("p") {
        Ok(p) => p,
        Err(why) => return error_page(StatusCode::BAD_REQUEST, &why),
    };
    let (Some(name), Some(snap)) = (params.str("job"), params.str("snap")) else {
        return error_page(StatusCode::BAD_REQUEST, "Which job and snapshot?");
    };
    let job = match st.job(name) {
        Ok(j) => j,
        Err(e) => return failed(&e),
    };
    let server = server_target(&job);
    let default_to = format!("{DEFAULT_RESTORE_DIR}/{name}");
    let body = html! {
        h1 { "Restore " (shown(&rel)) }
        p.muted { "From " (snap) }
        form.restore method="post" action="/restore" {
            input type="hidden" name="csrf" value=(csrf.0);
            input type="hidden" name="job" value=(name);
            input type="hidden" name="snap" value=(snap);
            input type="hidden" name="p" value=(encode(&rel));
            input type="hidden" name="step" value="preview";
            fieldset {
                legend { "Where to" }
                label { input type="radio" name="dest" value="local" checked; " To a folder on this machine:" }
                input type="text" name="to" id="to" value=(default_to) size="40";
                @if let Some(s) = &server {
                    label { input type="radio" name="dest" value="server"; " Back to the server, in place: " code { (s) } }
                    p.muted { "Through the job's write-confined restore agent; the snapshot's version replaces what is there." }
                }
            }
            label.option {
                input type="checkbox" name="delete" value="1";
                " Also delete what the destination has beyond the snapshot (--delete)"
            }
            button type="submit" id="preview" { "Preview (dry run)" }
        }
    };
    let j = name.as_bytes();
    layout(
        "Restore",
        &[
            (url("/job", &[("job", j)]), name.to_string()),
            (url("/browse", &[("job", j), ("snap", snap.as_bytes())]), snap.to_string()),
        ],
        &body,
    )
}

/// `POST /restore`: runs the dry run, whose page offers the confirmation of
/// the restore itself; `step=run` is refused (it goes through `/confirm`).
pub async fn restore(AxState(st): AxState<Arc<State>>, body: String) -> Response {
    if let Some(r) = ops::refused(&st) {
        return r;
    }
    let form = Params::parse(&body);
    let rel = match form.encoded_path("p") {
        Ok(p) => p,
        Err(why) => return error_page(StatusCode::BAD_REQUEST, &why),
    };
    let (Some(name), Some(snap), Some(dest)) = (form.str("job"), form.str("snap"), form.str("dest")) else {
        return error_page(StatusCode::BAD_REQUEST, "Which job, snapshot and destination?");
    };
    if form.str("step") == Some("run") {
        return ops::unconfirmed();
    }
    let job = match st.job(name) {
        Ok(j) => j,
        Err(e) => return failed(&e),
    };
    // What the preview shows is what the run restores: `latest` (or a
    // time) is resolved now, once.
    let snap = match Store::open(&job.backups_folder, &job.name)
        .and_then(|store| crate::store::select::pick(&store.snapshots()?, &job.name, Some(snap)))
    {
        Ok(s) => s.folder,
        Err(e) => return failed(&e),
    };
    let snap = snap.as_str();
    // `restore --path` takes text: a path that isn't UTF-8 is restored
    // with the folder holding it.
    let Ok(path) = String::from_utf8(rel.clone()) else {
        return error_page(
            StatusCode::BAD_REQUEST,
            &format!("{} is not UTF-8: restore the folder that holds it", shown(&rel)),
        );
    };
    // `--opt=VALUE`: a value that starts with `-` (a file named `--help`)
    // stays a value.
    let mut args = vec!["restore".to_string(), format!("--snapshot={snap}")];
    if !path.is_empty() {
        args.push(format!("--path={path}"));
    }
    let delete = form.str("delete") == Some("1");
    if delete {
        args.push("--delete".into());
    }
    let to = form.str("to").unwrap_or_default().trim().to_string();
    let target = match dest {
        "local" if to.starts_with('/') && !to.contains('\n') => {
            args.push(format!("--to={to}"));
            to.clone()
        }
        "local" => return error_page(StatusCode::BAD_REQUEST, "Give the local folder as an absolute path."),
        "server" => match server_target(&job) {
            Some(s) => s,
            None => return error_page(StatusCode::BAD_REQUEST, "This job has no source or restore_to to restore to."),
        },
        _ => return error_page(StatusCode::BAD_REQUEST, "No such destination."),
    };
    let what = if path.is_empty() { snap.to_string() } else { format!("{} of {snap}", shown(&rel)) };
    let confirm =
        match Confirm::new(format!("Restore to {target}"), format!("Restore {what} to {target}"), args.clone()) {
            Ok(c) => c,
            Err(e) => return failed(&e),
        };
    args.push("--dry-run".into());
    match ops::start(&st, &job, format!("Restore {what} to {target}: preview"), args, Some(confirm)) {
        Ok(id) => Redirect::to(&url("/op", &[("id", id.to_string().as_bytes())])).into_response(),
        Err(e) => failed(&e),
    }
}
