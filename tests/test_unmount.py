"""unmount: what apply set up undone, storage untouched."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from reliability_support import tree_digest
from support import (base_config, main_config, mount_points_under, mounted, mountinfo_points,
                     mountinfo_under, populate)


def test_unmount_round_trip_leaves_storage_identical(sandbox, disk):
    populate(disk, {"etc/adjtime": b"x\n", "home/bird/.bash_history": b"ls\n"})
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    applied_mounts = mountinfo_under(sandbox.root)
    applied_tree = tree_digest(sandbox.root)
    storage_before = tree_digest(sandbox.path("/persistent"))
    result = sandbox.run("-v", "unmount")
    assert result.returncode == 0, result.stderr
    # everything below the root is unmounted, storage included; links and
    # the mount points apply created are gone, their parents stay
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]
    for gone in ("etc/adjtime", "etc/machine-id", "etc/nix/id_rsa", "var/log", "home/bird/.ssh",
                 "etc/ssh/ssh_host_ed25519_key.pub"):
        assert not os.path.lexists(sandbox.root / gone), gone
    assert (sandbox.root / "home/bird/.local/share").is_dir()
    # storage is untouched
    with mounted(disk.device, sandbox.path("/persistent")) as storage:
        assert tree_digest(storage) == storage_before
    # and apply brings back exactly the same tree and mounts
    assert sandbox.run("apply").returncode == 0
    assert mountinfo_under(sandbox.root) == applied_mounts
    assert tree_digest(sandbox.root) == applied_tree


def test_unmount_on_the_running_system_leaves_its_filesystems(sandbox, tmp_path):
    # --root /: in this private mount namespace, a filesystem of the
    # config mounted as stage 1 would have left it stays mounted.
    point = tmp_path / "persist-here"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(point)], check=True)
    cfg = {"fileSystems": {str(point): {"device": "/dev/null", "fsType": "tmpfs"}}, "persistence": {}}
    result = sandbox.run("unmount", config=cfg, root=Path("/"))
    assert result.returncode == 0, result.stderr
    assert str(point) in mountinfo_points()
    # elsewhere (an initrd's /mnt-root, a recovery mount) it is unmounted
    sandbox.path(str(point)).mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(sandbox.path(str(point)))], check=True)
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert str(sandbox.path(str(point))) not in mountinfo_points()
    subprocess.run(["umount", str(point)], check=True)


def test_unmount_keeps_directories_it_did_not_create(sandbox, disk):
    R = sandbox.root
    (R / "srv").mkdir()  # existed before apply: not ours to remove
    cfg = base_config(disk.label, {"directories": ["/srv", "/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert sandbox.run("unmount").returncode == 0
    assert (R / "srv").is_dir()
    assert not (R / "var/log").exists()
