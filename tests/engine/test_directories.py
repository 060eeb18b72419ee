"""Kept directories: sources and parents made with their owner and mode,
mount points, nesting within and across storages, interrupted runs, and
links planted in storage."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from support import (BIRD, USERS_GID, base_config, main_config, mounted, mountinfo_points, populate,
                     same_inode, unique_label, owner_mode)


def test_existing_directories_keep_owner_and_mode(sandbox, disk):
    populate(disk, {}, dirs={"var/log": (5, 6, 0o711), "home/bird": (BIRD, USERS_GID, 0o750)})
    cfg = base_config(disk.label, {"directories": [{"directory": "/var/log", "user": "bird", "mode": "0700"}],
                                   "users": {"bird": {"directories": ["Music"]}}})
    assert sandbox.run("apply", config=cfg).returncode == 0
    S = sandbox.path("/persistent")
    assert owner_mode(S / "var/log") == (5, 6, 0o711)
    assert owner_mode(S / "home/bird") == (BIRD, USERS_GID, 0o750)
    assert owner_mode(sandbox.path("/home/bird")) == (BIRD, USERS_GID, 0o750)


def test_storage_mount_point_and_root_never_chowned(sandbox, disk):
    # A storage root with an unusual mode stays as it is; the root too.
    populate(disk, {}, dirs={".": (0, 0, 0o711)})
    os.chmod(sandbox.root, 0o751)
    cfg = base_config(disk.label, {"users": {"bird": {"directories": ["x"]}}},
                      users={"bird": {"uid": BIRD, "group": "users", "home": "/"}})
    # a home of "/" would make the root the user's home: refused as config
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 2
    cfg["users"]["bird"]["home"] = "/home/bird"
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert owner_mode(sandbox.root) == (0, 0, 0o751)
    assert owner_mode(sandbox.path("/persistent")) == (0, 0, 0o711)


def test_nested_entries_across_storages_are_not_hidden(sandbox, loop_disk):
    a, b = loop_disk(unique_label()), loop_disk(unique_label())
    cfg = {
        "fileSystems": {"/persistent": {"device": f"LABEL={a.label}"},
                        "/cache": {"device": b.device, "fsType": "ext4"}},
        "persistence": {"/persistent": {"directories": ["/var/lib"]},
                        "/cache": {"directories": ["/var/lib/cache", "/var/lib/cache/deep"]}},
    }
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    # the child is mounted after (on top of) its parent: visible, from /cache
    assert same_inode(sandbox.path("/var/lib"), sandbox.path("/persistent/var/lib"))
    assert same_inode(sandbox.path("/var/lib/cache"), sandbox.path("/cache/var/lib/cache"))
    sandbox.path("/var/lib/cache/x").write_text("1")
    assert sandbox.path("/cache/var/lib/cache/x").read_text() == "1"
    assert same_inode(sandbox.path("/var/lib/cache/deep"), sandbox.path("/cache/var/lib/cache/deep"))
    order = [p for p in mountinfo_points() if p.startswith(str(sandbox.root))]
    assert order.index(str(sandbox.path("/var/lib"))) < order.index(str(sandbox.path("/var/lib/cache")))


def test_nested_entry_added_under_a_directory_an_earlier_run_mounted(sandbox, disk):
    # The outer directory is already in place, so this run makes no bind
    # for it; the nested one must still be seen through that mount (its
    # target is its own source), not made a second time on the root side.
    first = base_config(disk.label, {"directories": ["/srv/data"]})
    assert sandbox.run("apply", config=first).returncode == 0
    both = base_config(disk.label, {"directories": ["/srv/data", "/srv/data/inner"]})
    result = sandbox.run("apply", config=both)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    inner = sandbox.path("/persistent/srv/data/inner")
    assert inner.is_dir()
    assert same_inode(sandbox.path("/srv/data/inner"), inner)
    # And again, after the nested source was removed by hand.
    inner.rmdir()
    result = sandbox.run("apply", config=both)
    assert result.returncode == 0, result.stderr
    assert inner.is_dir() and same_inode(sandbox.path("/srv/data/inner"), inner)
    assert sandbox.run("status", config=both).returncode == 0


def test_directories_are_made_with_mode_0000_first(sandbox, disk):
    # A kill between mkdir and chown or chmod must not leave a directory
    # with the wrong owner or mode that the next run keeps: every directory
    # apply makes, in storage or on the root, is made with mode 0000, which
    # the next run recognises, then given owner and mode through its fd.
    # Only a mount point, which its bind mount covers, is made with its mode.
    first = base_config(disk.label, {"directories": ["/srv/shared"]})
    assert sandbox.run("apply", config=first).returncode == 0
    shared = sandbox.path("/persistent/srv/shared")
    os.chown(shared, 0, USERS_GID)
    os.chmod(shared, 0o2775)
    cfg = base_config(disk.label, {"directories": [
        "/srv/shared", "/srv/shared/inner", "/var/lib/plain/state",
        {"directory": "/var/lib/owned", "user": "bird", "mode": "0700"},
        {"directory": "/var/lib/sticky", "mode": "1777"},
        {"directory": "/var/lib/setgid", "mode": "2755"}]})
    sandbox.write_config(cfg)
    result, calls = sandbox.traced("mkdirat,renameat2", "apply")
    assert result.returncode == 0, result.stderr
    S = sandbox.path("/persistent")
    made = re.findall(r'mkdirat\(\d+, "([^"]+)", (0[0-7]*)\)', calls)
    in_storage = ["var", "lib", "plain", "state", "owned", "sticky", "setgid", "inner"]
    on_root = ["var", "lib", "plain"]  # inner is made once, in the bound /srv/shared
    mount_points = [("state", "0755"), ("owned", "0700"), ("sticky", "01777"), ("setgid", "0755")]
    assert sorted(made) == sorted([(n, "000") for n in in_storage + on_root] + mount_points), made
    assert "renameat2" not in calls
    assert owner_mode(S / "var/lib/plain/state") == (0, 0, 0o755)
    assert owner_mode(S / "var/lib/plain") == (0, 0, 0o755)
    assert owner_mode(S / "var/lib/sticky") == (0, 0, 0o1777)
    assert owner_mode(S / "var/lib/owned") == (BIRD, 0, 0o700)  # group defaults to root
    assert owner_mode(S / "var/lib/setgid") == (0, 0, 0o2755)
    assert owner_mode(S / "srv/shared/inner") == (0, 0, 0o755)
    assert owner_mode(sandbox.path("/var/lib/plain")) == (0, 0, 0o755)


@pytest.mark.parametrize("left_owner", [0, BIRD])
def test_a_directory_an_interrupted_run_left_with_mode_0000_is_finished(sandbox, disk, left_owner):
    # What a run killed after mkdir (root-owned) or after fchown (the
    # owner's) leaves: an empty directory with mode 0000. The next run gives
    # it its owner and mode; a non-empty one with mode 0000 is not its to
    # change, and only that entry fails.
    cfg = base_config(disk.label, {"directories": [
        {"directory": "/var/lib/owned", "user": "bird", "mode": "0750"},
        {"directory": "/var/lib/locked", "user": "bird", "mode": "0750"}, "/var/log"]})
    with mounted(disk.device, sandbox.work / "disk") as storage:
        for name in ("owned", "locked"):
            (storage / "var/lib" / name).mkdir(parents=True, mode=0)
            os.chown(storage / "var/lib" / name, left_owner, 0)
            os.chmod(storage / "var/lib" / name, 0)
        (storage / "var/lib/locked/data").write_text("kept\n")
    result = sandbox.run("-v", "apply", config=cfg)
    assert result.returncode == 1, result.stderr
    S, R = sandbox.path("/persistent"), sandbox.root
    assert "impermanence: finish " + str(S / "var/lib/owned") in result.stderr
    assert owner_mode(S / "var/lib/owned") == (BIRD, 0, 0o750)
    assert same_inode(R / "var/lib/owned", S / "var/lib/owned")
    errors = [line for line in result.stderr.splitlines() if ": has mode 0000" in line]
    assert errors == [f"impermanence: {S / 'var/lib/locked'}: has mode 0000 but is not a directory an "
                      "interrupted run left unfinished; left as it is"], result.stderr
    assert owner_mode(S / "var/lib/locked") == (left_owner, 0, 0)
    assert (S / "var/lib/locked/data").read_text() == "kept\n"
    assert same_inode(R / "var/log", S / "var/log")
    # Finished once: the next run has nothing to do there (and fails the
    # locked one again, still leaving it as it is).
    again = sandbox.run("-v", "apply")
    assert again.returncode == 1
    assert "finish " + str(S / "var/lib/owned") not in again.stderr
    assert owner_mode(S / "var/lib/locked") == (left_owner, 0, 0)


def test_mount_points_are_opened_marked_and_mounted_on_through_their_fd(sandbox, disk):
    # Between mkdir and the mount, a name could be swapped by whoever can
    # write its parent (the home on the fresh root): every mount point is
    # opened O_NOFOLLOW, checked, marked and mounted on through its own fd,
    # never by name.
    cfg = main_config(disk.label)
    cfg["persistence"]["/persistent"]["directories"] += ["/var/lib/plain", "/home/bird/rootdir"]
    sandbox.write_config(cfg)
    planned = sandbox.run("plan").stdout.splitlines()
    binds = [line for line in planned if line.startswith("bind ")]
    storage_point = f"mkdir {sandbox.path('/persistent')} "  # fileSystems': not bound on, not marked
    made = [line for line in planned if line.startswith("create empty ") or (
        line.startswith("mkdir ") and line.endswith(", mount point)")
        and not line.startswith(storage_point))]
    result, calls = sandbox.traced("openat,utimensat,move_mount", "apply")
    assert result.returncode == 0, result.stderr
    assert not re.search(r'move_mount\(\d+, "", \d+, "[^"]', calls), calls
    assert not re.search(r'utimensat\(\d+, "', calls), calls
    for name in ("log", "plain", "nixos", "colord", "rootdir"):
        assert re.search(rf'openat\(\d+, "{name}", O_RDONLY\|O_NOFOLLOW\|O_CLOEXEC\|O_DIRECTORY\)', calls), name
    marked_by_fd = re.findall(r'utimensat\(\d+, NULL, \[\{tv_sec=0, tv_nsec=314159265\}', calls)
    by_fd = re.findall(r'move_mount\(\d+, "", \d+, "", MOVE_MOUNT_F_EMPTY_PATH\|MOVE_MOUNT_T_EMPTY_PATH\)', calls)
    assert len(by_fd) == len(binds) >= 5, (binds, calls)
    assert len(marked_by_fd) == len(made) >= 5, (made, calls)
    R, S = sandbox.root, sandbox.path("/persistent")
    for d in ("var/log", "var/lib/plain", "home/bird/rootdir", "etc/nixos", "var/lib/colord"):
        assert same_inode(R / d, S / d), d
    # Below the mounts, each mount point has its storage twin's owner and
    # mode, and the mark (a bind of the parent alone shows them).
    under = sandbox.work / "under"
    under.mkdir()
    for parent, name in (("etc", "nixos"), ("var/lib", "colord"), ("var/lib", "plain"),
                         ("home/bird", "rootdir")):
        subprocess.run(["mount", "--bind", str(R / parent), str(under)], check=True)
        try:
            st = os.lstat(under / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == owner_mode(S / parent / name), name
            assert st.st_mtime_ns == 314159265, name
        finally:
            subprocess.run(["umount", str(under)], check=True)
    # Both kinds are found again by unmount, which removes them.
    assert sandbox.run("unmount").returncode == 0
    for d in ("var/log", "var/lib/plain", "home/bird/rootdir", "home/bird/.ssh", "etc/nixos",
              "var/lib/colord"):
        assert not os.path.lexists(R / d), d


def test_a_mount_point_in_a_set_gid_directory_gets_its_storage_twins_group(sandbox, disk):
    # /var/lib in storage is set-gid with another group, so its mirror on
    # the root is too, and mkdir there passes that group on: the mount
    # point made in it must still end up with its twin's owner and mode.
    populate(disk, {}, dirs={"var": (0, 0, 0o755), "var/lib": (0, USERS_GID, 0o2755),
                             "var/lib/plain": (0, 0, 0o755)})
    cfg = base_config(disk.label, {"directories": ["/var/lib/plain"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    R = sandbox.root
    assert owner_mode(R / "var/lib") == (0, USERS_GID, 0o2755)
    under = sandbox.work / "under"
    under.mkdir()
    subprocess.run(["mount", "--bind", str(R / "var/lib"), str(under)], check=True)
    try:
        assert owner_mode(under / "plain") == (0, 0, 0o755)
        assert os.lstat(under / "plain").st_mtime_ns == 314159265
    finally:
        subprocess.run(["umount", str(under)], check=True)


def test_symlink_planted_in_storage_is_not_followed(sandbox, disk):
    # bird owns ~/.local in storage and replaces ~/.local/share with a link to /etc.
    populate(disk, {}, dirs={"home/bird": (BIRD, USERS_GID, 0o700),
                             "home/bird/.local": (BIRD, USERS_GID, 0o755)})
    with mounted(disk.device, Path("/tmp/plant-" + disk.label)) as mnt:
        os.symlink("/etc", mnt / "home/bird/.local/share")
    etc_before = owner_mode(Path("/etc"))
    cfg = base_config(disk.label, {"users": {"bird": {"directories": [".local/share/evil", "Music"]}}})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert (f"impermanence: {sandbox.path('/persistent/home/bird/.local/share')}: is a symbolic link "
            "to /etc, not a directory") in result.stderr
    assert owner_mode(Path("/etc")) == etc_before
    assert not Path("/etc/evil").exists()
    assert same_inode(sandbox.path("/home/bird/Music"), sandbox.path("/persistent/home/bird/Music"))


def test_systemd_private_directories_are_made_root_only(sandbox, disk):
    # systemd refuses DynamicUser= state under a /var/lib/private that
    # others can enter: made as a parent, it is root's and 0700, in storage
    # and on the root; a parent beside it is 0755 as usual.
    cfg = base_config(disk.label, {"directories": [
        "/var/lib/private/grafana", "/var/cache/private/x", "/var/log/private/y", "/var/lib/other/z"]})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    for side in ("/persistent", ""):
        for d in ("var/lib/private", "var/cache/private", "var/log/private"):
            assert owner_mode(sandbox.path(f"{side}/{d}")) == (0, 0, 0o700), (side, d)
        assert owner_mode(sandbox.path(f"{side}/var/lib/other")) == (0, 0, 0o755)
        assert owner_mode(sandbox.path(f"{side}/var/lib/private/grafana")) == (0, 0, 0o755)
