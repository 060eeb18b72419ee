"""The benchmark (bench/bench.py) runs end to end at a tiny N and reports
its figures; its verification rejects a contender that leaves the wrong
tree. Timing is printed, never asserted: machines vary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from support import PROJECT, SCRIPT, distro_python, require

BENCH = PROJECT / "bench" / "bench.py"


def bench(tmp_path, *args: str):
    require(os.geteuid() == 0, "it needs root (loop devices, mounts)")
    for tool in ("cc", "mkfs.ext4", "mount", "findmnt", "realpath", "find", "bash"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "25", "--reps", "1", "--reps-fast", "2",
         "--python", distro_python().path, "--json", str(out), *args],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_benchmark_runs_and_reports_the_figures(tmp_path):
    proc, results = bench(tmp_path, "--diff-files", "1000")
    assert results is not None, "the benchmark wrote no results"
    assert results["problems"] == [], "\n".join(results["problems"])
    assert proc.returncode == 0
    run = results["sizes"]["25"]
    # every contender left the same tree, the one the configuration asks for
    assert run["verified"] is True
    assert run["tree"]["mounts"] > 0 and run["tree"]["links"] > 0
    assert {w: len(r) for w, r in run["runs"].items()} == \
        {"apply": 2, "impermanence": 1, "floor": 2, "start": 2}
    assert set(results["diff"]["1000"]) == {"apply", "find", "start"}
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 25 |")]
    assert len(table) == 1 and table[0].count("|") == 10, proc.stdout
    assert "apply ÷ (floor + start)" in proc.stdout and "impermanence ÷ apply" in proc.stdout
    assert any(line.startswith("| 1,000 |") for line in proc.stdout.splitlines())
    with open("/proc/self/mountinfo") as f:  # its private namespace took its mounts
        assert "impermanence-bench." not in f.read()


def test_two_versions_in_one_run_and_a_wrong_tree_fails(tmp_path):
    """--script twice times both in the same rounds; a "version" that does
    nothing is caught by the verification, and the run exits 1."""
    noop = tmp_path / "noop.py"
    noop.write_text("raise SystemExit(0)\n")
    proc, results = bench(tmp_path, "--diff-files", "", "--no-impermanence",
                          "--script", str(SCRIPT), "--script", str(noop))
    assert proc.returncode == 1
    assert results["sizes"]["25"]["verified"] is False
    assert len(results["problems"]) == 1 and "apply#2 left a tree" in results["problems"][0]
    assert set(results["sizes"]["25"]["runs"]) == {"apply#1", "apply#2", "floor", "start"}
    assert "apply#2 ÷ apply#1: N = 25:" in proc.stdout
