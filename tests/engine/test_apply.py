"""apply as a whole against real mounts: a tmpfs root and an ext4 loop device
as persistent storage, inside a private mount namespace."""
from __future__ import annotations

import os
import subprocess

from support import (BIRD, USERS_GID, main_config, mount_points_under, mountinfo_under, populate,
                     same_inode, owner_mode, tree_digest)


def test_apply_main_scenario(sandbox, disk):
    populate(disk, {"etc/adjtime": b"0.0 0 0.0\n0\nUTC\n"})
    result = sandbox.run("apply", config=main_config(disk.label))
    assert result.returncode == 0, result.stderr
    R, S = sandbox.root, sandbox.path("/persistent")

    # storage mounted by LABEL= (no udev here: found by reading superblocks)
    assert str(S) in mount_points_under(R)
    # directories: sources created with the item's owner and mode, bound
    assert owner_mode(S / "var/log") == (0, 0, 0o755)
    assert owner_mode(S / "etc/nixos") == (BIRD, USERS_GID, 0o700)
    assert owner_mode(S / "var/lib/colord") == (998, 997, 0o750)
    for d in ("var/log", "etc/nixos", "var/lib/colord", "home/bird/Downloads", "home/bird/.ssh",
              "home/bird/.local/share/fish"):
        assert same_inode(R / d, S / d), d
        assert str(R / d) in mount_points_under(R)
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
