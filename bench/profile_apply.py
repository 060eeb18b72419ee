#!/usr/bin/env python3
"""Profile one `impermanence_boot.py apply` on the benchmark's setup.

    python3 bench/profile_apply.py [--n 1000] [--tool cprofile|phases|strace|importtime|plain] [--runs 1]

Same configuration, storage (ext4 on a loop device, sources partly present)
and fresh tmpfs root as bench/bench_boot.py for that N, in a private mount
namespace; runs apply once under the chosen tool and prints its report:
  cprofile    cProfile of the script's main() under python3 -I -S, by
              tottime (top 40 functions)
  phases      wall time of main() and of its phases (reading the config,
              storage, binding the libc calls, planning, the whole entry
              loop) timed with perf_counter around the script's functions
  strace      strace -c -f (system call counts and times; STRACE_ARGS in
              the environment replaces -c, e.g. "-e trace=%file,mount")
  importtime  python3 -I -S -X importtime (modules the apply path imports)
  plain       just the wall time
Standard library only (plus strace for that tool).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_boot as bb  # noqa: E402

SORT = "tottime"

# The script at `script`, loaded as a module (its main() not run): the
# start of each program below.
LOAD_SCRIPT = """
import importlib.util
spec = importlib.util.spec_from_file_location("impermanence_boot", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""

# argv: sort key, script, its arguments. Profiles main() alone, then
# prints the report.
PROFILE_MAIN = """
import cProfile, pstats, sys
sort, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
""" + LOAD_SCRIPT + """
profile = cProfile.Profile()
status = profile.runcall(module.main, args)
pstats.Stats(profile, stream=sys.stdout).sort_stats(sort).print_stats()
sys.exit(status)
"""

# argv: script, its arguments. Wraps the functions of each phase with a
# timer, runs main() once and prints one line of milliseconds.
PHASES_MAIN = """
import sys, time
script, args = sys.argv[1], sys.argv[2:]
""" + LOAD_SCRIPT + """
spent = {}
def timed(owner, name, phase):
    function = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return function(*a, **k)
        finally:
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)
for owner, name, phase in ((module, "load_config_file", "config"), (module, "prepare_storage", "storage"),
                           (module.Libc, "__init__", "libc"), (module, "plan_entry", "planning"),
                           (module, "run_entries", "entries")):
    timed(owner, name, phase)
t = time.perf_counter()
status = module.main(args)
spent["main"] = time.perf_counter() - t
print("phases ms: " + " ".join("%s %.2f" % (k, v * 1e3) for k, v in spent.items()), flush=True)
sys.exit(status)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--tool", choices=("cprofile", "phases", "strace", "importtime", "plain"), default="cprofile")
    ap.add_argument("--runs", type=int, default=1, help="runs, each on a fresh root (phases, plain)")
    ap.add_argument("--python", default=bb.default_python())
    ap.add_argument("--python-flags", default=bb.DEFAULT_FLAGS)
    ap.add_argument("--script", default=bb.DEFAULT_SCRIPT)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumtime, ...)")
    args = ap.parse_args()
    global SORT
    SORT = args.sort
    if os.geteuid() != 0:
        print("must run as root", file=sys.stderr)
        return 2
    bb.enter_private_namespace()
    work = tempfile.mkdtemp(prefix="impermanence-bench.")
    root = os.path.join(work, "root")
    os.mkdir(root)
    storage = None
    try:
        config, entries = bb.generate(args.n)
        cfg = os.path.join(work, "config.json")
        with open(cfg, "w") as f:
            bb.json.dump(config, f)
        storage = bb.Storage(work, args.n)
        bb.populate_storage(storage.mnt, entries)
        storage.snapshot()
        cmd = [os.path.abspath(args.script), "--root", root, "--config", cfg, "apply"]
        env = dict(bb.ENV)
        py = [args.python, *bb.shlex.split(args.python_flags)]
        if args.tool == "cprofile":
            # Not `-m cProfile`: the script may leave through os._exit,
            # which skips that report. Its main() is profiled instead.
            argv = [*py, "-c", PROFILE_MAIN, SORT, *cmd]
        elif args.tool == "phases":
            argv = [*py, "-c", PHASES_MAIN, *cmd]
        elif args.tool == "strace":
            argv = ["strace", *(os.environ.get("STRACE_ARGS", "-c").split()), "-f", "-o", os.path.join(work, "strace.txt"), *py, *cmd]
        elif args.tool == "importtime":
            argv = [*py, "-X", "importtime", *cmd]
        else:
            argv = [*py, *cmd]
        for _ in range(args.runs if args.tool in ("phases", "plain") else 1):
            bb.fresh_root(root, storage)
            bb.quiesce()
            t0 = time.perf_counter()
            p = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            bb.drop_root(root)
            storage.restore()
            if args.tool == "cprofile":
                lines = p.stdout.splitlines()
                start = next((i for i, l in enumerate(lines) if "ncalls" in l), 0)
                print("\n".join(lines[max(0, start - 4):start + 1 + args.top]))
            elif args.tool == "phases":
                print(p.stdout.strip())
            elif args.tool == "strace":
                with open(os.path.join(work, "strace.txt")) as f:
                    print(f.read())
            elif args.tool == "importtime":
                print(p.stderr)
            print("exit %d, wall %.1f ms (under %s)" % (p.returncode, wall * 1e3, args.tool))
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
    finally:
        subprocess.run(["umount", "-l", root], stderr=subprocess.DEVNULL)
        if storage:
            storage.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
