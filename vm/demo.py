#!/usr/bin/env python3
"""The demo (run through vm/demo.sh, which installs what it needs first):
build the initramfs, boot the demo machine twice on one fresh persistent
disk, and print what a user cares about: what the script did at boot, the
real `status` of the booted system, what was kept and what was wiped, the
fresh root's owners and modes, and the time the script took. Exit status 0
only if everything came out as the config says. Stdlib only.

    python3 vm/demo.py [--out vm/build] [--timeout SECONDS]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import build_initramfs
import machine
import scenarios as sc

HERE = Path(__file__).resolve().parent

NAMES_U = {0: "root"}
NAMES_G = {0: "root"}
for _name, _u in sc.MAIN_CONFIG.get("users", {}).items():
    NAMES_U[_u["uid"]] = _name
for _name, _g in sc.MAIN_CONFIG.get("groups", {}).items():
    NAMES_G[_g["gid"]] = _name


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 10 << 20 else f"{n / (1 << 20):.1f} MiB"


def ms(ns_pair) -> str:
    return f"{(ns_pair[1] - ns_pair[0]) / 1e6:,.0f} ms" if ns_pair else "-"


def owner(e: dict) -> str:
    return f"{NAMES_U.get(e['uid'], e['uid'])}:{NAMES_G.get(e['gid'], e['gid'])}"


def status_lines(status: dict) -> list:
    """status --json as `status` prints it."""
    lines = [f"{r['state']:<19} storage   {r['storage']}  ({r['detail']})" for r in status["storage"]]
    lines += [f"{r['state']:<19} {r['kind']:<9} {r['target']}  ({r['detail']})" for r in status["entries"]]
    in_place = sum(1 for r in status["entries"] if r["state"] == "ok")
    return lines + [f"{in_place} of {len(status['entries'])} entries in place"]


def main() -> int:
    ap = argparse.ArgumentParser(description="boot the demo machine twice under QEMU")
    ap.add_argument("--out", type=Path, default=HERE / "build")
    ap.add_argument("--timeout", type=float, default=None, help="per boot, seconds")
    a = ap.parse_args()
    out = a.out
    problems: list[str] = []

    print(f"== building the initramfs (Debian kernel, busybox-static, python{build_initramfs.python().version}, "
          "the script)")
    try:
        m = build_initramfs.build(out)
    except build_initramfs.BuildError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    cb = m["component_bytes"]
    print(f"   kernel {m['kver']}, initramfs {kib(m['initramfs_bytes'])} "
          f"({kib(m['initramfs_gzip_bytes'])} gzip -6)")
    print(f"   added by Python + the script: {kib(m['python_and_script_bytes'])} "
          f"({kib(m['python_and_script_gzip_bytes'])} gzip): interpreter {kib(cb['python-interpreter'])}, "
          f"shared libraries {kib(cb['python-libs'])}, {len(m['stdlib_modules'])} stdlib modules "
          f"{kib(cb['python-stdlib'])}, impermanence_boot.py {kib(cb['script'])}")

    disk = machine.make_disk(out / "demo-persist.img", "persist")
    reports = []
    for n in (1, 2):
        print(f"\n== boot {n} (QEMU, {'KVM' if machine.use_kvm() else 'TCG'}), persistent disk {disk}")
        r = machine.Boot(out, out / "demo", machine.overlay(checks=sc.main_checks(n), measure=True),
                         [disk], timeout=a.timeout, name=f"demo-{n}").run()
        if r.report is None:
            print(r.describe())
            print(f"demo: boot {n} did not reach stage 2 (console: {out / 'demo' / f'demo-{n}.console.log'})",
                  file=sys.stderr)
            return 1
        s1 = r.report["stage1"]
        print(f"   stage 1 ran: impermanence_boot.py --root /mnt-root apply -> exit {s1['exit']} "
              f"in {ms(s1['t_script'])}")
        for line in s1["stderr"].splitlines():
            print(f"   | {line}")
        if s1["exit"] != 0:
            problems.append(f"boot {n}: the script exited {s1['exit']}")
        reports.append(r)

    first, second = reports
    print("\n== impermanence_boot.py status, on the booted system (boot 2)")
    try:
        status = json.loads(second.report["status"]["stdout"])
        for line in status_lines(status):
            print(f"   {line}")
        if status["drift"]:
            problems.append("status found drift on boot 2")
    except (ValueError, KeyError):
        problems.append("status --json gave no usable output")
        print(second.report["status"])

    print("\n== did it persist? (written on boot 1, read on boot 2)")
    ins2 = second.report["inspect"]
    for path, content in sc.KEPT_WRITES.items():
        ok = ins2[path].get("content") == content
        print(f"   {'kept' if ok else 'LOST':<6} {path}")
        if not ok:
            problems.append(f"{path} was not kept")
    for path in sc.UNKEPT_WRITES:
        gone = not ins2[path]["exists"]
        print(f"   {'gone' if gone else 'STAYED':<6} {path} (not in the config)")
        if not gone:
            problems.append(f"{path} survived a reboot")

    print("\n== the fresh root on boot 2, as the booted system sees it")
    print(f"   {'path':<36} {'type':<8} {'owner':<14} {'mode':<5} how")
    for e in second.report["root_entries"]:
        if e["path"] in ("/nix", "/proc", "/sys", "/dev", "/run"):
            continue  # made by stage 1 itself (NixOS does the same)
        how = ""
        if e["mountpoint"]:
            src = [mm for mm in second.report["mounts"] if mm["point"] == e["path"]][-1]
            how = f"bind {src['root']} ({src['source']})" if src["root"] != "/" else f"mount {src['source']}"
        elif e["type"] == "symlink":
            how = f"-> {e['readlink']}"
        mode = "" if e["type"] == "symlink" else e["mode"]
        print(f"   {e['path']:<36} {e['type']:<8} {owner(e):<14} {mode:<5} {how}")

    print("\n== time in stage 1 (TCG emulation: a real machine is several times faster)")
    print(f"   {'boot':<5} {'apply':>8} {'bare interpreter start':>23} {'/init -> switch_root':>21} "
          f"{'whole boot':>11}")
    for n, r in enumerate(reports, 1):
        s1 = r.report["stage1"]
        print(f"   {n:<5} {ms(s1['t_script']):>8} {ms(s1['t_python_pass2']):>23} "
              f"{(s1['t_switch'] - s1['t_init']) / 1e9:>19.2f} s {r.seconds:>9.1f} s")
    print("   apply: starting the interpreter, mounting the storage and every entry. Bare")
    print("   interpreter start: `python3 -I -S -c pass`, the second one in the boot (the first")
    print("   also pays the emulator's one-time translation of the interpreter's code).")

    summary = {"manifest": m, "boots": [{"qemu_seconds": r.seconds, "stage1": r.report["stage1"],
                                        "stage2_ns": r.report["stage2_ns"], "script_ms": r.script_ms}
                                       for r in reports],
               "problems": problems}
    (out / "demo-report.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n   numbers: {out / 'demo-report.json'}; consoles: {out / 'demo'}/*.console.log")
    if problems:
        print("\nDEMO FAILED: " + "; ".join(problems))
        return 1
    print("\nOK: everything in the config was kept, nothing else was.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
