#!/bin/bash
# dracut module: impermanence_boot.py run by a systemd unit of the initrd
# (impermanence-boot.service), after /sysroot is mounted and before
# switch-root.
#
# Settings (dracut.conf.d, or the environment in upper case,
# IMPERMANENCE_SCRIPT, ...):
#   impermanence_script   the script      (/usr/lib/impermanence-boot/impermanence_boot.py)
#   impermanence_files    its file lister (/usr/lib/impermanence-boot/initramfs-files)
#   impermanence_config   the JSON config (/etc/impermanence.json)
#   impermanence_python   the interpreter (python3)
#   impermanence_emergency_on_error=yes   exit 2 or 3 starts emergency.target

_impermanence_settings() {
    imp_script=${impermanence_script:-${IMPERMANENCE_SCRIPT:-/usr/lib/impermanence-boot/impermanence_boot.py}}
    imp_files=${impermanence_files:-${IMPERMANENCE_FILES:-/usr/lib/impermanence-boot/initramfs-files}}
    imp_config=${impermanence_config:-${IMPERMANENCE_CONFIG:-/etc/impermanence.json}}
    imp_python=${impermanence_python:-${IMPERMANENCE_PYTHON:-python3}}
    imp_emergency=${impermanence_emergency_on_error:-${IMPERMANENCE_EMERGENCY_ON_ERROR:-no}}
}

# A shared library: dracut-ng (Debian 13's dracut 106) has no inst_library;
# its inst installs a library as any other file.
_impermanence_inst_lib() {
    if declare -F inst_library >/dev/null; then
        inst_library "$1"
    else
        inst "$1"
    fi
}

# The device unit of the config's "root" device (rotate-root), empty without
# one: the /dev/disk/by-* link udev makes for LABEL=, UUID=, PARTUUID=,
# PARTLABEL= (udev's encoding of other characters), as systemd names it.
_impermanence_root_device_unit() {
    local path
    path=$("$1" -I -S -c '
import json, sys
root = json.load(open(sys.argv[1], encoding="utf-8")).get("root")
if isinstance(root, dict):
    spec = root["device"]
    tag, sep, value = spec.partition("=")
    links = {"LABEL": "by-label", "UUID": "by-uuid", "PARTUUID": "by-partuuid",
             "PARTLABEL": "by-partlabel"}
    if sep and tag in links:
        ok = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+.:=@_-"
        value = "".join(c if c in ok else "\\x%02x" % ord(c) for c in value)
        spec = "/dev/disk/%s/%s" % (links[tag], value)
    print(spec)
' "$2") || return 1
    [[ -z $path ]] || systemd-escape -p --suffix=device "$path"
}

_impermanence_libs() {
    local lib
    for lib in $(ldd "$1" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p'); do
        _impermanence_inst_lib "$lib" || return 1
    done
}

check() {
    _impermanence_settings
    require_binaries "$imp_python" || return 1
    [[ -f $imp_script && -f $imp_files && -f $imp_config ]] || return 1
    return 0
}

depends() {
    echo systemd
}

install() {
    local python tmp kind src dest device_unit units unit interpreter=
    _impermanence_settings
    python=$(command -v "$imp_python") || { derror "impermanence: no $imp_python"; return 1; }
    # A config mistake fails the build, not the boot.
    if ! "$python" -I -S "$imp_script" --config "$imp_config" check >/dev/null; then
        derror "impermanence: $imp_config is not a valid configuration"
        return 1
    fi
    tmp=$(mktemp -d "${DRACUT_TMPDIR:-/tmp}/impermanence.XXXXXX") || return 1
    if ! "$python" -I "$imp_files" "$imp_script" "$tmp" > "$tmp/list"; then
        derror "impermanence: $imp_files failed"
        rm -rf "$tmp"
        return 1
    fi
    while read -r kind src dest; do
        case $kind in
            bin) inst_binary "$src" && interpreter=$src ;;
            # dracut resolves the libraries of executables only; an
            # extension module is not one.
            lib) _impermanence_inst_lib "$src" && _impermanence_libs "$src" ;;
            file) inst_simple "$src" "$dest" ;;
        esac || { derror "impermanence: cannot install $src"; rm -rf "$tmp"; return 1; }
    done < "$tmp/list"
    inst_simple "$imp_config" /etc/impermanence.json
    sed "s|@PYTHON@|$interpreter|" "$moddir/impermanence-boot.service" > "$tmp/impermanence-boot.service"
    inst_simple "$tmp/impermanence-boot.service" "$systemdsystemunitdir/impermanence-boot.service"
    mkdir -p "$initdir$systemdsystemunitdir/initrd.target.wants"
    ln_r "$systemdsystemunitdir/impermanence-boot.service" \
        "$systemdsystemunitdir/initrd.target.wants/impermanence-boot.service"
    device_unit=$(_impermanence_root_device_unit "$python" "$imp_config") \
        || { derror "impermanence: cannot read the root device of $imp_config"; rm -rf "$tmp"; return 1; }
    units=impermanence-boot.service
    if [[ $device_unit ]]; then
        # The config's "root": rotate-root before the root is mounted.
        units+=" impermanence-rotate-root.service"
        # (sed reads \x2d in a replacement as a character: backslashes doubled)
        sed -e "s|@PYTHON@|$interpreter|" -e "s|@DEVICE@|${device_unit//\\/\\\\}|g" \
            "$moddir/impermanence-rotate-root.service" > "$tmp/impermanence-rotate-root.service"
        inst_simple "$tmp/impermanence-rotate-root.service" \
            "$systemdsystemunitdir/impermanence-rotate-root.service"
        ln_r "$systemdsystemunitdir/impermanence-rotate-root.service" \
            "$systemdsystemunitdir/initrd.target.wants/impermanence-rotate-root.service"
    fi
    if [[ $imp_emergency == yes ]]; then
        cat "$moddir/emergency-on-error.conf" > "$tmp/emergency-on-error.conf"
        for unit in $units; do
            inst_simple "$tmp/emergency-on-error.conf" \
                "$systemdsystemunitdir/$unit.d/emergency-on-error.conf"
        done
    fi
    rm -rf "$tmp"
}
