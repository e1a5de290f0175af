#!/usr/bin/env bash
# Builds the Debian package: the binary, the systemd units, the man pages,
# shell completions, the example config and the docs (see
# [package.metadata.deb] in Cargo.toml). Needs cargo-deb
# (`cargo install cargo-deb`). The .deb lands in target/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked
mkdir -p target/assets
bin=target/release/rbackup
rm -rf target/assets/man
"$bin" man --dir target/assets/man >/dev/null    # rbackup.1, rbackup-COMMAND.1, rbackup.toml.5
"$bin" completions bash > target/assets/rbackup.bash
"$bin" completions zsh > target/assets/_rbackup
"$bin" completions fish > target/assets/rbackup.fish
if ! cargo deb --version >/dev/null 2>&1; then
  echo "cargo-deb is not installed: cargo install cargo-deb" >&2
  exit 1
fi
cargo deb --no-build --locked "$@"
