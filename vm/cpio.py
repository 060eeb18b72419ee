"""A minimal writer for the "newc" cpio format the kernel unpacks as an
initramfs. Written here (rather than running cpio(1) over a staging tree) so
that device nodes and root ownership need no privileges and the archive is
reproducible: every entry is owned by root, mtimes are kept as given.
"""
from __future__ import annotations

import os
import stat


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


class Archive:
    """Entries keyed by absolute path; parents are added before children."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def _parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            if p not in self.entries:
                self.entries[p] = {"mode": stat.S_IFDIR | 0o755, "data": b"", "mtime": 0,
                                   "rdev": (0, 0), "component": None}

    def dir(self, path: str, mode: int = 0o755, component: str | None = None) -> None:
        self._parents(path)
        self.entries.setdefault(path, {"mode": stat.S_IFDIR | mode, "data": b"", "mtime": 0,
                                       "rdev": (0, 0), "component": component})

    def file(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0,
             component: str | None = None) -> None:
        self._parents(path)
        self.entries[path] = {"mode": stat.S_IFREG | mode, "data": data, "mtime": mtime,
                              "rdev": (0, 0), "component": component}

    def copy(self, path: str, source: str, mode: int | None = None,
             component: str | None = None) -> None:
        st = os.stat(source)
        with open(source, "rb") as f:
            data = f.read()
        self.file(path, data, stat.S_IMODE(st.st_mode) if mode is None else mode,
                  int(st.st_mtime), component)

    def symlink(self, path: str, target: str, component: str | None = None) -> None:
        self._parents(path)
        self.entries[path] = {"mode": stat.S_IFLNK | 0o777, "data": target.encode(),
                              "mtime": 0, "rdev": (0, 0), "component": component}

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(path)
        self.entries[path] = {"mode": stat.S_IFCHR | mode, "data": b"", "mtime": 0,
                              "rdev": (major, minor), "component": None}

    def sizes(self) -> dict[str, int]:
        """Bytes of file and link data per component."""
        out: dict[str, int] = {}
        for e in self.entries.values():
            if e["component"]:
                out[e["component"]] = out.get(e["component"], 0) + len(e["data"])
        return out

    def to_bytes(self) -> bytes:
        chunks = []
        ino = 1
        items = list(self.entries.items()) + [("TRAILER!!!", None)]
        for path, e in items:
            name = path.lstrip("/").encode() + b"\0" if e else b"TRAILER!!!\0"
            mode = e["mode"] if e else 0
            data = e["data"] if e else b""
            rdev = e["rdev"] if e else (0, 0)
            nlink = 2 if e and stat.S_ISDIR(mode) else 1
            fields = (ino if e else 0, mode, 0, 0, nlink, e["mtime"] if e else 0, len(data),
                      0, 0, rdev[0], rdev[1], len(name), 0)
            header = b"070701" + b"".join(b"%08X" % v for v in fields)
            chunks.append(header + name + _pad4(len(header) + len(name)))
            chunks.append(data + _pad4(len(data)))
            ino += 1
        blob = b"".join(chunks)
        return blob + _pad4(len(blob))
