"""Adversarial paths: a user who owns a kept directory plants links and
special files where the script will walk, before the next boot.

Every case builds the same world in a fresh tmpfs root R:
- storage: a separate tmpfs mounted at R/persistent, holding the homes of
  `mallory` (the attacker, uid 1000) and `alice` (uid 1001), /var/log, and
  root-owned decoys R/persistent/etc and R/persistent/root;
- decoys on the fresh root: R/etc and R/root with known owners, modes and
  contents; and a decoy directory on the real host filesystem, outside R;
- the config keeps, for each user, `.local/share/app` (directory),
  `Documents` (directory) and `.config/app/conf` (file), plus `/var/log`.

Then one path component on mallory's side is replaced by one kind of
hostile node, at one position (the leaf, each parent, the home directory),
on the storage side or on the root side. After `apply` the test checks the
real outcome: decoys byte- and stat-identical with no inotify event (no
write open, no chmod/chown, nothing created or removed), real host /, /etc,
/root unchanged, no mount anywhere but on intended targets, storage
unchanged apart from additions, every affected entry failed with a message
naming the planted path, and every other entry bind-mounted in place.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import (SCRIPT, distro_python, mountinfo_points, mounts_under, require, script_env,
                     tmpfs_at, ChangeWatch, assert_clean_messages, deep_digest, host_snapshot,
                     make_deep, snapshot, storage_damage)

MALLORY, ALICE, USERS_GID = 1000, 1001, 100

CONFIG = {
    "users": {"mallory": {"uid": MALLORY, "group": "users"},
              "alice": {"uid": ALICE, "group": "users"}},
    "groups": {"users": {"gid": USERS_GID}},
    "persistence": {
        "/persistent": {
            "directories": ["/var/log"],
            "users": {
                user: {"directories": [".local/share/app", "Documents"],
                       "files": [".config/app/conf"]}
                for user in ("mallory", "alice")
            },
        }
    },
}

# Entries per user, relative to the home directory.
USER_ENTRIES = {".local/share/app": "dir", "Documents": "dir", ".config/app/conf": "file"}

# Positions, as a path relative to the home ("" is the home itself).
POSITIONS = {
    "dir-leaf": ".local/share/app",
    "dir-parent": ".local/share",
    "dir-grandparent": ".local",
    "file-leaf": ".config/app/conf",
    "file-parent": ".config/app",
    "file-grandparent": ".config",
    "home": "",
}

KINDS = ["link-etc", "link-root", "link-slash", "link-dotdot", "link-host-decoy",
         "link-dangling", "link-proc-self-root", "hardlink-root-file", "fifo", "device", "socket"]

SIDES = ["storage", "root"]


class World:
    def __init__(self, sandbox, tmp_path: Path):
        self.sandbox = sandbox
        self.R = sandbox.root
        self.store = self.R / "persistent"
        self.host_decoy = tmp_path / "host-decoy"

    def home(self, side: str, user: str = "mallory") -> Path:
        base = self.store if side == "storage" else self.R
        return base / "home" / user

    def build(self) -> None:
        R, store = self.R, self.store
        # Decoys on the fresh root.
        for d, mode in (("etc", 0o755), ("etc/ssl", 0o750), ("root", 0o700)):
            (R / d).mkdir()
            os.chmod(R / d, mode)
        for f, mode, owner, body in (
                ("etc/passwd", 0o644, (0, 0), b"root:x:0:0::/root:/bin/sh\n"),
                ("etc/shadow", 0o640, (0, 42), b"root:!:1::::::\n"),
                ("etc/ssl/key", 0o600, (0, 0), b"secret key\n"),
                ("root/secret", 0o600, (0, 0), b"root's secret\n")):
            (R / f).write_bytes(body)
            os.chown(R / f, *owner)
            os.chmod(R / f, mode)
        # Storage: its own filesystem, as stage 1 would have mounted it.
        store.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "persist", str(store)], check=True)
        for d, mode in (("etc", 0o755), ("root", 0o700), ("var", 0o755), ("var/log", 0o755),
                        ("home", 0o755)):
            (store / d).mkdir()
            os.chmod(store / d, mode)
        (store / "var/log/boot.log").write_bytes(b"log line\n")
        (store / "etc/shadow").write_bytes(b"stored shadow\n")
        os.chmod(store / "etc/shadow", 0o600)
        (store / "root/secret").write_bytes(b"stored secret\n")
        os.chmod(store / "root/secret", 0o600)
        for user, uid in (("mallory", MALLORY), ("alice", ALICE)):
            home = store / "home" / user
            for d in ("", ".local", ".local/share", ".local/share/app", "Documents",
                      ".config", ".config/app"):
                p = home / d if d else home
                p.mkdir()
                os.chown(p, uid, USERS_GID)
                os.chmod(p, 0o700 if not d else 0o755)
            for f, body in ((".local/share/app/data", b"app data of " + user.encode()),
                            ("Documents/letter.txt", b"letter of " + user.encode()),
                            (".config/app/conf", b"conf of " + user.encode())):
                (home / f).write_bytes(body)
                os.chown(home / f, uid, USERS_GID)
        (R / "home").mkdir()
        # A decoy on the real host filesystem, outside R.
        self.host_decoy.mkdir()
        (self.host_decoy / "etc").mkdir()
        (self.host_decoy / "etc/passwd").write_bytes(b"host decoy\n")
        os.chmod(self.host_decoy / "etc/passwd", 0o644)

    def decoys(self) -> list[Path]:
        return [self.R / "etc", self.R / "root", self.store / "etc", self.store / "root",
                self.host_decoy]

    def plant(self, side: str, position: str, kind: str) -> Path:
        """Replace the component at `position` on `side` with a `kind` node."""
        home = self.home(side)
        victim = home / position if position else home
        if side == "root":
            # The root side holds what an earlier apply (or the user, on a
            # running system) left there: real parents, owned by the user.
            for parent in reversed(victim.relative_to(self.R).parents):
                p = self.R / parent
                if p != self.R and not p.exists():
                    p.mkdir()
                    if p.is_relative_to(self.R / "home" / "mallory"):
                        os.chown(p, MALLORY, USERS_GID)
        else:
            # The user moves the real thing aside (no data is destroyed).
            os.rename(victim, victim.with_name(victim.name + ".moved"))
        if kind.startswith("link-"):
            text = {"link-etc": "/etc", "link-root": "/root", "link-slash": "/",
                    "link-dotdot": os.path.relpath(self.R / "etc", victim.parent),
                    "link-host-decoy": str(self.host_decoy / "etc"),
                    "link-dangling": "/nonexistent-impermanence-test/x",
                    # the running process's own root, whatever it is
                    "link-proc-self-root": "/proc/self/root"}[kind]
            os.symlink(text, victim)
            os.lchown(victim, MALLORY, USERS_GID)
        elif kind == "hardlink-root-file":
            # Same filesystem as the victim, root-owned, not the user's.
            os.link(self.store / "etc/shadow" if side == "storage" else self.R / "etc/shadow", victim)
        elif kind == "fifo":
            os.mkfifo(victim, 0o666)
            os.chown(victim, MALLORY, USERS_GID)
        elif kind == "device":
            os.mknod(victim, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        elif kind == "socket":
            # bind(2) takes at most 108 bytes: bind a relative name.
            cwd = os.open(".", os.O_RDONLY)
            try:
                os.chdir(victim.parent)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(victim.name)
                s.close()
            finally:
                os.fchdir(cwd)
                os.close(cwd)
            os.lchown(victim, MALLORY, USERS_GID)
        else:
            raise AssertionError(kind)
        return victim


def affected(position: str) -> set[str]:
    """Mallory's entries whose source or target passes through position."""
    if position == "":
        return set(USER_ENTRIES)
    return {e for e in USER_ENTRIES if e == position or e.startswith(position + "/")}


def check_in_place(world: World, user: str, entry: str) -> None:
    target = world.home("root", user) / entry
    source = world.home("storage", user) / entry
    t, s = os.lstat(target), os.lstat(source)
    assert (t.st_dev, t.st_ino) == (s.st_dev, s.st_ino), f"{target} is not {source}"
    assert str(target) in mountinfo_points(), f"{target} is not a mount point"


def run_case(sandbox, tmp_path, side: str, position_name: str, kind: str):
    world = World(sandbox, tmp_path)
    world.build()
    position = POSITIONS[position_name]
    victim = world.plant(side, position, kind)

    decoys_before = {str(d): snapshot(d) for d in world.decoys()}
    storage_before = snapshot(world.store)
    root_before = snapshot(world.R, follow_mounts=False)
    host_before = host_snapshot()
    mounts_before = set(mountinfo_points())
    watch = ChangeWatch(world.decoys())
    try:
        result = sandbox.run("apply", config=CONFIG)
        events = watch.events()
    finally:
        watch.close()

    # Nothing outside the intended paths was touched.
    assert events == [], f"decoys were changed:\n" + "\n".join(events)
    for d in world.decoys():
        assert snapshot(d) == decoys_before[str(d)], f"decoy {d} changed"
    assert host_snapshot() == host_before, "real host /, /etc or /root changed"
    damage = storage_damage(storage_before, snapshot(world.store))
    assert damage == [], "storage changed:\n" + "\n".join(damage)
    root_after = snapshot(world.R, follow_mounts=False)
    for path, value in root_before.items():
        if path in root_after:
            # Existing nodes keep owner, mode and content (the leaf of a
            # planted file is allowed no change either).
            assert root_after[path][:6] == value[:6], f"R/{path} changed: {value} -> {root_after[path]}"
        else:
            pytest.fail(f"R/{path} disappeared")

    # Mounts: only on intended targets, and none outside R at all.
    hit = affected(position)
    intended = {str(world.R / "var/log")}
    for user in ("mallory", "alice"):
        for entry in USER_ENTRIES:
            if user == "alice" or entry not in hit:
                intended.add(str(world.home("root", user) / entry))
    new_mounts = set(mountinfo_points()) - mounts_before
    assert new_mounts <= intended, f"unexpected mounts: {sorted(new_mounts - intended)}"
    for point, fs_root, _type, _src in mounts_under(world.R):
        if point in new_mounts:
            assert "/etc" not in fs_root and "/root" not in fs_root, (point, fs_root)

    # Affected entries failed with a message naming the planted path.
    assert_clean_messages(result.stderr)
    assert result.returncode == 1, (result.returncode, result.stderr)
    named = [line for line in result.stderr.splitlines()
             if line.startswith(f"impermanence: {victim}: ")]
    assert named, f"no message names {victim}:\n{result.stderr}"
    assert len(result.stderr.splitlines()) <= len(hit) + 1, result.stderr
    # Everything else is in place.
    check_in_place_var_log(world)
    for user in ("mallory", "alice"):
        for entry in USER_ENTRIES:
            if user == "alice" or entry not in hit:
                check_in_place(world, user, entry)
    return result


def check_in_place_var_log(world: World) -> None:
    t, s = os.lstat(world.R / "var/log"), os.lstat(world.store / "var/log")
    assert (t.st_dev, t.st_ino) == (s.st_dev, s.st_ino)


CASES = [(side, pos, kind) for side in SIDES for pos in POSITIONS for kind in KINDS]


@pytest.mark.parametrize("side,position,kind", CASES,
                         ids=[f"{s}-{p}-{k}" for s, p, k in CASES])
def test_planted_component(sandbox, tmp_path, side, position, kind):
    run_case(sandbox, tmp_path, side, position, kind)


def test_case_count():
    """The matrix the report quotes: sides x positions x kinds."""
    assert len(CASES) == len(SIDES) * len(POSITIONS) * len(KINDS) == 154


# --- Races: a component swapped for a link between check and use ------------

SWAPPER = r"""
import ctypes, os, sys, signal
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = -100, 2
stop = False
def handler(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, handler)
n = 0
sys.stdout.write("ready\n"); sys.stdout.flush()
while not stop:
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
    n += 1
sys.stdout.write(f"{n}\n")
"""

RACES = {
    # (side, component relative to mallory's home, link text builder)
    "storage-parent": ("storage", ".local", lambda w, v: os.path.relpath(w.R / "etc", v.parent)),
    "storage-leaf": ("storage", ".local/share/app", lambda w, v: "/etc"),
    "storage-file-leaf": ("storage", ".config/app/conf", lambda w, v: str(w.R / "etc/shadow")),
    "root-parent": ("root", ".local", lambda w, v: os.path.relpath(w.R / "root", v.parent)),
    "root-home": ("root", "", lambda w, v: str(w.host_decoy)),
}
RACE_ROUNDS = 12


def reset_root_side(world: World, mounts_before: set) -> None:
    for point in sorted(set(mountinfo_points()) - mounts_before, reverse=True):
        subprocess.run(["umount", "-l", point], check=True)


@pytest.mark.parametrize("race", sorted(RACES))
def test_component_swapped_during_apply(sandbox, tmp_path, race):
    side, position, link_text = RACES[race]
    world = World(sandbox, tmp_path)
    world.build()
    home = world.home(side)
    victim = home / position if position else home
    if side == "root":
        for p in (world.home("root"), world.home("root") / ".local"):
            p.mkdir()
            os.chown(p, MALLORY, USERS_GID)
    twin = victim.with_name(victim.name + ".swap")
    os.symlink(link_text(world, victim), twin)

    decoys_before = {str(d): snapshot(d) for d in world.decoys()}
    storage_before = snapshot(world.store)
    host_before = host_snapshot()
    mounts_before = set(mountinfo_points())
    store_dev = os.lstat(world.store).st_dev
    watch = ChangeWatch(world.decoys())
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(victim), str(twin)],
                               stdout=subprocess.PIPE, text=True)
    outcomes = {0: 0, 1: 0}
    try:
        assert swapper.stdout.readline() == "ready\n"
        for _ in range(RACE_ROUNDS):
            swapper.send_signal(signal.SIGCONT)
            result = sandbox.run("apply", config=CONFIG)
            # Hold the swapper still while the outcome is looked at.
            swapper.send_signal(signal.SIGSTOP)
            os.waitid(os.P_PID, swapper.pid, os.WSTOPPED | os.WNOWAIT)
            assert_clean_messages(result.stderr)
            assert result.returncode in (0, 1), result.stderr
            outcomes[result.returncode] += 1
            for point, fs_root, _type, source in mounts_under(world.R):
                if point in mounts_before:
                    continue
                # Only kept state, from storage, on paths in the homes or /var/log.
                assert source == "persist", (point, fs_root, source)
                assert fs_root.startswith(("/home/mallory/", "/home/alice/", "/var/log")), (point, fs_root)
                assert point.startswith((str(world.R / "home/mallory") + "/",
                                         str(world.R / "home/mallory.swap") + "/",
                                         str(world.R / "home/alice") + "/",
                                         str(world.R / "var/log"))), point
            # Alice is never affected by mallory's games.
            for entry in USER_ENTRIES:
                check_in_place(world, "alice", entry)
            reset_root_side(world, mounts_before)
    finally:
        swapper.send_signal(signal.SIGCONT)
        swapper.terminate()
        swaps = swapper.communicate(timeout=10)[0]
        events = watch.events()
        watch.close()
    print(race, outcomes, swaps)
    assert swapper.returncode == 0, swaps
    assert int(swaps) > RACE_ROUNDS, f"the swapper only swapped {swaps} times"
    assert events == [], "decoys were changed:\n" + "\n".join(events)
    for d in world.decoys():
        assert snapshot(d) == decoys_before[str(d)], f"decoy {d} changed"
    assert host_snapshot() == host_before
    assert not (set(mountinfo_points()) - mounts_before)
    # Put the real component back under its name, then nothing is lost.
    if os.path.islink(victim):
        os.unlink(victim)
        os.rename(twin, victim)
    damage = storage_damage(storage_before, snapshot(world.store))
    damage = [d for d in damage if ".swap" not in d.split(":")[0]]
    assert damage == [], "storage changed:\n" + "\n".join(damage)
    assert os.lstat(world.store).st_dev == store_dev


# --- A tree deeper than PATH_MAX and than the fds the script may hold -----------------
# Mallory fills, between boots, the storage side of a kept directory, an
# unkept place of her storage home and an unkept place of her home on the
# root with trees DEEP_LEVELS directories deep (6,000 bytes of path below
# them: past PATH_MAX; and past 64 and 1,024 fds, were one open per
# level). A bind of the kept one walks nothing; diff walks the root,
# orphans the storage, status and unmount look at the entries. Each runs
# with only `fds` descriptors (RLIMIT_NOFILE, as `ulimit -n`).

DEEP_LEVELS = 3000


def run_limited(root, config_path, utab, *args, fds: int, timeout: float = 60):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--config",
                           str(config_path), *args], capture_output=True, text=True,
                          env=script_env({"LIBMOUNT_UTAB": str(utab)}), timeout=timeout,
                          stdin=subprocess.DEVNULL, preexec_fn=limit)


def one_line_each(result) -> list[str]:
    """stderr's lines, checked: each an `impermanence: ` message, no
    traceback, no internal error (shortened for the assertion texts)."""
    assert_clean_messages(result.stderr)
    assert "internal error" not in result.stderr, result.stderr[:2000]
    return [line for line in result.stderr.splitlines() if line]


@pytest.mark.parametrize("fds", [64, 1024])
def test_deep_trees_walked_by_every_command(sandbox, tmp_path, fds):
    world = World(sandbox, tmp_path)
    world.build()
    store_home, root_home = world.home("storage"), world.home("root")
    make_deep(store_home / ".local/share/app", DEEP_LEVELS, MALLORY, USERS_GID)   # kept
    (store_home / "junk").mkdir()
    os.chown(store_home / "junk", MALLORY, USERS_GID)
    make_deep(store_home / "junk", DEEP_LEVELS, MALLORY, USERS_GID)               # orphans walks it
    root_home.mkdir()
    os.chown(root_home, MALLORY, USERS_GID)
    os.chmod(root_home, 0o700)
    (root_home / "rootjunk").mkdir()
    make_deep(root_home / "rootjunk", DEEP_LEVELS, MALLORY, USERS_GID)            # diff walks it
    for junk in (store_home / "junk", root_home / "rootjunk"):
        (junk / "note").write_bytes(b"a file the walk reaches\n")

    storage_before = deep_digest(world.store)
    rootjunk_before = deep_digest(root_home / "rootjunk")
    decoys_before = {str(d): snapshot(d) for d in world.decoys()}
    host_before = host_snapshot()
    mounts_before = set(mountinfo_points())
    sandbox.write_config(CONFIG)
    watch = ChangeWatch(world.decoys())
    results = {}
    try:
        for command in ("apply", "status", "diff", "orphans", "unmount"):
            start = time.monotonic()
            results[command] = run_limited(sandbox.root, sandbox.config_path, sandbox.utab,
                                           command, fds=fds)
            seconds = time.monotonic() - start
            assert seconds < 30, (command, seconds)
            if command == "apply":
                applied_mounts = set(mountinfo_points()) - mounts_before
        events = watch.events()
    finally:
        watch.close()

    apply, status = results["apply"], results["status"]
    # The kept one is bound whole: nothing walks it, nothing fails.
    assert apply.returncode == 0 and one_line_each(apply) == [], apply.stderr[:2000]
    intended = {str(world.R / "var/log")} | {str(world.home("root", u) / e)
                                             for u in ("mallory", "alice") for e in USER_ENTRIES}
    assert applied_mounts == intended, sorted(applied_mounts ^ intended)
    assert status.returncode == 0 and one_line_each(status) == [], status.stderr[:2000]
    # diff and orphans walk the unkept ones until the fds run out (the path
    # is never spelled out to the kernel): one line, the deepest directory
    # reached and the cause; the rest of the report is made.
    for command, top in (("diff", root_home / "rootjunk"), ("orphans", store_home / "junk")):
        r = results[command]
        lines = one_line_each(r)
        assert r.returncode in (0, 1), (command, r.returncode, r.stderr[:2000])
        assert len(lines) <= 1, (command, [line[:200] for line in lines])
        for line in lines:
            assert line.startswith(f"impermanence: {top}/d/d/"), (command, line[:200])
            assert line.endswith(": Too many open files"), (command, line[-200:])
        shown = str(top.relative_to(world.R if command == "diff" else world.store))
        assert shown in r.stdout, (command, r.stdout[-2000:])
    unmount = results["unmount"]
    assert unmount.returncode == 0 and one_line_each(unmount) == [], unmount.stderr[:2000]
    assert set(mountinfo_points()) == mounts_before

    # Nothing outside the kept paths was touched, nothing in storage either.
    assert events == [], "decoys were changed:\n" + "\n".join(events)
    for d in world.decoys():
        assert snapshot(d) == decoys_before[str(d)], f"decoy {d} changed"
    assert host_snapshot() == host_before
    assert deep_digest(world.store) == storage_before
    assert deep_digest(root_home / "rootjunk") == rootjunk_before
    leaf = (".local", "share", "app") + ("d",) * DEEP_LEVELS + ("leaf",)
    assert storage_before[("home", "mallory") + leaf][0] == "file"


def move_deep_tree(sandbox, fds: int):
    """apply --root / (activation, in a chroot of R) of a new kept
    directory whose target holds a DEEP_LEVELS-deep tree, with only `fds`
    descriptors: (its result, R, the target, storage, deep_digest of both
    before)."""
    python = distro_python().path  # the distribution's, as the booted system has it
    R = sandbox.root
    store = tmpfs_at(R / "persistent")  # another filesystem: a copy, not a rename
    for d in ("usr", "proc", "run/t", "var/log", "home"):
        (R / d).mkdir(parents=True, exist_ok=True)
    (store / "var/log").mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + link):
            os.symlink(os.readlink("/" + link), R / link)
    subprocess.run(["mount", "--rbind", "/usr", str(R / "usr")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(R / "proc")], check=True)
    shutil.copy(SCRIPT, R / "run/t/impermanence_boot.py")
    home = R / "home/mallory"
    home.mkdir()
    os.chown(home, MALLORY, USERS_GID)
    (home / "data").mkdir()
    os.chown(home / "data", MALLORY, USERS_GID)
    (home / "data/top.txt").write_bytes(b"mallory's\n")
    make_deep(home / "data", DEEP_LEVELS, MALLORY, USERS_GID)
    cfg = {"users": {"mallory": {"uid": MALLORY, "group": "users"}},
           "groups": {"users": {"gid": USERS_GID}},
           "persistence": {"/persistent": {"directories": ["/var/log"],
                                           "users": {"mallory": {"directories": ["data"]}}}}}
    (R / "run/t/config.json").write_text(json.dumps(cfg))
    data_before, store_before = deep_digest(home / "data"), deep_digest(store)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    start = time.monotonic()
    r = subprocess.run([shutil.which("chroot"), str(R), python, "-I",
                        "/run/t/impermanence_boot.py", "--config", "/run/t/config.json", "apply"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                       env={"IMPERMANENCE_NO_KMSG": "1", "LIBMOUNT_UTAB": "/run/t/utab",
                            "PATH": "/usr/bin"}, preexec_fn=limit)
    assert time.monotonic() - start < 30
    return r, R, home / "data", store, data_before, store_before


@pytest.mark.parametrize("fds", [64, 1024])
def test_deep_tree_moved_into_storage_on_a_running_system(sandbox, tmp_path, fds):
    """The move of a DEEP_LEVELS-deep tree copies it level by level until
    the fds run out, then fails that entry with one line; both sides are
    as they were."""
    r, R, data, store, data_before, store_before = move_deep_tree(sandbox, fds)
    lines = one_line_each(r)
    assert r.returncode == 1, r.stderr[:2000]
    assert len(lines) == 1 and lines[0].startswith("impermanence: /home/mallory/data"), \
        [line[:300] for line in lines]
    assert os.path.ismount(R / "var/log") and not os.path.ismount(data)
    # Nothing lost on the root; storage holds what apply made for the entry
    # (its directories, empty) and nothing else: no half-made copy.
    assert deep_digest(data) == data_before
    after = deep_digest(store)
    added = {k: v for k, v in after.items() if k not in store_before}
    assert {k: v for k, v in store_before.items()} == {k: after[k] for k in store_before}
    assert set(added) <= {("home",), ("home", "mallory"), ("home", "mallory", "data")}, \
        sorted(added, key=len)[:10]


def test_deep_tree_moved_whole_when_the_fds_allow(sandbox):
    """With fds enough for the copy (two a level), a tree deeper than
    Python's recursion limit is moved like any other: copied, compared,
    its originals removed, the bind made."""
    assert DEEP_LEVELS > sys.getrecursionlimit()
    r, R, data, store, data_before, _ = move_deep_tree(sandbox, 4 * DEEP_LEVELS)
    assert r.returncode == 0 and one_line_each(r) == [], r.stderr[:2000]
    assert os.path.ismount(data) and os.path.ismount(R / "var/log")
    assert deep_digest(data) == data_before  # through the bind: storage's copy
    assert deep_digest(store / "home/mallory/data") == data_before
    assert not [p for p in os.listdir(data.parent) if p != "data"]  # nothing put aside left
