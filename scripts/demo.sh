#!/usr/bin/env bash
# Tries rbackup on a small demo tree in a temporary folder: two snapshots, a
# change in between, and the list. Nothing outside the temporary folder is
# touched. Run as root to see owners kept; as a user it works too.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --locked --quiet
bin="$PWD/target/release/rbackup"
work=$(mktemp -d /tmp/rbackup-demo.XXXXXX)
src="$work/server"
mkdir -p "$src/etc" "$src/home/alice"
echo "hello" > "$src/etc/motd"
head -c 1048576 /dev/urandom > "$src/home/alice/photo.jpg"
ln -s ../../etc/motd "$src/home/alice/motd-link"

echo "== first snapshot"
"$bin" --backup --source "$src" --backups-folder "$work/backups" --name server
sleep 1
echo "changed" >> "$src/etc/motd"
echo "== second snapshot (photo.jpg is hardlinked, motd fetched)"
"$bin" --backup --source "$src" --backups-folder "$work/backups" --name server
echo "== snapshots"
"$bin" --list --backups-folder "$work/backups" --name server
echo "== the two copies of photo.jpg share one inode:"
ls -li "$work"/backups/server.*/home/alice/photo.jpg
echo "demo folder: $work (remove it with: rm -rf $work)"
