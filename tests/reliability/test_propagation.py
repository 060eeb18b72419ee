"""Mount propagation: every bind apply makes is one-way. Storage changes
show on the root; nothing mounted on the root side (the config's own nested
binds from another storage, or anything mounted later under a kept
directory) propagates back into storage.

systemd makes every mount shared (in the initrd and on a running system):
the tests here make their own namespace rshared, as systemd does, with a
tmpfs root and two shared storages, /persistent and /cache, in it.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import MountLine, Sandbox, mount_table, require, strace_prefix, run_on

CLONE_NEWNS = 0x00020000

CONFIG = {
    "persistence": {
        "/persistent": {"directories": ["/var/lib", "/srv"], "files": ["/etc/hostname"]},
        "/cache": {"directories": ["/var/lib/foo"], "files": ["/var/lib/cached.db"]},
    },
}


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def own_mount_namespace(propagation: str):
    """A mount namespace of this process's own, / made r<propagation> in
    it, for the block; then back to the one it came from (which the test's
    mounts never reach: they go with the namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        os.close(home)
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    try:
        sh("mount", f"--make-r{propagation}", "/")
        yield
    finally:
        if libc.setns(home, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "setns back")
        os.close(home)


@pytest.fixture
def shared_ns(namespace):
    yield from own_mount_namespace("shared")


def under(path: Path) -> list:
    """The mounts strictly below path."""
    prefix = str(path) + "/"
    return [m for m in mount_table() if m.point.startswith(prefix)]


def at(path: Path) -> MountLine:
    """The mount on top at path."""
    return [m for m in mount_table() if m.point == str(path)][-1]


class World:
    """A shared tmpfs root with /persistent and /cache, shared tmpfs
    storages holding what CONFIG keeps."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.root = tmp_path / "r"
        self.root.mkdir()
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(self.root))
        sh("mount", "--make-shared", str(self.root))
        self.persistent, self.cache = self.root / "persistent", self.root / "cache"
        for store in (self.persistent, self.cache):
            store.mkdir()
            sh("mount", "-t", "tmpfs", "-o", "mode=0755", store.name, str(store))
            sh("mount", "--make-shared", str(store))
        (self.persistent / "var/lib/state").mkdir(parents=True)
        (self.persistent / "srv").mkdir()
        (self.persistent / "etc").mkdir()
        (self.persistent / "etc/hostname").write_text("kept\n")
        (self.cache / "var/lib/foo").mkdir(parents=True)
        (self.cache / "var/lib/cached.db").write_text("db\n")
        self.sandbox = Sandbox(self.root, tmp_path)
        self.sandbox.write_config(CONFIG)

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sandbox.run(*args, **kw)

    def storage_mounts(self) -> list:
        return under(self.persistent) + under(self.cache)


@pytest.fixture
def world(shared_ns, tmp_path):
    w = World(tmp_path)
    yield w
    subprocess.run(["umount", "-R", "-l", str(w.root)], stderr=subprocess.DEVNULL)


def check_one_way(w: World) -> None:
    """Nothing in storage; the binds are there; a file written through
    the nested bind is in its own storage only."""
    assert w.storage_mounts() == []
    points = {m.point for m in under(w.root)}
    for target in ("var/lib", "var/lib/foo", "var/lib/cached.db", "srv", "etc/hostname"):
        assert str(w.root / target) in points, target
    (w.root / "var/lib/foo/written").write_text("cache only\n")
    assert (w.cache / "var/lib/foo/written").read_text() == "cache only\n"
    assert not (w.persistent / "var/lib/foo/written").exists()
    assert os.listdir(w.persistent / "var/lib/foo") == []  # the mount point apply made


def test_nested_binds_and_later_mounts_stay_out_of_storage(world):
    w = world
    result = w.run("apply")
    assert result.returncode == 0, result.stderr
    check_one_way(w)
    # Later mounts under kept directories (a USB stick, a FUSE mount, a
    # container's bind): on the root side only.
    (w.root / "var/lib/usb").mkdir()
    sh("mount", "-t", "tmpfs", "usb", str(w.root / "var/lib/usb"))
    (w.root / "var/lib/foo/deeper").mkdir()
    sh("mount", "-t", "tmpfs", "deeper", str(w.root / "var/lib/foo/deeper"))
    (w.tmp / "elsewhere").mkdir()
    (w.root / "srv/container").mkdir()
    sh("mount", "--bind", str(w.tmp / "elsewhere"), str(w.root / "srv/container"))
    assert w.storage_mounts() == []
    (w.root / "var/lib/usb/on-the-stick").write_text("x\n")
    assert not (w.persistent / "var/lib/usb/on-the-stick").exists()
    # status sees nothing foreign in storage; a second apply changes nothing
    status = w.run("status")
    assert "foreign mount" not in status.stdout, status.stdout
    again = w.run("apply")
    assert again.returncode == 0, again.stderr
    assert w.storage_mounts() == []


def test_each_bind_is_a_slave_of_its_storage_and_shared_like_the_root(world):
    w = world
    assert w.run("apply").returncode == 0
    for target, store in (("var/lib", w.persistent), ("var/lib/foo", w.cache),
                          ("var/lib/cached.db", w.cache), ("etc/hostname", w.persistent)):
        bind, source = at(w.root / target), at(store)
        assert source.shared is not None
        # receives from storage's peer group, never sends to it ...
        assert bind.master == source.shared, (target, bind, source)
        # ... and, as any mount under a shared mount is, shared in a
        # peer group of its own, so namespaces cloned from this one
        # (services') see what is mounted under it later.
        assert bind.shared is not None and bind.shared != source.shared, (target, bind)
    # A mount made in storage after apply shows on the root.
    (w.persistent / "var/lib/state/sub").mkdir()
    sh("mount", "-t", "tmpfs", "in-storage", str(w.persistent / "var/lib/state/sub"))
    assert str(w.root / "var/lib/state/sub") in {m.point for m in under(w.root)}
    sh("umount", str(w.persistent / "var/lib/state/sub"))
    assert str(w.root / "var/lib/state/sub") not in {m.point for m in under(w.root)}


FALLBACKS = {
    # Linux 5.2 to 5.11: open_tree and move_mount, no mount_setattr
    "no-mount_setattr": "inject=mount_setattr:error=ENOSYS",
    # before Linux 5.2 (or a seccomp filter): mount(2) on /proc/self/fd
    "no-open_tree": "inject=open_tree,mount_setattr:error=ENOSYS",
}


@pytest.mark.parametrize("kernel", sorted(FALLBACKS))
def test_older_kernels_give_the_same_propagation(world, kernel):
    require(shutil.which("strace") is not None, "strace is not installed")
    w = world
    trace = w.tmp / "trace"
    result = run_on(w.root, w.sandbox.config_path, "apply",
                    prefix=strace_prefix(trace, "open_tree,mount_setattr,move_mount,mount",
                                         FALLBACKS[kernel]),
                    env={"LIBMOUNT_UTAB": str(w.sandbox.utab)})
    assert result.returncode == 0, result.stderr
    assert "ENOSYS (Function not implemented) (INJECTED)" in trace.read_text()
    check_one_way(w)
    for target, store in (("var/lib", w.persistent), ("var/lib/foo", w.cache),
                          ("var/lib/cached.db", w.cache)):
        bind, source = at(w.root / target), at(store)
        assert bind.master == source.shared, (target, bind, source)
        assert bind.shared is not None and bind.shared != source.shared, (target, bind)


def test_binds_under_a_private_root_are_private(sandbox, tmp_path):
    # The pytest namespace is rprivate: no peer groups to join or make.
    store = sandbox.path("/persistent")
    store.mkdir()
    sh("mount", "-t", "tmpfs", "store", str(store))
    (store / "var/lib").mkdir(parents=True)
    result = sandbox.run("apply", config={"persistence": {"/persistent": {"directories": ["/var/lib"]}}})
    assert result.returncode == 0, result.stderr
    bind = at(sandbox.path("/var/lib"))
    assert (bind.shared, bind.master) == (None, None), bind


# --- status, orphans and diff with a foreign mount in storage ----------------------

def leak_as_before(w: World) -> None:
    """The binds mount(8) makes (what apply made before binds were
    one-way): each joins its source's peer group, so the nested bind
    propagates into /persistent."""
    for rel, store in (("var/lib", w.persistent), ("var/lib/foo", w.cache)):
        (w.root / rel).mkdir(parents=True, exist_ok=True)
        sh("mount", "--bind", str(store / rel), str(w.root / rel))
    assert [m.point for m in under(w.persistent)] == [str(w.persistent / "var/lib/foo")]


def test_status_reports_a_foreign_mount_in_storage(world):
    w = world
    leak_as_before(w)
    (w.persistent / "srv/usb").mkdir()
    sh("mount", "-t", "tmpfs", "usb", str(w.persistent / "srv/usb"))
    result = w.run("status")
    assert result.returncode == 1, result.stdout
    lines = [line for line in result.stdout.splitlines() if "foreign mount" in line]
    assert len(lines) == 2, result.stdout
    assert f"storage has a foreign mount at {w.persistent / 'srv/usb'} (tmpfs)" in lines[0]
    assert f"storage has a foreign mount at {w.persistent / 'var/lib/foo'} (tmpfs)" in lines[1]
    data = json.loads(w.run("status", "--json").stdout)
    foreign = [r for r in data["storage"] if r["state"] == "foreign-mount"]
    assert [r["storage"] for r in foreign] == ["/persistent", "/persistent"], data["storage"]


def test_status_names_no_foreign_mount_the_config_names(world):
    # A storage or fileSystems mount point inside another storage is the
    # config's own.
    w = world
    inner = w.persistent / "big"
    inner.mkdir()
    sh("mount", "-t", "tmpfs", "big", str(inner))
    config = {"persistence": {"/persistent": {"directories": ["/var/lib"]},
                              "/persistent/big": {"directories": ["/srv"]}}}
    result = w.run("status", config=config)
    assert "foreign-mount" not in result.stdout, result.stdout


def test_orphans_and_diff_never_walk_into_a_foreign_mount(world):
    w = world
    assert w.run("apply").returncode == 0
    # a foreign filesystem inside storage, where no entry keeps anything,
    # and one mounted over a place diff walks on the root
    (w.persistent / "old").mkdir()
    (w.persistent / "old/left-behind").write_text("orphan\n")
    sh("mount", "-t", "tmpfs", "stick", str(w.persistent / "old"))
    (w.persistent / "old/on-the-stick").write_text("not storage's\n")
    (w.root / "opt").mkdir()
    sh("mount", "-t", "tmpfs", "stick", str(w.root / "opt"))
    (w.root / "opt/on-the-stick").write_text("not the root's\n")
    orphans = w.run("orphans", "--json")
    assert orphans.returncode == 0, orphans.stderr
    text = orphans.stdout
    assert "on-the-stick" not in text and "left-behind" not in text, text
    rows = {r["storage"]: r for r in json.loads(text)["storages"]}
    assert "/persistent/old" in json.dumps(rows["/persistent"]), rows["/persistent"]
    diff = w.run("diff", "--json")
    assert diff.returncode == 0, diff.stderr
    assert "on-the-stick" not in diff.stdout, diff.stdout
    assert "/opt" in diff.stdout


# --- unmount -------------------------------------------------------------------------

def unmount_leaves_nothing(w: World) -> None:
    result = w.run("unmount")
    assert result.returncode == 0, result.stderr
    assert sorted(m.point for m in under(w.root)) == [str(w.cache), str(w.persistent)]
    assert (w.persistent / "etc/hostname").read_text() == "kept\n"
    assert (w.cache / "var/lib/cached.db").read_text() == "db\n"


def test_unmount_removes_every_bind_under_a_shared_root(world):
    assert world.run("apply").returncode == 0
    unmount_leaves_nothing(world)


@pytest.mark.parametrize("propagation", ["private", "slave"])
def test_unmount_removes_every_bind_under_other_propagation(shared_ns, tmp_path, propagation):
    # slave: a namespace of its own whose mounts are slaves of the shared
    # one's, as a service's PrivateMounts= namespace is.
    w = World(tmp_path)
    try:
        for point in (w.root, w.persistent, w.cache):
            sh("mount", f"--make-{propagation}", str(point))
        assert w.run("apply").returncode == 0
        assert w.storage_mounts() == []
        unmount_leaves_nothing(w)
    finally:
        subprocess.run(["umount", "-R", "-l", str(w.root)], stderr=subprocess.DEVNULL)


def test_unmount_takes_the_copies_old_binds_left_in_storage(world):
    # Binds that joined their storage's peer group (made before binds were
    # one-way): unmounting the nested one removes its copy in /persistent.
    w = world
    leak_as_before(w)
    result = w.run("unmount", config={"persistence": {
        "/persistent": {"directories": ["/var/lib"]},
        "/cache": {"directories": ["/var/lib/foo"]}}})
    assert result.returncode == 0, result.stderr
    assert w.storage_mounts() == []
    assert sorted(m.point for m in under(w.root)) == [str(w.cache), str(w.persistent)]


def test_unmount_with_a_mount_made_in_storage_since(world):
    # The bind receives a mount made in storage after apply: status names
    # it, that entry's unmount fails as busy (the others are undone), and
    # once it is unmounted in storage, unmount finishes.
    w = world
    assert w.run("apply").returncode == 0
    inside = w.persistent / "var/lib/state"
    sh("mount", "-t", "tmpfs", "since", str(inside))
    assert str(w.root / "var/lib/state") in {m.point for m in under(w.root)}
    status = w.run("status")
    assert f"storage has a foreign mount at {inside} (tmpfs)" in status.stdout, status.stdout
    result = w.run("unmount")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"impermanence: {w.root / 'var/lib'}: umount: Device or resource busy"], result.stderr
    assert str(w.root / "var/lib/foo") not in {m.point for m in under(w.root)}
    sh("umount", str(inside))
    unmount_leaves_nothing(w)


def test_apply_makes_binds_made_before_one_way(world):
    # Binds that joined their storage's peer group (mount(8), or a version
    # whose binds were two-way) on a running system: status names them,
    # plan says what apply does, apply makes them one-way (and unmounts
    # nothing), and its nested bind's copy in storage can then be removed.
    w = world
    leak_as_before(w)
    config = {"persistence": {"/persistent": {"directories": ["/var/lib"]},
                              "/cache": {"directories": ["/var/lib/foo"]}}}
    status = w.run("status", config=config)
    assert status.returncode == 1
    two_way = [line.split()[2] for line in status.stdout.splitlines() if line.startswith("two-way")]
    assert two_way == ["/var/lib", "/var/lib/foo"], status.stdout
    plan = w.run("plan")
    assert plan.stdout.splitlines() == [
        f"make the bind on {w.root / t} one-way (now a peer of its storage: what is mounted "
        "under it appears in storage too)" for t in ("var/lib", "var/lib/foo")], plan.stdout
    result = w.run("apply")
    assert result.returncode == 0, result.stderr
    for target, store in (("var/lib", w.persistent), ("var/lib/foo", w.cache)):
        bind, source = at(w.root / target), at(store)
        assert bind.master == source.shared, (target, bind, source)
        assert bind.shared is not None and bind.shared != source.shared, (target, bind)
    # one-way now: a later mount under /var/lib stays out of storage
    (w.root / "var/lib/usb").mkdir()
    sh("mount", "-t", "tmpfs", "usb", str(w.root / "var/lib/usb"))
    assert [m.point for m in under(w.persistent)] == [str(w.persistent / "var/lib/foo")]
    assert "two-way" not in w.run("status").stdout
    assert w.run("apply").returncode == 0
    assert w.run("plan").stdout == "nothing to do: everything is in place\n"


def test_killed_between_attach_and_slave_then_apply_again(world):
    # Without mount_setattr a bind is two-way from its attach until the
    # MS_SLAVE after it: killed there, the next apply makes it one-way.
    require(shutil.which("strace") is not None, "strace is not installed")
    w = world
    trace = w.tmp / "trace"
    prefix = ("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=mount_setattr,move_mount,mount",
              "-e", "inject=mount_setattr:error=ENOSYS", "-e", "inject=mount:signal=KILL:when=1")
    run_on(w.root, w.sandbox.config_path, "apply", prefix=prefix,
           env={"LIBMOUNT_UTAB": str(w.sandbox.utab)})
    text = trace.read_text()
    assert "+++ killed by SIGKILL +++" in text and "MS_SLAVE" in text, text
    first = at(w.root / "etc/hostname")  # the first bind, in target order
    assert first.shared == at(w.persistent).shared and first.master is None, first
    result = w.run("apply")
    assert result.returncode == 0, result.stderr
    check_one_way(w)
    bind = at(w.root / "etc/hostname")
    assert bind.master == at(w.persistent).shared and bind.shared != bind.master, bind
