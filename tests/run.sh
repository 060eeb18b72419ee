#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest as root.
#   ./tests/run.sh                        every test (with CI=true: what CI runs, below)
#   ./tests/run.sh tests/engine/test_x.py -x   only those (any pytest arguments;
#                                          tests/engine, ... a whole group)
#   ./tests/run.sh --releases [ARGS]      also the release matrix
# The release matrix: the Debian 11 and 13 chroots are built (or taken from
# the cache), the host suite runs with their QEMU boots
# (tests/boot/test_releases.py), then the non-QEMU suite runs inside each chroot
# (tests/releases/run.py), with the same ARGS. With CI=true and no
# arguments, the release matrix runs, and first the mutation check for the
# script's functions changed since its recorded full run
# (tests/mutants.py --since-recorded). Exit status non-zero if any failed.
set -euo pipefail
releases=no
mutants=no
if [ "${1:-}" = --releases ]; then
    releases=yes
    shift
fi
case "${CI:-}" in
    true|1|yes) if [ $# -eq 0 ]; then releases=yes; mutants=yes; fi ;;
esac
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
status=0
if [ "$mutants" = yes ]; then
    "$PROJECT_DIR/.venv/bin/python" tests/mutants.py --since-recorded || status=$?
fi
python3 tests/releases/run.py --build-only
IMPERMANENCE_RELEASES=1 "${pytest[@]}" || status=$?
python3 tests/releases/run.py -- "${targets[@]}" "$@" || status=$?
exit "$status"
