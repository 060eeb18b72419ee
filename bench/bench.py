#!/usr/bin/env python3
"""Boot-time benchmark of impermanence_boot.py (docs/performance.md).

Run as root:   python3 bench/bench.py                        (N = 25, 100, 300, 1000)
Two versions:  python3 bench/bench.py --sizes 100 --script OLD.py --script NEW.py

For every N it generates a configuration of N entries (half directories,
half files; nested paths; system and user level; owners and modes; about
half of the sources already in storage), puts the storage on ext4 on a loop
device and times, on a fresh tmpfs root with the storage mounted at
R/persistent (as stage 1 leaves it), these contenders doing the same work:

  apply         `python3 -I -S impermanence_boot.pyc --root R --config C apply`,
                interpreter start included, byte-compiled beforehand as
                stage 1 runs it; one contender per --script;
  impermanence  the process sequence NixOS impermanence's module runs:
                bench/impermanence/create-directories.sh per directory,
                `mount --bind` per directory, mount-file.sh per file;
  floor         only the system calls the job needs, in C (bench/floor.c),
                from an operation list planned here, untimed;
  start         the bare interpreter, `python3 -I -S -c pass`.

One untimed warm-up each, verified: every contender must leave the same
tree (every path under R and in storage, every mount under R), and that
tree must be what the configuration asks for. Then timed runs, contenders
interleaved round-robin; medians. Then `diff` against `find -xdev` on a
tree of --diff-files files. Exits 1 when a contender fails or a tree
differs, never because of timing. Standard library and cc only.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import random
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
STORAGE = "/persistent"
FLAGS = ["-I", "-S"]  # as stage 1 runs the script: no site, no environment
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
       "IMPERMANENCE_NO_KMSG": "1"}
SLOW = "impermanence"  # seconds a run: fewer timed runs

# --------------------------------------------------------------------------
# The configuration and the model of what apply must do (SPEC §4)

USERS = {"u%d" % i: (1000 + i, 100, "/home/u%d" % i) for i in range(4)}
USERS["svc"] = (400, 400, "/var/empty")
MODES = [("0700", 0o700), ("750", 0o750), ("u=rwx,g=rx,o=", 0o750), ("0755", 0o755)]


class Entry:
    __slots__ = ("kind", "path", "user", "uid", "gid", "mode", "method", "parent", "exists",
                 "item", "covered")

    def __init__(self, kind, path, item, user=None, uid=0, gid=0, mode=0o755, method="auto",
                 parent=None, exists=False, covered=False):
        self.kind, self.path, self.item = kind, path, item  # "dir" | "file"; target; as configured
        self.user = user  # None: system level, else the user whose home holds it
        self.uid, self.gid, self.mode, self.method = uid, gid, mode, method
        self.parent = parent  # a file's parentDirectory (uid, gid, mode), or None
        self.exists = exists  # source in storage before apply, as on every boot after the first
        self.covered = covered  # inside another kept directory: bound with it, nothing more


def user_entry(kind, user, rel, item, **kw):
    uid, gid, home = USERS[user]
    return Entry(kind, home + "/" + rel, item, user=user, uid=uid, gid=gid, **kw)


def generate(n: int):
    """N entries, the same for a given N: (config dict, [Entry])."""
    rng = random.Random(6000018 + n)
    entries = []
    last = None  # the last plain directory: about 4 % of directories go inside one
    for i in range(n // 2):
        exists = rng.random() < 0.5
        if last is not None and rng.random() < 0.05:
            rel = (last.item if isinstance(last.item, str) else last.item["directory"]) + "/nested"
            e = Entry("dir", last.path + "/nested", rel, user=last.user, uid=last.uid if last.user else 0,
                      gid=last.gid if last.user else 0, exists=exists, covered=True)
            entries.append(e)
            last = None
            continue
        if rng.random() < 0.7:
            prefix = ("/var/lib", "/srv/data", "/var/cache/apps")[i % 3]
            path = ("%s/d%d" % (prefix, i) if i % 4 == 0
                    else "%s/g%d/h%d/d%d" % (prefix, i // 300, i // 30, i))
            if rng.random() < 0.3:
                spec, mode = MODES[i % len(MODES)]
                item = {"directory": path, "user": "svc", "group": "svc", "mode": spec}
                e = Entry("dir", path, item, uid=400, gid=400, mode=mode, exists=exists)
            else:
                e = Entry("dir", path, path, exists=exists)
        else:
            user = "u%d" % (i % 4)
            rel = "Documents/p%d" % i if i % 3 == 0 else ".local/share/g%d/d%d" % (i // 200, i)
            if rng.random() < 0.2:
                e = user_entry("dir", user, rel, {"directory": rel, "mode": "0700"}, mode=0o700,
                               exists=exists)
            else:
                e = user_entry("dir", user, rel, rel, exists=exists)
        entries.append(e)
        last = e
    for j in range(n - n // 2):
        exists = rng.random() < 0.5
        r = rng.random()
        if r < 0.05:
            path = "/etc/secret%d/key" % j
            entries.append(Entry("file", path, {"file": path, "parentDirectory": {"mode": "u=rwx,g=,o="}},
                                 parent=(0, 0, 0o700), exists=exists))
        elif r < 0.7:
            path = "/etc/f%d.conf" % j if j % 5 == 0 else "/etc/cfg%d/f%d.conf" % (j // 50, j)
            if rng.random() < 0.05:
                entries.append(Entry("file", path, {"file": path, "method": "symlink"},
                                     method="symlink", exists=exists))
            else:
                entries.append(Entry("file", path, path, exists=exists))
        else:
            rel = ".rc%d" % j if j % 4 == 0 else ".config/app%d/f%d" % (j // 40, j)
            entries.append(user_entry("file", "u%d" % (j % 4), rel, rel, exists=exists))
    location = {"directories": [], "files": [], "users": {}}
    for e in entries:
        key = "directories" if e.kind == "dir" else "files"
        level = location if e.user is None else location["users"].setdefault(
            e.user, {"directories": [], "files": []})
        level[key].append(e.item)
    config = {
        "users": {name: {"uid": uid, "group": "users" if gid == 100 else "svc", "home": home}
                  for name, (uid, gid, home) in USERS.items()},
        "groups": {"users": {"gid": 100}, "svc": {"gid": 400}},
        "persistence": {STORAGE: location},
    }
    entries.sort(key=lambda e: e.path.split("/"))
    return config, entries


def prefixes(path: str):
    """'/a/b/c' -> ['/a', '/a/b', '/a/b/c']"""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:k]) for k in range(1, len(parts) + 1)]


def target_dirs(e: Entry):
    return prefixes(e.path)[:-1] if e.kind == "file" else prefixes(e.path)


def source_dirs(e: Entry):
    """Storage-side directories an entry needs, outermost first, with the
    owner and mode each gets when it is created: [(P, uid, gid, mode)]."""
    home = USERS[e.user][2] if e.user else None
    out = []
    for q in target_dirs(e):
        if q == e.path:
            spec = (e.uid, e.gid, e.mode)
        elif e.parent is not None and q == target_dirs(e)[-1]:
            spec = e.parent
        elif home is not None and q == home:
            spec = (e.uid, e.gid, 0o700)
        elif home is not None and q.startswith(home + "/"):
            spec = (e.uid, e.gid, 0o755)
        else:
            spec = (0, 0, 0o755)
        out.append((q,) + spec)
    return out


def populate_storage(store: str, entries) -> None:
    """What a previous boot left: the sources of the entries that exist."""
    os.umask(0)
    for e in (e for e in entries if e.exists):
        for q, uid, gid, mode in source_dirs(e):
            if not os.path.isdir(store + q):
                os.mkdir(store + q, mode)
                os.chown(store + q, uid, gid)
        if e.kind == "file":
            with open(store + e.path, "w", encoding="utf-8") as f:
                f.write("kept %s\n" % e.path)
            os.chown(store + e.path, e.uid, e.gid)
    os.umask(0o022)


def floor_ops(root: str, entries) -> str:
    """The floor's operation list (bench/floor.c): each directory once."""
    seen, lines, src = set(), [], root + STORAGE
    for e in entries:
        for q, uid, gid, mode in source_dirs(e):
            if ("S", q) not in seen:
                seen.add(("S", q))
                lines.append("S\t%s\t%d\t%d\t%o" % (src + q, uid, gid, mode))
        for q in target_dirs(e):
            if ("T", q) not in seen:
                seen.add(("T", q))
                lines.append("T\t%s\t%s" % (root + q, src + q))
        if e.covered:
            continue
        if e.kind == "dir":
            lines.append("D\t%s\t%s" % (src + e.path, root + e.path))
        elif e.method == "symlink":
            lines.append("L\t%s\t%s" % (root + e.path, STORAGE + e.path))
        else:
            lines.append("F\t%s\t%s\t%s" % (src + e.path, root + e.path, STORAGE + e.path))
    return "\n".join(lines) + "\n"


def impermanence_dirs(entries):
    """[(P, uid, gid, mode)]: the directories NixOS impermanence's module
    hands to create-directories.bash, in its order: the parents of the homes,
    the homes, the parents of the listed directories and of the files'
    directories, then those directories. Each path once (the module passes a
    few twice), with the owner and mode apply gives it where the module's
    would differ: a listed directory that is also the parent of another
    listed one gets its own (the module makes it first as a parent,
    root:root 0755), and "/" is never passed (the module would copy the
    storage root's owner and mode onto the root)."""
    spec = {}
    for e in entries:
        for q, uid, gid, mode in source_dirs(e):
            spec.setdefault(q, (uid, gid, mode))
    homes = list(dict.fromkeys(USERS[e.user][2] for e in entries if e.user))
    parents = []
    for e in entries:
        home = USERS[e.user][2] if e.user else None
        p = e.path if e.kind == "dir" else os.path.dirname(e.path)
        # at user level the module walks the path below the home only
        parents += [q for q in prefixes(p)[:-1] if home is None or q.startswith(home + "/")]
    order = dict.fromkeys([q for h in homes for q in prefixes(h)[:-1]] + homes + parents
                          + [e.path for e in entries if e.kind == "dir"]
                          + [os.path.dirname(e.path) for e in entries if e.kind == "file"])
    return [(q,) + spec[q] for q in order if q != "/"]


def impermanence_text(root: str, entries) -> str:
    """The driver: a bash script that starts every step of the sequence as
    its own process, as the module's activation script and mount units do;
    it only sequences them and collects the status (the module's `trap
    "_status=1" ERR`). Every directory first, then binds and files in target
    order. An entry inside another kept directory is left alone once that one
    is bound, as apply does (the module would bind it onto itself)."""
    q = shlex.quote
    cd = q(os.path.join(HERE, "impermanence", "create-directories.sh"))
    mf = q(os.path.join(HERE, "impermanence", "mount-file.sh"))
    out = ["status=0\n", "trap 'status=1' ERR\n",
           "/bin/bash %s %s '' %s 0 0 755\n" % (cd, q(root), q(STORAGE))]  # the storage path itself
    for p, uid, gid, mode in impermanence_dirs(entries):
        out.append("/bin/bash %s %s %s %s %d %d %o\n" % (cd, q(root), q(STORAGE), q(p), uid, gid, mode))
    for e in (e for e in entries if not e.covered):
        if e.kind == "dir":
            out.append("mount --bind %s %s\n" % (q(root + STORAGE + e.path), q(root + e.path)))
        else:
            out.append("/bin/bash %s %s %s %s %s\n" % (mf, q(root), q(e.path), q(STORAGE + e.path), e.method))
    return "".join(out) + "exit $status\n"


# --------------------------------------------------------------------------
# Namespace, storage, fresh roots, the result tree

def sh(*argv: str) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), p.returncode, p.stderr.strip()))
    return p.stdout


def private_namespace() -> None:
    """Every mount of the run goes away with it, even if it is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 1 << 18, None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), "unshare/make-rprivate")


def mounts_under(root: str):
    """[(mount point below root, root within its filesystem, fstype)]"""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            a = line.split()
            point = a[4].encode().decode("unicode_escape")
            if point.startswith(root + "/") and point != root + STORAGE:
                out.append((point[len(root):], a[3], a[a.index("-") + 1]))
    return sorted(out)


def walk_tree(base: str, skip: str):
    """{relative path: (type, mode, uid, gid, size or link)} under base,
    links not followed, skip left out; "" is base itself."""
    out = {}

    def describe(path, st):
        if stat.S_ISLNK(st.st_mode):
            return ("l", os.readlink(path))
        kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
        return (kind, oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, 0 if kind == "d" else st.st_size)

    out[""] = describe(base, os.lstat(base))
    todo = [(base, "")]
    while todo:
        d, rel = todo.pop()
        with os.scandir(d) as it:
            for ent in it:
                r = rel + "/" + ent.name
                if r != skip:
                    st = ent.stat(follow_symlinks=False)
                    out[r] = describe(ent.path, st)
                    if stat.S_ISDIR(st.st_mode):
                        todo.append((ent.path, r))
    return out


class Storage:
    """ext4 on a loop device (attached with autoclear), mounted at work/store."""

    def __init__(self, work: str, n: int, entries):
        self.image, self.mnt = os.path.join(work, "persist.img"), os.path.join(work, "store")
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate((64 + n // 40) << 20)
        sh("mkfs.ext4", "-q", "-F", "-N", str(max(8192, 4 * n)), "-E",
           "lazy_itable_init=0,lazy_journal_init=0", self.image)
        sh("mount", "-o", "loop", self.image, self.mnt)
        self.device = sh("findmnt", "-n", "-o", "SOURCE", self.mnt).strip()
        populate_storage(self.mnt, entries)
        self.initial = walk_tree(self.mnt, "/lost+found")

    def restore(self) -> None:
        """Remove what a run created, undo owner and mode changes."""
        now = walk_tree(self.mnt, "/lost+found")
        for r in sorted((r for r in now if r not in self.initial), key=len, reverse=True):
            for _ in range(50):  # a lazily detached bind may hold it a moment
                try:
                    (os.rmdir if now[r][0] == "d" else os.unlink)(self.mnt + r)
                    break
                except OSError:
                    time.sleep(0.01)
        for r, attrs in self.initial.items():
            if now.get(r) != attrs and attrs[0] in "df":
                os.chown(self.mnt + r, attrs[2], attrs[3])
                os.chmod(self.mnt + r, int(attrs[1], 8))

    def close(self) -> None:
        subprocess.run(["umount", self.mnt], stderr=subprocess.DEVNULL)
        os.unlink(self.image)


def check_expected(tree, entries, initial) -> list:
    """What the configuration asks for, against the tree a run left."""
    problems, rt, st = [], tree["root"], tree["storage"]
    points = {}
    for mp, mroot, fstype in tree["mounts"]:
        points.setdefault(mp, []).append((mroot, fstype))
    for e in entries:
        got = points.get(e.path, [])
        if e.covered:
            if got or rt.get(e.path, ("?",))[:4] != st.get(e.path, ())[:4]:
                problems.append("%s: expected the source through its parent's bind, found %r %r"
                                % (e.path, rt.get(e.path), got))
        elif e.kind == "dir" or (e.method == "auto" and e.exists):
            if got != [(e.path, "ext4")]:
                problems.append("%s: expected one bind mount of %s%s, found %r" % (e.path, STORAGE, e.path, got))
        elif rt.get(e.path) != ("l", STORAGE + e.path) or got:
            problems.append("%s: expected a link to %s%s, found %r %r" % (e.path, STORAGE, e.path,
                                                                           rt.get(e.path), got))
        if e.kind == "dir" and e.path not in initial and st.get(e.path) != ("d", oct(e.mode), e.uid, e.gid, 0):
            problems.append("%s: created source is %r" % (e.path, st.get(e.path)))
        for q in target_dirs(e):
            if not any(q == p or q.startswith(p + "/") for p in points):  # not seen through a bind
                if rt.get(q) is None or rt.get(q)[:4] != st.get(q, ())[:4]:
                    problems.append("%s: parent %s should mirror storage %r, is %r"
                                    % (e.path, q, st.get(q), rt.get(q)))
    problems += ["storage %s existed before and changed: %r -> %r" % (r or "/", a, st.get(r))
                 for r, a in initial.items() if st.get(r) != a]
    if rt[""][:4] != ("d", "0o755", 0, 0):
        problems.append("the root itself changed: %r" % (rt[""],))
    return problems


def diff_trees(a, b) -> list:
    out = ["%s %s: %r != %r" % (part, r or "/", a[part].get(r), b[part].get(r))
           for part in ("root", "storage") for r in sorted(set(a[part]) | set(b[part]))
           if a[part].get(r) != b[part].get(r)]
    if a["mounts"] != b["mounts"]:
        out.append("mounts differ: %r" % sorted(set(a["mounts"]) ^ set(b["mounts"]))[:5])
    return out[:10]


# --------------------------------------------------------------------------
# The benchmark

class Bench:
    def __init__(self, args, work: str):
        self.args, self.work, self.python = args, work, args.python
        self.root = os.path.join(work, "root")
        os.mkdir(self.root)
        self.runner, self.floor = os.path.join(work, "runner"), os.path.join(work, "floor")
        for exe in (self.runner, self.floor):
            sh("cc", "-O2", "-o", exe, os.path.join(HERE, os.path.basename(exe) + ".c"))
        # one apply contender per script, byte-compiled as stage 1 runs it
        self.applies = {}
        for i, script in enumerate(args.script):
            label = "apply" if len(args.script) == 1 else "apply#%d" % (i + 1)
            pyc = os.path.join(work, "script%d.pyc" % i)
            sh(self.python, "-I", "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
               "cfile=sys.argv[2], doraise=True)", script, pyc)
            self.applies[label] = pyc
        self.results = {"problems": [], "sizes": {}, "diff": {}}

    def problem(self, msg: str) -> None:
        print("bench: PROBLEM: " + msg, file=sys.stderr)
        self.results["problems"].append(msg)

    def measure(self, argv, name: str):
        """(wall seconds, exit status) of argv, timed by bench/runner.c
        (CLOCK_MONOTONIC around posix_spawn and wait4), output to files."""
        out = subprocess.run([self.runner, name + ".out", name + ".err", *argv], env=ENV,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, check=True)
        ns, _rss, code = out.stdout.split()
        if int(code) != 0:
            with open(name + ".err", encoding="utf-8", errors="replace") as f:
                self.problem("%s exited %s: %s" % (os.path.basename(name), code, f.read()[-1500:]))
        return int(ns) / 1e9, int(code)

    def command(self, who: str, d: str):
        if who == "start":
            return [self.python, *FLAGS, "-c", "pass"]
        if who == "floor":
            return [self.floor, os.path.join(d, "floor.ops")]
        if who == SLOW:
            return ["/bin/bash", os.path.join(d, "impermanence.sh")]
        return [self.python, *FLAGS, self.applies[who], "--root", self.root, "--config",
                os.path.join(d, "config.json"), "apply"]

    def run(self, who: str, d: str, storage: Storage, verify: bool = False):
        """One run on a fresh root; the tree it left when verify."""
        if who != "start":
            sh("mount", "-t", "tmpfs", "-o", "mode=0755", "bench-root", self.root)
            os.mkdir(self.root + STORAGE)
            sh("mount", storage.device, self.root + STORAGE)
        # the previous run's cleanup (writeback, detached mounts) done, not beside this run
        os.sync()
        time.sleep(0.2)
        wall, code = self.measure(self.command(who, d), os.path.join(d, who))
        tree = None
        if who != "start":
            try:
                if verify:
                    tree = {"root": walk_tree(self.root, STORAGE), "mounts": mounts_under(self.root),
                            "storage": walk_tree(storage.mnt, "/lost+found")}
            finally:
                sh("umount", "-l", self.root)
                storage.restore()
        return wall, code, tree

    def size(self, n: int) -> None:
        d = os.path.join(self.work, "n%d" % n)
        os.mkdir(d)
        config, entries = generate(n)
        for name, text in (("config.json", json.dumps(config, indent=1)),
                           ("floor.ops", floor_ops(self.root, entries)),
                           ("impermanence.sh", impermanence_text(self.root, entries))):
            with open(os.path.join(d, name), "w", encoding="utf-8") as f:
                f.write(text)
        who_all = list(self.applies) + ([] if self.args.no_impermanence else [SLOW]) + ["floor"]
        res = {"load": [loadavg()], "runs": {w: [] for w in who_all + ["start"]}, "verified": False}
        storage = Storage(self.work, n, entries)
        try:
            trees = {w: self.run(w, d, storage, verify=True)[2] for w in who_all}  # warm-up
            ok = True
            for w in who_all:
                probs = check_expected(trees[w], entries, storage.initial)
                probs += diff_trees(trees[who_all[0]], trees[w])
                if probs:
                    ok = False
                    self.problem("N=%d: %s left a tree the configuration does not ask for, or unlike %s's:\n  %s"
                                 % (n, w, who_all[0], "\n  ".join(probs[:10])))
            res["verified"] = ok
            res["tree"] = {"mounts": len(trees[who_all[0]]["mounts"]),
                           "links": sum(a[0] == "l" for a in trees[who_all[0]]["root"].values())}
            order = who_all + ["start"]
            for rep in range(max(self.args.reps, self.args.reps_fast)):
                k = rep % len(order)  # each round starts with the next contender
                for w in order[k:] + order[:k]:
                    if w != SLOW or rep < self.args.reps:
                        res["runs"][w].append(self.run(w, d, storage)[0])
                print("bench: N=%d round %d: %s" % (n, rep + 1, "  ".join(
                    "%s %.1f ms" % (w, res["runs"][w][-1] * 1e3) for w in order)), file=sys.stderr)
        finally:
            storage.close()
        res["load"].append(loadavg())
        res["median"] = {w: statistics.median(r) for w, r in res["runs"].items() if r}
        res["min"] = {w: min(r) for w, r in res["runs"].items() if r}
        self.results["sizes"][n] = res

    def diff(self, files: int) -> None:
        """`diff` on a root of `files` files in files/10 directories four
        deep, beside a storage directory holding as many again (which diff
        must not walk), against find -xdev listing every path with its size."""
        root = os.path.join(self.work, "diff%d" % files, "root")
        for k in range(max(1, files // 10)):
            for top, sub in ((root + "/var/cache/a%d/b%d/c%d" % (k % 10, k % 97, k), ""),
                             (root + STORAGE + "/home/bird/k%d" % k, "k")):
                os.makedirs(top)
                for f in range(10):
                    with open("%s/f%d" % (top, f), "wb") as fh:
                        fh.write(sub.encode() or b"x" * (f * 37))
        config = os.path.join(self.work, "diff%d" % files, "config.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"persistence": {STORAGE: {"directories": ["/var/log"]}}}, f)
        name = os.path.join(self.work, "diff%d" % files, "run")
        cmds = {w: [self.python, *FLAGS, pyc, "--root", root, "--config", config, "-q", "diff"]
                for w, pyc in self.applies.items()}
        cmds["find"] = [shutil.which("find"), root, "-xdev", "-path", root + STORAGE, "-prune", "-o", "-printf", "%s %p\n"]
        cmds["start"] = self.command("start", "")
        for w, argv in cmds.items():  # warm-up: page cache, and diff saw every file
            self.measure(argv + (["--json"] if w.startswith("apply") else []), name)
            if w.startswith("apply"):
                with open(name + ".out", encoding="utf-8") as f:
                    total = json.load(f)["total"]["files"]
                if total != files // 10 * 10:
                    self.problem("diff (%s) counted %d files, not %d" % (w, total, files // 10 * 10))
        runs = {w: [] for w in cmds}
        for rep in range(self.args.reps_fast):
            for w in list(cmds)[rep % len(cmds):] + list(cmds)[:rep % len(cmds)]:
                runs[w].append(self.measure(cmds[w], name)[0])
        self.results["diff"][files] = {w: statistics.median(r) for w, r in runs.items()}
        shutil.rmtree(os.path.dirname(root))


def loadavg() -> float:
    with open("/proc/loadavg", encoding="utf-8") as f:
        return float(f.read().split()[0])


def describe_script(path: str) -> str:
    git = ["git", "-C", os.path.dirname(path)]
    rev = subprocess.run(git + ["log", "-1", "--format=%h", "--", path], capture_output=True, text=True)
    dirty = subprocess.run(git + ["status", "--porcelain", "--", path], capture_output=True, text=True)
    return "%s (%s%s)" % (path, rev.stdout.strip() or "not in git",
                          ", modified" if dirty.stdout.strip() else "")


def report(results, applies) -> str:
    ms = lambda x: "%.1f" % (x * 1e3)
    lines = ["%s; %s %s (%s); %d CPUs; load (1 min) per size at its start and end below." % (
        results["date"], results["python"], " ".join(FLAGS), results["python_version"], os.cpu_count())]
    lines += ["%s = %s" % (w, s) for w, s in zip(applies, results["scripts"])]
    lines += ["", "Median wall time in ms of each contender's timed runs (apply, floor, start: %d; "
              "impermanence: %d), interleaved; ratios are of medians (in brackets: of minima)." % (results["reps_fast"], results["reps"]),
              "", "| N | " + " | ".join(applies) + " | floor | start | "
              + " | ".join("%s ÷ (floor + start)" % w for w in applies)
              + " | impermanence | impermanence ÷ %s | same tree | load |" % applies[0],
              "|---:|" + "---:|" * (2 * len(applies) + 4) + ":---:|---|"]
    for n, r in sorted(results["sizes"].items()):
        m = r["median"]
        cells = ["{:,}".format(n)] + [ms(m[w]) for w in applies] + [ms(m["floor"]), ms(m["start"])]
        lo = r["min"]  # the runs a busy neighbour slowed least
        cells += ["%.2f (%.2f)" % (m[w] / (m["floor"] + m["start"]), lo[w] / (lo["floor"] + lo["start"]))
                  for w in applies]
        cells += [ms(m[SLOW]), "%.0f×" % (m[SLOW] / m[applies[0]])] if SLOW in m else ["–", "–"]
        cells += ["yes" if r["verified"] else "**NO**", "%.2f → %.2f" % tuple(r["load"])]
        lines.append("| " + " | ".join(cells) + " |")
    for w in applies[1:]:
        # paired: each round's two runs are neighbours, so a load that comes
        # and goes moves both; the median of their quotients is steadier
        lines += ["", "%s ÷ %s: %s." % (w, applies[0], "; ".join(
            "N = {:,}: median of each round's quotient {:.3f}, of the medians {:.3f}; ratio to floor + start "
            "{:.2f} against {:.2f}".format(
                n, statistics.median(b / a for a, b in zip(r["runs"][applies[0]], r["runs"][w])),
                r["median"][w] / r["median"][applies[0]],
                r["median"][w] / (r["median"]["floor"] + r["median"]["start"]),
                r["median"][applies[0]] / (r["median"]["floor"] + r["median"]["start"]))
            for n, r in sorted(results["sizes"].items())))]
    if results["diff"]:
        lines += ["", "| files | " + " | ".join("diff (%s)" % w for w in applies)
                  + " | find -xdev -printf | start |", "|---:|" + "---:|" * (len(applies) + 2)]
        for files, m in sorted(results["diff"].items()):
            lines.append("| {:,} | ".format(files) + " | ".join(ms(m[w]) for w in applies)
                         + " | %s | %s |" % (ms(m["find"]), ms(m["start"])))
    if results["problems"]:
        lines += ["", "Problems:"] + ["- " + p for p in results["problems"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", default="25,100,300,1000", help="comma-separated N (default 25,100,300,1000)")
    ap.add_argument("--script", action="append",
                    help="a version of impermanence_boot.py to time; repeat it to time several in "
                         "the same runs (default: the one beside bench/)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of impermanence per N (default 5)")
    ap.add_argument("--reps-fast", type=int, default=21,
                    help="timed runs of the others per N, and of diff and find (default 21)")
    ap.add_argument("--diff-files", default="10000,50000",
                    help="comma-separated tree sizes for diff against find; '' for none (default 10000,50000)")
    ap.add_argument("--no-impermanence", action="store_true", help="leave out the impermanence sequence")
    ap.add_argument("--python", help="the interpreter (default: the distribution's, vm/distro_python.py)")
    ap.add_argument("--json", help="write the results as JSON to this path")
    args = ap.parse_args()
    args.script = [os.path.abspath(s) for s in args.script or [os.path.join(PROJECT, "impermanence_boot.py")]]
    if os.geteuid() != 0:
        print("bench: must run as root (loop devices, mounts, chown)", file=sys.stderr)
        return 2
    for tool in ("cc", "mkfs.ext4", "mount", "findmnt", "realpath", "find", "/bin/bash"):
        if not shutil.which(tool):
            print("bench: %s is not installed" % tool, file=sys.stderr)
            return 2
    missing = [s for s in args.script if not os.path.isfile(s)]
    if missing:
        print("bench: %s does not exist" % missing[0], file=sys.stderr)
        return 2
    if not args.python:
        args.python = subprocess.run([sys.executable, os.path.join(PROJECT, "vm", "distro_python.py")],
                                     capture_output=True, text=True, check=True).stdout.strip()
    private_namespace()
    work = tempfile.mkdtemp(prefix="impermanence-bench.")
    try:
        bench = Bench(args, work)
        results = bench.results
        results.update({
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": args.python, "scripts": [describe_script(s) for s in args.script],
            "python_version": sh(args.python, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])").strip(),
            "reps": 0 if args.no_impermanence else args.reps, "reps_fast": args.reps_fast})
        for n in (int(x) for x in args.sizes.split(",") if x):
            bench.size(n)
        for files in (int(x) for x in args.diff_files.split(",") if x):
            bench.diff(files)
    finally:
        subprocess.run(["umount", "-R", "-l", os.path.join(work, "root")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, list(bench.applies)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
