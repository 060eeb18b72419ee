"""nix/module.nix on nixpkgs 26.05 and after: the systemd initrd by
default, the scripted stage 1's options possibly gone, accounts made by
userborn or systemd-sysusers, NixOS's real option types and checks
(nix/tests/nixos-options.nix, scripted-initrd-options.nix), and the flake.

Evaluated with nixpkgs' real lib (nix/tests/harness.py); the activation
script is the one the stubbed `system.activationScripts` apply renders,
run by bash with the tool swapped for a recorder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import PROJECT, require

import harness

MODULE = harness.MODULE_NIX

BASIC = r'''{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  environment.persistence."/persistent" = {
    directories = [ "/var/log" ];
    files = [ "/etc/machine-id" ];
    users.bird.directories = [ { directory = ".ssh"; mode = "0700"; } ];
  };
}'''

# colord has no fixed uid/gid: NixOS gives it one when it makes the account.
DYNAMIC = r'''{
  users.users.colord = { isSystemUser = true; group = "colord"; };
  users.groups.colord = { };
  environment.persistence."/persistent".directories = [
    { directory = "/var/lib/colord"; user = "colord"; group = "colord"; mode = "u=rwx,g=rx,o="; }
  ];
}'''

SCRIPTED = "{ boot.initrd.systemd.enable = false; }"
USERBORN = "{ services.userborn.enable = true; }"
SYSUSERS = "{ systemd.sysusers.enable = true; users.mutableUsers = false; }"

SELECT = r'''
{
  failed = e.failedAssertions;
  systemd = config.boot.initrd.systemd.enable;
  configFile = "${config.boot.initrd.impermanence.configFile}";
  tool = lib.findFirst (p: lib.hasSuffix "-impermanence-boot" p) null (map toString config.environment.systemPackages);
  services = lib.mapAttrs (_: s: {
    inherit (s) after before wantedBy requiredBy conflicts unitConfig serviceConfig;
    restartTriggers = map toString (s.restartTriggers or [ ]);
  }) config.systemd.services;
  initrdServices = lib.mapAttrs (_: s: { inherit (s) after before unitConfig serviceConfig; })
    config.boot.initrd.systemd.services;
  storePaths = map (p: "${p.source}") config.boot.initrd.systemd.storePaths;
  postMountCommands = config.boot.initrd.postMountCommands or null;
  activationScript = config.system.activationScripts.script;
  snippets = lib.mapAttrs (_: s: if lib.isString s then s else s.text)
    (removeAttrs config.system.activationScripts [ "script" ]);
  activation = e.activation;
}
'''


def evaluate(lib, *modules: str, select: str = SELECT, **kw):
    return harness.evaluate(harness.system(
        f"{MODULE} " + " ".join(f"({m})" for m in modules), select, lib=lib, **kw))


def evaluation_error(lib, *modules: str, select: str = SELECT, **kw) -> str:
    with pytest.raises(harness.NixError) as info:
        evaluate(lib, *modules, select=select, **kw)
    return info.value.stderr


# --- 1. accounts from userborn / systemd-sysusers ------------------------------------------

def ordered_before(services: dict, first: str, second: str) -> bool:
    """Whether systemd orders unit `first` before `second`, by the After=
    and Before= of the evaluated units (transitively)."""
    edges: dict = {}
    for name, s in services.items():
        unit = f"{name}.service"
        for other in s["after"]:
            edges.setdefault(other, set()).add(unit)
        for other in s["before"]:
            edges.setdefault(unit, set()).add(other)
    seen, todo = set(), [first]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt == second:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


@pytest.mark.parametrize("accounts, unit", [(USERBORN, "userborn.service"),
                                            (SYSUSERS, "systemd-sysusers.service")],
                         ids=["userborn", "sysusers"])
def test_accounts_from_units_apply_after_them(lib, accounts, unit):
    out = evaluate(lib, BASIC, DYNAMIC, accounts)
    assert out["failed"] == []
    services = out["services"]
    ours = services["impermanence-boot-activate"]
    assert ours["serviceConfig"]["ExecStart"] == f"{out['tool']}/bin/impermanence-boot --root / --config {out['configFile']} apply"
    assert ours["serviceConfig"]["Type"] == "oneshot"
    # At boot: after the unit that makes the accounts, before sysinit.target
    # (so before every ordinary service), both pulled in by sysinit.target.
    assert ordered_before(services, unit, "impermanence-boot-activate.service")
    assert not ordered_before(services, "impermanence-boot-activate.service", unit)
    assert ordered_before(services, "impermanence-boot-activate.service", "sysinit.target")
    assert "sysinit.target" in ours["wantedBy"]
    # At a switch: sysinit-reactivation.target restarts the accounts' unit;
    # ours goes with it, after it, and is restarted when the config changes.
    name = unit[:-len(".service")]
    assert "sysinit-reactivation.target" in services[name]["requiredBy"]
    assert "sysinit-reactivation.target" in ours["requiredBy"]
    assert out["configFile"] in ours["restartTriggers"]
    # NixOS's users snippet is empty; activation applies nothing (a dry
    # activation still plans).
    assert out["snippets"]["users"] == ""
    snippet = out["snippets"]["impermanence-boot"]
    assert " apply" not in snippet and f"--config {out['configFile']} plan" in snippet


def test_without_userborn_or_sysusers_no_unit(lib):
    out = evaluate(lib, BASIC, DYNAMIC)
    assert "impermanence-boot-activate" not in out["services"]
    assert f"--config {out['configFile']} apply" in out["snippets"]["impermanence-boot"]
    off = evaluate(lib, BASIC, USERBORN, "{ boot.initrd.impermanence.applyOnActivation = false; }")
    assert "impermanence-boot-activate" not in off["services"]


# --- 2. the activation script in the initrd and at a switch ---------------------------------

def run_activation(out: dict, tmp_path, **env) -> list:
    """The whole activation script, run by bash with the tool replaced by
    a recorder; returns the recorded command lines."""
    log = tmp_path / "calls"
    log.write_text("")
    fake = tmp_path / "tool"
    (fake / "bin").mkdir(parents=True, exist_ok=True)
    recorder = fake / "bin" / "impermanence-boot"
    recorder.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    recorder.chmod(0o755)
    script = out["activationScript"].replace(out["tool"], str(fake))
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict({"PATH": os.environ["PATH"]}, **env), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "failed" not in proc.stdout, proc.stdout
    return log.read_text().splitlines()


def test_activation_applies_at_a_switch_not_in_the_systemd_initrd(lib, tmp_path):
    require(shutil.which("bash") is not None, "bash is not installed")
    out = evaluate(lib, BASIC)
    assert out["systemd"] is True
    apply = f"--root / --config {out['configFile']} apply"
    # initrd-nixos-activation.service: impermanence-boot.service has just applied.
    assert run_activation(out, tmp_path, IN_NIXOS_SYSTEMD_STAGE1="true") == []
    assert run_activation(out, tmp_path, NIXOS_ACTION="switch") == [apply]
    assert run_activation(out, tmp_path, NIXOS_ACTION="dry-activate") == [
        f"--root / --config {out['configFile']} plan"]
    # The snippet runs after users and groups.
    order = out["activation"]
    assert order.index("impermanence-boot") > max(order.index("users"), order.index("groups"))


def test_activation_in_the_initrd_finishes_owners_without_fixed_ids(lib, tmp_path):
    """An owner without a fixed id is made by the users snippet of the
    initrd's own activation, after impermanence-boot.service: apply runs
    there too (and only then)."""
    out = evaluate(lib, BASIC, DYNAMIC)
    apply = f"--root / --config {out['configFile']} apply"
    assert run_activation(out, tmp_path, IN_NIXOS_SYSTEMD_STAGE1="true") == [apply]
    assert run_activation(out, tmp_path, NIXOS_ACTION="switch") == [apply]


def test_activation_with_userborn_applies_nothing(lib, tmp_path):
    out = evaluate(lib, BASIC, DYNAMIC, USERBORN)
    assert run_activation(out, tmp_path, IN_NIXOS_SYSTEMD_STAGE1="true") == []
    assert run_activation(out, tmp_path, NIXOS_ACTION="switch") == []


def test_scripted_stage_1_activation_applies_at_every_boot(lib, tmp_path):
    out = evaluate(lib, BASIC, SCRIPTED)
    assert run_activation(out, tmp_path, NIXOS_ACTION="switch") == [
        f"--root / --config {out['configFile']} apply"]


# --- 4. the real option types ------------------------------------------------------------------

def test_requires_mounts_for_takes_more_paths(lib):
    """unitOption merges a list with other values; two strings conflict.
    The module's RequiresMountsFor is a list, so another one adds to it."""
    out = evaluate(lib, BASIC,
                   '{ boot.initrd.systemd.services.impermanence-boot.unitConfig.RequiresMountsFor = "/sysroot/srv"; }')
    assert out["failed"] == []
    assert sorted(out["initrdServices"]["impermanence-boot"]["unitConfig"]["RequiresMountsFor"]) == [
        "/sysroot", "/sysroot/srv"]


@pytest.mark.parametrize("module, message", [
    ('{ systemd.services.x = { wantedBy = [ "multi-user" ]; }; }', "systemd.services.x.wantedBy"),
    ('{ boot.initrd.systemd.services.x.after = [ "sysroot" ]; }', "boot.initrd.systemd.services.x.after"),
    ('{ systemd.services.x.serviceConfig.Type = "oneshoot"; }', "systemd.services.x.serviceConfig"),
    ('{ systemd.services.x.unitConfig.Description = "a"; systemd.services.x.description = "b"; }',
     "conflicting definition values"),
    ('{ config = lib.mkMerge [ { systemd.services.x.unitConfig.After = "a.service"; } '
     '{ systemd.services.x.unitConfig.After = "b.service"; } ]; }', "conflicting definition values"),
])
def test_the_stubs_refuse_what_nixos_refuses(lib, module, message):
    assert message in evaluation_error(lib, module)
    mount_point = evaluation_error(lib, '{ fileSystems."/data/".device = "/dev/sda1"; }',
                                   select='lib.mapAttrs (_: f: f.mountPoint) config.fileSystems')
    assert "fileSystems" in mount_point and "mountPoint" in mount_point


def test_the_stubs_have_nixos_defaults_and_checks(lib):
    out = evaluate(lib, '{ fileSystems."/off" = { enable = false; device = "/dev/sdb"; }; }', select=r'''{
      systemd = config.boot.initrd.systemd.enable;
      fileSystems = builtins.attrNames config.fileSystems;
      storePaths = config.boot.initrd.systemd.storePaths;
      failed = e.failedAssertions;
    }''')
    assert out["systemd"] is True
    assert out["fileSystems"] == []  # disabled: filtered out
    hooks = evaluate(lib, '{ boot.initrd.postMountCommands = "echo hi"; }', select="e.failedAssertions")
    assert any("systemd stage 1 does not support 'boot.initrd.postMountCommands'" in m for m in hooks)
    assert evaluate(lib, SCRIPTED, '{ boot.initrd.postMountCommands = "echo hi"; }', select="e.failedAssertions") == []
    users = evaluate(lib, '{ users.users.x = { uid = 2000; }; }', select="e.failedAssertions")
    assert any("users.users.x.isSystemUser" in m for m in users)
    assert any("users.users.x.group is unset" in m for m in users)
    paths = evaluate(lib, BASIC, select='map (p: { inherit (p) enable target; source = "${p.source}"; }) '
                                        'config.boot.initrd.systemd.storePaths')
    assert paths and all(p["enable"] is True and p["target"] is None for p in paths)


def test_a_disabled_file_system_is_not_checked(lib):
    """fileSystems.<name>.enable = false: NixOS leaves it out, so it
    neither needs neededForBoot nor holds storage."""
    out = evaluate(lib, BASIC, '{ fileSystems."/persistent" = { enable = false; device = "/dev/sdb"; }; }')
    assert out["failed"] == []


# --- 8. a nixpkgs without the scripted stage 1 -------------------------------------------------

@pytest.mark.parametrize("extra", ["{ }", '{ boot.initrd.impermanence.rotateRoot = { enable = true; device = "LABEL=nixos"; }; }'],
                         ids=["apply", "rotate-root"])
def test_evaluates_without_the_scripted_options(lib, extra):
    out = evaluate(lib, BASIC, extra, select=SELECT.replace(
        "postMountCommands = config.boot.initrd.postMountCommands or null;",
        'scripted = e.options.boot.initrd ? postMountCommands || e.options.boot.initrd ? extraFiles '
        '|| e.options.boot.initrd ? postResumeCommands;'), scripted_initrd=False)
    assert out["scripted"] is False
    assert out["failed"] == []
    assert "impermanence-boot" in out["initrdServices"]
    assert out["configFile"] in out["storePaths"]


def test_without_the_scripted_options_the_scripted_initrd_is_refused(lib):
    out = evaluate(lib, BASIC, SCRIPTED, select="e.failedAssertions", scripted_initrd=False)
    assert any("has no scripted stage 1" in m and "boot.initrd.systemd.enable = true" in m for m in out), out


# --- 7. the flake -----------------------------------------------------------------------------

def nix_command(args: list, tmp_path, timeout: float = 300) -> subprocess.CompletedProcess:
    require(shutil.which("nix") is not None, "nix is not installed (Debian package nix-bin)")
    env = dict(harness.nix_env())
    return subprocess.run(["nix", "--extra-experimental-features", "nix-command flakes",
                           "--store", str(tmp_path / "store"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def repository(tmp_path):
    """This checkout's files (as they are now, tracked or not) committed to
    a fresh git repository: what `git+file` of the repository gives."""
    require(shutil.which("git") is not None, "git is not installed")
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "-C", str(PROJECT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = PROJECT / name.decode()
        if src.is_file():
            dest = repo / name.decode()
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], check=True)
    return repo


def test_nix_flake_check(repository, tmp_path):
    """`nix flake check` on git+file of the repository (?dir=nix): the
    flake has no inputs, so nothing is fetched."""
    proc = nix_command(["flake", "check", f"git+file://{repository}?dir=nix"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr, proc.stderr


def test_the_flakes_module_evaluates_as_a_nixos_module(repository, tmp_path, lib):
    """The flake's nixosModules.default, taken through the flake (getFlake
    of git+file), evaluated by nixpkgs' module system with a configuration."""
    expr = harness.system(
        f'(builtins.getFlake "git+file://{repository}?dir=nix").nixosModules.default ({BASIC})',
        '{ failed = e.failedAssertions; unit = config.boot.initrd.systemd.services ? impermanence-boot; '
        'settings = config.boot.initrd.impermanence.settings; }', lib=lib)
    proc = nix_command(["eval", "--impure", "--json", "--expr", expr], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["failed"] == [] and out["unit"] is True
    assert out["settings"]["persistence"]["/persistent"]["directories"][0]["directory"] == "/var/log"
