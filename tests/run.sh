#!/usr/bin/env bash
# The whole test suite: installs what it needs, then runs pytest as root.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$PROJECT_DIR"
exec "$PROJECT_DIR/.venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
