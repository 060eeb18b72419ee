#!/usr/bin/env python3
"""The standing mutation check: does the suite fail when a safety guard of
impermanence_boot.py breaks?

Each mutation below is one small, realistic regression of a safety- or
correctness-critical line (a flag dropped, a guard turned off, an order
reversed), written as the exact text it changes and what it becomes. One
at a time, it is applied to a copy of the project and the test files that
should catch it are run there (pytest -x). A mutation is KILLED when a
test fails, and SURVIVED when every test passes: the suite does not guard
that line. A mutation whose text is no longer found exactly once in the
script fails the check too, so the list follows the code.

    tests/mutants.py                      every mutation
    tests/mutants.py --only NAME[,NAME]   those
    tests/mutants.py --changed-since REV  those in functions of the script
                                          changed since REV
    tests/mutants.py --since-recorded     those changed since the full run
                                          docs/reliability.md records (CI)
    tests/mutants.py --list               the mutations and where they are

Run as root (the tests mount), with the suite's interpreter
(.venv/bin/python). Stdlib only. Prints one line per mutation and the
counts; exits 1 if any survived or was not found. The unmutated copy is
tested first with every selected test file; it must pass.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
SCRIPT_NAME = "impermanence_boot.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str      # the regression, in words
    text: str      # exact text in the script, found exactly once
    becomes: str
    tests: tuple   # names of the test files that must catch it (test_path finds them)


M = Mutation
MUTATIONS = [
    # --- links: never followed -------------------------------------------------------
    M("o-path-follows", "O_PATH opens of files and mount points follow links",
      "O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC",
      "O_PATH_NOFOLLOW = os.O_PATH | os.O_CLOEXEC", ("test_late_swaps.py",)),
    M("dir-open-follows", "directory opens follow links",
      "O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
      "O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC", ("test_late_swaps.py",)),
    M("bind-any-kind", "a bind source or target of the wrong kind (a link) is mounted",
      "    if not (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)):",
      "    if False:", ("test_late_swaps.py", "test_adversarial.py")),
    M("look-through-links", "Tree.look walks through a symlinked component",
      "            if node.kind != \"dir\":\n                what = \"a symbolic link\"",
      "            if node.kind not in (\"dir\", \"link\"):\n                what = \"a symbolic link\"",
      ("test_late_swaps.py",)),
    M("open-tree-follows", "open_tree clones follow a link at the source",
      "OPEN_TREE_CLONE | os.O_CLOEXEC | AT_SYMLINK_NOFOLLOW,",
      "OPEN_TREE_CLONE | os.O_CLOEXEC,", ("test_adversarial.py",)),
    # --- hard links and swapped directories ---------------------------------------------
    M("bind-time-hard-link", "the hard-link refusal at bind time is off",
      "                if st.st_uid != owner:\n                    raise Failure(source_shown, hard_link_refusal(",
      "                if False:\n                    raise Failure(source_shown, hard_link_refusal(",
      ("test_late_swaps.py",)),
    M("plan-time-hard-link", "a hard-linked source is refused only when binding, after the root was changed",
      "        if folder is not None and folder.uid != node.uid:\n            raise Refused(tree.host(source), hard_link_refusal(",
      "        if False:\n            raise Refused(tree.host(source), hard_link_refusal(",
      ("test_adversarial.py", "test_files.py")),
    M("made-dir-not-checked", "a directory swapped between mkdir and open is taken as ours",
      "            if st.st_uid != ex.euid:\n                raise Failure(shown, \"was replaced while applying; not changed\")",
      "            if False:\n                raise Failure(shown, \"was replaced while applying; not changed\")",
      ("test_late_swaps.py",)),
    M("made-dir-full-mode", "a directory is made with its final mode instead of 0000",
      "os.mkdir(name, self.mode & 0o1777 if self.mark else 0, dir_fd=parent)",
      "os.mkdir(name, self.mode & 0o1777, dir_fd=parent)", ("test_faults.py", "test_idempotence.py")),
    M("rename-replaces", "renameat2 without RENAME_NOREPLACE replaces what appeared",
      "RENAME_NOREPLACE = 1", "RENAME_NOREPLACE = 0", ("test_late_swaps.py",)),
    # --- unmount, status -------------------------------------------------------------------
    M("unmount-any-mount", "unmount removes whatever is mounted at a kept target",
      "            if (st.st_dev, st.st_ino) != (kept.st_dev, kept.st_ino):\n                break",
      "            if False:\n                break", ("test_late_swaps.py", "test_unmount.py")),
    M("unmount-unmarked-point", "unmount removes mount points apply did not make",
      "if node is not None and not in_storage and node.marked and node.empty:",
      "if node is not None and not in_storage and node.empty:", ("test_unmount.py",)),
    M("unmount-nonempty-point", "unmount removes a mount point that is not empty",
      "if node is not None and not in_storage and node.marked and node.empty:",
      "if node is not None and not in_storage and node.marked:", ("test_late_swaps.py", "test_unmount.py")),
    M("unmount-other-link", "unmount removes a link that points elsewhere",
      "        return \"linked\" if node.link == link_text(entry) else None",
      "        return \"linked\"", ("test_late_swaps.py", "test_unmount.py")),
    M("status-any-mount-ok", "placement (status, plan, unmount) takes any mount at a target as the entry's",
      "    if node.kind == (\"dir\" if entry.kind == \"directory\" else \"file\") and tree.same(source, target):",
      "    if node.kind == (\"dir\" if entry.kind == \"directory\" else \"file\"):",
      ("test_status.py",)),
    M("status-ignores-owner", "status does not compare the source's owner",
      "    if (src.uid, src.gid) != (uid, gid):", "    if False:", ("test_status.py",)),
    # --- names, owners, modes ---------------------------------------------------------------
    M("names-root-first", "the root's /etc/passwd wins over the config's users table",
      "        if configured is not None:\n            return configured\n        for s in self._storages_for(storage):",
      "        fields = self._root_file(database).get(name)\n"
      "        if fields and parse_id(fields[2]) is not None:\n"
      "            return parse_id(fields[2])\n"
      "        if configured is not None:\n            return configured\n"
      "        for s in self._storages_for(storage):",
      ("test_late_swaps.py", "test_accounts.py")),
    M("mode-before-owner", "a made directory's mode is set before its owner (chown clears set-id bits)",
      "    if st.st_uid != uid or st.st_gid != gid:\n        call(\"chown\", shown, os.fchown, fd, uid, gid)\n"
      "    # mkdir cannot set set-id bits, and a set-gid parent passes its own.\n"
      "    if mode & 0o6000 or stat.S_IMODE(st.st_mode) != mode:\n        call(\"chmod\", shown, os.fchmod, fd, mode)\n",
      "    if mode & 0o6000 or stat.S_IMODE(st.st_mode) != mode:\n        call(\"chmod\", shown, os.fchmod, fd, mode)\n"
      "    if st.st_uid != uid or st.st_gid != gid:\n        call(\"chown\", shown, os.fchown, fd, uid, gid)\n",
      ("test_faults.py", "test_directories.py")),
    M("mode-umask", "symbolic modes ignore the umask mkdir runs under",
      "MKDIR_UMASK = 0o022", "MKDIR_UMASK = 0o000", ("test_modes.py",)),
    M("octal-four-digits", "octal modes of five digits are accepted",
      "        if text.strip(\"01234567\") or len(text) > 4:",
      "        if text.strip(\"01234567\"):", ("test_modes.py", "test_config_load.py")),
    M("private-dirs-open", "/var/lib/private and its kin are made 0755, not root's 0700",
      "PRIVATE_PERMS = Perms(\"root\", \"root\", 0o700)", "PRIVATE_PERMS = Perms(\"root\", \"root\", 0o755)",
      ("test_directories.py", "test_nix.py")),
    M("path-max-unchecked", "paths longer than PATH_MAX are walked",
      "        if len(os.fsencode(tree.host(path))) >= PATH_MAX:", "        if False:",
      ("test_limits.py",)),
    # --- config checks ----------------------------------------------------------------------
    M("target-twice", "the same target listed twice is accepted",
      "        if entries[k].target == entries[k - 1].target:", "        if False:",
      ("test_config_load.py", "test_faults.py")),
    M("inside-kept-file", "an entry inside a kept file is accepted",
      "            if holder is not None:\n                raise ConfigError(e.where, f\"{as_path(e.target)} is inside the kept file \"",
      "            if False:\n                raise ConfigError(e.where, f\"{as_path(e.target)} is inside the kept file \"",
      ("test_config_load.py", "test_faults.py")),
    M("overlap-storage", "an entry overlapping a storage path is accepted",
      "        if hit is not None:\n            raise ConfigError(e.where, f\"{as_path(e.target)} overlaps the",
      "        if False:\n            raise ConfigError(e.where, f\"{as_path(e.target)} overlaps the",
      ("test_config_load.py", "test_faults.py")),
    M("dotdot-path", "'..' components are accepted",
      "        if \".\" not in comps and \"..\" not in comps and (comps or not absolute):",
      "        if \".\" not in comps and (comps or not absolute):", ("test_config_load.py",)),
    M("unkeepable-paths", "/proc, /sys, /dev, /run, /nix/store may be kept",
      "            if is_under(e.target, prefix):\n                raise ConfigError(e.where, f\"{as_path(e.target)} cannot be kept: {why}\")",
      "            if False:\n                raise ConfigError(e.where, f\"{as_path(e.target)} cannot be kept: {why}\")",
      ("test_cli.py",)),
    M("unknown-keys", "unknown config keys are accepted",
      "        raise ConfigError(key_path(where, key), f\"unknown key{hint}\")",
      "        pass", ("test_config_load.py",)),
    # --- files, machine-id, targets ------------------------------------------------------------
    M("nonempty-target-replaced", "a non-empty file at a target is mounted over",
      "    elif node.size != 0:\n        raise Refused(tree.host(target), \"target exists and is not empty; not overwritten\"",
      "    elif False:\n        raise Refused(tree.host(target), \"target exists and is not empty; not overwritten\"",
      ("test_files.py", "test_faults.py")),
    M("machine-id-not-uninitialized", "a missing machine-id is linked, not created 'uninitialized'",
      "MACHINE_ID = (\"etc\", \"machine-id\")", "MACHINE_ID = (\"etc\", \"no-such-file\")",
      ("test_files.py",)),
    M("mount-point-not-a-dir", "a fileSystems mount point that is a file or link is used",
      "        elif node.kind != \"dir\":\n            raise Failure(tree.host(path[:depth]), f\"is {describe_kind(node)}, not a directory\")",
      "        elif False:\n            raise Failure(tree.host(path[:depth]), f\"is {describe_kind(node)}, not a directory\")",
      ("test_storage.py", "test_faults.py", "test_adversarial.py")),
    # --- order, storage, devices ----------------------------------------------------------------
    M("order-unsorted", "entries are applied in config order, not parents first",
      "    entries.sort(key=lambda e: e.target)\n", "", ("test_planning.py", "test_apply.py")),
    M("missing-storage-bound", "entries of a storage path that does not exist are bound",
      "        if node is None:\n            state[storage] = \"storage path does not exist (and no fileSystems entry mounts it)\"",
      "        if False:\n            state[storage] = \"storage path does not exist (and no fileSystems entry mounts it)\"",
      ("test_storage.py", "test_faults.py")),
    M("unavailable-fs-bound", "entries of a fileSystems entry that failed to mount are bound",
      "        if fs is not None and fs.mountpoint in unavailable:\n            state[storage] = f\"storage unavailable:",
      "        if False:\n            state[storage] = f\"storage unavailable:",
      ("test_storage.py", "test_faults.py")),
    M("label-prefix", "a LABEL matches a label that only starts with it",
      "                       or (tag == \"LABEL\" and probed[2] == value)):",
      "                       or (tag == \"LABEL\" and probed[2].startswith(value))):",
      ("test_probe.py",)),
    M("uuid-case", "UUIDs compare case-sensitively",
      "(tag == \"UUID\" and probed[1].lower() == value.lower())",
      "(tag == \"UUID\" and probed[1] == value)", ("test_probe.py",)),
    M("ambiguous-device-guessed", "a LABEL/UUID two devices answer is mounted from the first",
      "    if len(found) > 1:\n        raise Failure(spec, f\"matches {len(found)} devices:",
      "    if False:\n        raise Failure(spec, f\"matches {len(found)} devices:", ("test_probe.py",)),
    # --- one run at a time, config, rotation, FUSE ----------------------------------------------
    M("no-run-lock", "two applies on one root run at once",
      "    err = wait_for_flock(fd, wait)\n    if err == errno.EWOULDBLOCK:",
      "    err = 0\n    if err == errno.EWOULDBLOCK:", ("test_concurrency.py",)),
    M("duplicate-keys-kept", "a key given twice in one JSON object silently keeps the last",
      "        if len(obj) != len(pairs):\n            self.duplicated = True",
      "        if False:\n            self.duplicated = True", ("test_config_load.py", "test_config_items.py")),
    M("clock-behind-deletes", "with the clock behind, no old root is ever deleted (count ignored)",
      "    elif ours and time_name(now) < ours[0][0][0]:", "    elif False:", ("test_rotate.py",)),
    M("fuse-looked-at", "an entry on a (possibly stalled) FUSE mount is planned by looking at it",
      "    if on_fuse is not None:\n        return [Fail(tree.host(on_fuse[0]), on_fuse[1])]",
      "    if False:\n        return [Fail(tree.host(on_fuse[0]), on_fuse[1])]",
      ("test_stalled_mounts.py",)),
    # --- the move into storage on a running system -------------------------------------------------
    M("move-into-mount-point", "a target that is another filesystem's mount point is moved (emptied)",
      "    if found is not None:\n        raise Failure(host, f\"is another filesystem's mount point",
      "    if False:\n        raise Failure(host, f\"is another filesystem's mount point",
      ("test_running_system.py",)),
    M("move-crosses-mounts", "a mount inside a moved directory is copied and emptied",
      "        source, _, fs_type, _ = mounts.points[point]\n        raise Failure(host, f\"holds {point}",
      "        continue\n        raise Failure(host, f\"holds {point}", ("test_running_system.py",)),
    M("move-dense", "holes are written as zeros",
      "            start = os.lseek(source, offset, os.SEEK_DATA)\n            end = min(os.lseek(source, start, os.SEEK_HOLE), size)",
      "            start = offset\n            end = size", ("test_running_system.py",)),
    M("move-caps-cleared", "extended attributes are copied before the owner (chown clears capabilities)",
      "    call(\"chown\", shown, os.fchown, copy, st.st_uid, st.st_gid)\n    call(\"chmod\", shown, os.fchmod, copy, stat.S_IMODE(st.st_mode))\n"
      "    for attribute in call(\"listxattr\", shown, os.listxattr, source):\n"
      "        call(\"setxattr\", shown, os.setxattr, copy, attribute, os.getxattr(source, attribute))\n",
      "    for attribute in call(\"listxattr\", shown, os.listxattr, source):\n"
      "        call(\"setxattr\", shown, os.setxattr, copy, attribute, os.getxattr(source, attribute))\n"
      "    call(\"chown\", shown, os.fchown, copy, st.st_uid, st.st_gid)\n    call(\"chmod\", shown, os.fchmod, copy, stat.S_IMODE(st.st_mode))\n",
      ("test_running_system.py",)),
    M("move-writer-unnoticed", "a file written while it was copied is not noticed before the rename",
      "                if changed is not None:\n                    raise Failure(changed, f\"was written while it was being moved",
      "                if False:\n                    raise Failure(changed, f\"was written while it was being moved",
      ("test_running_system.py",)),
    M("move-open-writer-unnoticed", "a file held open for writing is moved anyway",
      "                if writer is not None:\n                    raise Failure(writer[0], f\"is open for writing",
      "                if False:\n                    raise Failure(writer[0], f\"is open for writing",
      ("test_running_system.py",)),
    M("originals-dropped-unchecked", "the originals are removed without comparing them with the copy",
      "                    differs = first_difference(put, kept_in, child, f\"{aside_shown}/{child}\", (child,), copied)",
      "                    differs = None", ("test_running_system.py",)),
    # --- utab ----------------------------------------------------------------------------------------
    M("utab-unlocked", "utab is rewritten without libmount's lock",
      "        if libc().flock(lock, LOCK_EX) < 0:", "        if False:", ("test_late_swaps.py",)),
    M("utab-not-atomic", "utab is rewritten in place, not by rename",
      "            call(\"rename\", path, os.rename, temp, path)",
      "            call(\"rename\", path, os.rename, temp, path + \".unused\")", ("test_utab.py",)),
    # --- propagation -----------------------------------------------------------------------------------
    M("bind-two-way", "binds stay peers of their storage",
      "            one_way = clone is not None and ex.slave_clones and slave_detached(clone, source_shown)",
      "            one_way = True", ("test_propagation.py",)),
    # --- messages -------------------------------------------------------------------------------------
    M("control-chars-raw", "control characters reach the terminal unescaped",
      "        line = \"impermanence: \" + text.translate(UNPRINTABLE)",
      "        line = \"impermanence: \" + text", ("test_messages.py",)),
    M("no-privilege-check", "apply without root fails entry by entry instead of at once",
      "    if euid != 0 and opts.command in NEEDS_ROOT:", "    if False:", ("test_privilege.py",)),
    M("diff-errors-exit-0", "diff exits 0 when it could not read a path",
      "    return EXIT_FAILED if walk.errors else EXIT_OK", "    return EXIT_OK", ("test_privilege.py",)),
    # --- save ---------------------------------------------------------------------------------------
    M("save-unlocked", "two saves run at once (each removes the other's temporary)",
      "    if wait_for_flock(fd, SAVE_LOCK_WAIT):", "    if False:", ("test_save.py",)),
    M("save-in-place", "save writes the root's copy straight over the source, no temporary",
      "    copy = call(\"create\", source_shown, os.open, temp, flags, 0o600, dir_fd=storage_dir)",
      "    temp = name if conflict is None else temp\n"
      "    copy = call(\"create\", source_shown, os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC"
      " | os.O_NOFOLLOW, 0o600, dir_fd=storage_dir)", ("test_save.py",)),
    M("save-no-conflict", "save overwrites a source that changed in storage too",
      "                    conflict = source + CONFLICT", "                    conflict = None and source + CONFLICT",
      ("test_save.py",)),
    M("save-hard-link", "save takes a hard link planted at the target",
      "    if st.st_nlink != 1:", "    if st.st_nlink == 0:", ("test_save.py",)),
    M("save-owner", "save takes a file of another owner from a directory a user may write",
      "        if st.st_uid != folder.st_uid and (folder.st_uid != 0", "        if False and (folder.st_uid != 0",
      ("test_save.py",)),
    M("save-setid", "save takes a set-user-ID file", "    if st.st_mode & 0o6000:", "    if False:",
      ("test_save.py",)),
    M("save-other-fs", "save takes a file from another filesystem",
      "    if st.st_dev != root_dev:", "    if False:", ("test_save.py",)),
    M("save-swap-unchecked", "save's swap drops a copy replaced again meanwhile",
      "            if fingerprint(out)[:4] != fingerprint(st)[:4]:", "            if False:", ("test_save.py",)),
    M("save-discards-unsaved", "save removes a temporary-named file that storage does not hold",
      "        elif self.in_storage or st.st_size:", "        elif False:", ("test_save.py",)),
    M("save-discards-only-copy", "save removes a complete copy in storage that the root no longer has",
      "        \"\"\"Whether the root's file at the target starts with fd's bytes.\"\"\"",
      "        \"\"\"Whether the root's file at the target starts with fd's bytes.\"\"\"\n        return True",
      ("test_save.py",)),
]


def script_text() -> str:
    return (PROJECT / SCRIPT_NAME).read_text(encoding="utf-8")


def locate(mutation: Mutation, text: str) -> int | None:
    """The line (1-based) where the mutation's text starts, if it is found
    exactly once."""
    if text.count(mutation.text) != 1:
        return None
    return text[:text.index(mutation.text)].count("\n") + 1


def functions(text: str) -> list:
    """(first line, last line, name) of every top-level function and class."""
    return [(n.lineno, n.end_lineno, n.name) for n in ast.parse(text).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def changed_lines(rev: str) -> set | None:
    """Lines of the script (as it is now) that changed since rev; None if
    git cannot tell (no such revision, a shallow clone)."""
    r = subprocess.run(["git", "-C", str(PROJECT), "diff", "-U0", rev, "--", SCRIPT_NAME],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    lines: set = set()
    for m in re.finditer(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", r.stdout, re.M):
        start, count = int(m.group(1)), int(m.group(2) or 1)
        lines.update(range(start, start + max(count, 1)))
    return lines


def select_changed(rev: str, text: str) -> list | None:
    changed = changed_lines(rev)
    if changed is None:
        return None
    spans = functions(text)
    chosen = []
    for m in MUTATIONS:
        line = locate(m, text)
        if line is None:
            chosen.append(m)  # not found: always reported
            continue
        span = next(((a, b) for a, b, _ in spans if a <= line <= b), (line, line))
        if changed & set(range(span[0], span[1] + 1)):
            chosen.append(m)
    return chosen


RECORDED = re.compile(r"^Last full run: .*commit `([0-9a-f]{7,40})`", re.M)


def recorded_run() -> str | None:
    """The commit of the last full run, as docs/reliability.md records it."""
    found = RECORDED.search((PROJECT / "docs/reliability.md").read_text(encoding="utf-8"))
    return found.group(1) if found else None


def copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", ".pytest_cache",
                                    "results", "*.img")
    shutil.copytree(PROJECT, dest, ignore=ignore, symlinks=True)


def test_path(name: str, project: Path = PROJECT) -> Path:
    """The test file of that name, in whichever group under tests/ holds it
    (test file names are unique across the groups)."""
    found = sorted((project / "tests").rglob(name))
    if len(found) != 1:
        raise LookupError(f"{len(found)} test files named {name} under {project / 'tests'}")
    return found[0]


def run_tests(copy: Path, files: list, timeout: float) -> tuple:
    """(passed, the first failing test or the last lines) of pytest -x."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o",
           "addopts=", *[str(test_path(f, copy).relative_to(copy)) for f in files]]
    try:
        r = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    except subprocess.TimeoutExpired:
        return False, "timed out"
    if r.returncode == 0:
        return True, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return False, failed.group(1) if failed else r.stdout.strip().splitlines()[-1:]


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--changed-since", metavar="REV")
    ap.add_argument("--since-recorded", action="store_true",
                    help="--changed-since the commit of the full run in docs/reliability.md")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=900, help="per test run, seconds")
    a = ap.parse_args(argv)
    text = script_text()
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"
    chosen = MUTATIONS
    if a.only:
        wanted = set(a.only.split(","))
        unknown = wanted - set(names)
        if unknown:
            print(f"mutants: unknown mutation {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in wanted]
    if a.since_recorded:
        a.changed_since = recorded_run()
        if a.changed_since is None:
            print("mutants: docs/reliability.md records no full run; running every mutation")
    if a.changed_since:
        selected = select_changed(a.changed_since, text)
        if selected is None:
            print(f"mutants: git cannot compare with {a.changed_since}; running every mutation")
        else:
            chosen = [m for m in chosen if m in selected]
    if a.list:
        for m in chosen:
            line = locate(m, text)
            print(f"{m.name:28} {'line ' + str(line) if line else 'NOT FOUND':>10}  {m.what}")
        return 0
    if not chosen:
        print("mutants: no mutation in the functions changed; nothing to run")
        print("0 mutations: 0 killed, 0 survived")
        return 0
    bad = 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutants.") as tmp:
        os.chmod(tmp, 0o755)  # the privilege tests run the copy as nobody
        copy = Path(tmp) / "project"
        copy_project(copy)
        every = sorted({f for m in chosen for f in m.tests})
        ok, why = run_tests(copy, every, a.timeout * 2)
        if not ok:
            print(f"mutants: the unmutated project fails its tests ({why}); nothing to measure")
            return 2
        killed = survived = 0
        for m in chosen:
            if locate(m, text) is None:
                print(f"NOT FOUND {m.name}: its text is not in {SCRIPT_NAME} exactly once")
                bad += 1
                continue
            (copy / SCRIPT_NAME).write_text(text.replace(m.text, m.becomes), encoding="utf-8")
            t0 = time.monotonic()
            passed, why = run_tests(copy, list(m.tests), a.timeout)
            took = time.monotonic() - t0
            if passed:
                print(f"SURVIVED  {m.name}: {m.what} ({', '.join(m.tests)}; {took:.0f} s)")
                survived += 1
                bad += 1
            else:
                print(f"killed    {m.name} by {why} ({took:.0f} s)")
                killed += 1
            sys.stdout.flush()
        (copy / SCRIPT_NAME).write_text(text, encoding="utf-8")
    print(f"{len(chosen)} mutations: {killed} killed, {survived} survived, "
          f"{len(chosen) - killed - survived} not found; {time.monotonic() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
