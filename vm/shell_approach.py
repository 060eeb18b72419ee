"""The per-entry shell approach for a config, for the test machine's stage 1
(vm/guest/init runs it after the script, on its own root /mnt-shell).

It does per entry what NixOS impermanence's create-directories.bash and
mount-file.bash do, in one POSIX sh script with builtins where they do: walk
the path (`[ -d ]`), create what is missing with the declared owner and mode,
then `mount --bind` or `ln -s`. In the initramfs there is no bash and no
coreutils: the script is run by busybox sh; busybox's chown/chmod have no
--reference, so the root-side directory step reads the storage directory's
owner and mode with busybox stat; `mount --bind` is busybox mount's
equivalent of util-linux's (`--bind` is taken as `-o bind`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

ROOT = "/mnt-shell"  # its root in stage 1; moved to /run/shell-root before switch_root
INSPECT_ROOT = "/run/shell-root"  # where stage 2 finds it
STORAGE = "/persistent"  # the only storage path the generated script supports


@dataclass
class Entry:
    kind: str                  # "dir" | "file"
    path: str                  # target as the booted system sees it
    user: Optional[str]        # None: system level; else the user whose home it is in
    home: Optional[str]
    uid: int
    gid: int
    mode: int = 0o755
    method: str = "auto"
    parent: Optional[Tuple[int, int, int]] = None  # a file's parentDirectory (uid, gid, mode)
    covered: bool = False      # inside another kept directory: bound with it, nothing more


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
        classes = "ugo" if "a" in (m.group(1) or "a") else m.group(1)
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
    """[Entry] of a configuration (the JSON of SPEC §3), with the script's
    defaults: system level root:root 0755, user level the user and their
    primary group; names resolved from the config's users/groups tables."""
    users = config.get("users", {})
    groups = config.get("groups", {})

    def gid_of(name):
        return int(name) if isinstance(name, int) or str(name).isdigit() else int(groups[name]["gid"])

    def uid_of(name):
        return int(name) if isinstance(name, int) or str(name).isdigit() else int(users[name]["uid"])

    def account(name):
        u = users[name]
        return uid_of(name), gid_of(u.get("group", "users")), u.get("home", "/home/" + name)

    entries = []
    for name, loc in config.get("persistence", {}).items():
        if loc.get("enable", True) is False:
            continue
        if loc.get("persistentStoragePath", name) != STORAGE:
            raise ValueError("storage %s: only %s is supported" % (name, STORAGE))
        levels = [(None, None, "/", loc)]
        for uname, sub in loc.get("users", {}).items():
            home = account(uname)[2]
            levels.append((uname, home, home.rstrip("/") + "/", sub))
        for uname, home, base, level in levels:
            d_uid, d_gid = account(uname)[:2] if uname else (0, 0)
            for item in level.get("directories", []):
                spec = item if isinstance(item, dict) else {"directory": item}
                path = base + spec["directory"].lstrip("/") if uname else spec["directory"]
                entries.append(Entry(
                    "dir", path, uname, home,
                    uid_of(spec["user"]) if "user" in spec else d_uid,
                    gid_of(spec["group"]) if "group" in spec else d_gid,
                    parse_mode(spec.get("mode", "0755"))))
            for item in level.get("files", []):
                spec = item if isinstance(item, dict) else {"file": item}
                path = base + spec["file"].lstrip("/") if uname else spec["file"]
                parent = None
                if "parentDirectory" in spec:
                    pd = spec["parentDirectory"]
                    parent = (uid_of(pd["user"]) if "user" in pd else d_uid,
                              gid_of(pd["group"]) if "group" in pd else d_gid,
                              parse_mode(pd.get("mode", "0755")))
                entries.append(Entry("file", path, uname, home, d_uid, d_gid,
                                     method=spec.get("method", "auto"), parent=parent))
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
    for q in comps:
        if e.kind == "dir" and q == e.path:
            spec = (e.uid, e.gid, e.mode)
        elif e.kind == "file" and e.parent is not None and q == comps[-1]:
            spec = e.parent
        elif e.home is not None and q == e.home:
            spec = (e.uid, e.gid, 0o700)
        elif e.home is not None and q.startswith(e.home + "/"):
            spec = (e.uid, e.gid, 0o755)
        else:
            spec = (0, 0, 0o755)
        out.append((q,) + spec)
    return out


PRELUDE = r"""# Per-entry shell approach: the steps of NixOS impermanence's
# create-directories.bash and mount-file.bash in one script, with builtins
# where they do: every entry walks its own path, creates what is missing,
# then binds or links.
R=%(root)s
S=%(root)s%(storage)s
rc=0
# storage side: create a missing directory with the declared owner and mode
sd() { [ -d "$S$1" ] || { mkdir -m "$4" "$S$1" && chown "$2:$3" "$S$1"; } || rc=1; }
# root side: create a missing directory mirroring its storage counterpart
td() { [ -d "$R$1" ] || { mkdir "$R$1" && chown "$(stat -c %%u:%%g "$S$1")" "$R$1" && chmod "$(stat -c %%a "$S$1")" "$R$1"; } || rc=1; }
# directory: bind mount
bd() { mount --bind "$S$1" "$R$1" || rc=1; }
# file, method auto: bind mount when the source exists, else a symlink
bf() { if [ -e "$S$1" ]; then { [ -e "$R$1" ] || : > "$R$1"; } && mount --bind "$S$1" "$R$1" || rc=1; else ln -s "%(storage)s$1" "$R$1" || rc=1; fi; }
# file, method symlink
lf() { ln -s "%(storage)s$1" "$R$1" || rc=1; }
"""


def script(config: dict) -> str:
    """The per-entry shell script for config, on ROOT (storage at ROOT/persistent)."""
    out = [PRELUDE % {"root": ROOT, "storage": STORAGE}]
    for e in entries_from_config(config):
        for q, uid, gid, mode in source_dirs(e):
            out.append("sd %s %d %d %o\n" % (q, uid, gid, mode))
        for q in prefixes(e.path)[:-1] if e.kind == "file" else prefixes(e.path):
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


def storage_mount(config: dict) -> str:
    """"FSTYPE OPTIONS" for stage 1's mount of the storage copy: what the
    config's fileSystems entry for the storage path says (stage 1 mounts it,
    as NixOS does for a neededForBoot filesystem, before the script runs)."""
    fs = config.get("fileSystems", {}).get(STORAGE, {})
    opts = fs.get("options", [])
    if isinstance(opts, str):
        opts = [o for o in opts.split(",") if o]
    fstype = fs.get("fsType", "auto")
    return f"{fstype if fstype != 'auto' else 'ext4'} {','.join(opts) or 'defaults'}\n"


def command_count(text: str) -> int:
    """Lines of the generated script that call a step (sd, td, bd, bf, lf)."""
    return sum(1 for line in text.splitlines() if line[:3] in ("sd ", "td ", "bd ", "bf ", "lf "))
