#!/usr/bin/env bash
# The benchmark against rsync --link-dest (docs/performance.md): installs what
# it needs, builds release, generates the server-like tree, starts the test
# sshd with an ACL'd backup user and runs both tools over the same SSH, in
# alternation. Needs root (owners, ACLs, a backup user, a loop-mounted
# filesystem for the snapshots). Results: stdout and target/bench-results.md.
#
#   sudo scripts/bench.sh                      # the full run (20 to 30 minutes on 2 cores)
#   sudo scripts/bench.sh --rss-files 0        # without the 1,000,000-file memory case
#   sudo scripts/bench.sh --files 2000 --rounds 1 --rss-files 10000   # a quick look
#
# Other arguments: --delete-files N (files of the deletion case, default
# 100000; 0 skips it), --replicate-snapshots N (snapshots of the replication
# case, default 30; 0 skips it), --seed N, --dense-mib N, --sparse-mib N, --work DIR
# (default /tmp/rbackup-bench; needs ~2 GiB, and ~4 GiB of inodes for the
# memory case), --no-fresh-fs (write snapshots to the work directory's
# filesystem).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run it as root (sudo scripts/bench.sh): the benchmark creates a backup user, ACLs and files owned by others" >&2
  exit 2
fi
scripts/install-deps.sh
cargo bench --locked --bench compare -- "$@"
