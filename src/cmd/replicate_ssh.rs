//! `replicate --to [user@]host:/path`: the desktop's side of a replica
//! taken by an append-only agent (`serve --append-only`, see
//! [`crate::agent::append`]).
//!
//! Roles swap as in a restore: after the hello, which names the one
//! snapshot to write, the desktop sends the original's manifest (the agent
//! checks every copied file against it before it names the replica
//! complete), then serves the original snapshot as a backup's source. The
//! agent links what is unchanged since its previous replica and asks for
//! deltas of the rest; its last word is the complete replica's name, or why
//! not. The agent decides everything else: the desktop can't ask it to
//! remove or replace anything.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::config::Job;
use crate::error::Code;
use crate::fs::safefs::Shown;
use crate::report::Stats;
use crate::source::{self, Selection};
use crate::store::{Snapshot, Store};
use crate::transport::{Connection, Session, SshHost};
use crate::wire::frame::{CHUNK, Encoder};
use crate::wire::msg::{Hello, LogKind, ReplicaAsk, Role, SessionOptions, SinkMsg, SourceMsg};
use crate::wire::{PeerFailed, ProtocolError, SOFTWARE, read_msg};
use crate::{info, warn};

/// An off-site backups folder, served by an append-only agent.
#[derive(Debug, Clone)]
pub struct Remote {
    pub user: Option<String>,
    pub host: String,
    /// The agent's root (its forced command's `--root`).
    pub path: PathBuf,
}

/// An off-site backups folder reached: one SSH connection for every
/// session with its agent (what it holds, then each snapshot).
pub struct Connected<'a> {
    remote: &'a Remote,
    host: SshHost,
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some(u) => write!(f, "{u}@{}:{}", self.host, self.path.display()),
            None => write!(f, "{}:{}", self.host, self.path.display()),
        }
    }
}

impl Remote {
    /// Connects to the host, for the sessions that follow.
    pub fn connect(&self, job: &Job) -> Result<Connected<'_>> {
        Ok(Connected { remote: self, host: SshHost::connect(self.user.as_deref(), &self.host, job)? })
    }
}

impl std::fmt::Display for Connected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.remote.fmt(f)
    }
}

impl Connected<'_> {
    /// A session with the agent that asks `ask`.
    fn open(&self, job: &Job, ask: ReplicaAsk) -> Result<Session> {
        let conn = Connection::ssh_replica(&self.host, job, &self.remote.path)?;
        let hello = Hello {
            role: Role::Replica,
            path: self.remote.path.as_os_str().as_encoded_bytes().to_vec(),
            options: SessionOptions { compress: job.compress, bwlimit: job.bwlimit, ..SessionOptions::default() },
            version: SOFTWARE.to_string(),
            replica: Some(ask),
        };
        conn.handshake(&hello)
    }

    /// The snapshots of `job` the agent holds, complete or not.
    pub fn held(&self, job: &Job) -> Result<Vec<Snapshot>> {
        let Session { mut reader, writer, conn, .. } = self.open(job, ReplicaAsk::List { name: job.name.clone() })?;
        drop(writer);
        let folders = match read_msg::<SinkMsg, _>(&mut reader) {
            Ok(SinkMsg::Held(folders)) => folders,
            Ok(_) => bail!("{} answered something else than the list of its snapshots", conn.peer),
            Err(e) => return Err(anyhow!("{e}{}", conn.agent_said())),
        };
        conn.finish()?;
        let mut out: Vec<Snapshot> = folders
            .into_iter()
            .filter_map(|folder| {
                let (time, complete) = crate::store::parse_folder_name(&job.name, &folder)?;
                Some(Snapshot { folder, time, complete })
            })
            .collect();
        out.sort_by(|a, b| a.time.cmp(&b.time).then(b.complete.cmp(&a.complete)));
        Ok(out)
    }

    /// Has the agent take the replica of `original`, a complete snapshot of
    /// `store`, and says what it copied. `Partial` if the agent could not
    /// take some entries as they are (it logged which).
    pub fn replicate(&self, job: &Job, store: &Store, original: &Snapshot) -> Result<Code> {
        let started = Instant::now();
        let session = self.open(job, ReplicaAsk::Write { folder: original.folder.clone() })?;
        let Session { mut reader, mut writer, conn: mut handle, .. } = session;
        let snapshot = store.open_snapshot(original)?;
        let mut on_log = |kind: LogKind, text: &str| match kind {
            LogKind::Problem => warn!("{text}"),
            LogKind::Note => info!("{text}"),
            LogKind::Action => crate::trace!("{text}"),
        };
        let result = send_manifest(&mut writer, store, original, job.compress)
            .and_then(|()| {
                let everything = Selection::new(&[], &[])?;
                source::run(snapshot, everything, job.compress, job.bwlimit, &mut reader, writer, &mut on_log)
            })
            .and_then(|summary| match read_msg::<SinkMsg, _>(&mut reader)? {
                SinkMsg::Committed { folder, problems } => Ok((summary, folder, problems)),
                SinkMsg::Fatal(message) => {
                    bail!(PeerFailed { side: "receiving", message: format!("{:#}", Shown(message.as_bytes())) })
                }
                _ => bail!(ProtocolError::Unexpected("the agent's last word is not the replica's outcome".into())),
            });
        let (summary, done, problems) = match result {
            Ok(r) => r,
            Err(e) => {
                handle.stop();
                if let Some(signal) = crate::interrupt::received() {
                    return Err(anyhow!(signal).context(format!("the replica on {self} stopped")));
                }
                let said = if crate::transport::from_peer(&e) { handle.agent_said() } else { String::new() };
                return Err(anyhow!("{e:#}{said}").context(format!("the replica on {self} was not made")));
            }
        };
        handle.finish()?;
        let s = Stats::from_pairs(&summary);
        info!(
            "{} replicated to {self} in {:.1} s: {} entries, {} linked to the previous replica, {} sent ({} as \
             deltas), {}",
            Shown(done.as_bytes()),
            started.elapsed().as_secs_f64(),
            s.entries,
            s.linked,
            s.fetched_whole + s.fetched_delta,
            s.fetched_delta,
            crate::report::human_bytes(s.bytes_fetched)
        );
        if problems > 0 {
            warn!(
                "{problems} entries of {} could not be taken as they are (with -v, the agent's messages name them)",
                Shown(done.as_bytes())
            );
            return Ok(Code::Partial);
        }
        Ok(Code::Ok)
    }
}

/// Sends `original`'s manifest (or says it has none), in pieces of a frame's
/// chunk at most.
fn send_manifest(writer: &mut dyn Write, store: &Store, original: &Snapshot, compress: bool) -> Result<()> {
    let dir = crate::store::manifest::folder(&store.meta_dir()?).context("opening the manifests folder")?;
    let mut enc = Encoder::new(compress);
    let name = crate::store::manifest::file_name(&original.folder);
    let present = match dir.open_file(name.as_bytes()) {
        Ok(mut file) => {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = file.read(&mut buf).with_context(|| format!("reading the manifest of {}", original.folder))?;
                if n == 0 {
                    break true;
                }
                writer.write_all(&enc.msg(&SourceMsg::Manifest(buf[..n].to_vec())))?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!("{} has no manifest: its replica is checked only against what was read", original.folder);
            false
        }
        Err(e) => return Err(e).with_context(|| format!("opening the manifest of {}", original.folder)),
    };
    writer.write_all(&enc.msg(&SourceMsg::ManifestEnd { present }))?;
    writer.flush()?;
    Ok(())
}
