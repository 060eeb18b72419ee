"""Faults: broken, full, late, wrong or corrupt storage; bad accounts and
modes; conflicting entries; an occupied target; apply killed with SIGKILL.

For each: the exit status, one `impermanence: <path>: <cause>` line naming
the path and the cause, and proof, by checksumming every file in storage
(or the whole device image) before and after, that nothing in storage was
lost, truncated or changed.
"""
from __future__ import annotations

import gc
import hashlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support import (SCRIPT, mounted, mountinfo_points, mounts_under, require, run_on,
                     strace_prefix, assert_clean_messages, snapshot, storage_damage, tree_digest)

ALICE, USERS_GID = 1000, 100


def label() -> str:
    return "f" + secrets.token_hex(6)


def image_sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SEED = {
    "var/log/boot.log": b"old log\n",
    "etc/kept.conf": b"kept configuration\n",
    "home/alice/Documents/letter.txt": b"dear bob\n",
    "home/alice/.bashrc": b"export PS1='$ '\n",
}


def seed(directory: Path) -> None:
    for rel, body in SEED.items():
        p = directory / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
    for p in ("home/alice", "home/alice/Documents", "home/alice/Documents/letter.txt",
              "home/alice/.bashrc"):
        os.chown(directory / p, ALICE, USERS_GID)
    os.chmod(directory / "home/alice", 0o700)


def persistence(**extra) -> dict:
    location = {
        "directories": ["/var/log", "/var/lib/new"],
        "files": ["/etc/machine-id", "/etc/kept.conf"],
        "users": {"alice": {"directories": ["Documents", ".cache/new"], "files": [".bashrc"]}},
    }
    location.update(extra)
    return location


def config(fs: dict | None, **extra) -> dict:
    cfg = {
        "users": {"alice": {"uid": ALICE, "group": "users"}},
        "groups": {"users": {"gid": USERS_GID}},
        "deviceTimeout": 5,
        "persistence": {"/persistent": persistence()},
    }
    if fs is not None:
        cfg["fileSystems"] = {"/persistent": fs}
    cfg.update(extra)
    return cfg


@pytest.fixture
def seeded_disk(loop_disk, tmp_path):
    """A labelled ext4 loop device holding SEED."""
    def make(size_mb: int = 32, mkfs=("mkfs.ext4", "-q", "-F", "-L")):
        disk = loop_disk(label(), size_mb=size_mb, mkfs=mkfs)
        with mounted(disk.device, tmp_path / f"seed-{disk.label}") as view:
            seed(view)
        return disk
    return make


def device_files(device: str, tmp_path: Path) -> dict:
    """A checksum of every file on the device, through a private ro mount."""
    with mounted(device, tmp_path / f"view-{secrets.token_hex(3)}", "-o", "ro") as view:
        snap = snapshot(view)
    return {k: v for k, v in snap.items() if not k.startswith("lost+found")}


def messages(result) -> list[str]:
    assert_clean_messages(result.stderr)
    return result.stderr.splitlines()


def one_line_naming(result, path: str, cause: str) -> str:
    lines = [l for l in messages(result) if l.startswith(f"impermanence: {path}: ") and cause in l]
    assert len(lines) == 1, f"want one line for {path} with {cause!r}:\n{result.stderr}"
    return lines[0]


def in_place(sandbox, target: str, storage: str = "/persistent") -> bool:
    t = os.lstat(sandbox.path(target))
    s = os.lstat(sandbox.path(storage + target))
    return (t.st_dev, t.st_ino) == (s.st_dev, s.st_ino)


# --- storage faults ---------------------------------------------------------------

def test_read_only_storage(sandbox, seeded_disk, tmp_path):
    disk = seeded_disk()
    image_before = image_sum(disk.image)
    files_before = device_files(disk.device, tmp_path)
    result = sandbox.run("apply", config=config({"device": disk.device, "fsType": "ext4",
                                                 "options": ["ro"]}))
    assert result.returncode == 1, result.stderr
    R = sandbox.root
    # Entries whose source must be created fail, each on one line.
    one_line_naming(result, f"{R}/persistent/var/lib", "Read-only file system")
    one_line_naming(result, f"{R}/persistent/etc/machine-id", "Read-only file system")
    one_line_naming(result, f"{R}/persistent/home/alice/.cache", "Read-only file system")
    assert len(messages(result)) == 3
    # The others are in place.
    for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/home/alice/.bashrc"):
        assert in_place(sandbox, target), target
    subprocess.run(["umount", "-R", str(R)], check=False)
    assert device_files(disk.device, tmp_path) == files_before
    assert image_sum(disk.image) == image_before


def fill(directory: Path) -> None:
    """Fill a filesystem: blocks with one big file, inodes with empty files."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    os.sync()
    # Root may use the last blocks of the reserve: take them too.
    i = 0
    try:
        while True:
            (directory / f"small{i}").write_bytes(b"x" * 1024)
            i += 1
    except OSError:
        pass


def test_full_storage(sandbox, seeded_disk, tmp_path):
    disk = seeded_disk(size_mb=4, mkfs=("mkfs.ext4", "-q", "-F", "-m", "0", "-N", "64", "-L"))
    with mounted(disk.device, tmp_path / "fill") as view:
        fill(view)
    files_before = device_files(disk.device, tmp_path)
    result = sandbox.run("apply", config=config({"device": disk.device}))
    assert result.returncode == 1, result.stderr
    R = sandbox.root
    one_line_naming(result, f"{R}/persistent/var/lib", "No space left on device")
    one_line_naming(result, f"{R}/persistent/home/alice/.cache", "No space left on device")
    one_line_naming(result, f"{R}/persistent/etc/machine-id", "No space left on device")
    for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/home/alice/.bashrc"):
        assert in_place(sandbox, target), target
    subprocess.run(["umount", "-R", str(R)], check=False)
    after = device_files(disk.device, tmp_path)
    assert storage_damage(files_before, after) == []
    # A failed write leaves no half-made file behind for the next boot.
    assert "etc/machine-id" not in after
    assert set(after) == set(files_before)


def test_device_appears_after_two_seconds(sandbox, loop_disk, tmp_path):
    disk = loop_disk(label())
    with mounted(disk.device, tmp_path / "seed") as view:
        seed(view)
    files_before = device_files(disk.device, tmp_path)
    subprocess.run(["losetup", "-d", disk.device], check=True)
    late: list[str] = []

    def attach():
        time.sleep(2)
        late.append(subprocess.run(["losetup", "-f", "--show", str(disk.image)], check=True,
                                   capture_output=True, text=True).stdout.strip())

    thread = threading.Thread(target=attach)
    started = time.monotonic()
    thread.start()
    try:
        result = sandbox.run("apply", config=config({"device": f"LABEL={disk.label}"},
                                                    deviceTimeout=15))
        elapsed = time.monotonic() - started
        thread.join()
        assert result.returncode == 0, result.stderr
        assert 2 <= elapsed < 15
        for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/home/alice/.bashrc",
                       "/var/lib/new", "/etc/machine-id"):
            assert in_place(sandbox, target), target
        subprocess.run(["umount", "-R", str(sandbox.root)], check=False)
        assert storage_damage(files_before, device_files(late[0], tmp_path)) == []
    finally:
        thread.join()
        for device in late:
            subprocess.run(["losetup", "-d", device], stderr=subprocess.DEVNULL)


def test_device_never_appears(sandbox, tmp_path):
    missing = label()
    started = time.monotonic()
    result = sandbox.run("apply", config=config({"device": f"LABEL={missing}"}, deviceTimeout=1))
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert 1 <= elapsed < 10
    one_line_naming(result, f"LABEL={missing}", "device did not appear within 1 s")
    assert mounts_under(sandbox.root) == [(str(sandbox.root), "/", "tmpfs", "fresh-root")]
    assert not sandbox.path("/var/log").exists()


def test_wrong_fstype(sandbox, seeded_disk, tmp_path):
    disk = seeded_disk()
    image_before = image_sum(disk.image)
    other = tmp_path / "root" / "state"
    other.mkdir()
    (other / "srv").mkdir()
    (other / "srv/data").mkdir()
    cfg = config({"device": disk.device, "fsType": "vfat"})
    cfg["persistence"]["/state"] = {"directories": ["/srv/data"]}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 3, result.stderr
    R = sandbox.root
    one_line_naming(result, f"{R}/persistent", f"cannot mount {disk.device}")
    one_line_naming(result, "/persistent", "entries not applied")
    # Nothing bound from the missing storage; the other location applied.
    assert not (R / "var/log").exists() and not (R / "home").exists()
    assert in_place(sandbox, "/srv/data", "/state")
    points = [p for p, *_ in mounts_under(R)]
    assert points == [str(R), str(R / "srv/data")]
    assert image_sum(disk.image) == image_before


@pytest.mark.parametrize("damage", ["fields", "magic"])
def test_corrupt_superblock(sandbox, seeded_disk, tmp_path, damage):
    disk = seeded_disk()
    with open(disk.image, "r+b") as f:
        if damage == "fields":
            # Magic intact (so it probes as ext4) but block size and the
            # inode count are nonsense.
            f.seek(1024)
            f.write(b"\0\0\0\0")          # s_inodes_count = 0
            f.seek(1024 + 24)
            f.write(b"\xff\x00\x00\x00")  # s_log_block_size = 255
        else:
            f.seek(1024)
            f.write(b"\0" * 1024)         # the whole primary superblock
    image_before = image_sum(disk.image)
    subprocess.run(["losetup", "-c", disk.device], check=True)  # drop cached pages
    result = sandbox.run("apply", config=config({"device": disk.device}))
    assert result.returncode == 3, result.stderr
    R = sandbox.root
    one_line_naming(result, f"{R}/persistent", f"cannot mount {disk.device}")
    assert mounts_under(R) == [(str(R), "/", "tmpfs", "fresh-root")]
    assert not (R / "var/log").exists()
    assert image_sum(disk.image) == image_before


# --- accounts, modes and entries ----------------------------------------------------

def tmpfs_storage(sandbox) -> Path:
    store = sandbox.path("/persistent")
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist", str(store)], check=True)
    seed(store)
    return store


@pytest.mark.parametrize("who", ["user", "group"])
def test_unknown_user_or_group(sandbox, who):
    store = tmpfs_storage(sandbox)
    before = snapshot(store)
    cfg = config(None)
    cfg["persistence"]["/persistent"]["directories"].append(
        {"directory": "/srv/ghost", who: "no-such-" + who})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1, result.stderr
    (line,) = [l for l in messages(result) if "no-such-" in l]
    assert f"unknown {who}" in line
    assert str(sandbox.path("/srv/ghost")) in line, "the message must name the entry's path"
    assert not sandbox.path("/persistent/srv/ghost").exists()
    assert not sandbox.path("/srv/ghost").exists()
    assert len(messages(result)) == 1
    for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/var/lib/new"):
        assert in_place(sandbox, target), target
    assert storage_damage(before, snapshot(store)) == []


# chown(2) takes (uid_t) -1 as "leave unchanged": 4294967295 would leave a
# directory root's, the fault SPEC 5 names; larger ones do not fit at all.
BAD_IDS = [4294967295, 99999999999, "4294967295", "0" * 5 + "99999999999", "9" * 5000, -1]


ID_CASES = [(where, value) for where in ("uid", "gid", "user", "group") for value in BAD_IDS
            if where in ("user", "group") or isinstance(value, int)]  # uid, gid: numbers only


@pytest.mark.parametrize("where,value", ID_CASES, ids=[f"{w}-{str(v)[:16]}" for w, v in ID_CASES])
def test_out_of_range_id_is_a_config_error(sandbox, where, value):
    tmpfs_storage(sandbox)
    cfg = config(None)
    if where == "uid":
        cfg["users"]["alice"]["uid"] = value
        key = 'users.alice.uid'
    elif where == "gid":
        cfg["groups"]["users"]["gid"] = value
        key = 'groups.users.gid'
    else:
        cfg["persistence"]["/persistent"]["directories"].append({"directory": "/srv/x", where: value})
        key = f'persistence["/persistent"].directories[2].{where}'
    line = unchanged_config_error(sandbox, cfg, key)
    assert "not a valid id" in line or "must be" in line, line
    assert sandbox.run("check").returncode == 2


def test_a_name_of_non_ascii_digits_is_a_name(sandbox):
    # "²".isdigit() is true, int("²") fails: the name is looked up as a
    # name, that one entry fails, the others are applied.
    store = tmpfs_storage(sandbox)
    before = snapshot(store)
    cfg = config(None)
    cfg["persistence"]["/persistent"]["directories"].append({"directory": "/srv/sq", "user": "\u00b2"})
    assert sandbox.run("check", config=cfg).returncode == 0
    result = sandbox.run("apply")
    assert result.returncode == 1, result.stderr
    (line,) = messages(result)
    assert "user \u00b2: unknown user" in line and str(sandbox.path("/srv/sq")) in line, line
    for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/var/lib/new"):
        assert in_place(sandbox, target), target
    assert storage_damage(before, snapshot(store)) == []


def test_an_unexpected_error_in_one_entry_stops_no_other(sandbox, monkeypatch, capfd):
    # A bug (any exception) in one entry's work: that entry fails with one
    # line, every other entry is still applied, planned and reported.
    import impermanence_boot as ib
    store = tmpfs_storage(sandbox)
    sandbox.write_config(config(None))
    real_plan = ib.plan_entry

    def plan_entry(entry, tree, accounts):
        if entry.target == ("var", "log"):
            raise RuntimeError("injected")
        return real_plan(entry, tree, accounts)

    monkeypatch.setattr(ib, "plan_entry", plan_entry)
    monkeypatch.setattr(ib, "entry_status", lambda entry, *rest: (_ for _ in ()).throw(
        RuntimeError("injected")) if entry.target == ("var", "log") else ("ok", "fine"))
    monkeypatch.setenv("IMPERMANENCE_NO_KMSG", "1")
    args = ["--root", str(sandbox.root), "--config", str(sandbox.config_path)]
    # main() sets umask 0 and turns the cyclic collector off: this process's own.
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        in_process_runs(ib, args, sandbox, capfd)
    finally:
        os.umask(umask)
        gc.enable()
    assert store.is_dir()


def in_process_runs(ib, args: list, sandbox, capfd) -> None:
    capfd.readouterr()
    assert ib.main([*args, "plan"]) == 0
    out = capfd.readouterr().out
    assert f"fail {sandbox.path('/var/log')}: internal error: RuntimeError: injected" in out
    assert str(sandbox.path("/var/lib/new")) in out
    assert ib.main([*args, "apply"]) == 1
    err = capfd.readouterr().err
    assert err == f"impermanence: {sandbox.path('/var/log')}: internal error: RuntimeError: injected\n"
    for target in ("/etc/kept.conf", "/home/alice/Documents", "/var/lib/new"):
        assert in_place(sandbox, target), target
    assert not sandbox.path("/var/log").exists()
    assert ib.main([*args, "status"]) == 1
    out = capfd.readouterr().out
    assert sum("internal error: RuntimeError: injected" in line for line in out.splitlines()) == 1


def test_entries_inside_a_kept_directory_whose_owner_is_unknown_fail_with_it(sandbox):
    # /srv/ghost's owner cannot be resolved. Its entries would make its
    # source as a plain root-owned parent, and the next run would then
    # bind that over them: they fail with it, run after run.
    store = tmpfs_storage(sandbox)
    before = snapshot(store)
    cfg = config(None)
    cfg["persistence"]["/persistent"]["directories"] += [
        {"directory": "/srv/ghost", "user": "no-such-user"}, "/srv/ghost/inner/dir"]
    cfg["persistence"]["/persistent"]["files"].append("/srv/ghost/notes.txt")
    runs = []
    for _ in range(2):
        result = sandbox.run("apply", config=cfg)
        assert result.returncode == 1, result.stderr
        runs.append((messages(result), tree_digest(sandbox.root)))
    lines = runs[0][0]
    assert len(lines) == 3 and all("user no-such-user: unknown user" in l for l in lines), lines
    for target in ("/srv/ghost", "/srv/ghost/inner/dir", "/srv/ghost/notes.txt"):
        assert any(l.endswith(f"(for {sandbox.path(target)})") for l in lines), target
    assert runs[1] == runs[0]
    assert not sandbox.path("/persistent/srv/ghost").exists()
    for target in ("/var/log", "/etc/kept.conf", "/home/alice/Documents", "/var/lib/new"):
        assert in_place(sandbox, target), target
    assert storage_damage(before, snapshot(store)) == []


def test_what_a_failed_entry_made_is_seen_by_the_next(sandbox):
    # /opt/y/x1/lib0 fails on the root (a file there) after making its
    # storage parent /persistent/opt/y/x1, inside /persistent/opt/y that an
    # earlier entry made. The next entry, in that same parent, must find
    # it there, not make it again: the run is the same as the one after.
    store = tmpfs_storage(sandbox)
    (sandbox.path("/opt/y/x1")).mkdir(parents=True)
    sandbox.path("/opt/y/x1/lib0").write_text("in the way\n")
    cfg = {"persistence": {"/persistent": {"directories": ["/opt/y/x1/lib0"],
                                           "files": ["/opt/y/b0/a/b", "/opt/y/x1/x0"]}}}
    runs = []
    for _ in range(2):
        result = sandbox.run("apply", config=cfg)
        assert result.returncode == 1, result.stderr
        runs.append((messages(result), tree_digest(sandbox.root)))
    (line,) = runs[0][0]
    assert line.endswith("target is a non-empty file, not a directory; left as it is"), line
    assert runs[1] == runs[0]
    assert os.readlink(sandbox.path("/opt/y/x1/x0")) == "/persistent/opt/y/x1/x0"
    assert (store / "opt/y/x1/lib0").is_dir()


# (null is the default mode: the evaluated NixOS option holds it so.)
BAD_MODES = ["0999", "8", "12345", "", "u=rwz", "u", "rwx", "-1", "0o755", "u=rwx,,", "a=r x",
             " 0755", "0755\n", "٧٥٥", 755, True, ["0755"], {"mode": "0755"}]


def unchanged_config_error(sandbox, cfg, where: str) -> str:
    before = tree_digest(sandbox.root)
    mounts = mounts_under(sandbox.root)
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 2, result.stderr
    (line,) = messages(result)
    assert line.startswith(f"impermanence: {sandbox.config_path}: {where}: "), line
    assert tree_digest(sandbox.root) == before
    assert mounts_under(sandbox.root) == mounts
    return line


@pytest.mark.parametrize("mode", BAD_MODES, ids=[repr(m) for m in BAD_MODES])
def test_bad_mode_changes_nothing(sandbox, mode):
    tmpfs_storage(sandbox)
    cfg = config(None)
    cfg["persistence"]["/persistent"]["directories"].append({"directory": "/srv/x", "mode": mode})
    line = unchanged_config_error(sandbox, cfg, 'persistence["/persistent"].directories[2].mode')
    assert "mode" in line


CONFLICTS = {
    "same directory twice": (
        {"directories": ["/var/log", "/var/log"]},
        'persistence["/persistent"].directories[1]', 'directories[0]'),
    "directory and file": (
        {"directories": ["/etc/kept.conf"], "files": ["/etc/kept.conf"]},
        'persistence["/persistent"]', "listed twice"),
    "user and system entry": (
        {"directories": ["/home/alice/Documents"], "users": {"alice": {"directories": ["Documents"]}}},
        'persistence["/persistent"]', "listed twice"),
    "two locations": (
        None, 'persistence["/persistent', "listed twice"),
    "inside a kept file": (
        {"files": ["/etc/kept.conf"], "directories": ["/etc/kept.conf/sub"]},
        'persistence["/persistent"].directories[0]', "inside the kept file"),
    "over the storage path": (
        {"directories": ["/persistent/var"]},
        'persistence["/persistent"].directories[0]', "overlaps the persistent storage path"),
    "above the storage path": (
        {"directories": ["/persist"]},
        'persistence["/persist/data"].directories[0]', "overlaps"),
}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_duplicate_and_overlapping_entries(sandbox, case):
    tmpfs_storage(sandbox)
    location, where, cause = CONFLICTS[case]
    cfg = config(None)
    if case == "two locations":
        cfg["persistence"] = {"/persistent": {"directories": ["/var/log"]},
                              "/persistent2": {"directories": ["/var/log"]}}
    elif case == "above the storage path":
        cfg["persistence"] = {"/persist/data": location}
    else:
        cfg["persistence"] = {"/persistent": location}
    before = tree_digest(sandbox.root)
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 2, result.stderr
    (line,) = messages(result)
    assert line.startswith(f"impermanence: {sandbox.config_path}: {where}"), line
    assert cause in line, line
    assert tree_digest(sandbox.root) == before


@pytest.mark.parametrize("source", ["exists", "missing"])
def test_non_empty_file_at_target(sandbox, source):
    store = tmpfs_storage(sandbox)
    if source == "missing":
        (store / "etc/kept.conf").unlink()
    target = sandbox.path("/etc/kept.conf")
    target.parent.mkdir()
    target.write_bytes(b"the fresh root's own file\n")
    before = snapshot(store)
    result = sandbox.run("apply", config=config(None))
    assert result.returncode == 1, result.stderr
    cause = "not empty; not overwritten" if source == "exists" else "not replaced by a link"
    one_line_naming(result, str(target), cause)
    assert len(messages(result)) == 1
    assert target.read_bytes() == b"the fresh root's own file\n"
    assert str(target) not in mountinfo_points()
    for t in ("/var/log", "/home/alice/Documents", "/home/alice/.bashrc", "/etc/machine-id"):
        assert in_place(sandbox, t), t
    assert storage_damage(before, snapshot(store)) == []


# --- SIGKILL in the middle, then apply or unmount again ------------------------------

def big_config() -> dict:
    dirs = [f"/srv/d{i:02d}" for i in range(40)] + [f"/var/lib/svc{i:02d}/state" for i in range(20)]
    files = [f"/etc/f{i:02d}.conf" for i in range(30)] + ["/etc/machine-id"]
    user = {"directories": [f".local/share/a{i:02d}" for i in range(20)],
            "files": [f".config/c{i:02d}" for i in range(20)]}
    return {"users": {"alice": {"uid": ALICE, "group": "users"}},
            "groups": {"users": {"gid": USERS_GID}},
            "persistence": {"/persistent": {"directories": dirs, "files": files,
                                            "users": {"alice": user}}}}


def big_world(root: Path) -> Path:
    """Storage with half of big_config's sources present (the rest apply creates)."""
    store = root / "persistent"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist", str(store)], check=True)
    for i in range(0, 40, 2):
        (store / f"srv/d{i:02d}").mkdir(parents=True, exist_ok=True)
        (store / f"srv/d{i:02d}/data").write_bytes(b"d%d" % i)
    for i in range(0, 30, 2):
        (store / "etc").mkdir(exist_ok=True)
        (store / f"etc/f{i:02d}.conf").write_bytes(b"f%d" % i)
    home = store / "home/alice"
    (home / ".config").mkdir(parents=True)
    for p in (home, home / ".config"):
        os.chown(p, ALICE, USERS_GID)
    os.chmod(home, 0o700)
    for i in range(0, 20, 3):
        (home / f".config/c{i:02d}").write_bytes(b"c%d" % i)
        os.chown(home / f".config/c{i:02d}", ALICE, USERS_GID)
    return store


def state_of(root: Path) -> tuple:
    """Mounts (relative to root, no ids) and the whole tree as seen from root."""
    mounts = [(os.path.relpath(p, root), fs_root, t) for p, fs_root, t, _s in mounts_under(root)]
    return mounts, tree_digest(root)


@pytest.fixture
def reference(namespace, tmp_path):
    """The state one uninterrupted apply produces on a fresh world."""
    root = tmp_path / "reference"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
    big_world(root)
    cfg_path = tmp_path / "big.json"
    import json
    cfg_path.write_text(json.dumps(big_config()))
    result = run_on(root, cfg_path, "apply")
    assert result.returncode == 0, result.stderr
    state = state_of(root)
    subprocess.run(["umount", "-R", "-l", str(root)])
    return cfg_path, state


# Syscalls that change something (plus openat, as "anywhere"). strace kills
# the process on entry to the K-th call of one of them, before it runs.
KILL_SYSCALLS = ["mkdirat", "fchown", "fchmod", "renameat2", "utimensat", "openat", "write",
                 "symlinkat", "unlinkat", "open_tree", "move_mount"]
FRACTIONS = {"first": 0.0, "quarter": 0.25, "half": 0.5, "three-quarters": 0.75, "last": 1.0}
_counts: dict = {}


def strace_apply(root: Path, cfg_path: Path, out: Path, inject: str | None = None,
                 trace: list = KILL_SYSCALLS):
    return run_on(root, cfg_path, "apply", prefix=strace_prefix(out, ",".join(trace), inject))


def syscall_counts(tmp_path: Path, cfg_path: Path) -> dict:
    """How often one uninterrupted apply of big_config makes each call."""
    if not _counts:
        root = tmp_path / "count"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
        big_world(root)
        trace = tmp_path / "count.trace"
        result = strace_apply(root, cfg_path, trace)
        assert result.returncode == 0, result.stderr
        subprocess.run(["umount", "-R", "-l", str(root)])
        for line in trace.read_text().splitlines():
            parts = line.split(None, 1)
            name = parts[1].split("(", 1)[0] if len(parts) == 2 else ""
            if name in KILL_SYSCALLS:
                _counts[name] = _counts.get(name, 0) + 1
    return _counts


def apply_killed_at(root: Path, cfg_path: Path, tmp_path: Path, syscall: str, fraction: str) -> int:
    require(shutil.which("strace") is not None, "strace is not installed")
    counts = syscall_counts(tmp_path, cfg_path)
    assert counts.get(syscall), f"apply never calls {syscall}: {counts}"
    k = 1 + round(FRACTIONS[fraction] * (counts[syscall] - 1))
    trace = tmp_path / "kill.trace"
    strace_apply(root, cfg_path, trace, f"inject={syscall}:signal=KILL:when={k}")
    assert "+++ killed by SIGKILL +++" in trace.read_text(), f"not killed at {syscall} #{k}"
    return k


KILL_CASES = [(s, f) for s in KILL_SYSCALLS for f in FRACTIONS]


@pytest.mark.parametrize("syscall,fraction", KILL_CASES, ids=[f"{s}-{f}" for s, f in KILL_CASES])
def test_sigkill_then_apply_again(sandbox, reference, tmp_path, syscall, fraction):
    cfg_path, want = reference
    store = big_world(sandbox.root)
    before = snapshot(store)
    apply_killed_at(sandbox.root, cfg_path, tmp_path, syscall, fraction)
    assert storage_damage(before, snapshot(store)) == []
    result = run_on(sandbox.root, cfg_path, "apply")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert state_of(sandbox.root) == want
    assert storage_damage(before, snapshot(store)) == []


def test_kernel_without_open_tree_gets_mount_on_proc_fds(sandbox, reference, tmp_path):
    # Before Linux 5.2 (or under a seccomp filter) open_tree(2) fails with
    # ENOSYS: binds then go through mount(2) on /proc/self/fd, same result.
    require(shutil.which("strace") is not None, "strace is not installed")
    cfg_path, want = reference
    store = big_world(sandbox.root)
    before = snapshot(store)
    trace = tmp_path / "enosys.trace"
    result = strace_apply(sandbox.root, cfg_path, trace, "inject=open_tree:error=ENOSYS",
                          trace=["open_tree", "move_mount", "mount"])
    assert result.returncode == 0, result.stderr
    calls = trace.read_text()
    assert calls.count("open_tree(") == 1  # tried once, then not again
    assert "move_mount(" not in calls
    binds = [m for m in want[0] if m[0] not in (".", "persistent")]  # not the root, not storage
    assert calls.count('mount("/proc/self/fd/') == len(binds) > 0
    assert state_of(sandbox.root) == want
    assert storage_damage(before, snapshot(store)) == []


UNMOUNT_CASES = [(s, f) for s in KILL_SYSCALLS for f in ("half", "last")]


@pytest.mark.parametrize("syscall,fraction", UNMOUNT_CASES,
                         ids=[f"{s}-{f}" for s, f in UNMOUNT_CASES])
def test_sigkill_then_unmount(sandbox, reference, tmp_path, syscall, fraction):
    cfg_path, want = reference
    store = big_world(sandbox.root)
    before = snapshot(store)
    apply_killed_at(sandbox.root, cfg_path, tmp_path, syscall, fraction)
    partial_storage = snapshot(store)
    result = run_on(sandbox.root, cfg_path, "unmount")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # Every bind mount and link is gone; storage is exactly as apply left it.
    assert [p for p, *_ in mounts_under(sandbox.root)] == [str(sandbox.root), str(store)]
    links = [p for p, v in snapshot(sandbox.root, follow_mounts=False).items() if v[0] == "link"]
    assert links == []
    assert snapshot(store) == partial_storage
    assert storage_damage(before, partial_storage) == []
    # And the next apply completes the job.
    result = run_on(sandbox.root, cfg_path, "apply")
    assert result.returncode == 0, result.stderr
    assert state_of(sandbox.root) == want


def test_unmount_after_apply_with_failed_entries(sandbox):
    store = tmpfs_storage(sandbox)
    target = sandbox.path("/etc/kept.conf")
    target.parent.mkdir()
    target.write_bytes(b"occupied\n")
    result = sandbox.run("apply", config=config(None))
    assert result.returncode == 1
    applied_storage = snapshot(store)
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert [p for p, *_ in mounts_under(sandbox.root)] == [str(sandbox.root), str(store)]
    assert target.read_bytes() == b"occupied\n"
    assert snapshot(store) == applied_storage
