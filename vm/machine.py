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
import time
from pathlib import Path

from cpio import Archive

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = float(os.environ.get("IMPERMANENCE_VM_TIMEOUT", "180"))


def use_kvm() -> bool:
    return os.environ.get("IMPERMANENCE_VM_KVM", "") in ("1", "true", "yes")


def run_qemu(cmd: list, timeout: float, console) -> tuple:
    """Run QEMU until the guest powers off or timeout passes (then kill it):
    (the console's text, with anything QEMU itself said after it; seconds;
    whether it timed out; QEMU's exit status)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    timed_out = False
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        qemu_out, _ = proc.communicate()
    seconds = time.monotonic() - start
    text = console.read_bytes().decode("utf-8", "replace").replace("\r", "")
    if qemu_out:
        text += "\n--- qemu ---\n" + qemu_out.decode("utf-8", "replace")
    return text, seconds, timed_out, proc.returncode


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


def debugfs_stat(image: Path, path: str) -> dict | None:
    """An inode as debugfs sees it on an ext4 image (no mount): {inode,
    type, mode, uid, gid, links, size, link (a symlink's text) or None};
    None if the path does not exist. debugfs does not follow a final link."""
    r = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True)
    text = r.stdout.decode("utf-8", "replace")
    if r.returncode != 0 or b"not found" in r.stderr or "Inode:" not in text:
        return None
    import re
    def field(name, pattern=r"(\S+)"):
        m = re.search(rf"\b{name}:\s*{pattern}", text)
        return m.group(1) if m else None
    link = re.search(r'Fast link dest: "(.*)"', text)
    if link is None and field("Type") == "symlink":  # a slow link: its block holds the text
        cat = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
        link = cat.stdout.decode("utf-8", "replace") if cat.returncode == 0 else None
    else:
        link = link.group(1) if link else None
    return {"inode": int(field("Inode")), "type": field("Type"),
            "mode": "%04o" % int(field("Mode"), 8), "uid": int(field("User")),
            "gid": int(field("Group")), "links": int(field("Links")),
            "size": int(field("Size")), "link": link}


def debugfs_ls(image: Path, path: str) -> list[str] | None:
    """The names in a directory of an ext4 image (without . and ..)."""
    r = subprocess.run(["debugfs", "-R", f"ls -p {path}", str(image)], capture_output=True)
    if r.returncode != 0 or b"not found" in r.stderr:
        return None
    names = []
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        fields = line.split("/")  # /inode/mode/uid/gid/name/size/
        if len(fields) >= 7 and fields[5] not in (".", ".."):
            names.append(fields[5])
    return sorted(names)


def debugfs_exists(image: Path, path: str) -> bool:
    r = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True)
    return r.returncode == 0 and b"not found" not in r.stderr and b"Inode:" in r.stdout


Node = "str | None | tuple[str | None, int]"


def _add_node(arc: Archive, dest: str, node) -> None:
    """content (a file, 0644), None (a directory, 0755) or (content or
    None, mode)."""
    content, mode = node if isinstance(node, tuple) else (node, None)
    if content is None:
        arc.dir(dest, 0o755 if mode is None else mode)
    else:
        arc.file(dest, content.encode(), 0o644 if mode is None else mode)


def overlay(config: dict | str | None = None, checks: dict | None = None,
            args: list[str] | None = None,
            preroot: dict[str, Node] | None = None,
            measure: bool = False, shell_device: str | None = None,
            shell_first: bool = False, initrd: dict[str, Node] | None = None,
            snapshot: list[str] | None = None, tools: tuple[str, ...] = (),
            files: dict[str, str] | None = None) -> bytes:
    """The per-boot cpio appended to the initramfs (see vm/guest/init).
    preroot maps a path on the fresh root to file content (None: a
    directory; (content or None, mode) for another mode than 0644/0755),
    created before the script runs. initrd: the same for paths in the
    initramfs itself, outside /nix (e.g. decoys in stage 1's own /etc; the
    overlay's entries are root's). snapshot: "PATH [MAXDEPTH]" lines that
    stage 1 records right before and after the script (type, owner, mode,
    inode, link text, MD5: report["stage1"]["snapshot-before"/"-after"],
    parse with parse_snapshot). shell_device: also run the per-entry shell
    approach for the same config in stage 1, with its storage on that
    device (a copy of the script's: copy_disk), after the script, or before
    it with shell_first. tools: util-linux programs for stage 2
    (build_initramfs.TOOLS, e.g. findmnt), with the libraries they need.
    files: {name: content} put in /nix/scenario (e.g. a second config for
    a stage-2 command)."""
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
    if snapshot:
        arc.file("/nix/scenario/snapshot", ("\n".join(snapshot) + "\n").encode())
    if tools:
        import build_initramfs
        build_initramfs.add_tools(arc, tools)
    for name, content in sorted((files or {}).items()):
        assert "/" not in name, name
        arc.file("/nix/scenario/" + name, content.encode())
    for path, node in sorted((preroot or {}).items()):
        _add_node(arc, "/nix/scenario/preroot" + path, node)
    for path, node in sorted((initrd or {}).items()):
        assert path.startswith("/") and not path.startswith("/nix"), path
        _add_node(arc, path, node)
    return arc.to_bytes()


def parse_snapshot(text: str | None) -> dict[str, dict] | None:
    """Stage 1's snapshot (vm/guest/init) as {path: {type, uid, gid, mode,
    links, size, inode, link (text) or None, md5 or None}}; a PATH that did
    not exist is {"type": "absent"}."""
    if text is None:
        return None
    out: dict[str, dict] = {}
    md5: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("absent|"):
            out[line[len("absent|"):]] = {"type": "absent"}
        elif line.startswith("md5|"):
            path, _, digest = line[len("md5|"):].rpartition("|")
            md5[path] = digest
        elif line:
            path, kind, uid, gid, mode, links, size, ino, name = line.split("|", 8)
            link = None
            if kind == "symbolic link" and " -> " in name:
                link = name.split(" -> ", 1)[1].strip("'")
            out[path] = {"type": kind, "uid": int(uid), "gid": int(gid),
                         "mode": "%04o" % int(mode, 8), "links": int(links),
                         "size": int(size), "inode": int(ino), "link": link, "md5": None}
    for path, digest in md5.items():
        out[path]["md5"] = digest
    return out


def snapshot_changes(before: dict, after: dict) -> dict[str, list[str]]:
    """{"created", "removed", "changed"}: paths, between two parsed
    snapshots. A directory counts as changed only by type, owner or mode
    (its link count and size follow its entries); anything else by every
    field (type, owner, mode, links, size, inode, link text, content)."""
    changed = []
    for path in sorted(set(before) & set(after)):
        a, b = before[path], after[path]
        keys = (("type", "uid", "gid", "mode") if a.get("type") == b.get("type") == "directory"
                else tuple(sorted(set(a) | set(b))))
        if any(a.get(k) != b.get(k) for k in keys):
            changed.append(path)
    return {"created": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)), "changed": changed}


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
        text, seconds, timed_out, returncode = run_qemu(cmd, self.timeout, console)
        parsed = None
        for line in report.read_bytes().decode("utf-8", "replace").replace("\r", "").splitlines():
            if line.startswith("IMPVM-REPORT "):
                parsed = json.loads(line[len("IMPVM-REPORT "):])
        initrd.unlink()
        return BootResult(text, parsed, seconds, returncode, timed_out, cmd)
