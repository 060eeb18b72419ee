"""A stalled FUSE mount (its daemon stopped with SIGSTOP; allow_other, as a
user's with user_allow_other): every lstat of its mount point hangs. diff
and apply --root / must finish all the same: a path the mount table says
is another mount is never looked at before it is skipped.

Every run is bounded by a timeout, and every daemon is continued and its
mount taken off in cleanup, whatever happened."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from support import mount_points_under, mountinfo_points, require
from test_running_system import running  # noqa: F401  (the fixture)


def is_mounted(point) -> bool:
    return str(point) in mountinfo_points()


@pytest.fixture
def stalled(namespace, tmp_path):
    """stall(point): an ext4 image mounted at point through fuse2fs, then
    its daemon stopped; checked to hang an lstat there."""
    require(shutil.which("fuse2fs") is not None, "fuse2fs is not installed (Debian package fuse2fs)")
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    daemons = []

    def stall(point):
        point.mkdir(parents=True, exist_ok=True)
        image = tmp_path / f"fuse{len(daemons)}.img"
        with open(image, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        daemon = subprocess.Popen(["fuse2fs", "-f", "-o", "allow_other,fakeroot", str(image), str(point)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        daemons.append((daemon, point))
        deadline = time.monotonic() + 20
        while not is_mounted(point):
            assert daemon.poll() is None and time.monotonic() < deadline, "fuse2fs did not mount"
            time.sleep(0.05)
        os.kill(daemon.pid, signal.SIGSTOP)
        time.sleep(1.5)  # past the attribute cache's second
        # The stall is real: an lstat there does not return.
        probe = subprocess.Popen(["stat", str(point)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with pytest.raises(subprocess.TimeoutExpired):
            probe.wait(timeout=2)
        probe.kill()
        return point

    yield stall
    for daemon, point in daemons:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGCONT)
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=10)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)


def test_diff_finishes_beside_a_stalled_fuse_mount(sandbox, stalled):
    R = sandbox.root
    (R / "persistent").mkdir()
    (R / "srv/data/deep").mkdir(parents=True)
    (R / "srv/data/deep/file").write_text("x")
    (R / "var/log").mkdir(parents=True)
    stalled(R / "srv/fuse")              # a child of a directory holding kept paths' kin
    stalled(R / "srv/data/deep/fuse")    # deep in a directory measured whole
    stalled(R / "var/log/fuse")          # under a kept directory
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log", "/srv/kept"]}}}
    result = sandbox.run("diff", config=cfg, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "srv/fuse" in result.stdout and "srv/data/deep/fuse" in result.stdout, result.stdout
    result = sandbox.run("diff", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    mounts = {m["path"] for m in json.loads(result.stdout)["mounts"]}
    assert {f"{R}/srv/fuse", f"{R}/srv/data/deep/fuse"} <= mounts, mounts


def test_apply_on_a_running_system_finishes_beside_a_stalled_fuse_mount(sandbox, running, stalled):  # noqa: F811
    R = sandbox.root
    stalled(R / "srv/fuse")          # on the root, not kept
    stalled(R / "var/log/fuse")      # in a kept directory, bound at boot
    stalled(R / "home/bird/mnt")     # where a new entry would go
    result = running({"directories": ["/var/log", "/var/lib/app", "/home/bird/mnt/sub", "/srv/fuse"]})
    assert result.returncode == 1, result.stderr
    lines = sorted(result.stderr.splitlines())
    assert len(lines) == 2, lines
    assert lines[0].startswith("impermanence: /home/bird/mnt: is a fuse.") and "not looked into" in lines[0]
    assert lines[1].startswith("impermanence: /srv/fuse: is a fuse.") and "not looked into" in lines[1]
    assert os.path.ismount(R / "var/lib/app")  # the others applied


def test_status_and_unmount_finish_beside_a_stalled_fuse_mount(sandbox, stalled):
    R = sandbox.root
    (R / "persistent").mkdir()
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log", "/srv/fuse"]}}}
    assert sandbox.run("apply", config=cfg).returncode == 0
    subprocess.run(["umount", str(R / "srv/fuse")], check=True)
    stalled(R / "srv/fuse")  # a FUSE mount where a kept directory goes
    result = sandbox.run("status", timeout=60)
    assert result.returncode == 1, result.stderr
    (line,) = [l for l in result.stdout.splitlines() if "srv/fuse" in l]
    assert line.startswith("error") and "not looked into" in line, line
    result = sandbox.run("unmount", timeout=60)
    assert result.returncode == 0, result.stderr
    assert mount_points_under(R) == [str(R), str(R / "srv/fuse")]
