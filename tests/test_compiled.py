"""compile: the config checked once, when the initramfs is built, and its
records loaded at boot; whenever they might not be this script's or their
JSON's, the JSON is read instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCRIPT
from test_fuzz import valid_config
from test_two_processes import big_config, messages, mounts_below, run_apply, worlds  # noqa: F401 (a fixture)
from reliability_support import assert_clean_messages, tree_digest

sys.path.insert(0, str(SCRIPT.parent))
import impermanence_boot as ib  # noqa: E402


def cli(*args: str, script: Path = SCRIPT, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"), cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=120)


def compiled(tmp_path: Path, config: dict, name: str = "c", script: Path = SCRIPT) -> tuple:
    """(the JSON config, the compiled one) in tmp_path."""
    source, output = tmp_path / f"{name}.json", tmp_path / f"{name}.bin"
    source.write_text(json.dumps(config, indent=1))
    result = cli("--config", str(source), "compile", "--output", str(output), script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"compiled {len(ib.load_config_file(str(source)).entries)} entries to {output}\n"
    return source, output


def parts(path: Path) -> tuple:
    """(header line, JSON bytes, payload bytes) of a compiled config."""
    raw = path.read_bytes()
    assert raw.startswith(ib.COMPILED_MAGIC)
    end = raw.index(b"\n", len(ib.COMPILED_MAGIC))
    header = raw[len(ib.COMPILED_MAGIC):end]
    size = int(header.split()[2])
    return header, raw[end + 1:end + 1 + size], raw[end + 1 + size:]


def spec_example() -> dict:
    return {
        "fileSystems": {"/persistent": {"device": "/dev/disk/by-label/persist", "fsType": "ext4",
                                        "options": ["noatime"]},
                        "/persist2": {"label": "second"}},
        "deviceTimeout": 12.5,
        "users": {"bird": {"uid": 1000, "group": "users", "home": "/home/bird", "homeMode": "0750"}},
        "groups": {"users": {"gid": 100}},
        "persistence": {
            "/persistent": {
                "directories": ["/var/log",
                                {"directory": "/etc/nixos", "user": "bird", "group": "users", "mode": "0700"},
                                {"directory": "/var/lib/colord", "user": "colord", "mode": "u=rwx,g=rx,o="},
                                "/home/bird/system-kept"],
                "files": ["/etc/machine-id",
                          {"file": "/etc/ssh/ssh_host_ed25519_key.pub", "method": "symlink"},
                          {"file": "/etc/nix/id_rsa", "parentDirectory": {"mode": "u=rwx,g=,o="}},
                          {"file": "/etc/other", "persistentStoragePath": "/persist2"}],
                "users": {"bird": {"directories": ["Downloads", {"directory": ".ssh", "mode": "0700"}],
                                   "files": [".bash_history", {"file": ".netrc", "method": "symlink"}]},
                          "root": {"directories": [".cache"]}}},
            "/persist2": {"directories": ["/srv/data"]},
            "/off": {"enable": False, "directories": ["/never"]},
        },
    }


@pytest.mark.parametrize("make", [valid_config, spec_example, big_config, lambda: {}])
def test_compiled_records_are_the_config_its_json_gives(tmp_path, monkeypatch, make):
    source, output = compiled(tmp_path, make())
    expected = ib.load_config_file(str(source))
    # Loaded from the records alone: reading JSON is not even possible.
    calls = []
    monkeypatch.setattr(ib, "load_config", lambda *a: calls.append(a) or pytest.fail("JSON read"))
    got = ib.load_config_file(str(output))
    assert got == expected and not calls
    assert [e.__dict__ for e in got.entries] == [e.__dict__ for e in expected.entries]
    assert type(got.device_timeout) is float and type(got.entries) is tuple
    # Perms are shared, as the JSON loader shares a location's defaults.
    assert len({id(e.perms) for e in got.entries if e.perms}) <= len({e.perms for e in got.entries})


def test_check_reads_the_json_and_compares(tmp_path):
    source, output = compiled(tmp_path, spec_example())
    result = cli("--config", str(output), "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [cli("--config", str(source), "check").stdout.strip(),
                                          "compiled by this script: apply loads its records"]


def test_records_of_another_config_under_this_json_are_refused_by_check(tmp_path):
    _, output = compiled(tmp_path, spec_example())
    _, other = compiled(tmp_path, valid_config(), "other")
    _, json_bytes, _ = parts(output)
    other_records = parts(other)[2]
    forged = tmp_path / "forged.bin"
    forged.write_bytes(ib.compiled_header(json_bytes, other_records, ib.script_fingerprint())
                       + json_bytes + other_records)
    # The header says current: apply would take the records as they are...
    assert ib.load_config_file(str(forged)) == ib.load_config(json.dumps(valid_config()))
    # ...and check, which reads the JSON too, says they are not its JSON's.
    result = cli("--config", str(forged), "check")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"impermanence: {forged}: compiled records differ from its JSON; compile it again\n"


def test_compiled_by_another_version_of_the_script_reads_the_json(tmp_path, monkeypatch):
    other_script = tmp_path / "impermanence_boot_other.py"
    other_script.write_text(SCRIPT.read_text() + "\n# another version\n")
    source, output = compiled(tmp_path, spec_example(), script=other_script)
    assert parts(output)[0].split()[0] != str(ib.script_fingerprint()).encode()
    monkeypatch.setattr(ib, "config_from_payload", lambda *a: pytest.fail("records used"))
    assert ib.load_config_file(str(output)) == ib.load_config_file(str(source))
    monkeypatch.undo()
    result = cli("--config", str(output), "check")
    assert result.returncode == 0
    assert result.stdout.splitlines()[1].startswith("compiled by another version of impermanence_boot.py")
    # apply, plan and status say so (once, one line), and go on from the JSON.
    result = cli("--config", str(output), "--root", str(tmp_path), "plan")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"impermanence: {output}: compiled by another version of impermanence_boot.py, "
                             "or damaged: reading its JSON instead (slower); compile it again\n")
    assert result.stdout == cli("--config", str(source), "--root", str(tmp_path), "plan").stdout
    # That other version itself takes its records.
    assert cli("--config", str(output), "check", script=other_script).stdout.splitlines()[1] == \
        "compiled by this script: apply loads its records"


def test_a_json_part_edited_afterwards_is_what_counts(tmp_path, monkeypatch):
    _, output = compiled(tmp_path, spec_example())
    raw = output.read_bytes()
    assert raw.count(b'"/var/log"') == 1
    output.write_bytes(raw.replace(b'"/var/log"', b'"/var/loh"'))  # same length
    monkeypatch.setattr(ib, "config_from_payload", lambda *a: pytest.fail("records used"))
    targets = {ib.as_path(e.target) for e in ib.load_config_file(str(output)).entries}
    assert "/var/loh" in targets and "/var/log" not in targets


def flip_a_path_byte(payload: bytes) -> bytes:
    """The records with one letter of a path changed: still valid marshal."""
    at = payload.index(b"colord")
    return payload[:at] + b"Colord" + payload[at + 6:]


@pytest.mark.parametrize("damage, header_says", [
    *((damage, "as written") for damage in ("cut", "garbage", "empty", "flipped")),
    # A header forged to match: what marshal and the layout check still catch
    # (a valid other record, as "flipped", is check's business: test above).
    *((damage, "current") for damage in ("cut", "garbage", "empty")),
])
def test_damaged_records_read_the_json(tmp_path, monkeypatch, damage, header_says):
    source, output = compiled(tmp_path, spec_example())
    header, json_bytes, payload = parts(output)
    payload = {"cut": payload[:len(payload) // 2], "garbage": b"\xff\x00garbage" * 20, "empty": b"",
               "flipped": flip_a_path_byte(payload)}[damage]
    if header_says == "current":
        output.write_bytes(ib.compiled_header(json_bytes, payload, ib.script_fingerprint())
                           + json_bytes + payload)
    else:  # the header written with the records: their CRC-32 no longer matches
        output.write_bytes(ib.COMPILED_MAGIC + header + b"\n" + json_bytes + payload)
        monkeypatch.setattr(ib, "config_from_payload", lambda *a: pytest.fail("records used"))
    assert ib.load_config_file(str(output)) == ib.load_config_file(str(source))


@pytest.mark.parametrize("damage, cause", [
    (lambda raw, n: raw[:n + 5], "compiled config has a damaged header; compile it again"),
    (lambda raw, n: raw[:n] + b"x y\n{}", "compiled config has a damaged header; compile it again"),
    (lambda raw, n: raw[:n] + b"1 3.11 2 3\n{}", "compiled config has a damaged header; compile it again"),
    (lambda raw, n: raw[:raw.index(b"\n", n) + 20], "compiled config is truncated; compile it again"),
])
def test_damaged_header_or_cut_json_is_one_line_error(tmp_path, damage, cause):
    _, output = compiled(tmp_path, spec_example())
    output.write_bytes(damage(output.read_bytes(), len(ib.COMPILED_MAGIC)))
    for command in ("check", "apply", "status"):
        result = cli("--config", str(output), "--root", str(tmp_path), command)
        assert result.returncode == 2
        assert result.stderr == f"impermanence: {output}: {cause}\n"


def test_compile_refuses_a_bad_config_and_writes_nothing(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text('{"persistence": {"/p": {"directories": ["relative"]}}}')
    result = cli("--config", str(source), "compile", "--output", str(tmp_path / "out.bin"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert 'persistence["/p"].directories[0]: path' in result.stderr
    assert os.listdir(tmp_path) == ["bad.json"]


def test_compile_usage_and_output_errors(tmp_path):
    source = tmp_path / "c.json"
    source.write_text(json.dumps(valid_config()))
    result = cli("--config", str(source), "compile")
    assert result.returncode == 2 and result.stderr.startswith("impermanence: compile needs --output PATH\n")
    result = cli("--config", str(source), "--output", str(tmp_path / "x"), "check")
    assert result.returncode == 2 and result.stderr.startswith("impermanence: --output goes with compile\n")
    missing = tmp_path / "no-such-dir" / "c.bin"
    result = cli("--config", str(source), "compile", "--output", str(missing))
    assert result.returncode == 2
    assert result.stderr == (f"impermanence: {missing}: cannot write compiled config: "
                             "No such file or directory\n")


def test_compile_replaces_a_symlink_at_the_output_not_what_it_points_to(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    output = tmp_path / "c.bin"
    output.symlink_to(victim)
    source = tmp_path / "c.json"
    source.write_text(json.dumps(valid_config()))
    assert cli("--config", str(source), "compile", "--output", str(output)).returncode == 0
    assert victim.read_text() == "precious\n"
    assert not output.is_symlink() and output.read_bytes().startswith(ib.COMPILED_MAGIC)
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.json", "victim"]


def test_a_compiled_config_compiles_again_from_its_json(tmp_path):
    source, output = compiled(tmp_path, spec_example())
    again = tmp_path / "again.bin"
    assert cli("--config", str(output), "compile", "--output", str(again)).returncode == 0
    assert again.read_bytes() == output.read_bytes()


def test_a_relative_config_path_is_named_once(tmp_path):
    result = cli("--config", "missing.json", "check", cwd=tmp_path)
    assert result.stderr == "impermanence: missing.json: cannot read config: No such file or directory\n"
    (tmp_path / "bad.json").write_text("{")
    result = cli("--config", "bad.json", "check", cwd=tmp_path)
    assert result.stderr.startswith("impermanence: bad.json: invalid JSON at line 1")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_apply_from_the_compiled_config_is_apply_from_its_json(worlds, tmp_path, jobs):
    source, output = compiled(tmp_path, big_config())
    one, two = worlds("from-json"), worlds("from-compiled")
    from_json = run_apply(one, source, jobs, "-v")
    from_compiled = run_apply(two, output, jobs, "-v")
    assert_clean_messages(from_compiled.stderr)
    assert from_json.returncode == from_compiled.returncode == 1  # big_config has two failing entries
    assert messages(from_compiled.stderr, two) == messages(from_json.stderr, one)
    assert mounts_below(two) == mounts_below(one) and len(mounts_below(one)) > 100
    assert tree_digest(two) == tree_digest(one)
