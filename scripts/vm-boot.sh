#!/usr/bin/env bash
# Boot real guests from disk images on a thinfs mount, then clone and boot the
# clones: the hypervisor path end to end. Outside CI (it takes minutes). Root:
#
#     sudo bash scripts/vm-boot.sh [--clones N]
#
# 1. Fetches, once, into $VMDIR (default /var/tmp/thinfs-vm): Debian's
#    linux-image-cloud-amd64 kernel, busybox-static, and qemu-system-x86 with
#    the libraries the machine lacks (apt-get download + dpkg -x into a private
#    dir, run with LD_LIBRARY_PATH: `apt-get install qemu-system-x86` would
#    remove the backported qemu-utils). Builds a busybox initramfs whose /init
#    is scripts/vm/init.
# 2. mkfs + mount a thinfs store; makes an ext4 image on it with mkfs.ext4 -d.
# 3. Boots it (qemu-system-x86_64 -M microvm -accel tcg, virtio-blk with
#    cache=none and discard=unmap): the guest verifies the image's history,
#    writes its own file, records its checksum, writes+deletes scratch data,
#    runs fstrim, powers off.
# 4. `thinfs clone`s the image N times (default 3) and boots each clone; while
#    the first clone runs, a second writer (qemu-io) must be refused by QEMU's
#    image locking.
# 5. Verifies on the host (debugfs on each image, e2fsck -fn) that every image
#    holds exactly its own history, checks the checksums, prints space figures
#    and timings.
#
# Environment: THINFS (binary; default: cargo build --release), VMDIR (download
# cache), WORK (scratch dir, kept; default a new dir under /var/tmp, removed
# at the end unless KEEP=1).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
CLONES=3
while [ $# -gt 0 ]; do
    case "$1" in
        --clones) CLONES=$2; shift 2 ;;
        *) echo "usage: $0 [--clones N]" >&2; exit 2 ;;
    esac
done

log() { printf '==> %s\n' "$*"; }
die() { printf 'vm-boot: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
TIMINGS=()
timed() { # label, command...
    local label=$1; shift
    local t0; t0=$(now)
    "$@"
    local dt; dt=$(awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }')
    TIMINGS+=("$(printf '%-40s %8.2f s' "$label" "$dt")")
}

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -e /dev/fuse ] || die "/dev/fuse is missing"
export DEBIAN_FRONTEND=noninteractive
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v mount.fuse3 >/dev/null || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get -o Acquire::Retries=3 update -qq
    apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

VMDIR=${VMDIR:-/var/tmp/thinfs-vm}
DEBS=$VMDIR/debs
QROOT=$VMDIR/qemu-root
mkdir -p "$DEBS"
chmod 755 "$VMDIR" "$DEBS"

# --- 1. guest parts ---------------------------------------------------------
fetch() { # package names
    (cd "$DEBS" && apt-get -o Acquire::Retries=3 download -q "$@" >/dev/null 2>&1) || {
        apt-get -o Acquire::Retries=3 update -qq
        (cd "$DEBS" && apt-get -o Acquire::Retries=3 download -q "$@" >/dev/null)
    }
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

prepare_qemu() {
    local q=$QROOT/usr/bin/qemu-system-x86_64
    if [ -x "$q" ] && ! LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu ldd "$q" | grep -q 'not found'; then
        return
    fi
    log "fetching qemu-system-x86 and the libraries this machine lacks"
    local pkgs=(qemu-system-x86)
    local dep
    for dep in $(apt-cache depends qemu-system-x86 | awk '/^ *Depends:/ {print $2}' | grep -v '^<'); do
        installed "$dep" || pkgs+=("$dep")
    done
    fetch "${pkgs[@]}"
    rm -rf "$QROOT"
    mkdir -p "$QROOT"
    local p
    for p in "${pkgs[@]}"; do
        dpkg -x "$(ls -t "$DEBS"/"${p}"_*.deb | head -1)" "$QROOT"
    done
    if LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu ldd "$q" | grep 'not found'; then
        die "qemu-system-x86_64 still misses libraries"
    fi
}

prepare_kernel() {
    if [ -f "$VMDIR/vmlinuz" ] && [ -d "$VMDIR/modules" ]; then
        return
    fi
    local pkg
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64"
    log "fetching $pkg"
    fetch "$pkg"
    rm -rf "$VMDIR/kernel"
    dpkg -x "$(ls -t "$DEBS"/"${pkg}"_*.deb | head -1)" "$VMDIR/kernel"
    cp "$VMDIR"/kernel/boot/vmlinuz-* "$VMDIR/vmlinuz"
    mkdir -p "$VMDIR/modules"
    local m
    for m in virtio/virtio_ring virtio/virtio virtio/virtio_mmio block/virtio_blk; do
        cp "$VMDIR"/kernel/lib/modules/*/kernel/drivers/$m.ko "$VMDIR/modules/"
    done
}

prepare_initramfs() {
    if [ ! -x "$VMDIR/busybox/bin/busybox" ]; then
        log "fetching busybox-static"
        fetch busybox-static
        rm -rf "$VMDIR/busybox"
        dpkg -x "$(ls -t "$DEBS"/busybox-static_*.deb | head -1)" "$VMDIR/busybox"
    fi
    local bb=$VMDIR/busybox/bin/busybox
    local ir=$VMDIR/initramfs
    rm -rf "$ir"
    mkdir -p "$ir/bin" "$ir/lib/modules"
    cp "$bb" "$ir/bin/busybox"
    ln -s busybox "$ir/bin/sh"
    cp "$REPO/scripts/vm/init" "$ir/init"
    chmod 755 "$ir/init"
    cp "$VMDIR"/modules/*.ko "$ir/lib/modules/"
    (cd "$ir" && find . | "$bb" cpio -o -H newc 2>/dev/null | gzip -1 >"$VMDIR/initrd.gz")
}

timed "fetch/prepare qemu (cached after 1st)" prepare_qemu
timed "fetch/prepare kernel (cached)" prepare_kernel
timed "build initramfs" prepare_initramfs
QEMU=$QROOT/usr/bin/qemu-system-x86_64
export LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu
log "$("$QEMU" --version | head -1)"

# --- 2. store, mount, golden image -----------------------------------------
if [ -z "${THINFS:-}" ]; then
    log "building thinfs (release)"
    timed "cargo build --release" nice cargo build --release --quiet
    THINFS=$REPO/target/release/thinfs
fi
CREATED_WORK=0
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d /var/tmp/thinfs-vmboot.XXXXXX)
    CREATED_WORK=1
fi
mkdir -p "$WORK"
chmod 755 "$WORK"
STORE=$WORK/store
MNT=$WORK/mnt
mkdir -p "$MNT"
QEMU_PID=""
cleanup() {
    set +e
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null
    if mountpoint -q "$MNT"; then
        umount "$MNT" || { sleep 1; umount "$MNT"; } || umount -l "$MNT"
    fi
    if [ "$CREATED_WORK" = 1 ] && [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        log "kept $WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$THINFS" mkfs "$STORE" >/dev/null
"$THINFS" mount "$STORE" "$MNT" -o allow_other
GOLD=$MNT/golden.raw

make_golden() {
    local root=$WORK/rootfs
    mkdir -p "$root/etc"
    echo "thinfs vm-boot golden image" >"$root/etc/motd"
    head -c $((8 << 20)) /dev/urandom >"$root/payload.bin"
    (cd "$root" && sha256sum payload.bin | awk '{print "golden-payload", $1, $2}') >"$root/history"
    truncate -s 512M "$GOLD"
    mkfs.ext4 -q -F -L thinfs-vm -d "$root" "$GOLD"
}
timed "mkfs.ext4 -d (512 MiB image on thinfs)" make_golden

# --- 3./4. boots ----------------------------------------------------------
MHZ=$(awk -F: '/^cpu MHz/ {printf "%d", $2; exit}' /proc/cpuinfo)
KHZ=$((MHZ * 1000))

start_vm() { # image name hold
    local img=$1 name=$2 hold=$3
    "$QEMU" -L "$QROOT/usr/share/qemu" \
        -M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel tcg -cpu max -m 256 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -kernel "$VMDIR/vmlinuz" -initrd "$VMDIR/initrd.gz" \
        -append "console=ttyS0 reboot=t panic=-1 tsc_early_khz=$KHZ thinfs.name=$name thinfs.hold=$hold" \
        -drive "id=d0,if=none,format=raw,file=$img,cache=none,discard=unmap,aio=threads" \
        -device virtio-blk-device,drive=d0 \
        </dev/null >"$WORK/$name.console" 2>&1 &
    QEMU_PID=$!
}

wait_vm() { # name
    local name=$1 rc=0
    wait "$QEMU_PID" || rc=$?
    QEMU_PID=""
    local con=$WORK/$name.console
    if [ "$rc" -ne 0 ] || ! grep -q "THINFS-GUEST-DONE $name " "$con" || grep -q 'VERIFY-FAIL' "$con"; then
        tail -40 "$con" >&2
        die "boot of $name failed (qemu exit $rc); console above"
    fi
    grep -E 'VERIFY|trimmed|THINFS-GUEST|== guest' "$con" | tr -d '\r' | sed "s/^/    [$name] /"
}

ofd_lock_byte() { # file byte -> 0 if some OFD lock on the file covers byte
    # /proc/locks names files MAJOR:MINOR:INODE (hex device numbers).
    local dev key
    dev=$(stat -c %d "$1")
    key=$(printf '%02x:%02x:%s' $(((dev >> 8) & 0xfff)) $(((dev & 0xff) | ((dev >> 12) & 0xfff00))) "$(stat -c %i "$1")")
    awk -v key="$key" -v b="$2" '/OFDLCK/ {
        for (i = 1; i <= NF; i++) if ($i == key && $(i+1) <= b && $(i+2) >= b) f = 1
    } END { exit !f }' /proc/locks
}

boot() { # image name [hold]
    start_vm "$1" "$2" "${3:-0}"
    wait_vm "$2"
}

blocks_before=$(stat -c %b "$GOLD")
timed "boot golden" boot "$GOLD" golden
log "golden image: st_blocks $blocks_before -> $(stat -c %b "$GOLD") (the guest wrote 4 MiB + 16 MiB scratch, deleted and trimmed)"

for i in $(seq 1 "$CLONES"); do
    timed "thinfs clone golden -> clone$i" "$THINFS" clone "$GOLD" "$MNT/clone$i.raw"
done

# clone1 holds the VM up for a few seconds: a second writer must be refused.
lock_check() {
    local img=$MNT/clone1.raw
    start_vm "$img" clone1 4
    local t0; t0=$(now)
    until ofd_lock_byte "$img" 201; do
        kill -0 "$QEMU_PID" 2>/dev/null || die "clone1's VM exited before it locked its image"
        awk -v a="$(now)" -v b="$t0" 'BEGIN { exit !(a - b > 30) }' && die "clone1's VM never locked its image"
        sleep 0.05
    done
    local out rc=0
    out=$(qemu-io -f raw "$img" -c 'write 0 4k' 2>&1) || rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q 'Failed to get "write" lock' <<<"$out"; then
        die "a second writer was not refused while clone1 runs (rc $rc): $out"
    fi
    echo "    [lock] second writer refused while clone1 runs: $(head -1 <<<"$out")"
    wait_vm clone1
}
timed "boot clone1 (+4 s hold, lock check)" lock_check
for i in $(seq 2 "$CLONES"); do
    timed "boot clone$i" boot "$MNT/clone$i.raw" "clone$i"
done

# --- 5. verify on the host ------------------------------------------------
sync
verify_image() { # image, expected boot names (in order)
    local img=$1; shift
    local want="golden-payload $*"
    e2fsck -fn "$img" >"$WORK/fsck.out" 2>&1 || { cat "$WORK/fsck.out"; die "e2fsck -fn $img"; }
    local hist; hist=$(debugfs -R 'cat /history' "$img" 2>/dev/null)
    local names; names=$(awk '{print $1}' <<<"$hist" | tr '\n' ' ' | sed 's/ $//')
    [ "$names" = "$want" ] || die "$img: history is '$names', expected '$want'"
    local n sum f got
    while read -r n sum f; do
        got=$(debugfs -R "cat /$f" "$img" 2>/dev/null | sha256sum | cut -d' ' -f1)
        [ "$got" = "$sum" ] || die "$img: /$f has sha256 $got, history says $sum"
    done <<<"$hist"
    # The checksum the guest printed for its own file.
    local last=${*: -1}
    local printed; printed=$(tr -d '\r' <"$WORK/$last.console" | awk -v n="$last" '$1 == "THINFS-GUEST-DONE" && $2 == n {print $3}')
    [ "$printed" = "$(awk -v n="$last" '$1 == n {print $2}' <<<"$hist")" ] || die "$img: guest-printed checksum differs"
    # No file of another boot.
    local other
    for other in golden $(seq -f 'clone%g' 1 "$CLONES"); do
        if ! grep -qw "$other" <<<"$*"; then
            debugfs -R "stat /$other.bin" "$img" 2>&1 | grep -q 'File not found' || die "$img holds /$other.bin"
        fi
    done
    echo "    [verify] $(basename "$img"): history '$names', checksums ok, e2fsck clean"
}
verify_all() {
    verify_image "$GOLD" golden
    local i
    for i in $(seq 1 "$CLONES"); do
        verify_image "$MNT/clone$i.raw" golden "clone$i"
    done
}
timed "verify images (debugfs, e2fsck)" verify_all

log "space (thinfs du per image, then the store)"
for img in "$GOLD" "$MNT"/clone*.raw; do
    "$THINFS" du "$img" --json | tr -d '{}" ' | tr ',' '\n' | awk -F: -v n="$(basename "$img")" '
        { v[$1] = $2 / 1048576 }
        END { printf "    %-12s logical %7.1f MiB  stored %6.1f MiB  shared %6.1f MiB  exclusive %6.1f MiB\n",
              n, v["logical_bytes"], v["stored_bytes"], v["shared_bytes"], v["exclusive_bytes"] }'
done
"$THINFS" stats "$MNT" | sed 's/^/    /'

echo
echo "== vm-boot summary: golden + $CLONES clones booted from a thinfs mount (cache=none, discard=unmap), every image verified"
printf '    %s\n' "${TIMINGS[@]}"
