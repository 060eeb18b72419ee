"""apply on a running system (--root /, as activation at `nixos-rebuild
switch` runs it): data a new entry's target already holds is moved into
storage, which has none, and then kept from there; where both hold data the
entry fails, naming both, and neither is touched.

The running system is the sandbox's root entered with chroot (the host's
/usr bound into it for the interpreter), so the script sees it as `/`."""
from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from support import (BIRD, SCRIPT, USERS_GID, base_config, distro_python, mounts_under, require,
                     same_inode, tmpfs_at, unique_label, content_view, snapshot)

INSIDE = "/run/impermanence-test"  # the script and config, inside the root


@pytest.fixture
def running(sandbox, disk):
    """A booted system: apply ran on it at boot; then `run` applies a new
    config on it as its own root."""
    python = distro_python().path  # the distribution's, as the booted system has it
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    R = sandbox.root
    for d in ("usr", "proc", INSIDE.lstrip("/")):
        (R / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + link):
            os.symlink(os.readlink("/" + link), R / link)
    subprocess.run(["mount", "--rbind", "/usr", str(R / "usr")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(R / "proc")], check=True)
    shutil.copy(SCRIPT, R / INSIDE.lstrip("/") / "impermanence_boot.py")

    def run(persistence: dict, *args: str, others: dict | None = None, prefix: tuple = ()):
        """apply, inside, of the boot's config with this /persistent
        location (and other locations); prefix: strace, say."""
        config = base_config(disk.label, persistence)
        config["persistence"].update(others or {})
        (R / INSIDE.lstrip("/") / "config.json").write_text(json.dumps(config))
        return subprocess.run([*prefix, shutil.which("chroot"), str(R), python, "-I",
                               f"{INSIDE}/impermanence_boot.py", "--config", f"{INSIDE}/config.json",
                               *args, "apply"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env={"IMPERMANENCE_NO_KMSG": "1", "LIBMOUNT_UTAB": f"{INSIDE}/utab",
                                   "PATH": "/usr/bin"}, timeout=60)

    return run


def attributes(path) -> tuple:
    st = os.lstat(path)
    xattrs = {} if os.path.islink(path) else {a: os.getxattr(path, a) for a in os.listxattr(path)}
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, xattrs


def test_data_a_new_kept_directory_holds_is_moved_into_storage(sandbox, running):
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/app"
    (data / "sub").mkdir(parents=True)
    (data / "state.db").write_bytes(b"precious\n" * 1000)
    (data / "sub" / "note").write_text("kept\n")
    os.symlink("/etc/shadow", data / "link")  # a link is moved as a link, never followed
    os.mkfifo(data / "fifo")
    os.chown(data / "state.db", BIRD, USERS_GID)
    os.chmod(data / "state.db", 0o640)
    os.setxattr(data / "state.db", "trusted.app", b"tag")
    os.utime(data / "sub" / "note", ns=(1, 2_000_000_000))
    before = {p: attributes(data / p) for p in ("state.db", "sub", "sub/note", "link", "fifo")}
    result = running({"directories": ["/var/log", "/var/lib/app"]}, "-v")
    assert result.returncode == 0, result.stderr
    assert "impermanence: move the contents of /var/lib/app into /persistent/var/lib/app" in result.stderr
    # Copied across filesystems (tmpfs root, ext4 storage), then bound.
    assert same_inode(data, S / "var/lib/app")
    assert (S / "var/lib/app/state.db").read_bytes() == b"precious\n" * 1000
    assert (S / "var/lib/app/sub/note").read_text() == "kept\n"
    assert os.readlink(S / "var/lib/app/link") == "/etc/shadow"
    for p, attrs in before.items():
        assert attributes(S / "var/lib/app" / p) == attrs, p
    # Nothing of it is left under the mount on the root.
    subprocess.run(["umount", str(data)], check=True)
    assert os.listdir(data) == []


def test_a_file_on_the_running_system_is_moved_then_kept(sandbox, running):
    R, S = sandbox.root, sandbox.path("/persistent")
    (R / "etc").mkdir(exist_ok=True)
    (R / "etc/adjtime").write_text("0.0 0 0.0\n")
    (R / "etc/hostid").write_bytes(b"\x01\x02\x03\x04")
    result = running({"directories": ["/var/log"],
                      "files": ["/etc/adjtime", {"file": "/etc/hostid", "method": "symlink"}]})
    assert result.returncode == 0, result.stderr
    assert (S / "etc/adjtime").read_text() == "0.0 0 0.0\n"
    assert same_inode(R / "etc/adjtime", S / "etc/adjtime")
    assert os.readlink(R / "etc/hostid") == "/persistent/etc/hostid"
    assert (S / "etc/hostid").read_bytes() == b"\x01\x02\x03\x04"


def test_on_one_filesystem_the_data_is_renamed(sandbox, running):
    # A storage path on the root's own filesystem (no mount): one rename.
    R = sandbox.root
    (R / "state").mkdir()
    (R / "srv/www").mkdir(parents=True)
    (R / "srv/www/index.html").write_text("hi\n")
    ino = os.stat(R / "srv/www/index.html").st_ino
    result = running({"directories": ["/var/log"]}, "-q",
                     others={"/state": {"directories": ["/srv/www"]}})
    assert result.returncode == 0, result.stderr
    assert os.stat(R / "state/srv/www/index.html").st_ino == ino
    assert same_inode(R / "srv/www", R / "state/srv/www")


def test_where_both_hold_data_the_entry_fails_naming_both(sandbox, running):
    R, S = sandbox.root, sandbox.path("/persistent")
    (S / "var/lib/app").mkdir(parents=True)
    (S / "var/lib/app/old").write_text("from storage\n")
    (R / "var/lib/app").mkdir(parents=True)
    (R / "var/lib/app/new").write_text("from the system\n")
    (S / "etc").mkdir()
    (S / "etc/motd").write_text("stored\n")
    (R / "etc").mkdir(exist_ok=True)
    (R / "etc/motd").write_text("live\n")
    result = running({"directories": ["/var/log", "/var/lib/app", "/srv/other"], "files": ["/etc/motd"]})
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "impermanence: /etc/motd: target exists and is not empty; not overwritten "
        "(and /persistent/etc/motd in storage is not either)",
        "impermanence: /var/lib/app: holds data, and so does /persistent/var/lib/app in storage; "
        "left as they are (move one away, then apply again)"]
    assert (R / "var/lib/app/new").read_text() == "from the system\n"
    assert os.listdir(S / "var/lib/app") == ["old"]
    assert (R / "etc/motd").read_text() == "live\n" and (S / "etc/motd").read_text() == "stored\n"
    assert not os.path.ismount(R / "var/lib/app")
    assert os.path.ismount(R / "srv/other")  # the others are applied


def test_an_account_made_at_activation_gets_its_entry_then(sandbox, disk, running):
    # A service account without a fixed uid (services.colord's) exists only
    # once activation made it: at boot its entry fails with a fix; apply at
    # activation, after users and groups, makes it with the real owner.
    R, S = sandbox.root, sandbox.path("/persistent")
    entry = {"directory": "/var/lib/colord", "user": "colord", "group": "colord", "mode": "u=rwx,g=rx,o="}
    boot = sandbox.run("apply", config=base_config(disk.label, {"directories": ["/var/log", entry]}))
    assert boot.returncode == 1
    assert "impermanence: user colord: unknown user" in boot.stderr
    assert not (S / "var/lib/colord").exists()
    (R / "etc").mkdir(exist_ok=True)
    (R / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\ncolord:x:987:986::/var/lib/colord:/bin/false\n")
    (R / "etc/group").write_text("root:x:0:\ncolord:x:986:\n")
    result = running({"directories": ["/var/log", entry]})
    assert result.returncode == 0, result.stderr
    st = os.stat(S / "var/lib/colord")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (987, 986, 0o750)
    assert same_inode(R / "var/lib/colord", S / "var/lib/colord")


# --- The move into storage: boundaries, interruptions, space, writers -------------------

def leftovers(*dirs) -> list:
    """The move's temporaries (`.NAME.impermanence-move` in storage,
    `.NAME.impermanence-moved` on the root) found in these directories."""
    return sorted(f"{d}/{n}" for d in dirs if os.path.isdir(d) for n in os.listdir(d)
                  if ".impermanence-move" in n)


def test_a_disk_mounted_inside_a_new_kept_directory_is_refused(sandbox, running, loop_disk):
    # A USB disk at /srv/data/usb when /srv/data becomes kept: never
    # copied into storage, never emptied; the entry fails naming it.
    R, S = sandbox.root, sandbox.path("/persistent")
    usb = loop_disk(unique_label())
    data = R / "srv/data"
    (data / "notes").mkdir(parents=True)
    (data / "notes/a.txt").write_text("on the root\n")
    (data / "usb").mkdir()
    subprocess.run(["mount", usb.device, str(data / "usb")], check=True)
    (data / "usb/photo.jpg").write_bytes(os.urandom(100_000))
    os.chown(data / "usb/photo.jpg", BIRD, USERS_GID)
    # Inode numbers, ctimes and mtimes too: nothing was touched at all.
    usb_before, data_before = snapshot(data / "usb"), snapshot(data)
    result = running({"directories": ["/var/log", "/srv/data", "/srv/other"]})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"impermanence: /srv/data: holds /srv/data/usb, another filesystem mounted there "
        f"({usb.device}, ext4); not moved into storage (unmount it, or keep it apart, then apply again)"]
    assert snapshot(data / "usb") == usb_before  # lost+found too
    assert snapshot(data) == data_before
    assert not (S / "srv/data").exists() or os.listdir(S / "srv/data") == []
    assert leftovers(S / "srv") == []
    assert os.path.ismount(data / "usb") and not os.path.ismount(data)
    assert os.path.ismount(R / "srv/other")  # the others are applied
    subprocess.run(["umount", str(data / "usb")], check=True)


def test_a_kept_directory_that_is_a_mount_point_is_refused(sandbox, running, loop_disk):
    # /var/lib/docker on its own disk, then kept: its disk is not emptied.
    R, S = sandbox.root, sandbox.path("/persistent")
    other = loop_disk(unique_label())
    docker = R / "var/lib/docker"
    docker.mkdir(parents=True)
    subprocess.run(["mount", other.device, str(docker)], check=True)
    (docker / "image").write_bytes(b"layer\n" * 1000)
    before = snapshot(docker)
    result = running({"directories": ["/var/log", "/var/lib/docker"]})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"impermanence: /var/lib/docker: is another filesystem's mount point ({other.device}, ext4); "
        "not moved into storage (unmount it, or keep it apart, then apply again)"]
    assert snapshot(docker) == before
    assert not (S / "var/lib/docker").exists() or os.listdir(S / "var/lib/docker") == []
    assert leftovers(S / "var/lib") == []
    assert [m[2] for m in mounts_under(docker)] == ["ext4"]  # nothing bound over it
    subprocess.run(["umount", str(docker)], check=True)


def test_a_nested_entry_of_another_storage_stays_in_its_storage(sandbox, running):
    # /var/lib/foo bound from /persist2; then /var/lib is kept on
    # /persistent: foo's data stays in /persist2 and is bound on top again.
    R, S = sandbox.root, sandbox.path("/persistent")
    second = tmpfs_at(R / "persist2")
    (second / "var/lib/foo").mkdir(parents=True)
    (second / "var/lib/foo/db").write_text("foo's data\n")
    foo = {"/persist2": {"directories": ["/var/lib/foo"]}}
    first = running({"directories": ["/var/log"]}, others=foo)
    assert first.returncode == 0, first.stderr
    assert same_inode(R / "var/lib/foo", second / "var/lib/foo")
    (R / "var/lib/other").mkdir()
    (R / "var/lib/other/state").write_text("other's\n")
    result = running({"directories": ["/var/log", "/var/lib"]}, others=foo)
    assert result.returncode == 0, result.stderr
    assert (second / "var/lib/foo/db").read_text() == "foo's data\n"
    assert os.listdir(second / "var/lib/foo") == ["db"]
    assert (S / "var/lib/other/state").read_text() == "other's\n"
    assert not (S / "var/lib/foo").exists() or os.listdir(S / "var/lib/foo") == []
    assert same_inode(R / "var/lib", S / "var/lib")
    assert same_inode(R / "var/lib/foo", second / "var/lib/foo")
    assert (R / "var/lib/foo/db").read_text() == "foo's data\n"
    assert leftovers(S / "var", R / "var") == []


def test_a_fuse_mount_inside_is_refused_and_nothing_is_copied(sandbox, running, tmp_path):
    # A user's FUSE mount can present any owner and mode: a root-owned
    # setuid file must never reach storage (and the user's home at boot).
    require(shutil.which("fuse2fs") is not None, "fuse2fs is not installed (Debian package fuse2fs)")
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    R, S = sandbox.root, sandbox.path("/persistent")
    image = tmp_path / "fuse.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    stuff = R / "home/bird/stuff"
    (stuff / "mnt").mkdir(parents=True)
    for d in (R / "home/bird", stuff, stuff / "mnt"):
        os.chown(d, BIRD, USERS_GID)
    (stuff / "own.txt").write_text("bird's\n")
    subprocess.run(["fuse2fs", "-o", "fakeroot,allow_other", str(image), str(stuff / "mnt")], check=True)
    try:
        shutil.copy("/usr/bin/true", stuff / "mnt/rootshell")
        os.chown(stuff / "mnt/rootshell", 0, 0)
        os.chmod(stuff / "mnt/rootshell", 0o4755)
        assert os.stat(stuff / "mnt/rootshell").st_mode & 0o4000
        result = running({"directories": ["/var/log"], "users": {"bird": {"directories": ["stuff"]}}})
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("impermanence: /home/bird/stuff: holds /home/bird/stuff/mnt, "
                                        "another filesystem mounted there (")
        found = [os.path.join(d, n) for d, _, names in os.walk(S) for n in names]
        assert not any(n.endswith("rootshell") for n in found), found
        assert (stuff / "own.txt").read_text() == "bird's\n"
        assert not os.path.ismount(stuff)
    finally:
        subprocess.run(["umount", str(stuff / "mnt")], check=True)


def move_world(R) -> dict:
    """A new kept directory's and a new kept file's data on the running
    system (a tmpfs root): returns their content view."""
    data = R / "var/lib/app"
    (data / "sub").mkdir(parents=True)
    (data / "a.db").write_bytes(b"A" * 70_000 + os.urandom(2_500_000))  # three writes
    os.setxattr(data / "a.db", "trusted.app", b"tag")
    (data / "sub/b.txt").write_text("b\n")
    os.chown(data / "sub", BIRD, USERS_GID)
    os.chown(data / "sub/b.txt", BIRD, USERS_GID)
    os.chmod(data / "sub", 0o700)
    os.symlink("b.txt", data / "sub/link")
    os.mkfifo(data / "fifo")
    (R / "etc").mkdir(exist_ok=True)
    (R / "etc/adjtime").write_text("0.0 0 0.0\n")
    (R / "etc/hostid").write_bytes(b"\x01\x02\x03\x04")
    return {"app": content_view(snapshot(data)), "adjtime": (R / "etc/adjtime").read_bytes()}


FILES = ["/etc/adjtime", {"file": "/etc/hostid", "method": "symlink"}]
MOVE_CONFIG = {"directories": ["/var/log", "/var/lib/app"], "files": FILES}
# Into ext4 storage (a copy), and into storage on the root's own tmpfs
# (renames): the calls that change something on the way.
MOVE_KILLS = [("copy", s) for s in ("write", "fsync", "mkdirat", "renameat", "renameat2", "unlinkat",
                                     "fchown", "fchmod", "fsetxattr", "symlinkat", "mknodat")] + \
             [("rename", s) for s in ("mkdirat", "renameat", "renameat2", "fchown", "fchmod", "fsync")] + \
             [("coarse", s) for s in ("mkdirat", "renameat", "renameat2", "fsync")]
# "coarse": into ext4 with 128-byte inodes, whose times are whole seconds
# (as vfat's are two): a run that finds a move stopped after its rename into
# place compares the originals with storage, where no nanoseconds are kept.


@pytest.mark.parametrize("how,syscall", MOVE_KILLS, ids=[f"{h}-{s}" for h, s in MOVE_KILLS])
def test_killed_at_every_step_of_a_move_then_applied_again(sandbox, running, loop_disk, tmp_path, how,
                                                           syscall):
    # SIGKILL at the k-th call, for every k until a run is no longer
    # killed; then apply again: everything in storage, nothing lost.
    require(shutil.which("strace") is not None, "strace is not installed")
    R = sandbox.root
    if how == "copy":
        S, persistence, others = sandbox.path("/persistent"), MOVE_CONFIG, {}
    elif how == "coarse":
        S, persistence = R / "coarse", {"directories": ["/var/log"]}
        others = {"/coarse": {"directories": ["/var/lib/app"], "files": FILES}}
        disk = loop_disk(unique_label(), mkfs=("mkfs.ext4", "-q", "-F", "-I", "128", "-L"))
        S.mkdir()
        subprocess.run(["mount", disk.device, str(S)], check=True)
    else:
        S, persistence = R / "state", {"directories": ["/var/log"]}
        others = {"/state": {"directories": ["/var/lib/app"], "files": FILES}}
        S.mkdir()
    kills = 0
    for k in range(1, 400):
        want = move_world(R)
        trace = tmp_path / "trace"
        killed = running(persistence, others=others,
                         prefix=("strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}",
                                 "-e", f"inject={syscall}:signal=KILL:when={k}"))
        if "+++ killed by SIGKILL +++" not in trace.read_text():
            assert killed.returncode == 0, killed.stderr
            break
        kills += 1
        again = running(persistence, others=others)
        assert again.returncode == 0, (k, again.stderr)
        assert same_inode(R / "var/lib/app", S / "var/lib/app"), k
        assert same_inode(R / "etc/adjtime", S / "etc/adjtime"), k
        got = content_view(snapshot(S / "var/lib/app"))
        assert {p: v for p, v in got.items() if p != "."} == \
               {p: v for p, v in want["app"].items() if p != "."}, k
        assert os.getxattr(S / "var/lib/app/a.db", "trusted.app") == b"tag"
        assert (S / "etc/adjtime").read_bytes() == want["adjtime"], k
        assert os.readlink(R / "etc/hostid") == f"/{S.relative_to(R)}/etc/hostid", k
        assert (S / "etc/hostid").read_bytes() == b"\x01\x02\x03\x04", k
        assert leftovers(S / "var/lib", S / "etc", R / "var/lib", R / "etc") == [], k
        # Back to before the move, for the next k.
        for target in (R / "var/lib/app", R / "etc/adjtime"):
            subprocess.run(["umount", str(target)], check=True)
        shutil.rmtree(R / "var/lib/app")
        for gone in (R / "etc/adjtime", R / "etc/hostid", S / "etc/adjtime", S / "etc/hostid"):
            os.unlink(gone)
        shutil.rmtree(S / "var/lib/app")
    else:
        pytest.fail("still killed after 400 calls")
    print(f"KILLS {how} {syscall} {kills}")
    assert kills >= 1, f"apply never calls {syscall} while moving"


def test_out_of_space_half_way_then_applied_again(sandbox, running):
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/app"
    data.mkdir(parents=True)
    for i in range(4):
        (data / f"part{i}").write_bytes(os.urandom(3 << 20))
    before = content_view(snapshot(data))
    free = os.statvfs(S).f_bavail * os.statvfs(S).f_frsize
    filler = S / "filler"
    with open(filler, "wb") as f:  # leaves about 6 MiB: room for two parts of four
        f.write(b"\0" * (free - (6 << 20)))
    result = running({"directories": ["/var/log", "/var/lib/app"]})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[0].startswith("impermanence: /var/lib/app")
    assert "No space left on device" in result.stderr
    assert content_view(snapshot(data)) == before
    assert not os.path.ismount(data)
    assert leftovers(S / "var/lib", R / "var/lib") == []
    assert not (S / "var/lib/app").exists() or os.listdir(S / "var/lib/app") == []
    filler.unlink()
    again = running({"directories": ["/var/log", "/var/lib/app"]})
    assert again.returncode == 0, again.stderr
    assert same_inode(data, S / "var/lib/app")
    assert {p: v for p, v in content_view(snapshot(S / "var/lib/app")).items() if p != "."} == \
           {p: v for p, v in before.items() if p != "."}


def test_sparse_files_stay_sparse(sandbox, running):
    # 1 GiB with 4 KiB written, into a 32 MiB storage.
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/vm"
    data.mkdir(parents=True)
    with open(data / "disk.img", "wb") as f:
        f.seek(512 << 20)
        f.write(b"x" * 4096)
        f.truncate(1 << 30)
    result = running({"directories": ["/var/log", "/var/lib/vm"]})
    assert result.returncode == 0, result.stderr
    copy = S / "var/lib/vm/disk.img"
    st = os.stat(copy)
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 <= 64 << 10, st.st_blocks
    with open(copy, "rb") as f:
        f.seek((512 << 20) - 1)
        assert f.read(4098) == b"\0" + b"x" * 4096 + b"\0"


def posix_acl(*entries) -> bytes:
    """system.posix_acl_access as the kernel stores it: version 2, then
    (tag, permissions, id) for each entry."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_file_capabilities_and_acls_survive_the_move(sandbox, running):
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "opt/tools"
    data.mkdir(parents=True)
    shutil.copy("/usr/bin/true", data / "ping")
    os.chown(data / "ping", BIRD, USERS_GID)
    subprocess.run(["setcap", "cap_net_raw+ep", str(data / "ping")], check=True)
    capability = os.getxattr(data / "ping", "security.capability")
    # user::rw-, user:bird:r--, group::r--, mask::r--, other::---
    acl = posix_acl((1, 6, 0xFFFFFFFF), (2, 4, BIRD), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                    (0x20, 0, 0xFFFFFFFF))
    (data / "notes").write_text("for bird to read\n")
    os.setxattr(data / "notes", "system.posix_acl_access", acl)
    notes_mode = os.stat(data / "notes").st_mode
    result = running({"directories": ["/var/log", "/opt/tools"]})
    assert result.returncode == 0, result.stderr
    copy = S / "opt/tools/ping"
    assert os.getxattr(copy, "security.capability") == capability
    assert "cap_net_raw=ep" in subprocess.run(["getcap", str(copy)], capture_output=True,
                                              text=True).stdout
    st = os.stat(copy)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (BIRD, USERS_GID, 0o755)
    assert os.getxattr(S / "opt/tools/notes", "system.posix_acl_access") == acl
    assert os.stat(S / "opt/tools/notes").st_mode == notes_mode


WRITER = r"""
import os, sys, time
path, kind, pause, stop = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
i = 0
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if kind != "reopen" else None
while not os.path.exists(stop):
    if kind == "idle" and i >= 100:
        time.sleep(0.01)  # the file stays open for writing, unchanged
        continue
    line = b"line %06d\n" % i
    if fd is not None:
        os.write(fd, line)
    else:
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(f, line)
        os.close(f)
    i += 1
    time.sleep(pause)
print(i)
"""

# (how it writes, seconds between lines, runs): one line every 0.5 ms, a
# line every 20 ms (a move may well fit between two); with the fd kept
# open, a line every 0.5 ms, or 100 lines and then none.
# Into storage on the root's own tmpfs (renames), the busy ones again.
WRITERS = [("copy", "reopen", 0.0005, 3), ("copy", "reopen", 0.02, 10), ("copy", "held", 0.0005, 3),
           ("copy", "idle", 0.0005, 3), ("rename", "reopen", 0.0005, 5), ("rename", "held", 0.0005, 3)]


def lines_of(path) -> list:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("how,kind,pause,runs", WRITERS,
                         ids=["reopen-busy", "reopen-slow", "held-busy", "held-idle", "rename-reopen-busy",
                              "rename-held-busy"])
def test_a_live_writer_loses_no_line(sandbox, running, tmp_path, how, kind, pause, runs):
    # A logger that opens, appends and closes, or one that keeps its fd
    # (journald, nginx): either the entry fails and the original stays,
    # or the move completes with every line. Lines written in the moment
    # between the copy's check and the bind are found in the originals put
    # aside (then the entry fails naming them).
    R = sandbox.root
    data, moved = R / "var/lib/app", R / "var/lib/.app.impermanence-moved"
    if how == "copy":
        S, persistence, others = sandbox.path("/persistent"), {"directories": ["/var/log", "/var/lib/app"]}, {}
    else:
        S, persistence = R / "state", {"directories": ["/var/log"]}
        others = {"/state": {"directories": ["/var/lib/app"]}}
        S.mkdir()
    outcomes = []
    for run in range(runs):
        data.mkdir(parents=True)
        (data / "big").write_bytes(os.urandom(4 << 20))  # the copy takes a while
        log = data / "log"
        stop = tmp_path / f"stop{run}"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(log), kind, str(pause), str(stop)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            while len(lines_of(log)) < 100:
                time.sleep(0.01)
            result = running(persistence, others=others)
            time.sleep(0.2)  # writes after the move land where they must too
        finally:
            stop.touch()
            written = int(writer.communicate(timeout=30)[0])
        want = [f"line {i:06d}" for i in range(written)]
        # Storage on the root's own filesystem is warned about first.
        err = "".join(line + "\n" for line in result.stderr.splitlines()
                      if not line.endswith("kept data would live on the root filesystem"))
        if result.returncode == 0:
            outcomes.append("moved")
            assert same_inode(data, S / "var/lib/app")
            assert lines_of(S / "var/lib/app/log") == want
            assert leftovers(S / "var/lib", R / "var/lib") == []
        elif err.startswith("impermanence: /var/lib/.app.impermanence-moved/log: "):
            assert "stop the program that writes it, then put it into" in err
            outcomes.append("put aside")
            assert same_inode(data, S / "var/lib/app")
            got = lines_of(moved / "log") + lines_of(S / "var/lib/app/log")
            assert sorted(set(got)) == want
        else:
            outcomes.append("refused")
            assert err.startswith("impermanence: /var/lib/app/log: "), err
            assert "stop the program that writes it" in err
            if kind == "idle":
                assert "is open for writing (process " in err
            assert not os.path.ismount(data)
            assert lines_of(log) == want
            assert leftovers(S / "var/lib", R / "var/lib") == []
        # Back to before the move, for the next run.
        if mounts_under(data):
            subprocess.run(["umount", str(data)], check=True)
        for d in (data, moved, S / "var/lib/app"):
            shutil.rmtree(d, ignore_errors=True)
    print(f"WRITER {how} {kind} {pause}: {outcomes}")
    if kind != "reopen":  # a writer with the file open: refused, or followed by a rename
        assert set(outcomes) == ({"refused"} if how == "copy" else {"moved"}), "a writer holding the file open is not waited for"


def with_rename_held(running, ready, log, persistence: dict, others: dict | None = None):
    """apply (running) with its first renameat held up 0.5 s by strace; once
    ready() holds, a line is appended to log, in that moment."""
    results: list = []
    apply = threading.Thread(target=lambda: results.append(running(
        persistence, others=others,
        prefix=("strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=renameat",
                "-e", "inject=renameat:delay_enter=500000:when=1"))))
    apply.start()
    deadline = time.monotonic() + 30
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.001)
    with open(log, "a") as f:
        f.write("late\n")
    apply.join()
    return results[0]


def test_a_write_between_the_check_and_the_bind_is_kept_aside(sandbox, running):
    # The rename into place held up for 0.5 s (strace delay); a line is
    # appended to the original in that moment, after the copy was checked.
    # It is not lost: the originals stay put aside, named, and every later
    # run says so until someone merges them.
    require(shutil.which("strace") is not None, "strace is not installed")
    R, S = sandbox.root, sandbox.path("/persistent")
    data, moved = R / "var/lib/app", R / "var/lib/.app.impermanence-moved"
    data.mkdir(parents=True)
    (data / "other").write_text("unchanged\n")
    (data / "log").write_text("early\n")
    result = with_rename_held(running, lambda: moved.exists(), data / "log",
                              {"directories": ["/var/log", "/var/lib/app"]})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "impermanence: /var/lib/.app.impermanence-moved/log: was written after its move into "
        "storage began: kept here with those writes; stop the program that writes it, then put it into "
        "/persistent/var/lib/app by hand"]
    assert same_inode(data, S / "var/lib/app")
    assert (moved / "log").read_text() == "early\nlate\n"
    assert (S / "var/lib/app/log").read_text() == "early\n"
    again = running({"directories": ["/var/log", "/var/lib/app"]})
    assert again.returncode == 1 and again.stderr == result.stderr
    assert (moved / "log").read_text() == "early\nlate\n"
    assert (moved / "other").read_text() == "unchanged\n"


def test_no_mode_is_set_by_name_without_following_links(sandbox, disk, running, tmp_path):
    # glibc before 2.32 (Debian 11) has no fchmodat(AT_SYMLINK_NOFOLLOW):
    # there Python's os.chmod(..., dir_fd=, follow_symlinks=False) raises
    # ValueError. The script, run in a child chrooted into the running
    # system with os.chmod failing so, moves every kind of node all the same.
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/app"
    (data / "sub").mkdir(parents=True)
    (data / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(data / "tool", 0o4755)
    os.chmod(data / "sub", 0o750)
    os.symlink("tool", data / "link")
    os.mkfifo(data / "fifo", 0o640)
    os.mknod(data / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    before = content_view(snapshot(data))
    config = base_config(disk.label, {"directories": ["/var/log", "/var/lib/app"]})
    (R / INSIDE.lstrip("/") / "config.json").write_text(json.dumps(config))
    errors = tmp_path / "stderr"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            import impermanence_boot as ib

            real_chmod = os.chmod

            def old_glibc_chmod(path, mode, *, dir_fd=None, follow_symlinks=True):
                if not follow_symlinks:
                    if dir_fd is not None:
                        raise ValueError("chmod: cannot use dir_fd and follow_symlinks together")
                    raise NotImplementedError("chmod: follow_symlinks unavailable on this platform")
                return real_chmod(path, mode, dir_fd=dir_fd)

            os.chmod = old_glibc_chmod
            os.dup2(os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
            os.environ.update(IMPERMANENCE_NO_KMSG="1", LIBMOUNT_UTAB=f"{INSIDE}/utab")
            os.chroot(R)
            os.chdir("/")
            code = ib.main(["--config", f"{INSIDE}/config.json", "apply"])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, errors.read_text()
    assert errors.read_text() == ""
    assert same_inode(data, S / "var/lib/app")
    assert {p: v for p, v in content_view(snapshot(S / "var/lib/app")).items() if p != "."} == \
           {p: v for p, v in before.items() if p != "."}


@pytest.mark.parametrize("planted", ["aside", "temp-link", "temp-dir"])
def test_names_like_the_moves_planted_by_a_user(sandbox, running, planted):
    # bird owns ~ on the root and ~ in storage: a directory named like the
    # originals put aside is not taken for apply's (the entry fails,
    # nothing is done); a link or directory named like the temporary is
    # removed as a leftover copy, never followed, and the move is made.
    R, S = sandbox.root, sandbox.path("/persistent")
    home, stored = R / "home/bird", S / "home/bird"
    (home / "stuff").mkdir(parents=True)
    stored.mkdir(parents=True)
    for d in (home, home / "stuff", stored):
        os.chown(d, BIRD, USERS_GID)
    (home / "stuff/own.txt").write_text("bird's\n")
    os.chown(home / "stuff/own.txt", BIRD, USERS_GID)
    (S / "etc").mkdir(exist_ok=True)
    (S / "etc/decoy").write_text("root's\n")
    if planted == "aside":
        (home / ".stuff.impermanence-moved").mkdir()
        os.chown(home / ".stuff.impermanence-moved", BIRD, USERS_GID)
    elif planted == "temp-link":
        os.symlink("/etc", stored / ".stuff.impermanence-move")
    else:
        (stored / ".stuff.impermanence-move").mkdir()
        os.link(S / "etc/decoy", stored / ".stuff.impermanence-move/decoy")
    result = running({"directories": ["/var/log"], "users": {"bird": {"directories": ["stuff"]}}})
    assert (S / "etc/decoy").read_text() == "root's\n"
    if planted == "aside":
        assert result.returncode == 1
        assert result.stderr == ("impermanence: /home/bird/.stuff.impermanence-moved: is named as apply "
                                 "names a move's originals but is not apply's; left as it is\n")
        assert not os.path.ismount(home / "stuff")
        assert (home / "stuff/own.txt").read_text() == "bird's\n"
        assert os.listdir(stored / "stuff") == []
    else:
        assert result.returncode == 0, result.stderr
        assert same_inode(home / "stuff", stored / "stuff")
        assert (stored / "stuff/own.txt").read_text() == "bird's\n"
        assert os.stat(stored / "stuff/own.txt").st_uid == BIRD
        assert leftovers(stored, home) == []
        assert os.path.isdir(S / "etc") and os.stat(S / "etc/decoy").st_nlink == 1


def test_a_move_undone_half_way_is_made_again(sandbox, running):
    # A move that failed removes its `.NAME.impermanence-moved`, then its
    # temporary; killed in between, it leaves the first without the
    # second, nothing in storage: not a move to finish (binding the empty
    # source would hide the data), but one to make.
    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/app"
    data.mkdir(parents=True)
    (data / "state").write_text("kept\n")
    (R / "var/lib/.app.impermanence-moved").mkdir(mode=0o700)
    result = running({"directories": ["/var/log", "/var/lib/app"]})
    assert result.returncode == 0, result.stderr
    assert same_inode(data, S / "var/lib/app")
    assert (S / "var/lib/app/state").read_text() == "kept\n"
    assert leftovers(S / "var/lib", R / "var/lib") == []


def test_a_file_made_between_the_renames_and_the_bind_is_kept_aside(sandbox, running):
    # Storage on the root's own filesystem: the children are renamed away,
    # then the rename of the temporary onto the source is held up 0.5 s
    # (strace delay), and a program makes its log anew in the target
    # meanwhile. The bind would hide it: it is put aside and named instead.
    require(shutil.which("strace") is not None, "strace is not installed")
    R = sandbox.root
    S = R / "state"
    S.mkdir()
    data, moved = R / "var/lib/app", R / "var/lib/.app.impermanence-moved"
    data.mkdir(parents=True)
    (data / "log").write_text("early\n")
    result = with_rename_held(running, lambda: not (data / "log").exists(), data / "log",
                              {"directories": ["/var/log"]},
                              others={"/state": {"directories": ["/var/lib/app"]}})
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "impermanence: /var/lib/.app.impermanence-moved/log: was written after its move into storage "
        "began: kept here with those writes; stop the program that writes it, then put it into "
        "/state/var/lib/app by hand")
    assert (moved / "log").read_text() == "late\n"
    assert (S / "var/lib/app/log").read_text() == "early\n"
    assert (data / "log").read_text() == "early\n"  # through the bind


def test_a_write_during_the_copy_is_found_before_the_rename(sandbox, running, disk, capfd):
    # A line appended to a file after the copy read it, by a program that
    # no longer holds it open (open, append, close), made exactly in that
    # moment: apply runs in a child of this process, chrooted into R, with
    # the step right after the copy wrapped. The copy is dropped before it
    # is renamed into place; the original stays, complete, and is named.
    import impermanence_boot as ib

    R, S = sandbox.root, sandbox.path("/persistent")
    data = R / "var/lib/app"
    data.mkdir(parents=True)
    (data / "state").write_text("one\n")
    (data / "other").write_text("unchanged\n")
    cfg = base_config(disk.label, {"directories": ["/var/log", "/var/lib/app"]})
    (R / INSIDE.lstrip("/") / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        try:
            real = ib.open_for_writing

            def open_for_writing(paths):
                with open("/var/lib/app/state", "a") as f:
                    f.write("two\n")
                return real(paths)

            ib.open_for_writing = open_for_writing
            os.chroot(R)
            os.chdir("/")
            os.environ.update(IMPERMANENCE_NO_KMSG="1", LIBMOUNT_UTAB=f"{INSIDE}/utab")
            status = ib.main(["--config", f"{INSIDE}/config.json", "apply"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wstatus = os.waitpid(pid, 0)
    err = capfd.readouterr().err
    assert os.waitstatus_to_exitcode(wstatus) == 1, err
    assert err == ("impermanence: /var/lib/app/state: was written while it was being moved into "
                   f"storage; {ib.WRITER_HINT}\n"), err
    assert (data / "state").read_text() == "one\ntwo\n"
    assert (data / "other").read_text() == "unchanged\n"
    assert not os.path.ismount(data)
    assert not (S / "var/lib/app").exists() or not any((S / "var/lib/app").iterdir())
    assert leftovers(S / "var/lib", R / "var/lib") == []
