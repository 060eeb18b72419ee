"""Observation helpers for the reliability and security suites.

Everything here observes the real outcome (stat, inotify, mountinfo,
checksums); nothing reads what the script says about itself.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import stat
import struct
from pathlib import Path

# The mount table is read in support.py; test_nix.py imports
# mountinfo_points from here.
from support import mountinfo_points  # noqa: F401

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
