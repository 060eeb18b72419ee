"""Loading the config: JSON, its keys, and the errors that name where in it
a value is wrong. Pure tests, no root needed."""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import SCRIPT, config, error_of, load, run

import impermanence_boot as ib


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
    (config(directories=["/var/./log"]), 'persistence["/persistent"].directories[0]', "'.'"),
    (config(directories=["/"]), 'persistence["/persistent"].directories[0]', "the root itself"),
    (config(directories=["//"]), 'persistence["/persistent"].directories[0]', "the root itself"),
    (config(users={"bird": {"files": ["a/../b"]}}),
     'persistence["/persistent"].users.bird.files[0]', "'..'"),
    (config(directories=["/a\0b"]), 'persistence["/persistent"].directories[0]', "NUL"),
    (config(directories=[{"directory": "/a", "mode": "0999"}]),
     'persistence["/persistent"].directories[0].mode',
     "'0999' is not an octal mode (0000-7777) or a symbolic mode like u=rwx,g=rx,o="),
    (config(directories=[{"directory": "/a", "mode": "0799"}]),
     'persistence["/persistent"].directories[0].mode', "'0799' is not an octal mode (0000-7777)"),
    (config(directories=[{"directory": "/a", "mode": "rwx------"}]),
     'persistence["/persistent"].directories[0].mode',
     "'rwx------' is not an octal mode (0000-7777) or a symbolic mode like u=rwx,g=rx,o="),
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


def test_invalid_json_names_line():
    with pytest.raises(ib.ConfigError) as info:
        ib.load_config('{"persistence": {,}}', "/etc/impermanence.json")
    assert info.value.where == "/etc/impermanence.json"
    assert "line 1 column 18" in info.value.cause


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


def test_records_of_the_config_are_frozen():
    """An entry, once made, is what the config said: nothing can assign to
    its fields (or add any), nor to the config's."""
    config = load({"persistence": {"/persistent": {"directories": ["/var/log"],
                                                   "files": ["/etc/machine-id"]}}})
    entry = config.entries[0]
    for name in (*ib.Entry._fields, "source", "other"):
        with pytest.raises(AttributeError):
            setattr(entry, name, None)
    with pytest.raises(AttributeError):
        config.entries = ()
    assert entry.source == ("persistent",) + entry.target
    assert config == load({"persistence": {"/persistent": {"directories": ["/var/log"],
                                                           "files": ["/etc/machine-id"]}}})


def test_paths_are_read_as_nixos_impermanence_reads_them():
    # Its lib.nix concatPaths: empty components dropped; under users.<u> a
    # leading "/" too, and "/" is the whole home.
    cfg = load(config(directories=["/var//log/", {"directory": "/srv/x//"}],
                      users={"bird": {"directories": ["/", "/Documents/", ".local//share"],
                                      "files": ["/.bashrc"]}}))
    targets = sorted(e.target for e in cfg.entries)
    assert targets == [("home", "bird"), ("home", "bird", ".bashrc"), ("home", "bird", ".local", "share"),
                       ("home", "bird", "Documents"), ("srv", "x"), ("var", "log")]
    home = next(e for e in cfg.entries if e.target == ("home", "bird"))
    assert home.kind == "directory" and home.home == (("home", "bird"), "bird", 0o700)


def test_null_fields_of_the_evaluated_option_are_their_defaults():
    cfg = load(config(directories=[{"directory": "/a", "user": None, "group": None, "mode": None,
                                    "hideMount": None, "allowTrash": None,
                                    "persistentStoragePath": None}],
                      files=[{"file": "/etc/f", "parentDirectory": {"user": None, "group": None,
                                                                    "mode": None}}]))
    d, f = cfg.entries
    assert (d.perms, d.storage, d.options) == (ib.ROOT_PERMS, ("persistent",), ())
    assert f.parent_perms is None


def test_mount_options_come_from_the_location_unless_the_item_says():
    cfg = load(config(hideMounts=True, allowTrash=True, directories=[
        "/a", {"directory": "/b", "hideMount": False}, {"directory": "/c", "allowTrash": False}],
        files=["/f"], users={"bird": {"directories": ["d"]}}))
    options = {e.target: e.options for e in cfg.entries}
    assert options == {("a",): ("x-gvfs-hide", "x-gvfs-trash"), ("b",): ("x-gvfs-trash",),
                       ("c",): ("x-gvfs-hide",), ("f",): (),
                       ("home", "bird", "d"): ("x-gvfs-hide", "x-gvfs-trash")}


DUPLICATE_TWO_BLOCKS = """{
  "persistence": {
    "/persistent": {
      "directories": ["/var/log"]
    },
    "/persistent": {
      "directories": ["/srv"]
    }
  }
}"""

DUPLICATE_LIST = """{"persistence": {"/persistent": {
  "directories": ["/var/log"],
  "files": [],
  "directories": ["/srv"]}}}"""

DUPLICATE_DEEP = """{"persistence": {"/p": {"directories": [
  "/a", {"directory": "/b", "mode": "0700",
  "mode": "0755"}]}}}"""


@pytest.mark.parametrize("text,where,lines", [
    (DUPLICATE_TWO_BLOCKS, 'persistence["/persistent"]', (3, 6)),
    (DUPLICATE_LIST, 'persistence["/persistent"].directories', (2, 4)),
    (DUPLICATE_DEEP, 'persistence["/p"].directories[1].mode', (2, 3)),
    ('{"users": {}, "users": {}}', "users", (1, 1)),
    ('[{"a": 1}, {"b": 1, "b": 2}]', "[1].b", (1, 1)),
])
def test_duplicate_keys_are_a_config_error_naming_both_places(text, where, lines):
    # json.loads keeps the last of two equal keys: the first block (or
    # list) would vanish without a word.
    with pytest.raises(ib.ConfigError) as info:
        ib.load_config(text, "/etc/impermanence.json")
    assert info.value.where == where, str(info.value)
    assert f"line {lines[0]}" in info.value.cause and f"line {lines[1]}" in info.value.cause, str(info.value)
    assert "twice" in info.value.cause and "\n" not in str(info.value)


def test_duplicate_keys_through_the_cli(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(DUPLICATE_TWO_BLOCKS)
    for command in ("check", "plan"):
        result = run("--config", str(path), "--root", str(tmp_path), command)
        assert result.returncode == 2, result
        (line,) = result.stderr.splitlines()
        assert line.startswith(f'impermanence: {path}: persistence["/persistent"]: '), line
        assert "line 3" in line and "line 6" in line, line


def test_equal_keys_in_different_objects_are_not_duplicates():
    cfg = ib.load_config('{"persistence": {"/a": {"directories": ["/x"]}, "/b": {"directories": ["/y"]}}}')
    assert sorted(e.target for e in cfg.entries) == [("x",), ("y",)]


def test_did_you_mean_is_bounded_for_a_huge_key():
    # A 200 KB key: the search for a close known key must not take
    # seconds, and the message must not carry the whole key.
    key = "directorie" + "x" * 200_000
    start = time.monotonic()
    exc = error_of(config(**{key: []}))
    assert time.monotonic() - start < 0.5
    assert len(str(exc)) < 400, len(str(exc))
    assert "unknown key" in exc.cause
    # a near miss still gets its hint
    assert "did you mean 'directories'" in error_of(config(directorys=[])).cause


@pytest.mark.parametrize("home", ["/etc", "/usr", "/var", "/nix/store", "/nix", "/run", "/var/lib",
                                  "/proc", "/sys/fs", "/nix/store/abc-x", "/bin"])
def test_a_home_that_is_a_system_directory_is_refused(home):
    for data, where in [
        (config(users={"bird": {"home": home, "directories": ["Downloads"]}}),
         'persistence["/persistent"].users.bird.home'),
        ({"users": {"bird": {"uid": 1000, "home": home}},
          **config(users={"bird": {"files": [".bashrc"]}})}, "users.bird.home"),
    ]:
        exc = error_of(data)
        assert exc.where == where, str(exc)
        assert "system directory" in exc.cause and "\n" not in str(exc)


def test_an_account_home_that_is_a_system_directory_owns_nothing():
    # An account table lists every account (NixOS: nobody's home is
    # /var/empty, some services' is /run/x): a system directory there is
    # no home, so /etc/ssh is never created as bird's.
    cfg = load({"users": {"bird": {"uid": 1000, "home": "/etc"}, "nobody": {"home": "/var/empty"}},
                **config(directories=["/etc/ssh", "/var/empty/x"])})
    ssh = next(e for e in cfg.entries if e.target == ("etc", "ssh"))
    assert ssh.home is None and ssh.home_owner is None
    # an ordinary home still gives its rules
    empty = next(e for e in cfg.entries if e.target == ("var", "empty", "x"))
    assert empty.home_owner == "nobody"
