#!/usr/bin/env python3
"""Build the test machine's initramfs from the Debian packages installed on
this host (stdlib only; run as root because /boot/vmlinuz-* is root-only):

    python3 vm/build_initramfs.py [--out vm/build] [--kver KVER] [--no-pyc]

Contents (see docs/vm.md):
  /init                      vm/guest/init (stage 1, NixOS-like)
  /lib/modules/<kver>/...    virtio_pci, virtio_blk, ext4 and dependencies
                             (modprobe --show-depends -S), decompressed,
                             plus load-order (the insmod order)
  /nix/bin/busybox + applet links (busybox-static)
  /nix/bin/python3           wrapper: ld.so --library-path /nix/lib ...
  /nix/lib/*.so*             ld.so and what ldd says the interpreter and the
                             copied extension modules need (libffi for _ctypes)
  /nix/python/bin/python3    the distribution's interpreter (vm/distro_python.py:
                             readlink -f /usr/bin/python3, or $IMPERMANENCE_PYTHON)
  /nix/python/lib/pythonX.Y  only the stdlib modules computed by
                             dist/lib/initramfs_files.py from the scripts
  /nix/impermanence/         impermanence_boot.py, its .pyc, config.json; the
                             per-entry shell approach for that config
                             (shell-approach.sh, shell-storage), generated
                             by vm/shell_approach.py
  /nix/stage2/               stage-2 init and stage2.py (the inspector)

Not in the base image: util-linux tools (TOOLS, e.g. findmnt) go in the
per-boot archive of a boot that asks for them (machine.overlay(tools=...)).

Writes OUT/initramfs.cpio (uncompressed: nothing to decompress under TCG),
OUT/vmlinuz (a copy of the kernel) and OUT/manifest.json (sizes per
component, module lists).
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cpio import Archive
import shell_approach
from distro_python import NoInterpreter, interpreter

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent

KERNEL_MODULES = ("virtio_pci", "virtio_blk", "ext4")
PYPREFIX = "/nix/python"
# The project's one stdlib-module finder, also the distributions' and NixOS's.
FINDER = PROJECT / "dist" / "lib" / "initramfs_files.py"


class BuildError(Exception):
    pass


def python():
    """The interpreter that goes into the image (vm/distro_python.py)."""
    try:
        return interpreter()
    except NoInterpreter as e:
        raise BuildError(str(e)) from None


def pylib() -> str:
    """The image's stdlib directory, /nix/python/lib/pythonX.Y."""
    return f"{PYPREFIX}/lib/{python().name}"


def run(cmd: list[str], **kw) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} is not installed") from e
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(cmd)} failed: {e.stderr.strip()}") from e


def default_kver() -> str:
    found = []
    for p in Path("/boot").glob("vmlinuz-*"):
        kver = p.name[len("vmlinuz-"):]
        if Path("/lib/modules", kver).is_dir():
            found.append(kver)
    if not found:
        raise BuildError("no /boot/vmlinuz-* with matching /lib/modules (install linux-image-amd64)")

    def key(v: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)]
    return sorted(found, key=key)[-1]


def kernel_module_files(kver: str, names=KERNEL_MODULES) -> list[Path]:
    order: list[Path] = []
    for name in names:
        out = run(["modprobe", "--show-depends", "-S", kver, name])
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in order:
                    order.append(p)
            # "builtin X": compiled into the kernel, nothing to load
    return order


def decompress_module(path: Path) -> tuple[str, bytes]:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return name[:-3], lzma.decompress(data)
    if name.endswith(".gz"):
        return name[:-3], gzip.decompress(data)
    if name.endswith(".zst"):
        return name[:-4], subprocess.run(["zstd", "-dc", str(path)], check=True,
                                         capture_output=True).stdout
    return name, data


def ldd(path: str) -> list[str]:
    libs = []
    for line in run(["ldd", path]).splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target and target != "not":
                libs.append(target)
            elif "not found" in line:
                raise BuildError(f"{path}: {line}")
        elif line.startswith("/"):
            libs.append(line.split()[0])  # the dynamic loader
    return libs


# util-linux tools a boot can ask for in stage 2 (machine.overlay(tools=...)):
# findmnt shows the mount table as libmount merges it with /run/mount/utab.
TOOLS = {"findmnt": "/usr/bin/findmnt"}


def add_tools(arc: Archive, names, component: str = "harness-tools") -> None:
    """Each tool as /nix/tools/NAME, started by /nix/bin/NAME through the
    dynamic loader with /nix/lib, like the interpreter: the booted root has no
    /lib64. Of the libraries ldd names, those the interpreter's already put
    in /nix/lib are not added again."""
    have = {os.path.basename(lib) for lib in ldd(python().path)}
    for name in names:
        if name not in TOOLS:
            raise BuildError(f"no such tool {name!r} (one of {', '.join(sorted(TOOLS))})")
        path = TOOLS[name]
        if not Path(path).is_file():
            raise BuildError(f"{path} is not installed (util-linux)")
        libs = ldd(path)
        loader = next(os.path.basename(lib) for lib in libs if "/ld-linux" in lib)
        for lib in libs:
            base = os.path.basename(lib)
            if base not in have and f"/nix/lib/{base}" not in arc.entries:
                arc.copy(f"/nix/lib/{base}", os.path.realpath(lib), mode=0o755, component=component)
        arc.copy(f"/nix/tools/{name}", path, mode=0o755, component=component)
        wrapper = (f"#!/nix/bin/sh\nexec /nix/lib/{loader} --library-path /nix/lib "
                   f"/nix/tools/{name} \"$@\"\n")
        arc.file(f"/nix/bin/{name}", wrapper.encode(), mode=0o755, component=component)


def find_modules(scripts: list[Path], exercise_script: Path | None) -> dict:
    """The finder's JSON for the scripts, run by the target interpreter;
    the first script is exercised (its read-only runs) unless
    exercise_script is None."""
    cmd = [python().path, "-I", str(FINDER), "--json"]
    if exercise_script is None:
        cmd.append("--no-exercise")
    return json.loads(run(cmd + list(map(str, scripts))))


def module_dest(name: str, path: str, stdlib: str) -> str | None:
    """Where a stdlib module file goes in the initramfs (None: not stdlib)."""
    real = os.path.realpath(path)
    if not real.startswith(stdlib + "/"):
        return None
    return pylib() + real[len(stdlib):]


def add_python_modules(arc: Archive, mods: dict, names: set[str], component: str,
                       stdlib: str, so_needed: list[str], skip_frozen: set[str]) -> list[str]:
    added = []
    for name in sorted(names):
        path = mods.get(name)
        if not path:
            continue  # built in
        dest = module_dest(name, path, stdlib)
        if dest is None:
            raise BuildError(f"module {name} comes from {path}, outside the stdlib {stdlib}")
        if dest in arc.entries:
            continue
        if name in skip_frozen:
            continue
        arc.copy(dest, path, component=component)
        added.append(name)
        if path.endswith(".so"):
            so_needed.append(path)
    return added


def check_config(script: Path, config: Path) -> None:
    """`check` the config with the interpreter stage 1 runs, as the NixOS
    module's checkConfig does: a mistake fails the build, not the boot."""
    run([python().path, "-I", "-S", str(script), "--config", str(config), "check"])


def compile_pycs(arc: Archive) -> None:
    """Byte-compile every .py under the image's stdlib with the target interpreter
    (unchecked-hash pycs: valid whatever the mtimes, never rewritten at boot)."""
    lib, py = pylib(), python()
    with tempfile.TemporaryDirectory() as tmp:
        pys = [p for p in arc.entries if p.startswith(lib + "/") and p.endswith(".py")]
        for p in pys:
            dst = Path(tmp + p)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(arc.entries[p]["data"])
        code = ("import compileall, py_compile, sys\n"
                "ok = compileall.compile_dir(sys.argv[1], ddir=sys.argv[2], quiet=1,\n"
                "    invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
                "sys.exit(0 if ok else 1)\n")
        run([py.path, "-I", "-c", code, tmp + lib, lib])
        for p in pys:
            comp = arc.entries[p]["component"]
            pyc = py.pyc(p)
            arc.file(pyc, Path(tmp + pyc).read_bytes(), component=comp)


def build(out_dir: Path, script: Path | None = None, config: Path | None = None,
          kver: str | None = None, pyc: bool = True) -> dict:
    script = script or PROJECT / "impermanence_boot.py"
    config = config or HERE / "demo-config.json"
    if not script.is_file():
        raise BuildError(f"{script} does not exist")
    py = python()
    kver = kver or default_kver()
    kernel = Path(f"/boot/vmlinuz-{kver}")
    out_dir.mkdir(parents=True, exist_ok=True)
    arc = Archive()

    # skeleton and stage 1
    for d in ("/dev", "/proc", "/sys", "/run", "/mnt-root", "/tmp", "/etc"):
        arc.dir(d)
    arc.chardev("/dev/console", 5, 1)
    arc.chardev("/dev/null", 1, 3, 0o666)
    arc.copy("/init", str(HERE / "guest/init"), mode=0o755, component="init")

    # kernel modules, in insmod order
    order = []
    for ko in kernel_module_files(kver):
        name, data = decompress_module(ko)
        rel = str(ko.parent.relative_to(f"/lib/modules/{kver}")) + "/" + name
        arc.file(f"/lib/modules/{kver}/{rel}", data, component="kernel-modules")
        order.append(rel)
    arc.file(f"/lib/modules/{kver}/load-order", ("\n".join(order) + "\n").encode(),
             component="kernel-modules")

    # busybox, with a link per applet
    busybox = shutil.which("busybox") or "/bin/busybox"
    arc.copy("/nix/bin/busybox", busybox, mode=0o755, component="busybox")
    for applet in run([busybox, "--list"]).split():
        if applet not in ("busybox", "python3"):
            arc.symlink(f"/nix/bin/{applet}", "busybox", component="busybox")

    # the interpreter and the stdlib the scripts need
    stdlib = py.stdlib
    stage2 = HERE / "guest/stage2.py"
    product = find_modules([script], script)
    harness = find_modules([stage2], None)
    if product["missing"]:
        print(f"build: modules the script mentions but this Python lacks: {product['missing']}",
              file=sys.stderr)
    frozen = set(product["frozen"]) | set(harness["frozen"])
    # os.py is the landmark by which the interpreter finds its stdlib directory
    landmark_src = os.path.join(stdlib, "os.py")
    arc.copy(f"{pylib()}/os.py", landmark_src, component="python-stdlib")
    arc.dir(f"{pylib()}/lib-dynload", component="python-stdlib")
    so_needed: list[str] = []
    product_added = add_python_modules(arc, product["modules"], set(product["modules"]),
                                       "python-stdlib", stdlib, so_needed, frozen)
    harness_added = add_python_modules(arc, harness["modules"],
                                       set(harness["modules"]) - set(product["modules"]),
                                       "harness-stdlib", stdlib, so_needed, frozen)
    # packages need their __init__ even if only a submodule was listed
    for name in [n for n in product["modules"]] + [n for n in harness["modules"]]:
        parts = name.split(".")
        for i in range(1, len(parts)):
            pkg = ".".join(parts[:i])
            init = os.path.join(stdlib, *parts[:i], "__init__.py")
            dest = f"{pylib()}/{'/'.join(parts[:i])}/__init__.py"
            if os.path.exists(init) and dest not in arc.entries:
                arc.copy(dest, init, component="python-stdlib")
    if pyc:
        compile_pycs(arc)
    arc.copy(f"{PYPREFIX}/bin/python3", py.path, mode=0o755, component="python-interpreter")
    libs: list[str] = []
    for binary in [py.path, *so_needed]:
        for lib in ldd(binary):
            if lib not in libs:
                libs.append(lib)
    for lib in libs:
        arc.copy(f"/nix/lib/{os.path.basename(lib)}", os.path.realpath(lib), mode=0o755,
                 component="python-libs")
    arc.copy("/nix/bin/python3", str(HERE / "guest/python-wrapper"), mode=0o755,
             component="python-interpreter")

    # the product and its config; the stage-2 inspector
    arc.copy("/nix/impermanence/impermanence_boot.py", str(script), mode=0o755,
             component="script")
    if pyc:
        # What stage 1 runs: compiled once here, not at every boot.
        with tempfile.TemporaryDirectory() as tmp:
            compiled = Path(tmp) / "impermanence_boot.pyc"
            run([py.path, "-I", "-c",
                 "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], "
                 "dfile=sys.argv[3], doraise=True, "
                 "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)",
                 str(script), str(compiled), "/nix/impermanence/impermanence_boot.py"])
            arc.file("/nix/impermanence/impermanence_boot.pyc", compiled.read_bytes(),
                     component="script")
    check_config(script, config)
    arc.copy("/nix/impermanence/config.json", str(config), mode=0o644, component="config")
    # the per-entry shell approach for the same config, for the comparison
    # (run only when a boot asks for it: vm/guest/init, vm/shell_approach.py)
    cfg = json.loads(config.read_text())
    shell_text = shell_approach.script(cfg)
    arc.file("/nix/impermanence/shell-approach.sh", shell_text.encode(), mode=0o755,
             component="harness")
    arc.file("/nix/impermanence/shell-storage", shell_approach.storage_mount(cfg).encode(),
             component="harness")
    arc.copy("/nix/stage2/init", str(HERE / "guest/stage2-init"), mode=0o755, component="harness")
    arc.copy("/nix/stage2/stage2.py", str(stage2), mode=0o644, component="harness")

    blob = arc.to_bytes()
    (out_dir / "initramfs.cpio").write_bytes(blob)
    shutil.copyfile(kernel, out_dir / "vmlinuz")
    sizes = arc.sizes()
    py_bytes = sum(sizes.get(k, 0) for k in ("python-interpreter", "python-libs", "python-stdlib"))
    manifest = {
        "kver": kver,
        "kernel": str(kernel),
        "python": py.path,
        "python_version": py.version,
        "initramfs": str(out_dir / "initramfs.cpio"),
        "initramfs_bytes": len(blob),
        "initramfs_gzip_bytes": len(gzip.compress(blob, 6)),
        "component_bytes": sizes,
        "python_and_script_bytes": py_bytes + sizes.get("script", 0),
        "python_and_script_gzip_bytes": len(gzip.compress(b"".join(
            e["data"] for e in arc.entries.values()
            if e["component"] in ("python-interpreter", "python-libs", "python-stdlib", "script")), 6)),
        "pyc": pyc,
        "kernel_modules": order,
        "shared_libraries": libs,
        "stdlib_needed": sorted(product["modules"]),  # incl. built-in and frozen
        "stdlib_modules": sorted(product_added),  # the ones copied as files
        "stdlib_builtin": sorted(n for n, f in product["modules"].items() if not f),
        "stdlib_frozen_not_copied": sorted(frozen),
        "stdlib_startup": product["startup"],
        "stdlib_exercised": product["exercised"],
        "stdlib_missing": product["missing"],
        "harness_only_modules": sorted(harness_added),
        "shell_approach_commands": shell_approach.command_count(shell_text),
        "script_sha256": __import__("hashlib").sha256(script.read_bytes()).hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "build")
    ap.add_argument("--script", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--kver", default=None)
    ap.add_argument("--no-pyc", action="store_true", help="ship .py only")
    a = ap.parse_args()
    try:
        m = build(a.out, a.script, a.config, a.kver, pyc=not a.no_pyc)
    except BuildError as e:
        print(f"build_initramfs: {e}", file=sys.stderr)
        return 1
    print(f"initramfs: {m['initramfs']} {m['initramfs_bytes']} bytes "
          f"({m['initramfs_gzip_bytes']} gzip); python + script: "
          f"{m['python_and_script_bytes']} bytes ({m['python_and_script_gzip_bytes']} gzip)")
    for k, v in sorted(m["component_bytes"].items()):
        print(f"  {k:20} {v:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
