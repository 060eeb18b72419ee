"""Bad input: the config loader over arbitrary JSON values, path and mode
strings; the command line given bad arguments and unreadable, missing or
non-UTF-8 configs. Only ConfigError (with its key path) may come out of the
loader; the CLI answers every bad input with exit 2 and one line, never a
traceback."""
from __future__ import annotations

import json
import os
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support import PROJECT, run, assert_clean_messages

import impermanence_boot as ib

LOADER = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
CLI = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# Text that includes lone surrogates: JSON can spell them.
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("/.\0")),
               max_size=12)
KEYWORDS = st.sampled_from(["fileSystems", "deviceTimeout", "users", "groups", "persistence",
                            "directories", "files", "directory", "file", "mode", "user", "group",
                            "method", "parentDirectory", "persistentStoragePath", "enable",
                            "home", "uid", "gid", "device", "fsType", "options", "/persistent",
                            "hideMounts", "label"])
KEYS = st.one_of(KEYWORDS, TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    TEXT, st.sampled_from(["/var/log", "0755", "u=rwx", "root", "auto", ""]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)


def loads_or_config_error(data):
    try:
        return ib.parse_config(data)
    except ib.ConfigError as exc:
        assert isinstance(exc.where, str) and exc.where, repr(exc.where)
        assert isinstance(exc.cause, str) and exc.cause
        return exc


@LOADER
@given(JSON)
def test_arbitrary_json_values(data):
    loads_or_config_error(data)


@LOADER
@given(st.dictionaries(KEYS, JSON, max_size=5))
def test_arbitrary_top_level_objects(data):
    loads_or_config_error(data)


def valid_config() -> dict:
    return {
        "fileSystems": {"/persistent": {"device": "LABEL=persist", "fsType": "ext4",
                                        "options": ["noatime"]}},
        "deviceTimeout": 5,
        "users": {"bird": {"uid": 1000, "group": "users", "home": "/home/bird"}},
        "groups": {"users": {"gid": 100}},
        "persistence": {"/persistent": {
            "directories": ["/var/log", {"directory": "/var/lib/x", "user": "bird", "mode": "0700"}],
            "files": ["/etc/machine-id", {"file": "/etc/a", "parentDirectory": {"mode": "0755"}}],
            "users": {"bird": {"directories": ["Downloads"], "files": [".bash_history"]}},
        }},
    }


# Every place in valid_config() a value sits, as (key path, container path).
def leaf_paths(value, where="", path=()):
    yield where, path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaf_paths(v, ib.key_path(where, k), path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaf_paths(v, ib.key_path(where, i), path + (i,))


PLACES = [p for p in leaf_paths(valid_config()) if p[1]]


def test_valid_config_is_valid():
    assert isinstance(ib.parse_config(valid_config()), ib.Config)


@LOADER
@given(st.sampled_from(PLACES), JSON)
def test_one_value_replaced_error_names_its_key_path(place, value):
    """Replace one value of a valid config: an error names that key path
    (or one inside it, or the entry that now collides)."""
    where, path = place
    cfg = valid_config()
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    result = loads_or_config_error(cfg)
    if isinstance(result, ib.ConfigError):
        inside = result.where == where or result.where.startswith((where + ".", where + "[")) \
            or where.startswith((result.where + ".", result.where + "["))
        collides = "listed twice" in result.cause or "overlaps" in result.cause \
            or "inside the kept file" in result.cause
        assert inside or collides, (where, str(result))


@LOADER
@given(TEXT)
def test_directory_path_strings(text):
    cfg = {"persistence": {"/persistent": {"directories": [text]}}}
    result = loads_or_config_error(cfg)
    if isinstance(result, ib.ConfigError):
        assert result.where == 'persistence["/persistent"].directories[0]', str(result)
    else:
        (entry,) = result.entries
        assert text.startswith("/")
        assert entry.target and all(c not in ("", ".", "..") and "\0" not in c for c in entry.target)
        # As NixOS impermanence reads it: empty components dropped.
        assert entry.target == tuple(c for c in text.split("/") if c)
        text.encode("utf-8")  # encodable for the system calls


@LOADER
@given(TEXT)
def test_user_path_strings(text):
    cfg = {"persistence": {"/persistent": {"users": {"bird": {"files": [text]}}}}}
    result = loads_or_config_error(cfg)
    if isinstance(result, ib.ConfigError):
        assert result.where == 'persistence["/persistent"].users.bird.files[0]', str(result)
    else:
        (entry,) = result.entries
        # A leading "/" and empty components dropped; a file needs a name.
        assert entry.target == ("home", "bird") + tuple(c for c in text.split("/") if c)
        assert len(entry.target) > 2


MODE_TEXT = st.one_of(TEXT, st.text(alphabet="ugoa=+-rwxXst,01234567 ", max_size=12))


@LOADER
@given(MODE_TEXT)
def test_mode_strings(text):
    try:
        mode = ib.parse_mode(text)
    except ValueError:
        mode = None
    else:
        assert 0 <= mode <= 0o7777
        if text and all(c in "01234567" for c in text):
            assert mode == int(text, 8)
    cfg = {"persistence": {"/p": {"directories": [{"directory": "/x", "mode": text}]}}}
    result = loads_or_config_error(cfg)
    if mode is None:
        assert isinstance(result, ib.ConfigError)
        assert result.where == 'persistence["/p"].directories[0].mode', str(result)
    else:
        assert result.entries[0].perms.mode == mode


@pytest.mark.parametrize("n", range(0, 0o10000, 0o123))
def test_octal_modes_round_trip(n):
    assert ib.parse_mode(format(n, "o")) == n
    assert ib.parse_mode(format(n, "04o")) == n


@LOADER
@given(st.binary(max_size=64))
def test_arbitrary_bytes_through_the_file_loader(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "c.json"
    path.write_bytes(raw)
    try:
        ib.load_config_file(str(path))
    except ib.ConfigError as exc:
        assert exc.where


# --- the command line -------------------------------------------------------------

def run_cli(*args, env=None):
    """Output as bytes, decoded by the tests: paths that are not UTF-8
    reach it."""
    return run(*args, env=env, text=False, timeout=60)


def clean(err: str) -> None:
    """assert_clean_messages, allowing the usage synopsis after a usage error."""
    assert_clean_messages("\n".join(l for l in err.splitlines() if not l.startswith("usage: ")))


def one_clean_line(result) -> str:
    err = result.stderr.decode("utf-8", "replace")
    clean(err)
    lines = err.splitlines()
    assert len(lines) >= 1
    return lines[0]


BAD_ARGS = [
    ["--bogus"], ["-x"], ["--config"], ["--root"], ["--config="], ["--root="],
    ["frobnicate"], ["apply", "plan"], ["apply", "extra"], ["--json"], ["apply", "--json"],
    ["--verbose=yes"], ["-v", "--quiet", "nonsense"], ["--root", "/nonexistent-root-xyz", "apply"],
    [b"\xff\xfe".decode("utf-8", "surrogateescape")],
    ["--config", b"/tmp/\xff\xfe-missing".decode("utf-8", "surrogateescape"), "check"],
    ["--root", b"/\xff".decode("utf-8", "surrogateescape"), "status"],
    ["compile"], ["compile", "--output"], ["compile", "--output="], ["--output", "x", "apply"],
    ["--output=x", "check"], ["compile", "--json", "--output", "x"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=[repr(a) for a in BAD_ARGS])
def test_bad_arguments(tmp_path, args):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    env = {"IMPERMANENCE_CONFIG": str(cfg)}
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == b""
    line = one_clean_line(result)
    assert len(line) < 400


def config_files(tmp_path):
    d = tmp_path / "configs"
    d.mkdir()
    (d / "dir.json").mkdir()
    os.symlink("/nonexistent-xyz/c.json", d / "dangling.json")
    os.symlink("loop.json", d / "loop.json")
    (d / "file").write_text("{}")
    cases = {
        "missing": d / "missing.json",
        "a directory": d / "dir.json",
        "a dangling link": d / "dangling.json",
        "a link loop": d / "loop.json",
        "below a file": d / "file" / "c.json",
    }
    contents = {
        "empty": b"",
        "non-UTF-8": b'{"persistence": {"/p\xff": {}}}',
        "latin-1": "{\"users\": {\"bj\u00f6rn\": {}}}".encode("latin-1"),
        "UTF-16": json.dumps({"persistence": {}}).encode("utf-16"),
        "NUL": b"{\0}",
        "truncated": b'{"persistence": {"/p": {"directories": ["/var',
        "deep": b"[" * 100000 + b"]" * 100000,
        "huge int": b'{"deviceTimeout": 1' + b"0" * 5000 + b"}",
        "NaN": b'{"deviceTimeout": NaN}',
        "Infinity": b'{"deviceTimeout": Infinity}',
        "surrogate": b'{"persistence": {"/p": {"directories": ["/a\\udc80"]}}}',
        "a list": b"[]",
        "a string": b'"/var/log"',
        "binary": bytes(range(256)),
    }
    for name, body in contents.items():
        p = d / (name.replace(" ", "-") + ".json")
        p.write_bytes(body)
        cases[name] = p
    return cases


BAD_CONFIG_NAMES = ["missing", "a directory", "a dangling link", "a link loop", "below a file",
                    "empty", "non-UTF-8", "latin-1", "UTF-16", "NUL", "truncated", "deep",
                    "huge int", "NaN", "Infinity", "surrogate", "a list", "a string", "binary"]


@pytest.mark.parametrize("command", ["check", "apply", "plan", "status", "unmount"])
@pytest.mark.parametrize("name", BAD_CONFIG_NAMES)
def test_bad_config_files(tmp_path, name, command):
    path = config_files(tmp_path)[name]
    root = tmp_path / "root"
    root.mkdir()
    result = run_cli("--root", str(root), "--config", str(path), command)
    assert result.returncode == 2, result.stderr
    line = one_clean_line(result)
    assert len(result.stderr.splitlines()) == 1
    assert line.startswith(f"impermanence: {path}: "), line
    assert os.listdir(root) == []


@CLI
@given(st.binary(max_size=200))
def test_cli_random_config_bytes(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("cli")
    (d / "c.json").write_bytes(raw)
    result = run_cli("--config", str(d / "c.json"), "check")
    assert result.returncode in (0, 2)
    if result.returncode == 2:
        assert len(result.stderr.splitlines()) == 1
        one_clean_line(result)


ARG_WORDS = st.sampled_from(["apply", "plan", "status", "unmount", "check", "compile", "--json", "-v", "-q",
                             "--config", "--root", "--help", "-h", "--config=", "--root=/",
                             "--", "-", "", "x"])


@CLI
@given(st.lists(st.one_of(ARG_WORDS, st.text(string.printable, max_size=6)), max_size=5))
def test_cli_random_arguments(tmp_path_factory, args):
    d = tmp_path_factory.mktemp("args")
    root = d / "root"
    root.mkdir()
    cfg = d / "c.json"
    cfg.write_text(json.dumps({"persistence": {}}))
    # Never touch the real root: --root given last overrides any in args.
    env = {"IMPERMANENCE_CONFIG": str(cfg)}
    result = run_cli(*args, "--root", str(root), env=env)
    assert result.returncode in (0, 1, 2), result.stderr
    err = result.stderr.decode("utf-8", "replace")
    clean(err)
    assert "internal error" not in err


@pytest.mark.parametrize("name", ["a\rb", "a\nb", "a\x0bb", "a\u2028b"])
def test_a_line_break_in_a_path_is_written_escaped(tmp_path, name):
    # Found by test_cli_random_arguments: --config "\r" split the message
    # into two lines, the second without the prefix.
    result = run_cli("--config", str(tmp_path / name), "check")
    assert result.returncode == 2
    line = one_clean_line(result)
    assert str(tmp_path / "a") + ("\\x%02x" % ord(name[1]) if ord(name[1]) < 0x100
                                  else "\\u%04x" % ord(name[1])) + "b" in line, line
