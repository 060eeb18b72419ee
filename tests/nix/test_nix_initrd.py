"""The initrd's interpreter (boot.initrd.impermanence.initrdPython): the
binary, its own libraries and only the standard-library modules the
script imports, computed at build time by dist/lib/initramfs_files.py — not the
whole python3Minimal closure.

Nothing is built with Nix here.  The tests read the module's derivation
(its command, references) and run the Python part of that very command
with the distribution's python3 standing in for the `python` option, then run
the script with the tree it makes; its ELF part (patchelf,
remove-references-to) runs only in a Nix build.  The size test prints the
size of that tree beside the same interpreter's whole standard library,
computed the same way, for the numbers in docs/nixos.md.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import PROJECT, SCRIPT, require
from support import distro_python

import harness

FIND_MODULES = PROJECT / "dist" / "lib" / "initramfs_files.py"
HELPER = harness.NIX_DIR / "initrd-python.py"

SELECT = r'''{
  settings = config.boot.initrd.impermanence.settings;
  unchecked = "${e.pkgs.writeText "impermanence-unchecked.json" (builtins.toJSON config.boot.initrd.impermanence.settings)}";
  python = "${config.boot.initrd.impermanence.python}";
  package = "${config.boot.initrd.impermanence.package}";
  initrdPython = {
    path = "${config.boot.initrd.impermanence.initrdPython}";
    inherit (config.boot.initrd.impermanence.initrdPython) buildCommand;
    disallowedReferences = map toString config.boot.initrd.impermanence.initrdPython.disallowedReferences;
    nativeBuildInputs = map toString config.boot.initrd.impermanence.initrdPython.nativeBuildInputs;
  };
  findModules = "${FIND_MODULES}";
  helper = "${HELPER}";
  postMountCommands = config.boot.initrd.postMountCommands;
  extraFiles = lib.mapAttrs (_: f: "${f.source}") config.boot.initrd.extraFiles;
  storePaths = map (p: "${p.source}") config.boot.initrd.systemd.storePaths;
  services = config.boot.initrd.systemd.services;
  systemPackages = map (p: p.text or "") config.environment.systemPackages;
}'''.replace("FIND_MODULES", str(FIND_MODULES)).replace("HELPER", str(HELPER))

CONFIG = r'''{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  environment.persistence."/persistent" = {
    directories = [ "/var/log" { directory = "/var/lib/colord"; mode = "u=rwx,g=rx,o="; } ];
    files = [ "/etc/machine-id" ];
    users.bird.directories = [ "Downloads" ];
  };
}'''


def evaluate(lib, *modules: str) -> dict:
    return harness.evaluate(harness.system(
        f"{harness.MODULE_NIX} " + " ".join(f"({m})" for m in (CONFIG, *modules)), SELECT, lib=lib))


def test_the_initrd_gets_the_small_interpreter(lib):
    for systemd in (False, True):
        out = evaluate(lib, f"{{ boot.initrd.systemd.enable = {'true' if systemd else 'false'}; }}")
        small, full = out["initrdPython"]["path"], out["python"]
        initrd_paths = list(out["extraFiles"].values()) + out["storePaths"]
        assert small in initrd_paths
        assert full not in initrd_paths, "the whole interpreter is in the initrd"
        command = (out["services"]["impermanence-boot"]["serviceConfig"]["ExecStart"] if systemd
                   else out["postMountCommands"])
        assert f"{small}/bin/python3 -I -S -B " in command
        assert f"{full}/bin" not in command
    # The build may not refer to the full interpreter (Nix checks it).
    assert out["initrdPython"]["disallowedReferences"] == [full]
    native = out["initrdPython"]["nativeBuildInputs"]
    assert any(p.endswith("-patchelf-0.18.0") for p in native)
    assert any(p.endswith("-remove-references-to") for p in native)
    # The running system's tool still uses the full interpreter.
    assert any(f"{full}/bin/python3" in text for text in out["systemPackages"])


def test_the_build_command(lib):
    out = evaluate(lib)
    command = out["initrdPython"]["buildCommand"]
    python = out["python"]
    # The modules are computed from the script by dist/lib/initramfs_files.py,
    # run by the interpreter itself, also exercising the script on its config.
    assert f"{python}/bin/python3 -I {out['findModules']} --json {out['package']}/bin/impermanence_boot.py" in command
    assert f'--exercise \'["--config", "{out["unchecked"]}", "check"]\'' in command
    assert f"{python}/bin/python3 -I {out['helper']} modules.json $out > elf-files" in command
    # ELF: libpython from the interpreter's prefix, run paths into $out,
    # then every remaining mention of the full interpreter erased.
    elf = command.split("# ELF:")[1]
    assert "patchelf --print-needed $out/bin/python3" in elf and f"{python}/lib/$lib" in elf
    assert f's|{python}/lib|$out/lib|g' in elf and "patchelf --set-rpath" in elf
    assert f"find $out -type f -exec remove-references-to -t {python} {{}} +" in elf


@pytest.fixture(scope="module")
def tree(lib, tmp_path_factory):
    """The Python part of the module's build command, run with the
    distribution's python3 as the `python` option."""
    py = distro_python()
    tmp = tmp_path_factory.mktemp("initrd-python")
    prefix = tmp / "python"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3").symlink_to(py.path)
    pkg = tmp / "pkg"
    (pkg / "bin").mkdir(parents=True)
    (pkg / "bin" / "impermanence_boot.py").symlink_to(SCRIPT)
    out = evaluate(lib, f'''{{
      boot.initrd.impermanence.python = {{ type = "derivation"; name = "python"; outPath = "{prefix}"; }};
      boot.initrd.impermanence.package = {{ type = "derivation"; name = "pkg"; outPath = "{pkg}"; }};
    }}''')
    unchecked = tmp / "unchecked.json"
    unchecked.write_text(json.dumps(out["settings"]))
    result = tmp / "out"
    elf = harness.run_initrd_python_step(out["initrdPython"]["buildCommand"], {
        out["findModules"]: FIND_MODULES, out["helper"]: HELPER, out["unchecked"]: unchecked,
    }, result, tmp / "build")
    return {"root": result, "elf": elf.split(), "config": unchecked, "modules": json.loads((tmp / "build" / "modules.json").read_text())}


def files_under(root) -> list:
    out = []
    for directory, _dirs, files in os.walk(root):
        out += [os.path.join(directory, f) for f in files]
    return sorted(out)


def test_the_tree_holds_only_what_the_script_imports(tree):
    root = tree["root"]
    rel = {os.path.relpath(f, root) for f in files_under(root)}
    assert "bin/python3" in rel
    it = distro_python()
    lib = f"lib/{it.name}/"
    assert lib + "os.py" in rel  # the landmark
    py = {r[len(lib):] for r in rel if r.endswith(".py")}
    # Every module the finder named is there (or frozen, or built in).
    modules = tree["modules"]
    for name, path in modules["modules"].items():
        if path and name not in modules["frozen"]:
            assert os.path.relpath(os.path.realpath(path), it.stdlib) in py | {
                r[len(lib):] for r in rel}, name
    # Only a small part of the standard library, byte-compiled.
    assert len(py) < 60, sorted(py)
    assert not any(p.startswith(("asyncio/", "email/", "unittest/", "xml/", "http/")) for p in py)
    assert all(os.path.exists(os.path.join(root, it.pyc(lib + p))) for p in py)
    # The extension modules are listed for the ELF step, with the binary.
    assert tree["elf"][0] == str(root / "bin" / "python3")
    assert any(e.endswith(f"/lib-dynload/_ctypes{it.ext_suffix}") for e in tree["elf"])


def test_the_tree_runs_the_script(tree, tmp_path):
    python = str(tree["root"] / "bin" / "python3")
    proc = subprocess.run([python, "-I", "-S", "-c", "import sys, json; print(json.dumps([sys.prefix, sys.path]))"],
                          capture_output=True, text=True, env={})
    prefix, path = json.loads(proc.stdout)
    assert prefix == str(tree["root"])
    assert all(p.startswith(str(tree["root"])) for p in path), path
    env = {"IMPERMANENCE_NO_KMSG": "1"}
    check = subprocess.run([python, "-I", "-S", "-B", str(SCRIPT), "--config", str(tree["config"]), "check"],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    root = tmp_path / "root"
    (root / "persistent").mkdir(parents=True)
    plan = subprocess.run([python, "-I", "-S", "-B", str(SCRIPT), "--root", str(root), "--config",
                           str(tree["config"]), "plan"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"bind {root}/persistent/var/log on {root}/var/log" in plan.stdout


def ldd(path: str) -> list:
    libs = []
    for line in subprocess.run(["ldd", path], capture_output=True, text=True).stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(os.path.realpath(m.group(1)))
    return libs


def measure(files: list) -> tuple[int, int]:
    """(bytes, gzip -6 bytes of their contents one after another), as
    vm/build_initramfs.py measures the initramfs."""
    data = b"".join(open(f, "rb").read() for f in files)
    return len(data), len(gzip.compress(data, 6))


# Left out of the whole standard library, as python3Minimal leaves them out
# (stripTests, stripIdlelib, stripTkinter, stripConfig, stripBytecode) or
# as they are not the standard library.
NOT_IN_MINIMAL = re.compile(r"(^|/)(test|tests|idlelib|tkinter|turtledemo|__pycache__|site-packages|"
                            r"dist-packages|config-3\.\d+-[^/]*)(/|$)")


def test_size_of_the_initrd_interpreter(tree):
    """The distribution's python3: its whole standard library (as python3Minimal
    would hold it: no tests, idlelib, tkinter, config, bytecode) with the
    libraries its extension modules need, against the tree the module's
    command makes; the binary (and glibc, libm, ...) are in both."""
    it = distro_python()
    stdlib, binary = it.stdlib, it.path
    whole = [f for f in files_under(stdlib) if not NOT_IN_MINIMAL.search(os.path.relpath(f, stdlib))
             and not os.path.islink(f)]
    whole_libs = sorted({lib for f in [binary, *whole] if f == binary or f.endswith(".so")
                         for lib in ldd(f)})
    small_stdlib = [f for f in files_under(tree["root"]) if f"/lib/{it.name}/" in f]
    small_libs = sorted({lib for f in tree["elf"] for lib in ldd(f)})
    parts = {
        "binary": measure([binary]),
        "whole stdlib": measure(whole), "whole libraries": measure(whole_libs),
        "small stdlib": measure(small_stdlib), "small libraries": measure(small_libs),
    }
    whole_total = measure([binary, *whole, *whole_libs])
    small_total = measure(files_under(tree["root"]) + small_libs)
    print(f"\ninitrd interpreter from {binary} (bytes, gzip -6 bytes):")
    for name, (size, gz) in [*parts.items(), ("whole total", whole_total), ("small total", small_total)]:
        print(f"  {name:16} {size:>10} {gz:>10}")
    print(f"  files: whole {len(whole)} + {len(whole_libs)} libraries, small {len(small_stdlib)} + {len(small_libs)}")
    print(f"  libraries only the whole needs: {sorted(set(whole_libs) - set(small_libs))}")
    assert set(small_libs) <= set(whole_libs)
    assert parts["small stdlib"][0] * 8 < parts["whole stdlib"][0]
    assert small_total[0] * 3 < whole_total[0] and small_total[1] * 2 < whole_total[1]
