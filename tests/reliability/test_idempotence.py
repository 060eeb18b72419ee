"""Idempotence and reversibility, on a real ext4 loop device mounted by the
script itself: apply three times gives the mountinfo and tree of one apply;
unmount then apply gives them again; unmount leaves storage byte-identical
(every file checksummed, and the device image itself once unmounted)."""
from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from support import mounted, mounts_under, assert_clean_messages, snapshot, tree_digest

BIRD, USERS_GID = 1000, 100


def config(label: str) -> dict:
    return {
        "fileSystems": {"/persistent": {"device": f"LABEL={label}", "options": ["noatime"]}},
        "deviceTimeout": 5,
        "users": {"bird": {"uid": BIRD, "group": "users"}},
        "groups": {"users": {"gid": USERS_GID}},
        "persistence": {
            "/persistent": {
                "directories": ["/var/log", "/var/lib", "/var/lib/nixos",
                                {"directory": "/etc/nixos", "user": "bird", "mode": "0700"},
                                {"directory": "/srv/new", "mode": "u=rwx,g=rx,o="}],
                "files": ["/etc/machine-id", "/etc/adjtime",
                          {"file": "/etc/ssh/key.pub", "method": "symlink"},
                          {"file": "/etc/nix/id", "parentDirectory": {"mode": "0700"}}],
                "users": {"bird": {"directories": ["Downloads", ".local/share/app",
                                                   {"directory": ".ssh", "mode": "0700"}],
                                   "files": [".bash_history", ".config/app.conf"]}},
            },
            "/persistent/system-b": {"directories": ["/opt/b"], "files": ["/etc/b.conf"]},
        },
    }


def seed(view: Path) -> None:
    (view / "var/log").mkdir(parents=True)
    (view / "var/log/old.log").write_bytes(b"old\n" * 100)
    (view / "var/lib/nixos").mkdir(parents=True)
    (view / "var/lib/nixos/uid-map").write_text('{"bird": 1000}')
    (view / "etc").mkdir()
    (view / "etc/adjtime").write_bytes(b"0.0 0 0\n0\nUTC\n")
    home = view / "home/bird"
    (home / ".config").mkdir(parents=True)
    (home / ".config/app.conf").write_bytes(b"x=1\n")
    (home / ".bash_history").write_bytes(b"ls\n")
    for p in (home, home / ".config", home / ".config/app.conf", home / ".bash_history"):
        os.chown(p, BIRD, USERS_GID)
    os.chmod(home, 0o700)
    (view / "system-b/opt/b").mkdir(parents=True)
    (view / "system-b/opt/b/data").write_bytes(os.urandom(4096))


def image_sum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state(root: Path) -> tuple:
    """Mounts below root in mountinfo order (no ids) and the whole tree."""
    mounts = [(os.path.relpath(p, root), fs_root, t, s) for p, fs_root, t, s in mounts_under(root)]
    return mounts, tree_digest(root)


@pytest.fixture
def world(sandbox, loop_disk, tmp_path):
    disk = loop_disk("i" + secrets.token_hex(6))
    with mounted(disk.device, tmp_path / "seed") as view:
        seed(view)
    sandbox.write_config(config(disk.label))
    return sandbox, disk


def apply_ok(sandbox):
    result = sandbox.run("apply")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_apply_three_times_equals_once(world):
    sandbox, _disk = world
    apply_ok(sandbox)
    once = state(sandbox.root)
    # root, storage and 12 bind mounts (/var/lib/nixos is inside the bound
    # /var/lib already, so it needs none; three files are links).
    assert len(once[0]) == 1 + 1 + 12
    apply_ok(sandbox)
    apply_ok(sandbox)
    assert state(sandbox.root) == once
    # Nothing is mounted twice.
    points = [p for p, *_ in mounts_under(sandbox.root)]
    assert len(points) == len(set(points))


def test_unmount_then_apply_equals_once(world):
    sandbox, _disk = world
    apply_ok(sandbox)
    once = state(sandbox.root)
    for _ in range(2):
        result = sandbox.run("unmount")
        assert result.returncode == 0, result.stderr
        assert mounts_under(sandbox.root) == [(str(sandbox.root), "/", "tmpfs", "fresh-root")]
        apply_ok(sandbox)
        assert state(sandbox.root) == once


def test_unmount_leaves_storage_byte_identical(world, tmp_path):
    sandbox, disk = world
    apply_ok(sandbox)
    storage = sandbox.path("/persistent")
    applied = snapshot(storage)
    # Use the system for a moment, as a boot would: write through the mounts.
    (sandbox.path("/var/log") / "new.log").write_bytes(b"written after boot\n")
    in_use = snapshot(storage)
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert mounts_under(sandbox.root) == [(str(sandbox.root), "/", "tmpfs", "fresh-root")]
    # Storage as it was just before unmount, every file (its times too: no
    # read-modify-write, no touch), and the image once it is unmounted.
    with mounted(disk.device, tmp_path / "after", "-o", "ro") as view:
        after = snapshot(view)
    assert {k: v[:6] for k, v in after.items()} == {k: v[:6] for k, v in in_use.items()}
    assert {k: v[6:] for k, v in after.items() if v[0] == "file"} == \
        {k: v[6:] for k, v in in_use.items() if v[0] == "file"}
    assert set(applied) < set(in_use)
    image = image_sum(disk.image)
    result = sandbox.run("unmount")  # again: nothing left to do
    assert result.returncode == 0, result.stderr
    assert image_sum(disk.image) == image
    links = [p for p, v in snapshot(sandbox.root).items() if v[0] == "link"]
    assert links == []


def test_paths_of_another_storage_nested_in_a_bound_directory_are_not_bound_twice(sandbox):
    # /srv/site is bound from /persistent; /srv/site/inner and
    # /srv/site/extra.conf come from /persist2 and are mounted inside it.
    # A second run must find them through the real path: the source's
    # path shows the directory under them, not them.
    for name in ("persistent", "persist2"):
        sandbox.path(name).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", name, str(sandbox.path(name))], check=True)
    sandbox.path("/persist2/srv/site/inner").mkdir(parents=True)
    sandbox.path("/persist2/srv/site/extra.conf").write_text("extra\n")
    sandbox.write_config({"persistence": {
        "/persistent": {"directories": ["/srv/site"]},
        "/persist2": {"directories": ["/srv/site/inner"], "files": ["/srv/site/extra.conf"]}}})
    apply_ok(sandbox)
    once = state(sandbox.root)
    assert len(once[0]) == 2 + 1 + 3
    apply_ok(sandbox)
    assert state(sandbox.root) == once
    assert sandbox.run("status").returncode == 0


def tmpfs_storages(sandbox, *names: str) -> None:
    for name in names:
        sandbox.path(name).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", name, str(sandbox.path(name))], check=True)


def test_unmount_leaves_what_apply_made_inside_another_storage(sandbox):
    # /srv/site/inner and /srv/site/extra.conf (from /persist2) get their
    # mount points inside the bound /srv/site, that is in /persistent's
    # storage; /srv/site/link.conf is linked there (no source yet).
    # unmount undoes the mounts and removes nothing from storage.
    tmpfs_storages(sandbox, "persistent", "persist2")
    sandbox.path("/persist2/srv/site/inner").mkdir(parents=True)
    sandbox.path("/persist2/srv/site/extra.conf").write_text("extra\n")
    sandbox.write_config({"persistence": {
        "/persistent": {"directories": ["/srv/site"]},
        "/persist2": {"directories": ["/srv/site/inner"],
                      "files": ["/srv/site/extra.conf", "/srv/site/link.conf"]}}})
    apply_ok(sandbox)
    site = sandbox.path("/persistent/srv/site")
    made = sorted(os.listdir(site))
    assert made == ["extra.conf", "inner", "link.conf"]
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert [p for p, *_ in mounts_under(sandbox.root)] == \
        [str(sandbox.root), str(sandbox.path("/persistent")), str(sandbox.path("/persist2"))]
    assert sorted(os.listdir(site)) == made
    assert os.readlink(site / "link.conf") == "/persist2/srv/site/link.conf"


@pytest.mark.parametrize("method", ["auto", "symlink"])
@pytest.mark.parametrize("source", ["missing", "empty", "full"])
def test_a_file_inside_a_kept_directory_of_its_storage_is_already_in_place(sandbox, method, source):
    # /var/lib is bound from /persistent, so /var/lib/foo.conf *is* the
    # source: no link to itself, no source removed, nothing to undo.
    tmpfs_storages(sandbox, "persistent")
    src = sandbox.path("/persistent/var/lib/foo.conf")
    src.parent.mkdir(parents=True)
    if source != "missing":
        src.write_text("" if source == "empty" else "kept\n")
    sandbox.write_config({"persistence": {"/persistent": {
        "directories": ["/var/lib"], "files": [{"file": "/var/lib/foo.conf", "method": method}]}}})
    before = tree_digest(sandbox.path("/persistent"))
    plan = sandbox.run("plan")
    assert plan.returncode == 0, plan.stderr
    assert "foo.conf" not in plan.stdout
    apply_ok(sandbox)
    once = state(sandbox.root)
    assert tree_digest(sandbox.path("/persistent")) == before
    apply_ok(sandbox)
    assert state(sandbox.root) == once
    status = sandbox.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "inside a kept directory" in status.stdout
    result = sandbox.run("unmount")
    assert result.returncode == 0, result.stderr
    assert tree_digest(sandbox.path("/persistent")) == before


def test_an_empty_file_in_another_storage_is_replaced_only_if_apply_made_it(sandbox):
    # /srv/site is bound from /persistent, so its empty files are
    # /persistent's. x.conf is someone's: left, with one line; y.conf is
    # the mount point an earlier boot made (its mark), now that y.conf's
    # source is gone: replaced by the link.
    tmpfs_storages(sandbox, "persistent", "persist2")
    site = sandbox.path("/persistent/srv/site")
    site.mkdir(parents=True)
    (site / "x.conf").write_bytes(b"")
    (site / "y.conf").write_bytes(b"")
    os.utime(site / "y.conf", ns=(314_159_265, 314_159_265))
    sandbox.write_config({"persistence": {
        "/persistent": {"directories": ["/srv/site"]},
        "/persist2": {"files": [{"file": "/srv/site/x.conf", "method": "symlink"}, "/srv/site/y.conf"]}}})
    plan = sandbox.run("plan")
    assert f"fail {site / 'x.conf'}".replace(str(site), str(sandbox.path("/srv/site"))) in plan.stdout, plan.stdout
    result = sandbox.run("apply")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line == (f"impermanence: {sandbox.path('/srv/site/x.conf')}: is an empty file in a kept "
                    "directory of another storage that apply did not make; not replaced by a link")
    assert (site / "x.conf").is_file() and not (site / "x.conf").is_symlink()
    assert os.readlink(site / "y.conf") == "/persist2/srv/site/y.conf"


# --- Large worlds of two storages ---------------------------------------------------

ALICE, BOB = 1000, 1001


def big_config(n_dirs: int = 40, n_files: int = 40) -> dict:
    """Entries under /etc, /var, /srv and two homes; nested entries of the
    same and of another storage; sources present and missing; and one
    failing entry under /etc and one under /var."""
    system_dirs = [f"/var/lib/svc{i:02d}" for i in range(n_dirs)]
    system_dirs += [f"/srv/site{i:02d}" for i in range(n_dirs // 2)]
    system_dirs += ["/var/lib/svc00/nested", {"directory": "/var/cache/app", "user": "alice", "mode": "0750"},
                    {"directory": "/var/lib/broken", "user": "nobody-such-user"}]
    files = [f"/etc/conf{i:02d}.conf" for i in range(n_files)]
    files += [{"file": f"/etc/link{i:02d}", "method": "symlink"} for i in range(n_files // 2)]
    files += ["/etc/machine-id", "/etc/occupied.conf"]
    user = {"directories": [f"work/p{i:02d}" for i in range(n_dirs // 2)] + [".local/share/app"],
            "files": [f".config/f{i:02d}" for i in range(n_files // 2)]}
    return {
        "users": {"alice": {"uid": ALICE, "group": "users"}, "bob": {"uid": BOB, "group": "users"}},
        "groups": {"users": {"gid": USERS_GID}},
        "persistence": {
            "/persistent": {"directories": system_dirs, "files": files,
                            "users": {"alice": user, "bob": user}},
            "/persist2": {"directories": ["/var/lib/svc01/other", "/srv/site00/inner"],
                          "files": ["/var/lib/svc02/extra.conf"]},
        },
    }


def seed_big_world(root: Path) -> None:
    """Two tmpfs storages in root: half the sources present, a non-empty
    file occupying one target."""
    tmpfs_storages_at(root, "persistent", "persist2")
    s = root / "persistent"
    for i in range(0, 40, 2):
        (s / f"var/lib/svc{i:02d}").mkdir(parents=True)
        (s / f"var/lib/svc{i:02d}/state").write_text(f"svc {i}\n")
        (s / f"etc/conf{i:02d}.conf").parent.mkdir(exist_ok=True)
        (s / f"etc/conf{i:02d}.conf").write_text(f"conf {i}\n")
    (s / "etc/occupied.conf").write_text("kept\n")
    for who, uid in (("alice", ALICE), ("bob", BOB)):
        home = s / "home" / who
        (home / ".config").mkdir(parents=True)
        (home / ".config/f00").write_text("x\n")
        for p in (home, home / ".config", home / ".config/f00"):
            os.chown(p, uid, USERS_GID)
        os.chmod(home, 0o700)
    (root / "persist2/var/lib/svc02").mkdir(parents=True)
    (root / "persist2/var/lib/svc02/extra.conf").write_text("extra\n")
    (root / "etc").mkdir()
    (root / "etc/occupied.conf").write_text("not ours\n")


def tmpfs_storages_at(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", name, str(root / name)], check=True)


def test_a_big_world_with_failing_entries_is_applied_once(sandbox):
    seed_big_world(sandbox.root)
    first = sandbox.run("-v", "apply", config=big_config())
    assert_clean_messages(first.stderr)
    # One failing entry under /etc, one under /var: exit 1, each named once.
    assert first.returncode == 1, first.stderr
    errors = [line for line in first.stderr.splitlines()
              if not line.startswith("impermanence: fail ")
              and ("nobody-such-user" in line or "occupied.conf" in line)]
    assert len(errors) == 2, first.stderr
    once = state(sandbox.root)
    assert len(once[0]) > 100
    # A second apply changes nothing.
    again = sandbox.run("apply")
    assert again.returncode == 1 and state(sandbox.root) == once


def nested_config(seed: int) -> dict:
    """A random config of short paths under a few tops, so that kept
    directories hold entries of the same and of another storage: files and
    directories, sources present or not."""
    import random
    rng = random.Random(seed)
    names = ["a", "b", "c", "lib", "x", "y"]
    dirs: set = set()
    files: set = set()
    locations = {"/persistent": {"directories": [], "files": []},
                 "/persist2": {"directories": [], "files": []}}
    while len(dirs) + len(files) < 300:
        comps = [rng.choice(["var", "srv", "opt"])] + \
            [rng.choice(names) + str(rng.randrange(3)) for _ in range(rng.randint(1, 4))]
        path = "/" + "/".join(comps)
        above = {"/" + "/".join(comps[:d]) for d in range(1, len(comps))}
        if path in dirs or path in files or above & files:
            continue
        where = locations["/persistent" if rng.random() < 0.75 else "/persist2"]
        if rng.random() < 0.5:
            where["directories"].append(path)
            dirs.add(path)
        elif not any(d.startswith(path + "/") for d in dirs | files):
            where["files"].append(path if rng.random() < 0.7 else {"file": path, "method": "symlink"})
            files.add(path)
    return {"persistence": locations}


@pytest.mark.parametrize("rng_seed", [0, 1, 2, 3, 4, 5, 6, 9])
def test_random_nested_entries_of_two_storages_are_applied_once(rng_seed, sandbox):
    config = nested_config(rng_seed)
    sandbox.write_config(config)
    root = sandbox.root
    for storage in ("persistent", "persist2"):
        (root / storage).mkdir()
        subprocess.run(["mount", "-t", "tmpfs", storage, str(root / storage)], check=True)
    for storage, location in config["persistence"].items():  # half the file sources present
        for item in location["files"][::2]:
            if isinstance(item, str):
                source = root / storage.lstrip("/") / item.lstrip("/")
                source.parent.mkdir(parents=True, exist_ok=True)
                source.write_text("kept\n")
    first = sandbox.run("-v", "apply")
    again = sandbox.run("-v", "apply")
    assert first.returncode == 0, first.stderr[-3000:]
    assert again.returncode == 0 and again.stderr.splitlines()[:-1] == [], again.stderr[-3000:]
