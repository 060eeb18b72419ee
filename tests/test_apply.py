"""apply, plan, status and unmount against real mounts: a tmpfs root and an
ext4 loop device as persistent storage, inside a private mount namespace."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SCRIPT, mounted, require
from reliability_support import mountinfo_points, owner_mode, tree_digest

BIRD = 1000
USERS_GID = 100


def unique_label() -> str:
    return "p" + secrets.token_hex(6)


@pytest.fixture
def disk(loop_disk):
    return loop_disk(unique_label())


def base_config(label: str, persistence: dict, **extra) -> dict:
    cfg = {
        "fileSystems": {"/persistent": {"device": f"LABEL={label}", "fsType": "auto",
                                        "options": ["noatime"]}},
        "deviceTimeout": 5,
        "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
        "groups": {"users": {"gid": USERS_GID}},
        "persistence": {"/persistent": persistence},
    }
    cfg.update(extra)
    return cfg


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def mounts_under(root: Path) -> list:
    prefix = str(root)
    return sorted(p for p in mountinfo_points() if p == prefix or p.startswith(prefix + "/"))


def mountinfo_under(root: Path) -> list:
    """Mount lines below root without the per-mount ids, for comparisons."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4].startswith(str(root)):
                rows.append((fields[3], fields[4]))
    return sorted(rows)


def populate(disk, files: dict, dirs: dict | None = None) -> None:
    """Write into the storage filesystem before the 'boot'."""
    with mounted(disk.device, Path(f"/tmp/populate-{disk.label}")) as mnt:
        for rel, (uid, gid, mode) in (dirs or {}).items():
            p = mnt / rel
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, uid, gid)
            os.chmod(p, mode)
        for rel, content in files.items():
            p = mnt / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)


MAIN = {
    "directories": [
        "/var/log",
        {"directory": "/etc/nixos", "user": "bird", "group": "users", "mode": "0700"},
        {"directory": "/var/lib/colord", "user": "colord", "group": "colord", "mode": "u=rwx,g=rx,o="},
    ],
    "files": [
        "/etc/machine-id",
        {"file": "/etc/ssh/ssh_host_ed25519_key.pub", "method": "symlink"},
        {"file": "/etc/nix/id_rsa", "parentDirectory": {"mode": "u=rwx,g=,o="}},
        "/etc/adjtime",
    ],
    "users": {"bird": {
        "directories": ["Downloads", {"directory": ".ssh", "mode": "0700"}, ".local/share/fish"],
        "files": [".bash_history"],
    }},
}


def main_config(label: str) -> dict:
    return base_config(label, MAIN,
                       users={"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"},
                              "colord": {"uid": 998, "group": "colord"}},
                       groups={"users": {"gid": USERS_GID}, "colord": {"gid": 997}})


# --- the main scenario: SPEC section 4 -------------------------------------------

def test_apply_main_scenario(sandbox, disk):
    populate(disk, {"etc/adjtime": b"0.0 0 0.0\n0\nUTC\n"})
    result = sandbox.run("apply", config=main_config(disk.label))
    assert result.returncode == 0, result.stderr
    R, S = sandbox.root, sandbox.path("/persistent")

    # storage mounted by LABEL= (no udev here: found by reading superblocks)
    assert str(S) in mounts_under(R)
    # directories: sources created with the item's owner and mode, bound
    assert owner_mode(S / "var/log") == (0, 0, 0o755)
    assert owner_mode(S / "etc/nixos") == (BIRD, USERS_GID, 0o700)
    assert owner_mode(S / "var/lib/colord") == (998, 997, 0o750)
    for d in ("var/log", "etc/nixos", "var/lib/colord", "home/bird/Downloads", "home/bird/.ssh",
              "home/bird/.local/share/fish"):
        assert same_inode(R / d, S / d), d
        assert str(R / d) in mounts_under(R)
    # storage parents: root-owned outside homes; inside the home, the user's
    assert owner_mode(S / "var/lib") == (0, 0, 0o755)
    assert owner_mode(S / "home") == (0, 0, 0o755)
    assert owner_mode(S / "home/bird") == (BIRD, USERS_GID, 0o700)
    assert owner_mode(S / "home/bird/.local") == (BIRD, USERS_GID, 0o755)
    assert owner_mode(S / "home/bird/.local/share") == (BIRD, USERS_GID, 0o755)
    assert owner_mode(S / "home/bird/.ssh") == (BIRD, USERS_GID, 0o700)
    assert owner_mode(S / "home/bird/Downloads") == (BIRD, USERS_GID, 0o755)
    # root-side parents mirror storage: ~/.local belongs to the user (SPEC 5)
    for d in ("home", "home/bird", "home/bird/.local", "home/bird/.local/share", "var", "var/lib",
              "etc", "etc/nix", "etc/ssh"):
        assert owner_mode(R / d) == owner_mode(S / d), d
    # parentDirectory sets the file's immediate parent
    assert owner_mode(S / "etc/nix") == (0, 0, 0o700)
    # files: existing source -> bind mount on an empty file
    assert same_inode(R / "etc/adjtime", S / "etc/adjtime")
    assert (R / "etc/adjtime").read_bytes() == b"0.0 0 0.0\n0\nUTC\n"
    # missing source -> link to where the booted system sees the source
    assert os.readlink(R / "etc/nix/id_rsa") == "/persistent/etc/nix/id_rsa"
    assert os.readlink(R / "home/bird/.bash_history") == "/persistent/home/bird/.bash_history"
    # method symlink: always a link
    assert os.readlink(R / "etc/ssh/ssh_host_ed25519_key.pub") == "/persistent/etc/ssh/ssh_host_ed25519_key.pub"
    # machine-id: source created 'uninitialized', then bound
    assert (S / "etc/machine-id").read_bytes() == b"uninitialized\n"
    assert same_inode(R / "etc/machine-id", S / "etc/machine-id")
    # the root and the storage mount point are never chowned or chmodded
    assert owner_mode(R) == (0, 0, 0o755)
    assert owner_mode(S) == (0, 0, 0o755)


def test_apply_is_idempotent(sandbox, disk):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    first_mounts = mountinfo_under(sandbox.root)
    first_tree = tree_digest(sandbox.root)
    second = sandbox.run("-v", "apply")
    assert second.returncode == 0, second.stderr
    assert mountinfo_under(sandbox.root) == first_mounts  # no stacked mounts
    assert tree_digest(sandbox.root) == first_tree        # no duplicate links
    # nothing but the summary was logged: no action was taken
    actions = [l for l in second.stderr.splitlines()
               if "apply:" not in l and "already a mount point; used as it is" not in l]
    assert actions == []
    plan = sandbox.run("plan")
    assert plan.stdout.strip() == "nothing to do: everything is in place"


def test_plan_prints_actions_and_changes_nothing(sandbox, disk):
    cfg = main_config(disk.label)
    result = sandbox.run("plan", config=cfg)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"mkdir {sandbox.path('/persistent')} (0:0 0755, mount point)"
    assert lines[1].startswith(f"mount LABEL={disk.label} (")
    assert f"bind {sandbox.path('/persistent/var/log')} on {sandbox.path('/var/log')}" in lines
    assert f"link {sandbox.path('/etc/nix/id_rsa')} -> /persistent/etc/nix/id_rsa" in lines
    assert any(l.startswith(f"mkdir {sandbox.path('/home/bird/.local')} (1000:100 0755") for l in lines)
    # order: a directory is created before its child, a bind after its mkdirs
    assert lines.index(f"mkdir {sandbox.path('/home/bird')} (1000:100 0700, as in storage)") < \
        lines.index(f"mkdir {sandbox.path('/home/bird/.local')} (1000:100 0755, as in storage)")
    assert os.listdir(sandbox.root) == []
    assert mounts_under(sandbox.root) == [str(sandbox.root)]
    # after apply, the plan that was printed is what was done: plan is now empty
    assert sandbox.run("apply").returncode == 0
    assert sandbox.run("plan").stdout.strip() == "nothing to do: everything is in place"


def apply_actions(result) -> list:
    """apply -v's lines as plan writes them: without the prefix and the
    closing summary, with 'mounted' as plan's 'mount' line is not."""
    return [l.removeprefix("impermanence: ") for l in result.stderr.splitlines()
            if not l.startswith(("impermanence: apply: ", "impermanence: mounted "))]


@pytest.mark.parametrize("case", ["failed-entry", "storage-path-in-unmounted-fs"])
def test_plan_lists_what_apply_does(sandbox, disk, case):
    # A failed entry plans its storage parents, which apply never makes:
    # the next entry makes them, and plan says so. A storage path inside a
    # fileSystems entry not mounted yet is made once it is mounted.
    if case == "failed-entry":
        cfg = base_config(disk.label, {"directories": [{"directory": "/srv/a/x", "user": "ghost"},
                                                       "/srv/a/y"]})
    else:
        cfg = base_config(disk.label, {})
        cfg["persistence"] = {"/persistent/system/one": {"directories": ["/var/log"]}}
    plan = sandbox.run("plan", config=cfg)
    assert plan.returncode == 0, plan.stderr
    planned = [l for l in plan.stdout.splitlines() if not l.startswith("mount ")]
    result = sandbox.run("-v", "apply")
    assert result.returncode == (1 if case == "failed-entry" else 0), result.stderr
    assert planned == [re.sub(r"^(user ghost: .*)", r"fail \1", l) for l in apply_actions(result)]


def test_second_boot_keeps_data_and_wipes_the_rest(sandbox, disk):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    (sandbox.path("/var/log/kept.log")).write_text("kept\n")
    # the booted system writes through the link (absolute: resolved in storage)
    assert os.readlink(sandbox.path("/home/bird/.bash_history")) == "/persistent/home/bird/.bash_history"
    sandbox.path("/persistent/home/bird/.bash_history").write_text("ls\n")
    (sandbox.path("/etc/unkept")).write_text("gone\n")
    # "reboot": a fresh tmpfs root, the same disk
    subprocess.run(["umount", "-R", str(sandbox.root)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh", str(sandbox.root)], check=True)
    result = sandbox.run("apply")
    assert result.returncode == 0, result.stderr
    assert sandbox.path("/var/log/kept.log").read_text() == "kept\n"
    assert not sandbox.path("/etc/unkept").exists()
    # the file now exists in storage: bound this time, not linked
    history = sandbox.path("/home/bird/.bash_history")
    assert not history.is_symlink()
    assert history.read_text() == "ls\n"
    assert same_inode(history, sandbox.path("/persistent/home/bird/.bash_history"))


def test_nested_entries_across_storages_are_not_hidden(sandbox, loop_disk):
    a, b = loop_disk(unique_label()), loop_disk(unique_label())
    cfg = {
        "fileSystems": {"/persistent": {"device": f"LABEL={a.label}"},
                        "/cache": {"device": b.device, "fsType": "ext4"}},
        "persistence": {"/persistent": {"directories": ["/var/lib"]},
                        "/cache": {"directories": ["/var/lib/cache", "/var/lib/cache/deep"]}},
    }
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    # the child is mounted after (on top of) its parent: visible, from /cache
    assert same_inode(sandbox.path("/var/lib"), sandbox.path("/persistent/var/lib"))
    assert same_inode(sandbox.path("/var/lib/cache"), sandbox.path("/cache/var/lib/cache"))
    sandbox.path("/var/lib/cache/x").write_text("1")
    assert sandbox.path("/cache/var/lib/cache/x").read_text() == "1"
    assert same_inode(sandbox.path("/var/lib/cache/deep"), sandbox.path("/cache/var/lib/cache/deep"))
    order = [p for p in mountinfo_points() if p.startswith(str(sandbox.root))]
    assert order.index(str(sandbox.path("/var/lib"))) < order.index(str(sandbox.path("/var/lib/cache")))


def test_existing_directories_keep_owner_and_mode(sandbox, disk):
    populate(disk, {}, dirs={"var/log": (5, 6, 0o711), "home/bird": (BIRD, USERS_GID, 0o750)})
    cfg = base_config(disk.label, {"directories": [{"directory": "/var/log", "user": "bird", "mode": "0700"}],
                                   "users": {"bird": {"directories": ["Music"]}}})
    assert sandbox.run("apply", config=cfg).returncode == 0
    S = sandbox.path("/persistent")
    assert owner_mode(S / "var/log") == (5, 6, 0o711)
    assert owner_mode(S / "home/bird") == (BIRD, USERS_GID, 0o750)
    assert owner_mode(sandbox.path("/home/bird")) == (BIRD, USERS_GID, 0o750)


def test_storage_mount_point_and_root_never_chowned(sandbox, disk):
    # A storage root with an unusual mode stays as it is; the root too.
    populate(disk, {}, dirs={".": (0, 0, 0o711)})
    os.chmod(sandbox.root, 0o751)
    cfg = base_config(disk.label, {"users": {"bird": {"directories": ["x"]}}},
                      users={"bird": {"uid": BIRD, "group": "users", "home": "/"}})
    # a home of "/" would make the root the user's home: refused as config
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 2
    cfg["users"]["bird"]["home"] = "/home/bird"
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert owner_mode(sandbox.root) == (0, 0, 0o751)
    assert owner_mode(sandbox.path("/persistent")) == (0, 0, 0o711)


# --- files --------------------------------------------------------------------------

def test_empty_target_is_replaced_nonempty_is_kept(sandbox, disk):
    populate(disk, {"etc/machine-id": b"0123456789abcdef0123456789abcdef\n", "etc/kept": b"from storage\n"})
    R = sandbox.root
    (R / "etc").mkdir()
    (R / "etc/machine-id").write_bytes(b"")        # SPEC 5: pre-existing empty machine-id
    (R / "etc/kept").write_bytes(b"local data\n")  # non-empty: must not be overwritten
    (R / "etc/linked").write_bytes(b"")             # empty: replaced by the link
    cfg = base_config(disk.label, {"files": ["/etc/machine-id", "/etc/kept", "/etc/linked"],
                                   "directories": ["/var/log"]})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert f"impermanence: {R}/etc/kept: target exists and is not empty; not overwritten" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (R / "etc/kept").read_bytes() == b"local data\n"
    assert sandbox.path("/persistent/etc/kept").read_bytes() == b"from storage\n"
    assert same_inode(R / "etc/machine-id", sandbox.path("/persistent/etc/machine-id"))
    assert (R / "etc/machine-id").read_bytes() == b"0123456789abcdef0123456789abcdef\n"
    assert os.readlink(R / "etc/linked") == "/persistent/etc/linked"
    assert same_inode(R / "var/log", sandbox.path("/persistent/var/log"))  # the others applied


def test_machine_id_without_source(sandbox, disk):
    R = sandbox.root
    (R / "etc").mkdir()
    (R / "etc/machine-id").write_bytes(b"")
    cfg = base_config(disk.label, {"files": ["/etc/machine-id"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    source = sandbox.path("/persistent/etc/machine-id")
    assert source.read_bytes() == b"uninitialized\n"
    assert owner_mode(source) == (0, 0, 0o444)
    assert same_inode(R / "etc/machine-id", source)
    assert str(R / "etc/machine-id") in mounts_under(R)


def test_symlink_method_even_when_source_exists(sandbox, disk):
    populate(disk, {"etc/ssh/key.pub": b"ssh-ed25519 AAAA\n"})
    cfg = base_config(disk.label, {"files": [{"file": "/etc/ssh/key.pub", "method": "symlink"}]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    link = sandbox.path("/etc/ssh/key.pub")
    assert os.readlink(link) == "/persistent/etc/ssh/key.pub"
    assert str(link) not in mounts_under(sandbox.root)


def test_file_source_that_is_a_directory_fails_that_entry(sandbox, disk):
    populate(disk, {}, dirs={"etc/odd": (0, 0, 0o755)})
    cfg = base_config(disk.label, {"files": ["/etc/odd"], "directories": ["/srv"]})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert "etc/odd: source is a directory, not a regular file" in result.stderr
    assert same_inode(sandbox.path("/srv"), sandbox.path("/persistent/srv"))


# --- storage -------------------------------------------------------------------------

def test_device_by_path_and_existing_mount_reused(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["fileSystems"]["/persistent"] = {"device": disk.device, "fsType": "ext4"}
    assert sandbox.run("apply", config=cfg).returncode == 0
    before = mountinfo_under(sandbox.root)
    # a second run finds /persistent already mounted and uses it as it is
    result = sandbox.run("-v", "apply")
    assert result.returncode == 0
    assert "already a mount point; used as it is" in result.stderr
    assert mountinfo_under(sandbox.root) == before


def test_storage_mounted_by_stage1_without_filesystems_entry(sandbox, disk):
    S = sandbox.path("/persistent")
    S.mkdir()
    subprocess.run(["mount", disk.device, str(S)], check=True)
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # a mount point: no warning
    assert same_inode(sandbox.path("/var/log"), S / "var/log")


def test_storage_not_a_mount_point_warns_and_goes_on(sandbox):
    sandbox.path("/persistent").mkdir()
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log"]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0
    assert f"impermanence: {sandbox.path('/persistent')}: not a mount point; kept data would live on the root filesystem" in result.stderr
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/var/log"))


def test_missing_storage_exits_3_and_other_locations_apply(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["persistence"]["/nowhere"] = {"directories": ["/srv"], "files": ["/etc/x"]}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 3
    assert f"impermanence: /nowhere: storage path does not exist" in result.stderr
    assert "2 entries not applied" in result.stderr
    assert not sandbox.path("/srv").exists()
    assert not sandbox.path("/nowhere").exists()  # nothing written to the bare tmpfs
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/var/log"))


def test_device_never_appears_exits_3_within_timeout(sandbox):
    cfg = {"fileSystems": {"/persistent": {"device": f"LABEL={unique_label()}"}},
           "deviceTimeout": 1.5,
           "persistence": {"/persistent": {"directories": ["/var/log"]}}}
    started = time.monotonic()
    result = sandbox.run("apply", config=cfg)
    elapsed = time.monotonic() - started
    assert result.returncode == 3
    assert "device did not appear within 1.5 s" in result.stderr
    assert 1.5 <= elapsed < 10
    assert not sandbox.path("/var/log").exists()


def test_wrong_fstype_exits_3_with_the_kernel_reason(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    cfg["fileSystems"]["/persistent"]["fsType"] = "xfs"
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 3
    line = [l for l in result.stderr.splitlines() if "cannot mount" in l][0]
    assert line.startswith(f"impermanence: {sandbox.path('/persistent')}: cannot mount LABEL={disk.label} ({disk.device}) as xfs:")


def test_storage_path_inside_mounted_filesystem_is_created(sandbox, disk):
    cfg = base_config(disk.label, {})
    cfg["persistence"] = {"/persistent/system": {"directories": ["/var/log"]}}
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/system/var/log"))


# --- accounts ---------------------------------------------------------------------------

def test_names_from_nixos_uid_map_and_root_passwd(sandbox, disk):
    populate(disk, {"var/lib/nixos/uid-map": json.dumps({"colord": 321}).encode(),
                    "var/lib/nixos/gid-map": json.dumps({"colord": 322}).encode()})
    R = sandbox.root
    (R / "etc").mkdir()
    (R / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:2001:2002::/home/alice:/bin/sh\n")
    (R / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    cfg = base_config(disk.label, {
        "directories": [{"directory": "/var/lib/colord", "user": "colord", "group": "colord"},
                        {"directory": "/srv/a", "user": "alice", "group": "staff"}],
        "users": {"alice": {"directories": ["Music"]}}}, users={}, groups={})
    result = sandbox.run("apply", config=cfg, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    # The maps are read with the C scanner, as the config is: the json
    # package (re, enum, ...) would cost every boot that persists
    # /var/lib/nixos several milliseconds.
    imported = [l.rsplit("|", 1)[-1].strip() for l in result.stderr.splitlines() if l.startswith("import time:")]
    assert "_json" in imported and "json" not in imported
    S = sandbox.path("/persistent")
    assert owner_mode(S / "var/lib/colord")[:2] == (321, 322)
    assert owner_mode(S / "srv/a")[:2] == (2001, 50)
    # primary group from the root's passwd
    assert owner_mode(S / "home/alice/Music")[:2] == (2001, 2002)


def tmpfs_at(path: Path, mode: str = "0755") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode={mode}", "store", str(path)], check=True)
    return path


def test_names_resolve_only_from_files_root_alone_can_write(sandbox):
    # A shared data disk (1777): any user can write var/lib/nixos/uid-map
    # there. Read, it would give root's directories (and a service's
    # without a fixed id) to that user. Only maps and /etc files that
    # root alone can have written count, and root is always 0.
    R = sandbox.root
    trusted = tmpfs_at(R / "persistent")
    shared = tmpfs_at(R / "data", "1777")
    (trusted / "var/lib/nixos").mkdir(parents=True)
    (trusted / "var/lib/nixos/uid-map").write_text('{"svc": 321}')
    (trusted / "var/lib/nixos/gid-map").write_text('{"svc": 322}')
    # What user 4242 can make there: its own directories and files.
    forged = json.dumps({"root": 4242, "svc": 4242, "mallory": 4242})
    for d in ("var", "var/lib", "var/lib/nixos"):
        (shared / d).mkdir()
        os.chown(shared / d, 4242, 4242)
    for name in ("uid-map", "gid-map"):
        (shared / "var/lib/nixos" / name).write_text(forged)
        os.chown(shared / "var/lib/nixos" / name, 4242, 4242)
    # in root's storage, but a file its owner could rewrite: not read either
    (R / "persist3").mkdir()
    tmpfs_at(R / "persist3")
    (R / "persist3/var/lib/nixos").mkdir(parents=True)
    (R / "persist3/var/lib/nixos/uid-map").write_text('{"mallory": 4242}')
    (R / "persist3/var/lib/nixos/gid-map").write_text('{"mallory": 4242}')
    os.chown(R / "persist3/var/lib/nixos/uid-map", 4242, 4242)
    os.chmod(R / "persist3/var/lib/nixos/gid-map", 0o666)
    cfg = {"users": {"alice": {"uid": BIRD, "group": "users"}}, "groups": {"users": {"gid": USERS_GID}},
           "persistence": {
               "/persistent": {"directories": ["/var/log", {"directory": "/var/lib/svc", "user": "svc",
                                                            "group": "svc"}],
                               "files": ["/etc/machine-id"]},
               "/data": {"users": {"alice": {"directories": ["Videos"]}}},
               "/persist3": {"directories": [{"directory": "/srv/m", "user": "mallory", "group": "mallory"}]}}}
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert "user mallory: unknown user" in line and str(R / "srv/m") in line, line
    for d in ("etc", "var", "var/log", "home", "persistent/etc", "persistent/var/log", "data/home"):
        assert owner_mode(R / d)[:2] == (0, 0), d
    assert owner_mode(R / "persistent/var/lib/svc")[:2] == (321, 322)
    assert owner_mode(R / "data/home/alice/Videos")[:2] == (BIRD, USERS_GID)


def test_a_name_dot_or_dot_dot_is_refused(sandbox):
    for name in (".", ".."):
        cfg = {"users": {name: {"uid": BIRD}},
               "persistence": {"/persistent": {"users": {name: {"directories": ["persistent"]}}}}}
        result = sandbox.run("check", config=cfg)
        assert result.returncode == 2, result.stdout
        assert f"is not a valid user or group name" in result.stderr, result.stderr


def test_output_escapes_what_a_planted_link_says(sandbox):
    # A user's link text reaches plan, status and apply's messages: line
    # breaks, terminal escapes and bytes that are not UTF-8 come out
    # escaped, one line per entry, even on a strict UTF-8 stdout.
    R = sandbox.root
    store = tmpfs_at(R / "persistent")
    home = store / "home/alice"
    home.mkdir(parents=True)
    os.chown(home, BIRD, USERS_GID)
    text = b"/x\nimpermanence: FORGED\nok directory /etc\x1b[2K\x9b1G\xff"
    os.symlink(text, bytes(home / "Downloads"))
    cfg = {"users": {"alice": {"uid": BIRD, "group": "users"}}, "groups": {"users": {"gid": USERS_GID}},
           "persistence": {"/persistent": {"directories": ["/var/log"],
                                          "users": {"alice": {"directories": ["Downloads"]}}}}}
    strict = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    escaped = "/x\\x0aimpermanence: FORGED\\x0aok directory /etc\\x1b[2K\\x9b1G\\xff"
    plan = sandbox.run("plan", config=cfg, env=strict)
    assert plan.returncode == 0, plan.stderr
    assert "FORGED" in plan.stdout and not any(l.startswith("impermanence: FORGED") for l in plan.stdout.splitlines())
    assert escaped in plan.stdout, plan.stdout
    assert "\x1b" not in plan.stdout and "\x9b" not in plan.stdout
    result = sandbox.run("apply", env=strict)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert escaped in line, line
    status = sandbox.run("status", env=strict)
    assert status.returncode == 1, status.stderr
    assert status.stderr == ""
    lines = status.stdout.splitlines()
    assert len(lines) == 1 + 2 + 1, status.stdout  # storage, two entries, the summary
    assert escaped in status.stdout


def test_mounting_loads_only_the_c_half_of_ctypes(sandbox, disk):
    # mount(2) for the fileSystems, open_tree/move_mount for the binds,
    # renameat2 for a user-owned directory: all bound through _ctypes. The
    # ctypes package would add ctypes, types, struct, _struct, ctypes._endian to
    # every initramfs and their loading to every boot.
    cfg = base_config(disk.label, {"directories": [{"directory": "/srv/a", "user": "bird"}],
                                   "files": ["/etc/hostname"]})
    populate(disk, {"etc/hostname": b"h\n"})
    result = sandbox.run("apply", config=cfg, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    imported = [l.rsplit("|", 1)[-1].strip() for l in result.stderr.splitlines() if l.startswith("import time:")]
    assert "_ctypes" in imported
    assert not {"ctypes", "ctypes._endian", "struct"} & set(imported), imported
    assert same_inode(sandbox.path("/srv/a"), sandbox.path("/persistent/srv/a"))
    assert owner_mode(sandbox.path("/persistent/srv/a"))[0] == BIRD
    assert same_inode(sandbox.path("/etc/hostname"), sandbox.path("/persistent/etc/hostname"))


def test_unknown_user_fails_that_entry_with_a_fix(sandbox, disk):
    cfg = base_config(disk.label, {"directories": [{"directory": "/var/lib/ghost", "user": "ghost-user"},
                                                   "/var/log"]})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    (line,) = [l for l in result.stderr.splitlines() if "ghost-user" in l]
    assert line.startswith("impermanence: user ghost-user: unknown user")
    assert '"users": {"ghost-user": {"uid": N}}' in line
    assert not sandbox.path("/persistent/var/lib/ghost").exists()
    assert same_inode(sandbox.path("/var/log"), sandbox.path("/persistent/var/log"))


# --- safety --------------------------------------------------------------------------------

def test_symlink_planted_in_storage_is_not_followed(sandbox, disk):
    # bird owns ~/.local in storage and replaces ~/.local/share with a link to /etc.
    populate(disk, {}, dirs={"home/bird": (BIRD, USERS_GID, 0o700),
                             "home/bird/.local": (BIRD, USERS_GID, 0o755)})
    with mounted(disk.device, Path("/tmp/plant-" + disk.label)) as mnt:
        os.symlink("/etc", mnt / "home/bird/.local/share")
    etc_before = owner_mode(Path("/etc"))
    cfg = base_config(disk.label, {"users": {"bird": {"directories": [".local/share/evil", "Music"]}}})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert (f"impermanence: {sandbox.path('/persistent/home/bird/.local/share')}: is a symbolic link "
            "to /etc, not a directory") in result.stderr
    assert owner_mode(Path("/etc")) == etc_before
    assert not Path("/etc/evil").exists()
    assert same_inode(sandbox.path("/home/bird/Music"), sandbox.path("/persistent/home/bird/Music"))


# --- status and unmount ----------------------------------------------------------------------

def status_json(sandbox) -> dict:
    result = sandbox.run("status", "--json")
    data = json.loads(result.stdout)
    return result.returncode, {e["target"]: e for e in data["entries"]}, data


def test_status_reports_each_kind_of_drift(sandbox, disk, tmp_path):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    code, entries, data = status_json(sandbox)
    assert code == 0, entries
    assert {e["state"] for e in entries.values()} == {"ok"}
    assert data["storage"][0]["state"] == "mounted"
    R, S = sandbox.root, sandbox.path("/persistent")
    subprocess.run(["umount", str(R / "var/log")], check=True)                  # not mounted
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(other), str(R / "home/bird/Downloads")], check=True)  # wrong
    os.chown(S / "etc/nixos", 0, 0)                                              # owner drift
    os.chmod(S / "home/bird/.ssh", 0o755)                                        # mode drift
    os.unlink(R / "etc/ssh/ssh_host_ed25519_key.pub")                            # link gone
    code, entries, data = status_json(sandbox)
    assert code == 1
    assert entries["/var/log"]["state"] == "not-mounted"
    assert entries["/home/bird/Downloads"]["state"] == "wrong-source"
    assert entries["/etc/nixos"]["state"] == "owner-differs"
    assert entries["/home/bird/.ssh"]["state"] == "mode-differs"
    assert entries["/etc/ssh/ssh_host_ed25519_key.pub"]["state"] == "not-linked"
    assert entries["/etc/machine-id"]["state"] == "ok"
    text = sandbox.run("status")
    assert text.returncode == 1
    assert any(l.startswith("not-mounted") and "/var/log" in l for l in text.stdout.splitlines())


def run_traced(sandbox, syscalls: str, *args: str) -> tuple:
    """The script run with its config under strace -e trace=syscalls:
    (the result, the trace)."""
    require(shutil.which("strace") is not None, "strace is not installed")
    trace = sandbox.work / "trace"
    result = subprocess.run(["strace", "-f", "-qq", "-e", f"trace={syscalls}", "-o", str(trace),
                             sys.executable, str(SCRIPT), "--root", str(sandbox.root),
                             "--config", str(sandbox.config_path), *args],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))
    return result, trace.read_text()


def test_status_reads_mountinfo_once(sandbox, disk):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    _, calls = run_traced(sandbox, "open,openat", "status")
    opens = [l for l in calls.splitlines() if "/proc/self/mountinfo" in l]
    assert len(opens) == 1, opens


def test_nested_entry_added_under_a_directory_an_earlier_run_mounted(sandbox, disk):
    # The outer directory is already in place, so this run makes no bind
    # for it; the nested one must still be seen through that mount (its
    # target is its own source), not made a second time on the root side.
    first = base_config(disk.label, {"directories": ["/srv/data"]})
    assert sandbox.run("apply", config=first).returncode == 0
    both = base_config(disk.label, {"directories": ["/srv/data", "/srv/data/inner"]})
    result = sandbox.run("apply", config=both)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    inner = sandbox.path("/persistent/srv/data/inner")
    assert inner.is_dir()
    assert same_inode(sandbox.path("/srv/data/inner"), inner)
    # And again, after the nested source was removed by hand.
    inner.rmdir()
    result = sandbox.run("apply", config=both)
    assert result.returncode == 0, result.stderr
    assert inner.is_dir() and same_inode(sandbox.path("/srv/data/inner"), inner)
    assert sandbox.run("status", config=both).returncode == 0


def test_directories_mkdir_cannot_finish_are_made_with_mode_0000_first(sandbox, disk):
    # A kill between mkdir and chown must not leave a root-owned directory
    # the next run keeps: a directory that needs a chown or chmod after
    # mkdir is made with mode 0000, which the next run recognises. One that
    # mkdir alone makes complete (root-owned, no set-id bits, parent passes
    # on no group) is made with its mode, and there is nothing in between.
    first = base_config(disk.label, {"directories": ["/srv/shared"]})
    assert sandbox.run("apply", config=first).returncode == 0
    shared = sandbox.path("/persistent/srv/shared")
    os.chown(shared, 0, USERS_GID)
    os.chmod(shared, 0o2775)
    cfg = base_config(disk.label, {"directories": [
        "/srv/shared", "/srv/shared/inner", "/var/lib/plain/state",
        {"directory": "/var/lib/owned", "user": "bird", "mode": "0700"},
        {"directory": "/var/lib/sticky", "mode": "1777"},
        {"directory": "/var/lib/setgid", "mode": "2755"}]})
    sandbox.write_config(cfg)
    result, calls = run_traced(sandbox, "mkdirat,renameat2", "apply")
    assert result.returncode == 0, result.stderr
    S = sandbox.path("/persistent")
    made = re.findall(r'mkdirat\(\d+, "([^"]+)", (0[0-7]*)\)', calls)
    assert {name for name, mode in made if mode == "000"} == {"owned", "setgid", "inner"}, made
    assert ("plain", "0755") in made and ("sticky", "01777") in made, made
    assert "renameat2" not in calls
    assert owner_mode(S / "var/lib/plain/state") == (0, 0, 0o755)
    assert owner_mode(S / "var/lib/sticky") == (0, 0, 0o1777)
    assert owner_mode(S / "var/lib/owned") == (BIRD, 0, 0o700)  # group defaults to root
    assert owner_mode(S / "var/lib/setgid") == (0, 0, 0o2755)
    assert owner_mode(S / "srv/shared/inner") == (0, 0, 0o755)


@pytest.mark.parametrize("left_owner", [0, BIRD])
def test_a_directory_an_interrupted_run_left_with_mode_0000_is_finished(sandbox, disk, left_owner):
    # What a run killed after mkdir (root-owned) or after fchown (the
    # owner's) leaves: an empty directory with mode 0000. The next run gives
    # it its owner and mode; a non-empty one with mode 0000 is not its to
    # change, and only that entry fails.
    cfg = base_config(disk.label, {"directories": [
        {"directory": "/var/lib/owned", "user": "bird", "mode": "0750"},
        {"directory": "/var/lib/locked", "user": "bird", "mode": "0750"}, "/var/log"]})
    with mounted(disk.device, sandbox.work / "disk") as storage:
        for name in ("owned", "locked"):
            (storage / "var/lib" / name).mkdir(parents=True, mode=0)
            os.chown(storage / "var/lib" / name, left_owner, 0)
            os.chmod(storage / "var/lib" / name, 0)
        (storage / "var/lib/locked/data").write_text("kept\n")
    result = sandbox.run("-v", "apply", config=cfg)
    assert result.returncode == 1, result.stderr
    S, R = sandbox.path("/persistent"), sandbox.root
    assert "impermanence: finish " + str(S / "var/lib/owned") in result.stderr
    assert owner_mode(S / "var/lib/owned") == (BIRD, 0, 0o750)
    assert same_inode(R / "var/lib/owned", S / "var/lib/owned")
    errors = [line for line in result.stderr.splitlines() if ": has mode 0000" in line]
    assert errors == [f"impermanence: {S / 'var/lib/locked'}: has mode 0000 but is not a directory an "
                      "interrupted run left unfinished; left as it is"], result.stderr
    assert owner_mode(S / "var/lib/locked") == (left_owner, 0, 0)
    assert (S / "var/lib/locked/data").read_text() == "kept\n"
    assert same_inode(R / "var/log", S / "var/log")
    # Finished once: the next run has nothing to do there (and fails the
    # locked one again, still leaving it as it is).
    again = sandbox.run("-v", "apply")
    assert again.returncode == 1
    assert "finish " + str(S / "var/lib/owned") not in again.stderr
    assert owner_mode(S / "var/lib/locked") == (left_owner, 0, 0)


def test_mount_points_are_mounted_on_by_name_only_where_no_one_else_can_swap_them(sandbox, disk):
    # In a directory only root can write, nothing can replace a name
    # between mkdir and move_mount: the mount point gets its mark and its
    # mount by name, with no fd of its own. In one its user can write (the
    # home on the fresh root), even a root-owned mount point is opened,
    # checked and mounted on through that fd.
    cfg = main_config(disk.label)
    cfg["persistence"]["/persistent"]["directories"] += ["/var/lib/plain", "/home/bird/rootdir"]
    sandbox.write_config(cfg)
    result, calls = run_traced(sandbox, "openat,utimensat,move_mount", "apply")
    assert result.returncode == 0, result.stderr
    by_name = set(re.findall(r'move_mount\(\d+, "", \d+, "([^"]+)", MOVE_MOUNT_F_EMPTY_PATH\)', calls))
    marked_by_name = set(re.findall(r'utimensat\(\d+, "([^"]+)", \[\{tv_sec=0, tv_nsec=314159265\}', calls))
    assert by_name == marked_by_name == {"log", "plain", "nixos", "colord"}, calls
    assert re.search(r'openat\(\d+, "rootdir", O_RDONLY\|O_NOFOLLOW\|O_CLOEXEC\|O_DIRECTORY\)', calls)
    marked_by_fd = re.findall(r'utimensat\(\d+, NULL, \[\{tv_sec=0, tv_nsec=314159265\}', calls)
    by_fd = re.findall(r'move_mount\(\d+, "", \d+, "", MOVE_MOUNT_F_EMPTY_PATH\|MOVE_MOUNT_T_EMPTY_PATH\)', calls)
    assert len(marked_by_fd) == len(by_fd) >= 5
    R, S = sandbox.root, sandbox.path("/persistent")
    for d in ("var/log", "var/lib/plain", "home/bird/rootdir", "etc/nixos", "var/lib/colord"):
        assert same_inode(R / d, S / d), d
    # Below the mounts, each mount point has its storage twin's owner and
    # mode, and the mark (a bind of the parent alone shows them).
    under = sandbox.work / "under"
    under.mkdir()
    for parent, name in (("etc", "nixos"), ("var/lib", "colord"), ("var/lib", "plain"),
                         ("home/bird", "rootdir")):
        subprocess.run(["mount", "--bind", str(R / parent), str(under)], check=True)
        try:
            st = os.lstat(under / name)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == owner_mode(S / parent / name), name
            assert st.st_mtime_ns == 314159265, name
        finally:
            subprocess.run(["umount", str(under)], check=True)
    # Both kinds are found again by unmount, which removes them.
    assert sandbox.run("unmount").returncode == 0
    for d in ("var/log", "var/lib/plain", "home/bird/rootdir", "home/bird/.ssh", "etc/nixos",
              "var/lib/colord"):
        assert not os.path.lexists(R / d), d


def test_a_mount_point_in_a_set_gid_directory_gets_its_storage_twins_group(sandbox, disk):
    # /var/lib in storage is set-gid with another group, so its mirror on
    # the root is too, and mkdir there passes that group on: the mount
    # point made in it must still end up with its twin's owner and mode.
    populate(disk, {}, dirs={"var": (0, 0, 0o755), "var/lib": (0, USERS_GID, 0o2755),
                             "var/lib/plain": (0, 0, 0o755)})
    cfg = base_config(disk.label, {"directories": ["/var/lib/plain"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    R = sandbox.root
    assert owner_mode(R / "var/lib") == (0, USERS_GID, 0o2755)
    under = sandbox.work / "under"
    under.mkdir()
    subprocess.run(["mount", "--bind", str(R / "var/lib"), str(under)], check=True)
    try:
        assert owner_mode(under / "plain") == (0, 0, 0o755)
        assert os.lstat(under / "plain").st_mtime_ns == 314159265
    finally:
        subprocess.run(["umount", str(under)], check=True)


def test_source_missing_status(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    subprocess.run(["umount", str(sandbox.path("/var/log"))], check=True)
    os.rmdir(sandbox.path("/persistent/var/log"))
    code, entries, _ = status_json(sandbox)
    assert code == 1
    assert entries["/var/log"]["state"] == "source-missing"


def test_unmount_round_trip_leaves_storage_identical(sandbox, disk):
    populate(disk, {"etc/adjtime": b"x\n", "home/bird/.bash_history": b"ls\n"})
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    applied_mounts = mountinfo_under(sandbox.root)
    applied_tree = tree_digest(sandbox.root)
    storage_before = tree_digest(sandbox.path("/persistent"))
    result = sandbox.run("-v", "unmount")
    assert result.returncode == 0, result.stderr
    # everything below the root is unmounted, storage included; links and
    # the mount points apply created are gone, their parents stay
    assert mounts_under(sandbox.root) == [str(sandbox.root)]
    for gone in ("etc/adjtime", "etc/machine-id", "etc/nix/id_rsa", "var/log", "home/bird/.ssh",
                 "etc/ssh/ssh_host_ed25519_key.pub"):
        assert not os.path.lexists(sandbox.root / gone), gone
    assert (sandbox.root / "home/bird/.local/share").is_dir()
    # storage is untouched
    with mounted(disk.device, sandbox.path("/persistent")) as storage:
        assert tree_digest(storage) == storage_before
    # and apply brings back exactly the same tree and mounts
    assert sandbox.run("apply").returncode == 0
    assert mountinfo_under(sandbox.root) == applied_mounts
    assert tree_digest(sandbox.root) == applied_tree


def test_unmount_on_the_running_system_leaves_its_filesystems(sandbox, tmp_path):
    # --root /: in this private mount namespace, a filesystem of the
    # config mounted as stage 1 would have left it stays mounted.
    point = tmp_path / "persist-here"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(point)], check=True)
    cfg = {"fileSystems": {str(point): {"device": "/dev/null", "fsType": "tmpfs"}}, "persistence": {}}
    result = sandbox.run("unmount", config=cfg, root=Path("/"))
    assert result.returncode == 0, result.stderr
    assert str(point) in mountinfo_points()
    # elsewhere (an initrd's /mnt-root, a recovery mount) it is unmounted
    sandbox.path(str(point)).mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "persist-here", str(sandbox.path(str(point)))], check=True)
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert str(sandbox.path(str(point))) not in mountinfo_points()
    subprocess.run(["umount", str(point)], check=True)


def test_unmount_keeps_directories_it_did_not_create(sandbox, disk):
    R = sandbox.root
    (R / "srv").mkdir()  # existed before apply: not ours to remove
    cfg = base_config(disk.label, {"directories": ["/srv", "/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert sandbox.run("unmount").returncode == 0
    assert (R / "srv").is_dir()
    assert not (R / "var/log").exists()


# --- messages ------------------------------------------------------------------------------

def test_messages_reach_kmsg(sandbox, disk):
    require(os.access("/dev/kmsg", os.W_OK), "/dev/kmsg is not writable")
    token = unique_label()
    cfg = base_config(disk.label, {"directories": [{"directory": f"/srv/{token}", "user": f"nouser{token}"}]})
    result = sandbox.run("apply", config=cfg, env={"IMPERMANENCE_NO_KMSG": ""})
    assert result.returncode == 1
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert f"impermanence: user nouser{token}: unknown user" in dmesg


def test_every_message_reaches_kmsg_despite_its_rate_limit(sandbox, disk):
    # The kernel lets one open /dev/kmsg write 10 lines per 5 s; -v adds a
    # line per action. 25 failing entries among 40 must all be in dmesg,
    # and so must every action line.
    require(os.access("/dev/kmsg", os.W_OK), "/dev/kmsg is not writable")
    token = unique_label()
    dirs = []
    for i in range(40):
        dirs.append({"directory": f"/srv/{token}/d{i:02}", "user": f"nouser{token}{i:02}"}
                    if i % 8 < 5 else f"/srv/{token}/d{i:02}")
    cfg = base_config(disk.label, {"directories": dirs})
    result = sandbox.run("-v", "apply", config=cfg, env={"IMPERMANENCE_NO_KMSG": ""})
    assert result.returncode == 1
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    logged = {i for i in range(40) if f"user nouser{token}{i:02}: unknown user" in dmesg}
    assert logged == {i for i in range(40) if i % 8 < 5}
    lines = result.stderr.splitlines()
    assert len(lines) > 40
    assert [line for line in lines if line not in dmesg] == []


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_apply_on_other_storage_filesystems(sandbox, loop_disk, fs):
    mkfs = {"btrfs": ("mkfs.btrfs", "-q", "-f", "-L"), "xfs": ("mkfs.xfs", "-q", "-f", "-L")}[fs]
    disk = loop_disk(unique_label()[:12], size_mb=320, mkfs=mkfs)
    cfg = base_config(disk.label, {"directories": ["/var/log"],
                                   "users": {"bird": {"directories": [".local/share/x"]}}})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 0, result.stderr
    S = sandbox.path("/persistent")
    assert owner_mode(S / "home/bird/.local") == (BIRD, USERS_GID, 0o755)
    assert same_inode(sandbox.path("/home/bird/.local/share/x"), S / "home/bird/.local/share/x")
    assert sandbox.run("apply").returncode == 0


def test_refused_hard_link_leaves_nothing_at_the_target(sandbox, disk):
    # bird's kept ~/.netrc is a hard link to a root-owned file in storage.
    populate(disk, {"etc/secret": b"root only\n"}, dirs={"home/bird": (BIRD, USERS_GID, 0o700)})
    with mounted(disk.device, Path("/tmp/plant-" + disk.label)) as mnt:
        os.chmod(mnt / "etc/secret", 0o600)
        os.link(mnt / "etc/secret", mnt / "home/bird/.netrc")
    cfg = base_config(disk.label, {"users": {"bird": {"files": [".netrc", ".profile"]}}})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert (f"{sandbox.path('/persistent/home/bird/.netrc')}: is a hard link to a file of uid 0 "
            "in a directory of uid 1000; not mounted") in result.stderr
    assert not os.path.lexists(sandbox.path("/home/bird/.netrc"))
    assert os.readlink(sandbox.path("/home/bird/.profile")) == "/persistent/home/bird/.profile"
