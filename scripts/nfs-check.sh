#!/usr/bin/env bash
# Re-export a thinfs mount over NFSv3 with NFS-Ganesha and check it with the
# libnfs-utils client, the way a hypervisor (ESXi, a KVM host with an NFS
# datastore) would reach it. Run as root:
#
#     sudo bash scripts/nfs-check.sh            # set up, check, tear down
#     sudo bash scripts/nfs-check.sh --keep     # leave it running until Ctrl-C
#
# The kernel here has no NFS server or client, so: rpcbind + ganesha.nfsd
# (FSAL VFS) on 127.0.0.1, NFSv3 only, non-standard ports (NFS 12049, MOUNT
# 12048) so a host NFS service is left alone; the client is nfs-cp/nfs-cat/nfs-ls
# with URLs nfs://127.0.0.1/<mountpoint>/<path>?version=3&nfsport=12049&mountport=12048.
# The same setup, with file-handle checks across drop_caches and a remount, is
# automated in tests/nfs.rs (`cargo test --test nfs`).
#
# Environment: THINFS (binary; default: cargo build --release), WORK (scratch
# dir; default: a new one under /var/tmp).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
NFS_PORT=12049
MNT_PORT=12048

log() { printf '==> %s\n' "$*"; }
die() { printf 'nfs-check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -e /dev/fuse ] || die "/dev/fuse is missing"

# --- packages -------------------------------------------------------------
need=0
for c in ganesha.nfsd rpcbind nfs-cp nfs-ls nfs-cat mount.fuse3; do
    command -v "$c" >/dev/null 2>&1 || need=1
done
[ -e /usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so ] || need=1
if [ "$need" -eq 1 ]; then
    log "installing nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils fuse3"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o Acquire::Retries=3 update -qq
    apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends \
        nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils fuse3 >/dev/null
fi

# --- thinfs ---------------------------------------------------------------
if [ -z "${THINFS:-}" ]; then
    log "building thinfs (release)"
    nice cargo build --release --quiet
    THINFS="$PWD/target/release/thinfs"
fi
WORK="${WORK:-$(mktemp -d /var/tmp/thinfs-nfs-check.XXXXXX)}"
chmod 755 "$WORK"
STORE="$WORK/store"
MNT="$WORK/mnt"
mkdir -p "$MNT"

RPCBIND_PID=""
GANESHA_PID=""
cleanup() {
    set +e
    if [ -n "$GANESHA_PID" ]; then
        kill "$GANESHA_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$GANESHA_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GANESHA_PID" 2>/dev/null
        wait "$GANESHA_PID" 2>/dev/null
    fi
    [ -n "$RPCBIND_PID" ] && { kill "$RPCBIND_PID" 2>/dev/null; wait "$RPCBIND_PID" 2>/dev/null; }
    if mountpoint -q "$MNT"; then
        umount "$MNT" || umount -l "$MNT"
    fi
    log "logs kept in $WORK (ganesha.log, thinfs.log in the store)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "mkfs + mount $STORE on $MNT (-o allow_other)"
"$THINFS" mkfs "$STORE" >/dev/null
"$THINFS" mount "$STORE" "$MNT" -o allow_other

if ! (exec 3<>/dev/tcp/127.0.0.1/111) 2>/dev/null; then
    # `rpcbind -h 127.0.0.1` crashes on Debian 12: run it plain, in the foreground.
    rpcbind -f &
    RPCBIND_PID=$!
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/111) 2>/dev/null && break; sleep 0.1; done
fi

cat >"$WORK/ganesha.conf" <<EOF
NFS_CORE_PARAM {
    Bind_addr = 127.0.0.1;
    NFS_Port = $NFS_PORT;
    MNT_Port = $MNT_PORT;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3;
    Plugins_Dir = /usr/lib/x86_64-linux-gnu/ganesha;
}
NFSv4 { Graceless = true; }
NFS_KRB5 { Active_krb5 = false; }
LOG { Default_Log_Level = EVENT; }
EXPORT {
    Export_Id = 1;
    Path = $MNT;
    Pseudo = $MNT;
    Access_Type = RW;
    Squash = No_Root_Squash;
    PrivilegedPort = false;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    # Ask the filesystem by handle on every GETATTR (no attribute cache).
    Attr_Expiration_Time = 0;
    # FUSE reports f_fsid 0 and st_dev changes across remounts: Major64 (major 0
    # for every FUSE mount) keeps client handles valid across a remount of the
    # store (one FUSE export per server; use Device to export several).
    FSAL { Name = VFS; fsid_type = Major64; }
}
EOF
log "starting ganesha.nfsd (NFSv3, 127.0.0.1:$NFS_PORT)"
ganesha.nfsd -F -f "$WORK/ganesha.conf" -L "$WORK/ganesha.log" -p "$WORK/ganesha.pid" \
    -N NIV_EVENT >"$WORK/ganesha.out" 2>&1 &
GANESHA_PID=$!

url() { printf 'nfs://127.0.0.1%s/%s?version=3&nfsport=%s&mountport=%s' "$MNT" "$1" "$NFS_PORT" "$MNT_PORT"; }
for i in $(seq 300); do
    nfs-ls "$(url '')" >/dev/null 2>&1 && break
    kill -0 "$GANESHA_PID" 2>/dev/null || { tail -20 "$WORK/ganesha.log"; die "ganesha exited"; }
    [ "$i" -eq 300 ] && { tail -20 "$WORK/ganesha.log"; die "ganesha not serving after 60 s"; }
    sleep 0.2
done

fail=0
check() { # name, command...
    local name=$1; shift
    if "$@" >>"$WORK/checks.out" 2>&1; then printf '  ok    %s\n' "$name"; else printf '  FAIL  %s\n' "$name"; fail=1; fi
}

log "checks"
head -c 5000003 /dev/urandom >"$WORK/in.bin"
check "nfs-cp local -> NFS" nfs-cp "$WORK/in.bin" "$(url in.bin)"
check "FUSE side sees the same bytes" cmp -s "$WORK/in.bin" "$MNT/in.bin"
head -c 3000007 /dev/urandom >"$MNT/out.bin"
check "nfs-cp NFS -> local" nfs-cp "$(url out.bin)" "$WORK/out.bin"
check "bytes read over NFS match" cmp -s "$MNT/out.bin" "$WORK/out.bin"
echo "hello from the FUSE side" >"$MNT/note.txt"
check "nfs-cat" test "$(nfs-cat "$(url note.txt)")" = "hello from the FUSE side"
mkdir "$MNT/dir" && touch "$MNT/dir/a" "$MNT/dir/b"
check "nfs-ls" test "$(nfs-ls "$(url dir)" | awk '{print $NF}' | grep -v '^\.' | sort | tr '\n' ' ')" = "a b "
sync; echo 2 >/proc/sys/vm/drop_caches
check "nfs-cat after drop_caches" test "$(nfs-cat "$(url note.txt)")" = "hello from the FUSE side"
check "nfs-ls after drop_caches" nfs-ls "$(url dir)"
"$THINFS" clone "$MNT/in.bin" "$MNT/in-clone.bin"
check "a thin clone reads back over NFS" sh -c "nfs-cat '$(url in-clone.bin)' | cmp -s - '$WORK/in.bin'"

if [ "$KEEP" -eq 1 ]; then
    log "serving $MNT at $(url '') until Ctrl-C"
    wait "$GANESHA_PID"
fi
[ "$fail" -eq 0 ] || die "some checks failed"
log "all NFS checks passed"
