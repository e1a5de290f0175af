#!/usr/bin/env bash
# Runs rbackup's whole test suite the way CI does: installs what the tests need,
# then runs them. Integration tests need root (owners, ACLs, a test sshd and a
# backup user); run this as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
else
  cargo test --locked --no-fail-fast "$@"
fi
