"""Kept files: bound when their source exists, linked when not or when asked;
machine-id; what is at the target; hard links refused."""
from __future__ import annotations

import os
from pathlib import Path

from support import (BIRD, USERS_GID, base_config, mount_points_under, mounted, populate,
                     same_inode, owner_mode)


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
    assert str(R / "etc/machine-id") in mount_points_under(R)


def test_symlink_method_even_when_source_exists(sandbox, disk):
    populate(disk, {"etc/ssh/key.pub": b"ssh-ed25519 AAAA\n"})
    cfg = base_config(disk.label, {"files": [{"file": "/etc/ssh/key.pub", "method": "symlink"}]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    link = sandbox.path("/etc/ssh/key.pub")
    assert os.readlink(link) == "/persistent/etc/ssh/key.pub"
    assert str(link) not in mount_points_under(sandbox.root)


def test_file_source_that_is_a_directory_fails_that_entry(sandbox, disk):
    populate(disk, {}, dirs={"etc/odd": (0, 0, 0o755)})
    cfg = base_config(disk.label, {"files": ["/etc/odd"], "directories": ["/srv"]})
    result = sandbox.run("apply", config=cfg)
    assert result.returncode == 1
    assert "etc/odd: source is a directory, not a regular file" in result.stderr
    assert same_inode(sandbox.path("/srv"), sandbox.path("/persistent/srv"))


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
