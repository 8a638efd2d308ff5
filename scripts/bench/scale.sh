#!/usr/bin/env bash
# scripts/bench/scale.sh: how thinfs's daemon memory, metadata size and remount time scale
# with the amount of unique data in one store.
#
# Usage: sudo scripts/bench/scale.sh        (environment variables below; no arguments)
#
#   TOTAL_GIB=32        unique data ingested in all (GiB)
#   FIRST_GIB=4         the first RSS measurement point (GiB)
#   FILE_GIB=4          size of each ingested file; FIRST_GIB and TOTAL_GIB are multiples
#   OVERWRITE_GIB=2     random 4 KiB overwrites after the ingest: at most this much ...
#   OVERWRITE_SECS=120  ... and at most this long
#   OVERWRITE_DIRECT=0  1: O_DIRECT overwrites (QEMU cache=none); 0: buffered + end fsync
#   WORK=/var/tmp/thinfs-scale   store (WORK/store) and mountpoint (WORK/mnt); deleted at exit
#   BUILD=1             cargo build --release first (0: use target/release/thinfs as is)
#   THINFS=path         use this binary instead of target/release/thinfs (implies BUILD=0)
#   NICE=10             niceness of everything this script runs
#   MOUNT_OPTS=         more mount options, e.g. meta_cache=32M (gc_interval=0 is always set)
#
# Steps, on a fresh store (mkfs with the default 16 KiB blocks, mount -o gc_interval=0):
#   1. fio sequential 1 MiB writes with --refill_buffers (a distinct --randseed per file, so
#      no block repeats across files) into files of FILE_GIB each, end fsync per file;
#      daemon VmRSS / VmHWM (/proc/PID/status) after FIRST_GIB and after TOTAL_GIB.
#      Target: RSS(TOTAL) - RSS(FIRST) < 64 MiB.
#   2. metadata on disk (du -sb STORE/meta and `thinfs stats --json`) after the ingest,
#      after fio random 4 KiB overwrites over all files (--refill_buffers, end fsync), and
#      after `thinfs gc --mount MNT --json`. meta% = (du(STORE/meta) + the block-map nodes
#      live maps reach, which are records in the packs: stats node_bytes + 40-byte headers)
#      / live unique data,
#      where live unique data = stats allocated_bytes (non-hole blocks of live files; the
#      data is unique, so this is what the live files really store).
#      Target: meta% <= 2.
#   3. remount: umount (timed), wait for the daemon to exit (timed), time `thinfs mount`
#      (it returns once the kernel mount is up); RSS and metadata once more afterwards.
#
# Output on stdout: a markdown table and JSON lines, one per measurement point
#   {"point": ..., "unique_gib": ..., "rss_bytes": ..., "hwm_bytes": ..., "meta_du_bytes": ...,
#    "meta_bytes": ..., "node_bytes": ..., "stored_bytes": ..., "allocated_bytes": ..., "pack_bytes": ...,
#    "garbage_bytes": ..., "meta_pct": ..., "seconds": ...}
# and one summary line {"summary": ...} (with VmRSS / VmHWM after every ingested file). Progress goes to stderr. Everything is unmounted and
# WORK deleted on exit (trap), also on failure or Ctrl-C.
#
# Time: the ingest runs at ~150 MB/s on a busy 2-core machine, so TOTAL_GIB=32 takes ~4-6 min,
# the overwrites <= OVERWRITE_SECS, gc a minute or two. Disk: TOTAL_GIB + garbage of the
# overwrites (each 4 KiB overwrite rewrites a 16 KiB chunk: up to 4x OVERWRITE_GIB).
set -euo pipefail
{

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

TOTAL_GIB=${TOTAL_GIB:-32}
FIRST_GIB=${FIRST_GIB:-4}
FILE_GIB=${FILE_GIB:-4}
OVERWRITE_GIB=${OVERWRITE_GIB:-2}
OVERWRITE_SECS=${OVERWRITE_SECS:-120}
OVERWRITE_DIRECT=${OVERWRITE_DIRECT:-0}
WORK=${WORK:-/var/tmp/thinfs-scale}
BUILD=${BUILD:-1}
NICE=${NICE:-10}
THINFS_SRC=${THINFS:-}
[ -n "$THINFS_SRC" ] && BUILD=0

STORE=$WORK/store
MNT=$WORK/mnt
BIN_DIR=$WORK/bin
THINFS=$BIN_DIR/thinfs

log() { printf '[scale %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
run() { nice -n "$NICE" "$@"; }

[ "$(id -u)" = 0 ] || die "run as root (FUSE mount, /proc/PID/status of the daemon)"
for v in TOTAL_GIB FIRST_GIB FILE_GIB OVERWRITE_GIB OVERWRITE_SECS; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "$v must be a positive integer"
done
[ $((FIRST_GIB % FILE_GIB)) = 0 ] && [ $((TOTAL_GIB % FILE_GIB)) = 0 ] \
    || die "FIRST_GIB and TOTAL_GIB must be multiples of FILE_GIB"
[ "$FIRST_GIB" -le "$TOTAL_GIB" ] || die "FIRST_GIB > TOTAL_GIB"
for c in fio jq fuser pgrep mountpoint du; do
    command -v "$c" >/dev/null || die "$c not found"
done

# ---- cleanup -------------------------------------------------------------------------------

daemon_pid() {
    # The background daemon is `thinfs mount STORE MNT ... --foreground`.
    pgrep -f -- "thinfs mount $STORE $MNT .*--foreground" | head -n1 || true
}

wait_exit() { # PID SECONDS: 0 once PID is gone
    local pid=$1 n=$(($2 * 20))
    while [ "$n" -gt 0 ]; do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.05
        n=$((n - 1))
    done
    return 1
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    if mountpoint -q "$MNT" 2>/dev/null; then
        log "cleanup: unmounting $MNT"
        pid=$(daemon_pid)
        timeout 300 umount "$MNT" 2>/dev/null || timeout 60 fusermount3 -u "$MNT" 2>/dev/null \
            || umount -l "$MNT" 2>/dev/null || true
        if [ -n "$pid" ] && ! wait_exit "$pid" 120; then
            log "cleanup: daemon $pid still running; killing it"
            kill "$pid" 2>/dev/null || true
            wait_exit "$pid" 10 || kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    if [ -d "$WORK" ] && ! mountpoint -q "$MNT" 2>/dev/null; then
        log "cleanup: deleting $WORK"
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}

# Refuse to delete a WORK that is not ours.
if [ -e "$WORK" ]; then
    mountpoint -q "$MNT" 2>/dev/null && die "$MNT is mounted (a previous run?); unmount it first"
    extra=$(find "$WORK" -mindepth 1 -maxdepth 1 ! -name store ! -name mnt ! -name bin | head -n1)
    [ -z "$extra" ] || die "$WORK exists and holds $extra; not ours, refusing to delete it"
    rm -rf -- "$WORK"
fi
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$MNT" "$BIN_DIR"

# ---- build ---------------------------------------------------------------------------------

if [ "$BUILD" = 1 ]; then
    log "cargo build --release"
    (cd "$REPO" && run cargo build --release --quiet) >&2
    THINFS_SRC=$REPO/target/release/thinfs
fi
THINFS_SRC=${THINFS_SRC:-$REPO/target/release/thinfs}
[ -x "$THINFS_SRC" ] || die "$THINFS_SRC not found"
# A private copy: a rebuild of target/ during the run must not change the daemon under test.
cp "$THINFS_SRC" "$THINFS"

# ---- helpers -------------------------------------------------------------------------------

mount_store() { run "$THINFS" mount "$STORE" "$MNT" -o "gc_interval=0${MOUNT_OPTS:+,$MOUNT_OPTS}"; }

status_kib() { # FIELD: VmRSS / VmHWM of the daemon in KiB
    awk -v f="$1:" '$1 == f {print $2}' "/proc/$(daemon_pid)/status"
}

POINTS=() # JSON objects, one per measurement point
SERIES=() # [unique GiB, VmRSS KiB, VmHWM KiB] after each ingested file

# measure POINT UNIQUE_GIB SECONDS: daemon memory + metadata figures as one JSON object
measure() {
    local point=$1 gib=$2 secs=$3 pid rss hwm du stats
    pid=$(daemon_pid)
    [ -n "$pid" ] || die "no daemon for $STORE"
    rss=$(($(status_kib VmRSS) * 1024))
    hwm=$(($(status_kib VmHWM) * 1024))
    stats=$(run "$THINFS" stats "$MNT" --json)
    # du after stats: stats syncs everything first, so both see the same flushed state.
    du=$(du -sb "$STORE/meta" | cut -f1)
    local j
    j=$(jq -c -n --arg point "$point" --argjson gib "$gib" --argjson secs "$secs" \
        --argjson rss "$rss" --argjson hwm "$hwm" --argjson du "$du" --argjson s "$stats" \
        '{point: $point, unique_gib: $gib, rss_bytes: $rss, hwm_bytes: $hwm,
          meta_du_bytes: $du, meta_bytes: $s.meta_bytes, stored_bytes: $s.stored_bytes,
          node_bytes: ($s.node_bytes + 40 * $s.nodes),
          allocated_bytes: $s.allocated_bytes, pack_bytes: $s.pack_bytes,
          garbage_bytes: $s.garbage_bytes, chunks: $s.chunks, dedup_ratio: $s.dedup_ratio,
          meta_pct: (if $s.allocated_bytes > 0
                     then (($du + $s.node_bytes + 40 * $s.nodes) * 10000 / $s.allocated_bytes
                           | round) / 100 else null end),
          seconds: $secs}')
    POINTS+=("$j")
    log "$point: $(jq -r '"rss \(.rss_bytes/1048576|floor) MiB, hwm \(.hwm_bytes/1048576|floor) MiB, meta \(.meta_du_bytes/1048576|floor) MiB + nodes \(.node_bytes/1048576|floor) MiB (\(.meta_pct)%), garbage \(.garbage_bytes/1048576|floor) MiB"' <<<"$j")"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'; }

# ingest FROM_INDEX TO_INDEX (exclusive): sequential writes of unique data into f<i>
ingest() {
    local i
    for ((i = $1; i < $2; i++)); do
        log "ingest f$i ($FILE_GIB GiB, $(((i + 1) * FILE_GIB)) / $TOTAL_GIB GiB)"
        run fio --name="w$i" --filename="$MNT/f$i" --rw=write --bs=1M --size="${FILE_GIB}G" \
            --ioengine=psync --fallocate=none --refill_buffers=1 --randseed=$((7919 + i)) \
            --end_fsync=1 --output-format=terse --terse-version=3 >/dev/null
        SERIES+=("[$(((i + 1) * FILE_GIB)),$(status_kib VmRSS),$(status_kib VmHWM)]")
    done
}

# ---- run -----------------------------------------------------------------------------------

log "mkfs $STORE; mount on $MNT (gc_interval=0)"
run "$THINFS" mkfs "$STORE" >&2
mount_store
measure empty 0 0

NFILES=$((TOTAL_GIB / FILE_GIB))
NFIRST=$((FIRST_GIB / FILE_GIB))

t=$(now)
ingest 0 "$NFIRST"
measure "ingest_${FIRST_GIB}g" "$FIRST_GIB" "$(elapsed "$t")"

t=$(now)
ingest "$NFIRST" "$NFILES"
measure "ingest_${TOTAL_GIB}g" "$TOTAL_GIB" "$(elapsed "$t")"

files=$(for ((i = 0; i < NFILES; i++)); do printf '%s:' "$MNT/f$i"; done)
files=${files%:}
log "random 4 KiB overwrites: <= $OVERWRITE_GIB GiB or <= $OVERWRITE_SECS s (direct=$OVERWRITE_DIRECT)"
t=$(now)
ow_json=$(run fio --name=ow --filename="$files" --size="${TOTAL_GIB}G" --rw=randwrite --bs=4k \
    --ioengine=psync --fallocate=none --direct="$OVERWRITE_DIRECT" --file_service_type=random \
    --io_size="${OVERWRITE_GIB}G" --runtime="$OVERWRITE_SECS" --norandommap=1 --randrepeat=0 \
    --refill_buffers=1 --end_fsync=1 --output-format=json)
ow_bytes=$(jq '.jobs[0].write.io_bytes' <<<"$ow_json")
ow_iops=$(jq '.jobs[0].write.iops | floor' <<<"$ow_json")
measure overwrite "$TOTAL_GIB" "$(elapsed "$t")"
log "overwrote $((ow_bytes / 1048576)) MiB at $ow_iops IOPS"

log "thinfs gc --mount $MNT --json"
t=$(now)
gc_json=$(run "$THINFS" gc --mount "$MNT" --json | tail -n1)
measure gc "$TOTAL_GIB" "$(elapsed "$t")"

log "remount"
pid=$(daemon_pid)
t=$(now)
run umount "$MNT"
umount_s=$(elapsed "$t")
t=$(now)
wait_exit "$pid" 600 || die "daemon $pid did not exit within 600 s of umount"
exit_s=$(elapsed "$t")
t=$(now)
mount_store
mount_s=$(elapsed "$t")
measure remount "$TOTAL_GIB" "$mount_s"

# ---- report --------------------------------------------------------------------------------

pt() { printf '%s\n' "${POINTS[@]}" | jq -s -r --arg p "$1" ".[] | select(.point == \$p) | $2"; }
first="ingest_${FIRST_GIB}g"
total="ingest_${TOTAL_GIB}g"
rss_diff=$(($(pt "$total" .rss_bytes) - $(pt "$first" .rss_bytes)))
hwm_diff=$(($(pt "$total" .hwm_bytes) - $(pt "$first" .hwm_bytes)))
max_pct=$(printf '%s\n' "${POINTS[@]}" | jq -s '[.[] | select(.unique_gib > 0) | .meta_pct] | max')

mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo
echo "thinfs scale: $TOTAL_GIB GiB unique data, 16 KiB blocks, $(nproc) cores, $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo
echo "| point | unique GiB | VmRSS MiB | VmHWM MiB | du meta MiB | stats meta MiB | nodes in packs MiB | stored GiB | allocated GiB | packs GiB | garbage GiB | meta % | step s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${POINTS[@]}" | jq -r '
    def mib: . / 1048576 * 10 | round / 10;
    def gib: . / 1073741824 * 100 | round / 100;
    "| \(.point) | \(.unique_gib) | \(.rss_bytes|mib) | \(.hwm_bytes|mib) | \(.meta_du_bytes|mib) | \(.meta_bytes|mib) | \(.node_bytes|mib) | \(.stored_bytes|gib) | \(.allocated_bytes|gib) | \(.pack_bytes|gib) | \(.garbage_bytes|gib) | \(.meta_pct // "-") | \(.seconds) |"'
echo
echo "| result | value | target |"
echo "|---|---:|---|"
echo "| VmRSS ${TOTAL_GIB} GiB - ${FIRST_GIB} GiB | $(mib "$rss_diff") MiB | < 64 MiB |"
echo "| VmHWM ${TOTAL_GIB} GiB - ${FIRST_GIB} GiB | $(mib "$hwm_diff") MiB | < 64 MiB |"
echo "| max meta / live unique data | $max_pct % | <= 2 % |"
echo "| overwrites | $(mib "$ow_bytes") MiB, $ow_iops IOPS | |"
echo "| gc | $(pt gc .seconds) s | |"
echo "| umount / daemon exit / mount | $umount_s s / $exit_s s / $mount_s s | |"
echo "| VmRSS MiB by GiB ingested (GiB:MiB) | $(printf '%s\n' "${SERIES[@]}" | jq -s -r 'map("\(.[0]):\(.[1] / 1024 | floor)") | join(" ")') | |"
echo
printf '%s\n' "${POINTS[@]}"
jq -c -n --argjson total "$TOTAL_GIB" --argjson first "$FIRST_GIB" \
    --argjson rss_diff "$rss_diff" --argjson hwm_diff "$hwm_diff" --argjson max_pct "$max_pct" \
    --argjson ow_bytes "$ow_bytes" --argjson ow_iops "$ow_iops" --argjson gc "$gc_json" \
    --argjson umount_s "$umount_s" --argjson exit_s "$exit_s" --argjson mount_s "$mount_s" \
    --argjson series "[$(IFS=,; echo "${SERIES[*]}")]" \
    '{summary: "scale", total_gib: $total, first_gib: $first,
      rss_diff_bytes: $rss_diff, hwm_diff_bytes: $hwm_diff,
      rss_ok: ($rss_diff < 64 * 1048576), max_meta_pct: $max_pct, meta_ok: ($max_pct <= 2),
      overwrite_bytes: $ow_bytes, overwrite_iops: $ow_iops, gc: $gc,
      umount_s: $umount_s, daemon_exit_s: $exit_s, mount_s: $mount_s,
      rss_series_gib_rsskib_hwmkib: $series}'

exit 0
}
