"""apply in two processes (large configs, two CPUs): the split, and proof
on real mounts that it leaves exactly what one process leaves, says the
same in the same order, and finishes the second process's entries itself
when that process is killed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    return ib.load_config(json.dumps(config)).entries


def test_split_keeps_each_top_directory_in_one_process_in_order():
    entries = entries_of(big_config())
    mine, theirs = ib.split_in_two(entries, False)
    tops = [{e.target[0] for _, e in half} for half in (mine, theirs)]
    assert tops[0] and tops[1] and not tops[0] & tops[1]
    assert sorted(i for i, _ in mine + theirs) == list(range(len(entries)))
    for half in (mine, theirs):
        assert [i for i, _ in half] == sorted(i for i, _ in half)
        assert all(entries[i] is e for i, e in half)
    # Balanced by weight (a directory 2, a file 1): the halves differ by
    # no more than the heaviest group.
    weight = lambda half: sum(2 if e.kind == "directory" else 1 for _, e in half)
    groups: dict = {}
    for e in entries:
        groups[e.target[0]] = groups.get(e.target[0], 0) + (2 if e.kind == "directory" else 1)
    assert abs(weight(mine) - weight(theirs)) <= max(groups.values())


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
    assert ib.split_in_two(entries_of(config), True) is None


def test_no_split_with_one_top_directory_or_too_little_to_share():
    one_top = {"persistence": {"/persistent": {"directories": [f"/var/d{i}" for i in range(500)]}}}
    assert ib.split_in_two(entries_of(one_top), True) is None
    lopsided = {"persistence": {"/persistent": {
        "directories": [f"/var/d{i}" for i in range(500)] + [f"/srv/d{i}" for i in range(10)]}}}
    assert ib.split_in_two(entries_of(lopsided), False) is None
    mine, theirs = ib.split_in_two(entries_of(lopsided), True)
    assert {e.target[0] for _, e in theirs} == {"srv"}


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


def fill_in_order_config() -> dict:
    """The heavier half (kept by the first process) makes no bind mounts:
    symbolic links only; the second process binds 10 directories."""
    return {"persistence": {"/persistent": {
        "directories": [f"/var/lib/d{i}" for i in range(10)],
        "files": [{"file": f"/etc/l{i:02d}", "method": "symlink"} for i in range(30)]}}}


def test_second_process_killed_midway_its_entries_are_finished_here(worlds, tmp_path):
    require(shutil.which("strace") is not None, "strace is not installed")
    config = tmp_path / "fill.json"
    config.write_text(json.dumps(fill_in_order_config()))
    mine, theirs = ib.split_in_two(entries_of(fill_in_order_config()), True)
    assert {e.target[0] for _, e in mine} == {"etc"} and {e.target[0] for _, e in theirs} == {"var"}
    one, two = worlds("one"), worlds("two")
    assert run_apply(one, config, "1").returncode == 0
    # Killed as it starts its 8th bind: 7 are made, 3 are left to this
    # process, which binds fewer than 8, so only the second process is hit.
    trace = tmp_path / "kill.trace"
    result = run_apply(two, config, "2", prefix=(
        "strace", "-f", "-qq", "-o", str(trace), "-e", "trace=move_mount",
        "-e", "inject=move_mount:signal=KILL:when=8"))
    text = trace.read_text()
    assert text.count("+++ killed by SIGKILL +++") == 1, text
    assert_clean_messages(result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "impermanence: apply: the second process was killed by signal 9 before its 10 entries "
        "were done; running them here"]
    # Nothing stacked, nothing missing: what one uninterrupted process leaves.
    assert mounts_below(two) == mounts_below(one)
    assert tree_digest(two) == tree_digest(one)
