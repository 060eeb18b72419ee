"""Config items: where each is kept, and the checks across items (listed
twice, overlapping, inside a kept file). Pure tests, no root needed."""
from __future__ import annotations

import pytest

from support import config, error_of, load


def test_item_level_storage_path_is_honoured():
    cfg = load(config(directories=[{"directory": "/var/cache", "persistentStoragePath": "/cache"}]))
    assert cfg.entries[0].storage == ("cache",)
    assert ("cache",) in cfg.storages


def test_disabled_location_is_skipped_entirely():
    cfg = load({"persistence": {"/off": {"enable": False, "directories": ["/var/log"]},
                                "/on": {"directories": ["/var/log"]}}})
    assert [e.storage for e in cfg.entries] == [("on",)]


def test_duplicate_targets_name_both_places():
    exc = error_of({"persistence": {
        "/persistent": {"directories": ["/var/log"]},
        "/other": {"directories": [{"directory": "/var/log"}]}}})
    assert "listed twice" in exc.cause
    assert 'persistence["/persistent"].directories[0]' in str(exc)
    assert 'persistence["/other"].directories[0]' in str(exc)


def test_user_and_system_duplicate_is_detected():
    exc = error_of(config(directories=["/home/bird/Music"], users={"bird": {"directories": ["Music"]}}))
    assert "listed twice" in exc.cause


@pytest.mark.parametrize("data,cause", [
    (config(directories=["/persistent/x"]), "overlaps"),
    (config(directories=["/etc"], files=["/etc/foo/bar"]), None),  # dir containing a file: allowed
    (config(files=["/etc/foo"], directories=["/etc/foo/bar"]), "inside the kept file"),
    ({"persistence": {"/persist/a": {"directories": ["/persist"]}}}, "overlaps"),
])
def test_overlapping_entries(data, cause):
    if cause is None:
        load(data)
    else:
        assert cause in error_of(data).cause
