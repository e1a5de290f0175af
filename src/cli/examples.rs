//! The `after_help` examples of the commands that have them (the man
//! pages show them too).

pub const HISTORY_EXAMPLES: &str = "\
Examples:
  # When did this file change?
  rbackup -j server history etc/nginx/nginx.conf

  # Every version of it, copied out as nginx.conf.<stamp>
  rbackup -j server history etc/nginx/nginx.conf --all-versions-to /tmp/versions

Rows come from the manifests; a snapshot without one is looked up in its
folder. See docs/restore.md.";

pub const RESTORE_EXAMPLES: &str = "\
Examples:
  # Everything of the latest snapshot, back where it came from
  rbackup -j server --restore

  # One directory as it was on 3 March, into a scratch folder to inspect
  rbackup -j server restore --snapshot 2026-03-03 --path home/alice --to /tmp/inspect

  # See first what a full restore with --delete would do
  rbackup -j server restore --delete --dry-run

Over SSH the server runs `rbackup serve --write --root DIR`, normally as root
through a forced command; see docs/restore.md.";

pub const SETUP_SERVER_EXAMPLES: &str = "\
Example (the line `rbackup setup-client` prints):
  rbackup setup-server --user backupuser --root /srv/content --key 'ssh-ed25519 AAAA... rbackup-server@desktop'";
