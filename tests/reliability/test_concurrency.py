"""One apply or unmount at a time per root: two runs at once never stack a
bind mount; a second run waits a bounded time for the first, then exits 2;
unmount takes off every layer of its own."""
from __future__ import annotations

import collections
import fcntl
import os
import subprocess
import sys
import time

from support import BIRD, USERS_GID, SCRIPT, mounts_under, script_env, tmpfs_at

CONFIG = {
    "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
    "groups": {"users": {"gid": USERS_GID}},
    "persistence": {"/persistent": {
        "hideMounts": True,
        "directories": ["/var/log", "/var/lib/nixos", "/srv/a", "/srv/b", "/etc/nixos"],
        "files": ["/etc/machine-id", "/etc/adjtime"],
        "users": {"bird": {"directories": ["Downloads", ".ssh", ".local/share/fish"],
                           "files": [".bash_history"]}},
    }},
}


def lock_path(root) -> str:
    st = os.stat(root)
    return f"/run/impermanence-boot.{st.st_dev}.{st.st_ino}.lock"


def start(sandbox, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(sandbox.root), "--config",
                             str(sandbox.config_path), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env({"LIBMOUNT_UTAB": str(sandbox.utab), **(env or {})}))


def stacked(root) -> list:
    counts = collections.Counter(point for point, *_ in mounts_under(root))
    return [point for point, n in counts.items() if n > 1]


def test_two_applies_at_once_never_stack_a_mount(sandbox):
    tmpfs_at(sandbox.path("/persistent"))
    sandbox.write_config(CONFIG)
    trials, both_ran = 100, 0
    for trial in range(trials):
        first, second = start(sandbox, "apply"), start(sandbox, "apply")
        results = [(p.wait(timeout=120), *p.communicate()) for p in (first, second)]
        for code, _out, err in results:
            assert code == 0, (trial, err)
        assert stacked(sandbox.root) == [], (trial, mounts_under(sandbox.root))
        both_ran += 1
        result = sandbox.run("unmount")
        assert result.returncode == 0, (trial, result.stderr)
        assert [p for p, *_ in mounts_under(sandbox.root)] == [str(sandbox.root),
                                                                str(sandbox.path("/persistent"))]
    assert both_ran == trials


def test_a_second_run_waits_then_exits_2(sandbox):
    tmpfs_at(sandbox.path("/persistent"))
    sandbox.write_config(CONFIG)
    with open(lock_path(sandbox.root), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for command in ("apply", "unmount"):
            began = time.monotonic()
            proc = start(sandbox, command, env={"IMPERMANENCE_LOCK_WAIT": "1.5"})
            code, (out, err) = proc.wait(timeout=60), proc.communicate()
            waited = time.monotonic() - began
            assert code == 2, err
            assert 1.5 <= waited < 20, waited
            (line,) = err.splitlines()
            assert line.startswith(f"impermanence: {sandbox.root}: another apply or unmount"), line
            assert "waited 1.5 s" in line, line
        assert mounts_under(sandbox.root)[1:] == [m for m in mounts_under(sandbox.root)
                                                  if m[0] == str(sandbox.path("/persistent"))]
        # released while a run waits: it goes on
        proc = start(sandbox, "apply", env={"IMPERMANENCE_LOCK_WAIT": "30"})
        time.sleep(1)
        assert proc.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
        code, (out, err) = proc.wait(timeout=60), proc.communicate()
        assert code == 0, err
    assert stacked(sandbox.root) == []


def test_unmount_takes_off_every_layer_of_its_own(sandbox):
    tmpfs_at(sandbox.path("/persistent"))
    assert sandbox.run("apply", config=CONFIG).returncode == 0
    # a second apply racing an old version stacked its bind on the first
    for target in ("/var/log", "/home/bird/Downloads", "/etc/machine-id"):
        subprocess.run(["mount", "--bind", str(sandbox.path("/persistent" + target)),
                        str(sandbox.path(target))], check=True)
    assert len(stacked(sandbox.root)) == 3
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert [p for p, *_ in mounts_under(sandbox.root)] == [str(sandbox.root),
                                                            str(sandbox.path("/persistent"))]


def test_unmount_exits_1_when_a_mount_of_its_own_is_left(sandbox):
    # Another mount over one of apply's binds: that bind cannot be taken
    # off from below it, and unmount says so.
    tmpfs_at(sandbox.path("/persistent"))
    assert sandbox.run("apply", config=CONFIG).returncode == 0
    subprocess.run(["mount", "-t", "tmpfs", "other", str(sandbox.path("/srv/a"))], check=True)
    result = sandbox.run("unmount")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"impermanence: {sandbox.path('/srv/a')}: "), line
    assert "covered" in line, line
    points = [p for p, *_ in mounts_under(sandbox.root)]
    assert sorted(points) == sorted([str(sandbox.root), str(sandbox.path("/persistent")),
                                     str(sandbox.path("/srv/a")), str(sandbox.path("/srv/a"))])


def test_without_a_writable_run_the_root_itself_is_locked(sandbox):
    # /run missing or read-only (an odd system): the lock is an flock on
    # the root directory itself.
    tmpfs_at(sandbox.path("/persistent"))
    sandbox.write_config(CONFIG)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "no-run", "/run"], check=True)
    try:
        held = os.open(sandbox.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            proc = start(sandbox, "apply", env={"IMPERMANENCE_LOCK_WAIT": "1"})
            code, (out, err) = proc.wait(timeout=60), proc.communicate()
            assert code == 2, err
            assert f"(lock {sandbox.root}, waited 1 s)" in err, err
        finally:
            os.close(held)
        result = sandbox.run("-v", "apply")
        assert result.returncode == 0, result.stderr
        assert f"locking {sandbox.root} itself" in result.stderr, result.stderr
    finally:
        subprocess.run(["umount", "/run"], check=True)
    assert stacked(sandbox.root) == []


def test_the_lock_goes_with_the_run(sandbox):
    # main() called in a longer process (as some tests and tools do)
    # releases the root's lock when it returns.
    import impermanence_boot as ib

    tmpfs_at(sandbox.path("/persistent"))
    sandbox.write_config(CONFIG)
    umask = os.umask(0o022)
    try:
        args = ["--root", str(sandbox.root), "--config", str(sandbox.config_path), "-q"]
        assert ib.main([*args, "apply"]) == 0
    finally:
        os.umask(umask)
    proc = start(sandbox, "unmount", env={"IMPERMANENCE_LOCK_WAIT": "1"})
    code, (out, err) = proc.wait(timeout=60), proc.communicate()
    assert code == 0, err
