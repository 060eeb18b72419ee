#!/usr/bin/env bash
# One file of NixOS impermanence's sequence, for the benchmark's
# "impermanence" contender: the work its mount-file.bash does in one call,
# one bash process per file.
#
#   mount-file.sh ROOT FILE SOURCE METHOD
#
# FILE and SOURCE are paths as the booted system sees them (/etc/foo,
# /persistent/etc/foo), ROOT the directory that root is at for now. METHOD
# auto: bind-mount SOURCE onto FILE when SOURCE exists (an empty FILE made
# first), else link FILE to SOURCE; symlink: always the link.
set -o nounset -o errexit -o pipefail
shopt -s inherit_errexit
trap 'printf "mount-file.sh: %s failed (line %d)\n" "$BASH_COMMAND" "$LINENO" >&2' ERR

if (( $# != 4 )); then
    echo "usage: mount-file.sh ROOT FILE SOURCE METHOD" >&2
    exit 2
fi
root=$1 file=$2 source=$3 method=$4
mount_point=$root$file
source_path=$root$source

# The same checks, in the same order, as the original: already linked,
# already mounted (one findmnt process, which reads every mount there is),
# a non-empty file in the way; then bind, machine-id, or link.
if [[ -L $mount_point && $(readlink -- "$mount_point") == "$source" ]]; then
    exit 0
elif findmnt -- "$mount_point" >/dev/null; then
    exit 0
elif [[ -s $mount_point ]]; then
    echo "mount-file.sh: a file already exists at $mount_point" >&2
    exit 1
elif [[ $method == auto && -e $source_path ]]; then
    touch -- "$mount_point"
    mount -o bind -- "$source_path" "$mount_point"
elif [[ $method == auto && $file == /etc/machine-id ]]; then
    # systemd commits a real id into storage on the first boot
    echo uninitialized > "$source_path"
    touch -- "$mount_point"
    mount -o bind -- "$source_path" "$mount_point"
else
    ln -s -- "$source" "$mount_point"
fi
