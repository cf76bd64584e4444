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
echo "==> mypy (router core, gateway, shared modules)"
"$VENV/bin/mypy" router/registry.py router/policies.py router/pd.py router/cost_model.py router/admission.py \
  gateway/*.py services/engine_args.py kvmesh/config.py kvmesh/errors.py \
  router/metrics.py kvmesh/logs.py kvmesh/tracing.py kvmesh/service_main.py || exit 1
echo "==> pytest"
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
