"""Differential tests: nix/module.nix against NixOS impermanence's own
nixos.nix (and home-manager.nix), both evaluated with nixpkgs' real
module system on the same configuration.

For every configuration, each item NixOS impermanence acts on (read from
its evaluated option: nix/tests/impermanence-items.nix) must be an item of
the JSON our module generates, as the script reads it
(impermanence_boot.load_config): the same target, storage, owner, group
and mode — NixOS impermanence's mode being what `mkdir --mode` makes of it
under umask 022, ours the number the script reads — the same file method
and, for a directory, the same x-gvfs-hide / x-gvfs-trash.  A file's
owner, group and mode are those of the parent directory it creates; the
home directory itself is 0700 on both sides.  What differs on purpose is
listed in DIFFERENCES, each with the sentence of docs/nixos.md's migration
section that documents it.

The configurations: NixOS impermanence's own NixOS test node (its
flake.nix, scripted and systemd initrd) and home-manager test node, the
example of its README, the NixOS wiki's example, and a set of option
combinations.  `plan` on an empty root must also be the same for our JSON
as for NixOS impermanence's evaluated option (as `builtins.toJSON` of it,
the attributes of its removed options left out).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT, SCRIPT

import harness

DOCS = PROJECT / "docs" / "nixos.md"
ITEMS_NIX = harness.NIX_TESTS / "impermanence-items.nix"


# --- evaluating both modules ---------------------------------------------------------

def ours(lib, modules: str, **kw) -> dict:
    """Our evaluation (the systemd initrd, nixpkgs' default); the scripted
    stage 1 must give the same JSON and the same failed assertions."""
    select = "{ settings = config.boot.initrd.impermanence.settings; failed = e.failedAssertions; }"
    mine = harness.evaluate(harness.system(f"{harness.MODULE_NIX} {modules}", select, lib=lib, **kw))
    scripted = harness.evaluate(harness.system(
        f"{harness.MODULE_NIX} {modules} {{ boot.initrd.systemd.enable = lib.mkForce false; }}", select, lib=lib, **kw))
    assert scripted == mine
    return mine


STRIP = r'''
let
  dirs = map (d: removeAttrs d [ "method" ]);
  strip = location: removeAttrs location [ "allowOther" "removePrefixDirectory" "defaultDirectoryMethod" ] // {
    directories = dirs location.directories;
    users = lib.mapAttrs (_: u: removeAttrs u [ "home" ] // { directories = dirs u.directories; }) location.users;
  };
  # Each home-manager user's locations, as a location of their own whose
  # users.<name> lists are the home-manager lists.
  homeManager = lib.listToAttrs (lib.concatLists (lib.mapAttrsToList
    (user: hm: lib.mapAttrsToList
      (name: loc: {
        name = "home-manager ${user} ${name}";
        value = {
          inherit (loc) enable persistentStoragePath hideMounts allowTrash;
          users.${user} = { directories = dirs loc.directories; inherit (loc) files; };
        };
      })
      (hm.home.persistence or { }))
    (config.home-manager.users or { })));
in
builtins.toJSON {
  persistence = lib.mapAttrs (_: strip) config.environment.persistence // homeManager;
  users = lib.mapAttrs (_: u: { inherit (u) uid group home; }) config.users.users;
  groups = lib.mapAttrs (_: g: { inherit (g) gid; }) config.users.groups;
}
'''


def theirs(lib, imp, modules: str, own_module: bool = True, **kw) -> dict:
    select = f'''{{
      items = import {ITEMS_NIX} {{ inherit lib config; }};
      failed = e.failedAssertions;
      json = {STRIP};
    }}'''
    module = f"{imp}/nixos.nix " if own_module else ""
    return harness.evaluate(harness.system(f"{module}{modules}", select, lib=lib, **kw))


# --- items as the script reads ours, and as NixOS impermanence acts ------------------------

_mkdir_cache: dict = {}


def mkdir_mode(mode: str, tmp: Path) -> int:
    """The mode `mkdir --mode MODE` gives a directory under umask 022."""
    if mode not in _mkdir_cache:
        path = tmp / f"mkdir-{len(_mkdir_cache)}"
        subprocess.run(["sh", "-c", 'umask 022; mkdir -m "$0" "$1"', mode, str(path)], check=True)
        _mkdir_cache[mode] = os.stat(path).st_mode & 0o7777
        os.rmdir(path)
    return _mkdir_cache[mode]


def engine_items(settings: dict) -> tuple[set, set]:
    """(directories, files) of the JSON, as impermanence_boot reads it."""
    import impermanence_boot as ib
    config = ib.load_config(json.dumps(settings))
    accounts = config.accounts
    def as_path(comps):
        return "/" + "/".join(comps)

    def group_of(user, group):
        if group is not None:
            return group
        account = accounts.get(user)
        return account.group if account else None

    dirs, files = set(), set()
    for e in config.entries:
        target, storage = as_path(e.target), as_path(e.storage)
        if e.kind == "directory":
            options = getattr(e, "options", ()) or ()
            dirs.add((target, storage, e.perms.user, group_of(e.perms.user, e.perms.group), e.perms.mode,
                      "x-gvfs-hide" in options, "x-gvfs-trash" in options))
            continue
        parent = e.target[:-1]
        if e.parent_perms is not None:
            p = e.parent_perms
            perms = (p.user, group_of(p.user, p.group), p.mode)
        elif e.home is not None and parent == e.home[0]:
            perms = (e.home[1], group_of(e.home[1], None), e.home[2])
        elif e.home is not None and parent[:len(e.home[0])] == e.home[0]:
            perms = (e.home[1], group_of(e.home[1], None), 0o755)
        else:
            perms = ("root", "root", 0o755)
        files.add((target, storage, e.method) + perms)
    return dirs, files


def tidy(path: str) -> str:
    """A path as the directory it names ("/persistent/" is "/persistent";
    a parentDirectory's dirPath of a file in the home is "<home>/.")."""
    return os.path.normpath(path)


def impermanence_items(items: dict, tmp: Path) -> tuple[set, set]:
    dirs = {(d["target"], tidy(d["storage"]), d["user"], d["group"], mkdir_mode(d["mode"], tmp),
             d["hideMount"], d["allowTrash"]) for d in items["directories"]}
    files = set()
    for f in items["files"]:
        p = f["parent"]
        if f["home"] is not None and tidy(p["path"]) == f["home"]:
            # Its homeDirs step makes each home 0700 before any parent.
            perms = (p["user"], p["group"], 0o700)
        else:
            perms = (p["user"], p["group"], mkdir_mode(p["mode"], tmp))
        files.add((f["target"], tidy(f["storage"]), f["method"]) + perms)
    return dirs, files


# Differences on purpose, each documented in docs/nixos.md (the phrase).
DIFFERENCES = {
    "users-home": "`users.<name>.home` is an option here",
    "relative-system-path": "A system-level path must be absolute",
}


def test_differences_are_documented():
    text = " ".join(DOCS.read_text().split())
    for key, phrase in DIFFERENCES.items():
        assert phrase in text, f"docs/nixos.md does not document {key}: {phrase!r}"


def compare(lib, imp, tmp_path, modules: str, **kw) -> tuple[dict, dict]:
    """Both evaluations; every item the same (the assertions that fail
    the same too)."""
    mine = ours(lib, modules, **kw)
    their = theirs(lib, imp, modules, **kw)
    our_dirs, our_files = engine_items(mine["settings"])
    imp_dirs, imp_files = impermanence_items(their["items"], tmp_path)
    assert sorted(our_dirs - imp_dirs) == [] and sorted(imp_dirs - our_dirs) == [], (
        f"directories: ours only {sorted(our_dirs - imp_dirs)}; impermanence only {sorted(imp_dirs - our_dirs)}")
    assert sorted(our_files - imp_files) == [] and sorted(imp_files - our_files) == [], (
        f"files: ours only {sorted(our_files - imp_files)}; impermanence only {sorted(imp_files - our_files)}")
    assert bool(mine["failed"]) == bool(their["failed"]), (mine["failed"], their["failed"])
    return mine, their


def plan(settings, root: Path) -> subprocess.CompletedProcess:
    config = root.parent / f"{root.name}.json"
    config.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--config", str(config), "plan"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))


def same_plan(mine: dict, their: dict, tmp_path: Path) -> None:
    """`plan` of our JSON and of NixOS impermanence's evaluated option
    (toJSON) on two identical empty roots with the storage directories."""
    theirs_json = json.loads(their["json"])
    storages = {loc.get("persistentStoragePath", name) for name, loc in mine["settings"]["persistence"].items()}
    outs = []
    for name, settings in (("ours", mine["settings"]), ("theirs", theirs_json)):
        root = tmp_path / f"root-{name}"
        for storage in storages:
            (root / storage.lstrip("/")).mkdir(parents=True, exist_ok=True)
        proc = plan(settings, root)
        assert proc.returncode in (0, 1), f"{name}: {proc.stdout}{proc.stderr}"
        outs.append((proc.returncode, proc.stdout.replace(str(root), "ROOT"),
                     proc.stderr.replace(str(root), "ROOT")))
    assert outs[0] == outs[1]


# --- NixOS impermanence's own tests (its flake.nix) -------------------------------------------

def flake_test_node(imp, test: str, module: str) -> str:
    """The node module of one of the checks in NixOS impermanence's
    flake.nix, with `self.nixosModule` = `module` (a Nix expression)."""
    return f'''(
      let
        flake = import {imp}/flake.nix;
        pkgs = e.pkgs // {{ testers.runNixOSTest = args: args; }};
        nixpkgs = {{ inherit lib; legacyPackages = lib.genAttrs lib.systems.flakeExposed (_: pkgs); }};
        home-manager = {{ nixosModules.home-manager = {harness.NIX_TESTS}/home-manager-options.nix; }};
        outputs = flake.outputs {{ inherit self nixpkgs home-manager; }};
        self = outputs // {{ nixosModule = {module}; }};
      in
      outputs.checks.x86_64-linux.{test}.nodes.persistence
    )'''


def node_both(lib, imp, test: str, extra: str = "") -> tuple[dict, dict]:
    mine = harness.evaluate(harness.system(
        flake_test_node(imp, test, str(harness.MODULE_NIX)) + f" {extra}",
        "{ settings = config.boot.initrd.impermanence.settings; failed = e.failedAssertions; "
        "warnings = config.warnings; systemd = config.boot.initrd.systemd.enable; }",
        lib=lib, vm=True))
    their = harness.evaluate(harness.system(
        flake_test_node(imp, test, f"import {imp}/nixos.nix") + f" {extra}",
        f"{{ items = import {ITEMS_NIX} {{ inherit lib config; }}; failed = e.failedAssertions; json = {STRIP}; "
        "systemd = config.boot.initrd.systemd.enable; }",
        lib=lib, vm=True))
    return mine, their


@pytest.mark.parametrize("initrd", ["systemd", "scripted"])
def test_impermanence_nixos_test_configuration(lib, imp, tmp_path, initrd):
    extra = "" if initrd == "systemd" else "{ boot.initrd.systemd.enable = lib.mkForce false; }"
    mine, their = node_both(lib, imp, "nixos", extra)
    assert mine["systemd"] == their["systemd"] == (initrd == "systemd")
    assert mine["failed"] == [] and their["failed"] == []
    our_dirs, our_files = engine_items(mine["settings"])
    imp_dirs, imp_files = impermanence_items(their["items"], tmp_path)
    assert our_dirs == imp_dirs
    assert our_files == imp_files
    # What the test exercises: bird's and fish's directories, both initrds.
    assert ("/home/bird/owned/by/other/user", "/persistent", "fish", "users", 0o755, False, False) in our_dirs
    assert ("/etc/nixos", "/persistent", "bird", "users", 0o700, False, False) in our_dirs
    assert len(our_dirs) == 13 and len(our_files) == 6
    same_plan(mine, their, tmp_path)


def test_impermanence_home_manager_test_configuration(lib, imp, tmp_path):
    mine, their = node_both(lib, imp, "home-manager")
    assert mine["failed"] == [] and their["failed"] == []
    our_dirs, our_files = engine_items(mine["settings"])
    imp_dirs, imp_files = impermanence_items(their["items"], tmp_path)
    assert our_dirs == imp_dirs
    assert our_files == imp_files
    # The home-manager items are there, under users.bird.
    bird = mine["settings"]["persistence"]["main"]["users"]["bird"]
    assert [d["directory"] for d in bird["directories"]] == [
        "Downloads", "Music", "Pictures", "Documents", "Videos", ".local/share/subdir", "owned/by/other/user"]
    assert bird["files"] == [{"file": ".config/persistence_test", "method": "auto"}]
    assert ("/home/bird/.config/persistence_test", "/persistent", "auto", "bird", "users", 0o755) in our_files
    same_plan(mine, their, tmp_path)


# --- examples: NixOS impermanence's README, the NixOS wiki -------------------------------------

def readme_example(imp) -> str:
    """The NixOS example of NixOS impermanence's README.org ("Usage is
    shown best with an example")."""
    text = (imp / "README.org").read_text()
    after = text.split("Usage is shown best with an example:", 1)[1]
    block = re.search(r"#\+begin_src nix\n(.*?)#\+end_src", after, re.S)
    assert block, "README.org has no example block any more"
    return block.group(1)


def test_impermanence_readme_example(lib, imp, tmp_path):
    example = readme_example(imp)
    assert "environment.persistence" in example and "users.bird" in example
    accounts = '{ users.users.bird = { isNormalUser = true; uid = 1000; }; users.users.colord = { isSystemUser = true; group = "colord"; }; users.groups.colord = { }; }'
    mine, their = compare(lib, imp, tmp_path, f"({example}) {accounts}")
    assert mine["failed"] == [] and their["failed"] == []
    same_plan(mine, their, tmp_path)


# https://wiki.nixos.org/wiki/Impermanence (revision 18795): its
# hardware-configuration and configuration.nix, the module import left out.
WIKI_EXAMPLE = r'''
{
  fileSystems."/" = { device = "none"; fsType = "tmpfs"; options = [ "size=3G" "mode=755" ]; };
  fileSystems."/home/username" = { device = "none"; fsType = "tmpfs"; options = [ "size=4G" "mode=777" ]; };
  fileSystems."/nix" = { device = "/dev/disk/by-uuid/UUID"; fsType = "ext4"; };
  fileSystems."/boot" = { device = "/dev/disk/by-uuid/UUID"; fsType = "vfat"; };
  environment.persistence."/nix/persist/system" = {
    hideMounts = true;
    directories = [
      "/var/log"
      "/var/lib/bluetooth"
      "/var/lib/nixos"
      "/var/lib/systemd/coredump"
      "/etc/NetworkManager/system-connections"
      { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
    ];
    files = [
      "/etc/machine-id"
      { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
    ];
  };
}
'''


def test_nixos_wiki_example(lib, imp, tmp_path):
    mine, their = compare(lib, imp, tmp_path, f"({WIKI_EXAMPLE})")
    assert mine["failed"] == [] and their["failed"] == []
    dirs, files = engine_items(mine["settings"])
    assert ("/var/lib/colord", "/nix/persist/system", "colord", "colord", 0o750, True, False) in dirs
    assert ("/etc/nix/id_rsa", "/nix/persist/system", "auto", "root", "root", 0o700) in files
    same_plan(mine, their, tmp_path)


# --- option combinations -----------------------------------------------------------------------

ACCOUNTS = r'''{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  users.users.fish = { isNormalUser = true; uid = 1001; group = "fish"; };
  users.groups.fish.gid = 1001;
  users.users.svc = { isSystemUser = true; group = "svc"; };
  users.groups.svc = { };
}'''

COMBINATIONS = {
    "symbolic-modes": r'''{
      environment.persistence."/persistent".directories = [
        { directory = "/a"; mode = "u=rwx,g=rx,o="; }
        { directory = "/b"; mode = "go-rwx"; }
        { directory = "/c"; mode = "+t"; }
        { directory = "/d"; mode = "a+rwx"; }
        { directory = "/e"; mode = "u=rwx,g=,o="; }
        { directory = "/f"; mode = "=rwx"; }
        { directory = "/g"; mode = "o-rwx"; }
        { directory = "/h"; mode = "a=rwx,+t"; }
        { directory = "/i"; mode = "750"; }
        { directory = "/j"; mode = "1777"; }
      ];
      environment.persistence."/persistent".users.bird.directories = [ { directory = ".gnupg"; mode = "go-rwx"; } ];
    }''',
    "parent-directory": r'''{
      environment.persistence."/persistent".files = [
        { file = "/etc/nix/id_rsa"; parentDirectory = { mode = "u=rwx,g=,o="; }; }
        { file = "/etc/svc/token"; parentDirectory = { user = "svc"; group = "svc"; mode = "0750"; }; }
        { file = "/etc/other/conf"; parentDirectory.user = "svc"; }
        "/etc/plain/conf"
      ];
      environment.persistence."/persistent".users.bird.files = [
        { file = ".config/app/token"; parentDirectory.mode = "0700"; }
        ".config/app/settings"
        ".bash_history"
      ];
    }''',
    "users-home-from-users-users": r'''{
      users.users.ana = { isNormalUser = true; uid = 1500; home = "/srv/home/ana"; group = "fish"; };
      environment.persistence."/persistent".users.ana = {
        directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } ];
        files = [ ".profile" ];
      };
    }''',
    "disabled-location": r'''{
      environment.persistence."/persistent".directories = [ "/var/log" ];
      environment.persistence."/old" = {
        enable = false;
        directories = [ "/var/log" "/srv" ];
        users.bird.directories = [ "Downloads" ];
      };
    }''',
    "two-locations": r'''{
      environment.persistence."/persistent" = {
        directories = [ "/var/lib/nixos" ];
        users.bird.directories = [ "Documents" ];
      };
      environment.persistence."/scratch" = {
        directories = [ "/var/cache" ];
        users.bird.directories = [ ".cache" ];
        users.fish.files = [ ".history" ];
      };
    }''',
    "allow-trash": r'''{
      environment.persistence."/persistent" = {
        allowTrash = true;
        directories = [ "/srv/a" { directory = "/srv/b"; allowTrash = false; } ];
        users.bird.directories = [ "Downloads" { directory = "Music"; allowTrash = false; } ];
      };
      environment.persistence."/other".directories = [ { directory = "/srv/c"; allowTrash = true; } "/srv/d" ];
    }''',
    "hide-mounts": r'''{
      environment.persistence."/persistent" = {
        hideMounts = true;
        directories = [ "/srv/a" { directory = "/srv/b"; hideMount = false; } ];
        users.bird.directories = [ "Downloads" ];
      };
      environment.persistence."/other".directories = [ { directory = "/srv/c"; hideMount = true; } "/srv/d" ];
    }''',
    "method-symlink": r'''{
      environment.persistence."/persistent" = {
        files = [ { file = "/etc/ssh/ssh_host_ed25519_key.pub"; method = "symlink"; } "/etc/ssh/ssh_host_ed25519_key" ];
        users.bird.files = [ { file = ".config/x"; method = "symlink"; } ];
      };
    }''',
    "item-storage-path": r'''{
      environment.persistence.main = {
        persistentStoragePath = "/nix/persist";
        directories = [ { directory = "/var/cache/big"; persistentStoragePath = "/scratch"; } "/var/lib/x" ];
        users.bird.directories = [ { directory = ".cache"; persistentStoragePath = "/scratch"; } ];
      };
    }''',
    "untidy-paths": r'''{
      environment.persistence."/persistent/" = {
        directories = [ "/var/lib/foo/" "//var//cache/" ];
        files = [ "/etc//machine-id" ];
        users.bird.directories = [ "/Downloads" ".local/share/" ];
        users.bird.files = [ "/.bash_history" ];
      };
    }''',
    "whole-home": r'''{
      environment.persistence."/persistent".users.fish.directories = [ "/" ];
    }''',
    "other-owner-and-groups": r'''{
      environment.persistence."/persistent" = {
        directories = [ { directory = "/var/lib/svc"; user = "svc"; group = "svc"; mode = "0700"; }
                        { directory = "/var/lib/svc2"; user = "svc"; } ];
        users.bird.directories = [ { directory = "owned/by/fish"; user = "fish"; } { directory = "shared"; group = "fish"; } ];
        users.fish.directories = [ "Downloads" ];
      };
    }''',
    "debugging-and-warnings": r'''{
      environment.persistence."/persistent" = {
        enableDebugging = true;
        enableWarnings = false;
        directories = [ "/var/log" ];
      };
    }''',
}


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_option_combination(lib, imp, tmp_path, name):
    mine, their = compare(lib, imp, tmp_path, f"{ACCOUNTS} {COMBINATIONS[name]}")
    assert mine["failed"] == [] and their["failed"] == []
    same_plan(mine, their, tmp_path)


def test_combinations_cover_what_they_claim(lib, imp, tmp_path):
    """The combinations do exercise their options (not trivially equal)."""
    modes = ours(lib, f"{ACCOUNTS} {COMBINATIONS['symbolic-modes']}")
    dirs, _ = engine_items(modes["settings"])
    by_target = {d[0]: d[4] for d in dirs}
    # mkdir --mode semantics: base a=rwx, umask 022 where no class is named.
    assert by_target["/b"] == 0o700 and by_target["/c"] == 0o1755 and by_target["/a"] == 0o750
    assert by_target["/h"] == 0o1777
    assert by_target["/f"] == 0o755 and by_target["/g"] == 0o770 and by_target["/home/bird/.gnupg"] == 0o700
    trash = ours(lib, f"{ACCOUNTS} {COMBINATIONS['allow-trash']}")
    dirs, _ = engine_items(trash["settings"])
    assert {d[0] for d in dirs if d[6]} == {"/srv/a", "/home/bird/Downloads", "/srv/c"}
    hide = ours(lib, f"{ACCOUNTS} {COMBINATIONS['hide-mounts']}")
    dirs, _ = engine_items(hide["settings"])
    assert {d[0] for d in dirs if d[5]} == {"/srv/a", "/home/bird/Downloads", "/srv/c"}
    whole = ours(lib, f"{ACCOUNTS} {COMBINATIONS['whole-home']}")
    dirs, _ = engine_items(whole["settings"])
    assert {d[0] for d in dirs} == {"/home/fish"}


# --- what differs on purpose -----------------------------------------------------------------------

def test_users_home_is_an_option_here_and_removed_there(lib, imp, tmp_path):
    """users.<name>.home: removed from NixOS impermanence (an assertion
    fails when it is set); accepted here when it agrees with
    users.users.<name>.home (DIFFERENCES["users-home"])."""
    config = f'''{ACCOUNTS} {{
      environment.persistence."/persistent".users.bird = {{ home = "/home/bird"; directories = [ "Downloads" ]; }};
    }}'''
    mine = ours(lib, config)
    assert mine["failed"] == []
    their = theirs(lib, imp, config)
    assert any("no longer has any effect" in m for m in their["failed"]), their["failed"]
    # Without it, both the same.
    compare(lib, imp, tmp_path, f'''{ACCOUNTS} {{
      environment.persistence."/persistent".users.bird.directories = [ "Downloads" ];
    }}''')


def test_relative_system_path(lib, imp, tmp_path):
    """A relative system-level path: NixOS impermanence makes it absolute
    (its dirPath); so does the module, the script itself refuses it
    (DIFFERENCES["relative-system-path"])."""
    config = f'{ACCOUNTS} {{ environment.persistence."/persistent".directories = [ "var/lib/rel" ]; }}'
    mine, _ = compare(lib, imp, tmp_path, config)
    assert mine["settings"]["persistence"]["/persistent"]["directories"][0]["directory"] == "/var/lib/rel"
    import impermanence_boot as ib
    with pytest.raises(ib.ConfigError):
        ib.load_config(json.dumps({"persistence": {"/persistent": {"directories": ["var/lib/rel"]}}}))


@pytest.mark.parametrize("configuration", [
    # /home its own filesystem, not needed for boot, holding kept paths.
    '{ fileSystems."/home" = { device = "none"; fsType = "tmpfs"; }; '
    'environment.persistence."/persistent".users.bird.directories = [ "Downloads" ]; }',
    # The storage a filesystem stage 1 does not mount.
    '{ fileSystems."/persistent".device = "/dev/sdb"; '
    'environment.persistence."/persistent".directories = [ "/var/log" ]; }',
    # A path listed twice.
    '{ environment.persistence."/a".directories = [ "/srv" ]; environment.persistence."/b".directories = [ "/srv/" ]; }',
])
def test_both_refuse_the_same_configurations(lib, imp, configuration):
    """What fails NixOS impermanence's assertions fails ours (an assertion
    or an evaluation error naming the path)."""
    their = theirs(lib, imp, f"{ACCOUNTS} {configuration}")
    assert their["failed"], "NixOS impermanence accepts it"
    try:
        mine = ours(lib, f"{ACCOUNTS} {configuration}")
    except harness.NixError as exc:
        assert "is listed more than once" in exc.stderr, exc.stderr
        return
    assert mine["failed"], "ours accepts it"
    assert any("neededForBoot" in m for m in mine["failed"]) == any("neededForBoot" in m for m in their["failed"])


def test_mk_config_reads_impermanences_evaluated_option(lib, imp, tmp_path):
    """nix/config.nix (the flake's lib.mkConfig) of NixOS impermanence's
    evaluated option, whose removed options throw when read: the same JSON
    as our module's, as docs/nixos.md ("The JSON") says."""
    configuration = f"{ACCOUNTS} {COMBINATIONS['parent-directory']} {COMBINATIONS['allow-trash']} {COMBINATIONS['symbolic-modes']}"
    mine = ours(lib, configuration)
    their = harness.evaluate(harness.system(
        f"{imp}/nixos.nix {configuration}",
        f"import {harness.NIX_DIR}/config.nix {{ persistence = config.environment.persistence; "
        "users = config.users.users; groups = config.users.groups; }", lib=lib))
    assert their == mine["settings"]


PARENT_DIRECTORIES = r'''
lib.concatLists (lib.mapAttrsToList (name: location:
  map (f: { location = name; user = null; file = f.file; parent = { inherit (f.parentDirectory) user group mode; }; })
    location.files
  ++ lib.concatLists (lib.mapAttrsToList (user: u:
    map (f: { location = name; inherit user; file = f.file; parent = { inherit (f.parentDirectory) user group mode; }; })
      u.files) location.users))
  config.environment.persistence)
'''


@pytest.mark.parametrize("name", ["parent-directory", "wiki"])
def test_file_parent_directory_option_values_are_impermanences(lib, imp, name):
    """A file's evaluated parentDirectory: the user, group and mode NixOS
    impermanence's option gives, set or not (the level's owner, 0755)."""
    configuration = COMBINATIONS["parent-directory"] if name == "parent-directory" else f"({WIKI_EXAMPLE})"
    modules = f"{ACCOUNTS} {configuration}"
    mine = harness.evaluate(harness.system(f"{harness.MODULE_NIX} {modules}", PARENT_DIRECTORIES, lib=lib))
    their = harness.evaluate(harness.system(f"{imp}/nixos.nix {modules}", PARENT_DIRECTORIES, lib=lib))
    key = lambda f: (f["location"], f["user"] or "", f["file"])  # noqa: E731
    assert sorted(mine, key=key) == sorted(their, key=key)
    assert len(mine) >= 2
