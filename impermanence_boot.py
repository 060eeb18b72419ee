#!/usr/bin/env python3
"""impermanence_boot: reconnect persistent state to a freshly wiped root.

Run from the initramfs before switch_root (or by hand for recovery), it
mounts the persistent filesystems, creates the directories that must exist
with the right owner and mode, and bind-mounts or links every kept
directory and file into the new root. The configuration is the JSON form
of NixOS impermanence's `environment.persistence`.

Data flows top to bottom: config (validated records) -> the system as
found (devices, mounts, accounts, a read-only view of the tree) -> a plan
per storage and per entry (a list of actions, which `plan` prints) -> the
executor, which walks every path component by component with O_NOFOLLOW
file descriptors.

Only the standard library, and as little of it as possible: every module
imported here is copied into every initramfs and loaded at every boot.
`_json` and `_ctypes` are imported only by the code paths that need them.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time

# --- Kernel constants (linux/mount.h, linux/fs.h, asm/unistd.h) ---------------

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
UMOUNT_NOFOLLOW = 8
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MNT_DETACH = 2
MS_REC = 16384
CLONE_NEWNS = 0x00020000
LOCK_EX = 2
LOCK_NB = 4
# linux/btrfs.h: _IOW/_IOWR(0x94, nr, args), every args struct 4096 bytes.
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E
BTRFS_IOC_SNAP_DESTROY = 0x5000940F
BTRFS_IOC_TREE_SEARCH = 0xD0009411
BTRFS_IOC_INO_LOOKUP = 0xD0009412
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417
# linux/btrfs_tree.h: the root tree, where subvolumes are recorded; ids.
BTRFS_ROOT_TREE_OBJECTID = 1
BTRFS_FIRST_FREE_OBJECTID = 256  # the first subvolume id; the inode of a subvolume's top
BTRFS_LAST_FREE_OBJECTID = 2**64 - 256
BTRFS_ROOT_ITEM_KEY = 132
BTRFS_ROOT_BACKREF_KEY = 144
# Numbers of the system calls added since Linux 5.1 are the same on every
# architecture: used where the C library has no wrapper (glibc < 2.36).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
MOUNT_ATTR_SIZE_VER0 = 32  # struct mount_attr: attr_set, attr_clr, propagation, userns_fd

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

# Access and modification time given to the mount points apply creates on
# the fresh root, so `unmount` removes those and nothing else: nanoseconds
# since the epoch that no clock or archive gives a file. Hidden under the
# bind mount while it is there. (A filesystem with coarser timestamps
# keeps no mark: `unmount` then leaves its mount points in place.)
MARK_TIME_NS = 314_159_265
MARK_TIMES = (MARK_TIME_NS, MARK_TIME_NS)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STORAGE, EXIT_PRIVILEGE = 0, 1, 2, 3, 4
# Commands that mount, unmount or change owners: root only, said at once.
NEEDS_ROOT = ("apply", "unmount", "rotate-root", "save")
VERSION = "0.1.0"

DEFAULT_CONFIG = "/etc/impermanence.json"
PATH_MAX = 4096  # linux/limits.h: a path the kernel takes, with its NUL
MACHINE_ID = ("etc", "machine-id")


# --- libc ------------------------------------------------------------------------

class Libc:
    """The libc calls the os module lacks, bound through `_ctypes`, the C
    half of ctypes. The ctypes package itself would add five modules
    (ctypes, types, struct, _struct, ctypes._endian) to every initramfs and
    their loading to every boot. open_tree, move_mount and mount_setattr
    go through syscall(2) where the C library has no wrapper; renameat2 is None where
    it has none."""

    def __init__(self):
        import _ctypes

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class UInt(_ctypes._SimpleCData):
            _type_ = "I"

        class Long(_ctypes._SimpleCData):
            _type_ = "l"

        class ULong(_ctypes._SimpleCData):
            _type_ = "L"

        class CharP(_ctypes._SimpleCData):
            _type_ = "z"  # bytes or None (NULL)

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Int

        self._handle = _ctypes.dlopen(None, _ctypes.RTLD_LOCAL)  # the program and its libc
        self.get_errno = _ctypes.get_errno

        def bind(name: str, *argtypes):
            try:
                function = Function((name, self))  # dlsym(self._handle, name)
            except AttributeError:
                return None
            function.argtypes = argtypes
            return function

        self.mount = bind("mount", CharP, CharP, CharP, ULong, CharP)
        self.umount2 = bind("umount2", CharP, Int)
        self.renameat2 = bind("renameat2", Int, CharP, Int, CharP, UInt)  # glibc >= 2.28
        self.flock = bind("flock", Int, Int)
        self.unshare = bind("unshare", Int)
        self.open_tree = bind("open_tree", Int, CharP, UInt)  # glibc >= 2.36
        self.move_mount = bind("move_mount", Int, CharP, Int, CharP, UInt)
        self.mount_setattr = bind("mount_setattr", Int, CharP, UInt, CharP, ULong)  # glibc >= 2.36
        if self.open_tree is None or self.move_mount is None:
            syscall = bind("syscall", Long, Int, CharP, UInt)
            self.open_tree = lambda *args: syscall(SYS_OPEN_TREE, *args)
            syscall5 = bind("syscall", Long, Int, CharP, Int, CharP, UInt)
            self.move_mount = lambda *args: syscall5(SYS_MOVE_MOUNT, *args)
        if self.mount_setattr is None:
            setattr_call = bind("syscall", Long, Int, CharP, UInt, CharP, ULong)
            self.mount_setattr = lambda *args: setattr_call(SYS_MOUNT_SETATTR, *args)


_libc: Libc | None = None


def libc() -> Libc:
    global _libc
    if _libc is None:
        _libc = Libc()
    return _libc


def oserror(op: str, shown: str, err: int | None = None) -> OSError:
    """The error of a failed system call as os functions raise it,
    OSError(errno, strerror, path) (so of the subclass its errno has), with
    the operation it was: messages name it. err defaults to libc's errno."""
    if err is None:
        err = libc().get_errno()
    exc = OSError(err, os.strerror(err), shown)
    exc.op = op
    return exc


def call(op: str, shown: str, function, *args, **kwargs):
    """function(*args, **kwargs), an os function working on the path shown
    (often through a directory fd and a name): its OSError names op and
    the whole path."""
    try:
        return function(*args, **kwargs)
    except OSError as exc:
        raise oserror(op, shown, exc.errno) from None


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None, shown: str, op: str = "mount") -> None:
    if libc().mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)) < 0:
        raise oserror(op, shown)


def umount2(target: str, flags: int, shown: str) -> None:
    if libc().umount2(_bytes(target), flags) < 0:
        raise oserror("umount", shown)


def open_tree(dir_fd: int, name: str, flags: int, shown: str) -> int | None:
    """open_tree(2): with OPEN_TREE_CLONE a detached bind mount of `name`
    in dir_fd. None where the kernel lacks it (Linux < 5.2, or a seccomp
    filter): binds then go through mount(2) on /proc/self/fd."""
    fd = libc().open_tree(dir_fd, os.fsencode(name), flags)
    if fd >= 0:
        return fd
    err = libc().get_errno()
    if err == errno.ENOSYS:
        return None
    raise oserror("bind", shown, err)


def move_mount(tree: int, target_fd: int, shown: str) -> None:
    """move_mount(2) the detached mount `tree` onto the open target_fd."""
    if libc().move_mount(tree, b"", target_fd, b"",
                         MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0:
        raise oserror("bind", shown)


def rename_noreplace(old_dir: int, old: str, new_dir: int, new: str, shown: str) -> None:
    """renameat2(RENAME_NOREPLACE): never replaces what appeared at `new`
    meanwhile. Where the kernel, filesystem or C library lacks it, a check
    then rename(2)."""
    function = libc().renameat2
    if function is not None:
        if function(old_dir, os.fsencode(old), new_dir, os.fsencode(new), RENAME_NOREPLACE) == 0:
            return
        err = libc().get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise oserror("rename", shown, err)
    try:
        os.stat(new, dir_fd=new_dir, follow_symlinks=False)
    except FileNotFoundError:
        call("rename", shown, os.rename, old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        return
    raise oserror("rename", shown, errno.EEXIST)


class opened:
    """A file descriptor, closed when the with block ends."""
    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)


# --- Errors and messages ---------------------------------------------------------

class UsageError(Exception):
    pass


class ConfigError(Exception):
    """A problem in the configuration, with the key path where it is."""

    def __init__(self, where: str, cause: str):
        super().__init__(f"{where}: {cause}")
        self.where, self.cause = where, cause


class ConfigFileError(ConfigError):
    """A config file that cannot be read or decoded: `where` is the file's
    path, shown as given."""


class Failure(Exception):
    """What could not be done, and where: the path as the user knows it
    (or a user or group name) and the cause. Every failure becomes one,
    and one message, through `failure`."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class Refused(Failure):
    """Planning found what an entry must not touch: what was planned for
    it before still runs, then the entry fails (a Fail action)."""


# What a path (or a link's text, which a user chooses) may hold that would
# end a line, move the cursor or recolour a terminal, or fail to encode
# (bytes that are not UTF-8, decoded with surrogateescape): written escaped
# in every message and every line of plan and status, so one stays one.
UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))}
UNPRINTABLE.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})
UNPRINTABLE.update({c: f"\\x{c - 0xdc00:02x}" for c in range(0xdc80, 0xdd00)})
# Format characters (Unicode category Cf: bidi overrides such as U+202E,
# zero-width ones such as U+200B) reorder or hide what a line shows.
FORMAT_CHARS = (0xad, *range(0x600, 0x606), 0x61c, 0x6dd, 0x70f, 0x890, 0x891, 0x8e2, 0x180e,
                *range(0x200b, 0x2010), *range(0x202a, 0x202f), *range(0x2060, 0x2065),
                *range(0x2066, 0x2070), 0xfeff, *range(0xfff9, 0xfffc), 0x110bd, 0x110cd,
                *range(0x13430, 0x13440), *range(0x1bca0, 0x1bca4), *range(0x1d173, 0x1d17b),
                0xe0001, *range(0xe0020, 0xe0080))
UNPRINTABLE.update({c: f"\\u{c:04x}" if c <= 0xffff else f"\\U{c:08x}" for c in FORMAT_CHARS})


def failure(exc: BaseException, shown: str) -> Failure:
    """exc as a Failure, the one way a failure becomes a message: an
    OSError names the operation (see oserror) and its path, else shown; a
    Failure naming no path (an account's) gets `(for shown)` when shown is
    one; anything
    else is a bug, reported as an internal error at shown."""
    if isinstance(exc, Failure):
        if exc.path.startswith("/") or not shown.startswith("/"):
            return exc
        return Failure(exc.path, f"{exc.cause} (for {shown})")
    if isinstance(exc, OSError):
        cause = exc.strerror or str(exc)
        op = getattr(exc, "op", None)
        return Failure(exc.filename or shown, f"{op}: {cause}" if op else cause)
    return Failure(shown, f"internal error: {type(exc).__name__}: {exc}")


class Log:
    """One line per message, `impermanence: ` first, to stderr, and to
    /dev/kmsg when it is writable (in an initrd), so they show in dmesg and
    the journal after boot: errors and warnings, and with -v every action.
    The kernel lets one open /dev/kmsg write a burst of 10 lines and drops
    the rest; a new open starts a new burst."""

    KMSG_BURST = 8

    def __init__(self, verbosity: int):
        self.verbosity = verbosity  # 0 quiet, 1 normal, 2 verbose
        self.kmsg = -1
        self.kmsg_lines = 0
        if not os.environ.get("IMPERMANENCE_NO_KMSG"):
            self.kmsg = self._open_kmsg()

    @staticmethod
    def _open_kmsg() -> int:
        try:
            return os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return -1

    def _emit(self, level: int, text: str) -> None:
        line = "impermanence: " + text.translate(UNPRINTABLE)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if self.kmsg >= 0:
            if self.kmsg_lines == self.KMSG_BURST:
                # The rate limit is per open file: a new one keeps every
                # error (their number is bounded by the config's entries).
                os.close(self.kmsg)
                self.kmsg, self.kmsg_lines = self._open_kmsg(), 0
            try:
                os.write(self.kmsg, f"<{level}>{line}\n".encode("utf-8", "replace"))
                self.kmsg_lines += 1
            except OSError:
                pass

    def error(self, text: str) -> None:
        self._emit(3, text)

    def warn(self, text: str) -> None:
        if self.verbosity >= 1:
            self._emit(4, text)

    def info(self, text: str) -> None:
        if self.verbosity >= 2:
            self._emit(6, text)

# --- Config: the model ---------------------------------------------------------

_set_field = object.__setattr__


class Record:
    """A small frozen record: dataclasses would bring inspect, re and more
    into every boot."""

    __slots__ = ()
    _fields: tuple = ()

    def __init__(self, *args):
        for name, value in zip(self._fields, args):
            _set_field(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen")

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other):
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self):
        return hash(self._values())

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({fields})"


class FileSystem(Record):
    """A persistent filesystem the tool mounts itself at <root><mountpoint>."""
    __slots__ = _fields = ("mountpoint", "device", "fs_type", "options", "where")


class Account(Record):
    """users.<name> of the account table (the initrd has no /etc/passwd)."""
    __slots__ = _fields = ("name", "uid", "group", "home", "home_mode")


class Perms(Record):
    """Owner and mode for a directory apply creates. `group` None means the
    user's primary group, looked up when applying."""
    __slots__ = _fields = ("user", "group", "mode")


class Entry(Record):
    """One kept directory or file. Paths are tuples of components relative
    to the root: target ('var', 'log'), storage ('persistent',); `home` is
    (home, user, home mode) for an entry inside a user's home; `options`
    the userspace mount options of a directory's bind mount."""
    __slots__ = _fields = ("kind", "target", "storage", "perms", "method", "parent_perms",
                           "home", "home_owner", "where", "options")

    @property
    def source(self) -> tuple:
        return self.storage + self.target


class Config(Record):
    __slots__ = _fields = ("filesystems", "device_timeout", "accounts", "group_ids",
                           "storages", "entries", "root")


class RootRotation(Record):
    """The config's "root": the btrfs root subvolume rotate-root replaces.
    Subvolume paths are component tuples below the filesystem's top level;
    blank None means an empty fresh root."""
    __slots__ = _fields = ("device", "subvolume", "old_roots", "keep_days", "keep_count", "blank")


ROOT_PERMS = Perms("root", "root", 0o755)


def as_path(comps: tuple) -> str:
    return "/" + "/".join(comps)


# --- Config: modes ---------------------------------------------------------------

_WHO_BITS = {"u": 0o4700, "g": 0o2070, "o": 0o1007, "a": 0o7777}
_PERM_BITS = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000}
_CLASS_BITS = {"u": 0o700, "g": 0o070, "o": 0o007}
# NixOS impermanence makes a directory with `mkdir --mode MODE`, so a
# symbolic mode means what it means there, under the umask activation runs
# with: applied to a=rwx, a clause that names no class (`+t`, `=rwx`)
# limited by the umask; and where a clause names a set-id or sticky bit,
# mkdir(2) runs without group and other write, which only a clause naming
# them gives back (coreutils' mode_adjust, gnulib's make_dir_parents and
# dirchownmod): `+t` is 1755, `o+t,go+w` 1777.
MKDIR_BASE = 0o777
MKDIR_UMASK = 0o022


MODE_FORMS = "an octal mode (0000-7777) or a symbolic mode like u=rwx,g=rx,o="


def parse_mode(text: str) -> int:
    """Octal ("0700", "755") or symbolic clauses as `mkdir --mode` reads
    them for a directory ("u=rwx,g=rx,o=", "go-rwx" is 0700, "+t" 1777).
    Raises ValueError with a reason that says what a mode looks like."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string such as \"0755\", not {type_name(text)}")
    if text.isdigit() and text.isascii():
        if text.strip("01234567") or len(text) > 4:
            raise ValueError(f"{text!r} is not {MODE_FORMS}")
        return int(text, 8)
    if not text:
        raise ValueError(f"is empty: give {MODE_FORMS}")
    try:
        return parse_symbolic_mode(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not {MODE_FORMS} ({exc})") from None


def parse_symbolic_mode(text: str) -> int:
    mode = MKDIR_BASE
    named = 0  # the bits some clause set or cleared
    for clause in text.split(","):
        i = 0
        who = 0
        while i < len(clause) and clause[i] in _WHO_BITS:
            who |= _WHO_BITS[clause[i]]
            i += 1
        if i == len(clause):
            raise ValueError(f"clause {clause!r} has no operator (=, + or -)")
        while i < len(clause):
            op = clause[i]
            if op not in "=+-":
                raise ValueError(f"{clause!r}: expected =, + or - at {clause[i:]!r}")
            i += 1
            value, copy, x_if_any = 0, False, False
            if i < len(clause) and clause[i] in _CLASS_BITS:
                value, copy = _CLASS_BITS[clause[i]], True  # "g=u": that class as it stands now
                i += 1
            else:
                while i < len(clause) and (clause[i] in _PERM_BITS or clause[i] == "X"):
                    if clause[i] == "X":
                        x_if_any = True
                    else:
                        value |= _PERM_BITS[clause[i]]
                    i += 1
            if i < len(clause) and clause[i] not in "=+-":
                raise ValueError(f"{clause!r}: unknown permission {clause[i]!r}")
            # A directory's set-id bits change only where named (coreutils'
            # mode_adjust).
            omitted = 0o6000 & ~(who & value if who else value)
            if copy:
                value &= mode
                value = ((0o444 if value & 0o444 else 0) | (0o222 if value & 0o222 else 0)
                         | (0o111 if value & 0o111 else 0))
            elif x_if_any:
                value |= 0o111  # X: a directory is searchable
            value &= (who if who else ~MKDIR_UMASK) & ~omitted
            if op == "=":
                kept = (~who if who else 0) | omitted
                named |= 0o7777 & ~kept
                mode = (mode & kept) | value
            elif op == "+":
                named |= value
                mode |= value
            else:
                named |= value
                mode &= ~value
    mode &= 0o7777
    special = named & 0o6000 or mode & 0o1000
    made = (mode & ~0o022 if special else mode) & 0o1777  # mkdir(2) sets no set-id bit
    return mode | (made & ~named) if (mode ^ made) & named else made


def format_mode(mode: int) -> str:
    return format(mode & 0o7777, "04o")


# --- Config: reading it --------------------------------------------------------------

# Keys the NixOS option system adds to evaluated items; accepted and ignored
# where they carry no meaning here.
NIXOS_INTERNAL = frozenset({"dirPath", "filePath", "home", "defaultPerms",
                            "persistentStoragePath", "enableDebugging",
                            "enableWarnings", "assertions", "hideMount",
                            "allowTrash", "_module"})
# Userspace mount options of a kept directory's bind mount, recorded in
# libmount's utab: file managers hide the mount, GIO lets one trash in it.
HIDE_OPTION, TRASH_OPTION = "x-gvfs-hide", "x-gvfs-trash"
# And of a fileSystems mount apply made: unmount unmounts only those.
MOUNTED_OPTION = "x-impermanence-boot"
OUR_OPTIONS = frozenset((HIDE_OPTION, TRASH_OPTION, MOUNTED_OPTION))

TOP_KEYS = ("fileSystems", "deviceTimeout", "users", "groups", "persistence", "root")
ROOT_KEYS = ("device", "subvolume", "oldRoots", "keep", "blank")
KEEP_KEYS = ("days", "count")
FS_KEYS = ("device", "fsType", "options", "label", "mountPoint", "neededForBoot", "noCheck")
ACCOUNT_KEYS = ("uid", "group", "home", "homeMode", "name", "isNormalUser",
                "isSystemUser", "description")
GROUP_KEYS = ("gid", "name", "members")
LOCATION_KEYS = ("enable", "persistentStoragePath", "hideMounts", "allowTrash", "directories",
                 "files", "users")
USER_KEYS = ("directories", "files", "home")
DIR_KEYS = ("directory", "user", "group", "mode", "hideMount", "allowTrash")
FILE_KEYS = ("file", "method", "parentDirectory")
PERM_KEYS = ("user", "group", "mode")


def type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def key_path(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    if key.replace("_", "").isalnum() and key.isascii():
        return f"{where}.{key}" if where else key
    if key.isprintable() and '"' not in key and "\\" not in key:
        return f'{where}["{key}"]'
    # Escaped, so a message stays one line whatever the key holds.
    quoted = repr(key)
    if quoted[0] == "'":
        quoted = quoted[1:-1].replace("\\'", "'").replace('"', '\\"')
    else:
        quoted = quoted[1:-1]
    return f'{where}["{quoted}"]'


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca.lower() != cb.lower())))
        previous = current
    return previous[-1]


SHOWN_KEY_MAX = 64  # characters of an unknown key a message shows


def check_keys(obj: dict, where: str, known: tuple, tolerated=NIXOS_INTERNAL) -> None:
    for key in obj:
        if key in known or key in tolerated:
            continue
        hint = ""
        if isinstance(key, str):
            # Only keys whose length is close enough can be meant: the
            # distance is at least the difference in length, and a huge
            # key costs no quadratic search.
            near = [k for k in known if abs(len(key) - len(k)) <= max(2, len(k) // 3)]
            best = min(near, key=lambda k: edit_distance(key, k)) if near else None
            if best is not None and edit_distance(key, best) <= max(2, len(best) // 3):
                hint = f"; did you mean '{best}'?"
            if len(key) > SHOWN_KEY_MAX:
                hint = f" ({len(key)} characters, shown cut){hint}"
                key = key[:SHOWN_KEY_MAX] + "..."
        raise ConfigError(key_path(where, key), f"unknown key{hint}")


def expect(value, kind, where: str, what: str):
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(where, f"must be {what}, not {type_name(value)}")
    return value


def parse_components(text, where: str, absolute: bool, key: str | None = None) -> tuple:
    """A path's components, read as NixOS impermanence reads it: empty
    components dropped (a trailing or doubled "/"), and in a path relative
    to a home a leading "/" too ("/" is the home itself). The error
    location is where[.key], made only for an error: this runs for every
    item of the config."""
    if isinstance(text, str) and "\0" not in text and (not absolute or text.startswith("/")):
        comps = tuple(c for c in text.split("/") if c)
        if "." not in comps and ".." not in comps and (comps or not absolute):
            return comps
    where = key_path(where, key) if key is not None else where
    expect(text, str, where, "a path string")
    if "\0" in text:
        raise ConfigError(where, "path contains a NUL byte")
    if absolute and not text.startswith("/"):
        raise ConfigError(where, f"path {text!r} must be absolute (start with /)")
    if absolute and not text.strip("/"):
        raise ConfigError(where, f"path {text!r} is the root itself, which is not kept or mounted on")
    raise ConfigError(where, f"path {text!r} must not contain '.' or '..' components")


# Largest user or group id: chown(2) takes (uid_t) -1 as "leave unchanged".
ID_MAX = 2**32 - 2


def is_id(text: str) -> bool:
    """Whether a name is a number (ASCII digits: "²".isdigit() is true too)."""
    return text.isascii() and text.isdigit()


def valid_id(value) -> bool:
    return type(value) is int and 0 <= value <= ID_MAX


def parse_id(text: str) -> int | None:
    """The id a field of digits gives, None if it is not one or too large."""
    if not is_id(text):
        return None
    digits = text.lstrip("0")
    value = int(digits or "0") if len(digits) <= 10 else -1  # int() of 5,000 digits raises
    return value if valid_id(value) else None


def parse_owner(value, where: str, key: str | None = None) -> str:
    """A user or group name, or a number as a string. The error location is
    where[.key], made only for an error."""
    if isinstance(value, str) and value and not ("\0" in value or "/" in value or ":" in value
                                                 or "\n" in value or value in (".", "..")):
        if not is_id(value) or parse_id(value) is not None:
            return value
    elif valid_id(value):
        return str(value)
    where = key_path(where, key) if key is not None else where
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and is_id(value):
        raise ConfigError(where, f"{value} is not a valid id (0 to {ID_MAX})")
    expect(value, str, where, "a user or group name or number")
    raise ConfigError(where, f"{value!r} is not a valid user or group name")


def parse_perms(obj: dict, where: str, default: Perms) -> Perms:
    """The owner and mode an item gives, its defaults where it gives none
    (or null, as the evaluated NixOS option may)."""
    user, group, mode = obj.get("user"), obj.get("group"), obj.get("mode")
    if user is None and group is None and mode is None:
        return default
    user = default.user if user is None else parse_owner(user, where, "user")
    group = default.group if group is None else parse_owner(group, where, "group")
    if mode is None:
        mode = default.mode
    else:
        try:
            mode = parse_mode(mode)
        except ValueError as exc:
            raise ConfigError(key_path(where, "mode"), str(exc)) from None
    return Perms(user, group, mode)


def parse_options(value, where: str) -> tuple:
    if isinstance(value, str):
        return tuple(o for o in value.split(",") if o)
    expect(value, list, where, "a list of strings or a comma-separated string")
    for i, option in enumerate(value):
        expect(option, str, key_path(where, i), "a string")
    return tuple(o for opt in value for o in opt.split(",") if o)


def load_config_file(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read config: {failure(exc, '').cause}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"config is not valid UTF-8 (byte {exc.start})") from None
    return load_config(text, path)


class _JsonContext:
    """What _json's C scanner reads from json.JSONDecoder: the defaults,
    but objects built by object_pairs_hook, which notes a key given twice
    in one object (json.loads keeps the last one silently)."""
    strict = True
    object_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity, as json.loads reads them

    def __init__(self):
        self.memo: dict = {}
        self.duplicated = False

    def object_pairs_hook(self, pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            self.duplicated = True
        return obj


JSON_SPACE = " \t\n\r"


def parse_json(text: str, context: _JsonContext | None = None):
    """json.loads, through the C scanner json uses, without importing json:
    that module brings re, enum, functools and more into every boot.
    Any error is raised again by json.loads itself, for its message.
    context.duplicated tells afterwards whether an object gave a key twice."""
    context = context or _JsonContext()
    try:
        import _json

        scan = _json.make_scanner(context)
        start = len(text) - len(text.lstrip(JSON_SPACE))
        value, end = scan(text, start)
        if not text[end:].strip(JSON_SPACE):
            return value
    except Exception:  # ImportError, any parse error; on some inputs the
        pass           # C scanner even fails with SystemError
    import json

    context.duplicated = False
    return json.loads(text, object_pairs_hook=context.object_pairs_hook)


def duplicate_key_error(text: str) -> ConfigError:
    """The first key given twice in one object of a valid JSON text, as a
    config error at its key path naming the lines of both. Only run once
    parse_json has found one: it walks the text itself, for the lines."""
    from json.decoder import scanstring

    stack: list = []  # per open container: [where, key -> line (None in a list), expecting a key, index]
    where, line, i = "", 1, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            value, i = scanstring(text, i + 1)
            frame = stack[-1] if stack else None
            if frame is not None and frame[2]:
                at = key_path(frame[0], value)
                if value in frame[1]:
                    return ConfigError(at, f"key given twice in one object, at line {frame[1][value]} "
                                           f"and line {line}; only one may be kept")
                frame[1][value], frame[2], where = line, False, at
            continue
        if c == "\n":
            line += 1
        elif c in "{[":
            stack.append([where, {} if c == "{" else None, c == "{", 0])
            if c == "[":
                where = key_path(where, 0)
        elif c in "}]":
            stack.pop()
        elif c == "," and stack:
            frame = stack[-1]
            if frame[1] is not None:
                frame[2] = True
            else:
                frame[3] += 1
                where = key_path(frame[0], frame[3])
        i += 1
    return ConfigError("(top level)", "a key is given twice in one object")


def load_config(text: str, name: str = "config") -> Config:
    context = _JsonContext()
    try:
        data = parse_json(text, context)
    except ValueError as exc:  # JSONDecodeError, or a number too large
        line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
        at = f" at line {line} column {col}" if line else ""
        msg = getattr(exc, "msg", str(exc))
        raise ConfigFileError(name, f"invalid JSON{at}: {msg}") from None
    except RecursionError:
        raise ConfigFileError(name, "invalid JSON: nested too deeply") from None
    if context.duplicated:
        raise duplicate_key_error(text)
    return parse_config(data)


def check_unicode(data) -> None:
    """JSON may spell lone surrogates ("\\ud800"), which no path, name or
    option can be encoded from: reject them where they are."""
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        items = (value.items() if isinstance(value, dict)
                 else enumerate(value) if isinstance(value, list) else ())
        for key, item in items:
            bad_key = isinstance(key, str) and not key.isascii() and not valid_unicode(key)
            bad = isinstance(item, str) and not item.isascii() and not valid_unicode(item)
            if not (bad_key or bad or isinstance(item, (dict, list))):
                continue  # a valid string or a number: nothing below it
            at = key_path(where, key if isinstance(key, int) else key.encode("utf-8", "replace").decode())
            if bad_key:
                raise ConfigError(at, "key is not valid Unicode (lone surrogate)")
            if bad:
                raise ConfigError(at or "(top level)", "is not valid Unicode (lone surrogate)")
            stack.append((at, item))


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_config(data) -> Config:
    """The checked config of a decoded JSON document."""
    expect(data, dict, "(top level)", "a JSON object")
    check_unicode(data)
    check_keys(data, "", TOP_KEYS)
    timeout = 30.0
    if "deviceTimeout" in data:
        timeout = expect(data["deviceTimeout"], float, "deviceTimeout", "a number of seconds")
        if not 0 <= timeout <= 86400:
            raise ConfigError("deviceTimeout", f"{timeout} is not between 0 and 86400 seconds")
    accounts = parse_accounts(expect(data.get("users", {}), dict, "users", "an object"))
    group_ids = parse_groups(expect(data.get("groups", {}), dict, "groups", "an object"))
    filesystems = parse_filesystems(expect(data.get("fileSystems", {}), dict, "fileSystems",
                                           "an object"))
    entries, storages, homes = parse_locations(
        expect(data.get("persistence", {}), dict, "persistence", "an object"), accounts)
    for account in accounts.values():
        # An account table lists every account (system ones too): a system
        # directory there is no home, and gives no one the entries in it.
        if account.home and not is_system_dir(account.home):
            homes.setdefault(account.home, account.name)
    # Target order, parents first: a nested entry is never hidden by its
    # parent's bind mount, and each path's neighbours are what it can clash with.
    entries.sort(key=lambda e: e.target)
    attach_homes(entries, homes)
    used = []
    for entry in entries:
        if entry.storage not in used:
            used.append(entry.storage)
    check_unkeepable(entries)
    check_overlaps(entries, filesystems, storages + [s for s in used if s not in storages])
    storages += [s for s in used if s not in storages]
    root = parse_root(data["root"]) if data.get("root") is not None else None
    return Config(tuple(filesystems), float(timeout), accounts, group_ids,
                  tuple(storages), tuple(entries), root)


def parse_accounts(users: dict) -> dict:
    accounts = {}
    for name, spec in users.items():
        where = key_path("users", name)
        parse_owner(name, where)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, ACCOUNT_KEYS, frozenset())
        uid = spec.get("uid")
        if uid is not None and not valid_id(expect(uid, int, key_path(where, "uid"), "a number")):
            raise ConfigError(key_path(where, "uid"), f"{uid} is not a valid id (0 to {ID_MAX})")
        group = None
        if spec.get("group") not in (None, ""):
            group = parse_owner(spec["group"], key_path(where, "group"))
        home = None
        if spec.get("home") is not None:
            home = parse_components(spec["home"], key_path(where, "home"), absolute=True)
        home_mode = None
        if spec.get("homeMode") is not None:
            try:
                home_mode = parse_mode(spec["homeMode"])
            except ValueError as exc:
                raise ConfigError(key_path(where, "homeMode"), str(exc)) from None
        accounts[name] = Account(name, uid, group, home, home_mode)
    return accounts


def parse_groups(groups: dict) -> dict:
    group_ids = {}
    for name, spec in groups.items():
        where = key_path("groups", name)
        parse_owner(name, where)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, GROUP_KEYS, frozenset())
        gid = spec.get("gid")
        if gid is not None and not valid_id(expect(gid, int, key_path(where, "gid"), "a number")):
            raise ConfigError(key_path(where, "gid"), f"{gid} is not a valid id (0 to {ID_MAX})")
        group_ids[name] = gid
    return group_ids


DEVICE_TAGS = ("UUID", "LABEL", "PARTUUID", "PARTLABEL")


def parse_filesystems(table: dict) -> list:
    filesystems = []
    for mountpoint, spec in table.items():
        where = key_path("fileSystems", mountpoint)
        comps = parse_components(mountpoint, where, absolute=True)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, FS_KEYS, frozenset())
        device = spec.get("device")
        if device is None and spec.get("label") is not None:
            device = "LABEL=" + expect(spec["label"], str, key_path(where, "label"), "a string")
        device = parse_device(device, key_path(where, "device"))
        fs_type = expect(spec.get("fsType", "auto"), str, key_path(where, "fsType"), "a string") or "auto"
        options = parse_options(spec.get("options", []), key_path(where, "options"))
        filesystems.append(FileSystem(comps, device, fs_type, options, where))
    return filesystems


def parse_device(device, at: str) -> str:
    """A device spec: an absolute path or UUID=, LABEL=, PARTUUID=, PARTLABEL=."""
    if device is None:
        raise ConfigError(at, "is required (a path, UUID=, LABEL=, PARTUUID= or PARTLABEL=)")
    expect(device, str, at, "a string")
    if not device or "\0" in device:
        raise ConfigError(at, f"{device!r} is not a device")
    if "=" in device and not device.startswith("/"):
        tag = device.split("=", 1)[0]
        if tag not in DEVICE_TAGS:
            raise ConfigError(at, f"unknown tag {tag}= (use UUID=, LABEL=, PARTUUID= or PARTLABEL=)")
    elif not device.startswith("/"):
        raise ConfigError(at, f"{device!r} must be an absolute path or UUID=, LABEL=, PARTUUID=, PARTLABEL=")
    return device


def parse_subvolume(value, at: str) -> tuple:
    """A subvolume path below the btrfs top level ("root", "nixos/root";
    a leading "/" means the top level too, as in subvol=/root)."""
    expect(value, str, at, "a path string below the filesystem's top level")
    comps = tuple(c for c in value.split("/") if c)
    if "\0" in value or not comps or "." in comps or ".." in comps:
        raise ConfigError(at, f"{value!r} is not a subvolume path below the top level "
                              "(non-empty, no '.' or '..' components, no NUL)")
    return comps


def parse_root(spec) -> RootRotation:
    expect(spec, dict, "root", "an object")
    check_keys(spec, "root", ROOT_KEYS, frozenset())
    device = parse_device(spec.get("device"), "root.device")
    paths = {"subvolume": parse_subvolume(spec.get("subvolume", "root"), "root.subvolume"),
             "oldRoots": parse_subvolume(spec.get("oldRoots", "old_roots"), "root.oldRoots")}
    if spec.get("blank") is not None:
        paths["blank"] = parse_subvolume(spec["blank"], "root.blank")
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if is_under(paths[a], paths[b]) or is_under(paths[b], paths[a]):
                raise ConfigError(f"root.{b}", f"{as_path(paths[b])} overlaps root.{a} "
                                               f"{as_path(paths[a])}; they must be apart")
    keep = expect(spec.get("keep", {}), dict, "root.keep", "an object")
    check_keys(keep, "root.keep", KEEP_KEYS, frozenset())
    limits = []
    for key, default in (("days", 30), ("count", 10)):
        value = keep.get(key, default)
        if not (type(value) is int and 0 <= value <= 100000):
            expect(value, int, f"root.keep.{key}", "a whole number")
            raise ConfigError(f"root.keep.{key}", f"{value} is not between 0 and 100000")
        limits.append(value)
    return RootRotation(device, paths["subvolume"], paths["oldRoots"], limits[0], limits[1],
                        paths.get("blank"))


def parse_locations(locations: dict, accounts: dict) -> tuple:
    """(entries, storage paths, homes: path -> user) of persistence.*."""
    entries: list = []
    storages: list = []
    homes: dict = {}
    for name, spec in locations.items():
        where = key_path("persistence", name)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, LOCATION_KEYS)
        if not expect(spec.get("enable", True), bool, key_path(where, "enable"), "true or false"):
            continue
        storage = parse_components(spec.get("persistentStoragePath", name),
                                   key_path(where, "persistentStoragePath")
                                   if "persistentStoragePath" in spec else where, absolute=True)
        options = mount_options(spec, where, "hideMounts", ())
        entries += parse_lists(spec, where, storage, (), None, ROOT_PERMS, None, options)
        users = expect(spec.get("users", {}), dict, key_path(where, "users"), "an object")
        for user, uspec in users.items():
            uwhere = key_path(key_path(where, "users"), user)
            parse_owner(user, uwhere)
            expect(uspec, dict, uwhere, "an object")
            check_keys(uspec, uwhere, USER_KEYS)
            account = accounts.get(user)
            if uspec.get("home") is not None:
                home = parse_components(uspec["home"], key_path(uwhere, "home"), absolute=True)
                check_home(home, user, key_path(uwhere, "home"))
            elif account and account.home:
                home = account.home
                check_home(home, user, key_path(key_path("users", user), "home"))
            else:
                home = ("root",) if user == "root" else ("home", user)
            homes.setdefault(home, user)
            home_mode = account.home_mode if account and account.home_mode is not None else 0o700
            default = Perms(user, account.group if account and account.group else None, 0o755)
            entries += parse_lists(uspec, uwhere, storage, home, user, default, home_mode, options)
        if storage not in storages:
            storages.append(storage)
    return entries, storages, homes


# Directories of the system that are no one's home: a user's entries there
# would make the user owner of /etc/ssh or of storage's /etc. Also every
# path under the second set (kernel filesystems, the Nix store).
SYSTEM_DIRS = frozenset(tuple(p.split("/")) for p in (
    "bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "mnt", "media", "nix",
    "nix/var", "opt", "run", "sbin", "srv", "tmp", "usr", "usr/bin", "usr/lib", "usr/lib64",
    "usr/libexec", "usr/local", "usr/sbin", "usr/share", "var", "var/cache", "var/db", "var/lib",
    "var/log", "var/spool", "var/tmp"))
SYSTEM_TREES = (("proc",), ("sys",), ("dev",), ("nix", "store"))


def is_system_dir(path: tuple) -> bool:
    return path in SYSTEM_DIRS or any(is_under(path, tree) for tree in SYSTEM_TREES)


def check_home(home: tuple, user: str, where: str) -> None:
    if is_system_dir(home):
        raise ConfigError(where, f"{as_path(home)} is a system directory, not a home: "
                                 f"{user}'s entries would make {user} own it")


def mount_options(spec: dict, where: str, hide_key: str, default: tuple) -> tuple:
    """The userspace mount options hideMounts (an item's hideMount) and
    allowTrash give, those of `default` where unset or null."""
    options = []
    for key, option in ((hide_key, HIDE_OPTION), ("allowTrash", TRASH_OPTION)):
        value = spec.get(key)
        if value is None:
            value = option in default
        elif not isinstance(value, bool):
            raise ConfigError(key_path(where, key), f"must be true or false, not {type_name(value)}")
        if value:
            options.append(option)
    return tuple(options)


def parse_lists(spec: dict, where: str, storage: tuple, home: tuple, user: str | None,
                default: Perms, home_mode: int | None, options: tuple) -> list:
    """The entries of the directories and files lists of a location (user
    None) or of one of its users."""
    entries = []
    for key in ("directories", "files"):
        base = key_path(where, key)
        items = expect(spec.get(key, []), list, base, "a list")
        for i, item in enumerate(items):
            if user is None and type(item) is dict and item.get("home") is not None:
                # NixOS impermanence's evaluated option repeats each
                # users.<name> item in its location's lists, with its
                # home: read under users.
                continue
            entries.append(parse_item(key, item, f"{base}[{i}]", storage, home, user, default,
                                      home_mode, options))
    return entries


def parse_item(key: str, item, where: str, storage: tuple, home: tuple,
               user: str | None, default: Perms, home_mode: int | None, options: tuple) -> Entry:
    kind = "directory" if key == "directories" else "file"
    at_user = user is not None
    home_info = (home, user, home_mode) if at_user else None
    if isinstance(item, str):
        # The common form, a bare path: every other setting is its default.
        target = home + parse_components(item, where, absolute=not at_user)
        if kind == "file" and target == home:
            raise ConfigError(where, f"path {item!r} names no file")
        if kind == "directory":
            return Entry(kind, target, storage, default, "auto", None, home_info, user, where, options)
        return Entry(kind, target, storage, None, "auto", None, home_info, user, where, ())
    expect(item, dict, where, f"a path string or an object with '{kind}'")
    check_keys(item, where, DIR_KEYS if kind == "directory" else FILE_KEYS)
    if kind not in item:
        raise ConfigError(where, f"missing '{kind}'")
    target = home + parse_components(item[kind], where, not at_user, kind)
    if kind == "file" and target == home:
        raise ConfigError(key_path(where, kind), f"path {item[kind]!r} names no file")
    if item.get("persistentStoragePath") is not None:
        storage = parse_components(item["persistentStoragePath"],
                                   key_path(where, "persistentStoragePath"), absolute=True)
    if kind == "directory":
        return Entry(kind, target, storage, parse_perms(item, where, default), "auto", None,
                     home_info, user, where, mount_options(item, where, "hideMount", options))
    method = item.get("method", "auto")
    if method not in ("auto", "symlink"):
        expect(method, str, key_path(where, "method"), "a string")
        raise ConfigError(key_path(where, "method"), f"{method!r} is not 'auto' or 'symlink'")
    parent_perms = None
    parent = item.get("parentDirectory")
    if parent is not None:
        pwhere = key_path(where, "parentDirectory")
        expect(parent, dict, pwhere, "an object")
        # NixOS impermanence's evaluated option also names the directory,
        # and always fills in its defaultPerms: the same as those is the
        # same as none given.
        check_keys(parent, pwhere, PERM_KEYS, NIXOS_INTERNAL | {"directory"})
        defaults = parent.get("defaultPerms")
        if any(parent.get(key) is not None for key in PERM_KEYS) and not (
                isinstance(defaults, dict)
                and all(parent.get(key) == defaults.get(key) for key in PERM_KEYS)):
            parent_perms = parse_perms(parent, pwhere, default)
    return Entry(kind, target, storage, None, method, parent_perms, home_info, user, where, ())


def is_under(path: tuple, parent: tuple) -> bool:
    return path[:len(parent)] == parent


def attach_homes(entries: list, homes: dict) -> None:
    """A system-level entry inside a known user's home gets that home's
    parent rules too, so ~/.local is never created root-owned (the deepest
    home holding it, if homes nest)."""
    deepest_first = sorted(homes, key=len, reverse=True)
    for k, e in enumerate(entries):
        if e.home is not None:
            continue
        for home in deepest_first:
            if len(e.target) > len(home) and is_under(e.target, home):
                user = homes[home]
                entries[k] = Entry(e.kind, e.target, e.storage, e.perms, e.method, e.parent_perms,
                                   (home, user, 0o700), user, e.where, e.options)
                break


# Kept paths that cannot work: the initramfs moves its own /proc, /sys, /dev
# and /run onto the new root at switch_root, hiding a bind made there (and
# /run is meant to start empty); the Nix store belongs to Nix.
UNKEEPABLE = {
    ("proc",): "the kernel's proc filesystem is mounted there at every boot",
    ("sys",): "the kernel's sysfs is mounted there at every boot",
    ("dev",): "the initramfs moves its devtmpfs there at switch_root",
    ("run",): "the initramfs moves its /run there at switch_root, and /run starts empty by design",
    ("nix", "store"): "the Nix store is Nix's own; keep /nix on a persistent filesystem instead",
}
# Kept paths that work but are rarely meant: a warning, not an error.
SURPRISING = {("tmp",): "/tmp is meant to be emptied at boot; keeping it keeps everything put there"}


def check_unkeepable(entries: list) -> None:
    for e in entries:
        for prefix, why in UNKEEPABLE.items():
            if is_under(e.target, prefix):
                raise ConfigError(e.where, f"{as_path(e.target)} cannot be kept: {why}")


def config_warnings(config: "Config") -> list:
    """One line per entry that works but is rarely what was meant."""
    return [f"{as_path(e.target)} ({e.where}): {why}" for e in config.entries
            for prefix, why in SURPRISING.items() if is_under(e.target, prefix)]


def check_overlaps(entries: list, filesystems: list, storages: list) -> None:
    """Reject what would make one mount hide another or apply a path twice:
    a target listed twice, one inside a kept file, and one at, above or
    below a storage path or a fileSystems mount point. Entries are sorted
    by target; the first one in that order that clashes is reported."""
    for k in range(1, len(entries)):
        if entries[k].target == entries[k - 1].target:
            raise ConfigError(entries[k].where, f"{as_path(entries[k].target)} is listed twice: "
                                                f"also at {entries[k - 1].where}")
    guarded: dict = {}
    for path in storages:
        guarded.setdefault(path, "persistent storage path")
    for fs in filesystems:
        guarded.setdefault(fs.mountpoint, "fileSystems mount point")
    # Every prefix of a guarded path, and one guarded path at or below it.
    guarded_below: dict = {}
    for path in guarded:
        for depth in range(1, len(path) + 1):
            guarded_below.setdefault(path[:depth], path)
    kept_files = {e.target: e for e in entries if e.kind == "file"}
    for e in entries:
        hit = guarded_below.get(e.target)
        for depth in range(1, len(e.target)):
            prefix = e.target[:depth]
            holder = kept_files.get(prefix)
            if holder is not None:
                raise ConfigError(e.where, f"{as_path(e.target)} is inside the kept file "
                                           f"{as_path(holder.target)} ({holder.where})")
            if hit is None and prefix in guarded:
                hit = prefix
        if hit is not None:
            raise ConfigError(e.where, f"{as_path(e.target)} overlaps the {guarded[hit]} {as_path(hit)}; "
                                       "a bind mount there would hide storage")

# --- The system as found: devices -------------------------------------------------

def format_uuid(raw: bytes, mixed_endian: bool = False) -> str:
    if mixed_endian:  # GPT GUIDs store the first three fields little-endian
        raw = raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def read_at(fd: int, offset: int, size: int) -> bytes:
    try:
        return os.pread(fd, size, offset)
    except OSError:
        return b""


def _label(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def probe_filesystem(fd: int) -> tuple | None:
    """(type, uuid, label) from the superblock of ext2/3/4, btrfs, xfs, vfat."""
    sb = read_at(fd, 1024, 256)
    if len(sb) >= 136 and sb[56:58] == b"\x53\xef":
        return ("ext4", format_uuid(sb[104:120]), _label(sb[120:136]))
    sb = read_at(fd, 0x10000, 0x300)
    if len(sb) >= 0x22b and sb[0x40:0x48] == b"_BHRfS_M":
        return ("btrfs", format_uuid(sb[0x20:0x30]), _label(sb[0x12b:0x22b]))
    sb = read_at(fd, 0, 512)
    if len(sb) >= 120 and sb[:4] == b"XFSB":
        return ("xfs", format_uuid(sb[32:48]), _label(sb[108:120]))
    if len(sb) == 512 and sb[510:512] == b"\x55\xaa":
        if sb[82:87] == b"FAT32":
            serial, label = sb[67:71], sb[71:82]
        elif sb[54:57] == b"FAT":
            serial, label = sb[39:43], sb[43:54]
        else:
            return None
        n = int.from_bytes(serial, "little")
        text = label.decode("ascii", "replace").rstrip(" ")
        return ("vfat", f"{n >> 16:04X}-{n & 0xffff:04X}", "" if text == "NO NAME" else text)
    return None


def probe_partition(name: str) -> tuple | None:
    """(partuuid, partlabel) of partition `name` from its disk's GPT or MBR."""
    sys_dir = f"/sys/class/block/{name}"
    try:
        with open(f"{sys_dir}/partition", "rb") as f:
            number = int(f.read())
        disk = os.path.basename(os.path.dirname(os.path.realpath(sys_dir)))
        with open(f"/sys/class/block/{disk}/queue/logical_block_size", "rb") as f:
            sector = int(f.read())
        fd = os.open(f"/dev/{disk}", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        mbr = read_at(fd, 0, 512)
        if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
            return None
        if mbr[450] == 0xEE:
            header = read_at(fd, sector, 92)
            if header[:8] != b"EFI PART":
                return None
            table = int.from_bytes(header[72:80], "little")
            count = int.from_bytes(header[80:84], "little")
            size = int.from_bytes(header[84:88], "little")
            if not 1 <= number <= count or size < 128:
                return None
            entry = read_at(fd, table * sector + (number - 1) * size, 128)
            if len(entry) < 128:
                return None
            label = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
            return (format_uuid(entry[16:32], mixed_endian=True), label)
        signature = int.from_bytes(mbr[440:444], "little")
        return (f"{signature:08x}-{number:02x}", None)
    finally:
        os.close(fd)


# udev's links by identifier, and the tag each one stands for.
UDEV_LINKS = {"by-label": "LABEL", "by-uuid": "UUID", "by-partuuid": "PARTUUID",
              "by-partlabel": "PARTLABEL"}


def udev_unescape(name: str) -> str:
    """A link name as udev writes it ("my\\x20disk") back to the identifier."""
    if "\\x" not in name:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        code = raw[i + 2:i + 4]
        if raw[i:i + 2] == b"\\x" and len(code) == 2 and all(c in b"0123456789abcdefABCDEF" for c in code):
            out.append(int(code, 16))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def lookup_device(spec: str) -> tuple:
    """(device path or None, probed fs type or None) for a device spec. A
    path is honoured as written; a /dev/disk/by-label/... path (NixOS's
    usual form) that does not exist, as in an initramfs without udev, is
    looked up as LABEL=... would be. A tag that more than one device
    answers is never guessed (udev's link would be its guess): Failure."""
    if spec.startswith("/"):
        if os.path.exists(spec):
            return spec, None
        parts = spec.split("/")
        if len(parts) == 5 and parts[1:3] == ["dev", "disk"] and parts[3] in UDEV_LINKS and parts[4]:
            return lookup_device(f"{UDEV_LINKS[parts[3]]}={udev_unescape(parts[4])}")
        return None, None
    tag, value = spec.split("=", 1)
    found = scan_devices(tag, value)
    if len(found) > 1:
        raise Failure(spec, f"matches {len(found)} devices: {', '.join(d for d, _ in found)}; "
                               "refusing to guess (give the device by path, or make the "
                               f"{tag.lower()} unique)")
    if found:
        return found[0]
    link = f"/dev/disk/by-{tag.lower()}/{value}"
    if os.path.exists(link):  # a filesystem udev knows and the probe does not
        return os.path.realpath(link), None
    return None, None


def scan_devices(tag: str, value: str) -> list:
    """[(device, fs type or None)] of every block device whose superblock
    or partition entry has this tag. A device another one is built on (a
    member of a RAID, a multipath leg, what device mapper maps) is not one
    of them; the devices of one multi-device btrfs count once."""
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return []
    found: list = []
    btrfs_ids: dict = {}  # fs uuid -> devids of that btrfs seen
    for name in names:
        device = f"/dev/{name}"
        try:
            with open(f"/sys/class/block/{name}/size", "rb") as f:
                if int(f.read()) == 0:
                    continue
            if os.listdir(f"/sys/class/block/{name}/holders"):
                continue
        except (OSError, ValueError):
            continue
        if not os.path.exists(device):
            continue
        if tag in ("PARTUUID", "PARTLABEL"):
            ids = probe_partition(name)
            if ids and ((tag == "PARTUUID" and ids[0].lower() == value.lower())
                        or (tag == "PARTLABEL" and ids[1] == value)):
                found.append((device, None))
            continue
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            probed = probe_filesystem(fd)
            devid = None
            if probed and probed[0] == "btrfs":  # dev_item.devid: which device of the btrfs
                devid = int.from_bytes(read_at(fd, 0x10000 + 0xc9, 8), "little")
        finally:
            os.close(fd)
        if probed and ((tag == "UUID" and probed[1].lower() == value.lower())
                       or (tag == "LABEL" and probed[2] == value)):
            if devid is not None:
                seen = btrfs_ids.setdefault(probed[1], set())
                if seen and devid not in seen:
                    seen.add(devid)
                    continue  # another device of the same btrfs
                seen.add(devid)
            found.append((device, probed[0]))
    return found


def wait_for_device(spec: str, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        device, fs_type = lookup_device(spec)
        if device is not None:
            return device, fs_type
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(spec, f"device did not appear within {timeout:g} s")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.25)


MOUNT_FLAGS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True), "mand": (MS_MANDLOCK, True), "nomand": (MS_MANDLOCK, False),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False), "nosymfollow": (MS_NOSYMFOLLOW, True),
}
# fstab options that only userspace tools read.
USERSPACE_OPTIONS = {"defaults", "auto", "noauto", "nofail", "user", "users", "nouser",
                     "owner", "group", "_netdev", "neededForBoot"}


def split_mount_options(options: tuple) -> tuple:
    flags, data = 0, []
    for option in options:
        if option in MOUNT_FLAGS:
            bit, on = MOUNT_FLAGS[option]
            flags = flags | bit if on else flags & ~bit
        elif option in USERSPACE_OPTIONS or option.startswith(("x-", "X-", "comment=")):
            continue
        else:
            data.append(option)
    return flags, ",".join(data) or None


def kernel_filesystems() -> list:
    try:
        with open("/proc/filesystems", encoding="utf-8") as f:
            return [line.split()[-1] for line in f if line.strip() and not line.startswith("nodev")]
    except OSError:
        return []


# --- The system as found: the mount table -----------------------------------------

def unescape_mountinfo(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class MountTable:
    """/proc/self/mountinfo, read once per run: mount point -> (source, fs
    root, type, mount id) of the mount on top there; the peer group and
    parent of each mount, by mount id."""

    def __init__(self):
        self.points: dict[str, tuple] = {}
        self.groups: dict[str, str] = {}  # mount id -> peer group, of the shared mounts
        self.parents: dict[str, str] = {}  # mount id -> id of the mount it is attached to
        self.stacks: dict[str, list] = {}  # every mount at each point, the top one last
        self.devices: dict[str, str] = {}  # mount id -> major:minor of its filesystem
        self._fuse: dict | None = None
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                data = f.read().decode("utf-8", "surrogateescape")
        except OSError:
            return
        for line in data.splitlines():
            fields = line.split(" ")
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            point = unescape_mountinfo(fields[4])
            for tag in fields[6:sep]:
                if tag.startswith("shared:"):
                    self.groups[fields[0]] = tag[7:]
            self.parents[fields[0]] = fields[1]
            self.devices[fields[0]] = fields[2]
            self.points[point] = (unescape_mountinfo(fields[sep + 2]),
                                  unescape_mountinfo(fields[3]), fields[sep + 1], fields[0])
            self.stacks.setdefault(point, []).append(self.points[point])

    def is_mountpoint(self, host_path: str) -> bool:
        return host_path in self.points

    def fuse_below(self, root: str) -> dict:
        """The FUSE mounts below root, {components: (fs type, source)}: a
        user's daemon answers for them, and a stopped one hangs every lstat
        there."""
        if self._fuse is None:
            prefix = root.rstrip("/") + "/"
            self._fuse = {
                tuple(point[len(prefix):].split("/")): (fs_type, source)
                for point, (source, _fs_root, fs_type, _id) in self.points.items()
                if point.startswith(prefix) and (fs_type in ("fuse", "fuseblk") or fs_type.startswith("fuse."))}
        return self._fuse

    def remove(self, host_path: str) -> None:
        """The top mount at host_path taken off: the one below, if any, is
        on top now (what it is, the tree tells)."""
        stack = self.stacks.get(host_path)
        if stack:
            stack.pop()
        if stack:
            self.points[host_path] = stack[-1]
        else:
            self.points.pop(host_path, None)
            self.stacks.pop(host_path, None)

    def layers(self, host_path: str) -> int:
        return len(self.stacks.get(host_path, ()))

    def holding(self, host_path: str) -> str | None:
        """The id of the mount host_path lies on (the one on top at the
        longest mount point above it)."""
        path = host_path
        while True:
            found = self.points.get(path or "/")
            if found is not None:
                return found[3]
            if not path or path == "/":
                return None
            path = path[:path.rindex("/")]

    def two_way(self, host_target: str, host_source: str) -> bool:
        """Whether the mount at host_target is a peer of the mount
        host_source lies on: a bind that forwards what is mounted under it
        into storage (made by mount(8), or by a version of this script
        whose binds were not one-way)."""
        found = self.points.get(host_target)
        if found is None:
            return False
        group = self.groups.get(found[3])
        return group is not None and self.groups.get(self.holding(host_source)) == group

    def parent_shared(self, host_path: str) -> bool:
        """Whether the mount at host_path is attached to a shared mount."""
        found = self.points.get(host_path)
        return found is not None and self.parents.get(found[3]) in self.groups

    def mounted_from(self, host_path: str, fs_root: tuple) -> str | None:
        """A mount point where the filesystem mounted at host_path is
        mounted from fs_root or a path below it."""
        found = self.points.get(host_path)
        if found is None:
            return None
        device = self.devices[found[3]]
        for point, stack in self.stacks.items():
            for _source, root, _fs_type, mount_id in stack:
                if self.devices[mount_id] == device and is_under(tuple(c for c in root.split("/") if c), fs_root):
                    return point
        return None


# --- The system as found: accounts ---------------------------------------------------

def parse_colon_file(text: str) -> dict:
    table = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] and not line.startswith(("#", "+", "-")):
            table.setdefault(fields[0], fields)
    return table


class Accounts:
    """Resolves user and group names in the order the spec gives: a number;
    the config's table; NixOS's uid-map/gid-map in storage; <root>/etc/passwd
    and /etc/group; the running system's."""

    def __init__(self, config: Config, fs: "Tree", available: list):
        self.config = config
        self.fs = fs
        self.storages = available
        self._maps: dict = {}
        self._files: dict = {}
        self._cache: dict = {}
        self._kept_dirs: dict | None = None

    def kept_dir_perms(self, source: tuple) -> Perms | None:
        """The declared owner and mode of the kept directory whose source
        is `source`, if one is: a storage parent that another entry makes
        gets them, never root's in its place."""
        if self._kept_dirs is None:
            self._kept_dirs = {e.source: e.perms for e in self.config.entries if e.kind == "directory"}
        return self._kept_dirs.get(source)

    def _nixos_map(self, storage: tuple, name: str) -> dict:
        key = (storage, name)
        if key not in self._maps:
            table = {}
            text = self.fs.read_file(storage + ("var", "lib", "nixos", name))
            if text is not None:
                try:
                    loaded = parse_json(text)  # not json: see parse_json
                    if isinstance(loaded, dict):
                        table = {k: v for k, v in loaded.items() if valid_id(v)}
                except (ValueError, RecursionError):
                    pass
            self._maps[key] = table
        return self._maps[key]

    def _root_file(self, name: str) -> dict:
        if name not in self._files:
            text = self.fs.read_file(("etc", name))
            self._files[name] = parse_colon_file(text) if text else {}
        return self._files[name]

    def _storages_for(self, storage: tuple) -> list:
        return [storage] + [s for s in self.storages if s != storage]

    def uid(self, name: str, storage: tuple) -> int:
        account = self.config.accounts.get(name)
        return self._resolve("user", name, storage, account.uid if account else None,
                             "uid-map", "passwd", "users", "uid")

    def gid(self, name: str, storage: tuple) -> int:
        return self._resolve("group", name, storage, self.config.group_ids.get(name),
                             "gid-map", "group", "groups", "gid")

    def _resolve(self, what: str, name: str, storage: tuple, configured: int | None,
                 nixos_map: str, database: str, table: str, key: str) -> int:
        if is_id(name):
            return int(name)  # in range: checked with the config
        if name == "root" and configured is None:
            return 0
        cache_key = (database, name, storage)
        found = self._cache.get(cache_key)
        if found is None:
            found = self._cache[cache_key] = self._lookup(what, name, storage, configured,
                                                          nixos_map, database, table, key)
        return found

    def _lookup(self, what: str, name: str, storage: tuple, configured: int | None,
                nixos_map: str, database: str, table: str, key: str) -> int:
        if configured is not None:
            return configured
        for s in self._storages_for(storage):
            found = self._nixos_map(s, nixos_map).get(name)
            if found is not None:
                return found
        fields = self._root_file(database).get(name)
        if fields and (found := parse_id(fields[2])) is not None:
            return found
        try:
            if database == "passwd":
                import pwd

                return pwd.getpwnam(name).pw_uid
            import grp

            return grp.getgrnam(name).gr_gid
        except (ImportError, KeyError):
            pass
        raise Failure(f"{what} {name}", f"unknown {what}: not in the config's {table} table, "
                         f"{as_path(storage)}/var/lib/nixos/{nixos_map}, the root's /etc/{database} "
                         f"or the running system; add \"{table}\": {{\"{name}\": {{\"{key}\": N}}}} "
                         "to the config")

    def primary_gid(self, user: str, storage: tuple) -> int:
        account = self.config.accounts.get(user)
        if account is not None and account.group is not None:
            return self.gid(account.group, storage)
        if is_id(user):
            return int(user)
        if user == "root":
            return 0
        fields = self._root_file("passwd").get(user)
        if fields and (found := parse_id(fields[3])) is not None:
            return found
        try:
            import pwd

            return pwd.getpwnam(user).pw_gid
        except (ImportError, KeyError):
            pass
        raise Failure(f"user {user}", "primary group unknown: set "
                         f"\"users\": {{\"{user}\": {{\"group\": \"...\"}}}} in the config")

    def resolve(self, perms: Perms, storage: tuple) -> tuple:
        """(uid, gid, mode) for perms in storage."""
        uid = self.uid(perms.user, storage)
        gid = (self.primary_gid(perms.user, storage) if perms.group is None
               else self.gid(perms.group, storage))
        return uid, gid, perms.mode


# --- The system as found: libmount's utab ----------------------------------------------
#
# Userspace mount options (x-gvfs-hide, x-gvfs-trash) are not the kernel's:
# util-linux keeps them in /run/mount/utab, one line a mount, and findmnt,
# GIO and udisks read them merged with mountinfo. Written as libmount
# writes it: under an flock of utab.lock, to a temporary file renamed over
# utab, then utab.event touched for those watching. In an initrd, /run is
# carried into the booted system, so TARGET is the path it will see.

def utab_path() -> str:
    return _utab or os.environ.get("LIBMOUNT_UTAB") or "/run/mount/utab"


def mangle(text: str) -> str:
    """A field as libmount writes it: space, tab, newline and backslash as
    octal escapes."""
    for c in "\\ \t\n":
        text = text.replace(c, f"\\{ord(c):03o}")
    return text


def utab_fields(line: bytes) -> dict:
    text = line.decode("utf-8", "surrogateescape")
    return {key: unescape_mountinfo(value) for key, _, value in
            (field.partition("=") for field in text.split(" ") if "=" in field)}


class UtabKey(Record):
    """What names one mount's line in utab, as util-linux matches them:
    the mount ID, and for a line without one SRC, TARGET and ROOT."""
    __slots__ = _fields = ("id", "source", "target", "root")

    def names(self, fields: dict) -> bool:
        if "ID" in fields:
            return fields["ID"] == self.id
        return (fields.get("SRC"), fields.get("TARGET"), fields.get("ROOT")) == (
            self.source, self.target, self.root)


def read_utab() -> list:
    """utab's lines, bytes without their newline (a line ends at a newline
    only: a TARGET may hold a carriage return); none where it is missing
    or unreadable."""
    try:
        with open(utab_path(), "rb") as f:
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    return lines[:-1] if not lines[-1] else lines


_utab: str | None = None  # the utab this run keeps, once choose_utab chose


def choose_utab(root: str, log: Log) -> None:
    """Which utab this run keeps. libmount's, for the root the system runs
    on, in an initramfs (whose /run the booted system gets: as systemd
    tells, /etc/initrd-release, or else the initramfs's rootfs at /), or
    where $LIBMOUNT_UTAB names one. Another --root on a running system is
    no root that utab describes: its lines go to a utab of that root's
    own under /run, named by its device and inode, and the host's is left
    alone."""
    global _utab
    if (root == "/" or os.environ.get("LIBMOUNT_UTAB") or os.path.exists("/etc/initrd-release")
            or MountTable().points.get("/", ("", "", ""))[2] == "rootfs"):
        _utab = None
        return
    st = os.stat(root)
    _utab = f"{LOCK_DIR}/impermanence-boot.{st.st_dev}.{st.st_ino}.utab"
    log.info(f"/run/mount/utab: left alone, as {root} is not / and this is no initramfs; "
             f"the mount options are kept in {_utab}")


def update_utab(added: list, removed: list) -> None:
    """Add lines (str, without their newline) to utab, and take out the
    lines of the mounts `removed` (UtabKey) names, any line with the ID of
    an added one (left from a mount that is gone: an ID names one live
    mount), and lines with no options but apply's whose mount is gone.
    Every other line stays as it is, byte for byte."""
    path = utab_path()
    directory = os.path.dirname(path)
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise oserror("mkdir", directory, exc.errno) from None
    new = [line.encode("utf-8", "surrogateescape") for line in added]
    gone = list(removed) + [UtabKey(utab_fields(line).get("ID"), None, None, None) for line in new]
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    with opened(call("open", path + ".lock", os.open, path + ".lock", flags, 0o644)) as lock:
        if libc().flock(lock, LOCK_EX) < 0:
            raise oserror("flock", path + ".lock")
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            raise oserror("read", path, exc.errno) from None
        if lines and not lines[-1]:
            lines.pop()
        live = {mount[3] for mount in MountTable().points.values()}
        kept = []
        for line in lines:
            fields = utab_fields(line)
            if any(key.names(fields) for key in gone):
                continue
            # A line of ours (only options apply writes) whose mount is gone.
            if "ID" in fields and fields["ID"] not in live and set(
                    fields.get("OPTS", "").split(",")) <= OUR_OPTIONS:
                continue
            kept.append(line)
        temp = f"{path}.{os.getpid()}"
        data = b"".join(line + b"\n" for line in kept + new)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with opened(call("create", temp, os.open, temp, flags, 0o644)) as fd:
                if call("write", temp, os.write, fd, data) != len(data):
                    raise oserror("write", temp, errno.ENOSPC)
            call("rename", path, os.rename, temp, path)
        except OSError:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
    try:
        os.close(os.open(path + ".event", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
    except OSError:
        pass  # no one watching is told; the file itself is complete


# --- The system as found: the tree --------------------------------------------------

class Node:
    """What is at a path: kind is 'dir', 'file', 'link' or 'other'. Made for
    every lookup, so a plain slotted class rather than a Record."""
    __slots__ = ("kind", "uid", "gid", "mode", "size", "dev", "ino", "link", "nlink")

    def __init__(self, kind, uid, gid, mode, size, dev, ino, link, nlink=1):
        self.kind, self.uid, self.gid, self.mode = kind, uid, gid, mode
        self.size, self.dev, self.ino, self.link, self.nlink = size, dev, ino, link, nlink


KIND_OF_FORMAT = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "link"}


def node_from_stat(st) -> Node:
    m = st.st_mode
    return Node(KIND_OF_FORMAT.get(m & 0o170000, "other"), st.st_uid, st.st_gid, m & 0o7777,
                st.st_size, st.st_dev, st.st_ino, None, st.st_nlink)


class View:
    """The system as found under <root>, read only: every component is
    checked to be a real directory before the next one is looked at, so a
    planted symlink is reported, never followed. The real directories
    seen are remembered (apply never changes one once it exists; what a
    mount puts over one is dropped with `forget`), and so is the mount
    table, read once a run."""

    def __init__(self, root: str):
        self.root = root
        self.prefix = "" if root == "/" else root
        self.dirs: dict = {}         # real directories seen: path -> Node
        self.kept: frozenset = frozenset()  # every kept target (host paths): the config's own mounts
        self._mounts: MountTable | None = None

    @property
    def mounts(self) -> MountTable:
        """The mount table, read once a run (refresh_mounts: after the run
        mounted something, or where a check must see the kernel's now)."""
        if self._mounts is None:
            self._mounts = MountTable()
        return self._mounts

    def refresh_mounts(self) -> MountTable:
        self._mounts = MountTable()
        return self._mounts

    def host(self, comps: tuple) -> str:
        return self.prefix + "/" + "/".join(comps) if comps else self.root

    def _lstat(self, comps: tuple) -> Node | None:
        path = self.prefix + "/" + "/".join(comps)
        try:
            return node_from_stat(os.lstat(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise oserror("lstat", path, exc.errno) from None

    def _known(self, comps: tuple) -> bool:
        """Whether comps is a directory whose every parent was checked."""
        return comps in self.dirs

    def look(self, comps: tuple) -> Node | None:
        """The node at comps, or None if missing. Raises Failure if a
        parent component is a symlink or not a directory."""
        dirs = self.dirs
        node = dirs.get(comps)
        if node is not None:
            return node
        for depth in range(1, len(comps)):
            prefix = comps[:depth]
            if self._known(prefix):
                continue
            node = self._lstat(prefix)
            if node is None:
                return None
            if node.kind != "dir":
                what = "a symbolic link" if node.kind == "link" else "not a directory"
                raise Failure(self.host(prefix), f"is {what}; refusing to follow it")
            dirs[prefix] = node
        node = self._lstat(comps) if comps else node_from_stat(os.stat(self.root))
        if node is None:
            return None
        if node.kind == "dir":
            # Directories are never changed by apply once they exist; what
            # a mount puts over one is found through `binds` or `forget`.
            dirs[comps] = node
        elif node.kind == "link":
            try:
                link = os.readlink(self.host(comps))
            except OSError:
                link = None
            node = Node("link", node.uid, node.gid, node.mode, node.size, node.dev, node.ino, link)
        return node


    def read_file(self, comps: tuple) -> str | None:
        """Contents of a small regular file that only root can have written:
        opened without following links, it and every directory on the way
        below the root root's and writable by no one else (a directory
        with the sticky bit may be: no one else can then rename root's
        entries in it). None for any other."""
        try:
            fd = open_beneath(self.root, comps, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, Failure):
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                return None
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                if sum(map(len, chunks)) > 16 << 20:
                    return None
            return b"".join(chunks).decode("utf-8", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)


class Tree(View):
    """The view, with the actions planned so far recorded over it: lookups
    see them, so an entry's plan (and `plan` as a whole) is computed as if
    the earlier actions had run; paths below a recorded bind mount are
    looked up in its source, as the kernel would after the mount. What one
    part of the work planned is kept once it ran, and forgotten if it
    failed (`settle`, called by run_planned)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.created: dict = {}      # planned: path -> Node
        self.binds: dict = {}        # planned: target -> source
        self.pending_binds: list = []
        self.pending_created: list = []

    def translate(self, comps: tuple) -> tuple:
        binds = self.binds
        for depth in range(len(comps), 0, -1):
            source = binds.get(comps[:depth])
            if source is not None:
                return source + comps[depth:]
        return comps

    def _known(self, comps: tuple) -> bool:
        return comps in self.dirs or comps in self.created

    def look(self, comps: tuple) -> Node | None:
        if self.binds:
            comps = self.translate(comps)
        node = self.created.get(comps) or self.dirs.get(comps)
        if node is not None:
            return node
        parent = self.created.get(comps[:-1])
        if parent is not None and parent.kind == "dir":
            return None  # inside a directory only just planned: empty
        return View.look(self, comps)

    def same(self, a: tuple, b: tuple) -> bool:
        """Whether paths a and b are the same directory or file."""
        ta, tb = (self.translate(a), self.translate(b)) if self.binds else (a, b)
        if ta == tb:
            return True
        na, nb = self.look(ta), self.look(tb)
        if (na is not None and nb is not None and na.ino is not None
                and (na.dev, na.ino) == (nb.dev, nb.ino)):
            return True
        if (ta, tb) == (a, b):
            return False
        # Below a bind an earlier run made, a mount it made inside that
        # one (a kept path of another storage) shows at the real path only.
        try:
            ra, rb = (os.lstat(self.prefix + "/" + "/".join(p)) for p in (a, b))
        except OSError:
            return False
        return (ra.st_dev, ra.st_ino) == (rb.st_dev, rb.st_ino)

    def enter(self, target: tuple) -> None:
        """Planning moves on to the entry at target. Entries come in path
        order, so a bind neither above target nor after it is above no
        later entry either: dropped, lookups translate through the binds
        that can still apply."""
        if self.binds:
            self.binds = {t: s for t, s in self.binds.items() if target[:len(t)] == t or t > target}

    def known_dir(self, comps: tuple) -> bool:
        """Whether comps is a directory planned, or met on a checked walk,
        before: the planning that made or met it looked at its parents
        already, so the next entry inside it need not look at them again."""
        if self.binds:
            comps = self.translate(comps)
        node = self.created.get(comps) or self.dirs.get(comps)
        return node is not None and node.kind == "dir"

    def record(self, comps: tuple, node: Node) -> None:
        key = self.translate(comps) if self.binds else comps
        self.created[key] = node
        self.pending_created.append(key)

    def record_bind(self, source: tuple, target: tuple) -> None:
        self.binds[target] = self.translate(source) if self.binds else source
        self.pending_binds.append(target)

    def forget(self, comps: tuple) -> None:
        """A mount was made on or removed from comps: what is there now is
        the kernel's to say."""
        self.dirs.pop(comps, None)
        self.created.pop(comps, None)

    def settle(self, succeeded: bool) -> None:
        """After an entry ran. What it created stays recorded: a directory
        apply made holds only what apply puts in it, so lookups inside it
        need no system call; its bind mounts stay recorded (lookups below
        them go to their source, as the kernel's do). If the entry failed,
        its record is dropped and the real tree is the truth."""
        if not succeeded:
            for key in self.pending_created:
                self.created.pop(key, None)
            # What the entry made before it failed is there all the same:
            # a directory made earlier that holds such a path no longer
            # holds only what is recorded, so lookups in it ask the kernel.
            for key in self.pending_created:
                parent = self.created.pop(key[:-1], None)
                if parent is not None:
                    self.dirs[key[:-1]] = parent
            for target in self.pending_binds:
                self.binds.pop(target, None)
        self.pending_created.clear()
        self.pending_binds.clear()



def open_dir_at(dir_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, O_DIR, dir_fd=dir_fd)
    except OSError as exc:
        raise dir_open_error(exc, dir_fd, name, shown) from None


def dir_open_error(exc: OSError, dir_fd: int, name: str, shown: str) -> Exception:
    """What to raise when opening directory `name` failed: a link or a
    non-directory in the way is refused by name, with the whole path."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        what = "a symbolic link" if is_link else "not a directory"
        return Failure(shown, f"is {what}; refusing to follow it")
    return oserror("open", shown, exc.errno)


def open_dirs(start_fd: int, comps: tuple, shown_of, check=None, keep: list | None = None) -> int:
    """The fd of directory comps below start_fd, every component opened
    O_DIRECTORY|O_NOFOLLOW below the one before: a link or non-directory in
    the way is refused (dir_open_error). shown_of(depth) names
    comps[:depth] in messages; check(fd, depth), if given, may refuse each
    directory opened by raising. Without keep the walk owns start_fd:
    every fd on the way is closed but the one returned (start_fd itself
    for no comps), all of them on failure. With keep, nothing is closed:
    each fd opened is appended to keep, the caller's."""
    fd = start_fd
    try:
        for depth, name in enumerate(comps, 1):
            try:
                next_fd = os.open(name, O_DIR, dir_fd=fd)
            except OSError as exc:
                raise dir_open_error(exc, fd, name, shown_of(depth)) from None
            if keep is not None:
                keep.append(next_fd)
            else:
                os.close(fd)
            fd = next_fd
            if check is not None:
                check(fd, depth)
    except BaseException:
        if keep is None:
            os.close(fd)
        raise
    return fd


def open_beneath(root: str, comps: tuple, flags: int) -> int:
    """Open root/comps with every directory component opened O_NOFOLLOW,
    each of them root's and, unless sticky, writable by no one else
    (Failure otherwise)."""
    prefix = "" if root == "/" else root

    def roots_alone(fd: int, depth: int) -> None:
        st = os.fstat(fd)
        if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise Failure(prefix + as_path(comps[:depth]), "not root's alone")

    fd = open_dirs(os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), comps[:-1],
                   lambda depth: prefix + as_path(comps[:depth]), roots_alone)
    try:
        return os.open(comps[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


# --- Tree walks ----------------------------------------------------------------------
#
# Copy, compare and removal of a move, diff and orphans walk a tree the same
# way: depth first through directory fds, without recursion, so a tree as
# deep as a user can make one is walked until the fds run out and no
# path is ever spelled out to the kernel.

def walk_tree(fd: int, data, entries, visit, leave) -> None:
    """Depth first below the directory fd (the caller's, left open), one
    frame per level of the path walked, each directory's entries read whole
    before the walk goes into one of them: the fds held are bounded by the
    depth, never by the width. visit(fd, data, entry) deals with an entry
    of the directory fd and returns None, or (fd, data, entries) of a
    directory to go into, which it opened with O_DIR (a link is never
    followed) and found on a filesystem the caller walks.
    leave(fd, data, done) is called for each directory gone into once its
    entries are done, or, not done, as an exception unwinds the walk (then
    it only lets go of what data holds); the walk then closes its fd."""
    stack = [(fd, data, iter(entries))]
    try:
        while True:
            fd, data, pending = stack[-1]
            for entry in pending:
                child = visit(fd, data, entry)
                if child is not None:
                    stack.append((child[0], child[1], iter(child[2])))
                    break
            else:
                if len(stack) == 1:
                    return
                stack.pop()
                try:
                    leave(fd, data, True)
                finally:
                    os.close(fd)
    except BaseException:
        while len(stack) > 1:
            fd, data, _ = stack.pop()
            try:
                leave(fd, data, False)
            finally:
                os.close(fd)
        raise


# --- The system as found: what is not kept (diff, orphans) ---------------------------
#
# A walk of one filesystem below a path, through directory fds (each one
# opened O_NOFOLLOW below its parent, listed with scandir on the fd), that
# reports what no entry keeps: the children of a directory holding kept
# paths one by one, any other directory as one line with its total.

class Walk:
    """What is found below a base directory that `kept` does not hold.
    kept and skipped are component tuples relative to the root; skipped
    ones (path -> why) are named, not walked; `own_fs` are the mount points
    walked anyway, as filesystems of their own."""

    def __init__(self, tree: Tree, mounts: MountTable, kept, skipped: dict, log: Log,
                 own_fs=()):
        self.tree, self.kept, self.skipped, self.log = tree, set(kept), skipped, log
        self.own_fs = set(own_fs)
        # Directories that hold a kept or skipped path: walked, their
        # children reported one by one.
        self.partial = {p[:d] for p in (*self.kept, *skipped, *self.own_fs) for d in range(len(p))}
        # Mount points on the way to a path walked anyway: passed through.
        self.through = {p[:d] for p in self.own_fs for d in range(1, len(p))}
        prefix = tree.prefix + "/"
        self.mount_types: dict = {}  # mount point (components) -> fs type
        self.have_table = bool(mounts.points)  # else a new st_dev is taken for a mount
        for point, (_source, _fs_root, fs_type, _id) in mounts.points.items():
            if point == tree.root:
                continue
            if point.startswith(prefix):
                self.mount_types[tuple(point[len(prefix):].split("/"))] = fs_type
        # Last components of the mount points: a file's path is looked up
        # only when its name is one of them.
        self.mount_names = {p[-1] for p in self.mount_types}
        self.found: list = []    # (path, kind, size, files)
        self.mounts: list = []   # (path, fs type): other filesystems, named once
        self.not_walked: list = []  # (path, why)
        self.errors: list = []   # (path, cause)
        self.seen: set = set()   # (dev, ino) of files with several links, counted once

    def error(self, comps: tuple, exc: OSError) -> None:
        shown = self.tree.host(comps)
        cause = failure(exc, "").cause
        self.errors.append((comps, cause))
        self.log.error(f"{shown}: {cause}")

    def run(self, base: tuple) -> bool:
        """Walk base; False (an error recorded) if it cannot be opened."""
        try:
            fd = open_dir_path(self.tree, base)
        except (OSError, Failure) as exc:
            self.error(base, exc if isinstance(exc, OSError) else OSError(0, exc.cause))
            return False
        try:
            top = (base, os.fstat(fd).st_dev, False, None, False)
            walk_tree(fd, top, self._entries(fd, top), self._visit, self._leave)
        finally:
            os.close(fd)
        return True

    # A frame of the walk: (path, dev, through, totals, measured). totals is
    # None for a directory holding kept paths (each other child reported;
    # with through, a mount point passed on the way to an --include: only
    # the children on that way), else [bytes, files] of the directory
    # measured whole that it lies in, `measured` being that directory.

    def _mount(self, path: tuple, st, dev: int, name: bool = True) -> bool:
        """Whether path is a mount point (of another filesystem, or a bind
        mount; a file too): named (unless not name), walked only if asked.
        The mount table decides: a btrfs subvolume nested in the root has
        an st_dev of its own but is no mount, and goes with the root."""
        if path not in self.mount_types and (st.st_dev == dev or self.have_table):
            return False
        if name:
            self.mounts.append((path, self.mount_types.get(path, "?")))
        return True

    def _entries(self, fd: int, frame: tuple) -> list:
        """(name, lstat) of the children of a directory holding kept paths,
        sorted; of one measured whole, its subdirectories (mount points in
        it named, not walked), its files counted into totals."""
        comps, dev, _through, totals, _measured = frame
        entries = []
        if totals is None:
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        path = comps + (e.name,)
                        if path in self.mount_types and path not in self.own_fs and path not in self.through:
                            # Another mount, per the table: never looked at (a
                            # stalled FUSE daemon would hang the lstat).
                            entries.append((e.name, None))
                            continue
                        try:
                            entries.append((e.name, e.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue  # removed meanwhile
                        except OSError as exc:
                            self.error(comps + (e.name,), exc)
            except OSError as exc:
                self.error(comps, exc)
                return []
            return sorted(entries, key=lambda e: e[0])
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if e.name in self.mount_names and comps + (e.name,) in self.mount_types:
                        # Another mount: named, never looked at.
                        self.mounts.append((comps + (e.name,), self.mount_types[comps + (e.name,)]))
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    except OSError as exc:
                        self.error(comps + (e.name,), exc)
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        if not self._mount(comps + (e.name,), st, dev):
                            entries.append((e.name, st))
                    elif e.name in self.mount_names and self._mount(comps + (e.name,), st, dev):
                        continue
                    else:
                        totals[1] += 1
                        totals[0] += st.st_size if st.st_nlink == 1 else self._size(st)
        except OSError as exc:
            self.error(comps, exc)
        return entries

    def _visit(self, fd: int, frame: tuple, entry: tuple):
        comps, dev, through, totals, _measured = frame
        name, st = entry
        path = comps + (name,)
        if totals is not None:  # a subdirectory of one measured whole
            return self._open(fd, name, st, (path, dev, False, totals, False))
        if path in self.kept:
            return None
        if through and path not in self.through and path not in self.own_fs:
            return None
        if path in self.skipped and path not in self.through:
            self.not_walked.append((path, self.skipped[path]))
            return None
        if st is None:
            self.mounts.append((path, self.mount_types[path]))
            return None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            asked = path in self.own_fs
            child_dev = dev
            # Walked in full if asked; only on the way to what was
            # asked below a skipped path or another filesystem.
            child_through = not asked and (through or path in self.skipped)
            if self._mount(path, st, dev, name=not asked and path not in self.through):
                if not asked and path not in self.through:
                    return None
                child_through = not asked
                child_dev = st.st_dev
            if path in self.partial:
                return self._open(fd, name, st, (path, child_dev, child_through, None, False))
            return self._open(fd, name, st, (path, child_dev, False, [0, 0], True))
        if name in self.mount_names and self._mount(path, st, dev):
            return None  # a file bind-mounted there: not the root's
        kind = KIND_OF_FORMAT.get(stat.S_IFMT(mode), "other")
        self.found.append((path, kind, self._size(st), 1))
        return None

    def _open(self, fd: int, name: str, st, frame: tuple):
        """The directory name to walk next, unless it cannot be opened or
        is not the one listed (replaced meanwhile)."""
        path, _dev, _through, totals, measured = frame
        try:
            child = os.open(name, O_DIR, dir_fd=fd)
        except OSError as exc:
            # Below a directory measured whole, one removed meanwhile is no error.
            if totals is None or measured or not isinstance(exc, FileNotFoundError):
                self.error(path, exc)
            return None
        try:
            found = os.fstat(child)
            if (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino):
                return child, frame, self._entries(child, frame)
        except BaseException:
            os.close(child)
            raise
        os.close(child)
        return None

    def _leave(self, fd: int, frame: tuple, done: bool) -> None:
        path, _dev, _through, totals, measured = frame
        if done and measured and totals[1]:  # directories alone hold nothing to lose
            self.found.append((path, "dir", totals[0], totals[1]))

    def _size(self, st) -> int:
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self.seen:
                return 0
            self.seen.add(key)
        return st.st_size


def open_dir_path(tree: Tree, comps: tuple) -> int:
    """An fd of the directory root/comps, every component opened
    O_NOFOLLOW below the one before."""
    return open_dirs(os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), comps,
                     lambda depth: tree.host(comps[:depth]))


def format_size(size: int) -> str:
    """Bytes as du -h writes them, in powers of 1024."""
    value, unit = float(size), 0
    while value >= 1024 and unit < 4:
        value /= 1024
        unit += 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {'BKMGT'[unit]}iB"



# --- Actions -------------------------------------------------------------------------
#
# Every change apply makes is one action: `describe` is the line plan
# prints (and apply -v logs), `execute` makes the change through the
# executor's directory walks. Planning (below) makes the lists; the
# executor runs them, the printer only describes them.

class DirChain:
    """Open directory fds along the last path walked from the root, every
    component opened O_DIRECTORY|O_NOFOLLOW below the one before. Entries
    come sorted, so the next walk reuses the shared parents."""

    def __init__(self, root_fd: int, tree: Tree):
        self.root_fd = root_fd
        self.tree = tree
        self.path: tuple = ()        # fds[i] is the directory path[:i + 1]
        self.fds: list = []

    def truncate(self, depth: int) -> None:
        while len(self.fds) > depth:
            os.close(self.fds.pop())
        self.path = self.path[:depth]

    def open(self, comps: tuple) -> int:
        """The fd of directory comps, the chain's to close."""
        path = self.path
        if comps == path:
            return self.fds[-1] if path else self.root_fd
        depth = 0
        limit = min(len(path), len(comps))
        while depth < limit and path[depth] == comps[depth]:
            depth += 1
        self.truncate(depth)
        fds = self.fds
        try:
            fd = open_dirs(fds[-1] if depth else self.root_fd, comps[depth:],
                           lambda d: self.tree.host(comps[:depth + d]), keep=fds)
        except BaseException:
            self.path = comps[:len(fds)]
            raise
        self.path = comps
        return fd

    def owner(self, comps: tuple) -> int:
        """uid of the directory comps, opened along the walk."""
        return os.fstat(self.open(comps)).st_uid

    def push(self, name: str, fd: int) -> None:
        """Take fd, the directory just made at path + (name,)."""
        self.fds.append(fd)
        self.path += (name,)

    def forget(self, comps: tuple) -> None:
        """A mount landed on comps: fds at or below it see what it covers."""
        if self.path[:len(comps)] == comps:
            self.truncate(len(comps) - 1)


class Executor:
    """Runs actions (apply), each as it is planned; -v logs each with the
    line plan prints for it."""

    def __init__(self, tree: Tree, log: Log):
        self.tree = tree
        self.log = log
        self.unmounted: list = []  # UtabKey of each mount unmount took off
        self.root_fd = os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.sources = DirChain(self.root_fd, tree)  # walks in storage
        self.targets = DirChain(self.root_fd, tree)  # walks on the root
        self.euid = os.geteuid()
        self.clone_binds = True  # until open_tree(2) is found missing
        self.slave_clones = True  # until mount_setattr(2) is found missing
        self.utab_records: list = []  # (target, userspace options) of the binds made
        # target -> (fd of the directory a move's bind covers, what the copy
        # read): for DropMoved
        self.covered: dict = {}

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.sources.truncate(0)
        self.targets.truncate(0)
        for fd, _ in self.covered.values():
            if fd is not None:
                os.close(fd)
        os.close(self.root_fd)

    def run(self, actions: list) -> None:
        """Perform actions in order; the first that fails raises."""
        verbose = self.log.verbosity >= 2
        for action in actions:
            if verbose:
                self.log.info(action.describe(self.tree))
            action.execute(self)

    def report(self, text: str) -> None:
        self.log.error(text)

    def skip(self, storage: tuple, reason: str, count: int) -> None:
        self.log.error(f"{as_path(storage)}: {reason}; {count} entries not applied")

    def finish(self) -> bool:
        """Record the userspace options of the binds made in utab, with the
        source, fs root and mount id mountinfo gives them; whether that worked."""
        if not self.utab_records:
            return True
        mounts = self.tree.refresh_mounts()  # the binds made, with their ids
        lines = []
        for target, options in self.utab_records:
            found = mounts.points.get(self.tree.host(target))
            if found is not None:
                source, fs_root, _, mount_id = found
                lines.append(f"ID={mount_id} SRC={mangle(source)} TARGET={mangle(as_path(target))} "
                             f"ROOT={mangle(fs_root)} OPTS={mangle(','.join(options))}")
        try:
            update_utab(lines, [])
        except OSError as exc:
            self.log.error(f"{exc.filename}: cannot record mount options: {failure(exc, '').cause}")
            return False
        return True


class Printer:
    """Runs nothing (plan): keeps the line each action describes."""

    def __init__(self, tree: Tree, peek: bool = False):
        self.tree = tree
        self.lines: list = []
        self.notes: list = []  # what plan assumed, said first
        self.peek = peek  # look into the fileSystems to be mounted

    def run(self, actions: list) -> None:
        for action in actions:
            self.lines.append(action.describe(self.tree))
            if self.peek and isinstance(action, MountFilesystem):
                self.notes.append(action.peek(self.tree))

    def report(self, text: str) -> None:
        self.lines.append("fail " + text)

    def skip(self, storage: tuple, reason: str, count: int) -> None:
        self.lines.append(f"skip {count} entries of {self.tree.host(storage)}: {reason}")


def mark(fd: int) -> None:
    """Mark a mount point apply made (see MARK_TIME_NS)."""
    try:
        os.utime(fd, ns=MARK_TIMES)
    except OSError:
        pass  # unmount will then leave this mount point in place


def give_owner_and_mode(fd: int, st, uid: int, gid: int, mode: int, shown: str) -> None:
    """Owner first, mode last: until the mode is set, a directory keeps the
    0000 a next run recognises."""
    if st.st_uid != uid or st.st_gid != gid:
        call("chown", shown, os.fchown, fd, uid, gid)
    # mkdir cannot set set-id bits, and a set-gid parent passes its own.
    if mode & 0o6000 or stat.S_IMODE(st.st_mode) != mode:
        call("chmod", shown, os.fchmod, fd, mode)


def checked_stat(fd: int, want_dir: bool, shown: str):
    """fstat of fd, opened or cloned without following a link: a directory
    or a regular file as wanted, else the entry fails."""
    st = os.fstat(fd)
    if not (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "of an unexpected type"
        raise Failure(shown, f"is {kind}; not mounted")
    return st


class Action:
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class MakeDir(Action):
    """A missing directory, in storage or on the root; `mark`: a mount
    point for a kept directory."""
    __slots__ = ("path", "uid", "gid", "mode", "why", "in_storage", "mark")

    def __init__(self, path: tuple, uid: int, gid: int, mode: int, why: str, in_storage: bool,
                 mark: bool = False):
        self.path, self.uid, self.gid, self.mode = path, uid, gid, mode
        self.why, self.in_storage, self.mark = why, in_storage, mark

    def describe(self, tree: Tree) -> str:
        return f"mkdir {tree.host(self.path)} ({self.uid}:{self.gid} {format_mode(self.mode)}, {self.why})"

    def execute(self, ex: Executor) -> None:
        chain = ex.sources if self.in_storage else ex.targets
        parent = chain.open(self.path[:-1])
        name, shown = self.path[-1], ex.tree.host(self.path)
        # Made with mode 0000, then given owner and mode through its fd:
        # apply killed in between leaves an empty directory with mode 0000,
        # which the next run finishes (FinishDir), never one with the wrong
        # owner that it would keep as it is. A mount point needs none of
        # this: the bind mount covers its owner and mode.
        try:
            os.mkdir(name, self.mode & 0o1777 if self.mark else 0, dir_fd=parent)  # umask is 0
        except FileExistsError:
            raise Failure(shown, "appeared while applying; left as it is") from None
        except OSError as exc:
            raise oserror("mkdir", shown, exc.errno) from None
        fd = open_dir_at(parent, name, shown)
        try:
            st = os.fstat(fd)
            # Ours if still root-owned: whoever could swap it in its parent
            # cannot make a root-owned directory. (No nlink test: btrfs
            # directories always have one link.)
            if st.st_uid != ex.euid:
                raise Failure(shown, "was replaced while applying; not changed")
            give_owner_and_mode(fd, st, self.uid, self.gid, self.mode, shown)
            if self.mark:
                mark(fd)
        except BaseException:
            os.close(fd)
            raise
        chain.push(name, fd)


class FinishDir(Action):
    """Give an empty directory with mode 0000 its owner and mode: apply was
    killed while making it (see MakeDir)."""
    __slots__ = ("path", "uid", "gid", "mode", "in_storage")

    def __init__(self, path: tuple, uid: int, gid: int, mode: int, in_storage: bool):
        self.path, self.uid, self.gid, self.mode, self.in_storage = path, uid, gid, mode, in_storage

    def describe(self, tree: Tree) -> str:
        return (f"finish {tree.host(self.path)} ({self.uid}:{self.gid} {format_mode(self.mode)}, "
                "left with mode 0000 by an interrupted run)")

    def execute(self, ex: Executor) -> None:
        chain = ex.sources if self.in_storage else ex.targets
        parent = chain.open(self.path[:-1])
        name, shown = self.path[-1], ex.tree.host(self.path)
        fd = open_dir_at(parent, name, shown)
        try:
            st = os.fstat(fd)
            # As a killed MakeDir leaves it: empty, mode 0000, owned by us
            # or already by its owner-to-be.
            if stat.S_IMODE(st.st_mode) or st.st_uid not in (ex.euid, self.uid) or os.listdir(fd):
                raise Failure(shown, "has mode 0000 but is not a directory an interrupted run "
                                        "left unfinished; left as it is")
            give_owner_and_mode(fd, st, self.uid, self.gid, self.mode, shown)
        except BaseException:
            os.close(fd)
            raise
        chain.push(name, fd)


class WriteFile(Action):
    """A file with content, in storage (machine-id's placeholder)."""
    __slots__ = ("path", "content", "uid", "gid", "mode")

    def __init__(self, path: tuple, content: bytes, uid: int, gid: int, mode: int):
        self.path, self.content, self.uid, self.gid, self.mode = path, content, uid, gid, mode

    def describe(self, tree: Tree) -> str:
        return (f"create {tree.host(self.path)} containing {self.content.decode().strip()!r} "
                f"({self.uid}:{self.gid} {format_mode(self.mode)})")

    def execute(self, ex: Executor) -> None:
        parent = ex.sources.open(self.path[:-1])
        name, shown = self.path[-1], ex.tree.host(self.path)
        # Written under a temporary name and renamed into place complete:
        # apply killed while writing leaves no empty machine-id for the
        # next boot to take as real.
        temp = f".{name}.impermanence-new" if len(name) < 200 else name
        if temp != name:
            try:
                os.unlink(temp, dir_fd=parent)  # left by a killed run
            except OSError:
                pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with opened(call("create", shown, os.open, temp, flags, 0o600, dir_fd=parent)) as fd:
            try:
                if call("write", shown, os.write, fd, self.content) != len(self.content):
                    raise oserror("write", shown, errno.ENOSPC)
                call("chown", shown, os.fchown, fd, self.uid, self.gid)
                call("chmod", shown, os.fchmod, fd, self.mode)
                if temp != name:
                    # One atomic step: killed before it, the temporary is
                    # what the next run removes; after it, nothing is left.
                    rename_noreplace(parent, temp, parent, name, shown)
            except OSError:
                # No half-made file left behind, if the name is still ours.
                try:
                    st, mine = os.stat(temp, dir_fd=parent, follow_symlinks=False), os.fstat(fd)
                    if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                        os.unlink(temp, dir_fd=parent)
                except OSError:
                    pass
                raise


class CreateMountFile(Action):
    """An empty file on the root for a kept file's bind mount."""
    __slots__ = ("path",)

    def __init__(self, path: tuple):
        self.path = path

    def describe(self, tree: Tree) -> str:
        return f"create empty {tree.host(self.path)} (mount point)"

    def execute(self, ex: Executor) -> None:
        parent = ex.targets.open(self.path[:-1])
        shown = ex.tree.host(self.path)
        # Root-owned and 0644 as made (umask is 0); the bind mount that
        # follows covers it, so no chown or chmod.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with opened(call("create", shown, os.open, self.path[-1], flags, 0o644, dir_fd=parent)) as fd:
            mark(fd)


class RemoveEmptyFile(Action):
    """An empty file where a link goes (a stale machine-id). marked_only:
    the file lies in storage (inside a kept directory of another storage)
    and is removed only if apply made it."""
    __slots__ = ("path", "marked_only")

    def __init__(self, path: tuple, marked_only: bool = False):
        self.path, self.marked_only = path, marked_only

    def describe(self, tree: Tree) -> str:
        return f"remove empty file {tree.host(self.path)} (replaced)"

    def execute(self, ex: Executor) -> None:
        parent = ex.targets.open(self.path[:-1])
        name, shown = self.path[-1], ex.tree.host(self.path)
        with opened(call("open", shown, os.open, name, O_PATH_NOFOLLOW, dir_fd=parent)) as fd:
            st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            raise Failure(shown, "is no longer an empty file; not removed")
        if self.marked_only and st.st_mtime_ns != MARK_TIME_NS:
            raise Failure(shown, NOT_OURS_IN_STORAGE)
        call("unlink", shown, os.unlink, name, dir_fd=parent)


class Symlink(Action):
    __slots__ = ("path", "text")

    def __init__(self, path: tuple, text: str):
        self.path, self.text = path, text

    def describe(self, tree: Tree) -> str:
        return f"link {tree.host(self.path)} -> {self.text}"

    def execute(self, ex: Executor) -> None:
        parent = ex.targets.open(self.path[:-1])
        call("symlink", ex.tree.host(self.path), os.symlink, self.text, self.path[-1], dir_fd=parent)


class Bind(Action):
    """A bind mount of a kept directory or file (kind "dir" or "file")
    from storage onto its target, both opened without following a link."""
    __slots__ = ("source", "target", "kind")

    def __init__(self, source: tuple, target: tuple, kind: str):
        self.source, self.target, self.kind = source, target, kind

    def describe(self, tree: Tree) -> str:
        return f"bind {tree.host(self.source)} on {tree.host(self.target)}"

    def execute(self, ex: Executor) -> None:
        want_dir = self.kind == "dir"
        source_shown, target_shown = ex.tree.host(self.source), ex.tree.host(self.target)
        parent = ex.sources.open(self.source[:-1])
        name = self.source[-1]
        clone = None
        if ex.clone_binds:
            clone = open_tree(parent, name, OPEN_TREE_CLONE | os.O_CLOEXEC | AT_SYMLINK_NOFOLLOW,
                              source_shown)
            ex.clone_binds = clone is not None
        if clone is None:
            source_fd = call("open", source_shown, os.open, name, O_PATH_NOFOLLOW, dir_fd=parent)
        with opened(source_fd if clone is None else clone) as source_fd:
            st = checked_stat(source_fd, want_dir, source_shown)
            if not want_dir and st.st_nlink > 1:
                # A hard link planted by whoever owns the directory (say,
                # to a root-owned file elsewhere in storage) is not kept state.
                owner = ex.sources.owner(self.source[:-1])
                if st.st_uid != owner:
                    raise Failure(source_shown, hard_link_refusal(st.st_uid, owner))
            # One way: a slave of its source's peer group before it is
            # attached, so that at no moment does a mount made under it
            # reach storage (docs/behaviour.md, "Mount propagation").
            one_way = clone is not None and ex.slave_clones and slave_detached(clone, source_shown)
            if clone is not None:
                ex.slave_clones = one_way
            if want_dir:
                target_fd = ex.targets.open(self.target)
                shared = not one_way and mount_is_shared(target_fd)
                attach(source_fd, target_fd, clone is not None, target_shown)
                ex.targets.forget(self.target)
                if not one_way:
                    bound = source_fd  # the clone, attached now
                    if clone is None:
                        bound = ex.targets.open(self.target)  # the bind's root, now
                        same_node(bound, st, target_shown)
                    make_one_way(bound, shared, target_shown)
            else:
                target_parent = ex.targets.open(self.target[:-1])
                with opened(call("open", target_shown, os.open, self.target[-1], O_PATH_NOFOLLOW,
                                 dir_fd=target_parent)) as target_fd:
                    checked_stat(target_fd, False, target_shown)
                    shared = not one_way and mount_is_shared(target_fd)
                    attach(source_fd, target_fd, clone is not None, target_shown)
                if not one_way:
                    if clone is None:
                        with opened(call("open", target_shown, os.open, self.target[-1],
                                         O_PATH_NOFOLLOW, dir_fd=target_parent)) as bound:
                            same_node(bound, st, target_shown)
                            make_one_way(bound, shared, target_shown)
                    else:
                        make_one_way(source_fd, shared, target_shown)
        ex.targets.forget(self.target)


def attach(source_fd: int, target_fd: int, cloned: bool, shown: str) -> None:
    """Mount source_fd (a detached clone, or without open_tree(2) the
    source itself) onto target_fd: exactly the inodes opened, no path
    looked up again."""
    if cloned:
        move_mount(source_fd, target_fd, shown)
    else:
        mount(f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}", None, MS_BIND, None,
              shown, "bind")


def slave_detached(clone: int, shown: str) -> bool:
    """Make the detached clone a slave of its source's peer group (private
    if the source has none): it receives what is mounted in storage and
    forwards nothing there. Attached under a shared mount, the kernel then
    makes it shared in a peer group of its own, as any mount there.
    False where the kernel lacks mount_setattr(2) (Linux < 5.12) or will
    not change a detached mount: the bind is then made one-way once attached."""
    attr = bytes(16) + MS_SLAVE.to_bytes(8, sys.byteorder) + bytes(8)
    if libc().mount_setattr(clone, b"", AT_EMPTY_PATH, attr, MOUNT_ATTR_SIZE_VER0) == 0:
        return True
    err = libc().get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise oserror("bind", shown, err)


def make_one_way(bound: int, shared: bool, shown: str) -> None:
    """What slave_detached and the attach give, for kernels without
    mount_setattr(2), on the bind already attached (bound: an fd on its
    root): a slave of the source's peer group, and shared in a group of its
    own if the mount it is attached to is shared."""
    mount(None, f"/proc/self/fd/{bound}", None, MS_SLAVE, None, shown, "bind")
    if shared:
        mount(None, f"/proc/self/fd/{bound}", None, MS_SHARED, None, shown, "bind")


def mount_is_shared(fd: int) -> bool:
    """Whether the mount that fd lies on has a peer group."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return line.split()[1].decode() in MountTable().groups
    return False


class MakeOneWay(Action):
    """A bind already in place that is a peer of its storage (made by
    mount(8), or by a version whose binds were not one-way) made one-way,
    as Bind makes its binds; shared: whether the mount it is attached to is."""
    __slots__ = ("target", "kind", "shared")

    def __init__(self, target: tuple, kind: str, shared: bool):
        self.target, self.kind, self.shared = target, kind, shared

    def describe(self, tree: Tree) -> str:
        return (f"make the bind on {tree.host(self.target)} one-way (now a peer of its storage: "
                "what is mounted under it appears in storage too)")

    def execute(self, ex: Executor) -> None:
        shown = ex.tree.host(self.target)
        if self.kind == "directory":
            make_one_way(ex.targets.open(self.target), self.shared, shown)
            return
        parent = ex.targets.open(self.target[:-1])
        with opened(call("open", shown, os.open, self.target[-1], O_PATH_NOFOLLOW,
                         dir_fd=parent)) as fd:
            make_one_way(fd, self.shared, shown)


def plan_one_way(entry: Entry, tree: Tree, mounts: MountTable) -> list:
    """MakeOneWay for the entry's bind, if it is in place and two-way."""
    host = tree.host(entry.target)
    if not mounts.two_way(host, tree.host(entry.source)) or not tree.same(entry.source, entry.target):
        return []
    return [MakeOneWay(entry.target, entry.kind, mounts.parent_shared(host))]


def same_node(fd: int, st, shown: str) -> None:
    """fd, opened again at a target after the bind, is the bind's root."""
    found = os.fstat(fd)
    if (found.st_dev, found.st_ino) != (st.st_dev, st.st_ino):
        raise Failure(shown, "replaced while it was being bind-mounted")


def private_mount_namespace() -> None:
    """Move this process into a mount namespace of its own, every mount in
    it private: what it mounts then reaches no other process, and goes
    with the process. Once per process."""
    if not _private_namespace:
        if libc().unshare(CLONE_NEWNS) < 0:
            raise oserror("unshare", "mount namespace")
        mount(None, "/", None, MS_REC | MS_PRIVATE, None, "/")
        _private_namespace.append(True)


_private_namespace: list = []  # [True] once in it, then the mount points plan looks through


class MountFilesystem(Action):
    """A fileSystems entry mounted at its mount point; device and probed
    are what planning found (None: not there yet, waited for)."""
    __slots__ = ("fs", "device", "probed", "timeout")

    def __init__(self, fs: FileSystem, device: str | None, probed: str | None, timeout: float):
        self.fs, self.device, self.probed, self.timeout = fs, device, probed, timeout

    def describe(self, tree: Tree) -> str:
        fs = self.fs
        shown = f"{fs.device} ({self.device})" if self.device and self.device != fs.device else fs.device
        if self.device is None:
            shown += f" (not present now; apply waits up to {self.timeout:g} s)"
        options = ",".join(fs.options)
        return f"mount {shown} on {tree.host(fs.mountpoint)} (type {fs.fs_type}{', ' + options if options else ''})"

    def execute(self, ex: Executor) -> None:
        fs, point = self.fs, self.fs.mountpoint
        device, probed = self.device, self.probed
        if device is None:
            device, probed = wait_for_device(fs.device, self.timeout)
        parent = ex.targets.open(point[:-1])
        fs_type = self.mount_on(parent, ex.tree.host(point), device, probed, 0)
        ex.targets.forget(point)
        ex.tree.forget(point)  # its contents are the kernel's to say now
        ex.tree.refresh_mounts()
        ex.log.info(f"mounted {device} ({fs_type}) on {ex.tree.host(point)}")

    def peek(self, tree: Tree) -> str:
        """For plan, which changes nothing: mount the filesystem read-only
        in a mount namespace of this process alone, so that what it holds
        is planned from, as apply will find it; plan's note on it."""
        host = tree.host(self.fs.mountpoint)
        why = None
        if os.geteuid() != 0:
            why = "plan runs without root"
        elif self.device is None:
            why = "its device is not present now"
        else:
            try:
                private_mount_namespace()  # first: an fd opened before it is of the other namespace's mounts
                with opened(open_dir_path(tree, self.fs.mountpoint[:-1])) as parent:
                    self.mount_on(parent, host, self.device, self.probed, MS_RDONLY)
            except FileNotFoundError:
                why = "its mount point does not exist yet"
            except (Failure, OSError) as exc:
                why = failure(exc, "").cause
        if why is not None:
            return f"note {host}: not mounted and not looked into ({why}); planned as if empty"
        _private_namespace.append(host)  # unmounted when plan ends
        tree.forget(self.fs.mountpoint)
        tree.refresh_mounts()
        return (f"note {host}: not mounted; planned from what it holds, read through a private "
                f"read-only mount of {self.device}")

    def mount_on(self, parent: int, host: str, device: str, probed: str | None, extra: int) -> str:
        """Mount the filesystem on the directory named mount point's last
        component in parent, never following a link; the type it mounted as."""
        fs, point = self.fs, self.fs.mountpoint
        flags, data = split_mount_options(fs.options)
        flags |= extra
        if fs.fs_type != "auto":
            candidates = [fs.fs_type]
        elif probed == "ext4":
            candidates = ["ext4", "ext3", "ext2"]
        elif probed:
            candidates = [probed]
        else:
            candidates = kernel_filesystems()
        if len(candidates) > 1:
            flags |= MS_SILENT
        errors = []
        with opened(call("open", host, os.open, point[-1], O_PATH_NOFOLLOW, dir_fd=parent)) as fd:
            checked_stat(fd, True, host)
            for fs_type in candidates:
                try:
                    mount(device, f"/proc/self/fd/{fd}", fs_type, flags, data, host)
                except OSError as exc:
                    errors.append((fs_type, exc))
                    if exc.errno in (errno.EINVAL, errno.ENODEV, errno.ENOTBLK, errno.EIO):
                        continue  # not this type: the next one
                    break
                return fs_type
        if not errors:
            raise Failure(host, f"cannot mount {fs.device}: no filesystem type to try")
        fs_type, exc = errors[-1] if len(errors) == 1 else errors[0]
        hint = " (wrong fsType, bad option or bad superblock)" if exc.errno == errno.EINVAL else ""
        tried = ", ".join(t for t, _ in errors)
        raise Failure(host, f"cannot mount {fs.device} ({device}) as {tried}: {exc.strerror}{hint}")


# A move into storage on the running system goes through two names that
# apply recognises: the copy is made in storage under TEMP and renamed
# into place complete; on the root, ASIDE (made just before that rename,
# so that it also says the rename may have happened) then receives the
# originals, which are removed once they match the copy. A later run that
# finds TEMP discards it (the originals were not touched yet) and copies
# again; one that finds only ASIDE finishes the move.
MOVE_TEMP_SUFFIX = ".impermanence-move"
MOVE_ASIDE_SUFFIX = ".impermanence-moved"
NOT_MOVED = "not moved into storage (unmount it, or keep it apart, then apply again)"
WRITER_HINT = "left in place: stop the program that writes it, then apply again"


def move_temp(path: tuple) -> tuple:
    return path[:-1] + (f".{path[-1]}{MOVE_TEMP_SUFFIX}",)


def move_aside(path: tuple) -> tuple:
    return path[:-1] + (f".{path[-1]}{MOVE_ASIDE_SUFFIX}",)


def movable_name(path: tuple) -> bool:
    """Whether the names of the move's temporaries fit NAME_MAX."""
    return len(os.fsencode(path[-1])) + len(MOVE_ASIDE_SUFFIX) + 1 <= 255


def kept_mounts_below(tree: Tree, target: tuple, mounts: MountTable) -> frozenset:
    """The mount points below target that a move leaves where they are: the
    config's own kept paths (bound again on top of the new bind, as at
    boot). Failure naming it if target is a mount point, or if any other
    mount is below it: the move never leaves the root's own filesystem."""
    host = tree.host(target)
    found = mounts.points.get(host)
    if found is not None:
        raise Failure(host, f"is another filesystem's mount point ({found[0]}, {found[2]}); {NOT_MOVED}")
    kept: list = []
    for point in sorted(mounts.points):
        if not point.startswith(host + "/") or any(point.startswith(k + "/") for k in kept):
            continue
        if point in tree.kept:
            kept.append(point)
            continue
        source, _, fs_type, _ = mounts.points[point]
        raise Failure(host, f"holds {point}, another filesystem mounted there ({source}, {fs_type}); "
                               f"{NOT_MOVED}")
    return frozenset(kept)


def mount_id(fd: int) -> int | None:
    """The id of the mount fd was opened on: a rename succeeds only within one."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_aside(dir_fd: int, name: str, shown: str, euid: int) -> int:
    """The ASIDE directory a move made: root's, else not apply's to use."""
    fd = open_dir_at(dir_fd, name, shown)
    if os.fstat(fd).st_uid != euid:
        os.close(fd)
        raise Failure(shown, "is named as apply names a move's originals but is not apply's; "
                                "left as it is")
    return fd


class MoveIntoStorage(Action):
    """On the running system, what a target holds, which its bind mount or
    link would hide, moved into storage, which holds nothing there: for
    kind "dir" the directory's contents, for "file" the file itself. On
    one mount, renamed; across two, copied with holes, owner, mode,
    extended attributes and times into a temporary, checked unchanged and
    written by no one, then renamed into place (see MOVE_TEMP_SUFFIX). For
    "file" with `mount_file`, the original is then put aside and an empty
    mount point made in its place; DropMoved (after the bind) puts a
    directory's originals aside and removes what was put aside."""
    __slots__ = ("target", "source", "kind", "mount_file")

    def __init__(self, target: tuple, source: tuple, kind: str, mount_file: bool = False):
        self.target, self.source, self.kind, self.mount_file = target, source, kind, mount_file

    def describe(self, tree: Tree) -> str:
        what = "the contents of " if self.kind == "dir" else ""
        then = ", an empty mount point made in its place" if self.mount_file else ""
        return f"move {what}{tree.host(self.target)} into {tree.host(self.source)}{then}"

    def execute(self, ex: Executor) -> None:
        shown = ex.tree.host(self.target)
        try:
            self.move(ex, shown)
        finally:
            ex.sources.forget(self.source)  # what is there now is the copy, or nothing new
            ex.tree.forget(self.source)

    def move(self, ex: Executor, shown: str) -> None:
        tree, is_dir = ex.tree, self.kind == "dir"
        into, name = ex.sources.open(self.source[:-1]), self.source[-1]
        at, temp = ex.targets.open(self.target[:-1]), move_temp(self.source)[-1]
        aside = move_aside(self.target)
        aside_shown = tree.host(aside)
        held = open_dir_at(at, self.target[-1], shown) if is_dir else None
        try:
            aside_made = exists_at(at, aside[-1])
            if aside_made:
                with opened(open_aside(at, aside[-1], aside_shown, ex.euid)):
                    pass  # a planted one fails the entry before anything is done
            kept = kept_mounts_below(tree, self.target, tree.refresh_mounts())  # as it is now
            if aside_made and not exists_at(into, temp) and self.in_place(into, held, kept, shown):
                # Renamed into place by a run that was stopped: finish.
                if is_dir:
                    ex.covered[self.target], held = (held, None), None
                else:
                    self.put_file_aside(ex, at, aside_shown, shown)
                return
            if aside_made:
                # Made, but no rename into place followed (ASIDE goes
                # first, TEMP after it, wherever a move is undone).
                call("rmdir", aside_shown, os.rmdir, aside[-1], dir_fd=at)
            top = held if is_dir else at
            if mount_id(top) is not None and mount_id(top) == mount_id(into):
                # One mount: renames (a TEMP here holds originals: go on).
                self.rename_into_storage(ex, top, into, temp, kept, shown)
                if is_dir:  # for what a writer makes there before the bind
                    ex.covered[self.target], held = (held, {}), None
                return
            if exists_at(into, temp):
                # A copy a stopped run left; the originals were not touched.
                discard_copy(into, temp)
                if exists_at(into, temp):
                    raise Failure(tree.host(move_temp(self.source)), "cannot be removed; left as it is")
            copying = Copying(os.fstat(top).st_dev, kept)
            try:
                if is_dir:
                    call("mkdir", shown, os.mkdir, temp, 0, dir_fd=into)
                    with opened(open_dir_at(into, temp, shown)) as copy:
                        copying.note(os.fstat(held), ())
                        for child in sorted(os.listdir(held)):
                            copy_node(held, child, copy, child, f"{shown}/{child}", copying, (child,))
                        give_owner_and_mode_of(copy, into, name, shown)
                        call("fsync", shown, os.fsync, copy)
                else:
                    copy_node(at, self.target[-1], into, temp, shown, copying, (self.target[-1],))
                # Last before the rename, the quicker last: a write after
                # it is found when the originals are compared (DropMoved).
                writer = open_for_writing(copying.files)
                if writer is not None:
                    raise Failure(writer[0], f"is open for writing (process {writer[1]}); {WRITER_HINT}")
                changed = copying.changed(top, shown if is_dir else tree.host(self.target[:-1]).rstrip("/"))
                if changed is not None:
                    raise Failure(changed, f"was written while it was being moved into storage; "
                                              f"{WRITER_HINT}")
                call("mkdir", aside_shown, os.mkdir, aside[-1], 0o700, dir_fd=at)
            except BaseException:
                discard_copy(into, temp)  # storage as it was: no half-made copy left in it
                raise
            try:
                if is_dir:
                    # Over the empty source (made for this entry): one rename.
                    call("rename", shown, os.rename, temp, name, src_dir_fd=into, dst_dir_fd=into)
                else:
                    rename_noreplace(into, temp, into, name, shown)
            except BaseException:
                discard_copy(at, aside[-1])
                discard_copy(into, temp)
                raise
            ex.covered[self.target], held = (held, copying.copied()), None
            if not is_dir:
                self.put_file_aside(ex, at, aside_shown, shown)
        finally:
            if held is not None:
                os.close(held)

    def in_place(self, into: int, held: int | None, kept: frozenset, shown: str) -> bool:
        """Whether the copy is in storage: the source file exists; the
        source directory holds something, or the target nothing to move."""
        name = self.source[-1]
        if held is None:
            return exists_at(into, name)
        with opened(open_dir_at(into, name, shown)) as source:
            if os.listdir(source):
                return True
        return all(f"{shown}/{child}" in kept for child in os.listdir(held))

    def rename_into_storage(self, ex: Executor, top: int, into: int, temp: str, kept: frozenset,
                            shown: str) -> None:
        """On one mount: renames, which the data's writers follow. A
        directory's children go into TEMP (where a stopped run left some,
        it goes on), which then replaces the empty source."""
        if self.kind != "dir":
            rename_noreplace(top, self.target[-1], into, self.source[-1], shown)
            if self.mount_file:
                CreateMountFile(self.target).execute(ex)
            return
        if not exists_at(into, temp):
            call("mkdir", shown, os.mkdir, temp, 0, dir_fd=into)
        with opened(open_dir_at(into, temp, shown)) as copy:
            for child in sorted(os.listdir(top)):
                if f"{shown}/{child}" not in kept:
                    rename_noreplace(top, child, copy, child, f"{shown}/{child}")
            give_owner_and_mode_of(copy, into, self.source[-1], shown)
        call("rename", shown, os.rename, temp, self.source[-1], src_dir_fd=into, dst_dir_fd=into)
        call("fsync", shown, os.fsync, into)

    def put_file_aside(self, ex: Executor, at: int, aside_shown: str, shown: str) -> None:
        """A kept file's original into ASIDE, an empty mount point (if
        wanted) in its place; as far as a stopped run did not get."""
        name = self.target[-1]
        with opened(open_aside(at, move_aside(self.target)[-1], aside_shown, ex.euid)) as aside:
            if not exists_at(aside, name):
                rename_noreplace(at, name, aside, name, shown)
            elif exists_at(at, name) and os.stat(name, dir_fd=at, follow_symlinks=False).st_size:
                raise Failure(shown, f"was made again while it was being moved into storage; "
                                        f"{WRITER_HINT}")
        if self.mount_file and not exists_at(at, name):
            CreateMountFile(self.target).execute(ex)


class DropMoved(Action):
    """After a move and its bind: a directory's originals (through the fd
    MoveIntoStorage kept from before the bind) go into ASIDE, which is
    then removed if everything in it matches storage; if not, it is kept
    (those are writes the copy missed) and the entry fails naming it."""
    __slots__ = ("target", "source", "kind")

    def __init__(self, target: tuple, source: tuple, kind: str):
        self.target, self.source, self.kind = target, source, kind

    def describe(self, tree: Tree) -> str:
        return (f"remove the originals of {tree.host(self.target)} moved into storage, "
                f"once they match {tree.host(self.source)}")

    def execute(self, ex: Executor) -> None:
        tree = ex.tree
        aside = move_aside(self.target)
        aside_shown = tree.host(aside)
        at = ex.targets.open(self.target[:-1])
        held, copied = ex.covered.pop(self.target, (None, None))
        if not exists_at(at, aside[-1]):
            # Moved by renames (one mount): nothing was put aside, but a
            # program may have made a file there since, under the bind now.
            if held is None or not os.listdir(held):
                if held is not None:
                    os.close(held)
                return
            try:
                call("mkdir", aside_shown, os.mkdir, aside[-1], 0o700, dir_fd=at)
            except BaseException:
                os.close(held)
                raise
        try:
            with opened(open_aside(at, aside[-1], aside_shown, ex.euid)) as put:
                # The rename into place made durable before an original goes.
                call("fsync", ex.tree.host(self.source), os.fsync, ex.sources.open(self.source[:-1]))
                kept_in = ex.sources.open(self.source if self.kind == "dir" else self.source[:-1])
                if held is not None:
                    for child in sorted(os.listdir(held)):
                        try:
                            rename_noreplace(held, child, put, child, f"{aside_shown}/{child}")
                        except OSError as exc:
                            if exc.errno != errno.EBUSY:  # a kept path's mount point stays
                                raise
                for child in sorted(os.listdir(put)):
                    differs = first_difference(put, kept_in, child, f"{aside_shown}/{child}", (child,), copied)
                    if differs is not None:
                        raise Failure(differs, "was written after its move into storage began: "
                                                  "kept here with those writes; stop the program that writes "
                                                  f"it, then put it into {tree.host(self.source)} by hand")
        finally:
            if held is not None:
                os.close(held)
        discard_copy(at, aside[-1])
        if exists_at(at, aside[-1]):
            raise Failure(aside_shown, "cannot be removed; left as it is")


class Difference(Exception):
    """Ends a comparison's walk: the path found different."""


def first_difference(a_dir: int, b_dir: int | None, name: str, shown: str, where: tuple,
                     copied: dict | None) -> str | None:
    """Where an original put aside (name in a_dir; where, its names below
    the move's top) is not as the copy read it: type, size and mtime as in
    copied (the copy's reading), or, for a run that did not copy it, as
    its copy in storage (name in b_dir) has them. Its path, or None."""

    def visit(a_parent: int, b_parent: int | None, entry: tuple):
        node, path, names = entry
        a = call("lstat", path, os.stat, node, dir_fd=a_parent, follow_symlinks=False)
        if copied is not None:
            seen = copied.get(names)
        else:
            try:
                b = os.stat(node, dir_fd=b_parent, follow_symlinks=False)
            except FileNotFoundError:
                raise Difference(path) from None
            seen = (stat.S_IFMT(b.st_mode), b.st_size, b.st_mtime_ns)
        if seen is None or seen[0] != stat.S_IFMT(a.st_mode):
            raise Difference(path)  # made after the copy, or replaced
        if not stat.S_ISDIR(a.st_mode):
            if seen[1:] == (a.st_size, a.st_mtime_ns):
                return None
            # Storage may keep coarser times than the root (whole seconds on
            # ext4 with 128-byte inodes, two on vfat): against storage, the
            # same bytes are the same file.
            if copied is None and seen[1] == a.st_size and same_bytes(a_parent, b_parent, node, a.st_mode, path):
                return None
            raise Difference(path)
        ad = open_dir_at(a_parent, node, path)
        bd = None
        try:
            bd = open_dir_at(b_parent, node, path) if copied is None else None
            return ad, bd, [(child, f"{path}/{child}", names + (child,)) for child in sorted(os.listdir(ad))]
        except BaseException:
            os.close(ad)
            if bd is not None:
                os.close(bd)
            raise

    def leave(_ad: int, bd: int | None, _done: bool) -> None:
        if bd is not None:
            os.close(bd)

    try:
        walk_tree(a_dir, b_dir, [(name, shown, where)], visit, leave)
    except Difference as found:
        return found.args[0]
    return None


def same_bytes(a_dir: int, b_dir: int, name: str, mode: int, shown: str) -> bool:
    """Whether name holds the same bytes (a file's content, a link's text)
    in both directories; other kinds hold none."""
    if stat.S_ISLNK(mode):
        return os.readlink(name, dir_fd=a_dir) == os.readlink(name, dir_fd=b_dir)
    if not stat.S_ISREG(mode):
        return True
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with opened(call("open", shown, os.open, name, flags, dir_fd=a_dir)) as a, \
            opened(call("open", shown, os.open, name, flags, dir_fd=b_dir)) as b:
        while True:
            chunk = os.read(a, 1 << 20)
            if chunk != os.read(b, 1 << 20):
                return False
            if not chunk:
                return True


class Copying:
    """One move's copy: the filesystem it stays on, the kept mount points it
    leaves alone, and what it read of each node (to see a write after)."""
    __slots__ = ("dev", "kept", "read", "files")

    def __init__(self, dev: int, kept: frozenset):
        self.dev, self.kept = dev, kept
        self.read: list = []    # (names below the move's top, (type, size, mtime, ctime)) in walk order
        self.files: set = set()  # paths of the regular files copied

    def note(self, st, where: tuple) -> None:
        self.read.append((where, (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns)))

    def copied(self) -> dict:
        """names below the top -> (type, size, mtime) as the copy read them."""
        return {where: seen[:3] for where, seen in self.read}

    def changed(self, top: int, top_shown: str) -> str | None:
        """The first node (path) whose size, mtime or ctime is not what was
        read: a write during the copy, which the copy may have missed."""
        chain: list = []  # (name, fd) down to the directory of the node looked at
        try:
            for where, seen in self.read:
                if not where:
                    st = os.fstat(top)
                else:
                    depth = 0
                    while depth < len(chain) and depth < len(where) - 1 and chain[depth][0] == where[depth]:
                        depth += 1
                    while len(chain) > depth:
                        os.close(chain.pop()[1])
                    try:
                        while len(chain) < len(where) - 1:
                            parent = chain[-1][1] if chain else top
                            chain.append((where[len(chain)], os.open(where[len(chain)], O_DIR, dir_fd=parent)))
                        st = os.stat(where[-1], dir_fd=chain[-1][1] if chain else top, follow_symlinks=False)
                    except OSError:
                        return top_shown + "/" + "/".join(where)
                if (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ctime_ns) != seen:
                    return top_shown + "/" + "/".join(where) if where else top_shown
            return None
        finally:
            for _, fd in chain:
                os.close(fd)


def open_for_writing(paths: set) -> tuple | None:
    """(path, pid) of one of paths that a process holds open for writing,
    from /proc/*/fd (None where /proc is not mounted)."""
    if not paths:
        return None
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to see
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") not in paths:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    for line in f:
                        if line.startswith(b"flags:") and int(line.split()[1], 8) & 3:
                            return os.readlink(f"/proc/{pid}/fd/{fd}"), int(pid)
            except (OSError, ValueError, IndexError):
                continue
    return None


def give_owner_and_mode_of(copy: int, dir_fd: int, name: str, shown: str) -> None:
    """The copy of a directory's contents gets the owner and mode of the
    source it replaces (made for the entry, as configured)."""
    st = call("stat", shown, os.stat, name, dir_fd=dir_fd, follow_symlinks=False)
    call("chown", shown, os.fchown, copy, st.st_uid, st.st_gid)
    call("chmod", shown, os.fchmod, copy, stat.S_IMODE(st.st_mode))


def copy_node(old_dir: int, name: str, new_dir: int, new: str, shown: str, copying: Copying,
              where: tuple) -> None:
    """Copy what is at name (never following a link, never entering
    another mount) to new, with its owner, mode, extended attributes and
    times; a directory with all it holds (its own attributes once it is
    complete), a regular file with its holes."""
    walk_tree(old_dir, (new_dir, None, shown), [(name, new, shown, where)],
              lambda fd, into, entry: copy_one(fd, into[0], *entry, copying), copied_dir)


def copy_one(old_dir: int, new_dir: int, name: str, new: str, shown: str, where: tuple,
             copying: Copying):
    """copy_node's step for one node: made, unless it is a directory: then
    made empty and, for walk_tree to fill, (its fd, (the copy's fd, its
    stat, shown), its children)."""
    if shown in copying.kept:
        return None  # the config's own kept path: stays in its storage
    st = call("lstat", shown, os.stat, name, dir_fd=old_dir, follow_symlinks=False)
    kind = stat.S_IFMT(st.st_mode)
    if st.st_dev != copying.dev:
        raise Failure(shown, f"is on another filesystem (mounted there meanwhile); {NOT_MOVED}")
    if kind == stat.S_IFLNK:
        copying.note(st, where)
        call("symlink", shown, os.symlink, os.readlink(name, dir_fd=old_dir), new, dir_fd=new_dir)
        call("chown", shown, os.chown, new, st.st_uid, st.st_gid, dir_fd=new_dir, follow_symlinks=False)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=new_dir, follow_symlinks=False)
        return None
    if kind == stat.S_IFDIR:
        source = open_dir_at(old_dir, name, shown)
        copy = None
        try:
            st = os.fstat(source)
            if st.st_dev != copying.dev:
                raise Failure(shown, f"is on another filesystem (mounted there meanwhile); {NOT_MOVED}")
            copying.note(st, where)
            call("mkdir", shown, os.mkdir, new, 0, dir_fd=new_dir)  # root's alone until it is complete
            copy = open_dir_at(new_dir, new, shown)
            children = [(child, child, f"{shown}/{child}", where + (child,))
                        for child in sorted(os.listdir(source))]
        except BaseException:
            os.close(source)
            if copy is not None:
                os.close(copy)
            raise
        return source, (copy, st, shown), children
    if kind != stat.S_IFREG:
        # A FIFO, device or socket: made anew in a directory that is root's
        # alone until its copy is complete, so changed by name (chmod by an
        # fd cannot be had without opening the node).
        copying.note(st, where)
        call("mknod", shown, os.mknod, new, kind | 0o600, st.st_rdev, dir_fd=new_dir)
        call("chown", shown, os.chown, new, st.st_uid, st.st_gid, dir_fd=new_dir, follow_symlinks=False)
        call("chmod", shown, os.chmod, new, stat.S_IMODE(st.st_mode), dir_fd=new_dir)
        os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=new_dir, follow_symlinks=False)
        return None
    read_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    write_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with opened(call("open", shown, os.open, name, read_flags, dir_fd=old_dir)) as source, \
            opened(call("create", shown, os.open, new, write_flags, 0o600, dir_fd=new_dir)) as copy:
        st = os.fstat(source)
        if not stat.S_ISREG(st.st_mode):
            raise Failure(shown, "was replaced while moving it; left as it is")
        copying.note(st, where)
        copying.files.add(shown)
        copy_data(source, copy, st.st_size, shown)
        give_attributes(source, copy, st, shown)
        call("fsync", shown, os.fsync, copy)
    return None


def copied_dir(source: int, copied: tuple, done: bool) -> None:
    """A directory's copy, once all it holds is copied: its attributes
    from source, made durable."""
    copy, st, shown = copied
    try:
        if done:
            give_attributes(source, copy, st, shown)
            call("fsync", shown, os.fsync, copy)
    finally:
        os.close(copy)


def copy_data(source: int, copy: int, size: int, shown: str) -> None:
    """The first size bytes of source to copy, its holes left holes."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
            end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # a hole up to the end
            if exc.errno != errno.EINVAL:
                raise oserror("lseek", shown, exc.errno) from None
            start, end = offset, size  # no holes known here
        os.lseek(source, start, os.SEEK_SET)
        os.lseek(copy, start, os.SEEK_SET)
        while start < end:
            chunk = call("read", shown, os.read, source, min(1 << 20, end - start))
            if not chunk:
                break  # shorter now: the check after the copy finds out
            view = memoryview(chunk)
            while view:
                view = view[call("write", shown, os.write, copy, view):]
            start += len(chunk)
        offset = max(end, offset + 1)
    call("truncate", shown, os.ftruncate, copy, size)


def give_attributes(source: int, copy: int, st, shown: str) -> None:
    """Owner, then mode (chown clears set-id bits), then extended
    attributes (chown clears security.capability), times last: source to
    copy, both fds."""
    call("chown", shown, os.fchown, copy, st.st_uid, st.st_gid)
    call("chmod", shown, os.fchmod, copy, stat.S_IMODE(st.st_mode))
    for attribute in call("listxattr", shown, os.listxattr, source):
        call("setxattr", shown, os.setxattr, copy, attribute, os.getxattr(source, attribute))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))


def discard_copy(dir_fd: int, name: str) -> None:
    """Remove what a failed copy_node made at name, a directory with all it
    holds, as far as it can; with one fd per level open (the copy held
    two), so a tree whose copy ran out of fds is still removed, and never
    below another filesystem. Errors are left for the copy's own to tell."""

    def visit(parent: int, made: tuple, entry: str):
        if not stat.S_ISDIR(os.stat(entry, dir_fd=parent, follow_symlinks=False).st_mode):
            os.unlink(entry, dir_fd=parent)
            return None
        fd = os.open(entry, O_DIR, dir_fd=parent)
        try:
            if os.fstat(fd).st_dev != made[2]:
                raise OSError(errno.EXDEV, "another filesystem is mounted there")
            return fd, (parent, entry, made[2]), os.listdir(fd)
        except BaseException:
            os.close(fd)
            raise

    def leave(_fd: int, made: tuple, done: bool) -> None:
        if done:
            os.rmdir(made[1], dir_fd=made[0])

    try:
        walk_tree(dir_fd, (None, None, os.fstat(dir_fd).st_dev), [name], visit, leave)
    except OSError:
        pass


class RecordMountOptions(Action):
    """A bind mount's userspace options, for libmount's utab; written for
    all such mounts at once, when apply ends (see Executor.finish)."""
    __slots__ = ("target", "options")

    def __init__(self, target: tuple, options: tuple):
        self.target, self.options = target, options

    def describe(self, tree: Tree) -> str:
        return f"record {','.join(self.options)} for {tree.host(self.target)} in {utab_path()}"

    def execute(self, ex: Executor) -> None:
        ex.utab_records.append((self.target, self.options))


class Fail(Action):
    """Planning found what this entry must not touch (a Refused, or a
    failure of the planning itself): the entry stops here."""
    __slots__ = ("path", "cause")

    def __init__(self, path: str, cause: str):
        self.path, self.cause = path, cause

    def describe(self, tree: Tree) -> str:
        return f"fail {self.path}: {self.cause}"

    def execute(self, ex: Executor) -> None:
        raise Failure(self.path, self.cause)


# --- Planning ------------------------------------------------------------------------
#
# The tree records every planned action, so each list is computed as if
# the actions before it had run: `plan` prints them all, apply runs each
# list as soon as it is made.

NOT_OURS_IN_STORAGE = ("is an empty file in a kept directory of another storage that apply did not "
                       "make; not replaced by a link")


def make_dir(actions: list, tree: Tree, path: tuple, uid: int, gid: int, mode: int, why: str,
             in_storage: bool, mark: bool = False) -> None:
    """Plan making the directory at path with this owner and mode."""
    actions.append(MakeDir(path, uid, gid, mode, why, in_storage, mark))
    tree.record(path, Node("dir", uid, gid, mode, 0, None, None, None))


def finish_dir(actions: list, tree: Tree, path: tuple, node: Node, uid: int, gid: int,
               mode: int, in_storage: bool) -> None:
    """Plan giving the directory at path, found with mode 0000 (maybe one
    an interrupted run did not finish), its owner and mode."""
    if (node.uid, node.gid, node.mode) != (uid, gid, mode):
        actions.append(FinishDir(path, uid, gid, mode, in_storage))
        tree.record(path, Node("dir", uid, gid, mode, 0, node.dev, node.ino, None))


def plan_root_dirs(path: tuple, first: int, why: str, tree: Tree) -> list:
    """Making every missing directory of path from depth `first` on,
    root:root 0755: a mount point of fileSystems, a storage path."""
    actions: list = []
    for depth in range(first, len(path) + 1):
        node = tree.look(path[:depth])
        if node is None:
            make_dir(actions, tree, path[:depth], 0, 0, 0o755, why, False)
        elif node.kind != "dir":
            raise Failure(tree.host(path[:depth]), f"is {describe_kind(node)}, not a directory")
    return actions


def plan_filesystem(fs: FileSystem, tree: Tree, mounts: MountTable, timeout: float,
                    log: Log) -> list:
    """Mounting one fileSystems entry: its mount point, then the mount;
    nothing if something is mounted there already (stage 1 did)."""
    host = tree.host(fs.mountpoint)
    node = tree.look(fs.mountpoint)
    if node is not None and node.kind == "dir" and mounts.is_mountpoint(host):
        log.info(f"{host}: already a mount point; used as it is")
        return []
    actions = plan_root_dirs(fs.mountpoint, 1, "mount point", tree)
    device, probed = lookup_device(fs.device)
    actions.append(MountFilesystem(fs, device, probed, timeout))
    actions.append(RecordMountOptions(fs.mountpoint, (MOUNTED_OPTION,)))
    # Until it is mounted, what it holds is unknown: planned as if empty.
    tree.record(fs.mountpoint, Node("dir", 0, 0, 0o755, 0, None, None, None))
    return actions


# What systemd's DynamicUser= and StateDirectory= require to be root's and
# 0700: made so when an entry inside one makes it.
PRIVATE_DIRS = {("var", "lib", "private"), ("var", "cache", "private"), ("var", "log", "private")}
PRIVATE_PERMS = Perms("root", "root", 0o700)


def source_parent_perms(entry: Entry, path: tuple) -> Perms:
    """Owner and mode for a missing parent of a source (path includes storage)."""
    if entry.kind == "file" and entry.parent_perms is not None and path == entry.source[:-1]:
        return entry.parent_perms
    if path[len(entry.storage):] in PRIVATE_DIRS:
        return PRIVATE_PERMS
    if entry.home is not None:
        home, user, home_mode = entry.home
        rel = path[len(entry.storage):]
        if rel == home:
            return Perms(user, None, home_mode)
        if is_under(rel, home):
            return Perms(user, None, 0o755)
    return ROOT_PERMS


def link_text(entry: Entry) -> str:
    """Where a link points: the source as the booted system will see it."""
    return as_path(entry.source)


def fuse_refusal(tree: Tree, entry: Entry) -> tuple | None:
    """(path, cause) when the entry's target or source lies on a FUSE
    mount: never looked at, nor into; None otherwise."""
    fuse = tree.mounts.fuse_below(tree.root)
    for path in (entry.target, entry.source) if fuse else ():
        for depth in range(1, len(path) + 1):
            if path[:depth] in fuse:
                fs_type, source = fuse[path[:depth]]
                return path[:depth], (f"is a {fs_type} mount ({source}), not apply's; "
                                      "left as it is, not looked into")
    return None


def placement(entry: Entry, tree: Tree) -> str | None:
    """Whether and how the entry is in place, on the system as it is (and
    as the actions planned before leave it): the one answer planning,
    status and unmount give.
      inside   a file in a kept directory of its storage, bound already:
               the target is the source
      linked   the target is the link apply makes
      mounted  the target shows the source (a bind, or the same path)
    None when it is not in place."""
    source, target = entry.source, entry.target
    if entry.kind == "file" and tree.same(source[:-1], target[:-1]):
        return "inside"
    node = tree.look(target)
    if node is None:
        return None
    if entry.kind == "file" and node.kind == "link":
        return "linked" if node.link == link_text(entry) else None
    if node.kind == ("dir" if entry.kind == "directory" else "file") and tree.same(source, target):
        return "mounted"
    return None


def plan_entry(entry: Entry, tree: Tree, accounts: Accounts) -> list:
    """The actions that put one entry in place, given the tree as it is
    now (and as the actions planned before it leave it)."""
    actions: list = []
    tree.enter(entry.target)
    on_fuse = fuse_refusal(tree, entry)
    if on_fuse is not None:
        return [Fail(tree.host(on_fuse[0]), on_fuse[1])]
    for path in (entry.source, entry.target):
        if len(os.fsencode(tree.host(path))) >= PATH_MAX:
            # The lookups of its parents would each fail alike, after a
            # walk that grows with the square of its depth.
            return [Fail(tree.host(path), f"is longer than the {PATH_MAX - 1} bytes a path may have")]
    try:
        source_exists = plan_source(entry, tree, accounts, actions)
        plan_target_parents(entry, tree, actions)
        if entry.kind == "directory":
            plan_directory_target(entry, tree, actions)
        else:
            plan_file_target(entry, tree, actions, source_exists)
    except Refused as refused:
        actions.append(Fail(refused.path, refused.cause))
    return actions


def plan_source(entry: Entry, tree: Tree, accounts: Accounts, actions: list) -> bool:
    """Storage side: the source's parents, then the source itself; whether
    the source exists once these have run."""
    source, storage = entry.source, entry.storage
    parents = () if tree.known_dir(source[:-1]) else range(len(storage) + 1, len(source))
    for depth in parents:
        path = source[:depth]
        node = tree.look(path)
        if node is not None and node.kind != "dir":
            raise Refused(tree.host(path), f"is {describe_kind(node)}, not a directory")
        if node is None or node.mode == 0:
            perms = accounts.kept_dir_perms(path) or source_parent_perms(entry, path)
            uid, gid, mode = accounts.resolve(perms, storage)
            if node is None:
                make_dir(actions, tree, path, uid, gid, mode, "storage parent", True)
            else:
                finish_dir(actions, tree, path, node, uid, gid, mode, True)
    node = tree.look(source)
    if entry.kind == "directory":
        if node is not None and node.kind != "dir":
            raise Refused(tree.host(source), f"source is {describe_kind(node)}, not a directory")
        if node is None or node.mode == 0:
            uid, gid, mode = accounts.resolve(entry.perms, storage)
            if node is None:
                make_dir(actions, tree, source, uid, gid, mode, "kept directory", True)
            else:
                finish_dir(actions, tree, source, node, uid, gid, mode, True)
        return True
    if node is not None and node.kind != "file":
        raise Refused(tree.host(source), f"source is {describe_kind(node)}, not a regular file")
    if node is not None and node.nlink > 1 and entry.method == "auto":
        # Checked again when binding; here too, so that nothing is made
        # on the root for a source that will be refused.
        folder = tree.look(source[:-1])
        if folder is not None and folder.uid != node.uid:
            raise Refused(tree.host(source), hard_link_refusal(node.uid, folder.uid))
    if node is None and entry.target == MACHINE_ID and entry.method == "auto":
        # systemd commits a real id into storage on first boot.
        actions.append(WriteFile(source, b"uninitialized\n", 0, 0, 0o444))
        tree.record(source, Node("file", 0, 0, 0o444, 14, None, None, None))
        return True
    return node is not None


def plan_target_parents(entry: Entry, tree: Tree, actions: list) -> None:
    """Root side: the target's parents mirror their counterparts in storage."""
    target, storage = entry.target, entry.storage
    for depth in () if tree.known_dir(target[:-1]) else range(1, len(target)):
        path = target[:depth]
        node = tree.look(path)
        if node is not None and node.kind != "dir":
            raise Refused(tree.host(path), f"is {describe_kind(node)}, not a directory")
        if node is None or node.mode == 0:
            twin = tree.look(storage + path)
            if twin is None or twin.kind != "dir":
                if node is None:
                    raise Refused(tree.host(storage + path), "missing in storage; cannot mirror it")
            elif node is None:
                make_dir(actions, tree, path, twin.uid, twin.gid, twin.mode, "as in storage", False)
            else:
                finish_dir(actions, tree, path, node, twin.uid, twin.gid, twin.mode, False)


def plan_directory_target(entry: Entry, tree: Tree, actions: list) -> None:
    """A kept directory's mount point, then its bind mount."""
    source, target = entry.source, entry.target
    node = tree.look(target)
    if node is None:
        twin = tree.look(source)
        make_dir(actions, tree, target, twin.uid, twin.gid, twin.mode, "mount point", False, mark=True)
    elif node.kind != "dir":
        raise Refused(tree.host(target), f"target is {describe_kind(node)}, not a directory; left as it is")
    elif placement(entry, tree) == "mounted":
        # Mounted by an earlier run: what lies below is the source's, as
        # for a bind made now (a kept directory nested in this one is then
        # found already in place, not made twice).
        tree.record_bind(source, target)
        if tree.root == "/" and moved_aside(tree, target):
            actions.append(DropMoved(target, source, "dir"))  # a move a stopped run did not finish
        return
    moving = node is not None and tree.root == "/" and plan_directory_move(tree, source, target)
    if moving:
        actions.append(MoveIntoStorage(target, source, "dir"))
    actions.append(Bind(source, target, "dir"))
    if entry.options:
        actions.append(RecordMountOptions(target, entry.options))
    if moving:
        actions.append(DropMoved(target, source, "dir"))
    tree.record_bind(source, target)


def moved_aside(tree: Tree, target: tuple) -> bool:
    """Whether a move of target was renamed into place, by a run that then
    stopped (ASIDE is there, TEMP is not), or is to be finished."""
    node = tree.look(move_aside(target))
    return node is not None and node.kind == "dir" and node.uid == 0


def planned_kept_mounts(tree: Tree, target: tuple) -> frozenset:
    """kept_mounts_below, its refusal the entry's (Refused)."""
    try:
        return kept_mounts_below(tree, target, tree.mounts)
    except Failure as exc:
        raise Refused(tree.host(target), exc.cause) from None


def plan_directory_move(tree: Tree, source: tuple, target: tuple) -> bool:
    """Whether the running system's data in target, which the mount would
    hide, is to be moved into storage (only if storage has nothing there;
    a freshly wiped root at boot holds nothing worth keeping). Refused for
    a target that is a mount point or has another mount inside."""
    temp = tree.look(move_temp(source))
    if temp is None and moved_aside(tree, target):
        return True  # renamed into place by a run that stopped: finished now
    if temp is not None and temp.dev == tree.look(target).dev and not held_names(tree, source):
        return True  # renames into TEMP on one filesystem, which a run that stopped began
    if tree.look(target).dev != tree.look(target[:-1]).dev:
        planned_kept_mounts(tree, target)  # another filesystem's mount point: refused, not entered
    names = held_names(tree, target)
    if not names:
        return False
    if not movable_name(target):
        raise Refused(tree.host(target), "has a name too long to move into storage under a temporary name; "
                              "move it by hand")
    kept = planned_kept_mounts(tree, target)
    if all(f"{tree.host(target)}/{name}" in kept for name in names):
        return False  # only the config's own kept paths, bound again on top
    if source not in tree.created and held_names(tree, source):
        raise Refused(tree.host(target), f"holds data, and so does {tree.host(source)} in storage; "
                              "left as they are (move one away, then apply again)")
    return True


def plan_file_target(entry: Entry, tree: Tree, actions: list, source_exists: bool) -> None:
    """A kept file: a link to its source, or an empty mount point and a
    bind mount."""
    source, target = entry.source, entry.target
    placed = placement(entry, tree)
    if placed == "inside":
        # Inside a kept directory of the same storage, bound already: the
        # target is the source, in place as it is (and created in storage
        # by whoever writes it first). A link there would point to itself.
        return
    node = tree.look(target)
    wanted_link = link_text(entry)
    finishing = (tree.root == "/" and source_exists and moved_aside(tree, target)
                 and tree.look(move_temp(source)) is None)
    if placed == "linked":
        if finishing:
            actions.append(DropMoved(target, source, "file"))
        return  # linked by an earlier run (for auto: while the source was missing)
    if finishing and placed == "mounted":
        actions.append(DropMoved(target, source, "file"))
        return
    if finishing or (tree.root == "/" and not source_exists and node is not None and node.kind == "file"
                     and node.size != 0):
        # The running system's file, which the link or mount would hide:
        # into storage, which has none, and kept from there (or the rest of
        # such a move, which a run that stopped renamed into place).
        if not finishing:
            if not movable_name(target):
                raise Refused(tree.host(target), "has a name too long to move into storage under a temporary "
                                      "name; move it by hand")
            planned_kept_mounts(tree, target)
        actions.append(MoveIntoStorage(target, source, "file", entry.method != "symlink"))
        if not finishing:
            tree.record(source, Node("file", node.uid, node.gid, node.mode, node.size, None, None, None))
        if entry.method == "symlink":
            actions.append(Symlink(target, wanted_link))
            tree.record(target, Node("link", 0, 0, 0o777, 0, None, None, wanted_link))
        else:
            actions.append(Bind(source, target, "file"))
            tree.record(target, Node("file", 0, 0, 0o644, 0, None, None, None))
            tree.record_bind(source, target)
        actions.append(DropMoved(target, source, "file"))
        return
    if entry.method == "symlink" or not source_exists:
        if node is None:
            pass
        elif node.kind == "file" and node.size == 0:
            # On the root, an empty file is replaced (a stale machine-id).
            # Inside a kept directory of another storage it is that
            # storage's: replaced only if apply made it (its mark).
            in_storage = bool(tree.binds) and tree.translate(target[:-1]) != target[:-1]
            if in_storage and os.lstat(tree.host(target)).st_mtime_ns != MARK_TIME_NS:
                raise Refused(tree.host(target), NOT_OURS_IN_STORAGE)
            actions.append(RemoveEmptyFile(target, in_storage))
        else:
            raise Refused(tree.host(target), f"target is {describe_kind(node)}; not replaced by a link")
        actions.append(Symlink(target, wanted_link))
        tree.record(target, Node("link", 0, 0, 0o777, 0, None, None, wanted_link))
        return
    if node is None:
        actions.append(CreateMountFile(target))
        tree.record(target, Node("file", 0, 0, 0o644, 0, None, None, None))
    elif node.kind != "file":
        raise Refused(tree.host(target), f"target is {describe_kind(node)}; left as it is")
    elif placed == "mounted":
        return
    elif node.size != 0:
        raise Refused(tree.host(target), "target exists and is not empty; not overwritten"
                      + (f" (and {tree.host(source)} in storage is not either)" if tree.root == "/" else ""))
    actions.append(Bind(source, target, "file"))
    tree.record_bind(source, target)


def held_names(tree: Tree, comps: tuple) -> list:
    """What the real directory at comps holds (read-only: only asked where
    the walk to it found real directories)."""
    return os.listdir(tree.host(comps))


def hard_link_refusal(file_uid: int, folder_uid: int) -> str:
    """A hard link planted by whoever owns the directory (say, to a
    root-owned file elsewhere in storage) is not kept state."""
    return f"is a hard link to a file of uid {file_uid} in a directory of uid {folder_uid}; not mounted"


def describe_kind(node: Node) -> str:
    if node.kind == "link":
        return f"a symbolic link to {node.link}" if node.link else "a symbolic link"
    if node.kind == "file":
        return "a non-empty file" if node.size else "an empty file"
    return {"dir": "a directory", "other": "a special file (device, FIFO or socket)"}[node.kind]


# --- Commands ---------------------------------------------------------------------------

def covering_filesystem(config: Config, storage: tuple) -> FileSystem | None:
    best = None
    for fs in config.filesystems:
        if is_under(storage, fs.mountpoint) and (best is None or len(fs.mountpoint) > len(best.mountpoint)):
            best = fs
    return best


USABLE = ("mounted", "not-a-mount-point")


def storage_state(config: Config, tree: Tree, mounts: MountTable, storage: tuple) -> tuple:
    """(state, detail) of a storage on the system as it is now, the one
    answer status, orphans, save and unmount's dry run give:
      mounted            a filesystem is mounted there, or on the
                         fileSystems entry holding it
      not-a-mount-point  a plain directory, no fileSystems entry holds it:
                         used as it is (the data lives where it lies)
      not-mounted        the fileSystems entry holding it is not mounted:
                         apply mounts it; until then nothing is kept
      unavailable        missing, or not a directory
    The first two are usable (USABLE)."""
    fs = covering_filesystem(config, storage)
    if fs is not None:
        point = tree.host(fs.mountpoint)
        if not mounts.is_mountpoint(point):
            return "not-mounted", f"not mounted ({fs.device} at {point})"
    try:
        node = tree.look(storage)
    except Failure as exc:
        return "unavailable", f"{exc.path} {exc.cause}"
    if node is None:
        return "unavailable", "missing"
    if node.kind != "dir":
        return "unavailable", f"is {describe_kind(node)}"
    host = tree.host(storage)
    if fs is not None or mounts.is_mountpoint(host):
        return "mounted", "from " + mounts.points[tree.host(fs.mountpoint) if fs else host][0]
    return "not-a-mount-point", "a plain directory"


def prepare_storage(config: Config, tree: Tree, runner, log: Log) -> dict:
    """Mount the fileSystems and make every storage path usable, through
    runner (apply's Executor, plan's Printer). Returns storage -> None if
    usable, else the reason it is not."""
    unavailable: dict = {}  # fileSystems mount point -> why it is not mounted
    for fs in sorted(config.filesystems, key=lambda f: f.mountpoint):
        failed = run_planned(tree, runner, fs.mountpoint, lambda: plan_filesystem(
            fs, tree, tree.mounts, config.device_timeout, log))
        if failed is not None:  # the other locations still apply
            unavailable[fs.mountpoint] = failed.cause
    state: dict = {}
    root_dev = os.stat(tree.root).st_dev
    for storage in config.storages:
        fs = covering_filesystem(config, storage)
        if fs is not None and fs.mountpoint in unavailable:
            state[storage] = f"storage unavailable: {unavailable[fs.mountpoint]}"
            continue
        try:
            node = tree.look(storage)
        except Exception as exc:
            state[storage] = failure(exc, "").cause
            continue
        if node is None and fs is not None and fs.mountpoint != storage:
            # Inside a persistent filesystem: made once it is mounted.
            failed = run_planned(tree, runner, None, lambda: plan_root_dirs(
                storage, len(fs.mountpoint) + 1, "storage path", tree))
            if failed is not None:
                state[storage] = failed.cause
                continue
            node = tree.look(storage)
        if node is None:
            state[storage] = "storage path does not exist (and no fileSystems entry mounts it)"
        elif node.kind != "dir":
            state[storage] = f"storage path is {describe_kind(node)}"
        else:
            state[storage] = None
            if fs is None and node.dev == root_dev:
                log.warn(f"{tree.host(storage)}: not a mount point; kept data would live on the "
                         "root filesystem")
    return state


def run_planned(tree: Tree, runner, shown: tuple | None, plan) -> Failure | None:
    """Plan one part of the work (a filesystem, a storage path, an entry)
    and run it through runner; what it planned stays in the tree's record
    if it ran, and is forgotten if it failed (the real tree is then the
    truth for the next part). The failure, reported through runner when
    shown names its path (None: the caller reports it), or None."""
    ok = False
    try:
        runner.run(plan())
        ok = True
    except Exception as exc:  # expected failures, and bugs: the other parts still run
        failed = failure(exc, "" if shown is None else tree.host(shown))
        if shown is not None:
            runner.report(str(failed))
        return failed
    finally:
        tree.settle(ok)
    return None


def run_entries(entries: list, tree: Tree, accounts: Accounts, runner) -> int:
    """Plan and run each entry in turn; the number that failed."""
    mounts = tree.mounts
    return sum(run_planned(tree, runner, entry.target, lambda: plan_one_way(entry, tree, mounts)
                           + plan_entry(entry, tree, accounts)) is not None
               for entry in entries)


def apply_config(config: Config, tree: Tree, runner, log: Log) -> tuple:
    """Storage first, then every entry whose storage is usable, through
    runner: (entries that failed, entries skipped for their storage)."""
    state = prepare_storage(config, tree, runner, log)
    tree.kept = frozenset(tree.host(entry.target) for entry in config.entries)
    accounts = Accounts(config, tree, [s for s, why in state.items() if why is None])
    usable, skipped = [], {}
    for entry in config.entries:
        if state[entry.storage] is None:
            usable.append(entry)
        else:
            skipped[entry.storage] = skipped.get(entry.storage, 0) + 1
    for storage, count in skipped.items():
        runner.skip(storage, state[storage], count)
    return run_entries(usable, tree, accounts, runner), sum(skipped.values())


LOCK_NB = 4
LOCK_WAIT = 60.0  # seconds a second apply or unmount of a root waits for the first
LOCK_DIR = "/run"


class Busy(Exception):
    """Another apply or unmount of the same root holds its lock."""


def lock_root(root: str, log: Log) -> int:
    """Hold, for the rest of this process, the lock that lets one apply or
    unmount of this root run at a time (two at once could stack binds):
    an flock on /run/impermanence-boot.<dev>.<inode>.lock, named by the
    root's device and inode. Without a /run to write in, the root
    directory itself is locked. Waits up to $IMPERMANENCE_LOCK_WAIT
    seconds (default LOCK_WAIT), then raises Busy."""
    st = os.stat(root)
    path = f"{LOCK_DIR}/impermanence-boot.{st.st_dev}.{st.st_ino}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.info(f"{path}: {failure(exc, '').cause}; locking {root} itself")
        path, fd = root, os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        wait = float(os.environ.get("IMPERMANENCE_LOCK_WAIT") or LOCK_WAIT)
    except ValueError:
        wait = LOCK_WAIT
    err = wait_for_flock(fd, wait)
    if err == errno.EWOULDBLOCK:
        os.close(fd)
        raise Busy(f"{root}: another apply or unmount of this root is running (lock {path}, "
                   f"waited {wait:g} s); run again when it has finished")
    if err:
        log.warn(f"{path}: flock: {os.strerror(err)}; running without the lock")
    return fd


def wait_for_flock(fd: int, wait: float) -> int:
    """flock(LOCK_EX) on fd, tried again for up to `wait` seconds: 0 once
    held, else the errno (EWOULDBLOCK: another process still holds it)."""
    deadline = time.monotonic() + wait
    while libc().flock(fd, LOCK_EX | LOCK_NB) < 0:
        err = libc().get_errno()
        if err != errno.EWOULDBLOCK or time.monotonic() >= deadline:
            return err
        time.sleep(0.05)
    return 0


def command_apply(config: Config, root: str, log: Log) -> int:
    started = time.monotonic()
    tree = Tree(root)
    with Executor(tree, log) as executor:
        failed, skipped = apply_config(config, tree, executor, log)
        recorded = executor.finish()
    elapsed = (time.monotonic() - started) * 1000
    log.info(f"apply: {len(config.entries)} entries, {failed} failed, {skipped} skipped, "
             f"{elapsed:.1f} ms")
    if skipped:
        return EXIT_STORAGE
    return EXIT_FAILED if failed or not recorded else EXIT_OK


def command_plan(config: Config, root: str, log: Log, out) -> int:
    for warning in config_warnings(config):
        log.warn(warning)
    tree = Tree(root)
    printer = Printer(tree, peek=True)
    apply_config(config, tree, printer, log)
    for host in reversed(_private_namespace[1:]):
        umount2(host, MNT_DETACH, host)
    del _private_namespace[1:]
    lines = printer.notes + (printer.lines or ["nothing to do: everything is in place"])
    if config.root is not None:
        lines.insert(0, rotation_summary(config.root))
    out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))
    return EXIT_OK


REPLACED = "a program replaced the link or bind with a file on the root; save moves it into storage"


def entry_status(entry: Entry, tree: Tree, mounts: MountTable, accounts: Accounts) -> tuple:
    """(state, detail) of one entry on the live system: placement, and
    for what is not in place, why."""
    source, target = entry.source, entry.target
    on_fuse = fuse_refusal(tree, entry)
    if on_fuse is not None:
        return "error", f"{tree.host(on_fuse[0])} {on_fuse[1]}"
    placed = placement(entry, tree)
    src = tree.look(source)
    if src is not None and src.kind != ("file" if entry.kind == "file" else "dir"):
        return "error", f"source is {describe_kind(src)}"
    if placed is not None:
        detail = {"inside": "inside a kept directory", "linked": "linked", "mounted": "mounted"}[placed]
        if src is None:
            return "ok", detail + "; the source is created on first write"
        if entry.kind == "directory":
            uid, gid, mode = accounts.resolve(entry.perms, entry.storage)
            if (src.uid, src.gid) != (uid, gid):
                return "owner-differs", f"source is {src.uid}:{src.gid}, declared {uid}:{gid}"
            if src.mode != mode:
                return "mode-differs", f"source is {format_mode(src.mode)}, declared {format_mode(mode)}"
        return "ok", detail
    tgt = tree.look(target)
    host_target = tree.host(target)
    if entry.kind == "file" and replaced_file(entry, tgt, src, tree, mounts):
        return "replaced", REPLACED
    if entry.kind == "file" and entry.method == "symlink":
        return "not-linked", (f"target is {describe_kind(tgt) if tgt else 'missing'}; expected a link "
                              f"to {link_text(entry)}")
    if src is None:
        return "source-missing", f"{tree.host(source)} does not exist" + (
            " and target is not a link to it" if entry.kind == "file" else "")
    if tgt is not None and mounts.is_mountpoint(host_target):
        return "wrong-source", "mounted from " + "".join(mounts.points[host_target][:2])
    return "not-mounted", "target is " + (describe_kind(tgt) if tgt else "missing")


def command_status(config: Config, root: str, log: Log, out, as_json: bool) -> int:
    tree = Tree(root)
    mounts = tree.mounts
    storage_rows = []
    state_of: dict = {}
    for storage in config.storages:
        state, detail = state_of[storage] = storage_state(config, tree, mounts, storage)
        storage_rows.append({"storage": as_path(storage), "state": state, "detail": detail})
    usable = [s for s, (state, _) in state_of.items() if state in USABLE]
    storage_rows += foreign_mount_rows(config, tree, mounts, usable)
    accounts = Accounts(config, tree, usable)
    rows = []
    for entry in config.entries:
        if entry.storage not in usable:
            state, detail = "storage-unavailable", f"storage {as_path(entry.storage)} " + (
                "missing" if state_of[entry.storage][0] == "unavailable" else "not mounted")
        else:
            try:
                state, detail = entry_status(entry, tree, mounts, accounts)
                if state == "ok" and mounts.two_way(tree.host(entry.target), tree.host(entry.source)):
                    state, detail = "two-way", ("mounted as a peer of its storage: what is mounted "
                                                "under it appears in storage too; apply makes it one-way")
            except Failure as exc:
                state, detail = "error", f"{exc.path}: {exc.cause}"
            except OSError as exc:
                state, detail = "error", failure(exc, "").cause
            except Exception as exc:  # a bug: reported for this entry only
                state, detail = "error", failure(exc, "").cause
        rows.append({"target": as_path(entry.target), "kind": entry.kind,
                     "source": as_path(entry.source), "state": state, "detail": detail})
    drift = sum(1 for r in rows if r["state"] != "ok")
    drift += sum(1 for r in storage_rows if r["state"] not in USABLE)
    if as_json:
        import json

        out.write(json.dumps({"root": root, "storage": storage_rows, "entries": rows,
                              "drift": drift}, indent=2) + "\n")
    else:
        for r in storage_rows:
            out.write(f"{r['state']:<19} storage   {r['storage']}  ({r['detail']})".translate(UNPRINTABLE) + "\n")
        for r in rows:
            out.write(f"{r['state']:<19} {r['kind']:<9} {r['target']}  ({r['detail']})".translate(UNPRINTABLE) + "\n")
        out.write(f"{len(rows) - sum(1 for r in rows if r['state'] != 'ok')} of {len(rows)} entries in place\n")
    if len(usable) < len(config.storages):
        return EXIT_STORAGE
    return EXIT_FAILED if drift else EXIT_OK


def foreign_mount_rows(config: Config, tree: Tree, mounts: MountTable, storages: list) -> list:
    """A status row for each mount inside a storage that apply did not make
    there: apply mounts nothing inside storage but the storages and
    fileSystems the config names. (One there came in by propagation from
    the root side, or was mounted in storage itself; orphans and diff name
    it without walking it.) Each goes with the innermost storage holding it."""
    named = {tree.host(p) for p in (*config.storages, *(fs.mountpoint for fs in config.filesystems))}
    hosts = sorted(((tree.host(s), s) for s in storages), key=lambda h: len(h[0]), reverse=True)
    rows = []
    for point in sorted(mounts.points):
        if point in named:
            continue
        for host, storage in hosts:
            if point.startswith(host + "/"):
                rows.append({"storage": as_path(storage), "state": "foreign-mount",
                             "detail": f"storage has a foreign mount at {point} "
                                       f"({mounts.points[point][2]})"})
                break
    return rows


def command_unmount(config: Config, root: str, log: Log, out, dry_run: bool) -> int:
    """Undo apply, children first: unmount our bind mounts, remove the links
    and the empty mount points apply made. Storage is never written to.
    --dry-run prints the plan; the real run logs (-v) the same lines."""
    tree = Tree(root)
    mounts = tree.mounts
    groups = plan_unmount(config, tree, mounts, log)
    if dry_run:
        printer = Printer(tree)
        for _, actions in groups:
            printer.run(actions)
        lines = printer.lines or ["nothing to do: nothing apply made is in place"]
        out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))
        return EXIT_OK
    failed = 0
    with Executor(tree, log) as executor:
        for target, actions in groups:
            try:
                executor.run(actions)
            except Exception as exc:  # this entry stays, the others are undone
                failed += 1
                log.error(str(failure(exc, tree.host(target))))
        if executor.unmounted and os.path.exists(utab_path()):
            try:
                update_utab([], executor.unmounted)
            except OSError as exc:
                failed += 1
                log.error(f"{exc.filename}: cannot remove mount options: {failure(exc, '').cause}")
    return EXIT_FAILED if failed else EXIT_OK


def plan_unmount(config: Config, tree: Tree, mounts: MountTable, log: Log) -> list:
    """The actions that undo apply, as (path, actions) for each entry, last
    entry first, then each fileSystems entry apply mounted. Planned from the system as it is; what
    lies under a bind mount is looked at through a clone of its parent's
    mount without the mounts on it, as the unmount will leave it."""
    groups: list = []
    kept_dirs = {entry.target for entry in config.entries if entry.kind == "directory"}
    for entry in reversed(config.entries):
        # Inside another kept directory, a link or mount point apply
        # made lies in that directory's storage (or is the source
        # itself): left there.
        in_storage = any(entry.target[:depth] in kept_dirs for depth in range(1, len(entry.target)))
        try:
            actions = plan_unmount_entry(entry, tree, mounts, in_storage)
        except Exception as exc:  # this entry stays, the others are undone
            failed = failure(exc, tree.host(entry.target))
            actions = [Fail(failed.path, failed.cause)]
        if actions:
            groups.append((entry.target, actions))
    # A persistent filesystem is unmounted only if apply mounted it (its
    # utab line, with the id of the mount there now); one stage 1, fstab
    # or a person mounted stays. On a running system (--root /) they are
    # the system's own, whoever mounted them: they stay.
    ours = {f.get("TARGET"): (f.get("SRC"), f.get("ROOT"), f.get("ID"))
            for f in map(utab_fields, read_utab())
            if MOUNTED_OPTION in f.get("OPTS", "").split(",")}
    for fs in sorted(config.filesystems if tree.root != "/" else (), key=lambda f: f.mountpoint,
                     reverse=True):
        found = mounts.points.get(tree.host(fs.mountpoint))
        if found is None:
            continue
        source, fs_root, _, mount_id = found
        if ours.get(as_path(fs.mountpoint)) != (source, fs_root, mount_id):
            log.info(f"{tree.host(fs.mountpoint)}: not mounted by apply; left mounted")
            continue
        key = UtabKey(mount_id, source, as_path(fs.mountpoint), fs_root)
        groups.append((fs.mountpoint, [UnmountFilesystem(fs.mountpoint, key)]))
    return groups


def plan_unmount_entry(entry: Entry, tree: Tree, mounts: MountTable, in_storage: bool) -> list:
    """Unmount one entry's bind mount; remove the link or the empty mount
    point apply made for it, unless it lies in storage (in_storage)."""
    target = entry.target
    host = tree.host(target)
    if fuse_refusal(tree, entry) is not None:
        return []  # not apply's: left as it is, never looked at
    placed = placement(entry, tree)
    if placed == "linked":
        return [] if in_storage else [RemoveLink(target)]
    node = tree.look(target)
    if node is None or node.kind == "link" or placed == "inside":
        return []  # someone else's link; or the source itself
    src = tree.look(entry.source)
    actions: list = []
    if placed == "mounted" and mounts.is_mountpoint(host):
        actions.append(UnmountBind(target, entry.source))
        node = node_beneath(tree, target, True)
    elif mounts.layers(host) > 1 and src is not None:
        # Another mount on top, with more below it: apply's bind may be one
        # of them, and cannot be taken off from under that mount.
        raise covered(host, mounts)
    elif mounts.is_mountpoint(host):
        return []  # not apply's
    else:
        node = node_beneath(tree, target, False)
    if node is not None and not in_storage and node.marked and node.empty:
        actions.append(RemoveMountPoint(target, node.kind))
    return actions


def covered(host: str, mounts: MountTable) -> Failure:
    """Another mount on top of a target, with apply's bind maybe under it:
    that one cannot be taken off from under it."""
    return Failure(host, f"covered by another mount ({max(mounts.layers(host), 1)} mounts there); "
                         "unmount those above apply's first, then run unmount again")


class Beneath(Record):
    """What a mount point holds under the mounts on it: whether apply made
    it (its mark) and whether it is empty."""
    __slots__ = _fields = ("kind", "marked", "empty")


def node_beneath(tree: Tree, target: tuple, covered: bool):
    """The Beneath of target (None if it cannot be seen, or is neither a
    directory nor a file); if mounts cover it, as they will leave it when
    taken off: looked at in a clone of the mount its parent lies on, which
    has none of the mounts on that one."""
    host = tree.host(target)
    with opened(open_dir_path(tree, target[:-1])) as parent:
        if not covered:
            return beneath_at(parent, target[-1], host)
        clone = open_tree(parent, "", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH, host)
        if clone is None:
            return None
        with opened(clone):
            return beneath_at(clone, target[-1], host)


def beneath_at(dir_fd: int, name: str, host: str):
    """The Beneath of name in dir_fd, or None if it is missing or neither
    a directory nor a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        with opened(call("open", host, os.open, name, O_DIR, dir_fd=dir_fd)) as fd:
            st = os.fstat(fd)
            return Beneath("dir", st.st_mtime_ns == MARK_TIME_NS, not os.listdir(fd))
    if stat.S_ISREG(st.st_mode):
        return Beneath("file", st.st_mtime_ns == MARK_TIME_NS, st.st_size == 0)
    return None


class UnmountBind(Action):
    """Take an entry's bind mount off its target: every layer that binds
    the source (two runs of an older version at once could stack them)."""
    __slots__ = ("target", "source")

    def __init__(self, target: tuple, source: tuple):
        self.target, self.source = target, source

    def describe(self, tree: Tree) -> str:
        return f"unmount {tree.host(self.target)}"

    def execute(self, ex: Executor) -> None:
        tree, mounts, target, source = ex.tree, ex.tree.mounts, self.target, self.source
        host = tree.host(target)
        kept = call("lstat", tree.host(source), os.stat, source[-1], dir_fd=ex.sources.open(source[:-1]),
                    follow_symlinks=False)
        while True:
            # Looked at now, not as planned: a mount made on top since is
            # someone's, and stays.
            parent = ex.targets.open(target[:-1])
            st = call("lstat", host, os.stat, target[-1], dir_fd=parent, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (kept.st_dev, kept.st_ino):
                break
            # Through the pinned parent, never following a link at the leaf;
            # an fd on the mount itself would keep it busy.
            umount2(f"/proc/self/fd/{parent}/{target[-1]}", UMOUNT_NOFOLLOW, host)
            found = mounts.points.get(host)
            if found is not None:
                ex.unmounted.append(UtabKey(found[3], found[0], as_path(target), found[1]))
            mounts.remove(host)
            tree.forget(target)
        if mounts.is_mountpoint(host) or st.st_dev != os.fstat(parent).st_dev:
            raise covered(host, mounts)


class RemoveLink(Action):
    """Remove the link apply made for a kept file."""
    __slots__ = ("target",)

    def __init__(self, target: tuple):
        self.target = target

    def describe(self, tree: Tree) -> str:
        return f"remove link {tree.host(self.target)}"

    def execute(self, ex: Executor) -> None:
        host = ex.tree.host(self.target)
        parent = ex.targets.open(self.target[:-1])
        if not stat.S_ISLNK(call("lstat", host, os.stat, self.target[-1], dir_fd=parent,
                                 follow_symlinks=False).st_mode):
            raise Failure(host, "is no longer a link; left as it is")
        call("unlink", host, os.unlink, self.target[-1], dir_fd=parent)


class RemoveMountPoint(Action):
    """Remove the mount point apply made for an entry (its mark), if it is
    still empty."""
    __slots__ = ("target", "kind")

    def __init__(self, target: tuple, kind: str):
        self.target, self.kind = target, kind

    def describe(self, tree: Tree) -> str:
        return f"remove mount point {tree.host(self.target)}"

    def execute(self, ex: Executor) -> None:
        host = ex.tree.host(self.target)
        if ex.tree.mounts.is_mountpoint(host):
            raise Failure(host, "is a mount point again; left as it is")
        parent = ex.targets.open(self.target[:-1])
        found = beneath_at(parent, self.target[-1], host)
        if found is None or found.kind != self.kind or not (found.marked and found.empty):
            raise Failure(host, "is no longer the empty mount point apply made; left as it is")
        if self.kind == "dir":
            call("rmdir", host, os.rmdir, self.target[-1], dir_fd=parent)
        else:
            call("unlink", host, os.unlink, self.target[-1], dir_fd=parent)
        ex.tree.forget(self.target)


class UnmountFilesystem(Action):
    """Unmount a fileSystems entry that apply mounted (its utab line)."""
    __slots__ = ("target", "key")

    def __init__(self, target: tuple, key: UtabKey):
        self.target, self.key = target, key

    def describe(self, tree: Tree) -> str:
        return f"unmount {tree.host(self.target)} (fileSystems, mounted by apply)"

    def execute(self, ex: Executor) -> None:
        host = ex.tree.host(self.target)
        ex.sources.truncate(0)
        ex.targets.truncate(0)
        umount2(host, UMOUNT_NOFOLLOW, host)
        ex.unmounted.append(self.key)
        ex.tree.mounts.remove(host)
        ex.tree.forget(self.target)


# --- save: kept files that programs replaced by rename() ----------------------------
#
# A program that saves a file atomically (fish's history, dconf, KConfig,
# editors) writes a temporary beside it and renames it over the name: a
# link apply made is then replaced by a plain file on the wiped root, and
# a bind-mounted file cannot be replaced at all (EBUSY). `save` copies such
# a file into storage under a temporary name, fsyncs it, renames it over
# the source, and only then puts the link (or the mount point and its
# bind) back in place of the root's copy. Killed at any step, storage
# holds the old content or the new, and the root's copy stays until the
# new content is in storage: the next save finishes or discards what the
# killed one left.

SAVE_TEMP = ".impermanence-save"   # .NAME.impermanence-save beside the source
SWAP_TEMP = ".impermanence-swap"   # .NAME.impermanence-swap beside the target
CONFLICT = ".impermanence-conflict-"


def save_temp_name(name: str, suffix: str) -> str | None:
    """The name of a temporary beside `name`; None where it would be too long."""
    temp = f".{name}{suffix}"
    return temp if len(os.fsencode(temp)) <= 255 else None


def is_mount_mark(host: str) -> bool:
    """Whether the file at host is an empty mount point apply made."""
    try:
        st = os.lstat(host)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_mtime_ns == MARK_TIME_NS


def replaced_file(entry: Entry, tgt: Node | None, src: Node | None, tree: Tree,
                  mounts: MountTable) -> bool:
    """Whether a kept file's target is a regular file where apply made a
    link (method symlink, or auto while the source was missing) or a bind
    (auto): a program replaced it by rename(), or wrote where the bind was
    gone. An empty mount point apply made, whose bind is missing, is not."""
    if tgt is None or tgt.kind != "file":
        return False
    host = tree.host(entry.target)
    if mounts.is_mountpoint(host) or (src is not None and tree.same(entry.source, entry.target)):
        return False
    if entry.method == "auto" and src is not None and tgt.size == 0 and is_mount_mark(host):
        return False
    return True


def save_refusal(st, dir_sts: tuple, root_dev: int) -> str | None:
    """Why the file st (opened at a kept file's target) must not go into
    storage, or None. Whoever may make names in a directory on the way
    could have planted it there (a hard link to another's file, or a file
    of another owner): storage must never receive a file that gives more
    than its planter could give themselves."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file; not saved"
    if st.st_dev != root_dev:
        return "is not on the root's own filesystem; not saved"
    if st.st_nlink != 1:
        return f"is a hard link ({st.st_nlink} names); not saved"
    if st.st_mode & 0o6000:
        return "is set-user-ID or set-group-ID; not saved"
    for folder in dir_sts:
        if st.st_uid != folder.st_uid and (folder.st_uid != 0 or folder.st_mode & 0o022):
            writer = f"uid {folder.st_uid}" if folder.st_uid != 0 else "others"
            return f"is owned by uid {st.st_uid} in a directory {writer} may write; not saved"
    return None


def same_content(a: int, b: int) -> bool:
    """Whether the regular files open at fds a and b hold the same bytes."""
    if os.fstat(a).st_size != os.fstat(b).st_size:
        return False
    offset = 0
    while True:
        chunk = os.pread(a, 1 << 20, offset)
        if chunk != os.pread(b, len(chunk) or 1, offset):
            return False
        if not chunk:
            return True
        offset += len(chunk)


def open_file_at(dir_fd: int, name: str, shown: str) -> int | None:
    """A regular file at name, opened read-only without following a link;
    None if nothing is there."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Failure(shown, "is a symbolic link; not read") from None
        raise oserror("open", shown, exc.errno) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Failure(shown, "is not a regular file; not read")
    return fd


def saved_already(storage_dir: int, name: str, fd: int) -> str | None:
    """The name in storage_dir (the source, or a conflict copy an earlier
    save made) that holds what fd holds, or None."""
    prefix = name + CONFLICT
    for candidate in [name] + sorted(n for n in os.listdir(storage_dir) if n.startswith(prefix)):
        try:
            other = open_file_at(storage_dir, candidate, candidate)
        except Failure:
            if candidate == name:
                raise
            continue  # not a copy save made: not compared
        if other is None:
            continue
        with opened(other):
            if same_content(fd, other):
                return candidate
    return None


def rename_exchange(dir_fd: int, a: str, b: str, shown: str) -> bool:
    """renameat2(RENAME_EXCHANGE) of a and b in dir_fd; False where the
    kernel, filesystem or C library lacks it."""
    function = libc().renameat2
    if function is None:
        return False
    if function(dir_fd, os.fsencode(a), dir_fd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = libc().get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    raise oserror("rename", shown, err)


def fingerprint(st) -> tuple:
    """What changes when a file is written or replaced (its ctime moves
    with every write, chmod, chown and rename)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class SaveFile(Action):
    """The root's copy of a kept file, which a program put in place of the
    link or bind: copied into storage (over the source, or beside it as a
    conflict copy when storage changed too), then the link, or an empty
    mount point and the bind, put back in its place."""
    __slots__ = ("entry", "found", "conflict", "restore", "held")

    def __init__(self, entry: Entry, found: tuple, conflict: str | None, restore: str,
                 held: str | None):
        # found: fingerprint of the root's copy when planned; conflict: the
        # name of the copy beside the source, or None to replace the
        # source; restore: "link" or "bind"; held: the name in storage
        # that holds the root's bytes already (a killed save's work).
        self.entry, self.found, self.conflict, self.restore = entry, found, conflict, restore
        self.held = held

    def describe(self, tree: Tree) -> str:
        entry = self.entry
        again = "link it again" if self.restore == "link" else "bind it again"
        if self.held is not None:
            return (f"{again.split()[0]} {tree.host(entry.target)} again "
                    f"({tree.host(entry.source[:-1] + (self.held,))} holds its content already)")
        if self.conflict is None:
            return (f"save {tree.host(entry.target)} into {tree.host(entry.source)} (a program "
                    f"replaced it), then {again}")
        copy = tree.host(entry.source[:-1] + (self.conflict,))
        return (f"save {tree.host(entry.target)} as {copy} ({tree.host(entry.source)} changed too: "
                f"both kept), then {again}")

    def execute(self, ex: Executor) -> None:
        entry, tree = self.entry, ex.tree
        target_dir = ex.targets.open(entry.target[:-1])
        storage_dir = ex.sources.open(entry.source[:-1])
        name, shown = entry.target[-1], tree.host(entry.target)
        source_name, source_shown = entry.source[-1], tree.host(entry.source)
        fd = open_file_at(target_dir, name, shown)
        if fd is None:
            raise Failure(shown, "disappeared while saving; nothing saved")
        with opened(fd):
            st = os.fstat(fd)
            if fingerprint(st) != self.found:
                raise Failure(shown, "changed while saving; saved at the next save")
            refusal = save_refusal(st, (os.fstat(target_dir), os.fstat(storage_dir)),
                                   os.fstat(ex.root_fd).st_dev)
            if refusal:
                raise Failure(shown, refusal)
            before = source_state(storage_dir, source_name)
            if saved_already(storage_dir, source_name, fd) is None:
                if self.conflict is None and before is not None and before[4] > st.st_ctime_ns:
                    raise Failure(source_shown, "changed while saving; saved at the next save")
                write_saved(fd, st, storage_dir, source_name, shown, source_shown,
                            self.conflict, before)
                if self.conflict is not None:
                    ex.log.warn(f"{source_shown}: changed in storage and at {shown}: kept both, "
                                f"the root's copy as {self.conflict}")
            self.put_back(ex, target_dir, name, shown, st)

    def put_back(self, ex: Executor, target_dir: int, name: str, shown: str, st) -> None:
        """Swap the link (or an empty mount point) in for the root's copy,
        now in storage; what comes out must be that copy, unchanged."""
        swap = save_temp_name(name, SWAP_TEMP)
        if swap is None:
            raise Failure(shown, "has a name too long for a temporary beside it; saved, "
                                    "not linked again")
        if self.restore == "link":
            call("symlink", shown, os.symlink, link_text(self.entry), swap, dir_fd=target_dir)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with opened(call("create", shown, os.open, swap, flags, 0o644, dir_fd=target_dir)) as made:
                mark(made)
        if rename_exchange(target_dir, swap, name, shown):
            out = os.stat(swap, dir_fd=target_dir, follow_symlinks=False)
            if fingerprint(out)[:4] != fingerprint(st)[:4]:
                # Replaced again meanwhile: the newer copy goes back.
                rename_exchange(target_dir, swap, name, shown)
                os.unlink(swap, dir_fd=target_dir)
                raise Failure(shown, "changed while saving; saved at the next save")
            call("unlink", shown, os.unlink, swap, dir_fd=target_dir)
        else:
            now_there = call("lstat", shown, os.stat, name, dir_fd=target_dir, follow_symlinks=False)
            if fingerprint(now_there)[:4] != fingerprint(st)[:4]:
                os.unlink(swap, dir_fd=target_dir)
                raise Failure(shown, "changed while saving; saved at the next save")
            call("rename", shown, os.rename, swap, name, src_dir_fd=target_dir, dst_dir_fd=target_dir)
        if self.restore == "bind":
            Bind(self.entry.source, self.entry.target, "file").execute(ex)


def source_state(storage_dir: int, name: str) -> tuple | None:
    try:
        return fingerprint(os.stat(name, dir_fd=storage_dir, follow_symlinks=False))
    except FileNotFoundError:
        return None


def write_saved(fd: int, st, storage_dir: int, name: str, shown: str, source_shown: str,
                conflict: str | None, before: tuple | None) -> None:
    """The content of fd into storage: a temporary written, given fd's
    owner, mode, xattrs and times, fsynced, then renamed over the source
    (or to the conflict name) and the directory fsynced. Killed at any
    point, the source is whole, old or new."""
    temp = save_temp_name(name, SAVE_TEMP)
    if temp is None:
        raise Failure(source_shown, "has a name too long for a temporary beside it; not saved")
    try:
        os.unlink(temp, dir_fd=storage_dir)  # left by a killed save
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    copy = call("create", source_shown, os.open, temp, flags, 0o600, dir_fd=storage_dir)
    try:
        try:
            offset = 0
            while True:
                chunk = call("read", shown, os.pread, fd, 1 << 20, offset)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[call("write", source_shown, os.write, copy, view):]
                offset += len(chunk)
            give_attributes(fd, copy, st, source_shown)
            call("fsync", source_shown, os.fsync, copy)
        finally:
            os.close(copy)
        if fingerprint(os.fstat(fd)) != fingerprint(st):
            raise Failure(shown, "changed while saving; saved at the next save")
        if conflict is None:
            if source_state(storage_dir, name) != before:
                raise Failure(source_shown, "changed while saving; saved at the next save")
            call("rename", source_shown, os.rename, temp, name, src_dir_fd=storage_dir,
                 dst_dir_fd=storage_dir)
        else:
            rename_noreplace(storage_dir, temp, storage_dir, conflict, source_shown)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=storage_dir)
        except OSError:
            pass
        raise
    call("fsync", source_shown, os.fsync, storage_dir)


class DiscardTemp(Action):
    """A temporary a killed save left. In storage: an unfinished copy of
    the root's copy (removed only if the root's file starts with its
    bytes, or storage holds them already; otherwise it may be the only
    copy left by a crash, and stays). Beside the target: the link or
    empty mount point about to be swapped in, or the root's copy swapped
    out (removed only if storage holds its bytes)."""
    __slots__ = ("path", "entry", "in_storage")

    def __init__(self, path: tuple, entry: Entry, in_storage: bool):
        self.path, self.entry, self.in_storage = path, entry, in_storage

    def describe(self, tree: Tree) -> str:
        return f"remove {tree.host(self.path)} (left by an interrupted save)"

    def execute(self, ex: Executor) -> None:
        entry = self.entry
        chain = ex.sources if self.in_storage else ex.targets
        parent = chain.open(self.path[:-1])
        name, shown = self.path[-1], ex.tree.host(self.path)
        st = call("lstat", shown, os.stat, name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) and not self.in_storage:
            if os.readlink(name, dir_fd=parent) != link_text(entry):
                raise Failure(shown, "has the name of a save's temporary but is not one; left as it is")
        elif not stat.S_ISREG(st.st_mode):
            raise Failure(shown, "has the name of a save's temporary but is not one; left as it is")
        elif self.in_storage or st.st_size:
            # (An empty file beside the target holds nothing to lose: the
            # mount point, marked or not yet.)
            fd = open_file_at(parent, name, shown)
            if fd is not None:
                with opened(fd):
                    storage_dir = ex.sources.open(entry.source[:-1])
                    if not (self.in_storage and self.copy_of_root(ex, fd)
                            or saved_already(storage_dir, entry.source[-1], fd) is not None):
                        raise Failure(shown, "was left by an interrupted save and holds what "
                                                "neither storage nor the root holds; left as it is")
        call("unlink", shown, os.unlink, name, dir_fd=parent)

    def copy_of_root(self, ex: Executor, fd: int) -> bool:
        """Whether the root's file at the target starts with fd's bytes."""
        target_dir = ex.targets.open(self.entry.target[:-1])
        try:
            root_copy = open_file_at(target_dir, self.entry.target[-1], ex.tree.host(self.entry.target))
        except Failure:
            return False  # the link, or no file: nothing there to copy
        if root_copy is None:
            return False
        with opened(root_copy):
            offset = 0
            while True:
                chunk = os.pread(fd, 1 << 20, offset)
                if not chunk:
                    return True
                if os.pread(root_copy, len(chunk), offset) != chunk:
                    return False
                offset += len(chunk)


def plan_save(entry: Entry, tree: Tree, mounts: MountTable, now: float) -> list:
    """What save does for one kept file: the temporaries a killed save
    left, then the root's copy that took the place of the link or bind."""
    actions: list = []
    if entry.kind != "file" or (tree.same(entry.source[:-1], entry.target[:-1])):
        return actions  # a kept directory, or a file inside one: in storage already
    try:
        for path, in_storage in ((entry.source, True), (entry.target, False)):
            temp = save_temp_name(path[-1], SAVE_TEMP if in_storage else SWAP_TEMP)
            if temp is not None and tree.look(path[:-1] + (temp,)) is not None:
                actions.append(DiscardTemp(path[:-1] + (temp,), entry, in_storage))
        tgt, src = tree.look(entry.target), tree.look(entry.source)
        if tgt is None:
            return actions
        if tgt.kind == "link":
            if tgt.link != link_text(entry):
                raise Refused(tree.host(entry.target), f"is {describe_kind(tgt)}, not the link apply made; "
                                            "not saved")
            return actions
        if tgt.kind != "file":
            raise Refused(tree.host(entry.target), f"is {describe_kind(tgt)}; not saved")
        host = tree.host(entry.target)
        if not replaced_file(entry, tgt, src, tree, mounts):
            if (entry.method == "auto" and src is not None and not mounts.is_mountpoint(host)
                    and is_mount_mark(host)):
                # A save killed between the swap and the bind.
                actions.append(Bind(entry.source, entry.target, "file"))
            return actions
        if src is not None and src.kind != "file":
            raise Refused(tree.host(entry.source), f"source is {describe_kind(src)}, not a regular file")
        actions.append(plan_save_file(entry, tree, src, now))
    except Refused as refused:
        actions.append(Fail(refused.path, refused.cause))
    return actions


def plan_save_file(entry: Entry, tree: Tree, src: Node | None, now: float) -> SaveFile:
    """SaveFile for a replaced target, refused as save_refusal says. The
    storage copy changed too when its ctime is later than the root copy's:
    the root's copy took the link's place by a rename, which sets its
    ctime, so storage was written after that, by someone who did not go
    through the link. (A program that replaces a file reads it through
    the link first: changes before its rename are in its copy.) Where a
    bind was, the program could not have read storage's copy through a
    link at all: a source that differs is always kept."""
    with opened(open_dir_path(tree, entry.target[:-1])) as target_dir:
        fd = open_file_at(target_dir, entry.target[-1], tree.host(entry.target))
        if fd is None:
            raise Refused(tree.host(entry.target), "disappeared while planning; nothing saved")
        with opened(fd):
            st = os.fstat(fd)
            with opened(open_dir_path(tree, entry.source[:-1])) as storage_dir:
                refusal = save_refusal(st, (os.fstat(target_dir), os.fstat(storage_dir)),
                                       os.stat(tree.root).st_dev)
                if refusal:
                    raise Refused(tree.host(entry.target), refusal)
                conflict = None
                source = entry.source[-1]
                sst = source_state(storage_dir, source)
                held = saved_already(storage_dir, source, fd) if sst is not None else None
                restore = "bind" if entry.method == "auto" and src is not None else "link"
                if held is None and sst is not None and (sst[4] > st.st_ctime_ns or restore == "bind"):
                    conflict = source + CONFLICT + time.strftime(TIME_FORMAT, time.gmtime(now))
    return SaveFile(entry, fingerprint(st), conflict, restore, held)


def usable_storages(config: Config, tree: Tree, mounts: MountTable, log: Log) -> set:
    """The storages save may write into (storage_state). save mounts
    nothing: a storage that is gone (unmounted at shutdown) gets nothing
    on the bare mount point."""
    usable = set()
    for storage in config.storages:
        state, detail = storage_state(config, tree, mounts, storage)
        if state in USABLE:
            usable.add(storage)
        else:
            log.error(f"{tree.host(storage)}: storage {detail}; its entries not saved")
    return usable


SAVE_LOCK = "/run/impermanence-save.lock"
SAVE_LOCK_WAIT = 30.0  # seconds a second save waits for the first


def save_lock() -> int | None:
    """An fd holding the one-save-at-a-time lock (two saves would each
    remove the other's temporary), or None after waiting SAVE_LOCK_WAIT.
    Root's file under /run: no user can hold it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = call("open", SAVE_LOCK, os.open, SAVE_LOCK, flags, 0o600)
    if wait_for_flock(fd, SAVE_LOCK_WAIT):
        os.close(fd)
        return None
    return fd


def command_save(config: Config, root: str, log: Log, out, dry_run: bool) -> int:
    if not dry_run:
        try:
            lock = save_lock()
        except OSError as exc:
            log.error(str(failure(exc, SAVE_LOCK)) + "; nothing was saved")
            return EXIT_CONFIG
        if lock is None:
            log.error(f"{SAVE_LOCK}: another save is running (waited {SAVE_LOCK_WAIT:g} s); "
                      "nothing was saved")
            return EXIT_CONFIG
        try:
            return saved(config, root, log, out, dry_run)
        finally:
            os.close(lock)
    return saved(config, root, log, out, dry_run)


def saved(config: Config, root: str, log: Log, out, dry_run: bool) -> int:
    """save, under its lock unless dry_run."""
    tree = Tree(root)
    mounts = tree.mounts
    usable = usable_storages(config, tree, mounts, log)
    now = time.time()
    failed = len(set(config.storages) - usable)
    entries = [e for e in config.entries if e.kind == "file" and e.storage in usable]
    if dry_run:
        printer = Printer(tree)
        failed += save_entries(entries, tree, mounts, now, printer)
        lines = printer.lines or ["nothing to save"]
        out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))
    else:
        with Executor(tree, log) as executor:
            failed += save_entries(entries, tree, mounts, now, executor)
    return EXIT_FAILED if failed else EXIT_OK


def save_entries(entries: list, tree: Tree, mounts: MountTable, now: float, runner) -> int:
    """Plan and run save for each kept file; the number that failed."""
    failed = 0
    for entry in entries:
        try:
            actions = plan_save(entry, tree, mounts, now)
            runner.run(actions)
            # (run by the executor, a Fail raises; the printer only prints it)
            failed += any(isinstance(action, Fail) for action in actions)
        except Exception as exc:  # the other entries are still saved
            failed += 1
            runner.report(str(failure(exc, tree.host(entry.target))))
    return failed


def command_check(path: str, log: Log, out) -> int:
    config = load_config_file(path)
    for warning in config_warnings(config):
        log.warn(warning)
    if log.verbosity:
        dirs = sum(1 for e in config.entries if e.kind == "directory")
        out.write(f"config OK: {dirs} directories, {len(config.entries) - dirs} files in "
                  f"{len(config.storages)} storage locations, {len(config.filesystems)} filesystems\n")
    return EXIT_OK


# Where a running system mounts its own filesystems (/tmp: or cleans it
# itself): diff walks them only when asked (--include).
DIFF_SKIPPED = ("nix", "proc", "sys", "dev", "run", "tmp")


def command_diff(config: Config, root: str, log: Log, out, as_json: bool, as_tree: bool,
                 include: tuple) -> int:
    """What the next boot loses: every path on the root's own filesystem
    that no entry keeps. Reads only."""
    tree = Tree(root)
    kept = {e.target for e in config.entries}
    kept.update(config.storages, (fs.mountpoint for fs in config.filesystems))
    skipped = {(name,): f"not walked (--include /{name} walks it)"
               for name in DIFF_SKIPPED if (name,) not in include}
    walk = Walk(tree, tree.mounts, kept, skipped, log, own_fs=include)
    walk.run(())
    if as_json:
        import json

        out.write(json.dumps(dict(root=root, **found_json(walk)), indent=2) + "\n")
    else:
        write_found(walk, (), out, as_tree, "not kept (lost at the next boot)")
    # A path it could not read is a part of the answer missing.
    return EXIT_FAILED if walk.errors else EXIT_OK


def command_orphans(config: Config, root: str, log: Log, out, as_json: bool, as_tree: bool) -> int:
    """What each storage holds that no entry keeps (an entry removed from
    the config leaves its data there). Reads only; deletes nothing."""
    tree = Tree(root)
    mounts = tree.mounts
    sources = {e.source for e in config.entries}
    guarded = set(config.storages) | {fs.mountpoint for fs in config.filesystems}
    result, rows = EXIT_OK, []
    for storage in config.storages:
        host = tree.host(storage)
        state, detail = storage_state(config, tree, mounts, storage)
        if state not in USABLE:
            log.error(f"{host}: storage {detail}" + ("; apply mounts it" if state == "not-mounted" else ""))
            result = EXIT_STORAGE
            rows.append({"storage": as_path(storage), "state": "unavailable"})
            continue
        kept = {s for s in sources if is_under(s, storage)}
        kept.update(p for p in guarded if is_under(p, storage) and p != storage)
        walk = Walk(tree, mounts, kept, {}, log)
        if not walk.run(storage):
            result = EXIT_STORAGE
            rows.append({"storage": as_path(storage), "state": "unavailable"})
            continue
        if as_json:
            rows.append(dict(storage=as_path(storage), state="available", **found_json(walk)))
        else:
            out.write(f"storage {host}:\n")
            write_found(walk, storage, out, as_tree, "kept by no entry")
    if as_json:
        import json

        out.write(json.dumps({"root": root, "storages": rows}, indent=2) + "\n")
    return result


def found_json(walk: Walk) -> dict:
    host = walk.tree.host
    found = sorted(walk.found, key=lambda f: (-f[2], f[0]))
    return {
        "paths": [{"path": host(p), "kind": kind, "size": size, "files": files}
                  for p, kind, size, files in found],
        "total": {"paths": len(found), "size": sum(f[2] for f in found),
                  "files": sum(f[3] for f in found)},
        "mounts": [{"path": host(p), "fsType": t} for p, t in walk.mounts],
        "notWalked": [host(p) for p, _ in walk.not_walked],
        "errors": [{"path": host(p), "error": cause} for p, cause in walk.errors],
    }


def write_found(walk: Walk, base: tuple, out, as_tree: bool, what: str) -> None:
    host = walk.tree.host
    lines = []
    if as_tree:
        lines += found_tree(walk, base)
    else:
        for path, kind, size, files in sorted(walk.found, key=lambda f: (-f[2], f[0])):
            lines.append(f"{format_size(size):>10} {files:>8}  {host(path)}{'/' if kind == 'dir' else ''}")
        if lines:
            lines.insert(0, f"{'size':>10} {'files':>8}  path")
    total = sum(f[2] for f in walk.found)
    files = sum(f[3] for f in walk.found)
    lines.append(f"{len(walk.found)} paths {what}: {format_size(total)} in {files} files")
    if walk.mounts:
        lines.append("other filesystems, not walked: " +
                     ", ".join(f"{host(p)} ({t})" for p, t in walk.mounts))
    if walk.not_walked:
        lines.append("not walked: " + ", ".join(host(p) for p, _ in walk.not_walked)
                     + " (--include PATH walks one)")
    out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))


def found_tree(walk: Walk, base: tuple) -> list:
    """The found paths as an indented tree under base, each directory
    with the total of what is found below it, children by name."""
    totals: dict = {}
    leaves: dict = {}
    for path, kind, size, files in walk.found:
        leaves[path] = kind
        for depth in range(len(base), len(path) + 1):
            t = totals.setdefault(path[:depth], [0, 0])
            t[0] += size
            t[1] += files
    children: dict = {}
    for path in totals:
        if len(path) > len(base):
            children.setdefault(path[:-1], []).append(path)
    lines = []
    stack = [base] if totals else []
    while stack:
        path = stack.pop()
        size, files = totals[path]
        name = walk.tree.host(path) if path == base else path[-1]
        slash = "/" if leaves.get(path, "dir") == "dir" and path else ""
        indent = "  " * (len(path) - len(base))
        lines.append(f"{format_size(size):>10} {files:>8}  {indent}{name}{slash}")
        stack += sorted(children.get(path, ()), reverse=True)
    return lines


# --- Root rotation (btrfs) ---------------------------------------------------------------
# rotate-root, in the initrd before the root is mounted. The fresh root is
# made at <oldRoots>/.rotating, then exchanged with the root subvolume in
# one renameat2(RENAME_EXCHANGE): the root's place is never empty. What
# .rotating then holds, the old root, is renamed to its time; one found
# there by a later run (a run killed in between) is renamed the same way.

ROTATING = ".rotating"
TIME_FORMAT = "%Y-%m-%dT%H-%M-%SZ"  # 2026-12-03T06-15-00Z, UTC: sorts as it is read
TIME_SHAPE = "dddd-dd-ddTdd-dd-ddZ"
NATIVE = sys.byteorder
U64_MAX = 2**64 - 1


class Subvolume(Record):
    """A subvolume as the root tree records it: its id, the subvolume and
    directory (inode) it is linked in, its name there, and the time of its
    last change (the root item's ctime)."""
    __slots__ = _fields = ("id", "parent", "dirid", "name", "changed")


def btrfs_ioctl(fd: int, request: int, op: str, args: bytearray, shown: str) -> bytearray:
    import fcntl

    try:
        fcntl.ioctl(fd, request, args, True)
    except OSError as exc:
        raise oserror(op, shown, exc.errno) from None
    return args


def u64(buf, offset: int) -> int:
    return int.from_bytes(buf[offset:offset + 8], NATIVE)


def search_root_tree(fd: int, shown: str) -> list:
    """(objectid, type, offset, item) of every subvolume's items in the root
    tree, through BTRFS_IOC_TREE_SEARCH (its key range is a range of whole
    keys: other types in between are filtered out by the caller)."""
    found, low = [], (BTRFS_FIRST_FREE_OBJECTID, 0, 0)
    while True:
        args = bytearray(4096)
        for i, value in enumerate((BTRFS_ROOT_TREE_OBJECTID, low[0], BTRFS_LAST_FREE_OBJECTID,
                                   low[2], U64_MAX, 0, U64_MAX)):
            args[i * 8:i * 8 + 8] = value.to_bytes(8, NATIVE)
        args[56:68] = low[1].to_bytes(4, NATIVE) + (255).to_bytes(4, NATIVE) + (4096).to_bytes(4, NATIVE)
        btrfs_ioctl(fd, BTRFS_IOC_TREE_SEARCH, "BTRFS_IOC_TREE_SEARCH", args, shown)
        count, pos = int.from_bytes(args[64:68], NATIVE), 104
        if count == 0:
            return found
        for _ in range(count):
            key = (u64(args, pos + 8), int.from_bytes(args[pos + 24:pos + 28], NATIVE), u64(args, pos + 16))
            size = int.from_bytes(args[pos + 28:pos + 32], NATIVE)
            found.append((key[0], key[1], key[2], bytes(args[pos + 32:pos + 32 + size])))
            pos += 32 + size
        if key[2] < U64_MAX:
            low = (key[0], key[1], key[2] + 1)
        elif key[1] < 255:
            low = (key[0], key[1] + 1, 0)
        elif key[0] < BTRFS_LAST_FREE_OBJECTID:
            low = (key[0] + 1, 0, 0)
        else:
            return found


def read_subvolumes(fd: int, shown: str) -> dict:
    """id -> Subvolume of every subvolume linked in the filesystem."""
    changed, links = {}, {}
    for objectid, kind, offset, item in search_root_tree(fd, shown):
        if kind == BTRFS_ROOT_ITEM_KEY and len(item) >= 339:  # ctime: since Linux 3.6
            changed[objectid] = u64(item, 327)
        elif kind == BTRFS_ROOT_BACKREF_KEY:  # btrfs_root_ref: dirid, sequence, name_len, name
            size = int.from_bytes(item[16:18], NATIVE)
            links[objectid] = (offset, u64(item, 0), os.fsdecode(item[18:18 + size]))
    return {i: Subvolume(i, parent, dirid, name, changed.get(i))
            for i, (parent, dirid, name) in links.items()}


def ino_lookup(fd: int, tree: int, inode: int, shown: str) -> tuple:
    """(tree id, the path of inode in that subvolume as components), by
    BTRFS_IOC_INO_LOOKUP; tree 0 is the subvolume of fd."""
    args = bytearray(4096)
    args[0:16] = tree.to_bytes(8, NATIVE) + inode.to_bytes(8, NATIVE)
    btrfs_ioctl(fd, BTRFS_IOC_INO_LOOKUP, "BTRFS_IOC_INO_LOOKUP", args, shown)
    path = os.fsdecode(bytes(args[16:]).split(b"\0", 1)[0])
    return u64(args, 0), tuple(c for c in path.split("/") if c)


def vol_args(name: str, fd: int, name_at: int, shown: str) -> bytearray:
    """btrfs_ioctl_vol_args (name at 8) or _v2 (name at 56)."""
    raw = os.fsencode(name)
    if len(raw) >= 4096 - name_at - 1:
        raise Failure(shown, "name too long")
    args = bytearray(4096)
    args[0:8] = fd.to_bytes(8, NATIVE, signed=True)
    args[name_at:name_at + len(raw)] = raw
    return args


def rotation_name(name: str) -> tuple | None:
    """(time, number) of a name rotate-root gives an old root,
    `2026-12-03T06-15-00Z` or, when that was taken, `...Z.2`; None for any
    other name."""
    stamp, dot, number = name.partition(".")
    if len(stamp) != len(TIME_SHAPE) or dot and not (number.isascii() and number.isdigit()
                                                     and number[0] != "0"):
        return None
    for c, shape in zip(stamp, TIME_SHAPE):
        if not (c.isascii() and c.isdigit() if shape == "d" else c == shape):
            return None
    return stamp, int(number or 0)


def time_name(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


class BtrfsTop:
    """The filesystem's top level (subvolid=5) mounted on a private
    directory of this process, read-only for --dry-run; `fd` is it opened."""

    def __init__(self, device: str, read_only: bool):
        self.device, self.read_only, self.path, self.fd = device, read_only, None, -1

    def mount(self) -> "BtrfsTop":
        base = "/run" if os.path.isdir("/run") else "/tmp"
        for n in range(100):
            path = f"{base}/impermanence-rotate.{os.getpid()}" + (f".{n}" if n else "")
            try:
                os.mkdir(path, 0o700)
                break
            except FileExistsError:
                continue
        else:
            raise Failure(base, "no private directory for the btrfs top level")
        try:
            mount(self.device, path, "btrfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_SILENT
                  | (MS_RDONLY if self.read_only else 0), "subvolid=5", self.device)
        except OSError:
            os.rmdir(path)
            raise
        self.path = path
        self.fd = os.open(path, O_DIR)
        return self

    def __enter__(self) -> "BtrfsTop":
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)
        try:
            umount2(self.path, MNT_DETACH, self.path)
            os.rmdir(self.path)
        except OSError:
            pass

    def shown(self, comps: tuple) -> str:
        return f"{self.device}[{as_path(comps)}]"

    def open(self, comps: tuple) -> int:
        """comps below the top level, each component opened O_NOFOLLOW."""
        return open_dirs(os.dup(self.fd), comps, lambda depth: self.shown(comps[:depth]))

    def look(self, comps: tuple) -> str | None:
        """None if comps does not exist, else "subvolume" or what it is."""
        try:
            with opened(self.open(comps[:-1])) as parent:
                st = os.stat(comps[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return "subvolume" if st.st_ino == BTRFS_FIRST_FREE_OBJECTID else "a plain directory"
        return "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"

    def subvolume_id(self, comps: tuple) -> int:
        with opened(self.open(comps)) as fd:
            return ino_lookup(fd, 0, BTRFS_FIRST_FREE_OBJECTID, self.shown(comps))[0]


def find_btrfs(spec: str, timeout: float) -> str:
    device, fs_type = wait_for_device(spec, timeout)
    if fs_type is None:
        try:
            with opened(os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)) as fd:
                fs_type = (probe_filesystem(fd) or (None,))[0]
        except OSError as exc:
            raise oserror("open", device, exc.errno) from None
    if fs_type not in (None, "btrfs"):
        raise Failure(device, f"is not a btrfs filesystem but {fs_type} ({spec})")
    return device


def mounted_below(top: BtrfsTop, comps: tuple) -> str | None:
    """A mount point of the same filesystem whose root is comps or below it:
    the root in use (rotate-root runs before it is mounted)."""
    return MountTable().mounted_from(top.path, comps)


def plan_rotation(spec: RootRotation, top: BtrfsTop, now: float) -> tuple:
    """([RotationStep] that rotate the root, essential: a failure stops the
    rotation, and the last step done, if it can (undo), takes back what it
    made; [DeleteOldRoot] beyond the retention; [warning] about the
    retention)."""
    old, rotating, root = spec.old_roots, spec.old_roots + (ROTATING,), spec.subvolume
    steps, deletions, notes = [], [], []
    subvols = read_subvolumes(top.fd, top.shown(()))
    for comps, what in ((root, "root.subvolume"), (old, "root.oldRoots"), (rotating, None),
                        (spec.blank, "root.blank")):
        found = top.look(comps) if comps else "subvolume"
        if what == "root.oldRoots" and found not in (None, "a plain directory", "subvolume"):
            raise Failure(top.shown(comps), f"is {found}, not a directory")
        if what != "root.oldRoots" and found not in (None, "subvolume"):
            raise Failure(top.shown(comps), f"is {found}, not a subvolume; left as it is")
        if what == "root.blank" and found is None:
            raise Failure(top.shown(comps), "root.blank: no such subvolume")
    in_use = mounted_below(top, root)
    if in_use is not None:
        raise Failure(top.shown(root), f"is mounted on {in_use}; rotate-root runs before the "
                                          "root is mounted")
    taken, ours = set(), []
    if top.look(old) is None:
        steps.append(MakeOldRoots(old))
    else:
        with opened(top.open(old)) as fd:
            place = (ino_lookup(fd, 0, BTRFS_FIRST_FREE_OBJECTID, top.shown(old))[0],
                     os.fstat(fd).st_ino)
            taken = set(os.listdir(fd))
        # The old roots: subvolumes linked in oldRoots itself, named by a time.
        ours = [(rotation_name(s.name), s.name, s.id) for s in subvols.values()
                if (s.parent, s.dirid) == place and rotation_name(s.name)]
    moved = []  # (name, id) of the old roots this run moves into oldRoots

    def to_old_roots(comps: tuple, why: str) -> None:
        ident = top.subvolume_id(comps)
        changed = subvols[ident].changed if ident in subvols else None
        name = stamp = time_name(changed if changed else now)
        n = 1
        while name in taken:
            n += 1
            name = f"{stamp}.{n}"
        taken.add(name)
        moved.append((name, ident))
        steps.append(MoveToOldRoots(rotating, old + (name,), why))

    if top.look(rotating) is not None:
        to_old_roots(rotating, "left by an interrupted rotation")
    if top.look(root) is None:
        steps.append(MakeRoot(spec.blank, root, "there is no root subvolume", False))
    else:
        # A fresh root that does not take the root's place is deleted
        # again: a failing rotation leaves nothing for the next to keep.
        steps.append(MakeRoot(spec.blank, rotating, "the fresh root", True))
        steps.append(ExchangeRoots(root, rotating))
        to_old_roots(root, "the old root, named by the time of its last change")
    ours += [(rotation_name(name), name, ident) for name, ident in moved]
    ours.sort(reverse=True)
    cutoff = time_name(now - spec.keep_days * 86400)
    why = f"older than {spec.keep_days} days and not among the {spec.keep_count} newest"
    if spec.keep_days == 0:
        cutoff, why = None, f"not among the {spec.keep_count} newest"
    elif ours and time_name(now) < ours[0][0][0]:
        # The clock is behind (a board without RTC starts at 1970): no age
        # can be told, and keep.count alone still holds.
        clock = f"the clock ({time_name(now)}) is before the newest old root's time ({ours[0][0][0]})"
        if spec.keep_count == 0:
            notes.append(f"{top.shown(old)}: {clock}; keep.count is 0, so nothing deleted")
            ours = []
        else:
            notes.append(f"{top.shown(old)}: {clock}; keep.days ignored, the {spec.keep_count} "
                         "newest kept")
            cutoff, why = None, f"not among the {spec.keep_count} newest; keep.days ignored"
    for rank, (stamp, name, ident) in enumerate(ours):
        if rank >= spec.keep_count and (cutoff is None or stamp[0] < cutoff):
            deletions.append(DeleteOldRoot(old + (name,), ident, descendants(subvols, ident), subvols, why))
    return steps, deletions, notes


class RotationStep:
    """One change rotate-root makes on the btrfs top level: `describe` is
    the line --dry-run prints (and -v logs), `execute` makes it, `undo`
    takes back what it made if the rotation stops right after it."""
    __slots__ = ()

    def undo(self, top: "BtrfsTop") -> None:
        pass


class MakeOldRoots(RotationStep):
    __slots__ = ("path",)

    def __init__(self, path: tuple):
        self.path = path

    def describe(self, top: "BtrfsTop") -> str:
        return f"mkdir {top.shown(self.path)} (0:0 0700)"

    def execute(self, top: "BtrfsTop") -> None:
        make_dirs(top, self.path)


class MoveToOldRoots(RotationStep):
    __slots__ = ("path", "to", "why")

    def __init__(self, path: tuple, to: tuple, why: str):
        self.path, self.to, self.why = path, to, why

    def describe(self, top: "BtrfsTop") -> str:
        return f"move {top.shown(self.path)} ({self.why}) to {top.shown(self.to)}"

    def execute(self, top: "BtrfsTop") -> None:
        rename_in(top, self.path, self.to, 0)


class MakeRoot(RotationStep):
    """A fresh root at path: a snapshot of blank, or an empty subvolume;
    deleted again (undo) if it is the one rotated in and the exchange fails."""
    __slots__ = ("blank", "path", "why", "undoable")

    def __init__(self, blank: tuple | None, path: tuple, why: str, undoable: bool):
        self.blank, self.path, self.why, self.undoable = blank, path, why, undoable

    def describe(self, top: "BtrfsTop") -> str:
        fresh = f"snapshot {top.shown(self.blank)} as" if self.blank else "create empty subvolume"
        return f"{fresh} {top.shown(self.path)} ({self.why})"

    def execute(self, top: "BtrfsTop") -> None:
        make_root(top, self.blank, self.path)

    def undo(self, top: "BtrfsTop") -> None:
        if self.undoable:
            destroy_subvolume(top, self.path)


class ExchangeRoots(RotationStep):
    __slots__ = ("root", "fresh")

    def __init__(self, root: tuple, fresh: tuple):
        self.root, self.fresh = root, fresh

    def describe(self, top: "BtrfsTop") -> str:
        return (f"exchange {top.shown(self.root)} and {top.shown(self.fresh)} (the fresh root "
                "takes the root's place)")

    def execute(self, top: "BtrfsTop") -> None:
        rename_in(top, self.root, self.fresh, RENAME_EXCHANGE)


class DeleteOldRoot(RotationStep):
    __slots__ = ("path", "ident", "nested", "subvols", "why")

    def __init__(self, path: tuple, ident: int, nested: list, subvols: dict, why: str):
        self.path, self.ident, self.nested, self.subvols, self.why = path, ident, nested, subvols, why

    def describe(self, top: "BtrfsTop") -> str:
        line = f"delete old root {top.shown(self.path)} ({self.why})"
        if self.nested:
            line += f", first the {len(self.nested)} subvolumes nested in it"
        return line

    def execute(self, top: "BtrfsTop") -> None:
        delete_old_root(top, self.path, self.ident, self.nested, self.subvols)


def descendants(subvols: dict, ident: int) -> list:
    """The ids of the subvolumes nested in subvolume ident, at any depth,
    each after those nested in it (the order they can be deleted in)."""
    children: dict = {}
    for s in subvols.values():
        children.setdefault(s.parent, []).append(s.id)
    order, stack = [], [(ident, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        else:
            stack.append((node, True))
            stack += [(child, False) for child in sorted(children.get(node, ()))]
    return order[:-1]


def make_dirs(top: BtrfsTop, comps: tuple) -> None:
    for i in range(len(comps)):
        if top.look(comps[:i + 1]) is None:
            with opened(top.open(comps[:i])) as fd:
                call("mkdir", top.shown(comps[:i + 1]), os.mkdir, comps[i], 0o700, dir_fd=fd)


def rename_in(top: BtrfsTop, old: tuple, new: tuple, flags: int) -> None:
    shown = top.shown(old)
    with opened(top.open(old[:-1])) as old_dir, opened(top.open(new[:-1])) as new_dir:
        if flags != RENAME_EXCHANGE:
            rename_noreplace(old_dir, old[-1], new_dir, new[-1], shown)
            return
        if libc().renameat2 is None:
            raise Failure(shown, "the C library has no renameat2 (glibc 2.28); not rotated")
        if libc().renameat2(old_dir, os.fsencode(old[-1]), new_dir, os.fsencode(new[-1]), flags) < 0:
            raise oserror("exchange", f"{shown} and {as_path(new)}")


def make_root(top: BtrfsTop, blank: tuple | None, comps: tuple) -> None:
    """A fresh root at comps: a snapshot of blank, or an empty subvolume
    (root's, 0755)."""
    shown = top.shown(comps)
    with opened(top.open(comps[:-1])) as parent:
        if blank is not None:
            with opened(top.open(blank)) as source:
                btrfs_ioctl(parent, BTRFS_IOC_SNAP_CREATE_V2, "BTRFS_IOC_SNAP_CREATE_V2",
                            vol_args(comps[-1], source, 56, shown), shown)
            return
        btrfs_ioctl(parent, BTRFS_IOC_SUBVOL_CREATE, "BTRFS_IOC_SUBVOL_CREATE",
                    vol_args(comps[-1], 0, 8, shown), shown)
    try:
        with opened(top.open(comps)) as fd:
            call("chmod", shown, os.fchmod, fd, 0o755)
    except OSError:
        destroy_subvolume(top, comps)  # not left half made
        raise


def destroy_subvolume(top: BtrfsTop, comps: tuple) -> None:
    """Delete the (empty, fresh) subvolume this run made at comps, if it
    is still one; best effort: the error that stopped the run is the one
    reported."""
    try:
        if top.look(comps) == "subvolume":
            with opened(top.open(comps[:-1])) as parent:
                btrfs_ioctl(parent, BTRFS_IOC_SNAP_DESTROY, "BTRFS_IOC_SNAP_DESTROY",
                            vol_args(comps[-1], 0, 8, top.shown(comps)), top.shown(comps))
    except (Failure, OSError):
        pass


def delete_old_root(top: BtrfsTop, comps: tuple, ident: int, nested: list, subvols: dict) -> None:
    """Delete the old root at comps, subvolume ident, and first every
    subvolume nested in it (deepest first), each where the root tree says
    it is linked and checked to be that subvolume before it is deleted."""
    paths = {ident: comps}
    for sub in reversed(nested):  # each after the one it is nested in
        s = subvols[sub]
        paths[sub] = paths[s.parent] + ino_lookup(top.fd, s.parent, s.dirid, top.shown(comps))[1] + (s.name,)
    for sub in nested + [ident]:
        shown = top.shown(paths[sub])
        if top.look(paths[sub]) != "subvolume" or top.subvolume_id(paths[sub]) != sub:
            raise Failure(shown, "is no longer the subvolume found; not deleted")
        with opened(top.open(paths[sub][:-1])) as parent:
            btrfs_ioctl(parent, BTRFS_IOC_SNAP_DESTROY, "BTRFS_IOC_SNAP_DESTROY",
                        vol_args(paths[sub][-1], 0, 8, shown), shown)


def rotation_summary(spec: RootRotation) -> str:
    """plan's line for the rotation, which runs before the root is mounted
    (rotate-root --dry-run lists its steps on the filesystem as it is)."""
    fresh = f"a snapshot of {as_path(spec.blank)}" if spec.blank else "an empty subvolume"
    return (f"rotate-root (before the root is mounted): move {spec.device}[{as_path(spec.subvolume)}] "
            f"to {as_path(spec.old_roots)}/<time of its last change>, fresh root {fresh}, delete old "
            f"roots older than {spec.keep_days} days and not among the {spec.keep_count} newest")


def command_rotate_root(config: Config, log: Log, out, dry_run: bool) -> int:
    spec = config.root
    if spec is None:
        log.error('rotate-root: the config has no "root" key (the btrfs filesystem and root subvolume)')
        return EXIT_CONFIG
    try:
        top = BtrfsTop(find_btrfs(spec.device, config.device_timeout), dry_run).mount()
    except (Failure, OSError) as exc:
        log.error(str(failure(exc, spec.device)) + "; the root is not rotated")
        return EXIT_STORAGE
    failed = 0
    with top:
        try:
            steps, deletions, notes = plan_rotation(spec, top, time.time())
        except (Failure, OSError) as exc:
            log.error(str(failure(exc, top.shown(spec.subvolume))) + "; the root is not rotated")
            return EXIT_STORAGE
        for note in notes:
            log.warn(note)
        if dry_run:
            lines = [step.describe(top) for step in steps + deletions]
            out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))
            return EXIT_OK
        done = None
        for step in steps:
            log.info(step.describe(top))
            try:
                step.execute(top)
            except (Failure, OSError) as exc:
                if done is not None:
                    done.undo(top)
                log.error(str(failure(exc, top.shown(spec.subvolume))) + "; rotation stopped, "
                          f"{top.shown(spec.subvolume)} is left as it is")
                return EXIT_STORAGE
            done = step
        for step in deletions:
            log.info(step.describe(top))
            try:
                step.execute(top)
            except (Failure, OSError) as exc:
                log.error(str(failure(exc, top.shown(spec.old_roots))) + "; tried again at the next run")
                failed += 1
    return EXIT_FAILED if failed else EXIT_OK


# --- Command line ------------------------------------------------------------------------

USAGE = """\
usage: {prog} [--config PATH] [--root PATH] [-v|-q] [COMMAND] [--json] [--tree]
       [--include PATH] [--dry-run]

Reconnect persistent state to a freshly wiped root (NixOS impermanence's
environment.persistence, as JSON), before switch_root or by hand.

commands (default: apply):
  apply    mount persistent storage, create directories, bind/link everything
  plan     print, in order, every action apply would take now; change nothing
  status   compare the live system with the config, one line per entry
           (--json for machine-readable output); exit 1 on drift
  unmount  undo what apply set up (bind mounts, links), in reverse order;
           never deletes or modifies anything in persistent storage
           (--dry-run: print what it would do)
  check    validate the config only
  diff     list what the next boot loses: every path on the root's own
           filesystem that no entry keeps, largest first (--tree, --json,
           --include PATH to walk one of /nix /proc /sys /dev /run /tmp)
  orphans  list what each storage holds that no entry keeps (--tree,
           --json); deletes nothing
  rotate-root  btrfs, in the initrd before the root is mounted: move the
           root subvolume to old_roots/<time of its last change>, delete
           old roots beyond the config's "root".keep, create a fresh root
           (--dry-run: print what it would do)
  save     at shutdown: move kept files that programs replaced by
           rename() (a file where the link or bind was) into storage,
           then link or bind them again (--dry-run: print what it would do)

options:
  --config PATH  config file (default: $IMPERMANENCE_CONFIG, else
                 /etc/impermanence.json)
  --root PATH    the root the config's paths are relative to (default: /)
  -v, --verbose  log every action
  -q, --quiet    only errors
  --json         with status, diff, orphans: JSON output
  --tree         with diff, orphans: a tree, not largest first
  --include PATH with diff: walk PATH too (repeatable)
  --dry-run      with unmount, rotate-root, save: change nothing
  -h, --help     show this help
  --version      show the version

exit status: 0 all in place; 1 an entry failed (others applied), status
found drift or diff could not read a path; 2 usage or config error, nothing
changed; 3 a persistent storage location was unavailable, nothing bound from
it; 4 apply, unmount, rotate-root or save run without root, nothing changed.
"""


def usage() -> str:
    """USAGE under the name the script was started by: impermanence_boot.py
    (also for its .pyc), or impermanence-boot as pip installs it."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if prog.endswith(".pyc"):
        prog = prog[:-1]
    if not prog or prog in ("-c", "__main__.py"):
        prog = "impermanence_boot.py"
    return USAGE.replace("{prog}", prog)

COMMANDS = ("apply", "plan", "status", "unmount", "check", "diff", "orphans", "rotate-root", "save")
# The options a command takes besides --config, --root, -v, -q.
COMMAND_OPTIONS = {"--json": ("status", "diff", "orphans"), "--tree": ("diff", "orphans"),
                   "--include": ("diff",), "--dry-run": ("unmount", "rotate-root", "save")}


class Options(Record):
    __slots__ = _fields = ("command", "config", "root", "verbosity", "json", "help", "version",
                           "tree", "include", "dry_run")


def parse_args(argv: list) -> Options:
    command, config, root, verbosity, as_json = None, None, "/", 1, False
    given, include = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        value = None
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)
        if arg in ("-h", "--help", "--version"):
            return Options(None, None, None, 1, False, arg != "--version", arg == "--version",
                           False, (), False)
        if arg == "--include":
            if value is None:
                if not args:
                    raise UsageError(f"{arg} needs a path")
                value = args.pop(0)
            include.append(parse_include(value))
            given.append(arg)
        elif arg in ("--tree", "--dry-run") and value is None:
            given.append(arg)
        elif arg in ("--config", "--root"):
            if value is None:
                if not args:
                    raise UsageError(f"{arg} needs a path")
                value = args.pop(0)
            if not value:
                raise UsageError(f"{arg} needs a non-empty path")
            if arg == "--config":
                config = value
            else:
                root = value
        elif value is not None:
            raise UsageError(f"{arg} takes no value")
        elif arg in ("-v", "--verbose"):
            verbosity = 2
        elif arg in ("-q", "--quiet"):
            verbosity = 0
        elif arg == "--json":
            as_json = True
        elif arg in COMMANDS and command is None:
            command = arg
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg}")
        elif command is not None:
            raise UsageError(f"unexpected argument {arg!r} after command {command}")
        else:
            raise UsageError(f"unknown command {arg!r} (one of {', '.join(COMMANDS)})")
    command = command or "apply"
    for option in given + ["--json"] * as_json:
        if command not in COMMAND_OPTIONS[option]:
            raise UsageError(f"{option} goes with {', '.join(COMMAND_OPTIONS[option])}")
    if config is None:
        config = os.environ.get("IMPERMANENCE_CONFIG") or DEFAULT_CONFIG
    return Options(command, config, root, verbosity, as_json, False, False, "--tree" in given,
                   tuple(include), "--dry-run" in given)


def parse_include(text: str) -> tuple:
    if not text.startswith("/") or "\0" in text:
        raise UsageError(f"--include needs an absolute path, not {text!r}")
    comps = tuple(c for c in text.split("/") if c)
    if not comps or "." in comps or ".." in comps:
        raise UsageError(f"--include {text!r}: a path below the root, without . or ..")
    return comps


def main(argv: list | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write(f"impermanence: {str(exc).translate(UNPRINTABLE)}\n{usage().splitlines()[0]}\n")
        return EXIT_CONFIG
    if opts.help:
        sys.stdout.write(usage())
        return EXIT_OK
    if opts.version:
        sys.stdout.write(f"impermanence_boot {VERSION}\n")
        return EXIT_OK
    log = Log(opts.verbosity)
    euid = os.geteuid()
    if euid != 0 and opts.command in NEEDS_ROOT:
        log.error(f"{opts.command} needs root: it mounts, unmounts and sets owners "
                  f"(running as uid {euid}); nothing was changed")
        return EXIT_PRIVILEGE
    if euid != 0 and opts.command not in ("check",):
        log.warn(f"not root (uid {euid}): {opts.command} sees only what this user may read "
                 "and probes no device; run it as root for the whole answer")
    try:
        if opts.command == "check":
            return command_check(opts.config, log, sys.stdout)
        config = load_config_file(opts.config)
    except ConfigError as exc:
        where = (exc.where if isinstance(exc, ConfigFileError) or exc.where.startswith("/")
                 else f"{opts.config}: {exc.where}")
        log.error(f"{where}: {exc.cause}")
        return EXIT_CONFIG
    root = os.path.realpath(opts.root)
    if not os.path.isdir(root):
        log.error(f"{opts.root}: --root is not a directory")
        return EXIT_CONFIG
    lock = -1
    try:
        if opts.command == "apply" or (opts.command == "unmount" and not opts.dry_run):
            lock = lock_root(root, log)
        if opts.command in ("apply", "unmount", "plan"):
            choose_utab(root, log)
        if opts.command == "apply":
            # Directories are made with their final mode; nothing is
            # created with a mode not set explicitly.
            os.umask(0)
            return command_apply(config, root, log)
        if opts.command == "plan":
            return command_plan(config, root, log, sys.stdout)
        if opts.command == "status":
            return command_status(config, root, log, sys.stdout, opts.json)
        if opts.command == "diff":
            return command_diff(config, root, log, sys.stdout, opts.json, opts.tree, opts.include)
        if opts.command == "orphans":
            return command_orphans(config, root, log, sys.stdout, opts.json, opts.tree)
        if opts.command == "rotate-root":
            return command_rotate_root(config, log, sys.stdout, opts.dry_run)
        if opts.command == "unmount":
            return command_unmount(config, root, log, sys.stdout, opts.dry_run)
        if opts.command == "save":
            os.umask(0)
            return command_save(config, root, log, sys.stdout, opts.dry_run)
        raise AssertionError(f"no dispatch for command {opts.command}")
    except Busy as exc:
        log.error(str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILED
    except Exception as exc:  # a bug: still one line, details with -v
        log.error(str(failure(exc, opts.command)))
        if opts.verbosity >= 2:
            import traceback

            traceback.print_exc()
        return EXIT_FAILED
    finally:
        if lock >= 0:
            os.close(lock)  # the lock goes with it (main may run in a longer process)


if __name__ == "__main__":
    # Exit without tearing the interpreter down: every file this writes is
    # closed by then, and freeing the module's objects one by one is about
    # a tenth of a boot's whole run.
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = status or EXIT_FAILED
    os._exit(status)
