"""Run without root: the commands that mount say so at once in one line
(exit 4, nothing changed); the read-only ones say what they could not see."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from support import SCRIPT, distro_python, require, script_env

NOBODY = 65534


def as_nobody(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           distro_python().path, "-I", str(SCRIPT), *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=script_env(), timeout=timeout)


@pytest.fixture
def tmp_path():
    """A directory any user may enter (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="impermanence-privilege."))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def config(tmp_path):
    cfg = tmp_path / "c.json"
    # A device that exists, with a timeout far longer than the run may take.
    cfg.write_text(json.dumps({
        "fileSystems": {"/persistent": {"device": "/dev/null", "fsType": "ext4"}},
        "deviceTimeout": 3600,
        "persistence": {"/persistent": {"directories": ["/var/log"]}}}))
    os.chmod(cfg, 0o644)
    return cfg


@pytest.mark.parametrize("command", ["apply", "unmount", "rotate-root", "save"])
def test_mounting_commands_need_root_and_say_so_at_once(tmp_path, config, command):
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    r = as_nobody("--root", str(root), "--config", str(config), command)
    assert r.returncode == 4, r.stderr
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"impermanence: {command} needs root: it mounts, unmounts and sets owners "
        f"(running as uid {NOBODY}); nothing was changed"]
    assert os.listdir(root) == []


@pytest.mark.parametrize("command", ["plan", "status", "orphans"])
def test_reading_commands_say_what_they_cannot_see(tmp_path, config, command):
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    r = as_nobody("--root", str(root), "--config", str(config), command)
    assert "cannot read config" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first == (f"impermanence: not root (uid {NOBODY}): {command} sees only what this user "
                     "may read and probes no device; run it as root for the whole answer"), r.stderr


def test_diff_that_cannot_read_a_path_exits_1(tmp_path, config):
    root = tmp_path / "root"
    (root / "srv/secret").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "srv", 0o755)
    os.chmod(root / "srv/secret", 0o700)  # root's, unreadable to nobody
    (root / "srv/secret/x").write_text("x")
    r = as_nobody("--root", str(root), "--config", str(config), "diff")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"{root}/srv/secret: Permission denied" in r.stderr, r.stderr


def test_version_and_the_name_it_was_started_by(tmp_path):
    r = subprocess.run([distro_python().path, "-I", str(SCRIPT), "--version"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("impermanence_boot 0."), r.stdout
    pyproject = (SCRIPT.parent / "pyproject.toml").read_text()
    assert 'version = { attr = "impermanence_boot.VERSION" }' in pyproject
    # As pip installs it: a command named impermanence-boot.
    entry = tmp_path / "impermanence-boot"
    entry.symlink_to(SCRIPT)
    r = subprocess.run([distro_python().path, "-I", str(entry), "--help"], capture_output=True, text=True)
    first = r.stdout.splitlines()[0]
    assert first.startswith("usage: impermanence-boot [--config PATH]"), first
    usage = r.stdout.split("\n\n")[0]
    for option in ("--json", "--tree", "--include PATH", "--dry-run", "-v|-q"):
        assert option in usage, option
