#!/usr/bin/env bash
# The demo: on a fresh Debian machine, as root,
#
#     ./vm/demo.sh   # as root
#
# installs what the demo needs (tests/setup.sh --demo: QEMU, Debian's kernel,
# busybox-static, python3-minimal, e2fsprogs), builds the initramfs, boots the
# demo machine twice under QEMU on one persistent disk and prints what was
# kept, an owner/mode table and the script's time at boot. Build outputs go
# to vm/build/ (git-ignored). IMPERMANENCE_VM_KVM=1 uses KVM instead of TCG;
# IMPERMANENCE_PYTHON picks another interpreter for the initramfs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/../tests/setup.sh" --demo
# -E -s, not -I: -I also leaves demo.py's directory off sys.path, where
# its sibling modules are.
exec /usr/bin/python3 -E -s "$HERE/demo.py" "$@"
