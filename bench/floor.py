"""The floor in Python, used when no C compiler is available.

Same operation list and meaning as floor.c (see there); no planning, no
checks beyond what the system calls report. Run as `python3 -I -S floor.py OPS`.
mount(2) is bound through `_ctypes`, as impermanence_boot.py binds it, so
this loop loads what the script loads: it is the least a Python program
started the same way takes for the job.
"""
import _ctypes
import os
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
        msg = os.strerror(err) if err is not None else "failed"
        sys.stderr.write("floor: %s %s: %s\n" % (what, path, msg))

    def bind(src, tgt):
        if mount(os.fsencode(src), os.fsencode(tgt), None, MS_BIND, None) != 0:
            fail("mount", tgt, _ctypes.get_errno())

    os.umask(0)
    with open(ops_path) as f:
        lines = f.read().split("\n")
    for line in lines:
        if not line:
            continue
        op, *a = line.split("\t")
        try:
            if op == "S":
                try:
                    os.mkdir(a[0], int(a[3], 8))
                except FileExistsError:
                    continue
                os.chown(a[0], int(a[1]), int(a[2]))
            elif op == "T":
                try:
                    os.mkdir(a[0], 0o700)
                except FileExistsError:
                    continue
                st = os.stat(a[1])
                os.chown(a[0], st.st_uid, st.st_gid)
                os.chmod(a[0], st.st_mode & 0o7777)
            elif op == "D":
                bind(a[0], a[1])
            elif op == "F":
                try:
                    os.stat(a[0])
                except FileNotFoundError:
                    os.symlink(a[2], a[1])
                    continue
                os.close(os.open(a[1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
                bind(a[0], a[1])
            elif op == "L":
                os.symlink(a[1], a[0])
        except OSError as e:
            fail(op, a[0], e.errno)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
