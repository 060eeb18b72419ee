"""The script as it is shipped: the Python it needs, what it imports, its
entry point."""
from __future__ import annotations

import sys

from reliability_support import owner_mode
from support import BIRD, SCRIPT, base_config, populate, same_inode

sys.path.insert(0, str(SCRIPT.parent))
import impermanence_boot as ib  # noqa: E402


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
    assert everything <= set(sys.stdlib_module_names)


def test_pyproject_entry_point():
    import tomllib
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
