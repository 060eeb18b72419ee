"""The script in exactly the tree dist/lib/initramfs_files.py lists, as an
initramfs holds it: the interpreter under test (vm/distro_python.py), its
shared libraries, the standard-library modules the helper computed and the
byte-compiled script, nothing else; run with `env -i chroot`, so no
locale, no PATH, no udev links. Storage is found by scanning
/sys/class/block for its LABEL and mounted with fsType auto (read from
/proc/filesystems): the paths that open files the interpreter itself must
decode."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import build_initramfs
from support import PROJECT, SCRIPT, base_config, distro_python, require

FILES_HELPER = PROJECT / "dist/lib/initramfs_files.py"


def copy_into(tree: Path, src: str, dest: str) -> None:
    target = tree / dest.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, target)


def initramfs_tree(tree: Path, work: Path) -> str:
    """The helper's files in tree, with the libraries ldd names for the
    interpreter and the extension modules; returns the interpreter's path."""
    py = distro_python()
    listed = subprocess.run([py.path, "-I", str(FILES_HELPER), str(SCRIPT), str(work)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    binaries = []
    for line in listed:
        kind, *paths = line.split()
        if kind in ("bin", "lib"):
            copy_into(tree, paths[0], paths[0])
            binaries.append(paths[0])
        else:
            assert kind == "file", line
            copy_into(tree, paths[0], paths[1])
    for binary in binaries:
        for lib in build_initramfs.ldd(binary):
            copy_into(tree, os.path.realpath(lib), lib)  # where the loader looks for it
    assert listed[0] == f"bin {py.path}"
    return py.path


def test_apply_in_exactly_the_listed_tree(namespace, disk, tmp_path):
    require(shutil.which("chroot") is not None, "chroot (coreutils) is not installed")
    tree = tmp_path / "initramfs"
    python = initramfs_tree(tree, tmp_path / "helper-out")
    for d in ("dev", "proc", "sys", "run", "etc", "mnt"):
        (tree / d).mkdir(exist_ok=True)
    rdev = os.stat(disk.device).st_rdev
    os.mknod(tree / disk.device.lstrip("/"), stat.S_IFBLK | 0o600, rdev)
    subprocess.run(["mount", "-t", "proc", "proc", str(tree / "proc")], check=True)
    subprocess.run(["mount", "--rbind", "/sys", str(tree / "sys")], check=True)
    root = tree / "mnt"  # the fresh root, as stage 1 mounted it
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
    config = base_config(disk.label, {"directories": ["/var/log", {"directory": "/srv/b", "mode": "0700"}],
                                      "files": ["/etc/machine-id"]})
    del config["fileSystems"]["/persistent"]["fsType"]  # the default: auto
    (tree / "etc/impermanence.json").write_text(json.dumps(config))
    try:
        r = subprocess.run(["env", "-i", shutil.which("chroot"), str(tree), python, "-I", "-S",
                            "/usr/lib/impermanence-boot/impermanence_boot.pyc", "--root", "/mnt",
                            "--config", "/etc/impermanence.json", "-v", "apply"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "LookupError" not in r.stderr, r.stderr
        assert all(os.path.ismount(root / p) for p in ("persistent", "var/log", "srv/b"))
        assert (root / "persistent/etc/machine-id").read_text() == "uninitialized\n"
        assert stat.S_IMODE((root / "persistent/srv/b").stat().st_mode) == 0o700
    finally:
        subprocess.run(["umount", "-R", "-l", str(tree / "mnt")], stderr=subprocess.DEVNULL)
        subprocess.run(["umount", "-R", "-l", str(tree / "sys")], stderr=subprocess.DEVNULL)
        subprocess.run(["umount", "-l", str(tree / "proc")], stderr=subprocess.DEVNULL)
