#!/usr/bin/env bash
# build.sh RELEASE DEST: a Debian RELEASE chroot at DEST (debootstrap
# --variant=minbase from Debian's archive, then apt-get, which resolves
# virtual packages where debootstrap's --include does not), with a venv
# holding pytest and hypothesis at /opt/impermanence-venv. Built in a
# temporary directory beside DEST and renamed at the end, so an interrupted
# build never leaves a DEST behind. Run it in a private mount namespace
# (chroots.py does).
set -euo pipefail
release=$1 dest=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
packages=$(cat "$here/common.packages" "$here/$release.packages" | sed 's/#.*//' | xargs)
mkdir -p "$(dirname "$dest")"
# The downloaded packages are kept for the next build of the release.
debs="$(dirname "$dest")/debs/$release"
mkdir -p "$debs"
tmp=$(mktemp -d "$dest.partial.XXXXXX")
chmod 755 "$tmp"  # the tree's /, which mktemp makes 0700: other users run programs in it too
unmount() { umount -R -l "$tmp/proc" "$tmp/var/cache/apt/archives" 2>/dev/null || true; }
# On failure, debootstrap's log is kept beside DEST.
trap 'cp "$tmp/debootstrap/debootstrap.log" "$dest.failed.log" 2>/dev/null
      unmount; rm -rf --one-file-system "$tmp"' EXIT
# shellcheck source=../../vm/minbase.sh
. "$here/../../vm/minbase.sh"
# shellcheck disable=SC2086
minbase "$tmp" "$release" "$debs" $packages
in_root python3 -m venv /opt/impermanence-venv
# pip trusts what this machine trusts (a proxy's certificate authority too).
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
cp "$host_ca" "$tmp/tmp/host-ca.crt"
in_root PIP_CERT=/tmp/host-ca.crt /opt/impermanence-venv/bin/pip install -q \
    --disable-pip-version-check pytest hypothesis
rm "$tmp/tmp/host-ca.crt"
in_root /opt/impermanence-venv/bin/python -c 'import pytest, hypothesis'
rm "$tmp/usr/sbin/policy-rc.d"
unmount
mv -T "$tmp" "$dest"
trap - EXIT
