"""The per-entry shell approach for a config, for the test machine's stage 1
(vm/guest/init runs it after the script, on its own root /mnt-shell).

The script is made by bench/bench_boot.py's generator (entries_from_config +
shell_text), the one the host benchmark times: no second generator. In the
initramfs there is no bash and no coreutils: the generated script is plain
POSIX sh run by busybox sh; busybox's chown/chmod have no --reference, so the
root-side directory step reads the storage directory's owner and mode with
busybox stat instead (busybox=True); `mount --bind` is busybox mount's
equivalent of util-linux's (`--bind` is taken as `-o bind`).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "bench"))
import bench_boot  # noqa: E402

ROOT = "/mnt-shell"  # its root in stage 1; moved to /run/shell-root before switch_root
INSPECT_ROOT = "/run/shell-root"  # where stage 2 finds it


def script(config: dict) -> str:
    return bench_boot.shell_text(ROOT, bench_boot.entries_from_config(config), busybox=True)


def storage_mount(config: dict) -> str:
    """"FSTYPE OPTIONS" for stage 1's mount of the storage copy: what the
    config's fileSystems entry for the storage path says (stage 1 mounts it,
    as NixOS does for a neededForBoot filesystem, before the script runs)."""
    fs = config.get("fileSystems", {}).get(bench_boot.STORAGE, {})
    opts = fs.get("options", [])
    if isinstance(opts, str):
        opts = [o for o in opts.split(",") if o]
    fstype = fs.get("fsType", "auto")
    return f"{fstype if fstype != 'auto' else 'ext4'} {','.join(opts) or 'defaults'}\n"


def command_count(text: str) -> int:
    """Lines of the generated script that call a step (sd, td, bd, bf, lf)."""
    return sum(1 for line in text.splitlines() if line[:3] in ("sd ", "td ", "bd ", "bf ", "lf "))
