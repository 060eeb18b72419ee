"""diff (what the next boot loses) and orphans (what storage keeps that no
entry uses): read-only walks of one filesystem, through directory fds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from support import config, require, run_on, tmpfs_at

CFG = config(directories=["/var/log", "/etc/nixos", {"directory": "/srv/kept", "user": "root"}],
             files=["/etc/machine-id"],
             users={"bird": {"directories": [".ssh"], "files": [".bash_history"]}})


def write(path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def diff_json(sandbox, *args) -> dict:
    result = sandbox.run("diff", "--json", *args, config=CFG)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def paths(report: dict, sandbox) -> dict:
    """path relative to the root -> (kind, size, files)."""
    root = str(sandbox.root)
    return {p["path"][len(root):]: (p["kind"], p["size"], p["files"]) for p in report["paths"]}


def world(sandbox) -> None:
    """A root as stage 2 leaves it: kept paths in storage and bound, the
    rest written on the wiped root."""
    r = sandbox.path
    for d in ("persistent/var/log", "persistent/etc/nixos", "persistent/srv/kept", "var/log",
              "etc/nixos", "srv/kept", "home/bird/.ssh", "nix/store/abc", "tmp", "boot",
              "empty/dir"):
        r(d).mkdir(parents=True, exist_ok=True)
    write(r("persistent/var/log/journal"), b"j" * 5000)
    write(r("var/cache/app/blob"), b"c" * 30000)
    write(r("var/cache/app/sub/more"), b"m" * 1000)
    write(r("etc/hostname"), b"h\n")
    write(r("etc/machine-id"), b"0" * 33)   # kept file: not listed
    write(r("home/bird/.cache/thumb"), b"t" * 200)
    write(r("home/bird/.bash_history"), b"ls\n")  # kept
    write(r("nix/store/abc/bin"), b"b" * 999)
    write(r("srv/kept/data"), b"k" * 50)
    write(r("tmp/scratch"), b"s" * 10)
    os.symlink("/etc", r("etc/to-etc"))  # a link to a directory: never followed
    tmpfs_at(r("boot"))
    write(r("boot/kernel"), b"k" * 7000)
    subprocess.run(["mount", "--bind", str(r("persistent/var/log")), str(r("var/log"))], check=True)


def test_diff_lists_what_is_not_kept_largest_first(sandbox):
    world(sandbox)
    report = diff_json(sandbox)
    found = paths(report, sandbox)
    assert found == {
        "/var/cache": ("dir", 31000, 2),
        "/home/bird/.cache": ("dir", 200, 1),
        "/etc/hostname": ("file", 2, 1),
        "/etc/to-etc": ("link", 4, 1),
    }
    assert [p["size"] for p in report["paths"]] == sorted((p["size"] for p in report["paths"]), reverse=True)
    assert report["total"] == {"paths": 4, "size": 31206, "files": 5}
    # The other filesystem is named once, not walked; /nix and /tmp are
    # not walked unless asked; storage, kept paths and their bind mounts
    # are not listed; an empty directory loses nothing.
    assert [m["path"][len(str(sandbox.root)):] for m in report["mounts"]] == ["/boot"]
    assert report["mounts"][0]["fsType"] == "tmpfs"
    assert sorted(p[len(str(sandbox.root)):] for p in report["notWalked"]) == ["/nix", "/tmp"]
    assert report["errors"] == []


def test_diff_include_walks_a_skipped_path(sandbox):
    world(sandbox)
    found = paths(diff_json(sandbox, "--include", "/nix", "--include=/tmp"), sandbox)
    assert found["/nix"] == ("dir", 999, 1)
    assert found["/tmp"] == ("dir", 10, 1)


def test_diff_include_walks_another_filesystem(sandbox):
    world(sandbox)
    found = paths(diff_json(sandbox, "--include", "/boot"), sandbox)
    assert found["/boot"] == ("dir", 7000, 1)


def test_diff_text_and_tree(sandbox):
    world(sandbox)
    result = sandbox.run("diff", config=CFG)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    root = str(sandbox.root)
    assert lines[1].split() == ["30.3", "KiB", "2", f"{root}/var/cache/"]
    assert "4 paths not kept (lost at the next boot): 30.5 KiB in 5 files" in lines
    assert f"other filesystems, not walked: {root}/boot (tmpfs)" in lines
    tree = sandbox.run("diff", "--tree", config=CFG)
    assert tree.returncode == 0, tree.stderr
    text = tree.stdout.splitlines()
    assert text[0].split() == ["30.5", "KiB", "5", root]
    names = [line[21:] for line in text if line.startswith(" ")]  # after size and files
    assert names == [root, "  etc/", "    hostname", "    to-etc", "  home/", "    bird/",
                     "      .cache/", "  var/", "    cache/"]


def test_diff_names_a_mount_inside_a_lost_directory_once(sandbox):
    world(sandbox)
    tmpfs_at(sandbox.path("var/cache/app/mnt"))
    write(sandbox.path("var/cache/app/mnt/inside"), b"i" * 12345)
    report = diff_json(sandbox)
    assert paths(report, sandbox)["/var/cache"] == ("dir", 31000, 2)
    assert [m["path"][len(str(sandbox.root)):] for m in report["mounts"]] == ["/boot", "/var/cache/app/mnt"]


def test_diff_counts_hard_links_once_and_walks_deep_trees(sandbox):
    world(sandbox)
    write(sandbox.path("opt/a/file"), b"z" * 4096)
    os.link(sandbox.path("opt/a/file"), sandbox.path("opt/a/again"))
    deep = sandbox.path("opt/deep")
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1500):  # deeper than Python's recursion limit
            os.mkdir("d", dir_fd=fd)
            next_fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    assert paths(diff_json(sandbox), sandbox)["/opt"] == ("dir", 4096, 3)


def test_diff_changes_nothing(sandbox):
    world(sandbox)
    before = snapshot(sandbox.root)
    assert sandbox.run("diff", config=CFG).returncode == 0
    assert snapshot(sandbox.root) == before


def snapshot(root) -> list:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_mode, st.st_size, st.st_mtime_ns))
    return sorted(out)


def test_orphans_lists_storage_no_entry_keeps(sandbox):
    world(sandbox)
    r = sandbox.path
    write(r("persistent/var/lib/removed-app/db"), b"d" * 4000)  # its entry was removed
    write(r("persistent/etc/old.conf"), b"o" * 10)
    write(r("persistent/home/bird/.bash_history"), b"h" * 20)  # kept
    write(r("persistent/home/bird/.ssh/id"), b"s" * 30)         # kept
    write(r("persistent/home/bird/Music/song"), b"m" * 300)      # no longer kept
    before = snapshot(sandbox.root / "persistent")
    result = sandbox.run("orphans", "--json", config=CFG)
    assert result.returncode == 0, result.stderr
    [row] = json.loads(result.stdout)["storages"]
    assert row["storage"] == "/persistent" and row["state"] == "available"
    found = {p["path"][len(str(sandbox.root)):]: (p["kind"], p["size"]) for p in row["paths"]}
    assert found == {"/persistent/var/lib": ("dir", 4000), "/persistent/home/bird/Music": ("dir", 300),
                     "/persistent/etc/old.conf": ("file", 10)}
    text = sandbox.run("orphans", config=CFG)
    assert text.returncode == 0
    assert f"storage {sandbox.root}/persistent:" in text.stdout
    assert "3 paths kept by no entry: 4.2 KiB in 3 files" in text.stdout
    assert snapshot(sandbox.root / "persistent") == before  # nothing deleted or touched


def test_orphans_of_storage_not_mounted_exits_3(sandbox):
    cfg = dict(CFG, fileSystems={"/persistent": {"device": "LABEL=nothing-here"}})
    sandbox.path("persistent").mkdir()
    result = sandbox.run("orphans", config=cfg)
    assert result.returncode == 3
    assert result.stderr.startswith(f"impermanence: {sandbox.root}/persistent: storage not mounted")
    assert "Traceback" not in result.stderr


def test_diff_usage_errors(sandbox):
    for args, message in ((["status", "--tree"], "--tree goes with diff, orphans"),
                          (["diff", "--include", "tmp"], "--include needs an absolute path"),
                          (["plan", "--dry-run"], "--dry-run goes with unmount, rotate-root"),
                          (["plan", "--json"], "--json goes with status")):
        result = sandbox.run(*args, config=CFG)
        assert result.returncode == 2, args
        assert message in result.stderr


def test_diff_names_bind_mounts_of_the_same_filesystem_and_of_files(sandbox):
    # Storage lies on the root's own tmpfs here, so these binds have the
    # root's st_dev: only the mount table tells them apart.
    world(sandbox)
    r = sandbox.path
    write(r("persistent/srv/other/big"), b"b" * 8000)
    write(r("persistent/etc/resolv.conf"), b"r" * 600)
    r("mnt/bound").mkdir(parents=True)
    write(r("etc/resolv.conf"), b"")
    write(r("var/cache/app/bound-file"), b"")
    for source, target in (("persistent/srv/other", "mnt/bound"), ("persistent/etc/resolv.conf", "etc/resolv.conf"),
                           ("persistent/etc/resolv.conf", "var/cache/app/bound-file")):
        subprocess.run(["mount", "--bind", str(r(source)), str(r(target))], check=True)
    report = diff_json(sandbox)
    found = paths(report, sandbox)
    assert "/mnt" not in found and "/etc/resolv.conf" not in found
    assert found["/var/cache"] == ("dir", 31000, 2)  # not the bound file's 600 bytes
    mounts = {m["path"][len(str(sandbox.root)):] for m in report["mounts"]}
    assert mounts == {"/boot", "/mnt/bound", "/etc/resolv.conf", "/var/cache/app/bound-file"}


def test_diff_include_below_a_skipped_path_walks_only_that(sandbox):
    world(sandbox)
    write(sandbox.path("nix/var/db/big"), b"v" * 5555)
    report = diff_json(sandbox, "--include", "/nix/store")
    found = paths(report, sandbox)
    assert found["/nix/store"] == ("dir", 999, 1)
    assert not any(p.startswith("/nix/var") for p in found)
    # /nix as a filesystem of its own: passed through, not named as unwalked.
    tmpfs_at(sandbox.path("nix"))
    write(sandbox.path("nix/store/x/bin"), b"n" * 77)
    write(sandbox.path("nix/var/db"), b"v" * 5)
    report = diff_json(sandbox, "--include", "/nix/store")
    assert paths(report, sandbox)["/nix/store"] == ("dir", 77, 1)
    assert not any(p.startswith("/nix/var") for p in paths(report, sandbox))
    assert all(not m["path"].endswith("/nix") for m in report["mounts"])
    # Without --include, the filesystem on /nix is not walked.
    assert "/nix" not in paths(diff_json(sandbox), sandbox)


def test_diff_walks_btrfs_subvolumes_nested_in_the_root(namespace, loop_disk, tmp_path):
    # A subvolume inside the root subvolume has an st_dev of its own but is
    # no mount: it goes with the root (rotated away), so it is listed.
    require(shutil.which("btrfs") is not None, "btrfs-progs is not installed")
    disk = loop_disk("diffbtrfs", size_mb=128, mkfs=("mkfs.btrfs", "-q", "-f", "-L"))
    root = tmp_path / "btrfs-root"
    root.mkdir()
    subprocess.run(["mount", disk.device, str(root)], check=True)
    try:
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(root / "srv")], check=True)
        (root / "srv" / "deep").mkdir()
        (root / "srv" / "deep" / "data").write_bytes(b"d" * 3000)
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(root / "opt")], check=True)
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(root / "opt" / "inner")], check=True)
        (root / "opt" / "inner" / "data").write_bytes(b"i" * 700)
        (root / "opt" / "top").write_bytes(b"t" * 11)
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_bytes(b"h\n")
        assert os.stat(root / "srv").st_dev != os.stat(root).st_dev
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(CFG))
        result = run_on(root, cfg, "diff", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        found = {p["path"][len(str(root)):]: (p["kind"], p["size"], p["files"]) for p in report["paths"]}
        assert found == {"/srv/deep": ("dir", 3000, 1), "/opt": ("dir", 711, 2), "/etc/hostname": ("file", 2, 1)}
        assert report["mounts"] == []
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_diff_leaves_a_directory_that_is_a_symbolic_link_alone(sandbox):
    # /home/bird (holding kept paths) planted as a link to a big directory
    # elsewhere: the link is what the root loses; nothing behind it is walked.
    r = sandbox.path
    write(r("elsewhere/huge"), b"e" * 9000)
    r("home").mkdir()
    os.symlink(str(r("elsewhere")), r("home/bird"))
    found = paths(diff_json(sandbox), sandbox)
    assert found["/home/bird"][0] == "link"
    assert found["/elsewhere"] == ("dir", 9000, 1)
    assert sum(size for _, size, _ in found.values()) == 9000 + len(str(r("elsewhere")))


def test_orphans_of_each_storage_with_mounts_named_and_tree(sandbox):
    cfg = config(directories=["/var/log"])
    cfg["persistence"]["/state"] = {"directories": ["/srv/web"], "files": ["/etc/adjtime"]}
    r = sandbox.path
    write(r("persistent/var/log/syslog"), b"l" * 100)      # kept
    write(r("persistent/var/lib/gone/db"), b"g" * 2000)    # not
    write(r("state/srv/web/index.html"), b"w" * 10)        # kept
    write(r("state/etc/adjtime"), b"a" * 5)                # kept
    write(r("state/srv/old/file"), b"o" * 70)              # not
    tmpfs_at(r("persistent/media"))
    write(r("persistent/media/film"), b"f" * 9999)         # another filesystem: named, not walked
    before = snapshot(sandbox.root)
    result = sandbox.run("orphans", "--json", config=cfg)
    assert result.returncode == 0, result.stderr
    rows = {row["storage"]: row for row in json.loads(result.stdout)["storages"]}
    root = str(sandbox.root)
    assert {p["path"][len(root):]: p["size"] for p in rows["/persistent"]["paths"]} == {"/persistent/var/lib": 2000}
    assert [m["path"][len(root):] for m in rows["/persistent"]["mounts"]] == ["/persistent/media"]
    assert {p["path"][len(root):]: p["size"] for p in rows["/state"]["paths"]} == {"/state/srv/old": 70}
    tree = sandbox.run("orphans", "--tree", config=cfg)
    assert tree.returncode == 0, tree.stderr
    names = [line[21:] for line in tree.stdout.splitlines() if line.startswith(" ")]
    assert names == [f"{root}/persistent/", "  var/", "    lib/", f"{root}/state/", "  srv/", "    old/"]
    assert snapshot(sandbox.root) == before
