#!/usr/bin/env bash
# The one test command for thinfs, locally and in CI: `sudo bash scripts/test.sh`.
#
# Installs the system tools the integration tests drive (fuse3, rsync, attr, ...),
# then runs the gate in order: rustfmt check, clippy with warnings denied, and every
# unit, property and integration test through cargo-nextest. Exits non-zero on the
# first failing stage (the test stage runs all tests before failing).
#
# Integration tests really mount thinfs, so this must run as root on a machine with
# /dev/fuse. PROPTEST_CASES defaults to 64 to keep the suite short; set it higher
# for a longer soak.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests need, with one command each that proves it is installed.
PACKAGES=(fuse3 rsync attr xfsprogs e2fsprogs mount qemu-utils)
need_apt=0
for cmd in fusermount3 mount.fuse3 rsync getfattr setfattr mkfs.xfs mkfs.ext4 losetup qemu-img; do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        need_apt=1
    fi
done
if [ "$need_apt" -eq 1 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: missing system packages (${PACKAGES[*]}); run as root: sudo bash scripts/test.sh" >&2
        exit 1
    fi
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o Acquire::Retries=3 update -qq
    apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

if [ ! -e /dev/fuse ]; then
    echo "test.sh: /dev/fuse is missing; the integration tests need FUSE" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the integration tests mount filesystems and must run as root" >&2
    exit 1
fi

export PROPTEST_CASES="${PROPTEST_CASES:-64}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log "cargo fmt --all --check"
cargo fmt --all --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

log "cargo nextest run (PROPTEST_CASES=$PROPTEST_CASES)"
cargo nextest run --no-fail-fast

log "all checks passed"
