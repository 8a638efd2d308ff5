#!/usr/bin/env bash
# The long crash run: SIGKILL the daemon KILLS times (default 25) at random moments
# while writers write and fsync, clones, snapshots and GC run; after each kill, remount,
# check every fsync-acknowledged byte, unmount and fsck.
#   sudo bash scripts/crash.sh [KILLS] [SEED]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CRASH_KILLS=${1:-25}
[ -n "${2:-}" ] && export CRASH_SEED=$2
cargo nextest run --test crash --no-capture --success-output immediate
