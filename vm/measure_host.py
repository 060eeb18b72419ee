#!/usr/bin/env python3
"""Time `impermanence_boot.py apply` natively on this host (no emulation),
the same work as on the demo machine's first boot: a fresh tmpfs root, a
fresh ext4 image on a loop device, the demo config (device pointed at the
loop device). Runs inside a private mount namespace (unshare -m), as root.

    python3 vm/measure_host.py [--runs 7]

Uses the interpreter the initramfs ships (vm/distro_python.py). Prints the
median wall time of `python3 -I -S -c pass` and of the apply.
Stdlib only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from distro_python import interpreter

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent

INNER = r'''
set -e
root=$1; cfg=$2; script=$3; python=$4
mount -t tmpfs -o mode=0755 measure-root "$root"
t0=$(date +%s%N)
"$python" -I -S -c pass
t1=$(date +%s%N)
IMPERMANENCE_NO_KMSG=1 "$python" -I -S "$script" --root "$root" --config "$cfg" apply
t2=$(date +%s%N)
umount -R "$root"
echo "$t0 $t1 $t2"
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--source", action="store_true",
                    help="run the .py (compiled at every run), not the byte-compiled script stage 1 runs")
    a = ap.parse_args()
    config = json.loads((HERE / "demo-config.json").read_text())
    passes, applies = [], []
    python = interpreter().path
    with tempfile.TemporaryDirectory(prefix="impermanence-measure.") as tmp:
        t = Path(tmp)
        script = PROJECT / "impermanence_boot.py"
        if not a.source:
            compiled = t / "impermanence_boot.pyc"
            subprocess.run([python, "-I", "-c", "import py_compile, sys; "
                            "py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
                            str(script), str(compiled)], check=True)
            script = compiled
        image = t / "persist.img"
        (t / "root").mkdir()
        for _ in range(a.runs):
            with open(image, "wb") as f:
                f.truncate(64 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "measure", str(image)], check=True)
            loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                  capture_output=True, text=True).stdout.strip()
            try:
                config["fileSystems"]["/persistent"]["device"] = loop
                (t / "config.json").write_text(json.dumps(config))
                r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", INNER,
                                    "sh", str(t / "root"), str(t / "config.json"),
                                    str(script), python],
                                   capture_output=True, text=True)
            finally:
                subprocess.run(["losetup", "-d", loop])
            if r.returncode != 0:
                print(r.stdout, r.stderr, file=sys.stderr)
                return 1
            t0, t1, t2 = map(int, r.stdout.split()[-3:])
            passes.append((t1 - t0) / 1e6)
            applies.append((t2 - t1) / 1e6)
    print(f"{python} -I -S -c pass: median {statistics.median(passes):.1f} ms over {a.runs} runs")
    print(f"{'impermanence_boot.py' if a.source else 'impermanence_boot.pyc'} apply (demo config, fresh disk): median "
          f"{statistics.median(applies):.1f} ms (min {min(applies):.1f}, max {max(applies):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
