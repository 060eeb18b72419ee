"""Smoke test of the boot-time benchmark (bench/bench_boot.py) at N = 100.

It checks that the benchmark runs to the end and that the three contenders —
impermanence_boot.py apply, the per-entry shell script, and the syscall
floor — left the same tree: the benchmark walks the root and the storage
after each contender's verified run and compares every path (type, owner,
mode, link text) and every mount under the root, and checks them against the
configuration. Timing is printed, never asserted: CI machines vary.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from conftest import PROJECT, SCRIPT, require

BENCH = PROJECT / "bench" / "bench_boot.py"


def test_benchmark_smoke_n100(tmp_path):
    require(os.geteuid() == 0, "it needs root (loop devices, mounts)")
    for tool in ("mkfs.ext4", "losetup", "mount", "bash"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    require(SCRIPT.exists(), f"{SCRIPT} does not exist")
    out = tmp_path / "bench.json"
    python = "/usr/bin/python3.11" if os.path.exists("/usr/bin/python3.11") else sys.executable
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "100", "--reps", "1", "--reps-fast", "2", "--startup-reps", "2",
         "--python", python, "--out", str(tmp_path / "results"), "--json", str(out)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert out.exists(), "the benchmark wrote no results"
    results = json.loads(out.read_text())
    assert results["problems"] == [], "\n".join(results["problems"])
    assert proc.returncode == 0

    run = results["sizes"]["100"]
    assert run["entries"]["directories"] == 50 and run["entries"]["files"] == 50
    # verified on the runs' results, not assumed: same tree for all three,
    # and that tree is what the configuration asks for
    assert run["verified"] is True
    # one round of all three, then one more of all but the shell
    assert [r["rc"] for r in run["runs"]["shell"]] == [0]
    # apply reads the config compiled beforehand; apply_json the JSON itself
    for who in ("apply", "floor", "apply_json"):
        assert [r["rc"] for r in run["runs"][who]] == [0, 0], who
    assert results["compile_ms"]["100"] > 0
    assert "(1j) apply, JSON config" in proc.stdout
    tree = run["tree"]
    assert tree["mounts"] > 0 and tree["symlinks"] > 0
    assert tree["mounts"] + tree["symlinks"] <= 100
    assert "| 100 |" in proc.stdout

    # the private mount namespace took everything with it
    with open("/proc/self/mountinfo") as f:
        assert "impermanence-bench." not in f.read()
    for _ in range(50):  # autoclear detaches the loop device asynchronously
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        if "impermanence-bench." not in loops:
            break
        time.sleep(0.1)
    assert "impermanence-bench." not in loops


def test_profile_apply_reports_the_profile_of_an_apply():
    """bench/profile_apply.py --tool cprofile prints the profile of a real
    apply: the script leaves through os._exit, so profiling the process
    from outside (`-m cProfile`) would print nothing."""
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
    # apply's own code ran, once for each of the 100 entries
    plan_rows = [line.split() for line in proc.stdout.splitlines() if "(plan_entry)" in line]
    assert len(plan_rows) == 1 and plan_rows[0][0] == "100", plan_rows
