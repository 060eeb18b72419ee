"""apply in two processes (large configs, two CPUs): the split, and proof
on real mounts that it leaves exactly what one process leaves, says the
same in the same order, and finishes the second process's entries itself
when that process is killed."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SCRIPT, require, umount_tree
from reliability_support import assert_clean_messages, mounts_under, tree_digest

sys.path.insert(0, str(SCRIPT.parent))
import impermanence_boot as ib  # noqa: E402

ALICE, BOB, USERS = 1000, 1001, 100


def big_config(n_dirs: int = 40, n_files: int = 40) -> dict:
    """Entries under /etc, /var, /srv and two homes; nested entries of the
    same and of another storage; sources present and missing; and one
    failing entry under /etc and one under /var, so both halves fail one."""
    system_dirs = [f"/var/lib/svc{i:02d}" for i in range(n_dirs)]
    system_dirs += [f"/srv/site{i:02d}" for i in range(n_dirs // 2)]
    system_dirs += ["/var/lib/svc00/nested", {"directory": "/var/cache/app", "user": "alice", "mode": "0750"},
                    {"directory": "/var/lib/broken", "user": "nobody-such-user"}]
    files = [f"/etc/conf{i:02d}.conf" for i in range(n_files)]
    files += [{"file": f"/etc/link{i:02d}", "method": "symlink"} for i in range(n_files // 2)]
    files += ["/etc/machine-id", "/etc/occupied.conf"]
    user = {"directories": [f"work/p{i:02d}" for i in range(n_dirs // 2)] + [".local/share/app"],
            "files": [f".config/f{i:02d}" for i in range(n_files // 2)]}
    return {
        "users": {"alice": {"uid": ALICE, "group": "users"}, "bob": {"uid": BOB, "group": "users"}},
        "groups": {"users": {"gid": USERS}},
        "persistence": {
            "/persistent": {"directories": system_dirs, "files": files,
                            "users": {"alice": user, "bob": user}},
            "/persist2": {"directories": ["/var/lib/svc01/other", "/srv/site00/inner"],
                          "files": ["/var/lib/svc02/extra.conf"]},
        },
    }


def make_world(base: Path) -> Path:
    """A fresh tmpfs root with two tmpfs storages, seeded the same way each
    time: half the sources present, a non-empty file occupying one target."""
    root = base
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
    for storage in ("persistent", "persist2"):
        (root / storage).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", storage, str(root / storage)], check=True)
    s = root / "persistent"
    for i in range(0, 40, 2):
        (s / f"var/lib/svc{i:02d}").mkdir(parents=True)
        (s / f"var/lib/svc{i:02d}/state").write_text(f"svc {i}\n")
        (s / f"etc/conf{i:02d}.conf").parent.mkdir(exist_ok=True)
        (s / f"etc/conf{i:02d}.conf").write_text(f"conf {i}\n")
    (s / "etc/occupied.conf").write_text("kept\n")
    for who, uid in (("alice", ALICE), ("bob", BOB)):
        home = s / "home" / who
        (home / ".config").mkdir(parents=True)
        (home / ".config/f00").write_text("x\n")
        for p in (home, home / ".config", home / ".config/f00"):
            os.chown(p, uid, USERS)
        os.chmod(home, 0o700)
    (root / "persist2/var/lib/svc02").mkdir(parents=True)
    (root / "persist2/var/lib/svc02/extra.conf").write_text("extra\n")
    (root / "etc").mkdir()
    (root / "etc/occupied.conf").write_text("not ours\n")
    return root


def run_apply(root: Path, config: Path, jobs: str, *args: str, prefix: tuple = ()):
    env = dict(os.environ, IMPERMANENCE_NO_KMSG="1", IMPERMANENCE_JOBS=jobs)
    cmd = [*prefix, sys.executable, str(SCRIPT), "--root", str(root), "--config", str(config),
           *args, "apply"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=120)


def mounts_below(root: Path) -> list:
    """(path relative to root, fs root, source) of the mounts below root, sorted:
    which mounts exist, not the order the two processes made them in."""
    return sorted((os.path.relpath(point, root), fs_root, source)
                  for point, fs_root, _type, source in mounts_under(root) if point != str(root))


def messages(stderr: str, root: Path) -> list:
    """The lines, with the root as R and without the closing summary's time
    and process count."""
    return [re.sub(r", [0-9.]+ ms.*", "", line).replace(str(root), "R")
            for line in stderr.splitlines()]


@pytest.fixture
def worlds(namespace, tmp_path):
    made = []

    def make(name: str) -> Path:
        root = make_world(tmp_path / name)
        made.append(root)
        return root

    yield make
    for root in made:
        umount_tree(root)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(big_config()))
    return path


# --- The split ------------------------------------------------------------------

def entries_of(config: dict) -> list:
    return list(ib.load_config(json.dumps(config)).entries)


def split(entries: list, forced: bool):
    storages = {e.storage for e in entries}
    return ib.split_in_shares(entries, len(storages) > 1, forced)


def common_depth(a: tuple, b: tuple) -> int:
    depth = 0
    while depth < min(len(a), len(b)) and a[depth] == b[depth]:
        depth += 1
    return depth


def assert_shares_independent(entries: list, first: list, shares: list, meets: list) -> None:
    """Every entry run first or in exactly one span; `first` sorted, spans in entry
    order; and two entries of different shares meet only in a directory P
    that no kept path lies at or above, and that entries run before the
    shares put in place: those below P up to the first of each of the two
    entries' storages."""
    firsts = set(first)
    assert first == sorted(firsts)
    covered = sorted(k for share in shares for lo, hi in share for k in range(lo, hi))
    assert sorted(covered + first) == list(range(len(entries))), (covered, first)
    share_of = {}
    for number, share in enumerate(shares):
        assert share and all(lo < hi for lo, hi in share)
        pairs = ib.share_entries(share, entries)
        assert [k for k, _ in pairs] == sorted(k for k, _ in pairs)
        assert all(entries[k] is e for k, e in pairs)
        for k, _ in pairs:
            share_of[k] = number
    weights = [sum(2 if entries[k].kind == "directory" else 1 for lo, hi in share for k in range(lo, hi))
               for share in shares]
    assert weights == sorted(weights, reverse=True)
    targets = [e.target for e in entries]
    for a in range(len(entries)):
        for b in range(a + 1, len(entries)):
            if a in firsts or b in firsts or share_of[a] == share_of[b]:
                continue
            depth = common_depth(targets[a], targets[b])
            assert depth < len(targets[a]) and depth < len(targets[b]), (targets[a], targets[b])
            if depth == 0:
                continue
            meet = targets[a][:depth]
            assert not any(meet[:len(t)] == t for t in targets), (meet, targets[a], targets[b])
            # In one process, everything below P up to there runs before
            # them too: run first, it leaves the same state.
            assert any(path == meet and {entries[a].storage, entries[b].storage} <= set(storages)
                       for path, storages in meets), (meet, meets)
            below = [k for k in range(len(entries)) if targets[k][:depth] == meet]
            for storage in {entries[a].storage, entries[b].storage}:
                earliest = min(k for k in below if entries[k].storage == storage)
                assert all(k in firsts for k in below if k <= earliest), (meet, storage, targets[earliest])


def test_split_of_the_big_config_is_independent_and_balanced():
    entries = entries_of(big_config())
    first, shares, meets = split(entries, False)
    assert_shares_independent(entries, first, shares, meets)
    assert len(shares) >= 16
    # Shares of about 1/SHARES of the weight each: none near half of it.
    weight = lambda share: sum(2 if entries[k].kind == "directory" else 1
                               for lo, hi in share for k in range(lo, hi))
    total = sum(weight(share) for share in shares)
    assert max(weight(share) for share in shares) <= total // 8


NAMES = st.sampled_from(["a", "b", "c", "lib", "log", "x.conf"])
PATHS = st.lists(NAMES, min_size=1, max_size=4).map(tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(PATHS, st.sampled_from(["directory", "file"]),
                          st.sampled_from(["/persistent", "/persist2"])),
                min_size=2, max_size=60, unique_by=lambda t: t[0]),
       st.booleans())
def test_split_of_random_entries_is_independent(items, forced):
    entries = sorted((ib.Entry(kind, target, tuple(storage[1:].split("/")), ib.ROOT_PERMS, "auto",
                               None, None, None, "w") for target, kind, storage in items),
                     key=lambda e: e.target)
    result = split(entries, forced)
    if result is not None:
        assert_shares_independent(entries, *result)


@pytest.mark.parametrize("kept", [{"file": "/etc/passwd"}, {"file": "/etc/group"},
                                  {"directory": "/etc"}])
def test_no_split_when_the_account_files_are_kept(kept):
    config = big_config()
    key = "files" if "file" in kept else "directories"
    items = config["persistence"]["/persistent"][key]
    if "directory" in kept:  # /etc itself: nothing else below it
        config["persistence"]["/persistent"]["files"] = [
            f for f in config["persistence"]["/persistent"]["files"]
            if not (f if isinstance(f, str) else f["file"]).startswith("/etc/")]
    items.append(kept)
    assert split(entries_of(config), True) is None
    items.pop()
    assert split(entries_of(config), True) is not None


def test_entries_below_one_directory_split_below_it_unless_it_is_kept():
    one_top = {"persistence": {"/persistent": {"directories": [f"/var/d{i:03d}" for i in range(500)]}}}
    entries = entries_of(one_top)
    first, shares, meets = split(entries, False)
    # /var is where the shares meet: the first entry below it puts it in place.
    assert first == [0] and len(shares) > 8 and meets == [(("var",), (("persistent",),))]
    assert_shares_independent(entries, first, shares, meets)
    kept = {"persistence": {"/persistent": {"directories": ["/var"] + [f"/var/d{i:03d}" for i in range(500)]}}}
    assert split(entries_of(kept), True) is None  # all nested in /var: in order, in one process


def test_no_split_with_too_little_to_share_unless_forced():
    small = {"persistence": {"/persistent": {"directories": [f"/var/d{i}" for i in range(20)]}}}
    assert split(entries_of(small), False) is None
    first, shares, meets = split(entries_of(small), True)
    assert len(shares) > 1


def test_two_processes_wanted(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("IMPERMANENCE_JOBS", raising=False)
    assert ib.two_processes_wanted(ib.TWO_PROCESSES_MIN_ENTRIES - 1) is None
    assert ib.two_processes_wanted(ib.TWO_PROCESSES_MIN_ENTRIES) is False
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert ib.two_processes_wanted(10_000) is None
    monkeypatch.setenv("IMPERMANENCE_JOBS", "2")
    assert ib.two_processes_wanted(2) is True
    monkeypatch.setenv("IMPERMANENCE_JOBS", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ib.two_processes_wanted(10_000) is None


# --- On real mounts -----------------------------------------------------------------

def test_two_processes_leave_and_say_what_one_process_does(worlds, config_file, tmp_path):
    require(shutil.which("strace") is not None, "strace is not installed")
    one, two = worlds("one"), worlds("two")
    serial = run_apply(one, config_file, "1", "-v")
    trace = tmp_path / "two.trace"
    parallel = run_apply(two, config_file, "2", "-v",
                         prefix=("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=move_mount"))
    assert_clean_messages(serial.stderr)
    assert_clean_messages(parallel.stderr)
    # Both halves have a failing entry: exit 1, each named once, in order.
    assert serial.returncode == parallel.returncode == 1, parallel.stderr
    errors = [line for line in serial.stderr.splitlines()
              if not line.startswith("impermanence: fail ")
              and ("nobody-such-user" in line or "occupied.conf" in line)]
    assert len(errors) == 2, serial.stderr
    assert messages(parallel.stderr, two) == messages(serial.stderr, one)
    assert parallel.stderr.splitlines()[-1].endswith(", in two processes")
    assert not serial.stderr.splitlines()[-1].endswith(", in two processes")
    # Two processes really bound: move_mount(2) from two pids.
    pids = {line.split()[0] for line in trace.read_text().splitlines() if "move_mount(" in line}
    assert len(pids) == 2, trace.read_text()[:2000]
    # The same tree (storage included, through the mounts) and the same mounts.
    assert mounts_below(two) == mounts_below(one)
    assert len(mounts_below(one)) > 100
    assert tree_digest(two) == tree_digest(one)
    # A second apply changes nothing, in either mode.
    again = run_apply(two, config_file, "2")
    assert again.returncode == 1 and mounts_below(two) == mounts_below(one)
    assert tree_digest(two) == tree_digest(one)


def binds_only_config() -> dict:
    """40 directories, one share each when forced: every share binds."""
    return {"persistence": {"/persistent": {
        "directories": [f"/var/lib/d{i:02d}" for i in range(40)],
        "files": [{"file": f"/etc/l{i:02d}", "method": "symlink"} for i in range(10)]}}}


def test_second_process_killed_midway_its_shares_are_finished_here(worlds, tmp_path, monkeypatch,
                                                                   capfd):
    """In this process, so that the second process can be killed at a
    chosen point: the first waits before taking a share, the second takes
    shares and is killed (SIGKILL, as the OOM killer does) as it makes its
    third bind mount."""
    config = tmp_path / "binds.json"
    config.write_text(json.dumps(binds_only_config()))
    one, two = worlds("one"), worlds("two")
    assert run_apply(one, config, "1").returncode == 0
    monkeypatch.setenv("IMPERMANENCE_JOBS", "2")
    monkeypatch.setenv("IMPERMANENCE_NO_KMSG", "1")
    parent = os.getpid()
    binds = []
    real_attach, real_attach_at, real_take = ib.attach_mount, ib.attach_mount_at, ib.take_share
    waited = []

    def count_bind():
        if os.getpid() != parent:
            binds.append(True)
            if len(binds) == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    def attach_mount(tree, target_fd):
        count_bind()
        return real_attach(tree, target_fd)

    def attach_mount_at(tree, dir_fd, name):
        count_bind()
        return real_attach_at(tree, dir_fd, name)

    def take_share(queue_fd):
        if os.getpid() == parent and not waited:
            waited.append(True)
            time.sleep(0.5)
        return real_take(queue_fd)

    monkeypatch.setattr(ib, "attach_mount", attach_mount)
    monkeypatch.setattr(ib, "attach_mount_at", attach_mount_at)
    monkeypatch.setattr(ib, "take_share", take_share)
    capfd.readouterr()
    status = ib.main(["--root", str(two), "--config", str(config), "apply"])
    err = capfd.readouterr().err
    assert status == 0, err
    assert_clean_messages(err)
    lines = err.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"impermanence: apply: the second process was killed by signal 9 before it was done; "
        r"running its ([0-9]+) entries here", lines[0]), err
    assert int(lines[0].split("running its ")[1].split()[0]) >= 3
    # Nothing stacked, nothing missing: what one uninterrupted process leaves.
    assert mounts_below(two) == mounts_below(one)
    assert tree_digest(two) == tree_digest(one)


def test_a_failing_first_entry_leaves_the_rest_to_one_process(worlds, tmp_path):
    """The entry that would put /var/lib in place for the shares fails (its
    owner does not exist): the shares may not meet in a directory that is
    there, so the rest runs in this process, in order, as one process
    would run it."""
    config = tmp_path / "first.json"
    config.write_text(json.dumps({"persistence": {"/persistent": {"directories": [
        {"directory": "/var/lib/a-first", "user": "nobody-such-user"}]
        + [f"/var/lib/d{i:02d}" for i in range(30)]}}}))
    entries = entries_of(json.loads(config.read_text()))
    first, shares, meets = split(entries, True)
    assert entries[first[0]].target == ("var", "lib", "a-first")
    one, two = worlds("one"), worlds("two")
    serial = run_apply(one, config, "1", "-v")
    trace = tmp_path / "first.trace"
    parallel = run_apply(two, config, "2", "-v",
                         prefix=("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=move_mount"))
    assert serial.returncode == parallel.returncode == 1
    assert messages(parallel.stderr, two) == messages(serial.stderr, one)
    pids = {line.split()[0] for line in trace.read_text().splitlines() if "move_mount(" in line}
    assert len(pids) == 1, trace.read_text()[:2000]
    assert mounts_below(two) == mounts_below(one)
    assert len([m for m in mounts_below(one) if m[0].startswith("var/")]) == 30
    assert tree_digest(two) == tree_digest(one)


# --- kept directories whose entries run in another share ----------------------------------

def nested_config(seed: int) -> dict:
    """A random config of short paths under a few tops, so that kept
    directories hold entries of the same and of another storage, and some
    of them end up among the entries that run first while what lies below
    them goes into shares: files and directories, sources present or not."""
    import random
    rng = random.Random(seed)
    names = ["a", "b", "c", "lib", "x", "y"]
    dirs: set = set()
    files: set = set()
    locations = {"/persistent": {"directories": [], "files": []},
                 "/persist2": {"directories": [], "files": []}}
    while len(dirs) + len(files) < 300:
        comps = [rng.choice(["var", "srv", "opt"])] + \
            [rng.choice(names) + str(rng.randrange(3)) for _ in range(rng.randint(1, 4))]
        path = "/" + "/".join(comps)
        above = {"/" + "/".join(comps[:d]) for d in range(1, len(comps))}
        if path in dirs or path in files or above & files:
            continue
        where = locations["/persistent" if rng.random() < 0.75 else "/persist2"]
        if rng.random() < 0.5:
            where["directories"].append(path)
            dirs.add(path)
        elif not any(d.startswith(path + "/") for d in dirs | files):
            where["files"].append(path if rng.random() < 0.7 else {"file": path, "method": "symlink"})
            files.add(path)
    return {"persistence": locations}


def first_binds_behind_or_ahead(config: dict) -> bool:
    """Whether the split puts a kept directory among the first entries and
    something below it into a share."""
    entries = entries_of(config)
    split = ib.split_in_shares(entries, True, True)
    if split is None:
        return False
    first, shares, _meets = split
    in_share = {k for share in shares for lo, hi in share for k in range(lo, hi)}
    kept = [entries[k].target for k in first if entries[k].kind == "directory"]
    return any(entries[k].target[:len(t)] == t for t in kept for k in in_share)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 9])
def test_entries_below_a_first_kept_directory_in_two_processes(seed, tmp_path, namespace):
    config = nested_config(seed)
    assert first_binds_behind_or_ahead(config)
    path = tmp_path / "nested.json"
    path.write_text(json.dumps(config))
    results = {}
    for jobs in ("1", "2"):
        root = tmp_path / f"root{jobs}"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
        try:
            for storage in ("persistent", "persist2"):
                (root / storage).mkdir()
                subprocess.run(["mount", "-t", "tmpfs", storage, str(root / storage)], check=True)
            for storage, location in config["persistence"].items():  # half the file sources present
                for item in location["files"][::2]:
                    if isinstance(item, str):
                        source = root / storage.lstrip("/") / item.lstrip("/")
                        source.parent.mkdir(parents=True, exist_ok=True)
                        source.write_text("kept\n")
            first = run_apply(root, path, jobs, "-v")
            again = run_apply(root, path, jobs, "-v")
            assert first.returncode == 0, first.stderr[-3000:]
            assert again.returncode == 0 and again.stderr.splitlines()[:-1] == [], again.stderr[-3000:]
            results[jobs] = (messages(first.stderr, root)[:-1], mounts_below(root), tree_digest(root))
        finally:
            umount_tree(root)
    assert results["2"][0] == results["1"][0]
    assert results["2"][1:] == results["1"][1:]
