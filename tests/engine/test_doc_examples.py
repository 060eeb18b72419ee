"""Every JSON config shown in README.md and docs/ works as written: `check`
accepts it and `plan` on an empty root plans no failure (no unknown
account, no refused path)."""
from __future__ import annotations

import json
import re

import pytest

from support import PROJECT, run

DOCS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]


def json_configs() -> list:
    found = []
    for doc in DOCS:
        for k, block in enumerate(re.findall(r"^```json\n(.*?)^```", doc.read_text(), re.S | re.M)):
            data = json.loads(block)
            if isinstance(data, dict) and "persistence" in data:
                found.append(pytest.param(data, id=f"{doc.name}-{k}"))
    return found


CONFIGS = json_configs()


def test_the_docs_show_configs():
    assert len(CONFIGS) >= 2 and any(p.id.startswith("README") for p in CONFIGS)


@pytest.mark.parametrize("data", CONFIGS)
def test_example_config_checks_and_plans_without_failure(tmp_path, data):
    cfg = tmp_path / "impermanence.json"
    cfg.write_text(json.dumps(data))
    r = run("--config", str(cfg), "check")
    assert r.returncode == 0 and r.stdout.startswith("config OK"), r.stderr
    root = tmp_path / "root"
    root.mkdir()
    for name, location in data["persistence"].items():  # what stage 1 mounted itself
        storage = location.get("persistentStoragePath", name)
        if storage not in data.get("fileSystems", {}):
            (root / storage.lstrip("/")).mkdir(parents=True, exist_ok=True)
    r = run("--root", str(root), "--config", str(cfg), "plan", env={"LIBMOUNT_UTAB": str(tmp_path / "utab")})
    assert r.returncode == 0, r.stderr
    failures = [line for line in r.stdout.splitlines() if line.startswith("fail ")]
    assert failures == [], failures
    assert "bind " in r.stdout or "link " in r.stdout
