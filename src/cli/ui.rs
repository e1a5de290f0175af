//! The options of `rbackup ui`, turned into [`crate::ui::Options`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Options of the web console.
#[derive(Args, Debug, Clone)]
pub struct UiArgs {
    /// Address and port to listen on; port 0 picks a free one
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8470")]
    pub listen: SocketAddr,

    /// Allow a --listen address that is not loopback (needs --tls-cert and --tls-key)
    #[arg(long)]
    pub allow_remote: bool,

    /// TLS certificate chain (PEM) for a non-loopback --listen
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for a non-loopback --listen
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Read the secret token from this file (e.g. from a systemd unit) instead of making one
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Offer restores, backups, verify and prune; without it the console only reads
    #[arg(long)]
    pub allow_actions: bool,
}

impl UiArgs {
    /// The console's options; `config` is the config file (`-c`) and `job`
    /// the one job to show (`-j`), if given.
    pub fn options(&self, config: Option<PathBuf>, job: Option<String>) -> crate::ui::Options {
        crate::ui::Options {
            config,
            job,
            listen: self.listen,
            allow_remote: self.allow_remote,
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            token_file: self.token_file.clone(),
            allow_actions: self.allow_actions,
        }
    }
}
