# minbase.sh, sourced by tests/releases/build.sh and vm/full_os_guest/base.sh:
#   minbase TREE RELEASE DEBS PACKAGE...
# installs Debian RELEASE into the directory TREE (debootstrap
# --variant=minbase from Debian's archive, the downloaded packages kept in
# DEBS for the next build), then PACKAGE... with apt-get inside it, which
# resolves virtual packages where debootstrap's --include does not. No
# service is started (policy-rc.d, which the caller removes when done).
# /proc and DEBS stay mounted in TREE: the caller unmounts them. in_root
# CMD... runs a command in TREE with a clean environment.
minbase() {
    minbase_tree=$1
    local release=$2 debs=$3
    shift 3
    debootstrap --variant=minbase --cache-dir="$debs" "$release" "$minbase_tree" http://deb.debian.org/debian
    mount -t proc proc "$minbase_tree/proc"
    mount --bind "$debs" "$minbase_tree/var/cache/apt/archives"  # (so no apt-get clean)
    printf '#!/bin/sh\nexit 101\n' > "$minbase_tree/usr/sbin/policy-rc.d"  # start no services
    chmod 755 "$minbase_tree/usr/sbin/policy-rc.d"
    in_root apt-get update -q
    in_root apt-get install -y -q --no-install-recommends "$@"
}

in_root() {
    chroot "$minbase_tree" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}
