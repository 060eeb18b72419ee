"""The distributions' own initramfs builders with dist/'s integration, and
QEMU boots of what they build (tests/boot/test_dist.py).

A boot has two disks: a root filesystem made fresh for every boot
(LABEL=fresh, holding only busybox, os-release and a small /sbin/init that
reports what it sees on the second serial port and powers off) and the
persistent disk (LABEL=persist). The config in the initramfs can be replaced
per boot by a cpio appended to it (the kernel unpacks concatenated archives
in order).

The builders run on this machine's Debian or, given a Chroot, inside
another release's tree (tests/releases), with that release's own builder,
kernel and python3."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support import PROJECT, SCRIPT, distro_python, parse_mountinfo

import build_initramfs  # noqa: E402
import machine  # noqa: E402
from cpio import Archive  # noqa: E402

DIST = PROJECT / "dist"
FILES_HELPER = DIST / "lib/initramfs_files.py"
DRIVERS = ("virtio_pci", "virtio_blk", "ext4")
TIMEOUT = float(os.environ.get("IMPERMANENCE_DIST_TIMEOUT", "300"))
# Marks the stage-2 init's own console line, printed first thing after the switch.
STAGE2_LINE = "impdist: stage 2 started"


def python() -> str:
    """The interpreter the images carry (vm/distro_python.py)."""
    return distro_python().path

# dracut, systemd-based, without hostonly: only the modules a boot from a
# virtio ext4 root needs, so that the image and the boot stay small.
DRACUT_MODULES = ("systemd", "systemd-initrd", "dracut-systemd", "base", "rootfs-block",
                  "fs-lib", "kernel-modules", "udev-rules")


class Chroot:
    """A Debian tree the builders run inside: /proc, /sys, /dev and every
    path bound with bind() (at the same path inside) are mounted in it, so
    the project's files and the work directory have one name in and out.
    The caller must be in a private mount namespace."""

    PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

    def __init__(self, root: Path):
        self.root = Path(root)
        self._mounted: set[str] = set()
        self._bound: set[str] = set()
        for point, cmd in (("/proc", ["-t", "proc", "proc"]), ("/sys", ["--rbind", "/sys"]),
                           ("/dev", ["--rbind", "/dev"]), ("/run", ["-t", "tmpfs", "run"]),
                           ("/tmp", ["-t", "tmpfs", "tmp"]), ("/var/tmp", ["-t", "tmpfs", "tmp"])):
            self._mount(point, cmd)

    def _mount(self, point: str, args: list[str]) -> None:
        if point in self._mounted:
            return
        target = self.root / point.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(target)], check=True)
        self._mounted.add(point)

    def bind(self, path: Path) -> None:
        """The host's path, at the same path inside."""
        path = Path(path).resolve()
        if not any(str(path) == m or str(path).startswith(m + "/") for m in self._bound):
            self._mount(str(path), ["--bind", str(path)])
            self._bound.add(str(path))

    def run(self, cmd: list[str], env: dict | None = None, cwd: Path | None = None,
            **kw) -> subprocess.CompletedProcess:
        """cmd inside the tree, in a clean environment plus env."""
        full = {"PATH": self.PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        argv = ["chroot", str(self.root), "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in full.items()),
                "/bin/sh", "-c", 'cd "$0" && exec "$@"', str(cwd or "/"), *cmd]
        return subprocess.run(argv, **kw)

    def python(self) -> str:
        """The release's python3, as a path inside the tree."""
        return self.run(["readlink", "-f", "/usr/bin/python3"], capture_output=True,
                        text=True, check=True).stdout.strip()

    def kver(self) -> str:
        """The release's one installed kernel."""
        (kver,) = sorted(p.name for p in (self.root / "lib/modules").iterdir())
        return kver


class Built:
    def __init__(self, chain: str, image: Path, kver: str, log: str, seconds: float,
                 chroot: Chroot | None = None):
        self.chain, self.image, self.kver, self.log, self.seconds = chain, image, kver, log, seconds
        self.chroot = chroot

    @property
    def kernel(self) -> Path:
        base = self.chroot.root if self.chroot else Path("/")
        return base / f"boot/vmlinuz-{self.kver}"

    @property
    def size(self) -> int:
        return self.image.stat().st_size

    def uncompressed_size(self) -> int:
        """The image's bytes once decompressed (both chains use zstd)."""
        out = subprocess.run(["zstd", "-dc", str(self.image)], capture_output=True)
        if out.returncode != 0:
            return self.size  # not compressed
        return len(out.stdout)

    def listing(self) -> list[str]:
        tool = ["lsinitrd", str(self.image)] if self.chain == "dracut" else ["lsinitramfs", str(self.image)]
        if self.chroot:
            out = self.chroot.run(tool, capture_output=True, check=True).stdout
        else:
            out = subprocess.run(tool, capture_output=True, check=True).stdout
        return out.decode("utf-8", "replace").splitlines()  # lsinitrd shows binary bits too


def dracut_base(work: Path, with_module: bool, chroot: Chroot | None = None) -> Path:
    """A copy of /usr/lib/dracut made of links, with dist's module added:
    dracut finds modules only in its base directory, and the host's stays
    untouched. The links name paths as dracut sees them (in the chroot)."""
    base = work / "dracut-base"
    (base / "modules.d").mkdir(parents=True)
    lib = Path("/usr/lib/dracut")
    seen = (chroot.root / "usr/lib/dracut") if chroot else lib
    for entry in seen.iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(lib / entry.name)
    for module in (seen / "modules.d").iterdir():
        (base / "modules.d" / module.name).symlink_to(lib / "modules.d" / module.name)
    if with_module:
        (base / "modules.d/90impermanence").symlink_to(DIST / "dracut/90impermanence")
    return base


def _run_builder(cmd: list[str], work: Path, env: dict, chroot: Chroot | None,
                 config: Path | None):
    if chroot is None:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                              env=dict(os.environ, **env))
    for path in (PROJECT, work, *([config.parent] if config else [])):
        chroot.bind(path)
    return chroot.run(cmd, env, cwd=work, capture_output=True, text=True)


def build_dracut(work: Path, kver: str, config: Path | None, extra_conf: str = "",
                 chroot: Chroot | None = None) -> Built:
    """dracut (systemd initrd) for kver; with dist's module when config is
    given; the chroot's dracut and python3 when a chroot is given."""
    work.mkdir(parents=True, exist_ok=True)
    base = dracut_base(work, config is not None, chroot)
    interpreter = chroot.python() if chroot else python()
    conf = work / "dracut.conf"
    conf.write_text(
        (f"impermanence_script={SCRIPT}\nimpermanence_files={FILES_HELPER}\n"
         f"impermanence_config={config}\nimpermanence_python={interpreter}\n" if config else "")
        + extra_conf)
    (work / "dracut.conf.d").mkdir(exist_ok=True)
    modules = DRACUT_MODULES + (("impermanence",) if config else ())
    image = work / "initrd.img"
    cmd = ["dracut", "--conf", str(conf), "--confdir", str(work / "dracut.conf.d"),
           "--no-hostonly", "--kver", kver, "-m", " ".join(modules),
           "--drivers", " ".join(DRIVERS), "--compress", "zstd", "--force", str(image)]
    start = time.monotonic()
    r = _run_builder(cmd, work, {"dracutbasedir": str(base)}, chroot, config)
    seconds = time.monotonic() - start
    if r.returncode != 0:
        raise RuntimeError(f"dracut failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return Built("dracut", image, kver, r.stdout + r.stderr, seconds, chroot)


def build_mkinitramfs(work: Path, kver: str, config: Path | None, env: dict | None = None,
                      chroot: Chroot | None = None) -> Built:
    """initramfs-tools' mkinitramfs for kver, from a configuration directory
    of its own (never /etc/initramfs-tools); with dist's hook and
    local-bottom script when config is given; the chroot's mkinitramfs and
    python3 when a chroot is given."""
    confdir = work / "initramfs-tools"
    for d in ("hooks", "scripts/local-bottom", "conf.d"):
        (confdir / d).mkdir(parents=True, exist_ok=True)
    (confdir / "initramfs.conf").write_text(
        "MODULES=list\nBUSYBOX=n\nCOMPRESS=zstd\nDEVICE=\nNFSROOT=auto\nRUNSIZE=10%\nFSTYPE=ext4\n")
    (confdir / "modules").write_text("".join(f"{m}\n" for m in DRIVERS))
    full_env: dict = {}
    if config is not None:
        shutil.copy(DIST / "initramfs-tools/hooks/impermanence", confdir / "hooks/impermanence")
        shutil.copy(DIST / "initramfs-tools/scripts/local-bottom/impermanence",
                    confdir / "scripts/local-bottom/impermanence")
        full_env.update(IMPERMANENCE_SCRIPT=str(SCRIPT), IMPERMANENCE_FILES=str(FILES_HELPER),
                        IMPERMANENCE_CONFIG=str(config),
                        IMPERMANENCE_PYTHON=chroot.python() if chroot else python())
    full_env.update(env or {})
    image = work / "initrd.img"
    start = time.monotonic()
    r = _run_builder(["mkinitramfs", "-d", str(confdir), "-o", str(image), kver], work,
                     full_env, chroot, config)
    seconds = time.monotonic() - start
    if r.returncode != 0:
        raise RuntimeError(f"mkinitramfs failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return Built("initramfs-tools", image, kver, r.stdout + r.stderr, seconds, chroot)


# --- the fresh root and its small init -----------------------------------------

# What the fresh root holds before the boot, besides lost+found.
SEED_ENTRIES = {"/bin", "/bin/busybox", "/bin/sh", "/sbin", "/sbin/init", "/etc",
                "/etc/os-release", "/usr", "/usr/lib", "/usr/lib/os-release",
                "/proc", "/sys", "/dev", "/run", "/lost+found"}
# Mounted over by the initramfs before the switch (systemd and run-init move them).
SWITCHED_MOUNTS = ("/proc", "/sys", "/dev", "/run")


def stage2_init(inspect: list[str], writes: dict[str, str],
                reads: list[str]) -> str:
    """/sbin/init of the fresh root: reports on the second serial port, one
    `IMPDIST ...` line each: every entry of the root filesystem (find
    -xdev), each inspected path (stat, link text), the contents of reads,
    the mount table, the kernel log, then writes (path: content, as root;
    busybox has no way to become another user without /etc/passwd), then
    powers off."""
    q = shlex.quote
    out = ["#!/bin/sh",
           "/bin/busybox mkdir -p /run/bb && /bin/busybox --install -s /run/bb",
           "export PATH=/run/bb",
           f"echo {q(STAGE2_LINE)} > /dev/console",
           "exec 3>/dev/ttyS1",
           'r() { printf "IMPDIST %s\\n" "$*" >&3; }',
           'r uptime "$(cut -d" " -f1 /proc/uptime)"',
           'ST="%F|%u|%g|%a|%d|%i"',
           "find / -xdev -mindepth 1 | while read -r p; do r entry \"$(stat -c \"$ST\" \"$p\")|$p\"; done",
           'look() { if [ -e "$1" ] || [ -L "$1" ]; then r stat "$(stat -c "$ST" "$1")|$(readlink "$1")|$1";'
           ' else r absent "$1"; fi; }']
    out += [f"look {q(p)}" for p in inspect]
    out += [f'[ -f {q(p)} ] && r cat "{p}|$(base64 -w0 < {q(p)})"' for p in reads]
    out += ['while read -r l; do r mountinfo "$l"; done < /proc/self/mountinfo',
            'dmesg | while read -r l; do r kmsg "$l"; done',
            'for f in /run/impermanence-boot.result /run/impermanence-boot.status; do',
            '  [ -f "$f" ] && r file "$f|$(cat "$f")"',
            'done']
    for path, content in writes.items():
        out.append(f'printf %s {q(content)} > {q(path)} && r wrote {q(path)} || r write-failed {q(path)}')
    out += ["r end", "exec 3>&-", "sync", "poweroff -f", ""]
    return "\n".join(out)


def make_fresh_root(path: Path, init_text: str, extra: dict[str, str] | None = None,
                    extra_dirs: tuple[str, ...] = ()) -> Path:
    """An ext4 image labelled fresh: busybox, os-release (systemd switches
    only into an OS tree), /sbin/init, the mount points, and extra files."""
    seed = path.with_suffix(".seed")
    if seed.exists():
        shutil.rmtree(seed)
    for d in ("bin", "sbin", "etc", "usr/lib", "proc", "sys", "dev", "run", *extra_dirs):
        (seed / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chmod(seed, 0o755)
    shutil.copy(shutil.which("busybox") or "/bin/busybox", seed / "bin/busybox")
    (seed / "bin/sh").symlink_to("busybox")
    release = 'NAME="impermanence test root"\nID=impdist\n'
    (seed / "etc/os-release").write_text(release)
    (seed / "usr/lib/os-release").write_text(release)
    (seed / "sbin/init").write_text(init_text)
    os.chmod(seed / "sbin/init", 0o755)
    for p, content in (extra or {}).items():
        f = seed / p.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(content)
    machine.make_disk(path, "fresh", 64, seed=seed)
    shutil.rmtree(seed)
    return path


def config_overlay(config_text: str) -> bytes:
    arc = Archive()
    arc.file("/etc/impermanence.json", config_text.encode())
    return arc.to_bytes()


# --- booting --------------------------------------------------------------------

CMDLINE = {
    # systemd logs straight to the kernel log (and the service's output is
    # forwarded there, stderr's info level included), so the booted system's dmesg holds the unit's start,
    # end and output with kernel timestamps; no rate limit on /dev/kmsg.
    "dracut": ("root=LABEL=fresh rw console=ttyS0 panic=-1 loglevel=4 printk.devkmsg=on "
               "log_buf_len=4M rd.shell=0 rd.emergency=reboot rd.systemd.show_status=1 "
               "systemd.show_status=1 systemd.log_target=kmsg systemd.journald.forward_to_kmsg=1 "
               "systemd.journald.max_level_kmsg=info"),
    "initramfs-tools": "root=LABEL=fresh rw console=ttyS0 panic=-1 loglevel=4 printk.devkmsg=on",
}


class Boot:
    def __init__(self, console: str, lines: list[str], seconds: float, timed_out: bool,
                 returncode: int | None):
        self.console, self.lines = console, lines
        self.seconds, self.timed_out, self.returncode = seconds, timed_out, returncode

    def _kind(self, kind: str) -> list[str]:
        prefix = f"IMPDIST {kind} "
        return [l[len(prefix):] for l in self.lines if l.startswith(prefix)]

    @property
    def finished(self) -> bool:
        return "IMPDIST end" in self.lines

    @staticmethod
    def _stat(text: str) -> dict:
        kind, uid, gid, mode, dev, ino, rest = text.split("|", 6)
        kinds = {"directory": "dir", "regular file": "file", "regular empty file": "file",
                 "symbolic link": "symlink"}
        return {"type": kinds.get(kind, kind), "uid": int(uid), "gid": int(gid),
                "mode": "%04o" % int(mode, 8), "dev": int(dev), "ino": int(ino), "rest": rest}

    def entries(self) -> dict[str, dict]:
        out = {}
        for text in self._kind("entry"):
            e = self._stat(text)
            out[e.pop("rest")] = e
        return out

    def inspect(self) -> dict[str, dict | None]:
        out: dict = {p: None for p in self._kind("absent")}
        for text in self._kind("stat"):
            e = self._stat(text)
            link, _, path = e.pop("rest").partition("|")
            e["link"] = link or None
            out[path] = e
        return out

    def contents(self) -> dict[str, str]:
        import base64
        out = {}
        for text in self._kind("cat"):
            path, _, data = text.partition("|")
            out[path] = base64.b64decode(data).decode("utf-8", "replace")
        return out

    def mounts(self, kind: str = "mountinfo") -> list[dict]:
        """The guest's mountinfo lines of that kind, as dicts of MountLine's fields."""
        return [m._asdict() for m in parse_mountinfo(self._kind(kind))]

    def kmsg(self) -> list[str]:
        return self._kind("kmsg")

    def files(self) -> dict[str, str]:
        return dict(t.split("|", 1) for t in self._kind("file"))

    def wrote(self) -> list[str]:
        return self._kind("wrote")

    def describe(self) -> str:
        tail = "\n".join(self.console.splitlines()[-60:])
        return (f"qemu exit {self.returncode}, timed out: {self.timed_out}, {self.seconds:.1f} s\n"
                f"--- console (tail) ---\n{tail}")


def boot(built: Built, work: Path, name: str, disks: list[Path], overlay: bytes = b"",
         timeout: float = TIMEOUT, cmdline: str | None = None) -> Boot:
    work.mkdir(parents=True, exist_ok=True)
    initrd = work / f"{name}.initrd"
    with open(initrd, "wb") as out:
        data = built.image.read_bytes()
        out.write(data)
        if overlay:
            # The kernel looks for the next archive's header only at an
            # offset that is a multiple of 4, skipping zeros.
            out.write(b"\0" * (-len(data) % 512))
            out.write(overlay)
    console, report = work / f"{name}.console.log", work / f"{name}.report.log"
    for f in (console, report):
        f.write_bytes(b"")
    cmd = [machine.QEMU, "-nodefaults", "-no-user-config", "-display", "none",
           "-machine", "pc", "-m", "768", "-smp", "1", "-no-reboot",
           "-kernel", str(built.kernel), "-initrd", str(initrd),
           "-append", cmdline or CMDLINE[built.chain],
           "-serial", f"file:{console}", "-serial", f"file:{report}"]
    cmd += ["-accel", "kvm", "-cpu", "host"] if machine.use_kvm() else ["-accel", "tcg"]
    for disk in disks:
        cmd += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
    text, seconds, timed_out, returncode = machine.run_qemu(cmd, timeout, console)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # systemd's colours
    lines = report.read_bytes().decode("utf-8", "replace").replace("\r", "").splitlines()
    initrd.unlink()
    return Boot(text, lines, seconds, timed_out, returncode)


_TS = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")


def kmsg_times(lines: list[str]) -> list[tuple[float, str]]:
    """(seconds since boot, text) of busybox dmesg lines."""
    out = []
    for line in lines:
        m = _TS.match(line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out
