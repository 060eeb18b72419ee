"""Planning: the actions each entry needs, in an order that makes parents
first; plan prints them, changes nothing, and lists exactly what apply does."""
from __future__ import annotations

import json
import os
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import SCRIPT, base_config, config, load, main_config, mount_points_under, populate

import impermanence_boot as ib


NAMES = st.sampled_from(["var", "lib", "log", "etc", "ssh", "home", "cache", "a", "b", "c.d", "x y"])
REL = st.lists(NAMES, min_size=1, max_size=4).map(lambda parts: "/".join(parts))


@st.composite
def random_config(draw):
    dirs = draw(st.lists(REL, max_size=12))
    files = draw(st.lists(REL, max_size=6))
    user_dirs = draw(st.lists(REL, max_size=5))
    items = ([("d", "/" + p) for p in dirs] + [("f", "/" + p) for p in files]
             + [("u", p) for p in user_dirs])
    rng = random.Random(draw(st.integers()))
    rng.shuffle(items)
    loc = {"directories": [p for k, p in items if k == "d"],
           "files": [p for k, p in items if k == "f"],
           "users": {"bird": {"directories": [p for k, p in items if k == "u"]}}}
    return {"users": {"bird": {"uid": 1000, "group": "users"}}, "groups": {"users": {"gid": 100}},
            "persistence": {"/persistent": loc}}


def try_load(data):
    try:
        return ib.parse_config(data)
    except ib.ConfigError:
        return None  # duplicates and overlaps are rejected: nothing to plan


def plan_lines(cfg, root) -> list:
    tree = ib.Tree(str(root))
    accounts = ib.Accounts(cfg, tree, list(cfg.storages))
    out = []
    for entry in cfg.entries:
        for action in ib.plan_entry(entry, tree, accounts):
            out.append(action)
    return out, tree


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(random_config())
def test_planner_invariants(tmp_path_factory, data):
    cfg = try_load(data)
    if cfg is None:
        return
    targets = [e.target for e in cfg.entries]
    # parents before children, and a total order on targets
    assert targets == sorted(targets)
    for i, a in enumerate(targets):
        for b in targets[i + 1:]:
            assert b[:len(a)] == a or a[:len(b)] != b, f"{b} is a parent of {a} but comes later"
    root = tmp_path_factory.mktemp("root")
    (root / "persistent").mkdir()
    actions, tree = plan_lines(cfg, root)
    for action in actions:
        for field in ("path", "source", "target"):
            comps = getattr(action, field, None)
            if comps is not None:
                assert tree.host(comps).startswith(str(root) + "/")
                assert not any(c in ("", ".", "..") for c in comps)
    # every directory is created before anything inside it
    made = [a.path for a in actions if isinstance(a, ib.MakeDir)]
    for i, p in enumerate(made):
        assert all(not (q[:len(p)] == p and len(q) > len(p)) for q in made[:i])
    # stable: the same config in another item order plans identically
    shuffled = json.loads(json.dumps(data))
    for key in ("directories", "files"):
        shuffled["persistence"]["/persistent"][key].reverse()
    again, _ = plan_lines(try_load(shuffled), root)
    assert [a.describe(tree) for a in again] == [a.describe(tree) for a in actions]
    # plan changes nothing
    assert sorted(os.listdir(root)) == ["persistent"]
    assert os.listdir(root / "persistent") == []


def test_plan_nested_same_storage_binds_once(tmp_path):
    cfg = load(config(directories=["/var/lib", "/var/lib/foo"]))
    (tmp_path / "persistent").mkdir()
    actions, tree = plan_lines(cfg, tmp_path)
    binds = [ib.as_path(a.target) for a in actions if isinstance(a, ib.Bind)]
    # /var/lib/foo is reached through the /var/lib bind: no second mount
    assert binds == ["/var/lib"]


def test_plan_prints_actions_and_changes_nothing(sandbox, disk):
    cfg = main_config(disk.label)
    result = sandbox.run("plan", config=cfg)
    assert result.returncode == 0, result.stderr
    notes, lines = split_plan(result)
    assert notes == [f"note {sandbox.path('/persistent')}: not mounted and not looked into (its mount "
                     "point does not exist yet); planned as if empty"]
    assert lines[0] == f"mkdir {sandbox.path('/persistent')} (0:0 0755, mount point)"
    assert lines[1].startswith(f"mount LABEL={disk.label} (")
    assert f"bind {sandbox.path('/persistent/var/log')} on {sandbox.path('/var/log')}" in lines
    assert f"link {sandbox.path('/etc/nix/id_rsa')} -> /persistent/etc/nix/id_rsa" in lines
    assert any(l.startswith(f"mkdir {sandbox.path('/home/bird/.local')} (1000:100 0755") for l in lines)
    # order: a directory is created before its child, a bind after its mkdirs
    assert lines.index(f"mkdir {sandbox.path('/home/bird')} (1000:100 0700, as in storage)") < \
        lines.index(f"mkdir {sandbox.path('/home/bird/.local')} (1000:100 0755, as in storage)")
    assert os.listdir(sandbox.root) == []
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]
    # after apply, the plan that was printed is what was done: plan is now empty
    assert sandbox.run("apply").returncode == 0
    assert sandbox.run("plan").stdout.strip() == "nothing to do: everything is in place"


def split_plan(result) -> tuple:
    """(notes, actions): plan's first lines say what it assumed."""
    lines = result.stdout.splitlines()
    notes = [l for l in lines if l.startswith("note ")]
    assert lines[:len(notes)] == notes, lines
    return notes, lines[len(notes):]


def apply_actions(result) -> list:
    """apply -v's lines as plan writes them: without the prefix, the
    closing summary and the 'mounted' report that follows the 'mount' action."""
    return [l.removeprefix("impermanence: ") for l in result.stderr.splitlines()
            if not l.startswith(("impermanence: apply: ", "impermanence: mounted "))]


@pytest.mark.parametrize("case", ["failed-entry", "storage-path-in-unmounted-fs"])
def test_plan_lists_what_apply_does(sandbox, disk, case):
    # A failed entry plans its storage parents, which apply never makes:
    # the next entry makes them, and plan says so. A storage path inside a
    # fileSystems entry not mounted yet is made once it is mounted. Mounting
    # the storage is planned and logged like any other action.
    if case == "failed-entry":
        cfg = base_config(disk.label, {"directories": [{"directory": "/srv/a/x", "user": "ghost"},
                                                       "/srv/a/y"]})
    else:
        cfg = base_config(disk.label, {})
        cfg["persistence"] = {"/persistent/system/one": {"directories": ["/var/log"]}}
    plan = sandbox.run("plan", config=cfg)
    assert plan.returncode == 0, plan.stderr
    planned = split_plan(plan)[1]
    assert planned[1].startswith(f"mount LABEL={disk.label} ("), planned
    result = sandbox.run("-v", "apply")
    assert result.returncode == (1 if case == "failed-entry" else 0), result.stderr
    assert planned == [re.sub(r"^(user ghost: .*)", r"fail \1", l) for l in apply_actions(result)]


def plan_actions(result) -> list:
    """plan's lines without its notes (what it assumed)."""
    return split_plan(result)[1]


def logged_actions(result) -> list:
    """apply -v's action lines; an error that follows its `fail` action's
    line (the same words) is not an action of its own."""
    lines = apply_actions(result)
    return [l for i, l in enumerate(lines) if not (i and lines[i - 1] == "fail " + l)]


def test_plan_looks_into_storage_not_mounted_yet(sandbox, disk):
    # Storage holds a file where the config keeps a directory: apply, which
    # mounts it first, refuses the entry; plan, run before the mount,
    # looks through a private read-only mount and says the same.
    populate(disk, {"var/log": b"not a directory\n", "srv/data/kept": b"x\n"})
    cfg = base_config(disk.label, {"directories": ["/srv/data", "/var/log"]})
    sandbox.path("/persistent").mkdir()
    plan = sandbox.run("plan", config=cfg)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0].startswith(f"note {sandbox.path('/persistent')}: not mounted") and \
        "private read-only mount" in lines[0], lines
    assert not any(l.startswith("bind") and l.endswith(str(sandbox.path("/var/log"))) for l in lines), lines
    assert any(l.startswith("fail ") and "persistent/var/log" in l for l in lines), lines
    # It changed nothing: no mount left, nothing made on the root.
    assert mount_points_under(sandbox.root) == [str(sandbox.root)]
    assert os.listdir(sandbox.root) == ["persistent"]
    result = sandbox.run("-v", "apply")
    assert result.returncode == 1, result.stderr
    assert plan_actions(plan) == logged_actions(result)


def test_plan_says_when_it_cannot_look_into_storage(sandbox):
    # The device is not there: planned as if empty, and plan says so.
    cfg = base_config("nosuchlabel0", {"directories": ["/var/log"]})
    sandbox.path("/persistent").mkdir()
    lines = sandbox.run("plan", config=cfg).stdout.splitlines()
    assert lines[0].startswith(f"note {sandbox.path('/persistent')}: not mounted") and \
        "planned as if empty" in lines[0], lines
