"""The command line: usage, the config it reads, and exit status 2 with one
line for what is wrong with either."""
from __future__ import annotations

import json

import pytest

from support import config, run


def test_help():
    result = run("--help")
    assert result.returncode == 0
    for command in ("apply", "plan", "status", "unmount", "check"):
        assert command in result.stdout


@pytest.mark.parametrize("args,message", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["--bogus"], "unknown option --bogus"),
    (["--config"], "--config needs a path"),
    (["plan", "extra"], "unexpected argument 'extra'"),
    (["--json", "plan"], "--json goes with status"),
])
def test_usage_errors_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("impermanence: ")
    assert "Traceback" not in result.stderr


def test_config_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(config(directories=[{"directory": "/a", "mode": "rwx"}])))
    result = run("--config", str(bad), "check")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"impermanence: {bad}: ")
    assert 'directories[0].mode' in lines[0]


def test_missing_and_non_utf8_config(tmp_path):
    result = run("--config", str(tmp_path / "nope.json"), "check")
    assert result.returncode == 2
    assert f"{tmp_path / 'nope.json'}: cannot read config" in result.stderr
    binary = tmp_path / "b.json"
    binary.write_bytes(b'{"persistence": {"/p\xff": {}}}')
    result = run("--config", str(binary), "check")
    assert result.returncode == 2
    assert "not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_environment(tmp_path):
    good = tmp_path / "env.json"
    good.write_text(json.dumps(config(directories=["/var/log"])))
    result = run("check", env={"IMPERMANENCE_CONFIG": str(good)})
    assert result.returncode == 0
    assert "1 directories, 0 files" in result.stdout


def test_a_relative_config_path_is_named_once(tmp_path):
    result = run("--config", "missing.json", "check", cwd=tmp_path)
    assert result.stderr == "impermanence: missing.json: cannot read config: No such file or directory\n"
    (tmp_path / "bad.json").write_text("{")
    result = run("--config", "bad.json", "check", cwd=tmp_path)
    assert result.stderr.startswith("impermanence: bad.json: invalid JSON at line 1")
