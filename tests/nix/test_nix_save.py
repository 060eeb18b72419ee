"""The NixOS module at shutdown: boot.initrd.impermanence.save's `save`
(impermanence-save.service) and its optional timer, and journald leaving a
kept /var/log before it is unmounted; evaluated with
nixpkgs' real lib (nix/tests/harness.py) and compared with the units
dist/systemd ships (tests/test_full_os.py boots those on Debian).
"""
from __future__ import annotations

import sys

import pytest

from conftest import PROJECT

import harness

DIST = PROJECT / "dist/systemd"

SELECT = r'''
{
  configFile = "${config.boot.initrd.impermanence.configFile}";
  tool = lib.findFirst (p: lib.hasSuffix "-impermanence-boot" p) null (map toString config.environment.systemPackages);
  services = lib.mapAttrs (_: s: { inherit (s) after before wantedBy conflicts unitConfig serviceConfig description; })
    (lib.filterAttrs (n: _: lib.hasPrefix "impermanence-save" n) config.systemd.services);
  journalFlush = if config.systemd.services ? systemd-journal-flush
    then { inherit (config.systemd.services.systemd-journal-flush) before conflicts; } else null;
  timers = lib.mapAttrs (_: t: { inherit (t) wantedBy timerConfig description; }) config.systemd.timers;
}
'''

PERSISTENCE = r'''{
  users.users.bird = { isNormalUser = true; uid = 1000; };
  environment.persistence."/persistent".users.bird.files = [
    { file = ".local/share/fish/fish_history"; method = "symlink"; }
  ];
  environment.persistence."/state".directories = [ "/var/log" ];
}'''


def evaluate(lib, *modules: str):
    return harness.evaluate(harness.system(
        f"{harness.MODULE_NIX} " + " ".join(f"({m})" for m in modules), SELECT, lib=lib))


def unit_file(name: str) -> dict:
    """{key: [values]} of a unit file's settings."""
    settings: dict = {}
    for line in (DIST / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).extend(value.split() or [""])
    return settings


def test_off_by_default(lib):
    out = evaluate(lib, PERSISTENCE)
    assert out["services"] == {} and out["timers"] == {}


def test_the_shutdown_unit_is_dist_s_with_the_module_s_paths(lib):
    out = evaluate(lib, PERSISTENCE, "{ boot.initrd.impermanence.save.enable = true; }")
    assert set(out["services"]) == {"impermanence-save"} and out["timers"] == {}
    unit = out["services"]["impermanence-save"]
    dist = unit_file("impermanence-save.service")
    assert unit["after"] == dist["After"]
    assert sorted(unit["before"]) == sorted(dist["Before"])
    assert sorted(unit["conflicts"]) == sorted(dist["Conflicts"])
    assert unit["wantedBy"] == dist["WantedBy"]
    assert unit["unitConfig"]["DefaultDependencies"] is False and dist["DefaultDependencies"] == ["no"]
    service = unit["serviceConfig"]
    assert service["Type"] == "oneshot" and service["RemainAfterExit"] is True
    assert [str(service["TimeoutStopSec"])] == dist["TimeoutStopSec"]
    assert service["Environment"] == "IMPERMANENCE_NO_KMSG=1"
    assert service["ExecStart"].endswith("/bin/true")
    # save with the generated JSON, by the same tool as on the command line.
    assert service["ExecStop"] == f"{out['tool']}/bin/impermanence-boot --config {out['configFile']} save"
    assert dist["ExecStop"][-3:] == ["--config", "/etc/impermanence.json", "save"]
    # Stopped before every storage's unmount.
    assert sorted(unit["unitConfig"]["RequiresMountsFor"]) == ["/persistent", "/state"]


def test_an_interval_adds_the_timer_and_its_service(lib):
    out = evaluate(lib, PERSISTENCE, '{ boot.initrd.impermanence.save = { enable = true; interval = "10min"; }; }')
    assert set(out["services"]) == {"impermanence-save", "impermanence-save-now"}
    timer = out["timers"]["impermanence-save"]
    dist = unit_file("impermanence-save.timer")
    assert timer["wantedBy"] == dist["WantedBy"] == ["timers.target"]
    assert timer["timerConfig"] == {"OnBootSec": "10min", "OnUnitActiveSec": "10min",
                                    "Unit": dist["Unit"][0]}
    now = out["services"]["impermanence-save-now"]
    dist_now = unit_file("impermanence-save-now.service")
    assert now["serviceConfig"]["ExecStart"] == out["services"]["impermanence-save"]["serviceConfig"]["ExecStop"]
    assert now["serviceConfig"]["Type"] == "oneshot"
    assert [str(now["serviceConfig"]["Nice"])] == dist_now["Nice"]
    assert [now["serviceConfig"]["IOSchedulingClass"]] == dist_now["IOSchedulingClass"]
    assert sorted(now["unitConfig"]["RequiresMountsFor"]) == ["/persistent", "/state"]
    # Without save.enable an interval does nothing.
    off = evaluate(lib, PERSISTENCE, '{ boot.initrd.impermanence.save.interval = "10min"; }')
    assert off["services"] == {} and off["timers"] == {}


def test_a_wrong_interval_type_is_an_evaluation_error(lib):
    with pytest.raises(harness.NixError) as info:
        evaluate(lib, PERSISTENCE, "{ boot.initrd.impermanence.save = { enable = true; interval = 15; }; }")
    assert "save.interval" in info.value.stderr


def test_a_kept_journal_is_left_before_its_unmount(lib):
    dist = unit_file("journal-flush-until-umount.conf")
    for kept in ("/var/log", "/var", "/var/log/journal"):
        out = evaluate(lib, f'{{ environment.persistence."/persistent".directories = [ "{kept}" ]; }}')
        assert out["journalFlush"] == {"before": dist["Before"], "conflicts": dist["Conflicts"]}, kept
    for kept in ("/var/lib/systemd", "/var/log/nginx"):
        out = evaluate(lib, f'{{ environment.persistence."/persistent".directories = [ "{kept}" ]; }}')
        assert out["journalFlush"] is None, kept
