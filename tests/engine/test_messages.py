"""Messages: every one reaches /dev/kmsg, and what a user planted is written
escaped, one line per entry."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata

import impermanence_boot as ib
from support import BIRD, USERS_GID, base_config, require, run, tmpfs_at, unique_label


def test_messages_reach_kmsg(sandbox, disk):
    require(os.access("/dev/kmsg", os.W_OK), "/dev/kmsg is not writable")
    token = unique_label()
    cfg = base_config(disk.label, {"directories": [{"directory": f"/srv/{token}", "user": f"nouser{token}"}]})
    result = sandbox.run("apply", config=cfg, env={"IMPERMANENCE_NO_KMSG": ""})
    assert result.returncode == 1
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert f"impermanence: user nouser{token}: unknown user" in dmesg


def test_every_message_reaches_kmsg_despite_its_rate_limit(sandbox, disk):
    # The kernel lets one open /dev/kmsg write 10 lines per 5 s; -v adds a
    # line per action. 25 failing entries among 40 must all be in dmesg,
    # and so must every action line.
    require(os.access("/dev/kmsg", os.W_OK), "/dev/kmsg is not writable")
    token = unique_label()
    dirs = []
    for i in range(40):
        dirs.append({"directory": f"/srv/{token}/d{i:02}", "user": f"nouser{token}{i:02}"}
                    if i % 8 < 5 else f"/srv/{token}/d{i:02}")
    cfg = base_config(disk.label, {"directories": dirs})
    result = sandbox.run("-v", "apply", config=cfg, env={"IMPERMANENCE_NO_KMSG": ""})
    assert result.returncode == 1
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    logged = {i for i in range(40) if f"user nouser{token}{i:02}: unknown user" in dmesg}
    assert logged == {i for i in range(40) if i % 8 < 5}
    lines = result.stderr.splitlines()
    assert len(lines) > 40
    assert [line for line in lines if line not in dmesg] == []


def test_output_escapes_what_a_planted_link_says(sandbox):
    # A user's link text reaches plan, status and apply's messages: line
    # breaks, terminal escapes and bytes that are not UTF-8 come out
    # escaped, one line per entry, even on a strict UTF-8 stdout.
    R = sandbox.root
    store = tmpfs_at(R / "persistent")
    home = store / "home/alice"
    home.mkdir(parents=True)
    os.chown(home, BIRD, USERS_GID)
    text = b"/x\nimpermanence: FORGED\nok directory /etc\x1b[2K\x9b1G\xff"
    os.symlink(text, bytes(home / "Downloads"))
    cfg = {"users": {"alice": {"uid": BIRD, "group": "users"}}, "groups": {"users": {"gid": USERS_GID}},
           "persistence": {"/persistent": {"directories": ["/var/log"],
                                          "users": {"alice": {"directories": ["Downloads"]}}}}}
    strict = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    escaped = "/x\\x0aimpermanence: FORGED\\x0aok directory /etc\\x1b[2K\\x9b1G\\xff"
    plan = sandbox.run("plan", config=cfg, env=strict)
    assert plan.returncode == 0, plan.stderr
    assert "FORGED" in plan.stdout and not any(l.startswith("impermanence: FORGED") for l in plan.stdout.splitlines())
    assert escaped in plan.stdout, plan.stdout
    assert "\x1b" not in plan.stdout and "\x9b" not in plan.stdout
    result = sandbox.run("apply", env=strict)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert escaped in line, line
    status = sandbox.run("status", env=strict)
    assert status.returncode == 1, status.stderr
    assert status.stderr == ""
    lines = status.stdout.splitlines()
    assert len(lines) == 1 + 2 + 1, status.stdout  # storage, two entries, the summary
    assert escaped in status.stdout


def test_format_characters_are_escaped(tmp_path):
    # A bidi override (U+202E) or a zero-width space (U+200B) in a path
    # would make a message read as something else: written escaped, as the
    # other control characters are.
    path = "/srv/a\u202ebad\u200bx\U000e0041"
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"persistence": {"/persistent": {"directories": [path, path]}}}))
    result = run("--config", str(config_file), "--root", str(tmp_path), "check")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "/srv/a\\u202ebad\\u200bx\\U000e0041 is listed twice" in line, line
    every_cf = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cf")
    escaped = every_cf.translate(ib.UNPRINTABLE)
    assert not any(unicodedata.category(c) == "Cf" for c in escaped), escaped
