"""The release matrix (./tests/run.sh --releases): the whole non-QEMU suite
inside a chroot of each Debian release, run by that release's python3.

    python3 tests/releases/run.py [--build-only] [RELEASE ...] [-- PYTEST-ARGS]

Each release's chroot (tests/releases/chroots.py, cached) gets /dev, /proc,
/sys, a fresh /run, /tmp and /var/tmp, and the project at its own path, in
a mount namespace of the run's own; the pytest inside enters its own
namespace as on the host. A test that cannot run on a release is listed in
EXCLUDED with its reason and deselected by name (the reasons are printed);
nothing else is left out. Exit status: non-zero when any release's run
failed. Stdlib only: it runs on the host's python3.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import chroots

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent

# Host set-up tests: what tests/setup.sh does on this machine.
HOST_ONLY = {
    "tests/boot/test_demo.py::test_demo_installs_only_what_it_uses":
        "it sources tests/setup.sh, which checks and would remake the project's .venv, the "
        "host's (its interpreter is the host's); the host suite runs it",
}
# release -> {pytest node id: why it cannot run there}
NIX_2_3 = ("Debian 11's nix-bin is Nix 2.3.7, which lacks builtins.groupBy (Nix 2.5) that "
           "nix/config.nix uses; the NixOS module is evaluated by NixOS's own Nix, never this one")
EXCLUDED: dict[str, dict[str, str]] = {
    "bullseye": {
        **HOST_ONLY,
        **{f"tests/nix/{f.name}": NIX_2_3 for f in sorted((PROJECT / "tests" / "nix").glob("test_*.py"))},
        **{f"tests/reliability/test_running_system.py::{test}":
           "Debian 11's mke2fs gives the suite's small ext4 loop disks 128-byte inodes, whose "
           "timestamps have whole seconds, and the test compares nanosecond mtimes of the moved "
           "data with its copy in storage" for test in (
               "test_data_a_new_kept_directory_holds_is_moved_into_storage",
               "test_killed_at_every_step_of_a_move_then_applied_again[copy-")},
        **{test: "Debian 11's strace 5.10 does not know mount_setattr (Linux 5.12), which the "
                 "test's fault injection names"
           for test in ("tests/reliability/test_propagation.py::test_older_kernels_give_the_same_propagation",
                        "tests/reliability/test_propagation.py::test_killed_between_attach_and_slave_then_apply_again",
                        "tests/engine/test_save.py::test_sigkill_at_every_write_rename_and_unlink_then_save_again")},
        "tests/reliability/test_stalled_mounts.py":
            "Debian 11's mke2fs 1.46.2 stats every mount point in /proc/self/mounts, so the "
            "fixture's next mkfs.ext4 blocks on the test's own stopped FUSE server",
        "tests/engine/test_modes.py::test_symbolic_modes_match_mkdir":
            "its reference is coreutils 9's mkdir -m (NixOS's); Debian 11 has 8.32, whose "
            "mkdir -m applies the umask under explicit classes (u=wx gives 355, not 377)",
    },
    "trixie": {**HOST_ONLY},
}

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Passed into the chroot when set: CI makes missing prerequisites fail.
PASSED_ENV = ("CI", "IMPERMANENCE_DIST_TIMEOUT", "NIXPKGS_LIB", "IMPERMANENCE_SRC")


def vendor_dir() -> Path:
    """The Nix tests' vendored sources (nix/tests/harness.py's vendor_dir)."""
    return Path(os.environ.get("IMPERMANENCE_VENDOR") or PROJECT.parent / "shared" / "vendor")


def suite_command(release: str, root: Path, pytest_args: list[str]) -> list[str]:
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "IMPERMANENCE_RELEASE": release}
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})
    binds = [PROJECT]
    for name in ("NIXPKGS_LIB", "IMPERMANENCE_SRC"):
        if name in env:
            binds.append(Path(env[name]))
    if vendor_dir().is_dir():
        binds.append(vendor_dir().resolve())
        env["IMPERMANENCE_VENDOR"] = str(vendor_dir().resolve())
    deselect = [a for node in EXCLUDED[release] for a in ("--deselect", node)]
    pytest = [chroots.VENV_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "-m", "not vm", *deselect, *(pytest_args or ["tests"])]
    q = shlex.quote
    r = q(str(root))
    # The tree, bound on itself, becomes the namespace's root (pivot_root,
    # not only chroot): a test that leaves a mount namespace of its own with
    # setns() lands on its namespace's root, which must be this tree, not
    # the host's.
    lines = ["set -e", f"mount --bind {r} {r}",
             f"mount --rbind /dev {r}/dev", f"mount -t proc proc {r}/proc",
             f"mount --rbind /sys {r}/sys"]
    lines += [f"mount -t tmpfs tmpfs {r}{d}" for d in ("/run", "/tmp", "/var/tmp")]
    for b in binds:
        lines += [f"mkdir -p {r}{q(str(b))}", f"mount --bind {q(str(b))} {r}{q(str(b))}"]
    # A git worktree's repository lies outside it (tests list the project's
    # files with git): seen, never changed.
    git = PROJECT / ".git"
    if git.is_file() and git.read_text().startswith("gitdir: "):
        gitdir = Path(git.read_text()[len("gitdir: "):].strip())
        common = gitdir / "commondir"
        repo = q(str((gitdir / common.read_text().strip()).resolve() if common.is_file() else gitdir))
        lines += [f"mkdir -p {r}{repo}", f"mount --bind {repo} {r}{repo}",
                  f"mount -o remount,bind,ro {r}{repo}"]
    # The host's .venv (its interpreter is the host's): seen, never changed.
    venv = q(str(PROJECT / ".venv"))
    lines.append(f"if [ -d {venv} ]; then mount --bind {venv} {r}{venv} && "
                 f"mount -o remount,bind,ro {r}{venv}; fi")
    inner = f"umount -l /mnt && cd {q(str(PROJECT))} && exec {' '.join(map(q, pytest))}"
    lines += [f"cd {r}", "pivot_root . mnt",
              "exec /usr/sbin/chroot . /usr/bin/env -i "
              + " ".join(q(f"{k}={v}") for k, v in env.items()) + f" /bin/sh -c {q(inner)}"]
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(lines)]


def main(argv: list[str]) -> int:
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    build_only = "--build-only" in argv
    releases = [a for a in argv if a != "--build-only"] or list(chroots.RELEASES)
    for release in releases:
        if release not in chroots.RELEASES:
            print(f"releases: unknown release {release} (known: {' '.join(chroots.RELEASES)})",
                  file=sys.stderr)
            return 2
    roots, summary, failed = {}, [], False
    # The chroots are built side by side (mostly downloads and dpkg).
    with ThreadPoolExecutor(len(releases)) as pool:
        built = dict(zip(releases, pool.map(chroots.ensure, releases)))
    for release in releases:
        roots[release], seconds = built[release]
        summary.append(f"{release} chroot: " + (f"built in {seconds:.0f} s" if seconds is not None
                                                else f"cached ({roots[release].name})"))
    if not build_only:
        for release in releases:
            for node, why in EXCLUDED[release].items():
                print(f"releases: {release}: not run: {node}: {why}", flush=True)
            print(f"releases: {release}: the non-QEMU suite in {roots[release]}", flush=True)
            start = time.monotonic()
            rc = subprocess.run(suite_command(release, roots[release], pytest_args)).returncode
            took = time.monotonic() - start
            failed |= rc != 0
            summary.append(f"{release} suite: {'passed' if rc == 0 else f'FAILED (exit {rc})'} "
                           f"in {took:.0f} s, {len(EXCLUDED[release])} excluded by name")
    print("releases: " + "; ".join(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
