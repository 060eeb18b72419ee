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


@pytest.mark.parametrize("path,why", [
    ("/proc", "proc filesystem"), ("/proc/sys/kernel", "proc filesystem"), ("/sys/fs", "sysfs"),
    ("/dev", "devtmpfs"), ("/dev/shm", "devtmpfs"), ("/run", "/run starts empty"),
    ("/run/user/1000", "/run starts empty"), ("/nix/store", "Nix store"),
])
def test_kept_paths_that_cannot_work_are_config_errors(tmp_path, path, why):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"persistence": {"/persistent": {"directories": ["/var/log", path]}}}))
    r = run("--config", str(cfg), "check")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'impermanence: {cfg}: persistence["/persistent"].directories[1]: {path} cannot be kept: '), lines
    assert why in lines[0]


def test_kept_paths_near_the_refused_ones_are_fine(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"persistence": {"/persistent": {
        "directories": ["/nix/var", "/var/run-things", "/devices", "/system"]}}}))
    r = run("--config", str(cfg), "check")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_tmp_is_kept_with_a_warning(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"persistence": {"/persistent": {"directories": ["/tmp"]}}}))
    r = run("--config", str(cfg), "check")
    assert r.returncode == 0 and r.stdout.startswith("config OK")
    assert r.stderr.startswith('impermanence: /tmp (persistence["/persistent"].directories[0]): '
                               "/tmp is meant to be emptied at boot"), r.stderr


def test_quiet_check_prints_nothing(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"persistence": {"/persistent": {"directories": ["/var/log"]}}}))
    r = run("-q", "--config", str(cfg), "check")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert run("--config", str(cfg), "check").stdout.startswith("config OK")


def test_usage_errors_escape_control_characters():
    # An argument holding a carriage return or escape sequence stays on
    # the one line that names it.
    r = run("-\r0")
    assert r.returncode == 2
    assert r.stderr.split("\n")[0] == "impermanence: unknown option -\\x0d0", r.stderr
    r = run("check", "\x1b[2Jx")
    assert "\x1b" not in r.stderr and r.stderr.count("\n") == 2, r.stderr
