"""The demo as a new user meets it: vm/demo.sh installs only what the demo
uses, and vm/demo.py prints plain tables (the real `status` lines, kept and
gone, owners and modes, times) and ends in OK."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from support import PROJECT, distro_python, require

TEST_ONLY = {"dracut-core", "initramfs-tools", "nix-bin", "btrfs-progs", "xfsprogs", "dosfstools",
             "gcc", "python3-venv", "strace", "git"}


def installs(tmp_path, *args: str) -> list:
    """The packages setup.sh asks apt-get to install on a machine that has
    none (dpkg-query and apt-get stand-ins on PATH record the call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "apt.log"
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    code = f'set -e; . {PROJECT}/tests/setup.sh {" ".join(args)}'
    r = subprocess.run(["bash", "-c", code], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls[0].split()[0] == "update" and len([c for c in calls if c.startswith("update")]) == 1
    install = [c for c in calls if c.startswith("install")]
    assert len(install) == 1, calls
    return [w for w in install[0].split() if not w.startswith("-") and w != "install"
            and "=" not in w]


def test_demo_installs_only_what_it_uses(tmp_path):
    require(os.geteuid() == 0, "setup.sh runs as root")
    demo = installs(tmp_path / "demo", "--demo")
    suite = installs(tmp_path / "suite", "--tests")
    assert not set(demo) & TEST_ONLY, sorted(set(demo) & TEST_ONLY)
    assert {"qemu-system-x86", "linux-image-amd64", "busybox-static", "python3"} <= set(demo)
    assert set(demo) < set(suite) and TEST_ONLY <= set(suite)
    assert not [p for p in suite if re.search(r"python3\.\d", p)], suite
    assert "setup.sh\" --demo" in (PROJECT / "vm/demo.sh").read_text()


@pytest.mark.vm
def test_demo_output_is_plain(tmp_path):
    require(os.geteuid() == 0, "it needs root (the kernel image in /boot is root-only)")
    distro_python()
    r = subprocess.run([sys.executable, str(PROJECT / "vm/demo.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert out.rstrip().endswith("OK: everything in the config was kept, nothing else was.")
    # No Python reprs of tuples or dicts, no unexplained comparison.
    assert not re.search(r"\(\s*'|\(\d+, |\{'", out), [l for l in out.splitlines() if re.search(r"\(\s*'|\(\d+, |\{'", l)]
    assert "shell" not in out
    # The status section is the real status's lines.
    section = out.split("== impermanence_boot.py status")[1].split("\n== ")[0]
    rows = [l.strip() for l in section.splitlines()[1:] if l.strip()]
    assert re.fullmatch(r"\d+ of \d+ entries in place", rows[-1]), rows
    assert all(re.match(r"(ok|mounted) +(storage|directory|file) ", l) for l in rows[:-1]), rows
    assert "<- " not in section
