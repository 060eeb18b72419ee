"""Config loading, modes and the planner: pure tests, no root needed."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SCRIPT

sys.path.insert(0, str(SCRIPT.parent))
import impermanence_boot as ib  # noqa: E402


def config(**persistence_location) -> dict:
    return {"persistence": {"/persistent": persistence_location}}


# --- modes ----------------------------------------------------------------------

@pytest.mark.parametrize("text,mode", [
    ("0700", 0o700), ("755", 0o755), ("1777", 0o1777), ("0", 0),
    ("u=rwx,g=rx,o=", 0o750), ("u=rwx,g=,o=", 0o700), ("a=rx", 0o555),
    ("u=rwx,go=rx", 0o755), ("=r", 0o444), ("u=rw,g=r,o=r", 0o644),
    ("a=rwx,o-w", 0o775), ("u+rwx", 0o700), ("u=rwx,g=rxs", 0o2750),
    ("a=rwxt", 0o1777), ("ug=rwX", 0o770), ("u=rwx,u-x", 0o600),
    ("u=rwx,g=u,o=g", 0o777), ("u=rwx,go=u-w", 0o755), ("u=rwxs,g=u", 0o4770),
])
def test_parse_mode(text, mode):
    assert ib.parse_mode(text) == mode


@pytest.mark.parametrize("text", ["", "0800", "12345", "rwx", "u=rwq", "u:rwx", "z=rwx",
                                  "u=rwx,,g=rx", "0o755", "u=rwx g=rx", "-1", "g=ur", "g=uo"])
def test_parse_mode_rejects(text):
    with pytest.raises(ValueError):
        ib.parse_mode(text)


@given(st.integers(min_value=0, max_value=0o7777))
def test_octal_round_trip(mode):
    assert ib.parse_mode(format(mode, "o")) == mode
    assert ib.parse_mode(ib.format_mode(mode)) == mode


def chmod_reference(clauses: list) -> int:
    """Apply symbolic clauses with the real chmod(1) to a file of mode 0."""
    path = f"/tmp/impermanence-mode-{os.getpid()}"
    with open(path, "w"):
        pass
    try:
        os.chmod(path, 0)
        subprocess.run(["chmod", ",".join(clauses), path], check=True)
        return os.stat(path).st_mode & 0o7777
    finally:
        os.unlink(path)


# who, then one or two operations; each gives letters or copies a class
# ("g=u", "go=u-w").
ACTION = st.builds(lambda op, perms: op + perms,
                   st.sampled_from(["=", "+", "-"]),
                   st.one_of(st.text(alphabet="rwx", max_size=3), st.sampled_from(["u", "g", "o"])))
CLAUSE = st.builds(lambda who, actions: who + "".join(actions),
                   st.sampled_from(["u", "g", "o", "a", "ug", "go", "uo", "ugo"]),
                   st.lists(ACTION, min_size=1, max_size=2))


@settings(max_examples=60, deadline=None)
@given(st.lists(CLAUSE, min_size=1, max_size=4))
def test_symbolic_modes_match_chmod(clauses):
    # chmod(1) is the reference for the symbolic syntax on a 0 base.
    assert ib.parse_mode(",".join(clauses)) == chmod_reference(clauses)


# --- loading --------------------------------------------------------------------

def load(data) -> ib.Config:
    return ib.load_config(json.dumps(data))


def error_of(data) -> ib.ConfigError:
    with pytest.raises(ib.ConfigError) as info:
        load(data)
    return info.value


def test_spec_example_loads():
    spec_example = {
        "fileSystems": {"/persistent": {"device": "/dev/disk/by-label/persist", "fsType": "ext4",
                                        "options": ["noatime"]}},
        "deviceTimeout": 30,
        "users": {"bird": {"uid": 1000, "group": "users", "home": "/home/bird"}},
        "groups": {"users": {"gid": 100}},
        "persistence": {"/persistent": {
            "enable": True, "persistentStoragePath": "/persistent", "hideMounts": False,
            "directories": ["/var/log",
                            {"directory": "/etc/nixos", "user": "bird", "group": "users", "mode": "0700"},
                            {"directory": "/var/lib/colord", "user": "colord", "group": "colord",
                             "mode": "u=rwx,g=rx,o="}],
            "files": ["/etc/machine-id",
                      {"file": "/etc/ssh/ssh_host_ed25519_key.pub", "method": "symlink"},
                      {"file": "/etc/nix/id_rsa", "parentDirectory": {"mode": "u=rwx,g=,o="}}],
            "users": {"bird": {"directories": ["Downloads", {"directory": ".ssh", "mode": "0700"}],
                               "files": [".bash_history"]}},
        }},
    }
    cfg = load(spec_example)
    targets = {ib.as_path(e.target): e for e in cfg.entries}
    assert set(targets) == {"/var/log", "/etc/nixos", "/var/lib/colord", "/etc/machine-id",
                            "/etc/ssh/ssh_host_ed25519_key.pub", "/etc/nix/id_rsa",
                            "/home/bird/Downloads", "/home/bird/.ssh", "/home/bird/.bash_history"}
    assert targets["/etc/nixos"].perms == ib.Perms("bird", "users", 0o700)
    assert targets["/var/lib/colord"].perms == ib.Perms("colord", "colord", 0o750)
    assert targets["/var/log"].perms == ib.Perms("root", "root", 0o755)
    # user level: the user and their primary group (from the users table), 0755
    assert targets["/home/bird/Downloads"].perms == ib.Perms("bird", "users", 0o755)
    assert targets["/home/bird/.ssh"].perms == ib.Perms("bird", "users", 0o700)
    assert targets["/etc/ssh/ssh_host_ed25519_key.pub"].method == "symlink"
    assert targets["/etc/nix/id_rsa"].parent_perms == ib.Perms("root", "root", 0o700)
    assert all(e.storage == ("persistent",) for e in cfg.entries)
    assert cfg.filesystems[0].options == ("noatime",)
    assert cfg.device_timeout == 30


def test_nixos_internal_keys_are_accepted():
    # What builtins.toJSON of an evaluated environment.persistence looks like.
    cfg = load({"persistence": {"/persistent": {
        "enable": True, "persistentStoragePath": "/persistent", "hideMounts": True,
        "enableDebugging": False, "enableWarnings": True, "allowTrash": False,
        "directories": [{"directory": "/var/log", "dirPath": "/var/log", "user": "root",
                         "group": "root", "mode": "0755", "persistentStoragePath": "/persistent",
                         "home": None, "defaultPerms": {"user": "root", "group": "root", "mode": "0755"},
                         "hideMount": True}],
        "files": [{"file": "/etc/machine-id", "filePath": "/etc/machine-id", "home": None,
                   "method": "auto", "persistentStoragePath": "/persistent",
                   "parentDirectory": {"user": "root", "group": "root", "mode": "0755",
                                       "defaultPerms": {}}}],
        "users": {"bird": {"home": "/home/bird", "directories": [
            {"directory": "Music", "dirPath": "/home/bird/Music", "home": "/home/bird",
             "user": "bird", "group": "users", "mode": "0755", "persistentStoragePath": "/persistent"}],
            "files": []}},
    }}})
    assert [ib.as_path(e.target) for e in cfg.entries] == ["/etc/machine-id", "/home/bird/Music", "/var/log"]


def test_item_level_storage_path_is_honoured():
    cfg = load(config(directories=[{"directory": "/var/cache", "persistentStoragePath": "/cache"}]))
    assert cfg.entries[0].storage == ("cache",)
    assert ("cache",) in cfg.storages


@pytest.mark.parametrize("data,where,hint", [
    ({"persistance": {}}, "persistance", "did you mean 'persistence'"),
    (config(directorys=[]), 'persistence["/persistent"].directorys', "did you mean 'directories'"),
    (config(directories=[{"directory": "/a", "mdoe": "0700"}]),
     'persistence["/persistent"].directories[0].mdoe', "did you mean 'mode'"),
    (config(files=[{"file": "/a", "methd": "auto"}]),
     'persistence["/persistent"].files[0].methd', "did you mean 'method'"),
    ({"fileSystems": {"/p": {"device": "/dev/x", "fstype": "ext4"}}},
     'fileSystems["/p"].fstype', "did you mean 'fsType'"),
    ({"users": {"bird": {"uid": 1, "gorup": "users"}}}, "users.bird.gorup", "did you mean 'group'"),
])
def test_unknown_keys_name_the_path_and_a_hint(data, where, hint):
    exc = error_of(data)
    assert exc.where == where
    assert hint in exc.cause


@pytest.mark.parametrize("data,where,cause", [
    (config(directories=["var/log"]), 'persistence["/persistent"].directories[0]', "must be absolute"),
    (config(directories=["/var/../etc"]), 'persistence["/persistent"].directories[0]', "'..'"),
    (config(directories=["/var//log"]), 'persistence["/persistent"].directories[0]', "empty"),
    (config(directories=["/var/./log"]), 'persistence["/persistent"].directories[0]', "'.'"),
    (config(directories=["/"]), 'persistence["/persistent"].directories[0]', "empty"),
    (config(directories=["/a\0b"]), 'persistence["/persistent"].directories[0]', "NUL"),
    (config(users={"bird": {"files": ["/etc/x"]}}),
     'persistence["/persistent"].users.bird.files[0]', "relative"),
    (config(directories=[{"directory": "/a", "mode": "0999"}]),
     'persistence["/persistent"].directories[0].mode', "invalid mode"),
    (config(directories=[{"directory": "/a", "mode": 755}]),
     'persistence["/persistent"].directories[0].mode', "must be a string"),
    (config(files=[{"file": "/a", "method": "copy"}]),
     'persistence["/persistent"].files[0].method', "'auto' or 'symlink'"),
    (config(files=[{"method": "auto"}]), 'persistence["/persistent"].files[0]', "missing 'file'"),
    (config(directories="/var/log"), 'persistence["/persistent"].directories', "must be a list"),
    (config(enable="yes"), 'persistence["/persistent"].enable', "true or false"),
    ({"deviceTimeout": "30"}, "deviceTimeout", "number"),
    ({"deviceTimeout": -1}, "deviceTimeout", "between"),
    ({"fileSystems": {"/p": {"fsType": "ext4"}}}, 'fileSystems["/p"].device', "required"),
    ({"fileSystems": {"/p": {"device": "NAME=x"}}}, 'fileSystems["/p"].device', "unknown tag"),
    ({"users": {"bird": {"uid": -5}}}, "users.bird.uid", "not a valid id (0 to 4294967294)"),
    ([], "(top level)", "JSON object"),
])
def test_bad_values_name_the_path_and_cause(data, where, cause):
    exc = error_of(data)
    assert exc.where == where
    assert cause in exc.cause


def test_duplicate_targets_name_both_places():
    exc = error_of({"persistence": {
        "/persistent": {"directories": ["/var/log"]},
        "/other": {"directories": [{"directory": "/var/log"}]}}})
    assert "listed twice" in exc.cause
    assert 'persistence["/persistent"].directories[0]' in str(exc)
    assert 'persistence["/other"].directories[0]' in str(exc)


def test_user_and_system_duplicate_is_detected():
    exc = error_of(config(directories=["/home/bird/Music"], users={"bird": {"directories": ["Music"]}}))
    assert "listed twice" in exc.cause


@pytest.mark.parametrize("data,cause", [
    (config(directories=["/persistent/x"]), "overlaps"),
    (config(directories=["/etc"], files=["/etc/foo/bar"]), None),  # dir containing a file: allowed
    (config(files=["/etc/foo"], directories=["/etc/foo/bar"]), "inside the kept file"),
    ({"persistence": {"/persist/a": {"directories": ["/persist"]}}}, "overlaps"),
])
def test_overlapping_entries(data, cause):
    if cause is None:
        load(data)
    else:
        assert cause in error_of(data).cause


def test_disabled_location_is_skipped_entirely():
    cfg = load({"persistence": {"/off": {"enable": False, "directories": ["/var/log"]},
                                "/on": {"directories": ["/var/log"]}}})
    assert [e.storage for e in cfg.entries] == [("on",)]


def test_invalid_json_names_line():
    with pytest.raises(ib.ConfigError) as info:
        ib.load_config('{"persistence": {,}}', "/etc/impermanence.json")
    assert info.value.where == "/etc/impermanence.json"
    assert "line 1 column 18" in info.value.cause


# --- the loader never raises anything but ConfigError ------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
KEYS = st.sampled_from(["directories", "files", "users", "directory", "file", "mode", "user",
                        "group", "method", "parentDirectory", "enable", "persistentStoragePath",
                        "home", "uid", "gid", "device", "fsType", "options", "/persistent",
                        "bird", "/var/log", "Music", "0700", "u=rwx", "auto", "symlink"])
PLAUSIBLE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | KEYS | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=30)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, PLAUSIBLE,
                 st.fixed_dictionaries({"persistence": st.dictionaries(KEYS, PLAUSIBLE, max_size=3)}),
                 st.fixed_dictionaries({}, optional={"fileSystems": PLAUSIBLE, "users": PLAUSIBLE,
                                                     "groups": PLAUSIBLE, "deviceTimeout": PLAUSIBLE,
                                                     "persistence": PLAUSIBLE})))
def test_loader_raises_only_config_error_with_a_key_path(data):
    try:
        ib.parse_config(data)
    except ib.ConfigError as exc:
        assert exc.where, "a config error always says where"
        assert "\n" not in str(exc)


# --- planner invariants ------------------------------------------------------------

NAMES = st.sampled_from(["var", "lib", "log", "etc", "ssh", "home", "cache", "a", "b", "c.d", "x y"])
REL = st.lists(NAMES, min_size=1, max_size=4).map(lambda parts: "/".join(parts))


@st.composite
def random_config(draw):
    dirs = draw(st.lists(REL, max_size=12))
    files = draw(st.lists(REL, max_size=6))
    user_dirs = draw(st.lists(REL, max_size=5))
    items = ([("d", "/" + p) for p in dirs] + [("f", "/" + p) for p in files]
             + [("u", p) for p in user_dirs])
    rng = random.Random(draw(st.integers()))
    rng.shuffle(items)
    loc = {"directories": [p for k, p in items if k == "d"],
           "files": [p for k, p in items if k == "f"],
           "users": {"bird": {"directories": [p for k, p in items if k == "u"]}}}
    return {"users": {"bird": {"uid": 1000, "group": "users"}}, "groups": {"users": {"gid": 100}},
            "persistence": {"/persistent": loc}}


def try_load(data):
    try:
        return ib.parse_config(data)
    except ib.ConfigError:
        return None  # duplicates and overlaps are rejected: nothing to plan


def plan_lines(cfg, root) -> list:
    tree = ib.Tree(str(root))
    accounts = ib.Accounts(cfg, tree, list(cfg.storages))
    out = []
    for entry in cfg.entries:
        for action in ib.plan_entry(entry, tree, accounts):
            out.append(action)
    return out, tree


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_config())
def test_planner_invariants(tmp_path_factory, data):
    cfg = try_load(data)
    if cfg is None:
        return
    targets = [e.target for e in cfg.entries]
    # parents before children, and a total order on targets
    assert targets == sorted(targets)
    for i, a in enumerate(targets):
        for b in targets[i + 1:]:
            assert b[:len(a)] == a or a[:len(b)] != b, f"{b} is a parent of {a} but comes later"
    root = tmp_path_factory.mktemp("root")
    (root / "persistent").mkdir()
    actions, tree = plan_lines(cfg, root)
    for action in actions:
        for field in ("path", "source", "target"):
            comps = getattr(action, field, None)
            if comps is not None:
                assert tree.host(comps).startswith(str(root) + "/")
                assert not any(c in ("", ".", "..") for c in comps)
    # every directory is created before anything inside it
    made = [a.path for a in actions if isinstance(a, ib.MakeDir)]
    for i, p in enumerate(made):
        assert all(not (q[:len(p)] == p and len(q) > len(p)) for q in made[:i])
    # stable: the same config in another item order plans identically
    shuffled = json.loads(json.dumps(data))
    for key in ("directories", "files"):
        shuffled["persistence"]["/persistent"][key].reverse()
    again, _ = plan_lines(try_load(shuffled), root)
    assert [a.describe(tree) for a in again] == [a.describe(tree) for a in actions]
    # plan changes nothing
    assert sorted(os.listdir(root)) == ["persistent"]
    assert os.listdir(root / "persistent") == []


def test_plan_nested_same_storage_binds_once(tmp_path):
    cfg = load(config(directories=["/var/lib", "/var/lib/foo"]))
    (tmp_path / "persistent").mkdir()
    actions, tree = plan_lines(cfg, tmp_path)
    binds = [ib.as_path(a.target) for a in actions if isinstance(a, ib.Bind)]
    # /var/lib/foo is reached through the /var/lib bind: no second mount
    assert binds == ["/var/lib"]


# --- command line -------------------------------------------------------------------

def run_cli(*args, env=None):
    full_env = dict(os.environ, IMPERMANENCE_NO_KMSG="1")
    full_env.pop("IMPERMANENCE_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, stdin=subprocess.DEVNULL)


def test_help():
    result = run_cli("--help")
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
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("impermanence: ")
    assert "Traceback" not in result.stderr


def test_config_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(config(directories=[{"directory": "/a", "mode": "rwx"}])))
    result = run_cli("--config", str(bad), "check")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"impermanence: {bad}: ")
    assert 'directories[0].mode' in lines[0]


def test_missing_and_non_utf8_config(tmp_path):
    result = run_cli("--config", str(tmp_path / "nope.json"), "check")
    assert result.returncode == 2
    assert f"{tmp_path / 'nope.json'}: cannot read config" in result.stderr
    binary = tmp_path / "b.json"
    binary.write_bytes(b'{"persistence": {"/p\xff": {}}}')
    result = run_cli("--config", str(binary), "check")
    assert result.returncode == 2
    assert "not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_environment(tmp_path):
    good = tmp_path / "env.json"
    good.write_text(json.dumps(config(directories=["/var/log"])))
    result = run_cli("check", env={"IMPERMANENCE_CONFIG": str(good)})
    assert result.returncode == 0
    assert "1 directories, 0 files" in result.stdout


# --- packaging ----------------------------------------------------------------------

def test_script_parses_as_python_3_9():
    # Initrds ship whatever Python the distribution has: 3.9 is the floor.
    import ast
    ast.parse(SCRIPT.read_text(), feature_version=(3, 9))


def test_script_imports_only_the_standard_library_and_few_modules_at_start():
    import ast
    tree = ast.parse(SCRIPT.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    assert top_level <= {"__future__", "errno", "gc", "os", "stat", "sys", "time"}
    # gc is compiled into the interpreter: no file to copy into the initramfs.
    assert "gc" in sys.builtin_module_names
    everything = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert everything <= set(sys.stdlib_module_names)


def test_pyproject_entry_point():
    import tomllib
    data = tomllib.loads((SCRIPT.parent / "pyproject.toml").read_text())
    assert data["project"]["requires-python"] == ">=3.9"
    module, func = data["project"]["scripts"]["impermanence-boot"].split(":")
    assert module == "impermanence_boot" and callable(getattr(ib, func))
    assert set(data["project"]["optional-dependencies"]["test"]) == {"pytest", "hypothesis"}


@settings(max_examples=300)
@given(JSON, st.sampled_from(["", " ", "\n\t ", "\r\n"]))
def test_parse_json_agrees_with_json_loads(value, space):
    text = space + json.dumps(value) + space
    assert ib.parse_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", "{", "[1,]", "{\"a\" 1}", "{\0}", "nul", "1 2", "\"\\ud800", "{}x"])
def test_parse_json_errors_are_json_errors(text):
    with pytest.raises(ValueError) as info:
        ib.parse_json(text)
    with pytest.raises(ValueError) as reference:
        json.loads(text)
    assert str(info.value) == str(reference.value)


@given(st.text(max_size=12))
def test_key_paths_are_one_line(key):
    path = ib.key_path("persistence", key)
    assert "\n" not in path and "\r" not in path
    assert path.isprintable()


def test_nixos_impermanence_evaluated_option_reads_as_the_plain_one():
    # builtins.toJSON of the option as NixOS impermanence evaluates it:
    # every item carries its internal keys, a file's parentDirectory names
    # its directory and always holds the defaults, and each users.<name>
    # item is repeated in its location's lists (relative, with its home).
    def evaluated_dir(directory, user, group, mode, home=None):
        return {"directory": directory, "user": user, "group": group, "mode": mode, "hideMount": False,
                "defaultPerms": {"user": user, "group": group, "mode": "0755"},
                "dirPath": (home + "/" if home else "") + directory, "persistentStoragePath": "/persistent",
                "home": home, "enableDebugging": False, "assertions": []}

    def evaluated_file(file, user, group, home=None, parent_mode="0755"):
        path = (home + "/" if home else "") + file
        return {"file": file, "method": "auto", "filePath": path, "persistentStoragePath": "/persistent",
                "home": home, "enableDebugging": False, "assertions": [],
                "parentDirectory": {"directory": file.rsplit("/", 1)[0] if "/" in file else "",
                                    "dirPath": path.rsplit("/", 1)[0], "user": user, "group": group,
                                    "mode": parent_mode, "home": home, "hideMount": False,
                                    "persistentStoragePath": "/persistent", "enableDebugging": False,
                                    "assertions": [],
                                    "defaultPerms": {"user": user, "group": group, "mode": "0755"}}}

    user_dirs = [evaluated_dir("Downloads", "bird", "users", "0755", "/home/bird"),
                 evaluated_dir(".ssh", "bird", "users", "0700", "/home/bird")]
    user_files = [evaluated_file(".bash_history", "bird", "users", "/home/bird")]
    evaluated = {"users": {"bird": {"uid": 1000, "group": "users", "home": "/home/bird"}},
                 "groups": {"users": {"gid": 100}},
                 "persistence": {"/persistent": {
                     "enable": True, "persistentStoragePath": "/persistent", "hideMounts": False,
                     "enableDebugging": False, "enableWarnings": True, "assertions": [],
                     "directories": [evaluated_dir("/var/log", "root", "root", "0755")] + user_dirs,
                     "files": [evaluated_file("/etc/nix/id_rsa", "root", "root"),
                               evaluated_file("/etc/ssh/key", "root", "root", parent_mode="0700")]
                              + user_files,
                     "users": {"bird": {"directories": user_dirs, "files": user_files}}}}}
    plain = {"users": evaluated["users"], "groups": evaluated["groups"],
             "persistence": {"/persistent": {
                 "directories": ["/var/log"],
                 "files": ["/etc/nix/id_rsa", {"file": "/etc/ssh/key", "parentDirectory": {"mode": "0700"}}],
                 "users": {"bird": {"directories": ["Downloads", {"directory": ".ssh", "mode": "0700"}],
                                    "files": [".bash_history"]}}}}}

    def meaning(config):
        return [(e.kind, e.target, e.storage, e.perms, e.method, e.parent_perms, e.home, e.home_owner)
                for e in config.entries]

    assert meaning(load(evaluated)) == meaning(load(plain))


def test_nothing_assigns_to_an_entry_once_it_is_made():
    """Entry is not guarded by a raising __setattr__ (see its docstring):
    its fields are assigned only where an entry is made. Other classes'
    methods setting their own fields of the same names (self.kind) are
    theirs."""
    import ast

    fields = set(ib.Entry._fields)
    found = []

    def visit(node, cls, function):
        for child in ast.iter_child_nodes(node):
            c, f = cls, function
            if isinstance(child, ast.ClassDef):
                c, f = child.name, None
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                f = child.name
            if isinstance(child, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Attribute) and sub.attr in fields:
                            own = isinstance(sub.value, ast.Name) and sub.value.id == "self"
                            if not (own and c not in (None, "Entry")):
                                found.append((c, f, sub.attr))
            elif (isinstance(child, ast.Call) and getattr(child.func, "id", None) == "_set_field"
                  and len(child.args) > 1 and getattr(child.args[1], "value", None) in fields):
                found.append((c, f, child.args[1].value))
            visit(child, c, f)

    visit(ast.parse(SCRIPT.read_text()), None, None)
    # Entry.__init__ and the compiled-config loader set all ten, once each;
    # nothing else sets any.
    assert sorted(found, key=repr) == sorted([("Entry", "__init__", a) for a in ib.Entry._fields]
                                   + [(None, "config_from_payload", a) for a in ib.Entry._fields], key=repr)
