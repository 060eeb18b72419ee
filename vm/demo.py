#!/usr/bin/env python3
"""The demo (run through vm/demo.sh, which installs what it needs first):
build the initramfs, boot the demo machine twice on one fresh persistent
disk, print what was kept, an owner/mode table and the time the script took
inside the initramfs, against the same config done by the per-entry shell
approach (bench/bench_boot.py's generator, busybox sh) in the same stage 1
on its own root and a copy of the storage. Exit status 0 only if everything
came out as the config says and the shell approach left the same tree
(apart from the machine-id difference by design). Stdlib only.

    python3 vm/demo.py [--out vm/build] [--timeout SECONDS]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_initramfs  # noqa: E402
import machine  # noqa: E402
import scenarios as sc  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description="boot the demo machine twice under QEMU")
    ap.add_argument("--out", type=Path, default=HERE / "build")
    ap.add_argument("--timeout", type=float, default=None, help="per boot, seconds")
    a = ap.parse_args()
    out = a.out
    problems: list[str] = []

    print("== building the initramfs (Debian kernel, busybox-static, the distribution's python3, the script)")
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
        print(f"== boot {n} (QEMU, {'KVM' if machine.use_kvm() else 'TCG'}), persistent disk {disk}")
        # the shell approach's storage: a copy of the disk as it is now
        shell_disk = machine.copy_disk(disk, out / f"demo-shell-{n}.img", sc.SHELL_LABEL)
        r = machine.Boot(out, out / "demo", machine.overlay(checks=sc.main_checks(n), measure=True,
                                                            shell_device=sc.SHELL_DEVICE),
                         [disk, shell_disk], timeout=a.timeout, name=f"demo-{n}").run()
        shell_disk.unlink()
        if r.report is None:
            print(r.describe())
            print(f"demo: boot {n} did not reach stage 2 (console: {out / 'demo' / f'demo-{n}.console.log'})",
                  file=sys.stderr)
            return 1
        s1 = r.report["stage1"]
        print(f"   {r.seconds:.1f} s in QEMU; impermanence_boot.py apply exited {s1['exit']} after "
              f"{ms(s1['t_script'])}")
        print(f"   for comparison, the bare 'python3 -I -S -c pass' just before: "
              f"{ms(s1['t_python_pass'])} the first time in this boot, {ms(s1['t_python_pass2'])} the second")
        for line in s1["stderr"].splitlines():
            print(f"   | {line}")
        if s1["exit"] != 0:
            problems.append(f"boot {n}: the script exited {s1['exit']}")
        print(f"   the same config by the per-entry shell approach ({m['shell_approach_commands']} "
              f"commands, busybox sh), after it in the same stage 1, on its own root and a copy of "
              f"the storage: exited {s1['shell_exit']} after {ms(s1['t_shell'])} "
              f"(+ {ms(s1['t_shell_mount'])} for stage 1 to mount its storage)")
        for line in s1["shell_stderr"].splitlines():
            print(f"   | {line}")
        if s1["shell_exit"] != 0:
            problems.append(f"boot {n}: the shell approach exited {s1['shell_exit']}")
        diffs = sc.shell_tree_differences(r.report)
        expected = sc.SHELL_DIFFERENCES_FRESH_STORAGE if n == 1 else set()
        for part, path, mine, theirs in diffs:
            by_design = (part, path) in expected
            print(f"   {'differs by design' if by_design else 'DIFFERS'}: {part} {path}: "
                  f"script {mine}, shell approach {theirs}")
        if {(part, path) for part, path, *_ in diffs} != expected:
            problems.append(f"boot {n}: the shell approach left another tree than the script")
        else:
            print("   same tree as the script's (root and storage, as the booted system sees them)"
                  + (", apart from the above" if diffs else ""))
        reports.append(r)

    first, second = reports
    print("\n== what is kept (impermanence_boot.py status on the booted system, boot 2)")
    try:
        status = json.loads(second.report["status"]["stdout"])
        for row in status["storage"]:
            print(f"   {row['state']:<12} storage    {row['storage']}  ({row['detail']})")
        for row in status["entries"]:
            print(f"   {row['state']:<12} {row['kind']:<10} {row['target']:<36} <- {row['source']}  ({row['detail']})")
    except (ValueError, KeyError):
        problems.append("status --json gave no usable output")
        print(second.report["status"])

    print("\n== did it persist? (written on boot 1, read on boot 2)")
    ins2 = second.report["inspect"]
    for path, content in sc.KEPT_WRITES.items():
        ok = ins2[path].get("content") == content
        print(f"   {'kept   ' if ok else 'LOST   '} {path}")
        if not ok:
            problems.append(f"{path} was not kept")
    for path in sc.UNKEPT_WRITES:
        gone = not ins2[path]["exists"]
        print(f"   {'gone   ' if gone else 'STAYED '} {path} (not in the config)")
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

    print("\n== time")
    for n, r in enumerate(reports, 1):
        s1 = r.report["stage1"]
        print(f"   boot {n}: kernel start -> /init {s1['t_init'] / 1e9:.2f} s, script {ms(s1['t_script'])}, "
              f"/init -> switch_root {(s1['t_switch'] - s1['t_init']) / 1e9:.2f} s, "
              f"whole boot in QEMU {r.seconds:.1f} s")
    print("   script vs the per-entry shell approach, same config, same boot (wall time in stage 1):")
    for n, r in enumerate(reports, 1):
        s1 = r.report["stage1"]
        print(f"   boot {n}: impermanence_boot.py apply {ms(s1['t_script'])} (interpreter start and "
              f"mounting the storage included); shell approach {ms(s1['t_shell'])} "
              f"+ {ms(s1['t_shell_mount'])} mounting its storage")
    print("   (TCG emulation, no KVM: a real machine runs the same code several times faster;")
    print("   the first Python start in a boot also pays TCG's one-time translation of the")
    print("   interpreter's code, which is why the script, started after the baselines, is")
    print("   faster here than as the first Python process of a boot, as in the tests)")

    summary = {"manifest": m, "boots": [{"qemu_seconds": r.seconds, "stage1": r.report["stage1"],
                                        "stage2_ns": r.report["stage2_ns"],
                                        "script_ms": r.script_ms, "shell_ms": r.shell_ms,
                                        "shell_mount_ms": r.shell_mount_ms,
                                        "shell_differences": sc.shell_tree_differences(r.report)}
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
