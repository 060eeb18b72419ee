"""The tests' way to the real nixpkgs module system (imported by
tests/nix/test_nix_*.py; stdlib only).

Where nixpkgs' `lib` comes from, in this order:
  1. $NIXPKGS_LIB: a `lib` directory (with modules.nix), or a nixpkgs
     checkout holding one;
  2. `<nixpkgs/lib>`, when nix-instantiate finds it (NIX_PATH, -I);
  3. the nixpkgs.lib tarball in the shared vendor directory
     ($IMPERMANENCE_VENDOR, else ../shared/vendor beside the project),
     extracted to a temporary directory.
NixOS impermanence (nixos.nix, home-manager.nix, flake.nix) comes from
$IMPERMANENCE_SRC, else the vendor directory's impermanence.tar.gz.

Each lookup returns (path, None) or (None, why it is missing), for the
tests' `require`.  `evaluate` runs nix-instantiate --eval --strict --json
on an expression and returns the decoded value.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

NIX_TESTS = Path(__file__).resolve().parent
NIX_DIR = NIX_TESTS.parent
PROJECT = NIX_DIR.parent
EVAL_NIX = NIX_TESTS / "eval.nix"
MODULE_NIX = NIX_DIR / "module.nix"

_scratch: Path | None = None
_cache: dict = {}


def scratch() -> Path:
    """One temporary directory for this process (extracted tarballs, the
    Nix state directory), removed at exit."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix="impermanence-nix-"))
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def vendor_dir() -> Path:
    return Path(os.environ.get("IMPERMANENCE_VENDOR") or PROJECT.parent / "shared" / "vendor")


def have_nix() -> bool:
    return shutil.which("nix-instantiate") is not None


def nix_env() -> dict:
    state = scratch() / "nix-state"
    state.mkdir(exist_ok=True)
    return dict(os.environ, NIX_STATE_DIR=str(state), NIX_LOG_DIR=str(state / "log"),
                NIX_CONFIG="build-users-group =", HOME=str(scratch()))


def run_nix(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["nix-instantiate", "--readonly-mode", *args], capture_output=True,
                          text=True, env=nix_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def _extract(tarball: Path, inner: str) -> Path | None:
    dest = scratch() / tarball.name.split(".")[0]
    if not (dest / inner).exists():
        dest.mkdir(exist_ok=True)
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest)
    found = dest / inner
    return found if found.exists() else None


def _lib_dir(path: Path) -> Path | None:
    for candidate in (path, path / "lib"):
        if (candidate / "modules.nix").is_file() and (candidate / "default.nix").is_file():
            return candidate
    return None


def nixpkgs_lib() -> tuple[Path | None, str | None]:
    """(the nixpkgs `lib` directory, None) or (None, why there is none)."""
    if "lib" in _cache:
        return _cache["lib"]
    result: tuple[Path | None, str | None]
    given = os.environ.get("NIXPKGS_LIB")
    if given:
        found = _lib_dir(Path(given))
        result = (found, None) if found else (None, f"$NIXPKGS_LIB={given} holds no nixpkgs lib")
    elif not have_nix():
        result = (None, "nix-instantiate is not installed (Debian package nix-bin)")
    else:
        proc = run_nix(["--find-file", "nixpkgs/lib"], timeout=60)
        found = _lib_dir(Path(proc.stdout.strip())) if proc.returncode == 0 and proc.stdout.strip() else None
        if found:
            result = (found, None)
        else:
            tarball = vendor_dir() / "nixpkgs-lib.tar.gz"
            if tarball.is_file():
                found = _extract(tarball, "nixpkgs-lib/lib")
                result = (found, None) if found else (None, f"{tarball} holds no nixpkgs-lib/lib")
            else:
                result = (None, "no nixpkgs lib: $NIXPKGS_LIB is unset, <nixpkgs/lib> is not in the "
                                f"Nix search path and {tarball} does not exist")
    _cache["lib"] = result
    return result


def impermanence_src() -> tuple[Path | None, str | None]:
    """(NixOS impermanence's source directory, None) or (None, why)."""
    if "impermanence" in _cache:
        return _cache["impermanence"]
    given = os.environ.get("IMPERMANENCE_SRC")
    if given:
        path = Path(given)
        result = (path, None) if (path / "nixos.nix").is_file() else (None, f"$IMPERMANENCE_SRC={given} has no nixos.nix")
    else:
        tarball = vendor_dir() / "impermanence.tar.gz"
        if tarball.is_file():
            found = _extract(tarball, "impermanence")
            result = (found, None) if found and (found / "nixos.nix").is_file() else (None, f"{tarball} holds no impermanence/nixos.nix")
        else:
            result = (None, f"no NixOS impermanence source: $IMPERMANENCE_SRC is unset and {tarball} does not exist")
    _cache["impermanence"] = result
    return result


class NixError(Exception):
    def __init__(self, stderr: str):
        super().__init__(stderr)
        self.stderr = stderr


def evaluate(expr: str, name: str = "expr"):
    """The value of a Nix expression (nix-instantiate --eval --strict --json)."""
    directory = Path(tempfile.mkdtemp(dir=scratch(), prefix="eval-"))
    path = directory / f"{name}.nix"
    path.write_text(expr)
    proc = run_nix(["--eval", "--strict", "--json", str(path)])
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    return json.loads(proc.stdout)


def nix_string(value: str) -> str:
    """A Nix string literal."""
    return json.dumps(value).replace("${", "\\${")


def system(modules: str, select: str, *, lib: Path, home_manager: bool = False,
           vm: bool = False, scripted_initrd: bool = True, bindings: str = "") -> str:
    """An expression evaluating `modules` (Nix list elements, `lib` and
    the bindings in scope) with nix/tests/eval.nix, returning `select`
    (in scope: e = the evaluation, config = e.config, lib).  Without
    `scripted_initrd`, stage-1.nix's scripted options are not declared."""
    return f'''
let
  lib = import {lib};
  {bindings}
  e = import {EVAL_NIX} {{
    inherit lib;
    homeManager = {"true" if home_manager else "false"};
    vm = {"true" if vm else "false"};
    scriptedInitrd = {"true" if scripted_initrd else "false"};
    modules = [ {modules} ];
  }};
  inherit (e) config;
in
{select}
'''


def run_initrd_python_step(build_command: str, replacements: dict, out: Path, work: Path) -> str:
    """The module's build step of the initrd's interpreter
    (boot.initrd.impermanence.initrdPython), its Python part (everything
    before its `# ELF:` part, which needs patchelf), run here with store
    paths replaced by local files; the output goes to `out`.  Returns the
    step's list of ELF files."""
    head = build_command.split("# ELF:")[0]
    for old, new in replacements.items():
        head = head.replace(old, str(new))
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sh", "-ec", head], cwd=work, env=dict(os.environ, out=str(out)),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"the build step failed:\n{head}\n{proc.stdout}{proc.stderr}")
    return (work / "elf-files").read_text()
