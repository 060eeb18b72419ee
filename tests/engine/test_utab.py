"""hideMounts and allowTrash: the userspace options of each bind mount apply
makes, recorded in libmount's utab (util-linux's format and locking), and
removed again by unmount."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import BIRD, base_config, mount_points_under, mount_table, require, unescape


def utab_env(sandbox) -> tuple:
    utab = sandbox.work / "run" / "mount" / "utab"
    utab.parent.mkdir(parents=True, exist_ok=True)
    return utab, {"LIBMOUNT_UTAB": str(utab)}


def fields(line: str) -> dict:
    return {k: unescape(v) for k, v in (f.split("=", 1) for f in line.split(" "))}


def mount_ids(root: Path) -> dict:
    """mount point -> (id, source, fs root) of the top mount there, from mountinfo."""
    return {m.point: (m.id, m.source, m.root) for m in mount_table() if m.point.startswith(str(root))}


HIDDEN = {
    "hideMounts": True,
    "directories": [
        "/var/log",
        {"directory": "/srv/shared", "hideMount": False, "allowTrash": True},
        {"directory": "/srv/with space", "allowTrash": True},
        {"directory": "/srv/plain", "hideMount": None},  # null: the location's
    ],
    "files": ["/etc/hostname"],
    "users": {"bird": {"directories": ["Documents"]}},
}


def test_apply_records_the_options_of_each_bind_in_utab(sandbox, disk):
    utab, env = utab_env(sandbox)
    utab.write_text("ID=7 SRC=/dev/sdz TARGET=/mnt/other\\040disk ROOT=/ OPTS=x-foo\n")
    cfg = base_config(disk.label, HIDDEN)
    plan = sandbox.run("plan", config=cfg, env=env)
    recorded = [line for line in plan.stdout.splitlines() if line.startswith("record ")]
    assert recorded == [
        # The storage apply mounts: unmount unmounts only what it finds so.
        f"record x-impermanence-boot for {sandbox.path('/persistent')} in {utab}",
        f"record x-gvfs-hide for {sandbox.path('/home/bird/Documents')} in {utab}",
        f"record x-gvfs-hide for {sandbox.path('/srv/plain')} in {utab}",
        f"record x-gvfs-trash for {sandbox.path('/srv/shared')} in {utab}",
        f"record x-gvfs-hide,x-gvfs-trash for {sandbox.path('/srv/with space')} in {utab}",
        f"record x-gvfs-hide for {sandbox.path('/var/log')} in {utab}",
    ], plan.stdout
    result = sandbox.run("-v", "apply", env=env)
    assert result.returncode == 0, result.stderr
    lines = utab.read_text().splitlines()
    # The line that was there stays, as it was; one line a bind with options.
    assert lines[0] == "ID=7 SRC=/dev/sdz TARGET=/mnt/other\\040disk ROOT=/ OPTS=x-foo"
    assert "TARGET=/srv/with\\040space " in utab.read_text()
    ids = mount_ids(sandbox.root)
    got = {}
    for line in lines[1:]:
        f = fields(line)
        assert list(f) == ["ID", "SRC", "TARGET", "ROOT", "OPTS"], line
        # TARGET as the booted system sees it; ID, SRC and ROOT as mountinfo gives them.
        point = str(sandbox.root) + f["TARGET"]
        assert (f["ID"], f["SRC"], f["ROOT"]) == ids[point], (line, ids[point])
        if f["TARGET"] != "/persistent":
            assert f["ROOT"] == f["TARGET"]  # the storage filesystem holds it at the same path
        got[f["TARGET"]] = f["OPTS"]
    assert got == {"/persistent": "x-impermanence-boot", "/home/bird/Documents": "x-gvfs-hide", "/srv/plain": "x-gvfs-hide",
                   "/srv/shared": "x-gvfs-trash", "/srv/with space": "x-gvfs-hide,x-gvfs-trash",
                   "/var/log": "x-gvfs-hide"}
    # As libmount leaves them: the lock file beside it, the event file touched.
    assert (utab.parent / "utab.lock").exists() and (utab.parent / "utab.event").exists()
    assert sorted(os.listdir(utab.parent)) == ["utab", "utab.event", "utab.lock"]
    # plan printed what apply did, these lines included.
    logged = [l.removeprefix("impermanence: ") for l in result.stderr.splitlines()]
    assert [l for l in logged if l.startswith("record ")] == recorded
    # Again: nothing new is mounted, so nothing new is recorded.
    again = sandbox.run("apply", env=env)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert utab.read_text().splitlines() == lines
    # unmount takes its lines out again, and leaves the other one.
    assert sandbox.run("unmount", env=env).returncode == 0
    assert utab.read_text() == "ID=7 SRC=/dev/sdz TARGET=/mnt/other\\040disk ROOT=/ OPTS=x-foo\n"
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]


def test_no_options_no_utab(sandbox, tmp_path):
    # Storage stage 1 mounted, no options: nothing to record.
    from support import tmpfs_at

    utab, env = utab_env(sandbox)
    tmpfs_at(sandbox.path("/persistent"))
    cfg = {"persistence": {"/persistent": {"directories": ["/var/log"], "allowTrash": False}}}
    assert sandbox.run("apply", config=cfg, env=env).returncode == 0
    assert not utab.exists()


def test_an_unwritable_utab_fails_the_run_not_the_mounts(sandbox, disk):
    env = {"LIBMOUNT_UTAB": str(sandbox.work / "no" / "such" / "utab")}
    cfg = base_config(disk.label, {"hideMounts": True, "directories": ["/var/log"]})
    result = sandbox.run("apply", config=cfg, env=env)
    assert result.returncode == 1
    assert result.stderr == (f"impermanence: {sandbox.work / 'no' / 'such'}: cannot record mount "
                             "options: mkdir: No such file or directory\n")
    assert os.path.ismount(sandbox.path("/var/log"))


@pytest.mark.parametrize("value", ["yes", 1])
def test_options_must_be_booleans(sandbox, value):
    from support import error_of, config

    exc = error_of(config(directories=[{"directory": "/a", "hideMount": value}]))
    assert exc.where == 'persistence["/persistent"].directories[0].hideMount'
    assert "true or false" in exc.cause
    exc = error_of(config(allowTrash=value))
    assert exc.where == 'persistence["/persistent"].allowTrash'


def test_findmnt_shows_the_options_in_the_root_as_booted(sandbox, disk):
    # The root apply worked on, entered as the booted system enters it
    # (chroot, its own /proc): util-linux's findmnt merges utab into the
    # kernel's table and shows the userspace options on the binds.
    findmnt = shutil.which("findmnt")
    require(findmnt is not None, "findmnt (util-linux) is not installed")
    R = sandbox.root
    utab = R / "run" / "mount" / "utab"
    utab.parent.mkdir(parents=True)
    cfg = base_config(disk.label, HIDDEN)
    result = sandbox.run("apply", config=cfg, env={"LIBMOUNT_UTAB": str(utab)})
    assert result.returncode == 0, result.stderr
    for d in ("usr", "proc"):
        (R / d).mkdir()
    for link in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + link):
            os.symlink(os.readlink("/" + link), R / link)
    subprocess.run(["mount", "--rbind", "/usr", str(R / "usr")], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(R / "proc")], check=True)
    env = {k: v for k, v in os.environ.items() if k != "LIBMOUNT_UTAB"}  # the default path
    shown = subprocess.run(["chroot", str(R), "findmnt", "--mtab", "-n", "-r", "-o", "TARGET,OPTIONS"],
                           capture_output=True, text=True, env=env, check=True).stdout
    options = {unescape(t.replace("\\x20", " ")): o.split(",")
               for t, o in (line.split(" ", 1) for line in shown.splitlines())}
    assert "x-gvfs-hide" in options["/var/log"] and "x-gvfs-trash" not in options["/var/log"]
    assert "x-gvfs-trash" in options["/srv/shared"] and "x-gvfs-hide" not in options["/srv/shared"]
    assert "x-gvfs-hide" in options["/home/bird/Documents"]
    assert not {"x-gvfs-hide", "x-gvfs-trash"} & set(options["/persistent"])
    assert os.stat(R / "home/bird/Documents").st_uid == BIRD


OTHERS = (b"ID=7 SRC=/dev/sdz TARGET=/mnt/a\rb ROOT=/ OPTS=x-foo\n"  # a carriage return in TARGET
          b"ID=99999 SRC=tmpfs TARGET=/var/log ROOT=/ OPTS=x-mine=keep\n"  # another mount, same TARGET
          b"ID=88888 SRC=/dev/sdy TARGET=/srv/plain ROOT=/ OPTS=x-other\n"
          b"SRC=/dev/sdx TARGET=/srv/shared ROOT=/ OPTS=x-old-libmount\n")  # no ID: an older libmount's


def test_other_programs_lines_stay_byte_identical(sandbox, disk):
    # Lines are bytes split at newlines only, and ours are told apart by
    # mount ID (and SRC, TARGET, ROOT where a line has no ID): a line for
    # another mount at one of our TARGETs is not ours.
    utab, env = utab_env(sandbox)
    utab.write_bytes(OTHERS)
    cfg = base_config(disk.label, HIDDEN)
    result = sandbox.run("apply", config=cfg, env=env)
    assert result.returncode == 0, result.stderr
    data = utab.read_bytes()
    assert data.startswith(OTHERS), data
    ours = data[len(OTHERS):].splitlines()
    assert len(ours) == 6 and all(l.startswith(b"ID=") for l in ours), data
    assert sandbox.run("apply", env=env).returncode == 0
    assert utab.read_bytes() == data
    result = sandbox.run("unmount", env=env)
    assert result.returncode == 0, result.stderr
    assert utab.read_bytes() == OTHERS
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]


def test_a_scratch_root_leaves_the_hosts_utab_alone(sandbox, disk):
    # apply --root <dir> on a running system (not an initramfs, no
    # LIBMOUNT_UTAB): TARGETs of the scratch root do not belong in the
    # host's /run/mount/utab; -v says so.
    host_run = Path("/run/mount")
    made = not host_run.exists()
    host_run.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "host-run-mount", str(host_run)], check=True)
    try:
        (host_run / "utab").write_bytes(OTHERS)
        env = {k: v for k, v in os.environ.items() if k != "LIBMOUNT_UTAB"}
        env.pop("IMPERMANENCE_CONFIG", None)
        env["IMPERMANENCE_NO_KMSG"] = "1"
        sandbox.write_config(base_config(disk.label, HIDDEN))
        import sys
        from support import SCRIPT
        args = [sys.executable, str(SCRIPT), "--root", str(sandbox.root), "--config", str(sandbox.config_path)]
        result = subprocess.run([*args, "-v", "apply"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert any("utab" in l and "left alone" in l for l in result.stderr.splitlines()), result.stderr
        assert sorted(os.listdir(host_run)) == ["utab"]
        assert (host_run / "utab").read_bytes() == OTHERS
        result = subprocess.run([*args, "unmount"], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert (host_run / "utab").read_bytes() == OTHERS
        # the scratch root's own record: the storage apply mounted is unmounted too
        assert mount_points_under(sandbox.root) == [str(sandbox.root)]
    finally:
        subprocess.run(["umount", "-l", str(host_run)])
        if made:
            host_run.rmdir()
