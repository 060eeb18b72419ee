"""Smoke test of the boot-time benchmark (bench/bench_boot.py) at N = 25.

It checks that the benchmark runs to the end and that every contender —
impermanence_boot.py apply, NixOS impermanence's sequence of processes, the
per-entry shell script, and the syscall floor — left the same tree: the
benchmark walks the root and the storage after each contender's verified run
and compares every path (type, owner, mode, link text) and every mount under
the root, and checks them against the configuration. Timing is printed,
never asserted: CI machines vary.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from conftest import PROJECT, SCRIPT, require
from support import distro_python

BENCH = PROJECT / "bench" / "bench_boot.py"
sys.path.insert(0, str(PROJECT / "bench"))
import bench_boot  # noqa: E402


def test_benchmark_smoke_n25(tmp_path):
    require(os.geteuid() == 0, "it needs root (loop devices, mounts)")
    for tool in ("mkfs.ext4", "losetup", "mount", "findmnt", "bash"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    require(SCRIPT.exists(), f"{SCRIPT} does not exist")
    out = tmp_path / "bench.json"
    python = distro_python().path
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "25", "--reps", "1", "--reps-fast", "2", "--startup-reps", "2",
         "--python", python, "--out", str(tmp_path / "results"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert out.exists(), "the benchmark wrote no results"
    results = json.loads(out.read_text())
    assert results["problems"] == [], "\n".join(results["problems"])
    assert proc.returncode == 0

    run = results["sizes"]["25"]
    assert run["entries"]["directories"] == 12 and run["entries"]["files"] == 13
    # verified on the runs' results, not assumed: the same tree for all of
    # them, and that tree is what the configuration asks for
    assert run["verified"] is True
    assert {"apply", "impermanence", "shell", "floor"} <= set(run["verified_contenders"])
    # one round of all, then one more of all but the slow ones
    for who in ("impermanence", "shell"):
        assert [r["rc"] for r in run["runs"][who]] == [0], who
    for who in ("apply", "floor", "start"):
        assert [r["rc"] for r in run["runs"][who]] == [0, 0], who
    # the impermanence sequence ran as separate processes: a create-directories
    # call per directory, a mount per kept directory, a mount-file per file
    calls = run["impermanence_calls"]
    assert calls["mount"] == 12 and calls["mount-file"] == 13
    assert calls["create-directories"] > 12
    tree = run["tree"]
    assert tree["mounts"] > 0 and tree["symlinks"] > 0
    assert tree["mounts"] + tree["symlinks"] <= 25
    assert "| 25 |" in proc.stdout
    assert "apply ÷ (floor + start)" in proc.stdout and "impermanence ÷ apply" in proc.stdout

    # the private mount namespace took everything with it
    with open("/proc/self/mountinfo") as f:
        assert "impermanence-bench." not in f.read()
    for _ in range(50):  # autoclear detaches the loop device asynchronously
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        if "impermanence-bench." not in loops:
            break
        time.sleep(0.1)
    assert "impermanence-bench." not in loops


def test_impermanence_sequence_does_what_apply_does():
    """The impermanence contender's driver, for a config with the cases
    where the module's own sequence would differ from apply: a kept
    directory inside another (its parent listed with its own mode), a file
    directly under /, a user's home."""
    config = {
        "users": {"bird": {"uid": 1000, "group": "users", "home": "/home/bird"}},
        "groups": {"users": {"gid": 100}},
        "persistence": {"/persistent": {
            "directories": [{"directory": "/var/lib/app", "mode": "0700"}, "/var/lib/app/cache"],
            "files": ["/top", {"file": "/etc/ssh/key", "method": "symlink"}],
            "users": {"bird": {"directories": [".local/share/x"], "files": [".profile"]}},
        }},
    }
    entries = bench_boot.entries_from_config(config)
    dirs = bench_boot.impermanence_dirs(entries)
    paths = [d[0] for d in dirs]
    assert len(paths) == len(set(paths)), "each directory is made by one call"
    assert "/" not in paths, "the root itself is never given storage's owner and mode"
    for i, p in enumerate(paths):  # parents first
        assert all(q in paths[:i] for q in bench_boot.prefixes(p)[:-1] if q != "/"), p
    by_path = {d[0]: d[1:] for d in dirs}
    assert by_path["/var/lib/app"] == (0, 0, 0o700)  # its own mode, not a parent's 0755
    assert by_path["/home/bird"] == (1000, 100, 0o700)
    assert by_path["/home/bird/.local"] == (1000, 100, 0o755)

    text = bench_boot.impermanence_text("/R", entries)
    calls = bench_boot.impermanence_calls(text)
    # /var/lib/app/cache is bound with /var/lib/app: no mount of its own
    assert calls == {"create-directories": len(dirs) + 1, "mount": 2, "mount-file": 3}
    assert "mount --bind /R/persistent/var/lib/app /R/var/lib/app\n" in text
    assert "/R/var/lib/app/cache\n" not in text
    lines = text.splitlines()
    last_dir = max(i for i, line in enumerate(lines) if "create-directories.sh" in line)
    first_step = min(i for i, line in enumerate(lines) if line.startswith("mount ") or "mount-file" in line)
    assert last_dir < first_step, "every directory is made before the first bind"


def test_profile_apply_reports_the_profile_of_an_apply():
    """bench/profile_apply.py --tool cprofile prints the profile of a real
    apply, the script's own functions among it."""
    require(os.geteuid() == 0, "it needs root (loop devices, mounts)")
    for tool in ("mkfs.ext4", "losetup", "mount"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    proc = subprocess.run(  # the tool picks the interpreter as the benchmark does
        [sys.executable, str(PROJECT / "bench" / "profile_apply.py"), "--n", "100",
         "--tool", "cprofile", "--top", "400"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exit 0," in proc.stdout, "apply itself failed under the profiler"
    assert "function calls" in proc.stdout
    # apply's own code ran, some of it at least once for each of the 100 entries
    rows = [line.split() for line in proc.stdout.splitlines() if "impermanence_boot.py:" in line]
    assert rows, "no function of the script in the profile"
    assert max(int(r[0].split("/")[0]) for r in rows) >= 100, rows


def test_profile_apply_times_the_phases_of_an_apply():
    """--tool phases times main() and its phases in a real apply: each
    phase timed, none longer than main() itself."""
    require(os.geteuid() == 0, "it needs root (loop devices, mounts)")
    for tool in ("mkfs.ext4", "losetup", "mount"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / "profile_apply.py"), "--n", "25",
         "--tool", "phases", "--runs", "2"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split()[2:] for line in proc.stdout.splitlines() if line.startswith("phases ms:")]
    assert len(lines) == 2 and proc.stdout.count("exit 0,") == 2, proc.stdout
    for fields in lines:
        spent = dict(zip(fields[::2], map(float, fields[1::2])))
        assert set(spent) == {"config", "storage", "libc", "planning", "entries", "main"}, spent
        assert all(0 < ms <= spent["main"] for ms in spent.values()), spent
