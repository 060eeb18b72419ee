#!/usr/bin/env bash
# Shared by tests/run.sh and vm/demo.sh: install, on a fresh Debian machine
# (12 or 13), what the project needs. Sourced as
#
#     . tests/setup.sh          # the whole test suite's world (and a pytest venv)
#     . tests/setup.sh --demo   # only what vm/demo.sh uses
#
# Idempotent: packages already present are not fetched again. Never a
# versioned package name: the interpreter is the distribution's python3.
# Waits (bounded) for another apt or dpkg to finish instead of failing.
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PROJECT_DIR

# The demo: QEMU, Debian's kernel, busybox, the interpreter (with ctypes),
# e2fsprogs and util-linux for the disk, kmod for the module list.
APT_DEMO=(
    python3 python3-minimal
    qemu-system-x86 linux-image-amd64 busybox-static kmod
    e2fsprogs fdisk util-linux
)
# The test suite, beyond the demo. dracut-core and initramfs-tools are the
# builders the dist/ tests drive; installing them makes Debian regenerate
# this machine's own initramfs once (a trigger of the kernel package).
APT_TESTS=(
    python3-venv git
    btrfs-progs xfsprogs dosfstools
    cpio zstd xz-utils strace faketime debootstrap
    fuse2fs libcap2-bin
    nix-bin
    gcc libc6-dev
    dracut-core initramfs-tools systemd
)
APT_LOCK_WAIT=${APT_LOCK_WAIT:-600}  # seconds

apt_retry() {
    # apt-get, retried while another apt/dpkg holds its lock (bounded).
    local deadline=$((SECONDS + APT_LOCK_WAIT)) out
    while :; do
        if out=$("$@" 2>&1); then
            printf '%s\n' "$out" | tail -n 3 >&2
            return 0
        fi
        if ! grep -q "Could not get lock\|Unable to lock\|is another process using it" <<<"$out" \
                || [ $SECONDS -ge $deadline ]; then
            printf '%s\n' "$out" >&2
            return 1
        fi
        echo "setup: apt is busy (another apt or dpkg runs); waiting" >&2
        sleep 5
    done
}

ensure_apt_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        apt_retry apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt_retry apt-get install -y --no-install-recommends \
            -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "${missing[@]}"
    fi
}

ensure_venv() {
    local venv="$PROJECT_DIR/.venv"
    if ! "$venv/bin/python" -c 'import pytest, hypothesis' 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check pytest hypothesis
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (real mounts, loop devices, chown)" >&2
    exit 2
fi
if [ "${1:-}" = "--demo" ]; then
    ensure_apt_packages "${APT_DEMO[@]}"
else
    ensure_apt_packages "${APT_DEMO[@]}" "${APT_TESTS[@]}"
    ensure_venv
fi
