//! Mail reports: a short, useful message when a run fails (or is partial,
//! or always, as configured), through SMTP with lettre over rustls.
//!
//! Policy: mail is a side channel. A failure to send is logged and never
//! hides the run's own error nor changes its exit code.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lettre::message::{Mailbox, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};
use serde::Deserialize;

use crate::error::Code;
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

impl SendOn {
    /// The value as the config file spells it.
    pub fn word(self) -> &'static str {
        match self {
            SendOn::Failure => "failure",
            SendOn::Partial => "partial",
            SendOn::Always => "always",
        }
    }

    /// Which runs are mailed, in words.
    pub fn meaning(self) -> &'static str {
        match self {
            SendOn::Failure => "runs that fail or do not run (locked, configuration errors)",
            SendOn::Partial => "runs that fail or do not run, and snapshots with unreadable entries (exit code 23)",
            SendOn::Always => "every run",
        }
    }
}

/// How long to wait for the SMTP server when `timeout_seconds` is not set.
const DEFAULT_TIMEOUT: u64 = 30;

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
    /// How long to wait for the server to connect or answer, in seconds
    /// (default 30).
    pub timeout_seconds: Option<u64>,
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

    fn timeout(&self) -> u64 {
        self.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// Checks everything that can be checked without sending: addresses,
    /// the password file's permissions, the CA file.
    pub fn validate(&self) -> Result<()> {
        if self.timeout_seconds == Some(0) {
            bail!("email `timeout_seconds` must be at least 1");
        }
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
        let builder = SmtpTransport::builder_dangerous(&self.host)
            .port(self.port())
            .timeout(Some(Duration::from_secs(self.timeout())));
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
        let ok = self.transport()?.test_connection().map_err(|e| self.smtp_error("connecting to", &e))?;
        if !ok {
            bail!("{}:{} did not answer like an SMTP server", self.host, self.port());
        }
        Ok(())
    }

    /// Sends one plain-text message: MIME headers, UTF-8 (quoted-printable
    /// where needed), a Message-ID and a Date, as a mail client expects.
    pub fn send(&self, subject: &str, body: &str) -> Result<()> {
        self.validate()?;
        let mut msg = Message::builder()
            .from(self.from.parse()?)
            .subject(subject)
            .message_id(None)
            .user_agent(format!("rbackup {}", env!("CARGO_PKG_VERSION")));
        for to in &self.to {
            msg = msg.to(to.parse()?);
        }
        let msg = msg.singlepart(SinglePart::plain(body.to_string())).context("composing the mail")?;
        self.transport()?.send(&msg).map_err(|e| self.smtp_error("sending mail through", &e))?;
        Ok(())
    }

    /// `test-email`'s subject and body for `job`.
    pub fn test_message(&self, job: &str) -> (String, String) {
        let subject = format!("[rbackup] {job} on {}: test message", hostname());
        let body = format!(
            "This is a test of rbackup's mail reports for job {job} on {}.\n\
             Reports are sent on: send_on = \"{}\" ({}).\n",
            hostname(),
            self.send_on.word(),
            self.send_on.meaning()
        );
        (subject, body)
    }

    /// One error for a failed SMTP exchange: the chain said once (lettre's
    /// message repeats its source), a timeout named as one, and the fix for
    /// the certificate errors people meet.
    fn smtp_error(&self, doing: &str, e: &lettre::transport::smtp::Error) -> anyhow::Error {
        let server = format!("{}:{}", self.host, self.port());
        let timed_out = std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source()).any(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock))
        });
        if timed_out {
            return anyhow!(
                "no answer from {server} within {} s (timeout): check that it is the mail server and that \
                 `security` matches the port (465 is \"tls\", 587 \"starttls\")",
                self.timeout()
            );
        }
        let text = chain_once(e);
        let hint = if text.contains("CaUsedAsEndEntity") {
            "\n  the server presents a CA certificate as its own (what a plain `openssl req -x509` makes); \
             give it a server certificate (basicConstraints=CA:FALSE, the host name in subjectAltName): see \
             docs/email.md"
        } else if text.contains("UnknownIssuer") {
            "\n  the server's certificate is not signed by a CA this machine trusts: put your CA's certificate \
             (PEM) in `ca_file` (see docs/email.md)"
        } else if text.contains("STARTTLS is not supported") {
            "\n  the server offers no STARTTLS on this port: for a server that speaks TLS from the start (port \
             465) set `security = \"tls\"`; for one without TLS on this machine or a trusted network, \
             `security = \"none\"`"
        } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
            "\n  the server does not speak TLS from the start on this port: for port 587 (or 25) set \
             `security = \"starttls\"`; for a server without TLS, `security = \"none\"`"
        } else if text.contains("NotValidForName") {
            "\n  the server's certificate does not name the `host` of [email]: use a name it holds, or give \
             it a certificate with that name in subjectAltName"
        } else {
            ""
        };
        anyhow!("{doing} {server}: {text}{hint}")
    }
}

/// An error and its sources, each said once: a message that already ends
/// with its source's (`network error: X`, then `X`) is not followed by it.
fn chain_once(e: &dyn std::error::Error) -> String {
    let messages: Vec<String> = std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string).collect();
    let mut out: Vec<&str> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut m = m.as_str();
        if let Some(next) = messages.get(i + 1) {
            m = m.strip_suffix(next.as_str()).and_then(|m| m.strip_suffix(": ")).unwrap_or(m);
        }
        out.push(m);
    }
    out.join(": ")
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
    /// What the reader should do next (see [`next_step`]).
    pub next_step: Option<String>,
    pub problems: &'a [Problem],
    pub problem_count: u64,
    /// What the backups folder holds now (the `.incomplete`, the latest snapshot).
    pub state: String,
    pub log_tail: Vec<String>,
}

/// The next step after a run that failed with `e` (`check`: the command line
/// that checks its job): an unreachable server is a network or ssh matter;
/// anything else starts with `check`, which tests each part of the job. A locked run needs nothing (the
/// message names the run that holds the lock).
pub fn next_step(check: &str, code: Code, e: &anyhow::Error) -> Option<String> {
    use crate::transport::SshError;
    if code == Code::Locked {
        return None;
    }
    let unreachable = e.chain().any(|c| matches!(c.downcast_ref::<SshError>(), Some(SshError::Unreachable { .. })));
    Some(if unreachable {
        format!(
            "The server could not be reached from this machine. Check the network and ssh from here to the \
             server (is it up? DNS, VPN, firewall, sshd on its port), then run `{check}`.\n\
             Nothing is lost: the next scheduled run tries again."
        )
    } else {
        format!("Run `{check}`: it tests each part of the job and prints a fix for what is wrong.")
    })
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
        let first = self.reason.lines().next().unwrap_or_default();
        // Cut at a word, with an ellipsis, not mid-word.
        let mut reason: String = first.chars().take(100).collect();
        if reason.len() < first.len() {
            if let Some(space) = reason.rfind(' ') {
                reason.truncate(space);
            }
            reason.push('…');
        }
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
        if let Some(step) = &self.next_step {
            b.push_str("What to do:\n");
            for line in step.lines() {
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
            let _ = writeln!(b, "The log's last lines:");
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
            timeout_seconds: None,
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

    /// An error that, like lettre's, says its source in its own message.
    #[derive(Debug)]
    struct Wraps(std::io::Error);

    impl std::fmt::Display for Wraps {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "network error: {}", self.0)
        }
    }

    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_chain_is_said_once() {
        let e = Wraps(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(chain_once(&e), "network error: invalid peer certificate: UnknownIssuer");
        let plain = std::io::Error::other("refused");
        assert_eq!(chain_once(&plain), "refused");
    }

    #[test]
    fn an_unreachable_server_mail_says_what_to_check_then_check() {
        let unreachable = anyhow::Error::new(crate::transport::SshError::Unreachable {
            host: "server".into(),
            detail: "Connection refused".into(),
        })
        .context("backup from server:/srv failed");
        let text = "[job.web]\nsource = \"server:/srv\"\nbackups_folder = \"/backups\"\n";
        let file = (std::path::PathBuf::from("/srv/my conf/rb.toml"), crate::config::parse(text).unwrap());
        let job = crate::config::resolve(Some(&file), Some("web"), &crate::config::Overrides::default()).unwrap();
        let step = next_step(&job.command("check"), Code::Error, &unreachable).unwrap();
        // The hint names the config the job came from: copied, it works.
        let check = "`rbackup -c '/srv/my conf/rb.toml' -j web check`";
        assert!(step.contains("Check the network and ssh") && step.contains(check), "{step}");
        let other = next_step(&job.command("check"), Code::Error, &anyhow!("disk full")).unwrap();
        assert!(other.starts_with(&format!("Run {check}")), "{other}");
        assert_eq!(next_step(&job.command("check"), Code::Locked, &anyhow!("locked")), None);
    }

    /// Regression: a long reason was cut mid-word ("…; onl").
    #[test]
    fn a_long_reason_is_cut_at_a_word_in_the_subject() {
        let m = RunMail {
            job: "server",
            code: Code::Locked,
            reason: format!("{} only one run per destination at a time", "locked by pid 1234 (backup)".repeat(3)),
            error: None,
            next_step: None,
            problems: &[],
            problem_count: 0,
            state: String::new(),
            log_tail: Vec::new(),
        };
        let subject = m.subject();
        assert!(subject.ends_with('…'), "{subject}");
        let shown = subject.split(" — ").nth(1).unwrap().trim_end_matches('…');
        let full = &m.reason;
        assert!(full.starts_with(shown) && full[shown.len()..].starts_with(' '), "cut mid-word: {subject}");
    }

    #[test]
    fn the_test_message_names_send_on_as_the_config_does() {
        let (_, body) = cfg(SendOn::Partial).test_message("web");
        assert!(body.contains("Reports are sent on: send_on = \"partial\" ("), "{body}");
        let (_, body) = cfg(SendOn::Failure).test_message("web");
        assert!(body.contains("send_on = \"failure\""), "{body}");
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
            next_step: Some("Run `rbackup -j server check`.".into()),
            problems: &problems,
            problem_count: 60,
            state: "server.01-01-26_00-00-00.incomplete is kept: run `rbackup -j server --continue`".into(),
            log_tail: vec!["line".into()],
        };
        assert!(m.subject().starts_with("[rbackup] server on "));
        assert!(m.subject().ends_with(": FAILED — cannot reach server"));
        let body = m.body();
        assert!(body.contains("Exit code: 1") && body.contains("--continue") && body.contains("and 10 more"));
        assert!(body.contains("What to do:\n  Run `rbackup -j server check`."), "{body}");
        assert_eq!(body.matches("cannot read: f").count(), 50);
    }
}
