#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest as root.
#   ./tests/run.sh                        every test
#   ./tests/run.sh tests/test_x.py -x     only those (any pytest arguments)
#   ./tests/run.sh --releases [ARGS]      also the release matrix (what CI runs)
# --releases: the Debian 11 and 13 chroots are built (or taken from the
# cache), the host suite runs with their QEMU boots (tests/test_releases.py),
# then the non-QEMU suite runs inside each chroot (tests/releases/run.py),
# with the same ARGS. Exit status non-zero if any of the runs failed.
set -euo pipefail
releases=no
if [ "${1:-}" = --releases ]; then
    releases=yes
    shift
fi
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" --tests
cd "$PROJECT_DIR"
targets=(tests)
for arg in "$@"; do
    case "$arg" in -*) ;; *) targets=(); break ;; esac
done
pytest=("$PROJECT_DIR/.venv/bin/python" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@")
if [ "$releases" = no ]; then
    exec "${pytest[@]}"
fi
python3 tests/releases/run.py --build-only
status=0
IMPERMANENCE_RELEASES=1 "${pytest[@]}" || status=$?
python3 tests/releases/run.py -- "${targets[@]}" "$@" || status=$?
exit "$status"
