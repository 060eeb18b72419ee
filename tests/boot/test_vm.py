"""Real boots under QEMU: Debian's kernel, an initramfs holding busybox,
the distribution's python3 and impermanence_boot.py (vm/build_initramfs.py), a NixOS-like
stage 1 that runs the script as postMountCommands on a tmpfs /mnt-root, then
switch_root into a stage 2 that inspects the booted system (vm/guest/).

The initramfs is built once per session; each boot gets a fresh ext4 disk
image and has a timeout (vm/machine.py). With CI=true a missing QEMU,
kernel or interpreter fails these tests instead of skipping them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import PROJECT, SCRIPT, require
from support import distro_python

import build_initramfs  # noqa: E402
import machine  # noqa: E402
import scenarios as sc  # noqa: E402

pytestmark = pytest.mark.vm

STAGE1_MOUNTS = {"/nix", "/proc", "/sys", "/dev", "/run"}


def boot(build, work: Path, name: str, disks, timeout: float | None = None,
         **overlay_kw) -> machine.BootResult:
    result = machine.Boot(build, work, machine.overlay(**overlay_kw), disks, name=name,
                          timeout=timeout).run()
    assert not result.timed_out, f"{name}: the boot timed out\n{result.describe()}"
    assert result.report is not None, f"{name}: stage 2 was never reached\n{result.describe()}"
    assert result.returncode == 0, f"{name}: qemu failed\n{result.describe()}"
    return result


# --- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="session")
def vm_build(tmp_path_factory):
    require(os.geteuid() == 0, "it needs root (the kernel image in /boot is root-only)")
    require(machine.qemu_available(), "qemu-system-x86_64 is not installed")
    require(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 (e2fsprogs) is not installed")
    distro_python()  # require()s the interpreter
    require(shutil.which("busybox") is not None, "busybox-static is not installed")
    try:
        kver = build_initramfs.default_kver()
    except build_initramfs.BuildError as e:
        require(False, str(e))
    require(SCRIPT.is_file(), f"{SCRIPT} does not exist")
    out = tmp_path_factory.mktemp("vm-build")
    manifest = build_initramfs.build(out, SCRIPT, kver=kver)
    return out


@pytest.fixture(scope="module")
def main_boots(vm_build, tmp_path_factory):
    """The main scenario: one disk, booted twice."""
    work = tmp_path_factory.mktemp("vm-main")
    disk = machine.make_disk(work / "persist.img", "persist")
    # each boot also runs the shell approach on a copy of the disk as it is
    # just before that boot (/dev/vdb, another label)
    shell1 = machine.copy_disk(disk, work / "shell-1.img", sc.SHELL_LABEL)
    first = boot(vm_build, work, "main-1", [disk, shell1], checks=sc.main_checks(1),
                 shell_device=sc.SHELL_DEVICE)
    on_disk = {p: machine.debugfs_cat(disk, p) for p in
               ["/" + q.lstrip("/") for q in sc.KEPT_WRITES] + list(sc.UNKEPT_WRITES)}
    shell2 = machine.copy_disk(disk, work / "shell-2.img", sc.SHELL_LABEL)
    second = boot(vm_build, work, "main-2", [disk, shell2], checks=sc.main_checks(2),
                  shell_device=sc.SHELL_DEVICE)
    return first, second, on_disk


def entries(result) -> dict:
    return {e["path"]: e for e in result.report["root_entries"]}


def mount_counts(mounts) -> dict:
    counts: dict = {}
    for m in mounts:
        counts[m["point"]] = counts.get(m["point"], 0) + 1
    return counts


def same_inode(a: dict, b: dict) -> bool:
    return a["exists"] and b["exists"] and (a["dev"], a["ino"]) == (b["dev"], b["ino"])


# What the fresh root must hold after apply on boot 1 and boot 2, and
# nothing else: (type, uid, gid, mode, mounted here?). Modes of bind-mount
# targets are their sources' (lstat of a mount point shows the mounted root).
EXPECTED_ROOT = {
    "/etc": ("dir", 0, 0, "0755", False),
    "/etc/machine-id": ("file", 0, 0, None, True),
    "/etc/nix": ("dir", 0, 0, "0700", False),          # parentDirectory u=rwx,g=,o=
    "/etc/nix/id_rsa": ("symlink", 0, 0, None, False),
    "/etc/nixos": ("dir", 1000, 100, "0700", True),
    "/etc/ssh": ("dir", 0, 0, "0755", False),
    "/etc/ssh/ssh_host_ed25519_key.pub": ("symlink", 0, 0, None, False),
    "/home": ("dir", 0, 0, "0755", False),
    "/home/bird": ("dir", 1000, 100, "0700", False),    # a home: 0700, the user's
    "/home/bird/.bash_history": ("symlink", 0, 0, None, False),
    "/home/bird/.local": ("dir", 1000, 100, "0755", False),  # never root's
    "/home/bird/.local/share": ("dir", 1000, 100, "0755", False),
    "/home/bird/.local/share/keyrings": ("dir", 1000, 100, "0755", True),
    "/home/bird/.ssh": ("dir", 1000, 100, "0700", True),
    "/home/bird/Downloads": ("dir", 1000, 100, "0755", True),
    "/persistent": ("dir", 0, 0, None, True),
    "/var": ("dir", 0, 0, "0755", False),
    "/var/lib": ("dir", 0, 0, "0755", False),
    "/var/lib/colord": ("dir", 124, 124, "0750", True),  # u=rwx,g=rx,o=
    "/var/lib/nixos": ("dir", 0, 0, "0755", True),
    "/var/log": ("dir", 0, 0, "0755", True),
}


def check_root_layout(result, expected: dict) -> None:
    got = entries(result)
    assert set(got) - STAGE1_MOUNTS == set(expected), (
        "the fresh root must hold exactly what the script created",
        sorted(set(got) - STAGE1_MOUNTS - set(expected)), sorted(set(expected) - set(got)))
    for path, (kind, uid, gid, mode, mounted) in expected.items():
        e = got[path]
        assert e["type"] == kind, (path, e)
        assert e["mountpoint"] == mounted, (path, e)
        if kind != "symlink":
            assert (e["uid"], e["gid"]) == (uid, gid), (path, e)
        if mode is not None:
            assert e["mode"] == mode, (path, e)
    for m in STAGE1_MOUNTS:
        assert got[m]["mountpoint"], m


# --- the main scenario ------------------------------------------------------

def test_main_boot1_apply_succeeds_in_stage1(main_boots):
    first, _, _ = main_boots
    assert first.script_exit == 0, first.script_stderr + first.describe()
    assert "Traceback" not in first.script_stderr
    # stage 1 reports to the console; stage 2 started from the new root
    assert "impermanence_boot.py exited 0" in first.console
    # The byte-compiled script, reading the JSON config, as a NixOS initrd does.
    assert "-I -S impermanence_boot.pyc --root /mnt-root --config /nix/impermanence/config.json" in first.console


def test_main_boot1_layout_owners_and_modes(main_boots):
    first, _, _ = main_boots
    check_root_layout(first, EXPECTED_ROOT)
    persistent = [m for m in first.report["mounts"] if m["point"] == "/persistent"]
    assert len(persistent) == 1 and persistent[0]["source"] == "/dev/vda", persistent
    assert persistent[0]["fstype"] == "ext4"
    assert "noatime" in persistent[0]["options"].split(","), persistent


def test_main_boot1_targets_are_their_sources(main_boots):
    first, _, _ = main_boots
    ins = first.report["inspect"]
    for target in sc.MAIN_DIRS + sc.MAIN_BIND_FILES:
        src = "/persistent" + target
        assert same_inode(ins[target], ins[src]), (target, ins[target], ins[src])
        assert ins[target]["mountpoint"], target
    # storage-side owners and modes, as declared (or as SPEC's defaults)
    declared = {"/etc/nixos": (1000, 100, "0700"), "/var/lib/colord": (124, 124, "0750"),
                "/var/log": (0, 0, "0755"), "/var/lib/nixos": (0, 0, "0755"),
                "/home/bird/Downloads": (1000, 100, "0755"), "/home/bird/.ssh": (1000, 100, "0700"),
                "/home/bird/.local/share/keyrings": (1000, 100, "0755")}
    for target, (uid, gid, mode) in declared.items():
        s = ins["/persistent" + target]
        assert (s["uid"], s["gid"], s["mode"]) == (uid, gid, mode), (target, s)
    assert (ins["/persistent/home/bird"]["uid"], ins["/persistent/home/bird"]["mode"]) == (1000, "0700")
    assert ins["/persistent/etc/nix"]["mode"] == "0700"  # parentDirectory
    # machine-id with no source: created "uninitialized", then bind-mounted
    assert ins["/etc/machine-id"]["content"] == "uninitialized\n"
    assert ins["/persistent/etc/machine-id"]["content"] == "uninitialized\n"


def test_main_boot1_links_point_at_the_booted_path(main_boots):
    first, _, _ = main_boots
    ins = first.report["inspect"]
    for target in sc.MAIN_LINKS:
        assert ins[target]["type"] == "symlink", ins[target]
        assert ins[target]["readlink"] == "/persistent" + target, ins[target]
        assert not ins["/persistent" + target]["exists"]  # created on first write


def test_main_boot1_writes_reach_storage(main_boots):
    first, _, on_disk = main_boots
    assert all(w["ok"] for w in first.report["writes"]), first.report["writes"]
    after = first.report["inspect_after"]
    for path, content in sc.KEPT_WRITES.items():
        assert after["/persistent" + path]["content"] == content, (path, after["/persistent" + path])
        assert on_disk[path] == content, (path, "not on the ext4 image")
    for path in sc.UNKEPT_WRITES:
        assert on_disk[path] is None, (path, "reached the disk")


def test_main_boot1_status_and_second_apply_change_nothing(main_boots):
    first, _, _ = main_boots
    status = first.report["status"]
    assert status["exit"] == 0, status
    assert json.loads(status["stdout"])["drift"] == 0
    (again,) = first.report["commands"]
    assert again["exit"] == 0, again
    before, after = mount_counts(first.report["mounts"]), mount_counts(first.report["mounts_after"])
    assert before == after, "a second apply stacked or removed mounts"
    assert all(n == 1 for p, n in after.items() if p in EXPECTED_ROOT), after


def test_main_boot2_kept_data_survived(main_boots):
    _, second, _ = main_boots
    assert second.script_exit == 0, second.script_stderr + second.describe()
    ins = second.report["inspect"]
    for path, content in sc.KEPT_WRITES.items():
        assert ins[path]["content"] == content, (path, ins[path])
    assert ins["/etc/machine-id"]["content"] == sc.MACHINE_ID


def test_main_boot2_unkept_data_is_gone(main_boots):
    _, second, _ = main_boots
    ins = second.report["inspect"]
    for path in sc.UNKEPT_WRITES:
        assert not ins[path]["exists"], (path, ins[path])


def test_main_boot2_links_and_mounts(main_boots):
    _, second, _ = main_boots
    ins = second.report["inspect"]
    # .bash_history got a source through its link on boot 1: now a bind mount
    expected = dict(EXPECTED_ROOT)
    expected["/home/bird/.bash_history"] = ("file", 1000, 100, None, True)
    check_root_layout(second, expected)
    hist = ins["/home/bird/.bash_history"]
    assert same_inode(hist, ins["/persistent/home/bird/.bash_history"]), hist
    # method = "symlink" stays a link even though its source exists now
    key = ins["/etc/ssh/ssh_host_ed25519_key.pub"]
    assert key["type"] == "symlink" and key["readlink"] == "/persistent/etc/ssh/ssh_host_ed25519_key.pub"
    assert key["follow"]["ino"] == ins["/persistent/etc/ssh/ssh_host_ed25519_key.pub"]["ino"]
    # id_rsa never got a source: still a link
    assert ins["/etc/nix/id_rsa"]["type"] == "symlink"
    for target in sc.MAIN_DIRS + sc.MAIN_BIND_FILES:
        assert same_inode(ins[target], ins["/persistent" + target]), target
    counts = mount_counts(second.report["mounts"])
    assert all(counts[p] == 1 for p, spec in expected.items() if spec[4]), counts
    assert second.report["status"]["exit"] == 0, second.report["status"]
    assert second.report["commands"][0]["exit"] == 0, second.report["commands"]


# --- the same config by the per-entry shell approach, in the same boots -------

def test_main_shell_approach_made_the_same_tree(main_boots):
    """Stage 1 of both main boots also ran the shell script vm/shell_approach.py
    generates for the demo config (busybox sh) on its own root and its own
    copy of the storage; seen from the booted system, it left the same root
    and the same storage as the script, except where they differ by design
    (machine-id with no source, boot 1). Times are printed, never asserted."""
    first, second, _ = main_boots
    for n, r, expected in ((1, first, sc.SHELL_DIFFERENCES_FRESH_STORAGE), (2, second, set())):
        assert r.shell_exit == 0, r.report["stage1"]["shell_stderr"] + r.describe()
        assert r.report["stage1"]["shell_stderr"] == ""
        diffs = sc.shell_tree_differences(r.report)
        assert {(part, path) for part, path, *_ in diffs} == expected, diffs
        print(f"boot {n}: impermanence_boot.py {r.script_ms:.0f} ms (first Python process of the "
              f"boot), shell approach {r.shell_ms:.0f} ms + {r.shell_mount_ms:.0f} ms mounting storage")
    # boot 1's one difference: the script bound a fresh machine-id, the
    # shell approach linked to the missing source
    trees = first.report["trees"]
    mid = trees["shell_root"]["/etc/machine-id"]
    assert mid["type"] == "symlink" and mid["readlink"] == "/persistent/etc/machine-id", mid
    assert "/etc/machine-id" not in trees["shell_storage"]
    assert trees["script_root"]["/etc/machine-id"]["mountpoint"]


def test_main_shell_approach_targets_are_its_sources(main_boots):
    """The shell approach's mounts are real binds of its own storage (the
    copy on /dev/vdb), not of the script's, and the script's are of /dev/vda:
    the two runs did not touch each other."""
    for r in main_boots[:2]:
        trees = r.report["trees"]
        root, storage = trees["shell_root"], trees["shell_storage"]
        bound = [p for p, e in root.items() if e["mountpoint"] and p != "/persistent"]
        assert len(bound) >= len(sc.MAIN_DIRS), bound
        for path in bound:
            e, src = root[path], storage[path]
            assert (e["dev"], e["ino"]) == (src["dev"], src["ino"]), (path, e, src)
            assert e["mount"]["source"] == sc.SHELL_DEVICE and e["mount"]["root"] == path, e
        assert root["/persistent"]["mount"]["source"] == sc.SHELL_DEVICE
        script_bound = [e for p, e in trees["script_root"].items()
                        if e["mountpoint"] and p not in sc.STAGE1_POINTS]
        assert script_bound and all(e["mount"]["source"] == "/dev/vda" for e in script_bound)
        for target in sc.MAIN_DIRS:
            assert root[target]["dev"] != trees["script_root"][target]["dev"], target


# --- hideMounts and allowTrash: utab survives switch_root --------------------

UTAB_TARGETS_MOUNTED_WITHOUT_OPTIONS = ("/etc/machine-id", "/var/lib/shown")
# The storage stage 1's apply mounted, recorded so that unmount under
# another root tells it from one it did not mount.
UTAB_STORAGE = {"/persistent": ("x-impermanence-boot",)}


@pytest.fixture(scope="module")
def utab_boot(vm_build, tmp_path_factory):
    """One boot of sc.UTAB_CONFIG (hideMounts, an item with allowTrash and
    hideMount = false, ...) with findmnt in stage 2, which then runs
    unmount for one entry and for the whole config."""
    for tool in build_initramfs.TOOLS.values():
        require(Path(tool).is_file(), f"{tool} (util-linux) is not installed")
    work = tmp_path_factory.mktemp("vm-utab")
    disk = machine.make_disk(work / "persist.img", "persist")
    r = boot(vm_build, work, "utab", [disk], config=sc.UTAB_CONFIG, checks=sc.UTAB_CHECKS,
             args=["-v"], tools=("findmnt",), files=sc.UTAB_FILES)
    print(f"utab boot: {r.seconds:.1f} s, impermanence_boot.py {r.script_ms:.0f} ms")
    assert r.script_exit == 0, r.script_stderr + r.describe()
    return r


def findmnt_options(probe: dict) -> dict:
    """target -> its x-* options (userspace, from utab), for every mount
    findmnt --mtab -r -o TARGET,OPTIONS lists (-r writes a space as \\x20)."""
    result = probe["findmnt"]
    assert result["exit"] == 0 and result["stderr"] == "", result
    out = {}
    for line in result["stdout"].splitlines():
        target, options = line.split(" ")
        target = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), target)
        assert target not in out, ("listed twice", target, result["stdout"])
        out[target] = tuple(o for o in options.split(",") if o.startswith("x-"))
    return out


def utab_lines(probe: dict) -> dict:
    """target -> the fields of its utab line."""
    out = {}
    for line in (probe["utab"] or "").splitlines():
        fields = dict(f.split("=", 1) for f in line.split(" "))
        assert fields["TARGET"] not in out, probe["utab"]
        out[fields["TARGET"]] = fields
    return out


def test_utab_options_shown_by_findmnt_after_switch_root(utab_boot):
    """The script recorded the options in stage 1's /run/mount/utab (not a
    path from the host's environment); stage 1 moved /run into the new
    root; the booted system's findmnt --mtab shows them on exactly the
    kept directories that have them."""
    r = utab_boot
    env = r.report["environ"]
    assert "LIBMOUNT_UTAB" not in env, env
    recorded = sorted(line for line in r.script_stderr.splitlines() if " record " in line)
    assert recorded == sorted(f"impermanence: record {','.join(opts)} for /mnt-root{target} "
                              "in /run/mount/utab"
                              for target, opts in {**sc.UTAB_EXPECTED, **UTAB_STORAGE}.items()), \
        r.script_stderr
    probe = r.report["mtab"]
    assert {"utab", "utab.lock", "utab.event"} <= set(probe["utab_dir"] or ()), probe
    shown = findmnt_options(probe)
    assert {t: o for t, o in shown.items() if o} == {**sc.UTAB_EXPECTED, **UTAB_STORAGE}, \
        probe["findmnt"]["stdout"]
    # mounted, but without options: the storage itself, a file, hideMount = false
    for target in UTAB_TARGETS_MOUNTED_WITHOUT_OPTIONS:
        assert shown.get(target) == (), (target, probe["findmnt"]["stdout"])


def test_utab_lines_name_the_booted_mounts(utab_boot):
    """One line a kept directory with options: the mount id, source and fs
    root the booted system's mountinfo gives (switch_root keeps mount ids),
    the target as it sees it."""
    r = utab_boot
    lines = utab_lines(r.report["mtab"])
    assert set(lines) == set(sc.UTAB_EXPECTED) | set(UTAB_STORAGE), r.report["mtab"]["utab"]
    mounts = {m["point"]: m for m in r.report["mounts"]}
    f, m = lines["/persistent"], mounts["/persistent"]
    assert (int(f["ID"]), f["SRC"], f["ROOT"], f["OPTS"]) == (m["id"], "/dev/vda", "/",
                                                              "x-impermanence-boot"), (f, m)
    for target, opts in sc.UTAB_EXPECTED.items():
        f, m = lines[target], mounts[target]
        assert list(f) == ["ID", "SRC", "TARGET", "ROOT", "OPTS"], f
        assert (int(f["ID"]), f["SRC"], f["ROOT"]) == (m["id"], m["source"], m["root"]), (f, m)
        assert (f["SRC"], f["ROOT"], f["OPTS"]) == ("/dev/vda", target, ",".join(opts)), f


def test_utab_unmount_removes_its_lines(utab_boot):
    """unmount on the booted system for one entry's config removes that
    entry's line only; for the whole config, every line: findmnt shows the
    options no more."""
    r = utab_boot
    one, whole = r.report["commands"]
    assert one["exit"] == 0 and one["stderr"] == "", one
    before = utab_lines(r.report["mtab"])
    gone = sc.UTAB_UNMOUNTED_FIRST
    after_one = utab_lines(one["mtab"])
    assert after_one == {t: f for t, f in before.items() if t != gone}, one["mtab"]["utab"]
    shown = findmnt_options(one["mtab"])
    assert gone not in shown, one["mtab"]["findmnt"]["stdout"]
    assert {t: o for t, o in shown.items() if o} == \
        {t: o for t, o in {**sc.UTAB_EXPECTED, **UTAB_STORAGE}.items() if t != gone}, \
        one["mtab"]["findmnt"]["stdout"]
    assert whole["exit"] == 0 and whole["stderr"] == "", whole
    # What stays is the storage's line: on the running system it stays mounted.
    assert set(utab_lines(whole["mtab"])) == set(UTAB_STORAGE), whole["mtab"]["utab"]
    shown = findmnt_options(whole["mtab"])
    assert {t: o for t, o in shown.items() if o} == UTAB_STORAGE, whole["mtab"]["findmnt"]["stdout"]
    # the targets are unmounted; the storage, mounted by stage 1, stays
    assert not set(sc.UTAB_EXPECTED) & set(shown) and "/persistent" in shown, shown


# --- LABEL= without udev ------------------------------------------------------

def test_label_found_among_partitions_without_udev(vm_build, tmp_path):
    # vda: GPT with "boot" (vda1) and "persist" (vda2); vdb: "other". The
    # initramfs has no udev and no /dev/disk/by-label: the script must probe.
    vda = machine.make_partitioned_disk(tmp_path / "vda.img", [("boot", 16), ("persist", 40)])
    vdb = machine.make_disk(tmp_path / "vdb.img", "other", 16)
    r = boot(vm_build, tmp_path, "label", [vda, vdb], config=sc.LABEL_CONFIG,
             checks=sc.LABEL_CHECKS)
    assert r.script_exit == 0, r.script_stderr + r.describe()
    ins = r.report["inspect"]
    assert not ins["/dev/disk"]["exists"] and not ins["/run/udev"]["exists"]
    assert ins["/dev/vda2"]["exists"] and ins["/dev/vdb"]["exists"]
    persistent = [m for m in r.report["mounts"] if m["point"] == "/persistent"]
    assert [m["source"] for m in persistent] == ["/dev/vda2"], persistent
    assert same_inode(ins["/var/lib/nixos"], ins["/persistent/var/lib/nixos"])
    assert same_inode(ins["/etc/machine-id"], ins["/persistent/etc/machine-id"])
    assert r.report["status"]["exit"] == 0, r.report["status"]


# --- faults -----------------------------------------------------------------

def test_missing_device_exit_3_within_timeout_and_boot_goes_on(vm_build, tmp_path):
    # no disk at all: LABEL=persist never appears
    r = boot(vm_build, tmp_path, "missing", [], config=sc.MISSING_CONFIG,
             checks=sc.MISSING_CHECKS, preroot=sc.MISSING_PREROOT)
    assert r.script_exit == 3, r.script_stderr + r.describe()
    err = r.script_stderr
    assert "Traceback" not in err
    assert any(line.startswith("impermanence: ") and "persist" in line for line in err.splitlines()), err
    # waited for the device, but not much longer than deviceTimeout (the
    # rest is the interpreter's start-up under TCG)
    assert sc.MISSING_TIMEOUT * 1000 <= r.script_ms <= (sc.MISSING_TIMEOUT + 20) * 1000, r.script_ms
    ins = r.report["inspect"]
    points = {m["point"] for m in r.report["mounts"]}
    assert "/persistent" not in points
    assert not ins["/var/log"]["exists"] and not ins["/etc/machine-id"]["exists"], ins
    # the other location was still applied
    assert same_inode(ins["/var/lib/state-kept"], ins["/state/var/lib/state-kept"])
    assert "/var/lib/state-kept" in points
    # the error is in the kernel log too (dmesg / journal after boot)
    assert any("impermanence" in line and "persist" in line for line in r.report["kmsg"]), r.report["kmsg"]
    assert "stage 2: running on the new root" in r.console


def test_invalid_config_exit_2_and_nothing_changed(vm_build, tmp_path):
    disk = machine.make_disk(tmp_path / "persist.img", "persist")
    r = boot(vm_build, tmp_path, "invalid", [disk], config=sc.INVALID_CONFIG,
             checks=sc.INVALID_CHECKS)
    assert r.script_exit == 2, r.script_stderr + r.describe()
    err = r.script_stderr
    assert "Traceback" not in err
    assert "directores" in err and "directories" in err, err
    assert all(line.startswith("impermanence: ") for line in err.splitlines() if line), err
    # nothing created on the root, nothing mounted, the disk untouched
    assert set(entries(r)) == STAGE1_MOUNTS, sorted(entries(r))
    assert not machine.debugfs_exists(disk, "/etc")


def test_nonempty_file_at_target_fails_only_that_entry(vm_build, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    sc.seed_leftover_storage(seed)
    disk = machine.make_disk(tmp_path / "persist.img", "persist", seed=seed)
    r = boot(vm_build, tmp_path, "leftover", [disk], config=sc.LEFTOVER_CONFIG,
             checks=sc.LEFTOVER_CHECKS, preroot=sc.LEFTOVER_PREROOT)
    assert r.script_exit == 1, r.script_stderr + r.describe()
    err = r.script_stderr
    assert "Traceback" not in err
    assert any("/etc/ssh/ssh_host_rsa_key" in line for line in err.splitlines()), err
    ins = r.report["inspect"]
    # the failed entry: the leftover is untouched, storage is untouched
    key = ins["/etc/ssh/ssh_host_rsa_key"]
    assert key["type"] == "file" and not key["mountpoint"], key
    assert key["content"] == sc.LEFTOVER_STALE
    assert ins["/persistent/etc/ssh/ssh_host_rsa_key"]["content"] == sc.LEFTOVER_KEY
    assert ins["/persistent/etc/ssh/ssh_host_rsa_key"]["mode"] == "0600"
    # everything else in place: the empty machine-id was simply mounted over
    for target in ("/etc/machine-id", "/etc/adjtime", "/var/log"):
        assert same_inode(ins[target], ins["/persistent" + target]), target
        assert ins[target]["mountpoint"], target
    assert ins["/etc/machine-id"]["content"] == "uninitialized\n"
    assert r.report["status"]["exit"] == 1  # status sees the one entry missing
    # and on the disk itself (read from the host), the key is what it was
    assert machine.debugfs_cat(disk, "/etc/ssh/ssh_host_rsa_key") == sc.LEFTOVER_KEY


# --- hostile storage: what a user who owns a kept directory planted ----------

HOSTILE_TIMEOUT = 90  # a boot takes ~9 s; opening the planted FIFO would hang it
# every path stage 1 or stage 2 looks at in storage, read from the image
# before and after the boot
HOSTILE_DISK_PATHS = (["/", "/etc", "/etc/shadow-like", "/home/bird", "/home/bird/.local"]
                      + [planted for planted, _ in sc.HOSTILE_AFFECTED.values()])
HOSTILE_DISK_DIRS = ["/", "/etc", "/home", "/home/bird", "/home/bird/.local"] + list(sc.HOSTILE_DEEP_TOPS)
# the booted root, apart from stage 1's mount points: (type, uid, gid, mode, mounted?)
HOSTILE_ROOT = {
    "/etc": ("dir", 0, 0, "0755", False),
    "/etc/hostname": ("file", 0, 0, "0644", False),      # decoy
    "/etc/machine-id": ("file", 0, 0, "0444", True),
    "/root": ("dir", 0, 0, "0700", False),               # decoy
    "/root/.marker": ("file", 0, 0, "0600", False),      # decoy
    "/home": ("dir", 0, 0, "0755", False),
    "/home/bird": ("dir", 1000, 100, "0700", False),
    "/home/bird/.profile": ("file", 1000, 100, "0644", True),
    "/home/bird/Documents": ("dir", 1000, 100, "0755", True),
    "/home/bird/Deep": ("dir", 1000, 100, "0755", True),
    "/persistent": ("dir", 0, 0, "0755", True),
    "/var": ("dir", 0, 0, "0755", False),
    "/var/lib": ("dir", 0, 0, "0755", False),
    "/var/lib/nixos": ("dir", 0, 0, "0755", True),
    "/var/log": ("dir", 0, 0, "0755", True),
}


def debugfs_deep_listing(image: Path, top: str) -> str:
    """Every level of a deep tree of the image (sc.plant_hostile_deep) as
    debugfs lists it (inode, mode, owner, name, size of each entry), and
    the leaf's content: one debugfs run, one level at a time."""
    import subprocess
    script = image.with_suffix(".deep.debugfs")
    script.write_text(f"cd {top}\n" + "ls -p\ncd d\n" * sc.HOSTILE_DEEP + "ls -p\ncat leaf\n")
    r = subprocess.run(["debugfs", "-f", str(script), str(image)], capture_output=True,
                       text=True, check=True)
    assert r.stdout.count("debugfs: ls -p") == sc.HOSTILE_DEEP + 1, r.stdout[-500:]
    assert r.stdout.endswith("at the bottom\n"), r.stdout[-500:]
    return r.stdout


def _ancestors(path: str) -> set[str]:
    parts = path.strip("/").split("/")
    return {"/" + "/".join(parts[:i]) for i in range(1, len(parts))}


@pytest.fixture(scope="module")
def hostile_boot(vm_build, tmp_path_factory):
    """One boot on a disk where bird planted links, a hard link, a FIFO and
    a device node at kept paths (vm/scenarios.py, seed_hostile_storage)."""
    work = tmp_path_factory.mktemp("vm-hostile")
    seed = work / "seed"
    seed.mkdir()
    sc.seed_hostile_storage(seed)
    disk = machine.make_disk(work / "persist.img", "persist", seed=seed)
    sc.plant_hostile_deep(disk)
    before = {p: machine.debugfs_stat(disk, p) for p in HOSTILE_DISK_PATHS}
    before.update({"listing " + top: debugfs_deep_listing(disk, top) for top in sc.HOSTILE_DEEP_TOPS})
    listed = {p: machine.debugfs_ls(disk, p) for p in HOSTILE_DISK_DIRS}
    secret = machine.debugfs_cat(disk, "/etc/shadow-like")
    assert secret == sc.HOSTILE_SECRET and before["/home/bird/.netrc"]["links"] == 2, before
    r = boot(vm_build, work, "hostile", [disk], timeout=HOSTILE_TIMEOUT,
             config=sc.HOSTILE_CONFIG, checks=sc.HOSTILE_CHECKS, preroot=sc.HOSTILE_PREROOT,
             initrd=sc.HOSTILE_INITRD, snapshot=sc.HOSTILE_SNAPSHOT)
    after = {p: machine.debugfs_stat(disk, p) for p in HOSTILE_DISK_PATHS}
    after.update({"listing " + top: debugfs_deep_listing(disk, top) for top in sc.HOSTILE_DEEP_TOPS})
    listed_after = {p: machine.debugfs_ls(disk, p) for p in HOSTILE_DISK_DIRS}
    print(f"hostile storage boot: {r.seconds:.1f} s, impermanence_boot.py {r.script_ms:.0f} ms")
    return r, disk, (before, listed, secret), (after, listed_after)


def _lines_naming(lines, path: str) -> list[str]:
    """Lines that name path itself (followed by ": "), not a longer path."""
    return [line for line in lines if f"{path}: " in line]


def test_hostile_storage_each_planted_path_fails_with_one_line(hostile_boot):
    r, *_ = hostile_boot
    assert r.script_exit == 1, r.script_stderr + r.describe()
    lines = [line for line in r.script_stderr.splitlines() if line]
    assert "Traceback" not in r.script_stderr
    assert all(line.startswith("impermanence: ") for line in lines), lines
    # one line per planted path, naming it as stage 1 sees it, with a cause;
    # and nothing else on stderr
    for target, (planted, cause) in sc.HOSTILE_AFFECTED.items():
        named = _lines_naming(lines, "/mnt-root/persistent" + planted)
        assert len(named) == 1, (target, planted, lines)
        assert cause in named[0].split(planted + ": ", 1)[1], (target, named)
    assert len(lines) == len(sc.HOSTILE_AFFECTED), lines
    # the same lines in the kernel log, once each
    kmsg = [line for line in r.report["kmsg"] if "impermanence" in line]
    for target, (planted, cause) in sc.HOSTILE_AFFECTED.items():
        named = _lines_naming(kmsg, "/mnt-root/persistent" + planted)
        assert len(named) == 1 and cause in named[0], (target, kmsg)
    assert not [line for line in r.report["kmsg"] if "ratelimit" in line], r.report["kmsg"]


def test_hostile_storage_nothing_outside_kept_paths_changed(hostile_boot):
    r, *_ = hostile_boot
    rep = r.report
    unaffected = set(sc.HOSTILE_UNAFFECTED)
    # mounts (stage 2's /proc/self/mountinfo): stage 1's, the root, the
    # storage and the unaffected targets, nothing else (not /etc, /root)
    points = [m["point"] for m in rep["mounts"]]
    assert set(points) == STAGE1_MOUNTS | {"/", "/persistent"} | unaffected, points
    assert [(m["fstype"], m["source"]) for m in rep["mounts"] if m["point"] == "/"] \
        == [("tmpfs", "root")], rep["mounts"]
    # /, /etc and /root as the booted system sees them
    ins = rep["inspect"]
    for path, mode in (("/", "0755"), ("/etc", "0755"), ("/root", "0700")):
        e = ins[path]
        assert (e["type"], e["uid"], e["gid"], e["mode"], e["mountpoint"]) \
            == ("dir", 0, 0, mode, path == "/"), e
    assert set(rep["trees"]["etc"]) == {"/hostname", "/machine-id"}, rep["trees"]["etc"]
    assert set(rep["trees"]["root"]) == {"/.marker"}, rep["trees"]["root"]
    assert ins["/etc/hostname"]["content"] == sc.HOSTILE_PREROOT["/etc/hostname"][0]
    assert ins["/root/.marker"]["content"] == sc.HOSTILE_PREROOT["/root/.marker"][0]
    # the whole booted root: the expected entries, nothing else
    got = entries(r)
    extra = set(got) - STAGE1_MOUNTS - set(HOSTILE_ROOT)
    assert extra == set(), sorted(extra)
    for path, (kind, uid, gid, mode, mounted) in HOSTILE_ROOT.items():
        e = got.get(path)
        assert e is not None, (path, "missing")
        assert (e["type"], e["uid"], e["gid"], e["mode"], e["mountpoint"]) \
            == (kind, uid, gid, mode, mounted), (path, e)
    # stage 1's snapshots around the script: the initramfs's /, /etc and
    # /root untouched; on the fresh root, only kept targets and their
    # parents (and the storage mount point) were created, nothing changed
    before = machine.parse_snapshot(rep["stage1"]["snapshot-before"])
    after = machine.parse_snapshot(rep["stage1"]["snapshot-after"])
    assert before and after, rep["stage1"]
    assert "/etc/initrd-decoy" in before and "/root/.marker" in before
    assert "/mnt-root/root/.marker" in before and "/mnt-root/etc/hostname" in before
    import hashlib  # the snapshot holds contents, not only names
    decoy = sc.HOSTILE_INITRD["/etc/initrd-decoy"][0].encode()
    assert after["/etc/initrd-decoy"]["md5"] == hashlib.md5(decoy).hexdigest(), after
    assert (after["/root"]["type"], after["/root"]["mode"]) == ("directory", "0700"), after["/root"]
    assert "/mnt-root/etc/machine-id" in after  # taken after the script
    changes = machine.snapshot_changes(before, after)
    assert changes["removed"] == [] and changes["changed"] == [], changes
    allowed = {"/persistent"}
    for target in unaffected:
        allowed |= {target} | _ancestors(target)
    created = {p[len("/mnt-root"):] for p in changes["created"]}
    assert all(p.startswith("/mnt-root/") for p in changes["created"]), changes
    assert created <= allowed, sorted(created - allowed)


def test_hostile_storage_unaffected_entries_in_place(hostile_boot):
    r, *_ = hostile_boot
    rep = r.report
    assert "stage 2: running on the new root" in r.console
    ins = rep["inspect"]
    mounts = {m["point"]: m for m in rep["mounts"]}
    for target, (kind, probe, content) in sc.HOSTILE_UNAFFECTED.items():
        assert same_inode(ins[target], ins["/persistent" + target]), (target, ins[target])
        assert ins[target]["type"] == kind and ins[target]["mountpoint"], ins[target]
        assert (mounts[target]["source"], mounts[target]["root"]) == ("/dev/vda", target)
        assert ins[probe]["content"] == content, (probe, ins[probe])
    # the affected ones are not: nothing is made at their targets
    for target in sc.HOSTILE_AFFECTED:
        assert not ins[target]["exists"], ins[target]
    # status counts the affected entries; a second apply on the booted
    # system meets the same storage: the same failures, no new mount
    status = rep["status"]
    assert status["exit"] == 1 and json.loads(status["stdout"])["drift"] == len(sc.HOSTILE_AFFECTED), \
        status
    again = rep["commands"][0]
    assert again["exit"] == 1, again
    again_lines = [line for line in again["stderr"].splitlines() if line]
    assert len(again_lines) == len(sc.HOSTILE_AFFECTED), again_lines
    for planted, _ in sc.HOSTILE_AFFECTED.values():
        assert len(_lines_naming(again_lines, "/persistent" + planted)) == 1, (planted, again_lines)
    assert mount_counts(rep["mounts"]) == mount_counts(rep["mounts_after"])


def test_hostile_storage_unchanged_on_disk(hostile_boot):
    r, disk, (before, listed, secret), (after, listed_after) = hostile_boot
    # read from the image on the host: every planted node and the root file
    # as they were (inode, type, owner, mode, links, size, link text), no
    # entry added or removed in the directories around them
    assert after == before, [(p, before[p], after[p]) for p in before if before[p] != after[p]]
    assert listed_after == listed
    for planted, target in sc.HOSTILE_LINKS.items():
        assert after[planted]["type"] == "symlink" and after[planted]["link"] == target, after[planted]
    assert after["/home/bird/.netrc"]["inode"] == after["/etc/shadow-like"]["inode"]
    shadow = after["/etc/shadow-like"]
    assert (shadow["uid"], shadow["gid"], shadow["mode"], shadow["links"]) == (0, 0, "0600", 2), shadow
    assert machine.debugfs_cat(disk, "/etc/shadow-like") == secret == sc.HOSTILE_SECRET
    assert after["/home/bird/.bash_history"]["type"] == "FIFO"
    assert after["/home/bird/disk.img"]["type"] == "block"
    assert after["/home/bird/agent.sock"]["type"] == "socket"
    # and as the booted system saw storage
    ins = r.report["inspect"]
    for planted, target in sc.HOSTILE_LINKS.items():
        e = ins["/persistent" + planted]
        assert e["type"] == "symlink" and e["readlink"] == target, e
    s = ins["/persistent/etc/shadow-like"]
    assert (s["uid"], s["gid"], s["mode"], s["content"]) == (0, 0, "0600", sc.HOSTILE_SECRET), s
    assert ins["/persistent/home/bird/.netrc"]["ino"] == s["ino"]


def test_hostile_storage_deep_trees(hostile_boot):
    """~/Deep, kept, holds a tree sc.HOSTILE_DEEP levels deep: bound whole
    in stage 1 (nothing walks it), in place. orphans on the booted system
    walks the unkept ~/.junk's as deep as its 1,024 fds let it: one line,
    no traceback, its report made; on the image both trees are as they
    were (test_hostile_storage_unchanged_on_disk compares every level)."""
    r, *_ = hostile_boot
    ins = r.report["inspect"]
    assert same_inode(ins["/home/bird/Deep"], ins["/persistent/home/bird/Deep"])
    orphans = r.report["commands"][1]
    assert orphans["args"] == ["orphans"], orphans["args"]
    assert "Traceback" not in orphans["stderr"] and "internal error" not in orphans["stderr"]
    lines = [line for line in orphans["stderr"].splitlines() if line]
    assert orphans["exit"] in (0, 1), (orphans["exit"], [line[:200] for line in lines])
    assert len(lines) == 1, [line[:200] for line in lines]
    assert lines[0].startswith("impermanence: /persistent/home/bird/.junk/d/d/"), lines[0][:200]
    assert lines[0].endswith(": Too many open files"), lines[0][-200:]
    assert "/persistent/etc/shadow-like" in orphans["stdout"], orphans["stdout"][-2000:]
    # ~/Deep is kept: not walked, not named
    assert "/persistent/home/bird/Deep" not in orphans["stdout"] + orphans["stderr"]


def test_hostile_storage_console_shows_each_failure_once(hostile_boot):
    """What a person at the console sees: stage 1 echoes the script's
    stderr ("stage 1: | "): one line per planted path, nothing else from
    the script, and the boot goes on into stage 2 well within its timeout."""
    r, *_ = hostile_boot
    shown = [line[len("stage 1: | "):] for line in r.console.splitlines()
             if line.startswith("stage 1: | ")]
    assert len(shown) == len(sc.HOSTILE_AFFECTED), shown
    for planted, cause in sc.HOSTILE_AFFECTED.values():
        named = _lines_naming(shown, "/mnt-root/persistent" + planted)
        assert len(named) == 1 and cause in named[0], (planted, shown)
    assert "impermanence_boot.py exited 1" in r.console
    assert "stage 2: running on the new root" in r.console
    assert r.seconds < HOSTILE_TIMEOUT / 2, r.seconds


def test_errors_reach_the_kernel_log_even_with_verbose(vm_build, tmp_path):
    # SPEC section 2: errors always, and in an initrd also in dmesg. The
    # kernel rate-limits /dev/kmsg writers (printk.devkmsg=ratelimit: 10
    # lines per 5 s), so with -v an error that comes after many action lines
    # is lost from dmesg unless the script spends the budget on it.
    disk = machine.make_disk(tmp_path / "persist.img", "persist")
    r = boot(vm_build, tmp_path, "kmsg", [disk], config=sc.KMSG_CONFIG, checks=sc.KMSG_CHECKS,
             preroot=sc.KMSG_PREROOT, args=["-v"])
    assert r.script_exit == 1, r.script_stderr + r.describe()
    errors = [line for line in r.script_stderr.splitlines()
              if "/var/spool/late.conf" in line and ("not empty" in line or "non-empty" in line)]
    assert errors, r.script_stderr
    assert len(r.script_stderr.splitlines()) > 10  # enough to exhaust the burst
    assert any("/var/spool/late.conf" in line for line in r.report["kmsg"]), \
        [line for line in r.report["kmsg"] if "ratelimit" in line] or r.report["kmsg"]
    assert r.report["inspect"]["/var/spool/late.conf"]["content"] == "leftover\n"


def test_initramfs_modules_are_computed_from_the_script(vm_build, tmp_path):
    manifest = json.loads((vm_build / "manifest.json").read_text())
    mods = set(manifest["stdlib_needed"])
    # the script's own imports, read from its source (lazy ones included)
    import ast
    tree = ast.parse(SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            imported.add(node.module)
    missing = imported - mods
    assert not missing, f"the script imports {missing}, not in the initramfs"
    assert {"encodings", "encodings.utf_8"} <= mods  # the interpreter's start-up
    assert "_ctypes" in manifest["stdlib_modules"] or "ctypes" not in imported
    assert any(lib.endswith("libffi.so.8") for lib in manifest["shared_libraries"]) \
        or "ctypes" not in imported
    # and another script gets another list: nothing is hand-kept
    other = tmp_path / "other.py"
    other.write_text("import sys\n\ndef f():\n    import csv\n    return csv\n")
    found = build_initramfs.find_modules([other], None)["modules"]
    assert "csv" in found and "_csv" in found
    assert "csv" not in mods and "json" not in found
    # every needed module that is not built in or frozen is a file in the image
    files = set(manifest["stdlib_modules"]) | set(manifest["stdlib_frozen_not_copied"])
    builtin = set(manifest["stdlib_builtin"])
    assert mods <= files | builtin, mods - files - builtin
