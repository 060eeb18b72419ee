"""Changes made between planning and acting, at a chosen step, every time.

The race tests in test_adversarial.py swap components from another process
as fast as they can, so what they catch depends on timing. Here the script
runs in this process and the test wraps one of its steps (an action's
execute(), a helper it calls), changing the tree right before the step
runs: a planted link, hard link or directory is always there when the step
looks. Each test names the guard it proves; tests/mutants.py removes each
guard in turn and expects one of these to fail."""
from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from support import BIRD, USERS_GID, SCRIPT, mountinfo_points, require, script_env, tmpfs_at

USERS = {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}}
GROUPS = {"users": {"gid": USERS_GID}}


@pytest.fixture
def ib(monkeypatch, sandbox):
    import impermanence_boot

    monkeypatch.setenv("IMPERMANENCE_NO_KMSG", "1")
    monkeypatch.setenv("LIBMOUNT_UTAB", str(sandbox.utab))
    return impermanence_boot


def in_process(ib, sandbox, capfd, command: str = "apply") -> tuple:
    """(exit status, stdout, stderr) of main() on the sandbox; main() sets
    umask 0 and turns the collector off for its own process: restored."""
    capfd.readouterr()
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        status = ib.main(["--root", str(sandbox.root), "--config", str(sandbox.config_path), command])
    finally:
        os.umask(umask)
        gc.enable()
    out = capfd.readouterr()
    return status, out.out, out.err


def before(ib, monkeypatch, cls, when, change) -> list:
    """Run change() right before cls.execute runs for an action when(action)
    holds (once); returns the list the calls are counted in."""
    real = cls.execute
    done = []

    def execute(self, ex):
        if not done and when(self):
            done.append(self)
            change()
        return real(self, ex)

    monkeypatch.setattr(cls, "execute", execute)
    return done


def is_mount_point(path: Path) -> bool:
    return str(path) in mountinfo_points()


# --- the root side: a kept file's target, a fileSystems mount point ---------------

def test_file_target_swapped_for_a_link_before_its_bind(sandbox, ib, monkeypatch, capfd):
    """Guard: the target file is opened O_PATH|O_NOFOLLOW and must be a
    regular file; a link planted after planning is never followed."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "etc").mkdir()
    (store / "etc/app.conf").write_text("kept\n")
    victim = sandbox.path("/etc/shadow")
    victim.parent.mkdir()
    victim.write_text("root:secret\n")
    sandbox.write_config({"persistence": {"/persistent": {"files": ["/etc/app.conf"]}}})
    target = sandbox.path("/etc/app.conf")

    def plant():
        target.unlink()
        target.symlink_to("shadow")

    done = before(ib, monkeypatch, ib.Bind, lambda a: a.target == ("etc", "app.conf"), plant)
    status, _, err = in_process(ib, sandbox, capfd)
    assert done and status == 1, err
    assert not is_mount_point(victim) and not is_mount_point(target)
    assert victim.read_text() == "root:secret\n" and target.is_symlink()
    assert err.startswith(f"impermanence: {target}: ") and len(err.splitlines()) == 1, err


def test_file_system_mount_point_swapped_for_a_link_before_the_mount(sandbox, disk, ib,
                                                                       monkeypatch, capfd):
    """Guard: the mount point of a fileSystems entry is opened without
    following a link; the device is never mounted where the link points."""
    elsewhere = sandbox.path("/srv/elsewhere")
    elsewhere.mkdir(parents=True)
    sandbox.write_config({"fileSystems": {"/persistent": {"device": f"LABEL={disk.label}",
                                                          "fsType": "ext4"}},
                          "deviceTimeout": 5,
                          "persistence": {"/persistent": {"directories": ["/var/log"]}}})
    point = sandbox.path("/persistent")

    def plant():
        if point.is_dir():
            point.rmdir()
        point.symlink_to("srv/elsewhere")

    done = before(ib, monkeypatch, ib.MountFilesystem, lambda a: True, plant)
    status, _, err = in_process(ib, sandbox, capfd)
    assert done and status == 3, err
    assert not is_mount_point(elsewhere) and not is_mount_point(point)
    assert not [p for p in mountinfo_points() if p.startswith(str(sandbox.root) + "/")], err
    assert point.is_symlink()


# --- the storage side: a hard link planted after planning -------------------------

def test_hard_link_planted_between_planning_and_the_bind(sandbox, ib, monkeypatch, capfd):
    """Guard: at bind time, a kept file with several links whose owner is
    not the owner of its directory is refused (planning saw a plain file)."""
    store = tmpfs_at(sandbox.path("/persistent"))
    home = store / "home/bird"
    home.mkdir(parents=True)
    os.chown(home, BIRD, USERS_GID)
    source = home / ".bash_history"
    source.write_text("ls\n")
    os.chown(source, BIRD, USERS_GID)
    (store / "etc").mkdir()
    secret = store / "etc/secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    sandbox.write_config({"users": USERS, "groups": GROUPS, "persistence": {"/persistent": {
        "users": {"bird": {"files": [".bash_history"]}}}}})

    def plant():  # what bird can do in their own directory
        source.unlink()
        os.link(secret, source)

    done = before(ib, monkeypatch, ib.Bind, lambda a: a.target[-1] == ".bash_history", plant)
    status, _, err = in_process(ib, sandbox, capfd)
    target = sandbox.path("/home/bird/.bash_history")
    assert done and status == 1, err
    assert not is_mount_point(target)
    assert "hard link" in err and str(source) in err, err


# --- a directory swapped between its mkdir and its open ----------------------------

def test_directory_swapped_between_mkdir_and_open(sandbox, ib, monkeypatch, capfd):
    """Guard: a directory apply just made is still root's when it opens it;
    one swapped in by the owner of its parent is left as it is, never
    chowned to root or given another mode."""
    store = tmpfs_at(sandbox.path("/persistent"))
    home = store / "home/bird"
    home.mkdir(parents=True)
    os.chown(home, BIRD, USERS_GID)
    sandbox.write_config({"users": USERS, "groups": GROUPS, "persistence": {"/persistent": {
        "directories": [{"directory": "/home/bird/shared", "mode": "0755"}]}}})
    real_mkdir = os.mkdir
    planted = home / "shared"
    calls = []

    def mkdir(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if path == "shared" and not calls and dir_fd is not None:
            calls.append(path)
            os.rename(path, "shared.made", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            real_mkdir(path, 0o700, dir_fd=dir_fd)
            os.chown(path, BIRD, USERS_GID, dir_fd=dir_fd)

    monkeypatch.setattr(ib.os, "mkdir", mkdir)
    status, _, err = in_process(ib, sandbox, capfd)
    monkeypatch.undo()
    assert calls and status == 1, err
    st = planted.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (BIRD, USERS_GID, 0o700)
    assert "was replaced while applying" in err, err


# --- unmount and status: mounts and links apply did not make ----------------------

def test_unmount_leaves_a_foreign_mount_at_a_kept_target(sandbox, ib, monkeypatch, capfd):
    """Guard: unmount removes a mount at a target only if it shows the
    entry's source; an admin's tmpfs on /var/log stays."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "var/log").mkdir(parents=True)
    (store / "var/log/kept.log").write_text("kept\n")
    target = sandbox.path("/var/log")
    tmpfs_at(target)
    (target / "admin.txt").write_text("admin's\n")
    sandbox.write_config({"persistence": {"/persistent": {"directories": ["/var/log"]}}})
    status, _, err = in_process(ib, sandbox, capfd, "unmount")
    assert status == 0, err
    assert is_mount_point(target) and (target / "admin.txt").read_text() == "admin's\n"
    assert (store / "var/log/kept.log").read_text() == "kept\n"


def test_unmount_leaves_a_mount_made_on_the_bind_after_planning(sandbox, ib, monkeypatch, capfd):
    """Guard: unmount takes off a layer at a target only while it shows the
    entry's source; an admin's tmpfs mounted on top of apply's bind after
    unmount planned stays, and so does the bind under it."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "var/log").mkdir(parents=True)
    sandbox.write_config({"persistence": {"/persistent": {"directories": ["/var/log"]}}})
    assert in_process(ib, sandbox, capfd)[0] == 0
    target = sandbox.path("/var/log")

    def mount_on_top():
        tmpfs_at(target)
        (target / "admin.txt").write_text("admin's\n")

    calls = before(ib, monkeypatch, ib.UnmountBind, lambda a: True, mount_on_top)
    status, _, err = in_process(ib, sandbox, capfd, "unmount")
    assert calls and status == 1, err
    assert "covered by another mount" in err, err
    assert (target / "admin.txt").read_text() == "admin's\n"
    assert [p for p in mountinfo_points() if p == str(target)] == [str(target)] * 2


def test_status_and_unmount_with_a_link_in_the_middle_of_a_path(sandbox, ib, monkeypatch, capfd):
    """Guard: status and unmount walk a target's path without following a
    link; /home replaced by a link into storage is an error for the
    entries under it, never `ok`, and nothing is unmounted or removed
    through it."""
    store = tmpfs_at(sandbox.path("/persistent"))
    sandbox.write_config({"users": USERS, "groups": GROUPS, "persistence": {"/persistent": {
        "users": {"bird": {"directories": [".ssh"], "files": [".profile"]}}}}})
    (store / "home/bird/.ssh").mkdir(parents=True)
    (store / "home/bird/.profile").write_text("export A=1\n")
    status, _, err = in_process(ib, sandbox, capfd)
    assert status == 0, err
    home = sandbox.path("/home")
    # Moved aside with its mounts; /home becomes a link into storage.
    os.rename(home, sandbox.path("/home.real"))
    home.symlink_to("persistent/home")
    status, out, err = in_process(ib, sandbox, capfd, "status")
    assert status == 1, out + err
    rows = {line.split()[2]: line.split()[0] for line in out.splitlines()
            if line.split()[1:2] in (["directory"], ["file"])}
    assert rows == {"/home/bird/.profile": "error", "/home/bird/.ssh": "error"}, out
    before_points = mountinfo_points()
    status, out, err = in_process(ib, sandbox, capfd, "unmount")
    assert mountinfo_points() == before_points, err
    assert (store / "home/bird/.profile").read_text() == "export A=1\n"
    assert (store / "home/bird/.ssh").is_dir()


# --- names: the config's tables come first -----------------------------------------

def test_a_name_in_the_config_and_on_the_root_resolves_to_the_config(sandbox, ib, capfd):
    """Guard: the documented order (a number, the config's table, storage's
    uid-map, the root's /etc/passwd, the running system's)."""
    store = tmpfs_at(sandbox.path("/persistent"))
    etc = sandbox.path("/etc")
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\nsvc:x:201:201::/var/empty:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nsvc:x:201:\n")
    sandbox.write_config({"users": {"svc": {"uid": 4242, "group": "svc"}},
                          "groups": {"svc": {"gid": 4343}},
                          "persistence": {"/persistent": {"directories": [
                              {"directory": "/srv/svc", "user": "svc", "group": "svc"}]}}})
    status, _, err = in_process(ib, sandbox, capfd)
    assert status == 0, err
    st = (store / "srv/svc").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)


# --- the two guards only a timing race caught --------------------------------------

def test_kept_directory_target_swapped_for_a_link_before_its_bind(sandbox, ib, monkeypatch, capfd):
    """Guard: directories are opened O_DIRECTORY|O_NOFOLLOW; a kept
    directory's target replaced by a link to /etc after planning is never
    mounted over."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "home/bird/Documents").mkdir(parents=True)
    os.chown(store / "home/bird", BIRD, USERS_GID)
    os.chown(store / "home/bird/Documents", BIRD, USERS_GID)
    etc = sandbox.path("/etc")
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    sandbox.write_config({"users": USERS, "groups": GROUPS, "persistence": {"/persistent": {
        "users": {"bird": {"directories": ["Documents"]}}}}})
    target = sandbox.path("/home/bird/Documents")
    target.mkdir(parents=True)  # there already: the bind opens it by path
    for d in (target.parent, target):
        os.chown(d, BIRD, USERS_GID)

    def plant():  # what bird can do in their home
        target.rmdir()
        target.symlink_to("../../etc")

    done = before(ib, monkeypatch, ib.Bind, lambda a: a.target[-1] == "Documents", plant)
    status, _, err = in_process(ib, sandbox, capfd)
    assert done and status == 1, err
    assert not is_mount_point(etc) and (etc / "passwd").is_file()
    assert target.is_symlink()


def test_the_machine_id_rename_never_replaces_what_appeared(sandbox, ib, monkeypatch, capfd):
    """Guard: renameat2(RENAME_NOREPLACE): the machine-id written under a
    temporary name does not replace a machine-id that appeared meanwhile."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "etc").mkdir()
    sandbox.write_config({"persistence": {"/persistent": {"files": ["/etc/machine-id"]}}})
    real = ib.rename_noreplace
    planted = []

    def rename_noreplace(old_dir, old, new_dir, new, shown):
        if new == "machine-id" and not planted:
            planted.append(new)
            (store / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
        return real(old_dir, old, new_dir, new, shown)

    monkeypatch.setattr(ib, "rename_noreplace", rename_noreplace)
    status, _, err = in_process(ib, sandbox, capfd)
    assert planted, err
    assert (store / "etc/machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert not (store / "etc/.machine-id.impermanence-new").exists()


# --- utab: libmount's lock ---------------------------------------------------------

def lock_waiters(path: Path) -> int:
    """How many processes wait for a lock on path (/proc/locks '->' lines)."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks", encoding="utf-8") as f:
        return sum(1 for line in f if "->" in line and dev in line)


def test_utab_is_written_only_under_its_lock(sandbox):
    """Guard: utab is rewritten only while holding utab.lock (flock), as
    libmount does; a writer holding it keeps apply waiting."""
    import fcntl

    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "var/log").mkdir(parents=True)
    sandbox.write_config({"persistence": {"/persistent": {"hideMounts": True,
                                                          "directories": ["/var/log"]}}})
    lock_path = Path(str(sandbox.utab) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([os.sys.executable, str(SCRIPT), "--root", str(sandbox.root), "--config",
                                 str(sandbox.config_path), "apply"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=script_env({"LIBMOUNT_UTAB": str(sandbox.utab)}))
        try:
            deadline = time.monotonic() + 60
            while lock_waiters(lock_path) == 0 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, proc.communicate()
            assert lock_waiters(lock_path) == 1
            assert not sandbox.utab.exists() or "x-gvfs-hide" not in sandbox.utab.read_text()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "x-gvfs-hide" in sandbox.utab.read_text()


# --- unmount: what it removes is what apply made, and empty -----------------------

def test_unmount_keeps_a_marked_mount_point_that_holds_data(sandbox, ib, capfd):
    """Guard: a mount point apply made is removed only when it is empty; a
    file put there with the mark's times (restored from a copy of the root,
    say) keeps its data."""
    store = tmpfs_at(sandbox.path("/persistent"))
    (store / "etc").mkdir()
    (store / "etc/app.conf").write_text("kept\n")
    sandbox.write_config({"persistence": {"/persistent": {"files": ["/etc/app.conf"]}}})
    assert in_process(ib, sandbox, capfd)[0] == 0
    target = sandbox.path("/etc/app.conf")
    mark = target.stat().st_mtime_ns  # seen through the bind: the source's
    status, _, err = in_process(ib, sandbox, capfd, "unmount")
    assert status == 0 and not target.exists(), err
    # The mount point comes back holding data, with apply's mark on it.
    target.write_text("restored by hand\n")
    os.utime(target, ns=(ib.MARK_TIME_NS, ib.MARK_TIME_NS))
    assert mark != ib.MARK_TIME_NS
    status, _, err = in_process(ib, sandbox, capfd, "unmount")
    assert status == 0, err
    assert target.read_text() == "restored by hand\n"


def test_unmount_keeps_a_link_that_points_elsewhere(sandbox, ib, capfd):
    """Guard: unmount removes a link at a kept file's target only if it is
    the link apply makes; another link there is someone's and stays."""
    tmpfs_at(sandbox.path("/persistent"))
    etc = sandbox.path("/etc")
    etc.mkdir()
    (etc / "app.conf").symlink_to("/usr/share/app/default.conf")
    sandbox.write_config({"persistence": {"/persistent": {"files": [
        {"file": "/etc/app.conf", "method": "symlink"}]}}})
    status, _, err = in_process(ib, sandbox, capfd, "unmount")
    assert status == 0, err
    assert os.readlink(etc / "app.conf") == "/usr/share/app/default.conf"
