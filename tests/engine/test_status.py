"""status: each entry compared with the config, as text and as JSON."""
from __future__ import annotations

import json
import os
import subprocess

from support import base_config, main_config


def status_json(sandbox) -> dict:
    result = sandbox.run("status", "--json")
    data = json.loads(result.stdout)
    return result.returncode, {e["target"]: e for e in data["entries"]}, data


def test_status_reports_each_kind_of_drift(sandbox, disk, tmp_path):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    code, entries, data = status_json(sandbox)
    assert code == 0, entries
    assert {e["state"] for e in entries.values()} == {"ok"}
    assert data["storage"][0]["state"] == "mounted"
    R, S = sandbox.root, sandbox.path("/persistent")
    subprocess.run(["umount", str(R / "var/log")], check=True)                  # not mounted
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(other), str(R / "home/bird/Downloads")], check=True)  # wrong
    os.chown(S / "etc/nixos", 0, 0)                                              # owner drift
    os.chmod(S / "home/bird/.ssh", 0o755)                                        # mode drift
    os.unlink(R / "etc/ssh/ssh_host_ed25519_key.pub")                            # link gone
    code, entries, data = status_json(sandbox)
    assert code == 1
    assert entries["/var/log"]["state"] == "not-mounted"
    assert entries["/home/bird/Downloads"]["state"] == "wrong-source"
    assert entries["/etc/nixos"]["state"] == "owner-differs"
    assert entries["/home/bird/.ssh"]["state"] == "mode-differs"
    assert entries["/etc/ssh/ssh_host_ed25519_key.pub"]["state"] == "not-linked"
    assert entries["/etc/machine-id"]["state"] == "ok"
    text = sandbox.run("status")
    assert text.returncode == 1
    assert any(l.startswith("not-mounted") and "/var/log" in l for l in text.stdout.splitlines())


def test_source_missing_status(sandbox, disk):
    cfg = base_config(disk.label, {"directories": ["/var/log"]})
    assert sandbox.run("apply", config=cfg).returncode == 0
    subprocess.run(["umount", str(sandbox.path("/var/log"))], check=True)
    os.rmdir(sandbox.path("/persistent/var/log"))
    code, entries, _ = status_json(sandbox)
    assert code == 1
    assert entries["/var/log"]["state"] == "source-missing"


def test_status_reads_mountinfo_once(sandbox, disk):
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    _, calls = sandbox.traced("open,openat", "status")
    opens = [l for l in calls.splitlines() if "/proc/self/mountinfo" in l]
    assert len(opens) == 1, opens


def test_status_with_storage_not_mounted(sandbox, disk):
    """After unmount the storage's filesystem is gone from its mount point:
    status names the storage not mounted and every entry
    storage-unavailable (never source-missing, as if the data were lost),
    exit 3 as orphans; the JSON says the same."""
    cfg = main_config(disk.label)
    assert sandbox.run("apply", config=cfg).returncode == 0
    assert sandbox.run("unmount").returncode == 0
    code, entries, data = status_json(sandbox)
    assert code == 3, data
    assert [s["state"] for s in data["storage"]] == ["not-mounted"], data["storage"]
    assert {e["state"] for e in entries.values()} == {"storage-unavailable"}, entries
    lines = sandbox.run("status").stdout.splitlines()
    assert lines[0].startswith("not-mounted") and f"LABEL={disk.label}" in lines[0], lines
    assert all(l.startswith("storage-unavailable") for l in lines[1:-1]), lines
    orphans = sandbox.run("orphans")
    assert orphans.returncode == 3 and "not mounted" in orphans.stderr, orphans.stderr


def test_status_with_storage_device_missing(sandbox):
    cfg = base_config("nosuchlabel0", {"directories": ["/var/log"], "files": ["/etc/machine-id"]})
    sandbox.path("/persistent").mkdir()
    code, entries, data = status_json_with(sandbox, cfg)
    assert code == 3
    assert [s["state"] for s in data["storage"]] == ["not-mounted"], data["storage"]
    assert {e["state"] for e in entries.values()} == {"storage-unavailable"}, entries


def status_json_with(sandbox, cfg) -> tuple:
    sandbox.write_config(cfg)
    return status_json(sandbox)
