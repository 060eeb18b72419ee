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
import subprocess

import pytest

from support import BIRD, SCRIPT, USERS_GID, base_config, distro_python, require, same_inode

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

    def run(persistence: dict, *args: str, others: dict | None = None):
        """apply, inside, of the boot's config with this /persistent
        location (and other locations)."""
        config = base_config(disk.label, persistence)
        config["persistence"].update(others or {})
        (R / INSIDE.lstrip("/") / "config.json").write_text(json.dumps(config))
        return subprocess.run([shutil.which("chroot"), str(R), python, "-I", f"{INSIDE}/impermanence_boot.py",
                               "--config", f"{INSIDE}/config.json", *args, "apply"],
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
