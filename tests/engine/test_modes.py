"""Modes: octal and chmod(1)-style symbolic ones, as config items give them."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import SCRIPT, require

import impermanence_boot as ib


@pytest.mark.parametrize("text,mode", [
    ("0700", 0o700), ("755", 0o755), ("1777", 0o1777), ("0", 0),
    # Symbolic modes as `mkdir --mode` (NixOS impermanence) reads them, under
    # umask 022: on a=rwx, a clause without a class limited by the umask,
    # a permission no clause names as mkdir(2) leaves it (`+t` is 1755).
    ("u=rwx,g=rx,o=", 0o750), ("u=rwx,g=,o=", 0o700), ("a=rx", 0o555),
    ("u=rwx,go=rx", 0o755), ("=r", 0o444), ("u=rw,g=r,o=r", 0o644),
    ("a=rwx,o-w", 0o775), ("u+rwx", 0o777), ("u=rwx,g=rxs", 0o2757),
    ("a=rwxt", 0o1777), ("ug=rwX", 0o777), ("u=rwx,u-x", 0o677),
    ("u=rwx,g=u,o=g", 0o777), ("u=rwx,go=u-w", 0o755), ("u=rwxs,g=u", 0o4777),
    ("go-rwx", 0o700), ("+t", 0o1755), ("=rwx", 0o755), ("-w", 0o577), ("o=", 0o770),
    ("u=rwx", 0o777), ("o+t", 0o1755), ("o+t,go+w", 0o1777), ("g+s", 0o2777),
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


def mkdir_reference(modes: list, tmp_path) -> list:
    """The mode coreutils' `mkdir -m MODE` gives a directory under umask
    022 (None where it refuses MODE), for every mode, in one shell."""
    script = ('umask 022; i=0; for m in "$@"; do i=$((i+1)); '
              'mkdir -m "$m" "d$i" 2>/dev/null && stat -c %a "d$i" || echo none; done')
    out = subprocess.run(["sh", "-c", script, "sh", *modes], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert len(out) == len(modes)
    return [None if o == "none" else int(o, 8) for o in out]


def random_modes(count: int, seed: int) -> list:
    """Symbolic modes of every shape mkdir reads: classes or none, one to
    three operations each, letters (X, s, t too) or a copied class."""
    import random

    rng = random.Random(seed)

    def action():
        perms = rng.choice(["", "r", "w", "x", "X", "s", "t", "rw", "rx", "wx", "rwx", "rwxst",
                            "Xs", "u", "g", "o"])
        return rng.choice("=+-") + perms

    def clause():
        who = rng.choice(["", "", "u", "g", "o", "a", "ug", "go", "uo", "ugo", "au"])
        return who + "".join(action() for _ in range(rng.randint(1, 3)))

    return [",".join(clause() for _ in range(rng.randint(1, 3))) for _ in range(count)]


def coreutils_version() -> tuple:
    out = subprocess.run(["mkdir", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\(GNU coreutils\) (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def test_symbolic_modes_match_mkdir(tmp_path):
    # coreutils' mkdir -m is the reference, as NixOS impermanence runs it:
    # coreutils 9 and later. Before 9.0 mkdir -m started from a=rwx less
    # the umask even under a clause that names its class (u=wx gave 355,
    # not 377), so an older mkdir cannot be the reference.
    version = coreutils_version()
    require(version >= (9, 0), f"mkdir is GNU coreutils {version[0]}.{version[1]}, "
                               "not 9.0 or later (the reference)")
    modes = random_modes(400, seed=19)
    for text, want in zip(modes, mkdir_reference(modes, tmp_path)):
        if want is None:
            with pytest.raises(ValueError):
                ib.parse_mode(text)
        else:
            assert ib.parse_mode(text) == want, text
