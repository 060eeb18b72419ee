"""The script as it is shipped: the Python it needs, what it imports, its
entry point."""
from __future__ import annotations

import sys

from support import BIRD, SCRIPT, base_config, populate, same_inode, owner_mode

import impermanence_boot as ib


def test_script_parses_as_python_3_9():
    # Initrds ship whatever Python the distribution has: 3.9 is the floor.
    import ast
    ast.parse(SCRIPT.read_text(), feature_version=(3, 9))


def test_script_imports_only_the_standard_library_and_few_modules_at_start():
    import ast
    tree = ast.parse(SCRIPT.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert top_level <= {"__future__", "errno", "gc", "os", "stat", "sys", "time"}
    # gc is compiled into the interpreter: no file to copy into the initramfs.
    assert "gc" in sys.builtin_module_names
    everything = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {name for name in everything if not in_standard_library(name)} == set()


def in_standard_library(name: str) -> bool:
    """sys.stdlib_module_names (3.10+); before it, where the module is found:
    compiled in, frozen, or under the standard library's directories outside
    site-packages."""
    if hasattr(sys, "stdlib_module_names"):
        return name in sys.stdlib_module_names
    import importlib.util
    import os
    import sysconfig
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return False
    if spec.origin == "frozen":
        return True
    origin = os.path.realpath(spec.origin)
    paths = sysconfig.get_paths()
    dirs = {os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib")}
    return "site-packages" not in origin and any(origin.startswith(d) for d in dirs)


def test_standard_library_check_tells_them_apart():
    assert in_standard_library("os") and in_standard_library("json") and in_standard_library("gc")
    assert not in_standard_library("pytest") and not in_standard_library("hypothesis")
    assert not in_standard_library("no_such_module_anywhere")


def test_pyproject_entry_point():
    try:
        import tomllib
    except ImportError:  # before 3.11: its original, which pytest needs there too
        import tomli as tomllib
    data = tomllib.loads((SCRIPT.parent / "pyproject.toml").read_text())
    assert data["project"]["requires-python"] == ">=3.9"
    module, func = data["project"]["scripts"]["impermanence-boot"].split(":")
    assert module == "impermanence_boot" and callable(getattr(ib, func))
    assert set(data["project"]["optional-dependencies"]["test"]) == {"pytest", "hypothesis"}


def test_mounting_loads_only_the_c_half_of_ctypes(sandbox, disk):
    # mount(2) for the fileSystems, open_tree/move_mount for the binds,
    # renameat2 for a user-owned directory: all bound through _ctypes. The
    # ctypes package would add ctypes, types, struct, _struct, ctypes._endian to
    # every initramfs and their loading to every boot.
    cfg = base_config(disk.label, {"directories": [{"directory": "/srv/a", "user": "bird"}],
                                   "files": ["/etc/hostname"]})
    populate(disk, {"etc/hostname": b"h\n"})
    result = sandbox.run("apply", config=cfg, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = [l.rsplit("|", 1)[-1].strip() for l in result.stderr.splitlines() if l.startswith("import time:")]
    assert "_ctypes" in imported
    assert not {"ctypes", "ctypes._endian", "struct"} & set(imported), imported
    assert same_inode(sandbox.path("/srv/a"), sandbox.path("/persistent/srv/a"))
    assert owner_mode(sandbox.path("/persistent/srv/a"))[0] == BIRD
    assert same_inode(sandbox.path("/etc/hostname"), sandbox.path("/persistent/etc/hostname"))


def test_one_stdlib_module_finder_and_nothing_of_the_test_harness_shipped():
    """The dracut module, the initramfs-tools hook and the NixOS module run
    one stdlib-module finder, dist/lib/initramfs_files.py, and depend on
    nothing under vm/ or tests/ (a file the Nix module names is copied into
    every system that uses it)."""
    import re
    project = SCRIPT.parent
    finder = project / "dist" / "lib" / "initramfs_files.py"
    skip = {".git", ".venv", ".hypothesis", "__pycache__", "build", "results"}
    users = sorted(str(p.relative_to(project)) for p in project.rglob("*")
                   if p.is_file() and not skip & set(p.relative_to(project).parts)
                   and re.search(r"^\s*(import|from) modulefinder\b",
                                 p.read_text(errors="replace"), re.M))
    assert users == ["dist/lib/initramfs_files.py"], users
    shipped = [p for p in (project / "nix").iterdir() if p.is_file()]
    shipped += [p for p in (project / "dist").rglob("*") if p.is_file()]
    named = set()
    for path in shipped:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue  # a comment may point at the test that covers it
            assert not re.search(r"(?<![\w.-])(\.\./)*(vm|tests)/", line), f"{path}:{n}: {line}"
            if path.suffix == ".nix":
                for literal in re.findall(r"(?<![\w/.-])\.\.?/[\w./-]+", line):
                    named.add((path.parent / literal).resolve())
    for target in named:
        assert target.exists(), target
        assert not {"vm", "tests"} & set(target.relative_to(project).parts), target
    assert finder in named  # the NixOS module builds the initrd's Python with it
