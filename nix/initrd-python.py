"""The initrd's Python: the interpreter and only the standard-library
modules impermanence_boot.py imports, laid out as a prefix of its own.
Run at build time by that very interpreter (nix/module.nix), after
dist/lib/initramfs_files.py --json has listed the files (computed from the
script, never a hand-kept list):

    python3 -I nix/initrd-python.py MODULES.json OUT

Writes into OUT:
  bin/python3                     a copy of the interpreter binary
  lib/pythonX.Y/...               every standard-library file MODULES.json
                                  lists ("files": os.py, by which the
                                  interpreter finds its library, the
                                  prefix being the directory above bin/;
                                  the modules' files, extension modules in
                                  lib-dynload/; the packages' __init__)
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
    missing = found.get("missing", [])
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

    os.makedirs(os.path.join(libdir, "lib-dynload"), exist_ok=True)
    for path in found["files"]:
        add(path)

    if not compileall.compile_dir(libdir, quiet=1, workers=1,
                                  invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH):
        raise SystemExit("initrd-python: byte-compiling failed")
    for line in elf:
        print(line)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
