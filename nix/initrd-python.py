"""The initrd's Python: the interpreter and only the standard-library
modules impermanence_boot.py imports.  Run at build time by that very
interpreter (nix/module.nix), after vm/find_modules.py has listed the
modules (computed from the script, never a hand-kept list):

    python3 -I nix/initrd-python.py MODULES.json OUT

Writes into OUT:
  bin/python3                     a copy of the interpreter binary
  lib/pythonX.Y/os.py             the landmark by which the interpreter
                                  finds its standard library (its prefix
                                  is the directory above bin/)
  lib/pythonX.Y/...               every module MODULES.json names that
                                  comes from the standard library (frozen
                                  ones aside: they are in the binary), the
                                  __init__ of each package holding one, and
                                  its extension modules in lib-dynload/
  lib/pythonX.Y/**/__pycache__    unchecked-hash .pyc files of them, so no
                                  boot compiles a module
and prints the ELF files written (the binary and the extension modules),
one a line, for the build step that rewrites their run paths.  The
interpreter's own shared libraries (libpython) and everything else the
build does to the ELF files is the build step's (nix/module.nix).
"""
import compileall
import json
import os
import py_compile
import sys
import sysconfig


def copy(src, dest, mode):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(src, "rb") as f:
        data = f.read()
    with open(dest, "wb") as f:
        f.write(data)
    os.chmod(dest, mode)


def main(modules_json, out):
    with open(modules_json) as f:
        found = json.load(f)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    libdir = os.path.join(out, "lib", os.path.basename(stdlib))
    frozen = set(found.get("frozen", ()))
    missing = [m for m in found.get("missing", ())]
    if missing:
        print(f"initrd-python: the script mentions modules this Python lacks: {missing}", file=sys.stderr)

    binary = os.path.join(out, "bin", "python3")
    copy(os.path.realpath(sys.executable), binary, 0o755)
    elf = [binary]

    def add(path):
        real = os.path.realpath(path)
        if not real.startswith(stdlib + os.sep):
            raise SystemExit(f"initrd-python: {path} is not in the standard library {stdlib}")
        dest = os.path.join(libdir, os.path.relpath(real, stdlib))
        if not os.path.exists(dest):
            copy(real, dest, 0o644)
            if dest.endswith(".so"):
                os.chmod(dest, 0o755)
                elf.append(dest)

    add(os.path.join(stdlib, "os.py"))
    os.makedirs(os.path.join(libdir, "lib-dynload"), exist_ok=True)
    for name, path in sorted(found["modules"].items()):
        if not path or name in frozen:
            continue  # built in, or frozen into the binary
        add(path)
        parts = name.split(".")
        for i in range(1, len(parts)):
            init = os.path.join(stdlib, *parts[:i], "__init__.py")
            if os.path.exists(init):
                add(init)

    if not compileall.compile_dir(libdir, quiet=1, workers=1,
                                  invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH):
        raise SystemExit("initrd-python: byte-compiling failed")
    for line in elf:
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
