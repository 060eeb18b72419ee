"""nix/module.nix evaluated with nixpkgs' real module system.

`lib.evalModules` (nixpkgs lib from $NIXPKGS_LIB, <nixpkgs/lib> or the
shared tarball: nix/tests/harness.py) runs on nix/tests/nixos-options.nix
(the NixOS options the module reads or sets, declared with real
lib.types), the module and a configuration; the tests read the evaluated
config: option declarations and defaults, the initrd wiring, assertions,
warnings, activation scripts, and the JSON the initrd reads, which is fed
to `impermanence_boot.py check` and, for the scripted initrd's commands,
to a real `apply` in a private mount namespace.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import PROJECT, SCRIPT, require
from support import distro_python, mountinfo_points

import harness

MODULE = harness.MODULE_NIX
# The one stdlib-module finder, which the module's initrd interpreter is built with.
FINDER = PROJECT / "dist" / "lib" / "initramfs_files.py"


# What the tests read from an evaluation (derivations as their store paths).
REPORT = r'''
{
  failed = e.failedAssertions;
  warnings = config.warnings;
  settings = config.boot.initrd.impermanence.settings;
  configFile = "${config.boot.initrd.impermanence.configFile}";
  configText = config.boot.initrd.impermanence.configFile.text or null;
  checkStep = let f = config.boot.initrd.impermanence.configFile; in if f ? text then null else f.buildCommand;
  unchecked = "${e.pkgs.writeText "impermanence-unchecked.json" (builtins.toJSON config.boot.initrd.impermanence.settings)}";
  initrd = {
    inherit (config.boot.initrd) postMountCommands supportedFilesystems;
    extraFiles = lib.mapAttrs (_: f: "${f.source}") config.boot.initrd.extraFiles;
    systemd = {
      inherit (config.boot.initrd.systemd) services suppressedUnits;
      storePaths = map (p: "${p.source}") config.boot.initrd.systemd.storePaths;
      contents = lib.mapAttrs (_: c: "${c.source}") config.boot.initrd.systemd.contents;
    };
  };
  etc = lib.mapAttrs (_: f: "${f.source}") config.environment.etc;
  services = config.systemd.services;
  activation = e.activation;
  activationScripts = lib.mapAttrs (_: s: if lib.isString s then { deps = [ ]; text = s; supportsDryActivation = false; }
    else { inherit (s) deps text supportsDryActivation; })
    (removeAttrs config.system.activationScripts [ "script" ]);
  # The whole activation script (the option's `apply`).
  activationScript = config.system.activationScripts.script;
  systemPackages = map toString config.environment.systemPackages;
  initrdPython = {
    path = "${config.boot.initrd.impermanence.initrdPython}";
    inherit (config.boot.initrd.impermanence.initrdPython) buildCommand;
    disallowedReferences = map toString config.boot.initrd.impermanence.initrdPython.disallowedReferences;
    nativeBuildInputs = map toString config.boot.initrd.impermanence.initrdPython.nativeBuildInputs;
  };
  python = "${config.boot.initrd.impermanence.python}";
  findModules = "${FIND_MODULES}";
  initrdPythonHelper = "${INITRD_PYTHON}";
}
'''.replace("FIND_MODULES", str(FINDER)).replace(
    "INITRD_PYTHON", str(harness.NIX_DIR / "initrd-python.py"))


# The scripted stage 1 (deprecated, off by default since nixpkgs 26.05)
# and the systemd initrd, explicitly.
SCRIPTED = "{ boot.initrd.systemd.enable = false; }"
SYSTEMD = "{ boot.initrd.systemd.enable = true; }"


def evaluate(lib, configuration: str, select: str = REPORT, *more: str, **kw):
    """The module and configuration (plus the modules in `more`), evaluated."""
    modules = " ".join(f"({m})" for m in (configuration, *more))
    return harness.evaluate(harness.system(f"{MODULE} {modules}", select, lib=lib, **kw))


def evaluation_error(lib, configuration: str, select: str = REPORT, **kw) -> str:
    with pytest.raises(harness.NixError) as info:
        evaluate(lib, configuration, select, **kw)
    return info.value.stderr


def check(tmp_path, data) -> subprocess.CompletedProcess:
    path = tmp_path / "generated.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "check"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))


BASIC = r'''
{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  environment.persistence."/persistent" = {
    directories = [ "/var/log" ];
    files = [ "/etc/machine-id" ];
    users.bird.directories = [ { directory = ".ssh"; mode = "0700"; } ];
  };
  environment.persistence."/off" = { enable = false; directories = [ "/srv" ]; };
}
'''


# --- declarations ------------------------------------------------------------------------

OPTION_NAMES = r'''
let
  visible = set: lib.sort (a: b: a < b) (lib.attrNames (lib.filterAttrs
    (_: o: lib.isOption o && !(o.internal or false) && (o.visible or true) == true) set));
  sub = opt: opt.type.getSubOptions [ ];
  location = sub e.options.environment.persistence;
  user = sub location.users;
  directory = sub location.directories;
  file = sub location.files;
in {
  location = visible location;
  user = visible user;
  directory = visible directory;
  userDirectory = visible (sub user.directories);
  file = visible file;
  parentDirectory = lib.sort (a: b: a < b) (lib.attrNames (lib.filterAttrs (_: lib.isOption) file.parentDirectory));
  top = lib.attrNames e.options.boot.initrd.impermanence;
}
'''


def test_module_declares_the_impermanence_option_names(lib):
    names = evaluate(lib, "{ }", OPTION_NAMES)
    assert names["location"] == ["allowTrash", "directories", "enable", "enableWarnings", "files",
                                 "hideMounts", "persistentStoragePath", "users"]
    assert names["user"] == ["directories", "files", "home"]
    for level in ("directory", "userDirectory"):
        assert names[level] == ["allowTrash", "directory", "group", "hideMount", "mode",
                                "persistentStoragePath", "user"]
    assert names["file"] == ["file", "method", "persistentStoragePath"]
    assert names["parentDirectory"] == ["group", "mode", "user"]
    assert {"fileSystems", "deviceTimeout", "verbose", "emergencyOnError", "checkConfig", "python",
            "package", "configFile", "settings", "applyOnActivation"} <= set(names["top"])


OPTION_DEFAULTS = r'''
let
  location = config.environment.persistence."/persistent";
  pick = names: set: lib.getAttrs names set;
  d = builtins.head location.directories;
  f = builtins.head location.files;
  u = builtins.head location.users.bird.directories;
in {
  location = pick [ "enable" "persistentStoragePath" "hideMounts" "allowTrash" "enableWarnings" "enableDebugging" ] location;
  directory = pick [ "user" "group" "mode" "persistentStoragePath" "hideMount" "allowTrash" "dirPath" "home" ] d;
  file = pick [ "method" "persistentStoragePath" "filePath" "parentDirectory" ] f;
  userDirectory = pick [ "user" "group" "mode" "dirPath" "home" ] u;
  userHome = location.users.bird.home;
}
'''


def test_module_option_defaults_match_impermanence(lib):
    got = evaluate(lib, BASIC, OPTION_DEFAULTS)
    assert got["location"] == {"enable": True, "persistentStoragePath": "/persistent", "hideMounts": False,
                               "allowTrash": False, "enableWarnings": True, "enableDebugging": False}
    assert got["directory"] == {"user": "root", "group": "root", "mode": "0755",
                                "persistentStoragePath": "/persistent", "hideMount": False,
                                "allowTrash": False, "dirPath": "/var/log", "home": None}
    assert got["file"] == {"method": "auto", "persistentStoragePath": "/persistent",
                           "filePath": "/etc/machine-id",
                           "parentDirectory": {"user": "root", "group": "root", "mode": "0755"}}
    # users.<name> level: the user and the primary group from users.users.
    assert got["userDirectory"] == {"user": "bird", "group": "users", "mode": "0700",
                                    "dirPath": "/home/bird/.ssh", "home": "/home/bird"}
    assert got["userHome"] == "/home/bird"


def test_hide_mounts_and_allow_trash_are_the_items_defaults(lib):
    got = evaluate(lib, r'''{
      environment.persistence."/persistent" = {
        hideMounts = true; allowTrash = true;
        directories = [ "/a" { directory = "/b"; hideMount = false; } { directory = "/c"; allowTrash = false; } ];
        users.root.directories = [ "d" ];
      };
      environment.persistence."/other".directories = [ "/e" { directory = "/f"; hideMount = true; allowTrash = true; } ];
    }''', r'''{
      items = map (d: { inherit (d) dirPath hideMount allowTrash; })
        (config.environment.persistence."/persistent".directories
         ++ config.environment.persistence."/persistent".users.root.directories
         ++ config.environment.persistence."/other".directories);
      json = config.boot.initrd.impermanence.settings.persistence;
    }''')
    assert got["items"] == [
        {"dirPath": "/a", "hideMount": True, "allowTrash": True},
        {"dirPath": "/b", "hideMount": False, "allowTrash": True},
        {"dirPath": "/c", "hideMount": True, "allowTrash": False},
        {"dirPath": "/root/d", "hideMount": True, "allowTrash": True},
        {"dirPath": "/e", "hideMount": False, "allowTrash": False},
        {"dirPath": "/f", "hideMount": True, "allowTrash": True}]
    # The JSON: the location's flags, and an item's only where it differs.
    persistent = got["json"]["/persistent"]
    assert (persistent["hideMounts"], persistent["allowTrash"]) == (True, True)
    assert [{k: v for k, v in d.items() if k in ("directory", "hideMount", "allowTrash")}
            for d in persistent["directories"]] == [
        {"directory": "/a"}, {"directory": "/b", "hideMount": False}, {"directory": "/c", "allowTrash": False}]
    other = got["json"]["/other"]
    assert (other["hideMounts"], other["allowTrash"]) == (False, False)
    assert other["directories"][1]["hideMount"] is True and other["directories"][1]["allowTrash"] is True


def test_unknown_and_removed_options_are_evaluation_errors(lib):
    message = evaluation_error(lib, '{ environment.persistence."/p".direcotries = [ "/a" ]; }')
    assert "direcotries" in message and "does not exist" in message
    message = evaluation_error(lib, '{ environment.persistence."/p".directories = [ { directory = "/a"; mdoe = "0700"; } ]; }')
    assert "mdoe" in message and "does not exist" in message
    # As in NixOS impermanence v2, where they are removed options.
    for removed in ("allowOther = true", "removePrefixDirectory = true", 'defaultDirectoryMethod = "symlink"'):
        message = evaluation_error(lib, f'{{ environment.persistence."/p".{removed}; }}')
        assert "does not exist" in message, message
    message = evaluation_error(lib, '{ environment.persistence."/p".directories = [ { directory = "/a"; method = "symlink"; } ]; }')
    assert "method" in message and "does not exist" in message
    message = evaluation_error(lib, '{ environment.persistence."/p".files = [ { file = "/a"; method = "bindfs"; } ]; }')
    assert "bindfs" in message


def test_a_path_listed_twice_is_an_evaluation_error(lib):
    message = evaluation_error(lib, r'''{
      users.users.bird.isNormalUser = true;
      environment.persistence."/a".directories = [ "/home/bird/.ssh/" ];
      environment.persistence."/b".users.bird.directories = [ "/.ssh" ];
    }''')
    assert '"/home/bird/.ssh" is listed more than once' in message


# --- paths, as NixOS impermanence's lib.nix tidies them -------------------------------

def test_paths_are_normalised_as_impermanence_does(lib, tmp_path):
    got = evaluate(lib, r'''{
      users.users.bird = { isNormalUser = true; uid = 1000; };
      environment.persistence."/persistent/" = {
        directories = [ "/var/lib/foo/" "//var//cache/" "var/tmp" ];
        files = [ "/etc//machine-id" ];
        users.bird = {
          directories = [ "/Downloads" ".local/share/" "/" ];
          files = [ "/.bash_history" ];
        };
      };
    }''', r'''{
      dirPaths = map (d: d.dirPath) (config.environment.persistence."/persistent/".directories
        ++ config.environment.persistence."/persistent/".users.bird.directories);
      filePaths = map (f: f.filePath) (config.environment.persistence."/persistent/".files
        ++ config.environment.persistence."/persistent/".users.bird.files);
      json = config.boot.initrd.impermanence.settings;
    }''')
    assert got["dirPaths"] == ["/var/lib/foo", "/var/cache", "/var/tmp",
                               "/home/bird/Downloads", "/home/bird/.local/share", "/home/bird"]
    assert got["filePaths"] == ["/etc/machine-id", "/home/bird/.bash_history"]
    loc = got["json"]["persistence"]["/persistent/"]
    assert [d["directory"] for d in loc["directories"]] == ["/var/lib/foo", "/var/cache", "/var/tmp"]
    assert [f["file"] for f in loc["files"]] == ["/etc/machine-id"]
    bird = loc["users"]["bird"]
    # User level: relative to the home; "/" is the whole home.
    assert [d["directory"] for d in bird["directories"]] == ["Downloads", ".local/share", "/"]
    assert [f["file"] for f in bird["files"]] == [".bash_history"]
    # Depends on the engine: a user-level "/" (the whole home) is accepted.
    proc = check(tmp_path, got["json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dot_components_and_a_system_level_root_fail_the_check(lib, tmp_path):
    for directories in ('[ "/var/../etc" ]', '[ "/" ]', '[ "/var/./log" ]'):
        got = evaluate(lib, f'{{ environment.persistence."/p".directories = {directories}; }}',
                       "config.boot.initrd.impermanence.settings")
        proc = check(tmp_path, got)
        assert proc.returncode == 2, (directories, proc.stdout + proc.stderr)


# --- the JSON and the build-time check ---------------------------------------------------

def test_generated_json_is_config_nix_of_the_evaluated_option(lib, tmp_path):
    got = evaluate(lib, BASIC, r'''{
      settings = config.boot.initrd.impermanence.settings;
      direct = import ''' + str(harness.NIX_DIR / "config.nix") + r''' {
        persistence = config.environment.persistence;
        users = config.users.users;
        groups = config.users.groups;
      };
    }''')
    assert got["settings"] == got["direct"]
    data = got["settings"]
    assert list(data["persistence"]) == ["/persistent"], "a disabled location is left out"
    loc = data["persistence"]["/persistent"]
    assert loc["directories"] == [{"directory": "/var/log", "user": "root", "group": "root", "mode": "0755"}]
    assert loc["files"] == [{"file": "/etc/machine-id", "method": "auto"}]
    assert loc["users"]["bird"]["directories"] == [
        {"directory": ".ssh", "user": "bird", "group": "users", "mode": "0700"}]
    # The account tables, so that names resolve in the initrd.
    assert data["users"]["bird"] == {"uid": 1000, "group": "users", "home": "/home/bird"}
    assert data["users"]["root"] == {"uid": 0, "group": "root", "home": "/root"}
    assert data["groups"]["users"] == {"gid": 100}
    proc = check(tmp_path, data)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_to_json_of_the_evaluated_option(lib, tmp_path):
    """`builtins.toJSON { persistence = config.environment.persistence; }`
    (the option wrapped as the config's `persistence` table): nothing in
    it throws, and the script accepts it."""
    got = evaluate(lib, BASIC, r'''builtins.toJSON {
      persistence = config.environment.persistence;
      users = lib.mapAttrs (_: u: { inherit (u) uid group home; }) config.users.users;
    }''', '{ environment.persistence."/persistent".files = [ { file = "/etc/nix/id_rsa"; parentDirectory.mode = "0700"; } ]; }')
    data = json.loads(got)
    files = {f["file"]: f for f in data["persistence"]["/persistent"]["files"]}
    assert files["/etc/machine-id"]["parentDirectory"] == {"user": "root", "group": "root", "mode": "0755"}
    assert files["/etc/nix/id_rsa"]["parentDirectory"] == {"user": "root", "group": "root", "mode": "0700"}
    proc = check(tmp_path, got)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_module_checks_the_config_at_build_time(lib):
    out = evaluate(lib, BASIC, REPORT, SCRIPTED)
    # The build step runs `check` on the generated JSON and copies it unchanged.
    step = out["checkStep"]
    assert f" -I -B " in step and f"--config {out['unchecked']} check\n" in step, step
    assert f"cp {out['unchecked']} $out" in step
    assert out["configFile"].endswith("-impermanence.json")
    # The initrd reads the checked JSON itself, the file /etc/impermanence.json holds.
    assert out["etc"]["impermanence.json"] == out["configFile"]
    assert out["initrd"]["extraFiles"]["/etc/impermanence.json"] == out["configFile"]
    assert f"--config {out['configFile']} apply" in out["initrd"]["postMountCommands"]
    systemd = evaluate(lib, BASIC)
    assert systemd["initrd"]["systemd"]["contents"]["/etc/impermanence.json"] == systemd["configFile"]
    assert f"--config {systemd['configFile']} apply" in (
        systemd["initrd"]["systemd"]["services"]["impermanence-boot"]["serviceConfig"]["ExecStart"])
    # Without checkConfig: the JSON as generated, no build step.
    plain = evaluate(lib, BASIC, REPORT, "{ boot.initrd.impermanence.checkConfig = false; }")
    assert plain["checkStep"] is None
    assert json.loads(plain["configText"]) == plain["settings"]
    assert plain["configFile"] == plain["unchecked"]


@pytest.mark.parametrize("initrd", [SYSTEMD, SCRIPTED], ids=["systemd", "scripted"])
def test_nothing_is_set_without_an_enabled_location(lib, initrd):
    out = evaluate(lib, '{ environment.persistence."/off" = { enable = false; directories = [ "/srv" ]; }; }',
                   REPORT, initrd)
    assert out["initrd"]["postMountCommands"] == ""
    assert out["initrd"]["extraFiles"] == {}
    assert out["initrd"]["systemd"]["services"] == {} and out["initrd"]["systemd"]["storePaths"] == []
    assert "impermanence.json" not in out["etc"]
    assert "impermanence-boot" not in out["activationScripts"]
    assert out["failed"] == [] and out["warnings"] == []


# --- the initrd -----------------------------------------------------------------------------

def test_module_scripted_initrd_runs_apply_from_post_mount_commands(lib, tmp_path):
    out = evaluate(lib, BASIC, REPORT, SCRIPTED)
    initrd = out["initrd"]
    commands = initrd["postMountCommands"]
    assert "--root /mnt-root" in commands
    assert f"--config {out['configFile']}" in commands
    assert " apply " in commands
    assert initrd["systemd"]["services"] == {}
    # What runs is the script byte-compiled at build time, put into the initrd.
    compiled = initrd["extraFiles"]["/etc/impermanence-boot/impermanence_boot.pyc"]
    assert f" -I -S -B {compiled} --root" in commands
    assert initrd["extraFiles"]["/etc/impermanence.json"] == out["configFile"]
    assert out["failed"] == []
    assert check(tmp_path, out["settings"]).returncode == 0


def test_module_systemd_initrd_service(lib):
    out = evaluate(lib, BASIC)  # the default since nixpkgs 26.05
    initrd = out["initrd"]
    assert initrd["postMountCommands"] == ""
    assert initrd["extraFiles"] == {}
    service = initrd["systemd"]["services"]["impermanence-boot"]
    exec_start = service["serviceConfig"]["ExecStart"]
    assert "--root /sysroot" in exec_start and exec_start.endswith(" apply")
    assert f"--config {out['configFile']}" in exec_start
    assert service["serviceConfig"]["Type"] == "oneshot"
    assert "initrd-nixos-activation.service" in service["before"]
    assert "initrd-fs.target" in service["after"]
    assert service["unitConfig"]["DefaultDependencies"] is False
    assert "initrd.target" in service["wantedBy"]
    assert service["requiredBy"] == []
    assert service["serviceConfig"]["SuccessExitStatus"] == "1 2 3"
    assert out["configFile"] in initrd["systemd"]["storePaths"]
    assert initrd["systemd"]["contents"]["/etc/impermanence.json"] == out["configFile"]


def test_module_emergency_on_error(lib):
    extra = "{ boot.initrd.impermanence.emergencyOnError = true; }"
    scripted = evaluate(lib, BASIC, REPORT, extra, SCRIPTED)
    assert 'if [ "$impermanence_status" -ge 2 ]; then fail; fi' in scripted["initrd"]["postMountCommands"]
    assert "fail" not in evaluate(lib, BASIC, REPORT, SCRIPTED)["initrd"]["postMountCommands"]
    systemd = evaluate(lib, BASIC, REPORT, extra)
    service = systemd["initrd"]["systemd"]["services"]["impermanence-boot"]
    assert service["requiredBy"] == ["initrd.target"]
    assert service["serviceConfig"]["SuccessExitStatus"] == "1"


def initrd_command(out: dict) -> str:
    """The initrd's apply command, of either initrd."""
    unit = out["initrd"]["systemd"]["services"].get("impermanence-boot")
    return unit["serviceConfig"]["ExecStart"] if unit else out["initrd"]["postMountCommands"]


@pytest.mark.parametrize("initrd", [SYSTEMD, SCRIPTED], ids=["systemd", "scripted"])
def test_module_verbose_flag(lib, initrd):
    assert "--verbose" not in initrd_command(evaluate(lib, BASIC, REPORT, initrd))
    loud = evaluate(lib, BASIC, REPORT, "{ boot.initrd.impermanence.verbose = true; }", initrd)
    assert "--verbose apply" in initrd_command(loud)
    debug = evaluate(lib, '{ environment.persistence."/p" = { enableDebugging = true; directories = [ "/a" ]; }; }',
                     REPORT, initrd)
    assert "--verbose apply" in initrd_command(debug)


@pytest.mark.parametrize("initrd", [SYSTEMD, SCRIPTED], ids=["systemd", "scripted"])
def test_module_kept_machine_id_commits_on_the_first_boot_only(lib, initrd):
    # A bind-mounted machine-id is not on a temporary filesystem: the
    # commit service would fail on every later boot (as NixOS impermanence
    # does, it runs on the first boot only).
    out = evaluate(lib, BASIC, REPORT, initrd)
    assert out["services"]["systemd-machine-id-commit"]["unitConfig"]["ConditionFirstBoot"] is True
    plain = evaluate(lib, '{ environment.persistence."/p".files = [ "/etc/adjtime" ]; }', REPORT, initrd)
    assert plain["services"] == {}


def test_machine_id_commit_is_not_suppressed_in_the_initrd(lib):
    """systemd-machine-id-commit.service is not among the systemd initrd's
    units: suppressing it there does nothing, so the module does not, and
    the docs do not claim it."""
    out = evaluate(lib, BASIC)
    assert out["initrd"]["systemd"]["suppressedUnits"] == []
    for doc in (PROJECT / "docs" / "nixos.md", PROJECT / "README.md"):
        text = " ".join(doc.read_text().split())
        assert "suppress" not in text.lower(), doc


@pytest.mark.parametrize("initrd", [SYSTEMD, SCRIPTED], ids=["systemd", "scripted"])
def test_module_file_systems_add_kernel_support(lib, initrd):
    out = evaluate(lib, r'''{
      environment.persistence."/persistent".directories = [ "/var/log" ];
      boot.initrd.impermanence.fileSystems."/persistent" = { label = "persist"; fsType = "btrfs"; options = [ "subvol=persist" ]; };
    }''', REPORT, initrd)
    assert out["initrd"]["supportedFilesystems"] == {"btrfs": True}
    assert out["settings"]["fileSystems"]["/persistent"] == {
        "device": "LABEL=persist", "fsType": "btrfs", "options": ["subvol=persist"]}
    assert out["failed"] == []


# --- assertions and warnings ---------------------------------------------------------------

def failed(lib, configuration: str) -> list:
    return evaluate(lib, configuration, "e.failedAssertions")


def test_storage_must_be_needed_for_boot(lib):
    persistence = 'environment.persistence."/persistent".directories = [ "/var/log" ];'
    # /persistent in fileSystems without neededForBoot: not there in stage 1.
    messages = failed(lib, '{ ' + persistence + ' fileSystems."/persistent".device = "/dev/sdb1"; }')
    assert len(messages) == 1
    assert 'persistent storage must have the option "neededForBoot"' in messages[0] and "/persistent" in messages[0]
    assert failed(lib, '{ ' + persistence + ' fileSystems."/persistent" = { device = "/dev/sdb1"; neededForBoot = true; }; }') == []
    # Storage below such a filesystem is just as absent.
    messages = failed(lib, '{ environment.persistence."/mnt/data/persist".directories = [ "/var/log" ];'
                           ' fileSystems."/mnt/data".device = "/dev/sdb1"; }')
    assert len(messages) == 1 and "/mnt/data" in messages[0]
    # A filesystem the script mounts itself is fine, also below it.
    assert failed(lib, '{ ' + persistence + ' boot.initrd.impermanence.fileSystems."/persistent".device = "/dev/sdb1"; }') == []
    # Mounted both by stage 1 and by the script.
    messages = failed(lib, '{ ' + persistence + ' fileSystems."/persistent" = { device = "/dev/sdb1"; neededForBoot = true; };'
                           ' boot.initrd.impermanence.fileSystems."/persistent".device = "/dev/sdb1"; }')
    assert len(messages) == 1 and "one place only" in messages[0]
    messages = failed(lib, '{ ' + persistence + ' boot.initrd.impermanence.fileSystems."/persistent".fsType = "ext4"; }')
    assert messages == ["boot.initrd.impermanence.fileSystems: every entry needs `device' or `label'."]


def test_boot_hazard_a_filesystem_holding_targets_must_be_needed_for_boot(lib):
    """/home its own filesystem, not neededForBoot: stage 2 mounts it over
    the kept paths the initrd set up."""
    config = r'''{
      users.users.bird.isNormalUser = true;
      fileSystems."/home" = { device = "none"; fsType = "tmpfs"; NEEDED };
      environment.persistence."/persistent".users.bird.directories = [ "Downloads" ];
    }'''
    messages = failed(lib, config.replace("NEEDED", ""))
    assert len(messages) == 1, messages
    assert 'ephemeral storage must have the option "neededForBoot"' in messages[0]
    assert messages[0].rstrip().endswith("/home")
    assert failed(lib, config.replace("NEEDED", "neededForBoot = true;")) == []
    # A target that is itself a filesystem's mount point; the paths stage 1
    # always mounts (utils.fsNeededForBoot: /var, /var/lib, ...) are fine.
    messages = failed(lib, r'''{
      fileSystems."/srv/data".device = "/dev/sdc";
      fileSystems."/var/lib".device = "/dev/sdd";
      environment.persistence."/persistent".directories = [ "/srv/data" "/var/lib/foo" ];
    }''')
    assert len(messages) == 1 and messages[0].rstrip().endswith("/srv/data"), messages
    # Files count too; a disabled location does not.
    assert len(failed(lib, r'''{
      fileSystems."/etc/ssh".device = "/dev/sde";
      environment.persistence."/persistent".files = [ "/etc/ssh/ssh_host_ed25519_key" ];
    }''')) == 1
    assert failed(lib, r'''{
      fileSystems."/srv".device = "/dev/sdc";
      environment.persistence."/persistent" = { enable = false; directories = [ "/srv/x" ]; };
    }''') == []


def test_warning_when_var_lib_nixos_is_not_kept(lib):
    base = r'''{
      users.users.colord = { isSystemUser = true; group = "colord"; };
      users.groups.colord = { };
      environment.persistence."/persistent" = { DIRS };
    }'''
    warnings = evaluate(lib, base.replace("DIRS", 'directories = [ "/var/log" ];'), "config.warnings")
    assert len(warnings) == 1 and "/var/lib/nixos is not persisted" in warnings[0]
    assert "colord" in warnings[0]
    for kept in ('"/var/lib/nixos"', '"/var/lib"', '"/var"'):
        assert evaluate(lib, base.replace("DIRS", f"directories = [ {kept} ];"), "config.warnings") == []
    quiet = base.replace("DIRS", 'directories = [ "/var/log" ]; enableWarnings = false;')
    assert evaluate(lib, quiet, "config.warnings") == []


# --- activation: apply at nixos-rebuild switch ------------------------------------------------

def test_activation_script_applies_after_users_and_groups(lib):
    out = evaluate(lib, BASIC)
    script = out["activationScripts"]["impermanence-boot"]
    assert script["deps"] == ["users", "groups"]
    order = out["activation"]
    assert order.index("impermanence-boot") > order.index("users")
    assert order.index("impermanence-boot") > order.index("groups")
    # It runs the tool installed on the system, on the running root, with
    # the store path of the JSON (not /etc/impermanence.json, which the
    # etc snippet may not have updated yet).
    tool = next(p for p in out["systemPackages"] if p.endswith("-impermanence-boot"))
    assert f"{tool}/bin/impermanence-boot --root / --config {out['configFile']} apply" in script["text"]
    # A dry activation plans instead.
    assert script["supportsDryActivation"] is True
    assert f"--config {out['configFile']} plan" in script["text"]
    off = evaluate(lib, BASIC, REPORT, "{ boot.initrd.impermanence.applyOnActivation = false; }")
    assert "impermanence-boot" not in off["activationScripts"]


def test_activation_script_runs_apply_on_the_running_root(lib, sandbox, tmp_path):
    """The snippet's text, run as NixOS runs it (sh, NIXOS_ACTION), with
    the tool and the JSON swapped for local ones, inside a sandbox root."""
    out = evaluate(lib, BASIC, REPORT, "{ boot.initrd.impermanence.checkConfig = false; }")
    text = out["activationScripts"]["impermanence-boot"]["text"]
    tool = next(p for p in out["systemPackages"] if p.endswith("-impermanence-boot"))
    config = tmp_path / "impermanence.json"
    config.write_text(json.dumps(out["settings"]))
    local_tool = tmp_path / "tool"
    (local_tool / "bin").mkdir(parents=True)
    wrapper = local_tool / "bin" / "impermanence-boot"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -I -B {SCRIPT} "$@"\n')
    wrapper.chmod(0o755)
    text = (text.replace(tool, str(local_tool)).replace(out["configFile"], str(config))
            .replace("--root /", f"--root {sandbox.root}"))
    storage = sandbox.path("/persistent")
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist", str(storage)], check=True)
    env = dict(os.environ, IMPERMANENCE_NO_KMSG="1")
    dry = subprocess.run(["sh", "-c", text], env=dict(env, NIXOS_ACTION="dry-activate"),
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "bind" in dry.stdout and str(sandbox.path("/var/log")) not in mountinfo_points()
    proc = subprocess.run(["sh", "-c", text], env=dict(env, NIXOS_ACTION="switch"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(sandbox.path("/var/log")) in mountinfo_points()
    assert str(sandbox.path("/home/bird/.ssh")) in mountinfo_points()


# --- the scripted initrd's commands, run for real ------------------------------------------------

def local_packages(tmp_path, python: str) -> str:
    """boot.initrd.impermanence.python and .package as local directories:
    the interpreter `python`, this checkout's script."""
    pkg = tmp_path / "pkg"
    (pkg / "bin").mkdir(parents=True, exist_ok=True)
    if not (pkg / "bin" / "impermanence_boot.py").exists():
        (pkg / "bin" / "impermanence_boot.py").symlink_to(SCRIPT)
    python_prefix = tmp_path / "python"
    (python_prefix / "bin").mkdir(parents=True, exist_ok=True)
    if not (python_prefix / "bin" / "python3").exists():
        (python_prefix / "bin" / "python3").symlink_to(python)
    return f'''{{
      boot.initrd.impermanence.python = {{ type = "derivation"; name = "python"; outPath = "{python_prefix}"; }};
      boot.initrd.impermanence.package = {{ type = "derivation"; name = "pkg"; outPath = "{pkg}"; }};
    }}'''


def build_initrd_python(out: dict, tmp_path):
    """The module's initrd interpreter, its Python part built here by the
    module's own command text (the `python` option being local)."""
    unchecked = tmp_path / "impermanence-unchecked.json"
    unchecked.write_text(json.dumps(out["settings"]))
    tree = tmp_path / "initrd-python"
    elf = harness.run_initrd_python_step(out["initrdPython"]["buildCommand"], {
        out["findModules"]: FINDER,
        out["initrdPythonHelper"]: harness.NIX_DIR / "initrd-python.py",
        out["unchecked"]: unchecked,
    }, tree, tmp_path / "initrd-python-build")
    return tree, elf


def shell_glue(lib, tmp_path, sandbox, extra: str = "") -> str:
    """postMountCommands with the real interpreter (the initrd's, built by
    the module's command from the distribution's python3), script and JSON."""
    python = distro_python().path
    out = evaluate(lib, BASIC, REPORT, local_packages(tmp_path, python), f"{{ {extra} }}", SCRIPTED)
    commands = out["initrd"]["postMountCommands"]
    generated = tmp_path / "impermanence.json"
    generated.write_text(json.dumps(out["settings"]))
    tree, _ = build_initrd_python(out, tmp_path)
    if out["checkStep"] is not None:
        # The module's check step, run here on the JSON it generates: what
        # it lets through is the file the initrd reads.
        unchecked = tmp_path / "impermanence-unchecked.json"
        step = out["checkStep"].replace(out["unchecked"], str(unchecked))
        subprocess.run(["sh", "-ec", step], check=True,
                       env=dict(os.environ, out=str(generated),
                                PATH=f"{tmp_path / 'python' / 'bin'}:{os.environ['PATH']}"))
    commands = (commands.replace(out["configFile"], str(generated)).replace("/mnt-root", str(sandbox.root))
                .replace(out["initrdPython"]["path"], str(tree)))
    # The module's other build step, done here: byte-compile the script.
    stand_in = out["initrd"]["extraFiles"]["/etc/impermanence-boot/impermanence_boot.pyc"]
    compiled = tmp_path / "impermanence_boot.pyc"
    subprocess.run([python, "-I", "-c", "import py_compile, sys; "
                    "py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
                    str(SCRIPT), str(compiled)], check=True)
    return commands.replace(stand_in, str(compiled))


@pytest.mark.parametrize("check_config", [False, True])
def test_post_mount_commands_apply_for_real(lib, sandbox, tmp_path, check_config):
    commands = shell_glue(lib, tmp_path, sandbox,
                          "" if check_config else "boot.initrd.impermanence.checkConfig = false;")
    assert f"--config {tmp_path / 'impermanence.json'} apply" in commands
    storage = sandbox.path("/persistent")
    storage.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "persist", str(storage)], check=True)
    proc = subprocess.run(["sh", "-c", "fail() { echo FAIL-CALLED; }\n" + commands + "\necho END"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("END"), proc.stdout + proc.stderr
    assert "FAIL-CALLED" not in proc.stdout
    # Without -v, a clean apply prints nothing.
    assert proc.stderr == "", proc.stderr
    points = mountinfo_points()
    assert str(sandbox.path("/var/log")) in points
    assert str(sandbox.path("/home/bird/.ssh")) in points
    assert stat.S_IMODE(os.stat(storage / "home/bird/.ssh").st_mode) == 0o700
    assert sandbox.path("/etc/machine-id").read_text() == "uninitialized\n"


def test_post_mount_commands_storage_missing(lib, sandbox, tmp_path):
    """Storage unavailable (exit 3): the boot goes on, unless emergencyOnError."""
    for extra, expect_fail in (("", False), ("boot.initrd.impermanence.emergencyOnError = true;", True)):
        commands = shell_glue(lib, tmp_path, sandbox, extra)
        proc = subprocess.run(["sh", "-c", "fail() { echo FAIL-CALLED; }\n" + commands + "\necho END"],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))
        assert proc.stdout.strip().endswith("END"), proc.stdout + proc.stderr
        assert "exited with status 3" in proc.stdout, proc.stdout + proc.stderr
        assert ("FAIL-CALLED" in proc.stdout) == expect_fail
        assert not sandbox.path("/var/log").exists(), "nothing may be bound from missing storage"
        shutil.rmtree(tmp_path / "initrd-python")
