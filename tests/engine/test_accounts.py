"""Accounts: user and group names resolved from the config, NixOS's uid and
gid maps and the root's /etc files, and only from files root alone can
write; an unknown name fails its entry alone."""
from __future__ import annotations

import json
import os

from support import BIRD, USERS_GID, base_config, populate, same_inode, tmpfs_at, owner_mode


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
