"""Finding the storage device without udev: superblocks and partition tables
read by the script, checked against blkid(8) as the reference."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from support import SCRIPT, require, start_on

import impermanence_boot as ib

MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F", "-L"], 16),
    "btrfs": (["mkfs.btrfs", "-q", "-f", "-L"], 128),
    "xfs": (["mkfs.xfs", "-q", "-f", "-L"], 320),
    "vfat": (["mkfs.vfat", "-n"], 16),
}


def blkid(path: str) -> dict:
    out = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def make_image(directory: Path, fs: str, label: str) -> Path:
    cmd, size_mb = MKFS[fs]
    require(shutil.which(cmd[0]) is not None, f"{cmd[0]} is not installed")
    image = directory / f"{fs}.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([*cmd, label, str(image)], check=True, capture_output=True)
    return image


@pytest.mark.parametrize("fs", sorted(MKFS))
def test_superblock_matches_blkid(tmp_path, fs):
    label = "PERSIST" if fs == "vfat" else "persist-" + secrets.token_hex(2)
    image = make_image(tmp_path, fs, label)
    fd = os.open(image, os.O_RDONLY)
    try:
        found = ib.probe_filesystem(fd)
    finally:
        os.close(fd)
    reference = blkid(str(image))
    assert found is not None
    fs_type, uuid, found_label = found
    assert fs_type == ("ext4" if reference["TYPE"].startswith("ext") else reference["TYPE"])
    assert uuid.lower() == reference["UUID"].lower()
    assert found_label == reference["LABEL"] == label


def test_unknown_content_is_not_a_filesystem(tmp_path):
    image = tmp_path / "zero.img"
    image.write_bytes(os.urandom(1 << 20))
    fd = os.open(image, os.O_RDONLY)
    try:
        assert ib.probe_filesystem(fd) is None
    finally:
        os.close(fd)


@pytest.fixture
def loop_image(namespace, tmp_path):
    devices = []

    def attach(image: Path, partitions: bool = False) -> str:
        args = ["losetup", "-f", "--show"] + (["-P"] if partitions else []) + [str(image)]
        device = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        devices.append(device)
        if partitions:
            subprocess.run(["partx", "-a", device], capture_output=True)  # when partscan lags
        return device

    yield attach
    for device in devices:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.mark.parametrize("fs", ["ext4", "btrfs", "vfat"])
def test_lookup_by_label_and_uuid_on_loop_devices(loop_image, tmp_path, fs):
    label = ("P" + secrets.token_hex(3)).upper() if fs == "vfat" else "p" + secrets.token_hex(5)
    image = make_image(tmp_path, fs, label)
    device = loop_image(image)
    uuid = blkid(device)["UUID"]
    assert ib.lookup_device(f"LABEL={label}")[0] == device
    assert ib.lookup_device(f"UUID={uuid}")[0] == device
    assert ib.lookup_device(f"UUID={uuid.swapcase()}")[0] == device  # case-insensitive
    assert ib.lookup_device(f"LABEL={label}x") == (None, None)
    # NixOS's usual form, with no udev to make the links: looked up as the tag
    # (where udev made the links, the path itself is found: the same device)
    assert os.path.realpath(ib.lookup_device(f"/dev/disk/by-label/{label}")[0]) == device
    assert os.path.realpath(ib.lookup_device(f"/dev/disk/by-uuid/{uuid}")[0]) == device
    assert ib.lookup_device(f"/dev/disk/by-label/{label}x") == (None, None)
    assert ib.lookup_device(f"/dev/disk/by-id/{label}") == (None, None)


def test_udev_link_name_with_escapes(loop_image, tmp_path):
    # udev writes a label's space as \x20 in the link's name.
    label = "p " + secrets.token_hex(3)
    device = loop_image(make_image(tmp_path, "ext4", label))
    found = ib.lookup_device("/dev/disk/by-label/" + label.replace(" ", "\\x20"))[0]
    assert os.path.realpath(found) == device


def partition_nodes(device: str, count: int) -> list:
    base = os.path.basename(device)
    names = [f"{base}p{i}" for i in range(1, count + 1)]
    for name in names:
        require(os.path.exists(f"/sys/class/block/{name}"), "the kernel did not scan loop partitions")
        if not os.path.exists(f"/dev/{name}"):
            major, minor = open(f"/sys/class/block/{name}/dev").read().split(":")
            os.mknod(f"/dev/{name}", 0o600 | 0o060000, os.makedev(int(major), int(minor)))
    return [f"/dev/{n}" for n in names]


def partitioned(loop_image, image: Path, size_mb: int, table: str, count: int) -> list:
    """A sparse image partitioned by sfdisk from `table`, on a loop device:
    its `count` partition nodes."""
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["sfdisk", "-q", str(image)], check=True, text=True, input=table)
    return partition_nodes(loop_image(image, partitions=True), count)


def test_gpt_partuuid_and_partlabel(loop_image, tmp_path):
    name = "persist-" + secrets.token_hex(3)
    first, second = partitioned(loop_image, tmp_path / "gpt.img", 48,
                                f'label: gpt\nsize=16M, type=L, name="{name}"\nsize=16M, type=L, name="other"\n', 2)
    for part in (first, second):
        reference = blkid(part)
        assert ib.lookup_device(f"PARTUUID={reference['PART_ENTRY_UUID']}")[0] == part
    assert ib.lookup_device(f"PARTLABEL={name}")[0] == first
    assert os.path.realpath(ib.lookup_device(f"/dev/disk/by-partlabel/{name}")[0]) == first
    uuid = blkid(second)["PART_ENTRY_UUID"]
    assert os.path.realpath(ib.lookup_device(f"/dev/disk/by-partuuid/{uuid}")[0]) == second


def test_mbr_partuuid(loop_image, tmp_path):
    first, second = partitioned(loop_image, tmp_path / "mbr.img", 32,
                                "label: dos\nsize=8M, type=83\nsize=8M, type=83\n", 2)
    reference = blkid(second)
    assert ib.lookup_device(f"PARTUUID={reference['PART_ENTRY_UUID']}")[0] == second


def test_apply_mounts_storage_found_by_partlabel(sandbox, loop_image, tmp_path):
    name = "persist-" + secrets.token_hex(3)
    (part,) = partitioned(loop_image, tmp_path / "disk.img", 40,
                          f'label: gpt\nsize=32M, type=L, name="{name}"\n', 1)
    subprocess.run(["mkfs.ext4", "-q", "-F", part], check=True)
    cfg = {"fileSystems": {"/persist": {"device": f"PARTLABEL={name}"}},
           "persistence": {"/persist": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    st = os.stat(sandbox.path("/persist"))
    assert os.major(st.st_dev) == os.major(os.stat(part).st_rdev)
    assert os.minor(st.st_dev) == os.minor(os.stat(part).st_rdev)


def test_device_appearing_late_is_waited_for(sandbox, loop_disk, tmp_path):
    # The disk is made now but attached only after apply started waiting.
    label = "late" + secrets.token_hex(4)
    image = tmp_path / "late.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(image)], check=True)
    cfg = {"fileSystems": {"/persistent": {"device": f"LABEL={label}"}}, "deviceTimeout": 20,
           "persistence": {"/persistent": {"directories": ["/var/log"]}}}
    sandbox.write_config(cfg)
    proc = start_on(sandbox.root, sandbox.config_path, "apply")
    import time
    time.sleep(1.5)
    assert proc.poll() is None, "apply should still be waiting for the device"
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert os.path.samestat(os.stat(sandbox.path("/var/log")),
                                os.stat(sandbox.path("/persistent/var/log")))
    finally:
        subprocess.run(["umount", "-R", str(sandbox.root)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def clone_image(tmp_path: Path, image: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copyfile(image, copy)
    return copy


def test_a_tag_two_devices_answer_is_refused(sandbox, loop_image, tmp_path):
    # A cloned disk (or a USB stick labelled like the storage, an LVM
    # snapshot): which one is storage is not guessed, whatever the kernel's
    # order of names; each device named by path is still used as written.
    label = "dup" + secrets.token_hex(4)
    image = make_image(tmp_path, "ext4", label)
    first = loop_image(image)
    second = loop_image(clone_image(tmp_path, image, "clone.img"))
    uuid = blkid(first)["UUID"]
    for spec in (f"LABEL={label}", f"UUID={uuid}", f"/dev/disk/by-label/{label}"):
        with pytest.raises(ib.Failure) as info:
            ib.lookup_device(spec)
        assert first in info.value.cause and second in info.value.cause, info.value
    cfg = {"fileSystems": {"/persistent": {"device": f"LABEL={label}"}}, "deviceTimeout": 20,
           "persistence": {"/persistent": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg, timeout=60)
    assert result.returncode == 3, result
    # the device's line, then the storage's usual "not applied" line
    line, summary = result.stderr.splitlines()
    assert "storage unavailable" in summary, summary
    assert f"LABEL={label}: matches 2 devices: " in line and first in line and second in line, line
    assert not os.path.ismount(sandbox.path("/persistent"))
    assert not sandbox.path("/var/log").exists()
    # by path: honoured as written
    cfg["fileSystems"]["/persistent"]["device"] = second
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    assert os.stat(sandbox.path("/persistent")).st_dev == os.stat(second).st_rdev


def test_partlabel_two_partitions_answer_is_refused(loop_image, tmp_path):
    name = "dup-" + secrets.token_hex(3)
    first, second = partitioned(loop_image, tmp_path / "gpt.img", 48,
                                f'label: gpt\nsize=16M, type=L, name="{name}"\nsize=16M, type=L, name="{name}"\n', 2)
    with pytest.raises(ib.Failure) as info:
        ib.lookup_device(f"PARTLABEL={name}")
    assert f"{first}, {second}" in info.value.cause


def test_a_label_is_not_a_prefix(loop_image, tmp_path):
    # LABEL=X is not the device labelled Xx.
    label = "px" + secrets.token_hex(4)
    device = loop_image(make_image(tmp_path, "ext4", label + "x"))
    assert ib.lookup_device(f"LABEL={label}") == (None, None)
    assert ib.lookup_device(f"LABEL={label}x")[0] == device


def test_the_devices_of_one_btrfs_are_one_match(loop_image, tmp_path):
    # A two-device btrfs: both superblocks carry its label and UUID.
    require(shutil.which("mkfs.btrfs") is not None, "mkfs.btrfs is not installed")
    label = "pb" + secrets.token_hex(4)
    images = [tmp_path / "b1.img", tmp_path / "b2.img"]
    for image in images:
        with open(image, "wb") as f:
            f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-L", label, "-d", "raid1", "-m", "raid1",
                    *map(str, images)], check=True, capture_output=True)
    devices = [loop_image(image) for image in images]
    found, fs_type = ib.lookup_device(f"LABEL={label}")
    assert found in devices and fs_type == "btrfs"
