"""Run by the *target* interpreter:

    python3 -I vm/find_modules.py SCRIPT [SCRIPT...]

Print, as JSON, the standard-library modules the scripts import, computed
from the scripts themselves (no hand-kept list):

* static: ``modulefinder`` over each script, following every import in the
  script, including the ones inside functions (the script imports some
  modules lazily, e.g. ``ctypes``). For a standard-library module only the
  code that runs when it is imported is followed (module body and class
  bodies); imports inside stdlib functions are not, otherwise ``os``
  (``os.popen`` imports ``subprocess``) alone would drag in hundreds of
  modules that are never loaded;
* start-up: what the interpreter itself imports before running anything,
  measured by starting it with the same flags as the initramfs (-I, an
  empty environment): ``encodings``, ``site``, ...;
* exercised: ``--exercise ARGS`` (repeatable) runs SCRIPT with those
  arguments in a fresh interpreter and adds whatever it actually loaded,
  which catches imports done lazily inside the standard library (argparse
  imports shutil only when it formats help). Use only read-only commands.

Output: {"modules": {name: file-or-null}, "missing": [...], "startup": [...],
"exercised": [...], "frozen": [...]} (frozen modules are compiled into the
interpreter binary; their files are only needed for tracebacks).
"""
import importlib.util
import json
import modulefinder
import os
import subprocess
import sys
import types

# Modules that exist only on other platforms; the stdlib mentions them in
# platform branches and modulefinder reports them as missing.
OTHER_PLATFORMS = {"nt", "winreg", "msvcrt", "_winapi", "_overlapped", "winapi",
                   "_winreg", "java", "org", "vms_lib", "_scproxy", "_msi",
                   "_wmi", "_posixshmem_win"}

CO_NEWLOCALS = 0x0002  # set on function code objects, not on module/class bodies

# Debian add-ons that site finds through dist-packages; not part of the stdlib
# the initramfs needs (sitecustomize only tries to import apport).
DISTRO_ADDONS = {"sitecustomize", "_distutils_hack", "apport_python_hook"}
# Imported by the interpreter itself, never by an import statement: on 3.9
# a text-mode open() without an encoding asks _bootlocale, and without it
# reads the file as ascii, a codec the image may not hold either.
IMPLICIT = ("_bootlocale",)


class ImportTimeFinder(modulefinder.ModuleFinder):
    """Follows every import of the scripts, but only import-time imports of
    library modules."""

    def __init__(self, scripts, **kw):
        super().__init__(**kw)
        self.scripts = {os.path.realpath(s) for s in scripts}

    def scan_code(self, co, m):
        if m.__file__ and os.path.realpath(m.__file__) in self.scripts:
            return super().scan_code(co, m)
        # Library module: follow only code that runs at import time. Function
        # bodies are blanked out (same const indexes); class bodies stay and
        # are scanned through this method again by the recursion in
        # ModuleFinder.scan_code.
        consts = tuple(None if isinstance(c, types.CodeType) and c.co_flags & CO_NEWLOCALS
                       else c for c in co.co_consts)
        return super().scan_code(co.replace(co_consts=consts), m)


def run_and_collect(prefix_code, argv, env):
    import tempfile
    fd, out = tempfile.mkstemp(prefix="find_modules.", suffix=".json")
    os.close(fd)
    try:
        code = (
            "import sys\n"
            f"OUT = {out!r}\n"
            "def _dump():\n"
            "    mods = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}\n"
            "    import json\n"
            "    with open(OUT, 'w') as f: json.dump(mods, f)\n"
            + prefix_code)
        subprocess.run([sys.executable, "-I", "-c", code, *argv], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        with open(out) as f:
            text = f.read()
        return json.loads(text) if text else {}
    finally:
        os.unlink(out)


def startup_modules():
    mods = run_and_collect("_dump()\n", [], {})
    return {n: f for n, f in mods.items()
            if n != "__main__" and n.split(".")[0] not in DISTRO_ADDONS}


def exercised_modules(script, args):
    # Runs the script as __main__ exactly like "python3 -I script ARGS";
    # sys.modules is dumped at exit (also on SystemExit), before the dump
    # imports json for itself. atexit is built in, so it adds no file.
    prefix = (
        "import atexit\n"
        "atexit.register(_dump)\n"
        f"sys.argv = [{script!r}] + sys.argv[1:]\n"
        f"__file__ = {script!r}\n"
        f"_src = open({script!r}).read()\n"
        "_g = {'__name__': '__main__', '__file__': __file__, '__builtins__': __builtins__}\n"
        f"exec(compile(_src, {script!r}, 'exec'), _g)\n")
    env = {"IMPERMANENCE_NO_KMSG": "1"}
    return run_and_collect(prefix, args, env)


def main(argv):
    scripts, exercises = [], []
    it = iter(argv)
    for a in it:
        if a == "--exercise":
            exercises.append(json.loads(next(it)))
        else:
            scripts.append(a)
    result = {"modules": {}, "missing": [], "startup": [], "exercised": []}
    finder = ImportTimeFinder(scripts, excludes=sorted(OTHER_PLATFORMS))
    for script in scripts:
        finder.run_script(script)
    for name, mod in finder.modules.items():
        if name != "__main__":
            result["modules"][name] = mod.__file__
    missing, _maybe = finder.any_missing_maybe()
    # os.path is an alias os sets up at run time (posixpath): never a file
    result["missing"] = sorted(m for m in missing
                               if m.split(".")[0] not in OTHER_PLATFORMS and m != "os.path")
    for name, path in startup_modules().items():
        result["startup"].append(name)
        result["modules"].setdefault(name, path)
    for name in IMPLICIT:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            result["modules"].setdefault(name, spec.origin)
    if scripts:
        for args in exercises:
            for name, path in exercised_modules(scripts[0], args).items():
                if name == "__main__" or name.split(".")[0] in DISTRO_ADDONS:
                    continue
                if name not in result["modules"]:
                    result["exercised"].append(name)
                    result["modules"][name] = path
    import _imp
    result["frozen"] = sorted(n for n in result["modules"] if _imp.is_frozen(n))
    result["startup"].sort()
    result["exercised"] = sorted(set(result["exercised"]))
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
