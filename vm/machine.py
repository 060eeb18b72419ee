"""Boot the test machine under QEMU (stdlib only).

    from machine import Boot, make_disk, overlay
    disk = make_disk(work / "persist.img", label="persist")
    result = Boot(build_dir, work, overlay(config=..., checks=...), [disk]).run()
    result.report   # what stage 2 saw (vm/guest/stage2.py), or None

Every boot has a wall-clock timeout (default 180 s, env
IMPERMANENCE_VM_TIMEOUT) after which QEMU is killed; nothing here can hang.
TCG is the default accelerator: on the machines this runs on /dev/kvm exists
but a KVM guest never starts. IMPERMANENCE_VM_KVM=1 opts into KVM.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpio import Archive  # noqa: E402

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = float(os.environ.get("IMPERMANENCE_VM_TIMEOUT", "180"))


def use_kvm() -> bool:
    return os.environ.get("IMPERMANENCE_VM_KVM", "") in ("1", "true", "yes")


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def make_disk(path: Path, label: str = "persist", size_mb: int = 64,
              seed: Path | None = None) -> Path:
    """A raw disk image holding one ext4 filesystem (no partition table),
    optionally populated from the directory seed (owners and modes kept)."""
    with open(path, "wb") as f:
        f.truncate(size_mb << 20)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label]
    if seed is not None:
        cmd += ["-d", str(seed)]
    subprocess.run(cmd + [str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def make_partitioned_disk(path: Path, partitions: list[tuple[str, int]]) -> Path:
    """A raw disk image with a GPT and one ext4 filesystem per (label,
    size_mb) partition, in order (vda1, vda2, ...)."""
    total = sum(size for _, size in partitions) + 2
    with open(path, "wb") as f:
        f.truncate(total << 20)
    script = "label: gpt\n" + "".join(f"size={size}MiB, type=linux\n" for _, size in partitions)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)
    layout = json.loads(subprocess.run(["sfdisk", "-J", str(path)], check=True,
                                       capture_output=True, text=True).stdout)
    sector = layout["partitiontable"].get("sectorsize", 512)
    for (label, size), part in zip(partitions, layout["partitiontable"]["partitions"]):
        fs = path.with_suffix(f".{label}.part")
        make_disk(fs, label, size)
        with open(fs, "rb") as src, open(path, "r+b") as dst:
            dst.seek(part["start"] * sector)
            shutil.copyfileobj(src, dst, 1 << 20)
        fs.unlink()
    return path


def copy_disk(src: Path, dst: Path, label: str) -> Path:
    """A copy of an ext4 image with another label (so LABEL= still finds
    only the original): the shell approach's storage, the same content as
    the script's at the moment of the copy."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    subprocess.run(["e2label", str(dst), label], check=True, stdout=subprocess.DEVNULL)
    return dst


def debugfs_cat(image: Path, path: str) -> str | None:
    """Read a file straight from an ext4 image (host side, no mount)."""
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    if r.returncode != 0 or b"File not found" in r.stderr:
        return None
    return r.stdout.decode("utf-8", "replace")


def debugfs_exists(image: Path, path: str) -> bool:
    r = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True)
    return r.returncode == 0 and b"not found" not in r.stderr and b"Inode:" in r.stdout


def overlay(config: dict | str | None = None, checks: dict | None = None,
            args: list[str] | None = None,
            preroot: dict[str, str | None] | None = None,
            measure: bool = False, shell_device: str | None = None,
            shell_first: bool = False) -> bytes:
    """The per-boot cpio appended to the initramfs (see vm/guest/init).
    preroot maps a path on the fresh root to file content (None: a
    directory), created before the script runs. shell_device: also run the
    per-entry shell approach for the same config in stage 1, with its
    storage on that device (a copy of the script's: copy_disk), after the
    script, or before it with shell_first."""
    arc = Archive()
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config, indent=1)
        arc.file("/nix/impermanence/config.json", text.encode())
    if shell_device:
        arc.file("/nix/scenario/shell-device", (shell_device + "\n").encode())
        if shell_first:
            arc.file("/nix/scenario/shell-first", b"")
        if config is not None:  # the base image holds the demo config's
            import shell_approach
            cfg = json.loads(text)
            arc.file("/nix/impermanence/shell-approach.sh", shell_approach.script(cfg).encode(),
                     mode=0o755)
            arc.file("/nix/impermanence/shell-storage", shell_approach.storage_mount(cfg).encode())
    arc.file("/nix/scenario/checks.json", json.dumps(checks or {}).encode())
    if args:
        arc.file("/nix/scenario/args", (" ".join(args) + "\n").encode())
    if measure:
        arc.file("/nix/scenario/measure", b"")
    for path, content in sorted((preroot or {}).items()):
        dest = "/nix/scenario/preroot" + path
        if content is None:
            arc.dir(dest)
        else:
            arc.file(dest, content.encode())
    return arc.to_bytes()


class BootResult:
    def __init__(self, console: str, report: dict | None, seconds: float,
                 returncode: int | None, timed_out: bool, command: list[str]):
        self.console = console
        self.report = report
        self.seconds = seconds
        self.returncode = returncode
        self.timed_out = timed_out
        self.command = command

    @property
    def script_exit(self) -> int | None:
        return self.report["stage1"]["exit"] if self.report else None

    @property
    def script_stderr(self) -> str:
        return self.report["stage1"]["stderr"] if self.report else ""

    @property
    def script_ms(self) -> float | None:
        t = self.report and self.report["stage1"].get("t_script")
        return (t[1] - t[0]) / 1e6 if t else None

    @property
    def python_pass_ms(self) -> float | None:
        t = self.report and self.report["stage1"].get("t_python_pass")
        return (t[1] - t[0]) / 1e6 if t else None

    def _ms(self, key: str) -> float | None:
        t = self.report and self.report["stage1"].get(key)
        return (t[1] - t[0]) / 1e6 if t else None

    @property
    def shell_ms(self) -> float | None:
        """The generated shell script's wall time (busybox sh)."""
        return self._ms("t_shell")

    @property
    def shell_mount_ms(self) -> float | None:
        """Stage 1 mounting the shell approach's storage before it."""
        return self._ms("t_shell_mount")

    @property
    def shell_exit(self) -> int | None:
        return self.report["stage1"].get("shell_exit") if self.report else None

    def describe(self) -> str:
        """For assertion messages: how the boot went, the console tail."""
        tail = "\n".join(self.console.splitlines()[-40:])
        return (f"qemu exit {self.returncode}, timed out: {self.timed_out}, "
                f"{self.seconds:.1f} s\n--- console (tail) ---\n{tail}")


class Boot:
    def __init__(self, build_dir: Path, work: Path, overlay_cpio: bytes,
                 disks: list[Path] = (), timeout: float | None = None,
                 memory_mb: int = 512, name: str = "boot"):
        self.build_dir = Path(build_dir)
        self.work = Path(work)
        self.overlay = overlay_cpio
        self.disks = list(disks)
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.memory_mb = memory_mb
        self.name = name

    def command(self, initrd: Path, console: Path, report: Path) -> list[str]:
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
               "-machine", "pc", "-m", str(self.memory_mb), "-smp", "1", "-no-reboot",
               "-kernel", str(self.build_dir / "vmlinuz"), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
               "-serial", f"file:{console}", "-serial", f"file:{report}"]
        if use_kvm():
            cmd += ["-accel", "kvm", "-cpu", "host"]
        else:
            cmd += ["-accel", "tcg"]
        for disk in self.disks:
            cmd += ["-drive", f"file={disk},format=raw,if=virtio,cache=unsafe"]
        return cmd

    def run(self) -> BootResult:
        self.work.mkdir(parents=True, exist_ok=True)
        initrd = self.work / f"{self.name}.initrd"
        console = self.work / f"{self.name}.console.log"
        report = self.work / f"{self.name}.report.log"
        with open(initrd, "wb") as out:
            with open(self.build_dir / "initramfs.cpio", "rb") as base:
                shutil.copyfileobj(base, out, 1 << 20)
            out.write(self.overlay)
        for f in (console, report):
            f.write_bytes(b"")
        cmd = self.command(initrd, console, report)
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        timed_out = False
        try:
            qemu_out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            qemu_out, _ = proc.communicate()
        seconds = time.monotonic() - start
        text = console.read_bytes().decode("utf-8", "replace").replace("\r", "")
        if qemu_out:
            text += "\n--- qemu ---\n" + qemu_out.decode("utf-8", "replace")
        parsed = None
        for line in report.read_bytes().decode("utf-8", "replace").replace("\r", "").splitlines():
            if line.startswith("IMPVM-REPORT "):
                parsed = json.loads(line[len("IMPVM-REPORT "):])
        initrd.unlink()
        return BootResult(text, parsed, seconds, proc.returncode, timed_out, cmd)
