"""nix/home-manager.nix: `home.persistence` of home-manager users, injected
by nix/module.nix through home-manager.sharedModules and merged into the
JSON under persistence.<name>.users.<user>.

home-manager itself is not here: nix/tests/home-manager-options.nix
declares `home-manager.users` (a submodule of the homeManager class made
of a few base options and every sharedModules entry, the user's name and
home from users.users) and `home-manager.sharedModules`, as home-manager's
NixOS module does, and carries each user's warnings and assertions to the
system's.  Evaluated with nixpkgs' real module system.
"""
from __future__ import annotations

import json
import sys

import pytest

from conftest import PROJECT

import harness

ACCOUNTS = r'''{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  users.users.fish = { isNormalUser = true; uid = 1001; group = "fish"; };
  users.groups.fish.gid = 1001;
}'''

SELECT = r'''{
  settings = config.boot.initrd.impermanence.settings;
  failed = e.failedAssertions;
  warnings = config.warnings;
  sharedModules = builtins.length (config.home-manager.sharedModules or [ ]);
  activation = config.system.activationScripts ? impermanence-boot;
}'''


def evaluate(lib, configuration: str, home_manager: bool = True, select: str = SELECT):
    return harness.evaluate(harness.system(f"{harness.MODULE_NIX} {ACCOUNTS} ({configuration})", select,
                                           lib=lib, home_manager=home_manager))


def test_injected_only_when_home_manager_is_imported(lib):
    without = evaluate(lib, '{ environment.persistence."/p".directories = [ "/var/log" ]; }', home_manager=False,
                       select="{ hm = config ? home-manager; failed = e.failedAssertions; }")
    assert without == {"hm": False, "failed": []}
    with_hm = evaluate(lib, "{ }")
    assert with_hm["sharedModules"] == 2  # the module, and the flag that it came from here
    # Nothing persisted anywhere: nothing set up.
    assert with_hm["settings"]["persistence"] == {} and not with_hm["activation"]


def test_home_persistence_is_merged_under_users(lib):
    out = evaluate(lib, r'''{
      environment.persistence."/persistent" = {
        directories = [ "/var/log" ];
        users.bird.directories = [ "Documents" ];
      };
      home-manager.users.bird.home.persistence."/persistent" = {
        directories = [ "Downloads" { directory = ".ssh"; mode = "0700"; } { directory = "given/to/fish"; user = "fish"; } ];
        files = [ ".bash_history" { file = ".config/app/token"; parentDirectory.mode = "0700"; } ];
      };
      home-manager.users.fish.home.persistence."/data" = {
        hideMounts = true;
        directories = [ "Music" ];
        files = [ { file = ".x"; method = "symlink"; } ];
      };
    }''')
    assert out["failed"] == [] and out["warnings"] == []
    assert out["activation"]
    persistence = out["settings"]["persistence"]
    bird = persistence["/persistent"]["users"]["bird"]
    assert bird["home"] == "/home/bird"
    # The system's own list first, then home-manager's.
    assert bird["directories"] == [
        {"directory": "Documents", "user": "bird", "group": "users", "mode": "0755"},
        {"directory": "Downloads", "user": "bird", "group": "users", "mode": "0755"},
        {"directory": ".ssh", "user": "bird", "group": "users", "mode": "0700"},
        # home-manager knows no groups: the item's user's primary group, as
        # NixOS impermanence fills it in.
        {"directory": "given/to/fish", "user": "fish", "group": "fish", "mode": "0755"}]
    assert bird["files"] == [
        {"file": ".bash_history", "method": "auto"},
        {"file": ".config/app/token", "method": "auto",
         "parentDirectory": {"user": "bird", "group": "users", "mode": "0700"}}]
    assert persistence["/persistent"]["directories"][0]["directory"] == "/var/log"
    # A location only home-manager uses becomes a location of its own.
    data = persistence["/data"]
    assert data["persistentStoragePath"] == "/data"
    assert data["hideMounts"] is True
    assert data["users"]["fish"]["directories"] == [
        {"directory": "Music", "user": "fish", "group": "fish", "mode": "0755"}]
    assert data["users"]["fish"]["files"] == [{"file": ".x", "method": "symlink"}]


def test_hide_mount_and_allow_trash_of_home_manager_items(lib):
    out = evaluate(lib, r'''{
      environment.persistence."/persistent".directories = [ "/var/log" ];
      home-manager.users.bird.home.persistence."/persistent" = {
        hideMounts = true;
        allowTrash = true;
        directories = [ "a" { directory = "b"; hideMount = false; } { directory = "c"; allowTrash = false; } ];
      };
    }''')
    dirs = out["settings"]["persistence"]["/persistent"]["users"]["bird"]["directories"]
    # Merged into a location whose own flags are off: each item says its own.
    assert [(d["directory"], d.get("hideMount", False), d.get("allowTrash", False)) for d in dirs] == [
        ("a", True, True), ("b", False, True), ("c", True, False)]


def test_storage_path_of_a_home_manager_location_of_another_name(lib):
    out = evaluate(lib, r'''{
      environment.persistence.main = { persistentStoragePath = "/persistent"; directories = [ "/var/log" ]; };
      home-manager.users.bird.home.persistence.main = { persistentStoragePath = "/persistent/hm"; directories = [ "Downloads" ]; };
      home-manager.users.fish.home.persistence."/off" = { enable = false; directories = [ "Music" ]; };
    }''')
    main = out["settings"]["persistence"]["main"]
    assert main["users"]["bird"]["directories"] == [
        {"directory": "Downloads", "user": "bird", "group": "users", "mode": "0755",
         "persistentStoragePath": "/persistent/hm"}]
    assert "/off" not in out["settings"]["persistence"], "a disabled location is left out"


def test_a_home_manager_path_listed_twice(lib):
    with pytest.raises(harness.NixError) as info:
        evaluate(lib, r'''{
          environment.persistence."/persistent".users.bird.directories = [ "Downloads" ];
          home-manager.users.bird.home.persistence."/persistent".directories = [ "/Downloads/" ];
        }''')
    assert '"/home/bird/Downloads" is listed more than once' in info.value.stderr


def test_boot_hazard_counts_home_manager_items(lib):
    out = evaluate(lib, r'''{
      fileSystems."/home" = { device = "none"; fsType = "tmpfs"; };
      home-manager.users.bird.home.persistence."/persistent".directories = [ "Downloads" ];
    }''')
    assert len(out["failed"]) == 1 and 'ephemeral storage must have the option "neededForBoot"' in out["failed"][0]


def test_removed_options_warn(lib):
    out = evaluate(lib, r'''{
      home-manager.users.bird.home.persistence."/persistent" = {
        defaultDirectoryMethod = "symlink";
        allowOther = true;
        removePrefixDirectory = false;
        directories = [ "Downloads" ];
      };
    }''')
    assert out["failed"] == []
    assert sorted(out["warnings"]) == sorted([
        'bird profile: home.persistence."/persistent".allowOther has no effect (removed from NixOS impermanence: '
        "real bind mounts are used, `allowOther' is not needed).",
        'bird profile: home.persistence."/persistent".defaultDirectoryMethod has no effect (removed from NixOS '
        "impermanence: directories are always bind mounted).",
        'bird profile: home.persistence."/persistent".removePrefixDirectory has no effect (removed from NixOS '
        "impermanence: prefix directories are not supported)."])
    assert out["settings"]["persistence"]["/persistent"]["users"]["bird"]["directories"][0]["directory"] == "Downloads"


def test_storage_path_with_the_home_in_it_is_refused(lib):
    """impermanence's home-manager module v1 took the home in the storage
    path; v2 (and this module) add it themselves."""
    out = evaluate(lib, r'''{
      home-manager.users.bird.home.persistence."/persistent/home/bird".directories = [ "Downloads" ];
    }''')
    assert len(out["failed"]) == 1
    assert out["failed"][0].startswith("bird profile: home.persistence: persistentStoragePath contains the home directory")


def test_imported_by_hand_is_refused(lib):
    """nix/home-manager.nix in a home-manager configuration without the
    NixOS module: nothing would apply it."""
    out = harness.evaluate(harness.system(
        f'{ACCOUNTS} {{ home-manager.users.bird = {{ imports = [ {harness.NIX_DIR}/home-manager.nix ]; '
        'home.persistence."/persistent".directories = [ "Downloads" ]; }; }',
        "e.failedAssertions", lib=lib, home_manager=True))
    assert len(out) == 1 and "imported by hand" in out[0]


def test_home_manager_json_is_checked(lib, tmp_path):
    import subprocess
    out = evaluate(lib, r'''{
      home-manager.users.bird.home.persistence."/persistent" = {
        directories = [ "Downloads" { directory = ".gnupg"; mode = "go-rwx"; } "/" ];
        files = [ ".bash_history" ];
      };
    }''', select="config.boot.initrd.impermanence.settings")
    path = tmp_path / "hm.json"
    path.write_text(json.dumps(out))
    proc = subprocess.run([sys.executable, str(PROJECT / "impermanence_boot.py"), "--config", str(path), "check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
