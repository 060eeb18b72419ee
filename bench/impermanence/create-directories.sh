#!/usr/bin/env bash
# One step of NixOS impermanence's directory creation, for the benchmark's
# "impermanence" contender: the work its create-directories.bash does in one
# call, one bash process per directory. The driver (bench/bench.py,
# impermanence_text) calls it for every directory, parents before children.
#
#   create-directories.sh ROOT STORAGE DIR UID GID MODE
#
# Storage side ROOT/STORAGE/DIR: made with MODE and UID:GID if missing.
# Root side ROOT/DIR (only when STORAGE is not empty): made if missing, then
# given the owner and mode of its storage counterpart. ROOT stands for the
# root the booted system will see: the benchmark runs beside it, not in it.
set -o nounset -o errexit -o pipefail -o noglob
shopt -s inherit_errexit
trap 'printf "create-directories.sh: %s failed (line %d)\n" "$BASH_COMMAND" "$LINENO" >&2' ERR

if (( $# != 6 )); then
    echo "usage: create-directories.sh ROOT STORAGE DIR UID GID MODE" >&2
    exit 2
fi
root=$1 storage=$2 dir=$3 uid=$4 gid=$5 mode=$6

# As the original, the storage path is resolved first (one realpath process).
source_dir=$(realpath -m -- "$root$storage$dir")
if [[ ! -d $source_dir ]]; then
    mkdir --mode="$mode" -- "$source_dir"
    chown -- "$uid:$gid" "$source_dir"
fi

if [[ -n $storage ]]; then
    target=$root$dir
    [[ -d $target ]] || mkdir -- "$target"
    # The original copies owner and mode at every call, existing or not. On
    # the benchmark's fresh roots a directory exists only once its own call
    # made it (every path is called once), so this gives what apply does:
    # owner and mode set only on directories it creates.
    chown --reference="$source_dir" -- "$target"
    chmod --reference="$source_dir" -- "$target"
fi
