"""The boots, as data shared by tests/boot/test_vm.py and vm/demo.py: which config,
which disks, what stage 2 inspects and writes. The expectations are in
tests/boot/test_vm.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN_CONFIG = json.loads((HERE / "demo-config.json").read_text())

# --- main scenario: the demo machine, booted twice on one disk -------------

MAIN_DIRS = ["/var/log", "/var/lib/nixos", "/etc/nixos", "/var/lib/colord",
             "/home/bird/Downloads", "/home/bird/.ssh", "/home/bird/.local/share/keyrings"]
MAIN_BIND_FILES = ["/etc/machine-id"]
MAIN_LINKS = ["/etc/ssh/ssh_host_ed25519_key.pub", "/etc/nix/id_rsa", "/home/bird/.bash_history"]

MACHINE_ID = "4c1f1e2d8a0b4e6f9a7d3c5b1e0f2a6d\n"

# written on boot 1 through the kept paths (they must reach the disk) ...
KEPT_WRITES = {
    "/var/log/boot-1.log": "kept: a log line from boot 1\n",
    "/etc/nixos/configuration.nix": "{ ... }: { }\n",
    "/home/bird/Downloads/paper.txt": "kept: downloaded on boot 1\n",
    "/home/bird/.ssh/known_hosts": "kept: example.org ssh-ed25519 AAAA\n",
    "/home/bird/.local/share/keyrings/login.keyring": "kept: keyring\n",
    "/home/bird/.bash_history": "ls -la\n",  # through a link: creates the source
    "/etc/ssh/ssh_host_ed25519_key.pub": "ssh-ed25519 AAAAC3Nza test@vm\n",  # method=symlink
    "/etc/machine-id": MACHINE_ID,  # what systemd commits on first boot
}
# ... and to places that are not kept (they must be gone on boot 2)
UNKEPT_WRITES = {
    "/unkept-at-root.txt": "lost\n",
    "/etc/unkept.conf": "lost\n",
    "/home/bird/unkept.txt": "lost\n",
    "/home/bird/.local/unkept.txt": "lost\n",
    "/var/unkept.txt": "lost\n",
}


def _sources(paths):
    return ["/persistent" + p for p in paths]


def main_checks(boot: int) -> dict:
    kept = MAIN_DIRS + MAIN_BIND_FILES + MAIN_LINKS
    inspect = (["/persistent"] + kept + _sources(kept) + list(KEPT_WRITES)
               + list(UNKEPT_WRITES) + ["/persistent/etc/nix", "/persistent/etc/ssh",
                                        "/persistent/home/bird", "/persistent/home"])
    checks = {"inspect": sorted(set(inspect)), "status": True, "commands": [["apply"]],
              "trees": SHELL_TREES}
    if boot == 1:
        # files under /home/bird are written by bird (uid 1000, group users)
        checks["writes"] = [{"path": p, "content": c, **({"as": [1000, 100]}
                                                         if p.startswith("/home/bird/") else {})}
                            for p, c in {**KEPT_WRITES, **UNKEPT_WRITES}.items()]
        checks["inspect_after"] = sorted(set(_sources(KEPT_WRITES)) | set(KEPT_WRITES))
    return checks


# --- the same config by the per-entry shell approach, in the same boot ------
# Stage 1 runs the generated shell script (vm/shell_approach.py) after the
# script, on its own tmpfs root, with a copy of the script's disk (taken just
# before the boot, relabelled) as its storage: the second disk, /dev/vdb.

SHELL_DEVICE = "/dev/vdb"
SHELL_LABEL = "persist-shell"
SHELL_TREES = {"script_root": "/", "script_storage": "/persistent",
               "shell_root": "/run/shell-root", "shell_storage": "/run/shell-root/persistent"}
# made by stage 1 itself on the script's root, not by the script
STAGE1_POINTS = ("/nix", "/proc", "/sys", "/dev", "/run")
# Where the two approaches differ by design: with no source, the script
# creates /etc/machine-id in storage ("uninitialized") and binds it (SPEC
# section 4); the shell approach, as the existing tools do, links it. Once
# the source exists (boot 2), both bind it.
SHELL_DIFFERENCES_FRESH_STORAGE = {("root", "/etc/machine-id"), ("storage", "/etc/machine-id")}


def _shape(e: dict | None):
    """What must be the same in both trees: type, owner, mode, link text,
    whether it is a mount point and what is mounted there (the path within
    the storage filesystem, the type, how many mounts are stacked); a
    file's size. Not inode numbers or the device (vda vs vdb)."""
    if e is None:
        return None
    m = e.get("mount") or {}
    return (e["type"], e["uid"], e["gid"], e["mode"], e.get("readlink"),
            e["mountpoint"], m.get("root"), m.get("fstype"), m.get("count"),
            e["size"] if e["type"] == "file" else None)


def shell_tree_differences(report: dict) -> list[tuple[str, str, tuple, tuple]]:
    """[(part, path, the script's, the shell approach's)] where the root or
    the storage the shell approach left differs from the script's, as seen
    from the booted system (stage 2's walk of both)."""
    trees = report["trees"]
    out = []
    for part in ("root", "storage"):
        a, b = trees[f"script_{part}"], trees[f"shell_{part}"]
        if a is None or b is None:
            out.append((part, "(whole tree)", a is not None, b is not None))
            continue
        if part == "root":
            a = {p: e for p, e in a.items() if p not in STAGE1_POINTS}
        for path in sorted(set(a) | set(b)):
            sa, sb = _shape(a.get(path)), _shape(b.get(path))
            if sa != sb:
                out.append((part, path, sa, sb))
    return out


# --- the storage device found by LABEL= among several devices -------------

LABEL_CONFIG = {
    "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4"}},
    "deviceTimeout": 20,
    "persistence": {"/persistent": {"directories": ["/var/lib/nixos"],
                                    "files": ["/etc/machine-id"]}},
}
LABEL_CHECKS = {"inspect": ["/persistent", "/var/lib/nixos", "/persistent/var/lib/nixos",
                            "/etc/machine-id", "/persistent/etc/machine-id",
                            "/dev/disk", "/dev/vda1", "/dev/vda2", "/dev/vdb", "/run/udev"],
                "status": True}

# --- faults -----------------------------------------------------------------

MISSING_TIMEOUT = 3
MISSING_CONFIG = {
    "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4"}},
    "deviceTimeout": MISSING_TIMEOUT,
    "persistence": {
        "/persistent": {"directories": ["/var/log"], "files": ["/etc/machine-id"]},
        # a second location whose storage exists (stage 1 made it, as
        # neededForBoot would): it is still applied
        "/state": {"directories": ["/var/lib/state-kept"]},
    },
}
MISSING_PREROOT = {"/state": None}
MISSING_CHECKS = {"inspect": ["/persistent", "/var/log", "/etc/machine-id", "/etc",
                              "/var/lib/state-kept", "/state/var/lib/state-kept"],
                  "status": True}

INVALID_CONFIG = copy.deepcopy(MAIN_CONFIG)
# a typo'd key: the config error must name it and suggest "directories"
INVALID_CONFIG["persistence"]["/persistent"]["directores"] = \
    INVALID_CONFIG["persistence"]["/persistent"].pop("directories")
INVALID_CHECKS = {"inspect": ["/persistent", "/etc/machine-id"]}

LEFTOVER_CONFIG = {
    "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4"}},
    "deviceTimeout": 20,
    "persistence": {"/persistent": {
        "directories": ["/var/log"],
        "files": ["/etc/ssh/ssh_host_rsa_key", "/etc/machine-id", "/etc/adjtime"],
    }},
}
LEFTOVER_KEY = "kept: the host key in storage\n"
LEFTOVER_STALE = "leftover: written by stage 1 before the script ran\n"
# On the wiped root before the script runs: a non-empty file where a kept file
# goes (must fail that entry, overwrite nothing) and an empty machine-id (must
# simply be mounted over, SPEC section 5).
LEFTOVER_PREROOT = {"/etc": None, "/etc/ssh": None,
                    "/etc/ssh/ssh_host_rsa_key": LEFTOVER_STALE,
                    "/etc/machine-id": ""}
LEFTOVER_CHECKS = {"inspect": ["/etc/ssh/ssh_host_rsa_key", "/persistent/etc/ssh/ssh_host_rsa_key",
                               "/etc/machine-id", "/persistent/etc/machine-id",
                               "/etc/adjtime", "/persistent/etc/adjtime",
                               "/var/log", "/persistent/var/log"],
                   "status": True}


def seed_leftover_storage(seed: Path) -> None:
    """Storage content for the leftover boot (mkfs.ext4 -d seed)."""
    import os
    (seed / "etc/ssh").mkdir(parents=True)
    key = seed / "etc/ssh/ssh_host_rsa_key"
    key.write_text(LEFTOVER_KEY)
    os.chmod(key, 0o600)
    (seed / "etc/adjtime").write_text("0.0 0 0.0\n0\nUTC\n")
    os.chmod(seed, 0o755)

# --- errors reach the kernel log even after many verbose lines -------------

KMSG_CONFIG = copy.deepcopy(MAIN_CONFIG)
KMSG_CONFIG["persistence"]["/persistent"]["files"].append("/var/spool/late.conf")
# the last entry in target order fails, after ~40 verbose lines
KMSG_PREROOT = {"/var": None, "/var/spool": None, "/var/spool/late.conf": "leftover\n"}
KMSG_CHECKS = {"inspect": ["/var/spool/late.conf"]}

# --- hostile storage: what a user who owns a kept directory can plant ------
# bird (uid 1000) owns /persistent/home/bird. Before the boot, bird has
# replaced some of the kept paths in storage: ~/.local/share by a link to
# /etc and ~/.ssh by a link to /root (absolute: they point into the booted
# system, and in stage 1 into the initramfs), ~/.config by a relative link
# climbing out of storage to /etc, the kept file ~/.netrc by a hard link to
# a root-owned 0600 file elsewhere in storage, the kept file
# ~/.bash_history by a FIFO (opening it would block the boot) and the kept
# file ~/disk.img by a block device node (the virtio disk's usual numbers). The
# config also keeps unaffected entries, system and user level. The booted
# system's /etc and /root (stage-1 leftovers on the fresh root) and the
# initramfs's own /etc and /root hold decoys.

BIRD, USERS_GID = 1000, 100
HOSTILE_SECRET = "root:$6$not-for-bird$0123456789abcdef:19000:0:99999:7:::\n"
HOSTILE_MACHINE_ID = "0f9e8d7c6b5a49382716050413223140\n"
HOSTILE_CONFIG = {
    "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4"}},
    "deviceTimeout": 20,
    "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
    "groups": {"users": {"gid": USERS_GID}},
    "persistence": {"/persistent": {
        "directories": ["/var/log", "/var/lib/nixos"],
        "files": ["/etc/machine-id"],
        "users": {"bird": {
            "directories": [".local/share/keyrings", ".ssh", ".config/app", "Documents",
                            ".cache/thumbnails", ".mozilla", "Deep"],
            "files": [".netrc", ".bash_history", "disk.img", ".profile", "agent.sock"],
        }},
    }},
}
# affected entry -> (the planted path in storage, words its error line must
# hold besides the path: the cause)
HOSTILE_AFFECTED = {
    "/home/bird/.local/share/keyrings": ("/home/bird/.local/share", "symbolic link"),
    "/home/bird/.ssh": ("/home/bird/.ssh", "symbolic link"),
    "/home/bird/.config/app": ("/home/bird/.config", "symbolic link"),
    "/home/bird/.netrc": ("/home/bird/.netrc", "hard link"),
    "/home/bird/.bash_history": ("/home/bird/.bash_history", "special file"),
    "/home/bird/disk.img": ("/home/bird/disk.img", "special file"),
    # ~/.cache a link to / (the parent of a kept directory), ~/.mozilla one
    # to the reading process's own root, the kept file ~/agent.sock a socket
    "/home/bird/.cache/thumbnails": ("/home/bird/.cache", "symbolic link"),
    "/home/bird/.mozilla": ("/home/bird/.mozilla", "symbolic link"),
    "/home/bird/agent.sock": ("/home/bird/agent.sock", "special file"),
}
HOSTILE_LINKS = {"/home/bird/.local/share": "/etc", "/home/bird/.ssh": "/root",
                 "/home/bird/.config": "../../../etc", "/home/bird/.cache": "/",
                 "/home/bird/.mozilla": "/proc/self/root"}
HOSTILE_DEVICE = (254, 0)  # the numbers virtio_blk usually gets for /dev/vda
# unaffected entries: (kind, content of a file in it or of the file)
HOSTILE_UNAFFECTED = {
    "/var/log": ("dir", "/var/log/boot-0.log", "kept: an old log line\n"),
    "/var/lib/nixos": ("dir", "/var/lib/nixos/uid-map", "{}\n"),
    "/etc/machine-id": ("file", "/etc/machine-id", HOSTILE_MACHINE_ID),
    "/home/bird/Documents": ("dir", "/home/bird/Documents/notes.txt", "kept: bird's notes\n"),
    "/home/bird/.profile": ("file", "/home/bird/.profile", "export EDITOR=vi\n"),
    # holds a tree HOSTILE_DEEP levels deep (plant_hostile_deep): bound whole
    "/home/bird/Deep": ("dir", "/home/bird/Deep/top.txt", "kept: above a deep tree\n"),
}
# Trees of directories d/d/d/... this deep (6,000 bytes of path: past
# PATH_MAX; past the 1,024 fds a process has, were one open per level)
# under the kept ~/Deep and the unkept ~/.junk, which orphans walks on the
# booted system; a file "leaf" at the bottom of each.
HOSTILE_DEEP = 3000
HOSTILE_DEEP_TOPS = ("/home/bird/Deep", "/home/bird/.junk")
# decoys: on the fresh root (the booted system's /etc and /root) ...
HOSTILE_PREROOT = {
    "/etc": (None, 0o755), "/etc/hostname": ("decoy\n", 0o644),
    "/root": (None, 0o700), "/root/.marker": ("decoy: root's home\n", 0o600),
}
# ... and in the initramfs itself (stage 1's /etc and /root)
HOSTILE_INITRD = {
    "/etc/initrd-decoy": ("decoy: stage 1's /etc\n", 0o644),
    "/root": (None, 0o700), "/root/.marker": ("decoy: stage 1's /root\n", 0o600),
}
# what stage 1 records right before and after the script: the initramfs's
# /, /etc and /root, and the whole fresh root (not crossing mounts)
HOSTILE_SNAPSHOT = ["/ 1", "/etc", "/root", "/mnt-root"]
HOSTILE_STORAGE_PATHS = (["/persistent/etc/shadow-like", "/persistent/etc", "/persistent/home/bird",
                          "/persistent/home/bird/.local"]
                         + ["/persistent" + p for p, _ in HOSTILE_AFFECTED.values()])
HOSTILE_CHECKS = {
    "inspect": sorted(set(["/", "/etc", "/root", "/root/.marker", "/etc/hostname",
                           "/home/bird", "/home/bird/.local", "/home/bird/.local/share"]
                          + list(HOSTILE_AFFECTED) + list(HOSTILE_UNAFFECTED)
                          + ["/persistent" + p for p in HOSTILE_UNAFFECTED]
                          + [c[1] for c in HOSTILE_UNAFFECTED.values()]
                          + HOSTILE_STORAGE_PATHS)),
    "trees": {"etc": "/etc", "root": "/root"},
    # a second apply on the booted system meets the same storage; orphans
    # walks ~/.junk's deep tree
    "commands": [["apply"], ["orphans"]],
    "status": True,
}


def seed_hostile_storage(seed: Path) -> None:
    """Storage content for the hostile boot (mkfs.ext4 -d seed keeps owners,
    modes, links, hard links and FIFOs)."""
    import os

    def mkdir(rel, mode=0o755, uid=0, gid=0):
        p = seed / rel.lstrip("/")
        p.mkdir(parents=True, exist_ok=True)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    def write(rel, content, mode=0o644, uid=0, gid=0):
        p = seed / rel.lstrip("/")
        p.write_text(content)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    os.chmod(seed, 0o755)
    for d in ("/etc", "/var", "/var/lib", "/home"):
        mkdir(d)
    # root's: a shadow-like file, 0600
    write("/etc/shadow-like", HOSTILE_SECRET, 0o600)
    mkdir("/var/log")
    mkdir("/var/lib/nixos")
    write("/var/log/boot-0.log", HOSTILE_UNAFFECTED["/var/log"][2])
    write("/var/lib/nixos/uid-map", HOSTILE_UNAFFECTED["/var/lib/nixos"][2])
    write("/etc/machine-id", HOSTILE_MACHINE_ID, 0o444)
    # bird's home, and what bird planted there
    mkdir("/home/bird", 0o700, BIRD, USERS_GID)
    mkdir("/home/bird/.local", 0o755, BIRD, USERS_GID)
    mkdir("/home/bird/Documents", 0o755, BIRD, USERS_GID)
    write("/home/bird/Documents/notes.txt", HOSTILE_UNAFFECTED["/home/bird/Documents"][2],
          0o644, BIRD, USERS_GID)
    write("/home/bird/.profile", HOSTILE_UNAFFECTED["/home/bird/.profile"][2], 0o644, BIRD, USERS_GID)
    for rel, target in HOSTILE_LINKS.items():
        p = seed / rel.lstrip("/")
        os.symlink(target, p)
        os.lchown(p, BIRD, USERS_GID)
    os.link(seed / "etc/shadow-like", seed / "home/bird/.netrc")
    fifo = seed / "home/bird/.bash_history"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, BIRD, USERS_GID)
    import stat
    dev = seed / "home/bird/disk.img"
    os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(*HOSTILE_DEVICE))
    os.chown(dev, BIRD, USERS_GID)
    import socket
    cwd = os.open(".", os.O_RDONLY)
    try:  # bind(2) takes 108 bytes at most: a name relative to the home
        os.chdir(seed / "home/bird")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind("agent.sock")
    finally:
        os.fchdir(cwd)
        os.close(cwd)
    os.lchown(seed / "home/bird/agent.sock", BIRD, USERS_GID)
    mkdir("/home/bird/Deep", 0o755, BIRD, USERS_GID)
    write("/home/bird/Deep/top.txt", HOSTILE_UNAFFECTED["/home/bird/Deep"][2], 0o644, BIRD, USERS_GID)
    mkdir("/home/bird/.junk", 0o755, BIRD, USERS_GID)


def plant_hostile_deep(image: Path) -> None:
    """The deep trees, written into the image with debugfs (mkfs.ext4 -d
    cannot copy a tree past PATH_MAX): one level at a time, bird's."""
    import subprocess
    import tempfile
    cmds = []
    for top in HOSTILE_DEEP_TOPS:
        cmds.append(f"cd {top}")
        for _ in range(HOSTILE_DEEP):
            cmds += ["mkdir d", f"sif d uid {BIRD}", f"sif d gid {USERS_GID}", "cd d"]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
        f.write("\n".join(cmds) + "\n")
        f.flush()
        subprocess.run(["debugfs", "-w", "-f", f.name, str(image)], check=True,
                       capture_output=True)
    with tempfile.NamedTemporaryFile("w") as leaf:
        leaf.write("at the bottom\n")
        leaf.flush()
        for top in HOSTILE_DEEP_TOPS:
            script = (f"cd {top}\n" + "cd d\n" * HOSTILE_DEEP + f"write {leaf.name} leaf\n"
                      + f"sif leaf uid {BIRD}\nsif leaf gid {USERS_GID}\n")
            with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
                f.write(script)
                f.flush()
                subprocess.run(["debugfs", "-w", "-f", f.name, str(image)], check=True,
                               capture_output=True)

# --- hideMounts and allowTrash: utab carried through switch_root -----------
# Stage 1's /run is a tmpfs the script records the binds' userspace options
# in (/run/mount/utab); stage 1 moves it into the new root, so the booted
# system's findmnt --mtab (brought by the boot: tools=["findmnt"]) shows
# them. Stage 2 then runs unmount, first for one entry, then for the whole
# config, and looks again after each.

UTAB_CONFIG = {
    "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4"}},
    "deviceTimeout": 20,
    "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
    "groups": {"users": {"gid": USERS_GID}},
    "persistence": {"/persistent": {
        "hideMounts": True,
        "directories": [
            "/var/log",
            {"directory": "/srv/shared", "hideMount": False, "allowTrash": True},
            {"directory": "/srv/media", "allowTrash": True},
            {"directory": "/var/lib/shown", "hideMount": False},
        ],
        "files": ["/etc/machine-id"],  # a file's bind gets no options
        "users": {"bird": {"directories": ["Documents"]}},
    }},
}
# target -> the userspace options findmnt must show there, and nowhere else
UTAB_EXPECTED = {
    "/var/log": ("x-gvfs-hide",),
    "/srv/shared": ("x-gvfs-trash",),
    "/srv/media": ("x-gvfs-hide", "x-gvfs-trash"),
    "/home/bird/Documents": ("x-gvfs-hide",),
}
UTAB_UNMOUNTED_FIRST = "/var/log"
UTAB_ONE_CONFIG = copy.deepcopy(UTAB_CONFIG)
UTAB_ONE_CONFIG["persistence"]["/persistent"] = {"hideMounts": True,
                                                 "directories": [UTAB_UNMOUNTED_FIRST]}
UTAB_FILES = {"unmount-one.json": json.dumps(UTAB_ONE_CONFIG, indent=1)}
UTAB_CHECKS = {
    "mtab": True,
    "inspect": ["/persistent", "/etc/machine-id", "/var/lib/shown", *UTAB_EXPECTED],
    "commands": [["--config", "/nix/scenario/unmount-one.json", "unmount"], ["unmount"]],
}
