#!/usr/bin/env bash
# The main job on a default store: build thinfs, make a store, mount it, put a "golden"
# VM on it, clone it into several VMs, snapshot, show the space figures, unmount.
#   sudo bash scripts/demo.sh [STORE] [MOUNTPOINT]
# Defaults: /var/lib/thinfs/store and /mnt/vms. A store that exists is reused.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STORE=${1:-/var/lib/thinfs/store}
MNT=${2:-/mnt/vms}
log() { printf '\n==> %s\n' "$*"; }

if ! command -v qemu-img >/dev/null || ! command -v fusermount3 >/dev/null; then
    log "installing fuse3 and qemu-utils"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends fuse3 qemu-utils >/dev/null
fi

log "building thinfs (release)"
cargo build --release --quiet
install -m 0755 target/release/thinfs /usr/local/bin/thinfs
THINFS=/usr/local/bin/thinfs

if [ ! -f "$STORE/thinfs.toml" ]; then
    log "thinfs mkfs $STORE"
    $THINFS mkfs "$STORE"
fi
mkdir -p "$MNT"
if ! findmnt -t fuse.thinfs "$MNT" >/dev/null; then
    log "thinfs mount $STORE $MNT"
    $THINFS mount "$STORE" "$MNT" -o allow_other
fi
trap 'umount "$MNT" 2>/dev/null || true' EXIT
findmnt -t fuse.thinfs "$MNT"

run=demo-$(date +%s)
log "a golden VM: a 1 GiB raw disk with 256 MiB of data, a qcow2 disk, a config"
mkdir -p "$MNT/$run/golden"
qemu-img create -q -f raw "$MNT/$run/golden/disk.raw" 1G
dd if=/dev/urandom of="$MNT/$run/golden/disk.raw" bs=1M count=256 conv=notrunc,fsync status=none
qemu-img create -q -f qcow2 "$MNT/$run/golden/data.qcow2" 20G
echo "name=golden memory=2048" > "$MNT/$run/golden/vm.conf"
$THINFS stats "$MNT"

log "10 thin clones of the whole VM directory"
start=$(date +%s%N)
for i in $(seq -w 1 10); do
    $THINFS clone "$MNT/$run/golden" "$MNT/$run/vm-$i"
done
echo "10 clones in $(( ($(date +%s%N) - start) / 1000000 )) ms"
echo "name=vm-03 memory=4096" > "$MNT/$run/vm-03/vm.conf"
dd if=/dev/urandom of="$MNT/$run/vm-03/disk.raw" bs=4k count=256 seek=1000 conv=notrunc status=none
cmp -s "$MNT/$run/golden/disk.raw" "$MNT/$run/vm-01/disk.raw" && echo "vm-01 reads the golden bytes"
cmp -s "$MNT/$run/golden/disk.raw" "$MNT/$run/vm-03/disk.raw" || echo "vm-03 has its own changes; golden is untouched"
qemu-img map --output=human "$MNT/$run/vm-01/disk.raw" | head -5
$THINFS du "$MNT/$run/vm-03"

log "a snapshot of the whole datastore, readable as plain files"
$THINFS snapshot create "$run" --mount "$MNT"
ls -la "$MNT/.snapshots/$run/$run/golden"
$THINFS snapshot list --mount "$MNT"

log "space: 11 VMs of 1 GiB logical each"
$THINFS stats "$MNT"
log "done: $MNT stays usable; unmounting now (umount flushes and the daemon exits 0)"
