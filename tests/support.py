"""What the test files share: running the script, reading the mount table,
the sandbox a test applies in, the storage scenario most apply tests start
from, and configs given as data. Fixtures stay in conftest.py."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT = PROJECT / "impermanence_boot.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    """Skip locally when a prerequisite is missing; in CI that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test, but {why}")
    pytest.skip(why)


def distro_python():
    """The distribution's interpreter (vm/distro_python.py), described: the
    one initramfs images and chroots run, whatever runs pytest."""
    import distro_python as dp
    try:
        return dp.interpreter()
    except dp.NoInterpreter as e:
        require(False, str(e))


# --- running the script ---------------------------------------------------------

def script_env(env: dict | None = None) -> dict:
    """This environment, with messages kept off /dev/kmsg (the host's log
    is no place for thousands of test lines) and no config named by the
    caller's IMPERMANENCE_CONFIG; then env on top."""
    full = dict(os.environ, IMPERMANENCE_NO_KMSG="1")
    full.pop("IMPERMANENCE_CONFIG", None)
    full.update(env or {})
    return full


def run(*args: str, env: dict | None = None, prefix: tuple = (), text: bool = True,
        timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    """The script with these arguments, behind prefix (strace), its output
    captured; stdin is /dev/null, so that nothing can wait for input."""
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=text, env=script_env(env), stdin=subprocess.DEVNULL,
                          timeout=timeout, cwd=cwd)


def run_on(root, config, *args: str, **kw) -> subprocess.CompletedProcess:
    return run("--root", str(root), "--config", str(config), *args, **kw)


def start_on(root, config, *args: str) -> subprocess.Popen:
    """run_on, not waited for: the test acts while the script runs."""
    return subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(root), "--config",
                             str(config), *args], env=script_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def strace_prefix(out: Path, syscalls: str, inject: str | None = None) -> tuple:
    """strace(1) writing these calls of the script and its children to out;
    inject: one strace -e inject= rule."""
    return ("strace", "-f", "-qq", "-o", str(out), "-e", f"trace={syscalls}",
            *(("-e", inject) if inject else ()))


# --- the mount table --------------------------------------------------------------

def unescape(field: str) -> str:
    """A mountinfo field as the path it spells (the kernel writes space,
    tab, newline and backslash as octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class MountLine(NamedTuple):
    """One line of a mountinfo table (proc(5))."""
    id: str
    parent: str
    root: str  # the directory of its filesystem that is mounted
    point: str
    options: str
    shared: str | None  # peer group; None where not shared
    master: str | None  # the group it receives from; None where not a slave
    fstype: str
    source: str


def parse_mountinfo(lines) -> list[MountLine]:
    """The tests' one mountinfo parser: this process's table (mount_table),
    or the lines a booted machine reported."""
    out = []
    for line in lines:
        f = line.split()
        sep = f.index("-", 6)
        tags = dict(t.split(":", 1) for t in f[6:sep] if ":" in t)
        out.append(MountLine(f[0], f[1], unescape(f[3]), unescape(f[4]), f[5], tags.get("shared"),
                             tags.get("master"), f[sep + 1], unescape(f[sep + 2])))
    return out


def mount_table() -> list[MountLine]:
    """Every mount of this process's namespace, in mountinfo order."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return parse_mountinfo(f)


def mounts() -> list[tuple]:
    """(mount point, fs root, fs type, source) of every mount of this
    process's namespace, in mountinfo order."""
    return [(m.point, m.root, m.fstype, m.source) for m in mount_table()]


def mountinfo_points() -> list[str]:
    return [point for point, *_ in mounts()]


def mounts_under(root) -> list[tuple]:
    """mounts() at or below root, in mountinfo order."""
    root = str(root)
    return [m for m in mounts() if m[0] == root or m[0].startswith(root + "/")]


def mount_points_under(root) -> list[str]:
    """The mount points at or below root, sorted."""
    return sorted(point for point, *_ in mounts_under(root))


def mountinfo_under(root) -> list[tuple]:
    """(fs root, mount point) at or below root, sorted: comparable from one
    run to the next, as mount ids are not."""
    return sorted((fs_root, point) for point, fs_root, _type, _source in mounts_under(root))


@contextlib.contextmanager
def mounted(device: str, where: Path, *options: str):
    """device's filesystem mounted at where for the block, then unmounted;
    where is made for it, and removed again, if it did not exist."""
    made = not where.exists()
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", *options, device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        if made:
            where.rmdir()


# --- the sandbox ------------------------------------------------------------------

class Sandbox:
    """A tmpfs root (the sandbox fixture's) plus helpers to run the script
    against it."""

    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work
        self.config_path = work / "impermanence.json"
        # The /run/mount/utab of the system this root is: its own, as every
        # machine has one.
        self.utab = work / "run" / "mount" / "utab"
        self.utab.parent.mkdir(parents=True, exist_ok=True)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def write_config(self, config: dict | str) -> Path:
        text = config if isinstance(config, str) else json.dumps(config, indent=1)
        self.config_path.write_text(text)
        return self.config_path

    def run(self, *args: str, config: dict | str | None = None, root: Path | None = None,
            env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        if config is not None:
            self.write_config(config)
        return run_on(root or self.root, self.config_path, *args,
                      env={"LIBMOUNT_UTAB": str(self.utab), **(env or {})}, timeout=timeout)

    def traced(self, syscalls: str, *args: str) -> tuple:
        """The script run with its config under strace -e trace=syscalls:
        (the result, the trace)."""
        require(shutil.which("strace") is not None, "strace is not installed")
        trace = self.work / "trace"
        result = run_on(self.root, self.config_path, *args, prefix=strace_prefix(trace, syscalls),
                        env={"LIBMOUNT_UTAB": str(self.utab)})
        return result, trace.read_text()


# --- the storage scenario of the apply tests -----------------------------------------
# An ext4 loop device (the disk fixture) holds /persistent; bird is user
# 1000 of group users (100).

BIRD = 1000
USERS_GID = 100


def unique_label() -> str:
    return "p" + secrets.token_hex(6)


def base_config(label: str, persistence: dict, **extra) -> dict:
    cfg = {
        "fileSystems": {"/persistent": {"device": f"LABEL={label}", "fsType": "auto",
                                        "options": ["noatime"]}},
        "deviceTimeout": 5,
        "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
        "groups": {"users": {"gid": USERS_GID}},
        "persistence": {"/persistent": persistence},
    }
    cfg.update(extra)
    return cfg


MAIN = {
    "directories": [
        "/var/log",
        {"directory": "/etc/nixos", "user": "bird", "group": "users", "mode": "0700"},
        {"directory": "/var/lib/colord", "user": "colord", "group": "colord", "mode": "u=rwx,g=rx,o="},
    ],
    "files": [
        "/etc/machine-id",
        {"file": "/etc/ssh/ssh_host_ed25519_key.pub", "method": "symlink"},
        {"file": "/etc/nix/id_rsa", "parentDirectory": {"mode": "u=rwx,g=,o="}},
        "/etc/adjtime",
    ],
    "users": {"bird": {
        "directories": ["Downloads", {"directory": ".ssh", "mode": "0700"}, ".local/share/fish"],
        "files": [".bash_history"],
    }},
}


def main_config(label: str) -> dict:
    """SPEC section 4's example, with /etc/adjtime added."""
    return base_config(label, MAIN,
                       users={"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"},
                              "colord": {"uid": 998, "group": "colord"}},
                       groups={"users": {"gid": USERS_GID}, "colord": {"gid": 997}})


def populate(disk, files: dict, dirs: dict | None = None) -> None:
    """Write into the storage filesystem before the 'boot'."""
    with mounted(disk.device, Path(f"/tmp/populate-{disk.label}")) as mnt:
        for rel, (uid, gid, mode) in (dirs or {}).items():
            p = mnt / rel
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, uid, gid)
            os.chmod(p, mode)
        for rel, content in files.items():
            p = mnt / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)


def tmpfs_at(path: Path, mode: str = "0755") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode={mode}", "store", str(path)], check=True)
    return path


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- configs given as data ------------------------------------------------------------

def config(**persistence_location) -> dict:
    return {"persistence": {"/persistent": persistence_location}}


def load(data):
    """data through the script's JSON loader, as the text of a config file."""
    import impermanence_boot as ib  # not at the top: conftest imports this module for every test
    return ib.load_config(json.dumps(data))


def error_of(data):
    """The ConfigError loading data raises."""
    import impermanence_boot as ib
    with pytest.raises(ib.ConfigError) as info:
        load(data)
    return info.value
