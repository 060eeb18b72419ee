"""save: kept files that programs replace by rename() (fish's history,
dconf, editors' atomic save) go into storage, and the link or bind comes
back. The attacks come first: what a user may plant at a kept file's
target is refused with one line and storage stays as it was; save killed
at every write, rename and unlink leaves storage's copy whole (old or new)
and the next save finishes."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import (BIRD, PROJECT, SCRIPT, USERS_GID, mounts_under, require, run_on, script_env,
                     strace_prefix, tmpfs_at, assert_clean_messages, tree_digest)

OLD_FISH = b"- cmd: ls\n  when: 1\n"
OLD_APP = b"old app\n"
HISTORY = ".local/share/fish/fish_history"

CONFIG = {
    "users": {"bird": {"uid": BIRD, "group": "users", "home": "/home/bird"}},
    "groups": {"users": {"gid": USERS_GID}},
    "persistence": {"/persistent": {
        "files": ["/etc/app.conf", "/etc/new.conf", {"file": "/etc/sym.conf", "method": "symlink"}],
        "users": {"bird": {"files": [{"file": HISTORY, "method": "symlink"}]}},
    }},
}


def world(root: Path) -> Path:
    """Storage (a tmpfs of its own at root/persistent) as the last boot left
    it: bird's fish history, /etc/app.conf; /etc/new.conf and
    /etc/sym.conf not yet written."""
    S = tmpfs_at(root / "persistent")
    fish = S / "home/bird" / HISTORY
    fish.parent.mkdir(parents=True)
    for p in (S / "home/bird", S / "home/bird/.local", S / "home/bird/.local/share", fish.parent):
        os.chown(p, BIRD, USERS_GID)
    os.chmod(S / "home/bird", 0o700)
    fish.write_bytes(OLD_FISH)
    os.chown(fish, BIRD, USERS_GID)
    os.chmod(fish, 0o600)
    (S / "etc").mkdir()
    (S / "etc/app.conf").write_bytes(OLD_APP)
    return S


def booted(sandbox) -> Path:
    S = world(sandbox.root)
    result = sandbox.run("apply", config=CONFIG)
    assert result.returncode == 0, result.stderr
    return S


FISH = """
import os, sys
target, stored, line = sys.argv[1], sys.argv[2], sys.argv[3].encode()
folder = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY)
with open(stored, "rb") as f:  # what the link leads to on the booted system
    old = f.read()
os.setgroups([])
os.setresgid(100, 100, 100)
os.setresuid(1000, 1000, 1000)  # bird, from here on
name = os.path.basename(target)
fd = os.open(name + ".Xq3zT1", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=folder)
os.write(fd, old + line)
os.fsync(fd)
os.close(fd)
os.rename(name + ".Xq3zT1", name, src_dir_fd=folder, dst_dir_fd=folder)  # the link replaced
"""


def fish_saves(R: Path, line: bytes) -> None:
    """bird's fish appends a line to its history the way fish does: it
    reads the file (through the link: storage's copy), writes a temporary
    beside it and renames that over the name. (The link's text is the path
    on the booted system, so the test reads storage's copy by its path
    here; the tests' directories are root's alone, so the program enters
    the history's directory before it becomes bird.)"""
    stored = R / "persistent/home/bird" / HISTORY
    if not stored.exists():
        stored = Path(os.devnull)
    result = subprocess.run([sys.executable, "-c", FISH, str(R / "home/bird" / HISTORY),
                             str(stored), line.decode()], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def mv_over(path: Path, content: bytes) -> subprocess.CompletedProcess:
    """A temporary beside path, then `mv` over it (root's program)."""
    tmp = path.parent / (path.name + ".new")
    tmp.write_bytes(content)
    return subprocess.run(["mv", str(tmp), str(path)], capture_output=True, text=True)


def leftovers(*tops: Path) -> list:
    """Temporaries of save or of the programs (conflict copies are results)."""
    return [os.path.join(d, n) for top in tops for d, dirs, files in os.walk(top) for n in dirs + files
            if ("impermanence-" in n and "impermanence-conflict-" not in n)
            or n.endswith((".new", ".Xq3zT1"))]


def status_of(sandbox) -> dict:
    result = sandbox.run("status", "--json")
    return {e["target"]: e["state"] for e in json.loads(result.stdout)["entries"]}


def mount_state(root: Path) -> list:
    return [(os.path.relpath(p, root), fs_root) for p, fs_root, _t, _s in mounts_under(root)]


# --- attacks: what is planted at a target is refused, storage unchanged ----------------

def plant_foreign_link(R: Path, target: Path) -> None:
    target.unlink()
    os.symlink("/etc/shadow", target)
    os.lchown(target, BIRD, USERS_GID)


def plant_fifo(R: Path, target: Path) -> None:
    target.unlink()
    os.mkfifo(target, 0o600)
    os.chown(target, BIRD, USERS_GID)


def plant_hard_link(R: Path, target: Path) -> None:
    # A root-owned secret on the root's filesystem, hard-linked into bird's
    # directory (as bird may where fs.protected_hardlinks is 0).
    secret = R / "etc/secret"
    secret.write_bytes(b"root's secret\n")
    os.chmod(secret, 0o600)
    target.unlink()
    os.link(secret, target)


def plant_setuid(R: Path, target: Path) -> None:
    target.unlink()
    target.write_bytes(b"#!/bin/sh\n")
    os.chown(target, BIRD, USERS_GID)
    os.chmod(target, 0o4755)


def plant_roots_file(R: Path, target: Path) -> None:
    # A root-owned file in a directory bird may write: bird may have put it
    # there (a root program's output moved in), so it is not bird's to keep.
    target.unlink()
    target.write_bytes(b"root's\n")
    os.chmod(target, 0o644)


def plant_on_other_fs(R: Path, target: Path) -> None:
    # The target's directory is now a mount of its own: the file there is
    # not on the root's filesystem.
    fish_dir = target.parent
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "other", str(fish_dir)], check=True)
    os.chown(fish_dir, BIRD, USERS_GID)
    target.write_bytes(b"on another filesystem\n")
    os.chown(target, BIRD, USERS_GID)


PLANTS = {
    "foreign-link": (plant_foreign_link, "is a symbolic link to /etc/shadow, not the link apply made; not saved"),
    "fifo": (plant_fifo, "is a special file (device, FIFO or socket); not saved"),
    "hard-link": (plant_hard_link, "is a hard link (2 names); not saved"),
    "setuid": (plant_setuid, "is set-user-ID or set-group-ID; not saved"),
    "root-owned": (plant_roots_file, "is owned by uid 0 in a directory uid 1000 may write; not saved"),
    "other-fs": (plant_on_other_fs, "is not on the root's own filesystem; not saved"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_what_is_planted_at_a_target_is_refused_with_one_line(sandbox, plant):
    R = sandbox.root
    S = booted(sandbox)
    target = R / "home/bird" / HISTORY
    before = tree_digest(S)
    make, cause = PLANTS[plant]
    make(R, target)
    for args in (("save", "--dry-run"), ("save",)):
        result = sandbox.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert_clean_messages(result.stderr)
        line = f"{target}: {cause}"
        if args[-1] == "--dry-run":
            assert result.stdout.splitlines() == [f"fail {line}"]
        else:
            assert result.stderr.splitlines() == [f"impermanence: {line}"]
        assert tree_digest(S) == before
    assert leftovers(S, R / "home", R / "etc") == []
    if plant == "hard-link":
        assert (R / "etc/secret").read_bytes() == b"root's secret\n"


def test_a_link_planted_in_the_storage_directory_is_not_followed(sandbox):
    # bird swaps the storage side of the history's directory for a link to
    # /etc: the walk refuses it, nothing is written there.
    R = sandbox.root
    S = booted(sandbox)
    fish_saves(R, b"- cmd: echo planted\n")
    store_dir = S / "home/bird/.local/share/fish"
    shutil.rmtree(store_dir)
    os.symlink(str(R / "etc"), store_dir)
    etc_before = sorted(os.listdir(R / "etc"))
    result = sandbox.run("save")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"impermanence: {store_dir}: is a symbolic link; refusing to follow it"]
    assert sorted(os.listdir(R / "etc")) == etc_before
    assert (R / "home/bird" / HISTORY).read_bytes().endswith(b"echo planted\n")  # still there


def test_a_file_named_like_a_temporary_that_storage_lacks_is_left_alone(sandbox):
    # A save's temporaries have known names: a user's own file under such a
    # name beside the target (storage does not hold it), or a directory so
    # named in storage, is left as it is, with one line.
    R = sandbox.root
    S = booted(sandbox)
    beside = R / "home/bird/.local/share/fish/.fish_history.impermanence-swap"
    beside.write_bytes(b"bird's own notes\n")
    os.chown(beside, BIRD, USERS_GID)
    in_storage = S / "etc/.app.conf.impermanence-save"
    in_storage.mkdir()
    # A complete copy a save wrote just before a crash: the root's copy
    # went with the wiped root, so this may be the only one.
    only_copy = S / "home/bird/.local/share/fish/.fish_history.impermanence-save"
    only_copy.write_bytes(OLD_FISH + b"- cmd: the last before the crash\n")
    before = tree_digest(S)
    result = sandbox.run("save")
    assert result.returncode == 1
    unique = "was left by an interrupted save and holds what neither storage nor the root holds; left as it is"
    assert sorted(result.stderr.splitlines()) == sorted([
        f"impermanence: {in_storage}: has the name of a save's temporary but is not one; left as it is",
        f"impermanence: {only_copy}: {unique}"])  # one line per entry: fish's stops at the first
    assert beside.read_bytes() == b"bird's own notes\n"
    assert tree_digest(S) == before
    only_copy.rename(S / "fish_history.recovered")  # bird looks at it; then the file beside
    result = sandbox.run("save")
    assert result.returncode == 1
    assert f"impermanence: {beside}: {unique}" in result.stderr.splitlines()
    assert beside.read_bytes() == b"bird's own notes\n"


# --- what save is for -------------------------------------------------------------------

def test_files_replaced_by_rename_are_saved_and_linked_again(sandbox):
    R = sandbox.root
    S = booted(sandbox)
    history = R / "home/bird" / HISTORY
    assert os.readlink(history) == "/persistent/home/bird/" + HISTORY
    fish_saves(R, b"- cmd: make\n")
    assert not history.is_symlink()                     # the link is gone: the change would be lost
    # A bind-mounted file cannot be replaced: mv fails, nothing changes.
    busy = mv_over(R / "etc/app.conf", b"new app\n")
    assert busy.returncode != 0 and "Device or resource busy" in busy.stderr, busy
    assert (R / "etc/app.conf").read_bytes() == OLD_APP
    os.unlink(R / "etc/app.conf.new")
    # auto without a source: a link, which mv replaces.
    assert os.readlink(R / "etc/new.conf") == "/persistent/etc/new.conf"
    assert mv_over(R / "etc/new.conf", b"new conf\n").returncode == 0
    os.chmod(R / "etc/new.conf", 0o640)
    os.setxattr(R / "etc/new.conf", "trusted.tag", b"kept")
    os.utime(R / "etc/new.conf", ns=(5_000_000_000, 6_000_000_000))
    states = status_of(sandbox)
    assert states == {"/etc/app.conf": "ok", "/etc/new.conf": "replaced", "/etc/sym.conf": "ok",
                      "/home/bird/" + HISTORY: "replaced"}
    assert sandbox.run("status").returncode == 1

    # --dry-run changes nothing and prints what save then does, line for line.
    before = (tree_digest(R), mount_state(R))
    dry = sandbox.run("save", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"save {R}/etc/new.conf into {S}/etc/new.conf (a program replaced it), then link it again",
        f"save {history} into {S}/home/bird/{HISTORY} (a program replaced it), then link it again",
    ]
    assert (tree_digest(R), mount_state(R)) == before

    done = sandbox.run("save", "-v")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"impermanence: {line}" for line in dry.stdout.splitlines()]
    assert (S / "home/bird" / HISTORY).read_bytes() == OLD_FISH + b"- cmd: make\n"
    st = os.stat(S / "home/bird" / HISTORY)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (BIRD, USERS_GID, 0o600)
    assert os.readlink(history) == "/persistent/home/bird/" + HISTORY
    new = S / "etc/new.conf"
    assert new.read_bytes() == b"new conf\n"
    st = os.stat(new)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0, 0o640, 6_000_000_000)
    assert os.getxattr(new, "trusted.tag") == b"kept"
    assert os.readlink(R / "etc/new.conf") == "/persistent/etc/new.conf"
    assert leftovers(S, R / "home", R / "etc") == []
    assert set(status_of(sandbox).values()) == {"ok"}
    # fish goes on: its next save replaces the link again, the next save takes it.
    fish_saves(R, b"- cmd: ls -l\n")
    assert sandbox.run("save").returncode == 0
    assert (S / "home/bird" / HISTORY).read_bytes() == OLD_FISH + b"- cmd: make\n- cmd: ls -l\n"
    again = sandbox.run("save", "--dry-run")
    assert again.stdout == "nothing to save\n"


def test_a_replaced_file_whose_bind_was_gone_is_kept_beside_and_bound_again(sandbox):
    # Where the bind was gone, the program never read storage's copy
    # through a link: storage's copy stays, the root's goes beside it.
    R = sandbox.root
    S = booted(sandbox)
    target = R / "etc/app.conf"
    subprocess.run(["umount", str(target)], check=True)   # the bind gone (unmounted by hand)
    assert status_of(sandbox)["/etc/app.conf"] == "not-mounted"  # apply's empty mount point
    assert mv_over(target, b"written while unbound\n").returncode == 0
    assert status_of(sandbox)["/etc/app.conf"] == "replaced"
    dry = sandbox.run("save", "--dry-run")
    [line] = dry.stdout.splitlines()
    assert untimed(line) == (f"save {target} as {S}/etc/app.conf.impermanence-conflict-TIME "
                             f"({S}/etc/app.conf changed too: both kept), then bind it again")
    result = sandbox.run("save", "-v")
    assert result.returncode == 0, result.stderr
    assert (S / "etc/app.conf").read_bytes() == OLD_APP
    [copy] = [p for p in (S / "etc").iterdir() if p.name.startswith("app.conf.impermanence-conflict-")]
    assert copy.read_bytes() == b"written while unbound\n"
    assert os.stat(target).st_ino == os.stat(S / "etc/app.conf").st_ino      # bound again
    assert (str(target), "/etc/app.conf") in [(p, r) for p, r, _t, _s in mounts_under(R)]
    assert leftovers(S, R / "etc") == []
    assert status_of(sandbox)["/etc/app.conf"] == "ok"


def test_storage_changed_too_keeps_both(sandbox):
    R = sandbox.root
    S = booted(sandbox)
    fish_saves(R, b"- cmd: from the session\n")
    stored = S / "home/bird" / HISTORY
    stored.write_bytes(OLD_FISH + b"- cmd: written into storage directly\n")  # after fish's rename
    dry = sandbox.run("save", "--dry-run")
    assert dry.returncode == 0
    [line] = dry.stdout.splitlines()
    named = re.compile(re.escape(f"save {R}/home/bird/{HISTORY} as {stored}.impermanence-conflict-")
                       + r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ"
                       + re.escape(f" ({stored} changed too: both kept), then link it again"))
    assert named.fullmatch(line), line
    result = sandbox.run("save")
    assert result.returncode == 0, result.stderr
    [copy] = [p for p in stored.parent.iterdir() if p.name != stored.name]
    assert named.fullmatch(line.replace(line.split(" as ")[1].split(" ")[0], str(copy)))
    assert result.stderr.splitlines() == [
        f"impermanence: {stored}: changed in storage and at {R}/home/bird/{HISTORY}: kept both, "
        f"the root's copy as {copy.name}"]
    assert stored.read_bytes() == OLD_FISH + b"- cmd: written into storage directly\n"
    assert copy.read_bytes() == OLD_FISH + b"- cmd: from the session\n"
    assert os.stat(copy).st_uid == BIRD
    assert os.readlink(R / "home/bird" / HISTORY) == "/persistent/home/bird/" + HISTORY
    assert sandbox.run("save", "--dry-run").stdout == "nothing to save\n"


def test_save_writes_nothing_into_an_unmounted_storage(sandbox, disk):
    cfg = dict(CONFIG, fileSystems={"/persistent": {"device": f"LABEL={disk.label}"}})
    R = sandbox.root
    (R / "etc").mkdir()
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert mv_over(R / "etc/new.conf", b"new\n").returncode == 0
    subprocess.run(["umount", "-l", str(R / "persistent")], check=True)
    result = sandbox.run("save")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"impermanence: {R}/persistent: storage not mounted (LABEL={disk.label} at {R}/persistent); its entries not saved"]
    assert os.listdir(R / "persistent") == []
    assert (R / "etc/new.conf").read_bytes() == b"new\n"


def test_a_copy_replaced_again_while_saving_stays_and_is_saved_next_time(sandbox):
    # fish saves again while save is about to put the link back (strace
    # holds save 2 s before the exchange): the newer copy stays on the root,
    # the one saved is in storage, and the next save takes the newer one.
    require(shutil.which("strace") is not None, "strace is not installed")
    R = sandbox.root
    S = booted(sandbox)
    fish_saves(R, b"- cmd: first\n")
    trace = sandbox.work / "delay.trace"
    slow = subprocess.Popen([*strace_prefix(trace, "renameat2", "inject=renameat2:delay_enter=2000000:when=1"),
                             sys.executable, str(SCRIPT), "--root", str(R), "--config",
                             str(sandbox.config_path), "save"],
                            env=script_env({"LIBMOUNT_UTAB": str(sandbox.utab)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if trace.exists() and "renameat2(" in trace.read_text():
            break
        time.sleep(0.01)
    fish_saves(R, b"- cmd: second\n")
    _, err = slow.communicate(timeout=60)
    assert slow.returncode == 1
    assert err.splitlines() == [
        f"impermanence: {R}/home/bird/{HISTORY}: changed while saving; saved at the next save"]
    stored = S / "home/bird" / HISTORY
    assert stored.read_bytes() == OLD_FISH + b"- cmd: first\n"
    root_copy = R / "home/bird" / HISTORY
    assert not root_copy.is_symlink()
    assert root_copy.read_bytes() == OLD_FISH + b"- cmd: first\n- cmd: second\n"
    assert leftovers(S, R / "home") == []
    assert sandbox.run("save").returncode == 0
    assert stored.read_bytes() == OLD_FISH + b"- cmd: first\n- cmd: second\n"
    assert os.readlink(root_copy) == "/persistent/home/bird/" + HISTORY


def test_a_second_save_waits_for_the_first(sandbox):
    # Two saves would each remove the other's temporary: the second waits
    # for the lock the first holds (here the test holds it).
    import fcntl

    R = sandbox.root
    S = booted(sandbox)
    fish_saves(R, b"- cmd: waited\n")
    with open("/run/impermanence-save.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(R), "--config",
                                    str(sandbox.config_path), "save"],
                                   env=script_env({"LIBMOUNT_UTAB": str(sandbox.utab)}),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert waiting.poll() is None
        assert not (R / "home/bird" / HISTORY).is_symlink()
        assert (S / "home/bird" / HISTORY).read_bytes() == OLD_FISH
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert (S / "home/bird" / HISTORY).read_bytes() == OLD_FISH + b"- cmd: waited\n"
    assert os.readlink(R / "home/bird" / HISTORY) == "/persistent/home/bird/" + HISTORY


def test_full_storage_fails_the_entry_and_keeps_both_copies(sandbox):
    R = sandbox.root
    S = booted(sandbox)
    subprocess.run(["mount", "-o", "remount,size=256k", str(S)], check=True)
    fd = os.open(S / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    fish_saves(R, b"- cmd: " + b"y" * 100_000 + b"\n")
    before = tree_digest(S)
    result = sandbox.run("save")
    assert result.returncode == 1
    stored = S / "home/bird" / HISTORY
    assert result.stderr.splitlines() == [f"impermanence: {stored}: write: No space left on device"]
    assert tree_digest(S) == before                                   # no temporary left either
    assert (R / "home/bird" / HISTORY).read_bytes().endswith(b"y" * 100 + b"\n")  # root's copy stays
    os.unlink(S / "filler")
    before = tree_digest(S)
    result = sandbox.run("save")
    assert result.returncode == 0, result.stderr
    assert stored.read_bytes().endswith(b"y" * 100 + b"\n")
    assert os.readlink(R / "home/bird" / HISTORY) == "/persistent/home/bird/" + HISTORY


# --- killed at every write, rename and unlink ------------------------------------------

KILL_SYSCALLS = ["write", "fsync", "renameat", "renameat2", "unlinkat", "symlinkat", "openat",
                 "fchown", "fchmod", "fsetxattr", "utimensat", "open_tree", "mount_setattr",
                 "move_mount"]


def killable_world(root: Path) -> Path:
    """Booted, then: fish replaced its history (link); /etc/app.conf,
    whose bind was unmounted, was replaced with mv (bind: kept beside);
    /etc/sym.conf was replaced with mv and then written in storage too
    (kept beside)."""
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "fresh-root", str(root)], check=True)
    S = world(root)
    cfg = root.parent / "save.json"
    cfg.write_text(json.dumps(CONFIG))
    env = {"LIBMOUNT_UTAB": str(root.parent / "utab")}
    assert run_on(root, cfg, "apply", env=env).returncode == 0
    fish_saves(root, b"- cmd: new\n")
    subprocess.run(["umount", str(root / "etc/app.conf")], check=True)
    assert mv_over(root / "etc/app.conf", b"new app\n").returncode == 0
    assert mv_over(root / "etc/sym.conf", b"root's sym\n").returncode == 0
    (S / "etc/sym.conf").write_bytes(b"storage's sym\n")
    return S


ROOTS = {"app.conf": b"new app\n", "sym.conf": b"root's sym\n"}  # the root's copies, kept beside


def conflict_copies(S: Path, name: str) -> list:
    return sorted(p for p in (S / "etc").iterdir() if p.name.startswith(name + ".impermanence-conflict-"))


def untimed(line: str) -> str:
    """A line with the UTC time of a conflict copy's name masked (a dry
    run and the run after it may fall in different seconds)."""
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", "TIME", line)


def run_save(root: Path, *prefix, args: tuple = ()) -> subprocess.CompletedProcess:
    return run_on(root, root.parent / "save.json", "save", *args, prefix=prefix,
                  env={"LIBMOUNT_UTAB": str(root.parent / "utab")})


def counted_calls(tmp_path: Path) -> dict:
    root = tmp_path / "count" / "root"
    root.parent.mkdir()
    killable_world(root)
    trace = tmp_path / "count.trace"
    result = run_save(root, *strace_prefix(trace, ",".join(KILL_SYSCALLS)))
    assert result.returncode == 0, result.stderr
    counts: dict = {}
    for line in trace.read_text().splitlines():
        parts = line.split(None, 1)
        name = parts[1].split("(", 1)[0] if len(parts) == 2 else ""
        if name in KILL_SYSCALLS:
            counts[name] = counts.get(name, 0) + 1
    subprocess.run(["umount", "-R", "-l", str(root)])
    return counts


def test_sigkill_at_every_write_rename_and_unlink_then_save_again(namespace, tmp_path):
    require(shutil.which("strace") is not None, "strace is not installed")
    counts = counted_calls(tmp_path)
    for name in ("write", "fsync", "renameat", "renameat2", "unlinkat", "symlinkat", "fchown"):
        assert counts.get(name), f"save never calls {name}: {counts}"
    cases = [(name, k) for name in KILL_SYSCALLS for k in range(1, counts.get(name, 0) + 1)]
    assert len(cases) >= 20, counts
    for name, k in cases:
        root = tmp_path / f"{name}-{k}" / "root"
        root.parent.mkdir()
        S = killable_world(root)
        trace = root.parent / "trace"
        run_save(root, *strace_prefix(trace, name, f"inject={name}:signal=KILL:when={k}"))
        assert "+++ killed by SIGKILL +++" in trace.read_text(), (name, k)
        fish, app = S / "home/bird" / HISTORY, S / "etc/app.conf"
        # Storage holds the old copy or the new one, whole: never a mix, never nothing.
        assert fish.read_bytes() in (OLD_FISH, OLD_FISH + b"- cmd: new\n"), (name, k)
        assert app.read_bytes() == OLD_APP, (name, k)
        sym = S / "etc/sym.conf"
        assert sym.read_bytes() == b"storage's sym\n"
        for kept in ("app.conf", "sym.conf"):
            copies = [p.read_bytes() for p in conflict_copies(S, kept)]
            assert copies in ([], [ROOTS[kept]]), (name, k)
        dry = run_save(root, args=("--dry-run",))
        result = run_save(root, args=("-v",))
        assert result.returncode == dry.returncode == 0, (name, k, result.stderr)
        # What the dry run says is what the second save does (less the
        # conflict's own line); a conflict copy made already is not made again.
        done = [untimed(l) for l in result.stderr.splitlines() if "kept both" not in l]
        assert done == [untimed(f"impermanence: {line}") for line in dry.stdout.splitlines()
                        if line != "nothing to save"], (name, k)
        assert fish.read_bytes() == OLD_FISH + b"- cmd: new\n", (name, k)
        assert app.read_bytes() == OLD_APP, (name, k)
        assert os.stat(fish).st_uid == BIRD
        assert os.readlink(root / "home/bird" / HISTORY) == "/persistent/home/bird/" + HISTORY
        assert os.stat(root / "etc/app.conf").st_ino == os.stat(app).st_ino, (name, k)
        assert sym.read_bytes() == b"storage's sym\n"
        for kept in ("app.conf", "sym.conf"):
            assert [p.read_bytes() for p in conflict_copies(S, kept)] == [ROOTS[kept]], (name, k)
        assert os.readlink(root / "etc/sym.conf") == "/persistent/etc/sym.conf"
        assert leftovers(S, root / "home", root / "etc") == [], (name, k)
        assert [n for n in os.listdir(fish.parent)] == ["fish_history"], (name, k)
        subprocess.run(["umount", "-R", "-l", str(root)])


# --- the shutdown unit --------------------------------------------------------------------

def unit_settings(text: str) -> dict:
    settings: dict = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_shutdown_unit_saves_after_sessions_and_before_unmounting():
    unit = (PROJECT / "dist/systemd/impermanence-save.service").read_text()
    settings = unit_settings(unit)
    assert settings["Type"] == ["oneshot"] and settings["RemainAfterExit"] == ["yes"]
    assert settings["DefaultDependencies"] == ["no"]
    # Stopped after everything ordered after sysinit.target (sessions,
    # services), before the unmounts; the work is in ExecStop.
    assert set(settings["Before"][0].split()) >= {"sysinit.target", "umount.target", "final.target"}
    assert set(settings["Conflicts"][0].split()) >= {"umount.target"}
    # Stopped before journald leaves a kept /var/log: its lines are in that journal.
    assert settings["After"] == ["local-fs.target systemd-journal-flush.service"]
    [stop] = settings["ExecStop"]
    assert stop.split()[-1] == "save" and "/usr/lib/impermanence-boot/impermanence_boot.py" in stop
    timer = unit_settings((PROJECT / "dist/systemd/impermanence-save.timer").read_text())
    now = unit_settings((PROJECT / "dist/systemd/impermanence-save-now.service").read_text())
    assert timer["Unit"] == ["impermanence-save-now.service"]
    assert now["ExecStart"][0].split()[-1] == "save"
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    for name in ("impermanence-save.service", "impermanence-save-now.service", "impermanence-save.timer"):
        result = subprocess.run(["systemd-analyze", "verify", str(PROJECT / "dist/systemd" / name)],
                                capture_output=True, text=True)
        assert result.returncode == 0 and name not in result.stderr, result.stderr
