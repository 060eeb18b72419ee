"""boot.initrd.impermanence.rotateRoot: the NixOS options of the btrfs root
rotation, evaluated with nixpkgs' real lib (nix/tests/eval.nix): the JSON's
"root" key, `rotate-root` in scripted stage 1 (postResumeCommands) and in
the systemd initrd (a unit after the device, before sysroot.mount), and the
option types.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PROJECT, SCRIPT, require

import harness

SELECT = r'''
{
  settings = config.boot.initrd.impermanence.settings;
  configFile = "${config.boot.initrd.impermanence.configFile}";
  compiled = config.boot.initrd.extraFiles."/etc/impermanence-boot/impermanence_boot.pyc".source.name or null;
  initrd = {
    inherit (config.boot.initrd) postMountCommands postResumeCommands postDeviceCommands supportedFilesystems;
    extraFiles = lib.mapAttrs (_: f: "${f.source}") config.boot.initrd.extraFiles;
    services = config.boot.initrd.systemd.services;
    storePaths = map (p: "${p.source}") config.boot.initrd.systemd.storePaths;
    contents = lib.mapAttrs (_: c: "${c.source}") config.boot.initrd.systemd.contents;
  };
}
'''

PERSISTENCE = '{ environment.persistence."/persistent".directories = [ "/var/log" ]; }'
ROTATE = '{ boot.initrd.impermanence.rotateRoot = { enable = true; device = "LABEL=nixos"; }; }'
SYSTEMD = "{ boot.initrd.systemd.enable = true; }"  # the default since nixpkgs 26.05
SCRIPTED = "{ boot.initrd.systemd.enable = false; }"


def evaluate(lib, *modules: str, select: str = SELECT):
    return harness.evaluate(harness.system(
        f"{harness.MODULE_NIX} " + " ".join(f"({m})" for m in modules), select, lib=lib))


def evaluation_error(lib, *modules: str) -> str:
    with pytest.raises(harness.NixError) as info:
        evaluate(lib, *modules)
    return info.value.stderr


def test_the_json_gets_the_root_key(lib):
    out = evaluate(lib, PERSISTENCE, ROTATE)
    assert out["settings"]["root"] == {"device": "LABEL=nixos", "subvolume": "root", "oldRoots": "old_roots",
                                       "keep": {"days": 30, "count": 10}, "blank": None}
    assert out["settings"]["persistence"]["/persistent"]["directories"][0]["directory"] == "/var/log"
    chosen = evaluate(lib, PERSISTENCE, '''{ boot.initrd.impermanence.rotateRoot = {
      enable = true; device = "/dev/mapper/cryptroot"; subvolume = "/nixos/root"; oldRoots = "nixos/.old";
      keep = { days = 7; count = 3; }; blank = "nixos/root-blank"; }; }''')
    assert chosen["settings"]["root"] == {"device": "/dev/mapper/cryptroot", "subvolume": "/nixos/root",
                                          "oldRoots": "nixos/.old", "keep": {"days": 7, "count": 3},
                                          "blank": "nixos/root-blank"}
    # Off (the default): no "root" key, no rotation anywhere.
    off = evaluate(lib, PERSISTENCE)
    assert "root" not in off["settings"]
    assert off["initrd"]["postResumeCommands"] == ""
    assert "impermanence-rotate-root" not in evaluate(lib, PERSISTENCE, SYSTEMD)["initrd"]["services"]


def test_the_script_accepts_the_generated_root_key(lib, tmp_path):
    for extra in ("{ }", '{ boot.initrd.impermanence.rotateRoot = { subvolume = "/nixos/root"; oldRoots = "nixos/.old"; '
                         'blank = "nixos/blank"; keep = { days = 0; count = 100000; }; }; }'):
        path = tmp_path / "generated.json"
        path.write_text(json.dumps(evaluate(lib, PERSISTENCE, ROTATE, extra)["settings"]))
        proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "check"], capture_output=True,
                              text=True, env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr


def test_the_generated_json_is_the_file_the_initrd_reads(lib):
    out = evaluate(lib, PERSISTENCE, ROTATE, "{ boot.initrd.impermanence.checkConfig = false; }",
                   select='{ text = config.boot.initrd.impermanence.configFile.text; }')
    assert json.loads(out["text"])["root"]["device"] == "LABEL=nixos"


def test_scripted_stage_1_rotates_in_post_resume_commands(lib):
    out = evaluate(lib, PERSISTENCE, ROTATE, SCRIPTED)
    initrd = out["initrd"]
    commands = initrd["postResumeCommands"]
    compiled = initrd["extraFiles"]["/etc/impermanence-boot/impermanence_boot.pyc"]
    assert f" -I -S -B {compiled} --config {out['configFile']} rotate-root " in commands
    assert "--root" not in commands  # it mounts the btrfs top level itself
    assert "rotate-root exited with status" in commands and "fail" not in commands
    # apply still runs after the root is mounted; nothing of the systemd initrd.
    assert " apply " in initrd["postMountCommands"] and "rotate-root" not in initrd["postMountCommands"]
    assert initrd["postDeviceCommands"] == ""
    assert initrd["services"] == {}
    assert initrd["supportedFilesystems"].get("btrfs") is True
    loud = evaluate(lib, PERSISTENCE, ROTATE, SCRIPTED,
                    "{ boot.initrd.impermanence = { verbose = true; emergencyOnError = true; }; }")
    assert "--verbose rotate-root" in loud["initrd"]["postResumeCommands"]
    assert 'if [ "$impermanence_status" -ge 2 ]; then fail; fi' in loud["initrd"]["postResumeCommands"]


def test_systemd_initrd_unit_after_the_device_before_sysroot_mount(lib):
    out = evaluate(lib, PERSISTENCE, ROTATE, SYSTEMD)
    initrd = out["initrd"]
    unit = initrd["services"]["impermanence-rotate-root"]
    device = r"dev-disk-by\x2dlabel-nixos.device"
    assert device in unit["requires"] and device in unit["after"]
    assert "sysroot.mount" in unit["before"]
    assert unit["unitConfig"]["DefaultDependencies"] is False
    assert unit["serviceConfig"]["Type"] == "oneshot"
    exec_start = unit["serviceConfig"]["ExecStart"]
    assert exec_start.endswith(f" --config {out['configFile']} rotate-root") and "--root" not in exec_start
    assert "initrd.target" in unit["wantedBy"] and unit["requiredBy"] == []
    assert initrd["postResumeCommands"] == ""
    assert out["configFile"] in initrd["storePaths"]
    assert initrd["contents"]["/etc/impermanence.json"] == out["configFile"]
    # apply's own unit is unchanged, after the root is mounted.
    assert "impermanence-boot" in initrd["services"]
    strict = evaluate(lib, PERSISTENCE, ROTATE, SYSTEMD, "{ boot.initrd.impermanence.emergencyOnError = true; }")
    assert strict["initrd"]["services"]["impermanence-rotate-root"]["requiredBy"] == ["initrd.target"]
    assert strict["initrd"]["services"]["impermanence-rotate-root"]["serviceConfig"]["SuccessExitStatus"] == "1"
    assert unit["serviceConfig"]["SuccessExitStatus"] == "1 2 3"


DEVICES = ["LABEL=nixos", "UUID=0a1b-C2D3", "PARTLABEL=EFI system", "LABEL=.hidden", "/dev/mapper/cryptroot",
           "/dev/disk/by-id/nvme-Samsung_SSD_980-part2", "PARTUUID=1234abcd-02", "LABEL=a/b+c"]
# systemd-escape -p --suffix=device of the /dev/disk/by-* link udev makes.
EXPECTED_UNITS = {
    "LABEL=nixos": r"dev-disk-by\x2dlabel-nixos.device",
    "UUID=0a1b-C2D3": r"dev-disk-by\x2duuid-0a1b\x2dC2D3.device",
    "PARTLABEL=EFI system": r"dev-disk-by\x2dpartlabel-EFI\x5cx20system.device",
    "LABEL=.hidden": r"dev-disk-by\x2dlabel-.hidden.device",
    "/dev/mapper/cryptroot": "dev-mapper-cryptroot.device",
    "/dev/disk/by-id/nvme-Samsung_SSD_980-part2": r"dev-disk-by\x2did-nvme\x2dSamsung_SSD_980\x2dpart2.device",
    "PARTUUID=1234abcd-02": r"dev-disk-by\x2dpartuuid-1234abcd\x2d02.device",
    "LABEL=a/b+c": r"dev-disk-by\x2dlabel-a\x5cx2fb\x2bc.device",
}


def test_device_unit_names_are_systemd_escape_of_the_udev_link(lib):
    modules = " ".join(f'({{ d = "{d}"; }})' for d in DEVICES)
    select = f'''map (d: (import {harness.EVAL_NIX} {{
      inherit lib;
      modules = [ {harness.MODULE_NIX} ({{ boot.initrd.systemd.enable = true;
        boot.initrd.impermanence.rotateRoot = {{ enable = true; device = d; }}; }}) ];
    }}).config.boot.initrd.systemd.services.impermanence-rotate-root.requires) (map (m: m.d) [ {modules} ])'''
    units = [r[0] for r in evaluate(lib, PERSISTENCE, select=select)]
    assert dict(zip(DEVICES, units)) == EXPECTED_UNITS
    if shutil.which("systemd-escape"):  # the tool itself agrees
        for spec, unit in EXPECTED_UNITS.items():
            path = spec
            if "=" in spec:
                tag, value = spec.split("=", 1)
                link = {"LABEL": "by-label", "UUID": "by-uuid", "PARTUUID": "by-partuuid",
                        "PARTLABEL": "by-partlabel"}[tag]
                value = "".join(c if c.isalnum() or c in "#+-.:=@_" else f"\\x{ord(c):02x}" for c in value)
                path = f"/dev/disk/{link}/{value}"
            escaped = subprocess.run(["systemd-escape", "-p", "--suffix=device", path],
                                     capture_output=True, text=True, check=True).stdout.strip()
            assert escaped == unit, spec


def test_the_rotation_alone_gets_the_interpreter_and_the_json_into_the_initrd(lib):
    out = evaluate(lib, ROTATE, SCRIPTED)
    assert "rotate-root" in out["initrd"]["postResumeCommands"]
    assert out["initrd"]["extraFiles"]["/etc/impermanence.json"] == out["configFile"]
    assert out["initrd"]["postMountCommands"] == ""  # nothing to apply
    systemd = evaluate(lib, ROTATE, SYSTEMD)
    assert list(systemd["initrd"]["services"]) == ["impermanence-rotate-root"]
    assert systemd["configFile"] in systemd["initrd"]["storePaths"]


@pytest.mark.parametrize("setting, option", [
    ('device = "nixos";', "rotateRoot.device"),                 # neither a path nor TAG=
    ('device = "LABEL=nixos"; keep.days = -1;', "rotateRoot.keep.days"),
    ('device = "LABEL=nixos"; keep.count = "10";', "rotateRoot.keep.count"),
    ('device = "LABEL=nixos"; subvolume = "root/../persistent";', "rotateRoot.subvolume"),
    ('device = "LABEL=nixos"; subvolume = ".";', "rotateRoot.subvolume"),
    ('device = "LABEL=nixos"; keep.days = 100001;', "rotateRoot.keep.days"),
    ('device = "LABEL=nixos"; oldRoots = "";', "rotateRoot.oldRoots"),
    ('device = "LABEL=nixos"; blank = 5;', "rotateRoot.blank"),
    ('device = "LABEL=nixos"; enable = "yes";', "rotateRoot.enable"),
    ('device = "LABEL=nixos"; keep.weeks = 2;', "rotateRoot.keep.weeks"),
    ("", "rotateRoot.device"),                                  # enabled without a device
])
def test_bad_option_values_fail_evaluation(lib, setting, option):
    enable = "" if "enable" in setting else "enable = true;"
    message = evaluation_error(lib, PERSISTENCE, f"{{ boot.initrd.impermanence.rotateRoot = {{ {enable} {setting} }}; }}")
    assert f"boot.initrd.impermanence.{option}" in message, message


# --- the dracut module's unit (dist/systemd/impermanence-rotate-root.service) ------

DRACUT_UNIT = PROJECT / "dist/systemd/impermanence-rotate-root.service"


def dracut_device_unit(config: dict, tmp_path) -> str:
    """The device unit dist/dracut's module-setup.sh names for a config."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    script = (f'source {PROJECT}/dist/dracut/90impermanence/module-setup.sh && '
              f'_impermanence_root_device_unit {sys.executable} {path}')
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def test_the_dracut_module_names_the_device_unit_as_the_nixos_module(tmp_path):
    require(shutil.which("systemd-escape") is not None, "systemd-escape (systemd) is not installed")
    for spec, unit in EXPECTED_UNITS.items():
        assert dracut_device_unit({"root": {"device": spec}}, tmp_path) == unit, spec
    assert dracut_device_unit({"persistence": {}}, tmp_path) == ""  # no root key: no rotation


def unit_settings(text: str) -> dict:
    settings: dict = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).extend(value.split())
    return settings


def test_the_dracut_unit_is_ordered_as_the_nixos_module_s(lib):
    unit = evaluate(lib, PERSISTENCE, ROTATE, SYSTEMD)["initrd"]["services"]["impermanence-rotate-root"]
    device = EXPECTED_UNITS["LABEL=nixos"]
    dist = unit_settings(DRACUT_UNIT.read_text().replace("@DEVICE@", device))
    assert sorted(dist["After"]) == sorted(unit["after"])
    assert sorted(dist["Before"]) == sorted(unit["before"])
    assert dist["Requires"] == unit["requires"] == [device]
    assert dist["WantedBy"] == unit["wantedBy"]
    assert dist["DefaultDependencies"] == ["no"] and unit["unitConfig"]["DefaultDependencies"] is False
    service = unit["serviceConfig"]
    assert dist["Type"] == [service["Type"]] and dist["RemainAfterExit"] == ["yes"]
    assert service["RemainAfterExit"] is True
    assert " ".join(dist["SuccessExitStatus"]) == service["SuccessExitStatus"]
    for key in ("Environment", "StandardOutput", "StandardError"):
        assert dist[key] == [service[key]], key
    assert dist["ExecStart"][-3:] == ["--config", "/etc/impermanence.json", "rotate-root"]
