#!/usr/bin/env bash
# Shared by tests/run.sh and vm/demo.sh: install, on a fresh Debian machine,
# every system package and the Python test tools the project needs.
# Idempotent: packages already present are not fetched again.
set -euo pipefail

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PROJECT_DIR

APT_PACKAGES=(
    python3 python3-venv python3.11-minimal libffi8
    qemu-system-x86 linux-image-amd64 busybox-static kmod
    e2fsprogs btrfs-progs xfsprogs dosfstools fdisk util-linux
    cpio zstd xz-utils strace debootstrap
    nix-bin
    gcc libc6-dev
    dracut-core initramfs-tools systemd
)

ensure_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
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
ensure_apt_packages
ensure_venv
