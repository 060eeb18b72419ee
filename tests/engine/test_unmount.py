"""unmount: what apply set up undone, storage untouched."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import (base_config, main_config, mount_points_under, mounted, mountinfo_points,
                     mountinfo_under, populate, tree_digest)


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


def test_unmount_leaves_the_filesystems_apply_did_not_mount(sandbox, tmp_path):
    # On a running system (--root / in this private namespace) the
    # filesystems are the system's own; under another root (an initrd's
    # /mnt-root) one that stage 1, fstab or a person mounted stays too.
    point = tmp_path / "persist-here"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(point)], check=True)
    cfg = {"fileSystems": {str(point): {"device": "/dev/null", "fsType": "tmpfs"}}, "persistence": {}}
    result = sandbox.run("-v", "unmount", config=cfg, root=Path("/"))
    assert result.returncode == 0, result.stderr
    assert str(point) in mountinfo_points()
    inside = sandbox.path(str(point))
    inside.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(inside)], check=True)
    result = sandbox.run("-v", "unmount")
    assert result.returncode == 0, result.stderr
    assert str(inside) in mountinfo_points()
    assert f"impermanence: {inside}: not mounted by apply; left mounted" in result.stderr
    subprocess.run(["umount", str(inside)], check=True)
    subprocess.run(["umount", str(point)], check=True)


def test_unmount_unmounts_a_filesystem_only_while_it_is_the_mount_apply_made(sandbox, disk):
    # apply records the storage it mounted (x-impermanence-boot in utab,
    # with the mount's id, source and root); what someone mounted there
    # after apply's mount went away is not that one.
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    storage = str(sandbox.path("/persistent"))
    assert storage in mountinfo_points()
    subprocess.run(["umount", str(sandbox.path("/var/log"))], check=True)
    subprocess.run(["umount", storage], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "a-person", storage], check=True)
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert storage in mountinfo_points()
    subprocess.run(["umount", storage], check=True)
    # apply's own mount is unmounted, and its utab line goes with it.
    assert sandbox.run("apply").returncode == 0
    assert "TARGET=/persistent ROOT=/ OPTS=x-impermanence-boot" in sandbox.utab.read_text()
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]
    assert "TARGET=/persistent " not in sandbox.utab.read_text()


def test_unmount_keeps_directories_it_did_not_create(sandbox, disk):
    R = sandbox.root
    (R / "srv").mkdir()  # existed before apply: not ours to remove
    cfg = base_config(disk.label, {"directories": ["/srv", "/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert sandbox.run("unmount").returncode == 0
    assert (R / "srv").is_dir()
    assert not (R / "var/log").exists()


def test_unmount_dry_run_prints_what_unmount_does(sandbox, disk):
    """unmount --dry-run: one line per action, changing nothing; the real
    unmount -v then logs exactly those lines."""
    populate(disk, {"etc/adjtime": b"x\n"})
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    applied_mounts = mountinfo_under(sandbox.root)
    applied_tree = tree_digest(sandbox.root)
    dry = sandbox.run("unmount", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    planned = dry.stdout.splitlines()
    R = sandbox.root
    assert f"unmount {R}/var/log" in planned, planned
    assert f"remove link {R}/etc/ssh/ssh_host_ed25519_key.pub" in planned, planned
    assert f"unmount {R}/persistent (fileSystems, mounted by apply)" == planned[-1], planned
    assert planned.index(f"unmount {R}/home/bird/.ssh") < planned.index(f"unmount {R}/persistent "
                                                                         "(fileSystems, mounted by apply)")
    assert mountinfo_under(R) == applied_mounts and tree_digest(R) == applied_tree
    real = sandbox.run("-v", "unmount")
    assert real.returncode == 0, real.stderr
    logged = [l.removeprefix("impermanence: ") for l in real.stderr.splitlines()]
    assert logged == planned
    assert sandbox.run("unmount", "--dry-run").stdout == "nothing to do: nothing apply made is in place\n"
