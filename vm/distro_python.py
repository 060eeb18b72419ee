"""The interpreter that goes into initramfs images, chroots and benchmarks:
the distribution's python3, never a pinned minor version.

    IMPERMANENCE_PYTHON   another interpreter (a path or a name on PATH)

Default: `readlink -f /usr/bin/python3`, the one the distribution ships
with its shared libraries (python3 on PATH may be a private build, whose
libraries an initramfs would not find). Everything that depends on the
version (the stdlib directory, the lib/pythonX.Y name, .pyc tags, the
extension suffix) is asked of that interpreter, once.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

ENV = "IMPERMANENCE_PYTHON"
DEFAULT = "/usr/bin/python3"

_QUERY = ("import json, os, sys, sysconfig\n"
          "print(json.dumps({'version': '%d.%d' % sys.version_info[:2],\n"
          "    'cache_tag': sys.implementation.cache_tag,\n"
          "    'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX'),\n"
          "    'stdlib': os.path.realpath(sysconfig.get_paths()['stdlib'])}))\n")


@dataclass(frozen=True)
class Interpreter:
    path: str        # the real file, symlinks resolved
    version: str     # "3.9"
    cache_tag: str   # "cpython-39": the .pyc tag
    ext_suffix: str  # ".cpython-39-x86_64-linux-gnu.so"
    stdlib: str      # "/usr/lib/python3.9"

    @property
    def name(self) -> str:
        """python3.9: the lib/<name> directory and the versioned binary."""
        return f"python{self.version}"

    def pyc(self, py: str) -> str:
        """The __pycache__ path of a .py file for this interpreter."""
        head, base = os.path.split(py)
        return os.path.join(head, "__pycache__", f"{base[:-3]}.{self.cache_tag}.pyc")


class NoInterpreter(Exception):
    pass


def requested() -> str:
    """The interpreter asked for: $IMPERMANENCE_PYTHON, else /usr/bin/python3,
    resolved to the real file."""
    name = os.environ.get(ENV) or DEFAULT
    found = name if "/" in name else shutil.which(name)
    if not found or not os.path.isfile(found):
        how = (f"${ENV}={name}" if os.environ.get(ENV)
               else f"{DEFAULT} (apt-get install python3-minimal)")
        raise NoInterpreter(f"no interpreter: {how} does not exist")
    return os.path.realpath(found)


@functools.lru_cache(maxsize=None)
def _describe(path: str) -> Interpreter:
    out = subprocess.run([path, "-I", "-S", "-c", _QUERY], check=True, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL).stdout
    return Interpreter(path=path, **json.loads(out))


def interpreter() -> Interpreter:
    """The interpreter in use, described."""
    return _describe(requested())


if __name__ == "__main__":
    import sys
    try:
        it = interpreter()
    except NoInterpreter as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    # `python3 vm/distro_python.py` prints the path, for shell scripts
    print(it.path)
