//! Mail reports: a short, useful message when a run fails (or is partial,
//! or always, as configured), through SMTP with lettre over rustls.
//!
//! Policy: mail is a side channel. A failure to send is logged and never
//! hides the run's own error nor changes its exit code.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};
use serde::Deserialize;

use crate::exit::Code;
use crate::report::Problem;

/// How to reach the SMTP server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (port 587); refuses to go on
    /// without it.
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption (a relay on localhost).
    None,
}

/// When to send.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SendOn {
    /// Runs that failed, or did not run (locked, bad configuration).
    #[default]
    Failure,
    /// Those, and runs whose snapshot misses files (exit code 23).
    Partial,
    /// Every run.
    Always,
}

/// The `[email]` table of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub host: String,
    /// Default: 587 (starttls), 465 (tls), 25 (none).
    pub port: Option<u16>,
    #[serde(default)]
    pub security: Security,
    pub username: Option<String>,
    /// A file holding the password; refused if anyone but its owner can read it.
    pub password_file: Option<PathBuf>,
    pub from: String,
    pub to: Vec<String>,
    /// An extra CA certificate (PEM) to trust, for a private server.
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub send_on: SendOn,
}

impl EmailConfig {
    /// Whether a run that ended with `code` is mailed.
    pub fn wants(&self, code: Code) -> bool {
        match self.send_on {
            SendOn::Always => true,
            SendOn::Partial => code >= Code::Partial,
            SendOn::Failure => code >= Code::Mismatch,
        }
    }

    fn port(&self) -> u16 {
        self.port.unwrap_or(match self.security {
            Security::Starttls => 587,
            Security::Tls => 465,
            Security::None => 25,
        })
    }

    /// Checks everything that can be checked without sending: addresses,
    /// the password file's permissions, the CA file.
    pub fn validate(&self) -> Result<()> {
        self.from.parse::<Mailbox>().with_context(|| format!("email `from` {:?} is not an address", self.from))?;
        if self.to.is_empty() {
            bail!("email `to` is empty");
        }
        for to in &self.to {
            to.parse::<Mailbox>().with_context(|| format!("email `to` {to:?} is not an address"))?;
        }
        if self.username.is_some() != self.password_file.is_some() {
            bail!("email: `username` and `password_file` go together");
        }
        if let Some(p) = &self.password_file {
            password(p)?;
        }
        if let Some(ca) = &self.ca_file {
            certificate(ca)?;
        }
        Ok(())
    }

    fn transport(&self) -> Result<SmtpTransport> {
        let tls = |host: &str| -> Result<TlsParameters> {
            let mut b = TlsParameters::builder(host.to_string());
            if let Some(ca) = &self.ca_file {
                b = b.add_root_certificate(certificate(ca)?);
            }
            b.build_rustls().context("setting up TLS for mail")
        };
        let builder =
            SmtpTransport::builder_dangerous(&self.host).port(self.port()).timeout(Some(Duration::from_secs(30)));
        let builder = match self.security {
            Security::Starttls => builder.tls(Tls::Required(tls(&self.host)?)),
            Security::Tls => builder.tls(Tls::Wrapper(tls(&self.host)?)),
            Security::None => builder.tls(Tls::None),
        };
        let builder = match (&self.username, &self.password_file) {
            (Some(user), Some(file)) => builder.credentials(Credentials::new(user.clone(), password(file)?)),
            _ => builder,
        };
        Ok(builder.build())
    }

    /// `host:port (security)`, for messages.
    pub fn server(&self) -> String {
        format!("{}:{} ({:?})", self.host, self.port(), self.security).to_lowercase()
    }

    /// Connects and greets the server (and authenticates, if configured)
    /// without sending anything.
    pub fn check(&self) -> Result<()> {
        self.validate()?;
        let ok = self
            .transport()?
            .test_connection()
            .with_context(|| format!("connecting to {}:{}", self.host, self.port()))?;
        if !ok {
            bail!("{}:{} did not answer like an SMTP server", self.host, self.port());
        }
        Ok(())
    }

    /// Sends one message.
    pub fn send(&self, subject: &str, body: &str) -> Result<()> {
        self.validate()?;
        let mut msg = Message::builder().from(self.from.parse()?).subject(subject);
        for to in &self.to {
            msg = msg.to(to.parse()?);
        }
        let msg = msg.body(body.to_string()).context("composing the mail")?;
        self.transport()?.send(&msg).with_context(|| format!("sending mail through {}:{}", self.host, self.port()))?;
        Ok(())
    }
}

fn password(path: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md =
        std::fs::metadata(path).with_context(|| format!("cannot read the mail password file {}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        bail!(
            "refusing the mail password file {}: others can read it (mode {:o}); run `chmod 600 {}`",
            path.display(),
            md.mode() & 0o777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

fn certificate(path: &std::path::Path) -> Result<Certificate> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read the mail CA file {}", path.display()))?;
    Certificate::from_pem(&pem)
        .map_err(|e| anyhow!("the mail CA file {} is not a PEM certificate: {e}", path.display()))
}

/// Everything a run report mail says.
pub struct RunMail<'a> {
    pub job: &'a str,
    pub code: Code,
    /// One line: why it failed, or what the snapshot is.
    pub reason: String,
    /// The full error chain of a failed run.
    pub error: Option<String>,
    pub problems: &'a [Problem],
    pub problem_count: u64,
    /// What the backups folder holds now (the `.incomplete`, the latest snapshot).
    pub state: String,
    pub log_tail: Vec<String>,
}

/// Most paths listed in a mail.
const PATHS_IN_MAIL: usize = 50;

/// The machine's name, for subjects.
pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

impl RunMail<'_> {
    /// `[rbackup] JOB on HOST: FAILED — reason`.
    pub fn subject(&self) -> String {
        let mut reason: String = self.reason.lines().next().unwrap_or_default().chars().take(100).collect();
        if reason.is_empty() {
            reason = "no details".into();
        }
        format!("[rbackup] {} on {}: {} — {reason}", self.job, hostname(), self.code.word())
    }

    pub fn body(&self) -> String {
        use std::fmt::Write;
        let mut b = String::new();
        let _ = writeln!(b, "Job {} on {}: {}", self.job, hostname(), self.code.word());
        let _ = writeln!(b, "Exit code: {}\n", self.code.status());
        if let Some(err) = &self.error {
            b.push_str("What failed:\n");
            for line in err.lines() {
                let _ = writeln!(b, "  {line}");
            }
            b.push('\n');
        }
        if self.problem_count > 0 {
            let _ = writeln!(b, "Entries with problems ({}):", self.problem_count);
            for p in self.problems.iter().take(PATHS_IN_MAIL) {
                let _ = writeln!(b, "  {p}");
            }
            if self.problem_count > PATHS_IN_MAIL as u64 {
                let _ = writeln!(b, "  … and {} more (see the log)", self.problem_count - PATHS_IN_MAIL as u64);
            }
            b.push('\n');
        }
        let _ = writeln!(b, "Snapshots: {}\n", self.state);
        if !self.log_tail.is_empty() {
            let _ = writeln!(b, "Last {} log lines:", self.log_tail.len());
            for line in &self.log_tail {
                let _ = writeln!(b, "  {line}");
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(send_on: SendOn) -> EmailConfig {
        EmailConfig {
            host: "h".into(),
            port: None,
            security: Security::Starttls,
            username: None,
            password_file: None,
            from: "a@b.c".into(),
            to: vec!["d@e.f".into()],
            ca_file: None,
            send_on,
        }
    }

    #[test]
    fn send_on_picks_the_runs_to_mail() {
        let f = cfg(SendOn::Failure);
        assert!(f.wants(Code::Error) && f.wants(Code::Locked) && f.wants(Code::Usage));
        assert!(!f.wants(Code::Partial) && !f.wants(Code::Ok) && !f.wants(Code::Vanished));
        let p = cfg(SendOn::Partial);
        assert!(p.wants(Code::Partial) && p.wants(Code::Error) && !p.wants(Code::Vanished));
        assert!(cfg(SendOn::Always).wants(Code::Ok));
    }

    #[test]
    fn a_group_or_world_readable_password_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("pw");
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(password(&p).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(password(&p).unwrap(), "secret");
    }

    #[test]
    fn the_mail_is_short_and_says_what_to_do() {
        let problems: Vec<Problem> = (0..60)
            .map(|i| Problem::new(crate::report::ProblemKind::Unreadable, format!("f{i}").as_bytes(), "denied"))
            .collect();
        let m = RunMail {
            job: "server",
            code: Code::Error,
            reason: "cannot reach server\nsecond line".into(),
            error: Some("backup failed\ncannot reach server".into()),
            problems: &problems,
            problem_count: 60,
            state: "server.01-01-26_00-00-00.incomplete is kept: run `rbackup -j server --continue`".into(),
            log_tail: vec!["line".into()],
        };
        assert!(m.subject().starts_with("[rbackup] server on "));
        assert!(m.subject().ends_with(": FAILED — cannot reach server"));
        let body = m.body();
        assert!(body.contains("Exit code: 1") && body.contains("--continue") && body.contains("and 10 more"));
        assert_eq!(body.matches("cannot read: f").count(), 50);
    }
}
