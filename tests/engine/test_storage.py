"""Persistent storage: devices found and mounted (or already mounted), what
fails when one is missing or wrong, storage paths, other filesystems."""
from __future__ import annotations

import subprocess
import time

import pytest

from support import (BIRD, USERS_GID, base_config, mountinfo_under, same_inode, unique_label,
                     owner_mode)


def test_device_by_path_and_existing_mount_reused(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["fileSystems"]["/persistent"] = {"device": disk.device, "fsType": "ext4"}
    assert sandbox.run("apply", config=cfg).returncode == 0
    before = mountinfo_under(sandbox.root)
    # a second run finds /persistent already mounted and uses it as it is
    result = sandbox.run("-v", "apply")
    assert result.returncode == 0
    assert "already a mount point; used as it is" in result.stderr
    assert mountinfo_under(sandbox.root) == before


def test_storage_mounted_by_stage1_without_filesystems_entry(sandbox, disk):
    S = sandbox.path("/persistent")
    S.mkdir()
    subprocess.run(["mount", disk.device, str(S)], check=True)
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # a mount point: no warning
    assert same_inode(sandbox.path("/var/log"), S / "var/log")


def test_storage_not_a_mount_point_warns_and_goes_on(sandbox):
    sandbox.path("/persistent").mkdir()
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0
    assert f"impermanence: {sandbox.path('/persistent')}: not a mount point; kept data would live on the root filesystem" in result.stderr
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/var/log"))


def test_missing_storage_exits_3_and_other_locations_apply(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["persistence"]["/nowhere"] = {"directories": ["/srv"], "files": ["/etc/x"]}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 3
    assert f"impermanence: /nowhere: storage path does not exist" in result.stderr
    assert "2 entries not applied" in result.stderr
    assert not sandbox.path("/srv").exists()
    assert not sandbox.path("/nowhere").exists()  # nothing written to the bare tmpfs
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/var/log"))


def test_device_never_appears_exits_3_within_timeout(sandbox):
    cfg = {"fileSystems": {"/persistent": {"device": f"LABEL={unique_label()}"}},
           "deviceTimeout": 1.5,
           "persistence": {"/persistent": {"directories": ["/var/log"]}}}
    started = time.monotonic()
    result = sandbox.run("apply", config=cfg)
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert "device did not appear within 1.5 s" in result.stderr
    assert 1.5 <= elapsed < 10
    assert not sandbox.path("/var/log").exists()


def test_wrong_fstype_exits_3_with_the_kernel_reason(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["fileSystems"]["/persistent"]["fsType"] = "xfs"
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 3
    line = [l for l in result.stderr.splitlines() if "cannot mount" in l][0]
    assert line.startswith(f"impermanence: {sandbox.path('/persistent')}: cannot mount LABEL={disk.label} ({disk.device}) as xfs:")


def test_storage_path_inside_mounted_filesystem_is_created(sandbox, disk):
    cfg = base_config(disk.label, {})
    cfg["persistence"] = {"/persistent/system": {"directories": ["/var/log"]}}
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/system/var/log"))


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_apply_on_other_storage_filesystems(sandbox, loop_disk, fs):
    mkfs = {"btrfs": ("mkfs.btrfs", "-q", "-f", "-L"), "xfs": ("mkfs.xfs", "-q", "-f", "-L")}[fs]
    disk = loop_disk(unique_label()[:12], size_mb=320, mkfs=mkfs)
    cfg = base_config(disk.label, {"directories": ["/var/log"],
                                   "users": {"bird": {"directories": [".local/share/x"]}}})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    S = sandbox.path("/persistent")
    assert owner_mode(S / "home/bird/.local") == (BIRD, USERS_GID, 0o755)
    assert same_inode(sandbox.path("/home/bird/.local/share/x"), S / "home/bird/.local/share/x")
    assert sandbox.run("apply").returncode == 0


@pytest.mark.parametrize("planted", ["link", "file"])
def test_mount_point_that_is_not_a_directory_is_refused_when_planned(sandbox, disk, planted):
    # A link (or a file) where the fileSystems mount point should be: plan
    # says so, mounting nothing; apply mounts nothing anywhere and exits 3.
    point = sandbox.path("/persistent")
    sandbox.path("/srv").mkdir()
    if planted == "link":
        point.symlink_to("srv")
    else:
        point.write_text("not a directory\n")
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    plan = sandbox.run("plan", config=cfg)
    kind = "a symbolic link to srv" if planted == "link" else "a non-empty file"
    assert plan.stdout.splitlines()[0] == f"fail {point}: is {kind}, not a directory", plan.stdout
    assert not [line for line in plan.stdout.splitlines() if line.startswith(("mount ", "bind "))]
    result = sandbox.run("apply")
    assert result.returncode == 3, result.stderr
    assert [point for point, *_ in mountinfo_under(sandbox.root)] == ["/"]  # the root's own
    assert sandbox.path("/srv").is_dir() and not any(sandbox.path("/srv").iterdir())
