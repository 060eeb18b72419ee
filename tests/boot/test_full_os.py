"""A real operating system on top (vm/full_os.py): a minimal Debian whose
stage 2 is systemd, booted three times under QEMU (TCG) from a btrfs root
that rotate-root makes fresh at every boot (a snapshot of `blank`, in
Debian's dracut systemd initrd with dist/dracut), with the persistent disk
found by LABEL=persist. What the booted system sees is reported from inside
it by vehicle-check.service (vm/full_os_guest/vehicle-check); the console
holds the shutdown.

Boot 1 writes outside the kept paths, writes the host key and alice's
files; boot 2 has alice replace two kept `method = "symlink"` files, one
by rename of a temporary as fish does, one by `mv`; the shutdown's
`save` (impermanence-save.service) must have put them into storage by
boot 3. The kill -9 of `save` at every write and rename is
tests/test_save.py's (test_sigkill_at_every_write_rename_and_unlink_then_save_again).
With CI=true nothing here may skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import PROJECT, require
import dist_support as ds
from dist_support import machine
import full_os  # vm/full_os.py

pytestmark = pytest.mark.vm

REPORT = Path(os.environ.get("IMPERMANENCE_FULL_OS_REPORT", str(PROJECT / "dist/build/full-os.json")))
HOME = "/home/alice"
FISH = HOME + "/.local/share/fish/fish_history"
SETTINGS = HOME + "/.config/app/settings.conf"
# The directories apply binds, hideMounts on: each must carry x-gvfs-hide
# (docs/behaviour.md: hideMounts is a directory's setting).
HIDDEN = ("/var/log", "/var/lib/systemd", "/var/lib/vehicle", HOME + "/Documents", HOME + "/.ssh")
BOOTS = (1, 2, 3)


class Vehicle:
    def __init__(self, boots, root, persist, timings):
        self.boots, self.root, self.persist, self.timings = boots, root, persist, timings

    def report(self, n: int) -> dict:
        r = self.boots[n].report
        assert r is not None, f"boot {n}: the checker never reported\n{self.boots[n].describe()}"
        assert "error" not in r, f"boot {n}: the checker failed:\n{r['error']}"
        return r


@pytest.fixture(scope="module")
def vehicle(tmp_path_factory):
    require(os.geteuid() == 0, "it needs root (loop mounts, debootstrap, the kernel in /boot)")
    require(machine.qemu_available(), "qemu-system-x86_64 is not installed")
    for tool, pkg in (("debootstrap", "debootstrap"), ("mkfs.btrfs", "btrfs-progs"),
                      ("dracut", "dracut-core"), ("zstd", "zstd"), ("depmod", "kmod"),
                      ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs"),
                      ("unshare", "util-linux"), ("systemd-escape", "systemd")):
        require(shutil.which(tool) is not None, f"{tool} ({pkg}) is not installed")
    ds.python()  # require()s the interpreter
    try:
        kver = ds.build_initramfs.default_kver()
    except ds.build_initramfs.BuildError as e:
        require(False, str(e))
    base, base_seconds = full_os.ensure_base()
    built, initrd_seconds = full_os.ensure_initrd(kver)
    work = tmp_path_factory.mktemp("full-os")
    root = full_os.make_root_disk(base, work / "root.img", kver)
    persist = full_os.make_persist_disk(work / "persist.img")
    boots = {}
    for n in BOOTS:
        b = full_os.boot(built, work, n, [root, persist])
        assert not b.raw.timed_out, f"boot {n} timed out\n{b.describe()}"
        boots[n] = b
    timings = {"base_build_seconds": base_seconds and round(base_seconds, 1),
               "initrd_build_seconds": initrd_seconds and round(initrd_seconds, 1),
               "initrd_bytes": built.size, "base_image_bytes_used": base.stat().st_blocks * 512,
               "base_image_bytes": base.stat().st_size, "kver": kver,
               "boot_seconds": {n: round(b.seconds, 1) for n, b in boots.items()},
               "startup": {n: (b.report or {}).get("analyze", "").splitlines()[:1]
                           for n, b in boots.items()},
               "initrd_units": {n: unit_seconds(b) for n, b in boots.items()}}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    # What each boot reported, for a failure's reader.
    REPORT.with_suffix(".boots.json").write_text(json.dumps({n: b.report for n, b in boots.items()}, indent=1))
    return Vehicle(boots, root, persist, timings)


_UNIT_LINE = re.compile(r"^\[\s*(\d+\.\d+)\] \S+ systemd\[1\]: (Starting|Finished) (\S+)")


def unit_seconds(b) -> dict:
    """{unit: seconds from its start to its end}, of the initrd's units, by
    the journal's monotonic times."""
    seen: dict = {}
    for line in ((b.report or {}).get("initrd_units") or "").splitlines():
        m = _UNIT_LINE.match(line)
        if m and m.group(3).startswith("impermanence-") and "save" not in m.group(3):
            seen.setdefault(m.group(3), {})[m.group(2)] = float(m.group(1))
    return {u: round(t["Finished"] - t["Starting"], 3) for u, t in seen.items()
            if {"Starting", "Finished"} <= t.keys()}


def test_every_boot_runs_with_no_failed_unit(vehicle):
    for n in BOOTS:
        r = vehicle.report(n)
        assert r["boot"] == n
        assert r["failed"] == "", f"boot {n}: systemctl --failed:\n{r['failed']}\n{r['warnings']}"
        assert r["system_running"] == "running", (n, r["system_running"])


def test_both_initrd_units_ran_at_every_boot(vehicle):
    for n in BOOTS:
        units = unit_seconds(vehicle.boots[n])
        assert set(units) == {"impermanence-rotate-root.service", "impermanence-boot.service"}, \
            (n, vehicle.report(n)["initrd_units"])


def stage2_lines(text: str) -> list[str]:
    """The journal lines logged after the switch to the booted root."""
    lines = text.splitlines()
    switch = max(i for i, l in enumerate(lines) if "Switching root" in l)
    return lines[switch + 1:]


def test_the_machine_id_is_kept_and_systemd_does_not_complain(vehicle):
    first = vehicle.report(1)["machine_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first), first
    # The first boot: systemd made the id and committed it through the bind mount.
    one = stage2_lines(vehicle.report(1)["machine_id_lines"])
    assert any("Initializing machine ID from random generator" in l for l in one), one
    assert any("Finished systemd-machine-id-commit.service" in l for l in one), one
    assert "ConditionResult=yes" in vehicle.report(1)["commit_unit"]
    assert "Result=success" in vehicle.report(1)["commit_unit"]
    for n in (2, 3):
        r = vehicle.report(n)
        assert r["machine_id"] == first, n
        # Not a first boot: no new id, the commit unit skipped, no warning about it.
        lines = stage2_lines(r["machine_id_lines"])
        skipped = [l for l in lines if "systemd-machine-id-commit.service" in l
                   and "skipped because of an unmet condition check (ConditionFirstBoot=yes)" in l]
        assert len(skipped) == 1 and lines == skipped, (n, r["machine_id_lines"])
        assert "ConditionResult=no" in r["commit_unit"], (n, r["commit_unit"])
        assert not [l for l in r["warnings"].splitlines() if re.search(r"machine.id", l, re.I)], \
            (n, r["warnings"])


def test_the_journal_lists_every_earlier_boot(vehicle):
    ids = [vehicle.report(n)["boot_id"].replace("-", "") for n in BOOTS]
    for n in BOOTS:
        listed = vehicle.report(n)["list_boots"]
        rows = [l.split()[1] for l in listed.splitlines()[1:] if l.strip()]
        assert rows == ids[:n], (n, listed)


def test_kept_mounts_carry_x_gvfs_hide(vehicle):
    for n in BOOTS:
        table = {fs["target"]: fs for fs in vehicle.report(n)["findmnt"]["filesystems"]}
        for target in HIDDEN:
            assert target in table, (n, target, sorted(table))
            assert "x-gvfs-hide" in table[target]["options"].split(","), (n, table[target])


def test_a_unit_writing_into_a_kept_directory_at_shutdown_finds_its_write(vehicle):
    assert vehicle.report(1)["stopped"] == {"error": "No such file or directory"}
    for n in (2, 3):
        stopped = vehicle.report(n)["stopped"]
        assert stopped.get("text", "").strip() == vehicle.report(n - 1)["boot_id"], (n, stopped)


def test_every_shutdown_unmounts_without_failure(vehicle):
    for n in BOOTS:
        b = vehicle.boots[n]
        assert b.raw.returncode == 0, b.describe()
        assert "Failed unmounting" not in b.console, (n, b.describe())
        assert "reboot: Power down" in b.console, (n, b.describe())


def test_the_root_is_fresh_at_every_boot(vehicle):
    for n in BOOTS:
        unkept = vehicle.report(n)["unkept"]
        assert unkept and not any(unkept.values()), (n, unkept)  # boot 1 wrote them all


def test_the_old_roots_are_on_the_disk(vehicle):
    """As the host reads the root disk after the last shutdown: boots 2 and
    3 moved the roots of boots 1 and 2 to old_roots (boot 1 made the first
    root), and boot 1's file outside the kept paths is in the oldest."""
    script = ('set -e; m=$(mktemp -d); mount -o ro,loop "$0" "$m"; '
              'ls "$m/old_roots"; echo --; ls "$m/old_roots/"*/etc/vehicle-unkept; umount "$m"; rmdir "$m"')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                          str(vehicle.root)], capture_output=True, text=True, check=True).stdout
    names, _, found = out.partition("--\n")
    names = names.split()
    assert len(names) == 2 and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ(\.\d+)?", n)
                                   for n in names), names
    [path] = found.split()
    assert path.endswith(f"/old_roots/{min(names)}/etc/vehicle-unkept"), out


def test_the_host_key_and_alices_files_are_kept(vehicle):
    keys = []
    for n in (2, 3):
        r = vehicle.report(n)
        key = r["host_key"]
        assert key["type"] == "file" and key["mode"] == "0600" and key["uid"] == 0, (n, key)
        keys.append(key["sha"])
        note = r["entries"][HOME + "/Documents/note"]
        assert note["text"] == "note\n" and note["uid"] == 1000, (n, note)
        history = r["entries"][HOME + "/.bash_history"]
        assert history["type"] == "symlink" and history["link"] == "/persistent" + HOME + "/.bash_history"
    assert keys[0] == keys[1]


def test_save_ran_at_every_shutdown(vehicle):
    for n in (2, 3):
        # The previous boot's journal: save stopped (ExecStop ran it) and succeeded.
        log = vehicle.report(n)["previous_save"]
        assert "Stopping impermanence-save.service" in log and "Stopped impermanence-save.service" in log, log
        assert "Failed" not in log, log


def test_files_replaced_by_rename_are_saved_at_shutdown(vehicle):
    two = vehicle.report(2)
    assert two["alice_rename"]["rc"] == 0 and two["alice_mv"]["rc"] == 0, two
    for path in (FISH, SETTINGS):
        # Before: the link apply made, the old content.
        assert two["entries"][path]["type"] == "symlink", two["entries"][path]
        # The rename replaced the link by a plain file on the wiped root...
        assert two["after_replace"][path]["type"] == "file", two["after_replace"]
        # ...which status calls replaced.
        assert re.search(rf"^replaced\s+file\s+{re.escape(path)}", two["status_after"]["out"], re.M), \
            two["status_after"]
    assert two["entries"][FISH]["text"] == "- cmd: echo boot 1\n"
    assert two["entries"][SETTINGS]["text"] == "colour=blue\n"
    three = vehicle.report(3)
    expected = {FISH: "- cmd: echo boot 1\n- cmd: echo boot 2\n", SETTINGS: "colour=green\n"}
    for path, text in expected.items():
        entry = three["entries"][path]
        assert entry["type"] == "symlink" and entry["link"] == "/persistent" + path, entry
        assert entry["text"] == text, entry
    # Storage holds the saved files and nothing else (no temporary, no conflict copy).
    assert three["storage_dirs"] == {os.path.dirname(FISH): ["fish_history"],
                                     os.path.dirname(SETTINGS): ["settings.conf"]}
    assert "replaced" not in three["status_before"]["out"]
    # And as the host reads the disk after the last shutdown.
    for path, text in expected.items():
        assert machine.debugfs_cat(vehicle.persist, path) == text
        listing = machine.debugfs_ls(vehicle.persist, os.path.dirname(path))
        assert sorted(listing) == [os.path.basename(path)], listing
