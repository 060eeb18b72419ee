#!/usr/bin/env python3
"""How long `diff` takes on a desktop-sized root, beside the find(1)
pipeline people run today (find -xdev listing every path with its size, storage pruned)
and du -sx, which walk the same tree. Standard library only.

    python3 bench/bench_diff.py [--files N] [--rounds R]

The tree is made in a temporary directory (page cache warm after the
first round, as a second `diff` on a running system is): N files over
N/10 directories, nested four deep, plus kept directories holding as
many files again, which diff must not walk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "impermanence_boot.py"


def build(root: Path, files: int) -> dict:
    dirs = max(1, files // 10)
    for d in range(dirs):
        parent = root / "var" / "cache" / f"a{d % 10}" / f"b{d % 97}" / f"c{d}"
        parent.mkdir(parents=True, exist_ok=True)
        for f in range(10):
            (parent / f"f{f}").write_bytes(b"x" * (f * 37))
    kept = root / "persistent"
    for d in range(dirs):
        parent = kept / "home" / "bird" / f"k{d}"
        parent.mkdir(parents=True, exist_ok=True)
        for f in range(10):
            (parent / f"f{f}").write_bytes(b"k")
    (root / "home" / "bird").mkdir(parents=True, exist_ok=True)
    os.symlink("/persistent/home/bird/k0", root / "home" / "bird" / "link")
    config = {"persistence": {"/persistent": {"directories": ["/var/log", "/etc/nixos"],
                                               "users": {"bird": {"directories": ["Documents"]}}}}}
    path = root.parent / "bench-diff.json"
    path.write_text(json.dumps(config))
    return {"config": path}


def timed(argv: list, rounds: int) -> list:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, nargs="*", default=[10_000, 50_000, 200_000])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; median (min) of {args.rounds} rounds, warm cache")
    print(f"{'files':>8}  {'diff':>16}  {'diff --json':>16}  {'find -xdev -printf':>20}  {'du -sx':>16}  {'start only':>12}")
    for files in args.files:
        work = Path(tempfile.mkdtemp(prefix="bench-diff."))
        try:
            root = work / "root"
            root.mkdir()
            made = build(root, files)
            base = [sys.executable, "-I", "-S", str(SCRIPT), "--root", str(root), "--config",
                    str(made["config"]), "-q"]
            out = subprocess.run(base + ["diff", "--json"], capture_output=True, text=True, check=True)
            total = json.loads(out.stdout)["total"]
            assert total["files"] == (files // 10) * 10 + 1, total  # the link counted once
            rows = {
                "diff": timed(base + ["diff"], args.rounds),
                "json": timed(base + ["diff", "--json"], args.rounds),
                "find": timed(["find", str(root), "-xdev", "-path", str(root / "persistent"), "-prune",
                               "-o", "-printf", "%s %p\n"], args.rounds)
                if shutil.which("find") else [float("nan")],
                "du": timed(["du", "-sx", str(root)], args.rounds) if shutil.which("du") else [float("nan")],
                "start": timed([sys.executable, "-I", "-S", "-c", "pass"], args.rounds),
            }
            cell = {k: f"{statistics.median(v) * 1000:.0f} ({min(v) * 1000:.0f}) ms" for k, v in rows.items()}
            print(f"{files:>8}  {cell['diff']:>16}  {cell['json']:>16}  {cell['find']:>20}  "
                  f"{cell['du']:>16}  {cell['start']:>12}", flush=True)
        finally:
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
