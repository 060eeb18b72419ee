#!/usr/bin/env python3
"""impermanence_boot: reconnect persistent state to a freshly wiped root.

Run from the initramfs before switch_root (or by hand for recovery), it
mounts the persistent filesystems, creates the directories that must exist
with the right owner and mode, and bind-mounts or links every kept
directory and file into the new root. The configuration is the JSON form
of NixOS impermanence's `environment.persistence`.

Data flows top to bottom: command line -> config (validated records) ->
per-entry plan (a list of actions, which `plan` prints) -> executor, which
walks every path component by component with O_NOFOLLOW file descriptors.

Only the standard library, and as little of it as possible: every module
imported here is copied into every initramfs and loaded at every boot.
`json` and `_ctypes` are imported only by the code paths that need them.
"""
from __future__ import annotations

import errno
import gc
import os
import stat
import sys
import time

# --- Kernel constants (linux/mount.h, linux/fs.h) -------------------------

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
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
UMOUNT_NOFOLLOW = 8
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

# Access and modification time given to the mount points apply creates on
# the fresh root, so `unmount` removes those and nothing else: nanoseconds
# since the epoch that no clock or archive gives a file. Hidden under the
# bind mount while it is there; one utimensat(2), by name where the parent
# only root can write, where an extended attribute took an open, a setxattr
# and a close. (A filesystem with coarser timestamps keeps no mark:
# `unmount` then leaves its mount points in place.)
MARK_TIME_NS = 314_159_265
MARK_TIMES = (MARK_TIME_NS, MARK_TIME_NS)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STORAGE = 0, 1, 2, 3

DEFAULT_CONFIG = "/etc/impermanence.json"
# The big objects of a run (config, tree, plan), left for the process's
# exit to free at once: freed one by one on return, 10,000 entries and
# their tree take milliseconds, for nothing.
KEPT_UNTIL_EXIT: list = []
MACHINE_ID = ("etc", "machine-id")

class Libc:
    """The libc calls the os module lacks, bound through `_ctypes`, the C
    half of ctypes. The ctypes package itself would add five modules
    (ctypes, types, struct, _struct, ctypes._endian) to every initramfs and
    their loading to every boot. A call missing from an old C library is None."""

    def __init__(self):
        import _ctypes

        class Int(_ctypes._SimpleCData):
            _type_ = "i"

        class UInt(_ctypes._SimpleCData):
            _type_ = "I"

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
        self.open_tree = bind("open_tree", Int, CharP, UInt)  # glibc >= 2.36
        self.move_mount = bind("move_mount", Int, CharP, Int, CharP, UInt)
        if self.open_tree is None or self.move_mount is None:
            self.open_tree = self.move_mount = None


_libc = None


def _load_libc() -> Libc:
    global _libc
    if _libc is None:
        _libc = Libc()
    return _libc


def libc_error(shown: str | None = None) -> OSError:
    """The error a libc call just reported through errno, as os functions
    raise it."""
    err = _libc.get_errno()
    return OSError(err, os.strerror(err), shown)


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None, shown: str | None = None) -> None:
    """mount(2); raises OSError(errno, strerror, path) like os functions."""
    lib = _load_libc()
    if lib.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)) != 0:
        raise libc_error(shown or target)


_new_mount_api = True  # until open_tree(2) is found missing


def clone_mount(dir_fd: int, name: str) -> int | None:
    """A detached bind mount of `name` in dir_fd ("" for dir_fd itself),
    never following a link at `name`: open_tree(2) with OPEN_TREE_CLONE
    (Linux 5.2). With move_mount(2) it binds without the two /proc/self/fd
    lookups mount(2) would need, which cost more than the mount itself;
    looked up by name, the source costs no open and close of its own. The
    caller fstat()s the fd it gets to check what it cloned. None where the
    kernel or C library lacks it: bind_fds then falls back to mount(2)."""
    global _new_mount_api
    if not _new_mount_api:
        return None
    lib = _libc or _load_libc()
    if lib.move_mount is not None:
        flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_SYMLINK_NOFOLLOW if name else AT_EMPTY_PATH)
        tree = lib.open_tree(dir_fd, os.fsencode(name), flags)
        if tree >= 0:
            return tree
        exc = libc_error()
        if exc.errno != errno.ENOSYS:
            raise exc
    _new_mount_api = False
    return None


def attach_mount(tree: int, target_fd: int) -> None:
    """move_mount(2) the detached mount `tree` onto target_fd."""
    if _libc.move_mount(tree, b"", target_fd, b"",
                        MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0:
        raise libc_error()  # Executor.run names the target


def attach_mount_at(tree: int, dir_fd: int, name: str) -> None:
    """move_mount(2) the detached mount `tree` onto `name` in dir_fd,
    never following a link there."""
    if _libc.move_mount(tree, b"", dir_fd, os.fsencode(name), MOVE_MOUNT_F_EMPTY_PATH) != 0:
        raise libc_error()  # Executor.run names the target


def bind_fds(source_fd: int, target_fd: int, proc_fds: bool) -> bool:
    """mount --bind from one open fd onto another where open_tree(2) is
    missing (Linux < 5.2, or a C library without it): mount(2) on the two
    /proc/self/fd magic links, exactly the inodes opened, no path looked up
    again. False without /proc: the caller then has only paths."""
    if not proc_fds:
        return False
    if _libc.mount(b"/proc/self/fd/%d" % source_fd, b"/proc/self/fd/%d" % target_fd,
                   None, MS_BIND, None) != 0:
        raise libc_error()
    return True


RENAME_NOREPLACE = 1


def rename_noreplace(dir_fd: int, old: str, new: str, shown: str) -> None:
    """renameat2(RENAME_NOREPLACE) within one directory: never replaces what
    appeared at `new` meanwhile. Where the kernel or filesystem lacks it,
    a check then rename(2)."""
    lib = _load_libc()
    if lib.renameat2 is not None:
        if lib.renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), RENAME_NOREPLACE) == 0:
            return
        exc = libc_error(shown)
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise exc
    try:
        os.stat(new, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(old, new, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), shown)


def umount2(target: str, flags: int, shown: str | None = None) -> None:
    lib = _load_libc()
    if lib.umount2(_bytes(target), flags) != 0:
        raise libc_error(shown or target)


# --- Errors and messages ---------------------------------------------------

class UsageError(Exception):
    pass


class ConfigError(Exception):
    """A problem in the configuration, with the key path where it is."""

    def __init__(self, where: str, cause: str):
        super().__init__(f"{where}: {cause}")
        self.where, self.cause = where, cause


class ConfigFileError(ConfigError):
    """A config file that cannot be read, decoded or written: `where` is
    the file's path, shown as given."""


class EntryError(Exception):
    """One entry (or storage location) cannot be applied: path and cause."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


# What a path (or a link's text, which a user chooses) may hold that would
# end a line, move the cursor or recolour a terminal, or fail to encode
# (bytes that are not UTF-8, decoded with surrogateescape): written escaped
# in every message and every line of plan and status, so one stays one.
UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0))}
UNPRINTABLE.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029)})
UNPRINTABLE.update({c: f"\\x{c - 0xdc00:02x}" for c in range(0xdc80, 0xdd00)})


def internal_error(exc: Exception) -> str:
    return f"internal error: {type(exc).__name__}: {exc}"


def failure_text(exc: Exception, shown: str) -> str:
    """One entry's failure as `<path>: <cause>`; shown is the entry's path,
    named when the error does not name one (an account error names the
    user or group: the entry is added)."""
    if isinstance(exc, EntryError):
        return f"{exc.path}: {exc.cause}" + ("" if exc.path.startswith("/") else f" (for {shown})")
    if isinstance(exc, OSError):
        return f"{exc.filename or shown}: {describe_oserror(exc)}"
    return f"{shown}: {internal_error(exc)}"  # a bug: this entry only


def describe_oserror(exc: OSError) -> str:
    return exc.strerror or str(exc)


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
        # While entries run in two processes: (entry, level, text, to kmsg)
        # held back and written later in entry order (see run_in_two).
        self.held: list | None = None
        self.entry = 0

    @staticmethod
    def _open_kmsg() -> int:
        try:
            return os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return -1

    def _emit(self, level: int, text: str, to_kmsg: bool) -> None:
        if self.held is not None:
            self.held.append((self.entry, level, text, to_kmsg))
            return
        line = "impermanence: " + text.translate(UNPRINTABLE)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if to_kmsg and self.kmsg >= 0:
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
        self._emit(3, text, True)

    def warn(self, text: str) -> None:
        if self.verbosity >= 1:
            self._emit(4, text, True)

    def info(self, text: str) -> None:
        if self.verbosity >= 2:
            self._emit(6, text, True)

    def release(self, held: list) -> None:
        """Write held messages, in entry order (stable within an entry)."""
        self.held = None
        held.sort(key=lambda m: m[0])
        for _, level, text, to_kmsg in held:
            self._emit(level, text, to_kmsg)


# --- Config model ------------------------------------------------------------

_set_field = object.__setattr__


class Record:
    """A small frozen record (dataclasses costs ~12 ms of imports at boot)."""

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
    to the root: target ('var', 'log'), storage ('persistent',).

    Made for every item of the config, so unlike the other records not
    guarded by a __setattr__ that raises: its fields are stored as the
    interpreter stores any plain instance's, inline, in a fifth of the
    memory of a dict of its own, and read faster (at 10,000 entries, 4 ms
    less to make them at every boot). Nothing assigns to an entry once it
    is made (tests/test_config.py checks the source for it)."""
    __setattr__ = object.__setattr__
    _fields = ("kind", "target", "storage", "perms", "method", "parent_perms",
               "home", "home_owner", "where", "source")

    def __init__(self, kind, target, storage, perms, method, parent_perms, home, home_owner, where):
        self.kind = kind
        self.target = target
        self.storage = storage
        self.perms = perms
        self.method = method
        self.parent_perms = parent_perms
        self.home = home
        self.home_owner = home_owner
        self.where = where
        self.source = storage + target


class Config(Record):
    __slots__ = _fields = ("filesystems", "device_timeout", "accounts", "group_ids",
                           "storages", "entries")


ROOT_PERMS = Perms("root", "root", 0o755)


def as_path(comps: tuple) -> str:
    return "/" + "/".join(comps)


# --- Modes -------------------------------------------------------------------

_WHO_BITS = {"u": 0o4700, "g": 0o2070, "o": 0o1007}
_PERM_BITS = {"r": 0o444, "w": 0o222, "x": 0o111, "X": 0o111, "s": 0o6000, "t": 0o1000}


def parse_mode(text: str) -> int:
    """Octal ("0700", "755") or symbolic chmod clauses applied to a 0 base
    ("u=rwx,g=rx,o=", "u=rwx,go=u-w"). Raises ValueError with a reason."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string such as \"0755\", not {type_name(text)}")
    if text and not text.strip("01234567"):
        if len(text) > 4:
            raise ValueError(f"octal mode {text!r} has more than 4 digits")
        return int(text, 8)
    if not text:
        raise ValueError("is empty")
    mode = 0
    for clause in text.split(","):
        i = 0
        who = 0
        while i < len(clause) and clause[i] in "ugoa":
            who |= 0o7777 if clause[i] == "a" else _WHO_BITS[clause[i]]
            i += 1
        if who == 0:
            who = 0o7777
        if i == len(clause):
            raise ValueError(f"clause {clause!r} has no operator (=, + or -)")
        while i < len(clause):
            op = clause[i]
            if op not in "=+-":
                raise ValueError(f"{clause!r}: expected =, + or - at {clause[i:]!r}")
            i += 1
            bits = 0
            if i < len(clause) and clause[i] in "ugo":
                # A copy ("g=u"): that class's rwx as the mode stands now.
                shift = {"u": 6, "g": 3, "o": 0}[clause[i]]
                bits = ((mode >> shift) & 7) * 0o111
                i += 1
            else:
                while i < len(clause) and clause[i] in _PERM_BITS:
                    bits |= _PERM_BITS[clause[i]]
                    i += 1
            if i < len(clause) and clause[i] not in "=+-":
                raise ValueError(f"{clause!r}: unknown permission {clause[i]!r}")
            bits &= who
            if op == "=":
                mode = (mode & ~who) | bits
            elif op == "+":
                mode |= bits
            else:
                mode &= ~bits
    return mode & 0o7777


def format_mode(mode: int) -> str:
    return format(mode & 0o7777, "04o")


# --- Config loading ------------------------------------------------------------

# Keys the NixOS option system adds to evaluated items; accepted and ignored
# where they carry no meaning here.
NIXOS_INTERNAL = frozenset({"dirPath", "filePath", "home", "defaultPerms",
                            "persistentStoragePath", "enableDebugging",
                            "enableWarnings", "assertions", "hideMount",
                            "allowTrash", "_module"})

TOP_KEYS = ("fileSystems", "deviceTimeout", "users", "groups", "persistence")
FS_KEYS = ("device", "fsType", "options", "label", "mountPoint", "neededForBoot", "noCheck")
ACCOUNT_KEYS = ("uid", "group", "home", "homeMode", "name", "isNormalUser",
                "isSystemUser", "description")
GROUP_KEYS = ("gid", "name", "members")
LOCATION_KEYS = ("enable", "persistentStoragePath", "hideMounts", "directories",
                 "files", "users")
USER_KEYS = ("directories", "files", "home")
DIR_KEYS = ("directory", "user", "group", "mode")
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


def check_keys(obj: dict, where: str, known: tuple, tolerated=NIXOS_INTERNAL) -> None:
    for key in obj:
        if key in known or key in tolerated:
            continue
        hint = ""
        if isinstance(key, str):
            best = min(known, key=lambda k: edit_distance(key, k))
            if edit_distance(key, best) <= max(2, len(best) // 3):
                hint = f"; did you mean '{best}'?"
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
    """A path's components. The error location is where[.key], made only
    for an error: this runs for every item of the config."""
    if isinstance(text, str) and "\0" not in text and text.startswith("/") == absolute:
        comps = tuple((text[1:] if absolute else text).split("/"))
        if "" not in comps and "." not in comps and ".." not in comps:
            return comps
    where = key_path(where, key) if key is not None else where
    expect(text, str, where, "a path string")
    if "\0" in text:
        raise ConfigError(where, "path contains a NUL byte")
    if absolute and not text.startswith("/"):
        raise ConfigError(where, f"path {text!r} must be absolute (start with /)")
    if not absolute and text.startswith("/"):
        raise ConfigError(where, f"path {text!r} must be relative to the user's home")
    raise ConfigError(where, f"path {text!r} must not be empty or contain empty, '.' or '..' components")


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
    if "user" not in obj and "group" not in obj and "mode" not in obj:
        return default
    user = parse_owner(obj["user"], where, "user") if "user" in obj else default.user
    group = parse_owner(obj["group"], where, "group") if "group" in obj else default.group
    mode = default.mode
    if "mode" in obj:
        try:
            mode = parse_mode(obj["mode"])
        except ValueError as exc:
            raise ConfigError(key_path(where, "mode"), f"invalid mode: {exc}") from None
    return Perms(user, group, mode)


def parse_options(value, where: str) -> tuple:
    if isinstance(value, str):
        return tuple(o for o in value.split(",") if o)
    expect(value, list, where, "a list of strings or a comma-separated string")
    for i, option in enumerate(value):
        expect(option, str, key_path(where, i), "a string")
    return tuple(o for opt in value for o in opt.split(",") if o)


def read_config_file(path: str) -> tuple:
    """(the JSON, and for a compiled config (see `compile`) its records when
    this very script compiled them and they are intact, else None; whether
    the file is a compiled config)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read config: {describe_oserror(exc)}") from None
    if raw.startswith(COMPILED_MAGIC):
        return (*split_compiled(raw, path), True)
    return raw, None, False


def config_from_json(raw: bytes, path: str) -> Config:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"config is not valid UTF-8 (byte {exc.start})") from None
    return load_config(text, path)


def load_config_file(path: str, log: Log | None = None) -> Config:
    """The config at path: a compiled config's records when they can be
    used, else the JSON (a compiled config's with a warning)."""
    json_bytes, payload, compiled = read_config_file(path)
    if payload is not None:
        config = config_from_payload(payload)
        if config is not None:
            return config
    if compiled and log is not None:
        log.warn(f"{path}: compiled by another version of impermanence_boot.py, or damaged: "
                 "reading its JSON instead (slower); compile it again")
    return config_from_json(json_bytes, path)


class _JsonContext:
    """What _json's C scanner reads from json.JSONDecoder: the defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity, as json.loads reads them
    memo: dict = {}


JSON_SPACE = " \t\n\r"


def parse_json(text: str):
    """json.loads, through the C scanner json uses, without importing json:
    that module brings re, enum, functools and more into every boot.
    Any error is raised again by json.loads itself, for its message."""
    try:
        import _json

        scan = _json.make_scanner(_JsonContext)
        start = len(text) - len(text.lstrip(JSON_SPACE))
        value, end = scan(text, start)
        if not text[end:].strip(JSON_SPACE):
            return value
    except Exception:  # ImportError, any parse error; on some inputs the
        pass           # C scanner even fails with SystemError
    import json

    return json.loads(text)


def load_config(text: str, name: str = "config") -> Config:
    try:
        data = parse_json(text)
    except ValueError as exc:  # JSONDecodeError, or a number too large
        line, col = getattr(exc, "lineno", None), getattr(exc, "colno", None)
        at = f" at line {line} column {col}" if line else ""
        msg = getattr(exc, "msg", str(exc))
        raise ConfigFileError(name, f"invalid JSON{at}: {msg}") from None
    except RecursionError:
        raise ConfigFileError(name, "invalid JSON: nested too deeply") from None
    # Text decoded from UTF-8 holds no lone surrogate; only a \u escape
    # can make one.
    return parse_config(data, escapes="\\u" in text)


def check_unicode(data) -> None:
    """JSON may spell lone surrogates ("\\ud800"), which no path, name or
    option can be encoded from: reject them where they are. The walk
    builds key paths only once it has found one."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii() and not valid_unicode(key):
                    return locate_bad_unicode(data)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and not value.isascii() and not valid_unicode(value):
            return locate_bad_unicode(data)


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def locate_bad_unicode(data) -> None:
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        items = (value.items() if isinstance(value, dict)
                 else enumerate(value) if isinstance(value, list) else ())
        for key, item in items:
            at = key_path(where, key if isinstance(key, int) else key.encode("utf-8", "replace").decode())
            if isinstance(key, str) and not valid_unicode(key):
                raise ConfigError(at, "key is not valid Unicode (lone surrogate)")
            if isinstance(item, str) and not valid_unicode(item):
                raise ConfigError(at or "(top level)", "is not valid Unicode (lone surrogate)")
            stack.append((at, item))


def parse_config(data, escapes: bool = True) -> Config:
    expect(data, dict, "(top level)", "a JSON object")
    if escapes:
        check_unicode(data)
    check_keys(data, "", TOP_KEYS)

    timeout = 30.0
    if "deviceTimeout" in data:
        timeout = expect(data["deviceTimeout"], float, "deviceTimeout", "a number of seconds")
        if not 0 <= timeout <= 86400:
            raise ConfigError("deviceTimeout", f"{timeout} is not between 0 and 86400 seconds")

    accounts = {}
    users = expect(data.get("users", {}), dict, "users", "an object")
    for name, spec in users.items():
        where = key_path("users", name)
        parse_owner(name, where)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, ACCOUNT_KEYS, frozenset())
        uid = spec.get("uid")
        if uid is not None and not valid_id(expect(uid, int, key_path(where, "uid"), "a number")):
            raise ConfigError(key_path(where, "uid"), f"{uid} is not a valid id (0 to {ID_MAX})")
        group = parse_owner(spec["group"], key_path(where, "group")) if spec.get("group") not in (None, "") else None
        home = None
        if spec.get("home") is not None:
            home = parse_components(spec["home"], key_path(where, "home"), absolute=True)
        home_mode = None
        if spec.get("homeMode") is not None:
            try:
                home_mode = parse_mode(spec["homeMode"])
            except ValueError as exc:
                raise ConfigError(key_path(where, "homeMode"), f"invalid mode: {exc}") from None
        accounts[name] = Account(name, uid, group, home, home_mode)

    group_ids = {}
    groups = expect(data.get("groups", {}), dict, "groups", "an object")
    for name, spec in groups.items():
        where = key_path("groups", name)
        parse_owner(name, where)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, GROUP_KEYS, frozenset())
        gid = spec.get("gid")
        if gid is not None and not valid_id(expect(gid, int, key_path(where, "gid"), "a number")):
            raise ConfigError(key_path(where, "gid"), f"{gid} is not a valid id (0 to {ID_MAX})")
        group_ids[name] = gid

    filesystems = []
    fs_table = expect(data.get("fileSystems", {}), dict, "fileSystems", "an object")
    for mountpoint, spec in fs_table.items():
        where = key_path("fileSystems", mountpoint)
        comps = parse_components(mountpoint, where, absolute=True)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, FS_KEYS, frozenset())
        device = spec.get("device")
        if device is None and spec.get("label") is not None:
            device = "LABEL=" + expect(spec["label"], str, key_path(where, "label"), "a string")
        if device is None:
            raise ConfigError(key_path(where, "device"), "is required (a path, UUID=, LABEL=, PARTUUID= or PARTLABEL=)")
        expect(device, str, key_path(where, "device"), "a string")
        if not device or "\0" in device:
            raise ConfigError(key_path(where, "device"), f"{device!r} is not a device")
        if "=" in device and not device.startswith("/"):
            tag = device.split("=", 1)[0]
            if tag not in ("UUID", "LABEL", "PARTUUID", "PARTLABEL"):
                raise ConfigError(key_path(where, "device"), f"unknown tag {tag}= (use UUID=, LABEL=, PARTUUID= or PARTLABEL=)")
        elif not device.startswith("/"):
            raise ConfigError(key_path(where, "device"), f"{device!r} must be an absolute path or UUID=, LABEL=, PARTUUID=, PARTLABEL=")
        fs_type = expect(spec.get("fsType", "auto"), str, key_path(where, "fsType"), "a string") or "auto"
        options = parse_options(spec.get("options", []), key_path(where, "options"))
        filesystems.append(FileSystem(comps, device, fs_type, options, where))

    entries: list[Entry] = []
    storages: list[tuple] = []
    homes: dict[tuple, str] = {}
    locations = expect(data.get("persistence", {}), dict, "persistence", "an object")
    for name, spec in locations.items():
        where = key_path("persistence", name)
        expect(spec, dict, where, "an object")
        check_keys(spec, where, LOCATION_KEYS)
        if not expect(spec.get("enable", True), bool, key_path(where, "enable"), "true or false"):
            continue
        storage_text = spec.get("persistentStoragePath", name)
        storage = parse_components(storage_text, key_path(where, "persistentStoragePath")
                                   if "persistentStoragePath" in spec else where, absolute=True)
        expect(spec.get("hideMounts", False), bool, key_path(where, "hideMounts"), "true or false")
        for key in ("directories", "files"):
            base = key_path(where, key)
            items = expect(spec.get(key, []), list, base, "a list")
            entries += parse_items(key, items, base, storage, (), None, ROOT_PERMS, None)
        user_table = expect(spec.get("users", {}), dict, key_path(where, "users"), "an object")
        for user, uspec in user_table.items():
            uwhere = key_path(key_path(where, "users"), user)
            parse_owner(user, uwhere)
            expect(uspec, dict, uwhere, "an object")
            check_keys(uspec, uwhere, USER_KEYS)
            account = accounts.get(user)
            if uspec.get("home") is not None:
                home = parse_components(uspec["home"], key_path(uwhere, "home"), absolute=True)
            elif account and account.home:
                home = account.home
            else:
                home = ("root",) if user == "root" else ("home", user)
            homes.setdefault(home, user)
            home_mode = account.home_mode if account and account.home_mode is not None else 0o700
            default = Perms(user, account.group if account and account.group else None, 0o755)
            for key in ("directories", "files"):
                base = key_path(uwhere, key)
                items = expect(uspec.get(key, []), list, base, "a list")
                entries += parse_items(key, items, base, storage, home, user, default, home_mode)
        if storage not in storages:
            storages.append(storage)
    for account in accounts.values():
        if account.home:
            homes.setdefault(account.home, account.name)

    entries.sort(key=lambda e: e.target)
    targets = [e.target for e in entries]
    attach_homes(entries, targets, homes)
    used = entry_storages(entries)
    check_overlaps(entries, targets, filesystems, storages, used)
    for storage in used:
        if storage not in storages:
            storages.append(storage)
    return Config(tuple(filesystems), float(timeout), accounts, group_ids,
                  tuple(storages), tuple(entries))


# In the bare paths of a list joined by newlines (a user's given a leading
# "/" each), what marks an empty, "." or ".." component or a NUL.
BAD_IN_PATHS = ("//", "/./", "/../", "/\n", "/.\n", "/..\n", "\0")


def parse_items(key: str, items: list, base: str, storage: tuple, home: tuple,
                user: str | None, default: Perms, home_mode: int | None) -> list:
    """parse_item for every item of a list. The bare path strings, the
    common form, are checked all at once: joined by newlines, a few scans
    of that one text find a path that is not absolute (in a user's list,
    not relative), an empty, "." or ".." component or a NUL; when there is
    none, each is just split. Otherwise, and for the objects, every item
    is parsed alone, for its message."""
    paths = [item for item in items if type(item) is str]
    if user is None and len(paths) != len(items) and any(
            type(item) is dict and item.get("home") is not None
            for item in [item for item in items if type(item) is not str]):
        # NixOS impermanence's evaluated option repeats each users.<name>
        # item in its location's lists, with its home: read under users.
        return [parse_item(key, item, f"{base}[{i}]", storage, home, user, default, home_mode)
                for i, item in enumerate(items)
                if not (type(item) is dict and item.get("home") is not None)]
    lead = "" if user is None else "/"
    text = "\n" + lead + ("\n" + lead).join(paths) + "\n"
    if not paths or (text.count("\n") != len(paths) + 1  # a newline inside a path
                     or text.count("\n/") != len(paths)
                     or any(bad in text for bad in BAD_IN_PATHS)):
        return [parse_item(key, item, f"{base}[{i}]", storage, home, user, default, home_mode)
                for i, item in enumerate(items)]
    kind = "directory" if key == "directories" else "file"
    perms = default if kind == "directory" else None
    home_info = (home, user, home_mode) if user is not None else None
    skip = 1 - len(lead)  # the leading "/" of a system-level path
    return [Entry(kind, home + tuple(item[skip:].split("/")), storage, perms, "auto", None,
                  home_info, user, f"{base}[{i}]") if type(item) is str
            else parse_item(key, item, f"{base}[{i}]", storage, home, user, default, home_mode)
            for i, item in enumerate(items)]


def parse_item(key: str, item, where: str, storage: tuple, home: tuple,
               user: str | None, default: Perms, home_mode: int | None) -> Entry:
    kind = "directory" if key == "directories" else "file"
    at_user = user is not None
    home_info = (home, user, home_mode) if at_user else None
    if isinstance(item, str):
        # The common form, a bare path: every other setting is its default.
        target = home + parse_components(item, where, absolute=not at_user)
        return Entry(kind, target, storage, default if kind == "directory" else None, "auto", None,
                     home_info, user, where)
    expect(item, dict, where, f"a path string or an object with '{kind}'")
    check_keys(item, where, DIR_KEYS if kind == "directory" else FILE_KEYS)
    if kind not in item:
        raise ConfigError(where, f"missing '{kind}'")
    target = home + parse_components(item[kind], where, not at_user, kind)
    if "persistentStoragePath" in item and item["persistentStoragePath"] is not None:
        storage = parse_components(item["persistentStoragePath"],
                                   key_path(where, "persistentStoragePath"), absolute=True)
    perms, method, parent_perms = None, "auto", None
    if kind == "directory":
        perms = parse_perms(item, where, default)
    else:
        method = item.get("method", "auto")
        if method not in ("auto", "symlink"):
            expect(method, str, key_path(where, "method"), "a string")
            raise ConfigError(key_path(where, "method"), f"{method!r} is not 'auto' or 'symlink'")
        parent = item.get("parentDirectory")
        if parent is not None:
            pwhere = key_path(where, "parentDirectory")
            expect(parent, dict, pwhere, "an object")
            # NixOS impermanence's evaluated option also names the
            # directory, and always fills in its defaultPerms: the same as
            # those is the same as none given.
            check_keys(parent, pwhere, PERM_KEYS, NIXOS_INTERNAL | {"directory"})
            defaults = parent.get("defaultPerms")
            if not (isinstance(defaults, dict)
                    and all(parent.get(key) == defaults.get(key) for key in PERM_KEYS)):
                parent_perms = parse_perms(parent, pwhere, default)
    return Entry(kind, target, storage, perms, method, parent_perms, home_info, user, where)


def first_at_least(values: list, x, lo: int, hi: int) -> int:
    """The first index in [lo, hi) whose value is >= x (values sorted), or hi."""
    while lo < hi:
        mid = (lo + hi) // 2
        if values[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def end_of_prefix(targets: list, prefix: tuple, lo: int, hi: int) -> int:
    """The first index in [lo, hi) whose target does not start with prefix,
    where those that do come first (sorted targets), or hi."""
    depth = len(prefix)
    while lo < hi:
        mid = (lo + hi) // 2
        if targets[mid][:depth] == prefix:
            lo = mid + 1
        else:
            hi = mid
    return lo


def below(targets: list, path: tuple) -> tuple:
    """[start, end) of the sorted targets strictly below path. They are
    consecutive, right after path itself: two binary searches."""
    count = len(targets)
    start = first_at_least(targets, path, 0, count)
    if start < count and targets[start] == path:
        start += 1
    return start, end_of_prefix(targets, path, start, count)


def entry_storages(entries: list) -> list:
    """The entries' storage paths, each once, in order of first use."""
    seen: list = []
    last = None
    for e in entries:
        if e.storage is not last:  # one tuple object for a location's entries
            last = e.storage
            if last not in seen:
                seen.append(last)
    return seen


def is_under(path: tuple, parent: tuple) -> bool:
    return path[:len(parent)] == parent


def attach_homes(entries: list, targets: list, homes: dict) -> None:
    """A system-level entry inside a known user's home gets that home's
    parent rules too, so ~/.local is never created root-owned. Entries are
    sorted, so those below a home are consecutive (`targets` are theirs,
    in order); the deepest home is taken first, and an entry once given a
    home keeps it."""
    for home in sorted(homes, key=len, reverse=True):
        user = homes[home]
        start, end = below(targets, home)
        for k in range(start, end):
            e = entries[k]
            if e.home is None:
                entries[k] = Entry(e.kind, e.target, e.storage, e.perms, e.method, e.parent_perms,
                                   (home, user, 0o700), user, e.where)


def check_overlaps(entries: list, targets: list, filesystems: list, storages: list,
                   used: list) -> None:
    """Reject what would make one mount hide another or double-apply a
    path. Entries are sorted by target, so a path and what lies below it
    are neighbours: binary searches find the few entries that can fail
    (the first below a kept file; those at, above or first below a
    storage path or mount point), and only those are checked in full, in
    target order. `targets` are the entries' targets, in order."""
    count = len(targets)
    for k in range(1, count):
        if targets[k] == targets[k - 1]:
            raise ConfigError(entries[k].where, f"{as_path(targets[k])} is listed twice: "
                                                f"also at {entries[k - 1].where}")
    guarded: dict = {}
    for path in storages:
        guarded.setdefault(path, "persistent storage path")
    for fs in filesystems:
        guarded.setdefault(fs.mountpoint, "fileSystems mount point")
    for path in used:  # the entries' own storage paths
        guarded.setdefault(path, "persistent storage path")
    # Every prefix of a guarded path: one lookup tells whether a guarded
    # path lies at or below a target.
    guarded_below: dict = {}
    for path in guarded:
        for depth in range(1, len(path) + 1):
            guarded_below.setdefault(path[:depth], path)
    suspects = {k + 1 for k in range(count - 1)
                if entries[k].kind == "file" and targets[k + 1][:len(targets[k])] == targets[k]}
    for prefix in guarded_below:
        k = first_at_least(targets, prefix, 0, count)
        if k < count and targets[k] == prefix:
            suspects.add(k)
    for path in guarded:
        start, end = below(targets, path)
        if start < end:
            suspects.add(start)

    def kept_file(prefix: tuple):
        k = first_at_least(targets, prefix, 0, count)
        return entries[k] if k < count and targets[k] == prefix and entries[k].kind == "file" else None

    for k in sorted(suspects):
        e = entries[k]
        hit = guarded_below.get(e.target)
        for depth in range(1, len(e.target)):
            prefix = e.target[:depth]
            holder = kept_file(prefix)
            if holder is not None:
                raise ConfigError(e.where, f"{as_path(e.target)} is inside the kept file "
                                           f"{as_path(holder.target)} ({holder.where})")
            if hit is None and prefix in guarded:
                hit = prefix
        if hit is not None:
            raise ConfigError(e.where, f"{as_path(e.target)} overlaps the {guarded[hit]} {as_path(hit)}; "
                                       "a bind mount there would hide storage")


# --- Compiled config ---------------------------------------------------------
#
# At 10,000 entries, reading and checking the JSON takes ~25 ms of a boot
# that the rest of apply shares across two CPUs. `compile`, run when the
# initramfs is built (as the script itself is byte-compiled then), stores
# the checked records next to the JSON they came from; apply then loads
# them with marshal (built into the interpreter) in a third of the time.
# The records are used only by the very script file that made them (its
# bytes' CRC-32 is in the header): any other version of the script reads
# the JSON part, as does a file whose JSON or records no longer match their
# CRC-32.
#
#   COMPILED_MAGIC
#   b"<script crc32> <python major.minor> <json length> <json crc32> <records crc32>\n"
#   the JSON, as given
#   marshal of the records (compiled_payload)

COMPILED_MAGIC = b"\0impermanence_boot compiled config\n"
COMPILED_PYTHON = "%d.%d" % sys.version_info[:2]  # the header's Python version


def script_fingerprint() -> int | None:
    """CRC-32 of the running script file (the .py or the .pyc), or None
    when it cannot be read."""
    import zlib  # built into Debian's and NixOS's interpreters

    try:
        with open(__file__, "rb") as f:
            return zlib.crc32(f.read())
    except (OSError, NameError):
        return None


def compiled_header(json_bytes: bytes, payload: bytes, fingerprint: int) -> bytes:
    import zlib

    return COMPILED_MAGIC + (f"{fingerprint} {COMPILED_PYTHON} {len(json_bytes)} "
                             f"{zlib.crc32(json_bytes)} {zlib.crc32(payload)}\n").encode()


def split_compiled(raw: bytes, path: str) -> tuple:
    """(the JSON bytes, the marshalled records or None when this script
    file, on this Python version, did not make them, or when they or the
    JSON no longer match their CRC-32)."""
    import zlib

    start = len(COMPILED_MAGIC)
    end = raw.find(b"\n", start)
    fields = raw[start:end].split() if end > 0 else []
    if not (len(fields) == 5 and all(fields[k].isdigit() for k in (0, 2, 3, 4))):
        raise ConfigFileError(path, "compiled config has a damaged header; compile it again")
    fingerprint, version, size, json_crc, payload_crc = fields
    json_start = end + 1
    json_bytes = raw[json_start:json_start + int(size)]
    if len(json_bytes) != int(size):
        raise ConfigFileError(path, "compiled config is truncated; compile it again")
    payload = raw[json_start + int(size):]
    current = (str(script_fingerprint()).encode() == fingerprint
               and COMPILED_PYTHON.encode() == version
               and str(zlib.crc32(json_bytes)).encode() == json_crc
               and str(zlib.crc32(payload)).encode() == payload_crc)
    return json_bytes, payload if current else None


def compiled_payload(config: Config) -> tuple:
    """The config as the plain values marshal stores. Perms are few and
    shared: stored once, referred to by index (0: none)."""
    perms_index: dict = {None: 0}
    for e in config.entries:
        for p in (e.perms, e.parent_perms):
            perms_index.setdefault(p, len(perms_index))
    rows = tuple((e.kind, e.target, e.storage, perms_index[e.perms], e.method,
                  perms_index[e.parent_perms], e.home, e.home_owner, e.where, e.source)
                 for e in config.entries)
    return (COMPILED_LAYOUT,
            tuple(fs._values() for fs in config.filesystems), config.device_timeout,
            {name: a._values() for name, a in config.accounts.items()}, config.group_ids,
            config.storages, tuple(p._values() for p in perms_index if p is not None), rows)


COMPILED_LAYOUT = 1  # of compiled_payload's tuple


def config_from_payload(payload: bytes) -> Config | None:
    """The Config compiled_payload stored, or None if it cannot be read
    back (then the JSON is read)."""
    import marshal

    try:
        layout, filesystems, timeout, accounts, group_ids, storages, perms, rows = \
            marshal.loads(payload)
        if layout != COMPILED_LAYOUT:
            return None
        perms_table = [None] + [Perms(*values) for values in perms]
        new, entries = object.__new__, []
        add = entries.append
        for kind, target, storage, p, method, pp, home, home_owner, where, source in rows:
            # Entry.__init__, without the call (in the same order: the
            # interpreter shares one key table among entries set alike).
            entry = new(Entry)
            entry.kind = kind
            entry.target = target
            entry.storage = storage
            entry.perms = perms_table[p]
            entry.method = method
            entry.parent_perms = perms_table[pp]
            entry.home = home
            entry.home_owner = home_owner
            entry.where = where
            entry.source = source
            add(entry)
        return Config(tuple(FileSystem(*values) for values in filesystems), timeout,
                      {name: Account(*values) for name, values in accounts.items()},
                      group_ids, storages, tuple(entries))
    except (ValueError, TypeError, EOFError, IndexError):
        return None


def write_compiled(config: Config, json_bytes: bytes, output: str) -> None:
    """Write the compiled config to output, replacing it only once the new
    one is complete (a temporary file in the same directory, renamed)."""
    import marshal

    fingerprint = script_fingerprint()
    if fingerprint is None:
        raise ConfigFileError(output, "cannot compile: this script cannot read its own file")
    payload = marshal.dumps(compiled_payload(config))
    data = compiled_header(json_bytes, payload, fingerprint) + json_bytes + payload
    temp = f"{output}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(temp, output)
    except BaseException:
        os.unlink(temp)
        raise


# --- Device lookup and superblock probing ------------------------------------

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
        with open(f"{sys_dir}/partition") as f:
            number = int(f.read())
        disk = os.path.basename(os.path.dirname(os.path.realpath(sys_dir)))
        with open(f"/sys/class/block/{disk}/queue/logical_block_size") as f:
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
    /dev/disk/by-label/... path (NixOS's usual form) that does not exist,
    as in an initramfs without udev, is looked up as LABEL=... would be."""
    if spec.startswith("/"):
        if os.path.exists(spec):
            return spec, None
        parts = spec.split("/")
        if len(parts) == 5 and parts[1:3] == ["dev", "disk"] and parts[3] in UDEV_LINKS and parts[4]:
            return lookup_device(f"{UDEV_LINKS[parts[3]]}={udev_unescape(parts[4])}")
        return None, None
    tag, value = spec.split("=", 1)
    link = f"/dev/disk/by-{tag.lower()}/{value}"
    if os.path.exists(link):
        return os.path.realpath(link), None
    # No udev (a minimal initramfs): read the superblocks ourselves.
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return None, None
    for name in names:
        device = f"/dev/{name}"
        try:
            with open(f"/sys/class/block/{name}/size") as f:
                if int(f.read()) == 0:
                    continue
        except (OSError, ValueError):
            continue
        if not os.path.exists(device):
            continue
        if tag in ("PARTUUID", "PARTLABEL"):
            ids = probe_partition(name)
            if ids and ((tag == "PARTUUID" and ids[0].lower() == value.lower())
                        or (tag == "PARTLABEL" and ids[1] == value)):
                return device, None
            continue
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            found = probe_filesystem(fd)
        finally:
            os.close(fd)
        if found and ((tag == "UUID" and found[1].lower() == value.lower())
                      or (tag == "LABEL" and found[2] == value)):
            return device, found[0]
    return None, None


def wait_for_device(spec: str, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        device, fs_type = lookup_device(spec)
        if device is not None:
            return device, fs_type
        left = deadline - time.monotonic()
        if left <= 0:
            raise EntryError(spec, f"device did not appear within {timeout:g} s")
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
        with open("/proc/filesystems") as f:
            return [line.split()[-1] for line in f if line.strip() and not line.startswith("nodev")]
    except OSError:
        return []


# --- Mount table ----------------------------------------------------------------

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
    """/proc/self/mountinfo, read once per run: mount point -> (source, fs root, type)."""

    def __init__(self):
        self.points: dict[str, tuple] = {}
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
            self.points[point] = (unescape_mountinfo(fields[sep + 2]),
                                  unescape_mountinfo(fields[3]), fields[sep + 1])

    def is_mountpoint(self, host_path: str) -> bool:
        return host_path in self.points

    def add(self, host_path: str, source: str, fs_root: str, fs_type: str) -> None:
        self.points[host_path] = (source, fs_root, fs_type)

    def remove(self, host_path: str) -> None:
        self.points.pop(host_path, None)


# --- Accounts -----------------------------------------------------------------------

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
        self._resolved: dict = {}    # (user, group, storage) -> (uid, gid)
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
                    loaded = parse_json(text)  # not json: ~9 ms of imports at boot
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
        if name.isdigit() and name.isascii():  # is_id, inline: once per lookup
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
        raise EntryError(f"{what} {name}", f"unknown {what}: not in the config's {table} table, "
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
        raise EntryError(f"user {user}", "primary group unknown: set "
                         f"\"users\": {{\"{user}\": {{\"group\": \"...\"}}}} in the config")

    def resolve(self, perms: Perms, storage: tuple) -> tuple:
        """(uid, gid, mode) for perms in storage."""
        key = (perms.user, perms.group, storage)
        ids = self._resolved.get(key)
        if ids is None:
            uid = self.uid(perms.user, storage)
            gid = (self.primary_gid(perms.user, storage) if perms.group is None
                   else self.gid(perms.group, storage))
            ids = self._resolved[key] = (uid, gid)
        return ids[0], ids[1], perms.mode


# --- Looking at the tree ------------------------------------------------------

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


class Tree:
    """Read-only view of <root>: every component is checked to be a real
    directory before the next one is looked at, so a planted symlink is
    reported, never followed.

    Planned actions are recorded and lookups see them, so an entry's plan
    (and `plan` as a whole) is computed as if the earlier actions had run;
    paths below a recorded bind mount are looked up in its source, as the
    kernel would after the mount. `apply` settles the record after each
    entry has run (see `settle`)."""

    def __init__(self, root: str):
        self.root = root
        self.prefix = "" if root == "/" else root
        self.dirs: dict = {}         # real directories seen: path -> Node
        self.created: dict = {}      # planned: path -> Node
        self.binds: dict = {}        # planned: target -> source
        self.keep_binds = False      # enter() forgets none (see run_in_two)
        self.pending_binds: list = []
        self.pending_created: list = []

    def host(self, comps: tuple) -> str:
        return self.prefix + "/" + "/".join(comps) if comps else self.root

    def translate(self, comps: tuple) -> tuple:
        binds = self.binds
        for depth in range(len(comps), 0, -1):
            source = binds.get(comps[:depth])
            if source is not None:
                return source + comps[depth:]
        return comps

    def _lstat(self, comps: tuple) -> Node | None:
        try:
            return node_from_stat(os.lstat(self.prefix + "/" + "/".join(comps)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def look(self, comps: tuple) -> Node | None:
        """The node at comps, or None if missing. Raises EntryError if a
        parent component is a symlink or not a directory."""
        if self.binds:
            comps = self.translate(comps)
        created, dirs = self.created, self.dirs
        node = created.get(comps) or dirs.get(comps)
        if node is not None:
            return node
        above = comps[:-1]
        parent = created.get(above)
        if parent is not None:
            if parent.kind == "dir":
                return None  # inside a directory only just planned: empty
        elif above not in dirs:
            # A known parent was only recorded once all of its own parents
            # had been checked: only an unknown one needs the walk.
            for depth in range(1, len(comps)):
                prefix = comps[:depth]
                if prefix in dirs or prefix in created:
                    continue
                node = self._lstat(prefix)
                if node is None:
                    return None
                if node.kind != "dir":
                    what = "a symbolic link" if node.kind == "link" else "not a directory"
                    raise EntryError(self.host(prefix), f"is {what}; refusing to follow it")
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

    def is_dir(self, comps: tuple) -> bool:
        """Known, without a system call, to be a directory whose every
        parent was checked: the common case for shared parents."""
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
        """A mount was made on or removed from comps."""
        self.dirs.pop(comps, None)

    def enter(self, target: tuple) -> None:
        """Planning moves on to target. Entries come in path order, so a
        bind mount behind target and not above it is above no later entry
        either: dropping it keeps every lookup's translation short. (One
        still ahead, which a share's first entries can find, is kept.)"""
        if self.binds and not self.keep_binds:
            self.binds = {t: s for t, s in self.binds.items() if target[:len(t)] == t or t > target}

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

    def read_file(self, comps: tuple) -> str | None:
        """Contents of a small regular file that only root can have written:
        opened without following links, it and every directory on the way
        below the root root's and writable by no one else (a directory
        with the sticky bit may be: no one else can then rename root's
        entries in it). None for any other."""
        try:
            fd = open_beneath(self.root, comps, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, EntryError):
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
        return EntryError(shown, f"is {what}; refusing to follow it")
    return OSError(exc.errno, exc.strerror, shown)


def open_beneath(root: str, comps: tuple, flags: int) -> int:
    """Open root/comps with every directory component opened O_NOFOLLOW,
    each of them root's and, unless sticky, writable by no one else
    (EntryError otherwise)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        prefix = "" if root == "/" else root
        for i, name in enumerate(comps[:-1]):
            next_fd = open_dir_at(fd, name, prefix + as_path(comps[:i + 1]))
            os.close(fd)
            fd = next_fd
            st = os.fstat(fd)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                raise EntryError(prefix + as_path(comps[:i + 1]), "not root's alone")
        return os.open(comps[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


# --- Actions --------------------------------------------------------------------

class Action:
    """One change to the filesystem. `describe` is the line `plan` prints.
    Made by the thousand at boot: plain slotted classes with their own
    __init__ (a Record's generic one costs a loop per field)."""
    __slots__ = ()

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class MakeDir(Action):
    __slots__ = ("path", "uid", "gid", "mode", "why", "mark")

    def __init__(self, path: tuple, uid: int, gid: int, mode: int, why: str, mark: bool = False):
        self.path, self.uid, self.gid, self.mode, self.why, self.mark = path, uid, gid, mode, why, mark

    def describe(self, tree: Tree) -> str:
        return f"mkdir {tree.host(self.path)} ({self.uid}:{self.gid} {format_mode(self.mode)}, {self.why})"


class FinishDir(Action):
    """Give an empty directory with mode 0000 its owner and mode: apply was
    killed while making it (see Executor.do_MakeDir)."""
    __slots__ = ("path", "uid", "gid", "mode")

    def __init__(self, path: tuple, uid: int, gid: int, mode: int):
        self.path, self.uid, self.gid, self.mode = path, uid, gid, mode

    def describe(self, tree: Tree) -> str:
        return (f"finish {tree.host(self.path)} ({self.uid}:{self.gid} {format_mode(self.mode)}, "
                "left with mode 0000 by an interrupted run)")


class WriteFile(Action):
    __slots__ = ("path", "content", "uid", "gid", "mode")

    def __init__(self, path: tuple, content: bytes, uid: int, gid: int, mode: int):
        self.path, self.content, self.uid, self.gid, self.mode = path, content, uid, gid, mode

    def describe(self, tree: Tree) -> str:
        return (f"create {tree.host(self.path)} containing {self.content.decode().strip()!r} "
                f"({self.uid}:{self.gid} {format_mode(self.mode)})")


class CreateMountFile(Action):
    __slots__ = ("path",)

    def __init__(self, path: tuple):
        self.path = path

    def describe(self, tree: Tree) -> str:
        return f"create empty {tree.host(self.path)} (mount point)"


class RemoveEmptyFile(Action):
    """marked_only: the file lies in storage (inside a kept directory of
    another storage) and is removed only if apply made it."""
    __slots__ = ("path", "marked_only")

    def __init__(self, path: tuple, marked_only: bool = False):
        self.path, self.marked_only = path, marked_only

    def describe(self, tree: Tree) -> str:
        return f"remove empty file {tree.host(self.path)} (replaced)"


class Symlink(Action):
    __slots__ = ("path", "text")

    def __init__(self, path: tuple, text: str):
        self.path, self.text = path, text

    def describe(self, tree: Tree) -> str:
        return f"link {tree.host(self.path)} -> {self.text}"


class Bind(Action):
    __slots__ = ("source", "target", "kind")

    def __init__(self, source: tuple, target: tuple, kind: str):
        self.source, self.target, self.kind = source, target, kind

    def describe(self, tree: Tree) -> str:
        return f"bind {tree.host(self.source)} on {tree.host(self.target)}"


class Fail(Action):
    __slots__ = ("path", "cause")

    def __init__(self, path: tuple, cause: str):
        self.path, self.cause = path, cause

    def describe(self, tree: Tree) -> str:
        return f"fail {tree.host(self.path)}: {self.cause}"


# --- Planning ------------------------------------------------------------------------

NOT_OURS_IN_STORAGE = ("is an empty file in a kept directory of another storage that apply did not "
                       "make; not replaced by a link")


def source_parent_perms(entry: Entry, path: tuple) -> Perms:
    """Owner and mode for a missing parent of a source (path includes storage)."""
    if entry.kind == "file" and entry.parent_perms is not None and path == entry.source[:-1]:
        return entry.parent_perms
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


def make_dir(actions: list, tree: Tree, path: tuple, uid: int, gid: int, mode: int, why: str,
             mark: bool = False) -> None:
    """Plan making the directory at path with this owner and mode."""
    actions.append(MakeDir(path, uid, gid, mode, why, mark))
    tree.record(path, Node("dir", uid, gid, mode, 0, None, None, None))


def finish_dir(actions: list, tree: Tree, path: tuple, node: Node, uid: int, gid: int,
               mode: int) -> None:
    """Plan giving the directory at path, found with mode 0000 (maybe one
    an interrupted run did not finish), its owner and mode."""
    if (node.uid, node.gid, node.mode) != (uid, gid, mode):
        actions.append(FinishDir(path, uid, gid, mode))
        tree.record(path, Node("dir", uid, gid, mode, 0, node.dev, node.ino, None))


def plan_entry(entry: Entry, tree: Tree, accounts: Accounts) -> list:
    """The actions that put one entry in place, given the tree as it is now."""
    actions: list = []
    source, target, storage = entry.source, entry.target, entry.storage
    tree.enter(target)

    # Storage side: parents, then the source itself.
    for depth in range(len(storage) + 1, 0 if tree.is_dir(source[:-1]) else len(source)):
        path = source[:depth]
        node = tree.look(path)
        if node is None:
            perms = accounts.kept_dir_perms(path) or source_parent_perms(entry, path)
            uid, gid, mode = accounts.resolve(perms, storage)
            make_dir(actions, tree, path, uid, gid, mode, "storage parent")
        elif node.kind != "dir":
            return actions + [Fail(path, f"is {describe_kind(node)}, not a directory")]
        elif node.mode == 0:
            perms = accounts.kept_dir_perms(path) or source_parent_perms(entry, path)
            finish_dir(actions, tree, path, node, *accounts.resolve(perms, storage))
    node = tree.look(source)
    source_exists = node is not None
    if entry.kind == "directory":
        if node is None:
            uid, gid, mode = accounts.resolve(entry.perms, storage)
            make_dir(actions, tree, source, uid, gid, mode, "kept directory")
        elif node.kind != "dir":
            return actions + [Fail(source, f"source is {describe_kind(node)}, not a directory")]
        elif node.mode == 0:
            finish_dir(actions, tree, source, node, *accounts.resolve(entry.perms, storage))
    elif node is not None and node.kind != "file":
        return actions + [Fail(source, f"source is {describe_kind(node)}, not a regular file")]
    elif node is not None and node.nlink > 1 and entry.method == "auto":
        # Checked again when binding; here too, so that nothing is made
        # on the root for a source that will be refused.
        folder = tree.look(source[:-1])
        if folder is not None and folder.uid != node.uid:
            return actions + [Fail(source, hard_link_refusal(node.uid, folder.uid))]
    elif node is None and target == MACHINE_ID and entry.method == "auto":
        # systemd commits a real id into storage on first boot.
        actions.append(WriteFile(source, b"uninitialized\n", 0, 0, 0o444))
        tree.record(source, Node("file", 0, 0, 0o444, 14, None, None, None))
        source_exists = True

    # Root side: parents mirror their counterparts in storage.
    for depth in range(1, 0 if tree.is_dir(target[:-1]) else len(target)):
        path = target[:depth]
        node = tree.look(path)
        if node is None:
            twin = tree.look(storage + path)
            if twin is None or twin.kind != "dir":
                return actions + [Fail(storage + path, "missing in storage; cannot mirror it")]
            make_dir(actions, tree, path, twin.uid, twin.gid, twin.mode, "as in storage")
        elif node.kind != "dir":
            return actions + [Fail(path, f"is {describe_kind(node)}, not a directory")]
        elif node.mode == 0:
            twin = tree.look(storage + path)
            if twin is not None and twin.kind == "dir":
                finish_dir(actions, tree, path, node, twin.uid, twin.gid, twin.mode)

    if entry.kind == "file" and tree.binds and tree.same(source[:-1], target[:-1]):
        # Inside a kept directory of the same storage, bound already: the
        # target is the source, in place as it is (and created in storage
        # by whoever writes it first). A link there would point to itself.
        return actions

    node = tree.look(target)
    if entry.kind == "directory":
        if node is None:
            twin = tree.look(source)
            make_dir(actions, tree, target, twin.uid, twin.gid, twin.mode, "mount point", mark=True)
        elif node.kind != "dir":
            return actions + [Fail(target, f"target is {describe_kind(node)}, not a directory; left as it is")]
        elif tree.same(source, target):
            # Mounted by an earlier run: what lies below is the source's,
            # as for a bind made now (a kept directory nested in this one
            # is then found already in place, not made twice).
            tree.record_bind(source, target)
            return actions
        actions.append(Bind(source, target, "dir"))
        tree.record_bind(source, target)
        return actions

    wanted_link = link_text(entry)
    if entry.method == "symlink" or not source_exists:
        if node is None:
            pass
        elif node.kind == "link" and node.link == wanted_link:
            return actions
        elif node.kind == "file" and node.size == 0:
            # On the root, an empty file is replaced (a stale machine-id).
            # Inside a kept directory of another storage it is that
            # storage's: replaced only if apply made it (its mark).
            in_storage = bool(tree.binds) and tree.translate(target[:-1]) != target[:-1]
            if in_storage and os.lstat(tree.host(target)).st_mtime_ns != MARK_TIME_NS:
                return actions + [Fail(target, NOT_OURS_IN_STORAGE)]
            actions.append(RemoveEmptyFile(target, in_storage))
        else:
            return actions + [Fail(target, f"target is {describe_kind(node)}; not replaced by a link")]
        actions.append(Symlink(target, wanted_link))
        tree.record(target, Node("link", 0, 0, 0o777, 0, None, None, wanted_link))
        return actions

    if node is None:
        actions.append(CreateMountFile(target))
        tree.record(target, Node("file", 0, 0, 0o644, 0, None, None, None))
    elif node.kind == "link" and node.link == wanted_link:
        return actions  # linked by an earlier run while the source was missing
    elif node.kind != "file":
        return actions + [Fail(target, f"target is {describe_kind(node)}; left as it is")]
    elif tree.same(source, target):
        return actions
    elif node.size != 0:
        return actions + [Fail(target, "target exists and is not empty; not overwritten")]
    actions.append(Bind(source, target, "file"))
    tree.record_bind(source, target)
    return actions


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


# --- Executing -----------------------------------------------------------------------

class DirChain:
    """Open directory fds along the last path walked from the root. Entries
    come sorted, so the next walk reuses the shared parents."""

    def __init__(self, root_fd: int, tree: Tree):
        self.root_fd = root_fd
        self.tree = tree
        self.path: tuple = ()        # fds[i] is the directory path[:i + 1]
        self.fds: list = []
        self.stats: dict = {}        # depth -> (uid, mode), from fstat of that fd

    def truncate(self, depth: int) -> None:
        fds = self.fds
        while len(fds) > depth:
            os.close(fds.pop())
            self.stats.pop(len(fds) + 1, None)
        self.path = self.path[:depth]

    def open(self, comps: tuple) -> int:
        path = self.path
        if comps == path:
            return self.fds[-1] if path else self.root_fd
        depth = len(path)
        if comps[:depth] != path:
            depth = 0
            limit = min(len(path), len(comps))
            while depth < limit and path[depth] == comps[depth]:
                depth += 1
            self.truncate(depth)
        fds = self.fds
        fd = fds[-1] if depth else self.root_fd
        try:
            for name in comps[depth:]:
                fd = os.open(name, O_DIR, dir_fd=fd)
                fds.append(fd)
        except OSError as exc:
            depth = len(fds)
            self.path = comps[:depth]
            raise dir_open_error(exc, fd, comps[depth], self.tree.host(comps[:depth + 1])) from None
        self.path = comps
        return fd

    def stat_at(self, depth: int) -> tuple:
        """(uid, mode) of the directory open at depth (0: the root)."""
        known = self.stats.get(depth)
        if known is None:
            st = os.fstat(self.fds[depth - 1] if depth else self.root_fd)
            known = self.stats[depth] = (st.st_uid, st.st_mode)
        return known

    def owner(self, comps: tuple) -> int:
        """uid of the directory comps, opened along the walk."""
        self.open(comps)
        return self.stat_at(len(comps))[0]

    def push(self, name: str, fd: int, uid: int, mode: int) -> None:
        """Take fd, the directory just made at path + (name,), with the
        owner and mode it was given."""
        self.fds.append(fd)
        self.path += (name,)
        self.stats[len(self.fds)] = (uid, stat.S_IFDIR | mode)

    def forget(self, comps: tuple) -> None:
        """A mount landed on comps: fds at or below it see what it covers."""
        if self.path[:len(comps)] == comps:
            self.truncate(len(comps) - 1)

    def close(self) -> None:
        self.truncate(0)


class Executor:
    """Performs actions with fd-relative calls that never follow a link."""

    def __init__(self, tree: Tree, log: Log):
        self.tree = tree
        self.log = log
        self.root_fd = os.open(tree.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.sources = DirChain(self.root_fd, tree)
        self.targets = DirChain(self.root_fd, tree)
        self.proc_fds = os.path.isdir("/proc/self/fd")
        self.new_file = None         # (path, fd): the mount point file just made
        self.new_dir = None          # (path, parent fd): the mount point directory just made
        self.euid, self.egid = os.geteuid(), os.getegid()
        cls = type(self)
        self.steps = {kind: getattr(cls, "do_" + kind.__name__)
                      for kind in (MakeDir, FinishDir, WriteFile, CreateMountFile, RemoveEmptyFile,
                                   Symlink, Bind, Fail)}

    def chain_for(self, comps: tuple, storage: tuple) -> DirChain:
        return self.sources if storage and is_under(comps, storage) else self.targets

    def close(self) -> None:
        self.drop_new_file()
        self.sources.close()
        self.targets.close()
        os.close(self.root_fd)

    def run(self, actions: list, storage: tuple) -> None:
        """Perform actions in order; the first that fails raises."""
        steps, verbose, action = self.steps, self.log.verbosity >= 2, None
        try:
            for action in actions:
                if verbose:
                    self.log.info(action.describe(self.tree))
                steps[type(action)](self, action, storage)
        except OSError as exc:
            # fd-relative calls report only the last component (or, for
            # symlink, the link text): name the whole path instead.
            shown = exc.filename if isinstance(exc.filename, str) else ""
            if not shown.startswith(self.tree.prefix + "/"):
                path = getattr(action, "path", None) or action.target
                raise OSError(exc.errno, exc.strerror, self.tree.host(path)) from None
            raise

    def do_Fail(self, a: Fail, storage: tuple) -> None:
        raise EntryError(self.tree.host(a.path), a.cause)

    def do_MakeDir(self, a: MakeDir, storage: tuple) -> None:
        path = a.path
        chain = self.chain_for(path, storage)
        parent = chain.open(path[:-1])
        name = path[-1]
        if a.mark and self.by_name_in(chain, len(path) - 1):
            # A mount point in a directory no one else can change and that
            # passes on no group: made, given its owner, mode and mark, and
            # (by do_Bind) mounted on, all by name, with no fd of its own:
            # nobody can swap the name in between.
            self.make_dir_at(parent, name, a.mode & 0o1777, path)
            if a.uid != self.euid or a.gid != self.egid:
                os.chown(name, a.uid, a.gid, dir_fd=parent, follow_symlinks=False)
            if a.mode & 0o6000:  # mkdir cannot set set-id bits
                os.chmod(name, a.mode, dir_fd=parent)
            try:
                os.utime(name, ns=MARK_TIMES, dir_fd=parent, follow_symlinks=False)
            except OSError:
                pass  # unmount will then leave this mount point in place
            self.new_dir = (path, parent)
            return
        # A directory that mkdir alone cannot finish (another owner, set-id
        # bits, a set-gid parent) is made with mode 0000, then given owner
        # and mode through its fd: apply killed in between leaves an empty
        # directory with mode 0000, which the next run finishes (FinishDir),
        # never a root-owned one that it would keep as it is. A mount point
        # needs none of this: the bind mount covers its owner and mode.
        self.make_dir_at(parent, name, a.mode & 0o1777 if a.mark or self.mkdir_is_final(a) else 0,
                         path)
        fd = self.open_made_dir(parent, name, path)
        st = os.fstat(fd)
        # Ours if still root-owned: whoever could swap it in its parent
        # cannot make a root-owned directory. (No nlink test: btrfs
        # directories always have one link.)
        if st.st_uid != self.euid:
            os.close(fd)
            raise EntryError(self.tree.host(path), "was replaced while applying; not changed")
        self.give_owner_and_mode(fd, st, a.uid, a.gid, a.mode)
        if a.mark:
            try:
                os.utime(fd, ns=MARK_TIMES)
            except OSError:
                pass  # unmount will then leave this mount point in place
        chain.push(name, fd, a.uid, a.mode)

    def do_FinishDir(self, a: FinishDir, storage: tuple) -> None:
        chain = self.chain_for(a.path, storage)
        parent = chain.open(a.path[:-1])
        name = a.path[-1]
        fd = self.open_made_dir(parent, name, a.path)
        st = os.fstat(fd)
        # As a killed do_MakeDir leaves it: empty, mode 0000, owned by us
        # or already by its owner-to-be.
        if stat.S_IMODE(st.st_mode) or st.st_uid not in (self.euid, a.uid) or os.listdir(fd):
            os.close(fd)
            raise EntryError(self.tree.host(a.path), "has mode 0000 but is not a directory an "
                                                     "interrupted run left unfinished; left as it is")
        self.give_owner_and_mode(fd, st, a.uid, a.gid, a.mode)
        chain.push(name, fd, a.uid, a.mode)

    def make_dir_at(self, parent: int, name: str, mode: int, path: tuple) -> None:
        try:
            os.mkdir(name, mode, dir_fd=parent)  # umask is 0
        except FileExistsError:
            raise EntryError(self.tree.host(path), "appeared while applying; left as it is") from None

    def open_made_dir(self, parent: int, name: str, path: tuple) -> int:
        try:
            return os.open(name, O_DIR, dir_fd=parent)
        except OSError as exc:
            raise dir_open_error(exc, parent, name, self.tree.host(path)) from None

    @staticmethod
    def give_owner_and_mode(fd: int, st, uid: int, gid: int, mode: int) -> None:
        """Owner first, mode last: until the mode is set, the directory
        keeps the 0000 a next run recognises."""
        if st.st_uid != uid or st.st_gid != gid:
            os.fchown(fd, uid, gid)
        # mkdir cannot set set-id bits, and a set-gid parent passes its own.
        if mode & 0o6000 or stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)

    def by_name_in(self, chain: DirChain, depth: int) -> bool:
        """Whether a mount point can be made and mounted on by name in the
        directory the chain has open at depth: only we (or root) can add,
        remove or rename entries there (ours, no write bit for group or
        others; with an ACL, the group bits are its mask), and it is not
        set-gid, so what mkdir makes in it gets our own group."""
        uid, mode = chain.stat_at(depth)
        return uid == self.euid and not mode & 0o2022

    def mkdir_is_final(self, a: MakeDir) -> bool:
        """Whether mkdir(2) alone gives a.path its owner and mode: ours,
        without set-id bits, in a parent that passes on no group. (The
        parent as planning saw it; if it changed since, the fstat after
        mkdir still finds out and fixes owner and mode.)"""
        if a.uid != self.euid or a.gid != self.egid or a.mode & 0o6000:
            return False
        try:
            parent = self.tree.look(a.path[:-1])  # known to planning: no system call
        except EntryError:
            return False
        return parent is not None and not parent.mode & stat.S_ISGID

    def _create_file(self, path: tuple, storage: tuple, content: bytes, uid: int, gid: int,
                     mode: int) -> None:
        parent = self.chain_for(path, storage).open(path[:-1])
        name = path[-1]
        # A file with content is written under a temporary name and linked
        # into place complete: apply killed while writing leaves no empty
        # machine-id for the next boot to take as real.
        temp = f".{name}.impermanence-new" if content and len(name) < 200 else name
        if temp != name:
            try:
                os.unlink(temp, dir_fd=parent)  # left by a killed run
            except OSError:
                pass
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        try:
            if content:
                if os.write(fd, content) != len(content):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            if temp != name:
                # One atomic step: killed before it, the temporary is what
                # the next run removes; after it, nothing is left over.
                rename_noreplace(parent, temp, name, self.tree.host(path))
        except OSError:
            # Leave no half-made file behind: remove it if the name is
            # still ours.
            try:
                st = os.stat(temp, dir_fd=parent, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    os.unlink(temp, dir_fd=parent)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)

    def do_WriteFile(self, a: WriteFile, storage: tuple) -> None:
        self._create_file(a.path, storage, a.content, a.uid, a.gid, a.mode)

    def do_CreateMountFile(self, a: CreateMountFile, storage: tuple) -> None:
        parent = self.targets.open(a.path[:-1])
        # Root-owned and 0644 as made (umask is 0); the bind mount that
        # follows covers it, so no chown or chmod.
        fd = os.open(a.path[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=parent)
        try:
            os.utime(fd, ns=MARK_TIMES)
        except OSError:
            pass  # unmount will then leave this file in place
        # Kept open for the Bind that follows: the file just made is the
        # one mounted on, without looking its name up again.
        self.drop_new_file()
        self.new_file = (a.path, fd)

    def drop_new_file(self) -> None:
        if self.new_file is not None:
            os.close(self.new_file[1])
            self.new_file = None

    def do_RemoveEmptyFile(self, a: RemoveEmptyFile, storage: tuple) -> None:
        parent = self.targets.open(a.path[:-1])
        fd = os.open(a.path[-1], O_PATH_NOFOLLOW, dir_fd=parent)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            raise EntryError(self.tree.host(a.path), "is no longer an empty file; not removed")
        if a.marked_only and st.st_mtime_ns != MARK_TIME_NS:
            raise EntryError(self.tree.host(a.path), NOT_OURS_IN_STORAGE)
        os.unlink(a.path[-1], dir_fd=parent)

    def do_Symlink(self, a: Symlink, storage: tuple) -> None:
        parent = self.targets.open(a.path[:-1])
        os.symlink(a.text, a.path[-1], dir_fd=parent)

    def open_leaf(self, chain: DirChain, comps: tuple, want_dir: bool) -> tuple:
        """(fd, stat) of the directory or regular file comps, never a link."""
        parent = chain.open(comps[:-1])
        try:
            fd = os.open(comps[-1], O_PATH_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.tree.host(comps)) from None
        return fd, self.checked_stat(fd, comps, want_dir)

    def checked_stat(self, fd: int, comps: tuple, want_dir: bool):
        """fstat of fd, opened or cloned at comps without following a link:
        a directory or regular file as wanted, else fd is closed and the
        entry fails."""
        st = os.fstat(fd)
        mode = st.st_mode
        if not (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)):
            os.close(fd)
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "of an unexpected type"
            raise EntryError(self.tree.host(comps), f"is {kind}; not mounted")
        return st

    def bind_source(self, a: Bind) -> tuple:
        """(fd, stat or None, cloned) for a's source, checked to be what
        was planned and never a link; the fd is the caller's to close. With
        open_tree(2) it is a detached clone of the source (a directory just
        made or walked into is cloned through its open fd: no check
        needed); without, the source itself, opened."""
        chain, comps, want_dir = self.sources, a.source, a.kind == "dir"
        if want_dir and chain.path == comps:
            tree = clone_mount(chain.fds[-1], "")
            return (tree, None, True) if tree is not None else (os.dup(chain.fds[-1]), None, False)
        parent = chain.open(comps[:-1])
        try:
            tree = clone_mount(parent, comps[-1])
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.tree.host(comps)) from None
        if tree is None:
            fd, st = self.open_leaf(chain, comps, want_dir)
            return fd, st, False
        return tree, self.checked_stat(tree, comps, want_dir), True

    def do_Bind(self, a: Bind, storage: tuple) -> None:
        new_file, self.new_file = self.new_file, None
        new_dir, self.new_dir = self.new_dir, None
        try:
            src, st, cloned = self.bind_source(a)
            try:
                tgt = None
                if a.kind == "dir" and cloned and new_dir is not None and new_dir[0] == a.target:
                    pass  # made just now, in a directory only we can change: by name
                elif a.kind == "dir":
                    tgt = self.targets.open(a.target)  # O_DIRECTORY|O_NOFOLLOW along the walk
                else:
                    # A hard link planted by whoever owns the directory (say,
                    # to a root-owned file elsewhere in storage) is not kept
                    # state.
                    if st.st_nlink > 1:
                        owner = self.sources.owner(a.source[:-1])
                        if st.st_uid != owner:
                            raise EntryError(self.tree.host(a.source), hard_link_refusal(st.st_uid, owner))
                    if new_file is None or new_file[0] != a.target:
                        tgt = self.open_leaf(self.targets, a.target, False)[0]
                        if new_file is not None:
                            os.close(new_file[1])
                        new_file = (a.target, tgt)
                    tgt = new_file[1]
                # (The mount table is not updated: apply reads it only
                # before the entries, for the fileSystems.)
                if tgt is None:
                    attach_mount_at(src, new_dir[1], a.target[-1])
                elif cloned:
                    attach_mount(src, tgt)
                elif not bind_fds(src, tgt, self.proc_fds):
                    shown = self.tree.host(a.target)
                    mount(self.tree.host(a.source), shown, None, MS_BIND, None, shown)
                self.targets.forget(a.target)
            finally:
                os.close(src)  # a clone left detached goes away with it
        finally:
            if new_file is not None:
                os.close(new_file[1])


# --- Storage ------------------------------------------------------------------------

def covering_filesystem(config: Config, storage: tuple):
    best = None
    for fs in config.filesystems:
        if is_under(storage, fs.mountpoint) and (best is None or len(fs.mountpoint) > len(best.mountpoint)):
            best = fs
    return best


def make_root_dirs(path: tuple, first: int, why: str, tree: Tree, executor: Executor) -> None:
    """Every missing directory of path from depth `first` on, root:root 0755."""
    for depth in range(first, len(path) + 1):
        node = tree.look(path[:depth])
        if node is None:
            executor.run([MakeDir(path[:depth], 0, 0, 0o755, why, False)], ())
        elif node.kind != "dir":
            raise EntryError(tree.host(path[:depth]), f"is {describe_kind(node)}, not a directory")


def plan_storage_path(path: tuple, first: int, tree: Tree, plan_out: list) -> None:
    """What make_root_dirs would make, as plan lines."""
    for depth in range(first, len(path) + 1):
        if tree.look(path[:depth]) is None:
            plan_out.append(f"mkdir {tree.host(path[:depth])} (0:0 0755, storage path)")
            tree.record(path[:depth], Node("dir", 0, 0, 0o755, 0, None, None, None))


def mount_filesystem(fs: FileSystem, tree: Tree, executor: Executor, mounts: MountTable,
                     timeout: float, log: Log) -> None:
    host = tree.host(fs.mountpoint)
    node = tree.look(fs.mountpoint)
    if node is not None and node.kind == "dir" and mounts.is_mountpoint(host):
        log.info(f"{host}: already a mount point; used as it is")
        return
    device, probed = wait_for_device(fs.device, timeout)
    # The mount point on the fresh root: plain root-owned directories.
    make_root_dirs(fs.mountpoint, 1, "mount point", tree, executor)
    flags, data = split_mount_options(fs.options)
    if fs.fs_type != "auto":
        candidates = [fs.fs_type]
    elif probed == "ext4":
        candidates = ["ext4", "ext3", "ext2"]
    elif probed:
        candidates = [probed]
    else:
        candidates = kernel_filesystems()
    target_fd = executor.open_leaf(executor.targets, fs.mountpoint, True)[0]
    target = f"/proc/self/fd/{target_fd}" if executor.proc_fds else host
    errors = []
    try:
        for fs_type in candidates:
            try:
                mount(device, target, fs_type, flags | (MS_SILENT if len(candidates) > 1 else 0),
                      data, host)
            except OSError as exc:
                errors.append((fs_type, exc))
                if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.ENOTBLK, errno.EIO) or len(candidates) == 1:
                    break
                continue
            executor.targets.forget(fs.mountpoint)
            tree.forget(fs.mountpoint)
            mounts.add(host, device, "/", fs_type)
            log.info(f"mounted {device} ({fs_type}) on {host}")
            return
    finally:
        os.close(target_fd)
    if not errors:
        raise EntryError(host, f"cannot mount {fs.device}: no filesystem type to try")
    fs_type, exc = errors[-1] if len(errors) == 1 else errors[0]
    hint = ""
    if exc.errno == errno.EINVAL:
        hint = " (wrong fsType, bad option or bad superblock)"
    tried = ", ".join(t for t, _ in errors)
    raise EntryError(host, f"cannot mount {fs.device} ({device}) as {tried}: {exc.strerror}{hint}")


def prepare_storage(config: Config, tree: Tree, executor: Executor | None, mounts: MountTable,
                    log: Log, plan_out: list | None = None) -> dict:
    """Mount fileSystems and check every storage path. Returns storage -> None
    if usable, else the reason it is not."""
    fs_state: dict = {}
    planned_mounts: set = set()
    for fs in sorted(config.filesystems, key=lambda f: f.mountpoint):
        host = tree.host(fs.mountpoint)
        if plan_out is not None:
            node = tree.look(fs.mountpoint)
            if node is not None and mounts.is_mountpoint(host):
                fs_state[fs.mountpoint] = None
                continue
            device, _ = lookup_device(fs.device)
            shown = f"{fs.device} ({device})" if device and device != fs.device else fs.device
            if device is None:
                shown += f" (not present now; apply waits up to {config.device_timeout:g} s)"
            opts = ",".join(fs.options)
            if node is None:
                plan_out.append(f"mkdir {host} (0:0 0755, mount point)")
            plan_out.append(f"mount {shown} on {host} (type {fs.fs_type}{', ' + opts if opts else ''}; "
                            "not mounted yet, so its contents are planned as if empty)")
            planned_mounts.add(fs.mountpoint)
            tree.record(fs.mountpoint, Node("dir", 0, 0, 0o755, 0, None, None, None))
            fs_state[fs.mountpoint] = None
            continue
        try:
            mount_filesystem(fs, tree, executor, mounts, config.device_timeout, log)
            fs_state[fs.mountpoint] = None
        except EntryError as exc:
            fs_state[fs.mountpoint] = exc.cause
            log.error(f"{exc.path}: {exc.cause}")
        except OSError as exc:
            fs_state[fs.mountpoint] = describe_oserror(exc)
            log.error(f"{exc.filename or host}: {describe_oserror(exc)}")

    state: dict = {}
    root_dev = os.stat(tree.root).st_dev
    for storage in config.storages:
        host = tree.host(storage)
        fs = covering_filesystem(config, storage)
        if fs is not None and fs_state.get(fs.mountpoint) is not None:
            state[storage] = f"storage unavailable: {fs_state[fs.mountpoint]}"
            continue
        if fs is not None and fs.mountpoint in planned_mounts:
            # Not mounted yet: what is inside is unknown, shown as empty.
            plan_storage_path(storage, len(fs.mountpoint) + 1, tree, plan_out)
            state[storage] = None
            continue
        try:
            node = tree.look(storage)
        except EntryError as exc:
            state[storage] = exc.cause
            continue
        if node is None and fs is not None and fs.mountpoint != storage:
            # Inside a mounted persistent filesystem: create it.
            if plan_out is not None:
                plan_storage_path(storage, len(fs.mountpoint) + 1, tree, plan_out)
                state[storage] = None
                continue
            try:
                make_root_dirs(storage, len(fs.mountpoint) + 1, "storage path", tree, executor)
                node = tree.look(storage)
            except (EntryError, OSError) as exc:
                state[storage] = getattr(exc, "cause", None) or describe_oserror(exc)
                continue
        if node is None:
            state[storage] = "storage path does not exist (and no fileSystems entry mounts it)"
        elif node.kind != "dir":
            state[storage] = f"storage path is {describe_kind(node)}"
        else:
            state[storage] = None
            if fs is None and plan_out is None and node.dev == root_dev:
                log.warn(f"{host}: not a mount point; kept data would live on the root filesystem")
    return state


# --- Commands --------------------------------------------------------------------------

def group_by_storage_state(config: Config, storage_state: dict, log: Log | None):
    usable, skipped = [], {}
    for entry in config.entries:
        reason = storage_state.get(entry.storage)
        if reason is None:
            usable.append(entry)
        else:
            skipped.setdefault(entry.storage, []).append(entry)
    for storage, entries in skipped.items():
        if log is not None:
            log.error(f"{as_path(storage)}: {storage_state[storage]}; "
                      f"{len(entries)} entries not applied")
    return usable, skipped


def run_entries(numbered: list, tree: Tree, executor: Executor, accounts: Accounts,
                log: Log) -> int:
    """Plan and run each (index, entry) in turn; the number that failed."""
    failed = 0
    for index, entry in numbered:
        log.entry = index
        ok = False
        try:
            executor.run(plan_entry(entry, tree, accounts), entry.storage)
            ok = True
        except Exception as exc:  # expected failures, and bugs: the others still run
            log.error(failure_text(exc, tree.host(entry.target)))
        failed += not ok
        tree.settle(ok)
    return failed


# --- Two processes ----------------------------------------------------------------------
#
# Half of apply's time is the kernel's (mkdir, open, mount), and the other
# half Python's; a second process on a second CPU shares the entries. They
# are cut into shares that meet in no directory apply creates or mounts on
# once a few entries have run; the two processes take the shares in turn
# from a pipe, so the one with the slower shares takes fewer, and the
# messages are written in entry order, as one process writes them.

TWO_PROCESSES_MIN_ENTRIES = 250  # below, a fork costs about what it saves
TWO_PROCESSES_MIN_SHARE = 64     # weight (2 a directory, 1 a file) beside the heaviest share
SHARES = 48                      # each share about 1/SHARES of the work: both end together
SPLIT_DEPTH_MAX = 8              # entries with a longer common prefix stay in one share
ENTRY_WEIGHT = {"directory": 2, "file": 1}  # a directory's entry makes about twice the calls
ACCOUNT_PATHS = {("etc",), ("etc", "passwd"), ("etc", "group")}


def two_processes_wanted(count: int) -> bool | None:
    """None: one process. False: two where the entries split well (enough
    entries, two CPUs). True: two whenever they split at all
    (IMPERMANENCE_JOBS=2)."""
    jobs = os.environ.get("IMPERMANENCE_JOBS", "")
    if jobs == "1":
        return None
    if jobs == "2":
        return True
    if count < TWO_PROCESSES_MIN_ENTRIES:
        return None
    try:
        return False if len(os.sched_getaffinity(0)) >= 2 else None
    except (AttributeError, OSError):
        return None


def split_in_shares(entries: list, several_storages: bool, forced: bool):
    """(first, shares, meets), or None for one process: `first` the
    indexes of the entries to run before the second process starts,
    `shares` lists of (start, end) index ranges that can run at the same
    time as each other, heaviest first, and `meets` the directories P
    where shares meet, each with the storages used below it.

    Entries are sorted by target, so those below a directory P are
    consecutive. A run heavier than 1/SHARES of the whole is cut between
    entries that differ in the next component of their target, unless its
    first target is P itself (the others are all nested in it); a piece
    with one name that is still too heavy is cut one component deeper.
    Pieces of a cut run meet only in P and its parents, on the root and in
    each storage: the entries below P up to the first one of each storage
    go into `first`. They run before the others below P in one process
    too, in the same order, and they leave P in place everywhere (no entry
    lies above P: the run would not have been cut). The pieces then share
    nothing that an entry creates, changes or mounts on (check_overlaps
    keeps every target clear of the storage paths, and a source lies under
    <storage><target>). Found by binary search, the cuts cost a few steps
    a share, not a step an entry."""
    from itertools import accumulate

    targets = [entry.target for entry in entries]
    count = len(targets)
    # Names resolve through <root>/etc/passwd and /etc/group as the earlier
    # entries left them: then one process, in order.
    for path in ACCOUNT_PATHS:
        k = first_at_least(targets, path, 0, count)
        if k < count and targets[k][:2] == path:
            return None
    weights = list(accumulate(map(ENTRY_WEIGHT.__getitem__, [e.kind for e in entries]), initial=0))
    total = weights[-1]
    limit = max(1, total // SHARES)
    first: set = set()
    meets: list = []
    spans: list = []
    runs = [(0, count, 0)]
    while runs:
        lo, hi, depth = runs.pop()
        if (weights[hi] - weights[lo] <= limit or depth == SPLIT_DEPTH_MAX
                or len(targets[lo]) == depth):
            spans.append((lo, hi))
            continue
        pieces = 0
        i = lo
        while i < hi:
            # Up to where [i, p) reaches the limit, then back or on to a
            # change of name at `depth`.
            p = first_at_least(weights, weights[i] + limit, i + 1, hi)
            named = targets[p - 1][:depth + 1]
            start = first_at_least(targets, named, i, p - 1)
            pieces += 1
            if start > i:  # whole names, lighter than the limit together
                spans.append((i, start))
                i = start
                continue
            end = end_of_prefix(targets, named, p, hi)
            if weights[end] - weights[i] > limit:
                runs.append((i, end, depth + 1))
            else:
                spans.append((i, end))
            i = end
        if depth and pieces > 1:
            # The pieces meet in P, on the root and in each storage: what
            # runs first below P in one process, up to the first entry of
            # each storage, runs first here too, and leaves P in place.
            last = lo
            seen = {entries[lo].storage}
            if several_storages:
                for k in range(lo + 1, hi):
                    if entries[k].storage not in seen:
                        seen.add(entries[k].storage)
                        last = k
            first.update(range(lo, last + 1))
            meets.append((targets[lo][:depth], tuple(seen)))
    # Spans without the entries that run first, merged in order up to the
    # limit: a share is a list of spans.
    spans.sort()
    first_sorted = sorted(first)
    shares: list = []
    share_weights: list = []
    share: list = []
    weight = 0
    f = 0
    for lo, hi in spans:
        while f < len(first_sorted) and first_sorted[f] < hi:
            k = first_sorted[f]
            if lo < k:
                share.append((lo, k))
                weight += weights[k] - weights[lo]
            lo = k + 1
            f += 1
        if lo < hi:
            share.append((lo, hi))
            weight += weights[hi] - weights[lo]
        if weight >= limit:
            shares.append(share)
            share_weights.append(weight)
            share, weight = [], 0
    if share:
        shares.append(share)
        share_weights.append(weight)
    if len(shares) < 2 or (not forced and total - max(share_weights) < TWO_PROCESSES_MIN_SHARE):
        return None
    order = sorted(range(len(shares)), key=share_weights.__getitem__, reverse=True)
    return first_sorted, [shares[i] for i in order], meets


def share_entries(share: list, entries: list) -> list:
    """The (index, entry) pairs of a share."""
    pairs: list = []
    for lo, hi in share:
        pairs.extend(zip(range(lo, hi), entries[lo:hi]))
    return pairs


def take_share(queue_fd: int) -> int | None:
    """The next share's number from the queue pipe, None once it is empty.
    Every record is two bytes and every read asks for two, so a read takes
    one whole record, whichever process makes it."""
    record = os.read(queue_fd, 2)
    return int.from_bytes(record, "little") if record else None


def run_share(share: list, entries: list, tree: Tree, executor: Executor, accounts: Accounts,
              log: Log, first_binds: list) -> int:
    """run_entries for one share. Its entries come in path order, but the
    shares do not, and Tree.enter forgets the binds behind the entry it
    plans: each share starts again from those binds of the first entries
    (path, source, [start, end) of the entries below it) that lie above
    some entry of its own (a kept directory among the first entries can
    hold entries of any share; the others would only make every lookup
    translate). A bind made in another share lies above none of this
    one's entries."""
    tree.binds = {path: source for path, source, start, end in first_binds
                  if any(lo < end and start < hi for lo, hi in share)}
    return run_entries(share_entries(share, entries), tree, executor, accounts, log)


def start_share_taker(entries: list, shares: list, tree: Tree, executor: Executor,
                      accounts: Accounts, log: Log, first_binds: list) -> tuple:
    """Fork a process that takes shares from the queue and runs them;
    (its pid or None if fork failed, the queue, the pipe its report comes
    through or None). The report: one line a message (entry, level, to
    kmsg, text), then `end <number of entries that failed>`."""
    queue_r, queue_w = os.pipe()
    # A few hundred bytes: the pipe holds them all before anyone reads.
    os.write(queue_w, b"".join(i.to_bytes(2, "little") for i in range(len(shares))))
    os.close(queue_w)
    result_r, result_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:
        os.close(result_r)
        os.close(result_w)
        return None, queue_r, None
    if pid:
        os.close(result_w)
        return pid, queue_r, result_r
    status = 70
    try:
        os.close(result_r)
        log.held = []
        failed = 0
        while (number := take_share(queue_r)) is not None:
            failed += run_share(shares[number], entries, tree, executor, accounts, log, first_binds)
        records = [f"{index}\t{level}\t{int(to_kmsg)}\t{text.translate(UNPRINTABLE)}\n"
                   for index, level, text, to_kmsg in log.held]
        records.append(f"end\t{failed}\n")
        data = memoryview("".join(records).encode("utf-8", "surrogatepass"))
        while data:
            data = data[os.write(result_w, data):]
        status = 0
    finally:
        os._exit(status)


def share_taker_report(pid: int, result_fd: int):
    """(messages, number failed) from the second process; or, if it ended
    without reporting, how it ended. A complete report is enough: the
    process is not waited for while its memory is given back, only reaped
    if it is already gone (an orphan is reaped by init)."""
    chunks = []
    while chunk := os.read(result_fd, 1 << 16):
        chunks.append(chunk)
        if chunk.endswith(b"\n") and b"".join(chunks[-2:]).rsplit(b"\n", 2)[-2].startswith(b"end\t"):
            break
    os.close(result_fd)
    messages, failed = [], None
    for record in b"".join(chunks).decode("utf-8", "surrogatepass").split("\n"):
        if record.startswith("end\t"):
            failed = int(record[4:])
        elif record:
            index, level, to_kmsg, text = record.split("\t", 3)
            messages.append((int(index), int(level), text, to_kmsg == "1"))
    if failed is not None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return messages, failed
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


def meeting_points_in_place(meets: list, tree: Tree) -> bool:
    """Whether every directory where shares meet is a directory, on the
    root and in each storage used below it."""
    try:
        for path, storages in meets:
            for where in (path, *(storage + path for storage in storages)):
                node = tree.look(where)
                if node is None or node.kind != "dir":
                    return False
    except EntryError:
        return False
    return True


def run_in_two(entries: list, first: list, shares: list, meets: list, tree: Tree,
               executor: Executor, accounts: Accounts, log: Log, start_over) -> int:
    """Run the entries `first` names here, then the shares in two
    processes, each taking the next share from the queue until none is
    left; the number of entries that failed. If the second process ends
    without reporting (killed, out of memory), the shares this process did
    not run are run again here: apply is idempotent, and start_over() gives
    a Tree, Executor and Accounts that have not seen the state it left."""
    held = log.held = []
    try:
        # Every bind the first entries make is kept for the shares, also
        # those behind a later first entry.
        tree.keep_binds = True
        failed = run_entries([(k, entries[k]) for k in first], tree, executor, accounts, log)
        tree.keep_binds = False
        first = set(first)
        if failed and not meeting_points_in_place(meets, tree):
            # Two shares would both make it: the rest here, in order.
            rest = [(k, entry) for k, entry in enumerate(entries) if k not in first]
            return failed + run_entries(rest, tree, executor, accounts, log)
        targets = [entry.target for entry in entries]
        first_binds = [(path, source, *below(targets, path)) for path, source in tree.binds.items()]
        pid, queue_fd, result_fd = start_share_taker(entries, shares, tree, executor, accounts, log,
                                                     first_binds)
        ran = set()
        while (number := take_share(queue_fd)) is not None:
            ran.add(number)
            failed += run_share(shares[number], entries, tree, executor, accounts, log, first_binds)
        os.close(queue_fd)
        if pid is None:
            return failed
        report = share_taker_report(pid, result_fd)
        if not isinstance(report, str):
            held.extend(report[0])
            return failed + report[1]
    finally:
        log.release(held)
    left = sorted((pair for number, share in enumerate(shares) if number not in ran
                   for pair in share_entries(share, entries)), key=lambda n: n[0])
    log.error(f"apply: the second process {report} before it was done; "
              f"running its {len(left)} entries here")
    tree, executor, accounts = start_over()
    try:
        return failed + run_entries(left, tree, executor, accounts, log)
    finally:
        executor.close()


def command_apply(config: Config, root: str, log: Log) -> int:
    started = time.monotonic()
    tree = Tree(root)
    mounts = MountTable()
    executor = Executor(tree, log)
    processes, failed = 1, 0
    KEPT_UNTIL_EXIT.append(tree)
    try:
        storage_state = prepare_storage(config, tree, executor, mounts, log)
        available = [s for s, reason in storage_state.items() if reason is None]
        accounts = Accounts(config, tree, available)
        usable, skipped = group_by_storage_state(config, storage_state, log)
        KEPT_UNTIL_EXIT.append(usable)
        wanted = two_processes_wanted(len(usable))
        split = (None if wanted is None
                 else split_in_shares(usable, len(config.storages) > 1, wanted))
        if split is None:
            failed = run_entries(list(enumerate(usable)), tree, executor, accounts, log)
        else:
            def start_over():
                fresh = Tree(root)
                return fresh, Executor(fresh, log), Accounts(config, fresh, available)

            processes = 2
            failed = run_in_two(usable, *split, tree, executor, accounts, log, start_over)
    finally:
        executor.close()
    elapsed = (time.monotonic() - started) * 1000
    log.info(f"apply: {len(config.entries)} entries, {failed} failed, "
             f"{sum(len(v) for v in skipped.values())} skipped, {elapsed:.1f} ms"
             + (", in two processes" if processes == 2 else ""))
    if skipped:
        return EXIT_STORAGE
    return EXIT_FAILED if failed else EXIT_OK


def command_plan(config: Config, root: str, log: Log, out) -> int:
    tree = Tree(root)
    mounts = MountTable()
    lines: list = []
    storage_state = prepare_storage(config, tree, None, mounts, log, plan_out=lines)
    available = [s for s, reason in storage_state.items() if reason is None]
    accounts = Accounts(config, tree, available)
    usable, skipped = group_by_storage_state(config, storage_state, None)
    for storage, entries in skipped.items():
        lines.append(f"skip {len(entries)} entries of {tree.host(storage)}: {storage_state[storage]}")
    for entry in usable:
        ok = False
        try:
            for action in plan_entry(entry, tree, accounts):
                lines.append(action.describe(tree))
            ok = True  # apply runs what comes before a Fail: it stays planned
        except Exception as exc:  # this entry's plan is lost, not the others'
            lines.append("fail " + failure_text(exc, tree.host(entry.target)))
        # An entry that could not be planned runs nothing in apply: what
        # it planned is forgotten, and the next entry plans it again.
        tree.settle(ok)
    if not lines:
        lines.append("nothing to do: everything is in place")
    out.write("".join(line.translate(UNPRINTABLE) + "\n" for line in lines))
    return EXIT_OK


STATES = ("ok", "not-mounted", "wrong-source", "not-linked", "source-missing",
          "owner-differs", "mode-differs", "error", "storage-unavailable")


def entry_status(entry: Entry, tree: Tree, mounts: MountTable, accounts: Accounts) -> tuple:
    """(state, detail) of one entry on the live system."""
    source, target = entry.source, entry.target
    src = tree.look(source)
    tgt = tree.look(target)
    host_target = tree.host(target)
    if entry.kind == "file":
        if tree.same(source[:-1], target[:-1]):
            if src is None:
                return "ok", "inside a kept directory; the source is created on first write"
            if src.kind != "file":
                return "error", f"source is {describe_kind(src)}"
            return "ok", "inside a kept directory"
        wanted = link_text(entry)
        if tgt is not None and tgt.kind == "link" and tgt.link == wanted:
            if src is None:
                return "ok", "linked; the source is created on first write"
            return "ok", "linked"
        if entry.method == "symlink":
            return "not-linked", f"target is {describe_kind(tgt) if tgt else 'missing'}; expected a link to {wanted}"
        if src is None:
            return "source-missing", f"{tree.host(source)} does not exist and target is not a link to it"
        if tgt is not None and tree.same(source, target):
            return "ok", "mounted"
        if tgt is not None and mounts.is_mountpoint(host_target):
            return "wrong-source", "mounted from " + "".join(mounts.points[host_target][:2])
        return "not-mounted", f"target is {describe_kind(tgt) if tgt else 'missing'}"
    if src is None:
        return "source-missing", f"{tree.host(source)} does not exist"
    if src.kind != "dir":
        return "error", f"source is {describe_kind(src)}"
    if tgt is None or not tree.same(source, target):
        if tgt is not None and mounts.is_mountpoint(host_target):
            return "wrong-source", "mounted from " + "".join(mounts.points[host_target][:2])
        return "not-mounted", "target is " + (describe_kind(tgt) if tgt else "missing")
    uid, gid, mode = accounts.resolve(entry.perms, entry.storage)
    if (src.uid, src.gid) != (uid, gid):
        return "owner-differs", f"source is {src.uid}:{src.gid}, declared {uid}:{gid}"
    if src.mode != mode:
        return "mode-differs", f"source is {format_mode(src.mode)}, declared {format_mode(mode)}"
    return "ok", "mounted"


def command_status(config: Config, root: str, log: Log, out, as_json: bool) -> int:
    tree = Tree(root)
    mounts = MountTable()  # read once for the whole run
    storage_rows = []
    state_of: dict = {}
    for storage in config.storages:
        host = tree.host(storage)
        try:
            node = tree.look(storage)
        except EntryError as exc:
            node, problem = None, exc.cause
        else:
            problem = None if node is not None and node.kind == "dir" else "missing"
        if problem:
            state, detail = "unavailable", problem
        elif mounts.is_mountpoint(host):
            state, detail = "mounted", "from " + mounts.points[host][0]
        else:
            state, detail = "not-a-mount-point", "a plain directory"
        storage_rows.append({"storage": as_path(storage), "state": state, "detail": detail})
        state_of[storage] = state
    accounts = Accounts(config, tree, [s for s, st in state_of.items() if st != "unavailable"])
    rows = []
    for entry in config.entries:
        if state_of.get(entry.storage) == "unavailable":
            state, detail = "storage-unavailable", f"{as_path(entry.storage)} is unavailable"
        else:
            try:
                state, detail = entry_status(entry, tree, mounts, accounts)
            except EntryError as exc:
                state, detail = "error", f"{exc.path}: {exc.cause}"
            except OSError as exc:
                state, detail = "error", describe_oserror(exc)
            except Exception as exc:  # a bug: reported for this entry only
                state, detail = "error", internal_error(exc)
        rows.append({"target": as_path(entry.target), "kind": entry.kind,
                     "source": as_path(entry.source), "state": state, "detail": detail})
    drift = sum(1 for r in rows if r["state"] != "ok")
    drift += sum(1 for r in storage_rows if r["state"] == "unavailable")
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
    return EXIT_FAILED if drift else EXIT_OK


def command_unmount(config: Config, root: str, log: Log) -> int:
    """Undo apply, children first: unmount our bind mounts, remove the links
    and the empty mount points apply made. Storage is never written to."""
    tree = Tree(root)
    mounts = MountTable()
    failed = 0
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    chain = DirChain(root_fd, tree)
    proc_fds = os.path.isdir("/proc/self/fd")
    kept_dirs = {entry.target for entry in config.entries if entry.kind == "directory"}
    try:
        for entry in reversed(config.entries):
            host = tree.host(entry.target)
            # Inside another kept directory, a link or mount point apply
            # made lies in that directory's storage (or is the source
            # itself): left there.
            in_storage = any(entry.target[:depth] in kept_dirs for depth in range(1, len(entry.target)))
            try:
                unmount_entry(entry, tree, mounts, chain, proc_fds, log, in_storage)
            except Exception as exc:  # this entry stays, the others are undone
                failed += 1
                log.error(failure_text(exc, host))
        # On a running system (--root /) the persistent filesystems are the
        # system's own, mounted by stage 1 or fstab: they stay.
        for fs in sorted(config.filesystems if root != "/" else (), key=lambda f: f.mountpoint,
                         reverse=True):
            host = tree.host(fs.mountpoint)
            if mounts.is_mountpoint(host):
                chain.truncate(0)
                try:
                    umount2(host, UMOUNT_NOFOLLOW, host)
                    log.info(f"unmounted {host}")
                except OSError as exc:
                    failed += 1
                    log.error(f"{host}: cannot unmount: {describe_oserror(exc)}")
    finally:
        chain.close()
        os.close(root_fd)
    return EXIT_FAILED if failed else EXIT_OK


def unmount_entry(entry: Entry, tree: Tree, mounts: MountTable, chain: DirChain,
                  proc_fds: bool, log: Log, in_storage: bool) -> None:
    """Unmount one entry's bind mount; remove the link or the empty mount
    point apply made for it, unless it lies in storage (in_storage)."""
    target = entry.target
    host = tree.host(target)
    node = tree.look(target)
    if node is None:
        return
    if node.kind == "link":
        if in_storage or node.link != link_text(entry):
            return
        parent = chain.open(target[:-1])
        os.unlink(target[-1], dir_fd=parent)
        log.info(f"removed link {host}")
        return
    src = tree.look(entry.source)
    if mounts.is_mountpoint(host) and src is not None and tree.same(entry.source, target):
        parent = chain.open(target[:-1])
        # Through the pinned parent, never following a link at the leaf; an
        # fd on the mount itself would keep it busy.
        path = f"/proc/self/fd/{parent}/{target[-1]}" if proc_fds else host
        umount2(path, UMOUNT_NOFOLLOW, host)
        log.info(f"unmounted {host}")
        mounts.remove(host)
        tree.forget(target)
        node = tree.look(target)
    if node is None or in_storage or mounts.is_mountpoint(host):
        return
    # Remove the mount point only if apply created it and it is empty.
    if node.kind not in ("dir", "file"):
        return
    parent = chain.open(target[:-1])
    flags = (O_DIR if node.kind == "dir" else os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    fd = os.open(target[-1], flags, dir_fd=parent)
    try:
        st = os.fstat(fd)
        marked = st.st_mtime_ns == MARK_TIME_NS
        empty = (not os.listdir(fd)) if node.kind == "dir" else st.st_size == 0
    finally:
        os.close(fd)
    if marked and empty:
        if node.kind == "dir":
            os.rmdir(target[-1], dir_fd=parent)
        else:
            os.unlink(target[-1], dir_fd=parent)
        log.info(f"removed mount point {host}")


def command_check(path: str, out) -> int:
    """Say what the JSON config holds; of a compiled one, also whether its
    records are used, after checking they are what its JSON gives."""
    json_bytes, payload, is_compiled = read_config_file(path)
    config = config_from_json(json_bytes, path)
    compiled_note = ""
    if is_compiled:
        compiled = config_from_payload(payload) if payload is not None else None
        if compiled is None:
            compiled_note = ("compiled by another version of impermanence_boot.py (or damaged): "
                             "its JSON is read instead; compile it again\n")
        elif compiled != config:
            raise ConfigFileError(path, "compiled records differ from its JSON; compile it again")
        else:
            compiled_note = "compiled by this script: apply loads its records\n"
    dirs = sum(1 for e in config.entries if e.kind == "directory")
    out.write(f"config OK: {dirs} directories, {len(config.entries) - dirs} files in "
              f"{len(config.storages)} storage locations, {len(config.filesystems)} filesystems\n")
    out.write(compiled_note)
    return EXIT_OK


def command_compile(path: str, output: str, out) -> int:
    """Check the config at path (a compiled one's JSON) and write it
    compiled to output."""
    json_bytes = read_config_file(path)[0]
    config = config_from_json(json_bytes, path)
    try:
        write_compiled(config, json_bytes, output)
    except OSError as exc:
        raise ConfigFileError(output, f"cannot write compiled config: {describe_oserror(exc)}") from None
    out.write(f"compiled {len(config.entries)} entries to {output}\n")
    return EXIT_OK


# --- Command line ------------------------------------------------------------------------

USAGE = """\
usage: impermanence_boot.py [--config PATH] [--root PATH] [-v|--verbose] [-q|--quiet] [COMMAND] [--json|--output PATH]

Reconnect persistent state to a freshly wiped root (NixOS impermanence's
environment.persistence, as JSON), before switch_root or by hand.

commands (default: apply):
  apply    mount persistent storage, create directories, bind/link everything
  plan     print, in order, every action apply would take now; change nothing
  status   compare the live system with the config, one line per entry
           (--json for machine-readable output); exit 1 on drift
  unmount  undo what apply set up (bind mounts, links), in reverse order;
           never deletes or modifies anything in persistent storage
  check    validate the config only
  compile  validate the config and write it, with its checked records, to
           --output PATH, for apply to load fast at boot (see README)

options:
  --config PATH  config file, JSON or compiled (default: $IMPERMANENCE_CONFIG,
                 else /etc/impermanence.json)
  --root PATH    the root the config's paths are relative to (default: /)
  -v, --verbose  log every action
  -q, --quiet    only errors
  --json         with status: JSON output
  --output PATH  with compile: where to write the compiled config
  -h, --help     show this help

exit status: 0 all in place; 1 an entry failed (others applied) or status
found drift; 2 usage or config error, nothing changed; 3 a persistent
storage location was unavailable, nothing bound from it.
"""

COMMANDS = ("apply", "plan", "status", "unmount", "check", "compile")


class Options(Record):
    __slots__ = _fields = ("command", "config", "root", "verbosity", "json", "help", "output")


def parse_args(argv: list) -> Options:
    command, config, root, verbosity, as_json, output = None, None, "/", 1, False, None
    args = list(argv)
    while args:
        arg = args.pop(0)
        value = None
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)
        if arg in ("-h", "--help"):
            return Options(None, None, None, 1, False, True, None)
        if arg in ("--config", "--root", "--output"):
            if value is None:
                if not args:
                    raise UsageError(f"{arg} needs a path")
                value = args.pop(0)
            if not value:
                raise UsageError(f"{arg} needs a non-empty path")
            if arg == "--config":
                config = value
            elif arg == "--root":
                root = value
            else:
                output = value
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
    if as_json and command != "status":
        raise UsageError("--json goes with status")
    if (output is None) != (command != "compile"):
        raise UsageError("compile needs --output PATH" if output is None else "--output goes with compile")
    if config is None:
        config = os.environ.get("IMPERMANENCE_CONFIG") or DEFAULT_CONFIG
    return Options(command, config, root, verbosity, as_json, False, output)


def main(argv: list | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write(f"impermanence: {exc}\n{USAGE.splitlines()[0]}\n")
        return EXIT_CONFIG
    if opts.help:
        sys.stdout.write(USAGE)
        return EXIT_OK
    log = Log(opts.verbosity)
    KEPT_UNTIL_EXIT.clear()
    # One short run that makes no reference cycles: the cyclic collector
    # would only walk the config and plan again and again as they grow.
    gc.disable()
    try:
        if opts.command == "compile":
            return command_compile(opts.config, opts.output, sys.stdout)
        if opts.command == "check":
            return command_check(opts.config, sys.stdout)
        config = load_config_file(opts.config, log)
        KEPT_UNTIL_EXIT.append(config)
    except ConfigError as exc:
        where = (exc.where if isinstance(exc, ConfigFileError) or exc.where.startswith("/")
                 else f"{opts.config}: {exc.where}")
        log.error(f"{where}: {exc.cause}")
        return EXIT_CONFIG
    root = os.path.realpath(opts.root)
    if not os.path.isdir(root):
        log.error(f"{opts.root}: --root is not a directory")
        return EXIT_CONFIG
    try:
        if opts.command == "apply":
            # Directories are made with their final mode; nothing is
            # created with a mode not set explicitly.
            os.umask(0)
            return command_apply(config, root, log)
        if opts.command == "plan":
            return command_plan(config, root, log, sys.stdout)
        if opts.command == "status":
            return command_status(config, root, log, sys.stdout, opts.json)
        return command_unmount(config, root, log)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILED
    except Exception as exc:  # a bug: still one line, details with -v
        log.error(f"{opts.command}: internal error: {type(exc).__name__}: {exc}")
        if opts.verbosity >= 2:
            import traceback

            traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    status = main()
    # Tearing the interpreter down would free every object of the run one
    # by one, for nothing: flush what is buffered and leave.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(status)
