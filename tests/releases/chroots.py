"""Debian chroots for the release matrix, built once per machine.

A release's chroot lives at CACHE/<release>-<hash>, the hash taken over
build.sh, vm/minbase.sh and the release's package lists: a change to any makes a new
chroot, an unchanged one is reused. build.sh builds in a temporary
directory and renames it into place, so only a finished chroot carries the
final name; a lock keeps two runs from building the same one at once."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("IMPERMANENCE_CHROOT_CACHE", "/var/cache/impermanence-boot/chroots"))
RELEASES = ("bullseye", "trixie")
# Where build.sh puts the test tools inside every chroot.
VENV_PYTHON = "/opt/impermanence-venv/bin/python"


def inputs(release: str) -> list[Path]:
    return [HERE / "build.sh", HERE.parent.parent / "vm" / "minbase.sh", HERE / "common.packages",
            HERE / f"{release}.packages"]


def path(release: str) -> Path:
    digest = hashlib.sha256()
    for f in inputs(release):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return CACHE / f"{release}-{digest.hexdigest()[:12]}"


def ensure(release: str, log=sys.stderr) -> tuple[Path, float | None]:
    """The release's chroot, and the seconds spent building it (None: cached)."""
    dest = path(release)
    if dest.is_dir():
        return dest, None
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{release}.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():  # built by another run while this one waited
            return dest, None
        for stale in CACHE.glob(f"{release}-*.partial.*"):  # a killed build's, under the lock
            subprocess.run(["umount", "-R", "-l", str(stale / "proc")], stderr=subprocess.DEVNULL)
            shutil.rmtree(stale, ignore_errors=True)
        print(f"releases: building the {release} chroot at {dest}", file=log, flush=True)
        start = time.monotonic()
        subprocess.run(["unshare", "--mount", "--propagation", "private",
                        str(HERE / "build.sh"), release, str(dest)], check=True,
                       stdout=log, stderr=log)
        seconds = time.monotonic() - start
        print(f"releases: built the {release} chroot in {seconds:.0f} s", file=log, flush=True)
        return dest, seconds


if __name__ == "__main__":
    for r in sys.argv[1:] or RELEASES:
        print(ensure(r))
