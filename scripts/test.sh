#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (after scripts/install.sh).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

echo "==> generated stubs are fresh"
"$VENV/bin/python" protos/generate.py --check || exit 1
echo "==> ruff"
"$VENV/bin/ruff" check . || exit 1
echo "==> mypy (every module but the generated stubs)"
"$VENV/bin/mypy" kvmesh || exit 1
echo "==> pytest"
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
