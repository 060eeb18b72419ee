#!/usr/bin/env python3
"""Boot-time benchmark of impermanence_boot.py (issue 6).

Run as root:  python3 bench/bench_boot.py            (N = 100, 1000, 10000)
              python3 bench/bench_boot.py --sizes 100 --reps 1   (smoke test)

For every N it generates a configuration of N entries (half directories,
half files; nested paths; system and user level; some present in storage,
some not), puts the storage on an ext4 filesystem on a loop device, and then,
in the same run and on the same fresh tmpfs root, measures wall time and peak
memory of three contenders doing the same work:

  1. apply   `python3.11 -I impermanence_boot.pyc --root R --config C apply`,
             the whole process, interpreter start included, C being the
             config compiled once beforehand (`compile`), as the initramfs
             and the NixOS module build it; and (1j) the same reading the
             JSON config itself;
  2. shell   the per-entry shell approach existing tools generate: a bash
             script that, per entry, walks the path (`[ -d ]`), creates what
             is missing with `mkdir`/`chown`/`chmod --reference`, then
             `mount --bind` (util-linux) or `ln -s`;
  3. floor   only the necessary system calls (mkdir, chown/chmod, open,
             mount, symlink) from an operation list the benchmark planned in
             advance; C (bench/floor.c) when `cc` exists, else Python.

Before each timed run the root is a fresh tmpfs with the storage mounted at
R/persistent (as stage 1 does for a neededForBoot filesystem); afterwards the
whole tree is detached and everything the run created in storage removed, so
every run starts from the same state, and it starts once the previous run's
cleanup (writeback, detached mounts) is done. Contenders run round-robin, one
untimed warm-up each per N; then every contender but the shell gets more
interleaved runs, up to --reps-fast (default 11): the ratio of apply to the
floor is the one a busy host moves most, and those runs take well under a
second. The warm-up runs are verified: the resulting
tree (every path under R and in storage with type, owner, mode; every mount
under R with the storage path it shows) must be identical for all three and
must match what the configuration asks for. The benchmark exits 1 when a
contender fails or the trees differ, never because of timing.

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
DEFAULT_PYTHON = "/usr/bin/python3.11"
STORAGE = "/persistent"
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "IMPERMANENCE_NO_KMSG": "1",
}
CONTENDERS = ("apply", "shell", "floor")
APPLY_JSON = "apply_json"  # apply reading the JSON config, not the compiled one

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


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


SHELL_PRELUDE = r"""# Per-entry shell approach, as the scripts existing tools generate
# (create-directories.bash + mount-file.bash): every entry walks its own
# path, creates what is missing, then binds or links.
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


def importtime(python: str, argv, work: str):
    out, err = os.path.join(work, "it.out"), os.path.join(work, "it.err")
    run_measured([python, "-I", "-X", "importtime", *argv], out, err)
    with open(err) as f:
        return parse_importtime(f.read())


# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.python = args.python
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
        self.contenders = list(CONTENDERS)
        if not args.json_config:
            self.contenders.append(APPLY_JSON)
        if self.floor_cmd[0] != self.python and not args.no_python_floor:
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
        self.floor_kind = "Python (%s -I -S bench/floor.py)" % self.python
        return [self.python, "-I", "-S", os.path.join(HERE, "floor.py")]

    def problem(self, msg: str) -> None:
        log("PROBLEM: " + msg)
        self.results["ok"] = False
        self.results["problems"].append(msg)

    def command(self, who: str, d: str):
        if who in ("apply", APPLY_JSON):
            config = "config.json" if who == APPLY_JSON or self.args.json_config else "config.bin"
            return [self.python, "-I", self.script, "--root", self.root,
                    "--config", os.path.join(d, config), "apply"]
        if who == "shell":
            return [self.args.shell, os.path.join(d, "shell.sh")]
        if who == "pyfloor":
            return [self.python, "-I", os.path.join(HERE, "floor.py"), os.path.join(d, "floor.ops")]
        return self.floor_cmd + [os.path.join(d, "floor.ops")]

    def one_run(self, who, d, storage, verify=False, argv=None):
        fresh_root(self.root, storage)
        quiesce()
        try:
            out, err = os.path.join(d, who + ".out"), os.path.join(d, who + ".err")
            wall, rss, rc = run_measured(argv or self.command(who, d), out, err)
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
        if not self.args.json_config:
            # As the initramfs is built: once, by the script that runs it.
            t0 = time.perf_counter()
            sh(self.python, "-I", self.script, "--config", os.path.join(d, "config.json"),
               "compile", "--output", os.path.join(d, "config.bin"))
            self.results.setdefault("compile_ms", {})[n] = (time.perf_counter() - t0) * 1e3
        write_shell(os.path.join(d, "shell.sh"), self.root, entries)
        write_floor_ops(os.path.join(d, "floor.ops"), self.root, entries)
        counts = {
            "directories": sum(e.kind == "dir" for e in entries),
            "files": sum(e.kind == "file" for e in entries),
            "user_level": sum(e.user is not None for e in entries),
            "source_present": sum(e.exists for e in entries),
        }
        log("N=%d: %s" % (n, counts))
        storage = Storage(self.work, n)
        who_all = self.contenders
        res = {"entries": counts, "runs": {c: [] for c in who_all}, "verified": False}
        try:
            populate_storage(storage.mnt, entries)
            storage.snapshot()
            trees = {}
            for who in who_all:  # warm-up, verified
                t0 = time.perf_counter()
                wall, rss, rc, tree = self.one_run(who, d, storage, verify=True)
                trees[who] = tree
                log("N=%d warm-up %-5s %8.1f ms (verify %.1f s)"
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

            rounds(list(who_all), reps, "rep")
            # The contenders other than the shell take well under a second:
            # more of their runs, still interleaved, steady the ratio of
            # apply to the floor, which a busy neighbour on a shared host
            # moves by several per cent from one run to the next.
            rounds([who for who in who_all if who != "shell"],
                   max(0, self.args.reps_fast - reps), "extra rep")
            if n == self.args.sizes[0]:
                # module list of the apply path (untimed extra run)
                fresh_root(self.root, storage)
                try:
                    self.results["startup"]["apply_importtime"] = importtime(
                        self.python, self.command("apply", d)[2:], d)
                finally:
                    drop_root(self.root)
                    storage.restore()
        finally:
            storage.close()
        for who in who_all:
            runs = res["runs"][who]
            if runs:
                res[who] = {"wall": summary([r["wall"] for r in runs]),
                            "maxrss_kib": maxrss(r["maxrss_kib"] for r in runs)}
        self.results["sizes"][n] = res

    def startup(self, reps: int):
        py, d = self.python, self.work
        bare = importtime(py, ["-c", "pass"], d)
        bare_names = {m[0] for m in bare}
        help_it = importtime(py, [self.script, "--help"], d)
        apply_it = self.results["startup"].get("apply_importtime") or help_it
        script_mods = [m for m in apply_it if m[0] not in bare_names]
        help_mods = [m for m in help_it if m[0] not in bare_names]
        imports = ", ".join(m[0] for m in script_mods) or "sys"
        cmds = {
            "bare": [py, "-I", "-c", "pass"],
            "bare_S": [py, "-I", "-S", "-c", "pass"],
            "help": [py, "-I", self.script, "--help"],
            "help_source": [py, "-I", self.source, "--help"],
            "imports": [py, "-I", "-c", "import " + imports],
        }
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
        # compile cost of the script itself: __main__ is never cached as .pyc
        code = ("import time; src = open(%r, 'rb').read(); t = time.perf_counter(); "
                "compile(src, %r, 'exec'); print(time.perf_counter() - t)" % (self.source, self.source))
        compile_s = statistics.median(float(sh(py, "-I", "-c", code)) for _ in range(5))
        with open(self.source, "rb") as f:
            src = f.read()
        s = self.results["startup"]
        s.update({k: {"wall": summary(v), "maxrss_kib": maxrss(rss[k])} for k, v in times.items()})
        s["modules_apply"] = [m[0] for m in script_mods]
        s["modules_help"] = [m[0] for m in help_mods]
        s["import_us_apply"] = sum(m[1] for m in script_mods)
        s["import_us_help"] = sum(m[1] for m in help_mods)
        s["top_imports"] = sorted(((m[0], m[1]) for m in script_mods), key=lambda x: -x[1])[:8]
        s["bare_modules"] = len(bare)
        s["compile_s"] = compile_s
        s["script_lines"] = src.count(b"\n")
        s["script_bytes"] = len(src)
        s.pop("apply_importtime", None)


# --------------------------------------------------------------------------
# Report

def settle() -> None:
    """Let writeback and deferred unmount work from the previous phase finish."""
    os.sync()
    time.sleep(1.0)


def quiesce() -> None:
    """Before each run: the previous run's cleanup (the journal commits and
    loop-device writeback of the storage it restored, the freeing of the
    mounts it detached) done, not running beside this one. Left running, it
    slows a contender that keeps both CPUs busy (apply from 250 entries)
    far more than one that leaves a CPU free for it: at N = 10,000 a third
    of apply's runs took ~50 ms more."""
    os.sync()
    time.sleep(0.2)


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


def report(results, args) -> str:
    st = results["startup"]
    start_imports = st["imports"]["wall"]["median"] if "imports" in st else 0.0
    lines = []
    m = results["machine"]
    lines.append("Machine: %s, %d CPUs, %.0f GiB RAM, Linux %s, %s; %s; %s; %s; floor in %s. "
                 "Script: %s. Run %s: `%s`."
                 % (m["cpu"], m["cpus"], m["memory_gib"], m["kernel"], m["os"], results["python"],
                    m["mount"].split(" (")[0], m["bash"], results["floor"], results["script"],
                    results["date"], results["command"]))
    lines.append("")
    lines.append("Wall time in ms, median (min–max) of %s timed runs after one untimed, verified warm-up "
                 "per contender, contenders interleaved; peak RSS in MiB (largest single process). "
                 "1/2 and 1/3 are ratios of medians; start = `python3.11 -I -c 'import <the modules "
                 "apply imports>'`." % results["reps_note"])
    lines.append("")
    py3b = any("pyfloor" in r for r in results["sizes"].values())
    j = any(APPLY_JSON in r for r in results["sizes"].values())
    if j:
        lines.append("(1) reads the config compiled beforehand (`compile`, as the initramfs and the NixOS "
                     "module do; it took %s), (1j) the JSON config itself."
                     % ", ".join("%.0f ms at N=%s" % (ms_, format(int(n), ","))
                                 for n, ms_ in sorted(results.get("compile_ms", {}).items(),
                                                      key=lambda kv: int(kv[0]))))
        lines.append("")
    lines.append("| N | (1) apply | (2) shell | (3) floor | %s%s1/2 | 1/3 | %s1/(3 + start) | shell ÷ apply "
                 "| peak RSS 1 / 2 / 3 | same tree |" % ("(3b) floor in Python | " if py3b else "",
                                                          "(1j) apply, JSON config | " if j else "",
                                                          "1j/3 | " if j else ""))
    lines.append("|---:|---:|---:|---:|%s%s---:|---:|%s---:|---:|---:|:---:|"
                 % ("---:|" if py3b else "", "---:|" if j else "", "---:|" if j else ""))
    for n, r in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        if not all(c in r for c in CONTENDERS):
            continue
        a, s, f = (r[c]["wall"]["median"] for c in CONTENDERS)
        rss = " / ".join(mib(r[c]["maxrss_kib"]) for c in CONTENDERS)
        lines.append("| %s | %s | %s | %s | %s%s%.4f | %.2f | %s%.2f | %.0f× | %s | %s |" % (
            format(int(n), ","), fmt(r["apply"]["wall"]), fmt(r["shell"]["wall"]), fmt(r["floor"]["wall"]),
            (fmt(r["pyfloor"]["wall"]) + " | ") if py3b and "pyfloor" in r else ("– | " if py3b else ""),
            (fmt(r[APPLY_JSON]["wall"]) + " | ") if j and APPLY_JSON in r else ("– | " if j else ""),
            a / s, a / f,
            ("%.2f | " % (r[APPLY_JSON]["wall"]["median"] / f)) if j and APPLY_JSON in r else ("– | " if j else ""),
            a / (f + start_imports), s / a, rss, "yes" if r["verified"] else "NO"))
    lines.append("")
    if "bare" in st:
        lines.append("Start-up (%d runs each after 3 warm-ups, median (min–max) ms):" % st["bare"]["wall"]["n"])
        lines.append("")
        lines.append("| command | wall | peak RSS MiB |")
        lines.append("|---|---:|---:|")
        labels = [("bare", "python3.11 -I -c pass"), ("bare_S", "python3.11 -I -S -c pass"),
                  ("imports", "python3.11 -I -c 'import <the %d modules apply imports>' (start)"
                   % len(st["modules_apply"])),
                  ("help", "python3.11 -I %s --help" % os.path.basename(args.script_run)),
                  ("help_source", "python3.11 -I impermanence_boot.py --help (the source, compiled at every run)")]
        for k, label in labels:
            if k in st:
                lines.append("| `%s` | %s | %s |" % (label, fmt(st[k]["wall"]), mib(st[k]["maxrss_kib"])))
        lines.append("")
        lines.append("`--help` ÷ bare interpreter: %.2f. Modules imported beyond the bare interpreter: "
                     "%d for apply (self import time %.1f ms: %s), %d for --help (%.1f ms). "
                     "Compiling the script (%d lines; never cached as .pyc when run as a script): %.1f ms."
                     % (st["help"]["wall"]["median"] / st["bare"]["wall"]["median"],
                        len(st["modules_apply"]), st["import_us_apply"] / 1e3,
                        ", ".join("%s %.1f" % (nme, us / 1e3) for nme, us in st["top_imports"]),
                        len(st["modules_help"]), st["import_us_help"] / 1e3,
                        st["script_lines"], st["compile_s"] * 1e3))
        lines.append("")
    # goals
    goals = []
    sizes = {int(k): v for k, v in results["sizes"].items()}
    if 1000 in sizes and all(c in sizes[1000] for c in CONTENDERS):
        r = sizes[1000]
        a, s, f = (r[c]["wall"]["median"] for c in CONTENDERS)
        goals.append(("N=1,000: ≥ 60× faster than the shell approach", "%.0f×" % (s / a), s / a >= 60))
        if start_imports:
            goals.append(("N=1,000: ≤ 1.5 × (floor + start with the script's imports)",
                          "%.2f×" % (a / (f + start_imports)), a / (f + start_imports) <= 1.5))
    if 10000 in sizes and all(c in sizes[10000] for c in CONTENDERS):
        r = sizes[10000]
        a, f = r["apply"]["wall"]["median"], r["floor"]["wall"]["median"]
        goals.append(("N=10,000: ≤ 1.15 × floor", "%.2f×" % (a / f), a / f <= 1.15))
    if "help" in st:
        q = st["help"]["wall"]["median"] / st["bare"]["wall"]["median"]
        goals.append(("--help ≤ 1.3 × bare interpreter", "%.2f×" % q, q <= 1.3))
    if goals:
        lines.append("| goal | measured | met |")
        lines.append("|---|---:|:---:|")
        for g, v, ok in goals:
            lines.append("| %s | %s | %s |" % (g, v, "yes" if ok else "**no**"))
        lines.append("")
    for n in sorted(sizes):
        r = sizes[n]
        if "pyfloor" in r and "floor" in r:
            lines.append("Floor in Python (3b) ÷ floor in C (3) at N=%s: %.2f — what a Python "
                         "program with no planning and no checks costs over the bare system calls."
                         % (format(n, ","), r["pyfloor"]["wall"]["median"] / r["floor"]["wall"]["median"]))
    lines.append("")
    if results["problems"]:
        lines.append("Problems:")
        lines.extend("- " + p.replace("\n", "\n  ") for p in results["problems"])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000",
                    help="comma-separated N (default: 100,1000,10000)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per contender and N (default 5)")
    ap.add_argument("--reps-large", type=int, default=3,
                    help="timed runs for N >= 10000 (default 3; the shell takes long there)")
    ap.add_argument("--reps-fast", type=int, default=11,
                    help="timed runs of every contender but the shell, at least (default 11)")
    ap.add_argument("--startup-reps", type=int, default=30,
                    help="timed runs of each start-up command (default 30)")
    ap.add_argument("--python", default=DEFAULT_PYTHON if os.path.exists(DEFAULT_PYTHON) else sys.executable,
                    help="interpreter to run the script with (default %s)" % DEFAULT_PYTHON)
    ap.add_argument("--script", default=DEFAULT_SCRIPT)
    ap.add_argument("--source", action="store_true",
                    help="run the .py itself (compiled at every run) instead of its byte-code, "
                         "which is how the initramfs and the NixOS module run it")
    ap.add_argument("--json-config", action="store_true",
                    help="apply reads the JSON config (default: the config compiled beforehand, "
                         "with the JSON one measured as (1j))")
    ap.add_argument("--shell", default="/bin/bash", help="shell for the per-entry script (default bash)")
    ap.add_argument("--python-floor", action="store_true", help="use the Python floor even if cc exists")
    ap.add_argument("--no-python-floor", action="store_true",
                    help="with the C floor, do not also measure the Python floor (3b)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="directory for the JSON and Markdown results (default bench/results)")
    ap.add_argument("--json", help="also write the JSON results to this path")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.script = os.path.abspath(args.script)
    args.script_run = args.script if args.source else "impermanence_boot.pyc"

    if os.geteuid() != 0:
        log("must run as root (loop devices, mounts, chown)")
        return 2
    for tool in ("mount", "umount", "mkfs.ext4", "losetup", args.shell, args.python):
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
        "python": "%s (%s)" % (args.python, subprocess.run(
            [args.python, "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True, text=True).stdout.strip()),
        "floor": bench.floor_kind,
        "script": "%s at %s" % (os.path.relpath(args.script, PROJECT), script_revision(args.script)),
        "command": " ".join([os.path.relpath(sys.argv[0], PROJECT)] + (argv if argv is not None else sys.argv[1:])),
        "reps": {n: (args.reps_large if n >= 10000 else args.reps) for n in args.sizes},
    })
    results["reps_note"] = ", ".join("%d (N=%s)" % (r, format(n, ",")) for n, r in results["reps"].items())
    if any(args.reps_fast > r for r in results["reps"].values()):
        results["reps_note"] += (" for the shell approach, and at least %d for the others"
                                 % args.reps_fast)
    try:
        for i, n in enumerate(args.sizes):
            settle()
            bench.size(n, results["reps"][n])
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
