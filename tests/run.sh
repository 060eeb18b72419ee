#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest as root.
#   ./tests/run.sh                        every test
#   ./tests/run.sh tests/test_x.py -x     only those (any pytest arguments)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" --tests
cd "$PROJECT_DIR"
targets=(tests)
for arg in "$@"; do
    case "$arg" in -*) ;; *) targets=(); break ;; esac
done
exec "$PROJECT_DIR/.venv/bin/python" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@"
