"""Modes: octal and chmod(1)-style symbolic ones, as config items give them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import SCRIPT

sys.path.insert(0, str(SCRIPT.parent))
import impermanence_boot as ib  # noqa: E402


@pytest.mark.parametrize("text,mode", [
    ("0700", 0o700), ("755", 0o755), ("1777", 0o1777), ("0", 0),
    ("u=rwx,g=rx,o=", 0o750), ("u=rwx,g=,o=", 0o700), ("a=rx", 0o555),
    ("u=rwx,go=rx", 0o755), ("=r", 0o444), ("u=rw,g=r,o=r", 0o644),
    ("a=rwx,o-w", 0o775), ("u+rwx", 0o700), ("u=rwx,g=rxs", 0o2750),
    ("a=rwxt", 0o1777), ("ug=rwX", 0o770), ("u=rwx,u-x", 0o600),
    ("u=rwx,g=u,o=g", 0o777), ("u=rwx,go=u-w", 0o755), ("u=rwxs,g=u", 0o4770),
])
def test_parse_mode(text, mode):
    assert ib.parse_mode(text) == mode


@pytest.mark.parametrize("text", ["", "0800", "12345", "rwx", "u=rwq", "u:rwx", "z=rwx",
                                  "u=rwx,,g=rx", "0o755", "u=rwx g=rx", "-1", "g=ur", "g=uo"])
def test_parse_mode_rejects(text):
    with pytest.raises(ValueError):
        ib.parse_mode(text)


@given(st.integers(min_value=0, max_value=0o7777))
def test_octal_round_trip(mode):
    assert ib.parse_mode(format(mode, "o")) == mode
    assert ib.parse_mode(ib.format_mode(mode)) == mode


def chmod_reference(clauses: list) -> int:
    """Apply symbolic clauses with the real chmod(1) to a file of mode 0."""
    path = f"/tmp/impermanence-mode-{os.getpid()}"
    with open(path, "w"):
        pass
    try:
        os.chmod(path, 0)
        subprocess.run(["chmod", ",".join(clauses), path], check=True)
        return os.stat(path).st_mode & 0o7777
    finally:
        os.unlink(path)


# who, then one or two operations; each gives letters or copies a class
# ("g=u", "go=u-w").
ACTION = st.builds(lambda op, perms: op + perms,
                   st.sampled_from(["=", "+", "-"]),
                   st.one_of(st.text(alphabet="rwx", max_size=3), st.sampled_from(["u", "g", "o"])))
CLAUSE = st.builds(lambda who, actions: who + "".join(actions),
                   st.sampled_from(["u", "g", "o", "a", "ug", "go", "uo", "ugo"]),
                   st.lists(ACTION, min_size=1, max_size=2))


@settings(max_examples=60, deadline=None)
@given(st.lists(CLAUSE, min_size=1, max_size=4))
def test_symbolic_modes_match_chmod(clauses):
    # chmod(1) is the reference for the symbolic syntax on a 0 base.
    assert ib.parse_mode(",".join(clauses)) == chmod_reference(clauses)
