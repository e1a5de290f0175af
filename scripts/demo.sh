#!/usr/bin/env bash
# Tries rbackup on a small demo tree in a temporary folder: two snapshots, a
# change in between, the list, and the web console on them (left running in
# the background; the script says how to stop it). Nothing outside the
# temporary folder is touched. Run as root to see owners kept; as a user it
# works too.
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
printf '[job.server]\nsource = "%s"\nbackups_folder = "%s"\n' "$src" "$work/backups" > "$work/rbackup.toml"
echo "== the web console on these snapshots (read-only), in the background"
"$bin" -c "$work/rbackup.toml" ui --listen 127.0.0.1:0 > "$work/ui.url" 2> "$work/ui.log" < /dev/null &
ui_pid=$!
for _ in $(seq 100); do
  [ -s "$work/ui.url" ] && break
  kill -0 "$ui_pid" 2>/dev/null || { cat "$work/ui.log" >&2; exit 1; }
  sleep 0.1
done
disown "$ui_pid" 2>/dev/null || true
echo "demo folder: $work"
echo "console: $(head -n 1 "$work/ui.url")"
echo "stop the console and remove the demo with: kill $ui_pid; rm -rf $work"
