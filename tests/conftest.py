"""Shared fixtures: real mounts inside a private mount namespace.

The whole pytest process enters its own mount namespace once (unshare
CLONE_NEWNS, then makes every mount private), so tmpfs roots, loop mounts
and bind mounts made by the tests never reach the host. Loop devices are
global, so they are detached at teardown.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# PROJECT, SCRIPT and require are imported from here by some test files.
from support import PROJECT, SCRIPT, Sandbox, require, unique_label  # noqa: F401

# The script records userspace mount options in libmount's utab, which
# libmount (and the script) find through LIBMOUNT_UTAB: every run of the
# suite, the script's and the tools' alike, gets one of its own, never the
# host's /run/mount/utab.
os.environ.setdefault("LIBMOUNT_UTAB", os.path.join(tempfile.mkdtemp(prefix="impermanence-utab."),
                                                    "utab"))

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_namespace_entered = False


def enter_private_mount_namespace() -> None:
    global _namespace_entered
    if _namespace_entered:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "mount --make-rprivate /")
    _namespace_entered = True


def pytest_collection_modifyitems(config, items):
    """The release matrix's tests need its chroots, which only
    `./tests/run.sh --releases` builds (it sets IMPERMANENCE_RELEASES=1):
    without it they are deselected, and counted so in the closing line."""
    if os.environ.get("IMPERMANENCE_RELEASES") == "1":
        return
    deselected = [item for item in items if item.get_closest_marker("releases") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("releases") is None]


@pytest.fixture
def namespace():
    require(os.geteuid() == 0, "it needs root (real mounts)")
    enter_private_mount_namespace()


def umount_tree(path: Path) -> None:
    subprocess.run(["umount", "-R", "-l", str(path)], stderr=subprocess.DEVNULL)


@pytest.fixture
def sandbox(namespace, tmp_path):
    """A fresh tmpfs root R (like the initrd's /mnt-root) at tmp_path/root."""
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
    yield Sandbox(root, tmp_path)
    umount_tree(root)


class LoopDisk:
    def __init__(self, image: Path, device: str, label: str):
        self.image, self.device, self.label = image, device, label


def make_loop_disk(directory: Path, label: str = "persist", size_mb: int = 32,
                   mkfs: tuple[str, ...] = ("mkfs.ext4", "-q", "-F", "-L")) -> LoopDisk:
    require(shutil.which(mkfs[0]) is not None, f"{mkfs[0]} is not installed")
    image = directory / f"{label}.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([*mkfs, label, str(image)], check=True, stdout=subprocess.DEVNULL)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    return LoopDisk(image, device, label)


@pytest.fixture
def loop_disk(namespace, tmp_path):
    """An ext4 filesystem labelled 'persist' on a real loop device."""
    disks: list[LoopDisk] = []

    def make(label: str = "persist", **kw) -> LoopDisk:
        disk = make_loop_disk(tmp_path, label, **kw)
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        subprocess.run(["losetup", "-d", disk.device], stderr=subprocess.DEVNULL)


@pytest.fixture
def disk(loop_disk):
    """loop_disk under a label no other test's disk has."""
    return loop_disk(unique_label())


# --- the NixOS module's tests: nixpkgs' lib and NixOS impermanence -------------------

def nix_source(find):
    """What find() (nix/tests/harness.py) locates; without it, skipped
    locally, a failure in CI."""
    import harness

    require(harness.have_nix(), "nix-instantiate is not installed (Debian package nix-bin)")
    path, why = find(harness)
    require(path is not None, why)
    return path


@pytest.fixture(scope="session")
def lib():
    """nixpkgs' lib directory, for lib.evalModules."""
    return nix_source(lambda harness: harness.nixpkgs_lib())


@pytest.fixture(scope="session")
def imp():
    """NixOS impermanence's source, for the differential tests."""
    return nix_source(lambda harness: harness.impermanence_src())
