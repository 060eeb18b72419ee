"""Two boots per Debian release, each with that release's own initramfs
builder, kernel and python3, built inside the release's chroot
(tests/releases): Debian 11 with initramfs-tools (Python 3.9), Debian 13
with dracut's systemd initrd (Python 3.13).

The storage is found the way a minimal initramfs finds it: udev's
persistent-storage rules are masked in the image, so there is no
/dev/disk/by-label link and the script scans /sys/class/block; the config
gives no fsType (auto), so the script probes the superblock. Boot 1 applies
on a fresh root and writes; boot 2, on another fresh root, finds the data.

Part of the release matrix: run by `./tests/run.sh --releases` (CI), which
builds the chroots first; otherwise deselected (tests/conftest.py).
"""
from __future__ import annotations

import copy
import json
import re

import pytest

import dist_support as ds
from dist_support import machine
import scenarios as sc  # vm/scenarios.py
import test_dist as dt
import test_vm as vmtests
from conftest import enter_private_mount_namespace
from support import require
from releases import chroots

pytestmark = [pytest.mark.vm, pytest.mark.releases]

CHAINS = {"bullseye": "initramfs-tools", "trixie": "dracut"}
PYTHONS = {"bullseye": (3, 9), "trixie": (3, 13)}
# An empty rules file in /etc masks the packaged one of the same name: no
# by-label, by-uuid ... links. The root is named by its kernel name for the
# same reason.
UDEV_MASK = "/etc/udev/rules.d/60-persistent-storage.rules"
CMDLINE = {chain: text.replace("root=LABEL=fresh", "root=/dev/vda")
           for chain, text in ds.CMDLINE.items()}
LINKS = ["/dev/disk/by-label/persist", "/dev/disk/by-label/fresh"]


def auto_config() -> str:
    config = copy.deepcopy(sc.MAIN_CONFIG)
    fs = config["fileSystems"]["/persistent"]
    del fs["fsType"]
    assert fs["device"] == "LABEL=persist"
    return json.dumps(config)


def overlay(chain: str) -> bytes:
    arc = ds.Archive()
    arc.file(UDEV_MASK, b"")
    if chain == "dracut":
        arc.file(dt.RESULT_DROPIN_PATH, dt.RESULT_DROPIN.encode())
    return arc.to_bytes()


@pytest.fixture(scope="module", params=sorted(CHAINS))
def release_run(request, tmp_path_factory):
    release = request.param
    chain = CHAINS[release]
    require(machine.qemu_available(), "qemu-system-x86_64 is not installed")
    root = chroots.path(release)
    require(root.is_dir(), f"no {release} chroot at {root} (./tests/run.sh --releases builds it)")
    enter_private_mount_namespace()
    chroot = ds.Chroot(root)
    work = tmp_path_factory.mktemp(f"release-{release}")
    config = work / "impermanence.json"
    config.write_text(auto_config())
    kver = chroot.kver()
    if chain == "dracut":
        built = ds.build_dracut(work / "build", kver, config, chroot=chroot)
    else:
        built = ds.build_mkinitramfs(work / "build", kver, config, chroot=chroot)
    disk = machine.make_disk(work / "persist.img", "persist")
    boots, on_disk = {}, {}
    inspect = dt.INSPECT + LINKS
    for n in (1, 2):
        writes = {**sc.KEPT_WRITES, **sc.UNKEPT_WRITES} if n == 1 else {}
        init = ds.stage2_init(inspect, writes, dt.READS)
        fresh = ds.make_fresh_root(work / f"root-{n}.img", init)
        r = ds.boot(built, work, f"main-{n}", [fresh, disk], overlay=overlay(chain),
                    cmdline=CMDLINE[chain])
        assert not r.timed_out, f"{release} main-{n}: timed out\n{r.describe()}"
        assert r.finished, f"{release} main-{n}: the booted system never reported\n{r.describe()}"
        boots[f"main-{n}"] = r
        if n == 1:
            on_disk = {p: machine.debugfs_cat(disk, p) for p in [*sc.KEPT_WRITES, *sc.UNKEPT_WRITES]}
    print(f"\n{release} ({chain}, {chroot.python()}, kernel {kver}): image built in "
          f"{built.seconds:.0f} s; boots {', '.join(f'{b.seconds:.0f} s' for b in boots.values())}")
    return release, chroot, dt.ChainRun(chain, built, None, boots, disk, on_disk)


def test_image_holds_the_release_python(release_run):
    release, chroot, run = release_run
    listing = "\n".join(run.built.listing())
    major, minor = PYTHONS[release]
    assert chroot.python() == f"/usr/bin/python{major}.{minor}"
    for needed in (f"usr/bin/python{major}.{minor}", f"usr/lib/python{major}.{minor}/os.py",
                   "usr/lib/impermanence-boot/impermanence_boot.pyc", "etc/impermanence.json"):
        assert needed in listing, (release, needed)
    tag = f"cpython-{major}{minor}"
    assert re.search(rf"usr/lib/python{major}\.{minor}/json/__pycache__/decoder\.{tag}\.pyc", listing)


def test_boot1_found_the_storage_by_scanning_and_applied(release_run):
    release, _, run = release_run
    first = run.boots["main-1"]
    assert dt.exit_status(run, "main-1") == 0, first.describe()
    assert "Traceback" not in first.console and "LookupError" not in first.console
    ins = first.inspect()
    # no udev link: the script found the device by reading superblocks
    assert all(ins[link] is None for link in LINKS), {l: ins[l] for l in LINKS}
    (persistent,) = [m for m in first.mounts() if m["point"] == "/persistent"]
    # fsType auto: ext4, as probed
    assert persistent["source"] == "/dev/vdb" and persistent["fstype"] == "ext4", persistent
    dt.check_layout(run, first, vmtests.EXPECTED_ROOT)
    for target in sc.MAIN_DIRS + sc.MAIN_BIND_FILES:
        assert dt.same_inode(ins[target], ins["/persistent" + target]), (target, ins[target])
    assert sorted(first.wrote()) == sorted([*sc.KEPT_WRITES, *sc.UNKEPT_WRITES])
    for path, content in sc.KEPT_WRITES.items():
        assert run.on_disk[path] == content, (path, "not on the persistent disk")
    for path in sc.UNKEPT_WRITES:
        assert run.on_disk[path] is None, (path, "reached the persistent disk")


def test_boot2_finds_the_data(release_run):
    release, _, run = release_run
    second = run.boots["main-2"]
    assert dt.exit_status(run, "main-2") == 0, second.describe()
    contents = second.contents()
    for path, content in sc.KEPT_WRITES.items():
        assert contents.get(path) == content, (release, path, contents.get(path))
    ins = second.inspect()
    for path in sc.UNKEPT_WRITES:
        assert ins[path] is None, (path, "survived on the fresh root")
    (persistent,) = [m for m in second.mounts() if m["point"] == "/persistent"]
    assert persistent["source"] == "/dev/vdb" and persistent["fstype"] == "ext4", persistent
