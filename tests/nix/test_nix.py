"""NixOS integration: nix/config.nix evaluated with nix-instantiate, the JSON
fed to `impermanence_boot.py check` and to a real `apply` in a private mount
namespace; every nix/ file parse-checked.  nix/module.nix itself is
evaluated with nixpkgs' real module system in tests/nix/test_nix_eval.py.

The option sets are written the way NixOS configurations write
`environment.persistence` and `users.users` (strings and attribute sets,
symbolic modes, disabled locations, normal users without an explicit group
or home); the expected values are NixOS impermanence's documented defaults.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PROJECT, SCRIPT, require
from support import mount_table, mountinfo_points, owner_mode

NIX_DIR = PROJECT / "nix"
CONFIG_NIX = NIX_DIR / "config.nix"


# --- helpers ---------------------------------------------------------------------

def have_nix() -> bool:
    return shutil.which("nix-instantiate") is not None


def nix_env(tmp: Path) -> dict:
    state = tmp / "nix-state"
    state.mkdir(exist_ok=True)
    return dict(os.environ, NIX_STATE_DIR=str(state), NIX_LOG_DIR=str(state / "log"),
                NIX_CONFIG="build-users-group =", HOME=str(tmp))


def nix_run(tmp: Path, args: list[str]) -> subprocess.CompletedProcess:
    require(have_nix(), "nix-instantiate is not installed (Debian package nix-bin)")
    return subprocess.run(["nix-instantiate", "--readonly-mode", *args], capture_output=True,
                          text=True, env=nix_env(tmp), timeout=120, stdin=subprocess.DEVNULL)


def evaluate(tmp: Path, args_nix: str) -> dict:
    """`import nix/config.nix <args_nix>`, evaluated strictly to JSON."""
    expr = tmp / "eval.nix"
    expr.write_text(f"import {CONFIG_NIX} ({args_nix})\n")
    proc = nix_run(tmp, ["--eval", "--strict", "--json", str(expr)])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def evaluation_error(tmp: Path, args_nix: str) -> str:
    expr = tmp / "eval.nix"
    expr.write_text(f"import {CONFIG_NIX} ({args_nix})\n")
    proc = nix_run(tmp, ["--eval", "--strict", "--json", str(expr)])
    assert proc.returncode != 0, f"evaluation should fail, gave {proc.stdout}"
    return proc.stderr


def run_script(*args: str, config: Path) -> subprocess.CompletedProcess:
    require(SCRIPT.exists(), "impermanence_boot.py is not there yet")
    return subprocess.run(["python3", str(SCRIPT), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))


def check(tmp: Path, data: dict) -> subprocess.CompletedProcess:
    path = tmp / "generated.json"
    path.write_text(json.dumps(data))
    return run_script("check", config=path)


def by_path(items: list, key: str) -> dict:
    return {item[key]: item for item in items}


# A configuration written like a real one (the README example of NixOS
# impermanence plus the accounts NixOS would declare).
REAL_WORLD = r'''
{
  users = {
    bird = { isNormalUser = true; uid = 1000; extraGroups = [ "wheel" ]; };
    colord = { isSystemUser = true; group = "colord"; };
    root = { uid = 0; group = "root"; home = "/root"; };
  };
  groups = { colord = { }; users = { gid = 100; }; root = { gid = 0; }; };
  persistence = {
    "/persistent" = {
      hideMounts = true;
      directories = [
        "/var/log"
        "/var/lib/nixos"
        { directory = "/etc/nixos"; user = "bird"; group = "users"; mode = "0700"; }
        { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
      ];
      files = [
        "/etc/machine-id"
        { file = "/etc/ssh/ssh_host_ed25519_key.pub"; method = "symlink"; }
        { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
      ];
      users.bird = {
        directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ".local/share/direnv" ];
        files = [ ".bash_history" ];
      };
    };
    "/old-disk" = {
      enable = false;
      directories = [ "/srv" ];
      users.nobody-here.directories = [ "x" ];
    };
  };
}
'''


# --- nix files are valid Nix -----------------------------------------------------------

@pytest.mark.parametrize("path", sorted(str(p.relative_to(NIX_DIR)) for p in NIX_DIR.rglob("*.nix")))
def test_nix_files_parse(tmp_path, path):
    """`nix-instantiate --parse` also rejects undefined variables."""
    proc = nix_run(tmp_path, ["--parse", str(NIX_DIR / path)])
    assert proc.returncode == 0, proc.stderr


def test_empty_configuration(tmp_path):
    data = evaluate(tmp_path, "{ }")
    assert data == {"deviceTimeout": 30, "fileSystems": {}, "groups": {},
                    "persistence": {}, "users": {}}
    assert check(tmp_path, data).returncode == 0


# --- defaults filled in like NixOS impermanence --------------------------------------

def test_real_world_configuration_gets_impermanence_defaults(tmp_path):
    data = evaluate(tmp_path, REAL_WORLD)
    assert set(data["persistence"]) == {"/persistent"}, "a disabled location must be left out"
    loc = data["persistence"]["/persistent"]
    assert loc["enable"] is True
    assert loc["persistentStoragePath"] == "/persistent"  # defaults to the name
    assert loc["hideMounts"] is True

    dirs = by_path(loc["directories"], "directory")
    assert [d["directory"] for d in loc["directories"]] == [
        "/var/log", "/var/lib/nixos", "/etc/nixos", "/var/lib/colord"], "order is kept"
    assert dirs["/var/log"] == {"directory": "/var/log", "user": "root", "group": "root", "mode": "0755"}
    assert dirs["/etc/nixos"] == {"directory": "/etc/nixos", "user": "bird", "group": "users", "mode": "0700"}
    assert dirs["/var/lib/colord"]["mode"] == "u=rwx,g=rx,o=", "symbolic modes pass through"

    files = by_path(loc["files"], "file")
    assert files["/etc/machine-id"] == {"file": "/etc/machine-id", "method": "auto"}
    assert files["/etc/ssh/ssh_host_ed25519_key.pub"]["method"] == "symlink"
    assert "parentDirectory" not in files["/etc/machine-id"]
    # A partly given parentDirectory is completed with the system defaults.
    assert files["/etc/nix/id_rsa"]["parentDirectory"] == {
        "user": "root", "group": "root", "mode": "u=rwx,g=,o="}

    bird = loc["users"]["bird"]
    assert bird["home"] == "/home/bird", "isNormalUser implies /home/<name>"
    udirs = by_path(bird["directories"], "directory")
    # User level: the user, the user's primary group (users for a normal user), 0755.
    assert udirs["Downloads"] == {"directory": "Downloads", "user": "bird", "group": "users", "mode": "0755"}
    assert udirs[".ssh"]["mode"] == "0700" and udirs[".ssh"]["user"] == "bird"
    assert bird["files"] == [{"file": ".bash_history", "method": "auto"}]
    assert set(loc["users"]) == {"bird"}

    # The account tables: numeric ids where NixOS has them, so names resolve
    # in an initrd without /etc/passwd; no uid key for a dynamic id.
    assert data["users"]["bird"] == {"uid": 1000, "group": "users", "home": "/home/bird"}
    assert data["users"]["colord"] == {"group": "colord"}
    assert data["users"]["root"] == {"uid": 0, "group": "root", "home": "/root"}
    assert data["groups"] == {"colord": {}, "users": {"gid": 100}, "root": {"gid": 0}}

    proc = check(tmp_path, data)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_custom_home_primary_group_and_storage_path(tmp_path):
    data = evaluate(tmp_path, r'''
    {
      users.ana = { uid = 1500; group = "staff"; home = "/srv/home/ana"; isNormalUser = true; };
      users.bo = { uid = 1501; isNormalUser = true; };
      groups.staff.gid = 50;
      persistence."main" = {
        persistentStoragePath = "/nix/persist";
        directories = [
          { directory = "/var/cache/big"; persistentStoragePath = "/scratch"; }
          { directory = "/var/lib/same"; persistentStoragePath = "/nix/persist"; }
        ];
        users.ana.directories = [ "work" { directory = "mail"; group = "mail"; } ];
        users.ana.files = [ { file = ".config/app/token"; parentDirectory.mode = "0700"; } ];
        users.bo = { home = "/home/bo"; files = [ ".profile" ]; };
      };
    }''')
    loc = data["persistence"]["main"]
    assert loc["persistentStoragePath"] == "/nix/persist"
    dirs = by_path(loc["directories"], "directory")
    # An item stored elsewhere keeps its own storage path; the same path as
    # the location's is not repeated.
    assert dirs["/var/cache/big"]["persistentStoragePath"] == "/scratch"
    assert "persistentStoragePath" not in dirs["/var/lib/same"]

    ana = loc["users"]["ana"]
    assert ana["home"] == "/srv/home/ana", "home comes from users.users"
    adirs = by_path(ana["directories"], "directory")
    assert adirs["work"]["group"] == "staff", "default group is the primary group"
    assert adirs["mail"]["group"] == "mail"
    # parentDirectory at user level: filled with the user's defaults.
    assert ana["files"][0]["parentDirectory"] == {"user": "ana", "group": "staff", "mode": "0700"}
    assert loc["users"]["bo"]["home"] == "/home/bo"
    assert data["users"]["ana"] == {"uid": 1500, "group": "staff", "home": "/srv/home/ana"}
    assert check(tmp_path, data).returncode == 0


def test_user_missing_from_users_table_still_gets_a_home(tmp_path):
    """Standalone use: a persistence user with no users.users entry."""
    data = evaluate(tmp_path, r'''
    { persistence."/p".users.guest = { home = "/var/guest"; directories = [ "d" ]; }; }''')
    guest = data["persistence"]["/p"]["users"]["guest"]
    assert guest["home"] == "/var/guest"
    assert guest["directories"][0]["user"] == "guest"
    assert "group" not in guest["directories"][0], "unknown primary group: left to the script"
    assert data["users"]["guest"] == {"home": "/var/guest"}


def test_module_evaluated_form_gives_the_same_json(tmp_path):
    """What the NixOS module system hands over (every option filled in,
    internal options included) must produce the same JSON as the short form."""
    short = r'''
    {
      users.bird = { isNormalUser = true; uid = 1000; };
      persistence."/persistent" = {
        directories = [ "/var/log" { directory = "/etc/nixos"; mode = "0700"; } ];
        files = [ "/etc/machine-id" { file = "/etc/nix/id_rsa"; parentDirectory.mode = "0700"; } ];
        users.bird.directories = [ ".ssh" ];
        users.bird.files = [ ".bash_history" ];
      };
    }'''
    evaluated = r'''
    {
      users.bird = { isNormalUser = true; uid = 1000; group = "users"; home = "/home/bird";
                     isSystemUser = false; extraGroups = [ ]; description = ""; };
      persistence."/persistent" = {
        enable = true; persistentStoragePath = "/persistent"; hideMounts = false;
        enableDebugging = false; enableWarnings = true;
        directories = [
          { directory = "/var/log"; user = "root"; group = "root"; mode = "0755";
            persistentStoragePath = "/persistent"; hideMount = false; home = null;
            dirPath = "/var/log"; enableDebugging = false; _module = { args = { }; }; }
          { directory = "/etc/nixos"; user = "root"; group = "root"; mode = "0700";
            persistentStoragePath = "/persistent"; hideMount = false; home = null;
            dirPath = "/etc/nixos"; enableDebugging = false; }
        ];
        files = [
          { file = "/etc/machine-id"; method = "auto"; persistentStoragePath = "/persistent";
            home = null; filePath = "/etc/machine-id"; enableDebugging = false;
            parentDirectory = { user = null; group = null; mode = null; }; }
          { file = "/etc/nix/id_rsa"; method = "auto"; persistentStoragePath = "/persistent";
            home = null; filePath = "/etc/nix/id_rsa"; enableDebugging = false;
            parentDirectory = { user = null; group = null; mode = "0700"; }; }
        ];
        users.bird = {
          home = "/home/bird";
          _module = { args = { }; };
          directories = [
            { directory = ".ssh"; user = "bird"; group = "users"; mode = "0755";
              persistentStoragePath = "/persistent"; hideMount = false; home = "/home/bird";
              dirPath = "/home/bird/.ssh"; enableDebugging = false; }
          ];
          files = [
            { file = ".bash_history"; method = "auto"; persistentStoragePath = "/persistent";
              home = "/home/bird"; filePath = "/home/bird/.bash_history"; enableDebugging = false;
              parentDirectory = { user = null; group = null; mode = null; }; }
          ];
        };
      };
    }'''
    a = evaluate(tmp_path, short)
    b = evaluate(tmp_path, evaluated)
    assert a == b
    assert a["persistence"]["/persistent"]["files"][1]["parentDirectory"]["mode"] == "0700"
    assert check(tmp_path, a).returncode == 0


def test_file_systems_table_and_device_timeout(tmp_path):
    data = evaluate(tmp_path, r'''
    {
      deviceTimeout = 5;
      fileSystems."/persistent" = { label = "persist"; };
      fileSystems."/data" = { device = "UUID=0a1b2c3d-0000-4000-8000-000000000001"; fsType = "ext4";
                              options = [ "noatime" "nodev" ]; };
      persistence."/persistent".directories = [ "/var/log" ];
      persistence."/data".directories = [ "/srv" ];
    }''')
    assert data["deviceTimeout"] == 5
    assert data["fileSystems"]["/persistent"] == {"device": "LABEL=persist", "fsType": "auto", "options": []}
    assert data["fileSystems"]["/data"] == {
        "device": "UUID=0a1b2c3d-0000-4000-8000-000000000001", "fsType": "ext4",
        "options": ["noatime", "nodev"]}
    proc = check(tmp_path, data)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- mistakes are caught at evaluation time -----------------------------------------

@pytest.mark.parametrize("args_nix, expected", [
    ('{ persistence."/p".direcotries = [ "/a" ]; }', ['environment.persistence."/p".direcotries', "unknown option"]),
    ('{ persistence."/p".directories = [ { directory = "/a"; mdoe = "0700"; } ]; }',
     ['directories.0.mdoe', "unknown option"]),
    ('{ persistence."/p".files = [ { file = "/a"; method = "bindfs"; } ]; }', ["files.0.method", "bindfs"]),
    ('{ persistence."/p".directories = [ { directory = "/a"; method = "symlink"; } ]; }',
     ["directories.0.method", "files only"]),
    ('{ persistence."/p".directories = [ { user = "x"; } ]; }', ["directories.0", "`directory' is missing"]),
    ('{ persistence."/p".directories = [ 42 ]; }', ["directories.0", "expected an attribute set"]),
    ('{ persistence."/p".allowOther = true; }', ["allowOther", "removed"]),
    ('{ persistence."/p".enable = "yes"; }', ['"/p".enable', "true or false"]),
    ('{ users.u = { uid = "1000"; }; }', ['users.users."u".uid', "integer"]),
    ('{ fileSystems."/p".fsType = "ext4"; }', ['fileSystems."/p"', "`device' (or `label') is missing"]),
    ('{ users.bird = { isNormalUser = true; }; persistence."/p".users.bird.home = "/elsewhere"; }',
     ['users."bird".home', "/home/bird", "differs"]),
])
def test_configuration_errors_name_the_option(tmp_path, args_nix, expected):
    message = evaluation_error(tmp_path, args_nix)
    for fragment in expected:
        assert fragment in message, message


def test_same_target_twice_names_both_places(tmp_path):
    message = evaluation_error(tmp_path, r'''
    {
      users.bird = { isNormalUser = true; };
      persistence."/a".directories = [ "/home/bird/.ssh" ];
      persistence."/b".users.bird.directories = [ ".ssh" ];
    }''')
    assert '"/home/bird/.ssh" is listed more than once' in message
    assert 'environment.persistence."/a".directories "/home/bird/.ssh"' in message
    assert 'environment.persistence."/b".users."bird".directories ".ssh"' in message


def test_same_target_in_a_disabled_location_is_fine(tmp_path):
    data = evaluate(tmp_path, r'''
    {
      persistence."/a".directories = [ "/var/log" ];
      persistence."/b" = { enable = false; directories = [ "/var/log" ]; };
    }''')
    assert list(data["persistence"]) == ["/a"]


def test_paths_are_tidied_as_impermanence_does(tmp_path):
    data = evaluate(tmp_path, r'''
    {
      users.bird = { isNormalUser = true; uid = 1000; };
      persistence."/p" = {
        directories = [ "/var/lib/foo/" "//srv//data" "var/rel" ];
        files = [ "/etc//machine-id" ];
        users.bird.directories = [ "/Downloads" ".local/share/" "/" ];
        users.bird.files = [ "/.bash_history" ];
      };
    }''')
    loc = data["persistence"]["/p"]
    assert [d["directory"] for d in loc["directories"]] == ["/var/lib/foo", "/srv/data", "/var/rel"]
    assert [f["file"] for f in loc["files"]] == ["/etc/machine-id"]
    assert [d["directory"] for d in loc["users"]["bird"]["directories"]] == ["Downloads", ".local/share", "/"]
    assert [f["file"] for f in loc["users"]["bird"]["files"]] == [".bash_history"]
    assert check(tmp_path, data).returncode == 0
    # Tidied paths are compared: the same directory twice is caught.
    message = evaluation_error(tmp_path, '{ persistence."/p".directories = [ "/srv" "/srv/" ]; }')
    assert '"/srv" is listed more than once' in message


def test_hide_mount_and_allow_trash(tmp_path):
    data = evaluate(tmp_path, r'''
    {
      persistence."/p" = {
        hideMounts = true;
        directories = [ "/a" { directory = "/b"; hideMount = false; allowTrash = true; } { directory = "/c"; hideMount = true; } ];
      };
    }''')
    loc = data["persistence"]["/p"]
    assert (loc["hideMounts"], loc["allowTrash"]) == (True, False)
    # An item says only what differs from its location.
    assert loc["directories"][0] == {"directory": "/a", "user": "root", "group": "root", "mode": "0755"}
    assert loc["directories"][1]["hideMount"] is False and loc["directories"][1]["allowTrash"] is True
    assert "hideMount" not in loc["directories"][2]
    assert check(tmp_path, data).returncode == 0


def test_impermanences_evaluated_shape(tmp_path):
    """What NixOS impermanence's evaluated option holds: its removed
    options throw when read (they count as not set), its parentDirectory
    always carries defaultPerms (the same as those: not set)."""
    removed = 'throw "removed option read"'
    data = evaluate(tmp_path, r'''
    {
      users.bird = { isNormalUser = true; uid = 1000; group = "users"; home = "/home/bird"; };
      persistence."/p" = {
        enable = true; persistentStoragePath = "/p"; hideMounts = false; allowTrash = false;
        enableDebugging = false; enableWarnings = true; assertions = [ ];
        allowOther = REMOVED; removePrefixDirectory = REMOVED; defaultDirectoryMethod = REMOVED;
        directories = [
          { directory = "/var/log"; dirPath = "/var/log"; user = "root"; group = "root"; mode = "0755";
            defaultPerms = { user = "root"; group = "root"; mode = "0755"; }; hideMount = false;
            allowTrash = false; persistentStoragePath = "/p"; home = null; enableDebugging = false;
            assertions = [ ]; method = REMOVED; }
        ];
        files = [ ];
        users.bird = {
          home = REMOVED; assertions = [ ]; directories = [ ];
          files = [
            { file = ".bash_history"; filePath = "/home/bird/.bash_history"; method = "auto";
              persistentStoragePath = "/p"; home = "/home/bird"; enableDebugging = false; assertions = [ ];
              parentDirectory = { directory = "."; dirPath = "/home/bird/."; user = "bird"; group = "users";
                mode = "0755"; defaultPerms = { user = "bird"; group = "users"; mode = "0755"; };
                hideMount = false; allowTrash = false; persistentStoragePath = "/p"; home = "/home/bird";
                enableDebugging = false; assertions = [ ]; }; }
            { file = ".config/t"; filePath = "/home/bird/.config/t"; method = "auto";
              persistentStoragePath = "/p"; home = "/home/bird"; enableDebugging = false; assertions = [ ];
              parentDirectory = { user = "bird"; group = "users"; mode = "0700";
                defaultPerms = { user = "bird"; group = "users"; mode = "0755"; }; }; }
          ];
        };
      };
    }'''.replace("REMOVED", removed))
    loc = data["persistence"]["/p"]
    assert loc["directories"] == [{"directory": "/var/log", "user": "root", "group": "root", "mode": "0755"}]
    assert loc["users"]["bird"]["home"] == "/home/bird"
    assert loc["users"]["bird"]["files"] == [
        {"file": ".bash_history", "method": "auto"},
        {"file": ".config/t", "method": "auto", "parentDirectory": {"user": "bird", "group": "users", "mode": "0700"}}]
    assert check(tmp_path, data).returncode == 0


# --- the generated JSON, applied for real -------------------------------------------

APPLY_CONFIG = r'''
{
  users = {
    bird = { isNormalUser = true; uid = 4242; group = "birds"; };
    colord = { isSystemUser = true; uid = 4244; group = "colord"; };
  };
  groups = { birds.gid = 4343; colord.gid = 4345; users.gid = 100; };
  persistence = {
    "/persistent" = {
      hideMounts = true;
      directories = [
        "/var/log"
        { directory = "/etc/nixos"; user = "bird"; group = "birds"; mode = "0700"; }
        { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
      ];
      files = [
        "/etc/machine-id"
        { file = "/etc/ssh/ssh_host_ed25519_key.pub"; method = "symlink"; }
        { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
      ];
      users.bird = {
        directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ".local/share/direnv" ];
        files = [ ".bash_history" ];
      };
    };
    "/old" = { enable = false; directories = [ "/srv/old" ]; };
  };
}
'''


def test_generated_config_applies_in_namespace(sandbox, tmp_path):
    data = evaluate(tmp_path, APPLY_CONFIG)
    storage = sandbox.path("/persistent")
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "persist", str(storage)], check=True)
    # Something already kept from an earlier boot.
    (storage / "etc/nix").mkdir(parents=True)
    (storage / "etc/nix/id_rsa").write_text("secret\n")

    proc = sandbox.run("apply", config=data)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    bird, birds, colord, colord_g = 4242, 4343, 4244, 4345
    # Directories created in storage with the item's owner and mode: the ids
    # come from the users/groups tables (they exist nowhere else).
    assert owner_mode(storage / "var/log") == (0, 0, 0o755)
    assert owner_mode(storage / "etc/nixos") == (bird, birds, 0o700)
    assert owner_mode(storage / "var/lib/colord") == (colord, colord_g, 0o750)
    # User level: the home is the user's and 0700, kept dirs the user's,
    # parents inside the home the user's (never root's).
    assert owner_mode(storage / "home/bird") == (bird, birds, 0o700)
    assert owner_mode(storage / "home/bird/Downloads") == (bird, birds, 0o755)
    assert owner_mode(storage / "home/bird/.ssh") == (bird, birds, 0o700)
    assert owner_mode(storage / "home/bird/.local")[:2] == (bird, birds)
    assert owner_mode(sandbox.path("/home/bird/.local"))[:2] == (bird, birds)
    assert owner_mode(sandbox.path("/home/bird"))[:2] == (bird, birds)
    # The fresh root itself is untouched.
    assert owner_mode(sandbox.root) == (0, 0, 0o755)

    points = set(mountinfo_points())
    for target in ["/var/log", "/etc/nixos", "/var/lib/colord", "/home/bird/Downloads",
                   "/home/bird/.ssh", "/home/bird/.local/share/direnv", "/etc/machine-id",
                   "/etc/nix/id_rsa"]:
        assert str(sandbox.path(target)) in points, f"{target} is not mounted"
    # Files: machine-id is created for systemd and bound; a symlink item
    # points at storage as the booted system sees it; an existing kept file
    # is bound; a missing one (auto) is linked so its program creates it in storage.
    assert sandbox.path("/etc/machine-id").read_text() == "uninitialized\n"
    assert os.readlink(sandbox.path("/etc/ssh/ssh_host_ed25519_key.pub")) == \
        "/persistent/etc/ssh/ssh_host_ed25519_key.pub"
    assert sandbox.path("/etc/nix/id_rsa").read_text() == "secret\n"
    assert os.readlink(sandbox.path("/home/bird/.bash_history")) == "/persistent/home/bird/.bash_history"
    # A bind mount really connects the two sides.
    sandbox.path("/var/log/boot.log").write_text("kept\n")
    assert (storage / "var/log/boot.log").read_text() == "kept\n"
    # The disabled location was not touched.
    assert not sandbox.path("/srv").exists()
    assert not sandbox.path("/old").exists()

    # Idempotent: a second run stacks nothing.
    before = sorted(mountinfo_points())
    again = sandbox.run("apply", config=data)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(mountinfo_points()) == before


def test_generated_parent_directory_mode_applies(sandbox, tmp_path):
    data = evaluate(tmp_path, r'''
    {
      persistence."/persistent".files = [
        { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
        "/etc/other/config"
      ];
    }''')
    storage = sandbox.path("/persistent")
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "persist", str(storage)], check=True)
    proc = sandbox.run("apply", config=data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert owner_mode(storage / "etc/nix") == (0, 0, 0o700)
    assert owner_mode(storage / "etc/other") == (0, 0, 0o755)
    # Missing targets' parents mirror storage.
    assert owner_mode(sandbox.path("/etc/nix")) == (0, 0, 0o700)


def test_generated_file_systems_entry_mounts_by_label(sandbox, loop_disk, tmp_path):
    """The `fileSystems` table (boot.initrd.impermanence.fileSystems) with a
    label: the script finds the ext4 filesystem and mounts it under the root."""
    disk = loop_disk("nixpersist")
    data = evaluate(tmp_path, r'''
    {
      deviceTimeout = 5;
      fileSystems."/persistent" = { label = "nixpersist"; fsType = "ext4"; options = [ "noatime" ]; };
      persistence."/persistent".directories = [ "/var/lib/nixos" ];
    }''')
    proc = sandbox.run("apply", config=data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    storage = sandbox.path("/persistent")
    mounted = [m for m in mount_table() if m.point == str(storage)]
    assert mounted, "the persistent filesystem is not mounted"
    assert mounted[-1].fstype == "ext4"
    assert "noatime" in mounted[-1].options.split(",")
    assert str(sandbox.path("/var/lib/nixos")) in mountinfo_points()
    assert (storage / "var/lib/nixos").is_dir()
    assert disk.device  # the loop device stays attached until teardown
