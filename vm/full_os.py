"""The full-OS vehicle: a minimal Debian with systemd as stage 2, booted
under QEMU from a root that rotate-root makes fresh at every boot, with the
initramfs built by Debian's dracut (systemd initrd) with dist/dracut
(tests/boot/dist_support.py builds it) and Debian's kernel (this machine's).
QEMU runs with TCG; IMPERMANENCE_VM_KVM=1 opts into KVM (vm/machine.py).

Disks: the root (btrfs, LABEL=vehicle, subvolume `blank` holding the
installed OS, `root` the booted snapshot of it) and the persistent disk
(ext4, LABEL=persist). The guest's checker (full_os_guest/vehicle-check,
run by vehicle-check.service) reports on the second serial port, one line
`VEHICLE <json>`, acts the boot's part and powers off.

Cached under /var/cache/impermanence-boot/full-os (IMPERMANENCE_FULL_OS_CACHE),
each piece under a hash of its inputs:
- base-<release>-<hash>.img: debootstrap and the packages (full_os_guest/base.sh,
  full_os_guest/packages); minutes, built once;
- initrd-<hash>.img: dracut's image (the script, dist/, the config, the
  kernel version); seconds.
The product's files (the script, the config, dist/systemd's units) and the
checker are copied into `blank` of a per-run copy of the base image, so a
changed script rebuilds only the initramfs.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
GUEST = HERE / "full_os_guest"
CONFIG = GUEST / "impermanence.json"
CACHE = Path(os.environ.get("IMPERMANENCE_FULL_OS_CACHE", "/var/cache/impermanence-boot/full-os"))
# dracut's options beyond tests/boot/dist_support.py's: the root is btrfs.
DRACUT_CONF = 'force_drivers+=" btrfs "\n'
CMDLINE = ("root=LABEL=vehicle rootfstype=btrfs rootflags=subvol=root rw console=ttyS0 "
           "panic=-1 loglevel=4 rd.shell=0 rd.emergency=reboot systemd.show_status=1 "
           "rd.systemd.show_status=1 log_buf_len=4M")
REPORT_PREFIX = "VEHICLE "


def release() -> str:
    """This machine's Debian release (codename): the vehicle's is the same,
    so the host's dracut and kernel are that release's."""
    for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME")


def _digest(parts) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:12]


def base_path() -> Path:
    rel = release()
    inputs = [(p.name, p.read_bytes()) for p in (GUEST / "base.sh", GUEST / "packages", HERE / "minbase.sh")]
    return CACHE / f"base-{rel}-{_digest([('release', rel.encode()), *inputs])}.img"


def ensure_base(log=sys.stderr) -> tuple[Path, float | None]:
    """The base image, and the seconds spent building it (None: cached)."""
    dest = base_path()
    if dest.is_file():
        return dest, None
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".base.lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file():
            return dest, None
        for stale in CACHE.glob("base-*.partial.*"):  # a killed build's, under the lock
            subprocess.run(["umount", "-R", "-l", str(stale / "tree/proc")], stderr=subprocess.DEVNULL)
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        subprocess.run(["unshare", "--mount", "--propagation", "private",
                        str(GUEST / "base.sh"), release(), str(dest)], check=True,
                       stdout=log, stderr=log)
        return dest, time.monotonic() - start


# --- the initramfs: Debian's dracut with dist/dracut (tests/boot/dist_support.py) ------

def _dist_support():
    import dist_support  # tests/boot, on the path pyproject.toml gives the suite
    return dist_support


def initrd_path(kver: str) -> Path:
    ds = _dist_support()
    files = [PROJECT / "impermanence_boot.py", ds.FILES_HELPER, CONFIG,
             *sorted((ds.DIST / "dracut/90impermanence").iterdir())]
    dracut_version = Path("/usr/lib/dracut/dracut-version.sh")
    parts = [(str(p.relative_to(PROJECT)), p.read_bytes()) for p in files]
    parts += [("kver", kver.encode()), ("conf", DRACUT_CONF.encode()),
              ("modules", " ".join(ds.DRACUT_MODULES).encode()),
              ("python", ds.python().encode()),
              ("dracut", dracut_version.read_bytes() if dracut_version.exists() else b"")]
    return CACHE / f"initrd-{kver}-{_digest(parts)}.img"


def ensure_initrd(kver: str):
    """dist_support.Built for dracut's image (cached), and the seconds spent
    building it (None: cached)."""
    ds = _dist_support()
    dest = initrd_path(kver)
    if dest.is_file():
        return ds.Built("dracut", dest, kver, "", 0.0), None
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(f"{dest}.partial.{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        built = ds.build_dracut(work, kver, CONFIG, extra_conf=DRACUT_CONF)
        os.replace(built.image, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ds.Built("dracut", dest, kver, built.log, built.seconds), built.seconds


# --- the disks ------------------------------------------------------------------

# Copied into `blank` of the run's root disk: (source, path in the guest, mode).
def guest_files() -> list[tuple[Path, str, int]]:
    units = PROJECT / "dist/systemd"
    return [
        (PROJECT / "impermanence_boot.py", "/usr/lib/impermanence-boot/impermanence_boot.py", 0o755),
        (CONFIG, "/etc/impermanence.json", 0o644),
        (units / "impermanence-save.service", "/etc/systemd/system/impermanence-save.service", 0o644),
        (units / "impermanence-save-now.service", "/etc/systemd/system/impermanence-save-now.service", 0o644),
        (units / "impermanence-save.timer", "/etc/systemd/system/impermanence-save.timer", 0o644),
        (GUEST / "save-storage.conf", "/etc/systemd/system/impermanence-save.service.d/storage.conf", 0o644),
        (units / "machine-id-commit-first-boot.conf",
         "/etc/systemd/system/systemd-machine-id-commit.service.d/impermanence.conf", 0o644),
        (units / "journal-flush-until-umount.conf",
         "/etc/systemd/system/systemd-journal-flush.service.d/impermanence.conf", 0o644),
        (GUEST / "journald-persistent.conf", "/etc/systemd/journald.conf.d/persistent.conf", 0o644),
        (GUEST / "vehicle-check", "/usr/local/sbin/vehicle-check", 0o755),
        (GUEST / "vehicle-check.service", "/etc/systemd/system/vehicle-check.service", 0o644),
        (GUEST / "vehicle-stopwrite.service", "/etc/systemd/system/vehicle-stopwrite.service", 0o644),
    ]


# What `systemctl enable` would link: (unit, the target wanting it).
ENABLED = (("impermanence-save.service", "sysinit.target"),
           ("vehicle-check.service", "multi-user.target"),
           ("vehicle-stopwrite.service", "multi-user.target"))


# The kernel is this machine's (the initramfs's): the modules stage 2's
# systemd loads on a VM (binfmt_misc for systemd-binfmt.service, ...) go
# into the root, with their dependencies and an index.
GUEST_MODULES = ("binfmt_misc", "configfs", "fuse", "loop", "dm_mod", "efi_pstore")


def make_root_disk(base: Path, dest: Path, kver: str) -> Path:
    """A copy of the base image with the product's files, the checker and
    the kernel's modules in `blank` (a loop mount in a private mount
    namespace)."""
    ds = _dist_support()
    subprocess.run(["cp", "--sparse=always", str(base), str(dest)], check=True)
    lines = ["set -eu", 'mnt=$(mktemp -d)', f'mount -o loop {dest} "$mnt"', 'b="$mnt/blank"']
    for src, path, mode in guest_files():
        lines.append(f'install -D -m {mode:o} {src} "$b{path}"')
    modules = Path("/lib/modules") / kver
    for f in [*ds.build_initramfs.kernel_module_files(kver, GUEST_MODULES),
              *(modules / n for n in ("modules.order", "modules.builtin", "modules.builtin.modinfo"))]:
        lines.append(f'install -D -m 644 {f} "$b/usr/lib/modules/{kver}/{Path(f).relative_to(modules)}"')
    lines.append(f'depmod -b "$b" {kver}')
    for unit, target in ENABLED:
        lines.append(f'mkdir -p "$b/etc/systemd/system/{target}.wants"')
        lines.append(f'ln -sfn ../{unit} "$b/etc/systemd/system/{target}.wants/{unit}"')
    lines += ['umount "$mnt"', 'rmdir "$mnt"']
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
                   check=True)
    return dest


def make_persist_disk(dest: Path) -> Path:
    import machine  # a sibling: vm/ is on the path of whoever runs this
    return machine.make_disk(dest, "persist", 256)


# --- a boot ---------------------------------------------------------------------

class VehicleBoot:
    """One boot: the checker's report (None if it never reported), the
    console, the wall time."""

    def __init__(self, raw):
        self.raw = raw
        self.console, self.seconds = raw.console, raw.seconds
        self.report = None
        for line in raw.lines:
            if line.startswith(REPORT_PREFIX):
                self.report = json.loads(line[len(REPORT_PREFIX):])

    def describe(self) -> str:
        return self.raw.describe()


def boot(built, work: Path, number: int, disks: list[Path], timeout: float = 600) -> VehicleBoot:
    ds = _dist_support()
    raw = ds.boot(built, work, f"boot-{number}", disks, timeout=timeout,
                  cmdline=f"{CMDLINE} vehicle.boot={number}")
    return VehicleBoot(raw)
