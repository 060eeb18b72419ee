#!/usr/bin/env bash
# The demo: on a fresh Debian machine, as root,
#
#     ./vm/demo.sh   # as root
#
# installs what it needs (tests/setup.sh), builds the initramfs, boots the
# demo machine twice under QEMU on one persistent disk and prints what was
# kept, an owner/mode table and the script's time at boot. Build outputs go
# to vm/build/ (git-ignored). IMPERMANENCE_VM_KVM=1 uses KVM instead of TCG.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/../tests/setup.sh"
exec /usr/bin/python3.11 -I "$HERE/demo.py" "$@"
