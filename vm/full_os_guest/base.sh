#!/usr/bin/env bash
# base.sh RELEASE IMAGE: the full-OS vehicle's root disk (vm/full_os.py), a
# btrfs filesystem labelled `vehicle` whose subvolume `blank` holds a
# Debian RELEASE installed by debootstrap --variant=minbase plus systemd as
# init; rotate-root makes the booted root a snapshot of it at every boot.
# Built beside IMAGE and renamed into place at the end. Run it in a private
# mount namespace (vm/full_os.py does).
set -euo pipefail
release=$1 image=$2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
packages=$(sed 's/#.*//' "$here/packages" | xargs)
cache=$(dirname "$image")
debs="$cache/debs/$release"  # the downloaded packages, for the next build
mkdir -p "$debs"
tmp=$(mktemp -d "$image.partial.XXXXXX")
tree="$tmp/tree"
cleanup() {
    umount -R -l "$tree/proc" "$tree/var/cache/apt/archives" "$tmp/mnt" 2>/dev/null || true
    rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
mkdir "$tree"
chmod 755 "$tree"
# shellcheck source=../minbase.sh
. "$here/../minbase.sh"
# shellcheck disable=SC2086
minbase "$tree" "$release" "$debs" $packages
rm "$tree/usr/sbin/policy-rc.d"
in_root useradd --create-home --uid 1000 --user-group --shell /bin/bash alice
echo vehicle > "$tree/etc/hostname"
printf 'LANG=C.UTF-8\n' > "$tree/etc/default/locale"
# The installed OS has no machine id: the first boot makes one (in
# storage, through the kept /etc/machine-id).
rm -f "$tree/etc/machine-id" "$tree/var/lib/dbus/machine-id"
# No login prompt on the console: the checker unit drives the boot.
in_root systemctl mask serial-getty@ttyS0.service getty@tty1.service
umount "$tree/proc" "$tree/var/cache/apt/archives"
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin
# The disk: its size is what the tree needs, with room for three roots'
# changes (btrfs shares the snapshots' unchanged blocks).
size_mb=$(( $(du -sm --apparent-size "$tree" | cut -f1) * 2 + 512 ))
truncate -s "${size_mb}M" "$tmp/disk.img"
mkfs.btrfs -q -L vehicle "$tmp/disk.img"
mkdir "$tmp/mnt"
mount -o loop "$tmp/disk.img" "$tmp/mnt"
btrfs -q subvolume create "$tmp/mnt/blank"
cp -a "$tree/." "$tmp/mnt/blank/"
umount "$tmp/mnt"
mv -T "$tmp/disk.img" "$image"
