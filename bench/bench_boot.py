#!/usr/bin/env python3
"""Boot-time benchmark of impermanence_boot.py.

Run as root:  python3 bench/bench_boot.py                      (N = 25, 100, 300, 1000, 10000)
              python3 bench/bench_boot.py --sizes 25 --reps 1   (smoke test)

For every N it generates a configuration of N entries (half directories,
half files; nested paths; system and user level; some present in storage,
some not), puts the storage on an ext4 filesystem on a loop device, and then,
in the same run and on the same fresh tmpfs root, measures wall time and peak
memory of these contenders doing the same work:

  apply         `python3 -I -S impermanence_boot.pyc --root R --config C.json apply`,
                the whole process, interpreter start included, the script
                byte-compiled beforehand, as the initramfs and the NixOS
                module run it;
  impermanence  the invocation sequence NixOS impermanence's module
                generates: one bash process (bench/impermanence/
                create-directories.sh) per storage dir, home, parent and
                listed directory, one `mount --bind` per directory, one bash
                process (bench/impermanence/mount-file.sh) per file;
  shell         the same steps in one bash script: per entry it walks the
                path (`[ -d ]`), creates what is missing with `mkdir`/`chown`/
                `chmod --reference`, then `mount --bind` or `ln -s`;
  floor         only the necessary system calls (mkdir, chown/chmod, open,
                mount, symlink) from an operation list the benchmark planned
                in advance; C (bench/floor.c) when `cc` exists, else Python;
                with C, the same loop in Python is measured too (pyfloor);
  start         the bare interpreter, `python3 -I -S -c pass`.

apply is judged against floor + start, the least any program started as a
new interpreter could take; the goals are in GOALS.

Before each timed run the root is a fresh tmpfs with the storage mounted at
R/persistent (as stage 1 does for a neededForBoot filesystem); afterwards the
whole tree is detached and everything the run created in storage removed, so
every run starts from the same state, and it starts once the previous run's
cleanup (writeback, detached mounts) is done. Contenders run round-robin, one
untimed warm-up each per N; the slow ones (impermanence, shell) then get
--reps timed runs (--reps-large from N = 10,000), the others, still
interleaved, at least --reps-fast. The warm-up runs are verified: the
resulting tree (every path under R and in storage with type, owner, mode;
every mount under R with the storage path it shows) must be identical for
all contenders and must match what the configuration asks for. The
benchmark exits 1 when a contender fails or the trees differ, never because
of timing.

Standard library only. Everything happens in a private mount namespace; the
storage image is attached with autoclear so the loop device goes away with
the namespace even if the benchmark is killed.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
DEFAULT_SCRIPT = os.path.join(PROJECT, "impermanence_boot.py")
sys.path.insert(0, os.path.join(PROJECT, "vm"))
from distro_python import NoInterpreter, interpreter  # noqa: E402
# As stage 1 runs the script (the NixOS module, vm/): -S skips `site`,
# which the script does not need.
DEFAULT_FLAGS = "-I -S"

DEFAULT_SIZES = "25,100,300,1000,10000"
STORAGE = "/persistent"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "IMPERMANENCE_NO_KMSG": "1",
}
# Verified contenders, in the order they run; "pyfloor" joins when the floor
# is in C. "start" is timed in the same rounds but leaves no tree.
CONTENDERS = ("apply", "impermanence", "shell", "floor")
SLOW = ("impermanence", "shell")  # seconds a run: fewer timed runs
IMPERMANENCE_DIR = os.path.join(HERE, "impermanence")
# apply ÷ (floor + start) at most this, per N; and from 1,000 to 10,000 the
# cost per entry may grow at most GROWTH_GOAL times.
GOALS = {25: 1.15, 100: 1.15, 300: 1.15, 1000: 2.0}
GROWTH_GOAL = (1000, 10000, 1.5)

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def default_python() -> str:
    """The interpreter stage 1 runs (vm/distro_python.py); this one without it."""
    try:
        return interpreter().path
    except NoInterpreter:
        return sys.executable


def log(msg: str) -> None:
    sys.stderr.write("bench: %s\n" % msg)
    sys.stderr.flush()


# --------------------------------------------------------------------------
# Configuration generator and the model of what apply must do (SPEC §4)

USERS = {"u%d" % i: (1000 + i, 100, "/home/u%d" % i) for i in range(4)}
USERS["svc"] = (400, 400, "/var/empty")
GROUPS = {"users": 100, "svc": 400}
MODES = [("0700", 0o700), ("750", 0o750), ("u=rwx,g=rx,o=", 0o750), ("0755", 0o755)]


class Entry:
    __slots__ = ("kind", "path", "user", "uid", "gid", "mode", "method", "parent", "exists", "item",
                 "covered", "home")

    def __init__(self, kind, path, user=None, uid=0, gid=0, mode=0o755, method="auto",
                 parent=None, exists=False, item=None, home=None):
        self.kind = kind          # "dir" | "file"
        self.path = path          # target as the booted system sees it
        self.user = user          # None: system level; else the user whose home it is in
        self.uid, self.gid, self.mode = uid, gid, mode
        self.method = method
        self.parent = parent      # (uid, gid, mode) of a file's parentDirectory, or None
        self.exists = exists      # source present in storage before apply
        self.item = item          # the JSON item as written in the config
        # inside another kept directory of the same storage: once that one is
        # bound, the target *is* the source; apply binds nothing more
        self.covered = False
        self.home = home          # the user's home; None: USERS[user]'s


def generate(n: int, seed: int = 6):
    """N entries, deterministic for a given N: (config dict, [Entry])."""
    rng = random.Random(seed * 1000003 + n)
    entries: list[Entry] = []
    n_dirs = n // 2
    n_files = n - n_dirs
    last_plain_dir = None
    for i in range(n_dirs):
        exists = rng.random() < 0.5
        if last_plain_dir is not None and rng.random() < 0.05:
            # nested entry: a kept directory inside another kept directory
            parent = last_plain_dir
            last_plain_dir = None
            rel = parent.item if isinstance(parent.item, str) else parent.item["directory"]
            rel += "/nested"
            path = parent.path + "/nested"
            if parent.user is None:
                e = Entry("dir", path, exists=exists, item=rel)
            else:
                uid, gid, _ = USERS[parent.user]
                e = Entry("dir", path, user=parent.user, uid=uid, gid=gid, exists=exists, item=rel)
            e.covered = True
            entries.append(e)
            continue
        if rng.random() < 0.7:
            prefix = ("/var/lib", "/srv/data", "/var/cache/apps")[i % 3]
            path = ("%s/d%d" % (prefix, i) if i % 4 == 0
                    else "%s/g%d/h%d/d%d" % (prefix, i // 300, i // 30, i))
            if rng.random() < 0.3:
                spec, mode = MODES[i % len(MODES)]
                item = {"directory": path, "user": "svc", "group": "svc", "mode": spec}
                e = Entry("dir", path, uid=400, gid=400, mode=mode, exists=exists, item=item)
            else:
                e = Entry("dir", path, exists=exists, item=path)
        else:
            user = "u%d" % (i % 4)
            uid, gid, home = USERS[user]
            rel = ("Documents/p%d" % i if i % 3 == 0
                   else ".local/share/g%d/d%d" % (i // 200, i))
            if rng.random() < 0.2:
                item = {"directory": rel, "mode": "0700"}
                e = Entry("dir", home + "/" + rel, user=user, uid=uid, gid=gid, mode=0o700,
                          exists=exists, item=item)
            else:
                e = Entry("dir", home + "/" + rel, user=user, uid=uid, gid=gid, exists=exists, item=rel)
        entries.append(e)
        last_plain_dir = e
    for j in range(n_files):
        exists = rng.random() < 0.5
        r = rng.random()
        if r < 0.05:
            path = "/etc/secret%d/key" % j
            item = {"file": path, "parentDirectory": {"mode": "u=rwx,g=,o="}}
            e = Entry("file", path, parent=(0, 0, 0o700), exists=exists, item=item)
        elif r < 0.7:
            path = "/etc/f%d.conf" % j if j % 5 == 0 else "/etc/cfg%d/f%d.conf" % (j // 50, j)
            if rng.random() < 0.05:
                e = Entry("file", path, method="symlink", exists=exists,
                          item={"file": path, "method": "symlink"})
            else:
                e = Entry("file", path, exists=exists, item=path)
        else:
            user = "u%d" % (j % 4)
            uid, gid, home = USERS[user]
            rel = ".rc%d" % j if j % 4 == 0 else ".config/app%d/f%d" % (j // 40, j)
            e = Entry("file", home + "/" + rel, user=user, uid=uid, gid=gid, exists=exists, item=rel)
        entries.append(e)

    location = {"directories": [], "files": [], "users": {}}
    for e in entries:
        key = "directories" if e.kind == "dir" else "files"
        if e.user is None:
            location[key].append(e.item)
        else:
            u = location["users"].setdefault(e.user, {"directories": [], "files": []})
            u[key].append(e.item)
    config = {
        "users": {name: {"uid": uid, "group": "users" if gid == 100 else "svc", "home": home}
                  for name, (uid, gid, home) in USERS.items()},
        "groups": {name: {"gid": gid} for name, gid in GROUPS.items()},
        "persistence": {STORAGE: location},
    }
    entries.sort(key=lambda e: e.path.split("/"))
    return config, entries


def parse_mode(spec) -> int:
    """A mode as the config writes it (SPEC §3): octal, or symbolic chmod
    clauses applied to a 0 base ("u=rwx,g=rx,o=")."""
    spec = str(spec)
    if re.fullmatch(r"[0-7]{1,4}", spec):
        return int(spec, 8)
    mode = 0
    for clause in spec.split(","):
        m = re.fullmatch(r"([ugoa]*)([=+-])([rwxst]*)", clause)
        if not m:
            raise ValueError("mode %r: not octal or symbolic" % spec)
        who = m.group(1) or "a"
        classes = "ugo" if "a" in who else who
        bits = mask = 0
        for c in classes:
            shift = {"u": 6, "g": 3, "o": 0}[c]
            mask |= 7 << shift
            for ch in m.group(3):
                if ch in "rwx":
                    bits |= {"r": 4, "w": 2, "x": 1}[ch] << shift
                elif ch == "s" and c in "ug":
                    bits |= 0o4000 if c == "u" else 0o2000
                elif ch == "t" and c == "o":
                    bits |= 0o1000
        if m.group(2) == "=":
            mode = (mode & ~mask) | bits
        elif m.group(2) == "+":
            mode |= bits
        else:
            mode &= ~bits
    return mode


def entries_from_config(config: dict):
    """[Entry] for a real configuration (the JSON of SPEC §3), so the shell
    approach can be generated for it as for the synthetic ones: the same
    defaults (system level root:root 0755, user level the user and their
    primary group), names resolved from the config's users/groups tables.
    Only the storage path STORAGE is supported."""
    users = config.get("users", {})
    groups = config.get("groups", {})

    def gid_of(name):
        if isinstance(name, int) or str(name).isdigit():
            return int(name)
        return int(groups[name]["gid"])

    def uid_of(name):
        if isinstance(name, int) or str(name).isdigit():
            return int(name)
        return int(users[name]["uid"])

    def account(name):
        u = users[name]
        return uid_of(name), gid_of(u.get("group", "users")), u.get("home", "/home/" + name)

    entries: list[Entry] = []
    for name, loc in config.get("persistence", {}).items():
        if loc.get("enable", True) is False:
            continue
        if loc.get("persistentStoragePath", name) != STORAGE:
            raise ValueError("storage %s: only %s is supported" % (name, STORAGE))
        levels = [(None, None, "/", loc)]
        for uname, sub in loc.get("users", {}).items():
            _, _, home = account(uname)
            levels.append((uname, home, home.rstrip("/") + "/", sub))
        for uname, home, base, level in levels:
            d_uid, d_gid = account(uname)[:2] if uname else (0, 0)
            for item in level.get("directories", []):
                spec = item if isinstance(item, dict) else {"directory": item}
                path = base + spec["directory"].lstrip("/") if uname else spec["directory"]
                entries.append(Entry(
                    "dir", path, user=uname, home=home,
                    uid=uid_of(spec["user"]) if "user" in spec else d_uid,
                    gid=gid_of(spec["group"]) if "group" in spec else d_gid,
                    mode=parse_mode(spec.get("mode", "0755")), item=item))
            for item in level.get("files", []):
                spec = item if isinstance(item, dict) else {"file": item}
                path = base + spec["file"].lstrip("/") if uname else spec["file"]
                parent = None
                if "parentDirectory" in spec:
                    pd = spec["parentDirectory"]
                    parent = (uid_of(pd["user"]) if "user" in pd else d_uid,
                              gid_of(pd["group"]) if "group" in pd else d_gid,
                              parse_mode(pd.get("mode", "0755")))
                entries.append(Entry("file", path, user=uname, home=home, uid=d_uid, gid=d_gid,
                                     method=spec.get("method", "auto"), parent=parent, item=item))
    kept_dirs = [e.path for e in entries if e.kind == "dir"]
    for e in entries:
        e.covered = any(e.path.startswith(d + "/") for d in kept_dirs)
    entries.sort(key=lambda e: e.path.split("/"))
    return entries


def prefixes(path: str):
    """'/a/b/c' -> ['/a', '/a/b', '/a/b/c']"""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:k]) for k in range(1, len(parts) + 1)]


def source_dirs(e: Entry):
    """Storage-side directories an entry needs, outermost first, with the
    owner and mode each gets if it has to be created: [(P, uid, gid, mode)]."""
    out = []
    comps = prefixes(e.path)
    if e.kind == "file":
        comps = comps[:-1]
    home = (e.home or USERS[e.user][2]) if e.user else None
    for q in comps:
        if e.kind == "dir" and q == e.path:
            spec = (e.uid, e.gid, e.mode)
        elif e.kind == "file" and e.parent is not None and q == comps[-1]:
            spec = e.parent
        elif home is not None and q == home:
            spec = (e.uid, e.gid, 0o700)
        elif home is not None and q.startswith(home + "/"):
            spec = (e.uid, e.gid, 0o755)
        else:
            spec = (0, 0, 0o755)
        out.append((q,) + spec)
    return out


def target_dirs(e: Entry):
    comps = prefixes(e.path)
    return comps[:-1] if e.kind == "file" else comps


def populate_storage(store: str, entries) -> None:
    """The state a previous boot left: sources of 'exists' entries."""
    os.umask(0)
    for e in entries:
        if not e.exists:
            continue
        for q, uid, gid, mode in source_dirs(e):
            p = store + q
            if not os.path.isdir(p):
                os.mkdir(p, mode)
                os.chown(p, uid, gid)
        if e.kind == "file":
            p = store + e.path
            with open(p, "w") as f:
                f.write("kept %s\n" % e.path)
            os.chown(p, e.uid, e.gid)
    os.umask(0o022)


def write_floor_ops(path: str, root: str, entries) -> None:
    """The floor's operation list: each directory once, in target order."""
    seen = set()
    lines = []
    src_base = root + STORAGE
    for e in entries:
        for q, uid, gid, mode in source_dirs(e):
            key = ("S", q)
            if key not in seen:
                seen.add(key)
                lines.append("S\t%s\t%d\t%d\t%o" % (src_base + q, uid, gid, mode))
        for q in target_dirs(e):
            key = ("T", q)
            if key not in seen:
                seen.add(key)
                lines.append("T\t%s\t%s" % (root + q, src_base + q))
        src, tgt, link = src_base + e.path, root + e.path, STORAGE + e.path
        if e.covered:
            pass
        elif e.kind == "dir":
            lines.append("D\t%s\t%s" % (src, tgt))
        elif e.method == "symlink":
            lines.append("L\t%s\t%s" % (tgt, link))
        else:
            lines.append("F\t%s\t%s\t%s" % (src, tgt, link))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


SHELL_PRELUDE = r"""# Per-entry shell approach: the steps of NixOS impermanence's
# create-directories.bash and mount-file.bash in one script, with builtins
# where they do: every entry walks its own path, creates what is missing,
# then binds or links.
R=%(root)s
S=%(root)s%(storage)s
rc=0
# storage side: create a missing directory with the declared owner and mode
sd() { [ -d "$S$1" ] || { mkdir -m "$4" "$S$1" && chown "$2:$3" "$S$1"; } || rc=1; }
# root side: create a missing directory mirroring its storage counterpart
%(td)s
# directory: bind mount
bd() { mount --bind "$S$1" "$R$1" || rc=1; }
# file, method auto: bind mount when the source exists, else a symlink
bf() { if [ -e "$S$1" ]; then { [ -e "$R$1" ] || : > "$R$1"; } && mount --bind "$S$1" "$R$1" || rc=1; else ln -s "%(storage)s$1" "$R$1" || rc=1; fi; }
# file, method symlink
lf() { ln -s "%(storage)s$1" "$R$1" || rc=1; }
"""


# GNU coreutils (as the existing tools' scripts do), and the same for busybox,
# whose chown/chmod have no --reference: the owner and mode are read with stat
TD_REFERENCE = ('td() { [ -d "$R$1" ] || { mkdir "$R$1" && chown --reference="$S$1" "$R$1" '
                '&& chmod --reference="$S$1" "$R$1"; } || rc=1; }')
TD_STAT = ('td() { [ -d "$R$1" ] || { mkdir "$R$1" && chown "$(stat -c %u:%g "$S$1")" "$R$1" '
           '&& chmod "$(stat -c %a "$S$1")" "$R$1"; } || rc=1; }')


def shell_text(root: str, entries, busybox: bool = False) -> str:
    """The per-entry shell script for entries on root (storage at
    root/persistent). Plain POSIX sh; busybox=True for busybox's applets
    (no --reference), else GNU coreutils and util-linux mount."""
    out = [SHELL_PRELUDE % {"root": root, "storage": STORAGE,
                            "td": TD_STAT if busybox else TD_REFERENCE}]
    for e in entries:
        for q, uid, gid, mode in source_dirs(e):
            out.append("sd %s %d %d %o\n" % (q, uid, gid, mode))
        for q in target_dirs(e):
            out.append("td %s\n" % q)
        if e.covered:
            pass
        elif e.kind == "dir":
            out.append("bd %s\n" % e.path)
        elif e.method == "symlink":
            out.append("lf %s\n" % e.path)
        else:
            out.append("bf %s\n" % e.path)
    out.append("exit $rc\n")
    return "".join(out)


def write_shell(path: str, root: str, entries, busybox: bool = False) -> None:
    with open(path, "w") as f:
        f.write(shell_text(root, entries, busybox))


# --------------------------------------------------------------------------
# NixOS impermanence's invocation sequence

def impermanence_dirs(entries):
    """[(P, uid, gid, mode)]: the directories NixOS impermanence's module
    hands to create-directories.bash after the storage path itself, one
    call each, in its order: the parents of the homes, the homes, the
    parents of the listed directories and of the files' directories, then
    those directories themselves.

    Each path is called once (the module calls some twice, when two of its
    lists name the same path with different attributes: a few calls fewer
    here). Owner and mode are the ones apply gives the directory, where the
    module would differ: a listed directory that is also the parent of
    another listed one gets its own owner and mode (the module makes it
    first as a parent, root:root 0755), and "/" itself is never called (the
    module would copy the storage root's owner and mode onto the root)."""
    spec = {}
    for e in entries:
        for q, uid, gid, mode in source_dirs(e):
            spec.setdefault(q, (uid, gid, mode))

    def home_of(e):
        return (e.home or USERS[e.user][2]) if e.user else None

    homes = list(dict.fromkeys(home_of(e) for e in entries if e.user))
    listed = [e.path for e in entries if e.kind == "dir"]
    file_dirs = list(dict.fromkeys(os.path.dirname(e.path) for e in entries if e.kind == "file"))
    home_parents = [q for h in homes for q in prefixes(h)[:-1]]
    parents = []
    for e, p in [(e, e.path) for e in entries if e.kind == "dir"] + \
                [(e, os.path.dirname(e.path)) for e in entries if e.kind == "file"]:
        h = home_of(e)
        # at user level the module walks the path below the home only
        parents += [q for q in prefixes(p)[:-1] if h is None or q.startswith(h + "/")]
    order = dict.fromkeys(home_parents + homes + parents + listed + file_dirs)
    return [(q,) + spec[q] for q in order if q != "/"]


def impermanence_text(root: str, entries, shell: str = "bash") -> str:
    """The driver for the impermanence contender: a bash script that runs
    every step of the sequence as its own process, as the module's
    activation script and mount units do. Its own shell only sequences and
    collects the status (the module's wrapper: `trap "_status=1" ERR`)."""
    q = shlex.quote
    cd = q(os.path.join(IMPERMANENCE_DIR, "create-directories.sh"))
    mf = q(os.path.join(IMPERMANENCE_DIR, "mount-file.sh"))
    sh_ = q(shell)
    out = ["# NixOS impermanence's sequence for %d entries, each step its own process\n"
           % len(entries), "status=0\n", "trap 'status=1' ERR\n"]
    # the storage path itself: with no storage base the call only checks it
    out.append("%s %s %s '' %s 0 0 755\n" % (sh_, cd, q(root), q(STORAGE)))
    for p, uid, gid, mode in impermanence_dirs(entries):
        out.append("%s %s %s %s %s %d %d %o\n" % (sh_, cd, q(root), q(STORAGE), q(p), uid, gid, mode))
    # Every directory first (the module's activation script), then the
    # binds and files in target order, parents before children, as apply
    # does them. An entry inside another kept directory is left alone once that one is
    # bound (the target then is the source; apply binds nothing more), where
    # the module would bind it onto itself or, for a file, stop at "a file
    # already exists".
    for e in entries:
        if e.covered:
            continue
        if e.kind == "dir":
            out.append("mount --bind %s %s\n" % (q(root + STORAGE + e.path), q(root + e.path)))
        else:
            out.append("%s %s %s %s %s %s\n" % (sh_, mf, q(root), q(e.path), q(STORAGE + e.path), q(e.method)))
    out.append("exit $status\n")
    return "".join(out)


def impermanence_calls(text: str) -> dict:
    """How many processes of each step the driver starts."""
    counts = {"create-directories": 0, "mount": 0, "mount-file": 0}
    for line in text.splitlines():
        if "create-directories.sh" in line:
            counts["create-directories"] += 1
        elif line.startswith("mount --bind "):
            counts["mount"] += 1
        elif "mount-file.sh" in line:
            counts["mount-file"] += 1
    return counts
# --------------------------------------------------------------------------
# Mount namespace, storage, fresh roots

def enter_private_namespace() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "mount --make-rprivate /")


def sh(*argv: str) -> str:
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), p.returncode, p.stderr.strip()))
    return p.stdout


def mountinfo():
    """[(mount point, root within its filesystem, major:minor, fstype)]"""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a = line.split()
            sep = a.index("-")
            unesc = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
            out.append((unesc(a[4]), unesc(a[3]), a[2], a[sep + 1]))
    return out


def mount_source(mountpoint: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            a = line.split()
            if a[4] == mountpoint:
                return a[a.index("-") + 2]
    raise RuntimeError("%s is not mounted" % mountpoint)


def walk_tree(base: str, skip=()):
    """{relpath: attributes} for everything under base (not following links,
    not crossing into skipped paths); rel '' is base itself."""
    base_dev = os.lstat(base).st_dev
    out = {}

    def describe(path, st):
        if stat.S_ISLNK(st.st_mode):
            return ("l", os.readlink(path))
        fs = "same" if st.st_dev == base_dev else "other"
        if stat.S_ISDIR(st.st_mode):
            return ("d", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, fs)
        return ("f", oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_size, fs)

    out[""] = describe(base, os.lstat(base))

    def walk(d, rel):
        with os.scandir(d) as it:
            for ent in it:
                r = rel + "/" + ent.name
                if r in skip:
                    continue
                st = ent.stat(follow_symlinks=False)
                out[r] = describe(ent.path, st)
                if stat.S_ISDIR(st.st_mode):
                    walk(ent.path, r)

    walk(base, "")
    return out


class Storage:
    """ext4 on a loop device, mounted at <work>/store for the whole size."""

    def __init__(self, work: str, n: int):
        self.image = os.path.join(work, "persist-%d.img" % n)
        self.mnt = os.path.join(work, "store")
        os.makedirs(self.mnt, exist_ok=True)
        size_mb = 64 + n // 40
        with open(self.image, "wb") as f:
            f.truncate(size_mb << 20)
        sh("mkfs.ext4", "-q", "-F", "-L", "persist", "-N", str(max(8192, 4 * n)),
           "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image)
        # mount -o loop attaches the device with autoclear: it is detached
        # when its last mount goes, even if this process is killed.
        sh("mount", "-o", "loop", self.image, self.mnt)
        self.device = mount_source(self.mnt)
        self.initial = None

    def snapshot(self):
        self.initial = walk_tree(self.mnt, skip=("/lost+found",))

    def restore(self) -> None:
        """Remove what a run created; undo owner/mode changes."""
        now = walk_tree(self.mnt, skip=("/lost+found",))
        extra = sorted((r for r in now if r not in self.initial), key=len, reverse=True)
        for r in extra:
            p = self.mnt + r
            if now[r][0] == "d":
                for attempt in range(50):
                    try:
                        os.rmdir(p)
                        break
                    except OSError:
                        time.sleep(0.01)
                else:
                    os.rmdir(p)
            else:
                os.unlink(p)
        for r, attrs in self.initial.items():
            cur = now.get(r)
            if cur != attrs and attrs[0] in "df":
                os.chown(self.mnt + r, attrs[2], attrs[3])
                os.chmod(self.mnt + r, int(attrs[1], 8))

    def close(self) -> None:
        subprocess.run(["umount", self.mnt], stderr=subprocess.DEVNULL)
        # autoclear should have detached it; make sure
        if subprocess.run(["losetup", self.device], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            out = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", self.device],
                                 capture_output=True, text=True).stdout.strip()
            if out == self.image:
                subprocess.run(["losetup", "-d", self.device], stderr=subprocess.DEVNULL)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass


def fresh_root(root: str, storage: Storage) -> None:
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "bench-root", root)
    os.mkdir(root + STORAGE, 0o755)
    sh("mount", "-t", "ext4", storage.device, root + STORAGE)


def drop_root(root: str) -> None:
    sh("umount", "-l", root)
    if any(mp == root or mp.startswith(root + "/") for mp, *_ in mountinfo()):
        raise RuntimeError("mounts left under %s after detaching it" % root)


# --------------------------------------------------------------------------
# Running and measuring one process

RUNNER = None  # bench/runner.c, compiled when cc exists


def run_measured(argv, out_path: str, err_path: str):
    """Wall time (s), peak RSS (KiB, None when unknown) and exit status of
    argv, run with stdin from /dev/null and stdout/stderr to files.

    With cc, through bench/runner.c, which does the timing and reports the
    peak RSS of the largest single process of the tree. Without it, timed
    from here and with no memory reading: ru_maxrss of a process spawned by
    this (Python) process includes this process's own size."""
    if RUNNER:
        p = subprocess.run([RUNNER, out_path, err_path, *argv], env=ENV, stdout=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True)
        if p.returncode != 0:
            raise RuntimeError("runner failed for %s" % argv[0])
        ns, rss, code = p.stdout.split()
        return int(ns) / 1e9, int(rss), int(code)
    fo = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fe = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, fo, 1), (os.POSIX_SPAWN_DUP2, fe, 2)]
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, ENV, file_actions=actions)
        _, status, _ = os.wait4(pid, 0)
        t1 = time.perf_counter()
    finally:
        os.close(fo)
        os.close(fe)
    return t1 - t0, None, os.waitstatus_to_exitcode(status)


def maxrss(values):
    values = list(values)
    return None if None in values or not values else max(values)


def mib(kib):
    return "n/a" if kib is None else "%.1f" % (kib / 1024)


def summary(xs):
    xs = sorted(xs)
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


# --------------------------------------------------------------------------
# Verification

def result_tree(root: str, storage: Storage):
    mounts = sorted((mp[len(root):], mroot, fstype) for mp, mroot, dev, fstype in mountinfo()
                    if mp.startswith(root + "/") and mp != root + STORAGE)
    return {
        "root": walk_tree(root, skip=(STORAGE,)),
        "storage": walk_tree(storage.mnt, skip=("/lost+found",)),
        "mounts": mounts,
    }


def check_expected(tree, entries, initial) -> list[str]:
    """What the configuration asks for, checked against the result
    (initial: the storage tree before the run)."""
    problems = []
    by_point = {}
    for mp, mroot, fstype in tree["mounts"]:
        by_point.setdefault(mp, []).append((mroot, fstype))
    rt, st = tree["root"], tree["storage"]
    for e in entries:
        mounts = by_point.get(e.path, [])
        if e.covered:
            if mounts or rt.get(e.path, ("?",))[0] != "d" or rt[e.path][1:4] != st.get(e.path, ())[1:4]:
                problems.append("%s: inside a bound directory, expected the source itself, found %r "
                                "(mounts %r)" % (e.path, rt.get(e.path), mounts))
        elif e.kind == "dir" or (e.method == "auto" and e.exists):
            if mounts != [(e.path, "ext4")]:
                problems.append("%s: expected one bind mount of %s%s, found %r"
                                % (e.path, STORAGE, e.path, mounts))
        else:
            want = ("l", STORAGE + e.path)
            if rt.get(e.path) != want or mounts:
                problems.append("%s: expected symlink to %s, found %r (mounts %r)"
                                % (e.path, want[1], rt.get(e.path), mounts))
        if e.kind == "dir" and e.path not in initial:
            a = st.get(e.path)
            want = ("d", oct(e.mode), e.uid, e.gid, "same")
            if a != want:
                problems.append("%s: created source should be %r, is %r" % (e.path, want, a))
        for q in target_dirs(e):
            if q == e.path or any(q == p or q.startswith(p + "/") for p in by_point):
                continue  # the mounted directory itself, or seen through a bind mount
            a, b = rt.get(q), st.get(q)
            if a is None or b is None or a[:4] != b[:4]:
                problems.append("%s: root-side parent %s should mirror storage %r, is %r"
                                % (e.path, q, b, a))
        if e.user is not None:
            uid, gid, home = USERS[e.user]
            a = st.get(home)
            if a is None or a[2:4] != (uid, gid):
                problems.append("%s: home %s in storage not owned by %s: %r" % (e.path, home, e.user, a))
    for r, attrs in initial.items():
        if st.get(r) != attrs:
            problems.append("storage %s existed before and changed: %r -> %r" % (r or "/", attrs, st.get(r)))
    if rt.get("", ("d", "0o755"))[:4] != ("d", "0o755", 0, 0):
        problems.append("root itself changed: %r" % (rt.get(""),))
    return problems


def diff_trees(a, b, limit=10) -> list[str]:
    out = []
    for part in ("root", "storage"):
        ka, kb = a[part], b[part]
        for r in sorted(set(ka) | set(kb)):
            if ka.get(r) != kb.get(r):
                out.append("%s %s: %r != %r" % (part, r or "/", ka.get(r), kb.get(r)))
    if a["mounts"] != b["mounts"]:
        sa, sb = set(a["mounts"]), set(b["mounts"])
        for m in sorted(sa ^ sb):
            out.append("mount %r only in %s" % (m, "first" if m in sa else "second"))
        if sa == sb:
            out.append("mount multiplicity differs (%d vs %d mounts)" % (len(a["mounts"]), len(b["mounts"])))
    return out[:limit] + (["... %d more" % (len(out) - limit)] if len(out) > limit else [])


# --------------------------------------------------------------------------
# Interpreter start-up

def parse_importtime(text: str):
    """[(module, self us, cumulative us)] from -X importtime output."""
    mods = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            mods.append((m.group(4), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2))
    return mods


def importtime(python: str, flags, argv, work: str):
    out, err = os.path.join(work, "it.out"), os.path.join(work, "it.err")
    run_measured([python, *flags, "-X", "importtime", *argv], out, err)
    with open(err) as f:
        return parse_importtime(f.read())


# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.python = args.python
        self.flags = shlex.split(args.python_flags)
        self.work = args.workdir
        self.source = args.script
        self.script = args.script
        if not args.source:
            # As the initramfs (vm/) and the NixOS module run it: byte-code
            # compiled at build time, so no run pays for compiling.
            self.script = os.path.join(self.work, "impermanence_boot.pyc")
            sh(self.python, "-I", "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
               "cfile=sys.argv[2], doraise=True)", args.script, self.script)
        self.root = os.path.join(self.work, "root")
        os.makedirs(self.root, exist_ok=True)
        self.floor_cmd = self.build_floor()
        self.contenders = [c for c in CONTENDERS if c not in args.skip]
        if self.floor_cmd[0] != self.python and "pyfloor" not in args.skip:
            self.contenders.append("pyfloor")
        self.results = {"sizes": {}, "startup": {}, "ok": True, "problems": []}

    def build_floor(self):
        global RUNNER
        cc = shutil.which("cc")
        if cc:
            RUNNER = os.path.join(self.work, "runner")
            sh(cc, "-O2", "-o", RUNNER, os.path.join(HERE, "runner.c"))
        if cc and not self.args.python_floor:
            exe = os.path.join(self.work, "floor")
            sh(cc, "-O2", "-o", exe, os.path.join(HERE, "floor.c"))
            self.floor_kind = "C (%s -O2)" % cc
            return [exe]
        self.floor_kind = "Python (%s %s bench/floor.py)" % (self.python, self.args.python_flags)
        return [self.python, *self.flags, os.path.join(HERE, "floor.py")]

    def problem(self, msg: str) -> None:
        log("PROBLEM: " + msg)
        self.results["ok"] = False
        self.results["problems"].append(msg)

    def command(self, who: str, d: str):
        py = [self.python, *self.flags]
        if who == "apply":
            return py + [self.script, "--root", self.root, "--config", os.path.join(d, "config.json"),
                         "apply"]
        if who == "start":
            return py + ["-c", "pass"]
        if who in SLOW:
            return [self.args.shell, os.path.join(d, who + ".sh")]
        if who == "pyfloor":
            return py + [os.path.join(HERE, "floor.py"), os.path.join(d, "floor.ops")]
        return self.floor_cmd + [os.path.join(d, "floor.ops")]

    def one_run(self, who, d, storage, verify=False):
        out, err = os.path.join(d, who + ".out"), os.path.join(d, who + ".err")
        if who == "start":  # touches no tree
            quiesce()
            wall, rss, rc = run_measured(self.command(who, d), out, err)
            tree = None
        else:
            fresh_root(self.root, storage)
            quiesce()
            try:
                wall, rss, rc = run_measured(self.command(who, d), out, err)
                tree = result_tree(self.root, storage) if verify else None
            finally:
                drop_root(self.root)
                storage.restore()
        if rc != 0:
            with open(err) as f:
                tail = f.read()[-2000:]
            self.problem("%s exited %d at this size; stderr tail:\n%s" % (who, rc, tail))
        return wall, rss, rc, tree

    def size(self, n: int, reps: int):
        d = os.path.join(self.work, "n%d" % n)
        os.makedirs(d, exist_ok=True)
        config, entries = generate(n)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        write_shell(os.path.join(d, "shell.sh"), self.root, entries)
        imp = impermanence_text(self.root, entries, self.args.shell)
        with open(os.path.join(d, "impermanence.sh"), "w") as f:
            f.write(imp)
        write_floor_ops(os.path.join(d, "floor.ops"), self.root, entries)
        counts = {
            "directories": sum(e.kind == "dir" for e in entries),
            "files": sum(e.kind == "file" for e in entries),
            "user_level": sum(e.user is not None for e in entries),
            "source_present": sum(e.exists for e in entries),
        }
        log("N=%d: %s" % (n, counts))
        load_before = loadavg()
        storage = Storage(self.work, n)
        who_all = self.contenders
        timed = who_all + ["start"]
        res = {"entries": counts, "impermanence_calls": impermanence_calls(imp),
               "runs": {c: [] for c in timed}, "verified": False}
        try:
            populate_storage(storage.mnt, entries)
            storage.snapshot()
            trees = {}
            for who in who_all:  # warm-up, verified
                t0 = time.perf_counter()
                wall, rss, rc, tree = self.one_run(who, d, storage, verify=True)
                trees[who] = tree
                log("N=%d warm-up %-12s %9.1f ms (verify %.1f s)"
                    % (n, who, wall * 1e3, time.perf_counter() - t0 - wall))
            all_ok = True
            for who in who_all:
                probs = check_expected(trees[who], entries, storage.initial)
                if probs:
                    all_ok = False
                    self.problem("N=%d %s result does not match the configuration (%d problems):\n  %s"
                                 % (n, who, len(probs), "\n  ".join(probs[:10])))
            for who in who_all[1:]:
                diffs = diff_trees(trees["apply"], trees[who])
                if diffs:
                    all_ok = False
                    self.problem("N=%d apply and %s left different trees:\n  %s"
                                 % (n, who, "\n  ".join(diffs)))
            t = trees["apply"]
            res["verified"] = all_ok
            res["verified_contenders"] = list(who_all)
            res["tree"] = {"root_paths": len(t["root"]), "storage_paths": len(t["storage"]),
                           "mounts": len(t["mounts"]),
                           "symlinks": sum(1 for a in t["root"].values() if a[0] == "l")}

            def rounds(order: list, count: int, label: str) -> None:
                for rep in range(count):
                    k = rep % len(order)
                    for who in order[k:] + order[:k]:
                        wall, rss, rc, _ = self.one_run(who, d, storage)
                        res["runs"][who].append({"wall": wall, "maxrss_kib": rss, "rc": rc})
                    log("N=%d %s %d/%d: %s" % (n, label, rep + 1, count, "  ".join(
                        "%s %.1f ms" % (w, res["runs"][w][-1]["wall"] * 1e3) for w in order)))

            rounds(timed, reps, "rep")
            # The fast contenders take well under a second a run: more of
            # their runs, still interleaved, steady the ratio of apply to
            # floor + start, which a busy neighbour on a shared host moves
            # by several per cent from one run to the next.
            rounds([who for who in timed if who not in SLOW],
                   max(0, self.args.reps_fast - reps), "extra rep")
            if n == self.args.sizes[0]:
                # module list of the apply path (untimed extra run)
                fresh_root(self.root, storage)
                try:
                    self.results["startup"]["apply_importtime"] = importtime(
                        self.python, self.flags, self.command("apply", d)[1 + len(self.flags):], d)
                finally:
                    drop_root(self.root)
                    storage.restore()
        finally:
            storage.close()
        res["loadavg"] = [load_before, loadavg()]
        for who in timed:
            runs = res["runs"][who]
            if runs:
                res[who] = {"wall": summary([r["wall"] for r in runs]),
                            "maxrss_kib": maxrss(r["maxrss_kib"] for r in runs)}
        self.results["sizes"][n] = res

    def startup(self, reps: int):
        py, d, fl = self.python, self.work, self.flags
        bare = importtime(py, fl, ["-c", "pass"], d)
        bare_names = {m[0] for m in bare}
        help_it = importtime(py, fl, [self.script, "--help"], d)
        apply_it = self.results["startup"].get("apply_importtime") or help_it
        script_mods = [m for m in apply_it if m[0] not in bare_names]
        # only the ones apply imports itself: their own imports follow, in
        # the order they need (without site, os is one of them)
        imports = ", ".join(m[0] for m in script_mods if m[3] == 0) or "sys"
        cmds = {
            "bare": [py, *fl, "-c", "pass"],
            "bare_I": [py, "-I", "-c", "pass"],
            "imports": [py, *fl, "-c", "import " + imports],
            "help": [py, *fl, self.script, "--help"],
            "help_source": [py, *fl, self.source, "--help"],
        }
        if fl == ["-I"]:
            del cmds["bare_I"]
        times = {k: [] for k in cmds}
        rss = {k: [] for k in cmds}
        out, err = os.path.join(d, "start.out"), os.path.join(d, "start.err")
        for k, argv in cmds.items():  # warm-up
            for _ in range(3):
                _, _, rc = run_measured(argv, out, err)
            if rc != 0:
                with open(err) as f:
                    self.problem("%s exited %d: %s" % (" ".join(argv), rc, f.read()[-1000:]))
        for _ in range(reps):
            for k, argv in cmds.items():
                wall, r, rc = run_measured(argv, out, err)
                times[k].append(wall)
                rss[k].append(r)
        s = self.results["startup"]
        s.update({k: {"wall": summary(v), "maxrss_kib": maxrss(rss[k])} for k, v in times.items()})
        s["modules_apply"] = [m[0] for m in script_mods]
        s["import_us_apply"] = sum(m[1] for m in script_mods)
        s["top_imports"] = sorted(((m[0], m[1]) for m in script_mods), key=lambda x: -x[1])[:8]
        s.pop("apply_importtime", None)


# --------------------------------------------------------------------------
# Pacing, and the report

def settle() -> None:
    """Let writeback and deferred unmount work from the previous phase finish."""
    os.sync()
    time.sleep(1.0)


def quiesce() -> None:
    """Before each run: the previous run's cleanup (the journal commits and
    loop-device writeback of the storage it restored, the freeing of the
    mounts it detached) done, not running beside this one, where it would
    take CPU time from the run and move its time by tens of ms at
    N = 10,000."""
    os.sync()
    time.sleep(0.2)


def loadavg() -> float:
    """The host's 1-minute load average: how busy the machine was around
    the runs (another job on it moves their times)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def script_revision(script: str) -> str:
    d = os.path.dirname(script)
    rev = subprocess.run(["git", "-C", d, "log", "-1", "--format=%h", "--", script],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", script],
                           capture_output=True, text=True).stdout.strip()
    return (rev or "untracked") + (" (modified)" if dirty else "")


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    first = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[:1] or ["?"]
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
        if hasattr(platform, "freedesktop_os_release") else "?",
        "mount": first(["mount", "--version"])[0],
        "bash": first(["bash", "--version"])[0],
    }


def ms(x):
    return "%.1f" % (x * 1e3) if x < 10 else "%.0f" % (x * 1e3)


def fmt(s):
    return "%s (%s–%s)" % (ms(s["median"]), ms(s["min"]), ms(s["max"]))


def med(r, who):
    return r[who]["wall"]["median"] if who in r else None


def n_fmt(n) -> str:
    return format(int(n), ",")


def per_entry(r, n, who, less=None):
    """Wall time per entry in µs, the interpreter's start taken off for a
    Python contender (less="start"): that is paid once, not per entry."""
    a = med(r, who)
    if a is None or (less and med(r, less) is None):
        return None
    return (a - (med(r, less) if less else 0.0)) / int(n) * 1e6


def growth(sizes, who, less=None):
    small, large, _ = GROWTH_GOAL
    if small in sizes and large in sizes:
        a, b = per_entry(sizes[small], small, who, less), per_entry(sizes[large], large, who, less)
        if a and b:
            return b / a
    return None


def report(results, args) -> str:
    lines = []
    m = results["machine"]
    lines.append("Machine: %s, %d CPUs, %.0f GiB RAM, Linux %s, %s; %s; %s; %s; floor in %s. "
                 "Script: %s. Run %s: `%s`."
                 % (m["cpu"], m["cpus"], m["memory_gib"], m["kernel"], m["os"], results["python"],
                    m["mount"].split(" (")[0], m["bash"], results["floor"], results["script"],
                    results["date"], results["command"]))
    lines.append("")
    lines.append("Wall time in ms, median (min–max) of %s, each after one untimed, verified warm-up "
                 "per contender, contenders interleaved. start = `%s %s -c pass`; ratios are of "
                 "medians." % (results["reps_note"], os.path.basename(args.python), args.python_flags))
    sizes = {int(k): v for k, v in results["sizes"].items()}
    loads = ["N = %s: %s" % (n_fmt(n), " → ".join("%.2f" % x for x in r["loadavg"]))
             for n, r in sorted(sizes.items()) if "loadavg" in r]
    if loads:
        lines.append("Load average (1 min; from %d CPUs) at the start and the end of each size: %s."
                     % (m["cpus"], "; ".join(loads)))
    lines.append("")

    lines.append("| N | apply | floor | start | apply ÷ (floor + start) | the same of minima | goal | met "
                 "| per entry: apply − start, floor (µs) |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|:---:|---:|")
    goals = []
    for n, r in sorted(sizes.items()):
        a, f, s = med(r, "apply"), med(r, "floor"), med(r, "start")
        if None in (a, f, s):
            continue
        q = a / (f + s)
        goal = GOALS.get(n)
        met = "–" if goal is None else ("yes" if q <= goal else "**no**")
        if goal is not None:
            goals.append(("N = %s: apply ≤ %.2f × (floor + start)" % (n_fmt(n), goal), "%.2f×" % q,
                          q <= goal))
        # the fastest runs are the ones a busy neighbour slowed least
        q_min = r["apply"]["wall"]["min"] / (r["floor"]["wall"]["min"] + r["start"]["wall"]["min"])
        lines.append("| %s | %s | %s | %s | %.2f | %.2f | %s | %s | %.1f, %.1f |" % (
            n_fmt(n), fmt(r["apply"]["wall"]), fmt(r["floor"]["wall"]), fmt(r["start"]["wall"]), q, q_min,
            "≤ %.2f" % goal if goal else "–", met,
            per_entry(r, n, "apply", "start"), per_entry(r, n, "floor")))
    lines.append("")
    small, large, limit = GROWTH_GOAL
    g, gf = growth(sizes, "apply", "start"), growth(sizes, "floor")
    if g is not None:
        lines.append("Cost per entry at N = %s ÷ at N = %s: apply (less start) %.2f, floor %.2f."
                     % (n_fmt(large), n_fmt(small), g, gf if gf is not None else float("nan")))
        lines.append("")
        goals.append(("N = %s: cost per entry ≤ %.1f × that at N = %s" % (n_fmt(large), limit, n_fmt(small)),
                      "%.2f×" % g, g <= limit))

    py3b = any("pyfloor" in r for r in sizes.values())
    lines.append("| N | apply | impermanence | impermanence ÷ apply | shell | shell ÷ apply | %s"
                 "peak RSS MiB: apply / impermanence / shell / floor | same tree |"
                 % ("floor in Python | " if py3b else ""))
    lines.append("|---:|---:|---:|---:|---:|---:|%s---:|:---:|" % ("---:|" if py3b else ""))
    for n, r in sorted(sizes.items()):
        if "apply" not in r:
            continue
        a = med(r, "apply")
        cells = ["%s" % n_fmt(n), fmt(r["apply"]["wall"])]
        for who in SLOW:
            cells += [fmt(r[who]["wall"]), "%.0f×" % (med(r, who) / a)] if who in r else ["–", "–"]
        if py3b:
            cells.append(fmt(r["pyfloor"]["wall"]) if "pyfloor" in r else "–")
        cells.append(" / ".join(mib(r[c]["maxrss_kib"]) if c in r else "–"
                                for c in ("apply", "impermanence", "shell", "floor")))
        cells.append("yes" if r["verified"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if py3b:
        # The same loop as the floor, in Python started as apply is: what
        # any Python program pays for the bare calls alone.
        lines.append("Floor in Python ÷ (floor + start): %s." % "; ".join(
            "N = %s: %.2f" % (n_fmt(n), med(r, "pyfloor") / (med(r, "floor") + med(r, "start")))
            for n, r in sorted(sizes.items()) if "pyfloor" in r and "start" in r))
        lines.append("")
    calls = [(n, r["impermanence_calls"]) for n, r in sorted(sizes.items()) if "impermanence" in r]
    if calls:
        lines.append("Processes the impermanence sequence starts (each create-directories.sh and "
                     "mount-file.sh call starts more: realpath, mkdir, chown, chmod; findmnt, touch, "
                     "mount or ln): %s." % "; ".join(
                         "N = %s: %d create-directories.sh, %d mount, %d mount-file.sh"
                         % (n_fmt(n), c["create-directories"], c["mount"], c["mount-file"]) for n, c in calls))
        lines.append("")

    st = results["startup"]
    if "bare" in st:
        lines.append("Start-up (%d runs each after 3 warm-ups, median (min–max) ms):" % st["bare"]["wall"]["n"])
        lines.append("")
        lines.append("| command | wall | peak RSS MiB |")
        lines.append("|---|---:|---:|")
        py, fl = os.path.basename(args.python), args.python_flags
        labels = [("bare", "%s %s -c pass" % (py, fl)), ("bare_I", "%s -I -c pass" % py),
                  ("imports", "%s %s -c 'import <the %d modules apply imports>'"
                   % (py, fl, len(st["modules_apply"]))),
                  ("help", "%s %s %s --help" % (py, fl, os.path.basename(args.script_run))),
                  ("help_source", "%s %s impermanence_boot.py --help (the source, compiled at every run)"
                   % (py, fl))]
        for k, label in labels:
            if k in st:
                lines.append("| `%s` | %s | %s |" % (label, fmt(st[k]["wall"]), mib(st[k]["maxrss_kib"])))
        lines.append("")
        lines.append("Modules apply imports beyond the bare interpreter: %d (self import time %.1f ms: %s)."
                     % (len(st["modules_apply"]), st["import_us_apply"] / 1e3,
                        ", ".join("%s %.1f" % (nme, us / 1e3) for nme, us in st["top_imports"]) or "none"))
        lines.append("")
    if goals:
        lines.append("| goal | measured | met |")
        lines.append("|---|---:|:---:|")
        for g_, v, ok in goals:
            lines.append("| %s | %s | %s |" % (g_, v, "yes" if ok else "**no**"))
        lines.append("")
    if results["problems"]:
        lines.append("Problems:")
        lines.extend("- " + p.replace("\n", "\n  ") for p in results["problems"])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES,
                    help="comma-separated N (default: %s)" % DEFAULT_SIZES)
    ap.add_argument("--reps", type=int, default=5,
                    help="timed runs of the slow contenders (impermanence, shell) per N (default 5)")
    ap.add_argument("--reps-large", type=int, default=3,
                    help="the same from N = 10,000 (default 3: minutes a run there)")
    ap.add_argument("--reps-fast", type=int, default=11,
                    help="timed runs of the other contenders, at least (default 11)")
    ap.add_argument("--startup-reps", type=int, default=30,
                    help="timed runs of each start-up command (default 30)")
    ap.add_argument("--python", default=default_python(),
                    help="interpreter to run the script with (default: the distribution's "
                         "python3, or $IMPERMANENCE_PYTHON; vm/distro_python.py)")
    ap.add_argument("--python-flags", default=DEFAULT_FLAGS,
                    help="its flags, for apply and start alike (default %r, as stage 1 runs it)"
                         % DEFAULT_FLAGS)
    ap.add_argument("--script", default=DEFAULT_SCRIPT)
    ap.add_argument("--source", action="store_true",
                    help="run the .py itself (compiled at every run) instead of its byte-code, "
                         "which is how the initramfs and the NixOS module run it")
    ap.add_argument("--shell", default="/bin/bash",
                    help="bash for the impermanence and shell contenders (default /bin/bash)")
    ap.add_argument("--skip", default="",
                    help="comma-separated contenders not to run: impermanence, shell, pyfloor")
    ap.add_argument("--python-floor", action="store_true", help="use the Python floor even if cc exists")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="directory for the JSON and Markdown results (default bench/results)")
    ap.add_argument("--json", help="also write the JSON results to this path")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.skip = {x for x in args.skip.split(",") if x}
    if args.skip - {"impermanence", "shell", "pyfloor"}:
        ap.error("--skip: only impermanence, shell and pyfloor can be left out")
    args.script = os.path.abspath(args.script)
    args.script_run = args.script if args.source else "impermanence_boot.pyc"

    if os.geteuid() != 0:
        log("must run as root (loop devices, mounts, chown)")
        return 2
    for tool in ("mount", "umount", "findmnt", "realpath", "mkfs.ext4", "losetup", args.shell, args.python):
        if not shutil.which(tool):
            log("%s is not available" % tool)
            return 2
    if not os.path.isfile(args.script):
        log("%s does not exist" % args.script)
        return 2
    enter_private_namespace()
    args.workdir = tempfile.mkdtemp(prefix="impermanence-bench.")
    bench = Bench(args)
    results = bench.results
    results.update({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "python": "%s %s (%s)" % (args.python, args.python_flags, subprocess.run(
            [args.python, "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True, text=True).stdout.strip()),
        "floor": bench.floor_kind,
        "script": "%s at %s" % (os.path.relpath(args.script, PROJECT), script_revision(args.script)),
        "bench": script_revision(os.path.abspath(__file__)),
        "command": " ".join([os.path.relpath(sys.argv[0], PROJECT)] + (argv if argv is not None else sys.argv[1:])),
        "reps": {n: (args.reps_large if n >= 10000 else args.reps) for n in args.sizes},
    })
    slow = [c for c in SLOW if c in bench.contenders]
    results["reps_note"] = "%s timed runs%s" % (
        ", ".join("%d (N = %s)" % (r, n_fmt(n)) for n, r in results["reps"].items()),
        (" of %s, at least %d of the others" % (" and ".join(slow), args.reps_fast)) if slow else "")
    try:
        for i, n in enumerate(args.sizes):
            settle()
            bench.size(n, results["reps"][n] if slow else max(results["reps"][n], args.reps_fast))
            if i == 0:  # start-up on a quiet machine, before the large sizes
                settle()
                bench.startup(args.startup_reps)
    except Exception as e:
        bench.problem("benchmark aborted: %s: %s" % (type(e).__name__, e))
        raise
    finally:
        subprocess.run(["umount", "-l", bench.root], stderr=subprocess.DEVNULL)
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        text = report(results, args)
        print(text)
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        blob = json.dumps(results, indent=1, default=str)
        for path in (os.path.join(args.out, "bench-%s.json" % stamp), args.json):
            if path:
                with open(path, "w") as f:
                    f.write(blob)
        with open(os.path.join(args.out, "bench-%s.md" % stamp), "w") as f:
            f.write(text + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
