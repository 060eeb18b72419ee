"""Every Nix block of README.md, docs/nixos.md and docs/wiping.md is parsed, and evaluated
with nixpkgs' real module system:

- a flake (`inputs`, `outputs`): its `outputs` called with this
  repository's flake as `impermanence-boot` and a `nixpkgs` whose
  `lib.nixosSystem` is nix/tests/eval.nix, next to a ./configuration.nix;
  the NixOS configuration it makes is evaluated;
- anything else is a NixOS module, evaluated with nix/module.nix (unless
  it imports it itself) and home-manager's options declared; placeholders
  for where this repository lives (a fetchTarball of it,
  /path/to/impermanence_boot) are this checkout, and ./impermanence_boot.py
  beside the block is the script.

Each must evaluate without a failed assertion; the JSON it generates must
pass `impermanence_boot.py check`.  The docs' shell block that evaluates
nix/config.nix is run too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import PROJECT, SCRIPT, require

import harness

DOCS = [PROJECT / "README.md", PROJECT / "docs" / "nixos.md", PROJECT / "docs" / "wiping.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list:
    found = []
    for doc in DOCS:
        for i, m in enumerate(b for b in FENCE.finditer(doc.read_text()) if b.group(1) == language):
            found.append(pytest.param(m.group(2), id=f"{doc.name}-{language}-{i}"))
    return found


NIX_BLOCKS = blocks("nix")


def test_the_docs_have_nix_blocks():
    names = [p.id for p in NIX_BLOCKS]
    assert sum(n.startswith("README") for n in names) >= 2
    assert sum(n.startswith("nixos.md") for n in names) >= 6
    assert sum(n.startswith("wiping.md") for n in names) >= 1


def localised(text: str) -> str:
    """Where the docs say "a clone of this repository", this checkout."""
    return text.replace("/etc/nixos/impermanence_boot", str(PROJECT))


def write_block(tmp_path, text: str):
    (tmp_path / "impermanence_boot.py").symlink_to(SCRIPT)
    path = tmp_path / "block.nix"
    path.write_text(localised(text))
    return path


# What evaluating a NixOS configuration forces, and what the tests read.
SUMMARY = r'''
let
  sources = lib.mapAttrs (_: f: "${f.source}");
  summary = {
    failed = e.failedAssertions;
    warnings = config.warnings;
    extraFiles = sources config.boot.initrd.extraFiles;
    etc = sources (lib.filterAttrs (_: f: f.enable) config.environment.etc);
    postMountCommands = config.boot.initrd.postMountCommands;
    postResumeCommands = config.boot.initrd.postResumeCommands;
    services = builtins.attrNames config.boot.initrd.systemd.services;
    initrdSystemd = config.boot.initrd.systemd.enable;
    storePaths = map (p: "${p.source}") config.boot.initrd.systemd.storePaths;
    execStart = lib.mapAttrs (_: s: s.serviceConfig.ExecStart or null) config.boot.initrd.systemd.services;
    settings = if config.environment.etc ? "impermanence.json" || (config.boot.initrd.impermanence.rotateRoot.enable or false)
      then config.boot.initrd.impermanence.settings else null;
    activation = e.activation;
  };
in builtins.deepSeq summary summary
'''


def check_json(tmp_path, settings) -> None:
    path = tmp_path / "generated.json"
    path.write_text(json.dumps(settings))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path), "check"],
                          capture_output=True, text=True, env=dict(os.environ, IMPERMANENCE_NO_KMSG="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("text", NIX_BLOCKS)
def test_nix_block(lib, tmp_path, text):
    path = write_block(tmp_path, text)
    parsed = harness.run_nix(["--parse", str(path)])
    assert parsed.returncode == 0, parsed.stderr
    if re.search(r"^\s*inputs", text, re.M) and "outputs" in text:
        summary = evaluate_flake(lib, tmp_path, path)
    else:
        own = "" if "nix/module.nix" in localised(text) else f"{harness.MODULE_NIX} "
        summary = harness.evaluate(harness.system(f"{own}{path}", SUMMARY, lib=lib, home_manager=True))
    assert summary["failed"] == [], summary["failed"]
    assert summary["warnings"] == [], summary["warnings"]
    for source in summary["extraFiles"].values():
        assert source.startswith("/nix/store/"), source
    # Every block evaluates with nixpkgs' default, the systemd initrd; a
    # block for the scripted stage 1 says so itself.
    scripted = "boot.initrd.systemd.enable = false;" in text
    assert summary["initrdSystemd"] is (not scripted)
    if "rotateRoot" in text:  # the rotation runs before the root is mounted
        if scripted:
            assert "rotate-root" in summary["postResumeCommands"]
        else:
            assert "impermanence-rotate-root" in summary["services"]
        assert summary["settings"]["root"]["device"]
    if summary["settings"] is not None:
        check_json(tmp_path, summary["settings"])


CONFIGURATION = '{ environment.persistence."/persistent".directories = [ "/var/log" ]; }'


def evaluate_flake(lib, tmp_path, path) -> dict:
    (tmp_path / "configuration.nix").write_text(CONFIGURATION)
    select = f'''
let
  flake = import {path};
  nixosSystem = {{ modules, ... }}: import {harness.EVAL_NIX} {{ inherit lib modules; homeManager = true; }};
  nixpkgs = {{ lib = lib // {{ inherit nixosSystem; }}; }};
  ours = (import {harness.NIX_DIR}/flake.nix).outputs {{ self = ours; }};
  outputs = flake.outputs {{ self = outputs; inherit nixpkgs; impermanence-boot = ours; }};
  e = outputs.nixosConfigurations.host;
  inherit (e) config;
in
{SUMMARY}
'''
    summary = harness.evaluate(f"let lib = import {lib}; in {select}")
    # The flake's configuration, with the module, took effect.
    assert summary["settings"]["persistence"]["/persistent"]["directories"][0]["directory"] == "/var/log"
    return summary


def wiring_blocks() -> list:
    return [p.values[0] for p in NIX_BLOCKS if "impermanenceJson" in p.values[0]]


def test_the_systemd_wiring_by_hand_block_runs_a_unit_before_activation(lib, tmp_path):
    text = next(t for t in wiring_blocks() if "boot.initrd.systemd.enable = false;" not in t)
    path = write_block(tmp_path, text)
    summary = harness.evaluate(harness.system(str(path), SUMMARY, lib=lib))
    assert summary["initrdSystemd"] is True and summary["failed"] == []
    assert summary["extraFiles"] == {} and summary["postMountCommands"] == ""
    exec_start = summary["execStart"]["impermanence-boot"]
    assert "--root /sysroot" in exec_start and exec_start.endswith(" apply")
    # Everything the command names is copied into the initrd.
    for word in exec_start.split():
        if word.startswith("/nix/store/"):
            assert any(word.startswith(p) for p in summary["storePaths"]), word


def test_the_wiring_by_hand_block_puts_store_paths_into_the_initrd(lib, tmp_path):
    text = next(t for t in wiring_blocks() if "boot.initrd.systemd.enable = false;" in t)
    path = write_block(tmp_path, text)
    summary = harness.evaluate(harness.system(str(path), SUMMARY, lib=lib))
    files = summary["extraFiles"]
    assert set(files) == {"/impermanence/python", "/impermanence/impermanence_boot.py",
                          "/impermanence/impermanence.json"}
    assert files["/impermanence/impermanence_boot.py"].endswith("-impermanence_boot.py")
    assert "--config /impermanence/impermanence.json apply" in summary["postMountCommands"]


def test_the_json_shell_block_runs(tmp_path):
    require(harness.have_nix(), "nix-instantiate is not installed (Debian package nix-bin)")
    text = next(m.group(2) for doc in DOCS for m in FENCE.finditer(doc.read_text())
                if m.group(1) == "sh" and "./nix/config.nix" in m.group(2))
    (tmp_path / "nix").symlink_to(PROJECT / "nix")
    (tmp_path / "impermanence_boot.py").symlink_to(SCRIPT)
    proc = subprocess.run(["sh", "-ec", text], cwd=tmp_path, capture_output=True, text=True,
                          env=harness.nix_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "impermanence.json").read_text())
    assert data["persistence"]["/persistent"]["users"]["alice"]["files"] == [
        {"file": ".bash_history", "method": "auto"}]
