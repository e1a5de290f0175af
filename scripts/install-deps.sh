#!/usr/bin/env bash
# Installs the Debian packages rbackup needs to build (libacl1-dev) and that its
# tests and benchmarks use (openssh, acl, attr, rsync, python3 with aiosmtpd, groff
# to check the man pages, chromium and its WebDriver for the web console's browser
# test).
# Idempotent: does nothing when everything is there. Needs root (or sudo).
set -euo pipefail

packages=(libacl1-dev pkg-config openssh-server openssh-client acl attr rsync python3 python3-aiosmtpd time openssl systemd groff-base chromium chromium-driver fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
