#!/usr/bin/env bash
# Builds the Debian package: the binary, the systemd units, the man pages,
# shell completions, the example config and the docs (see
# [package.metadata.deb] in Cargo.toml), then checks it with lintian. Needs
# cargo-deb (`cargo install cargo-deb`); installs lintian if missing. The
# .deb lands in target/debian/. Extra arguments go to `cargo deb`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
missing=()
for p in lintian binutils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
  echo "cargo-deb is not installed: cargo install cargo-deb" >&2
  exit 1
fi

cargo build --release --locked
mkdir -p target/assets
bin=target/release/rbackup
rm -rf target/assets/man
"$bin" man --dir target/assets/man >/dev/null    # rbackup.1, rbackup-COMMAND.1, rbackup.toml.5
"$bin" completions bash > target/assets/rbackup.bash
"$bin" completions zsh > target/assets/_rbackup
"$bin" completions fish > target/assets/rbackup.fish

# --strip: the release profile keeps line tables (for backtraces in
# development); the package ships the binary without any debug info.
deb=$(cargo deb --no-build --locked --strip "$@" | tail -n 1)
echo "$deb: $(du -h "$deb" | cut -f1)"
# Errors fail the build; warnings and notes are shown.
lintian --fail-on error --display-info "$deb"
