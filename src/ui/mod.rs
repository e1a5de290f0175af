//! `rbackup ui`: a web console over the store — every job at a glance, any
//! snapshot browsed, a file's versions, restores and the other commands run
//! with a click — that must not become the way into a desktop whose
//! backups are root's (docs/ui.md, "Security").
//!
//! The console is a *reader* of the store (names, manifests, last-run
//! summaries, the snapshot trees through [`crate::fs::safefs`] directory
//! handles) and a *launcher* of the existing commands: a restore, backup,
//! verify or prune is this same binary run as a child process with the
//! job's config, its output streamed to the page ([`ops`]). So the console
//! adds no second way to write anything.
//!
//! The layers, outside in:
//! - [`tls`]: TLS, for an address beyond loopback (`--allow-remote`);
//! - [`auth`]: Host check, the secret token exchanged for a session cookie,
//!   CSRF on every POST, the security headers on every answer;
//! - [`paths`]: URL bytes ⇄ snapshot paths, resolved beneath the snapshot
//!   without following any symlink;
//! - [`data`]: what the pages show, gathered from the store;
//! - [`pages`], [`browse`], [`chart`]: the HTML (maud, escaped by default);
//! - [`ops`], [`restore`]: child processes, their live output (SSE), the
//!   operation log; a restore's destination, preview and confirmation.

mod assets;
mod auth;
mod browse;
mod chart;
mod data;
mod ops;
mod pages;
mod paths;
mod restore;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::{get, post};

use crate::cmd::all_jobs::AllJobs;
use crate::error::Code;
use crate::usage;

/// What `rbackup ui` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config file (`-c`); `None` is the default one.
    pub config: Option<PathBuf>,
    /// Show only this job of the config (`-j`).
    pub job: Option<String>,
    pub listen: SocketAddr,
    pub allow_remote: bool,
    /// Certificate chain and key files, for a non-loopback address.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Read the token from this file instead of making one.
    pub token_file: Option<PathBuf>,
    /// Offer and accept restores and actions.
    pub allow_actions: bool,
}

/// What every request handler shares.
pub struct State {
    /// The config file, as the child processes are given it.
    pub config: PathBuf,
    /// The one job shown, if the console was given one.
    pub only: Option<String>,
    pub allow_actions: bool,
    pub auth: auth::Auth,
    pub ops: ops::Ops,
    pub cache: data::Cache,
}

impl State {
    /// The config's jobs, read again on each request (an edited config shows
    /// at the next page).
    pub fn jobs(&self) -> Result<AllJobs> {
        let mut all = AllJobs::load(Some(&self.config), None)?;
        if let Some(only) = &self.only {
            all.names.retain(|n| n == only);
        }
        Ok(all)
    }

    /// Job `name` of the config, if it has one.
    pub fn job(&self, name: &str) -> Result<crate::config::Job> {
        let all = self.jobs()?;
        if !all.names.iter().any(|n| n == name) {
            return Err(pages::NotFound(format!("no job {name:?} in {}", self.config.display())).into());
        }
        all.resolve(name, &crate::config::Overrides::default())
    }
}

/// Runs the console until it is killed.
pub fn run(opts: &Options) -> Result<Code> {
    let ip = opts.listen.ip();
    // The printed name, `rbackup-….localhost`, reaches 127.0.0.1 and ::1 alone.
    let reachable = [std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()];
    if ip.is_loopback() && !reachable.contains(&ip) {
        return Err(usage!(
            "--listen {ip}: the console's address is a name under .localhost, which browsers send to 127.0.0.1 \
             (or ::1) only; listen on 127.0.0.1"
        ));
    }
    if !ip.is_loopback() {
        if !opts.allow_remote {
            return Err(usage!(
                "refusing to listen on {ip}: it is not a loopback address, and the console can restore and delete \
                 as root. Keep the default 127.0.0.1 and reach it through `ssh -L 8470:127.0.0.1:8470 desktop`, \
                 or give --allow-remote with --tls-cert and --tls-key"
            ));
        }
        if opts.tls.is_none() {
            return Err(usage!(
                "refusing to listen on {ip} without TLS: give --tls-cert FILE and --tls-key FILE (PEM), or keep \
                 127.0.0.1 and use an SSH tunnel"
            ));
        }
    }
    let tls = opts.tls.as_ref().map(|(cert, key)| tls::acceptor(cert, key)).transpose()?;
    if crate::config::find(opts.config.as_deref())?.is_none() {
        return Err(usage!(
            "the console shows the jobs of a config file, and there is none: no {} (give -c FILE)",
            crate::config::DEFAULT_CONFIG
        ));
    }
    let all = AllJobs::load(opts.config.as_deref(), None)?;
    if let Some(j) = &opts.job
        && !all.names.contains(j)
    {
        return Err(usage!("no job {j:?} in {} (jobs: {})", all.file.0.display(), all.names.join(", ")));
    }
    let config = std::path::absolute(&all.file.0).unwrap_or_else(|_| all.file.0.clone());
    let token = match &opts.token_file {
        Some(f) => auth::read_token(f)?,
        None => auth::random_hex(32)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let auth = auth::Auth::new(token.clone(), addr, tls.is_some())?;
        let origin = auth.origin(addr);
        let state = Arc::new(State {
            config,
            only: opts.job.clone(),
            allow_actions: opts.allow_actions,
            auth,
            ops: ops::Ops::default(),
            cache: data::Cache::default(),
        });
        let mode = if opts.allow_actions { "restores and actions allowed" } else { "read-only" };
        crate::info!("web console for {} ({mode}); stop it with Ctrl-C", state.config.display());
        if !ip.is_loopback() {
            crate::warn!(
                "listening on {addr}, beyond this machine: whoever reaches it with the token acts as root on the backups"
            );
        }
        // The URL on stdout alone, so a script (or a test) can read it; a
        // token from a file stays out of the output (and the journal).
        match &opts.token_file {
            None => println!("{origin}/?token={token}"),
            Some(f) => println!("{origin}/?token=TOKEN (TOKEN is in {})", f.display()),
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        match tls {
            Some(acceptor) => axum::serve(tls::TlsListener::new(listener, acceptor)?, router(state)).await,
            None => axum::serve(listener, router(state)).await,
        }
        .context("the web console stopped")?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Code::Ok)
}

/// Every route, behind the guard.
fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/job", get(pages::job))
        .route("/browse", get(browse::browse))
        .route("/file", get(browse::file))
        .route("/download", get(browse::download))
        .route("/restore", get(ops::restore_form).post(ops::restore))
        .route("/action", post(ops::action))
        .route("/confirm", post(ops::confirm))
        .route("/op", get(ops::page))
        .route("/op/events", get(ops::events))
        .route("/log", get(ops::log_page))
        .route("/assets/{name}", get(assets::serve))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::guard))
        .with_state(state)
}
