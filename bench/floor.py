"""The floor in Python, used when no C compiler is available.

Same operation list and meaning as floor.c (see there); no planning, no
checks beyond what the system calls report. Run as `python3 -I -S floor.py OPS`.
As a floor it loads the least it can: mount(2) bound through `_ctypes` (as
impermanence_boot.py binds it, not through the ctypes package), and the
calls taken from `posix`, the C module under `os` (importing `os` runs
_collections_abc, posixpath and more: about 1 ms here). Started as apply
is, it is the least any Python program takes for the job.
"""
import _ctypes
import posix
import sys

MS_BIND = 4096


def main(ops_path):
    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class ULong(_ctypes._SimpleCData):
        _type_ = "L"

    class CharP(_ctypes._SimpleCData):
        _type_ = "z"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = Int

    class Libc:
        _handle = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)

    mount = Function(("mount", Libc))
    mount.argtypes = (CharP, CharP, CharP, ULong, CharP)
    failures = 0

    def fail(what, path, err=None):
        nonlocal failures
        failures += 1
        msg = posix.strerror(err) if err is not None else "failed"
        sys.stderr.write("floor: %s %s: %s\n" % (what, path, msg))

    def bind(src, tgt):
        if mount(src.encode("utf-8", "surrogateescape"), tgt.encode("utf-8", "surrogateescape"),
                 None, MS_BIND, None) != 0:
            fail("mount", tgt, _ctypes.get_errno())

    posix.umask(0)
    with open(ops_path) as f:
        lines = f.read().split("\n")
    for line in lines:
        if not line:
            continue
        op, *a = line.split("\t")
        try:
            if op == "S":
                try:
                    posix.mkdir(a[0], int(a[3], 8))
                except FileExistsError:
                    continue
                posix.chown(a[0], int(a[1]), int(a[2]))
            elif op == "T":
                try:
                    posix.mkdir(a[0], 0o700)
                except FileExistsError:
                    continue
                st = posix.stat(a[1])
                posix.chown(a[0], st.st_uid, st.st_gid)
                posix.chmod(a[0], st.st_mode & 0o7777)
            elif op == "D":
                bind(a[0], a[1])
            elif op == "F":
                try:
                    posix.stat(a[0])
                except FileNotFoundError:
                    posix.symlink(a[2], a[1])
                    continue
                posix.close(posix.open(a[1], posix.O_WRONLY | posix.O_CREAT | posix.O_NOFOLLOW, 0o644))
                bind(a[0], a[1])
            elif op == "L":
                posix.symlink(a[1], a[0])
        except OSError as e:
            fail(op, a[0], e.errno)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
