"""The kernel's limits reached by a config: paths 10,000 components deep,
names of 255 and 256 bytes, paths at and past PATH_MAX, and 64 file
descriptors. Each is one entry's clear one-line error; the others apply."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from support import SCRIPT, require, script_env, tmpfs_at

DEEP = "/" + "/".join(["d"] * 10_000)          # far past PATH_MAX
DEEPER_THAN_FDS = "/" + "/".join(["e"] * 1_500)  # within PATH_MAX, past 64 (and 1,024) fds
NAME_255 = "/srv/" + "x" * 255
NAME_256 = "/srv/" + "y" * 256


def at_path_max(root) -> str:
    """A target whose path on the root is PATH_MAX - 1 bytes, and one a
    byte longer (the kernel takes up to 4,095 and a NUL)."""
    prefix = len(str(root)) + len("/persistent")  # the source's is longer
    body = 4095 - prefix
    parts, left = [], body
    while left > 0:
        part = min(200, left - 1)
        parts.append("m" * max(part, 1))
        left -= len(parts[-1]) + 1
    return "/" + "/".join(parts)


@pytest.mark.parametrize("fds", [64, 1024])
def test_limits_are_errors_of_their_entries(sandbox, fds):
    require(resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= fds, f"cannot raise the fd limit to {fds}")
    tmpfs_at(sandbox.path("/persistent"))
    fits = at_path_max(sandbox.root)
    cfg = {"persistence": {"/persistent": {
        "directories": ["/var/log", DEEP, DEEPER_THAN_FDS, NAME_255, NAME_256, fits, fits + "n"],
        "files": ["/etc/" + "f" * 255, "/etc/" + "g" * 256]}}}
    sandbox.write_config(cfg)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (fds, fds))

    result = subprocess.run([sys.executable, str(SCRIPT), "--root", str(sandbox.root), "--config",
                             str(sandbox.config_path), "apply"], capture_output=True, text=True,
                            env=script_env({"LIBMOUNT_UTAB": str(sandbox.utab)}), timeout=60,
                            stdin=subprocess.DEVNULL, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    short = "\n".join(line[:120] + "..." + line[-80:] for line in lines)  # for failures: readable
    assert all(line.startswith("impermanence: ") for line in lines), short
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, short
    R, S = str(sandbox.root), str(sandbox.path("/persistent"))

    def said(path: str, cause: str) -> bool:
        return f"impermanence: {path}: {cause}" in lines

    # Past PATH_MAX: said before any walk.
    assert said(S + DEEP, "is longer than the 4095 bytes a path may have"), short
    assert said(S + fits + "n", "is longer than the 4095 bytes a path may have"), short
    # More directories deep than descriptors: the walk runs out, and says so.
    assert any(line.startswith(f"impermanence: {S}/e/e/e/") and line.endswith(": open: Too many open files")
               for line in lines), short
    # A name of 256 bytes: the kernel's refusal, with the call it refused.
    assert said(f"{S}/srv/{'y' * 256}", "mkdir: File name too long"), short
    assert said(f"{R}/etc/{'g' * 256}", "symlink: File name too long"), short
    assert len(lines) == 5, short
    # The rest is in place: 255 bytes is a name, PATH_MAX - 1 a path.
    for target in ("/var/log", NAME_255):
        assert os.path.ismount(sandbox.path(target)), target
    assert os.path.ismount(os.path.join(R, fits.lstrip("/")))
    assert os.path.islink(sandbox.path("/etc/" + "f" * 255))
    assert not os.path.exists(os.path.join(R, "d"))  # nothing made for the deep one
