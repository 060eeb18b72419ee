#!/usr/bin/env python3
"""The standard-library modules an initramfs needs to run
impermanence_boot.py, computed from the script (no hand-kept list); stdlib
only. The project's one finder: the dracut module, the initramfs-tools
hook, the NixOS module and the test machine's builder all run it, with the
interpreter that is to go into the initramfs:

    python3 -I initramfs_files.py SCRIPT OUTDIR
    python3 -I initramfs_files.py --json [--exercise ARGS]... [--no-exercise] SCRIPT [SCRIPT...]

The first form (the distributions' hooks) byte-compiles the script and the
modules it needs into OUTDIR (unchecked-hash .pyc: valid whatever the copied
files' mtimes, so no boot compiles anything) and prints one line per file
to install:

    bin  SRC             the interpreter (the builder adds its libraries)
    lib  SRC             an extension module (the builder adds its libraries)
    file SRC DEST        a plain file

The second prints, as JSON, {"modules": {name: file-or-null}, "files":
[...], "missing": [...], "startup": [...], "exercised": [...], "frozen":
[...]}: "files" are the standard-library files to install (the modules'
own, the __init__ of each package holding one, os.py), "frozen" the modules
compiled into the interpreter binary (their files are only needed for
tracebacks).

The modules are:

* static: ``modulefinder`` over each script, following every import in the
  script, including the ones inside functions (the script imports some
  modules lazily, e.g. ``ctypes``). For a standard-library module only the
  code that runs when it is imported is followed (module body and class
  bodies); imports inside stdlib functions are not, otherwise ``os``
  (``os.popen`` imports ``subprocess``) alone would drag in hundreds of
  modules that are never loaded;
* start-up: what the interpreter itself imports before running anything,
  started with the same flags as the initramfs (-I, an empty environment):
  ``encodings``, ``site``, ...;
* exercised: read-only runs of the first script in a fresh interpreter
  (EXERCISES, or each ``--exercise ARGS``, a JSON list), adding whatever
  they actually loaded, which catches imports done lazily inside the
  standard library (argparse imports shutil only when it formats help).
"""
import importlib.util
import json
import modulefinder
import os
import py_compile
import subprocess
import sys
import sysconfig
import tempfile
import types

SCRIPT_DEST = "/usr/lib/impermanence-boot/impermanence_boot.pyc"
# Modules that exist only on other platforms; the stdlib mentions them in
# platform branches and modulefinder reports them as missing.
OTHER_PLATFORMS = {"nt", "winreg", "msvcrt", "_winapi", "_overlapped", "winapi",
                   "_winreg", "java", "org", "vms_lib", "_scproxy", "_msi",
                   "_wmi", "_posixshmem_win"}
# Debian add-ons that site finds through dist-packages; not part of the stdlib
# the initramfs needs (sitecustomize only tries to import apport).
DISTRO_ADDONS = {"sitecustomize", "_distutils_hack", "apport_python_hook"}
# Imported by the interpreter itself, never by an import statement: on 3.9
# a text-mode open() without an encoding asks _bootlocale, and without it
# reads the file as ascii, a codec the image may not hold either.
IMPLICIT = ("_bootlocale",)
CO_NEWLOCALS = 0x0002  # set on function code objects, not on module/class bodies
EXERCISES = (["--help"], ["check", "--help"],
             ["--config", "/nonexistent/impermanence.json", "check"])


class NotStdlib(Exception):
    """A module the scripts need comes from outside the standard library."""


class ImportTimeFinder(modulefinder.ModuleFinder):
    """Every import of the scripts; of a library module, only import-time ones
    (following imports inside stdlib functions would pull in hundreds)."""

    def __init__(self, scripts, **kw):
        super().__init__(**kw)
        self.scripts = {os.path.realpath(s) for s in scripts}

    def scan_code(self, co, m):
        if m.__file__ and os.path.realpath(m.__file__) in self.scripts:
            return super().scan_code(co, m)
        # Library module: function bodies are blanked out (same const
        # indexes); class bodies stay and are scanned through this method
        # again by the recursion in ModuleFinder.scan_code.
        consts = tuple(None if isinstance(c, types.CodeType) and c.co_flags & CO_NEWLOCALS
                       else c for c in co.co_consts)
        return super().scan_code(co.replace(co_consts=consts), m)


def loaded_by(prefix_code, argv, env):
    """{name: file} of the modules a fresh interpreter has loaded when it exits."""
    fd, out = tempfile.mkstemp(prefix="initramfs-files.", suffix=".json")
    os.close(fd)
    code = ("import sys\n"
            "def _dump():\n"
            "    mods = {n: getattr(m, '__file__', None) for n, m in list(sys.modules.items())}\n"
            "    import json\n"
            f"    with open({out!r}, 'w') as f: json.dump(mods, f)\n" + prefix_code)
    try:
        subprocess.run([sys.executable, "-I", "-c", code, *argv], env=env, timeout=60,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        with open(out) as f:
            text = f.read()
        return json.loads(text) if text else {}
    finally:
        os.unlink(out)


def exercised_by(script, args):
    """What running SCRIPT as __main__ with ARGS loads; sys.modules is dumped
    at exit (also on SystemExit), before the dump imports json for itself.
    atexit is built in, so it adds no file."""
    run_script = ("import atexit\n"
                  "atexit.register(_dump)\n"
                  f"sys.argv = [{script!r}] + sys.argv[1:]\n"
                  f"_g = {{'__name__': '__main__', '__file__': {script!r}}}\n"
                  f"exec(compile(open({script!r}).read(), {script!r}, 'exec'), _g)\n")
    return loaded_by(run_script, args, {"IMPERMANENCE_NO_KMSG": "1"})


def stdlib_dir():
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def stdlib_files(modules, frozen):
    """The files to install for MODULES ({name: file}): os.py, by which the
    interpreter finds its library directory (though os is frozen), each
    module's file unless built in or frozen, and the __init__ of each
    package holding one."""
    stdlib = stdlib_dir()
    files = {os.path.join(stdlib, "os.py")}
    for name, path in modules.items():
        if not path or name in frozen:
            continue
        real = os.path.realpath(path)
        if not real.startswith(stdlib + "/"):
            raise NotStdlib(f"{name} comes from {path}, outside the standard library {stdlib}")
        files.add(real)
        parts = name.split(".")
        for i in range(1, len(parts)):
            init = os.path.join(stdlib, *parts[:i], "__init__.py")
            if os.path.exists(init):
                files.add(init)
    return sorted(files)


def find(scripts, exercises=EXERCISES):
    """The modules SCRIPTS need, as the --json form prints them."""
    finder = ImportTimeFinder(scripts, excludes=sorted(OTHER_PLATFORMS))
    for script in scripts:
        finder.run_script(script)
    modules = {n: m.__file__ for n, m in finder.modules.items() if n != "__main__"}
    missing, _maybe = finder.any_missing_maybe()
    loaded = loaded_by("_dump()\n", [], {})
    startup = sorted(n for n in loaded
                     if n != "__main__" and n.split(".")[0] not in DISTRO_ADDONS)
    for name in startup:
        modules.setdefault(name, loaded[name])
    for name in IMPLICIT:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            modules.setdefault(name, spec.origin)
    exercised = set()
    for args in exercises if scripts else ():
        for name, path in exercised_by(scripts[0], args).items():
            if name != "__main__" and name.split(".")[0] not in DISTRO_ADDONS \
                    and name not in modules:
                exercised.add(name)
                modules[name] = path
    import _imp
    frozen = sorted(n for n in modules if _imp.is_frozen(n))
    return {
        "modules": modules,
        "files": stdlib_files(modules, set(frozen)),
        # os.path is an alias os sets up at run time (posixpath): never a file
        "missing": sorted(m for m in missing
                          if m.split(".")[0] not in OTHER_PLATFORMS and m != "os.path"),
        "startup": startup,
        "exercised": sorted(exercised),
        "frozen": frozen,
    }


def pyc(src, dest_py, outdir):
    """src compiled into outdir; returns (file, its place in the initramfs)."""
    d, base = os.path.split(dest_py)
    dest = f"{d}/__pycache__/{base[:-3]}.{sys.implementation.cache_tag}.pyc"
    out = outdir + dest
    os.makedirs(os.path.dirname(out), exist_ok=True)
    py_compile.compile(src, cfile=out, dfile=dest_py, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return out, dest


def install_list(script, outdir):
    """The lines of the SCRIPT OUTDIR form, compiling into OUTDIR."""
    lines = [f"bin {os.path.realpath(sys.executable)}"]
    for path in find([script])["files"]:
        if path.endswith(".py"):
            lines.append(f"file {path} {path}")
            lines.append("file %s %s" % pyc(path, path, outdir))
        else:
            lines.append(f"lib {path}")
    out = outdir + SCRIPT_DEST
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # The script itself: one .pyc run directly (python -I -S SCRIPT.pyc).
    py_compile.compile(script, cfile=out, dfile=SCRIPT_DEST[:-1], doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    lines.append(f"file {out} {SCRIPT_DEST}")
    return lines


USAGE = ("usage: initramfs_files.py SCRIPT OUTDIR\n"
         "       initramfs_files.py --json [--exercise ARGS]... [--no-exercise] SCRIPT...")


def main(argv):
    try:
        if argv[:1] == ["--json"]:
            scripts, exercises = [], []
            default = True
            it = iter(argv[1:])
            for a in it:
                if a == "--exercise":
                    exercises.append(json.loads(next(it)))
                    default = False
                elif a == "--no-exercise":
                    default = False
                else:
                    scripts.append(a)
            if not scripts:
                print(USAGE, file=sys.stderr)
                return 2
            json.dump(find(scripts, EXERCISES if default else exercises), sys.stdout,
                      indent=1, sort_keys=True)
            sys.stdout.write("\n")
            return 0
        if len(argv) != 2 or argv[0].startswith("-"):
            print(USAGE, file=sys.stderr)
            return 2
        lines = install_list(os.path.realpath(argv[0]), os.path.realpath(argv[1]))
    except NotStdlib as e:
        print(f"initramfs_files: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
