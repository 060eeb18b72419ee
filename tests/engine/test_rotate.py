"""rotate-root: the btrfs root rotation, on loop-device btrfs images, checked
independently with btrfs-progs (`btrfs subvolume list`): the old root and
the subvolumes nested in it moved to old_roots/<time>, a fresh root, the
retention by age and by count, what is never deleted, --dry-run, errors,
and the command killed at every ioctl, rename and mkdir it makes."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support import distro_python, mounted, mountinfo_points, require, run, strace_prefix, unique_label

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ(\.[1-9]\d*)?$")
MKFS = ("mkfs.btrfs", "-q", "-f", "-L")


@pytest.fixture
def fs(namespace, loop_disk, tmp_path):
    """A btrfs loop disk with a "root" subvolume holding a file and nested
    subvolumes three levels deep."""
    require(shutil.which("btrfs") is not None and shutil.which("mkfs.btrfs") is not None,
            "btrfs-progs is not installed")
    disk = BtrfsDisk(loop_disk(unique_label(), size_mb=128, mkfs=MKFS), tmp_path)
    disk.populate()
    yield disk
    disk.forget_mounts()


class BtrfsDisk:
    def __init__(self, disk, work: Path):
        self.device, self.label, self.work = disk.device, disk.label, work
        self.config_path = work / "rotate.json"

    def populate(self) -> None:
        with self.top() as top:
            subvolume(top / "root")
            (top / "root" / "etc").mkdir()
            (top / "root" / "etc" / "lost").write_text("session data\n")
            subvolume(top / "root" / "srv")
            (top / "root" / "srv" / "a" / "b").mkdir(parents=True)
            subvolume(top / "root" / "srv" / "a" / "b" / "inner")
            subvolume(top / "root" / "srv" / "a" / "b" / "inner" / "deepest")
            (top / "root" / "srv" / "a" / "b" / "inner" / "deepest" / "data").write_text("d")
            subvolume(top / "persistent")
            (top / "persistent" / "kept").write_text("kept")

    def remake(self) -> None:
        subprocess.run([*MKFS, self.label, self.device], check=True, stdout=subprocess.DEVNULL)
        self.populate()

    @contextlib.contextmanager
    def top(self):
        with mounted(self.device, self.work / "top", "-o", "subvolid=5") as top:
            yield top

    def subvolumes(self) -> set:
        """The path of every subvolume, from btrfs-progs."""
        with self.top() as top:
            out = subprocess.run(["btrfs", "subvolume", "list", str(top)], check=True,
                                 capture_output=True, text=True).stdout
        return {line.split(" path ", 1)[1] for line in out.splitlines()}

    def ids(self) -> dict:
        with self.top() as top:
            out = subprocess.run(["btrfs", "subvolume", "list", str(top)], check=True,
                                 capture_output=True, text=True).stdout
        return {line.split(" path ", 1)[1]: int(line.split()[1]) for line in out.splitlines()}

    def old_roots(self) -> list:
        return sorted(p.split("/")[1] for p in self.subvolumes()
                      if p.startswith("old_roots/") and p.count("/") == 1)

    def config(self, **root) -> Path:
        spec = {"device": f"LABEL={self.label}", "subvolume": "root", "oldRoots": "old_roots",
                "keep": {"days": 30, "count": 10}}
        spec.update(root)
        self.config_path.write_text(json.dumps({"root": spec, "deviceTimeout": 2}))
        return self.config_path

    def rotate(self, *args: str, prefix: tuple = ()) -> subprocess.CompletedProcess:
        if not self.config_path.exists():
            self.config()
        return run("--config", str(self.config_path), "rotate-root", *args, prefix=prefix)

    def forget_mounts(self) -> None:
        """A killed run leaves its private mount of the top level."""
        for point in mountinfo_points():
            if point.startswith("/run/impermanence-rotate.") or point.startswith("/tmp/impermanence-rotate."):
                subprocess.run(["umount", "-l", point], check=False)
                with contextlib.suppress(OSError):
                    os.rmdir(point)


def subvolume(path: Path) -> None:
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(seconds))


NESTED = ["srv", "srv/a/b/inner", "srv/a/b/inner/deepest"]


def test_rotation_moves_the_root_with_its_nested_subvolumes_and_makes_a_fresh_one(fs):
    before = fs.ids()
    started = time.time()
    result = fs.rotate()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    [name] = fs.old_roots()
    assert STAMP.match(name)
    # Named by the time of the root's last change: just now, in UTC.
    assert stamp(started - 120) <= name <= stamp(time.time())
    after = fs.ids()
    assert after[f"old_roots/{name}"] == before["root"]
    for nested in NESTED:
        assert after[f"old_roots/{name}/{nested}"] == before[f"root/{nested}"]
    assert after["root"] not in before.values()
    assert after["persistent"] == before["persistent"]
    assert set(after) == {"root", "persistent", f"old_roots/{name}",
                          *(f"old_roots/{name}/{n}" for n in NESTED)}
    with fs.top() as top:
        assert os.listdir(top / "root") == []
        st = os.stat(top / "root")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
        assert (top / "old_roots" / name / "etc" / "lost").read_text() == "session data\n"
        assert os.stat(top / "old_roots").st_mode & 0o777 == 0o700
        assert sorted(os.listdir(top / "old_roots")) == [name]  # no .rotating left
        assert (top / "persistent" / "kept").read_text() == "kept"


def test_a_name_already_taken_gets_a_number(fs):
    now = time.time()
    with fs.top() as top:  # every name the root could get: taken by plain directories
        (top / "old_roots").mkdir()
        for t in range(int(now) - 300, int(now) + 60):
            (top / "old_roots" / stamp(t)).mkdir()
    result = fs.rotate()
    assert result.returncode == 0, result.stderr
    [name] = fs.old_roots()
    assert name.endswith(".2") and STAMP.match(name)


def make_old_roots(fs, names: list, nested: dict | None = None) -> None:
    with fs.top() as top:
        (top / "old_roots").mkdir(exist_ok=True)
        for name in names:
            subvolume(top / "old_roots" / name)
            (top / "old_roots" / name / "file").write_text(name)
        for name, paths in (nested or {}).items():
            for path in paths:
                (top / "old_roots" / name / path).parent.mkdir(parents=True, exist_ok=True)
                subvolume(top / "old_roots" / name / path)


def test_retention_by_age_keeps_recent_roots_and_deletes_old_ones_with_their_nested_subvolumes(fs):
    now = time.time()
    old = ["2020-01-01T00-00-00Z", "2020-01-02T00-00-00Z", "2020-01-02T00-00-00Z.2"]
    recent = [stamp(now - 2 * 86400), stamp(now - 29 * 86400)]
    make_old_roots(fs, old + recent, nested={"2020-01-01T00-00-00Z": ["var/lib/machines", "var/lib/machines/x/y",
                                                                       "home"]})
    fs.config(keep={"days": 30, "count": 2})
    result = fs.rotate("-v")
    assert result.returncode == 0, result.stderr
    assert "delete old root" in result.stderr
    kept = fs.old_roots()
    assert len(kept) == 3 and set(recent) < set(kept)
    assert not any(p.startswith("old_roots/2020") for p in fs.subvolumes())


def test_retention_by_count_keeps_the_newest_however_old(fs):
    old = [f"2020-01-0{d}T00-00-00Z" for d in range(1, 6)]
    make_old_roots(fs, old)
    fs.config(keep={"days": 30, "count": 3})
    assert fs.rotate().returncode == 0
    kept = fs.old_roots()
    assert len(kept) == 3
    assert old[-2:] == [n for n in kept if n.startswith("2020")]


def test_plain_directories_and_foreign_subvolumes_in_old_roots_are_left_alone(fs):
    make_old_roots(fs, ["2020-01-01T00-00-00Z", "my-snapshot", "2020-01-01T00-00-00Z-x"])
    with fs.top() as top:
        plain = top / "old_roots" / "2019-01-01T00-00-00Z"  # a plain directory named like an old root
        plain.mkdir()
        subvolume(plain / "inside")  # a subvolume in it: not one of ours either
        (plain / "file").write_text("mine")
        (top / "old_roots" / "1999-01-01T00-00-00Z").write_text("a file")
        subvolume(top / "elsewhere-2020-01-01T00-00-00Z")
    fs.config(keep={"days": 0, "count": 1})  # only the root rotated now is kept
    result = fs.rotate()
    assert result.returncode == 0, result.stderr
    [new] = [n for n in fs.old_roots() if STAMP.match(n)]
    subvols = {p for p in fs.subvolumes() if not p.startswith(f"old_roots/{new}")}
    assert {"old_roots/my-snapshot", "old_roots/2020-01-01T00-00-00Z-x",
            "old_roots/2019-01-01T00-00-00Z/inside", "elsewhere-2020-01-01T00-00-00Z",
            "persistent", "root"} == subvols
    with fs.top() as top:
        assert (top / "old_roots" / "2019-01-01T00-00-00Z" / "file").read_text() == "mine"
        assert (top / "old_roots" / "1999-01-01T00-00-00Z").read_text() == "a file"


def test_the_fresh_root_is_a_snapshot_of_blank(fs):
    with fs.top() as top:
        subvolume(top / "root-blank")
        (top / "root-blank" / "etc").mkdir()
        (top / "root-blank" / "etc" / "from-blank").write_text("b")
    blank_id = fs.ids()["root-blank"]
    fs.config(blank="root-blank")
    result = fs.rotate()
    assert result.returncode == 0, result.stderr
    ids = fs.ids()
    assert ids["root-blank"] == blank_id and ids["root"] != blank_id
    with fs.top() as top:
        assert (top / "root" / "etc" / "from-blank").read_text() == "b"
        assert not (top / "root" / "etc" / "lost").exists()
        (top / "root" / "etc" / "from-blank").write_text("changed")
        assert (top / "root-blank" / "etc" / "from-blank").read_text() == "b"


def test_dry_run_prints_the_steps_and_changes_nothing(fs):
    make_old_roots(fs, ["2020-01-01T00-00-00Z"], nested={"2020-01-01T00-00-00Z": ["a/b"]})
    fs.config(keep={"days": 30, "count": 1})
    before = fs.ids()
    with fs.top() as top:
        listing = sorted(os.listdir(top)), sorted(os.listdir(top / "old_roots"))
    result = fs.rotate("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    dev = fs.device
    assert lines[0] == f"create empty subvolume {dev}[/old_roots/.rotating] (the fresh root)"
    assert lines[1].startswith(f"exchange {dev}[/root] and {dev}[/old_roots/.rotating]")
    assert lines[2].startswith(f"move {dev}[/old_roots/.rotating] (the old root")
    assert lines[3].startswith(f"delete old root {dev}[/old_roots/2020-01-01T00-00-00Z]")
    assert "first the 1 subvolumes nested in it" in lines[3]
    assert len(lines) == 4
    assert fs.ids() == before
    with fs.top() as top:
        assert (sorted(os.listdir(top)), sorted(os.listdir(top / "old_roots"))) == listing
    # The real run logs (-v) exactly the lines the dry run printed.
    real = fs.rotate("-v")
    assert real.returncode == 0, real.stderr
    assert [l.removeprefix("impermanence: ") for l in real.stderr.splitlines()] == lines


def test_first_boot_without_a_root_subvolume_creates_one(fs):
    with fs.top() as top:
        for nested in [*reversed(NESTED), ""]:
            subprocess.run(["btrfs", "-q", "subvolume", "delete", str(top / "root" / nested)],
                           check=True, stdout=subprocess.DEVNULL)
    assert "root" not in fs.subvolumes()
    result = fs.rotate()
    assert result.returncode == 0, result.stderr
    assert "root" in fs.subvolumes() and fs.old_roots() == []


@pytest.mark.parametrize("root, message", [
    ({"device": "nixos"}, "root.device: 'nixos' must be an absolute path or UUID="),
    ({"device": "LABEL=x", "subvolume": "../root"}, "root.subvolume: '../root' is not a subvolume path"),
    ({"device": "LABEL=x", "subvolume": ""}, "root.subvolume: '' is not a subvolume path"),
    ({"device": "LABEL=x", "oldRoots": "root/old"}, "root.oldRoots: /root/old overlaps root.subvolume /root"),
    ({"device": "LABEL=x", "blank": "root"}, "root.blank: /root overlaps root.subvolume /root"),
    ({"device": "LABEL=x", "keep": {"days": -1}}, "root.keep.days: -1 is not between 0 and 100000"),
    ({"device": "LABEL=x", "keep": {"count": "10"}}, "root.keep.count: must be a whole number, not a string"),
    ({"device": "LABEL=x", "keep": {"dayz": 3}}, "root.keep.dayz: unknown key; did you mean 'days'?"),
    ({"device": "LABEL=x", "olRoots": "x"}, "root.olRoots: unknown key; did you mean 'oldRoots'?"),
    ({"subvolume": "root"}, "root.device: is required"),
    ("LABEL=x", "root: must be an object, not a string"),
])
def test_bad_root_config_is_one_line_naming_the_key(tmp_path, root, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"root": root}))
    result = run("--config", str(cfg), "rotate-root")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith(f"impermanence: {cfg}: root")


def test_config_without_root_key_is_a_config_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"persistence": {"/persistent": {"directories": ["/var/log"]}}}))
    result = run("--config", str(cfg), "rotate-root", "--dry-run")
    assert result.returncode == 2
    assert result.stderr == 'impermanence: rotate-root: the config has no "root" key (the btrfs filesystem and root subvolume)\n'


def test_missing_device_is_one_line_and_exit_3(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"root": {"device": "LABEL=no-such-disk-here"}, "deviceTimeout": 0}))
    result = run("--config", str(cfg), "rotate-root")
    assert result.returncode == 3
    assert result.stderr == ("impermanence: LABEL=no-such-disk-here: device did not appear within 0 s; "
                             "the root is not rotated\n")


def test_a_filesystem_that_is_not_btrfs_is_refused(namespace, disk, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"root": {"device": disk.device}, "deviceTimeout": 1}))
    result = run("--config", str(cfg), "rotate-root")
    assert result.returncode == 3
    assert result.stderr == (f"impermanence: {disk.device}: is not a btrfs filesystem but ext4 "
                             f"({disk.device}); the root is not rotated\n")


def test_a_root_that_is_a_plain_directory_or_a_mounted_root_is_left_as_it_is(fs):
    fs.config(subvolume="plain")
    with fs.top() as top:
        (top / "plain").mkdir()
    before = fs.ids()
    result = fs.rotate()
    assert result.returncode == 3
    assert result.stderr == (f"impermanence: {fs.device}[/plain]: is a plain directory, not a subvolume; "
                             "left as it is; the root is not rotated\n")
    fs.config()
    with mounted(fs.device, fs.work / "sysroot", "-o", "subvol=root"):
        result = fs.rotate()
    assert result.returncode == 3
    assert f"{fs.device}[/root]: is mounted on {fs.work}/sysroot; rotate-root runs before" in result.stderr
    assert fs.ids() == before


def test_a_failed_deletion_is_reported_and_the_rotation_stands(fs):
    make_old_roots(fs, ["2020-01-01T00-00-00Z"], nested={"2020-01-01T00-00-00Z": ["in"]})
    with fs.top() as top:  # a read-only old root: its nested subvolume cannot be unlinked
        subprocess.run(["btrfs", "property", "set", str(top / "old_roots" / "2020-01-01T00-00-00Z"), "ro", "true"],
                       check=True)
    fs.config(keep={"days": 1, "count": 1})
    result = fs.rotate()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"{fs.device}[/old_roots/2020-01-01T00-00-00Z/in]: BTRFS_IOC_SNAP_DESTROY: " in result.stderr
    assert result.stderr.endswith("; tried again at the next run\n")
    assert len(fs.old_roots()) == 2 and "root" in fs.subvolumes()


# --- killed at every step ------------------------------------------------------------

def killed_runs(fs, syscall: str):
    """For k = 1, 2, ...: the disk remade, rotate-root killed (SIGKILL) on
    entering its k-th `syscall`, so after the k-1 before it took effect;
    yields k, until a run is not killed."""
    trace = fs.work / "trace"
    for k in range(1, 200):
        fs.remake()
        if syscall != "mkdirat":  # else oldRoots is made by the run
            make_old_roots(fs, ["2020-01-01T00-00-00Z"], nested={"2020-01-01T00-00-00Z": ["a", "a/b/c"]})
        result = fs.rotate(prefix=strace_prefix(trace, syscall, f"inject={syscall}:signal=KILL:when={k}"))
        fs.forget_mounts()
        if "+++ killed by SIGKILL" not in trace.read_text():
            assert result.returncode == 0, result.stderr
            return
        yield k
    raise AssertionError(f"still killed at {syscall} 200")


@pytest.mark.parametrize("syscall", ["ioctl", "renameat2", "mkdirat"])
def test_killed_at_any_step_a_root_is_in_place_and_the_next_run_recovers(fs, syscall):
    require(shutil.which("strace") is not None, "strace is not installed")
    fs.config(keep={"days": 30, "count": 1})
    kills = 0
    for k in killed_runs(fs, syscall):
        kills += 1
        subvols = fs.subvolumes()
        assert "root" in subvols, (syscall, k)
        # Whichever root is in place, it is whole: the old one with its
        # nested subvolumes, or a fresh one.
        with fs.top() as top:
            content = sorted(os.listdir(top / "root"))
        assert content in ([], ["etc", "srv"]), (syscall, k, content)
        result = fs.rotate()
        assert result.returncode == 0, (syscall, k, result.stderr)
        subvols = fs.subvolumes()
        names = fs.old_roots()
        with fs.top() as top:
            assert os.listdir(top / "root") == [], (syscall, k)
            assert ".rotating" not in os.listdir(top / "old_roots")
            holding = [n for n in names if (top / "old_roots" / n / "etc" / "lost").exists()]
        assert len(holding) == 1, (syscall, k, fs.old_roots())
        assert all(f"old_roots/{holding[0]}/{n}" in subvols for n in NESTED), (syscall, k)
        assert not any(p.startswith("old_roots/2020") for p in subvols), (syscall, k, subvols)
        assert "persistent" in subvols
    print(f"{syscall}: killed at each of {kills}")
    assert kills >= {"ioctl": 6, "renameat2": 2, "mkdirat": 1}[syscall]


def test_plan_shows_the_rotation(sandbox):
    result = sandbox.run("plan", config={"root": {"device": "LABEL=nixos", "blank": "root-blank",
                                                  "keep": {"days": 7, "count": 3}}})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "rotate-root (before the root is mounted): move LABEL=nixos[/root] to /old_roots/<time of its "
        "last change>, fresh root a snapshot of /root-blank, delete old roots older than 7 days and not "
        "among the 3 newest",
        "nothing to do: everything is in place"]


# --- two boots under QEMU, the root being the rotated subvolume ---------------------

@pytest.fixture(scope="module")
def rotated_boots(tmp_path_factory):
    """A btrfs disk (subvolumes root and persistent) booted twice: stage 1
    runs rotate-root, then mounts subvol=root as the root (vm/guest/init);
    boot 1 writes a file on the root and one in kept /var/log."""
    import sys

    from conftest import PROJECT, SCRIPT, enter_private_mount_namespace
    import build_initramfs
    import cpio
    import machine

    require(os.geteuid() == 0, "it needs root (loop mounts, the kernel image in /boot)")
    require(machine.qemu_available(), "qemu-system-x86_64 is not installed")
    require(shutil.which("mkfs.btrfs") is not None, "btrfs-progs is not installed")
    require(shutil.which("busybox") is not None, "busybox-static is not installed")
    distro_python()  # require()s the interpreter
    try:
        kver = build_initramfs.default_kver()
    except build_initramfs.BuildError as e:
        require(False, str(e))
    enter_private_mount_namespace()
    work = tmp_path_factory.mktemp("vm-rotate")
    build = work / "build"
    build_initramfs.build(build, SCRIPT, kver=kver)
    # btrfs and what it needs, appended to each boot's initramfs
    modules = cpio.Archive()
    order = []
    for ko in build_initramfs.kernel_module_files(kver, ("btrfs",)):
        name, data = build_initramfs.decompress_module(ko)
        rel = str(ko.parent.relative_to(f"/lib/modules/{kver}")) + "/" + name
        modules.file(f"/lib/modules/{kver}/{rel}", data)
        order.append(rel)
    modules.file(f"/lib/modules/{kver}/load-order-btrfs", ("\n".join(order) + "\n").encode())
    modules.file("/nix/scenario/btrfs-root", b"LABEL=vmroot\n")
    extra = modules.to_bytes()

    image = work / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run([*MKFS, "vmroot", str(image)], check=True, stdout=subprocess.DEVNULL)
    top = work / "top"
    with mounted(str(image), top, "-o", "loop"):
        subvolume(top / "root")
        subvolume(top / "persistent")
    config = {"root": {"device": "LABEL=vmroot", "subvolume": "root", "oldRoots": "old_roots",
                       "keep": {"days": 30, "count": 10}},
              "deviceTimeout": 20,
              "fileSystems": {"/persistent": {"device": "LABEL=vmroot", "fsType": "btrfs",
                                              "options": ["subvol=persistent"]}},
              "persistence": {"/persistent": {"directories": ["/var/log"]}}}
    boots = []
    for n, checks in ((1, {"writes": [{"path": "/lost-by-rotation.txt", "content": "boot 1\n"},
                                      {"path": "/var/log/kept.log", "content": "kept\n"}],
                           "inspect": ["/lost-by-rotation.txt", "/var/log/kept.log"]}),
                      (2, {"inspect": ["/lost-by-rotation.txt", "/var/log/kept.log"]})):
        result = machine.Boot(build, work, machine.overlay(config=config, checks=checks) + extra,
                              [image], name=f"rotate-{n}").run()
        assert not result.timed_out and result.report is not None, result.describe()
        boots.append(result)
    with mounted(str(image), top, "-o", "loop"):
        out = subprocess.run(["btrfs", "subvolume", "list", str(top)], check=True,
                             capture_output=True, text=True).stdout
        subvols = {line.split(" path ", 1)[1] for line in out.splitlines()}
        old = sorted(p.split("/")[1] for p in subvols if p.startswith("old_roots/"))
        files = {name: sorted(os.listdir(top / "old_roots" / name)) for name in old}
        lost = {name: (top / "old_roots" / name / "lost-by-rotation.txt").read_text()
                for name in old if (top / "old_roots" / name / "lost-by-rotation.txt").exists()}
        kept = (top / "persistent" / "var" / "log" / "kept.log").read_text()
        root_has = (top / "root" / "lost-by-rotation.txt").exists()
    return {"boots": boots, "subvols": subvols, "old": old, "files": files, "lost": lost,
            "kept": kept, "root_has": root_has}


@pytest.mark.vm
def test_two_boots_the_root_subvolume_is_rotated_at_each(rotated_boots):
    first, second = rotated_boots["boots"]
    for boot in (first, second):
        assert "stage 1: rotate-root exited 0" in boot.console, boot.describe()
        assert boot.report["stage1"]["exit"] == 0, boot.describe()
    # Boot 2 runs on a fresh root: what boot 1 wrote there is gone from it,
    # and kept in old_roots/<time>; the kept directory's file is in storage.
    assert not second.report["inspect"]["/lost-by-rotation.txt"]["exists"]
    assert second.report["inspect"]["/var/log/kept.log"]["content"] == "kept\n"
    assert "exchange LABEL=vmroot" not in second.console  # devices are named by path
    assert re.search(r"stage 1: rotate \| impermanence: exchange /dev/vda\[/root\] and "
                     r"/dev/vda\[/old_roots/\.rotating\]", second.console), second.console
    assert rotated_boots["root_has"] is False
    old = rotated_boots["old"]
    assert len(old) == 2 and all(STAMP.match(n) for n in old), old
    assert list(rotated_boots["lost"].values()) == ["boot 1\n"]
    assert list(rotated_boots["lost"]) == [old[1]]  # the newer one: boot 1's root
    assert rotated_boots["kept"] == "kept\n"
    assert {"root", "persistent"} <= rotated_boots["subvols"]


# --- a clock that is behind, and a failed rotation ------------------------------------

def faketime(when: str) -> tuple:
    require(shutil.which("faketime") is not None, "faketime is not installed (Debian package faketime)")
    return ("faketime", "-f", when)


RECENT = [stamp(time.time() - d * 86400) for d in (5, 4, 3, 2, 1)]


@pytest.mark.parametrize("days", [30, 0])
def test_a_clock_behind_still_keeps_count_alone(fs, days):
    # A board without RTC starts at 1970: no old root is "older than
    # keep.days", yet only keep.count of them may stay.
    make_old_roots(fs, RECENT)
    fs.config(keep={"days": days, "count": 2})
    result = fs.rotate(prefix=faketime("@1970-01-01 00:00:00"))
    assert result.returncode == 0, result.stderr
    kept = fs.old_roots()
    assert len(kept) == 2, kept
    assert RECENT[-1] in kept  # the newest old one, and the root just rotated
    if days:
        (line,) = result.stderr.splitlines()
        assert "1970-01-01T00-00-0" in line and "keep.days ignored" in line, line
    else:
        assert result.stderr == ""  # by count alone: the clock does not matter


def test_keep_days_zero_is_by_count_alone(fs):
    make_old_roots(fs, RECENT)
    fs.config(keep={"days": 0, "count": 3})
    assert fs.rotate().returncode == 0
    assert fs.old_roots()[:2] == RECENT[-2:] and len(fs.old_roots()) == 3


def test_a_clock_behind_with_count_zero_deletes_nothing(fs):
    # keep.count = 0 keeps by age alone; an age the clock cannot tell
    # deletes nothing.
    make_old_roots(fs, RECENT)
    fs.config(keep={"days": 30, "count": 0})
    result = fs.rotate(prefix=faketime("@1970-01-01 00:00:00"))
    assert result.returncode == 0, result.stderr
    assert len(fs.old_roots()) == len(RECENT) + 1
    assert "nothing deleted" in result.stderr


@pytest.mark.parametrize("syscall,blank", [("renameat2", None), ("fchmod", None), ("renameat2", "blank")])
def test_a_failed_rotation_leaves_no_new_subvolume(fs, syscall, blank):
    # renameat2: the exchange fails after the fresh root (empty, or a
    # snapshot of blank) was made; fchmod: the fresh root's mode cannot be
    # set. Run twice: no run leaves a subvolume for the next to keep.
    require(shutil.which("strace") is not None, "strace is not installed")
    if blank:
        with fs.top() as top:
            subvolume(top / "blank")
        fs.config(blank=blank)
    before = fs.ids()
    trace = fs.work / "trace"
    for attempt in range(2):
        result = fs.rotate(prefix=strace_prefix(trace, syscall, f"inject={syscall}:error=EIO:when=1"))
        assert result.returncode == 3, result.stderr
        assert fs.ids() == before, (attempt, result.stderr, set(fs.ids()) - set(before))
        with fs.top() as top:
            assert os.listdir(top / "old_roots") == []
            assert sorted(os.listdir(top / "root")) == ["etc", "srv"]
