#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest as root.
#   ./tests/run.sh [--releases] [PYTEST-ARGS]
# --releases (what CI runs) adds the release matrix: the Debian 11 and 13
# chroots are built (or taken from the cache), the host suite runs with
# their QEMU boots (tests/test_releases.py), then the non-QEMU suite runs
# inside each chroot (tests/releases/run.py). Exit status non-zero if any
# of the runs failed. Without a path in PYTEST-ARGS, pytest runs every file
# under tests/ (pyproject.toml's testpaths); with one, only what it names.
set -euo pipefail
releases=no
if [ "${1:-}" = --releases ]; then
    releases=yes
    shift
fi
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$PROJECT_DIR"
if [ "$releases" = no ]; then
    exec "$PROJECT_DIR/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi
python3 tests/releases/run.py --build-only
status=0
IMPERMANENCE_RELEASES=1 "$PROJECT_DIR/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@" \
    || status=$?
python3 tests/releases/run.py ${1+--} "$@" || status=$?
exit "$status"
