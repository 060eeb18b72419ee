"""What the test files share: running the script, reading the mount table,
the sandbox a test applies in, the storage scenario most apply tests start
from, configs given as data, and observing the outcome (stat, inotify,
checksums: nothing here reads what the script says about itself).
Fixtures stay in conftest.py."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import struct
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


# --- observing the outcome (the reliability and security suites) ------------------

# inotify(7) events that mean "this inode or directory was changed".
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_DONT_FOLLOW = 0x02000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
CHANGE_EVENTS = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
                 | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
EVENT_NAMES = {IN_MODIFY: "modified", IN_ATTRIB: "attributes changed",
               IN_CLOSE_WRITE: "opened for writing", IN_MOVED_FROM: "renamed away",
               IN_MOVED_TO: "renamed in", IN_CREATE: "created", IN_DELETE: "deleted",
               IN_DELETE_SELF: "deleted itself", IN_MOVE_SELF: "moved itself"}

_libc = ctypes.CDLL(None, use_errno=True)


class ChangeWatch:
    """inotify on every directory and file of some trees: records any write
    open, attribute change, creation, deletion or rename inside them."""

    def __init__(self, roots):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}
        for root in roots:
            root = str(root)
            self._add(root)
            if os.path.isdir(root) and not os.path.islink(root):
                for dirpath, dirnames, filenames in os.walk(root):
                    for name in dirnames + filenames:
                        self._add(os.path.join(dirpath, name))

    def _add(self, path: str) -> None:
        if os.path.islink(path):
            return  # a watch on a link would be on its target
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return  # opening a FIFO's watch is fine, but events there are not writes
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), CHANGE_EVENTS | IN_DONT_FOLLOW)
        if wd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
        self.paths[wd] = path

    def events(self) -> list[str]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            i = 0
            while i < len(data):
                wd, mask, _cookie, size = struct.unpack_from("iIII", data, i)
                name = data[i + 16:i + 16 + size].rstrip(b"\0").decode(errors="replace")
                i += 16 + size
                what = ", ".join(v for k, v in EVENT_NAMES.items() if mask & k)
                if what:
                    where = self.paths.get(wd, "?") + ("/" + name if name else "")
                    out.append(f"{where}: {what}")
        return out

    def close(self) -> None:
        os.close(self.fd)


def snapshot(root, follow_mounts: bool = True) -> dict:
    """path -> (type, uid, gid, mode, size, sha256 or link text, ino, ctime)
    for root and everything below it (no link followed)."""
    root = str(root)
    out = {}

    def one(path):
        st = os.lstat(path)
        m = st.st_mode
        if stat.S_ISREG(m):
            with open(path, "rb") as f:
                body = hashlib.sha256(f.read()).hexdigest()
            kind = "file"
        elif stat.S_ISLNK(m):
            body, kind = os.readlink(path), "link"
        elif stat.S_ISDIR(m):
            body, kind = None, "dir"
        else:
            body, kind = None, "special"
        out[os.path.relpath(path, root)] = (kind, st.st_uid, st.st_gid, stat.S_IMODE(m),
                                            st.st_size if kind == "file" else 0, body,
                                            st.st_ino, st.st_ctime_ns, st.st_mtime_ns)
        return kind

    if one(root) == "dir":
        dev = os.lstat(root).st_dev
        for dirpath, dirnames, filenames in os.walk(root):
            if not follow_mounts:
                dirnames[:] = [d for d in dirnames
                               if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
            for name in dirnames + filenames:
                one(os.path.join(dirpath, name))
    return out


def content_view(snap: dict) -> dict:
    """What 'nothing lost, truncated or changed' compares: type, owner,
    mode, size, content hash / link text (not inode numbers or times)."""
    return {k: v[:6] for k, v in snap.items()}


def storage_damage(before: dict, after: dict) -> list[str]:
    """Entries present before that are gone or differ after (additions are
    fine: apply creates missing directories in storage)."""
    a, b = content_view(before), content_view(after)
    problems = []
    for path, value in a.items():
        if path not in b:
            problems.append(f"{path}: lost")
        elif b[path] != value:
            problems.append(f"{path}: was {value}, now {b[path]}")
    return problems


MESSAGE = re.compile(r"^impermanence: (?P<path>/[^:]*|[^:/]+ [^:]+): (?P<cause>.+)$")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_clean_messages(stderr: str) -> None:
    """Every line is one `impermanence: ...` message; never a traceback."""
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        assert line.startswith("impermanence: "), f"unprefixed output line: {line!r}"


def host_snapshot(paths=("/", "/etc", "/root")) -> dict:
    """Owner and mode of some real host directories and their children,
    plus their names (a created file shows as a new name)."""
    out = {}
    for top in paths:
        try:
            st = os.lstat(top)
        except OSError:
            continue
        out[top] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            continue
        for name in os.listdir(top):
            p = os.path.join(top, name)
            try:
                c = os.lstat(p)
            except OSError:
                continue
            out[p] = (c.st_uid, c.st_gid, stat.S_IMODE(c.st_mode), stat.S_IFMT(c.st_mode))
    return out


def owner_mode(path) -> tuple:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def tree_digest(root, skip=()) -> dict:
    """A comparable picture of a tree for idempotence checks: type, owner,
    mode, content hash / link text of every entry (no times, no inodes)."""
    snap = snapshot(root)
    return {k: v[:6] for k, v in snap.items() if not any(k == s or k.startswith(s + "/") for s in skip)}


def write_tree(base: Path, spec: dict) -> None:
    """Create files/dirs from {relpath: bytes | None(dir)}."""
    for rel, body in spec.items():
        p = base / rel
        if body is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(body)


# --- Trees deeper than PATH_MAX and than the fds a process may hold ---------------------

def make_deep(base: Path, depth: int, uid: int = 0, gid: int = 0, name: str = "d",
              leaf: bytes = b"at the bottom\n") -> None:
    """base/name/name/... depth directories deep (owned uid:gid), with a
    file `leaf` at the bottom; made through dir fds, one open at a time,
    so neither PATH_MAX nor the fd limit stops it."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, 0o755, dir_fd=fd)
            os.chown(name, uid, gid, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf_fd = os.open("leaf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(leaf_fd, leaf)
        os.fchown(leaf_fd, uid, gid)
        os.close(leaf_fd)
    finally:
        os.close(fd)


def deep_digest(root) -> dict:
    """snapshot()'s content view (type, uid, gid, mode, size, sha256 or link
    text) of root and everything below it, for trees of any depth: walked
    through dir fds, two open at a time (up by ".."), keyed by the tuple
    of names below root. Mount points are walked into."""
    out = {}

    def entry(st, fd, name):
        m = st.st_mode
        if stat.S_ISREG(m):
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            try:
                h = hashlib.sha256()
                while chunk := os.read(f, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(f)
            return ("file", st.st_uid, st.st_gid, stat.S_IMODE(m), st.st_size, h.hexdigest())
        if stat.S_ISLNK(m):
            return ("link", st.st_uid, st.st_gid, stat.S_IMODE(m), 0, os.readlink(name, dir_fd=fd))
        kind = "dir" if stat.S_ISDIR(m) else "special"
        return (kind, st.st_uid, st.st_gid, stat.S_IMODE(m), 0, None)

    st = os.lstat(root)
    out[()] = entry(st, None, str(root)) if not stat.S_ISDIR(st.st_mode) else \
        ("dir", st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), 0, None)
    if not stat.S_ISDIR(st.st_mode):
        return out
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd = os.open(root, flags)
    here: tuple = ()
    pending = [sorted(os.listdir(fd))]
    try:
        while pending:
            if not pending[-1]:
                pending.pop()
                if pending:
                    up = os.open("..", flags, dir_fd=fd)
                    os.close(fd)
                    fd, here = up, here[:-1]
                continue
            name = pending[-1].pop(0)
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            out[here + (name,)] = entry(st, fd, name)
            if stat.S_ISDIR(st.st_mode):
                down = os.open(name, flags, dir_fd=fd)
                os.close(fd)
                fd, here = down, here + (name,)
                pending.append(sorted(os.listdir(fd)))
    finally:
        os.close(fd)
    return out
